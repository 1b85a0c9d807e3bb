//! TC programs: the ingress one takes traffic that arrives from outside the node for a
//! NodePort, an external IP or a LoadBalancer IP, and the replies of such flows; the egress one
//! only the replies of flows whose backend is the node itself (a hostNetwork endpoint).
//!
//! A new flow picks a backend with the same selection as the socket path ([`crate::lb`]),
//! records both directions in `conntrack`, DNATs to the backend and, under
//! `externalTrafficPolicy: Cluster`, SNATs to a node address and a free port so replies come
//! back through this node (what KUBE-MARK-MASQ achieves). Replies are reverse-translated from
//! their conntrack entry, so the client sees the address and port it connected to. Translated
//! packets are forwarded with a FIB lookup and `bpf_redirect_neigh` ([`fib`]).
//!
//! A backend at one of the node's own addresses is the exception: its packets are DNATed but
//! not SNATed (the node would otherwise see its own address as a martian source) and handed
//! to the stack; its replies leave through the stack, past no ingress hook, so the egress
//! program on the node's interfaces translates them back.
//!
//! Under `--bpf-lb-sock-hostns-only` the ingress program also runs on the pod-facing
//! interfaces the agent lists in `pod_interfaces`: pods' traffic leaves them untranslated (the
//! socket programs leave pods alone, for service meshes), and a new flow from there is opened
//! as the socket path would pick it ([`Origin::Node`]: ClusterIPs, internal traffic policy, no
//! source ranges) and DNATed without SNAT, kube-proxy's way; only a pod reaching itself
//! (hairpin) is SNATed to the node, as kube-proxy masquerades it.
//!
//! - [`packet`]: parsing (IPv4, and IPv6 with [`ipv6`]'s walk over extension headers) and
//!   predicates on the parsed packet;
//! - [`conntrack`]: opening and following flows;
//! - [`nat`]: SNAT address and port, the rewrite and its checksums;
//! - [`icmp`]: ICMP and ICMPv6 errors quoting a tracked flow;
//! - [`dsr`]: direct server return, the option to the backend's node and, there, the replies;
//! - [`fib`]: sending a translated packet on;
//! - [`reject`]: kube-proxy's REJECT for pods' packets (a TCP reset, an ICMP port unreachable).
//!
//! Every packet dropped (or handed to the stack to be refused) is counted by reason
//! ([`crate::drops`]).

mod conntrack;
mod dsr;
mod fib;
mod icmp;
mod ipv6;
mod nat;
mod packet;
mod reject;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NOT_FWDED, TC_ACT_OK, TC_ACT_UNSPEC},
    btf_maps::{Array, lpm_trie::Key},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use proxy_common::{
    affinity::AffinityKey,
    backend::{BACKEND_F_DSR, BACKEND_F_LOCAL},
    conntrack::{CT_F_DSR, CT_F_LOCAL, CT_F_REPLY, CT_F_SNAT, CtValue, expired},
    drop,
    maps::{HANDOVER_DORMANT, HANDOVER_NONE},
    service::{SOURCE_RANGE_FRONTEND_BITS, SVC_F_DSR, SVC_F_EXT_LOCAL, SVC_F_SOURCE_RANGES, SourceRange},
    trace::PATH_TC,
};

use self::packet::{Family, Packet, Skip};
use crate::{
    drops,
    lb::{self, Origin, Selected, Verdict},
    maps::{CONNTRACK, POD_INTERFACES, SOURCE_RANGES},
    trace,
};

/// Where an upgrade's swap stands for these programs (`proxy_common::maps::HANDOVER_*`): see
/// [`pass`]. Not pinned: this object's own, written only by the agent that loaded it.
#[btf_map(name = "handover")]
static HANDOVER: Array<u32, 1> = Array::new();

/// A call of its own: its lookup key does not widen the callers' stack frames.
#[inline(never)]
fn handover() -> u32 {
    HANDOVER.get(0).copied().unwrap_or(HANDOVER_NONE)
}

