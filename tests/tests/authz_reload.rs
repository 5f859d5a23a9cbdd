//! AuthorizationPolicy changes take effect on SIGHUP without a restart (same pid), a broken file
//! keeps the last good config, an unrelated long-lived connection survives every reload, and
//! SIGTERM drains and exits 0.
//! Needs root and the agent binary.

use std::time::Duration;

use weft_tests::scenario::{self, MESH_NS};
use weft_tests::{Agent, AgentOptions, PodSpec, Topology, require_root};

const SETTLE: Duration = Duration::from_secs(15);

fn reload_with(topo: &Topology, agent: &mut Agent, pid: Option<u32>, extra: &[String]) {
    topo.write_mesh(extra).unwrap();
    agent.reload().unwrap();
    assert!(agent.is_running(), "agent exited on reload");
    assert_eq!(agent.pid(), pid, "agent restarted instead of reloading");
}

#[test]
fn policies_apply_on_sighup_without_restart_and_sessions_survive() {
    require_root();
    let topo =
        scenario::demo("authz").pod(PodSpec::new("echo", MESH_NS).sa("echo").port("echo", 7000)).build().unwrap();
    topo.write_mesh(&[]).unwrap();
    let (client, intruder, echo) = (topo.pod("client"), topo.pod("intruder"), topo.pod("echo"));
    let _s1 = topo.pod("server-v1").serve_http(8080).unwrap();
    let _s2 = topo.pod("server-v2").serve_http(8080).unwrap();
    let _echo = echo.serve("echo", &["echo", "--port", "7000"]).unwrap();
    let mut agent = Agent::start(&topo, AgentOptions::for_topology(&topo)).unwrap();
    let pid = agent.pid();
    let url = scenario::server_url();

    // No policy: everyone in the mesh gets through.
    scenario::get(client, &url, "m").unwrap();
    scenario::get(intruder, &url, "m").unwrap();

    // The unrelated session, opened through the mesh before any reload.
    let mut chat = scenario::Session::open(client, echo.addr(7000), "long-lived echo session").unwrap();

    // DENY the client.
    reload_with(&topo, &mut agent, pid, &[scenario::server_policy("DENY", &["client"])]);
    scenario::eventually_refused(client, &url, SETTLE).expect("DENY for sa client not applied after SIGHUP");
    scenario::get(intruder, &url, "m").expect("DENY for the client must not affect the intruder");
    chat.ping(1);

    // ALLOW only the client: the DENY is gone, everyone else is denied.
    reload_with(&topo, &mut agent, pid, &[scenario::server_policy("ALLOW", &["client"])]);
    scenario::eventually_get(client, &url, SETTLE).expect("ALLOW for sa client not applied after SIGHUP");
    scenario::eventually_refused(intruder, &url, SETTLE).expect("ALLOW-only-client must deny the intruder");
    chat.ping(2);

    // A broken file keeps the last good config.
    std::fs::write(topo.mesh_path(), "apiVersion: v1\nkind: Pod\nmetadata: [this is not\n  valid: yaml\n").unwrap();
    agent.reload().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.is_running(), "agent exited on a bad config file");
    assert_eq!(agent.pid(), pid);
    scenario::get(client, &url, "m").expect("client lost access after a bad reload");
    scenario::get_fails(intruder, &url, "m").expect("intruder let in after a bad reload");
    chat.ping(3);

    // Back to no policy.
    reload_with(&topo, &mut agent, pid, &[]);
    scenario::eventually_get(intruder, &url, SETTLE).expect("removing the policy did not restore access");
    chat.ping(4);

    // SIGTERM drains (the session is still open) and exits 0.
    let status = agent.stop().expect("agent did not exit within 30 s of SIGTERM");
    assert!(status.success(), "SIGTERM should drain and exit 0, got {status}");
}
