//! AuthorizationPolicy → L4 matchers, and evaluating them against one connection.
//!
//! The compiled shape follows what istiod sends ztunnel and how ztunnel's `rbac.rs` evaluates it:
//! a policy is a list of rules (ANY must match); a rule is a list of clauses (ALL must match: one
//! for `to`, one for `from`, one per `when`); a clause is a list of matches (ANY must match); a
//! match ANDs its fields, ORs the values within a field, and its `not*` values exclude.
//! Two consequences that look odd but are Istio's behaviour, kept on purpose:
//! - a rule without clauses (`rules: [{}]`) matches everything, a policy without rules matches
//!   nothing;
//! - a match with no fields left (e.g. a `from.source` that only had `requestPrincipals`) never
//!   matches, so a clause made only of such matches can never match.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{PolicyError, PolicyKind};
use crate::crd::{Action, AuthorizationPolicy, Condition, Operation, Source, WorkloadSelector};

/// The annotation Istio uses to evaluate a policy without enforcing it.
pub(super) const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    Allow,
    Deny,
}

/// One AuthorizationPolicy, ready to evaluate.
#[derive(Debug)]
pub(super) struct CompiledAuthz {
    /// `namespace/name`, what a denial names.
    pub key: String,
    pub effect: Effect,
    /// `None`: every workload in the policy's scope.
    pub selector: Option<BTreeMap<String, String>>,
    rules: Vec<Vec<Clause>>,
}

type Clause = Vec<Match>;

#[derive(Debug, Default)]
struct Match {
    principals: Vec<StrMatch>,
    not_principals: Vec<StrMatch>,
    namespaces: Vec<StrMatch>,
    not_namespaces: Vec<StrMatch>,
    /// (namespace, service account), exact.
    service_accounts: Vec<(String, String)>,
    not_service_accounts: Vec<(String, String)>,
    trust_domains: Vec<StrMatch>,
    not_trust_domains: Vec<StrMatch>,
    source_ips: Vec<IpNet>,
    not_source_ips: Vec<IpNet>,
    dest_ips: Vec<IpNet>,
    not_dest_ips: Vec<IpNet>,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

/// Istio's string forms: `*` (present and non-empty), `*suffix`, `prefix*`, exact.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StrMatch {
    Presence,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

impl StrMatch {
    fn parse(v: &str) -> StrMatch {
        if v == "*" {
            StrMatch::Presence
        } else if let Some(s) = v.strip_prefix('*') {
            StrMatch::Suffix(s.to_owned())
        } else if let Some(p) = v.strip_suffix('*') {
            StrMatch::Prefix(p.to_owned())
        } else {
            StrMatch::Exact(v.to_owned())
        }
    }

    /// An absent value (plaintext peer, no identity) never matches, not even `*`.
    fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else { return false };
        match self {
            StrMatch::Presence => !v.is_empty(),
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Exact(e) => v == e,
        }
    }
}

/// What the rules see of a connection: the peer identity split once, IPs canonical (an IPv4 peer
/// seen on a dual-stack socket as `::ffff:a.b.c.d` must still match `a.b.c.d/n`).
pub(super) struct Peer<'a> {
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub trust_domain: Option<&'a str>,
    /// Namespace and service account as the principal states them.
    pub sa_namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
    pub source_ip: IpAddr,
    pub dest_ip: IpAddr,
    pub dest_port: u16,
}

fn any_or_empty<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

fn none_or_empty<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    !values.iter().any(f)
}

