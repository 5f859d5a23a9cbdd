//! deploy/ against the real Kubernetes types (k8s-openapi, Kubernetes 1.36) and the agent's own flags:
//! - every document in deploy/manifests, deploy/crds, the chart and deploy/kind/demo.yaml deserializes
//!   into its typed object, and re-serializing gives back the same value tree (a typo'd or misplaced
//!   field is dropped by the typed object and shows up as a difference, with its path);
//! - RBAC: real verbs on resources that exist, and exactly the permissions each component needs;
//! - CRDs: structural schemas (no keyword Kubernetes rejects), versions as Istio serves them;
//! - the Helm chart rendered with values.yaml equals the plain manifests, and a changed value reaches
//!   the objects it should;
//! - the flags and mounts in the manifests are the ones `weft node` and `weft ca` accept and read.
//!
//! That the generated files are current is not checked here: `cargo xtask codegen --check` does it
//! (a step of `cargo xtask test`), since the generator lives in the xtask binary. No root needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{CustomResourceDefinition, JSONSchemaProps};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod structural;
use structural::structural;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace root").to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}; run `cargo xtask codegen`"))
}

/// The non-empty YAML documents of `text`, as JSON value trees.
fn parse_docs(text: &str, what: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, d)| Value::deserialize(d).unwrap_or_else(|e| panic!("{what} document {i}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn docs(rel: &str) -> Vec<Value> {
    parse_docs(&read(rel), rel)
}

/// Files in `dir` (relative to the root) ending in `.yaml`, sorted.
fn yaml_files(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml"))
        .map(|f| format!("{dir}/{f}"))
        .collect();
    files.sort();
    files
}

/// The first difference between two value trees, by path.
fn diff(want: &Value, got: &Value, path: &str) -> Option<String> {
    match (want, got) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                match b.get(k) {
                    None => {
                        return Some(format!(
                            "{path}.{k} was dropped by the typed object (unknown or misplaced field?)"
                        ));
                    }
                    Some(vb) => {
                        if let Some(d) = diff(va, vb, &format!("{path}.{k}")) {
                            return Some(d);
                        }
                    }
                }
            }
            b.keys().find(|k| !a.contains_key(*k)).map(|k| format!("{path}.{k} appeared: {}", b[k]))
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (x, y))| diff(x, y, &format!("{path}[{i}]")))
        }
        _ if want == got => None,
        _ => Some(format!("{path}: {want} became {got}")),
    }
}

/// `v` as a `T`, failing when deserializing fails or anything of `v` does not survive the round trip.
fn typed<T: DeserializeOwned + Serialize>(v: &Value, what: &str) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&t).expect("serialize");
    if let Some(d) = diff(v, &back, "") {
        panic!("{what}: {d}");
    }
    t
}

fn is<T: k8s_openapi::Resource>(v: &Value) -> bool {
    v["apiVersion"] == T::API_VERSION && v["kind"] == T::KIND
}

