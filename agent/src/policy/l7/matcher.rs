//! The request-level matchers of an L7 AuthorizationPolicy, and lowering a policy's `rules` to them.
//!
//! Shape (Envoy RBAC as istiod generates it): a policy matches when ANY rule matches; a rule when
//! ALL its clauses match (one for `from`, one for `to`, one per `when`); a clause when ANY of its
//! entries matches; an entry when ALL its fields match; a field when ANY value matches (a `not*`
//! field: when NONE does). Attributes the waypoint cannot know (JWT claims, SNI inside the tunnel)
//! are treated as absent: a value list on them never matches, a `not*` list always passes, which is
//! what Envoy does for a request that carries no JWT and a connection without SNI.

use std::net::IpAddr;

use http::HeaderName;
use ipnet::IpNet;

use crate::crd::{Condition, Operation, Source};

use super::L7Request;

/// Istio's string forms: `*` (present and non-empty), `*suffix`, `prefix*`, exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StrMatch {
    Presence,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

impl StrMatch {
    pub fn parse(v: &str) -> StrMatch {
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

    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Presence => !v.is_empty(),
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Exact(e) => v == e,
        }
    }

    /// Case-insensitive (hosts). Patterns are stored lowercase.
    fn matches_ignore_case(&self, v: &str) -> bool {
        let b = v.as_bytes();
        match self {
            StrMatch::Presence => !v.is_empty(),
            StrMatch::Prefix(p) => b.len() >= p.len() && b[..p.len()].eq_ignore_ascii_case(p.as_bytes()),
            StrMatch::Suffix(s) => b.len() >= s.len() && b[b.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes()),
            StrMatch::Exact(e) => v.eq_ignore_ascii_case(e),
        }
    }
}

/// One piece of an Istio path template (Envoy's URI template matcher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    Literal(String),
    /// `{*}`: one non-empty path segment.
    Segment,
    /// `{**}`: zero or more characters, `/` included; always the last operator.
    Rest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PathMatch {
    Str(StrMatch),
    Template(Vec<Piece>),
}

impl PathMatch {
    /// A path containing `{*}` or `{**}` is a template and must follow Istio's template rules;
    /// anything else is an Istio string match.
    pub fn parse(v: &str) -> Result<PathMatch, String> {
        if !v.contains("{*}") && !v.contains("{**}") {
            return Ok(PathMatch::Str(StrMatch::parse(v)));
        }
        let Some(rest) = v.strip_prefix('/') else {
            return Err(format!("path template {v:?} must start with '/'"));
        };
        let mut pieces = Vec::new();
        let mut literal = String::from("/");
        let mut seen_rest = false;
        let segments: Vec<&str> = rest.split('/').collect();
        for (i, seg) in segments.iter().enumerate() {
            let op = match *seg {
                "{*}" => Some(Piece::Segment),
                "{**}" => Some(Piece::Rest),
                s if s.contains(['*', '{', '}']) => {
                    return Err(format!(
                        "path template {v:?}: segment {s:?} mixes '*', '{{' or '}}' with other characters; a \
                         segment is either exactly {{*}} or {{**}}, or has none of them"
                    ));
                }
                _ => None,
            };
            match op {
                Some(p) => {
                    if seen_rest {
                        return Err(format!("path template {v:?}: {{**}} must be the last operator"));
                    }
                    seen_rest |= p == Piece::Rest;
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    pieces.push(p);
                }
                None => literal.push_str(seg),
            }
            if i + 1 < segments.len() {
                literal.push('/');
            }
        }
        pieces.push(Piece::Literal(literal));
        pieces.retain(|p| !matches!(p, Piece::Literal(l) if l.is_empty()));
        Ok(PathMatch::Template(pieces))
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(path),
            PathMatch::Template(pieces) => template_matches(pieces, path),
        }
    }
}

