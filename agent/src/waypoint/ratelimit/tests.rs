//! Rate limit tests: EnvoyFilters as Istio's docs write them, buckets driven by tokio's paused clock.

use std::time::Duration;

use serde::Deserialize;

use super::*;
use crate::identity::Identity;
use crate::state::{RoutingConfig, ServicePort, USE_WAYPOINT_LABEL, Workload};

fn workload(name: &str, labels: &[(&str, &str)]) -> Arc<Workload> {
    Arc::new(Workload {
        name: name.into(),
        namespace: "demo".into(),
        service_account: "default".into(),
        labels: Arc::new(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ips: vec!["10.0.0.1".parse().unwrap()],
        node: None,
        uid: None,
        netns: None,
        captured: true,
        identity: Identity::new("cluster.local", "demo", "default"),
        workload_name: name.into(),
    })
}

fn service(name: &str, vip: &str, waypoint: Option<&str>, app: &str) -> Arc<Service> {
    Arc::new(Service {
        name: name.into(),
        namespace: "demo".into(),
        vips: vec![vip.parse().unwrap()],
        ports: vec![ServicePort { name: Some("http".into()), port: 9080, target_port: 9080, app_protocol: None }],
        labels: waypoint.map(|w| [(USE_WAYPOINT_LABEL.to_string(), w.to_string())].into()).unwrap_or_default(),
        endpoints: vec![workload(&format!("{name}-v1"), &[("app", app)])],
    })
}

fn state(yaml: &str) -> State {
    let wp = service("waypoint", "10.96.0.100", None, "waypoint");
    let reviews = service("reviews", "10.96.0.1", Some("waypoint"), "reviews");
    let ratings = service("ratings", "10.96.0.2", Some("waypoint"), "ratings");
    let other = service("details", "10.96.0.3", None, "details");
    let envoy_filters = serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde_yaml_ng::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| serde_yaml_ng::from_value(v).unwrap())
        .collect();
    State {
        services_by_vip: [wp, reviews, ratings, other].into_iter().map(|s| (s.vips[0], s)).collect(),
        routing: Arc::new(RoutingConfig { envoy_filters, ..RoutingConfig::default() }),
        ..State::default()
    }
}

fn me() -> WaypointId {
    WaypointId { namespace: "demo".into(), name: "waypoint".into() }
}

fn svc<'a>(s: &'a State, name: &str) -> &'a Arc<Service> {
    s.service("demo", name).unwrap()
}

/// Istio's "Enabling Rate Limits using Envoy" local rate limit, with a configurable scope and bucket.
fn http_filter(name: &str, scope: &str, bucket: &str, extra: &str) -> String {
    format!(
        r#"---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{name: {name}, namespace: demo}}
spec:
  {scope}
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: SIDECAR_INBOUND
        listener:
          filterChain:
            filter:
              name: "envoy.filters.network.http_connection_manager"
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.local_ratelimit
          typed_config:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
              {bucket}
              filter_enabled:
                runtime_key: local_rate_limit_enabled
                default_value:
                  numerator: 100
                  denominator: HUNDRED
              filter_enforced:
                runtime_key: local_rate_limit_enforced
                default_value:
                  numerator: 100
                  denominator: HUNDRED
              response_headers_to_add:
                - append: false
                  header:
                    key: x-local-rate-limit
                    value: 'true'
              {extra}
"#
    )
}

const BUCKET_4_PER_MIN: &str = "token_bucket: {max_tokens: 4, tokens_per_fill: 4, fill_interval: 60s}";
const TO_WAYPOINT: &str = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]";

fn count_allowed(rl: &RateLimits, s: &Service, route: &str, n: usize) -> usize {
    (0..n).filter(|_| rl.check(s, route).is_ok()).count()
}

#[tokio::test(start_paused = true)]
async fn bucket_limits_and_refills_per_service() {
    let st = state(&http_filter("rl", TO_WAYPOINT, BUCKET_4_PER_MIN, ""));
    let rl = RateLimits::new();
    assert_eq!(rl.update(&st, &me()), vec![]);
    let (reviews, ratings) = (svc(&st, "reviews"), svc(&st, "ratings"));
    assert_eq!(count_allowed(&rl, reviews, "default", 10), 4);
    // Each service has its own bucket.
    assert_eq!(count_allowed(&rl, ratings, "default", 10), 4);
    // Not served by this waypoint: never limited.
    assert_eq!(count_allowed(&rl, svc(&st, "details"), "default", 10), 10);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(rl.check(reviews, "default").is_err(), "no refill before the interval");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(count_allowed(&rl, reviews, "default", 10), 4, "a whole fill after 60s");
    // Several intervals never overfill the bucket.
    tokio::time::advance(Duration::from_secs(600)).await;
    assert_eq!(count_allowed(&rl, reviews, "default", 10), 4);
}

