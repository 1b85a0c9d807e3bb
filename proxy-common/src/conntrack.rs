//! The `conntrack` LRU map: per-flow NAT state of the TC path (NodePort, externalIPs,
//! LoadBalancer IPs). A flow owns two entries: the original direction (client → frontend), whose
//! value is the translated tuple (source possibly SNATed to the node, destination the backend),
//! and the reply direction (backend → client or node), whose value restores what the client
//! expects (source = the frontend it connected to).

use crate::user_pod;

/// Key of the `conntrack` map: a packet's 5-tuple as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source address, network byte order.
    pub src: [u8; 4],
    /// Destination address, network byte order.
    pub dst: [u8; 4],
    /// Source port, host byte order.
    pub sport: u16,
    /// Destination port, host byte order.
    pub dport: u16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey>() == 16);

/// Value of the `conntrack` map: the tuple to rewrite the packet to, and the flow's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// New source address, network byte order.
    pub src: [u8; 4],
    /// New destination address, network byte order.
    pub dst: [u8; 4],
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
const _: () = assert!(size_of::<CtValue>() == 32);

/// The entry is the reply direction of its flow.
pub const CT_F_REPLY: u16 = 1 << 0;
/// The flow's source was translated to a node address (externalTrafficPolicy: Cluster).
pub const CT_F_SNAT: u16 = 1 << 1;
/// A FIN or RST was seen: the flow expires after [`CT_TIMEOUT_CLOSING_S`].
pub const CT_F_CLOSING: u16 = 1 << 2;

/// Idle timeout of an established TCP flow.
pub const CT_TIMEOUT_TCP_S: u64 = 6 * 3600;
/// Timeout of a TCP flow after FIN or RST.
pub const CT_TIMEOUT_CLOSING_S: u64 = 10;
/// Idle timeout of a UDP flow.
pub const CT_TIMEOUT_UDP_S: u64 = 120;

/// SNAT source ports: above Linux's default ephemeral range (32768-60999), so a translated
/// flow never takes the port of a socket of the node itself.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// Last SNAT source port.
pub const SNAT_PORT_MAX: u16 = 65_535;

/// Whether an entry last seen at `last_seen_ns` is expired at `now_ns`.
pub const fn expired(value_flags: u16, proto: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    let timeout_s = if value_flags & CT_F_CLOSING != 0 {
        CT_TIMEOUT_CLOSING_S
    } else if proto == crate::proto::TCP {
        CT_TIMEOUT_TCP_S
    } else {
        CT_TIMEOUT_UDP_S
    };
    now_ns.saturating_sub(last_seen_ns) > timeout_s * 1_000_000_000
}

/// Key of the `fragments` LRU map: one fragmented IPv4 datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address, network byte order.
    pub src: [u8; 4],
    /// Destination address, network byte order.
    pub dst: [u8; 4],
    /// The IPv4 identification field, host byte order.
    pub id: u16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FragKey>() == 12);

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
