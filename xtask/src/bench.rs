//! `cargo xtask bench l4`: one run on one network-namespace topology (client and server pods in an
//! ambient namespace) comparing (a) no mesh, (b) weft with its eBPF redirect and (c) the same
//! agent behind an iptables REDIRECT (`--redirect iptables`), and (d) a plain user-space TCP relay
//! on the same three legs as the mesh (a relay in each pod, no TLS, no HTTP/2: the floor a
//! user-space tunnel pays on this machine before any encryption), for iperf3 throughput (1 and 4
//! streams), the machine's CPU time per GiB moved, fixed-rate request/response latency, new
//! connections per second and the agent's RSS idle and under load. Prints a table with ratios to
//! (a). Every measurement is bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use weft_tests::probe::parse_kv;
use weft_tests::process::Io;
use weft_tests::{Agent, AgentOptions, Mode, Pod, PodSpec, Topology};

use crate::sys;

pub mod discovery;
mod procfs;
pub mod waypoint;

use procfs::rss_mib;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Requests per second for the request/response test.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Extra `weft node` flag for the mesh setups (repeatable), to compare agent settings,
    /// e.g. `--agent-arg=--worker-threads=1`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
}

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7000;
/// The agent marks its own sockets with this (1337) so the iptables rule lets them pass.
const AGENT_MARK: &str = "0x539";

#[derive(Debug, Default, Clone)]
struct Row {
    gbps_1: f64,
    /// Busy CPU time of the whole machine (apps, kernel, agent) per GiB moved by the 1-stream
    /// run: what a byte costs. On this 2-core box every setup is CPU-bound, so throughput ratios
    /// are roughly the inverse of these.
    cpu_ms_per_gib: f64,
    gbps_4: f64,
    p50_us: f64,
    p99_us: f64,
    conns_per_sec: f64,
    rss_idle_mib: Option<f64>,
    rss_load_mib: Option<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    NoMesh,
    Ebpf,
    Iptables,
    /// `weft-probe relay` in both pods: client → relay (client pod) → relay (server pod) → server.
    Relay,
}

/// Ports of the relay setup: iperf and echo, in the client pod and in the server pod.
const RELAY_PORTS: [(u16, u16, u16); 2] = [(15101, 15102, IPERF_PORT), (15103, 15104, ECHO_PORT)];

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::NoMesh => "no mesh",
            Setup::Ebpf => "weft (eBPF)",
            Setup::Iptables => "iptables",
            Setup::Relay => "TCP relay, no TLS",
        }
    }
}

pub fn l4(args: Args) -> Result<()> {
    sys::require_root("bench l4")?;
    sys::ensure_tools(&[
        ("ip", "iproute2"),
        ("iperf3", "iperf3"),
        ("iptables", "iptables"),
        ("curl", "curl"),
        ("mount", "mount"),
    ])?;
    println!("building weft and weft-probe (release)…");
    let (weft, probe) = sys::build_binaries(true)?;
    weft_tests::use_bins(weft.clone(), probe);

    let topo = Topology::builder("bench")
        .prefix("weft-")
        .namespace("bench", Mode::Ambient)
        .pod(PodSpec::new("client", "bench").sa("client"))
        .pod(PodSpec::new("server", "bench").sa("server").port("iperf", IPERF_PORT).port("echo", ECHO_PORT))
        .build()?;
    topo.write_mesh(&[])?;
    let (client, server) = (topo.pod("client"), topo.pod("server"));
    let _iperf = server.spawn("iperf3", &["iperf3", "-s", "-p", &IPERF_PORT.to_string()], Io::Log)?;
    let _echo = server.serve("echo", &["echo", "--port", &ECHO_PORT.to_string()])?;
    std::thread::sleep(Duration::from_millis(300));

    let mut rows: Vec<(Setup, Result<Row>)> = Vec::new();
    for setup in [Setup::NoMesh, Setup::Ebpf, Setup::Iptables, Setup::Relay] {
        println!("==> {} ({} s per measurement)", setup.label(), args.duration);
        let r = measure_setup(setup, &topo, client, server, &weft, &args);
        if let Err(e) = &r {
            println!("    {} failed: {e:#}", setup.label());
        }
        rows.push((setup, r));
    }
    print_table(&rows);
    if rows.iter().any(|(_, r)| r.is_err()) {
        bail!("some setups could not be measured (see above)");
    }
    Ok(())
}

