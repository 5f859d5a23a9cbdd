//! The HTTP side: accepting connections (cut all at once by `stop()`), routing request paths to
//! resources, list and watch responses, and TokenReview.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::ops::{self, WriteOpts};
use super::resources::{self, ResourceType};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{ApiError, Change, ChangeType, key_of};
use super::{API_AUDIENCE, Inner};

type Body = BoxBody<Bytes, Infallible>;

/// The API server's request body limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

pub(super) async fn accept_loop(inner: Arc<Inner>, listener: tokio::net::TcpListener, mut stop: oneshot::Receiver<()>) {
    // Dropping the set aborts every connection task: clients see their connections cut.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let inner = inner.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(inner.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("valid response")
}

fn error(e: &ApiError) -> Response<Body> {
    full(StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &e.status())
}

fn text(s: &'static str) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(s)).boxed())
        .expect("valid")
}

/// Where a request points, once its path is parsed.
struct Target {
    rt: &'static ResourceType,
    version: String,
    /// The request's namespace (`None`: all namespaces, or a cluster-scoped type).
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

enum Route {
    Doc(Value),
    Text(&'static str),
    Resource(Target),
}

fn route(inner: &Inner, path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let not_found = || ApiError::new(404, "NotFound", "the server could not find the requested resource");
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["healthz" | "readyz" | "livez"] => return Ok(Route::Text("ok")),
        ["version"] => {
            return Ok(Route::Doc(json!({
                "major": "1", "minor": "36", "gitVersion": "v1.36.0-weft-double",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go", "compiler": "gc", "platform": "linux/amd64",
            })));
        }
        ["api"] => return Ok(Route::Doc(resources::core_versions(&inner.addr.to_string()))),
        ["api", v] => {
            return resources::resource_list("", v, |t| inner.installed(t)).map(Route::Doc).ok_or_else(not_found);
        }
        ["apis"] => return Ok(Route::Doc(resources::group_list())),
        ["apis", g] => return resources::group(g).map(Route::Doc).ok_or_else(not_found),
        ["apis", g, v] => {
            return resources::resource_list(g, v, |t| inner.installed(t)).map(Route::Doc).ok_or_else(not_found);
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found()),
    };
    let (namespace, plural, name, sub): (Option<&str>, &str, Option<&str>, Option<&str>) = match rest {
        // The namespace object itself and its subresources.
        ["namespaces", name] if group.is_empty() => (None, "namespaces", Some(*name), None),
        ["namespaces", name, sub @ ("status" | "finalize")] if group.is_empty() => {
            (None, "namespaces", Some(*name), Some(*sub))
        }
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        [plural] => (None, *plural, None, None),
        [plural, name] => (None, *plural, Some(*name), None),
        [plural, name, sub] => (None, *plural, Some(*name), Some(*sub)),
        _ => return Err(not_found()),
    };
    let rt = resources::by_plural(group, version, plural).filter(|t| inner.installed(t)).ok_or_else(not_found)?;
    if namespace.is_some() && !rt.namespaced {
        return Err(not_found());
    }
    if rt.namespaced && name.is_some() && namespace.is_none() {
        return Err(not_found());
    }
    if let Some(s) = sub
        && !(s == "status" && rt.status)
    {
        return Err(not_found());
    }
    Ok(Route::Resource(Target {
        rt,
        version: version.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        subresource: sub.map(str::to_owned),
    }))
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query: HashMap<String, String> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    inner.log_request(format!("{} {}", parts.method, parts.uri));
    let header_str =
        |h: header::HeaderName| parts.headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (content_type, accept, agent) =
        (header_str(header::CONTENT_TYPE), header_str(header::ACCEPT), header_str(header::USER_AGENT));
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(error(&ApiError::new(413, "RequestEntityTooLarge", "request body too large"))),
    };
    let target = match route(&inner, &path) {
        Ok(Route::Doc(doc)) if parts.method == Method::GET => return Ok(full(StatusCode::OK, &doc)),
        Ok(Route::Text(t)) => return Ok(text(t)),
        Ok(Route::Resource(t)) => t,
        Ok(Route::Doc(_)) => {
            return Ok(error(&ApiError::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )));
        }
        Err(e) => return Ok(error(&e)),
    };
    let req = Req { inner: &inner, query, content_type, accept, agent, body };
    Ok(match dispatch(&req, &parts.method, &target) {
        Ok(Reply::Full(status, v)) => full(status, &v),
        Ok(Reply::Watch(w)) => watch_response(inner.clone(), w),
        Err(e) => error(&e),
    })
}

