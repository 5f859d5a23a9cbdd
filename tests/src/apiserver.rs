//! An in-process Kubernetes API server double that speaks the real wire protocol over plain HTTP,
//! so kube-rs clients, watchers and reflectors run against it unmodified.
//!
//! It serves: discovery (`/api`, `/api/v1`, `/apis`, `/apis/G`, `/apis/G/V`, `/version`); list
//! with `resourceVersion` in the list metadata, label and field selectors, `limit`/`continue`;
//! `?watch=1` streams of JSON lines (ADDED / MODIFIED / DELETED / BOOKMARK / ERROR) honouring
//! `resourceVersion`, `allowWatchBookmarks`, `timeoutSeconds` and `sendInitialEvents`, with
//! label-selector transitions sent as ADDED/DELETED as the watch cache does; `410 Gone` (a Status
//! with reason Expired, as an ERROR event in a watch, as the API server sends it) for a
//! resourceVersion older than the compaction point; metadata-only responses
//! (`Accept: …;as=PartialObjectMetadata…`); create (incl. `generateName`), replace with
//! resourceVersion preconditions, merge / JSON / (approximately) strategic patch, server-side
//! apply with `fieldManager`, `force` and managedFields, delete and deletecollection, `dryRun`;
//! the `/status` subresource; TokenReview (tokens registered by the test); Events (core v1 and
//! events.k8s.io/v1 — stored as two resources, where the API server converts one to the other). Types: see [`resources::TYPES`] (core v1, EndpointSlice, the Istio security
//! and networking CRDs, Gateway API v1).
//!
//! Objects are JSON `serde_json::Value`s, one per (group, kind, namespace, name) — a CRD served at
//! several versions is one object with `apiVersion` rewritten per request, as conversion of
//! identical schemas does. There are no controllers: no endpoint slices are derived from
//! services, no garbage collection; the test writes what a kubelet or controller would, with the
//! in-process methods ([`ApiServer::put`] keeps status as given). `stop()` closes the port and
//! cuts every connection (watches end mid-stream), keeping the objects; `start()` serves them
//! again on the same port.
//!
//! Why not an existing crate: `kube-fake-client` 0.3 (controller-runtime's fake client) is an
//! in-memory `tower::Service` for kube 4 / k8s-openapi 0.28 — it does not link with kube 5 — and
//! has no watch streams, no 410, no HTTP port to stop and restart. kube's own mocking
//! (`tower-test` behind `Client::new`, or `kubernetes-mock`) scripts request/response pairs in
//! order, which cannot host reflectors that list, watch, time out and reconnect at will. A real
//! kube-apiserver (envtest) cannot be installed here. So this module implements the protocol;
//! its behaviour follows the Kubernetes API conventions and the API server's watch cache.

mod http;
pub mod ops;
pub mod patch;
pub mod resources;
pub mod selector;
pub mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use store::ApiError;
use store::{Store, key_of};

/// Who a registered token authenticates as, as TokenReview reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenUser {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    /// Audiences the token was issued for; empty means the API server's own.
    pub audiences: Vec<String>,
    /// After this the token no longer authenticates.
    pub expires: Option<SystemTime>,
}

/// The API server's own audience: what a token is for when a review names none.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

impl TokenUser {
    /// A projected ServiceAccount token of a pod on a node, as the API server describes one.
    pub fn service_account(
        namespace: &str,
        sa: &str,
        pod: Option<(&str, &str)>,
        node: Option<(&str, &str)>,
    ) -> TokenUser {
        let mut extra = BTreeMap::new();
        if let Some((name, uid)) = pod {
            extra.insert("authentication.kubernetes.io/pod-name".to_owned(), vec![name.to_owned()]);
            extra.insert("authentication.kubernetes.io/pod-uid".to_owned(), vec![uid.to_owned()]);
        }
        if let Some((name, uid)) = node {
            extra.insert("authentication.kubernetes.io/node-name".to_owned(), vec![name.to_owned()]);
            extra.insert("authentication.kubernetes.io/node-uid".to_owned(), vec![uid.to_owned()]);
        }
        TokenUser {
            username: format!("system:serviceaccount:{namespace}:{sa}"),
            uid: format!("sa-{namespace}-{sa}"),
            groups: vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_owned(),
            ],
            extra,
            audiences: Vec::new(),
            expires: None,
        }
    }
}

/// State shared by the listener, every connection and the test.
struct Inner {
    store: Mutex<Store>,
    tokens: Mutex<HashMap<String, TokenUser>>,
    bookmark_interval: Mutex<Duration>,
    requests: Mutex<Vec<String>>,
    /// Bumped by `stop()`: open watch streams end.
    generation: watch::Sender<u64>,
    addr: SocketAddr,
    /// Types served as if their CRD were not installed (`ResourceType::qualified`).
    uninstalled: Mutex<HashSet<String>>,
}

const MAX_LOGGED_REQUESTS: usize = 10_000;

impl Inner {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn installed(&self, rt: &resources::ResourceType) -> bool {
        !self.uninstalled.lock().unwrap_or_else(|e| e.into_inner()).contains(&rt.qualified())
    }

