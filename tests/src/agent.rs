//! The node agent as a child process: `weft node --config <mesh.yaml> …` with a state dir, pin dir
//! and admin/metrics/ready ports of its own per topology, its output captured to
//! `<topology dir>/agent.log` and printed when a test fails.
//!
//! Owns starting, readiness, signals (SIGHUP reload, SIGTERM drain, SIGKILL crash) and scrapes.
//! It asserts nothing about the agent's behaviour; the suites do.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::metrics::Metrics;
use crate::process::{self, Background, Io};
use crate::topology::Topology;
use crate::{poll, read_lossy, tail, weft_bin};

/// How long `start` waits for `/healthz/ready` by default.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the agent log shown with a failure (the whole log stays in the topology dir).
const LOG_TAIL: usize = 300;

/// Knobs for one agent run.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub bin: PathBuf,
    pub admin_addr: String,
    pub metrics_addr: String,
    pub ready_addr: String,
    /// Appended after the standard arguments (e.g. `--redirect iptables` for the bench).
    pub extra_args: Vec<String>,
    pub ready_timeout: Duration,
    /// `RUST_LOG` for the agent unless the caller's environment sets one.
    pub rust_log: String,
}

impl AgentOptions {
    /// Loopback ports unique to the topology (`20000 + 4·index + {0,1,2}`), so a developer's demo
    /// on the standard 15000/15020/15021 does not collide with a test.
    pub fn for_topology(topo: &Topology) -> Self {
        let base = 20000 + 4 * topo.index() as u16;
        AgentOptions {
            bin: weft_bin(),
            admin_addr: format!("127.0.0.1:{base}"),
            metrics_addr: format!("127.0.0.1:{}", base + 1),
            ready_addr: format!("127.0.0.1:{}", base + 2),
            extra_args: Vec::new(),
            ready_timeout: READY_TIMEOUT,
            rust_log: "info,weft=debug".into(),
        }
    }

    /// Istio's standard ports (15000 admin, 15020 metrics, 15021 ready), all on loopback.
    pub fn standard_ports(mut self) -> Self {
        self.admin_addr = "127.0.0.1:15000".into();
        self.metrics_addr = "127.0.0.1:15020".into();
        self.ready_addr = "127.0.0.1:15021".into();
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.extra_args.push(a.into());
        self
    }
}

/// A (possibly stopped) agent; SIGTERMed on drop, and its log printed if the thread panics.
pub struct Agent {
    opts: AgentOptions,
    args: Vec<String>,
    log: PathBuf,
    bg: Option<Background>,
}

impl Agent {
    /// Writes nothing: the topology's mesh.yaml must exist (`Topology::write_mesh`). Starts the
    /// agent and waits until it reports ready.
    pub fn start(topo: &Topology, opts: AgentOptions) -> Result<Agent> {
        let mut a = Agent::spawn(topo, opts)?;
        a.wait_ready()?;
        Ok(a)
    }