struct Req<'a> {
    inner: &'a Inner,
    query: HashMap<String, String>,
    content_type: String,
    accept: String,
    agent: String,
    body: Bytes,
}

impl Req<'_> {
    fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.q(k), Some("1" | "true"))
    }

    fn body_value(&self) -> Result<Value, ApiError> {
        if self.content_type.contains("yaml") {
            let text = std::str::from_utf8(&self.body).map_err(|_| ApiError::bad_request("body is not UTF-8"))?;
            serde_yaml_ng::from_str(text).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        } else {
            serde_json::from_slice(&self.body).map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))
        }
    }

    /// `fieldManager`, or the user agent's program name as the API server derives it.
    fn manager(&self, required: bool) -> String {
        match self.q("fieldManager") {
            Some(m) => m.to_owned(),
            None if required => String::new(),
            None => self.agent.split('/').next().filter(|s| !s.is_empty()).unwrap_or("unknown").to_owned(),
        }
    }

    fn meta_only(&self) -> bool {
        self.accept.contains("as=PartialObjectMetadata")
    }
}

enum Reply {
    Full(StatusCode, Value),
    Watch(WatchSpec),
}

fn dispatch(r: &Req<'_>, method: &Method, t: &Target) -> Result<Reply, ApiError> {
    let rt = t.rt;
    if rt.create_only {
        return match (method, &t.name) {
            (&Method::POST, None) => token_review(r, t).map(|v| Reply::Full(StatusCode::CREATED, v)),
            _ => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("the server does not allow this method on the requested resource ({})", rt.plural),
            )),
        };
    }
    let ns = t.namespace.as_deref().unwrap_or("");
    let dry_run = r.q("dryRun") == Some("All");
    let serve = |v: &Value| out(rt, &t.version, v, r.meta_only());
    match (method, &t.name) {
        (&Method::GET, None) if r.flag("watch") => watch_spec(r, t).map(Reply::Watch),
        (&Method::GET, None) => list(r, t).map(|v| Reply::Full(StatusCode::OK, v)),
        (&Method::GET, Some(name)) => {
            let s = r.inner.store();
            let v = s.get(&key_of(rt, ns, name)).ok_or_else(|| ApiError::not_found(rt, name))?;
            Ok(Reply::Full(StatusCode::OK, serve(&v)))
        }
        (&Method::POST, None) => {
            let o = WriteOpts { version: &t.version, manager: &r.manager(false), subresource: None, dry_run };
            let v = ops::create(&mut r.inner.store(), rt, ns, r.body_value()?, &o, false)?;
            Ok(Reply::Full(StatusCode::CREATED, serve(&v)))
        }
        (&Method::PUT, Some(name)) => {
            let o = WriteOpts {
                version: &t.version,
                manager: &r.manager(false),
                subresource: t.subresource.as_deref(),
                dry_run,
            };
            let v = ops::update(&mut r.inner.store(), rt, ns, name, r.body_value()?, &o)?;
            Ok(Reply::Full(StatusCode::OK, serve(&v)))
        }
        (&Method::PATCH, Some(name)) => {
            let apply = r.content_type.starts_with("application/apply-patch");
            let manager = r.manager(apply);
            let o =
                WriteOpts { version: &t.version, manager: &manager, subresource: t.subresource.as_deref(), dry_run };
            let mut store = r.inner.store();
            let existed = store.get(&key_of(rt, ns, name)).is_some();
            let v = ops::patch(&mut store, rt, ns, name, &r.content_type, r.body_value()?, r.flag("force"), &o)?;
            let status = if existed { StatusCode::OK } else { StatusCode::CREATED };
            Ok(Reply::Full(status, serve(&v)))
        }
        (&Method::DELETE, Some(name)) => {
            let opts = if r.body.is_empty() { Value::Null } else { r.body_value()? };
            let v = ops::delete(&mut r.inner.store(), rt, ns, name, &opts["preconditions"], dry_run)?;
            Ok(Reply::Full(StatusCode::OK, serve(&v)))
        }
        (&Method::DELETE, None) => {
            let (labels, fields) = selectors(r, rt)?;
            let mut store = r.inner.store();
            let mut deleted = Vec::new();
            for obj in store.list(rt, t.namespace.as_deref()) {
                if labels.matches_object(&obj) && fields.matches(&obj) {
                    let (ons, name) = ns_name(&obj);
                    let gone = ops::delete(&mut store, rt, &ons, &name, &Value::Null, dry_run)?;
                    deleted.push(serve(&gone));
                }
            }
            let rv = store.resource_version().to_string();
            Ok(Reply::Full(
                StatusCode::OK,
                json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(&t.version), "metadata": {"resourceVersion": rv}, "items": deleted}),
            ))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    }
}

