//! Events for `proxy-agent trace`: a translation or drop is written to the `trace_events` ring
//! buffer only while `trace_on` holds a time in the future, so with nobody tracing each caller
//! pays one array lookup (and no clock read).

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use proxy_common::trace::{NOT_DROPPED, TraceEvent};

use crate::{
    lb::Selected,
    maps::{TRACE_EVENTS, TRACE_ON},
};

/// Whether a trace client is reading now.
#[inline(always)]
pub fn on() -> bool {
    let Some(until) = TRACE_ON.get(0).copied() else { return false };
    // SAFETY: a plain helper call without arguments.
    until != 0 && unsafe { bpf_ktime_get_coarse_ns() } < until
}

/// An event of a translation to `selected`, the rest of its fields zero (the caller fills in
/// the client and SNAT side).
#[inline(always)]
pub fn translated(path: u8, proto: u8, frontend: [u8; 4], frontend_port: u16, selected: &Selected) -> TraceEvent {
    TraceEvent {
        path,
        proto,
        frontend,
        frontend_port,
        backend: selected.backend.address,
        backend_port: selected.backend.port,
        backend_id: selected.id,
        service_id: selected.service_id,
        pick: selected.pick,
        scope: selected.scope,
        slot: selected.slot,
        drop_reason: NOT_DROPPED,
        ..TraceEvent::default()
    }
}

/// An event of a drop of traffic to a frontend for `reason` (`proxy_common::drop`).
#[inline(always)]
pub fn dropped(path: u8, proto: u8, frontend: [u8; 4], frontend_port: u16, reason: u32) -> TraceEvent {
    TraceEvent { path, proto, frontend, frontend_port, drop_reason: reason, ..TraceEvent::default() }
}

/// Stamps `event` with the time and writes it; a full ring loses the event, never traffic.
#[inline(always)]
pub fn emit(mut event: TraceEvent) {
    // SAFETY: a plain helper call without arguments.
    event.time_ns = unsafe { bpf_ktime_get_ns() };
    if let Some(mut entry) = TRACE_EVENTS.reserve(0) {
        entry.write(event);
        entry.submit(0);
    }
}
