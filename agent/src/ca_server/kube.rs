//! [`ClusterLookup`] against a real Kubernetes API server with kube-rs.
//!
//! Owns: the three API calls (create TokenReview, get Pod, list Pods by `spec.nodeName`) and turning
//! their objects into the plain structs `authz` decides on. Does not own: any decision. RBAC the CA's
//! ServiceAccount needs: `create` on `tokenreviews.authentication.k8s.io`, `get` and `list` on `pods`.

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use super::authz::{ClusterLookup, LookupError, PodInfo, TokenReviewStatus};

/// Lookups through a kube-rs [`Client`].
#[derive(Clone)]
pub struct KubeLookup {
    client: Client,
}

impl KubeLookup {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

fn failed(what: impl std::fmt::Display) -> impl FnOnce(kube::Error) -> LookupError {
    move |e| LookupError(format!("{what}: {e}"))
}

impl ClusterLookup for KubeLookup {
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<TokenReviewStatus, LookupError>> {
        Box::pin(async move {
            let api: Api<TokenReview> = Api::all(self.client.clone());
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: token.to_owned(),
                    audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
                },
                ..Default::default()
            };
            let done = api.create(&PostParams::default(), &review).await.map_err(failed("creating a TokenReview"))?;
            let status = done.status.unwrap_or_default();
            let user = status.user.unwrap_or_default();
            Ok(TokenReviewStatus {
                authenticated: status.authenticated.unwrap_or(false),
                username: user.username.unwrap_or_default(),
                extra: user.extra.unwrap_or_default().into_iter().collect(),
                audiences: status.audiences.unwrap_or_default(),
                error: status.error,
            })
        })
    }

    fn pod<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<Option<PodInfo>, LookupError>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let pod = api.get_opt(name).await.map_err(failed(format!("reading pod {namespace}/{name}")))?;
            Ok(pod.map(pod_info))
        })
    }

    fn pods_on_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Vec<PodInfo>, LookupError>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::all(self.client.clone());
            let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
            let list = api.list(&lp).await.map_err(failed(format!("listing pods on node {node}")))?;
            Ok(list.items.into_iter().map(pod_info).collect())
        })
    }
}

fn pod_info(pod: Pod) -> PodInfo {
    let spec = pod.spec.unwrap_or_default();
    PodInfo {
        namespace: pod.metadata.namespace.unwrap_or_default(),
        name: pod.metadata.name.unwrap_or_default(),
        uid: pod.metadata.uid.unwrap_or_default(),
        service_account: spec.service_account_name.unwrap_or_default(),
        node_name: spec.node_name,
        phase: pod.status.and_then(|s| s.phase),
    }
}
