//! Every map and load-time global of the programs. Pinned maps are what a restarted agent
//! re-adopts (by name, under its pin directory), so their layouts are frozen per name.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{HashMap, LruHashMap, RingBuf, SockHash},
};
use weft_ebpf_common::{ConnKey, IpKey, OrigDst, PodInfo};

/// Netns cookie → flags (reserved). Presence means "enrolled".
#[map(name = "WEFT_ENROLLED")]
pub static ENROLLED: HashMap<u64, u32> = HashMap::pinned(4096, 0);

/// Enrolled pod IPs: inbound to these is steered to 15006 or refused, never passed to the app.
#[map(name = "WEFT_POD_IPS")]
pub static POD_IPS: HashMap<IpKey, PodInfo> = HashMap::pinned(8192, 0);

/// Pod IP → that pod's inbound plaintext listener. Sockets leave it by themselves when closed,
/// which is what makes inbound fail closed when the agent dies.
#[map(name = "WEFT_INBOUND")]
pub static INBOUND: SockHash<IpKey> = SockHash::pinned(8192, 0);

/// Socket cookie → original destination, from connect4/6 until sockops knows the source port.
/// LRU so that connects that never reach sockops (they failed) age out by themselves.
#[map(name = "WEFT_ORIG_SOCK")]
pub static ORIG_BY_SOCKET: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

/// (netns cookie, client address) → original destination, read by the agent on accept.
#[map(name = "WEFT_ORIG_DST")]
pub static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(65536, 0);

/// Structured events for the agent (see `event`).
#[map(name = "WEFT_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// `weft_ebpf_common::events` bits, set by the loader.
#[unsafe(no_mangle)]
pub static WEFT_EVENT_FLAGS: Global<u32> = Global::new(0);

#[inline(always)]
pub fn per_connection_events() -> bool {
    WEFT_EVENT_FLAGS.load() & weft_ebpf_common::events::PER_CONNECTION != 0
}
