//! DestinationRules → per-service `ServiceRules`: which rule applies to which service, subsets and
//! their labels, and each `trafficPolicy` compiled into `PolicyParts` with errors naming the field.
//!
//! Owns the selection (Istio's: exact host before wildcard, the waypoint's namespace, then the
//! service's, then others; older first; rules for the same host in one namespace are merged) and
//! the validation. A bad field leaves out its field group (e.g. the whole `outlierDetection`
//! block) and is reported; the rest of the rule applies. Does not own the CRD shape
//! (`crate::crd::networking`) or what the compiled policy does at runtime.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::policy::{
    DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_RING_SIZE, HashSource, HashTable, LbPolicy, OutlierPolicy, PolicyParts,
    PoolLimits, UpstreamSettings,
};
use super::{RulesMap, ServiceRules, Subset};
use crate::crd::DestinationRule;
use crate::crd::networking::{
    ConnectionPoolSettings, H2UpgradePolicy, LoadBalancerSettings, OutlierDetection, SimpleLb, TrafficPolicy,
};
use crate::state::State;
use crate::waypoint::{ConfigError, WaypointId};

const KIND: &str = "DestinationRule";
const DOMAIN: &str = "svc.cluster.local";

/// Collects errors for one DestinationRule.
struct Errors<'a> {
    namespace: &'a str,
    name: &'a str,
    out: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.out.push(ConfigError {
            kind: KIND,
            namespace: self.namespace.to_owned(),
            name: self.name.to_owned(),
            field: field.into(),
            reason: reason.into(),
        });
    }
}

/// A rule compiled on its own, before it is matched to services.
struct Compiled {
    namespace: String,
    name: String,
    /// The host as an FQDN (`*` or `*.suffix` for wildcards).
    host: String,
    created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    rules: ServiceRules,
}

pub(super) fn compile(state: &State, me: &WaypointId) -> (RulesMap, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let mut compiled = Vec::new();
    for dr in &state.routing.destination_rules {
        let namespace = dr.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
        let name = dr.metadata.name.clone().unwrap_or_default();
        if dr.spec.workload_selector.is_some() {
            // Istio applies those to the selected sidecars only, never to waypoints.
            tracing::debug!(%namespace, %name, "DestinationRule with workloadSelector ignored by the waypoint");
            continue;
        }
        let mut errs = Errors { namespace: &namespace, name: &name, out: Vec::new() };
        let c = compile_one(dr, &namespace, &name, &mut errs);
        errors.append(&mut errs.out);
        compiled.extend(c);
    }
    let mut rules: RulesMap = HashMap::new();
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for svc in state.services_by_vip.values() {
        if !seen.insert((svc.namespace.as_str(), svc.name.as_str())) {
            continue;
        }
        let fqdn = svc.hostname();
        let mut candidates: Vec<&Compiled> = compiled.iter().filter(|c| host_matches(&c.host, &fqdn)).collect();
        if candidates.is_empty() {
            continue;
        }
        let rank = |c: &Compiled| {
            let exact = if c.host == fqdn { 0 } else { 1 };
            let ns = if c.namespace == me.namespace {
                0
            } else if c.namespace == svc.namespace {
                1
            } else {
                2
            };
            (
                exact,
                std::cmp::Reverse(c.host.len()),
                ns,
                c.created.is_none(),
                c.created.clone(),
                c.namespace.clone(),
                c.name.clone(),
            )
        };
        candidates.sort_by_key(|c| rank(c));
        let best = candidates[0];
        let mut merged = best.rules.clone();
        // Istio merges rules for the same host in the same namespace: the first one's policy wins,
        // the others add subsets whose names are new.
        for other in candidates.iter().skip(1).filter(|c| c.host == best.host && c.namespace == best.namespace) {
            for s in &other.rules.subsets {
                if merged.subsets.iter().any(|m| m.name == s.name) {
                    tracing::warn!(service = %fqdn, subset = %s.name, rule = %other.rules.origin, kept = %best.rules.origin,
                        "subset defined by two DestinationRules for one host; the older rule's is used");
                } else {
                    merged.subsets.push(s.clone());
                }
            }
        }
        rules.entry(svc.namespace.clone()).or_default().insert(svc.name.clone(), Arc::new(merged));
    }
    (rules, errors)
}

