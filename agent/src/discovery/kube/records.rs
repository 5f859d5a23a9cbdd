//! Compact stores for the kinds that grow with the cluster: pods, services and EndpointSlices, each
//! kept as a small record instead of in a kube-rs reflector store. A reflector keeps every object
//! as its k8s-openapi type with a full `ObjectMeta` (a pod trimmed to the fields weft reads still
//! costs about 2 KB, a service about 3 KB); a record is a few hundred bytes. Strings most objects
//! share (namespace, node, service account, phase, service type) and whole label sets, selectors
//! and named-port lists (the same for every pod of a ReplicaSet) are stored once.
//!
//! A store follows the watcher's protocol as kube-rs's reflector does: a (re)list's objects are
//! collected aside and replace the content only when the list is complete, so a relist after a
//! `410 Gone` never shows a half-filled store.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher;

use super::build::SERVICE_NAME_LABEL;

use super::trim::KeptPod;

/// A pod as the store keeps it: what a workload is built from, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::discovery) struct PodRecord {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// `metadata.uid`: names the pod's cgroup and tells a recreated pod from its namesake.
    pub uid: Option<Box<str>>,
    pub labels: Arc<BTreeMap<String, String>>,
    pub node_name: Option<Arc<str>>,
    pub service_account_name: Option<Arc<str>>,
    /// The deprecated `spec.serviceAccount`, used when `serviceAccountName` is unset.
    pub service_account: Option<Arc<str>>,
    pub host_network: Option<bool>,
    /// Container ports that have a name (what a Service's named `targetPort` resolves against),
    /// in container order.
    pub named_ports: Arc<[NamedPort]>,
    pub phase: Option<Arc<str>>,
    pub pod_ip: Option<Box<str>>,
    pub pod_ips: Option<Box<[Box<str>]>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(in crate::discovery) struct NamedPort {
    pub name: String,
    pub container_port: i32,
    pub protocol: Option<String>,
}

impl PodRecord {
    /// The k8s-openapi Pod with the recorded fields, for the rules shared with the file source.
    /// Short-lived: only while a snapshot is built.
    pub fn to_pod(&self) -> Pod {
        let ports: Vec<ContainerPort> = self
            .named_ports
            .iter()
            .map(|p| ContainerPort {
                name: Some(p.name.clone()),
                container_port: p.container_port,
                protocol: p.protocol.clone(),
                ..ContainerPort::default()
            })
            .collect();
        let containers =
            if ports.is_empty() { Vec::new() } else { vec![Container { ports: Some(ports), ..Container::default() }] };
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.to_string()),
                namespace: Some(self.namespace.to_string()),
                uid: self.uid.as_deref().map(str::to_owned),
                labels: Some((*self.labels).clone()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: self.node_name.as_deref().map(str::to_owned),
                service_account_name: self.service_account_name.as_deref().map(str::to_owned),
                service_account: self.service_account.as_deref().map(str::to_owned),
                host_network: self.host_network,
                containers,
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: self.phase.as_deref().map(str::to_owned),
                pod_ip: self.pod_ip.as_deref().map(str::to_owned),
                pod_ips: self.pod_ips.as_ref().map(|ips| ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                ..PodStatus::default()
            }),
        }
    }

    /// `Pod ns/name`, as problems name objects.
    pub fn describe(&self) -> String {
        format!("Pod {}/{}", self.namespace, self.name)
    }
}

/// One shared copy of each distinct value. Entries nobody else holds any more are dropped from
/// time to time (after as many new values as the tables hold), so the tables follow the cluster.
#[derive(Default)]
pub(in crate::discovery) struct Interner {
    strings: HashSet<Arc<str>>,
    labels: HashSet<Arc<BTreeMap<String, String>>>,
    ports: HashSet<Arc<[NamedPort]>>,
    added: usize,
}

impl Interner {
    pub fn str(&mut self, s: String) -> Arc<str> {
        share(&mut self.strings, &mut self.added, s)
    }

