//! L7 AuthorizationPolicy, as a waypoint enforces it (Istio's semantics for policies attached with
//! `targetRefs`).
//!
//! Owns: which policies apply to a waypoint (those whose `targetRef(s)` name its Gateway, or a
//! Service, in the policy's namespace; root-namespace policies may name either in any namespace, or
//! the waypoint GatewayClass), lowering them to request matchers, and the per-request decision in
//! Istio's order CUSTOM → DENY → ALLOW. Does not own: where policies come from, the 403 response or
//! logging a decision (the waypoint handler does both), or L4 policy (`policy`).
//!
//! Validation is shared with L4 (`policy::authz`), so an object is rejected with the same message
//! whichever component reads it. What the waypoint accepts but cannot honour is a warning
//! ([`L7Policies::warnings`]) and is resolved towards denying:
//! - CUSTOM: there is no ext-authz provider, so a request a CUSTOM policy matches is denied;
//! - `requestPrincipals`, `request.auth.*` (no JWT support), `connection.sni`, `destination.ip`:
//!   treated as absent on every request (values never match, `not*` values always pass);
//! - AUDIT is ignored, and dry-run (`istio.io/dry-run`) policies are not enforced.

mod matcher;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use super::{Decision, PolicyError, PolicyKind, authz};
use crate::crd::{Action, AuthorizationPolicy, PolicyTargetReference};
use matcher::{Attrs, CompiledRule, Unsupported};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// GatewayClasses a root-namespace policy can name to reach every waypoint.
const WAYPOINT_CLASSES: [&str; 2] = ["weft-waypoint", "istio-waypoint"];

/// One HTTP request as the waypoint sees it after terminating HBONE.
#[derive(Debug, Clone, Copy)]
pub struct L7Request<'a> {
    /// The Service the request was sent to (from the HBONE CONNECT authority).
    pub service_namespace: &'a str,
    pub service_name: &'a str,
    /// The verified peer identity, `spiffe://td/ns/N/sa/S` or `td/ns/N/sa/S`; `None` for plaintext.
    pub source_principal: Option<&'a str>,
    /// `None` with a principal: taken from the principal.
    pub source_namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    /// `:authority` / `Host`, possibly with a port.
    pub host: &'a str,
    /// The service port dialled.
    pub port: u16,
    pub headers: &'a http::HeaderMap,
}

/// Where a policy is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// The waypoint's own Gateway (or, from the root namespace, its GatewayClass): every request.
    Waypoint,
    /// A Service; `namespace: None` (root-namespace policy without a namespace on the ref) means a
    /// Service of that name in any namespace.
    Service { namespace: Option<String>, name: String },
}

#[derive(Debug)]
struct Compiled {
    /// `namespace/name`, what a denial names.
    key: String,
    targets: Vec<Target>,
    rules: Vec<CompiledRule>,
}

impl Compiled {
    fn applies(&self, r: &L7Request<'_>) -> bool {
        self.targets.iter().any(|t| match t {
            Target::Waypoint => true,
            Target::Service { namespace, name } => {
                name == r.service_name && namespace.as_deref().is_none_or(|ns| ns == r.service_namespace)
            }
        })
    }

    fn matches(&self, a: &Attrs<'_>) -> bool {
        self.rules.iter().any(|rule| matcher::rule_matches(rule, a))
    }
}

/// The policies one waypoint enforces, compiled once per configuration change.
#[derive(Debug, Default)]
pub struct L7Policies {
    custom: Vec<Compiled>,
    deny: Vec<Compiled>,
    allow: Vec<Compiled>,
    warnings: Vec<String>,
}

impl L7Policies {
    /// Compiles the policies attached to the waypoint `waypoint_ns/waypoint_name` or to a Service.
    /// Invalid objects are left out and returned (the rest still apply); warnings are logged here
    /// and kept in [`L7Policies::warnings`].
    pub fn compile(
        policies: &[AuthorizationPolicy],
        waypoint_ns: &str,
        waypoint_name: &str,
        root_namespace: &str,
    ) -> (L7Policies, Vec<PolicyError>) {
        let mut out = L7Policies::default();
        let mut errors = Vec::new();
        for ap in policies {
            match compile_one(ap, waypoint_ns, waypoint_name, root_namespace, &mut out.warnings) {
                Ok(None) => {}
                Ok(Some((action, c))) => match action {
                    Action::Custom => out.custom.push(c),
                    Action::Deny => out.deny.push(c),
                    Action::Allow => out.allow.push(c),
                    Action::Audit => {}
                },
                Err(e) => errors.push(e),
            }
        }
        // Name order, so which policy a denial names does not depend on the order objects came in.
        for list in [&mut out.custom, &mut out.deny, &mut out.allow] {
            list.sort_by(|a, b| a.key.cmp(&b.key));
        }
        for w in &out.warnings {
            tracing::warn!(waypoint = %format_args!("{waypoint_ns}/{waypoint_name}"), warning = %w, "L7 policy only partly enforceable");
        }
        (out, errors)
    }

