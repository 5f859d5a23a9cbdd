//! `weft-probe`: servers and clients for weft's end-to-end suites, demo and bench. The harness
//! runs it inside pod network namespaces. Results are `key=value` lines on stdout.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use weft_tests::probe::{self, DEFAULT_LIFETIME, HttpFaults, Server};

#[derive(Parser)]
#[command(name = "weft-probe", about = "Traffic servers and clients for weft's network-namespace tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct ServeOpts {
    /// Port to listen on ([::], dual stack).
    #[arg(long)]
    port: u16,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = DEFAULT_LIFETIME.as_secs())]
    lifetime_secs: u64,
    /// Stop accepting after this many connections.
    #[arg(long, default_value_t = 1_000_000)]
    max_conns: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer every HTTP/1.1 request with `hello from NAME peer=ADDR`.
    HttpServe {
        #[command(flatten)]
        serve: ServeOpts,
        #[arg(long)]
        name: String,
        /// Answer every Nth request (across connections) with --fail-status; 0: never.
        #[arg(long, default_value_t = 0)]
        fail_every: u64,
        #[arg(long, default_value_t = 503)]
        fail_status: u16,
        /// Delay every answer by this many milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Print no line per request.
        #[arg(long)]
        quiet: bool,
    },
    /// Echo every byte back until EOF.
    Echo {
        #[command(flatten)]
        serve: ServeOpts,
    },
    /// Read to EOF, reply `bytes=N sha256=HEX`.
    Sink {
        #[command(flatten)]
        serve: ServeOpts,
    },
    /// Send N deterministic pseudo-random bytes to each connection, then close.
    Source {
        #[command(flatten)]
        serve: ServeOpts,
        #[arg(long)]
        bytes: u64,
    },
    /// Relay every connection to --to (plain TCP, user-space copy): the bench's no-TLS tunnel.
    Relay {
        #[command(flatten)]
        serve: ServeOpts,
        #[arg(long)]
        to: SocketAddr,
    },
    /// Send N bytes to a sink; print `bytes=N sent_sha256=HEX peer_sha256=HEX peer_bytes=N`.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Read a source to EOF; print `bytes=N sha256=HEX expected_sha256=HEX`.
    Recv {
        #[arg(long)]
        from: SocketAddr,
    },
    /// Relay stdin lines to an echo server over one connection, print the echoes.
    Chat {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100_000)]
        max_lines: u64,
    },
    /// Fixed-rate request/response on one connection; print `requests= p50_us= p99_us= max_us=`.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        /// Requests per second.
        #[arg(long)]
        rate: u32,
        /// Seconds.
        #[arg(long)]
        duration: f64,
        /// Request (and response) size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// New connections per second, each a 1-byte echo; print `connections= failures= per_sec=`.
    ConnectRate {
        #[arg(long)]
        to: SocketAddr,
        /// Seconds.
        #[arg(long)]
        duration: f64,
    },
}

fn serve(kind: Server, o: ServeOpts) -> Result<()> {
    probe::serve(kind, o.port, Duration::from_secs(o.lifetime_secs), o.max_conns)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::HttpServe { serve: o, name, fail_every, fail_status, delay_ms, quiet } => {
            let faults = HttpFaults { fail_every, fail_status, delay: Duration::from_millis(delay_ms), quiet };
            serve(Server::Http { name, faults }, o)
        }
        Cmd::Echo { serve: o } => serve(Server::Echo, o),
        Cmd::Sink { serve: o } => serve(Server::Sink, o),
        Cmd::Source { serve: o, bytes } => serve(Server::Source { bytes }, o),
        Cmd::Relay { serve: o, to } => serve(Server::Relay { to }, o),
        Cmd::Send { to, bytes } => {
            let (sha, reply) = probe::send(to, bytes)?;
            let get = |k: &str| reply.get(k).cloned().unwrap_or_else(|| "none".into());
            println!("bytes={bytes} sent_sha256={sha} peer_sha256={} peer_bytes={}", get("sha256"), get("bytes"));
            Ok(())
        }
        Cmd::Recv { from } => {
            let (n, sha) = probe::recv(from)?;
            println!("bytes={n} sha256={sha} expected_sha256={}", probe::expected_sha256(n));
            Ok(())
        }
        Cmd::Chat { to, max_lines } => probe::chat(to, max_lines),
        Cmd::Rr { to, rate, duration, size } => {
            let r = probe::rr(to, rate, Duration::from_secs_f64(duration), size)?;
            println!("requests={} p50_us={} p99_us={} max_us={}", r.requests, r.p50_us, r.p99_us, r.max_us);
            Ok(())
        }
        Cmd::ConnectRate { to, duration } => {
            let r = probe::connect_rate(to, Duration::from_secs_f64(duration))?;
            println!("connections={} failures={} per_sec={:.1}", r.connections, r.failures, r.per_sec);
            Ok(())
        }
    }
}
