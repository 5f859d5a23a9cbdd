//! Wires the node agent together — the only module that knows every other one.
//!
//! Start-up: the configuration source (local YAML file, or the Kubernetes API in cluster mode),
//! the certificate manager (in-process CA locally, `weft ca` over gRPC in a cluster), the eBPF
//! redirect (re-adopting pinned state after a restart) and the admin servers. Once the source
//! has delivered a complete snapshot, the served pods are kept equal to the snapshot's local
//! captured workloads (`reconcile`), readiness going up once all of them are enrolled.
//! SIGTERM/SIGINT drain every listener and connection; pinned eBPF state stays so pods fail
//! closed until the agent is back.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::admin::Admin;
use crate::cni::{self, PodNetnsRegistry};
use crate::config::{CaMode, Config, RedirectMode, Source};
use crate::discovery::file::{self, FileOptions};
use crate::discovery::kube::{self, KubeOptions};
use crate::drain::Drain;
use crate::identity::grpc::{self, GrpcSigner, GrpcSignerConfig};
use crate::identity::{Ca, CertManager, CertificateSigner};
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::proxy::{OriginalDst, PodHandle, Proxy};
use crate::redirect::{self, Redirect};
use crate::state::{State, StateStore, Workload};
use crate::uninstall;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mesh configuration: {0}")]
    Mesh(#[from] file::FileError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::KubeError),
    #[error("certificate authority {what}: {source}")]
    Ca { what: String, source: crate::identity::Error },
    #[error("--cni-socket {path}: {source}; is another agent running, or is the directory read-only?")]
    CniSocket { path: PathBuf, source: std::io::Error },
    #[error("--ca-root-cert {path}: {reason}; mount the weft-ca-root-cert ConfigMap there")]
    CaRoot { path: PathBuf, reason: String },
    #[error("eBPF redirect: {0}")]
    Redirect(#[from] redirect::Error),
    #[error("cannot listen on {addr}: {source}; is another weft agent running?")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
}

/// Local mode, for `weft node` and `weft waypoint` alike: the first load must succeed (a bad file is
/// a startup error naming the field), later changes are watched and a bad one keeps the last good state.
fn start_file_source(
    config: &Config,
    path: &std::path::Path,
    store: &Arc<StateStore>,
    synced: &watch::Sender<bool>,
    drain: &Drain,
) -> Result<(), Error> {
    let opts = FileOptions {
        trust_domain: config.trust_domain.clone(),
        node_name: config.node_name.clone(),
        root_namespace: config.root_namespace.clone(),
    };
    store.replace(file::load(path, &opts)?);
    synced.send_replace(true);
    tokio::spawn(file::watch(path.to_path_buf(), opts, store.clone(), drain.signaled_owned()));
    Ok(())
}

/// `weft node`: runs until SIGTERM or SIGINT.
pub async fn run_node(config: Arc<Config>) -> Result<(), Error> {
    let drain = Drain::new();
    let store = Arc::new(StateStore::new(State::default()));
    // Flips to true once the source has delivered a complete first snapshot.
    let (synced_tx, mut synced) = watch::channel(false);
    let mut cni_registry = None;
    // Cluster mode: asks, on SIGTERM, whether weft is being uninstalled from this node.
    let mut api_client = None;
    match &config.source {
        Source::File(path) => start_file_source(&config, path, &store, &synced_tx, &drain)?,
        Source::Kube { kubeconfig } => {
            let registry = Arc::new(PodNetnsRegistry::new());
            let socket = &config.cni_socket;
            let listener = cni::bind(socket).map_err(|source| Error::CniSocket { path: socket.clone(), source })?;
            tokio::spawn(cni::serve(listener, registry.clone(), drain.signaled_owned()));
            let client = kube::client(kubeconfig.as_deref()).await?;
            api_client = Some(client.clone());
            // Events on objects the snapshots leave out (bad policies), off the data path.
            let reporter =
                kube::report::Reporter::spawn(client.clone(), kube::report::NODE_CONTROLLER, &config.node_name);
            kube::report::install(reporter);
            let opts = KubeOptions {
                trust_domain: config.trust_domain.clone(),
                node_name: config.node_name.clone(),
                root_namespace: config.root_namespace.clone(),
            };
            // A pod's IPs from its CNI ADD stand in until kubelet reports them, so the ADD can be
            // answered (the pod enrolled) before the API shows the pod with an address.
            let local = kube::LocalAddresses { known: registry.clone(), changes: registry.subscribe() };
            cni_registry = Some(registry);
            let source =
                kube::run_with_local_addresses(client, opts, local, store.clone(), synced_tx, drain.signaled_owned());
            tokio::spawn(source);
        }
    }
    let certs = cert_manager(&config)?;
    let metrics = Arc::new(Metrics::new());

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
    // The bulk of startup's code (argument parsing, the eBPF loader and its BTF relocations) has
    // run: release it now, before the first snapshot of a large cluster reaches its peak, and
    // once more after readiness (below).
    tokio::task::spawn_blocking(crate::reclaim::release_startup_pages);
    let orig_dst = redirect.clone().map(|r| Arc::new(EbpfOriginalDst(r)) as Arc<dyn OriginalDst>);
    let proxy = Proxy::new(store.clone(), certs.clone(), metrics.clone(), orig_dst);

    let admin = Arc::new(Admin { metrics, state: store.clone(), certs, ready: false.into() });
    for addr in [config.metrics_addr, config.ready_addr, config.admin_addr] {
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })?;
        tokio::spawn(admin.clone().serve(listener, drain.clone()));
    }

    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    // Nothing is enrolled or unenrolled before the first complete snapshot: after a restart an
    // empty state would otherwise unenroll every pinned pod and open a plaintext window.
    tokio::select! {
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
        _ = synced.wait_for(|s| *s) => {}
    }
    // A pod handed over by the CNI plugin is a change to reconcile, like a new snapshot.
    let mut cni_changes = match &cni_registry {
        Some(r) => r.subscribe(),
        None => watch::channel(0).1,
    };
    let mut pods = Pods {
        proxy,
        redirect,
        certs: admin.certs.clone(),
        cni: cni_registry,
        served: HashMap::new(),
        drain: drain.clone(),
        config: config.clone(),
        scan_pending: false,
        last_scan: None,
    };
    pods.adopt_pinned(&store.load());
    let mut changes = store.subscribe();
    let mut startup_pages_released = false;
    loop {
        let all_enrolled = pods.reconcile(&store.load()).await;
        admin.ready.store(all_enrolled, Ordering::Release);
        if all_enrolled && !startup_pages_released {
            startup_pages_released = true;
            // Readiness is not quite the end of startup: the enrolled pods' certificates are
            // being issued right now. Release once that has settled.
            tokio::spawn(async {
                tokio::time::sleep(crate::reclaim::SETTLE_AFTER_READY).await;
                tokio::task::spawn_blocking(crate::reclaim::release_startup_pages);
            });
        }
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            r = changes.changed() => if r.is_err() { break },
            Ok(()) = cni_changes.changed() => {}
            // Retry pods that failed to enroll (netns not there yet, …) or whose netns the scan
            // has not found yet.
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)), if !all_enrolled || pods.scan_pending => {}
        }
    }
    admin.ready.store(false, Ordering::Release);
    let removal = match (&api_client, &config.self_pod) {
        (Some(client), Some(me)) => uninstall_verdict(client, me, &config).await,
        _ => None,
    };
    tracing::info!(timeout = ?config.drain_timeout, "draining");
    let left = drain.drain_and_wait(config.drain_timeout).await;
    tracing::info!(connections_cut = left, "stopped");
    if let Some(inst) = removal {
        // Only now, with the tunnels drained: from here on enrolled pods' traffic flows plainly.
        match uninstall::remove_redirect(&inst) {
            Ok(()) => tracing::info!(pin_dir = %config.bpf_pin_dir.display(), "eBPF programs detached and unpinned"),
            Err(e) => tracing::error!(error = %e, "uninstall incomplete"),
        }
    }
    Ok(())
}