#[tokio::test(start_paused = true)]
async fn limited_response_is_envoys() {
    let st = state(&http_filter("rl", TO_WAYPOINT, BUCKET_4_PER_MIN, ""));
    let rl = RateLimits::new();
    rl.update(&st, &me());
    let reviews = svc(&st, "reviews");
    count_allowed(&rl, reviews, "r", 4);
    let limited = rl.check(reviews, "r").unwrap_err();
    let r = limited.response();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body().as_ref(), b"local_rate_limited");
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.headers()["x-local-rate-limit"], "true");
    assert!(r.headers().get("x-ratelimit-limit").is_none(), "only with enable_x_ratelimit_headers");
    assert_eq!(&*limited.origin, "EnvoyFilter demo/rl configPatches[0]");
    let g = limited.grpc_response();
    assert_eq!(g.status(), StatusCode::OK);
    assert_eq!(g.headers()["grpc-status"], "14");
    assert_eq!(g.headers()["grpc-message"], "local_rate_limited");
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_headers_status_and_resource_exhausted() {
    let extra = "enable_x_ratelimit_headers: DRAFT_VERSION_03\n              status: {code: ServiceUnavailable}\n              rate_limited_as_resource_exhausted: true";
    let st = state(&http_filter(
        "rl",
        TO_WAYPOINT,
        "token_bucket: {max_tokens: 2, tokens_per_fill: 1, fill_interval: 10s}",
        extra,
    ));
    let rl = RateLimits::new();
    assert_eq!(rl.update(&st, &me()), vec![]);
    let reviews = svc(&st, "reviews");
    let p = rl.check_request(reviews, "r").unwrap();
    assert_eq!(p.response_headers["x-ratelimit-limit"], "2");
    assert_eq!(p.response_headers["x-ratelimit-remaining"], "1");
    assert_eq!(p.response_headers["x-ratelimit-reset"], "10");
    tokio::time::advance(Duration::from_millis(2500)).await;
    let p = rl.check_request(reviews, "r").unwrap();
    assert_eq!(p.response_headers["x-ratelimit-remaining"], "0");
    assert_eq!(p.response_headers["x-ratelimit-reset"], "8", "7.5 s rounded up");
    let limited = rl.check_request(reviews, "r").unwrap_err();
    let r = limited.response();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(limited.grpc_response().headers()["grpc-status"], "8");
    tokio::time::advance(Duration::from_millis(7500)).await;
    assert!(rl.check(reviews, "r").is_ok(), "one token per 10 s");
    assert!(rl.check(reviews, "r").is_err());
}

#[tokio::test(start_paused = true)]
async fn not_enforced_only_marks_the_request_and_disabled_does_nothing() {
    let yaml = http_filter("rl", TO_WAYPOINT, "token_bucket: {max_tokens: 1, fill_interval: 1s}", "").replace(
        "numerator: 100\n                  denominator: HUNDRED\n              response",
        "numerator: 0\n                  denominator: HUNDRED\n              response",
    ) + "              request_headers_to_add_when_not_enforced: [{header: {key: x-over-limit, value: 'yes'}}]\n";
    let st = state(&yaml);
    let rl = RateLimits::new();
    assert_eq!(rl.update(&st, &me()), vec![]);
    let reviews = svc(&st, "reviews");
    let first = rl.check_request(reviews, "r").unwrap();
    assert!(first.request_headers.is_empty());
    let second = rl.check_request(reviews, "r").unwrap();
    assert_eq!(second.request_headers["x-over-limit"], "yes");

    // Without filter_enabled, Envoy's filter is off.
    let yaml = http_filter("rl", TO_WAYPOINT, "token_bucket: {max_tokens: 1, fill_interval: 1s}", "")
        .replace("              filter_enabled:\n                runtime_key: local_rate_limit_enabled\n                default_value:\n                  numerator: 100\n                  denominator: HUNDRED\n", "");
    let st = state(&yaml);
    let rl = RateLimits::new();
    assert_eq!(rl.update(&st, &me()), vec![]);
    assert_eq!(count_allowed(&rl, svc(&st, "reviews"), "r", 5), 5);
}

