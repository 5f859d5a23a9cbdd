//! A Kubernetes cluster for cluster-mode runs of weft, in process: the HTTP-level API double
//! ([`ApiServer`]) with the `weft-system` namespace, the mesh CA (`weft::ca_server::run`, the code
//! behind `weft ca`) publishing its root ConfigMap, and the plumbing a DaemonSet or a container
//! runtime would provide: `weft node` started with a kubeconfig, a ServiceAccount token and the
//! root certificate ([`NodeAgent`]), pods as the API shows them ([`pod_object`]), CNI ADD through
//! the real `weft cni` binary ([`cni_add`]), a pod's process in a kubelet-like cgroup
//! ([`PodProcess`]), and `weft waypoint` reaching the API and the CA from inside its pod
//! ([`Cluster::start_waypoint`]).
//!
//! It owns setup and teardown only; it asserts nothing about weft's behaviour (the suites and the
//! bench do). Fallible steps return `anyhow::Result` so a bench can report instead of panicking;
//! nothing here panics except on a broken invariant of the harness itself. Needs root (netns,
//! cgroups, eBPF through the agent) and the `weft` binary ([`crate::weft_bin`]). Call it from a
//! plain thread, not from inside a Tokio runtime: [`Cluster`] owns its own.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use weft::ca_server::{CaConfig, CaOptions};

use crate::apiserver::{ApiServer, TokenUser};
use crate::metrics::Metrics;
use crate::process::{self, Background, Io};
use crate::topology::{Pod, Topology};
use crate::waypoint::Waypoint;
use crate::{AgentOptions, poll, read_lossy, tail, weft_bin};

/// Where `weft ca` and the node agents live.
pub const SYSTEM_NAMESPACE: &str = "weft-system";
/// The name the CA's serving certificate carries (`--ca-server-name`).
pub const CA_SERVER_NAME: &str = "weft-ca.weft-system.svc";
/// The ConfigMap (in every namespace) with the mesh root certificate.
const ROOT_CONFIGMAP: &str = "weft-ca-root-cert";
/// Audience of the tokens the CA accepts.
const CA_AUDIENCE: &str = "istio-ca";

type CaTask = tokio::task::JoinHandle<Result<(), weft::ca_server::Error>>;

