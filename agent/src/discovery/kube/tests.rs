use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DynamicObject, PartialObjectMeta};
use serde::Deserialize;

use super::build::{Builder, Inputs};
use super::records::Record;
use super::*;
use crate::discovery::file::{self, FileOptions};
use crate::policy::{Connection, Decision};

fn opts() -> KubeOptions {
    KubeOptions {
        trust_domain: "cluster.local".into(),
        node_name: "node-a".into(),
        root_namespace: "istio-system".into(),
    }
}

/// The objects of a multi-document YAML as the reflectors would hold them (trimmed).
fn inputs(yaml: &str) -> Inputs {
    let mut i = Inputs::default();
    let mut interner = records::Interner::default();
    for de in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = serde_json::Value::deserialize(de).unwrap();
        if v.is_null() {
            continue;
        }
        match v["kind"].as_str().unwrap() {
            "Namespace" => {
                let mut n: PartialObjectMeta<Namespace> = serde_json::from_value(v).unwrap();
                trim::namespace(&mut n);
                i.namespaces.insert(n.metadata.name.clone().unwrap(), n.metadata.labels.clone().unwrap_or_default());
            }
            "Pod" => {
                let p: trim::KeptPod = serde_json::from_value(v).unwrap();
                i.pods.push(Arc::new(records::PodRecord::from_object(p, &mut interner)));
            }
            "Service" => {
                let s: Service = serde_json::from_value(v).unwrap();
                i.services.push(Arc::new(records::ServiceRecord::from_object(s, &mut interner)));
            }
            "EndpointSlice" => {
                let s: EndpointSlice = serde_json::from_value(v).unwrap();
                i.slices.push(Arc::new(records::SliceRecord::from_object(s, &mut interner)));
            }
            "AuthorizationPolicy" | "PeerAuthentication" => {
                let peer = v["kind"] == "PeerAuthentication";
                let mut o: DynamicObject = serde_json::from_value(v).unwrap();
                trim::dynamic(&mut o);
                if peer { i.peer.push(Arc::new(o)) } else { i.authz.push(Arc::new(o)) }
            }
            "VirtualService" | "DestinationRule" | "EnvoyFilter" | "Gateway" | "HTTPRoute" => {
                let kind = v["kind"].as_str().unwrap().to_owned();
                let mut o: DynamicObject = serde_json::from_value(v).unwrap();
                trim::routing(&mut o);
                let list = match kind.as_str() {
                    "VirtualService" => &mut i.virtual_services,
                    "DestinationRule" => &mut i.destination_rules,
                    "EnvoyFilter" => &mut i.envoy_filters,
                    "Gateway" => &mut i.gateways,
                    _ => &mut i.http_routes,
                };
                list.push(Arc::new(o));
            }
            "ServiceAccount" => {}
            k => panic!("unexpected kind {k}"),
        }
    }
    i
}

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: curl, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: curl}}
spec: {serviceAccountName: curl, nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.10.1.2, podIPs: [{ip: 10.10.1.2}, {ip: "fd00::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: demo, labels: {app: legacy, istio.io/dataplane-mode: none}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.10.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: demo, labels: {app: web}}
spec: {nodeName: node-b, containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.10.1.4}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: plain}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.10.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: raw, port: 90, targetPort: 9090}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-curl, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/curl]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn authorize(state: &State, principal: &str, dest: &str, port: u16) -> Decision {
    let w = state.workload_by_ip(ip(dest)).expect("destination is a workload");
    state.policies.authorize(&Connection {
        source_principal: Some(principal),
        source_namespace: None,
        source_ip: ip("10.10.1.2"),
        dest_ip: ip(dest),
        dest_port: port,
        dest_namespace: &w.namespace,
        dest_labels: &w.labels,
    })
}

