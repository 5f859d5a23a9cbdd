//! Configuration sources: each turns Kubernetes-shaped objects into one [`crate::state::State`]
//! snapshot and keeps the [`crate::state::StateStore`] current, keeping the last good snapshot when
//! new input is bad. Nothing downstream knows which source fed it.
//!
//! Owns: reading objects (a local YAML file: `file`; the Kubernetes API: `kube`), rejecting bad ones with
//! messages that point at the offending field, and resolving them (named ports, service endpoints,
//! identities, capture). Does not own: what the snapshot means to the data plane (`state`), or
//! policy semantics (`policy`, which it calls to compile and validate policies).

pub mod file;
pub mod kube;