    /// Starts the agent without waiting for readiness.
    pub fn spawn(topo: &Topology, opts: AgentOptions) -> Result<Agent> {
        ensure_bpffs()?;
        let config = topo.mesh_path();
        if !config.is_file() {
            bail!("{} missing: call Topology::write_mesh before starting the agent", config.display());
        }
        let state = topo.dir().join("state");
        std::fs::create_dir_all(&state)?;
        let mut args: Vec<String> = [
            "node",
            "--config",
            &config.display().to_string(),
            "--state-dir",
            &state.display().to_string(),
            "--node-name",
            &format!("weft-{}", topo.name()),
            "--bpf-pin-dir",
            &topo.bpf_pin_dir().display().to_string(),
            "--admin-addr",
            &opts.admin_addr,
            "--metrics-addr",
            &opts.metrics_addr,
            "--ready-addr",
            &opts.ready_addr,
            "--log-format",
            "text",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(opts.extra_args.iter().cloned());
        let mut a = Agent { log: topo.dir().join("agent.log"), opts, args, bg: None };
        a.launch()?;
        Ok(a)
    }

    fn launch(&mut self) -> Result<()> {
        // The caller's RUST_LOG wins; otherwise the agent logs enough to debug a failed test.
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| self.opts.rust_log.clone());
        let _ = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).and_then(|mut f| {
            use std::io::Write;
            writeln!(f, "===== harness: {} {}", self.opts.bin.display(), self.args.join(" "))
        });
        let bin = self.opts.bin.display().to_string();
        // NO_COLOR: the log is a file that people read, not a terminal.
        let env = [("RUST_LOG", rust_log.as_str()), ("NO_COLOR", "1")];
        self.bg = Some(Background::spawn_with_env("weft node", &bin, &self.args, &env, &self.log, Io::Log)?);
        Ok(())
    }

    /// Waits until `GET /healthz/ready` answers 200, failing early if the agent exits.
    pub fn wait_ready(&mut self) -> Result<()> {
        let limit = self.opts.ready_timeout;
        let mut last = None;
        let ready = poll(limit, Duration::from_millis(100), || {
            if let Some(st) = self.bg.as_mut().and_then(|b| b.exited()) {
                last = Some(format!("agent exited: {st}"));
                return Some(false);
            }
            match self.ready_status() {
                Some(200) => Some(true),
                other => {
                    last = Some(format!("last status {other:?}"));
                    None
                }
            }
        });
        let why = match ready {
            Some(true) => return Ok(()),
            Some(false) => "exited before it was ready".to_string(),
            None => format!("not ready within {limit:?} on http://{}/healthz/ready", self.opts.ready_addr),
        };
        bail!("agent {why} ({}); agent log:\n{}", last.unwrap_or_default(), tail(&self.log(), LOG_TAIL))
    }

    /// HTTP status of `/healthz/ready`, `None` when nothing answers.
    pub fn ready_status(&self) -> Option<u16> {
        let out = process::run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                &format!("http://{}/healthz/ready", self.opts.ready_addr),
            ],
            Duration::from_secs(5),
        )
        .ok()?;
        out.stdout.trim().parse().ok().filter(|c| *c != 0)
    }

    /// Raw Prometheus text from `/metrics`.
    pub fn metrics_text(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.opts.metrics_addr);
        let out = process::run_ok("curl", &["-sS", "--fail", "--max-time", "5", &url], Duration::from_secs(10))
            .context("scrape agent metrics")?;
        Ok(out.stdout)
    }

    pub fn metrics(&self) -> Result<Metrics> {
        Ok(Metrics::parse(&self.metrics_text()?))
    }

    pub fn metrics_addr(&self) -> &str {
        &self.opts.metrics_addr
    }

    pub fn ready_addr(&self) -> &str {
        &self.opts.ready_addr
    }

    /// Pid of the running agent process.
    pub fn pid(&self) -> Option<u32> {
        self.bg.as_ref().map(|b| b.pid())
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.bg.as_mut().is_some_and(|b| b.exited().is_none())
    }

    /// SIGHUP: reload the config without restarting.
    pub fn reload(&self) -> Result<()> {
        self.bg.as_ref().context("agent not running")?.signal(Signal::SIGHUP)
    }

    /// SIGKILL, as a crash would; pinned eBPF state stays behind.
    pub fn kill(&mut self) -> Result<()> {
        let mut bg = self.bg.take().context("agent not running")?;
        bg.stop_with(Signal::SIGKILL, Duration::from_secs(10))?;
        Ok(())
    }

    /// SIGTERM and wait up to 30 s for the drain; returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut bg = self.bg.take().context("agent not running")?;
        bg.stop_with(Signal::SIGTERM, Duration::from_secs(30))?.context("agent exit status unavailable")
    }

    /// Starts the agent again with the same arguments (same state and pin dir) and waits until
    /// ready. The previous process must have stopped.
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("agent still running (pid {:?}): stop or kill it first", self.pid());
        }
        self.bg = None;
        self.launch()?;
        self.wait_ready()
    }

    /// Everything the agent printed so far (all runs).
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        stop_showing_log(self.bg.take(), &self.log);
    }
}

/// How an agent handle ends: SIGTERM (≤ 10 s to drain), and the tail of its log on stderr when the
/// test is failing, so the failure shows what the agent saw.
pub(crate) fn stop_showing_log(bg: Option<Background>, log: &Path) {
    if let Some(mut bg) = bg {
        let _ = bg.stop_with(Signal::SIGTERM, Duration::from_secs(10));
    }
    if std::thread::panicking() {
        eprintln!(
            "===== agent log ({}) =====\n{}\n===== end of agent log =====",
            log.display(),
            tail(&read_lossy(log), LOG_TAIL)
        );
    }
}

/// Mounts bpffs on /sys/fs/bpf when it is not mounted (a fresh machine or container).
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    if mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    }) {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    process::run_ok("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"], Duration::from_secs(10))
        .context("mount bpffs on /sys/fs/bpf")?;
    Ok(())
}

/// SIGKILLs any `weft node` process whose arguments name `pin_dir` (a run that crashed and left
/// its agent behind would otherwise hold the topology's names and ports).
pub fn kill_agents_using(pin_dir: &Path) {
    let want = pin_dir.display().to_string();
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else { return };
    for e in rd.filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_agent = args.iter().any(|a| *a == b"node")
            && args.windows(2).any(|w| w[0] == b"--bpf-pin-dir" && w[1] == want.as_bytes());
        if is_agent {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}
