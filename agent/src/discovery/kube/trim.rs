//! What the reflectors keep of each object: only the fields the snapshot is built from, so a
//! cluster of 10,000 pods costs a few megabytes. Applied to every watch event before the store
//! sees it (the watcher has already taken the resourceVersion it resumes from).
//!
//! Pods are not even read whole: [`KeptPod`] deserialises only the fields the agent uses (serde
//! skips the rest of the API's JSON without allocating it), because k8s-openapi's `Pod` is about
//! 4 KB before any of its fields is set — 40 MB of empty fields for 10,000 pods.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DynamicObject, PartialObjectMeta};
use serde::Deserialize;

/// A Pod as the reflector keeps it: metadata (trimmed to name, namespace, labels and uid) and
/// the spec and status fields a workload is built from. Watched as `v1` `pods`; turned into a
/// k8s-openapi [`Pod`] with [`KeptPod::to_pod`] only while a snapshot is built from it.
#[derive(Debug, Clone, Default, Deserialize)]
pub(in crate::discovery) struct KeptPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<KeptPodSpec>,
    pub status: Option<KeptPodStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(in crate::discovery) struct KeptPodSpec {
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
    pub service_account: Option<String>,
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<KeptContainer>,
}

/// Only named ports matter: a Service's named targetPort resolves against them.
#[derive(Debug, Clone, Default, Deserialize)]
pub(in crate::discovery) struct KeptContainer {
    #[serde(default)]
    pub name: String,
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(in crate::discovery) struct KeptPodStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIP>>,
}

impl kube::Resource for KeptPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Pod")
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("pods")
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl KeptPod {
    /// The k8s-openapi Pod with the kept fields, for the rules shared with the file source.
    pub fn to_pod(&self) -> Pod {
        Pod {
            metadata: self.metadata.clone(),
            spec: self.spec.as_ref().map(|s| PodSpec {
                node_name: s.node_name.clone(),
                service_account_name: s.service_account_name.clone(),
                service_account: s.service_account.clone(),
                host_network: s.host_network,
                containers: s
                    .containers
                    .iter()
                    .map(|c| Container { name: c.name.clone(), ports: c.ports.clone(), ..Container::default() })
                    .collect(),
                ..PodSpec::default()
            }),
            status: self.status.as_ref().map(|s| PodStatus {
                phase: s.phase.clone(),
                pod_ip: s.pod_ip.clone(),
                pod_ips: s.pod_ips.clone(),
                ..PodStatus::default()
            }),
        }
    }
}

/// Name, namespace and labels; the rest of metadata (annotations, managed fields, owner
/// references) is dropped. Dropping annotations also drops the file source's `weft.io/netns`:
/// in a cluster the CNI plugin says where a pod's network namespace is.
fn meta(m: &mut ObjectMeta) {
    *m = ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        labels: m.labels.take(),
        resource_version: None,
        ..ObjectMeta::default()
    };
}

pub(super) fn pod(p: &mut KeptPod) {
    // The uid names the pod's cgroup (how a running pod's netns is found without a CNI ADD) and
    // tells a recreated pod from its namesake's CNI record.
    let uid = p.metadata.uid.take();
    meta(&mut p.metadata);
    p.metadata.uid = uid;
    for c in p.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
        c.ports = c.ports.take().map(|ports| {
            ports
                .into_iter()
                .filter(|p| p.name.is_some())
                .map(|p| ContainerPort {
                    name: p.name,
                    container_port: p.container_port,
                    protocol: p.protocol,
                    ..ContainerPort::default()
                })
                .collect()
        });
    }
}

pub(super) fn namespace(n: &mut PartialObjectMeta<Namespace>) {
    meta(&mut n.metadata);
}

pub(super) fn service(s: &mut Service) {
    meta(&mut s.metadata);
    s.status = None;
}

pub(super) fn endpoint_slice(s: &mut EndpointSlice) {
    meta(&mut s.metadata);
    for e in s.endpoints.iter_mut().flatten() {
        *e = Endpoint {
            addresses: std::mem::take(&mut e.addresses),
            conditions: e
                .conditions
                .take()
                .map(|c| EndpointConditions { ready: c.ready, ..EndpointConditions::default() }),
            ..Endpoint::default()
        };
    }
}

/// Policies keep their resourceVersion: problems are reported once per version.
pub(super) fn dynamic(o: &mut DynamicObject) {
    let rv = o.metadata.resource_version.take();
    meta(&mut o.metadata);
    o.metadata.resource_version = rv;
    if let Some(map) = o.data.as_object_mut() {
        map.remove("status");
    }
}

/// Traffic-management resources keep their resourceVersion (problems are reported once per
/// version) and generation (a waypoint writing route status reports the generation it saw).
pub(super) fn routing(o: &mut DynamicObject) {
    let generation = o.metadata.generation.take();
    dynamic(o);
    o.metadata.generation = generation;
}
