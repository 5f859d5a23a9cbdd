//! `weft ctl`: operator commands against a cluster. For now `weft ctl waypoint apply`, the
//! counterpart of `istioctl waypoint apply`: a waypoint for a namespace, as the objects a cluster
//! needs to run it.
//!
//! Owns: which objects make a waypoint (Gateway of class `weft-waypoint` with the HBONE listener,
//! ServiceAccount, Deployment running `weft waypoint`, Service on 15008, the binding of its
//! ServiceAccount to the `weft-waypoint` ClusterRole, the copy of the mesh root certificate in its
//! namespace) and enrolling a namespace (`istio.io/use-waypoint`). Istio's istiod deploys the
//! Deployment and Service from the Gateway; weft has no controller, so they are written out here.
//! Does not own: the waypoint's behaviour (`waypoint`), its flags (`config::WaypointArgs`), or the
//! ClusterRole's rules (generated into deploy/ by `cargo xtask codegen`).
//!
//! Without `--kubeconfig` (or with `--dry-run`) the objects are printed as YAML for `kubectl apply`;
//! with one they are server-side applied with field manager [`FIELD_MANAGER`].

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, HTTPGetAction, Namespace, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, Service, ServiceAccount, ServiceAccountTokenProjection, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};

use crate::crd::gateway::{Gateway, GatewaySpec, Listener, WAYPOINT_CLASS, WAYPOINT_PORT, WAYPOINT_PROTOCOL};
use crate::state::USE_WAYPOINT_LABEL;
use crate::{ca_server, config};

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "weft-ctl";
/// The ClusterRole (in deploy/) each waypoint's ServiceAccount is bound to.
pub const WAYPOINT_CLUSTER_ROLE: &str = "weft-waypoint";
/// `istioctl waypoint apply`'s default name.
pub const DEFAULT_WAYPOINT_NAME: &str = "waypoint";
/// The chart's default image (`image.repository:image.tag`).
pub const DEFAULT_IMAGE: &str = concat!("weft:", env!("CARGO_PKG_VERSION"));
/// Label the Gateway API puts on what implements a Gateway; selects the waypoint's pods.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Istio's label saying which traffic a waypoint serves (`service`, `workload`, `all`, `none`).
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The binary's path in the image (deploy/Dockerfile).
const BINARY: &str = "/usr/local/bin/weft";
/// Istio's lifetime for the projected `istio-ca` token; the kubelet refreshes it at 80%.
const TOKEN_EXPIRATION_SECS: i64 = 43200;

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// Waypoints (L7 proxies for a namespace's services), as `istioctl waypoint` manages them.
    Waypoint {
        #[command(subcommand)]
        action: WaypointAction,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum WaypointAction {
    /// Creates (or updates) a waypoint: Gateway, ServiceAccount, Deployment, Service, RBAC binding.
    Apply(WaypointApplyArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct WaypointApplyArgs {
    /// Namespace of the waypoint.
    #[arg(short = 'n', long)]
    pub namespace: String,
    #[arg(long, default_value = DEFAULT_WAYPOINT_NAME)]
    pub name: String,
    /// Also label the namespace `istio.io/use-waypoint=NAME`, so its services use the waypoint.
    #[arg(long)]
    pub enroll_namespace: bool,
    /// Print the objects instead of applying them (the default without --kubeconfig).
    #[arg(long)]
    pub dry_run: bool,
    /// Apply to the cluster of this kubeconfig (server-side apply).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
    #[arg(long, env = config::TRUST_DOMAIN_ENV, default_value = config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{what} {name:?} is not a valid Kubernetes name (lowercase letters, digits and '-', at most 63)")]
    BadName { what: &'static str, name: String },
    #[error("cannot serialize {0}: {1}")]
    Serialize(&'static str, serde_yaml_ng::Error),
    #[error("cannot write to stdout: {0}")]
    Stdout(#[from] std::io::Error),
    #[error(transparent)]
    Client(#[from] crate::discovery::kube::KubeError),
    #[error("applying {what}: {source}; check that the namespace exists and that you may create it")]
    Apply {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// One waypoint to create.
#[derive(Debug, Clone)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub image: String,
    pub trust_domain: String,
}

/// What makes a waypoint, in apply order.
#[derive(Debug, Clone)]
pub struct WaypointObjects {
    pub service_account: ServiceAccount,
    pub cluster_role_binding: ClusterRoleBinding,
    pub gateway: Gateway,
    pub deployment: Deployment,
    pub service: Service,
    /// `Some` with `--enroll-namespace`: only the label, so applying it leaves the rest alone.
    pub namespace: Option<Namespace>,
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl Waypoint {
    pub fn new(args: &WaypointApplyArgs) -> Result<Self, CtlError> {
        for (what, name) in [("namespace", &args.namespace), ("waypoint name", &args.name)] {
            if !is_dns_label(name) {
                return Err(CtlError::BadName { what, name: name.clone() });
            }
        }
        Ok(Waypoint {
            namespace: args.namespace.clone(),
            name: args.name.clone(),
            image: args.image.clone(),
            trust_domain: args.trust_domain.clone(),
        })
    }

    fn meta(&self, namespaced: bool) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: namespaced.then(|| self.namespace.clone()),
            labels: Some(self.labels()),
            ..Default::default()
        }
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (GATEWAY_NAME_LABEL.to_owned(), self.name.clone()),
            ("app.kubernetes.io/name".to_owned(), self.name.clone()),
            ("app.kubernetes.io/component".to_owned(), "waypoint".to_owned()),
            ("app.kubernetes.io/managed-by".to_owned(), FIELD_MANAGER.to_owned()),
        ])
    }

    fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), self.name.clone())])
    }

    /// Name of the ClusterRoleBinding (cluster-scoped, so it carries the namespace).
    pub fn binding_name(&self) -> String {
        format!("{WAYPOINT_CLUSTER_ROLE}-{}-{}", self.namespace, self.name)
    }

    pub fn objects(&self, enroll_namespace: bool) -> WaypointObjects {
        let service_account = ServiceAccount { metadata: self.meta(true), ..Default::default() };
        let cluster_role_binding = ClusterRoleBinding {
            metadata: ObjectMeta { name: Some(self.binding_name()), labels: Some(self.labels()), ..Default::default() },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".to_owned()),
                kind: "ClusterRole".to_owned(),
                name: WAYPOINT_CLUSTER_ROLE.to_owned(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".to_owned(),
                name: self.name.clone(),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            }]),
        };
        let mut gateway = Gateway::new(
            &self.name,
            GatewaySpec {
                gateway_class_name: WAYPOINT_CLASS.to_owned(),
                listeners: vec![Listener {
                    name: "mesh".to_owned(),
                    port: i32::from(WAYPOINT_PORT),
                    protocol: WAYPOINT_PROTOCOL.to_owned(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        gateway.metadata.namespace = Some(self.namespace.clone());
        gateway.metadata.labels = Some(BTreeMap::from([(WAYPOINT_FOR_LABEL.to_owned(), "service".to_owned())]));
        let service = Service {
            metadata: self.meta(true),
            spec: Some(ServiceSpec {
                selector: Some(self.selector()),
                ports: Some(vec![ServicePort {
                    name: Some("mesh".to_owned()),
                    port: i32::from(WAYPOINT_PORT),
                    target_port: Some(IntOrString::Int(i32::from(WAYPOINT_PORT))),
                    protocol: Some("TCP".to_owned()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let namespace = enroll_namespace.then(|| Namespace {
            metadata: ObjectMeta {
                name: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(USE_WAYPOINT_LABEL.to_owned(), self.name.clone())])),
                ..Default::default()
            },
            ..Default::default()
        });
        WaypointObjects {
            service_account,
            cluster_role_binding,
            gateway,
            deployment: self.deployment(),
            service,
            namespace,
        }
    }

    fn deployment(&self) -> Deployment {
        let dir_and_file = |path: &str| match path.rsplit_once('/') {
            Some((dir, file)) => (dir.to_owned(), file.to_owned()),
            None => (".".to_owned(), path.to_owned()),
        };
        let (token_dir, token_file) = dir_and_file(config::DEFAULT_TOKEN_PATH);
        let (root_dir, root_file) = dir_and_file(config::DEFAULT_CA_ROOT_CERT);
        let port = |name: &str, addr: &str| ContainerPort {
            name: Some(name.to_owned()),
            container_port: addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_default(),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        };
        let ready_port =
            i32::from(config::DEFAULT_READY_ADDR.parse::<std::net::SocketAddr>().map_or(15021, |a| a.port()));
        let container = Container {
            name: "waypoint".to_owned(),
            image: Some(self.image.clone()),
            command: Some(vec![BINARY.to_owned()]),
            args: Some(
                ["waypoint", "--namespace", &self.namespace, "--name", &self.name]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
            ),
            env: Some(vec![EnvVar {
                name: config::TRUST_DOMAIN_ENV.to_owned(),
                value: Some(self.trust_domain.clone()),
                ..Default::default()
            }]),
            ports: Some(vec![
                ContainerPort {
                    name: Some("hbone".to_owned()),
                    container_port: i32::from(WAYPOINT_PORT),
                    protocol: Some("TCP".to_owned()),
                    ..Default::default()
                },
                port("http-monitoring", config::DEFAULT_METRICS_ADDR),
                port("health", config::DEFAULT_READY_ADDR),
            ]),
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/healthz/ready".to_owned()),
                    port: IntOrString::Int(ready_port),
                    ..Default::default()
                }),
                period_seconds: Some(5),
                ..Default::default()
            }),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "istio-token".to_owned(),
                    mount_path: token_dir,
                    read_only: Some(true),
                    ..Default::default()
                },
                VolumeMount {
                    name: "ca-root".to_owned(),
                    mount_path: root_dir,
                    read_only: Some(true),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let volumes = vec![
            Volume {
                name: "istio-token".to_owned(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(ca_server::DEFAULT_AUDIENCE.to_owned()),
                            expiration_seconds: Some(TOKEN_EXPIRATION_SECS),
                            path: token_file,
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Volume {
                name: "ca-root".to_owned(),
                config_map: Some(ConfigMapVolumeSource {
                    name: ca_server::DEFAULT_ROOT_CONFIGMAP.to_owned(),
                    items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                        key: root_file.clone(),
                        path: root_file,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ];
        Deployment {
            metadata: self.meta(true),
            spec: Some(DeploymentSpec {
                selector: LabelSelector { match_labels: Some(self.selector()), ..Default::default() },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta { labels: Some(self.labels()), ..Default::default() }),
                    spec: Some(PodSpec {
                        service_account_name: Some(self.name.clone()),
                        containers: vec![container],
                        volumes: Some(volumes),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl WaypointObjects {
    /// Multi-document YAML, in apply order, for `kubectl apply --server-side -f -`.
    pub fn to_yaml(&self) -> Result<String, CtlError> {
        let mut docs = vec![
            serde_yaml_ng::to_string(&self.service_account).map_err(|e| CtlError::Serialize("ServiceAccount", e))?,
            serde_yaml_ng::to_string(&self.cluster_role_binding)
                .map_err(|e| CtlError::Serialize("ClusterRoleBinding", e))?,
            serde_yaml_ng::to_string(&self.gateway).map_err(|e| CtlError::Serialize("Gateway", e))?,
            serde_yaml_ng::to_string(&self.deployment).map_err(|e| CtlError::Serialize("Deployment", e))?,
            serde_yaml_ng::to_string(&self.service).map_err(|e| CtlError::Serialize("Service", e))?,
        ];
        if let Some(ns) = &self.namespace {
            docs.push(serde_yaml_ng::to_string(ns).map_err(|e| CtlError::Serialize("Namespace", e))?);
        }
        Ok(docs.join("---\n"))
    }
}

/// Server-side applies every object (forcing ownership of the fields weft-ctl sets), after copying
/// the mesh root certificate ConfigMap into the waypoint's namespace (the CA publishes it only in
/// its own namespace). Returns what was applied, as `Kind ns/name`.
pub async fn apply(client: kube::Client, w: &Waypoint, objects: &WaypointObjects) -> Result<Vec<String>, CtlError> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut done = Vec::new();
    let ns = w.namespace.as_str();
    let root_cm = ca_server::DEFAULT_ROOT_CONFIGMAP;
    if ns != ca_server::DEFAULT_NAMESPACE {
        let source: Api<ConfigMap> = Api::namespaced(client.clone(), ca_server::DEFAULT_NAMESPACE);
        match source.get_opt(root_cm).await {
            Ok(Some(cm)) => {
                let copy = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(root_cm.to_owned()),
                        namespace: Some(ns.to_owned()),
                        labels: Some(w.labels()),
                        ..Default::default()
                    },
                    data: cm.data,
                    ..Default::default()
                };
                apply_one(Api::namespaced(client.clone(), ns), root_cm, &copy, &params, "ConfigMap", &mut done, ns)
                    .await?;
            }
            Ok(None) => tracing::warn!(
                namespace = ca_server::DEFAULT_NAMESPACE,
                configmap = root_cm,
                "the CA's root certificate ConfigMap does not exist yet (is weft ca running?); the waypoint pod \
                 starts once it is copied into its namespace (re-run this command)"
            ),
            Err(e) => {
                tracing::warn!(error = %e, configmap = root_cm, "cannot read the CA's root certificate ConfigMap; copy it into the waypoint's namespace by hand")
            }
        }
    }
    let o = objects;
    let name = w.name.as_str();
    apply_one(Api::namespaced(client.clone(), ns), name, &o.service_account, &params, "ServiceAccount", &mut done, ns)
        .await?;
    let binding = w.binding_name();
    apply_one(
        Api::all(client.clone()),
        &binding,
        &o.cluster_role_binding,
        &params,
        "ClusterRoleBinding",
        &mut done,
        "",
    )
    .await?;
    apply_one(Api::namespaced(client.clone(), ns), name, &o.gateway, &params, "Gateway", &mut done, ns).await?;
    apply_one(Api::namespaced(client.clone(), ns), name, &o.deployment, &params, "Deployment", &mut done, ns).await?;
    apply_one(Api::namespaced(client.clone(), ns), name, &o.service, &params, "Service", &mut done, ns).await?;
    if let Some(n) = &o.namespace {
        apply_one(Api::all(client), ns, n, &params, "Namespace", &mut done, "").await?;
    }
    Ok(done)
}

async fn apply_one<K>(
    api: Api<K>,
    name: &str,
    object: &K,
    params: &PatchParams,
    kind: &'static str,
    done: &mut Vec<String>,
    ns: &str,
) -> Result<(), CtlError>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let what = if ns.is_empty() { format!("{kind} {name}") } else { format!("{kind} {ns}/{name}") };
    api.patch(name, params, &Patch::Apply(object))
        .await
        .map_err(|source| CtlError::Apply { what: what.clone(), source })?;
    tracing::info!(object = %what, "applied");
    done.push(what);
    Ok(())
}

/// `weft ctl …`.
pub async fn run(args: CtlArgs) -> Result<(), CtlError> {
    match args.command {
        CtlCommand::Waypoint { action: WaypointAction::Apply(a) } => {
            let w = Waypoint::new(&a)?;
            let objects = w.objects(a.enroll_namespace);
            match (&a.kubeconfig, a.dry_run) {
                (Some(path), false) => {
                    let client = crate::discovery::kube::client(Some(path)).await?;
                    let done = apply(client, &w, &objects).await?;
                    tracing::info!(namespace = %w.namespace, name = %w.name, objects = done.len(), "waypoint applied");
                }
                _ => std::io::stdout().write_all(objects.to_yaml()?.as_bytes())?,
            }
            Ok(())
        }
    }
}
