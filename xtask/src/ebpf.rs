//! `cargo xtask build-ebpf [--check]`: builds weft's eBPF programs (`ebpf/programs`) into the
//! checked-in object `ebpf/weft.bpf.o`, installing the second toolchain it needs when missing,
//! and (with `--check`) proves the checked-in object is what the sources build to.
//!
//! Why the detours: the eBPF crate needs `-Z build-std=core` with library sources, which only
//! Debian's `rustc-web` (1.96, sysroot `/usr`) ships here, plus `bpf-linker` built against
//! LLVM 22. The object must not depend on where the repository is checked out: cargo hashes
//! absolute paths of path dependencies outside the building workspace into symbol names, so
//! the sources are copied to a fixed staging path first, and every remaining path is remapped.
//! DWARF is stripped from the result (BTF stays), keeping the checked-in object small.
//! This module builds the object; loading it is the agent's `redirect` module.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

/// Where `bpf-linker` is installed (`<root>/bin/bpf-linker`).
const TOOLS_ROOT: &str = "/var/cache/weft/tools";
const BPF_LINKER_VERSION: &str = "0.13.0";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// Library sources of the Debian compiler, needed by `-Z build-std`.
const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_PACKAGES: [&str; 4] = ["rustc-web", "cargo-web", "rust-web-src", "llvm-22-dev"];
/// Fixed staging path: part of what the object's symbol hashes are computed from.
const STAGE: &str = "/tmp/weft-ebpf-build";
const TARGET: &str = "bpfel-unknown-none";
/// The checked-in object, relative to the repository root.
pub const OBJECT: &str = "ebpf/weft.bpf.o";

/// Builds `ebpf/programs` and writes `ebpf/weft.bpf.o`; with `check`, builds from scratch in a
/// temporary target directory instead and fails if the result differs from the checked-in one.
pub fn build(check: bool) -> anyhow::Result<()> {
    let repo = repo_root();
    ensure_toolchain()?;
    let programs = stage_sources(&repo)?;
    let checked_in = repo.join(OBJECT);
    if check {
        let target = Path::new(STAGE).join(format!("check-target-{}", std::process::id()));
        let built = build_in(&programs, &target);
        let _ = fs::remove_dir_all(&target);
        let built = built?;
        let current = fs::read(&checked_in).with_context(|| format!("reading {}", checked_in.display()))?;
        if built != current {
            bail!(
                "{OBJECT} is stale: the eBPF sources build to a different object ({} bytes, checked in: {} bytes). \
                 Run `cargo xtask build-ebpf` and commit {OBJECT}.",
                built.len(),
                current.len()
            );
        }
        eprintln!("{OBJECT} is up to date ({} bytes)", current.len());
    } else {
        let target = repo.join("ebpf/programs/target");
        let built = build_in(&programs, &target)?;
        fs::write(&checked_in, &built).with_context(|| format!("writing {}", checked_in.display()))?;
        eprintln!("wrote {OBJECT} ({} bytes)", built.len());
    }
    Ok(())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the repository root").to_path_buf()
}

fn bpf_linker() -> PathBuf {
    Path::new(TOOLS_ROOT).join("bin/bpf-linker")
}

/// Installs the Debian compiler (with library sources and LLVM 22) and bpf-linker if missing.
fn ensure_toolchain() -> anyhow::Result<()> {
    let objcopy = Path::new(LLVM_PREFIX).join("bin/llvm-objcopy");
    let have_debian =
        [DEBIAN_RUSTC, DEBIAN_CARGO, DEBIAN_RUST_SRC].iter().all(|p| Path::new(p).exists()) && objcopy.exists();
    if !have_debian {
        eprintln!("installing {} (needs root)", APT_PACKAGES.join(" "));
        run(Command::new("apt-get").arg("update"), "apt-get update")?;
        run(Command::new("apt-get").args(["install", "-y"]).args(APT_PACKAGES), "apt-get install")?;
    }
    if !bpf_linker().exists() {
        eprintln!("installing bpf-linker {BPF_LINKER_VERSION} into {TOOLS_ROOT} (about 2 minutes)");
        // The host toolchain builds it (cargo install of a normal crate), linked to LLVM 22.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run(
            Command::new(cargo)
                .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--no-default-features"])
                .args(["--features", "llvm-22", "--root", TOOLS_ROOT])
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env("PATH", prepend_path(&Path::new(LLVM_PREFIX).join("bin"))),
            "cargo install bpf-linker",
        )?;
    }
    Ok(())
}

