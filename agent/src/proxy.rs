//! The L4 data plane: per-pod listeners inside each enrolled pod's network namespace and the
//! HBONE tunnel between pods.
//!
//! For every captured pod on this node, `start_pod` binds, inside the pod's netns:
//! - `127.0.0.1:15001` / `[::1]:15001` — outbound capture (the eBPF connect hook sends the app's
//!   connects here); see `outbound`.
//! - `[::]:15008` — HBONE: mutual TLS + HTTP/2 CONNECT from other pods' agents; see `inbound`.
//! - `[::]:15006` — plaintext inbound steered here by sk_lookup: refused under STRICT, passed
//!   to the app under PERMISSIVE; see `inbound`.
//!
//! The proxy reads `state` and `policy` per connection and gets certificates from `identity`.
//! It does not load eBPF (that is `redirect`; the original destination comes in through the
//! `OriginalDst` trait) and it does not decide which pods are captured (that is `app`).

pub mod hbone;
mod inbound;
mod outbound;
pub mod pool;
pub mod socket;

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::drain::Drain;
use crate::identity::CertManager;
use crate::metrics::{self, Metrics};
use crate::netns::Netns;
use crate::state::{Service, State, StateStore, Workload};
use weft_ebpf_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

/// TLS handshakes that take longer than this are abandoned (slowloris on 15008).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout towards peers and apps.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the original destination of a captured outbound connection comes from.
pub trait OriginalDst: Send + Sync + 'static {
    /// `netns_cookie`: the pod's; `peer`: the accepted socket's peer address.
    fn original_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr>;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {pod}: cannot listen on {addr} inside its network namespace: {source}; is another agent running?")]
    Listen { pod: String, addr: SocketAddr, source: io::Error },
}

/// Shared context of every listener and connection.
pub struct Proxy {
    state: Arc<StateStore>,
    certs: Arc<CertManager>,
    metrics: Arc<Metrics>,
    /// `None`: the classic path — iptables REDIRECT, original destination from conntrack.
    orig_dst: Option<Arc<dyn OriginalDst>>,
    pool: pool::Pool,
}

/// A pod the proxy serves, as its connection handlers see it.
struct Pod {
    /// The workload when the pod was enrolled; handlers prefer the current snapshot's copy so
    /// label changes apply without re-creating listeners.
    workload: Arc<Workload>,
    netns: Arc<Netns>,
}

impl Pod {
    fn name(&self) -> String {
        format!("{}/{}", self.workload.namespace, self.workload.name)
    }

    /// This pod's workload in the given snapshot (fresh labels), falling back to the enrolled copy.
    fn current(&self, state: &State) -> Arc<Workload> {
        self.workload
            .ips
            .first()
            .and_then(|ip| state.workload_by_ip(*ip))
            .filter(|w| w.name == self.workload.name && w.namespace == self.workload.namespace)
            .cloned()
            .unwrap_or_else(|| self.workload.clone())
    }
}

/// The listeners of one pod; dropping it does not stop them, `stop` does.
pub struct PodHandle {
    pod: Arc<Pod>,
    drain: Drain,
    inbound_plaintext: Arc<TcpListener>,
}

impl PodHandle {
    pub fn workload(&self) -> &Arc<Workload> {
        &self.pod.workload
    }

    pub fn netns(&self) -> &Arc<Netns> {
        &self.pod.netns
    }

    /// The 15006 listener, for the sk_lookup socket map.
    pub fn inbound_plaintext_fd(&self) -> BorrowedFd<'_> {
        self.inbound_plaintext.as_fd()
    }

    /// Stops accepting and gives in-flight connections `deadline` to finish.
    pub async fn stop(self, deadline: Duration) {
        let left = self.drain.drain_and_wait(deadline).await;
        if left > 0 {
            tracing::info!(pod = %self.pod.name(), connections = left, "pod left the mesh; connections still open were closed");
        }
    }
}

impl Proxy {
    pub fn new(
        state: Arc<StateStore>,
        certs: Arc<CertManager>,
        metrics: Arc<Metrics>,
        orig_dst: Option<Arc<dyn OriginalDst>>,
    ) -> Arc<Self> {
        Arc::new(Proxy { state, certs, metrics, orig_dst, pool: pool::Pool::default() })
    }

