//! Types shared by the eBPF programs (`ebpf/programs`) and the agent's `redirect` module:
//! map and program names, map keys and values, ring-buffer events, load-time globals and the
//! constants both sides must agree on. It owns layouts only: no logic beyond address
//! conversions, no maps, no I/O.
//!
//! Addresses are always 16 bytes, IPv4 in its v4-mapped IPv6 form (`::ffff:a.b.c.d`), held as
//! four `u32` words whose *memory* is in network byte order (the layout of `user_ip6`,
//! `local_ip6`, … in the kernel's context structs). One form for both families means one key
//! type, and a v4-mapped connect on a dual-stack socket matches a plain IPv4 one.
#![no_std]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// SO_MARK carried by every socket the agent opens inside a pod; the redirect programs let
/// these through untouched (same value as ztunnel's in-pod mark).
pub const AGENT_SOCKET_MARK: u32 = 0x539;
/// In-pod outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod inbound plaintext capture port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE (mTLS HTTP/2 CONNECT) port.
pub const HBONE_PORT: u16 = 15008;

/// Program names (the Rust function names in `ebpf/programs`), as the loader looks them up.
pub mod program {
    pub const CONNECT4: &str = "weft_connect4";
    pub const CONNECT6: &str = "weft_connect6";
    pub const SOCKOPS: &str = "weft_sockops";
    pub const SK_LOOKUP: &str = "weft_sk_lookup";
}

/// Map names. Pinned maps keep these names as file names under the pin directory, so a
/// layout change must come with a new name (a restarted agent re-adopts pins by name and
/// aya does not compare layouts).
pub mod map {
    /// `HashMap<u64 netns cookie, u32 flags>`: enrolled network namespaces. Pinned.
    pub const ENROLLED: &str = "WEFT_ENROLLED";
    /// `HashMap<IpKey, PodInfo>`: enrolled pod IPs, the inbound fail-closed set. Pinned.
    pub const POD_IPS: &str = "WEFT_POD_IPS";
    /// `SockHash<IpKey>`: pod IP → the pod's inbound plaintext listener (15006). Pinned.
    pub const INBOUND: &str = "WEFT_INBOUND";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: connect4/6 → sockops hand-off. Pinned.
    pub const ORIG_BY_SOCKET: &str = "WEFT_ORIG_SOCK";
    /// `LruHashMap<ConnKey, OrigDst>`: what the agent reads per accepted connection. Pinned.
    pub const ORIG_DST: &str = "WEFT_ORIG_DST";
    /// `RingBuf` of [`Event`](crate::Event). Not pinned: each load gets a fresh one.
    pub const EVENTS: &str = "WEFT_EVENTS";
}

/// Load-time global (`u32`, see [`events`]): which events the programs emit.
pub const GLOBAL_EVENT_FLAGS: &str = "WEFT_EVENT_FLAGS";

/// Bits of [`GLOBAL_EVENT_FLAGS`]. Drops are rare and always reported; per-connection events
/// cost a ring-buffer reservation each, so they are off unless asked for.
pub mod events {
    /// Emit an event for every outbound redirect and inbound steer.
    pub const PER_CONNECTION: u32 = 1;
}

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u32 = 6;
/// `AF_INET`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;

/// Second word of `::ffff:0:0/96` as the kernel stores it (network byte order in memory).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// A 16-byte address, IPv4 v4-mapped; see the module docs for the byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub addr: [u32; 4],
}

impl IpKey {
    /// From an IPv4 address as the kernel holds it (`user_ip4`, `local_ip4`: network order).
    #[inline(always)]
    pub const fn from_v4_be(ip4: u32) -> Self {
        IpKey { addr: [0, 0, V4_MAPPED_WORD, ip4] }
    }

    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == V4_MAPPED_WORD
    }

    /// Destinations that stay inside the namespace by themselves and are never captured:
    /// loopback (127/8, ::1) and the unspecified address (connecting to it means "this host").
    #[inline(always)]
    pub const fn is_local(&self) -> bool {
        let [a, b, c, d] = self.addr;
        if self.is_v4_mapped() {
            let first = d.to_ne_bytes()[0];
            return first == 127 || d == 0;
        }
        a == 0 && b == 0 && c == 0 && (d == 0 || d == u32::from_ne_bytes([0, 0, 0, 1]))
    }

    pub const fn octets(&self) -> [u8; 16] {
        let [a, b, c, d] = self.addr;
        let (a, b, c, d) = (a.to_ne_bytes(), b.to_ne_bytes(), c.to_ne_bytes(), d.to_ne_bytes());
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
    }

    pub const fn from_octets(o: [u8; 16]) -> Self {
        const fn w(o: &[u8; 16], i: usize) -> u32 {
            u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]])
        }
        IpKey { addr: [w(&o, 0), w(&o, 4), w(&o, 8), w(&o, 12)] }
    }

    pub fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::from_octets(v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => Self::from_octets(v6.octets()),
        }
    }

    /// The address, v4-mapped ones turned back into IPv4.
    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.octets());
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        Self::from_ip(ip)
    }
}

