//! The waypoint's listeners: the HBONE server (mutual TLS with the waypoint's certificate, the caller's
//! SPIFFE identity from its verified certificate, one HTTP/2 `CONNECT` per tunnel whose authority is the
//! service VIP:port the app dialled) and the optional plaintext front door (`--http-listen`, the
//! destination service taken from the `Host` header). Inside each tunnel it serves HTTP/1.1 and HTTP/2
//! (hyper-util's auto server) and hands every request to the [`Handler`].
//!
//! It owns accepting, TLS, tunnel set-up and draining; it does not route or decide anything about a
//! request (that is `handler`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use super::WaypointId;
use crate::drain::Drain;
use crate::identity::{self, CertManager, Identity};
use crate::proxy::hbone::{self, H2Io};
use crate::state::{Service, State, StateStore};

/// TLS handshakes slower than this are abandoned (a slowloris on 15008 holds no slot for long).
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every request sent upstream and every response sent downstream.
pub type Body = BoxBody<Bytes, BoxError>;

/// Who sent a request and to which service: fixed per tunnel (HBONE) or per request (front door).
#[derive(Debug, Clone)]
pub struct Downstream {
    pub peer: SocketAddr,
    /// The caller's verified SPIFFE identity (`None` on the plaintext front door).
    pub identity: Option<Arc<Identity>>,
    pub service: Arc<Service>,
    /// The service port dialled.
    pub port: u16,
}

/// One request to answer; the server never fails a request itself once it reached the handler.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        downstream: Downstream,
        req: http::Request<Incoming>,
    ) -> BoxFuture<'static, http::Response<Body>>;

    /// One tunnel to a service port that is passed through at L4 ([`super::upstream::passthrough`]):
    /// the handler answers the CONNECT and carries the bytes.
    fn tcp(
        self: Arc<Self>,
        downstream: Downstream,
        req: http::Request<h2::RecvStream>,
        respond: h2::server::SendResponse<Bytes>,
    ) -> BoxFuture<'static, ()>;
}

/// What the listeners need to know about the waypoint they serve.
pub struct Listeners {
    pub me: WaypointId,
    /// The waypoint's own SPIFFE identity (`spiffe://TD/ns/NS/sa/SA`): its HBONE server certificate.
    pub identity: Identity,
    pub certs: Arc<CertManager>,
    pub state: Arc<StateStore>,
    pub handler: Arc<dyn Handler>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("CONNECT authority {0:?} is not ip:port; HBONE clients must dial the service VIP:port")]
    BadAuthority(String),
    #[error("no service with VIP {0} and port {1} uses waypoint {2}; label the service istio.io/use-waypoint")]
    NotServed(IpAddr, u16, WaypointId),
}

impl Listeners {
    /// The served service `addr` is a VIP:port of, when it goes through this waypoint.
    pub fn service_at(&self, state: &State, addr: SocketAddr) -> Result<Arc<Service>, ServerError> {
        let ip = crate::proxy::socket::canonical(addr).ip();
        let svc = state
            .service_by_vip(ip)
            .filter(|s| s.ports.iter().any(|p| p.port == addr.port()))
            .filter(|s| self.serves(state, s))
            .ok_or_else(|| ServerError::NotServed(ip, addr.port(), self.me.clone()))?;
        Ok(svc.clone())
    }

    fn serves(&self, state: &State, svc: &Service) -> bool {
        state.waypoint_of(svc).is_some_and(|w| w.namespace == self.me.namespace && w.name == self.me.name)
    }

    /// The served service a `Host` header names: `name[.ns[.svc[.cluster.local]]][:port]` (namespace
    /// defaults to the waypoint's; port to 80 if the service has it, else its first port).
    pub fn service_for_host(&self, state: &State, host: &str) -> Option<(Arc<Service>, u16)> {
        let (name, port) = match host.rsplit_once(':').map(|(n, p)| (n, p.parse::<u16>())) {
            Some((n, Ok(p))) => (n, Some(p)),
            _ => (host, None),
        };
        let name = name.trim_end_matches('.');
        let name = name.strip_suffix(".cluster.local").unwrap_or(name);
        let name = name.strip_suffix(".svc").unwrap_or(name);
        let (svc_name, ns) = name.split_once('.').unwrap_or((name, &self.me.namespace));
        let svc = state.service(ns, svc_name).filter(|s| self.serves(state, s))?;
        let port = match port {
            Some(p) => p,
            None if svc.ports.iter().any(|p| p.port == 80) => 80,
            None => svc.ports.first()?.port,
        };
        svc.ports.iter().any(|p| p.port == port).then(|| (svc.clone(), port))
    }
}

/// Accepts HBONE connections until `drain` is signaled; connections and tunnels are tracked by it.
pub async fn serve_hbone(listener: TcpListener, l: Arc<Listeners>, drain: Drain) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = drain.signaled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        drain.spawn(hbone_connection(l.clone(), tcp, peer, drain.clone()));
    }
}