    /// Binds the pod's listeners inside its network namespace and starts serving them.
    pub fn start_pod(
        self: &Arc<Self>,
        workload: Arc<Workload>,
        netns: Arc<Netns>,
        parent: &Drain,
    ) -> Result<PodHandle, Error> {
        let pod = Arc::new(Pod { workload, netns });
        let listen = |addr: SocketAddr, dual: bool| {
            socket::listen_in(&pod.netns, addr, dual).map_err(|source| Error::Listen { pod: pod.name(), addr, source })
        };
        let out4 = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)), false)?;
        // A pod without IPv6 has no ::1; IPv4 capture still works.
        let out6 = match listen(SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)), false) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!(error = %e, "no IPv6 outbound listener");
                None
            }
        };
        let hbone = listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, HBONE_PORT)), true)?;
        let plain = Arc::new(listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT)), true)?);

        let drain = parent.child();
        for l in std::iter::once(out4).chain(out6).map(Arc::new) {
            let (p, pod) = (self.clone(), pod.clone());
            drain.spawn(accept_loop(l, drain.clone(), move |tcp, peer, d| {
                outbound::handle(p.clone(), pod.clone(), tcp, peer, d)
            }));
        }
        let (p, pd) = (self.clone(), pod.clone());
        drain.spawn(accept_loop(Arc::new(hbone), drain.clone(), move |tcp, peer, d| {
            inbound::handle_hbone(p.clone(), pd.clone(), tcp, peer, d)
        }));
        let (p, pd) = (self.clone(), pod.clone());
        drain.spawn(accept_loop(plain.clone(), drain.clone(), move |tcp, peer, d| {
            inbound::handle_plaintext(p.clone(), pd.clone(), tcp, peer, d)
        }));
        // Have the certificate before the first connection needs it.
        let (certs, id) = (self.certs.clone(), pod.workload.identity.clone());
        drain.spawn(async move {
            if let Err(e) = certs.fetch(&id).await {
                tracing::warn!(identity = %id, error = %e, "cannot fetch workload certificate yet; will retry on first use");
            }
        });
        tracing::info!(pod = %pod.name(), ips = ?pod.workload.ips, netns = %pod.netns.path().display(), "pod listeners up");
        Ok(PodHandle { pod, drain, inbound_plaintext: plain })
    }

    /// Forgets pooled connections of a pod that left.
    pub fn forget_pod(&self, netns_cookie: u64) {
        self.pool.evict_netns(netns_cookie);
    }
}

/// Accepts until drained; each connection runs as a tracked task.
async fn accept_loop<H, F>(listener: Arc<TcpListener>, drain: Drain, handler: H)
where
    H: Fn(TcpStream, SocketAddr, Drain) -> F + Send,
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = drain.signaled() => return,
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    drain.spawn(handler(tcp, socket::canonical(peer), drain.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Istio's labels for one side of a connection (also the waypoint's).
pub(crate) fn peer_labels(w: &Workload) -> metrics::Peer {
    let label = |k: &str| w.labels.get(k).cloned();
    metrics::Peer {
        workload: w.workload_name.clone(),
        namespace: w.namespace.clone(),
        principal: w.identity.to_string(),
        app: label("app").or_else(|| label("app.kubernetes.io/name")).unwrap_or_else(|| metrics::UNKNOWN.into()),
        version: label("version")
            .or_else(|| label("app.kubernetes.io/version"))
            .unwrap_or_else(|| metrics::UNKNOWN.into()),
        canonical_service: label("service.istio.io/canonical-name")
            .or_else(|| label("app.kubernetes.io/name"))
            .or_else(|| label("app"))
            .unwrap_or_else(|| w.workload_name.clone()),
        canonical_revision: label("service.istio.io/canonical-revision")
            .or_else(|| label("app.kubernetes.io/version"))
            .or_else(|| label("version"))
            .unwrap_or_else(|| "latest".into()),
    }
}

/// `destination_service*` labels: the service when one was addressed, else the best guess.
fn service_labels(labels: &mut metrics::ConnLabels, service: Option<&Service>, dest: SocketAddr) {
    match service {
        Some(s) => {
            labels.destination_service = s.hostname();
            labels.destination_service_name = s.name.clone();
            labels.destination_service_namespace = s.namespace.clone();
        }
        None => {
            labels.destination_service = dest.ip().to_string();
            labels.destination_service_name = metrics::UNKNOWN.into();
            labels.destination_service_namespace = metrics::UNKNOWN.into();
        }
    }
}
