//! VirtualService → compiled routes, with Istio's meaning of every field and its defaults (301
//! redirects, 2 retries on connect failure / refused stream / 503, no timeout, 100% when a fault or
//! mirror percentage is unset, weight 100 for a lone destination).
//!
//! Owns choosing the VirtualService of a service (most specific host, then oldest, then name) and
//! validating it rule by rule: a rule with an error is left out (and reported), the other rules stay.
//! Does not own HTTPRoutes (`gateway`) or matching requests (`matcher`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::StatusCode;

use super::action::envoy_substitution;
use super::action::{
    Cors, Fault, HeaderOps, Mirror, PathRewrite, Redirect, RedirectPort, RetryOn, RetryPolicy, Rewrite,
};
use super::matcher::{HeaderMatcher, PathMatcher, QueryMatcher, RequestMatch, StringMatcher, full_regex};
use super::{Action, Ctx, Destination, Entry, HostPattern, Route, WeightedDestination, resolve_host};
use crate::crd::duration;
use crate::crd::networking::{self as net, HttpMatchRequest, HttpRoute, StringMatch, VirtualService};
use crate::state::{Service, State};
use crate::waypoint::ConfigError;

/// The gateway name that means "sidecars and waypoints" in `gateways`.
const MESH_GATEWAY: &str = "mesh";

fn applies_to_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == MESH_GATEWAY)
}

fn ns_of(vs: &VirtualService) -> &str {
    vs.metadata.namespace.as_deref().unwrap_or("default")
}

fn name_of(vs: &VirtualService) -> &str {
    vs.metadata.name.as_deref().unwrap_or("")
}

/// How specifically `vs` names `svc`: `None` when it does not; lower is more specific.
fn host_rank(vs: &VirtualService, svc: &Service) -> Option<usize> {
    if !applies_to_mesh(&vs.spec.gateways) {
        return None;
    }
    vs.spec
        .hosts
        .iter()
        .map(|h| HostPattern::parse(h, ns_of(vs)))
        .filter(|p| p.matches(svc))
        .map(|p| match p {
            HostPattern::Exact(_) => 0,
            // A longer suffix is more specific.
            HostPattern::Wildcard(s) => 1 + (usize::MAX / 2 - s.len()),
        })
        .min()
}

pub(super) fn has_virtual_service(state: &State, svc: &Service) -> bool {
    state.routing.virtual_services.iter().any(|vs| host_rank(vs, svc).is_some())
}

/// Compiled VirtualServices, each compiled (and its errors reported) once however many services it names.
#[derive(Default)]
pub(super) struct VsCache {
    compiled: HashMap<usize, Vec<Entry>>,
}

impl VsCache {
    /// The entries of the VirtualService that applies to `svc`, if any does.
    pub(super) fn entries_for(
        &mut self,
        ctx: &Ctx<'_>,
        svc: &Service,
        errors: &mut Vec<ConfigError>,
    ) -> Option<Vec<Entry>> {
        let vss = &ctx.state.routing.virtual_services;
        let mut candidates: Vec<(usize, usize)> =
            vss.iter().enumerate().filter_map(|(i, vs)| host_rank(vs, svc).map(|r| (r, i))).collect();
        candidates.sort_by(|(ra, a), (rb, b)| {
            let (va, vb) = (&vss[*a], &vss[*b]);
            ra.cmp(rb)
                .then_with(|| creation_key(va).cmp(&creation_key(vb)))
                .then_with(|| (ns_of(va), name_of(va)).cmp(&(ns_of(vb), name_of(vb))))
        });
        let &(rank, chosen) = candidates.first()?;
        if let Some(&(_, other)) = candidates.get(1).filter(|(r, _)| *r == rank) {
            tracing::warn!(service = %svc.hostname(), used = %format!("{}/{}", ns_of(&vss[chosen]), name_of(&vss[chosen])),
                ignored = %format!("{}/{}", ns_of(&vss[other]), name_of(&vss[other])),
                "several VirtualServices name this service; the oldest is used");
        }
        let entries = self.compiled.entry(chosen).or_insert_with(|| compile(ctx, &vss[chosen], errors));
        // Every rule left out (or none for HTTP): Istio's webhook would have refused such an object, so
        // the service keeps its default route instead of answering 404 to everything.
        if entries.is_empty() {
            return None;
        }
        Some(entries.clone())
    }
}

