//! The waypoint in process: its HBONE server on 127.0.0.1:0, real HTTP backends on other loopback
//! addresses (their pods are not captured, so the waypoint speaks plaintext to them), and a client that
//! speaks HBONE with a certificate from the same test CA, HTTP/1.1 or HTTP/2 inside the tunnel.
//! Each test uses its own 127.0.N.0/24 so they run in parallel.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use crate::discovery::file::{self, FileOptions};
use crate::drain::Drain;
use crate::identity::{self, Ca, CertManager, Identity};
use crate::proxy::hbone::{self, H2Io};
use crate::state::{State, StateStore, Workload};
use crate::waypoint::{Options, Waypoint, WaypointId};

mod route_cases;
mod tcp;

const TD: &str = "cluster.local";
pub(crate) const REVIEWS_VIP: &str = "10.96.0.20:9080";
pub(crate) const RATINGS_VIP: &str = "10.96.0.30:9080";
pub(crate) const GRPC_VIP: &str = "10.96.0.40:9090";

/// How a backend answers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Behaviour {
    Ok,
    /// Always this status.
    Status(u16),
    /// Sleeps, then answers 200.
    Delay(Duration),
}

/// Answers with its name (`x-served-by`), what it saw (`x-seen-host`, `x-seen-version`, `x-seen-path`)
/// and counts requests.
async fn backend(addr: SocketAddr, name: &'static str, behaviour: Behaviour, hits: Arc<AtomicU64>) {
    let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind backend {addr}: {e}"));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let hits = hits.clone();
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                hits.fetch_add(1, Ordering::Relaxed);
                async move {
                    let host = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .or_else(|| req.headers().get("host").map(|h| h.to_str().unwrap().to_string()))
                        .unwrap_or_default();
                    let version = format!("{:?}", req.version());
                    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                    let body = req.into_body().collect().await?.to_bytes();
                    let status = match behaviour {
                        Behaviour::Ok => 200,
                        Behaviour::Status(s) => s,
                        Behaviour::Delay(d) => {
                            tokio::time::sleep(d).await;
                            200
                        }
                    };
                    let resp = http::Response::builder()
                        .status(status)
                        .header("x-served-by", name)
                        .header("x-seen-host", host)
                        .header("x-seen-version", version)
                        .header("x-seen-path", path)
                        .header("x-seen-body-len", body.len())
                        .body(Full::new(Bytes::from(name)))
                        .unwrap();
                    Ok::<_, hyper::Error>(resp)
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}

pub(crate) struct Fixture {
    pub waypoint: Arc<Waypoint>,
    pub addr: SocketAddr,
    pub certs: Arc<CertManager>,
    pub wp_identity: Identity,
    pub hits: HashMap<&'static str, Arc<AtomicU64>>,
    pub store: Arc<StateStore>,
    port: u16,
    drain: Drain,
    _dir: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let d = self.drain.clone();
        tokio::spawn(async move { d.drain_and_wait(Duration::from_millis(100)).await });
    }
}

/// The mesh: namespace `demo` (not captured) using waypoint `demo/waypoint`; `reviews` (v1, v2),
/// `ratings` (ratings-bad, ratings-good) on 9080 and `grpc` (appProtocol grpc) on 9090, backends on
/// 127.0.`net`.x:`port`; `extra` YAML documents appended.
fn mesh(net: u8, port: u16, extra: &str) -> String {
    let pod = |name: &str, app: &str, version: &str, host: u8| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {app}, version: {version}}}}}\n\
             spec: {{serviceAccountName: {app}, containers: [{{name: app, image: local}}]}}\n\
             status: {{phase: Running, podIP: 10.200.{net}.{host}}}\n"
        )
    };
    let svc = |name: &str, ip: &str, sport: u16, extra_port: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [{{name: http, port: {sport}, targetPort: {port}{extra_port}}}]}}\n"
        )
    };
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/use-waypoint: waypoint}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: waypoint, namespace: demo, labels: {istio.io/use-waypoint: none}}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: mesh, port: 15008, targetPort: 15008}]}\n",
    );
    for sa in ["reviews", "ratings", "grpc", "client", "waypoint"] {
        y += &format!("---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: demo}}\n");
    }
    y += &svc("reviews", "10.96.0.20", 9080, "");
    y += &svc("ratings", "10.96.0.30", 9080, "");
    y += &svc("grpc", "10.96.0.40", 9090, ", appProtocol: grpc");
    y += &pod("reviews-v1", "reviews", "v1", 2);
    y += &pod("reviews-v2", "reviews", "v2", 3);
    y += &pod("ratings-bad", "ratings", "v1", 4);
    y += &pod("ratings-good", "ratings", "v1", 5);
    y += &pod("grpc-1", "grpc", "v1", 6);
    y += extra;
    y
}

