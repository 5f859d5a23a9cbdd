//! Request matching: compiled string matchers (exact, prefix, RE2 regex, presence) and one compiled
//! match block (`RequestMatch`, one VirtualService `match` entry or one HTTPRoute `matches` entry).
//!
//! Owns the matching semantics only (Envoy's, as Istio configures it): regexes match the whole
//! value (`safe_regex` is a full match), `ignoreUriCase` affects exact and prefix URI matches but not
//! regexes, several header values are joined with `,` before matching, `withoutHeaders` also matches
//! an absent header. Does not own turning CRD fields into matchers (`istio`, `gateway`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use regex::Regex;

use super::RequestInfo;

/// Compiles `pattern` the way Envoy's `safe_regex` uses it: RE2 syntax, matching the whole input.
pub(crate) fn full_regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid RE2 regular expression {pattern:?}: {e}"))
}

/// One string condition.
#[derive(Debug, Clone)]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    /// Compiled with `full_regex`: must match the whole value.
    Regex(Regex),
    /// Any value, as long as the header (or parameter) is there.
    Present,
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        self.matches_case(value, false)
    }

    /// `ignore_case` folds ASCII case for exact and prefix matches; a regex is left as written, as
    /// in Envoy (`case_sensitive` is ignored for `safe_regex`).
    pub fn matches_case(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            StringMatcher::Exact(e) if ignore_case => value.eq_ignore_ascii_case(e),
            StringMatcher::Exact(e) => value == e,
            StringMatcher::Prefix(p) if ignore_case => {
                value.len() >= p.len() && value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StringMatcher::Prefix(p) => value.starts_with(p.as_str()),
            StringMatcher::Regex(r) => r.is_match(value),
            StringMatcher::Present => true,
        }
    }
}

/// How the request path is matched.
#[derive(Debug, Clone)]
pub enum PathMatcher {
    /// The path without the query string equals this.
    Exact(String),
    /// Plain string prefix of the path (Istio `uri.prefix`, as Envoy's `prefix`).
    Prefix(String),
    /// Gateway API `PathPrefix`: whole path elements, so `/foo` matches `/foo`, `/foo/` and `/foo/bar`
    /// but not `/foobar`; a trailing `/` in the prefix is ignored.
    SegmentPrefix(String),
    /// Full match of the path without the query string.
    Regex(Regex),
}

impl PathMatcher {
    fn matches(&self, path: &str, ignore_case: bool) -> bool {
        match self {
            PathMatcher::Exact(e) if ignore_case => path.eq_ignore_ascii_case(e),
            PathMatcher::Exact(e) => path == e,
            PathMatcher::Prefix(p) => {
                p.len() <= path.len()
                    && if ignore_case {
                        path.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
                    } else {
                        path.starts_with(p.as_str())
                    }
            }
            PathMatcher::SegmentPrefix(p) => segment_prefix_len(p, path).is_some(),
            PathMatcher::Regex(r) => r.is_match(path),
        }
    }
}

/// Length of `path` covered by the Gateway API `PathPrefix` `prefix`, when it matches.
pub(crate) fn segment_prefix_len(prefix: &str, path: &str) -> Option<usize> {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return Some(0);
    }
    if !path.starts_with(p) {
        return None;
    }
    match path.as_bytes().get(p.len()) {
        None | Some(b'/') => Some(p.len()),
        Some(_) => None,
    }
}

/// One header condition (`headers` or, with `invert`, `withoutHeaders`).
#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    /// Lower-case header name; `:authority`, `:method`, `:scheme` and `:path` address the pseudo headers.
    pub name: String,
    pub matcher: StringMatcher,
    /// `withoutHeaders`: matches when the header is absent or does not match.
    pub invert: bool,
}

/// One query parameter condition; the first occurrence of the parameter is compared, undecoded.
#[derive(Debug, Clone)]
pub struct QueryMatcher {
    pub name: String,
    pub matcher: StringMatcher,
}

/// Every field is a condition; all present ones must hold (an empty match matches everything).
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    pub path: Option<PathMatcher>,
    pub ignore_uri_case: bool,
    pub method: Option<StringMatcher>,
    pub scheme: Option<StringMatcher>,
    pub authority: Option<StringMatcher>,
    pub headers: Vec<HeaderMatcher>,
    pub query: Vec<QueryMatcher>,
    /// The service port the client dialled.
    pub port: Option<u16>,
    pub source_namespace: Option<String>,
    /// All of these labels must be on the source workload.
    pub source_labels: BTreeMap<String, String>,
}

