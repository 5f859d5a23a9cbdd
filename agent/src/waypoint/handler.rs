//! One request through the waypoint's filter chain, in Envoy/Istio's order: L7 authorization (403) →
//! local rate limit (429) → route (404 `NR`) → CORS preflight → fault (delay `DI`, abort `FI`) →
//! redirect / direct response → header operations and rewrite → cluster admission (503 `UO`) →
//! endpoint choice (503 `UH`) → attempts with retries and per-try timeouts inside the route timeout
//! (504 `UT`) → response headers → request metrics and access log. Mirrors are fire-and-forget.
//!
//! It owns the order and Envoy's local replies and response flags; matching, balancing, policy and
//! telemetry decisions are the other waypoint modules', connections are `upstream`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::cluster::{Cluster, Clusters, HashKey};
use super::ratelimit::RateLimits;
use super::route::{Action, Destination, Route, RouteTable, WeightedDestination};
use super::server::{Body, BoxError, Downstream, Handler};
use super::telemetry::{self, RequestMetrics, RequestRecord, TraceIds};
use super::upstream::{Protocol, Target, Upstream};
use super::{Outcome, WaypointId};
use crate::metrics::Peer;
use crate::policy::Decision;
use crate::policy::l7::{L7Policies, L7Request};
use crate::proxy::peer_labels;
use crate::state::{State, StateStore};

mod body;
mod reply;
mod tcp;
#[cfg(test)]
pub(crate) mod tests;

use reply::Replied;
pub use reply::local_reply;

/// Request bodies up to this size (or without a body) are buffered so retries and mirrors can replay
/// them; larger or unknown-length ones stream through and are not retried.
pub const MAX_BUFFERED_BODY: u64 = 64 << 10;
/// Envoy's default retry back-off base interval (jittered, doubling, capped at 10×).
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// What is recompiled on every configuration change (swapped atomically; requests in flight keep the
/// version they started with).
#[derive(Default)]
pub struct Compiled {
    pub routes: RouteTable,
    pub authz: L7Policies,
    /// The same policies as they apply to connections passed through at L4 ([`l4_policies`]).
    pub tcp_authz: L7Policies,
}

/// The AuthorizationPolicies as a TCP connection is judged by them (HTTP-only rules handled as istiod
/// does for TCP filter chains); compile them with `L7Policies::compile` like the HTTP ones.
pub fn l4_policies(policies: &[crate::crd::AuthorizationPolicy]) -> Vec<crate::crd::AuthorizationPolicy> {
    tcp::l4_view(policies)
}

/// The whole chain, shared by every connection.
pub struct Chain {
    pub me: WaypointId,
    pub state: Arc<StateStore>,
    pub compiled: ArcSwap<Compiled>,
    pub clusters: Clusters,
    pub rate_limits: RateLimits,
    pub metrics: RequestMetrics,
    /// Istio's TCP metrics for connections passed through at L4 (reporter=waypoint).
    pub tcp_metrics: Arc<crate::metrics::Metrics>,
    pub upstream: Arc<Upstream>,
}

impl Handler for Chain {
    fn handle(
        self: Arc<Self>,
        d: Downstream,
        req: http::Request<Incoming>,
    ) -> BoxFuture<'static, http::Response<Body>> {
        Box::pin(async move { self.serve(d, req).await })
    }

    fn tcp(
        self: Arc<Self>,
        d: Downstream,
        req: http::Request<h2::RecvStream>,
        respond: h2::server::SendResponse<bytes::Bytes>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.serve_tcp(d, req, respond))
    }
}

/// Hop-by-hop headers: they describe one connection, not the request (RFC 9110 §7.6.1), and the
/// HTTP version may differ on the other side.
const HOP_BY_HOP: [http::header::HeaderName; 5] = [
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHORIZATION,
    http::header::HeaderName::from_static("keep-alive"),
];

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove("proxy-connection");
    if headers.get(http::header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(http::header::TE);
    }
}

/// What one request did, for metrics and the access log.
struct Record {
    start: Instant,
    downstream: Downstream,
    source: Peer,
    destination: Peer,
    method: http::Method,
    path: String,
    authority: String,
    http_version: &'static str,
    protocol: telemetry::Protocol,
    user_agent: Option<String>,
    trace: TraceIds,
    route: Option<String>,
    cluster: Option<String>,
    upstream: Option<std::net::SocketAddr>,
    status: http::StatusCode,
    grpc_status: Option<u32>,
    flags: &'static str,
    request_bytes: u64,
}

