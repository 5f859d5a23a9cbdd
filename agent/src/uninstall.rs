//! Whether a terminating node agent is being removed from its node, and removing it.
//!
//! A DaemonSet pod gets SIGTERM in two very different situations. On a restart, an upgrade or a
//! node reboot its DaemonSet is still there and a new agent pod follows: everything must stay in
//! place — the pinned eBPF programs keep enrolled pods failing closed until the new agent re-adopts
//! them, and the CNI entry keeps new pods waiting for it. On an uninstall (`helm uninstall`,
//! `kubectl delete -k deploy/`) the DaemonSet is gone or being deleted and nothing follows: left in
//! place, the programs would cut enrolled pods off for good and the CNI entry would fail every new
//! pod of an ambient namespace. So the agent looks up the DaemonSet that owns its own pod, as
//! Istio's CNI agent does: present, not being deleted and still selecting this node → keep; not
//! found, marked for deletion, its pod template no longer selecting this node (its `nodeSelector`
//! or required node affinity changed: the DaemonSet controller is taking weft off this node and no
//! pod follows), or the agent's own access revoked (401/403: its RBAC or ServiceAccount went first) → remove the
//! CNI entry and plugin binary, then detach and unpin the eBPF programs, so pods go back to plain
//! networking exactly as before weft. When the answer is unknown (API server unreachable) the
//! agent keeps everything: failing closed is the safe side. Taints are not read: the DaemonSet
//! controller's automatic tolerations (not-ready, unreachable, pressure) would have to be mirrored
//! exactly, and a node reboot must never look like an uninstall.
//!
//! Owns the decision and the removal; the caller (`app`) decides when to ask and drains
//! connections in between.

use std::path::PathBuf;
use std::time::Duration;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod};
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
    /// The DaemonSet's pod template no longer selects the agent's node.
    NotScheduledHere {
        daemon_set: String,
        node: String,
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
        Lookup::NotScheduledHere { daemon_set, node } => Verdict::Remove(format!(
            "DaemonSet {daemon_set} no longer selects node {node} (its nodeSelector or node affinity changed)"
        )),
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
    let ds = match Api::<DaemonSet>::namespaced(client.clone(), &me.namespace).get(&owner.name).await {
        Ok(ds) if ds.metadata.deletion_timestamp.is_some() => return Lookup::Deleting { daemon_set },
        Ok(ds) => ds,
        Err(e) => return failed(format!("DaemonSet {daemon_set}"), e),
    };
    // Only a Node read back and positively not selected means "taken off this node"; a Node that
    // cannot be read (RBAC of an older install, a wrong node name) keeps the restart answer.
    let Some(node_name) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return Lookup::Present { daemon_set };
    };
    match Api::<Node>::all(client.clone()).get(&node_name).await {
        Ok(node) if !template_selects(&ds, &node) => Lookup::NotScheduledHere { daemon_set, node: node_name },
        Ok(_) => Lookup::Present { daemon_set },
        Err(e) => {
            tracing::debug!(node = %node_name, error = %e, "cannot read the agent's Node; not checking node selection");
            Lookup::Present { daemon_set }
        }
    }
}

/// Whether the DaemonSet's pod template may run on `node`: its `nodeSelector` and its required
/// node affinity, with the scheduler's semantics (terms are ORed, requirements within a term ANDed,
/// a term without requirements matches nothing).
fn template_selects(ds: &DaemonSet, node: &Node) -> bool {
    let Some(spec) = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()) else { return true };
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let name = node.metadata.name.as_deref().unwrap_or_default();
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref());
    let Some(required) = required else { return true };
    required.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        (!exprs.is_empty() || !fields.is_empty())
            && exprs.iter().all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
            && fields.iter().all(|r| r.key == "metadata.name" && requirement_matches(r, Some(name)))
    })
}

/// One node selector requirement against the value of its key (`None`: the key is absent).
fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| values.iter().all(|x| x != v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => match (value.and_then(number), values.first().and_then(|x| number(x))) {
            (Some(v), Some(bound)) => {
                if r.operator == "Gt" {
                    v > bound
                } else {
                    v < bound
                }
            }
            _ => false,
        },
        // An operator this agent does not know: do not conclude the node is excluded.
        _ => true,
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

    fn ds_with(template_spec: serde_json::Value) -> DaemonSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "weft-node", "namespace": "weft-system"},
            "spec": {"selector": {"matchLabels": {"app": "weft-node"}},
                     "template": {"metadata": {"labels": {"app": "weft-node"}}, "spec": template_spec}},
        }))
        .unwrap()
    }

    fn node(name: &str, labels: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}})).unwrap()
    }

    fn affinity(terms: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"containers": [{"name": "node"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}})
    }

    #[test]
    fn node_selection_follows_the_schedulers_rules() {
        let n = node("n1", serde_json::json!({"mesh": "on", "zone": "a", "cores": "8"}));
        let plain = ds_with(serde_json::json!({"containers": [{"name": "node"}]}));
        assert!(template_selects(&plain, &n), "no constraint selects every node");
        let sel =
            |s: serde_json::Value| ds_with(serde_json::json!({"containers": [{"name": "node"}], "nodeSelector": s}));
        assert!(template_selects(&sel(serde_json::json!({"mesh": "on"})), &n));
        assert!(!template_selects(&sel(serde_json::json!({"mesh": "off"})), &n));
        assert!(!template_selects(&sel(serde_json::json!({"mesh": "on", "gpu": "yes"})), &n));

        let expr =
            |key: &str, op: &str, values: &[&str]| serde_json::json!({"key": key, "operator": op, "values": values});
        let one = |e: serde_json::Value| ds_with(affinity(serde_json::json!([{"matchExpressions": [e]}])));
        for (e, want) in [
            (expr("zone", "In", &["a", "b"]), true),
            (expr("zone", "In", &["b"]), false),
            (expr("zone", "NotIn", &["b"]), true),
            (expr("zone", "NotIn", &["a"]), false),
            (expr("missing", "NotIn", &["a"]), true),
            (serde_json::json!({"key": "zone", "operator": "Exists"}), true),
            (serde_json::json!({"key": "zone", "operator": "DoesNotExist"}), false),
            (expr("cores", "Gt", &["4"]), true),
            (expr("cores", "Lt", &["4"]), false),
            (expr("zone", "Gt", &["4"]), false),
        ] {
            assert_eq!(template_selects(&one(e.clone()), &n), want, "{e}");
        }
        // Terms are ORed; a term's requirements are ANDed; matchFields compares the node's name.
        let terms = serde_json::json!([
            {"matchExpressions": [expr("zone", "In", &["b"])]},
            {"matchExpressions": [expr("zone", "In", &["a"])], "matchFields": [expr("metadata.name", "In", &["n1"])]},
        ]);
        assert!(template_selects(&ds_with(affinity(terms)), &n));
        let terms = serde_json::json!([{"matchFields": [expr("metadata.name", "NotIn", &["n1"])]}]);
        assert!(!template_selects(&ds_with(affinity(terms)), &n), "matchFields excludes this node by name");
        assert!(!template_selects(&ds_with(affinity(serde_json::json!([{}]))), &n), "an empty term matches nothing");
    }

    #[test]
    fn a_daemon_set_no_longer_selecting_the_node_means_uninstall() {
        let v = verdict(Lookup::NotScheduledHere { daemon_set: ds(), node: "n1".into() });
        assert!(matches!(&v, Verdict::Remove(r) if r.contains("no longer selects node n1")), "{v:?}");
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
