//! The wire format between `weft cni` (the plugin the container runtime runs) and the node
//! agent: one JSON object per line, one request and one response per unix-socket connection.
//!
//! Versioned by `v` in both directions. The plugin binary and the agent come from the same
//! DaemonSet image, but during a rolling upgrade the host's `weft-cni` can be older or newer than
//! the agent: a side that gets a `v` it does not speak answers with an error naming both, and
//! the runtime retries the sandbox once the rollout is done.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest request or response accepted, in bytes: a pod's names, IPs and paths fit many times.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// A pod by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PodRef { namespace: namespace.into(), name: name.into() }
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// CNI ADD: the pod's sandbox has its network; answer once the agent decided.
    Add(PodAdd),
    /// CNI DEL: the sandbox is going away.
    Del(PodDel),
    /// CNI CHECK: is the pod still as ADD left it?
    Check(PodDel),
    /// CNI GC: sandboxes the runtime still knows; others may be forgotten.
    Gc { valid_container_ids: Vec<String> },
    /// CNI STATUS: is the agent there to serve ADDs?
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAdd {
    #[serde(flatten)]
    pub pod: PodRef,
    /// `K8S_POD_UID`; empty when the runtime did not pass it.
    #[serde(default)]
    pub uid: String,
    /// `CNI_CONTAINERID`: the sandbox, so a late DEL of an old sandbox leaves a new one alone.
    pub container_id: String,
    /// `CNI_NETNS` as the runtime gave it (host paths: the agent must see the same paths).
    pub netns: PathBuf,
    #[serde(default)]
    pub ifname: String,
    /// The pod's addresses from the previous plugin's result: the API server only learns them
    /// after the sandbox is up, which is after this ADD returns.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// How long the plugin waits for the answer; the agent answers before that.
    pub wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodDel {
    #[serde(flatten)]
    pub pod: PodRef,
    pub container_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Response {
    pub fn new(outcome: Outcome) -> Self {
        Response { v: PROTOCOL_VERSION, outcome }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// The pod's traffic is captured: the app may start.
    Enrolled,
    /// The pod is not in the mesh (namespace not labelled, pod opted out): nothing to do.
    NotCaptured,
    /// CHECK: the agent knows the pod but has not decided yet.
    Pending,
    /// CHECK: the agent has no record of the pod (it was never in the mesh here).
    Unknown,
    /// DEL, GC, STATUS done.
    Ok,
    /// Anything else, said so that an operator reading kubelet's events knows what to do.
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_flat_versioned_shape() {
        let req = Request {
            v: PROTOCOL_VERSION,
            op: Op::Add(PodAdd {
                pod: PodRef::new("demo", "web-1"),
                uid: "0b5f0c4e-6a0e-4f3e-9d1a-2c8e1f7a9b10".into(),
                container_id: "abc123".into(),
                netns: "/var/run/netns/cni-1".into(),
                ifname: "eth0".into(),
                ips: vec!["10.244.1.5".parse().unwrap()],
                wait_ms: 10_000,
            }),
        };
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["v"], 1);
        assert_eq!(json["op"], "add");
        assert_eq!(json["namespace"], "demo");
        assert_eq!(json["ips"][0], "10.244.1.5");
        let back: Request = serde_json::from_value(json).unwrap();
        assert_eq!(back, req);

        let gc: Request = serde_json::from_str(r#"{"v":1,"op":"gc","valid_container_ids":["a"]}"#).unwrap();
        assert_eq!(gc.op, Op::Gc { valid_container_ids: vec!["a".into()] });
        let status: Request = serde_json::from_str(r#"{"v":1,"op":"status"}"#).unwrap();
        assert_eq!(status.op, Op::Status);
    }

    /// What the agent enrolls an IP-less pod with: the uid (to tell a recreated pod from its namesake)
    /// and the prevResult IPs. A plugin that sends neither still parses: both default to empty.
    #[test]
    fn add_carries_uid_and_prev_result_ips_and_tolerates_their_absence() {
        let full = r#"{"v":1,"op":"add","namespace":"demo","name":"web","uid":"0b5f0c4e-6a0e-4f3e-9d1a-2c8e1f7a9b10",
            "container_id":"c1","netns":"/var/run/netns/cni-1","ifname":"eth0","ips":["10.244.1.5","fd00::5"],"wait_ms":5000}"#;
        let Op::Add(add) = serde_json::from_str::<Request>(full).unwrap().op else { panic!("not an add") };
        assert_eq!(add.uid, "0b5f0c4e-6a0e-4f3e-9d1a-2c8e1f7a9b10");
        assert_eq!(add.ips, ["10.244.1.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        let bare = r#"{"v":1,"op":"add","namespace":"demo","name":"web","container_id":"c1","netns":"/n","wait_ms":0}"#;
        let Op::Add(add) = serde_json::from_str::<Request>(bare).unwrap().op else { panic!("not an add") };
        assert!(add.uid.is_empty() && add.ips.is_empty() && add.ifname.is_empty());
        assert!(serde_json::from_str::<Request>(r#"{"v":1,"op":"add","namespace":"demo","name":"web"}"#).is_err());
    }

    #[test]
    fn responses_round_trip() {
        for outcome in [Outcome::Enrolled, Outcome::NotCaptured, Outcome::Error { message: "no".into() }] {
            let text = serde_json::to_string(&Response::new(outcome.clone())).unwrap();
            let back: Response = serde_json::from_str(&text).unwrap();
            assert_eq!(back.outcome, outcome);
        }
        let text = serde_json::to_string(&Response::new(Outcome::NotCaptured)).unwrap();
        assert_eq!(text, r#"{"v":1,"result":"not_captured"}"#);
    }
}
