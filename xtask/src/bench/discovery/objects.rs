//! The synthetic cluster of `bench discovery`: namespaces, ServiceAccounts, Pods, Services, their
//! `discovery.k8s.io/v1` EndpointSlices and a few Istio security policies, shaped as a real
//! cluster's objects are (a Deployment's pods with owner references, projected token volumes,
//! probes, env, resources and full status; services with `last-applied-configuration`;
//! controller-written slices with target references), so what the agent trims away costs what it
//! would on a real cluster. The API double adds `managedFields`, uids and resourceVersions itself,
//! as the API server does.
//!
//! Owns the shape and the numbers (which pods are on which node, IPs, which service selects
//! which pods); loading them into the double is [`load`]. It does not own the two real
//! network-namespace pods of the bench (their objects come from `weft_tests::cluster`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_tests::apiserver::ApiServer;

/// Istio's label putting a namespace (or opting a pod out) in ambient mode.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// How big the synthetic cluster is. `pods` and `local_pods` count what the caller adds itself
/// (`reserved_pods`, all on this node): the generator makes the rest.
#[derive(Debug, Clone)]
pub struct Scale {
    pub pods: usize,
    pub services: usize,
    pub local_pods: usize,
    pub namespaces: usize,
    pub nodes: usize,
    /// Pods (all on this node) the caller puts itself.
    pub reserved_pods: usize,
}

/// What [`load`] put, for the report.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    pub namespaces: usize,
    pub pods: usize,
    pub local_pods: usize,
    pub services: usize,
    pub slices: usize,
    pub policies: usize,
    /// Bytes of JSON the pods serialise to (as the API serves them, without managedFields).
    pub pod_bytes: usize,
}

const APPS: [&str; 16] = [
    "reviews",
    "ratings",
    "details",
    "productpage",
    "cart",
    "checkout",
    "payments",
    "shipping",
    "catalog",
    "search",
    "users",
    "auth",
    "orders",
    "inventory",
    "notifications",
    "frontend",
];
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const HTTP_PORT: u16 = 9080;
const GRPC_PORT: u16 = 9090;
const METRICS_PORT: u16 = 15090;

pub fn namespace_name(i: usize) -> String {
    format!("team-{i:02}")
}

/// One in ten namespaces is left out of the mesh (no label), as a partly adopted cluster has.
pub fn namespace_ambient(i: usize) -> bool {
    i % 10 != 9
}

