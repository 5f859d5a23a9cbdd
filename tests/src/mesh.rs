//! mesh.yaml for a [`Topology`]: the Kubernetes-shaped objects `weft node --config` reads
//! (Namespace, ServiceAccount, Pod, Service) plus policy documents in Istio's schema.
//!
//! Owns the rendering only; which policies a test wants is the test's business (the helpers
//! below build the common ones).

use anyhow::Result;
use serde_json::{Value, json};

use crate::topology::{Mode, Topology};

/// Namespace label that enrolls a namespace (Istio ambient's).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Pod annotation naming its network namespace under /var/run/netns.
pub const NETNS_ANNOTATION: &str = "weft.io/netns";

/// The whole multi-document YAML: topology objects first, then `extra` documents verbatim.
pub fn render(topo: &Topology, extra: &[String]) -> Result<String> {
    let mut docs: Vec<Value> = Vec::new();
    for (ns, mode) in topo.namespaces() {
        let mut meta = json!({ "name": ns });
        if *mode == Mode::Ambient {
            meta["labels"] = json!({ DATAPLANE_MODE_LABEL: "ambient" });
        }
        docs.push(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": meta }));
    }
    let mut sas: Vec<(&str, &str)> =
        topo.pods().iter().map(|p| (p.spec.namespace.as_str(), p.spec.service_account.as_str())).collect();
    sas.sort();
    sas.dedup();
    for (ns, sa) in sas {
        docs.push(json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": sa, "namespace": ns } }));
    }
    for p in topo.pods() {
        let ports: Vec<Value> = p
            .spec
            .ports
            .iter()
            .map(|(name, port)| json!({ "name": name, "containerPort": port, "protocol": "TCP" }))
            .collect();
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": p.spec.name,
                "namespace": p.spec.namespace,
                "labels": p.spec.labels,
                "annotations": { NETNS_ANNOTATION: p.netns },
            },
            "spec": {
                "serviceAccountName": p.spec.service_account,
                "containers": [{ "name": "app", "image": "local", "ports": ports }],
            },
            "status": {
                "phase": "Running",
                "podIP": p.ipv4.to_string(),
                "podIPs": [{ "ip": p.ipv4.to_string() }, { "ip": p.ipv6.to_string() }],
            },
        }));
    }
    for s in topo.services() {
        let ports: Vec<Value> = s
            .ports
            .iter()
            .map(|(port, target)| {
                let name = s.port_names.get(port).cloned().unwrap_or_else(|| format!("tcp-{port}"));
                json!({ "name": name, "port": port, "targetPort": target, "protocol": "TCP" })
            })
            .collect();
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": s.name, "namespace": s.namespace, "labels": s.labels },
            "spec": { "clusterIP": s.cluster_ip, "ports": ports, "selector": s.selector },
        }));
    }
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&d)?);
    }
    for e in extra {
        out.push_str("---\n");
        out.push_str(e.trim_start_matches("---\n").trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// Istio principal form (no `spiffe://`): `cluster.local/ns/<ns>/sa/<sa>`.
pub fn principal(ns: &str, sa: &str) -> String {
    format!("cluster.local/ns/{ns}/sa/{sa}")
}

/// A namespace-wide PeerAuthentication with `mtls.mode` = `mode` (STRICT, PERMISSIVE, DISABLE).
pub fn peer_authentication(namespace: &str, mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: {namespace}\nspec:\n  mtls:\n    mode: {mode}\n"
    )
}

/// An AuthorizationPolicy selecting pods with `app=<app>` in `namespace`, with `action` (ALLOW
/// or DENY) for requests from any of `principals` (Istio form, see [`principal`]).
pub fn authorization_policy(namespace: &str, name: &str, app: &str, action: &str, principals: &[String]) -> String {
    let list: Vec<String> = principals.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  \
         selector:\n    matchLabels:\n      app: {app}\n  action: {action}\n  rules:\n  - from:\n    - source:\n        principals: [{}]\n",
        list.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_documents_are_valid_yaml_in_istio_shape() {
        let v: Value = serde_yaml_ng::from_str(&authorization_policy(
            "demo",
            "allow-client",
            "server",
            "ALLOW",
            &[principal("demo", "client")],
        ))
        .unwrap();
        assert_eq!(v["kind"], "AuthorizationPolicy");
        assert_eq!(v["spec"]["selector"]["matchLabels"]["app"], "server");
        assert_eq!(v["spec"]["rules"][0]["from"][0]["source"]["principals"][0], "cluster.local/ns/demo/sa/client");
        let v: Value = serde_yaml_ng::from_str(&peer_authentication("demo", "STRICT")).unwrap();
        assert_eq!(v["spec"]["mtls"]["mode"], "STRICT");
        assert_eq!(v["metadata"]["namespace"], "demo");
    }
}
