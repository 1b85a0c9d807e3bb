//! Map keys, values, names and sizes shared by the BPF programs (`proxy-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding and a compile-time size check, so both sides
//! agree on the bytes and `bpftool` prints the fields by name (the maps carry BTF). Addresses are
//! `[u8; 4]` in network order (bpftool shows them as `[10,96,0,10]`); ports are host-order `u16`,
//! converted at the one place each side reads or writes a packet or socket.
#![no_std]

pub mod addr;
pub mod affinity;
pub mod backend;
pub mod config;
pub mod conntrack;
pub mod drop;
pub mod dsr;
pub mod maglev;
pub mod maps;
pub mod service;
pub mod sock;
pub mod trace;

/// IP protocol numbers as they appear in keys (`IPPROTO_*`).
pub mod proto {
    /// `IPPROTO_TCP`.
    pub const TCP: u8 = 6;
    /// `IPPROTO_UDP`.
    pub const UDP: u8 = 17;
    /// `IPPROTO_SCTP`.
    pub const SCTP: u8 = 132;
}

/// Implements `aya::Pod` for map types on the userspace side (as aya-template does).
macro_rules! user_pod {
    ($($ty:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: `#[repr(C)]`, only integer fields, every padding byte is an explicit field.
            unsafe impl aya::Pod for $ty {}
        )+
    };
}
pub(crate) use user_pod;