/// Backends: reviews-v1/v2 and grpc-1 OK; ratings-bad answers `bad`, ratings-good is OK.
pub(crate) async fn fixture(net: u8, extra: &str, bad: Behaviour) -> Fixture {
    fixture_with(net, extra, bad, Behaviour::Ok).await
}

pub(crate) async fn fixture_with(net: u8, extra: &str, bad: Behaviour, v1: Behaviour) -> Fixture {
    fixture_full(net, extra, bad, v1, &[]).await
}

/// `fixture_with`, the pods named in `captured` in the mesh (reached over HBONE on their IP:15008).
pub(crate) async fn fixture_full(net: u8, extra: &str, bad: Behaviour, v1: Behaviour, captured: &[&str]) -> Fixture {
    // One port for all backends (a Service has one targetPort): take a free one on the first address.
    let probe = std::net::TcpListener::bind((Ipv4Addr::new(127, 0, net, 2), 0)).unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let mut hits = HashMap::new();
    for (name, host, b) in [
        ("reviews-v1", 2, v1),
        ("reviews-v2", 3, Behaviour::Ok),
        ("ratings-bad", 4, bad),
        ("ratings-good", 5, Behaviour::Ok),
        ("grpc-1", 6, Behaviour::Ok),
    ] {
        let h = Arc::new(AtomicU64::new(0));
        backend(SocketAddr::from(([127, 0, net, host], port)), name, b, h.clone()).await;
        hits.insert(name, h);
    }
    let opts =
        FileOptions { trust_domain: TD.into(), node_name: "local".into(), root_namespace: "istio-system".into() };
    let state = file::parse(&mesh(net, port, extra), "test.yaml", &opts).unwrap_or_else(|e| panic!("mesh: {e}"));
    let mut state = on_loopback(state);
    for svc in state.services_by_vip.values_mut() {
        let mut s2 = (**svc).clone();
        for w in &mut s2.endpoints {
            if captured.contains(&w.name.as_str()) {
                Arc::make_mut(w).captured = true;
            }
        }
        *svc = Arc::new(s2);
    }
    let mut f = start(state).await;
    f.hits = hits;
    f.port = port;
    f
}

/// A waypoint `demo/waypoint` serving HBONE on 127.0.0.1:0 for `state`, with its own test CA.
pub(crate) async fn start(state: State) -> Fixture {
    let store = Arc::new(StateStore::new(state));
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(Ca::load_or_create(dir.path(), TD).unwrap());
    let certs = CertManager::new(ca.clone(), vec![ca.root()], TD.into(), Duration::from_secs(3600));
    let wp_identity = Identity::new(TD, "demo", "waypoint");
    let waypoint = Waypoint::new(Options {
        me: WaypointId { namespace: "demo".into(), name: "waypoint".into() },
        identity: wp_identity.clone(),
        root_namespace: "istio-system".into(),
        certs: certs.clone(),
        state: store.clone(),
    });
    let drain = Drain::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(waypoint.clone().serve_hbone(listener, drain.clone()));
    tokio::spawn(waypoint.clone().watch(drain.clone()));
    Fixture { waypoint, addr, certs, wp_identity, hits: HashMap::new(), store, port: 0, drain, _dir: dir }
}

/// Local mode refuses loopback pod IPs, so pods are declared on 10.200.N.H and moved to 127.0.N.H here.
fn on_loopback(mut state: State) -> State {
    let move_ip = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) if v4.octets()[..2] == [10, 200] => IpAddr::from([127, 0, v4.octets()[2], v4.octets()[3]]),
        other => *other,
    };
    let mut moved: HashMap<(String, String), Arc<Workload>> = HashMap::new();
    for w in state.workloads_by_ip.values() {
        let mut w2 = (**w).clone();
        w2.ips = w.ips.iter().map(move_ip).collect();
        moved.insert((w.namespace.clone(), w.name.clone()), Arc::new(w2));
    }
    state.workloads_by_ip = moved.values().flat_map(|w| w.ips.iter().map(move |ip| (*ip, w.clone()))).collect();
    for svc in state.services_by_vip.values_mut() {
        let mut s = (**svc).clone();
        s.endpoints = s.endpoints.iter().map(|w| moved[&(w.namespace.clone(), w.name.clone())].clone()).collect();
        *svc = Arc::new(s);
    }
    state
}

