use super::*;

const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

const KINDNET_CONF: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "kindnet",
  "type": "ptp",
  "ipMasq": false,
  "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state", "ranges": [[{"subnet": "10.244.0.0/24"}]]},
  "mtu": 1500
}"#;

struct Node {
    _dir: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
    binary: PathBuf,
}

fn node(files: &[(&str, &str)]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("etc/cni/net.d");
    let bin = dir.path().join("opt/cni/bin");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    for (name, text) in files {
        std::fs::write(conf.join(name), text).unwrap();
    }
    let binary = dir.path().join("weft");
    std::fs::write(&binary, b"\x7fELF weft v1").unwrap();
    Node { _dir: dir, conf, bin, binary }
}

fn json_of(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn appends_to_the_first_conflist_and_is_idempotent() {
    let n = node(&[
        ("10-flannel.conflist", FLANNEL),
        ("99-loopback.conf", r#"{"cniVersion":"0.3.1","name":"lo","type":"loopback"}"#),
    ]);
    let sock = Path::new("/var/run/weft/cni.sock");
    let first = install(&n.conf, &n.bin, &n.binary, sock).unwrap();
    assert!(first.changed);
    assert_eq!(first.conflist, n.conf.join("10-flannel.conflist"));
    let doc = json_of(&first.conflist);
    let plugins = doc["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[0]["type"], "flannel");
    assert_eq!(plugins[1]["type"], "portmap");
    assert_eq!(plugins[2]["type"], "weft-cni");
    assert_eq!(plugins[2]["weft_socket"], "/var/run/weft/cni.sock");
    assert_eq!(plugins[2]["exclude_namespaces"], json!(["kube-system"]));
    assert_eq!(doc["name"], "cbr0");
    assert_eq!(doc["cniVersion"], "0.3.1");
    // The entry parses as the plugin's configuration (with the list's name and version, as
    // the runtime derives it).
    let mut derived = plugins[2].clone();
    derived["cniVersion"] = doc["cniVersion"].clone();
    derived["name"] = doc["name"].clone();
    let parsed = crate::cni::plugin::PluginConfig::parse(&serde_json::to_vec(&derived).unwrap()).unwrap();
    assert_eq!(parsed.socket, sock);
    // The binary, executable; the other file untouched; no temp files left.
    let bin = n.bin.join("weft-cni");
    assert_eq!(std::fs::read(&bin).unwrap(), b"\x7fELF weft v1");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
    assert_eq!(ls(&n.conf), ["10-flannel.conflist", "99-loopback.conf"]);
    assert_eq!(ls(&n.bin), ["weft-cni"]);

    // Again: nothing written.
    let mtime = std::fs::metadata(&first.conflist).unwrap().modified().unwrap();
    let again = install(&n.conf, &n.bin, &n.binary, sock).unwrap();
    assert!(!again.changed);
    assert_eq!(json_of(&again.conflist), doc);
    assert_eq!(std::fs::metadata(&first.conflist).unwrap().modified().unwrap(), mtime);

    // A new socket path or binary: the entry is updated in place, still once and last.
    std::fs::write(&n.binary, b"\x7fELF weft v2").unwrap();
    let moved = install(&n.conf, &n.bin, &n.binary, Path::new("/run/weft2/cni.sock")).unwrap();
    assert!(moved.changed);
    let doc = json_of(&moved.conflist);
    let ours: Vec<&Value> = doc["plugins"].as_array().unwrap().iter().filter(|p| p["type"] == "weft-cni").collect();
    assert_eq!(ours.len(), 1);
    assert_eq!(doc["plugins"][2]["weft_socket"], "/run/weft2/cni.sock");
    assert_eq!(std::fs::read(&bin).unwrap(), b"\x7fELF weft v2");
}

#[test]
fn moves_our_entry_back_to_the_end() {
    // The primary plugin rewrote its list and someone put a plugin after ours.
    let list = r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"bridge"},{"type":"weft-cni","weft_socket":"/x"},{"type":"bandwidth"}]}"#;
    let n = node(&[("05-net.conflist", list)]);
    let out = install(&n.conf, &n.bin, &n.binary, Path::new("/var/run/weft/cni.sock")).unwrap();
    let types: Vec<String> = json_of(&out.conflist)["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["bridge", "bandwidth", "weft-cni"]);
}

#[test]
fn converts_a_bare_conf() {
    let n = node(&[("10-kindnet.conf", KINDNET_CONF)]);
    let out = install(&n.conf, &n.bin, &n.binary, Path::new("/var/run/weft/cni.sock")).unwrap();
    assert_eq!(out.conflist, n.conf.join("10-kindnet.conflist"));
    assert_eq!(ls(&n.conf), ["10-kindnet.conflist"]);
    let doc = json_of(&out.conflist);
    assert_eq!(doc["name"], "kindnet");
    assert_eq!(doc["cniVersion"], "0.3.1");
    let original: Value = serde_json::from_str(KINDNET_CONF).unwrap();
    let mut expected_first = original.clone();
    expected_first.as_object_mut().unwrap().remove("name");
    expected_first.as_object_mut().unwrap().remove("cniVersion");
    assert_eq!(doc["plugins"][0], expected_first, "the plugin keeps every other key");
    assert_eq!(doc["plugins"][1]["type"], "weft-cni");
    assert_eq!(doc["plugins"].as_array().unwrap().len(), 2);

    // Idempotent from the converted file on.
    assert!(!install(&n.conf, &n.bin, &n.binary, Path::new("/var/run/weft/cni.sock")).unwrap().changed);

    // Uninstall leaves an equivalent conflist of the original plugin.
    assert!(uninstall(&n.conf, &n.bin).unwrap());
    let doc = json_of(&n.conf.join("10-kindnet.conflist"));
    assert_eq!(doc["plugins"].as_array().unwrap().len(), 1);
    assert_eq!(doc["plugins"][0], expected_first);
    assert!(ls(&n.bin).is_empty());
}

#[test]
fn picks_the_first_valid_file_by_name() {
    let n = node(&[
        ("00-notes.txt", "not a config"),
        ("01-broken.conflist", "{ truncated"),
        ("02-empty.json", "{}"),
        ("10-calico.conflist", r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico"}]}"#),
        ("20-other.conflist", r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#),
    ]);
    let out = install(&n.conf, &n.bin, &n.binary, Path::new("/var/run/weft/cni.sock")).unwrap();
    assert_eq!(out.conflist, n.conf.join("10-calico.conflist"));
    assert_eq!(json_of(&n.conf.join("20-other.conflist"))["plugins"].as_array().unwrap().len(), 1);
    assert_eq!(std::fs::read_to_string(n.conf.join("01-broken.conflist")).unwrap(), "{ truncated");
}

#[test]
fn uninstall_removes_exactly_ours() {
    let n = node(&[("10-flannel.conflist", FLANNEL)]);
    let entry =
        PluginEntry { exclude_namespaces: vec!["kube-system".into(), "weft-system".into()], ..Default::default() };
    install_entry(&n.conf, &n.bin, &n.binary, &entry).unwrap();
    std::fs::write(n.bin.join("flannel"), b"theirs").unwrap();
    assert!(uninstall(&n.conf, &n.bin).unwrap());
    let original: Value = serde_json::from_str(FLANNEL).unwrap();
    assert_eq!(json_of(&n.conf.join("10-flannel.conflist")), original);
    assert_eq!(ls(&n.bin), ["flannel"]);
    // Twice: nothing left to remove, no error.
    assert!(!uninstall(&n.conf, &n.bin).unwrap());
    assert_eq!(json_of(&n.conf.join("10-flannel.conflist")), original);
}

#[test]
fn no_network_config_yet() {
    let n = node(&[]);
    let err = install(&n.conf, &n.bin, &n.binary, Path::new("/var/run/weft/cni.sock")).unwrap_err();
    assert!(matches!(err, InstallError::NoNetworkConfig(_)), "{err}");
    assert!(err.to_string().contains("retry"));
}
