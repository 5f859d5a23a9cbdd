//! weft's gRPC APIs, generated from `protos/` by `cargo xtask codegen` and checked in so that a build
//! needs no protoc (CI runs `cargo xtask codegen --check`).
//!
//! Owns: the wire types and the tonic client/server stubs. Does not own: any behaviour (the CA server
//! is `weft::ca_server`, its client `weft::identity::grpc`).

/// Istio's certificate API, package `istio.v1.auth` (the gRPC path is
/// `/istio.v1.auth.IstioCertificateService/CreateCertificate`).
pub mod istio_ca {
    include!("generated/istio.v1.auth.rs");
}

pub use istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
pub use istio_ca::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
pub use istio_ca::{IstioCertificateRequest, IstioCertificateResponse};

/// The metadata key a node agent uses to ask for a workload's identity instead of its own (what
/// ztunnel sends in `IstioCertificateRequest.metadata`).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost::Message;

    use super::*;

    /// The field numbers and types are the wire contract with Istio's clients: csr = 1 (string),
    /// validity_duration = 3 (int64), metadata = 4 (google.protobuf.Struct), cert_chain = 1 (repeated string).
    #[test]
    fn wire_format_matches_istio() {
        let req = IstioCertificateRequest {
            csr: "C".into(),
            validity_duration: 5,
            metadata: Some(prost_types::Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_owned(),
                    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("x".into())) },
                )]),
            }),
        };
        let bytes = req.encode_to_vec();
        // tag 1 length-delimited "C", tag 3 varint 5, tag 4 length-delimited Struct.
        assert_eq!(&bytes[..5], &[0x0a, 0x01, b'C', 0x18, 0x05]);
        assert_eq!(bytes[5], 0x22);
        assert_eq!(IstioCertificateRequest::decode(bytes.as_slice()).unwrap(), req);

        let resp = IstioCertificateResponse { cert_chain: vec!["a".into(), "b".into()] };
        assert_eq!(resp.encode_to_vec(), vec![0x0a, 0x01, b'a', 0x0a, 0x01, b'b']);
    }

    #[test]
    fn grpc_path_matches_istio() {
        let path = istio_ca::istio_certificate_service_server::SERVICE_NAME;
        assert_eq!(path, "istio.v1.auth.IstioCertificateService");
    }
}