impl Record {
    fn finish(self, metrics: &RequestMetrics, response_bytes: u64) {
        let svc = &self.downstream.service;
        let hostname = svc.hostname();
        let r = RequestRecord {
            source: &self.source,
            destination: &self.destination,
            destination_service: &hostname,
            destination_service_name: &svc.name,
            destination_service_namespace: &svc.namespace,
            protocol: self.protocol,
            response_code: self.status.as_u16(),
            grpc_status: self.grpc_status,
            response_flags: self.flags,
            mtls: self.downstream.identity.is_some(),
            duration: self.start.elapsed(),
            request_bytes: self.request_bytes,
            response_bytes,
            method: self.method.as_str(),
            path: &self.path,
            http_version: self.http_version,
            authority: &self.authority,
            user_agent: self.user_agent.as_deref(),
            request_id: Some(&self.trace.request_id),
            trace_id: Some(&self.trace.trace_id),
            downstream_remote: Some(self.downstream.peer),
            upstream_host: self.upstream,
            upstream_cluster: self.cluster.as_deref(),
            route_name: self.route.as_deref(),
        };
        metrics.record(&r);
        telemetry::access_log(&r);
    }
}

/// Istio's default path normalization (BASE: decoded unreserved characters, no dot segments), before
/// routing and authorization and forwarded upstream, as Envoy does: a DENY on `/admin*` cannot be
/// dodged with `/public/%2e%2e/admin`, and the backend serves the resource the policy judged.
fn normalize_path(uri: &mut http::Uri) {
    let Some(pq) = uri.path_and_query() else { return };
    let std::borrow::Cow::Owned(path) = crate::policy::l7::normalize_path(pq.path()) else { return };
    let rebuilt = match pq.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let Ok(pq) = rebuilt.parse() else { return };
    let original = uri.clone();
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(pq);
    *uri = http::Uri::from_parts(parts).unwrap_or(original);
}

/// The source as Istio labels it: its workload when its address is known, else what its identity says.
fn source_peer(state: &State, d: &Downstream) -> Peer {
    if let Some(w) = state.workload_by_ip(d.peer.ip()) {
        return peer_labels(w);
    }
    let mut p = Peer::default();
    if let Some(id) = &d.identity {
        p.principal = id.to_string();
        p.namespace = id.namespace.clone();
    }
    p
}

