//! The L7 waypoint end to end in netns pods, cluster mode: the node agent and `weft waypoint
//! --kubeconfig … --namespace demo --name waypoint` both read the HTTP-level Kubernetes API double,
//! both hold certificates from an in-process `weft ca` (the waypoint with its own ServiceAccount
//! token), pods are enrolled through the real CNI plugin. Configuration arrives through the API
//! only: `end-user: jason` → v2 else v1 from a VirtualService + DestinationRule, a change of the
//! VirtualService takes effect without a restart, 80/20 v1/v2 over 400 requests, a 50% fault abort,
//! `.*Safari.*` → v1, an L7 DENY AuthorizationPolicy answers 403, and
//! a VirtualService with an invalid regex is left out (logged with its field) while the rest keeps
//! routing. Needs root and the `weft` and `weft-probe` binaries.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use weft::ca_server::{CaConfig, CaOptions};
use weft_tests::apiserver::{ApiServer, TokenUser};
use weft_tests::mesh::spiffe;
use weft_tests::process::{self, Background, Io};
use weft_tests::waypoint::{GATEWAY_NAME_LABEL, served_by};
use weft_tests::{AgentOptions, Mode, Pod, PodSpec, Topology, Waypoint, poll, require_root, tail, weft_bin};

const NS: &str = "demo";
const CA_NAME: &str = "weft-ca.weft-system.svc";
const AGENT_TOKEN: &str = "weft-node-token-wpclus";
const WAYPOINT_TOKEN: &str = "waypoint-token-wpclus";
const WAYPOINT_VIP: &str = "10.96.2.100";
const REVIEWS_VIP: &str = "10.96.2.1";
const RATINGS_VIP: &str = "10.96.2.2";
const USE_WAYPOINT: &str = "istio.io/use-waypoint";

// ---- Objects in the API double ----

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

/// An HTTP service (port 80 → 8080) bound to the waypoint.
fn http_service(name: &str, vip: &str, selector: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS, "labels": {USE_WAYPOINT: "waypoint"}},
        "spec": {"clusterIP": vip, "selector": selector,
                 "ports": [{"name": "http-80", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    })
}

fn reviews_vs(rules: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": NS},
        "spec": {"hosts": ["reviews"], "http": rules},
    })
}

fn to_subset(subset: &str) -> Value {
    json!({"destination": {"host": "reviews", "subset": subset}})
}

/// `ratings` routed by user-agent: `regex` (meant to be `.*Safari.*`) → reviews v1, the rest →
/// reviews v2.
fn ratings_vs(regex: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "ratings-ua", "namespace": NS},
        "spec": {"hosts": ["ratings"], "http": [
            {"match": [{"headers": {"user-agent": {"regex": regex}}}], "route": [to_subset("v1")]},
            {"route": [to_subset("v2")]},
        ]},
    })
}

// ---- Processes and plumbing ----

/// `weft node` in cluster mode, SIGTERMed on drop; its log is printed if the test fails.
struct NodeAgent {
    bg: Option<Background>,
    log: PathBuf,
    opts: AgentOptions,
}

impl NodeAgent {
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

