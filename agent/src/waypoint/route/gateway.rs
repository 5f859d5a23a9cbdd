//! HTTPRoute (Gateway API, GAMMA mesh flavour) → compiled routes, ordered by the Gateway API
//! precedence rules across every rule of every route attached to a service.
//!
//! Owns: attachment (a `parentRef` to a Service this waypoint serves, or to the waypoint's own
//! Gateway = every service it serves, narrowed by `hostnames`), the meaning of matches, filters,
//! backendRefs (default weight 1, weight 0 never picked, no usable backend = 500 as the spec asks),
//! timeouts and retries. Does not own VirtualServices (`istio`) or request matching (`matcher`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::action::{HeaderOps, Mirror, PathRewrite, Redirect, RedirectPort, RetryOn, RetryPolicy, Rewrite};
use super::matcher::{HeaderMatcher, PathMatcher, QueryMatcher, RequestMatch, StringMatcher, full_regex};
use super::{Action, Ctx, Destination, Entry, Route, ServiceKey, WeightedDestination};
use crate::crd::duration;
use crate::crd::gateway::{self as gw, HTTPRoute, HTTPRouteMatch, HTTPRouteRule, HeaderMatchType, PathMatchType};
use crate::state::Service;
use crate::waypoint::{ConfigError, WaypointId};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Gateway API precedence; smaller sorts first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    /// Exact, then PathPrefix, then RegularExpression (Istio's order for the implementation-specific
    /// regex case).
    path_rank: u8,
    path_len: Reverse<usize>,
    no_method: bool,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    /// Oldest first; no timestamp (local files) last.
    created: (bool, Option<Time>),
    ns_name: (String, String),
    rule: usize,
    matched: usize,
}

fn ns_of(r: &HTTPRoute) -> &str {
    r.metadata.namespace.as_deref().unwrap_or("default")
}

fn name_of(r: &HTTPRoute) -> &str {
    r.metadata.name.as_deref().unwrap_or("")
}

struct RuleErrors<'a> {
    route: &'a HTTPRoute,
    prefix: String,
    /// Errors that take the rule out.
    errors: Vec<ConfigError>,
    /// Errors reported while the rule stays (unresolved backends answer 500 instead).
    reported: Vec<ConfigError>,
}

impl RuleErrors<'_> {
    fn push(&mut self, field: impl AsRef<str>, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            kind: "HTTPRoute",
            namespace: ns_of(self.route).to_owned(),
            name: name_of(self.route).to_owned(),
            field: format!("{}{}", self.prefix, field.as_ref()),
            reason: reason.into(),
        });
    }
}

/// HTTPRoute entries per served service, in precedence order.
#[derive(Default)]
pub(super) struct Compiled {
    /// Routes in the service's own namespace, or on the waypoint Gateway: they replace any
    /// VirtualService and the default route.
    pub(super) producer: HashMap<ServiceKey, Vec<Entry>>,
    /// GAMMA consumer routes (an HTTPRoute in another namespace than the Service it names): only for
    /// clients in the route's namespace, tried before the service's other routes.
    pub(super) consumer: HashMap<ServiceKey, Vec<Entry>>,
}

