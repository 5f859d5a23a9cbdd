//! The few kernel calls aya 0.14 does not expose: opening a pinned object as an owned fd,
//! `BPF_LINK_UPDATE` (swap the program behind a live link, which is how a restarted or
//! upgraded agent re-adopts its pinned links without a second attachment), and making sure the
//! pin directory is on bpffs. Nothing here knows about weft's maps or programs.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

/// Where bpffs is conventionally mounted, and the only place this module mounts it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` prefix of `union bpf_attr` for `cmd`;
    // the kernel reads at most `size_of::<T>()` bytes of it and requires nothing else.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Opens a pinned program, map or link.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, ..Default::default() };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Points an existing link at `prog` (same program type and attach type). Fails with
/// `ENOLINK` when the link's target is gone (e.g. its network namespace was deleted).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr =
        LinkUpdateAttr { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, ..Default::default() };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches a link now. Dropping the last reference (unpinning) detaches too, but the kernel
/// frees links asynchronously, so traffic could still be captured for a moment after it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr { link_fd: link.as_raw_fd() as u32, ..Default::default() };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// Detaches the pinned link at `path` (if it is a live link) and removes the pin.
pub fn detach_and_unpin(path: &Path) -> io::Result<()> {
    match obj_get(path) {
        Ok(link) => {
            // Not every pinned object is a link (EINVAL) and a link whose target is gone is
            // already detached (ENOLINK): removing the pin is all that is left to do then.
            if let Err(e) = link_detach(link.as_fd())
                && !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOLINK))
            {
                return Err(e);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Opens the pinned link at `path` and swaps its program; see [`link_update`].
pub fn update_pinned_link(path: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    let link = obj_get(path)?;
    link_update(link.as_fd(), prog)
}

pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).map(|s| s.filesystem_type() == BPF_FS_MAGIC).unwrap_or(false)
}

/// Mounts bpffs at [`BPFFS_ROOT`] when `pin_dir` lives under it and it is not mounted yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), nix::Error> {
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        mount(Some("bpf"), root, Some("bpf"), MsFlags::empty(), None::<&str>)?;
        tracing::info!(path = BPFFS_ROOT, "mounted bpffs");
    }
    Ok(())
}
