//! The waypoint's routing table: VirtualServices and HTTPRoutes for the services that use this
//! waypoint, compiled into per-service ordered match lists, and the lookup of one request in it.
//!
//! Owns: which configuration applies to which service (VirtualService `hosts`, HTTPRoute
//! `parentRefs`; an HTTPRoute beats a VirtualService; a service without either gets a route to
//! itself), the order of rules (VirtualService: as written, first match wins; HTTPRoute: Gateway API
//! precedence), validation of everything a route refers to (destinations, subsets, regexes, weights,
//! durations) and the compiled per-route behaviour (`action`). Does not own endpoint choice,
//! DestinationRule traffic policy (`cluster`), or carrying out the actions on the wire (`handler`).

pub mod action;
mod gateway;
mod istio;
pub mod matcher;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

pub use action::{
    Cors, Fault, HeaderOps, ISTIO_DEFAULT_RETRY_ON, Mirror, PathRewrite, Redirect, RedirectPort, RetryOn, RetryPolicy,
    Rewrite,
};
pub use matcher::{HeaderMatcher, PathMatcher, QueryMatcher, RequestMatch, StringMatcher};

use crate::state::{Service, State};
use crate::waypoint::{ConfigError, WaypointId};

/// What the router looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The service the client dialled (from the CONNECT authority VIP).
    pub service: &'a Service,
    /// The service port the client dialled.
    pub port: u16,
    pub method: &'a http::Method,
    pub scheme: &'a str,
    /// `:authority` / `Host` as sent.
    pub authority: &'a str,
    pub path_and_query: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The peer's namespace and pod labels, when its identity / IP tells them.
    pub source_namespace: Option<&'a str>,
    pub source_labels: Option<&'a BTreeMap<String, String>>,
}

/// One compiled route: what happens to a request that matched it.
#[derive(Debug, Clone)]
pub struct Route {
    /// The VirtualService `http[].name` / HTTPRoute rule `name`, else generated (`ns.name.index`).
    pub name: String,
    /// Where it came from, for logs and the config dump, e.g. `VirtualService demo/reviews http[1]`.
    pub origin: String,
    pub action: Action,
    /// Applied after the chosen destination's own header operations (Envoy's default order, so the
    /// route level wins on `set`).
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    /// Whole-request timeout (retries included); `None`: none.
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    pub cors: Option<Cors>,
}

#[derive(Debug, Clone)]
pub enum Action {
    /// Weighted destinations; weights sum to more than 0 (a weight of 0 is never picked).
    Forward(Vec<WeightedDestination>),
    Redirect(Redirect),
    DirectResponse {
        status: http::StatusCode,
        body: bytes::Bytes,
    },
}

#[derive(Debug, Clone)]
pub struct WeightedDestination {
    pub dest: Destination,
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

#[derive(Debug, Clone)]
pub struct Destination {
    pub service: Arc<Service>,
    /// A DestinationRule subset of `service` (checked to exist when the table was built).
    pub subset: Option<String>,
    /// The service port to use; `0` means the port the client dialled (a destination without a
    /// port on a multi-port service, and every default route).
    pub port: u16,
}

impl Destination {
    /// The service port for a request that came in on `request_port`.
    pub fn port_for(&self, request_port: u16) -> u16 {
        if self.port == 0 { request_port } else { self.port }
    }
}

impl Route {
    /// The destination for a uniformly random `roll`: each destination gets `weight / total` of the
    /// u64 range. `None` for redirects and direct responses.
    pub fn pick(&self, roll: u64) -> Option<&WeightedDestination> {
        let Action::Forward(dests) = &self.action else { return None };
        let total: u64 = dests.iter().map(|d| u64::from(d.weight)).sum();
        if total == 0 {
            return None;
        }
        // Scale the roll into [0, total) without the bias of `roll % total`.
        let mut point = ((u128::from(roll) * u128::from(total)) >> 64) as u64;
        for d in dests {
            if point < u64::from(d.weight) {
                return Some(d);
            }
            point -= u64::from(d.weight);
        }
        None
    }

