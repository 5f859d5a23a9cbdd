//! `IstioCertificateService/CreateCertificate`: turns one gRPC request into a decision and a signature.
//!
//! Owns: reading the request (bearer token, `ImpersonatedIdentity`, PEM CSR, validity), clamping the
//! validity, mapping every refusal to a gRPC status whose message names the problem, and the response
//! (PEM chain, leaf first, root last). Does not own: the authorization rules (`authz`) or the X.509-SVID
//! rules (`identity::Ca::sign`).

use std::sync::Arc;
use std::time::Duration;

use prost_types::value::Kind;
use tonic::{Request, Response, Status};
use weft_proto::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateResponse, IstioCertificateService};

use super::authz::{Authorizer, Denied};
use crate::identity::{self, Ca};

/// A PKCS#10 request for one P-256 or RSA key is well under 8 KiB; anything much larger is not a CSR.
const MAX_CSR_PEM_BYTES: usize = 64 * 1024;
const PEM_CSR_TAGS: [&str; 2] = ["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"];

/// Lifetimes handed out.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Used when the request asks for none (`validity_duration` 0).
    pub default: Duration,
    /// Longer requests are shortened to this.
    pub max: Duration,
}

impl Validity {
    fn clamp(&self, requested_secs: i64) -> Result<Duration, Status> {
        match requested_secs {
            0 => Ok(self.default.min(self.max)),
            s if s < 0 => Err(Status::invalid_argument(format!(
                "validity_duration {s} is negative; send the wanted lifetime in seconds, or 0 for the CA's default"
            ))),
            s => Ok(Duration::from_secs(s as u64).min(self.max)),
        }
    }
}

pub struct CaService {
    ca: Arc<Ca>,
    authorizer: Authorizer,
    validity: Validity,
}

impl CaService {
    pub fn new(ca: Arc<Ca>, authorizer: Authorizer, validity: Validity) -> Self {
        Self { ca, authorizer, validity }
    }

    async fn create(&self, request: Request<IstioCertificateRequest>) -> Result<IstioCertificateResponse, Status> {
        let token = bearer_token(request.metadata())?;
        let body = request.into_inner();
        let impersonated = impersonated_identity(body.metadata.as_ref())?;
        let grant = self.authorizer.authorize(token.as_deref(), impersonated.as_deref()).await.map_err(denied)?;

        let ttl = self.validity.clamp(body.validity_duration)?;
        let csr_der = csr_der(&body.csr)?;
        let chain = self.ca.sign(&csr_der, &grant.identity, ttl).map_err(|e| sign_failed(&grant.identity, e))?;
        tracing::info!(identity = %grant.identity, caller = %grant.caller, node = grant.node.as_deref().unwrap_or(""),
            ttl_secs = ttl.as_secs(), "signed workload certificate");
        Ok(IstioCertificateResponse {
            cert_chain: chain.iter().map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec()))).collect(),
        })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        match self.create(request).await {
            Ok(response) => Ok(Response::new(response)),
            Err(status) => {
                tracing::warn!(?peer, code = ?status.code(), reason = status.message(), "refused certificate request");
                Err(status)
            }
        }
    }
}

/// `authorization: Bearer <token>`; `None` when absent (the authorizer says what to send).
fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<Option<String>, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization metadata is not ASCII; send `Bearer <token>`"))?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Status::unauthenticated(format!(
            "the authorization metadata uses scheme {scheme:?}; send `Bearer <projected ServiceAccount token>`"
        )));
    }
    Ok(Some(token.trim().to_owned()))
}

fn impersonated_identity(metadata: Option<&prost_types::Struct>) -> Result<Option<String>, Status> {
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) => Ok(Some(s.clone())),
        Some(Kind::NullValue(_)) | None => Ok(None),
        Some(_) => Err(Status::invalid_argument(format!(
            "metadata {IMPERSONATED_IDENTITY} must be a string SPIFFE ID (spiffe://TRUST_DOMAIN/ns/NS/sa/SA)"
        ))),
    }
}

