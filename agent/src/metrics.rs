//! Istio-standard metrics, so stock Prometheus scrapes, the Istio Grafana dashboards and Kiali work
//! unchanged: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`, with Istio's label set.
//!
//! It owns the registry and the label vocabulary; it does not serve HTTP (the admin servers in
//! `app` call `encode`) and does not know about sockets (the proxy reports into a `ConnMetrics`).

use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};

/// Istio's value for labels it cannot fill.
pub const UNKNOWN: &str = "unknown";

/// Istio's standard TCP label names, in the order `ConnLabels::values` returns them.
const TCP_LABELS: [&str; 23] = [
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
    "response_flags",
    "connection_security_policy",
];

/// Which proxy reports: Istio's `reporter` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
    /// A waypoint proxying a connection at L4 (Istio's `reporter="waypoint"`).
    Waypoint,
}

/// One side (source or destination) of a connection, as Istio labels it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    /// `spiffe://…` or `unknown`.
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl Default for Peer {
    fn default() -> Self {
        let u = UNKNOWN.to_string();
        Peer {
            workload: u.clone(),
            namespace: u.clone(),
            principal: u.clone(),
            app: u.clone(),
            version: u.clone(),
            canonical_service: u.clone(),
            canonical_revision: "latest".to_string(),
        }
    }
}

/// The label values of one TCP connection.
#[derive(Debug, Clone)]
pub struct ConnLabels {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    /// `name.namespace.svc.cluster.local`, or the destination address when no service matched.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `mutual_tls` or `none`.
    pub mtls: bool,
    /// Envoy-style response flags (`-` when none, `DENY`… when refused).
    pub response_flags: &'static str,
}

impl ConnLabels {
    fn values(&self) -> [&str; 23] {
        let (s, d) = (&self.source, &self.destination);
        [
            match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
                Reporter::Waypoint => "waypoint",
            },
            &s.workload,
            &s.canonical_service,
            &s.canonical_revision,
            &s.namespace,
            &s.principal,
            &s.app,
            &s.version,
            "Kubernetes",
            &d.workload,
            &d.namespace,
            &d.principal,
            &d.app,
            &d.version,
            &self.destination_service,
            &self.destination_service_namespace,
            &self.destination_service_name,
            &d.canonical_service,
            &d.canonical_revision,
            "Kubernetes",
            "tcp",
            self.response_flags,
            if self.mtls { "mutual_tls" } else { "none" },
        ]
    }
}

/// The registry and the metric families.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    opened: IntCounterVec,
    closed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let family = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &TCP_LABELS).expect("valid metric definition");
            registry.register(Box::new(c.clone())).expect("metric names are unique");
            c
        };
        Metrics {
            opened: family("istio_tcp_connections_opened_total", "Total TCP connections opened"),
            closed: family("istio_tcp_connections_closed_total", "Total TCP connections closed"),
            sent: family("istio_tcp_sent_bytes_total", "Bytes sent from destination to source"),
            received: family("istio_tcp_received_bytes_total", "Bytes received from source by destination"),
            registry,
        }
    }

    /// Counts a connection as opened; the returned handle counts bytes and the close.
    pub fn conn_opened(&self, labels: &ConnLabels) -> ConnMetrics {
        let v = labels.values();
        self.opened.with_label_values(&v).inc();
        ConnMetrics {
            closed: self.closed.with_label_values(&v),
            sent: self.sent.with_label_values(&v),
            received: self.received.with_label_values(&v),
        }
    }

    /// The registry the TCP families are in; other components (the waypoint's request metrics)
    /// register theirs here so one `/metrics` serves them all.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        Self::encode_registry(&self.registry)
    }

    /// The Prometheus text exposition of any registry.
    pub fn encode_registry(registry: &Registry) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut buf).expect("text encoding to memory cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// Per-connection counters, resolved once at open so the close does no label hashing.
#[derive(Debug)]
pub struct ConnMetrics {
    closed: prometheus::IntCounter,
    sent: prometheus::IntCounter,
    received: prometheus::IntCounter,
}

impl ConnMetrics {
    /// `received`: source → destination bytes; `sent`: destination → source bytes.
    pub fn closed(self, received: u64, sent: u64) {
        self.received.inc_by(received);
        self.sent.inc_by(sent);
        self.closed.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_carries_istio_names_and_labels() {
        let m = Metrics::new();
        let labels = ConnLabels {
            reporter: Reporter::Destination,
            source: Peer { principal: "spiffe://cluster.local/ns/demo/sa/client".into(), ..Peer::default() },
            destination: Peer { workload: "server-v1".into(), ..Peer::default() },
            destination_service: "server.demo.svc.cluster.local".into(),
            destination_service_name: "server".into(),
            destination_service_namespace: "demo".into(),
            mtls: true,
            response_flags: "-",
        };
        m.conn_opened(&labels).closed(10, 20);
        let text = m.encode();
        assert!(text.contains("istio_tcp_connections_opened_total{"), "{text}");
        let line = text.lines().find(|l| l.starts_with("istio_tcp_sent_bytes_total{")).unwrap();
        assert!(line.contains(r#"source_principal="spiffe://cluster.local/ns/demo/sa/client""#), "{line}");
        assert!(line.contains(r#"connection_security_policy="mutual_tls""#), "{line}");
        assert!(line.contains(r#"reporter="destination""#), "{line}");
        assert!(line.ends_with(" 20"), "{line}");
        let recv = text.lines().find(|l| l.starts_with("istio_tcp_received_bytes_total{")).unwrap();
        assert!(recv.ends_with(" 10"), "{recv}");
    }
}
