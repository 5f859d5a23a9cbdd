//! Finding a running pod's network namespace without the container runtime, for pods that will
//! get no CNI ADD: their namespace was labelled after they started, or the agent restarted and
//! lost its in-memory registry.
//!
//! How: kubelet puts every container of a pod under a cgroup whose path names the pod UID —
//! `…/kubepods-besteffort-pod<uid with _>.slice/…` with the systemd driver,
//! `…/kubepods/besteffort/pod<uid>/…` with cgroupfs, with or without a QoS level, under a
//! `kubelet.slice` prefix on kind, relative (`/../..`) when the agent has its own cgroup
//! namespace. So the scan reads `/proc/<pid>/cgroup` of every process, keeps those naming the
//! UID, and returns the network namespace of one that is not in the host's namespace (a
//! `hostNetwork` pod has no namespace of its own). ztunnel's node agent finds pods of an already
//! running namespace the same way. Needs the host's PID namespace (`hostPID: true`).
//!
//! The returned path is the runtime's named bind mount under `/var/run/netns` when one matches
//! (stable for the sandbox's life), else `/proc/<pid>/ns/net` (valid while that process lives:
//! open it at once; an open handle keeps the namespace).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::netns::NAMED_NETNS_DIR;

/// The network namespace of the running pod `uid` on this node, if it has its own.
pub fn find_pod_netns(uid: &str) -> Option<PathBuf> {
    find_pod_netns_in(Path::new("/proc"), Path::new(NAMED_NETNS_DIR), uid)
}

/// Every running pod on this node that has its own network namespace, by UID (normalised:
/// lower case, `-` separators), in one pass over `/proc`.
pub fn scan_pods_netns() -> HashMap<String, PathBuf> {
    scan(Path::new("/proc"), Path::new(NAMED_NETNS_DIR), None)
}

/// [`find_pod_netns`] against another `/proc` and named-netns directory (tests).
pub fn find_pod_netns_in(proc_root: &Path, named_dir: &Path, uid: &str) -> Option<PathBuf> {
    let want = normalise_uid(uid)?;
    scan(proc_root, named_dir, Some(&want)).remove(&want)
}

/// The pod UID in a `/proc/<pid>/cgroup` file, normalised. v1 files list one line per
/// hierarchy, v2 one `0::` line; any line naming a pod will do.
pub fn pod_uid_from_cgroup(contents: &str) -> Option<String> {
    contents.lines().find_map(|line| {
        // hierarchy-ID:controllers:path — the path itself may contain ':'.
        let path = line.splitn(3, ':').nth(2)?;
        path.split('/').rev().find_map(pod_uid_in_component)
    })
}

/// `pod<uid>` or `…-pod<uid>` (optionally `.slice`) → the UID.
fn pod_uid_in_component(component: &str) -> Option<String> {
    let c = component.strip_suffix(".slice").unwrap_or(component);
    let rest = match c.strip_prefix("pod") {
        Some(rest) => rest,
        None => &c[c.rfind("-pod")? + 4..],
    };
    normalise_uid(rest)
}

/// A UID as kubelet writes it: 36 characters with `-` (cgroupfs) or `_` (systemd) separators,
/// or 32 hex digits (static pods' UIDs are a hash of their manifest).
fn normalise_uid(s: &str) -> Option<String> {
    let lower = s.to_ascii_lowercase().replace('_', "-");
    let b = lower.as_bytes();
    let ok = match b.len() {
        36 => b
            .iter()
            .enumerate()
            .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { *c == b'-' } else { c.is_ascii_hexdigit() }),
        32 => b.iter().all(u8::is_ascii_hexdigit),
        _ => false,
    };
    ok.then_some(lower)
}

