//! The install as typed Kubernetes objects (k8s-openapi): namespace, the node agent's DaemonSet, the
//! CA's Deployment and Service, ServiceAccounts and least-privilege RBAC. The one source both the Helm
//! chart's templates and the plain manifests are rendered from (see `chart`).
//!
//! Owns: what is installed and how it is wired (mounts, probes, flags, permissions). Names, ports and
//! paths come from the agent's own constants (`weft::config`, `weft::ca_server`), so a default changed
//! there shows up here at the next `cargo xtask codegen` instead of drifting. Does not own: how the
//! objects are rendered to files (`chart`) or the CRDs (`crds`).
//!
//! The user-settable parts are the [`Values`] strings: [`Values::helm`] puts Helm placeholders in
//! them, [`Values::defaults`] the defaults, so the same builder gives both renderings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, HostPathVolumeSource, KeyToPath, Namespace, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext, Service,
    ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec, TCPSocketAction, Toleration, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use weft::{ca_server, config};

/// The namespace everything lives in (the CA's default, which its node-agent username names too).
pub const NAMESPACE: &str = ca_server::DEFAULT_NAMESPACE;
pub const NODE: &str = "weft-node";
pub const CA: &str = "weft-ca";
/// The ClusterRole every waypoint's ServiceAccount is bound to.
pub const WAYPOINT: &str = weft::ctl::WAYPOINT_CLUSTER_ROLE;
/// The binary's path in the image (deploy/Dockerfile).
pub const BINARY: &str = "/usr/local/bin/weft";
/// Where host directories appear inside the node agent's containers when their own path is taken
/// (the container's /sys/fs/cgroup and /proc are its own namespaces' views).
const HOST_CGROUP: &str = "/host/sys/fs/cgroup";
const HOST_PROC: &str = "/host/proc";
/// The node's CNI directories, mounted at their own paths so `weft cni install` works with the
/// standard locations it defaults to.
const CNI_BIN: &str = config::DEFAULT_CNI_BIN_DIR;
const CNI_CONF: &str = config::DEFAULT_CNI_CONF_DIR;
/// Istio's lifetime for the projected `istio-ca` token; the kubelet refreshes it at 80%.
const TOKEN_EXPIRATION_SECS: i64 = 43200;
const PART_OF: &str = "weft";

/// One user-settable value: its path under `.Values`, default and documentation (values.yaml).
pub struct ValueDef {
    pub path: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

/// Every chart value, in values.yaml order. Only values that map to something real.
pub const VALUES: [ValueDef; 8] = [
    ValueDef {
        path: "trustDomain",
        default: config::DEFAULT_TRUST_DOMAIN,
        doc: "SPIFFE trust domain of workload identities (spiffe://<trustDomain>/ns/<ns>/sa/<sa>); node agents and the CA must agree.",
    },
    ValueDef {
        path: "image.repository",
        default: "weft",
        doc: "No public image is published: build deploy/Dockerfile, push it, and set this (kind-e2e loads weft:<tag> into kind).",
    },
    ValueDef { path: "image.tag", default: env!("CARGO_PKG_VERSION"), doc: "Image tag." },
    ValueDef { path: "image.pullPolicy", default: "IfNotPresent", doc: "Always, IfNotPresent or Never." },
    ValueDef {
        path: "logLevel",
        default: "info",
        doc: "RUST_LOG filter of every weft container, e.g. info or info,weft::policy=debug.",
    },
    ValueDef {
        path: "waypoint.enabled",
        default: "false",
        doc: "Also deploy one waypoint (what `weft ctl waypoint apply -n <namespace> --name <name>` creates); label namespaces or services istio.io/use-waypoint=<name> to use it. Install the Gateway API CRDs first.",
    },
    ValueDef { path: "waypoint.namespace", default: "default", doc: "Namespace of the waypoint (must exist)." },
    ValueDef {
        path: "waypoint.name",
        default: weft::ctl::DEFAULT_WAYPOINT_NAME,
        doc: "Name of its Gateway, Service, ServiceAccount and Deployment.",
    },
];

/// Values that are booleans in values.yaml (the rest are strings).
pub const BOOLEAN_VALUES: [&str; 1] = ["waypoint.enabled"];

/// The templated strings the objects are built with.
#[derive(Debug, Clone)]
pub struct Values {
    pub trust_domain: String,
    /// `repository:tag`.
    pub image: String,
    pub pull_policy: String,
    pub log_level: String,
    pub waypoint_namespace: String,
    pub waypoint_name: String,
}

impl Values {
    /// Helm placeholders (`{{ .Values.x }}`), rendered by Helm.
    pub fn helm() -> Self {
        Self::from(|path| format!("{{{{ .Values.{path} }}}}"))
    }

