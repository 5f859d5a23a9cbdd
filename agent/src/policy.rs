//! L4 policy: Istio `AuthorizationPolicy` and `PeerAuthentication`, compiled once per config change
//! and evaluated per connection by the destination's agent, with ztunnel's semantics.
//!
//! Owns: validation (what Istio's webhook rejects is rejected here, per object, so the rest still
//! applies), lowering to L4 matchers, the allow/deny decision and the effective mTLS mode. Does not
//! own: where policies come from (`discovery`), the peer's identity (the proxy passes the verified
//! principal), logging of decisions (the caller logs with its connection fields), or L7 policy
//! (the waypoint).
//!
//! Authorization, as ztunnel enforces it at the receiving side:
//! 1. Policies apply by scope: those in the root namespace (`istio-system` by default) to the whole
//!    mesh, the others to their own namespace; a `selector` narrows either to matching labels.
//!    Policies with `targetRef(s)` are for waypoints and do not apply here.
//! 2. Any matching DENY policy denies.
//! 3. No ALLOW policy applies: allow. Otherwise allow only if one of them matches.
//!
//! AUDIT and CUSTOM policies and HTTP-only attributes cannot be enforced at L4; how each is treated
//! is described where it is compiled (`authz`), and every such case leaves a warning in
//! [`Policies::warnings`].

mod authz;
pub mod l7;
mod peer;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use crate::crd::{AuthorizationPolicy, PeerAuthentication};
use authz::{Compiled, CompiledAuthz, Effect, Peer};
use peer::PeerPolicies;

/// What the destination requires of inbound connections on one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// Only mTLS (HBONE) connections; plaintext is refused.
    Strict,
    /// mTLS and plaintext are both accepted.
    Permissive,
}

/// One inbound connection, as the destination agent knows it after the handshake.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The verified peer identity in Istio's principal form, `cluster.local/ns/a/sa/b` (a leading
    /// `spiffe://` is tolerated); `None` for plaintext.
    pub source_principal: Option<&'a str>,
    /// The namespace of the peer identity (not of whatever owns the source IP). `None` with a
    /// principal means "take it from the principal".
    pub source_namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    pub dest_ip: IpAddr,
    /// The port on the destination workload (after service target-port resolution).
    pub dest_port: u16,
    pub dest_namespace: &'a str,
    pub dest_labels: &'a BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` is the matching DENY policy (`ns/name`) or, when ALLOW policies applied and none
    /// matched, those ALLOW policies joined by `,` (what an operator would have to widen).
    Deny {
        policy: String,
    },
}

/// Which resource a [`PolicyError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    AuthorizationPolicy,
    PeerAuthentication,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
            PolicyKind::PeerAuthentication => "PeerAuthentication",
        })
    }
}

/// An object that was left out of the compiled policies, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {field}: {reason}")]
pub struct PolicyError {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    /// Path of the offending field inside the object, e.g. `spec.rules[0].from[1].source.ipBlocks[0]`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub reason: String,
}

/// The compiled policies of the whole mesh (as far as this node needs them).
#[derive(Debug, Default)]
pub struct Policies {
    /// Policies in the root namespace: they apply in every namespace.
    mesh: Vec<CompiledAuthz>,
    by_namespace: HashMap<String, Vec<CompiledAuthz>>,
    peer: PeerPolicies,
    warnings: Vec<String>,
}

