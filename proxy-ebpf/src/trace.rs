//! Events for `proxy-agent trace`: a translation or drop is written to the `trace_events` ring
//! buffer only while `trace_on` holds a time in the future, so with nobody tracing each caller
//! pays one array lookup (and no clock read). Events are filled in place in the ring buffer's
//! memory: a 112-byte event does not fit on the BPF stack beside a new flow's state.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use proxy_common::{
    addr::Addr,
    trace::{NOT_DROPPED, TraceEvent},
};

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

/// Fills in `event` as a translation to `selected` (the caller adds the client and SNAT side).
#[inline(always)]
pub fn translated(
    event: &mut TraceEvent,
    (path, proto): (u8, u8),
    frontend: &Addr,
    frontend_port: u16,
    selected: &Selected,
) {
    event.path = path;
    event.proto = proto;
    event.frontend = *frontend;
    event.frontend_port = frontend_port;
    event.backend = selected.backend.address;
    event.backend_port = selected.backend.port;
    event.backend_id = selected.id;
    event.service_id = selected.service_id;
    event.pick = selected.pick;
    event.scope = selected.scope;
    event.slot = selected.slot;
}

/// Fills in `event` as a drop of traffic to a frontend for `reason` (`proxy_common::drop`).
#[inline(always)]
pub fn dropped(event: &mut TraceEvent, (path, proto): (u8, u8), frontend: &Addr, frontend_port: u16, reason: u32) {
    event.path = path;
    event.proto = proto;
    event.frontend = *frontend;
    event.frontend_port = frontend_port;
    event.drop_reason = reason;
}

/// Writes an event, zeroed, stamped with the time and marked not dropped, then filled in by
/// `fill`; a full ring loses the event, never traffic.
#[inline(always)]
pub fn emit(fill: impl FnOnce(&mut TraceEvent)) {
    let Some(mut entry) = TRACE_EVENTS.reserve(0) else { return };
    let event = entry.as_mut_ptr();
    // SAFETY: the reservation holds a whole `TraceEvent`; zeroing it makes every field (padding
    // included) initialised before it is read or submitted.
    let event = unsafe {
        core::ptr::write_bytes(event, 0, 1);
        &mut *event
    };
    // SAFETY: a plain helper call without arguments.
    event.time_ns = unsafe { bpf_ktime_get_ns() };
    event.drop_reason = NOT_DROPPED;
    fill(event);
    entry.submit(0);
}
