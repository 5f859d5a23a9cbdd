//! The resource types the double serves, and the discovery documents that describe them
//! (`/api`, `/api/v1`, `/apis`, `/apis/G`, `/apis/G/V`), shaped as a Kubernetes 1.36 API server
//! answers them.

use serde_json::{Value, json};

/// One served resource type.
#[derive(Debug)]
pub struct ResourceType {
    /// API group; `""` for the core group.
    pub group: &'static str,
    /// Served versions, preferred first. Every version has the same schema (true of all types
    /// here), so one stored object is served at each with only `apiVersion` rewritten.
    pub versions: &'static [&'static str],
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource: writes to the main resource leave status alone, and writes to
    /// `/status` change nothing else.
    pub status: bool,
    pub short_names: &'static [&'static str],
    /// Only `create` (TokenReview): nothing is stored.
    pub create_only: bool,
    /// Field selectors beyond `metadata.name` / `metadata.namespace`.
    pub fields: &'static [&'static str],
}

const fn rt(
    group: &'static str,
    versions: &'static [&'static str],
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    namespaced: bool,
    status: bool,
) -> ResourceType {
    ResourceType {
        group,
        versions,
        kind,
        plural,
        singular,
        namespaced,
        status,
        short_names: &[],
        create_only: false,
        fields: &[],
    }
}

const V1: &[&str] = &["v1"];
const ISTIO_SECURITY: &[&str] = &["v1", "v1beta1"];
const ISTIO_NETWORKING: &[&str] = &["v1", "v1beta1", "v1alpha3"];
/// EnvoyFilter never left v1alpha3.
const ISTIO_ENVOY_FILTER: &[&str] = &["v1alpha3"];

pub static TYPES: &[ResourceType] = &[
    ResourceType {
        short_names: &["ns"],
        fields: &["status.phase"],
        ..rt("", V1, "Namespace", "namespaces", "namespace", false, true)
    },
    ResourceType {
        short_names: &["po"],
        fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ..rt("", V1, "Pod", "pods", "pod", true, true)
    },
    ResourceType {
        short_names: &["svc"],
        fields: &["spec.clusterIP", "spec.type"],
        ..rt("", V1, "Service", "services", "service", true, true)
    },
    ResourceType {
        short_names: &["sa"],
        ..rt("", V1, "ServiceAccount", "serviceaccounts", "serviceaccount", true, false)
    },
    ResourceType {
        short_names: &["ev"],
        fields: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ..rt("", V1, "Event", "events", "event", true, false)
    },
    ResourceType { fields: &["type"], ..rt("", V1, "Secret", "secrets", "secret", true, false) },
    ResourceType { short_names: &["cm"], ..rt("", V1, "ConfigMap", "configmaps", "configmap", true, false) },
    ResourceType {
        short_names: &["no"],
        fields: &["spec.unschedulable"],
        ..rt("", V1, "Node", "nodes", "node", false, true)
    },
    rt("discovery.k8s.io", V1, "EndpointSlice", "endpointslices", "endpointslice", true, false),
    // What `weft ctl waypoint apply` writes.
    rt("apps", V1, "Deployment", "deployments", "deployment", true, true),
    // The node agent's own DaemonSet: whether it still exists tells an uninstall from a restart.
    ResourceType { short_names: &["ds"], ..rt("apps", V1, "DaemonSet", "daemonsets", "daemonset", true, true) },
    rt(
        "rbac.authorization.k8s.io",
        V1,
        "ClusterRoleBinding",
        "clusterrolebindings",
        "clusterrolebinding",
        false,
        false,
    ),
    ResourceType {
        short_names: &["ev"],
        fields: &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "reason",
            "reportingController",
            "type",
        ],
        ..rt("events.k8s.io", V1, "Event", "events", "event", true, false)
    },
    ResourceType {
        create_only: true,
        ..rt("authentication.k8s.io", V1, "TokenReview", "tokenreviews", "tokenreview", false, false)
    },
    ResourceType {
        short_names: &["ap"],
        ..rt(
            "security.istio.io",
            ISTIO_SECURITY,
            "AuthorizationPolicy",
            "authorizationpolicies",
            "authorizationpolicy",
            true,
            true,
        )
    },
    ResourceType {
        short_names: &["pa"],
        ..rt(
            "security.istio.io",
            ISTIO_SECURITY,
            "PeerAuthentication",
            "peerauthentications",
            "peerauthentication",
            true,
            true,
        )
    },
    ResourceType {
        short_names: &["vs"],
        ..rt("networking.istio.io", ISTIO_NETWORKING, "VirtualService", "virtualservices", "virtualservice", true, true)
    },
    ResourceType {
        short_names: &["dr"],
        ..rt(
            "networking.istio.io",
            ISTIO_NETWORKING,
            "DestinationRule",
            "destinationrules",
            "destinationrule",
            true,
            true,
        )
    },
    rt("networking.istio.io", ISTIO_ENVOY_FILTER, "EnvoyFilter", "envoyfilters", "envoyfilter", true, true),
    ResourceType {
        short_names: &["gtw"],
        ..rt("gateway.networking.k8s.io", V1, "Gateway", "gateways", "gateway", true, true)
    },
    ResourceType {
        short_names: &["gc"],
        ..rt("gateway.networking.k8s.io", V1, "GatewayClass", "gatewayclasses", "gatewayclass", false, true)
    },
    rt("gateway.networking.k8s.io", V1, "HTTPRoute", "httproutes", "httproute", true, true),
    rt("gateway.networking.k8s.io", V1, "GRPCRoute", "grpcroutes", "grpcroute", true, true),
];