impl Match {
    fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.trust_domains.is_empty()
            && self.not_trust_domains.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.dest_ips.is_empty()
            && self.not_dest_ips.is_empty()
            && self.ports.is_empty()
            && self.not_ports.is_empty()
    }

    fn matches(&self, p: &Peer<'_>) -> bool {
        let sa =
            |(ns, sa): &(String, String)| p.sa_namespace == Some(ns.as_str()) && p.service_account == Some(sa.as_str());
        any_or_empty(&self.principals, |m| m.matches(p.principal))
            && none_or_empty(&self.not_principals, |m| m.matches(p.principal))
            && any_or_empty(&self.namespaces, |m| m.matches(p.namespace))
            && none_or_empty(&self.not_namespaces, |m| m.matches(p.namespace))
            && any_or_empty(&self.service_accounts, sa)
            && none_or_empty(&self.not_service_accounts, sa)
            && any_or_empty(&self.trust_domains, |m| m.matches(p.trust_domain))
            && none_or_empty(&self.not_trust_domains, |m| m.matches(p.trust_domain))
            && any_or_empty(&self.source_ips, |n| n.contains(&p.source_ip))
            && none_or_empty(&self.not_source_ips, |n| n.contains(&p.source_ip))
            && any_or_empty(&self.dest_ips, |n| n.contains(&p.dest_ip))
            && none_or_empty(&self.not_dest_ips, |n| n.contains(&p.dest_ip))
            && any_or_empty(&self.ports, |port| *port == p.dest_port)
            && none_or_empty(&self.not_ports, |port| *port == p.dest_port)
    }
}

fn clause_matches(clause: &Clause, p: &Peer<'_>) -> bool {
    clause.iter().any(|m| !m.is_empty() && m.matches(p))
}

fn clause_can_match(clause: &Clause) -> bool {
    clause.iter().any(|m| !m.is_empty())
}

impl CompiledAuthz {
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    pub fn matches(&self, p: &Peer<'_>) -> bool {
        self.rules.iter().any(|rule| rule.iter().all(|c| clause_matches(c, p)))
    }
}

/// The result of compiling one object: enforced, or deliberately not enforced here (with why).
pub(super) enum Compiled {
    Enforced(CompiledAuthz),
    NotEnforced { why: String },
}