#[tokio::test(start_paused = true)]
async fn scopes() {
    let cases: [(&str, &str, [usize; 2]); 7] = [
        ("targetRef to the waypoint Gateway", TO_WAYPOINT, [1, 1]),
        ("targetRef to a Service", "targetRefs: [{kind: Service, group: \"\", name: ratings}]", [3, 1]),
        (
            "targetRef to another Gateway",
            "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other}]",
            [3, 3],
        ),
        (
            "workloadSelector on the waypoint's pods",
            "workloadSelector: {labels: {gateway.networking.k8s.io/gateway-name: waypoint}}",
            [1, 1],
        ),
        ("workloadSelector on an app's pods", "workloadSelector: {labels: {app: reviews}}", [1, 3]),
        ("workloadSelector matching nothing", "workloadSelector: {labels: {app: nope}}", [3, 3]),
        ("namespace-wide", "", [1, 1]),
    ];
    for (name, scope, [want_reviews, want_ratings]) in cases {
        let st = state(&http_filter("rl", scope, "token_bucket: {max_tokens: 1, fill_interval: 60s}", ""));
        let rl = RateLimits::new();
        assert_eq!(rl.update(&st, &me()), vec![], "{name}");
        assert_eq!(count_allowed(&rl, svc(&st, "reviews"), "r", 3), want_reviews, "{name}: reviews");
        assert_eq!(count_allowed(&rl, svc(&st, "ratings"), "r", 3), want_ratings, "{name}: ratings");
    }
}

fn route_patch(route_name: Option<&str>, direct: bool) -> String {
    let route = route_name.map(|r| format!("\n            route:\n              name: {r}")).unwrap_or_default();
    let typed = if direct {
        "\"@type\": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n              stat_prefix: per_route\n              token_bucket: {max_tokens: 2, tokens_per_fill: 2, fill_interval: 60s}\n              filter_enabled: {runtime_key: e, default_value: {numerator: 100, denominator: HUNDRED}}\n              filter_enforced: {runtime_key: f, default_value: {numerator: 100, denominator: HUNDRED}}"
    } else {
        "\"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n              type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n              value:\n                stat_prefix: per_route\n                token_bucket: {max_tokens: 2, tokens_per_fill: 2, fill_interval: 60s}\n                filter_enabled: {runtime_key: e, default_value: {numerator: 100, denominator: HUNDRED}}\n                filter_enforced: {runtime_key: f, default_value: {numerator: 100, denominator: HUNDRED}}"
    };
    format!(
        r#"---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{name: per-route, namespace: demo}}
spec:
  {TO_WAYPOINT}
  configPatches:
    - applyTo: HTTP_ROUTE
      match:
        context: SIDECAR_INBOUND
        routeConfiguration:
          vhost:
            name: "inbound|http|9080"{route}
      patch:
        operation: MERGE
        value:
          typed_per_filter_config:
            envoy.filters.http.local_ratelimit:
              {typed}
"#
    )
}

#[tokio::test(start_paused = true)]
async fn per_route_buckets_replace_the_filter_level_one() {
    // Filter enabled without a bucket (as Istio's per-route example does), plus a bucket of 2 for
    // the VirtualService route named "v2-only".
    let filter = http_filter("rl", TO_WAYPOINT, "", "");
    for direct in [false, true] {
        let st = state(&format!("{filter}{}", route_patch(Some("v2-only"), direct)));
        let rl = RateLimits::new();
        assert_eq!(rl.update(&st, &me()), vec![], "direct={direct}");
        let reviews = svc(&st, "reviews");
        assert_eq!(count_allowed(&rl, reviews, "v2-only", 5), 2, "direct={direct}");
        assert_eq!(count_allowed(&rl, reviews, "other", 5), 5, "filter level has no bucket");
    }
    // A route patch without a route name covers every route, each service its own bucket.
    let st = state(&format!("{}{}", http_filter("rl", TO_WAYPOINT, BUCKET_4_PER_MIN, ""), route_patch(None, false)));
    let rl = RateLimits::new();
    assert_eq!(rl.update(&st, &me()), vec![]);
    assert_eq!(count_allowed(&rl, svc(&st, "reviews"), "a", 5), 2);
    assert_eq!(count_allowed(&rl, svc(&st, "reviews"), "b", 5), 2, "one bucket per (service, route)");
}