/// `*` matches every host; `*.x` every host ending in `.x`.
fn host_matches(pattern: &str, fqdn: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => fqdn.ends_with(suffix) && suffix.starts_with('.'),
        None => pattern == fqdn,
    }
}

fn compile_one(dr: &DestinationRule, namespace: &str, name: &str, errs: &mut Errors<'_>) -> Option<Compiled> {
    let host = dr.spec.host.trim();
    if host.is_empty() {
        errs.push("spec.host", "empty host; name a service (`reviews` or `reviews.NS.svc.cluster.local`)");
        return None;
    }
    // Istio resolves a short name in the rule's namespace; anything with a dot is taken as is.
    let host = if host.contains('.') || host == "*" { host.to_owned() } else { format!("{host}.{namespace}.{DOMAIN}") };
    let top = dr.spec.traffic_policy.as_ref().map(|tp| parts(tp, "spec.trafficPolicy", true, errs));
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in dr.spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            errs.push(format!("{field}.name"), "empty subset name; routes refer to subsets by name");
            continue;
        }
        if subsets.iter().any(|x| x.name == s.name) {
            errs.push(format!("{field}.name"), format!("duplicate subset name {:?}; the first one is used", s.name));
            continue;
        }
        let policy = s.traffic_policy.as_ref().map(|tp| parts(tp, &format!("{field}.trafficPolicy"), true, errs));
        subsets.push(Subset { name: s.name.clone(), labels: s.labels.clone(), policy });
    }
    let created = dr.metadata.creation_timestamp.clone();
    let rules = ServiceRules { origin: format!("{namespace}/{name}"), top, subsets };
    Some(Compiled { namespace: namespace.to_owned(), name: name.to_owned(), host, created, rules })
}

fn parts(tp: &TrafficPolicy, field: &str, with_ports: bool, errs: &mut Errors<'_>) -> PolicyParts {
    let mut out = PolicyParts {
        lb: tp.load_balancer.as_ref().and_then(|lb| load_balancer(lb, &format!("{field}.loadBalancer"), errs)),
        pool: tp.connection_pool.as_ref().and_then(|p| pool(p, &format!("{field}.connectionPool"), errs)),
        outlier: tp.outlier_detection.as_ref().and_then(|o| outlier(o, &format!("{field}.outlierDetection"), errs)),
        ports: Vec::new(),
    };
    if !with_ports {
        return out;
    }
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let f = format!("{field}.portLevelSettings[{i}]");
        let port = match p.port.as_ref().and_then(|s| s.number) {
            Some(n) if (1..=65535).contains(&n) => n as u16,
            other => {
                errs.push(
                    format!("{f}.port.number"),
                    format!("{other:?} is not a port number (1-65535); the entry is ignored"),
                );
                continue;
            }
        };
        if out.ports.iter().any(|(n, _)| *n == port) {
            errs.push(format!("{f}.port.number"), format!("port {port} listed twice; the first entry is used"));
            continue;
        }
        let tp = TrafficPolicy {
            load_balancer: p.load_balancer.clone(),
            connection_pool: p.connection_pool.clone(),
            outlier_detection: p.outlier_detection.clone(),
            ..TrafficPolicy::default()
        };
        out.ports.push((port, parts(&tp, &f, false, errs)));
    }
    out
}

fn duration(value: Option<&String>, field: &str, errs: &mut Errors<'_>) -> Result<Option<Duration>, ()> {
    match value.map(|v| crate::crd::duration::parse(v)) {
        None => Ok(None),
        Some(Ok(d)) => Ok(Some(d)),
        Some(Err(e)) => {
            errs.push(field, e);
            Err(())
        }
    }
}

/// A non-negative count; `Err` (reported) when negative or too large.
fn count(value: Option<i64>, field: &str, max: i64, errs: &mut Errors<'_>) -> Result<Option<u32>, ()> {
    match value {
        None => Ok(None),
        Some(v) if (0..=max).contains(&v) => Ok(Some(v as u32)),
        Some(v) => {
            errs.push(field, format!("{v} is out of range (0-{max})"));
            Err(())
        }
    }
}

