//! The eBPF redirect, userspace half: loads the checked-in object (`ebpf/weft.bpf.o`, built by
//! `cargo xtask build-ebpf`), pins programs, maps and links under a pin directory so that the
//! redirect outlives the agent (fail closed) and a restarted agent re-adopts it, enrols pods
//! (netns cookie for outbound capture, pod IPs + inbound listener for `sk_lookup`), answers
//! "where was this accepted connection going?", and forwards eBPF logs and events to `tracing`.
//!
//! It does not create listeners, open sockets in pods, or decide policy: the proxy owns the
//! 15001/15006 listeners and passes them in; `app` decides what to enrol.
//!
//! Re-adoption: every `load` loads the object afresh; maps pinned by name are reused (so
//! enrolment survives), and existing pinned links are pointed at the new programs with
//! `BPF_LINK_UPDATE` instead of attaching a second time (which is also how an upgraded agent
//! swaps programs in place).
#![allow(unsafe_code)] // only in `sys` and `forward`, each use with a SAFETY comment

mod forward;
mod sys;

use std::fs::{self, File};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{HashMap, MapData, RingBuf, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::programs::{CgroupSockAddr, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use weft_ebpf_common::{ConnKey, IpKey, OrigDst, PodInfo, map, program};

pub use forward::Stats;
use forward::{Counters, Sources, TracingLog};

/// The eBPF object, aligned as the ELF parser requires.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/weft.bpf.o"));

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/weft";
/// Default cgroup (v2) the connect/sockops programs attach to: the root, so every pod is seen.
pub const DEFAULT_CGROUP: &str = "/sys/fs/cgroup/unified";

/// Pin-file prefixes inside the pin directory (maps use their bare names).
const PROG_PREFIX: &str = "prog_";
const LINK_PREFIX: &str = "link_";
const SK_LOOKUP_LINK_PREFIX: &str = "link_sk_lookup_";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "bpffs is not mounted at {} and mounting it failed: {source}; run `mount -t bpf bpf /sys/fs/bpf` as root",
        sys::BPFFS_ROOT
    )]
    MountBpffs { source: nix::Error },
    #[error("{} is not on a bpf filesystem; choose a pin directory on bpffs (default {DEFAULT_PIN_DIR})", path.display())]
    NotBpffs { path: PathBuf },
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("loading the eBPF object failed (needs root, CAP_BPF + CAP_NET_ADMIN, Linux >= 5.15): {0}")]
    Load(#[from] aya::EbpfError),
    #[error(
        "eBPF object has no program {0}: ebpf/weft.bpf.o and this agent are out of step; run `cargo xtask build-ebpf`"
    )]
    MissingProgram(&'static str),
    #[error("eBPF object has no map {0}: ebpf/weft.bpf.o and this agent are out of step; run `cargo xtask build-ebpf`")]
    MissingMap(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF link for {name}: {source}")]
    Link { name: &'static str, source: aya::programs::links::LinkError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("pinning {}: {source}; is another agent using this pin directory?", path.display())]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("eBPF logger: {0}")]
    Logger(#[from] aya_log::Error),
}

/// How and where the redirect is loaded.
#[derive(Debug, Clone)]
pub struct Options {
    /// bpffs directory holding pinned programs, maps and links.
    pub pin_dir: PathBuf,
    /// cgroup2 directory the connect and sockops programs attach to.
    pub cgroup: PathBuf,
    /// Emit an event and a debug log line for every redirected or steered connection.
    /// Costs a ring-buffer record per connection, so off by default; drops are always reported.
    pub per_connection_events: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { pin_dir: DEFAULT_PIN_DIR.into(), cgroup: DEFAULT_CGROUP.into(), per_connection_events: false }
    }
}

/// Maps and programs that change on enrol/unenrol; behind one lock (enrolment is rare).
struct Control {
    enrolled: HashMap<MapData, u64, u32>,
    pod_ips: HashMap<MapData, IpKey, PodInfo>,
    inbound: SockHash<MapData, IpKey>,
    /// Keeps the loaded programs (the sk_lookup one is attached per enrolled netns).
    ebpf: Ebpf,
}

/// The loaded redirect. `Send + Sync`; share it as `Arc<Redirect>`.
pub struct Redirect {
    pin_dir: PathBuf,
    control: Mutex<Control>,
    /// Read per accepted connection without the control lock (lookups take `&self`).
    orig_dst: HashMap<MapData, ConnKey, OrigDst>,
    sources: Mutex<Option<Sources>>,
    counters: Arc<Counters>,
}

// The proxy shares one `Redirect` across tokio tasks.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Redirect>();
};

impl Redirect {
    /// Loads or re-adopts pinned programs/maps/links and attaches the cgroup programs.
    /// Mounts bpffs if needed.
    pub fn load(opts: &Options) -> Result<Self, Error> {
        sys::ensure_bpffs(&opts.pin_dir).map_err(|source| Error::MountBpffs { source })?;
        fs::create_dir_all(&opts.pin_dir).map_err(|source| Error::Io {
            what: "creating pin directory",
            path: opts.pin_dir.clone(),
            source,
        })?;
        if !sys::is_bpffs(&opts.pin_dir) {
            return Err(Error::NotBpffs { path: opts.pin_dir.clone() });
        }
        let flags: u32 = if opts.per_connection_events { weft_ebpf_common::events::PER_CONNECTION } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&opts.pin_dir)
            .override_global(weft_ebpf_common::GLOBAL_EVENT_FLAGS, &flags, true)
            .load(OBJECT)?;
        let counters = Arc::new(Counters::default());
        let logger = EbpfLogger::init_with_logger(&mut ebpf, TracingLog { counters: counters.clone() })?;
        let events = RingBuf::try_from(take_map(&mut ebpf, map::EVENTS)?)
            .map_err(|source| Error::Map { name: map::EVENTS, source })?;

        let cgroup = File::open(&opts.cgroup).map_err(|source| Error::Io {
            what: "opening cgroup (point Options::cgroup at the cgroup2 mount)",
            path: opts.cgroup.clone(),
            source,
        })?;
        // Load, pin, and attach to the cgroup (or adopt the pinned link) — the same steps for the
        // connect hooks and sockops; aya's program types share the methods but no trait.
        macro_rules! attach_to_cgroup {
            ($ty:ty, $name:expr) => {{
                let name = $name;
                let prog: &mut $ty = program_mut(&mut ebpf, name)?;
                prog.load().map_err(|source| Error::Program { name, source })?;
                pin_program(&opts.pin_dir, name, |p| prog.pin(p))?;
                let prog_fd = owned_fd(prog.fd().map_err(|source| Error::Program { name, source })?)?;
                adopt_or_attach(&opts.pin_dir, name, prog_fd.as_fd(), || {
                    let id = prog
                        .attach(&cgroup, CgroupAttachMode::Single)
                        .map_err(|source| Error::Program { name, source })?;
                    let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
                    FdLink::try_from(link).map_err(|source| Error::Link { name, source })
                })?;
            }};
        }
        attach_to_cgroup!(CgroupSockAddr, program::CONNECT4);
        attach_to_cgroup!(CgroupSockAddr, program::CONNECT6);
        attach_to_cgroup!(SockOps, program::SOCKOPS);
        {
            let name = program::SK_LOOKUP;
            let prog: &mut SkLookup = program_mut(&mut ebpf, name)?;
            prog.load().map_err(|source| Error::Program { name, source })?;
            pin_program(&opts.pin_dir, name, |p| prog.pin(p))?;
            let prog_fd = prog.fd().map_err(|source| Error::Program { name, source })?.as_fd();
            readopt_sk_lookup_links(&opts.pin_dir, prog_fd)?;
        }

        let enrolled = HashMap::try_from(take_map(&mut ebpf, map::ENROLLED)?)
            .map_err(|source| Error::Map { name: map::ENROLLED, source })?;
        let pod_ips = HashMap::try_from(take_map(&mut ebpf, map::POD_IPS)?)
            .map_err(|source| Error::Map { name: map::POD_IPS, source })?;
        let inbound = SockHash::try_from(take_map(&mut ebpf, map::INBOUND)?)
            .map_err(|source| Error::Map { name: map::INBOUND, source })?;
        let orig_dst = HashMap::try_from(take_map(&mut ebpf, map::ORIG_DST)?)
            .map_err(|source| Error::Map { name: map::ORIG_DST, source })?;
        let redirect = Redirect {
            pin_dir: opts.pin_dir.clone(),
            control: Mutex::new(Control { enrolled, pod_ips, inbound, ebpf }),
            orig_dst,
            sources: Mutex::new(Some(Sources { logger, events })),
            counters,
        };
        // Loading parsed the kernel's BTF: megabytes of short-lived allocations glibc would keep.
        crate::reclaim::trim_heap();
        tracing::info!(pin_dir = %opts.pin_dir.display(), cgroup = %opts.cgroup.display(), enrolled = redirect.enrolled()?.len(), "eBPF redirect loaded");
        Ok(redirect)
    }

    /// Enrolls a pod: its netns cookie into the enrolled map, its IPs + inbound listener into
    /// the sk_lookup sockhash, sk_lookup attached (pinned link per netns). Idempotent; after an
    /// agent restart it replaces the (dead) socket with the new listener.
    pub fn enroll(
        &self,
        netns: &crate::netns::Netns,
        pod_ips: &[IpAddr],
        inbound_listener: BorrowedFd<'_>,
    ) -> Result<(), Error> {
        let cookie = netns.cookie();
        let mut c = self.lock();
        // Inbound first: a pod IP is only marked enrolled (fail closed) once its listener is in
        // place, and outbound capture starts last, when everything it depends on exists.
        for ip in pod_ips {
            let key = IpKey::from_ip(*ip);
            c.inbound.insert(key, inbound_listener, 0).map_err(|source| Error::Map { name: map::INBOUND, source })?;
            c.pod_ips
                .insert(key, PodInfo { netns_cookie: cookie, flags: 0, _pad: 0 }, 0)
                .map_err(|source| Error::Map { name: map::POD_IPS, source })?;
        }
        let link_path = self.sk_lookup_link_path(cookie);
        if !link_path.exists() {
            let name = program::SK_LOOKUP;
            let prog: &mut SkLookup = program_mut(&mut c.ebpf, name)?;
            let link = (|| {
                let id = prog.attach(netns.as_fd())?;
                Ok::<_, aya::programs::ProgramError>(FdLink::from(prog.take_link(id)?))
            })()
            .map_err(|source| Error::Program { name, source })?;
            link.pin(&link_path).map_err(|source| Error::Pin { path: link_path.clone(), source })?;
        }
        c.enrolled.insert(cookie, 0, 0).map_err(|source| Error::Map { name: map::ENROLLED, source })?;
        tracing::info!(netns_cookie = cookie, netns = %netns.path().display(), ?pod_ips, "pod enrolled in the redirect");
        Ok(())
    }

    /// Stops capturing a pod: outbound first, then inbound, then the sk_lookup link. Missing
    /// entries are fine (the pod may be half-enrolled or already gone).
    pub fn unenroll(&self, netns_cookie: u64, pod_ips: &[IpAddr]) -> Result<(), Error> {
        let mut c = self.lock();
        ignore_missing(c.enrolled.remove(&netns_cookie), map::ENROLLED)?;
        for ip in pod_ips {
            let key = IpKey::from_ip(*ip);
            ignore_missing(c.pod_ips.remove(&key), map::POD_IPS)?;
            ignore_missing(c.inbound.remove(&key), map::INBOUND)?;
        }
        let link_path = self.sk_lookup_link_path(netns_cookie);
        sys::detach_and_unpin(&link_path).map_err(|source| Error::Io {
            what: "detaching sk_lookup link",
            path: link_path,
            source,
        })?;
        tracing::info!(netns_cookie, ?pod_ips, "pod unenrolled from the redirect");
        Ok(())
    }

    /// Netns cookies currently enrolled (from the pinned map) — lets a restarted agent clean
    /// up stale pods.
    pub fn enrolled(&self) -> Result<Vec<u64>, Error> {
        let c = self.lock();
        c.enrolled.keys().collect::<Result<Vec<_>, _>>().map_err(|source| Error::Map { name: map::ENROLLED, source })
    }

    /// Original destination of a connection accepted on a pod's 15001 listener; `peer` is the
    /// accepted socket's peer address (v4-mapped IPv6 is normalised). One map lookup, no lock.
    pub fn original_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        self.orig_dst.get(&ConnKey::new(netns_cookie, peer), 0).ok().map(|o| o.socket_addr())
    }

    /// Forwards aya-log lines and ring-buffer events into `tracing` until `shutdown` resolves.
    /// Only the first call forwards; later ones log a warning and return at once.
    pub fn spawn_log_forwarding(
        self: &Arc<Self>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner()).take();
        let counters = self.counters.clone();
        tokio::spawn(async move {
            match sources {
                Some(sources) => forward::run(sources, counters, shutdown).await,
                None => tracing::warn!("eBPF log forwarding is already running; second request ignored"),
            }
        })
    }

    /// What the forwarding task has seen since load.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// Detaches everything and removes the pins (used for uninstall/tests, not on normal
    /// shutdown). Links are detached explicitly, so capture has stopped when this returns.
    pub fn remove_all(opts: &Options) -> Result<(), Error> {
        let dir = &opts.pin_dir;
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(Error::Io { what: "reading pin directory", path: dir.clone(), source }),
        };
        for entry in entries {
            let path =
                entry.map_err(|source| Error::Io { what: "reading pin directory", path: dir.clone(), source })?.path();
            let is_link = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(LINK_PREFIX));
            if is_link {
                sys::detach_and_unpin(&path).map_err(|source| Error::Io {
                    what: "detaching link",
                    path: path.clone(),
                    source,
                })?;
            } else {
                fs::remove_file(&path).map_err(|source| Error::Io {
                    what: "removing pin",
                    path: path.clone(),
                    source,
                })?;
            }
        }
        fs::remove_dir(dir).map_err(|source| Error::Io {
            what: "removing pin directory",
            path: dir.clone(),
            source,
        })?;
        tracing::info!(pin_dir = %dir.display(), "eBPF redirect removed");
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Control> {
        // A panic while holding the lock leaves the maps consistent (each op is one syscall).
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sk_lookup_link_path(&self, netns_cookie: u64) -> PathBuf {
        self.pin_dir.join(format!("{SK_LOOKUP_LINK_PREFIX}{netns_cookie}"))
    }
}