fn measure_setup(
    setup: Setup,
    topo: &Topology,
    client: &Pod,
    server: &Pod,
    weft: &std::path::Path,
    args: &Args,
) -> Result<Row> {
    let agent = match setup {
        Setup::NoMesh | Setup::Relay => None,
        Setup::Ebpf | Setup::Iptables => {
            let mut opts = AgentOptions::for_topology(topo);
            opts.bin = weft.to_path_buf();
            for a in &args.agent_args {
                opts = opts.arg(a);
            }
            if setup == Setup::Iptables {
                opts = opts.arg("--redirect").arg("iptables");
            }
            Some(Agent::start(topo, opts)?)
        }
    };
    if setup == Setup::Iptables {
        let rule = [
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "!",
            "-d",
            "127.0.0.0/8",
            "-m",
            "mark",
            "!",
            "--mark",
            AGENT_MARK,
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ];
        client
            .exec(&rule, Duration::from_secs(10))?
            .ok()
            .context("install the iptables REDIRECT rule in the client pod")?;
    }
    // The relay setup dials the client pod's relay; every other setup dials the server.
    let mut relays = Vec::new();
    let (iperf_to, echo_to) = if setup == Setup::Relay {
        for (client_port, server_port, app_port) in RELAY_PORTS {
            let inner = server.addr(app_port).to_string();
            relays.push(server.serve("relay", &["relay", "--port", &server_port.to_string(), "--to", &inner])?);
            let outer = server.addr(server_port).to_string();
            relays.push(client.serve("relay", &["relay", "--port", &client_port.to_string(), "--to", &outer])?);
        }
        (client.addr(RELAY_PORTS[0].0), client.addr(RELAY_PORTS[1].0))
    } else {
        (server.addr(IPERF_PORT), server.addr(ECHO_PORT))
    };
    let pid = agent.as_ref().and_then(|a| a.pid());
    // Idle: startup has settled (the agent releases its startup-only pages 2 s after ready).
    std::thread::sleep(Duration::from_secs(4));
    let mut row = Row { rss_idle_mib: pid.and_then(rss_mib), ..Row::default() };
    if let Some((anon, file)) = pid.and_then(rss_split_mib) {
        println!(
            "    idle RSS: {anon:.1} MiB anonymous (heap, stacks, maps) + {file:.1} MiB file-backed (the binary's pages)"
        );
    }
    let d = args.duration;

    let busy = busy_cpu_ms()?;
    let (gbps, bytes) = iperf(client, iperf_to, 1, d)?;
    row.gbps_1 = gbps;
    row.cpu_ms_per_gib = (busy_cpu_ms()? - busy) / (bytes / f64::from(1u32 << 30));
    let sampler = RssSampler::start(pid);
    row.gbps_4 = iperf(client, iperf_to, 4, d)?.0;
    row.rss_load_mib = sampler.stop();

    let limit = Duration::from_secs(d + 60);
    let target = echo_to.to_string();
    let out = client
        .probe(&["rr", "--to", &target, "--rate", &args.rate.to_string(), "--duration", &d.to_string()], limit)?
        .ok()?;
    let kv = parse_kv(&out.stdout);
    row.p50_us = num(&kv, "p50_us")?;
    row.p99_us = num(&kv, "p99_us")?;
    let out = client.probe(&["connect-rate", "--to", &target, "--duration", &d.to_string()], limit)?.ok()?;
    row.conns_per_sec = num(&parse_kv(&out.stdout), "per_sec")?;
    println!("    {row:?}");

    if setup == Setup::Iptables {
        client.exec(&["iptables", "-t", "nat", "-F", "OUTPUT"], Duration::from_secs(10))?;
    }
    if let Some(agent) = agent {
        drop(agent);
        // The next setup must start from a node without the pinned programs, or the iptables
        // path would measure the eBPF one.
        remove_pins(weft, topo)?;
    }
    Ok(row)
}

/// `weft uninstall`: an agent leaves its eBPF programs pinned when it stops (pods fail closed), so
/// a bench removes them before its next setup.
fn remove_pins(weft: &std::path::Path, topo: &Topology) -> Result<()> {
    let pins = topo.bpf_pin_dir().display().to_string();
    weft_tests::process::run_ok(
        &weft.display().to_string(),
        &["uninstall", "--bpf-pin-dir", &pins],
        Duration::from_secs(30),
    )
    .context("weft uninstall between setups")?;
    Ok(())
}

fn num(kv: &std::collections::BTreeMap<String, String>, k: &str) -> Result<f64> {
    kv.get(k)
        .with_context(|| format!("probe output lacks {k}"))?
        .parse()
        .with_context(|| format!("{k} is not a number"))
}

