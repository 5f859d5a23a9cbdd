//! EnvoyFilter JSON → local rate limit settings: the `envoy.filters.http.local_ratelimit` filter
//! (`LocalRateLimit` proto, as a `TypedStruct` or typed directly), field names in snake_case or
//! lowerCamelCase as Envoy's JSON accepts them. Errors are `(field path, reason)`.

use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::Value;

pub(super) const FILTER_NAME: &str = "envoy.filters.http.local_ratelimit";
const LOCAL_RATE_LIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const TYPED_STRUCT_TYPES: [&str; 2] =
    ["type.googleapis.com/udpa.type.v1.TypedStruct", "type.googleapis.com/xds.type.v3.TypedStruct"];
/// Envoy refuses shorter fill intervals.
const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

pub(super) type FieldError = (String, String);

/// One `LocalRateLimit` as Envoy would run it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Settings {
    /// `None`: the filter is configured without a bucket (the usual way to enable it for per-route
    /// buckets only): nothing is limited at this level.
    pub bucket: Option<BucketSpec>,
    /// Fraction (0..=1) of requests the filter looks at; Envoy's default when unset is 0.
    pub enabled: f64,
    /// Fraction of limited requests that are actually refused (the rest only get
    /// `request_headers_to_add_when_not_enforced`); default 0.
    pub enforced: f64,
    pub status: StatusCode,
    pub response_headers: Vec<HeaderOp>,
    pub request_headers_when_not_enforced: Vec<HeaderOp>,
    /// `enable_x_ratelimit_headers: DRAFT_VERSION_03`.
    pub x_ratelimit_headers: bool,
    /// `rate_limited_as_resource_exhausted`: gRPC status 8 instead of 14 on a limited gRPC call.
    pub grpc_resource_exhausted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BucketSpec {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HeaderOp {
    pub name: HeaderName,
    pub value: HeaderValue,
    /// Envoy's `append` / `append_action: APPEND_IF_EXISTS_OR_ADD`; otherwise overwrite.
    pub append: bool,
}

impl HeaderOp {
    pub fn apply(&self, h: &mut http::HeaderMap) {
        if self.append {
            h.append(self.name.clone(), self.value.clone());
        } else {
            h.insert(self.name.clone(), self.value.clone());
        }
    }
}

/// `obj[snake]` or `obj[camel]`.
fn get<'a>(obj: &'a Value, snake: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(snake) {
        return Some(v);
    }
    let mut camel = String::new();
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            camel.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            camel.push(c);
        }
    }
    obj.get(camel.as_str())
}

/// Proto JSON writes 32-bit integers as numbers or strings; wrappers (`UInt32Value`) as the bare
/// number or `{value: n}`.
fn uint(v: &Value, path: &str) -> Result<u32, FieldError> {
    let v = v.get("value").unwrap_or(v);
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    n.and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| (path.to_owned(), format!("{v} is not a non-negative 32-bit integer")))
}

/// `RuntimeFractionalPercent {runtime_key, default_value: {numerator, denominator}}`. The runtime
/// key is ignored (no Envoy runtime here); the default value is what applies.
fn fraction(v: &Value, path: &str) -> Result<f64, FieldError> {
    let Some(dv) = get(v, "default_value") else {
        // Envoy treats a missing default_value as 0%.
        return Ok(0.0);
    };
    let numerator = match get(dv, "numerator") {
        Some(n) => uint(n, &format!("{path}.default_value.numerator"))?,
        None => 0,
    };
    let denominator = match get(dv, "denominator").map(|d| d.as_str()) {
        None | Some(Some("HUNDRED")) => 100.0,
        Some(Some("TEN_THOUSAND")) => 10_000.0,
        Some(Some("MILLION")) => 1_000_000.0,
        Some(other) => {
            return Err((
                format!("{path}.default_value.denominator"),
                format!("{other:?}: expected HUNDRED, TEN_THOUSAND or MILLION"),
            ));
        }
    };
    Ok((f64::from(numerator) / denominator).min(1.0))
}

