//! weft's eBPF programs, one attach point per file. They own the in-kernel half of the
//! redirect: capture outbound TCP connects of enrolled network namespaces (`connect4`,
//! `connect6`), remember each one's original destination for the agent (`sockops`), and steer
//! or refuse inbound plaintext (`sk_lookup`). Maps and events live in `maps`/`event`; the
//! shared layouts in `weft-ebpf-common`. Loading, pinning and attaching belong to the agent's
//! `redirect` module, not here.
#![no_std]
#![no_main]

mod connect4;
mod connect6;
mod event;
mod maps;
mod sk_lookup;
mod sockops;

/// The kernel requires a license string; no GPL-only helper is used, so the project's own
/// license applies.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF cannot unwind and the verifier rejects unbounded loops; rustc still needs a handler.
    loop {}
}
