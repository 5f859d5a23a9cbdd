//! Table tests for L7 authorization. Policies are YAML as users write them (Istio's docs), so the
//! tests also pin field names; each case is one request → expected decision.

use http::HeaderMap;
use serde::Deserialize;

use super::*;

const ROOT: &str = "istio-system";

fn parse(yaml: &str) -> Vec<AuthorizationPolicy> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| serde_yaml_ng::Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| serde_yaml_ng::from_value(v).unwrap())
        .collect()
}

fn compile(yaml: &str) -> (L7Policies, Vec<PolicyError>) {
    L7Policies::compile(&parse(yaml), "demo", "waypoint", ROOT)
}

fn ap(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

const WP: &str = "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]";

/// A request in owned, table-friendly form.
#[derive(Clone, Copy)]
struct R {
    svc: (&'static str, &'static str),
    principal: Option<&'static str>,
    ip: &'static str,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    port: u16,
    headers: &'static [(&'static str, &'static str)],
}

/// `GET /productpage` on reviews:9080 from `cluster.local/ns/client/sa/curl` at 10.0.1.5.
const BASE: R = R {
    svc: ("demo", "reviews"),
    principal: Some("spiffe://cluster.local/ns/client/sa/curl"),
    ip: "10.0.1.5",
    method: "GET",
    path: "/productpage",
    host: "reviews.demo.svc.cluster.local:9080",
    port: 9080,
    headers: &[],
};

fn decide(p: &L7Policies, r: R) -> Decision {
    let mut headers = HeaderMap::new();
    for (k, v) in r.headers {
        headers.append(http::HeaderName::from_static(k), v.parse().unwrap());
    }
    p.authorize(&L7Request {
        service_namespace: r.svc.0,
        service_name: r.svc.1,
        source_principal: r.principal,
        source_namespace: None,
        source_ip: r.ip.parse().unwrap(),
        method: r.method,
        path: r.path,
        host: r.host,
        port: r.port,
        headers: &headers,
    })
}

fn deny(p: &str) -> Decision {
    Decision::Deny { policy: p.to_owned() }
}

const ALLOW: Decision = Decision::Allow;

#[test]
#[rustfmt::skip]
fn authorization_table() {
    let get = |path: &'static str| R { path, ..BASE };
    let post = |path: &'static str| R { method: "POST", path, ..BASE };
    let plain = R { principal: None, ..BASE };
    let hdr = |headers: &'static [(&'static str, &'static str)]| R { headers, ..BASE };
    let svc = |ns: &'static str, name: &'static str| R { svc: (ns, name), ..BASE };

    let deny_admin_post = ap("deny-admin-post", "demo", &format!(
        "{{{WP}, action: DENY, rules: [{{to: [{{operation: {{methods: [POST], paths: [\"/admin*\"]}}}}]}}]}}"));
    let allow_get_templates = ap("allow-get", "demo", &format!(
        "{{{WP}, action: ALLOW, rules: [{{to: [{{operation: {{methods: [GET, HEAD], paths: [\"/api/{{*}}/items\", \"/static/{{**}}\", \"/files/{{**}}/raw\", \"*.html\", \"/productpage\"]}}}}]}}]}}"));
    let svc_only = ap("ratings-only-client", "demo",
        "{targetRefs: [{kind: Service, group: \"\", name: ratings}], action: ALLOW, rules: [{from: [{source: {principals: [\"cluster.local/ns/client/*\"]}}]}]}");
    let mut cases: Vec<(&str, String, R, Decision)> = vec![
        // No policies: allow.
        ("nothing", String::new(), BASE, ALLOW),
        // DENY on method + path.
        ("deny post /admin", deny_admin_post.clone(), post("/admin/users"), deny("demo/deny-admin-post")),
        ("deny post /admin exact", deny_admin_post.clone(), post("/admin"), deny("demo/deny-admin-post")),
        ("deny: GET /admin passes", deny_admin_post.clone(), get("/admin/users"), ALLOW),
        ("deny: POST elsewhere passes", deny_admin_post.clone(), post("/api"), ALLOW),
        ("deny: method case-sensitive", deny_admin_post.clone(), R { method: "post", path: "/admin", ..BASE }, ALLOW),
        // Path templates and */suffix forms in ALLOW.
        ("tpl {*} one segment", allow_get_templates.clone(), get("/api/v1/items"), ALLOW),
        ("tpl {*} not two segments", allow_get_templates.clone(), get("/api/v1/x/items"), deny("demo/allow-get")),
        ("tpl {*} not empty segment", allow_get_templates.clone(), get("/api//items"), deny("demo/allow-get")),
        ("tpl {**} deep", allow_get_templates.clone(), get("/static/css/site/a.css"), ALLOW),
        ("tpl {**} zero chars", allow_get_templates.clone(), get("/static/"), ALLOW),
        ("tpl {**} needs the slash", allow_get_templates.clone(), get("/static"), deny("demo/allow-get")),
        ("tpl {**} then literal", allow_get_templates.clone(), get("/files/a/b/raw"), ALLOW),
        ("tpl {**} then literal miss", allow_get_templates.clone(), get("/files/a/b/cooked"), deny("demo/allow-get")),
        ("suffix *.html", allow_get_templates.clone(), get("/docs/index.html"), ALLOW),
        ("exact path", allow_get_templates.clone(), get("/productpage"), ALLOW),
        ("exact path no prefix", allow_get_templates.clone(), get("/productpage/x"), deny("demo/allow-get")),
        ("HEAD allowed", allow_get_templates.clone(), R { method: "HEAD", ..BASE }, ALLOW),
        ("POST not allowed", allow_get_templates.clone(), post("/productpage"), deny("demo/allow-get")),
        // Service target: only that service.
        ("svc target other service unaffected", svc_only.clone(), BASE, ALLOW),
        ("svc target matches principal prefix", svc_only.clone(), svc("demo", "ratings"), ALLOW),
        ("svc target wrong principal", svc_only.clone(), R { svc: ("demo", "ratings"), principal: Some("cluster.local/ns/other/sa/x"), ..BASE }, deny("demo/ratings-only-client")),
        ("svc target plaintext", svc_only.clone(), R { svc: ("demo", "ratings"), principal: None, ..BASE }, deny("demo/ratings-only-client")),
        ("svc target same name other ns", svc_only.clone(), svc("prod", "ratings"), ALLOW),
    ];
    let more: Vec<(&str, String, R, Decision)> = vec![
        // Targets that are not this waypoint.
        ("other gateway", ap("x", "demo", "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: other}], action: DENY, rules: [{}]}"), BASE, ALLOW),
        ("same gateway name other ns", ap("x", "prod", "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}], action: DENY, rules: [{}]}"), BASE, ALLOW),
        ("selector policy is not ours", ap("x", "demo", "{selector: {matchLabels: {app: reviews}}, action: DENY, rules: [{}]}"), BASE, ALLOW),
        ("namespace policy is not ours", ap("x", "demo", "{action: DENY, rules: [{}]}"), BASE, ALLOW),
        ("deprecated targetRef", ap("x", "demo", "{targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}, action: DENY, rules: [{}]}"), BASE, deny("demo/x")),
        // Root namespace: Gateway by namespace, GatewayClass, Service anywhere.
        ("root gateway ref", ap("r", ROOT, "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint, namespace: demo}], action: DENY, rules: [{}]}"), BASE, deny("istio-system/r")),
        ("root gatewayclass", ap("r", ROOT, "{targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}], action: DENY, rules: [{}]}"), BASE, deny("istio-system/r")),
        ("root service any ns", ap("r", ROOT, "{targetRefs: [{kind: Service, name: reviews}], action: DENY, rules: [{}]}"), BASE, deny("istio-system/r")),
        // Sources.
        ("namespaces", ap("a", "demo", &format!("{{{WP}, rules: [{{from: [{{source: {{namespaces: [client]}}}}]}}]}}")), BASE, ALLOW),
        ("namespaces miss", ap("a", "demo", &format!("{{{WP}, rules: [{{from: [{{source: {{namespaces: [prod]}}}}]}}]}}")), BASE, deny("demo/a")),
        ("notNamespaces", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{from: [{{source: {{notNamespaces: [client]}}}}]}}]}}")), BASE, ALLOW),
        ("notNamespaces denies plaintext", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{from: [{{source: {{notNamespaces: [client]}}}}]}}]}}")), plain, deny("demo/d")),
        ("notPrincipals * denies plaintext", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{from: [{{source: {{notPrincipals: [\"*\"]}}}}]}}]}}")), plain, deny("demo/d")),
        ("notPrincipals * passes mTLS", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{from: [{{source: {{notPrincipals: [\"*\"]}}}}]}}]}}")), BASE, ALLOW),
        ("ipBlocks", ap("a", "demo", &format!("{{{WP}, rules: [{{from: [{{source: {{ipBlocks: [10.0.0.0/16]}}}}]}}]}}")), BASE, ALLOW),
        ("ipBlocks mapped v6", ap("a", "demo", &format!("{{{WP}, rules: [{{from: [{{source: {{ipBlocks: [10.0.0.0/16]}}}}]}}]}}")), R { ip: "::ffff:10.0.1.5", ..BASE }, ALLOW),
        ("notIpBlocks", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{from: [{{source: {{ipBlocks: [10.0.0.0/8], notIpBlocks: [10.0.1.5]}}}}]}}]}}")), BASE, ALLOW),
        ("remoteIpBlocks = source ip", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{from: [{{source: {{remoteIpBlocks: [10.0.1.0/24]}}}}]}}]}}")), BASE, deny("demo/d")),
        ("requestPrincipals never match", ap("a", "demo", &format!("{{{WP}, rules: [{{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]}}")), BASE, deny("demo/a")),
        ("notRequestPrincipals * denies (no JWT)", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{from: [{{source: {{notRequestPrincipals: [\"*\"]}}}}]}}]}}")), BASE, deny("demo/d")),
        ("serviceAccounts", ap("a", "demo", &format!("{{{WP}, rules: [{{from: [{{source: {{serviceAccounts: [client/curl]}}}}]}}]}}")), BASE, ALLOW),
        // Hosts: case-insensitive, port-agnostic, */suffix.
        ("host exact ignores port", ap("a", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{hosts: [reviews.demo.svc.cluster.local]}}}}]}}]}}")), BASE, ALLOW),
        ("host case-insensitive", ap("a", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{hosts: [\"*.DEMO.svc.cluster.local\"]}}}}]}}]}}")), BASE, ALLOW),
        ("host prefix", ap("a", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{hosts: [\"reviews*\"]}}}}]}}]}}")), R { host: "Reviews", ..BASE }, ALLOW),
        ("host with port pattern", ap("a", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{hosts: [\"reviews:*\"]}}}}]}}]}}")), R { host: "reviews", ..BASE }, deny("demo/a")),
        ("notHosts", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{to: [{{operation: {{notHosts: [\"reviews*\"]}}}}]}}]}}")), BASE, ALLOW),
        // Ports, notMethods, notPaths.
        ("ports", ap("a", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{ports: [\"9080\"]}}}}]}}]}}")), BASE, ALLOW),
        ("ports miss", ap("a", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{ports: [\"8080\"]}}}}]}}]}}")), BASE, deny("demo/a")),
        ("notMethods", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{to: [{{operation: {{notMethods: [GET]}}}}]}}]}}")), post("/x"), deny("demo/d")),
        ("notPaths template", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{to: [{{operation: {{notPaths: [\"/public/{{**}}\"]}}}}]}}]}}")), get("/public/a/b"), ALLOW),
        ("notPaths template denies others", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{to: [{{operation: {{notPaths: [\"/public/{{**}}\"]}}}}]}}]}}")), get("/private"), deny("demo/d")),
        // when conditions.
        ("when header exact", ap("a", "demo", &format!("{{{WP}, rules: [{{when: [{{key: \"request.headers[end-user]\", values: [jason]}}]}}]}}")), hdr(&[("end-user", "jason")]), ALLOW),
        ("when header missing", ap("a", "demo", &format!("{{{WP}, rules: [{{when: [{{key: \"request.headers[end-user]\", values: [jason]}}]}}]}}")), BASE, deny("demo/a")),
        ("when header prefix", ap("a", "demo", &format!("{{{WP}, rules: [{{when: [{{key: \"request.headers[User-Agent]\", values: [\"Mozilla*\"]}}]}}]}}")), hdr(&[("user-agent", "Mozilla/5.0")]), ALLOW),
        ("when header notValues", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{when: [{{key: \"request.headers[x-env]\", notValues: [prod]}}]}}]}}")), hdr(&[("x-env", "prod")]), ALLOW),
        ("when header notValues absent denies", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{when: [{{key: \"request.headers[x-env]\", notValues: [prod]}}]}}]}}")), BASE, deny("demo/d")),
        ("when source.ip", ap("a", "demo", &format!("{{{WP}, rules: [{{when: [{{key: source.ip, values: [10.0.1.0/24]}}]}}]}}")), BASE, ALLOW),
        ("when source.namespace", ap("a", "demo", &format!("{{{WP}, rules: [{{when: [{{key: source.namespace, values: [\"cli*\"]}}]}}]}}")), BASE, ALLOW),
        ("when source.principal", ap("a", "demo", &format!("{{{WP}, rules: [{{when: [{{key: source.principal, values: [\"*/sa/other\"]}}]}}]}}")), BASE, deny("demo/a")),
        ("when destination.port", ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{when: [{{key: destination.port, values: [\"9080\"]}}]}}]}}")), BASE, deny("demo/d")),
        ("when connection.sni absent", ap("a", "demo", &format!("{{{WP}, rules: [{{when: [{{key: connection.sni, values: [\"*\"]}}]}}]}}")), BASE, deny("demo/a")),
        ("when all must hold", ap("a", "demo", &format!("{{{WP}, rules: [{{when: [{{key: source.namespace, values: [client]}}, {{key: destination.port, values: [\"1\"]}}]}}]}}")), BASE, deny("demo/a")),
        // from AND to AND when; ANY rule.
        ("from and to", ap("a", "demo", &format!("{{{WP}, rules: [{{from: [{{source: {{namespaces: [client]}}}}], to: [{{operation: {{methods: [POST]}}}}]}}]}}")), BASE, deny("demo/a")),
        ("second rule matches", ap("a", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{methods: [POST]}}}}]}}, {{to: [{{operation: {{paths: [/productpage]}}}}]}}]}}")), BASE, ALLOW),
        ("allow nothing (no rules)", ap("a", "demo", &format!("{{{WP}}}")), BASE, deny("demo/a")),
        ("allow everything (empty rule)", ap("a", "demo", &format!("{{{WP}, rules: [{{}}]}}")), BASE, ALLOW),
        // Action order: CUSTOM → DENY → ALLOW; AUDIT ignored; dry-run not enforced.
        ("custom fails closed", ap("c", "demo", &format!("{{{WP}, action: CUSTOM, provider: {{name: ext}}, rules: [{{to: [{{operation: {{paths: [\"/productpage\"]}}}}]}}]}}")), BASE, deny("demo/c")),
        ("custom not matching", ap("c", "demo", &format!("{{{WP}, action: CUSTOM, provider: {{name: ext}}, rules: [{{to: [{{operation: {{paths: [\"/admin\"]}}}}]}}]}}")), BASE, ALLOW),
        ("custom before deny", format!("{}{}", ap("z-c", "demo", &format!("{{{WP}, action: CUSTOM, provider: {{name: ext}}, rules: [{{}}]}}")), ap("a-d", "demo", &format!("{{{WP}, action: DENY, rules: [{{}}]}}"))), BASE, deny("demo/z-c")),
        ("deny beats allow", format!("{}{}", ap("a", "demo", &format!("{{{WP}, rules: [{{}}]}}")), ap("d", "demo", &format!("{{{WP}, action: DENY, rules: [{{}}]}}"))), BASE, deny("demo/d")),
        ("audit ignored", ap("au", "demo", &format!("{{{WP}, action: AUDIT, rules: [{{}}]}}")), BASE, ALLOW),
        ("dry-run not enforced", "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: dr, namespace: demo, annotations: {istio.io/dry-run: \"true\"}}\nspec: {targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}], action: DENY, rules: [{}]}\n".to_owned(), BASE, ALLOW),
        ("one of two allows", format!("{}{}", ap("a1", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{methods: [POST]}}}}]}}]}}")), ap("a2", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{methods: [PUT]}}}}]}}]}}"))), BASE, deny("demo/a1,demo/a2")),
    ];
    cases.extend(more);
    assert!(cases.len() >= 40, "{}", cases.len());
    let mut failures = Vec::new();
    for (name, yaml, req, want) in &cases {
        let (p, errors) = compile(yaml);
        assert!(errors.is_empty(), "{name}: unexpected errors {errors:?}");
        let got = decide(&p, *req);
        if got != *want {
            failures.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
#[rustfmt::skip]
fn invalid_objects_are_reported_and_the_rest_applies() {
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("bad template mix", ap("t", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{paths: [\"/foo/{{*}}.txt\"]}}}}]}}]}}")), "spec.rules[0].to[0].operation.paths[0]", "segment"),
        ("{**} not last", ap("t", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{paths: [\"/{{**}}/foo/{{*}}\"]}}}}]}}]}}")), "spec.rules[0].to[0].operation.paths[0]", "last operator"),
        ("* outside operator", ap("t", "demo", &format!("{{{WP}, rules: [{{to: [{{operation: {{paths: [\"/*/baz/{{*}}\"]}}}}]}}]}}")), "spec.rules[0].to[0].operation.paths[0]", "segment"),
        ("cross-namespace ref", ap("t", "demo", "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint, namespace: prod}], rules: [{}]}"), "spec.targetRefs[0].namespace", "own namespace"),
        ("unknown kind", ap("t", "demo", "{targetRefs: [{group: apps, kind: Deployment, name: x}], rules: [{}]}"), "spec.targetRefs[0]", "cannot be targeted"),
        ("bad header name", ap("t", "demo", &format!("{{{WP}, rules: [{{when: [{{key: \"request.headers[a b]\", values: [x]}}]}}]}}")), "spec.rules[0].when[0].key", "header name"),
        ("bad ip (shared validation)", ap("t", "demo", &format!("{{{WP}, rules: [{{from: [{{source: {{ipBlocks: [nope]}}}}]}}]}}")), "spec.rules[0].from[0].source.ipBlocks[0]", "IP"),
        ("deny without rules", ap("t", "demo", &format!("{{{WP}, action: DENY}}")), "spec.rules", "never triggers"),
    ];
    let good = ap("good", "demo", &format!("{{{WP}, action: DENY, rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]}}"));
    for (name, yaml, field, reason) in cases {
        let (p, errors) = compile(&format!("{yaml}{good}"));
        assert_eq!(errors.len(), 1, "{name}: {errors:?}");
        assert_eq!(errors[0].field, field, "{name}: {}", errors[0]);
        assert!(errors[0].reason.contains(reason), "{name}: {}", errors[0]);
        assert_eq!(p.len(), 1, "{name}: the valid policy still applies");
        assert_eq!(decide(&p, R { method: "DELETE", ..BASE }), deny("demo/good"), "{name}");
        assert_eq!(decide(&p, BASE), ALLOW, "{name}");
    }
}

#[test]
fn warnings_name_what_is_not_enforced() {
    let yaml = [
        ap("c", "demo", &format!("{{{WP}, action: CUSTOM, provider: {{name: ext}}, rules: [{{}}]}}")),
        ap("j", "demo", &format!("{{{WP}, rules: [{{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]}}")),
        ap("s", "demo", &format!("{{{WP}, rules: [{{when: [{{key: connection.sni, values: [x]}}]}}]}}")),
        ap("au", "demo", &format!("{{{WP}, action: AUDIT, rules: [{{}}]}}")),
    ]
    .concat();
    let (p, errors) = compile(&yaml);
    assert!(errors.is_empty(), "{errors:?}");
    let w = p.warnings().join("\n");
    for needle in
        ["demo/c: action CUSTOM", "demo/j: requestPrincipals", "demo/s: connection.sni", "demo/au: action AUDIT"]
    {
        assert!(w.contains(needle), "missing {needle:?} in:\n{w}");
    }
    assert_eq!(p.len(), 3);
}

#[test]
fn template_parsing() {
    use matcher::PathMatch;
    for (tpl, path, want) in [
        ("/foo/{*}", "/foo/bar", true),
        ("/foo/{*}", "/foo/bar/baz", false),
        ("/foo/{**}/", "/foo/bar/", true),
        ("/foo/{**}/", "/foo//", true),
        ("/foo/{**}/", "/foo/bar", false),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", true),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz", true),
        ("/foo/{*}/bar/{**}", "/foo/buzz/baz/", false),
        ("/{*}", "/", false),
        ("/{**}", "/", true),
    ] {
        let m = PathMatch::parse(tpl).unwrap();
        assert_eq!(m.matches(path), want, "{tpl} vs {path}");
    }
}

#[test]
fn path_normalization() {
    for (raw, want) in [
        ("/productpage", "/productpage"),
        ("/a/b/../c", "/a/c"),
        ("/a/./b", "/a/b"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/%2E%2E/admin", "/admin"),
        ("/..", "/"),
        ("/../../etc", "/etc"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/%41%7e%2d", "/A~-"),
        ("/keep%2Fslash%20space", "/keep%2Fslash%20space"),
        ("/a//b", "/a//b"),
        ("/é/%", "/é/%"),
    ] {
        assert_eq!(normalize_path(raw), want, "{raw}");
    }
    assert!(matches!(normalize_path("/x/y"), std::borrow::Cow::Borrowed(_)));
    // A DENY on /admin* holds against an encoded traversal once the handler normalizes.
    let (p, _) = compile(&ap(
        "d",
        "demo",
        &format!("{{{WP}, action: DENY, rules: [{{to: [{{operation: {{paths: [\"/admin*\"]}}}}]}}]}}"),
    ));
    let path = normalize_path("/public/%2e%2e/admin/users");
    let r = R { path: Box::leak(path.into_owned().into_boxed_str()), ..BASE };
    assert_eq!(decide(&p, r), deny("demo/d"));
}
