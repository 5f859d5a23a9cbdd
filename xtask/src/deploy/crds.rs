//! The CustomResourceDefinitions weft installs, from the agent's Rust types (`weft::crd`, derived with
//! `CustomResource + JsonSchema`).
//!
//! Owns: which types become CRDs and how their versions are served. Istio serves security.istio.io
//! AuthorizationPolicy and PeerAuthentication as `v1` (storage) and `v1beta1` with one schema, so
//! the derive's single `v1` version is copied to `v1beta1` and the two are merged with kube's
//! `merge_crds` (which checks group, kind and scope agree). Does not own: the schemas themselves
//! (the types in `agent/src/crd/`) or writing files (`deploy`).

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::core::crd::merge_crds;
use weft::crd::{AuthorizationPolicy, PeerAuthentication, security};

/// The version objects are stored as; every served version shares its schema.
const STORAGE_VERSION: &str = "v1";

/// Every CRD, with the file name it is written under (`<plural>.<group>.yaml`, as `metadata.name`).
pub fn crds() -> Result<Vec<(String, CustomResourceDefinition)>> {
    let all = [
        served_as(AuthorizationPolicy::crd(), &security::VERSIONS)?,
        served_as(PeerAuthentication::crd(), &security::VERSIONS)?,
    ];
    all.into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().context("a derived CRD has no metadata.name")?;
            Ok((format!("{name}.yaml"), crd))
        })
        .collect()
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
    // Newest first, as Istio lists them (and `kubectl explain` picks the first served version).
    merged.spec.versions.sort_by_key(|v| v.name != STORAGE_VERSION);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_kinds_are_served_as_v1_and_v1beta1_stored_as_v1() {
        let crds = crds().unwrap();
        let names: Vec<&str> = crds.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            names,
            ["authorizationpolicies.security.istio.io.yaml", "peerauthentications.security.istio.io.yaml"]
        );
        for (_, crd) in &crds {
            let versions: Vec<(&str, bool, bool)> =
                crd.spec.versions.iter().map(|v| (v.name.as_str(), v.served, v.storage)).collect();
            assert_eq!(versions, [("v1", true, true), ("v1beta1", true, false)], "{:?}", crd.metadata.name);
            assert_eq!(crd.spec.versions[0].schema, crd.spec.versions[1].schema);
            assert!(crd.spec.versions[0].schema.is_some());
        }
    }
}
