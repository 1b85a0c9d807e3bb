//! The `conntrack` LRU map: per-flow NAT state of the TC path (NodePort, externalIPs,
//! LoadBalancer IPs). A flow owns two entries: the original direction (client → frontend), whose
//! value is the translated tuple (source possibly SNATed to the node, destination the backend),
//! and the reply direction (backend → client or node), whose value restores what the client
//! expects (source = the frontend it connected to).

use crate::{addr::Addr, user_pod};

/// Key of the `conntrack` map: a packet's 5-tuple as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source address ([`crate::addr`]).
    pub src: Addr,
    /// Destination address ([`crate::addr`]).
    pub dst: Addr,
    /// Source port, host byte order.
    pub sport: u16,
    /// Destination port, host byte order.
    pub dport: u16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey>() == 40);

/// Value of the `conntrack` map: the tuple to rewrite the packet to, and the flow's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// New source address ([`crate::addr`]).
    pub src: Addr,
    /// New destination address ([`crate::addr`]).
    pub dst: Addr,
    /// New source port, host byte order.
    pub sport: u16,
    /// New destination port, host byte order.
    pub dport: u16,
    /// The backend of the flow.
    pub backend_id: u32,
    /// `bpf_ktime_get_ns()` of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// `CT_F_*` bits.
    pub flags: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<CtValue>() == 56);

/// The entry is the reply direction of its flow.
pub const CT_F_REPLY: u16 = 1 << 0;
/// The flow's source was translated to a node address (externalTrafficPolicy: Cluster).
pub const CT_F_SNAT: u16 = 1 << 1;
/// The flow is closing, FINs seen both ways or a RST: it expires after [`CT_TIMEOUT_CLOSING_S`].
pub const CT_F_CLOSING: u16 = 1 << 2;
/// A FIN went this entry's way: the flow is half-closed ([`CT_TIMEOUT_CLOSE_WAIT_S`]).
pub const CT_F_FIN: u16 = 1 << 3;
/// A FIN went the other way (set by the packet that hit the flow's other entry).
pub const CT_F_PEER_FIN: u16 = 1 << 4;
/// The backend is a local address of the node (a hostNetwork endpoint): the flow is not
/// SNATed, the node's stack delivers its packets, and its replies, which leave through the
/// stack, are reverse-translated by the TC egress program.
pub const CT_F_LOCAL: u16 = 1 << 5;
/// The flow goes by direct server return to a backend on another node: its packets are not
/// SNATed, and those that may open the flow there (a TCP SYN, every UDP datagram) carry the
/// frontend in an IPv4 option (`crate::dsr`). Its replies never come back through this node.
pub const CT_F_DSR: u16 = 1 << 6;

/// Idle timeout of an established TCP flow.
pub const CT_TIMEOUT_TCP_S: u64 = 6 * 3600;
/// Idle timeout of a half-closed TCP flow (FIN seen one way only): kube-proxy sets
/// `nf_conntrack_tcp_timeout_close_wait` to an hour, so the open direction keeps working.
pub const CT_TIMEOUT_CLOSE_WAIT_S: u64 = 3600;
/// Timeout of a TCP flow after FINs both ways or a RST.
pub const CT_TIMEOUT_CLOSING_S: u64 = 10;
/// Idle timeout of a UDP flow.
pub const CT_TIMEOUT_UDP_S: u64 = 120;

/// SNAT source ports: above Linux's default ephemeral range (32768-60999), so a translated
/// flow never takes the port of a socket of the node itself.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// Last SNAT source port.
pub const SNAT_PORT_MAX: u16 = 65_535;

/// `flags` with the closing-state bits `bits` ([`CT_F_FIN`], [`CT_F_PEER_FIN`],
/// [`CT_F_CLOSING`]) added: once FINs went both ways the flow is closing. A direct server
/// return flow ([`CT_F_DSR`]) closes at its first FIN: its replies never pass this node, so
/// the other FIN is never seen, and the flow would otherwise hold its entries in close-wait
/// for an hour (the client's last ACKs still refresh it while they pass).
pub const fn with_close_bits(flags: u16, bits: u16) -> u16 {
    let flags = flags | bits;
    let fins = flags & (CT_F_FIN | CT_F_PEER_FIN);
    if fins == CT_F_FIN | CT_F_PEER_FIN || (fins != 0 && flags & CT_F_DSR != 0) { flags | CT_F_CLOSING } else { flags }
}

