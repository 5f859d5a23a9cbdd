//! Where a routed request goes within its destination: one `Cluster` per (service, subset, service
//! port), built from the service's endpoints filtered by the DestinationRule subset's labels and
//! running that subset's effective traffic policy — load balancing, connection-pool admission and
//! outlier detection, with Envoy's semantics as Istio programs them.
//!
//! Owns the compiled DestinationRules and the runtime state of every cluster (round-robin cursors,
//! active-request counts, ejections), kept across `Clusters::update` for clusters whose policy and
//! endpoints did not change. Does not own routing (`route` picks the destination), the upstream
//! connections (`upstream`, which reads `Cluster::settings`), or the CRD shape
//! (`crate::crd::networking`).

mod balance;
mod compile;
mod outlier;
mod policy;
mod pool;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::time::Instant;

use crate::state::{Service, State, Workload};
use crate::waypoint::{ConfigError, Outcome, WaypointId};
use balance::{Balancer, Usable};
use outlier::HostOutlier;

pub use policy::{HashSource, HashTable, LbPolicy, OutlierPolicy, Policy, PoolLimits, UpstreamSettings};
pub use pool::{Admission, Overflow, RetryPermit};

/// What a consistent-hash policy may hash, taken from the request.
#[derive(Debug, Clone, Copy)]
pub struct HashKey<'a> {
    pub headers: &'a http::HeaderMap,
    pub source_ip: IpAddr,
    /// The query string without `?`.
    pub query: Option<&'a str>,
}

/// One chosen endpoint. Clones share one active-request count for LEAST_REQUEST: keep it (or a
/// clone) until the response is done, then drop it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    /// Endpoint IP (IPv4 first) and the service port's target port.
    pub addr: SocketAddr,
    /// `Set-Cookie` value for the response when the cluster hashes on a cookie the request did
    /// not carry (`consistentHash.httpCookie` with a `ttl`).
    pub set_cookie: Option<HeaderValue>,
    active: Arc<ActiveRequest>,
}

