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
//! - [`packet`]: parsing and predicates on the parsed packet;
//! - [`conntrack`]: opening and following flows;
//! - [`nat`]: SNAT address and port, the rewrite and its checksums;
//! - [`icmp`]: ICMP errors quoting a tracked flow;
//! - [`fib`]: sending a translated packet on.
//!
//! Every packet dropped (or handed to the stack to be refused) is counted by reason
//! ([`crate::drops`]).

mod conntrack;
mod fib;
mod icmp;
mod nat;
mod packet;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NOT_FWDED, TC_ACT_OK},
    btf_maps::lpm_trie::Key,
    helpers::bpf_ktime_get_coarse_ns,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    affinity::AffinityKey,
    conntrack::CT_F_SNAT,
    conntrack::{CT_F_LOCAL, CT_F_REPLY, CtKey, CtValue, expired},
    drop,
    service::{SOURCE_RANGE_FRONTEND_BITS, SVC_F_EXT_LOCAL, SVC_F_SOURCE_RANGES, SourceRange},
    trace::PATH_TC,
};

use self::packet::{Packet, Skip};
use crate::{
    drops,
    lb::{self, Origin, Selected, Verdict},
    maps::{CONNTRACK, SOURCE_RANGES},
    trace,
};

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    match Packet::parse(&ctx) {
        Ok(packet) => ingress(&ctx, &packet),
        Err(Skip::Other) => icmp::icmp_error(&ctx).unwrap_or(TC_ACT_OK),
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
    match Packet::parse(&ctx) {
        Ok(packet) => egress(&ctx, &packet),
        Err(_) => TC_ACT_OK,
    }
}

/// A packet from outside: a tracked flow's is translated, a frontend's first opens a flow,
/// anything else passes.
fn ingress(ctx: &TcContext, packet: &Packet) -> i32 {
    let key = packet.key();
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        // The clock only where it is needed: most packets that reach here are for no frontend.
        // SAFETY: a plain helper call without arguments.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        // SAFETY: the pointer comes from a successful lookup; fields are plain integers.
        let value = unsafe { &mut *entry };
        if conntrack::follows(value, packet, now) {
            conntrack::track(value, packet, now);
            let to = *value;
            return translate(ctx, packet, &to);
        }
    }
    if !packet.has_l4 {
        // A later fragment of a flow that is not tracked: nothing to translate.
        return TC_ACT_OK;
    }
    let client = AffinityKey { client: packet.src, ..AffinityKey::default() };
    match lb::select_flow(packet.dst, packet.dport, packet.proto, client, Origin::External, Some(&key)) {
        Verdict::NotAService => TC_ACT_OK,
        // No local endpoint under eTP=Local while other nodes have some: drop, as kube-proxy
        // does (with no endpoint anywhere it rejects, below).
        Verdict::NoBackend(flags)
            if flags & SVC_F_EXT_LOCAL != 0 && lb::cluster_has_backends(packet.dst, packet.dport, packet.proto) =>
        {
            refuse(packet, drop::NO_LOCAL_ENDPOINT)
        }
        // No endpoint at all: the node's own stack answers (TCP RST, ICMP port unreachable),
        // which is kube-proxy's REJECT.
        Verdict::NoBackend(_) => {
            refuse(packet, drop::NO_ENDPOINT);
            TC_ACT_OK
        }
        Verdict::Backend(_) if !packet.may_open_flow() => refuse(packet, drop::NOT_A_NEW_CONNECTION),
        // loadBalancerSourceRanges: only listed clients, as kube-proxy's firewall chain.
        Verdict::Backend(selected) if selected.flags & SVC_F_SOURCE_RANGES != 0 && !admitted(packet) => {
            refuse(packet, drop::SOURCE_RANGE_DENIED)
        }
        Verdict::Backend(selected) => new_flow(ctx, packet, &key, &selected),
    }
}

/// A packet the node sends: the reply of a flow to a local backend is translated back.
fn egress(ctx: &TcContext, packet: &Packet) -> i32 {
    let Some(entry) = CONNTRACK.get_ptr_mut(packet.key()) else { return TC_ACT_OK };
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

/// Opens a flow to `selected` for the connection's first packet, translates it and sends it on.
fn new_flow(ctx: &TcContext, packet: &Packet, key: &CtKey, selected: &Selected) -> i32 {
    let snat = if selected.flags & SVC_F_EXT_LOCAL == 0 {
        match nat::snat_address(selected.flags, packet.dst) {
            Some(address) => Some(address),
            None => return refuse(packet, drop::NO_SNAT_ADDRESS),
        }
    } else {
        None
    };
    // The route the translated packet takes, looked up once: it also tells whether the backend
    // is one of the node's own addresses (not forwarded: local).
    let route = fib::route(ctx, snat.unwrap_or(packet.src), selected.backend.address);
    let local = route.rc == BPF_FIB_LKUP_RET_NOT_FWDED;
    let snat = if local { None } else { snat };
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let to = match conntrack::open_flow(packet, key, selected, snat, local, now) {
        Ok(to) => to,
        Err(reason) => return refuse(packet, reason),
    };
    if nat::rewrite(ctx, packet, &to).is_err() {
        return refuse(packet, drop::REWRITE_FAILED);
    }
    if trace::on() {
        let mut event = trace::translated(PATH_TC, packet.proto, packet.dst, packet.dport, selected);
        event.client = packet.src;
        event.client_port = packet.sport;
        if to.flags & CT_F_SNAT != 0 {
            event.snat = to.src;
            event.snat_port = to.sport;
        }
        trace::emit(event);
    }
    fib::deliver(route)
}

/// Counts (and traces) a drop of a packet to a frontend for `reason`; returns the verdict that
/// drops it.
fn refuse(packet: &Packet, reason: u32) -> i32 {
    if trace::on() {
        let mut event = trace::dropped(PATH_TC, packet.proto, packet.dst, packet.dport, reason);
        event.client = packet.src;
        event.client_port = packet.sport;
        trace::emit(event);
    }
    drops::shot(reason)
}

/// Whether the packet's client is inside one of its frontend's `loadBalancerSourceRanges`.
fn admitted(packet: &Packet) -> bool {
    let data = SourceRange::new(packet.dst, packet.dport, packet.proto, packet.src);
    let key = Key::new(SOURCE_RANGE_FRONTEND_BITS + 32, data);
    SOURCE_RANGES.get(&key).is_some()
}

/// Rewrites a tracked flow's packet to `to` and sends it on.
fn translate(ctx: &TcContext, packet: &Packet, to: &CtValue) -> i32 {
    if nat::rewrite(ctx, packet, to).is_err() {
        return drops::shot(drop::REWRITE_FAILED);
    }
    fib::forward(ctx, to.src, to.dst)
}
