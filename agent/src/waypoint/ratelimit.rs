//! Local rate limits, configured the way Istio users write them: an `EnvoyFilter` that adds Envoy's
//! `envoy.filters.http.local_ratelimit` HTTP filter (`applyTo: HTTP_FILTER`) and optionally
//! per-route buckets (`applyTo: HTTP_ROUTE` with `typed_per_filter_config`), as in Istio's
//! "Enabling Rate Limits using Envoy" task. Over the limit the request is answered as Envoy does:
//! 429 (or the configured `status`), body `local_rate_limited`, the configured
//! `response_headers_to_add`, and `x-ratelimit-limit/remaining/reset` when
//! `enable_x_ratelimit_headers: DRAFT_VERSION_03`; the response flag is `RL`.
//!
//! Scope: an EnvoyFilter applies to this waypoint through `targetRefs` (its Gateway: every service
//! it serves; a Service: that one), a `workloadSelector` (the waypoint's own pod labels
//! `gateway.networking.k8s.io/gateway-name` / `istio.io/gateway-name`: every service; other labels:
//! the services whose endpoints carry them, i.e. where a sidecar would have applied it), or neither
//! (its namespace's services; every service from the root namespace or the waypoint's namespace).
//! Buckets are per (filter, service) and, for route patches, per (filter, service, route): a limit
//! written for one pod's sidecar becomes the limit of the service behind the waypoint.
//! A per-route config replaces the filter-level one for that route, as in Envoy.
//!
//! Owns: parsing those patches, the token buckets (kept across config updates when their
//! configuration did not change) and the limited response. Does not own: where in the chain the
//! check runs, or counting (the handler records `RL` in metrics). Descriptors, per-connection and
//! cluster-wide limits, and every other EnvoyFilter patch are reported as [`ConfigError`]s.

mod bucket;
mod config;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::Value;

use super::{ConfigError, WaypointId};
use crate::crd::EnvoyFilter;
use crate::state::{Service, State};
use bucket::Bucket;
use config::Settings;

/// Envoy's response flag for a locally rate-limited request.
pub const RESPONSE_FLAG: &str = "RL";
/// Istio's default root namespace (EnvoyFilters there apply mesh-wide).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
const BODY: &str = "local_rate_limited";
/// Labels a waypoint's pods carry (Istio's and Gateway API's), so `workloadSelector` can pick it.
const WAYPOINT_POD_LABELS: [&str; 2] = ["gateway.networking.k8s.io/gateway-name", "istio.io/gateway-name"];

/// A request refused by a local rate limit.
#[derive(Debug, Clone)]
pub struct Limited {
    pub status: StatusCode,
    /// `response_headers_to_add` and the `x-ratelimit-*` headers.
    pub headers: HeaderMap,
    /// gRPC status for gRPC requests: 8 (RESOURCE_EXHAUSTED) when configured, else 14 (UNAVAILABLE,
    /// Envoy's mapping of 429).
    pub grpc_status: u32,
    /// Which patch limited, e.g. `EnvoyFilter demo/ratelimit configPatches[0]`.
    pub origin: Arc<str>,
}

impl Limited {
    /// Envoy's local reply for HTTP: status, `content-type: text/plain`, body `local_rate_limited`.
    pub fn response(&self) -> http::Response<Bytes> {
        let mut r = http::Response::new(Bytes::from_static(BODY.as_bytes()));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        for (k, v) in &self.headers {
            h.append(k.clone(), v.clone());
        }
        r
    }

    /// Envoy's local reply for a gRPC request: HTTP 200, trailers-only with `grpc-status` and
    /// `grpc-message: local_rate_limited`.
    pub fn grpc_response(&self) -> http::Response<Bytes> {
        let mut r = http::Response::new(Bytes::new());
        let h = r.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(self.grpc_status));
        h.insert("grpc-message", HeaderValue::from_static(BODY));
        for (k, v) in &self.headers {
            h.append(k.clone(), v.clone());
        }
        r
    }
}

/// What a request that was not refused carries on.
#[derive(Debug, Clone, Default)]
pub struct Passed {
    /// `request_headers_to_add_when_not_enforced` of limits that were hit but not enforced.
    pub request_headers: HeaderMap,
    /// `x-ratelimit-*` for the response, when enabled.
    pub response_headers: HeaderMap,
}

/// One filter (or per-route config) instance for one service, with its bucket.
#[derive(Debug)]
struct Limiter {
    origin: Arc<str>,
    settings: Settings,
    bucket: Option<Bucket>,
    /// A route config without a route name: Envoy gives every route its own copy, so one bucket
    /// per route name, made on first use (route names come from configuration, so this is bounded).
    per_route_buckets: Option<Mutex<HashMap<String, Arc<Bucket>>>>,
}

