//! Writes as the API server performs them: create, update (PUT), patch, server-side apply,
//! delete, with their preconditions, defaults and errors. Shared by the HTTP handlers and the
//! test's in-process calls.

use std::sync::Arc;

use serde_json::{Value, json};

use super::patch::{self, Conflict, Writer};
use super::resources::{ResourceType, TYPES};
use super::store::{ApiError, Key, Store, key_of, now_rfc3339};

/// How a write is made.
pub struct WriteOpts<'a> {
    /// Version the request was made at (written to managedFields and served back).
    pub version: &'a str,
    /// `fieldManager`, or what the API server derives from the user agent.
    pub manager: &'a str,
    /// `status` for writes to the status subresource.
    pub subresource: Option<&'a str>,
    pub dry_run: bool,
}

fn name_of(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespaces() -> &'static ResourceType {
    TYPES.iter().find(|t| t.kind == "Namespace").expect("namespaces are served")
}

/// Checks apiVersion/kind against the endpoint and fills them in when absent.
fn check_type(rt: &ResourceType, version: &str, obj: &mut Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the body is not a JSON object"));
    }
    let want = rt.api_version(version);
    match obj["apiVersion"].as_str() {
        None | Some("") => obj["apiVersion"] = json!(want),
        Some(have) if have != want => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({have}) does not match the expected API version ({want})"
            )));
        }
        Some(_) => {}
    }
    match obj["kind"].as_str() {
        None | Some("") => obj["kind"] = json!(rt.kind),
        Some(have) if have != rt.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({have}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        Some(_) => {}
    }
    Ok(())
}

/// The namespace of the request: the path's, which the object's must match.
fn check_namespace(store: &Store, rt: &ResourceType, namespace: &str, obj: &mut Value) -> Result<(), ApiError> {
    if !rt.namespaced {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        return Ok(());
    }
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() && ns != namespace => {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        _ => obj["metadata"]["namespace"] = json!(namespace),
    }
    if store.get(&key_of(namespaces(), "", namespace)).is_none() {
        return Err(ApiError::not_found(namespaces(), namespace));
    }
    Ok(())
}

/// What the API server fills in on create: defaults of the types the tests use, and a cleared
/// status where a status subresource owns it (kubelets and controllers write it later).
fn defaults_on_create(store: &mut Store, rt: &ResourceType, obj: &mut Value, keep_status: bool) {
    if rt.status
        && !keep_status
        && let Some(m) = obj.as_object_mut()
    {
        m.remove("status");
    }
    match (rt.group, rt.kind) {
        ("", "Namespace") => obj["status"] = json!({"phase": "Active"}),
        ("", "Pod") => {
            if !keep_status {
                obj["status"] = json!({"phase": "Pending"});
            }
            let spec = &mut obj["spec"];
            if spec["serviceAccountName"].as_str().unwrap_or("").is_empty() {
                spec["serviceAccountName"] = json!("default");
            }
            spec["serviceAccount"] = spec["serviceAccountName"].clone();
        }
        ("", "Service") => {
            let spec = &mut obj["spec"];
            if spec["type"].is_null() {
                spec["type"] = json!("ClusterIP");
            }
            for p in spec["ports"].as_array_mut().into_iter().flatten() {
                if p["protocol"].is_null() {
                    p["protocol"] = json!("TCP");
                }
                if p["targetPort"].is_null() {
                    p["targetPort"] = p["port"].clone();
                }
            }
            let external = spec["type"] == "ExternalName";
            if !external && spec["clusterIP"].as_str().unwrap_or("").is_empty() {
                let first = spec["clusterIPs"][0].as_str().map(str::to_owned);
                spec["clusterIP"] = json!(first.unwrap_or_else(|| store.allocate_cluster_ip()));
            }
            if !external && spec["clusterIPs"].is_null() {
                spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
            }
        }
        _ => {}
    }
}

/// Everything but metadata and status: what `metadata.generation` counts changes of.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn writer<'a>(o: &'a WriteOpts<'a>, time: &'a str, api_version: &'a str) -> Writer<'a> {
    Writer { manager: o.manager, api_version, subresource: o.subresource, time }
}

