//! TC programs: the ingress one takes traffic that arrives from outside the node for a
//! NodePort, an external IP or a LoadBalancer IP, and the replies of such flows; the egress one
//! only the replies of flows whose backend is the node itself (a hostNetwork endpoint).
//!
//! A new flow picks a backend with the same selection as the socket path ([`crate::lb`]),
//! records both directions in `conntrack`, DNATs to the backend and, under
//! `externalTrafficPolicy: Cluster`, SNATs to a node address and a free port so replies come
//! back through this node (what KUBE-MARK-MASQ achieves). Replies are reverse-translated from
//! their conntrack entry, so the client sees the address and port it connected to. Translated
//! packets are forwarded with a FIB lookup and `bpf_redirect_neigh`, which also keeps the kernel
//! from dropping a reply whose new source is a local address as martian.
//!
//! A backend at one of the node's own addresses is the exception: its packets are DNATed but
//! not SNATed (the node would otherwise see its own address as a martian source) and handed
//! to the stack; its replies leave through the stack, past no ingress hook, so the egress
//! program on the node's interfaces translates them back.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibLookup,
    },
    btf_maps::lpm_trie::Key,
    helpers::{bpf_csum_diff, bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use proxy_common::{
    affinity::AffinityKey,
    conntrack::{
        CT_F_CLOSING, CT_F_FIN, CT_F_LOCAL, CT_F_PEER_FIN, CT_F_REPLY, CT_F_SNAT, CtKey, CtValue, FragKey, FragPorts,
        SNAT_PORT_MAX, SNAT_PORT_MIN, expired, with_close_bits,
    },
    proto::{TCP, UDP},
    service::{SOURCE_RANGE_FRONTEND_BITS, SVC_F_EXT_LOCAL, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES, SourceRange},
};

use crate::{
    lb::{self, Origin, Selected, Verdict},
    maps::{CONFIG, CONNTRACK, FRAGMENTS, SOURCE_RANGES},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
/// IPv4 "more fragments" flag and fragment offset mask (in the host-order flags field).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const TCP_CSUM: usize = 16;
const TCP_FLAGS: usize = 13;
const UDP_CSUM: usize = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const AF_INET: u8 = 2;
const ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// Attempts at a free SNAT port before the new flow is dropped.
const SNAT_TRIES: u32 = 16;
/// A conntrack entry's `last_seen_ns` is refreshed at most this often.
const REFRESH_NS: u64 = 1_000_000_000;

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    match Packet::parse(&ctx) {
        Some(packet) => handle(&ctx, &packet),
        None => icmp_error(&ctx).unwrap_or(TC_ACT_OK),
    }
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) about a packet of
/// a tracked flow, on its way back: it quotes the translated packet, so the client would not
/// recognise it. Rewrites the outer destination and the quoted header back to what the client
/// sent (its address and port to the frontend's), and forwards it to the client. `None`: not
/// such an error.
fn icmp_error(ctx: &TcContext) -> Option<i32> {
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
        src: inner.dst_addr,
        dst: inner.src_addr,
        sport: dport,
        dport: sport,
        proto: inner.proto,
        _pad: [0; 3],
    };
    // SAFETY: copied out at once.
    let to = unsafe { CONNTRACK.get(&reply).copied() }?;
    if to.flags & CT_F_REPLY == 0 {
        return None;
    }
    let outer_dst = u32::from_ne_bytes(ip.dst_addr);
    let client = u32::from_ne_bytes(to.dst);
    let fix = || -> Result<(), i64> {
        ctx.l3_csum_replace(IP_CSUM, u64::from(outer_dst), u64::from(client), 4)?;
        ctx.store(IP_DST, &client, 0)?;
        // Quoted addresses: the quoted header's own checksum absorbs the change, so the ICMP
        // checksum (which covers both) stays right.
        for (offset, old, new) in [(12, inner.src_addr, to.dst), (16, inner.dst_addr, to.src)] {
            let (old, new) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
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
        return Some(TC_ACT_SHOT);
    }
    Some(forward(ctx, ip.src_addr, to.dst))
}

/// The Ethernet and IPv4 headers (without options) as they sit in the packet.
#[repr(C)]
#[derive(Clone, Copy)]
struct Head {
    _macs: [u8; 12],
    ether_type: [u8; 2],
    ip: Ipv4Hdr,
}

/// The fields of a TCP or UDP over IPv4 packet the datapath reads.
struct Packet {
    l4: usize,
    /// Whether the L4 header is in this packet (not a later fragment).
    has_l4: bool,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

impl Packet {
    /// `None` for anything but TCP/UDP over IPv4: such packets pass untouched. A later fragment
    /// (no L4 header) gets the ports its first fragment recorded, or `None` if that was not seen.
    /// Inlined into each program: a BPF-to-BPF call returning this `Option` would carry BTF
    /// the kernel rejects (a niche-tagged union).
    #[inline(always)]
    fn parse(ctx: &TcContext) -> Option<Self> {
        // Ethernet and IPv4 headers in one load.
        let head: Head = ctx.load(0).ok()?;
        if u16::from_be_bytes(head.ether_type) != ETH_P_IP {
            return None;
        }
        let ip = head.ip;
        let ihl = usize::from(ip.vihl & 0x0f) * 4;
        if ip.vihl >> 4 != 4 || ihl < 20 || (ip.proto != TCP && ip.proto != UDP) {
            return None;
        }
        let frags = u16::from_be_bytes(ip.frags);
        let frag =
            FragKey { src: ip.src_addr, dst: ip.dst_addr, id: u16::from_be_bytes(ip.id), proto: ip.proto, _pad: 0 };
        let l4 = ETH_HLEN + ihl;
        if frags & IP_OFFSET != 0 {
            // SAFETY: copied out at once.
            let ports = unsafe { FRAGMENTS.get(&frag).copied() }?;
            let (sport, dport) = (ports.sport, ports.dport);
            let (src, dst, proto) = (ip.src_addr, ip.dst_addr, ip.proto);
            return Some(Self { l4, has_l4: false, proto, src, dst, sport, dport, tcp_flags: 0 });
        }
        // Ports (and TCP's flags) in one load.
        let (ports, tcp_flags) = if ip.proto == TCP {
            let tcp: [u8; 14] = ctx.load(l4).ok()?;
            ([tcp[0], tcp[1], tcp[2], tcp[3]], tcp[TCP_FLAGS])
        } else {
            (ctx.load::<[u8; 4]>(l4).ok()?, 0)
        };
        let (sport, dport) = (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]));
        if frags & IP_MF != 0 {
            // The first of several fragments: the rest will need these ports.
            let _ = FRAGMENTS.insert(&frag, &FragPorts { sport, dport }, 0);
        }
        Some(Self { l4, has_l4: true, proto: ip.proto, src: ip.src_addr, dst: ip.dst_addr, sport, dport, tcp_flags })
    }

    fn key(&self) -> CtKey {
        CtKey { src: self.src, dst: self.dst, sport: self.sport, dport: self.dport, proto: self.proto, _pad: [0; 3] }
    }
}

