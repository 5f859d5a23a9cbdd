//! Traffic for the suites, the demo and the bench: the servers and clients behind the
//! `weft-probe` binary. Plain blocking std sockets, one thread per connection, every loop bounded
//! by a count and a time limit. Results are printed as `key=value` lines ([`parse_kv`]).
//!
//! Owns the wire formats of the probe (the deterministic byte stream, the sink's reply line); it
//! knows nothing about namespaces (the harness runs it inside pods with `ip netns exec`).

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use socket2::{Domain, SockRef, Socket, Type};

/// First words of the line a server prints once it listens (the harness waits for it).
pub const LISTENING: &str = "listening on";
/// Default lifetime of a server process: it exits by itself after this.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// Idle limit on any single read or write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD: usize = 64 * 1024;
const CHUNK: usize = 64 * 1024;

/// Deterministic pseudo-random bytes: the AES-128-GCM keystream under a fixed key, one 64 KiB
/// chunk per nonce. Both ends (and the test) can regenerate any stream from its length alone,
/// and ring's assembly keeps it at GB/s even in a debug build.
pub struct Pattern {
    key: LessSafeKey,
    chunk: Vec<u8>,
    next_nonce: u64,
    pos: usize,
}

impl Default for Pattern {
    fn default() -> Self {
        Self::new()
    }
}

impl Pattern {
    pub fn new() -> Self {
        let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, b"weft-probe-bytes").expect("16-byte AES key"));
        Pattern { key, chunk: vec![0; CHUNK], next_nonce: 0, pos: CHUNK }
    }

    /// Fills `out` with the next bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            if self.pos == CHUNK {
                self.chunk.fill(0);
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&self.next_nonce.to_be_bytes());
                self.next_nonce += 1;
                // Sealing zeros yields the keystream; the tag is not part of the stream.
                let _tag = self
                    .key
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::empty(), &mut self.chunk)
                    .expect("AES-GCM seal of 64 KiB");
                self.pos = 0;
            }
            let take = (CHUNK - self.pos).min(out.len() - done);
            out[done..done + take].copy_from_slice(&self.chunk[self.pos..self.pos + take]);
            self.pos += take;
            done += take;
        }
    }
}

/// SHA-256 (hex) of the first `n` bytes of [`Pattern`].
pub fn expected_sha256(n: u64) -> String {
    let mut p = Pattern::new();
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut left = n;
    while left > 0 {
        let take = left.min(CHUNK as u64) as usize;
        p.fill(&mut buf[..take]);
        h.update(&buf[..take]);
        left -= take as u64;
    }
    hex::encode(h.finish())
}

/// Parses `key=value` pairs from whitespace-separated output.
pub fn parse_kv(out: &str) -> BTreeMap<String, String> {
    out.split_whitespace().filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

// ---------------------------------------------------------------------------------------------
// Servers

/// Which server to run.
#[derive(Debug, Clone)]
pub enum Server {
    /// Answers every HTTP/1.1 request with `hello from <name> peer=<addr>` (and the headers
    /// `x-served-by: <name>`, `x-served-at: <local address dialled>`), misbehaving as `faults` says.
    Http { name: String, faults: HttpFaults },
    /// Echoes bytes until EOF.
    Echo,
    /// Reads to EOF, replies `bytes=N sha256=<hex>`.
    Sink,
    /// Sends `bytes` bytes of [`Pattern`], then closes; prints their hash.
    Source { bytes: u64 },
    /// Connects to `to` and copies bytes both ways (half-close passed on), in user space with
    /// `RELAY_CHUNK` buffers: a tunnel without TLS or HTTP/2, the baseline the bench compares the
    /// mesh's copy path against.
    Relay { to: SocketAddr },
}

/// Read size of the relay: weft's own largest tunnel read.
const RELAY_CHUNK: usize = 256 * 1024;

/// Ways an HTTP server misbehaves on purpose, for retries, timeouts and outlier detection.
#[derive(Debug, Clone, Default)]
pub struct HttpFaults {
    /// Answer every Nth request (counted across connections, from 1) with `fail_status`; 0: never.
    pub fail_every: u64,
    /// Status of the failed answers (503 unless set).
    pub fail_status: u16,
    /// Wait this long before every answer.
    pub delay: Duration,
    /// No line per request on stdout (benchmarks: the log would be the bottleneck).
    pub quiet: bool,
}

static HTTP_REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Binds `[::]:port` (dual stack) and serves `kind` until `lifetime` passes or `max_conns`
/// connections were accepted.
pub fn serve(kind: Server, port: u16, lifetime: Duration, max_conns: u64) -> Result<()> {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    sock.bind(&addr.into()).with_context(|| format!("bind {addr}"))?;
    sock.listen(1024)?;
    let listener: TcpListener = sock.into();
    std::thread::spawn(move || {
        std::thread::sleep(lifetime);
        eprintln!("lifetime of {lifetime:?} reached, exiting");
        std::process::exit(0);
    });
    println!("{LISTENING} {addr} ({kind:?})");
    for (n, conn) in listener.incoming().enumerate() {
        if n as u64 >= max_conns {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let kind = kind.clone();
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()).to_string())
                .unwrap_or_default();
            if let Err(e) = handle(kind, stream, &peer) {
                eprintln!("connection from {peer}: {e:#}");
            }
        });
    }
    Ok(())
}

