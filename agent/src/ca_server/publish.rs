//! The root certificate in every namespace: `weft ca` server-side applies its root-certificate
//! ConfigMap in each namespace as it appears (as Istio's namespace controller does with
//! `istio-ca-root-cert`), so waypoints and node agents in any namespace can mount it.
//!
//! Owns: watching Namespaces, which ones get the ConfigMap (all but those being deleted), and
//! retrying a failed apply. Does not own: the ConfigMap's content (`root::publish_root`), or the
//! CA's own namespace at startup (`run` applies that one before serving, and fails if it cannot).
//! A ConfigMap deleted by hand comes back when its namespace changes or the CA restarts.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::root::{CaRoot, publish_root};

/// Attempts per namespace and event before giving up until the namespace's next event.
const ATTEMPTS: u32 = 4;
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// Applies ConfigMap `name` with `root`'s certificate in every namespace, present and future, until
/// `stop` is cancelled. API errors are logged and retried with kube's watcher backoff.
pub async fn publish_in_every_namespace(client: Client, name: String, root: Arc<CaRoot>, stop: CancellationToken) {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    // Namespaces (by uid) that have the current ConfigMap: a label change does not re-apply it.
    let mut done: HashSet<String> = HashSet::new();
    let mut failing = false;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            None => {
                tracing::error!("namespace watch ended; new namespaces no longer get the root ConfigMap");
                return;
            }
            Some(Ok(watcher::Event::Apply(ns) | watcher::Event::InitApply(ns))) => {
                failing = false;
                let (Some(ns_name), uid) = (ns.metadata.name.as_deref(), ns.metadata.uid.clone().unwrap_or_default())
                else {
                    continue;
                };
                // A terminating namespace refuses new objects (403), and would delete it anyway.
                if ns.metadata.deletion_timestamp.is_some() || done.contains(&uid) {
                    continue;
                }
                if apply_with_retries(&client, ns_name, &name, &root, &stop).await {
                    done.insert(uid);
                }
            }
            Some(Ok(watcher::Event::Delete(ns))) => {
                done.remove(&ns.metadata.uid.unwrap_or_default());
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => failing = false,
            Some(Err(e)) => {
                if !failing {
                    tracing::warn!(error = %e, "namespace watch failed; retrying with backoff (new namespaces wait for the root ConfigMap)");
                }
                failing = true;
            }
        }
    }
}

/// `true` once the ConfigMap is applied in `namespace`.
async fn apply_with_retries(
    client: &Client,
    namespace: &str,
    name: &str,
    root: &CaRoot,
    stop: &CancellationToken,
) -> bool {
    let mut wait = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        match publish_root(client, namespace, name, root).await {
            Ok(()) => return true,
            Err(e) if attempt == ATTEMPTS => {
                tracing::warn!(namespace, name, error = %e, "cannot publish the root certificate; retried at the namespace's next change (check the weft-ca ClusterRole: configmaps create/patch)");
            }
            Err(e) => {
                tracing::debug!(namespace, name, attempt, error = %e, "publishing the root certificate failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait *= 2;
            }
        }
    }
    false
}
