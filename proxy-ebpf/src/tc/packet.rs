//! Reading packets: header offsets, the parsed 5-tuple, and small predicates on it (as
//! Cilium's `lb.h` names its questions), so the decisions elsewhere read as sentences.

use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use proxy_common::{
    addr::{self, Addr},
    conntrack::{CT_F_CLOSING, CtKey, FragKey, FragPorts},
    drop,
    maglev::{Tuple, tuple_hash},
    proto::{TCP, UDP},
};

use super::ipv6::{self, ETH_P_IPV6, IP6_NEXTHDR, IP6_SRC};
use crate::maps::FRAGMENTS;

pub const ETH_HLEN: usize = 14;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// Offset of the EtherType.
pub const ETH_TYPE: usize = 12;
/// The fixed IPv4 header's length (without options).
pub const IP_HLEN: usize = 20;
/// Offsets of the IPv4 checksum, source and destination address in the frame.
pub const IP_CSUM: usize = ETH_HLEN + 10;
pub const IP_SRC: usize = ETH_HLEN + 12;
pub const IP_DST: usize = ETH_HLEN + 16;
/// IPv4 "more fragments" flag and fragment offset mask (in the host-order flags field).
const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;
/// Offsets of the checksum in the TCP and UDP header, and of the flags in TCP's.
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;
const TCP_FLAGS: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The Ethernet and IPv4 headers (without options) as they sit in the packet.
#[repr(C)]
#[derive(Clone, Copy)]
struct Head {
    _macs: [u8; 12],
    ether_type: [u8; 2],
    ip: Ipv4Hdr,
}

/// Why a packet is not parsed into a [`Packet`].
pub enum Skip {
    /// Not TCP or UDP over IPv4 or IPv6: not ours (an ICMP error may still be).
    Other,
    /// TCP/UDP whose headers do not fit the packet or have a bad length, or IPv6 with more
    /// extension headers than the walk's bound.
    Malformed,
    /// A later fragment whose first fragment was not seen: its ports are unknown.
    FragmentWithoutState,
}

impl Skip {
    /// The drop reason to count for it, if any.
    pub fn reason(&self) -> Option<u32> {
        match self {
            Skip::Other => None,
            Skip::Malformed => Some(drop::MALFORMED),
            Skip::FragmentWithoutState => Some(drop::FRAGMENT_WITHOUT_STATE),
        }
    }
}

/// The IP version of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The fields of a TCP or UDP packet the datapath reads. `src` and `dst` come first and in
/// this order (`repr(C)`): IPv6 loads and rewrites both in one 32-byte run.
#[repr(C)]
pub struct Packet {
    /// Source address ([`proxy_common::addr`]: IPv4 as IPv4-mapped IPv6).
    pub src: Addr,
    /// Destination address, likewise.
    pub dst: Addr,
    /// Offset of the L4 header.
    pub l4: usize,
    /// Whether the L4 header is in this packet (not a later fragment).
    pub has_l4: bool,
    pub proto: u8,
    pub family: Family,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

/// The flow's 5-tuple for the Maglev hash, read in place: the same hash as of [`Packet::key`].
impl Tuple for Packet {
    #[inline(always)]
    fn tuple_hash(&self, seed: u32) -> u32 {
        tuple_hash(&self.src, &self.dst, [self.sport, self.dport], self.proto, seed)
    }

    #[inline(always)]
    fn client(&self) -> &Addr {
        &self.src
    }
}

impl Packet {
    /// A packet before [`Self::parse`] fills it in.
    pub const EMPTY: Self = Self {
        src: addr::UNSPECIFIED,
        dst: addr::UNSPECIFIED,
        l4: 0,
        has_l4: false,
        proto: 0,
        family: Family::V4,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };

    /// Parses TCP/UDP over IPv4 or IPv6 into `self`. A later fragment (no L4 header) gets the
    /// ports its first fragment recorded; a first fragment records them for the rest.
    /// Fills in the caller's packet rather than returning one: a returned packet is copied
    /// on the program's main frame, under which the deepest calls sit (and a BPF-to-BPF call
    /// returning this `Result` would carry BTF the kernel rejects: a niche-tagged union).
    /// IPv4 is parsed inline (no call on the common path); IPv6's header walk and any
    /// fragment's key are BPF-to-BPF calls ([`parse_v6`], [`fragment`]), so their stack sits
    /// beside the deepest chain, not under it.
    #[inline(always)]
    pub fn parse(&mut self, ctx: &TcContext) -> Result<(), Skip> {
        // Ethernet and IPv4 headers read in place (an IPv6 packet is longer than both).
        let Some(head) = in_place::<Head>(ctx, 0) else { return Err(Skip::Other) };
        let code = match u16::from_be_bytes(head.ether_type) {
            ETH_P_IP => answer(parse_v4(ctx, self, &head.ip)),
            ETH_P_IPV6 => parse_v6(ctx, self),
            _ => OTHER,
        };
        match code {
            PARSED => Ok(()),
            MALFORMED => Err(Skip::Malformed),
            FRAGMENT_WITHOUT_STATE => Err(Skip::FragmentWithoutState),
            _ => Err(Skip::Other),
        }
    }

    /// The conntrack key of the packet as it arrived.
    pub fn key(&self) -> CtKey {
        CtKey { src: self.src, dst: self.dst, sport: self.sport, dport: self.dport, proto: self.proto, _pad: [0; 3] }
    }

