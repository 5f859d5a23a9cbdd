//! Trace context propagation through the waypoint: W3C `traceparent`/`tracestate` and B3 (multi-header
//! `x-b3-*` and single `b3`) in, both out, with the waypoint's own span as the upstream's parent, and
//! `x-request-id`. Exporting spans (OTLP) is not done here.

use http::{HeaderMap, HeaderValue};

const TRACEPARENT: &str = "traceparent";
const B3: &str = "b3";
const B3_TRACE_ID: &str = "x-b3-traceid";
const B3_SPAN_ID: &str = "x-b3-spanid";
const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
const B3_SAMPLED: &str = "x-b3-sampled";
const B3_FLAGS: &str = "x-b3-flags";
const REQUEST_ID: &str = "x-request-id";

/// The trace context of one request as the waypoint forwards it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceIds {
    /// 32 lowercase hex digits (a 64-bit B3 trace id is zero-extended, as W3C requires).
    pub trace_id: String,
    /// The waypoint's span: the parent of the upstream request. 16 hex digits.
    pub span_id: String,
    /// The caller's span, when the request carried a context.
    pub parent_span_id: Option<String>,
    /// The caller's sampling decision; `None` when it made none (a new trace is not sampled: the
    /// waypoint has no span exporter to sample for).
    pub sampled: Option<bool>,
    /// `x-request-id` as forwarded (the caller's, or a new UUID v4).
    pub request_id: String,
    /// The context came in (`false`: the waypoint started the trace).
    pub continued: bool,
}

