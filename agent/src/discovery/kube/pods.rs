//! The pod store: every pod of the cluster as a compact [`PodRecord`], kept current from a pod
//! watch. This replaces a kube-rs reflector store for pods, the one kind that scales with the
//! cluster: a reflector keeps each object as its Rust type with a full `ObjectMeta` and owned
//! strings (about 2 KB a pod even trimmed to the fields weft reads), while a record is a few
//! hundred bytes. Strings most pods share (namespace, node, service account, phase) and whole
//! label sets and named-port lists (the same for every pod of a ReplicaSet) are stored once.
//!
//! The store follows the watcher's protocol as kube-rs's reflector does: a (re)list's objects are
//! collected aside and replace the content only when the list is complete, so a relist after a
//! `410 Gone` never shows a half-filled store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher;

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
    fn str(&mut self, s: String) -> Arc<str> {
        if let Some(shared) = self.strings.get(s.as_str()) {
            return shared.clone();
        }
        let shared: Arc<str> = s.into();
        self.added += 1;
        self.strings.insert(shared.clone());
        shared
    }

    fn labels(&mut self, labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        if let Some(shared) = self.labels.get(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        self.added += 1;
        self.labels.insert(shared.clone());
        shared
    }

    fn ports(&mut self, ports: Vec<NamedPort>) -> Arc<[NamedPort]> {
        if let Some(shared) = self.ports.get(ports.as_slice()) {
            return shared.clone();
        }
        let shared: Arc<[NamedPort]> = ports.into();
        self.added += 1;
        self.ports.insert(shared.clone());
        shared
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

    /// The record of a pod as the API shows it.
    pub fn record(&mut self, pod: KeptPod) -> PodRecord {
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
            namespace: self.str(meta.namespace.unwrap_or_default()),
            name: meta.name.unwrap_or_default().into(),
            uid: meta.uid.map(String::into_boxed_str),
            labels: self.labels(meta.labels.unwrap_or_default()),
            node_name: spec.node_name.map(|s| self.str(s)),
            service_account_name: spec.service_account_name.map(|s| self.str(s)),
            service_account: spec.service_account.map(|s| self.str(s)),
            host_network: spec.host_network,
            named_ports: self.ports(named_ports),
            phase: status.phase.map(|s| self.str(s)),
            pod_ip: status.pod_ip.map(String::into_boxed_str),
            pod_ips: status.pod_ips.map(|ips| ips.into_iter().map(|p| p.ip.into_boxed_str()).collect()),
        }
    }
}

type Key = (Arc<str>, Arc<str>);

#[derive(Default)]
struct Inner {
    pods: HashMap<Key, Arc<PodRecord>>,
    /// Objects of a (re)list in progress; they replace `pods` once it completes.
    listing: Option<HashMap<Key, Arc<PodRecord>>>,
    interner: Interner,
}

/// The pods of the cluster, shared between the watch that fills it and the snapshot builder.
#[derive(Clone, Default)]
pub(super) struct PodStore(Arc<RwLock<Inner>>);

impl PodStore {
    /// Every pod, as of now.
    pub fn state(&self) -> Vec<Arc<PodRecord>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).pods.values().cloned().collect()
    }

    /// Applies one watcher event.
    pub fn apply(&self, event: watcher::Event<KeptPod>) {
        let mut inner = self.0.write().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        match event {
            watcher::Event::Apply(pod) => {
                let record = Arc::new(inner.interner.record(pod));
                inner.pods.insert(key(&record), record);
            }
            watcher::Event::Delete(pod) => {
                let ns = pod.metadata.namespace.unwrap_or_default();
                let name = pod.metadata.name.unwrap_or_default();
                inner.pods.remove(&(Arc::from(ns), Arc::from(name)));
            }
            watcher::Event::Init => inner.listing = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                let record = Arc::new(inner.interner.record(pod));
                inner.listing.get_or_insert_with(HashMap::new).insert(key(&record), record);
            }
            watcher::Event::InitDone => {
                if let Some(listed) = inner.listing.take() {
                    inner.pods = listed;
                    inner.pods.shrink_to_fit();
                }
            }
        }
        inner.interner.prune_if_due();
    }
}

fn key(record: &PodRecord) -> Key {
    (record.namespace.clone(), record.name.clone())
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
        let r = interner.record(pod("cart-1", serde_json::json!({"app": "cart"}), "10.1.0.5"));
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
        let a = interner.record(pod("cart-1", serde_json::json!({"app": "cart"}), "10.1.0.5"));
        let b = interner.record(pod("cart-2", serde_json::json!({"app": "cart"}), "10.1.0.6"));
        let c = interner.record(pod("cart-3", serde_json::json!({"app": "other"}), "10.1.0.7"));
        assert!(Arc::ptr_eq(&a.labels, &b.labels) && !Arc::ptr_eq(&a.labels, &c.labels));
        assert!(Arc::ptr_eq(&a.named_ports, &c.named_ports));
        assert!(Arc::ptr_eq(&a.namespace, &c.namespace));
        assert!(Arc::ptr_eq(a.node_name.as_ref().unwrap(), c.node_name.as_ref().unwrap()));
    }

    #[test]
    fn unused_values_are_pruned() {
        let mut interner = Interner::default();
        for i in 0..3000 {
            drop(interner.record(pod(&format!("p{i}"), serde_json::json!({"n": i.to_string()}), "10.1.0.5")));
            interner.prune_if_due();
        }
        assert!(interner.labels.len() < 2100, "{} label sets kept", interner.labels.len());
        let kept = interner.record(pod("kept", serde_json::json!({"n": "kept"}), "10.1.0.5"));
        interner.added = usize::MAX / 2;
        interner.prune_if_due();
        assert!(interner.labels.contains(&kept.labels), "a label set in use stays");
        assert_eq!(interner.labels.len(), 1);
    }

    #[test]
    fn a_relist_replaces_the_content_only_when_complete() {
        let store = PodStore::default();
        let names = |s: &PodStore| {
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
}
