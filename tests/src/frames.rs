//! Hand-built Ethernet/IPv4/IPv6/TCP/UDP/ICMP/ICMPv6 frames for `BPF_PROG_TEST_RUN`, and the
//! checks on what comes out. Builders and readers take either family; the family of a frame
//! is read from its IP version. The Internet checksum here is written from RFC 1071, independently of the
//! programs' incremental updates, so a wrong update cannot agree with it by construction.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proxy_common::proto::{TCP, UDP};

/// `IPPROTO_ICMP`.
pub const ICMP: u8 = 1;
/// `IPPROTO_ICMPV6`.
pub const ICMPV6: u8 = 58;
/// IPv6 extension headers: hop-by-hop options, destination options, fragment.
pub const NEXTHDR_HOP: u8 = 0;
/// IPv6 destination options header.
pub const NEXTHDR_DEST: u8 = 60;
/// IPv6 fragment header.
pub const NEXTHDR_FRAGMENT: u8 = 44;
/// ICMPv6 "packet too big".
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
/// ICMPv6 "neighbour solicitation".
pub const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
/// TCP flag bits.
pub const SYN: u8 = 0x02;
/// TCP FIN.
pub const FIN: u8 = 0x01;
/// TCP ACK.
pub const ACK: u8 = 0x10;
/// ICMP "destination unreachable".
pub const ICMP_DEST_UNREACH: u8 = 3;
const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IP6_HLEN: usize = 40;
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

/// The checksum of an L4 segment (`segment` with its checksum field as it is) under the
/// pseudo header of its family (RFC 768/793 for IPv4, RFC 8200 8.1 for IPv6): 0 when the
/// segment's checksum is right. ICMPv6 uses the IPv6 one too.
fn l4_sum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(40 + segment.len());
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            data.extend_from_slice(&src.octets());
            data.extend_from_slice(&dst.octets());
            data.extend_from_slice(&[0, proto]);
            data.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        }
        (src, dst) => {
            data.extend_from_slice(&v6(src).octets());
            data.extend_from_slice(&v6(dst).octets());
            data.extend_from_slice(&(segment.len() as u32).to_be_bytes());
            data.extend_from_slice(&[0, 0, 0, proto]);
        }
    }
    data.extend_from_slice(segment);
    checksum(&data)
}

/// An address as IPv6 (IPv4 as IPv4-mapped).
fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// A TCP header (no options) and payload, with its checksum.
pub fn tcp(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    let mut segment = vec![0u8; 20];
    segment[0..2].copy_from_slice(&src.port().to_be_bytes());
    segment[2..4].copy_from_slice(&dst.port().to_be_bytes());
    segment[4..8].copy_from_slice(&1u32.to_be_bytes());
    segment[12] = 0x50;
    segment[13] = flags;
    segment[14..16].copy_from_slice(&64240u16.to_be_bytes());
    segment.extend_from_slice(payload);
    let sum = l4_sum(src.ip(), dst.ip(), TCP, &segment);
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
    segment
}

