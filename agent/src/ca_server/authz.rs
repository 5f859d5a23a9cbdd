//! Who may have which certificate: bearer token → TokenReview → caller → requested identity → node check.
//!
//! Owns: the [`ClusterLookup`] seam (the three Kubernetes reads the decision needs, faked in tests), and
//! [`Authorizer::authorize`], Istio's rules: a caller always may have its own ServiceAccount's identity;
//! a configured node agent may also have the identity of any pod scheduled on its own node (Istio's
//! "node authorizer"); nobody else gets anything. Does not own: parsing the gRPC request, the CSR, or
//! signing (`service`), nor how the lookups reach the API server (`kube`).

use std::collections::BTreeMap;

use futures::future::BoxFuture;

use crate::identity::Identity;

/// TokenReview `status.user.extra` key naming the node of the pod the token is bound to (set by
/// Kubernetes ≥ 1.30 for pod-bound projected tokens).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// TokenReview `status.user.extra` key naming the pod the token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// TokenReview `status.user.extra` key carrying that pod's UID.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

const SA_USER_PREFIX: &str = "system:serviceaccount:";

/// What a TokenReview said about a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenReviewStatus {
    pub authenticated: bool,
    /// `status.user.username`, e.g. `system:serviceaccount:weft-system:weft-node`.
    pub username: String,
    /// `status.user.extra`.
    pub extra: BTreeMap<String, Vec<String>>,
    /// `status.audiences`: the requested audiences the token is valid for.
    pub audiences: Vec<String>,
    /// `status.error`, when the API server gave a reason for refusing the token.
    pub error: Option<String>,
}

/// The parts of a Pod the decision uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.serviceAccountName` (Kubernetes defaults it to `default`).
    pub service_account: String,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node_name: Option<String>,
    /// `status.phase`.
    pub phase: Option<String>,
}

impl PodInfo {
    /// Succeeded and Failed pods run nothing, so they need no certificate.
    fn is_running_or_pending(&self) -> bool {
        !matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// A Kubernetes read failed (API server unreachable, RBAC, …): the caller should retry later.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct LookupError(pub String);

/// The Kubernetes reads the CA's decisions need. The real one is [`super::KubeLookup`].
pub trait ClusterLookup: Send + Sync + 'static {
    /// Creates a TokenReview for `token` with `spec.audiences = audiences`.
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<TokenReviewStatus, LookupError>>;

    /// The pod `namespace/name`, or `None` if it does not exist.
    fn pod<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<Option<PodInfo>, LookupError>>;

    /// Every pod with `spec.nodeName = node`, in all namespaces.
    fn pods_on_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Vec<PodInfo>, LookupError>>;
}

/// Why a caller gets no certificate. Each maps to one gRPC status (see `service`).
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error(
        "no bearer token: send the caller's projected ServiceAccount token (audience {audience}) as gRPC metadata \
         `authorization: Bearer <token>`"
    )]
    MissingToken { audience: String },

    #[error("the bearer token was not accepted by the Kubernetes API (TokenReview): {reason}")]
    TokenRejected { reason: String },

    #[error(
        "the bearer token is valid for audiences {got:?}, not {want:?}; project the ServiceAccount token with \
         audience {want:?}"
    )]
    WrongAudience { got: Vec<String>, want: Vec<String> },

    #[error(
        "the caller {username:?} is not a ServiceAccount; only ServiceAccount tokens can obtain workload certificates"
    )]
    NotServiceAccount { username: String },

    #[error("ImpersonatedIdentity {value:?} is not a workload SPIFFE ID: {reason}")]
    BadImpersonatedIdentity { value: String, reason: String },

    #[error("{identity} is in trust domain {got:?} but this CA signs only for {want:?}")]
    WrongTrustDomain { identity: String, got: String, want: String },

    #[error(
        "caller {caller} asked for {requested}, but it may only have its own identity {own}; only node agents \
         (ServiceAccounts {node_agents:?}) may request identities of pods on their node"
    )]
    NotNodeAgent { caller: String, requested: String, own: String, node_agents: Vec<String> },

    #[error(
        "cannot tell which node the node agent {caller} runs on: {reason}; the node agent must use a projected \
         ServiceAccount token bound to its pod"
    )]
    NodeUnknown { caller: String, reason: String },

    #[error(
        "node agent {caller} on node {node:?} asked for {requested}, but no pod with ServiceAccount {sa:?} in \
         namespace {namespace:?} is scheduled on that node; a node agent may only get identities of pods on its \
         own node"
    )]
    NotOnNode { caller: String, node: String, requested: String, namespace: String, sa: String },

    #[error("a Kubernetes API lookup failed while authorizing the request: {0}; retry later")]
    Lookup(#[from] LookupError),
}

