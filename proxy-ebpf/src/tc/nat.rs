//! Address and port translation: the SNAT address and port of a new flow, and the rewrite of a
//! packet's addresses, ports and checksums.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    helpers::{bpf_csum_diff, bpf_get_prandom_u32, bpf_skb_store_bytes},
    programs::TcContext,
};
use proxy_common::{
    addr::{self, Addr},
    conntrack::{CtKey, CtValue, SNAT_PORT_MAX, SNAT_PORT_MIN},
    proto::{TCP, UDP},
    service::SVC_F_NODE_PORT,
};

use super::{
    ipv6::IP6_SRC,
    packet::{Family, IP_CSUM, IP_SRC, Packet},
};
use crate::maps::{CONFIG, CONNTRACK};

use core::mem::offset_of;

/// Attempts at a free SNAT port before the new flow is dropped.
const SNAT_TRIES: u32 = 16;

/// The node address to SNAT to: the frontend itself when it is a node address (NodePort),
/// else the node's configured address.
pub fn snat_address(flags: u16, frontend: Addr) -> Option<Addr> {
    if flags & SVC_F_NODE_PORT != 0 {
        return Some(frontend);
    }
    let config = CONFIG.get(0)?;
    let address = if addr::is_v4(&frontend) { config.snat_v4 } else { config.snat_v6 };
    (address != addr::UNSPECIFIED).then_some(address)
}

/// Claims a free SNAT port for a flow whose reply entry is `reply` under `reply_key` (its
/// destination port is set to the port): a port is ours only if no flow holds that reply
/// tuple yet, so the reply entry is inserted here (`reply_key` with that port). `None`: every
/// port tried was taken.
#[expect(clippy::needless_borrows_for_generic_args, reason = "a copy would land on the BPF stack")]
pub fn claim_port(reply_key: &mut CtKey, reply: &CtValue) -> Option<u16> {
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    for _ in 0..SNAT_TRIES {
        // SAFETY: a plain helper call without arguments.
        let random = unsafe { bpf_get_prandom_u32() };
        let port = SNAT_PORT_MIN + (random % span) as u16;
        reply_key.dport = port;
        if CONNTRACK.insert(&*reply_key, reply, u64::from(BPF_NOEXIST)).is_ok() {
            return Some(port);
        }
    }
    None
}

/// Rewrites the packet to `to`: addresses, ports, the IPv4 and the L4 checksum.
pub fn rewrite(ctx: &TcContext, packet: &Packet, to: &CtValue) -> Result<(), i64> {
    let csum = packet.l4_csum();
    // A later fragment has no L4 header (its checksum was fixed in the first one); a UDP
    // checksum of zero means "none" over IPv4: keep it so. (IPv6 forbids it: always fixed.)
    let l4_csum = packet.has_l4 && (packet.proto == TCP || packet.family == Family::V6 || ctx.load::<u16>(csum)? != 0);
    // A UDP checksum that comes out 0 is sent as 0xffff (0 would mean "none").
    let mangled = if packet.proto == UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    // The ports, in the L4 header itself (not in a later fragment).
    let port_word = |sport: u16, dport: u16| {
        let (s, d) = (sport.to_be_bytes(), dport.to_be_bytes());
        u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
    };
    let (old_ports, new_ports) = (port_word(packet.sport, packet.dport), port_word(to.sport, to.dport));
    let mut store_ports = packet.has_l4 && old_ports != new_ports;
    if store_ports && l4_csum {
        ctx.l4_csum_replace(csum, 0, words_diff(&[old_ports], &[new_ports]), mangled)?;
    }
    // Source and destination address are adjacent: one checksum difference, one store. The
    // L4 checksum covers them through the pseudo header. IPv4's differences are summed here
    // rather than by `bpf_csum_diff`: a few instructions against a helper call per packet.
    if packet.family == Family::V6 {
        if packet.src != to.src || packet.dst != to.dst {
            // IPv6 has no header checksum: only the L4 one covers the addresses.
            // SAFETY: both are the first 32 bytes of `repr(C)` structs (source, destination).
            let (old, new) = unsafe { (&*addresses(packet), &*addresses(to)) };
            if l4_csum {
                // Eight words: summed by the helper, as summed here they spill registers onto
                // this frame, which sits deep in new_flow's chain.
                ctx.l4_csum_replace(csum, 0, csum_diff(old, new)?, u64::from(BPF_F_PSEUDO_HDR) | mangled)?;
            }
            store(ctx, IP6_SRC, new)?;
        }
    } else {
        let old = [v4_word(&packet.src), v4_word(&packet.dst)];
        let new = [v4_word(&to.src), v4_word(&to.dst), new_ports];
        if old[0] != new[0] || old[1] != new[1] {
            let diff = words_diff(&old, &[new[0], new[1]]);
            ctx.l3_csum_replace(IP_CSUM, 0, diff, 0)?;
            if l4_csum {
                ctx.l4_csum_replace(csum, 0, diff, u64::from(BPF_F_PSEUDO_HDR) | mangled)?;
            }
            // Without IP options the ports follow the addresses: one store for both.
            let with_ports = store_ports && packet.l4 == IP_SRC + 8;
            store_prefix(ctx, IP_SRC, &new, if with_ports { 12 } else { 8 })?;
            store_ports &= !with_ports;
        }
    }
    if store_ports {
        ctx.store(packet.l4, &new_ports, 0)?;
    }
    Ok(())
}