/// POST: a new object. `keep_status`: store the status as given (the test acting as kubelet or
/// controller); HTTP creates clear it where a status subresource owns it.
pub fn create(
    store: &mut Store,
    rt: &'static ResourceType,
    namespace: &str,
    mut obj: Value,
    o: &WriteOpts<'_>,
    keep_status: bool,
) -> Result<Arc<Value>, ApiError> {
    check_type(rt, o.version, &mut obj)?;
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    check_namespace(store, rt, namespace, &mut obj)?;
    if obj["metadata"]["resourceVersion"].as_str().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("resourceVersion should not be set on objects to be created"));
    }
    if (rt.group, rt.kind) == ("events.k8s.io", "Event") {
        check_event(rt, &obj)?;
    }
    if name_of(&obj).is_empty() {
        match obj["metadata"]["generateName"].as_str() {
            Some(prefix) if !prefix.is_empty() => {
                let suffix = store.new_uid().replace('-', "");
                obj["metadata"]["name"] = json!(format!("{prefix}{}", &suffix[suffix.len() - 5..]));
            }
            _ => {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ));
            }
        }
    }
    let name = name_of(&obj).to_owned();
    let key = key_of(rt, namespace, &name);
    if store.get(&key).is_some() {
        return Err(ApiError {
            details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
            ..ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", rt.qualified()))
        });
    }
    let time = now_rfc3339();
    let uid = store.new_uid();
    let meta = &mut obj["metadata"];
    meta["uid"] = json!(uid);
    meta["creationTimestamp"] = json!(time);
    meta["generation"] = json!(1);
    if let Some(m) = meta.as_object_mut() {
        m.remove("managedFields");
    }
    defaults_on_create(store, rt, &mut obj, keep_status);
    let api_version = rt.api_version(o.version);
    patch::record_update(None, &mut obj, &writer(o, &time, &api_version), false, rt.status && !keep_status);
    Ok(finish(store, key, obj, o.dry_run))
}

fn finish(store: &mut Store, key: Key, mut obj: Value, dry_run: bool) -> Arc<Value> {
    if dry_run {
        obj["metadata"]["resourceVersion"] = json!(store.resource_version().to_string());
        return Arc::new(obj);
    }
    store.commit(key, Some(obj))
}

/// PUT (on the object or its status): replaces what the endpoint owns.
pub fn update(
    store: &mut Store,
    rt: &'static ResourceType,
    namespace: &str,
    name: &str,
    mut obj: Value,
    o: &WriteOpts<'_>,
) -> Result<Arc<Value>, ApiError> {
    check_type(rt, o.version, &mut obj)?;
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    match obj["metadata"]["name"].as_str() {
        Some(n) if n != name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        _ => obj["metadata"]["name"] = json!(name),
    }
    check_namespace(store, rt, namespace, &mut obj)?;
    let key = key_of(rt, namespace, name);
    let current = store.get(&key).ok_or_else(|| ApiError::not_found(rt, name))?;
    if let Some(rv) = obj["metadata"]["resourceVersion"].as_str().filter(|s| !s.is_empty())
        && Some(rv) != current["metadata"]["resourceVersion"].as_str()
    {
        return Err(ApiError {
            details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
            ..ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    rt.qualified()
                ),
            )
        });
    }
    let status_only = o.subresource == Some("status");
    let mut next = if status_only {
        let mut n = (*current).clone();
        n["status"] = obj["status"].clone();
        n
    } else {
        if rt.status {
            obj["status"] = current["status"].clone();
        }
        let meta = obj["metadata"].as_object_mut().expect("made an object above");
        for k in ["uid", "creationTimestamp", "generation", "managedFields"] {
            match current["metadata"].get(k) {
                Some(v) => meta.insert(k.to_owned(), v.clone()),
                None => meta.remove(k),
            };
        }
        if (rt.group, rt.kind) == ("", "Service") && obj["spec"]["clusterIP"].is_null() {
            obj["spec"]["clusterIP"] = current["spec"]["clusterIP"].clone();
            obj["spec"]["clusterIPs"] = current["spec"]["clusterIPs"].clone();
        }
        obj
    };
    if let Some(m) = next.as_object_mut()
        && m.get("status").is_some_and(Value::is_null)
    {
        m.remove("status");
    }
    if spec_part(&next) != spec_part(&current) {
        let g = current["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        next["metadata"]["generation"] = json!(g);
    }
    next["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    let time = now_rfc3339();
    let api_version = rt.api_version(o.version);
    patch::record_update(Some(&current), &mut next, &writer(o, &time, &api_version), status_only, rt.status);
    if unchanged(&current, &next) {
        return Ok(current);
    }
    Ok(finish(store, key, next, o.dry_run))
}

/// Equal but for the times in managedFields: a no-op write, which does not bump the
/// resourceVersion (as in Kubernetes).
fn unchanged(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        for e in v["metadata"]["managedFields"].as_array_mut().into_iter().flatten() {
            e["time"] = Value::Null;
        }
        v
    };
    strip(a) == strip(b)
}

