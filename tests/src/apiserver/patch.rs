//! PATCH bodies and field ownership: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and
//! server-side apply with `metadata.managedFields`.
//!
//! Simplifications against the real API server, all on the safe side for a client under test:
//! strategic merge patch is applied as a merge patch (lists are replaced, not merged by key), and
//! server-side apply treats every list as atomic (real SSA merges associative lists such as
//! `containers` by their key). Ownership, conflicts (409 unless `force`), removal of fields a
//! manager stops applying, and the `fieldsV1` encoding of managedFields are as in Kubernetes.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// A leaf field: the keys from the object root (`["spec", "selector", "app"]`).
pub type FieldPath = Vec<String>;

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn pointer_parts(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path.strip_prefix('/').ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok(rest.split('/').map(|p| p.replace("~1", "/").replace("~0", "~")).collect())
}

fn parent_mut<'a>(doc: &'a mut Value, parts: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for p in &parts[..parts.len().saturating_sub(1)] {
        cur = match cur {
            Value::Object(m) => m.get_mut(p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("path component {p:?} not found"))?;
    }
    Ok(cur)
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let parts = pointer_parts(path)?;
    let Some(last) = parts.last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, &parts)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) if last == "-" => a.push(value),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("invalid array index {last:?}"))?;
            if i > a.len() {
                return Err(format!("array index {i} out of bounds"));
            }
            a.insert(i, value);
        }
        _ => return Err(format!("cannot add at {path:?}")),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let parts = pointer_parts(path)?;
    let last = parts.last().ok_or("cannot remove the whole document")?;
    match parent_mut(doc, &parts)? {
        Value::Object(m) => m.remove(last).ok_or_else(|| format!("{path:?} not found")),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("invalid array index {last:?}"))?;
            (i < a.len()).then(|| a.remove(i)).ok_or_else(|| format!("array index {i} out of bounds"))
        }
        _ => Err(format!("{path:?} not found")),
    }
}

/// RFC 6902.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch is an array of operations")?;
    for op in ops {
        let path = op["path"].as_str().ok_or("operation without path")?;
        match op["op"].as_str() {
            Some("add") => add(doc, path, op["value"].clone())?,
            Some("remove") => {
                remove(doc, path)?;
            }
            Some("replace") => {
                remove(doc, path)?;
                add(doc, path, op["value"].clone())?;
            }
            Some("test") => {
                if doc.pointer(path) != Some(&op["value"]) {
                    return Err(format!("test failed at {path:?}"));
                }
            }
            Some(o @ ("move" | "copy")) => {
                let from = op["from"].as_str().ok_or("move/copy without from")?;
                let v = if o == "move" {
                    remove(doc, from)?
                } else {
                    doc.pointer(from).cloned().ok_or_else(|| format!("{from:?} not found"))?
                };
                add(doc, path, v)?;
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

/// Metadata fields no manager owns.
const UNOWNED_METADATA: &[&str] =
    &["name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "selfLink"];

/// The leaf fields of `obj` that field management tracks (not apiVersion/kind, not
/// server-set metadata). With `status_only`, only `status`; otherwise everything but status
/// when the type has a status subresource.
pub fn leaves(obj: &Value, status_only: bool, has_status: bool) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    path.push(k.clone());
                    walk(child, path, out);
                    path.pop();
                }
            }
            _ => {
                out.insert(path.clone());
            }
        }
    }
    let mut out = BTreeSet::new();
    let Some(m) = obj.as_object() else { return out };
    for (k, v) in m {
        let keep = match k.as_str() {
            "apiVersion" | "kind" => false,
            "status" => status_only || !has_status,
            _ => !status_only,
        };
        if !keep {
            continue;
        }
        if k == "metadata" {
            for (mk, mv) in v.as_object().into_iter().flatten() {
                if UNOWNED_METADATA.contains(&mk.as_str()) {
                    continue;
                }
                let mut path = vec!["metadata".to_owned(), mk.clone()];
                walk(mv, &mut path, &mut out);
            }
        } else {
            let mut path = vec![k.clone()];
            walk(v, &mut path, &mut out);
        }
    }
    out
}

pub fn get<'a>(obj: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    path.iter().try_fold(obj, |v, k| v.as_object()?.get(k))
}