struct Ctx<'a> {
    namespace: &'a str,
    name: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
        PolicyError {
            kind: PolicyKind::AuthorizationPolicy,
            namespace: self.namespace.to_owned(),
            name: self.name.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Checks a policy as Istio's validating webhook would, then lowers it to L4 matchers.
/// `warnings` receives what an operator should know (L7 attributes dropped, and so on).
pub(super) fn compile(ap: &AuthorizationPolicy, warnings: &mut Vec<String>) -> Result<Compiled, PolicyError> {
    let namespace = ap.metadata.namespace.as_deref().unwrap_or("default");
    let name = ap.metadata.name.as_deref().unwrap_or("");
    let cx = Ctx { namespace, name };
    if name.is_empty() {
        return Err(cx.err("metadata.name", "a policy needs a name"));
    }
    let spec = &ap.spec;
    let refs = usize::from(spec.target_ref.is_some()) + usize::from(!spec.target_refs.is_empty());
    if refs > 0 && spec.selector.is_some() || refs > 1 {
        return Err(cx.err("spec", "only one of selector, targetRef and targetRefs may be set"));
    }
    if let Some(sel) = &spec.selector {
        validate_selector(&cx, sel)?;
    }
    if spec.action == Action::Custom {
        if spec.rules.is_empty() {
            return Err(cx.err(
                "spec.rules",
                "a CUSTOM policy without rules never triggers; add an empty rule `{}` to apply it to everything",
            ));
        }
        if spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
            return Err(cx.err("spec.provider.name", "action CUSTOM needs the extension provider's name"));
        }
    } else if spec.provider.is_some() {
        return Err(cx.err("spec.provider", "provider is only allowed with action CUSTOM"));
    }
    if spec.action == Action::Deny && spec.rules.is_empty() {
        return Err(cx.err(
            "spec.rules",
            "a DENY policy without rules never triggers; add an empty rule `{}` to deny everything",
        ));
    }
    let dry_run = match ap.metadata.annotations.as_ref().and_then(|a| a.get(DRY_RUN_ANNOTATION)) {
        None => false,
        Some(v) => parse_go_bool(v).ok_or_else(|| {
            cx.err(
                format!("metadata.annotations.{DRY_RUN_ANNOTATION}"),
                format!("{v:?} is not a boolean; use \"true\" or \"false\""),
            )
        })?,
    };

    // Validate every rule before deciding whether it is enforced here, so an invalid policy is
    // reported the same way whichever agent (or waypoint) reads it.
    let effect = match spec.action {
        Action::Allow => Some(Effect::Allow),
        Action::Deny => Some(Effect::Deny),
        Action::Audit | Action::Custom => None,
    };
    let mut rules = Vec::new();
    // Only worth telling when the policy is enforced here at all.
    let mut notes = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let mut l7: Vec<String> = Vec::new();
        let mut clauses: Vec<Clause> = Vec::new();
        if !rule.to.is_empty() {
            let mut clause = Vec::new();
            for (j, to) in rule.to.iter().enumerate() {
                let p = format!("{path}.to[{j}].operation");
                let op = to.operation.as_ref().ok_or_else(|| cx.err(&p, "`operation` is required"))?;
                clause.push(compile_operation(&cx, &p, op, &mut l7)?);
            }
            clauses.push(clause);
        }
        if !rule.from.is_empty() {
            let mut clause = Vec::new();
            for (j, from) in rule.from.iter().enumerate() {
                let p = format!("{path}.from[{j}].source");
                let src = from.source.as_ref().ok_or_else(|| cx.err(&p, "`source` is required"))?;
                clause.push(compile_source(&cx, &p, src, namespace, &mut l7)?);
            }
            clauses.push(clause);
        }
        for (j, cond) in rule.when.iter().enumerate() {
            let p = format!("{path}.when[{j}]");
            clauses.push(vec![compile_condition(&cx, &p, cond, namespace, &mut l7)?]);
        }
        l7.sort();
        l7.dedup();
        let key = format!("{namespace}/{name}");
        match effect {
            // ztunnel cannot see HTTP, so an ALLOW rule that needs it could only be guessed;
            // istiod drops such a rule, which can only make the policy stricter.
            Some(Effect::Allow) if !l7.is_empty() => notes.push(format!(
                "AuthorizationPolicy {key}: {path} uses HTTP attributes ({}) that L4 enforcement cannot see; \
                 the rule is left out here (stricter than requested). Attach HTTP rules to a waypoint with targetRefs",
                l7.join(", ")
            )),
            // A DENY rule keeps its L4 parts, as istiod sends it. If some clause is left with only
            // empty matches, ztunnel can never match the rule, so the DENY does nothing here; say so
            // loudly rather than let the operator believe traffic is blocked.
            Some(Effect::Deny) if !l7.is_empty() => {
                if clauses.iter().all(clause_can_match) {
                    notes.push(format!(
                        "AuthorizationPolicy {key}: {path} uses HTTP attributes ({}); L4 enforcement denies on the \
                         rule's other conditions alone (stricter than requested)",
                        l7.join(", ")
                    ));
                } else {
                    notes.push(format!(
                        "AuthorizationPolicy {key}: {path} uses only HTTP attributes ({}) in some condition, so it can \
                         never match at L4 and denies nothing here. Attach it to a waypoint with targetRefs",
                        l7.join(", ")
                    ));
                }
                rules.push(clauses);
            }
            _ => rules.push(clauses),
        }
    }

    let key = format!("{namespace}/{name}");
    if refs > 0 {
        return Ok(Compiled::NotEnforced { why: "it has targetRefs, so it is for a waypoint or gateway".to_owned() });
    }
    let Some(effect) = effect else {
        warnings.push(format!(
            "AuthorizationPolicy {key}: action {:?} is not supported at L4 and is ignored here (as ztunnel does); \
             use a waypoint for AUDIT and CUSTOM",
            spec.action
        ));
        return Ok(Compiled::NotEnforced { why: format!("action {:?} is not enforced at L4", spec.action) });
    };
    if dry_run {
        warnings.push(format!(
            "AuthorizationPolicy {key}: {DRY_RUN_ANNOTATION} policies are not enforced, and not evaluated, at L4"
        ));
        return Ok(Compiled::NotEnforced { why: "it is a dry-run policy".to_owned() });
    }
    warnings.extend(notes);
    let selector = spec.selector.as_ref().map(|s| s.match_labels.clone());
    Ok(Compiled::Enforced(CompiledAuthz { key, effect, selector, rules }))
}

