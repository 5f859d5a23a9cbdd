//! A waypoint's reporting (`discovery::kube::report::watch_waypoint`) against the API server double:
//! a VirtualService with a bad regex gets exactly one Event naming the field; HTTPRoutes that name a
//! service the waypoint serves get `status.parents` entries — Accepted/ResolvedRefs True with
//! observedGeneration for a good route, ResolvedRefs False/BackendNotFound for a missing backend —
//! written next to another controller's entry, which stays.

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use weft::discovery::kube::report::{self, Problem, Reporter};
use weft::state::State;
use weft::waypoint::WaypointId;
use weft::waypoint::route::RouteTable;
use weft_tests::apiserver::ApiServer;
use weft_tests::cluster::InProcessSource;

fn svc(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "bookinfo"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
                 "ports": [{"name": "http", "port": 9080, "targetPort": 9080, "protocol": "TCP"}]},
    })
}

fn route(name: &str, backend: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "bookinfo"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "ratings", "port": 9080}],
                 "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": format!("/{name}")}}],
                            "backendRefs": [{"name": backend, "port": 9080}]}]},
    })
}

fn condition<'a>(route: &'a Value, type_: &str) -> &'a Value {
    let parents = route["status"]["parents"].as_array().expect("status.parents");
    let ours = parents
        .iter()
        .find(|p| p["controllerName"] == report::ROUTE_CONTROLLER_NAME)
        .unwrap_or_else(|| panic!("no weft entry in {parents:#?}"));
    ours["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {ours:#?}"))
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn waypoint_reports_bad_regex_and_writes_route_status() {
    let server = ApiServer::start_new().await.expect("API server double");
    server
        .put(json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "bookinfo", "labels": {"istio.io/use-waypoint": "waypoint"}}}))
        .unwrap();
    server.put(svc("waypoint", "10.96.0.10")).unwrap();
    server.put(svc("reviews", "10.96.0.11")).unwrap();
    server.put(svc("ratings", "10.96.0.12")).unwrap();
    server
        .put(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "bad-regex", "namespace": "bookinfo"},
            "spec": {"hosts": ["reviews"], "http": [
                {"match": [{"headers": {"user-agent": {"regex": "(.*Safari"}}}], "route": [{"destination": {"host": "reviews"}}]},
                {"route": [{"destination": {"host": "reviews"}}]},
            ]},
        }))
        .unwrap();
    let mut good = route("good", "ratings");
    good["status"] = json!({"parents": [{
        "parentRef": {"name": "elsewhere"}, "controllerName": "example.com/other",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}],
    }]});
    server.put(good).unwrap();
    server.put(route("missing", "nope")).unwrap();

    let source = InProcessSource::start(&server).await;
    let (client, store) = (source.client.clone(), source.store.clone());

    let reporter = Reporter::spawn(client.clone(), report::WAYPOINT_CONTROLLER, "waypoint-7d9f");
    let me = WaypointId { namespace: "bookinfo".into(), name: "waypoint".into() };
    let compile = move |s: &State| -> Vec<Problem> {
        let (_, errors) = RouteTable::build(s, &me);
        errors.iter().map(|e| Problem::new(e.kind, &e.namespace, &e.name, &e.field, &e.reason)).collect()
    };
    let (_stop_w, stopped_w) = oneshot::channel::<()>();
    let watcher = tokio::spawn(report::watch_waypoint(
        client.clone(),
        store.clone(),
        ("bookinfo".into(), "waypoint".into()),
        reporter.clone(),
        compile,
        async {
            let _ = stopped_w.await;
        },
    ));

    let get = |name: &str| server.get("gateway.networking.k8s.io/v1", "HTTPRoute", Some("bookinfo"), name).unwrap();
    wait_for("status on both routes", || {
        ["good", "missing"].iter().all(|n| {
            get(n)["status"]["parents"]
                .as_array()
                .is_some_and(|p| p.iter().any(|e| e["controllerName"] == report::ROUTE_CONTROLLER_NAME))
        })
    })
    .await;
    let g = get("good");
    let parents = g["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "the other controller's entry stays: {parents:#?}");
    assert_eq!(parents[0]["controllerName"], "example.com/other");
    let ours = &parents[1];
    assert_eq!(ours["parentRef"], json!({"group": "", "kind": "Service", "name": "ratings", "port": 9080}));
    for t in ["Accepted", "ResolvedRefs"] {
        let c = condition(&g, t);
        assert_eq!(c["status"], "True", "{t}: {c}");
        assert_eq!(c["reason"], t);
        assert_eq!(c["observedGeneration"], 1);
        assert!(c["lastTransitionTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{c}");
    }
    let m = get("missing");
    let resolved = condition(&m, "ResolvedRefs");
    assert_eq!(resolved["status"], "False");
    assert_eq!(resolved["reason"], "BackendNotFound");
    assert!(resolved["message"].as_str().unwrap().contains("backendRefs[0].name"), "{resolved}");
    assert_eq!(condition(&m, "Accepted")["status"], "True", "the route is accepted (it answers 500)");

    // Events: exactly one for the VirtualService, naming the regex field.
    let api: Api<Event> = Api::namespaced(client.clone(), "bookinfo");
    let mut vs_events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while vs_events.is_empty() {
        assert!(Instant::now() < deadline, "no Event for the VirtualService");
        tokio::time::sleep(Duration::from_millis(50)).await;
        vs_events = api.list(&ListParams::default()).await.unwrap().items;
        vs_events.retain(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("VirtualService"));
    }
    // A change of the good route (generation 2) rebuilds a few times.
    let first_time = condition(&g, "Accepted")["lastTransitionTime"].clone();
    let mut good2 = route("good", "ratings");
    good2["spec"]["rules"][0]["matches"][0]["path"]["value"] = json!("/good2");
    good2["status"] = g["status"].clone();
    server.put(good2).unwrap();
    wait_for("observedGeneration 2", || condition(&get("good"), "Accepted")["observedGeneration"] == 2).await;
    let g2 = get("good");
    assert_eq!(g2["metadata"]["generation"], 2);
    assert_eq!(condition(&g2, "Accepted")["lastTransitionTime"], first_time, "status unchanged: time kept");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let all = api.list(&ListParams::default()).await.unwrap().items;
    let vs: Vec<&Event> =
        all.iter().filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("VirtualService")).collect();
    assert_eq!(vs.len(), 1, "exactly one Event for the VirtualService: {all:#?}");
    let e = vs[0];
    assert_eq!(e.regarding.as_ref().unwrap().name.as_deref(), Some("bad-regex"));
    assert_eq!(e.regarding.as_ref().unwrap().api_version.as_deref(), Some("networking.istio.io/v1"));
    assert_eq!(e.reporting_controller.as_deref(), Some("weft.io/waypoint"));
    assert_eq!(e.reporting_instance.as_deref(), Some("waypoint-7d9f"));
    let note = e.note.as_deref().unwrap();
    assert!(note.contains("spec.http[0].match[0].headers") && note.contains("regex"), "{note}");
    let route_events =
        all.iter().filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("missing")).count();
    assert_eq!(route_events, 1, "the missing backend is an Event too, once");
    assert_eq!(reporter.dropped(), 0);
    watcher.abort();
}
