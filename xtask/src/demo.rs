//! `cargo xtask demo [--check]`: builds weft, creates the demo mesh of network-namespace pods
//! (see `weft_tests::scenario`), starts the agent and walks through what it does, one line of
//! explanation per step. Interactive mode keeps the mesh up until Ctrl-C; `--check` prints
//! `PASS <step>` / `FAIL <step>: why` and exits non-zero on any failure. The mesh is torn down
//! on every way out (guards drop on return, on error and after Ctrl-C, which only this process
//! receives: the harness puts its children in their own process groups).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use weft_tests::mesh::spiffe;
use weft_tests::process::Background;
use weft_tests::scenario::{self, MESH_NS, SERVER_VIP};
use weft_tests::waypoint::GATEWAY_NAME_LABEL;
use weft_tests::{Agent, AgentOptions, Capture, PodSpec, ServiceSpec, Topology, Waypoint};

use crate::sys;

const WAYPOINT_VIP: &str = "10.96.0.100";
const L7_VIP: &str = "10.96.0.20";

/// The waypoint's configuration, as Istio users write it: its Gateway, subsets v1/v2 of the server,
/// `end-user: jason` → v2 (everyone else → v1) and an L7 DENY of POST /admin/* on the waypoint.
fn l7_config() -> Vec<String> {
    vec![
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{ name: waypoint, namespace: {MESH_NS} }}\n\
             spec: {{ gatewayClassName: weft-waypoint, listeners: [{{ name: mesh, port: 15008, protocol: HBONE }}] }}\n"
        ),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: server-l7, namespace: {MESH_NS} }}\n\
             spec:\n  host: server-l7\n  subsets:\n  - {{ name: v1, labels: {{ version: v1 }} }}\n  - {{ name: v2, labels: {{ version: v2 }} }}\n"
        ),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: server-l7, namespace: {MESH_NS} }}\n\
             spec:\n  hosts: [server-l7]\n  http:\n  - match:\n    - headers: {{ end-user: {{ exact: jason }} }}\n\
             \x20   route:\n    - destination: {{ host: server-l7, subset: v2 }}\n\
             \x20 - route:\n    - destination: {{ host: server-l7, subset: v1 }}\n"
        ),
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: deny-admin-writes, namespace: {MESH_NS} }}\n\
             spec:\n  targetRefs:\n  - {{ kind: Gateway, group: gateway.networking.k8s.io, name: waypoint }}\n  action: DENY\n\
             \x20 rules:\n  - to:\n    - operation: {{ methods: [POST], paths: [\"/admin/*\"] }}\n"
        ),
    ]
}

/// Longest an interactive demo stays up without a Ctrl-C.
const MAX_UP: Duration = Duration::from_secs(8 * 3600);

struct Report {
    check: bool,
    failed: Vec<&'static str>,
    stop: Arc<AtomicBool>,
}

impl Report {
    /// Runs one step; prints its explanation (interactive) and its outcome. `None` on failure
    /// or when Ctrl-C was pressed.
    fn step<T>(&mut self, name: &'static str, explain: &str, f: impl FnOnce() -> Result<(T, String)>) -> Option<T> {
        if self.stop.load(Ordering::SeqCst) {
            return None;
        }
        if !self.check {
            println!("\n==> {name}: {explain}");
        }
        match f() {
            Ok((v, detail)) => {
                if self.check {
                    println!("PASS {name}");
                } else {
                    for l in detail.lines() {
                        println!("    {l}");
                    }
                }
                Some(v)
            }
            Err(e) => {
                let why = format!("{e:#}");
                let (first, rest) = why.split_once('\n').unwrap_or((&why, ""));
                if self.check {
                    println!("FAIL {name}: {first}");
                } else {
                    println!("    FAILED: {first}");
                }
                if !rest.is_empty() {
                    eprintln!("{rest}");
                }
                self.failed.push(name);
                None
            }
        }
    }
}

pub fn run(check: bool, release: bool) -> Result<()> {
    sys::require_root("demo")?;
    sys::ensure_tools(&[("ip", "iproute2"), ("tcpdump", "tcpdump"), ("curl", "curl"), ("mount", "mount")])?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)).context("install the Ctrl-C handler")?;
    }
    println!("building weft and weft-probe ({})…", if release { "release" } else { "debug" });
    let (weft, probe) = sys::build_binaries(release)?;
    weft_tests::use_bins(weft.clone(), probe);

    let mut report = Report { check, failed: Vec::new(), stop: stop.clone() };
    walk(&mut report, weft)?;
    if report.stop.load(Ordering::SeqCst) {
        println!("\ninterrupted: mesh torn down");
    }
    if !report.failed.is_empty() {
        bail!("demo steps failed: {}", report.failed.join(", "));
    }
    if check {
        println!("demo: all steps passed");
    }
    Ok(())
}

