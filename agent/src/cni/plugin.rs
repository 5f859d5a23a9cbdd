//! `weft cni`: the chained CNI plugin the container runtime executes for every pod sandbox
//! (CNI spec 1.1: <https://www.cni.dev/docs/spec/>). Configuration on stdin, parameters in
//! `CNI_*` variables, a result or an error object on stdout, logs on stderr.
//!
//! It creates no interfaces: ADD hands the pod (namespace, name, uid, netns, IPs from the
//! previous plugin's result) to the node agent over its unix socket and waits for the verdict,
//! then passes the previous result through unchanged. When the agent cannot say the pod is
//! enrolled or outside the mesh, ADD fails, so the runtime never starts a mesh app unprotected;
//! the runtime retries the sandbox. DEL, GC and unreachable agents never fail a teardown.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use super::CniError;
use super::protocol::{MAX_MESSAGE, Op, Outcome, PROTOCOL_VERSION, PodAdd, PodDel, PodRef, Request, Response};
use super::server::DEFAULT_SOCKET;

/// Spec versions this plugin speaks. Chaining (`prevResult`) exists since 0.3.0; the result is
/// passed through, so its format is whatever the runtime and the previous plugin agreed on.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Version used for output when the input does not say (e.g. stdin unreadable).
pub const PREFERRED_VERSION: &str = "1.1.0";
/// ADD waits this long for the agent unless the configuration's `timeout_secs` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// DEL, CHECK, GC and STATUS need no verdict, only an answer.
const SHORT_TIMEOUT: Duration = Duration::from_secs(5);

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }
}

/// The plugin configuration object the runtime passes on stdin.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub cni_version: String,
    pub name: String,
    /// The agent's socket (`weft_socket`), in the host's view.
    pub socket: PathBuf,
    /// How long ADD waits for the agent's verdict (`timeout_secs`).
    pub timeout: Duration,
    /// Namespaces whose pods pass through without asking the agent (`exclude_namespaces`), so
    /// the cluster's own pods start while the agent is down.
    pub exclude_namespaces: Vec<String>,
    /// The previous plugin's result (`prevResult`), passed through on ADD.
    pub prev_result: Option<Value>,
    /// GC: sandboxes the runtime still has (`cni.dev/valid-attachments`).
    pub valid_container_ids: Vec<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    weft_socket: Option<PathBuf>,
    timeout_secs: Option<f64>,
    exclude_namespaces: Option<Vec<String>>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
}

impl PluginConfig {
    /// Parses and validates stdin (not for VERSION, which needs only `cniVersion`).
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| CniError::Decode(e.to_string()))?;
        let cni_version = raw.cni_version.ok_or_else(|| CniError::InvalidConfig("cniVersion is missing".into()))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::IncompatibleVersion(cni_version));
        }
        let timeout = match raw.timeout_secs {
            None => DEFAULT_TIMEOUT,
            Some(s) if s.is_finite() && s > 0.0 && s <= 600.0 => Duration::from_secs_f64(s),
            Some(s) => {
                return Err(CniError::InvalidConfig(format!("timeout_secs={s}: give a number of seconds in (0, 600]")));
            }
        };
        let socket = raw.weft_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        if !socket.is_absolute() {
            return Err(CniError::InvalidConfig(format!("weft_socket={}: give an absolute path", socket.display())));
        }
        Ok(PluginConfig {
            cni_version,
            name: raw.name.unwrap_or_default(),
            socket,
            timeout,
            exclude_namespaces: raw.exclude_namespaces.unwrap_or_default(),
            prev_result: raw.prev_result.filter(|v| !v.is_null()),
            valid_container_ids: raw.valid_attachments.into_iter().flatten().map(|a| a.container_id).collect(),
        })
    }
}

