//! SPIFFE verification for rustls: chain checks are webpki's (through rustls), the identity checks are ours.
//!
//! Owns: extracting the one SPIFFE ID from a certificate, the client-certificate verifier the HBONE
//! server uses (any workload of our trust domain), the server-certificate verifier the HBONE client
//! uses (exactly the expected identities), and [`peer_identity`]. Does not own: configs, keys, or what
//! an identity is allowed to do.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use super::{Error, Identity};

/// The ServerName to pass to `TlsConnector::connect` for an HBONE connection: the destination IP.
/// Our verifier ignores it (the SPIFFE URI SAN is what is checked), and rustls sends no SNI for an IP
/// address, so nothing about the destination leaks beyond what the TCP connection already shows.
pub fn server_name(destination: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(destination.into())
}

/// The verified SPIFFE identity of the peer of an established TLS connection. Only meaningful for
/// connections made with [`super::WorkloadCert`]'s configs, whose verifiers already checked the chain.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<Identity, Error> {
    let leaf = conn.peer_certificates().and_then(|c| c.first()).ok_or(Error::NoPeerCertificate)?;
    spiffe_id_of(leaf)
}

/// The SPIFFE identity in `cert`: exactly one URI SAN, of the form `spiffe://TD/ns/NS/sa/SA`.
/// Other SAN types may be present (the X.509-SVID spec allows them) and are ignored.
pub(crate) fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<Identity, Error> {
    let bad = |reason: String| Error::BadPeerIdentity { reason };
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| bad(format!("unparsable: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| bad(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| bad("no subjectAltName extension".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one.parse::<Identity>().map_err(|e| bad(e.to_string())),
        [] => Err(bad("no URI SAN (a DNS-only certificate is not a workload certificate)".into())),
        many => Err(bad(format!("{} URI SANs, a workload certificate has exactly one", many.len()))),
    }
}

fn app_failure(e: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The HBONE server's client verifier: webpki chain validation (roots, expiry, clientAuth EKU), then the
/// peer must carry exactly one SPIFFE ID in our trust domain. Client certificates are mandatory.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        trust_domain: String,
    ) -> Result<Self, Error> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| Error::Tls(rustls::Error::General(format!("client verifier: {e}"))))?;
        Ok(Self { inner, provider, trust_domain })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of(end_entity).map_err(app_failure)?;
        if id.trust_domain != self.trust_domain {
            tracing::debug!(peer = %id, trust_domain = %self.trust_domain, "refused client from another trust domain");
            return Err(app_failure(Error::WrongTrustDomain {
                identity: id.to_string(),
                got: id.trust_domain.clone(),
                want: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs only enable TLS 1.3; refuse rather than trust that this is unreachable.
        Err(rustls::Error::General("TLS 1.2 is not allowed for HBONE".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The HBONE client's server verifier: webpki chain validation (roots, expiry, serverAuth EKU), then the
/// peer's SPIFFE ID must be one of `expected`. The ServerName is deliberately not checked.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: Vec<Identity>,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>, expected: Vec<Identity>) -> Self {
        Self { roots, provider, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = spiffe_id_of(end_entity).map_err(app_failure)?;
        if !self.expected.contains(&id) {
            let expected = self.expected.iter().map(ToString::to_string).collect::<Vec<_>>().join(" or ");
            tracing::debug!(peer = %id, %expected, "refused server with unexpected identity");
            return Err(app_failure(Error::UnexpectedPeer { got: id.to_string(), expected }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed for HBONE".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{ClientConfig, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::identity::{Ca, CertManager, WorkloadCert};

    const TD: &str = "cluster.local";

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots_of(ca: &Ca) -> Arc<RootCertStore> {
        let mut store = RootCertStore::empty();
        store.add(ca.root()).unwrap();
        Arc::new(store)
    }

    struct Mesh {
        _dir: tempfile::TempDir,
        ca: Arc<Ca>,
        manager: Arc<CertManager>,
    }

    fn mesh() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::load_or_create(dir.path(), TD).unwrap());
        let manager = CertManager::new(ca.clone(), vec![ca.root()], TD.into(), Duration::from_secs(3600));
        Mesh { _dir: dir, ca, manager }
    }

    fn id(sa: &str) -> Identity {
        Identity::new(TD, "default", sa)
    }

    /// A certificate from `ca` built from arbitrary `params` (bypassing the CA's workload rules).
    fn forged(ca: &Ca, sans: Vec<SanType>) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "forged");
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = ca.issue(&params, &key).unwrap();
        (vec![leaf], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// A real workload chain from `ca`, signed through the CA's normal path with `ttl`.
    fn issued(ca: &Ca, id: &Identity, ttl: Duration) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap();
        let chain = ca.sign(csr.der(), id, ttl).unwrap();
        (chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// A client presenting an arbitrary chain, trusting `trust`'s root for a server that is `expected`.
    fn raw_client(
        trust: &Ca,
        expected: Identity,
        cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Arc<ClientConfig> {
        let verifier = SpiffeServerVerifier::new(roots_of(trust), provider(), vec![expected]);
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match cert {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// A server presenting an arbitrary chain and not asking for client certificates.
    fn raw_server(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    type Side<S> = Result<S, std::io::Error>;

    /// Runs a full handshake over an in-memory pipe and one round trip of application data, which is
    /// what surfaces a server-side refusal of the client certificate to the client in TLS 1.3.
    async fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> (Side<Option<Identity>>, Side<Option<Identity>>) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server_side = async move {
            let mut tls = TlsAcceptor::from(server).accept(s).await?;
            let peer = peer_identity(tls.get_ref().1).ok();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.flush().await?;
            Ok(peer)
        };
        let client_side = async move {
            let name = server_name("10.0.0.1".parse().unwrap());
            let mut tls = TlsConnector::from(client).connect(name, c).await?;
            let peer = peer_identity(tls.get_ref().1).ok();
            tls.write_all(b"ping").await?;
            tls.flush().await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            Ok(peer)
        };
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(client_side, server_side) })
            .await
            .expect("handshake hung")
    }

    async fn workload(mesh: &Mesh, sa: &str) -> Arc<WorkloadCert> {
        mesh.manager.fetch(&id(sa)).await.unwrap()
    }

    #[tokio::test]
    async fn mutual_tls_between_workloads_sees_both_identities() {
        let mesh = mesh();
        let (web, db) = (workload(&mesh, "web").await, workload(&mesh, "db").await);
        let (client, server) = handshake(web.client_config(&[id("db")]), db.server_config()).await;
        assert_eq!(client.unwrap(), Some(id("db")));
        assert_eq!(server.unwrap(), Some(id("web")));

        // Any of several expected identities (e.g. a service backed by two service accounts).
        let (client, server) = handshake(web.client_config(&[id("other"), id("db")]), db.server_config()).await;
        assert_eq!(client.unwrap(), Some(id("db")));
        assert_eq!(server.unwrap(), Some(id("web")));

        // Configs are cached per expected set, order-insensitive.
        assert!(Arc::ptr_eq(
            &web.client_config(&[id("db"), id("other")]),
            &web.client_config(&[id("other"), id("db")])
        ));
    }

    #[tokio::test]
    async fn server_refuses_client_without_certificate() {
        let mesh = mesh();
        let db = workload(&mesh, "db").await;
        let (client, server) = handshake(raw_client(&mesh.ca, id("db"), None), db.server_config()).await;
        let err = server.unwrap_err().to_string();
        assert!(err.contains("no certificates"), "{err}");
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn server_refuses_client_from_another_root() {
        let (mesh, other) = (mesh(), mesh());
        let db = workload(&mesh, "db").await;
        let foreign = issued(&other.ca, &id("web"), Duration::from_secs(60));
        let (client, server) = handshake(raw_client(&mesh.ca, id("db"), Some(foreign)), db.server_config()).await;
        // Both roots are named alike ("weft root CA" of cluster.local), so webpki finds a candidate anchor
        // and fails on its signature; with distinct names it reports UnknownIssuer. Either is a refusal.
        let err = server.unwrap_err().to_string();
        assert!(err.contains("BadSignature") || err.contains("UnknownIssuer"), "{err}");
        assert!(client.is_err());

        // And the other way round: a workload of mesh B never accepts a server of mesh A.
        let web_b = workload(&other, "web").await;
        let (client, _server) = handshake(web_b.client_config(&[id("db")]), db.server_config()).await;
        let err = client.unwrap_err().to_string();
        assert!(err.contains("BadSignature") || err.contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn client_refuses_unexpected_server_identity() {
        let mesh = mesh();
        let (web, db) = (workload(&mesh, "web").await, workload(&mesh, "db").await);
        let (client, server) = handshake(web.client_config(&[id("payments")]), db.server_config()).await;
        let err = client.unwrap_err().to_string();
        assert!(err.contains("UnexpectedPeer"), "{err}");
        assert!(err.contains("spiffe://cluster.local/ns/default/sa/db"), "{err}");
        assert!(err.contains("spiffe://cluster.local/ns/default/sa/payments"), "{err}");
        assert!(server.is_err());
        // An empty expectation accepts nobody.
        let (client, _) = handshake(web.client_config(&[]), db.server_config()).await;
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn certificates_without_a_single_spiffe_uri_are_refused() {
        let mesh = mesh();
        let (web, db) = (workload(&mesh, "web").await, workload(&mesh, "db").await);
        let dns_only = || forged(&mesh.ca, vec![SanType::DnsName("db.default.svc".try_into().unwrap())]);
        let no_san = || forged(&mesh.ca, vec![]);
        let two_uris = || {
            forged(
                &mesh.ca,
                vec![
                    SanType::URI(id("db").to_string().try_into().unwrap()),
                    SanType::URI(id("admin").to_string().try_into().unwrap()),
                ],
            )
        };
        let http_uri = || forged(&mesh.ca, vec![SanType::URI("https://db.default/".try_into().unwrap())]);
        for (what, make) in [
            ("dns-only", &dns_only as &dyn Fn() -> _),
            ("no SAN", &no_san),
            ("two URIs", &two_uris),
            ("http URI", &http_uri),
        ] {
            // As a server certificate…
            let (chain, key) = make();
            let (client, _) = handshake(web.client_config(&[id("db")]), raw_server(chain, key)).await;
            let err = client.expect_err(what).to_string();
            assert!(err.contains("BadPeerIdentity"), "{what}: {err}");
            // …and as a client certificate.
            let (client, server) = handshake(raw_client(&mesh.ca, id("db"), Some(make())), db.server_config()).await;
            let err = server.expect_err(what).to_string();
            assert!(err.contains("BadPeerIdentity"), "{what}: {err}");
            assert!(client.is_err(), "{what}");
        }
    }

    #[tokio::test]
    async fn server_refuses_client_from_another_trust_domain_under_the_same_root() {
        let mesh = mesh();
        let db = workload(&mesh, "db").await;
        let foreign =
            forged(&mesh.ca, vec![SanType::URI("spiffe://example.org/ns/default/sa/web".try_into().unwrap())]);
        let (_, server) = handshake(raw_client(&mesh.ca, id("db"), Some(foreign)), db.server_config()).await;
        let err = server.unwrap_err().to_string();
        assert!(err.contains("WrongTrustDomain") && err.contains("example.org"), "{err}");
    }

    #[tokio::test]
    async fn expired_certificates_are_refused_both_ways() {
        let mesh = mesh();
        let (web, db) = (workload(&mesh, "web").await, workload(&mesh, "db").await);
        let old_client = issued(&mesh.ca, &id("web"), Duration::from_secs(1));
        let old_server = issued(&mesh.ca, &id("db"), Duration::from_secs(1));
        // Validity is whole seconds and webpki compares whole seconds: 1 s of ttl may last almost 2 s.
        tokio::time::sleep(Duration::from_millis(2100)).await;

        let (_, server) = handshake(raw_client(&mesh.ca, id("db"), Some(old_client)), db.server_config()).await;
        let err = server.unwrap_err().to_string();
        assert!(err.contains("expired"), "{err}");

        let (chain, key) = old_server;
        let (client, _) = handshake(web.client_config(&[id("db")]), raw_server(chain, key)).await;
        let err = client.unwrap_err().to_string();
        assert!(err.contains("expired"), "{err}");
    }

    #[test]
    fn spiffe_id_extraction() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), TD).unwrap();
        let (chain, _) = issued(&ca, &id("web"), Duration::from_secs(60));
        assert_eq!(spiffe_id_of(&chain[0]).unwrap(), id("web"));
        // URI plus DNS is fine (X.509-SVID allows other SAN types).
        let (chain, _) = forged(
            &ca,
            vec![
                SanType::DnsName("web.default".try_into().unwrap()),
                SanType::URI(id("web").to_string().try_into().unwrap()),
            ],
        );
        assert_eq!(spiffe_id_of(&chain[0]).unwrap(), id("web"));
        assert!(spiffe_id_of(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }
}