/// A UDP header and payload; with `checksum` false the checksum field is 0 ("none", which
/// only IPv4 allows).
pub fn udp(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>, payload: &[u8], with_checksum: bool) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    let mut datagram = vec![0u8; 8];
    datagram[0..2].copy_from_slice(&src.port().to_be_bytes());
    datagram[2..4].copy_from_slice(&dst.port().to_be_bytes());
    datagram[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(payload);
    if with_checksum {
        // A computed 0 is sent as 0xffff (RFC 768).
        let sum = match l4_sum(src.ip(), dst.ip(), UDP, &datagram) {
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

/// An ICMPv6 message of `icmp_type`/`code` from `src` to `dst`: the 4 bytes after the checksum
/// (`word`: a Packet Too Big's MTU, else 0) and `body` (an error's quoted packet), with the
/// checksum over the IPv6 pseudo header and the whole message.
pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, code: u8, word: u32, body: &[u8]) -> Vec<u8> {
    let mut message = vec![icmp_type, code, 0, 0];
    message.extend_from_slice(&word.to_be_bytes());
    message.extend_from_slice(body);
    let sum = l4_sum(src.into(), dst.into(), ICMPV6, &message);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    message
}

/// Whether an ICMPv6 message's checksum (pseudo header and message) is right.
pub fn icmp6_checksum_ok(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> bool {
    l4_sum(src.into(), dst.into(), ICMPV6, message) == 0
}

/// An IPv6 header (hop limit 64) naming `next` as its next header, followed by `payload`
/// (which starts with that header: an extension header or the upper-layer one).
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0u8; IP6_HLEN];
    packet[0] = 0x60;
    packet[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    packet[6] = next;
    packet[7] = 64;
    packet[8..24].copy_from_slice(&src.octets());
    packet[24..40].copy_from_slice(&dst.octets());
    packet.extend_from_slice(payload);
    packet
}

/// An IPv6 options header (hop-by-hop or destination options) of 8 bytes naming `next`: a
/// PadN option fills it.
pub fn options_header(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 fragment header naming `next`: `offset` in 8-byte units, `more` the M flag.
pub fn fragment_header(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut header = vec![next, 0];
    header.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    header.extend_from_slice(&id.to_be_bytes());
    header
}

/// An IP packet of the addresses' family around `payload` (an L4 header and payload): IPv4
/// with `id` and no fragmentation, IPv6 with no extension header.
pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => ipv4(src, dst, proto, id, 0, payload),
        (src, dst) => ipv6(v6(src), v6(dst), proto, payload),
    }
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

/// An Ethernet frame (made-up MACs) around `packet`, its EtherType from the IP version.
pub fn ethernet(packet: &[u8]) -> Vec<u8> {
    let ether_type: [u8; 2] = if packet[0] >> 4 == 6 { [0x86, 0xdd] } else { [0x08, 0x00] };
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, ether_type[0], ether_type[1]];
    frame.extend_from_slice(packet);
    frame
}

/// A whole TCP frame from `src` to `dst` (both of one family).
pub fn tcp_frame(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>, flags: u8) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    ethernet(&ip(src.ip(), dst.ip(), TCP, 1, &tcp(src, dst, flags, &[])))
}

/// A whole UDP frame from `src` to `dst` (both of one family), with a checksum.
pub fn udp_frame(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>, id: u16, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    ethernet(&ip(src.ip(), dst.ip(), UDP, id, &udp(src, dst, payload, true)))
}

/// What a test reads back from a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Source address and port (ports 0 for a packet without an L4 header).
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// IP protocol (IPv6: the last next header).
    pub proto: u8,
}

fn is_v6(frame: &[u8]) -> bool {
    frame[ETH_HLEN] >> 4 == 6
}

/// The IP header of an Ethernet frame: IPv4's 20 bytes or IPv6's fixed 40.
pub fn ip_header(frame: &[u8]) -> &[u8] {
    let len = if is_v6(frame) { IP6_HLEN } else { IP_HLEN };
    &frame[ETH_HLEN..ETH_HLEN + len]
}

/// The IP payload of an Ethernet frame (after a 20-byte IPv4 header, or after IPv6's fixed
/// header: extension headers included).
pub fn ip_payload(frame: &[u8]) -> &[u8] {
    let length = |o: usize| usize::from(u16::from_be_bytes([frame[ETH_HLEN + o], frame[ETH_HLEN + o + 1]]));
    if is_v6(frame) {
        &frame[ETH_HLEN + IP6_HLEN..ETH_HLEN + IP6_HLEN + length(4)]
    } else {
        &frame[ETH_HLEN + IP_HLEN..ETH_HLEN + length(2)]
    }
}