fn name_of(v: &Value) -> String {
    format!(
        "{} {}/{}",
        v["kind"].as_str().unwrap_or("?"),
        v["metadata"]["namespace"].as_str().unwrap_or("-"),
        v["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Checks `v` against the type its apiVersion and kind name; fails for a kind not listed here.
fn check_typed(v: &Value, file: &str) {
    let what = format!("{file}: {}", name_of(v));
    macro_rules! kinds {
        ($($t:ty),*) => {
            $(if is::<$t>(v) { typed::<$t>(v, &what); return; })*
        };
    }
    kinds!(
        Namespace,
        ServiceAccount,
        Service,
        DaemonSet,
        Deployment,
        ClusterRole,
        ClusterRoleBinding,
        Role,
        RoleBinding,
        CustomResourceDefinition
    );
    match (v["apiVersion"].as_str(), v["kind"].as_str()) {
        (Some("security.istio.io/v1"), Some("AuthorizationPolicy")) => {
            typed::<weft::crd::AuthorizationPolicy>(v, &what);
        }
        (Some("security.istio.io/v1"), Some("PeerAuthentication")) => {
            typed::<weft::crd::PeerAuthentication>(v, &what);
        }
        (Some("gateway.networking.k8s.io/v1"), Some("Gateway")) => {
            typed::<weft::crd::Gateway>(v, &what);
        }
        other => panic!("{what}: {other:?} is not a kind this test knows; add its type to check_typed"),
    }
}

const MANIFESTS: &str = "deploy/manifests/weft.yaml";
const CHART: &str = "deploy/charts/weft";

fn manifests() -> Vec<Value> {
    docs(MANIFESTS)
}

fn crd_files() -> Vec<String> {
    yaml_files("deploy/crds")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

#[test]
fn every_manifest_parses_into_the_kubernetes_types() {
    let docs = manifests();
    assert!(docs.len() >= 12, "{MANIFESTS} has only {} documents", docs.len());
    for d in &docs {
        check_typed(d, MANIFESTS);
    }
    let ids: BTreeSet<String> = docs.iter().map(name_of).collect();
    assert_eq!(ids.len(), docs.len(), "duplicate objects in {MANIFESTS}");
    // Everything but cluster-scoped kinds lives in weft-system.
    for d in &docs {
        let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&d["kind"].as_str().unwrap());
        assert_eq!(d["metadata"]["namespace"].is_null(), cluster_scoped, "{}", name_of(d));
        if !cluster_scoped {
            assert_eq!(d["metadata"]["namespace"], "weft-system", "{}", name_of(d));
        }
    }
}

#[test]
fn the_typed_check_catches_a_typo() {
    let mut ds = find(&manifests(), "DaemonSet", "weft-node").clone();
    ds["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let caught = std::panic::catch_unwind(|| typed::<DaemonSet>(&ds, "typo")).unwrap_err();
    let msg = caught.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains(".spec.template.spec.hostNetwrok was dropped"), "{msg}");
}

#[test]
fn the_demo_scenario_parses_into_the_kubernetes_and_istio_types() {
    let docs = docs("deploy/kind/demo.yaml");
    for d in &docs {
        check_typed(d, "deploy/kind/demo.yaml");
    }
    let demo = find(&docs, "Namespace", "demo");
    assert_eq!(demo["metadata"]["labels"]["istio.io/dataplane-mode"], "ambient");
    assert!(docs.iter().any(|d| d["kind"] == "AuthorizationPolicy"));
}

#[test]
fn kind_cluster_has_a_control_plane_two_workers_and_a_bpffs_per_node() {
    let cfg = &docs("deploy/kind/cluster.yaml")[0];
    assert_eq!(cfg["apiVersion"], "kind.x-k8s.io/v1alpha4");
    assert_eq!(cfg["kind"], "Cluster");
    let top: BTreeSet<&str> = cfg.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(top, BTreeSet::from(["apiVersion", "kind", "name", "nodes"]));
    let nodes = cfg["nodes"].as_array().unwrap();
    let roles: Vec<&str> = nodes.iter().map(|n| n["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);
    let mut host_paths = BTreeSet::new();
    for n in nodes {
        let keys: BTreeSet<&str> = n.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["role", "extraMounts"]), "{n}");
        let m = &n["extraMounts"][0];
        let keys: BTreeSet<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["hostPath", "containerPath", "propagation"]), "{m}");
        assert_eq!(m["containerPath"], "/sys/fs/bpf");
        assert_eq!(m["propagation"], "Bidirectional");
        let host = m["hostPath"].as_str().unwrap();
        assert!(host.starts_with("/sys/fs/bpf/"), "{host}");
        host_paths.insert(host);
    }
    // The nodes share a kernel: one bpffs directory each, or their agents' pins collide.
    assert_eq!(host_paths.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// RBAC

/// (group, resource) → verbs it supports, for the built-in resources weft's roles may name.
fn builtin_resources() -> BTreeMap<(String, String), Vec<&'static str>> {
    fn r<T: k8s_openapi::Resource>() -> (String, String) {
        (T::GROUP.to_owned(), T::URL_PATH_SEGMENT.to_owned())
    }
    const STANDARD: [&str; 8] = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"];
    let mut m = BTreeMap::new();
    for k in [
        r::<Pod>(),
        r::<Namespace>(),
        r::<Service>(),
        r::<ServiceAccount>(),
        r::<Secret>(),
        r::<ConfigMap>(),
        r::<EndpointSlice>(),
        r::<k8s_openapi::api::events::v1::Event>(),
        r::<k8s_openapi::api::apps::v1::DaemonSet>(),
        r::<k8s_openapi::api::core::v1::Node>(),
    ] {
        m.insert(k, STANDARD.to_vec());
    }
    // A review is a create-only virtual resource.
    m.insert(r::<TokenReview>(), vec!["create"]);
    // The one subresource a role may name: waypoints report whether they accepted each route.
    m.insert(("gateway.networking.k8s.io".to_owned(), "httproutes/status".to_owned()), vec!["get", "patch", "update"]);
    // CRDs weft reads but does not install (their plurals as Istio and Gateway API define them).
    for (g, res) in [
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
        ("gateway.networking.k8s.io", "gateways"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("gateway.networking.k8s.io", "grpcroutes"),
    ] {
        m.insert((g.to_owned(), res.to_owned()), STANDARD.to_vec());
    }
    for f in crd_files() {
        let crd: CustomResourceDefinition = serde_json::from_value(docs(&f)[0].clone()).unwrap();
        m.insert((crd.spec.group.clone(), crd.spec.names.plural.clone()), STANDARD.to_vec());
    }
    m
}

/// One granted permission: scope (`cluster` or the namespace), group, resource, verb, resource name.
type Grant = (String, String, String, String, Option<String>);

fn grants(scope: &str, rules: &[PolicyRule], known: &BTreeMap<(String, String), Vec<&'static str>>) -> Vec<Grant> {
    let mut out = Vec::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none(), "{rule:?}: no non-resource URLs are needed");
        let groups = rule.api_groups.as_deref().expect("apiGroups");
        let resources = rule.resources.as_deref().expect("resources");
        let names: Vec<Option<String>> = match rule.resource_names.as_deref() {
            Some(n) => n.iter().cloned().map(Some).collect(),
            None => vec![None],
        };
        for g in groups {
            for res in resources {
                assert!(
                    g != "*" && res != "*" && (!res.contains('/') || res == "httproutes/status"),
                    "{rule:?}: no wildcards or subresources (but HTTPRoute status)"
                );
                let verbs = known
                    .get(&(g.clone(), res.clone()))
                    .unwrap_or_else(|| panic!("{g:?}/{res}: not a resource this test knows exists (typo?)"));
                for v in &rule.verbs {
                    assert!(verbs.contains(&v.as_str()), "{g:?}/{res}: verb {v:?} is not one it supports ({verbs:?})");
                    if rule.resource_names.is_some() {
                        assert!(
                            !["create", "list", "watch", "deletecollection"].contains(&v.as_str()),
                            "{g:?}/{res}: {v} cannot be limited by resourceNames; the rule would not match"
                        );
                    }
                    for n in &names {
                        out.push((scope.to_owned(), g.clone(), res.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

/// Every permission each ServiceAccount (namespace/name) gets through the bindings in the manifests.
fn permissions() -> BTreeMap<String, BTreeSet<Grant>> {
    let docs = manifests();
    let known = builtin_resources();
    let mut out: BTreeMap<String, BTreeSet<Grant>> = BTreeMap::new();
    let sas: BTreeSet<String> = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .map(|d| {
            format!("{}/{}", d["metadata"]["namespace"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap())
        })
        .collect();
    for d in &docs {
        let (role_ref, subjects, scope) = match d["kind"].as_str().unwrap() {
            "ClusterRoleBinding" => {
                let b: ClusterRoleBinding = serde_json::from_value(d.clone()).unwrap();
                (b.role_ref, b.subjects.unwrap_or_default(), "cluster".to_owned())
            }
            "RoleBinding" => {
                let b: RoleBinding = serde_json::from_value(d.clone()).unwrap();
                let ns = b.metadata.namespace.clone().unwrap();
                (b.role_ref, b.subjects.unwrap_or_default(), ns)
            }
            _ => continue,
        };
        assert_eq!(role_ref.api_group.as_deref(), Some("rbac.authorization.k8s.io"), "{}", name_of(d));
        let rules = match role_ref.kind.as_str() {
            "ClusterRole" => {
                let r: ClusterRole =
                    serde_json::from_value(find(&docs, "ClusterRole", &role_ref.name).clone()).unwrap();
                r.rules.unwrap_or_default()
            }
            "Role" => {
                let r: Role = serde_json::from_value(find(&docs, "Role", &role_ref.name).clone()).unwrap();
                assert_eq!(r.metadata.namespace.as_deref(), Some(scope.as_str()), "Role and RoleBinding namespaces");
                r.rules.unwrap_or_default()
            }
            other => panic!("{}: roleRef kind {other}", name_of(d)),
        };
        for s in subjects {
            assert_eq!(s.kind, "ServiceAccount", "{}", name_of(d));
            let sa = format!("{}/{}", s.namespace.as_deref().expect("subject namespace"), s.name);
            assert!(sas.contains(&sa), "{}: binds {sa}, which the manifests do not create", name_of(d));
            out.entry(sa).or_default().extend(grants(&scope, &rules, &known));
        }
    }
    out
}

fn grant(scope: &str, group: &str, resource: &str, verb: &str, name: Option<&str>) -> Grant {
    (scope.into(), group.into(), resource.into(), verb.into(), name.map(Into::into))
}

#[test]
fn rbac_is_exactly_what_each_component_needs() {
    let perms = permissions();
    let mut node = BTreeSet::new();
    for (g, res) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
        ("networking.istio.io", "envoyfilters"),
        ("gateway.networking.k8s.io", "gateways"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("gateway.networking.k8s.io", "grpcroutes"),
    ] {
        for v in ["get", "list", "watch"] {
            node.insert(grant("cluster", g, res, v, None));
        }
    }
    node.insert(grant("cluster", "events.k8s.io", "events", "create", None));
    node.insert(grant("cluster", "events.k8s.io", "events", "patch", None));
    // Its own DaemonSet, to tell an uninstall from a restart on SIGTERM (weft::uninstall).
    let own_daemon_set = grant("weft-system", "apps", "daemonsets", "get", Some("weft-node"));
    let mut node_and_own = node.clone();
    node_and_own.insert(own_daemon_set);
    // Its own Node, to tell whether the DaemonSet still selects it on SIGTERM.
    node_and_own.insert(grant("cluster", "", "nodes", "get", None));
    assert_eq!(perms["weft-system/weft-node"], node_and_own, "weft-node");

    // Waypoints read what node agents read and write HTTPRoute status. The ClusterRole is bound per
    // waypoint ServiceAccount by `weft ctl waypoint apply`, not in the install.
    let docs = manifests();
    let role: ClusterRole = serde_json::from_value(find(&docs, "ClusterRole", "weft-waypoint").clone()).unwrap();
    let mut waypoint: BTreeSet<Grant> =
        grants("cluster", &role.rules.unwrap_or_default(), &builtin_resources()).into_iter().collect();
    for v in ["get", "patch", "update"] {
        assert!(waypoint.remove(&grant("cluster", "gateway.networking.k8s.io", "httproutes/status", v, None)), "{v}");
    }
    assert_eq!(waypoint, node, "weft-waypoint: the node agent's reads besides route status");

    // ca_server::kube (TokenReview, pods by name and by node), ca_server::root (the root Secret) and
    // ca_server::publish (the root-certificate ConfigMap in every namespace, by server-side apply as
    // namespaces appear).
    let ca = BTreeSet::from([
        grant("cluster", "authentication.k8s.io", "tokenreviews", "create", None),
        grant("cluster", "", "pods", "get", None),
        grant("cluster", "", "pods", "list", None),
        grant("cluster", "", "namespaces", "list", None),
        grant("cluster", "", "namespaces", "watch", None),
        grant("cluster", "", "configmaps", "get", Some(weft::ca_server::DEFAULT_ROOT_CONFIGMAP)),
        grant("cluster", "", "configmaps", "patch", Some(weft::ca_server::DEFAULT_ROOT_CONFIGMAP)),
        grant("cluster", "", "configmaps", "create", None),
        grant("weft-system", "", "secrets", "get", Some(weft::ca_server::DEFAULT_ROOT_SECRET)),
        grant("weft-system", "", "secrets", "create", None),
    ]);
    assert_eq!(perms["weft-system/weft-ca"], ca, "weft-ca");
    assert_eq!(perms.len(), 2, "{:?}", perms.keys());
}

// ---------------------------------------------------------------------------------------------
// CRDs

#[test]
fn crds_parse_are_structural_and_served_as_istio_serves_them() {
    let files = crd_files();
    let names: Vec<&str> = files.iter().map(|f| f.rsplit('/').next().unwrap()).collect();
    assert_eq!(
        names,
        [
            "authorizationpolicies.security.istio.io.yaml",
            "destinationrules.networking.istio.io.yaml",
            "envoyfilters.networking.istio.io.yaml",
            "peerauthentications.security.istio.io.yaml",
            "virtualservices.networking.istio.io.yaml",
        ]
    );
    for f in &files {
        let all = docs(f);
        assert_eq!(all.len(), 1, "{f}: one CRD per file");
        check_typed(&all[0], f);
        let crd: CustomResourceDefinition = serde_json::from_value(all[0].clone()).unwrap();
        let spec = &crd.spec;
        assert_eq!(crd.metadata.name.as_deref(), Some(format!("{}.{}", spec.names.plural, spec.group).as_str()), "{f}");
        assert!(["security.istio.io", "networking.istio.io"].contains(&spec.group.as_str()), "{f}");
        assert_eq!(spec.scope, "Namespaced", "{f}");
        assert!(spec.preserve_unknown_fields != Some(true), "{f}: preserveUnknownFields is not allowed in v1");
        assert!(spec.conversion.is_none(), "{f}: versions share a schema: no conversion webhook");
        let versions: Vec<(&str, bool, bool)> =
            spec.versions.iter().map(|v| (v.name.as_str(), v.served, v.storage)).collect();
        let want: &[(&str, bool, bool)] = match (spec.group.as_str(), spec.names.kind.as_str()) {
            ("security.istio.io", _) => &[("v1", true, true), ("v1beta1", true, false)],
            (_, "EnvoyFilter") => &[("v1alpha3", true, true)],
            _ => &[("v1", true, true), ("v1beta1", true, false), ("v1alpha3", true, false)],
        };
        assert_eq!(versions, want, "{f}");
        for v in &spec.versions {
            assert_eq!(v.schema, spec.versions[0].schema, "{f}: {} has another schema than v1", v.name);
            for c in v.additional_printer_columns.iter().flatten() {
                assert!(c.json_path.starts_with('.'), "{f}: printer column {} path {}", c.name, c.json_path);
                assert!(
                    ["integer", "number", "string", "boolean", "date"].contains(&c.type_.as_str()),
                    "{f}: {}",
                    c.type_
                );
            }
            let schema = v.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("openAPIV3Schema");
            assert_eq!(schema.type_.as_deref(), Some("object"), "{f}: the root must be an object");
            if let Some(meta) = schema.properties.as_ref().and_then(|p| p.get("metadata")) {
                let extra: Vec<&String> = meta
                    .properties
                    .iter()
                    .flatten()
                    .map(|(k, _)| k)
                    .filter(|k| *k != "name" && *k != "generateName")
                    .collect();
                assert!(extra.is_empty(), "{f}: metadata may only constrain name and generateName, not {extra:?}");
            }
            let spec_schema = schema.properties.as_ref().and_then(|p| p.get("spec")).expect("a spec property");
            assert!(spec_schema.properties.as_ref().is_some_and(|p| !p.is_empty()), "{f}: spec has no fields");
            let mut errs = Vec::new();
            structural(schema, &format!("{f} {}", v.name), false, &mut errs);
            assert!(errs.is_empty(), "not structural:\n{}", errs.join("\n"));
        }
    }
}

#[test]
fn the_structural_check_catches_rejected_keywords() {
    let bad: JSONSchemaProps = serde_json::from_value(serde_json::json!({
        "type": "object",
        "properties": {
            "a": {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
            "b": {"description": "no type"},
            "c": {"type": "string", "anyOf": [{"type": "string"}]},
            "d": {"type": "string", "enum": ["X"], "default": "Y"},
        },
    }))
    .unwrap();
    let mut errs = Vec::new();
    structural(&bad, "t", false, &mut errs);
    let all = errs.join("\n");
    for want in ["t.a: patternProperties", "t.b: no type", "t.c.anyOf[0]: type inside", "t.d: default \"Y\""] {
        assert!(all.contains(want), "{want} not in:\n{all}");
    }
}

// ---------------------------------------------------------------------------------------------
// Helm chart ↔ plain manifests

fn values() -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&read(&format!("{CHART}/values.yaml"))).expect("values.yaml")
}

/// Every leaf path of values.yaml (`image.tag`), with its value as Helm prints it.
fn leaf_values(v: &serde_yaml_ng::Value, prefix: &str, out: &mut BTreeMap<String, String>) {
    match v {
        serde_yaml_ng::Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().expect("string keys");
                let path = if prefix.is_empty() { k.to_owned() } else { format!("{prefix}.{k}") };
                leaf_values(v, &path, out);
            }
        }
        serde_yaml_ng::Value::String(s) => {
            out.insert(prefix.to_owned(), s.clone());
        }
        serde_yaml_ng::Value::Number(n) => {
            out.insert(prefix.to_owned(), n.to_string());
        }
        serde_yaml_ng::Value::Bool(b) => {
            out.insert(prefix.to_owned(), b.to_string());
        }
        other => panic!("values.yaml {prefix}: unexpected {other:?}"),
    }
}

/// Renders a template as Helm would: the templates use only `{{ .Values.<path> }}`, inside quoted
/// YAML strings (checked here), so rendering is substitution, and whole optional files wrapped in
/// `{{- if .Values.<path> }}` … `{{- end }}` (a boolean value). Returns the text and the paths used.
fn render(template: &str, values: &BTreeMap<String, String>, file: &str) -> (String, BTreeSet<String>) {
    let mut out = String::new();
    let mut used = BTreeSet::new();
    let mut template = template;
    let body;
    if let Some(start) = template.find("{{- if .Values.") {
        let after = &template[start + "{{- if .Values.".len()..];
        let (path, inner) = after.split_once(" }}\n").unwrap_or_else(|| panic!("{file}: malformed if"));
        let inner = inner.strip_suffix("{{- end }}\n").unwrap_or_else(|| panic!("{file}: the if must wrap the file"));
        assert!(!inner.contains("{{- "), "{file}: one if per file");
        let value = values.get(path).unwrap_or_else(|| panic!("{file}: if names no value in values.yaml"));
        used.insert(path.to_owned());
        match value.as_str() {
            "true" => body = format!("{}{inner}", &template[..start]),
            "false" => {
                // Values used only inside the block are still used (and must be well placed).
                used.extend(render(inner, values, file).1);
                return (template[..start].to_owned(), used);
            }
            other => panic!("{file}: {path} is {other:?}, not a boolean"),
        }
        template = &body;
    }
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let end = after.find("}}").unwrap_or_else(|| panic!("{file}: unclosed {{{{"));
        let action = &after[..end + 2];
        let path = action
            .strip_prefix("{{ .Values.")
            .and_then(|p| p.strip_suffix(" }}"))
            .filter(|p| p.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'))
            .unwrap_or_else(|| {
                panic!("{file}: {action} is template syntax this renderer (and the chart) does not use")
            });
        let line_start = out.rfind('\n').map_or(0, |i| i + 1);
        let line = &out[line_start..];
        // Quoted, or after a literal prefix (`name: weft-waypoint-{{ … }}`), which keeps it a string.
        let prefixed = line.rsplit_once(": ").is_some_and(|(_, p)| p.starts_with(|c: char| c.is_ascii_alphabetic()));
        assert!(
            line.contains(": '") || line.contains("- '") || prefixed,
            "{file}: {action} must sit inside a quoted YAML string (or after a literal prefix) so any value stays a string"
        );
        let value = values.get(path).unwrap_or_else(|| panic!("{file}: {action} names no value in values.yaml"));
        assert!(!value.contains('\''), "value {path} contains a single quote, which would end the YAML string");
        out.push_str(value);
        used.insert(path.to_owned());
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    (out, used)
}

fn render_chart(values: &BTreeMap<String, String>) -> (Vec<Value>, BTreeSet<String>) {
    let mut docs = Vec::new();
    let mut used = BTreeSet::new();
    for f in yaml_files(&format!("{CHART}/templates")) {
        let (text, u) = render(&read(&f), values, &f);
        docs.extend(parse_docs(&text, &f));
        used.extend(u);
    }
    (docs, used)
}

fn default_values() -> BTreeMap<String, String> {
    let mut vals = BTreeMap::new();
    leaf_values(&values(), "", &mut vals);
    vals
}

#[test]
fn chart_with_default_values_equals_the_plain_manifests() {
    let vals = default_values();
    let (chart, used) = render_chart(&vals);
    let unused: Vec<&String> = vals.keys().filter(|k| !used.contains(*k)).collect();
    assert!(unused.is_empty(), "values.yaml has values no template uses: {unused:?}");

    let plain = manifests();
    let key = |d: &Value| name_of(d) + " " + d["apiVersion"].as_str().unwrap_or("");
    let chart_by: BTreeMap<String, &Value> = chart.iter().map(|d| (key(d), d)).collect();
    let plain_by: BTreeMap<String, &Value> = plain.iter().map(|d| (key(d), d)).collect();
    assert_eq!(chart_by.len(), chart.len(), "duplicate objects in the chart");
    assert_eq!(chart_by.keys().collect::<Vec<_>>(), plain_by.keys().collect::<Vec<_>>(), "different objects");
    for (k, c) in &chart_by {
        if let Some(d) = diff(plain_by[k], c, "") {
            panic!("{k}: the chart differs from {MANIFESTS}: {d}");
        }
    }
    for d in &chart {
        check_typed(d, "rendered chart");
    }
    // Helm installs crds/ untemplated: the same CRDs as deploy/crds.
    for f in crd_files() {
        let name = f.rsplit('/').next().unwrap();
        assert_eq!(read(&format!("{CHART}/crds/{name}")), read(&f), "{CHART}/crds/{name} differs from {f}");
    }
    assert_eq!(yaml_files(&format!("{CHART}/crds")).len(), crd_files().len());
}

fn containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers.iter().flatten().chain(&spec.containers)
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.as_deref())
}

#[test]
fn changed_values_reach_the_objects() {
    let mut vals = default_values();
    vals.insert("trustDomain".into(), "example.org".into());
    vals.insert("image.repository".into(), "registry.example/weft".into());
    vals.insert("image.tag".into(), "1.2".into());
    vals.insert("image.pullPolicy".into(), "Always".into());
    vals.insert("logLevel".into(), "debug".into());
    let (chart, _) = render_chart(&vals);
    let ds: DaemonSet = typed(find(&chart, "DaemonSet", "weft-node"), "DaemonSet");
    let dep: Deployment = typed(find(&chart, "Deployment", "weft-ca"), "Deployment");
    let pods = [ds.spec.unwrap().template.spec.unwrap(), dep.spec.unwrap().template.spec.unwrap()];
    let mut n = 0;
    for c in pods.iter().flat_map(containers) {
        assert_eq!(c.image.as_deref(), Some("registry.example/weft:1.2"), "{}", c.name);
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"), "{}", c.name);
        assert_eq!(env(c, "RUST_LOG"), Some("debug"), "{}", c.name);
        n += 1;
    }
    assert_eq!(n, 3, "install-cni, node, ca");
    for (pod, name) in [(&pods[0], "node"), (&pods[1], "ca")] {
        let c = pod.containers.iter().find(|c| c.name == name).unwrap();
        assert_eq!(env(c, weft::config::TRUST_DOMAIN_ENV), Some("example.org"), "{name}");
    }
}

#[test]
fn the_waypoint_switch_deploys_what_weft_ctl_creates() {
    let mut vals = default_values();
    assert_eq!(vals["waypoint.enabled"], "false");
    let (off, _) = render_chart(&vals);
    assert!(!off.iter().any(|d| d["kind"] == "Gateway"), "no waypoint by default");
    vals.insert("waypoint.enabled".into(), "true".into());
    vals.insert("waypoint.namespace".into(), "bookinfo".into());
    vals.insert("waypoint.name".into(), "reviews-wp".into());
    let (chart, _) = render_chart(&vals);
    for d in &chart {
        check_typed(d, "rendered chart with a waypoint");
    }
    let w = weft::ctl::Waypoint {
        namespace: "bookinfo".into(),
        name: "reviews-wp".into(),
        image: format!("{}:{}", vals["image.repository"], vals["image.tag"]),
        trust_domain: vals["trustDomain"].clone(),
    };
    let want = w.objects(false);
    let gw: weft::crd::Gateway = typed(find(&chart, "Gateway", "reviews-wp"), "Gateway");
    assert_eq!(gw, want.gateway);
    let svc: Service = typed(find(&chart, "Service", "reviews-wp"), "Service");
    assert_eq!(svc, want.service);
    let sa: ServiceAccount = typed(find(&chart, "ServiceAccount", "reviews-wp"), "ServiceAccount");
    assert_eq!(sa, want.service_account);
    let b: ClusterRoleBinding = typed(find(&chart, "ClusterRoleBinding", &w.binding_name()), "ClusterRoleBinding");
    assert_eq!(b, want.cluster_role_binding);
    assert!(chart.iter().any(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == b.role_ref.name));
    let dep: Deployment = typed(find(&chart, "Deployment", "reviews-wp"), "Deployment");
    let c = &dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    let want_c = &want.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        (&c.image, &c.args, &c.ports, &c.volume_mounts),
        (&want_c.image, &want_c.args, &want_c.ports, &want_c.volume_mounts)
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some(vals["image.pullPolicy"].as_str()));
    assert_eq!(env(c, "RUST_LOG"), Some(vals["logLevel"].as_str()));
    // The args are what `weft waypoint` accepts.
    #[derive(Parser)]
    struct WaypointCli {
        #[command(flatten)]
        w: weft::config::WaypointArgs,
    }
    let mut argv = vec!["weft".to_owned()];
    argv.extend(c.args.iter().flatten().skip(1).cloned());
    let parsed = WaypointCli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert_eq!((parsed.w.namespace.as_str(), parsed.w.name.as_str()), ("bookinfo", "reviews-wp"));
}

#[test]
fn kustomization_lists_the_crds_and_the_manifests() {
    let k = &docs("deploy/kustomization.yaml")[0];
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    let listed: Vec<String> =
        k["resources"].as_array().unwrap().iter().map(|r| format!("deploy/{}", r.as_str().unwrap())).collect();
    let mut want = crd_files();
    want.push(MANIFESTS.to_owned());
    assert_eq!(listed, want);
}

// ---------------------------------------------------------------------------------------------
// The manifests against the agent's flags and defaults

#[derive(Parser)]
struct NodeCli {
    #[command(flatten)]
    node: weft::config::NodeArgs,
}

#[derive(Parser)]
struct CaCli {
    #[command(flatten)]
    ca: weft::ca_server::CaArgs,
}

fn pod_spec(docs: &[Value], kind: &str, name: &str) -> PodSpec {
    let v = find(docs, kind, name);
    let spec = &v["spec"]["template"]["spec"];
    serde_json::from_value(spec.clone()).expect("pod spec")
}

/// The argv of container `name` after the binary and subcommand, checking both.
fn flags(spec: &PodSpec, name: &str, sub: &[&str]) -> Vec<String> {
    let c = containers(spec).find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"));
    let cmd = c.command.clone().unwrap_or_default();
    assert_eq!(cmd[0], "/usr/local/bin/weft", "{name}: the binary deploy/Dockerfile installs");
    assert_eq!(&cmd[1..], sub, "{name}: subcommand");
    c.args.clone().unwrap_or_default()
}

/// The volume mounted at `dir` in container `name`.
fn volume_at<'a>(spec: &'a PodSpec, name: &str, dir: &str) -> &'a k8s_openapi::api::core::v1::Volume {
    let c = containers(spec).find(|c| c.name == name).unwrap();
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("{name}: nothing mounted at {dir}"));
    spec.volumes.iter().flatten().find(|v| v.name == m.name).unwrap_or_else(|| panic!("no volume {}", m.name))
}

#[test]
fn node_agent_flags_and_mounts_are_what_weft_node_reads() {
    let docs = manifests();
    let spec = pod_spec(&docs, "DaemonSet", "weft-node");
    let mut argv = vec!["weft".to_owned()];
    argv.extend(flags(&spec, "node", &["node"]));
    let cli = NodeCli::try_parse_from(&argv).unwrap_or_else(|e| panic!("weft node rejects {argv:?}: {e}"));
    let cfg = weft::config::Config::from_node_args(cli.node).expect("a valid weft node configuration");
    assert!(matches!(cfg.source, weft::config::Source::Kube { kubeconfig: None }), "in-cluster: {:?}", cfg.source);
    let weft::config::CaMode::Remote { address, root_cert, token_path } = &cfg.ca else { panic!("remote CA expected") };

    // The CA address names the Service in the manifests, on its port.
    let host = address.strip_prefix("https://").unwrap();
    let (host, port) = host.rsplit_once(':').unwrap();
    let mut labels = host.split('.');
    let (svc, ns) = (labels.next().unwrap(), labels.next().unwrap());
    let service: Service = typed(find(&docs, "Service", svc), "Service");
    assert_eq!(service.metadata.namespace.as_deref(), Some(ns));
    assert!(service.spec.unwrap().ports.unwrap().iter().any(|p| p.port.to_string() == port), "{address}");

    // The projected token for the CA, with Istio's audience, where weft node reads it.
    let dir = |p: &Path| p.parent().unwrap().to_str().unwrap().to_owned();
    let file = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_owned();
    let token = volume_at(&spec, "node", &dir(token_path));
    let sat = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0].service_account_token.clone().unwrap();
    assert_eq!(sat.audience.as_deref(), Some(weft::ca_server::DEFAULT_AUDIENCE));
    assert_eq!(sat.path, file(token_path));
    // The mesh root from the CA's ConfigMap.
    let root = volume_at(&spec, "node", &dir(root_cert)).config_map.clone().expect("a ConfigMap volume");
    assert_eq!(root.name, weft::ca_server::DEFAULT_ROOT_CONFIGMAP);
    let item = &root.items.unwrap()[0];
    assert_eq!((item.key.as_str(), item.path.clone()), (weft::ca_server::CONFIGMAP_ROOT_KEY, file(root_cert)));
    // The host's cgroup2 root, bpffs with propagation back to the host, the node's netns, CNI dirs.
    let host_path =
        |container: &str, at: &str| volume_at(&spec, container, at).host_path.clone().expect("hostPath").path;
    assert_eq!(host_path("node", cfg.cgroup.to_str().unwrap()), "/sys/fs/cgroup");
    assert_eq!(host_path("node", "/sys/fs/bpf"), "/sys/fs/bpf");
    assert!(cfg.bpf_pin_dir.starts_with("/sys/fs/bpf"), "{:?}", cfg.bpf_pin_dir);
    let netns = weft::netns::NAMED_NETNS_DIR;
    assert_eq!(host_path("node", netns), netns, "the runtime's named netns, at the path the agent scans");
    // The CNI plugin runs on the host and dials the agent's socket at its default path.
    let socket_dir = dir(Path::new(weft::cni::DEFAULT_SOCKET));
    assert_eq!(host_path("node", &socket_dir), socket_dir);
    assert_eq!(host_path("node", "/host/proc"), "/proc");
    assert_eq!(host_path("install-cni", "/opt/cni/bin"), "/opt/cni/bin");
    assert_eq!(host_path("install-cni", "/etc/cni/net.d"), "/etc/cni/net.d");
    let node = spec.containers.iter().find(|c| c.name == "node").unwrap();
    let bpf = node.volume_mounts.iter().flatten().find(|m| m.mount_path == "/sys/fs/bpf").unwrap();
    assert_eq!(bpf.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_eq!(node.security_context.as_ref().and_then(|s| s.privileged), Some(true));
    assert_eq!((spec.host_network, spec.host_pid), (Some(true), Some(true)));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"), "the CA's Service name must resolve");

    // NODE_NAME from the downward API; readiness on the agent's ready port.
    let nn = node.env.iter().flatten().find(|e| e.name == weft::config::NODE_NAME_ENV).expect("NODE_NAME");
    assert_eq!(nn.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "spec.nodeName");
    let probe = node.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(
        probe.port.clone(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(cfg.ready_addr.port().into())
    );

    // The CA's node-agent ServiceAccount is the one the DaemonSet runs as.
    let sa = spec.service_account_name.as_deref().unwrap();
    assert_eq!(format!("system:serviceaccount:weft-system:{sa}"), weft::ca_server::DEFAULT_NODE_AGENT);
}

#[test]
fn ca_flags_are_what_weft_ca_accepts() {
    let docs = manifests();
    let spec = pod_spec(&docs, "Deployment", "weft-ca");
    let mut argv = vec!["weft".to_owned()];
    argv.extend(flags(&spec, "ca", &["ca"]));
    let cli = CaCli::try_parse_from(&argv).unwrap_or_else(|e| panic!("weft ca rejects {argv:?}: {e}"));
    let cfg = weft::ca_server::CaConfig::from_args(cli.ca).expect("a valid weft ca configuration");
    assert_eq!(cfg.node_agents, [weft::ca_server::DEFAULT_NODE_AGENT]);
    assert_eq!(cfg.audiences, [weft::ca_server::DEFAULT_AUDIENCE]);
    // The name node agents dial is in the serving certificate.
    let node_addr = weft::config::DEFAULT_CA_ADDRESS.strip_prefix("https://").unwrap();
    assert!(cfg.dns_names.iter().any(|n| node_addr.starts_with(&format!("{n}:"))), "{:?}", cfg.dns_names);
    let service: Service = typed(find(&docs, "Service", "weft-ca"), "Service");
    let sspec = service.spec.unwrap();
    assert!(sspec.ports.unwrap().iter().any(|p| i32::from(cfg.listen.port()) == p.port));
    let dep: Deployment = typed(find(&docs, "Deployment", "weft-ca"), "Deployment");
    let pod_labels = dep.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    for (k, v) in sspec.selector.unwrap() {
        assert_eq!(pod_labels.get(&k), Some(&v), "the Service selects the CA's pods");
    }
    let c = &spec.containers[0];
    let ns = c.env.iter().flatten().find(|e| e.name == weft::ca_server::POD_NAMESPACE_ENV).expect("POD_NAMESPACE");
    assert_eq!(ns.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "metadata.namespace");
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));
    assert!(volume_at(&spec, "ca", "/tmp").empty_dir.is_some(), "the root passes through a temp dir");
}

#[test]
fn the_image_installs_the_binary_where_the_manifests_run_it() {
    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.contains("COPY --from=build /weft /usr/local/bin/weft"), "deploy/Dockerfile");
}
