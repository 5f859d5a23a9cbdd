//! What the reflectors keep of each object: only the fields the snapshot is built from, so a
//! cluster of 10,000 pods costs a few megabytes. Applied to every watch event before the store
//! sees it (the watcher has already taken the resourceVersion it resumes from).

use k8s_openapi::api::core::v1::{Container, ContainerPort, Namespace, Pod, PodSpec, PodStatus, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DynamicObject, PartialObjectMeta};

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

pub(super) fn pod(p: &mut Pod) {
    // The uid names the pod's cgroup (how a running pod's netns is found without a CNI ADD) and
    // tells a recreated pod from its namesake's CNI record.
    let uid = p.metadata.uid.take();
    meta(&mut p.metadata);
    p.metadata.uid = uid;
    p.spec = p.spec.take().map(|s| PodSpec {
        node_name: s.node_name,
        service_account_name: s.service_account_name,
        service_account: s.service_account,
        host_network: s.host_network,
        // Only named ports matter: a Service's named targetPort resolves against them.
        containers: s
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports.map(|ports| {
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
                }),
                ..Container::default()
            })
            .collect(),
        ..PodSpec::default()
    });
    p.status = p.status.take().map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        ..PodStatus::default()
    });
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
