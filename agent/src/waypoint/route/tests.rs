//! Routing tests: the request → expected table (`cases`), its in-process driver, weighted picks, bad
//! input and compiled defaults.
//!
//! The table (`scenarios()`, `world()`, `Case`, `Expect`) is `pub(crate)` so the waypoint's server
//! tests can drive the same cases through real HTTP: `simulate` below is the reference of what the
//! handler does with a route (CORS preflight → 100%/0% fault abort → redirect / direct response →
//! rewrite + header operations → pick with `roll` → response header operations + CORS).

pub(crate) mod cases;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use cases::{Case, scenarios};

use super::*;
use crate::crd::gateway::HTTPRoute;
use crate::crd::networking::{DestinationRule, VirtualService};
use crate::identity::Identity;
use crate::state::{RoutingConfig, ServicePort, State, Workload};
use crate::waypoint::WaypointId;

/// The waypoint every scenario is built for.
pub(crate) fn me() -> WaypointId {
    WaypointId { namespace: "demo".into(), name: "waypoint".into() }
}

/// Services of the test mesh: `(namespace, name, ports)`. Namespace `demo` uses the waypoint
/// `demo/waypoint`; `other` does not; `demo/optout` opts out.
pub(crate) const SERVICES: &[(&str, &str, &[u16])] = &[
    ("demo", "waypoint", &[15008]),
    ("demo", "reviews", &[9080]),
    ("demo", "ratings", &[9080]),
    ("demo", "productpage", &[9080]),
    ("demo", "details", &[9080]),
    ("demo", "web", &[80, 8080]),
    ("demo", "api", &[80]),
    ("demo", "echo", &[80, 8080]),
    ("demo", "b1", &[80]),
    ("demo", "b2", &[80]),
    ("demo", "b3", &[80]),
    ("demo", "b4", &[80]),
    ("demo", "b5", &[80]),
    ("demo", "b6", &[80]),
    ("demo", "gw1", &[80]),
    ("demo", "gw2", &[80]),
    ("demo", "optout", &[80]),
    ("other", "foo", &[80]),
];

/// The test mesh with the routing resources of `yaml` (multi-document: VirtualService,
/// DestinationRule, HTTPRoute). Every service has one endpoint `NAME-0` (labels `app: NAME`), plus one
/// endpoint `NAME-SUBSET` per DestinationRule subset naming it (the subset's labels), so a real
/// upstream can tell which subset served a request (by workload name).
pub(crate) fn world(yaml: &str) -> State {
    let routing = parse_routing(yaml);
    let mut state = State::default();
    state.namespaces.insert(
        "demo".into(),
        BTreeMap::from([
            ("istio.io/dataplane-mode".into(), "ambient".into()),
            (crate::state::USE_WAYPOINT_LABEL.into(), "waypoint".into()),
        ]),
    );
    state.namespaces.insert("other".into(), BTreeMap::new());
    let mut next_ip = 0u16;
    for (i, (ns, name, ports)) in SERVICES.iter().enumerate() {
        let mut labels = BTreeMap::new();
        if *name == "optout" {
            labels.insert(crate::state::USE_WAYPOINT_LABEL.to_owned(), "none".to_owned());
        }
        let mut pods = vec![(format!("{name}-0"), BTreeMap::new())];
        for dr in &routing.destination_rules {
            let dr_ns = dr.metadata.namespace.as_deref().unwrap_or("default");
            let host = HostPattern::parse(&dr.spec.host, dr_ns);
            if host == HostPattern::Exact(format!("{name}.{ns}.{CLUSTER_DOMAIN}")) {
                pods.extend(dr.spec.subsets.iter().map(|s| (format!("{name}-{}", s.name), s.labels.clone())));
            }
        }
        let mut endpoints = Vec::new();
        for (pod, mut pod_labels) in pods {
            next_ip += 1;
            pod_labels.insert("app".into(), (*name).into());
            let ep = Arc::new(Workload {
                name: pod,
                namespace: (*ns).into(),
                service_account: (*name).into(),
                labels: Arc::new(pod_labels),
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, 1, (next_ip >> 8) as u8, next_ip as u8))],
                node: None,
                uid: None,
                netns: None,
                captured: true,
                identity: Identity::new("cluster.local", *ns, *name),
                workload_name: (*name).into(),
            });
            state.workloads_by_ip.insert(ep.ips[0], ep.clone());
            endpoints.push(ep);
        }
        let vip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1));
        let svc = Service {
            name: (*name).into(),
            namespace: (*ns).into(),
            vips: vec![vip],
            ports: ports
                .iter()
                .map(|p| ServicePort { name: None, port: *p, target_port: *p, app_protocol: None })
                .collect(),
            labels,
            endpoints,
        };
        state.services_by_vip.insert(vip, Arc::new(svc));
    }
    state.routing = Arc::new(routing);
    state
}