    /// The defaults, as the plain manifests carry them.
    pub fn defaults() -> Self {
        Self::from(|path| {
            VALUES.iter().find(|v| v.path == path).map(|v| v.default.to_owned()).expect("every value has a default")
        })
    }

    fn from(value: impl Fn(&str) -> String) -> Self {
        Self {
            trust_domain: value("trustDomain"),
            image: format!("{}:{}", value("image.repository"), value("image.tag")),
            pull_policy: value("image.pullPolicy"),
            log_level: value("logLevel"),
            waypoint_namespace: value("waypoint.namespace"),
            waypoint_name: value("waypoint.name"),
        }
    }
}

/// One object, serialized, and the chart template file it belongs to.
pub struct Doc {
    pub template: &'static str,
    pub yaml: String,
}

fn doc<T: Serialize>(template: &'static str, object: &T) -> Result<Doc> {
    Ok(Doc { template, yaml: serde_yaml_ng::to_string(object).context("serializing a manifest")? })
}

/// Every object of the install, in apply order (namespace, identities and permissions, workloads).
pub fn objects(v: &Values) -> Result<Vec<Doc>> {
    let w = Wiring::from_agent()?;
    Ok(vec![
        doc("namespace.yaml", &namespace())?,
        doc("node.yaml", &service_account(NODE))?,
        doc("node.yaml", &node_cluster_role())?,
        doc("node.yaml", &cluster_role_binding(NODE))?,
        doc("node.yaml", &node_role())?,
        doc("node.yaml", &role_binding(NODE))?,
        doc("node.yaml", &node_daemon_set(v, &w))?,
        doc("ca.yaml", &service_account(CA))?,
        doc("ca.yaml", &ca_cluster_role())?,
        doc("ca.yaml", &cluster_role_binding(CA))?,
        doc("ca.yaml", &ca_role())?,
        doc("ca.yaml", &role_binding(CA))?,
        doc("ca.yaml", &ca_deployment(v, &w))?,
        doc("ca.yaml", &ca_service(&w))?,
        doc("waypoint.yaml", &waypoint_cluster_role())?,
    ])
}

/// The optional waypoint (chart value `waypoint.enabled`): exactly the objects `weft ctl waypoint
/// apply` creates, with the chart's image, pull policy and log level. Not in the plain manifests.
pub fn waypoint_objects(v: &Values) -> Result<Vec<Doc>> {
    let w = weft::ctl::Waypoint {
        namespace: v.waypoint_namespace.clone(),
        name: v.waypoint_name.clone(),
        image: v.image.clone(),
        trust_domain: v.trust_domain.clone(),
    };
    let mut o = w.objects(false);
    for c in o.deployment.spec.iter_mut().flat_map(|s| s.template.spec.iter_mut()).flat_map(|p| p.containers.iter_mut())
    {
        c.image_pull_policy = Some(v.pull_policy.clone());
        c.env.get_or_insert_with(Vec::new).push(env("RUST_LOG", &v.log_level));
    }
    const T: &str = "waypoint-instance.yaml";
    Ok(vec![
        doc(T, &o.service_account)?,
        doc(T, &o.cluster_role_binding)?,
        doc(T, &o.gateway)?,
        doc(T, &o.deployment)?,
        doc(T, &o.service)?,
    ])
}

/// The agent's defaults the manifests must agree with, checked once.
struct Wiring {
    ready_port: i32,
    metrics_port: i32,
    ca_port: i32,
    /// Directory and file of the projected token `weft node` reads.
    token_dir: String,
    token_file: String,
    /// Directory and file of the mesh root `weft node` reads (the CA's ConfigMap, mounted).
    root_dir: String,
    root_file: String,
    /// Host directory shared with the CNI plugin (run by the container runtime on the host): the
    /// agent's socket is there, at the path plugin and agent both default to, so neither needs a flag.
    cni_socket_dir: String,
    /// Where the runtime's named network namespaces are (pods' netns), as the agent reads them.
    netns_dir: String,
}

impl Wiring {
    fn from_agent() -> Result<Self> {
        let port = |addr: &str| -> Result<i32> {
            Ok(i32::from(addr.parse::<SocketAddr>().with_context(|| format!("agent default address {addr}"))?.port()))
        };
        let split = |path: &str| -> Result<(String, String)> {
            let p = Path::new(path);
            match (p.parent().and_then(|d| d.to_str()), p.file_name().and_then(|f| f.to_str())) {
                (Some(dir), Some(file)) if !dir.is_empty() => Ok((dir.to_owned(), file.to_owned())),
                _ => bail!("agent default path {path:?} has no directory and file name"),
            }
        };
        // The node agent's username and the CA's Service name are spelled out in the agent's
        // defaults; the objects below must carry exactly those names.
        let node_user = format!("system:serviceaccount:{NAMESPACE}:{NODE}");
        if ca_server::DEFAULT_NODE_AGENT != node_user {
            bail!(
                "weft ca's default node agent is {:?}, the DaemonSet runs as {node_user:?}",
                ca_server::DEFAULT_NODE_AGENT
            );
        }
        let ca_host = format!("https://{CA}.{NAMESPACE}.svc:");
        let ca_port = port(ca_server::DEFAULT_LISTEN)?;
        if config::DEFAULT_CA_ADDRESS != format!("{ca_host}{ca_port}") {
            bail!(
                "weft node's default CA address {} is not the Service {ca_host}{ca_port}",
                config::DEFAULT_CA_ADDRESS
            );
        }
        let (token_dir, token_file) = split(config::DEFAULT_TOKEN_PATH)?;
        let (root_dir, root_file) = split(config::DEFAULT_CA_ROOT_CERT)?;
        let (cni_socket_dir, _) = split(weft::cni::DEFAULT_SOCKET)?;
        Ok(Self {
            ready_port: port(config::DEFAULT_READY_ADDR)?,
            metrics_port: port(config::DEFAULT_METRICS_ADDR)?,
            ca_port,
            token_dir,
            token_file,
            root_dir,
            root_file,
            cni_socket_dir,
            netns_dir: weft::netns::NAMED_NETNS_DIR.to_owned(),
        })
    }
}

fn labels(name: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), name.to_owned()),
        ("app.kubernetes.io/component".to_owned(), component.to_owned()),
        ("app.kubernetes.io/part-of".to_owned(), PART_OF.to_owned()),
    ])
}

