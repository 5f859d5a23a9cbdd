//! Workload certificates on a node: one key and certificate per identity the node serves, issued on first
//! use, rotated in the background at half-life, and the rustls configs HBONE uses with them.
//!
//! Owns: key generation (ECDSA P-256), CSRs, the per-identity cache and its rotation tasks, and building
//! the TLS 1.3 / ALPN `h2` server and client configs. Does not own: signing (a [`CertificateSigner`]),
//! deciding which identities are needed (callers `fetch` and `forget`), or sockets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::verify::{SpiffeClientVerifier, SpiffeServerVerifier, spiffe_id_of};
use super::{CertificateSigner, Error, Identity};

pub use super::verify::peer_identity;

const ALPN_H2: &[u8] = b"h2";
/// Distinct destination-identity sets kept per certificate; a node talks to few identity sets per source.
const CLIENT_CONFIG_CACHE: usize = 64;
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the admin endpoint shows about one cached certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Issues, caches and rotates workload certificates. Shared as `Arc`; dropping it stops all rotation.
pub struct CertManager {
    shared: Arc<Shared>,
    entries: Mutex<HashMap<Identity, Arc<Entry>>>,
}

struct Shared {
    signer: Arc<dyn CertificateSigner>,
    roots: Arc<RootCertStore>,
    root_ders: Vec<CertificateDer<'static>>,
    trust_domain: String,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
}

struct Entry {
    identity: Identity,
    current: ArcSwapOption<WorkloadCert>,
    /// Serialises issuance for one identity, so concurrent first fetches share one signing.
    issuing: tokio::sync::Mutex<()>,
    rotating: AtomicBool,
    cancel: CancellationToken,
}