/// On SIGTERM in cluster mode: whether this is an uninstall (see [`uninstall`]). If it is, the
/// CNI plugin is removed at once, so no new pod waits for this agent; the eBPF programs are left
/// for the caller to remove after the drain.
async fn uninstall_verdict(
    client: &::kube::Client,
    me: &uninstall::SelfPod,
    config: &Config,
) -> Option<uninstall::Installation> {
    match uninstall::decide(client, me).await {
        uninstall::Verdict::Keep(reason) => {
            tracing::info!(%reason, "leaving the CNI plugin and eBPF programs in place");
            None
        }
        uninstall::Verdict::Remove(reason) => {
            tracing::info!(%reason, "weft is being uninstalled from this node: removing the CNI plugin and eBPF programs");
            let inst = uninstall::Installation {
                cni_conf_dir: config.cni_conf_dir.clone(),
                cni_bin_dir: config.cni_bin_dir.clone(),
                redirect: matches!(config.redirect, RedirectMode::Ebpf).then(|| redirect::Options {
                    pin_dir: config.bpf_pin_dir.clone(),
                    cgroup: config.cgroup.clone(),
                    per_connection_events: config.bpf_connection_events,
                }),
            };
            match uninstall::remove_cni(&inst) {
                Ok(removed) => tracing::info!(
                    conf_dir = %inst.cni_conf_dir.display(), removed, "CNI plugin entry and binary removed"
                ),
                Err(e) => tracing::error!(error = %e, "uninstall incomplete"),
            }
            Some(inst)
        }
    }
}

