//! The mesh root as `weft ca` keeps it: in a Kubernetes Secret, created on first start, published to a
//! ConfigMap for whoever must trust it, and used to issue the CA server's own TLS certificate.
//!
//! Owns: the Secret format (`ca-cert.pem`, `ca-key.pem`, as Istio's `cacerts`), the first-start race
//! between replicas (the Secret that was created first wins), the root-certificate ConfigMap, and the
//! serving certificate (DNS SANs, rotated at half-life). Does not own: the X.509-SVID rules for workload
//! leaves (`identity::Ca`), or who may have what (`authz`).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::Error;
use crate::identity::Ca;

/// Secret key holding the root certificate (PEM).
pub const SECRET_CERT_KEY: &str = "ca-cert.pem";
/// Secret key holding the root's private key (PEM, PKCS#8).
pub const SECRET_KEY_KEY: &str = "ca-key.pem";
/// ConfigMap key holding the root certificate (Istio's `istio-ca-root-cert` uses the same key).
pub const CONFIGMAP_ROOT_KEY: &str = "root-cert.pem";
const FIELD_MANAGER: &str = "weft-ca";
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// The root CA: the signer of workload certificates plus the PEM it was loaded from (to issue the
/// server's own TLS certificate and to publish).
pub struct CaRoot {
    ca: Arc<Ca>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for CaRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRoot").field("ca", &self.ca).finish_non_exhaustive()
    }
}

impl CaRoot {
    /// A root from its PEM certificate and key, checked by `identity::Ca` (key matches, CA, not expired).
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Self, Error> {
        // identity::Ca loads only from a directory; a private 0700 temp dir, removed on return, bridges
        // the Secret to it without a second copy of the root-loading rules.
        let dir = private_tempdir()?;
        write_private(&dir.path().join(SECRET_KEY_KEY), key_pem.as_bytes())?;
        write_private(&dir.path().join(SECRET_CERT_KEY), cert_pem.as_bytes())?;
        let ca = Ca::load_or_create(dir.path(), trust_domain).map_err(|source| Error::RootUnusable { source })?;
        Ok(Self { ca: Arc::new(ca), cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() })
    }

    /// A new self-signed root (ECDSA P-256, 10 years, as `identity::Ca` creates it).
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        let dir = private_tempdir()?;
        let ca = Ca::load_or_create(dir.path(), trust_domain).map_err(|source| Error::RootUnusable { source })?;
        let read = |name: &str| {
            let path = dir.path().join(name);
            std::fs::read_to_string(&path).map_err(|source| Error::TempIo { path, source })
        };
        Ok(Self { cert_pem: read(SECRET_CERT_KEY)?, key_pem: read(SECRET_KEY_KEY)?, ca: Arc::new(ca) })
    }

    pub fn ca(&self) -> &Arc<Ca> {
        &self.ca
    }

    /// The root certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues the CA server's TLS certificate for `dns_names`, valid for `ttl` (clamped to the root's
    /// life): `[leaf, root]` and its new key.
    pub(super) fn issue_serving_cert(&self, dns_names: &[String], ttl: Duration) -> Result<Arc<CertifiedKey>, Error> {
        let serving = |e: String| Error::ServingCert(e);
        let root_key = KeyPair::from_pem(&self.key_pem).map_err(|e| serving(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, root_key).map_err(|e| serving(e.to_string()))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| serving(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, dns_names.first().cloned().unwrap_or_default());
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| n.clone().try_into().map(SanType::DnsName).map_err(|e| serving(format!("DNS name {n:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let root_der = CertificateDer::from(
            pem::parse(&self.cert_pem).map_err(|e| serving(format!("root PEM: {e}")))?.into_contents(),
        );
        let root_not_after = x509_parser::parse_x509_certificate(&root_der)
            .map(|(_, c)| SystemTime::from(c.validity().not_after.to_datetime()))
            .map_err(|e| serving(format!("root certificate: {e}")))?;
        params.not_before = OffsetDateTime::from(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = OffsetDateTime::from((now + ttl).min(root_not_after));
        let cert = params.signed_by(&key, &issuer).map_err(|e| serving(e.to_string()))?;
        let provider = rustls::crypto::ring::default_provider();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = provider.key_provider.load_private_key(key_der).map_err(|e| serving(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone(), root_der], signing_key)))
    }
}

/// Loads the root from Secret `namespace/name`, or creates a new root and that Secret when it does not
/// exist. If another replica creates the Secret first, its root is used.
pub async fn load_or_create_in_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<CaRoot, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let kube_err = |action: &'static str| {
        let what = format!("Secret {namespace}/{name}");
        move |source: kube::Error| Error::Kube { action, what, source }
    };
    if let Some(secret) = secrets.get_opt(name).await.map_err(kube_err("read"))? {
        return root_from_secret(&secret, namespace, name, trust_domain);
    }
    let root = CaRoot::generate(trust_domain)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), FIELD_MANAGER.to_owned())])),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (SECRET_CERT_KEY.to_owned(), ByteString(root.cert_pem.clone().into_bytes())),
            (SECRET_KEY_KEY.to_owned(), ByteString(root.key_pem.clone().into_bytes())),
        ])),
        ..Default::default()
    };
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() };
    match secrets.create(&pp, &secret).await {
        Ok(_) => {
            tracing::info!(namespace, name, trust_domain, "created a new mesh root CA and stored it in a Secret");
            Ok(root)
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            tracing::info!(namespace, name, "another replica created the root Secret first; using it");
            let secret = secrets.get(name).await.map_err(kube_err("read"))?;
            root_from_secret(&secret, namespace, name, trust_domain)
        }
        Err(e) => Err(kube_err("create")(e)),
    }
}

