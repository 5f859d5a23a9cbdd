//! PeerAuthentication → the effective mTLS mode of a workload port.
//!
//! Resolution is Istio ambient's (istiod's `convertedSelectorPeerAuthentications`): the first mode
//! that is not UNSET wins, looking at the workload policy's `portLevelMtls[port]`, then the workload
//! policy's `mtls`, then the namespace policy, then the mesh policy (root namespace); nothing set
//! means PERMISSIVE. When several policies compete for one level, Istio keeps the oldest
//! (`creationTimestamp`); weft does too, breaking ties (and objects without a timestamp, as in a
//! local file) by name, so the choice never depends on the order objects arrived in.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::authz::validate_selector_labels;
use super::{MtlsMode, PolicyError, PolicyKind};
use crate::crd::{self, PeerAuthentication};

#[derive(Debug, Default)]
pub(super) struct PeerPolicies {
    mesh: Option<Level>,
    namespaces: HashMap<String, Level>,
    /// Per namespace, in precedence order (oldest first).
    workloads: HashMap<String, Vec<WorkloadLevel>>,
}

#[derive(Debug)]
struct Level {
    key: String,
    mode: crd::MtlsMode,
}

#[derive(Debug)]
struct WorkloadLevel {
    selector: BTreeMap<String, String>,
    mode: crd::MtlsMode,
    ports: HashMap<u16, crd::MtlsMode>,
}

/// Orders competing policies: oldest first, those with a timestamp before those without, then by
/// name.
type Age = (bool, Option<Time>, String);

fn age(pa: &PeerAuthentication) -> Age {
    let ts = pa.metadata.creation_timestamp.clone();
    (ts.is_none(), ts, pa.metadata.name.clone().unwrap_or_default())
}

fn mode_of(m: &Option<crd::MutualTls>) -> crd::MtlsMode {
    m.as_ref().map(|m| m.mode).unwrap_or_default()
}

/// DISABLE cannot turn mTLS off in ambient mode: the *source* agent decides to tunnel over HBONE,
/// and a destination that refuses mTLS would only break captured clients. What DISABLE can still
/// mean at the destination is "do not require mTLS", which is PERMISSIVE; ztunnel does the same.
fn effective(m: crd::MtlsMode) -> Option<MtlsMode> {
    match m {
        crd::MtlsMode::Unset => None,
        crd::MtlsMode::Strict => Some(MtlsMode::Strict),
        crd::MtlsMode::Permissive | crd::MtlsMode::Disable => Some(MtlsMode::Permissive),
    }
}

