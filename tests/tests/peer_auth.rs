//! PeerAuthentication: STRICT refuses plaintext from a pod outside the mesh, PERMISSIVE accepts
//! it; mesh clients work either way. Needs root and the agent binary.

use weft_tests::scenario;
use weft_tests::{Agent, AgentOptions, Topology, require_root};

fn requests_logged(topo: &Topology, pod: &str) -> usize {
    weft_tests::read_lossy(&topo.dir().join(format!("{pod}-http8080.log")))
        .lines()
        .filter(|l| l.starts_with("http request"))
        .count()
}

#[test]
fn strict_refuses_plaintext_from_a_pod_outside_the_mesh() {
    require_root();
    let topo = scenario::demo("pastrict").build().unwrap();
    topo.write_mesh(&[scenario::peer_auth("STRICT")]).unwrap();
    let (client, v1, legacy) = (topo.pod("client"), topo.pod("server-v1"), topo.pod("legacy"));
    let _s1 = v1.serve_http(8080).unwrap();
    let _s2 = topo.pod("server-v2").serve_http(8080).unwrap();
    let _agent = Agent::start(&topo, AgentOptions::for_topology(&topo)).unwrap();

    scenario::get(client, &scenario::pod_url(v1, 8080), "mesh").unwrap();
    let before = requests_logged(&topo, "server-v1");
    let out = scenario::get_fails(legacy, &scenario::pod_url(v1, 8080), "plaintext").unwrap();
    assert!(scenario::refused(&out), "STRICT should refuse the connection promptly: {out}");
    assert_eq!(requests_logged(&topo, "server-v1"), before, "the app saw the plaintext request");
    // The mesh still works after the refusal.
    scenario::get(client, &scenario::server_url(), "mesh").unwrap();
}

#[test]
fn permissive_accepts_plaintext_from_a_pod_outside_the_mesh() {
    require_root();
    let topo = scenario::demo("paperm").build().unwrap();
    topo.write_mesh(&[scenario::peer_auth("PERMISSIVE")]).unwrap();
    let (client, v1, legacy) = (topo.pod("client"), topo.pod("server-v1"), topo.pod("legacy"));
    let _s1 = v1.serve_http(8080).unwrap();
    let _s2 = topo.pod("server-v2").serve_http(8080).unwrap();
    let _agent = Agent::start(&topo, AgentOptions::for_topology(&topo)).unwrap();

    let body = scenario::get(legacy, &scenario::pod_url(v1, 8080), "plaintext").unwrap();
    assert!(body.starts_with("hello from server-v1"), "{body}");
    scenario::get(client, &scenario::server_url(), "mesh").unwrap();
}