#[test]
fn same_objects_give_the_file_sources_state() {
    let from_file = file::parse(
        MESH,
        "mesh.yaml",
        &FileOptions {
            trust_domain: "cluster.local".into(),
            node_name: "node-a".into(),
            root_namespace: "istio-system".into(),
        },
    )
    .expect("the file source accepts the mesh");
    let from_kube = Builder::new(opts()).build_from(&inputs(MESH));

    let sorted = |s: &State| s.workloads_by_ip.iter().map(|(ip, w)| (*ip, (**w).clone())).collect::<BTreeMap<_, _>>();
    assert_eq!(sorted(&from_kube), sorted(&from_file));
    let services = |s: &State| s.services_by_vip.iter().map(|(ip, v)| (*ip, (**v).clone())).collect::<BTreeMap<_, _>>();
    assert_eq!(services(&from_kube), services(&from_file));
    assert_eq!(from_kube.namespaces, from_file.namespaces);
    assert_eq!(from_kube.policies.authorization_policy_count(), from_file.policies.authorization_policy_count());
    assert_eq!(from_kube.policies.peer_authentication_count(), from_file.policies.peer_authentication_count());

    let local: Vec<String> = from_kube
        .workloads_by_ip
        .values()
        .filter(|w| w.captured && w.node.as_deref() == Some("node-a"))
        .map(|w| w.name.clone())
        .collect();
    assert!(local.iter().all(|n| n == "client"), "only the ambient, not-opted-out pod is captured: {local:?}");
    assert!(
        from_kube.workloads_by_ip.values().all(|w| w.netns.is_none()),
        "the CNI plugin supplies netns in a cluster"
    );
    let web = from_kube.service_by_vip(ip("10.96.0.10")).unwrap();
    assert_eq!(web.target_port(80), Some(8080), "named target port resolved via the selected pod");
    assert_eq!(authorize(&from_kube, "cluster.local/ns/demo/sa/curl", "10.10.1.4", 8080), Decision::Allow);
    assert!(matches!(
        authorize(&from_kube, "cluster.local/ns/demo/sa/other", "10.10.1.4", 8080),
        Decision::Deny { .. }
    ));
}

const SLICES: &str = r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8081}, {name: raw, port: 9091}]
endpoints:
- {addresses: [10.10.1.2], conditions: {ready: true}}
- {addresses: [10.10.1.4], conditions: {ready: false}}
- {addresses: [10.99.9.9]}
"#;

#[test]
fn endpoint_slices_win_over_the_selector() {
    let state = Builder::new(opts()).build_from(&inputs(&format!("{MESH}{SLICES}")));
    let web = state.service_by_vip(ip("10.96.0.10")).unwrap();
    let names: Vec<&str> = web.endpoints.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["client"], "ready endpoints of the slice that are known pods, not the selector's");
    assert_eq!((web.target_port(80), web.target_port(90)), (Some(8081), Some(9091)));
}

