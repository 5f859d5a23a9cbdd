//! Root-only tests of the real redirect: network namespaces made by the test (a "pod" and a
//! "peer" joined by a veth pair, 10.201.N.0/24 and fd00:201:N::/64), programs attached to the
//! cgroup2 root, pins under a per-test directory. They share the cgroup root, so they run one
//! at a time (static lock) and clean up through Drop guards even when an assertion fails.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::netns::Netns;

static SERIAL: Mutex<()> = Mutex::new(());

const STEP: Duration = Duration::from_millis(10);
const WAIT: Duration = Duration::from_secs(3);

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "redirect tests load eBPF programs and create network namespaces: run them as root \
         (cargo test -p weft redirect:: -- --test-threads=1)"
    );
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip(8)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Removes a pin directory on creation (leftovers of a crashed run) and on drop.
struct Pins(Options);

impl Pins {
    fn new(name: &str, per_connection_events: bool) -> Self {
        let opts = Options {
            pin_dir: format!("/sys/fs/bpf/weft-test-{name}").into(),
            per_connection_events,
            ..Options::default()
        };
        Redirect::remove_all(&opts).expect("remove leftover test pins");
        Pins(opts)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = Redirect::remove_all(&self.0) {
            eprintln!("cleanup of {} failed: {e}", self.0.pin_dir.display());
        }
    }
}

/// A pod netns and a peer netns joined by a veth pair; deleted on drop.
struct Net {
    names: [String; 2],
    pod: Netns,
    peer: Netns,
    n: u8,
}

impl Net {
    fn new(short: &str, n: u8) -> Self {
        let names = [format!("weft-t-{short}-pod"), format!("weft-t-{short}-peer")];
        for name in &names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
        for name in &names {
            ip(&["netns", "add", name]);
        }
        // Guard first, so a failure below still deletes the namespaces.
        let (vp, vq) = (format!("wt{short}p"), format!("wt{short}q"));
        let mut net = Net { names: names.clone(), pod: Netns::current().unwrap(), peer: Netns::current().unwrap(), n };
        let [p, q] = &names;
        ip(&["-n", p, "link", "add", &vp, "type", "veth", "peer", "name", &vq, "netns", q]);
        for (ns, dev, host) in [(p, &vp, 1), (q, &vq, 2)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", &format!("10.201.{n}.{host}/24"), "dev", dev]);
            ip(&["-n", ns, "-6", "addr", "add", &format!("fd00:201:{n}::{host}/64"), "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        net.pod = Netns::open(p).unwrap();
        net.peer = Netns::open(q).unwrap();
        net
    }

    fn pod_v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 201, self.n, 1))
    }
    fn peer_v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 201, self.n, 2))
    }
    fn pod_v6(&self) -> IpAddr {
        format!("fd00:201:{}::1", self.n).parse().unwrap()
    }
    fn peer_v6(&self) -> IpAddr {
        format!("fd00:201:{}::2", self.n).parse().unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

fn listen(ns: &Netns, addr: SocketAddr) -> TcpListener {
    let l = ns.run(|| TcpListener::bind(addr)).unwrap().unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    l.set_nonblocking(true).unwrap();
    l
}

fn connect(ns: &Netns, to: SocketAddr) -> io::Result<TcpStream> {
    ns.run(|| TcpStream::connect_timeout(&to, WAIT)).unwrap()
}

/// A connect from a socket carrying `mark` (SO_MARK), as the agent's own sockets do.
fn connect_marked(ns: &Netns, to: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, setsockopt, socket, sockopt};
    ns.run(|| {
        let family = if to.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let fd: OwnedFd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        setsockopt(&fd, sockopt::Mark, &mark)?;
        nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(to))?;
        Ok::<_, nix::Error>(TcpStream::from(fd))
    })
    .unwrap()
    .map_err(io::Error::from)
}

/// Accepts one connection within [`WAIT`]; `None` when nothing arrived.
fn accept_within(l: &TcpListener, wait: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + wait;
    loop {
        match l.accept() {
            Ok(c) => return Some(c),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => std::thread::sleep(STEP),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Accepts and proves the connection is live end to end with one byte each way.
fn accept_echo(l: &TcpListener, client: &mut TcpStream) -> (TcpStream, SocketAddr) {
    let (mut server, peer) = accept_within(l, WAIT).expect("connection did not arrive on the expected listener");
    server.set_nonblocking(false).unwrap();
    client.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    server.set_read_timeout(Some(WAIT)).unwrap();
    server.read_exact(&mut b).unwrap();
    server.write_all(b"y").unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"y");
    (server, peer)
}

fn assert_nothing_on(l: &TcpListener, what: &str) {
    assert!(accept_within(l, Duration::from_millis(50)).is_none(), "{what} unexpectedly received a connection");
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        a => a,
    }
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(STEP);
    }
}