/// Entries per served service from every HTTPRoute attached to it. Services that no HTTPRoute
/// attaches to are absent.
pub(super) fn compile_all(
    ctx: &Ctx<'_>,
    me: &WaypointId,
    served: &BTreeMap<ServiceKey, Arc<Service>>,
    errors: &mut Vec<ConfigError>,
) -> Compiled {
    type Lists = HashMap<ServiceKey, Vec<(Precedence, Entry)>>;
    let (mut producer, mut consumer): (Lists, Lists) = Default::default();
    for route in &ctx.state.routing.http_routes {
        let attachments = attachments(route, me, served);
        if attachments.is_empty() {
            continue;
        }
        let compiled = compile(ctx, route, errors);
        for (key, port) in attachments {
            let is_consumer = key.0 != ns_of(route) && !attaches_to_gateway(route, me);
            let list = if is_consumer { consumer.entry(key) } else { producer.entry(key) }.or_default();
            for (prec, entry) in &compiled {
                let mut entry = entry.clone();
                if port.is_some() {
                    entry.m.port = port;
                }
                if is_consumer {
                    entry.m.source_namespace = Some(ns_of(route).to_owned());
                }
                list.push((prec.clone(), entry));
            }
        }
    }
    let sorted = |lists: Lists| -> HashMap<ServiceKey, Vec<Entry>> {
        lists
            .into_iter()
            .map(|(k, mut v)| {
                v.sort_by(|a, b| a.0.cmp(&b.0));
                (k, v.into_iter().map(|(_, e)| e).collect())
            })
            .collect()
    };
    Compiled { producer: sorted(producer), consumer: sorted(consumer) }
}

fn attaches_to_gateway(route: &HTTPRoute, me: &WaypointId) -> bool {
    route.spec.parent_refs.iter().any(|p| {
        p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
            && p.name == me.name
            && p.namespace.as_deref().unwrap_or(ns_of(route)) == me.namespace
    })
}