    /// A TCP SYN without ACK: the first packet of a connection.
    pub fn is_syn(&self) -> bool {
        self.proto == TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// Whether the packet may open a flow: UDP always, TCP only with its first packet (anything
    /// else is invalid, which kube-proxy drops as ctstate INVALID).
    pub fn may_open_flow(&self) -> bool {
        self.proto != TCP || self.is_syn()
    }

    /// A new connection on the tuple of a closing flow (entry flags `flags`): it starts a new
    /// flow instead of following the old one.
    pub fn reopens(&self, flags: u16) -> bool {
        self.is_syn() && flags & CT_F_CLOSING != 0
    }

    /// Offset of the L4 checksum.
    pub fn l4_csum(&self) -> usize {
        self.l4 + if self.proto == TCP { TCP_CSUM } else { UDP_CSUM }
    }
}

/// The per-family parsers' answers: parsed, or why not (as [`Skip`], which cannot cross a
/// BPF-to-BPF call: see [`Packet::parse`]).
const PARSED: u32 = 0;
const OTHER: u32 = 1;
const MALFORMED: u32 = 2;
const FRAGMENT_WITHOUT_STATE: u32 = 3;

/// [`Skip`] as a parser's answer.
#[inline(always)]
fn answer(result: Result<(), Skip>) -> u32 {
    match result {
        Ok(()) => PARSED,
        Err(Skip::Other) => OTHER,
        Err(Skip::Malformed) => MALFORMED,
        Err(Skip::FragmentWithoutState) => FRAGMENT_WITHOUT_STATE,
    }
}

/// Parses TCP/UDP over IPv4 (header `ip`) into `packet`.
#[inline(always)]
fn parse_v4(ctx: &TcContext, packet: &mut Packet, ip: &Ipv4Hdr) -> Result<(), Skip> {
    if ip.vihl >> 4 != 4 || (ip.proto != TCP && ip.proto != UDP) {
        return Err(Skip::Other);
    }
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(Skip::Malformed);
    }
    let frags = u16::from_be_bytes(ip.frags);
    (packet.src, packet.dst) = (addr::from_v4(ip.src_addr), addr::from_v4(ip.dst_addr));
    (packet.family, packet.proto, packet.l4) = (Family::V4, ip.proto, ETH_HLEN + ihl);
    let id = u32::from(u16::from_be_bytes(ip.id));
    ports(ctx, packet, id, frags & IP_OFFSET != 0, frags & IP_MF != 0)
}

/// Fills in the packet's ports (and TCP flags) from its L4 header; a fragment's (`id`;
/// `later`: not the first; `more`: not the last) through [`fragment`].
#[inline(always)]
fn ports(ctx: &TcContext, packet: &mut Packet, id: u32, later: bool, more: bool) -> Result<(), Skip> {
    if later || more {
        return match fragment(ctx, packet, id, later) {
            PARSED => Ok(()),
            FRAGMENT_WITHOUT_STATE => Err(Skip::FragmentWithoutState),
            _ => Err(Skip::Malformed),
        };
    }
    let (sport, dport, tcp_flags) = load_ports(ctx, packet.l4, packet.proto)?;
    (packet.sport, packet.dport, packet.tcp_flags, packet.has_l4) = (sport, dport, tcp_flags, true);
    Ok(())
}

/// A fragment's ports: a later one's from what its first fragment recorded, and a first
/// one's from its L4 header, recorded for the rest. A function of its own (a BPF-to-BPF
/// call): the rare path's key is not on the main frame, where every packet's parse sits.
#[inline(never)]
fn fragment(ctx: &TcContext, packet: &mut Packet, id: u32, later: bool) -> u32 {
    let frag = FragKey { src: packet.src, dst: packet.dst, id, proto: packet.proto, _pad: [0; 3] };
    if later {
        // SAFETY: the value is copied out at once.
        let Some(ports) = (unsafe { FRAGMENTS.get(frag).copied() }) else { return FRAGMENT_WITHOUT_STATE };
        (packet.sport, packet.dport, packet.has_l4) = (ports.sport, ports.dport, false);
        return PARSED;
    }
    let Ok((sport, dport, tcp_flags)) = load_ports(ctx, packet.l4, packet.proto) else { return MALFORMED };
    // The first of several fragments: the rest will need these ports.
    let _ = FRAGMENTS.insert(frag, FragPorts { sport, dport }, 0);
    (packet.sport, packet.dport, packet.tcp_flags, packet.has_l4) = (sport, dport, tcp_flags, true);
    PARSED
}

/// Parses TCP/UDP over IPv6 into `packet`: the extension headers walked ([`ipv6::walk`]),
/// fragments as IPv4's.
#[inline(never)]
fn parse_v6(ctx: &TcContext, packet: &mut Packet) -> u32 {
    answer(try_parse_v6(ctx, packet))
}

#[inline(always)]
fn try_parse_v6(ctx: &TcContext, packet: &mut Packet) -> Result<(), Skip> {
    let nexthdr = *in_place::<u8>(ctx, IP6_NEXTHDR).ok_or(Skip::Other)?;
    let upper = ipv6::walk(ctx, nexthdr)?;
    if upper.proto != TCP && upper.proto != UDP {
        return Err(Skip::Other);
    }
    // Both addresses read in place, straight into the packet (no copy on the stack).
    let [src, dst] = in_place::<[Addr; 2]>(ctx, IP6_SRC).ok_or(Skip::Malformed)?;
    (packet.src, packet.dst) = (*src, *dst);
    (packet.family, packet.proto, packet.l4) = (Family::V6, upper.proto, upper.offset);
    match upper.fragment {
        Some(fragment) => ports(ctx, packet, fragment.id, fragment.later, fragment.more),
        None => ports(ctx, packet, 0, false, false),
    }
}

/// Source port, destination port and TCP flags (0 for UDP) of the L4 header at `l4`, read in
/// place.
#[inline(always)]
fn load_ports(ctx: &TcContext, l4: usize, proto: u8) -> Result<(u16, u16, u8), Skip> {
    let (ports, tcp_flags) = if proto == TCP {
        let tcp = in_place::<[u8; 14]>(ctx, l4).ok_or(Skip::Malformed)?;
        ([tcp[0], tcp[1], tcp[2], tcp[3]], tcp[TCP_FLAGS])
    } else {
        (*in_place::<[u8; 4]>(ctx, l4).ok_or(Skip::Malformed)?, 0)
    };
    Ok((u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]), tcp_flags))
}

/// The `T` at `offset` in the packet, read in place (direct packet access: no helper call and
/// no copy on the stack, where `bpf_skb_load_bytes` put it). Headers not in the skb's linear
/// part (rare: the stack and drivers put them there) are pulled into it first. `None`: the
/// packet is shorter. Only for reading: the rewrite goes through the store and checksum
/// helpers, which keep a cloned skb's data unshared.
#[inline(always)]
fn in_place<T>(ctx: &TcContext, offset: usize) -> Option<&T> {
    let fits = |ctx: &TcContext| {
        let at = ctx.data() + offset;
        (at + size_of::<T>() <= ctx.data_end()).then_some(at)
    };
    let at = match fits(ctx) {
        Some(at) => at,
        None => {
            ctx.pull_data((offset + size_of::<T>()) as u32).ok()?;
            fits(ctx)?
        }
    };
    // SAFETY: `at..at + size_of::<T>()` lies inside the packet's data, checked against its end
    // just above (as the verifier requires); `T` is a byte array or a `repr(C)` header of
    // integers (alignment 1 here: every field is read as bytes).
    Some(unsafe { &*(at as *const T) })
}