pub fn set(obj: &mut Value, path: &FieldPath, value: Value) {
    let mut cur = obj;
    for k in &path[..path.len() - 1] {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        cur = cur.as_object_mut().expect("object").entry(k.clone()).or_insert(Value::Null);
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    cur.as_object_mut().expect("object").insert(path[path.len() - 1].clone(), value);
}

/// Removes a leaf and the maps it leaves empty.
pub fn unset(obj: &mut Value, path: &FieldPath) {
    fn go(v: &mut Value, path: &[String]) -> bool {
        let Some(m) = v.as_object_mut() else { return false };
        if path.len() == 1 {
            m.remove(&path[0]);
        } else if let Some(child) = m.get_mut(&path[0])
            && go(child, &path[1..])
        {
            m.remove(&path[0]);
        }
        m.is_empty()
    }
    go(obj, path);
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Managed {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub api_version: String,
    pub subresource: Option<String>,
    pub time: String,
    pub fields: BTreeSet<FieldPath>,
}

/// `fieldsV1`: `{"f:spec": {"f:replicas": {}}}`.
fn to_fields_v1(fields: &BTreeSet<FieldPath>) -> Value {
    let mut root = Value::Object(Map::new());
    for path in fields {
        let mut cur = &mut root;
        for k in path {
            cur = cur.as_object_mut().expect("object").entry(format!("f:{k}")).or_insert_with(|| json!({}));
        }
    }
    root
}

fn from_fields_v1(v: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        let m = v.as_object().filter(|m| !m.is_empty());
        match m {
            None if !path.is_empty() => {
                out.insert(path.clone());
            }
            None => {}
            Some(m) => {
                for (k, child) in m {
                    let Some(name) = k.strip_prefix("f:") else { continue };
                    path.push(name.to_owned());
                    walk(child, path, out);
                    path.pop();
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

pub fn read_managed(obj: &Value) -> Vec<Managed> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| Managed {
            manager: e["manager"].as_str().unwrap_or_default().to_owned(),
            operation: e["operation"].as_str().unwrap_or("Update").to_owned(),
            api_version: e["apiVersion"].as_str().unwrap_or_default().to_owned(),
            subresource: e["subresource"].as_str().map(str::to_owned),
            time: e["time"].as_str().unwrap_or_default().to_owned(),
            fields: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

pub fn write_managed(obj: &mut Value, managed: &[Managed]) {
    let entries: Vec<Value> = managed
        .iter()
        .filter(|m| !m.fields.is_empty())
        .map(|m| {
            let mut e = json!({
                "manager": m.manager,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": m.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&m.fields),
            });
            if let Some(s) = &m.subresource {
                e["subresource"] = json!(s);
            }
            e
        })
        .collect();
    if entries.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        obj["metadata"]["managedFields"] = Value::Array(entries);
    }
}

/// Who writes, and how.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub subresource: Option<&'a str>,
    pub time: &'a str,
}

fn entry<'m>(managed: &'m mut Vec<Managed>, w: &Writer<'_>, operation: &str) -> &'m mut Managed {
    let pos = managed
        .iter()
        .position(|m| m.manager == w.manager && m.operation == operation && m.subresource.as_deref() == w.subresource);
    let i = pos.unwrap_or_else(|| {
        managed.push(Managed {
            manager: w.manager.to_owned(),
            operation: operation.to_owned(),
            api_version: w.api_version.to_owned(),
            subresource: w.subresource.map(str::to_owned),
            time: String::new(),
            fields: BTreeSet::new(),
        });
        managed.len() - 1
    });
    let e = &mut managed[i];
    e.time = w.time.to_owned();
    e.api_version = w.api_version.to_owned();
    e
}

/// After a non-apply write (create, update, merge/JSON patch): the writer owns every tracked field
/// whose value it set or changed, and nobody owns fields that are gone.
pub fn record_update(old: Option<&Value>, new: &mut Value, w: &Writer<'_>, status_only: bool, has_status: bool) {
    let mut managed = old.map(read_managed).unwrap_or_default();
    let now = leaves(new, status_only, has_status);
    let changed: BTreeSet<FieldPath> =
        now.iter().filter(|p| old.and_then(|o| get(o, p)) != get(new, p)).cloned().collect();
    for m in managed.iter_mut() {
        let in_scope = m.subresource.as_deref() == w.subresource;
        m.fields.retain(|p| !changed.contains(p) && (!in_scope || now.contains(p)));
    }
    if !changed.is_empty() {
        entry(&mut managed, w, "Update").fields.extend(changed);
    }
    managed.retain(|m| !m.fields.is_empty());
    write_managed(new, &managed);
}

/// A server-side apply conflict: another manager owns a field the applied config sets to a
/// different value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub field: String,
}

/// Server-side apply of `applied` onto `current` (or onto nothing: create). Returns the new
/// object, or the conflicts when another manager owns a changed field and `force` is off.
pub fn apply(
    current: Option<&Value>,
    applied: &Value,
    w: &Writer<'_>,
    force: bool,
    status_only: bool,
    has_status: bool,
) -> Result<Value, Vec<Conflict>> {
    let mut managed = current.map(read_managed).unwrap_or_default();
    let fields = leaves(applied, status_only, has_status);
    let mut conflicts = Vec::new();
    for p in &fields {
        let differs = current.and_then(|c| get(c, p)) != get(applied, p);
        for m in &managed {
            let same = m.manager == w.manager && m.operation == "Apply";
            if !same && differs && m.fields.contains(p) {
                conflicts.push(Conflict { manager: m.manager.clone(), field: format!(".{}", p.join(".")) });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let mut obj = current.cloned().unwrap_or_else(|| json!({}));
    for m in managed.iter_mut() {
        let same = m.manager == w.manager && m.operation == "Apply" && m.subresource.as_deref() == w.subresource;
        if !same {
            m.fields.retain(|p| !(fields.contains(p) && current.and_then(|c| get(c, p)) != get(applied, p)));
        }
    }
    // Fields this manager applied before and no longer does: removed unless someone else owns them.
    let before = managed
        .iter()
        .find(|m| m.manager == w.manager && m.operation == "Apply" && m.subresource.as_deref() == w.subresource)
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    for p in before.difference(&fields) {
        let owned_elsewhere =
            managed.iter().any(|m| !(m.manager == w.manager && m.operation == "Apply") && m.fields.contains(p));
        if !owned_elsewhere {
            unset(&mut obj, p);
        }
    }
    for p in &fields {
        set(&mut obj, p, get(applied, p).cloned().unwrap_or(Value::Null));
    }
    for k in ["apiVersion", "kind"] {
        if let Some(v) = applied.get(k) {
            obj[k] = v.clone();
        }
    }
    for k in ["name", "namespace"] {
        if let Some(v) = applied["metadata"].get(k) {
            obj["metadata"][k] = v.clone();
        }
    }
    entry(&mut managed, w, "Apply").fields = fields;
    managed.retain(|m| !m.fields.is_empty());
    write_managed(&mut obj, &managed);
    Ok(obj)
}

/// Managers by field, for error messages and tests.
pub fn owners(obj: &Value) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in read_managed(obj) {
        for f in m.fields {
            out.entry(format!(".{}", f.join("."))).or_default().push(m.manager.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(manager: &str) -> Writer<'_> {
        Writer { manager, api_version: "v1", subresource: None, time: "2026-01-01T00:00:00Z" }
    }

    #[test]
    fn merge_and_json_patch() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}, "l": [9]}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [9]}));
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/l/-", "value": 10},
                {"op": "replace", "path": "/a/c", "value": 5},
                {"op": "remove", "path": "/a/d"},
                {"op": "test", "path": "/l/1", "value": 10},
            ]),
        )
        .unwrap();
        assert_eq!(doc, json!({"a": {"c": 5}, "l": [9, 10]}));
        assert!(json_patch(&mut doc, &json!([{"op": "test", "path": "/a/c", "value": 6}])).is_err());
    }

    #[test]
    fn apply_owns_conflicts_and_removes() {
        let a = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "labels": {"k": "1"}}, "data": {"a": "1", "b": "2"}});
        let obj = apply(None, &a, &w("alice"), false, false, false).unwrap();
        assert_eq!(owners(&obj)[".data.a"], vec!["alice"]);
        // Same value from another manager: shared ownership, no conflict.
        let b = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1"}});
        let obj = apply(Some(&obj), &b, &w("bob"), false, false, false).unwrap();
        assert_eq!(owners(&obj)[".data.a"], vec!["alice", "bob"]);
        // A different value: conflict, unless forced.
        let b2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"b": "3"}});
        let err = apply(Some(&obj), &b2, &w("bob"), false, false, false).unwrap_err();
        assert_eq!(err, vec![Conflict { manager: "alice".into(), field: ".data.b".into() }]);
        let obj = apply(Some(&obj), &b2, &w("bob"), true, false, false).unwrap();
        assert_eq!(obj["data"], json!({"a": "1", "b": "3"}), "bob stopped applying a, alice still owns it");
        assert_eq!(owners(&obj)[".data.b"], vec!["bob"]);
        // alice stops applying the label and data.a: the label goes, data.a too (bob dropped it).
        let a2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
        let obj = apply(Some(&obj), &a2, &w("alice"), false, false, false).unwrap();
        assert_eq!(obj["data"], json!({"b": "3"}));
        assert!(obj["metadata"].get("labels").is_none());
    }
}