/// Node `i` of the other nodes (this bench's node is not one of them).
fn node_name(i: usize) -> String {
    format!("worker-{i:03}")
}

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Pod IPs from 10.192.0.0/10 (the topology's own pods live in 10.244.x.0/24).
fn pod_ip(i: usize) -> Ipv4Addr {
    let block = i / 250;
    Ipv4Addr::new(10, 192 + (block / 250) as u8, (block % 250) as u8, (i % 250 + 1) as u8)
}

/// Service VIPs from 10.100.0.0/16 (the double allocates from 10.96.0.0/16).
fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// A deterministic lowercase alphanumeric string (pod-template hashes, pod suffixes, ids).
fn token(seed: usize, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            x ^= x >> 33;
            x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
            x ^= x >> 29;
            ALPHABET[(x % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

fn hex(seed: usize, len: usize) -> String {
    let mut x = (seed as u64).wrapping_add(0x2545_F491_4F6C_DD1D);
    let mut s = String::with_capacity(len);
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    s.truncate(len);
    s
}

/// App `a`: its name, namespace index and ServiceAccount.
struct App {
    name: String,
    ns: usize,
}

fn app(a: usize, namespaces: usize) -> App {
    App { name: format!("{}-{a}", APPS[a % APPS.len()]), ns: a % namespaces }
}

/// One application pod of a Deployment, as the API server returns it after the scheduler,
/// kubelet and admission have been at it.
fn app_pod(i: usize, a: &App, version: usize, node: &str, node_ip: Ipv4Addr, phase: &str) -> Value {
    let ns = namespace_name(a.ns);
    let hash = token(a.ns * 1000 + version, 10);
    let rs = format!("{}-v{version}-{hash}", a.name);
    let name = format!("{rs}-{}", token(i, 5));
    let ip = pod_ip(i).to_string();
    let image = format!("registry.example.com/{ns}/{}:1.{version}.{}", a.name, i % 7);
    let volume = format!("kube-api-access-{}", token(i + 77, 5));
    let started = "2026-11-20T08:15:42Z";
    let condition =
        |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": started});
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "generateName": format!("{rs}-"),
            "labels": {
                "app": a.name, "version": format!("v{version}"), "pod-template-hash": hash,
                "app.kubernetes.io/name": a.name, "app.kubernetes.io/part-of": "shop",
                "service.istio.io/canonical-name": a.name, "service.istio.io/canonical-revision": format!("v{version}"),
            },
            "annotations": {
                "kubectl.kubernetes.io/default-container": "app",
                "kubectl.kubernetes.io/restartedAt": "2026-11-19T17:02:11Z",
                "prometheus.io/scrape": "true", "prometheus.io/port": METRICS_PORT.to_string(), "prometheus.io/path": "/stats/prometheus",
                "ambient.istio.io/redirection": "enabled",
                "cluster-autoscaler.kubernetes.io/safe-to-evict": "true",
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                "uid": format!("{}-{}-4{}-8{}-{}", hex(i, 8), hex(i + 1, 4), hex(i + 2, 3), hex(i + 3, 3), hex(i + 4, 12)),
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "nodeName": node, "serviceAccountName": a.name, "serviceAccount": a.name,
            "containers": [{
                "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
                "args": ["--port", HTTP_PORT.to_string(), "--grpc-port", GRPC_PORT.to_string(), "--log-level", "info"],
                "ports": [
                    {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                    {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                    {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                ],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
                    {"name": "SERVICE_VERSION", "value": format!("v{version}")},
                    {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.observability:4317"},
                    {"name": "GOMAXPROCS", "valueFrom": {"resourceFieldRef": {"containerName": "app", "resource": "limits.cpu", "divisor": "0"}}},
                ],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": HTTP_PORT, "scheme": "HTTP"},
                                   "initialDelaySeconds": 2, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "livenessProbe": {"httpGet": {"path": "/healthz/live", "port": HTTP_PORT, "scheme": "HTTP"},
                                  "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": volume, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true},
                ],
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
            }],
            "volumes": [
                {"name": "tmp", "emptyDir": {}},
                {"name": volume, "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                ]}},
            ],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "securityContext": {"fsGroup": 2000, "seccompProfile": {"type": "RuntimeDefault"}},
            "schedulerName": "default-scheduler", "priority": 0, "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ],
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app": a.name}}}],
        },
        "status": {
            "phase": phase,
            "conditions": [condition("PodReadyToStartContainers"), condition("Initialized"), condition("Ready"),
                           condition("ContainersReady"), condition("PodScheduled")],
            "hostIP": node_ip.to_string(), "hostIPs": [{"ip": node_ip.to_string()}],
            "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": started, "qosClass": "Burstable",
            "containerStatuses": [{
                "name": "app", "state": {"running": {"startedAt": started}}, "lastState": {},
                "ready": phase == "Running", "restartCount": i % 3, "started": phase == "Running", "image": image,
                "imageID": format!("registry.example.com/{ns}/{}@sha256:{}", a.name, hex(a.ns * 31 + version, 64)),
                "containerID": format!("containerd://{}", hex(i * 7 + 1, 64)),
            }],
        },
    })
}

/// kube-proxy of node `node`: on the host network (the node's IP is its IP).
fn host_network_pod(node: &str, node_ip: Ipv4Addr) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("kube-proxy-{node}"), "namespace": "kube-system",
                     "labels": {"k8s-app": "kube-proxy", "controller-revision-hash": "5d4f8c7b9"}},
        "spec": {"nodeName": node, "hostNetwork": true, "serviceAccountName": "kube-proxy", "priorityClassName": "system-node-critical",
                 "containers": [{"name": "kube-proxy", "image": "registry.k8s.io/kube-proxy:v1.36.0",
                                 "command": ["/usr/local/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf"],
                                 "securityContext": {"privileged": true}}]},
        "status": {"phase": "Running", "hostIP": node_ip.to_string(), "podIP": node_ip.to_string(),
                   "podIPs": [{"ip": node_ip.to_string()}]},
    })
}

fn service(s: usize, a: &App) -> Value {
    let ns = namespace_name(a.ns);
    let ip = service_ip(s).to_string();
    let ports = json!([
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
        {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT, "protocol": "TCP", "appProtocol": "grpc"},
    ]);
    let applied = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": a.name, "namespace": ns, "labels": {"app": a.name}},
        "spec": {"selector": {"app": a.name}, "ports": ports},
    });
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": a.name, "namespace": ns, "labels": {"app": a.name, "app.kubernetes.io/part-of": "shop"},
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{applied}\n")}},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
                 "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
                 "selector": {"app": a.name}, "ports": ports},
        "status": {"loadBalancer": {}},
    })
}