impl Policies {
    /// Compiles and validates; an invalid object is left out and reported (the rest still apply).
    /// Reporting the errors (log line, Event, load failure) is the caller's choice. Warnings
    /// (parts Istio accepts but L4 cannot enforce) are logged here and kept in
    /// [`Policies::warnings`].
    pub fn compile(
        authz: &[AuthorizationPolicy],
        peer_authn: &[PeerAuthentication],
        root_namespace: &str,
    ) -> (Policies, Vec<PolicyError>) {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let mut mesh = Vec::new();
        let mut by_namespace: HashMap<String, Vec<CompiledAuthz>> = HashMap::new();
        for ap in authz {
            match authz::compile(ap, &mut warnings) {
                Ok(Compiled::Enforced(c)) => {
                    let ns = ap.metadata.namespace.as_deref().unwrap_or("default");
                    if ns == root_namespace {
                        mesh.push(c);
                    } else {
                        by_namespace.entry(ns.to_owned()).or_default().push(c);
                    }
                }
                Ok(Compiled::NotEnforced { why }) => tracing::debug!(
                    namespace = ap.metadata.namespace.as_deref().unwrap_or("default"),
                    name = ap.metadata.name.as_deref().unwrap_or(""),
                    why,
                    "AuthorizationPolicy not enforced at L4"
                ),
                Err(e) => errors.push(e),
            }
        }
        // Name order, so "which DENY policy denied" does not depend on the order objects came in.
        mesh.sort_by(|a, b| a.key.cmp(&b.key));
        for list in by_namespace.values_mut() {
            list.sort_by(|a, b| a.key.cmp(&b.key));
        }
        let peer = PeerPolicies::compile(peer_authn, root_namespace, &mut errors, &mut warnings);
        for w in &warnings {
            tracing::warn!(warning = %w, "policy only partly enforceable at L4");
        }
        (Policies { mesh, by_namespace, peer, warnings }, errors)
    }

    /// The mTLS mode of `port` on a workload with these labels in `dest_namespace`.
    pub fn mtls_mode(&self, dest_namespace: &str, dest_labels: &BTreeMap<String, String>, port: u16) -> MtlsMode {
        self.peer.mtls_mode(dest_namespace, dest_labels, port)
    }

    /// Decides one inbound connection.
    pub fn authorize(&self, c: &Connection<'_>) -> Decision {
        let principal = c.source_principal.map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        let parts = principal.and_then(split_principal);
        let peer = Peer {
            principal,
            namespace: c.source_namespace.or(parts.map(|p| p.1)),
            trust_domain: parts.map(|p| p.0),
            sa_namespace: parts.map(|p| p.1),
            service_account: parts.map(|p| p.2),
            source_ip: c.source_ip.to_canonical(),
            dest_ip: c.dest_ip.to_canonical(),
            dest_port: c.dest_port,
        };
        let applicable = || {
            self.mesh
                .iter()
                .chain(self.by_namespace.get(c.dest_namespace).into_iter().flatten())
                .filter(|p| p.selects(c.dest_labels))
        };
        if let Some(deny) = applicable().filter(|p| p.effect == Effect::Deny).find(|p| p.matches(&peer)) {
            return Decision::Deny { policy: deny.key.clone() };
        }
        let mut allows = applicable().filter(|p| p.effect == Effect::Allow).peekable();
        if allows.peek().is_none() {
            return Decision::Allow;
        }
        let mut tried = Vec::new();
        for p in allows {
            if p.matches(&peer) {
                return Decision::Allow;
            }
            tried.push(p.key.as_str());
        }
        Decision::Deny { policy: tried.join(",") }
    }

    /// What Istio accepts but L4 enforcement cannot honour as written, one line per finding.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Number of enforced AuthorizationPolicies.
    pub fn authorization_policy_count(&self) -> usize {
        self.mesh.len() + self.by_namespace.values().map(Vec::len).sum::<usize>()
    }

    /// Number of PeerAuthentications in force (conflicting losers excluded).
    pub fn peer_authentication_count(&self) -> usize {
        self.peer.len()
    }

    /// `namespace/name` of the mesh-wide PeerAuthentication in force, if any.
    pub fn mesh_peer_authentication(&self) -> Option<&str> {
        self.peer.mesh_policy()
    }
}

/// `td/ns/NS/sa/SA` → (td, NS, SA).
fn split_principal(p: &str) -> Option<(&str, &str, &str)> {
    let mut it = p.split('/');
    match (it.next(), it.next(), it.next(), it.next(), it.next(), it.next()) {
        (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((td, ns, sa)),
        _ => None,
    }
}
