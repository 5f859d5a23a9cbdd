//! Traffic through the mesh: an unmodified curl reaches a server by service VIP and pod IP with
//! only ciphertext on the wire and the client's SPIFFE identity in the server-side metrics; a
//! namespace that is not enrolled stays plaintext and is not redirected; 1 GiB each way arrives
//! intact. Needs root and the agent binary (`cargo xtask test` provides both).

use std::time::Duration;

use weft_tests::mesh::spiffe;
use weft_tests::probe::{expected_sha256, parse_kv};
use weft_tests::scenario::{self, MESH_NS};
use weft_tests::{Agent, AgentOptions, Capture, PodSpec, ServiceSpec, poll, require_root};

#[test]
fn client_reaches_server_by_vip_and_pod_ip_with_no_plaintext_on_the_wire() {
    require_root();
    let topo = scenario::demo("mtraffic")
        .pod(PodSpec::new("legacy-client", scenario::LEGACY_NS).sa("legacy"))
        .build()
        .unwrap();
    topo.write_mesh(&[]).unwrap();
    let (client, v1, v2, legacy) =
        (topo.pod("client"), topo.pod("server-v1"), topo.pod("server-v2"), topo.pod("legacy"));
    let _s1 = v1.serve_http(8080).unwrap();
    let _s2 = v2.serve_http(8080).unwrap();
    let _sl = legacy.serve_http(8080).unwrap();
    let agent = Agent::start(&topo, AgentOptions::for_topology(&topo)).unwrap();

    let marker = "weft-secret-marker-mtraffic-81237";
    let cap1 = Capture::start(&v1.veth, &topo.dir().join("server-v1.pcap")).unwrap();
    let cap2 = Capture::start(&v2.veth, &topo.dir().join("server-v2.pcap")).unwrap();
    let mut answered_by = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let body = scenario::get(client, &scenario::server_url(), marker).unwrap();
        answered_by.insert(body.split_whitespace().nth(2).unwrap_or_default().to_string());
    }
    let body = scenario::get(client, &scenario::pod_url(v1, 8080), marker).unwrap();
    assert!(body.starts_with("hello from server-v1"), "{body}");
    // The agent hands the connection to the app on the pod IP: a remote caller must never look
    // like localhost to the app.
    assert!(body.contains(&format!("peer={}:", v1.ipv4)), "the app should see the pod IP as peer: {body}");
    let (w1, w2) = (cap1.stop().unwrap(), cap2.stop().unwrap());

    assert!(answered_by.iter().all(|n| n.starts_with("server-v")), "{answered_by:?}");
    for w in [&w1, &w2] {
        assert!(!w.contains(marker), "plaintext marker on the wire in {}", w.path.display());
        assert_eq!(
            w.count("tcp port 8080").unwrap(),
            0,
            "app port visible on the wire in {}: not tunnelled",
            w.path.display()
        );
    }
    assert!(
        w1.count("tcp dst port 15008").unwrap() > 0,
        "no HBONE (15008) packets to server-v1 in {}",
        w1.path.display()
    );

    // Control: the same request between plain pods shows the marker, so the capture works.
    let cap = Capture::start(&legacy.veth, &topo.dir().join("legacy.pcap")).unwrap();
    scenario::get(topo.pod("legacy-client"), &scenario::pod_url(legacy, 8080), marker).unwrap();
    let wl = cap.stop().unwrap();
    assert!(wl.contains(marker), "control capture misses the plaintext marker: the capture does not work");

    // The destination side saw the client's identity over mutual TLS.
    let want = [
        ("reporter", "destination"),
        ("source_principal", &*spiffe(MESH_NS, "client")),
        ("destination_principal", &*spiffe(MESH_NS, "server")),
        ("connection_security_policy", "mutual_tls"),
    ];
    let seen = poll(Duration::from_secs(10), Duration::from_millis(250), || {
        let m = agent.metrics().ok()?;
        (m.sum("istio_tcp_connections_opened_total", &want) >= 11.0).then_some(())
    });
    assert!(
        seen.is_some(),
        "istio_tcp_connections_opened_total with {want:?} below 11; metrics:\n{}",
        agent.metrics_text().unwrap_or_default()
    );
}

