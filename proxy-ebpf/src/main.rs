//! The kernel side of the load balancer.
//!
//! - `maps`: every map, declared with BTF so `bpftool` prints field names.
//! - `drops`: the per-reason count of every packet or socket call dropped or refused.
//! - `lb`: frontend lookup and backend selection, the one place that decides where traffic goes.
//! - `maglev`: the Maglev table lookup `lb` uses for traffic from outside.
//! - `sock`: cgroup sock_addr programs (socket load balancing for traffic started on the node).
//! - `tc`: the TC ingress and egress programs (NodePort and external traffic: DNAT, SNAT,
//!   conntrack), split by job under `tc/`.
//! - `trace`: events of translations and drops for `proxy-agent trace`, written only while
//!   someone traces.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", deny(warnings))]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(target_arch = "bpf")]
mod drops;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maglev;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod trace;

/// Lets `cargo check --workspace` build this crate for the host; the real object is built for
/// bpfel-unknown-none by proxy-agent's build.rs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves no panic path is reachable; this only satisfies the compiler.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
