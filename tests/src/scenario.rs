//! The standard mesh the suites and the demo share, and the checks they repeat.
//!
//! Namespace `demo` (ambient): `client` (sa client), `server-v1` and `server-v2` (sa server,
//! app=server, behind Service `server` 10.96.0.10:80 → 8080), `intruder` (sa intruder).
//! Namespace `legacy` (not in the mesh): `legacy`. Suites add pods with the returned builder.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::mesh;
use std::net::SocketAddr;

use crate::process::{Background, Io, Output};
use crate::topology::{Mode, Pod, PodSpec, ServiceSpec, TopologyBuilder};
use crate::{Topology, poll};

pub const MESH_NS: &str = "demo";
pub const LEGACY_NS: &str = "legacy";
pub const SERVER_VIP: &str = "10.96.0.10";
pub const SERVER_PORT: u16 = 80;
pub const SERVER_TARGET_PORT: u16 = 8080;
/// curl's exit code for "could not connect" (refused).
pub const CURL_COULDNT_CONNECT: i32 = 7;
/// curl's exit codes for a prompt refusal by a live agent: refused (7), closed without a reply
/// (52) or reset (56). An agent that accepts on its in-pod listener and then refuses (as
/// ztunnel does for STRICT plaintext or a denied connection) yields 52 or 56, depending on
/// whether its close or the request arrives first; a timeout (28) is not a refusal.
pub const CURL_REFUSED: [i32; 3] = [7, 52, 56];

/// True when curl's exit says the connection was refused promptly (see [`CURL_REFUSED`]).
pub fn refused(out: &Output) -> bool {
    out.code.is_some_and(|c| CURL_REFUSED.contains(&c))
}

/// The demo's topology under `name` (see the module doc).
pub fn demo(name: &str) -> TopologyBuilder {
    Topology::builder(name)
        .namespace(MESH_NS, Mode::Ambient)
        .namespace(LEGACY_NS, Mode::Plain)
        .pod(PodSpec::new("client", MESH_NS).sa("client"))
        .pod(
            PodSpec::new("server-v1", MESH_NS)
                .sa("server")
                .label("app", "server")
                .label("version", "v1")
                .port("http", SERVER_TARGET_PORT),
        )
        .pod(
            PodSpec::new("server-v2", MESH_NS)
                .sa("server")
                .label("app", "server")
                .label("version", "v2")
                .port("http", SERVER_TARGET_PORT),
        )
        .pod(PodSpec::new("intruder", MESH_NS).sa("intruder"))
        .pod(PodSpec::new("legacy", LEGACY_NS).sa("legacy").port("http", SERVER_TARGET_PORT))
        .service(
            ServiceSpec::new("server", MESH_NS, SERVER_VIP)
                .port(SERVER_PORT, SERVER_TARGET_PORT)
                .selector("app", "server"),
        )
}

/// `http://10.96.0.10/`.
pub fn server_url() -> String {
    format!("http://{SERVER_VIP}:{SERVER_PORT}/")
}

/// `http://<pod ip>:<port>/`.
pub fn pod_url(pod: &Pod, port: u16) -> String {
    format!("http://{}/", pod.addr(port))
}

/// A PeerAuthentication in the mesh namespace.
pub fn peer_auth(mode: &str) -> String {
    mesh::peer_authentication(MESH_NS, mode)
}

/// An AuthorizationPolicy on app=server allowing (or denying) the listed service accounts of
/// the mesh namespace.
pub fn server_policy(action: &str, sas: &[&str]) -> String {
    let principals: Vec<String> = sas.iter().map(|sa| mesh::principal(MESH_NS, sa)).collect();
    mesh::authorization_policy(
        MESH_NS,
        &format!("server-{}", action.to_ascii_lowercase()),
        "server",
        action,
        &principals,
    )
}

/// curl `url` from `from`; Ok(body) when it answered with a body starting `hello from`.
pub fn get(from: &Pod, url: &str, marker: &str) -> Result<String> {
    let out = from.curl(url, marker)?;
    if out.success() && out.stdout.starts_with("hello from") {
        Ok(out.stdout)
    } else {
        bail!("{} → {url} did not get an answer: {out}", from.name())
    }
}

/// curl `url` from `from` and expect a prompt refusal ([`refused`]); returns the transcript.
pub fn get_fails(from: &Pod, url: &str, marker: &str) -> Result<Output> {
    let out = from.curl(url, marker)?;
    if out.stdout.contains("hello from") {
        bail!("{} → {url} was answered but should have been refused: {}", from.name(), out.stdout.trim());
    }
    if !refused(&out) {
        bail!("{} → {url} should have been refused promptly (curl exit 7, 52 or 56): {out}", from.name());
    }
    Ok(out)
}

/// Retries until `from` gets an answer from `url` (config reloads take effect asynchronously).
pub fn eventually_get(from: &Pod, url: &str, limit: Duration) -> Result<String> {
    let mut last = String::new();
    poll(limit, Duration::from_millis(250), || match get(from, url, "weft-eventually") {
        Ok(body) => Some(body),
        Err(e) => {
            last = format!("{e:#}");
            None
        }
    })
    .ok_or_else(|| anyhow::anyhow!("not answered within {limit:?}: {last}"))
}

/// Retries until `url` stops answering `from`.
pub fn eventually_refused(from: &Pod, url: &str, limit: Duration) -> Result<Output> {
    let mut last = String::new();
    poll(limit, Duration::from_millis(250), || match get_fails(from, url, "weft-eventually") {
        Ok(out) => Some(out),
        Err(e) => {
            last = format!("{e:#}");
            None
        }
    })
    .ok_or_else(|| anyhow::anyhow!("still answered after {limit:?}: {last}"))
}

/// A long-lived line-echo session from `from` to `to` (the probe's `chat` against an `echo`
/// server), opened and checked once: used to prove an established connection survives.
pub struct Session {
    chat: Background,
    what: &'static str,
}

impl Session {
    pub fn open(from: &Pod, to: SocketAddr, what: &'static str) -> Result<Session> {
        let args = [crate::probe_bin().display().to_string(), "chat".into(), "--to".into(), to.to_string()];
        let mut chat = from.spawn("chat", &args, Io::Piped)?;
        let first = chat.recv_line(SESSION_LIMIT)?;
        if !first.starts_with("connected") {
            bail!("{what}: chat did not connect to {to}: {first}");
        }
        let mut s = Session { chat, what };
        s.ping(0);
        Ok(s)
    }

    /// Sends a numbered line and requires it back within 10 s; panics naming the session and
    /// the ping when the connection broke.
    pub fn ping(&mut self, n: u32) {
        let line = format!("{} {n}", self.what);
        self.chat.send_line(&line).unwrap();
        let back =
            self.chat.recv_line(SESSION_LIMIT).unwrap_or_else(|e| panic!("{} broke at ping {n}: {e:#}", self.what));
        assert_eq!(back, line);
    }
}

const SESSION_LIMIT: Duration = Duration::from_secs(10);
