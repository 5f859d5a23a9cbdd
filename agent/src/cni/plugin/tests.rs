use std::sync::Arc;

use super::*;
use crate::cni::registry::{Enrollment, PodNetnsRegistry};
use crate::cni::server;

/// A flannel-like result: host bridge, host veth end, pod interface; one pod IP on the pod side.
fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
            {"name": "veth1234", "mac": "aa:bb:cc:00:00:02"},
            {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/var/run/netns/cni-1"}
        ],
        "ips": [
            {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 2},
            {"address": "fd00:10:244:1::5/64", "interface": 2},
            {"address": "192.168.0.9/32", "interface": 0}
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn config(socket: &Path, extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "weft-cni",
        "weft_socket": socket,
        "timeout_secs": 2,
        "prevResult": prev_result(),
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    serde_json::to_vec(&c).unwrap()
}

fn env(command: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "f00dcafe0123"),
        ("CNI_NETNS", "/var/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=f00dcafe0123;K8S_POD_UID=3f2a9c1e-7b4d-4e8f-a1b2-0c9d8e7f6a5b",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Runs the plugin; returns (ok, stdout parsed as JSON or Null when empty).
fn invoke(stdin: &[u8], env: &HashMap<String, String>) -> (Result<(), CniError>, Value) {
    let mut out = Vec::new();
    let r = plugin_main(stdin, env, &mut out);
    let v = if out.is_empty() { Value::Null } else { serde_json::from_slice(&out).expect("stdout is one JSON object") };
    (r, v)
}

fn no_agent() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("absent.sock");
    (dir, sock)
}

#[test]
fn version_reports_supported_versions() {
    let e: HashMap<String, String> = [("CNI_COMMAND".to_string(), "VERSION".to_string())].into();
    let (r, out) = invoke(br#"{"cniVersion":"1.1.0"}"#, &e);
    r.unwrap();
    assert_eq!(out["cniVersion"], "1.1.0");
    assert_eq!(out["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    // No input at all: our preferred version.
    let (r, out) = invoke(b"", &e);
    r.unwrap();
    assert_eq!(out["cniVersion"], PREFERRED_VERSION);
}

#[test]
fn config_parsing() {
    let c = PluginConfig::parse(&config(Path::new("/run/weft/x.sock"), json!({"exclude_namespaces": ["kube-system"]})))
        .unwrap();
    assert_eq!(c.cni_version, "1.0.0");
    assert_eq!(c.name, "cbr0");
    assert_eq!(c.socket, PathBuf::from("/run/weft/x.sock"));
    assert_eq!(c.timeout, Duration::from_secs(2));
    assert_eq!(c.exclude_namespaces, ["kube-system"]);
    assert!(c.prev_result.is_some());

    let defaults = PluginConfig::parse(br#"{"cniVersion":"0.4.0","name":"n","type":"weft-cni"}"#).unwrap();
    assert_eq!(defaults.socket, PathBuf::from(DEFAULT_SOCKET));
    assert_eq!(defaults.timeout, DEFAULT_TIMEOUT);
    assert_eq!(defaults.prev_result, None);

    let gc = PluginConfig::parse(
        br#"{"cniVersion":"1.1.0","name":"n","type":"weft-cni","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"},{"containerID":"b","ifname":"eth0"}]}"#,
    )
    .unwrap();
    assert_eq!(gc.valid_container_ids, ["a", "b"]);
    let frac =
        PluginConfig::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"weft-cni","timeout_secs":0.25}"#).unwrap();
    assert_eq!(frac.timeout, Duration::from_millis(250));

    let err = |bytes: &[u8]| PluginConfig::parse(bytes).unwrap_err().code();
    assert_eq!(err(b"{not json"), 6);
    assert_eq!(err(br#"{"cniVersion":"2.0.0","name":"n","type":"weft-cni"}"#), 1);
    assert_eq!(err(br#"{"cniVersion":"0.2.0","name":"n","type":"weft-cni"}"#), 1);
    assert_eq!(err(br#"{"name":"n","type":"weft-cni"}"#), 7);
    assert_eq!(err(br#"{"cniVersion":"1.0.0","name":"n","type":"weft-cni","timeout_secs":0}"#), 7);
    assert_eq!(err(br#"{"cniVersion":"1.0.0","name":"n","type":"weft-cni","weft_socket":"rel.sock"}"#), 7);
}

#[test]
fn env_parsing() {
    let e = CniEnv::parse(&env("ADD")).unwrap();
    assert_eq!(e.command, Command::Add);
    assert_eq!(e.container_id, "f00dcafe0123");
    assert_eq!(e.netns, "/var/run/netns/cni-1");
    assert_eq!(
        e.pod,
        Some(K8sArgs {
            namespace: "demo".into(),
            name: "web-1".into(),
            uid: "3f2a9c1e-7b4d-4e8f-a1b2-0c9d8e7f6a5b".into()
        })
    );

    let mut missing = env("ADD");
    missing.remove("CNI_NETNS");
    missing.insert("CNI_IFNAME".into(), " ".into());
    match CniEnv::parse(&missing).unwrap_err() {
        CniError::InvalidEnv(vars) => assert_eq!(vars, ["CNI_NETNS", "CNI_IFNAME"]),
        other => panic!("{other:?}"),
    }
    // DEL may come without a netns (the sandbox is already gone).
    let mut del = env("DEL");
    del.remove("CNI_NETNS");
    assert_eq!(CniEnv::parse(&del).unwrap().command, Command::Del);
    assert_eq!(CniEnv::parse(&env("BOGUS")).unwrap_err().code(), 4);
    assert_eq!(CniEnv::parse(&HashMap::new()).unwrap_err().code(), 4);

    assert_eq!(K8sArgs::parse("IgnoreUnknown=1"), None);
    assert_eq!(K8sArgs::parse("K8S_POD_NAMESPACE=a"), None);
    assert_eq!(
        K8sArgs::parse("K8S_POD_NAME=p;K8S_POD_NAMESPACE=a;junk"),
        Some(K8sArgs { namespace: "a".into(), name: "p".into(), uid: String::new() })
    );
}

#[test]
fn error_objects_follow_the_spec() {
    let e = CniError::InvalidEnv(vec!["CNI_NETNS".into()]);
    let v = e.to_json("1.0.0");
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["code"], 4);
    assert_eq!(v["msg"], "invalid environment variables");
    assert!(v["details"].as_str().unwrap().contains("CNI_NETNS"));
    let t = CniError::Timeout { socket: "/s".into(), after: Duration::from_secs(3) };
    assert_eq!(t.code(), 11);
    assert_eq!(CniError::Refused { pod: "a/b".into(), message: "x".into() }.code(), 999);
    assert_eq!(CniError::NotAvailable("down".into()).code(), 50);

    // Printed on stdout with the input's version, and the call fails.
    let (dir, sock) = no_agent();
    let mut e = env("ADD");
    e.remove("CNI_CONTAINERID");
    let (r, out) = invoke(&config(&sock, json!({})), &e);
    assert_eq!(r.unwrap_err().code(), 4);
    assert_eq!(out["code"], 4);
    assert_eq!(out["cniVersion"], "1.0.0");
    drop(dir);
}

#[test]
fn sandbox_ips_skip_host_interfaces() {
    let ips = sandbox_ips(&prev_result());
    assert_eq!(ips, ["10.244.1.5".parse::<IpAddr>().unwrap(), "fd00:10:244:1::5".parse().unwrap()]);
    // 0.3.x style without interface indexes: every IP.
    let bare = json!({"ips": [{"version": "4", "address": "10.1.0.7/16"}]});
    assert_eq!(sandbox_ips(&bare), ["10.1.0.7".parse::<IpAddr>().unwrap()]);
    assert!(sandbox_ips(&json!({})).is_empty());
}

#[test]
fn add_without_agent_fails_and_del_succeeds() {
    let (_dir, sock) = no_agent();
    let (r, out) = invoke(&config(&sock, json!({})), &env("ADD"));
    let e = r.unwrap_err();
    assert!(matches!(e, CniError::AgentUnreachable { .. }), "{e:?}");
    assert_eq!(out["code"], 11);
    assert!(out["details"].as_str().unwrap().contains(sock.to_str().unwrap()), "{out}");

    let (r, out) = invoke(&config(&sock, json!({})), &env("DEL"));
    r.unwrap();
    assert_eq!(out, Value::Null, "DEL prints nothing on success");
    // DEL without prevResult or netns either.
    let mut e = env("DEL");
    e.remove("CNI_NETNS");
    let (r, _) = invoke(&config(&sock, json!({"prevResult": null})), &e);
    r.unwrap();
    // GC and STATUS: GC succeeds, STATUS says the plugin cannot serve ADD.
    let (r, _) = invoke(&config(&sock, json!({"prevResult": null})), &env("GC"));
    r.unwrap();
    let (r, out) = invoke(&config(&sock, json!({"prevResult": null})), &env("STATUS"));
    assert_eq!(r.unwrap_err().code(), 50);
    assert_eq!(out["code"], 50);
}

#[test]
fn passthrough_without_asking() {
    let (_dir, sock) = no_agent();
    // Not a Kubernetes pod.
    let mut e = env("ADD");
    e.insert("CNI_ARGS".into(), "IgnoreUnknown=1".into());
    let (r, out) = invoke(&config(&sock, json!({})), &e);
    r.unwrap();
    assert_eq!(out, prev_result());
    // An excluded namespace passes through even with the agent down.
    let (r, out) = invoke(&config(&sock, json!({"exclude_namespaces": ["demo"]})), &env("ADD"));
    r.unwrap();
    assert_eq!(out, prev_result());
    // First in a chain: refused, the configuration is wrong.
    let (r, out) = invoke(&config(&sock, json!({"prevResult": null})), &env("ADD"));
    assert_eq!(r.unwrap_err().code(), 7);
    assert!(out["details"].as_str().unwrap().contains("chained"));
}

/// Plugin and agent in one process, the reconcile side played by a task.
#[test]
fn add_waits_for_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("cni.sock");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let registry = Arc::new(PodNetnsRegistry::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let _guard = rt.enter();
        let listener = server::bind(&sock).unwrap();
        rt.spawn(server::serve(listener, registry.clone(), async {
            let _ = stopped.await;
        }))
    };
    let mode = std::fs::metadata(&sock).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);

    // Reconcile side: enroll demo/web-1 once it shows up.
    let reg = registry.clone();
    rt.spawn(async move {
        let mut changes = reg.subscribe();
        for _ in 0..100 {
            if let Some(netns) = reg.get("demo", "web-1") {
                reg.mark_enrolled("demo", "web-1", &netns);
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
        }
    });
    let (r, out) = invoke(&config(&sock, json!({})), &env("ADD"));
    r.unwrap();
    assert_eq!(out, prev_result(), "prevResult passes through unchanged");
    let entry = registry.entry("demo", "web-1").unwrap();
    assert_eq!(entry.enrollment, Enrollment::Enrolled);
    assert_eq!(entry.pod.uid, "3f2a9c1e-7b4d-4e8f-a1b2-0c9d8e7f6a5b");
    assert_eq!(entry.pod.ips.len(), 2);

    let (r, _) = invoke(&config(&sock, json!({})), &env("CHECK"));
    r.unwrap();
    let (r, _) = invoke(&config(&sock, json!({"prevResult": null})), &env("STATUS"));
    r.unwrap();

    // Nobody decides on another pod: ADD fails with a CNI error after the timeout.
    let mut other = env("ADD");
    other.insert("CNI_ARGS".into(), "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=slow".into());
    let t = Instant::now();
    let (r, out) = invoke(&config(&sock, json!({"timeout_secs": 0.5})), &other);
    let e = r.unwrap_err();
    assert!(matches!(e, CniError::Refused { .. }), "the agent explains its timeout itself: {e:?}");
    assert!(out["details"].as_str().unwrap().contains("not enrolled within"), "{out}");
    assert!(t.elapsed() >= Duration::from_millis(400) && t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // CHECK on that pending pod fails, and says try again later.
    let mut check = other.clone();
    check.insert("CNI_COMMAND".into(), "CHECK".into());
    let (r, _) = invoke(&config(&sock, json!({})), &check);
    assert_eq!(r.unwrap_err().code(), 11);

    let (r, _) = invoke(&config(&sock, json!({})), &env("DEL"));
    r.unwrap();
    assert!(registry.get("demo", "web-1").is_none());

    let _ = stop.send(());
    rt.block_on(server).unwrap();
}

/// An agent shutting down drops waiting ADDs at once: they fail (the runtime retries), they do
/// not pass.
#[test]
fn agent_shutdown_fails_waiting_adds() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("cni.sock");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let _guard = rt.enter();
        let listener = server::bind(&sock).unwrap();
        rt.spawn(server::serve(listener, Arc::new(PodNetnsRegistry::new()), async {
            let _ = stopped.await;
        }))
    };
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let _ = stop.send(());
    });
    let t = Instant::now();
    let (r, out) = invoke(&config(&sock, json!({"timeout_secs": 5})), &env("ADD"));
    assert!(matches!(r, Err(CniError::Protocol(_))), "{r:?}");
    assert_eq!(out["code"], 999);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    stopper.join().unwrap();
    rt.block_on(server).unwrap();
}
