//! Table tests for authorization and mTLS mode resolution. Policies are written as YAML, the way
//! users write them, so the tests also pin field names.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::*;

fn parse(yaml: &str) -> (Vec<AuthorizationPolicy>, Vec<PeerAuthentication>) {
    let (mut aps, mut pas) = (Vec::new(), Vec::new());
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = serde_yaml_ng::Value::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        match v["kind"].as_str().unwrap() {
            "AuthorizationPolicy" => aps.push(serde_yaml_ng::from_value(v).unwrap()),
            "PeerAuthentication" => pas.push(serde_yaml_ng::from_value(v).unwrap()),
            k => panic!("unexpected kind {k}"),
        }
    }
    (aps, pas)
}

fn compile(yaml: &str) -> (Policies, Vec<PolicyError>) {
    let (aps, pas) = parse(yaml);
    Policies::compile(&aps, &pas, "istio-system")
}

/// A connection in owned, table-friendly form.
#[derive(Clone, Copy)]
struct C {
    principal: Option<&'static str>,
    src: &'static str,
    dst: &'static str,
    port: u16,
    ns: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

/// mTLS from `cluster.local/ns/client/sa/curl` at 10.0.1.5 to httpbin (10.0.2.7:8080) in `demo`.
const BASE: C = C {
    principal: Some("cluster.local/ns/client/sa/curl"),
    src: "10.0.1.5",
    dst: "10.0.2.7",
    port: 8080,
    ns: "demo",
    labels: &[("app", "httpbin")],
};

fn decide(p: &Policies, c: C) -> Decision {
    let labels: BTreeMap<String, String> = c.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    p.authorize(&Connection {
        source_principal: c.principal,
        source_namespace: None,
        source_ip: c.src.parse().unwrap(),
        dest_ip: c.dst.parse().unwrap(),
        dest_port: c.port,
        dest_namespace: c.ns,
        dest_labels: &labels,
    })
}

fn deny(p: &str) -> Decision {
    Decision::Deny { policy: p.to_owned() }
}

const ALLOW: Decision = Decision::Allow;

fn ap(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

#[test]
#[rustfmt::skip]
fn authorization_table() {
    let plain = C { principal: None, ..BASE };
    let cases: Vec<(&str, String, C, Decision)> = vec![
        ("no policy allows", String::new(), BASE, ALLOW),
        ("ALLOW principal matches", ap("a", "demo", "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/curl]}}]}]}"), BASE, ALLOW),
        ("ALLOW principal mismatch denies, naming the policy", ap("a", "demo", "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/other]}}]}]}"), BASE, deny("demo/a")),
        ("ALLOW principals never match plaintext", ap("a", "demo", "{rules: [{from: [{source: {principals: ['*']}}]}]}"), plain, deny("demo/a")),
        ("presence '*' matches any mTLS peer", ap("a", "demo", "{rules: [{from: [{source: {principals: ['*']}}]}]}"), BASE, ALLOW),
        ("prefix wildcard", ap("a", "demo", "{rules: [{from: [{source: {principals: [cluster.local/ns/client/*]}}]}]}"), BASE, ALLOW),
        ("suffix wildcard", ap("a", "demo", "{rules: [{from: [{source: {principals: ['*/sa/curl']}}]}]}"), BASE, ALLOW),
        ("suffix wildcard mismatch", ap("a", "demo", "{rules: [{from: [{source: {principals: ['*/sa/wget']}}]}]}"), BASE, deny("demo/a")),
        ("notPrincipals excludes", ap("a", "demo", "{rules: [{from: [{source: {notPrincipals: [cluster.local/ns/client/sa/curl]}}]}]}"), BASE, deny("demo/a")),
        ("notPrincipals lets plaintext through", ap("a", "demo", "{rules: [{from: [{source: {notPrincipals: [cluster.local/ns/client/sa/curl]}}]}]}"), plain, ALLOW),
        ("DENY wins over a matching ALLOW", ap("a", "demo", "{rules: [{}]}") + &ap("d", "demo", "{action: DENY, rules: [{from: [{source: {namespaces: [client]}}]}]}"), BASE, deny("demo/d")),
        ("non-matching DENY alone allows", ap("d", "demo", "{action: DENY, rules: [{from: [{source: {namespaces: [prod]}}]}]}"), BASE, ALLOW),
        ("ALLOW without rules allows nothing", ap("a", "demo", "{}"), BASE, deny("demo/a")),
        ("ALLOW rules [{}] allows everything", ap("a", "demo", "{rules: [{}]}"), plain, ALLOW),
        ("DENY rules [{}] denies everything", ap("d", "demo", "{action: DENY, rules: [{}]}"), BASE, deny("demo/d")),
        ("selector mismatch: policy does not apply", ap("a", "demo", "{selector: {matchLabels: {app: other}}}"), BASE, ALLOW),
        ("selector match: policy applies", ap("a", "demo", "{selector: {matchLabels: {app: httpbin}}}"), BASE, deny("demo/a")),
        ("other namespace's policy does not apply", ap("a", "other", "{}"), BASE, ALLOW),
        ("root namespace policy is mesh-wide", ap("d", "istio-system", "{action: DENY, rules: [{}]}"), BASE, deny("istio-system/d")),
        ("root namespace selector applies in every namespace", ap("a", "istio-system", "{selector: {matchLabels: {app: httpbin}}}"), BASE, deny("istio-system/a")),
        ("root namespace selector mismatch", ap("a", "istio-system", "{selector: {matchLabels: {app: db}}}"), BASE, ALLOW),
        ("namespaces wildcard", ap("a", "demo", "{rules: [{from: [{source: {namespaces: [cli*]}}]}]}"), BASE, ALLOW),
        ("ipBlocks CIDR", ap("a", "demo", "{rules: [{from: [{source: {ipBlocks: [10.0.1.0/24]}}]}]}"), plain, ALLOW),
        ("ipBlocks single IP mismatch", ap("a", "demo", "{rules: [{from: [{source: {ipBlocks: [10.0.1.6]}}]}]}"), plain, deny("demo/a")),
        ("notIpBlocks", ap("a", "demo", "{rules: [{from: [{source: {notIpBlocks: [10.0.0.0/16]}}]}]}"), BASE, deny("demo/a")),
        ("IPv4-mapped source matches an IPv4 block", ap("a", "demo", "{rules: [{from: [{source: {ipBlocks: [10.0.1.0/24]}}]}]}"), C { src: "::ffff:10.0.1.5", ..BASE }, ALLOW),
        ("IPv6 block", ap("a", "demo", "{rules: [{from: [{source: {ipBlocks: ['fd00::/64']}}]}]}"), C { src: "fd00::5", ..BASE }, ALLOW),
        ("ports match", ap("a", "demo", "{rules: [{to: [{operation: {ports: ['8080']}}]}]}"), BASE, ALLOW),
        ("ports mismatch", ap("a", "demo", "{rules: [{to: [{operation: {ports: ['9090']}}]}]}"), BASE, deny("demo/a")),
        ("notPorts", ap("a", "demo", "{rules: [{to: [{operation: {notPorts: ['8080']}}]}]}"), BASE, deny("demo/a")),
        ("from entries are ORed", ap("a", "demo", "{rules: [{from: [{source: {namespaces: [x]}}, {source: {namespaces: [client]}}]}]}"), BASE, ALLOW),
        ("from and to are ANDed", ap("a", "demo", "{rules: [{from: [{source: {namespaces: [client]}}], to: [{operation: {ports: ['1']}}]}]}"), BASE, deny("demo/a")),
        ("fields in one source are ANDed", ap("a", "demo", "{rules: [{from: [{source: {namespaces: [client], ipBlocks: [192.168.0.0/16]}}]}]}"), BASE, deny("demo/a")),
        ("rules are ORed", ap("a", "demo", "{rules: [{from: [{source: {namespaces: [x]}}]}, {to: [{operation: {ports: ['8080']}}]}]}"), BASE, ALLOW),
        ("when source.ip", ap("a", "demo", "{rules: [{when: [{key: source.ip, values: [10.0.1.5]}]}]}"), BASE, ALLOW),
        ("when destination.port notValues", ap("a", "demo", "{rules: [{when: [{key: destination.port, notValues: ['8080']}]}]}"), BASE, deny("demo/a")),
        ("when destination.ip", ap("a", "demo", "{rules: [{when: [{key: destination.ip, values: [10.0.2.0/24]}]}]}"), BASE, ALLOW),
        ("when source.namespace notValues", ap("d", "demo", "{action: DENY, rules: [{when: [{key: source.namespace, notValues: [client]}]}]}"), BASE, ALLOW),
        ("when source.principal", ap("a", "demo", "{rules: [{when: [{key: source.principal, values: [cluster.local/ns/client/sa/curl]}]}]}"), BASE, ALLOW),
        ("all whens must match", ap("a", "demo", "{rules: [{when: [{key: source.ip, values: [10.0.1.5]}, {key: destination.port, values: ['1']}]}]}"), BASE, deny("demo/a")),
        ("serviceAccounts, NAMESPACE/SA form", ap("a", "demo", "{rules: [{from: [{source: {serviceAccounts: [client/curl]}}]}]}"), BASE, ALLOW),
        ("serviceAccounts short form is the policy's namespace", ap("a", "demo", "{rules: [{from: [{source: {serviceAccounts: [curl]}}]}]}"), BASE, deny("demo/a")),
        ("when source.serviceAccount", ap("a", "demo", "{rules: [{when: [{key: source.serviceAccount, values: [client/curl]}]}]}"), BASE, ALLOW),
        ("when source.serviceAccount short form is the policy's namespace", ap("a", "demo", "{rules: [{when: [{key: source.serviceAccount, values: [curl]}]}]}"), BASE, deny("demo/a")),
        ("serviceAccounts never match plaintext", ap("a", "demo", "{rules: [{from: [{source: {serviceAccounts: [client/curl]}}]}]}"), plain, deny("demo/a")),
        ("trustDomains", ap("a", "demo", "{rules: [{from: [{source: {trustDomains: [cluster.local]}}]}]}"), BASE, ALLOW),
        ("ALLOW rule with HTTP attributes never matches at L4", ap("a", "demo", "{rules: [{to: [{operation: {ports: ['8080'], methods: [GET]}}]}]}"), BASE, deny("demo/a")),
        ("ALLOW: only the HTTP rule is left out", ap("a", "demo", "{rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [client]}}]}]}"), BASE, ALLOW),
        ("ALLOW rule with remoteIpBlocks is HTTP-level", ap("a", "demo", "{rules: [{from: [{source: {remoteIpBlocks: [10.0.1.5]}}]}]}"), BASE, deny("demo/a")),
        ("ALLOW rule with request.headers is left out", ap("a", "demo", "{rules: [{when: [{key: 'request.headers[x-user]', values: [bob]}]}]}"), BASE, deny("demo/a")),
        ("DENY with ports+methods denies on the port alone", ap("d", "demo", "{action: DENY, rules: [{to: [{operation: {ports: ['8080'], methods: [POST]}}]}]}"), BASE, deny("demo/d")),
        ("DENY with only methods denies nothing at L4", ap("d", "demo", "{action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}"), BASE, ALLOW),
        ("DENY with an HTTP when denies nothing at L4", ap("d", "demo", "{action: DENY, rules: [{from: [{source: {namespaces: [client]}}], when: [{key: request.auth.principal, values: [x]}]}]}"), BASE, ALLOW),
        ("DENY with one HTTP-only source still matches the other", ap("d", "demo", "{action: DENY, rules: [{from: [{source: {requestPrincipals: ['*']}}, {source: {namespaces: [client]}}]}]}"), BASE, deny("demo/d")),
        ("AUDIT is ignored at L4", ap("x", "demo", "{action: AUDIT, rules: [{}]}"), BASE, ALLOW),
        ("CUSTOM is ignored at L4", ap("x", "demo", "{action: CUSTOM, provider: {name: ext}, rules: [{}]}"), BASE, ALLOW),
        ("targetRefs policies are for waypoints", ap("x", "demo", "{targetRefs: [{kind: Service, group: '', name: httpbin}], action: DENY, rules: [{}]}"), BASE, ALLOW),
        ("dry-run is not enforced", "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: demo, annotations: {istio.io/dry-run: 'true'}}\nspec: {action: DENY, rules: [{}]}\n".into(), BASE, ALLOW),
        ("first DENY in name order is named", ap("d2", "demo", "{action: DENY, rules: [{}]}") + &ap("d1", "demo", "{action: DENY, rules: [{}]}"), BASE, deny("demo/d1")),
        ("mesh DENY is checked before namespace DENY", ap("a", "demo", "{action: DENY, rules: [{}]}") + &ap("z", "istio-system", "{action: DENY, rules: [{}]}"), BASE, deny("istio-system/z")),
        ("no ALLOW matched names every applicable ALLOW", ap("b", "demo", "{}") + &ap("a", "demo", "{}") + &ap("m", "istio-system", "{}"), BASE, deny("istio-system/m,demo/a,demo/b")),
        ("spiffe:// prefix is tolerated", ap("a", "demo", "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/curl]}}]}]}"), C { principal: Some("spiffe://cluster.local/ns/client/sa/curl"), ..BASE }, ALLOW),
    ];
    assert!(cases.len() >= 30);
    for (name, yaml, conn, want) in cases {
        let (p, errors) = compile(&yaml);
        assert!(errors.is_empty(), "{name}: unexpected errors {errors:?}");
        assert_eq!(decide(&p, conn), want, "{name}");
    }
}

#[test]
fn warnings_explain_what_l4_cannot_enforce() {
    let yaml = ap("a", "demo", "{rules: [{to: [{operation: {methods: [GET]}}]}]}")
        + &ap("d1", "demo", "{action: DENY, rules: [{to: [{operation: {ports: ['1'], paths: [/x]}}]}]}")
        + &ap("d2", "demo", "{action: DENY, rules: [{to: [{operation: {paths: [/x]}}]}]}")
        + &ap("c", "demo", "{action: CUSTOM, provider: {name: ext}, rules: [{}]}");
    let (p, errors) = compile(&yaml);
    assert!(errors.is_empty(), "{errors:?}");
    let w = p.warnings().join("\n");
    assert!(w.contains("demo/a: spec.rules[0] uses HTTP attributes (methods)") && w.contains("left out"), "{w}");
    assert!(w.contains("demo/d1") && w.contains("stricter than requested"), "{w}");
    assert!(w.contains("demo/d2") && w.contains("denies nothing here"), "{w}");
    assert!(w.contains("demo/c: action Custom is not supported at L4"), "{w}");
    assert!(!w.contains("demo/wp"), "waypoint policies are not L4's business: {w}");
    assert_eq!(p.warnings().len(), 4, "{w}");
    assert_eq!(p.authorization_policy_count(), 3);
}

#[test]
#[rustfmt::skip]
fn invalid_policies_are_left_out_and_named() {
    let cases: Vec<(&str, &str, &str)> = vec![
        ("{rules: [{from: [{source: {ipBlocks: [10.0.0.x]}}]}]}", "spec.rules[0].from[0].source.ipBlocks[0]", "neither an IP address nor a CIDR"),
        ("{rules: [{to: [{operation: {ports: [http]}}]}]}", "spec.rules[0].to[0].operation.ports[0]", "not a port number"),
        ("{rules: [{to: [{operation: {notPorts: ['70000']}}]}]}", "spec.rules[0].to[0].operation.notPorts[0]", "not a port number"),
        ("{rules: [{when: [{key: source.ipp, values: [x]}]}]}", "spec.rules[0].when[0].key", "unknown attribute"),
        ("{rules: [{when: [{key: source.ip}]}]}", "spec.rules[0].when[0]", "set `values` or `notValues`"),
        ("{rules: [{when: [{key: 'request.headers', values: [x]}]}]}", "spec.rules[0].when[0].key", "request.headers[NAME]"),
        ("{rules: [{when: [{key: destination.namespace, values: [x]}]}]}", "spec.rules[0].when[0].key", "replaced by the policy's namespace"),
        ("{rules: [{from: [{source: {}}]}]}", "spec.rules[0].from[0].source", "at least one field"),
        ("{rules: [{from: [{}]}]}", "spec.rules[0].from[0].source", "required"),
        ("{rules: [{to: [{operation: {}}]}]}", "spec.rules[0].to[0].operation", "at least one field"),
        ("{rules: [{from: [{source: {principals: ['']}}]}]}", "spec.rules[0].from[0].source.principals[0]", "empty values"),
        ("{rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]}", "spec.rules[0].from[0].source.serviceAccounts[0]", "NAMESPACE/SERVICE_ACCOUNT"),
        ("{rules: [{from: [{source: {serviceAccounts: [a], principals: [b]}}]}]}", "spec.rules[0].from[0].source", "cannot be combined"),
        ("{action: DENY}", "spec.rules", "never triggers"),
        ("{action: CUSTOM, rules: [{}]}", "spec.provider.name", "provider's name"),
        ("{provider: {name: x}, rules: [{}]}", "spec.provider", "only allowed with action CUSTOM"),
        ("{selector: {matchLabels: {app: x}}, targetRefs: [{kind: Service, name: x}]}", "spec", "only one of selector"),
        ("{selector: {matchLabels: {app: 'x*'}}}", "spec.selector.matchLabels.app", "wildcards"),
    ];
    for (spec, field, reason) in cases {
        // A valid policy next to the broken one must still apply.
        let yaml = ap("bad", "demo", spec) + &ap("ok", "demo", "{action: DENY, rules: [{}]}");
        let (p, errors) = compile(&yaml);
        assert_eq!(errors.len(), 1, "{spec}: {errors:?}");
        let e = &errors[0];
        assert_eq!((e.kind, e.namespace.as_str(), e.name.as_str()), (PolicyKind::AuthorizationPolicy, "demo", "bad"), "{spec}");
        assert_eq!(e.field, field, "{spec}: {e}");
        assert!(e.reason.contains(reason), "{spec}: {e}");
        assert!(e.to_string().starts_with(&format!("AuthorizationPolicy demo/bad: {field}: ")), "{e}");
        assert_eq!(decide(&p, BASE), deny("demo/ok"), "{spec}");
    }
}

fn pa(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

#[test]
#[rustfmt::skip]
fn mtls_mode_table() {
    use MtlsMode::{Permissive, Strict};
    let app = &[("app", "db")][..];
    let other = &[("app", "web")][..];
    type Labels = &'static [(&'static str, &'static str)];
    let cases: Vec<(&str, String, Labels, u16, MtlsMode)> = vec![
        ("nothing set is PERMISSIVE", String::new(), app, 5432, Permissive),
        ("mesh STRICT", pa("m", "istio-system", "{mtls: {mode: STRICT}}"), app, 5432, Strict),
        ("namespace overrides mesh", pa("m", "istio-system", "{mtls: {mode: STRICT}}") + &pa("n", "demo", "{mtls: {mode: PERMISSIVE}}"), app, 1, Permissive),
        ("namespace UNSET inherits mesh", pa("m", "istio-system", "{mtls: {mode: STRICT}}") + &pa("n", "demo", "{mtls: {mode: UNSET}}"), app, 1, Strict),
        ("namespace without mtls inherits mesh", pa("m", "istio-system", "{mtls: {mode: STRICT}}") + &pa("n", "demo", "{}"), app, 1, Strict),
        ("other namespace's policy does not apply", pa("n", "other", "{mtls: {mode: STRICT}}"), app, 1, Permissive),
        ("workload overrides namespace", pa("n", "demo", "{mtls: {mode: PERMISSIVE}}") + &pa("w", "demo", "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}"), app, 1, Strict),
        ("workload selector mismatch falls back", pa("n", "demo", "{mtls: {mode: PERMISSIVE}}") + &pa("w", "demo", "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}"), other, 1, Permissive),
        ("port-level STRICT on a PERMISSIVE workload", pa("w", "demo", "{selector: {matchLabels: {app: db}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {5432: {mode: STRICT}}}"), app, 5432, Strict),
        ("other ports keep the workload mode", pa("w", "demo", "{selector: {matchLabels: {app: db}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {5432: {mode: STRICT}}}"), app, 80, Permissive),
        ("port-level DISABLE under a STRICT namespace", pa("n", "demo", "{mtls: {mode: STRICT}}") + &pa("w", "demo", "{selector: {matchLabels: {app: db}}, portLevelMtls: {9100: {mode: DISABLE}}}"), app, 9100, Permissive),
        ("workload UNSET inherits namespace on other ports", pa("n", "demo", "{mtls: {mode: STRICT}}") + &pa("w", "demo", "{selector: {matchLabels: {app: db}}, portLevelMtls: {9100: {mode: DISABLE}}}"), app, 5432, Strict),
        ("port-level UNSET inherits", pa("w", "demo", "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}, portLevelMtls: {9100: {mode: UNSET}}}"), app, 9100, Strict),
        ("DISABLE is PERMISSIVE", pa("m", "istio-system", "{mtls: {mode: DISABLE}}"), app, 1, Permissive),
        ("root-namespace workload selector is ignored", pa("w", "istio-system", "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}"), app, 1, Permissive),
        ("oldest workload policy wins", pa("b", "demo", "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}") + &pa("a", "demo", "{selector: {matchLabels: {app: db}}, mtls: {mode: PERMISSIVE}}"), app, 1, Permissive),
    ];
    for (name, yaml, labels, port, want) in cases {
        let (p, errors) = compile(&yaml);
        assert!(errors.is_empty(), "{name}: {errors:?}");
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(p.mtls_mode("demo", &labels, port), want, "{name}");
    }
}

#[test]
fn conflicting_namespace_policies_keep_the_oldest_then_name_order() {
    let labels = BTreeMap::new();
    // Without timestamps: name order.
    let (p, errors) =
        compile(&(pa("b", "demo", "{mtls: {mode: PERMISSIVE}}") + &pa("a", "demo", "{mtls: {mode: STRICT}}")));
    assert_eq!(p.mtls_mode("demo", &labels, 1), MtlsMode::Strict);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!((errors[0].name.as_str(), errors[0].kind), ("b", PolicyKind::PeerAuthentication));
    assert!(errors[0].reason.contains("a already sets the namespace mTLS mode"), "{}", errors[0]);

    // With timestamps: the oldest, whatever its name.
    let yaml = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: istio-system, creationTimestamp: '2026-05-02T00:00:00Z'}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: z, namespace: istio-system, creationTimestamp: '2026-05-01T00:00:00Z'}\nspec: {mtls: {mode: PERMISSIVE}}\n";
    let (p, errors) = compile(yaml);
    assert_eq!(p.mtls_mode("demo", &labels, 1), MtlsMode::Permissive);
    assert_eq!(p.mesh_peer_authentication(), Some("istio-system/z"));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].name, "a");
}