/// The verdict for a packet these programs leave as it is: on to the stack, or, while an
/// upgrade hands over, on to the older agent's programs attached after these (tcx's "next",
/// which is "pass" at the end of the chain), which then still serve the flows they opened.
fn pass() -> i32 {
    if handover() == HANDOVER_NONE { TC_ACT_OK } else { TC_ACT_UNSPEC }
}

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    if handover() == HANDOVER_DORMANT {
        return TC_ACT_UNSPEC;
    }
    let mut packet = Packet::EMPTY;
    match packet.parse(&ctx) {
        Ok(()) => ingress(&ctx, &packet),
        Err(Skip::Other) => icmp::icmp_error(&ctx),
        // Left to the stack, as before there was a count: it discards a malformed packet, and
        // a fragment without its first one is not ours to translate.
        Err(skip) => {
            if let Some(reason) = skip.reason() {
                drops::count(reason);
            }
            TC_ACT_OK
        }
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
    if handover() == HANDOVER_DORMANT {
        return TC_ACT_UNSPEC;
    }
    let mut packet = Packet::EMPTY;
    match packet.parse(&ctx) {
        Ok(()) => egress(&ctx, &packet),
        Err(_) => TC_ACT_OK,
    }
}

/// Returned by [`follow`] for a packet of no tracked flow.
const CONTINUE: i32 = i32::MIN;
/// Returned by [`choose`]: the packet is for no frontend (or opens nothing): let it pass.
const PASS: u32 = u32::MAX;
/// Returned by [`choose`]: a backend is chosen, open a flow; by [`new_flow`]: it is open.
const OPEN: u32 = u32::MAX - 1;

/// A packet from outside: a tracked flow's is translated, a frontend's first opens a flow,
/// anything else passes. Each step is a function of its own (a BPF-to-BPF call) called from
/// here, so their stack frames sit side by side rather than on top of each other: the BPF
/// stack (512 bytes for the whole call chain) holds 16-byte addresses only that way.
#[inline(always)]
fn ingress(ctx: &TcContext, packet: &Packet) -> i32 {
    let verdict = follow(ctx, packet);
    if verdict != CONTINUE {
        return verdict;
    }
    let verdict = dsr::receive(ctx, packet);
    if verdict != CONTINUE {
        return verdict;
    }
    if !packet.has_l4 {
        // A later fragment of a flow that is not tracked: nothing to translate.
        return pass();
    }
    let origin = origin(ctx);
    let mut selected = Selected::default();
    let mut verdict = TC_ACT_OK;
    let chosen = match origin {
        Origin::External => choose(packet, &mut selected),
        Origin::Node => choose_for_pod(packet, &mut selected),
    };
    let reason = match chosen {
        OPEN => new_flow(ctx, packet, &selected, origin, &mut verdict),
        other => other,
    };
    match reason {
        OPEN => verdict,
        PASS => pass(),
        // A flow the older programs behind these opened, while they hand over.
        drop::NOT_A_NEW_CONNECTION if handover() != HANDOVER_NONE => TC_ACT_UNSPEC,
        // A pod's packet to the service address would be routed on by the stack: the node
        // answers it itself, as kube-proxy's REJECT does.
        drop::NO_ENDPOINT if origin == Origin::Node => {
            refuse(packet, drop::NO_ENDPOINT);
            reject::reject(ctx, packet)
        }
        // No endpoint at all: the node's own stack answers (TCP RST, ICMP port unreachable),
        // which is kube-proxy's REJECT.
        drop::NO_ENDPOINT => {
            refuse(packet, drop::NO_ENDPOINT);
            TC_ACT_OK
        }
        reason => refuse(packet, reason),
    }
}

/// A packet of a tracked flow is translated and sent on; [`CONTINUE`] for any other.
#[inline(never)]
fn follow(ctx: &TcContext, packet: &Packet) -> i32 {
    let Some(entry) = CONNTRACK.get_ptr_mut(packet.key()) else { return CONTINUE };
    // The clock only where it is needed: most packets that reach here are for no frontend.
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: the pointer comes from a successful lookup; fields are plain integers.
    let value = unsafe { &mut *entry };
    if !conntrack::follows(value, packet, now) {
        return CONTINUE;
    }
    conntrack::track(value, packet, now);
    let to = *value;
    if to.flags & CT_F_DSR != 0 && packet.may_open_flow() {
        // A retransmitted SYN or a later datagram: the backend's node may not know it yet.
        return dsr::forward(ctx, packet, &to);
    }
    translate(ctx, packet, &to)
}

