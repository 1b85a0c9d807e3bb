//! Hand-built Ethernet/IPv4/TCP/UDP/ICMP frames for `BPF_PROG_TEST_RUN`, and the checks on
//! what comes out. The Internet checksum here is written from RFC 1071, independently of the
//! programs' incremental updates, so a wrong update cannot agree with it by construction.

use std::net::{Ipv4Addr, SocketAddrV4};

use proxy_common::proto::{TCP, UDP};

/// `IPPROTO_ICMP`.
pub const ICMP: u8 = 1;
/// TCP flag bits.
pub const SYN: u8 = 0x02;
/// TCP ACK.
pub const ACK: u8 = 0x10;
/// ICMP "destination unreachable".
pub const ICMP_DEST_UNREACH: u8 = 3;
const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
/// IPv4 "more fragments".
pub const MORE_FRAGMENTS: u16 = 0x2000;

/// The RFC 1071 Internet checksum of `bytes` (one's complement of the one's-complement sum of
/// 16-bit big-endian words; an odd last byte is padded with zero).
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u64::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The checksum of an L4 segment (`segment` with its checksum field as it is) under the IPv4
/// pseudo header: 0 when the segment's checksum is right.
fn l4_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(12 + segment.len());
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&[0, proto]);
    data.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    data.extend_from_slice(segment);
    checksum(&data)
}

/// A TCP header (no options) and payload, with its checksum.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut segment = vec![0u8; 20];
    segment[0..2].copy_from_slice(&src.port().to_be_bytes());
    segment[2..4].copy_from_slice(&dst.port().to_be_bytes());
    segment[4..8].copy_from_slice(&1u32.to_be_bytes());
    segment[12] = 0x50;
    segment[13] = flags;
    segment[14..16].copy_from_slice(&64240u16.to_be_bytes());
    segment.extend_from_slice(payload);
    let sum = l4_sum(*src.ip(), *dst.ip(), TCP, &segment);
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
    segment
}

/// A UDP header and payload; with `checksum` false the checksum field is 0 ("none").
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], with_checksum: bool) -> Vec<u8> {
    let mut datagram = vec![0u8; 8];
    datagram[0..2].copy_from_slice(&src.port().to_be_bytes());
    datagram[2..4].copy_from_slice(&dst.port().to_be_bytes());
    datagram[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(payload);
    if with_checksum {
        // A computed 0 is sent as 0xffff (RFC 768).
        let sum = match l4_sum(*src.ip(), *dst.ip(), UDP, &datagram) {
            0 => 0xffff,
            sum => sum,
        };
        datagram[6..8].copy_from_slice(&sum.to_be_bytes());
    }
    datagram
}

/// An ICMP error of `icmp_type`/`code` quoting `quoted` (an IPv4 packet, or its first bytes).
pub fn icmp_error(icmp_type: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut message = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    message.extend_from_slice(quoted);
    let sum = checksum(&message);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    message
}

/// An IPv4 header (no options, TTL 64) with its checksum, followed by `payload`. `frag`: the
/// flags and fragment offset field (offset in 8-byte units).
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, id: u16, frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0u8; IP_HLEN];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&((IP_HLEN + payload.len()) as u16).to_be_bytes());
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    packet[6..8].copy_from_slice(&frag.to_be_bytes());
    packet[8] = 64;
    packet[9] = proto;
    packet[12..16].copy_from_slice(&src.octets());
    packet[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&packet);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

/// An Ethernet frame (made-up MACs, EtherType IPv4) around `packet`.
pub fn ethernet(packet: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    frame.extend_from_slice(packet);
    frame
}

/// A whole TCP frame from `src` to `dst`.
pub fn tcp_frame(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    ethernet(&ipv4(*src.ip(), *dst.ip(), TCP, 1, 0, &tcp(src, dst, flags, &[])))
}

/// What a test reads back from a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Source address and port (ports 0 for a packet without an L4 header).
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// IP protocol.
    pub proto: u8,
}

/// The IPv4 header of an Ethernet frame.
pub fn ip_header(frame: &[u8]) -> &[u8] {
    &frame[ETH_HLEN..ETH_HLEN + IP_HLEN]
}

/// The IPv4 payload of an Ethernet frame (after a 20-byte header).
pub fn ip_payload(frame: &[u8]) -> &[u8] {
    let total = usize::from(u16::from_be_bytes([frame[ETH_HLEN + 2], frame[ETH_HLEN + 3]]));
    &frame[ETH_HLEN + IP_HLEN..ETH_HLEN + total]
}

/// Addresses, ports and protocol of a TCP/UDP frame (a first fragment or a whole packet).
pub fn seen(frame: &[u8]) -> Seen {
    let ip = ip_header(frame);
    let l4 = ip_payload(frame);
    let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    Seen { src: SocketAddrV4::new(addr(12), port(0)), dst: SocketAddrV4::new(addr(16), port(2)), proto: ip[9] }
}

/// Whether the frame's IPv4 header checksum is right.
pub fn ip_checksum_ok(frame: &[u8]) -> bool {
    checksum(ip_header(frame)) == 0
}

/// Whether the L4 checksum of `segment` (a whole TCP segment or UDP datagram) between the
/// addresses is right.
pub fn l4_checksum_ok(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> bool {
    l4_sum(src, dst, proto, segment) == 0
}

/// Whether the TCP/UDP checksum of an unfragmented frame is right.
pub fn frame_l4_checksum_ok(frame: &[u8]) -> bool {
    let s = seen(frame);
    l4_checksum_ok(*s.src.ip(), *s.dst.ip(), s.proto, ip_payload(frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's worked example: the words 0001 f203 f4f5 f6f7 sum to ddf2, checksum 220d.
    #[test]
    fn the_checksum_matches_rfc_1071s_example() {
        assert_eq!(checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
    }

    #[test]
    fn built_frames_carry_correct_checksums() {
        let a = SocketAddrV4::new(Ipv4Addr::new(172, 18, 0, 100), 40000);
        let b = SocketAddrV4::new(Ipv4Addr::new(172, 18, 0, 2), 30066);
        let frame = tcp_frame(a, b, SYN);
        assert!(ip_checksum_ok(&frame) && frame_l4_checksum_ok(&frame));
        assert_eq!(seen(&frame), Seen { src: a, dst: b, proto: TCP });
        let frame = ethernet(&ipv4(*a.ip(), *b.ip(), UDP, 7, 0, &udp(a, b, b"odd", true)));
        assert!(ip_checksum_ok(&frame) && frame_l4_checksum_ok(&frame));
    }
}