/// The `K8S_POD_*` keys of `CNI_ARGS` (kubelet's convention; unknown keys are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sArgs {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl K8sArgs {
    /// `None` when the sandbox is not a Kubernetes pod (no namespace or name).
    pub fn parse(cni_args: &str) -> Option<Self> {
        let mut out = K8sArgs::default();
        for pair in cni_args.split(';') {
            let Some((k, v)) = pair.split_once('=') else { continue };
            match k.trim() {
                "K8S_POD_NAMESPACE" => out.namespace = v.trim().to_string(),
                "K8S_POD_NAME" => out.name = v.trim().to_string(),
                "K8S_POD_UID" => out.uid = v.trim().to_string(),
                _ => {}
            }
        }
        (!out.namespace.is_empty() && !out.name.is_empty()).then_some(out)
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub pod: Option<K8sArgs>,
}

impl CniEnv {
    /// Reads the variables `command` requires (spec §2) and names every missing one.
    pub fn parse(env: &HashMap<String, String>) -> Result<Self, CniError> {
        let get = |k: &str| env.get(k).map(|v| v.trim()).filter(|v| !v.is_empty()).map(str::to_string);
        let command = match env.get("CNI_COMMAND") {
            None => return Err(CniError::InvalidEnv(vec!["CNI_COMMAND".into()])),
            Some(c) => Command::parse(c.trim()).ok_or_else(|| {
                CniError::InvalidEnv(vec![format!("CNI_COMMAND={c} (expected ADD, DEL, CHECK, VERSION, GC or STATUS)")])
            })?,
        };
        let required: &[&str] = match command {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Version | Command::Gc | Command::Status => &[],
        };
        let missing: Vec<String> = required.iter().filter(|k| get(k).is_none()).map(|k| k.to_string()).collect();
        if !missing.is_empty() {
            return Err(CniError::InvalidEnv(missing));
        }
        Ok(CniEnv {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            pod: env.get("CNI_ARGS").and_then(|a| K8sArgs::parse(a)),
        })
    }
}

/// Runs one CNI invocation. Success output (ADD's result, VERSION's versions) and, on failure, the
/// CNI error object are written to `stdout` here; the caller only turns `Err` into a non-zero
/// exit status (see [`run_plugin`]).
pub fn plugin_main(
    mut stdin: impl Read,
    env: &HashMap<String, String>,
    mut stdout: impl Write,
) -> Result<(), CniError> {
    let mut version = None;
    let result = run(&mut stdin, env, &mut stdout, &mut version);
    if let Err(e) = &result {
        tracing::error!(code = e.code(), error = %e, "weft-cni failed");
        let object = e.to_json(version.as_deref().unwrap_or(PREFERRED_VERSION));
        // If stdout is gone too there is nobody left to tell; the exit status still says it.
        let _ = writeln!(stdout, "{object}").and_then(|_| stdout.flush());
    }
    result
}

/// [`plugin_main`] on the process's own stdin, environment and stdout; the exit status for
/// `main` (0 on success, 1 on failure as the spec asks: any non-zero).
pub fn run_plugin() -> std::process::ExitCode {
    let env: HashMap<String, String> = std::env::vars().collect();
    match plugin_main(std::io::stdin().lock(), &env, std::io::stdout().lock()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

/// Whether this process was started as the installed plugin binary (`/opt/cni/bin/weft-cni`):
/// the runtime runs it with no arguments, so `main` must check before parsing a command line.
pub fn invoked_as_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|argv0| Path::new(&argv0).file_name().map(|n| n == super::install::PLUGIN_TYPE))
        .unwrap_or(false)
}

fn run(
    stdin: &mut impl Read,
    env: &HashMap<String, String>,
    stdout: &mut impl Write,
    version: &mut Option<String>,
) -> Result<(), CniError> {
    let mut input = Vec::new();
    stdin.take(16 * 1024 * 1024).read_to_end(&mut input).map_err(|e| CniError::Io(format!("reading stdin: {e}")))?;
    // Errors should carry the input's version whenever it can be read at all.
    *version = serde_json::from_slice::<Value>(&input)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string));
    let cni = CniEnv::parse(env)?;
    if cni.command == Command::Version {
        let out = json!({"cniVersion": version.as_deref().unwrap_or(PREFERRED_VERSION), "supportedVersions": SUPPORTED_VERSIONS});
        return emit(stdout, &out);
    }
    let config = PluginConfig::parse(&input)?;
    match cni.command {
        Command::Add => add(&config, &cni, stdout),
        Command::Del => {
            del(&config, &cni);
            Ok(())
        }
        Command::Check => check(&config, &cni),
        Command::Gc => {
            gc(&config);
            Ok(())
        }
        Command::Status => status(&config),
        Command::Version => unreachable!("handled above"),
    }
}

