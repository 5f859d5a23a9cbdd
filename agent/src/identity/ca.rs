//! The mesh CA's signer: a root key and certificate on disk, and signing of workload CSRs.
//!
//! Owns: creating/loading the root (`ca-key.pem`, `ca-cert.pem`), the rules a workload certificate must
//! follow (X.509-SVID: one SPIFFE URI SAN, leaf, serverAuth+clientAuth), and the [`CertificateSigner`]
//! seam the certificate manager talks to. Does not own: deciding whether a caller may have an identity
//! (the gRPC front end authenticates callers), key generation for workloads, or rotation.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::{Error, Identity};

const KEY_FILE: &str = "ca-key.pem";
const CERT_FILE: &str = "ca-cert.pem";
/// Lifetime of a root created by [`Ca::load_or_create`]; Istio's self-signed root uses 10 years too.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start a little in the past so a peer whose clock lags ours still accepts a fresh certificate.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// What the certificate manager needs from a CA; the in-process [`Ca`] implements it now, a gRPC client
/// later. Implementations must sign only the identity given and return `[leaf, intermediates…, root]`.
pub trait CertificateSigner: Send + Sync + 'static {
    fn sign(
        &self,
        csr_der: Vec<u8>,
        identity: Identity,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Vec<CertificateDer<'static>>, Error>>;
}

/// The in-process CA used in local mode (and behind the `weft ca` gRPC server).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_not_after: SystemTime,
    trust_domain: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("root_not_after", &self.root_not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Root key+cert in `dir` (`ca-key.pem`, `ca-cert.pem`, key file mode 0600); created on first run,
    /// reused after. A directory holding only one of the two files is refused rather than overwritten,
    /// because replacing a root silently breaks every peer that trusts the old one.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        Identity::new(trust_domain, "ns", "sa").validate()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::CaIo { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => Self::load(dir, trust_domain),
            (false, false) => Self::create(dir, trust_domain),
            (key, _) => Err(Error::CaCorrupt {
                dir: dir.to_path_buf(),
                reason: format!(
                    "{} exists but {} does not",
                    if key { KEY_FILE } else { CERT_FILE },
                    if key { CERT_FILE } else { KEY_FILE }
                ),
            }),
        }
    }

    fn load(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let corrupt = |reason: String| Error::CaCorrupt { dir: dir.to_path_buf(), reason };
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let read = |p: &Path| fs::read_to_string(p).map_err(|source| Error::CaIo { path: p.to_path_buf(), source });
        let key_pem = read(&key_path)?;
        let cert_pem = read(&cert_path)?;
        if let Ok(meta) = fs::metadata(&key_path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %key_path.display(), mode = format!("{mode:o}"),
                    "CA key file is readable by others; chmod 600 it");
            }
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| corrupt(format!("{KEY_FILE}: {e}")))?;
        let root_pem =
            pem_certificate(&cert_pem).ok_or_else(|| corrupt(format!("{CERT_FILE} holds no PEM certificate")))?;
        let root = CertificateDer::from(root_pem);
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&root).map_err(|e| corrupt(format!("{CERT_FILE}: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(corrupt(format!("{KEY_FILE} is not the key of the certificate in {CERT_FILE}")));
        }
        if !parsed.is_ca() {
            return Err(corrupt(format!("{CERT_FILE} is not a CA certificate")));
        }
        let root_not_after = SystemTime::from(parsed.validity().not_after.to_datetime());
        if root_not_after <= SystemTime::now() {
            return Err(corrupt(format!("the root in {CERT_FILE} has expired")));
        }
        let issuer = Issuer::from_ca_cert_der(&root, key).map_err(|e| corrupt(format!("{CERT_FILE}: {e}")))?;
        tracing::info!(dir = %dir.display(), trust_domain, "loaded CA root");
        Ok(Ca { issuer, root: root.into_owned(), root_not_after, trust_domain: trust_domain.to_owned() })
    }

    fn create(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        // Whole seconds, because that is what the certificate encodes and `sign` clamps against it.
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).map_err(|_| rcgen::Error::Time)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name.push(DnType::CommonName, "weft root CA");
        // No intermediates exist in this design, so the root may only sign leaves.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + ROOT_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;

        // Write both under temporary names and rename key before cert: a crash leaves at most a key
        // without a cert, which load_or_create reports instead of guessing.
        write_atomically(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
        write_atomically(&dir.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), trust_domain, "created new CA root");
        Ok(Ca {
            root: cert.der().clone(),
            root_not_after: SystemTime::from(params.not_after),
            issuer: Issuer::new(params, key),
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// The root certificate peers must trust.
    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs a PKCS#10 CSR (DER) for exactly `identity`: refuses a CSR whose SANs are not exactly the
    /// identity's SPIFFE URI, a bad signature, or garbage. Leaf: URI SAN = SPIFFE ID only,
    /// digitalSignature+keyEncipherment, serverAuth+clientAuth, not CA, valid from a minute ago until
    /// now+`ttl` (clamped to the root's expiry), random serial. Returns `[leaf, root]`.
    pub fn sign(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        identity.validate()?;
        if identity.trust_domain != self.trust_domain {
            return Err(Error::WrongTrustDomain {
                identity: identity.to_string(),
                got: identity.trust_domain.clone(),
                want: self.trust_domain.clone(),
            });
        }
        if ttl.is_zero() {
            return Err(Error::InvalidRequest {
                identity: identity.to_string(),
                reason: "the requested validity is zero".into(),
            });
        }
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into()).map_err(|e| Error::InvalidCsr {
            reason: match e {
                rcgen::Error::CouldNotParseCertificationRequest => "not DER PKCS#10".to_owned(),
                rcgen::Error::InvalidCertificationRequestSignature => "its signature does not verify".to_owned(),
                other => other.to_string(),
            },
        })?;
        let want = identity.to_string();
        let requested: Vec<String> = csr.params.subject_alt_names.iter().map(san_to_string).collect();
        if requested.len() != 1 || !matches!(&csr.params.subject_alt_names[0], SanType::URI(u) if u.as_str() == want) {
            return Err(Error::CsrIdentityMismatch { requested, identity: want });
        }

        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.root_not_after);
        if not_after <= now {
            return Err(Error::InvalidRequest {
                identity: want,
                reason: "the CA root has expired; rotate the root".into(),
            });
        }
        let mut params = CertificateParams::default();
        // X.509-SVID: the subject may be empty; rcgen then marks the SAN extension critical.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = OffsetDateTime::from(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial());
        let leaf = self.issue(&params, &csr.public_key)?;
        tracing::debug!(identity = %want, ?ttl, "signed workload certificate");
        Ok(vec![leaf, self.root()])
    }

    /// Signs `params` for `public_key` with the root, enforcing nothing: `sign` checks the request
    /// first; tests use this directly to forge deliberately malformed certificates from a trusted root.
    pub(super) fn issue(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<CertificateDer<'static>, Error> {
        Ok(params.signed_by(public_key, &self.issuer)?.der().clone())
    }
}

