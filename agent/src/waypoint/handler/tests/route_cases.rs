//! The routing case table of `route::tests` driven through the real waypoint: every scenario's mesh
//! moved onto loopback (one plaintext backend per service and per DestinationRule subset, each
//! reporting which pod and port it is and echoing what it received), each case sent over HBONE and
//! HTTP/1.1, and the observed result checked with the table's own `check`.
//!
//! Cases the real server cannot reproduce are counted and skipped: a weighted roll (the server rolls
//! at random), a partial fault percentage, another scheme than `http`, or source attributes that
//! differ from what the server sees (namespace `demo` from the client's identity, no source labels).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::{Client, start};
use crate::state::{State, Workload};
use crate::waypoint::route::tests::cases::{Case, scenarios};
use crate::waypoint::route::tests::{Observed, check, me, world};
use crate::waypoint::route::{Action, RequestInfo, RouteTable};

/// Service port → the high port its backends listen on (no privileges needed for 80).
fn target_port(port: u16) -> u16 {
    20000 + port % 10000
}

/// Echoes the request: `x-pod`, `x-dport`, `x-seen-path`, `x-seen-host`, every request header as
/// `x-req-NAME`, and `x-upstream: u` as the table's simulated upstream does.
async fn echo_backend(addr: SocketAddr, pod: String) {
    let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let pod = pod.clone();
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let mut b = http::Response::builder()
                    .header("x-pod", pod.as_str())
                    .header("x-dport", addr.port())
                    .header("x-upstream", "u")
                    .header("x-seen-path", req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
                if let Some(h) = req.headers().get(http::header::HOST) {
                    b = b.header("x-seen-host", h);
                }
                for (k, v) in req.headers() {
                    b = b.header(format!("x-req-{k}"), v);
                }
                async move { Ok::<_, hyper::Error>(b.body(Full::new(Bytes::new())).unwrap()) }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}

/// One pod per service plus one per DestinationRule subset, on 127.0.`net`.x, not captured.
/// Returns the state and, per pod name, its service (`ns/name`) and labels.
async fn on_loopback(mut state: State, net: u8) -> (State, HashMap<String, (String, BTreeMap<String, String>)>) {
    let mut pods = HashMap::new();
    let mut host = 1u8;
    let drs = state.routing.destination_rules.clone();
    for svc in state.services_by_vip.values_mut() {
        let mut s = (**svc).clone();
        for p in &mut s.ports {
            p.target_port = target_port(p.port);
        }
        let base = s.endpoints[0].clone();
        let mut label_sets = vec![("base".to_string(), (*base.labels).clone())];
        for dr in &drs {
            let h = &dr.spec.host;
            let ns = dr.metadata.namespace.as_deref().unwrap_or("demo");
            let names_it = (*h == s.name && ns == s.namespace) || *h == s.hostname();
            if !names_it {
                continue;
            }
            for sub in &dr.spec.subsets {
                let mut l = (*base.labels).clone();
                l.extend(sub.labels.clone());
                label_sets.push((sub.name.clone(), l));
            }
        }
        let mut endpoints = Vec::new();
        for (tag, labels) in label_sets {
            let ip = std::net::IpAddr::from([127, 0, net, host]);
            host = host.checked_add(1).expect("fewer than 255 pods per scenario");
            let name = format!("{}-{}-{tag}", s.namespace, s.name);
            let w = Workload {
                name: name.clone(),
                labels: Arc::new(labels.clone()),
                ips: vec![ip],
                captured: false,
                ..(*base).clone()
            };
            for p in &s.ports {
                echo_backend(SocketAddr::new(ip, p.target_port), name.clone()).await;
            }
            pods.insert(name, (format!("{}/{}", s.namespace, s.name), labels));
            endpoints.push(Arc::new(w));
        }
        s.endpoints = endpoints;
        *svc = Arc::new(s);
    }
    state.workloads_by_ip.clear();
    (state, pods)
}

/// Why the real server cannot reproduce `case`, if it cannot.
fn skip_reason(table: &RouteTable, state: &State, case: &Case) -> Option<&'static str> {
    if case.scheme != "http" {
        return Some("scheme");
    }
    let (ns, name) = case.service.split_once('/').unwrap_or(("demo", case.service));
    let svc = state.service(ns, name)?;
    let port = if case.port == 0 { svc.ports[0].port } else { case.port };
    let authority = case.authority.map(str::to_owned).unwrap_or_else(|| svc.name.clone());
    let mut headers = HeaderMap::new();
    for (k, v) in &case.headers {
        headers.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    let method = Method::from_bytes(case.method.as_bytes()).unwrap();
    let labels: BTreeMap<String, String> = case.source_labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
    let info = |source_namespace, source_labels| RequestInfo {
        service: svc,
        port,
        method: &method,
        scheme: "http",
        authority: &authority,
        path_and_query: case.path,
        headers: &headers,
        source_namespace,
        source_labels,
    };
    let as_case = table.route(&info(case.source_namespace, (!labels.is_empty()).then_some(&labels)));
    let as_server = table.route(&info(Some("demo"), None));
    let same = match (&as_case, &as_server) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    if !same {
        return Some("source attributes");
    }
    let route = as_case?;
    if let Action::Forward(d) = &route.action
        && d.iter().filter(|d| d.weight > 0).count() > 1
    {
        return Some("weighted roll");
    }
    if let Some(f) = &route.fault {
        let partial = |p: f64| p > 0.0 && p < 100.0;
        if f.abort.is_some_and(|(_, p)| partial(p)) || f.delay.is_some() {
            return Some("fault percentage or delay");
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_case_table_through_the_real_server() {
    let mut ran = 0;
    let mut skipped: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for (si, scenario) in scenarios().into_iter().enumerate() {
        let (state, pods) = on_loopback(world(scenario.yaml), 200 + si as u8).await;
        let (table, _) = RouteTable::build(&state, &me());
        let vips: HashMap<(String, String), std::net::IpAddr> =
            state.services_by_vip.iter().map(|(ip, s)| ((s.namespace.clone(), s.name.clone()), *ip)).collect();
        let reasons: Vec<_> = scenario.cases.iter().map(|c| skip_reason(&table, &state, c)).collect();
        let f = start(state).await;
        let mut clients: HashMap<String, Client> = HashMap::new();
        for (case, reason) in scenario.cases.iter().zip(reasons) {
            if let Some(r) = reason {
                *skipped.entry(r).or_default() += 1;
                continue;
            }
            let (ns, name) = case.service.split_once('/').unwrap_or(("demo", case.service));
            let Some(vip) = vips.get(&(ns.to_string(), name.to_string())) else {
                *skipped.entry("no such service").or_default() += 1;
                continue;
            };
            let svc_ports = &f.store.load().service_by_vip(*vip).unwrap().ports.clone();
            let port = if case.port == 0 { svc_ports[0].port } else { case.port };
            let target = format!("{vip}:{port}");
            let host = case.authority.unwrap_or(name);
            let mut obs = Observed::default();
            // A fresh tunnel when the service does not go through the waypoint (404 CONNECT).
            if !clients.contains_key(&target) {
                match f.tunnel(&target).await {
                    Ok(io) => {
                        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
                        tokio::spawn(conn);
                        clients.insert(target.clone(), Client::H1(sender));
                    }
                    Err(crate::proxy::hbone::Error::Status { status, .. }) => {
                        obs.status = status.as_u16();
                        if let Err(e) = check(case, &obs) {
                            failures.push(format!("[{}] {case:?}: {e}", scenario.name));
                        }
                        ran += 1;
                        continue;
                    }
                    Err(e) => panic!("tunnel to {target}: {e}"),
                }
            }
            let client = clients.get_mut(&target).unwrap();
            let r = client.send(case.method, host, case.path, &case.headers, "").await;
            ran += 1;
            obs.status = r.status;
            obs.location = r.headers.get(http::header::LOCATION).map(|v| v.to_str().unwrap().to_owned());
            if let Some(pod) = r.headers.get("x-pod").and_then(|v| v.to_str().ok()) {
                let (service, labels) = &pods[pod];
                let subset = case.expect.subset.filter(|want| {
                    // The pod serves the expected subset when it carries that subset's labels.
                    let want_pod = format!("{}-{want}", service.replace('/', "-"));
                    pods.get(&want_pod).is_some_and(|(_, l)| l.iter().all(|(k, v)| labels.get(k) == Some(v)))
                });
                let dport: u16 = r.headers["x-dport"].to_str().unwrap().parse().unwrap();
                let sport = svc_port_of(&f.store.load(), service, dport);
                obs.backend = Some((service.clone(), subset.map(str::to_owned), sport));
                obs.path = r.headers.get("x-seen-path").map(|v| v.to_str().unwrap().to_owned());
                obs.authority = r.headers.get("x-seen-host").map(|v| v.to_str().unwrap().to_owned());
                for (k, v) in &r.headers {
                    if let Some(name) = k.as_str().strip_prefix("x-req-") {
                        obs.request_headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), v.clone());
                    }
                }
            }
            obs.response_headers = r.headers.clone();
            if let Err(e) = check(case, &obs) {
                failures.push(format!("[{}] {case:?}: {e}", scenario.name));
            }
        }
    }
    eprintln!("route cases through the real server: {ran} run, skipped {skipped:?}, {} failed", failures.len());
    assert!(failures.is_empty(), "{} of {ran} cases differ:\n{}", failures.len(), failures.join("\n"));
    assert!(ran >= 150, "only {ran} cases ran (skipped {skipped:?})");
}

fn svc_port_of(state: &State, service: &str, target: u16) -> u16 {
    let (ns, name) = service.split_once('/').unwrap();
    let svc = state.service(ns, name).unwrap();
    svc.ports.iter().find(|p| p.target_port == target).map(|p| p.port).unwrap_or(0)
}
