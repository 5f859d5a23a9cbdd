use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::identity::Identity;
use crate::policy::{Connection, Decision, MtlsMode};
use crate::state::{Service, ServicePort, Workload};

fn opts() -> FileOptions {
    FileOptions {
        trust_domain: "cluster.local".into(),
        node_name: "node-a".into(),
        root_namespace: "istio-system".into(),
    }
}

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata: {name: backend, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: curl, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: demo
  labels: {app: curl}
  annotations: {weft.io/netns: weft-demo-client}
spec:
  serviceAccountName: curl
  containers: [{name: curl, image: curlimages/curl}]
status: {podIP: 10.10.1.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: legacy
  namespace: demo
  labels: {app: legacy, istio.io/dataplane-mode: none}
  annotations: {weft.io/netns: /proc/1234/ns/net}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.10.1.3}
---
---
apiVersion: v1
kind: Pod
metadata:
  name: httpbin-1
  namespace: backend
  labels: {app.kubernetes.io/name: httpbin, version: v1}
  annotations: {weft.io/netns: weft-demo-httpbin-1}
spec:
  nodeName: node-b
  containers: [{name: httpbin, image: x, ports: [{name: http, containerPort: 8080}]}]
status:
  podIP: 10.10.2.2
  podIPs: [{ip: 10.10.2.2}, {ip: "fd00:10:2::2"}]
---
apiVersion: v1
kind: Pod
metadata:
  name: httpbin-0
  namespace: backend
  labels: {app.kubernetes.io/name: httpbin, version: v2, service.istio.io/canonical-name: httpbin-canary}
spec:
  containers: [{name: httpbin, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.10.2.3}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: backend}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  selector: {app.kubernetes.io/name: httpbin}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: admin, port: 9000, targetPort: 9001}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: curl, namespace: demo}
spec:
  clusterIP: 10.96.0.11
  selector: {app: curl}
  ports: [{port: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-allow-curl, namespace: backend}
spec:
  selector: {matchLabels: {app.kubernetes.io/name: httpbin}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/curl]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: [10.10.1.3]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: backend}
spec: {mtls: {mode: STRICT}}
"#;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[allow(clippy::too_many_arguments)]
fn workload(
    ns: &str,
    name: &str,
    sa: &str,
    l: &[(&str, &str)],
    ips: &[&str],
    node: Option<&str>,
    netns: Option<&str>,
    captured: bool,
    workload_name: &str,
) -> Workload {
    Workload {
        name: name.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        labels: Arc::new(labels(l)),
        ips: ips.iter().map(|s| ip(s)).collect(),
        node: node.map(Into::into),
        uid: None,
        netns: netns.map(PathBuf::from),
        captured,
        identity: Identity { trust_domain: "cluster.local".into(), namespace: ns.into(), service_account: sa.into() },
        workload_name: workload_name.into(),
    }
}

