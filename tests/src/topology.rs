//! A local "cluster": one Linux bridge in the host namespace and, per pod, a network namespace
//! joined to it by a veth pair. Pods get an IPv4 address from `10.244.<index>.0/24`, an IPv6 ULA
//! from `fd00:77:0:<index>::/64`, and a default route out of their veth (the host has no address
//! on the bridge, so nothing a pod sends can leave the bridge).
//!
//! Owns creation and removal of those kernel objects (also of stale leftovers with the same names
//! from a crashed run), running commands in pods, and the Kubernetes-shaped description the
//! agent reads (`mesh.yaml`, rendered by `mesh`). It does not run the agent (`agent` does).
//!
//! Names derive from a short topology name: namespaces `<prefix><name>-<pod>` (prefix `weft-t-`
//! for tests), host interfaces `wt-<name>-<n>` and the bridge `wt-<name>-br` (≤ 15 chars).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::process::{self, Background, Io, Output};
use crate::{SerialGuard, mesh, probe_bin, require_root, serial};

/// Longest topology name: `wt-` + name + `-br` must fit the kernel's 15-byte ifname limit.
pub const MAX_NAME: usize = 8;
const IP_LIMIT: Duration = Duration::from_secs(10);

/// Whether a Kubernetes namespace is enrolled in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Labelled `istio.io/dataplane-mode: ambient`.
    Ambient,
    /// No label: its pods are plain pods.
    Plain,
}

/// A pod to create.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<(String, u16)>,
}

impl PodSpec {
    /// A pod with service account `default` and label `app=<name>`.
    pub fn new(name: &str, namespace: &str) -> Self {
        PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            service_account: "default".into(),
            labels: BTreeMap::from([("app".to_string(), name.to_string())]),
            ports: Vec::new(),
        }
    }
    pub fn sa(mut self, sa: &str) -> Self {
        self.service_account = sa.into();
        self
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
    pub fn port(mut self, name: &str, port: u16) -> Self {
        self.ports.push((name.into(), port));
        self
    }
}

/// A Kubernetes Service: a VIP, `port → targetPort` pairs and a label selector.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub cluster_ip: String,
    pub ports: Vec<(u16, u16)>,
    pub selector: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// Port names (Istio reads the protocol from a `http-`/`tcp-` prefix); default `tcp-<port>`.
    pub port_names: BTreeMap<u16, String>,
}

impl ServiceSpec {
    pub fn new(name: &str, namespace: &str, cluster_ip: &str) -> Self {
        ServiceSpec {
            name: name.into(),
            namespace: namespace.into(),
            cluster_ip: cluster_ip.into(),
            ports: Vec::new(),
            selector: BTreeMap::new(),
            labels: BTreeMap::new(),
            port_names: BTreeMap::new(),
        }
    }
    /// A port named `http-<port>`: HTTP, which a waypoint routes at L7.
    pub fn http_port(mut self, port: u16, target_port: u16) -> Self {
        self.port_names.insert(port, format!("http-{port}"));
        self.port(port, target_port)
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
    pub fn port(mut self, port: u16, target_port: u16) -> Self {
        self.ports.push((port, target_port));
        self
    }
    pub fn selector(mut self, k: &str, v: &str) -> Self {
        self.selector.insert(k.into(), v.into());
        self
    }
}

/// A created pod: its namespace, veth and addresses.
#[derive(Debug, Clone)]
pub struct Pod {
    pub spec: PodSpec,
    /// Network namespace name (under /var/run/netns).
    pub netns: String,
    /// Host end of the pod's veth (on the bridge): capture here to see the pod's wire traffic.
    pub veth: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    dir: PathBuf,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// `ipv4:port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ipv4.into(), port)
    }