impl Chain {
    async fn serve(self: Arc<Self>, d: Downstream, req: http::Request<Incoming>) -> http::Response<Body> {
        let state = self.state.load();
        let compiled = self.compiled.load_full();
        let (mut parts, body) = req.into_parts();
        normalize_path(&mut parts.uri);
        let trace = telemetry::propagate_trace(&mut parts.headers);
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
            .unwrap_or_default();
        let mut record = Record {
            start: Instant::now(),
            source: source_peer(&state, &d),
            destination: Peer::default(),
            downstream: d.clone(),
            method: parts.method.clone(),
            path: parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into()),
            authority,
            http_version: match parts.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            protocol: telemetry::Protocol::of(&parts.headers),
            user_agent: parts.headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_string),
            trace,
            route: None,
            cluster: None,
            upstream: None,
            status: http::StatusCode::OK,
            grpc_status: None,
            flags: "-",
            request_bytes: 0,
        };
        let (response, flags) = match self.route_and_forward(&state, &compiled, &d, &mut parts, body, &mut record).await
        {
            Ok(resp) => (resp, "-"),
            Err(r) => (r.response, r.flags),
        };
        record.status = response.status();
        record.grpc_status =
            response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        if record.flags == "-" {
            record.flags = flags;
        }
        let (mut parts, body) = response.into_parts();
        if let Ok(v) = http::HeaderValue::from_str(&record.trace.request_id) {
            parts.headers.entry("x-request-id").or_insert(v);
        }
        let chain = self.clone();
        let body = body::Finishing::new(body, Box::new(move |n| record.finish(&chain.metrics, n)));
        http::Response::from_parts(parts, body.boxed())
    }

    /// Everything from authorization to the upstream response; `Err` is a local reply.
    async fn route_and_forward(
        &self,
        state: &State,
        compiled: &Compiled,
        d: &Downstream,
        parts: &mut http::request::Parts,
        body: Incoming,
        record: &mut Record,
    ) -> Result<http::Response<Body>, Replied> {
        let source = state.workload_by_ip(d.peer.ip()).cloned();
        let source_namespace = d.identity.as_ref().map(|i| i.namespace.clone());
        let principal = d.identity.as_ref().map(|i| i.to_string());
        let path = parts.uri.path().to_string();
        let host = record.authority.clone();

        // The route is looked up first only because rate limits are per route; authorization still
        // decides before anything else happens.
        let scheme = parts.uri.scheme_str().unwrap_or("http").to_string();
        let path_and_query = record.path.clone();
        let route = compiled.routes.route(&super::route::RequestInfo {
            service: &d.service,
            port: d.port,
            method: &parts.method,
            scheme: &scheme,
            authority: &host,
            path_and_query: &path_and_query,
            headers: &parts.headers,
            source_namespace: source_namespace.as_deref(),
            source_labels: source.as_ref().map(|w| &*w.labels),
        });

        let decision = compiled.authz.authorize(&L7Request {
            service_namespace: &d.service.namespace,
            service_name: &d.service.name,
            source_principal: principal.as_deref(),
            source_namespace: source_namespace.as_deref(),
            source_ip: d.peer.ip(),
            method: parts.method.as_str(),
            path: &path,
            host: &host,
            port: d.port,
            headers: &parts.headers,
        });
        if let Decision::Deny { policy } = decision {
            tracing::debug!(service = %d.service.hostname(), %policy, "request denied by L7 AuthorizationPolicy");
            return Err(reply::rbac_denied());
        }

        let route_name = route.as_ref().map(|r| r.name.as_str()).unwrap_or("");
        let passed = match self.rate_limits.check_request(&d.service, route_name) {
            Ok(p) => p,
            Err(limited) => {
                let grpc = record.protocol == telemetry::Protocol::Grpc;
                let resp = if grpc { limited.grpc_response() } else { limited.response() };
                let response = resp.map(|b| Full::new(b).map_err(|never| match never {}).boxed());
                return Err(Replied { response, flags: "RL" });
            }
        };
        for (k, v) in &passed.request_headers {
            parts.headers.append(k.clone(), v.clone());
        }
        let Some(route) = route else { return Err(reply::no_route()) };
        record.route = Some(route.name.clone());

        if let Some(cors) = &route.cors
            && let Some(pre) = cors.preflight(parts)
        {
            return Ok(pre.map(|()| empty()));
        }
        let origin = parts.headers.get(http::header::ORIGIN).cloned();

        if let Some(fault) = &route.fault {
            if let Some((delay, pct)) = fault.delay
                && roll_percent(pct)
            {
                record.flags = "DI";
                tokio::time::sleep(delay).await;
            }
            if let Some((status, pct)) = fault.abort
                && roll_percent(pct)
            {
                return Err(reply::fault_abort(status));
            }
        }

        let dests = match &route.action {
            Action::Redirect(r) => return Ok(r.response(parts).map(|()| empty())),
            Action::DirectResponse { status, body } => {
                let mut resp = local_reply(*status, body.clone());
                route.response_headers.apply(resp.headers_mut());
                return Ok(resp);
            }
            Action::Forward(dests) => dests,
        };
        let Some(wd) = route.pick(rand::random::<u64>()) else { return Err(reply::no_healthy_upstream()) };
        let _ = dests;
        let port = wd.dest.port_for(d.port);
        record.cluster =
            Some(format!("outbound|{port}|{}|{}", wd.dest.subset.as_deref().unwrap_or(""), wd.dest.service.hostname()));

        if let Some(rw) = &route.rewrite {
            rw.apply(parts);
        }
        // Envoy applies the most specific level first and lets the route level overwrite it.
        wd.request_headers.apply(&mut parts.headers);
        route.request_headers.apply(&mut parts.headers);
        strip_hop_by_hop(&mut parts.headers);

        let mut body = body::RequestBody::read(body)
            .await
            .map_err(|_| Replied::new(400, "downstream request body could not be read", "DPE"))?;
        record.request_bytes = body.len.unwrap_or(0);

        for m in &route.mirrors {
            if roll_percent(m.percent)
                && let Some(copy) = body.copy()
            {
                self.mirror(&m.dest, d, parts, copy);
            }
        }

        let mut resp = self.forward(&route, wd, d, parts, &mut body, record).await?;
        // The downstream connection has its own version (an HTTP/1.0 upstream must not downgrade it).
        *resp.version_mut() = http::Version::default();
        strip_hop_by_hop(resp.headers_mut());
        for (k, v) in &passed.response_headers {
            resp.headers_mut().append(k.clone(), v.clone());
        }
        wd.response_headers.apply(resp.headers_mut());
        route.response_headers.apply(resp.headers_mut());
        if let Some(cors) = &route.cors {
            cors.apply(origin.as_ref(), resp.headers_mut());
        }
        Ok(resp)
    }

    /// Attempts (the first try and the route's retries) within the route timeout.
    async fn forward(
        &self,
        route: &Route,
        wd: &WeightedDestination,
        d: &Downstream,
        parts: &http::request::Parts,
        body: &mut body::RequestBody,
        record: &mut Record,
    ) -> Result<http::Response<Body>, Replied> {
        let port = wd.dest.port_for(d.port);
        let cluster = self.clusters.get(&wd.dest, d.port);
        let _admission = cluster.admit().await.map_err(|_| reply::overflow())?;
        let deadline = route.timeout.map(|t| tokio::time::Instant::now() + t);
        let retries = if body.replayable() { route.retry.attempts } else { 0 };
        let protocol = Protocol::select(wd.dest.service.ports.iter().find(|p| p.port == port), parts);
        let query = parts.uri.query();
        let mut last = Outcome::ConnectFailure;
        let mut tried = Vec::with_capacity(1);
        // Held while a retry is in flight.
        let mut _retry_permit = None;
        for attempt in 0..=retries {
            if attempt > 0 {
                let max = RETRY_BACKOFF * (1u32 << (attempt - 1).min(3));
                let sleep = max.mul_f64(rand::random::<f64>());
                if deadline.is_some_and(|d| tokio::time::Instant::now() + sleep >= d) {
                    return Err(reply::request_timeout());
                }
                tokio::time::sleep(sleep).await;
            }
            let key = HashKey { headers: &parts.headers, source_ip: d.peer.ip(), query };
            // Istio's retry host predicate `previous_hosts`: a retry prefers an endpoint not tried yet
            // (up to 5 picks, like host_selection_retry_max_attempts).
            let mut endpoint = cluster.pick(&key);
            for _ in 0..5 {
                match &endpoint {
                    Some(e) if tried.contains(&e.addr) => endpoint = cluster.pick(&key),
                    _ => break,
                }
            }
            let Some(endpoint) = endpoint else { return Err(reply::no_healthy_upstream()) };
            tried.push(endpoint.addr);
            record.upstream = Some(endpoint.addr);
            record.destination = peer_labels(&endpoint.workload);
            let Some(req_body) = body.take() else { break };
            let req = upstream_request(parts, protocol, req_body);
            let settings = cluster.settings();
            let target = Target {
                addr: endpoint.addr,
                workload: endpoint.workload.clone(),
                protocol,
                connect_timeout: settings.connect_timeout,
                idle_timeout: Some(settings.idle_timeout),
                max_requests_per_connection: settings.max_requests_per_connection.unwrap_or(0),
            };
            let per_try = match (route.retry.per_try_timeout, deadline) {
                (Some(t), Some(d)) => Some((tokio::time::Instant::now() + t).min(d)),
                (Some(t), None) => Some(tokio::time::Instant::now() + t),
                (None, d) => d,
            };
            let sent = self.upstream.send(&target, req);
            let result = match per_try {
                Some(at) => tokio::time::timeout_at(at, sent).await.unwrap_or(Err(super::upstream::Failure {
                    outcome: Outcome::Timeout,
                    addr: endpoint.addr,
                    reason: "timeout".into(),
                })),
                None => sent.await,
            };
            let outcome = match &result {
                Ok(r) => Outcome::Status(r.status()),
                Err(f) => f.outcome,
            };
            cluster.report(&endpoint, &outcome);
            let overall_expired = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if attempt < retries && !overall_expired && route.retry.on.should_retry(&outcome) {
                // connectionPool.http.maxRetries: retries in flight across the cluster; when none is
                // left this answer stands (Envoy counts it as upstream_rq_retry_overflow).
                if let Some(permit) = cluster.retry_permit() {
                    tracing::debug!(attempt, upstream = %endpoint.addr, ?outcome, "retrying");
                    _retry_permit = Some(permit);
                    last = outcome;
                    continue;
                }
                tracing::debug!(upstream = %endpoint.addr, ?outcome, "retry not taken: maxRetries in flight");
            }
            return match result {
                Ok(mut resp) => {
                    if let Some(c) = &endpoint.set_cookie {
                        resp.headers_mut().append(http::header::SET_COOKIE, c.clone());
                    }
                    if attempt > 0 && route.retry.on.should_retry(&outcome) {
                        record.flags = "URX";
                    }
                    Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
                }
                Err(f) if overall_expired || f.outcome == Outcome::Timeout => {
                    tracing::debug!(upstream = %f.addr, reason = %f.reason, "upstream attempt timed out");
                    Err(reply::request_timeout())
                }
                Err(f) => {
                    tracing::debug!(upstream = %f.addr, reason = %f.reason, "upstream attempt failed");
                    Err(reply::failed(f.outcome, attempt > 0))
                }
            };
        }
        Err(reply::failed(if matches!(last, Outcome::Status(_)) { Outcome::Reset } else { last }, true))
    }

    /// Sends a copy of the request to the mirror destination and forgets it (Istio: authority + `-shadow`).
    fn mirror(&self, dest: &Destination, d: &Downstream, parts: &http::request::Parts, body: Body) {
        let port = dest.port_for(d.port);
        let cluster: Arc<Cluster> = self.clusters.get_for(&dest.service, dest.subset.as_deref(), port);
        let protocol = Protocol::select(dest.service.ports.iter().find(|p| p.port == port), parts);
        let source_ip = d.peer.ip();
        let key = HashKey { headers: &parts.headers, source_ip, query: parts.uri.query() };
        let Some(endpoint) = cluster.pick(&key) else { return };
        let mut req = upstream_request(parts, protocol, body);
        let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string);
        if let Some(h) = host.and_then(|h| shadow_host(&h).parse().ok()) {
            req.headers_mut().insert(http::header::HOST, h);
        }
        let settings = cluster.settings();
        let target = Target {
            addr: endpoint.addr,
            workload: endpoint.workload.clone(),
            protocol,
            connect_timeout: settings.connect_timeout,
            idle_timeout: Some(settings.idle_timeout),
            max_requests_per_connection: settings.max_requests_per_connection.unwrap_or(0),
        };
        let upstream = self.upstream.clone();
        tokio::spawn(async move {
            let _endpoint = endpoint;
            match tokio::time::timeout(Duration::from_secs(30), upstream.send(&target, req)).await {
                Ok(Ok(resp)) => {
                    let _ = resp.into_body().collect().await;
                }
                Ok(Err(f)) => tracing::debug!(upstream = %f.addr, reason = %f.reason, "mirror request failed"),
                Err(_) => tracing::debug!(upstream = %target.addr, "mirror request timed out"),
            }
        });
    }
}

fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => format!("{h}-shadow:{p}"),
        _ => format!("{host}-shadow"),
    }
}

/// True with probability `pct`/100.
fn roll_percent(pct: f64) -> bool {
    pct >= 100.0 || (pct > 0.0 && rand::random::<f64>() * 100.0 < pct)
}

fn empty() -> Body {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed()
}

/// The request as the endpoint gets it: HTTP/1.1 with origin-form URI and `Host`, or HTTP/2 with
/// `:authority` (from the downstream `Host`/authority, after rewrites).
fn upstream_request(parts: &http::request::Parts, protocol: Protocol, body: Body) -> http::Request<Body> {
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_string()))
        .unwrap_or_default();
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut b = http::Request::builder().method(parts.method.clone());
    let mut headers = parts.headers.clone();
    b = match protocol {
        Protocol::Http1 => {
            if let Ok(h) = authority.parse() {
                headers.insert(http::header::HOST, h);
            }
            b.uri(pq).version(http::Version::HTTP_11)
        }
        Protocol::Http2 => {
            headers.remove(http::header::HOST);
            let uri = http::Uri::builder().scheme("http").authority(authority.as_str()).path_and_query(pq).build();
            match uri {
                Ok(u) => b.uri(u),
                Err(_) => b.uri(pq),
            }
            .version(http::Version::HTTP_2)
        }
    };
    let mut req = b.body(body).expect("parts taken from a valid request");
    *req.headers_mut() = headers;
    req
}
