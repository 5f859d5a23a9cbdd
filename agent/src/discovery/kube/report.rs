//! Reporting bad configuration back to the cluster: `events.k8s.io/v1` Events on objects the mesh
//! left out (type Warning, reason [`REASON`], the note naming the field), and HTTPRoute
//! `status.parents` entries written by a waypoint (`Accepted`, `ResolvedRefs`).
//!
//! Owns: deduplication (one Event per object version and message per process, not one per state
//! rebuild), the bounded queue between the callers and the API (full → dropped and counted: the data
//! plane never waits on the API server), the Event's shape, and the route status conditions. Does not
//! own finding the problems (`build` for objects that do not parse or policies that do not compile,
//! the waypoint's compilers for routing) — callers hand them in as [`Problem`]s.
//!
//! Events follow the API conventions: the Event lives in the object's namespace, `regarding` carries
//! the object's apiVersion/kind/namespace/name/uid/resourceVersion read back from the API server
//! (the reflector stores drop uids to save memory), `eventTime` is set. Every node agent sees the
//! same bad object, so the name is not client-go's `<object>.<hex nanoseconds>` but
//! `<object>.<hash of uid, version, note>`: the first node to report a problem of one object version
//! creates the Event, the others get `409 AlreadyExists` and write nothing — one Event per problem
//! in the cluster, not one per node, with no leader election. An object that changed or went away
//! since the problem was found gets no Event: the next rebuild judges the new version.

mod status;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service as KubeService};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use tokio::sync::mpsc;

use super::build;
use crate::crd::{
    AuthorizationPolicy, DestinationRule, EnvoyFilter, Gateway, HTTPRoute, PeerAuthentication, VirtualService,
};
use crate::state::{State, StateStore};

pub use status::{ParentStatus, RouteCondition, route_parents, write_route_status};

/// Event reason for an object (or part of one) the mesh left out.
pub const REASON: &str = "InvalidConfiguration";
/// Event action: what the reporting controller was doing.
pub const ACTION: &str = "Validate";
/// `reportingController` of the node agent and of a waypoint.
pub const NODE_CONTROLLER: &str = "weft.io/node";
pub const WAYPOINT_CONTROLLER: &str = "weft.io/waypoint";
/// `controllerName` of the HTTPRoute status entries a waypoint writes.
pub const ROUTE_CONTROLLER_NAME: &str = "weft.io/waypoint-controller";
/// Field manager of the waypoint's status writes.
pub const FIELD_MANAGER: &str = "weft-waypoint";
/// Problems queued for the API at most; more are dropped (and counted).
pub const QUEUE: usize = 256;
/// Distinct problems remembered for deduplication; past this the memory starts over (a problem may
/// then be reported a second time, never more often than that per this many new ones).
const REMEMBERED: usize = 10_000;
/// The API server rejects longer Event notes.
const NOTE_MAX: usize = 1024;
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// One object (or part of one) left out, as a reporter sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Problem {
    /// `AuthorizationPolicy`, `VirtualService`, `HTTPRoute`, …
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The version the problem was found in, when known: no Event once the object has changed. The
    /// generation when the object has one (its status writes change the resourceVersion, not the
    /// spec), else the resourceVersion.
    pub generation: Option<i64>,
    pub resource_version: Option<String>,
    /// Path of the offending field, e.g. `spec.http[0].match[0].uri.regex`.
    pub field: String,
    pub reason: String,
}

