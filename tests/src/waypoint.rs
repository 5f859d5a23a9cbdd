//! A waypoint as a child process inside its own pod: `weft waypoint --config <mesh.yaml> …` (or,
//! in cluster mode, `--kubeconfig …`) run with `ip netns exec`, sharing the node agent's state dir
//! (the local CA root, in local mode) so both hold certificates of one mesh. Its admin/metrics/ready ports are Istio's standard ones inside the
//! pod's netns, so scrapes run `curl` in the pod.
//!
//! Owns starting, readiness and scrapes; it asserts nothing about the waypoint's behaviour.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::metrics::Metrics;
use crate::process::{Background, Io};
use crate::topology::{Pod, Topology};
use crate::{poll, read_lossy, tail};

/// Label Istio puts on a waypoint's pods (and selects its Service with).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// A running waypoint; SIGTERMed on drop, its log printed if the thread panics.
pub struct Waypoint {
    pod: Pod,
    log: PathBuf,
    bg: Option<Background>,
}

impl Waypoint {
    /// Starts `weft waypoint` (the binary `bin`, e.g. [`crate::weft_bin`]) for Gateway
    /// `namespace/name` in `pod` and waits until it is ready.
    pub fn start(topo: &Topology, bin: &Path, pod: &str, namespace: &str, name: &str) -> Result<Waypoint> {
        let source = ["--config".to_string(), topo.mesh_path().display().to_string()];
        Self::spawn(topo, bin, pod, namespace, name, &source)
    }

    /// Cluster mode: `weft waypoint --kubeconfig …` with `cluster` (the kubeconfig, CA address,
    /// server name, root certificate and token flags) instead of `--config`. The addresses in
    /// them must be reachable from inside `pod`'s network namespace.
    pub fn start_cluster(
        topo: &Topology,
        bin: &Path,
        pod: &str,
        namespace: &str,
        name: &str,
        cluster: &[String],
    ) -> Result<Waypoint> {
        Self::spawn(topo, bin, pod, namespace, name, cluster)
    }

    fn spawn(
        topo: &Topology,
        bin: &Path,
        pod: &str,
        namespace: &str,
        name: &str,
        source: &[String],
    ) -> Result<Waypoint> {
        let pod = topo.pod(pod).clone();
        let state = topo.dir().join("state");
        std::fs::create_dir_all(&state)?;
        let log = topo.dir().join(format!("waypoint-{name}.log"));
        let mut args: Vec<String> = ["netns", "exec", &pod.netns, &bin.display().to_string(), "waypoint"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(source.iter().cloned());
        args.extend(
            [
                "--state-dir",
                &state.display().to_string(),
                "--namespace",
                namespace,
                "--name",
                name,
                "--log-format",
                "text",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info,weft=debug".into());
        let env = [("RUST_LOG", rust_log.as_str()), ("NO_COLOR", "1")];
        let bg = Background::spawn_with_env("weft waypoint", "ip", &args, &env, &log, Io::Log)?;
        let mut w = Waypoint { pod, log, bg: Some(bg) };
        w.wait_ready()?;
        Ok(w)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let ready = poll(Duration::from_secs(30), Duration::from_millis(200), || {
            if let Some(bg) = self.bg.as_mut()
                && bg.exited().is_some()
            {
                return Some(false);
            }
            self.get("http://127.0.0.1:15021/healthz/ready").ok().filter(|b| !b.is_empty()).map(|_| true)
        });
        match ready {
            Some(true) => Ok(()),
            Some(false) => bail!("weft waypoint exited before it was ready:\n{}", tail(&self.log(), 100)),
            None => bail!("weft waypoint not ready within 30 s:\n{}", tail(&self.log(), 100)),
        }
    }

    /// GET `url` from inside the waypoint's pod (its admin ports are only there).
    fn get(&self, url: &str) -> Result<String> {
        let out = self.pod.exec(&["curl", "-sS", "-f", "--max-time", "5", url], Duration::from_secs(8))?;
        if !out.success() {
            bail!("GET {url} in {}: {out}", self.pod.name());
        }
        Ok(out.stdout)
    }

    pub fn metrics_text(&self) -> Result<String> {
        self.get("http://127.0.0.1:15020/metrics").context("scrape waypoint metrics")
    }

    pub fn metrics(&self) -> Result<Metrics> {
        Ok(Metrics::parse(&self.metrics_text()?))
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        if let Some(mut bg) = self.bg.take() {
            let _ = bg.stop_with(Signal::SIGTERM, Duration::from_secs(10));
        }
        if std::thread::panicking() {
            eprintln!(
                "===== waypoint log ({}) =====\n{}\n===== end of waypoint log =====",
                self.log.display(),
                tail(&self.log(), 300)
            );
        }
    }
}

/// `n` GETs to `url` from `pod` in one curl (one kept-alive connection, so every request is routed
/// by the waypoint on its own), curl given `limit` in all; returns the HTTP status and the backend's
/// `x-served-by` of each. Panics when curl answered fewer than `n`.
pub fn requests(pod: &Pod, url: &str, n: usize, headers: &[&str], limit: Duration) -> Vec<(u16, String)> {
    let mut args: Vec<String> = vec!["curl".into(), "-sS".into(), "--max-time".into(), limit.as_secs().to_string()];
    for h in headers {
        args.extend(["-H".into(), h.to_string()]);
    }
    // One line per response: status and the backend that answered.
    args.extend(["-w".into(), "%{http_code} %header{x-served-by}\\n".into()]);
    // `-o` applies to one URL: discard each body.
    for _ in 0..n {
        args.extend(["-o".into(), "/dev/null".into(), url.into()]);
    }
    let out = pod.exec(&args, limit + Duration::from_secs(10)).unwrap();
    let got: Vec<(u16, String)> = out
        .stdout
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            (f.next().and_then(|c| c.parse().ok()).unwrap_or(0), f.next().unwrap_or("-").to_string())
        })
        .collect();
    assert_eq!(got.len(), n, "curl answered {} of {n} requests: {out}", got.len());
    got
}

/// `"STATUS BACKEND"` → how many of `got` had it.
pub fn served_by(got: &[(u16, String)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (status, by) in got {
        *m.entry(format!("{status} {by}")).or_default() += 1;
    }
    m
}
