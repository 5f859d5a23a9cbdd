//! The harness itself, without the agent: plain pods on the bridge pass traffic, captures see
//! plaintext, probes move data intact, and cleanup leaves no kernel objects behind.
//! Needs root (fails, never skips, without it).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use weft_tests::probe::{expected_sha256, parse_kv};
use weft_tests::{Capture, Mode, PodSpec, ServiceSpec, Topology, require_root};

fn exists_netns(name: &str) -> bool {
    Path::new("/var/run/netns").join(name).exists()
}

fn exists_link(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn plain_pods_pass_traffic_and_the_capture_sees_the_marker() {
    require_root();
    let topo = Topology::builder("harness")
        .namespace("plain", Mode::Plain)
        .pod(PodSpec::new("a", "plain"))
        .pod(PodSpec::new("b", "plain").port("http", 8080))
        .build()
        .unwrap();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let _srv = b.serve_http(8080).unwrap();

    let cap = Capture::start(&b.veth, &topo.dir().join("b.pcap")).unwrap();
    let marker = "weft-harness-marker-4711";
    let out = a.curl(&format!("http://{}/", b.addr(8080)), marker).unwrap();
    assert!(out.success(), "{out}");
    assert!(out.stdout.starts_with(&format!("hello from b peer={}:", a.ipv4)), "{out}");
    let out6 = a.curl(&format!("http://{}/", b.addr6(8080)), marker).unwrap();
    assert!(out6.success(), "{out6}");
    assert!(out6.stdout.contains(&format!("peer=[{}]", a.ipv6)), "{out6}");
    let pcap = cap.stop().unwrap();

    assert!(pcap.contains(marker), "plaintext marker missing from {}", pcap.path.display());
    assert!(pcap.count("tcp dst port 8080").unwrap() >= 4, "expected the HTTP packets in the capture");
    assert!(!pcap.contains("weft-marker-that-was-never-sent"));
}

#[test]
fn unrouted_addresses_fail_fast_and_stay_on_the_bridge() {
    require_root();
    let topo =
        Topology::builder("hunroute").namespace("plain", Mode::Plain).pod(PodSpec::new("a", "plain")).build().unwrap();
    // A service VIP without a mesh: nobody answers ARP for it, so curl fails and nothing leaves.
    let out = topo.pod("a").curl("http://10.96.0.10/", "m").unwrap();
    assert!(!out.success(), "VIP reachable without a mesh? {out}");
    assert!(!out.timed_out, "curl's own limits should end it: {out}");
}

#[test]
fn probes_move_data_intact_both_ways_between_pods() {
    require_root();
    let topo = Topology::builder("hprobe")
        .namespace("plain", Mode::Plain)
        .pod(PodSpec::new("a", "plain"))
        .pod(PodSpec::new("b", "plain"))
        .build()
        .unwrap();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let n: u64 = 64 << 20;
    let _sink = b.serve("sink", &["sink", "--port", "9000"]).unwrap();
    let _source = b.serve("source", &["source", "--port", "9001", "--bytes", &n.to_string()]).unwrap();

    let out = a
        .probe(&["send", "--to", &b.addr(9000).to_string(), "--bytes", &n.to_string()], Duration::from_secs(60))
        .unwrap();
    assert!(out.success(), "{out}");
    let kv = parse_kv(&out.stdout);
    assert_eq!(kv["sent_sha256"], expected_sha256(n));
    assert_eq!(kv["peer_sha256"], kv["sent_sha256"], "{out}");

    let out = a.probe(&["recv", "--from", &b.addr6(9001).to_string()], Duration::from_secs(60)).unwrap();
    assert!(out.success(), "{out}");
    let kv = parse_kv(&out.stdout);
    assert_eq!(kv["bytes"], n.to_string());
    assert_eq!(kv["sha256"], kv["expected_sha256"], "{out}");

    // A long-lived session through stdin/stdout.
    let _echo = b.serve("echo", &["echo", "--port", "7000"]).unwrap();
    let mut chat = a
        .spawn(
            "chat",
            &[weft_tests::probe_bin().display().to_string(), "chat".into(), "--to".into(), b.addr(7000).to_string()],
            weft_tests::process::Io::Piped,
        )
        .unwrap();
    assert!(chat.recv_line(Duration::from_secs(10)).unwrap().starts_with("connected"));
    for i in 0..3 {
        chat.send_line(&format!("ping {i}")).unwrap();
        assert_eq!(chat.recv_line(Duration::from_secs(10)).unwrap(), format!("ping {i}"));
    }
}

#[test]
fn drop_removes_everything_and_build_clears_stale_leftovers() {
    require_root();
    // Leftovers of a "crashed" run with this topology's names.
    let _ = Command::new("ip").args(["netns", "add", "weft-t-hclean-old"]).status();
    let _ = Command::new("ip").args(["link", "add", "wt-hclean-9", "type", "bridge"]).status();
    assert!(exists_netns("weft-t-hclean-old") && exists_link("wt-hclean-9"), "could not plant leftovers");

    let topo = Topology::builder("hclean")
        .namespace("mesh", Mode::Ambient)
        .pod(PodSpec::new("x", "mesh").sa("x"))
        .service(ServiceSpec::new("x", "mesh", "10.96.0.99").port(80, 8080).selector("app", "x"))
        .build()
        .unwrap();
    assert!(!exists_netns("weft-t-hclean-old") && !exists_link("wt-hclean-9"), "stale leftovers survived build");
    let x = topo.pod("x").clone();
    assert!(exists_netns(&x.netns) && exists_link(&x.veth) && exists_link(topo.bridge()));
    let _bg = x.spawn("sleep", &["sleep", "600"], weft_tests::process::Io::Log).unwrap();

    let mesh = std::fs::read_to_string(topo.write_mesh(&[]).unwrap()).unwrap();
    assert!(mesh.contains("istio.io/dataplane-mode: ambient"), "{mesh}");
    assert!(mesh.contains(&format!("weft.io/netns: {}", x.netns)), "{mesh}");
    assert!(mesh.contains(&format!("podIP: {}", x.ipv4)), "{mesh}");
    assert!(mesh.contains("clusterIP: 10.96.0.99"), "{mesh}");

    let bridge = topo.bridge().to_string();
    drop(_bg);
    drop(topo);
    assert!(!exists_netns(&x.netns), "netns left behind");
    assert!(!exists_link(&x.veth) && !exists_link(&bridge), "links left behind");
}

#[test]
fn drop_cleans_up_after_a_panic() {
    require_root();
    let r = std::panic::catch_unwind(|| {
        let _topo =
            Topology::builder("hpanic").namespace("p", Mode::Plain).pod(PodSpec::new("a", "p")).build().unwrap();
        assert!(exists_netns("weft-t-hpanic-a"));
        panic!("deliberate");
    });
    assert!(r.is_err());
    assert!(!exists_netns("weft-t-hpanic-a") && !exists_link("wt-hpanic-br"), "panic left the topology behind");
}

#[test]
fn generated_mesh_yaml_is_accepted_by_the_agents_file_parser() {
    require_root();
    let topo = weft_tests::scenario::demo("hyaml").build().unwrap();
    let path = topo
        .write_mesh(&[
            weft_tests::scenario::peer_auth("STRICT"),
            weft_tests::scenario::server_policy("ALLOW", &["client"]),
            weft_tests::scenario::server_policy("DENY", &["intruder"]),
        ])
        .unwrap();
    let opts = weft::discovery::file::FileOptions {
        trust_domain: "cluster.local".into(),
        node_name: "weft-hyaml".into(),
        root_namespace: "istio-system".into(),
    };
    let state = weft::discovery::file::load(&path, &opts)
        .unwrap_or_else(|e| panic!("agent rejects the harness's mesh.yaml: {e}"));
    let client = state.workload_by_ip(topo.pod("client").ipv4.into()).expect("client workload");
    assert!(client.captured, "client in the ambient namespace must be captured");
    assert_eq!(client.service_account, "client");
    let legacy = state.workload_by_ip(topo.pod("legacy").ipv4.into()).expect("legacy workload");
    assert!(!legacy.captured, "legacy namespace is not enrolled");
    let svc = state.service_by_vip(weft_tests::scenario::SERVER_VIP.parse().unwrap()).expect("server service");
    assert_eq!(svc.endpoints.len(), 2, "server-v1 and server-v2 behind the VIP");
}
