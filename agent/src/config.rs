//! The node agent's configuration: command-line flags and environment, parsed and validated once in
//! `main` into one `Config` that everything else receives as `Arc<Config>`.
//!
//! It owns defaults and validation, not the mesh configuration (Pods, Services, policies): that is
//! `discovery`'s input and `state`'s content.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable: this node's name (the DaemonSet sets it from `spec.nodeName`).
pub const NODE_NAME_ENV: &str = "NODE_NAME";
/// Environment variables: the agent's own pod (the DaemonSet sets them from the downward API).
pub const POD_NAME_ENV: &str = "POD_NAME";
pub const POD_NAMESPACE_ENV: &str = "POD_NAMESPACE";
/// The node's CNI directories, where `weft cni install` puts the plugin.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
/// Environment variable: SPIFFE trust domain.
pub const TRUST_DOMAIN_ENV: &str = "TRUST_DOMAIN";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Istio's root namespace: policies there apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/weft";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/weft";
pub const DEFAULT_CGROUP: &str = "/sys/fs/cgroup/unified";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READY_ADDR: &str = "0.0.0.0:15021";
/// Workload certificate lifetime (Istio's default is 24 h; rotated at half-life).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long in-flight connections get to finish after SIGTERM (Istio's terminationDrainDuration).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub const DEFAULT_CA_ADDRESS: &str = "https://weft-ca.weft-system.svc:15012";
pub const DEFAULT_CA_ROOT_CERT: &str = "/var/run/secrets/weft-ca/root-cert.pem";
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";
/// Unix socket where the CNI plugin hands new pods' network namespaces to the agent.
pub const DEFAULT_CNI_SOCKET: &str = "/var/run/weft/cni.sock";

/// Where the mesh configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Local mode: one YAML file.
    File(PathBuf),
    /// Cluster mode: the Kubernetes API (a kubeconfig, or in-cluster when `None`).
    Kube { kubeconfig: Option<PathBuf> },
}

/// Who signs workload certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaMode {
    /// Local mode: an in-process CA whose root lives in `state_dir`.
    Local,
    /// Cluster mode: `weft ca` over gRPC.
    Remote { address: String, root_cert: PathBuf, token_path: PathBuf },
}

