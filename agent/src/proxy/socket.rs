//! Sockets the proxy owns inside pods: listeners bound in a pod's network namespace and
//! outbound sockets created there, marked so the redirect programs leave them alone.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use weft_ebpf_common::AGENT_SOCKET_MARK;

use crate::netns::Netns;

/// Listen backlog for in-pod listeners: a burst of new connections must not overflow it.
const BACKLOG: i32 = 4096;

/// A listening socket bound to `addr` inside `netns`. `dual_stack` makes an `[::]` listener
/// accept IPv4 too (v4-mapped peers), as the inbound listeners need.
pub fn listen_in(netns: &Netns, addr: SocketAddr, dual_stack: bool) -> io::Result<tokio::net::TcpListener> {
    let sock = netns.run(|| -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            s.set_only_v6(!dual_stack)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        Ok(s)
    })??;
    tokio::net::TcpListener::from_std(sock.into())
}

/// An unconnected TCP socket that belongs to `netns` and carries the agent's mark, so its
/// connect is neither redirected back to the agent nor steered by sk_lookup.
pub fn socket_in(netns: &Netns, dest: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let sock = netns.run(|| -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(dest), Type::STREAM, Some(Protocol::TCP))?;
        s.set_mark(AGENT_SOCKET_MARK)?;
        s.set_nonblocking(true)?;
        s.set_tcp_nodelay(true)?;
        Ok(s)
    })??;
    Ok(tokio::net::TcpSocket::from_std_stream(sock.into()))
}

/// Connects from inside `netns` with the agent's mark.
pub async fn connect_in(netns: &Netns, dest: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    socket_in(netns, dest)?.connect(dest).await
}

/// `SO_ORIGINAL_DST` of a connection that iptables REDIRECTed (the classic capture path).
pub fn original_dst_from_conntrack(stream: &tokio::net::TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = if peer.is_ipv4() { sock.original_dst_v4()? } else { sock.original_dst_v6()? };
    addr.as_socket().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "SO_ORIGINAL_DST is not an IP address"))
}

/// Closes with RST instead of FIN: a refused connection should look refused to the client.
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// v4-mapped IPv6 addresses (from dual-stack listeners) back to IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
