//! The L7 waypoint end to end in netns pods, cluster mode: the node agent and `weft waypoint
//! --kubeconfig … --namespace demo --name waypoint` both read the HTTP-level Kubernetes API double,
//! both hold certificates from an in-process `weft ca` (the waypoint with its own ServiceAccount
//! token), pods are enrolled through the real CNI plugin. Configuration arrives through the API
//! only: `end-user: jason` → v2 else v1 from a VirtualService + DestinationRule, a change of the
//! VirtualService takes effect without a restart, 80/20 v1/v2 over 400 requests, a 50% fault abort,
//! `.*Safari.*` → v1, an L7 DENY AuthorizationPolicy answers 403,
//! a VirtualService with an invalid regex is left out (logged with its field) while the rest keeps
//! routing, and resilience: retries hide a flaky backend, a route timeout answers 504, outlier
//! detection ejects a failing endpoint, and a local rate limit (EnvoyFilter) answers 429 after its
//! tokens. Needs root and the `weft` and `weft-probe` binaries.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_tests::cluster::{Cluster, cni_add, pod_object};
use weft_tests::mesh::spiffe;
use weft_tests::waypoint::{GATEWAY_NAME_LABEL, served_by};
use weft_tests::{AgentOptions, Mode, Pod, PodSpec, Topology, poll, require_root};

const NS: &str = "demo";
const WAYPOINT_VIP: &str = "10.96.2.100";
const REVIEWS_VIP: &str = "10.96.2.1";
const RATINGS_VIP: &str = "10.96.2.2";
const FLAKY_VIP: &str = "10.96.2.3";
const SLOW_VIP: &str = "10.96.2.4";
const POOL_VIP: &str = "10.96.2.5";
const LIMITED_VIP: &str = "10.96.2.6";
const USE_WAYPOINT: &str = "istio.io/use-waypoint";

// ---- Objects in the API double ----

/// An HTTP service (port 80 → 8080) bound to the waypoint.
fn http_service(name: &str, vip: &str, selector: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS, "labels": {USE_WAYPOINT: "waypoint"}},
        "spec": {"clusterIP": vip, "selector": selector,
                 "ports": [{"name": "http-80", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    })
}

/// Resilience configuration, as a user applies it (the same objects as the local suite's YAML):
/// `flaky` retried 3 times on 5xx except under `/no-retry`; `slow` behind a 500 ms route
/// timeout; `pool` with outlier detection ejecting an endpoint after 2 consecutive 5xx, and no
/// retries (so every 5xx reaches the client).
fn resilience_objects() -> Vec<Value> {
    let vs = |name: &str, http: Value| {
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"hosts": [name], "http": http},
        })
    };
    vec![
        vs(
            "flaky",
            json!([
                {"match": [{"uri": {"prefix": "/no-retry"}}], "route": [{"destination": {"host": "flaky"}}],
                 "retries": {"attempts": 0}},
                {"route": [{"destination": {"host": "flaky"}}],
                 "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"}},
            ]),
        ),
        vs("slow", json!([{"route": [{"destination": {"host": "slow"}}], "timeout": "500ms"}])),
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "pool", "namespace": NS},
            "spec": {"host": "pool", "trafficPolicy": {
                "loadBalancer": {"simple": "ROUND_ROBIN"},
                "outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "60s",
                                     "maxEjectionPercent": 50},
            }},
        }),
        vs("pool", json!([{"route": [{"destination": {"host": "pool"}}], "retries": {"attempts": 0}}])),
        // Istio's local rate limit as its docs write it: 5 tokens per minute for `limited`.
        json!({
            "apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": {"name": "limited-ratelimit", "namespace": NS},
            "spec": {
                "targetRefs": [{"kind": "Service", "group": "", "name": "limited"}],
                "configPatches": [{"applyTo": "HTTP_FILTER", "patch": {"operation": "INSERT_BEFORE", "value": {
                    "name": "envoy.filters.http.local_ratelimit",
                    "typed_config": {
                        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                        "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                        "value": {
                            "stat_prefix": "http_local_rate_limiter",
                            "token_bucket": {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "60s"},
                            "filter_enabled": {"runtime_key": "local_rate_limit_enabled",
                                               "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                            "filter_enforced": {"runtime_key": "local_rate_limit_enforced",
                                                "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                        },
                    },
                }}}],
            },
        }),
    ]
}

