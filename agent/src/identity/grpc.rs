//! The node agent's CA client: a [`CertificateSigner`] that asks `weft ca` (or any Istio-compatible CA)
//! over gRPC, the way ztunnel does.
//!
//! Owns: the TLS channel to the CA (trusting only the mesh roots), the caller's credentials (the
//! projected ServiceAccount token, re-read from its file on every call because the kubelet rotates it),
//! the `ImpersonatedIdentity` request metadata, and turning the PEM chain back into DER. Does not own:
//! keys and CSRs (`manager` makes them), checking the returned certificate (`manager` does, against the
//! same roots), or what the CA allows.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use prost_types::value::Kind;
use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use weft_proto::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateServiceClient};

use super::{CertificateSigner, Error, Identity};

/// Where `weft ca` listens inside the cluster.
pub const DEFAULT_CA_ADDRESS: &str = "https://weft-ca.weft-system.svc:15012";
/// The projected token the DaemonSet mounts (audience `istio-ca`), as ztunnel's is mounted.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";
/// Upper bound for one CreateCertificate call, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach and authenticate to the CA.
#[derive(Debug, Clone)]
pub struct GrpcSignerConfig {
    /// `https://HOST:PORT`.
    pub address: String,
    /// The name the CA's certificate must carry; `None`: the host of `address`. Set it when dialling an
    /// IP (tests) or a name the certificate does not list.
    pub server_name: Option<String>,
    /// Trust anchors for the CA's TLS certificate: the mesh roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// File holding the ServiceAccount token sent as `authorization: Bearer …`.
    pub token_path: PathBuf,
    pub timeout: Duration,
}

/// Signs through `IstioCertificateService/CreateCertificate`.
#[derive(Debug, Clone)]
pub struct GrpcSigner {
    client: IstioCertificateServiceClient<Channel>,
    token_path: PathBuf,
    address: String,
}

impl GrpcSigner {
    /// Builds a lazily connecting client (no I/O here; the first `sign` connects, and a broken
    /// connection is re-established on the next call). Call it inside a Tokio runtime.
    pub fn new(config: GrpcSignerConfig) -> Result<Self, Error> {
        let bad = |reason: String| Error::SignerFailed { identity: "(any)".into(), reason };
        if config.roots.is_empty() {
            return Err(bad("no trust roots for the CA's TLS certificate; pass the mesh root".into()));
        }
        let roots =
            config.roots.iter().map(|r| Certificate::from_pem(pem::encode(&pem::Pem::new("CERTIFICATE", r.to_vec()))));
        let mut tls = ClientTlsConfig::new().ca_certificates(roots);
        if let Some(name) = &config.server_name {
            tls = tls.domain_name(name.clone());
        }
        let endpoint = Endpoint::from_shared(config.address.clone())
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| bad(format!("CA address {:?}: {e}; expected https://HOST:PORT", config.address)))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout);
        Ok(Self {
            client: IstioCertificateServiceClient::new(endpoint.connect_lazy()),
            token_path: config.token_path,
            address: config.address,
        })
    }

    async fn request(
        mut client: IstioCertificateServiceClient<Channel>,
        token_path: PathBuf,
        address: String,
        csr_der: Vec<u8>,
        identity: Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        let failed = |reason: String| Error::SignerFailed { identity: identity.to_string(), reason };
        let token = tokio::fs::read_to_string(&token_path).await.map_err(|e| {
            failed(format!(
                "cannot read the ServiceAccount token at {}: {e}; mount a projected token with audience istio-ca there",
                token_path.display()
            ))
        })?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr_der)),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(prost_types::Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_owned(),
                    prost_types::Value { kind: Some(Kind::StringValue(identity.to_string())) },
                )]),
            }),
        });
        let bearer = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| failed(format!("the token in {} is not a valid header value", token_path.display())))?;
        request.metadata_mut().insert("authorization", bearer);

        let response = client
            .create_certificate(request)
            .await
            .map_err(|status| failed(format!("CA at {address} answered {:?}: {}", status.code(), status.message())))?;
        let mut chain = Vec::new();
        for (i, entry) in response.into_inner().cert_chain.iter().enumerate() {
            // Istio sends one certificate per entry, but a bundle in one entry is accepted too.
            let pems = pem::parse_many(entry).map_err(|e| failed(format!("cert_chain[{i}] is not PEM: {e}")))?;
            chain.extend(
                pems.into_iter().filter(|p| p.tag() == "CERTIFICATE").map(|p| CertificateDer::from(p.into_contents())),
            );
        }
        if chain.is_empty() {
            return Err(failed(format!("CA at {address} returned no certificate")));
        }
        Ok(chain)
    }
}

impl CertificateSigner for GrpcSigner {
    fn sign(
        &self,
        csr_der: Vec<u8>,
        identity: Identity,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Vec<CertificateDer<'static>>, Error>> {
        Box::pin(Self::request(
            self.client.clone(),
            self.token_path.clone(),
            self.address.clone(),
            csr_der,
            identity,
            ttl,
        ))
    }
}