/// The API double and the CA on a runtime of their own; stops the CA and the double on drop.
pub struct Cluster {
    // Field order is drop order: the CA and the double stop before the runtime goes.
    ca: Option<(tokio::sync::oneshot::Sender<()>, CaTask)>,
    api: ApiServer,
    ca_addr: SocketAddr,
    root_file: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// Starts the API double (with `weft-system`) and the CA, waits (≤ 10 s) for the CA's root
    /// ConfigMap and writes the root certificate to `dir/root-cert.pem`.
    pub fn start(dir: &Path) -> Result<Cluster> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let api = rt.block_on(ApiServer::start_new()).context("start the API double")?;
        api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NAMESPACE}}))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ca_addr, task) = rt.block_on(async {
            let client = kube::Client::try_from(kube::Config::new(api.url().parse()?))?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let opts = CaOptions { config: Arc::new(CaConfig::default()), listener, client };
            let task = tokio::spawn(weft::ca_server::run(opts, async {
                let _ = stopped.await;
            }));
            anyhow::Ok((addr, task))
        })?;
        let mut cluster = Cluster { ca: Some((stop, task)), api, ca_addr, root_file: dir.join("root-cert.pem"), rt };
        let root = poll(Duration::from_secs(10), Duration::from_millis(50), || {
            let cm = cluster.api.get("v1", "ConfigMap", Some(SYSTEM_NAMESPACE), ROOT_CONFIGMAP)?;
            cm["data"]["root-cert.pem"].as_str().map(str::to_owned)
        });
        let Some(root) = root else {
            let ca = cluster.ca.take().map(|(_, task)| task);
            let why = match ca {
                Some(task) if task.is_finished() => format!("{:?}", cluster.rt.block_on(task)),
                _ => "still running".into(),
            };
            bail!("the CA did not publish {SYSTEM_NAMESPACE}/{ROOT_CONFIGMAP} within 10 s (CA task: {why})");
        };
        std::fs::write(&cluster.root_file, root).context("write the root certificate")?;
        Ok(cluster)
    }

    /// The API double: put, get and remove objects as a user applying YAML would.
    pub fn api(&self) -> &ApiServer {
        &self.api
    }

    /// The runtime the double and the CA run on (for forwarders and other helpers).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    /// The CA's gRPC address on the host's loopback.
    pub fn ca_addr(&self) -> SocketAddr {
        self.ca_addr
    }

    /// The mesh root certificate (PEM), as a pod would have it mounted.
    pub fn root_cert_file(&self) -> &Path {
        &self.root_file
    }

    /// Puts `obj` and returns its `metadata.uid`.
    pub fn put_uid(&self, obj: Value) -> Result<String> {
        let created = self.api.put(obj)?;
        created["metadata"]["uid"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no uid in {created}"))
    }

    /// Registers `token` for ServiceAccount `namespace/sa`, bound to pod `pod` (which must be in
    /// the double) on `node`, with the CA's audience.
    pub fn register_pod_token(&self, token: &str, namespace: &str, sa: &str, pod: &str, node: &str) -> Result<()> {
        let obj = self
            .api
            .get("v1", "Pod", Some(namespace), pod)
            .ok_or_else(|| anyhow!("pod {namespace}/{pod} is not in the API double: put it first"))?;
        let uid = obj["metadata"]["uid"].as_str().ok_or_else(|| anyhow!("no uid on pod {namespace}/{pod}"))?;
        let mut user = TokenUser::service_account(namespace, sa, Some((pod, uid)), Some((node, "node-uid")));
        user.audiences = vec![CA_AUDIENCE.into()];
        self.api.register_token(token, user);
        Ok(())
    }

    /// Starts `weft node` for `node` in cluster mode, as the DaemonSet would: its pod
    /// `weft-system/weft-node-<topology>` and token, a kubeconfig for the double, the CA's address
    /// and root, a CNI socket, with `opts`' ports and extra arguments; waits until it is ready
    /// (`opts.ready_timeout`). One node agent per topology (its files and eBPF pins are the
    /// topology's).
    pub fn node_agent(&self, topo: &Topology, node: &str, opts: AgentOptions) -> Result<NodeAgent> {
        let limit = opts.ready_timeout;
        let mut agent = self.spawn_node_agent(topo, node, opts)?;
        agent.wait_ready(limit)?;
        Ok(agent)
    }

    /// [`Cluster::node_agent`] without waiting for readiness (a bench times that itself).
    pub fn spawn_node_agent(&self, topo: &Topology, node: &str, opts: AgentOptions) -> Result<NodeAgent> {
        crate::agent::ensure_bpffs()?;
        let pod = format!("weft-node-{}", topo.name());
        self.api.put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": SYSTEM_NAMESPACE},
            "spec": {"nodeName": node, "serviceAccountName": "weft-node", "containers": [{"name": "weft", "image": "weft"}]},
            "status": {"phase": "Running"},
        }))?;
        let token = format!("weft-node-token-{}", topo.name());
        self.register_pod_token(&token, SYSTEM_NAMESPACE, "weft-node", &pod, node)?;

        let dir = topo.dir();
        let (token_file, kubeconfig_file, socket, state) =
            (dir.join("agent-token"), dir.join("agent-kubeconfig"), dir.join("cni.sock"), dir.join("state"));
        std::fs::write(&token_file, &token)?;
        std::fs::write(&kubeconfig_file, kubeconfig(&self.api.url()))?;
        std::fs::create_dir_all(&state)?;
        let _ = std::fs::remove_file(&socket);
        let s = |p: &Path| p.display().to_string();
        let mut args: Vec<String> = vec!["node".into()];
        for (flag, value) in [
            ("--kubeconfig", s(&kubeconfig_file)),
            ("--ca-address", format!("https://{}", self.ca_addr)),
            ("--ca-server-name", CA_SERVER_NAME.into()),
            ("--ca-root-cert", s(&self.root_file)),
            ("--token-path", s(&token_file)),
            ("--cni-socket", s(&socket)),
            ("--node-name", node.into()),
            ("--state-dir", s(&state)),
            ("--bpf-pin-dir", s(&topo.bpf_pin_dir())),
            ("--admin-addr", opts.admin_addr.clone()),
            ("--metrics-addr", opts.metrics_addr.clone()),
            ("--ready-addr", opts.ready_addr.clone()),
            ("--log-format", "text".into()),
        ] {
            args.extend([flag.to_string(), value]);
        }
        args.extend(opts.extra_args.iter().cloned());
        let log = dir.join("agent.log");
        let env = [("RUST_LOG", opts.rust_log.as_str()), ("NO_COLOR", "1")];
        let bg = Background::spawn_with_env("weft node", &s(&opts.bin), &args, &env, &log, Io::Log)?;
        Ok(NodeAgent { bg: Some(bg), log, socket, opts })
    }

    /// Starts `weft waypoint` for Gateway `namespace/name` in cluster mode inside `pod` (which must
    /// be in the double): a token of its own ServiceAccount bound to its pod, and the API double
    /// and the CA reached through forwarders on the pod's loopback, as a real pod reaches them
    /// through cluster networking.
    pub fn start_waypoint(
        &self,
        topo: &Topology,
        pod: &str,
        namespace: &str,
        name: &str,
        node: &str,
    ) -> Result<Waypoint> {
        let p = topo.pod(pod);
        let token = format!("waypoint-token-{}-{pod}", topo.name());
        self.register_pod_token(&token, namespace, &p.spec.service_account, pod, node)?;
        let api_fwd = forward_from_pod(&self.rt, p, self.api.addr())?;
        let ca_fwd = forward_from_pod(&self.rt, p, self.ca_addr)?;
        let dir = topo.dir();
        let (token_file, kubeconfig_file) =
            (dir.join(format!("waypoint-{name}-token")), dir.join(format!("waypoint-{name}-kubeconfig")));
        std::fs::write(&token_file, &token)?;
        std::fs::write(&kubeconfig_file, kubeconfig(&format!("http://{api_fwd}")))?;
        let s = |p: &Path| p.display().to_string();
        let flags: Vec<String> = vec![
            "--kubeconfig".into(),
            s(&kubeconfig_file),
            "--ca-address".into(),
            format!("https://{ca_fwd}"),
            "--ca-server-name".into(),
            CA_SERVER_NAME.into(),
            "--ca-root-cert".into(),
            s(&self.root_file),
            "--token-path".into(),
            s(&token_file),
        ];
        Waypoint::start_cluster(topo, &weft_bin(), pod, namespace, name, &flags)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.ca.take() {
            let _ = stop.send(());
            let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
        }
    }
}