impl CertManager {
    /// `roots` are the trust anchors for peers (the CA's root, plus an old root during a root rotation).
    /// Unparsable roots are logged and skipped; with none left every handshake fails closed.
    pub fn new(
        signer: Arc<dyn CertificateSigner>,
        roots: Vec<CertificateDer<'static>>,
        trust_domain: String,
        ttl: Duration,
    ) -> Arc<Self> {
        let mut store = RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(roots.iter().cloned());
        if ignored > 0 || added == 0 {
            tracing::error!(added, ignored, "some trust roots are unusable; peers chaining to them will be refused");
        }
        Arc::new(Self {
            shared: Arc::new(Shared {
                signer,
                roots: Arc::new(store),
                root_ders: roots,
                trust_domain,
                ttl,
                provider: Arc::new(rustls::crypto::ring::default_provider()),
            }),
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// Current certificate for `id`; the first call generates a key, a CSR, gets it signed and caches it;
    /// concurrent first calls for the same id share one signing. Rotated in the background at half-life,
    /// so once a valid certificate exists no caller waits for a rotation. Never returns an expired one.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, Error> {
        if id.trust_domain != self.shared.trust_domain {
            return Err(Error::WrongTrustDomain {
                identity: id.to_string(),
                got: id.trust_domain.clone(),
                want: self.shared.trust_domain.clone(),
            });
        }
        let entry = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries
                .entry(id.clone())
                .or_insert_with(|| {
                    Arc::new(Entry {
                        identity: id.clone(),
                        current: ArcSwapOption::empty(),
                        issuing: tokio::sync::Mutex::new(()),
                        rotating: AtomicBool::new(false),
                        cancel: CancellationToken::new(),
                    })
                })
                .clone()
        };
        if let Some(cert) = entry.valid_cert() {
            return Ok(cert);
        }
        let _guard = entry.issuing.lock().await;
        if let Some(cert) = entry.valid_cert() {
            return Ok(cert);
        }
        let cert = self.shared.issue(id).await?;
        entry.current.store(Some(cert.clone()));
        if !entry.rotating.swap(true, Ordering::AcqRel) {
            tokio::spawn(rotate(self.shared.clone(), entry.clone()));
        }
        Ok(cert)
    }

    /// Stop rotating an identity no pod on this node uses any more. Connections already using its
    /// certificate keep working until they close.
    pub fn forget(&self, id: &Identity) {
        let removed = self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        if let Some(entry) = removed {
            entry.cancel.cancel();
            tracing::info!(identity = %id, "forgot workload identity");
        }
    }

    /// Identity, serial and validity of every cached certificate, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertInfo> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<CertInfo> = entries
            .values()
            .filter_map(|e| e.current.load_full())
            .map(|c| CertInfo {
                identity: c.identity.clone(),
                serial: c.serial.clone(),
                not_before: c.not_before,
                not_after: c.not_after,
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        for entry in self.entries.get_mut().unwrap_or_else(|p| p.into_inner()).values() {
            entry.cancel.cancel();
        }
    }
}

impl Entry {
    fn valid_cert(&self) -> Option<Arc<WorkloadCert>> {
        self.current.load_full().filter(|c| SystemTime::now() < c.not_after)
    }
}

/// Replaces the entry's certificate at half of its remaining life, retrying with backoff on failure,
/// until the entry is forgotten or the manager dropped.
async fn rotate(shared: Arc<Shared>, entry: Arc<Entry>) {
    let id = &entry.identity;
    loop {
        let Some(current) = entry.current.load_full() else {
            return;
        };
        tokio::select! {
            _ = entry.cancel.cancelled() => return,
            _ = tokio::time::sleep_until(current.refresh_at) => {}
        }
        let mut backoff = RETRY_MIN;
        loop {
            let result = {
                let _guard = entry.issuing.lock().await;
                if entry.cancel.is_cancelled() {
                    return;
                }
                shared.issue(id).await
            };
            match result {
                Ok(cert) => {
                    tracing::info!(identity = %id, serial = %cert.serial, not_after = ?cert.not_after, "rotated workload certificate");
                    entry.current.store(Some(cert));
                    break;
                }
                Err(error) => {
                    let expires_in = current.not_after.duration_since(SystemTime::now()).ok();
                    tracing::warn!(identity = %id, %error, retry_in = ?backoff, ?expires_in, "certificate rotation failed");
                    tokio::select! {
                        _ = entry.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

impl Shared {
    async fn issue(&self, id: &Identity) -> Result<Arc<WorkloadCert>, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?;
        let chain = self.signer.sign(csr.der().to_vec(), id.clone(), self.ttl).await.map_err(|e| match e {
            Error::SignerFailed { .. } => e,
            other => Error::SignerFailed { identity: id.to_string(), reason: other.to_string() },
        })?;
        let cert = self.assemble(id, chain, &key)?;
        tracing::info!(identity = %id, serial = %cert.serial, not_after = ?cert.not_after, "issued workload certificate");
        Ok(Arc::new(cert))
    }

    /// Checks what the CA returned is a certificate peers will accept for `id` with our key, and builds
    /// the TLS configs once so the request path only clones `Arc`s.
    fn assemble(
        &self,
        id: &Identity,
        chain: Vec<CertificateDer<'static>>,
        key: &KeyPair,
    ) -> Result<WorkloadCert, Error> {
        let bad = |reason: String| Error::BadIssuedChain { identity: id.to_string(), reason };
        let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?.clone();
        let got = spiffe_id_of(&leaf).map_err(|e| bad(e.to_string()))?;
        if &got != id {
            return Err(bad(format!("it is for {got}")));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| bad(e.to_string()))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad("it is not for the key in our CSR".into()));
        }
        let intermediates: Vec<CertificateDer<'static>> =
            chain[1..].iter().filter(|c| !self.root_ders.contains(c)).cloned().collect();
        let parsed_leaf = rustls::server::ParsedCertificate::try_from(&leaf)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed_leaf,
            &self.roots,
            &intermediates,
            UnixTime::now(),
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| bad(format!("it does not verify against our trust roots: {e}")))?;

        let not_before = SystemTime::from(parsed.validity().not_before.to_datetime());
        let not_after = SystemTime::from(parsed.validity().not_after.to_datetime());
        let serial = hex_serial(parsed.raw_serial());
        // Half of the life we actually have left, measured on our clock: not_before is backdated for
        // skew, so half of [not_before, not_after] would rotate late.
        let remaining = not_after.duration_since(SystemTime::now()).unwrap_or_default();
        let refresh_at = Instant::now() + remaining / 2;

        let mut presented = vec![leaf];
        presented.extend(intermediates);
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = self.provider.key_provider.load_private_key(key_der)?;
        let certified = Arc::new(CertifiedKey::new(presented, signing_key));
        certified.keys_match()?;
        let resolver = Arc::new(SingleCertAndKey::from(certified));

        let client_verifier =
            SpiffeClientVerifier::new(self.roots.clone(), self.provider.clone(), self.trust_domain.clone())?;
        let mut server = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(client_verifier))
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Resumption would skip certificate verification; HBONE connections are long-lived and pooled,
        // so re-verifying every handshake costs little and keeps identity checks in one place.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        let refuse_all = SpiffeServerVerifier::new(self.roots.clone(), self.provider.clone(), Vec::new());
        let mut client_base = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(refuse_all))
            .with_client_cert_resolver(resolver);
        client_base.alpn_protocols = vec![ALPN_H2.to_vec()];
        client_base.resumption = Resumption::disabled();

        Ok(WorkloadCert {
            identity: id.clone(),
            not_before,
            not_after,
            serial,
            refresh_at,
            roots: self.roots.clone(),
            provider: self.provider.clone(),
            server: Arc::new(server),
            client_base,
            clients: Mutex::new(ClientConfigs::default()),
        })
    }
}

fn hex_serial(raw: &[u8]) -> String {
    raw.iter().map(|b| format!("{b:02X}")).collect()
}

/// One workload's certificate and key, with the HBONE TLS configs that use them.
pub struct WorkloadCert {
    pub identity: Identity,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    serial: String,
    refresh_at: Instant,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    /// Everything but the verifier, which depends on the destination.
    client_base: ClientConfig,
    clients: Mutex<ClientConfigs>,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct ClientConfigs {
    by_expected: HashMap<Vec<Identity>, (Arc<ClientConfig>, u64)>,
    tick: AtomicU64,
}

impl WorkloadCert {
    /// Certificate serial in hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// HBONE server side: TLS 1.3 only, ALPN `h2`, requires a client certificate that chains to the
    /// roots and carries exactly one SPIFFE URI SAN in our trust domain. Read the caller's identity
    /// afterwards with [`peer_identity`].
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// HBONE client side: TLS 1.3 only, ALPN `h2`, presents this certificate, and accepts only a server
    /// chaining to the roots whose SPIFFE ID is one of `expected` (the destination workload's identity,
    /// or the waypoint's). Pass [`super::server_name`]`(destination_ip)` as the ServerName: it is not
    /// checked. Configs are cached per distinct `expected` set (LRU, 64 sets).
    pub fn client_config(&self, expected: &[Identity]) -> Arc<ClientConfig> {
        let mut key = expected.to_vec();
        key.sort();
        key.dedup();
        let mut cache = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let tick = cache.tick.fetch_add(1, Ordering::Relaxed);
        if let Some((config, used)) = cache.by_expected.get_mut(&key) {
            *used = tick;
            return config.clone();
        }
        let mut config = self.client_base.clone();
        let verifier = SpiffeServerVerifier::new(self.roots.clone(), self.provider.clone(), key.clone());
        config.dangerous().set_certificate_verifier(Arc::new(verifier));
        let config = Arc::new(config);
        if cache.by_expected.len() >= CLIENT_CONFIG_CACHE {
            let oldest = cache.by_expected.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                cache.by_expected.remove(&oldest);
            }
        }
        cache.by_expected.insert(key, (config.clone(), tick));
        config
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;

    use futures::future::BoxFuture;

    use super::*;
    use crate::identity::Ca;

    const TD: &str = "cluster.local";

    /// Wraps the real CA to count signings, slow them down, make them fail, or lie about the identity.
    struct TestSigner {
        ca: Arc<Ca>,
        calls: AtomicUsize,
        delay: Duration,
        fail: AtomicBool,
        sign_as: Option<Identity>,
    }

    impl CertificateSigner for TestSigner {
        fn sign(
            &self,
            csr_der: Vec<u8>,
            identity: Identity,
            ttl: Duration,
        ) -> BoxFuture<'static, Result<Vec<CertificateDer<'static>>, Error>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let (ca, delay, fail) = (self.ca.clone(), self.delay, self.fail.load(Ordering::SeqCst));
            let identity = self.sign_as.clone().unwrap_or(identity);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if fail {
                    return Err(Error::SignerFailed { identity: identity.to_string(), reason: "test outage".into() });
                }
                ca.sign(&csr_der, &identity, ttl)
            })
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        signer: Arc<TestSigner>,
        manager: Arc<CertManager>,
    }

    fn fixture(ttl: Duration, delay: Duration, sign_as: Option<Identity>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::load_or_create(dir.path(), TD).unwrap());
        let root = ca.root();
        let signer =
            Arc::new(TestSigner { ca, calls: AtomicUsize::new(0), delay, fail: AtomicBool::new(false), sign_as });
        let manager = CertManager::new(signer.clone(), vec![root], TD.into(), ttl);
        Fixture { _dir: dir, signer, manager }
    }

