//! The local-mode source: one multi-document YAML file of Kubernetes-shaped objects (`v1`
//! Namespace, ServiceAccount, Pod, Service; `security.istio.io` AuthorizationPolicy and
//! PeerAuthentication; `networking.istio.io` VirtualService, DestinationRule and EnvoyFilter;
//! `gateway.networking.k8s.io` Gateway and HTTPRoute) turned into a [`State`], and re-read when it
//! changes or on SIGHUP. The traffic-management resources are only shape-checked here and land in
//! [`crate::state::RoutingConfig`]: a waypoint compiles them and reports what it cannot use.
//!
//! The file is held to what the API server would accept, because a local mesh that accepts what
//! a cluster refuses teaches the wrong YAML: objects need a declared namespace (`default` exists
//! implicitly), pods name a ServiceAccount that exists (`default` implicitly), names are unique per
//! kind and namespace, and spec structs of the Istio resources reject unknown fields. What a cluster
//! fills in by itself must be written out here: `status.podIP(s)` and `spec.clusterIP(s)`
//! (there is no IPAM), and the pod's network namespace in the annotation `weft.io/netns`.
//!
//! Every error names the file, the document (1-based, counting empty ones, as an editor's `---`
//! separators do), the object and the field, e.g.
//! `mesh.yaml: document 3 (Pod demo/client): status.podIP: invalid IP address "10.0.0.x"`.

pub(super) mod build;
#[cfg(test)]
mod tests;

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::state::{State, StateStore};

/// Annotation naming the pod's network namespace: a name under `/var/run/netns`, or an absolute
/// path.
pub const NETNS_ANNOTATION: &str = "weft.io/netns";

/// How often the file's metadata is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// What the file does not say and the agent knows.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// SPIFFE trust domain of every workload (`cluster.local` unless configured).
    pub trust_domain: String,
    /// This node's name; pods without `spec.nodeName` run here.
    pub node_name: String,
    /// Istio's root namespace: policies there apply mesh-wide.
    pub root_namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{file}: cannot read: {source}; check the path and that the agent may read it")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not UTF-8 text; save the file as UTF-8")]
    NotUtf8 { file: String },
    #[error("{}", describe(.file, *.doc, .object.as_deref(), .field.as_deref(), .reason))]
    Invalid {
        file: String,
        /// 1-based document index.
        doc: usize,
        /// `Kind namespace/name` (or `Kind name`), when known.
        object: Option<String>,
        /// Path of the offending field inside the object, when there is one.
        field: Option<String>,
        reason: String,
    },
}

fn describe(file: &str, doc: usize, object: Option<&str>, field: Option<&str>, reason: &str) -> String {
    let mut s = format!("{file}: document {doc}");
    if let Some(o) = object {
        s += &format!(" ({o})");
    }
    s += ": ";
    if let Some(f) = field {
        s += f;
        s += ": ";
    }
    s + reason
}

impl FileError {
    /// 1-based document index, for errors about one document.
    pub fn document(&self) -> Option<usize> {
        match self {
            FileError::Invalid { doc, .. } => Some(*doc),
            _ => None,
        }
    }

    /// The offending field's path inside its object, when the error has one.
    pub fn field(&self) -> Option<&str> {
        match self {
            FileError::Invalid { field, .. } => field.as_deref(),
            _ => None,
        }
    }
}

/// Parses a multi-document YAML file of Kubernetes-shaped objects into a State.
pub fn load(path: &Path, opts: &FileOptions) -> Result<State, FileError> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| FileError::Read { file: origin.clone(), source })?;
    let text = String::from_utf8(bytes).map_err(|_| FileError::NotUtf8 { file: origin.clone() })?;
    parse(&text, &origin, opts)
}

/// Parses `text`; `origin` is how errors name the file.
pub fn parse(text: &str, origin: &str, opts: &FileOptions) -> Result<State, FileError> {
    let objects = read_documents(text, origin)?;
    build::build(objects, origin, opts)
}

