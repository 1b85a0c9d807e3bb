//! The `backends` map: backend id → endpoint address.

use crate::{addr::Addr, user_pod};

/// Key of the `backends` map. Ids are allocated by the agent; 0 is never used.
pub type BackendId = u32;

/// Value of the `backends` map: one endpoint (pod address and target port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Endpoint address ([`crate::addr`]: IPv4 as IPv4-mapped IPv6).
    pub address: Addr,
    /// Endpoint port (the resolved targetPort), host byte order.
    pub port: u16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    /// `BACKEND_F_*` bits: for inspection, and [`BACKEND_F_DSR`] for the datapath.
    pub flags: u8,
}
const _: () = assert!(size_of::<Backend>() == 20);

/// The endpoint runs on this node.
pub const BACKEND_F_LOCAL: u8 = 1 << 0;
/// The endpoint is terminating (used only as the graceful-termination fallback).
pub const BACKEND_F_TERMINATING: u8 = 1 << 1;
/// The endpoint's node runs our programs and takes direct server return (its Node carries
/// the DSR annotation): only such a remote backend gets a DSR flow, any other is SNATed. An
/// additive bit: older programs ignore it, and an older agent's backends lack it (SNAT, which
/// works everywhere).
pub const BACKEND_F_DSR: u8 = 1 << 2;

user_pod!(Backend);
