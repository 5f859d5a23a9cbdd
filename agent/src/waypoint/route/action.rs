//! What a matched route does to a request, compiled: header operations, URI/authority rewrites,
//! redirects, retry policy, fault injection, mirrors and CORS, with the behaviour Envoy gives them
//! under Istio's configuration.
//!
//! Owns the per-request behaviour of these pieces (pure functions of the request; no I/O, no
//! randomness: callers roll dice and sleep). Does not own compiling CRD fields into them
//! (`istio`, `gateway`) or the order in which the handler applies them (`waypoint::handler`).

use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri};
use regex::Regex;

use super::Destination;
use super::matcher::{StringMatcher, segment_prefix_len, split_path};
use crate::waypoint::Outcome;

/// Header edits of one level (route, or one weighted destination). Applied as Envoy does:
/// removals first, then `set` (replaces every value), then `add` (appends another value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Builds the operations from configured strings; `Err` names the bad entry (`set.x-foo`) and why.
    pub(crate) fn build<'a>(
        set: impl IntoIterator<Item = (&'a str, &'a str)>,
        add: impl IntoIterator<Item = (&'a str, &'a str)>,
        remove: impl IntoIterator<Item = &'a str>,
    ) -> Result<HeaderOps, (String, String)> {
        let pair = |op: &str, k: &str, v: &str| -> Result<(HeaderName, HeaderValue), (String, String)> {
            let name = header_name(k).map_err(|r| (format!("{op}.{k}"), r))?;
            let value = HeaderValue::from_str(v).map_err(|_| {
                (format!("{op}.{k}"), format!("{v:?} is not a valid header value (visible ASCII only)"))
            })?;
            Ok((name, value))
        };
        let mut ops = HeaderOps::default();
        for (k, v) in set {
            ops.set.push(pair("set", k, v)?);
        }
        for (k, v) in add {
            ops.add.push(pair("add", k, v)?);
        }
        for k in remove {
            ops.remove.push(header_name(k).map_err(|r| (format!("remove.{k}"), r))?);
        }
        Ok(ops)
    }
}

fn header_name(k: &str) -> Result<HeaderName, String> {
    if k.starts_with(':') {
        return Err(format!("pseudo header {k:?} cannot be changed; use rewrite (uri/authority) instead"));
    }
    HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("{k:?} is not a valid header name"))
}

/// How a path is replaced (rewrite or redirect).
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// Replace the whole path; the query string is kept unless the replacement has its own.
    Full(String),
    /// Istio `rewrite.uri` after a `uri.prefix` match (Envoy `prefix_rewrite`): the matched prefix is
    /// swapped for the replacement (by length, so it also works after an `ignoreUriCase` match).
    Prefix { prefix: String, replacement: String },
    /// Gateway API `ReplacePrefixMatch` after a `PathPrefix` match: whole path elements, no doubled
    /// or missing `/` at the seam.
    SegmentPrefix { prefix: String, replacement: String },
    /// Istio `uriRegexRewrite`: every match of `pattern` in the path is replaced (`\1` groups).
    Regex { pattern: Regex, substitution: String },
}

impl PathRewrite {
    /// The new path-and-query for `path_and_query`.
    pub fn rewrite(&self, path_and_query: &str) -> String {
        let (path, query) = split_path(path_and_query);
        let with_query = |p: String| match query {
            Some(q) if !p.contains('?') => format!("{p}?{q}"),
            _ => p,
        };
        match self {
            PathRewrite::Full(p) => with_query(p.clone()),
            PathRewrite::Prefix { prefix, replacement } => {
                let n = prefix.len().min(path_and_query.len());
                format!("{replacement}{}", &path_and_query[n..])
            }
            PathRewrite::SegmentPrefix { prefix, replacement } => {
                let Some(n) = segment_prefix_len(prefix, path) else { return path_and_query.to_owned() };
                let rest = &path[n..];
                let mut out = format!("{}{rest}", replacement.trim_end_matches('/'));
                if out.is_empty() {
                    out.push('/');
                } else if !out.starts_with('/') {
                    out.insert(0, '/');
                }
                with_query(out)
            }
            PathRewrite::Regex { pattern, substitution } => {
                with_query(pattern.replace_all(path, substitution.as_str()).into_owned())
            }
        }
    }
}

