//! Child processes for the harness: one-shot commands with a hard time limit, and background
//! processes that are killed when their guard drops (also during a panic).
//!
//! Every child gets its own process group, so a Ctrl-C in the terminal reaches only the test
//! or xtask process, which then tears the topology down in order instead of leaving half of it.
//! This module knows nothing about namespaces; `topology` prefixes commands with `ip netns exec`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// What a finished one-shot command left behind.
#[derive(Debug, Clone)]
pub struct Output {
    pub cmdline: String,
    /// `None` when the command was killed because it ran past its time limit.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Fails with the whole transcript unless the command exited 0.
    pub fn ok(self) -> Result<Self> {
        if !self.success() {
            bail!("{self}");
        }
        Ok(self)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match (self.timed_out, self.code) {
            (true, _) => "timed out".to_string(),
            (false, Some(c)) => format!("exit {c}"),
            (false, None) => "killed by a signal".to_string(),
        };
        write!(f, "`{}` → {how}", self.cmdline)?;
        if !self.stdout.trim().is_empty() {
            write!(f, "\n  stdout: {}", self.stdout.trim())?;
        }
        if !self.stderr.trim().is_empty() {
            write!(f, "\n  stderr: {}", self.stderr.trim())?;
        }
        Ok(())
    }
}

pub fn cmdline<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Runs `program args…` to completion, killing it after `limit`. Output is collected on threads,
/// so a chatty child cannot block on a full pipe.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S], limit: Duration) -> Result<Output> {
    let line = cmdline(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn `{line}` (is {program} installed? `cargo xtask test` installs it)"))?;
    let out_rx = drain(child.stdout.take());
    let err_rx = drain(child.stderr.take());
    let (status, timed_out) = wait_limited(&mut child, limit)?;
    Ok(Output {
        cmdline: line,
        code: status.and_then(|s| s.code()),
        stdout: out_rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default(),
        stderr: err_rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default(),
        timed_out,
    })
}

/// Like [`run`] but fails unless the command exits 0.
pub fn run_ok<S: AsRef<OsStr>>(program: &str, args: &[S], limit: Duration) -> Result<Output> {
    run(program, args, limit)?.ok()
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut p) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
        });
    }
    rx
}

/// Waits for `child` at most `limit`; past it, SIGKILLs its process group. Returns the status
/// (None if it could not be reaped) and whether the limit was hit.
fn wait_limited(child: &mut Child, limit: Duration) -> Result<(Option<ExitStatus>, bool)> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok((Some(st), false));
        }
        if Instant::now() >= deadline {
            kill_group(child.id(), Signal::SIGKILL);
            let st = child.wait().ok();
            return Ok((st, true));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn kill_group(pid: u32, sig: Signal) {
    // The child leads its own group (process_group(0)), so this also reaches its children.
    let _ = kill(Pid::from_raw(-(pid as i32)), sig);
}

/// A background process: stdout and stderr go to a log file; killed (whole group) on drop.
pub struct Background {
    name: String,
    child: Child,
    log: PathBuf,
    stdin: Option<ChildStdin>,
    stdout_lines: Option<mpsc::Receiver<String>>,
}

/// How a background process talks to the test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// stdout+stderr to the log file, stdin closed.
    Log,
    /// stdin piped (see [`Background::send_line`]), stdout lines readable with
    /// [`Background::recv_line`], stderr to the log file.
    Piped,
}

impl Background {
    /// Starts `program args…` with output appended to `log`.
    pub fn spawn<S: AsRef<OsStr>>(name: &str, program: &str, args: &[S], log: &Path, io: Io) -> Result<Self> {
        Self::spawn_with_env(name, program, args, &[], log, io)
    }