    fn log_request(&self, line: String) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() >= MAX_LOGGED_REQUESTS {
            r.drain(..MAX_LOGGED_REQUESTS / 2);
        }
        r.push(line);
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The double. Dropping it stops serving.
pub struct ApiServer {
    inner: Arc<Inner>,
    running: Mutex<Option<Running>>,
}

/// Namespaces every cluster starts with.
const INITIAL_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    // The port comes back after stop() while the old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl ApiServer {
    /// Serves on a free loopback port (needs a Tokio runtime).
    pub async fn start_new() -> std::io::Result<ApiServer> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            tokens: Mutex::new(HashMap::new()),
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
            requests: Mutex::new(Vec::new()),
            generation: watch::channel(0).0,
            addr,
            uninstalled: Mutex::new(HashSet::new()),
        });
        let server = ApiServer { inner, running: Mutex::new(None) };
        for ns in INITIAL_NAMESPACES {
            server
                .put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .expect("fresh store");
        }
        server.serve(listener);
        Ok(server)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(http::accept_loop(self.inner.clone(), listener, stopped));
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running { stop, task });
    }

    /// Serves `qualified` (e.g. `envoyfilters.networking.istio.io`) as a cluster without that CRD
    /// would: its paths answer 404 and its group's resource list leaves it out.
    pub fn uninstall_crd(&self, qualified: &str) {
        self.inner.uninstalled.lock().unwrap_or_else(|e| e.into_inner()).insert(qualified.to_owned());
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn is_running(&self) -> bool {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Closes the port and cuts every open connection; the objects stay. Idempotent.
    pub async fn stop(&self) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(r) = running {
            let _ = r.stop.send(());
            let _ = r.task.await;
            self.inner.generation.send_modify(|g| *g += 1);
        }
    }

    /// Serves again on the same port. Idempotent.
    pub async fn start(&self) -> std::io::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        // The kernel may take a moment to release the port after stop().
        let mut tries = 0;
        let listener = loop {
            match bind(self.inner.addr) {
                Ok(l) => break l,
                Err(e) if tries < 50 && e.kind() == std::io::ErrorKind::AddrInUse => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// How often watches that asked for bookmarks get one (1 s unless changed; the API server
    /// sends them about once a minute).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.inner.bookmark_interval.lock().unwrap_or_else(|e| e.into_inner()) = every;
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.store().resource_version()
    }

    /// Forgets the change history up to now: watches resuming from an older resourceVersion get
    /// 410 Expired and must relist.
    pub fn compact(&self) {
        let mut s = self.inner.store();
        let rv = s.resource_version();
        s.compact(rv);
    }

    /// Keeps at most `n` changes of history (older ones are compacted as they age out).
    pub fn set_max_history(&self, n: usize) {
        let mut s = self.inner.store();
        s.max_history = n.max(1);
        s.trim_history();
    }

    /// Registers a bearer token for TokenReview.
    pub fn register_token(&self, token: &str, user: TokenUser) {
        self.inner.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(token.to_owned(), user);
    }

    pub fn revoke_token(&self, token: &str) {
        self.inner.tokens.lock().unwrap_or_else(|e| e.into_inner()).remove(token);
    }

    /// `METHOD path?query` of every request served so far (the last 10,000 at most).
    pub fn requests(&self) -> Vec<String> {
        self.inner.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn resolve(obj: &Value) -> Result<(&'static resources::ResourceType, String), ApiError> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        resources::by_kind(api_version, kind)
            .ok_or_else(|| ApiError::bad_request(format!("no kind {kind:?} is registered for version {api_version:?}")))
    }

    /// Creates or replaces `obj` (by apiVersion, kind, namespace, name) as the test's hand: works
    /// while stopped, keeps `status` as given (the test plays kubelet and controllers), and skips
    /// resourceVersion checks. Returns the stored object.
    pub fn put(&self, obj: Value) -> Result<Value, ApiError> {
        let (rt, version) = Self::resolve(&obj)?;
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let o = ops::WriteOpts { version: &version, manager: "weft-test", subresource: None, dry_run: false };
        let mut s = self.inner.store();
        if s.get(&key_of(rt, &ns, &name)).is_none() {
            return ops::create(&mut s, rt, &ns, obj, &o, true).map(|v| (*v).clone());
        }
        let mut obj = obj;
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let status = obj.get("status").cloned();
        let mut out = ops::update(&mut s, rt, &ns, &name, obj, &o)?;
        if rt.status
            && let Some(status) = status
        {
            let o = ops::WriteOpts { subresource: Some("status"), ..o };
            let body = json!({"apiVersion": rt.api_version(&version), "kind": rt.kind, "metadata": {"name": name}, "status": status});
            out = ops::update(&mut s, rt, &ns, &name, body, &o)?;
        }
        Ok((*out).clone())
    }

    /// Deletes an object as the test's hand (works while stopped).
    pub fn remove(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let (rt, _) = resources::by_kind(api_version, kind)
            .ok_or_else(|| ApiError::bad_request(format!("no kind {kind:?} in {api_version:?}")))?;
        let mut s = self.inner.store();
        ops::delete(&mut s, rt, namespace.unwrap_or("default"), name, &Value::Null, false).map(|v| (*v).clone())
    }

    /// The stored object, if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let (rt, _) = resources::by_kind(api_version, kind)?;
        let s = self.inner.store();
        s.get(&key_of(rt, namespace.unwrap_or("default"), name)).map(|v| (*v).clone())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = r.stop.send(());
            r.task.abort();
        }
        self.inner.generation.send_modify(|g| *g += 1);
    }
}