    fn captured(&self, name: &str) -> Option<bool> {
        let dump: Value = serde_json::from_str(&self.get(&self.opts.admin_addr, "/config_dump")?).ok()?;
        dump["workloads"].as_array()?.iter().find(|w| w["namespace"] == NS && w["name"] == name)?["captured"].as_bool()
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

/// `weft cni` as a runtime invokes it for ADD; panics unless it succeeds.
fn cni_add(pod: &Pod, socket: &Path) {
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
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={NS};K8S_POD_NAME={0};K8S_POD_UID=uid-{0}", pod.name());
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
    assert!(
        out.status.success(),
        "CNI ADD of {} failed: stdout {} stderr {}",
        pod.name(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP forwarder listening on 127.0.0.1 inside `pod`'s network namespace to `to` on the host's
/// loopback: the waypoint runs in its pod and reaches the API double and the CA through it, as a
/// real pod reaches them through cluster networking. Stops with the runtime.
fn forward_from_pod(rt: &tokio::runtime::Runtime, pod: &Pod, to: SocketAddr) -> SocketAddr {
    let ns = weft::netns::Netns::open(&pod.netns).expect("open the pod's netns");
    // A thread of its own: setns must not touch a tokio worker. The socket keeps its namespace.
    let std_listener = std::thread::spawn(move || ns.run(|| std::net::TcpListener::bind("127.0.0.1:0")))
        .join()
        .expect("bind thread")
        .expect("enter the pod's netns")
        .expect("bind in the pod");
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {server}\nusers:\n- name: u\n  user: {{}}\n\
         contexts:\n- name: double\n  context:\n    cluster: double\n    user: u\ncurrent-context: double\n"
    )
}

/// [`weft_tests::waypoint::requests`] with this suite's curl limit.
fn requests(pod: &Pod, url: &str, n: usize, headers: &[&str]) -> Vec<(u16, String)> {
    weft_tests::waypoint::requests(pod, url, n, headers, Duration::from_secs(30))
}

fn only(what: &str, n: usize) -> BTreeMap<String, usize> {
    BTreeMap::from([(what.to_string(), n)])
}

/// Polls `check` every 200 ms for at most `limit`; returns how long it took to hold.
fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    let ok = poll(limit, Duration::from_millis(200), || check().then_some(()));
    assert!(ok.is_some(), "{what}: not in effect within {limit:?}");
    t.elapsed()
}

#[test]
fn waypoint_in_cluster_mode_applies_configuration_from_the_api() {
    require_root();
    let t0 = Instant::now();
    let app = |pod: &str, version: &str| {
        PodSpec::new(pod, NS).sa("reviews").label("app", "reviews").label("version", version).port("http", 8080)
    };
    // The namespace mode only shapes mesh.yaml, which cluster mode does not read.
    let topo = Topology::builder("wpclus")
        .namespace(NS, Mode::Ambient)
        .pod(PodSpec::new("client", NS).sa("client"))
        .pod(
            PodSpec::new("waypoint", NS)
                .sa("waypoint")
                .label(GATEWAY_NAME_LABEL, "waypoint")
                .label("istio.io/dataplane-mode", "none"),
        )
        .pod(app("reviews-v1", "v1"))
        .pod(app("reviews-v2", "v2"))
        .build()
        .unwrap();
    let client = topo.pod("client");
    let _servers: Vec<_> = ["reviews-v1", "reviews-v2"].iter().map(|p| topo.pod(p).serve_http(8080).unwrap()).collect();
    let node = format!("weft-{}", topo.name());

    // The cluster: the API double with the namespace, pods, services, the waypoint's Gateway and
    // the reviews subsets; the CA.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let api = rt.block_on(ApiServer::start_new()).expect("API double");
    api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": {"istio.io/dataplane-mode": "ambient"}}}))
        .unwrap();
    api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "weft-system"}})).unwrap();
    for sa in ["client", "reviews", "waypoint"] {
        api.put(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NS}}))
            .unwrap();
    }
    let agent_pod = api
        .put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "weft-node-wpclus", "namespace": "weft-system"},
            "spec": {"nodeName": node, "serviceAccountName": "weft-node", "containers": [{"name": "weft", "image": "weft"}]},
            "status": {"phase": "Running"},
        }))
        .unwrap();
    let agent_uid = agent_pod["metadata"]["uid"].as_str().unwrap().to_owned();
    let mut waypoint_uid = String::new();
    for p in topo.pods() {
        let created = api.put(pod_object(p, &node)).unwrap();
        if p.name() == "waypoint" {
            waypoint_uid = created["metadata"]["uid"].as_str().unwrap().to_owned();
        }
    }
    api.put(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "waypoint", "namespace": NS, "labels": {GATEWAY_NAME_LABEL: "waypoint"}},
        "spec": {"clusterIP": WAYPOINT_VIP, "selector": {GATEWAY_NAME_LABEL: "waypoint"},
                 "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"}]},
    }))
    .unwrap();
    api.put(http_service("reviews", REVIEWS_VIP, json!({"app": "reviews"}))).unwrap();
    // A second service on the same pods: the one an invalid VirtualService targets below.
    api.put(http_service("ratings", RATINGS_VIP, json!({"app": "reviews"}))).unwrap();
    api.put(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": NS},
        "spec": {"gatewayClassName": "weft-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }))
    .unwrap();
    api.put(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": NS},
        "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]},
    }))
    .unwrap();

    // Tokens: the node agent's (bound to its pod and node) and the waypoint's own.
    let mut agent_user = TokenUser::service_account(
        "weft-system",
        "weft-node",
        Some(("weft-node-wpclus", &agent_uid)),
        Some((&node, "node-uid")),
    );
    agent_user.audiences = vec!["istio-ca".into()];
    api.register_token(AGENT_TOKEN, agent_user);
    let mut waypoint_user =
        TokenUser::service_account(NS, "waypoint", Some(("waypoint", &waypoint_uid)), Some((&node, "node-uid")));
    waypoint_user.audiences = vec!["istio-ca".into()];
    api.register_token(WAYPOINT_TOKEN, waypoint_user);

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
    let s = |p: &Path| p.display().to_string();
    let root_file = dir.join("root-cert.pem");
    let (agent_token, agent_kubeconfig, socket) =
        (dir.join("agent-token"), dir.join("agent-kubeconfig"), dir.join("cni.sock"));
    std::fs::write(&root_file, &root_pem).unwrap();
    std::fs::write(&agent_token, AGENT_TOKEN).unwrap();
    std::fs::write(&agent_kubeconfig, kubeconfig(&api.url())).unwrap();
    let _ = std::fs::remove_file(&socket);

    // The node agent (host network namespace).
    weft_tests::agent::ensure_bpffs().expect("bpffs");
    let opts = AgentOptions::for_topology(&topo);
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut args: Vec<String> = vec!["node".into(), "--kubeconfig".into(), s(&agent_kubeconfig)];
    for (flag, value) in [
        ("--ca-address", format!("https://{ca_addr}")),
        ("--ca-server-name", CA_NAME.into()),
        ("--ca-root-cert", s(&root_file)),
        ("--token-path", s(&agent_token)),
        ("--cni-socket", s(&socket)),
        ("--node-name", node.clone()),
        ("--state-dir", s(&state)),
        ("--bpf-pin-dir", s(&topo.bpf_pin_dir())),
        ("--admin-addr", opts.admin_addr.clone()),
        ("--metrics-addr", opts.metrics_addr.clone()),
        ("--ready-addr", opts.ready_addr.clone()),
        ("--log-format", "text".into()),
    ] {
        args.extend([flag.to_string(), value]);
    }
    let log = dir.join("agent.log");
    let env = [("RUST_LOG", "info,weft=debug"), ("NO_COLOR", "1")];
    let bg =
        Background::spawn_with_env("weft node", &s(&weft_bin()), &args, &env, &log, Io::Log).expect("spawn weft node");
    let mut agent = NodeAgent { bg: Some(bg), log, opts };
    agent.wait_ready(Duration::from_secs(30));
    let enrolled = ["client", "reviews-v1", "reviews-v2"];
    let seen = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        (enrolled.iter().all(|n| agent.captured(n) == Some(true)) && agent.captured("waypoint") == Some(false))
            .then_some(())
    });
    assert!(seen.is_some(), "{enrolled:?} captured and the waypoint pod not, within 10 s");
    for p in enrolled {
        cni_add(topo.pod(p), &socket);
    }

    // The waypoint in its pod: API double and CA through forwarders on the pod's loopback.
    let wp_pod = topo.pod("waypoint");
    let api_fwd = forward_from_pod(&rt, wp_pod, api.addr());
    let ca_fwd = forward_from_pod(&rt, wp_pod, ca_addr);
    let (wp_token, wp_kubeconfig) = (dir.join("waypoint-token"), dir.join("waypoint-kubeconfig"));
    std::fs::write(&wp_token, WAYPOINT_TOKEN).unwrap();
    std::fs::write(&wp_kubeconfig, kubeconfig(&format!("http://{api_fwd}"))).unwrap();
    let cluster: Vec<String> = [
        "--kubeconfig",
        &s(&wp_kubeconfig),
        "--ca-address",
        &format!("https://{ca_fwd}"),
        "--ca-server-name",
        CA_NAME,
        "--ca-root-cert",
        &s(&root_file),
        "--token-path",
        &s(&wp_token),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let waypoint = Waypoint::start_cluster(&topo, &weft_bin(), "waypoint", NS, "waypoint", &cluster).unwrap();
    let t_ready = t0.elapsed();
    let reviews = format!("http://{REVIEWS_VIP}/reviews");
    let ratings = format!("http://{RATINGS_VIP}/ratings");

    // (1) end-user: jason → v2, everyone else → v1, from a VirtualService created through the API.
    api.put(reviews_vs(json!([
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [to_subset("v2")]},
        {"route": [to_subset("v1")]},
    ])))
    .unwrap();
    // Four in a row each way: the default route (round robin over both pods) cannot do that.
    let took_vs = within(Duration::from_secs(15), "end-user VirtualService", || {
        served_by(&requests(client, &reviews, 4, &["end-user: jason"])) == only("200 reviews-v2", 4)
            && served_by(&requests(client, &reviews, 4, &["end-user: mallory"])) == only("200 reviews-v1", 4)
    });
    assert_eq!(served_by(&requests(client, &reviews, 20, &["end-user: jason"])), only("200 reviews-v2", 20));
    assert_eq!(served_by(&requests(client, &reviews, 20, &["end-user: mallory"])), only("200 reviews-v1", 20));
    assert_eq!(served_by(&requests(client, &reviews, 20, &[])), only("200 reviews-v1", 20));

    // (2) The VirtualService changed through the API (everything → v2) applies within seconds,
    // without a restart.
    api.put(reviews_vs(json!([{"route": [to_subset("v2")]}]))).unwrap();
    let took_change = within(Duration::from_secs(5), "100% v2 VirtualService", || {
        requests(client, &reviews, 1, &["end-user: mallory"]) == [(200, "reviews-v2".to_string())]
    });
    assert_eq!(served_by(&requests(client, &reviews, 20, &["end-user: mallory"])), only("200 reviews-v2", 20));
    assert_eq!(served_by(&requests(client, &reviews, 10, &["end-user: jason"])), only("200 reviews-v2", 10));

    // (2b) 80/20 between v1 and v2, then a 50% fault abort, both through the API (each change is seen
    // by an answer the previous configuration could not give), then back to 100% v2.
    let split = json!([{"route": [
        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
        {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20},
    ]}]);
    api.put(reviews_vs(split)).unwrap();
    within(Duration::from_secs(5), "80/20 VirtualService", || {
        requests(client, &reviews, 40, &[]).iter().any(|(_, by)| by == "reviews-v1")
    });
    let got = requests(client, &reviews, 400, &[]);
    let v2 = got.iter().filter(|(s, by)| *s == 200 && by == "reviews-v2").count();
    let v1 = got.iter().filter(|(s, by)| *s == 200 && by == "reviews-v1").count();
    assert_eq!(v1 + v2, 400, "{:?}", served_by(&got));
    // 400 draws of p=0.2: σ = 8, so ±40 is five sigma.
    assert!((40..=120).contains(&v2), "v2 got {v2} of 400, expected about 80 (20%)");
    let fault =
        json!([{"route": [to_subset("v2")], "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 50}}}}]);
    api.put(reviews_vs(fault)).unwrap();
    within(Duration::from_secs(5), "fault VirtualService", || {
        requests(client, &reviews, 20, &[]).iter().any(|(s, _)| *s == 503)
    });
    let faulted = requests(client, &reviews, 200, &[]);
    let aborted = faulted.iter().filter(|(s, _)| *s == 503).count();
    let ok = faulted.iter().filter(|(s, by)| *s == 200 && by == "reviews-v2").count();
    assert_eq!(aborted + ok, 200, "{:?}", served_by(&faulted));
    assert!((65..=135).contains(&aborted), "fault abort 50%: {aborted} of 200 aborted");
    api.put(reviews_vs(json!([{"route": [to_subset("v2")]}]))).unwrap();
    within(Duration::from_secs(5), "100% v2 again", || {
        requests(client, &reviews, 20, &[]).iter().all(|(s, by)| *s == 200 && by == "reviews-v2")
    });

    // (3) An L7 DENY AuthorizationPolicy on the waypoint, through the API: POST /admin/* is 403 with
    // Istio's body, GET still passes.
    api.put(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-admin", "namespace": NS},
        "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                 "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"], "paths": ["/admin/*"]}}]}]},
    }))
    .unwrap();
    let post_admin = || {
        let out = client
            .exec(
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "10",
                    "-w",
                    "\n%{http_code}",
                    "-X",
                    "POST",
                    &format!("http://{REVIEWS_VIP}/admin/users"),
                ],
                Duration::from_secs(15),
            )
            .unwrap();
        let (body, code) =
            out.stdout.rsplit_once('\n').map(|(b, c)| (b.to_string(), c.trim().to_string())).unwrap_or_default();
        (code, body)
    };
    within(Duration::from_secs(10), "L7 DENY AuthorizationPolicy", || post_admin().0 == "403");
    let (code, body) = post_admin();
    assert_eq!(code, "403");
    assert!(body.contains("RBAC: access denied"), "Istio's denial body, got {body:?}");
    assert_eq!(
        served_by(&requests(client, &format!("http://{REVIEWS_VIP}/admin/users"), 5, &[])),
        only("200 reviews-v2", 5)
    );

    // (4) A VirtualService whose first rule has an invalid regex: that rule is left out and logged
    // with its field; the VirtualService's other rule and everything else keep routing.
    api.put(ratings_vs("(unclosed")).unwrap();
    let field = "spec.http[0].match[0].headers.user-agent.regex";
    within(Duration::from_secs(10), "log line for the invalid regex", || {
        waypoint
            .log()
            .lines()
            .any(|l| l.contains("configuration left out") && l.contains("ratings-ua") && l.contains(field))
    });
    let safari = "User-Agent: Mozilla/5.0 (Macintosh) Version/17.0 Safari/605.1.15";
    within(Duration::from_secs(5), "ratings VirtualService without its bad rule", || {
        served_by(&requests(client, &ratings, 4, &["User-Agent: curl/8"])) == only("200 reviews-v2", 4)
    });
    assert_eq!(served_by(&requests(client, &ratings, 10, &[safari])), only("200 reviews-v2", 10), "bad rule left out");
    assert_eq!(served_by(&requests(client, &ratings, 10, &["User-Agent: curl/8"])), only("200 reviews-v2", 10));
    assert_eq!(served_by(&requests(client, &reviews, 10, &[])), only("200 reviews-v2", 10), "reviews keeps its VS");
    assert_eq!(post_admin().0, "403", "the L7 policy still applies");
    // Fixed through the API: the rule applies and the problem is reported resolved.
    api.put(ratings_vs(".*Safari.*")).unwrap();
    within(Duration::from_secs(5), "fixed ratings VirtualService", || {
        requests(client, &ratings, 1, &[safari]) == [(200, "reviews-v1".to_string())]
    });
    assert_eq!(served_by(&requests(client, &ratings, 10, &[safari])), only("200 reviews-v1", 10));
    assert_eq!(served_by(&requests(client, &ratings, 10, &["User-Agent: curl/8"])), only("200 reviews-v2", 10));
    within(Duration::from_secs(5), "log line: problem resolved", || {
        waypoint.log().lines().any(|l| l.contains("configuration problem resolved") && l.contains("ratings-ua"))
    });

    // The waypoint's certificate came from `weft ca` for its own ServiceAccount, and it saw the
    // client's identity on every tunnel.
    let own = format!("issued workload certificate identity={}", spiffe(NS, "waypoint"));
    assert!(waypoint.log().contains(&own), "no certificate from the CA for the waypoint's own identity");
    let want = [
        ("reporter", "waypoint"),
        ("source_principal", &*spiffe(NS, "client")),
        ("destination_service_name", "reviews"),
        ("response_code", "200"),
    ];
    let total = waypoint.metrics().unwrap().sum("istio_requests_total", &want);
    assert!(total >= 100.0, "istio_requests_total{want:?} = {total}");

    // One waypoint process throughout: the changes were applied live.
    assert_eq!(waypoint.log().matches("waypoint listening").count(), 1, "the waypoint restarted");

    drop(waypoint);
    drop(agent);
    let _ = ca_stop.send(());
    let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), ca_task).await });
    eprintln!(
        "waypoint_cluster: ready after {t_ready:?}; first VirtualService in effect after {took_vs:?}, \
         change after {took_change:?}; total {:?}",
        t0.elapsed()
    );
}
