//! The double against kube-rs itself: if kube's Api, watcher and discovery are happy, the wire
//! protocol is right.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::PartialObjectMeta;
use serde_json::json;

use super::*;

fn client(server: &ApiServer) -> kube::Client {
    let config = kube::Config::new(server.url().parse().expect("url"));
    kube::Client::try_from(config).expect("client")
}

fn pod(name: &str, node: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
    })
}

#[tokio::test]
async fn kube_discovery_and_typed_crud() {
    let server = ApiServer::start_new().await.unwrap();
    let c = client(&server);
    let discovery = kube::Discovery::new(c.clone()).run().await.expect("discovery");
    for g in [
        "",
        "discovery.k8s.io",
        "security.istio.io",
        "networking.istio.io",
        "gateway.networking.k8s.io",
        "events.k8s.io",
    ] {
        assert!(discovery.has_group(g), "group {g:?} discovered");
    }
    let (ar, caps) = discovery
        .resolve_gvk(&kube::api::GroupVersionKind::gvk("networking.istio.io", "v1alpha3", "VirtualService"))
        .expect("vs");
    assert_eq!(ar.plural, "virtualservices");
    assert!(caps.supports_operation(kube::discovery::verbs::WATCH));
    assert_eq!(c.apiserver_version().await.unwrap().minor, "36");

    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    let created = pods
        .create(&PostParams::default(), &serde_json::from_value(pod("a", "n1", json!({"app": "web"}))).unwrap())
        .await
        .unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Pending"), "status is the kubelet's to write");
    assert_eq!(created.spec.unwrap().service_account_name.as_deref(), Some("default"));
    pods.create(&PostParams::default(), &serde_json::from_value(pod("b", "n2", json!({"app": "db"}))).unwrap())
        .await
        .unwrap();
    let err = pods
        .create(&PostParams::default(), &serde_json::from_value(pod("a", "n1", json!({}))).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"), "{err}");

    let on_n1 = pods.list(&ListParams::default().fields("spec.nodeName=n1")).await.unwrap();
    assert_eq!(on_n1.items.iter().map(|p| p.metadata.name.clone().unwrap()).collect::<Vec<_>>(), ["a"]);
    assert!(on_n1.metadata.resource_version.is_some());
    let web = pods.list(&ListParams::default().labels("app in (web,x),!canary")).await.unwrap();
    assert_eq!(web.items.len(), 1);
    let err = pods.list(&ListParams::default().fields("spec.bogus=1")).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 400), "{err}");

    // Paging.
    let page = pods.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(page.items.len(), 1);
    let token = page.metadata.continue_.clone().expect("continue token");
    let rest = pods.list(&ListParams::default().limit(1).continue_token(&token)).await.unwrap();
    assert_eq!(rest.items[0].metadata.name.as_deref(), Some("b"));

    // Status subresource: only status changes; the main resource leaves status alone.
    let st = pods
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"podIP": "10.0.0.5", "phase": "Running"}, "spec": {"nodeName": "zzz"}})),
        )
        .await
        .unwrap();
    assert_eq!(st.status.as_ref().unwrap().pod_ip.as_deref(), Some("10.0.0.5"));
    assert_eq!(st.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
    let main = pods
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}, "status": {"podIP": "1.1.1.1"}})),
        )
        .await
        .unwrap();
    assert_eq!(main.status.unwrap().pod_ip.as_deref(), Some("10.0.0.5"));

    // Replace with a stale resourceVersion conflicts.
    let mut stale = created_clone(&pods, "a").await;
    stale.metadata.resource_version = Some("2".into());
    let err = pods.replace("a", &PostParams::default(), &stale).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"), "{err}");

    pods.delete("b", &DeleteParams::default()).await.unwrap();
    let err = pods.get("b").await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 404), "{err}");

    // Objects in a namespace that does not exist are refused, as NamespaceLifecycle does.
    let other: Api<ConfigMap> = Api::namespaced(c.clone(), "nope");
    let err = other
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 404), "{err}");

    // Metadata-only lists.
    let meta: Api<PartialObjectMeta<Namespace>> = Api::all(c.clone());
    let nss = meta.list_metadata(&ListParams::default()).await.unwrap();
    assert!(nss.items.iter().any(|n| n.metadata.name.as_deref() == Some("kube-system")));
}

async fn created_clone(pods: &Api<Pod>, name: &str) -> Pod {
    pods.get(name).await.unwrap()
}