/// (device, inode) of a namespace file: equal for every path to the same namespace.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn scan(proc_root: &Path, named_dir: &Path, only: Option<&str>) -> HashMap<String, PathBuf> {
    let Some(host) = ns_id(&proc_root.join("self/ns/net")) else {
        tracing::warn!(proc = %proc_root.display(), "cannot read the agent's own network namespace; pod scan skipped");
        return HashMap::new();
    };
    let Ok(dir) = std::fs::read_dir(proc_root) else { return HashMap::new() };
    // Per pod: the chosen process, whether it is the sandbox's pause process, and its netns id.
    let mut found: HashMap<String, (u32, bool, (u64, u64))> = HashMap::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let pid_dir = entry.path();
        // Processes exit during the scan: every read may fail, and then the process is skipped.
        let Ok(cgroup) = std::fs::read_to_string(pid_dir.join("cgroup")) else { continue };
        let Some(uid) = pod_uid_from_cgroup(&cgroup) else { continue };
        if only.is_some_and(|want| want != uid) {
            continue;
        }
        let Some(id) = ns_id(&pid_dir.join("ns/net")) else { continue };
        if id == host {
            continue;
        }
        // Prefer the pause process (it holds the sandbox for the pod's whole life), then the
        // lowest pid.
        let pause = std::fs::read_to_string(pid_dir.join("comm")).is_ok_and(|c| c.trim() == "pause");
        let better = match found.get(&uid) {
            None => true,
            Some(&(other, other_pause, _)) => (pause, std::cmp::Reverse(pid)) > (other_pause, std::cmp::Reverse(other)),
        };
        if better {
            found.insert(uid, (pid, pause, id));
        }
    }
    let named = named_netns(named_dir);
    found
        .into_iter()
        .map(|(uid, (pid, _, id))| {
            let path = named.get(&id).cloned().unwrap_or_else(|| proc_root.join(pid.to_string()).join("ns/net"));
            (uid, path)
        })
        .collect()
}