/// A successful decision: sign for `identity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub identity: Identity,
    /// The caller's Kubernetes username.
    pub caller: String,
    /// The node a node agent runs on; `None` when the caller asked for its own identity.
    pub node: Option<String>,
}

/// The authorization rules, with their configuration.
pub struct Authorizer {
    lookup: std::sync::Arc<dyn ClusterLookup>,
    trust_domain: String,
    /// Usernames (`system:serviceaccount:NS:SA`) of node agents.
    node_agents: Vec<String>,
    audiences: Vec<String>,
}

impl Authorizer {
    pub fn new(
        lookup: std::sync::Arc<dyn ClusterLookup>,
        trust_domain: String,
        node_agents: Vec<String>,
        audiences: Vec<String>,
    ) -> Self {
        Self { lookup, trust_domain, node_agents, audiences }
    }

    /// The identity `token`'s owner may have, given what it asked for (`impersonated`, the raw
    /// `ImpersonatedIdentity` metadata; `None` means "my own identity").
    pub async fn authorize(&self, token: Option<&str>, impersonated: Option<&str>) -> Result<Grant, Denied> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Denied::MissingToken { audience: self.audiences.first().cloned().unwrap_or_default() })?;
        let review = self.lookup.review_token(token, &self.audiences).await?;
        if !review.authenticated {
            return Err(Denied::TokenRejected {
                reason: review.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into()),
            });
        }
        // The API server only lists audiences the token matched; an empty list means it did not say.
        if !self.audiences.is_empty()
            && !review.audiences.is_empty()
            && !review.audiences.iter().any(|a| self.audiences.contains(a))
        {
            return Err(Denied::WrongAudience { got: review.audiences, want: self.audiences.clone() });
        }
        let caller = review.username.clone();
        let (caller_ns, caller_sa) =
            parse_sa_username(&caller).ok_or_else(|| Denied::NotServiceAccount { username: caller.clone() })?;
        let own = Identity::new(&self.trust_domain, caller_ns, caller_sa);

        let requested = match impersonated.filter(|s| !s.is_empty()) {
            None => own.clone(),
            Some(value) => value.parse::<Identity>().map_err(|e| Denied::BadImpersonatedIdentity {
                value: value.to_owned(),
                reason: match e {
                    crate::identity::Error::InvalidSpiffeId { reason, .. } => reason,
                    other => other.to_string(),
                },
            })?,
        };
        if requested.trust_domain != self.trust_domain {
            return Err(Denied::WrongTrustDomain {
                identity: requested.to_string(),
                got: requested.trust_domain.clone(),
                want: self.trust_domain.clone(),
            });
        }
        if requested == own {
            return Ok(Grant { identity: requested, caller, node: None });
        }
        if !self.node_agents.contains(&caller) {
            return Err(Denied::NotNodeAgent {
                caller,
                requested: requested.to_string(),
                own: own.to_string(),
                node_agents: self.node_agents.clone(),
            });
        }

        let node = self.node_of(&caller, caller_ns, &review.extra).await?;
        let pods = self.lookup.pods_on_node(&node).await?;
        let found = pods.iter().any(|p| {
            p.node_name.as_deref() == Some(node.as_str())
                && p.namespace == requested.namespace
                && sa_or_default(&p.service_account) == requested.service_account
                && p.is_running_or_pending()
        });
        if !found {
            return Err(Denied::NotOnNode {
                caller,
                node,
                requested: requested.to_string(),
                namespace: requested.namespace.clone(),
                sa: requested.service_account.clone(),
            });
        }
        Ok(Grant { identity: requested, caller, node: Some(node) })
    }

    /// The node of the pod the node agent's token is bound to: straight from the TokenReview when the API
    /// server says it, otherwise from the bound pod's `spec.nodeName` (checking it is the same pod).
    async fn node_of(
        &self,
        caller: &str,
        caller_ns: &str,
        extra: &BTreeMap<String, Vec<String>>,
    ) -> Result<String, Denied> {
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned();
        if let Some(node) = first(EXTRA_NODE_NAME) {
            return Ok(node);
        }
        let unknown = |reason: String| Denied::NodeUnknown { caller: caller.to_owned(), reason };
        let pod_name = first(EXTRA_POD_NAME)
            .ok_or_else(|| unknown(format!("the token names neither {EXTRA_NODE_NAME} nor {EXTRA_POD_NAME}")))?;
        let pod = self
            .lookup
            .pod(caller_ns, &pod_name)
            .await?
            .ok_or_else(|| unknown(format!("its pod {caller_ns}/{pod_name} no longer exists")))?;
        if let Some(uid) = first(EXTRA_POD_UID)
            && pod.uid != uid
        {
            return Err(unknown(format!(
                "its pod {caller_ns}/{pod_name} was replaced (token bound to UID {uid}, pod now has {})",
                pod.uid
            )));
        }
        pod.node_name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| unknown(format!("its pod {caller_ns}/{pod_name} is not scheduled")))
    }
}