impl Fixture {
    /// A new HBONE tunnel to `vip` as the `demo/client` identity.
    pub async fn tunnel(&self, vip: &str) -> Result<H2Io, hbone::Error> {
        let me = Identity::new(TD, "demo", "client");
        let cert = self.certs.fetch(&me).await.unwrap();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(cert.client_config(std::slice::from_ref(&self.wp_identity)));
        let tls = connector.connect(identity::server_name(self.addr.ip()), tcp).await.unwrap();
        let (sender, conn) = hbone::client_builder().handshake(tls).await.unwrap();
        tokio::spawn(conn);
        let (send, recv) = hbone::connect(sender, vip.parse().unwrap(), &[]).await?;
        Ok(H2Io::new(send, recv))
    }

    pub async fn h1(&self, vip: &str) -> Client {
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(self.tunnel(vip).await.unwrap())).await.unwrap();
        tokio::spawn(conn);
        Client::H1(sender)
    }

    pub async fn h2(&self, vip: &str) -> Client {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(self.tunnel(vip).await.unwrap()))
                .await
                .unwrap();
        tokio::spawn(conn);
        Client::H2(sender)
    }

    /// The port every backend listens on.
    pub fn waypoint_backend_port(&self) -> u16 {
        self.port
    }

    pub fn hits(&self, name: &str) -> u64 {
        self.hits[name].load(Ordering::Relaxed)
    }
}

pub(crate) enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

#[derive(Debug)]
pub(crate) struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn served_by(&self) -> &str {
        self.headers.get("x-served-by").map(|v| v.to_str().unwrap()).unwrap_or("")
    }
}

impl Client {
    pub async fn send(&mut self, method: &str, host: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let mut b = http::Request::builder().method(method);
        b = match self {
            Client::H1(_) => b.uri(path).header("host", host),
            Client::H2(_) => b.uri(format!("http://{host}{path}")),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let fut = async {
            match self {
                Client::H1(s) => {
                    s.ready().await.unwrap();
                    s.send_request(req).await
                }
                Client::H2(s) => {
                    s.ready().await.unwrap();
                    s.send_request(req).await
                }
            }
        };
        let resp = tokio::time::timeout(Duration::from_secs(10), fut).await.expect("response within 10 s").unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
    }

    pub async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", host, path, headers, "").await
    }
}

const SUBSETS: &str = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: demo}\n\
spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n";

#[tokio::test]
async fn default_route_over_http1_and_http2_in_the_tunnel() {
    let f = fixture(11, "", Behaviour::Ok).await;
    let mut c1 = f.h1(REVIEWS_VIP).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let r = c1.get("reviews:9080", "/reviews/1?x=1", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.headers["x-seen-path"], "/reviews/1?x=1");
        assert_eq!(r.headers["x-seen-host"], "reviews:9080");
        assert_eq!(r.headers["x-seen-version"], "HTTP/1.1");
        assert!(r.headers.contains_key("x-request-id"));
        seen.insert(r.served_by().to_string());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["reviews-v1", "reviews-v2"], "default route: all endpoints");
    let mut c2 = f.h2(REVIEWS_VIP).await;
    let r = c2.send("POST", "reviews:9080", "/h2", &[], "hello").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.headers["x-seen-version"], "HTTP/1.1", "port `http` speaks HTTP/1.1 upstream");
    assert_eq!(r.headers["x-seen-host"], "reviews:9080");
    assert_eq!(r.headers["x-seen-body-len"], "5");
    // appProtocol grpc: HTTP/2 upstream, :authority kept.
    let mut g = f.h2(GRPC_VIP).await;
    let r = g.get("grpc:9090", "/pkg.Svc/Method", &[("content-type", "application/grpc")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.headers["x-seen-version"], "HTTP/2.0");
    assert_eq!(r.headers["x-seen-host"], "grpc:9090");
}

