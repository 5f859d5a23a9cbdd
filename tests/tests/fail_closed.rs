//! Fail closed: after a SIGKILL of the agent, enrolled pods reach nothing in plaintext (their
//! outbound connections are refused, plaintext inbound from outside the mesh is refused); a
//! restarted agent (same state and pin dir) brings traffic back. Needs root and the agent.
//!
//! The mesh namespace is STRICT here: the design lets PERMISSIVE pods take plaintext inbound
//! while the agent is up, so only STRICT promises a refusal while it is down.

use std::time::Duration;

use weft_tests::scenario::{self, CURL_COULDNT_CONNECT};
use weft_tests::{Agent, AgentOptions, Capture, require_root};

#[test]
fn sigkill_fails_closed_and_a_restart_restores_traffic() {
    require_root();
    let topo = scenario::demo("failcl").build().unwrap();
    topo.write_mesh(&[scenario::peer_auth("STRICT")]).unwrap();
    let (client, v1, legacy) = (topo.pod("client"), topo.pod("server-v1"), topo.pod("legacy"));
    let _s1 = v1.serve_http(8080).unwrap();
    let _s2 = topo.pod("server-v2").serve_http(8080).unwrap();
    let _sl = legacy.serve_http(8080).unwrap();
    let mut agent = Agent::start(&topo, AgentOptions::for_topology(&topo)).unwrap();
    scenario::get(client, &scenario::server_url(), "m").unwrap();
    scenario::get(client, &scenario::pod_url(v1, 8080), "m").unwrap();

    agent.kill().unwrap();
    let marker = "weft-failclosed-marker-3301";
    let cap_v1 = Capture::start(&v1.veth, &topo.dir().join("server-v1.pcap")).unwrap();
    let cap_legacy = Capture::start(&legacy.veth, &topo.dir().join("legacy.pcap")).unwrap();
    for (from, url, what) in [
        (client, scenario::server_url(), "client → service VIP"),
        (client, scenario::pod_url(v1, 8080), "client → server-v1 pod IP"),
        (client, scenario::pod_url(legacy, 8080), "client → plain pod outside the mesh"),
        (legacy, scenario::pod_url(v1, 8080), "plain pod → server-v1 (inbound plaintext)"),
    ] {
        let out = scenario::get_fails(from, &url, marker).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(out.code, Some(CURL_COULDNT_CONNECT), "{what}: expected connection refused, got {out}");
    }
    let (w_v1, w_legacy) = (cap_v1.stop().unwrap(), cap_legacy.stop().unwrap());
    assert!(!w_v1.contains(marker), "plaintext reached server-v1's wire with the agent dead");
    assert!(!w_legacy.contains(marker), "an enrolled pod sent plaintext to a plain pod with the agent dead");

    agent.restart().unwrap();
    scenario::eventually_get(client, &scenario::server_url(), Duration::from_secs(15))
        .expect("VIP traffic after restart");
    scenario::get(client, &scenario::pod_url(v1, 8080), "m").expect("pod IP traffic after restart");
    let out = scenario::get_fails(legacy, &scenario::pod_url(v1, 8080), "m").unwrap();
    assert!(scenario::refused(&out), "STRICT after restart: {out}");
}