    /// The route a service without VirtualService or HTTPRoute gets: all of itself, Istio's default
    /// retries, no timeout.
    pub fn default_for(service: &Arc<Service>) -> Route {
        Route {
            name: "default".to_owned(),
            origin: format!("default route {}/{}", service.namespace, service.name),
            action: Action::Forward(vec![WeightedDestination {
                dest: Destination { service: service.clone(), subset: None, port: 0 },
                weight: 1,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
            }]),
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            rewrite: None,
            timeout: None,
            retry: RetryPolicy::istio_default(),
            fault: None,
            mirrors: Vec::new(),
            cors: None,
        }
    }
}

/// One compiled match of a route: the first entry whose match holds decides.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) m: RequestMatch,
    pub(crate) route: Arc<Route>,
}

/// Which kind of configuration a service's routes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteSource {
    HttpRoute,
    VirtualService,
    Default,
}

#[derive(Debug, Clone)]
pub(crate) struct ServiceRoutes {
    source: RouteSource,
    entries: Vec<Entry>,
}

type ServiceKey = (String, String);

/// The compiled routes of every service a waypoint serves.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    /// namespace → name → routes (nested so a lookup borrows the request's strings).
    services: HashMap<String, HashMap<String, ServiceRoutes>>,
}

impl RouteTable {
    /// Routes for every service whose `State::waypoint_of` is `me`, from VirtualServices (hosts: short
    /// names, FQDNs, wildcards) and HTTPRoutes (parentRefs: the Service, or the waypoint Gateway itself).
    /// Invalid objects (or rules) are left out and returned; a service without config gets a default route.
    pub fn build(state: &State, me: &WaypointId) -> (RouteTable, Vec<ConfigError>) {
        let served = served_services(state, me);
        let subsets = subsets_by_service(state);
        let ctx = Ctx { state, subsets: &subsets };
        let mut errors = Vec::new();
        let mut table = RouteTable::default();

        let gateway::Compiled { producer: mut from_http_routes, consumer: mut consumer_routes } =
            gateway::compile_all(&ctx, me, &served, &mut errors);
        let mut vs_cache = istio::VsCache::default();
        for (key, svc) in &served {
            let (source, mut entries) = if let Some(entries) = from_http_routes.remove(key) {
                if istio::has_virtual_service(state, svc) {
                    tracing::info!(service = %svc.hostname(), "HTTPRoute and VirtualService both name this service; the HTTPRoute is used");
                }
                (RouteSource::HttpRoute, entries)
            } else if let Some(entries) = vs_cache.entries_for(&ctx, svc, &mut errors) {
                (RouteSource::VirtualService, entries)
            } else {
                let entry = Entry { m: RequestMatch::default(), route: Arc::new(Route::default_for(svc)) };
                (RouteSource::Default, vec![entry])
            };
            if let Some(mut consumer) = consumer_routes.remove(key) {
                consumer.append(&mut entries);
                entries = consumer;
            }
            table.insert(key.clone(), ServiceRoutes { source, entries });
        }
        for e in &errors {
            // The caller logs each error once (not on every rebuild).
            tracing::debug!(kind = e.kind, namespace = %e.namespace, name = %e.name, field = %e.field, reason = %e.reason, "routing configuration left out");
        }
        (table, errors)
    }

    /// First matching rule; `None` = no route (the handler answers 404, flag NR).
    pub fn route(&self, req: &RequestInfo<'_>) -> Option<Arc<Route>> {
        let routes = self.get(&req.service.namespace, &req.service.name)?;
        routes.entries.iter().find(|e| e.m.matches(req)).map(|e| e.route.clone())
    }

    fn get(&self, namespace: &str, name: &str) -> Option<&ServiceRoutes> {
        self.services.get(namespace)?.get(name)
    }

    fn insert(&mut self, (namespace, name): ServiceKey, routes: ServiceRoutes) {
        self.services.entry(namespace).or_default().insert(name, routes);
    }

    /// Whether `namespace/name` is served here, and by what kind of configuration.
    pub fn source(&self, namespace: &str, name: &str) -> Option<RouteSource> {
        self.get(namespace, name).map(|r| r.source)
    }

