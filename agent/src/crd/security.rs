//! `security.istio.io`: AuthorizationPolicy and PeerAuthentication, field for field as in Istio's API
//! (`istio.io/api` `security/v1beta1/*.proto`, served as `v1` and `v1beta1` with the same schema).
//!
//! Owns the shape only. What the fields mean at L4 (and which are L7-only) is `policy`'s business.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of both resources.
pub const GROUP: &str = "security.istio.io";
/// The versions Istio serves for both resources; they share one schema.
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// Selects workloads by their labels (`istio.type.v1beta1.WorkloadSelector`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all carry for the policy to apply to it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// A reference to the resource a policy attaches to (`istio.type.v1beta1.PolicyTargetReference`).
/// Policies with a target reference are for waypoints and gateways; ztunnel (and so weft's node
/// agent) does not enforce them.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// API group of the target; empty for the core group.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `spec` of `AuthorizationPolicy`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "ap",
    category = "istio-io",
    category = "security-istio-io",
    namespaced,
    derive = "PartialEq",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to: in the policy's namespace, or in every namespace when the
    /// policy lives in the root namespace. Unset: every workload in that scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single form of `targetRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// A request matches the policy when at least one rule matches. No rules: never matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub action: Action,
    /// The external authorizer, for `action: CUSTOM` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
}

/// What an AuthorizationPolicy does with a match.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    #[serde(default)]
    pub name: String,
}

/// Matches when one `from`, one `to` and every `when` match; an empty rule always matches.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    /// Required by Istio's validation; `Option` so a missing one is reported, not defaulted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// Where a connection or request comes from. Fields are ANDed; values within a field are ORed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities, `<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT identities (`<iss>/<sub>`): HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// `<namespace>/<service-account>`, or `<service-account>` in the policy's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// Source IP of the connection: single IPs or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Client IP from `X-Forwarded-For` / PROXY protocol: HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<String>,
}

/// What is being accessed. Fields are ANDed; values within a field are ORed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as decimal strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// An extra condition on an Istio attribute (`source.ip`, `request.headers[x]`, ...).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// `spec` of `PeerAuthentication`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    shortname = "pa",
    category = "istio-io",
    category = "security-istio-io",
    namespaced,
    derive = "PartialEq",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Unset or empty: the whole namespace (the whole mesh in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per-port overrides, keyed by the workload's (target) port number. Workload policies only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "port_level_mtls_schema")]
    pub port_level_mtls: BTreeMap<u32, MutualTls>,
}

/// Kubernetes rejects `patternProperties`, which schemars emits for integer-keyed maps; the keys
/// are strings on the wire anyway, and `PeerAuthentication` validation checks the range.
fn port_level_mtls_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "Per-port overrides, keyed by the workload's (target) port number. Workload policies only.",
        "additionalProperties": generator.subschema_for::<MutualTls>(),
    })
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// The mutual TLS mode a PeerAuthentication asks for.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent policy (namespace, then mesh); PERMISSIVE when nothing is set.
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn authorization_policy_parses_istio_yaml() {
        let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-curl, namespace: demo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/demo/sa/curl"], notIpBlocks: ["10.0.0.0/8"]}
    to:
    - operation: {ports: ["8080"], methods: ["GET"]}
    when:
    - key: source.namespace
      notValues: [prod]
"#;
        let ap: AuthorizationPolicy = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(ap.spec.action, Action::Deny);
        assert_eq!(ap.spec.selector.as_ref().unwrap().match_labels["app"], "httpbin");
        let rule = &ap.spec.rules[0];
        let src = rule.from[0].source.as_ref().unwrap();
        assert_eq!(src.principals, ["cluster.local/ns/demo/sa/curl"]);
        assert_eq!(src.not_ip_blocks, ["10.0.0.0/8"]);
        assert_eq!(rule.to[0].operation.as_ref().unwrap().ports, ["8080"]);
        assert_eq!(rule.when[0].not_values, ["prod"]);
        // Round trip keeps Istio's field names.
        let back = serde_json::to_value(&ap).unwrap();
        assert_eq!(back["apiVersion"], "security.istio.io/v1");
        assert_eq!(back["spec"]["rules"][0]["from"][0]["source"]["notIpBlocks"][0], "10.0.0.0/8");
    }

    #[test]
    fn action_defaults_to_allow() {
        let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str("{}").unwrap();
        assert_eq!(spec.action, Action::Allow);
        assert!(spec.rules.is_empty());
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let yaml = "rules:\n- from:\n  - source:\n      principal: [x]\n";
        let de = serde_yaml_ng::Deserializer::from_str(yaml);
        let err = serde_path_to_error::deserialize::<_, AuthorizationPolicySpec>(de).unwrap_err();
        assert_eq!(err.path().to_string(), "rules[0].from[0].source.principal");
        assert!(err.inner().to_string().contains("unknown field `principal`"), "{err}");
    }

    #[test]
    fn peer_authentication_port_keys_parse_from_yaml_and_json() {
        let yaml =
            "selector: {matchLabels: {app: db}}\nmtls: {mode: STRICT}\nportLevelMtls:\n  5432: {mode: DISABLE}\n";
        let spec: PeerAuthenticationSpec = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(spec.mtls.unwrap().mode, MtlsMode::Strict);
        assert_eq!(spec.port_level_mtls[&5432].mode, MtlsMode::Disable);
        let json = r#"{"portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}"#;
        let spec: PeerAuthenticationSpec = serde_json::from_str(json).unwrap();
        assert_eq!(spec.port_level_mtls[&8080].mode, MtlsMode::Permissive);
    }

    #[test]
    fn bad_mode_is_rejected() {
        let err = serde_yaml_ng::from_str::<PeerAuthenticationSpec>("mtls: {mode: STRICTLY}\n").unwrap_err();
        assert!(err.to_string().contains("unknown variant `STRICTLY`"), "{err}");
    }

    #[test]
    fn crds_have_istio_names() {
        let ap = AuthorizationPolicy::crd();
        assert_eq!(ap.metadata.name.as_deref(), Some("authorizationpolicies.security.istio.io"));
        assert_eq!(ap.spec.names.short_names.as_deref(), Some(&["ap".to_owned()][..]));
        assert_eq!(ap.spec.scope, "Namespaced");
        let pa = PeerAuthentication::crd();
        assert_eq!(pa.metadata.name.as_deref(), Some("peerauthentications.security.istio.io"));
        // Structural schemas: no `additionalProperties: false` (kube strips the one deny_unknown_fields
        // adds), no `patternProperties`, no unresolved references.
        for crd in [&ap, &pa] {
            let schema = serde_json::to_string(&crd.spec.versions[0].schema).unwrap();
            for bad in ["\"additionalProperties\":false", "patternProperties", "$ref"] {
                assert!(!schema.contains(bad), "{bad} in {schema}");
            }
        }
        let plm = &pa.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap()
            .properties
            .as_ref()
            .unwrap()["spec"]
            .properties
            .as_ref()
            .unwrap()["portLevelMtls"];
        let items = plm.additional_properties.as_ref().expect("portLevelMtls values have a schema");
        let items = serde_json::to_value(items).unwrap();
        assert_eq!(
            items["properties"]["mode"]["enum"],
            serde_json::json!(["DISABLE", "PERMISSIVE", "STRICT", "UNSET"])
        );
    }
}