fn selector(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/name".to_owned(), name.to_owned())])
}

fn meta(name: &str, namespaced: bool, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespaced.then(|| NAMESPACE.to_owned()),
        labels: Some(labels(name, component)),
        ..Default::default()
    }
}

fn component(name: &str) -> &'static str {
    if name == NODE { "node-agent" } else { "ca" }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn namespace() -> Namespace {
    let mut labels = BTreeMap::from([("app.kubernetes.io/part-of".to_owned(), PART_OF.to_owned())]);
    // The node agent is privileged by nature; namespaces default to a stricter Pod Security level
    // on many clusters, which would reject the DaemonSet.
    labels.insert("pod-security.kubernetes.io/enforce".to_owned(), "privileged".to_owned());
    Namespace {
        metadata: ObjectMeta { name: Some(NAMESPACE.to_owned()), labels: Some(labels), ..Default::default() },
        ..Default::default()
    }
}

fn service_account(name: &str) -> ServiceAccount {
    ServiceAccount { metadata: meta(name, true, component(name)), ..Default::default() }
}

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        ..Default::default()
    }
}

const READ: [&str; 3] = ["get", "list", "watch"];

/// Discovery reads (reflectors list and watch; `get` for one-off lookups) of everything the node
/// agent honours, reading Nodes (on SIGTERM: does the DaemonSet still select this node, or is weft
/// being taken off it), and writing Events on bad objects (kube-runtime's recorder uses
/// events.k8s.io/v1 and patches repeated events into a series). No Secrets, no writes to
/// configuration.
fn node_cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(NODE, false, component(NODE)),
        rules: Some(vec![
            rule("", &["pods", "namespaces", "services"], &READ),
            rule("", &["nodes"], &["get"]),
            rule("discovery.k8s.io", &["endpointslices"], &READ),
            rule("security.istio.io", &["authorizationpolicies", "peerauthentications"], &READ),
            rule("networking.istio.io", &["virtualservices", "destinationrules", "envoyfilters"], &READ),
            rule("gateway.networking.k8s.io", &["gateways", "httproutes", "grpcroutes"], &READ),
            rule("events.k8s.io", &["events"], &["create", "patch"]),
        ]),
        ..Default::default()
    }
}

