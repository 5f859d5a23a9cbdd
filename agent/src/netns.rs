//! Network-namespace glue: open a pod's network namespace, run a closure inside it on the
//! current thread, read its cookie, and create sockets that belong to it.
//!
//! A socket belongs to the namespace it was created in for its whole life, so the agent creates
//! in-pod listeners and outbound sockets with a brief `setns` round trip on the calling thread
//! (as ztunnel's in-pod mode does) and then drives them from tokio in the host namespace.
//! This module owns no sockets and no policy; it is the only place (besides the eBPF loader)
//! allowed `unsafe`, and each use says why it is sound.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// Where `ip netns add NAME` puts named network namespaces.
pub const NAMED_NETNS_DIR: &str = "/var/run/netns";

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    cookie: u64,
}

impl Netns {
    /// Opens a network namespace by path (`/var/run/netns/x`, `/proc/PID/ns/net`) or by the
    /// bare name `ip netns` uses.
    pub fn open(path_or_name: impl AsRef<Path>) -> io::Result<Self> {
        let p = path_or_name.as_ref();
        let path = if p.is_absolute() { p.to_path_buf() } else { Path::new(NAMED_NETNS_DIR).join(p) };
        let file =
            File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", path.display())))?;
        let mut ns = Netns { file, path, cookie: 0 };
        ns.cookie = ns.run(current_netns_cookie)??;
        Ok(ns)
    }

    /// The namespace the calling thread is in.
    pub fn current() -> io::Result<Self> {
        let path = PathBuf::from("/proc/thread-self/ns/net");
        let file = File::open(&path)?;
        Ok(Netns { file, path, cookie: current_netns_cookie()? })
    }

    /// The kernel's netns cookie: a 64-bit id that is never reused while the host runs, and
    /// the key the eBPF programs use for enrolled namespaces (`bpf_get_netns_cookie`).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this namespace, then moves the thread back.
    /// `f` must not yield to other work on this thread (no `.await`, no blocking on tokio).
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = home_netns()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        // Failing to return would leave a tokio worker in a pod's namespace: every later socket
        // on this thread would be created in the wrong place. That is not recoverable.
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            panic!("cannot return to the agent's network namespace: {e}");
        }
        Ok(out)
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The agent's own namespace, opened once: `run` is on the per-connection path, so it should not
/// open a file each time. Every agent thread lives here except inside `run`.
fn home_netns() -> io::Result<&'static File> {
    static HOME: std::sync::OnceLock<File> = std::sync::OnceLock::new();
    if let Some(f) = HOME.get() {
        return Ok(f);
    }
    let f = File::open("/proc/self/ns/net")?;
    Ok(HOME.get_or_init(|| f))
}

/// `SO_NETNS_COOKIE` (Linux 5.14+), not yet in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The netns cookie of the calling thread's namespace (read through a throw-away socket).
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    socket_netns_cookie(&sock)
}

/// The netns cookie of the namespace a socket belongs to.
pub fn socket_netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed; the fd is open for the
    // duration of the call because `sock` is borrowed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_namespace_has_a_stable_cookie() {
        let a = current_netns_cookie().unwrap();
        let b = Netns::current().unwrap().cookie();
        assert_ne!(a, 0);
        assert_eq!(a, b);
    }
}