/// How enrolled pods' traffic reaches the in-pod listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedirectMode {
    /// eBPF: cgroup connect4/6 + sockops for outbound, sk_lookup for inbound (the default).
    Ebpf,
    /// Someone else (iptables REDIRECT) steers outbound traffic to 15001; the agent only reads
    /// `SO_ORIGINAL_DST`. Used to measure the eBPF path against the classic one.
    Iptables,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where configuration and certificates come from: flags `weft node` and `weft waypoint` share.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Local mode: a multi-document YAML file of Namespaces, ServiceAccounts, Pods, Services,
    /// Istio policies and routing (Gateway, HTTPRoute, VirtualService, DestinationRule,
    /// EnvoyFilter); node agents and waypoints read the same file. Reloaded on SIGHUP and when the
    /// file changes. Without it: cluster mode, configuration from the Kubernetes API and
    /// certificates from `weft ca`.
    #[arg(long, value_name = "MESH_YAML")]
    pub config: Option<PathBuf>,
    /// Cluster mode: kubeconfig to use instead of the in-cluster ServiceAccount (or $KUBECONFIG).
    #[arg(long, conflicts_with = "config")]
    pub kubeconfig: Option<PathBuf>,
    /// Cluster mode: the CA's gRPC address.
    #[arg(long, default_value = DEFAULT_CA_ADDRESS)]
    pub ca_address: String,
    /// Cluster mode: the name the CA's TLS certificate must carry, when it differs from the host
    /// of --ca-address (e.g. dialling the CA by IP).
    #[arg(long)]
    pub ca_server_name: Option<String>,
    /// Cluster mode: PEM file with the mesh root certificate(s) the CA's TLS certificate chains to
    /// (the `weft-ca-root-cert` ConfigMap, mounted).
    #[arg(long, default_value = DEFAULT_CA_ROOT_CERT)]
    pub ca_root_cert: PathBuf,
    /// Cluster mode: projected ServiceAccount token (audience `istio-ca`) presented to the CA.
    #[arg(long, default_value = DEFAULT_TOKEN_PATH)]
    pub token_path: PathBuf,
    #[arg(long, env = TRUST_DOMAIN_ENV, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Local mode: where the local CA keeps its root key and certificate (node agents and
    /// waypoints of one mesh share the directory).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// The process's own endpoints and runtime: flags `weft node` and `weft waypoint` share.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Admin endpoint (config dump, certificates); keep it on localhost.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Prometheus `/metrics`.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// `/healthz/ready`: 200 once the first configuration is applied (a node agent: and every
    /// captured pod is enrolled).
    #[arg(long, default_value = DEFAULT_READY_ADDR)]
    pub ready_addr: SocketAddr,
    /// Workload certificate lifetime in seconds.
    #[arg(long, default_value_t = DEFAULT_CERT_TTL.as_secs())]
    pub cert_ttl_secs: u64,
    /// Seconds in-flight connections get to finish after SIGTERM.
    #[arg(long, default_value_t = DEFAULT_DRAIN_TIMEOUT.as_secs())]
    pub drain_timeout_secs: u64,
    /// Tokio worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// `weft node` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Cluster mode: the unix socket the `weft-cni` plugin talks to.
    #[arg(long, default_value = DEFAULT_CNI_SOCKET)]
    pub cni_socket: PathBuf,
    /// This node's name; pods with another `spec.nodeName` are not served here.
    #[arg(long, env = NODE_NAME_ENV, default_value = "local")]
    pub node_name: String,
    /// Cluster mode: the agent's own pod. On SIGTERM the agent looks up the DaemonSet owning it:
    /// when that is gone or being deleted, weft is being uninstalled and the agent removes its CNI
    /// plugin and eBPF programs from the node; otherwise (restart, upgrade) it leaves them.
    /// Without it nothing is ever removed.
    #[arg(long, env = POD_NAME_ENV, requires = "pod_namespace")]
    pub pod_name: Option<String>,
    #[arg(long, env = POD_NAMESPACE_ENV)]
    pub pod_namespace: Option<String>,
    /// Cluster mode: the CNI configuration directory `weft cni install` chained the plugin into.
    #[arg(long, default_value = DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// Cluster mode: the CNI binary directory `weft cni install` copied the plugin to.
    #[arg(long, default_value = DEFAULT_CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    /// bpffs directory for pinned programs, maps and links (survive an agent restart).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// cgroup v2 directory the connect/sockops programs attach to.
    #[arg(long, default_value = DEFAULT_CGROUP)]
    pub cgroup: PathBuf,
    #[arg(long, value_enum, default_value = "ebpf")]
    pub redirect: RedirectMode,
    /// Log an eBPF event for every redirected connection (drops are always logged). Costs a
    /// ring-buffer record per connection.
    #[arg(long)]
    pub bpf_connection_events: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The validated configuration of `weft node`.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub ca: CaMode,
    /// Cluster mode: TLS name expected of the CA instead of the --ca-address host.
    pub ca_server_name: Option<String>,
    /// Cluster mode: where the CNI plugin reaches the agent.
    pub cni_socket: PathBuf,
    /// Cluster mode: the agent's own pod, to tell an uninstall from a restart on SIGTERM.
    pub self_pod: Option<crate::uninstall::SelfPod>,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub node_name: String,
    pub trust_domain: String,
    pub root_namespace: String,
    pub state_dir: PathBuf,
    pub bpf_pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub redirect: RedirectMode,
    pub bpf_connection_events: bool,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub ready_addr: SocketAddr,
    pub cert_ttl: Duration,
    pub drain_timeout: Duration,
    pub worker_threads: usize,
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--config {0}: file not found; pass the path of a mesh YAML file (see examples/mesh.yaml)")]
    MissingMeshFile(PathBuf),
    #[error("--ca-address {0:?}: must be an https:// URL such as {DEFAULT_CA_ADDRESS}")]
    BadCaAddress(String),
    #[error("--trust-domain {0:?}: must be a DNS-like name such as cluster.local (letters, digits, '.', '-', '_')")]
    BadTrustDomain(String),
    #[error("--cert-ttl-secs {0}: must be at least 60 seconds so certificates can rotate at half-life")]
    CertTtlTooShort(u64),
    #[error("--node-name must not be empty; set it or the {NODE_NAME_ENV} environment variable")]
    EmptyNodeName,
}

