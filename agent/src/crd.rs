//! Rust types for the Kubernetes custom resources weft honours, with Istio's and Gateway API's exact
//! group, version, kind and field names, so users keep the YAML they already write.
//!
//! Owns: the serde/JSON-schema shape of each resource (`CustomResource` derive, so `cargo xtask
//! codegen` can print the CRDs) and nothing else. Does not own: validation beyond the shape, or what a
//! resource means (that is `policy` for the security resources), or fetching them (`discovery`).
//!
//! Spec structs reject unknown fields, so a typo (`notPrincipal`, `matchLabel`) is an error that names
//! the field instead of a silently wider or narrower policy.

pub mod duration;
pub mod gateway;
pub mod networking;
pub mod security;

pub use gateway::{Gateway, GatewaySpec, HTTPRoute, HTTPRouteSpec};
pub use networking::{
    DestinationRule, DestinationRuleSpec, EnvoyFilter, EnvoyFilterSpec, VirtualService, VirtualServiceSpec,
};
pub use security::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Condition, ExtensionProvider, MtlsMode, MutualTls, Operation,
    PeerAuthentication, PeerAuthenticationSpec, PolicyTargetReference, Rule, RuleFrom, RuleTo, Source,
    WorkloadSelector,
};