fn handle(kind: Server, mut s: TcpStream, peer: &str) -> Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    match kind {
        Server::Http { name, faults } => http_conn(&mut s, &name, &faults, peer),
        Server::Echo => {
            let mut r = s.try_clone()?;
            io::copy(&mut r, &mut s)?;
            Ok(())
        }
        Server::Sink => {
            let (n, sha) = hash_to_eof(&mut s)?;
            writeln!(s, "bytes={n} sha256={sha}")?;
            println!("sink peer={peer} bytes={n} sha256={sha}");
            Ok(())
        }
        Server::Source { bytes } => {
            let sha = write_pattern(&mut s, bytes)?;
            s.shutdown(Shutdown::Write)?;
            println!("source peer={peer} bytes={bytes} sha256={sha}");
            Ok(())
        }
        Server::Relay { to } => {
            let up = connect(to)?;
            // A bulk transfer may idle longer than IO_TIMEOUT in one direction (iperf's control
            // connection does): the relay waits as long as its peers do.
            for side in [&s, &up] {
                side.set_read_timeout(None)?;
            }
            let (s2, up2) = (s.try_clone()?, up.try_clone()?);
            let back = std::thread::spawn(move || relay_half(up2, s2));
            relay_half(s, up)?;
            back.join().map_err(|_| anyhow::anyhow!("relay thread panicked"))?
        }
    }
}

/// Copies `from` to `to` until EOF, then shuts down `to`'s write side. An error (a reset) shuts
/// both sockets down, so the other direction's blocked read ends too.
fn relay_half(mut from: TcpStream, mut to: TcpStream) -> Result<()> {
    let mut buf = vec![0u8; RELAY_CHUNK];
    let copied = (|| -> io::Result<()> {
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                return to.shutdown(Shutdown::Write);
            }
            to.write_all(&buf[..n])?;
        }
    })();
    if copied.is_err() {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
    Ok(copied?)
}

/// Serves HTTP/1.1 requests on one connection (keep-alive honoured), at most 10 000 of them.
fn http_conn(s: &mut TcpStream, name: &str, faults: &HttpFaults, peer: &str) -> Result<()> {
    // The address the client dialled: one server on [::] tells its loopback aliases apart.
    let local = s.local_addr().map(|a| a.ip().to_canonical().to_string()).unwrap_or_default();
    let mut r = BufReader::new(s.try_clone()?);
    for _ in 0..10_000 {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Ok(()); // peer closed between requests
            }
            head.push_str(&line);
            if line == "\r\n" || line == "\n" {
                break;
            }
            if head.len() > MAX_HEAD {
                bail!("request head over {MAX_HEAD} bytes");
            }
        }
        let lower = head.to_ascii_lowercase();
        let len: u64 = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse())
            .transpose()
            .context("bad content-length")?
            .unwrap_or(0);
        io::copy(&mut (&mut r).take(len), &mut io::sink())?;
        let http10 = head.lines().next().is_some_and(|l| l.trim_end().ends_with("HTTP/1.0"));
        let close = lower.contains("connection: close") || (http10 && !lower.contains("connection: keep-alive"));
        let n = HTTP_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if !faults.delay.is_zero() {
            std::thread::sleep(faults.delay);
        }
        let failed = faults.fail_every > 0 && n.is_multiple_of(faults.fail_every);
        let (status, body) = if failed {
            let code = if faults.fail_status == 0 { 503 } else { faults.fail_status };
            (format!("{code} Injected"), format!("failure {n} from {name}\n"))
        } else {
            ("200 OK".to_string(), format!("hello from {name} peer={peer}\n"))
        };
        write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nx-served-by: {name}\r\nx-served-at: {local}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )?;
        if !faults.quiet {
            println!("http request peer={peer} {}", head.lines().next().unwrap_or_default());
        }
        if close {
            return Ok(());
        }
    }
    Ok(())
}

