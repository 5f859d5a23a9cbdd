//! Network-namespace harness for weft's end-to-end tests, the demo and the L4 bench.
//!
//! Owns everything a test needs around the node agent: "pods" made of network namespaces on a
//! Linux bridge (`topology`), the mesh.yaml that describes them (`mesh`), the agent process
//! (`agent`), wire captures (`capture`), Prometheus scrapes (`metrics`), the shared demo mesh
//! (`scenario`), child processes with time limits (`process`) and the traffic generator
//! `weft-probe` (`probe`). It does not own the agent's behaviour: the suites in `tests/` assert
//! it from the outside, through its CLI contract.
//!
//! Everything here needs root; [`require_root`] fails loudly instead of skipping. Tests that use
//! a topology are serialised by a host-wide lock (the agent's eBPF programs are node-global).

pub mod agent;
pub mod apiserver;
pub mod capture;
pub mod cluster;
pub mod mesh;
pub mod metrics;
pub mod probe;
pub mod process;
pub mod scenario;
pub mod topology;
pub mod waypoint;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use agent::{Agent, AgentOptions};
pub use capture::Capture;
pub use topology::{Mode, Pod, PodSpec, ServiceSpec, Topology};
pub use waypoint::Waypoint;

/// Panics with what to do unless the process runs as root.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (it creates network namespaces, veths and loads eBPF through the agent): \
             run it as root, e.g. `sudo -E cargo xtask test`"
        );
    }
}

/// Host-wide lock for everything that builds a topology or runs an agent. An flock conflicts
/// across open file descriptions, so it serialises threads of one test binary as well as
/// separate processes (two test binaries, a demo and a test).
pub struct SerialGuard {
    _file: File,
}

const LOCK_PATH: &str = "/run/weft-netns-harness.lock";

/// Takes the host-wide harness lock, waiting at most `limit`.
pub fn serial(limit: Duration) -> anyhow::Result<SerialGuard> {
    let file = File::options().create(true).truncate(false).write(true).open(LOCK_PATH)?;
    let deadline = Instant::now() + limit;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(SerialGuard { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another weft topology held {LOCK_PATH} for {limit:?}: a demo or test still running? \
                 (one topology at a time, also within one test)"
            ),
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
    }
}

/// `target/<profile>` of the running executable: test binaries live in `target/<profile>/deps`,
/// xtask and weft-probe in `target/<profile>`.
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir
    }
}

static WEFT_BIN: OnceLock<PathBuf> = OnceLock::new();
static PROBE_BIN: OnceLock<PathBuf> = OnceLock::new();

/// Makes [`weft_bin`] and [`probe_bin`] return these for the rest of the process: xtask builds
/// them itself (release for the benches), which need not be the profile xtask runs in.
pub fn use_bins(weft: PathBuf, probe: PathBuf) {
    let _ = WEFT_BIN.set(weft);
    let _ = PROBE_BIN.set(probe);
}

/// The agent binary: set by [`use_bins`], else `$WEFT_BIN`, else `weft` beside this executable's
/// profile dir.
pub fn weft_bin() -> PathBuf {
    if let Some(p) = WEFT_BIN.get() {
        return p.clone();
    }
    bin_from_env_or_target("WEFT_BIN", "weft", "cargo build -p weft")
}

/// The probe binary: set by [`use_bins`], else `$WEFT_PROBE_BIN`, else `weft-probe` beside
/// this executable's profile dir.
pub fn probe_bin() -> PathBuf {
    if let Some(p) = PROBE_BIN.get() {
        return p.clone();
    }
    bin_from_env_or_target("WEFT_PROBE_BIN", "weft-probe", "cargo build -p weft-tests --bin weft-probe")
}

fn bin_from_env_or_target(var: &str, name: &str, build: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| target_profile_dir().join(name));
    if !p.is_file() {
        panic!("{} not found: build it first (`{build}`, same profile as the tests) or set ${var}", p.display());
    }
    p
}

/// Polls `f` every `every` until it returns `Some`, at most `limit`.
pub fn poll<T>(limit: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Reads a file that may be missing (logs), lossily.
pub fn read_lossy(p: &Path) -> String {
    std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// The last `n` lines of `s`, with a note of how many were left out.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() <= n {
        return s.to_string();
    }
    format!("[… {} earlier lines …]\n{}", lines.len() - n, lines[lines.len() - n..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb", 5), "a\nb");
        assert_eq!(tail("a\nb\nc", 2), "[… 1 earlier lines …]\nb\nc");
    }

    #[test]
    fn poll_is_bounded() {
        let t = Instant::now();
        let r: Option<()> = poll(Duration::from_millis(100), Duration::from_millis(10), || None);
        assert!(r.is_none());
        assert!(t.elapsed() < Duration::from_secs(2));
        let mut n = 0;
        assert_eq!(
            poll(Duration::from_secs(5), Duration::from_millis(1), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            Some(3)
        );
    }
}