#[tokio::test]
async fn connect_to_an_unserved_or_bad_authority_is_refused() {
    let f = fixture(12, "", Behaviour::Ok).await;
    let e = f.tunnel("10.96.0.99:9080").await.unwrap_err();
    assert!(matches!(e, hbone::Error::Status { status, .. } if status == 404), "{e}");
    let e = f.tunnel("10.96.0.20:1234").await.unwrap_err();
    assert!(matches!(e, hbone::Error::Status { status, .. } if status == 404), "wrong port: {e}");
}

#[tokio::test]
async fn weighted_split_80_20_over_1000_requests() {
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\n\
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}, weight: 80}, {destination: {host: reviews, subset: v2}, weight: 20}]}]}\n";
    let f = fixture(13, &format!("{SUBSETS}{vs}"), Behaviour::Ok).await;
    let mut c = f.h2(REVIEWS_VIP).await;
    let mut v1 = 0;
    for _ in 0..1000 {
        let r = c.get("reviews", "/", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        if r.served_by() == "reviews-v1" {
            v1 += 1;
        }
    }
    assert!((770..=830).contains(&v1), "v1 got {v1}/1000, want 80% ± 3");
}

#[tokio::test]
async fn default_retries_hide_a_failing_endpoint() {
    let f = fixture(14, "", Behaviour::Status(503)).await;
    let mut c = f.h1(RATINGS_VIP).await;
    for i in 0..40 {
        let r = c.get("ratings", "/", &[]).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.served_by(), "ratings-good");
    }
    assert!(f.hits("ratings-bad") > 0, "round robin must have tried the bad endpoint");
}

#[tokio::test]
async fn route_timeout_answers_504() {
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\n\
spec: {hosts: [reviews], http: [{timeout: 200ms, route: [{destination: {host: reviews, subset: v1}}]}]}\n";
    let f = fixture_with(16, &format!("{SUBSETS}{vs}"), Behaviour::Ok, Behaviour::Delay(Duration::from_secs(3))).await;
    let mut c = f.h1(REVIEWS_VIP).await;
    let t = std::time::Instant::now();
    let r = c.get("reviews", "/", &[]).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.body, "upstream request timeout");
    assert!(t.elapsed() < Duration::from_millis(1500), "took {:?}", t.elapsed());
}

#[tokio::test]
async fn fault_abort_all_and_half() {
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\n\
spec: {hosts: [reviews], http: [\
{match: [{headers: {end-user: {exact: jason}}}], fault: {abort: {httpStatus: 418, percentage: {value: 100}}}, route: [{destination: {host: reviews}}]},\
{fault: {abort: {httpStatus: 500, percentage: {value: 50}}}, route: [{destination: {host: reviews}}]}]}\n";
    let f = fixture(17, vs, Behaviour::Ok).await;
    let mut c = f.h2(REVIEWS_VIP).await;
    let r = c.get("reviews", "/", &[("end-user", "jason")]).await;
    assert_eq!((r.status, r.body.as_str()), (418, "fault filter abort"));
    let mut aborted = 0;
    for _ in 0..400 {
        let r = c.get("reviews", "/", &[]).await;
        match r.status {
            500 => aborted += 1,
            200 => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert!((160..=240).contains(&aborted), "{aborted}/400 aborted, want ~50%");
}

#[tokio::test]
async fn l7_deny_policy_answers_403() {
    let ap = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-delete, namespace: demo}\n\
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}\n";
    let f = fixture(18, ap, Behaviour::Ok).await;
    let mut c = f.h1(REVIEWS_VIP).await;
    let r = c.send("DELETE", "reviews", "/x", &[], "").await;
    assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"));
    let r = c.get("reviews", "/x", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(f.hits("reviews-v1") + f.hits("reviews-v2"), 1, "the denied request never reached a backend");
}

#[tokio::test]
async fn outlier_detection_ejects_the_failing_endpoint() {
    let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ratings, namespace: demo}\n\
spec: {host: ratings, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}}\n\
---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings, namespace: demo}\n\
spec: {hosts: [ratings], http: [{retries: {attempts: 0}, route: [{destination: {host: ratings}}]}]}\n";
    let f = fixture(19, dr, Behaviour::Status(500)).await;
    let mut c = f.h1(RATINGS_VIP).await;
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(c.get("ratings", "/", &[]).await.status);
    }
    let bad = f.hits("ratings-bad");
    assert!((1..=3).contains(&bad), "ratings-bad got {bad} requests before ejection: {statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 200), "after ejection only the good endpoint: {statuses:?}");
}