#[derive(Debug)]
struct ActiveRequest(Arc<Host>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An endpoint as the cluster tracks it; shared by successive versions of a cluster as long as the
/// endpoint stays, so its ejection survives a configuration update.
#[derive(Debug)]
struct Host {
    workload: Arc<Workload>,
    addr: SocketAddr,
    active: AtomicU64,
    outlier: Mutex<HostOutlier>,
}

impl Host {
    fn active(&self) -> u64 {
        self.active.load(Ordering::Acquire)
    }

    fn outlier(&self) -> MutexGuard<'_, HostOutlier> {
        // A panic while holding it leaves plain counters behind: still usable.
        self.outlier.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct HealthySet {
    idx: Vec<u32>,
    mask: Vec<bool>,
    /// The earliest return of an ejected host: the set must be recomputed from then on.
    next_change: Option<Instant>,
}

/// The endpoints of one (service, subset, port) and the policy they run with.
#[derive(Debug)]
pub struct Cluster {
    /// Envoy-style name, `outbound|PORT|SUBSET|HOST`, for logs and the config dump.
    pub name: String,
    /// The DestinationRule the policy came from (`namespace/name`), if any.
    pub origin: Option<String>,
    policy: Policy,
    hosts: Vec<Arc<Host>>,
    balancer: Balancer,
    pool: pool::Pool,
    healthy: ArcSwap<HealthySet>,
    /// Start of the outlier detector's interval timer: hosts come back on its sweeps.
    sweep_origin: Instant,
    eject_lock: Mutex<()>,
    /// Serialises computing and storing the healthy set, so a set computed before an ejection
    /// cannot overwrite one computed after it.
    refresh_lock: Mutex<()>,
    retries: pool::Retries,
}

impl Cluster {
    fn new(name: String, origin: Option<String>, policy: Policy, hosts: Vec<Arc<Host>>, sweep_origin: Instant) -> Self {
        let balancer = Balancer::new(&policy.lb, &hosts);
        let policy_max_retries = policy.upstream.max_retries;
        let pool = pool::Pool::new(policy.pool);
        let empty = HealthySet { idx: Vec::new(), mask: Vec::new(), next_change: None };
        let cluster = Cluster {
            name,
            origin,
            policy,
            hosts,
            balancer,
            pool,
            healthy: ArcSwap::from_pointee(empty),
            sweep_origin,
            eject_lock: Mutex::new(()),
            refresh_lock: Mutex::new(()),
            retries: pool::Retries::new(policy_max_retries),
        };
        cluster.refresh(Instant::now());
        cluster
    }

    /// connectionPool limits: `Err` → the handler answers 503 with response flag `UO`. Waits while
    /// the request is pending for a connection slot; cancel-safe.
    pub async fn admit(&self) -> Result<Admission, Overflow> {
        self.pool.admit(false).await
    }

    /// `admit` for a request that goes upstream over HTTP/2 (`upstream::Protocol::Http2`): many
    /// streams share a connection there, so `maxConnections` and the pending queue do not apply,
    /// only `http2MaxRequests` (as in Envoy's HTTP/2 pool).
    pub async fn admit_multiplexed(&self) -> Result<Admission, Overflow> {
        self.pool.admit(true).await
    }

    /// The DestinationRule's load balancer over the endpoints that are not ejected (all of them
    /// when fewer than `minHealthPercent` are healthy). `None` → 503 `UH` (no healthy upstream).
    pub fn pick(&self, key: &HashKey<'_>) -> Option<Endpoint> {
        let mut set = self.healthy.load();
        if set.next_change.is_some_and(|t| Instant::now() >= t) {
            // Busy: another request is refreshing; this one uses the set it has.
            if let Ok(_refreshing) = self.refresh_lock.try_lock() {
                self.compute_healthy(Instant::now());
            }
            set = self.healthy.load();
        }
        let usable = Usable { idx: &set.idx, mask: &set.mask };
        let (i, set_cookie) = self.balancer.pick(&self.hosts, &usable, key)?;
        let host = self.hosts[i].clone();
        host.active.fetch_add(1, Ordering::AcqRel);
        Some(Endpoint {
            workload: host.workload.clone(),
            addr: host.addr,
            set_cookie,
            active: Arc::new(ActiveRequest(host)),
        })
    }

    /// Feeds outlier detection with how one attempt to `endpoint` ended.
    pub fn report(&self, endpoint: &Endpoint, outcome: &Outcome) {
        let Some(od) = &self.policy.outlier else { return };
        let host = &endpoint.active.0;
        if !self.hosts.iter().any(|h| Arc::ptr_eq(h, host)) {
            return; // picked from an older version of this cluster that no longer has it
        }
        if !host.outlier().record(od, outcome) {
            return;
        }
        let now = Instant::now();
        let _one_at_a_time = self.eject_lock.lock().unwrap_or_else(|e| e.into_inner());
        if host.outlier().is_ejected(now) {
            return;
        }
        let ejected = self.hosts.iter().filter(|h| h.outlier().is_ejected(now)).count();
        // Current Envoy: the ejection must keep the ejected share within maxEjectionPercent; the
        // "at least one host" exception needs `always_eject_one_host`, which Istio does not set.
        let total = self.hosts.len();
        if (ejected + 1) * 100 > od.max_ejection_percent as usize * total {
            tracing::warn!(cluster = %self.name, endpoint = %host.addr, ejected, total,
                max_ejection_percent = od.max_ejection_percent, "outlier not ejected: maxEjectionPercent reached");
            return;
        }
        let until = host.outlier().eject(od, now, self.sweep_origin);
        tracing::info!(cluster = %self.name, endpoint = %host.addr, workload = %host.workload.name,
            ejected_for_ms = until.saturating_duration_since(now).as_millis() as u64, ?outcome, "outlier ejected");
        self.refresh(now);
    }

    /// `connectionPool.http.maxRetries`: retries outstanding to the cluster at once. `None` → do
    /// not retry (Envoy's retry overflow: the last attempt's response stands); keep the permit
    /// until the retry attempt is done.
    pub fn retry_permit(&self) -> Option<RetryPermit> {
        self.retries.take()
    }

    /// Connect timeout, max requests per connection, idle timeout, h2 upgrade, for `upstream`.
    pub fn settings(&self) -> &UpstreamSettings {
        &self.policy.upstream
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// All endpoints, ejected or not (config dump, tests).
    pub fn endpoints(&self) -> Vec<(SocketAddr, Arc<Workload>)> {
        self.hosts.iter().map(|h| (h.addr, h.workload.clone())).collect()
    }

    /// Endpoints currently ejected by outlier detection.
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        self.hosts.iter().filter(|h| h.outlier().is_ejected(now)).map(|h| h.addr).collect()
    }

    /// Requests admitted and not yet finished, and requests waiting for a connection slot.
    pub fn load(&self) -> (u32, u32) {
        (self.pool.active(), self.pool.pending())
    }

    fn refresh(&self, now: Instant) {
        let _refreshing = self.refresh_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.compute_healthy(now);
    }

    fn compute_healthy(&self, now: Instant) {
        let mut idx = Vec::with_capacity(self.hosts.len());
        let mut next_change: Option<Instant> = None;
        for (i, h) in self.hosts.iter().enumerate() {
            let mut o = h.outlier();
            if o.is_ejected(now) {
                let until = o.ejected_until();
                next_change = match (next_change, until) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            } else {
                idx.push(i as u32);
            }
        }
        let min_health = self.policy.outlier.map_or(0, |o| o.min_health_percent as usize);
        // Envoy's panic mode: too few healthy hosts and every host is used again.
        if idx.len() * 100 < min_health * self.hosts.len() {
            idx = (0..self.hosts.len() as u32).collect();
        }
        let mut mask = vec![false; self.hosts.len()];
        for &i in &idx {
            mask[i as usize] = true;
        }
        self.healthy.store(Arc::new(HealthySet { idx, mask, next_change }));
    }
}

/// A DestinationRule compiled for one service: its top-level policy and its subsets.
#[derive(Debug, Clone, PartialEq, Default)]
struct ServiceRules {
    /// `namespace/name` of the DestinationRule.
    origin: String,
    top: Option<policy::PolicyParts>,
    subsets: Vec<Subset>,
}

#[derive(Debug, Clone, PartialEq)]
struct Subset {
    name: String,
    labels: BTreeMap<String, String>,
    policy: Option<policy::PolicyParts>,
}

/// namespace → service name → rules.
type RulesMap = HashMap<String, HashMap<String, Arc<ServiceRules>>>;

#[derive(Debug, Default)]
struct Snapshot {
    rules: RulesMap,
    /// namespace → service name → clusters of that service (few: ports × subsets).
    clusters: HashMap<String, HashMap<String, Vec<Built>>>,
}

#[derive(Debug, Clone)]
struct Built {
    subset: Option<String>,
    port: u16,
    cluster: Arc<Cluster>,
}

/// Every cluster of the waypoint. `Send + Sync`, shared by all requests; reads are lock-free.
#[derive(Debug, Default)]
pub struct Clusters {
    snapshot: ArcSwap<Snapshot>,
    write: Mutex<()>,
}

impl Clusters {
    pub fn new() -> Self {
        Self::default()
    }

    /// (Re)compiles the DestinationRules and the clusters of the services `me` serves (clusters
    /// of other services are built on first use); keeps the runtime state of clusters whose
    /// policy and endpoints did not change, and the ejections of endpoints that stay.
    pub fn update(&self, state: &State, me: &WaypointId) -> Vec<ConfigError> {
        let (rules, errors) = compile::compile(state, me);
        for e in &errors {
            tracing::warn!(error = %e, "DestinationRule left out");
        }
        self.install(state, me, rules);
        errors
    }

    fn install(&self, state: &State, me: &WaypointId, rules: RulesMap) {
        let _writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot.load_full();
        let mut next = Snapshot { rules, clusters: HashMap::new() };
        let mut wanted: Vec<(Arc<Service>, Option<String>, u16)> = Vec::new();
        for svc in unique_services(state) {
            let served = state.waypoint_of(&svc).is_some_and(|w| w.name == me.name && w.namespace == me.namespace);
            let seen: Vec<(Option<String>, u16)> = old
                .clusters
                .get(&svc.namespace)
                .and_then(|m| m.get(&svc.name))
                .map(|v| v.iter().map(|b| (b.subset.clone(), b.port)).collect())
                .unwrap_or_default();
            let mut keys = seen;
            if served {
                let subsets =
                    lookup(&next.rules, &svc.namespace, &svc.name).map(|r| r.subsets.clone()).unwrap_or_default();
                for p in &svc.ports {
                    keys.push((None, p.port));
                    keys.extend(subsets.iter().map(|s| (Some(s.name.clone()), p.port)));
                }
            }
            keys.sort();
            keys.dedup();
            wanted.extend(keys.into_iter().map(|(subset, port)| (svc.clone(), subset, port)));
        }
        for (svc, subset, port) in wanted {
            let previous = find(&old, &svc.namespace, &svc.name, subset.as_deref(), port);
            let built = build(&next.rules, &svc, subset.as_deref(), port, previous);
            next.clusters.entry(svc.namespace.clone()).or_default().entry(svc.name.clone()).or_default().push(built);
        }
        self.snapshot.store(Arc::new(next));
    }

    /// The cluster for a route destination; an unknown subset gives a cluster with no endpoints.
    /// `dialled_port` is the service port the client used, for destinations without a port
    /// (`dest.port == 0`).
    pub fn get(&self, dest: &super::route::Destination, dialled_port: u16) -> Arc<Cluster> {
        let port = if dest.port == 0 { dialled_port } else { dest.port };
        self.get_for(&dest.service, dest.subset.as_deref(), port)
    }

    /// Every cluster built so far, by name (config dump).
    pub fn all(&self) -> Vec<Arc<Cluster>> {
        let snap = self.snapshot.load();
        let mut out: Vec<Arc<Cluster>> =
            snap.clusters.values().flat_map(|m| m.values()).flatten().map(|b| b.cluster.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// `get` by parts: the service, the DestinationRule subset name and the service port.
    pub fn get_for(&self, service: &Arc<Service>, subset: Option<&str>, port: u16) -> Arc<Cluster> {
        if let Some(b) = find(&self.snapshot.load(), &service.namespace, &service.name, subset, port) {
            return b.cluster.clone();
        }
        let _writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.snapshot.load_full();
        if let Some(b) = find(&current, &service.namespace, &service.name, subset, port) {
            return b.cluster.clone();
        }
        let built = build(&current.rules, service, subset, port, None);
        let cluster = built.cluster.clone();
        let mut clusters = current.clusters.clone();
        clusters.entry(service.namespace.clone()).or_default().entry(service.name.clone()).or_default().push(built);
        self.snapshot.store(Arc::new(Snapshot { rules: current.rules.clone(), clusters }));
        cluster
    }
}

fn unique_services(state: &State) -> Vec<Arc<Service>> {
    let mut by_name: BTreeMap<(&str, &str), &Arc<Service>> = BTreeMap::new();
    for s in state.services_by_vip.values() {
        by_name.entry((s.namespace.as_str(), s.name.as_str())).or_insert(s);
    }
    by_name.into_values().cloned().collect()
}

fn lookup<'a>(rules: &'a RulesMap, namespace: &str, name: &str) -> Option<&'a Arc<ServiceRules>> {
    rules.get(namespace)?.get(name)
}

fn find<'a>(snap: &'a Snapshot, namespace: &str, name: &str, subset: Option<&str>, port: u16) -> Option<&'a Built> {
    snap.clusters.get(namespace)?.get(name)?.iter().find(|b| b.port == port && b.subset.as_deref() == subset)
}