/// Go's `strconv.ParseBool`, which is what Istio uses for its boolean annotations.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

pub(super) fn validate_selector_labels(
    sel: &WorkloadSelector,
    err: impl Fn(String, String) -> PolicyError,
) -> Result<(), PolicyError> {
    for (k, v) in &sel.match_labels {
        if k.is_empty() {
            return Err(err(
                "spec.selector.matchLabels".into(),
                "an empty label key selects nothing; remove it".into(),
            ));
        }
        if k.contains('*') || v.contains('*') {
            return Err(err(
                format!("spec.selector.matchLabels.{k}"),
                "wildcards are not supported in selectors; list exact labels".into(),
            ));
        }
    }
    Ok(())
}

fn validate_selector(cx: &Ctx<'_>, sel: &WorkloadSelector) -> Result<(), PolicyError> {
    validate_selector_labels(sel, |f, r| cx.err(f, r))
}

fn non_empty(cx: &Ctx<'_>, path: &str, field: &str, values: &[String]) -> Result<(), PolicyError> {
    match values.iter().position(String::is_empty) {
        Some(i) => Err(cx.err(format!("{path}.{field}[{i}]"), "empty values are not allowed")),
        None => Ok(()),
    }
}

fn strs(cx: &Ctx<'_>, path: &str, field: &str, values: &[String]) -> Result<Vec<StrMatch>, PolicyError> {
    non_empty(cx, path, field, values)?;
    Ok(values.iter().map(|v| StrMatch::parse(v)).collect())
}

/// A single IP (`10.0.0.1`, a /32 or /128) or a CIDR (`10.0.0.0/8`; host bits are allowed, as in
/// Istio).
fn ips(cx: &Ctx<'_>, path: &str, field: &str, values: &[String]) -> Result<Vec<IpNet>, PolicyError> {
    non_empty(cx, path, field, values)?;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let parsed =
                if v.contains('/') { v.parse::<IpNet>().ok() } else { v.parse::<IpAddr>().ok().map(IpNet::from) };
            parsed.map(canonical_net).ok_or_else(|| {
                cx.err(format!("{path}.{field}[{i}]"), format!("{v:?} is neither an IP address nor a CIDR block"))
            })
        })
        .collect()
}

/// `::ffff:10.0.0.0/104` and `10.0.0.0/8` must mean the same block, as connections are matched on
/// canonical addresses.
fn canonical_net(n: IpNet) -> IpNet {
    match n {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(n),
            None => n,
        },
        _ => n,
    }
}

fn ports(cx: &Ctx<'_>, path: &str, field: &str, values: &[String]) -> Result<Vec<u16>, PolicyError> {
    non_empty(cx, path, field, values)?;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<u16>()
                .map_err(|_| cx.err(format!("{path}.{field}[{i}]"), format!("{v:?} is not a port number (0-65535)")))
        })
        .collect()
}

fn service_accounts(
    cx: &Ctx<'_>,
    path: &str,
    field: &str,
    values: &[String],
    policy_ns: &str,
) -> Result<Vec<(String, String)>, PolicyError> {
    if values.len() > 16 {
        return Err(cx.err(format!("{path}.{field}"), "at most 16 service accounts are allowed"));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let bad = |why: &str| cx.err(format!("{path}.{field}[{i}]"), format!("{v:?}: {why}"));
            if v.contains('*') {
                return Err(bad("wildcards are not allowed; list service accounts exactly"));
            }
            match v.split_once('/') {
                None if !v.is_empty() => Ok((policy_ns.to_owned(), v.clone())),
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                    Ok((ns.to_owned(), sa.to_owned()))
                }
                _ => Err(bad("expected SERVICE_ACCOUNT or NAMESPACE/SERVICE_ACCOUNT")),
            }
        })
        .collect()
}

