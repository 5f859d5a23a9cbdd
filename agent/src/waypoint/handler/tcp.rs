//! Non-HTTP traffic through the waypoint: a tunnel to a service port whose protocol is not HTTP
//! (`tcp-`, `tls-`, `mongo-`, … or the same `appProtocol`) is passed through at L4, as Istio's waypoint
//! does with its TCP filter chain: L4 AuthorizationPolicy (the waypoint's targetRef policies with the
//! HTTP-only parts handled as istiod does for TCP), the service's cluster (DestinationRule load
//! balancing and `connectionPool.tcp` limits), HBONE to a captured endpoint's node agent or plain TCP,
//! and Istio's TCP metrics with `reporter="waypoint"`.
//!
//! It owns the L4 view of the policies and the life of one passthrough connection; HTTP requests are
//! the rest of `handler`'s.

use std::sync::Arc;

use bytes::Bytes;

use super::Chain;
use crate::crd::{Action, AuthorizationPolicy, Condition, Rule, Source};
use crate::metrics::{ConnLabels, Reporter};
use crate::policy::Decision;
use crate::policy::l7::L7Request;
use crate::proxy::peer_labels;
use crate::waypoint::Outcome;
use crate::waypoint::cluster::HashKey;
use crate::waypoint::server::Downstream;
use crate::waypoint::upstream::{Protocol, Target};

/// Condition keys a connection carries; every other key needs HTTP (or TLS) parsing.
const L4_KEYS: [&str; 5] = ["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];

/// The policies as they apply to TCP connections, what istiod generates for a TCP filter chain
/// (the same rule the node agents' L4 enforcement follows): an ALLOW rule that uses HTTP-only
/// attributes is dropped (it can never match a connection, so the policy only gets stricter); a
/// DENY (or CUSTOM, AUDIT) rule keeps its L4 parts and denies on them alone (stricter too).
pub(crate) fn l4_view(policies: &[AuthorizationPolicy]) -> Vec<AuthorizationPolicy> {
    policies
        .iter()
        .filter(|ap| ap.spec.target_ref.is_some() || !ap.spec.target_refs.is_empty())
        .map(|ap| {
            let mut ap = ap.clone();
            let allow = ap.spec.action == Action::Allow;
            let rules = std::mem::take(&mut ap.spec.rules);
            ap.spec.rules = rules.into_iter().filter_map(|r| l4_rule(r, allow)).collect();
            ap
        })
        .collect()
}

fn source_http_only(s: &Source) -> bool {
    !(s.request_principals.is_empty()
        && s.not_request_principals.is_empty()
        && s.remote_ip_blocks.is_empty()
        && s.not_remote_ip_blocks.is_empty())
}

fn condition_http_only(c: &Condition) -> bool {
    !L4_KEYS.contains(&c.key.as_str())
}

fn l4_rule(mut r: Rule, allow: bool) -> Option<Rule> {
    let op_http = |o: &crate::crd::Operation| {
        !(o.hosts.is_empty()
            && o.not_hosts.is_empty()
            && o.methods.is_empty()
            && o.not_methods.is_empty()
            && o.paths.is_empty()
            && o.not_paths.is_empty())
    };
    let uses_http = r.from.iter().any(|f| f.source.as_ref().is_some_and(source_http_only))
        || r.to.iter().any(|t| t.operation.as_ref().is_some_and(op_http))
        || r.when.iter().any(condition_http_only);
    if !uses_http {
        return Some(r);
    }
    if allow {
        return None;
    }
    for f in &mut r.from {
        if let Some(s) = &mut f.source {
            s.request_principals.clear();
            s.not_request_principals.clear();
            s.remote_ip_blocks.clear();
            s.not_remote_ip_blocks.clear();
        }
    }
    r.from.retain(|f| f.source.as_ref().is_some_and(|s| *s != Source::default()));
    for t in &mut r.to {
        if let Some(o) = &mut t.operation {
            for v in
                [&mut o.hosts, &mut o.not_hosts, &mut o.methods, &mut o.not_methods, &mut o.paths, &mut o.not_paths]
            {
                v.clear();
            }
        }
    }
    r.to.retain(|t| t.operation.as_ref().is_some_and(|o| !o.ports.is_empty() || !o.not_ports.is_empty()));
    r.when.retain(|c| !condition_http_only(c));
    Some(r)
}

/// Copies `src` to `dst` until EOF, then half-closes `dst`; `n` counts the bytes as they go through
/// (so a reset still reports what was carried).
async fn pump<R, W>(src: &mut R, dst: &mut W, n: &mut u64) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let k = src.read(&mut buf).await?;
        if k == 0 {
            return dst.shutdown().await;
        }
        dst.write_all(&buf[..k]).await?;
        *n += k as u64;
    }
}