#[test]
fn outbound_connects_are_captured_with_their_original_destination() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = Pins::new("out", true);
    let net = Net::new("out", 1);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let r = Arc::new(Redirect::load(&pins.0).expect("load"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let forwarding = {
        let _rt = rt.enter();
        r.spawn_log_forwarding(async move {
            let _ = stopped.await;
        })
    };

    // Capture listeners in the pod; the real servers in the peer.
    let cap4 = listen(&net.pod, "127.0.0.1:15001".parse().unwrap());
    let cap6 = listen(&net.pod, "[::1]:15001".parse().unwrap());
    let inbound = listen(&net.pod, "[::]:15006".parse().unwrap());
    let server = listen(&net.peer, "[::]:8080".parse().unwrap());
    let pod_app = listen(&net.pod, "[::]:9000".parse().unwrap());
    let peer_trap = listen(&net.peer, "127.0.0.1:15001".parse().unwrap());
    // Outbound only: no pod IPs, so inbound is untouched in this test.
    r.enroll(&net.pod, &[], inbound.as_fd()).expect("enroll");
    assert_eq!(r.enrolled().unwrap(), vec![net.pod.cookie()]);
    let cookie = net.pod.cookie();

    // (1) IPv4 to the peer lands on 127.0.0.1:15001 in the pod, original destination known.
    let dst4 = sa(net.peer_v4(), 8080);
    let mut c = connect(&net.pod, dst4).expect("connect v4");
    let (_s, peer) = accept_echo(&cap4, &mut c);
    assert_eq!(peer, c.local_addr().unwrap());
    assert_eq!(r.original_dst(cookie, peer), Some(dst4));
    assert_eq!(r.original_dst(cookie, sa(peer.ip(), peer.port().wrapping_add(1))), None);
    assert_eq!(r.original_dst(cookie + 1, peer), None);
    assert_nothing_on(&server, "the real v4 server");
    // Per-connection cost on the proxy's accept path: one map lookup, no lock.
    let started = Instant::now();
    for _ in 0..10_000 {
        assert_eq!(r.original_dst(cookie, peer), Some(dst4));
    }
    let per_lookup = started.elapsed() / 10_000;
    assert!(per_lookup < Duration::from_micros(50), "original_dst takes {per_lookup:?}");
    tracing::info!(?per_lookup, "original_dst cost");

    // (1) IPv6 to a ULA lands on [::1]:15001.
    let dst6 = sa(net.peer_v6(), 8080);
    let mut c6 = connect(&net.pod, dst6).expect("connect v6");
    let (_s6, peer6) = accept_echo(&cap6, &mut c6);
    assert_eq!(r.original_dst(cookie, peer6), Some(dst6));
    assert_nothing_on(&server, "the real v6 server");

    // A dual-stack socket connecting to a v4-mapped address is captured too (connect6 only).
    let mapped = sa(IpAddr::V6(Ipv4Addr::new(10, 201, 1, 2).to_ipv6_mapped()), 8080);
    let mut cm = connect(&net.pod, mapped).expect("connect v4-mapped");
    let (_sm, peerm) = accept_echo(&cap4, &mut cm);
    assert_eq!(r.original_dst(cookie, peerm), Some(dst4));
    // The agent may hand in the peer as seen by a dual-stack listener (v4-mapped).
    assert_eq!(r.original_dst(cookie, sa(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), peerm.port())), Some(dst4));

    // Loopback destinations inside the pod are not captured.
    let mut cl = connect(&net.pod, "127.0.0.1:9000".parse().unwrap()).expect("connect loopback");
    accept_echo(&pod_app, &mut cl);

    // (2) The agent's mark exempts a socket: it reaches the real server.
    let mut cmk = connect_marked(&net.pod, dst4, weft_ebpf_common::AGENT_SOCKET_MARK).expect("marked connect");
    accept_echo(&server, &mut cmk);
    assert_nothing_on(&cap4, "the capture listener (marked socket)");
    // Any other mark is captured as usual.
    let mut cother = connect_marked(&net.pod, dst4, 0x538).expect("other-mark connect");
    accept_echo(&cap4, &mut cother);

    // (3) The peer netns is not enrolled: its connect to the pod reaches the pod's app.
    let mut cq = connect(&net.peer, sa(net.pod_v4(), 9000)).expect("peer connect");
    accept_echo(&pod_app, &mut cq);
    assert_nothing_on(&peer_trap, "the peer's own 15001");

    // (7) Events and aya-log lines reach userspace.
    wait_for("redirect events and log lines", || {
        let s = r.stats();
        s.redirected >= 4 && s.log_lines >= 4
    });

    r.unenroll(cookie, &[]).expect("unenroll");
    assert!(r.enrolled().unwrap().is_empty());
    let mut after = connect(&net.pod, dst4).expect("connect after unenroll");
    accept_echo(&server, &mut after);

    let _ = stop.send(());
    rt.block_on(forwarding).expect("forwarding task");
}