    /// Decides one request: a matching CUSTOM policy denies (no external authorizer), then a
    /// matching DENY policy denies; with no ALLOW policy applying, allow, else allow only if one
    /// of them matches.
    pub fn authorize(&self, r: &L7Request<'_>) -> Decision {
        let principal = r.source_principal.map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        let parts = principal.and_then(super::split_principal);
        let a = Attrs {
            r,
            principal,
            namespace: r.source_namespace.or(parts.map(|p| p.1)),
            trust_domain: parts.map(|p| p.0),
            sa: parts.map(|p| (p.1, p.2)),
            source_ip: r.source_ip.to_canonical(),
        };
        let hit = |list: &[Compiled]| list.iter().find(|p| p.applies(r) && p.matches(&a)).map(|p| p.key.clone());
        if let Some(policy) = hit(&self.custom) {
            tracing::debug!(policy, "CUSTOM policy matched; no ext-authz provider, denying");
            return Decision::Deny { policy };
        }
        if let Some(policy) = hit(&self.deny) {
            return Decision::Deny { policy };
        }
        let mut tried = Vec::new();
        for p in self.allow.iter().filter(|p| p.applies(r)) {
            if p.matches(&a) {
                return Decision::Allow;
            }
            tried.push(p.key.as_str());
        }
        if tried.is_empty() { Decision::Allow } else { Decision::Deny { policy: tried.join(",") } }
    }

    /// What Istio accepts but this waypoint cannot honour as written, one line per finding.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Number of policies enforced (CUSTOM, DENY and ALLOW).
    pub fn len(&self) -> usize {
        self.custom.len() + self.deny.len() + self.allow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Istio's default path normalization for authorization (`BASE`: Envoy's `normalize_path`, RFC 3986
/// section 6): percent-encoded unreserved characters are decoded and `.` / `..` segments removed, so
/// `/public/%2e%2e/admin` cannot slip past a DENY on `/admin*`. The caller must forward the
/// normalized path too, so the policy and the backend see the same resource (as Envoy does).
/// Borrowed when nothing changes.
pub fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    let decoded = decode_unreserved(path);
    let cleaned = remove_dot_segments(&decoded);
    if cleaned == path { std::borrow::Cow::Borrowed(path) } else { std::borrow::Cow::Owned(cleaned) }
}

fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit() {
            let v = u8::from_str_radix(&path[i + 1..i + 3], 16).expect("two hex digits");
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(v));
                i += 3;
                continue;
            }
        }
        // Byte-wise copy of a UTF-8 string: push whole chars.
        let ch = path[i..].chars().next().expect("index is on a char boundary");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// RFC 3986 section 5.2.4 on an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." && out.len() > 1 {
                    out.pop();
                }
                // A trailing dot segment leaves a directory: keep the slash.
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if joined.starts_with('/') || !path.starts_with('/') { joined } else { format!("/{joined}") }
}