#[tokio::test]
async fn unmatched_route_is_404_and_direct_response_is_served() {
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\n\
spec: {hosts: [reviews], http: [\
{match: [{uri: {prefix: /static}}], directResponse: {status: 204}},\
{match: [{uri: {prefix: /api}}], route: [{destination: {host: reviews}}]}]}\n";
    let f = fixture(20, vs, Behaviour::Ok).await;
    let mut c = f.h1(REVIEWS_VIP).await;
    assert_eq!(c.get("reviews", "/nothing", &[]).await.status, 404);
    assert_eq!(c.get("reviews", "/static/x", &[]).await.status, 204);
    assert_eq!(c.get("reviews", "/api/x", &[]).await.status, 200);
}

#[tokio::test]
async fn large_bodies_stream_and_metrics_count_requests() {
    let f = fixture(21, "", Behaviour::Ok).await;
    let mut c = f.h1(REVIEWS_VIP).await;
    let big = "x".repeat(1 << 20);
    let r = c.send("POST", "reviews", "/upload", &[], &big).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.headers["x-seen-body-len"], (1u32 << 20).to_string().as_str());
    let mut buf = Vec::new();
    prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &f.waypoint.registry().gather(), &mut buf).unwrap();
    let text = String::from_utf8(buf).unwrap();
    assert!(text.contains("istio_requests_total{"), "{text}");
    assert!(text.contains("response_code=\"200\""), "{text}");
}

#[tokio::test]
async fn local_rate_limit_answers_429_after_the_bucket_is_empty() {
    let ef = r#"---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: ratelimit, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: SIDECAR_INBOUND
        listener: {filterChain: {filter: {name: "envoy.filters.network.http_connection_manager"}}}
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.local_ratelimit
          typed_config:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
              token_bucket: {max_tokens: 3, tokens_per_fill: 3, fill_interval: 60s}
              filter_enabled: {runtime_key: e, default_value: {numerator: 100, denominator: HUNDRED}}
              filter_enforced: {runtime_key: f, default_value: {numerator: 100, denominator: HUNDRED}}
              response_headers_to_add: [{append: false, header: {key: x-local-rate-limit, value: 'true'}}]
"#;
    let f = fixture(22, ef, Behaviour::Ok).await;
    let mut c = f.h1(REVIEWS_VIP).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(c.get("reviews", "/", &[]).await.status);
        }
        v
    };
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let r = c.get("reviews", "/", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (429, "local_rate_limited"));
    assert_eq!(r.headers["x-local-rate-limit"], "true");
}

#[tokio::test]
async fn a_state_change_rebuilds_routes_and_bad_objects_are_left_out() {
    let f = fixture(23, "", Behaviour::Ok).await;
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\n\
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v2}}]}]}\n\
---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: broken, namespace: demo}\n\
spec: {hosts: [ratings], http: [{match: [{headers: {user-agent: {regex: '(unclosed'}}}], route: [{destination: {host: ratings}}]}]}\n";
    let port = f.waypoint_backend_port();
    let opts =
        FileOptions { trust_domain: TD.into(), node_name: "local".into(), root_namespace: "istio-system".into() };
    let next = file::parse(&mesh(23, port, &format!("{SUBSETS}{vs}")), "test.yaml", &opts).unwrap();
    f.store.replace(on_loopback(next));
    let mut c = f.h1(REVIEWS_VIP).await;
    // The rebuild runs on the watch task: give it a moment (bounded).
    let mut ok = false;
    for _ in 0..50 {
        let served: Vec<String> = {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(c.get("reviews", "/", &[]).await.served_by().to_string());
            }
            v
        };
        if served.iter().all(|s| s == "reviews-v2") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the new VirtualService (all to v2) was not applied");
    // The broken VirtualService is left out: ratings still routes by default.
    let mut r = f.h1(RATINGS_VIP).await;
    assert_eq!(r.get("ratings", "/", &[("user-agent", "x")]).await.status, 200);
}

