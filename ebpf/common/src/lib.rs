//! Types shared by the eBPF programs (`ebpf/programs`) and the agent's `redirect` module:
//! map keys and values, ring-buffer events and the constants both sides must agree on.
//! Owned by the redirect work; placeholder until the programs land.
#![no_std]

/// SO_MARK carried by every socket the agent opens inside a pod; the redirect programs let
/// these through untouched (same value as ztunnel's in-pod mark).
pub const AGENT_SOCKET_MARK: u32 = 0x539;
/// In-pod outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod inbound plaintext capture port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE (mTLS HTTP/2 CONNECT) port.
pub const HBONE_PORT: u16 = 15008;
