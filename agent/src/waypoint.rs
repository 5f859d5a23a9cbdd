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
    /// The connection closed or the stream was reset after it was established. Reported as Envoy's
    /// `UC` (upstream connection termination); Envoy's `UR` (the endpoint reset the stream) is not told
    /// apart, as both mean the request got no response on a working connection.
    Reset,
    /// The endpoint did not answer within the (per-try) timeout: Envoy's `UT`.
    Timeout,
}

// ---- Below: the running waypoint (H5). The shared types above are the lead's. ----

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::drain::Drain;

/// How a waypoint is assembled: who it is and what it reads.
pub struct Options {
    pub me: WaypointId,
    /// Its SPIFFE identity (`spiffe://TD/ns/NS/sa/SA`): HBONE server certificate and upstream client one.
    pub identity: crate::identity::Identity,
    /// Istio's root namespace (mesh-wide AuthorizationPolicies).
    pub root_namespace: String,
    pub certs: Arc<crate::identity::CertManager>,
    pub state: Arc<crate::state::StateStore>,
}

/// A running waypoint: the compiled configuration, the handler chain and what its listeners share.
/// Start its listeners with [`Waypoint::serve_hbone`] / [`Waypoint::serve_http`] and keep it current
/// with [`Waypoint::watch`].
pub struct Waypoint {
    chain: Arc<handler::Chain>,
    listeners: Arc<server::Listeners>,
    /// TCP families (L4 passthrough, reporter=waypoint) and, in its registry, the request metrics.
    metrics: Arc<crate::metrics::Metrics>,
    root_namespace: String,
    /// Errors already logged (each configuration problem is logged once, not at every rebuild).
    logged: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Set by the caller once the configuration source has synced (`/healthz/ready`).
    pub ready: std::sync::atomic::AtomicBool,
}

impl Waypoint {
    /// Compiles the current state and returns the waypoint, ready to serve.
    pub fn new(opts: Options) -> Arc<Self> {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let chain = Arc::new(handler::Chain {
            me: opts.me.clone(),
            state: opts.state.clone(),
            compiled: arc_swap::ArcSwap::from_pointee(handler::Compiled::default()),
            clusters: cluster::Clusters::new(),
            rate_limits: ratelimit::RateLimits::with_root_namespace(&opts.root_namespace),
            metrics: telemetry::RequestMetrics::new(metrics.registry()),
            tcp_metrics: metrics.clone(),
            upstream: Arc::new(upstream::Upstream::new(opts.certs.clone(), opts.identity.clone())),
        });
        let listeners = Arc::new(server::Listeners {
            me: opts.me,
            identity: opts.identity,
            certs: opts.certs,
            state: opts.state,
            handler: chain.clone(),
        });
        let wp = Arc::new(Waypoint {
            chain,
            listeners,
            metrics,
            root_namespace: opts.root_namespace,
            logged: Default::default(),
            ready: false.into(),
        });
        wp.rebuild();
        wp
    }

    pub fn id(&self) -> &WaypointId {
        &self.chain.me
    }

    /// The Prometheus registry request and TCP metrics are in.
    pub fn registry(&self) -> &prometheus::Registry {
        self.metrics.registry()
    }

    /// Recompiles routes, clusters, L7 policies and rate limits from the current state. Objects that
    /// cannot be used are left out (the rest is served) and logged once.
    pub fn rebuild(&self) {
        let state = self.chain.state.load();
        let me = &self.chain.me;
        let (routes, mut errors) = route::RouteTable::build(&state, me);
        errors.extend(self.chain.clusters.update(&state, me));
        errors.extend(self.chain.rate_limits.update(&state, me));
        let (authz, policy_errors) = crate::policy::l7::L7Policies::compile(
            &state.routing.authorization_policies,
            &me.namespace,
            &me.name,
            &self.root_namespace,
        );
        // Errors are the same objects' as above, already reported.
        let (tcp_authz, _) = crate::policy::l7::L7Policies::compile(
            &handler::l4_policies(&state.routing.authorization_policies),
            &me.namespace,
            &me.name,
            &self.root_namespace,
        );
        self.chain.compiled.store(Arc::new(handler::Compiled { routes, authz, tcp_authz }));
        let now: std::collections::HashSet<String> = errors
            .iter()
            .map(ToString::to_string)
            .chain(policy_errors.iter().map(|e| format!("AuthorizationPolicy: {e}")))
            .collect();
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        for e in now.difference(&logged) {
            tracing::warn!(waypoint = %me, error = %e, "configuration left out; the rest is served");
        }
        for e in logged.difference(&now) {
            tracing::info!(waypoint = %me, error = %e, "configuration problem resolved");
        }
        *logged = now;
    }

    /// Rebuilds on every state change until `drain` is signaled.
    pub async fn watch(self: Arc<Self>, drain: Drain) {
        let mut changes = self.chain.state.subscribe();
        loop {
            tokio::select! {
                _ = drain.signaled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            self.rebuild();
        }
    }

    /// The HBONE server (15008) on `listener`, until `drain` is signaled.
    pub async fn serve_hbone(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        server::serve_hbone(listener, self.listeners.clone(), drain).await
    }

    /// The plaintext front door (`--http-listen`) on `listener`, until `drain` is signaled.
    pub async fn serve_http(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        server::serve_plain(listener, self.listeners.clone(), drain).await
    }

    /// The metrics / readiness / admin endpoints (`/metrics`, `/healthz/ready`, `/config_dump`) on `listener`.
    pub async fn serve_admin(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        let me = self.clone();
        server::serve_admin(listener, Arc::new(move |path: &str| me.admin(path)), drain).await
    }

    fn admin(&self, path: &str) -> http::Response<http_body_util::Full<bytes::Bytes>> {
        let reply = |status: u16, ctype: &str, body: String| {
            http::Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, ctype)
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .expect("static response parts")
        };
        match path {
            "/metrics" | "/stats/prometheus" => reply(200, "text/plain; version=0.0.4", self.metrics.encode()),
            "/healthz/ready" if self.ready.load(std::sync::atomic::Ordering::Acquire) => {
                reply(200, "text/plain", "ready\n".into())
            }
            "/healthz/ready" => reply(503, "text/plain", "not ready: configuration not synced yet\n".into()),
            "/config_dump" => {
                let compiled = self.chain.compiled.load();
                let services: Vec<_> = compiled
                    .routes
                    .services()
                    .into_iter()
                    .map(|(ns, name)| {
                        let routes: Vec<_> = compiled
                            .routes
                            .routes(&ns, &name)
                            .iter()
                            .map(|r| serde_json::json!({ "name": r.name, "origin": r.origin }))
                            .collect();
                        serde_json::json!({ "namespace": ns, "name": name, "routes": routes })
                    })
                    .collect();
                let mut errors: Vec<_> =
                    self.logged.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
                errors.sort();
                let dump = serde_json::json!({
                    "waypoint": self.chain.me.to_string(),
                    "identity": self.listeners.identity.to_string(),
                    "services": services,
                    "configErrors": errors,
                });
                reply(200, "application/json", serde_json::to_string_pretty(&dump).unwrap_or_default())
            }
            _ => reply(404, "text/plain", "not found; try /metrics, /healthz/ready, /config_dump\n".into()),
        }
    }
}