#[test]
fn realistic_mesh_parses_into_the_expected_state() {
    let state = parse(MESH, "mesh.yaml", &opts()).unwrap();

    let client = workload(
        "demo",
        "client",
        "curl",
        &[("app", "curl")],
        &["10.10.1.2"],
        None,
        Some("/var/run/netns/weft-demo-client"),
        true,
        "curl",
    );
    let legacy = workload(
        "demo",
        "legacy",
        "default",
        &[("app", "legacy"), ("istio.io/dataplane-mode", "none")],
        &["10.10.1.3"],
        None,
        Some("/proc/1234/ns/net"),
        false,
        "legacy",
    );
    let httpbin1 = workload(
        "backend",
        "httpbin-1",
        "default",
        &[("app.kubernetes.io/name", "httpbin"), ("version", "v1")],
        &["10.10.2.2", "fd00:10:2::2"],
        Some("node-b"),
        Some("/var/run/netns/weft-demo-httpbin-1"),
        true,
        "httpbin",
    );
    let httpbin0 = workload(
        "backend",
        "httpbin-0",
        "default",
        &[
            ("app.kubernetes.io/name", "httpbin"),
            ("version", "v2"),
            ("service.istio.io/canonical-name", "httpbin-canary"),
        ],
        &["10.10.2.3"],
        None,
        None,
        true,
        "httpbin-canary",
    );

    assert_eq!(state.workloads_by_ip.len(), 5);
    for (addr, want) in [
        ("10.10.1.2", &client),
        ("10.10.1.3", &legacy),
        ("10.10.2.2", &httpbin1),
        ("fd00:10:2::2", &httpbin1),
        ("10.10.2.3", &httpbin0),
    ] {
        assert_eq!(state.workload_by_ip(ip(addr)).map(|w| &**w), Some(want), "{addr}");
    }
    // One Arc per pod, shared by its addresses.
    assert!(Arc::ptr_eq(&state.workloads_by_ip[&ip("10.10.2.2")], &state.workloads_by_ip[&ip("fd00:10:2::2")]));

    let httpbin = Service {
        name: "httpbin".into(),
        namespace: "backend".into(),
        vips: vec![ip("10.96.0.10"), ip("fd00:96::10")],
        ports: vec![
            ServicePort { name: Some("http".into()), port: 80, target_port: 8080, app_protocol: None },
            ServicePort { name: Some("admin".into()), port: 9000, target_port: 9001, app_protocol: None },
        ],
        labels: BTreeMap::new(),
        endpoints: vec![Arc::new(httpbin0.clone()), Arc::new(httpbin1.clone())],
    };
    let curl = Service {
        name: "curl".into(),
        namespace: "demo".into(),
        vips: vec![ip("10.96.0.11")],
        ports: vec![ServicePort { name: None, port: 8080, target_port: 8080, app_protocol: None }],
        labels: BTreeMap::new(),
        endpoints: vec![Arc::new(client.clone())],
    };
    assert_eq!(state.services_by_vip.len(), 3);
    assert_eq!(state.service_by_vip(ip("10.96.0.10")).map(|s| &**s), Some(&httpbin));
    assert_eq!(state.service_by_vip(ip("fd00:96::10")).map(|s| &**s), Some(&httpbin));
    assert_eq!(state.service_by_vip(ip("10.96.0.11")).map(|s| &**s), Some(&curl));
    assert_eq!(httpbin.target_port(80), Some(8080));

    assert_eq!(state.namespaces.len(), 3);
    assert_eq!(state.namespaces["demo"], labels(&[("istio.io/dataplane-mode", "ambient")]));
    assert!(state.namespaces["istio-system"].is_empty());

    // What this node serves: captured, on node-a or unpinned, in (namespace, name) order; only
    // the client has a netns yet (the agent waits for the other's, e.g. from the CNI plugin).
    let local: Vec<(String, bool)> =
        state.local_captured("node-a").iter().map(|w| (w.name.clone(), w.netns.is_some())).collect();
    assert_eq!(local, [("httpbin-0".to_string(), false), ("client".to_string(), true)]);

    // Policies came through compiled.
    let p = &state.policies;
    assert_eq!(p.authorization_policy_count(), 2);
    assert_eq!(p.mtls_mode("backend", &httpbin1.labels, 8080), MtlsMode::Strict);
    assert_eq!(p.mtls_mode("demo", &client.labels, 8080), MtlsMode::Permissive);
    let conn = |principal, src: &str| Connection {
        source_principal: principal,
        source_namespace: None,
        source_ip: ip(src),
        dest_ip: ip("10.10.2.2"),
        dest_port: 8080,
        dest_namespace: "backend",
        dest_labels: &httpbin1.labels,
    };
    assert_eq!(p.authorize(&conn(Some("cluster.local/ns/demo/sa/curl"), "10.10.1.2")), Decision::Allow);
    assert_eq!(p.authorize(&conn(None, "10.10.1.3")), Decision::Deny { policy: "istio-system/deny-legacy".into() });
    assert_eq!(
        p.authorize(&conn(Some("cluster.local/ns/demo/sa/default"), "10.10.1.9")),
        Decision::Deny { policy: "backend/httpbin-allow-curl".into() }
    );
}

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n";

fn pod(name: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: a}}}}\nspec: {{containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

fn svc(name: &str, vip: &str, ports: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{clusterIP: {vip}, selector: {{app: a}}, ports: {ports}}}\n"
    )
}

