//! Inbound: HBONE (15008) and plaintext (15006) connections to a pod this node serves.
//!
//! HBONE: terminate mutual TLS with the pod's certificate, take the peer's SPIFFE identity from
//! its verified certificate, and for each `CONNECT ip:port` stream check the address belongs to
//! the pod, apply AuthorizationPolicy, and connect to the app inside the pod.
//! Plaintext (steered here by sk_lookup): PeerAuthentication STRICT refuses it; PERMISSIVE
//! applies AuthorizationPolicy without a principal and passes it to the app.
//!
//! The app is reached on the address the client aimed at (the pod IP), from inside the pod — not
//! on loopback: apps trust 127.0.0.1 (admin ports, "local only" checks) and a remote caller must
//! never look local. sk_lookup leaves a pod's connections to its own IP alone, so this does not
//! loop back to 15006.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpStream;

use super::{CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, Pod, Proxy, hbone, peer_labels, service_labels, socket};
use crate::drain::Drain;
use crate::identity::{self, Identity};
use crate::metrics::{ConnLabels, Peer, Reporter};
use crate::policy::{Connection, Decision, MtlsMode};
use crate::state::{State, Workload};

pub(super) async fn handle_hbone(proxy: Arc<Proxy>, pod: Arc<Pod>, tcp: TcpStream, peer: SocketAddr, drain: Drain) {
    let me = pod.current(&proxy.state.load());
    let cert = match proxy.certs.fetch(&me.identity).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(pod = %pod.name(), error = %e, "no certificate to serve HBONE; refusing");
            return socket::reset(tcp);
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(pod = %pod.name(), %peer, error = %e, "HBONE handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(pod = %pod.name(), %peer, "HBONE handshake timed out");
            return;
        }
    };
    let src_id = match identity::peer_identity(tls.get_ref().1) {
        Ok(id) => id,
        Err(e) => {
            tracing::info!(pod = %pod.name(), %peer, error = %e, "HBONE peer has no usable identity");
            return;
        }
    };
    let mut conn = match hbone::server_builder().handshake::<_, Bytes>(tls).await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(pod = %pod.name(), %peer, error = %e, "HBONE peer does not speak HTTP/2");
            return;
        }
    };
    let src_id = Arc::new(src_id);
    loop {
        let next = tokio::select! {
            _ = drain.signaled() => {
                // Tell the peer to open no new streams here; running ones finish.
                conn.graceful_shutdown();
                std::future::poll_fn(|cx| conn.poll_closed(cx)).await.ok();
                return;
            }
            next = conn.accept() => next,
        };
        match next {
            Some(Ok((req, respond))) => {
                drain.spawn(stream(proxy.clone(), pod.clone(), peer, src_id.clone(), req, respond));
            }
            Some(Err(e)) => {
                tracing::debug!(pod = %pod.name(), %peer, error = %e, "HBONE connection error");
                return;
            }
            None => return,
        }
    }
}

/// One CONNECT stream on an HBONE connection.
async fn stream(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    peer: SocketAddr,
    src_id: Arc<Identity>,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let started = Instant::now();
    let answer = |respond: &mut h2::server::SendResponse<Bytes>, status: u16| {
        let resp = http::Response::builder().status(status).body(()).expect("static response");
        let _ = respond.send_response(resp, true);
    };
    if req.method() != http::Method::CONNECT {
        return answer(&mut respond, 405);
    }
    let Some(dest) = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok()) else {
        tracing::info!(pod = %pod.name(), %peer, uri = %req.uri(), "HBONE CONNECT without an ip:port authority");
        return answer(&mut respond, 400);
    };
    let dest = socket::canonical(dest);
    let state = proxy.state.load();
    let me = pod.current(&state);
    if !me.ips.contains(&dest.ip()) {
        tracing::info!(pod = %pod.name(), %peer, %dest, "HBONE CONNECT for an address this pod does not have");
        return answer(&mut respond, 400);
    }
    if let Decision::Deny { policy } = authorize(&state, &me, peer, Some(&src_id), dest) {
        tracing::info!(target: "access", direction = "inbound", pod = %pod.name(), src.addr = %peer, src.identity = %src_id, dst.addr = %dest, policy = %policy, "connection denied by AuthorizationPolicy");
        return answer(&mut respond, 401);
    }
    let labels = labels(&state, &me, peer.ip(), Some(&src_id), dest, true);
    drop(state);
    let app = match tokio::time::timeout(CONNECT_TIMEOUT, socket::connect_in(&pod.netns, dest)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(pod = %pod.name(), %dest, error = %e, "app refused the connection");
            return answer(&mut respond, 503);
        }
        Err(_) => return answer(&mut respond, 504),
    };
    let ok = http::Response::builder().status(200).body(()).expect("static response");
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "peer went away before the tunnel opened");
            return;
        }
    };
    let conn = proxy.metrics.conn_opened(&labels);
    let (copied, res) = hbone::copy(app, send, req.into_body()).await;
    // to_tunnel = app → source (sent); from_tunnel = source → app (received).
    conn.closed(copied.from_tunnel, copied.to_tunnel);
    tracing::info!(
        target: "access",
        direction = "inbound",
        pod = %pod.name(),
        src.addr = %peer,
        src.identity = %src_id,
        dst.addr = %dest,
        security = "mutual_tls",
        bytes_received = copied.from_tunnel,
        bytes_sent = copied.to_tunnel,
        duration_ms = started.elapsed().as_millis() as u64,
        error = res.err().map(|e| e.to_string()).unwrap_or_default(),
        "connection complete"
    );
}

