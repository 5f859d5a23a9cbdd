//! Removing weft from a node, in cluster mode: a node agent SIGTERMed while its DaemonSet still
//! exists (restart, upgrade) leaves the CNI plugin and the pinned eBPF programs in place, so its
//! enrolled pods fail closed until the next agent adopts them; one SIGTERMed after its DaemonSet
//! was deleted (uninstall) removes the plugin entry and binary and unpins the programs, so the
//! pods talk plainly again with no agent at all; so does one whose DaemonSet stays but no longer
//! selects its node (nodeSelector changed). Needs root and the `weft` binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use weft_tests::cluster::{Cluster, NodeAgent, SYSTEM_NAMESPACE, cni_add, pod_object};
use weft_tests::scenario::{self, eventually_get, eventually_refused, pod_url};
use weft_tests::topology::{Mode, PodSpec, Topology};
use weft_tests::{AgentOptions, process, require_root, weft_bin};

const NS: &str = "demo";
const DAEMON_SET: &str = "weft-node";

/// The node's CNI directories, with a primary network configuration as a network plugin leaves it.
struct CniDirs {
    conf: PathBuf,
    bin: PathBuf,
}

impl CniDirs {
    fn create(dir: &Path) -> CniDirs {
        let (conf, bin) = (dir.join("cni-net.d"), dir.join("cni-bin"));
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let primary = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
                             "plugins": [{"type": "bridge", "bridge": "cni0"}, {"type": "portmap"}]});
        std::fs::write(conf.join("10-bridge.conflist"), primary.to_string()).unwrap();
        CniDirs { conf, bin }
    }

    /// `weft cni install`, as the DaemonSet's init container runs it.
    fn install(&self, socket: &Path) {
        let s = |p: &Path| p.display().to_string();
        let args = ["cni", "install", "--conf-dir", &s(&self.conf), "--bin-dir", &s(&self.bin), "--socket", &s(socket)];
        process::run_ok(&weft_bin().display().to_string(), &args, Duration::from_secs(10)).expect("weft cni install");
    }

    fn plugin_types(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.conf.join("10-bridge.conflist")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap().to_owned()).collect()
    }

    fn binary(&self) -> PathBuf {
        self.bin.join("weft-cni")
    }
}

/// The agent's pod as the DaemonSet controller creates it: owned by the DaemonSet.
fn own_agent_pod(cluster: &Cluster, topo: &Topology, ds_uid: &str) {
    let name = format!("weft-node-{}", topo.name());
    let mut pod = cluster.api().get("v1", "Pod", Some(SYSTEM_NAMESPACE), &name).expect("the agent's pod");
    pod["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": "DaemonSet", "name": DAEMON_SET, "uid": ds_uid,
        "controller": true, "blockOwnerDeletion": true,
    }]);
    cluster.api().put(pod).unwrap();
}

/// The DaemonSet, running on nodes labelled `weft.io/mesh: <mesh_label>`.
fn daemon_set(mesh_label: &str) -> Value {
    let labels = json!({"app.kubernetes.io/name": DAEMON_SET});
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": DAEMON_SET, "namespace": SYSTEM_NAMESPACE},
        "spec": {"selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "node", "image": "weft"}],
                                       "nodeSelector": {"weft.io/mesh": mesh_label}}}},
    })
}

fn start_agent(cluster: &Cluster, topo: &Topology, node: &str, cni: &CniDirs, ds_uid: &str) -> NodeAgent {
    let s = |p: &Path| p.display().to_string();
    let mut opts = AgentOptions::for_topology(topo);
    for a in [
        "--pod-name".to_owned(),
        format!("weft-node-{}", topo.name()),
        "--pod-namespace".to_owned(),
        SYSTEM_NAMESPACE.to_owned(),
        "--cni-conf-dir".to_owned(),
        s(&cni.conf),
        "--cni-bin-dir".to_owned(),
        s(&cni.bin),
    ] {
        opts = opts.arg(&a);
    }
    let agent = cluster.node_agent(topo, node, opts).expect("weft node in cluster mode");
    own_agent_pod(cluster, topo, ds_uid);
    agent
}

