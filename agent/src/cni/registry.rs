//! Where this node's pods' network namespaces are, as the CNI plugin (or the `/proc` scan for pods
//! that started before the agent) reported them, and what the reconcile loop decided for each.
//!
//! The registry does not decide anything: whether a pod is in the mesh is the reconcile loop's
//! call (from the `State` snapshot); it records the answer with `mark_enrolled` /
//! `mark_not_captured` and the CNI server hands it to the waiting plugin.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

pub use super::protocol::PodRef;

/// Who told the agent where the pod's network namespace is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A CNI ADD (the path is the runtime's, e.g. `/var/run/netns/cni-…`).
    Cni,
    /// [`super::find_pod_netns`]: a pod that was running before its namespace was labelled or
    /// before the agent (re)started, so no ADD will come.
    Scan,
}

/// A pod's network namespace on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetns {
    pub netns: PathBuf,
    /// `metadata.uid`, when known (empty otherwise).
    pub uid: String,
    /// The sandbox (`CNI_CONTAINERID`); `None` for scanned pods.
    pub container_id: Option<String>,
    /// The pod's IPs from the CNI result: known here before the API server has them.
    pub ips: Vec<IpAddr>,
    pub source: Source,
}

/// The reconcile loop's verdict on a registered pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrollment {
    /// Registered, not decided yet (an ADD is waiting for this to change).
    Pending,
    /// Listeners and redirect are in place for the registered netns.
    Enrolled,
    /// The pod is not in the mesh.
    NotCaptured,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub pod: PodNetns,
    pub enrollment: Enrollment,
}

pub type Snapshot = Arc<BTreeMap<PodRef, Entry>>;

/// Pods' network namespaces and their enrollment, shared between the CNI server and the
/// reconcile loop. Reads are a wait-free snapshot load; writes (an ADD, a DEL, a verdict that
/// changed) copy the map, which holds only this node's pods.
#[derive(Debug)]
pub struct PodNetnsRegistry {
    map: ArcSwap<BTreeMap<PodRef, Entry>>,
    /// Serialises writers so none of them loses another's update.
    write: Mutex<()>,
    /// Bumped when a pod is registered, its netns changes, or it is removed: what the reconcile
    /// loop must act on. Verdicts do not bump it, so marking does not wake the loop that marks.
    changes: watch::Sender<u64>,
    /// Bumped when a verdict changes or a pod is removed: what waiting ADDs watch.
    verdicts: watch::Sender<u64>,
}

impl Default for PodNetnsRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl PodNetnsRegistry {
    pub fn new() -> Self {
        PodNetnsRegistry {
            map: ArcSwap::from_pointee(BTreeMap::new()),
            write: Mutex::new(()),
            changes: watch::channel(0).0,
            verdicts: watch::channel(0).0,
        }
    }

    /// The pod's network namespace path, if registered.
    pub fn get(&self, namespace: &str, name: &str) -> Option<PathBuf> {
        self.entry(namespace, name).map(|e| e.pod.netns)
    }

    pub fn entry(&self, namespace: &str, name: &str) -> Option<Entry> {
        self.map.load().get(&PodRef::new(namespace, name)).cloned()
    }

    /// Every registered pod, for the reconcile loop to walk.
    pub fn snapshot(&self) -> Snapshot {
        self.map.load_full()
    }

    /// Changes when a pod is registered, moves to another netns, or is removed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records where `pod` lives. A new pod, or a known pod in another network namespace (a new
    /// sandbox), starts `Pending`; re-registering the same netns keeps the verdict, so a retried
    /// ADD for an enrolled pod is answered at once.
    pub fn register(&self, pod: PodRef, netns: PodNetns) {
        let changed = self.update(|map| match map.get_mut(&pod) {
            Some(e) if e.pod.netns == netns.netns => {
                if e.pod != netns {
                    e.pod = netns;
                }
                false
            }
            _ => {
                map.insert(pod.clone(), Entry { pod: netns, enrollment: Enrollment::Pending });
                true
            }
        });
        if changed {
            tracing::debug!(%pod, "pod network namespace registered");
            self.changes.send_modify(|v| *v += 1);
        }
    }