/// A kubeconfig for `server` with no credentials (the double authorises by bearer token only
/// where a test registers one).
pub fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {server}\nusers:\n- name: u\n  user: {{}}\n\
         contexts:\n- name: double\n  context:\n    cluster: double\n    user: u\ncurrent-context: double\n"
    )
}

/// A TCP forwarder listening on 127.0.0.1 inside `pod`'s network namespace to `to` on the host's
/// loopback. Stops with the runtime.
pub fn forward_from_pod(rt: &tokio::runtime::Runtime, pod: &Pod, to: SocketAddr) -> Result<SocketAddr> {
    let ns = weft::netns::Netns::open(&pod.netns).with_context(|| format!("open netns {}", pod.netns))?;
    // A thread of its own: setns must not touch a tokio worker. The socket keeps its namespace.
    let std_listener = std::thread::spawn(move || ns.run(|| std::net::TcpListener::bind("127.0.0.1:0")))
        .join()
        .map_err(|_| anyhow!("the bind thread panicked"))?
        .with_context(|| format!("enter netns {}", pod.netns))?
        .context("bind 127.0.0.1:0 in the pod")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let listener = {
        let _in_rt = rt.enter();
        tokio::net::TcpListener::from_std(std_listener)?
    };
    rt.spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(addr)
}

