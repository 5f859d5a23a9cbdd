//! Request telemetry of the waypoint: Istio's standard HTTP metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`, with Istio's
//! label set and buckets and `reporter="waypoint"`), one access-log line per request (tracing target
//! `access`, Envoy's default access-log fields), and trace context propagation (`trace`).
//!
//! Does not own: the registry or serving `/metrics` (`crate::metrics` / the admin server), working
//! out who the peers are (the handler fills [`RequestRecord`]), or exporting spans.

mod trace;

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::metrics::Peer;
pub use trace::{TraceIds, propagate_trace};

/// Istio's label names for HTTP request metrics, in the order `RequestRecord::label_values` returns.
const LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Istio's buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for the byte-size histograms: 1, 10, …, 10^7.
pub const SIZE_BUCKETS: [f64; 8] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0];

/// Istio's `cluster` label value for a single cluster.
const CLUSTER: &str = "Kubernetes";

/// Istio's `request_protocol` values for requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    /// gRPC is HTTP/2 with `content-type: application/grpc[+proto|;…]`.
    pub fn of(headers: &http::HeaderMap) -> Protocol {
        let grpc = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        if grpc { Protocol::Grpc } else { Protocol::Http }
    }

    fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// One finished request: the metric labels and the access-log fields.
#[derive(Debug, Clone)]
pub struct RequestRecord<'a> {
    pub source: &'a Peer,
    /// The endpoint's workload; `Peer::default()` (all `unknown`) when no endpoint was reached.
    pub destination: &'a Peer,
    /// `name.namespace.svc.cluster.local`.
    pub destination_service: &'a str,
    pub destination_service_name: &'a str,
    pub destination_service_namespace: &'a str,
    pub protocol: Protocol,
    pub response_code: u16,
    /// `grpc-status` of a gRPC response (trailer or trailers-only header).
    pub grpc_status: Option<u32>,
    /// Envoy response flags (`-` when none; `UH`, `UF`, `UO`, `NR`, `URX`, `DI`, `FI`, `RL`, `UAEX`…).
    pub response_flags: &'a str,
    /// The request came over mTLS (HBONE): `mutual_tls`, else `none`.
    pub mtls: bool,
    pub duration: Duration,
    /// Body bytes received from the client and sent back to it.
    pub request_bytes: u64,
    pub response_bytes: u64,
    // Access-log only.
    pub method: &'a str,
    /// Path and query as received.
    pub path: &'a str,
    /// `HTTP/1.1`, `HTTP/2`.
    pub http_version: &'a str,
    pub authority: &'a str,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub trace_id: Option<&'a str>,
    pub downstream_remote: Option<std::net::SocketAddr>,
    /// `ip:port` of the endpoint the response came from.
    pub upstream_host: Option<std::net::SocketAddr>,
    /// Envoy-style cluster name, e.g. `outbound|9080|v1|reviews.demo.svc.cluster.local`.
    pub upstream_cluster: Option<&'a str>,
    pub route_name: Option<&'a str>,
}

/// "0".."999": HTTP and gRPC status label values without formatting on the request path.
static NUMBERS: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (0..1000).map(|n| n.to_string()).collect());