impl PeerPolicies {
    pub fn compile(
        all: &[PeerAuthentication],
        root_namespace: &str,
        errors: &mut Vec<PolicyError>,
        warnings: &mut Vec<String>,
    ) -> PeerPolicies {
        let mut mesh: Vec<(&PeerAuthentication, Age)> = Vec::new();
        let mut namespaces: BTreeMap<&str, Vec<(&PeerAuthentication, Age)>> = BTreeMap::new();
        let mut workloads: HashMap<String, Vec<(Age, WorkloadLevel)>> = HashMap::new();
        for pa in all {
            let namespace = pa.metadata.namespace.as_deref().unwrap_or("default");
            let name = pa.metadata.name.as_deref().unwrap_or("");
            let err = |field: String, reason: String| PolicyError {
                kind: PolicyKind::PeerAuthentication,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                field,
                reason,
            };
            if let Err(e) = validate(pa, &err) {
                errors.push(e);
                continue;
            }
            let whole = pa.spec.selector.as_ref().is_none_or(|s| s.match_labels.is_empty());
            if whole && namespace == root_namespace {
                mesh.push((pa, age(pa)));
            } else if whole {
                namespaces.entry(namespace).or_default().push((pa, age(pa)));
            } else if namespace == root_namespace {
                // istiod ignores these for ambient workloads; a silent no-op would be worse.
                warnings.push(format!(
                    "PeerAuthentication {namespace}/{name}: a workload selector in the root namespace \
                     {root_namespace} is ignored in ambient mode; put the policy in the workload's namespace"
                ));
            } else {
                let ports = pa
                    .spec
                    .port_level_mtls
                    .iter()
                    .map(|(p, m)| (u16::try_from(*p).unwrap_or_default(), m.mode))
                    .collect();
                let level = WorkloadLevel {
                    selector: pa.spec.selector.as_ref().map(|s| s.match_labels.clone()).unwrap_or_default(),
                    mode: mode_of(&pa.spec.mtls),
                    ports,
                };
                workloads.entry(namespace.to_owned()).or_default().push((age(pa), level));
            }
        }

        let mut pick = |scope: &str, mut candidates: Vec<(&PeerAuthentication, Age)>| -> Option<Level> {
            candidates.sort_by(|a, b| a.1.cmp(&b.1));
            let (winner, _) = candidates.first()?;
            let wname = winner.metadata.name.clone().unwrap_or_default();
            for (loser, _) in &candidates[1..] {
                errors.push(PolicyError {
                    kind: PolicyKind::PeerAuthentication,
                    namespace: loser.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                    name: loser.metadata.name.clone().unwrap_or_default(),
                    field: "spec.selector".into(),
                    reason: format!(
                        "ignored: {wname} already sets the {scope} mTLS mode and only one policy per {scope} \
                         applies (the oldest, then by name); merge them or give this one a selector"
                    ),
                });
            }
            let ns = winner.metadata.namespace.as_deref().unwrap_or("default");
            Some(Level { key: format!("{ns}/{wname}"), mode: mode_of(&winner.spec.mtls) })
        };
        let mesh = pick("mesh-wide", mesh);
        let namespaces =
            namespaces.into_iter().filter_map(|(ns, c)| Some((ns.to_owned(), pick("namespace", c)?))).collect();
        let workloads = workloads
            .into_iter()
            .map(|(ns, mut levels)| {
                levels.sort_by(|a, b| a.0.cmp(&b.0));
                (ns, levels.into_iter().map(|(_, l)| l).collect())
            })
            .collect();
        PeerPolicies { mesh, namespaces, workloads }
    }

    pub fn mtls_mode(&self, namespace: &str, labels: &BTreeMap<String, String>, port: u16) -> MtlsMode {
        // Istio applies only the oldest workload policy that selects the workload.
        let workload = self
            .workloads
            .get(namespace)
            .and_then(|ws| ws.iter().find(|w| w.selector.iter().all(|(k, v)| labels.get(k) == Some(v))));
        workload
            .and_then(|w| w.ports.get(&port).copied().and_then(effective))
            .or_else(|| workload.and_then(|w| effective(w.mode)))
            .or_else(|| self.namespaces.get(namespace).and_then(|l| effective(l.mode)))
            .or_else(|| self.mesh.as_ref().and_then(|l| effective(l.mode)))
            .unwrap_or(MtlsMode::Permissive)
    }

    pub fn len(&self) -> usize {
        usize::from(self.mesh.is_some()) + self.namespaces.len() + self.workloads.values().map(Vec::len).sum::<usize>()
    }

    /// `namespace/name` of the mesh-wide policy in force, if any (for `weft ctl`).
    pub fn mesh_policy(&self) -> Option<&str> {
        self.mesh.as_ref().map(|l| l.key.as_str())
    }
}

fn validate(pa: &PeerAuthentication, err: &impl Fn(String, String) -> PolicyError) -> Result<(), PolicyError> {
    if pa.metadata.name.as_deref().unwrap_or("").is_empty() {
        return Err(err("metadata.name".into(), "a policy needs a name".into()));
    }
    if let Some(sel) = &pa.spec.selector {
        validate_selector_labels(sel, err)?;
    }
    let whole = pa.spec.selector.as_ref().is_none_or(|s| s.match_labels.is_empty());
    if whole && !pa.spec.port_level_mtls.is_empty() {
        return Err(err(
            "spec.portLevelMtls".into(),
            "mesh- and namespace-wide policies cannot have port-level mTLS; add a selector".into(),
        ));
    }
    if let Some(p) = pa.spec.port_level_mtls.keys().find(|p| **p == 0 || **p > 65535) {
        return Err(err(format!("spec.portLevelMtls.{p}"), "ports must be in 1-65535".into()));
    }
    Ok(())
}
