//! HTTP requests from the waypoint to one endpoint: over HBONE (`CONNECT endpoint-ip:targetPort` to the
//! endpoint's node agent on 15008, presenting the waypoint's own certificate and expecting the endpoint
//! workload's identity) when the endpoint is captured, plaintext TCP otherwise; HTTP/1.1 or HTTP/2 as
//! the caller says. Connections are reused per endpoint and protocol (HTTP/1.1: one request at a time
//! per connection, idle ones kept; HTTP/2: one multiplexed connection), within the cluster's
//! connect timeout, idle timeout and max requests per connection.
//!
//! It owns connections and maps their failures to `Outcome`; it does not choose endpoints, retry or
//! time out whole requests (that is `handler`, with `cluster` and `route`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use super::Outcome;
use super::server::Body;
use crate::identity::{self, CertManager, Identity};
use crate::proxy::hbone::{self, H2Io};
use crate::proxy::pool::{Key as HboneKey, Pool as HbonePool};
use crate::state::{ServicePort, Workload};

/// Port of the node agent's HBONE listener.
pub const HBONE_PORT: u16 = 15008;
/// Idle HTTP/1.1 connections kept per endpoint; more are closed after use.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    /// Istio's protocol selection: the service port's `appProtocol`, else its name prefix; gRPC
    /// requests (HTTP/2 with `content-type: application/grpc…`) go upstream as HTTP/2 whatever the port says.
    pub fn select(port: Option<&ServicePort>, req: &http::request::Parts) -> Protocol {
        let grpc = req.version == http::Version::HTTP_2
            && req
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
        if grpc {
            return Protocol::Http2;
        }
        let h2 = |s: &str| {
            let s = s.to_ascii_lowercase();
            let s = s.strip_prefix("kubernetes.io/").unwrap_or(&s);
            ["http2", "grpc", "h2c", "grpc-web"].iter().any(|p| s == *p || s.starts_with(&format!("{p}-")))
        };
        match port {
            Some(p) if p.app_protocol.as_deref().is_some_and(h2) => Protocol::Http2,
            Some(p) if p.app_protocol.is_none() && p.name.as_deref().is_some_and(h2) => Protocol::Http2,
            _ => Protocol::Http1,
        }
    }
}

/// Istio's protocols a waypoint passes through at L4 (`appProtocol`, or the port name `PROTO[-suffix]`).
/// `https` and `tls` are opaque TLS (the waypoint does not terminate them); `udp` is never proxied.
const OPAQUE: [&str; 6] = ["tcp", "tls", "https", "mongo", "mysql", "redis"];

/// Whether traffic to this service port is passed through at L4 rather than parsed as HTTP: an
/// `appProtocol` (or, without one, a port name) naming a non-HTTP protocol. Ports with no
/// recognizable protocol are served as HTTP, as Istio's waypoints do (they do not sniff).
pub fn passthrough(port: &ServicePort) -> bool {
    let is = |s: &str| {
        let s = s.to_ascii_lowercase();
        let s = s.strip_prefix("kubernetes.io/").unwrap_or(&s);
        OPAQUE.iter().any(|p| s == *p || s.starts_with(&format!("{p}-")))
    };
    match port.app_protocol.as_deref() {
        Some(a) => is(a),
        None => port.name.as_deref().is_some_and(is),
    }
}

/// Where and how to send one request.
#[derive(Debug, Clone)]
pub struct Target {
    /// Endpoint ip:targetPort.
    pub addr: SocketAddr,
    pub workload: Arc<Workload>,
    pub protocol: Protocol,
    pub connect_timeout: Duration,
    /// Idle connections older than this are not reused.
    pub idle_timeout: Option<Duration>,
    /// 0: unlimited.
    pub max_requests_per_connection: u32,
}

/// Why an attempt got no response.
#[derive(Debug, thiserror::Error)]
#[error("{addr}: {reason}")]
pub struct Failure {
    pub outcome: Outcome,
    pub addr: SocketAddr,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    protocol: Protocol,
    /// `None`: plaintext.
    hbone: Option<Identity>,
}