impl Config {
    pub fn from_node_args(a: NodeArgs) -> Result<Self, Error> {
        let (src, rt) = (a.source, a.runtime);
        let (source, ca) = match src.config {
            Some(path) if !path.is_file() => return Err(Error::MissingMeshFile(path)),
            Some(path) => (Source::File(path), CaMode::Local),
            None => {
                if !src.ca_address.starts_with("https://") {
                    return Err(Error::BadCaAddress(src.ca_address));
                }
                let ca =
                    CaMode::Remote { address: src.ca_address, root_cert: src.ca_root_cert, token_path: src.token_path };
                (Source::Kube { kubeconfig: src.kubeconfig }, ca)
            }
        };
        let td_ok = !src.trust_domain.is_empty()
            && src.trust_domain.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !td_ok {
            return Err(Error::BadTrustDomain(src.trust_domain));
        }
        if rt.cert_ttl_secs < 60 {
            return Err(Error::CertTtlTooShort(rt.cert_ttl_secs));
        }
        if a.node_name.is_empty() {
            return Err(Error::EmptyNodeName);
        }
        Ok(Config {
            source,
            ca,
            ca_server_name: src.ca_server_name,
            cni_socket: a.cni_socket,
            self_pod: match (a.pod_name, a.pod_namespace) {
                (Some(name), Some(namespace)) => Some(crate::uninstall::SelfPod { namespace, name }),
                _ => None,
            },
            cni_conf_dir: a.cni_conf_dir,
            cni_bin_dir: a.cni_bin_dir,
            node_name: a.node_name,
            trust_domain: src.trust_domain,
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            state_dir: src.state_dir,
            bpf_pin_dir: a.bpf_pin_dir,
            cgroup: a.cgroup,
            redirect: a.redirect,
            bpf_connection_events: a.bpf_connection_events,
            admin_addr: rt.admin_addr,
            metrics_addr: rt.metrics_addr,
            ready_addr: rt.ready_addr,
            cert_ttl: Duration::from_secs(rt.cert_ttl_secs),
            drain_timeout: Duration::from_secs(rt.drain_timeout_secs),
            worker_threads: rt.worker_threads,
            log_format: rt.log_format,
        })
    }
}

/// Default HBONE listener of a waypoint (all addresses: node agents dial the waypoint pod's IP).
pub const DEFAULT_WAYPOINT_HBONE_ADDR: &str = "[::]:15008";

