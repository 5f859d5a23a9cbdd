//! Wire captures with tcpdump on a host-side veth: started before the traffic, stopped after,
//! then searched for a plaintext marker or counted with a tcpdump filter.
//!
//! Owns the tcpdump process and the pcap file; what a test expects to find is the test's call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::process::{self, Background, Io};

/// A running capture.
pub struct Capture {
    bg: Background,
    path: PathBuf,
    iface: String,
}

impl Capture {
    /// Starts `tcpdump -i <iface> -w <path>` and returns once it is listening.
    pub fn start(iface: &str, path: &Path) -> Result<Capture> {
        let _ = std::fs::remove_file(path);
        let log = path.with_extension("tcpdump.log");
        let p = path.display().to_string();
        // -U and --immediate-mode: hand each packet to the file as it arrives (libpcap otherwise
        // buffers whole blocks, and SIGINT drops them), so stopping loses nothing; -Z root: tcpdump would
        // otherwise drop to its own user and fail to create the file in a root-owned directory.
        let mut bg = Background::spawn(
            &format!("tcpdump {iface}"),
            "tcpdump",
            &["-i", iface, "-w", &p, "-U", "--immediate-mode", "-n", "-s", "0", "-Z", "root"],
            &log,
            Io::Log,
        )
        .context("start tcpdump (`cargo xtask test` installs it)")?;
        bg.wait_for_log(|l| l.contains("listening on"), Duration::from_secs(10))?;
        Ok(Capture { bg, path: path.to_path_buf(), iface: iface.to_string() })
    }

    /// Stops tcpdump (SIGINT flushes the file) and returns what was captured.
    pub fn stop(mut self) -> Result<Captured> {
        // Let packets still in flight on the veth reach the file.
        std::thread::sleep(Duration::from_millis(200));
        self.bg.stop_with(Signal::SIGINT, Duration::from_secs(10))?;
        let bytes = std::fs::read(&self.path).with_context(|| format!("read capture {}", self.path.display()))?;
        if bytes.len() < 24 {
            bail!(
                "capture {} on {} is not a pcap file ({} bytes); tcpdump log:\n{}",
                self.path.display(),
                self.iface,
                bytes.len(),
                self.bg.log()
            );
        }
        Ok(Captured { path: self.path.clone(), bytes })
    }
}

/// A finished capture.
pub struct Captured {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

impl Captured {
    /// True when `marker` occurs anywhere in the raw pcap (headers and payloads).
    pub fn contains(&self, marker: &str) -> bool {
        let m = marker.as_bytes();
        !m.is_empty() && self.bytes.windows(m.len()).any(|w| w == m)
    }

    /// Number of packets matching a tcpdump filter expression, e.g. `tcp dst port 15008`.
    pub fn count(&self, filter: &str) -> Result<usize> {
        let mut args = vec!["-r".to_string(), self.path.display().to_string(), "-nn".to_string()];
        args.extend(filter.split_whitespace().map(str::to_string));
        let out = process::run_ok("tcpdump", &args, Duration::from_secs(30))?;
        Ok(out.stdout.lines().filter(|l| !l.trim().is_empty()).count())
    }
}