impl CertificateSigner for Ca {
    fn sign(
        &self,
        csr_der: Vec<u8>,
        identity: Identity,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Vec<CertificateDer<'static>>, Error>> {
        // Signing is a single ECDSA operation: doing it inline is cheaper than a blocking-pool hop.
        let result = Ca::sign(self, &csr_der, &identity, ttl);
        Box::pin(std::future::ready(result))
    }
}

fn san_to_string(san: &SanType) -> String {
    match san {
        SanType::URI(u) => format!("URI:{}", u.as_str()),
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::Rfc822Name(e) => format!("email:{}", e.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        // SanType is non-exhaustive; the debug form is enough to say what was asked for.
        other => format!("{other:?}"),
    }
}

/// 128 random bits, positive and without a leading zero byte so the DER encoding is always 16 bytes.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn pem_certificate(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok().map(|c| c.to_vec())
}

/// Writes `data` to `path` via a temporary file created with `mode` and a rename, so a reader never sees
/// half a file and the key is never briefly world-readable.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("pem.tmp");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::CaIo { path: p, source }
    };
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io(&tmp))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::CertificateParams;
    use x509_parser::extensions::GeneralName;

    fn csr_for(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn root_persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(a.root(), b.root());

        // A leaf from the reloaded CA chains to the original root (same key, same subject).
        let id = Identity::new("cluster.local", "default", "web");
        let chain = b.sign(&csr_for(vec![uri(&id.to_string())]), &id, Duration::from_secs(60)).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let root_der = a.root();
        let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(chain[1], a.root());

        let other = tempfile::tempdir().unwrap();
        assert_ne!(Ca::load_or_create(other.path(), "cluster.local").unwrap().root(), a.root());
    }

    #[test]
    fn half_written_or_garbage_ca_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path(), "cluster.local").unwrap();
        fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let err = Ca::load_or_create(dir.path(), "cluster.local").unwrap_err();
        assert!(matches!(err, Error::CaCorrupt { .. }), "{err}");

        fs::write(dir.path().join(CERT_FILE), "not a pem").unwrap();
        let err = Ca::load_or_create(dir.path(), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");

        // A key that does not belong to the certificate.
        let other = tempfile::tempdir().unwrap();
        Ca::load_or_create(other.path(), "cluster.local").unwrap();
        fs::copy(other.path().join(CERT_FILE), dir.path().join(CERT_FILE)).unwrap();
        let err = Ca::load_or_create(dir.path(), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("is not the key"), "{err}");
    }

    #[test]
    fn leaf_has_the_svid_shape() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let ttl = Duration::from_secs(3600);
        let before = SystemTime::now();
        let chain = ca.sign(&csr_for(vec![uri(&id.to_string())]), &id, ttl).unwrap();
        assert_eq!(chain.len(), 2);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let sans = &leaf.subject_alternative_name().unwrap().unwrap().value.general_names;
        assert_eq!(sans.len(), 1);
        assert!(matches!(sans[0], GeneralName::URI(u) if u == "spiffe://cluster.local/ns/ns1/sa/sa1"));
        assert!(!leaf.is_ca());
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let not_after = SystemTime::from(leaf.validity().not_after.to_datetime());
        let d = not_after.duration_since(before).unwrap();
        assert!(d >= ttl - Duration::from_secs(1) && d <= ttl + Duration::from_secs(2), "{d:?}");
        // Serials are random: two leaves differ.
        let again = ca.sign(&csr_for(vec![uri(&id.to_string())]), &id, ttl).unwrap();
        let (_, leaf2) = x509_parser::parse_x509_certificate(&again[0]).unwrap();
        assert_ne!(leaf.raw_serial(), leaf2.raw_serial());
        assert_eq!(leaf.raw_serial().len(), 16);
        // Validity is clamped to the root's.
        let long = ca.sign(&csr_for(vec![uri(&id.to_string())]), &id, ROOT_VALIDITY * 3).unwrap();
        let (_, leaf3) = x509_parser::parse_x509_certificate(&long[0]).unwrap();
        assert_eq!(SystemTime::from(leaf3.validity().not_after.to_datetime()), ca.root_not_after);
    }

    #[test]
    fn refuses_bad_csrs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
        let id = Identity::new("cluster.local", "default", "web");
        let ttl = Duration::from_secs(60);

        let other = csr_for(vec![uri("spiffe://cluster.local/ns/default/sa/admin")]);
        let err = ca.sign(&other, &id, ttl).unwrap_err();
        assert!(matches!(err, Error::CsrIdentityMismatch { .. }), "{err}");
        assert!(err.to_string().contains("sa/admin"), "{err}");

        let extra = csr_for(vec![uri(&id.to_string()), SanType::DnsName("web.default".try_into().unwrap())]);
        assert!(matches!(ca.sign(&extra, &id, ttl).unwrap_err(), Error::CsrIdentityMismatch { .. }));
        let none = csr_for(vec![]);
        assert!(matches!(ca.sign(&none, &id, ttl).unwrap_err(), Error::CsrIdentityMismatch { .. }));

        let err = ca.sign(b"definitely not a CSR", &id, ttl).unwrap_err();
        assert!(matches!(err, Error::InvalidCsr { .. }), "{err}");

        // Flip a byte in the signature (the last bytes of the DER): parses, but does not verify.
        let mut tampered = csr_for(vec![uri(&id.to_string())]);
        let n = tampered.len();
        tampered[n - 3] ^= 0x01;
        let err = ca.sign(&tampered, &id, ttl).unwrap_err();
        assert!(matches!(err, Error::InvalidCsr { .. }), "{err}");

        let foreign = Identity::new("example.org", "default", "web");
        let err = ca.sign(&csr_for(vec![uri(&foreign.to_string())]), &foreign, ttl).unwrap_err();
        assert!(matches!(err, Error::WrongTrustDomain { .. }), "{err}");

        let err = ca.sign(&csr_for(vec![uri(&id.to_string())]), &id, Duration::ZERO).unwrap_err();
        assert!(matches!(err, Error::InvalidRequest { .. }), "{err}");
    }
}
