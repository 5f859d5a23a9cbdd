//! The agent's small HTTP servers: Prometheus `/metrics` (15020), `/healthz/ready` (15021) and the
//! localhost admin endpoint (15000: `/config_dump`, `/certs`).
//!
//! It owns request routing for these ports only; what they report comes from `state`,
//! `metrics` and `identity`, and readiness is decided by `app`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::drain::Drain;
use crate::identity::CertManager;
use crate::metrics::Metrics;
use crate::state::StateStore;

/// What the endpoints read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub state: Arc<StateStore>,
    pub certs: Arc<CertManager>,
    /// Set by `app` once every captured pod is enrolled.
    pub ready: AtomicBool,
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts")
}

impl Admin {
    fn route(&self, path: &str) -> Response<Body> {
        match path {
            "/metrics" | "/stats/prometheus" => {
                reply(StatusCode::OK, "text/plain; version=0.0.4", self.metrics.encode())
            }
            "/healthz/ready" => {
                if self.ready.load(Ordering::Acquire) {
                    reply(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: pods still being enrolled\n")
                }
            }
            "/config_dump" => reply(StatusCode::OK, "application/json", self.config_dump()),
            "/certs" => {
                let certs: Vec<_> = self
                    .certs
                    .snapshot()
                    .into_iter()
                    .map(|c| serde_json::json!({ "identity": c.identity.to_string(), "serial": c.serial, "not_before": c.not_before, "not_after": c.not_after }))
                    .collect();
                reply(StatusCode::OK, "application/json", serde_json::to_string_pretty(&certs).unwrap_or_default())
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics, /healthz/ready, /config_dump, /certs\n",
            ),
        }
    }

    fn config_dump(&self) -> String {
        let state = self.state.load();
        let mut workloads: Vec<_> = state
            .workloads_by_ip
            .values()
            .map(|w| {
                serde_json::json!({
                    "name": w.name, "namespace": w.namespace, "serviceAccount": w.service_account,
                    "identity": w.identity.to_string(), "ips": w.ips, "node": w.node,
                    "netns": w.netns, "captured": w.captured, "labels": &*w.labels,
                })
            })
            .collect();
        workloads.sort_by_key(|w| (w["namespace"].to_string(), w["name"].to_string()));
        workloads.dedup();
        let mut services: Vec<_> = state
            .services_by_vip
            .values()
            .map(|s| {
                serde_json::json!({
                    "name": s.name, "namespace": s.namespace, "vips": s.vips,
                    "ports": s.ports.iter().map(|p| serde_json::json!({"name": p.name, "port": p.port, "targetPort": p.target_port})).collect::<Vec<_>>(),
                    "endpoints": s.endpoints.iter().map(|e| format!("{}/{}", e.namespace, e.name)).collect::<Vec<_>>(),
                })
            })
            .collect();
        services.sort_by_key(|s| (s["namespace"].to_string(), s["name"].to_string()));
        services.dedup();
        serde_json::to_string_pretty(&serde_json::json!({ "workloads": workloads, "services": services, "policies": format!("{:?}", state.policies) }))
            .unwrap_or_default()
    }

    /// Serves HTTP/1.1 on `listener` until `drain` is signaled.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        let local = listener.local_addr().ok();
        loop {
            let (tcp, _peer): (_, SocketAddr) = tokio::select! {
                _ = drain.signaled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(addr = ?local, error = %e, "admin accept failed");
                        continue;
                    }
                },
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let resp = me.route(req.uri().path());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    }
}