/// `system:serviceaccount:NS:SA` → (NS, SA).
fn parse_sa_username(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix(SA_USER_PREFIX)?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then_some((ns, sa))
}

fn sa_or_default(sa: &str) -> &str {
    if sa.is_empty() { "default" } else { sa }
}

/// The Kubernetes username of a ServiceAccount, as TokenReview reports it.
pub fn sa_username(namespace: &str, service_account: &str) -> String {
    format!("{SA_USER_PREFIX}{namespace}:{service_account}")
}

#[cfg(test)]
pub(crate) mod fake {
    //! An in-memory [`ClusterLookup`]: tokens map to review results, pods are a list.

    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    pub struct FakeLookup {
        pub tokens: Mutex<HashMap<String, TokenReviewStatus>>,
        pub pods: Mutex<Vec<PodInfo>>,
        pub fail: std::sync::atomic::AtomicBool,
        pub reviews: AtomicUsize,
        pub last_audiences: Mutex<Vec<String>>,
    }

    impl FakeLookup {
        /// A token for `ns/sa`, bound to pod `pod` on `node` (node name in the extras when `node_extra`).
        pub fn add_sa_token(&self, token: &str, ns: &str, sa: &str, pod: Option<(&str, &str)>, node_extra: bool) {
            let mut extra = BTreeMap::new();
            if let Some((pod, node)) = pod {
                extra.insert(EXTRA_POD_NAME.to_owned(), vec![pod.to_owned()]);
                extra.insert(EXTRA_POD_UID.to_owned(), vec![format!("uid-{pod}")]);
                if node_extra {
                    extra.insert(EXTRA_NODE_NAME.to_owned(), vec![node.to_owned()]);
                }
            }
            self.tokens.lock().unwrap().insert(
                token.to_owned(),
                TokenReviewStatus {
                    authenticated: true,
                    username: sa_username(ns, sa),
                    extra,
                    audiences: vec!["istio-ca".into()],
                    error: None,
                },
            );
        }

        pub fn add_pod(&self, ns: &str, name: &str, sa: &str, node: &str) {
            self.pods.lock().unwrap().push(PodInfo {
                namespace: ns.into(),
                name: name.into(),
                uid: format!("uid-{name}"),
                service_account: sa.into(),
                node_name: Some(node.into()),
                phase: Some("Running".into()),
            });
        }
    }

