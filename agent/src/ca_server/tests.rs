//! In-process gRPC tests: a real tonic client (and the node agent's `GrpcSigner` + `CertManager`) against
//! the real server on 127.0.0.1:0 over TLS, with the Kubernetes lookups faked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost_types::value::Kind;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use weft_proto::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateServiceClient};

use super::authz::TokenReviewStatus;
use super::authz::fake::FakeLookup;
use super::*;
use crate::identity::grpc::{GrpcSigner, GrpcSignerConfig};
use crate::identity::{CertManager, Identity};

const TD: &str = "cluster.local";
const CA_NAME: &str = "weft-ca.weft-system.svc";

struct Server {
    addr: SocketAddr,
    root: Arc<CaRoot>,
    lookup: Arc<FakeLookup>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Server {
    async fn start() -> Self {
        let lookup = Arc::new(FakeLookup::default());
        lookup.add_sa_token("agent-a", "weft-system", "weft-node", Some(("weft-node-a", "node-a")), true);
        lookup.add_sa_token("agent-b", "weft-system", "weft-node", Some(("weft-node-b", "node-b")), false);
        lookup.add_pod("weft-system", "weft-node-a", "weft-node", "node-a");
        lookup.add_pod("weft-system", "weft-node-b", "weft-node", "node-b");
        lookup.add_pod("shop", "web-1", "web", "node-a");
        lookup.add_pod("shop", "db-1", "db", "node-b");
        lookup.add_sa_token("web-token", "shop", "web", Some(("web-1", "node-a")), true);
        lookup.tokens.lock().unwrap().insert(
            "expired-token".into(),
            TokenReviewStatus {
                error: Some("[invalid bearer token, service account token has expired]".into()),
                ..Default::default()
            },
        );

        let root = Arc::new(CaRoot::generate(TD).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = CaConfig {
            validity: Validity { default: Duration::from_secs(3600), max: Duration::from_secs(2 * 3600) },
            ..CaConfig::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let (root, lookup) = (root.clone(), lookup.clone() as Arc<dyn ClusterLookup>);
            async move {
                serve(listener, root, lookup, &config, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        Server { addr, root, lookup, stop: Some(stop), task }
    }

    fn channel(&self, server_name: &str) -> Channel {
        let root_pem = self.root.cert_pem().to_owned();
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root_pem)).domain_name(server_name);
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect_lazy()
    }

    /// One CreateCertificate call as ztunnel makes it.
    async fn call(
        &self,
        token: Option<&str>,
        impersonate: Option<&Identity>,
        csr_pem: String,
        validity_secs: i64,
    ) -> Result<Vec<CertificateDer<'static>>, tonic::Status> {
        let mut client = IstioCertificateServiceClient::new(self.channel(CA_NAME));
        let metadata = impersonate.map(|id| prost_types::Struct {
            fields: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value { kind: Some(Kind::StringValue(id.to_string())) },
            )]),
        });
        let mut req =
            tonic::Request::new(IstioCertificateRequest { csr: csr_pem, validity_duration: validity_secs, metadata });
        if let Some(t) = token {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let resp = client.create_certificate(req).await?.into_inner();
        Ok(resp.cert_chain.iter().map(|p| CertificateDer::from(pem::parse(p).unwrap().into_contents())).collect())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let result = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        result.expect("server stops within 5 s of shutdown").unwrap().unwrap();
    }
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

fn csr_pem_for(uri: &str) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn leaf_uri_and_life(chain: &[CertificateDer<'static>]) -> (String, Duration) {
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uri = match &san.value.general_names[..] {
        [x509_parser::extensions::GeneralName::URI(u)] => u.to_string(),
        other => panic!("leaf SANs {other:?}"),
    };
    let not_after = SystemTime::from(leaf.validity().not_after.to_datetime());
    (uri, not_after.duration_since(SystemTime::now()).unwrap_or_default())
}

#[tokio::test]
async fn signs_identity_of_a_pod_on_the_callers_node() {
    let server = Server::start().await;
    let web = id("shop", "web");
    let chain = server.call(Some("agent-a"), Some(&web), csr_pem_for(&web.to_string()), 1800).await.unwrap();
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(chain[1], server.root.ca().root(), "the root is last");
    let (uri, life) = leaf_uri_and_life(&chain);
    assert_eq!(uri, web.to_string());
    assert!(life > Duration::from_secs(1790) && life <= Duration::from_secs(1800), "{life:?}");
    let root_der = server.root.ca().root();
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();

    // node-b's agent (node found through its bound pod) gets db.
    let db = id("shop", "db");
    let chain = server.call(Some("agent-b"), Some(&db), csr_pem_for(&db.to_string()), 0).await.unwrap();
    let (uri, life) = leaf_uri_and_life(&chain);
    assert_eq!(uri, db.to_string());
    assert!(life > Duration::from_secs(3590) && life <= Duration::from_secs(3600), "default validity: {life:?}");

    // Too long a validity is shortened to the maximum (2 h here).
    let chain = server.call(Some("agent-a"), Some(&web), csr_pem_for(&web.to_string()), 86_400 * 365).await.unwrap();
    let (_, life) = leaf_uri_and_life(&chain);
    assert!(life > Duration::from_secs(7190) && life <= Duration::from_secs(7200), "clamped: {life:?}");

    // A plain workload gets its own identity without impersonation.
    let chain = server.call(Some("web-token"), None, csr_pem_for(&web.to_string()), 0).await.unwrap();
    assert_eq!(leaf_uri_and_life(&chain).0, web.to_string());
    server.stop().await;
}

#[tokio::test]
async fn refusals_carry_a_clear_status() {
    let server = Server::start().await;
    let web = id("shop", "web");
    let db = id("shop", "db");
    let expect = |r: Result<Vec<CertificateDer<'static>>, tonic::Status>, code: tonic::Code, needle: &str| {
        let status = r.expect_err("must be refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(needle), "{needle:?} not in {:?}", status.message());
    };

    // An identity of a pod on another node.
    expect(
        server.call(Some("agent-a"), Some(&db), csr_pem_for(&db.to_string()), 0).await,
        tonic::Code::PermissionDenied,
        "no pod with ServiceAccount \"db\" in namespace \"shop\" is scheduled on that node",
    );
    // A CSR whose SAN differs from the requested identity.
    expect(
        server.call(Some("agent-a"), Some(&web), csr_pem_for(&db.to_string()), 0).await,
        tonic::Code::InvalidArgument,
        "the CSR asks for [\"URI:spiffe://cluster.local/ns/shop/sa/db\"]",
    );
    // An invalid token, an expired one, none at all.
    expect(
        server.call(Some("forged"), Some(&web), csr_pem_for(&web.to_string()), 0).await,
        tonic::Code::Unauthenticated,
        "not accepted by the Kubernetes API",
    );
    expect(
        server.call(Some("expired-token"), Some(&web), csr_pem_for(&web.to_string()), 0).await,
        tonic::Code::Unauthenticated,
        "has expired",
    );
    expect(
        server.call(None, Some(&web), csr_pem_for(&web.to_string()), 0).await,
        tonic::Code::Unauthenticated,
        "no bearer token",
    );
    // Malformed CSRs: not PEM, and PEM around garbage.
    expect(
        server.call(Some("agent-a"), Some(&web), "not a csr".into(), 0).await,
        tonic::Code::InvalidArgument,
        "not PEM",
    );
    let garbage = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", b"garbage".to_vec()));
    expect(
        server.call(Some("agent-a"), Some(&web), garbage, 0).await,
        tonic::Code::InvalidArgument,
        "not a valid PKCS#10 request",
    );
    // A workload impersonating its neighbour; a negative validity; a foreign trust domain.
    let plain = id("shop", "db");
    expect(
        server.call(Some("web-token"), Some(&plain), csr_pem_for(&plain.to_string()), 0).await,
        tonic::Code::PermissionDenied,
        "may only have its own identity",
    );
    expect(
        server.call(Some("agent-a"), Some(&web), csr_pem_for(&web.to_string()), -5).await,
        tonic::Code::InvalidArgument,
        "negative",
    );
    let foreign = Identity::new("evil.org", "shop", "web");
    expect(
        server.call(Some("agent-a"), Some(&foreign), csr_pem_for(&foreign.to_string()), 0).await,
        tonic::Code::InvalidArgument,
        "trust domain",
    );
    // The API server is down: retryable.
    server.lookup.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    expect(
        server.call(Some("agent-a"), Some(&web), csr_pem_for(&web.to_string()), 0).await,
        tonic::Code::Unavailable,
        "retry",
    );
    server.stop().await;
}

#[tokio::test]
async fn serving_certificate_names() {
    let server = Server::start().await;
    let web = id("shop", "web");
    // The name stock ztunnels dial works too.
    let mut client = IstioCertificateServiceClient::new(server.channel("istiod.istio-system.svc"));
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem_for(&web.to_string()),
        validity_duration: 0,
        metadata: None,
    });
    req.metadata_mut().insert("authorization", "Bearer web-token".parse().unwrap());
    client.create_certificate(req).await.unwrap();
    // A name the certificate does not carry fails the TLS handshake.
    let mut client = IstioCertificateServiceClient::new(server.channel("evil.example.com"));
    let req = tonic::Request::new(IstioCertificateRequest::default());
    let status = client.create_certificate(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    server.stop().await;
}

#[tokio::test]
async fn node_agent_client_and_cert_manager_obtain_working_certificates() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("istio-token");
    std::fs::write(&token_path, "agent-a\n").unwrap();
    let signer = GrpcSigner::new(GrpcSignerConfig {
        address: format!("https://{}", server.addr),
        server_name: Some(CA_NAME.into()),
        roots: vec![server.root.ca().root()],
        token_path: token_path.clone(),
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    let roots = vec![server.root.ca().root()];
    let manager = CertManager::new(Arc::new(signer.clone()), roots.clone(), TD.into(), Duration::from_secs(3600));

    let web = id("shop", "web");
    let cert = manager.fetch(&web).await.unwrap();
    assert_eq!(cert.identity, web);

    // The certificate works: an mTLS handshake with a peer certificate from the same CA succeeds and
    // each side sees the other's SPIFFE identity.
    let agent_id = id("weft-system", "weft-node");
    let peer = manager.fetch(&agent_id).await.unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
    let connector = tokio_rustls::TlsConnector::from(peer.client_config(std::slice::from_ref(&web)));
    let name = crate::identity::server_name("127.0.0.1".parse().unwrap());
    let (server_side, client_side) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
    let (server_side, client_side) = (server_side.unwrap(), client_side.unwrap());
    assert_eq!(crate::identity::peer_identity(server_side.get_ref().1).unwrap(), agent_id);
    assert_eq!(crate::identity::peer_identity(client_side.get_ref().1).unwrap(), web);

    // The token is re-read on every call: a rotated-in bad token is refused, a good one works again.
    std::fs::write(&token_path, "revoked").unwrap();
    let err = manager.fetch(&id("shop", "default")).await.unwrap_err();
    assert!(err.to_string().contains("Unauthenticated"), "{err}");
    std::fs::write(&token_path, "agent-a").unwrap();
    server.lookup.add_pod("shop", "plain-1", "", "node-a");
    manager.fetch(&id("shop", "default")).await.unwrap();

    // Refusals reach the node agent with the CA's reason.
    let err = manager.fetch(&id("shop", "db")).await.unwrap_err();
    assert!(err.to_string().contains("PermissionDenied") && err.to_string().contains("node-a"), "{err}");
    std::fs::remove_file(&token_path).unwrap();
    let err = manager.fetch(&id("shop", "other")).await.unwrap_err();
    assert!(err.to_string().contains("cannot read the ServiceAccount token"), "{err}");
    drop(manager);
    server.stop().await;
}

#[test]
fn config_from_args_validates() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ca: CaArgs,
    }
    let parse = |args: &[&str]| CaConfig::from_args(Cli::try_parse_from([&["weft-ca"], args].concat()).unwrap().ca);
    let c = parse(&[]).unwrap();
    assert_eq!(c.listen.port(), 15012);
    assert_eq!(c.node_agents, vec![DEFAULT_NODE_AGENT.to_owned()]);
    assert_eq!(c.audiences, vec!["istio-ca".to_owned()]);
    assert_eq!(c.dns_names, vec!["weft-ca.weft-system.svc".to_owned(), "istiod.istio-system.svc".to_owned()]);
    assert_eq!(c.root_configmap.as_deref(), Some(DEFAULT_ROOT_CONFIGMAP));
    assert_eq!(c.validity.default, DEFAULT_CERT_TTL);

    let c = parse(&[
        "--node-agent",
        "kube-system/ztunnel",
        "--node-agent",
        "system:serviceaccount:a:b",
        "--root-configmap",
        "",
    ])
    .unwrap();
    assert_eq!(c.node_agents, vec!["system:serviceaccount:kube-system:ztunnel", "system:serviceaccount:a:b"]);
    assert_eq!(c.root_configmap, None);

    assert!(matches!(parse(&["--node-agent", "ztunnel"]), Err(Error::BadNodeAgent(_))));
    assert!(matches!(parse(&["--trust-domain", "Bad Domain"]), Err(Error::BadTrustDomain(_))));
    assert!(matches!(parse(&["--cert-ttl-secs", "10"]), Err(Error::CertTtlTooShort(10))));
    assert!(matches!(
        parse(&["--cert-ttl-secs", "7200", "--max-cert-ttl-secs", "3600"]),
        Err(Error::MaxBelowDefault { .. })
    ));
}