    /// Forgets `pod`. With a `container_id`, only if the entry is that sandbox's (a DEL of an old
    /// sandbox arriving after the new one's ADD must not remove the new one) or was scanned.
    /// Returns whether something was removed.
    pub fn remove(&self, namespace: &str, name: &str, container_id: Option<&str>) -> bool {
        let key = PodRef::new(namespace, name);
        let removed = self.update(|map| {
            let matches = map.get(&key).is_some_and(|e| match (container_id, &e.pod.container_id) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            });
            matches && map.remove(&key).is_some()
        });
        if removed {
            tracing::debug!(pod = %key, "pod network namespace removed");
            self.changes.send_modify(|v| *v += 1);
            // A waiting ADD for this pod ends now rather than at its deadline.
            self.verdicts.send_modify(|v| *v += 1);
        }
        removed
    }

    /// Forgets CNI-registered pods whose sandbox is not in `valid` (CNI GC). Scanned pods stay:
    /// they have no sandbox id, and the reconcile loop drops them when their pod goes.
    pub fn retain_sandboxes(&self, valid: &[String]) -> usize {
        let removed = self.update(|map| {
            let before = map.len();
            map.retain(|_, e| match &e.pod.container_id {
                Some(id) if e.pod.source == Source::Cni => valid.iter().any(|v| v == id),
                _ => true,
            });
            before - map.len()
        });
        if removed > 0 {
            self.changes.send_modify(|v| *v += 1);
            self.verdicts.send_modify(|v| *v += 1);
        }
        removed
    }

    /// The reconcile loop enrolled `namespace/name` in `netns`. Ignored when the registry has the
    /// pod in another netns: that verdict is about a sandbox that has been replaced.
    pub fn mark_enrolled(&self, namespace: &str, name: &str, netns: &Path) {
        self.set_verdict(namespace, name, Some(netns), Enrollment::Enrolled);
    }

    /// The reconcile loop found `namespace/name` is not in the mesh.
    pub fn mark_not_captured(&self, namespace: &str, name: &str) {
        self.set_verdict(namespace, name, None, Enrollment::NotCaptured);
    }

    /// Waits until `pod` has a verdict, at most `limit`. `None`: still pending at the deadline,
    /// or removed meanwhile.
    pub async fn wait_verdict(&self, pod: &PodRef, limit: Duration) -> Option<Enrollment> {
        let mut verdicts = self.verdicts.subscribe();
        let wait = async {
            loop {
                match self.map.load().get(pod).map(|e| e.enrollment) {
                    None => return None,
                    Some(Enrollment::Pending) => {}
                    Some(decided) => return Some(decided),
                }
                // The sender lives in `self`, which outlives this borrow.
                let _ = verdicts.changed().await;
            }
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }

    fn set_verdict(&self, namespace: &str, name: &str, netns: Option<&Path>, verdict: Enrollment) {
        let key = PodRef::new(namespace, name);
        // Read first: the reconcile loop marks every pod on every pass, and most are unchanged.
        let current = self.map.load();
        let Some(e) = current.get(&key) else { return };
        if e.enrollment == verdict || netns.is_some_and(|n| n != e.pod.netns) {
            return;
        }
        let changed = self.update(|map| match map.get_mut(&key) {
            Some(e) if e.enrollment != verdict && netns.is_none_or(|n| n == e.pod.netns) => {
                e.enrollment = verdict;
                true
            }
            _ => false,
        });
        if changed {
            tracing::debug!(pod = %key, ?verdict, "pod verdict");
            self.verdicts.send_modify(|v| *v += 1);
        }
    }

    /// Applies `f` to a copy of the map and publishes the copy. `f` must return something
    /// "falsy" (false / 0) when it changed nothing; the copy is published anyway, which is
    /// harmless.
    fn update<T>(&self, f: impl FnOnce(&mut BTreeMap<PodRef, Entry>) -> T) -> T {
        let _guard = self.write.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next = BTreeMap::clone(&self.map.load());
        let out = f(&mut next);
        self.map.store(Arc::new(next));
        out
    }
}