#[test]
fn invalid_peer_authentications_are_reported() {
    let (p, errors) = compile(
        &(pa("ns", "demo", "{portLevelMtls: {80: {mode: STRICT}}}")
            + &pa("zero", "demo", "{selector: {matchLabels: {app: db}}, portLevelMtls: {0: {mode: STRICT}}}")
            + &pa("ok", "demo", "{mtls: {mode: STRICT}}")),
    );
    let got: Vec<(&str, &str)> = errors.iter().map(|e| (e.name.as_str(), e.field.as_str())).collect();
    assert_eq!(got, [("ns", "spec.portLevelMtls"), ("zero", "spec.portLevelMtls.0")]);
    assert_eq!(p.mtls_mode("demo", &BTreeMap::new(), 80), MtlsMode::Strict);
    assert_eq!(p.peer_authentication_count(), 1);
    let (p, _) = compile(&pa("w", "istio-system", "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}"));
    assert!(p.warnings()[0].contains("ignored in ambient mode"), "{:?}", p.warnings());
}

#[test]
fn authorize_is_fast_enough_per_connection() {
    // 200 policies in the destination namespace and 20 mesh-wide: a decision must stay far below
    // a connection's setup cost. Bounded: 20k decisions.
    let mut yaml = String::new();
    for i in 0..200 {
        yaml += &ap(
            &format!("a{i}"),
            "demo",
            &format!("{{rules: [{{from: [{{source: {{principals: [cluster.local/ns/x{i}/sa/y]}}}}]}}]}}"),
        );
    }
    for i in 0..20 {
        yaml += &ap(
            &format!("d{i}"),
            "istio-system",
            &format!("{{action: DENY, rules: [{{from: [{{source: {{ipBlocks: [192.168.{i}.0/24]}}}}]}}]}}"),
        );
    }
    let (p, errors) = compile(&yaml);
    assert!(errors.is_empty());
    let start = std::time::Instant::now();
    let n = 20_000;
    for _ in 0..n {
        assert!(matches!(decide(&p, BASE), Decision::Deny { .. }));
    }
    let per = start.elapsed() / n;
    // Debug build; release is roughly 10x faster.
    assert!(per < std::time::Duration::from_micros(200), "{per:?} per decision");
}