impl From<Ipv4Addr> for IpKey {
    fn from(ip: Ipv4Addr) -> Self {
        Self::from_ip(IpAddr::V4(ip))
    }
}

/// Key of the original-destination map: the redirected client socket as the agent's listener
/// sees it (its netns, and the peer address of the accepted connection).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub addr: IpKey,
    /// Host byte order.
    pub port: u16,
    /// Explicit so that no key byte is uninitialised (hash keys compare all bytes).
    pub _pad: [u8; 6],
}

impl ConnKey {
    pub fn new(netns_cookie: u64, peer: SocketAddr) -> Self {
        ConnKey { netns_cookie, addr: IpKey::from_ip(peer.ip()), port: peer.port(), _pad: [0; 6] }
    }
}

/// The destination the application asked for before the redirect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub addr: IpKey,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl OrigDst {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr.ip(), self.port)
    }
}

/// Value of the pod-IP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodInfo {
    pub netns_cookie: u64,
    /// Reserved (0).
    pub flags: u32,
    pub _pad: u32,
}

/// What an [`Event`] reports.
pub mod event_kind {
    /// Outbound connect rewritten to the in-pod 15001 listener (per-connection flag).
    pub const REDIRECTED: u32 = 1;
    /// Inbound SYN steered to the pod's 15006 listener (per-connection flag).
    pub const STEERED: u32 = 2;
    /// Inbound SYN to an enrolled pod IP dropped: no listener in the sockhash (agent down).
    pub const DROPPED_NO_LISTENER: u32 = 3;
    /// Inbound SYN dropped: the kernel refused to assign the listener (error in `detail`).
    pub const DROPPED_ASSIGN_FAILED: u32 = 4;
}

/// A structured ring-buffer event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// One of [`event_kind`].
    pub kind: u32,
    /// Kind-specific: the negative errno for `DROPPED_ASSIGN_FAILED`, else 0.
    pub detail: i32,
    /// The network namespace where it happened (0 for sk_lookup, which has no such helper).
    pub netns_cookie: u64,
    /// Original destination (outbound) or local address (inbound).
    pub addr: IpKey,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): `#[repr(C)]` structs made only of integers and arrays of integers,
    // with every padding byte an explicit field, so any bit pattern is valid and none is
    // uninitialised.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::IpKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ConnKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::OrigDst {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::PodInfo {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Event {}
}

// Layouts the programs and the agent both depend on; a change here must change map names.
const _: () = assert!(core::mem::size_of::<IpKey>() == 16);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 32);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 20);
const _: () = assert!(core::mem::size_of::<PodInfo>() == 16);
const _: () = assert!(core::mem::size_of::<Event>() == 40);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_keys_are_v4_mapped_and_round_trip() {
        let ip: IpAddr = "10.201.1.2".parse().unwrap();
        let k = IpKey::from_ip(ip);
        assert!(k.is_v4_mapped());
        assert_eq!(k, IpKey::from_v4_be(u32::from_ne_bytes([10, 201, 1, 2])));
        assert_eq!(k.ip(), ip);
        let v6: IpAddr = "fd00:201::2".parse().unwrap();
        assert_eq!(IpKey::from_ip(v6).ip(), v6);
        assert!(!IpKey::from_ip(v6).is_v4_mapped());
    }

    #[test]
    fn local_addresses_are_recognised() {
        for local in ["127.0.0.1", "127.3.2.1", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1"] {
            assert!(IpKey::from_ip(local.parse().unwrap()).is_local(), "{local}");
        }
        for remote in ["10.0.0.1", "128.0.0.1", "fd00::1", "::2", "::ffff:10.0.0.1"] {
            assert!(!IpKey::from_ip(remote.parse().unwrap()).is_local(), "{remote}");
        }
    }

    #[test]
    fn conn_key_normalises_v4_mapped_peers() {
        let a = ConnKey::new(7, "127.0.0.1:4000".parse().unwrap());
        let b = ConnKey::new(7, "[::ffff:127.0.0.1]:4000".parse().unwrap());
        assert_eq!(a, b);
    }
}