/// `weft waypoint` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WaypointArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Namespace of the waypoint's Gateway (and its Service).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Name of the waypoint's Gateway (and its Service): services labelled `istio.io/use-waypoint: NAME` go through it.
    #[arg(long)]
    pub name: String,
    /// ServiceAccount whose SPIFFE identity the waypoint presents (default: --name, as istioctl deploys it).
    #[arg(long)]
    pub service_account: Option<String>,
    /// HBONE (mutual TLS) listener.
    #[arg(long, default_value = DEFAULT_WAYPOINT_HBONE_ADDR)]
    pub hbone_addr: SocketAddr,
    /// Optional plaintext HTTP front door (ingress style): the service is taken from the Host header
    /// (`name[.namespace[.svc.cluster.local]][:port]`).
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The validated configuration of `weft waypoint`.
#[derive(Debug, Clone)]
pub struct WaypointConfig {
    /// Source, CA, trust domain, admin ports, drain, logging: validated exactly as for `weft node`
    /// (the node-only fields keep their defaults and are not used).
    pub base: Config,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub hbone_addr: SocketAddr,
    pub http_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum WaypointConfigError {
    #[error(transparent)]
    Base(#[from] Error),
    #[error("--{flag} {value:?}: must be a Kubernetes name (lowercase letters, digits, '-', '.')")]
    BadName { flag: &'static str, value: String },
}

fn k8s_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

impl WaypointConfig {
    pub fn from_args(a: WaypointArgs) -> Result<Self, WaypointConfigError> {
        let service_account = a.service_account.clone().unwrap_or_else(|| a.name.clone());
        for (flag, value) in [("namespace", &a.namespace), ("name", &a.name), ("service-account", &service_account)] {
            if !k8s_name_ok(value) {
                return Err(WaypointConfigError::BadName { flag, value: value.clone() });
            }
        }
        let node = NodeArgs {
            source: a.source,
            cni_socket: DEFAULT_CNI_SOCKET.into(),
            node_name: format!("waypoint-{}", a.name),
            // A waypoint is a Deployment: it has no node installation to remove.
            pod_name: None,
            pod_namespace: None,
            cni_conf_dir: DEFAULT_CNI_CONF_DIR.into(),
            cni_bin_dir: DEFAULT_CNI_BIN_DIR.into(),
            bpf_pin_dir: DEFAULT_PIN_DIR.into(),
            cgroup: DEFAULT_CGROUP.into(),
            redirect: RedirectMode::Ebpf,
            bpf_connection_events: false,
            runtime: a.runtime,
        };
        Ok(WaypointConfig {
            base: Config::from_node_args(node)?,
            namespace: a.namespace,
            name: a.name,
            service_account,
            hbone_addr: a.hbone_addr,
            http_listen: a.http_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    fn args(extra: &[&str]) -> Result<Config, Error> {
        let f = tempfile::NamedTempFile::new().unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let mut v = vec!["weft", "--config", &path];
        v.extend_from_slice(extra);
        Config::from_node_args(Cli::parse_from(v).node)
    }

    #[test]
    fn defaults_are_istio_ports() {
        let c = args(&[]).unwrap();
        assert!(matches!(c.source, Source::File(_)));
        assert_eq!(c.ca, CaMode::Local);
        assert_eq!(c.admin_addr.port(), 15000);
        assert_eq!(c.metrics_addr.port(), 15020);
        assert_eq!(c.ready_addr.port(), 15021);
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.redirect, RedirectMode::Ebpf);
    }

    #[test]
    fn without_a_file_the_agent_runs_from_the_cluster() {
        let c = Config::from_node_args(Cli::parse_from(["weft", "--kubeconfig", "/k"]).node).unwrap();
        assert_eq!(c.source, Source::Kube { kubeconfig: Some("/k".into()) });
        assert!(matches!(c.ca, CaMode::Remote { ref address, .. } if address == DEFAULT_CA_ADDRESS));
        let e = Config::from_node_args(Cli::parse_from(["weft", "--ca-address", "http://ca:15012"]).node).unwrap_err();
        assert!(e.to_string().contains("--ca-address"), "{e}");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = args(&["--trust-domain", "bad/td"]).unwrap_err().to_string();
        assert!(e.contains("--trust-domain"), "{e}");
        let e = args(&["--cert-ttl-secs", "5"]).unwrap_err().to_string();
        assert!(e.contains("--cert-ttl-secs"), "{e}");
        let e = Config::from_node_args(Cli::parse_from(["weft", "--config", "/nonexistent/mesh.yaml"]).node)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/mesh.yaml"), "{e}");
    }

    #[derive(Parser)]
    struct WpCli {
        #[command(flatten)]
        wp: WaypointArgs,
    }

    #[test]
    fn waypoint_defaults_and_validation() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let path = f.path().to_str().unwrap();
        let c = WaypointConfig::from_args(
            WpCli::parse_from(["weft", "--config", path, "--namespace", "demo", "--name", "waypoint"]).wp,
        )
        .unwrap();
        assert_eq!(c.service_account, "waypoint");
        assert_eq!(c.hbone_addr.port(), 15008);
        assert_eq!(c.base.metrics_addr.port(), 15020);
        assert_eq!(c.base.ready_addr.port(), 15021);
        assert_eq!(c.base.admin_addr.port(), 15000);
        assert_eq!(c.base.ca, CaMode::Local);
        assert!(c.http_listen.is_none());
        let e = WaypointConfig::from_args(
            WpCli::parse_from(["weft", "--config", path, "--namespace", "Demo", "--name", "waypoint"]).wp,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--namespace"), "{e}");
        let c = WaypointConfig::from_args(
            WpCli::parse_from([
                "weft",
                "--kubeconfig",
                "/k",
                "--namespace",
                "demo",
                "--name",
                "wp",
                "--service-account",
                "sa1",
                "--http-listen",
                "127.0.0.1:8080",
            ])
            .wp,
        )
        .unwrap();
        assert_eq!(c.service_account, "sa1");
        assert_eq!(c.base.source, Source::Kube { kubeconfig: Some("/k".into()) });
        assert_eq!(c.http_listen, Some("127.0.0.1:8080".parse().unwrap()));
    }
}