fn header_ops(v: &Value, path: &str) -> Result<Vec<HeaderOp>, FieldError> {
    let Some(list) = v.as_array() else {
        return Err((path.to_owned(), "expected a list of {header: {key, value}}".to_owned()));
    };
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let p = format!("{path}[{i}]");
            let h = get(item, "header").ok_or_else(|| (p.clone(), "`header: {key, value}` is required".to_owned()))?;
            let key = get(h, "key").and_then(Value::as_str).unwrap_or_default();
            let name = HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| (format!("{p}.header.key"), format!("{key:?} is not a valid header name")))?;
            let value = get(h, "value").and_then(Value::as_str).unwrap_or_default();
            let value = HeaderValue::from_str(value)
                .map_err(|_| (format!("{p}.header.value"), format!("{value:?} is not a valid header value")))?;
            // Envoy's default for response_headers_to_add is to append.
            let append = match (get(item, "append"), get(item, "append_action").and_then(Value::as_str)) {
                (_, Some("APPEND_IF_EXISTS_OR_ADD")) => true,
                (_, Some("ADD_IF_ABSENT" | "OVERWRITE_IF_EXISTS_OR_ADD" | "OVERWRITE_IF_EXISTS")) => false,
                (_, Some(other)) => {
                    return Err((format!("{p}.append_action"), format!("unknown append_action {other:?}")));
                }
                (Some(Value::Bool(b)), None) => *b,
                (Some(Value::Object(o)), None) => o.get("value").and_then(Value::as_bool).unwrap_or(true),
                _ => true,
            };
            Ok(HeaderOp { name, value, append })
        })
        .collect()
}

/// A `typed_config` (HTTP_FILTER) or a `typed_per_filter_config` entry (HTTP_ROUTE) → the
/// `LocalRateLimit` message itself.
pub(super) fn unwrap_typed<'a>(v: &'a Value, path: &str) -> Result<(&'a Value, String), FieldError> {
    let ty = v.get("@type").and_then(Value::as_str).unwrap_or_default();
    if TYPED_STRUCT_TYPES.contains(&ty) {
        let inner = v.get("type_url").or_else(|| v.get("typeUrl")).and_then(Value::as_str).unwrap_or_default();
        if inner != LOCAL_RATE_LIMIT_TYPE {
            return Err((
                format!("{path}.type_url"),
                format!("{inner:?}: only {LOCAL_RATE_LIMIT_TYPE} (local rate limit) is supported"),
            ));
        }
        let value =
            v.get("value").ok_or_else(|| (format!("{path}.value"), "the TypedStruct needs a `value`".to_owned()))?;
        Ok((value, format!("{path}.value")))
    } else if ty == LOCAL_RATE_LIMIT_TYPE {
        Ok((v, path.to_owned()))
    } else {
        Err((
            format!("{path}.@type"),
            format!(
                "{ty:?}: only the local rate limit is supported ({LOCAL_RATE_LIMIT_TYPE}, directly or in a \
                 udpa.type.v1.TypedStruct)"
            ),
        ))
    }
}