fn err(ns: &str, name: &str, field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        kind: PolicyKind::AuthorizationPolicy,
        namespace: ns.to_owned(),
        name: name.to_owned(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// `Ok(None)`: valid, but not for this waypoint (or not enforced at all).
fn compile_one(
    ap: &AuthorizationPolicy,
    waypoint_ns: &str,
    waypoint_name: &str,
    root_ns: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<(Action, Compiled)>, PolicyError> {
    // The webhook-style checks shared with L4; its L4-specific warnings are not ours.
    authz::compile(ap, &mut Vec::new())?;
    let ns = ap.metadata.namespace.as_deref().unwrap_or("default");
    let name = ap.metadata.name.as_deref().unwrap_or("");
    let key = format!("{ns}/{name}");
    let spec = &ap.spec;
    let refs: Vec<(String, &PolicyTargetReference)> = match &spec.target_ref {
        Some(r) => vec![("spec.targetRef".to_owned(), r)],
        None => spec.target_refs.iter().enumerate().map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)).collect(),
    };
    if refs.is_empty() {
        // A workload (selector) or namespace policy: enforced by the node agents, not here.
        return Ok(None);
    }
    let mut targets = Vec::new();
    for (path, r) in refs {
        if let Some(t) = target(ns, name, root_ns, &path, r, waypoint_ns, waypoint_name)? {
            targets.push(t);
        }
    }
    if targets.is_empty() {
        return Ok(None);
    }
    let dry_run = ap
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(authz::DRY_RUN_ANNOTATION))
        .is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "TRUE" | "true" | "True"));

    let mut unsupported = Unsupported::new();
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let base = format!("spec.rules[{i}]");
        let mut clauses: CompiledRule = Vec::new();
        if !rule.from.is_empty() {
            let mut clause = Vec::new();
            for (j, from) in rule.from.iter().enumerate() {
                let p = format!("{base}.from[{j}].source");
                let src = from.source.as_ref().ok_or_else(|| err(ns, name, &p, "`source` is required"))?;
                clause.push(
                    matcher::source(src, ns, &mut unsupported)
                        .map_err(|(f, why)| err(ns, name, format!("{p}.{f}"), why))?,
                );
            }
            clauses.push(clause);
        }
        if !rule.to.is_empty() {
            let mut clause = Vec::new();
            for (j, to) in rule.to.iter().enumerate() {
                let p = format!("{base}.to[{j}].operation");
                let op = to.operation.as_ref().ok_or_else(|| err(ns, name, &p, "`operation` is required"))?;
                clause.push(matcher::operation(op).map_err(|(f, why)| err(ns, name, format!("{p}.{f}"), why))?);
            }
            clauses.push(clause);
        }
        for (j, cond) in rule.when.iter().enumerate() {
            let p = format!("{base}.when[{j}]");
            let entry = matcher::condition(cond, ns, &mut unsupported)
                .map_err(|(f, why)| err(ns, name, format!("{p}.{f}"), why))?;
            clauses.push(vec![entry]);
        }
        rules.push(clauses);
    }

    unsupported.sort();
    unsupported.dedup();
    if !unsupported.is_empty() {
        warnings
            .push(format!("AuthorizationPolicy {key}: {} treated as absent on every request", unsupported.join(", ")));
    }
    match spec.action {
        Action::Audit => {
            warnings.push(format!(
                "AuthorizationPolicy {key}: action AUDIT is not supported by the waypoint and is ignored"
            ));
            return Ok(None);
        }
        Action::Custom => warnings.push(format!(
            "AuthorizationPolicy {key}: action CUSTOM needs an ext-authz provider ({:?}), which the waypoint does not \
             support; requests the policy matches are denied (fail closed)",
            spec.provider.as_ref().map(|p| p.name.as_str()).unwrap_or_default()
        )),
        Action::Allow | Action::Deny => {}
    }
    if dry_run {
        warnings.push(format!(
            "AuthorizationPolicy {key}: {} policies are not enforced by the waypoint",
            authz::DRY_RUN_ANNOTATION
        ));
        return Ok(None);
    }
    Ok(Some((spec.action, Compiled { key, targets, rules })))
}

/// One target reference → the target it means for this waypoint (`None`: something else).
#[allow(clippy::too_many_arguments)]
fn target(
    ns: &str,
    name: &str,
    root_ns: &str,
    path: &str,
    r: &PolicyTargetReference,
    waypoint_ns: &str,
    waypoint_name: &str,
) -> Result<Option<Target>, PolicyError> {
    let root = ns == root_ns;
    if let Some(ref_ns) = r.namespace.as_deref().filter(|n| *n != ns && !root) {
        return Err(err(
            ns,
            name,
            format!("{path}.namespace"),
            format!(
                "{ref_ns:?}: a policy can only target resources in its own namespace ({ns}) unless it is in the root namespace"
            ),
        ));
    }
    // For a root-namespace policy, an unset namespace means "any namespace".
    let ref_ns = r.namespace.as_deref().or((!root).then_some(ns));
    match (r.group.as_str(), r.kind.as_str()) {
        (GATEWAY_GROUP, "Gateway") => {
            let mine = r.name == waypoint_name && ref_ns.is_none_or(|n| n == waypoint_ns);
            Ok(mine.then_some(Target::Waypoint))
        }
        (GATEWAY_GROUP, "GatewayClass") => {
            if !root {
                return Err(err(
                    ns,
                    name,
                    format!("{path}.kind"),
                    "GatewayClass can only be targeted from the root namespace",
                ));
            }
            Ok(WAYPOINT_CLASSES.contains(&r.name.as_str()).then_some(Target::Waypoint))
        }
        ("" | "core", "Service") => {
            Ok(Some(Target::Service { namespace: ref_ns.map(str::to_owned), name: r.name.clone() }))
        }
        ("networking.istio.io", "ServiceEntry") => {
            tracing::debug!(policy = %format_args!("{ns}/{name}"), "targetRef to a ServiceEntry: not served by this waypoint");
            Ok(None)
        }
        (g, k) => Err(err(
            ns,
            name,
            path,
            format!(
                "kind {k:?} in group {g:?} cannot be targeted; use group gateway.networking.k8s.io kind Gateway (the \
                 waypoint) or group \"\" kind Service"
            ),
        )),
    }
}
