//! CNI enrollment as a container runtime drives it: a network namespace per "sandbox"
//! (`ip netns add`), the plugin invoked with the CNI environment and a chained configuration
//! with a `prevResult` on stdin, against the agent's socket server on a temp socket, with the
//! reconcile loop's side played by a test task that opens the reported netns and marks the pod.
//! Plus the `/proc` scan that finds pods that started before the agent, on a real process in a
//! real netns placed in a kubelet-shaped cgroup. Needs root.
//!
//! The plugin runs in-process through `weft::cni::plugin_main` (stdin, environment and stdout
//! passed explicitly, exactly what `weft cni` hands it), because `main.rs` does not wire the
//! `cni` subcommand yet.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft::cni::{self, CniError, Enrollment, PodNetnsRegistry};
use weft::netns::Netns;
use weft_tests::require_root;

/// A named network namespace, deleted on drop (also when the test fails).
struct NetnsGuard(String);

impl NetnsGuard {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let out = Command::new("ip").args(["netns", "add", name]).output().expect("run ip");
        assert!(out.status.success(), "ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr));
        NetnsGuard(name.to_string())
    }

    fn path(&self) -> PathBuf {
        Path::new(weft::netns::NAMED_NETNS_DIR).join(&self.0)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The agent's socket server on a temp socket, on its own runtime; stopped on drop.
struct Agent {
    rt: tokio::runtime::Runtime,
    registry: Arc<PodNetnsRegistry>,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/weft/cni.sock");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let registry = Arc::new(PodNetnsRegistry::new());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        {
            let _guard = rt.enter();
            let listener = cni::bind(&socket).expect("bind the CNI socket");
            rt.spawn(cni::serve(listener, registry.clone(), async {
                let _ = stopped.await;
            }));
        }
        Agent { rt, registry, socket, stop: Some(stop), _dir: dir }
    }

    /// Plays the reconcile loop until the agent is dropped: every registered pod whose namespace
    /// is in `mesh` is enrolled once its netns opens as a real network namespace; the others
    /// are marked not captured. Returns what it enrolled (pod name → netns cookie).
    fn reconcile(&self, mesh: &'static [&'static str]) -> Arc<Mutex<HashMap<String, u64>>> {
        let reg = self.registry.clone();
        let enrolled = Arc::new(Mutex::new(HashMap::new()));
        let out = enrolled.clone();
        self.rt.spawn(async move {
            let mut changes = reg.subscribe();
            // Bounded: no test runs this long; the runtime's drop ends it sooner.
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                for (pod, entry) in reg.snapshot().iter() {
                    if entry.enrollment != Enrollment::Pending {
                        continue;
                    }
                    if !mesh.contains(&pod.namespace.as_str()) {
                        reg.mark_not_captured(&pod.namespace, &pod.name);
                        continue;
                    }
                    match Netns::open(&entry.pod.netns) {
                        Ok(ns) => {
                            out.lock().unwrap().insert(pod.name.clone(), ns.cookie());
                            reg.mark_enrolled(&pod.namespace, &pod.name, &entry.pod.netns);
                        }
                        Err(e) => panic!("reported netns {} does not open: {e}", entry.pod.netns.display()),
                    }
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
            }
        });
        enrolled
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn prev_result(netns: &Path, ip: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
            {"name": "veth0a1b2c3d", "mac": "aa:bb:cc:00:00:02"},
            {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": netns}
        ],
        "ips": [{"address": format!("{ip}/24"), "gateway": "10.244.1.1", "interface": 2}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
        "dns": {}
    })
}

fn stdin(socket: &Path, prev: Option<&Value>, timeout_secs: f64) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "weft-cni",
        "weft_socket": socket,
        "timeout_secs": timeout_secs,
        "exclude_namespaces": ["kube-system"],
    });
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