#[test]
fn inbound_is_steered_to_15006_and_fails_closed() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = Pins::new("in", false);
    let net = Net::new("in", 2);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let r = Arc::new(Redirect::load(&pins.0).expect("load"));
    let forwarding = {
        let _rt = rt.enter();
        r.spawn_log_forwarding(std::future::pending())
    };

    let inbound = listen(&net.pod, "[::]:15006".parse().unwrap());
    let app = listen(&net.pod, "[::]:9000".parse().unwrap());
    let hbone = listen(&net.pod, "[::]:15008".parse().unwrap());
    let pod_ips = [net.pod_v4(), net.pod_v6()];
    r.enroll(&net.pod, &pod_ips, inbound.as_fd()).expect("enroll");
    // Idempotent.
    r.enroll(&net.pod, &pod_ips, inbound.as_fd()).expect("enroll again");

    // (4) Plaintext to podIP:9000 lands on 15006 with the original local address, v4 and v6.
    for pod_ip in pod_ips {
        let mut c = connect(&net.peer, sa(pod_ip, 9000)).expect("connect to pod");
        let (s, _) = accept_echo(&inbound, &mut c);
        assert_eq!(unmap(s.local_addr().unwrap()), sa(pod_ip, 9000));
        assert_nothing_on(&app, "the app (steered)");
    }
    // HBONE is not steered.
    let mut ch = connect(&net.peer, sa(net.pod_v4(), 15008)).expect("connect to 15008");
    accept_echo(&hbone, &mut ch);
    assert_nothing_on(&inbound, "15006 (HBONE port)");
    // The agent reaching the app from inside the pod: loopback and the pod's own IP pass.
    for to in [sa("127.0.0.1".parse().unwrap(), 9000), sa(net.pod_v4(), 9000)] {
        let mut c = connect_marked(&net.pod, to, weft_ebpf_common::AGENT_SOCKET_MARK).expect("in-pod connect");
        accept_echo(&app, &mut c);
    }
    // Other IPs of the pod netns (not enrolled) pass: steering is per pod IP.
    ip(&["-n", &net.names[0], "addr", "add", &format!("10.201.{}.3/24", net.n), "dev", &format!("wt{}p", "in")]);
    let mut co = connect(&net.peer, sa(IpAddr::V4(Ipv4Addr::new(10, 201, net.n, 3)), 9000)).expect("connect other ip");
    accept_echo(&app, &mut co);

    // (5) Listener gone (agent dead): refused, and the app never sees it.
    drop(inbound);
    for pod_ip in pod_ips {
        let err = connect(&net.peer, sa(pod_ip, 9000)).expect_err("must be refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{pod_ip}: {err}");
    }
    assert_nothing_on(&app, "the app (fail closed)");
    wait_for("drop events", || r.stats().dropped >= 2);

    // A new listener (restarted agent) replaces the dead one.
    let inbound2 = listen(&net.pod, "[::]:15006".parse().unwrap());
    r.enroll(&net.pod, &pod_ips, inbound2.as_fd()).expect("re-enroll");
    let mut c = connect(&net.peer, sa(net.pod_v4(), 9000)).expect("connect after re-enroll");
    accept_echo(&inbound2, &mut c);

    // Unenrolled: plaintext reaches the app again.
    r.unenroll(net.pod.cookie(), &pod_ips).expect("unenroll");
    let mut c = connect(&net.peer, sa(net.pod_v4(), 9000)).expect("connect after unenroll");
    accept_echo(&app, &mut c);
    assert!(!pins.0.pin_dir.join(format!("{SK_LOOKUP_LINK_PREFIX}{}", net.pod.cookie())).exists());

    forwarding.abort();
}

