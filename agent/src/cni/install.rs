//! Installing the plugin into the node: the binary into the CNI bin directory, and a
//! `{"type": "weft-cni", …}` entry as the last plugin of the network configuration the runtime
//! uses (the first `.conf`/`.conflist`/`.json` file by name, as libcni picks it). A bare `.conf`
//! is turned into an equivalent `.conflist` holding it plus our entry, as Istio's install-cni
//! does. Every write is a temp file plus rename, so the runtime never reads half a file; nothing
//! is rewritten when it is already as wanted, so calling `install` in a loop (to re-add the entry
//! after the primary network plugin rewrites its file) is cheap.
//!
//! Files are re-serialised: JSON keys come out sorted, values unchanged.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::server::DEFAULT_SOCKET;

/// The plugin's `type`, and its binary's file name in the CNI bin directory. `main` runs the
/// plugin when invoked under this name (the runtime passes no arguments).
pub const PLUGIN_TYPE: &str = "weft-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "no CNI network configuration in {0}: the node's network plugin has not written one yet; retry once it has"
    )]
    NoNetworkConfig(PathBuf),
    #[error("{path}: {reason}; fix or remove the file")]
    BadConfig { path: PathBuf, reason: String },
    #[error("{path}: {source}; are the host's CNI directories mounted read-write?")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.to_path_buf(), source }
}

/// Our entry in the conflist: the keys the plugin reads (see `plugin::PluginConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginEntry {
    /// The agent's socket in the host's view.
    pub socket: PathBuf,
    /// How long ADD waits for the agent's verdict.
    pub timeout_secs: f64,
    /// Namespaces whose pods never wait for the agent (the cluster's own, the agent's).
    pub exclude_namespaces: Vec<String>,
}

impl Default for PluginEntry {
    fn default() -> Self {
        PluginEntry {
            socket: PathBuf::from(DEFAULT_SOCKET),
            timeout_secs: super::plugin::DEFAULT_TIMEOUT.as_secs_f64(),
            exclude_namespaces: vec!["kube-system".into()],
        }
    }
}

impl PluginEntry {
    fn to_json(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "weft_socket": self.socket,
            "timeout_secs": self.timeout_secs,
            "exclude_namespaces": self.exclude_namespaces,
        })
    }
}

/// What `install` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The conflist that now holds our entry.
    pub conflist: PathBuf,
    pub binary: PathBuf,
    /// Whether any file was written (false: everything was already in place).
    pub changed: bool,
}

/// [`install_entry`] with the default entry pointing at `socket`.
pub fn install(cni_conf_dir: &Path, bin_dir: &Path, binary: &Path, socket: &Path) -> Result<Installed, InstallError> {
    let entry = PluginEntry { socket: socket.to_path_buf(), ..PluginEntry::default() };
    install_entry(cni_conf_dir, bin_dir, binary, &entry)
}

/// Copies `binary` to `bin_dir/weft-cni`, then makes `entry` the last plugin of the primary
/// network configuration in `cni_conf_dir` (binary first: the runtime must never find our entry
/// without the executable).
pub fn install_entry(
    cni_conf_dir: &Path,
    bin_dir: &Path,
    binary: &Path,
    entry: &PluginEntry,
) -> Result<Installed, InstallError> {
    let (path, doc) = &primary_config(cni_conf_dir)?;
    let (bin_path, bin_changed) = install_binary(bin_dir, binary)?;
    let ours = entry.to_json();
    let is_list = doc.get("plugins").is_some();
    let mut list = if is_list { doc.clone() } else { conf_to_conflist(doc) };
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| InstallError::BadConfig { path: path.clone(), reason: "\"plugins\" is not a list".into() })?;
    plugins.retain(|p| !is_ours(p));
    plugins.push(ours);

    let target = if is_list { path.clone() } else { path.with_extension("conflist") };
    let mut changed = bin_changed;
    if !is_list || list != *doc {
        write_json_atomic(&target, &list)?;
        changed = true;
    }
    if !is_list {
        // The .conflist sorts right after the .conf, so until this removal the runtime keeps
        // using the old file: never a moment without a network configuration.
        std::fs::remove_file(path).map_err(io(path))?;
    }
    if changed {
        tracing::info!(conflist = %target.display(), binary = %bin_path.display(), "CNI plugin installed");
    }
    Ok(Installed { conflist: target, binary: bin_path, changed })
}

