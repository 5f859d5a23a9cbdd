//! Giving memory back to the kernel: the pages of weft's own binary that only startup needed, and
//! the heap's free pages after a burst of short-lived allocations.
//!
//! Starting the node agent runs code it will not run again: argument parsing, the YAML and CRD
//! decoders, the eBPF object loader and its BTF relocations, certificate setup. Every page of
//! code it touched stays mapped — and because the kernel maps file pages in 64 KiB windows around
//! each fault, a 20 MB binary ends up with ~13 MB of its text resident at idle, most of it code
//! that will never run again. Once the eBPF programs are loaded, and again once the agent has been
//! ready for [`SETTLE_AFTER_READY`], [`release_startup_pages`] asks the kernel to
//! reclaim those pages (`madvise(MADV_PAGEOUT)`): pages only weft maps leave its RSS and the page
//! cache, pages another process also maps (a waypoint started from the same file) are left alone,
//! and whatever weft runs afterwards faults back in on first use. (Under traffic and policy churn
//! ~12 MB of the binary comes back within a second in `bench discovery`; marking the mappings
//! `MADV_RANDOM` to stop read-ahead on those faults made no measurable difference, so it is not
//! done.)
//!
//! [`trim_heap`] hands the allocator's free pages back (glibc keeps freed memory in its arenas,
//! and a rebuilt snapshot of a large cluster frees tens of megabytes at once).
#![allow(unsafe_code)] // one madvise and one malloc_trim call, each with its SAFETY comment

use std::ops::Range;

/// How long after first becoming ready the node agent releases its startup pages: the enrolled
/// pods' first certificates are issued right after readiness, and that code should not fault
/// straight back in.
pub const SETTLE_AFTER_READY: std::time::Duration = std::time::Duration::from_secs(2);

/// One mapping of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    range: Range<usize>,
    writable: bool,
    /// `(device, inode)`: which file is mapped; `None` for anonymous memory.
    file: Option<(String, u64)>,
}

/// Parse one line of `/proc/<pid>/maps` (`start-end perms offset dev inode [path]`).
fn parse_mapping(line: &str) -> Option<Mapping> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let range = usize::from_str_radix(start, 16).ok()?..usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    let _offset = fields.next()?;
    let dev = fields.next()?;
    let inode: u64 = fields.next()?.parse().ok()?;
    Some(Mapping {
        range,
        writable: perms.as_bytes().get(1) == Some(&b'w'),
        file: (inode != 0).then(|| (dev.to_owned(), inode)),
    })
}

/// The read-only mappings of the file that holds `addr` (our own executable when `addr` is one of
/// our functions). Writable ones (`.data`, `.bss`) are left out: nothing to gain there.
fn read_only_mappings_of_file_at(maps: &str, addr: usize) -> Vec<Range<usize>> {
    let mappings: Vec<Mapping> = maps.lines().filter_map(parse_mapping).collect();
    let Some(file) = mappings.iter().find(|m| m.range.contains(&addr)).and_then(|m| m.file.clone()) else {
        return Vec::new();
    };
    mappings.into_iter().filter(|m| m.file.as_ref() == Some(&file) && !m.writable).map(|m| m.range).collect()
}

/// `RssFile` of this process in KiB (the binary's and libraries' resident pages).
fn rss_file_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("RssFile:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Ask the kernel to reclaim the resident pages of weft's own binary. Call once startup is done;
/// returns how many bytes of mappings were advised. Failures are logged, never fatal: the only
/// cost of not reclaiming is memory.
pub fn release_startup_pages() -> usize {
    let maps = match std::fs::read_to_string("/proc/self/maps") {
        Ok(m) => m,
        Err(error) => {
            tracing::debug!(%error, "cannot read /proc/self/maps; keeping startup pages");
            return 0;
        }
    };
    let before = rss_file_kib();
    let mut advised = 0;
    for range in read_only_mappings_of_file_at(&maps, release_startup_pages as *const () as usize) {
        let len = range.end - range.start;
        // SAFETY: the range is a whole mapping of our own executable, read-only, taken from
        // /proc/self/maps. MADV_PAGEOUT never changes the contents of a mapping: it only reclaims
        // pages, which fault back in from the file (or from swap, for the loader's relocated
        // pages) on the next access. No Rust reference is invalidated.
        let r = unsafe { libc::madvise(range.start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
        if r == 0 {
            advised += len;
        } else {
            // EINVAL on kernels before 5.4 (no MADV_PAGEOUT): nothing to do there.
            tracing::debug!(error = %std::io::Error::last_os_error(), "madvise(MADV_PAGEOUT) refused; keeping startup pages");
            return advised;
        }
    }
    tracing::info!(
        rss_file_kib_before = before,
        rss_file_kib_after = rss_file_kib(),
        "released the binary pages only startup used"
    );
    advised
}

/// Gives the heap's free pages back to the kernel (glibc's `malloc_trim`, which also releases
/// whole free pages inside its arenas, not only at their top). Call after dropping a large, short-
/// lived structure; it walks the allocator's free lists, so not on a hot path.
pub fn trim_heap() {
    // SAFETY: malloc_trim only walks glibc's own allocator state and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55cf68b51000-55cf6909d000 r--p 00000000 fe:00 5484361                    /work/target/release/weft
55cf6909d000-55cf6a433000 r-xp 0054b000 fe:00 5484361                    /work/target/release/weft
55cf6a433000-55cf6a4d3000 r--p 018e0000 fe:00 5484361                    /work/target/release/weft
55cf6a4d3000-55cf6a4d9000 rw-p 01980000 fe:00 5484361                    /work/target/release/weft
55cfa42fc000-55cfa456e000 rw-p 00000000 00:00 0                          [heap]
7f0676103000-7f0676259000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7ffc43d60000-7ffc43d81000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn picks_the_read_only_mappings_of_the_file_holding_the_address() {
        let ranges = read_only_mappings_of_file_at(MAPS, 0x55cf6909d000 + 0x1234);
        assert_eq!(
            ranges,
            vec![0x55cf68b51000..0x55cf6909d000, 0x55cf6909d000..0x55cf6a433000, 0x55cf6a433000..0x55cf6a4d3000]
        );
        // An address in libc selects libc's mapping only; one in anonymous memory selects nothing.
        assert_eq!(read_only_mappings_of_file_at(MAPS, 0x7f0676103000), vec![0x7f0676103000..0x7f0676259000]);
        assert!(read_only_mappings_of_file_at(MAPS, 0x55cfa42fc000).is_empty());
        assert!(read_only_mappings_of_file_at("garbage\n", 0x1000).is_empty());
    }

    #[test]
    fn releasing_the_pages_of_a_running_binary_keeps_it_running() {
        let advised = release_startup_pages();
        assert!(advised > 0, "no mapping of the test binary was advised");
        // Code and constants fault back in: the test binary goes on running and formatting.
        assert_eq!(format!("{:?}", Some(42)), "Some(42)");
        assert!(rss_file_kib().is_some());
    }
}
