//! `cgroup/connect6`: the IPv6 twin of `connect4`, rewriting to `[::1]:15001`. A dual-stack
//! socket connecting to a v4-mapped address only passes this hook (the kernel skips connect4
//! for it), so such connects are rewritten to `::ffff:127.0.0.1` and land on the IPv4 listener.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, error};
use weft_ebpf_common::{AGENT_SOCKET_MARK, IPPROTO_TCP, IpKey, OUTBOUND_PORT, OrigDst, event_kind};

use crate::{
    event,
    maps::{ENROLLED, ORIG_BY_SOCKET, per_connection_events},
};

const LOOPBACK6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
const LOCALHOST4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Always allows the connect (returns 1).
#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx);
    1
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: context field loads, checked by the verifier; user_ip6 is read one word at a
    // time because only 4-byte (or 8-byte aligned) context loads are allowed.
    let (protocol, dst, port_be) = unsafe {
        let p = core::ptr::addr_of!((*sa).user_ip6) as *const u32;
        let words = [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ];
        ((*sa).protocol, IpKey { addr: words }, (*sa).user_port)
    };
    if protocol != IPPROTO_TCP || dst.is_local() {
        return;
    }
    // SAFETY: helper valid for cgroup sock_addr programs; `sa` is the context.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    if capture_exempt(ctx, netns) {
        return;
    }
    let port = u16::from_be(port_be as u16);
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    record(ctx, cookie, OrigDst { addr: dst, port, _pad: 0 });
    let new = if dst.is_v4_mapped() { IpKey::from_v4_be(LOCALHOST4_BE) } else { IpKey { addr: [0, 0, 0, LOOPBACK6_LAST] } };
    // SAFETY: 4-byte context stores to user_ip6[i] and user_port, checked by the verifier.
    unsafe {
        let p = core::ptr::addr_of_mut!((*sa).user_ip6) as *mut u32;
        core::ptr::write_volatile(p, new.addr[0]);
        core::ptr::write_volatile(p.add(1), new.addr[1]);
        core::ptr::write_volatile(p.add(2), new.addr[2]);
        core::ptr::write_volatile(p.add(3), new.addr[3]);
        (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    if per_connection_events() {
        debug!(ctx, "redirect netns={} to [{:i}]:{}", netns, core::net::Ipv6Addr::from(dst.octets()), port);
        event::emit(event_kind::REDIRECTED, 0, netns, dst, port);
    }
}

/// True when this connect must not be captured: its namespace is not enrolled, or the socket
/// carries the agent's mark (the agent's own connections out of the pod).
#[inline(always)]
pub fn capture_exempt(ctx: &SockAddrContext, netns: u64) -> bool {
    // SAFETY: map lookup with a stack key; the value is not dereferenced.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return true;
    }
    // SAFETY: `sk` is the kernel-provided socket of this connect (never null for this hook,
    // the verifier types it PTR_TO_SOCKET); `mark` is a readable bpf_sock field.
    let mark = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        (*sk).mark
    };
    mark == AGENT_SOCKET_MARK
}

/// Records the original destination; redirects even when this fails (an unknown destination
/// is refused by the agent, which is fail closed; skipping the redirect would not be).
#[inline(always)]
pub fn record(ctx: &SockAddrContext, socket_cookie: u64, orig: OrigDst) {
    if let Err(e) = ORIG_BY_SOCKET.insert(&socket_cookie, &orig, 0) {
        error!(ctx, "cannot record original destination (errno {}); the agent will refuse it", e);
    }
}
