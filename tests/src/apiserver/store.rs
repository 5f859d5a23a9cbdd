//! The double's etcd: objects as JSON by (group, kind, namespace, name), one global
//! monotonically increasing resourceVersion, and the change history watches replay from, cut at
//! a controllable compaction point (a watch from before it gets 410 Expired).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::watch;

use super::resources::ResourceType;

/// (group, kind, namespace or `""`, name).
pub type Key = (String, String, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as watches see it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub kind: ChangeType,
    pub group: String,
    pub type_kind: String,
    pub namespace: String,
    /// The object after the write (before it, for deletes), with `resourceVersion` = `rv`.
    pub object: Arc<Value>,
    /// The object before the write, for label-selector transitions.
    pub prev: Option<Arc<Value>>,
}

/// An API error with what the Status object needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details` of the Status (name, group, kind, causes), when there are any.
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into(), details: None }
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> ApiError {
        ApiError {
            details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
            ..ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", rt.qualified()))
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn invalid(rt: &ResourceType, name: &str, field: &str, why: &str) -> ApiError {
        ApiError {
            details: Some(json!({
                "name": name, "group": rt.group, "kind": rt.kind,
                "causes": [{"reason": "FieldValueInvalid", "message": why, "field": field}],
            })),
            ..ApiError::new(422, "Invalid", format!("{} \"{name}\" is invalid: {field}: {why}", rt.kind))
        }
    }

    pub fn expired(asked: u64, oldest: u64) -> ApiError {
        ApiError::new(410, "Expired", format!("too old resource version: {asked} ({oldest})"))
    }

    /// The `Status` object the API server sends for this error.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// Objects, resourceVersion and history. Lives behind the server's mutex.
#[derive(Debug)]
pub struct Store {
    objects: BTreeMap<Key, Arc<Value>>,
    rv: u64,
    history: VecDeque<Arc<Change>>,
    /// Every change with rv <= this is forgotten; watches from before it get 410.
    compacted: u64,
    /// History kept at most this long before older entries are compacted on their own.
    pub max_history: usize,
    notify: watch::Sender<u64>,
    uid_counter: u64,
    next_cluster_ip: u32,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            objects: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            compacted: 0,
            max_history: 100_000,
            notify: watch::channel(1).0,
            uid_counter: 0,
            next_cluster_ip: 1,
        }
    }
}

pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).expect("0 is a valid nanosecond");
    now.format(&time::format_description::well_known::Rfc3339).expect("RFC 3339 formats any UTC time")
}

pub fn key_of(rt: &ResourceType, namespace: &str, name: &str) -> Key {
    (
        rt.group.to_owned(),
        rt.kind.to_owned(),
        if rt.namespaced { namespace.to_owned() } else { String::new() },
        name.to_owned(),
    )
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// Forgets history up to `rv` (at most the current resourceVersion).
    pub fn compact(&mut self, rv: u64) {
        self.compacted = self.compacted.max(rv.min(self.rv));
        while self.history.front().is_some_and(|c| c.rv <= self.compacted) {
            self.history.pop_front();
        }
    }

    /// Compacts the oldest changes beyond `max_history`.
    pub fn trim_history(&mut self) {
        while self.history.len() > self.max_history {
            let oldest = self.history.front().map_or(self.rv, |c| c.rv);
            self.compact(oldest);
        }
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Value>> {
        self.objects.get(key).cloned()
    }

    /// Objects of one type, optionally in one namespace, in key order.
    pub fn list(&self, rt: &ResourceType, namespace: Option<&str>) -> Vec<Arc<Value>> {
        let lo = (rt.group.to_owned(), rt.kind.to_owned(), namespace.unwrap_or("").to_owned(), String::new());
        self.objects
            .range(lo..)
            .take_while(|((g, k, ns, _), _)| g == rt.group && k == rt.kind && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Changes after `rv`, or Expired when some of them were compacted.
    pub fn changes_since(&self, rv: u64) -> Result<Vec<Arc<Change>>, ApiError> {
        if rv < self.compacted {
            return Err(ApiError::expired(rv, self.compacted + 1));
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.range(start..).cloned().collect())
    }

    pub fn new_uid(&mut self) -> String {
        self.uid_counter += 1;
        let seed = std::process::id() as u64 ^ (self as *const Store as u64);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            seed as u32,
            self.rv & 0xffff,
            self.uid_counter & 0xfff,
            (seed >> 32) & 0xfff,
            self.uid_counter
        )
    }

    /// A ClusterIP from 10.96.0.0/16 (the API server allocates them; nothing else here does).
    pub fn allocate_cluster_ip(&mut self) -> String {
        loop {
            let n = self.next_cluster_ip;
            self.next_cluster_ip = self.next_cluster_ip % 65_533 + 1;
            let ip = format!("10.96.{}.{}", n >> 8, n & 0xff);
            let taken = self.objects.iter().any(|((g, k, _, _), v)| {
                g.is_empty() && k == "Service" && v["spec"]["clusterIP"].as_str() == Some(ip.as_str())
            });
            if !taken && n & 0xff != 0 {
                return ip;
            }
        }
    }

    /// Stores `obj` (already complete but for its resourceVersion) under `key` and records the
    /// change. `None` deletes.
    pub fn commit(&mut self, key: Key, obj: Option<Value>) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        let prev = self.objects.get(&key).cloned();
        let (kind, object) = match obj {
            Some(mut o) => {
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                let o = Arc::new(o);
                self.objects.insert(key.clone(), o.clone());
                (if prev.is_some() { ChangeType::Modified } else { ChangeType::Added }, o)
            }
            None => {
                let mut o = (*self.objects.remove(&key).expect("delete of a stored object")).clone();
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                (ChangeType::Deleted, Arc::new(o))
            }
        };
        self.history.push_back(Arc::new(Change {
            rv,
            kind,
            group: key.0,
            type_kind: key.1,
            namespace: key.2,
            object: object.clone(),
            prev,
        }));
        self.trim_history();
        self.notify.send_replace(rv);
        object
    }
}