fn root_from_secret(secret: &Secret, namespace: &str, name: &str, trust_domain: &str) -> Result<CaRoot, Error> {
    let field = |key: &str| -> Result<String, Error> {
        let bad =
            |reason: String| Error::BadRootSecret { namespace: namespace.to_owned(), name: name.to_owned(), reason };
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| secret.string_data.as_ref().and_then(|d| d.get(key)).map(|s| s.clone().into_bytes()))
            .ok_or_else(|| bad(format!("it has no key {key:?}")))?;
        String::from_utf8(bytes).map_err(|_| bad(format!("{key:?} is not PEM text")))
    };
    let root = CaRoot::from_pem(&field(SECRET_CERT_KEY)?, &field(SECRET_KEY_KEY)?, trust_domain).map_err(|e| {
        Error::BadRootSecret { namespace: namespace.to_owned(), name: name.to_owned(), reason: e.to_string() }
    })?;
    tracing::info!(namespace, name, trust_domain, "loaded the mesh root CA from its Secret");
    Ok(root)
}

/// Publishes the root certificate (never the key) in ConfigMap `namespace/name`, key `root-cert.pem`, with
/// server-side apply, so node agents can trust the CA without reading the Secret.
pub async fn publish_root(client: &Client, namespace: &str, name: &str, root: &CaRoot) -> Result<(), Error> {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), FIELD_MANAGER.to_owned())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CONFIGMAP_ROOT_KEY.to_owned(), root.cert_pem.clone())])),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&cm).map_err(|e| Error::ServingCert(e.to_string()))?;
    // Server-side apply needs apiVersion and kind in the body.
    value["apiVersion"] = "v1".into();
    value["kind"] = "ConfigMap".into();
    configmaps
        .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&value))
        .await
        .map_err(|source| Error::Kube { action: "apply", what: format!("ConfigMap {namespace}/{name}"), source })?;
    tracing::info!(namespace, name, "published the mesh root certificate");
    Ok(())
}

/// The CA server's TLS certificate, swapped in place when it is reissued.
#[derive(Debug)]
pub(super) struct ServingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ServingCert {
    pub(super) fn new(initial: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self { current: ArcSwap::new(initial) })
    }

    pub(super) fn store(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn private_tempdir() -> Result<tempfile::TempDir, Error> {
    // tempfile creates directories with mode 0700.
    tempfile::Builder::new()
        .prefix("weft-ca-")
        .tempdir()
        .map_err(|source| Error::TempIo { path: std::env::temp_dir(), source })
}

fn write_private(path: &std::path::Path, data: &[u8]) -> Result<(), Error> {
    let io = |source| Error::TempIo { path: path.to_path_buf(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    f.write_all(data).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_root_round_trips_through_pem() {
        let root = CaRoot::generate("cluster.local").unwrap();
        assert!(root.cert_pem().contains("BEGIN CERTIFICATE"));
        let again = CaRoot::from_pem(&root.cert_pem, &root.key_pem, "cluster.local").unwrap();
        assert_eq!(again.ca().root(), root.ca().root());

        let other = CaRoot::generate("cluster.local").unwrap();
        let err = CaRoot::from_pem(&root.cert_pem, &other.key_pem, "cluster.local").unwrap_err();
        assert!(err.to_string().contains("is not the key"), "{err}");
        let err = CaRoot::from_pem("garbage", &root.key_pem, "cluster.local").unwrap_err();
        assert!(matches!(err, Error::RootUnusable { .. }), "{err}");
    }

    #[test]
    fn serving_cert_names_and_chain() {
        let root = CaRoot::generate("cluster.local").unwrap();
        let names = vec!["weft-ca.weft-system.svc".to_owned(), "istiod.istio-system.svc".to_owned()];
        let key = root.issue_serving_cert(&names, Duration::from_secs(3600)).unwrap();
        assert_eq!(key.cert.len(), 2);
        assert_eq!(key.cert[1], root.ca().root());
        let (_, leaf) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(sans, names);
        assert!(!leaf.is_ca());
        assert!(leaf.extended_key_usage().unwrap().unwrap().value.server_auth);
        let root_der = root.ca().root();
        let (_, parsed_root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
        leaf.verify_signature(Some(parsed_root.public_key())).unwrap();
    }
}
