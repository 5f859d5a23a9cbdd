//! The node agent's Events on bad configuration (`discovery::kube::report`), against the API server
//! double: each invalid AuthorizationPolicy gets exactly one `events.k8s.io/v1` Event naming the
//! field, shaped as the API conventions ask, not one per state rebuild nor one per node; fixing the
//! object adds none.
//! Its own test binary: the node reporter is installed once per process.

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use weft::discovery::kube::report::{self, Reporter};
use weft_tests::apiserver::ApiServer;
use weft_tests::cluster::InProcessSource;

fn ap(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "demo"}, "spec": spec,
    })
}

async fn events(api: &Api<Event>) -> Vec<Event> {
    api.list(&ListParams::default()).await.expect("list events").items
}

async fn wait_events(api: &Api<Event>, n: usize) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let e = events(api).await;
        if e.len() >= n {
            return e;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {n} events; have {e:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn invalid_authorization_policies_get_one_event_each() {
    let server = ApiServer::start_new().await.expect("API server double");
    server.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}})).unwrap();
    let bad_ip =
        server.put(ap("bad-ip", json!({"rules": [{"from": [{"source": {"ipBlocks": ["300.0.0.1"]}}]}]}))).unwrap();
    let typo = server.put(ap("typo", json!({"selector": {"matchLabel": {"app": "x"}}}))).unwrap();
    server.put(ap("fine", json!({"rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]}))).unwrap();

    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let reporter = Reporter::spawn(client, report::NODE_CONTROLLER, "node-a");
    assert!(report::install(reporter.clone()));
    let source = InProcessSource::start(&server).await;
    let client = source.client.clone();

    let api: Api<Event> = Api::namespaced(client.clone(), "demo");
    let got = wait_events(&api, 2).await;
    // More rebuilds (namespace label changes) must not repeat them.
    for i in 0..5 {
        server
            .put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {"n": i.to_string()}}}))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let after = events(&api).await;
    assert_eq!(after.len(), 2, "one Event per bad object, not one per rebuild: {after:#?}");
    assert_eq!(got.len(), 2);

    for (name, obj, field) in [("bad-ip", &bad_ip, "ipBlocks"), ("typo", &typo, "selector")] {
        let mine: Vec<&Event> =
            after.iter().filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)).collect();
        assert_eq!(mine.len(), 1, "exactly one Event for {name}: {after:#?}");
        let e = mine[0];
        let r = e.regarding.as_ref().unwrap();
        assert_eq!(r.kind.as_deref(), Some("AuthorizationPolicy"));
        assert_eq!(r.api_version.as_deref(), Some("security.istio.io/v1"));
        assert_eq!(r.namespace.as_deref(), Some("demo"));
        assert_eq!(r.uid.as_deref(), obj["metadata"]["uid"].as_str(), "regarding carries the object's uid");
        assert!(r.uid.as_deref().is_some_and(|u| !u.is_empty()));
        assert_eq!(e.metadata.namespace.as_deref(), Some("demo"), "the Event lives in the object's namespace");
        assert!(e.metadata.name.as_deref().unwrap().starts_with(&format!("{name}.")));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some(report::REASON));
        assert_eq!(e.action.as_deref(), Some(report::ACTION));
        assert_eq!(e.reporting_controller.as_deref(), Some("weft.io/node"));
        assert_eq!(e.reporting_instance.as_deref(), Some("node-a"));
        assert!(e.event_time.is_some(), "eventTime is required by events.k8s.io/v1");
        let note = e.note.as_deref().unwrap();
        assert!(note.contains(field), "the note names the field: {note}");
        assert!(note.len() <= 1024);
    }

    // Other node agents find the same problems in the same objects: they write no second Event.
    let others: Vec<Reporter> =
        ["node-b", "node-c"].iter().map(|n| Reporter::spawn(client.clone(), report::NODE_CONTROLLER, n)).collect();
    for e in &after {
        let (field, reason) = e.note.as_deref().unwrap().split_once(": ").expect("note is `field: reason`");
        let name = e.regarding.as_ref().and_then(|r| r.name.as_deref()).unwrap();
        for r in &others {
            r.report(report::Problem::new("AuthorizationPolicy", "demo", name, field, reason));
        }
    }
    // A problem no node reported yet gets exactly one Event, whichever node is first.
    for r in &others {
        r.report(report::Problem::new("AuthorizationPolicy", "demo", "fine", "spec.rules[0]", "found by two nodes"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while others.iter().map(|r| r.published()).sum::<u64>() < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = events(&api).await;
    assert_eq!(all.len(), 3, "one Event per problem in the cluster, not one per node: {all:#?}");
    assert_eq!(others.iter().map(|r| r.published()).sum::<u64>(), 1);
    assert_eq!(all.iter().filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("fine")).count(), 1);

    // Fixing an object reports nothing new.
    server.put(ap("typo", json!({"selector": {"matchLabels": {"app": "x"}}}))).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(events(&api).await.len(), 3);
    assert_eq!(reporter.dropped(), 0);
    assert_eq!(reporter.published(), 2);
}