/// Converts Envoy's `\1` substitution syntax to the `regex` crate's `${1}`, keeping `$` literal.
pub(crate) fn envoy_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

/// Istio `rewrite` / Gateway API `URLRewrite`.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    pub path: Option<PathRewrite>,
    /// New `:authority` / `Host`.
    pub authority: Option<String>,
}

impl Rewrite {
    pub fn apply(&self, parts: &mut http::request::Parts) {
        if let Some(authority) = &self.authority
            && let Ok(v) = HeaderValue::from_str(authority)
        {
            parts.headers.insert(http::header::HOST, v);
        }
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
        let new_pq = self.path.as_ref().map(|p| p.rewrite(&pq)).unwrap_or(pq);
        let mut b = Uri::builder();
        if let Some(s) = parts.uri.scheme() {
            b = b.scheme(s.clone());
        }
        match (&self.authority, parts.uri.authority()) {
            (Some(a), Some(_)) => b = b.authority(a.as_str()),
            (None, Some(a)) => b = b.authority(a.clone()),
            _ => {}
        }
        match b.path_and_query(new_pq.as_str()).build() {
            Ok(uri) => parts.uri = uri,
            Err(e) => tracing::warn!(path = %new_pq, error = %e, "rewritten URI is invalid; request left unchanged"),
        }
    }
}

/// Which port a redirect's `Location` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedirectPort {
    /// The request's (or the new authority's) port, dropped when it is the scheme's default.
    #[default]
    Keep,
    Set(u16),
    /// The request's port (from its `Host`), even when the host is replaced (Istio `FROM_REQUEST_PORT`,
    /// Gateway API without scheme and port: "the listener port").
    FromRequest,
    /// The default port of the (new) scheme, i.e. none in the `Location` (Istio `FROM_PROTOCOL_DEFAULT`,
    /// Gateway API with a scheme and no port).
    SchemeDefault,
}

/// Istio `redirect` / Gateway API `RequestRedirect`.
#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    /// New host (Istio `authority` may carry a port).
    pub host: Option<String>,
    pub port: RedirectPort,
    pub path: Option<PathRewrite>,
    /// 301 by default for Istio, 302 for Gateway API.
    pub status: StatusCode,
}

