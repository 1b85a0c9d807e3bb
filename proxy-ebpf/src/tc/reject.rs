//! kube-proxy's REJECT for a pod's packet to a frontend without endpoints
//! (`--bpf-lb-sock-hostns-only`), answered on the node, where a packet handed to the stack
//! would only be routed on towards the service address: a TCP segment becomes a reset, a UDP
//! datagram an ICMP (ICMPv6) port unreachable quoting it, from the frontend, sent back out of
//! the interface it came in on. The pod's `connect()` (or connected UDP socket) then fails with
//! ECONNREFUSED at once. A reset rather than ICMP for TCP: the SYN's answer arrives while
//! `connect()` still holds its socket, and TCP drops ICMP errors then (it keeps segments).
//!
//! Only a first fragment without IPv4 options or IPv6 extension headers is answered (what pods
//! send); any other is dropped.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::proto::TCP;

use super::{
    icmp::{ICMP, ICMP_DEST_UNREACH, ICMPV6, ICMPV6_DEST_UNREACH},
    ipv6::{ETH_P_IPV6, IP6_HLEN},
    nat::{self, v4_word},
    packet::{ETH_HLEN, ETH_P_IP, Family, IP_HLEN, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The ICMP header, and TCP's fixed header.
const ICMP_HLEN: usize = 8;
const TCP_HLEN: usize = 20;
/// What an ICMP error about a datagram quotes: its IP header and UDP header, in words.
const V4_QUOTE: usize = (IP_HLEN + 8) / 4;
const V6_QUOTE: usize = (IP6_HLEN + 8) / 4;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_PORT_UNREACH: u8 = 4;
const TTL: u8 = 64;

/// Answers `packet` with a reset or a port unreachable and sends that back out of the
/// interface the packet arrived on; drops the packet when it cannot.
#[inline(never)]
pub fn reject(ctx: &TcContext, packet: &Packet) -> i32 {
    let built = match (packet.family, packet.proto == TCP) {
        (Family::V4, true) => reset_v4(ctx, packet),
        (Family::V6, true) => reset_v6(ctx, packet),
        (Family::V4, false) => unreachable_v4(ctx, packet),
        (Family::V6, false) => unreachable_v6(ctx, packet),
    };
    if built.is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: the context pointer is the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: a plain helper call; flags 0: out of (egress) the interface.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// The TCP header of the reset answering a segment (RFC 9293 3.10.7.1): ports swapped; to a
/// segment with ACK, sequence number its acknowledgment; to one without (a SYN), sequence 0
/// and an ACK of everything it occupied (`seq`, `length` bytes of data, SYN and FIN). The
/// checksum field is 0. `numbers`: the segment's sequence and acknowledgment numbers.
#[inline(always)]
fn reset_header(packet: &Packet, numbers: [u32; 2], length: u32) -> [u32; TCP_HLEN / 4] {
    let [seq, ack] = numbers.map(u32::from_be);
    let (sport, dport) = (packet.dport.to_be_bytes(), packet.sport.to_be_bytes());
    let ports = u32::from_ne_bytes([sport[0], sport[1], dport[0], dport[1]]);
    let offset = (TCP_HLEN as u8 / 4) << 4;
    if packet.tcp_flags & TCP_ACK != 0 {
        return [ports, ack.to_be(), 0, u32::from_ne_bytes([offset, TCP_RST, 0, 0]), 0];
    }
    let occupied = length + u32::from(packet.tcp_flags & TCP_SYN != 0) + u32::from(packet.tcp_flags & TCP_FIN != 0);
    [ports, 0, seq.wrapping_add(occupied).to_be(), u32::from_ne_bytes([offset, TCP_RST | TCP_ACK, 0, 0]), 0]
}

/// IPv4 TCP: `[eth][ip][tcp]`, a reset from the frontend to the pod.
#[inline(never)]
fn reset_v4(ctx: &TcContext, packet: &Packet) -> Result<(), i64> {
    if !packet.has_l4 || packet.l4 != ETH_HLEN + IP_HLEN {
        return Err(0);
    }
    let macs: [u8; 12] = ctx.load(0)?;
    let total = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2)?);
    let numbers: [u32; 2] = ctx.load(packet.l4 + 4)?;
    let offset = usize::from(ctx.load::<u8>(packet.l4 + 12)? >> 4) * 4;
    let length = u32::from(total).saturating_sub((IP_HLEN + offset) as u32);
    // SAFETY: a plain helper call on the program's own skb.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), (ETH_HLEN + IP_HLEN + TCP_HLEN) as u32, 0) };
    if rc < 0 {
        return Err(rc);
    }
    let ip = ipv4_header(packet, 6, TCP_HLEN)?;
    let mut tcp = reset_header(packet, numbers, length);
    // The pseudo header: addresses, zero, protocol, TCP length.
    let pseudo = [ip[3], ip[4], u32::from_ne_bytes([0, 6, 0, TCP_HLEN as u8])];
    let check = fold(sum(&tcp, sum(&pseudo, 0)?)?);
    tcp[4] = u32::from_ne_bytes([check[0], check[1], 0, 0]);
    nat::store(ctx, 0, &ethernet(&macs, ETH_P_IP))?;
    nat::store(ctx, ETH_HLEN, &ip)?;
    nat::store(ctx, ETH_HLEN + IP_HLEN, &tcp)
}

/// IPv6 TCP: `[eth][ipv6][tcp]`, a reset from the frontend to the pod.
#[inline(never)]
fn reset_v6(ctx: &TcContext, packet: &Packet) -> Result<(), i64> {
    if !packet.has_l4 || packet.l4 != ETH_HLEN + IP6_HLEN {
        return Err(0);
    }
    let macs: [u8; 12] = ctx.load(0)?;
    let payload = u16::from_be(ctx.load::<u16>(ETH_HLEN + 4)?);
    let numbers: [u32; 2] = ctx.load(packet.l4 + 4)?;
    let offset = usize::from(ctx.load::<u8>(packet.l4 + 12)? >> 4) * 4;
    let length = u32::from(payload).saturating_sub(offset as u32);
    // SAFETY: a plain helper call on the program's own skb.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), (ETH_HLEN + IP6_HLEN + TCP_HLEN) as u32, 0) };
    if rc < 0 {
        return Err(rc);
    }
    let ip = ipv6_header(packet, 6, TCP_HLEN);
    let mut tcp = reset_header(packet, numbers, length);
    let check = fold(sum(&tcp, pseudo_v6(&ip, 6, TCP_HLEN)?)?);
    tcp[4] = u32::from_ne_bytes([check[0], check[1], 0, 0]);
    nat::store(ctx, 0, &ethernet(&macs, ETH_P_IPV6))?;
    nat::store(ctx, ETH_HLEN, &ip)?;
    nat::store(ctx, ETH_HLEN + IP6_HLEN, &tcp)
}

/// An IPv4 header from the packet's destination to its source, carrying `length` bytes of
/// protocol `proto`, with its checksum.
#[inline(always)]
fn ipv4_header(packet: &Packet, proto: u8, length: usize) -> Result<[u32; IP_HLEN / 4], i64> {
    let total = ((IP_HLEN + length) as u16).to_be_bytes();
    let mut ip = [
        u32::from_ne_bytes([0x45, 0, total[0], total[1]]),
        0,
        u32::from_ne_bytes([TTL, proto, 0, 0]),
        v4_word(&packet.dst),
        v4_word(&packet.src),
    ];
    let check = fold(sum(&ip, 0)?);
    ip[2] = u32::from_ne_bytes([TTL, proto, check[0], check[1]]);
    Ok(ip)
}

/// An IPv6 header from the packet's destination to its source, carrying `length` bytes of
/// protocol `proto`.
#[inline(always)]
fn ipv6_header(packet: &Packet, proto: u8, length: usize) -> [u32; IP6_HLEN / 4] {
    let payload = (length as u16).to_be_bytes();
    let mut ip = [0u32; IP6_HLEN / 4];
    ip[0] = u32::from_ne_bytes([0x60, 0, 0, 0]);
    ip[1] = u32::from_ne_bytes([payload[0], payload[1], proto, TTL]);
    for i in 0..4 {
        let word = |a: &[u8; 16]| u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]]);
        ip[2 + i] = word(&packet.dst);
        ip[6 + i] = word(&packet.src);
    }
    ip
}