/// Oldest first; objects without a timestamp (local files) after those with one.
fn creation_key(vs: &VirtualService) -> (bool, Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) {
    let t = vs.metadata.creation_timestamp.clone();
    (t.is_none(), t)
}

/// Errors of one rule, each with the field it is about.
struct RuleErrors<'a> {
    vs: &'a VirtualService,
    prefix: String,
    errors: Vec<ConfigError>,
}

impl RuleErrors<'_> {
    fn push(&mut self, field: impl AsRef<str>, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            kind: "VirtualService",
            namespace: ns_of(self.vs).to_owned(),
            name: name_of(self.vs).to_owned(),
            field: format!("{}{}", self.prefix, field.as_ref()),
            reason: reason.into(),
        });
    }
}

pub(super) fn compile(ctx: &Ctx<'_>, vs: &VirtualService, errors: &mut Vec<ConfigError>) -> Vec<Entry> {
    let mut entries = Vec::new();
    for (i, rule) in vs.spec.http.iter().enumerate() {
        let mut errs = RuleErrors { vs, prefix: format!("spec.http[{i}]"), errors: Vec::new() };
        let compiled = compile_rule(ctx, vs, i, rule, &mut errs);
        if errs.errors.is_empty() {
            entries.extend(compiled);
        } else {
            errors.append(&mut errs.errors);
        }
    }
    entries
}

fn compile_rule(ctx: &Ctx<'_>, vs: &VirtualService, i: usize, rule: &HttpRoute, e: &mut RuleErrors<'_>) -> Vec<Entry> {
    let ns = ns_of(vs);
    if rule.delegate.is_some() {
        e.push(".delegate", "delegate VirtualServices are not supported by the waypoint; inline the routes");
        return Vec::new();
    }
    let action_count = usize::from(!rule.route.is_empty())
        + usize::from(rule.redirect.is_some())
        + usize::from(rule.direct_response.is_some());
    if action_count != 1 {
        e.push("", "set exactly one of route, redirect and directResponse");
        return Vec::new();
    }
    let mut base = Route {
        name: rule.name.clone().unwrap_or_else(|| format!("{ns}.{}.{i}", name_of(vs))),
        origin: format!("VirtualService {ns}/{} http[{i}]", name_of(vs)),
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
    if let Some(h) = &rule.headers {
        (base.request_headers, base.response_headers) = header_ops(h, ".headers", e);
    }
    if !rule.route.is_empty() {
        base.action = Action::Forward(destinations(ctx, ns, &rule.route, e));
    } else if let Some(r) = &rule.redirect {
        base.action = Action::Redirect(redirect(r, e));
    } else if let Some(d) = &rule.direct_response {
        base.action = direct_response(d, e);
    }
    if let Some(t) = &rule.timeout {
        base.timeout = duration_field(t, ".timeout", e).filter(|d| !d.is_zero());
    }
    if let Some(r) = &rule.retries {
        base.retry = retry(r, e);
    }
    if let Some(f) = &rule.fault {
        base.fault = fault(f, e);
    }
    base.mirrors = mirrors(ctx, ns, rule, e);
    if let Some(c) = &rule.cors_policy {
        base.cors = cors(c, e);
    }

    let matches: Vec<(usize, &HttpMatchRequest)> =
        rule.r#match.iter().enumerate().filter(|(_, m)| applies_to_mesh(&m.gateways)).collect();
    if !rule.r#match.is_empty() && matches.is_empty() {
        return Vec::new();
    }
    let mut entries = Vec::new();
    if matches.is_empty() {
        let mut route = base.clone();
        route.rewrite = rewrite(rule, None, e);
        entries.push(Entry { m: RequestMatch::default(), route: Arc::new(route) });
    }
    for (j, m) in matches {
        let compiled = request_match(m, &format!(".match[{j}]"), e);
        let mut route = base.clone();
        route.rewrite = rewrite(rule, m.uri.as_ref(), e);
        entries.push(Entry { m: compiled, route: Arc::new(route) });
    }
    entries
}