fn load_balancer(lb: &LoadBalancerSettings, field: &str, errs: &mut Errors<'_>) -> Option<LbPolicy> {
    let ignored = "; the loadBalancer block is ignored";
    match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => {
            errs.push(field, format!("set either simple or consistentHash, not both{ignored}"));
            None
        }
        (Some(SimpleLb::Passthrough), None) => {
            errs.push(format!("{field}.simple"), format!("PASSTHROUGH is not supported by a waypoint{ignored}"));
            None
        }
        (Some(SimpleLb::RoundRobin), None) => Some(LbPolicy::RoundRobin),
        (Some(SimpleLb::Random), None) => Some(LbPolicy::Random),
        (Some(SimpleLb::LeastConn | SimpleLb::LeastRequest), None) => Some(LbPolicy::LeastRequest),
        (Some(SimpleLb::Unspecified), None) | (None, None) => None,
        (None, Some(ch)) => {
            let f = format!("{field}.consistentHash");
            let mut sources = Vec::new();
            if let Some(h) = &ch.http_header_name {
                match http::HeaderName::from_bytes(h.as_bytes()) {
                    Ok(n) => sources.push(HashSource::Header(n)),
                    Err(_) => {
                        errs.push(format!("{f}.httpHeaderName"), format!("{h:?} is not a valid header name{ignored}"));
                        return None;
                    }
                }
            }
            if let Some(c) = &ch.http_cookie {
                if c.name.is_empty() {
                    errs.push(format!("{f}.httpCookie.name"), format!("empty cookie name{ignored}"));
                    return None;
                }
                let ttl = duration(c.ttl.as_ref(), &format!("{f}.httpCookie.ttl"), errs).ok()?;
                sources.push(HashSource::Cookie { name: c.name.clone(), path: c.path.clone(), ttl });
            }
            if ch.use_source_ip == Some(true) {
                sources.push(HashSource::SourceIp);
            }
            if let Some(q) = &ch.http_query_parameter_name {
                sources.push(HashSource::QueryParameter(q.clone()));
            }
            if sources.len() != 1 {
                errs.push(
                    f,
                    format!(
                        "set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName (found {}){ignored}",
                        sources.len()
                    ),
                );
                return None;
            }
            let number =
                |v: &Option<serde_json::Value>, key: &str| v.as_ref().and_then(|j| j.get(key)).and_then(|n| n.as_u64());
            let table = if ch.maglev.is_some() {
                let size = number(&ch.maglev, "tableSize").map_or(DEFAULT_MAGLEV_TABLE_SIZE, |n| n as usize);
                if !is_prime(size) || size > 5_000_011 {
                    errs.push(
                        format!("{f}.maglev.tableSize"),
                        format!("{size} must be a prime up to 5000011{ignored}"),
                    );
                    return None;
                }
                HashTable::Maglev { table_size: size }
            } else {
                let size = number(&ch.ring_hash, "minimumRingSize")
                    .or(ch.minimum_ring_size)
                    .map_or(DEFAULT_RING_SIZE, |n| n as usize);
                HashTable::Ring { minimum_size: size.clamp(1, 8 * 1024 * 1024) }
            };
            Some(LbPolicy::ConsistentHash { source: sources.remove(0), table })
        }
    }
}

fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

