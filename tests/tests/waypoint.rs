//! The L7 waypoint end to end in netns pods (local mode): a service labelled
//! `istio.io/use-waypoint` is reached through `weft waypoint`, which applies Istio's
//! VirtualService / DestinationRule / AuthorizationPolicy / local rate limit unchanged — the three
//! canonical routing examples, a retry hiding a flaky backend, a timeout, a 50% fault abort, an
//! ejected failing endpoint, a 429 after the limit and a 403 from an L7 DENY policy.
//! Needs root and the agent binary (`cargo xtask test` provides both).

use std::collections::BTreeMap;
use std::time::Duration;

use weft_tests::mesh::spiffe;
use weft_tests::scenario::MESH_NS;
use weft_tests::topology::TopologyBuilder;
use weft_tests::waypoint::{GATEWAY_NAME_LABEL, served_by};
use weft_tests::{
    Agent, AgentOptions, Mode, Pod, PodSpec, ServiceSpec, Topology, Waypoint, poll, require_root, weft_bin,
};

const WAYPOINT_VIP: &str = "10.96.1.100";
const REVIEWS_VIP: &str = "10.96.1.1";
const FLAKY_VIP: &str = "10.96.1.2";
const SLOW_VIP: &str = "10.96.1.3";
const POOL_VIP: &str = "10.96.1.4";

/// Namespace `demo` (ambient, bound to waypoint `waypoint`): client, the waypoint pod (opted out
/// of capture, as Istio's waypoints are), reviews v1/v2, a flaky, a slow and a pool of one good
/// and one failing endpoint.
fn topology(name: &str) -> TopologyBuilder {
    let app = |pod: &str, app: &str, version: &str| {
        PodSpec::new(pod, MESH_NS).sa(app).label("app", app).label("version", version).port("http", 8080)
    };
    let svc = |name: &str, vip: &str| {
        ServiceSpec::new(name, MESH_NS, vip)
            .http_port(80, 8080)
            .selector("app", name)
            .label("istio.io/use-waypoint", "waypoint")
    };
    Topology::builder(name)
        .namespace(MESH_NS, Mode::Ambient)
        .pod(PodSpec::new("client", MESH_NS).sa("client"))
        .pod(
            PodSpec::new("waypoint", MESH_NS)
                .sa("waypoint")
                .label(GATEWAY_NAME_LABEL, "waypoint")
                .label("istio.io/dataplane-mode", "none"),
        )
        .pod(app("reviews-v1", "reviews", "v1"))
        .pod(app("reviews-v2", "reviews", "v2"))
        .pod(app("flaky", "flaky", "v1"))
        .pod(app("slow", "slow", "v1"))
        .pod(app("pool-good", "pool", "v1"))
        .pod(app("pool-bad", "pool", "v1"))
        .service(
            ServiceSpec::new("waypoint", MESH_NS, WAYPOINT_VIP)
                .port(15008, 15008)
                .selector(GATEWAY_NAME_LABEL, "waypoint"),
        )
        .service(svc("reviews", REVIEWS_VIP))
        .service(svc("flaky", FLAKY_VIP))
        .service(svc("slow", SLOW_VIP))
        .service(svc("pool", POOL_VIP))
}

fn gateway() -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: waypoint, namespace: {MESH_NS} }}
spec:
  gatewayClassName: weft-waypoint
  listeners:
  - {{ name: mesh, port: 15008, protocol: HBONE }}
"#
    )
}

fn reviews_subsets() -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews, namespace: {MESH_NS} }}
spec:
  host: reviews
  subsets:
  - {{ name: v1, labels: {{ version: v1 }} }}
  - {{ name: v2, labels: {{ version: v2 }} }}
"#
    )
}

/// [`weft_tests::waypoint::requests`] with this suite's curl limit.
fn requests(pod: &Pod, url: &str, n: usize, headers: &[&str]) -> Vec<(u16, String)> {
    weft_tests::waypoint::requests(pod, url, n, headers, Duration::from_secs(60))
}