impl Limiter {
    fn take(&self, route_name: &str, now: tokio::time::Instant) -> Option<bucket::Take> {
        let spec = self.settings.bucket?;
        match &self.per_route_buckets {
            None => self.bucket.as_ref().map(|b| b.take(now)),
            Some(m) => {
                let b = m
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(route_name.to_owned())
                    .or_insert_with(|| Arc::new(Bucket::new(spec, now)))
                    .clone();
                Some(b.take(now))
            }
        }
    }
}

#[derive(Debug, Default)]
struct ServiceLimits {
    /// Filter-level limiters, in filter order; each is a separate filter in the chain.
    filters: Vec<Arc<Limiter>>,
    /// Per-route configs: `None` = every route of the service (no route name in the match).
    routes: Vec<(Option<String>, Arc<Limiter>)>,
}

#[derive(Debug, Default)]
struct Compiled {
    /// Keyed by (namespace, name).
    services: HashMap<(String, String), ServiceLimits>,
    /// Every limiter by identity, to carry buckets over to the next compile.
    by_key: HashMap<String, Arc<Limiter>>,
}

/// The local rate limits of one waypoint. Send + Sync; `check` is lock-free apart from the one
/// bucket it takes a token from.
#[derive(Debug)]
pub struct RateLimits {
    compiled: ArcSwap<Compiled>,
    root_namespace: String,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self::new()
    }
}

fn chance(fraction: f64) -> bool {
    fraction >= 1.0 || fraction > 0.0 && rand::random::<f64>() < fraction
}

impl RateLimits {
    pub fn new() -> Self {
        Self::with_root_namespace(DEFAULT_ROOT_NAMESPACE)
    }

    pub fn with_root_namespace(root: &str) -> Self {
        RateLimits { compiled: ArcSwap::default(), root_namespace: root.to_owned() }
    }

    /// Recompiles from `state.routing.envoy_filters` for the services `me` serves. Buckets whose
    /// configuration did not change keep their tokens. Errors are only reported for EnvoyFilters
    /// that apply to this waypoint (others may be meant for sidecars or gateways).
    pub fn update(&self, state: &State, me: &WaypointId) -> Vec<ConfigError> {
        let mine = my_services(state, me);
        let old = self.compiled.load_full();
        let mut next = Compiled::default();
        let mut errors = Vec::new();
        let mut filters: Vec<&EnvoyFilter> = state.routing.envoy_filters.iter().collect();
        // Istio orders by priority, then creation; name order stands in for creation here.
        filters
            .sort_by_key(|ef| (ef.spec.priority.unwrap_or(0), ef.metadata.namespace.clone(), ef.metadata.name.clone()));
        for ef in filters {
            let scope = scope(ef, &mine, me, &self.root_namespace);
            if scope.is_empty() {
                continue;
            }
            compile_filter(ef, &scope, &old, &mut next, &mut errors);
        }
        self.compiled.store(Arc::new(next));
        errors
    }

    /// Takes a token for a request to `service` on the route named `route_name`; `Err` when a limit
    /// refuses it.
    pub fn check(&self, service: &Service, route_name: &str) -> Result<(), Limited> {
        self.check_request(service, route_name).map(|_| ())
    }

    /// [`RateLimits::check`] with the headers Envoy adds to requests and responses that pass.
    pub fn check_request(&self, service: &Service, route_name: &str) -> Result<Passed, Limited> {
        let compiled = self.compiled.load();
        let mut passed = Passed::default();
        let Some(sl) = compiled.services.get(&(service.namespace.clone(), service.name.clone())) else {
            return Ok(passed);
        };
        // Envoy uses the most specific per-route config instead of the filter-level one.
        let per_route = sl
            .routes
            .iter()
            .find(|(r, _)| r.as_deref() == Some(route_name))
            .or_else(|| sl.routes.iter().find(|(r, _)| r.is_none()))
            .map(|(_, l)| l);
        let limiters: Vec<&Arc<Limiter>> = match per_route {
            Some(l) => vec![l],
            None => sl.filters.iter().collect(),
        };
        for l in limiters {
            let s = &l.settings;
            if s.bucket.is_none() || !chance(s.enabled) {
                continue;
            }
            let Some(take) = l.take(route_name, tokio::time::Instant::now()) else { continue };
            let mut xrl = HeaderMap::new();
            if s.x_ratelimit_headers {
                xrl.insert("x-ratelimit-limit", HeaderValue::from(take.limit));
                xrl.insert("x-ratelimit-remaining", HeaderValue::from(take.remaining));
                xrl.insert("x-ratelimit-reset", HeaderValue::from(take.reset_secs));
            }
            if take.allowed {
                passed.response_headers.extend(xrl);
                continue;
            }
            if !chance(s.enforced) {
                for op in &s.request_headers_when_not_enforced {
                    op.apply(&mut passed.request_headers);
                }
                passed.response_headers.extend(xrl);
                continue;
            }
            let mut headers = HeaderMap::new();
            for op in &s.response_headers {
                op.apply(&mut headers);
            }
            headers.extend(xrl);
            tracing::debug!(origin = %l.origin, service = %service.hostname(), route = route_name, "local rate limit");
            return Err(Limited {
                status: s.status,
                headers,
                grpc_status: if s.grpc_resource_exhausted { 8 } else { 14 },
                origin: l.origin.clone(),
            });
        }
        Ok(passed)
    }
}

