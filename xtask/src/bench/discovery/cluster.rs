//! The cluster around the bench's node agent, in process: the API double (`weft_tests::apiserver`)
//! with `weft-system`, the mesh CA (`weft::ca_server::run`, the code behind `weft ca`) publishing
//! its root, `weft node` started as the DaemonSet would start it (kubeconfig, its pod's token,
//! the CA's root), and CNI ADD through the real `weft cni` binary.
//!
//! The minimum the bench needs, kept here because the shared `weft_tests::cluster` was not in the
//! tree yet when the bench was written; it should be replaced by that module. Owns setup and
//! teardown only.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use weft::ca_server::{CaConfig, CaOptions};
use weft_tests::apiserver::{ApiServer, TokenUser};
use weft_tests::metrics::Metrics;
use weft_tests::process::{Background, Io};
use weft_tests::topology::{Pod, Topology};
use weft_tests::{AgentOptions, poll};

const SYSTEM_NAMESPACE: &str = "weft-system";
const CA_SERVER_NAME: &str = "weft-ca.weft-system.svc";
const ROOT_CONFIGMAP: &str = "weft-ca-root-cert";
const CA_AUDIENCE: &str = "istio-ca";

type CaTask = tokio::task::JoinHandle<Result<(), weft::ca_server::Error>>;

/// The API double and the CA on a runtime of their own; the CA stops on drop.
pub struct Cluster {
    // Field order is drop order: the CA and the double go before the runtime.
    ca: Option<(tokio::sync::oneshot::Sender<()>, CaTask)>,
    api: ApiServer,
    ca_addr: SocketAddr,
    root_file: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// Starts the double and the CA and writes the CA's root to `dir/root-cert.pem` (≤ 10 s).
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
        let cluster = Cluster { ca: Some((stop, task)), api, ca_addr, root_file: dir.join("root-cert.pem"), rt };
        let root = poll(Duration::from_secs(10), Duration::from_millis(50), || {
            let cm = cluster.api.get("v1", "ConfigMap", Some(SYSTEM_NAMESPACE), ROOT_CONFIGMAP)?;
            cm["data"]["root-cert.pem"].as_str().map(str::to_owned)
        })
        .ok_or_else(|| anyhow!("the CA did not publish {SYSTEM_NAMESPACE}/{ROOT_CONFIGMAP} within 10 s"))?;
        std::fs::write(&cluster.root_file, root).context("write the root certificate")?;
        Ok(cluster)
    }

    pub fn api(&self) -> &ApiServer {
        &self.api
    }

    /// Puts `obj` and returns its `metadata.uid`.
    pub fn put_uid(&self, obj: Value) -> Result<String> {
        let created = self.api.put(obj)?;
        created["metadata"]["uid"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no uid in {created}"))
    }

    /// Spawns `weft node` for `node` in cluster mode with its pod `weft-system/weft-node-<topology>`
    /// and a token bound to it; does not wait for readiness (the bench times that).
    pub fn node_agent(&self, topo: &Topology, node: &str, opts: &AgentOptions) -> Result<NodeAgent> {
        weft_tests::agent::ensure_bpffs()?;
        let pod = format!("weft-node-{}", topo.name());
        let uid = self.put_uid(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": SYSTEM_NAMESPACE},
            "spec": {"nodeName": node, "serviceAccountName": "weft-node", "containers": [{"name": "weft", "image": "weft"}]},
            "status": {"phase": "Running"},
        }))?;
        let token = format!("weft-node-token-{}", topo.name());
        let mut user =
            TokenUser::service_account(SYSTEM_NAMESPACE, "weft-node", Some((&pod, &uid)), Some((node, "node-uid")));
        user.audiences = vec![CA_AUDIENCE.into()];
        self.api.register_token(&token, user);

        let dir = topo.dir();
        let (token_file, kubeconfig, socket, state) =
            (dir.join("agent-token"), dir.join("agent-kubeconfig"), dir.join("cni.sock"), dir.join("state"));
        std::fs::write(&token_file, &token)?;
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\nusers:\n- name: u\n  user: {{}}\n\
                 contexts:\n- name: double\n  context:\n    cluster: double\n    user: u\ncurrent-context: double\n",
                self.api.url()
            ),
        )?;
        std::fs::create_dir_all(&state)?;
        let _ = std::fs::remove_file(&socket);
        let s = |p: &Path| p.display().to_string();
        let mut args: Vec<String> = vec!["node".into()];
        for (flag, value) in [
            ("--kubeconfig", s(&kubeconfig)),
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
        let env = [("RUST_LOG", opts.rust_log.as_str()), ("NO_COLOR", "1")];
        let bg = Background::spawn_with_env("weft node", &s(&opts.bin), &args, &env, &dir.join("agent.log"), Io::Log)?;
        let metrics_addr = opts.metrics_addr.parse().context("metrics address")?;
        Ok(NodeAgent { bg: Some(bg), socket, metrics_addr })
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

/// A running `weft node`; SIGTERMed on drop.
pub struct NodeAgent {
    bg: Option<Background>,
    socket: PathBuf,
    metrics_addr: SocketAddr,
}

impl NodeAgent {
    pub fn cni_socket(&self) -> &Path {
        &self.socket
    }

    /// Fails when the agent has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.bg.as_mut().and_then(|b| b.exited()) {
            Some(st) => bail!("weft node exited: {st}"),
            None => Ok(()),
        }
    }

    pub fn metrics(&self) -> Result<Metrics> {
        let text = super::http_get(self.metrics_addr, "/metrics")
            .ok_or_else(|| anyhow!("scrape {}/metrics", self.metrics_addr))?;
        Ok(Metrics::parse(&text))
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if let Some(mut bg) = self.bg.take() {
            let _ = bg.stop_with(Signal::SIGTERM, Duration::from_secs(10));
        }
    }
}

/// The Pod object the API shows for `p` running on `node`: Running, with both IPs, its labels,
/// ServiceAccount and named ports.
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

/// `weft cni` (the binary at `weft`) as a runtime invokes it for ADD of `pod` with uid `uid`.
pub fn cni_add_uid(weft: &Path, pod: &Pod, socket: &Path, uid: &str) -> Result<()> {
    let netns = Path::new(weft::netns::NAMED_NETNS_DIR).join(&pod.netns);
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": netns}],
        "ips": [{"address": format!("{}/24", pod.ipv4), "interface": 0}],
    });
    let stdin = json!({
        "cniVersion": "1.0.0", "name": "weft-bench", "type": "weft-cni",
        "weft_socket": socket, "timeout_secs": 15.0, "prevResult": prev,
    });
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={uid}",
        pod.spec.namespace,
        pod.name()
    );
    let mut child = Command::new(weft)
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
    Ok(())
}
