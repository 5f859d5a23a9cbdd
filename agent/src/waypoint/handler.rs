//! One request through the waypoint's filter chain, in Envoy/Istio order.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::server::Body;

/// A response the waypoint makes itself (`text/plain` body).
pub fn local_reply(status: http::StatusCode, body: impl Into<Bytes>) -> http::Response<Body> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(body.into()).map_err(|never| match never {}).boxed())
        .expect("static response parts")
}