/// The parsed objects of one file, each with its 1-based document index.
#[derive(Default)]
struct Objects {
    namespaces: Vec<(usize, k8s_openapi::api::core::v1::Namespace)>,
    service_accounts: Vec<(usize, k8s_openapi::api::core::v1::ServiceAccount)>,
    pods: Vec<(usize, k8s_openapi::api::core::v1::Pod)>,
    services: Vec<(usize, k8s_openapi::api::core::v1::Service)>,
    authorization_policies: Vec<(usize, crate::crd::AuthorizationPolicy)>,
    peer_authentications: Vec<(usize, crate::crd::PeerAuthentication)>,
    virtual_services: Vec<(usize, crate::crd::VirtualService)>,
    destination_rules: Vec<(usize, crate::crd::DestinationRule)>,
    envoy_filters: Vec<(usize, crate::crd::EnvoyFilter)>,
    gateways: Vec<(usize, crate::crd::Gateway)>,
    http_routes: Vec<(usize, crate::crd::HTTPRoute)>,
}

const ISTIO_SECURITY_VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
const ISTIO_NETWORKING_VERSIONS: &[&str] =
    &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"];
const ENVOY_FILTER_VERSIONS: &[&str] = &["networking.istio.io/v1alpha3"];
const GATEWAY_API_VERSIONS: &[&str] = &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"];

fn read_documents(text: &str, file: &str) -> Result<Objects, FileError> {
    let mut objects = Objects::default();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let invalid = |object: Option<String>, field: Option<String>, reason: String| FileError::Invalid {
            file: file.to_owned(),
            doc,
            object,
            field,
            reason,
        };
        let value = serde_yaml_ng::Value::deserialize(de).map_err(|e| invalid(None, None, format!("YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        if !value.is_mapping() {
            return Err(invalid(
                None,
                None,
                "expected a Kubernetes object (a mapping with apiVersion and kind)".into(),
            ));
        }
        let text_field = |key: &str| -> Result<String, FileError> {
            match &value[key] {
                serde_yaml_ng::Value::String(s) if !s.is_empty() => Ok(s.clone()),
                serde_yaml_ng::Value::Null => Err(invalid(None, Some(key.into()), "required".into())),
                _ => Err(invalid(None, Some(key.into()), "must be a non-empty string".into())),
            }
        };
        let api_version = text_field("apiVersion")?;
        let kind = text_field("kind")?;
        let name = value["metadata"]["name"].as_str().unwrap_or("");
        let object = match value["metadata"]["namespace"].as_str() {
            _ if kind == "Namespace" => format!("{kind} {name}"),
            Some(ns) => format!("{kind} {ns}/{name}"),
            None => format!("{kind} default/{name}"),
        };
        let expected: &[&str] = match kind.as_str() {
            "Namespace" | "ServiceAccount" | "Pod" | "Service" => &["v1"],
            "AuthorizationPolicy" | "PeerAuthentication" => ISTIO_SECURITY_VERSIONS,
            "VirtualService" | "DestinationRule" => ISTIO_NETWORKING_VERSIONS,
            "EnvoyFilter" => ENVOY_FILTER_VERSIONS,
            "Gateway" | "HTTPRoute" => GATEWAY_API_VERSIONS,
            _ => {
                return Err(invalid(
                    Some(object),
                    Some("kind".into()),
                    format!(
                        "unsupported kind {kind:?}; the local file accepts Namespace, ServiceAccount, Pod, Service, \
                         AuthorizationPolicy, PeerAuthentication, VirtualService, DestinationRule, EnvoyFilter, \
                         Gateway and HTTPRoute"
                    ),
                ));
            }
        };
        if !expected.contains(&api_version.as_str()) {
            return Err(invalid(
                Some(object),
                Some("apiVersion".into()),
                format!("{api_version:?} does not serve {kind}; use {}", expected.join(" or ")),
            ));
        }
        match kind.as_str() {
            "Namespace" => objects.namespaces.push((doc, typed(value, &object, &invalid)?)),
            "ServiceAccount" => objects.service_accounts.push((doc, typed(value, &object, &invalid)?)),
            "Pod" => objects.pods.push((doc, typed(value, &object, &invalid)?)),
            "Service" => objects.services.push((doc, typed(value, &object, &invalid)?)),
            "AuthorizationPolicy" => objects.authorization_policies.push((doc, typed(value, &object, &invalid)?)),
            "PeerAuthentication" => objects.peer_authentications.push((doc, typed(value, &object, &invalid)?)),
            "VirtualService" => objects.virtual_services.push((doc, typed(value, &object, &invalid)?)),
            "DestinationRule" => objects.destination_rules.push((doc, typed(value, &object, &invalid)?)),
            "EnvoyFilter" => objects.envoy_filters.push((doc, typed(value, &object, &invalid)?)),
            "Gateway" => objects.gateways.push((doc, typed(value, &object, &invalid)?)),
            _ => objects.http_routes.push((doc, typed(value, &object, &invalid)?)),
        }
    }
    Ok(objects)
}

/// Deserializes one object, turning serde's complaint into the path of the field it was about.
fn typed<T: DeserializeOwned>(
    value: serde_yaml_ng::Value,
    object: &str,
    invalid: &impl Fn(Option<String>, Option<String>, String) -> FileError,
) -> Result<T, FileError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        invalid(Some(object.to_owned()), field, e.into_inner().to_string())
    })
}