fn pool(p: &ConnectionPoolSettings, field: &str, errs: &mut Errors<'_>) -> Option<(PoolLimits, UpstreamSettings)> {
    let before = errs.out.len();
    let mut limits = PoolLimits::default();
    let mut up = UpstreamSettings::default();
    let max = i32::MAX as i64;
    // Istio leaves a limit at "unlimited" when it is unset or zero.
    let limit = |v: Option<u32>| v.filter(|&n| n > 0);
    if let Some(tcp) = &p.tcp {
        let f = format!("{field}.tcp");
        if let Ok(Some(n)) =
            count(tcp.max_connections.map(i64::from), &format!("{f}.maxConnections"), max, errs).map(limit)
        {
            limits.max_connections = n;
        }
        if let Ok(Some(d)) = duration(tcp.connect_timeout.as_ref(), &format!("{f}.connectTimeout"), errs) {
            if d.is_zero() {
                errs.push(format!("{f}.connectTimeout"), "must be greater than zero");
            } else {
                up.connect_timeout = d;
            }
        }
    }
    if let Some(h) = &p.http {
        let f = format!("{field}.http");
        if let Ok(Some(n)) =
            count(h.http1_max_pending_requests.map(i64::from), &format!("{f}.http1MaxPendingRequests"), max, errs)
                .map(limit)
        {
            limits.max_pending = n;
        }
        if let Ok(Some(n)) =
            count(h.http2_max_requests.map(i64::from), &format!("{f}.http2MaxRequests"), max, errs).map(limit)
        {
            limits.max_requests = n;
        }
        if let Ok(n) =
            count(h.max_requests_per_connection.map(i64::from), &format!("{f}.maxRequestsPerConnection"), max, errs)
        {
            up.max_requests_per_connection = limit(n);
        }
        if let Ok(n) = count(h.max_retries.map(i64::from), &format!("{f}.maxRetries"), max, errs) {
            up.max_retries = limit(n);
        }
        if let Ok(Some(d)) = duration(h.idle_timeout.as_ref(), &format!("{f}.idleTimeout"), errs) {
            up.idle_timeout = d;
        }
        up.h2_upgrade = h.h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade);
    }
    (errs.out.len() == before).then_some((limits, up)).or_else(|| {
        if let Some(e) = errs.out.last_mut() {
            e.reason.push_str("; the connectionPool block is ignored");
        }
        None
    })
}

