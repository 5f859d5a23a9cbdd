use serde::de::DeserializeOwned;

use super::*;

fn args(extra: &[&str]) -> WaypointApplyArgs {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: WaypointApplyArgs,
    }
    let mut argv = vec!["weft", "-n", "bookinfo"];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).unwrap().a
}

/// Every document of the YAML, parsed back into its Kubernetes type (typos in field names fail).
fn docs(yaml: &str) -> Vec<serde_json::Value> {
    yaml.split("---\n").map(|d| serde_yaml_ng::from_str(d).unwrap()).collect()
}

fn typed<T: DeserializeOwned>(v: &serde_json::Value) -> T {
    let de = v.clone();
    serde_path_to_error::deserialize(de).unwrap_or_else(|e| panic!("{}: {e}", v["kind"]))
}

#[test]
fn default_waypoint_is_what_istioctl_creates() {
    let a = args(&[]);
    assert_eq!((a.name.as_str(), a.dry_run, a.enroll_namespace), ("waypoint", false, false));
    let w = Waypoint::new(&a).unwrap();
    let o = w.objects(false);
    assert!(o.namespace.is_none());

    let gw = &o.gateway;
    assert_eq!(gw.metadata.name.as_deref(), Some("waypoint"));
    assert_eq!(gw.metadata.namespace.as_deref(), Some("bookinfo"));
    assert_eq!(gw.spec.gateway_class_name, "weft-waypoint");
    let l = &gw.spec.listeners[0];
    assert_eq!((l.name.as_str(), l.port, l.protocol.as_str()), ("mesh", 15008, "HBONE"));
    assert_eq!(gw.metadata.labels.as_ref().unwrap()[WAYPOINT_FOR_LABEL], "service");

    let d = &o.deployment;
    let spec = d.spec.as_ref().unwrap();
    let pod_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "the Deployment's selector matches its pods");
    }
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some(DEFAULT_IMAGE));
    assert_eq!(c.args.as_deref().unwrap(), ["waypoint", "--namespace", "bookinfo", "--name", "waypoint"]);
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [15008, 15020, 15021]);
    let mounts: Vec<&str> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert!(config::DEFAULT_TOKEN_PATH.starts_with(mounts[0]), "{mounts:?}");
    assert!(config::DEFAULT_CA_ROOT_CERT.starts_with(mounts[1]), "{mounts:?}");
    let volumes = pod.volumes.as_ref().unwrap();
    assert_eq!(volumes.len(), 2);
    let token = &volumes[0].projected.as_ref().unwrap().sources.as_ref().unwrap()[0];
    assert_eq!(token.service_account_token.as_ref().unwrap().audience.as_deref(), Some("istio-ca"));
    assert_eq!(volumes[1].config_map.as_ref().unwrap().name, ca_server::DEFAULT_ROOT_CONFIGMAP);

    let svc = o.service.spec.as_ref().unwrap();
    assert_eq!(o.service.metadata.name.as_deref(), Some("waypoint"), "node agents find the waypoint by its Service");
    assert_eq!(svc.selector, spec.selector.match_labels);
    let port = &svc.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("mesh"), 15008));

    assert_eq!(o.service_account.metadata.name.as_deref(), Some("waypoint"));
    assert_eq!(o.service_account.metadata.namespace.as_deref(), Some("bookinfo"));
    let b = &o.cluster_role_binding;
    assert_eq!(b.metadata.name.as_deref(), Some("weft-waypoint-bookinfo-waypoint"));
    assert_eq!((b.role_ref.kind.as_str(), b.role_ref.name.as_str()), ("ClusterRole", WAYPOINT_CLUSTER_ROLE));
    let s = &b.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
        ("ServiceAccount", "waypoint", Some("bookinfo"))
    );
}

#[test]
fn yaml_round_trips_into_the_kubernetes_types() {
    let w = Waypoint::new(&args(&["--name", "reviews-wp", "--enroll-namespace", "--image", "reg/weft:1"])).unwrap();
    let o = w.objects(true);
    let all = docs(&o.to_yaml().unwrap());
    let kinds: Vec<&str> = all.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ServiceAccount", "ClusterRoleBinding", "Gateway", "Deployment", "Service", "Namespace"]);
    assert_eq!(typed::<ServiceAccount>(&all[0]), o.service_account);
    assert_eq!(typed::<ClusterRoleBinding>(&all[1]), o.cluster_role_binding);
    assert_eq!(typed::<Gateway>(&all[2]), o.gateway);
    assert_eq!(typed::<Deployment>(&all[3]), o.deployment);
    assert_eq!(typed::<Service>(&all[4]), o.service);
    let ns: Namespace = typed(&all[5]);
    assert_eq!(ns.metadata.name.as_deref(), Some("bookinfo"));
    assert_eq!(ns.metadata.labels.unwrap()["istio.io/use-waypoint"], "reviews-wp");
    assert_eq!(all[2]["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(all[3]["spec"]["template"]["spec"]["containers"][0]["image"], "reg/weft:1");
    // Nothing a server-side apply would have to own beyond what was asked for.
    assert!(all.iter().all(|d| d.get("status").is_none()), "no status in applied objects");
    assert_eq!(all[5]["metadata"].as_object().unwrap().len(), 2, "the namespace document only sets the label");
}

#[test]
fn names_are_checked_before_anything_is_built() {
    for bad in [&["--name", "Waypoint"][..], &["--name=-x"], &["--name", ""]] {
        let err = Waypoint::new(&args(bad)).unwrap_err();
        assert!(err.to_string().contains("is not a valid Kubernetes name"), "{err}");
    }
    let mut a = args(&[]);
    a.namespace = "Book_Info".into();
    assert!(matches!(Waypoint::new(&a), Err(CtlError::BadName { what: "namespace", .. })));
}
