//! Workload identity: SPIFFE IDs, the local CA, workload certificates and the SPIFFE mTLS configs HBONE
//! uses on both ends.
//!
//! Owns: the [`Identity`] type and its two textual forms (SPIFFE ID and Istio `principal`), the in-process
//! CA ([`ca`]), per-identity keys and certificates with rotation ([`manager`]), and the rustls verifiers
//! that turn "chains to our roots and carries exactly one SPIFFE URI SAN" into a peer [`Identity`].
//! Does not own: which identities a node needs (the proxy asks as pods appear), the gRPC CA server and
//! its caller authentication (`weft ca`), authorization decisions (`policy`), or sockets.

pub mod ca;
pub mod grpc;
pub mod manager;
mod verify;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use ca::{Ca, CertificateSigner};
pub use manager::{CertInfo, CertManager, WorkloadCert};
pub use verify::{peer_identity, server_name};

/// The trust domain used when nothing else is configured (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SPIFFE_SCHEME: &str = "spiffe://";

/// A SPIFFE identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self { trust_domain: trust_domain.into(), namespace: namespace.into(), service_account: service_account.into() }
    }

    /// Istio's `principal` form, as written in AuthorizationPolicy `source.principals`:
    /// `cluster.local/ns/NS/sa/SA` (the SPIFFE ID without its scheme).
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }

    /// Whether every part is well formed, so that `to_string()` parses back to `self`.
    /// `new` does not check, because callers build identities from already-validated Kubernetes names.
    pub fn validate(&self) -> Result<(), Error> {
        self.to_string().parse::<Identity>().map(|_| ())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SPIFFE_SCHEME}{}", self.principal())
    }
}

impl FromStr for Identity {
    type Err = Error;

    /// Parses exactly `spiffe://TD/ns/NS/sa/SA`. The trust domain follows the SPIFFE spec (lowercase
    /// letters, digits, `.`, `-`, `_`); namespace and service account are single path segments of
    /// letters, digits, `.`, `-`, `_` (a superset of Kubernetes names), never `.` or `..`.
    fn from_str(input: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::InvalidSpiffeId { input: input.to_owned(), reason: reason.to_owned() };
        let rest = input.strip_prefix(SPIFFE_SCHEME).ok_or_else(|| bad("it must start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, ns_kw, ns, sa_kw, sa] = parts.as_slice() else {
            return Err(bad("expected exactly spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT"));
        };
        if *ns_kw != "ns" || *sa_kw != "sa" {
            return Err(bad("expected exactly spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT"));
        }
        if td.is_empty()
            || !td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(bad("the trust domain must be non-empty lowercase letters, digits, '.', '-' or '_'"));
        }
        for (what, seg) in [("namespace", ns), ("service account", sa)] {
            let ok = !seg.is_empty()
                && *seg != "."
                && *seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !ok {
                return Err(bad(&format!(
                    "the {what} must be non-empty letters, digits, '.', '-' or '_' (and not '.' or '..')"
                )));
            }
        }
        Ok(Identity::new(*td, *ns, *sa))
    }
}

/// Everything that can go wrong with identities, the CA, certificates and peer verification.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{input:?} is not a workload SPIFFE ID: {reason}")]
    InvalidSpiffeId { input: String, reason: String },

    #[error("CA file {path}: {source}; check that the state directory exists and is writable by the agent")]
    CaIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "CA files in {dir} are unusable: {reason}; restore ca-key.pem and ca-cert.pem from a backup, or remove \
         both to create a new root (every workload certificate will then be re-issued and peers must get the new root)"
    )]
    CaCorrupt { dir: PathBuf, reason: String },

    #[error(
        "refusing to sign: the CSR is not a valid PKCS#10 request ({reason}); send a DER CSR signed by its own key"
    )]
    InvalidCsr { reason: String },

    #[error(
        "refusing to sign: the CSR asks for {requested:?} but the caller is {identity}; the CSR must carry exactly one URI SAN equal to the caller's SPIFFE ID"
    )]
    CsrIdentityMismatch { requested: Vec<String>, identity: String },

    #[error(
        "identity {identity} is in trust domain {got:?} but this mesh uses {want:?}; fix the trust domain in the config or the request"
    )]
    WrongTrustDomain { identity: String, got: String, want: String },

    #[error("refusing to sign for {identity}: {reason}")]
    InvalidRequest { identity: String, reason: String },

    #[error("certificate operation failed: {0}")]
    Certificate(#[from] rcgen::Error),

    #[error(
        "the CA returned an unusable certificate chain for {identity}: {reason}; check the CA's root and configuration"
    )]
    BadIssuedChain { identity: String, reason: String },

    #[error(
        "the CA could not sign for {identity}: {reason}; check that the CA is reachable and allows this node to request this identity"
    )]
    SignerFailed { identity: String, reason: String },

    #[error("the peer presented no certificate; HBONE requires mutual TLS with a workload certificate")]
    NoPeerCertificate,

    #[error("the peer certificate carries no usable SPIFFE identity: {reason}")]
    BadPeerIdentity { reason: String },

    #[error("the peer is {got} but only {expected} is acceptable for this destination")]
    UnexpectedPeer { got: String, expected: String },

    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let id = Identity::new("cluster.local", "default", "bookinfo-productpage");
        let s = id.to_string();
        assert_eq!(s, "spiffe://cluster.local/ns/default/sa/bookinfo-productpage");
        assert_eq!(s.parse::<Identity>().unwrap(), id);
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/bookinfo-productpage");
        id.validate().unwrap();

        let other = Identity::new("example.org", "kube-system", "a.b_c");
        assert_eq!(other.to_string().parse::<Identity>().unwrap(), other);
    }

    #[test]
    fn rejects_malformed_ids() {
        let bad = [
            "",
            "cluster.local/ns/a/sa/b",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/namespace/a/sa/b",
            "spiffe://cluster.local/ns/a/serviceaccount/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local:8080/ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#frag",
        ];
        for input in bad {
            let err = input.parse::<Identity>().expect_err(input);
            let msg = err.to_string();
            assert!(matches!(err, Error::InvalidSpiffeId { .. }), "{input}: {msg}");
            assert!(msg.contains("not a workload SPIFFE ID"), "{input}: {msg}");
        }
        assert!(Identity::new("cluster.local", "a/b", "c").validate().is_err());
    }
}