/// PATCH with any content type; `body` already parsed (YAML or JSON).
#[allow(clippy::too_many_arguments)]
pub fn patch(
    store: &mut Store,
    rt: &'static ResourceType,
    namespace: &str,
    name: &str,
    content_type: &str,
    body: Value,
    force: bool,
    o: &WriteOpts<'_>,
) -> Result<Arc<Value>, ApiError> {
    let key = key_of(rt, namespace, name);
    let current = store.get(&key);
    let status_only = o.subresource == Some("status");
    if content_type.starts_with("application/apply-patch") {
        if o.manager.is_empty() {
            return Err(ApiError::invalid(rt, name, "fieldManager", "Required value: is required for apply patch"));
        }
        let mut applied = body;
        check_type(rt, o.version, &mut applied)?;
        if name_of(&applied) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&applied)
            )));
        }
        let time = now_rfc3339();
        let api_version = rt.api_version(o.version);
        let w = writer(o, &time, &api_version);
        let next = patch::apply(current.as_deref(), &applied, &w, force, status_only, rt.status)
            .map_err(|c| conflict(rt, name, &c))?;
        return match current {
            None => {
                let mut fresh = next;
                let managed = fresh["metadata"]["managedFields"].take();
                let created = create_keeping(store, rt, namespace, fresh, o)?;
                let mut obj = (*created).clone();
                obj["metadata"]["managedFields"] = managed;
                if o.dry_run {
                    return Ok(Arc::new(obj));
                }
                Ok(store.commit(key, Some(obj)))
            }
            Some(cur) => {
                let mut next = next;
                next["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
                let managed = next["metadata"]["managedFields"].clone();
                let updated = update(store, rt, namespace, name, next, &WriteOpts { dry_run: true, ..*o })?;
                let mut obj = (*updated).clone();
                obj["metadata"]["managedFields"] = managed;
                if unchanged(&cur, &obj) {
                    return Ok(cur);
                }
                Ok(finish(store, key, obj, o.dry_run))
            }
        };
    }
    let current = current.ok_or_else(|| ApiError::not_found(rt, name))?;
    let mut next = (*current).clone();
    if content_type.starts_with("application/json-patch+json") {
        patch::json_patch(&mut next, &body).map_err(|e| ApiError::new(422, "Invalid", e))?;
    } else if content_type.starts_with("application/merge-patch+json")
        || content_type.starts_with("application/strategic-merge-patch+json")
    {
        patch::merge_patch(&mut next, &body);
    } else {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {content_type:?}"
            ),
        ));
    }
    // A resourceVersion in the patch is a precondition; otherwise the patch applies to the latest.
    if body["metadata"]["resourceVersion"].is_null() {
        next["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    }
    update(store, rt, namespace, name, next, o)
}

/// Create for an applied object: keeps what the apply computed, including managedFields.
fn create_keeping(
    store: &mut Store,
    rt: &'static ResourceType,
    namespace: &str,
    obj: Value,
    o: &WriteOpts<'_>,
) -> Result<Arc<Value>, ApiError> {
    create(store, rt, namespace, obj, &WriteOpts { dry_run: true, ..*o }, false)
}

fn conflict(rt: &ResourceType, name: &str, conflicts: &[Conflict]) -> ApiError {
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": c.field}))
        .collect();
    let list: Vec<String> = conflicts.iter().map(|c| format!("conflict with \"{}\": {}", c.manager, c.field)).collect();
    ApiError {
        details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural, "causes": causes})),
        ..ApiError::new(
            409,
            "Conflict",
            format!(
                "Apply failed with {} conflict{}: {}",
                conflicts.len(),
                if conflicts.len() == 1 { "" } else { "s" },
                list.join(", ")
            ),
        )
    }
}