/// The sum of an IPv6 pseudo header (RFC 8200 8.1) for `ip`: addresses, upper-layer length,
/// next header.
#[inline(always)]
fn pseudo_v6(ip: &[u32; IP6_HLEN / 4], proto: u8, length: usize) -> Result<u32, i64> {
    let addresses: &[u32; 8] = ip[2..].try_into().map_err(|_| 0i64)?;
    let rest = [(length as u32).to_be(), u32::from_ne_bytes([0, 0, 0, proto])];
    sum(&rest, sum(addresses, 0)?)
}

/// IPv4 UDP: `[eth][ip][icmp][ip and UDP header quoted]`, from the frontend to the pod.
#[inline(never)]
fn unreachable_v4(ctx: &TcContext, packet: &Packet) -> Result<(), i64> {
    if !packet.has_l4 || packet.l4 != ETH_HLEN + IP_HLEN {
        return Err(0);
    }
    let macs: [u8; 12] = ctx.load(0)?;
    let quote: [u32; V4_QUOTE] = ctx.load(ETH_HLEN)?;
    resize(ctx, ETH_HLEN + V4_QUOTE * 4, IP_HLEN + ICMP_HLEN)?;
    let ip = ipv4_header(packet, ICMP, ICMP_HLEN + V4_QUOTE * 4)?;
    let mut icmp = [u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0]), 0];
    let check = fold(sum(&quote, sum(&icmp, 0)?)?);
    icmp[0] = u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, check[0], check[1]]);
    nat::store(ctx, 0, &ethernet(&macs, ETH_P_IP))?;
    nat::store(ctx, ETH_HLEN, &ip)?;
    nat::store(ctx, ETH_HLEN + IP_HLEN, &icmp)
}

