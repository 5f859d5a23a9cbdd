//! `weft waypoint`: the per-namespace L7 proxy. It receives HBONE from node agents for the services
//! that name it (`istio.io/use-waypoint`), serves HTTP/1.1, HTTP/2 and gRPC inside each tunnel, applies
//! VirtualService / HTTPRoute routing, DestinationRule traffic policy, L7 AuthorizationPolicy and local
//! rate limits, and carries each request over HBONE (with the waypoint's own identity) to the chosen
//! endpoint's node agent.
//!
//! Submodules, bottom to top: `route` (compiled routing table and request matching), `cluster` (endpoint
//! choice per destination and subset: load balancing, connection-pool limits, outlier detection),
//! `ratelimit` (local token buckets), `telemetry` (request metrics, access log, trace context),
//! `upstream` (HTTP over HBONE or plaintext to an endpoint), `handler` (one request through all of
//! them), `server` (the HBONE listener and the HTTP servers inside its tunnels).
//! L7 AuthorizationPolicy semantics live in `policy::l7`, beside the L4 ones.

pub mod cluster;
pub mod handler;
pub mod ratelimit;
pub mod route;
pub mod server;
pub mod telemetry;
pub mod upstream;

use std::fmt;

/// The waypoint this process is: its Gateway's namespace and name (also its Service's).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WaypointId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WaypointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A configuration object (or part of one) the waypoint cannot use. The object is left out (or only
/// the named part of it), the rest of the configuration is served, and the error is logged (and, in
/// cluster mode, reported on the object).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {field}: {reason}")]
pub struct ConfigError {
    /// `VirtualService`, `DestinationRule`, `HTTPRoute`, `Gateway`, `AuthorizationPolicy`, `EnvoyFilter`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// Path of the offending field, e.g. `spec.http[1].match[0].headers.user-agent.regex`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub reason: String,
}

/// How one attempt at an upstream request ended: what retry policies (`route`) and outlier
/// detection (`cluster`) decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered (any status, including 5xx).
    Status(http::StatusCode),
    /// No connection (refused, unreachable, TLS or HBONE CONNECT failure): Envoy's `UF`.
    ConnectFailure,
    /// The connection or stream was reset after it was established: Envoy's `UR`.
    Reset,
    /// The endpoint did not answer within the (per-try) timeout: Envoy's `UT`.
    Timeout,
}
