//! Direct server return (`proxy_common::dsr`): on the node that receives a flow from outside,
//! the IPv4 option that carries the frontend to the backend's node; on the backend's node,
//! reading it into the `dsr` map and rewriting the backend's replies to come from the
//! frontend, sent straight to the client.
//!
//! Each step is a function of its own (a BPF-to-BPF call): the option's insertion sits on
//! `new_flow`'s or `follow`'s frame, the reply lookup beside them (see [`super`] on the stack).

use aya_ebpf::{bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET, helpers::bpf_csum_diff, programs::TcContext};
use proxy_common::{
    addr,
    conntrack::{CtKey, CtValue},
    dsr::{self, DsrValue, OPT_LEN},
};

use super::{
    CONTINUE, fib, nat,
    packet::{ETH_HLEN, Family, IP_CSUM, IP_HLEN, Packet},
};
use crate::maps::DSR;

/// The longest IPv4 header (options included).
const IP_HLEN_MAX: usize = 60;

/// Adds the option naming the packet's frontend (its destination as it arrived, which the
/// parsed `packet` still holds after the DNAT) behind the IPv4 header of the translated
/// packet, and fixes the header's length, total length and checksum. The L4 checksum covers
/// neither (the pseudo header holds the L4 length, which does not change).
#[inline(never)]
pub fn add_option(ctx: &TcContext, packet: &Packet) -> Result<(), i64> {
    if packet.l4 - ETH_HLEN + usize::from(OPT_LEN) > IP_HLEN_MAX {
        // No room left among the packet's own options.
        return Err(-1);
    }
    let option = dsr::option_words(addr::to_v4(&packet.dst).unwrap_or_default(), packet.dport);
    // Version and header length, TOS, total length: the word the new length changes.
    let old: [u8; 4] = ctx.load(ETH_HLEN)?;
    let total = u16::from_be_bytes([old[2], old[3]]) + u16::from(OPT_LEN);
    let [t0, t1] = total.to_be_bytes();
    let new = [old[0] + OPT_LEN / 4, old[1], t0, t1];
    ctx.adjust_room(i32::from(OPT_LEN), BPF_ADJ_ROOM_NET, 0)?;
    ctx.store(ETH_HLEN, &new, 0)?;
    ctx.store(ETH_HLEN + IP_HLEN, &option, 0)?;
    let diff = nat::csum_diff(&[u32::from_ne_bytes(old)], &[u32::from_ne_bytes(new)])?;
    // The option's words are new to the header: a difference from nothing.
    // SAFETY: `option` is valid for its 8 bytes; the helper only reads it.
    let diff = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, option.as_ptr().cast_mut(), 8, diff as u32) };
    if diff < 0 {
        return Err(diff);
    }
    ctx.l3_csum_replace(IP_CSUM, 0, diff as u64, 0)
}

/// A translated packet of a DSR flow that may open it on the backend's node (a TCP SYN, any
/// UDP datagram): rewritten to `to`, given the option and sent on. Only these carry it, as
/// in Cilium: the backend's node keeps the frontend for the flow's reply tuple from the SYN
/// on, so the rest of a TCP flow is not 8 bytes longer (and no MSS needs lowering for it).
#[inline(never)]
pub fn forward(ctx: &TcContext, packet: &Packet, to: &CtValue) -> i32 {
    if nat::rewrite(ctx, packet, to).is_err() || add_option(ctx, packet).is_err() {
        return crate::drops::shot(proxy_common::drop::REWRITE_FAILED);
    }
    fib::forward(ctx, &to.src, &to.dst)
}

/// On the backend's node: a packet from outside that carries the option has its frontend
/// recorded for the flow's reply tuple (the option stays: the backend's stack ignores an
/// option it does not know, as Cilium leaves it too); a reply of a recorded flow is rewritten
/// to come from the frontend and sent straight to the client. [`CONTINUE`] for any other.
#[inline(never)]
pub fn receive(ctx: &TcContext, packet: &Packet) -> i32 {
    if packet.family != Family::V4 {
        return CONTINUE;
    }
    if packet.l4 >= ETH_HLEN + IP_HLEN + usize::from(OPT_LEN) && learn(ctx, packet) {
        return CONTINUE;
    }
    if packet.is_syn() {
        // A new connection on the tuple without the option (straight to the pod, or SNATed
        // elsewhere): an older DSR flow's frontend must not rewrite its replies.
        forget(packet);
        return CONTINUE;
    }
    reply(ctx, packet)
}

/// The `dsr` key of the packet's flow: its reply tuple (backend → client).
#[inline(always)]
fn reply_key(packet: &Packet) -> CtKey {
    let mut key = packet.key();
    (key.src, key.dst, key.sport, key.dport) = (packet.dst, packet.src, packet.dport, packet.sport);
    key
}

/// Drops what an earlier flow on the packet's tuple recorded.
#[inline(always)]
#[expect(clippy::needless_borrows_for_generic_args, reason = "a copy would land on the BPF stack")]
fn forget(packet: &Packet) {
    let _ = DSR.remove(&reply_key(packet));
}

/// Records the frontend the packet's option names; false if it carries none of ours.
#[inline(always)]
#[expect(clippy::needless_borrows_for_generic_args, reason = "a copy would land on the BPF stack")]
fn learn(ctx: &TcContext, packet: &Packet) -> bool {
    let Ok(words) = ctx.load::<[u32; 2]>(ETH_HLEN + IP_HLEN) else { return false };
    let Some((address, port)) = dsr::parse_option(words) else { return false };
    let key = reply_key(packet);
    let value = DsrValue { address: addr::from_v4(address), port, _pad: [0; 6] };
    // A new connection on a reused tuple names its own frontend: the newest option wins.
    let _ = DSR.insert(&key, &value, 0);
    true
}

/// The translation of a reply that `frontend` answers: from it, to the packet's client.
#[inline(always)]
fn from_frontend(frontend: &DsrValue, packet: &Packet) -> CtValue {
    CtValue { src: frontend.address, dst: packet.dst, sport: frontend.port, dport: packet.dport, ..CtValue::default() }
}

/// A reply of a flow recorded by [`learn`]: from the frontend, straight to the client.
#[inline(always)]
fn reply(ctx: &TcContext, packet: &Packet) -> i32 {
    // SAFETY: the value is copied out at once.
    let Some(frontend) = (unsafe { DSR.get(packet.key()).copied() }) else { return CONTINUE };
    let to = from_frontend(&frontend, packet);
    if nat::rewrite(ctx, packet, &to).is_err() {
        return crate::drops::shot(proxy_common::drop::REWRITE_FAILED);
    }
    fib::forward(ctx, &to.src, &to.dst)
}

/// On the backend's node, leaving through its stack (a hostNetwork backend's reply, seen by
/// the egress program): rewritten to come from the frontend, on its way already.
#[inline(never)]
pub fn reply_leaving(ctx: &TcContext, packet: &Packet) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(frontend) = (unsafe { DSR.get(packet.key()).copied() }) else { return false };
    let to = from_frontend(&frontend, packet);
    nat::rewrite(ctx, packet, &to).is_ok()
}