impl RequestMatch {
    pub fn matches(&self, req: &RequestInfo<'_>) -> bool {
        let (path, query) = split_path(req.path_and_query);
        if let Some(p) = &self.path {
            // Envoy compares a plain prefix with the whole `:path` (query included), exact and regex
            // matches with the path alone.
            let subject = if matches!(p, PathMatcher::Prefix(_)) { req.path_and_query } else { path };
            if !p.matches(subject, self.ignore_uri_case) {
                return false;
            }
        }
        if self.port.is_some_and(|p| p != req.port) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| !m.matches(req.method.as_str())) {
            return false;
        }
        if self.scheme.as_ref().is_some_and(|m| !m.matches(req.scheme)) {
            return false;
        }
        if self.authority.as_ref().is_some_and(|m| !m.matches(req.authority)) {
            return false;
        }
        if let Some(ns) = &self.source_namespace
            && req.source_namespace != Some(ns.as_str())
        {
            return false;
        }
        if !self.source_labels.is_empty() {
            let Some(labels) = req.source_labels else { return false };
            if !self.source_labels.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                return false;
            }
        }
        self.headers.iter().all(|h| header_matches(h, req))
            && self.query.iter().all(|q| query_value(query, &q.name).is_some_and(|v| q.matcher.matches(v)))
    }
}

fn header_matches(h: &HeaderMatcher, req: &RequestInfo<'_>) -> bool {
    let value: Option<Cow<'_, str>> = match h.name.as_str() {
        ":authority" | "host" => Some(Cow::Borrowed(req.authority)),
        ":method" => Some(Cow::Borrowed(req.method.as_str())),
        ":scheme" => Some(Cow::Borrowed(req.scheme)),
        ":path" => Some(Cow::Borrowed(req.path_and_query)),
        name => {
            let mut values = req.headers.get_all(name).iter();
            match (values.next(), values.next()) {
                (None, _) => None,
                (Some(v), None) => Some(lossy(v)),
                // Envoy joins repeated headers with "," before matching.
                (Some(first), Some(second)) => {
                    let mut joined = format!("{},{}", lossy(first), lossy(second));
                    for v in values {
                        joined.push(',');
                        joined.push_str(&lossy(v));
                    }
                    Some(Cow::Owned(joined))
                }
            }
        }
    };
    let hit = value.is_some_and(|v| h.matcher.matches(&v));
    hit != h.invert
}

/// A value that is not visible ASCII cannot equal a configured string; keep it lossy so presence and
/// regexes still see it.
fn lossy(v: &http::HeaderValue) -> Cow<'_, str> {
    match v.to_str() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(v.as_bytes()),
    }
}

/// `(path, query)` of a request target; the query excludes the `?`.
pub(crate) fn split_path(path_and_query: &str) -> (&str, Option<&str>) {
    match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    }
}

/// The first value of query parameter `name` (`?a` has the value ``).
pub(crate) fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_is_a_full_match() {
        let r = StringMatcher::Regex(full_regex(".*Safari.*").unwrap());
        assert!(r.matches("Mozilla/5.0 Safari/605"));
        assert!(!r.matches("Mozilla/5.0 Chrome"));
        let r = StringMatcher::Regex(full_regex("v[12]").unwrap());
        assert!(r.matches("v1"));
        assert!(!r.matches("v12"), "partial matches must not count");
        assert!(!r.matches("xv1"));
        assert!(full_regex("(unclosed").is_err());
        // RE2 has no backreferences; neither has `regex`.
        assert!(full_regex(r"(a)\1").is_err());
    }

    #[test]
    fn ignore_case_affects_exact_and_prefix_only() {
        assert!(StringMatcher::Exact("/Foo".into()).matches_case("/fOO", true));
        assert!(!StringMatcher::Exact("/Foo".into()).matches_case("/fOO", false));
        assert!(StringMatcher::Prefix("/API".into()).matches_case("/api/x", true));
        assert!(!StringMatcher::Prefix("/API/x".into()).matches_case("/api", true));
    }

    #[test]
    fn segment_prefix() {
        assert_eq!(segment_prefix_len("/foo", "/foo"), Some(4));
        assert_eq!(segment_prefix_len("/foo/", "/foo/bar"), Some(4));
        assert_eq!(segment_prefix_len("/foo", "/foobar"), None);
        assert_eq!(segment_prefix_len("/", "/anything"), Some(0));
    }

    #[test]
    fn query_values() {
        assert_eq!(query_value(Some("a=1&b=2&a=3"), "a"), Some("1"));
        assert_eq!(query_value(Some("flag&b=2"), "flag"), Some(""));
        assert_eq!(query_value(Some("b=2"), "a"), None);
        assert_eq!(query_value(None, "a"), None);
    }
}
