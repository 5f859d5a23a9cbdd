//! Whether a terminating node agent is being removed from its node, and removing it.
//!
//! A DaemonSet pod gets SIGTERM in two very different situations. On a restart, an upgrade or a
//! node reboot its DaemonSet is still there and a new agent pod follows: everything must stay in
//! place — the pinned eBPF programs keep enrolled pods failing closed until the new agent re-adopts
//! them, and the CNI entry keeps new pods waiting for it. On an uninstall (`helm uninstall`,
//! `kubectl delete -k deploy/`) the DaemonSet is gone or being deleted and nothing follows: left in
//! place, the programs would cut enrolled pods off for good and the CNI entry would fail every new
//! pod of an ambient namespace. So the agent looks up the DaemonSet that owns its own pod, as
//! Istio's CNI agent does: present and not being deleted → keep; not found, marked for deletion,
//! or the agent's own access revoked (401/403: its RBAC or ServiceAccount went first) → remove the
//! CNI entry and plugin binary, then detach and unpin the eBPF programs, so pods go back to plain
//! networking exactly as before weft. When the answer is unknown (API server unreachable) the
//! agent keeps everything: failing closed is the safe side.
//!
//! Owns the decision and the removal; the caller (`app`) decides when to ask and drains
//! connections in between.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

/// The node agent's own pod (`--pod-namespace`/`--pod-name`, from the downward API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfPod {
    pub namespace: String,
    pub name: String,
}

/// What to remove when the agent is uninstalled.
#[derive(Debug, Clone)]
pub struct Installation {
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    /// None when the agent did not load eBPF (`--redirect iptables`).
    pub redirect: Option<crate::redirect::Options>,
}

/// The decision, with the reason that is logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep(String),
    Remove(String),
}

/// How looking up the owning DaemonSet ended; [`verdict`] turns it into the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lookup {
    Present {
        daemon_set: String,
    },
    Deleting {
        daemon_set: String,
    },
    NotFound {
        what: String,
    },
    Denied {
        what: String,
        code: u16,
    },
    /// The pod is not run by a DaemonSet (started by hand, a test): nothing tells an uninstall
    /// from a restart.
    NoOwner,
    Failed(String),
}

fn verdict(l: Lookup) -> Verdict {
    match l {
        Lookup::Present { daemon_set } => {
            Verdict::Keep(format!("DaemonSet {daemon_set} is still present: a restart, upgrade or node reboot"))
        }
        Lookup::Deleting { daemon_set } => Verdict::Remove(format!("DaemonSet {daemon_set} is being deleted")),
        Lookup::NotFound { what } => Verdict::Remove(format!("{what} no longer exists")),
        Lookup::Denied { what, code } => {
            Verdict::Remove(format!("reading {what} is no longer allowed ({code}): weft's RBAC is being removed"))
        }
        Lookup::NoOwner => Verdict::Keep("the agent's pod is not owned by a DaemonSet".into()),
        Lookup::Failed(e) => Verdict::Keep(format!("cannot tell whether weft is being uninstalled ({e})")),
    }
}