fn trust_domains(cx: &Ctx<'_>, path: &str, field: &str, values: &[String]) -> Result<Vec<StrMatch>, PolicyError> {
    for (i, v) in values.iter().enumerate() {
        let stars = v.matches('*').count();
        let ok =
            !v.is_empty() && !v.contains('/') && (stars == 0 || stars == 1 && (v.starts_with('*') || v.ends_with('*')));
        if !ok {
            return Err(cx.err(
                format!("{path}.{field}[{i}]"),
                format!("{v:?} is not a trust domain (no '/', at most one '*' at the start or end)"),
            ));
        }
    }
    strs(cx, path, field, values)
}

fn compile_source(
    cx: &Ctx<'_>,
    path: &str,
    s: &Source,
    policy_ns: &str,
    l7: &mut Vec<String>,
) -> Result<Match, PolicyError> {
    let all: [(&str, &Vec<String>); 14] = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ];
    if all.iter().all(|(_, v)| v.is_empty()) {
        return Err(cx.err(path, "`source` must set at least one field"));
    }
    let identity_fields = s.principals.len() + s.not_principals.len() + s.namespaces.len() + s.not_namespaces.len();
    if identity_fields > 0 && !(s.service_accounts.is_empty() && s.not_service_accounts.is_empty()) {
        return Err(cx.err(path, "serviceAccounts cannot be combined with principals or namespaces"));
    }
    // remote.ip comes from X-Forwarded-For / PROXY protocol: HTTP-level, as istiod classifies it.
    for (field, values) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        non_empty(cx, path, field, values)?;
        if !values.is_empty() {
            l7.push(field.to_owned());
        }
    }
    ips(cx, path, "remoteIpBlocks", &s.remote_ip_blocks)?;
    ips(cx, path, "notRemoteIpBlocks", &s.not_remote_ip_blocks)?;
    Ok(Match {
        principals: strs(cx, path, "principals", &s.principals)?,
        not_principals: strs(cx, path, "notPrincipals", &s.not_principals)?,
        namespaces: strs(cx, path, "namespaces", &s.namespaces)?,
        not_namespaces: strs(cx, path, "notNamespaces", &s.not_namespaces)?,
        service_accounts: service_accounts(cx, path, "serviceAccounts", &s.service_accounts, policy_ns)?,
        not_service_accounts: service_accounts(cx, path, "notServiceAccounts", &s.not_service_accounts, policy_ns)?,
        trust_domains: trust_domains(cx, path, "trustDomains", &s.trust_domains)?,
        not_trust_domains: trust_domains(cx, path, "notTrustDomains", &s.not_trust_domains)?,
        source_ips: ips(cx, path, "ipBlocks", &s.ip_blocks)?,
        not_source_ips: ips(cx, path, "notIpBlocks", &s.not_ip_blocks)?,
        ..Match::default()
    })
}

fn compile_operation(cx: &Ctx<'_>, path: &str, op: &Operation, l7: &mut Vec<String>) -> Result<Match, PolicyError> {
    let http: [(&str, &Vec<String>); 6] = [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ];
    if op.ports.is_empty() && op.not_ports.is_empty() && http.iter().all(|(_, v)| v.is_empty()) {
        return Err(cx.err(path, "`operation` must set at least one field"));
    }
    for (field, values) in http {
        non_empty(cx, path, field, values)?;
        if !values.is_empty() {
            l7.push(field.to_owned());
        }
    }
    Ok(Match {
        ports: ports(cx, path, "ports", &op.ports)?,
        not_ports: ports(cx, path, "notPorts", &op.not_ports)?,
        ..Match::default()
    })
}