fn outlier(o: &OutlierDetection, field: &str, errs: &mut Errors<'_>) -> Option<OutlierPolicy> {
    let before = errs.out.len();
    let mut p = OutlierPolicy::default();
    // The deprecated `consecutiveErrors` only ever counted gateway errors (istio/api#617): Istio
    // turns it into the gateway detector and switches the 5xx one off unless set explicitly.
    if let Ok(Some(n @ 1..)) = count(o.consecutive_errors, &format!("{field}.consecutiveErrors"), u32::MAX as i64, errs)
    {
        p.consecutive_gateway = n;
        p.consecutive_5xx = 0;
    }
    if let Ok(Some(n)) =
        count(o.consecutive_5xx_errors, &format!("{field}.consecutive5xxErrors"), u32::MAX as i64, errs)
    {
        p.consecutive_5xx = n;
    }
    if let Ok(Some(n)) =
        count(o.consecutive_gateway_errors, &format!("{field}.consecutiveGatewayErrors"), u32::MAX as i64, errs)
    {
        p.consecutive_gateway = n;
    }
    for (value, name, slot) in [
        (o.interval.as_ref(), "interval", &mut p.interval),
        (o.base_ejection_time.as_ref(), "baseEjectionTime", &mut p.base_ejection_time),
    ] {
        if let Ok(Some(d)) = duration(value, &format!("{field}.{name}"), errs) {
            if d < Duration::from_millis(1) {
                errs.push(format!("{field}.{name}"), "must be at least 1ms");
            } else {
                *slot = d;
            }
        }
    }
    // Istio keeps Envoy's 10% when maxEjectionPercent is 0 or unset.
    if let Ok(Some(n @ 1..)) =
        count(o.max_ejection_percent.map(i64::from), &format!("{field}.maxEjectionPercent"), 100, errs)
    {
        p.max_ejection_percent = n;
    }
    if let Ok(Some(n)) = count(o.min_health_percent.map(i64::from), &format!("{field}.minHealthPercent"), 100, errs) {
        p.min_health_percent = n;
    }
    if o.split_external_local_origin_errors == Some(true) {
        tracing::debug!(field, "splitExternalLocalOriginErrors is not supported: local-origin failures count as 5xx");
    }
    if errs.out.len() != before {
        if let Some(e) = errs.out.last_mut() {
            e.reason.push_str("; the outlierDetection block is ignored");
        }
        return None;
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{RoutingConfig, Service, ServicePort, USE_WAYPOINT_LABEL};

    fn dr(yaml: &str) -> DestinationRule {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("test YAML: {e}\n{yaml}"))
    }

    fn svc(ns: &str, name: &str, vip: &str) -> Arc<Service> {
        Arc::new(Service {
            name: name.into(),
            namespace: ns.into(),
            vips: vec![vip.parse().unwrap()],
            ports: vec![ServicePort { name: None, port: 9080, target_port: 9080, app_protocol: None }],
            labels: [(USE_WAYPOINT_LABEL.to_string(), "waypoint".to_string())].into(),
            endpoints: Vec::new(),
        })
    }

    fn state(rules: Vec<DestinationRule>) -> State {
        let services = [
            svc("demo", "reviews", "10.96.0.1"),
            svc("demo", "ratings", "10.96.0.2"),
            svc("other", "reviews", "10.96.0.3"),
        ];
        State {
            services_by_vip: services.into_iter().map(|s| (s.vips[0], s)).collect(),
            routing: Arc::new(RoutingConfig { destination_rules: rules, ..RoutingConfig::default() }),
            ..State::default()
        }
    }

    fn me() -> WaypointId {
        WaypointId { namespace: "demo".into(), name: "waypoint".into() }
    }

    const FULL: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {maxConnections: 1, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 1, http2MaxRequests: 10, maxRequestsPerConnection: 1, idleTimeout: 30s, h2UpgradePolicy: UPGRADE}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer:
        consistentHash: {httpCookie: {name: user, ttl: 0s}}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
"#;

    #[test]
    fn istio_circuit_breaker_rule_compiles_with_every_field() {
        let (rules, errors) = compile(&state(vec![dr(FULL)]), &me());
        assert_eq!(errors, []);
        let r = &rules["demo"]["reviews"];
        assert_eq!(r.origin, "demo/reviews");
        assert_eq!(r.subsets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["v1", "v2"]);
        assert_eq!(r.subsets[0].labels, BTreeMap::from([("version".to_string(), "v1".to_string())]));
        let top = r.top.as_ref().unwrap();
        let (pool, up) = top.pool.unwrap();
        assert_eq!(pool, PoolLimits { max_requests: 10, max_connections: 1, max_pending: 1 });
        assert_eq!(up.connect_timeout, Duration::from_millis(250));
        assert_eq!(up.max_requests_per_connection, Some(1));
        assert_eq!(up.idle_timeout, Duration::from_secs(30));
        assert!(up.h2_upgrade);
        let od = top.outlier.unwrap();
        assert_eq!(
            (od.consecutive_5xx, od.interval, od.base_ejection_time, od.max_ejection_percent),
            (1, Duration::from_secs(1), Duration::from_secs(180), 100)
        );
        // Port 9080 replaces every group: cookie hash, default pool, no outlier detection.
        let p = PolicyParts::effective(Some(top), None, 9080);
        assert!(
            matches!(&p.lb, LbPolicy::ConsistentHash { source: HashSource::Cookie { name, ttl: Some(t), .. }, .. } if name == "user" && t.is_zero())
        );
        assert!(p.outlier.is_none());
        let p = PolicyParts::effective(Some(top), r.subsets[1].policy.as_ref(), 80);
        assert_eq!((p.lb, p.pool.max_connections), (LbPolicy::Random, 1));
        // Only the service the short host names in the rule's namespace.
        assert!(!rules.contains_key("other"));
        assert!(!rules["demo"].contains_key("ratings"));
    }

    #[test]
    fn bad_fields_are_reported_by_path_and_only_their_block_is_dropped() {
        let bad = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bad, namespace: demo}
spec:
  host: reviews.demo.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}
    connectionPool: {http: {http2MaxRequests: -1}}
    outlierDetection: {baseEjectionTime: soon, maxEjectionPercent: 150}
    portLevelSettings:
    - port: {number: 70000}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: "bad header", useSourceIp: true}}
  - name: v1
    labels: {version: v1-again}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {tcp: {connectTimeout: 1x}}
