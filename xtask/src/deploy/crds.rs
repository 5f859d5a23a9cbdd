//! The CustomResourceDefinitions weft installs, from the agent's Rust types (`weft::crd`, derived with
//! `CustomResource + JsonSchema`).
//!
//! Owns: which types become CRDs and how their versions are served. Istio serves security.istio.io
//! AuthorizationPolicy and PeerAuthentication as `v1` (storage) and `v1beta1`, and networking.istio.io
//! VirtualService and DestinationRule as `v1` (storage), `v1beta1` and `v1alpha3`, each with one
//! schema, so the derive's single `v1` version is copied to the others and the copies are merged
//! with kube's `merge_crds` (which checks group, kind and scope agree). EnvoyFilter exists only as
//! `v1alpha3`. Does not own: the schemas themselves (the types in `agent/src/crd/`) or writing files
//! (`deploy`).
//!
//! The Gateway API CRDs (gateway.networking.k8s.io Gateway, HTTPRoute) are not generated: users
//! install the upstream ones, as with Istio, and weft only reads them.

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::core::crd::merge_crds;
use weft::crd::{
    AuthorizationPolicy, DestinationRule, EnvoyFilter, PeerAuthentication, VirtualService, networking, security,
};

/// The version objects are stored as; every served version shares its schema.
const STORAGE_VERSION: &str = "v1";

/// Every CRD, with the file name it is written under (`<plural>.<group>.yaml`, as `metadata.name`).
pub fn crds() -> Result<Vec<(String, CustomResourceDefinition)>> {
    let all = [
        served_as(AuthorizationPolicy::crd(), &security::VERSIONS)?,
        served_as(PeerAuthentication::crd(), &security::VERSIONS)?,
        served_as(VirtualService::crd(), &networking::VERSIONS)?,
        served_as(DestinationRule::crd(), &networking::VERSIONS)?,
        single_version(EnvoyFilter::crd(), networking::ENVOY_FILTER_VERSION)?,
    ];
    let mut files = all
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().context("a derived CRD has no metadata.name")?;
            Ok((format!("{name}.yaml"), crd))
        })
        .collect::<Result<Vec<_>>>()?;
    // File name order, as a directory listing shows them.
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// A CRD served (and stored) as its one derived version, checked to be `version`.
fn single_version(crd: CustomResourceDefinition, version: &str) -> Result<CustomResourceDefinition> {
    match crd.spec.versions.as_slice() {
        [only] if only.name == version && only.served && only.storage => Ok(crd),
        other => bail!(
            "{}: the derive should give exactly version {version}, served and stored, got {:?}; fix #[kube(version)] in agent/src/crd/",
            crd.metadata.name.as_deref().unwrap_or_default(),
            other.iter().map(|v| &v.name).collect::<Vec<_>>()
        ),
    }
}

/// `crd` (one version, [`STORAGE_VERSION`]) served under each of `versions` with the same schema.
fn served_as(crd: CustomResourceDefinition, versions: &[&str]) -> Result<CustomResourceDefinition> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    match crd.spec.versions.as_slice() {
        [only] if only.name == STORAGE_VERSION => {}
        other => bail!(
            "{name}: the derive should give exactly version {STORAGE_VERSION}, got {:?}; fix #[kube(version)] in agent/src/crd/",
            other.iter().map(|v| &v.name).collect::<Vec<_>>()
        ),
    }
    if !versions.contains(&STORAGE_VERSION) {
        bail!("{name}: the served versions {versions:?} must include the storage version {STORAGE_VERSION}");
    }
    let copies = versions
        .iter()
        .map(|v| {
            let mut copy = crd.clone();
            copy.spec.versions[0].name = (*v).to_owned();
            copy.spec.versions[0].storage = *v == STORAGE_VERSION;
            copy
        })
        .collect();
    let mut merged = merge_crds(copies, STORAGE_VERSION).with_context(|| format!("merging the versions of {name}"))?;
    // In the order given: the storage version (the newest) first, as `kubectl explain` picks the
    // first served version.
    merged.spec.versions.sort_by_key(|v| versions.iter().position(|n| *n == v.name));
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_kinds_are_served_as_istio_serves_them_stored_as_v1() {
        let crds = crds().unwrap();
        let names: Vec<&str> = crds.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            names,
            [
                "authorizationpolicies.security.istio.io.yaml",
                "destinationrules.networking.istio.io.yaml",
                "envoyfilters.networking.istio.io.yaml",
                "peerauthentications.security.istio.io.yaml",
                "virtualservices.networking.istio.io.yaml",
            ]
        );
        for (file, crd) in &crds {
            let versions: Vec<(&str, bool, bool)> =
                crd.spec.versions.iter().map(|v| (v.name.as_str(), v.served, v.storage)).collect();
            let want: &[(&str, bool, bool)] = match crd.spec.group.as_str() {
                "security.istio.io" => &[("v1", true, true), ("v1beta1", true, false)],
                _ if crd.spec.names.kind == "EnvoyFilter" => &[("v1alpha3", true, true)],
                _ => &[("v1", true, true), ("v1beta1", true, false), ("v1alpha3", true, false)],
            };
            assert_eq!(versions, want, "{file}");
            for v in &crd.spec.versions {
                assert_eq!(v.schema, crd.spec.versions[0].schema, "{file}");
            }
            assert!(crd.spec.versions[0].schema.is_some());
        }
    }
}