impl Redirect {
    pub fn response(&self, parts: &http::request::Parts) -> http::Response<()> {
        let req_scheme = parts.uri.scheme_str().unwrap_or("http");
        let scheme = self.scheme.as_deref().unwrap_or(req_scheme);
        let req_authority = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        let (host, mut port) = split_host_port(self.host.as_deref().unwrap_or(req_authority));
        match self.port {
            RedirectPort::Keep => {
                // A scheme change with the old scheme's default port means "the new scheme's default".
                if self.scheme.is_some() && port.is_some() && port == default_port(req_scheme) {
                    port = None;
                }
            }
            RedirectPort::Set(p) => port = Some(p),
            RedirectPort::FromRequest => port = split_host_port(req_authority).1,
            RedirectPort::SchemeDefault => port = None,
        }
        if port.is_some() && port == default_port(scheme) {
            port = None;
        }
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let pq = self.path.as_ref().map(|p| p.rewrite(pq)).unwrap_or_else(|| pq.to_owned());
        let location = match port {
            Some(p) => format!("{scheme}://{host}:{p}{pq}"),
            None => format!("{scheme}://{host}{pq}"),
        };
        let mut resp = http::Response::new(());
        *resp.status_mut() = self.status;
        match HeaderValue::from_str(&location) {
            Ok(v) => {
                resp.headers_mut().insert(http::header::LOCATION, v);
            }
            Err(_) => tracing::warn!(%location, "redirect Location is not a valid header value; sent without it"),
        }
        resp
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// `host[:port]`, IPv6 literals in brackets.
pub(crate) fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some((h, p)) = authority.rsplit_once(':')
        && !p.is_empty()
        && p.bytes().all(|b| b.is_ascii_digit())
        && (!h.contains(':') || h.ends_with(']'))
    {
        return (h, p.parse().ok());
    }
    (authority, None)
}

/// Istio `retries.retryOn` (Envoy `x-envoy-retry-on` conditions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx, or no response at all (connect failure, reset, per-try timeout).
    pub five_xx: bool,
    /// 502, 503, 504, or no response at all.
    pub gateway_error: bool,
    /// No response: reset, connect failure or per-try timeout.
    pub reset: bool,
    pub connect_failure: bool,
    /// 409.
    pub retriable_4xx: bool,
    /// HTTP/2 REFUSED_STREAM; `Outcome` does not tell it apart from other resets, so this alone never
    /// retries (kept so the configuration round-trips).
    pub refused_stream: bool,
    /// The listed statuses, when `retriable-status-codes` is on.
    pub retriable_status_codes: Vec<StatusCode>,
    /// gRPC statuses (`cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`)
    /// as their numeric codes, checked with `should_retry_grpc`.
    pub grpc: Vec<u32>,
}

impl RetryOn {
    /// Parses Istio's comma-separated `retryOn`; plain numbers are retriable status codes (and turn
    /// `retriable-status-codes` on, as Istio does).
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        let mut status_codes_on = false;
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match token {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" | "reset-before-request" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-status-codes" => status_codes_on = true,
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                // Envoy conditions that depend on things this proxy does not produce; accepted, no effect.
                "retriable-headers" | "envoy-ratelimited" | "http3-post-connect-failure" => {}
                t => match t.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
                    Some(code) if t.len() == 3 => {
                        status_codes_on = true;
                        on.retriable_status_codes.push(code);
                    }
                    _ => {
                        return Err(format!(
                            "{t:?} is not a retry condition; use 5xx, gateway-error, reset, connect-failure, \
                             retriable-4xx, refused-stream, retriable-status-codes, a gRPC status name or an HTTP status"
                        ));
                    }
                },
            }
        }
        if !status_codes_on {
            on.retriable_status_codes.clear();
        }
        Ok(on)
    }

    pub fn should_retry(&self, outcome: &Outcome) -> bool {
        let no_response = self.five_xx || self.gateway_error || self.reset;
        match outcome {
            Outcome::ConnectFailure => no_response || self.connect_failure,
            Outcome::Reset => no_response,
            // Envoy treats a per-try timeout as a 504 for retry decisions.
            Outcome::Timeout => no_response || self.retriable_status_codes.contains(&StatusCode::GATEWAY_TIMEOUT),
            Outcome::Status(s) => {
                let code = s.as_u16();
                (self.five_xx && code >= 500)
                    || (self.gateway_error && matches!(code, 502..=504))
                    || (self.retriable_4xx && code == 409)
                    || self.retriable_status_codes.contains(s)
            }
        }
    }

    /// Whether a gRPC response with `grpc-status: code` is retried.
    pub fn should_retry_grpc(&self, code: u32) -> bool {
        self.grpc.contains(&code)
    }
}

/// Retries of one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try (0: no retries).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

/// Istio's `retryOn` when a route sets none.
pub const ISTIO_DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