/// The Pod object the API shows for `p` running on `node`: Running, with both IPs and the
/// spec's labels, ServiceAccount and named ports.
pub fn pod_object(p: &Pod, node: &str) -> Value {
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

/// `weft node` in cluster mode (from [`Cluster::node_agent`]); SIGTERMed on drop, its log printed
/// if the thread panics.
pub struct NodeAgent {
    bg: Option<Background>,
    log: PathBuf,
    socket: PathBuf,
    opts: AgentOptions,
}

impl NodeAgent {
    fn get(&self, addr: &str, path: &str) -> Option<String> {
        let url = format!("http://{addr}{path}");
        process::run_ok("curl", &["-sS", "--fail", "--max-time", "5", &url], Duration::from_secs(10))
            .ok()
            .map(|o| o.stdout)
    }

    /// Waits for `/healthz/ready`; fails early if the agent exits.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let ready = poll(limit, Duration::from_millis(100), || {
            if let Some(st) = self.bg.as_mut().and_then(|b| b.exited()) {
                return Some(Err(anyhow!("weft node exited before it was ready: {st}")));
            }
            self.get(&self.opts.ready_addr, "/healthz/ready").map(|_| Ok(()))
        });
        let r = ready.unwrap_or_else(|| Err(anyhow!("weft node not ready within {limit:?}")));
        r.map_err(|e| anyhow!("{e}\n{}", tail(&self.log(), 100)))
    }

    /// The `/metrics` text (None: the scrape failed).
    pub fn metrics_text(&self) -> Option<String> {
        self.get(&self.opts.metrics_addr, "/metrics")
    }

    pub fn metrics(&self) -> Result<Metrics> {
        Ok(Metrics::parse(&self.metrics_text().ok_or_else(|| anyhow!("scrape {}/metrics", self.opts.metrics_addr))?))
    }

    /// `captured` of `namespace/name` in the agent's config dump (None: the pod is unknown).
    pub fn captured(&self, namespace: &str, name: &str) -> Option<bool> {
        let dump: Value = serde_json::from_str(&self.get(&self.opts.admin_addr, "/config_dump")?).ok()?;
        dump["workloads"].as_array()?.iter().find(|w| w["namespace"] == namespace && w["name"] == name)?["captured"]
            .as_bool()
    }

    /// Waits until every pod of `names` in `namespace` has `captured == want`.
    pub fn wait_captured(&self, namespace: &str, names: &[&str], want: bool, limit: Duration) -> Result<()> {
        let seen = poll(limit, Duration::from_millis(100), || {
            names.iter().all(|n| self.captured(namespace, n) == Some(want)).then_some(())
        });
        ensure!(seen.is_some(), "{names:?} not captured={want} in the agent's state within {limit:?}");
        Ok(())
    }

    /// Fails when the agent has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.bg.as_mut().and_then(|b| b.exited()) {
            Some(st) => Err(anyhow!("weft node exited: {st}\n{}", tail(&self.log(), 100))),
            None => Ok(()),
        }
    }

    /// The agent's CNI socket (for [`cni_add`]).
    pub fn cni_socket(&self) -> &Path {
        &self.socket
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        crate::agent::stop_showing_log(self.bg.take(), &self.log);
    }
}

/// A process in the pod's network namespace, in a cgroup named like kubelet's for pod `uid`
/// (`…-pod<uid>`), as a running pod's containers are: what the agent's `/proc` scan finds.
/// Killed, and its cgroup removed, on drop.
pub struct PodProcess {
    child: std::process::Child,
    cgroup: PathBuf,
}

