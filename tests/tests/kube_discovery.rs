//! `discovery::kube` against the in-process API server double, with kube-rs's real watchers:
//! initial sync and readiness, namespace labels enrolling and unenrolling pods, policy changes,
//! an API server that goes away and comes back, and a watch that falls behind compaction (410).
//! No root needed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use weft::crd::AuthorizationPolicy;
use weft::discovery::kube::{KubeOptions, run};
use weft::policy::{Connection, Decision};
use weft::state::{State, StateStore};
use weft_tests::apiserver::ApiServer;

const NODE: &str = "node-a";

fn ns(name: &str, ambient: bool) -> Value {
    let labels = if ambient { json!({"istio.io/dataplane-mode": "ambient"}) } else { json!({}) };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, sa: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn ap(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": name, "namespace": "demo"}, "spec": spec})
}

/// A cluster: `demo` (ambient) with a client on this node, an opted-out pod, and a web service
/// backed by a remote pod (listed in an EndpointSlice); `plain` (not ambient) with one pod here.
fn seed(server: &ApiServer) {
    for obj in [
        ns("demo", true),
        ns("plain", false),
        pod("demo", "client", NODE, "10.10.1.2", "curl", json!({"app": "curl"})),
        pod(
            "demo",
            "legacy",
            NODE,
            "10.10.1.3",
            "default",
            json!({"app": "legacy", "istio.io/dataplane-mode": "none"}),
        ),
        pod("demo", "web-1", "node-b", "10.10.1.4", "web", json!({"app": "web"})),
        pod("demo", "web-2", "node-b", "10.10.1.5", "web", json!({"app": "web"})),
        pod("plain", "outside", NODE, "10.10.2.2", "default", json!({"app": "outside"})),
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-x1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.10.1.4"], "conditions": {"ready": true}}, {"addresses": ["10.10.1.5"], "conditions": {"ready": false}}],
        }),
        ap(
            "only-curl",
            json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/curl"]}}]}]}),
        ),
    ] {
        server.put(obj).expect("seed object");
    }
}