    pub fn labels(&mut self, labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        share(&mut self.labels, &mut self.added, labels)
    }

    fn ports(&mut self, ports: Vec<NamedPort>) -> Arc<[NamedPort]> {
        share(&mut self.ports, &mut self.added, ports)
    }

    fn len(&self) -> usize {
        self.strings.len() + self.labels.len() + self.ports.len()
    }

    /// Drops the values only the interner still holds, once enough were added since last time.
    fn prune_if_due(&mut self) {
        if self.added < self.len().max(1024) {
            return;
        }
        self.added = 0;
        self.strings.retain(|s| Arc::strong_count(s) > 1);
        self.labels.retain(|l| Arc::strong_count(l) > 1);
        self.ports.retain(|p| Arc::strong_count(p) > 1);
        self.strings.shrink_to_fit();
        self.labels.shrink_to_fit();
        self.ports.shrink_to_fit();
    }
}

/// The copy of `value` already in `table`, or `value` itself, added (and counted in `added`).
fn share<T, V>(table: &mut HashSet<Arc<T>>, added: &mut usize, value: V) -> Arc<T>
where
    T: ?Sized + Hash + Eq,
    V: Borrow<T> + Into<Arc<T>>,
{
    if let Some(shared) = table.get(value.borrow()) {
        return shared.clone();
    }
    let shared: Arc<T> = value.into();
    *added += 1;
    table.insert(shared.clone());
    shared
}

/// An object kind kept as compact records.
pub(super) trait Record: Sized + Send + Sync + 'static {
    /// What the watch reads from the API (short-lived).
    type Object: kube::Resource;
    fn from_object(object: Self::Object, interner: &mut Interner) -> Self;
    /// `(namespace, name)`.
    fn key(&self) -> Key;
}

type Key = (Arc<str>, Arc<str>);

struct Inner<R> {
    objects: HashMap<Key, Arc<R>>,
    /// Objects of a (re)list in progress; they replace `objects` once it completes.
    listing: Option<HashMap<Key, Arc<R>>>,
    interner: Interner,
}

/// The records of one kind, shared between the watch that fills the store and the snapshot
/// builder.
pub(super) struct Records<R>(Arc<RwLock<Inner<R>>>);

impl<R> Clone for Records<R> {
    fn clone(&self) -> Self {
        Records(self.0.clone())
    }
}

impl<R> Default for Records<R> {
    fn default() -> Self {
        Records(Arc::new(RwLock::new(Inner { objects: HashMap::new(), listing: None, interner: Interner::default() })))
    }
}

impl<R: Record> Records<R> {
    /// Every record, as of now.
    pub fn state(&self) -> Vec<Arc<R>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).objects.values().cloned().collect()
    }

    /// Applies one watcher event.
    pub fn apply(&self, event: watcher::Event<R::Object>) {
        let mut inner = self.0.write().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        match event {
            watcher::Event::Apply(object) => {
                let record = R::from_object(object, &mut inner.interner);
                inner.objects.insert(record.key(), Arc::new(record));
            }
            watcher::Event::Delete(object) => {
                let meta = object.meta();
                let ns = meta.namespace.as_deref().unwrap_or_default();
                let name = meta.name.as_deref().unwrap_or_default();
                inner.objects.remove(&(Arc::from(ns), Arc::from(name)));
            }
            watcher::Event::Init => inner.listing = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                let record = R::from_object(object, &mut inner.interner);
                inner.listing.get_or_insert_with(HashMap::new).insert(record.key(), Arc::new(record));
            }
            watcher::Event::InitDone => {
                if let Some(listed) = inner.listing.take() {
                    inner.objects = listed;
                    inner.objects.shrink_to_fit();
                }
            }
        }
        inner.interner.prune_if_due();
    }
}

impl Record for PodRecord {
    type Object = KeptPod;