/// DELETE: removes at once (no finalizers, no graceful period) and returns the object as it
/// was. Deleting a namespace deletes what is in it, as the namespace controller would.
pub fn delete(
    store: &mut Store,
    rt: &'static ResourceType,
    namespace: &str,
    name: &str,
    preconditions: &Value,
    dry_run: bool,
) -> Result<Arc<Value>, ApiError> {
    let key = key_of(rt, namespace, name);
    let current = store.get(&key).ok_or_else(|| ApiError::not_found(rt, name))?;
    for (field, path) in [("uid", "uid"), ("resourceVersion", "resourceVersion")] {
        if let Some(want) = preconditions[field].as_str()
            && current["metadata"][path].as_str() != Some(want)
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: {field}: {want}",
                    rt.qualified()
                ),
            ));
        }
    }
    if dry_run {
        return Ok(current);
    }
    if (rt.group, rt.kind) == ("", "Namespace") {
        for t in TYPES.iter().filter(|t| t.namespaced && !t.create_only) {
            for obj in store.list(t, Some(name)) {
                store.commit(key_of(t, name, obj["metadata"]["name"].as_str().unwrap_or_default()), None);
            }
        }
    }
    Ok(store.commit(key, None))
}

/// The API server's validation of a new `events.k8s.io/v1` Event (ValidateEventCreate): the fields
/// a reporter must set, their length limits, and the Event living in its object's namespace.
fn check_event(rt: &ResourceType, e: &Value) -> Result<(), ApiError> {
    let name = name_of(e);
    let bad = |field: &str, why: &str| Err(ApiError::invalid(rt, name, field, why));
    let text = |f: &str| e[f].as_str().unwrap_or_default();
    if text("eventTime").is_empty() {
        return bad("eventTime", "Required value");
    }
    for (field, max) in [("reportingController", 100), ("reportingInstance", 128), ("action", 128), ("reason", 128)] {
        match text(field).len() {
            0 => return bad(field, "Required value"),
            n if n > max => return bad(field, &format!("Too long: may not be more than {max} bytes")),
            _ => {}
        }
    }
    let controller = text("reportingController");
    let (prefix, short) = controller.rsplit_once('/').unwrap_or(("", controller));
    let qualified = !short.is_empty()
        && short.len() <= 63
        && short.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && short.as_bytes()[0].is_ascii_alphanumeric()
        && short.as_bytes()[short.len() - 1].is_ascii_alphanumeric()
        && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
    if !qualified {
        return bad("reportingController", "must be a qualified name (e.g. example.com/my-controller)");
    }
    if !matches!(text("type"), "Normal" | "Warning") {
        return bad("type", "Unsupported value: supported values: \"Normal\", \"Warning\"");
    }
    if text("note").len() > 1024 {
        return bad("note", "Too long: may not be more than 1024 bytes");
    }
    let event_ns = e["metadata"]["namespace"].as_str().unwrap_or_default();
    if let Some(ns) = e["regarding"]["namespace"].as_str().filter(|ns| !ns.is_empty())
        && ns != event_ns
    {
        return bad("regarding.namespace", "does not match event.namespace");
    }
    if let Some(series) = e.get("series").filter(|s| !s.is_null()) {
        if series["count"].as_i64().unwrap_or(0) < 2 {
            return bad("series.count", "should be at least 2");
        }
        if series["lastObservedTime"].as_str().unwrap_or_default().is_empty() {
            return bad("series.lastObservedTime", "Required value");
        }
    }
    Ok(())
}
