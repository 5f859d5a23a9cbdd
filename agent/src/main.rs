//! The `weft` binary: parses the command line, sets up logging and the runtime, and hands a
//! validated `Config` to `app`. Nothing else lives here.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weft::config::{Config, LogFormat, NodeArgs};

#[derive(Parser)]
#[command(name = "weft", version, about = "weft: a sidecarless service mesh (Istio ambient compatible)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The per-node agent: eBPF redirect, in-pod listeners, HBONE mTLS tunnel, L4 policy.
    Node(NodeArgs),
    /// The L7 waypoint proxy for one Gateway (Istio's waypoint): HBONE on 15008, VirtualService /
    /// HTTPRoute routing, DestinationRule policy, L7 AuthorizationPolicy, local rate limits.
    Waypoint(weft::config::WaypointArgs),
    /// The mesh certificate authority: Istio's IstioCertificateService on 15012, callers
    /// authenticated by TokenReview, node agents limited to the pods of their own node.
    Ca(weft::ca_server::CaArgs),
    /// The chained CNI plugin, as the container runtime runs it (CNI_COMMAND and the config on
    /// stdin), or its installation into the node's CNI configuration.
    Cni {
        #[command(subcommand)]
        action: Option<CniAction>,
    },
    /// Operator commands against a cluster, e.g. `weft ctl waypoint apply -n NS` (as `istioctl waypoint apply`).
    Ctl(weft::ctl::CtlArgs),
    /// Detaches weft's eBPF programs and removes their pins: enrolled pods stop being redirected
    /// (and stop failing closed). Run it after removing the agent for good.
    Uninstall {
        #[arg(long, default_value = weft::config::DEFAULT_PIN_DIR)]
        bpf_pin_dir: std::path::PathBuf,
        #[arg(long, default_value = weft::config::DEFAULT_CGROUP)]
        cgroup: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum CniAction {
    /// Copies this binary to the CNI bin dir as `weft-cni` and chains it, last, into the
    /// node's primary CNI configuration. Idempotent.
    Install {
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: std::path::PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: std::path::PathBuf,
        /// Where the node agent listens for the plugin.
        #[arg(long, default_value = weft::config::DEFAULT_CNI_SOCKET)]
        socket: std::path::PathBuf,
    },
    /// Removes exactly what `install` added.
    Uninstall {
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: std::path::PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: std::path::PathBuf,
    },
}

fn cni(action: Option<CniAction>) -> ExitCode {
    let result = match action {
        None => return weft::cni::run_plugin(),
        Some(CniAction::Install { conf_dir, bin_dir, socket }) => std::env::current_exe()
            .map_err(|e| format!("cannot find this binary: {e}"))
            .and_then(|exe| weft::cni::install(&conf_dir, &bin_dir, &exe, &socket).map_err(|e| e.to_string()))
            .map(|installed| eprintln!("weft cni install: {installed:?}")),
        Some(CniAction::Uninstall { conf_dir, bin_dir }) => weft::cni::uninstall(&conf_dir, &bin_dir)
            .map(|removed| eprintln!("weft cni uninstall: {}", if removed { "removed" } else { "nothing to remove" }))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft cni: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        rt.worker_threads(worker_threads);
    }
    rt.enable_all().build().map_err(|e| {
        eprintln!("weft: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

async fn run_ca(config: weft::ca_server::CaConfig) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes API access (in-cluster config or KUBECONFIG): {e}"))?;
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    let opts = weft::ca_server::CaOptions { config: Arc::new(config), listener, client };
    weft::ca_server::run(opts, shutdown).await.map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    // The container runtime runs the plugin as /opt/cni/bin/weft-cni with no arguments.
    if weft::cni::invoked_as_plugin() {
        return weft::cni::run_plugin();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Cni { action } => cni(action),
        Command::Ctl(args) => {
            init_logging(LogFormat::Text);
            let rt = match runtime(1) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(weft::ctl::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weft ctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Uninstall { bpf_pin_dir, cgroup } => {
            let opts = weft::redirect::Options { pin_dir: bpf_pin_dir, cgroup, ..Default::default() };
            match weft::redirect::Redirect::remove_all(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weft uninstall: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca(args) => {
            let config = match weft::ca_server::CaConfig::from_args(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("weft ca: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.log_format);
            let rt = match runtime(0) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(run_ca(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "weft ca failed");
                    eprintln!("weft ca: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Waypoint(args) => {
            let config = match weft::config::WaypointConfig::from_args(args) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    eprintln!("weft waypoint: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.base.log_format);
            let rt = match runtime(config.base.worker_threads) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(weft::app::run_waypoint(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "weft waypoint failed");
                    eprintln!("weft waypoint: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Node(args) => {
            let config = match Config::from_node_args(args) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    eprintln!("weft node: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.log_format);
            let rt = match runtime(config.worker_threads) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(weft::app::run_node(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "weft node failed");
                    eprintln!("weft node: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