/// Source and destination address of a frame.
pub fn addresses(frame: &[u8]) -> (IpAddr, IpAddr) {
    let ip = ip_header(frame);
    if is_v6(frame) {
        let addr = |o: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).expect("16 bytes")));
        (addr(8), addr(24))
    } else {
        let addr = |o: usize| IpAddr::V4(Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]));
        (addr(12), addr(16))
    }
}

/// The upper-layer protocol and payload of a frame: after IPv6's extension headers
/// (hop-by-hop, routing, destination options, a first fragment's header).
pub fn upper(frame: &[u8]) -> (u8, &[u8]) {
    let payload = ip_payload(frame);
    if !is_v6(frame) {
        return (ip_header(frame)[9], payload);
    }
    let (mut next, mut at) = (ip_header(frame)[6], 0);
    loop {
        match next {
            NEXTHDR_HOP | 43 | NEXTHDR_DEST => {
                (next, at) = (payload[at], at + (usize::from(payload[at + 1]) + 1) * 8);
            }
            NEXTHDR_FRAGMENT => (next, at) = (payload[at], at + 8),
            _ => return (next, &payload[at..]),
        }
    }
}

/// Addresses, ports and protocol of a TCP/UDP frame (a first fragment or a whole packet).
pub fn seen(frame: &[u8]) -> Seen {
    let (src, dst) = addresses(frame);
    let (proto, l4) = upper(frame);
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    Seen { src: SocketAddr::new(src, port(0)), dst: SocketAddr::new(dst, port(2)), proto }
}

/// Whether the frame's IPv4 header checksum is right (IPv6 has none: true).
pub fn ip_checksum_ok(frame: &[u8]) -> bool {
    is_v6(frame) || checksum(ip_header(frame)) == 0
}

/// Whether the L4 checksum of `segment` (a whole TCP segment or UDP datagram) between the
/// addresses is right.
pub fn l4_checksum_ok(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> bool {
    l4_sum(src, dst, proto, segment) == 0
}

/// Whether the TCP/UDP checksum of an unfragmented frame is right.
pub fn frame_l4_checksum_ok(frame: &[u8]) -> bool {
    let (src, dst) = addresses(frame);
    let (proto, segment) = upper(frame);
    l4_checksum_ok(src, dst, proto, segment)
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
        let v4: [SocketAddr; 2] = ["172.18.0.100:40000".parse().unwrap(), "172.18.0.2:30066".parse().unwrap()];
        let v6: [SocketAddr; 2] = ["[fc00::64]:40000".parse().unwrap(), "[fc00::2]:30066".parse().unwrap()];
        for [a, b] in [v4, v6] {
            let frame = tcp_frame(a, b, SYN);
            assert!(ip_checksum_ok(&frame) && frame_l4_checksum_ok(&frame), "{a} TCP");
            assert_eq!(seen(&frame), Seen { src: a, dst: b, proto: TCP });
            let frame = udp_frame(a, b, 7, b"odd");
            assert!(ip_checksum_ok(&frame) && frame_l4_checksum_ok(&frame), "{a} UDP");
            assert_eq!(seen(&frame), Seen { src: a, dst: b, proto: UDP });
        }
    }

    /// A known IPv6 UDP checksum, computed by hand from RFC 8200 8.1's pseudo header: so the
    /// pseudo-header layout (32-bit length, then three zero bytes and the next header) is
    /// checked against something other than itself.
    #[test]
    fn the_ipv6_pseudo_header_is_rfc_8200s() {
        let (a, b): (SocketAddr, SocketAddr) = ("[::1]:1".parse().unwrap(), "[::2]:2".parse().unwrap());
        // Words: 0001 (src) + 0002 (dst) + 0000 0009 (length) + 0011 (next header) + 0001 0002
        // 0009 0000 (ports, length, checksum) + 6100 ("a" padded) = 0x6129: checksum !0x6129.
        let datagram = udp(a, b, b"a", true);
        assert_eq!(u16::from_be_bytes([datagram[6], datagram[7]]), !0x6129);
    }
}