/// What a waypoint (`weft waypoint`) reads to route and authorize (the node agent's discovery
/// reads), plus writing HTTPRoute status (whether it accepted each route) and Events. Not bound
/// here: `weft ctl waypoint apply` (or the chart's waypoint values) binds it to each waypoint's own
/// ServiceAccount, so the waypoint's certificate and permissions belong to that namespace.
fn waypoint_cluster_role() -> ClusterRole {
    let mut rules = node_cluster_role().rules.unwrap_or_default();
    // Nodes are the node agent's own business (its uninstall check).
    rules.retain(|r| r.resources.as_deref() != Some(&["nodes".to_owned()][..]));
    rules.insert(
        rules.len() - 1,
        rule("gateway.networking.k8s.io", &["httproutes/status"], &["get", "patch", "update"]),
    );
    ClusterRole { metadata: meta(WAYPOINT, false, "waypoint"), rules: Some(rules), ..Default::default() }
}

/// What `weft ca` calls cluster-wide: TokenReview for callers and the pods a caller asks about (get
/// by name, list by `spec.nodeName`) (ca_server::kube); the root-certificate ConfigMap in every
/// namespace, by server-side apply as namespaces appear (ca_server::publish, like Istio's
/// `istio-ca-root-cert`). Reads and patches of ConfigMaps are limited to that name; `create` cannot
/// be limited by name, and a server-side apply that creates is authorized as `create` too.
fn ca_cluster_role() -> ClusterRole {
    let root_cm = PolicyRule {
        resource_names: Some(vec![ca_server::DEFAULT_ROOT_CONFIGMAP.to_owned()]),
        ..rule("", &["configmaps"], &["get", "patch"])
    };
    ClusterRole {
        metadata: meta(CA, false, component(CA)),
        rules: Some(vec![
            rule("authentication.k8s.io", &["tokenreviews"], &["create"]),
            rule("", &["pods"], &["get", "list"]),
            rule("", &["namespaces"], &["list", "watch"]),
            root_cm,
            rule("", &["configmaps"], &["create"]),
        ]),
        ..Default::default()
    }
}

/// What `weft ca` does in its own namespace (ca_server::root): read or create the root Secret. Reads
/// are limited to that name; `create` cannot be limited by name for a POST. (The root-certificate
/// ConfigMap, this namespace's included, is in the ClusterRole.)
fn ca_role() -> Role {
    let named = |resource: &str, name: &str, verbs: &[&str]| PolicyRule {
        resource_names: Some(vec![name.to_owned()]),
        ..rule("", &[resource], verbs)
    };
    Role {
        metadata: meta(CA, true, component(CA)),
        rules: Some(vec![
            named("secrets", ca_server::DEFAULT_ROOT_SECRET, &["get"]),
            rule("", &["secrets"], &["create"]),
        ]),
    }
}

/// Reading its own DaemonSet, and nothing else of its namespace: on SIGTERM the node agent tells an
/// uninstall (DaemonSet gone or being deleted: remove the CNI plugin and eBPF programs) from a
/// restart or upgrade (leave them), as Istio's CNI agent does. Its own pod it reads through the
/// ClusterRole.
fn node_role() -> Role {
    Role {
        metadata: meta(NODE, true, component(NODE)),
        rules: Some(vec![PolicyRule {
            resource_names: Some(vec![NODE.to_owned()]),
            ..rule("apps", &["daemonsets"], &["get"])
        }]),
    }
}

fn subject(name: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".to_owned(),
        name: name.to_owned(),
        namespace: Some(NAMESPACE.to_owned()),
        ..Default::default()
    }
}

fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef { api_group: Some("rbac.authorization.k8s.io".to_owned()), kind: kind.to_owned(), name: name.to_owned() }
}

fn cluster_role_binding(name: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(name, false, component(name)),
        role_ref: role_ref("ClusterRole", name),
        subjects: Some(vec![subject(name)]),
    }
}

