//! What is read and kept of each object: only the fields the snapshot is built from. The trims
//! here apply to the kinds in kube-rs reflector stores, on every watch event before the store sees
//! it (the watcher has already taken the resourceVersion it resumes from); pods, Services and
//! EndpointSlices become compact records instead (`records`).
//!
//! Pods are not even read whole: [`KeptPod`] deserialises only the fields the agent uses (serde
//! skips the rest of the API's JSON without allocating it), because k8s-openapi's `Pod` is about
//! 4 KB before any of its fields is set — 40 MB of empty fields for 10,000 pods; the pod store
//! (`records`) then keeps a compact record of it.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::{ContainerPort, Namespace, PodIP};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DynamicObject, PartialObjectMeta};
use serde::Deserialize;

/// A Pod as read from the API: metadata and the spec and status fields a workload is built
/// from. Watched as `v1` `pods`; short-lived: the pod store keeps a compact
/// [`super::records::PodRecord`] of it.
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

pub(super) fn namespace(n: &mut PartialObjectMeta<Namespace>) {
    meta(&mut n.metadata);
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
