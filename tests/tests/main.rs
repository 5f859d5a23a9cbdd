//! The network-namespace and API-double suites of weft, one module per suite, in one test binary
//! (`cargo xtask test` runs it one test at a time: the agent's eBPF is node-global). Root only:
//! a suite that cannot run fails, it never skips.

mod authz_reload;
mod ca_service;
mod cluster_mode;
mod cni;
mod deploy;
mod fail_closed;
mod harness;
mod hbone_garbage;
mod kube_discovery;
mod mesh_traffic;
mod peer_auth;
mod report_events;
mod report_status;
mod uninstall;
mod waypoint;
mod waypoint_cluster;
mod waypoint_resources;