/// An object as served at `version` (or as PartialObjectMetadata).
fn out(rt: &ResourceType, version: &str, v: &Value, meta_only: bool) -> Value {
    if meta_only {
        let mut meta = v["metadata"].clone();
        if let Some(m) = meta.as_object_mut() {
            m.remove("managedFields");
        }
        return json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta});
    }
    let mut v = v.clone();
    v["apiVersion"] = json!(rt.api_version(version));
    v
}

fn selectors(r: &Req<'_>, rt: &ResourceType) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(r.q("labelSelector").unwrap_or("")).map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(r.q("fieldSelector").unwrap_or(""), rt).map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn ns_name(v: &Value) -> (String, String) {
    let m = &v["metadata"];
    (m["namespace"].as_str().unwrap_or("").to_owned(), m["name"].as_str().unwrap_or("").to_owned())
}

/// GET on a collection: one page of the matching objects, at the current resourceVersion.
fn list(r: &Req<'_>, t: &Target) -> Result<Value, ApiError> {
    let (labels, fields) = selectors(r, t.rt)?;
    let meta_only = r.meta_only();
    let limit: usize = r.q("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let store = r.inner.store();
    // A continue token is the list's resourceVersion and the last key served.
    let (rv, after) = match r.q("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let decoded = hex::decode(token).ok().and_then(|b| String::from_utf8(b).ok());
            let Some((rv, ns, name)) = decoded.as_deref().and_then(|d| {
                let mut it = d.splitn(3, '\n');
                Some((it.next()?.parse::<u64>().ok()?, it.next()?.to_owned(), it.next()?.to_owned()))
            }) else {
                return Err(ApiError::bad_request("invalid continue token"));
            };
            if rv < store.compacted() {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some((ns, name)))
        }
        None => {
            if r.q("resourceVersionMatch") == Some("Exact") {
                let want: u64 = r.q("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
                if want != store.resource_version() {
                    return Err(ApiError::expired(want, store.resource_version()));
                }
            }
            (store.resource_version(), None)
        }
    };
    let matching: Vec<_> = store
        .list(t.rt, t.namespace.as_deref())
        .into_iter()
        .filter(|o| after.as_ref().is_none_or(|a| ns_name(o) > *a))
        .filter(|o| labels.matches_object(o) && fields.matches(o))
        .collect();
    let page: Vec<Value> = matching.iter().take(limit).map(|o| out(t.rt, &t.version, o, meta_only)).collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if matching.len() > page.len() {
        let (ns, name) = ns_name(matching[page.len() - 1].as_ref());
        metadata["continue"] = json!(hex::encode(format!("{rv}\n{ns}\n{name}")));
        metadata["remainingItemCount"] = json!(matching.len() - page.len());
    }
    let (kind, api_version) = if meta_only {
        ("PartialObjectMetadataList".to_owned(), "meta.k8s.io/v1".to_owned())
    } else {
        (format!("{}List", t.rt.kind), t.rt.api_version(&t.version))
    };
    Ok(json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": page}))
}

/// A watch request, parsed.
struct WatchSpec {
    rt: &'static ResourceType,
    version: String,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    meta_only: bool,
    /// `None`: start with the current objects (resourceVersion unset or "0").
    from: Option<u64>,
    send_initial: bool,
    bookmarks: bool,
    timeout: Option<Duration>,
}

fn watch_spec(r: &Req<'_>, t: &Target) -> Result<WatchSpec, ApiError> {
    let (labels, fields) = selectors(r, t.rt)?;
    let from = match r.q("resourceVersion").filter(|v| !v.is_empty() && *v != "0") {
        None => None,
        Some(v) => {
            Some(v.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resource version: {v:?}")))?)
        }
    };
    let send_initial = r.flag("sendInitialEvents");
    if send_initial && r.q("resourceVersionMatch") != Some("NotOlderThan") {
        return Err(ApiError::invalid(
            t.rt,
            "",
            "resourceVersionMatch",
            "sendInitialEvents requires resourceVersionMatch=NotOlderThan",
        ));
    }
    Ok(WatchSpec {
        rt: t.rt,
        version: t.version.clone(),
        namespace: t.namespace.clone(),
        labels,
        fields,
        meta_only: r.meta_only(),
        from: if send_initial { None } else { from },
        send_initial,
        bookmarks: r.flag("allowWatchBookmarks"),
        timeout: r.q("timeoutSeconds").and_then(|s| s.parse::<u64>().ok()).filter(|s| *s > 0).map(Duration::from_secs),
    })
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// The state of one watch stream between polls.
struct Watch {
    inner: Arc<Inner>,
    spec: WatchSpec,
    /// Every change up to here has been considered.
    pos: u64,
    queue: VecDeque<Bytes>,
    changes: watch::Receiver<u64>,
    generation: watch::Receiver<u64>,
    deadline: Option<Instant>,
    bookmark: Option<tokio::time::Interval>,
    done: bool,
}

impl Watch {
    fn matches(&self, v: &Value) -> bool {
        self.spec.labels.matches_object(v) && self.spec.fields.matches(v)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let (kind, api_version) = if self.spec.meta_only {
            ("PartialObjectMetadata".to_owned(), "meta.k8s.io/v1".to_owned())
        } else {
            (self.spec.rt.kind.to_owned(), self.spec.rt.api_version(&self.spec.version))
        };
        event_line("BOOKMARK", &json!({"kind": kind, "apiVersion": api_version, "metadata": meta}))
    }

    /// What a change looks like through this watch's selectors, as the watch cache sends it.
    fn translate(&self, c: &Change) -> Option<Bytes> {
        let s = &self.spec;
        if c.group != s.rt.group || c.type_kind != s.rt.kind || s.namespace.as_ref().is_some_and(|n| *n != c.namespace)
        {
            return None;
        }
        let now = self.matches(&c.object);
        let before = c.prev.as_ref().is_some_and(|p| self.matches(p));
        let serve = |v: &Value| out(s.rt, &s.version, v, s.meta_only);
        let (kind, obj) = match (c.kind, before, now) {
            (ChangeType::Deleted, _, true) => ("DELETED", serve(&c.object)),
            (ChangeType::Deleted, _, false) => return None,
            (_, false, true) => ("ADDED", serve(&c.object)),
            (_, true, true) => ("MODIFIED", serve(&c.object)),
            (_, true, false) => {
                // Left the selection: DELETED with the previous content at the new version.
                let mut prev = (**c.prev.as_ref().expect("before implies prev")).clone();
                prev["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                ("DELETED", serve(&prev))
            }
            (_, false, false) => return None,
        };
        Some(event_line(kind, &obj))
    }

    /// Queues what happened since `pos`; an ERROR (410) ends the stream.
    fn drain(&mut self) {
        let changes = self.inner.store().changes_since(self.pos);
        match changes {
            Ok(changes) => {
                for c in changes {
                    if let Some(line) = self.translate(&c) {
                        self.queue.push_back(line);
                    }
                    self.pos = c.rv;
                }
            }
            Err(e) => {
                self.queue.push_back(event_line("ERROR", &e.status()));
                self.done = true;
            }
        }
    }

    async fn next(mut self) -> Option<(Result<Frame<Bytes>, Infallible>, Watch)> {
        loop {
            if let Some(b) = self.queue.pop_front() {
                return Some((Ok(Frame::data(b)), self));
            }
            if self.done {
                return None;
            }
            self.drain();
            if !self.queue.is_empty() || self.done {
                continue;
            }
            let deadline = self.deadline;
            tokio::select! {
                r = self.changes.changed() => if r.is_err() { self.done = true },
                _ = self.generation.changed() => return None,
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => self.done = true,
                _ = async { self.bookmark.as_mut().expect("guarded").tick().await }, if self.bookmark.is_some() => {
                    self.drain();
                    if !self.done {
                        let b = self.bookmark(self.pos, false);
                        self.queue.push_back(b);
                    }
                }
            }
        }
    }
}

fn watch_response(inner: Arc<Inner>, spec: WatchSpec) -> Response<Body> {
    let mut w = Watch {
        changes: inner.store().subscribe(),
        generation: inner.generation.subscribe(),
        inner: inner.clone(),
        pos: 0,
        queue: VecDeque::new(),
        deadline: spec.timeout.map(|t| Instant::now() + t),
        bookmark: None,
        done: false,
        spec,
    };
    if w.spec.bookmarks {
        let every = *inner.bookmark_interval.lock().unwrap_or_else(|e| e.into_inner());
        let mut interval = tokio::time::interval_at(Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        w.bookmark = Some(interval);
    }
    {
        let store = inner.store();
        match w.spec.from {
            Some(rv) if rv < store.compacted() => {
                w.queue.push_back(event_line("ERROR", &ApiError::expired(rv, store.compacted() + 1).status()));
                w.done = true;
            }
            Some(rv) => w.pos = rv.min(store.resource_version()),
            None => {
                w.pos = store.resource_version();
                for obj in store.list(w.spec.rt, w.spec.namespace.as_deref()) {
                    if w.matches(&obj) {
                        w.queue
                            .push_back(event_line("ADDED", &out(w.spec.rt, &w.spec.version, &obj, w.spec.meta_only)));
                    }
                }
            }
        }
    }
    if w.spec.send_initial && !w.done {
        let b = w.bookmark(w.pos, true);
        w.queue.push_back(b);
    }
    let stream = futures::stream::unfold(w, Watch::next);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
fn token_review(r: &Req<'_>, t: &Target) -> Result<Value, ApiError> {
    let review = r.body_value()?;
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let user = r.inner.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(token).cloned();
    let wanted = if wanted.is_empty() { vec![API_AUDIENCE.to_owned()] } else { wanted };
    let status = match user {
        None => json!({"authenticated": false, "user": {}, "error": "invalid bearer token"}),
        Some(u) if u.expires.is_some_and(|e| e <= SystemTime::now()) => {
            json!({"authenticated": false, "user": {}, "error": "[invalid bearer token, service account token has expired]"})
        }
        Some(u) => {
            let issued = if u.audiences.is_empty() { vec![API_AUDIENCE.to_owned()] } else { u.audiences.clone() };
            let common: Vec<&String> = wanted.iter().filter(|a| issued.contains(a)).collect();
            if common.is_empty() {
                json!({"authenticated": false, "user": {}, "error": format!("[invalid bearer token, token audiences {issued:?} is invalid for the target audiences {wanted:?}]")})
            } else {
                json!({
                    "authenticated": true,
                    "user": {"username": u.username, "uid": u.uid, "groups": u.groups, "extra": u.extra},
                    "audiences": common,
                })
            }
        }
    };
    Ok(json!({
        "kind": "TokenReview",
        "apiVersion": t.rt.api_version(&t.version),
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": status,
    }))
}