/// Services whose waypoint is `me`, by (namespace, name).
fn my_services<'a>(state: &'a State, me: &WaypointId) -> BTreeMap<(String, String), &'a Arc<Service>> {
    state
        .services_by_vip
        .values()
        .filter(|s| state.waypoint_of(s).is_some_and(|w| w.namespace == me.namespace && w.name == me.name))
        .map(|s| ((s.namespace.clone(), s.name.clone()), s))
        .collect()
}

/// The services (of `mine`) an EnvoyFilter applies to.
fn scope(
    ef: &EnvoyFilter,
    mine: &BTreeMap<(String, String), &Arc<Service>>,
    me: &WaypointId,
    root: &str,
) -> Vec<(String, String)> {
    let ns = ef.metadata.namespace.as_deref().unwrap_or("default");
    let all = || mine.keys().cloned().collect::<Vec<_>>();
    let in_ns = |n: &str| mine.keys().filter(|(sn, _)| sn == n).cloned().collect::<Vec<_>>();
    let spec = &ef.spec;
    if !spec.target_refs.is_empty() {
        let mut out = Vec::new();
        for r in &spec.target_refs {
            let rns = r.namespace.as_deref().unwrap_or(ns);
            match (r.group.as_str(), r.kind.as_str()) {
                ("gateway.networking.k8s.io", "Gateway") if r.name == me.name && rns == me.namespace => {
                    out.extend(all())
                }
                ("" | "core", "Service") => {
                    let key = (rns.to_owned(), r.name.clone());
                    if mine.contains_key(&key) {
                        out.push(key);
                    }
                }
                _ => {}
            }
        }
        out.sort();
        out.dedup();
        return out;
    }
    if let Some(sel) = &spec.workload_selector {
        let ns_ok = |n: &str| ns == root || n == ns;
        let selects_waypoint = !sel.labels.is_empty()
            && sel.labels.iter().all(|(k, v)| WAYPOINT_POD_LABELS.contains(&k.as_str()) && *v == me.name);
        if selects_waypoint && ns_ok(&me.namespace) {
            return all();
        }
        return mine
            .iter()
            .filter(|((sn, _), svc)| {
                ns_ok(sn) && svc.endpoints.iter().any(|w| sel.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            })
            .map(|(k, _)| k.clone())
            .collect();
    }
    if ns == root || ns == me.namespace { all() } else { in_ns(ns) }
}

fn compile_filter(
    ef: &EnvoyFilter,
    scope: &[(String, String)],
    old: &Compiled,
    next: &mut Compiled,
    errors: &mut Vec<ConfigError>,
) {
    let ns = ef.metadata.namespace.as_deref().unwrap_or("default");
    let name = ef.metadata.name.as_deref().unwrap_or("");
    let err = |field: String, reason: String| ConfigError {
        kind: "EnvoyFilter",
        namespace: ns.to_owned(),
        name: name.to_owned(),
        field,
        reason,
    };
    for (i, patch) in ef.spec.config_patches.iter().enumerate() {
        let path = format!("spec.configPatches[{i}]");
        match parse_patch(patch, &path) {
            Ok((settings, target)) => {
                let origin: Arc<str> = format!("EnvoyFilter {ns}/{name} configPatches[{i}]").into();
                let tkey = match &target {
                    PatchTarget::Filter => "filter".to_owned(),
                    PatchTarget::Route(r) => format!("route:{}", r.as_deref().unwrap_or("*")),
                };
                for (sns, sname) in scope {
                    let key = format!("{origin}|{sns}/{sname}|{tkey}");
                    let limiter = match old.by_key.get(&key) {
                        Some(l) if l.settings == settings => l.clone(),
                        _ => Arc::new(Limiter {
                            origin: origin.clone(),
                            bucket: settings.bucket.map(|b| Bucket::new(b, tokio::time::Instant::now())),
                            per_route_buckets: matches!(target, PatchTarget::Route(None)).then(Mutex::default),
                            settings: settings.clone(),
                        }),
                    };
                    next.by_key.insert(key, limiter.clone());
                    let sl = next.services.entry((sns.clone(), sname.clone())).or_default();
                    match &target {
                        PatchTarget::Filter => sl.filters.push(limiter),
                        PatchTarget::Route(r) => sl.routes.push((r.clone(), limiter)),
                    }
                }
            }
            Err((field, reason)) => errors.push(err(field, reason)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatchTarget {
    Filter,
    /// A route name, or `None` for every route.
    Route(Option<String>),
}

const ONLY_LOCAL_RATELIMIT: &str = "only Istio's local rate limit is supported in an EnvoyFilter here: an HTTP_FILTER \
     patch adding envoy.filters.http.local_ratelimit, or an HTTP_ROUTE patch with its typed_per_filter_config";

fn parse_patch(
    p: &crate::crd::networking::EnvoyConfigObjectPatch,
    path: &str,
) -> Result<(Settings, PatchTarget), config::FieldError> {
    let value = p.patch.as_ref().and_then(|x| x.value.as_ref());
    let op = p.patch.as_ref().and_then(|x| x.operation.as_deref()).unwrap_or("");
    match p.apply_to.as_deref() {
        Some("HTTP_FILTER") => {
            if !matches!(op, "INSERT_BEFORE" | "INSERT_AFTER" | "INSERT_FIRST" | "ADD") {
                return Err((
                    format!("{path}.patch.operation"),
                    format!("{op:?}: {ONLY_LOCAL_RATELIMIT} (with INSERT_BEFORE, INSERT_AFTER or INSERT_FIRST)"),
                ));
            }
            let v = value.ok_or_else(|| (format!("{path}.patch.value"), "required".to_owned()))?;
            let fname = v.get("name").and_then(Value::as_str).unwrap_or_default();
            if fname != config::FILTER_NAME {
                return Err((format!("{path}.patch.value.name"), format!("{fname:?}: {ONLY_LOCAL_RATELIMIT}")));
            }
            let tc = v
                .get("typed_config")
                .or_else(|| v.get("typedConfig"))
                .ok_or_else(|| (format!("{path}.patch.value.typed_config"), "required".to_owned()))?;
            let (inner, ipath) = config::unwrap_typed(tc, &format!("{path}.patch.value.typed_config"))?;
            Ok((config::settings(inner, &ipath, false)?, PatchTarget::Filter))
        }
        Some("HTTP_ROUTE") => {
            if op != "MERGE" {
                return Err((
                    format!("{path}.patch.operation"),
                    format!("{op:?}: {ONLY_LOCAL_RATELIMIT} (with MERGE)"),
                ));
            }
            let route = p
                .r#match
                .as_ref()
                .and_then(|m| m.pointer("/routeConfiguration/vhost/route/name"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let v = value.ok_or_else(|| (format!("{path}.patch.value"), "required".to_owned()))?;
            let tpfc = v.get("typed_per_filter_config").or_else(|| v.get("typedPerFilterConfig"));
            let entry = tpfc.and_then(|t| t.get(config::FILTER_NAME)).ok_or_else(|| {
                (
                    format!("{path}.patch.value.typed_per_filter_config"),
                    format!("no {} entry: {ONLY_LOCAL_RATELIMIT}", config::FILTER_NAME),
                )
            })?;
            if let Some(other) =
                tpfc.and_then(Value::as_object).and_then(|o| o.keys().find(|k| *k != config::FILTER_NAME))
            {
                return Err((
                    format!("{path}.patch.value.typed_per_filter_config.{other}"),
                    ONLY_LOCAL_RATELIMIT.to_owned(),
                ));
            }
            if let Some(other) = v.as_object().and_then(|o| o.keys().find(|k| !k.starts_with("typed"))) {
                return Err((format!("{path}.patch.value.{other}"), ONLY_LOCAL_RATELIMIT.to_owned()));
            }
            let epath = format!("{path}.patch.value.typed_per_filter_config.{}", config::FILTER_NAME);
            let (inner, ipath) = config::unwrap_typed(entry, &epath)?;
            Ok((config::settings(inner, &ipath, true)?, PatchTarget::Route(route)))
        }
        other => Err((format!("{path}.applyTo"), format!("{:?}: {ONLY_LOCAL_RATELIMIT}", other.unwrap_or("")))),
    }
}