#[tokio::test]
async fn server_side_apply_owns_fields_and_conflicts() {
    let server = ApiServer::start_new().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client(&server), "default");
    let cm = |data: Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": data});
    let a = cms.patch("cfg", &PatchParams::apply("alice"), &Patch::Apply(cm(json!({"k": "1"})))).await.unwrap();
    assert_eq!(a.metadata.managed_fields.as_ref().unwrap()[0].manager.as_deref(), Some("alice"));
    let err = cms.patch("cfg", &PatchParams::apply("bob"), &Patch::Apply(cm(json!({"k": "2"})))).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.message.contains("conflict with \"alice\"")),
        "{err}"
    );
    let b = cms.patch("cfg", &PatchParams::apply("bob").force(), &Patch::Apply(cm(json!({"k": "2"})))).await.unwrap();
    assert_eq!(b.data.unwrap()["k"], "2");
    let err = cms.patch("cfg", &PatchParams::default(), &Patch::Apply(cm(json!({})))).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 422), "apply needs a fieldManager: {err}");
    let rv = server.resource_version();
    cms.patch("cfg", &PatchParams::apply("bob"), &Patch::Apply(cm(json!({"k": "2"})))).await.unwrap();
    assert_eq!(server.resource_version(), rv, "a no-op apply does not bump the resourceVersion");
}

#[tokio::test]
async fn watches_replay_filter_bookmark_and_expire() {
    let server = ApiServer::start_new().await.unwrap();
    server.set_bookmark_interval(Duration::from_millis(200));
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");
    server.put(pod("a", "n1", json!({"app": "web"}))).unwrap();
    let list = pods.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();

    let wp = WatchParams::default().labels("app=web").timeout(5);
    let mut stream = pods.watch(&wp, &rv).await.unwrap().boxed();
    server.put(pod("b", "n1", json!({"app": "web"}))).unwrap();
    server.put(pod("a", "n1", json!({"app": "other"}))).unwrap();
    server.put(pod("a", "n1", json!({"app": "web"}))).unwrap();
    server.remove("v1", "Pod", Some("default"), "b").unwrap();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        match ev {
            WatchEvent::Added(p) => seen.push(format!("ADDED {}", p.metadata.name.unwrap())),
            WatchEvent::Modified(p) => seen.push(format!("MODIFIED {}", p.metadata.name.unwrap())),
            WatchEvent::Deleted(p) => seen.push(format!("DELETED {}", p.metadata.name.unwrap())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(
        seen,
        ["ADDED b", "DELETED a", "ADDED a", "DELETED b"],
        "selector transitions as the watch cache sends them"
    );

    let wp = WatchParams::default().timeout(5);
    let mut stream = pods.watch(&wp, &server.resource_version().to_string()).await.unwrap().boxed();
    let ev = tokio::time::timeout(Duration::from_secs(3), stream.try_next())
        .await
        .expect("bookmark in time")
        .unwrap()
        .unwrap();
    assert!(matches!(ev, WatchEvent::Bookmark(_)), "{ev:?}");

    server.compact();
    let mut stream = pods.watch(&wp, &rv).await.unwrap().boxed();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }

    let wp = WatchParams::default().timeout(1);
    let started = std::time::Instant::now();
    let mut stream = pods.watch(&wp, &server.resource_version().to_string()).await.unwrap().boxed();
    while stream.try_next().await.unwrap().is_some() {}
    assert!(started.elapsed() < Duration::from_secs(3), "timeoutSeconds ends the stream");
}

#[tokio::test]
async fn stop_refuses_and_start_serves_the_same_objects() {
    let server = ApiServer::start_new().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");
    server.put(pod("a", "n1", json!({}))).unwrap();
    let mut stream = pods.watch(&WatchParams::default(), &server.resource_version().to_string()).await.unwrap().boxed();
    server.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match stream.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "stop() cuts open watches");
    assert!(tokio::net::TcpStream::connect(server.addr()).await.is_err(), "port refuses while stopped");
    server.put(pod("b", "n1", json!({}))).unwrap();
    server.start().await.unwrap();
    let names: Vec<String> =
        pods.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|p| p.metadata.name).collect();
    assert_eq!(names, ["a", "b"]);
}