#[test]
fn a_namespace_that_is_not_enrolled_is_not_redirected() {
    require_root();
    let topo =
        scenario::demo("mplain").pod(PodSpec::new("legacy-client", scenario::LEGACY_NS).sa("legacy")).build().unwrap();
    topo.write_mesh(&[]).unwrap();
    let (legacy, legacy_client) = (topo.pod("legacy"), topo.pod("legacy-client"));
    let _sl = legacy.serve_http(8080).unwrap();
    let _s1 = topo.pod("server-v1").serve_http(8080).unwrap();
    let _agent = Agent::start(&topo, AgentOptions::for_topology(&topo)).unwrap();

    let marker = "weft-plain-marker-mplain-5521";
    let cap = Capture::start(&legacy.veth, &topo.dir().join("legacy.pcap")).unwrap();
    let body = scenario::get(legacy_client, &scenario::pod_url(legacy, 8080), marker).unwrap();
    let w = cap.stop().unwrap();
    assert!(
        body.starts_with(&format!("hello from legacy peer={}:", legacy_client.ipv4)),
        "source address rewritten: {body}"
    );
    assert!(w.contains(marker), "plain traffic should be plaintext on the wire");
    assert!(w.count("tcp dst port 8080").unwrap() > 0);
    assert_eq!(w.count("tcp port 15008").unwrap(), 0, "plain pods must not be tunnelled");

    // Not redirected: the service VIP means nothing outside the mesh (no route answers it).
    let out = scenario::get_fails(legacy_client, &scenario::server_url(), marker).unwrap();
    assert_ne!(out.code, Some(0), "{out}");
}

#[test]
fn one_gib_each_way_arrives_intact() {
    require_root();
    const GIB: u64 = 1 << 30;
    let topo = scenario::demo("mbulk")
        .pod(PodSpec::new("bulk", MESH_NS).sa("bulk").port("sink", 9000).port("source", 9001))
        .service(
            ServiceSpec::new("bulk", MESH_NS, "10.96.0.11").port(9000, 9000).port(9001, 9001).selector("app", "bulk"),
        )
        .build()
        .unwrap();
    topo.write_mesh(&[]).unwrap();
    let (client, bulk) = (topo.pod("client"), topo.pod("bulk"));
    let _sink = bulk.serve("sink", &["sink", "--port", "9000"]).unwrap();
    let _source = bulk.serve("source", &["source", "--port", "9001", "--bytes", &GIB.to_string()]).unwrap();
    let agent = Agent::start(&topo, AgentOptions::for_topology(&topo)).unwrap();

    let up = client
        .probe(&["send", "--to", "10.96.0.11:9000", "--bytes", &GIB.to_string()], Duration::from_secs(600))
        .unwrap();
    assert!(up.success(), "{up}");
    let kv = parse_kv(&up.stdout);
    assert_eq!(kv["sent_sha256"], expected_sha256(GIB));
    assert_eq!(kv["peer_bytes"], GIB.to_string(), "{up}");
    assert_eq!(kv["peer_sha256"], kv["sent_sha256"], "client → bulk corrupted: {up}");

    let down = client.probe(&["recv", "--from", "10.96.0.11:9001"], Duration::from_secs(600)).unwrap();
    assert!(down.success(), "{down}");
    let kv = parse_kv(&down.stdout);
    assert_eq!(kv["bytes"], GIB.to_string(), "{down}");
    assert_eq!(kv["sha256"], kv["expected_sha256"], "bulk → client corrupted: {down}");

    // Both gigabytes went through the tunnel (the destination agent counted them).
    let want = [("reporter", "destination"), ("source_principal", &*spiffe(MESH_NS, "client"))];
    let counted = poll(Duration::from_secs(10), Duration::from_millis(250), || {
        let m = agent.metrics().ok()?;
        let bytes = m.sum("istio_tcp_sent_bytes_total", &want) + m.sum("istio_tcp_received_bytes_total", &want);
        (bytes >= 2.0 * GIB as f64).then_some(())
    });
    assert!(
        counted.is_some(),
        "destination metrics count under 2 GiB for the client; metrics:\n{}",
        agent.metrics_text().unwrap_or_default()
    );
}
