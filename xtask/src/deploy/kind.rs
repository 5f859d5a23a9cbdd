//! `cargo xtask kind-e2e`: weft installed as users install it, on a kind cluster, running the demo
//! scenario with real pods.
//!
//! Owns: the sequence — preflight (docker, kind, kubectl, the host's bpffs), cluster from
//! deploy/kind/cluster.yaml, image from deploy/Dockerfile loaded into kind under the name the plain
//! manifests use, `kubectl apply -k deploy/`, rollouts, deploy/kind/demo.yaml, then one PASS/FAIL line
//! per step — and deleting the cluster it created. Does not own: the manifests (generated, see
//! `chart`) or the scenario's objects (deploy/kind/demo.yaml).
//!
//! It has not been run on the machines this project is developed on: they have no Docker. Without a
//! reachable Docker daemon it fails at once and says so.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::manifests::{NAMESPACE, Values};
use crate::sys;

/// The cluster's name; deploy/kind/cluster.yaml names it too (its per-node bpffs directories do).
const CLUSTER: &str = "weft-e2e";
const CLUSTER_CONFIG: &str = "deploy/kind/cluster.yaml";
const DEMO: &str = "deploy/kind/demo.yaml";
const DOCKERFILE: &str = "deploy/Dockerfile";
const ROLLOUT_TIMEOUT: &str = "300s";
/// How long a policy change may take to show in traffic (the target is 1 s; kubectl exec adds more).
const POLICY_DEADLINE: Duration = Duration::from_secs(20);
const TRUST_DOMAIN: &str = weft::config::DEFAULT_TRUST_DOMAIN;

#[derive(clap::Args)]
#[command(after_help = "Needs Docker (a running daemon), kind and kubectl. It cannot run on this project's \
development machines (no Docker there) and has not been run on them: it fails at once when Docker \
is missing. Run it on a workstation or CI runner with Docker.")]
pub struct Args {
    /// Keep the cluster afterwards (delete it with `kind delete cluster --name weft-e2e`).
    #[arg(long)]
    keep: bool,
    /// Use the existing weft-e2e cluster instead of creating one (it is then never deleted).
    #[arg(long)]
    reuse: bool,
}

pub fn run(args: Args) -> Result<()> {
    preflight()?;
    let root = sys::repo_root();
    let _cluster = Cluster::up(&root, &args)?;
    let image = Values::defaults().image;
    let ctx = format!("kind-{CLUSTER}");
    let kubectl = |a: &[&str]| -> Command {
        let mut c = Command::new("kubectl");
        c.current_dir(&root).arg("--context").arg(&ctx).args(a);
        c
    };

    println!("==> docker build {image}");
    sys::run(Command::new("docker").current_dir(&root).args(["build", "-f", DOCKERFILE, "-t", &image, "."]))?;
    sys::run(Command::new("kind").args(["load", "docker-image", &image, "--name", CLUSTER]))?;
    println!("==> kubectl apply -k deploy/");
    sys::run(&mut kubectl(&["apply", "--server-side", "-k", "deploy/"]))?;
    for what in ["deployment/weft-ca", "daemonset/weft-node"] {
        sys::run(&mut kubectl(&["rollout", "status", "-n", NAMESPACE, what, "--timeout", ROLLOUT_TIMEOUT]))?;
    }
    println!("==> demo scenario ({DEMO})");
    sys::run(&mut kubectl(&["apply", "--server-side", "-f", DEMO]))?;
    for ns in ["demo", "legacy"] {
        sys::run(&mut kubectl(&[
            "wait",
            "-n",
            ns,
            "--for=condition=Available",
            "deployment",
            "--all",
            "--timeout",
            ROLLOUT_TIMEOUT,
        ]))?;
    }

    let get = |ns: &str, from: &str| -> Result<String> {
        let out = output(&mut kubectl(&[
            "exec",
            "-n",
            ns,
            &format!("deploy/{from}"),
            "--",
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://server.demo/hostname",
        ]))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            bail!("{ns}/{from} → server.demo failed: {}", String::from_utf8_lossy(&out.stderr).trim())
        }
    };
    let mut failed: Vec<&str> = Vec::new();
    let mut step = |name: &'static str, r: Result<String>| match r {
        Ok(detail) => println!("PASS {name}: {detail}"),
        Err(e) => {
            println!("FAIL {name}: {e:#}");
            failed.push(name);
        }
    };

    step("client → server", get("demo", "client").map(|h| format!("answered by {}", h.trim())));
    step("mutual TLS with SPIFFE identities", mtls_in_metrics(&kubectl));
    step("intruder denied", expect_failure(get("demo", "intruder"), "AuthorizationPolicy allows only sa client"));
    step("legacy (outside the mesh) refused", expect_failure(get("legacy", "legacy"), "PeerAuthentication STRICT"));
    step("policy removal applies without restart", {
        sys::run(&mut kubectl(&["delete", "-n", "demo", "authorizationpolicy", "server-allow-client"]))
            .and_then(|()| until(POLICY_DEADLINE, || get("demo", "intruder").ok()))
            .map(|(h, took)| format!("intruder answered by {} after {took:?}", h.trim()))
    });

    if failed.is_empty() {
        println!("kind-e2e: all steps passed");
        Ok(())
    } else {
        bail!("kind-e2e steps failed: {}", failed.join(", "))
    }
}