fn handle(ctx: &TcContext, packet: &Packet) -> i32 {
    let key = packet.key();
    if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
        // The clock only where it is needed: most packets that reach here are for no frontend.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        // SAFETY: the pointer comes from a successful lookup; fields are plain integers.
        let value = unsafe { &mut *entry };
        // A new connection on the tuple of a closing one starts a new flow; and a flow whose
        // backend is gone (removed from every service) is not followed.
        let reopened =
            packet.proto == TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && value.flags & CT_F_CLOSING != 0;
        if !reopened
            && !expired(value.flags, packet.proto, value.last_seen_ns, now)
            && lb::backend(value.backend_id).is_some()
        {
            track(value, packet, now);
            let to = *value;
            return translate(ctx, packet, &to);
        }
    }
    if !packet.has_l4 {
        // A later fragment of a flow that is not tracked: nothing to translate.
        return TC_ACT_OK;
    }
    let client = AffinityKey { client: packet.src, ..AffinityKey::default() };
    match lb::select(packet.dst, packet.dport, packet.proto, client, Origin::External) {
        Verdict::NotAService => TC_ACT_OK,
        // No local endpoint under eTP=Local while other nodes have some: drop, as kube-proxy
        // does (with no endpoint anywhere it rejects, below).
        Verdict::NoBackend(flags)
            if flags & SVC_F_EXT_LOCAL != 0 && lb::cluster_has_backends(packet.dst, packet.dport, packet.proto) =>
        {
            TC_ACT_SHOT
        }
        // No endpoint at all: the node's own stack answers (TCP RST, ICMP port unreachable),
        // which is kube-proxy's REJECT.
        Verdict::NoBackend(_) => TC_ACT_OK,
        // Only a connection's first packet may open a flow; anything else is invalid (kube-proxy
        // drops ctstate INVALID).
        Verdict::Backend(_) if packet.proto == TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN => TC_ACT_SHOT,
        // loadBalancerSourceRanges: only listed clients, as kube-proxy's firewall chain.
        Verdict::Backend(selected) if selected.flags & SVC_F_SOURCE_RANGES != 0 && !admitted(packet) => TC_ACT_SHOT,
        Verdict::Backend(selected) => new_flow(ctx, packet, &key, &selected),
    }
}