/// Attributes Istio knows that only a proxy that parses HTTP (or TLS) can evaluate.
fn is_l7_attribute(key: &str) -> Option<Result<(), String>> {
    let map_key = |prefix: &str| {
        key.strip_prefix(prefix).map(|rest| {
            let ok = rest.starts_with('[') && rest.ends_with(']') && rest.len() > 2;
            if ok { Ok(()) } else { Err(format!("bad key {key:?}: expected {prefix}[NAME]")) }
        })
    };
    if let Some(r) = map_key("request.headers").or_else(|| map_key("request.auth.claims")) {
        return Some(r);
    }
    if key.starts_with("experimental.envoy.filters.") {
        let open = key.find('[');
        let ok = key.ends_with(']') && open.is_some_and(|o| o > 0 && o < key.len() - 2);
        return Some(if ok { Ok(()) } else { Err(format!("bad key {key:?}: expected a[b]")) });
    }
    matches!(
        key,
        "remote.ip" | "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter" | "connection.sni"
    )
    .then_some(Ok(()))
}

fn compile_condition(
    cx: &Ctx<'_>,
    path: &str,
    c: &Condition,
    policy_ns: &str,
    l7: &mut Vec<String>,
) -> Result<Match, PolicyError> {
    let key = c.key.as_str();
    if key.is_empty() {
        return Err(cx.err(format!("{path}.key"), "`key` is required"));
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(cx.err(path, format!("set `values` or `notValues` for key {key}")));
    }
    non_empty(cx, path, "values", &c.values)?;
    non_empty(cx, path, "notValues", &c.not_values)?;
    let (v, nv) = (&c.values, &c.not_values);
    let mut m = Match::default();
    match key {
        "source.ip" => {
            (m.source_ips, m.not_source_ips) = (ips(cx, path, "values", v)?, ips(cx, path, "notValues", nv)?)
        }
        "destination.ip" => {
            (m.dest_ips, m.not_dest_ips) = (ips(cx, path, "values", v)?, ips(cx, path, "notValues", nv)?)
        }
        "destination.port" => {
            (m.ports, m.not_ports) = (ports(cx, path, "values", v)?, ports(cx, path, "notValues", nv)?)
        }
        "source.namespace" => {
            (m.namespaces, m.not_namespaces) = (strs(cx, path, "values", v)?, strs(cx, path, "notValues", nv)?)
        }
        "source.principal" => {
            (m.principals, m.not_principals) = (strs(cx, path, "values", v)?, strs(cx, path, "notValues", nv)?)
        }
        // Both come from the peer certificate, so weft enforces them at L4 (istiod does not
        // translate them for ztunnel, which drops ALLOW rules using them).
        "source.serviceAccount" => {
            (m.service_accounts, m.not_service_accounts) = (
                service_accounts(cx, path, "values", v, policy_ns)?,
                service_accounts(cx, path, "notValues", nv, policy_ns)?,
            );
        }
        "source.trustDomain" => {
            (m.trust_domains, m.not_trust_domains) =
                (trust_domains(cx, path, "values", v)?, trust_domains(cx, path, "notValues", nv)?)
        }
        "destination.namespace" => {
            return Err(cx.err(format!("{path}.key"), "destination.namespace is replaced by the policy's namespace"));
        }
        k if k.starts_with("destination.labels") => {
            return Err(cx.err(format!("{path}.key"), "destination.labels is replaced by the workload selector"));
        }
        "destination.name" | "destination.user" => {
            return Err(cx.err(format!("{path}.key"), format!("{key} is deprecated (v1alpha1 only)")));
        }
        _ => match is_l7_attribute(key) {
            Some(Ok(())) => {
                if key == "remote.ip" {
                    ips(cx, path, "values", v)?;
                    ips(cx, path, "notValues", nv)?;
                }
                l7.push(key.to_owned());
            }
            Some(Err(why)) => return Err(cx.err(format!("{path}.key"), why)),
            None => {
                return Err(cx.err(
                    format!("{path}.key"),
                    format!(
                        "unknown attribute {key:?}; see istio.io/latest/docs/reference/config/security/conditions/"
                    ),
                ));
            }
        },
    }
    Ok(m)
}
