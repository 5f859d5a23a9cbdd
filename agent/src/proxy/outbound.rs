//! Outbound: a connection the app made, captured on the pod's 15001 listener. Recover where it
//! was going, resolve a service VIP to one endpoint, and carry it over HBONE (destination in the
//! mesh) or connect directly (destination outside the mesh), always from the pod's own netns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::{CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, Pod, Proxy, hbone, peer_labels, pool, service_labels, socket};
use crate::drain::Drain;
use crate::identity::{Identity, WorkloadCert};
use crate::metrics::{ConnLabels, Reporter};
use crate::state::{Service, State, Workload};
use weft_ebpf_common::{HBONE_PORT, OUTBOUND_PORT};

/// Where a captured connection goes.
#[derive(Debug)]
enum Route {
    /// Over HBONE to a workload in the mesh (`target` = its IP and the target port).
    Mesh { dest: Arc<Workload>, service: Option<Arc<Service>>, target: SocketAddr },
    /// Over HBONE to the service's waypoint pod (`via`), asking it for the service address the app
    /// dialled (`target` = VIP:port): the waypoint routes at L7 and picks the endpoint.
    Waypoint { via: Arc<Workload>, via_ip: std::net::IpAddr, service: Arc<Service>, target: SocketAddr },
    /// Directly, in plaintext: the destination is not in the mesh.
    Direct { dest: Option<Arc<Workload>>, service: Option<Arc<Service>>, target: SocketAddr },
    /// Nowhere: reset the client (why is logged).
    Refuse(String),
}

fn resolve(state: &State, orig: SocketAddr) -> Route {
    if let Some(svc) = state.service_by_vip(orig.ip()) {
        if let Some(waypoint) = state.waypoint_of(svc) {
            return via_waypoint(svc, waypoint, orig);
        }
        let Some(port) = svc.target_port(orig.port()) else {
            return Route::Refuse(format!("service {}/{} has no port {}", svc.namespace, svc.name, orig.port()));
        };
        // Endpoints of the caller's address family; a random pick spreads load without shared
        // counters (ztunnel does the same).
        let family: Vec<(&Arc<Workload>, std::net::IpAddr)> = svc
            .endpoints
            .iter()
            .filter_map(|w| w.ips.iter().find(|ip| ip.is_ipv4() == orig.is_ipv4()).map(|ip| (w, *ip)))
            .collect();
        if family.is_empty() {
            return Route::Refuse(format!("service {}/{} has no endpoints", svc.namespace, svc.name));
        }
        let (w, ip) = family[rand::random_range(0..family.len())];
        let target = SocketAddr::new(ip, port);
        let service = Some(svc.clone());
        return if w.captured {
            Route::Mesh { dest: w.clone(), service, target }
        } else {
            Route::Direct { dest: Some(w.clone()), service, target }
        };
    }
    match state.workload_by_ip(orig.ip()) {
        Some(w) if w.captured => Route::Mesh { dest: w.clone(), service: None, target: orig },
        other => Route::Direct { dest: other.cloned(), service: None, target: orig },
    }
}

/// Istio ambient's rule: a service bound to a waypoint is only reached through it (fail closed when
/// the waypoint has no pod: bypassing it would skip its L7 policy).
fn via_waypoint(svc: &Arc<Service>, waypoint: &Arc<Service>, orig: SocketAddr) -> Route {
    if svc.target_port(orig.port()).is_none() {
        return Route::Refuse(format!("service {}/{} has no port {}", svc.namespace, svc.name, orig.port()));
    }
    let pods: Vec<(&Arc<Workload>, std::net::IpAddr)> = waypoint
        .endpoints
        .iter()
        .filter_map(|w| w.ips.iter().find(|ip| ip.is_ipv4() == orig.is_ipv4()).map(|ip| (w, *ip)))
        .collect();
    if pods.is_empty() {
        return Route::Refuse(format!(
            "service {}/{} uses waypoint {}/{}, which has no ready pod",
            svc.namespace, svc.name, waypoint.namespace, waypoint.name
        ));
    }
    let (via, via_ip) = pods[rand::random_range(0..pods.len())];
    Route::Waypoint { via: via.clone(), via_ip, service: svc.clone(), target: orig }
}