/// The IPs from the CNI result, for the cluster source to use until kubelet reports them. A
/// record with another non-empty uid is a previous pod of the same name: not this one's IPs.
impl crate::state::LocalPodAddresses for PodNetnsRegistry {
    fn pod_ips(&self, namespace: &str, name: &str, uid: &str) -> Option<Vec<IpAddr>> {
        let e = self.entry(namespace, name)?;
        if !uid.is_empty() && !e.pod.uid.is_empty() && e.pod.uid != uid {
            return None;
        }
        Some(e.pod.ips).filter(|ips| !ips.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cni(netns: &str, container: &str) -> PodNetns {
        PodNetns {
            netns: netns.into(),
            uid: "u1".into(),
            container_id: Some(container.into()),
            ips: vec!["10.244.0.7".parse().unwrap()],
            source: Source::Cni,
        }
    }

    #[tokio::test]
    async fn register_wait_and_mark() {
        let reg = Arc::new(PodNetnsRegistry::new());
        let mut changes = reg.subscribe();
        let pod = PodRef::new("demo", "web");
        reg.register(pod.clone(), cni("/run/netns/a", "c1"));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(reg.get("demo", "web"), Some(PathBuf::from("/run/netns/a")));
        assert_eq!(reg.entry("demo", "web").unwrap().enrollment, Enrollment::Pending);

        // Nobody decides: the wait ends at its limit.
        assert_eq!(reg.wait_verdict(&pod, Duration::from_millis(50)).await, None);

        let r2 = reg.clone();
        let marker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            // A verdict about another netns (an old sandbox) is ignored…
            r2.mark_enrolled("demo", "web", Path::new("/run/netns/old"));
            tokio::time::sleep(Duration::from_millis(30)).await;
            r2.mark_enrolled("demo", "web", Path::new("/run/netns/a"));
        });
        let t = std::time::Instant::now();
        assert_eq!(reg.wait_verdict(&pod, Duration::from_secs(5)).await, Some(Enrollment::Enrolled));
        assert!(t.elapsed() >= Duration::from_millis(55), "the stale verdict must not count");
        marker.await.unwrap();
        // Verdicts do not wake the reconcile loop.
        assert!(!changes.has_changed().unwrap());

        // Same netns again (a retried ADD): the verdict stays.
        reg.register(pod.clone(), cni("/run/netns/a", "c1"));
        assert_eq!(reg.wait_verdict(&pod, Duration::from_millis(1)).await, Some(Enrollment::Enrolled));
        assert!(!changes.has_changed().unwrap());
        // A new sandbox: pending again, and the loop is told.
        reg.register(pod.clone(), cni("/run/netns/b", "c2"));
        assert!(changes.has_changed().unwrap());
        assert_eq!(reg.entry("demo", "web").unwrap().enrollment, Enrollment::Pending);
        reg.mark_not_captured("demo", "web");
        assert_eq!(reg.wait_verdict(&pod, Duration::from_millis(1)).await, Some(Enrollment::NotCaptured));
    }

    #[test]
    fn remove_respects_the_sandbox() {
        let reg = PodNetnsRegistry::new();
        reg.register(PodRef::new("demo", "web"), cni("/run/netns/b", "new"));
        assert!(!reg.remove("demo", "web", Some("old")), "a late DEL of the old sandbox");
        assert!(reg.get("demo", "web").is_some());
        assert!(reg.remove("demo", "web", Some("new")));
        assert!(!reg.remove("demo", "web", Some("new")), "DEL is idempotent");
        assert!(reg.get("demo", "web").is_none());
        // Marking an unknown pod is a no-op.
        reg.mark_enrolled("demo", "web", Path::new("/run/netns/b"));
        assert!(reg.snapshot().is_empty());
    }

    #[test]
    fn gc_keeps_valid_sandboxes_and_scanned_pods() {
        let reg = PodNetnsRegistry::new();
        reg.register(PodRef::new("a", "keep"), cni("/run/netns/1", "c-keep"));
        reg.register(PodRef::new("a", "stale"), cni("/run/netns/2", "c-stale"));
        let scanned = PodNetns {
            netns: "/proc/42/ns/net".into(),
            uid: "u".into(),
            container_id: None,
            ips: vec![],
            source: Source::Scan,
        };
        reg.register(PodRef::new("a", "old"), scanned);
        assert_eq!(reg.retain_sandboxes(&["c-keep".to_string()]), 1);
        let names: Vec<String> = reg.snapshot().keys().map(|k| k.name.clone()).collect();
        assert_eq!(names, ["keep", "old"]);
    }

    #[test]
    fn cni_ips_are_offered_for_the_same_pod_only() {
        use crate::state::LocalPodAddresses;
        let reg = PodNetnsRegistry::new();
        reg.register(PodRef::new("demo", "web"), cni("/run/netns/a", "c1"));
        let ip: IpAddr = "10.244.0.7".parse().unwrap();
        assert_eq!(reg.pod_ips("demo", "web", "u1"), Some(vec![ip]));
        assert_eq!(reg.pod_ips("demo", "web", ""), Some(vec![ip]), "the API object has no uid: match by name");
        assert_eq!(reg.pod_ips("demo", "web", "u2"), None, "a recreated pod of the same name");
        assert_eq!(reg.pod_ips("demo", "other", "u1"), None);
        let mut no_ips = cni("/run/netns/b", "c2");
        no_ips.ips.clear();
        reg.register(PodRef::new("demo", "bare"), no_ips);
        assert_eq!(reg.pod_ips("demo", "bare", "u1"), None, "no IPs in the CNI result: nothing to offer");
    }

    #[tokio::test]
    async fn removal_ends_a_wait() {
        let reg = Arc::new(PodNetnsRegistry::new());
        let pod = PodRef::new("demo", "web");
        reg.register(pod.clone(), cni("/run/netns/a", "c1"));
        let r2 = reg.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            r2.remove("demo", "web", None);
        });
        let t = std::time::Instant::now();
        let got = reg.wait_verdict(&pod, Duration::from_secs(2)).await;
        assert_eq!(got, None);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