fn parse_routing(yaml: &str) -> RoutingConfig {
    fn parse<T: serde::de::DeserializeOwned>(v: serde_yaml_ng::Value, i: usize, kind: &str) -> T {
        serde_yaml_ng::from_value(v).unwrap_or_else(|e| panic!("doc {i} ({kind}): {e}"))
    }
    let mut routing = RoutingConfig::default();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("doc {i}: {e}"));
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "VirtualService" => routing.virtual_services.push(parse::<VirtualService>(v, i, &kind)),
            "DestinationRule" => routing.destination_rules.push(parse::<DestinationRule>(v, i, &kind)),
            "HTTPRoute" => routing.http_routes.push(parse::<HTTPRoute>(v, i, &kind)),
            other => panic!("doc {i}: unexpected kind {other:?}"),
        }
    }
    routing
}

#[test]
fn world_has_an_endpoint_per_subset() {
    let state = world(cases::BOOKINFO);
    let reviews = state.service("demo", "reviews").unwrap();
    let names: Vec<&str> = reviews.endpoints.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["reviews-0", "reviews-v1", "reviews-v2", "reviews-v3"]);
    assert_eq!(reviews.endpoints[2].labels.get("version").map(String::as_str), Some("v2"));
    assert_eq!(state.workloads_by_ip.len(), state.services_by_vip.values().map(|s| s.endpoints.len()).sum::<usize>());
}

/// What a request came to, as the handler would produce it.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    pub status: u16,
    /// `ns/name`, subset, service port.
    pub backend: Option<(String, Option<String>, u16)>,
    pub location: Option<String>,
    /// Upstream path-and-query and `Host` after rewrites.
    pub path: Option<String>,
    pub authority: Option<String>,
    pub request_headers: HeaderMap,
    pub response_headers: HeaderMap,
}

fn service_key(s: &str) -> (&str, &str) {
    s.split_once('/').unwrap_or(("demo", s))
}