/// The endpoint address a cluster dials: IPv4 first, then the first address.
fn endpoint_addr(w: &Workload, target_port: u16) -> Option<SocketAddr> {
    let ip = w.ips.iter().find(|ip| ip.is_ipv4()).or(w.ips.first())?;
    Some(SocketAddr::new(*ip, target_port))
}

fn build(rules: &RulesMap, svc: &Arc<Service>, subset: Option<&str>, port: u16, previous: Option<&Built>) -> Built {
    let r = lookup(rules, &svc.namespace, &svc.name);
    let chosen = subset.map(|name| r.and_then(|r| r.subsets.iter().find(|s| s.name == name)));
    let policy = policy::PolicyParts::effective(
        r.and_then(|r| r.top.as_ref()),
        chosen.flatten().and_then(|s| s.policy.as_ref()),
        port,
    );
    let target = svc.target_port(port).unwrap_or_else(|| {
        tracing::debug!(service = %svc.hostname(), port, "port not on the service: dialling the same port on endpoints");
        port
    });
    let members: Vec<(SocketAddr, &Arc<Workload>)> = match chosen {
        Some(None) => Vec::new(), // unknown subset: no endpoints, 503 UH
        Some(Some(s)) => svc
            .endpoints
            .iter()
            .filter(|w| s.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .filter_map(|w| Some((endpoint_addr(w, target)?, w)))
            .collect(),
        None => svc.endpoints.iter().filter_map(|w| Some((endpoint_addr(w, target)?, w))).collect(),
    };
    let origin = r.map(|r| r.origin.clone());
    let name = format!("outbound|{port}|{}|{}", subset.unwrap_or(""), svc.hostname());
    if let Some(prev) = previous {
        let same_hosts = prev.cluster.hosts.len() == members.len()
            && prev.cluster.hosts.iter().zip(&members).all(|(h, (a, w))| h.addr == *a && *h.workload == ***w);
        if same_hosts && prev.cluster.policy == policy && prev.cluster.origin == origin {
            return Built { subset: subset.map(str::to_owned), port, cluster: prev.cluster.clone() };
        }
    }
    let hosts: Vec<Arc<Host>> = members
        .into_iter()
        .map(|(addr, w)| {
            let kept = previous.and_then(|p| p.cluster.hosts.iter().find(|h| h.addr == addr && *h.workload == **w));
            kept.cloned().unwrap_or_else(|| {
                Arc::new(Host { workload: w.clone(), addr, active: AtomicU64::new(0), outlier: Mutex::default() })
            })
        })
        .collect();
    let origin_time = previous.map_or_else(Instant::now, |p| p.cluster.sweep_origin);
    let cluster = Arc::new(Cluster::new(name, origin, policy, hosts, origin_time));
    Built { subset: subset.map(str::to_owned), port, cluster }
}