/// `weft waypoint`: the L7 proxy for Gateway `namespace/name`. Same sources, CA modes, admin ports,
/// signals and drain as `weft node`; runs until SIGTERM or SIGINT.
pub async fn run_waypoint(config: Arc<crate::config::WaypointConfig>) -> Result<(), Error> {
    use crate::waypoint::{Options, Waypoint, WaypointId};
    let base = &config.base;
    let drain = Drain::new();
    let store = Arc::new(StateStore::new(State::default()));
    let (synced_tx, mut synced) = watch::channel(false);
    let mut reporting = None;
    match &base.source {
        Source::File(path) => start_file_source(base, path, &store, &synced_tx, &drain)?,
        Source::Kube { kubeconfig } => {
            // The kube source watches every namespace; the node name only selects pods to capture,
            // which a waypoint does not do.
            let client = kube::client(kubeconfig.as_deref()).await?;
            reporting = Some(client.clone());
            let opts = KubeOptions {
                trust_domain: base.trust_domain.clone(),
                node_name: base.node_name.clone(),
                root_namespace: base.root_namespace.clone(),
            };
            tokio::spawn(kube::run(client, opts, store.clone(), synced_tx, drain.signaled_owned()));
        }
    }
    let certs = cert_manager(base)?;
    let identity = crate::identity::Identity::new(&base.trust_domain, &config.namespace, &config.service_account);
    let me = WaypointId { namespace: config.namespace.clone(), name: config.name.clone() };
    let waypoint = Waypoint::new(Options {
        me: me.clone(),
        identity: identity.clone(),
        root_namespace: base.root_namespace.clone(),
        certs: certs.clone(),
        state: store.clone(),
    });
    tokio::spawn(waypoint.clone().watch(drain.clone()));
    if let Some(client) = reporting {
        // Events on bad configuration and HTTPRoute status (cluster mode), off the data path.
        let instance = std::env::var("HOSTNAME").unwrap_or_else(|_| me.to_string());
        let reporter = kube::report::Reporter::spawn(client.clone(), kube::report::WAYPOINT_CONTROLLER, &instance);
        let compile = waypoint_problems(me.clone(), base.root_namespace.clone());
        let ids = (me.namespace.clone(), me.name.clone());
        let shutdown = drain.signaled_owned();
        tokio::spawn(kube::report::watch_waypoint(client, store.clone(), ids, reporter, compile, shutdown));
    }

    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })
    };
    drain.spawn(waypoint.clone().serve_hbone(bind(config.hbone_addr).await?, drain.clone()));
    if let Some(addr) = config.http_listen {
        drain.spawn(waypoint.clone().serve_http(bind(addr).await?, drain.clone()));
    }
    for addr in [base.metrics_addr, base.ready_addr, base.admin_addr] {
        tokio::spawn(waypoint.clone().serve_admin(bind(addr).await?, drain.clone()));
    }
    tracing::info!(waypoint = %me, %identity, hbone = %config.hbone_addr, http = ?config.http_listen, "waypoint listening");

    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    tokio::select! {
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
        _ = synced.wait_for(|s| *s) => {}
    }
    // The first snapshot is in: compile it now rather than wait for the next change.
    waypoint.rebuild();
    // A certificate before readiness: the first tunnel should not wait for the CA.
    if let Err(e) = certs.fetch(&identity).await {
        tracing::warn!(%identity, error = %e, "no waypoint certificate yet; HBONE handshakes will retry it");
    }
    waypoint.ready.store(true, Ordering::Release);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(timeout = ?base.drain_timeout, "draining");
    waypoint.ready.store(false, Ordering::Release);
    let left = drain.drain_and_wait(base.drain_timeout).await;
    tracing::info!(connections_cut = left, "stopped");
    Ok(())
}