/// Both directions until both ended; an error (reset) on either ends the other too.
async fn splice<D, U>(down: D, up: U, received: &mut u64, sent: &mut u64) -> std::io::Result<()>
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let (mut dr, mut dw) = tokio::io::split(down);
    let (mut ur, mut uw) = tokio::io::split(up);
    let a = pump(&mut dr, &mut uw, received);
    let b = pump(&mut ur, &mut dw, sent);
    tokio::pin!(a, b);
    let (mut a_done, mut b_done) = (false, false);
    while !(a_done && b_done) {
        tokio::select! {
            r = &mut a, if !a_done => { a_done = true; r?; }
            r = &mut b, if !b_done => { b_done = true; r?; }
        }
    }
    Ok(())
}

fn answer(respond: &mut h2::server::SendResponse<Bytes>, status: u16) {
    let resp = http::Response::builder().status(status).body(()).expect("static response");
    let _ = respond.send_response(resp, true);
}

impl Chain {
    /// One L4 passthrough tunnel: policy, endpoint, upstream stream, then `200` and the bytes both
    /// ways. Refusals are answered on the CONNECT (403 policy, 503 no endpoint / overflow / connect
    /// failure) and counted with their response flag.
    pub(super) async fn serve_tcp(
        self: Arc<Self>,
        d: Downstream,
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) {
        let state = self.state.load();
        let compiled = self.compiled.load_full();
        let svc = d.service.clone();
        let mut labels = ConnLabels {
            reporter: Reporter::Waypoint,
            source: super::source_peer(&state, &d),
            destination: Default::default(),
            destination_service: svc.hostname(),
            destination_service_name: svc.name.clone(),
            destination_service_namespace: svc.namespace.clone(),
            mtls: d.identity.is_some(),
            response_flags: "-",
        };
        let refuse = |respond: &mut h2::server::SendResponse<Bytes>, labels: &mut ConnLabels, status, flags| {
            labels.response_flags = flags;
            self.tcp_metrics.conn_opened(labels).closed(0, 0);
            answer(respond, status);
        };

        let principal = d.identity.as_ref().map(|i| i.to_string());
        let namespace = d.identity.as_ref().map(|i| i.namespace.clone());
        let no_headers = http::HeaderMap::new();
        let decision = compiled.tcp_authz.authorize(&L7Request {
            service_namespace: &svc.namespace,
            service_name: &svc.name,
            source_principal: principal.as_deref(),
            source_namespace: namespace.as_deref(),
            source_ip: d.peer.ip(),
            method: "",
            path: "",
            host: "",
            port: d.port,
            headers: &no_headers,
        });
        if let Decision::Deny { policy } = decision {
            tracing::info!(target: "access", service = %svc.hostname(), source_principal = ?principal, %policy, "TCP connection denied by AuthorizationPolicy");
            return refuse(&mut respond, &mut labels, 403, "DENY");
        }

        let cluster = self.clusters.get_for(&svc, None, d.port);
        // connectionPool.tcp.maxConnections: held for the connection's life.
        let Ok(_admission) = cluster.admit().await else {
            return refuse(&mut respond, &mut labels, 503, "UO");
        };
        let key = HashKey { headers: &no_headers, source_ip: d.peer.ip(), query: None };
        let Some(endpoint) = cluster.pick(&key) else {
            return refuse(&mut respond, &mut labels, 503, "UH");
        };
        labels.destination = peer_labels(&endpoint.workload);
        let settings = cluster.settings();
        let target = Target {
            addr: endpoint.addr,
            workload: endpoint.workload.clone(),
            protocol: Protocol::Http1,
            connect_timeout: settings.connect_timeout,
            idle_timeout: None,
            max_requests_per_connection: 0,
        };
        let mut up = match self.upstream.open(&target).await {
            Ok(io) => io,
            Err(f) => {
                cluster.report(&endpoint, &Outcome::ConnectFailure);
                tracing::info!(target: "access", service = %svc.hostname(), upstream = %f.addr, reason = %f.reason, "TCP connection: upstream connect failed");
                return refuse(&mut respond, &mut labels, 503, "UF");
            }
        };
        let send = match respond.send_response(http::Response::new(()), false) {
            Ok(s) => s,
            Err(e) => {
                return tracing::debug!(peer = %d.peer, error = %e, "HBONE peer went away before the tunnel opened");
            }
        };
        let conn = self.tcp_metrics.conn_opened(&labels);
        let down = crate::proxy::hbone::H2Io::new(send, req.into_body());
        let start = std::time::Instant::now();
        let (mut received, mut sent) = (0u64, 0u64);
        let error = splice(down, &mut up, &mut received, &mut sent).await.err().map(|e| e.to_string());
        conn.closed(received, sent);
        tracing::info!(
            target: "access",
            peer = %d.peer,
            source_principal = ?principal,
            service = %svc.hostname(),
            upstream = %endpoint.addr,
            bytes_received = received,
            bytes_sent = sent,
            duration_ms = start.elapsed().as_millis() as u64,
            error = ?error,
            "TCP connection closed"
        );
    }
}