impl ResourceType {
    pub fn serves(&self, version: &str) -> bool {
        self.versions.contains(&version)
    }

    /// `apiVersion` of this type at `version`.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() { version.to_owned() } else { format!("{}/{version}", self.group) }
    }

    /// `pods`, or `authorizationpolicies.security.istio.io`: how errors name the resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.to_owned() } else { format!("{}.{}", self.plural, self.group) }
    }

    fn verbs(&self) -> Vec<&'static str> {
        if self.create_only {
            vec!["create"]
        } else {
            vec!["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        }
    }
}

/// The type served at `group/version` under `plural`.
pub fn by_plural(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    TYPES.iter().find(|t| t.group == group && t.plural == plural && t.serves(version))
}

/// The type an object's `apiVersion` and `kind` name; also returns the version.
pub fn by_kind(api_version: &str, kind: &str) -> Option<(&'static ResourceType, String)> {
    let (group, version) = split_api_version(api_version);
    TYPES.iter().find(|t| t.group == group && t.kind == kind && t.serves(version)).map(|t| (t, version.to_owned()))
}

/// `security.istio.io/v1` → (`security.istio.io`, `v1`); `v1` → (``, `v1`).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    api_version.rsplit_once('/').unwrap_or(("", api_version))
}

fn groups() -> Vec<&'static str> {
    let mut out: Vec<&str> = Vec::new();
    for t in TYPES {
        if !t.group.is_empty() && !out.contains(&t.group) {
            out.push(t.group);
        }
    }
    out
}

fn group_versions(group: &str) -> Vec<&'static str> {
    let mut out: Vec<&str> = Vec::new();
    for t in TYPES.iter().filter(|t| t.group == group) {
        for v in t.versions {
            if !out.contains(v) {
                out.push(v);
            }
        }
    }
    out
}

fn group_doc(group: &str) -> Value {
    let versions: Vec<Value> =
        group_versions(group).iter().map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v})).collect();
    json!({"name": group, "versions": versions.clone(), "preferredVersion": versions[0]})
}

/// `GET /api`.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// `GET /apis`.
pub fn group_list() -> Value {
    let groups: Vec<Value> = groups().into_iter().map(group_doc).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/{group}`.
pub fn group(group: &str) -> Option<Value> {
    if !groups().contains(&group) {
        return None;
    }
    let mut doc = group_doc(group);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// `GET /api/v1` or `GET /apis/{group}/{version}`, listing the types `installed` accepts.
pub fn resource_list(group: &str, version: &str, installed: impl Fn(&ResourceType) -> bool) -> Option<Value> {
    let types: Vec<&ResourceType> =
        TYPES.iter().filter(|t| t.group == group && t.serves(version) && installed(t)).collect();
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for t in types {
        let mut r = json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": t.verbs(),
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        resources.push(r);
        if t.status {
            resources.push(json!({
                "name": format!("{}/status", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}))
}