    impl ClusterLookup for FakeLookup {
        fn review_token<'a>(
            &'a self,
            token: &'a str,
            audiences: &'a [String],
        ) -> BoxFuture<'a, Result<TokenReviewStatus, LookupError>> {
            self.reviews.fetch_add(1, Ordering::SeqCst);
            *self.last_audiences.lock().unwrap() = audiences.to_vec();
            let result =
                if self.fail.load(Ordering::SeqCst) {
                    Err(LookupError("fake API server is down".into()))
                } else {
                    Ok(self.tokens.lock().unwrap().get(token).cloned().unwrap_or(TokenReviewStatus {
                        error: Some("invalid bearer token".into()),
                        ..Default::default()
                    }))
                };
            Box::pin(std::future::ready(result))
        }

        fn pod<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<Option<PodInfo>, LookupError>> {
            let pod = self.pods.lock().unwrap().iter().find(|p| p.namespace == namespace && p.name == name).cloned();
            Box::pin(std::future::ready(Ok(pod)))
        }

        fn pods_on_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Vec<PodInfo>, LookupError>> {
            let pods =
                self.pods.lock().unwrap().iter().filter(|p| p.node_name.as_deref() == Some(node)).cloned().collect();
            Box::pin(std::future::ready(Ok(pods)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::fake::FakeLookup;
    use super::*;

    const TD: &str = "cluster.local";
    const NODE_AGENT: &str = "system:serviceaccount:weft-system:weft-node";

    fn setup() -> (Arc<FakeLookup>, Authorizer) {
        let lookup = Arc::new(FakeLookup::default());
        // Node agents on node-a (node name in the token) and node-b (only the pod name in the token).
        lookup.add_sa_token("agent-a", "weft-system", "weft-node", Some(("weft-node-a", "node-a")), true);
        lookup.add_sa_token("agent-b", "weft-system", "weft-node", Some(("weft-node-b", "node-b")), false);
        lookup.add_pod("weft-system", "weft-node-a", "weft-node", "node-a");
        lookup.add_pod("weft-system", "weft-node-b", "weft-node", "node-b");
        lookup.add_pod("shop", "web-1", "web", "node-a");
        lookup.add_pod("shop", "db-1", "db", "node-b");
        lookup.add_pod("shop", "plain-1", "", "node-a");
        lookup.add_sa_token("web-token", "shop", "web", Some(("web-1", "node-a")), true);
        let authz = Authorizer::new(lookup.clone(), TD.into(), vec![NODE_AGENT.into()], vec!["istio-ca".into()]);
        (lookup, authz)
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new(TD, ns, sa)
    }

    #[tokio::test]
    async fn node_agent_gets_identities_of_pods_on_its_node_only() {
        let (lookup, authz) = setup();
        let web = id("shop", "web").to_string();
        let db = id("shop", "db").to_string();

        let grant = authz.authorize(Some("agent-a"), Some(&web)).await.unwrap();
        assert_eq!(grant.identity, id("shop", "web"));
        assert_eq!(grant.node.as_deref(), Some("node-a"));
        assert_eq!(grant.caller, NODE_AGENT);
        assert_eq!(*lookup.last_audiences.lock().unwrap(), vec!["istio-ca".to_owned()]);

        let err = authz.authorize(Some("agent-a"), Some(&db)).await.unwrap_err();
        assert!(matches!(&err, Denied::NotOnNode { node, .. } if node == "node-a"), "{err}");
        assert!(err.to_string().contains("no pod with ServiceAccount \"db\""), "{err}");

        // node-b's agent (node found through its bound pod) gets db but not web.
        let grant = authz.authorize(Some("agent-b"), Some(&db)).await.unwrap();
        assert_eq!(grant.node.as_deref(), Some("node-b"));
        assert!(matches!(authz.authorize(Some("agent-b"), Some(&web)).await, Err(Denied::NotOnNode { .. })));

        // An empty serviceAccountName means "default".
        let grant = authz.authorize(Some("agent-a"), Some(&id("shop", "default").to_string())).await.unwrap();
        assert_eq!(grant.identity, id("shop", "default"));
        // A namespace with no pods on the node at all.
        assert!(matches!(
            authz.authorize(Some("agent-a"), Some(&id("other", "web").to_string())).await,
            Err(Denied::NotOnNode { .. })
        ));
    }

    #[tokio::test]
    async fn finished_pods_do_not_count() {
        let (lookup, authz) = setup();
        lookup.add_pod("batch", "job-1", "runner", "node-a");
        let runner = id("batch", "runner").to_string();
        authz.authorize(Some("agent-a"), Some(&runner)).await.unwrap();
        lookup.pods.lock().unwrap().last_mut().unwrap().phase = Some("Succeeded".into());
        assert!(matches!(authz.authorize(Some("agent-a"), Some(&runner)).await, Err(Denied::NotOnNode { .. })));
    }

    #[tokio::test]
    async fn callers_may_have_their_own_identity_and_nothing_else() {
        let (_lookup, authz) = setup();
        let grant = authz.authorize(Some("web-token"), None).await.unwrap();
        assert_eq!(grant, Grant { identity: id("shop", "web"), caller: sa_username("shop", "web"), node: None });
        // Asking for itself explicitly is the same.
        let grant = authz.authorize(Some("web-token"), Some(&id("shop", "web").to_string())).await.unwrap();
        assert_eq!(grant.identity, id("shop", "web"));
        // A node agent asking for nothing gets its own identity.
        let grant = authz.authorize(Some("agent-a"), None).await.unwrap();
        assert_eq!(grant.identity, id("weft-system", "weft-node"));

        // A workload impersonating a neighbour on the same node is not a node agent.
        let err = authz.authorize(Some("web-token"), Some(&id("shop", "plain").to_string())).await.unwrap_err();
        assert!(matches!(err, Denied::NotNodeAgent { .. }), "{err}");
        assert!(err.to_string().contains("only node agents"), "{err}");
    }

    #[tokio::test]
    async fn bad_tokens_are_unauthenticated() {
        let (lookup, authz) = setup();
        assert!(matches!(authz.authorize(None, None).await, Err(Denied::MissingToken { .. })));
        assert!(matches!(authz.authorize(Some(""), None).await, Err(Denied::MissingToken { .. })));
        assert_eq!(lookup.reviews.load(Ordering::SeqCst), 0, "no TokenReview without a token");

        let err = authz.authorize(Some("forged"), None).await.unwrap_err();
        assert!(matches!(&err, Denied::TokenRejected { reason } if reason == "invalid bearer token"), "{err}");

        // Expired: the API server says unauthenticated with its reason.
        lookup.tokens.lock().unwrap().insert(
            "expired".into(),
            TokenReviewStatus { error: Some("service account token has expired".into()), ..Default::default() },
        );
        let err = authz.authorize(Some("expired"), None).await.unwrap_err();
        assert!(err.to_string().contains("has expired"), "{err}");

        // Valid, but for another audience.
        let mut other = lookup.tokens.lock().unwrap()["web-token"].clone();
        other.audiences = vec!["https://kubernetes.default.svc".into()];
        lookup.tokens.lock().unwrap().insert("other-aud".into(), other);
        assert!(matches!(authz.authorize(Some("other-aud"), None).await, Err(Denied::WrongAudience { .. })));

        // A user that is not a ServiceAccount.
        lookup.tokens.lock().unwrap().insert(
            "admin".into(),
            TokenReviewStatus { authenticated: true, username: "kubernetes-admin".into(), ..Default::default() },
        );
        assert!(matches!(authz.authorize(Some("admin"), None).await, Err(Denied::NotServiceAccount { .. })));

        lookup.fail.store(true, Ordering::SeqCst);
        assert!(matches!(authz.authorize(Some("web-token"), None).await, Err(Denied::Lookup(_))));
    }

    #[tokio::test]
    async fn bad_requests_and_unknown_nodes() {
        let (lookup, authz) = setup();
        let err = authz.authorize(Some("agent-a"), Some("spiffe://cluster.local/ns/shop")).await.unwrap_err();
        assert!(matches!(err, Denied::BadImpersonatedIdentity { .. }), "{err}");
        let err = authz
            .authorize(Some("agent-a"), Some(&Identity::new("evil.org", "shop", "web").to_string()))
            .await
            .unwrap_err();
        assert!(matches!(err, Denied::WrongTrustDomain { .. }), "{err}");

        // A node agent token not bound to a pod (a legacy Secret token).
        lookup.add_sa_token("unbound", "weft-system", "weft-node", None, false);
        let web = id("shop", "web").to_string();
        let err = authz.authorize(Some("unbound"), Some(&web)).await.unwrap_err();
        assert!(matches!(err, Denied::NodeUnknown { .. }), "{err}");

        // Bound to a pod that was deleted, or replaced by one with the same name.
        lookup.add_sa_token("gone", "weft-system", "weft-node", Some(("weft-node-gone", "node-a")), false);
        let err = authz.authorize(Some("gone"), Some(&web)).await.unwrap_err();
        assert!(err.to_string().contains("no longer exists"), "{err}");
        lookup.add_pod("weft-system", "weft-node-gone", "weft-node", "node-a");
        lookup.pods.lock().unwrap().last_mut().unwrap().uid = "another-uid".into();
        let err = authz.authorize(Some("gone"), Some(&web)).await.unwrap_err();
        assert!(err.to_string().contains("was replaced"), "{err}");
    }

    #[test]
    fn usernames() {
        assert_eq!(parse_sa_username("system:serviceaccount:a:b"), Some(("a", "b")));
        assert_eq!(parse_sa_username("system:serviceaccount:a"), None);
        assert_eq!(parse_sa_username("system:serviceaccount::b"), None);
        assert_eq!(parse_sa_username("system:serviceaccount:a:b:c"), None);
        assert_eq!(parse_sa_username("system:node:n1"), None);
        assert_eq!(sa_username("a", "b"), "system:serviceaccount:a:b");
    }
}
