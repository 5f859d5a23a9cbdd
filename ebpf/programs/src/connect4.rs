//! `cgroup/connect4`: rewrites outbound IPv4 TCP connects of enrolled network namespaces to
//! the in-pod capture listener `127.0.0.1:15001` and records the original destination under
//! the socket cookie (sockops moves it to the key the agent can look up).

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use weft_ebpf_common::{IPPROTO_TCP, IpKey, OUTBOUND_PORT, OrigDst, event_kind};

use crate::{
    connect6::{capture_exempt, record},
    event,
    maps::per_connection_events,
};

const LOCALHOST_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Always allows the connect (returns 1): the program rewrites, it never refuses.
#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx);
    1
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's context pointer for this program type; the verifier checks
    // every field access (4-byte loads and stores of these fields are allowed).
    let (protocol, ip4, port_be) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    if protocol != IPPROTO_TCP {
        return;
    }
    let dst = IpKey::from_v4_be(ip4);
    if dst.is_local() {
        return;
    }
    // SAFETY: helper valid for cgroup sock_addr programs (5.7+); `sa` is the context.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    if capture_exempt(ctx, netns) {
        return;
    }
    let port = u16::from_be(port_be as u16);
    // SAFETY: as above (bpf_get_socket_cookie_sock_addr).
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    record(ctx, cookie, OrigDst { addr: dst, port, _pad: 0 });
    // SAFETY: context stores checked by the verifier; user_port holds a be16 in a u32.
    unsafe {
        (*sa).user_ip4 = LOCALHOST_BE;
        (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    if per_connection_events() {
        debug!(ctx, "redirect netns={} to {:i}:{}", netns, core::net::Ipv4Addr::from(ip4.to_ne_bytes()), port);
        event::emit(event_kind::REDIRECTED, 0, netns, dst, port);
    }
}