/// The TC egress program, on the interfaces holding a node address: replies of flows to a
/// backend at the node's own address (a hostNetwork endpoint), which the stack sends, get the
/// frontend back as their source. Everything else leaves untouched.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    // Such replies are made on this node; a packet that came in somewhere (forwarded, or
    // redirected here by the ingress program) is not one: it leaves at the cost of one load.
    // SAFETY: the context pointer is the program's own skb.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return TC_ACT_OK;
    }
    let Some(packet) = Packet::parse(&ctx) else { return TC_ACT_OK };
    let Some(entry) = CONNTRACK.get_ptr_mut(&packet.key()) else { return TC_ACT_OK };
    // SAFETY: the pointer comes from a successful lookup; fields are plain integers.
    let value = unsafe { &mut *entry };
    if value.flags & (CT_F_LOCAL | CT_F_REPLY) != CT_F_LOCAL | CT_F_REPLY {
        return TC_ACT_OK;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if expired(value.flags, packet.proto, value.last_seen_ns, now) {
        return TC_ACT_OK;
    }
    track(value, &packet, now);
    let to = *value;
    // Already on its way out of the interface the stack routed it to.
    if rewrite(&ctx, &packet, &to).is_err() { TC_ACT_SHOT } else { TC_ACT_OK }
}

/// Opens a flow to `selected` for the connection's first packet, translates it and sends it on.
fn new_flow(ctx: &TcContext, packet: &Packet, key: &CtKey, selected: &Selected) -> i32 {
    let snat = if selected.flags & SVC_F_EXT_LOCAL == 0 {
        match snat_address(selected.flags, packet.dst) {
            Some(address) => Some(address),
            None => return TC_ACT_SHOT,
        }
    } else {
        None
    };
    // The route the translated packet takes, looked up once: it also tells whether the backend
    // is one of the node's own addresses (not forwarded: local).
    let route = route(ctx, snat.unwrap_or(packet.src), selected.backend.address);
    let local = route.0 == BPF_FIB_LKUP_RET_NOT_FWDED;
    let snat = if local { None } else { snat };
    let Some(to) = open_flow(packet, key, selected, snat, local, unsafe { bpf_ktime_get_coarse_ns() }) else {
        return TC_ACT_SHOT;
    };
    if rewrite(ctx, packet, &to).is_err() {
        return TC_ACT_SHOT;
    }
    deliver(route)
}

/// Whether the packet's client is inside one of its frontend's `loadBalancerSourceRanges`.
fn admitted(packet: &Packet) -> bool {
    let data = SourceRange::new(packet.dst, packet.dport, packet.proto, packet.src);
    let key = Key::new(SOURCE_RANGE_FRONTEND_BITS + 32, data);
    SOURCE_RANGES.get(&key).is_some()
}

