//! Parsed objects → [`State`]: cross-object checks (namespaces, service accounts, duplicates, IP
//! clashes), workloads, services with endpoints and resolved target ports, compiled policies.
//!
//! The per-object rules ([`workload`], [`service`]) are shared with `discovery::kube`, so both
//! sources turn the same object into the same snapshot entry; they report a [`Bad`] field, which
//! this file turns into a load error and the cluster source into a log line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{FileError, FileOptions, NETNS_ANNOTATION, Objects};
use crate::identity::Identity;
use crate::netns::NAMED_NETNS_DIR;
use crate::policy::{Policies, PolicyKind};
use crate::state::{
    DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE, RoutingConfig, Service, ServicePort, State,
    Workload,
};

/// What is wrong with one object: the path of the offending field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::discovery) struct Bad {
    pub field: String,
    pub reason: String,
}

/// Labels Istio reads, in order, for a workload's canonical name.
const WORKLOAD_NAME_LABELS: [&str; 3] = ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"];

/// The namespace every cluster has without declaring it.
const DEFAULT_NAMESPACE: &str = "default";

struct Cx<'a> {
    file: &'a str,
}

impl Cx<'_> {
    fn err(&self, doc: usize, object: &str, field: Option<&str>, reason: impl Into<String>) -> FileError {
        FileError::Invalid {
            file: self.file.to_owned(),
            doc,
            object: Some(object.to_owned()),
            field: field.map(str::to_owned),
            reason: reason.into(),
        }
    }

    fn bad(&self, doc: usize, object: &str, bad: Bad) -> FileError {
        self.err(doc, object, Some(&bad.field), bad.reason)
    }
}

pub(in crate::discovery) fn ns_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
}

pub(in crate::discovery) fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

pub(in crate::discovery) fn describe(kind: &str, meta: &ObjectMeta, namespaced: bool) -> String {
    if namespaced { format!("{kind} {}/{}", ns_of(meta), name_of(meta)) } else { format!("{kind} {}", name_of(meta)) }
}

/// RFC 1123 label (namespaces): what Kubernetes requires, and what keeps SPIFFE IDs well formed.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain (most object names).
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Checks names, namespaces and uniqueness of every object, in document order.
fn check_metadata(cx: &Cx<'_>, objects: &Objects) -> Result<(), FileError> {
    let mut all: Vec<(usize, &'static str, &ObjectMeta, bool)> = Vec::new();
    all.extend(objects.namespaces.iter().map(|(d, o)| (*d, "Namespace", &o.metadata, false)));
    all.extend(objects.service_accounts.iter().map(|(d, o)| (*d, "ServiceAccount", &o.metadata, true)));
    all.extend(objects.pods.iter().map(|(d, o)| (*d, "Pod", &o.metadata, true)));
    all.extend(objects.services.iter().map(|(d, o)| (*d, "Service", &o.metadata, true)));
    all.extend(objects.authorization_policies.iter().map(|(d, o)| (*d, "AuthorizationPolicy", &o.metadata, true)));
    all.extend(objects.peer_authentications.iter().map(|(d, o)| (*d, "PeerAuthentication", &o.metadata, true)));
    all.extend(objects.virtual_services.iter().map(|(d, o)| (*d, "VirtualService", &o.metadata, true)));
    all.extend(objects.destination_rules.iter().map(|(d, o)| (*d, "DestinationRule", &o.metadata, true)));
    all.extend(objects.envoy_filters.iter().map(|(d, o)| (*d, "EnvoyFilter", &o.metadata, true)));
    all.extend(objects.gateways.iter().map(|(d, o)| (*d, "Gateway", &o.metadata, true)));
    all.extend(objects.http_routes.iter().map(|(d, o)| (*d, "HTTPRoute", &o.metadata, true)));
    all.sort_by_key(|(doc, ..)| *doc);

    let declared: HashSet<&str> = objects.namespaces.iter().map(|(_, n)| name_of(&n.metadata)).collect();
    let mut seen: HashMap<(&str, &str, &str), usize> = HashMap::new();
    for (doc, kind, meta, namespaced) in all {
        let object = describe(kind, meta, namespaced);
        let name = name_of(meta);
        let ok = match kind {
            "Namespace" => is_dns_label(name),
            "Service" => is_dns_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase()),
            _ => is_dns_subdomain(name),
        };
        if !ok {
            let why = if name.is_empty() {
                "required".to_owned()
            } else {
                format!("{name:?} is not a valid {kind} name (lowercase letters, digits and '-')")
            };
            return Err(cx.err(doc, &object, Some("metadata.name"), why));
        }
        let ns = if namespaced { ns_of(meta) } else { "" };
        if namespaced && ns != DEFAULT_NAMESPACE && !declared.contains(ns) {
            return Err(cx.err(
                doc,
                &object,
                Some("metadata.namespace"),
                format!("namespace {ns:?} is not declared; add a `kind: Namespace` document for it"),
            ));
        }
        if let Some(first) = seen.insert((kind, ns, name), doc) {
            return Err(cx.err(
                doc,
                &object,
                Some("metadata.name"),
                format!("duplicate: {object} is already defined in document {first}"),
            ));
        }
    }
    Ok(())
}