/// Rewrites mesh.yaml with `docs` and waits until `check` holds (both the agent and the waypoint
/// watch the file).
fn apply(topo: &Topology, docs: &[String], what: &str, check: impl Fn() -> bool) {
    topo.write_mesh(docs).unwrap();
    let ok = poll(Duration::from_secs(10), Duration::from_millis(300), || check().then_some(()));
    assert!(ok.is_some(), "{what}: configuration not in effect within 10 s");
}

#[test]
fn canonical_routing_examples_through_the_waypoint() {
    require_root();
    let topo = topology("wproute").build().unwrap();
    let base = vec![gateway(), reviews_subsets()];
    topo.write_mesh(&base).unwrap();
    let _servers: Vec<_> = ["reviews-v1", "reviews-v2"].iter().map(|p| topo.pod(p).serve_http(8080).unwrap()).collect();
    let _agent = Agent::start(&topo, AgentOptions::for_topology(&topo)).unwrap();
    let waypoint = Waypoint::start(&topo, &weft_bin(), "waypoint", MESH_NS, "waypoint").unwrap();
    let client = topo.pod("client");
    let url = format!("http://{REVIEWS_VIP}/reviews");

    // 1. `end-user: jason` → v2, everyone else → v1.
    let jason = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: reviews, namespace: {MESH_NS} }}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {{ exact: jason }}
    route:
    - destination: {{ host: reviews, subset: v2 }}
  - route:
    - destination: {{ host: reviews, subset: v1 }}
"#
    );
    let docs = [base.clone(), vec![jason]].concat();
    // Before the reload the default route spreads over both versions: only a run of answers that
    // all follow the rule shows it is in force.
    apply(&topo, &docs, "end-user VirtualService", || {
        requests(client, &url, 4, &["end-user: jason"]).iter().all(|(s, by)| *s == 200 && by == "reviews-v2")
            && requests(client, &url, 4, &["end-user: mallory"]).iter().all(|(s, by)| *s == 200 && by == "reviews-v1")
    });
    let as_jason = served_by(&requests(client, &url, 20, &["end-user: jason"]));
    assert_eq!(as_jason, BTreeMap::from([("200 reviews-v2".to_string(), 20)]), "end-user: jason must reach v2 only");
    let others = served_by(&requests(client, &url, 20, &["end-user: mallory"]));
    assert_eq!(others, BTreeMap::from([("200 reviews-v1".to_string(), 20)]), "everyone else must reach v1 only");

    // 2. 80/20 between v1 and v2.
    let split = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: reviews, namespace: {MESH_NS} }}
spec:
  hosts: [reviews.{MESH_NS}.svc.cluster.local]
  http:
  - route:
    - {{ destination: {{ host: reviews, subset: v1 }}, weight: 80 }}
    - {{ destination: {{ host: reviews, subset: v2 }}, weight: 20 }}
"#
    );
    let docs = [base.clone(), vec![split]].concat();
    apply(&topo, &docs, "80/20 VirtualService", || {
        requests(client, &url, 40, &[]).iter().any(|(_, by)| by == "reviews-v2")
            && requests(client, &url, 1, &["end-user: jason"]).iter().all(|(s, _)| *s == 200)
    });
    let got = requests(client, &url, 400, &[]);
    let v2 = got.iter().filter(|(s, by)| *s == 200 && by == "reviews-v2").count();
    let v1 = got.iter().filter(|(s, by)| *s == 200 && by == "reviews-v1").count();
    assert_eq!(v1 + v2, 400, "every request answered by v1 or v2: {:?}", served_by(&got));
    // 400 draws of p=0.2: σ = 8, so ±40 is five sigma.
    assert!((40..=120).contains(&v2), "v2 got {v2} of 400, expected about 80 (20%)");

    // 3. user-agent `.*Safari.*` → v1, everything else → v2.
    let safari = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: reviews, namespace: {MESH_NS} }}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        user-agent: {{ regex: ".*Safari.*" }}
    route:
    - destination: {{ host: reviews, subset: v1 }}
  - route:
    - destination: {{ host: reviews, subset: v2 }}