impl Problem {
    pub fn new(kind: &str, namespace: &str, name: &str, field: &str, reason: &str) -> Problem {
        Problem {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            generation: None,
            resource_version: None,
            field: field.to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// The Event note: the field, then what is wrong (cut to the API's 1 kB limit).
    pub fn note(&self) -> String {
        let mut s = format!("{}: {}", self.field, self.reason);
        if s.len() > NOTE_MAX {
            let mut end = NOTE_MAX - 3;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push_str("...");
        }
        s
    }
}

impl From<&crate::policy::PolicyError> for Problem {
    fn from(e: &crate::policy::PolicyError) -> Problem {
        Problem::new(&e.kind.to_string(), &e.namespace, &e.name, &e.field, &e.reason)
    }
}

/// The API resource of a kind problems are reported on.
fn resource_of(kind: &str) -> Option<ApiResource> {
    Some(match kind {
        "AuthorizationPolicy" => ApiResource::erase::<AuthorizationPolicy>(&()),
        "PeerAuthentication" => ApiResource::erase::<PeerAuthentication>(&()),
        "VirtualService" => ApiResource::erase::<VirtualService>(&()),
        "DestinationRule" => ApiResource::erase::<DestinationRule>(&()),
        "EnvoyFilter" => ApiResource::erase::<EnvoyFilter>(&()),
        "Gateway" => ApiResource::erase::<Gateway>(&()),
        "HTTPRoute" => ApiResource::erase::<HTTPRoute>(&()),
        "Pod" => ApiResource::erase::<Pod>(&()),
        "Service" => ApiResource::erase::<KubeService>(&()),
        _ => return None,
    })
}

/// Publishes Events for [`Problem`]s in the background. Cheap to clone; [`Reporter::report`] never
/// blocks or awaits.
#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Inner>,
}

/// (kind, namespace, name, generation, resourceVersion, note).
type SeenKey = (String, String, String, Option<i64>, Option<String>, String);

struct Inner {
    tx: mpsc::Sender<Problem>,
    /// Problems already queued.
    seen: Mutex<HashSet<SeenKey>>,
    dropped: AtomicU64,
    published: AtomicU64,
}

impl Reporter {
    /// A reporter writing Events as `controller` (`weft.io/node`, `weft.io/waypoint`) from
    /// `instance` (the node or pod name). Spawns the publishing task on the current runtime; it ends
    /// when the last clone of the reporter is dropped.
    pub fn spawn(client: kube::Client, controller: &str, instance: &str) -> Reporter {
        let (tx, rx) = mpsc::channel(QUEUE);
        let inner = Arc::new(Inner {
            tx,
            seen: Mutex::new(HashSet::new()),
            dropped: AtomicU64::new(0),
            published: AtomicU64::new(0),
        });
        let publisher = Publisher { client, controller: controller.to_owned(), instance: instance.to_owned() };
        tokio::spawn(publisher.run(rx, Arc::downgrade(&inner)));
        Reporter { inner }
    }