/// The EndpointSlice controller's slice for service `a` over `endpoints` (pod name, uid, IP, node).
fn endpoint_slice(a: &App, s: usize, endpoints: &[(String, String, Ipv4Addr, String)]) -> Value {
    let ns = namespace_name(a.ns);
    let eps: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(k, (pod, uid, ip, node))| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": node, "zone": ZONES[k % ZONES.len()],
                "targetRef": {"kind": "Pod", "namespace": ns, "name": pod, "uid": uid},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-{}", a.name, token(s + 5000, 5)), "namespace": ns, "generateName": format!("{}-", a.name),
            "labels": {"kubernetes.io/service-name": a.name, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                       "app": a.name},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-20T08:15:44Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": a.name,
                                 "uid": format!("{}-{}-4{}-8{}-{}", hex(s, 8), hex(s + 1, 4), hex(s + 2, 3), hex(s + 3, 3), hex(s + 4, 12)),
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [
            {"name": "http", "port": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "port": GRPC_PORT, "protocol": "TCP", "appProtocol": "grpc"},
        ],
    })
}

/// Every fifth namespace: one L4 ALLOW policy on its first app, from its own namespace and the
/// frontend's; every tenth: namespace-wide STRICT mTLS.
fn policies(namespaces: usize, services: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for n in 0..namespaces {
        let ns = namespace_name(n);
        if n % 5 == 0 && n < services {
            let a = app(n, namespaces);
            out.push(json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": format!("{}-allow", a.name), "namespace": ns},
                "spec": {"selector": {"matchLabels": {"app": a.name}}, "action": "ALLOW",
                         "rules": [{"from": [{"source": {"namespaces": [ns.clone(), namespace_name(0)]}}],
                                    "to": [{"operation": {"ports": [HTTP_PORT.to_string(), GRPC_PORT.to_string()]}}]}]},
            }));
        }
        if n % 10 == 3 {
            out.push(json!({
                "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"name": "default", "namespace": ns},
                "spec": {"mtls": {"mode": "STRICT"}},
            }));
        }
    }
    out
}

