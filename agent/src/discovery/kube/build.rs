//! Reflector stores → [`State`], with the file source's per-object rules (`file::build`). Unlike
//! the file, a cluster is never rejected as a whole: an object that breaks a rule is left out and
//! logged with its field, once per distinct problem (not at every rebuild).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodIP};
use kube::api::DynamicObject;
use serde::de::DeserializeOwned;

use super::records::{PodRecord, ServiceRecord, SliceRecord};
use super::{KubeOptions, Stores};
use crate::crd::{AuthorizationPolicy, PeerAuthentication};
use crate::discovery::file::build::{
    Bad, Endpoints, FieldIps, PodsByNamespace, describe, name_of, ns_of, service, workload,
};
use crate::policy::Policies;
use crate::state::{LocalPodAddresses, RoutingConfig, State, Workload};

/// Label an EndpointSlice carries with the name of its Service.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The objects one snapshot is built from (what the stores held at one moment).
#[derive(Default)]
pub(super) struct Inputs {
    pub pods: Vec<Arc<PodRecord>>,
    /// Namespace name → labels.
    pub namespaces: HashMap<String, BTreeMap<String, String>>,
    pub services: Vec<Arc<ServiceRecord>>,
    pub slices: Vec<Arc<SliceRecord>>,
    pub authz: Vec<Arc<DynamicObject>>,
    pub peer: Vec<Arc<DynamicObject>>,
    pub virtual_services: Vec<Arc<DynamicObject>>,
    pub destination_rules: Vec<Arc<DynamicObject>>,
    pub envoy_filters: Vec<Arc<DynamicObject>>,
    pub gateways: Vec<Arc<DynamicObject>>,
    pub http_routes: Vec<Arc<DynamicObject>>,
    /// IPs of this node's pods that the API server does not show yet (the CNI registry).
    pub local_addresses: Option<Arc<dyn LocalPodAddresses>>,
}

impl Inputs {
    fn from_stores(s: &Stores) -> Inputs {
        Inputs {
            pods: s.pods.state(),
            namespaces: s
                .namespaces
                .state()
                .iter()
                .map(|n| (name_of(&n.metadata).to_owned(), n.metadata.labels.clone().unwrap_or_default()))
                .collect(),
            services: s.services.state(),
            slices: s.slices.state(),
            authz: s.authz.state(),
            peer: s.peer.state(),
            virtual_services: s.virtual_services.state(),
            destination_rules: s.destination_rules.state(),
            envoy_filters: s.envoy_filters.state(),
            gateways: s.gateways.state(),
            http_routes: s.http_routes.state(),
            local_addresses: None,
        }
    }
}

/// Builds snapshots and remembers which problems were already logged.
pub(super) struct Builder {
    opts: KubeOptions,
    /// Problems logged for the previous snapshot; one that persists is not logged again.
    reported: HashSet<String>,
    /// Fingerprint of the policy objects last compiled: unchanged policies compile silently (the
    /// compiler logs its warnings, which would otherwise repeat at every pod change).
    policy_fingerprint: Option<u64>,
    local_addresses: Option<Arc<dyn LocalPodAddresses>>,
    /// Each pod's workload from the previous snapshot, reused while the pod object and its
    /// namespace's labels are unchanged: a rebuild (every policy or service change) then costs
    /// no allocation per pod, and snapshots share the workloads.
    workloads: WorkloadCache,
}

impl Builder {
    pub fn new(opts: KubeOptions) -> Builder {
        Builder {
            opts,
            reported: HashSet::new(),
            policy_fingerprint: None,
            local_addresses: None,
            workloads: WorkloadCache::default(),
        }
    }

    /// Pods of this node without an IP in the API get the IPs `known` has for them.
    pub fn with_local_addresses(mut self, known: Arc<dyn LocalPodAddresses>) -> Builder {
        self.local_addresses = Some(known);
        self
    }

    pub fn opts(&self) -> &KubeOptions {
        &self.opts
    }

    /// The problems of the last snapshot (`Kind ns/name: field: reason`).
    #[cfg(test)]
    pub fn problems(&self) -> &HashSet<String> {
        &self.reported
    }