/// Refreshes a tracked flow's state for this packet. A FIN half-closes the flow (both entries
/// learn it: the one it went through and the other direction's); FINs both ways or a RST close
/// it. Only the first FIN or RST of an entry does more than the usual refresh.
fn track(value: &mut CtValue, packet: &Packet, now: u64) {
    let (here, there) = if packet.tcp_flags & TCP_RST != 0 {
        (CT_F_CLOSING, CT_F_CLOSING)
    } else if packet.tcp_flags & TCP_FIN != 0 {
        (CT_F_FIN, CT_F_PEER_FIN)
    } else {
        (0, 0)
    };
    if here != 0 && value.flags & here == 0 {
        value.flags = with_close_bits(value.flags, here);
        value.last_seen_ns = now;
        mark_other_direction(value, there, now);
    } else if now.saturating_sub(value.last_seen_ns) > REFRESH_NS {
        value.last_seen_ns = now;
    }
}

/// Adds `bits` to the flow's other entry: the one keyed by the reverse of `value`'s
/// translated tuple (reply ↔ original).
fn mark_other_direction(value: &CtValue, bits: u16, now: u64) {
    let key =
        CtKey { src: value.dst, dst: value.src, sport: value.dport, dport: value.sport, proto: TCP, _pad: [0; 3] };
    let Some(other) = CONNTRACK.get_ptr_mut(&key) else { return };
    // SAFETY: the pointer comes from a successful lookup; fields are plain integers. Two CPUs
    // closing both directions at once may lose a bit: that flow then keeps the close-wait
    // timeout, as long as kube-proxy keeps a half-closed one.
    let other = unsafe { &mut *other };
    if (other.flags ^ value.flags) & CT_F_REPLY != 0 && other.backend_id == value.backend_id {
        other.flags = with_close_bits(other.flags, bits);
        other.last_seen_ns = now;
    }
}

/// Records a new flow in both directions and returns the original direction's translation:
/// `snat`: the node address to translate the source to (with a free port); `local`: the backend
/// is one of the node's own addresses.
fn open_flow(
    packet: &Packet,
    key: &CtKey,
    selected: &Selected,
    snat: Option<[u8; 4]>,
    local: bool,
    now: u64,
) -> Option<CtValue> {
    let backend = selected.backend;
    let local = if local { CT_F_LOCAL } else { 0 };
    let mut forward = CtValue {
        src: packet.src,
        dst: backend.address,
        sport: packet.sport,
        dport: backend.port,
        backend_id: selected.id,
        last_seen_ns: now,
        flags: local,
        _pad: [0; 6],
    };
    let reply = CtValue {
        src: packet.dst,
        dst: packet.src,
        sport: packet.dport,
        dport: packet.sport,
        backend_id: selected.id,
        last_seen_ns: now,
        flags: CT_F_REPLY | local,
        _pad: [0; 6],
    };
    let mut reply_key = CtKey {
        src: backend.address,
        dst: packet.src,
        sport: backend.port,
        dport: packet.sport,
        proto: packet.proto,
        _pad: [0; 3],
    };
    if let Some(address) = snat {
        forward.src = address;
        forward.flags |= CT_F_SNAT;
        reply_key.dst = forward.src;
        let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
        let mut claimed = false;
        for _ in 0..SNAT_TRIES {
            let port = SNAT_PORT_MIN + (unsafe { bpf_get_prandom_u32() } % span) as u16;
            reply_key.dport = port;
            // A port is ours only if no flow holds that reply tuple yet.
            if CONNTRACK.insert(&reply_key, &reply, u64::from(BPF_NOEXIST)).is_ok() {
                forward.sport = port;
                claimed = true;
                break;
            }
        }
        if !claimed {
            return None;
        }
    } else {
        CONNTRACK.insert(&reply_key, &reply, 0).ok()?;
    }
    CONNTRACK.insert(key, &forward, 0).ok()?;
    Some(forward)
}

/// The node address to SNAT to: the frontend itself when it is a node address (NodePort),
/// else the node's configured address.
fn snat_address(flags: u16, frontend: [u8; 4]) -> Option<[u8; 4]> {
    if flags & SVC_F_NODE_PORT != 0 {
        return Some(frontend);
    }
    let address = CONFIG.get(0)?.snat_address;
    (address != [0; 4]).then_some(address)
}