impl RetryPolicy {
    /// What Istio configures when a route has no `retries`: 2 retries on connect failure, refused
    /// stream, gRPC unavailable/cancelled and 503.
    pub fn istio_default() -> RetryPolicy {
        let mut on = RetryOn::parse(ISTIO_DEFAULT_RETRY_ON).expect("the default retryOn parses");
        on.retriable_status_codes = vec![StatusCode::SERVICE_UNAVAILABLE];
        RetryPolicy { attempts: 2, per_try_timeout: None, on }
    }

    pub fn disabled() -> RetryPolicy {
        RetryPolicy { attempts: 0, per_try_timeout: None, on: RetryOn::default() }
    }
}

/// Istio `fault`: each part applies to `percent` of requests (0..=100).
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(StatusCode, f64)>,
}

/// A copy of each request (fire-and-forget) to `dest`, for `percent` of requests.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub dest: Destination,
    pub percent: f64,
}

/// Istio `corsPolicy`, as Envoy's CORS filter applies it.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    /// `Exact("*")` allows every origin.
    pub allow_origins: Vec<StringMatcher>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: bool,
    /// `unmatchedPreflights: FORWARD` (the default): a preflight from an origin that is not allowed
    /// goes upstream; `IGNORE` answers it here without CORS headers.
    pub forward_unmatched_preflights: bool,
}