    pub(super) fn build(&mut self, stores: &Stores) -> State {
        let mut inputs = Inputs::from_stores(stores);
        inputs.local_addresses = self.local_addresses.clone();
        self.build_from(&inputs)
    }

    pub(super) fn build_from(&mut self, inputs: &Inputs) -> State {
        let mut problems = Problems::default();
        let state = build(inputs, &self.opts, &mut problems, &mut self.policy_fingerprint, &mut self.workloads);
        for p in problems.0.difference(&self.reported) {
            tracing::warn!(problem = %p, "object left out of the mesh state; fix it (the rest applies)");
        }
        super::report::on_problems(&problems.0, inputs);
        self.reported = problems.0;
        state
    }
}

/// Problems found in one build, as log lines: `Kind ns/name: field: reason`.
#[derive(Default)]
struct Problems(HashSet<String>);

impl Problems {
    fn add(&mut self, object: &str, field: &str, reason: &str) {
        self.0.insert(format!("{object}: {field}: {reason}"));
    }
}

/// A pod's workload as last built, keyed by the address of the stored pod record (the store
/// replaces the `Arc` whenever the pod changes, and the entry holds it so the address stays
/// taken).
#[derive(Default)]
pub(super) struct WorkloadCache(HashMap<usize, CachedWorkload>);

struct CachedWorkload {
    pod: Arc<PodRecord>,
    /// Hash of the labels of the pod's namespace when it was built (ambient or not).
    namespace_labels: u64,
    built: Result<(Arc<Workload>, FieldIps), Bad>,
}

fn labels_hash(labels: Option<&BTreeMap<String, String>>) -> u64 {
    let mut h = DefaultHasher::new();
    labels.hash(&mut h);
    h.finish()
}