/// What identifies one version of the file: cheap metadata first, the content hash to be sure.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    hash: u64,
}

async fn stat(path: &Path) -> std::io::Result<(Option<SystemTime>, u64)> {
    let m = tokio::fs::metadata(path).await?;
    Ok((m.modified().ok(), m.len()))
}

async fn read_with_fingerprint(path: &Path) -> std::io::Result<(Vec<u8>, Fingerprint)> {
    let (modified, _) = stat(path).await?;
    let bytes = tokio::fs::read(path).await?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    let fp = Fingerprint { modified, len: bytes.len() as u64, hash: h.finish() };
    Ok((bytes, fp))
}

/// Re-loads on SIGHUP or when the file changes; a bad file keeps the last good State (error logged
/// with file, document, field). Returns when `shutdown` resolves.
///
/// The caller loads the file first (so a bad file fails startup) and puts the result in `store`;
/// `watch` takes the file as it is when called as what the store holds. SIGHUP always re-reads.
pub async fn watch(path: PathBuf, opts: FileOptions, store: Arc<StateStore>, shutdown: impl Future<Output = ()>) {
    let file = path.display().to_string();
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(file, error = %e, "cannot listen for SIGHUP; reloading on file changes only");
            None
        }
    };
    let mut seen: Option<Fingerprint> = read_with_fingerprint(&path).await.ok().map(|(_, fp)| fp);
    let mut read_error_logged = false;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let forced = tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        if !forced {
            match stat(&path).await {
                Ok((modified, len)) => {
                    if seen.as_ref().is_some_and(|s| s.modified == modified && s.len == len) {
                        continue;
                    }
                }
                Err(e) => {
                    if !read_error_logged {
                        tracing::warn!(file, error = %e, "config file unreadable; keeping the last good configuration");
                        read_error_logged = true;
                    }
                    continue;
                }
            }
        }
        let (bytes, fp) = match read_with_fingerprint(&path).await {
            Ok(r) => r,
            Err(e) => {
                if !read_error_logged {
                    tracing::warn!(file, error = %e, "config file unreadable; keeping the last good configuration");
                    read_error_logged = true;
                }
                continue;
            }
        };
        read_error_logged = false;
        let unchanged = seen.as_ref().is_some_and(|s| s.hash == fp.hash && s.len == fp.len);
        seen = Some(fp);
        if unchanged && !forced {
            continue;
        }
        let result = match String::from_utf8(bytes) {
            Ok(text) => parse(&text, &file, &opts),
            Err(_) => Err(FileError::NotUtf8 { file: file.clone() }),
        };
        match result {
            Ok(state) => {
                let workloads = state.workloads_by_ip.len();
                let services = state.services_by_vip.len();
                let local = state.local_captured(&opts.node_name).len();
                store.replace(state);
                tracing::info!(file, workloads, services, local_captured = local, forced, "config reloaded");
            }
            Err(e) => tracing::error!(
                file,
                document = e.document(),
                field = e.field(),
                error = %e,
                "config file rejected; keeping the last good configuration"
            ),
        }
    }
}
