//! Garbage on a pod's HBONE port (15008) is refused — plain HTTP text, TLS without a client
//! certificate, TLS with a certificate from another root claiming a mesh identity — while an
//! established mesh connection keeps working. The attacker's sockets are created inside a plain
//! pod's network namespace with `weft::netns::Netns::run`. A positive control with a certificate
//! from the mesh's own CA shows the same client gets through. Needs root and the agent binary.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_tests::mesh::spiffe;
use weft_tests::scenario::{self, MESH_NS};
use weft_tests::{Agent, AgentOptions, PodSpec, Topology, require_root};

const HBONE_PORT: u16 = 15008;
const LIMIT: Duration = Duration::from_secs(10);

/// A TCP connection to `to` whose socket lives in network namespace `netns`.
fn connect_from(netns: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let ns = weft::netns::Netns::open(netns).unwrap_or_else(|e| panic!("open netns {netns}: {e}"));
    let std_stream = ns
        .run(|| std::net::TcpStream::connect_timeout(&to, LIMIT))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("TCP connect to {to} from {netns}: {e} (is the agent's 15008 listener up?)"));
    std_stream.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(std_stream).unwrap()
}

/// Accepts any server certificate: the attacker does not care who the server is.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut cfg = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// A leaf for `spiffe://cluster.local/ns/demo/sa/client` signed by a root the mesh never saw.
fn rogue_client_cert() -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::OrganizationName, "cluster.local");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.subject_alt_names = vec![rcgen::SanType::URI(spiffe(MESH_NS, "client").try_into().unwrap())];
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    (vec![leaf.der().clone(), ca.der().clone()], key)
}

/// An answered HTTP/2 CONNECT: its status and the tunnel's two halves.
type Tunnel = (http::StatusCode, h2::SendStream<Bytes>, h2::RecvStream);

/// TLS + HTTP/2 CONNECT to `authority` over `tcp`; `Err` says where it was refused.
async fn hbone_connect(
    tcp: tokio::net::TcpStream,
    server: IpAddr,
    cfg: Arc<ClientConfig>,
    authority: &str,
) -> Result<Tunnel, String> {
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::IpAddress(server.into()), tcp)
        .await
        .map_err(|e| format!("TLS handshake refused: {e}"))?;
    let (send, conn) = h2::client::handshake(tls).await.map_err(|e| format!("HTTP/2 refused: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.map_err(|e| format!("HTTP/2 closed: {e}"))?;
    let req = http::Request::builder().method(http::Method::CONNECT).uri(authority).body(()).unwrap();
    let (resp, tx) = send.send_request(req, false).map_err(|e| format!("CONNECT not sent: {e}"))?;
    let resp = resp.await.map_err(|e| format!("CONNECT refused: {e}"))?;
    let status = resp.status();
    Ok((status, tx, resp.into_body()))
}

fn status_of(r: &Result<Result<Tunnel, String>, tokio::time::error::Elapsed>) -> String {
    match r {
        Ok(Ok((status, _, _))) => format!("CONNECT answered {status}"),
        Ok(Err(e)) => e.clone(),
        Err(_) => format!("no answer within {LIMIT:?}"),
    }
}

/// A certificate for sa client signed by the agent's own local-mode CA (root kept in the state
/// directory): the positive control proving the attacker's client code can get through at all.
fn mesh_client_cert(topo: &Topology) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let state = topo.dir().join("state");
    let read = |f: &str| {
        std::fs::read_to_string(state.join(f))
            .unwrap_or_else(|e| panic!("{}/{f}: {e} (where does local mode keep its CA root now?)", state.display()))
    };
    let ca_key = rcgen::KeyPair::from_pem(&read("ca-key.pem")).unwrap();
    let ca_pem = read("ca-cert.pem");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe(MESH_NS, "client").try_into().unwrap())];
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    (vec![leaf.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())))
}

fn requests_logged(topo: &Topology) -> usize {
    weft_tests::read_lossy(&topo.dir().join("server-v1-http8080.log"))
        .lines()
        .filter(|l| l.starts_with("http request"))
        .count()
}

