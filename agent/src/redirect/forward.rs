//! Carries what the eBPF programs report into `tracing`: aya-log lines (through a `log::Log`
//! shim) and structured ring-buffer [`Event`]s, counting both so health checks and tests can
//! see them. It owns the reading task, not the programs or the maps.
#![allow(unsafe_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{MapData, RingBuf};
use aya_log::EbpfLogger;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use weft_ebpf_common::{Event, event_kind};

/// Where eBPF log lines and events appear in `tracing`.
pub const TARGET: &str = "weft::ebpf";

/// Counts since load of what reached userspace.
#[derive(Debug, Default)]
pub struct Counters {
    redirected: AtomicU64,
    steered: AtomicU64,
    dropped: AtomicU64,
    log_lines: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Outbound connects redirected (only with per-connection events on).
    pub redirected: u64,
    /// Inbound connections steered to 15006 (only with per-connection events on).
    pub steered: u64,
    /// Inbound connections refused because the pod's listener was gone (always reported).
    pub dropped: u64,
    /// aya-log lines forwarded.
    pub log_lines: u64,
}

impl Counters {
    pub fn snapshot(&self) -> Stats {
        Stats {
            redirected: self.redirected.load(Ordering::Relaxed),
            steered: self.steered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            log_lines: self.log_lines.load(Ordering::Relaxed),
        }
    }
}

/// `log::Log` shim for aya-log: one `tracing` event per eBPF log line, with the program's
/// module as a field (a `tracing` target must be static).
pub struct TracingLog {
    pub counters: Arc<Counters>,
}

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.counters.log_lines.fetch_add(1, Ordering::Relaxed);
        let program = record.target();
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, program, "{msg}"),
            log::Level::Warn => tracing::warn!(target: TARGET, program, "{msg}"),
            log::Level::Info => tracing::info!(target: TARGET, program, "{msg}"),
            log::Level::Debug => tracing::debug!(target: TARGET, program, "{msg}"),
            log::Level::Trace => tracing::trace!(target: TARGET, program, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// What one forwarding task reads.
pub struct Sources {
    pub logger: EbpfLogger<TracingLog>,
    pub events: RingBuf<MapData>,
}

fn record(counters: &Counters, bytes: &[u8]) {
    if bytes.len() < std::mem::size_of::<Event>() {
        tracing::warn!(target: TARGET, len = bytes.len(), "short eBPF event ignored (object and agent out of step?)");
        return;
    }
    // SAFETY: `Event` is plain old data (see weft-ebpf-common) and `bytes` holds at least
    // `size_of::<Event>()` bytes; `read_unaligned` does not require alignment.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let addr = ev.addr.ip();
    match ev.kind {
        event_kind::REDIRECTED => {
            counters.redirected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: TARGET, netns_cookie = ev.netns_cookie, orig_dst = %std::net::SocketAddr::new(addr, ev.port), "outbound connect redirected to 15001");
        }
        event_kind::STEERED => {
            counters.steered.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: TARGET, pod_ip = %addr, port = ev.port, "inbound connection steered to 15006");
        }
        event_kind::DROPPED_NO_LISTENER | event_kind::DROPPED_ASSIGN_FAILED => {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: TARGET, pod_ip = %addr, port = ev.port, errno = ev.detail,
                "inbound connection to an enrolled pod refused: its inbound listener is missing (agent restarting, or the pod was not re-enrolled)");
        }
        other => {
            tracing::warn!(target: TARGET, kind = other, "unknown eBPF event kind (object and agent out of step?)")
        }
    }
}

/// Reads both sources until `shutdown` resolves. Must run inside a tokio runtime.
pub async fn run(sources: Sources, counters: Arc<Counters>, shutdown: impl Future<Output = ()>) {
    // SAFETY (both registrations): the logger and the ring buffer own their map fds, which stay
    // open and unchanged until the `AsyncFd` (which owns them) is dropped.
    let logs = unsafe { AsyncFd::register_with_interest(sources.logger, Interest::READABLE) };
    let events = unsafe { AsyncFd::register_with_interest(sources.events, Interest::READABLE) };
    let (mut logs, mut events) = match (logs, events) {
        (Ok(l), Ok(e)) => (l, e),
        (Err(e), _) => return tracing::error!(error = %e, "cannot poll the eBPF log ring buffer; eBPF logs are lost"),
        (_, Err(e)) => {
            return tracing::error!(error = %e, "cannot poll the eBPF event ring buffer; eBPF events are lost");
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            guard = logs.readable_mut() => match guard {
                Ok(mut g) => {
                    g.get_inner_mut().flush();
                    g.clear_ready();
                }
                Err(e) => return tracing::error!(error = %e, "eBPF log ring buffer failed; eBPF logs are lost"),
            },
            guard = events.readable_mut() => match guard {
                Ok(mut g) => {
                    // Bounded per wake-up so logs and shutdown are not starved by an event
                    // storm; readiness is only cleared once the buffer is drained.
                    if drain(g.get_inner_mut(), &counters) {
                        g.clear_ready();
                    }
                }
                Err(e) => return tracing::error!(error = %e, "eBPF event ring buffer failed; eBPF events are lost"),
            },
        }
    }
    // Lines written just before shutdown still reach the log.
    logs.get_mut().flush();
    drain(events.get_mut(), &counters);
}

/// Reads up to a batch of events; true when the buffer is empty.
fn drain(rb: &mut RingBuf<MapData>, counters: &Counters) -> bool {
    for _ in 0..4096 {
        let Some(item) = rb.next() else { return true };
        record(counters, &item);
    }
    false
}