fn env(command: &str, netns: &Path, namespace: &str, pod: &str) -> HashMap<String, String> {
    let container = format!("sandbox-{pod}");
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container};K8S_POD_UID=3f2a9c1e-7b4d-4e8f-a1b2-0c9d8e7f6a5b"
    );
    [
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", container),
        ("CNI_NETNS", netns.display().to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// What a runtime sees: success or failure, and stdout (parsed, `Null` when empty).
fn run_plugin(stdin: &[u8], env: &HashMap<String, String>) -> (Result<(), CniError>, Value) {
    let mut out = Vec::new();
    let r = cni::plugin_main(stdin, env, &mut out);
    let text = String::from_utf8(out).expect("stdout is UTF-8");
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {text}"))
    };
    (r, v)
}

#[test]
fn add_passes_the_result_through_once_enrolled() {
    require_root();
    let web = NetnsGuard::new("weft-t-cniadd");
    let plain = NetnsGuard::new("weft-t-cniplain");
    let agent = Agent::start();
    let reconcile = agent.reconcile(&["demo"]);

    let prev = prev_result(&web.path(), "10.244.1.5");
    let t = Instant::now();
    let (r, out) = run_plugin(&stdin(&agent.socket, Some(&prev), 5.0), &env("ADD", &web.path(), "demo", "web-1"));
    let took = t.elapsed();
    r.expect("ADD of a mesh pod");
    assert_eq!(out, prev, "ADD prints prevResult unchanged");
    let entry = agent.registry.entry("demo", "web-1").expect("registered");
    assert_eq!(entry.enrollment, Enrollment::Enrolled);
    assert_eq!(entry.pod.netns, web.path());
    assert_eq!(entry.pod.container_id.as_deref(), Some("sandbox-web-1"));
    assert_eq!(entry.pod.ips, ["10.244.1.5".parse::<std::net::IpAddr>().unwrap()]);
    assert!(took < Duration::from_secs(2), "ADD took {took:?}");

    // A pod outside the mesh passes through as well.
    let prev_plain = prev_result(&plain.path(), "10.244.1.6");
    let (r, out) = run_plugin(&stdin(&agent.socket, Some(&prev_plain), 5.0), &env("ADD", &plain.path(), "plain", "p"));
    r.expect("ADD of a pod outside the mesh");
    assert_eq!(out, prev_plain);
    assert_eq!(agent.registry.entry("plain", "p").unwrap().enrollment, Enrollment::NotCaptured);

    // CHECK after ADD: nothing printed, success.
    let (r, out) = run_plugin(&stdin(&agent.socket, Some(&prev), 5.0), &env("CHECK", &web.path(), "demo", "web-1"));
    r.expect("CHECK of an enrolled pod");
    assert_eq!(out, Value::Null);
    // STATUS: the agent is there.
    let (r, _) = run_plugin(&stdin(&agent.socket, None, 5.0), &env("STATUS", &web.path(), "demo", "web-1"));
    r.expect("STATUS with the agent up");

    // DEL of an old sandbox of the same pod leaves the current one; the right DEL removes it.
    let mut stale = env("DEL", &web.path(), "demo", "web-1");
    stale.insert("CNI_CONTAINERID".into(), "sandbox-old".into());
    run_plugin(&stdin(&agent.socket, Some(&prev), 5.0), &stale).0.expect("DEL");
    assert!(agent.registry.get("demo", "web-1").is_some());
    let (r, out) = run_plugin(&stdin(&agent.socket, Some(&prev), 5.0), &env("DEL", &web.path(), "demo", "web-1"));
    r.expect("DEL");
    assert_eq!(out, Value::Null);
    assert!(agent.registry.get("demo", "web-1").is_none(), "DEL unregisters the pod");

    // The reconcile side opened the sandbox's own namespace.
    let want = Netns::open(web.path()).unwrap().cookie();
    assert_eq!(reconcile.lock().unwrap().get("web-1"), Some(&want));
}

#[test]
fn many_pods_at_once() {
    require_root();
    const N: usize = 12;
    let nets: Vec<NetnsGuard> = (0..N).map(|i| NetnsGuard::new(&format!("weft-t-cnimany{i}"))).collect();
    let agent = Agent::start();
    let _reconcile = agent.reconcile(&["demo"]);
    let t = Instant::now();
    let results: Vec<(Result<(), CniError>, Value, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = nets
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let socket = agent.socket.clone();
                s.spawn(move || {
                    let prev = prev_result(&ns.path(), &format!("10.244.1.{}", 10 + i));
                    let (r, out) = run_plugin(
                        &stdin(&socket, Some(&prev), 10.0),
                        &env("ADD", &ns.path(), "demo", &format!("p{i}")),
                    );
                    (r, out, prev)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = t.elapsed();
    for (i, (r, out, prev)) in results.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("pod p{i}: {e}"));
        assert_eq!(out, prev);
    }
    assert_eq!(agent.registry.snapshot().len(), N);
    assert!(agent.registry.snapshot().values().all(|e| e.enrollment == Enrollment::Enrolled));
    assert!(took < Duration::from_secs(5), "{N} concurrent ADDs took {took:?}");
    eprintln!("{N} concurrent ADDs answered in {took:?}");
}

#[test]
fn add_fails_when_nobody_enrolls_the_pod() {
    require_root();
    let ns = NetnsGuard::new("weft-t-cnislow");
    let agent = Agent::start();
    // No reconcile side: the pod stays pending.
    let prev = prev_result(&ns.path(), "10.244.1.7");
    let t = Instant::now();
    let (r, out) = run_plugin(&stdin(&agent.socket, Some(&prev), 0.6), &env("ADD", &ns.path(), "demo", "slow"));
    let took = t.elapsed();
    let e = r.expect_err("ADD must fail when the pod is not enrolled");
    assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(3), "failed after {took:?}");
    assert_eq!(out["cniVersion"], "1.0.0");
    assert_eq!(out["code"], e.code());
    assert!(out["msg"].is_string());
    assert!(out["details"].as_str().unwrap().contains("not enrolled within"), "{out}");
    assert!(out.get("ips").is_none(), "no result on failure");
    // CHECK on it: try again later.
    let (r, out) = run_plugin(&stdin(&agent.socket, Some(&prev), 5.0), &env("CHECK", &ns.path(), "demo", "slow"));
    assert_eq!(r.expect_err("CHECK of a pending pod").code(), 11);
    assert_eq!(out["code"], 11);
    // The runtime follows a failed ADD with DEL, which succeeds.
    run_plugin(&stdin(&agent.socket, Some(&prev), 5.0), &env("DEL", &ns.path(), "demo", "slow")).0.expect("DEL");
    assert!(agent.registry.snapshot().is_empty());
}

#[test]
fn agent_absent_add_fails_del_succeeds() {
    require_root();
    let ns = NetnsGuard::new("weft-t-cninoagent");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let prev = prev_result(&ns.path(), "10.244.1.8");

    let t = Instant::now();
    let (r, out) = run_plugin(&stdin(&socket, Some(&prev), 5.0), &env("ADD", &ns.path(), "demo", "web"));
    assert!(matches!(r, Err(CniError::AgentUnreachable { .. })), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "no waiting when nobody listens");
    assert_eq!(out["code"], 11);
    assert!(out["details"].as_str().unwrap().contains(socket.to_str().unwrap()));

    // A socket file with no agent behind it (the agent died): same.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let (r, _) = run_plugin(&stdin(&socket, Some(&prev), 5.0), &env("ADD", &ns.path(), "demo", "web"));
    assert!(matches!(r, Err(CniError::AgentUnreachable { .. })), "{r:?}");

    for cmd in ["DEL", "GC"] {
        let (r, out) = run_plugin(&stdin(&socket, Some(&prev), 5.0), &env(cmd, &ns.path(), "demo", "web"));
        r.unwrap_or_else(|e| panic!("{cmd} must succeed with the agent down: {e}"));
        assert_eq!(out, Value::Null);
    }
    let (r, out) = run_plugin(&stdin(&socket, None, 5.0), &env("STATUS", &ns.path(), "demo", "web"));
    assert_eq!(r.expect_err("STATUS with the agent down").code(), 50);
    assert_eq!(out["code"], 50);
    // kube-system pods start anyway.
    let (r, out) = run_plugin(&stdin(&socket, Some(&prev), 5.0), &env("ADD", &ns.path(), "kube-system", "coredns"));
    r.expect("excluded namespace");
    assert_eq!(out, prev);
}

#[test]
fn version() {
    let e: HashMap<String, String> = [("CNI_COMMAND".to_string(), "VERSION".to_string())].into();
    let (r, out) = run_plugin(br#"{"cniVersion":"0.4.0"}"#, &e);
    r.unwrap();
    assert_eq!(out, json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}));
    // An ADD in a version we do not speak: error code 1.
    let ns_path = Path::new("/var/run/netns/none");
    let mut cfg: Value = serde_json::from_slice(&stdin(Path::new("/nonexistent.sock"), None, 1.0)).unwrap();
    cfg["cniVersion"] = json!("2.0.0");
    let (r, out) = run_plugin(&serde_json::to_vec(&cfg).unwrap(), &env("ADD", ns_path, "demo", "x"));
    assert_eq!(r.unwrap_err().code(), 1);
    assert_eq!(out["code"], 1);
    assert_eq!(out["cniVersion"], "2.0.0");
}