const BAD: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: demo}
spec: {rules: [{from: [{source: {principal: [x]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-cidr, namespace: demo}
spec: {action: DENY, rules: [{from: [{source: {ipBlocks: [10.0.0.0/99]}}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: demo}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: demo}
spec: {nodeName: node-a, hostNetwork: true, containers: [{name: c, image: x}]}
status: {podIP: 192.168.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: demo}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {phase: Succeeded, podIP: 10.10.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: zz-clash, namespace: demo}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.10.1.4}
"#;

#[test]
fn bad_objects_are_left_out_and_the_rest_applies() {
    let mut builder = Builder::new(opts());
    let state = builder.build_from(&inputs(&format!("{MESH}{BAD}")));
    assert_eq!(state.policies.authorization_policy_count(), 1, "only the valid policy is enforced");
    assert_eq!(authorize(&state, "cluster.local/ns/demo/sa/curl", "10.10.1.4", 8080), Decision::Allow);
    assert!(state.workload_by_ip(ip("192.168.0.1")).is_none(), "host-network pods are not workloads");
    assert_eq!(state.workload_by_ip(ip("10.10.1.2")).unwrap().name, "client", "finished pods do not claim IPs");
    assert_eq!(
        state.workload_by_ip(ip("10.10.1.4")).unwrap().name,
        "web-1",
        "the first pod by name keeps a clashing IP"
    );
    assert!(state.workloads_by_ip.values().all(|w| w.name != "pending"));
    let mut problems: Vec<&String> = builder.problems().iter().collect();
    problems.sort();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[0].starts_with("AuthorizationPolicy demo/bad-cidr: spec.rules[0].from[0].source.ipBlocks[0]: "),
        "{}",
        problems[0]
    );
    assert!(problems[1].starts_with("AuthorizationPolicy demo/typo: spec.rules[0].from[0].source"), "{}", problems[1]);
    assert!(problems[1].contains("principal"), "{}", problems[1]);
    assert!(
        problems[2].starts_with("Pod demo/zz-clash: status.podIP: 10.10.1.4 is already the IP of Pod demo/web-1"),
        "{}",
        problems[2]
    );
}

const ROUTING: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo, resourceVersion: "7", generation: 3}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web, subset: v1}, weight: 80}, {destination: {host: web, subset: v2}, weight: 20}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: typo, namespace: demo}
spec: {hosts: [web], http: [{route: [{destination: {host: web}, wieght: 1}]}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec: {host: web, subsets: [{name: v1, labels: {version: v1}}]}
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: rl, namespace: demo}
spec: {configPatches: [{applyTo: HTTP_FILTER, patch: {operation: ADD, value: {name: envoy.filters.http.local_ratelimit}}}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec: {gatewayClassName: weft-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: demo, generation: 2}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 80, weight: ten}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-ok, namespace: demo, generation: 2}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{matches: [{path: {type: PathPrefix, value: /api}}], backendRefs: [{name: web, port: 80}]}]
status:
  parents: []
"#;

#[test]
fn routing_resources_fill_the_routing_config_and_bad_ones_are_left_out() {
    let mut builder = Builder::new(opts());
    let state = builder.build_from(&inputs(&format!("{MESH}{ROUTING}")));
    let r = &state.routing;
    assert_eq!(r.authorization_policies.len(), 1, "every AuthorizationPolicy is kept for waypoints");
    assert_eq!(r.virtual_services.len(), 1);
    assert_eq!(r.virtual_services[0].metadata.generation, Some(3), "generation kept for route status");
    assert_eq!(r.virtual_services[0].spec.http[0].route[1].weight, Some(20));
    assert_eq!(r.destination_rules[0].spec.subsets[0].name, "v1");
    assert_eq!(r.envoy_filters.len(), 1);
    assert_eq!(r.gateways[0].spec.listeners[0].port, 15008);
    assert_eq!(r.http_routes.len(), 1);
    assert_eq!(r.http_routes[0].metadata.name.as_deref(), Some("web-ok"));
    assert!(r.http_routes[0].status.is_none(), "status is not kept");
    let mut problems: Vec<&String> = builder.problems().iter().collect();
    problems.sort();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].starts_with("HTTPRoute demo/web: spec.rules[0].backendRefs[0].weight: invalid type"),
        "{}",
        problems[0]
    );
    assert!(
        problems[1].starts_with("VirtualService demo/typo: spec.http[0].route[0].wieght: unknown field"),
        "{}",
        problems[1]
    );
}