    /// [`Background::spawn`] with extra environment variables for the child.
    pub fn spawn_with_env<S: AsRef<OsStr>>(
        name: &str,
        program: &str,
        args: &[S],
        env: &[(&str, &str)],
        log: &Path,
        io: Io,
    ) -> Result<Self> {
        let line = cmdline(program, args);
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open log {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args).envs(env.iter().copied()).stderr(file.try_clone()?).process_group(0);
        match io {
            Io::Log => cmd.stdin(Stdio::null()).stdout(file),
            Io::Piped => cmd.stdin(Stdio::piped()).stdout(Stdio::piped()),
        };
        let mut child = cmd.spawn().with_context(|| format!("spawn `{line}`"))?;
        let stdin = child.stdin.take();
        let stdout_lines = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                for l in BufReader::new(out).lines() {
                    let Ok(l) = l else { break };
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        Ok(Background { name: name.to_string(), child, log: log.to_path_buf(), stdin, stdout_lines })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), sig).with_context(|| format!("send {sig} to {}", self.name))
    }

    /// Sends `sig` and waits up to `limit` for the exit; SIGKILLs the group after that.
    pub fn stop_with(&mut self, sig: Signal, limit: Duration) -> Result<Option<ExitStatus>> {
        if let Some(st) = self.exited() {
            return Ok(Some(st));
        }
        let _ = self.signal(sig);
        let (st, timed_out) = wait_limited(&mut self.child, limit)?;
        if timed_out {
            bail!("{} did not exit within {limit:?} after {sig}; killed it", self.name);
        }
        Ok(st)
    }

    /// Writes one line to the process's stdin (only with [`Io::Piped`]).
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("process was not started with Io::Piped")?;
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()?;
        Ok(())
    }

    /// Reads the next stdout line (only with [`Io::Piped`]), waiting at most `limit`.
    pub fn recv_line(&mut self, limit: Duration) -> Result<String> {
        let rx = self.stdout_lines.as_ref().context("process was not started with Io::Piped")?;
        rx.recv_timeout(limit)
            .map_err(|e| anyhow::anyhow!("no line from {} within {limit:?} ({e}); log:\n{}", self.name, self.log()))
    }

    /// Waits until `pred` holds for a line of the log file, up to `limit`.
    pub fn wait_for_log(&mut self, pred: impl Fn(&str) -> bool, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.log().lines().find(|l| pred(l)) {
                return Ok(l.to_string());
            }
            if let Some(st) = self.exited() {
                bail!("{} exited ({st}) before the expected log line; log:\n{}", self.name, self.log());
            }
            if Instant::now() >= deadline {
                bail!("{} did not log the expected line within {limit:?}; log:\n{}", self.name, self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stdin.take();
        if self.child.try_wait().ok().flatten().is_none() {
            kill_group(self.child.id(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_collects_output_and_exit_code() {
        let out = run("sh", &["-c", "echo out; echo err >&2; exit 3"], Duration::from_secs(5)).unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout.trim(), "out");
        assert_eq!(out.stderr.trim(), "err");
        assert!(!out.timed_out);
        assert!(run_ok("sh", &["-c", "exit 1"], Duration::from_secs(5)).is_err());
    }

    #[test]
    fn run_kills_a_command_past_its_limit() {
        let t = Instant::now();
        let out = run("sh", &["-c", "sleep 30"], Duration::from_millis(200)).unwrap();
        assert!(out.timed_out);
        assert!(!out.success());
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    }

    #[test]
    fn background_is_killed_on_drop_and_pipes_lines() {
        let dir = std::env::temp_dir().join(format!("weft-proc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut bg = Background::spawn("cat", "cat", &[] as &[&str], &dir.join("cat.log"), Io::Piped).unwrap();
        bg.send_line("hello").unwrap();
        assert_eq!(bg.recv_line(Duration::from_secs(5)).unwrap(), "hello");
        let pid = bg.pid();
        drop(bg);
        // Reaped by Drop: the pid no longer names our child.
        assert!(kill(Pid::from_raw(pid as i32), None).is_err(), "cat still alive after drop");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
