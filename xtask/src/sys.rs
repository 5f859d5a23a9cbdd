//! The machine around the tasks: root check, system tools (installed with apt-get when missing),
//! the repository root, and running cargo with its output streamed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Binary → Debian package providing it, for everything the harness, demo and bench call.
pub const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tcpdump", "tcpdump"),
    ("curl", "curl"),
    ("iperf3", "iperf3"),
    ("iptables", "iptables"),
    ("mount", "mount"),
];

pub fn require_root(task: &str) -> Result<()> {
    if !nix_is_root() {
        bail!(
            "`cargo xtask {task}` needs root (network namespaces, veths, eBPF): run it as root, e.g. `sudo -E cargo xtask {task}`"
        );
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // /proc/self/status "Uid: real effective saved fs": effective uid 0.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The workspace root (xtask's manifest dir is `<root>/xtask`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root").to_path_buf()
}

/// True when `bin` is an executable on PATH (or in the sbin dirs root has but sudo may strip).
pub fn have(bin: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .any(|d| d.join(bin).is_file())
}

/// Installs the Debian packages for whichever of `tools` are missing (`apt-get update` once first).
pub fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools.iter().filter(|(bin, _)| !have(bin)).map(|(_, pkg)| *pkg).collect();
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing missing system packages: {}", missing.join(" "));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    run(Command::new("apt-get").arg("update").envs(env)).context("apt-get update")?;
    run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends"]).args(&missing).envs(env))
        .with_context(|| format!("apt-get install {}", missing.join(" ")))?;
    for (bin, pkg) in tools {
        if !have(bin) {
            bail!("`{bin}` still missing after installing {pkg}");
        }
    }
    Ok(())
}

/// Runs a command with inherited stdio; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// `cargo` as invoked by `cargo xtask` (its own binary, so toolchain overrides carry over),
/// in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(repo_root());
    // `cargo run` gave this process xtask's package variables; passed on, they look like changed
    // environment to build scripts that track them (ring's tracks CARGO_MANIFEST_DIR) and every
    // `cargo xtask` would rebuild half the dependency tree.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&&*k)
        {
            c.env_remove(&*k);
        }
    }
    c
}

/// `target/<profile>` for `release` or debug builds.
pub fn target_dir(release: bool) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    base.join(if release { "release" } else { "debug" })
}

/// Builds weft and weft-probe; returns their paths.
pub fn build_binaries(release: bool) -> Result<(PathBuf, PathBuf)> {
    let mut c = cargo();
    c.args(["build", "-p", "weft", "--bin", "weft", "-p", "weft-tests", "--bin", "weft-probe"]);
    if release {
        c.arg("--release");
    }
    run(&mut c).context("build weft and weft-probe")?;
    let dir = target_dir(release);
    Ok((dir.join("weft"), dir.join("weft-probe")))
}

/// Tallies of one or more `cargo test` runs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Tally {
    pub fn add(&mut self, o: Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

/// Parses libtest's `test result: ok. 3 passed; 1 failed; 0 ignored; …` line.
pub fn parse_test_result(line: &str) -> Option<Tally> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let num = |what: &str| -> Option<u64> {
        rest.split(';').find_map(|part| {
            let part = part.trim().trim_start_matches("ok.").trim_start_matches("FAILED.").trim();
            part.strip_suffix(what).and_then(|n| n.trim().parse().ok())
        })
    };
    Some(Tally { passed: num("passed")?, failed: num("failed")?, ignored: num("ignored").unwrap_or(0) })
}

/// Runs a `cargo test …` command, echoing its stdout, and returns the summed results and
/// whether the command itself succeeded.
pub fn cargo_test(cmd: &mut Command) -> Result<(Tally, bool)> {
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let mut tally = Tally::default();
    let out = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(t) = parse_test_result(&line) {
            tally.add(t);
        }
    }
    let st = child.wait()?;
    Ok((tally, st.success()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_result_lines() {
        let t = parse_test_result(
            "test result: ok. 13 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.40s",
        )
        .unwrap();
        assert_eq!(t, Tally { passed: 13, failed: 0, ignored: 2 });
        let t = parse_test_result(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5.53s",
        )
        .unwrap();
        assert_eq!(t, Tally { passed: 3, failed: 2, ignored: 0 });
        assert!(parse_test_result("running 5 tests").is_none());
    }

    #[test]
    fn finds_tools_on_path() {
        assert!(have("sh"));
        assert!(!have("weft-no-such-tool-xyz"));
    }
}
