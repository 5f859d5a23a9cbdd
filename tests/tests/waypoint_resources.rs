//! The waypoint's Kubernetes side against the in-process API server double: `discovery::kube`
//! watching the traffic-management resources (with the EnvoyFilter CRD absent, as the double does
//! not serve it: the first sync must not wait for it), and `weft ctl waypoint apply` server-side
//! applying a waypoint. No root needed.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use weft::crd::Gateway;
use weft::ctl::{Waypoint, apply};
use weft::state::{State, StateStore};
use weft_tests::apiserver::ApiServer;
use weft_tests::cluster::InProcessSource;

fn ns(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"team": "a"}}})
}

fn vs(name: &str, weight_v2: i32) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "bookinfo"},
        "spec": {"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": 100 - weight_v2},
            {"destination": {"host": "reviews", "subset": "v2"}, "weight": weight_v2},
        ]}]},
    })
}

async fn wait_for(store: &StateStore, what: &str, cond: impl Fn(&State) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond(&store.load()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn routing_resources_are_watched_and_a_missing_crd_does_not_block_the_sync() {
    let server = ApiServer::start_new().await.expect("API server double");
    // A cluster with Istio's traffic CRDs but not EnvoyFilter's.
    server.uninstall_crd("envoyfilters.networking.istio.io");
    server.put(ns("bookinfo")).unwrap();
    server.put(vs("reviews", 20)).unwrap();
    server
        .put(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "reviews", "namespace": "bookinfo"},
            "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]},
        }))
        .unwrap();
    server
        .put(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "bookinfo"},
            "spec": {"gatewayClassName": "weft-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        }))
        .unwrap();
    server
        .put(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "ratings", "namespace": "bookinfo"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "ratings"}],
                     "rules": [{"backendRefs": [{"name": "ratings", "port": 9080}]}]},
        }))
        .unwrap();
    // Synced within 5 s (else start panics) although envoyfilters.networking.istio.io is not served.
    let started = Instant::now();
    let source = InProcessSource::start(&server).await;
    let (client, store) = (source.client.clone(), source.store.clone());
    assert!(started.elapsed() < Duration::from_secs(3), "sync took {:?}", started.elapsed());
    // The source did ask for the missing CRD, and was told it is not there.
    assert!(server.requests().iter().any(|r| r.contains("/envoyfilters")), "EnvoyFilters never requested");
    let efs: Api<weft::crd::EnvoyFilter> = Api::all(client.clone());
    match efs.list(&Default::default()).await {
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        other => panic!("envoyfilters should answer 404 on this cluster: {other:?}"),
    }
    let state = store.load();
    let r = &state.routing;
    assert_eq!(r.virtual_services.len(), 1);
    assert_eq!(r.virtual_services[0].spec.http[0].route[1].weight, Some(20));
    assert_eq!(r.destination_rules[0].spec.subsets.len(), 2);
    assert_eq!(r.gateways[0].spec.gateway_class_name, "weft-waypoint");
    assert_eq!(r.http_routes[0].spec.rules[0].backend_refs[0].name, "ratings");
    assert!(r.envoy_filters.is_empty());

    // Changes arrive through the watch; a malformed object is left out, the rest stays.
    let vss: Api<weft::crd::VirtualService> = Api::namespaced(client.clone(), "bookinfo");
    let pp = PatchParams::apply("test").force();
    vss.patch("reviews", &pp, &Patch::Apply(vs("reviews", 50))).await.unwrap();
    wait_for(&store, "the new weights", |s| {
        s.routing.virtual_services.first().is_some_and(|v| v.spec.http[0].route[1].weight == Some(50))
    })
    .await;
    let mut typo = vs("typo", 10);
    typo["spec"]["http"][0]["route"][0]["wieght"] = json!(1);
    server.put(typo).unwrap();
    server.put(vs("second", 30)).unwrap();
    wait_for(&store, "the second VirtualService", |s| s.routing.virtual_services.len() == 2).await;
    let names: Vec<_> =
        store.load().routing.virtual_services.iter().map(|v| v.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["reviews", "second"], "the typo is left out");
}

#[tokio::test]
async fn weft_ctl_waypoint_apply_server_side_applies_the_waypoint() {
    let server = ApiServer::start_new().await.expect("API server double");
    server.put(ns("bookinfo")).unwrap();
    server.put(ns(weft::ca_server::DEFAULT_NAMESPACE)).unwrap();
    server
        .put(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": weft::ca_server::DEFAULT_ROOT_CONFIGMAP, "namespace": weft::ca_server::DEFAULT_NAMESPACE},
            "data": {"root-cert.pem": "-----BEGIN CERTIFICATE-----\n...\n"},
        }))
        .unwrap();
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let w = Waypoint {
        namespace: "bookinfo".into(),
        name: "waypoint".into(),
        image: "weft:test".into(),
        trust_domain: "cluster.local".into(),
    };
    let objects = w.objects(true);
    let done = apply(client.clone(), &w, &objects).await.expect("apply");
    assert_eq!(
        done,
        [
            "ConfigMap bookinfo/weft-ca-root-cert",
            "ServiceAccount bookinfo/waypoint",
            "ClusterRoleBinding weft-waypoint-bookinfo-waypoint",
            "Gateway bookinfo/waypoint",
            "Deployment bookinfo/waypoint",
            "Service bookinfo/waypoint",
            "Namespace bookinfo",
        ]
    );
    let gw: Gateway = Api::namespaced(client.clone(), "bookinfo").get("waypoint").await.unwrap();
    assert_eq!(gw.spec, objects.gateway.spec);
    let dep: Deployment = Api::namespaced(client.clone(), "bookinfo").get("waypoint").await.unwrap();
    assert_eq!(dep.spec, objects.deployment.spec);
    let svc: Service = Api::namespaced(client.clone(), "bookinfo").get("waypoint").await.unwrap();
    assert_eq!(svc.spec.unwrap().ports, objects.service.spec.as_ref().unwrap().ports);
    let _: ServiceAccount = Api::namespaced(client.clone(), "bookinfo").get("waypoint").await.unwrap();
    let b: ClusterRoleBinding = Api::all(client.clone()).get("weft-waypoint-bookinfo-waypoint").await.unwrap();
    assert_eq!(b.role_ref.name, "weft-waypoint");
    let cm: ConfigMap =
        Api::namespaced(client.clone(), "bookinfo").get(weft::ca_server::DEFAULT_ROOT_CONFIGMAP).await.unwrap();
    assert!(cm.data.unwrap()["root-cert.pem"].starts_with("-----BEGIN CERTIFICATE-----"));
    let n: Namespace = Api::all(client.clone()).get("bookinfo").await.unwrap();
    let labels = n.metadata.labels.unwrap();
    assert_eq!(labels["istio.io/use-waypoint"], "waypoint");
    assert_eq!(labels["team"], "a", "enrolling keeps the namespace's other labels");
    // Idempotent: a second apply changes nothing and succeeds.
    let again = apply(client, &w, &objects).await.expect("second apply");
    assert_eq!(again.len(), done.len());
}