/// A `StringMatch`; all unset = presence. `None` after reporting when it is invalid.
fn string_matcher(m: &StringMatch, field: &str, e: &mut RuleErrors<'_>) -> Option<StringMatcher> {
    match (&m.exact, &m.prefix, &m.regex) {
        (None, None, None) => Some(StringMatcher::Present),
        (Some(x), None, None) => Some(StringMatcher::Exact(x.clone())),
        (None, Some(p), None) => Some(StringMatcher::Prefix(p.clone())),
        (None, None, Some(r)) => match full_regex(r) {
            Ok(re) => Some(StringMatcher::Regex(re)),
            Err(reason) => {
                e.push(format!("{field}.regex"), reason);
                None
            }
        },
        _ => {
            e.push(field, "set only one of exact, prefix and regex");
            None
        }
    }
}

fn request_match(m: &HttpMatchRequest, field: &str, e: &mut RuleErrors<'_>) -> RequestMatch {
    let mut out = RequestMatch { ignore_uri_case: m.ignore_uri_case, ..RequestMatch::default() };
    if let Some(uri) = &m.uri {
        out.path = match string_matcher(uri, &format!("{field}.uri"), e) {
            Some(StringMatcher::Exact(x)) => Some(PathMatcher::Exact(x)),
            Some(StringMatcher::Prefix(p)) => Some(PathMatcher::Prefix(p)),
            Some(StringMatcher::Regex(r)) => Some(PathMatcher::Regex(r)),
            Some(StringMatcher::Present) | None => None,
        };
    }
    out.scheme = m.scheme.as_ref().and_then(|s| string_matcher(s, &format!("{field}.scheme"), e));
    out.method = m.method.as_ref().and_then(|s| string_matcher(s, &format!("{field}.method"), e));
    out.authority = m.authority.as_ref().and_then(|s| string_matcher(s, &format!("{field}.authority"), e));
    for (name, sm, invert, what) in m
        .headers
        .iter()
        .map(|(k, v)| (k, v, false, "headers"))
        .chain(m.without_headers.iter().map(|(k, v)| (k, v, true, "withoutHeaders")))
    {
        if let Some(matcher) = string_matcher(sm, &format!("{field}.{what}.{name}"), e) {
            out.headers.push(HeaderMatcher { name: name.to_ascii_lowercase(), matcher, invert });
        }
    }
    for (name, sm) in &m.query_params {
        if let Some(matcher) = string_matcher(sm, &format!("{field}.queryParams.{name}"), e) {
            out.query.push(QueryMatcher { name: name.clone(), matcher });
        }
    }
    if let Some(p) = m.port {
        match u16::try_from(p) {
            Ok(p) if p > 0 => out.port = Some(p),
            _ => e.push(format!("{field}.port"), format!("{p} is not a port (1-65535)")),
        }
    }
    out.source_namespace = m.source_namespace.clone();
    out.source_labels = m.source_labels.clone();
    out
}

fn header_ops(h: &net::Headers, field: &str, e: &mut RuleErrors<'_>) -> (HeaderOps, HeaderOps) {
    let one = |ops: &Option<net::HeaderOperations>, which: &str, e: &mut RuleErrors<'_>| {
        let Some(ops) = ops else { return HeaderOps::default() };
        HeaderOps::build(
            ops.set.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ops.add.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ops.remove.iter().map(String::as_str),
        )
        .unwrap_or_else(|(f, reason)| {
            e.push(format!("{field}.{which}.{f}"), reason);
            HeaderOps::default()
        })
    };
    (one(&h.request, "request", e), one(&h.response, "response", e))
}