pub(super) fn build(objects: Objects, file: &str, opts: &FileOptions) -> Result<State, FileError> {
    let cx = Cx { file };
    check_metadata(&cx, &objects)?;

    let namespaces: HashMap<String, BTreeMap<String, String>> = objects
        .namespaces
        .iter()
        .map(|(_, n)| (name_of(&n.metadata).to_owned(), n.metadata.labels.clone().unwrap_or_default()))
        .collect();
    let service_accounts: HashSet<(&str, &str)> =
        objects.service_accounts.iter().map(|(_, sa)| (ns_of(&sa.metadata), name_of(&sa.metadata))).collect();

    // Workloads, and which document owns each IP (pods and service VIPs share one address space).
    let mut ip_owner: HashMap<IpAddr, (String, usize)> = HashMap::new();
    let mut workloads_by_ip = HashMap::new();
    let mut by_namespace: HashMap<&str, Vec<(&Pod, Arc<Workload>)>> = HashMap::new();
    for (doc, pod) in &objects.pods {
        let object = describe("Pod", &pod.metadata, true);
        let (workload, ip_fields) = workload(pod, &namespaces, Some(&service_accounts), &opts.trust_domain)
            .map_err(|bad| cx.bad(*doc, &object, bad))?;
        let workload = Arc::new(workload);
        for (field, ip) in ip_fields {
            if let Some((other, other_doc)) = ip_owner.insert(ip, (object.clone(), *doc)) {
                return Err(cx.err(
                    *doc,
                    &object,
                    Some(&field),
                    format!("{ip} is already the IP of {other} (document {other_doc})"),
                ));
            }
            workloads_by_ip.insert(ip, workload.clone());
        }
        by_namespace.entry(ns_of(&pod.metadata)).or_default().push((pod, workload));
    }
    for pods in by_namespace.values_mut() {
        pods.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    }

    let mut services_by_vip = HashMap::new();
    for (doc, svc) in &objects.services {
        let object = describe("Service", &svc.metadata, true);
        let Some((service, vip_fields)) =
            service(svc, Endpoints::Selector(&by_namespace)).map_err(|bad| cx.bad(*doc, &object, bad))?
        else {
            continue;
        };
        let service = Arc::new(service);
        for (field, vip) in vip_fields {
            if let Some((other, other_doc)) = ip_owner.insert(vip, (object.clone(), *doc)) {
                return Err(cx.err(
                    *doc,
                    &object,
                    Some(&field),
                    format!("{vip} is already the IP of {other} (document {other_doc})"),
                ));
            }
            services_by_vip.insert(vip, service.clone());
        }
    }

    let aps: Vec<_> = objects.authorization_policies.iter().map(|(_, p)| p.clone()).collect();
    let pas: Vec<_> = objects.peer_authentications.iter().map(|(_, p)| p.clone()).collect();
    let (policies, errors) = Policies::compile(&aps, &pas, &opts.root_namespace);
    // In a file, a policy the cluster would reject is a mistake to fix, not something to run
    // without: fail the load so the last good configuration stays in force.
    let doc_of = |kind: PolicyKind, ns: &str, name: &str| -> usize {
        let found = match kind {
            PolicyKind::AuthorizationPolicy => objects
                .authorization_policies
                .iter()
                .find(|(_, p)| ns_of(&p.metadata) == ns && name_of(&p.metadata) == name)
                .map(|(d, _)| *d),
            PolicyKind::PeerAuthentication => objects
                .peer_authentications
                .iter()
                .find(|(_, p)| ns_of(&p.metadata) == ns && name_of(&p.metadata) == name)
                .map(|(d, _)| *d),
        };
        found.unwrap_or(0)
    };
    if let Some((doc, e)) = errors.iter().map(|e| (doc_of(e.kind, &e.namespace, &e.name), e)).min_by_key(|(d, _)| *d) {
        let object = format!("{} {}/{}", e.kind, e.namespace, e.name);
        return Err(cx.err(doc, &object, Some(&e.field), e.reason.clone()));
    }

    let routing = RoutingConfig {
        authorization_policies: aps,
        virtual_services: objects.virtual_services.iter().map(|(_, o)| o.clone()).collect(),
        destination_rules: objects.destination_rules.iter().map(|(_, o)| o.clone()).collect(),
        envoy_filters: objects.envoy_filters.iter().map(|(_, o)| o.clone()).collect(),
        gateways: objects.gateways.iter().map(|(_, o)| o.clone()).collect(),
        http_routes: objects.http_routes.iter().map(|(_, o)| o.clone()).collect(),
    };
    Ok(State { workloads_by_ip, services_by_vip, namespaces, policies, routing: Arc::new(routing) })
}

