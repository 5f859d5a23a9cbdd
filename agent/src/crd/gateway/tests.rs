use kube::CustomResourceExt;

use super::*;

/// An ambient waypoint as `istioctl waypoint generate` writes it (class renamed for weft).
const WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: bookinfo
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: weft-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"#;

/// Gateway API traffic splitting and matching, attached to a Service (mesh / GAMMA style) and to
/// a waypoint Gateway.
const REVIEWS_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: bookinfo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 9080
  - name: waypoint
    sectionName: mesh
  hostnames: ["reviews.bookinfo.svc.cluster.local"]
  rules:
  - name: jason
    matches:
    - path:
        type: PathPrefix
        value: /reviews
      headers:
      - name: end-user
        value: jason
      - type: RegularExpression
        name: user-agent
        value: ".*Safari.*"
      queryParams:
      - name: debug
        value: "1"
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: jason}]
        add: [{name: x-trace, value: "1"}]
        remove: [x-debug]
    - type: URLRewrite
      urlRewrite:
        hostname: reviews-internal
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2/reviews}
    - type: RequestMirror
      requestMirror:
        backendRef: {name: reviews-shadow, port: 9080}
        percent: 10
    backendRefs:
    - name: reviews-v2
      port: 9080
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {codes: [500, 503], attempts: 3, backoff: 100ms}
  - matches:
    - path: {type: Exact, value: /old}
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: example.com, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /new}}
  - backendRefs:
    - name: reviews-v1
      port: 9080
      weight: 90
    - name: reviews-v2
      port: 9080
      weight: 10
      filters:
      - type: ResponseHeaderModifier
        responseHeaderModifier:
          set: [{name: x-canary, value: "true"}]
status:
  parents:
  - parentRef: {group: "", kind: Service, name: reviews, port: 9080}
    controllerName: weft.io/waypoint
    conditions:
    - type: Accepted
      status: "True"
      reason: Accepted
      message: ""
      lastTransitionTime: "2025-01-01T00:00:00Z"
"#;