    /// The routes of one service in match order (config dump, destinations a cluster manager needs).
    pub fn routes(&self, namespace: &str, name: &str) -> Vec<Arc<Route>> {
        self.get(namespace, name).map(|r| r.entries.iter().map(|e| e.route.clone()).collect()).unwrap_or_default()
    }

    /// `(namespace, name)` of every service served, sorted.
    pub fn services(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> =
            self.services.iter().flat_map(|(ns, names)| names.keys().map(|n| (ns.clone(), n.clone()))).collect();
        v.sort();
        v
    }
}

/// What compilation looks things up in.
pub(crate) struct Ctx<'a> {
    pub(crate) state: &'a State,
    /// Service → the DestinationRule subset names defined for it.
    pub(crate) subsets: &'a HashMap<ServiceKey, BTreeSet<String>>,
}

impl Ctx<'_> {
    pub(crate) fn has_subset(&self, svc: &Service, subset: &str) -> bool {
        self.subsets.get(&(svc.namespace.clone(), svc.name.clone())).is_some_and(|s| s.contains(subset))
    }
}

/// The services that use waypoint `me`, one per name (a dual-stack service has two VIPs).
fn served_services(state: &State, me: &WaypointId) -> BTreeMap<ServiceKey, Arc<Service>> {
    state
        .services_by_vip
        .values()
        .filter(|svc| state.waypoint_of(svc).is_some_and(|w| w.namespace == me.namespace && w.name == me.name))
        .map(|svc| ((svc.namespace.clone(), svc.name.clone()), svc.clone()))
        .collect()
}

fn subsets_by_service(state: &State) -> HashMap<ServiceKey, BTreeSet<String>> {
    let mut out: HashMap<ServiceKey, BTreeSet<String>> = HashMap::new();
    let services: BTreeMap<ServiceKey, &Arc<Service>> =
        state.services_by_vip.values().map(|s| ((s.namespace.clone(), s.name.clone()), s)).collect();
    for dr in &state.routing.destination_rules {
        let ns = dr.metadata.namespace.as_deref().unwrap_or("default");
        let host = HostPattern::parse(&dr.spec.host, ns);
        for (key, svc) in &services {
            if host.matches(svc) {
                out.entry(key.clone()).or_default().extend(dr.spec.subsets.iter().map(|s| s.name.clone()));
            }
        }
    }
    out
}

/// A VirtualService / DestinationRule host, resolved the way Istio does: a name without dots is
/// `name.<object namespace>.svc.cluster.local`; `*` and `*.suffix` are wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    Exact(String),
    /// Matches hostnames ending in this suffix (which starts with `.`), or everything when empty.
    Wildcard(String),
}

pub(crate) const CLUSTER_DOMAIN: &str = "svc.cluster.local";

impl HostPattern {
    pub(crate) fn parse(host: &str, namespace: &str) -> HostPattern {
        let host = host.to_ascii_lowercase();
        if host == "*" {
            HostPattern::Wildcard(String::new())
        } else if let Some(suffix) = host.strip_prefix('*') {
            HostPattern::Wildcard(suffix.to_owned())
        } else if !host.contains('.') {
            HostPattern::Exact(format!("{host}.{namespace}.{CLUSTER_DOMAIN}"))
        } else {
            HostPattern::Exact(host)
        }
    }

    pub(crate) fn matches(&self, svc: &Service) -> bool {
        let hostname = svc.hostname();
        match self {
            HostPattern::Exact(h) => *h == hostname,
            HostPattern::Wildcard(suffix) => hostname.ends_with(suffix.as_str()),
        }
    }
}

/// The Service a destination `host` names, resolved in `namespace`: a short name, `name.ns`,
/// `name.ns.svc` or the FQDN `name.ns.svc.cluster.local`.
pub(crate) fn resolve_host(state: &State, host: &str, namespace: &str) -> Option<Arc<Service>> {
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix(".cluster.local").unwrap_or(&host);
    let host = host.strip_suffix(".svc").unwrap_or(host);
    let (name, ns) = match host.split_once('.') {
        None => (host, namespace),
        Some((name, ns)) if !ns.contains('.') => (name, ns),
        Some(_) => return None,
    };
    state.service(ns, name).cloned()
}