/// Stores the first `len` bytes of `bytes` into the packet at `offset`.
#[inline(always)]
fn store_prefix<T>(ctx: &TcContext, offset: usize, bytes: &T, len: u32) -> Result<(), i64> {
    let len = len.min(size_of::<T>() as u32);
    // SAFETY: `bytes` is valid for `len` bytes (at most its size); the helper only reads it.
    let rc = unsafe { bpf_skb_store_bytes(ctx.skb.skb.cast(), offset as u32, (bytes as *const T).cast(), len, 0) };
    if rc < 0 { Err(rc) } else { Ok(()) }
}

/// The one's-complement difference between two runs of 32-bit words (the sum of the new words
/// and of the old ones' complements, folded to 32 bits), as `bpf_csum_diff` computes it: the
/// `*_csum_replace` helpers' "precomputed difference" form.
#[inline(always)]
fn words_diff<const N: usize>(old: &[u32; N], new: &[u32; N]) -> u64 {
    let mut sum = 0u64;
    for i in 0..N {
        sum += u64::from(!old[i]) + u64::from(new[i]);
    }
    // Carries out of 32 bits go back in (one's complement); twice covers the second carry.
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    (sum & 0xffff_ffff) + (sum >> 32)
}

/// The IPv4 address of a mapped address, as the word the packet holds.
#[inline(always)]
pub fn v4_word(address: &Addr) -> u32 {
    u32::from_ne_bytes([address[12], address[13], address[14], address[15]])
}

/// The source and destination address of a packet or a conntrack value as one 32-byte run:
/// both types hold them first, in that order, and are `repr(C)`. Read through a pointer, not
/// copied: the BPF stack has no room for two copies.
pub fn addresses<T: Addresses>(value: &T) -> *const [u32; 8] {
    (value as *const T).cast()
}

/// Types that start with their source and destination [`Addr`], adjacent (`repr(C)`).
pub trait Addresses {}
impl Addresses for Packet {}
impl Addresses for CtValue {}
impl Addresses for CtKey {}
const _: () = assert!(offset_of!(Packet, src) == 0 && offset_of!(Packet, dst) == 16);
const _: () = assert!(offset_of!(CtValue, src) == 0 && offset_of!(CtValue, dst) == 16);
const _: () = assert!(offset_of!(CtKey, src) == 0 && offset_of!(CtKey, dst) == 16);

/// Stores `bytes` (any size) into the packet at `offset`.
#[inline(always)]
pub fn store<T>(ctx: &TcContext, offset: usize, bytes: &T) -> Result<(), i64> {
    // SAFETY: `bytes` is valid for its size; the helper only reads it.
    let rc = unsafe {
        bpf_skb_store_bytes(ctx.skb.skb.cast(), offset as u32, (bytes as *const T).cast(), size_of::<T>() as u32, 0)
    };
    if rc < 0 { Err(rc) } else { Ok(()) }
}

/// The one's-complement checksum difference between two runs of 32-bit words (`bpf_csum_diff`),
/// for the `*_csum_replace` helpers' "precomputed difference" form.
pub fn csum_diff<const N: usize>(old: &[u32; N], new: &[u32; N]) -> Result<u64, i64> {
    let size = (N * 4) as u32;
    // SAFETY: both pointers are valid for `size` bytes; the helper only reads them.
    let diff = unsafe { bpf_csum_diff(old.as_ptr().cast_mut(), size, new.as_ptr().cast_mut(), size, 0) };
    if diff < 0 { Err(diff) } else { Ok(diff as u64) }
}