fn preflight() -> Result<()> {
    let missing: Vec<&str> = ["docker", "kind", "kubectl"].into_iter().filter(|b| !sys::have(b)).collect();
    if !missing.is_empty() {
        bail!(
            "kind-e2e needs docker, kind and kubectl; missing: {}. This cannot run without Docker (the \
             project's development machines have none): run it where Docker is available",
            missing.join(", ")
        );
    }
    let docker_up = Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !docker_up {
        bail!("kind-e2e: `docker info` failed: start the Docker daemon (or give this user access to it) and retry");
    }
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.split_whitespace().nth(2) == Some("bpf"))
    {
        bail!(
            "kind-e2e: /sys/fs/bpf is not a bpf filesystem on this host; mount it (`sudo mount -t bpf bpf /sys/fs/bpf`): \
               the kind nodes get their bpffs from it (deploy/kind/cluster.yaml)"
        );
    }
    Ok(())
}

/// The kind cluster, deleted on drop when this run created it and `--keep` was not given.
struct Cluster {
    delete: bool,
}

impl Cluster {
    fn up(root: &Path, args: &Args) -> Result<Self> {
        if args.reuse {
            let out = output(Command::new("kind").args(["get", "clusters"]))?;
            if !String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == CLUSTER) {
                bail!("--reuse: there is no kind cluster named {CLUSTER}; run without --reuse to create it");
            }
            return Ok(Self { delete: false });
        }
        println!("==> kind create cluster --name {CLUSTER}");
        sys::run(Command::new("kind").current_dir(root).args([
            "create",
            "cluster",
            "--name",
            CLUSTER,
            "--config",
            CLUSTER_CONFIG,
            "--wait",
            "180s",
        ]))?;
        Ok(Self { delete: !args.keep })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.delete {
            let _ = Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]).status();
        }
    }
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("spawn {cmd:?}"))
}

fn expect_failure(r: Result<String>, why: &str) -> Result<String> {
    match r {
        Ok(body) => bail!("expected a refusal ({why}), got an answer: {}", body.trim()),
        Err(e) => Ok(format!("refused ({why}): {e:#}")),
    }
}

/// Polls `f` every 500 ms until it yields, for at most `limit`.
fn until<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<(T, Duration)> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(v) = f() {
            return Ok((v, start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("not within {limit:?}")
}

/// The client → server connection shows in some node agent's Istio TCP metrics as mutual TLS between
/// the two ServiceAccounts' SPIFFE identities. Scraped through the API server's pod proxy.
fn mtls_in_metrics(kubectl: &dyn Fn(&[&str]) -> Command) -> Result<String> {
    let pods = output(&mut kubectl(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        "app.kubernetes.io/name=weft-node",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]))?;
    let pods = String::from_utf8_lossy(&pods.stdout).into_owned();
    let source = format!(r#"source_principal="spiffe://{TRUST_DOMAIN}/ns/demo/sa/client""#);
    let dest = format!(r#"destination_principal="spiffe://{TRUST_DOMAIN}/ns/demo/sa/server""#);
    for pod in pods.split_whitespace() {
        let path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:15020/proxy/metrics");
        let out = output(&mut kubectl(&["get", "--raw", &path]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().find(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains(&source)
                && l.contains(&dest)
                && l.contains(r#"connection_security_policy="mutual_tls""#)
        }) {
            return Ok(format!("{pod}: {line}"));
        }
    }
    bail!(
        "no node agent ({pods}) reports an istio_tcp_connections_opened_total line with {source}, {dest} and mutual_tls"
    )
}