    /// `[ipv6]:port`.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ipv6.into(), port)
    }

    /// Runs `args` inside the pod (`ip netns exec`), killed after `limit`.
    pub fn exec<S: AsRef<str>>(&self, args: &[S], limit: Duration) -> Result<Output> {
        let mut full = vec!["netns".to_string(), "exec".to_string(), self.netns.clone()];
        full.extend(args.iter().map(|a| a.as_ref().to_string()));
        process::run("ip", &full, limit)
    }

    /// Starts `args` in the background inside the pod; output goes to `<dir>/<pod>-<label>.log`.
    /// Killed when the returned guard drops.
    pub fn spawn<S: AsRef<str>>(&self, label: &str, args: &[S], io: Io) -> Result<Background> {
        let mut full = vec!["netns".to_string(), "exec".to_string(), self.netns.clone()];
        full.extend(args.iter().map(|a| a.as_ref().to_string()));
        let log = self.dir.join(format!("{}-{label}.log", self.spec.name));
        Background::spawn(&format!("{}/{label}", self.spec.name), "ip", &full, &log, io)
    }

    /// Runs `weft-probe args…` in the pod.
    pub fn probe<S: AsRef<str>>(&self, args: &[S], limit: Duration) -> Result<Output> {
        let mut full = vec![probe_bin().display().to_string()];
        full.extend(args.iter().map(|a| a.as_ref().to_string()));
        self.exec(&full, limit)
    }

    /// Starts a `weft-probe` server (`http-serve`, `echo`, `sink`, `source`) in the pod and waits
    /// until it listens.
    pub fn serve<S: AsRef<str>>(&self, label: &str, args: &[S]) -> Result<Background> {
        let mut full = vec![probe_bin().display().to_string()];
        full.extend(args.iter().map(|a| a.as_ref().to_string()));
        let mut bg = self.spawn(label, &full, Io::Log)?;
        bg.wait_for_log(|l| l.starts_with(crate::probe::LISTENING), Duration::from_secs(10))?;
        Ok(bg)
    }

    /// Starts `weft-probe http-serve --port P --name <pod name>`.
    pub fn serve_http(&self, port: u16) -> Result<Background> {
        self.serve_http_with(port, &[])
    }

    /// `serve_http` with extra `http-serve` flags (`--fail-every`, `--fail-status`, `--delay-ms`).
    pub fn serve_http_with(&self, port: u16, flags: &[&str]) -> Result<Background> {
        let mut args = vec!["http-serve", "--port"];
        let port_s = port.to_string();
        args.push(&port_s);
        args.extend(["--name", self.spec.name.as_str()]);
        args.extend(flags);
        self.serve(&format!("http{port}"), &args)
    }

    /// `curl` from inside the pod with a hard time limit; `marker` goes into a request header so
    /// a capture can look for it.
    pub fn curl(&self, url: &str, marker: &str) -> Result<Output> {
        self.exec(
            &[
                "curl",
                "-sS",
                "--connect-timeout",
                "5",
                "--max-time",
                "10",
                "-H",
                &format!("X-Weft-Marker: {marker}"),
                url,
            ],
            Duration::from_secs(15),
        )
    }
}

/// Builder for [`Topology`].
#[derive(Debug, Clone)]
pub struct TopologyBuilder {
    name: String,
    prefix: String,
    namespaces: BTreeMap<String, Mode>,
    pods: Vec<PodSpec>,
    services: Vec<ServiceSpec>,
}

impl TopologyBuilder {
    /// Netns name prefix (default `weft-t-`; the demo uses `weft-`).
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self
    }
    pub fn namespace(mut self, name: &str, mode: Mode) -> Self {
        self.namespaces.insert(name.into(), mode);
        self
    }
    pub fn pod(mut self, pod: PodSpec) -> Self {
        self.pods.push(pod);
        self
    }
    pub fn service(mut self, svc: ServiceSpec) -> Self {
        self.services.push(svc);
        self
    }

    /// Takes the harness lock, removes leftovers with the same names, and creates the bridge,
    /// namespaces and veths. Everything is removed again when the topology drops.
    pub fn build(self) -> Result<Topology> {
        require_root();
        let TopologyBuilder { name, prefix, namespaces, pods, services } = self;
        ensure!(
            !name.is_empty()
                && name.len() <= MAX_NAME
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "topology name {name:?}: use 1..={MAX_NAME} of [a-z0-9] (it becomes part of 15-byte interface names)"
        );
        ensure!(pods.len() <= 99, "at most 99 pods per topology");
        for p in &pods {
            ensure!(
                namespaces.contains_key(&p.namespace),
                "pod {} is in namespace {} which the topology does not declare",
                p.name,
                p.namespace
            );
        }
        let guard = serial(Duration::from_secs(30 * 60))?;
        let index = subnet_index(&name);
        let dir = std::env::var_os("WEFT_E2E_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/weft-e2e"))
            .join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let created = pods
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let host = 10 + i as u8;
                Pod {
                    netns: format!("{prefix}{name}-{}", spec.name),
                    veth: format!("wt-{name}-{i}"),
                    ipv4: Ipv4Addr::new(10, 244, index, host),
                    ipv6: Ipv6Addr::new(0xfd00, 0x77, 0, index as u16, 0, 0, 0, host as u16),
                    dir: dir.clone(),
                    spec,
                }
            })
            .collect();
        let topo = Topology {
            bridge: format!("wt-{name}-br"),
            name,
            prefix,
            index,
            dir,
            namespaces,
            pods: created,
            services,
            _guard: guard,
        };
        topo.remove_kernel_objects();
        topo.create().with_context(|| format!("create topology {}", topo.name))?;
        Ok(topo)
    }
}

/// Bridge, pods and their description; torn down on drop.
pub struct Topology {
    name: String,
    prefix: String,
    index: u8,
    dir: PathBuf,
    bridge: String,
    namespaces: BTreeMap<String, Mode>,
    pods: Vec<Pod>,
    services: Vec<ServiceSpec>,
    // Last field: released only after Drop has removed everything.
    _guard: SerialGuard,
}