/// The pod this invocation is about, or `None` when the agent need not be asked.
fn pod_to_ask(config: &PluginConfig, cni: &CniEnv) -> Option<K8sArgs> {
    let Some(pod) = &cni.pod else {
        tracing::info!(container_id = %cni.container_id, "not a Kubernetes pod (no K8S_POD_* in CNI_ARGS): passing through");
        return None;
    };
    if config.exclude_namespaces.iter().any(|n| n == &pod.namespace) {
        tracing::debug!(namespace = %pod.namespace, pod = %pod.name, "namespace excluded: passing through");
        return None;
    }
    Some(pod.clone())
}

fn add(config: &PluginConfig, cni: &CniEnv, stdout: &mut impl Write) -> Result<(), CniError> {
    let Some(prev) = &config.prev_result else {
        return Err(CniError::InvalidConfig(
            "no prevResult: weft-cni is a chained plugin; list it after the network plugin in a .conflist".into(),
        ));
    };
    let mut result = prev.clone();
    if let Some(obj) = result.as_object_mut() {
        obj.entry("cniVersion").or_insert_with(|| Value::String(config.cni_version.clone()));
    }
    let Some(pod) = pod_to_ask(config, cni) else { return emit(stdout, &result) };
    let pod_ref = PodRef::new(&pod.namespace, &pod.name);
    let request = Op::Add(PodAdd {
        pod: pod_ref.clone(),
        uid: pod.uid.clone(),
        container_id: cni.container_id.clone(),
        netns: PathBuf::from(&cni.netns),
        ifname: cni.ifname.clone(),
        ips: sandbox_ips(prev),
        wait_ms: config.timeout.as_millis() as u64,
    });
    let started = Instant::now();
    match call(&config.socket, &request, config.timeout)? {
        Outcome::Enrolled => {
            tracing::info!(pod = %pod_ref, elapsed = ?started.elapsed(), "pod enrolled in the mesh");
            emit(stdout, &result)
        }
        Outcome::NotCaptured => {
            tracing::debug!(pod = %pod_ref, "pod not in the mesh");
            emit(stdout, &result)
        }
        Outcome::Error { message } => Err(CniError::Refused { pod: pod_ref.to_string(), message }),
        other => Err(CniError::Protocol(format!("unexpected answer to ADD: {other:?}"))),
    }
}

fn del(config: &PluginConfig, cni: &CniEnv) {
    let Some(pod) = pod_to_ask(config, cni) else { return };
    let request =
        Op::Del(PodDel { pod: PodRef::new(&pod.namespace, &pod.name), container_id: cni.container_id.clone() });
    // DEL must succeed (spec §2): the agent also drops pods that leave the API.
    match call(&config.socket, &request, SHORT_TIMEOUT.min(config.timeout)) {
        Ok(Outcome::Ok) => {}
        Ok(other) => {
            tracing::warn!(namespace = %pod.namespace, pod = %pod.name, answer = ?other, "agent did not confirm DEL")
        }
        Err(e) => {
            tracing::warn!(namespace = %pod.namespace, pod = %pod.name, error = %e, "cannot tell the agent about DEL")
        }
    }
}

fn check(config: &PluginConfig, cni: &CniEnv) -> Result<(), CniError> {
    let Some(pod) = pod_to_ask(config, cni) else { return Ok(()) };
    let pod_ref = PodRef::new(&pod.namespace, &pod.name);
    let request = Op::Check(PodDel { pod: pod_ref.clone(), container_id: cni.container_id.clone() });
    match call(&config.socket, &request, SHORT_TIMEOUT.min(config.timeout))? {
        Outcome::Enrolled | Outcome::NotCaptured | Outcome::Unknown => Ok(()),
        Outcome::Pending => Err(CniError::Pending { pod: pod_ref.to_string() }),
        Outcome::Error { message } => Err(CniError::Refused { pod: pod_ref.to_string(), message }),
        other => Err(CniError::Protocol(format!("unexpected answer to CHECK: {other:?}"))),
    }
}