"#
    );
    let docs = [base.clone(), vec![safari]].concat();
    let mac =
        "User-Agent: Mozilla/5.0 (Macintosh) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Safari/605.1.15";
    apply(&topo, &docs, "Safari VirtualService", || {
        requests(client, &url, 4, &["User-Agent: curl/8"]).iter().all(|(s, by)| *s == 200 && by == "reviews-v2")
            && requests(client, &url, 4, &[mac]).iter().all(|(s, by)| *s == 200 && by == "reviews-v1")
    });
    assert_eq!(served_by(&requests(client, &url, 10, &[mac])), BTreeMap::from([("200 reviews-v1".to_string(), 10)]));
    assert_eq!(
        served_by(&requests(client, &url, 10, &["User-Agent: curl/8"])),
        BTreeMap::from([("200 reviews-v2".to_string(), 10)])
    );

    // The waypoint reports Istio's request metrics with the client's identity.
    let want = [
        ("reporter", "waypoint"),
        ("source_principal", &*spiffe(MESH_NS, "client")),
        ("destination_service_name", "reviews"),
        ("response_code", "200"),
    ];
    let total = waypoint.metrics().unwrap().sum("istio_requests_total", &want);
    assert!(total >= 460.0, "istio_requests_total{want:?} = {total}; metrics:\n{}", waypoint.metrics_text().unwrap());
}

#[test]
fn resilience_and_l7_policy_through_the_waypoint() {
    require_root();
    let topo = topology("wpresil").build().unwrap();
    let flaky_rules = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: flaky, namespace: {MESH_NS} }}
spec:
  hosts: [flaky]
  http:
  - match:
    - uri: {{ prefix: /no-retry }}
    route:
    - destination: {{ host: flaky }}
    retries: {{ attempts: 0 }}
  - match:
    - uri: {{ prefix: /fault }}
    route:
    - destination: {{ host: reviews }}
    fault:
      abort: {{ httpStatus: 503, percentage: {{ value: 50 }} }}
  - route:
    - destination: {{ host: flaky }}
    retries: {{ attempts: 3, perTryTimeout: 2s, retryOn: 5xx }}
"#
    );
    let slow_rules = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: slow, namespace: {MESH_NS} }}
spec:
  hosts: [slow]
  http:
  - route:
    - destination: {{ host: slow }}
    timeout: 500ms
"#
    );
    let pool_rules = format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: pool, namespace: {MESH_NS} }}
spec:
  host: pool
  trafficPolicy:
    loadBalancer: {{ simple: ROUND_ROBIN }}
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 60s
      maxEjectionPercent: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: pool, namespace: {MESH_NS} }}
spec:
  hosts: [pool]
  http:
  - route:
    - destination: {{ host: pool }}
    retries: {{ attempts: 0 }}
"#
    );
    let deny_admin = format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{ name: deny-admin, namespace: {MESH_NS} }}
spec:
  targetRefs:
  - {{ kind: Gateway, group: gateway.networking.k8s.io, name: waypoint }}
  action: DENY
  rules:
  - to:
    - operation: {{ methods: [POST], paths: ["/admin/*"] }}
"#
    );
    let rate_limit = format!(
        r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{ name: reviews-ratelimit, namespace: {MESH_NS} }}
spec:
  targetRefs:
  - {{ kind: Service, group: "", name: reviews }}
  configPatches:
  - applyTo: HTTP_FILTER
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value:
            stat_prefix: http_local_rate_limiter
            token_bucket: {{ max_tokens: 5, tokens_per_fill: 5, fill_interval: 60s }}
            filter_enabled:
              runtime_key: local_rate_limit_enabled
              default_value: {{ numerator: 100, denominator: HUNDRED }}
            filter_enforced:
              runtime_key: local_rate_limit_enforced
              default_value: {{ numerator: 100, denominator: HUNDRED }}