/// The idle timeout, in seconds, of an entry with `flags` of protocol `proto`.
pub const fn timeout_s(flags: u16, proto: u8) -> u64 {
    if flags & CT_F_CLOSING != 0 {
        CT_TIMEOUT_CLOSING_S
    } else if flags & (CT_F_FIN | CT_F_PEER_FIN) != 0 {
        CT_TIMEOUT_CLOSE_WAIT_S
    } else if proto == crate::proto::TCP {
        CT_TIMEOUT_TCP_S
    } else {
        CT_TIMEOUT_UDP_S
    }
}

/// Whether an entry last seen at `last_seen_ns` is expired at `now_ns`.
pub const fn expired(value_flags: u16, proto: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeout_s(value_flags, proto) * 1_000_000_000
}

/// Key of the `fragments` LRU map: one fragmented datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address ([`crate::addr`]).
    pub src: Addr,
    /// Destination address ([`crate::addr`]).
    pub dst: Addr,
    /// The datagram's identification, host byte order: IPv4's 16-bit field, or the IPv6
    /// fragment header's 32-bit one.
    pub id: u32,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragKey>() == 40);

/// Value of the `fragments` map: the ports the first fragment carried, so the later ones
/// (which carry none) find their flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragPorts {
    /// Source port, host byte order.
    pub sport: u16,
    /// Destination port, host byte order.
    pub dport: u16,
}
const _: () = assert!(size_of::<FragPorts>() == 4);

user_pod!(CtKey, CtValue, FragKey, FragPorts);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{TCP, UDP};

    const S: u64 = 1_000_000_000;

    #[test]
    fn an_established_flow_lives_by_its_protocol() {
        assert!(!expired(0, TCP, 0, CT_TIMEOUT_TCP_S * S));
        assert!(expired(0, TCP, 0, CT_TIMEOUT_TCP_S * S + 1));
        assert!(!expired(CT_F_REPLY | CT_F_SNAT, UDP, 0, CT_TIMEOUT_UDP_S * S));
        assert!(expired(CT_F_REPLY | CT_F_SNAT, UDP, 0, CT_TIMEOUT_UDP_S * S + 1));
    }

    #[test]
    fn a_fin_one_way_is_close_wait_for_an_hour_on_both_entries() {
        for bits in [CT_F_FIN, CT_F_PEER_FIN] {
            let flags = with_close_bits(CT_F_SNAT, bits);
            assert_eq!(flags & CT_F_CLOSING, 0, "one FIN does not close the flow");
            assert_eq!(timeout_s(flags, TCP), CT_TIMEOUT_CLOSE_WAIT_S);
            assert!(!expired(flags, TCP, 0, (CT_TIMEOUT_CLOSING_S + 5) * S));
            assert!(!expired(flags, TCP, 0, CT_TIMEOUT_CLOSE_WAIT_S * S));
            assert!(expired(flags, TCP, 0, CT_TIMEOUT_CLOSE_WAIT_S * S + 1));
        }
    }

    #[test]
    fn a_dsr_flow_closes_at_its_first_fin() {
        for bits in [CT_F_FIN, CT_F_PEER_FIN] {
            let flags = with_close_bits(CT_F_DSR, bits);
            assert_eq!(timeout_s(flags, TCP), CT_TIMEOUT_CLOSING_S);
        }
        assert_eq!(with_close_bits(CT_F_DSR, 0) & CT_F_CLOSING, 0, "no FIN, not closing");
    }

    #[test]
    fn fins_both_ways_or_a_reset_close_the_flow_in_seconds() {
        let both = with_close_bits(with_close_bits(0, CT_F_FIN), CT_F_PEER_FIN);
        let reset = with_close_bits(CT_F_FIN, CT_F_CLOSING);
        for flags in [both, reset] {
            assert_ne!(flags & CT_F_CLOSING, 0);
            assert_eq!(timeout_s(flags, TCP), CT_TIMEOUT_CLOSING_S);
            assert!(expired(flags, TCP, 0, CT_TIMEOUT_CLOSING_S * S + 1));
        }
    }
}