/// How often a failed lookup is retried, and the pause between tries: bounded, so the decision
/// fits well inside the pod's termination grace period.
const ATTEMPTS: u32 = 3;
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Bound on each API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the API server whether this agent's DaemonSet is going away.
pub async fn decide(client: &kube::Client, me: &SelfPod) -> Verdict {
    let mut last = Lookup::Failed("not attempted".into());
    for attempt in 1..=ATTEMPTS {
        last = match tokio::time::timeout(CALL_TIMEOUT * 2, lookup(client, me)).await {
            Ok(l) => l,
            Err(_) => Lookup::Failed(format!("no answer from the API server within {:?}", CALL_TIMEOUT * 2)),
        };
        if !matches!(last, Lookup::Failed(_)) {
            break;
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
    verdict(last)
}

async fn lookup(client: &kube::Client, me: &SelfPod) -> Lookup {
    let pod_what = format!("pod {}/{}", me.namespace, me.name);
    let pod = match Api::<Pod>::namespaced(client.clone(), &me.namespace).get(&me.name).await {
        Ok(p) => p,
        Err(e) => return failed(pod_what, e),
    };
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "DaemonSet" && o.controller == Some(true) && o.api_version.starts_with("apps/"));
    let Some(owner) = owner else { return Lookup::NoOwner };
    let daemon_set = format!("{}/{}", me.namespace, owner.name);
    match Api::<DaemonSet>::namespaced(client.clone(), &me.namespace).get(&owner.name).await {
        Ok(ds) if ds.metadata.deletion_timestamp.is_some() => Lookup::Deleting { daemon_set },
        Ok(_) => Lookup::Present { daemon_set },
        Err(e) => failed(format!("DaemonSet {daemon_set}"), e),
    }
}

fn failed(what: String, e: kube::Error) -> Lookup {
    match e {
        kube::Error::Api(s) if s.code == 404 => Lookup::NotFound { what },
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => Lookup::Denied { what, code: s.code },
        e => Lookup::Failed(format!("reading {what}: {e}")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("removing the CNI plugin: {0}")]
    Cni(#[from] crate::cni::InstallError),
    #[error("removing the eBPF programs: {0}; run `weft uninstall` on the node")]
    Redirect(#[from] crate::redirect::Error),
}

/// The CNI entry and plugin binary, so no new pod waits for an agent that will not come back.
/// First, before connections drain.
pub fn remove_cni(inst: &Installation) -> Result<bool, Error> {
    Ok(crate::cni::uninstall(&inst.cni_conf_dir, &inst.cni_bin_dir)?)
}

/// The eBPF programs and pins: enrolled pods' traffic flows plainly again. Last, once
/// connections have drained.
pub fn remove_redirect(inst: &Installation) -> Result<(), Error> {
    match &inst.redirect {
        Some(opts) => Ok(crate::redirect::Redirect::remove_all(opts)?),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds() -> String {
        "weft-system/weft-node".into()
    }

    #[test]
    fn a_present_daemon_set_means_restart_and_keeps_everything() {
        assert!(matches!(verdict(Lookup::Present { daemon_set: ds() }), Verdict::Keep(r) if r.contains("weft-node")));
    }

    #[test]
    fn a_deleted_or_deleting_daemon_set_means_uninstall() {
        assert!(matches!(verdict(Lookup::Deleting { daemon_set: ds() }), Verdict::Remove(_)));
        assert!(
            matches!(verdict(Lookup::NotFound { what: ds() }), Verdict::Remove(r) if r.contains("no longer exists"))
        );
    }

    #[test]
    fn revoked_access_means_uninstall() {
        for code in [401, 403] {
            let v = verdict(Lookup::Denied { what: ds(), code });
            assert!(matches!(&v, Verdict::Remove(r) if r.contains(&code.to_string())), "{v:?}");
        }
    }

    #[test]
    fn unknown_answers_keep_everything_failing_closed() {
        assert!(
            matches!(verdict(Lookup::Failed("connection refused".into())), Verdict::Keep(r) if r.contains("connection refused"))
        );
        assert!(matches!(verdict(Lookup::NoOwner), Verdict::Keep(_)));
    }

    #[test]
    fn api_errors_map_by_status_code() {
        let api = |code: u16| kube::Error::Api(kube::core::Status::failure("x", "y").with_code(code).boxed());
        assert!(matches!(failed(ds(), api(404)), Lookup::NotFound { .. }));
        assert!(matches!(failed(ds(), api(403)), Lookup::Denied { code: 403, .. }));
        assert!(matches!(failed(ds(), api(401)), Lookup::Denied { code: 401, .. }));
        assert!(matches!(failed(ds(), api(500)), Lookup::Failed(_)));
    }
}
