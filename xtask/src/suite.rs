//! `cargo xtask test`: what CI runs. Installs missing system tools, mounts bpffs, checks the eBPF
//! object and the generated protobuf code are current, runs `cargo test` for the workspace, then
//! the network-namespace suites of `weft-tests` one test at a time (the agent's eBPF is node-global),
//! and ends with one `N passed, N failed` line. Every step runs even when an earlier one failed,
//! so one report shows everything that is broken.

use anyhow::Result;

use crate::sys::{self, Tally};

#[derive(clap::Args)]
pub struct Args {
    /// Build weft and the suites in release mode (slower to build, faster 1 GiB transfers).
    #[arg(long)]
    release: bool,
    /// Do not install missing system packages.
    #[arg(long)]
    no_install: bool,
    /// Skip `build-ebpf --check` (it installs a second compiler on first use).
    #[arg(long)]
    skip_ebpf_check: bool,
}

/// A pass/fail step that is not a test run (a generated artefact is current, …).
fn check_step(name: &'static str, check: impl FnOnce() -> Result<()>) -> Step {
    println!("==> {name}");
    let ok = match check() {
        Ok(()) => true,
        Err(e) => {
            println!("{name} failed: {e:#}");
            false
        }
    };
    Step { name, tally: Tally { passed: ok as u64, failed: !ok as u64, ignored: 0 }, ok }
}

struct Step {
    name: &'static str,
    tally: Tally,
    ok: bool,
}

pub fn run(args: Args) -> Result<()> {
    sys::require_root("test")?;
    if !args.no_install {
        sys::ensure_tools(sys::TOOLS)?;
    }
    weft_tests::agent::ensure_bpffs()?;
    let mut steps: Vec<Step> = Vec::new();

    if !args.skip_ebpf_check {
        steps.push(check_step("build-ebpf --check", || crate::ebpf::build(true)));
    }
    steps.push(check_step("codegen --check", || crate::codegen::run(true)));

    println!("==> cargo test --workspace (unit and in-process tests)");
    let mut c = sys::cargo();
    // --no-fail-fast: one failing test binary must not hide the results of the others.
    c.args(["test", "--no-fail-fast", "--workspace", "--exclude", "weft-tests"]);
    if args.release {
        c.arg("--release");
    }
    let (tally, ok) = sys::cargo_test(&mut c)?;
    steps.push(Step { name: "cargo test --workspace", tally, ok });

    println!("==> network-namespace suites (weft-tests, one test at a time)");
    let (tally, ok) = match sys::build_binaries(args.release) {
        Ok((weft, probe)) => {
            let mut c = sys::cargo();
            c.args(["test", "--no-fail-fast", "-p", "weft-tests"]).env("WEFT_BIN", &weft).env("WEFT_PROBE_BIN", &probe);
            if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
                // The harness's errors already say what failed and show the agent log; a
                // backtrace per anyhow error would bury that.
                c.env("RUST_LIB_BACKTRACE", "0");
            }
            if args.release {
                c.arg("--release");
            }
            c.args(["--", "--test-threads=1"]);
            sys::cargo_test(&mut c)?
        }
        Err(e) => {
            println!("cannot build the binaries the suites need: {e:#}");
            (Tally::default(), false)
        }
    };
    steps.push(Step { name: "weft-tests (netns e2e)", tally, ok });

    let mut total = Tally::default();
    println!("\n==> summary");
    for s in &mut steps {
        // A step that failed without a failing test (a build error) still counts as a failure.
        if !s.ok && s.tally.failed == 0 {
            s.tally.failed = 1;
        }
        println!(
            "  {:<26} {} ({} passed, {} failed, {} ignored)",
            s.name,
            if s.ok { "ok" } else { "FAILED" },
            s.tally.passed,
            s.tally.failed,
            s.tally.ignored
        );
        total.add(s.tally);
    }
    let failed: Vec<&str> = steps.iter().filter(|s| !s.ok).map(|s| s.name).collect();
    if !failed.is_empty() {
        println!("failed steps: {}", failed.join(", "));
    }
    // The last line CI reads; nothing may follow it.
    println!("{} passed, {} failed", total.passed, total.failed);
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