#[test]
#[rustfmt::skip]
fn bad_input_errors_name_file_document_object_and_field() {
    let cases: Vec<(&str, String, &str)> = vec![
        ("invalid pod IP", NS.to_owned() + &pod("client", "10.0.0.x"),
            r#"mesh.yaml: document 2 (Pod demo/client): status.podIP: invalid IP address "10.0.0.x""#),
        ("missing pod IP", NS.to_owned() + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nspec: {containers: []}\n",
            "mesh.yaml: document 2 (Pod demo/p): status.podIP: required: local mode has no IP allocator"),
        ("podIPs disagree with podIP", NS.to_owned() + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nstatus: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.2}]}\n",
            "mesh.yaml: document 2 (Pod demo/p): status.podIPs[0].ip: must equal status.podIP (10.0.0.1)"),
        ("unknown kind", NS.to_owned() + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: demo}\n",
            r#"mesh.yaml: document 2 (Deployment demo/d): kind: unsupported kind "Deployment""#),
        ("wrong apiVersion", NS.to_owned() + "---\napiVersion: apps/v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\n",
            r#"mesh.yaml: document 2 (Pod demo/p): apiVersion: "apps/v1" does not serve Pod; use v1"#),
        ("wrong policy version", NS.to_owned() + "---\napiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata: {name: p, namespace: demo}\nspec: {}\n",
            "mesh.yaml: document 2 (PeerAuthentication demo/p): apiVersion: \"security.istio.io/v2\" does not serve PeerAuthentication; use security.istio.io/v1 or security.istio.io/v1beta1"),
        ("duplicate object", NS.to_owned() + &pod("a", "10.0.0.1") + &pod("a", "10.0.0.2"),
            "mesh.yaml: document 3 (Pod demo/a): metadata.name: duplicate: Pod demo/a is already defined in document 2"),
        ("duplicate pod IP", NS.to_owned() + &pod("a", "10.0.0.1") + &pod("b", "10.0.0.1"),
            "mesh.yaml: document 3 (Pod demo/b): status.podIP: 10.0.0.1 is already the IP of Pod demo/a (document 2)"),
        ("duplicate service VIP", NS.to_owned() + &svc("s1", "10.96.0.1", "[{port: 80}]") + &svc("s2", "10.96.0.1", "[{port: 80}]"),
            "mesh.yaml: document 3 (Service demo/s2): spec.clusterIP: 10.96.0.1 is already the IP of Service demo/s1 (document 2)"),
        ("VIP is a pod IP", NS.to_owned() + &pod("a", "10.0.0.1") + &svc("s", "10.0.0.1", "[{port: 80}]"),
            "mesh.yaml: document 3 (Service demo/s): spec.clusterIP: 10.0.0.1 is already the IP of Pod demo/a (document 2)"),
        ("missing cluster IP", NS.to_owned() + "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {ports: [{port: 80}]}\n",
            "mesh.yaml: document 2 (Service demo/s): spec.clusterIP: required"),
        ("unresolvable named targetPort", NS.to_owned() + &pod("a", "10.0.0.1") + &svc("s", "10.96.0.1", "[{port: 80}, {port: 81, targetPort: http}]"),
            r#"mesh.yaml: document 3 (Service demo/s): spec.ports[1].targetPort: named port "http" cannot be resolved: no selected pod"#),
        ("undeclared namespace", pod("a", "10.0.0.1"),
            r#"mesh.yaml: document 1 (Pod demo/a): metadata.namespace: namespace "demo" is not declared"#),
        ("undeclared service account", NS.to_owned() + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nspec: {serviceAccountName: bot, containers: []}\nstatus: {podIP: 10.0.0.1}\n",
            "mesh.yaml: document 2 (Pod demo/p): spec.serviceAccountName: ServiceAccount demo/bot is not declared"),
        ("wrong type deep inside a pod", NS.to_owned() + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nspec: {containers: [{name: c, ports: [{containerPort: abc}]}]}\n",
            "mesh.yaml: document 2 (Pod demo/p): spec.containers[0].ports[0].containerPort: invalid type: string \"abc\""),
        ("typo in a policy", NS.to_owned() + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap, namespace: demo}\nspec: {rules: [{from: [{source: {principal: [x]}}]}]}\n",
            "mesh.yaml: document 2 (AuthorizationPolicy demo/ap): spec.rules[0].from[0].source.principal: unknown field `principal`"),
        ("invalid policy value", NS.to_owned() + &pod("a", "10.0.0.1") + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap, namespace: demo}\nspec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}\n",
            r#"mesh.yaml: document 3 (AuthorizationPolicy demo/ap): spec.rules[0].from[0].source.ipBlocks[0]: "10.0.0.0/33" is neither"#),
        ("conflicting namespace PeerAuthentications", NS.to_owned()
            + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: b, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n"
            + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: demo}\nspec: {mtls: {mode: PERMISSIVE}}\n",
            "mesh.yaml: document 2 (PeerAuthentication demo/b): spec.selector: ignored: a already sets the namespace mTLS mode"),
        ("bad netns annotation", NS.to_owned() + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo, annotations: {weft.io/netns: a/b}}\nstatus: {podIP: 10.0.0.1}\n",
            r#"mesh.yaml: document 2 (Pod demo/p): metadata.annotations.weft.io/netns: "a/b" is neither a network namespace name"#),
        ("YAML syntax error", NS.to_owned() + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p\n",
            "mesh.yaml: document 2: YAML: "),
        ("not an object", NS.to_owned() + "---\n- a\n- b\n",
            "mesh.yaml: document 2: expected a Kubernetes object"),
        ("missing kind", NS.to_owned() + "---\napiVersion: v1\nmetadata: {name: p}\n",
            "mesh.yaml: document 2: kind: required"),
        ("invalid name", "apiVersion: v1\nkind: Namespace\nmetadata: {name: Demo_1}\n".to_owned(),
            r#"mesh.yaml: document 1 (Namespace Demo_1): metadata.name: "Demo_1" is not a valid Namespace name"#),
    ];
    assert!(cases.len() >= 10);
    for (name, yaml, want) in cases {
        let err = parse(&yaml, "mesh.yaml", &opts()).err().unwrap_or_else(|| panic!("{name}: accepted"));
        let msg = err.to_string();
        assert!(msg.starts_with(want), "{name}:\n got: {msg}\nwant: {want}...");
    }
}