/// What a waypoint's compilers reject, for its Events and HTTPRoute status: a compile of its own,
/// beside the serving one, so the data path is not involved.
fn waypoint_problems(
    me: crate::waypoint::WaypointId,
    root_namespace: String,
) -> impl Fn(&State) -> Vec<kube::report::Problem> + Send {
    use crate::waypoint::{cluster::Clusters, ratelimit::RateLimits, route::RouteTable};
    move |state| {
        let (_, mut errors) = RouteTable::build(state, &me);
        errors.extend(Clusters::new().update(state, &me));
        errors.extend(RateLimits::with_root_namespace(&root_namespace).update(state, &me));
        let rules = &state.routing.authorization_policies;
        let (_, policy) = crate::policy::l7::L7Policies::compile(rules, &me.namespace, &me.name, &root_namespace);
        let problem = |e: &crate::waypoint::ConfigError| {
            kube::report::Problem::new(e.kind, &e.namespace, &e.name, &e.field, &e.reason)
        };
        errors.iter().map(problem).chain(policy.iter().map(kube::report::Problem::from)).collect()
    }
}

/// Local mode: the in-process CA. Cluster mode: `weft ca` over gRPC, trusted through the mesh root.
fn cert_manager(config: &Config) -> Result<Arc<CertManager>, Error> {
    let (signer, roots): (Arc<dyn CertificateSigner>, _) = match &config.ca {
        CaMode::Local => {
            let ca = Ca::load_or_create(&config.state_dir, &config.trust_domain)
                .map_err(|source| Error::Ca { what: config.state_dir.display().to_string(), source })?;
            let roots = vec![ca.root()];
            (Arc::new(ca), roots)
        }
        CaMode::Remote { address, root_cert, token_path } => {
            let what = || format!("{address} (root {})", root_cert.display());
            let pem = std::fs::read(root_cert)
                .map_err(|e| Error::CaRoot { path: root_cert.clone(), reason: e.to_string() })?;
            let roots: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|e| Error::CaRoot { path: root_cert.clone(), reason: e.to_string() })?;
            if roots.is_empty() {
                return Err(Error::CaRoot { path: root_cert.clone(), reason: "no PEM certificate in it".into() });
            }
            let signer = GrpcSigner::new(GrpcSignerConfig {
                address: address.clone(),
                server_name: config.ca_server_name.clone(),
                roots: roots.clone(),
                token_path: token_path.clone(),
                timeout: grpc::DEFAULT_TIMEOUT,
            })
            .map_err(|source| Error::Ca { what: what(), source })?;
            (Arc::new(signer), roots)
        }
    };
    Ok(CertManager::new(signer, roots, config.trust_domain.clone(), config.cert_ttl))
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
    /// Cluster mode: network namespaces handed over by the CNI plugin.
    cni: Option<Arc<PodNetnsRegistry>>,
    served: HashMap<PodKey, Served>,
    drain: Drain,
    config: Arc<Config>,
    /// Captured pods here whose netns neither a CNI ADD nor the last `/proc` scan gave.
    scan_pending: bool,
    last_scan: Option<std::time::Instant>,
}