fn role_binding(name: &str) -> RoleBinding {
    RoleBinding {
        metadata: meta(name, true, component(name)),
        role_ref: role_ref("Role", name),
        subjects: Some(vec![subject(name)]),
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.to_owned()), ..Default::default() }
}

fn env_field(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: field.to_owned(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn host_path(name: &str, path: &str, type_: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        host_path: Some(HostPathVolumeSource { path: path.to_owned(), type_: Some(type_.to_owned()) }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool, propagation: Option<&str>) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        mount_propagation: propagation.map(str::to_owned),
        ..Default::default()
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

fn requests(cpu: &str, memory: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ])),
        ..Default::default()
    }
}

/// `weft node` on every node, plus the CNI plugin install as an init container.
///
/// hostNetwork: the agent's own sockets (15020/15021, the CA client) live on the node, and it enters
/// pods' network namespaces itself. hostPID + the host's /proc: finding the netns of pods that were
/// running before their namespace was enrolled. /sys/fs/bpf Bidirectional: pins outlive the pod, so
/// a restarted agent re-adopts them and enrolled pods fail closed meanwhile. The host's cgroup2 root
/// (Kubernetes 1.36 requires cgroup v2, mounted at /sys/fs/cgroup): the container's own
/// /sys/fs/cgroup is its private cgroup namespace, and programs attached there would see no pod.
/// /var/run/netns HostToContainer: netns the runtime creates after the agent started must appear.
///
/// The CNI install is an init container, not a long-running sidecar: the chained config must stay in
/// place while the agent restarts or is upgraded, so a pod created meanwhile waits in CNI ADD for
/// the agent instead of starting unenrolled.
fn node_daemon_set(v: &Values, w: &Wiring) -> DaemonSet {
    let install_cni = Container {
        name: "install-cni".to_owned(),
        image: Some(v.image.clone()),
        image_pull_policy: Some(v.pull_policy.clone()),
        command: Some(strings(&[BINARY, "cni", "install"])),
        env: Some(vec![env("RUST_LOG", &v.log_level)]),
        // As Istio's install-cni: on SELinux hosts writing the node's CNI directories needs it.
        security_context: Some(SecurityContext { privileged: Some(true), ..Default::default() }),
        volume_mounts: Some(vec![mount("cni-bin", CNI_BIN, false, None), mount("cni-conf", CNI_CONF, false, None)]),
        ..Default::default()
    };
    let node = Container {
        name: "node".to_owned(),
        image: Some(v.image.clone()),
        image_pull_policy: Some(v.pull_policy.clone()),
        command: Some(strings(&[BINARY, "node"])),
        args: Some(strings(&["--cgroup", HOST_CGROUP])),
        env: Some(vec![
            env_field(config::NODE_NAME_ENV, "spec.nodeName"),
            env_field(config::POD_NAME_ENV, "metadata.name"),
            env_field(config::POD_NAMESPACE_ENV, "metadata.namespace"),
            env(config::TRUST_DOMAIN_ENV, &v.trust_domain),
            env("RUST_LOG", &v.log_level),
        ]),
        ports: Some(vec![port("http-monitoring", w.metrics_port), port("health", w.ready_port)]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".to_owned()),
                port: IntOrString::Int(w.ready_port),
                ..Default::default()
            }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        security_context: Some(SecurityContext { privileged: Some(true), ..Default::default() }),
        resources: Some(requests("100m", "64Mi")),
        volume_mounts: Some(vec![
            mount("bpffs", "/sys/fs/bpf", false, Some("Bidirectional")),
            mount("cgroup", HOST_CGROUP, true, None),
            mount("netns", &w.netns_dir, true, Some("HostToContainer")),
            mount("host-proc", HOST_PROC, true, None),
            mount("cni-socket", &w.cni_socket_dir, false, None),
            mount("istio-token", &w.token_dir, true, None),
            mount("ca-root", &w.root_dir, true, None),
            // To remove the plugin `install-cni` put there, when weft is uninstalled.
            mount("cni-bin", CNI_BIN, false, None),
            mount("cni-conf", CNI_CONF, false, None),
        ]),
        ..Default::default()
    };
    let volumes = vec![
        host_path("bpffs", "/sys/fs/bpf", "Directory"),
        host_path("cgroup", "/sys/fs/cgroup", "Directory"),
        host_path("netns", &w.netns_dir, "DirectoryOrCreate"),
        host_path("host-proc", "/proc", "Directory"),
        host_path("cni-socket", &w.cni_socket_dir, "DirectoryOrCreate"),
        host_path("cni-bin", CNI_BIN, "DirectoryOrCreate"),
        host_path("cni-conf", CNI_CONF, "DirectoryOrCreate"),
        Volume {
            name: "istio-token".to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(ca_server::DEFAULT_AUDIENCE.to_owned()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECS),
                        path: w.token_file.clone(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        // Published by `weft ca` on its first start; until then the kubelet holds the pod back.
        Volume {
            name: "ca-root".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: ca_server::DEFAULT_ROOT_CONFIGMAP.to_owned(),
                items: Some(vec![KeyToPath {
                    key: ca_server::CONFIGMAP_ROOT_KEY.to_owned(),
                    path: w.root_file.clone(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    let pod_labels = labels(NODE, component(NODE));
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), w.metrics_port.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ]);
    DaemonSet {
        metadata: meta(NODE, true, component(NODE)),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector { match_labels: Some(selector(NODE)), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(NODE.to_owned()),
                    host_network: Some(true),
                    host_pid: Some(true),
                    // With hostNetwork, ClusterFirst would fall back to the node's resolver and the
                    // CA's Service name would not resolve.
                    dns_policy: Some("ClusterFirstWithHostNet".to_owned()),
                    priority_class_name: Some("system-node-critical".to_owned()),
                    // Every node, tainted or not: an enrolled pod on a node without its agent fails closed.
                    tolerations: Some(vec![Toleration { operator: Some("Exists".to_owned()), ..Default::default() }]),
                    init_containers: Some(vec![install_cni]),
                    containers: vec![node],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `weft ca`: unprivileged, read-only root filesystem (the root passes through a private temp dir, so
/// /tmp is an emptyDir).
fn ca_deployment(v: &Values, w: &Wiring) -> Deployment {
    let mut args = strings(&[
        "--listen",
        ca_server::DEFAULT_LISTEN,
        "--root-secret",
        ca_server::DEFAULT_ROOT_SECRET,
        "--root-configmap",
        ca_server::DEFAULT_ROOT_CONFIGMAP,
        "--node-agent",
        ca_server::DEFAULT_NODE_AGENT,
        "--audience",
        ca_server::DEFAULT_AUDIENCE,
    ]);
    for name in ca_server::DEFAULT_DNS_NAMES {
        args.extend(["--dns-name".to_owned(), name.to_owned()]);
    }
    let ca = Container {
        name: "ca".to_owned(),
        image: Some(v.image.clone()),
        image_pull_policy: Some(v.pull_policy.clone()),
        command: Some(strings(&[BINARY, "ca"])),
        args: Some(args),
        env: Some(vec![
            env_field(ca_server::POD_NAMESPACE_ENV, "metadata.namespace"),
            env(config::TRUST_DOMAIN_ENV, &v.trust_domain),
            env("RUST_LOG", &v.log_level),
        ]),
        ports: Some(vec![port("grpc-ca", w.ca_port)]),
        // The CA has no HTTP health endpoint; accepting TCP means the root is loaded and TLS is up.
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(w.ca_port), ..Default::default() }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(strings(&["ALL"])), ..Default::default() }),
            ..Default::default()
        }),
        resources: Some(requests("10m", "32Mi")),
        volume_mounts: Some(vec![mount("tmp", "/tmp", false, None)]),
        ..Default::default()
    };
    Deployment {
        metadata: meta(CA, true, component(CA)),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector { match_labels: Some(selector(CA)), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels(CA, component(CA))), ..Default::default() }),
                spec: Some(PodSpec {
                    service_account_name: Some(CA.to_owned()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        // distroless "nonroot".
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![ca],
                    volumes: Some(vec![Volume {
                        name: "tmp".to_owned(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ca_service(w: &Wiring) -> Service {
    Service {
        metadata: meta(CA, true, component(CA)),
        spec: Some(ServiceSpec {
            selector: Some(selector(CA)),
            ports: Some(vec![ServicePort {
                name: Some("grpc-ca".to_owned()),
                port: w.ca_port,
                target_port: Some(IntOrString::Int(w.ca_port)),
                protocol: Some("TCP".to_owned()),
                app_protocol: Some("grpc".to_owned()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
