//! `weft node` in cluster mode, end to end: configuration from the HTTP-level Kubernetes API
//! double (through a kubeconfig), workload certificates from an in-process `weft ca` over gRPC,
//! pods' network namespaces handed over by the real CNI plugin binary (`weft cni`) as a runtime
//! invokes it. A namespace that is not labelled stays plaintext; labelling it ambient enrolls its
//! pods (ADD returns once they are enrolled) and traffic carries the client's SPIFFE identity over
//! mutual TLS; removing the label unenrolls them. Needs root and the `weft` binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use weft::ca_server::{CaConfig, CaOptions};
use weft_tests::apiserver::{ApiServer, TokenUser};
use weft_tests::mesh::spiffe;
use weft_tests::metrics::Metrics;
use weft_tests::process::{self, Background, Io};
use weft_tests::topology::{Mode, Pod, PodSpec, Topology};
use weft_tests::{AgentOptions, poll, require_root, tail, weft_bin};

const NS: &str = "demo";
const CA_NAME: &str = "weft-ca.weft-system.svc";
const AGENT_TOKEN: &str = "weft-node-token-clmode";
const AMBIENT: &str = "istio.io/dataplane-mode";

fn namespace(ambient: bool) -> Value {
    let labels = if ambient { json!({AMBIENT: "ambient"}) } else { json!({}) };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": labels}})
}

fn pod_object(p: &Pod, node: &str) -> Value {
    let ports: Vec<Value> = p.spec.ports.iter().map(|(n, port)| json!({"name": n, "containerPort": port})).collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.name(), "namespace": p.spec.namespace, "labels": p.spec.labels},
        "spec": {"nodeName": node, "serviceAccountName": p.spec.service_account,
                 "containers": [{"name": "app", "image": "app", "ports": ports}]},
        "status": {"phase": "Running", "podIP": p.ipv4.to_string(),
                   "podIPs": [{"ip": p.ipv4.to_string()}, {"ip": p.ipv6.to_string()}]},
    })
}

/// `weft node` without `--config`, SIGTERMed on drop; its log is printed if the test fails.
struct NodeAgent {
    bg: Option<Background>,
    log: PathBuf,
    opts: AgentOptions,
}

impl NodeAgent {
    fn spawn(topo: &Topology, args: Vec<String>, opts: AgentOptions) -> NodeAgent {
        weft_tests::agent::ensure_bpffs().expect("bpffs");
        let log = topo.dir().join("agent.log");
        let env = [("RUST_LOG", "info,weft=debug"), ("NO_COLOR", "1")];
        let bg = Background::spawn_with_env("weft node", &weft_bin().display().to_string(), &args, &env, &log, Io::Log)
            .expect("spawn weft node");
        NodeAgent { bg: Some(bg), log, opts }
    }

    fn get(&self, addr: &str, path: &str) -> Option<String> {
        let url = format!("http://{addr}{path}");
        process::run_ok("curl", &["-sS", "--fail", "--max-time", "5", &url], Duration::from_secs(10))
            .ok()
            .map(|o| o.stdout)
    }

    fn wait_ready(&mut self, limit: Duration) {
        let ready = poll(limit, Duration::from_millis(100), || {
            if let Some(st) = self.bg.as_mut().and_then(|b| b.exited()) {
                panic!("weft node exited before it was ready: {st}");
            }
            self.get(&self.opts.ready_addr, "/healthz/ready").map(|_| ())
        });
        assert!(ready.is_some(), "weft node not ready within {limit:?}");
    }

    fn metrics(&self) -> Metrics {
        Metrics::parse(&self.get(&self.opts.metrics_addr, "/metrics").expect("scrape /metrics"))
    }

    /// `captured` of `NS/name` in the agent's config dump (None: the pod is unknown).
    fn captured(&self, name: &str) -> Option<bool> {
        let dump: Value = serde_json::from_str(&self.get(&self.opts.admin_addr, "/config_dump")?).ok()?;
        dump["workloads"].as_array()?.iter().find(|w| w["namespace"] == NS && w["name"] == name)?["captured"].as_bool()
    }