/// Whose traffic a packet's new flow is: a pod's of this node ([`Origin::Node`], as the socket
/// path would have translated it) when it arrived on a pod-facing interface the agent listed
/// (only under `--bpf-lb-sock-hostns-only`), else from outside the node. A call of its own: the
/// lookup key does not widen the caller's frame.
#[inline(never)]
fn origin(ctx: &TcContext) -> Origin {
    // SAFETY: the context pointer is the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: only whether there is an entry is read.
    if unsafe { POD_INTERFACES.get(ifindex) }.is_some() { Origin::Node } else { Origin::External }
}

/// The first packet to a frontend: picks its backend into `selected` and returns [`OPEN`];
/// [`PASS`] for a packet to no frontend; else the reason to drop it (`proxy_common::drop`).
#[inline(never)]
fn choose(packet: &Packet, selected: &mut Selected) -> u32 {
    let client = AffinityKey { client: packet.src, ..AffinityKey::default() };
    match lb::select_flow(packet.dst, packet.dport, packet.proto, client, Origin::External, Some(packet)) {
        Verdict::NotAService => PASS,
        // No local endpoint under eTP=Local while other nodes have some: drop, as kube-proxy
        // does (with no endpoint anywhere it rejects).
        Verdict::NoBackend(flags)
            if flags & SVC_F_EXT_LOCAL != 0 && lb::cluster_has_backends(packet.dst, packet.dport, packet.proto) =>
        {
            drop::NO_LOCAL_ENDPOINT
        }
        Verdict::NoBackend(_) => drop::NO_ENDPOINT,
        Verdict::Backend(_) if !packet.may_open_flow() => drop::NOT_A_NEW_CONNECTION,
        // loadBalancerSourceRanges: only listed clients, as kube-proxy's firewall chain.
        Verdict::Backend(chosen) if chosen.flags & SVC_F_SOURCE_RANGES != 0 && !admitted(packet) => {
            drop::SOURCE_RANGE_DENIED
        }
        Verdict::Backend(chosen) => {
            *selected = chosen;
            OPEN
        }
    }
}

/// [`choose`] for a pod's packet (`--bpf-lb-sock-hostns-only`): the pick the socket path would
/// make ([`Origin::Node`]: the node's backend set, internal traffic policy, no source ranges,
/// no Maglev), the client being the pod's address. A function of its own: with both origins in
/// one, the frame outgrows the BPF stack.
#[inline(never)]
fn choose_for_pod(packet: &Packet, selected: &mut Selected) -> u32 {
    let client = AffinityKey { client: packet.src, ..AffinityKey::default() };
    match lb::select(packet.dst, packet.dport, packet.proto, client, Origin::Node) {
        Verdict::NotAService => PASS,
        // The node's backend set is empty: nothing serves this pod, a REJECT.
        Verdict::NoBackend(_) => drop::NO_ENDPOINT,
        Verdict::Backend(_) if !packet.may_open_flow() => drop::NOT_A_NEW_CONNECTION,
        Verdict::Backend(chosen) => {
            *selected = chosen;
            OPEN
        }
    }
}

/// A packet the node sends: the reply of a flow to a local backend is translated back.
fn egress(ctx: &TcContext, packet: &Packet) -> i32 {
    let Some(entry) = CONNTRACK.get_ptr_mut(packet.key()) else {
        // A hostNetwork backend's reply to a flow another node sent here by DSR.
        if packet.family == Family::V4 && dsr::reply_leaving(ctx, packet) {
            return TC_ACT_OK;
        }
        return pass();
    };
    // SAFETY: the pointer comes from a successful lookup; fields are plain integers.
    let value = unsafe { &mut *entry };
    if value.flags & (CT_F_LOCAL | CT_F_REPLY) != CT_F_LOCAL | CT_F_REPLY {
        return TC_ACT_OK;
    }
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if expired(value.flags, packet.proto, value.last_seen_ns, now) {
        return TC_ACT_OK;
    }
    conntrack::track(value, packet, now);
    let to = *value;
    // Already on its way out of the interface the stack routed it to.
    match nat::rewrite(ctx, packet, &to) {
        Ok(()) => TC_ACT_OK,
        Err(_) => drops::shot(drop::REWRITE_FAILED),
    }
}