pub(super) async fn handle_plaintext(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    tcp: TcpStream,
    peer: SocketAddr,
    _drain: Drain,
) {
    let started = Instant::now();
    // sk_lookup keeps the packet's destination: our local address is where the client aimed.
    let Ok(dest) = tcp.local_addr().map(socket::canonical) else {
        return socket::reset(tcp);
    };
    let state = proxy.state.load();
    let me = pod.current(&state);
    if state.policies.mtls_mode(&me.namespace, &me.labels, dest.port()) == MtlsMode::Strict {
        tracing::info!(target: "access", direction = "inbound", pod = %pod.name(), src.addr = %peer, dst.addr = %dest, "plaintext refused: PeerAuthentication STRICT");
        return socket::reset(tcp);
    }
    if let Decision::Deny { policy } = authorize(&state, &me, peer, None, dest) {
        tracing::info!(target: "access", direction = "inbound", pod = %pod.name(), src.addr = %peer, dst.addr = %dest, policy = %policy, "plaintext connection denied by AuthorizationPolicy");
        return socket::reset(tcp);
    }
    let labels = labels(&state, &me, peer.ip(), None, dest, false);
    drop(state);
    let mut app = match tokio::time::timeout(CONNECT_TIMEOUT, socket::connect_in(&pod.netns, dest)).await {
        Ok(Ok(s)) => s,
        _ => return socket::reset(tcp),
    };
    let conn = proxy.metrics.conn_opened(&labels);
    let mut tcp = tcp;
    let res = tokio::io::copy_bidirectional(&mut tcp, &mut app).await;
    let (received, sent) = res.as_ref().map(|(a, b)| (*a, *b)).unwrap_or((0, 0));
    conn.closed(received, sent);
    tracing::info!(
        target: "access",
        direction = "inbound",
        pod = %pod.name(),
        src.addr = %peer,
        dst.addr = %dest,
        security = "none",
        bytes_received = received,
        bytes_sent = sent,
        duration_ms = started.elapsed().as_millis() as u64,
        error = res.err().map(|e| e.to_string()).unwrap_or_default(),
        "connection complete"
    );
}

/// AuthorizationPolicy for a connection to `me`; `src` is the peer's verified identity, if any
/// (plaintext has none, so principal and namespace rules cannot match it).
fn authorize(state: &State, me: &Workload, peer: SocketAddr, src: Option<&Identity>, dest: SocketAddr) -> Decision {
    let principal = src.map(Identity::principal);
    state.policies.authorize(&Connection {
        source_principal: principal.as_deref(),
        source_namespace: src.map(|id| id.namespace.as_str()),
        source_ip: peer.ip(),
        dest_ip: dest.ip(),
        dest_port: dest.port(),
        dest_namespace: &me.namespace,
        dest_labels: &me.labels,
    })
}

fn labels(
    state: &State,
    me: &Workload,
    src_ip: IpAddr,
    src_id: Option<&Identity>,
    dest: SocketAddr,
    mtls: bool,
) -> ConnLabels {
    // The source's workload labels come from the snapshot when its address is known and, under
    // mTLS, only if it agrees with the authenticated identity.
    let source = match state.workload_by_ip(src_ip) {
        Some(w) if src_id.is_none_or(|id| *id == w.identity) => peer_labels(w),
        _ => Peer { principal: src_id.map(|i| i.to_string()).unwrap_or_else(|| "unknown".into()), ..Peer::default() },
    };
    let source = if src_id.is_none() { Peer { principal: "unknown".into(), ..source } } else { source };
    let service = state.services_by_vip.values().find(|s| {
        s.namespace == me.namespace
            && s.endpoints.iter().any(|e| e.name == me.name)
            && s.ports.iter().any(|p| p.target_port == dest.port())
    });
    let mut l = ConnLabels {
        reporter: Reporter::Destination,
        source,
        destination: peer_labels(me),
        destination_service: String::new(),
        destination_service_name: String::new(),
        destination_service_namespace: String::new(),
        mtls,
        response_flags: "-",
    };
    service_labels(&mut l, service.map(|s| s.as_ref()), dest);
    l
}