/// The served services (and parentRef port, if any) `route` attaches to.
fn attachments(
    route: &HTTPRoute,
    me: &WaypointId,
    served: &BTreeMap<ServiceKey, Arc<Service>>,
) -> Vec<(ServiceKey, Option<u16>)> {
    let ns = ns_of(route);
    let mut out = Vec::new();
    for p in &route.spec.parent_refs {
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        let group = p.group.as_deref().unwrap_or(GATEWAY_GROUP);
        let pns = p.namespace.as_deref().unwrap_or(ns);
        let port = p.port.and_then(|p| u16::try_from(p).ok());
        match (kind, group) {
            ("Service", "" | "core") => {
                let key = (pns.to_owned(), p.name.clone());
                if served.contains_key(&key) {
                    out.push((key, port));
                }
            }
            ("Gateway", GATEWAY_GROUP) if p.name == me.name && pns == me.namespace => {
                for (key, svc) in served {
                    if route.spec.hostnames.is_empty() || route.spec.hostnames.iter().any(|h| hostname_matches(h, svc))
                    {
                        out.push((key.clone(), port));
                    }
                }
            }
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

fn hostname_matches(pattern: &str, svc: &Service) -> bool {
    let fqdn = svc.hostname();
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix('*') {
        Some(suffix) => fqdn.ends_with(suffix),
        None => pattern == fqdn || pattern == svc.name || pattern == format!("{}.{}", svc.name, svc.namespace),
    }
}

fn compile(ctx: &Ctx<'_>, route: &HTTPRoute, errors: &mut Vec<ConfigError>) -> Vec<(Precedence, Entry)> {
    let created = (route.metadata.creation_timestamp.is_none(), route.metadata.creation_timestamp.clone());
    let ns_name = (ns_of(route).to_owned(), name_of(route).to_owned());
    let mut out = Vec::new();
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let mut e = RuleErrors { route, prefix: format!("spec.rules[{i}]"), errors: Vec::new(), reported: Vec::new() };
        let entries = compile_rule(ctx, route, i, rule, &mut e);
        errors.append(&mut e.reported);
        if !e.errors.is_empty() {
            errors.append(&mut e.errors);
            continue;
        }
        for (j, (m, entry)) in entries.into_iter().enumerate() {
            let (path_rank, path_len) = match m.path.as_ref() {
                None => (1, 1),
                Some(p) => {
                    let len = p.value.as_deref().unwrap_or("/").len();
                    match p.r#type {
                        PathMatchType::Exact => (0, len),
                        PathMatchType::PathPrefix => (1, len),
                        PathMatchType::RegularExpression => (2, len),
                    }
                }
            };
            let prec = Precedence {
                path_rank,
                path_len: Reverse(path_len),
                no_method: m.method.is_none(),
                headers: Reverse(m.headers.len()),
                query: Reverse(m.query_params.len()),
                created: created.clone(),
                ns_name: ns_name.clone(),
                rule: i,
                matched: j,
            };
            out.push((prec, entry));
        }
    }
    out
}

fn compile_rule(
    ctx: &Ctx<'_>,
    route: &HTTPRoute,
    i: usize,
    rule: &HTTPRouteRule,
    e: &mut RuleErrors<'_>,
) -> Vec<(HTTPRouteMatch, Entry)> {
    let ns = ns_of(route);
    let mut base = Route {
        name: rule.name.clone().unwrap_or_else(|| format!("{ns}.{}.{i}", name_of(route))),
        origin: format!("HTTPRoute {ns}/{} rules[{i}]", name_of(route)),
        action: Action::Forward(Vec::new()),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite: None,
        timeout: None,
        retry: RetryPolicy::istio_default(),
        fault: None,
        mirrors: Vec::new(),
        cors: None,
    };
    let mut redirect: Option<(Redirect, Option<gw::HTTPPathModifier>)> = None;
    let mut url_rewrite: Option<&gw::HTTPURLRewriteFilter> = None;
    for (k, f) in rule.filters.iter().enumerate() {
        let field = format!(".filters[{k}]");
        match f.r#type.as_str() {
            "RequestHeaderModifier" => {
                if let Some(m) = &f.request_header_modifier {
                    base.request_headers = header_filter(m, &format!("{field}.requestHeaderModifier"), e);
                }
            }
            "ResponseHeaderModifier" => {
                if let Some(m) = &f.response_header_modifier {
                    base.response_headers = header_filter(m, &format!("{field}.responseHeaderModifier"), e);
                }
            }
            "RequestRedirect" => {
                if let Some(r) = &f.request_redirect {
                    redirect = Some(request_redirect(r, &format!("{field}.requestRedirect"), e));
                }
            }
            "URLRewrite" => url_rewrite = f.url_rewrite.as_ref(),
            "RequestMirror" => {
                if let Some(m) = &f.request_mirror {
                    base.mirrors.extend(mirror(ctx, ns, m, &format!("{field}.requestMirror"), e));
                }
            }
            other => {
                e.push(format!("{field}.type"), format!("filter {other:?} is not supported by the waypoint; remove it"))
            }
        }
    }
    if redirect.is_some() && url_rewrite.is_some() {
        e.push(".filters", "RequestRedirect and URLRewrite cannot be used together");
    }
    if let Some(t) = rule.timeouts.as_ref() {
        if let Some(req) = &t.request {
            base.timeout = duration_field(req, ".timeouts.request", e).filter(|d| !d.is_zero());
        }
        if let Some(b) = &t.backend_request {
            base.retry.per_try_timeout = duration_field(b, ".timeouts.backendRequest", e).filter(|d| !d.is_zero());
        }
    }
    if let Some(r) = &rule.retry {
        let per_try = base.retry.per_try_timeout;
        base.retry = retry(r, e);
        base.retry.per_try_timeout = per_try;
    }
    if redirect.is_none() {
        base.action = backends(ctx, ns, rule, e);
    }

    let matches = if rule.matches.is_empty() { vec![HTTPRouteMatch::default()] } else { rule.matches.clone() };
    let mut out = Vec::new();
    for (j, m) in matches.into_iter().enumerate() {
        let field = format!(".matches[{j}]");
        let compiled = request_match(&m, &field, e);
        let mut route = base.clone();
        let prefix = m
            .path
            .as_ref()
            .filter(|p| p.r#type == PathMatchType::PathPrefix)
            .map(|p| p.value.clone().unwrap_or_else(|| "/".into()));
        if let Some((r, path)) = &redirect {
            let mut r = r.clone();
            r.path =
                path.as_ref().and_then(|p| path_modifier(p, prefix.as_deref(), ".filters.requestRedirect.path", e));
            route.action = Action::Redirect(r);
        }
        if let Some(rw) = url_rewrite {
            route.rewrite = Some(Rewrite {
                path: rw.path.as_ref().and_then(|p| path_modifier(p, prefix.as_deref(), ".filters.urlRewrite.path", e)),
                authority: rw.hostname.clone(),
            });
        }
        out.push((m, Entry { m: compiled, route: Arc::new(route) }));
    }
    out
}

fn request_match(m: &HTTPRouteMatch, field: &str, e: &mut RuleErrors<'_>) -> RequestMatch {
    let mut out = RequestMatch::default();
    let regex = |v: &str, f: String, e: &mut RuleErrors<'_>| full_regex(v).map_err(|reason| e.push(f, reason)).ok();
    out.path = match &m.path {
        None => Some(PathMatcher::SegmentPrefix("/".into())),
        Some(p) => {
            let v = p.value.clone().unwrap_or_else(|| "/".into());
            if p.r#type != PathMatchType::RegularExpression && !v.starts_with('/') {
                e.push(format!("{field}.path.value"), format!("{v:?} must start with /"));
            }
            match p.r#type {
                PathMatchType::Exact => Some(PathMatcher::Exact(v)),
                PathMatchType::PathPrefix => Some(PathMatcher::SegmentPrefix(v)),
                PathMatchType::RegularExpression => regex(&v, format!("{field}.path.value"), e).map(PathMatcher::Regex),
            }
        }
    };
    let mut seen = std::collections::HashSet::new();
    for (k, h) in m.headers.iter().enumerate() {
        let name = h.name.to_ascii_lowercase();
        // Gateway API: of several matches for one header name, the first counts.
        if !seen.insert(name.clone()) {
            continue;
        }
        let matcher = match h.r#type {
            HeaderMatchType::Exact => Some(StringMatcher::Exact(h.value.clone())),
            HeaderMatchType::RegularExpression => {
                regex(&h.value, format!("{field}.headers[{k}].value"), e).map(StringMatcher::Regex)
            }
        };
        if let Some(matcher) = matcher {
            out.headers.push(HeaderMatcher { name, matcher, invert: false });
        }
    }
    for (k, q) in m.query_params.iter().enumerate() {
        let matcher = match q.r#type {
            HeaderMatchType::Exact => Some(StringMatcher::Exact(q.value.clone())),
            HeaderMatchType::RegularExpression => {
                regex(&q.value, format!("{field}.queryParams[{k}].value"), e).map(StringMatcher::Regex)
            }
        };
        if let Some(matcher) = matcher {
            out.query.push(QueryMatcher { name: q.name.clone(), matcher });
        }
    }
    out.method = m.method.clone().map(StringMatcher::Exact);
    out
}