fn hash_to_eof(r: &mut impl Read) -> Result<(u64, String)> {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context(format!("read after {n} bytes")),
        };
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex::encode(h.finish())))
}

fn write_pattern(w: &mut impl Write, bytes: u64) -> Result<String> {
    let mut p = Pattern::new();
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let take = left.min(CHUNK as u64) as usize;
        p.fill(&mut buf[..take]);
        h.update(&buf[..take]);
        w.write_all(&buf[..take]).with_context(|| format!("write after {} bytes", bytes - left))?;
        left -= take as u64;
    }
    w.flush()?;
    Ok(hex::encode(h.finish()))
}

// ---------------------------------------------------------------------------------------------
// Clients

pub fn connect(to: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).with_context(|| format!("connect {to}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `bytes` of [`Pattern`] to a sink; returns `(our sha, the sink's reply)`.
pub fn send(to: SocketAddr, bytes: u64) -> Result<(String, BTreeMap<String, String>)> {
    let mut s = connect(to)?;
    let sha = write_pattern(&mut s, bytes)?;
    s.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    (&mut s).take(4096).read_to_string(&mut reply).context("read the sink's reply")?;
    Ok((sha, parse_kv(&reply)))
}

/// Reads a source to EOF; returns `(bytes, sha)`.
pub fn recv(from: SocketAddr) -> Result<(u64, String)> {
    let mut s = connect(from)?;
    hash_to_eof(&mut s)
}

/// Relays stdin lines to an echo server and prints each echoed line, until stdin closes
/// (at most `max_lines`). Keeps one connection for its whole life: the suites use it as a
/// long-lived session that must survive agent reloads.
pub fn chat(to: SocketAddr, max_lines: u64) -> Result<()> {
    let s = connect(to)?;
    // A session may sit idle for a while between lines.
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    println!("connected to {to}");
    let stdin = io::stdin();
    for line in stdin.lock().lines().take(max_lines as usize) {
        let line = line?;
        writeln!(w, "{line}")?;
        let mut back = String::new();
        if r.read_line(&mut back)? == 0 {
            bail!("connection closed by the peer");
        }
        println!("{}", back.trim_end());
    }
    Ok(())
}

/// Fixed-rate request/response on one connection to an echo server.
#[derive(Debug, Clone, PartialEq)]
pub struct RrResult {
    pub requests: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Sends `size`-byte requests at `rate` per second for `duration` and waits for each echo.
/// Latency counts from the scheduled send time, so a stalled response also delays (and is
/// charged to) the requests queued behind it.
pub fn rr(to: SocketAddr, rate: u32, duration: Duration, size: usize) -> Result<RrResult> {
    if rate == 0 || size == 0 {
        bail!("rate and size must be positive");
    }
    let total = (rate as f64 * duration.as_secs_f64()).ceil() as u64;
    if total > 10_000_000 {
        bail!("{total} requests is too many: lower --rate or --duration");
    }
    let mut s = connect(to)?;
    let req = vec![0x5a; size];
    let mut resp = vec![0u8; size];
    let mut lat = Vec::with_capacity(total as usize);
    let start = Instant::now();
    let hard_stop = duration + Duration::from_secs(30);
    for i in 0..total {
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        s.write_all(&req)?;
        s.read_exact(&mut resp).context("read echo")?;
        lat.push(scheduled.elapsed().as_micros() as u64);
        if start.elapsed() > hard_stop {
            bail!("gave up after {:?}: responses are too slow for rate {rate}", start.elapsed());
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    Ok(RrResult { requests: lat.len() as u64, p50_us: pct(0.50), p99_us: pct(0.99), max_us: *lat.last().unwrap_or(&0) })
}

/// New connections per second against an echo server, each doing a 1-byte round trip.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectRateResult {
    pub connections: u64,
    pub failures: u64,
    pub per_sec: f64,
}

pub fn connect_rate(to: SocketAddr, duration: Duration) -> Result<ConnectRateResult> {
    let start = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    while start.elapsed() < duration && ok < 10_000_000 {
        let one = || -> Result<()> {
            let mut s = connect(to)?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            // RST instead of FIN: tens of thousands of TIME_WAIT sockets would exhaust the
            // client's ephemeral ports long before the mesh is the bottleneck.
            SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            Ok(())
        };
        match one() {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                if failed > 100 {
                    bail!("over 100 failed connections (last: {e:#})");
                }
            }
        }
    }
    Ok(ConnectRateResult { connections: ok, failures: failed, per_sec: ok as f64 / start.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(kind: Server) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().take(1_000_000) {
                let kind = kind.clone();
                let c = c.unwrap();
                std::thread::spawn(move || handle(kind, c, "test").unwrap());
            }
        });
        addr
    }

    #[test]
    fn pattern_is_deterministic_and_independent_of_write_sizes() {
        let mut a = Pattern::new();
        let mut one = vec![0u8; 200_000];
        a.fill(&mut one);
        let mut b = Pattern::new();
        let mut pieces = vec![0u8; 200_000];
        for c in pieces.chunks_mut(7777) {
            b.fill(c);
        }
        assert_eq!(one, pieces);
        assert_ne!(&one[..CHUNK], &one[CHUNK..2 * CHUNK], "chunks must differ");
        assert_eq!(expected_sha256(0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn send_to_sink_and_recv_from_source_agree_on_hashes() {
        let n = 3 * CHUNK as u64 + 123;
        let (sent, reply) = send(server(Server::Sink), n).unwrap();
        assert_eq!(sent, expected_sha256(n));
        assert_eq!(reply["sha256"], sent);
        assert_eq!(reply["bytes"], n.to_string());
        let (got, sha) = recv(server(Server::Source { bytes: n })).unwrap();
        assert_eq!(got, n);
        assert_eq!(sha, expected_sha256(n));
    }

    #[test]
    fn relay_passes_bytes_and_half_close_through() {
        let relay = server(Server::Relay { to: server(Server::Sink) });
        let n = 5 * RELAY_CHUNK as u64 + 7;
        let (sent, reply) = send(relay, n).unwrap();
        // The sink answers only after EOF, so its reply proves the half-close went through.
        assert_eq!(reply["sha256"], sent);
        assert_eq!(reply["bytes"], n.to_string());
    }

    #[test]
    fn http_server_answers_with_name_and_peer() {
        let addr = server(Server::Http { name: "b".into(), faults: HttpFaults::default() });
        let mut s = connect(addr).unwrap();
        write!(s, "POST /x HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert!(out.contains("hello from b peer=test"), "{out}");
    }

    #[test]
    fn rr_and_connect_rate_measure_an_echo_server() {
        let addr = server(Server::Echo);
        let r = rr(addr, 200, Duration::from_millis(300), 64).unwrap();
        assert_eq!(r.requests, 60);
        assert!(r.p50_us <= r.p99_us && r.p99_us <= r.max_us);
        let c = connect_rate(addr, Duration::from_millis(100)).unwrap();
        assert!(c.connections > 0 && c.failures == 0, "{c:?}");
    }

    #[test]
    fn parse_kv_reads_key_value_words() {
        let kv = parse_kv("bytes=5 sha256=abc\nnoise p50_us=7");
        assert_eq!(kv["bytes"], "5");
        assert_eq!(kv["sha256"], "abc");
        assert_eq!(kv["p50_us"], "7");
    }
}
