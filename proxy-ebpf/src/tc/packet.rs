//! Reading packets: header offsets, the parsed 5-tuple, and small predicates on it (as
//! Cilium's `lb.h` names its questions), so the decisions elsewhere read as sentences.

use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use proxy_common::{
    addr::{self, Addr},
    conntrack::{CT_F_CLOSING, CtKey, FragKey, FragPorts},
    drop,
    proto::{TCP, UDP},
};

use crate::maps::FRAGMENTS;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
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
    /// Not TCP or UDP over IPv4: not ours (an ICMP error may still be).
    Other,
    /// IPv4 TCP/UDP whose headers do not fit the packet or have a bad length.
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

/// The fields of a TCP or UDP over IPv4 packet the datapath reads.
pub struct Packet {
    /// Offset of the L4 header.
    pub l4: usize,
    /// Whether the L4 header is in this packet (not a later fragment).
    pub has_l4: bool,
    pub proto: u8,
    /// Source address ([`proxy_common::addr`]: IPv4 as IPv4-mapped IPv6).
    pub src: Addr,
    /// Destination address, likewise.
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

impl Packet {
    /// Parses TCP/UDP over IPv4. A later fragment (no L4 header) gets the ports its first
    /// fragment recorded; a first fragment records them for the rest.
    /// Inlined into each program: a BPF-to-BPF call returning this `Result` would carry BTF
    /// the kernel rejects (a niche-tagged union).
    #[inline(always)]
    pub fn parse(ctx: &TcContext) -> Result<Self, Skip> {
        // Ethernet and IPv4 headers in one load.
        let head: Head = ctx.load(0).map_err(|_| Skip::Other)?;
        if u16::from_be_bytes(head.ether_type) != ETH_P_IP {
            return Err(Skip::Other);
        }
        let ip = head.ip;
        if ip.vihl >> 4 != 4 || (ip.proto != TCP && ip.proto != UDP) {
            return Err(Skip::Other);
        }
        let ihl = usize::from(ip.vihl & 0x0f) * 4;
        if ihl < 20 {
            return Err(Skip::Malformed);
        }
        let frags = u16::from_be_bytes(ip.frags);
        let (src, dst) = (addr::from_v4(ip.src_addr), addr::from_v4(ip.dst_addr));
        let id = u32::from(u16::from_be_bytes(ip.id));
        let frag = FragKey { src, dst, id, proto: ip.proto, _pad: [0; 3] };
        let l4 = ETH_HLEN + ihl;
        if frags & IP_OFFSET != 0 {
            // SAFETY: the value is copied out at once.
            let ports = unsafe { FRAGMENTS.get(frag).copied() }.ok_or(Skip::FragmentWithoutState)?;
            let (sport, dport) = (ports.sport, ports.dport);
            return Ok(Self { l4, has_l4: false, proto: ip.proto, src, dst, sport, dport, tcp_flags: 0 });
        }
        // Ports (and TCP's flags) in one load.
        let (ports, tcp_flags) = if ip.proto == TCP {
            let tcp: [u8; 14] = ctx.load(l4).map_err(|_| Skip::Malformed)?;
            ([tcp[0], tcp[1], tcp[2], tcp[3]], tcp[TCP_FLAGS])
        } else {
            (ctx.load::<[u8; 4]>(l4).map_err(|_| Skip::Malformed)?, 0)
        };
        let (sport, dport) = (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]));
        if frags & IP_MF != 0 {
            // The first of several fragments: the rest will need these ports.
            let _ = FRAGMENTS.insert(frag, FragPorts { sport, dport }, 0);
        }
        Ok(Self { l4, has_l4: true, proto: ip.proto, src, dst, sport, dport, tcp_flags })
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