fn header_filter(f: &gw::HTTPHeaderFilter, field: &str, e: &mut RuleErrors<'_>) -> HeaderOps {
    HeaderOps::build(
        f.set.iter().map(|h| (h.name.as_str(), h.value.as_str())),
        f.add.iter().map(|h| (h.name.as_str(), h.value.as_str())),
        f.remove.iter().map(String::as_str),
    )
    .map(|mut ops| {
        // Gateway API header names are case-insensitive; HeaderName is lower case already.
        ops.remove.dedup();
        ops
    })
    .unwrap_or_else(|(f, reason)| {
        e.push(format!("{field}.{f}"), reason);
        HeaderOps::default()
    })
}

fn request_redirect(
    r: &gw::HTTPRequestRedirectFilter,
    field: &str,
    e: &mut RuleErrors<'_>,
) -> (Redirect, Option<gw::HTTPPathModifier>) {
    let status = match r.status_code {
        None => StatusCode::FOUND,
        Some(c @ (301 | 302 | 303 | 307 | 308)) => StatusCode::from_u16(c as u16).expect("valid redirect status"),
        Some(c) => {
            e.push(format!("{field}.statusCode"), format!("{c} is not 301, 302, 303, 307 or 308"));
            StatusCode::FOUND
        }
    };
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => match u16::try_from(p) {
            Ok(p) if p > 0 => RedirectPort::Set(p),
            _ => {
                e.push(format!("{field}.port"), format!("{p} is not a port (1-65535)"));
                RedirectPort::Keep
            }
        },
        // Gateway API: with a scheme and no port, the scheme's well-known port.
        (None, Some(_)) => RedirectPort::SchemeDefault,
        (None, None) => RedirectPort::FromRequest,
    };
    (Redirect { scheme: r.scheme.clone(), host: r.hostname.clone(), port, path: None, status }, r.path.clone())
}