/// Removes our entry from every network configuration in `cni_conf_dir` that has it, then
/// `bin_dir/weft-cni`. A configuration install converted from `.conf` stays a `.conflist`
/// (equivalent for the runtime). Returns whether anything was removed.
pub fn uninstall(cni_conf_dir: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let mut removed = false;
    for path in config_files(cni_conf_dir)? {
        let Ok(Value::Object(mut doc)) = read_json(&path) else { continue };
        let Some(Value::Array(plugins)) = doc.get_mut("plugins") else { continue };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            write_json_atomic(&path, &Value::Object(doc))?;
            tracing::info!(conflist = %path.display(), "CNI plugin entry removed");
            removed = true;
        }
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&bin) {
        Ok(()) => removed = true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&bin)(e)),
    }
    Ok(removed)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// A single-plugin `.conf` as a conflist: the list carries the network's name and version, the
/// plugin keeps everything else.
fn conf_to_conflist(conf: &Value) -> Value {
    let mut plugin = conf.clone();
    let mut list = Map::new();
    if let Some(obj) = plugin.as_object_mut() {
        for key in ["cniVersion", "name"] {
            if let Some(v) = obj.remove(key) {
                list.insert(key.to_string(), v);
            }
        }
    }
    list.insert("plugins".into(), Value::Array(vec![plugin]));
    Value::Object(list)
}

/// Network configuration files as libcni lists them: by name, these extensions.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("conf" | "conflist" | "json")))
        .collect();
    files.sort();
    Ok(files)
}

/// The configuration the runtime uses: the first file by name that is a valid network
/// configuration (a conflist with `plugins` or a conf with `type`). Unreadable files are skipped
/// like libcni skips them.
fn primary_config(dir: &Path) -> Result<(PathBuf, Value), InstallError> {
    for path in config_files(dir)? {
        match read_json(&path) {
            Ok(doc)
                if doc.get("plugins").is_some_and(Value::is_array) || doc.get("type").is_some_and(Value::is_string) =>
            {
                return Ok((path, doc));
            }
            Ok(_) => tracing::debug!(file = %path.display(), "not a network configuration; skipped"),
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "unreadable CNI configuration; skipped"),
        }
    }
    Err(InstallError::NoNetworkConfig(dir.to_path_buf()))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| InstallError::BadConfig { path: path.to_path_buf(), reason: e.to_string() })
}

fn write_json_atomic(path: &Path, value: &Value) -> Result<(), InstallError> {
    let mut text = serde_json::to_vec_pretty(value).expect("JSON values serialise");
    text.push(b'\n');
    write_atomic(path, &text, 0o644)
}

/// Temp file in the same directory (an extension libcni ignores), fsync, rename.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(PLUGIN_TYPE);
    let tmp = path.with_file_name(format!(".{name}.weft-tmp"));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // `mode` only applies to a new file, and through the umask.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

/// Copies the binary unless the installed one is identical. Returns its path and whether it was
/// written.
fn install_binary(bin_dir: &Path, binary: &Path) -> Result<(PathBuf, bool), InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let new = std::fs::read(binary).map_err(io(binary))?;
    if std::fs::read(&target).is_ok_and(|old| old == new) {
        return Ok((target, false));
    }
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    // Rename over the old file: a runtime executing it meanwhile keeps the old inode.
    write_atomic(&target, &new, 0o755)?;
    Ok((target, true))
}

#[cfg(test)]
mod tests;