/// Parses a `LocalRateLimit` message at `path`. `per_route`: Envoy requires a token bucket there.
pub(super) fn settings(v: &Value, path: &str, per_route: bool) -> Result<Settings, FieldError> {
    if !v.is_object() {
        return Err((path.to_owned(), "expected a LocalRateLimit object".to_owned()));
    }
    for unsupported in
        ["descriptors", "rate_limits", "local_cluster_rate_limit", "local_rate_limit_per_downstream_connection"]
    {
        let set = match get(v, unsupported) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err((
                format!("{path}.{unsupported}"),
                "not supported by the weft waypoint: only the plain token bucket (token_bucket, filter_enabled, \
                 filter_enforced, status, response headers) is"
                    .to_owned(),
            ));
        }
    }
    let bucket = match get(v, "token_bucket") {
        None | Some(Value::Null) => {
            if per_route {
                return Err((
                    format!("{path}.token_bucket"),
                    "a per-route local rate limit needs a token_bucket (Envoy refuses it too)".to_owned(),
                ));
            }
            None
        }
        Some(tb) => {
            let p = format!("{path}.token_bucket");
            let max_tokens = uint(
                get(tb, "max_tokens").ok_or_else(|| (format!("{p}.max_tokens"), "required".to_owned()))?,
                &format!("{p}.max_tokens"),
            )?;
            if max_tokens == 0 {
                return Err((format!("{p}.max_tokens"), "must be at least 1".to_owned()));
            }
            let tokens_per_fill = match get(tb, "tokens_per_fill") {
                Some(t) => uint(t, &format!("{p}.tokens_per_fill"))?,
                None => 1,
            };
            if tokens_per_fill == 0 {
                return Err((format!("{p}.tokens_per_fill"), "must be at least 1".to_owned()));
            }
            let fi = get(tb, "fill_interval")
                .ok_or_else(|| (format!("{p}.fill_interval"), "required, e.g. \"1s\" or \"60s\"".to_owned()))?;
            let fill_interval = match fi {
                Value::String(s) => crate::crd::duration::parse(s).map_err(|e| (format!("{p}.fill_interval"), e))?,
                other => {
                    return Err((
                        format!("{p}.fill_interval"),
                        format!("{other} is not a duration string like \"1s\""),
                    ));
                }
            };
            if fill_interval < MIN_FILL_INTERVAL {
                return Err((format!("{p}.fill_interval"), "must be at least 50ms (Envoy's minimum)".to_owned()));
            }
            Some(BucketSpec { max_tokens, tokens_per_fill, fill_interval })
        }
    };
    let enabled = match get(v, "filter_enabled") {
        Some(f) => fraction(f, &format!("{path}.filter_enabled"))?,
        None => 0.0,
    };
    let enforced = match get(v, "filter_enforced") {
        Some(f) => fraction(f, &format!("{path}.filter_enforced"))?,
        None => 0.0,
    };
    // Envoy answers 429 unless `status.code` names another error status (>= 400).
    let status = match get(v, "status").and_then(|s| get(s, "code")) {
        None => StatusCode::TOO_MANY_REQUESTS,
        Some(c) => {
            let code = match c {
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                Value::String(s) => status_name(s).or_else(|| s.parse().ok()),
                _ => None,
            };
            code.and_then(|c| StatusCode::from_u16(c).ok())
                .filter(|c| c.as_u16() >= 400)
                .unwrap_or(StatusCode::TOO_MANY_REQUESTS)
        }
    };
    let response_headers = match get(v, "response_headers_to_add") {
        Some(h) => header_ops(h, &format!("{path}.response_headers_to_add"))?,
        None => Vec::new(),
    };
    let request_headers_when_not_enforced = match get(v, "request_headers_to_add_when_not_enforced") {
        Some(h) => header_ops(h, &format!("{path}.request_headers_to_add_when_not_enforced"))?,
        None => Vec::new(),
    };
    let x_ratelimit_headers = match get(v, "enable_x_ratelimit_headers").and_then(Value::as_str) {
        None | Some("OFF") => false,
        Some("DRAFT_VERSION_03") => true,
        Some(other) => {
            return Err((
                format!("{path}.enable_x_ratelimit_headers"),
                format!("{other:?}: expected OFF or DRAFT_VERSION_03"),
            ));
        }
    };
    let grpc_resource_exhausted =
        get(v, "rate_limited_as_resource_exhausted").and_then(Value::as_bool).unwrap_or(false);
    Ok(Settings {
        bucket,
        enabled,
        enforced,
        status,
        response_headers,
        request_headers_when_not_enforced,
        x_ratelimit_headers,
        grpc_resource_exhausted,
    })
}

/// Envoy's `StatusCode` enum names for the codes one would answer a limit with.
fn status_name(s: &str) -> Option<u16> {
    Some(match s {
        "TooManyRequests" => 429,
        "ServiceUnavailable" => 503,
        "Forbidden" => 403,
        "BadRequest" => 400,
        "Unauthorized" => 401,
        "InternalServerError" => 500,
        _ => return None,
    })
}
