use kube::CustomResourceExt;

use super::*;

/// Istio's request-routing task (bookinfo `reviews`), with the traffic-shifting weights and a
/// user-agent regex rule as the docs show them, plus fault, retries and headers.
const REVIEWS_VS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: bookinfo
spec:
  hosts:
  - reviews
  http:
  - name: jason
    match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - match:
    - headers:
        user-agent:
          regex: ".*Safari.*"
      uri:
        prefix: /reviews
      ignoreUriCase: true
    route:
    - destination:
        host: reviews
        subset: v3
        port:
          number: 9080
    timeout: 0.5s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream
    fault:
      delay:
        percentage:
          value: 0.1
        fixedDelay: 7s
      abort:
        httpStatus: 500
        percentage:
          value: 100.0
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 80
      headers:
        response:
          set: {x-canary: "false"}
    - destination:
        host: reviews
        subset: v2
      weight: 20
    headers:
      request:
        add: {x-route: default}
        remove: [x-debug]
    mirror:
      host: reviews
      subset: v3
    mirrorPercentage:
      value: 50.0
"#;

#[test]
fn istio_docs_virtual_service_parses() {
    let vs: VirtualService = serde_yaml_ng::from_str(REVIEWS_VS).unwrap();
    assert_eq!(vs.spec.hosts, ["reviews"]);
    let [jason, safari, default] = &vs.spec.http[..] else { panic!("3 rules: {:?}", vs.spec.http) };
    assert_eq!(jason.name.as_deref(), Some("jason"));
    assert_eq!(jason.r#match[0].headers["end-user"].exact.as_deref(), Some("jason"));
    assert_eq!(jason.route[0].destination.subset.as_deref(), Some("v2"));
    assert_eq!(jason.route[0].weight, None);
    let m = &safari.r#match[0];
    assert_eq!(m.headers["user-agent"].regex.as_deref(), Some(".*Safari.*"));
    assert_eq!(m.uri.as_ref().unwrap().prefix.as_deref(), Some("/reviews"));
    assert!(m.ignore_uri_case);
    assert_eq!(safari.route[0].destination.port, Some(PortSelector { number: Some(9080) }));
    assert_eq!(safari.timeout.as_deref(), Some("0.5s"));
    let retries = safari.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, Some(3));
    assert_eq!(retries.per_try_timeout.as_deref(), Some("2s"));
    let fault = safari.fault.as_ref().unwrap();
    let delay = fault.delay.as_ref().unwrap();
    assert_eq!(delay.fixed_delay.as_deref(), Some("7s"));
    assert_eq!(delay.percentage.unwrap().value, 0.1);
    assert_eq!(fault.abort.as_ref().unwrap().http_status, Some(500));
    let weights: Vec<_> = default.route.iter().map(|r| r.weight).collect();
    assert_eq!(weights, [Some(80), Some(20)]);
    assert_eq!(default.route[0].headers.as_ref().unwrap().response.as_ref().unwrap().set["x-canary"], "false");
    let req = default.headers.as_ref().unwrap().request.as_ref().unwrap();
    assert_eq!(req.add["x-route"], "default");
    assert_eq!(req.remove, ["x-debug"]);
    assert_eq!(default.mirror.as_ref().unwrap().subset.as_deref(), Some("v3"));
    assert_eq!(default.mirror_percentage.unwrap().value, 50.0);
    // Round trip keeps Istio's field names.
    let back = serde_json::to_value(&vs).unwrap();
    assert_eq!(back["apiVersion"], "networking.istio.io/v1");
    assert_eq!(back["spec"]["http"][1]["match"][0]["ignoreUriCase"], true);
    assert_eq!(back["spec"]["http"][1]["fault"]["delay"]["fixedDelay"], "7s");
    assert_eq!(back["spec"]["http"][2]["mirrorPercentage"]["value"], 50.0);
    let again: VirtualService = serde_json::from_value(back).unwrap();
    assert_eq!(again, vs);
}