/// Resolves a `destination` (host, subset, port) relative to the VirtualService's namespace.
fn destination(
    ctx: &Ctx<'_>,
    ns: &str,
    d: &net::Destination,
    field: &str,
    e: &mut RuleErrors<'_>,
) -> Option<Destination> {
    let Some(service) = resolve_host(ctx.state, &d.host, ns) else {
        e.push(
            format!("{field}.host"),
            format!("no Service {:?} (resolved in namespace {ns}); create it or fix the host", d.host),
        );
        return None;
    };
    if let Some(subset) = &d.subset
        && !ctx.has_subset(&service, subset)
    {
        e.push(
            format!("{field}.subset"),
            format!("no DestinationRule defines subset {subset:?} for {}; add it or fix the name", service.hostname()),
        );
        return None;
    }
    let port = match d.port.as_ref().and_then(|p| p.number) {
        Some(n) => match u16::try_from(n) {
            Ok(p) if p > 0 => p,
            _ => {
                e.push(format!("{field}.port.number"), format!("{n} is not a port (1-65535)"));
                return None;
            }
        },
        None if service.ports.len() == 1 => service.ports[0].port,
        None => 0,
    };
    Some(Destination { service, subset: d.subset.clone(), port })
}

fn destinations(
    ctx: &Ctx<'_>,
    ns: &str,
    route: &[net::HttpRouteDestination],
    e: &mut RuleErrors<'_>,
) -> Vec<WeightedDestination> {
    let mut out = Vec::new();
    let mut total: i64 = 0;
    for (k, rd) in route.iter().enumerate() {
        let field = format!(".route[{k}]");
        // Istio: a lone destination may leave the weight out (it gets everything).
        let weight = match rd.weight {
            None if route.len() == 1 => 100,
            None => 0,
            Some(w) if w < 0 => {
                e.push(format!("{field}.weight"), format!("weight {w} is negative; use 0-100"));
                continue;
            }
            Some(w) => w,
        };
        total += i64::from(weight);
        let (request_headers, response_headers) =
            rd.headers.as_ref().map(|h| header_ops(h, &format!("{field}.headers"), e)).unwrap_or_default();
        if let Some(dest) = destination(ctx, ns, &rd.destination, &format!("{field}.destination"), e) {
            out.push(WeightedDestination { dest, weight: weight as u32, request_headers, response_headers });
        }
    }
    if total == 0 && !route.is_empty() {
        e.push(".route", "the destination weights add up to 0; give at least one destination a positive weight");
    }
    out
}

fn redirect(r: &net::HttpRedirect, e: &mut RuleErrors<'_>) -> Redirect {
    let status = match r.redirect_code {
        None => StatusCode::MOVED_PERMANENTLY,
        Some(c) => match u16::try_from(c).ok().and_then(|c| StatusCode::from_u16(c).ok()) {
            Some(s) if s.is_redirection() => s,
            _ => {
                e.push(".redirect.redirectCode", format!("{c} is not a redirect status (300-399)"));
                StatusCode::MOVED_PERMANENTLY
            }
        },
    };
    let port = match (r.port, r.derive_port.as_deref()) {
        (Some(p), None) => match u16::try_from(p) {
            Ok(p) if p > 0 => RedirectPort::Set(p),
            _ => {
                e.push(".redirect.port", format!("{p} is not a port (1-65535)"));
                RedirectPort::Keep
            }
        },
        (None, Some("FROM_PROTOCOL_DEFAULT")) => RedirectPort::SchemeDefault,
        (None, Some("FROM_REQUEST_PORT")) => RedirectPort::FromRequest,
        (None, None) => RedirectPort::Keep,
        (None, Some(other)) => {
            e.push(".redirect.derivePort", format!("{other:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"));
            RedirectPort::Keep
        }
        (Some(_), Some(_)) => {
            e.push(".redirect", "set only one of port and derivePort");
            RedirectPort::Keep
        }
    };
    Redirect {
        scheme: r.scheme.clone(),
        host: r.authority.clone(),
        port,
        // Istio replaces the whole path on a redirect, whatever the match was.
        path: r.uri.clone().map(PathRewrite::Full),
        status,
    }
}