impl Cors {
    fn allows(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|m| matches!(m, StringMatcher::Exact(e) if e == "*") || m.matches(origin))
    }

    /// The answer to a CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`),
    /// or `None` when the request is not one or must go upstream.
    pub fn preflight(&self, parts: &http::request::Parts) -> Option<http::Response<()>> {
        use http::header::*;
        if parts.method != Method::OPTIONS || !parts.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD) {
            return None;
        }
        let origin = parts.headers.get(ORIGIN)?;
        let mut resp = http::Response::new(());
        if !self.allows(origin.to_str().unwrap_or("")) {
            return (!self.forward_unmatched_preflights).then_some(resp);
        }
        let h = resp.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.allow_credentials {
            h.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        let list = |v: &[String]| HeaderValue::from_str(&v.join(",")).ok().filter(|_| !v.is_empty());
        if let Some(v) = list(&self.allow_methods) {
            h.insert(ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        if let Some(v) = list(&self.allow_headers) {
            h.insert(ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if let Some(age) = self.max_age {
            h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(age.as_secs()));
        }
        Some(resp)
    }

    /// CORS headers on the response to an actual (non-preflight) request.
    pub fn apply(&self, request_origin: Option<&HeaderValue>, response: &mut HeaderMap) {
        use http::header::*;
        let Some(origin) = request_origin else { return };
        if !self.allows(origin.to_str().unwrap_or("")) {
            return;
        }
        response.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.allow_credentials {
            response.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if !self.expose_headers.is_empty()
            && let Ok(v) = HeaderValue::from_str(&self.expose_headers.join(","))
        {
            response.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_parsing_and_decisions() {
        let on = RetryOn::parse("5xx").unwrap();
        assert!(on.should_retry(&Outcome::Status(StatusCode::BAD_GATEWAY)));
        assert!(on.should_retry(&Outcome::Reset));
        assert!(on.should_retry(&Outcome::Timeout));
        assert!(!on.should_retry(&Outcome::Status(StatusCode::NOT_FOUND)));
        let on = RetryOn::parse("gateway-error").unwrap();
        assert!(on.should_retry(&Outcome::Status(StatusCode::SERVICE_UNAVAILABLE)));
        assert!(!on.should_retry(&Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR)));
        let on = RetryOn::parse("connect-failure").unwrap();
        assert!(on.should_retry(&Outcome::ConnectFailure));
        assert!(!on.should_retry(&Outcome::Reset));
        assert!(!on.should_retry(&Outcome::Status(StatusCode::SERVICE_UNAVAILABLE)));
        let on = RetryOn::parse("reset").unwrap();
        assert!(on.should_retry(&Outcome::Reset) && on.should_retry(&Outcome::ConnectFailure));
        assert!(!on.should_retry(&Outcome::Status(StatusCode::BAD_GATEWAY)));
        let on = RetryOn::parse("retriable-4xx").unwrap();
        assert!(on.should_retry(&Outcome::Status(StatusCode::CONFLICT)));
        assert!(!on.should_retry(&Outcome::Status(StatusCode::BAD_REQUEST)));
        let on = RetryOn::parse("retriable-status-codes,418, 500").unwrap();
        assert_eq!(on.retriable_status_codes, vec![StatusCode::IM_A_TEAPOT, StatusCode::INTERNAL_SERVER_ERROR]);
        assert!(on.should_retry(&Outcome::Status(StatusCode::IM_A_TEAPOT)));
        assert!(!on.should_retry(&Outcome::Status(StatusCode::BAD_GATEWAY)));
        // Plain numbers alone turn retriable-status-codes on.
        assert!(RetryOn::parse("503").unwrap().should_retry(&Outcome::Status(StatusCode::SERVICE_UNAVAILABLE)));
        // The keyword without numbers retries nothing by status.
        assert!(RetryOn::parse("retriable-status-codes").unwrap().retriable_status_codes.is_empty());
        assert!(RetryOn::parse("unavailable,cancelled").unwrap().should_retry_grpc(14));
        let err = RetryOn::parse("5xx,bogus").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        assert!(RetryOn::parse("99").is_err() && RetryOn::parse("1000").is_err());
    }

    #[test]
    fn istio_default_retries() {
        let d = RetryPolicy::istio_default();
        assert_eq!(d.attempts, 2);
        assert!(d.on.should_retry(&Outcome::ConnectFailure));
        assert!(d.on.should_retry(&Outcome::Status(StatusCode::SERVICE_UNAVAILABLE)));
        assert!(!d.on.should_retry(&Outcome::Status(StatusCode::BAD_GATEWAY)));
        assert!(!d.on.should_retry(&Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR)));
        assert!(!d.on.should_retry(&Outcome::Reset));
        assert!(d.on.should_retry_grpc(14) && d.on.should_retry_grpc(1) && !d.on.should_retry_grpc(13));
    }

    #[test]
    fn header_ops_order() {
        let ops = HeaderOps::build([("x-a", "set")], [("x-a", "added"), ("x-b", "b")], ["x-c", "x-a"]).unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("old"));
        h.insert("x-c", HeaderValue::from_static("gone"));
        ops.apply(&mut h);
        let a: Vec<_> = h.get_all("x-a").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(a, ["set", "added"]);
        assert_eq!(h.get("x-b").unwrap(), "b");
        assert!(h.get("x-c").is_none());
        assert_eq!(HeaderOps::build([(":path", "x")], [], []).unwrap_err().0, "set.:path");
        assert_eq!(HeaderOps::build([], [("x", "bad\nvalue")], []).unwrap_err().0, "add.x");
    }

    #[test]
    fn path_rewrites() {
        let p = PathRewrite::Prefix { prefix: "/api/v1".into(), replacement: "/v2".into() };
        assert_eq!(p.rewrite("/api/v1/users?x=1"), "/v2/users?x=1");
        let p = PathRewrite::Prefix { prefix: "/".into(), replacement: "/v2/".into() };
        assert_eq!(p.rewrite("/foo"), "/v2/foo");
        let p = PathRewrite::Full("/new".into());
        assert_eq!(p.rewrite("/old/x?q=1"), "/new?q=1");
        let p = PathRewrite::Full("/new?a=b".into());
        assert_eq!(p.rewrite("/old/x?q=1"), "/new?a=b");
        let seg = |prefix: &str, replacement: &str, path: &str| {
            PathRewrite::SegmentPrefix { prefix: prefix.into(), replacement: replacement.into() }.rewrite(path)
        };
        // The Gateway API table for ReplacePrefixMatch.
        assert_eq!(seg("/foo", "/xyz", "/foo/bar"), "/xyz/bar");
        assert_eq!(seg("/foo", "/xyz/", "/foo/bar"), "/xyz/bar");
        assert_eq!(seg("/foo/", "/xyz", "/foo/bar"), "/xyz/bar");
        assert_eq!(seg("/foo", "/xyz", "/foo"), "/xyz");
        assert_eq!(seg("/foo", "/xyz", "/foo/"), "/xyz/");
        assert_eq!(seg("/foo", "/", "/foo/bar"), "/bar");
        assert_eq!(seg("/foo", "/", "/foo"), "/");
        assert_eq!(seg("/", "/xyz", "/foo"), "/xyz/foo");
        let re = PathRewrite::Regex {
            pattern: Regex::new("^/service/([^/]+)(/.*)$").unwrap(),
            substitution: envoy_substitution(r"\2/instance/\1"),
        };
        assert_eq!(re.rewrite("/service/foo/v1/api?x"), "/v1/api/instance/foo?x");
        assert_eq!(envoy_substitution(r"a$b\1"), "a$$b${1}");
    }

    fn parts(uri: &str, host: &str) -> http::request::Parts {
        let (p, ()) = http::Request::builder().uri(uri).header("host", host).body(()).unwrap().into_parts();
        p
    }

    #[test]
    fn redirects() {
        let r = Redirect {
            scheme: None,
            host: None,
            port: RedirectPort::Keep,
            path: None,
            status: StatusCode::MOVED_PERMANENTLY,
        };
        let resp = r.response(&parts("/a?b=1", "reviews:9080"));
        assert_eq!(resp.status(), 301);
        assert_eq!(resp.headers()["location"], "http://reviews:9080/a?b=1");
        let r = Redirect { scheme: Some("https".into()), port: RedirectPort::SchemeDefault, ..r };
        assert_eq!(r.response(&parts("/a", "reviews:9080")).headers()["location"], "https://reviews/a");
        let r = Redirect { port: RedirectPort::Set(8443), host: Some("new.example".into()), ..r };
        assert_eq!(r.response(&parts("/a", "reviews")).headers()["location"], "https://new.example:8443/a");
        let r = Redirect { port: RedirectPort::Keep, host: None, ..r };
        assert_eq!(r.response(&parts("/a", "reviews:80")).headers()["location"], "https://reviews/a");
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
    }

    #[test]
    fn cors() {
        let c = Cors {
            allow_origins: vec![StringMatcher::Exact("https://a.example".into())],
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["x-a".into()],
            expose_headers: vec!["x-e".into()],
            max_age: Some(Duration::from_secs(60)),
            allow_credentials: true,
            forward_unmatched_preflights: true,
        };
        let pre = |origin: &str| {
            let (p, ()) = http::Request::builder()
                .method("OPTIONS")
                .uri("/")
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .body(())
                .unwrap()
                .into_parts();
            p
        };
        let resp = c.preflight(&pre("https://a.example")).expect("allowed preflight answered here");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["access-control-allow-origin"], "https://a.example");
        assert_eq!(resp.headers()["access-control-allow-methods"], "GET,POST");
        assert_eq!(resp.headers()["access-control-max-age"], "60");
        assert!(c.preflight(&pre("https://b.example")).is_none());
        let ignore = Cors { forward_unmatched_preflights: false, ..c.clone() };
        let resp = ignore.preflight(&pre("https://b.example")).unwrap();
        assert!(resp.headers().get("access-control-allow-origin").is_none());
        let mut h = HeaderMap::new();
        c.apply(Some(&HeaderValue::from_static("https://a.example")), &mut h);
        assert_eq!(h["access-control-expose-headers"], "x-e");
        assert_eq!(h["access-control-allow-credentials"], "true");
        let mut h = HeaderMap::new();
        c.apply(Some(&HeaderValue::from_static("https://evil.example")), &mut h);
        assert!(h.is_empty());
    }
}
