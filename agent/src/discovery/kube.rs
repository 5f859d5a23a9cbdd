//! The cluster source: kube-rs reflectors over the Kubernetes API turned into the same
//! [`State`] the local file source builds, kept current as objects change.
//!
//! Owns: which objects are watched and how much of each is kept, the debounced rebuild, readiness
//! (every reflector listed once), and reconnecting. Does not own: the per-object rules (shared with
//! the file source in `file::build`, so the same objects give the same snapshot), policy semantics
//! (`policy`), the client's credentials (the caller builds the [`kube::Client`], e.g. with
//! [`client`]), or Events and status conditions on bad objects ([`report`]: bad objects are left
//! out with a log line naming the field, and an Event once a reporter is installed).
//!
//! What is watched, cluster-wide:
//! - Pods: all of them, because the data plane needs remote pods too (the identity and labels of
//!   a destination IP). Memory stays low because only the fields the agent uses are read from the
//!   API's JSON ([`trim::KeptPod`]) and kept as a compact [`records::PodRecord`] (name,
//!   namespace, labels, uid, service account, node, host network, named container ports, phase
//!   and IPs; shared strings and label sets stored once). A metadata-only watch cannot be used:
//!   IPs, node and service account live in spec and status. Which pods this node serves is decided by `spec.nodeName` in
//!   [`State::local_captured`]. Pods' network namespaces are unknown here (`Workload::netns` stays
//!   `None`): the CNI plugin supplies them.
//! - Namespaces: metadata only (name and labels, for `istio.io/dataplane-mode=ambient`). All of
//!   them rather than a label-selected subset, so `State::namespaces` is what the file source gives.
//! - Services and `discovery.k8s.io/v1` EndpointSlices: a service's endpoints come from its
//!   slices when it has any (ready endpoints whose address is a known pod), and from its selector
//!   otherwise. Kept as compact records too ([`records`]): with pods, the kinds that grow with
//!   the cluster. The other kinds live in kube-rs reflector stores, trimmed ([`trim`]).
//! - `security.istio.io/v1` AuthorizationPolicy and PeerAuthentication, `networking.istio.io`
//!   VirtualService and DestinationRule (`v1`) and EnvoyFilter (`v1alpha3`), and
//!   `gateway.networking.k8s.io/v1` Gateway and HTTPRoute: read untyped and parsed one by one, so a
//!   single malformed object is left out (logged with its field) instead of failing the whole
//!   list. A CRD that is not installed counts as "no objects" (logged once, as a warning naming the
//!   CRD): the first sync does not wait for it, and its objects appear once it is installed. The
//!   traffic-management kinds only feed [`crate::state::RoutingConfig`] (waypoints compile them).
//!
//! ServiceAccounts are not watched: a pod's identity only needs the name in its spec, and the API
//! server's admission already checked that it exists.
//!
//! Each change schedules a rebuild after [`DEBOUNCE`] of quiet (at most [`MAX_DELAY`] after the
//! first change), which replaces the whole snapshot. When the API server goes away the watchers
//! retry with kube's default backoff (0.8 s doubling to 30 s, jittered) and the last snapshot stays
//! in force; a watch whose resourceVersion is gone (410) relists, and the store keeps its old
//! content until the relist completes.

mod build;
mod records;
pub mod report;
#[cfg(test)]
mod tests;
mod trim;

use std::collections::HashSet;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DynamicObject, PartialObjectMeta};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::time::Instant;

use self::records::{PodRecord, Record, Records, ServiceRecord, SliceRecord};
use crate::state::{State, StateStore};

/// Quiet time after a change before the snapshot is rebuilt: a burst (a relist, a rollout) is
/// applied once.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// Longest a change waits for a rebuild while changes keep coming.
pub const MAX_DELAY: Duration = Duration::from_millis(250);

/// Objects per page of an initial list.
const LIST_PAGE_SIZE: u32 = 100;

/// What the API server does not say and the agent knows.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// SPIFFE trust domain of every workload (`cluster.local` unless configured).
    pub trust_domain: String,
    /// This node's name (`spec.nodeName` of the pods it serves).
    pub node_name: String,
    /// Istio's root namespace: policies there apply mesh-wide.
    pub root_namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "cannot read kubeconfig {path}: {source}; check --kubeconfig, or run in a pod with a ServiceAccount token mounted"
    )]
    Kubeconfig { path: String, source: kube::config::KubeconfigError },
    #[error(
        "no Kubernetes configuration found: {0}; run in a pod (in-cluster service account), set $KUBECONFIG or pass --kubeconfig"
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client: {0}; check the cluster URL and certificates in the kubeconfig")]
    Client(#[from] kube::Error),
}