#[test]
fn empty_documents_are_skipped_and_counted() {
    // An empty document, the namespace, another empty one, the pod: the pod is document 4.
    let yaml = format!("---\n---\n{NS}---\n\n---\n{}", &pod("a", "10.0.0.x")[4..]);
    let err = parse(&yaml, "m.yaml", &opts()).unwrap_err();
    assert_eq!(err.document(), Some(4), "{err}");
    assert_eq!(err.field(), Some("status.podIP"));
    assert!(parse("", "m.yaml", &opts()).unwrap().workloads_by_ip.is_empty());
}

#[test]
fn named_target_ports_must_agree_across_endpoints() {
    let p = |name: &str, ip: &str, port: u16| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: a}}}}\nspec: {{containers: [{{name: c, ports: [{{name: web, containerPort: {port}}}]}}]}}\nstatus: {{podIP: {ip}}}\n"
        )
    };
    let yaml = NS.to_owned()
        + &p("a", "10.0.0.1", 8080)
        + &p("b", "10.0.0.2", 9090)
        + &svc("s", "10.96.0.1", "[{port: 80, targetPort: web}]");
    let msg = parse(&yaml, "m.yaml", &opts()).unwrap_err().to_string();
    assert!(
        msg.contains(r#"spec.ports[0].targetPort: named port "web" is 8080 on Pod demo/a but 9090 on Pod demo/b"#),
        "{msg}"
    );
}

#[test]
fn load_reports_unreadable_files() {
    let err = load(Path::new("/nonexistent/weft-mesh.yaml"), &opts()).unwrap_err();
    assert!(err.to_string().starts_with("/nonexistent/weft-mesh.yaml: cannot read: "), "{err}");
}

/// Replaces the file atomically, as editors and `kubectl`-style tools do, so the watcher never
/// sees half a file.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_for_version(rx: &mut tokio::sync::watch::Receiver<u64>, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap();
}