#[test]
fn same_routing_objects_give_the_file_sources_routing_config() {
    let yaml = format!("{MESH}{ROUTING}").replace("wieght: 1", "weight: 1").replace("weight: ten", "weight: 10");
    let file_opts = FileOptions {
        trust_domain: "cluster.local".into(),
        node_name: "node-a".into(),
        root_namespace: "istio-system".into(),
    };
    let from_file = file::parse(&yaml, "mesh.yaml", &file_opts).expect("the file source accepts the objects");
    let mut builder = Builder::new(opts());
    let from_kube = builder.build_from(&inputs(&yaml));
    assert!(builder.problems().is_empty(), "{:?}", builder.problems());
    // Kind, namespace/name and spec of every object, in name order.
    let specs = |s: &State| {
        let r = &s.routing;
        let mut all: Vec<(String, serde_json::Value)> = Vec::new();
        let mut add = |kind: &str, v: serde_json::Value| {
            all.push((format!("{kind} {}/{}", v["metadata"]["namespace"], v["metadata"]["name"]), v["spec"].clone()));
        };
        r.virtual_services.iter().for_each(|o| add("VirtualService", serde_json::to_value(o).unwrap()));
        r.destination_rules.iter().for_each(|o| add("DestinationRule", serde_json::to_value(o).unwrap()));
        r.envoy_filters.iter().for_each(|o| add("EnvoyFilter", serde_json::to_value(o).unwrap()));
        r.gateways.iter().for_each(|o| add("Gateway", serde_json::to_value(o).unwrap()));
        r.http_routes.iter().for_each(|o| add("HTTPRoute", serde_json::to_value(o).unwrap()));
        r.authorization_policies.iter().for_each(|o| add("AuthorizationPolicy", serde_json::to_value(o).unwrap()));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    };
    let (f, k) = (specs(&from_file), specs(&from_kube));
    assert_eq!(f.len(), 8, "{f:#?}");
    assert_eq!(f, k);
}

/// The CNI registry's answers, for the merge test.
struct Known(Vec<(&'static str, &'static str, &'static str, &'static str)>);

impl crate::state::LocalPodAddresses for Known {
    fn pod_ips(&self, namespace: &str, name: &str, uid: &str) -> Option<Vec<IpAddr>> {
        self.0
            .iter()
            .find(|(ns, n, u, _)| *ns == namespace && *n == name && (uid.is_empty() || *u == uid))
            .map(|(.., ip)| vec![ip.parse().unwrap()])
    }
}