/// Links attached to the program currently pinned under `name`.
fn links_of(pin_dir: &Path, name: &str) -> (u32, usize) {
    let prog =
        aya::programs::ProgramInfo::from_pin(pin_dir.join(format!("{PROG_PREFIX}{name}"))).expect("pinned program");
    let id = prog.id();
    let links = aya::programs::loaded_links().filter_map(Result::ok).filter(|l| l.program_id() == id).count();
    (id, links)
}

#[test]
fn pinned_state_survives_the_agent_and_is_readopted() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = Pins::new("pin", false);
    let net = Net::new("pin", 3);
    let server = listen(&net.peer, "[::]:8080".parse().unwrap());
    let app = listen(&net.pod, "[::]:9000".parse().unwrap());
    let dst = sa(net.peer_v4(), 8080);
    let pod_ips = [net.pod_v4()];

    let (old_connect4, old_sk_lookup) = {
        let r = Redirect::load(&pins.0).expect("first load");
        let inbound = listen(&net.pod, "[::]:15006".parse().unwrap());
        r.enroll(&net.pod, &pod_ips, inbound.as_fd()).expect("enroll");
        (links_of(&pins.0.pin_dir, program::CONNECT4), links_of(&pins.0.pin_dir, program::SK_LOOKUP))
        // Agent "dies": the Redirect and its listeners are dropped.
    };
    assert_eq!(old_connect4.1, 1);
    assert_eq!(old_sk_lookup.1, 1);

    // Fail closed while no agent runs: outbound is still captured (nothing listens on 15001),
    // inbound is refused.
    let err = connect(&net.pod, dst).expect_err("outbound must be refused while the agent is down");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    let err = connect(&net.peer, sa(net.pod_v4(), 9000)).expect_err("inbound must be refused while the agent is down");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    assert_nothing_on(&server, "the real server (agent down)");
    assert_nothing_on(&app, "the app (agent down)");

    // (6) A new agent re-adopts: enrolment is still there, links are re-pointed, not doubled.
    let r = Redirect::load(&pins.0).expect("second load");
    assert_eq!(r.enrolled().unwrap(), vec![net.pod.cookie()]);
    let new_connect4 = links_of(&pins.0.pin_dir, program::CONNECT4);
    let new_sk_lookup = links_of(&pins.0.pin_dir, program::SK_LOOKUP);
    assert_ne!(new_connect4.0, old_connect4.0, "a fresh program is loaded");
    assert_eq!(new_connect4.1, 1, "the pinned connect4 link now runs the new program");
    assert_eq!(new_sk_lookup.1, 1, "the pinned sk_lookup link now runs the new program");
    let stale =
        aya::programs::loaded_links().filter_map(Result::ok).filter(|l| l.program_id() == old_connect4.0).count();
    assert_eq!(stale, 0, "no link still runs the old program");

    let cap4 = listen(&net.pod, "127.0.0.1:15001".parse().unwrap());
    let mut c = connect(&net.pod, dst).expect("connect after restart");
    let (_s, peer) = accept_echo(&cap4, &mut c);
    assert_eq!(r.original_dst(net.pod.cookie(), peer), Some(dst));

    let inbound = listen(&net.pod, "[::]:15006".parse().unwrap());
    r.enroll(&net.pod, &pod_ips, inbound.as_fd()).expect("re-enroll after restart");
    assert_eq!(links_of(&pins.0.pin_dir, program::SK_LOOKUP).1, 1, "re-enrolment does not attach twice");
    let mut c = connect(&net.peer, sa(net.pod_v4(), 9000)).expect("inbound after restart");
    accept_echo(&inbound, &mut c);

    // remove_all detaches everything: traffic flows untouched.
    drop(r);
    Redirect::remove_all(&pins.0).expect("remove_all");
    assert!(!pins.0.pin_dir.exists());
    let mut c = connect(&net.pod, dst).expect("connect after remove_all");
    accept_echo(&server, &mut c);
    let mut c = connect(&net.peer, sa(net.pod_v4(), 9000)).expect("inbound after remove_all");
    accept_echo(&app, &mut c);
}