/// One pod → a workload, plus its IPs with the field each came from. `service_accounts`: the
/// declared ones, when a pod must name one of them (the file; in a cluster the API server's
/// admission already checked).
pub(in crate::discovery) fn workload(
    pod: &Pod,
    namespaces: &HashMap<String, BTreeMap<String, String>>,
    service_accounts: Option<&HashSet<(&str, &str)>>,
    trust_domain: &str,
) -> Result<(Workload, FieldIps), Bad> {
    let err = |field: &str, reason: String| Bad { field: field.to_owned(), reason };
    let meta = &pod.metadata;
    let (name, namespace) = (name_of(meta), ns_of(meta));
    let labels = meta.labels.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();

    let (sa_field, service_account) = match spec {
        Some(s) if s.service_account_name.is_some() => ("spec.serviceAccountName", s.service_account_name.clone()),
        Some(s) => ("spec.serviceAccount", s.service_account.clone()),
        None => ("spec.serviceAccountName", None),
    };
    let service_account = service_account.unwrap_or_else(|| "default".to_owned());
    if service_account != "default"
        && service_accounts.is_some_and(|d| !d.contains(&(namespace, service_account.as_str())))
    {
        return Err(err(
            sa_field,
            format!(
                "ServiceAccount {namespace}/{service_account} is not declared; add a `kind: ServiceAccount` \
                 document or use the namespace's `default`"
            ),
        ));
    }
    let identity = Identity {
        trust_domain: trust_domain.to_owned(),
        namespace: namespace.to_owned(),
        service_account: service_account.clone(),
    };
    if !is_dns_subdomain(&service_account) {
        return Err(err(sa_field, format!("{service_account:?} is not a valid ServiceAccount name")));
    }

    let ips = pod_ips(pod, &err)?;

    let netns = match meta.annotations.as_ref().and_then(|a| a.get(NETNS_ANNOTATION)) {
        None => None,
        Some(v) => Some(netns_path(v).map_err(|why| err(&format!("metadata.annotations.{NETNS_ANNOTATION}"), why))?),
    };

    let ns_ambient = namespaces.get(namespace).and_then(|l| l.get(DATAPLANE_MODE_LABEL)).map(String::as_str)
        == Some(DATAPLANE_MODE_AMBIENT);
    let opted_out = labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_MODE_NONE);
    // Host-network pods share the node's network namespace; Istio never captures them.
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let workload_name = WORKLOAD_NAME_LABELS
        .iter()
        .find_map(|l| labels.get(*l).filter(|v| !v.is_empty()).cloned())
        .unwrap_or_else(|| name.to_owned());

    let workload = Workload {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account,
        labels: Arc::new(labels),
        ips: ips.iter().map(|(_, ip)| *ip).collect(),
        node: spec.and_then(|s| s.node_name.clone()),
        uid: meta.uid.clone().filter(|u| !u.is_empty()),
        netns,
        captured: ns_ambient && !opted_out && !host_network,
        identity,
        workload_name,
    };
    Ok((workload, ips))
}