/// A client from `kubeconfig` when given, else inferred: in-cluster service account first, then
/// `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| KubeError::Kubeconfig { path: path.display().to_string(), source };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.map_err(err)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// The watched kinds, for logs and readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Pods,
    Namespaces,
    Services,
    EndpointSlices,
    AuthorizationPolicies,
    PeerAuthentications,
    VirtualServices,
    DestinationRules,
    EnvoyFilters,
    Gateways,
    HttpRoutes,
}

const KINDS: [Kind; 11] = [
    Kind::Pods,
    Kind::Namespaces,
    Kind::Services,
    Kind::EndpointSlices,
    Kind::AuthorizationPolicies,
    Kind::PeerAuthentications,
    Kind::VirtualServices,
    Kind::DestinationRules,
    Kind::EnvoyFilters,
    Kind::Gateways,
    Kind::HttpRoutes,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices.discovery.k8s.io",
            Kind::AuthorizationPolicies => "authorizationpolicies.security.istio.io",
            Kind::PeerAuthentications => "peerauthentications.security.istio.io",
            Kind::VirtualServices => "virtualservices.networking.istio.io",
            Kind::DestinationRules => "destinationrules.networking.istio.io",
            Kind::EnvoyFilters => "envoyfilters.networking.istio.io",
            Kind::Gateways => "gateways.gateway.networking.k8s.io",
            Kind::HttpRoutes => "httproutes.gateway.networking.k8s.io",
        }
    }

    fn is_crd(self) -> bool {
        !matches!(self, Kind::Pods | Kind::Namespaces | Kind::Services | Kind::EndpointSlices)
    }

    /// What to install when the kind's CRD is missing.
    fn crd_hint(self) -> &'static str {
        match self {
            Kind::Gateways | Kind::HttpRoutes => {
                "install the Gateway API CRDs (kubectl apply -f https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.3.0/standard-install.yaml) to use it"
            }
            _ => "install the Istio CRDs (deploy/crds, or the chart's crds/) to use it",
        }
    }
}

/// What one reflector reported, reduced to what the rebuild loop acts on.
enum Outcome {
    /// The store changed (an object applied or deleted).
    Changed,
    /// A (re)list completed: the store now holds the listed objects.
    Listed,
    Failed(watcher::Error),
    /// Something outside the API changed what the snapshot holds (the CNI registry learnt a pod's
    /// IPs): rebuild, readiness unaffected.
    Nudged,
}

/// The stores the snapshot is built from: compact records for the kinds that grow with the
/// cluster, kube-rs reflector stores for the rest.
#[derive(Clone)]
struct Stores {
    pods: Records<PodRecord>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    services: Records<ServiceRecord>,
    slices: Records<SliceRecord>,
    authz: Store<DynamicObject>,
    peer: Store<DynamicObject>,
    virtual_services: Store<DynamicObject>,
    destination_rules: Store<DynamicObject>,
    envoy_filters: Store<DynamicObject>,
    gateways: Store<DynamicObject>,
    http_routes: Store<DynamicObject>,
}

/// What the rebuild loop makes of one watcher event.
fn outcome<K>(event: &watcher::Event<K>) -> Option<Outcome> {
    match event {
        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Some(Outcome::Changed),
        watcher::Event::InitDone => Some(Outcome::Listed),
        watcher::Event::Init | watcher::Event::InitApply(_) => None,
    }
}

/// A watch feeding a compact record store instead of a reflector.
fn watch_records<R>(kind: Kind, api: Api<R::Object>, store: Records<R>) -> BoxStream<'static, (Kind, Outcome)>
where
    R: Record,
    R::Object: Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, watcher::Config::default().page_size(LIST_PAGE_SIZE))
        .default_backoff()
        .filter_map(move |event| {
            let outcome = match event {
                Ok(event) => {
                    let outcome = outcome(&event);
                    store.apply(event);
                    outcome
                }
                Err(e) => Some(Outcome::Failed(e)),
            };
            std::future::ready(outcome.map(|o| (kind, o)))
        })
        .boxed()
}

