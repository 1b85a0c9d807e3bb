//! ICMP and ICMPv6 errors about tracked flows, on their way back to the client.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use network_types::ip::Ipv4Hdr;
use proxy_common::{
    addr::{self, Addr},
    conntrack::{CT_F_REPLY, CtKey, CtValue},
    drop,
    proto::{TCP, UDP},
};

use super::{
    fib,
    ipv6::{self, ETH_P_IPV6, IP6_DST, IP6_NEXTHDR, IP6_SRC},
    nat,
    packet::{ETH_HLEN, ETH_P_IP, ETH_TYPE, IP_CSUM, IP_DST, IP_OFFSET},
};
use crate::{drops, maps::CONNTRACK};

pub(super) const ICMP: u8 = 1;
pub(super) const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

pub(super) const ICMPV6: u8 = 58;
/// ICMPv6 errors (RFC 4443): destination unreachable, packet too big, time exceeded, parameter
/// problem. Informational messages (echo, neighbour discovery: 128 and up) are left alone.
pub(super) const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMPROB: u8 = 4;
/// Offsets in an IPv6 header of its next-header field and addresses.
const NEXTHDR: usize = 6;
const SRC: usize = 8;
const DST: usize = 24;
/// Offset of the checksum in an ICMP or ICMPv6 header, and of the quoted packet.
const ICMP_CSUM: usize = 2;
const ICMP_QUOTE: usize = 8;

/// An ICMP (IPv4) or ICMPv6 error about a tracked flow is translated back; anything else
/// passes ([`super::pass`]: on to the older programs while an upgrade hands over). Each family's in a function of its own (a BPF-to-BPF call): their
/// frames sit side by side, not on top of each other.
#[inline(always)]
pub fn icmp_error(ctx: &TcContext) -> i32 {
    match ctx.load::<[u8; 2]>(ETH_TYPE).map(u16::from_be_bytes) {
        Ok(ETH_P_IP) => icmp4_error(ctx),
        Ok(ETH_P_IPV6) => icmp6_error(ctx),
        // ARP and the rest: not IP at all.
        _ => super::pass(),
    }
}

#[inline(never)]
fn icmp4_error(ctx: &TcContext) -> i32 {
    let Some(verdict) = try_icmp4_error(ctx) else { return super::pass() };
    verdict
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) about a packet of
/// a tracked flow, on its way back: it quotes the translated packet, so the client would not
/// recognise it. Rewrites the outer destination and the quoted header back to what the client
/// sent (its address and port to the frontend's), and forwards it to the client. `None`: not
/// such an error.
#[inline(always)]
fn try_icmp4_error(ctx: &TcContext) -> Option<i32> {
    let ip: Ipv4Hdr = ctx.load(ETH_HLEN).ok()?;
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ip.proto != ICMP || ihl < 20 || u16::from_be_bytes(ip.frags) & IP_OFFSET != 0 {
        return None;
    }
    let icmp = ETH_HLEN + ihl;
    let icmp_type: u8 = ctx.load(icmp).ok()?;
    if !matches!(icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB) {
        return None;
    }
    let inner_ip = icmp + 8;
    let inner: Ipv4Hdr = ctx.load(inner_ip).ok()?;
    let inner_ihl = usize::from(inner.vihl & 0x0f) * 4;
    if (inner.proto != TCP && inner.proto != UDP) || inner_ihl < 20 {
        return None;
    }
    let inner_l4 = inner_ip + inner_ihl;
    let ports: [u8; 4] = ctx.load(inner_l4).ok()?;
    let (sport, dport) = (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]));
    // The quoted packet went (node or client → backend); its flow's reply entry is keyed the
    // other way round and says what the client expects.
    let reply = CtKey {
        src: addr::from_v4(inner.dst_addr),
        dst: addr::from_v4(inner.src_addr),
        sport: dport,
        dport: sport,
        proto: inner.proto,
        _pad: [0; 3],
    };
    // SAFETY: map memory, read while this program runs; an update by another CPU meanwhile
    // changes a flow's timestamps and flags, never the addresses and ports read here. Not
    // copied: the BPF stack has no room for a copy beside the rest.
    let to = unsafe { CONNTRACK.get(reply) }?;
    if to.flags & CT_F_REPLY == 0 {
        return None;
    }
    let outer_dst = u32::from_ne_bytes(ip.dst_addr);
    let client = nat::v4_word(&to.dst);
    let fix = || -> Result<(), i64> {
        ctx.l3_csum_replace(IP_CSUM, u64::from(outer_dst), u64::from(client), 4)?;
        ctx.store(IP_DST, &client, 0)?;
        // Quoted addresses: the quoted header's own checksum absorbs the change, so the ICMP
        // checksum (which covers both) stays right.
        for (offset, old, new) in [(12, inner.src_addr, &to.dst), (16, inner.dst_addr, &to.src)] {
            let (old, new) = (u32::from_ne_bytes(old), nat::v4_word(new));
            ctx.l3_csum_replace(inner_ip + 10, u64::from(old), u64::from(new), 4)?;
            ctx.store(inner_ip + offset, &new, 0)?;
        }
        quoted_ports(ctx, icmp, inner_l4, (sport, dport), to)
    };
    if fix().is_err() {
        return Some(drops::shot(drop::REWRITE_FAILED));
    }
    Some(fib::forward(ctx, &addr::from_v4(ip.src_addr), &to.dst))
}

