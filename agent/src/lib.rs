//! weft: a sidecarless service mesh. One crate, one binary (`weft`), subcommands in `main.rs`.
//!
//! Layering (imports only point down the list; `app` alone wires everything together):
//! - bottom: `config`, `crd`, `identity`, `netns`, `drain`, `metrics`, `policy`, `reclaim`, `state`
//! - middle: `discovery` (feeds `state`), `redirect` (eBPF), `proxy` (HBONE tunnel, in-pod listeners),
//!   `waypoint` (L7 proxy; uses `proxy::hbone`)
//! - top: `admin` (HTTP endpoints), `uninstall` (removing weft from a node), `app`
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod ca_server;
pub mod cni;
pub mod config;
pub mod crd;
pub mod ctl;
pub mod discovery;
pub mod drain;
pub mod identity;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod reclaim;
pub mod redirect;
pub mod state;
pub mod uninstall;
pub mod waypoint;