fn csr_der(csr_pem: &str) -> Result<Vec<u8>, Status> {
    if csr_pem.trim().is_empty() {
        return Err(Status::invalid_argument("csr is empty; send a PEM-encoded PKCS#10 CERTIFICATE REQUEST"));
    }
    if csr_pem.len() > MAX_CSR_PEM_BYTES {
        return Err(Status::invalid_argument(format!(
            "csr is {} bytes, more than the {MAX_CSR_PEM_BYTES} a certificate request can need",
            csr_pem.len()
        )));
    }
    let parsed = pem::parse(csr_pem).map_err(|e| {
        Status::invalid_argument(format!("csr is not PEM ({e}); send a PEM-encoded PKCS#10 CERTIFICATE REQUEST"))
    })?;
    if !PEM_CSR_TAGS.contains(&parsed.tag()) {
        return Err(Status::invalid_argument(format!("csr is a PEM {:?}, not a CERTIFICATE REQUEST", parsed.tag())));
    }
    Ok(parsed.into_contents())
}

fn denied(d: Denied) -> Status {
    let msg = d.to_string();
    match d {
        Denied::MissingToken { .. } | Denied::TokenRejected { .. } | Denied::WrongAudience { .. } => {
            Status::unauthenticated(msg)
        }
        Denied::NotServiceAccount { .. } | Denied::NotNodeAgent { .. } | Denied::NodeUnknown { .. } => {
            Status::permission_denied(msg)
        }
        Denied::NotOnNode { .. } => Status::permission_denied(msg),
        Denied::BadImpersonatedIdentity { .. } | Denied::WrongTrustDomain { .. } => Status::invalid_argument(msg),
        Denied::Lookup(_) => Status::unavailable(msg),
    }
}

fn sign_failed(identity: &identity::Identity, e: identity::Error) -> Status {
    use identity::Error as E;
    let msg = e.to_string();
    match e {
        E::InvalidCsr { .. }
        | E::CsrIdentityMismatch { .. }
        | E::InvalidSpiffeId { .. }
        | E::WrongTrustDomain { .. } => Status::invalid_argument(msg),
        E::InvalidRequest { .. } => Status::failed_precondition(msg),
        other => {
            tracing::error!(%identity, error = %other, "signing failed");
            Status::internal(format!("the CA failed to sign for {identity}: {other}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_is_clamped() {
        let v = Validity { default: Duration::from_secs(86_400), max: Duration::from_secs(7 * 86_400) };
        assert_eq!(v.clamp(0).unwrap(), Duration::from_secs(86_400));
        assert_eq!(v.clamp(3600).unwrap(), Duration::from_secs(3600));
        assert_eq!(v.clamp(30 * 86_400).unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(v.clamp(-1).unwrap_err().code(), tonic::Code::InvalidArgument);
        let small = Validity { default: Duration::from_secs(86_400), max: Duration::from_secs(3600) };
        assert_eq!(small.clamp(0).unwrap(), Duration::from_secs(3600));
    }

    #[test]
    fn bearer_tokens() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer_token(&md).unwrap(), None);
        md.insert("authorization", "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer_token(&md).unwrap().as_deref(), Some("abc.def"));
        md.insert("authorization", "bearer  xyz ".parse().unwrap());
        assert_eq!(bearer_token(&md).unwrap().as_deref(), Some("xyz"));
        md.insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
        let err = bearer_token(&md).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("Basic"), "{}", err.message());
    }

    #[test]
    fn impersonation_metadata() {
        use std::collections::BTreeMap;
        let s = |kind| prost_types::Struct {
            fields: BTreeMap::from([(IMPERSONATED_IDENTITY.to_owned(), prost_types::Value { kind: Some(kind) })]),
        };
        assert_eq!(impersonated_identity(None).unwrap(), None);
        assert_eq!(impersonated_identity(Some(&prost_types::Struct::default())).unwrap(), None);
        assert_eq!(
            impersonated_identity(Some(&s(Kind::StringValue("spiffe://x".into())))).unwrap().unwrap(),
            "spiffe://x"
        );
        assert_eq!(
            impersonated_identity(Some(&s(Kind::NumberValue(1.0)))).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn csr_pem_parsing() {
        assert_eq!(csr_der("").unwrap_err().code(), tonic::Code::InvalidArgument);
        let err = csr_der("hello").unwrap_err();
        assert!(err.message().contains("not PEM"), "{}", err.message());
        let cert = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]));
        assert!(csr_der(&cert).unwrap_err().message().contains("not a CERTIFICATE REQUEST"));
        let csr = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", vec![1, 2, 3]));
        assert_eq!(csr_der(&csr).unwrap(), vec![1, 2, 3]);
        assert_eq!(csr_der(&"A".repeat(MAX_CSR_PEM_BYTES + 1)).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