    fn from_object(pod: KeptPod, interner: &mut Interner) -> Self {
        let meta = pod.metadata;
        let spec = pod.spec.unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        let named_ports = spec
            .containers
            .into_iter()
            .flat_map(|c| c.ports.into_iter().flatten())
            .filter_map(|p| Some(NamedPort { name: p.name?, container_port: p.container_port, protocol: p.protocol }))
            .collect();
        PodRecord {
            namespace: interner.str(meta.namespace.unwrap_or_default()),
            name: meta.name.unwrap_or_default().into(),
            uid: meta.uid.map(String::into_boxed_str),
            labels: interner.labels(meta.labels.unwrap_or_default()),
            node_name: spec.node_name.map(|s| interner.str(s)),
            service_account_name: spec.service_account_name.map(|s| interner.str(s)),
            service_account: spec.service_account.map(|s| interner.str(s)),
            host_network: spec.host_network,
            named_ports: interner.ports(named_ports),
            phase: status.phase.map(|s| interner.str(s)),
            pod_ip: status.pod_ip.map(String::into_boxed_str),
            pod_ips: status.pod_ips.map(|ips| ips.into_iter().map(|p| p.ip.into_boxed_str()).collect()),
        }
    }

    fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

/// A Service as the store keeps it: the fields the snapshot reads (type, cluster IPs, selector,
/// ports, labels).
#[derive(Debug, Clone, PartialEq)]
pub(in crate::discovery) struct ServiceRecord {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub labels: Option<Arc<BTreeMap<String, String>>>,
    /// False for an object without `spec` (the API never serves one; the snapshot reports it).
    pub has_spec: bool,
    pub type_: Option<Arc<str>>,
    pub cluster_ip: Option<Box<str>>,
    pub cluster_ips: Option<Box<[Box<str>]>>,
    pub selector: Option<Arc<BTreeMap<String, String>>>,
    pub ports: Option<Box<[ServicePort]>>,
}

impl ServiceRecord {
    /// The k8s-openapi Service with the recorded fields, for the rules shared with the file source.
    pub fn to_service(&self) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(self.name.to_string()),
                namespace: Some(self.namespace.to_string()),
                labels: self.labels.as_deref().cloned(),
                ..ObjectMeta::default()
            },
            spec: self.has_spec.then(|| ServiceSpec {
                type_: self.type_.as_deref().map(str::to_owned),
                cluster_ip: self.cluster_ip.as_deref().map(str::to_owned),
                cluster_ips: self.cluster_ips.as_ref().map(|v| v.iter().map(|s| s.to_string()).collect()),
                selector: self.selector.as_deref().cloned(),
                ports: self.ports.as_ref().map(|p| p.to_vec()),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }
}

impl Record for ServiceRecord {
    type Object = Service;

    fn from_object(svc: Service, interner: &mut Interner) -> Self {
        let meta = svc.metadata;
        let spec = svc.spec;
        let has_spec = spec.is_some();
        let spec = spec.unwrap_or_default();
        ServiceRecord {
            namespace: interner.str(meta.namespace.unwrap_or_default()),
            name: meta.name.unwrap_or_default().into(),
            labels: meta.labels.map(|l| interner.labels(l)),
            has_spec,
            type_: spec.type_.map(|t| interner.str(t)),
            cluster_ip: spec.cluster_ip.map(String::into_boxed_str),
            cluster_ips: spec.cluster_ips.map(|v| v.into_iter().map(String::into_boxed_str).collect()),
            selector: spec.selector.map(|l| interner.labels(l)),
            ports: spec.ports.map(Vec::into_boxed_slice),
        }
    }

    fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

/// An EndpointSlice as the store keeps it: its service, address type, ports, and the addresses
/// of each endpoint with its readiness.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::discovery) struct SliceRecord {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The `kubernetes.io/service-name` label.
    pub service: Option<Arc<str>>,
    pub address_type: Arc<str>,
    pub ports: Box<[EndpointPort]>,
    pub endpoints: Box<[SliceEndpoint]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::discovery) struct SliceEndpoint {
    /// `conditions.ready`; unset means ready, as the API defines.
    pub ready: Option<bool>,
    /// The addresses that are IPs (anything else cannot be a pod's and is dropped).
    pub addresses: Box<[IpAddr]>,
}

impl Record for SliceRecord {
    type Object = EndpointSlice;

