//! CNI enrollment: how the node agent learns where each pod's network namespace is, and how
//! pod start-up waits until the pod is in the mesh.
//!
//! - [`plugin`]: `weft cni` / the `weft-cni` binary, a chained CNI plugin the container runtime
//!   runs for every sandbox. ADD asks the agent and fails unless the pod is enrolled or outside
//!   the mesh; DEL tells it (best effort).
//! - [`server`] + [`registry`]: the agent's end of the unix socket. ADD registers the pod's netns
//!   in the [`PodNetnsRegistry`] and waits for the reconcile loop's verdict.
//! - [`scan`]: finds the netns of pods that started before their namespace was labelled (or
//!   before the agent restarted) from `/proc/*/cgroup`, since no ADD will come for them.
//! - [`install`]: puts the binary and our entry into the node's CNI configuration, and takes
//!   them out again.
//!
//! This module owns none of the decisions: whether a pod is in the mesh comes from `state`, and
//! enrolling it (listeners, eBPF redirect) is `app`'s reconcile loop, which reads the registry
//! and reports back with `mark_enrolled` / `mark_not_captured`. The wire format between plugin
//! and agent is [`protocol`]. Hand-written rather than the `cni-plugin` crate: that crate stops
//! at spec 1.0 (no GC, no STATUS) and exits the process itself, while the part we need is a few
//! serde structs.

pub mod install;
pub mod plugin;
pub mod protocol;
pub mod registry;
pub mod scan;
pub mod server;

use std::path::PathBuf;
use std::time::Duration;

pub use install::{InstallError, Installed, PLUGIN_TYPE, PluginEntry, install, install_entry, uninstall};
pub use plugin::{invoked_as_plugin, plugin_main, run_plugin};
pub use protocol::PodRef;
pub use registry::{Enrollment, Entry, PodNetns, PodNetnsRegistry, Source};
pub use scan::{find_pod_netns, scan_pods_netns};
pub use server::{DEFAULT_SOCKET, bind, serve};

/// A failed plugin invocation. Each maps to a CNI error code ([`CniError::code`]); the message
/// is what the runtime shows in the pod's events, so it says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("incompatible CNI version {0}: weft-cni supports {versions}", versions = plugin::SUPPORTED_VERSIONS.join(", "))]
    IncompatibleVersion(String),
    #[error("invalid CNI environment: {}", .0.join(", "))]
    InvalidEnv(Vec<String>),
    #[error("I/O: {0}")]
    Io(String),
    #[error("cannot decode the network configuration on stdin: {0}")]
    Decode(String),
    #[error("invalid weft-cni configuration: {0}")]
    InvalidConfig(String),
    #[error(
        "the weft node agent is not reachable at {socket}: {reason}; is the weft DaemonSet pod running on this node? \
         the runtime retries the pod"
    )]
    AgentUnreachable { socket: PathBuf, reason: String },
    #[error("no answer from the weft node agent at {socket} within {after:?}; see its log on this node")]
    Timeout { socket: PathBuf, after: Duration },
    #[error("the weft node agent refused pod {pod}: {message}")]
    Refused { pod: String, message: String },
    #[error("pod {pod} is not enrolled yet")]
    Pending { pod: String },
    #[error("talking to the weft node agent: {0}")]
    Protocol(String),
    #[error("weft-cni cannot serve ADD: {0}")]
    NotAvailable(String),
}

impl CniError {
    /// The CNI error code (spec §5 "Error"): well-known codes where one fits, 999 otherwise.
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion(_) => 1,
            CniError::InvalidEnv(_) => 4,
            CniError::Io(_) => 5,
            CniError::Decode(_) => 6,
            CniError::InvalidConfig(_) => 7,
            // Transient: the agent is restarting or has not seen the pod yet.
            CniError::AgentUnreachable { .. } | CniError::Timeout { .. } | CniError::Pending { .. } => 11,
            CniError::NotAvailable(_) => 50,
            CniError::Refused { .. } | CniError::Protocol(_) => 999,
        }
    }

    fn short(&self) -> &'static str {
        match self {
            CniError::IncompatibleVersion(_) => "incompatible CNI version",
            CniError::InvalidEnv(_) => "invalid environment variables",
            CniError::Io(_) => "I/O failure",
            CniError::Decode(_) => "failed to decode the network configuration",
            CniError::InvalidConfig(_) => "invalid network configuration",
            CniError::AgentUnreachable { .. } => "weft node agent unreachable",
            CniError::Timeout { .. } => "weft node agent did not answer in time",
            CniError::Refused { .. } => "weft node agent could not enroll the pod",
            CniError::Pending { .. } => "pod not enrolled yet",
            CniError::Protocol(_) => "weft node agent protocol error",
            CniError::NotAvailable(_) => "weft node agent not available",
        }
    }

    /// The error object the plugin prints on stdout.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.short(),
            "details": self.to_string(),
        })
    }
}