/// Rewrites the packet to `to` (addresses, ports, IPv4 and L4 checksums) and sends it on.
fn translate(ctx: &TcContext, packet: &Packet, to: &CtValue) -> i32 {
    if rewrite(ctx, packet, to).is_err() {
        return TC_ACT_SHOT;
    }
    forward(ctx, to.src, to.dst)
}

fn rewrite(ctx: &TcContext, packet: &Packet, to: &CtValue) -> Result<(), i64> {
    let csum = packet.l4 + if packet.proto == TCP { TCP_CSUM } else { UDP_CSUM };
    // A later fragment has no L4 header (its checksum was fixed in the first one); a UDP
    // checksum of zero means "none": keep it so.
    let l4_csum = packet.has_l4 && (packet.proto == TCP || ctx.load::<u16>(csum)? != 0);
    let mangled = if packet.proto == UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    // Source and destination address are adjacent: one checksum difference, one store. The
    // L4 checksum covers them through the pseudo header.
    let old = [u32::from_ne_bytes(packet.src), u32::from_ne_bytes(packet.dst)];
    let new = [u32::from_ne_bytes(to.src), u32::from_ne_bytes(to.dst)];
    if old != new {
        let diff = csum_diff(&old, &new)?;
        ctx.l3_csum_replace(IP_CSUM, 0, diff, 0)?;
        if l4_csum {
            ctx.l4_csum_replace(csum, 0, diff, u64::from(BPF_F_PSEUDO_HDR) | mangled)?;
        }
        ctx.store(IP_SRC, &new, 0)?;
    }
    // So are the ports, in the L4 header itself.
    let port_word = |sport: u16, dport: u16| {
        let (s, d) = (sport.to_be_bytes(), dport.to_be_bytes());
        [u32::from_ne_bytes([s[0], s[1], d[0], d[1]])]
    };
    let (old, new) = (port_word(packet.sport, packet.dport), port_word(to.sport, to.dport));
    if packet.has_l4 && old != new {
        if l4_csum {
            ctx.l4_csum_replace(csum, 0, csum_diff(&old, &new)?, mangled)?;
        }
        ctx.store(packet.l4, &new, 0)?;
    }
    Ok(())
}

/// The one's-complement checksum difference between two runs of 32-bit words (`bpf_csum_diff`),
/// for the `*_csum_replace` helpers' "precomputed difference" form.
fn csum_diff<const N: usize>(old: &[u32; N], new: &[u32; N]) -> Result<u64, i64> {
    let size = (N * 4) as u32;
    // SAFETY: both pointers are valid for `size` bytes; the helper only reads them.
    let diff = unsafe { bpf_csum_diff(old.as_ptr().cast_mut(), size, new.as_ptr().cast_mut(), size, 0) };
    if diff < 0 { Err(diff) } else { Ok(diff as u64) }
}

/// Sends a translated packet out of the interface the routing table picks for it.
fn forward(ctx: &TcContext, src: [u8; 4], dst: [u8; 4]) -> i32 {
    deliver(route(ctx, src, dst))
}

/// The FIB's answer for a packet from `src` to `dst` that arrived on this packet's interface:
/// the `BPF_FIB_LKUP_RET_*` code and the interface to send it out of.
fn route(ctx: &TcContext, src: [u8; 4], dst: [u8; 4]) -> (u32, u32) {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut params: FibLookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: the context pointer is the program's own skb.
    params.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let size = size_of::<FibLookup>() as i32;
    // SAFETY: params is a valid bpf_fib_lookup of `size` bytes.
    let rc = unsafe { bpf_fib_lookup(ctx.skb.skb.cast(), &mut params, size, 0) } as u32;
    (rc, params.ifindex)
}

/// Redirects to the route's interface, resolving the next hop; with no route to forward on (a
/// local destination among them), lets the stack decide.
fn deliver((rc, ifindex): (u32, u32)) -> i32 {
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return TC_ACT_OK;
    }
    // SAFETY: a null neighbour means "resolve the next hop from the FIB".
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
