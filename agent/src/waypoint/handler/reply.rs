//! Envoy's local replies: the status, body text and response flag the waypoint answers with when it
//! does not forward a request (or forwarding failed), so dashboards and scripts written for Istio read
//! them the same way.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::super::Outcome;
use super::super::server::Body;

/// A response the waypoint makes itself (`text/plain` body).
pub fn local_reply(status: http::StatusCode, body: impl Into<Bytes>) -> http::Response<Body> {
    let body: Bytes = body.into();
    let mut b = http::Response::builder().status(status);
    if !body.is_empty() {
        b = b.header(http::header::CONTENT_TYPE, "text/plain");
    }
    b.body(Full::new(body).map_err(|never| match never {}).boxed()).expect("static response parts")
}

/// A local reply and its Envoy response flag.
pub(crate) struct Replied {
    pub response: http::Response<Body>,
    pub flags: &'static str,
}

impl Replied {
    pub fn new(status: u16, body: &'static str, flags: &'static str) -> Self {
        let status = http::StatusCode::from_u16(status).expect("static status");
        Replied { response: local_reply(status, body), flags }
    }
}

pub(crate) fn rbac_denied() -> Replied {
    // Envoy's RBAC filter sets no response flag (the details say rbac_access_denied).
    Replied::new(403, "RBAC: access denied", "-")
}

pub(crate) fn no_route() -> Replied {
    Replied::new(404, "", "NR")
}

pub(crate) fn overflow() -> Replied {
    Replied::new(503, "upstream connect error or disconnect/reset before headers. reset reason: overflow", "UO")
}

pub(crate) fn no_healthy_upstream() -> Replied {
    Replied::new(503, "no healthy upstream", "UH")
}

pub(crate) fn request_timeout() -> Replied {
    Replied::new(504, "upstream request timeout", "UT")
}

/// The reply for an attempt that got no response; `retried` adds `URX` (retries exhausted).
pub(crate) fn failed(outcome: Outcome, retried: bool) -> Replied {
    let (body, flags, flags_rx) = match outcome {
        Outcome::ConnectFailure => (
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            "UF",
            "UF,URX",
        ),
        Outcome::Reset => (
            "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            "UC",
            "UC,URX",
        ),
        Outcome::Timeout => return request_timeout(),
        Outcome::Status(_) => unreachable!("a status is a response, not a failure"),
    };
    Replied::new(503, body, if retried { flags_rx } else { flags })
}

pub(crate) fn fault_abort(status: http::StatusCode) -> Replied {
    Replied { response: local_reply(status, "fault filter abort"), flags: "FI" }
}