#[test]
fn waypoint_gateway_parses() {
    let gw: Gateway = serde_yaml_ng::from_str(WAYPOINT).unwrap();
    assert_eq!(gw.spec.gateway_class_name, WAYPOINT_CLASS);
    let l = &gw.spec.listeners[0];
    assert_eq!((l.name.as_str(), l.port, l.protocol.as_str()), ("mesh", i32::from(WAYPOINT_PORT), WAYPOINT_PROTOCOL));
    let back = serde_json::to_value(&gw).unwrap();
    assert_eq!(back["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(back["spec"]["gatewayClassName"], "weft-waypoint");
}

#[test]
fn http_route_parses_matches_filters_weights_and_status() {
    let route: HTTPRoute = serde_yaml_ng::from_str(REVIEWS_ROUTE).unwrap();
    let parents = &route.spec.parent_refs;
    assert_eq!(parents[0].group.as_deref(), Some(""));
    assert_eq!(parents[0].kind.as_deref(), Some("Service"));
    assert_eq!(parents[0].port, Some(9080));
    assert_eq!(parents[1].kind, None);
    assert_eq!(parents[1].section_name.as_deref(), Some("mesh"));
    let [jason, redirect, split] = &route.spec.rules[..] else { panic!("3 rules") };
    assert_eq!(jason.name.as_deref(), Some("jason"));
    let m = &jason.matches[0];
    let path = m.path.as_ref().unwrap();
    assert_eq!((path.r#type, path.value.as_deref()), (PathMatchType::PathPrefix, Some("/reviews")));
    assert_eq!(m.headers[0].r#type, HeaderMatchType::Exact);
    assert_eq!((m.headers[0].name.as_str(), m.headers[0].value.as_str()), ("end-user", "jason"));
    assert_eq!(m.headers[1].r#type, HeaderMatchType::RegularExpression);
    assert_eq!(m.query_params[0].name, "debug");
    assert_eq!(m.method.as_deref(), Some("GET"));
    let f = &jason.filters;
    assert_eq!(f[0].r#type, "RequestHeaderModifier");
    let rhm = f[0].request_header_modifier.as_ref().unwrap();
    assert_eq!(rhm.set[0], HTTPHeader { name: "x-route".into(), value: "jason".into() });
    assert_eq!(rhm.remove, ["x-debug"]);
    let rw = f[1].url_rewrite.as_ref().unwrap();
    assert_eq!(rw.path.as_ref().unwrap().replace_prefix_match.as_deref(), Some("/v2/reviews"));
    let mirror = f[2].request_mirror.as_ref().unwrap();
    assert_eq!((mirror.backend_ref.name.as_str(), mirror.percent), ("reviews-shadow", Some(10)));
    let timeouts = jason.timeouts.as_ref().unwrap();
    assert_eq!(timeouts.request.as_deref(), Some("10s"));
    assert_eq!(
        crate::crd::duration::parse(timeouts.backend_request.as_deref().unwrap()),
        Ok(std::time::Duration::from_secs(2))
    );
    assert_eq!(jason.retry.as_ref().unwrap().codes, [500, 503]);
    let rr = redirect.filters[0].request_redirect.as_ref().unwrap();
    assert_eq!((rr.status_code, rr.path.as_ref().unwrap().r#type.as_str()), (Some(301), "ReplaceFullPath"));
    let weights: Vec<_> = split.backend_refs.iter().map(|b| (b.name.as_str(), b.weight)).collect();
    assert_eq!(weights, [("reviews-v1", Some(90)), ("reviews-v2", Some(10))]);
    assert!(split.backend_refs[1].filters[0].response_header_modifier.is_some());
    let status = route.status.as_ref().unwrap();
    assert_eq!(status.parents[0].controller_name, "weft.io/waypoint");
    assert_eq!(status.parents[0].conditions[0].type_, "Accepted");
    let back = serde_json::to_value(&route).unwrap();
    assert_eq!(back["spec"]["rules"][0]["matches"][0]["path"]["type"], "PathPrefix");
    assert_eq!(back["spec"]["rules"][0]["backendRefs"][0]["name"], "reviews-v2");
    assert_eq!(back["spec"]["parentRefs"][1]["sectionName"], "mesh");
    let again: HTTPRoute = serde_json::from_value(back).unwrap();
    assert_eq!(again, route);
}

#[test]
fn defaults_follow_the_gateway_api() {
    let m: HTTPRouteMatch = serde_yaml_ng::from_str("path: {value: /a}\nheaders: [{name: x, value: y}]\n").unwrap();
    assert_eq!(m.path.unwrap().r#type, PathMatchType::PathPrefix);
    assert_eq!(m.headers[0].r#type, HeaderMatchType::Exact);
}

#[test]
fn typos_and_non_numeric_values_name_the_field() {
    let parse = |yaml: &str| {
        let de = serde_yaml_ng::Deserializer::from_str(yaml);
        serde_path_to_error::deserialize::<_, HTTPRouteSpec>(de).map(|_| ()).unwrap_err()
    };
    let err = parse("rules:\n- backendRefs:\n  - name: a\n    weigth: 1\n");
    assert_eq!(err.path().to_string(), "rules[0].backendRefs[0].weigth");
    assert!(err.inner().to_string().contains("unknown field `weigth`"), "{err}");
    let err = parse("rules:\n- backendRefs:\n  - name: a\n    weight: ten\n");
    assert_eq!(err.path().to_string(), "rules[0].backendRefs[0].weight");
    let err = parse("rules:\n- matches:\n  - path: {type: Prefix, value: /}\n");
    assert_eq!(err.path().to_string(), "rules[0].matches[0].path.type");
    assert!(err.inner().to_string().contains("unknown variant `Prefix`"), "{err}");
}

#[test]
fn resource_names_match_the_upstream_crds() {
    // weft does not ship these CRDs, but the derive must address the upstream ones.
    assert_eq!(Gateway::crd().metadata.name.as_deref(), Some("gateways.gateway.networking.k8s.io"));
    assert_eq!(HTTPRoute::crd().metadata.name.as_deref(), Some("httproutes.gateway.networking.k8s.io"));
    use kube::Resource;
    assert_eq!(HTTPRoute::plural(&()), "httproutes");
    assert_eq!(HTTPRoute::api_version(&()), "gateway.networking.k8s.io/v1");
}