/// `ReplaceFullPath` / `ReplacePrefixMatch` (the latter only after a `PathPrefix` match).
fn path_modifier(
    p: &gw::HTTPPathModifier,
    prefix: Option<&str>,
    field: &str,
    e: &mut RuleErrors<'_>,
) -> Option<PathRewrite> {
    match (p.r#type.as_str(), &p.replace_full_path, &p.replace_prefix_match) {
        ("ReplaceFullPath", Some(full), _) => Some(PathRewrite::Full(full.clone())),
        ("ReplacePrefixMatch", _, Some(repl)) => match prefix {
            Some(prefix) => Some(PathRewrite::SegmentPrefix { prefix: prefix.to_owned(), replacement: repl.clone() }),
            None => {
                e.push(field, "ReplacePrefixMatch needs a PathPrefix match in every match of the rule");
                None
            }
        },
        (t, _, _) => {
            e.push(format!("{field}.type"), format!("{t:?} needs its value (replaceFullPath / replacePrefixMatch)"));
            None
        }
    }
}

fn mirror(
    ctx: &Ctx<'_>,
    ns: &str,
    m: &gw::HTTPRequestMirrorFilter,
    field: &str,
    e: &mut RuleErrors<'_>,
) -> Option<Mirror> {
    let percent = match (&m.percent, &m.fraction) {
        (Some(p), None) => f64::from(*p),
        (None, Some(f)) => {
            let den = f.denominator.unwrap_or(100);
            if den <= 0 {
                e.push(format!("{field}.fraction.denominator"), format!("{den} must be positive"));
                return None;
            }
            100.0 * f64::from(f.numerator) / f64::from(den)
        }
        (None, None) => 100.0,
        (Some(_), Some(_)) => {
            e.push(field, "set only one of percent and fraction");
            return None;
        }
    };
    if !(0.0..=100.0).contains(&percent) {
        e.push(field, format!("{percent} is not a percentage (0-100)"));
        return None;
    }
    let b = &m.backend_ref;
    let dest = backend(
        ctx,
        ns,
        b.group.as_deref(),
        b.kind.as_deref(),
        &b.name,
        b.namespace.as_deref(),
        b.port,
        &format!("{field}.backendRef"),
        e,
    )?;
    Some(Mirror { dest, percent })
}

#[allow(clippy::too_many_arguments)]
fn backend(
    ctx: &Ctx<'_>,
    ns: &str,
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<i32>,
    field: &str,
    e: &mut RuleErrors<'_>,
) -> Option<Destination> {
    let kind = kind.unwrap_or("Service");
    let group = group.unwrap_or("");
    if kind != "Service" || !(group.is_empty() || group == "core") {
        e.push(format!("{field}.kind"), format!("backend kind {group}/{kind} is not supported; use a Service"));
        return None;
    }
    let bns = namespace.unwrap_or(ns);
    let Some(service) = ctx.state.service(bns, name).cloned() else {
        e.push(format!("{field}.name"), format!("no Service {bns}/{name}; create it or fix the backendRef"));
        return None;
    };
    let port = match port {
        None => 0,
        Some(p) => match u16::try_from(p) {
            Ok(p) if p > 0 => p,
            _ => {
                e.push(format!("{field}.port"), format!("{p} is not a port (1-65535)"));
                return None;
            }
        },
    };
    Some(Destination { service, subset: None, port })
}