#[test]
fn older_api_versions_share_the_schema() {
    for version in ["v1beta1", "v1alpha3"] {
        let yaml = REVIEWS_VS.replace("networking.istio.io/v1\n", &format!("networking.istio.io/{version}\n"));
        let obj: kube::api::DynamicObject = serde_yaml_ng::from_str(&yaml).unwrap();
        let spec: VirtualServiceSpec = serde_json::from_value(obj.data["spec"].clone()).unwrap();
        assert_eq!(spec.http.len(), 3, "{version}");
    }
}

#[test]
fn redirect_rewrite_direct_response_and_cors_parse() {
    let yaml = r#"
hosts: [httpbin.demo.svc.cluster.local]
http:
- match: [{uri: {exact: /old}}]
  redirect: {uri: /new, authority: example.com, redirectCode: 308, derivePort: FROM_REQUEST_PORT}
- match: [{uri: {prefix: /v1/}, method: {exact: POST}, queryParams: {debug: {}}, withoutHeaders: {x-skip: {}}}]
  rewrite: {uriRegexRewrite: {match: "^/v1/(.*)$", rewrite: "/v2/\\1"}, authority: internal}
  route: [{destination: {host: httpbin}}]
- match: [{sourceLabels: {app: curl}, sourceNamespace: demo, port: 8000}]
  directResponse: {status: 503, body: {string: "unavailable"}}
- corsPolicy:
    allowOrigins: [{exact: "https://example.com"}, {regex: "https://.*\\.example\\.org"}]
    allowMethods: [GET, POST]
    allowHeaders: [x-custom]
    exposeHeaders: [x-exposed]
    maxAge: 24h
    allowCredentials: true
  mirrors:
  - destination: {host: shadow}
    percentage: {value: 25}
  route: [{destination: {host: httpbin}}]
"#;
    let spec: VirtualServiceSpec = serde_yaml_ng::from_str(yaml).unwrap();
    let redirect = spec.http[0].redirect.as_ref().unwrap();
    assert_eq!(redirect.redirect_code, Some(308));
    assert_eq!(redirect.derive_port.as_deref(), Some("FROM_REQUEST_PORT"));
    let m = &spec.http[1].r#match[0];
    assert_eq!(m.query_params["debug"], StringMatch::default());
    assert_eq!(m.without_headers["x-skip"], StringMatch::default());
    let rw = spec.http[1].rewrite.as_ref().unwrap().uri_regex_rewrite.as_ref().unwrap();
    assert_eq!((rw.r#match.as_str(), rw.rewrite.as_str()), ("^/v1/(.*)$", "/v2/\\1"));
    assert_eq!(spec.http[2].r#match[0].port, Some(8000));
    let dr = spec.http[2].direct_response.as_ref().unwrap();
    assert_eq!(dr.status, 503);
    assert_eq!(dr.body.as_ref().unwrap().string.as_deref(), Some("unavailable"));
    let cors = spec.http[3].cors_policy.as_ref().unwrap();
    assert_eq!(cors.allow_origins[1].regex.as_deref(), Some("https://.*\\.example\\.org"));
    assert_eq!(cors.allow_credentials, Some(true));
    assert_eq!(spec.http[3].mirrors[0].percentage.unwrap().value, 25.0);
}

/// Istio's traffic-management docs: subsets and a circuit breaker.
const REVIEWS_DR: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: RANDOM
    connectionPool:
      tcp:
        maxConnections: 1
        connectTimeout: 30ms
      http:
        http1MaxPendingRequests: 1
        http2MaxRequests: 100
        maxRequestsPerConnection: 1
        maxRetries: 3
        idleTimeout: 10s
        h2UpgradePolicy: UPGRADE
    outlierDetection:
      consecutive5xxErrors: 1
      consecutiveGatewayErrors: 2
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
      minHealthPercent: 0
    portLevelSettings:
    - port:
        number: 9080
      loadBalancer:
        consistentHash:
          httpCookie: {name: user, path: /, ttl: 0s}
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
  - name: v3
    labels:
      version: v3
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpHeaderName: x-user
"#;

#[test]
fn istio_docs_destination_rule_parses() {
    let dr: DestinationRule = serde_yaml_ng::from_str(REVIEWS_DR).unwrap();
    assert_eq!(dr.spec.host, "reviews");
    let tp = dr.spec.traffic_policy.as_ref().unwrap();
    assert_eq!(tp.load_balancer.as_ref().unwrap().simple, Some(SimpleLb::Random));
    let pool = tp.connection_pool.as_ref().unwrap();
    assert_eq!(pool.tcp.as_ref().unwrap().max_connections, Some(1));
    assert_eq!(pool.tcp.as_ref().unwrap().connect_timeout.as_deref(), Some("30ms"));
    let http = pool.http.as_ref().unwrap();
    assert_eq!(http.http1_max_pending_requests, Some(1));
    assert_eq!(http.max_requests_per_connection, Some(1));
    assert_eq!(http.h2_upgrade_policy, Some(H2UpgradePolicy::Upgrade));
    let od = tp.outlier_detection.as_ref().unwrap();
    assert_eq!(od.consecutive_5xx_errors, Some(1));
    assert_eq!(od.base_ejection_time.as_deref(), Some("3m"));
    assert_eq!(od.max_ejection_percent, Some(100));
    let cookie = tp.port_level_settings[0].load_balancer.as_ref().unwrap().consistent_hash.as_ref().unwrap();
    assert_eq!(cookie.http_cookie.as_ref().unwrap().name, "user");
    let names: Vec<_> = dr.spec.subsets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["v1", "v2", "v3"]);
    assert_eq!(dr.spec.subsets[1].labels["version"], "v2");
    let v2_lb = dr.spec.subsets[1].traffic_policy.as_ref().unwrap().load_balancer.as_ref().unwrap();
    assert_eq!(v2_lb.simple, Some(SimpleLb::RoundRobin));
    let v3_hash = dr.spec.subsets[2].traffic_policy.as_ref().unwrap().load_balancer.as_ref().unwrap();
    assert_eq!(v3_hash.consistent_hash.as_ref().unwrap().http_header_name.as_deref(), Some("x-user"));
    let back = serde_json::to_value(&dr).unwrap();
    assert_eq!(back["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"], 1);
    assert_eq!(back["spec"]["trafficPolicy"]["connectionPool"]["http"]["http1MaxPendingRequests"], 1);
}

/// Istio's "Enabling Rate Limits using Envoy" task, local rate limit.
const LOCAL_RATELIMIT: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: filter-local-ratelimit-svc
  namespace: istio-system
spec:
  workloadSelector:
    labels:
      app: productpage
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
              token_bucket:
                max_tokens: 4
                tokens_per_fill: 4
                fill_interval: 60s
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
"#;

#[test]
fn istio_docs_local_ratelimit_envoy_filter_parses() {
    let ef: EnvoyFilter = serde_yaml_ng::from_str(LOCAL_RATELIMIT).unwrap();
    assert_eq!(ef.spec.workload_selector.as_ref().unwrap().labels["app"], "productpage");
    let patch = &ef.spec.config_patches[0];
    assert_eq!(patch.apply_to.as_deref(), Some("HTTP_FILTER"));
    assert_eq!(patch.r#match.as_ref().unwrap()["context"], "SIDECAR_INBOUND");
    let p = patch.patch.as_ref().unwrap();
    assert_eq!(p.operation.as_deref(), Some("INSERT_BEFORE"));
    let value = p.value.as_ref().unwrap();
    assert_eq!(value["name"], "envoy.filters.http.local_ratelimit");
    assert_eq!(value["typed_config"]["value"]["token_bucket"]["max_tokens"], 4);
    assert_eq!(value["typed_config"]["value"]["token_bucket"]["fill_interval"], "60s");
    let back = serde_json::to_value(&ef).unwrap();
    assert_eq!(back["apiVersion"], "networking.istio.io/v1alpha3");
    assert_eq!(
        back["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["@type"],
        value["typed_config"]["@type"]
    );
}

fn spec_error<T: serde::de::DeserializeOwned>(yaml: &str) -> serde_path_to_error::Error<serde_yaml_ng::Error> {
    let de = serde_yaml_ng::Deserializer::from_str(yaml);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(_) => panic!("{yaml} parsed"),
        Err(e) => e,
    }
}

#[test]
fn typos_and_non_numeric_values_name_the_field() {
    let err = spec_error::<VirtualServiceSpec>("http:\n- route:\n  - destination: {host: a}\n    wieght: 10\n");
    assert_eq!(err.path().to_string(), "http[0].route[0].wieght");
    assert!(err.inner().to_string().contains("unknown field `wieght`"), "{err}");

    let err = spec_error::<VirtualServiceSpec>("http:\n- route:\n  - destination: {host: a}\n    weight: eighty\n");
    assert_eq!(err.path().to_string(), "http[0].route[0].weight");
    assert!(err.inner().to_string().contains("invalid type"), "{err}");

    let err = spec_error::<VirtualServiceSpec>("http:\n- matches: [{uri: {exact: /}}]\n");
    assert_eq!(err.path().to_string(), "http[0].matches");

    let err = spec_error::<DestinationRuleSpec>("host: r\ntrafficPolicy: {loadBalancer: {simple: FASTEST}}\n");
    assert_eq!(err.path().to_string(), "trafficPolicy.loadBalancer.simple");
    assert!(err.inner().to_string().contains("unknown variant `FASTEST`"), "{err}");

    let err = spec_error::<DestinationRuleSpec>("host: r\nsubsets: [{name: v1, label: {version: v1}}]\n");
    assert_eq!(err.path().to_string(), "subsets[0].label");

    let err = spec_error::<EnvoyFilterSpec>("configPatches: [{applyTo: HTTP_FILTER, patch: {op: MERGE}}]\n");
    assert_eq!(err.path().to_string(), "configPatches[0].patch.op");
}

#[test]
fn wrong_numbers_parse_so_the_router_can_name_them() {
    let spec: VirtualServiceSpec = serde_yaml_ng::from_str(
        "http:\n- route:\n  - destination: {host: a}\n    weight: -5\n  fault: {abort: {httpStatus: 999, percentage: {value: 250}}}\n",
    )
    .unwrap();
    assert_eq!(spec.http[0].route[0].weight, Some(-5));
    let abort = spec.http[0].fault.as_ref().unwrap().abort.as_ref().unwrap();
    assert_eq!((abort.http_status, abort.percentage.unwrap().value), (Some(999), 250.0));
}

#[test]
fn crds_have_istio_names_and_structural_schemas() {
    let vs = VirtualService::crd();
    assert_eq!(vs.metadata.name.as_deref(), Some("virtualservices.networking.istio.io"));
    assert_eq!(vs.spec.names.short_names.as_deref(), Some(&["vs".to_owned()][..]));
    let dr = DestinationRule::crd();
    assert_eq!(dr.metadata.name.as_deref(), Some("destinationrules.networking.istio.io"));
    let ef = EnvoyFilter::crd();
    assert_eq!(ef.metadata.name.as_deref(), Some("envoyfilters.networking.istio.io"));
    assert_eq!(ef.spec.versions[0].name, "v1alpha3");
    for crd in [&vs, &dr, &ef] {
        let schema = serde_json::to_string(&crd.spec.versions[0].schema).unwrap();
        for bad in
            ["\"additionalProperties\":false", "patternProperties", "$ref", "\"nullable\":true,\"type\":\"null\""]
        {
            assert!(!schema.contains(bad), "{bad} in {}: {schema}", crd.spec.names.kind);
        }
        assert!(
            schema.contains("x-kubernetes-preserve-unknown-fields")
                || crd.spec.names.kind == "VirtualService"
                || crd.spec.names.kind == "DestinationRule"
        );
    }
    let ef_schema = serde_json::to_value(&ef.spec.versions[0].schema).unwrap();
    let value = &ef_schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["configPatches"]["items"]["properties"]
        ["patch"]["properties"]["value"];
    assert_eq!(value["x-kubernetes-preserve-unknown-fields"], true, "{value}");
}