/// The ICMPv6 twin of [`try_icmp4_error`]. Its checksum covers a pseudo header (so the outer
/// destination) and the whole message (so the quoted addresses and ports): both changes are
/// folded in. A quoted packet with extension headers before its TCP/UDP header is not
/// translated (routers quote what they forward; ours carry none).
#[inline(never)]
fn icmp6_error(ctx: &TcContext) -> i32 {
    let Some(verdict) = try_icmp6_error(ctx) else { return super::pass() };
    verdict
}

#[inline(always)]
#[expect(clippy::needless_borrows_for_generic_args, reason = "a copy would land on the BPF stack")]
fn try_icmp6_error(ctx: &TcContext) -> Option<i32> {
    let upper = ipv6::walk(ctx, ctx.load(IP6_NEXTHDR).ok()?).ok()?;
    if upper.proto != ICMPV6 || upper.fragment.is_some() {
        return None;
    }
    let icmp = upper.offset;
    let icmp_type: u8 = ctx.load(icmp).ok()?;
    if !(ICMPV6_DEST_UNREACH..=ICMPV6_PARAMPROB).contains(&icmp_type) {
        return None;
    }
    let inner_ip = icmp + ICMP_QUOTE;
    let inner_proto: u8 = ctx.load(inner_ip + NEXTHDR).ok()?;
    if inner_proto != TCP && inner_proto != UDP {
        return None;
    }
    let inner_l4 = inner_ip + ipv6::IP6_HLEN;
    let ports: [u8; 4] = ctx.load(inner_l4).ok()?;
    let (sport, dport) = (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]));
    // As for IPv4: the reply entry, keyed the other way round from the quoted packet.
    let reply = CtKey {
        src: ctx.load(inner_ip + DST).ok()?,
        dst: ctx.load(inner_ip + SRC).ok()?,
        sport: dport,
        dport: sport,
        proto: inner_proto,
        _pad: [0; 3],
    };
    // SAFETY: as in `try_icmp4_error`.
    let to = unsafe { CONNTRACK.get(&reply) }?;
    if to.flags & CT_F_REPLY == 0 {
        return None;
    }
    let outer_dst: Addr = ctx.load(IP6_DST).ok()?;
    let fix = || -> Result<(), i64> {
        let csum = icmp + ICMP_CSUM;
        // The outer destination is in the pseudo header.
        let diff = nat::csum_diff(&words(&outer_dst), &words(&to.dst))?;
        ctx.l4_csum_replace(csum, 0, diff, u64::from(BPF_F_PSEUDO_HDR))?;
        nat::store(ctx, IP6_DST, &to.dst)?;
        // The quoted addresses are message bytes: quoted (source, destination) go from the
        // reply key's (destination, source) to the entry's (destination, source). A sum does
        // not mind the order, so one difference over both pairs as they sit in key and entry.
        // SAFETY: both start with their source and destination address (`repr(C)`).
        let diff = unsafe { nat::csum_diff(&*nat::addresses(&reply), &*nat::addresses(to))? };
        ctx.l4_csum_replace(csum, 0, diff, 0)?;
        nat::store(ctx, inner_ip + SRC, &to.dst)?;
        nat::store(ctx, inner_ip + DST, &to.src)?;
        quoted_ports(ctx, icmp, inner_l4, (sport, dport), to)
    };
    if fix().is_err() {
        return Some(drops::shot(drop::REWRITE_FAILED));
    }
    let router: Addr = ctx.load(IP6_SRC).ok()?;
    Some(fib::forward(ctx, &router, &to.dst))
}

/// Rewrites the quoted packet's ports (`ports`: source, destination as quoted) to the
/// client's and the frontend's (`to`, a reply entry); they are plain message bytes for the
/// ICMP checksum at `icmp`.
#[inline(always)]
fn quoted_ports(ctx: &TcContext, icmp: usize, inner_l4: usize, ports: (u16, u16), to: &CtValue) -> Result<(), i64> {
    for (offset, old, new) in [(0, ports.0, to.dport), (2, ports.1, to.sport)] {
        ctx.l4_csum_replace(icmp + ICMP_CSUM, u64::from(old.to_be()), u64::from(new.to_be()), 2)?;
        ctx.store(inner_l4 + offset, &new.to_be(), 0)?;
    }
    Ok(())
}

/// An address as the four words `bpf_csum_diff` reads.
fn words(address: &Addr) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([address[i], address[i + 1], address[i + 2], address[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}