#[tokio::test]
async fn watch_keeps_the_last_good_state_and_picks_up_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    let good1 = NS.to_owned() + &pod("a", "10.0.0.1");
    let bad = NS.to_owned() + &pod("a", "10.0.0.x") + "# now broken\n";
    let good2 = NS.to_owned() + &pod("a", "10.0.0.1") + &pod("b", "10.0.0.2") + "# grown\n";

    write(&path, &good1);
    let store = Arc::new(StateStore::new(load(&path, &opts()).unwrap()));
    let mut rx = store.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(watch(path.clone(), opts(), store.clone(), async move {
        let _ = stopped.await;
    }));
    // Let the watcher take its first fingerprint of good1.
    tokio::time::sleep(POLL_INTERVAL).await;

    write(&path, &bad);
    tokio::time::sleep(POLL_INTERVAL * 4).await;
    assert!(!rx.has_changed().unwrap(), "a bad file must not replace the state");
    assert_eq!(store.load().workloads_by_ip.len(), 1);

    write(&path, &good2);
    wait_for_version(&mut rx, "the good file after a bad one").await;
    let state = store.load();
    assert_eq!(state.workloads_by_ip.len(), 2);
    assert_eq!(state.workload_by_ip(ip("10.0.0.2")).unwrap().name, "b");

    // SIGHUP re-reads even an unchanged file. The watcher's handler is installed by now (it has
    // run a reload), so the signal cannot take the default action and kill the test binary.
    store.replace(crate::state::State::default());
    rx.borrow_and_update();
    nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for_version(&mut rx, "the SIGHUP reload").await;
    assert_eq!(store.load().workloads_by_ip.len(), 2);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("watch returns on shutdown").unwrap();
}

#[test]
fn the_shipped_example_is_the_demo_mesh() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.yaml");
    let state = load(&path, &opts()).unwrap_or_else(|e| panic!("examples/mesh.yaml: {e}"));
    let captured: Vec<String> =
        state.local_captured("local").iter().map(|w| format!("{}/{}", w.namespace, w.name)).collect();
    assert_eq!(captured, ["demo/client", "demo/intruder", "demo/server-v1", "demo/server-v2"]);
    let svc = state.service_by_vip(ip("10.96.0.10")).expect("the server Service VIP");
    assert_eq!((svc.name.as_str(), svc.endpoints.len(), svc.target_port(80)), ("server", 2, Some(8080)));
    let server = &svc.endpoints[0];
    let conn = |principal| Connection {
        source_principal: Some(principal),
        source_namespace: Some("demo"),
        source_ip: ip("10.244.0.1"),
        dest_ip: server.ips[0],
        dest_port: 8080,
        dest_namespace: "demo",
        dest_labels: &server.labels,
    };
    assert_eq!(state.policies.authorize(&conn("cluster.local/ns/demo/sa/client")), Decision::Allow);
    assert!(matches!(state.policies.authorize(&conn("cluster.local/ns/demo/sa/intruder")), Decision::Deny { .. }));
    assert_eq!(state.policies.mtls_mode("demo", &server.labels, 8080), MtlsMode::Strict);
}

/// Traffic-management objects of every accepted group/version, as Istio's and the Gateway API's
/// docs write them.
const ROUTING: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}, weight: 80}, {destination: {host: reviews, subset: v2}, weight: 20}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings]
  http: [{fault: {delay: {fixedDelay: 7s, percentage: {value: 100}}}, route: [{destination: {host: ratings}}]}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: ratelimit, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  configPatches:
  - applyTo: HTTP_FILTER
    patch: {operation: ADD, value: {name: envoy.filters.http.local_ratelimit}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo}
spec:
  gatewayClassName: weft-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: productpage, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: productpage, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: productpage-v2, port: 9080}]
  - backendRefs: [{name: productpage-v1, port: 9080, weight: 90}, {name: productpage-v2, port: 9080, weight: 10}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-get-only, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: bookinfo}
spec: {rules: [{from: [{source: {namespaces: [bookinfo]}}]}]}
"#;