fn reflect<K>(
    kind: Kind,
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    trim: fn(&mut K),
) -> BoxStream<'static, (Kind, Outcome)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
{
    // Pages of 100 instead of kube's 500: a page of real pods is megabytes of JSON held while it
    // is parsed; smaller pages keep that peak (and what the allocator keeps after it) down.
    watcher(api, watcher::Config::default().page_size(LIST_PAGE_SIZE))
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .filter_map(move |event| {
            let outcome = match event {
                Ok(event) => outcome(&event),
                Err(e) => Some(Outcome::Failed(e)),
            };
            std::future::ready(outcome.map(|o| (kind, o)))
        })
        .boxed()
}

fn start(client: kube::Client) -> (Stores, SelectAll<BoxStream<'static, (Kind, Outcome)>>) {
    let (pods, services, slices) = (Records::default(), Records::default(), Records::default());
    let (namespaces, namespaces_w) = reflector::store();
    let mut streams = Vec::new();
    let mut dynamic = |kind: Kind, ar: ApiResource, trim: fn(&mut DynamicObject)| {
        let writer = reflector::store::Writer::new(ar.clone());
        let store = writer.as_reader();
        streams.push(reflect(kind, Api::all_with(client.clone(), &ar), writer, trim));
        store
    };
    use crate::crd::{
        AuthorizationPolicy, DestinationRule, EnvoyFilter, Gateway, HTTPRoute, PeerAuthentication, VirtualService,
    };
    let authz = dynamic(Kind::AuthorizationPolicies, ApiResource::erase::<AuthorizationPolicy>(&()), trim::dynamic);
    let peer = dynamic(Kind::PeerAuthentications, ApiResource::erase::<PeerAuthentication>(&()), trim::dynamic);
    let virtual_services = dynamic(Kind::VirtualServices, ApiResource::erase::<VirtualService>(&()), trim::routing);
    let destination_rules = dynamic(Kind::DestinationRules, ApiResource::erase::<DestinationRule>(&()), trim::routing);
    let envoy_filters = dynamic(Kind::EnvoyFilters, ApiResource::erase::<EnvoyFilter>(&()), trim::routing);
    let gateways = dynamic(Kind::Gateways, ApiResource::erase::<Gateway>(&()), trim::routing);
    let http_routes = dynamic(Kind::HttpRoutes, ApiResource::erase::<HTTPRoute>(&()), trim::routing);
    let stores = Stores {
        pods: pods.clone(),
        namespaces,
        services: services.clone(),
        slices: slices.clone(),
        authz,
        peer,
        virtual_services,
        destination_rules,
        envoy_filters,
        gateways,
        http_routes,
    };
    streams.extend([
        watch_records(Kind::Pods, Api::all(client.clone()), pods),
        reflect(Kind::Namespaces, Api::all(client.clone()), namespaces_w, trim::namespace),
        watch_records(Kind::Services, Api::all(client.clone()), services),
        watch_records(Kind::EndpointSlices, Api::all(client), slices),
    ]);
    (stores, futures::stream::select_all(streams))
}

/// Keeps `store` equal to what the API server holds until `shutdown` resolves. The first snapshot
/// replaces the store's content only once every watched kind has been listed; then `synced` turns
/// true (gate readiness on it). Never fails: API errors are logged and retried with backoff, and
/// the last snapshot stays meanwhile.
pub async fn run(
    client: kube::Client,
    opts: KubeOptions,
    store: Arc<StateStore>,
    synced: watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) {
    let (stores, streams) = start(client);
    let mut builder = build::Builder::new(opts);
    let mut rebuild = || {
        let state = builder.build(&stores);
        replace(&store, state, &builder);
    };
    run_loop(streams, &mut rebuild, &synced, shutdown).await;
}

/// IPs this node knows before the API server shows them, and a signal that bumps when they change.
#[derive(Clone)]
pub struct LocalAddresses {
    pub known: Arc<dyn crate::state::LocalPodAddresses>,
    pub changes: watch::Receiver<u64>,
}