/// Deterministic: `{*}` is always a whole segment (it takes everything up to the next `/`), and
/// `{**}` is the last operator, so only literals follow it and it takes what they leave.
fn template_matches(pieces: &[Piece], s: &str) -> bool {
    match pieces.split_first() {
        None => s.is_empty(),
        Some((Piece::Literal(l), rest)) => s.strip_prefix(l.as_str()).is_some_and(|s| template_matches(rest, s)),
        Some((Piece::Segment, rest)) => {
            let end = s.find('/').unwrap_or(s.len());
            end > 0 && template_matches(rest, &s[end..])
        }
        Some((Piece::Rest, rest)) => {
            let tail: String = rest.iter().map(|p| if let Piece::Literal(l) = p { l.as_str() } else { "" }).collect();
            s.len() >= tail.len() && s.ends_with(tail.as_str())
        }
    }
}

/// One value of one field, tested against one attribute of the request.
#[derive(Debug, Clone)]
pub(super) enum Test {
    Principal(StrMatch),
    Namespace(StrMatch),
    /// (namespace, service account), exact.
    ServiceAccount(String, String),
    TrustDomain(StrMatch),
    SourceIp(IpNet),
    Method(StrMatch),
    Path(PathMatch),
    /// Pattern lowercase; `port_agnostic` when the pattern has no `:port`, so `example.com` also
    /// matches an authority of `example.com:8080`.
    Host {
        pattern: StrMatch,
        port_agnostic: bool,
    },
    Port(u16),
    Header(HeaderName, StrMatch),
    /// An attribute the waypoint never has (request principal, JWT claims, SNI).
    Absent,
}

/// What the tests see of a request: principal parts split once, the source IP canonical.
pub(super) struct Attrs<'a> {
    pub r: &'a L7Request<'a>,
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub trust_domain: Option<&'a str>,
    pub sa: Option<(&'a str, &'a str)>,
    pub source_ip: IpAddr,
}