/// A second handle on a program fd, so the program can be attached while it is held.
fn owned_fd(fd: &impl AsFd) -> Result<OwnedFd, Error> {
    fd.as_fd().try_clone_to_owned().map_err(|source| Error::Io {
        what: "duplicating program fd",
        path: PathBuf::new(),
        source,
    })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::MissingMap(name))
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    prog.try_into().map_err(|source| Error::Program { name, source })
}

/// Replaces the program pin (bpftool shows the live program; old ones go with their links).
fn pin_program(
    dir: &Path,
    name: &'static str,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), Error> {
    let path = dir.join(format!("{PROG_PREFIX}{name}"));
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::Io { what: "replacing program pin", path, source }),
    }
    pin(&path).map_err(|source| Error::Pin { path, source })
}

/// Points the pinned link for `name` at `prog`, or attaches and pins a new link when there is
/// none (or the old one is unusable).
fn adopt_or_attach(
    dir: &Path,
    name: &'static str,
    prog: BorrowedFd<'_>,
    attach: impl FnOnce() -> Result<FdLink, Error>,
) -> Result<(), Error> {
    let path = dir.join(format!("{LINK_PREFIX}{name}"));
    if path.exists() {
        match sys::update_pinned_link(&path, prog) {
            Ok(()) => {
                tracing::debug!(program = name, link = %path.display(), "re-adopted pinned link");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(program = name, link = %path.display(), error = %e, "pinned link unusable; attaching a new one");
                fs::remove_file(&path).map_err(|source| Error::Io {
                    what: "removing stale link pin",
                    path: path.clone(),
                    source,
                })?;
            }
        }
    }
    let link = attach()?;
    link.pin(&path).map_err(|source| Error::Pin { path, source })?;
    Ok(())
}

/// Points every pinned per-netns sk_lookup link at the new program; drops links whose netns
/// is gone (the kernel answers ENOLINK).
fn readopt_sk_lookup_links(dir: &Path, prog: BorrowedFd<'_>) -> Result<(), Error> {
    let entries = fs::read_dir(dir).map_err(|source| Error::Io {
        what: "reading pin directory",
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(cookie) = file_name.to_str().and_then(|n| n.strip_prefix(SK_LOOKUP_LINK_PREFIX)) else { continue };
        let path = entry.path();
        if let Err(e) = sys::update_pinned_link(&path, prog) {
            tracing::warn!(netns_cookie = cookie, error = %e, "sk_lookup link of a vanished netns removed");
            fs::remove_file(&path).map_err(|source| Error::Io {
                what: "removing stale link pin",
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

fn ignore_missing(r: Result<(), aya::maps::MapError>, name: &'static str) -> Result<(), Error> {
    match r {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(Error::Map { name, source }),
    }
}

#[cfg(test)]
mod tests;