async fn hbone_connection(l: Arc<Listeners>, tcp: TcpStream, peer: SocketAddr, drain: Drain) {
    let cert = match l.certs.fetch(&l.identity).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(waypoint = %l.me, error = %e, "no certificate to serve HBONE; refusing");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::info!(%peer, error = %e, "HBONE handshake refused"),
        Err(_) => return tracing::info!(%peer, "HBONE handshake timed out"),
    };
    let src = match identity::peer_identity(tls.get_ref().1) {
        Ok(id) => Arc::new(id),
        Err(e) => return tracing::info!(%peer, error = %e, "HBONE peer has no usable identity"),
    };
    let mut conn = match hbone::server_builder().handshake::<_, Bytes>(tls).await {
        Ok(c) => c,
        Err(e) => return tracing::info!(%peer, error = %e, "HBONE peer does not speak HTTP/2"),
    };
    loop {
        let next = tokio::select! {
            _ = drain.signaled() => {
                // No new tunnels; running ones finish (their HTTP servers drain on the same signal).
                conn.graceful_shutdown();
                std::future::poll_fn(|cx| conn.poll_closed(cx)).await.ok();
                return;
            }
            next = conn.accept() => next,
        };
        match next {
            Some(Ok((req, respond))) => {
                drain.spawn(tunnel(l.clone(), peer, src.clone(), req, respond, drain.clone()));
            }
            Some(Err(e)) => return tracing::debug!(%peer, error = %e, "HBONE connection error"),
            None => return,
        }
    }
}

async fn tunnel(
    l: Arc<Listeners>,
    peer: SocketAddr,
    src: Arc<Identity>,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    drain: Drain,
) {
    let answer = |respond: &mut h2::server::SendResponse<Bytes>, status: u16| {
        let resp = http::Response::builder().status(status).body(()).expect("static response");
        let _ = respond.send_response(resp, true);
    };
    if req.method() != http::Method::CONNECT {
        return answer(&mut respond, 405);
    }
    let authority = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    let Ok(addr) = authority.parse::<SocketAddr>() else {
        tracing::info!(%peer, src.identity = %src, error = %ServerError::BadAuthority(authority), "HBONE CONNECT refused");
        return answer(&mut respond, 400);
    };
    let service = match l.service_at(&l.state.load(), addr) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%peer, src.identity = %src, error = %e, "HBONE CONNECT refused");
            return answer(&mut respond, 404);
        }
    };
    let downstream = Downstream { peer, identity: Some(src), service, port: addr.port() };
    let port = downstream.service.ports.iter().find(|p| p.port == addr.port());
    if port.is_some_and(super::upstream::passthrough) {
        return l.handler.clone().tcp(downstream, req, respond).await;
    }
    let send = match respond.send_response(http::Response::new(()), false) {
        Ok(s) => s,
        Err(e) => return tracing::debug!(%peer, error = %e, "HBONE peer went away before the tunnel opened"),
    };
    let io = TokioIo::new(H2Io::new(send, req.into_body()));
    let handler = l.handler.clone();
    let svc = hyper::service::service_fn(move |req| {
        let fut = handler.clone().handle(downstream.clone(), req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    serve_http(io, svc, &drain).await;
}

/// Serves HTTP/1.1 or HTTP/2 (whichever the client speaks) on `io` until it closes or the drain ends it.
async fn serve_http<I, S>(io: I, svc: S, drain: &Drain)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "downstream HTTP connection ended with an error");
    }
}

/// The plaintext front door: HTTP/1.1 or HTTP/2 (prior knowledge), the destination service from each
/// request's `Host` (or `:authority`); requests naming no served service get 404.
pub async fn serve_plain(listener: TcpListener, l: Arc<Listeners>, drain: Drain) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = drain.signaled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let l2 = l.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let host = req
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
                .unwrap_or_default();
            let found = l2.service_for_host(&l2.state.load(), &host);
            let fut = found.map(|(service, port)| {
                l2.handler.clone().handle(Downstream { peer, identity: None, service, port }, req)
            });
            async move {
                Ok::<_, Infallible>(match fut {
                    Some(f) => f.await,
                    None => super::handler::local_reply(
                        http::StatusCode::NOT_FOUND,
                        format!("no service {host:?} goes through this waypoint\n"),
                    ),
                })
            }
        });
        let drain2 = drain.clone();
        drain.spawn(async move { serve_http(TokioIo::new(tcp), svc, &drain2).await });
    }
}

/// Answers one admin path (`/metrics`, `/healthz/ready`, `/config_dump`).
pub type AdminRoutes = Arc<dyn Fn(&str) -> http::Response<http_body_util::Full<Bytes>> + Send + Sync>;

/// The waypoint's metrics (15020), readiness (15021) and admin (15000) endpoints on `listener`
/// (HTTP/1.1), until `drain` is signaled.
pub async fn serve_admin(listener: TcpListener, routes: AdminRoutes, drain: Drain) {
    loop {
        let tcp = tokio::select! {
            _ = drain.signaled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let resp = routes(req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}