pub(super) async fn handle(proxy: Arc<Proxy>, pod: Arc<Pod>, tcp: TcpStream, peer: SocketAddr, _drain: Drain) {
    let started = Instant::now();
    let orig = match &proxy.orig_dst {
        Some(lookup) => lookup.original_dst(pod.netns.cookie(), peer),
        None => socket::original_dst_from_conntrack(&tcp, peer).ok(),
    };
    let Some(orig) = orig.map(socket::canonical) else {
        tracing::warn!(pod = %pod.name(), %peer, "captured connection without an original destination; refusing");
        return socket::reset(tcp);
    };
    if orig.port() == OUTBOUND_PORT && orig.ip().is_loopback() {
        tracing::warn!(pod = %pod.name(), %peer, "connection addressed to the capture port itself; refusing");
        return socket::reset(tcp);
    }
    let state = proxy.state.load();
    let src = pod.current(&state);
    let route = resolve(&state, orig);
    drop(state);

    match route {
        Route::Refuse(why) => {
            tracing::info!(pod = %pod.name(), %orig, reason = %why, "outbound refused");
            socket::reset(tcp);
        }
        Route::Direct { dest, service, target } => {
            let labels = labels(&src, dest.as_deref(), service.as_deref(), target, false);
            let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, socket::connect_in(&pod.netns, target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return refuse_after_connect(tcp, &pod, target, &e.to_string()),
                Err(_) => return refuse_after_connect(tcp, &pod, target, "connect timed out"),
            };
            let conn = proxy.metrics.conn_opened(&labels);
            let mut tcp = tcp;
            let mut upstream = upstream;
            let res = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
            let (up, down) = res.as_ref().map(|(a, b)| (*a, *b)).unwrap_or((0, 0));
            conn.closed(up, down);
            access_log(
                &pod,
                peer,
                orig,
                target,
                &src.identity,
                None,
                up,
                down,
                started,
                res.err().map(|e| e.to_string()),
            );
        }
        Route::Waypoint { via, via_ip, service, target } => {
            tunnel(&proxy, &pod, &src, tcp, (peer, orig, started), &via, Some(&service), via_ip, target).await
        }
        Route::Mesh { dest, service, target } => {
            tunnel(&proxy, &pod, &src, tcp, (peer, orig, started), &dest, service.as_deref(), target.ip(), target).await
        }
    }
}

/// Carries a captured connection over HBONE to `hbone_peer` (at `hbone_ip`: the destination pod, or
/// the service's waypoint), asking for `target`, and accounts for it.
#[allow(clippy::too_many_arguments)]
async fn tunnel(
    proxy: &Arc<Proxy>,
    pod: &Arc<Pod>,
    src: &Workload,
    tcp: TcpStream,
    (peer, orig, started): (SocketAddr, SocketAddr, Instant),
    hbone_peer: &Workload,
    service: Option<&Service>,
    hbone_ip: std::net::IpAddr,
    target: SocketAddr,
) {
    let labels = labels(src, Some(hbone_peer), service, target, true);
    let (send, recv) = match open_tunnel(proxy, pod, src, hbone_peer, hbone_ip, target).await {
        Ok(t) => t,
        Err(e) => return refuse_after_connect(tcp, pod, target, &e),
    };
    let conn = proxy.metrics.conn_opened(&labels);
    let (copied, res) = hbone::copy(tcp, send, recv).await;
    conn.closed(copied.to_tunnel, copied.from_tunnel);
    access_log(
        pod,
        peer,
        orig,
        target,
        &src.identity,
        Some(&hbone_peer.identity),
        copied.to_tunnel,
        copied.from_tunnel,
        started,
        res.err().map(|e| e.to_string()),
    );
}

/// A CONNECT stream for `target` over the pooled HBONE connection to `dest` at `dest_ip` (the
/// target's own pod, or a waypoint), with one retry on a fresh connection when the pooled one
/// turned out to be dead.
async fn open_tunnel(
    proxy: &Arc<Proxy>,
    pod: &Arc<Pod>,
    src: &Workload,
    dest: &Workload,
    dest_ip: std::net::IpAddr,
    target: SocketAddr,
) -> Result<(h2::SendStream<bytes::Bytes>, h2::RecvStream), String> {
    let cert =
        proxy.certs.fetch(&src.identity).await.map_err(|e| format!("no certificate for {}: {e}", src.identity))?;
    let key = pool::Key {
        src_netns: pod.netns.cookie(),
        src: src.identity.clone(),
        dst: dest.identity.clone(),
        dst_addr: SocketAddr::new(dest_ip, HBONE_PORT),
    };
    let headers = [("baggage", baggage(src))];
    for attempt in 0..2 {
        let sender = proxy
            .pool
            .get(&key, || connect_hbone(pod, cert.clone(), &dest.identity, key.dst_addr))
            .await
            .map_err(|e| format!("HBONE to {}: {e}", key.dst_addr))?;
        match hbone::connect(sender, target, &headers).await {
            Ok(t) => return Ok(t),
            // Connection-level failure on a reused connection: drop it and try once more.
            Err(hbone::Error::H2(e)) if attempt == 0 && !e.is_reset() => {
                tracing::debug!(error = %e, dst = %key.dst_addr, "pooled HBONE connection failed; reconnecting");
                proxy.pool.evict(&key);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    unreachable!("the loop returns on its second attempt")
}

/// A new mutual-TLS HTTP/2 connection from inside the pod to `dst_addr` (the peer's 15008).
async fn connect_hbone(
    pod: &Pod,
    cert: Arc<WorkloadCert>,
    expected: &Identity,
    dst_addr: SocketAddr,
) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, socket::connect_in(&pod.netns, dst_addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(cert.client_config(std::slice::from_ref(expected)));
    // SPIFFE peers are verified by URI SAN; an IP server name keeps SNI off the wire.
    let name = ServerName::IpAddress(dst_addr.ip().into());
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
    let (sender, conn) = hbone::client_builder().handshake(tls).await.map_err(|e| format!("HTTP/2: {e}"))?;
    let dst = dst_addr;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%dst, error = %e, "HBONE connection ended");
        }
    });
    Ok(sender)
}