fn build(
    inputs: &Inputs,
    opts: &KubeOptions,
    problems: &mut Problems,
    policy_fingerprint: &mut Option<u64>,
    cache: &mut WorkloadCache,
) -> State {
    let known = inputs.local_addresses.as_deref();
    let mut slices: HashMap<(&str, &str), Vec<&SliceRecord>> = HashMap::new();
    for s in &inputs.slices {
        if let Some(svc) = &s.service {
            slices.entry((&s.namespace, svc)).or_default().push(s);
        }
    }
    // Only a service without EndpointSlices resolves its endpoints (and named ports) from the
    // pods of its namespace: only there must the pods themselves be at hand.
    let selector_namespaces: HashSet<&str> = inputs
        .services
        .iter()
        .filter(|s| !slices.contains_key(&(&*s.namespace, &*s.name)))
        .map(|s| &*s.namespace)
        .collect();
    let namespace_labels: HashMap<&str, u64> =
        inputs.namespaces.iter().map(|(n, l)| (n.as_str(), labels_hash(Some(l)))).collect();

    let mut pods: Vec<&Arc<PodRecord>> = inputs.pods.iter().collect();
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut previous = std::mem::take(&mut cache.0);
    let mut workloads_by_ip: HashMap<IpAddr, Arc<Workload>> = HashMap::with_capacity(pods.len());
    let mut selectable: Vec<(Pod, Arc<Workload>)> = Vec::new();
    for kept in pods {
        let namespace = &*kept.namespace;
        let ns_hash = namespace_labels.get(namespace).copied().unwrap_or_else(|| labels_hash(None));
        let key = Arc::as_ptr(kept) as usize;
        let reused = previous.remove(&key).filter(|c| Arc::ptr_eq(&c.pod, kept) && c.namespace_labels == ns_hash);
        let materialized = selector_namespaces.contains(namespace).then(|| kept.to_pod());
        let built = match reused {
            // Taken with the API's IPs: unaffected by the CNI registry.
            Some(c) if serves_traffic(kept) => c.built,
            _ => {
                let Some(pod) = with_known_ips(kept, &opts.node_name, known) else { continue };
                workload(&pod, &inputs.namespaces, None, &opts.trust_domain).map(|(w, ips)| {
                    // The same labels as the record's: share its copy.
                    (Arc::new(Workload { labels: kept.labels.clone(), ..w }), ips)
                })
            }
        };
        if serves_traffic(kept) {
            cache.0.insert(key, CachedWorkload { pod: kept.clone(), namespace_labels: ns_hash, built: built.clone() });
        }
        let (w, ips) = match built {
            Ok(r) => r,
            Err(bad) => {
                problems.add(&kept.describe(), &bad.field, &bad.reason);
                continue;
            }
        };
        // Name order decides which of two pods claiming one IP wins (a stale pod whose IP was
        // reused before the API server saw it leave).
        for (field, ip) in ips {
            if let Some(other) = workloads_by_ip.get(&ip) {
                problems.add(
                    &kept.describe(),
                    &field,
                    &format!("{ip} is already the IP of Pod {}/{}", other.namespace, other.name),
                );
                continue;
            }
            workloads_by_ip.insert(ip, w.clone());
        }
        if let Some(pod) = materialized {
            selectable.push((pod, w));
        }
    }
    let mut by_namespace: PodsByNamespace<'_> = HashMap::new();
    for (pod, w) in &selectable {
        by_namespace.entry(ns_of(&pod.metadata)).or_default().push((pod, w.clone()));
    }

    let mut services: Vec<&ServiceRecord> = inputs.services.iter().map(Arc::as_ref).collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut services_by_vip = HashMap::new();
    for record in services {
        let svc = record.to_service();
        let object = describe("Service", &svc.metadata, true);
        let endpoints = match slices.get(&(&*record.namespace, &*record.name)) {
            Some(list) => from_slices(list, &workloads_by_ip),
            None => Endpoints::Selector(&by_namespace),
        };
        let (s, vips) = match service(&svc, endpoints) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(bad) => {
                problems.add(&object, &bad.field, &bad.reason);
                continue;
            }
        };
        let s = Arc::new(s);
        for (field, vip) in vips {
            if let Some(w) = workloads_by_ip.get(&vip) {
                problems.add(&object, &field, &format!("{vip} is already the IP of Pod {}/{}", w.namespace, w.name));
                continue;
            }
            if let Some(other) = services_by_vip.insert(vip, s.clone()) {
                services_by_vip.insert(vip, other.clone());
                problems.add(
                    &object,
                    &field,
                    &format!("{vip} is already the IP of Service {}/{}", other.namespace, other.name),
                );
            }
        }
    }

    let authz: Vec<AuthorizationPolicy> = typed_all(&inputs.authz, "AuthorizationPolicy", problems);
    let policies = policies(inputs, &authz, opts, problems, policy_fingerprint);
    let routing = RoutingConfig {
        authorization_policies: authz,
        virtual_services: typed_all(&inputs.virtual_services, "VirtualService", problems),
        destination_rules: typed_all(&inputs.destination_rules, "DestinationRule", problems),
        envoy_filters: typed_all(&inputs.envoy_filters, "EnvoyFilter", problems),
        gateways: typed_all(&inputs.gateways, "Gateway", problems),
        http_routes: typed_all(&inputs.http_routes, "HTTPRoute", problems),
    };
    State {
        workloads_by_ip,
        services_by_vip,
        namespaces: inputs.namespaces.clone(),
        policies,
        routing: Arc::new(routing),
    }
}

/// The pod as the snapshot takes it: as the API shows it when it serves traffic; with the IPs
/// `known` has for it when it is on `node`, would serve traffic and the API has no IP for it yet
/// (between the CNI ADD and kubelet's status update); `None` otherwise. The API's IPs win as soon
/// as it has some.
fn with_known_ips(kept: &PodRecord, node: &str, known: Option<&dyn LocalPodAddresses>) -> Option<Pod> {
    if serves_traffic(kept) {
        return Some(kept.to_pod());
    }
    let known = known?;
    if kept.node_name.as_deref() != Some(node)
        || kept.host_network == Some(true)
        || matches!(kept.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let ips = known.pod_ips(&kept.namespace, &kept.name, kept.uid.as_deref().unwrap_or_default())?;
    let first = ips.first()?;
    let mut pod = kept.to_pod();
    let status = pod.status.get_or_insert_with(Default::default);
    status.pod_ip = Some(first.to_string());
    status.pod_ips = Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
    Some(pod)
}

/// Pods that have or may have an IP of their own: not finished, not on the host network (those
/// share the node's address, so an IP cannot tell them apart; Istio never captures them), and
/// scheduled with an address (a pending pod has none yet: not an error, just not there).
fn serves_traffic(p: &PodRecord) -> bool {
    let host_network = p.host_network.unwrap_or(false);
    let has_ip =
        p.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty()) || p.pod_ips.as_ref().is_some_and(|v| !v.is_empty());
    !matches!(p.phase.as_deref(), Some("Succeeded" | "Failed")) && !host_network && has_ip
}