"#
    );
    topo.write_mesh(&[gateway(), flaky_rules, slow_rules, pool_rules, deny_admin, rate_limit]).unwrap();
    let _reviews = topo.pod("reviews-v1").serve_http(8080).unwrap();
    let _reviews2 = topo.pod("reviews-v2").serve_http(8080).unwrap();
    let _flaky = topo.pod("flaky").serve_http_with(8080, &["--fail-every", "2"]).unwrap();
    let _slow = topo.pod("slow").serve_http_with(8080, &["--delay-ms", "3000"]).unwrap();
    let _good = topo.pod("pool-good").serve_http(8080).unwrap();
    let _bad = topo.pod("pool-bad").serve_http_with(8080, &["--fail-every", "1", "--fail-status", "500"]).unwrap();
    let _agent = Agent::start(&topo, AgentOptions::for_topology(&topo)).unwrap();
    let _waypoint = Waypoint::start(&topo, &weft_bin(), "waypoint", MESH_NS, "waypoint").unwrap();
    let client = topo.pod("client");

    // Every second answer of `flaky` is a 503: without retries half fail, with them none does.
    let bare = requests(client, &format!("http://{FLAKY_VIP}/no-retry"), 20, &[]);
    let failed = bare.iter().filter(|(s, _)| *s == 503).count();
    assert!((8..=12).contains(&failed), "without retries about half should fail: {:?}", served_by(&bare));
    let retried = requests(client, &format!("http://{FLAKY_VIP}/"), 20, &[]);
    assert!(retried.iter().all(|(s, _)| *s == 200), "retries should hide the flaky backend: {:?}", served_by(&retried));

    // A 3 s backend behind a 500 ms route timeout: 504 after about half a second.
    let started = std::time::Instant::now();
    let slow = requests(client, &format!("http://{SLOW_VIP}/"), 1, &[]);
    let took = started.elapsed();
    assert_eq!(slow[0].0, 504, "route timeout should answer 504");
    assert!(took < Duration::from_millis(2500), "504 took {took:?}: the timeout did not cut the 3 s backend");

    // Fault abort of 50%: 200 requests, expect 100 ± 35 aborted with 503.
    let faulted = requests(client, &format!("http://{FLAKY_VIP}/fault"), 200, &[]);
    let aborted = faulted.iter().filter(|(s, _)| *s == 503).count();
    let ok = faulted.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(aborted + ok, 200, "{:?}", served_by(&faulted));
    assert!((65..=135).contains(&aborted), "fault abort 50%: {aborted} of 200 aborted");

    // Outlier detection: the always-failing endpoint is ejected after 2 consecutive 5xx; then
    // only the good one answers.
    let warmup = requests(client, &format!("http://{POOL_VIP}/"), 10, &[]);
    assert!(warmup.iter().any(|(s, _)| *s == 500), "the bad endpoint should have been tried: {:?}", served_by(&warmup));
    let after = requests(client, &format!("http://{POOL_VIP}/"), 20, &[]);
    assert_eq!(
        served_by(&after),
        BTreeMap::from([("200 pool-good".to_string(), 20)]),
        "the failing endpoint should be ejected"
    );

    // Local rate limit on reviews: 5 tokens per minute, the 6th request gets 429.
    let limited = requests(client, &format!("http://{REVIEWS_VIP}/"), 7, &[]);
    let codes: Vec<u16> = limited.iter().map(|(s, _)| *s).collect();
    assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429], "token bucket of 5");

    // L7 DENY: POST /admin/* is refused with 403 by the waypoint, GET still passes.
    let post = client
        .exec(
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                &format!("http://{SLOW_VIP}/admin/users"),
            ],
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(post.stdout.trim(), "403", "POST /admin/* should be denied: {post}");
    let body = client
        .exec(&["curl", "-sS", "-X", "POST", &format!("http://{FLAKY_VIP}/admin/x")], Duration::from_secs(10))
        .unwrap();
    assert!(body.stdout.contains("RBAC: access denied"), "Istio's denial body: {body}");
}