/// Runs `case` through `table` the way the handler does (see the module doc).
pub(crate) fn simulate(table: &RouteTable, state: &State, case: &Case) -> Observed {
    let (ns, name) = service_key(case.service);
    let mut obs = Observed::default();
    let Some(svc) = state.service(ns, name) else {
        obs.status = 404;
        return obs;
    };
    let port = if case.port == 0 { svc.ports[0].port } else { case.port };
    let authority = case.authority.map(str::to_owned).unwrap_or_else(|| svc.name.clone());
    let mut headers = HeaderMap::new();
    for (k, v) in &case.headers {
        headers.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    let method = Method::from_bytes(case.method.as_bytes()).unwrap();
    let labels: BTreeMap<String, String> = case.source_labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
    let info = RequestInfo {
        service: svc,
        port,
        method: &method,
        scheme: case.scheme,
        authority: &authority,
        path_and_query: case.path,
        headers: &headers,
        source_namespace: case.source_namespace,
        source_labels: (!labels.is_empty()).then_some(&labels),
    };
    let Some(route) = table.route(&info) else {
        obs.status = 404;
        return obs;
    };
    let mut req = http::Request::builder().method(method.clone()).uri(case.path).body(()).unwrap();
    *req.headers_mut() = headers.clone();
    req.headers_mut().insert(http::header::HOST, HeaderValue::from_str(&authority).unwrap());
    let (mut parts, ()) = req.into_parts();
    if let Some(cors) = &route.cors
        && let Some(resp) = cors.preflight(&parts)
    {
        obs.status = resp.status().as_u16();
        obs.response_headers = resp.headers().clone();
        return obs;
    }
    if let Some((status, pct)) = route.fault.as_ref().and_then(|f| f.abort)
        && pct >= 100.0
    {
        obs.status = status.as_u16();
        return obs;
    }
    match &route.action {
        Action::Redirect(r) => {
            let resp = r.response(&parts);
            obs.status = resp.status().as_u16();
            obs.location = resp.headers().get(http::header::LOCATION).map(|v| v.to_str().unwrap().to_owned());
            return obs;
        }
        Action::DirectResponse { status, .. } => {
            obs.status = status.as_u16();
            return obs;
        }
        Action::Forward(_) => {}
    }
    let Some(wd) = route.pick(case.roll) else {
        obs.status = 500;
        return obs;
    };
    if let Some(rw) = &route.rewrite {
        rw.apply(&mut parts);
    }
    wd.request_headers.apply(&mut parts.headers);
    route.request_headers.apply(&mut parts.headers);
    let mut resp = HeaderMap::new();
    resp.insert("x-upstream", HeaderValue::from_static("u"));
    wd.response_headers.apply(&mut resp);
    route.response_headers.apply(&mut resp);
    if let Some(cors) = &route.cors {
        cors.apply(parts.headers.get(http::header::ORIGIN), &mut resp);
    }
    obs.status = 200;
    let d = &wd.dest;
    obs.backend = Some((format!("{}/{}", d.service.namespace, d.service.name), d.subset.clone(), d.port_for(port)));
    obs.path = parts.uri.path_and_query().map(|p| p.to_string());
    obs.authority = parts.headers.get(http::header::HOST).map(|v| v.to_str().unwrap().to_owned());
    obs.request_headers = parts.headers;
    obs.response_headers = resp;
    obs
}

fn joined(h: &HeaderMap, name: &str) -> Option<String> {
    let vals: Vec<_> = h.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    (!vals.is_empty()).then(|| vals.join(","))
}

/// `Err` says how `obs` differs from `case.expect`.
pub(crate) fn check(case: &Case, obs: &Observed) -> Result<(), String> {
    let e = &case.expect;
    let mut diffs = Vec::new();
    if obs.status != e.status {
        diffs.push(format!("status {} (expected {})", obs.status, e.status));
    }
    if let Some(b) = e.backend {
        let (ns, name) = service_key(b);
        let want = format!("{ns}/{name}");
        match &obs.backend {
            Some((got, subset, port)) => {
                if *got != want || subset.as_deref() != e.subset {
                    diffs.push(format!("backend {got} subset {subset:?} (expected {want} subset {:?})", e.subset));
                }
                if let Some(p) = e.backend_port
                    && p != *port
                {
                    diffs.push(format!("backend port {port} (expected {p})"));
                }
            }
            None => diffs.push(format!("no backend (expected {want})")),
        }
    }
    if e.location.is_some() && obs.location.as_deref() != e.location {
        diffs.push(format!("Location {:?} (expected {:?})", obs.location, e.location));
    }
    if e.path.is_some() && obs.path.as_deref() != e.path {
        diffs.push(format!("upstream path {:?} (expected {:?})", obs.path, e.path));
    }
    if e.authority.is_some() && obs.authority.as_deref() != e.authority {
        diffs.push(format!("upstream Host {:?} (expected {:?})", obs.authority, e.authority));
    }
    for (k, v) in &e.request_headers {
        let got = joined(&obs.request_headers, k);
        if got.as_deref() != *v {
            diffs.push(format!("request header {k}: {got:?} (expected {v:?})"));
        }
    }
    for (k, v) in &e.response_headers {
        let got = joined(&obs.response_headers, k);
        if got.as_deref() != *v {
            diffs.push(format!("response header {k}: {got:?} (expected {v:?})"));
        }
    }
    if diffs.is_empty() { Ok(()) } else { Err(diffs.join("; ")) }
}

#[test]
fn routing_table_cases() {
    let scenarios = scenarios();
    let total: usize = scenarios.iter().map(|s| s.cases.len()).sum();
    assert!(total >= 150, "the table must have at least 150 cases, has {total}");
    let mut failures = Vec::new();
    for s in &scenarios {
        let state = world(s.yaml);
        let (table, errors) = RouteTable::build(&state, &me());
        let mut got: Vec<(String, String)> =
            errors.iter().map(|e| (format!("{} {}/{}", e.kind, e.namespace, e.name), e.field.clone())).collect();
        let mut want: Vec<(String, String)> =
            s.errors.iter().map(|(o, f)| ((*o).to_owned(), (*f).to_owned())).collect();
        got.sort();
        want.sort();
        if got != want {
            failures.push(format!("[{}] config errors {got:?}, expected {want:?} (all: {errors:?})", s.name));
        }
        for c in &s.cases {
            let obs = simulate(&table, &state, c);
            if let Err(diff) = check(c, &obs) {
                failures.push(format!("[{}] {} {} {} {:?}: {diff}", s.name, c.method, c.service, c.path, c.headers));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {total} cases failed:\n{}", failures.len(), failures.join("\n"));
}

fn one_route(yaml: &str, service: &str) -> Arc<Route> {
    let state = world(yaml);
    let (table, errors) = RouteTable::build(&state, &me());
    assert!(errors.is_empty(), "{errors:?}");
    let routes = table.routes("demo", service);
    assert_eq!(routes.len(), 1, "{routes:?}");
    routes[0].clone()
}

fn shares(route: &Route, rolls: usize) -> BTreeMap<String, f64> {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..rolls {
        let d = route.pick(rng.random()).expect("a destination");
        *counts.entry(format!("{}:{}", d.dest.service.name, d.dest.subset.clone().unwrap_or_default())).or_default() +=
            1;
    }
    counts.into_iter().map(|(k, n)| (k, 100.0 * n as f64 / rolls as f64)).collect()
}

#[test]
fn weighted_picks_within_three_points() {
    let route = one_route(cases::BOOKINFO, "ratings");
    let s = shares(&route, 10_000);
    assert!((s["ratings:v1"] - 80.0).abs() <= 3.0, "{s:?}");
    assert!((s["ratings:v2"] - 20.0).abs() <= 3.0, "{s:?}");
    let three = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: split, namespace: demo}
spec:
  hosts: [b1]
  http:
  - route:
    - {destination: {host: b1}, weight: 50}
    - {destination: {host: b2}, weight: 30}
    - {destination: {host: b3}, weight: 20}
    - {destination: {host: b4}, weight: 0}
"#;
    let route = one_route(three, "b1");
    let s = shares(&route, 10_000);
    for (k, want) in [("b1:", 50.0), ("b2:", 30.0), ("b3:", 20.0)] {
        assert!((s[k] - want).abs() <= 3.0, "{k}: {s:?}");
    }
    assert!(!s.contains_key("b4:"), "weight 0 is never picked: {s:?}");
    // The edges of the roll space.
    assert_eq!(route.pick(0).unwrap().dest.service.name, "b1");
    assert_eq!(route.pick(u64::MAX).unwrap().dest.service.name, "b3");
}

#[test]
fn defaults_and_compiled_values() {
    let state = world(cases::ACTIONS);
    let (table, errors) = RouteTable::build(&state, &me());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(table.source("demo", "api"), Some(RouteSource::VirtualService));
    assert_eq!(table.source("demo", "details"), Some(RouteSource::Default));
    assert_eq!(table.source("other", "foo"), None, "not a service of this waypoint");
    assert_eq!(table.source("demo", "optout"), None, "opted out of the namespace waypoint");
    assert_eq!(table.source("demo", "waypoint"), None, "the waypoint does not route to itself");
    let default = &table.routes("demo", "details")[0];
    assert_eq!(default.retry, RetryPolicy::istio_default());
    assert_eq!(default.timeout, None);
    let d = default.pick(0).unwrap();
    assert_eq!((d.dest.port, d.dest.port_for(9080)), (0, 9080), "default routes keep the dialled port");

    let routes = table.routes("demo", "api");
    let by_prefix =
        |name: &str| routes.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("route {name}")).clone();
    let r = by_prefix("timeouts");
    assert_eq!(r.timeout, Some(Duration::from_millis(2500)));
    assert_eq!(r.retry.attempts, 4);
    assert_eq!(r.retry.per_try_timeout, Some(Duration::from_millis(500)));
    assert!(r.retry.on.should_retry(&crate::waypoint::Outcome::Status(http::StatusCode::BAD_GATEWAY)));
    assert!(!r.retry.on.should_retry(&crate::waypoint::Outcome::Status(http::StatusCode::INTERNAL_SERVER_ERROR)));
    let f = r.fault.as_ref().unwrap();
    assert_eq!(f.delay, Some((Duration::from_secs(1), 100.0)));
    assert_eq!(f.abort, Some((http::StatusCode::BAD_REQUEST, 25.0)));
    assert_eq!(r.mirrors.len(), 2);
    assert_eq!((r.mirrors[0].dest.service.name.as_str(), r.mirrors[0].percent), ("b1", 10.0));
    assert_eq!((r.mirrors[1].dest.service.name.as_str(), r.mirrors[1].percent), ("b2", 100.0));
    let r = by_prefix("noretry");
    assert_eq!(r.retry.attempts, 0);
    let r = by_prefix("direct");
    assert!(
        matches!(&r.action, Action::DirectResponse { status, body } if status.as_u16() == 418 && &body[..] == b"short and stout")
    );
    assert_eq!(r.origin, "VirtualService demo/api http[5]");

    let state = world(cases::GATEWAY);
    let (table, _) = RouteTable::build(&state, &me());
    assert_eq!(table.source("demo", "echo"), Some(RouteSource::HttpRoute), "HTTPRoute beats VirtualService");
    let r = table.routes("demo", "gw1").into_iter().find(|r| r.name == "timeouts").unwrap();
    assert_eq!(r.timeout, Some(Duration::from_secs(1)));
    assert_eq!(r.retry.per_try_timeout, Some(Duration::from_millis(300)));
    assert_eq!(r.retry.attempts, 3);
    assert!(r.retry.on.should_retry(&crate::waypoint::Outcome::Status(http::StatusCode::BAD_GATEWAY)));
    assert!(r.retry.on.should_retry(&crate::waypoint::Outcome::ConnectFailure));
    let r = table.routes("demo", "gw1").into_iter().find(|r| r.origin.ends_with("rules[8]")).unwrap();
    assert_eq!((r.mirrors[0].dest.service.name.as_str(), r.mirrors[0].percent), ("b3", 50.0));
}

#[test]
fn bad_input_is_reported_and_the_rest_serves() {
    let state = world(cases::BAD);
    let (table, errors) = RouteTable::build(&state, &me());
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    for want in [
        "spec.http[0].match[0].headers.x-bad.regex",
        "spec.http[1].route[0].weight",
        "spec.http[2].route[0].destination.subset",
        "spec.http[3].route[0].destination.host",
    ] {
        assert!(fields.contains(&want), "missing error for {want}: {errors:#?}");
    }
    let msg = errors.iter().find(|e| e.field.ends_with("subset")).unwrap().to_string();
    assert!(msg.contains("VirtualService demo/bad-rules") && msg.contains("v9"), "{msg}");
    let msg = errors.iter().find(|e| e.field.ends_with("host")).unwrap().to_string();
    assert!(msg.contains("nosuch"), "{msg}");
    // The good rules of the same object still route (the cases of the BAD scenario check each one).
    assert!(table.routes("demo", "b1").iter().any(|r| r.name == "good"));
}

#[test]
fn a_virtual_service_with_no_usable_rule_leaves_the_default_route() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: all-bad, namespace: demo }
spec:
  hosts: [ratings]
  http:
  - match:
    - headers: { user-agent: { regex: "(unclosed" } }
    route:
    - destination: { host: ratings }
"#;
    let state = world(yaml);
    let (table, errors) = RouteTable::build(&state, &me());
    assert!(errors.iter().any(|e| e.field == "spec.http[0].match[0].headers.user-agent.regex"), "{errors:#?}");
    assert_eq!(table.source("demo", "ratings"), Some(RouteSource::Default), "no 404 for the whole service");
}