/// Mirrors `ebpf/common` and `ebpf/programs` (manifests, lock file, sources) into [`STAGE`],
/// rewriting only files whose content changed so cargo's fingerprints stay warm.
/// Returns the staged programs directory.
fn stage_sources(repo: &Path) -> anyhow::Result<PathBuf> {
    let stage = Path::new(STAGE).join("ebpf");
    for krate in ["common", "programs"] {
        let src = repo.join("ebpf").join(krate);
        let dst = stage.join(krate);
        // Stale files (a deleted module) must not survive in the stage.
        if dst.join("src").exists() {
            prune(&src.join("src"), &dst.join("src"))?;
        }
        for file in ["Cargo.toml", "Cargo.lock"] {
            if src.join(file).exists() {
                sync_file(&src.join(file), &dst.join(file))?;
            }
        }
        copy_tree(&src.join("src"), &dst.join("src"))?;
    }
    Ok(stage.join("programs"))
}

fn copy_tree(src: &Path, dst: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let (s, d) = (entry.path(), dst.join(entry.file_name()));
        if entry.file_type()?.is_dir() { copy_tree(&s, &d)? } else { sync_file(&s, &d)? }
    }
    Ok(())
}

/// Removes from `dst` what no longer exists in `src`.
fn prune(src: &Path, dst: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(dst).with_context(|| format!("reading {}", dst.display()))? {
        let entry = entry?;
        let s = src.join(entry.file_name());
        if !s.exists() {
            if entry.file_type()?.is_dir() { fs::remove_dir_all(entry.path())? } else { fs::remove_file(entry.path())? }
        } else if entry.file_type()?.is_dir() {
            prune(&s, &entry.path())?;
        }
    }
    Ok(())
}

fn sync_file(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    if fs::read(dst).ok().as_deref() != Some(&data[..]) {
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(dst, &data).with_context(|| format!("writing {}", dst.display()))?;
    }
    Ok(())
}

/// Runs the eBPF build with the Debian compiler and returns the stripped object's bytes.
fn build_in(programs: &Path, target: &Path) -> anyhow::Result<Vec<u8>> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    // rustc lets the last matching remap win: the target dir (which may sit inside the stage)
    // comes last.
    let flags = [
        "-C".to_string(),
        "debuginfo=2".into(),
        "-C".into(),
        "link-arg=--btf".into(),
        format!("--remap-path-prefix={STAGE}=/weft"),
        format!("--remap-path-prefix={}=/cargo/registry/src", cargo_home.join("registry/src").display()),
        format!("--remap-path-prefix={}=/target", target.display()),
    ];
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.current_dir(programs)
        .args(["build", "--locked", "--release", "--target", TARGET, "-Z", "build-std=core"])
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", prepend_path(&Path::new(TOOLS_ROOT).join("bin")))
        .env("CARGO_TARGET_DIR", target)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .env("CARGO_INCREMENTAL", "0");
    // Whatever the host build or the caller's shell set must not leak into this one.
    for var in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_MANIFEST_DIR",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    run(&mut cmd, "eBPF build")?;
    let linked = target.join(TARGET).join("release/weft");
    let stripped = target.join("weft.bpf.o");
    run(
        Command::new(Path::new(LLVM_PREFIX).join("bin/llvm-objcopy")).arg("--strip-debug").arg(&linked).arg(&stripped),
        "llvm-objcopy --strip-debug",
    )?;
    let bytes = fs::read(&stripped).with_context(|| format!("reading {}", stripped.display()))?;
    ensure!(bytes.starts_with(b"\x7fELF"), "{} is not an ELF object", stripped.display());
    Ok(bytes)
}

fn prepend_path(dir: &Path) -> OsString {
    let mut path = OsString::from(dir);
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    path
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    ensure!(status.success(), "{what} failed ({status}): {cmd:?}");
    Ok(())
}