    fn wait_captured(&self, names: &[&str], want: bool, limit: Duration) {
        let seen = poll(limit, Duration::from_millis(100), || {
            names.iter().all(|n| self.captured(n) == Some(want)).then_some(())
        });
        assert!(seen.is_some(), "{names:?} not captured={want} in the agent's state within {limit:?}");
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if let Some(mut bg) = self.bg.take() {
            let _ = bg.stop_with(Signal::SIGTERM, Duration::from_secs(10));
        }
        if std::thread::panicking() {
            let text = weft_tests::read_lossy(&self.log);
            eprintln!(
                "===== agent log ({}) =====\n{}\n===== end of agent log =====",
                self.log.display(),
                tail(&text, 300)
            );
        }
    }
}

/// A process in the pod's network namespace, in a cgroup named like kubelet's for pod `uid`
/// (`…-pod<uid>`), as a running pod's containers are: what the agent's `/proc` scan finds.
/// Killed, and its cgroup removed, on drop.
struct PodProcess {
    child: std::process::Child,
    cgroup: PathBuf,
}

impl PodProcess {
    fn start(pod: &Pod, uid: &str) -> PodProcess {
        // cgroup v2: at /sys/fs/cgroup, or at /sys/fs/cgroup/unified on a hybrid host (this one).
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|r| r.join("cgroup.controllers").exists())
            .expect("a cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified");
        let cgroup = root.join(format!("weft-t-clmode-pod{uid}"));
        std::fs::create_dir(&cgroup).expect("create a pod cgroup (needs root)");
        let netns = Path::new(weft::netns::NAMED_NETNS_DIR).join(&pod.netns);
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["sleep", "300"])
            .spawn()
            .expect("spawn nsenter sleep");
        let guard = PodProcess { child, cgroup };
        std::fs::write(guard.cgroup.join("cgroup.procs"), guard.child.id().to_string())
            .expect("move into the pod cgroup");
        guard
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // rmdir only succeeds once the cgroup is empty: bounded wait for the kill to land.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.cgroup.display());
    }
}

/// `weft cni` as a runtime invokes it for ADD; returns (success, stdout, stderr).
fn cni_add(pod: &Pod, socket: &Path) -> (bool, String, String) {
    cni_add_uid(pod, socket, &format!("uid-{}", pod.name()))
}