    /// Queues an Event for `p` unless the same problem of the same object version was queued before.
    pub fn report(&self, p: Problem) {
        let key =
            (p.kind.clone(), p.namespace.clone(), p.name.clone(), p.generation, p.resource_version.clone(), p.note());
        {
            let mut seen = self.inner.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(&key) {
                return;
            }
            if seen.len() >= REMEMBERED {
                seen.clear();
            }
            seen.insert(key.clone());
        }
        if let Err(e) = self.inner.tx.try_send(p) {
            // Forget it, so a later rebuild can queue it again once there is room.
            self.inner.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            let n = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n == 1 || n.is_power_of_two() {
                tracing::warn!(dropped = n, error = %e, "event queue full; Kubernetes Event dropped (the log line stays)");
            }
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Events the API server accepted.
    pub fn published(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }
}

struct Publisher {
    client: kube::Client,
    controller: String,
    instance: String,
}

impl Publisher {
    async fn run(self, mut rx: mpsc::Receiver<Problem>, inner: std::sync::Weak<Inner>) {
        while let Some(p) = rx.recv().await {
            match self.publish(&p).await {
                Ok(true) => {
                    if let Some(i) = inner.upgrade() {
                        i.published.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    kind = %p.kind, namespace = %p.namespace, name = %p.name, error = %e,
                    "cannot write a Kubernetes Event (RBAC: create on events.k8s.io/events?); the log line stays"
                ),
            }
        }
    }

    /// True when an Event was written; false when the object is gone or changed meanwhile.
    async fn publish(&self, p: &Problem) -> Result<bool, kube::Error> {
        let Some(ar) = resource_of(&p.kind) else {
            tracing::debug!(kind = %p.kind, "no Events for this kind");
            return Ok(false);
        };
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &p.namespace, &ar);
        let Some(object) = api.get_opt(&p.name).await? else {
            return Ok(false);
        };
        let changed = match (p.generation, &p.resource_version) {
            (Some(g), _) => object.metadata.generation != Some(g),
            (None, Some(rv)) => object.metadata.resource_version.as_ref() != Some(rv),
            (None, None) => false,
        };
        if changed {
            tracing::debug!(kind = %p.kind, namespace = %p.namespace, name = %p.name, "object changed since; no Event for the old version");
            return Ok(false);
        }
        let version = match object.metadata.generation {
            Some(g) => g.to_string(),
            None => object.metadata.resource_version.clone().unwrap_or_default(),
        };
        let note = p.note();
        let name = event_name(&p.name, object.metadata.uid.as_deref().unwrap_or_default(), &version, &note);
        let now = Timestamp::now();
        let regarding = ObjectReference {
            api_version: Some(ar.api_version.clone()),
            kind: Some(ar.kind.clone()),
            namespace: Some(p.namespace.clone()),
            name: Some(p.name.clone()),
            uid: object.metadata.uid.clone(),
            resource_version: object.metadata.resource_version.clone(),
            field_path: None,
        };
        let event = Event {
            metadata: ObjectMeta { name: Some(name), namespace: Some(p.namespace.clone()), ..ObjectMeta::default() },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".into()),
            reason: Some(REASON.into()),
            action: Some(ACTION.into()),
            note: Some(note),
            regarding: Some(regarding),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        match Api::<Event>::namespaced(self.client.clone(), &p.namespace).create(&PostParams::default(), &event).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::debug!(kind = %p.kind, namespace = %p.namespace, name = %p.name, "another node reported this problem already");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// `<object>.<16 hex digits>`: the same for every node that finds the same problem (`note`) in the
/// same version of the same object (`uid`), different for anything else.
fn event_name(object: &str, uid: &str, version: &str, note: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [uid, version, note] {
        ctx.update(part.as_bytes());
        ctx.update(&[0]);
    }
    let digest = ctx.finish();
    let hex: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{object}.{hex}")
}

/// The node agent's reporter, when installed: the cluster source of this process reports through it.
static NODE: OnceLock<Reporter> = OnceLock::new();

/// Makes the cluster source of this process ([`super::run`] and its variants) report each object
/// its snapshots leave out (Istio and Gateway API objects that do not parse, policies that do not
/// compile) as an Event, once per object version and problem. For the node agent; a waypoint
/// reports its compilers' findings with [`watch_waypoint`] instead. False when one was installed
/// already (the first stays). Pods and Services are not reported: their problems (an IP claimed
/// twice) are transient and every node would report them.
pub fn install(reporter: Reporter) -> bool {
    NODE.set(reporter).is_ok()
}

/// Called by the builder with every problem of a snapshot (`Kind ns/name: field: reason`).
pub(super) fn on_problems(problems: &HashSet<String>, inputs: &build::Inputs) {
    let Some(reporter) = NODE.get() else { return };
    for line in problems {
        if let Some(p) = parse_problem(line, inputs) {
            reporter.report(p);
        }
    }
}

/// `Kind ns/name: field: reason` (the builder's log line) → a problem with the object's
/// resourceVersion; `None` for kinds not reported.
fn parse_problem(line: &str, inputs: &build::Inputs) -> Option<Problem> {
    let (object, rest) = line.split_once(": ")?;
    let (field, reason) = rest.split_once(": ")?;
    let (kind, ns_name) = object.split_once(' ')?;
    let (namespace, name) = ns_name.split_once('/')?;
    let objects = match kind {
        "AuthorizationPolicy" => &inputs.authz,
        "PeerAuthentication" => &inputs.peer,
        "VirtualService" => &inputs.virtual_services,
        "DestinationRule" => &inputs.destination_rules,
        "EnvoyFilter" => &inputs.envoy_filters,
        "Gateway" => &inputs.gateways,
        "HTTPRoute" => &inputs.http_routes,
        _ => return None,
    };
    let meta = objects
        .iter()
        .find(|o| o.metadata.namespace.as_deref() == Some(namespace) && o.metadata.name.as_deref() == Some(name))
        .map(|o| &o.metadata);
    let (generation, resource_version) = version_of(meta);
    Some(Problem { generation, resource_version, ..Problem::new(kind, namespace, name, field, reason) })
}

/// A waypoint's reporting, in cluster mode: on every state change (and once at the start) runs
/// `compile` (the waypoint's compilers, with their log lines silenced: the waypoint logs them
/// itself), reports each problem as an Event, and writes the `status.parents` entries of every
/// HTTPRoute that names waypoint `me_ns/me_name` when they changed. Runs until `shutdown`; off the
/// data path (its own task, its own copy of the compiled configuration).
pub async fn watch_waypoint(
    client: kube::Client,
    store: Arc<StateStore>,
    me: (String, String),
    reporter: Reporter,
    compile: impl Fn(&State) -> Vec<Problem> + Send,
    shutdown: impl Future<Output = ()>,
) {
    let mut changes = store.subscribe();
    // (namespace, name) → (generation, entries) last written or found current.
    let mut written: HashMap<(String, String), (Option<i64>, Vec<ParentStatus>)> = HashMap::new();
    tokio::pin!(shutdown);
    loop {
        let state = store.load();
        let problems = tracing::dispatcher::with_default(&tracing::Dispatch::none(), || compile(&state));
        for p in &problems {
            let (generation, resource_version) = version_of(routing_meta(&state, &p.kind, &p.namespace, &p.name));
            reporter.report(Problem { generation, resource_version, ..p.clone() });
        }
        for route in &state.routing.http_routes {
            let ours = route_parents(route, &state, &me.0, &me.1, &problems);
            if ours.is_empty() {
                continue;
            }
            let key =
                (route.metadata.namespace.clone().unwrap_or_default(), route.metadata.name.clone().unwrap_or_default());
            let current = (route.metadata.generation, ours);
            if written.get(&key) == Some(&current) {
                continue;
            }
            match write_route_status(&client, route, &current.1).await {
                Ok(wrote) => {
                    tracing::debug!(namespace = %key.0, name = %key.1, wrote, "HTTPRoute status current");
                    written.insert(key, current);
                }
                Err(e) => tracing::warn!(
                    namespace = %key.0, name = %key.1, error = %e,
                    "cannot write HTTPRoute status (RBAC: patch on httproutes/status?); retried at the next change"
                ),
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// What identifies the version of an object for deduplication: its generation when it has one,
/// else its resourceVersion.
fn version_of(meta: Option<&ObjectMeta>) -> (Option<i64>, Option<String>) {
    match meta {
        Some(m) if m.generation.is_some() => (m.generation, None),
        Some(m) => (None, m.resource_version.clone()),
        None => (None, None),
    }
}

/// The metadata of a routing object as the state holds it.
fn routing_meta<'a>(state: &'a State, kind: &str, ns: &str, name: &str) -> Option<&'a ObjectMeta> {
    fn find<'a>(mut metas: impl Iterator<Item = &'a ObjectMeta>, ns: &str, name: &str) -> Option<&'a ObjectMeta> {
        metas.find(|m| m.namespace.as_deref() == Some(ns) && m.name.as_deref() == Some(name))
    }
    let r = &state.routing;
    match kind {
        "AuthorizationPolicy" => find(r.authorization_policies.iter().map(|o| &o.metadata), ns, name),
        "VirtualService" => find(r.virtual_services.iter().map(|o| &o.metadata), ns, name),
        "DestinationRule" => find(r.destination_rules.iter().map(|o| &o.metadata), ns, name),
        "EnvoyFilter" => find(r.envoy_filters.iter().map(|o| &o.metadata), ns, name),
        "Gateway" => find(r.gateways.iter().map(|o| &o.metadata), ns, name),
        "HTTPRoute" => find(r.http_routes.iter().map(|o| &o.metadata), ns, name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_stable_per_object_version_and_problem() {
        let a = event_name("bad-ip", "uid-1", "3", "spec.rules[0]: not an IP");
        assert_eq!(
            a,
            event_name("bad-ip", "uid-1", "3", "spec.rules[0]: not an IP"),
            "every node computes the same name"
        );
        assert!(a.starts_with("bad-ip.") && a.len() == "bad-ip.".len() + 16, "{a}");
        for other in [
            event_name("bad-ip", "uid-2", "3", "spec.rules[0]: not an IP"), // recreated object
            event_name("bad-ip", "uid-1", "4", "spec.rules[0]: not an IP"), // new generation
            event_name("bad-ip", "uid-1", "3", "spec.rules[1]: not an IP"), // another problem
            event_name("bad-ip", "uid-13", "", "spec.rules[0]: not an IP"), // parts do not run together
        ] {
            assert_ne!(a, other);
        }
    }
}
