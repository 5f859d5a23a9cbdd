//! Emitting structured events into the `WEFT_EVENTS` ring buffer.

use weft_ebpf_common::{Event, IpKey};

use crate::maps::EVENTS;

/// Best effort: a full ring buffer loses the event, never the connection.
#[inline(always)]
pub fn emit(kind: u32, detail: i32, netns_cookie: u64, addr: IpKey, port: u16) {
    if let Some(mut slot) = EVENTS.reserve::<Event>(0) {
        slot.write(Event { kind, detail, netns_cookie, addr, port, _pad: [0; 6] });
        slot.submit(0);
    }
}