    fn id(sa: &str) -> Identity {
        Identity::new(TD, "default", sa)
    }

    #[tokio::test]
    async fn concurrent_first_fetches_sign_once() {
        let f = fixture(Duration::from_secs(3600), Duration::from_millis(200), None);
        let fetches = (0..16).map(|_| {
            let m = f.manager.clone();
            tokio::spawn(async move { m.fetch(&id("web")).await })
        });
        let certs: Vec<Arc<WorkloadCert>> =
            futures::future::join_all(fetches).await.into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert_eq!(f.signer.calls.load(Ordering::SeqCst), 1);
        assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
        assert_eq!(certs[0].identity, id("web"));

        // Cached afterwards; another identity gets its own signing.
        f.manager.fetch(&id("web")).await.unwrap();
        f.manager.fetch(&id("db")).await.unwrap();
        assert_eq!(f.signer.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn rotates_before_expiry_without_blocking_fetch() {
        // Signing takes 300 ms, so a fetch that waited for a rotation would show it.
        let f = fixture(Duration::from_secs(2), Duration::from_millis(300), None);
        let first = f.manager.fetch(&id("web")).await.unwrap();
        let mut serials = HashSet::from([first.serial().to_owned()]);
        let mut slowest = Duration::ZERO;
        let end = Instant::now() + Duration::from_secs(5);
        let mut fetches = 0;
        while Instant::now() < end {
            let started = Instant::now();
            let cert = f.manager.fetch(&id("web")).await.unwrap();
            slowest = slowest.max(started.elapsed());
            assert!(SystemTime::now() < cert.not_after, "fetch returned an expired certificate {cert:?}");
            serials.insert(cert.serial().to_owned());
            fetches += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let calls = f.signer.calls.load(Ordering::SeqCst);
        assert!(serials.len() >= 4, "only {} certificates in 5 s with a 2 s ttl", serials.len());
        assert!(calls <= serials.len() + 1, "{calls} signings for {} certificates seen", serials.len());
        assert!(slowest < Duration::from_millis(250), "a fetch took {slowest:?} over {fetches} fetches");
        // The snapshot lists the certificate fetch serves. A rotation may land at any moment (one
        // per second here), so bracket the snapshot with fetches: it must match one of them.
        let before = f.manager.fetch(&id("web")).await.unwrap();
        let snap = f.manager.snapshot();
        let after = f.manager.fetch(&id("web")).await.unwrap();
        assert_eq!(snap.len(), 1);
        assert!(
            snap[0].serial == before.serial() || snap[0].serial == after.serial(),
            "snapshot serial {} is neither {} nor {}",
            snap[0].serial,
            before.serial(),
            after.serial()
        );
    }

    #[tokio::test]
    async fn forget_stops_rotation_and_snapshot_lists_current() {
        let f = fixture(Duration::from_secs(2), Duration::ZERO, None);
        let web = f.manager.fetch(&id("web")).await.unwrap();
        let db = f.manager.fetch(&id("db")).await.unwrap();
        let snap = f.manager.snapshot();
        assert_eq!(snap.iter().map(|c| c.identity.clone()).collect::<Vec<_>>(), vec![id("db"), id("web")]);
        assert_eq!(snap[0].serial, db.serial());
        assert_eq!(snap[1].serial, web.serial());
        assert_eq!(snap[1].not_after, web.not_after);
        assert!(snap[1].not_before < snap[1].not_after);

        f.manager.forget(&id("web"));
        f.manager.forget(&id("db"));
        assert!(f.manager.snapshot().is_empty());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(f.signer.calls.load(Ordering::SeqCst), 2, "a forgotten identity was rotated");

        // Fetching again starts afresh.
        let again = f.manager.fetch(&id("web")).await.unwrap();
        assert_ne!(again.serial(), web.serial());
    }

    #[tokio::test]
    async fn signer_failures_surface_and_rotation_retries() {
        let f = fixture(Duration::from_secs(3), Duration::ZERO, None);
        f.signer.fail.store(true, Ordering::SeqCst);
        let err = f.manager.fetch(&id("web")).await.unwrap_err();
        assert!(err.to_string().contains("test outage"), "{err}");
        assert!(f.manager.snapshot().is_empty());

        f.signer.fail.store(false, Ordering::SeqCst);
        let first = f.manager.fetch(&id("web")).await.unwrap();
        // Rotation is due after ~1-1.5 s; make the first attempts fail, then recover.
        f.signer.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1800)).await;
        f.signer.fail.store(false, Ordering::SeqCst);
        let end = Instant::now() + Duration::from_secs(4);
        let mut rotated = false;
        while Instant::now() < end && !rotated {
            let cert = f.manager.fetch(&id("web")).await.unwrap();
            assert!(SystemTime::now() < cert.not_after);
            rotated = cert.serial() != first.serial();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(rotated, "never recovered from a signer outage");
        assert!(f.signer.calls.load(Ordering::SeqCst) >= 4, "no failed rotation attempts were made");
    }

    #[tokio::test]
    async fn refuses_wrong_trust_domain_and_lying_signers() {
        let f = fixture(Duration::from_secs(60), Duration::ZERO, None);
        let err = f.manager.fetch(&Identity::new("example.org", "default", "web")).await.unwrap_err();
        assert!(matches!(err, Error::WrongTrustDomain { .. }), "{err}");
        assert_eq!(f.signer.calls.load(Ordering::SeqCst), 0);

        // A CA that hands out someone else's certificate (here the CSR check stops it first, and the
        // error says so); the manager would refuse the chain anyway.
        let f = fixture(Duration::from_secs(60), Duration::ZERO, Some(id("admin")));
        let err = f.manager.fetch(&id("web")).await.unwrap_err();
        assert!(matches!(err, Error::SignerFailed { .. }), "{err}");
    }

    #[tokio::test]
    async fn issued_chain_is_checked() {
        let f = fixture(Duration::from_secs(60), Duration::ZERO, None);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = |k: &KeyPair, who: &Identity| {
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.subject_alt_names = vec![SanType::URI(who.to_string().try_into().unwrap())];
            p.serialize_request(k).unwrap().der().to_vec()
        };
        let shared = &f.manager.shared;
        let ttl = Duration::from_secs(60);
        let good = f.signer.ca.sign(&csr(&key, &id("web")), &id("web"), ttl).unwrap();
        shared.assemble(&id("web"), good, &key).unwrap();

        let for_admin = f.signer.ca.sign(&csr(&key, &id("admin")), &id("admin"), ttl).unwrap();
        let err = shared.assemble(&id("web"), for_admin, &key).unwrap_err();
        assert!(matches!(err, Error::BadIssuedChain { .. }) && err.to_string().contains("sa/admin"), "{err}");

        let other = f.signer.ca.sign(&csr(&other_key, &id("web")), &id("web"), ttl).unwrap();
        let err = shared.assemble(&id("web"), other, &key).unwrap_err();
        assert!(err.to_string().contains("not for the key"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let stranger = Ca::load_or_create(dir.path(), TD).unwrap();
        let foreign = stranger.sign(&csr(&key, &id("web")), &id("web"), ttl).unwrap();
        let err = shared.assemble(&id("web"), foreign, &key).unwrap_err();
        assert!(err.to_string().contains("trust roots"), "{err}");

        assert!(shared.assemble(&id("web"), Vec::new(), &key).is_err());
    }
}