#[tokio::test(start_paused = true)]
async fn buckets_survive_updates_unless_their_config_changes() {
    let st = state(&http_filter("rl", TO_WAYPOINT, BUCKET_4_PER_MIN, ""));
    let rl = RateLimits::new();
    rl.update(&st, &me());
    assert_eq!(count_allowed(&rl, svc(&st, "reviews"), "r", 3), 3);
    rl.update(&st, &me());
    assert_eq!(count_allowed(&rl, svc(&st, "reviews"), "r", 3), 1, "same config: tokens kept");
    let st = state(&http_filter(
        "rl",
        TO_WAYPOINT,
        "token_bucket: {max_tokens: 5, tokens_per_fill: 5, fill_interval: 60s}",
        "",
    ));
    rl.update(&st, &me());
    assert_eq!(count_allowed(&rl, svc(&st, "reviews"), "r", 9), 5, "new config: new bucket");
    let st = state("");
    rl.update(&st, &me());
    assert_eq!(count_allowed(&rl, svc(&st, "reviews"), "r", 9), 9, "filter removed");
}

#[tokio::test(start_paused = true)]
async fn everything_else_is_a_config_error_and_the_rest_applies() {
    let lua = format!(
        "---\napiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {{name: lua, namespace: demo}}\nspec:\n  {TO_WAYPOINT}\n  configPatches:\n  - applyTo: HTTP_FILTER\n    patch:\n      operation: INSERT_BEFORE\n      value:\n        name: envoy.filters.http.lua\n        typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua}}\n  - applyTo: CLUSTER\n    patch: {{operation: MERGE, value: {{}}}}\n"
    );
    let cases: Vec<(String, &str, &str)> = vec![
        (
            http_filter("bad", TO_WAYPOINT, "token_bucket: {max_tokens: 0, fill_interval: 1s}", ""),
            "token_bucket.max_tokens",
            "at least 1",
        ),
        (
            http_filter("bad", TO_WAYPOINT, "token_bucket: {max_tokens: 3, fill_interval: 10ms}", ""),
            "token_bucket.fill_interval",
            "50ms",
        ),
        (
            http_filter("bad", TO_WAYPOINT, "token_bucket: {max_tokens: x, fill_interval: 1s}", ""),
            "token_bucket.max_tokens",
            "integer",
        ),
        (
            http_filter("bad", TO_WAYPOINT, BUCKET_4_PER_MIN, "descriptors: [{entries: [{key: a, value: b}]}]"),
            "descriptors",
            "not supported",
        ),
        (
            http_filter("bad", TO_WAYPOINT, BUCKET_4_PER_MIN, "").replace("udpa.type.v1.TypedStruct", "foo.Bar"),
            "typed_config.@type",
            "only the local rate limit",
        ),
    ];
    let good = http_filter("good", "targetRefs: [{kind: Service, group: \"\", name: ratings}]", BUCKET_4_PER_MIN, "");
    for (bad, field, reason) in cases {
        let st = state(&format!("{bad}{good}"));
        let rl = RateLimits::new();
        let errors = rl.update(&st, &me());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!((e.kind, e.namespace.as_str(), e.name.as_str()), ("EnvoyFilter", "demo", "bad"));
        assert!(
            e.field.starts_with("spec.configPatches[0].patch.value.typed_config") && e.field.ends_with(field),
            "{e}"
        );
        assert!(e.reason.contains(reason), "{e}");
        assert_eq!(count_allowed(&rl, svc(&st, "ratings"), "r", 9), 4, "the valid filter still applies");
        assert_eq!(count_allowed(&rl, svc(&st, "reviews"), "r", 9), 9);
    }
    let st = state(&lua);
    let errors = RateLimits::new().update(&st, &me());
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0].field, "spec.configPatches[0].patch.value.name");
    assert_eq!(errors[1].field, "spec.configPatches[1].applyTo");
    assert!(errors.iter().all(|e| e.reason.contains("only Istio's local rate limit")), "{errors:?}");
    // An EnvoyFilter for some other proxy is none of this waypoint's business.
    let st = state(&lua.replace("name: waypoint}]", "name: ingress}]"));
    assert_eq!(RateLimits::new().update(&st, &me()), vec![]);
}

#[test]
fn bucket_arithmetic() {
    let now = tokio::time::Instant::now();
    let spec = config::BucketSpec { max_tokens: 3, tokens_per_fill: 2, fill_interval: Duration::from_secs(1) };
    let b = Bucket::new(spec, now);
    let takes: Vec<bool> = (0..4).map(|_| b.take(now).allowed).collect();
    assert_eq!(takes, [true, true, true, false]);
    let t = b.take(now + Duration::from_millis(1500));
    assert_eq!((t.allowed, t.remaining, t.reset_secs), (true, 1, 1));
    let t = b.take(now + Duration::from_secs(10));
    assert_eq!((t.allowed, t.remaining, t.limit), (true, 2, 3), "capped at max_tokens");
}
