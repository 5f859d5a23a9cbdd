//! `sk_lookup` (one link per enrolled pod netns): inbound TCP to an enrolled pod IP, on any
//! port but HBONE's 15008, goes to the pod's inbound plaintext listener (15006) from the
//! `WEFT_INBOUND` sockhash; the accepted socket keeps the original local address. If the pod
//! IP is enrolled but its listener is gone (agent down), the SYN is dropped: the client gets
//! connection refused, never the app. Loopback, traffic from the pod to its own IPs (e.g. the
//! agent reaching the app on the pod IP; its source is one of the pod's IPs) and unknown IPs
//! pass untouched.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use aya_log_ebpf::warn;
use weft_ebpf_common::{AF_INET, HBONE_PORT, IPPROTO_TCP, IpKey, event_kind};

use crate::{
    event,
    maps::{INBOUND, POD_IPS, per_connection_events},
};

/// `ENOENT`: what a sockhash miss reports.
const ENOENT: i32 = 2;

/// The lookup's address as an [`IpKey`].
///
/// # Safety
/// `ip6` must point at a `[u32; 4]` field of the sk_lookup context.
#[inline(always)]
unsafe fn address(v4: bool, ip4: u32, ip6: *const u32) -> IpKey {
    if v4 {
        return IpKey::from_v4_be(ip4);
    }
    // SAFETY: the caller's contract.
    unsafe {
        IpKey {
            addr: [
                core::ptr::read_volatile(ip6),
                core::ptr::read_volatile(ip6.add(1)),
                core::ptr::read_volatile(ip6.add(2)),
                core::ptr::read_volatile(ip6.add(3)),
            ],
        }
    }
}

#[sk_lookup]
pub fn weft_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer(&ctx)
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: context field loads, checked by the verifier.
    let (protocol, family, port) = unsafe { ((*l).protocol, (*l).family, (*l).local_port) };
    if protocol != IPPROTO_TCP || port == u32::from(HBONE_PORT) {
        return SK_PASS;
    }
    let v4 = family == AF_INET;
    // SAFETY: context field loads, one 4-byte load per word as the verifier requires.
    let (local, remote) = unsafe {
        (
            address(v4, (*l).local_ip4, core::ptr::addr_of!((*l).local_ip6) as *const u32),
            address(v4, (*l).remote_ip4, core::ptr::addr_of!((*l).remote_ip6) as *const u32),
        )
    };
    if local.is_local() {
        return SK_PASS;
    }
    // SAFETY: map lookup with a stack key; the value is copied out at once.
    let Some(pod) = (unsafe { POD_IPS.get(&local) }).copied() else {
        return SK_PASS;
    };
    // SAFETY: as above.
    if let Some(src) = unsafe { POD_IPS.get(&remote) } {
        if src.netns_cookie == pod.netns_cookie {
            return SK_PASS;
        }
    }
    match INBOUND.redirect_sk_lookup(ctx, local, 0) {
        Ok(()) => {
            if per_connection_events() {
                event::emit(event_kind::STEERED, 0, 0, local, port as u16);
            }
            SK_PASS
        }
        Err(e) => {
            let kind = if e == -ENOENT { event_kind::DROPPED_NO_LISTENER } else { event_kind::DROPPED_ASSIGN_FAILED };
            warn!(ctx, "inbound to an enrolled pod on port {} refused: no usable listener (errno {})", port, e);
            event::emit(kind, e, 0, local, port as u16);
            SK_DROP
        }
    }
}