/// [`run`] for a node agent: a pod of this node that the API shows without an IP yet is taken
/// with the IPs `local` has for it (from the CNI ADD), and each change of `local` rebuilds.
pub async fn run_with_local_addresses(
    client: kube::Client,
    opts: KubeOptions,
    local: LocalAddresses,
    store: Arc<StateStore>,
    synced: watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) {
    let (stores, mut streams) = start(client);
    streams.push(nudges(local.changes));
    let mut builder = build::Builder::new(opts).with_local_addresses(local.known);
    let mut rebuild = || {
        let state = builder.build(&stores);
        replace(&store, state, &builder);
    };
    run_loop(streams, &mut rebuild, &synced, shutdown).await;
}

/// One [`Outcome::Nudged`] per change of `changes`, until its sender goes.
fn nudges(changes: watch::Receiver<u64>) -> BoxStream<'static, (Kind, Outcome)> {
    futures::stream::unfold(changes, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((Kind::Pods, Outcome::Nudged), rx))
    })
    .boxed()
}

fn replace(store: &StateStore, state: State, builder: &build::Builder) {
    let (workloads, services) = (state.workloads_by_ip.len(), state.services_by_vip.len());
    let local = state.local_captured(&builder.opts().node_name).len();
    let policies = state.policies.authorization_policy_count();
    store.replace(state);
    // The previous snapshot (and the build's scratch) just went: in a large cluster that is tens
    // of megabytes the allocator would otherwise keep for good.
    let trim_started = std::time::Instant::now();
    crate::reclaim::trim_heap();
    let trim_us = trim_started.elapsed().as_micros();
    tracing::debug!(workloads, services, local_captured = local, policies, trim_us, "cluster state rebuilt");
}

/// Per-kind health, so a failing watch is logged once when it starts failing and once when it
/// recovers, not at every retry.
#[derive(Default)]
struct Health {
    listed: HashSet<Kind>,
    failing: HashSet<Kind>,
}

async fn run_loop(
    mut streams: impl Stream<Item = (Kind, Outcome)> + Unpin,
    rebuild: &mut (dyn FnMut() + Send),
    synced: &watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) {
    let mut health = Health::default();
    let mut ready = false;
    // When the pending rebuild is due, and when the first change it covers came in.
    let mut due: Option<(Instant, Instant)> = None;
    tokio::pin!(shutdown);
    loop {
        let wake = due.map(|(at, _)| at);
        tokio::select! {
            _ = &mut shutdown => return,
            _ = async { tokio::time::sleep_until(wake.expect("guarded")).await }, if wake.is_some() => {
                due = None;
                if health.listed.len() == KINDS.len() {
                    rebuild();
                    if !ready {
                        ready = true;
                        synced.send_replace(true);
                        tracing::info!("cluster state synced: every watched kind listed");
                    }
                }
            }
            next = streams.next() => {
                let Some((kind, outcome)) = next else {
                    tracing::error!("every watch stream ended; cluster state no longer updated");
                    return;
                };
                if health.observe(kind, outcome) {
                    let now = Instant::now();
                    let first = due.map_or(now, |(_, first)| first);
                    due = Some(((now + DEBOUNCE).min(first + MAX_DELAY), first));
                }
            }
        }
    }
}

impl Health {
    /// Records one outcome; true when the snapshot may have to change.
    fn observe(&mut self, kind: Kind, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Nudged => true,
            Outcome::Changed | Outcome::Listed => {
                if self.failing.remove(&kind) {
                    tracing::info!(kind = kind.name(), "watch recovered");
                }
                let first = self.listed.insert(kind);
                if first {
                    tracing::debug!(kind = kind.name(), "initial list done");
                }
                true
            }
            Outcome::Failed(e) => {
                let crd_missing = kind.is_crd()
                    && matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
                let new = self.failing.insert(kind);
                if crd_missing {
                    if new {
                        tracing::warn!(
                            kind = kind.name(),
                            hint = kind.crd_hint(),
                            "resource not served (CRD not installed?): treating it as empty until it appears"
                        );
                    }
                    // Nothing to wait for: readiness must not hang on an optional CRD.
                    return self.listed.insert(kind);
                }
                if new {
                    tracing::warn!(
                        kind = kind.name(),
                        error = %e,
                        "watch failed; retrying with backoff, the last good state stays in force"
                    );
                } else {
                    tracing::debug!(kind = kind.name(), error = %e, "watch still failing");
                }
                false
            }
        }
    }
}