/// Least time between two `/proc` scans for running pods' network namespaces.
const SCAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Pods {
    /// Cluster mode: captured pods of this node with no netns on record are running pods that
    /// get no CNI ADD (their namespace was labelled after they started, or the agent restarted):
    /// their netns is found from their cgroup ([`cni::scan_pods_netns`], one pass over `/proc`)
    /// and registered like an ADD's.
    fn find_running_pods(&mut self, state: &State) {
        let Some(registry) = &self.cni else { return };
        let local = state.local_captured(&self.config.node_name);
        // A scanned record outlives nothing: once its pod leaves the mesh here it is dropped, so
        // a later enrolment scans again rather than trust a `/proc/<pid>` path that may be gone.
        for (pod, e) in registry.snapshot().iter() {
            let captured = local.iter().any(|w| w.namespace == pod.namespace && w.name == pod.name);
            if e.pod.source == cni::Source::Scan && !captured {
                registry.remove(&pod.namespace, &pod.name, None);
            }
        }
        let missing: Vec<Arc<Workload>> = local
            .into_iter()
            .filter(|w| w.netns.is_none() && w.uid.is_some() && registry.get(&w.namespace, &w.name).is_none())
            .collect();
        self.scan_pending = !missing.is_empty();
        if missing.is_empty() || self.last_scan.is_some_and(|t| t.elapsed() < SCAN_INTERVAL) {
            return;
        }
        self.last_scan = Some(std::time::Instant::now());
        let found = cni::scan_pods_netns();
        let mut still_missing = 0;
        for w in missing {
            let uid = w.uid.clone().unwrap_or_default().to_ascii_lowercase();
            let Some(netns) = found.get(&uid) else {
                still_missing += 1;
                continue;
            };
            tracing::info!(pod = %format!("{}/{}", w.namespace, w.name), netns = %netns.display(), "running pod found by its cgroup");
            let entry = cni::PodNetns {
                netns: netns.clone(),
                uid,
                container_id: None,
                ips: w.ips.clone(),
                source: cni::Source::Scan,
            };
            registry.register(cni::PodRef::new(w.namespace.clone(), w.name.clone()), entry);
        }
        self.scan_pending = still_missing > 0;
    }

    /// After a restart, pinned maps may list pods that left while the agent was down.
    fn adopt_pinned(&self, state: &State) {
        let Some(redirect) = &self.redirect else { return };
        let wanted: Vec<u64> = state
            .local_captured(&self.config.node_name)
            .iter()
            .filter_map(|w| Netns::open(self.netns_of(w)?).ok().map(|n| n.cookie()))
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

    /// A pod's network namespace: from the mesh file (local mode) or from the CNI plugin.
    fn netns_of(&self, w: &Workload) -> Option<PathBuf> {
        w.netns.clone().or_else(|| self.cni.as_ref()?.get(&w.namespace, &w.name))
    }

    /// Serves exactly the local captured pods of `state` whose network namespace is known.
    /// Returns whether all of those are enrolled.
    async fn reconcile(&mut self, state: &State) -> bool {
        self.find_running_pods(state);
        let desired: HashMap<PodKey, _> = state
            .local_captured(&self.config.node_name)
            .into_iter()
            .filter_map(|w| {
                let netns = self.netns_of(&w)?;
                let key = PodKey { namespace: w.namespace.clone(), name: w.name.clone(), netns, ips: w.ips.clone() };
                Some((key, w))
            })
            .collect();
        if let Some(cni) = &self.cni {
            // Answer the plugin's waiting ADDs: pods the state knows are not in the mesh may
            // start now; undecided ones wait (their ADD times out and the runtime retries).
            for (pod, _) in cni.snapshot().iter() {
                let captured = desired.keys().any(|k| k.namespace == pod.namespace && k.name == pod.name);
                if !captured && state.known_not_captured(&pod.namespace, &pod.name) {
                    cni.mark_not_captured(&pod.namespace, &pod.name);
                }
            }
        }

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
                    if let Some(cni) = &self.cni {
                        cni.mark_enrolled(&key.namespace, &key.name, &key.netns);
                    }
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

    async fn enroll(&self, key: &PodKey, workload: Arc<Workload>) -> Result<Served, String> {
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