fn gc(config: &PluginConfig) {
    let request = Op::Gc { valid_container_ids: config.valid_container_ids.clone() };
    // Nothing to collect in an agent that is not running (it rebuilds from the API on start).
    if let Err(e) = call(&config.socket, &request, SHORT_TIMEOUT.min(config.timeout)) {
        tracing::warn!(error = %e, "cannot pass GC to the agent");
    }
}

fn status(config: &PluginConfig) -> Result<(), CniError> {
    match call(&config.socket, &Op::Status, SHORT_TIMEOUT.min(config.timeout)) {
        Ok(Outcome::Ok) => Ok(()),
        Ok(other) => Err(CniError::NotAvailable(format!("agent answered {other:?}"))),
        Err(e) => Err(CniError::NotAvailable(e.to_string())),
    }
}

fn emit(stdout: &mut impl Write, value: &Value) -> Result<(), CniError> {
    writeln!(stdout, "{value}").and_then(|_| stdout.flush()).map_err(|e| CniError::Io(format!("writing stdout: {e}")))
}

/// The addresses of the pod's own interfaces in `prevResult`: IPs whose `interface` points at an
/// interface with a `sandbox` (the host side of a veth has none), or every IP when the result
/// does not say which interface it belongs to.
pub fn sandbox_ips(prev: &Value) -> Vec<IpAddr> {
    let interfaces = prev.get("interfaces").and_then(Value::as_array);
    let in_sandbox = |idx: Option<u64>| -> bool {
        let (Some(i), Some(ifs)) = (idx, interfaces) else { return true };
        let sandbox = ifs.get(i as usize).and_then(|iface| iface.get("sandbox")).and_then(Value::as_str);
        sandbox.is_some_and(|s| !s.is_empty())
    };
    let mut out = Vec::new();
    for ip in prev.get("ips").and_then(Value::as_array).into_iter().flatten() {
        let Some(addr) = ip.get("address").and_then(Value::as_str) else { continue };
        let Ok(parsed) = addr.parse::<ipnet::IpNet>().map(|n| n.addr()).or_else(|_| addr.parse::<IpAddr>()) else {
            tracing::warn!(address = addr, "unparsable address in prevResult");
            continue;
        };
        if in_sandbox(ip.get("interface").and_then(Value::as_u64)) && !out.contains(&parsed) {
            out.push(parsed);
        }
    }
    out
}

/// One request/response with the agent, all of it within `timeout`.
fn call(socket: &Path, op: &Op, timeout: Duration) -> Result<Outcome, CniError> {
    let deadline = Instant::now() + timeout;
    let unreachable =
        |e: std::io::Error| CniError::AgentUnreachable { socket: socket.to_path_buf(), reason: e.to_string() };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    let mut text = serde_json::to_vec(&Request { v: PROTOCOL_VERSION, op: op.clone() }).expect("requests serialise");
    text.push(b'\n');
    stream.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    stream.write_all(&text).map_err(unreachable)?;
    let _ = stream.shutdown(Shutdown::Write);

    let mut reader = BufReader::new(stream).take(MAX_MESSAGE as u64 + 1);
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CniError::Timeout { socket: socket.to_path_buf(), after: timeout });
        }
        reader.get_ref().get_ref().set_read_timeout(Some(left)).map_err(unreachable)?;
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) if line.ends_with(b"\n") => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(CniError::Timeout { socket: socket.to_path_buf(), after: timeout });
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(unreachable(e)),
        }
    }
    if line.is_empty() {
        return Err(CniError::Protocol("the agent closed the connection without an answer (shutting down?)".into()));
    }
    let response: Response = serde_json::from_slice(&line)
        .map_err(|e| CniError::Protocol(format!("unreadable answer from the agent: {e}")))?;
    if response.v != PROTOCOL_VERSION {
        return Err(CniError::Protocol(format!(
            "the agent speaks protocol v{} and weft-cni v{PROTOCOL_VERSION}: finish rolling out the weft DaemonSet",
            response.v
        )));
    }
    Ok(response.outcome)
}

#[cfg(test)]
mod tests;