struct Incoming {
    trace: u128,
    /// B3 allows 64-bit trace ids; B3 headers going out keep the caller's width.
    trace_64: bool,
    span: Option<u64>,
    sampled: Option<bool>,
    /// B3 debug (`x-b3-flags: 1` or `b3: …-d`): sampled, and kept as debug.
    debug: bool,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn hex_u128(s: &str, lens: &[usize]) -> Option<u128> {
    (lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u128::from_str_radix(s, 16).ok())?
}

fn hex_u64(s: &str) -> Option<u64> {
    (s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u64::from_str_radix(s, 16).ok())?
}

/// `00-<trace 32>-<parent 16>-<flags 2>`; future versions may append fields after the flags.
fn parse_traceparent(v: &str) -> Option<Incoming> {
    let mut it = v.split('-');
    let (version, trace, span, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if version.len() != 2 || version.eq_ignore_ascii_case("ff") || u8::from_str_radix(version, 16).is_err() {
        return None;
    }
    if version == "00" && it.next().is_some() {
        return None;
    }
    let trace = hex_u128(trace, &[32]).filter(|t| *t != 0)?;
    let span = hex_u64(span).filter(|s| *s != 0)?;
    let flags = (flags.len() == 2).then(|| u8::from_str_radix(flags, 16).ok())??;
    Some(Incoming { trace, trace_64: false, span: Some(span), sampled: Some(flags & 1 == 1), debug: false })
}

fn b3_sampling(v: &str) -> Option<(Option<bool>, bool)> {
    match v {
        "1" | "true" => Some((Some(true), false)),
        "0" | "false" => Some((Some(false), false)),
        "d" => Some((Some(true), true)),
        _ => None,
    }
}

/// `b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]`, or only `{sampling}` (no trace to
/// continue, but the decision holds).
fn parse_b3_single(v: &str) -> Option<Result<Incoming, (Option<bool>, bool)>> {
    let parts: Vec<&str> = v.split('-').collect();
    if parts.len() == 1 {
        return b3_sampling(parts[0]).map(Err);
    }
    let trace = hex_u128(parts[0], &[16, 32]).filter(|t| *t != 0)?;
    let span = hex_u64(parts[1]).filter(|s| *s != 0)?;
    let (sampled, debug) = match parts.get(2) {
        Some(s) => b3_sampling(s)?,
        None => (None, false),
    };
    Some(Ok(Incoming { trace, trace_64: parts[0].len() == 16, span: Some(span), sampled, debug }))
}

fn parse_b3_multi(h: &HeaderMap) -> Option<Incoming> {
    let trace_str = header(h, B3_TRACE_ID)?;
    let trace = hex_u128(trace_str, &[16, 32]).filter(|t| *t != 0)?;
    let span = hex_u64(header(h, B3_SPAN_ID)?).filter(|s| *s != 0)?;
    let debug = header(h, B3_FLAGS) == Some("1");
    let sampled = if debug { Some(true) } else { header(h, B3_SAMPLED).and_then(b3_sampling).and_then(|s| s.0) };
    Some(Incoming { trace, trace_64: trace_str.len() == 16, span: Some(span), sampled, debug })
}

fn nonzero_u64() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

fn new_uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

fn set(h: &mut HeaderMap, name: &'static str, value: String) {
    // Hex digits, dashes and a UUID are always valid header values.
    h.insert(name, HeaderValue::from_str(&value).expect("generated header value is valid"));
}

/// Continues the request's trace (or starts one), rewrites the propagation headers so that the
/// waypoint's span is the upstream's parent, and makes sure `x-request-id` is set. Precedence when
/// several formats arrive: `traceparent`, then `b3`, then `x-b3-*` (a malformed one is ignored).
pub fn propagate_trace(headers: &mut HeaderMap) -> TraceIds {
    let mut sampling_only = None;
    let incoming = header(headers, TRACEPARENT)
        .and_then(parse_traceparent)
        .or_else(|| match header(headers, B3).and_then(parse_b3_single) {
            Some(Ok(i)) => Some(i),
            Some(Err(s)) => {
                sampling_only = Some(s);
                None
            }
            None => None,
        })
        .or_else(|| parse_b3_multi(headers));
    let continued = incoming.is_some();
    let inc = incoming.unwrap_or_else(|| {
        let (sampled, debug) = sampling_only.unwrap_or((None, false));
        Incoming { trace: rand::random::<u128>().max(1), trace_64: false, span: None, sampled, debug }
    });
    let span = nonzero_u64();
    let trace_hex = format!("{:032x}", inc.trace);
    let b3_trace = if inc.trace_64 { format!("{:016x}", inc.trace as u64) } else { trace_hex.clone() };
    let span_hex = format!("{span:016x}");
    let parent_hex = inc.span.map(|p| format!("{p:016x}"));
    let sampled_flag = if inc.sampled == Some(true) { "01" } else { "00" };

    // `tracestate` is vendor data for the trace, passed on untouched (the waypoint adds no entry).
    set(headers, TRACEPARENT, format!("00-{trace_hex}-{span_hex}-{sampled_flag}"));
    set(headers, B3_TRACE_ID, b3_trace.clone());
    set(headers, B3_SPAN_ID, span_hex.clone());
    match &parent_hex {
        Some(p) => set(headers, B3_PARENT_SPAN_ID, p.clone()),
        None => {
            headers.remove(B3_PARENT_SPAN_ID);
        }
    }
    if inc.debug {
        set(headers, B3_FLAGS, "1".to_owned());
        headers.remove(B3_SAMPLED);
    } else if let Some(s) = inc.sampled {
        set(headers, B3_SAMPLED, if s { "1" } else { "0" }.to_owned());
    } else {
        headers.remove(B3_SAMPLED);
    }
    if headers.contains_key(B3) {
        let sampling = match (inc.debug, inc.sampled) {
            (true, _) => "-d",
            (false, Some(true)) => "-1",
            (false, Some(false)) => "-0",
            (false, None) => "",
        };
        let parent = match (&parent_hex, sampling) {
            (Some(p), s) if !s.is_empty() => format!("-{p}"),
            _ => String::new(),
        };
        set(headers, B3, format!("{b3_trace}-{span_hex}{sampling}{parent}"));
    }
    let request_id = match header(headers, REQUEST_ID).filter(|v| !v.is_empty()) {
        Some(id) => id.to_owned(),
        None => {
            let id = new_uuid_v4();
            set(headers, REQUEST_ID, id.clone());
            id
        }
    };
    TraceIds {
        trace_id: trace_hex,
        span_id: span_hex,
        parent_span_id: parent_hex,
        sampled: inc.sampled,
        request_id,
        continued,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pairs: &[(&'static str, &str)]) -> (HeaderMap, TraceIds) {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        let ids = propagate_trace(&mut h);
        (h, ids)
    }

    fn get<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
        h.get(k).map(|v| v.to_str().unwrap())
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    #[test]
    fn w3c_is_continued_with_our_span_as_parent() {
        let (h, ids) = run(&[("traceparent", &format!("00-{TRACE}-{PARENT}-01")), ("tracestate", "congo=t61rcWkgMzE")]);
        assert!(ids.continued);
        assert_eq!(ids.trace_id, TRACE);
        assert_eq!(ids.parent_span_id.as_deref(), Some(PARENT));
        assert_ne!(ids.span_id, PARENT);
        assert_eq!(ids.sampled, Some(true));
        assert_eq!(get(&h, "traceparent").unwrap(), format!("00-{TRACE}-{}-01", ids.span_id));
        assert_eq!(get(&h, "tracestate"), Some("congo=t61rcWkgMzE"));
        assert_eq!(get(&h, "x-b3-traceid"), Some(TRACE));
        assert_eq!(get(&h, "x-b3-spanid"), Some(ids.span_id.as_str()));
        assert_eq!(get(&h, "x-b3-parentspanid"), Some(PARENT));
        assert_eq!(get(&h, "x-b3-sampled"), Some("1"));
    }

    #[test]
    fn w3c_not_sampled_is_kept() {
        let (h, ids) = run(&[("traceparent", &format!("00-{TRACE}-{PARENT}-00"))]);
        assert_eq!(ids.sampled, Some(false));
        assert!(get(&h, "traceparent").unwrap().ends_with("-00"));
        assert_eq!(get(&h, "x-b3-sampled"), Some("0"));
    }

    #[test]
    fn b3_multi_64_bit_trace_keeps_its_width_in_b3_and_pads_in_w3c() {
        let (h, ids) = run(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", PARENT),
            ("x-b3-parentspanid", "1111111111111111"),
            ("x-b3-sampled", "1"),
        ]);
        assert!(ids.continued);
        assert_eq!(ids.trace_id, "0000000000000000a3ce929d0e0e4736");
        assert_eq!(get(&h, "x-b3-traceid"), Some("a3ce929d0e0e4736"));
        assert_eq!(get(&h, "x-b3-parentspanid"), Some(PARENT));
        assert_eq!(get(&h, "x-b3-spanid"), Some(ids.span_id.as_str()));
        assert_eq!(get(&h, "traceparent").unwrap(), format!("00-0000000000000000a3ce929d0e0e4736-{}-01", ids.span_id));
    }

    #[test]
    fn b3_debug_flag_means_sampled() {
        let (h, ids) = run(&[("x-b3-traceid", TRACE), ("x-b3-spanid", PARENT), ("x-b3-flags", "1")]);
        assert_eq!(ids.sampled, Some(true));
        assert_eq!(get(&h, "x-b3-flags"), Some("1"));
        assert!(get(&h, "traceparent").unwrap().ends_with("-01"));
    }

    #[test]
    fn b3_single_header_is_rewritten() {
        let (h, ids) = run(&[("b3", &format!("{TRACE}-{PARENT}-1-2222222222222222"))]);
        assert_eq!(ids.trace_id, TRACE);
        assert_eq!(ids.parent_span_id.as_deref(), Some(PARENT));
        assert_eq!(get(&h, "b3").unwrap(), format!("{TRACE}-{}-1-{PARENT}", ids.span_id));
        assert_eq!(get(&h, "x-b3-spanid"), Some(ids.span_id.as_str()));
    }

    #[test]
    fn b3_single_sampling_only_starts_a_trace_with_that_decision() {
        let (h, ids) = run(&[("b3", "0")]);
        assert!(!ids.continued);
        assert_eq!(ids.sampled, Some(false));
        assert_eq!(get(&h, "b3").unwrap(), format!("{}-{}-0", ids.trace_id, ids.span_id));
    }

    #[test]
    fn traceparent_wins_over_b3() {
        let (_, ids) = run(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("x-b3-traceid", "1111111111111111"),
            ("x-b3-spanid", "2222222222222222"),
        ]);
        assert_eq!(ids.trace_id, TRACE);
    }

    #[test]
    fn absent_or_malformed_context_starts_a_new_trace() {
        for bad in [
            vec![],
            vec![("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")],
            vec![("traceparent", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
            vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01")],
            vec![("traceparent", "00-xyz-00f067aa0ba902b7-01")],
            vec![("x-b3-traceid", "nothex"), ("x-b3-spanid", PARENT)],
        ] {
            let (h, ids) = run(&bad);
            assert!(!ids.continued, "{bad:?}");
            assert_eq!(ids.parent_span_id, None);
            assert_eq!(ids.trace_id.len(), 32);
            assert_ne!(ids.trace_id, "0".repeat(32));
            assert_eq!(get(&h, "traceparent").unwrap(), format!("00-{}-{}-00", ids.trace_id, ids.span_id));
            assert_eq!(get(&h, "x-b3-parentspanid"), None);
            assert_eq!(get(&h, "x-b3-sampled"), None);
        }
    }

    #[test]
    fn request_id_is_added_when_missing_and_kept_otherwise() {
        let (h, ids) = run(&[]);
        let id = get(&h, "x-request-id").unwrap();
        assert_eq!(id, ids.request_id);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4", "UUID version 4: {id}");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "RFC 4122 variant: {id}");
        let (h, ids) = run(&[("x-request-id", "abc-123")]);
        assert_eq!(get(&h, "x-request-id"), Some("abc-123"));
        assert_eq!(ids.request_id, "abc-123");
        // Two new ids differ.
        assert_ne!(run(&[]).1.request_id, run(&[]).1.request_id);
    }
}