/// Istio's workload metadata header on CONNECT, read by waypoints and peers for telemetry.
fn baggage(w: &Workload) -> String {
    format!(
        "k8s.cluster.name=Kubernetes,k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
        w.namespace,
        w.name,
        w.labels.get("app").map(String::as_str).unwrap_or(&w.workload_name),
        w.labels.get("version").map(String::as_str).unwrap_or("latest"),
    )
}

fn labels(
    src: &Workload,
    dest: Option<&Workload>,
    service: Option<&Service>,
    target: SocketAddr,
    mtls: bool,
) -> ConnLabels {
    let mut l = ConnLabels {
        reporter: Reporter::Source,
        source: peer_labels(src),
        destination: dest.map(peer_labels).unwrap_or_default(),
        destination_service: String::new(),
        destination_service_name: String::new(),
        destination_service_namespace: String::new(),
        mtls,
        response_flags: "-",
    };
    service_labels(&mut l, service, target);
    l
}

fn refuse_after_connect(tcp: TcpStream, pod: &Pod, target: SocketAddr, why: &str) {
    tracing::warn!(pod = %pod.name(), %target, error = %why, "outbound connection failed");
    socket::reset(tcp);
}

#[allow(clippy::too_many_arguments)]
fn access_log(
    pod: &Pod,
    peer: SocketAddr,
    orig: SocketAddr,
    target: SocketAddr,
    src: &Identity,
    dst: Option<&Identity>,
    sent: u64,
    received: u64,
    started: Instant,
    error: Option<String>,
) {
    tracing::info!(
        target: "access",
        direction = "outbound",
        pod = %pod.name(),
        src.addr = %peer,
        dst.original = %orig,
        dst.addr = %target,
        src.identity = %src,
        dst.identity = dst.map(|d| d.to_string()).unwrap_or_default(),
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = started.elapsed().as_millis() as u64,
        error = error.unwrap_or_default(),
        "connection complete"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ServicePort, USE_WAYPOINT_LABEL};

    fn workload(name: &str, ip: &str) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: "demo".into(),
            service_account: name.into(),
            labels: Default::default(),
            ips: vec![ip.parse().unwrap()],
            node: None,
            uid: None,
            netns: None,
            captured: true,
            identity: Identity::new("cluster.local", "demo", name),
            workload_name: name.into(),
        })
    }

    fn service(name: &str, vip: &str, waypoint: Option<&str>, endpoints: Vec<Arc<Workload>>) -> Arc<Service> {
        Arc::new(Service {
            name: name.into(),
            namespace: "demo".into(),
            vips: vec![vip.parse().unwrap()],
            ports: vec![ServicePort { name: None, port: 80, target_port: 8080, app_protocol: None }],
            labels: waypoint.map(|w| (USE_WAYPOINT_LABEL.to_string(), w.to_string())).into_iter().collect(),
            endpoints,
        })
    }

    fn state(services: Vec<Arc<Service>>) -> State {
        State { services_by_vip: services.into_iter().map(|s| (s.vips[0], s)).collect(), ..State::default() }
    }

    #[test]
    fn service_with_waypoint_goes_to_a_waypoint_pod_with_the_vip_as_authority() {
        let wp = service("waypoint", "10.96.0.100", None, vec![workload("waypoint", "10.0.0.100")]);
        let reviews = service("reviews", "10.96.0.1", Some("waypoint"), vec![workload("reviews-v1", "10.0.0.1")]);
        let s = state(vec![wp, reviews]);
        let orig: SocketAddr = "10.96.0.1:80".parse().unwrap();
        match resolve(&s, orig) {
            Route::Waypoint { via, via_ip, service, target } => {
                assert_eq!(via.name, "waypoint");
                assert_eq!(via_ip, "10.0.0.100".parse::<std::net::IpAddr>().unwrap());
                assert_eq!(service.name, "reviews");
                assert_eq!(target, orig, "the waypoint is asked for the address the app dialled");
            }
            other => panic!("expected the waypoint route, got {other:?}"),
        }
        // The same service without the label is load-balanced by the agent itself.
        let plain = state(vec![service("reviews", "10.96.0.1", None, vec![workload("reviews-v1", "10.0.0.1")])]);
        assert!(
            matches!(resolve(&plain, orig), Route::Mesh { target, .. } if target == "10.0.0.1:8080".parse().unwrap())
        );
    }

    #[test]
    fn waypoint_without_pods_fails_closed() {
        let wp = service("waypoint", "10.96.0.100", None, vec![]);
        let reviews = service("reviews", "10.96.0.1", Some("waypoint"), vec![workload("reviews-v1", "10.0.0.1")]);
        let route = resolve(&state(vec![wp, reviews]), "10.96.0.1:80".parse().unwrap());
        assert!(matches!(&route, Route::Refuse(why) if why.contains("no ready pod")), "{route:?}");
    }
}
