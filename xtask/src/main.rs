//! weft's developer tasks (`cargo xtask …`, aliased in .cargo/config.toml):
//! - `build-ebpf [--check]`: build the eBPF object (or prove the checked-in one is current)
//! - `codegen [--check]`: regenerate checked-in generated code (gRPC protos, deploy/), or prove it is current
//! - `kind-e2e`: install on a kind cluster and run the demo with real pods (needs Docker; not runnable here)
//! - `test`: everything CI runs, as root: unit, in-process and network-namespace suites
//! - `demo [--check]`: a local mesh of network-namespace pods, walked through step by step
//! - `bench l4`: no mesh vs weft (eBPF redirect) vs iptables REDIRECT on the same topology
//! - `bench waypoint`: weft waypoint vs Envoy on the same L7 route table
//! - `bench discovery`: the node agent against 10,000 pods and 1,000 services vs against 2 pods
//!
//! Each task lives in its own module; this file only parses the command line.

mod bench;
mod codegen;
mod demo;
mod deploy;
mod ebpf;
mod suite;
mod sys;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "weft developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build ebpf/programs into the checked-in object (--check: fail if it is not current).
    BuildEbpf {
        #[arg(long)]
        check: bool,
    },
    /// Regenerate the checked-in generated code from its sources (--check: fail if it is not current).
    Codegen {
        #[arg(long)]
        check: bool,
    },
    /// Run every test as root: build-ebpf --check, cargo test --workspace, then the
    /// network-namespace end-to-end suites one at a time. Installs missing system tools first.
    Test(suite::Args),
    /// Start a local mesh of network-namespace pods and walk through what weft does.
    Demo {
        /// Print one PASS/FAIL line per step, tear down, and exit non-zero on any failure.
        #[arg(long)]
        check: bool,
        /// Use a debug build of weft (quicker to build, slower to run).
        #[arg(long)]
        debug: bool,
    },
    /// Install weft on a kind cluster (image, kind load, kubectl apply -k deploy/) and run the demo
    /// with real pods. Needs Docker: it cannot run on this project's development machines.
    KindE2e(deploy::KindE2eArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// L4 data path: no mesh vs weft (eBPF) vs iptables REDIRECT, on one netns topology.
    L4(bench::Args),
    /// L7: weft waypoint vs Envoy on the same route table (header match + 80/20 split), one run.
    Waypoint(bench::waypoint::Args),
    /// Cluster scale: time to ready, agent RSS and policy enforcement, 10,000 pods vs 2 pods.
    Discovery(bench::discovery::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf { check } => ebpf::build(check),
        Cmd::Codegen { check } => codegen::run(check),
        Cmd::Test(args) => suite::run(args),
        Cmd::Demo { check, debug } => demo::run(check, !debug),
        Cmd::KindE2e(args) => deploy::kind_e2e(args),
        Cmd::Bench { which: BenchCmd::L4(args) } => bench::l4(args),
        Cmd::Bench { which: BenchCmd::Waypoint(args) } => bench::waypoint::run(args),
        Cmd::Bench { which: BenchCmd::Discovery(args) } => bench::discovery::run(args),
    }
}