#[test]
fn garbage_on_15008_is_refused_while_a_mesh_connection_keeps_working() {
    require_root();
    let topo =
        scenario::demo("garbage").pod(PodSpec::new("echo", MESH_NS).sa("echo").port("echo", 7000)).build().unwrap();
    topo.write_mesh(&[]).unwrap();
    let (client, v1, legacy, echo) = (topo.pod("client"), topo.pod("server-v1"), topo.pod("legacy"), topo.pod("echo"));
    let _s1 = v1.serve_http(8080).unwrap();
    let _s2 = topo.pod("server-v2").serve_http(8080).unwrap();
    let _echo = echo.serve("echo", &["echo", "--port", "7000"]).unwrap();
    let mut agent = Agent::start(&topo, AgentOptions::for_topology(&topo)).unwrap();

    let mut chat = scenario::Session::open(client, echo.addr(7000), "established mesh connection").unwrap();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let hbone = v1.addr(HBONE_PORT);
    let authority = v1.addr(8080).to_string();

    // 0. Positive control: the same client with a certificate from the mesh's CA gets through,
    // so the refusals below are about the credentials, not about this client.
    let body = rt.block_on(async {
        let tcp = connect_from(&legacy.netns, hbone);
        let (status, mut tx, mut rx) = tokio::time::timeout(
            LIMIT,
            hbone_connect(tcp, v1.ipv4.into(), client_config(Some(mesh_client_cert(&topo))), &authority),
        )
        .await
        .expect("positive control: no answer")
        .unwrap_or_else(|e| panic!("positive control with a mesh certificate refused: {e}"));
        assert!(status.is_success(), "positive control: CONNECT answered {status}");
        tx.send_data(Bytes::from_static(b"GET / HTTP/1.1\r\nHost: v1\r\nConnection: close\r\n\r\n"), false).unwrap();
        let mut body = Vec::new();
        let _ = tokio::time::timeout(LIMIT, async {
            while let Some(Ok(chunk)) = rx.data().await {
                body.extend_from_slice(&chunk);
                if body.windows(10).any(|w| w == b"hello from") {
                    break;
                }
            }
        })
        .await;
        String::from_utf8_lossy(&body).into_owned()
    });
    assert!(body.contains("hello from server-v1"), "positive control: no answer through the tunnel: {body:?}");
    let served_before = requests_logged(&topo);

    // 1. Plain HTTP text: a CONNECT and a GET, no TLS at all.
    let got = rt.block_on(async {
        let mut tcp = connect_from(&legacy.netns, hbone);
        let text =
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = tcp.write_all(text.as_bytes()).await;
        let mut buf = Vec::new();
        let ended = tokio::time::timeout(LIMIT, async {
            let mut chunk = [0u8; 4096];
            while buf.len() < 1 << 20 {
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        (ended.is_ok(), String::from_utf8_lossy(&buf).into_owned())
    });
    eprintln!("plain HTTP on 15008 → closed={} reply={:?}", got.0, got.1);
    assert!(got.0, "plaintext on 15008: connection left open for {LIMIT:?}");
    assert!(!got.1.contains("hello from") && !got.1.contains(" 200 "), "plaintext on 15008 was served: {:?}", got.1);
    chat.ping(1);

    // 2. TLS without a client certificate.
    let r = rt.block_on(async {
        let tcp = connect_from(&legacy.netns, hbone);
        tokio::time::timeout(LIMIT, hbone_connect(tcp, v1.ipv4.into(), client_config(None), &authority)).await
    });
    eprintln!("TLS without a client certificate → {}", status_of(&r));
    assert!(
        !matches!(&r, Ok(Ok((s, _, _))) if s.is_success()),
        "TLS without a client certificate got through: {}",
        status_of(&r)
    );
    chat.ping(2);

    // 3. TLS with a certificate from another root that claims the client's identity.
    let r = rt.block_on(async {
        let tcp = connect_from(&legacy.netns, hbone);
        tokio::time::timeout(
            LIMIT,
            hbone_connect(tcp, v1.ipv4.into(), client_config(Some(rogue_client_cert())), &authority),
        )
        .await
    });
    eprintln!("TLS with a foreign root's certificate → {}", status_of(&r));
    assert!(
        !matches!(&r, Ok(Ok((s, _, _))) if s.is_success()),
        "a certificate from a foreign root got through: {}",
        status_of(&r)
    );

    assert_eq!(requests_logged(&topo), served_before, "garbage reached the server app");
    chat.ping(3);
    scenario::get(client, &scenario::server_url(), "after-garbage").expect("new mesh connections after the garbage");
    assert!(agent.is_running(), "agent died on garbage");
}