#[tokio::test]
async fn token_review_reports_registered_tokens() {
    let server = ApiServer::start_new().await.unwrap();
    server.register_token(
        "good",
        TokenUser::service_account("weft-system", "weft-node", Some(("weft-node-x", "u1")), Some(("n1", "nu1"))),
    );
    server.register_token(
        "old",
        TokenUser { expires: Some(SystemTime::UNIX_EPOCH), ..TokenUser::service_account("a", "b", None, None) },
    );
    server.register_token(
        "aud",
        TokenUser { audiences: vec!["weft-ca".into()], ..TokenUser::service_account("a", "b", None, None) },
    );
    let reviews: Api<TokenReview> = Api::all(client(&server));
    let review = |token: &str, audiences: Option<Vec<String>>| TokenReview {
        spec: TokenReviewSpec { token: token.into(), audiences },
        ..TokenReview::default()
    };
    let r = reviews.create(&PostParams::default(), &review("good", None)).await.unwrap().status.unwrap();
    assert_eq!(r.authenticated, Some(true));
    let user = r.user.unwrap();
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:weft-system:weft-node"));
    assert_eq!(user.extra.unwrap()["authentication.kubernetes.io/node-name"], ["n1"]);
    for (token, aud) in [("bad", None), ("old", None), ("aud", Some(vec!["other".to_owned()]))] {
        let r = reviews.create(&PostParams::default(), &review(token, aud)).await.unwrap().status.unwrap();
        assert_eq!(r.authenticated, Some(false), "{token}");
        assert!(r.error.is_some());
    }
    let r = reviews
        .create(&PostParams::default(), &review("aud", Some(vec!["weft-ca".into()])))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!((r.authenticated, r.audiences), (Some(true), Some(vec!["weft-ca".to_owned()])));
}

#[tokio::test]
async fn events_from_kube_recorder_are_stored() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let server = ApiServer::start_new().await.unwrap();
    let c = client(&server);
    let obj = server.put(pod("a", "n1", json!({}))).unwrap();
    let pod: Pod = serde_json::from_value(obj).unwrap();
    let recorder = Recorder::new(c.clone(), Reporter { controller: "weft".into(), instance: None });
    let ev = Event {
        type_: EventType::Warning,
        reason: "InvalidPolicy".into(),
        note: Some("spec.rules[0]: bad".into()),
        action: "Compile".into(),
        secondary: None,
    };
    let oref = kube::Resource::object_ref(&pod, &());
    recorder.publish(&ev, &oref).await.unwrap();
    recorder.publish(&ev, &oref).await.unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(c.clone(), "default");
    let list = events.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1, "a repeated event is one object with a series");
    assert_eq!(list.items[0].reason.as_deref(), Some("InvalidPolicy"));
}

#[tokio::test]
async fn events_k8s_io_events_are_validated_as_the_api_server_does() {
    let server = ApiServer::start_new().await.unwrap();
    let c = client(&server);
    let events: Api<kube::api::DynamicObject> =
        Api::namespaced_with(c, "default", &kube::api::ApiResource::erase::<k8s_openapi::api::events::v1::Event>(&()));
    let event = |patch: Value| {
        let mut e = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "x.1", "namespace": "default"},
            "eventTime": "2026-01-01T00:00:00.000000Z", "type": "Warning", "reason": "InvalidConfiguration",
            "action": "Validate", "reportingController": "weft.io/node", "reportingInstance": "node-a",
            "note": "spec.x: bad", "regarding": {"kind": "Pod", "namespace": "default", "name": "p"},
        });
        for (k, v) in patch.as_object().unwrap() {
            e[k] = v.clone();
        }
        serde_json::from_value::<kube::api::DynamicObject>(e).unwrap()
    };
    events.create(&PostParams::default(), &event(json!({}))).await.expect("a complete Event is accepted");
    for (patch, field) in [
        (json!({"eventTime": null}), "eventTime"),
        (json!({"reportingController": ""}), "reportingController"),
        (json!({"reportingController": "Weft IO/x y"}), "reportingController"),
        (json!({"action": null}), "action"),
        (json!({"type": "Error"}), "type"),
        (json!({"note": "x".repeat(1025)}), "note"),
        (json!({"regarding": {"kind": "Pod", "namespace": "other", "name": "p"}}), "regarding.namespace"),
    ] {
        let mut e = event(patch);
        e.metadata.name = Some(format!("x.{field}"));
        let err = events.create(&PostParams::default(), &e).await.expect_err(field);
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 422 && s.message.contains(field)), "{field}: {err}");
    }
}