struct Idle<S> {
    sender: S,
    since: Instant,
    used: u32,
}

#[derive(Default)]
struct Conns {
    h1: HashMap<Key, Vec<Idle<http1::SendRequest<Body>>>>,
    h2: HashMap<Key, Idle<http2::SendRequest<Body>>>,
}

/// The waypoint's upstream connections. Cheap to share (`Arc`).
pub struct Upstream {
    certs: Arc<CertManager>,
    /// The waypoint's identity: its client certificate on HBONE.
    identity: Identity,
    hbone: HbonePool,
    conns: Arc<Mutex<Conns>>,
}

/// A byte stream to an endpoint: plaintext TCP or an HBONE tunnel.
pub type Io = Either<TcpStream, H2Io>;

impl Upstream {
    pub fn new(certs: Arc<CertManager>, identity: Identity) -> Self {
        Upstream { certs, identity, hbone: HbonePool::default(), conns: Arc::default() }
    }

    /// Sends `req` (origin-form URI, `Host`/`:authority` already as the endpoint should see it).
    pub async fn send(&self, t: &Target, req: http::Request<Body>) -> Result<http::Response<ResponseBody>, Failure> {
        let key =
            Key { addr: t.addr, protocol: t.protocol, hbone: t.workload.captured.then(|| t.workload.identity.clone()) };
        match t.protocol {
            Protocol::Http1 => self.send_h1(t, key, req).await,
            Protocol::Http2 => self.send_h2(t, key, req).await,
        }
    }

