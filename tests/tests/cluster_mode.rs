//! `weft node` in cluster mode, end to end: configuration from the HTTP-level Kubernetes API
//! double (through a kubeconfig), workload certificates from an in-process `weft ca` over gRPC,
//! pods' network namespaces handed over by the real CNI plugin binary (`weft cni`) as a runtime
//! invokes it. A namespace that is not labelled stays plaintext; labelling it ambient enrolls its
//! pods (ADD returns once they are enrolled) and traffic carries the client's SPIFFE identity over
//! mutual TLS; removing the label unenrolls them. Needs root and the `weft` binary.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_tests::cluster::{Cluster, PodProcess, cni_add, cni_add_uid, pod_object};
use weft_tests::mesh::spiffe;
use weft_tests::topology::{Mode, Pod, PodSpec, Topology};
use weft_tests::{AgentOptions, poll, require_root};

const NS: &str = "demo";
const AMBIENT: &str = "istio.io/dataplane-mode";

fn namespace(ambient: bool) -> Value {
    let labels = if ambient { json!({AMBIENT: "ambient"}) } else { json!({}) };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": labels}})
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
    let cluster = Cluster::start(topo.dir()).expect("API double and CA");
    let api = cluster.api();
    api.put(namespace(false)).unwrap();
    for sa in ["client", "server", "fresh", "running"] {
        api.put(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NS}}))
            .unwrap();
    }
    for p in [client, server] {
        api.put(pod_object(p, &node)).unwrap();
    }
    // Started before its namespace is labelled: it will get no CNI ADD.
    let running_uid = cluster.put_uid(pod_object(running, &node)).unwrap();
    let _running_proc = PodProcess::start(running, &running_uid).unwrap();
    // Sandbox being created: kubelet has not reported its IP yet (the CNI ADD comes first).
    let mut fresh_obj = pod_object(fresh, &node);
    fresh_obj["status"] = json!({"phase": "Pending"});
    let fresh_uid = cluster.put_uid(fresh_obj).unwrap();

    let agent = cluster.node_agent(&topo, &node, AgentOptions::for_topology(&topo)).unwrap();
    let socket = agent.cni_socket().to_path_buf();
    agent.wait_captured(NS, &["client", "server"], false, Duration::from_secs(10)).unwrap();
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
        agent
            .metrics()
            .unwrap()
            .sum("istio_tcp_connections_opened_total", &[("source_principal", &*spiffe(NS, "client"))]),
        0.0
    );

    // (2) Label the namespace; ADD (as the runtime would) returns only once the pod is enrolled.
    api.put(namespace(true)).unwrap();
    agent.wait_captured(NS, &["client", "server"], true, Duration::from_secs(10)).unwrap();
    let t_add = Instant::now();
    for p in [server, client] {
        cni_add(p, &socket).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let add_took = t_add.elapsed();
    // (2b) A pod the API shows without an IP: ADD enrolls it with the IP of the CNI result.
    assert_eq!(agent.captured(NS, "fresh"), None, "no IP in the API and no ADD yet: not in the state");
    cni_add_uid(fresh, &socket, &fresh_uid).unwrap_or_else(|e| panic!("CNI ADD of an IP-less pod: {e:#}"));
    assert_eq!(agent.captured(NS, "fresh"), Some(true));
    // No retry: ADD returned, so both pods are enrolled and the next connection is tunnelled.
    let body = get(client, server, "clmode-mesh");
    assert!(!body.contains(&plain_peer), "enrolled pods should go through the agent: {body}");
    let meshed = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let n = agent.metrics().unwrap().sum("istio_tcp_connections_opened_total", &mtls);
        (n >= 1.0).then_some(n)
    });
    let meshed = meshed.unwrap_or_else(|| {
        panic!("no mutual-TLS connection from the client in the metrics:\n{}", agent.metrics_text().unwrap_or_default())
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
            let n = agent.metrics().unwrap().sum("istio_tcp_connections_opened_total", &want);
            (n >= 1.0).then_some(n)
        });
        assert!(n.is_some(), "no mutual-TLS connection to {} in the metrics", p.name());
    }
    // The API's status catches up: same IP, the pod stays enrolled.
    api.put(pod_object(fresh, &node)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.captured(NS, "fresh"), Some(true));
    let body = get(client, fresh, "clmode-fresh-after-status");
    assert!(!body.contains(&plain_peer), "{body}");

    // (3) Unlabel: the pods leave the mesh, traffic is plaintext again and not counted.
    api.put(namespace(false)).unwrap();
    agent.wait_captured(NS, &["client", "server"], false, Duration::from_secs(10)).unwrap();
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
    let after = agent.metrics().unwrap().sum("istio_tcp_connections_opened_total", &mtls);
    assert_eq!(after, meshed, "unenrolled traffic must not be counted as mesh traffic");

    drop(agent);
    drop(cluster);
    eprintln!("cluster_mode: ready after {t_ready:?}, both ADDs took {add_took:?}, total {:?}", t0.elapsed());
}