/// A service's endpoints as its EndpointSlices list them: ready endpoints (an unset condition
/// means ready, as the API defines) whose address is a known pod, in name order; target ports by
/// service port name.
fn from_slices<'a>(slices: &[&SliceRecord], workloads: &HashMap<IpAddr, Arc<Workload>>) -> Endpoints<'a> {
    let mut selected: BTreeMap<(String, String), Arc<Workload>> = BTreeMap::new();
    let mut target_ports: HashMap<String, u16> = HashMap::new();
    for slice in slices {
        if !matches!(&*slice.address_type, "IPv4" | "IPv6") {
            continue;
        }
        for p in &slice.ports {
            let tcp = p.protocol.as_deref().unwrap_or("TCP") == "TCP";
            if let (true, Some(port)) = (tcp, p.port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0)) {
                target_ports.entry(p.name.clone().unwrap_or_default()).or_insert(port);
            }
        }
        for e in &slice.endpoints {
            if e.ready == Some(false) {
                continue;
            }
            for a in &e.addresses {
                let Some(w) = workloads.get(a) else {
                    tracing::trace!(address = %a, "endpoint address is not a known pod; skipped");
                    continue;
                };
                selected.entry((w.namespace.clone(), w.name.clone())).or_insert_with(|| w.clone());
            }
        }
    }
    Endpoints::Resolved { workloads: selected.into_values().collect(), target_ports }
}

/// Parses each PeerAuthentication on its own (a malformed one is left out with its field) and compiles them.
fn policies(
    inputs: &Inputs,
    authz: &[AuthorizationPolicy],
    opts: &KubeOptions,
    problems: &mut Problems,
    fingerprint: &mut Option<u64>,
) -> Policies {
    let peer: Vec<PeerAuthentication> = typed_all(&inputs.peer, "PeerAuthentication", problems);

    let mut h = DefaultHasher::new();
    for o in inputs.authz.iter().chain(&inputs.peer) {
        (ns_of(&o.metadata), name_of(&o.metadata), &o.metadata.resource_version).hash(&mut h);
    }
    opts.root_namespace.hash(&mut h);
    let now = h.finish();
    let unchanged = *fingerprint == Some(now);
    *fingerprint = Some(now);
    let compile = || Policies::compile(authz, &peer, &opts.root_namespace);
    let (policies, errors) =
        if unchanged { tracing::dispatcher::with_default(&tracing::Dispatch::none(), compile) } else { compile() };
    for e in errors {
        problems.add(&format!("{} {}/{}", e.kind, e.namespace, e.name), &e.field, &e.reason);
    }
    policies
}

fn typed_all<T: DeserializeOwned>(objects: &[Arc<DynamicObject>], kind: &str, problems: &mut Problems) -> Vec<T> {
    let mut sorted: Vec<&DynamicObject> = objects.iter().map(Arc::as_ref).collect();
    sorted.sort_by(|a, b| (ns_of(&a.metadata), name_of(&a.metadata)).cmp(&(ns_of(&b.metadata), name_of(&b.metadata))));
    sorted
        .into_iter()
        .filter_map(|o| match typed(o) {
            Ok(t) => Some(t),
            Err((field, reason)) => {
                problems.add(&describe(kind, &o.metadata, true), &field, &reason);
                None
            }
        })
        .collect()
}

/// One untyped object → its Rust type, errors naming the field (`spec.rules[0].from`).
fn typed<T: DeserializeOwned>(o: &DynamicObject) -> Result<T, (String, String)> {
    let value = serde_json::to_value(o).map_err(|e| (".".to_owned(), e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        (path, e.into_inner().to_string())
    })
}
