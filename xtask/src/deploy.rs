//! deploy/: the generated install (CRDs, Helm chart, plain manifests, kustomization) and
//! `cargo xtask kind-e2e`.
//!
//! Owns: generating every file under deploy/ that is not hand-written, and proving the checked-in
//! copy is current (`cargo xtask codegen [--check]` calls [`codegen`]). Submodules: `manifests` (the
//! install as typed k8s-openapi objects, the one source), `crds` (CRDs from the agent's Rust types),
//! `chart` (rendering both into files), `kind` (the kind end-to-end run). Hand-written and not
//! generated: deploy/Dockerfile (+ .dockerignore), deploy/kind/ (cluster config, demo scenario),
//! deploy/README.md. Does not own: the agent's flags and defaults (`weft::config`,
//! `weft::ca_server`), which the manifests read.

mod chart;
mod crds;
mod kind;
mod manifests;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};

pub use kind::{Args as KindE2eArgs, run as kind_e2e};

/// Directories whose every file is generated: a file there that is no longer generated is stale.
const OWNED_DIRS: [&str; 4] =
    [chart::CRDS_DIR, chart::CHART_TEMPLATES_DIR, chart::CHART_CRDS_DIR, chart::MANIFESTS_DIR];

/// Writes the generated deploy/ files under `root`, or (`check`) fails listing what differs.
pub fn codegen(root: &Path, check: bool) -> Result<()> {
    let files = chart::files()?;
    let mut stale: Vec<&str> = Vec::new();
    for (path, content) in &files {
        if fs::read(root.join(path)).ok().as_deref() != Some(content.as_bytes()) {
            stale.push(path);
        }
    }
    let extra = extra_files(root, &files)?;
    if check {
        if stale.is_empty() && extra.is_empty() {
            eprintln!("codegen: {} generated file(s) under deploy/ are current", files.len());
            return Ok(());
        }
        bail!(
            "generated files under deploy/ are out of date (differ or missing: {stale:?}; no longer generated: \
             {extra:?}); run `cargo xtask codegen` and commit the result"
        );
    }
    for path in &stale {
        let full = root.join(path);
        if let Some(dir) = full.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::write(&full, &files[*path]).with_context(|| format!("writing {}", full.display()))?;
        eprintln!("codegen: wrote {path}");
    }
    for path in &extra {
        fs::remove_file(root.join(path)).with_context(|| format!("removing {path}"))?;
        eprintln!("codegen: removed {path} (no longer generated)");
    }
    if stale.is_empty() && extra.is_empty() {
        eprintln!("codegen: deploy/ was already current");
    }
    Ok(())
}

fn extra_files(root: &Path, files: &BTreeMap<String, String>) -> Result<Vec<String>> {
    let mut extra = Vec::new();
    for dir in OWNED_DIRS {
        let full = root.join(dir);
        if !full.exists() {
            continue;
        }
        for entry in fs::read_dir(&full).with_context(|| format!("reading {}", full.display()))? {
            let entry = entry?;
            let path = format!("{dir}/{}", entry.file_name().to_string_lossy());
            if entry.file_type()?.is_file() && !files.contains_key(&path) {
                extra.push(path);
            }
        }
    }
    extra.sort();
    Ok(extra)
}