impl Test {
    fn matches(&self, a: &Attrs<'_>) -> bool {
        match self {
            Test::Principal(m) => a.principal.is_some_and(|p| m.matches(p)),
            Test::Namespace(m) => a.namespace.is_some_and(|n| m.matches(n)),
            Test::ServiceAccount(ns, sa) => a.sa == Some((ns.as_str(), sa.as_str())),
            Test::TrustDomain(m) => a.trust_domain.is_some_and(|t| m.matches(t)),
            Test::SourceIp(net) => net.contains(&a.source_ip),
            Test::Method(m) => m.matches(a.r.method),
            Test::Path(m) => m.matches(a.r.path),
            Test::Host { pattern, port_agnostic } => {
                pattern.matches_ignore_case(a.r.host)
                    || *port_agnostic && host_without_port(a.r.host).is_some_and(|h| pattern.matches_ignore_case(h))
            }
            Test::Port(p) => *p == a.r.port,
            Test::Header(name, m) => {
                let mut values = a.r.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).peekable();
                if values.peek().is_none() {
                    return false;
                }
                // Envoy joins repeated headers with ',' before matching.
                let joined = values.collect::<Vec<_>>().join(",");
                m.matches(&joined)
            }
            Test::Absent => false,
        }
    }
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`. `None` when there is no port.
fn host_without_port(authority: &str) -> Option<&str> {
    let (host, port) = authority.rsplit_once(':')?;
    let bracketed_ok = !host.contains(':') || host.starts_with('[') && host.ends_with(']');
    (bracketed_ok && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(host)
}

/// A field of an entry: ANY test matches (or, negated, NONE does).
#[derive(Debug, Clone)]
pub(super) struct Field {
    tests: Vec<Test>,
    negate: bool,
}

impl Field {
    fn matches(&self, a: &Attrs<'_>) -> bool {
        self.tests.iter().any(|t| t.matches(a)) != self.negate
    }
}

/// A `source`, an `operation` or a `when` condition: ALL fields match.
pub(super) type Entry = Vec<Field>;
/// ANY entry matches.
pub(super) type Clause = Vec<Entry>;
/// ALL clauses match (no clauses: always).
pub(super) type CompiledRule = Vec<Clause>;

pub(super) fn rule_matches(rule: &CompiledRule, a: &Attrs<'_>) -> bool {
    rule.iter().all(|clause| clause.iter().any(|entry| entry.iter().all(|f| f.matches(a))))
}

/// Collects what the policy uses that the waypoint cannot evaluate, for one warning per policy.
pub(super) type Unsupported = Vec<String>;

/// Turns one value of a field into its test.
type Lower<'a> = dyn Fn(&str) -> Result<Test, String> + 'a;

/// Lowers one field. The values were validated (non-empty, parseable) by the shared webhook-style
/// check in `policy::authz`, but lowering re-checks so an error here still names the field.
fn field(
    out: &mut Entry,
    values: &[String],
    negate: bool,
    f: impl Fn(&str) -> Result<Test, String>,
) -> Result<(), (usize, String)> {
    if values.is_empty() {
        return Ok(());
    }
    let tests = values.iter().enumerate().map(|(i, v)| f(v).map_err(|e| (i, e))).collect::<Result<_, _>>()?;
    out.push(Field { tests, negate });
    Ok(())
}

fn ip(v: &str) -> Result<Test, String> {
    let net = if v.contains('/') { v.parse::<IpNet>().ok() } else { v.parse::<IpAddr>().ok().map(IpNet::from) };
    net.map(|n| Test::SourceIp(canonical_net(n)))
        .ok_or_else(|| format!("{v:?} is neither an IP address nor a CIDR block"))
}

/// `::ffff:10.0.0.0/104` means `10.0.0.0/8`; requests are matched on canonical addresses.
fn canonical_net(n: IpNet) -> IpNet {
    match n {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(n),
            None => n,
        },
        _ => n,
    }
}

fn port(v: &str) -> Result<Test, String> {
    v.parse::<u16>().map(Test::Port).map_err(|_| format!("{v:?} is not a port number (0-65535)"))
}

fn host(v: &str) -> Result<Test, String> {
    let lower = v.to_ascii_lowercase();
    // `example.com:*` is a prefix pattern with a port part; only a pattern without any `:` is
    // meant for the host alone.
    Ok(Test::Host { port_agnostic: !lower.contains(':'), pattern: StrMatch::parse(&lower) })
}

fn service_account(v: &str, policy_ns: &str) -> Result<Test, String> {
    match v.split_once('/') {
        None if !v.is_empty() => Ok(Test::ServiceAccount(policy_ns.to_owned(), v.to_owned())),
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok(Test::ServiceAccount(ns.to_owned(), sa.to_owned()))
        }
        _ => Err(format!("{v:?}: expected SERVICE_ACCOUNT or NAMESPACE/SERVICE_ACCOUNT")),
    }
}

fn principal(v: &str) -> Result<Test, String> {
    Ok(Test::Principal(StrMatch::parse(v.strip_prefix("spiffe://").unwrap_or(v))))
}

/// Lowers a `from[].source`. `Err((field, reason))`, the field relative to the source.
pub(super) fn source(s: &Source, policy_ns: &str, unsupported: &mut Unsupported) -> Result<Entry, (String, String)> {
    let mut e = Entry::new();
    let strm = |ctor: fn(StrMatch) -> Test| move |v: &str| Ok(ctor(StrMatch::parse(v)));
    let fields: [(&str, &Vec<String>, bool, &Lower<'_>); 14] = [
        ("principals", &s.principals, false, &principal),
        ("notPrincipals", &s.not_principals, true, &principal),
        ("requestPrincipals", &s.request_principals, false, &|_| Ok(Test::Absent)),
        ("notRequestPrincipals", &s.not_request_principals, true, &|_| Ok(Test::Absent)),
        ("namespaces", &s.namespaces, false, &strm(Test::Namespace)),
        ("notNamespaces", &s.not_namespaces, true, &strm(Test::Namespace)),
        ("serviceAccounts", &s.service_accounts, false, &|v| service_account(v, policy_ns)),
        ("notServiceAccounts", &s.not_service_accounts, true, &|v| service_account(v, policy_ns)),
        ("ipBlocks", &s.ip_blocks, false, &ip),
        ("notIpBlocks", &s.not_ip_blocks, true, &ip),
        // No X-Forwarded-For trust is configured (Istio's numTrustedProxies = 0), so the remote IP
        // is the connection's source IP, as in Envoy.
        ("remoteIpBlocks", &s.remote_ip_blocks, false, &ip),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks, true, &ip),
        ("trustDomains", &s.trust_domains, false, &strm(Test::TrustDomain)),
        ("notTrustDomains", &s.not_trust_domains, true, &strm(Test::TrustDomain)),
    ];
    for (name, values, negate, f) in fields {
        if name.contains("equestPrincipals") && !values.is_empty() {
            unsupported.push(format!("{name} (no JWT authentication: requests never carry a request principal)"));
        }
        field(&mut e, values, negate, f).map_err(|(i, why)| (format!("{name}[{i}]"), why))?;
    }
    Ok(e)
}

/// Lowers a `to[].operation`.
pub(super) fn operation(op: &Operation) -> Result<Entry, (String, String)> {
    let mut e = Entry::new();
    let method = |v: &str| Ok(Test::Method(StrMatch::parse(v)));
    let path = |v: &str| PathMatch::parse(v).map(Test::Path);
    let fields: [(&str, &Vec<String>, bool, &Lower<'_>); 8] = [
        ("hosts", &op.hosts, false, &host),
        ("notHosts", &op.not_hosts, true, &host),
        ("ports", &op.ports, false, &port),
        ("notPorts", &op.not_ports, true, &port),
        ("methods", &op.methods, false, &method),
        ("notMethods", &op.not_methods, true, &method),
        ("paths", &op.paths, false, &path),
        ("notPaths", &op.not_paths, true, &path),
    ];
    for (name, values, negate, f) in fields {
        field(&mut e, values, negate, f).map_err(|(i, why)| (format!("{name}[{i}]"), why))?;
    }
    Ok(e)
}

/// Lowers a `when` condition.
pub(super) fn condition(
    c: &Condition,
    policy_ns: &str,
    unsupported: &mut Unsupported,
) -> Result<Entry, (String, String)> {
    let key = c.key.as_str();
    let f: Box<Lower<'_>> = match key {
        "source.ip" | "remote.ip" => Box::new(ip),
        "source.namespace" => Box::new(|v| Ok(Test::Namespace(StrMatch::parse(v)))),
        "source.principal" => Box::new(principal),
        "source.serviceAccount" => Box::new(move |v| service_account(v, policy_ns)),
        "source.trustDomain" => Box::new(|v| Ok(Test::TrustDomain(StrMatch::parse(v)))),
        "destination.port" => Box::new(port),
        k if k.starts_with("request.headers[") && k.ends_with(']') => {
            let name = &k["request.headers[".len()..k.len() - 1];
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ("key".to_owned(), format!("{name:?} is not a valid HTTP header name")))?;
            Box::new(move |v| Ok(Test::Header(name.clone(), StrMatch::parse(v))))
        }
        "connection.sni" => {
            unsupported.push("connection.sni (requests reach the waypoint inside HBONE, without SNI)".to_owned());
            Box::new(|_| Ok(Test::Absent))
        }
        "destination.ip" => {
            unsupported.push("destination.ip (not evaluated by the waypoint)".to_owned());
            Box::new(|_| Ok(Test::Absent))
        }
        k if k.starts_with("request.auth.") => {
            unsupported.push(format!("{k} (no JWT authentication: requests never carry claims)"));
            Box::new(|_| Ok(Test::Absent))
        }
        k if k.starts_with("experimental.envoy.filters.") => {
            unsupported.push(format!("{k} (Envoy filter metadata does not exist here)"));
            Box::new(|_| Ok(Test::Absent))
        }
        _ => {
            return Err((
                "key".to_owned(),
                format!("unknown attribute {key:?}; see istio.io/latest/docs/reference/config/security/conditions/"),
            ));
        }
    };
    let mut e = Entry::new();
    field(&mut e, &c.values, false, &f).map_err(|(i, why)| (format!("values[{i}]"), why))?;
    field(&mut e, &c.not_values, true, &f).map_err(|(i, why)| (format!("notValues[{i}]"), why))?;
    Ok(e)
}