/// The runtime's named network namespaces, by namespace id.
fn named_netns(dir: &Path) -> HashMap<(u64, u64), PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return HashMap::new() };
    entries.flatten().filter_map(|e| ns_id(&e.path()).map(|id| (id, e.path()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f2a9c1e-7b4d-4e8f-a1b2-0c9d8e7f6a5b";

    #[test]
    fn uid_from_systemd_cgroup_v2() {
        let line = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3f2a9c1e_7b4d_4e8f_a1b2_0c9d8e7f6a5b.slice/cri-containerd-5d1c0a9e8b7f6e5d4c3b2a1908f7e6d5c4b3a291807f6e5d4c3b2a19080706f5.scope\n";
        assert_eq!(pod_uid_from_cgroup(line).as_deref(), Some(UID));
        // Guaranteed QoS has no QoS slice.
        let guaranteed = "0::/kubepods.slice/kubepods-pod3f2a9c1e_7b4d_4e8f_a1b2_0c9d8e7f6a5b.slice/crio-abc.scope";
        assert_eq!(pod_uid_from_cgroup(guaranteed).as_deref(), Some(UID));
        // kind: kubelet's cgroup root is /kubelet.
        let kind = "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod3f2a9c1e_7b4d_4e8f_a1b2_0c9d8e7f6a5b.slice/cri-containerd-ab12.scope";
        assert_eq!(pod_uid_from_cgroup(kind).as_deref(), Some(UID));
        // Seen from an agent in its own cgroup namespace.
        let relative =
            "0::/../../kubepods-besteffort-pod3f2a9c1e_7b4d_4e8f_a1b2_0c9d8e7f6a5b.slice/cri-containerd-ab12.scope";
        assert_eq!(pod_uid_from_cgroup(relative).as_deref(), Some(UID));
    }

    #[test]
    fn uid_from_cgroupfs_v1_and_v2() {
        let v1 = "12:pids:/kubepods/burstable/pod3f2a9c1e-7b4d-4e8f-a1b2-0c9d8e7f6a5b/0e1d2c3b4a59687766554433221100ffeeddccbbaa99887766554433221100\n\
                  11:memory:/kubepods/burstable/pod3f2a9c1e-7b4d-4e8f-a1b2-0c9d8e7f6a5b/0e1d2c3b4a59687766554433221100ffeeddccbbaa99887766554433221100\n\
                  1:name=systemd:/kubepods/burstable/pod3f2a9c1e-7b4d-4e8f-a1b2-0c9d8e7f6a5b/0e1d2c3b\n0::/\n";
        assert_eq!(pod_uid_from_cgroup(v1).as_deref(), Some(UID));
        let v2 = "0::/kubepods/pod3f2a9c1e-7b4d-4e8f-a1b2-0c9d8e7f6a5b/0e1d2c3b4a59";
        assert_eq!(pod_uid_from_cgroup(v2).as_deref(), Some(UID));
        // A static pod: its UID is a 32-digit hash.
        let static_pod = "0::/kubepods/burstable/podd41d8cd98f00b204e9800998ecf8427e/abc";
        assert_eq!(pod_uid_from_cgroup(static_pod).as_deref(), Some("d41d8cd98f00b204e9800998ecf8427e"));
    }

    #[test]
    fn non_pod_cgroups_have_no_uid() {
        for line in [
            "0::/",
            "0::/system.slice/containerd.service",
            "0::/user.slice/user-1000.slice/session-3.scope",
            "0::/kubepods.slice/kubepods-besteffort.slice",
            "0::/podman-1234.scope",
            "0::/kubepods/pod1234/abc",
            "4:memory:/process_api/13659092c3615563e05d230340afa900",
        ] {
            assert_eq!(pod_uid_from_cgroup(line), None, "{line}");
        }
        assert_eq!(normalise_uid("3F2A9C1E-7B4D-4E8F-A1B2-0C9D8E7F6A5B").as_deref(), Some(UID));
    }

    /// A fake `/proc`: `ns/net` files stand in for namespaces (their inode is the identity).
    #[test]
    fn scan_picks_a_pod_process_outside_the_host_namespace() {
        let root = tempfile::tempdir().unwrap();
        let proc_root = root.path().join("proc");
        let named = root.path().join("netns");
        std::fs::create_dir_all(&named).unwrap();
        let mk = |pid: &str, cgroup: &str, comm: &str, ns: Option<&Path>| {
            let d = proc_root.join(pid);
            std::fs::create_dir_all(d.join("ns")).unwrap();
            std::fs::write(d.join("cgroup"), cgroup).unwrap();
            std::fs::write(d.join("comm"), comm).unwrap();
            match ns {
                Some(target) => std::fs::hard_link(target, d.join("ns/net")).unwrap(),
                None => std::fs::write(d.join("ns/net"), b"").unwrap(),
            }
        };
        mk("self", "0::/", "weft", None);
        let host_ns = proc_root.join("self/ns/net");
        let pod_ns = named.join("cni-1234");
        std::fs::write(&pod_ns, b"").unwrap();
        let cg = format!("0::/kubepods/besteffort/pod{UID}/c1\n");
        mk("100", "0::/system.slice/containerd.service\n", "containerd", Some(&host_ns));
        mk("200", &cg, "app", Some(&pod_ns));
        mk("150", &cg, "pause", Some(&pod_ns));
        // A hostNetwork pod: same cgroup shape, host namespace.
        let host_pod = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
        mk("300", &format!("0::/kubepods/pod{host_pod}/c\n"), "agent", Some(&host_ns));
        std::fs::create_dir_all(proc_root.join("not-a-pid")).unwrap();

        // The runtime's bind mount is preferred over /proc/<pid>/ns/net.
        assert_eq!(find_pod_netns_in(&proc_root, &named, UID), Some(pod_ns.clone()));
        assert_eq!(find_pod_netns_in(&proc_root, &named, &UID.replace('-', "_").to_uppercase()), Some(pod_ns.clone()));
        assert_eq!(
            find_pod_netns_in(&proc_root, &named, host_pod),
            None,
            "hostNetwork pods have no netns of their own"
        );
        assert_eq!(find_pod_netns_in(&proc_root, &named, "11111111-2222-3333-4444-555555555555"), None);
        assert_eq!(find_pod_netns_in(&proc_root, &named, "not a uid"), None);

        // Without a bind mount: the pause process's /proc path.
        std::fs::remove_file(&pod_ns).unwrap();
        let empty = root.path().join("no-netns");
        assert_eq!(find_pod_netns_in(&proc_root, &empty, UID), Some(proc_root.join("150/ns/net")));
        let all = scan(&proc_root, &empty, None);
        assert_eq!(all.len(), 1, "{all:?}");
    }
}
