//! `weft ca` against the HTTP-level Kubernetes API double: the real kube-based lookups (TokenReview,
//! Pod get, Pod list by `spec.nodeName`), the root kept in a Secret and published to a ConfigMap, and the
//! node agent's gRPC client (`GrpcSigner`, re-reading its token file) with `CertManager` on top.
//! In-process, no root needed.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use weft::ca_server::{CaConfig, CaOptions, Validity};
use weft::identity::grpc::{GrpcSigner, GrpcSignerConfig};
use weft::identity::{CertManager, CertificateSigner, Identity};
use weft_tests::apiserver::{API_AUDIENCE, ApiServer, TokenUser};

const TD: &str = "cluster.local";
const CA_NAME: &str = "weft-ca.weft-system.svc";

fn client(server: &ApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(server.url().parse().expect("url"))).expect("kube client")
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

/// Puts a running pod and returns its UID (assigned by the double).
fn put_pod(api: &ApiServer, ns: &str, name: &str, sa: &str, node: &str) -> String {
    let stored = api
        .put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running"},
        }))
        .expect("put pod");
    stored["metadata"]["uid"].as_str().expect("pod uid").to_owned()
}

fn istio_ca_token(ns: &str, sa: &str, pod: (&str, &str), node: Option<&str>) -> TokenUser {
    let mut user = TokenUser::service_account(ns, sa, Some(pod), node.map(|n| (n, "node-uid")));
    user.audiences = vec!["istio-ca".into()];
    user
}

/// The cluster: node agents on node-a (node name in its token) and node-b (found through its pod),
/// `shop/web` on node-a, `shop/db` on node-b, and some bad tokens.
async fn cluster() -> ApiServer {
    let api = ApiServer::start_new().await.expect("API double");
    for ns in ["weft-system", "shop"] {
        api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})).unwrap();
    }
    let a = put_pod(&api, "weft-system", "weft-node-a", "weft-node", "node-a");
    let b = put_pod(&api, "weft-system", "weft-node-b", "weft-node", "node-b");
    put_pod(&api, "shop", "web-1", "web", "node-a");
    put_pod(&api, "shop", "db-1", "db", "node-b");
    api.register_token("agent-a", istio_ca_token("weft-system", "weft-node", ("weft-node-a", &a), Some("node-a")));
    api.register_token("agent-b", istio_ca_token("weft-system", "weft-node", ("weft-node-b", &b), None));
    let mut expired = istio_ca_token("weft-system", "weft-node", ("weft-node-a", &a), Some("node-a"));
    expired.expires = Some(SystemTime::now() - Duration::from_secs(1));
    api.register_token("expired", expired);
    let mut wrong_audience = istio_ca_token("weft-system", "weft-node", ("weft-node-a", &a), Some("node-a"));
    wrong_audience.audiences = vec![API_AUDIENCE.into()];
    api.register_token("api-audience", wrong_audience);
    api
}

struct Ca {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), weft::ca_server::Error>>,
}

impl Ca {
    async fn start(api: &ApiServer) -> Ca {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = CaConfig {
            validity: Validity { default: Duration::from_secs(3600), max: Duration::from_secs(2 * 3600) },
            ..CaConfig::default()
        };
        let opts = CaOptions { config: Arc::new(config), listener, client: client(api) };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(weft::ca_server::run(opts, async {
            let _ = stopped.await;
        }));
        Ca { addr, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("CA stops within 5 s")
            .unwrap()
            .expect("CA ran without error");
    }
}

/// Polls `f` every 20 ms for up to 10 s.
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after 10 s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The root as published in the ConfigMap, once the CA has started.
async fn published_root(api: &ApiServer) -> CertificateDer<'static> {
    let cm: Value = eventually("the root ConfigMap", || async {
        api.get("v1", "ConfigMap", Some("weft-system"), "weft-ca-root-cert")
    })
    .await;
    let pem_text = cm["data"]["root-cert.pem"].as_str().expect("root-cert.pem in the ConfigMap");
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem_text.as_bytes()).expect("PEM root");
    CertificateDer::from(<CertificateDer<'_> as AsRef<[u8]>>::as_ref(&der).to_vec())
}