/// A node agent's HBONE side for tests: mutual TLS as `id`, records the caller's identity, and
/// connects each CONNECT to its authority in plaintext.
async fn fake_node_agent(
    addr: SocketAddr,
    certs: Arc<CertManager>,
    id: Identity,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
) {
    let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let cert = certs.fetch(&id).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                seen.lock().unwrap().push(identity::peer_identity(tls.get_ref().1).unwrap().to_string());
                let mut conn = hbone::server_builder().handshake::<_, Bytes>(tls).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let dest: SocketAddr = req.uri().authority().unwrap().as_str().parse().unwrap();
                    let tcp = TcpStream::connect(dest).await.unwrap();
                    let send = respond.send_response(http::Response::new(()), false).unwrap();
                    tokio::spawn(hbone::copy(tcp, send, req.into_body()));
                }
            });
        }
    });
}

#[tokio::test]
async fn captured_endpoints_are_reached_over_hbone_with_the_waypoint_identity() {
    let f = fixture_full(24, "", Behaviour::Ok, Behaviour::Ok, &["reviews-v1", "reviews-v2"]).await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let reviews = Identity::new(TD, "demo", "reviews");
    for host in [2, 3] {
        let addr = SocketAddr::from(([127, 0, 24, host], crate::waypoint::upstream::HBONE_PORT));
        fake_node_agent(addr, f.certs.clone(), reviews.clone(), seen.clone()).await;
    }
    let mut c = f.h2(REVIEWS_VIP).await;
    for _ in 0..20 {
        let r = c.get("reviews", "/", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one pooled HBONE connection per node agent: {seen:?}");
    assert!(seen.iter().all(|s| s == "spiffe://cluster.local/ns/demo/sa/waypoint"), "{seen:?}");
    assert_eq!(f.hits("reviews-v1") + f.hits("reviews-v2"), 20);
}

#[tokio::test]
async fn an_endpoint_with_the_wrong_identity_is_a_connect_failure() {
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\n\
spec: {hosts: [reviews], http: [{retries: {attempts: 0}, route: [{destination: {host: reviews, subset: v1}}]}]}\n";
    let f = fixture_full(25, &format!("{SUBSETS}{vs}"), Behaviour::Ok, Behaviour::Ok, &["reviews-v1"]).await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let impostor = Identity::new(TD, "demo", "intruder");
    let addr = SocketAddr::from(([127, 0, 25, 2], crate::waypoint::upstream::HBONE_PORT));
    fake_node_agent(addr, f.certs.clone(), impostor, seen.clone()).await;
    let mut c = f.h1(REVIEWS_VIP).await;
    let r = c.get("reviews", "/", &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("connection failure"), "{r:?}");
    assert_eq!(f.hits("reviews-v1"), 0);
}

#[tokio::test]
async fn the_plaintext_front_door_routes_by_host() {
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\n\
spec: {hosts: [reviews], http: [{match: [{headers: {end-user: {exact: jason}}}], route: [{destination: {host: reviews, subset: v2}}]}, {route: [{destination: {host: reviews, subset: v1}}]}]}\n";
    let f = fixture(26, &format!("{SUBSETS}{vs}"), Behaviour::Ok).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(f.waypoint.clone().serve_http(listener, f.drain.clone()));
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(TcpStream::connect(addr).await.unwrap())).await.unwrap();
    tokio::spawn(conn);
    let mut c = Client::H1(sender);
    for host in ["reviews", "reviews.demo", "reviews.demo.svc.cluster.local", "reviews.demo.svc.cluster.local:9080"] {
        assert_eq!(c.get(host, "/", &[("end-user", "jason")]).await.served_by(), "reviews-v2", "{host}");
        assert_eq!(c.get(host, "/", &[]).await.served_by(), "reviews-v1", "{host}");
    }
    assert_eq!(c.get("nosuch.demo", "/", &[]).await.status, 404);
    assert_eq!(c.get("reviews:1234", "/", &[]).await.status, 404);
}

#[test]
fn paths_are_normalized_before_routing_and_policy() {
    let cases = [
        ("/public/%2e%2e/admin/users?x=1", "/admin/users?x=1"),
        ("/a/./b/../c", "/a/c"),
        ("/plain?q=%2e%2e", "/plain?q=%2e%2e"),
        ("/", "/"),
    ];
    for (input, want) in cases {
        let mut uri: http::Uri = input.parse().unwrap();
        super::normalize_path(&mut uri);
        assert_eq!(uri.path_and_query().unwrap().as_str(), want, "{input}");
    }
}