/// `status.podIPs` (all families) or `status.podIP`; when both are set the first of `podIPs` must be
/// `podIP`, as the API server requires.
fn pod_ips<E>(pod: &Pod, err: &impl Fn(&str, String) -> E) -> Result<Vec<(String, IpAddr)>, E> {
    let status = pod.status.as_ref();
    let parse = |field: &str, s: &str| -> Result<IpAddr, E> {
        let ip: IpAddr = s.parse().map_err(|_| err(field, format!("invalid IP address {s:?}")))?;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(err(field, format!("{ip} cannot be a pod IP")));
        }
        Ok(ip)
    };
    let single = match status.and_then(|s| s.pod_ip.as_deref()) {
        Some(s) => Some(parse("status.podIP", s)?),
        None => None,
    };
    let mut ips = Vec::new();
    for (i, p) in status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().enumerate() {
        let field = format!("status.podIPs[{i}].ip");
        let ip = parse(&field, &p.ip)?;
        if ips.iter().any(|(_, seen)| *seen == ip) {
            return Err(err(&field, format!("{ip} is listed twice")));
        }
        ips.push((field, ip));
    }
    match (single, ips.first()) {
        (Some(a), Some((_, b))) if a != *b => {
            return Err(err("status.podIPs[0].ip", format!("must equal status.podIP ({a}), as Kubernetes requires")));
        }
        (Some(a), None) => ips.push(("status.podIP".to_owned(), a)),
        (None, None) => {
            return Err(err(
                "status.podIP",
                "required: local mode has no IP allocator, so write the pod's address (status.podIP or status.podIPs)"
                    .into(),
            ));
        }
        _ => {}
    }
    Ok(ips)
}

/// A bare name is one `ip netns` created under `/var/run/netns`; anything else must be absolute.
fn netns_path(v: &str) -> Result<PathBuf, String> {
    if v.starts_with('/') {
        return Ok(PathBuf::from(v));
    }
    if v.is_empty() || v == "." || v == ".." || v.contains('/') {
        return Err(format!(
            "{v:?} is neither a network namespace name (as in `ip netns add NAME`) nor an absolute path"
        ));
    }
    Ok(PathBuf::from(NAMED_NETNS_DIR).join(v))
}

/// Addresses with the field path each was read from, for error messages.
pub(in crate::discovery) type FieldIps = Vec<(String, IpAddr)>;

/// Workloads per namespace, each with the pod it came from (for named ports), in name order.
pub(in crate::discovery) type PodsByNamespace<'a> = HashMap<&'a str, Vec<(&'a Pod, Arc<Workload>)>>;

/// Where a service's endpoints come from.
pub(in crate::discovery) enum Endpoints<'a> {
    /// The pods its `spec.selector` matches, named target ports resolved from their container
    /// ports (what the endpoint controller would do; the file has no controller).
    Selector(&'a PodsByNamespace<'a>),
    /// Already resolved (from EndpointSlices): the ready workloads in name order, and the target
    /// port of each service port by service port name (`""` for an unnamed port).
    Resolved { workloads: Vec<Arc<Workload>>, target_ports: HashMap<String, u16> },
}