struct Fixture {
    server: ApiServer,
    client: kube::Client,
    store: Arc<StateStore>,
    _stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fixture() -> Fixture {
    let server = ApiServer::start_new().await.expect("API server double");
    seed(&server);
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let store = Arc::new(StateStore::new(State::default()));
    let (synced_tx, mut synced) = watch::channel(false);
    let (stop, stopped) = oneshot::channel::<()>();
    let opts = KubeOptions {
        trust_domain: "cluster.local".into(),
        node_name: NODE.into(),
        root_namespace: "istio-system".into(),
    };
    let task = tokio::spawn(run(client.clone(), opts, store.clone(), synced_tx, async {
        let _ = stopped.await;
    }));
    assert!(!*synced.borrow(), "not synced before the first lists");
    tokio::time::timeout(Duration::from_secs(5), synced.wait_for(|s| *s))
        .await
        .expect("initial sync within 5 s")
        .unwrap();
    Fixture { server, client, store, _stop: stop, task }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn captured(state: &State, pod_ip: &str) -> Option<bool> {
    state.workload_by_ip(ip(pod_ip)).map(|w| w.captured)
}

fn authorize(state: &State, principal: &str) -> Decision {
    let w = state.workload_by_ip(ip("10.10.1.4")).expect("web-1 is known");
    state.policies.authorize(&Connection {
        source_principal: Some(principal),
        source_namespace: None,
        source_ip: ip("10.10.1.2"),
        dest_ip: ip("10.10.1.4"),
        dest_port: 8080,
        dest_namespace: &w.namespace,
        dest_labels: &w.labels,
    })
}

const CURL: &str = "cluster.local/ns/demo/sa/curl";

/// Waits until `check` holds for the current snapshot, at most `limit`; returns how long it took.
async fn eventually(store: &StateStore, limit: Duration, what: &str, check: impl Fn(&State) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check(&store.load()) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn initial_sync_builds_the_expected_state() {
    let f = fixture().await;
    let state = f.store.load();
    let client = state.workload_by_ip(ip("10.10.1.2")).expect("client");
    assert!(client.captured);
    assert_eq!(client.identity.to_string(), "spiffe://cluster.local/ns/demo/sa/curl");
    assert_eq!(client.node.as_deref(), Some(NODE));
    assert_eq!(client.netns, None, "the CNI plugin supplies netns in a cluster");
    assert_eq!(captured(&state, "10.10.1.3"), Some(false), "pod labelled dataplane-mode=none");
    assert_eq!(captured(&state, "10.10.2.2"), Some(false), "namespace not ambient");
    assert_eq!(captured(&state, "10.10.1.4"), Some(true), "remote pods are known, for destination identity");

    let web = state.service_by_vip(ip("10.96.0.10")).expect("web service");
    let endpoints: Vec<&str> = web.endpoints.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(endpoints, ["web-1"], "ready endpoints from the EndpointSlice (web-2 is not ready)");
    assert_eq!(web.target_port(80), Some(8080));

    assert_eq!(state.policies.authorization_policy_count(), 1);
    assert_eq!(authorize(&state, CURL), Decision::Allow);
    assert!(matches!(authorize(&state, "cluster.local/ns/demo/sa/other"), Decision::Deny { .. }));
}

#[tokio::test]
async fn namespace_label_enrolls_and_unenrolls_its_pods() {
    let f = fixture().await;
    let namespaces: Api<Namespace> = Api::all(f.client.clone());
    let label = |v: Value| Patch::Merge(json!({"metadata": {"labels": {"istio.io/dataplane-mode": v}}}));
    namespaces.patch("plain", &PatchParams::default(), &label(json!("ambient"))).await.unwrap();
    let took = eventually(&f.store, Duration::from_secs(1), "labelled namespace captures its pods", |s| {
        captured(s, "10.10.2.2") == Some(true)
    })
    .await;
    eprintln!("labelled → captured in {took:?}");
    namespaces.patch("plain", &PatchParams::default(), &label(Value::Null)).await.unwrap();
    eventually(&f.store, Duration::from_secs(1), "unlabelled namespace releases its pods", |s| {
        captured(s, "10.10.2.2") == Some(false)
    })
    .await;
}

#[tokio::test]
async fn authorization_policy_changes_apply_within_a_second() {
    let f = fixture().await;
    let aps: Api<AuthorizationPolicy> = Api::namespaced(f.client.clone(), "demo");
    let deny_curl: AuthorizationPolicy = serde_json::from_value(ap(
        "deny-curl",
        json!({"action": "DENY", "rules": [{"from": [{"source": {"principals": [CURL]}}]}]}),
    ))
    .unwrap();
    aps.create(&PostParams::default(), &deny_curl).await.unwrap();
    let took = eventually(&f.store, Duration::from_secs(1), "new DENY policy enforced", |s| {
        authorize(s, CURL) == Decision::Deny { policy: "demo/deny-curl".into() }
    })
    .await;
    eprintln!("created → enforced in {took:?}");

    let other =
        json!({"spec": {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/other"]}}]}]}});
    aps.patch("deny-curl", &PatchParams::default(), &Patch::Merge(other)).await.unwrap();
    eventually(&f.store, Duration::from_secs(1), "changed DENY policy enforced", |s| {
        authorize(s, CURL) == Decision::Allow
    })
    .await;

    aps.patch(
        "only-curl",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rules": [{"from": [{"source": {"namespaces": ["nope"]}}]}]}})),
    )
    .await
    .unwrap();
    eventually(&f.store, Duration::from_secs(1), "narrowed ALLOW policy enforced", |s| {
        matches!(authorize(s, CURL), Decision::Deny { .. })
    })
    .await;
    aps.delete("only-curl", &DeleteParams::default()).await.unwrap();
    aps.delete("deny-curl", &DeleteParams::default()).await.unwrap();
    eventually(&f.store, Duration::from_secs(1), "deleted policies no longer enforced", |s| {
        s.policies.authorization_policy_count() == 0 && authorize(s, CURL) == Decision::Allow
    })
    .await;

    // An invalid policy is left out; the rest still applies.
    let bad = ap("bad", json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/99"]}}]}]}));
    let good = ap("good", json!({"action": "DENY", "rules": [{"from": [{"source": {"principals": [CURL]}}]}]}));
    f.server.put(bad).unwrap();
    f.server.put(good).unwrap();
    eventually(&f.store, Duration::from_secs(1), "valid policy applies beside an invalid one", |s| {
        s.policies.authorization_policy_count() == 1
            && authorize(s, CURL) == Decision::Deny { policy: "demo/good".into() }
    })
    .await;
}

#[tokio::test]
async fn api_server_outage_keeps_the_last_state_and_resyncs() {
    let f = fixture().await;
    f.server.stop().await;
    // Made while the API server is down: must show up once it is back.
    f.server.put(ns("plain", true)).unwrap();
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(2) {
        let s = f.store.load();
        assert_eq!(captured(&s, "10.10.1.2"), Some(true), "last state stays while the API server is down");
        assert_eq!(captured(&s, "10.10.2.2"), Some(false));
        assert_eq!(s.policies.authorization_policy_count(), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.server.start().await.unwrap();
    let took = eventually(&f.store, Duration::from_secs(12), "change made during the outage picked up", |s| {
        captured(s, "10.10.2.2") == Some(true)
    })
    .await;
    eprintln!("restarted → resynced in {took:?} (kube default backoff)");
    assert_eq!(captured(&f.store.load(), "10.10.1.2"), Some(true));
}

#[tokio::test]
async fn a_watch_behind_compaction_gets_410_and_relists() {
    let f = fixture().await;
    let lists_before = pod_lists(&f.server);
    // A history of one change: a watch that has not caught up when two changes land is expired.
    f.server.set_max_history(1);
    f.server.put(pod("demo", "new-1", "node-b", "10.10.1.6", "web", json!({"app": "web"}))).unwrap();
    f.server.put(pod("demo", "new-2", "node-b", "10.10.1.7", "web", json!({"app": "web"}))).unwrap();
    f.server.put(pod("demo", "new-3", "node-b", "10.10.1.8", "web", json!({"app": "web"}))).unwrap();
    eventually(&f.store, Duration::from_secs(8), "pods created around the compaction are all there", |s| {
        ["10.10.1.6", "10.10.1.7", "10.10.1.8"].iter().all(|p| s.workload_by_ip(ip(p)).is_some())
    })
    .await;
    assert!(pod_lists(&f.server) > lists_before, "the pod watcher relisted after 410: {:?}", f.server.requests());
}

/// Non-watch GETs of the pod collection so far.
fn pod_lists(server: &ApiServer) -> usize {
    server.requests().iter().filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true")).count()
}
