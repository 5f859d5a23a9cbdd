//! L4 passthrough: a `tcp-` service port through the waypoint (echo), an L4 DENY on the client's
//! principal, ALLOW rules that need HTTP, and HTTP ports on the same waypoint unaffected.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

const ECHO_VIP: &str = "10.96.0.50:9000";

/// An echo server on 127.0.`net`.7:0 and the YAML for service `echo` (port `tcp-echo` 9000) and its pod.
async fn echo(net: u8, policy: &str) -> (String, SocketAddr) {
    let listener = TcpListener::bind((std::net::Ipv4Addr::new(127, 0, net, 7), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..64 {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let yaml = format!(
        "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: echo, namespace: demo}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.50, selector: {{app: echo}}, ports: [{{name: tcp-echo, port: 9000, targetPort: {}}}]}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: echo-1, namespace: demo, labels: {{app: echo, version: v1}}}}\n\
         spec: {{serviceAccountName: echo, containers: [{{name: app, image: local}}]}}\n\
         status: {{phase: Running, podIP: 10.200.{net}.7}}\n{policy}",
        addr.port()
    );
    (yaml, addr)
}

async fn roundtrip(f: &Fixture, msg: &[u8]) -> Vec<u8> {
    let mut io = f.tunnel(ECHO_VIP).await.expect("CONNECT to the tcp- port accepted");
    io.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut got)).await.expect("echo within 5 s").unwrap();
    io.shutdown().await.unwrap();
    got
}

fn policy(action: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: demo}}\n\
         spec: {{targetRefs: [{{kind: Service, group: '', name: echo}}], action: {action}, rules: {rules}}}\n"
    )
}

fn denied(r: Result<H2Io, hbone::Error>) -> bool {
    matches!(r, Err(hbone::Error::Status { status, .. }) if status == http::StatusCode::FORBIDDEN)
}

#[tokio::test]
async fn tcp_port_is_passed_through_at_l4_and_http_ports_are_unaffected() {
    let (yaml, _) = echo(40, "").await;
    let f = fixture(40, &yaml, Behaviour::Ok).await;
    // Not HTTP: a request line would be answered by hyper; the echo proves the bytes went through.
    let msg = b"\x00\x01binary, not HTTP\r\n\r\n";
    assert_eq!(roundtrip(&f, msg).await, msg);
    assert_eq!(roundtrip(&f, b"second connection").await, b"second connection");
    let mut c = f.h1(REVIEWS_VIP).await;
    let r = c.get("reviews", "/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.served_by().starts_with("reviews-"), "{r:?}");

    // Metrics are recorded when the tunnel closes; give the server a moment.
    let mut text = String::new();
    for _ in 0..50 {
        text = crate::metrics::Metrics::encode_registry(f.waypoint.registry());
        if text.lines().any(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.ends_with(" 2")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened = text.lines().find(|l| l.starts_with("istio_tcp_connections_opened_total{")).expect("TCP metrics");
    assert!(opened.contains(r#"reporter="waypoint""#), "{opened}");
    assert!(opened.contains(r#"destination_service="echo.demo.svc.cluster.local""#), "{opened}");
    assert!(opened.contains(r#"destination_workload="echo""#), "{opened}");
    assert!(opened.contains(r#"source_principal="spiffe://cluster.local/ns/demo/sa/client""#), "{opened}");
    assert!(opened.ends_with(" 2"), "{opened}");
    let recv = text.lines().find(|l| l.starts_with("istio_tcp_received_bytes_total{")).unwrap();
    assert!(recv.ends_with(&format!(" {}", msg.len() + 17)), "{recv}");
    assert!(text.contains("istio_requests_total{"), "request metrics in the same registry");
}

#[tokio::test]
async fn l4_deny_on_principal_refuses_the_connection() {
    let deny = policy("DENY", "[{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]");
    let (yaml, _) = echo(41, &deny).await;
    let f = fixture(41, &yaml, Behaviour::Ok).await;
    assert!(denied(f.tunnel(ECHO_VIP).await), "DENY on the client's principal");
    // The policy targets the echo service only.
    let r = f.h1(REVIEWS_VIP).await.get("reviews", "/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let text = crate::metrics::Metrics::encode_registry(f.waypoint.registry());
    let line = text.lines().find(|l| l.starts_with("istio_tcp_connections_opened_total{")).expect("denial counted");
    assert!(line.contains(r#"response_flags="DENY""#), "{line}");
}

#[tokio::test]
async fn allow_rules_that_need_http_never_match_a_connection() {
    // ALLOW GET from the client: the rule needs HTTP, so it is dropped for TCP and nothing is allowed.
    let allow = policy("ALLOW", "[{from: [{source: {namespaces: [demo]}}], to: [{operation: {methods: [GET]}}]}]");
    let (yaml, _) = echo(42, &allow).await;
    let f = fixture(42, &yaml, Behaviour::Ok).await;
    assert!(denied(f.tunnel(ECHO_VIP).await), "ALLOW with HTTP-only fields allows no connection");

    // An L4-only ALLOW admits it; a DENY whose HTTP parts are dropped denies on its L4 parts.
    let allow_l4 = policy("ALLOW", "[{from: [{source: {namespaces: [demo]}}], to: [{operation: {ports: ['9000']}}]}]");
    let (yaml, _) = echo(43, &allow_l4).await;
    let f = fixture(43, &yaml, Behaviour::Ok).await;
    assert_eq!(roundtrip(&f, b"ping").await, b"ping");
    let deny_http = policy("DENY", "[{from: [{source: {namespaces: [demo]}}], to: [{operation: {methods: [POST]}}]}]");
    let (yaml, _) = echo(44, &deny_http).await;
    let f = fixture(44, &yaml, Behaviour::Ok).await;
    assert!(denied(f.tunnel(ECHO_VIP).await), "DENY keeps its L4 parts for TCP (istiod's behaviour)");
}