fn walk(r: &mut Report, weft: std::path::PathBuf) -> Result<()> {
    let Some((topo, _servers)) = r.step(
        "mesh",
        "namespace demo (ambient): client, server-v1, server-v2 (service server 10.96.0.10:80 → 8080), intruder, \
         a waypoint pod; service server-l7 (10.96.0.20, same pods) is bound to the waypoint \
         (istio.io/use-waypoint); namespace legacy (not in the mesh): legacy; PeerAuthentication STRICT in demo; an \
         AuthorizationPolicy letting only sa client (and the waypoint) reach app=server",
        || {
            let topo = scenario::demo("demo")
                .prefix("weft-")
                .pod(
                    PodSpec::new("waypoint", MESH_NS)
                        .sa("waypoint")
                        .label(GATEWAY_NAME_LABEL, "waypoint")
                        .label("istio.io/dataplane-mode", "none"),
                )
                .service(
                    ServiceSpec::new("waypoint", MESH_NS, WAYPOINT_VIP)
                        .port(15008, 15008)
                        .selector(GATEWAY_NAME_LABEL, "waypoint"),
                )
                .service(
                    ServiceSpec::new("server-l7", MESH_NS, L7_VIP)
                        .http_port(80, 8080)
                        .selector("app", "server")
                        .label("istio.io/use-waypoint", "waypoint"),
                )
                .build()?;
            let mut docs =
                vec![scenario::peer_auth("STRICT"), scenario::server_policy("ALLOW", &["client", "waypoint"])];
            docs.extend(l7_config());
            topo.write_mesh(&docs)?;
            let servers: Vec<Background> = ["server-v1", "server-v2", "legacy"]
                .iter()
                .map(|p| topo.pod(p).serve_http(8080))
                .collect::<Result<_>>()?;
            let pods: Vec<String> = topo
                .pods()
                .iter()
                .map(|p| format!("{}/{} {} ({})", p.spec.namespace, p.name(), p.ipv4, p.netns))
                .collect();
            let detail = format!("pods: {}\nmesh.yaml: {}", pods.join(", "), topo.mesh_path().display());
            Ok(((topo, servers), detail))
        },
    ) else {
        return Ok(());
    };

    let Some(agent) =
        r.step("agent", "start `weft node --config mesh.yaml` as root and wait for /healthz/ready", || {
            let mut opts = AgentOptions::for_topology(&topo).standard_ports();
            opts.bin = weft.clone();
            let agent = Agent::start(&topo, opts)?;
            let detail =
                format!("agent pid {} ready; log: {}", agent.pid().unwrap_or_default(), agent.log_path().display());
            Ok((agent, detail))
        })
    else {
        return Ok(());
    };

    let (client, v1, v2, legacy, intruder) =
        (topo.pod("client"), topo.pod("server-v1"), topo.pod("server-v2"), topo.pod("legacy"), topo.pod("intruder"));
    let url = scenario::server_url();

    r.step(
        "service-vip",
        "client curls http://10.96.0.10/ (an unmodified curl): eBPF sends each connection to the agent, which \
         tunnels it over HBONE (mutual TLS) to server-v1 or server-v2",
        || {
            let mut seen = BTreeSet::new();
            for _ in 0..20 {
                let body = scenario::get(client, &url, "demo")?;
                seen.insert(body.split_whitespace().nth(2).unwrap_or_default().to_string());
            }
            ensure!(
                seen.contains("server-v1") && seen.contains("server-v2"),
                "20 requests were answered only by {seen:?}"
            );
            Ok(((), format!("20 requests answered by {}", seen.into_iter().collect::<Vec<_>>().join(" and "))))
        },
    );

    r.step(
        "no-plaintext",
        "tcpdump on the servers' veths while the client sends a secret marker: the wire carries only TLS on port 15008",
        || {
            let marker = "weft-demo-secret-7c1e";
            let caps = [
                Capture::start(&v1.veth, &topo.dir().join("server-v1.pcap"))?,
                Capture::start(&v2.veth, &topo.dir().join("server-v2.pcap"))?,
            ];
            for _ in 0..6 {
                scenario::get(client, &url, marker)?;
            }
            let mut lines = Vec::new();
            for cap in caps {
                let w = cap.stop()?;
                ensure!(!w.contains(marker), "the marker is readable on the wire in {}", w.path.display());
                let hbone = w.count("tcp port 15008")?;
                let app = w.count("tcp port 8080")?;
                ensure!(app == 0, "{app} packets to the app port 8080 on the wire in {}", w.path.display());
                lines.push(format!("{}: {hbone} packets on 15008, none on 8080, marker absent", w.path.display()));
            }
            Ok(((), lines.join("\n")))
        },
    );

    r.step(
        "strict",
        "legacy (not in the mesh) → server-v1:8080 in plaintext: refused, PeerAuthentication is STRICT",
        || {
            let out = scenario::get_fails(legacy, &scenario::pod_url(v1, 8080), "plaintext")?;
            ensure!(scenario::refused(&out), "expected a prompt refusal, got {out}");
            Ok(((), format!("refused (curl exit {})", out.code.unwrap_or_default())))
        },
    );

    r.step(
        "policy",
        "intruder (in the mesh, sa intruder) → server: denied by the AuthorizationPolicy; client still allowed",
        || {
            let out = scenario::get_fails(intruder, &url, "intruder")?;
            scenario::get(client, &url, "client")?;
            Ok(((), format!("intruder: curl exit {:?}; client: answered", out.code)))
        },
    );

    r.step("metrics", "the server side's agent reports Istio metrics carrying the client's SPIFFE identity", || {
        let client_id = spiffe(MESH_NS, "client");
        let m = agent.metrics()?;
        let rows: Vec<String> = m
            .find("istio_tcp_connections_opened_total", &[("reporter", "destination"), ("source_principal", &client_id)])
            .map(|s| {
                format!(
                    "istio_tcp_connections_opened_total{{source_principal={:?}, destination_principal={:?}, connection_security_policy={:?}}} {}",
                    s.labels.get("source_principal").map(String::as_str).unwrap_or(""),
                    s.labels.get("destination_principal").map(String::as_str).unwrap_or(""),
                    s.labels.get("connection_security_policy").map(String::as_str).unwrap_or(""),
                    s.value
                )
            })
            .collect();
        ensure!(!rows.is_empty(), "no istio_tcp_connections_opened_total{{reporter=\"destination\",source_principal=\"{client_id}\"}} in the scrape");
        Ok(((), rows.join("\n")))
    });

    let waypoint = r.step(
        "waypoint",
        "start `weft waypoint` in its pod and curl server-l7 (bound to it): the VirtualService sends `end-user: jason` \
         to v2 and everyone else to v1",
        || {
            let w = Waypoint::start(&topo, &weft, "waypoint", MESH_NS, "waypoint")?;
            let l7 = format!("http://{L7_VIP}/");
            let by = |headers: &[&str]| -> Result<BTreeSet<String>> {
                let mut seen = BTreeSet::new();
                for _ in 0..10 {
                    let mut args =
                        vec!["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%header{x-served-by}"];
                    for h in headers {
                        args.extend(["-H", h]);
                    }
                    args.push(&l7);
                    let out = client.exec(&args, Duration::from_secs(15))?.ok()?;
                    seen.insert(out.stdout.trim().to_string());
                }
                Ok(seen)
            };
            let jason = by(&["end-user: jason"])?;
            let others = by(&[])?;
            ensure!(jason == BTreeSet::from(["server-v2".to_string()]), "end-user: jason answered by {jason:?}");
            ensure!(others == BTreeSet::from(["server-v1".to_string()]), "other users answered by {others:?}");
            Ok((w, "end-user: jason → server-v2 (10 of 10); no header → server-v1 (10 of 10)".to_string()))
        },
    );

    r.step(
        "l7-policy",
        "POST /admin/users through the waypoint: 403 from an L7 AuthorizationPolicy (DENY POST /admin/*) attached to \
         the waypoint; GET still answered",
        || {
            ensure!(waypoint.is_some(), "the waypoint did not start");
            let l7 = format!("http://{L7_VIP}/admin/users");
            let post = client.exec(&["curl", "-sS", "-X", "POST", "--max-time", "10", &l7], Duration::from_secs(15))?;
            ensure!(post.stdout.contains("RBAC: access denied"), "POST /admin/users: {post}");
            let get = client.exec(&["curl", "-sS", "-f", "--max-time", "10", &l7], Duration::from_secs(15))?;
            ensure!(get.stdout.starts_with("hello from"), "GET /admin/users: {get}");
            Ok(((), format!("POST: {}; GET: {}", post.stdout.trim(), get.stdout.trim())))
        },
    );

    if r.check {
        return Ok(());
    }
    if !r.failed.is_empty() {
        println!("\nsome steps failed; the mesh stays up for a look (agent log: {})", agent.log_path().display());
    }
    wait_for_ctrl_c(r, &topo, agent);
    Ok(())
}

fn wait_for_ctrl_c(r: &Report, topo: &Topology, mut agent: Agent) {
    if r.stop.load(Ordering::SeqCst) {
        return;
    }
    println!(
        "\nThe mesh is up. Try, as root:\n  \
         ip netns exec {client} curl http://{SERVER_VIP}/\n  \
         ip netns exec {intruder} curl http://{SERVER_VIP}/\n  \
         ip netns exec {legacy} curl http://{v1}/\n  \
         curl -s http://{metrics}/metrics | grep istio_tcp\n  \
         less {log}\nPress Ctrl-C to tear it down.",
        client = topo.pod("client").netns,
        intruder = topo.pod("intruder").netns,
        legacy = topo.pod("legacy").netns,
        v1 = topo.pod("server-v1").addr(8080),
        metrics = agent.metrics_addr(),
        log = agent.log_path().display(),
    );
    let start = Instant::now();
    while !r.stop.load(Ordering::SeqCst) && start.elapsed() < MAX_UP {
        if !agent.is_running() {
            println!("the agent exited; see {}", agent.log_path().display());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("tearing down…");
}