#[test]
fn a_restart_keeps_the_node_installation_and_an_uninstall_removes_it() {
    require_root();
    let topo = Topology::builder("uninst")
        .namespace(NS, Mode::Plain)
        .pod(PodSpec::new("client", NS).sa("client"))
        .pod(PodSpec::new("server", NS).sa("server").port("http", 8080))
        .build()
        .unwrap();
    let (client, server) = (topo.pod("client"), topo.pod("server"));
    let _srv = server.serve_http(8080).unwrap();
    let node = format!("weft-{}", topo.name());
    let url = pod_url(server, 8080);

    let cluster = Cluster::start(topo.dir()).expect("API double and CA");
    let api = cluster.api();
    api.put(json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": NS, "labels": {"istio.io/dataplane-mode": "ambient"}}}))
        .unwrap();
    for p in [client, server] {
        api.put(pod_object(p, &node)).unwrap();
    }
    api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {"weft.io/mesh": "on"}}}))
        .unwrap();
    let ds_uid = cluster.put_uid(daemon_set("on")).unwrap();
    let cni = CniDirs::create(topo.dir());

    // Restart: the DaemonSet is there, so the next agent must find everything as it was.
    let agent = start_agent(&cluster, &topo, &node, &cni, &ds_uid);
    cni.install(agent.cni_socket());
    assert_eq!(cni.plugin_types(), ["bridge", "portmap", "weft-cni"], "install chains the plugin last");
    for p in [client, server] {
        cni_add(p, agent.cni_socket()).expect("CNI ADD enrolls the pod");
    }
    agent.wait_captured(NS, &["client", "server"], true, Duration::from_secs(10)).unwrap();
    eventually_get(client, &url, Duration::from_secs(10)).expect("client → server through the mesh");
    let log_file = topo.dir().join("agent.log");
    drop(agent);
    let log = weft_tests::read_lossy(&log_file);
    assert!(log.contains("leaving the CNI plugin and eBPF programs in place"), "agent log:\n{log}");
    assert_eq!(cni.plugin_types(), ["bridge", "portmap", "weft-cni"], "a restart keeps the CNI entry");
    assert!(cni.binary().exists(), "a restart keeps the plugin binary");
    assert!(topo.bpf_pin_dir().exists(), "a restart keeps the pinned programs");
    eventually_refused(client, &url, Duration::from_secs(5))
        .expect("with no agent the enrolled client fails closed, never plaintext");

    // The next agent adopts the pinned state.
    let agent = start_agent(&cluster, &topo, &node, &cni, &ds_uid);
    agent.wait_captured(NS, &["client", "server"], true, Duration::from_secs(10)).unwrap();
    eventually_get(client, &url, Duration::from_secs(10)).expect("the restarted agent serves the pods again");

    // Uninstall: the DaemonSet is deleted, then its pod is terminated.
    api.remove("apps/v1", "DaemonSet", Some(SYSTEM_NAMESPACE), DAEMON_SET).unwrap();
    drop(agent);
    let log = weft_tests::read_lossy(&log_file);
    assert!(log.contains("weft is being uninstalled from this node"), "agent log:\n{log}");
    assert_eq!(cni.plugin_types(), ["bridge", "portmap"], "the uninstall leaves exactly the primary plugins");
    assert!(!cni.binary().exists(), "the uninstall removes the plugin binary");
    assert!(!topo.bpf_pin_dir().exists(), "the uninstall unpins the eBPF programs");
    let body = scenario::get(client, &url, "after-uninstall").expect("with weft removed, pods talk plainly");
    assert!(body.contains(&format!("peer={}", client.ipv4)), "the server sees the client directly: {body}");

    // Installed again, then taken off this node: the DaemonSet stays but no longer selects it.
    let ds_uid = cluster.put_uid(daemon_set("on")).unwrap();
    let agent = start_agent(&cluster, &topo, &node, &cni, &ds_uid);
    cni.install(agent.cni_socket());
    for p in [client, server] {
        cni_add(p, agent.cni_socket()).expect("CNI ADD enrolls the pod");
    }
    agent.wait_captured(NS, &["client", "server"], true, Duration::from_secs(10)).unwrap();
    eventually_get(client, &url, Duration::from_secs(10)).expect("client → server through the reinstalled mesh");
    let mut moved = daemon_set("elsewhere");
    moved["metadata"]["uid"] = json!(ds_uid);
    api.put(moved).unwrap();
    drop(agent);
    let log = weft_tests::read_lossy(&log_file);
    assert!(log.contains(&format!("no longer selects node {node}")), "agent log:\n{log}");
    assert_eq!(cni.plugin_types(), ["bridge", "portmap"], "leaving the node removes the CNI entry");
    assert!(!cni.binary().exists(), "leaving the node removes the plugin binary");
    assert!(!topo.bpf_pin_dir().exists(), "leaving the node unpins the eBPF programs");
    let body = scenario::get(client, &url, "after-leaving").expect("with weft gone from the node, pods talk plainly");
    assert!(body.contains(&format!("peer={}", client.ipv4)), "the server sees the client directly: {body}");
}