impl Topology {
    /// Starts a topology named `name` (≤ 8 of [a-z0-9]; tests use their own name).
    pub fn builder(name: &str) -> TopologyBuilder {
        TopologyBuilder {
            name: name.into(),
            prefix: "weft-t-".into(),
            namespaces: BTreeMap::new(),
            pods: Vec::new(),
            services: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Third octet of the pod subnet.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Working directory for this topology: logs, mesh.yaml, captures, agent state.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn namespaces(&self) -> &BTreeMap<String, Mode> {
        &self.namespaces
    }

    pub fn services(&self) -> &[ServiceSpec] {
        &self.services
    }

    /// The pod named `name`; panics if the test did not declare it.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in topology {}", self.name))
    }

    /// Where the agent pins its eBPF objects for this topology.
    pub fn bpf_pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/weft-{}", self.name))
    }

    /// Renders mesh.yaml (namespaces, service accounts, pods, services, then `extra` documents such
    /// as policies) and writes it atomically to `<dir>/mesh.yaml`, so a watching agent never reads
    /// half a file.
    pub fn write_mesh(&self, extra: &[String]) -> Result<PathBuf> {
        let path = self.mesh_path();
        let tmp = self.dir.join(".mesh.yaml.tmp");
        std::fs::write(&tmp, mesh::render(self, extra)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    pub fn mesh_path(&self) -> PathBuf {
        self.dir.join("mesh.yaml")
    }

    fn create(&self) -> Result<()> {
        let br = self.bridge.as_str();
        ip(&["link", "add", br, "type", "bridge"])?;
        // With br_netfilter loaded the host's iptables FORWARD rules would filter bridged pod
        // traffic (Docker's default DROP policy, say); these pods are not the host's business.
        ip(&[
            "link",
            "set",
            br,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
            "nf_call_ip6tables",
            "0",
            "nf_call_arptables",
            "0",
        ])?;
        disable_ipv6(br);
        ip(&["link", "set", br, "up"])?;
        for p in &self.pods {
            let ns = p.netns.as_str();
            ip(&["netns", "add", ns])?;
            ip(&["link", "add", &p.veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
            disable_ipv6(&p.veth);
            ip(&["link", "set", &p.veth, "master", br, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{}/24", p.ipv4), "dev", "eth0"])?;
            ip(&["-n", ns, "-6", "addr", "add", &format!("{}/64", p.ipv6), "dev", "eth0", "nodad"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "route", "add", "default", "dev", "eth0"])?;
            ip(&["-n", ns, "-6", "route", "add", "default", "dev", "eth0"])?;
        }
        Ok(())
    }

    /// Removes namespaces, interfaces and the pin dir carrying this topology's names, whoever
    /// created them; kills processes still inside those namespaces and stale agents using the pin
    /// dir. Errors are ignored: this runs both before creation and in Drop.
    fn remove_kernel_objects(&self) {
        crate::agent::kill_agents_using(&self.bpf_pin_dir());
        let ns_prefix = format!("{}{}-", self.prefix, self.name);
        for ns in list_dir(Path::new("/var/run/netns")).into_iter().filter(|n| n.starts_with(&ns_prefix)) {
            kill_netns_pids(&ns);
            let _ = process::run("ip", &["netns", "del", ns.as_str()], IP_LIMIT);
        }
        let if_prefix = format!("wt-{}-", self.name);
        for link in list_dir(Path::new("/sys/class/net")).into_iter().filter(|n| n.starts_with(&if_prefix)) {
            let _ = process::run("ip", &["link", "del", link.as_str()], IP_LIMIT);
        }
        let _ = std::fs::remove_dir_all(self.bpf_pin_dir());
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("topology {}: logs and captures kept in {}", self.name, self.dir.display());
        }
        self.remove_kernel_objects();
    }
}

fn ip(args: &[&str]) -> Result<Output> {
    let out = process::run("ip", args, IP_LIMIT)?;
    if !out.success() {
        bail!("{out}");
    }
    Ok(out)
}

fn disable_ipv6(ifname: &str) {
    // The host keeps no address on the bridge or the veths, not even a link-local one.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"), "1");
}

fn list_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn kill_netns_pids(ns: &str) {
    let Ok(out) = process::run("ip", &["netns", "pids", ns], IP_LIMIT) else { return };
    for pid in out.stdout.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Third octet of the pod subnet: stable per name, 1..=250. Two topologies never coexist (the
/// harness lock), so a collision between names only matters to someone reading captures.
fn subnet_index(name: &str) -> u8 {
    let mut h: u32 = 2166136261;
    for b in name.bytes() {
        h = (h ^ b as u32).wrapping_mul(16777619);
    }
    1 + (h % 250) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit() {
        let name = "a".repeat(MAX_NAME);
        assert!(format!("wt-{name}-br").len() <= 15);
        assert!(format!("wt-{name}-98").len() <= 15);
    }

    #[test]
    fn subnet_index_is_stable_and_in_range() {
        assert_eq!(subnet_index("mesh"), subnet_index("mesh"));
        for n in ["a", "demo", "strict", "zzzzzzzz", "bench"] {
            let i = subnet_index(n);
            assert!((1..=250).contains(&i), "{n} → {i}");
        }
    }
}