fn direct_response(d: &net::HttpDirectResponse, e: &mut RuleErrors<'_>) -> Action {
    let status = match u16::try_from(d.status)
        .ok()
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
    {
        Some(s) => s,
        None => {
            e.push(".directResponse.status", format!("{} is not an HTTP status (200-599)", d.status));
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    let body = match d.body.as_ref() {
        None => bytes::Bytes::new(),
        Some(b) => match (&b.string, &b.bytes) {
            (Some(s), None) => bytes::Bytes::from(s.clone()),
            (None, Some(b64)) => match base64::engine::general_purpose::STANDARD.decode(b64) {
                Ok(v) => bytes::Bytes::from(v),
                Err(err) => {
                    e.push(".directResponse.body.bytes", format!("not base64: {err}"));
                    bytes::Bytes::new()
                }
            },
            (None, None) => bytes::Bytes::new(),
            (Some(_), Some(_)) => {
                e.push(".directResponse.body", "set only one of string and bytes");
                bytes::Bytes::new()
            }
        },
    };
    Action::DirectResponse { status, body }
}

fn duration_field(text: &str, field: &str, e: &mut RuleErrors<'_>) -> Option<Duration> {
    duration::parse(text).map_err(|reason| e.push(field, reason)).ok()
}

fn retry(r: &net::HttpRetry, e: &mut RuleErrors<'_>) -> RetryPolicy {
    let attempts = r.attempts.unwrap_or(0);
    if attempts < 0 {
        e.push(".retries.attempts", format!("{attempts} is negative; use 0 to disable retries"));
    }
    // Istio: `attempts: 0` (or unset inside `retries`) turns retries off.
    if attempts <= 0 {
        return RetryPolicy::disabled();
    }
    let mut policy = RetryPolicy::istio_default();
    policy.attempts = attempts as u32;
    if let Some(on) = r.retry_on.as_deref().filter(|s| !s.trim().is_empty()) {
        match RetryOn::parse(on) {
            Ok(parsed) => policy.on = parsed,
            Err(reason) => e.push(".retries.retryOn", reason),
        }
    }
    if let Some(t) = &r.per_try_timeout {
        policy.per_try_timeout = duration_field(t, ".retries.perTryTimeout", e).filter(|d| !d.is_zero());
    }
    policy
}

fn percent(p: Option<&net::Percent>, legacy: Option<i64>, field: &str, e: &mut RuleErrors<'_>) -> f64 {
    let v = p.map(|p| p.value).or(legacy.map(|v| v as f64)).unwrap_or(100.0);
    if !(0.0..=100.0).contains(&v) {
        e.push(field, format!("{v} is not a percentage (0-100)"));
    }
    v
}

fn fault(f: &net::HttpFaultInjection, e: &mut RuleErrors<'_>) -> Option<Fault> {
    let delay = f.delay.as_ref().and_then(|d| {
        let Some(fixed) = &d.fixed_delay else {
            e.push(".fault.delay.fixedDelay", "a delay needs fixedDelay (exponentialDelay is not supported)");
            return None;
        };
        let pct = percent(d.percentage.as_ref(), d.percent, ".fault.delay.percentage.value", e);
        duration_field(fixed, ".fault.delay.fixedDelay", e).map(|d| (d, pct))
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let pct = percent(a.percentage.as_ref(), None, ".fault.abort.percentage.value", e);
        match (a.http_status, &a.grpc_status) {
            (Some(s), None) => match u16::try_from(s)
                .ok()
                .filter(|s| (200..=599).contains(s))
                .and_then(|s| StatusCode::from_u16(s).ok())
            {
                Some(code) => Some((code, pct)),
                None => {
                    e.push(".fault.abort.httpStatus", format!("{s} is not an HTTP status (200-599)"));
                    None
                }
            },
            (None, Some(_)) => {
                e.push(".fault.abort.grpcStatus", "gRPC aborts are not supported yet; use httpStatus");
                None
            }
            _ => {
                e.push(".fault.abort", "set exactly one of httpStatus and grpcStatus");
                None
            }
        }
    });
    (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
}

fn mirrors(ctx: &Ctx<'_>, ns: &str, rule: &HttpRoute, e: &mut RuleErrors<'_>) -> Vec<Mirror> {
    let mut out = Vec::new();
    if let Some(d) = &rule.mirror {
        let pct = percent(rule.mirror_percentage.as_ref(), rule.mirror_percent, ".mirrorPercentage.value", e);
        if let Some(dest) = destination(ctx, ns, d, ".mirror", e) {
            out.push(Mirror { dest, percent: pct });
        }
    }
    for (k, m) in rule.mirrors.iter().enumerate() {
        let pct = percent(m.percentage.as_ref(), None, &format!(".mirrors[{k}].percentage.value"), e);
        if let Some(dest) = destination(ctx, ns, &m.destination, &format!(".mirrors[{k}].destination"), e) {
            out.push(Mirror { dest, percent: pct });
        }
    }
    out
}

fn cors(c: &net::CorsPolicy, e: &mut RuleErrors<'_>) -> Option<Cors> {
    let mut allow_origins: Vec<StringMatcher> =
        c.allow_origin.iter().map(|o| StringMatcher::Exact(o.clone())).collect();
    for (k, o) in c.allow_origins.iter().enumerate() {
        if let Some(m) = string_matcher(o, &format!(".corsPolicy.allowOrigins[{k}]"), e) {
            allow_origins.push(m);
        }
    }
    let max_age = c.max_age.as_deref().and_then(|t| duration_field(t, ".corsPolicy.maxAge", e));
    let forward_unmatched_preflights = match c.unmatched_preflights.as_deref() {
        None | Some("FORWARD") | Some("UNSPECIFIED") => true,
        Some("IGNORE") => false,
        Some(other) => {
            e.push(".corsPolicy.unmatchedPreflights", format!("{other:?} is not FORWARD or IGNORE"));
            true
        }
    };
    Some(Cors {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age,
        allow_credentials: c.allow_credentials.unwrap_or(false),
        forward_unmatched_preflights,
    })
}

/// `rewrite` for one match: Istio's `uri` swaps the matched prefix (a whole exact/regex match, or
/// the `/` every rule without a URI match has); `uriRegexRewrite` substitutes in the path.
fn rewrite(rule: &HttpRoute, uri: Option<&StringMatch>, e: &mut RuleErrors<'_>) -> Option<Rewrite> {
    let r = rule.rewrite.as_ref()?;
    let path = match (&r.uri, &r.uri_regex_rewrite) {
        (Some(_), Some(_)) => {
            e.push(".rewrite", "set only one of uri and uriRegexRewrite");
            None
        }
        (Some(replacement), None) => Some(match uri {
            Some(StringMatch { prefix: Some(p), exact: None, regex: None }) => {
                PathRewrite::Prefix { prefix: p.clone(), replacement: replacement.clone() }
            }
            Some(StringMatch { exact: Some(_), .. }) | Some(StringMatch { regex: Some(_), .. }) => {
                PathRewrite::Full(replacement.clone())
            }
            _ => PathRewrite::Prefix { prefix: "/".to_owned(), replacement: replacement.clone() },
        }),
        (None, Some(rr)) => match regex::Regex::new(&rr.r#match) {
            Ok(pattern) => Some(PathRewrite::Regex { pattern, substitution: envoy_substitution(&rr.rewrite) }),
            Err(err) => {
                e.push(
                    ".rewrite.uriRegexRewrite.match",
                    format!("invalid RE2 regular expression {:?}: {err}", rr.r#match),
                );
                None
            }
        },
        (None, None) => None,
    };
    Some(Rewrite { path, authority: r.authority.clone() })
}