/// A cgroup made to look like kubelet's (systemd driver), removed on drop.
struct CgroupGuard {
    dirs: Vec<PathBuf>,
    child: Option<std::process::Child>,
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.dirs.iter().rev() {
            // A cgroup can be removed once its processes are gone; that takes a moment.
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A writable cgroup hierarchy: the v2 mount if there is one, else the first v1 hierarchy.
fn cgroup_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mut v1 = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        match f[2] {
            "cgroup2" => return PathBuf::from(f[1]),
            "cgroup" if v1.is_none() => v1 = Some(PathBuf::from(f[1])),
            _ => {}
        }
    }
    v1.expect("no cgroup hierarchy mounted: the scan test needs one (mount cgroup2 on /sys/fs/cgroup)")
}

#[test]
fn running_pod_found_by_cgroup_scan() {
    require_root();
    let uid = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
    let ns = NetnsGuard::new("weft-t-cniscan");
    let root = cgroup_root();
    let base = root.join("weft-t-cniscan");
    let mut guard = CgroupGuard { dirs: Vec::new(), child: None };
    let mut dir = base.clone();
    let pod_slice = format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
    for part in ["kubepods.slice", "kubepods-besteffort.slice", pod_slice.as_str(), "cri-containerd-0a1b2c.scope"] {
        if guard.dirs.is_empty() {
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            guard.dirs.push(dir.clone());
        }
        dir = dir.join(part);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        guard.dirs.push(dir.clone());
    }
    // The pod's process: in the sandbox netns (`ip netns exec` execs, so the pid is sleep's).
    let child =
        Command::new("ip").args(["netns", "exec", &ns.0, "sleep", "30"]).spawn().expect("spawn sleep in the netns");
    let pid = child.id();
    guard.child = Some(child);
    // Move it into the pod's cgroup once it is in the netns.
    let deadline = Instant::now() + Duration::from_secs(5);
    let want_ino = std::fs::metadata(ns.path()).unwrap().ino();
    while std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()).ok() != Some(want_ino) {
        assert!(Instant::now() < deadline, "the child never entered the netns");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(dir.join("cgroup.procs"), pid.to_string()).expect("move the process into the pod cgroup");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&pod_slice), "{cgroup}");

    let t = Instant::now();
    let found = cni::find_pod_netns(uid);
    let took = t.elapsed();
    // The runtime's named bind mount is returned when one matches.
    assert_eq!(found, Some(ns.path()), "scan took {took:?}");
    assert_eq!(cni::find_pod_netns(&uid.replace('-', "_")), Some(ns.path()));
    assert_eq!(cni::scan_pods_netns().get(uid), Some(&ns.path()));
    assert_eq!(cni::find_pod_netns("00000000-0000-0000-0000-000000000000"), None);
    eprintln!("scan of /proc found the pod in {took:?}");

    // A hostNetwork pod (same cgroup shape, host namespace) has no netns of its own.
    let host_uid = "1d2e3f4a-5b6c-4d7e-8f9a-0b1c2d3e4f5a";
    let host_dir = base.join(format!("kubepods-pod{}.slice", host_uid.replace('-', "_")));
    std::fs::create_dir(&host_dir).unwrap();
    guard.dirs.insert(1, host_dir.clone());
    let mut host_child = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(host_dir.join("cgroup.procs"), host_child.id().to_string()).unwrap();
    let host_found = cni::find_pod_netns(host_uid);
    let _ = host_child.kill();
    let _ = host_child.wait();
    assert_eq!(host_found, None);
}