    async fn send_h1(
        &self,
        t: &Target,
        key: Key,
        mut req: http::Request<Body>,
    ) -> Result<http::Response<ResponseBody>, Failure> {
        // A pooled connection the server closed meanwhile fails before the request went out: then
        // the request comes back and goes on a fresh connection (bounded: idle ones, then one new).
        for _ in 0..=MAX_IDLE_PER_ENDPOINT {
            let (mut sender, used) = match self.idle_h1(&key, t) {
                Some(s) => s,
                None => (self.dial_h1(t, &key).await?, 0),
            };
            let fresh = used == 0;
            let last = t.max_requests_per_connection != 0 && used + 1 >= t.max_requests_per_connection;
            *req.version_mut() = http::Version::HTTP_11;
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let back = (!last).then(|| Return {
                        conns: Arc::downgrade(&self.conns),
                        key: key.clone(),
                        sender,
                        used: used + 1,
                    });
                    return Ok(resp.map(|body| ResponseBody::new(body, back)));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    _ => return Err(self.failure(t, e.into_error())),
                },
            }
        }
        Err(Failure { outcome: Outcome::ConnectFailure, addr: t.addr, reason: "no usable connection".into() })
    }

    fn idle_h1(&self, key: &Key, t: &Target) -> Option<(http1::SendRequest<Body>, u32)> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.h1.get_mut(key)?;
        while let Some(idle) = list.pop() {
            let fresh = t.idle_timeout.is_none_or(|d| idle.since.elapsed() < d);
            if fresh && idle.sender.is_ready() {
                return Some((idle.sender, idle.used));
            }
        }
        None
    }

    async fn dial_h1(&self, t: &Target, key: &Key) -> Result<http1::SendRequest<Body>, Failure> {
        let io = self.dial(t, key).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| self.failure_with(t, Outcome::ConnectFailure, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn send_h2(
        &self,
        t: &Target,
        key: Key,
        req: http::Request<Body>,
    ) -> Result<http::Response<ResponseBody>, Failure> {
        let pooled = {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            match conns.h2.get_mut(&key) {
                Some(c)
                    if !c.sender.is_closed()
                        && t.idle_timeout.is_none_or(|d| c.since.elapsed() < d)
                        && (t.max_requests_per_connection == 0 || c.used < t.max_requests_per_connection) =>
                {
                    c.used += 1;
                    c.since = Instant::now();
                    Some(c.sender.clone())
                }
                _ => None,
            }
        };
        let mut sender = match pooled {
            Some(s) => s,
            None => {
                let s = self.dial_h2(t, &key).await?;
                let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
                conns.h2.insert(key, Idle { sender: s.clone(), since: Instant::now(), used: 1 });
                s
            }
        };
        let mut req = req;
        *req.version_mut() = http::Version::HTTP_2;
        sender.ready().await.map_err(|e| self.failure(t, e))?;
        let resp = sender.send_request(req).await.map_err(|e| self.failure(t, e))?;
        Ok(resp.map(|body| ResponseBody::new(body, None)))
    }

    async fn dial_h2(&self, t: &Target, key: &Key) -> Result<http2::SendRequest<Body>, Failure> {
        let io = self.dial(t, key).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(hbone::STREAM_WINDOW)
            .initial_connection_window_size(hbone::CONNECTION_WINDOW)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| self.failure_with(t, Outcome::ConnectFailure, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// A byte stream to `t` for L4 passthrough (`t.protocol` is not used): an HBONE tunnel to the
    /// endpoint's node agent when it is captured, plaintext TCP otherwise, within the connect timeout.
    pub async fn open(&self, t: &Target) -> Result<Io, Failure> {
        let key =
            Key { addr: t.addr, protocol: t.protocol, hbone: t.workload.captured.then(|| t.workload.identity.clone()) };
        self.dial(t, &key).await
    }

    /// A byte stream to the endpoint: plaintext TCP, or a tunnel on the pooled HBONE connection to its node agent.
    async fn dial(&self, t: &Target, key: &Key) -> Result<Io, Failure> {
        let fail = |reason: String| Failure { outcome: Outcome::ConnectFailure, addr: t.addr, reason };
        let work = async {
            let Some(expected) = &key.hbone else {
                let tcp = TcpStream::connect(t.addr).await.map_err(|e| fail(format!("connect: {e}")))?;
                let _ = tcp.set_nodelay(true);
                return Ok(Either::Left(tcp));
            };
            let node = SocketAddr::new(t.addr.ip(), HBONE_PORT);
            let pool_key = HboneKey { src_netns: 0, src: self.identity.clone(), dst: expected.clone(), dst_addr: node };
            let sender = self
                .hbone
                .get(&pool_key, || self.hbone_connect(node, expected))
                .await
                .map_err(|e| fail(format!("HBONE to {node}: {e}")))?;
            match hbone::connect(sender, t.addr, &[]).await {
                Ok((send, recv)) => Ok(Either::Right(H2Io::new(send, recv))),
                Err(e) => {
                    if matches!(e, hbone::Error::H2(ref h) if h.is_io() || h.is_go_away()) {
                        self.hbone.evict(&pool_key);
                    }
                    Err(fail(format!("HBONE CONNECT via {node}: {e}")))
                }
            }
        };
        tokio::time::timeout(t.connect_timeout, work)
            .await
            .unwrap_or_else(|_| Err(fail(format!("connect timeout ({:?})", t.connect_timeout))))
    }

    async fn hbone_connect(
        &self,
        node: SocketAddr,
        expected: &Identity,
    ) -> Result<h2::client::SendRequest<Bytes>, String> {
        let cert = self.certs.fetch(&self.identity).await.map_err(|e| format!("waypoint certificate: {e}"))?;
        let tcp = TcpStream::connect(node).await.map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(cert.client_config(std::slice::from_ref(expected)));
        let tls = connector.connect(identity::server_name(node.ip()), tcp).await.map_err(|e| format!("TLS: {e}"))?;
        let (sender, conn) = hbone::client_builder().handshake(tls).await.map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%node, error = %e, "upstream HBONE connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn failure(&self, t: &Target, e: hyper::Error) -> Failure {
        // Nothing came back on an established connection: the connection or stream went away.
        self.failure_with(t, Outcome::Reset, e)
    }

    fn failure_with(&self, t: &Target, outcome: Outcome, e: hyper::Error) -> Failure {
        Failure { outcome, addr: t.addr, reason: e.to_string() }
    }
}

/// An HTTP/1.1 connection going back to the pool once its response body has been read to the end.
struct Return {
    conns: Weak<Mutex<Conns>>,
    key: Key,
    sender: http1::SendRequest<Body>,
    used: u32,
}

impl Return {
    fn give_back(self) {
        let Some(conns) = self.conns.upgrade() else { return };
        let mut conns = conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.h1.entry(self.key).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle { sender: self.sender, since: Instant::now(), used: self.used });
        }
    }
}

/// An upstream response body; counts its bytes and, for HTTP/1.1, returns the connection to the pool
/// at its end (a body dropped early closes its connection instead: it is mid-message).
pub struct ResponseBody {
    inner: Incoming,
    back: Option<Return>,
    bytes: u64,
}

impl ResponseBody {
    fn new(inner: Incoming, back: Option<Return>) -> Self {
        let mut b = ResponseBody { inner, back, bytes: 0 };
        if b.inner.is_end_stream()
            && let Some(r) = b.back.take()
        {
            r.give_back();
        }
        b
    }

    /// Body bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let res = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &res {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream()
                    && let Some(r) = self.back.take()
                {
                    r.give_back();
                }
            }
            None => {
                if let Some(r) = self.back.take() {
                    r.give_back();
                }
            }
            Some(Err(_)) => self.back = None,
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: http::Version, content_type: Option<&str>) -> http::request::Parts {
        let mut b = http::Request::builder().version(version);
        if let Some(ct) = content_type {
            b = b.header(http::header::CONTENT_TYPE, ct);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn port(name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort { name: name.map(Into::into), port: 80, target_port: 80, app_protocol: app.map(Into::into) }
    }

    #[test]
    fn passthrough_ports_are_the_non_http_istio_protocols() {
        let cases = [
            (port(Some("tcp-9000"), None), true),
            (port(Some("tcp"), None), true),
            (port(Some("tls-db"), None), true),
            (port(Some("mongo"), None), true),
            (port(Some("mysql-primary"), None), true),
            (port(Some("redis"), None), true),
            (port(Some("https"), None), true),
            (port(None, Some("tcp")), true),
            (port(None, Some("kubernetes.io/tls")), true),
            (port(Some("tcp-x"), Some("http")), false),
            (port(Some("http"), Some("mysql")), true),
            (port(Some("http"), None), false),
            (port(Some("grpc"), None), false),
            (port(Some("tcpx"), None), false),
            (port(Some("web"), None), false),
            (port(None, None), false),
            (port(None, Some("kubernetes.io/h2c")), false),
        ];
        for (p, want) in cases {
            assert_eq!(passthrough(&p), want, "{p:?}");
        }
    }

    #[test]
    fn protocol_follows_app_protocol_then_port_name_then_grpc_requests() {
        let h1 = parts(http::Version::HTTP_11, None);
        let cases = [
            (Some(port(Some("http"), None)), Protocol::Http1),
            (Some(port(Some("http2-web"), None)), Protocol::Http2),
            (Some(port(Some("grpc"), None)), Protocol::Http2),
            (Some(port(None, Some("kubernetes.io/h2c"))), Protocol::Http2),
            (Some(port(None, Some("grpc"))), Protocol::Http2),
            (Some(port(Some("grpc"), Some("http"))), Protocol::Http1),
            (Some(port(None, Some("HTTP2"))), Protocol::Http2),
            (None, Protocol::Http1),
        ];
        for (p, want) in cases {
            assert_eq!(Protocol::select(p.as_ref(), &h1), want, "{p:?}");
        }
        let grpc = parts(http::Version::HTTP_2, Some("application/grpc+proto"));
        assert_eq!(Protocol::select(Some(&port(Some("http"), None)), &grpc), Protocol::Http2);
        let h2_json = parts(http::Version::HTTP_2, Some("application/json"));
        assert_eq!(Protocol::select(Some(&port(Some("http"), None)), &h2_json), Protocol::Http1);
    }
}