fn reviews_vs(rules: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": NS},
        "spec": {"hosts": ["reviews"], "http": rules},
    })
}

fn to_subset(subset: &str) -> Value {
    json!({"destination": {"host": "reviews", "subset": subset}})
}

/// `ratings` routed by user-agent: `regex` (meant to be `.*Safari.*`) → reviews v1, the rest →
/// reviews v2.
fn ratings_vs(regex: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "ratings-ua", "namespace": NS},
        "spec": {"hosts": ["ratings"], "http": [
            {"match": [{"headers": {"user-agent": {"regex": regex}}}], "route": [to_subset("v1")]},
            {"route": [to_subset("v2")]},
        ]},
    })
}

// ---- Plumbing ----

/// [`weft_tests::waypoint::requests`] with this suite's curl limit.
fn requests(pod: &Pod, url: &str, n: usize, headers: &[&str]) -> Vec<(u16, String)> {
    weft_tests::waypoint::requests(pod, url, n, headers, Duration::from_secs(30))
}

fn only(what: &str, n: usize) -> BTreeMap<String, usize> {
    BTreeMap::from([(what.to_string(), n)])
}

/// Polls `check` every 200 ms for at most `limit`; returns how long it took to hold.
fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    let ok = poll(limit, Duration::from_millis(200), || check().then_some(()));
    assert!(ok.is_some(), "{what}: not in effect within {limit:?}");
    t.elapsed()
}