const IPLESS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: fresh, namespace: mesh, uid: 11111111-1111-1111-1111-111111111111}
spec: {nodeName: node-a, containers: [{name: app}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: reported, namespace: mesh, uid: 22222222-2222-2222-2222-222222222222}
spec: {nodeName: node-a, containers: [{name: app}]}
status: {phase: Running, podIP: 10.244.0.20, podIPs: [{ip: 10.244.0.20}]}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: mesh, uid: 33333333-3333-3333-3333-333333333333}
spec: {nodeName: node-b, containers: [{name: app}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: recreated, namespace: mesh, uid: 44444444-4444-4444-4444-444444444444}
spec: {nodeName: node-a, containers: [{name: app}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: mesh, uid: 55555555-5555-5555-5555-555555555555, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node-a, containers: [{name: app}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: plain, uid: 66666666-6666-6666-6666-666666666666}
spec: {nodeName: node-a, containers: [{name: app}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: mesh, uid: 77777777-7777-7777-7777-777777777777}
spec: {nodeName: node-a, hostNetwork: true, containers: [{name: app}]}
status: {phase: Pending}
"#;

#[test]
fn pods_without_an_api_ip_take_the_cni_ips_of_this_node() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let mut i = inputs(IPLESS);
    i.local_addresses = Some(Arc::new(Known(vec![
        ("mesh", "fresh", "11111111-1111-1111-1111-111111111111", "10.244.0.10"),
        // The API's address wins over the CNI's.
        ("mesh", "reported", "22222222-2222-2222-2222-222222222222", "10.244.0.99"),
        ("mesh", "elsewhere", "33333333-3333-3333-3333-333333333333", "10.244.0.11"),
        // The registry holds the previous pod of that name.
        ("mesh", "recreated", "00000000-0000-0000-0000-000000000000", "10.244.0.12"),
        ("mesh", "opted-out", "55555555-5555-5555-5555-555555555555", "10.244.0.13"),
        ("plain", "outside", "66666666-6666-6666-6666-666666666666", "10.244.0.14"),
        ("mesh", "host", "77777777-7777-7777-7777-777777777777", "10.244.0.15"),
    ])));
    let state = Builder::new(opts()).build_from(&i);

    let fresh = state.workload_by_ip(ip("10.244.0.10")).expect("the CNI IP puts the pod in the snapshot");
    assert_eq!((fresh.name.as_str(), fresh.captured), ("fresh", true));
    assert_eq!(fresh.uid.as_deref(), Some("11111111-1111-1111-1111-111111111111"));
    assert_eq!(fresh.ips, vec![ip("10.244.0.10")]);
    assert_eq!(state.workload_by_ip(ip("10.244.0.20")).map(|w| w.name.as_str()), Some("reported"));
    assert!(state.workload_by_ip(ip("10.244.0.99")).is_none(), "the API's IPs win once it has some");
    assert!(state.workload_by_ip(ip("10.244.0.11")).is_none(), "another node's pod is not this registry's");
    assert!(state.workload_by_ip(ip("10.244.0.12")).is_none(), "another uid: another pod's IPs");
    assert!(state.workload_by_ip(ip("10.244.0.15")).is_none(), "hostNetwork pods are never captured");
    let local: Vec<String> = state.local_captured("node-a").iter().map(|w| w.name.clone()).collect();
    assert_eq!(local, ["fresh", "reported"]);
    // Decided promptly, so their CNI ADDs return at once without enrolling them.
    assert!(state.known_not_captured("mesh", "opted-out"));
    assert!(state.known_not_captured("plain", "outside"));
    assert!(!state.known_not_captured("mesh", "fresh"));

    // Without the registry, as before: IP-less pods are not in the snapshot.
    i.local_addresses = None;
    let state = Builder::new(opts()).build_from(&i);
    assert!(state.workload_by_ip(ip("10.244.0.10")).is_none());
}

#[test]
fn a_rebuild_reuses_unchanged_workloads_and_redoes_those_whose_namespace_changed() {
    let mut builder = Builder::new(opts());
    let mut inputs = inputs(MESH);
    let first = builder.build_from(&inputs);
    let second = builder.build_from(&inputs);
    for (ip, w) in &first.workloads_by_ip {
        assert!(Arc::ptr_eq(w, &second.workloads_by_ip[ip]), "{ip}: unchanged pod, same workload");
    }
    let outside = ip("10.10.2.2");
    assert!(!second.workloads_by_ip[&outside].captured);

    // The plain namespace joins the mesh: its pod is rebuilt (captured), the others are kept.
    inputs
        .namespaces
        .insert("plain".into(), BTreeMap::from([("istio.io/dataplane-mode".to_string(), "ambient".to_string())]));
    let third = builder.build_from(&inputs);
    assert!(third.workloads_by_ip[&outside].captured, "namespace labels changed: workload rebuilt");
    let client = ip("10.10.1.2");
    assert!(Arc::ptr_eq(&second.workloads_by_ip[&client], &third.workloads_by_ip[&client]));

    // A changed pod object (a new Arc from the reflector) is rebuilt.
    let i = inputs.pods.iter().position(|p| &*p.name == "client").unwrap();
    let mut changed = (*inputs.pods[i]).clone();
    Arc::make_mut(&mut changed.labels).insert("version".into(), "v2".into());
    inputs.pods[i] = Arc::new(changed);
    let fourth = builder.build_from(&inputs);
    assert_eq!(fourth.workloads_by_ip[&client].labels.get("version").map(String::as_str), Some("v2"));
    let fresh = Builder::new(opts()).build_from(&inputs);
    let sorted = |s: &State| s.workloads_by_ip.iter().map(|(ip, w)| (*ip, (**w).clone())).collect::<BTreeMap<_, _>>();
    assert_eq!(sorted(&fourth), sorted(&fresh), "a cached build equals a fresh one");
}