/// IPv6 UDP: `[eth][ipv6][icmpv6][ipv6 and UDP header quoted]`, from the frontend to the pod.
#[inline(never)]
fn unreachable_v6(ctx: &TcContext, packet: &Packet) -> Result<(), i64> {
    if !packet.has_l4 || packet.l4 != ETH_HLEN + IP6_HLEN {
        return Err(0);
    }
    let macs: [u8; 12] = ctx.load(0)?;
    let quote: [u32; V6_QUOTE] = ctx.load(ETH_HLEN)?;
    resize(ctx, ETH_HLEN + V6_QUOTE * 4, IP6_HLEN + ICMP_HLEN)?;
    let ip = ipv6_header(packet, ICMPV6, ICMP_HLEN + V6_QUOTE * 4);
    let mut icmp = [u32::from_ne_bytes([ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, 0]), 0];
    let pseudo = pseudo_v6(&ip, ICMPV6, ICMP_HLEN + V6_QUOTE * 4)?;
    let check = fold(sum(&quote, sum(&icmp, pseudo)?)?);
    icmp[0] = u32::from_ne_bytes([ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, check[0], check[1]]);
    nat::store(ctx, 0, &ethernet(&macs, ETH_P_IPV6))?;
    nat::store(ctx, ETH_HLEN, &ip)?;
    nat::store(ctx, ETH_HLEN + IP6_HLEN, &icmp)
}

/// Cuts the packet to its first `keep` bytes (Ethernet header and the part to quote) and makes
/// `room` bytes in front: the old Ethernet header and the room then hold the new headers,
/// and the quote follows them.
#[inline(always)]
fn resize(ctx: &TcContext, keep: usize, room: usize) -> Result<(), i64> {
    // SAFETY: plain helper calls on the program's own skb.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), keep as u32, 0) };
    if rc < 0 {
        return Err(rc);
    }
    // SAFETY: as above.
    let rc = unsafe { bpf_skb_change_head(ctx.skb.skb.cast(), room as u32, 0) };
    if rc < 0 { Err(rc) } else { Ok(()) }
}

/// The reply's Ethernet header: the sender's addresses swapped (`macs`: destination, source).
#[inline(always)]
fn ethernet(macs: &[u8; 12], ether_type: u16) -> [u8; ETH_HLEN] {
    let mut header = [0u8; ETH_HLEN];
    header[..6].copy_from_slice(&macs[6..]);
    header[6..12].copy_from_slice(&macs[..6]);
    header[12..].copy_from_slice(&ether_type.to_be_bytes());
    header
}

/// The one's-complement sum of `words` added to `seed` (`bpf_csum_diff` from nothing).
#[inline(always)]
fn sum<const N: usize>(words: &[u32; N], seed: u32) -> Result<u32, i64> {
    // SAFETY: `words` is valid for N * 4 bytes; the helper only reads it.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, words.as_ptr().cast_mut(), (N * 4) as u32, seed) };
    if sum < 0 { Err(sum) } else { Ok(sum as u32) }
}

/// The checksum field for a sum, as the bytes to store (the sum is of words as they sit in
/// memory, so its fold is too).
#[inline(always)]
fn fold(sum: u32) -> [u8; 2] {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}