"#;
        let (rules, errors) = compile(&state(vec![dr(bad)]), &me());
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.trafficPolicy.loadBalancer",
                "spec.trafficPolicy.connectionPool.http.http2MaxRequests",
                "spec.trafficPolicy.outlierDetection.baseEjectionTime",
                "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
                "spec.trafficPolicy.portLevelSettings[0].port.number",
                "spec.subsets[0].trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
                "spec.subsets[1].name",
                "spec.subsets[2].trafficPolicy.connectionPool.tcp.connectTimeout",
            ],
            "{errors:#?}"
        );
        assert!(errors.iter().all(|e| e.kind == "DestinationRule" && e.namespace == "demo" && e.name == "bad"));
        assert!(
            errors[1].reason.contains("-1") && errors[1].reason.ends_with("the connectionPool block is ignored"),
            "{}",
            errors[1].reason
        );
        assert!(errors[6].reason.contains("duplicate subset name \"v1\""));
        let r = &rules["demo"]["reviews"];
        assert_eq!(r.subsets.len(), 2, "the duplicate is left out, the rest serves");
        assert_eq!(r.subsets[0].labels["version"], "v1");
        let top = r.top.as_ref().unwrap();
        assert_eq!((top.lb.clone(), top.pool, top.outlier, top.ports.len()), (None, None, None, 0));
    }

    #[test]
    fn outlier_defaults_and_the_deprecated_consecutive_errors() {
        let mut errs = Errors { namespace: "demo", name: "x", out: Vec::new() };
        let empty = outlier(&OutlierDetection::default(), "f", &mut errs).unwrap();
        assert_eq!(empty, OutlierPolicy::default());
        assert_eq!((empty.consecutive_5xx, empty.consecutive_gateway, empty.max_ejection_percent), (5, 0, 10));
        let old = OutlierDetection { consecutive_errors: Some(3), max_ejection_percent: Some(0), ..Default::default() };
        let p = outlier(&old, "f", &mut errs).unwrap();
        assert_eq!((p.consecutive_5xx, p.consecutive_gateway, p.max_ejection_percent), (0, 3, 10));
        let both =
            OutlierDetection { consecutive_errors: Some(3), consecutive_5xx_errors: Some(7), ..Default::default() };
        assert_eq!(outlier(&both, "f", &mut errs).unwrap().consecutive_5xx, 7);
        assert_eq!(errs.out, []);
    }

    #[test]
    fn selection_prefers_exact_hosts_and_merges_same_host_rules() {
        let wildcard = dr(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: all, namespace: demo}
spec:
  host: "*.demo.svc.cluster.local"
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
"#);
        let exact = dr(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: demo}
spec:
  host: ratings.demo.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets: [{name: v1, labels: {version: v1}}]
"#);
        let more = dr(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings-more, namespace: demo}
spec:
  host: ratings
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets: [{name: v1, labels: {version: other}}, {name: v2, labels: {version: v2}}]
"#);
        let sidecar_only = dr(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: sidecar, namespace: other}
spec:
  host: reviews
  workloadSelector: {matchLabels: {app: x}}
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
"#);
        let (rules, errors) = compile(&state(vec![wildcard, more, exact, sidecar_only]), &me());
        assert_eq!(errors, []);
        assert_eq!(rules["demo"]["reviews"].origin, "demo/all", "wildcard covers the service without its own rule");
        let ratings = &rules["demo"]["ratings"];
        // Same host, same namespace, no timestamps: name order decides the first ("ratings").
        assert_eq!(ratings.origin, "demo/ratings");
        assert_eq!(ratings.top.as_ref().unwrap().lb, Some(LbPolicy::RoundRobin));
        let subsets: Vec<(&str, &str)> =
            ratings.subsets.iter().map(|s| (s.name.as_str(), s.labels["version"].as_str())).collect();
        assert_eq!(subsets, [("v1", "v1"), ("v2", "v2")], "v2 merged in, the second v1 ignored");
        assert!(!rules.contains_key("other"), "workloadSelector rules are for sidecars");
    }

    #[test]
    fn update_compiles_from_state_and_reports_errors() {
        let bad = dr(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}
  subsets: [{name: v1, labels: {version: v1}}]
"#);
        let s = state(vec![bad]);
        let clusters = super::super::Clusters::new();
        let errors = clusters.update(&s, &me());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "spec.trafficPolicy.loadBalancer.simple");
        assert!(
            errors[0]
                .to_string()
                .starts_with("DestinationRule demo/reviews: spec.trafficPolicy.loadBalancer.simple: PASSTHROUGH")
        );
        let reviews = s.service("demo", "reviews").unwrap().clone();
        let c = clusters.get_for(&reviews, Some("v1"), 9080);
        assert_eq!(c.name, "outbound|9080|v1|reviews.demo.svc.cluster.local");
        assert_eq!(c.policy().lb, LbPolicy::LeastRequest, "bad loadBalancer falls back to the default");
    }
}