fn signer(ca: &Ca, root: &CertificateDer<'static>, token_path: &std::path::Path) -> GrpcSigner {
    GrpcSigner::new(GrpcSignerConfig {
        address: format!("https://{}", ca.addr),
        server_name: Some(CA_NAME.into()),
        roots: vec![root.clone()],
        token_path: token_path.to_path_buf(),
        timeout: Duration::from_secs(5),
    })
    .unwrap()
}

fn csr_der_for(uri: &str) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().der().to_vec()
}

#[tokio::test]
async fn ca_signs_only_what_the_cluster_allows() {
    let api = cluster().await;
    let ca = Ca::start(&api).await;
    let root = published_root(&api).await;
    let secret =
        api.get("v1", "Secret", Some("weft-system"), "weft-ca-root").expect("root Secret created on first start");
    assert!(secret["data"]["ca-key.pem"].is_string() && secret["data"]["ca-cert.pem"].is_string(), "{secret}");

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("istio-token");
    let set_token = |t: &str| std::fs::write(&token, t).unwrap();
    let grpc = signer(&ca, &root, &token);
    let ttl = Duration::from_secs(1800);
    let web = id("shop", "web");
    let db = id("shop", "db");

    // Signs an identity of a pod on the caller's node, through the real TokenReview and pod list.
    set_token("agent-a");
    let chain = grpc.sign(csr_der_for(&web.to_string()), web.clone(), ttl).await.expect("web on node-a");
    assert_eq!(chain.last(), Some(&root), "the chain ends in the published root");
    // node-b's agent: its node comes from its bound pod (get Pod → spec.nodeName).
    set_token("agent-b");
    grpc.sign(csr_der_for(&db.to_string()), db.clone(), ttl).await.expect("db on node-b");
    let requests = api.requests();
    for wanted in [
        "POST /apis/authentication.k8s.io/v1/tokenreviews",
        "GET /api/v1/namespaces/weft-system/pods/weft-node-b",
        "GET /api/v1/pods?&fieldSelector=spec.nodeName%3Dnode-b",
    ] {
        assert!(requests.iter().any(|r| r.starts_with(wanted)), "no {wanted:?} in {requests:#?}");
    }

    let refused = |r: Result<Vec<CertificateDer<'static>>, weft::identity::Error>, code: &str, needle: &str| {
        let msg = r.expect_err("must be refused").to_string();
        assert!(msg.contains(code) && msg.contains(needle), "expected {code} with {needle:?}, got: {msg}");
    };
    // An identity of a pod on another node.
    refused(grpc.sign(csr_der_for(&web.to_string()), web.clone(), ttl).await, "PermissionDenied", "node-b");
    set_token("agent-a");
    refused(
        grpc.sign(csr_der_for(&db.to_string()), db.clone(), ttl).await,
        "PermissionDenied",
        "no pod with ServiceAccount",
    );
    // A CSR whose SAN differs from the requested identity.
    refused(grpc.sign(csr_der_for(&db.to_string()), web.clone(), ttl).await, "InvalidArgument", "sa/db");
    // A malformed CSR.
    refused(grpc.sign(b"not a CSR".to_vec(), web.clone(), ttl).await, "InvalidArgument", "PKCS#10");
    // An invalid token, an expired one, one for the API server's audience.
    set_token("forged");
    refused(
        grpc.sign(csr_der_for(&web.to_string()), web.clone(), ttl).await,
        "Unauthenticated",
        "invalid bearer token",
    );
    set_token("expired");
    refused(grpc.sign(csr_der_for(&web.to_string()), web.clone(), ttl).await, "Unauthenticated", "expired");
    set_token("api-audience");
    refused(grpc.sign(csr_der_for(&web.to_string()), web.clone(), ttl).await, "Unauthenticated", "audiences");

    // A pod that leaves the node takes the node agent's right to its identity with it.
    set_token("agent-a");
    api.remove("v1", "Pod", Some("shop"), "web-1").unwrap();
    refused(grpc.sign(csr_der_for(&web.to_string()), web.clone(), ttl).await, "PermissionDenied", "node-a");
    put_pod(&api, "shop", "web-1", "web", "node-a");

    // The node agent's CertManager gets a certificate it can use.
    let manager = CertManager::new(Arc::new(grpc.clone()), vec![root.clone()], TD.into(), Duration::from_secs(3600));
    let cert = manager.fetch(&web).await.expect("CertManager over gRPC");
    assert_eq!(cert.identity, web);
    let life = cert.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(life > Duration::from_secs(3500) && life <= Duration::from_secs(3600), "{life:?}");
    drop(manager);
    ca.stop().await;

    // A restart keeps the root: it comes from the Secret.
    let ca = Ca::start(&api).await;
    let grpc = signer(&ca, &root, &token);
    let chain = eventually("the restarted CA", || {
        let grpc = grpc.clone();
        let web = web.clone();
        async move { grpc.sign(csr_der_for(&web.to_string()), web, ttl).await.ok() }
    })
    .await;
    assert_eq!(chain.last(), Some(&root), "same root after a restart");
    ca.stop().await;
}

