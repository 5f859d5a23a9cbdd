//! `cargo xtask codegen [--check]`: regenerates checked-in generated code, or proves it is current.
//!
//! Owns: turning `proto/protos/**/*.proto` into `proto/src/generated/*.rs` with pure-Rust tools (protox
//! parses the protos, including the Google well-known types; tonic-prost-build emits prost messages and
//! tonic stubs), so neither builds nor CI need protoc. Does not own: what the protos say (`proto/`), or
//! the generated files under deploy/ (CRDs, Helm chart, plain manifests: `deploy`, run from here).
//!
//! `--check` generates into a temporary directory and fails, listing the files, when anything differs
//! from the checked-in copy (or a checked-in file is no longer generated).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where the protos live and where their Rust goes, relative to the workspace root.
const PROTO_ROOT: &str = "proto/protos";
const PROTO_OUT: &str = "proto/src/generated";

pub fn run(check: bool) -> Result<()> {
    let root = workspace_root();
    // Both run even when the first fails, so one --check reports everything that is stale.
    match (protos(&root, check), crate::deploy::codegen(&root, check)) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(p), Err(d)) => bail!("{p:#}\n{d:#}"),
    }
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent directory").to_path_buf()
}

fn protos(root: &Path, check: bool) -> Result<()> {
    let include = root.join(PROTO_ROOT);
    let out = root.join(PROTO_OUT);
    let mut files = Vec::new();
    collect_protos(&include, &mut files)?;
    files.sort();
    if files.is_empty() {
        bail!("no .proto files under {}; the proto crate's sources are missing", include.display());
    }
    let relative: Vec<PathBuf> =
        files.iter().map(|f| f.strip_prefix(&include).expect("collected under include").to_path_buf()).collect();
    let fds = protox::compile(&relative, [&include]).context("parsing the protos (protox)")?;

    let tmp = tempdir(root)?;
    let generated = (|| -> Result<BTreeMap<String, Vec<u8>>> {
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .build_transport(true)
            .emit_rerun_if_changed(false)
            .out_dir(&tmp)
            .compile_fds(fds)
            .context("generating Rust from the protos (tonic-prost-build)")?;
        read_dir_files(&tmp)
    })();
    let _ = fs::remove_dir_all(&tmp);
    let generated = generated?;

    let existing = if out.exists() { read_dir_files(&out)? } else { BTreeMap::new() };
    let mut stale: Vec<String> = Vec::new();
    for (name, content) in &generated {
        if existing.get(name) != Some(content) {
            stale.push(name.clone());
        }
    }
    let extra: Vec<String> = existing.keys().filter(|k| !generated.contains_key(*k)).cloned().collect();

    if check {
        if stale.is_empty() && extra.is_empty() {
            eprintln!("codegen: {} generated proto file(s) in {PROTO_OUT} are current", generated.len());
            return Ok(());
        }
        bail!(
            "generated code in {PROTO_OUT} is out of date (differs: {stale:?}; no longer generated: {extra:?}); \
             run `cargo xtask codegen` and commit the result"
        );
    }
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for name in &stale {
        let path = out.join(name);
        fs::write(&path, &generated[name]).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("codegen: wrote {PROTO_OUT}/{name}");
    }
    for name in &extra {
        let path = out.join(name);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        eprintln!("codegen: removed {PROTO_OUT}/{name} (no longer generated)");
    }
    if stale.is_empty() && extra.is_empty() {
        eprintln!("codegen: {PROTO_OUT} was already current");
    }
    Ok(())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn read_dir_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            files.insert(name, fs::read(entry.path())?);
        }
    }
    Ok(files)
}

/// A fresh directory under the target dir (same filesystem as the workspace, removed by the caller).
fn tempdir(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target").join(format!("xtask-codegen-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
