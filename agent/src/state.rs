//! The mesh as this node sees it: workloads, services and compiled policies, in one immutable
//! snapshot (`State`) that a source (`discovery::file`, later `discovery::kube`) builds and the
//! data plane reads without locks through `StateStore`.
//!
//! It owns lookups (by IP, by service VIP) and which workloads this node captures. It does not
//! parse YAML or talk to Kubernetes (that is `discovery`), and it does not decide policy (that
//! is `policy`; the snapshot only carries the compiled policies).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::policy::Policies;

/// Namespace label that enrolls a namespace in the mesh (value `ambient`), and the pod label
/// that opts a single pod out (value `none`). Same names as Istio ambient.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Service or namespace label naming the waypoint (a Gateway, reached through the Service of the same
/// name) that traffic to it goes through; `none` on a service opts it out of its namespace's waypoint.
/// `istio.io/use-waypoint-namespace` names the waypoint's namespace when it is not the service's own.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";

/// A pod, reduced to what the data plane needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Shared: the pods of one ReplicaSet carry the same labels, and the cluster source keeps one
    /// copy of each distinct set.
    pub labels: Arc<BTreeMap<String, String>>,
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`; `None` in local mode means "this node".
    pub node: Option<String>,
    /// `metadata.uid` (cluster mode): what kubelet names the pod's cgroup after, so a running pod's
    /// network namespace can be found without a CNI ADD. `None` from the file source.
    pub uid: Option<String>,
    /// Network namespace of the pod on this node, when known (local mode: from the pod's
    /// `weft.io/netns` annotation; cluster mode: found by the CNI plugin).
    pub netns: Option<PathBuf>,
    /// In the mesh: namespace labelled ambient and the pod not opted out.
    pub captured: bool,
    /// SPIFFE identity, derived from trust domain, namespace and service account.
    pub identity: Identity,
    /// The `app` / `app.kubernetes.io/name` label or the pod name: Istio's canonical workload name.
    pub workload_name: String,
}

/// A Kubernetes Service with its endpoints resolved to workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Cluster IPs (IPv4 and/or IPv6).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `metadata.labels` (e.g. `istio.io/use-waypoint`).
    pub labels: BTreeMap<String, String>,
    /// Ready endpoints in a stable order (name order), for load balancing.
    pub endpoints: Vec<Arc<Workload>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// Numeric target port (named target ports are resolved when the snapshot is built).
    pub target_port: u16,
    /// `appProtocol` (e.g. `http2`, `grpc`, `kubernetes.io/h2c`), which tells a waypoint how to speak
    /// to the endpoints; Istio also infers it from a port name prefix (`grpc-`, `http2-`).
    pub app_protocol: Option<String>,
}

impl Service {
    /// `name.namespace.svc.cluster.local`, Istio's `destination_service` label value.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports.iter().find(|p| p.port == port).map(|p| p.target_port)
    }
}

/// One immutable snapshot of everything the data plane reads.
#[derive(Debug, Default)]
pub struct State {
    pub workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    pub services_by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Namespace name → labels (only namespaces that were declared).
    pub namespaces: HashMap<String, BTreeMap<String, String>>,
    pub policies: Policies,
    /// Traffic-management and L7 resources as the source read them (shape-checked only); a waypoint
    /// compiles what concerns it, node agents only look at `use-waypoint` labels.
    pub routing: Arc<RoutingConfig>,
}

/// The resources only a waypoint interprets, kept as objects: each waypoint compiles its own view
/// and reports the objects it cannot use, while the rest keeps working.
#[derive(Debug, Default, Clone)]
pub struct RoutingConfig {
    /// Every AuthorizationPolicy (the L4 ones are compiled into `State::policies` as well); a
    /// waypoint applies those whose `targetRef(s)` name it or a service it serves.
    pub authorization_policies: Vec<crate::crd::AuthorizationPolicy>,
    /// `networking.istio.io` VirtualServices, every namespace.
    pub virtual_services: Vec<crate::crd::VirtualService>,
    pub destination_rules: Vec<crate::crd::DestinationRule>,
    /// Only the patches a waypoint recognises (local rate limit) have an effect.
    pub envoy_filters: Vec<crate::crd::EnvoyFilter>,
    /// `gateway.networking.k8s.io` Gateways (waypoints are those of class `weft-waypoint`/`istio-waypoint`).
    pub gateways: Vec<crate::crd::Gateway>,
    pub http_routes: Vec<crate::crd::HTTPRoute>,
}

impl State {
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip.get(&ip)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services_by_vip.get(&ip)
    }

    /// The Service `namespace/name` (services with a cluster IP; headless ones are not load-balanced).
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.services_by_vip.values().find(|s| s.name == name && s.namespace == namespace)
    }

    /// The waypoint Service that traffic to `svc` must go through: the service's own
    /// `istio.io/use-waypoint` label, else its namespace's (`none` on the service opts out), naming a
    /// Service in `istio.io/use-waypoint-namespace` (default: the labelled object's namespace).
    /// `None` when there is no waypoint, or it names a Service that does not exist (logged by the
    /// caller as an unreachable waypoint would be), or `svc` is the waypoint itself.
    pub fn waypoint_of(&self, svc: &Service) -> Option<&Arc<Service>> {
        let ns_labels = self.namespaces.get(&svc.namespace);
        let (labels, owner_ns) = if svc.labels.contains_key(USE_WAYPOINT_LABEL) {
            (&svc.labels, &svc.namespace)
        } else {
            (ns_labels.filter(|l| l.contains_key(USE_WAYPOINT_LABEL))?, &svc.namespace)
        };
        let name = labels.get(USE_WAYPOINT_LABEL)?;
        if name == DATAPLANE_MODE_NONE {
            return None;
        }
        let namespace = labels.get(USE_WAYPOINT_NAMESPACE_LABEL).unwrap_or(owner_ns);
        if *name == svc.name && *namespace == svc.namespace {
            return None;
        }
        self.service(namespace, name)
    }

    /// Captured workloads that run on `node` (or have no node: local mode): what the redirect
    /// and the in-pod listeners must serve here once their network namespace is known. Each
    /// workload once, in name order.
    pub fn local_captured(&self, node: &str) -> Vec<Arc<Workload>> {
        let mut seen: BTreeMap<(String, String), Arc<Workload>> = BTreeMap::new();
        for w in self.workloads_by_ip.values() {
            let local = w.node.as_deref().is_none_or(|n| n == node);
            if w.captured && local {
                seen.entry((w.namespace.clone(), w.name.clone())).or_insert_with(|| w.clone());
            }
        }
        seen.into_values().collect()
    }
}

impl State {
    /// Whether `namespace/name` is known and definitely not in the mesh: a known pod that is not
    /// captured, or an unknown pod in a known namespace that is not enrolled. Unknown pods in
    /// unknown or ambient namespaces are undecided (the API may simply not have shown them yet).
    pub fn known_not_captured(&self, namespace: &str, name: &str) -> bool {
        if let Some(w) = self.workloads_by_ip.values().find(|w| w.namespace == namespace && w.name == name) {
            return !w.captured;
        }
        self.namespaces
            .get(namespace)
            .is_some_and(|labels| labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) != Some(DATAPLANE_MODE_AMBIENT))
    }
}

/// Addresses of this node's pods known before the API server shows them: the CNI ADD runs after
/// the primary plugin assigned the pod's IPs but before kubelet reports `status.podIPs`, and the
/// pod must be enrolled (so in the snapshot) before the ADD returns. Implemented by the CNI
/// registry, read by the cluster source; defined here so neither depends on the other.
pub trait LocalPodAddresses: Send + Sync {
    /// The IPs known for pod `namespace/name` whose `metadata.uid` is `uid`; `None` when unknown,
    /// or known for another pod of that name (a different non-empty uid).
    fn pod_ips(&self, namespace: &str, name: &str, uid: &str) -> Option<Vec<IpAddr>>;
}

/// The current snapshot plus a change signal. Readers call `load()` per connection (a wait-free
/// atomic load); writers `replace()` the whole snapshot.
#[derive(Debug)]
pub struct StateStore {
    current: ArcSwap<State>,
    version: watch::Sender<u64>,
}

impl StateStore {
    pub fn new(initial: State) -> Self {
        StateStore { current: ArcSwap::from_pointee(initial), version: watch::channel(0).0 }
    }

    pub fn load(&self) -> Arc<State> {
        self.current.load_full()
    }

    pub fn replace(&self, next: State) {
        self.current.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
    }

    /// Resolves each time the snapshot is replaced.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, name: &str, ip: &str) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: ns.into(),
            service_account: name.into(),
            labels: Default::default(),
            ips: vec![ip.parse().unwrap()],
            node: None,
            uid: None,
            netns: None,
            captured: true,
            identity: Identity::new("cluster.local", ns, name),
            workload_name: name.into(),
        })
    }

    fn service(
        ns: &str,
        name: &str,
        vip: &str,
        labels: &[(&str, &str)],
        endpoints: Vec<Arc<Workload>>,
    ) -> Arc<Service> {
        Arc::new(Service {
            name: name.into(),
            namespace: ns.into(),
            vips: vec![vip.parse().unwrap()],
            ports: vec![ServicePort { name: None, port: 80, target_port: 8080, app_protocol: None }],
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            endpoints,
        })
    }

    fn state(services: Vec<Arc<Service>>, ns_labels: &[(&str, &[(&str, &str)])]) -> State {
        State {
            services_by_vip: services.into_iter().map(|s| (s.vips[0], s)).collect(),
            namespaces: ns_labels
                .iter()
                .map(|(ns, l)| (ns.to_string(), l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()))
                .collect(),
            ..State::default()
        }
    }

    #[test]
    fn waypoint_from_service_or_namespace_label() {
        let wp = service("demo", "waypoint", "10.96.0.100", &[], vec![workload("demo", "waypoint-0", "10.0.0.100")]);
        let other_wp = service("infra", "shared", "10.96.0.101", &[], vec![]);
        let labelled = service("demo", "reviews", "10.96.0.1", &[(USE_WAYPOINT_LABEL, "waypoint")], vec![]);
        let by_ns = service("demo", "ratings", "10.96.0.2", &[], vec![]);
        let opted_out = service("demo", "details", "10.96.0.3", &[(USE_WAYPOINT_LABEL, "none")], vec![]);
        let cross_ns = service(
            "demo",
            "products",
            "10.96.0.4",
            &[(USE_WAYPOINT_LABEL, "shared"), (USE_WAYPOINT_NAMESPACE_LABEL, "infra")],
            vec![],
        );
        let missing = service("other", "x", "10.96.0.5", &[(USE_WAYPOINT_LABEL, "nope")], vec![]);
        let s = state(
            vec![
                wp.clone(),
                other_wp.clone(),
                labelled.clone(),
                by_ns.clone(),
                opted_out.clone(),
                cross_ns.clone(),
                missing.clone(),
            ],
            &[("demo", &[(USE_WAYPOINT_LABEL, "waypoint")]), ("other", &[])],
        );
        assert_eq!(s.waypoint_of(&labelled).map(|w| w.name.as_str()), Some("waypoint"));
        assert_eq!(s.waypoint_of(&by_ns).map(|w| w.name.as_str()), Some("waypoint"));
        assert!(s.waypoint_of(&opted_out).is_none(), "`none` on the service opts out of the namespace's waypoint");
        assert_eq!(
            s.waypoint_of(&cross_ns).map(|w| (w.namespace.as_str(), w.name.as_str())),
            Some(("infra", "shared"))
        );
        assert!(s.waypoint_of(&missing).is_none(), "a waypoint Service that does not exist is no waypoint");
        assert!(s.waypoint_of(&wp).is_none(), "the waypoint's own service does not loop to itself");
        assert_eq!(s.service("demo", "reviews").map(|x| x.vips[0]), Some("10.96.0.1".parse().unwrap()));
    }
}
