//! ICMP errors about tracked flows, on their way back to the client.

use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use proxy_common::{
    addr,
    conntrack::{CT_F_REPLY, CtKey},
    drop,
    proto::{TCP, UDP},
};

use super::{
    fib, nat,
    packet::{ETH_HLEN, IP_CSUM, IP_DST, IP_OFFSET},
};
use crate::{drops, maps::CONNTRACK};

const ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// An ICMP error (destination unreachable, time exceeded, parameter problem) about a packet of
/// a tracked flow, on its way back: it quotes the translated packet, so the client would not
/// recognise it. Rewrites the outer destination and the quoted header back to what the client
/// sent (its address and port to the frontend's), and forwards it to the client. `None`: not
/// such an error.
pub fn icmp_error(ctx: &TcContext) -> Option<i32> {
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
        // Quoted ports are plain ICMP payload.
        for (offset, old, new) in [(0, sport, to.dport), (2, dport, to.sport)] {
            ctx.l4_csum_replace(icmp + 2, u64::from(old.to_be()), u64::from(new.to_be()), 2)?;
            ctx.store(inner_l4 + offset, &new.to_be(), 0)?;
        }
        Ok(())
    };
    if fix().is_err() {
        return Some(drops::shot(drop::REWRITE_FAILED));
    }
    Some(fib::forward(ctx, &addr::from_v4(ip.src_addr), &to.dst))
}