/// [`cni_add`] with the pod's `K8S_POD_UID`.
fn cni_add_uid(pod: &Pod, socket: &Path, uid: &str) -> (bool, String, String) {
    let netns = Path::new(weft::netns::NAMED_NETNS_DIR).join(&pod.netns);
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": netns}],
        "ips": [{"address": format!("{}/24", pod.ipv4), "interface": 0}],
    });
    let stdin = json!({
        "cniVersion": "1.0.0", "name": "weft-test", "type": "weft-cni",
        "weft_socket": socket, "timeout_secs": 15.0, "prevResult": prev,
    });
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={NS};K8S_POD_NAME={};K8S_POD_UID={uid}", pod.name());
    let mut child = Command::new(weft_bin())
        .arg("cni")
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("sandbox-{}", pod.name()))
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weft cni");
    child.stdin.take().unwrap().write_all(stdin.to_string().as_bytes()).unwrap();
    // The plugin's own timeout (15 s) bounds this wait.
    let out = child.wait_with_output().expect("weft cni output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        let printed: Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("ADD stdout is not JSON ({e}): {stdout}"));
        assert_eq!(printed, prev, "ADD must pass prevResult through unchanged");
    }
    (out.status.success(), stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// GET from client to server; returns the body (`hello from server peer=<ip>:<port> …`).
fn get(client: &Pod, server: &Pod, marker: &str) -> String {
    weft_tests::scenario::get(client, &weft_tests::scenario::pod_url(server, 8080), marker).expect("client → server")
}

#[test]
fn namespace_label_enrolls_and_unenrolls_pods_through_cni_with_the_cluster_ca() {
    require_root();
    let t0 = Instant::now();
    let topo = Topology::builder("clmode")
        .namespace(NS, Mode::Plain)
        .pod(PodSpec::new("client", NS).sa("client"))
        .pod(PodSpec::new("server", NS).sa("server").port("http", 8080))
        .pod(PodSpec::new("fresh", NS).sa("fresh").port("http", 8080))
        .pod(PodSpec::new("running", NS).sa("running").port("http", 8080))
        .build()
        .unwrap();
    let (client, server) = (topo.pod("client"), topo.pod("server"));
    let (fresh, running) = (topo.pod("fresh"), topo.pod("running"));
    let _srv = server.serve_http(8080).unwrap();
    let _fresh_srv = fresh.serve_http(8080).unwrap();
    let _running_srv = running.serve_http(8080).unwrap();
    let node = format!("weft-{}", topo.name());

    // The cluster: the API double, the CA, and the files a DaemonSet pod would have mounted.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let api = rt.block_on(ApiServer::start_new()).expect("API double");
    api.put(namespace(false)).unwrap();
    api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "weft-system"}})).unwrap();
    for sa in ["client", "server", "fresh", "running"] {
        api.put(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NS}}))
            .unwrap();
    }
    let agent_pod = api
        .put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "weft-node-clmode", "namespace": "weft-system"},
            "spec": {"nodeName": node, "serviceAccountName": "weft-node", "containers": [{"name": "weft", "image": "weft"}]},
            "status": {"phase": "Running"},
        }))
        .unwrap();
    let agent_uid = agent_pod["metadata"]["uid"].as_str().unwrap().to_owned();
    for p in [client, server] {
        api.put(pod_object(p, &node)).unwrap();
    }
    // Started before its namespace is labelled: it will get no CNI ADD.
    let running_uid = api.put(pod_object(running, &node)).unwrap()["metadata"]["uid"].as_str().unwrap().to_owned();
    let _running_proc = PodProcess::start(running, &running_uid);
    // Sandbox being created: kubelet has not reported its IP yet (the CNI ADD comes first).
    let mut fresh_obj = pod_object(fresh, &node);
    fresh_obj["status"] = json!({"phase": "Pending"});
    let fresh_uid = api.put(fresh_obj).unwrap()["metadata"]["uid"].as_str().unwrap().to_owned();
    let mut user = TokenUser::service_account(
        "weft-system",
        "weft-node",
        Some(("weft-node-clmode", &agent_uid)),
        Some((&node, "node-uid")),
    );
    user.audiences = vec!["istio-ca".into()];
    api.register_token(AGENT_TOKEN, user);

    let (ca_stop, ca_stopped) = tokio::sync::oneshot::channel::<()>();
    let (ca_addr, ca_task) = rt.block_on(async {
        let kube_client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = CaOptions { config: Arc::new(CaConfig::default()), listener, client: kube_client };
        (
            addr,
            tokio::spawn(weft::ca_server::run(opts, async {
                let _ = ca_stopped.await;
            })),
        )
    });
    let root_pem = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let cm = api.get("v1", "ConfigMap", Some("weft-system"), "weft-ca-root-cert")?;
        cm["data"]["root-cert.pem"].as_str().map(str::to_owned)
    })
    .expect("the CA publishes its root ConfigMap within 10 s");

    let dir = topo.dir();
    let (root_file, token_file, kubeconfig, socket) =
        (dir.join("root-cert.pem"), dir.join("istio-token"), dir.join("kubeconfig.yaml"), dir.join("cni.sock"));
    std::fs::write(&root_file, &root_pem).unwrap();
    std::fs::write(&token_file, AGENT_TOKEN).unwrap();
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\nusers:\n- name: agent\n  user: {{}}\n\
             contexts:\n- name: double\n  context:\n    cluster: double\n    user: agent\ncurrent-context: double\n",
            api.url()
        ),
    )
    .unwrap();
    let _ = std::fs::remove_file(&socket);

    let opts = AgentOptions::for_topology(&topo);
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let s = |p: &Path| p.display().to_string();
    let args: Vec<String> = vec![
        "node".into(),
        "--kubeconfig".into(),
        s(&kubeconfig),
        "--ca-address".into(),
        format!("https://{ca_addr}"),
        "--ca-server-name".into(),
        CA_NAME.into(),
        "--ca-root-cert".into(),
        s(&root_file),
        "--token-path".into(),
        s(&token_file),
        "--cni-socket".into(),
        s(&socket),
        "--node-name".into(),
        node.clone(),
        "--state-dir".into(),
        s(&state),
        "--bpf-pin-dir".into(),
        s(&topo.bpf_pin_dir()),
        "--admin-addr".into(),
        opts.admin_addr.clone(),
        "--metrics-addr".into(),
        opts.metrics_addr.clone(),
        "--ready-addr".into(),
        opts.ready_addr.clone(),
        "--log-format".into(),
        "text".into(),
    ];
    let mut agent = NodeAgent::spawn(&topo, args, opts);
    agent.wait_ready(Duration::from_secs(30));
    agent.wait_captured(&["client", "server"], false, Duration::from_secs(10));
    let t_ready = t0.elapsed();

    let mtls = [
        ("reporter", "destination"),
        ("source_principal", &*spiffe(NS, "client")),
        ("destination_principal", &*spiffe(NS, "server")),
        ("connection_security_policy", "mutual_tls"),
    ];
    let plain_peer = format!("peer={}:", client.ipv4);

    // (1) Not labelled: plaintext, not redirected (the app sees the client's own address).
    let body = get(client, server, "clmode-before");
    assert!(body.contains(&plain_peer), "unlabelled namespace should not be redirected: {body}");
    assert_eq!(
        agent.metrics().sum("istio_tcp_connections_opened_total", &[("source_principal", &*spiffe(NS, "client"))]),
        0.0
    );

    // (2) Label the namespace; ADD (as the runtime would) returns only once the pod is enrolled.
    api.put(namespace(true)).unwrap();
    agent.wait_captured(&["client", "server"], true, Duration::from_secs(10));
    let t_add = Instant::now();
    for p in [server, client] {
        let (ok, stdout, stderr) = cni_add(p, &socket);
        assert!(ok, "CNI ADD of {} failed: stdout {stdout} stderr {stderr}", p.name());
    }
    let add_took = t_add.elapsed();
    // (2b) A pod the API shows without an IP: ADD enrolls it with the IP of the CNI result.
    assert_eq!(agent.captured("fresh"), None, "no IP in the API and no ADD yet: not in the state");
    let (ok, stdout, stderr) = cni_add_uid(fresh, &socket, &fresh_uid);
    assert!(ok, "CNI ADD of an IP-less pod failed: stdout {stdout} stderr {stderr}");
    assert_eq!(agent.captured("fresh"), Some(true));
    // No retry: ADD returned, so both pods are enrolled and the next connection is tunnelled.
    let body = get(client, server, "clmode-mesh");
    assert!(!body.contains(&plain_peer), "enrolled pods should go through the agent: {body}");
    let meshed = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let n = agent.metrics().sum("istio_tcp_connections_opened_total", &mtls);
        (n >= 1.0).then_some(n)
    });
    let meshed = meshed.unwrap_or_else(|| {
        panic!(
            "no mutual-TLS connection from the client in the metrics:\n{}",
            agent.get(&agent.opts.metrics_addr, "/metrics").unwrap_or_default()
        )
    });

    // The IP-less pod and the running pod (no ADD: found by its cgroup) get mutual TLS.
    for (p, marker) in [(fresh, "clmode-fresh"), (running, "clmode-running")] {
        let want = [
            ("reporter", "destination"),
            ("source_principal", &*spiffe(NS, "client")),
            ("destination_principal", &*spiffe(NS, p.name())),
            ("connection_security_policy", "mutual_tls"),
        ];
        let n = poll(Duration::from_secs(10), Duration::from_millis(200), || {
            let body = weft_tests::scenario::get(client, &weft_tests::scenario::pod_url(p, 8080), marker).ok()?;
            assert!(!body.contains(&plain_peer), "{} should be reached through the mesh: {body}", p.name());
            let n = agent.metrics().sum("istio_tcp_connections_opened_total", &want);
            (n >= 1.0).then_some(n)
        });
        assert!(n.is_some(), "no mutual-TLS connection to {} in the metrics", p.name());
    }
    // The API's status catches up: same IP, the pod stays enrolled.
    api.put(pod_object(fresh, &node)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.captured("fresh"), Some(true));
    let body = get(client, fresh, "clmode-fresh-after-status");
    assert!(!body.contains(&plain_peer), "{body}");

    // (3) Unlabel: the pods leave the mesh, traffic is plaintext again and not counted.
    api.put(namespace(false)).unwrap();
    agent.wait_captured(&["client", "server"], false, Duration::from_secs(10));
    let plain_again = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let body =
            weft_tests::scenario::get(client, &weft_tests::scenario::pod_url(server, 8080), "clmode-after").ok()?;
        body.contains(&plain_peer).then_some(body)
    });
    assert!(plain_again.is_some(), "after unlabelling, traffic still goes through the agent");
    for i in 0..3 {
        let body = get(client, server, &format!("clmode-after-{i}"));
        assert!(body.contains(&plain_peer), "{body}");
    }
    let after = agent.metrics().sum("istio_tcp_connections_opened_total", &mtls);
    assert_eq!(after, meshed, "unenrolled traffic must not be counted as mesh traffic");

    drop(agent);
    let _ = ca_stop.send(());
    let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), ca_task).await });
    eprintln!("cluster_mode: ready after {t_ready:?}, both ADDs took {add_took:?}, total {:?}", t0.elapsed());
}