    fn from_object(slice: EndpointSlice, interner: &mut Interner) -> Self {
        let meta = slice.metadata;
        let service = meta.labels.and_then(|mut l| l.remove(SERVICE_NAME_LABEL)).map(|s| interner.str(s));
        SliceRecord {
            namespace: interner.str(meta.namespace.unwrap_or_default()),
            name: meta.name.unwrap_or_default().into(),
            service,
            address_type: interner.str(slice.address_type),
            ports: slice.ports.unwrap_or_default().into_boxed_slice(),
            endpoints: slice
                .endpoints
                .into_iter()
                .flatten()
                .map(|e| SliceEndpoint {
                    ready: e.conditions.and_then(|c| c.ready),
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                })
                .collect(),
        }
    }

    fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: serde_json::Value, ip: &str) -> KeptPod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "labels": labels,
                         "annotations": {"a": "b"}, "resourceVersion": "7"},
            "spec": {"nodeName": "node-a", "serviceAccountName": "cart", "containers": [
                {"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}]},
                {"name": "sidecar", "ports": [{"name": "metrics", "containerPort": 15020, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.1"}
        }))
        .unwrap()
    }

    #[test]
    fn a_record_keeps_what_a_workload_needs_and_round_trips_to_a_pod() {
        let mut interner = Interner::default();
        let r = PodRecord::from_object(pod("cart-1", serde_json::json!({"app": "cart"}), "10.1.0.5"), &mut interner);
        let p = r.to_pod();
        assert_eq!(p.metadata.name.as_deref(), Some("cart-1"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(p.metadata.uid.as_deref(), Some("uid-cart-1"));
        assert_eq!(p.metadata.labels.unwrap()["app"], "cart");
        assert!(p.metadata.annotations.is_none() && p.metadata.resource_version.is_none());
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(spec.service_account_name.as_deref(), Some("cart"));
        // Unnamed ports are dropped; named ones keep their order across containers.
        let ports: Vec<_> = spec.containers.iter().flat_map(|c| c.ports.iter().flatten()).collect();
        let named: Vec<_> = ports.iter().map(|p| (p.name.as_deref().unwrap(), p.container_port)).collect();
        assert_eq!(named, [("http", 8080), ("metrics", 15020)]);
        let status = p.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.1.0.5"));
        assert_eq!(status.pod_ips.unwrap()[0].ip, "10.1.0.5");
    }

    #[test]
    fn pods_share_equal_labels_ports_and_strings() {
        let mut interner = Interner::default();
        let a = PodRecord::from_object(pod("cart-1", serde_json::json!({"app": "cart"}), "10.1.0.5"), &mut interner);
        let b = PodRecord::from_object(pod("cart-2", serde_json::json!({"app": "cart"}), "10.1.0.6"), &mut interner);
        let c = PodRecord::from_object(pod("cart-3", serde_json::json!({"app": "other"}), "10.1.0.7"), &mut interner);
        assert!(Arc::ptr_eq(&a.labels, &b.labels) && !Arc::ptr_eq(&a.labels, &c.labels));
        assert!(Arc::ptr_eq(&a.named_ports, &c.named_ports));
        assert!(Arc::ptr_eq(&a.namespace, &c.namespace));
        assert!(Arc::ptr_eq(a.node_name.as_ref().unwrap(), c.node_name.as_ref().unwrap()));
    }

    #[test]
    fn unused_values_are_pruned() {
        let mut interner = Interner::default();
        for i in 0..3000 {
            drop(PodRecord::from_object(
                pod(&format!("p{i}"), serde_json::json!({"n": i.to_string()}), "10.1.0.5"),
                &mut interner,
            ));
            interner.prune_if_due();
        }
        assert!(interner.labels.len() < 2100, "{} label sets kept", interner.labels.len());
        let kept = PodRecord::from_object(pod("kept", serde_json::json!({"n": "kept"}), "10.1.0.5"), &mut interner);
        interner.added = usize::MAX / 2;
        interner.prune_if_due();
        assert!(interner.labels.contains(&kept.labels), "a label set in use stays");
        assert_eq!(interner.labels.len(), 1);
    }

    #[test]
    fn a_relist_replaces_the_content_only_when_complete() {
        let store = Records::<PodRecord>::default();
        let names = |s: &Records<PodRecord>| {
            let mut v: Vec<String> = s.state().iter().map(|r| r.name.to_string()).collect();
            v.sort();
            v
        };
        store.apply(watcher::Event::Init);
        store.apply(watcher::Event::InitApply(pod("a", serde_json::json!({}), "10.1.0.1")));
        assert!(names(&store).is_empty(), "nothing before the first list completes");
        store.apply(watcher::Event::InitDone);
        store.apply(watcher::Event::Apply(pod("b", serde_json::json!({}), "10.1.0.2")));
        assert_eq!(names(&store), ["a", "b"]);
        // An update replaces the record; a delete removes it.
        store.apply(watcher::Event::Apply(pod("b", serde_json::json!({"v": "2"}), "10.1.0.2")));
        assert_eq!(store.state().iter().find(|r| &*r.name == "b").unwrap().labels["v"], "2");
        store.apply(watcher::Event::Delete(pod("a", serde_json::json!({}), "10.1.0.1")));
        assert_eq!(names(&store), ["b"]);
        // A relist (after 410 Gone): the old content stays until it is done.
        store.apply(watcher::Event::Init);
        store.apply(watcher::Event::InitApply(pod("c", serde_json::json!({}), "10.1.0.3")));
        assert_eq!(names(&store), ["b"]);
        store.apply(watcher::Event::InitDone);
        assert_eq!(names(&store), ["c"]);
    }

    #[test]
    fn services_and_slices_keep_what_the_snapshot_reads() {
        let mut interner = Interner::default();
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cart", "namespace": "shop", "labels": {"istio.io/use-waypoint": "wp"},
                         "annotations": {"a": "b"}, "uid": "u1"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.9", "clusterIPs": ["10.96.0.9"],
                     "selector": {"app": "cart"}, "sessionAffinity": "None", "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"}]},
            "status": {"loadBalancer": {}}
        }))
        .unwrap();
        let back = ServiceRecord::from_object(svc, &mut interner).to_service();
        assert_eq!(back.metadata.labels.unwrap()["istio.io/use-waypoint"], "wp");
        assert!(back.metadata.annotations.is_none() && back.status.is_none());
        let spec = back.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.cluster_ips.unwrap(), ["10.96.0.9"]);
        assert_eq!(spec.selector.unwrap()["app"], "cart");
        assert!(spec.session_affinity.is_none() && spec.ip_families.is_none());
        let port = &spec.ports.unwrap()[0];
        assert_eq!((port.name.as_deref(), port.port, port.app_protocol.as_deref()), (Some("http"), 80, Some("http")));

        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cart-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "cart"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.0.5"], "conditions": {"ready": true, "serving": true}, "nodeName": "node-a",
                 "targetRef": {"kind": "Pod", "name": "cart-1", "namespace": "shop"}},
                {"addresses": ["10.1.0.6", "not-an-ip"], "conditions": {"ready": false}},
                {"addresses": ["10.1.0.7"]}]
        }))
        .unwrap();
        let r = SliceRecord::from_object(slice, &mut interner);
        assert_eq!(r.service.as_deref(), Some("cart"));
        assert_eq!(&*r.address_type, "IPv4");
        assert_eq!(r.ports[0].port, Some(8080));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            r.endpoints.iter().map(|e| (e.ready, e.addresses.to_vec())).collect::<Vec<_>>(),
            [(Some(true), vec![ip("10.1.0.5")]), (Some(false), vec![ip("10.1.0.6")]), (None, vec![ip("10.1.0.7")])]
        );
    }
}