/// The backendRefs as weighted destinations. Gateway API: a rule with no usable backend answers 500;
/// backends that cannot be resolved are reported (ResolvedRefs) and left out.
fn backends(ctx: &Ctx<'_>, ns: &str, rule: &HTTPRouteRule, e: &mut RuleErrors<'_>) -> Action {
    let mut dests = Vec::new();
    for (k, b) in rule.backend_refs.iter().enumerate() {
        let field = format!(".backendRefs[{k}]");
        let weight = b.weight.unwrap_or(1);
        if weight < 0 {
            e.push(format!("{field}.weight"), format!("weight {weight} is negative; use 0 or more"));
            continue;
        }
        // Resolution errors are reported on the object but do not take the rule out: the Gateway API
        // asks for a 500 on the share of requests that would have gone to them.
        let mut resolve =
            RuleErrors { route: e.route, prefix: e.prefix.clone(), errors: Vec::new(), reported: Vec::new() };
        let dest = backend(
            ctx,
            ns,
            b.group.as_deref(),
            b.kind.as_deref(),
            &b.name,
            b.namespace.as_deref(),
            b.port,
            &field,
            &mut resolve,
        );
        e.reported.append(&mut resolve.errors);
        let mut req = HeaderOps::default();
        let mut resp = HeaderOps::default();
        for (m, f) in b.filters.iter().enumerate() {
            let ff = format!("{field}.filters[{m}]");
            match (f.r#type.as_str(), &f.request_header_modifier, &f.response_header_modifier) {
                ("RequestHeaderModifier", Some(h), _) => {
                    req = header_filter(h, &format!("{ff}.requestHeaderModifier"), e)
                }
                ("ResponseHeaderModifier", _, Some(h)) => {
                    resp = header_filter(h, &format!("{ff}.responseHeaderModifier"), e)
                }
                (t, _, _) => e.push(
                    format!("{ff}.type"),
                    format!("backendRef filter {t:?} is not supported; use header modifiers"),
                ),
            }
        }
        if let Some(dest) = dest {
            dests.push(WeightedDestination {
                dest,
                weight: weight as u32,
                request_headers: req,
                response_headers: resp,
            });
        }
    }
    if dests.iter().all(|d| d.weight == 0) {
        return Action::DirectResponse { status: StatusCode::INTERNAL_SERVER_ERROR, body: bytes::Bytes::new() };
    }
    Action::Forward(dests)
}

fn duration_field(text: &str, field: &str, e: &mut RuleErrors<'_>) -> Option<Duration> {
    duration::parse(text).map_err(|reason| e.push(field, reason)).ok()
}

/// Gateway API `retry`, the way Istio translates it: the listed codes plus Istio's default
/// connection-level conditions; attempts default 2, 0 disables.
fn retry(r: &gw::HTTPRouteRetry, e: &mut RuleErrors<'_>) -> RetryPolicy {
    let attempts = r.attempts.unwrap_or(2);
    if attempts < 0 {
        e.push(".retry.attempts", format!("{attempts} is negative; use 0 to disable retries"));
    }
    if attempts <= 0 {
        return RetryPolicy::disabled();
    }
    let mut on = String::from("connect-failure,refused-stream,unavailable,cancelled");
    for (k, c) in r.codes.iter().enumerate() {
        if !(400..=599).contains(c) {
            e.push(format!(".retry.codes[{k}]"), format!("{c} is not an HTTP error status (400-599)"));
            continue;
        }
        on.push_str(&format!(",{c}"));
    }
    let on = RetryOn::parse(&on).unwrap_or_else(|reason| {
        e.push(".retry", reason);
        RetryOn::default()
    });
    RetryPolicy { attempts: attempts as u32, per_try_timeout: None, on }
}