#[test]
fn waypoint_in_cluster_mode_applies_configuration_from_the_api() {
    require_root();
    let t0 = Instant::now();
    let app = |pod: &str, version: &str| {
        PodSpec::new(pod, NS).sa("reviews").label("app", "reviews").label("version", version).port("http", 8080)
    };
    let backend = |pod: &str, app: &str| PodSpec::new(pod, NS).sa(app).label("app", app).port("http", 8080);
    // The namespace mode only shapes mesh.yaml, which cluster mode does not read.
    let topo = Topology::builder("wpclus")
        .namespace(NS, Mode::Ambient)
        .pod(PodSpec::new("client", NS).sa("client"))
        .pod(
            PodSpec::new("waypoint", NS)
                .sa("waypoint")
                .label(GATEWAY_NAME_LABEL, "waypoint")
                .label("istio.io/dataplane-mode", "none"),
        )
        .pod(app("reviews-v1", "v1"))
        .pod(app("reviews-v2", "v2"))
        .pod(backend("flaky", "flaky"))
        .pod(backend("slow", "slow"))
        .pod(backend("pool-good", "pool").label("health", "good"))
        .pod(backend("pool-bad", "pool"))
        .build()
        .unwrap();
    let client = topo.pod("client");
    let _servers: Vec<_> =
        ["reviews-v1", "reviews-v2", "pool-good"].iter().map(|p| topo.pod(p).serve_http(8080).unwrap()).collect();
    // Every second answer a 503; 3 s per answer; every answer a 500.
    let _flaky = topo.pod("flaky").serve_http_with(8080, &["--fail-every", "2"]).unwrap();
    let _slow = topo.pod("slow").serve_http_with(8080, &["--delay-ms", "3000"]).unwrap();
    let _bad = topo.pod("pool-bad").serve_http_with(8080, &["--fail-every", "1", "--fail-status", "500"]).unwrap();
    let node = format!("weft-{}", topo.name());

    // The cluster: the API double with the namespace, pods, services, the waypoint's Gateway and
    // the reviews subsets; the CA.
    let cluster = Cluster::start(topo.dir()).expect("API double and CA");
    let api = cluster.api();
    api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": {"istio.io/dataplane-mode": "ambient"}}}))
        .unwrap();
    for sa in ["client", "reviews", "waypoint", "flaky", "slow", "pool"] {
        api.put(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NS}}))
            .unwrap();
    }
    for p in topo.pods() {
        api.put(pod_object(p, &node)).unwrap();
    }
    api.put(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "waypoint", "namespace": NS, "labels": {GATEWAY_NAME_LABEL: "waypoint"}},
        "spec": {"clusterIP": WAYPOINT_VIP, "selector": {GATEWAY_NAME_LABEL: "waypoint"},
                 "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"}]},
    }))
    .unwrap();
    api.put(http_service("reviews", REVIEWS_VIP, json!({"app": "reviews"}))).unwrap();
    // A second service on the same pods: the one an invalid VirtualService targets below.
    api.put(http_service("ratings", RATINGS_VIP, json!({"app": "reviews"}))).unwrap();
    for (name, vip) in [("flaky", FLAKY_VIP), ("slow", SLOW_VIP), ("pool", POOL_VIP)] {
        api.put(http_service(name, vip, json!({"app": name}))).unwrap();
    }
    // The rate-limited service, on the always-healthy pool pod.
    api.put(http_service("limited", LIMITED_VIP, json!({"app": "pool", "health": "good"}))).unwrap();
    // In the API before the waypoint starts: it is ready only once its first snapshot is compiled,
    // so these are in force from its first request (the flaky backend's count starts clean).
    for obj in resilience_objects() {
        api.put(obj).unwrap();
    }
    api.put(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": NS},
        "spec": {"gatewayClassName": "weft-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }))
    .unwrap();
    api.put(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": NS},
        "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]},
    }))
    .unwrap();

    // The node agent (host network namespace), then the waypoint in its pod with its own token.
    let agent = cluster.node_agent(&topo, &node, AgentOptions::for_topology(&topo)).unwrap();
    let enrolled = ["client", "reviews-v1", "reviews-v2", "flaky", "slow", "pool-good", "pool-bad"];
    let seen = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        (enrolled.iter().all(|n| agent.captured(NS, n) == Some(true)) && agent.captured(NS, "waypoint") == Some(false))
            .then_some(())
    });
    assert!(seen.is_some(), "{enrolled:?} captured and the waypoint pod not, within 10 s");
    for p in enrolled {
        cni_add(topo.pod(p), agent.cni_socket()).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let waypoint = cluster.start_waypoint(&topo, "waypoint", NS, "waypoint", &node).unwrap();
    let t_ready = t0.elapsed();
    let reviews = format!("http://{REVIEWS_VIP}/reviews");
    let ratings = format!("http://{RATINGS_VIP}/ratings");

    // (1) end-user: jason → v2, everyone else → v1, from a VirtualService created through the API.
    api.put(reviews_vs(json!([
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [to_subset("v2")]},
        {"route": [to_subset("v1")]},
    ])))
    .unwrap();
    // Four in a row each way: the default route (round robin over both pods) cannot do that.
    let took_vs = within(Duration::from_secs(15), "end-user VirtualService", || {
        served_by(&requests(client, &reviews, 4, &["end-user: jason"])) == only("200 reviews-v2", 4)
            && served_by(&requests(client, &reviews, 4, &["end-user: mallory"])) == only("200 reviews-v1", 4)
    });
    assert_eq!(served_by(&requests(client, &reviews, 20, &["end-user: jason"])), only("200 reviews-v2", 20));
    assert_eq!(served_by(&requests(client, &reviews, 20, &["end-user: mallory"])), only("200 reviews-v1", 20));
    assert_eq!(served_by(&requests(client, &reviews, 20, &[])), only("200 reviews-v1", 20));

    // (2) The VirtualService changed through the API (everything → v2) applies within seconds,
    // without a restart.
    api.put(reviews_vs(json!([{"route": [to_subset("v2")]}]))).unwrap();
    let took_change = within(Duration::from_secs(5), "100% v2 VirtualService", || {
        requests(client, &reviews, 1, &["end-user: mallory"]) == [(200, "reviews-v2".to_string())]
    });
    assert_eq!(served_by(&requests(client, &reviews, 20, &["end-user: mallory"])), only("200 reviews-v2", 20));
    assert_eq!(served_by(&requests(client, &reviews, 10, &["end-user: jason"])), only("200 reviews-v2", 10));

    // (2b) 80/20 between v1 and v2, then a 50% fault abort, both through the API (each change is seen
    // by an answer the previous configuration could not give), then back to 100% v2.
    let split = json!([{"route": [
        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
        {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20},
    ]}]);
    api.put(reviews_vs(split)).unwrap();
    within(Duration::from_secs(5), "80/20 VirtualService", || {
        requests(client, &reviews, 40, &[]).iter().any(|(_, by)| by == "reviews-v1")
    });
    let got = requests(client, &reviews, 400, &[]);
    let v2 = got.iter().filter(|(s, by)| *s == 200 && by == "reviews-v2").count();
    let v1 = got.iter().filter(|(s, by)| *s == 200 && by == "reviews-v1").count();
    assert_eq!(v1 + v2, 400, "{:?}", served_by(&got));
    // 400 draws of p=0.2: σ = 8, so ±40 is five sigma.
    assert!((40..=120).contains(&v2), "v2 got {v2} of 400, expected about 80 (20%)");
    let fault =
        json!([{"route": [to_subset("v2")], "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 50}}}}]);
    api.put(reviews_vs(fault)).unwrap();
    within(Duration::from_secs(5), "fault VirtualService", || {
        requests(client, &reviews, 20, &[]).iter().any(|(s, _)| *s == 503)
    });
    let faulted = requests(client, &reviews, 200, &[]);
    let aborted = faulted.iter().filter(|(s, _)| *s == 503).count();
    let ok = faulted.iter().filter(|(s, by)| *s == 200 && by == "reviews-v2").count();
    assert_eq!(aborted + ok, 200, "{:?}", served_by(&faulted));
    assert!((65..=135).contains(&aborted), "fault abort 50%: {aborted} of 200 aborted");
    api.put(reviews_vs(json!([{"route": [to_subset("v2")]}]))).unwrap();
    within(Duration::from_secs(5), "100% v2 again", || {
        requests(client, &reviews, 20, &[]).iter().all(|(s, by)| *s == 200 && by == "reviews-v2")
    });

    // (3) An L7 DENY AuthorizationPolicy on the waypoint, through the API: POST /admin/* is 403 with
    // Istio's body, GET still passes.
    api.put(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-admin", "namespace": NS},
        "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                 "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"], "paths": ["/admin/*"]}}]}]},
    }))
    .unwrap();
    let post_admin = || {
        let out = client
            .exec(
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "10",
                    "-w",
                    "\n%{http_code}",
                    "-X",
                    "POST",
                    &format!("http://{REVIEWS_VIP}/admin/users"),
                ],
                Duration::from_secs(15),
            )
            .unwrap();
        let (body, code) =
            out.stdout.rsplit_once('\n').map(|(b, c)| (b.to_string(), c.trim().to_string())).unwrap_or_default();
        (code, body)
    };
    within(Duration::from_secs(10), "L7 DENY AuthorizationPolicy", || post_admin().0 == "403");
    let (code, body) = post_admin();
    assert_eq!(code, "403");
    assert!(body.contains("RBAC: access denied"), "Istio's denial body, got {body:?}");
    assert_eq!(
        served_by(&requests(client, &format!("http://{REVIEWS_VIP}/admin/users"), 5, &[])),
        only("200 reviews-v2", 5)
    );

    // (4) A VirtualService whose first rule has an invalid regex: that rule is left out and logged
    // with its field; the VirtualService's other rule and everything else keep routing.
    api.put(ratings_vs("(unclosed")).unwrap();
    let field = "spec.http[0].match[0].headers.user-agent.regex";
    within(Duration::from_secs(10), "log line for the invalid regex", || {
        waypoint
            .log()
            .lines()
            .any(|l| l.contains("configuration left out") && l.contains("ratings-ua") && l.contains(field))
    });
    let safari = "User-Agent: Mozilla/5.0 (Macintosh) Version/17.0 Safari/605.1.15";
    within(Duration::from_secs(5), "ratings VirtualService without its bad rule", || {
        served_by(&requests(client, &ratings, 4, &["User-Agent: curl/8"])) == only("200 reviews-v2", 4)
    });
    assert_eq!(served_by(&requests(client, &ratings, 10, &[safari])), only("200 reviews-v2", 10), "bad rule left out");
    assert_eq!(served_by(&requests(client, &ratings, 10, &["User-Agent: curl/8"])), only("200 reviews-v2", 10));
    assert_eq!(served_by(&requests(client, &reviews, 10, &[])), only("200 reviews-v2", 10), "reviews keeps its VS");
    assert_eq!(post_admin().0, "403", "the L7 policy still applies");
    // Fixed through the API: the rule applies and the problem is reported resolved.
    api.put(ratings_vs(".*Safari.*")).unwrap();
    within(Duration::from_secs(5), "fixed ratings VirtualService", || {
        requests(client, &ratings, 1, &[safari]) == [(200, "reviews-v1".to_string())]
    });
    assert_eq!(served_by(&requests(client, &ratings, 10, &[safari])), only("200 reviews-v1", 10));
    assert_eq!(served_by(&requests(client, &ratings, 10, &["User-Agent: curl/8"])), only("200 reviews-v2", 10));
    within(Duration::from_secs(5), "log line: problem resolved", || {
        waypoint.log().lines().any(|l| l.contains("configuration problem resolved") && l.contains("ratings-ua"))
    });

    // (5) Resilience from the objects applied at the start. Every second answer of `flaky` is a 503:
    // without retries half fail, with them none does, and each answer still comes from flaky.
    let t_resil = Instant::now();
    let bare = requests(client, &format!("http://{FLAKY_VIP}/no-retry"), 20, &[]);
    let want = BTreeMap::from([("200 flaky".to_string(), 10), ("503 flaky".to_string(), 10)]);
    assert_eq!(served_by(&bare), want, "without retries every second request fails");
    let retried = requests(client, &format!("http://{FLAKY_VIP}/"), 20, &[]);
    assert_eq!(served_by(&retried), only("200 flaky", 20), "retries should hide the flaky backend");
    // A 3 s backend behind a 500 ms route timeout: 504 after about half a second, from the waypoint.
    let started = Instant::now();
    let slow = requests(client, &format!("http://{SLOW_VIP}/"), 1, &[]);
    let took = started.elapsed();
    assert_eq!(slow[0].0, 504, "route timeout should answer 504: {slow:?}");
    assert!(took >= Duration::from_millis(400), "504 after {took:?}: sooner than the 500 ms timeout");
    assert!(took < Duration::from_millis(2500), "504 took {took:?}: the timeout did not cut the 3 s backend");
    // Outlier detection: the always-failing endpoint is ejected after 2 consecutive 5xx, then only
    // the good one answers (round robin would otherwise give it every second request).
    let warmup = requests(client, &format!("http://{POOL_VIP}/"), 10, &[]);
    let bad = warmup.iter().filter(|(s, by)| *s == 500 && by == "pool-bad").count();
    assert!((1..=5).contains(&bad), "pool-bad should be tried, then ejected: {:?}", served_by(&warmup));
    assert_eq!(served_by(&requests(client, &format!("http://{POOL_VIP}/"), 20, &[])), only("200 pool-good", 20));
    // Local rate limit (EnvoyFilter through the API): 5 tokens per minute, then 429 from the waypoint.
    let limited = requests(client, &format!("http://{LIMITED_VIP}/"), 7, &[]);
    let codes: Vec<u16> = limited.iter().map(|(s, _)| *s).collect();
    assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429], "token bucket of 5: {limited:?}");
    let took_resil = t_resil.elapsed();

    // The waypoint's certificate came from `weft ca` for its own ServiceAccount, and it saw the
    // client's identity on every tunnel.
    let own = format!("issued workload certificate identity={}", spiffe(NS, "waypoint"));
    assert!(waypoint.log().contains(&own), "no certificate from the CA for the waypoint's own identity");
    let want = [
        ("reporter", "waypoint"),
        ("source_principal", &*spiffe(NS, "client")),
        ("destination_service_name", "reviews"),
        ("response_code", "200"),
    ];
    let total = waypoint.metrics().unwrap().sum("istio_requests_total", &want);
    assert!(total >= 100.0, "istio_requests_total{want:?} = {total}");

    // One waypoint process throughout: the changes were applied live.
    assert_eq!(waypoint.log().matches("waypoint listening").count(), 1, "the waypoint restarted");

    drop(waypoint);
    drop(agent);
    drop(cluster);
    eprintln!(
        "waypoint_cluster: ready after {t_ready:?}; first VirtualService in effect after {took_vs:?}, \
         change after {took_change:?}; resilience checks {took_resil:?}; total {:?}",
        t0.elapsed()
    );
}