#[tokio::test]
async fn a_root_supplied_in_the_secret_is_used() {
    let api = cluster().await;
    // A root the user made beforehand, stored as `kubectl create secret generic --from-file` would.
    let dir = tempfile::tempdir().unwrap();
    weft::identity::Ca::load_or_create(dir.path(), TD).unwrap();
    let cert_pem = std::fs::read_to_string(dir.path().join("ca-cert.pem")).unwrap();
    let key_pem = std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap();
    let b64 = |s: &str| serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).unwrap();
    api.put(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "weft-ca-root", "namespace": "weft-system"},
        "data": {"ca-cert.pem": b64(&cert_pem), "ca-key.pem": b64(&key_pem)},
    }))
    .unwrap();
    let ca = Ca::start(&api).await;
    let root = published_root(&api).await;
    let supplied_root: CertificateDer<'_> =
        rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes()).expect("PEM");
    assert_eq!(root.as_ref(), supplied_root.as_ref(), "the published root is the supplied one");

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "agent-a").unwrap();
    let web = id("shop", "web");
    let chain = signer(&ca, &root, &token)
        .sign(csr_der_for(&web.to_string()), web, Duration::from_secs(600))
        .await
        .expect("signed with the supplied root");
    assert_eq!(chain.last(), Some(&root));
    ca.stop().await;
}

/// As Istio's namespace controller does with `istio-ca-root-cert`: the root-certificate ConfigMap is in
/// every namespace, and in a namespace created after the CA started, applied server-side.
#[tokio::test]
async fn the_root_configmap_is_published_in_every_namespace_and_new_ones() {
    let api = cluster().await;
    let ca = Ca::start(&api).await;
    let root = published_root(&api).await;
    let pem_in = |ns: &'static str| {
        let api = &api;
        async move {
            let cm = api.get("v1", "ConfigMap", Some(ns), "weft-ca-root-cert")?;
            cm["data"]["root-cert.pem"].as_str().map(str::to_owned)
        }
    };
    let own = pem_in("weft-system").await.expect("own namespace");
    let shop = eventually("the root ConfigMap in shop (existed before the CA)", || pem_in("shop")).await;
    assert_eq!(shop, own);
    assert!(pem_in("late").await.is_none());
    api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late"}})).unwrap();
    let late = eventually("the root ConfigMap in a namespace created later", || pem_in("late")).await;
    assert_eq!(late, own);
    let der: CertificateDer<'_> = rustls_pki_types::pem::PemObject::from_pem_slice(late.as_bytes()).expect("PEM root");
    assert_eq!(der.as_ref(), root.as_ref());
    // Server-side apply by the CA's field manager (what a later apply with another root takes over).
    let cm = api.get("v1", "ConfigMap", Some("late"), "weft-ca-root-cert").unwrap();
    let managers: Vec<(&str, &str)> = cm["metadata"]["managedFields"]
        .as_array()
        .map(|m| m.iter().filter_map(|f| Some((f["manager"].as_str()?, f["operation"].as_str()?))).collect())
        .unwrap_or_default();
    assert_eq!(managers, [("weft-ca", "Apply")], "{cm}");
    ca.stop().await;
}
