//! Wires the node agent together — the only module that knows every other one.
//!
//! Start-up: load the mesh, the CA and the certificate manager, the eBPF redirect (re-adopting
//! pinned state after a restart), the admin servers; then keep the set of served pods equal to
//! the snapshot's local captured workloads (`reconcile`), readiness going up once all of them are
//! enrolled. SIGTERM/SIGINT drain every listener and connection; pinned eBPF state stays so pods
//! fail closed until the agent is back.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::Admin;
use crate::config::{Config, RedirectMode};
use crate::discovery::file::{self, FileOptions};
use crate::drain::Drain;
use crate::identity::{Ca, CertManager};
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::proxy::{OriginalDst, PodHandle, Proxy};
use crate::redirect::{self, Redirect};
use crate::state::{State, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mesh configuration: {0}")]
    Mesh(#[from] file::FileError),
    #[error("certificate authority in {dir}: {source}")]
    Ca { dir: PathBuf, source: crate::identity::Error },
    #[error("eBPF redirect: {0}")]
    Redirect(#[from] redirect::Error),
    #[error("cannot listen on {addr}: {source}; is another weft agent running?")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
}

/// `weft node`: runs until SIGTERM or SIGINT.
pub async fn run_node(config: Arc<Config>) -> Result<(), Error> {
    let file_opts = FileOptions {
        trust_domain: config.trust_domain.clone(),
        node_name: config.node_name.clone(),
        root_namespace: config.root_namespace.clone(),
    };
    let store = Arc::new(StateStore::new(file::load(&config.mesh_file, &file_opts)?));
    let ca = Ca::load_or_create(&config.state_dir, &config.trust_domain)
        .map_err(|source| Error::Ca { dir: config.state_dir.clone(), source })?;
    let roots = vec![ca.root()];
    let certs = CertManager::new(Arc::new(ca), roots, config.trust_domain.clone(), config.cert_ttl);
    let metrics = Arc::new(Metrics::new());
    let drain = Drain::new();

    let redirect = match config.redirect {
        RedirectMode::Ebpf => {
            let r = Arc::new(Redirect::load(&redirect::Options {
                pin_dir: config.bpf_pin_dir.clone(),
                cgroup: config.cgroup.clone(),
                per_connection_events: config.bpf_connection_events,
            })?);
            r.spawn_log_forwarding(drain.signaled_owned());
            Some(r)
        }
        RedirectMode::Iptables => None,
    };
    let orig_dst = redirect.clone().map(|r| Arc::new(EbpfOriginalDst(r)) as Arc<dyn OriginalDst>);
    let proxy = Proxy::new(store.clone(), certs.clone(), metrics.clone(), orig_dst);

    let admin = Arc::new(Admin { metrics, state: store.clone(), certs, ready: false.into() });
    for addr in [config.metrics_addr, config.ready_addr, config.admin_addr] {
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })?;
        tokio::spawn(admin.clone().serve(listener, drain.clone()));
    }

    tokio::spawn(file::watch(config.mesh_file.clone(), file_opts, store.clone(), drain.signaled_owned()));

    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let mut pods = Pods { proxy, redirect, certs: admin.certs.clone(), served: HashMap::new(), drain: drain.clone(), config: config.clone() };
    pods.adopt_pinned(&store.load());
    let mut changes = store.subscribe();
    loop {
        let all_enrolled = pods.reconcile(&store.load()).await;
        admin.ready.store(all_enrolled, Ordering::Release);
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            r = changes.changed() => if r.is_err() { break },
            // Retry pods that failed to enroll (netns not there yet, …).
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)), if !all_enrolled => {}
        }
    }
    tracing::info!(timeout = ?config.drain_timeout, "draining");
    admin.ready.store(false, Ordering::Release);
    let left = drain.drain_and_wait(config.drain_timeout).await;
    tracing::info!(connections_cut = left, "stopped");
    Ok(())
}

/// eBPF maps as the proxy's source of original destinations.
struct EbpfOriginalDst(Arc<Redirect>);

impl OriginalDst for EbpfOriginalDst {
    fn original_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        self.0.original_dst(netns_cookie, peer)
    }
}