/// Puts the synthetic cluster into `api` for a bench whose node is `this_node`.
pub fn load(api: &ApiServer, scale: &Scale, this_node: &str) -> Result<Loaded> {
    ensure!(scale.namespaces >= 1 && scale.nodes >= 2, "need at least 1 namespace and 2 nodes");
    ensure!(scale.services >= 1, "need at least 1 service");
    ensure!(
        scale.local_pods > scale.reserved_pods && scale.pods >= scale.local_pods + scale.nodes,
        "--local-pods must exceed the {} real pods, and --pods must cover --local-pods plus one kube-proxy per node",
        scale.reserved_pods
    );
    let mut loaded = Loaded::default();
    let put = |obj: Value| api.put(obj).map_err(|e| anyhow::anyhow!("{e}"));
    for n in 0..scale.namespaces {
        let mut labels = BTreeMap::from([("team".to_string(), format!("t{n}"))]);
        if namespace_ambient(n) {
            labels.insert(DATAPLANE_MODE.into(), "ambient".into());
        }
        put(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace_name(n), "labels": labels}}),
        )?;
        loaded.namespaces += 1;
    }
    for a in 0..scale.services {
        let a = app(a, scale.namespaces);
        put(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": a.name, "namespace": namespace_name(a.ns)}}))?;
    }

    // Node 0 is this bench's node; 1.. are the others.
    let nodes: Vec<(String, Ipv4Addr)> = (0..scale.nodes)
        .map(|k| if k == 0 { (this_node.to_owned(), node_ip(0)) } else { (node_name(k), node_ip(k)) })
        .collect();
    for (node, ip) in &nodes {
        let p = host_network_pod(node, *ip);
        loaded.pod_bytes += p.to_string().len();
        put(p)?;
        loaded.pods += 1;
    }
    loaded.local_pods = 1 + scale.reserved_pods;
    let app_pods = scale.pods - scale.nodes - scale.reserved_pods;
    let local_app_pods = scale.local_pods - 1 - scale.reserved_pods;
    // Local pods spread evenly over the app pods (so over apps and namespaces).
    let stride = app_pods as f64 / local_app_pods.max(1) as f64;
    let mut members: Vec<Vec<(String, String, Ipv4Addr, String)>> = vec![Vec::new(); scale.services];
    let mut next_local = 0usize;
    for i in 0..app_pods {
        let a_idx = i % scale.services;
        let a = app(a_idx, scale.namespaces);
        let version = 1 + (i / scale.services) % 3;
        let local = next_local < local_app_pods && i >= (next_local as f64 * stride) as usize;
        let (node, node_ip) = if local {
            next_local += 1;
            nodes[0].clone()
        } else {
            nodes[1 + i % (scale.nodes - 1)].clone()
        };
        // One in a hundred: a finished Job-like pod that kept its IP in status.
        let phase = if i % 100 == 99 { "Succeeded" } else { "Running" };
        let pod = app_pod(i, &a, version, &node, node_ip, phase);
        loaded.pod_bytes += pod.to_string().len();
        let name = pod["metadata"]["name"].as_str().context("pod name")?.to_owned();
        let stored = put(pod)?;
        let uid = stored["metadata"]["uid"].as_str().context("uid of a created pod")?.to_owned();
        if phase == "Running" {
            members[a_idx].push((name, uid, pod_ip(i), node));
        }
        loaded.pods += 1;
        if local {
            loaded.local_pods += 1;
        }
    }
    for (s, eps) in members.iter().enumerate() {
        let a = app(s, scale.namespaces);
        put(service(s, &a))?;
        put(endpoint_slice(&a, s, eps))?;
        loaded.services += 1;
        loaded.slices += 1;
    }
    for p in policies(scale.namespaces, scale.services) {
        put(p)?;
        loaded.policies += 1;
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn addresses_are_unique_and_outside_the_topology_ranges() {
        let pods: HashSet<Ipv4Addr> = (0..20_000).map(pod_ip).collect();
        assert_eq!(pods.len(), 20_000);
        assert!(pods.iter().all(|ip| ip.octets()[0] == 10 && ip.octets()[1] >= 192 && ip.octets()[1] != 244));
        let vips: HashSet<Ipv4Addr> = (0..5_000).map(service_ip).collect();
        assert_eq!(vips.len(), 5_000);
        assert!(vips.iter().all(|ip| ip.octets()[..2] == [10, 100] && ip.octets()[3] != 0));
        assert!(pods.is_disjoint(&vips));
    }

    #[test]
    fn pod_names_are_unique_per_namespace() {
        let names: HashSet<(String, String)> = (0..10_000)
            .map(|i| {
                let a = app(i % 1000, 50);
                let p = app_pod(i, &a, 1 + (i / 1000) % 3, "n", node_ip(1), "Running");
                (p["metadata"]["namespace"].as_str().unwrap().into(), p["metadata"]["name"].as_str().unwrap().into())
            })
            .collect();
        assert_eq!(names.len(), 10_000);
    }
}