/// One Service → its snapshot form plus VIPs with their fields. `None` for services that have no
/// virtual IP to capture (headless, ExternalName).
pub(in crate::discovery) fn service(
    svc: &KubeService,
    endpoints: Endpoints<'_>,
) -> Result<Option<(Service, FieldIps)>, Bad> {
    let object = describe("Service", &svc.metadata, true);
    let object = object.as_str();
    let err = |field: &str, reason: String| Bad { field: field.to_owned(), reason };
    let namespace = ns_of(&svc.metadata);
    let Some(spec) = svc.spec.as_ref() else {
        return Err(err("spec", "required: a Service needs spec.clusterIP and spec.ports".into()));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        tracing::debug!(service = object, "ExternalName service has no cluster IP; skipped");
        return Ok(None);
    }
    if spec.cluster_ip.as_deref() == Some("None")
        || spec.cluster_ips.as_ref().is_some_and(|v| v.first().map(String::as_str) == Some("None"))
    {
        tracing::debug!(service = object, "headless service has no cluster IP; skipped");
        return Ok(None);
    }
    let parse = |field: &str, s: &str| -> Result<IpAddr, Bad> {
        let ip: IpAddr = s.parse().map_err(|_| err(field, format!("invalid IP address {s:?}")))?;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(err(field, format!("{ip} cannot be a cluster IP")));
        }
        Ok(ip)
    };
    let mut vips: Vec<(String, IpAddr)> = Vec::new();
    for (i, s) in spec.cluster_ips.iter().flatten().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        let ip = parse(&field, s)?;
        if vips.iter().any(|(_, v)| *v == ip) {
            return Err(err(&field, format!("{ip} is listed twice")));
        }
        vips.push((field, ip));
    }
    match (spec.cluster_ip.as_deref(), vips.first()) {
        (Some(s), Some((_, first))) => {
            if parse("spec.clusterIP", s)? != *first {
                return Err(err(
                    "spec.clusterIPs[0]",
                    format!("must equal spec.clusterIP ({s}), as Kubernetes requires"),
                ));
            }
        }
        (Some(s), None) => vips.push(("spec.clusterIP".to_owned(), parse("spec.clusterIP", s)?)),
        (None, None) => {
            return Err(err(
                "spec.clusterIP",
                "required: local mode has no IP allocator, so write the service's virtual IP".into(),
            ));
        }
        (None, Some(_)) => {}
    }

    let (selected, resolved): (Vec<(&Pod, Arc<Workload>)>, _) = match endpoints {
        Endpoints::Selector(pods) => {
            let selector = spec.selector.clone().unwrap_or_default();
            // An empty selector selects nothing in Kubernetes (endpoints are then managed by hand).
            let selected = if selector.is_empty() {
                Vec::new()
            } else {
                pods.get(namespace)
                    .into_iter()
                    .flatten()
                    .filter(|(_, w)| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                    .map(|(p, w)| (*p, w.clone()))
                    .collect()
            };
            (selected, None)
        }
        Endpoints::Resolved { workloads, target_ports } => (Vec::new(), Some((workloads, target_ports))),
    };

    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let path = format!("spec.ports[{i}]");
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        if protocol != "TCP" {
            tracing::debug!(service = object, port = p.port, protocol, "only TCP ports are meshed; port skipped");
            continue;
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err(&format!("{path}.port"), format!("{} is not a port number (1-65535)", p.port)))?;
        if ports.iter().any(|sp: &ServicePort| sp.port == port) {
            return Err(err(&format!("{path}.port"), format!("port {port} is listed twice")));
        }
        let from_slices = resolved.as_ref().and_then(|(_, t)| t.get(p.name.as_deref().unwrap_or("")).copied());
        let target_port = match &p.target_port {
            _ if from_slices.is_some() => from_slices.unwrap_or(port),
            // No slice lists the port: no endpoint serves it, so its number cannot matter.
            Some(IntOrString::String(name)) if resolved.is_some() => {
                tracing::debug!(
                    service = object,
                    port,
                    name,
                    "named target port not in any EndpointSlice; port skipped"
                );
                continue;
            }
            None => port,
            Some(IntOrString::Int(t)) => u16::try_from(*t)
                .ok()
                .filter(|t| *t != 0)
                .ok_or_else(|| err(&format!("{path}.targetPort"), format!("{t} is not a port number (1-65535)")))?,
            Some(IntOrString::String(name)) => {
                resolve_named_port(name, &selected).map_err(|why| err(&format!("{path}.targetPort"), why))?
            }
        };
        ports.push(ServicePort { name: p.name.clone(), port, target_port, app_protocol: p.app_protocol.clone() });
    }

    let service = Service {
        name: name_of(&svc.metadata).to_owned(),
        namespace: namespace.to_owned(),
        vips: vips.iter().map(|(_, ip)| *ip).collect(),
        ports,
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        endpoints: match resolved {
            Some((workloads, _)) => workloads,
            None => selected.into_iter().map(|(_, w)| w).collect(),
        },
    };
    Ok(Some((service, vips)))
}

/// A named target port must mean one number: the snapshot has one target port per service port.
fn resolve_named_port(name: &str, endpoints: &[(&Pod, Arc<Workload>)]) -> Result<u16, String> {
    let mut found: Option<(u16, &str)> = None;
    for (pod, w) in endpoints {
        let declared = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| cp.name.as_deref() == Some(name) && cp.protocol.as_deref().unwrap_or("TCP") == "TCP");
        let Some(cp) = declared else { continue };
        let number = u16::try_from(cp.container_port).ok().filter(|n| *n != 0).ok_or_else(|| {
            format!("Pod {}/{} declares port {name:?} as {}, not a port number", w.namespace, w.name, cp.container_port)
        })?;
        match found {
            Some((n, first)) if n != number => {
                return Err(format!(
                    "named port {name:?} is {n} on Pod {}/{first} but {number} on Pod {}/{}; \
                     use a number or make the pods agree",
                    w.namespace, w.namespace, w.name
                ));
            }
            Some(_) => {}
            None => found = Some((number, &w.name)),
        }
    }
    found.map(|(n, _)| n).ok_or_else(|| {
        if endpoints.is_empty() {
            format!(
                "named port {name:?} cannot be resolved: the selector matches no pod; use a number or fix the selector"
            )
        } else {
            format!("named port {name:?} cannot be resolved: no selected pod has a container port with that name")
        }
    })
}