/// Identity of a served pod: re-create its listeners when any of this changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PodKey {
    namespace: String,
    name: String,
    netns: PathBuf,
    ips: Vec<IpAddr>,
}

struct Served {
    handle: PodHandle,
    cookie: u64,
}

struct Pods {
    proxy: Arc<Proxy>,
    redirect: Option<Arc<Redirect>>,
    certs: Arc<CertManager>,
    served: HashMap<PodKey, Served>,
    drain: Drain,
    config: Arc<Config>,
}

impl Pods {
    /// After a restart, pinned maps may list pods that left while the agent was down.
    fn adopt_pinned(&self, state: &State) {
        let Some(redirect) = &self.redirect else { return };
        let wanted: Vec<u64> = state
            .local_captured(&self.config.node_name)
            .iter()
            .filter_map(|w| Netns::open(w.netns.as_ref()?).ok().map(|n| n.cookie()))
            .collect();
        match redirect.enrolled() {
            Ok(cookies) => {
                for stale in cookies.into_iter().filter(|c| !wanted.contains(c)) {
                    tracing::info!(netns_cookie = stale, "unenrolling a pod that left while the agent was down");
                    if let Err(e) = redirect.unenroll(stale, &[]) {
                        tracing::warn!(netns_cookie = stale, error = %e, "cannot unenroll stale pod");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read enrolled pods from pinned maps"),
        }
    }

    /// Serves exactly the local captured pods of `state`. Returns whether all are enrolled.
    async fn reconcile(&mut self, state: &State) -> bool {
        let desired: HashMap<PodKey, _> = state
            .local_captured(&self.config.node_name)
            .into_iter()
            .filter_map(|w| {
                let key = PodKey { namespace: w.namespace.clone(), name: w.name.clone(), netns: w.netns.clone()?, ips: w.ips.clone() };
                Some((key, w))
            })
            .collect();

        let gone: Vec<PodKey> = self.served.keys().filter(|k| !desired.contains_key(*k)).cloned().collect();
        for key in gone {
            let served = self.served.remove(&key).expect("key listed above");
            if let Some(r) = &self.redirect
                && let Err(e) = r.unenroll(served.cookie, &key.ips)
            {
                tracing::warn!(pod = %format!("{}/{}", key.namespace, key.name), error = %e, "unenroll failed");
            }
            self.proxy.forget_pod(served.cookie);
            let identity = &served.handle.workload().identity;
            if !self.served.values().any(|s| &s.handle.workload().identity == identity) {
                // No pod here uses it any more: stop rotating its certificate.
                self.certs.forget(identity);
            }
            tracing::info!(pod = %format!("{}/{}", key.namespace, key.name), "pod left the mesh");
            served.handle.stop(self.config.drain_timeout).await;
        }

        let mut all = true;
        for (key, workload) in desired {
            if self.served.contains_key(&key) {
                continue;
            }
            let pod = format!("{}/{}", key.namespace, key.name);
            match self.enroll(&key, workload).await {
                Ok(served) => {
                    tracing::info!(%pod, netns_cookie = served.cookie, "pod enrolled");
                    self.served.insert(key, served);
                }
                Err(e) => {
                    all = false;
                    tracing::warn!(%pod, error = %e, "cannot enroll pod yet; will retry");
                }
            }
        }
        all
    }

    async fn enroll(&self, key: &PodKey, workload: Arc<crate::state::Workload>) -> Result<Served, String> {
        let netns = Arc::new(Netns::open(&key.netns).map_err(|e| e.to_string())?);
        let cookie = netns.cookie();
        let handle = self.proxy.start_pod(workload, netns.clone(), &self.drain).map_err(|e| e.to_string())?;
        if let Some(r) = &self.redirect
            && let Err(e) = r.enroll(&netns, &key.ips, handle.inbound_plaintext_fd())
        {
            // Release the listeners so the retry can bind them again.
            handle.stop(std::time::Duration::ZERO).await;
            return Err(e.to_string());
        }
        Ok(Served { handle, cookie })
    }
}
