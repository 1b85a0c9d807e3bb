//! `proxy-agent trace`: the event each program writes to the `trace_events` ring buffer for a
//! translation it makes or a packet or socket call it drops, and the `trace_on` flag that says
//! whether anyone is reading. Events are written only while the flag holds a time in the
//! future, so with nobody tracing the datapath pays one array lookup.

use crate::{addr::Addr, user_pod};

/// The event came from the socket programs (connect/sendmsg).
pub const PATH_SOCKET: u8 = 0;
/// The event came from the TC ingress program (a new flow or a dropped packet).
pub const PATH_TC: u8 = 1;

/// The backend was picked uniformly at random from the frontend's slots ([`TraceEvent::slot`]).
pub const PICK_RANDOM: u8 = 0;
/// The client's ClientIP-affinity entry named the backend.
pub const PICK_AFFINITY: u8 = 1;
/// The flow's hash chose the slot ([`TraceEvent::slot`]) of the backend set's Maglev table.
pub const PICK_MAGLEV: u8 = 2;

/// [`TraceEvent::drop_reason`] of a translation (nothing dropped).
pub const NOT_DROPPED: u32 = u32::MAX;

/// One translation or drop, as written to the `trace_events` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// When, `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// Socket path: the client socket's network namespace cookie. TC: 0.
    pub netns_cookie: u64,
    /// TC: the client's address ([`crate::addr`]). Socket path: zero (see `netns_cookie`).
    pub client: Addr,
    /// The frontend addressed.
    pub frontend: Addr,
    /// The chosen backend; zero for a drop.
    pub backend: Addr,
    /// TC: the node address the flow is SNATed to; zero when not SNATed.
    pub snat: Addr,
    /// TC: the client's port, host order.
    pub client_port: u16,
    /// The frontend port, host order.
    pub frontend_port: u16,
    /// The backend port, host order.
    pub backend_port: u16,
    /// TC: the SNAT port, host order; 0 when not SNATed.
    pub snat_port: u16,
    /// The service port's id (with `SERVICE_ID_LOCAL_SET` when the set holds only this node's
    /// endpoints); 0 for a drop (the agent finds the service from the frontend).
    pub service_id: u32,
    /// The chosen backend's id; 0 for a drop.
    pub backend_id: u32,
    /// A `crate::drop` reason, or [`NOT_DROPPED`].
    pub drop_reason: u32,
    /// [`PATH_SOCKET`] or [`PATH_TC`].
    pub path: u8,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    /// How the backend was chosen: `PICK_*`.
    pub pick: u8,
    /// The backend set picked from: `SCOPE_EXTERNAL` or `SCOPE_INTERNAL` ([`crate::service`]).
    pub scope: u8,
    /// The slot picked at random (`1..=count`) or the Maglev table's slot (`1..=M`); 0 for an
    /// affinity hit or a drop.
    pub slot: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<TraceEvent>() == 112);

/// Value of the `trace_on` array at index 0: until when (CLOCK_MONOTONIC ns, compared with
/// `bpf_ktime_get_coarse_ns()`) the programs write events. 0: nobody traces. A trace client
/// refreshes it every [`REFRESH_NS`] to [`HOLD_NS`] ahead, so a client that dies without
/// clearing it leaves tracing on for at most that long.
pub type TraceUntil = u64;

/// How far ahead a trace client sets [`TraceUntil`].
pub const HOLD_NS: u64 = 3_000_000_000;
/// How often a trace client refreshes [`TraceUntil`].
pub const REFRESH_NS: u64 = 1_000_000_000;

/// Size of the `trace_events` ring buffer in bytes (a power of two multiple of the page size):
/// about 2300 events of 112 bytes (plus the kernel's 8-byte header each); when the reader falls behind,
/// events are lost, never the traffic.
pub const TRACE_EVENTS_BYTES: u32 = 256 * 1024;

user_pod!(TraceEvent);