impl RequestRecord<'_> {
    /// Borrowed label values (no allocation on the request path for the usual codes);
    /// `scratch` holds the rare ones that must be formatted.
    fn label_values<'s>(&'s self, scratch: &'s mut [String; 2]) -> [&'s str; 25] {
        let (s, d) = (self.source, self.destination);
        let [code_buf, grpc_buf] = scratch;
        let code = match NUMBERS.get(usize::from(self.response_code)) {
            Some(c) => c.as_str(),
            None => {
                *code_buf = self.response_code.to_string();
                code_buf.as_str()
            }
        };
        // Istio leaves it empty for plain HTTP.
        let grpc = match self.grpc_status {
            None => "",
            Some(g) => match NUMBERS.get(g as usize) {
                Some(n) => n.as_str(),
                None => {
                    *grpc_buf = g.to_string();
                    grpc_buf.as_str()
                }
            },
        };
        [
            "waypoint",
            &s.workload,
            &s.canonical_service,
            &s.canonical_revision,
            &s.namespace,
            &s.principal,
            &s.app,
            &s.version,
            CLUSTER,
            &d.workload,
            &d.namespace,
            &d.principal,
            &d.app,
            &d.version,
            self.destination_service,
            self.destination_service_namespace,
            self.destination_service_name,
            &d.canonical_service,
            &d.canonical_revision,
            CLUSTER,
            self.protocol.label(),
            code,
            grpc,
            if self.response_flags.is_empty() { "-" } else { self.response_flags },
            if self.mtls { "mutual_tls" } else { "none" },
        ]
    }
}

/// The four request metric families, registered once.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
}

impl RequestMetrics {
    /// Registers the families on `registry`. Panics if they are already registered there (a
    /// wiring bug: one `RequestMetrics` per registry).
    pub fn new(registry: &Registry) -> Self {
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &LABELS)
                .expect("valid metric definition");
            registry.register(Box::new(h.clone())).expect("request metrics registered once per registry");
            h
        };
        let requests = IntCounterVec::new(Opts::new("istio_requests_total", "Total requests"), &LABELS)
            .expect("valid metric definition");
        registry.register(Box::new(requests.clone())).expect("request metrics registered once per registry");
        RequestMetrics {
            requests,
            duration: hist(
                "istio_request_duration_milliseconds",
                "Request duration in milliseconds",
                &DURATION_BUCKETS_MS,
            ),
            request_bytes: hist("istio_request_bytes", "Request body size in bytes", &SIZE_BUCKETS),
            response_bytes: hist("istio_response_bytes", "Response body size in bytes", &SIZE_BUCKETS),
        }
    }

    pub fn record(&self, r: &RequestRecord<'_>) {
        let mut scratch = [String::new(), String::new()];
        let v = r.label_values(&mut scratch);
        self.requests.with_label_values(&v).inc();
        self.duration.with_label_values(&v).observe(r.duration.as_secs_f64() * 1000.0);
        self.request_bytes.with_label_values(&v).observe(r.request_bytes as f64);
        self.response_bytes.with_label_values(&v).observe(r.response_bytes as f64);
    }
}