impl PodProcess {
    pub fn start(pod: &Pod, uid: &str) -> Result<PodProcess> {
        // cgroup v2: at /sys/fs/cgroup, or at /sys/fs/cgroup/unified on a hybrid host.
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|r| r.join("cgroup.controllers").exists())
            .ok_or_else(|| anyhow!("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified"))?;
        let cgroup = root.join(format!("weft-t-{}-pod{uid}", pod.netns));
        std::fs::create_dir(&cgroup).with_context(|| format!("create {} (needs root)", cgroup.display()))?;
        let netns = Path::new(weft::netns::NAMED_NETNS_DIR).join(&pod.netns);
        let child =
            match Command::new("nsenter").arg(format!("--net={}", netns.display())).args(["sleep", "300"]).spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = std::fs::remove_dir(&cgroup);
                    return Err(anyhow!(e).context("spawn nsenter sleep"));
                }
            };
        let guard = PodProcess { child, cgroup };
        std::fs::write(guard.cgroup.join("cgroup.procs"), guard.child.id().to_string())
            .context("move the process into the pod cgroup")?;
        Ok(guard)
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

/// `weft cni` as a runtime invokes it for ADD of `pod` (uid `uid-<name>`) on the agent's
/// `socket`; returns once the plugin succeeded and passed prevResult through unchanged.
pub fn cni_add(pod: &Pod, socket: &Path) -> Result<()> {
    cni_add_uid(pod, socket, &format!("uid-{}", pod.name()))
}

/// [`cni_add`] with the pod's `K8S_POD_UID`.
pub fn cni_add_uid(pod: &Pod, socket: &Path, uid: &str) -> Result<()> {
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
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={uid}",
        pod.spec.namespace,
        pod.name()
    );
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
        .context("spawn weft cni")?;
    child.stdin.take().ok_or_else(|| anyhow!("weft cni stdin"))?.write_all(stdin.to_string().as_bytes())?;
    // The plugin's own timeout (15 s) bounds this wait.
    let out = child.wait_with_output().context("weft cni output")?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "CNI ADD of {} failed ({}): stdout {stdout} stderr {stderr}", pod.name(), out.status);
    let printed: Value =
        serde_json::from_str(&stdout).with_context(|| format!("ADD stdout of {} is not JSON: {stdout}", pod.name()))?;
    ensure!(printed == prev, "ADD must pass prevResult through unchanged: got {printed}, sent {prev}");
    Ok(())
}

/// The node agent's cluster source (`weft::discovery::kube::run`, as node `node-a`) run in this
/// process against `api`, for tests of what it reads and reports without a `weft node`. Call
/// inside a Tokio runtime; the source stops on drop.
pub struct InProcessSource {
    pub client: kube::Client,
    pub store: Arc<weft::state::StateStore>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessSource {
    /// Starts the source and waits (≤ 5 s, else panics) for its first complete snapshot.
    pub async fn start(api: &ApiServer) -> InProcessSource {
        use weft::discovery::kube::{KubeOptions, run};
        let client = kube::Client::try_from(kube::Config::new(api.url().parse().expect("the double's URL")))
            .expect("a client for the API double");
        let store = Arc::new(weft::state::StateStore::new(weft::state::State::default()));
        let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
        let opts = KubeOptions {
            trust_domain: "cluster.local".into(),
            node_name: "node-a".into(),
            root_namespace: "istio-system".into(),
        };
        let task = tokio::spawn(run(client.clone(), opts, store.clone(), synced_tx, std::future::pending()));
        tokio::time::timeout(Duration::from_secs(5), synced.wait_for(|s| *s))
            .await
            .expect("the source's initial sync within 5 s")
            .expect("the source ended before its initial sync");
        InProcessSource { client, store, task }
    }
}

impl Drop for InProcessSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}
