//! The flow table of the TC path: opening a flow (both directions) and following its TCP state.

use proxy_common::{
    addr::Addr,
    conntrack::{
        CT_F_CLOSING, CT_F_DSR, CT_F_FIN, CT_F_LOCAL, CT_F_PEER_FIN, CT_F_REPLY, CT_F_SNAT, CtKey, CtValue,
        with_close_bits,
    },
    drop,
    proto::TCP,
};

use super::{
    nat,
    packet::{Packet, TCP_FIN, TCP_RST},
};
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};

use crate::{lb::Selected, maps::CONNTRACK};

/// A conntrack entry's `last_seen_ns` is refreshed at most this often.
const REFRESH_NS: u64 = 1_000_000_000;

/// Refreshes a tracked flow's state for this packet. A FIN half-closes the flow (both entries
/// learn it: the one it went through and the other direction's); FINs both ways or a RST close
/// it. Only the first FIN or RST of an entry does more than the usual refresh.
pub fn track(value: &mut CtValue, packet: &Packet, now: u64) {
    let (here, there) = if packet.tcp_flags & TCP_RST != 0 {
        (CT_F_CLOSING, CT_F_CLOSING)
    } else if packet.tcp_flags & TCP_FIN != 0 {
        (CT_F_FIN, CT_F_PEER_FIN)
    } else {
        (0, 0)
    };
    if here != 0 && value.flags & here == 0 {
        value.flags = with_close_bits(value.flags, here);
        value.last_seen_ns = now;
        mark_other_direction(value, there, now);
    } else if now.saturating_sub(value.last_seen_ns) > REFRESH_NS {
        value.last_seen_ns = now;
    }
}

/// Adds `bits` to the flow's other entry: the one keyed by the reverse of `value`'s
/// translated tuple (reply ↔ original).
fn mark_other_direction(value: &CtValue, bits: u16, now: u64) {
    let key =
        CtKey { src: value.dst, dst: value.src, sport: value.dport, dport: value.sport, proto: TCP, _pad: [0; 3] };
    let Some(other) = CONNTRACK.get_ptr_mut(key) else { return };
    // SAFETY: the pointer comes from a successful lookup; fields are plain integers. Two CPUs
    // closing both directions at once may lose a bit: that flow then keeps the close-wait
    // timeout, as long as kube-proxy keeps a half-closed one.
    let other = unsafe { &mut *other };
    if (other.flags ^ value.flags) & CT_F_REPLY != 0 && other.backend_id == value.backend_id {
        other.flags = with_close_bits(other.flags, bits);
        other.last_seen_ns = now;
    }
}

/// A new flow's entries, built in per-CPU map memory: beside the rest of a new flow's state
/// they do not fit the 512-byte BPF stack.
#[repr(C)]
pub struct FlowScratch {
    forward: CtValue,
    reply: CtValue,
    reply_key: CtKey,
}

/// Scratch space of [`open_flow`], one per CPU (a program runs to its end on one CPU).
#[btf_map(name = "flow_scratch")]
static FLOW_SCRATCH: PerCpuArray<FlowScratch, 1> = PerCpuArray::new();

/// Records a new flow in both directions and returns the original direction's translation
/// (in per-CPU scratch memory, valid until the program ends), or the drop reason: `snat`: the
/// node address to translate the source to (with a free port); `flags`: `CT_F_LOCAL` (the
/// backend is one of the node's own addresses) or `CT_F_DSR` (direct server return), kept on
/// both entries.
#[inline(always)]
#[expect(clippy::needless_borrows_for_generic_args, reason = "a copy would land on the BPF stack")]
pub fn open_flow(
    packet: &Packet,
    selected: &Selected,
    snat: Option<Addr>,
    flags: u16,
    now: u64,
) -> Result<&'static CtValue, u32> {
    let scratch = FLOW_SCRATCH.get_ptr_mut(0).ok_or(drop::CONNTRACK_INSERT_FAILED)?;
    // SAFETY: a per-CPU array element, used only by this program run on this CPU.
    let FlowScratch { forward, reply, reply_key } = unsafe { &mut *scratch };
    let backend = &selected.backend;
    let kept = flags & (CT_F_LOCAL | CT_F_DSR);
    *forward = CtValue {
        src: packet.src,
        dst: backend.address,
        sport: packet.sport,
        dport: backend.port,
        backend_id: selected.id,
        last_seen_ns: now,
        flags: kept,
        _pad: [0; 6],
    };
    *reply = CtValue {
        src: packet.dst,
        dst: packet.src,
        sport: packet.dport,
        dport: packet.sport,
        backend_id: selected.id,
        last_seen_ns: now,
        flags: CT_F_REPLY | kept,
        _pad: [0; 6],
    };
    *reply_key = CtKey {
        src: backend.address,
        dst: packet.src,
        sport: backend.port,
        dport: packet.sport,
        proto: packet.proto,
        _pad: [0; 3],
    };
    if let Some(address) = snat {
        forward.src = address;
        forward.flags |= CT_F_SNAT;
        reply_key.dst = address;
        forward.sport = nat::claim_port(reply_key, reply).ok_or(drop::SNAT_PORTS_EXHAUSTED)?;
    } else {
        CONNTRACK.insert(&*reply_key, &*reply, 0).map_err(|_| drop::CONNTRACK_INSERT_FAILED)?;
    }
    CONNTRACK.insert(packet.key(), &*forward, 0).map_err(|_| drop::CONNTRACK_INSERT_FAILED)?;
    Ok(forward)
}

/// Whether a tracked entry is still to be followed: not expired, not reopened by a new
/// connection, and its backend still exists (removed from every service: not followed).
pub fn follows(value: &CtValue, packet: &Packet, now: u64) -> bool {
    !packet.reopens(value.flags)
        && !proxy_common::conntrack::expired(value.flags, packet.proto, value.last_seen_ns, now)
        && crate::lb::backend_exists(value.backend_id)
}