/// Busy CPU time of all cores since boot, in ms (`/proc/stat`: everything but idle and iowait).
fn busy_cpu_ms() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let cpu = stat.lines().next().filter(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let ticks: Vec<f64> = cpu.split_whitespace().skip(1).map(|t| t.parse().unwrap_or(0.0)).collect();
    let busy: f64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    // USER_HZ is 100 on Linux.
    Ok(busy * 10.0)
}

/// iperf3 throughput in Gbit/s and bytes received (receiver side) with `streams` parallel streams.
fn iperf(client: &Pod, to: std::net::SocketAddr, streams: u32, secs: u64) -> Result<(f64, f64)> {
    let out = client
        .exec(
            &[
                "iperf3",
                "-c",
                &to.ip().to_string(),
                "-p",
                &to.port().to_string(),
                "-t",
                &secs.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ],
            Duration::from_secs(secs + 30),
        )?
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).context("parse iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in iperf3 output: {}", v["error"]))?;
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().context("no end.sum_received.bytes in iperf3 output")?;
    Ok((bps / 1e9, bytes))
}

/// (RssAnon, RssFile) in MiB: what the agent allocated vs the pages of its binary and libraries.
fn rss_split_mib(pid: u32) -> Option<(f64, f64)> {
    Some((procfs::status_kib(pid, "RssAnon:")? / 1024.0, procfs::status_kib(pid, "RssFile:")? / 1024.0))
}

/// Samples the agent's VmRSS every 100 ms on a thread; `stop` returns the maximum seen.
struct RssSampler {
    stop: Arc<AtomicBool>,
    max_kib: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: Option<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max_kib = Arc::new(AtomicU64::new(0));
        let handle = pid.map(|pid| {
            let (stop, max_kib) = (stop.clone(), max_kib.clone());
            std::thread::spawn(move || {
                // Bounded: at most 10 minutes of samples even if stop is never called.
                for _ in 0..6000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Some(m) = rss_mib(pid) {
                        max_kib.fetch_max((m * 1024.0) as u64, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        RssSampler { stop, max_kib, handle }
    }

    fn stop(mut self) -> Option<f64> {
        self.stop.store(true, Ordering::SeqCst);
        let h = self.handle.take()?;
        let _ = h.join();
        Some(self.max_kib.load(Ordering::SeqCst) as f64 / 1024.0)
    }
}

fn print_table(rows: &[(Setup, Result<Row>)]) {
    let base = rows.iter().find(|(s, _)| *s == Setup::NoMesh).and_then(|(_, r)| r.as_ref().ok()).cloned();
    type Get = fn(&Row) -> Option<f64>;
    let metrics: [(&str, Get); 8] = [
        ("throughput, 1 stream (Gbit/s)", |r| Some(r.gbps_1)),
        ("CPU per GiB, 1 stream (ms)", |r| Some(r.cpu_ms_per_gib)),
        ("throughput, 4 streams (Gbit/s)", |r| Some(r.gbps_4)),
        ("request/response p50 (µs)", |r| Some(r.p50_us)),
        ("request/response p99 (µs)", |r| Some(r.p99_us)),
        ("new connections per second", |r| Some(r.conns_per_sec)),
        ("agent RSS idle (MiB)", |r| r.rss_idle_mib),
        ("agent RSS under load (MiB)", |r| r.rss_load_mib),
    ];
    println!();
    let mut header = format!("{:<32}", "metric");
    for (s, _) in rows {
        header.push_str(&format!(" | {:>22}", s.label()));
    }
    println!("{header}");
    println!("{}", "-".repeat(header.chars().count()));
    for (name, get) in metrics {
        let mut line = format!("{name:<32}");
        for (s, r) in rows {
            let cell = match r {
                Err(_) => "error".to_string(),
                Ok(row) => match get(row) {
                    None => "-".to_string(),
                    Some(v) => {
                        let ratio = base
                            .as_ref()
                            .and_then(get)
                            .filter(|b| *b > 0.0 && *s != Setup::NoMesh)
                            .map(|b| format!(" ({:.2}x)", v / b));
                        format!("{v:.2}{}", ratio.unwrap_or_default())
                    }
                },
            };
            line.push_str(&format!(" | {cell:>22}"));
        }
        println!("{line}");
    }
    println!(
        "ratios are to the no-mesh column; latency ratios above 1 and throughput ratios below 1 are the mesh's cost"
    );
    println!(
        "CPU per GiB: busy time of all {} cores (apps, kernel and agent) per GiB of the 1-stream run",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