/// One access-log line (tracing target `access`, level INFO) with Envoy's default access-log fields.
pub fn access_log(r: &RequestRecord<'_>) {
    let dash = |s: Option<&str>| s.unwrap_or("-").to_owned();
    let addr = |a: Option<std::net::SocketAddr>| a.map_or_else(|| "-".to_owned(), |a| a.to_string());
    tracing::info!(
        target: "access",
        method = r.method,
        path = r.path,
        protocol = r.http_version,
        response_code = r.response_code,
        response_flags = if r.response_flags.is_empty() { "-" } else { r.response_flags },
        bytes_received = r.request_bytes,
        bytes_sent = r.response_bytes,
        duration_ms = r.duration.as_millis() as u64,
        user_agent = %dash(r.user_agent),
        request_id = %dash(r.request_id),
        authority = r.authority,
        upstream_host = %addr(r.upstream_host),
        upstream_cluster = %dash(r.upstream_cluster),
        downstream_remote_address = %addr(r.downstream_remote),
        route_name = %dash(r.route_name),
        trace_id = %dash(r.trace_id),
        source_principal = %r.source.principal,
        destination_service = r.destination_service,
        grpc_status = %r.grpc_status.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        "request"
    );
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, TextEncoder};

    use super::*;

    fn text(registry: &Registry) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn record<'a>(src: &'a Peer, dst: &'a Peer) -> RequestRecord<'a> {
        RequestRecord {
            source: src,
            destination: dst,
            destination_service: "reviews.demo.svc.cluster.local",
            destination_service_name: "reviews",
            destination_service_namespace: "demo",
            protocol: Protocol::Http,
            response_code: 200,
            grpc_status: None,
            response_flags: "-",
            mtls: true,
            duration: Duration::from_micros(7_300),
            request_bytes: 0,
            response_bytes: 1234,
            method: "GET",
            path: "/reviews/1",
            http_version: "HTTP/1.1",
            authority: "reviews:9080",
            user_agent: Some("curl/8"),
            request_id: Some("abc"),
            trace_id: None,
            downstream_remote: Some("10.0.1.5:40000".parse().unwrap()),
            upstream_host: Some("10.0.2.7:9080".parse().unwrap()),
            upstream_cluster: Some("outbound|9080|v1|reviews.demo.svc.cluster.local"),
            route_name: Some("v1"),
        }
    }

    fn line<'a>(text: &'a str, prefix: &str, must: &[&str]) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix) && must.iter().all(|m| l.contains(m)))
            .unwrap_or_else(|| panic!("no line {prefix} with {must:?} in\n{text}"))
    }

    #[test]
    fn labels_carry_istio_names_and_values() {
        let reg = Registry::new();
        let m = RequestMetrics::new(&reg);
        let src = Peer {
            workload: "productpage-v1".into(),
            namespace: "demo".into(),
            principal: "spiffe://cluster.local/ns/demo/sa/bookinfo-productpage".into(),
            app: "productpage".into(),
            version: "v1".into(),
            canonical_service: "productpage".into(),
            canonical_revision: "v1".into(),
        };
        let dst =
            Peer { workload: "reviews-v2".into(), namespace: "demo".into(), version: "v2".into(), ..Peer::default() };
        m.record(&record(&src, &dst));
        let t = text(&reg);
        let l = line(&t, "istio_requests_total{", &[]);
        for want in [
            r#"reporter="waypoint""#,
            r#"source_workload="productpage-v1""#,
            r#"source_workload_namespace="demo""#,
            r#"source_principal="spiffe://cluster.local/ns/demo/sa/bookinfo-productpage""#,
            r#"source_app="productpage""#,
            r#"source_canonical_revision="v1""#,
            r#"source_cluster="Kubernetes""#,
            r#"destination_workload="reviews-v2""#,
            r#"destination_version="v2""#,
            r#"destination_principal="unknown""#,
            r#"destination_canonical_revision="latest""#,
            r#"destination_service="reviews.demo.svc.cluster.local""#,
            r#"destination_service_name="reviews""#,
            r#"destination_service_namespace="demo""#,
            r#"request_protocol="http""#,
            r#"response_code="200""#,
            r#"grpc_response_status="""#,
            r#"response_flags="-""#,
            r#"connection_security_policy="mutual_tls""#,
        ] {
            assert!(l.contains(want), "{want} missing in {l}");
        }
        assert!(l.ends_with(" 1"), "{l}");
        assert_eq!(l.matches("=\"").count(), 25, "every Istio label present: {l}");
    }

    #[test]
    fn histograms_observe_in_istio_buckets() {
        let reg = Registry::new();
        let m = RequestMetrics::new(&reg);
        let (src, dst) = (Peer::default(), Peer::default());
        m.record(&record(&src, &dst)); // 7.3 ms, 0 B in, 1234 B out
        let mut r = record(&src, &dst);
        r.duration = Duration::from_millis(300);
        r.response_code = 503;
        r.response_flags = "UH";
        r.request_bytes = 50;
        m.record(&r);
        let t = text(&reg);
        let ok = r#"response_code="200""#;
        assert!(line(&t, "istio_request_duration_milliseconds_bucket{", &[ok, r#"le="5""#]).ends_with(" 0"));
        assert!(line(&t, "istio_request_duration_milliseconds_bucket{", &[ok, r#"le="10""#]).ends_with(" 1"));
        assert!(line(&t, "istio_request_duration_milliseconds_sum{", &[ok]).ends_with(" 7.3"));
        assert!(line(&t, "istio_request_duration_milliseconds_bucket{", &[ok, r#"le="3600000""#]).ends_with(" 1"));
        let bad = r#"response_flags="UH""#;
        assert!(line(&t, "istio_request_duration_milliseconds_bucket{", &[bad, r#"le="250""#]).ends_with(" 0"));
        assert!(line(&t, "istio_request_duration_milliseconds_bucket{", &[bad, r#"le="500""#]).ends_with(" 1"));
        assert!(line(&t, "istio_requests_total{", &[bad, r#"response_code="503""#]).ends_with(" 1"));
        assert!(line(&t, "istio_request_bytes_bucket{", &[ok, r#"le="1""#]).ends_with(" 1"));
        assert!(line(&t, "istio_request_bytes_bucket{", &[bad, r#"le="10""#]).ends_with(" 0"));
        assert!(line(&t, "istio_request_bytes_bucket{", &[bad, r#"le="100""#]).ends_with(" 1"));
        assert!(line(&t, "istio_response_bytes_bucket{", &[ok, r#"le="1000""#]).ends_with(" 0"));
        assert!(line(&t, "istio_response_bytes_bucket{", &[ok, r#"le="10000""#]).ends_with(" 1"));
        assert!(line(&t, "istio_response_bytes_sum{", &[ok]).ends_with(" 1234"));
        let buckets = t
            .lines()
            .filter(|l| l.starts_with("istio_request_duration_milliseconds_bucket{") && l.contains(ok))
            .count();
        assert_eq!(buckets, DURATION_BUCKETS_MS.len() + 1, "Istio's buckets plus +Inf");
    }

    #[test]
    fn grpc_requests_are_labelled_grpc_with_status() {
        let mut h = http::HeaderMap::new();
        assert_eq!(Protocol::of(&h), Protocol::Http);
        h.insert(http::header::CONTENT_TYPE, "application/grpc+proto".parse().unwrap());
        assert_eq!(Protocol::of(&h), Protocol::Grpc);
        let reg = Registry::new();
        let m = RequestMetrics::new(&reg);
        let (src, dst) = (Peer::default(), Peer::default());
        let mut r = record(&src, &dst);
        r.protocol = Protocol::Grpc;
        r.grpc_status = Some(14);
        r.mtls = false;
        m.record(&r);
        let t = text(&reg);
        line(
            &t,
            "istio_requests_total{",
            &[r#"request_protocol="grpc""#, r#"grpc_response_status="14""#, r#"connection_security_policy="none""#],
        );
    }

    /// Collects what a fmt subscriber writes, to read the access-log line back.
    #[derive(Clone, Default)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn access_log_line_carries_envoy_fields() {
        let cap = Capture::default();
        let writer = cap.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let (src, dst) = (Peer::default(), Peer::default());
        tracing::subscriber::with_default(subscriber, || access_log(&record(&src, &dst)));
        let out = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        for want in [
            " access: request",
            "method=\"GET\"",
            "path=\"/reviews/1\"",
            "protocol=\"HTTP/1.1\"",
            "response_code=200",
            "response_flags=\"-\"",
            "bytes_received=0",
            "bytes_sent=1234",
            "duration_ms=7",
            "user_agent=curl/8",
            "request_id=abc",
            "authority=\"reviews:9080\"",
            "upstream_host=10.0.2.7:9080",
            "upstream_cluster=outbound|9080|v1|reviews.demo.svc.cluster.local",
            "downstream_remote_address=10.0.1.5:40000",
            "route_name=v1",
            "trace_id=-",
        ] {
            assert!(out.contains(want), "{want} missing in {out}");
        }
    }

    #[test]
    fn access_log_does_not_panic_on_sparse_records() {
        let (src, dst) = (Peer::default(), Peer::default());
        let mut r = record(&src, &dst);
        r.user_agent = None;
        r.upstream_host = None;
        r.upstream_cluster = None;
        r.route_name = None;
        r.response_flags = "";
        access_log(&r);
    }
}