#[test]
fn routing_resources_fill_the_routing_config() {
    let state = parse(ROUTING, "mesh.yaml", &opts()).unwrap();
    let r = &state.routing;
    let names = |v: Vec<String>| v;
    fn meta(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
        format!("{}/{}", m.namespace.as_deref().unwrap_or(""), m.name.as_deref().unwrap_or(""))
    }
    assert_eq!(
        names(r.virtual_services.iter().map(|o| meta(&o.metadata)).collect()),
        ["bookinfo/reviews", "bookinfo/ratings"]
    );
    assert_eq!(r.virtual_services[0].spec.http[1].route[1].weight, Some(20));
    assert_eq!(
        r.virtual_services[1].spec.http[0].fault.as_ref().unwrap().delay.as_ref().unwrap().fixed_delay.as_deref(),
        Some("7s")
    );
    assert_eq!(r.destination_rules[0].spec.subsets.len(), 2);
    assert_eq!(r.envoy_filters[0].spec.config_patches[0].apply_to.as_deref(), Some("HTTP_FILTER"));
    assert_eq!(r.gateways[0].spec.gateway_class_name, "weft-waypoint");
    assert_eq!(r.http_routes[0].spec.rules[1].backend_refs[0].weight, Some(90));
    // Every AuthorizationPolicy, L4 and waypoint-targeted alike.
    assert_eq!(
        names(r.authorization_policies.iter().map(|o| meta(&o.metadata)).collect()),
        ["bookinfo/waypoint-get-only", "bookinfo/l4"]
    );
    // Stored in the served version the types describe.
    assert_eq!(serde_json::to_value(&r.virtual_services[1]).unwrap()["apiVersion"], "networking.istio.io/v1");
}

#[test]
#[rustfmt::skip]
fn bad_routing_resources_name_file_document_object_and_field() {
    let vs = |spec: &str| format!("{NS}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs, namespace: demo}}\nspec: {spec}\n");
    let cases: Vec<(&str, String, &str)> = vec![
        ("typo in a route", vs("{hosts: [a], http: [{route: [{destination: {host: a}, wieght: 1}]}]}"),
            "mesh.yaml: document 2 (VirtualService demo/vs): spec.http[0].route[0].wieght: unknown field `wieght`"),
        ("non-numeric weight", vs("{hosts: [a], http: [{route: [{destination: {host: a}, weight: high}]}]}"),
            "mesh.yaml: document 2 (VirtualService demo/vs): spec.http[0].route[0].weight: invalid type: string \"high\""),
        ("EnvoyFilter in v1", NS.to_owned() + "---\napiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: ef, namespace: demo}\nspec: {}\n",
            "mesh.yaml: document 2 (EnvoyFilter demo/ef): apiVersion: \"networking.istio.io/v1\" does not serve EnvoyFilter; use networking.istio.io/v1alpha3"),
        ("HTTPRoute in v1alpha2", NS.to_owned() + "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: HTTPRoute\nmetadata: {name: r, namespace: demo}\nspec: {}\n",
            "mesh.yaml: document 2 (HTTPRoute demo/r): apiVersion: \"gateway.networking.k8s.io/v1alpha2\" does not serve HTTPRoute; use gateway.networking.k8s.io/v1 or gateway.networking.k8s.io/v1beta1"),
        ("bad path match type", NS.to_owned() + "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: demo}\nspec: {rules: [{matches: [{path: {type: Prefix}}]}]}\n",
            "mesh.yaml: document 2 (HTTPRoute demo/r): spec.rules[0].matches[0].path.type: unknown variant `Prefix`"),
        ("DestinationRule without host", NS.to_owned() + "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: demo}\nspec: {subsets: []}\n",
            "mesh.yaml: document 2 (DestinationRule demo/dr): spec: missing field `host`"),
        ("Gateway in an undeclared namespace", "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w, namespace: other}\nspec: {gatewayClassName: weft-waypoint}\n".to_owned(),
            r#"mesh.yaml: document 1 (Gateway other/w): metadata.namespace: namespace "other" is not declared"#),
        ("duplicate VirtualService", vs("{hosts: [a]}") + &vs("{hosts: [b]}")[NS.len()..],
            "mesh.yaml: document 3 (VirtualService demo/vs): metadata.name: duplicate: VirtualService demo/vs is already defined in document 2"),
    ];
    for (name, yaml, want) in cases {
        let err = parse(&yaml, "mesh.yaml", &opts()).err().unwrap_or_else(|| panic!("{name}: accepted"));
        let msg = err.to_string();
        assert!(msg.starts_with(want), "{name}:\n got: {msg}\nwant: {want}...");
    }
}