/// Opens a flow to `selected` for the connection's first packet, translates it and sends it on,
/// setting `verdict`; returns [`OPEN`], or the reason to drop the packet (the caller counts
/// it: [`refuse`] called from here would stack its frame on this one's). A function of its
/// own (a BPF-to-BPF call), so its stack is not added to the lookup's.
#[inline(never)]
fn new_flow(ctx: &TcContext, packet: &Packet, selected: &Selected, origin: Origin, verdict: &mut i32) -> u32 {
    // Direct server return (traffic from outside only) keeps the client's address for a local
    // backend and for one on a node that takes DSR (IPv4 only: IPv6 frontends stay SNATed);
    // only the latter needs the option. A backend on a node without our programs would get an
    // option nobody strips and answer the client from its own address: SNATed instead.
    let dsr = origin == Origin::External
        && selected.flags & SVC_F_DSR != 0
        && packet.family == Family::V4
        && selected.backend.flags & (BACKEND_F_LOCAL | BACKEND_F_DSR) != 0;
    // A pod's flow keeps its source (kube-proxy DNATs it only), but a pod reaching itself is
    // masqueraded: it would drop a packet from its own address.
    let snat_needed = match origin {
        Origin::Node => selected.backend.address == packet.src,
        Origin::External => selected.flags & SVC_F_EXT_LOCAL == 0 && !dsr,
    };
    let snat = if snat_needed {
        match nat::snat_address(selected.flags, packet.dst) {
            Some(address) => Some(address),
            None => return drop::NO_SNAT_ADDRESS,
        }
    } else {
        None
    };
    // The route the translated packet takes, looked up once: it also tells whether the backend
    // is one of the node's own addresses (not forwarded: local).
    let route = fib::route(ctx, snat.as_ref().unwrap_or(&packet.src), &selected.backend.address);
    let local = route.rc == BPF_FIB_LKUP_RET_NOT_FWDED;
    let snat = if local { None } else { snat };
    let flags = if local {
        CT_F_LOCAL
    } else if dsr && selected.backend.flags & BACKEND_F_LOCAL == 0 {
        CT_F_DSR
    } else {
        0
    };
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let to = match conntrack::open_flow(packet, selected, snat, flags, now) {
        Ok(to) => to,
        Err(reason) => return reason,
    };
    if nat::rewrite(ctx, packet, to).is_err() {
        return drop::REWRITE_FAILED;
    }
    if flags == CT_F_DSR && dsr::add_option(ctx, packet).is_err() {
        return drop::REWRITE_FAILED;
    }
    if trace::on() {
        trace_open(packet, selected, to);
    }
    *verdict = fib::deliver(route);
    OPEN
}

/// Traces a flow [`new_flow`] opened to `selected`, translated to `to`. A function of its own:
/// the event's fields are not on a new flow's stack.
#[inline(never)]
fn trace_open(packet: &Packet, selected: &Selected, to: &CtValue) {
    trace::emit(|event| {
        trace::translated(event, (PATH_TC, packet.proto), &packet.dst, packet.dport, selected);
        event.client = packet.src;
        event.client_port = packet.sport;
        if to.flags & CT_F_SNAT != 0 {
            event.snat = to.src;
            event.snat_port = to.sport;
        }
    });
}

/// Counts (and traces) a drop of a packet to a frontend for `reason`; returns the verdict that
/// drops it. A function of its own: the trace event's fields are not on a new flow's stack.
#[inline(never)]
fn refuse(packet: &Packet, reason: u32) -> i32 {
    if trace::on() {
        trace::emit(|event| {
            trace::dropped(event, (PATH_TC, packet.proto), &packet.dst, packet.dport, reason);
            event.client = packet.src;
            event.client_port = packet.sport;
        });
    }
    drops::shot(reason)
}

/// Whether the packet's client is inside one of its frontend's `loadBalancerSourceRanges`.
fn admitted(packet: &Packet) -> bool {
    let data = SourceRange::new(packet.dst, packet.dport, packet.proto, packet.src);
    let key = Key::new(SOURCE_RANGE_FRONTEND_BITS + 128, data);
    SOURCE_RANGES.get(&key).is_some()
}

/// Rewrites a tracked flow's packet to `to` and sends it on.
#[inline(always)]
fn translate(ctx: &TcContext, packet: &Packet, to: &CtValue) -> i32 {
    if nat::rewrite(ctx, packet, to).is_err() {
        return drops::shot(drop::REWRITE_FAILED);
    }
    fib::forward(ctx, &to.src, &to.dst)
}
