//! `sockops` (cgroup root): when a captured socket starts its TCP handshake its source port is
//! known, so the original destination moves from the socket-cookie map to the key the agent's
//! 15001 listener can compute from an accepted connection: (netns cookie, peer address).
//! `TCP_CONNECT_CB` runs before the SYN leaves, so the entry exists before the agent can accept.

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::error;
use weft_ebpf_common::{AF_INET, ConnKey, IpKey};

use crate::maps::{ORIG_BY_SOCKET, ORIG_DST};

#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        on_connect(&ctx);
    }
    1
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: helper valid for sock_ops programs; `ops` is the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // Copy out before removing: the value must not be read after its slot is freed.
    // SAFETY: map lookup with a stack key; the value is copied immediately.
    let Some(orig) = (unsafe { ORIG_BY_SOCKET.get(&cookie) }).copied() else {
        return;
    };
    // SAFETY: helper valid for sock_ops programs since 5.15.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let addr = if ctx.family() == AF_INET {
        IpKey::from_v4_be(ctx.local_ip4())
    } else {
        // SAFETY: one 4-byte context load per word (the verifier rejects wider ones here).
        let words = unsafe {
            let p = core::ptr::addr_of!((*ctx.ops).local_ip6) as *const u32;
            [
                core::ptr::read_volatile(p),
                core::ptr::read_volatile(p.add(1)),
                core::ptr::read_volatile(p.add(2)),
                core::ptr::read_volatile(p.add(3)),
            ]
        };
        IpKey { addr: words }
    };
    // sock_ops' local_port is in host byte order (unlike remote_port).
    let key = ConnKey { netns_cookie: netns, addr, port: ctx.local_port() as u16, _pad: [0; 6] };
    if let Err(e) = ORIG_DST.insert(&key, &orig, 0) {
        error!(ctx, "cannot publish original destination (errno {}); the agent will refuse it", e);
    }
    let _ = ORIG_BY_SOCKET.remove(&cookie);
}
