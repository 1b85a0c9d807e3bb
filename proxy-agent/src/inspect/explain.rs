//! `explain`: a connect or packet from a client to address:port/proto — where does it go, and
//! why. Pure: decided from a [`Snapshot`] exactly as the kernel decides, step by step:
//!
//! - `lb::select` (proxy-ebpf/src/lb.rs): look up the frontend's slot-0 master in scope 0; not
//!   there → not a service. Traffic from this node (the socket path) switches to the scope-1
//!   master when the frontend has two scopes (a missing one refuses). `count == 0` → no backend.
//!   With ClientIP affinity, a remembered backend used within the timeout that still exists in
//!   `backends` wins; otherwise slot `random % count + 1`, so each slot has 1/count.
//! - The socket path (sock.rs) keys affinity by the client's netns cookie and refuses a frontend
//!   without backend with ECONNREFUSED.
//! - The packet path (tc/) keys affinity by the client's address, drops a frontend without
//!   backend when its master has `externalTrafficPolicy: Local` and otherwise lets the node's
//!   stack answer (a reset or ICMP unreachable: kube-proxy's REJECT); a new flow is SNATed to
//!   the node unless the policy is Local; packets of a tracked flow follow their conntrack entry.

use std::net::{IpAddr, SocketAddr};

use proxy_common::{
    addr,
    affinity::{AffinityKey, AffinityValue, affinity_service_id},
    backend::{BACKEND_F_LOCAL, BACKEND_F_TERMINATING, BackendId},
    conntrack::CtKey,
    service::*,
};
use serde::Serialize;

use super::{
    Snapshot,
    pins::NetnsInfo,
    view::{self, AffinityState, AffinityView, FrontendView, ServiceIndex},
};
use crate::{datapath::writer::MapStore, model::proto_name};

/// What to explain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    /// The client's address.
    pub from: IpAddr,
    /// The client's source port, when known (names a Maglev pick).
    pub from_port: Option<u16>,
    /// The destination.
    pub to: SocketAddr,
    /// IP protocol number.
    pub proto: u8,
}

/// Where traffic comes from, which decides the attach point and the backend set (`lb::Origin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Started on this node: a connect()/sendmsg() in the agent's cgroup (socket path).
    Node,
    /// Entered the node from outside: a packet on a node interface (packet path).
    Outside,
}

impl Origin {
    /// The traffic in words.
    pub fn words(self) -> &'static str {
        match self {
            Origin::Node => "from this node",
            Origin::Outside => "from outside the node",
        }
    }

    /// The attach point that handles it.
    pub fn hook(self) -> &'static str {
        match self {
            Origin::Node => {
                "socket path: connect()/sendmsg() by a process in the agent's cgroup, rewritten once at connect time"
            }
            Origin::Outside => {
                "packet path: a packet arriving on a node interface, DNATed by TC and tracked in conntrack"
            }
        }
    }
}

/// What happens to the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// One of the candidates, uniformly at random.
    Random,
    /// The backend in the Maglev table slot the flow's hash selects (the same on every node).
    Maglev,
    /// The backend the client's fresh affinity entry names.
    Sticky,
    /// Refused: ECONNREFUSED on the socket path, the node stack's reset or ICMP port
    /// unreachable on the packet path (kube-proxy's REJECT).
    Refused,
    /// Dropped (packet path): `externalTrafficPolicy: Local` without a local endpoint while
    /// other nodes have some, or a client outside `loadBalancerSourceRanges`.
    Dropped,
}

/// A backend the traffic may go to.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    /// The backend id.
    pub backend_id: BackendId,
    /// `address:port/PROTO`; `None` when the id is missing from `backends`.
    pub endpoint: Option<String>,
    /// The endpoint address.
    pub address: Option<IpAddr>,
    /// The endpoint port.
    pub port: Option<u16>,
    /// The slots naming it.
    pub slots: Vec<u16>,
    /// `slots.len() / count`.
    pub probability: f64,
    /// Runs on this node.
    pub local: bool,
    /// Terminating.
    pub terminating: bool,
    /// How traffic from outside reaches it (`super::view::backend_lb_mode`).
    pub lb_mode: Option<&'static str>,
}

/// How one kind of traffic is handled.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PathExplanation {
    /// The traffic this applies to (one origin, or both when they are handled alike).
    pub origins: Vec<Origin>,
    /// The backend set used: `external` (scope 0) or `internal` (scope 1).
    pub scope: &'static str,
    /// Why this backend set, and what else the path does (SNAT, source kept).
    pub reasons: Vec<String>,
    /// What happens.
    pub verdict: Verdict,
    /// The outcome in one sentence.
    pub summary: String,
    /// The backends of the set, with their probabilities (empty when refused or dropped).
    pub candidates: Vec<Candidate>,
    /// With [`Verdict::Sticky`]: the remembered backend.
    pub sticky_to: Option<String>,
    /// With [`Verdict::Maglev`]: the table slot (`1..=M`) the flow hashes to, when the client
    /// port is known (or under ClientIP affinity, which hashes the address only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maglev_slot: Option<u32>,
    /// For traffic from outside at a nodePort, external IP or LoadBalancer IP: `dsr`, `snat`
    /// or `local` (`super::view::lb_mode`), how a new flow reaches a backend on another node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lb_mode: Option<&'static str>,
}

/// The ClientIP affinity entries that bear on the query.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AffinityExplanation {
    /// The service port has `sessionAffinity: ClientIP`.
    pub enabled: bool,
    /// Its timeout.
    pub timeout_seconds: Option<u32>,
    /// Packet path: the entry keyed by the client's address (`--from`).
    pub by_address: Option<AffinityView>,
    /// Socket path: every entry of this service port, keyed by netns cookie (a connect's source
    /// address is not known yet, so the kernel keys by the client's network namespace).
    pub by_netns: Vec<AffinityView>,
    /// The name of the one network namespace holding the client's address, if found.
    pub client_netns: Option<String>,
}

/// The whole answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    /// The client.
    pub from: IpAddr,
    /// `address:port/PROTO`.
    pub to: String,
    /// Whether the destination is a service frontend.
    pub service_frontend: bool,
    /// The frontend that matched, with its service, policies and backend sets.
    pub frontend: Option<FrontendView>,
    /// Per kind of traffic: the backend set, why, and the verdict.
    pub paths: Vec<PathExplanation>,
    /// Affinity entries for this client and service port.
    pub affinity: Option<AffinityExplanation>,
    /// What the maps and the named network namespaces tell about the client.
    pub client: Vec<String>,
    /// Hints: what else the destination is, inconsistencies in the maps.
    pub notes: Vec<String>,
}

/// A snapshot of the `services`, `backends` and `service_names` entries in `store` (any map
/// writer's store: the pinned maps, or the writer's in-memory store in tests), so `explain`
/// and the views can answer for maps that are not pinned. The kernel-written maps (affinity,
/// conntrack) and source ranges are left for the caller to fill.
pub fn snapshot_of<S: MapStore>(store: &S) -> Snapshot {
    Snapshot {
        services: store.service_entries().into_iter().collect(),
        backends: store.backend_entries().into_iter().collect(),
        names: store.service_names().into_iter().collect(),
        maglev_sizes: store
            .maglev_tables()
            .into_iter()
            .filter_map(|id| Some((id, store.maglev_entry(id, 0)?)))
            .collect(),
        maglev_slots: store
            .maglev_tables()
            .into_iter()
            .filter_map(|id| {
                let size = store.maglev_entry(id, 0)?;
                Some((id, (1..=size).map(|slot| store.maglev_entry(id, slot)).collect::<Option<Vec<u32>>>()?))
            })
            .collect(),
        ..Snapshot::default()
    }
}

/// Answers `query` from `snapshot`.
pub fn explain(snapshot: &Snapshot, query: &Query) -> Explanation {
    let key = ServiceKey::master(addr::from_ip(query.to.ip()), query.to.port(), query.proto);
    let to = format!("{}/{}", query.to, proto_name(query.proto));
    let client = client_notes(snapshot, query.from);
    let Some(master) = snapshot.services.get(&key) else {
        return Explanation {
            from: query.from,
            to,
            service_frontend: false,
            frontend: None,
            paths: Vec::new(),
            affinity: None,
            client,
            notes: not_a_frontend_notes(snapshot, query),
        };
    };
    let frontend = view::frontend_view(snapshot, key, master);
    let notes = frontend.problems.iter().map(|p| format!("map problem: {p}")).collect();
    let index = ServiceIndex::new(snapshot);
    let node = path(snapshot, &index, key, master, Origin::Node, query.from, query.from_port);
    let outside = path(snapshot, &index, key, master, Origin::Outside, query.from, query.from_port);
    let paths = if node.scope == outside.scope && node.verdict == outside.verdict && node.sticky_to == outside.sticky_to
    {
        vec![merge(node, outside)]
    } else if master.flags & SVC_F_TWO_SCOPES != 0 {
        // Outside first: scope 0 is the set externalTrafficPolicy shapes.
        vec![outside, node]
    } else {
        vec![node, outside]
    };
    Explanation {
        from: query.from,
        to,
        service_frontend: true,
        affinity: affinity(snapshot, &index, master, query.from),
        frontend: Some(frontend),
        paths,
        client,
        notes,
    }
}

/// One path for both origins when they use the same set with the same verdict; what only the
/// packet path does is said as such.
fn merge(node: PathExplanation, outside: PathExplanation) -> PathExplanation {
    let mut reasons = node.reasons;
    for reason in outside.reasons {
        if !reasons.contains(&reason) {
            reasons.push(format!("from outside: {reason}"));
        }
    }
    let summary = if node.summary == outside.summary {
        node.summary
    } else {
        // Same verdict: say it once ("refused: ..."), then how the packet path does it, and
        // the kube-proxy equivalent once.
        let suffix = if node.summary.ends_with(REJECT) && outside.summary.ends_with(REJECT) { REJECT } else { "" };
        let first = node.summary.strip_suffix(suffix).unwrap_or(&node.summary);
        let rest = outside.summary.strip_suffix(suffix).unwrap_or(&outside.summary);
        let rest = rest.split_once(": ").map_or(rest, |(_, rest)| rest);
        format!("{first}; from outside, {rest}{suffix}")
    };
    PathExplanation { origins: vec![Origin::Node, Origin::Outside], reasons, summary, lb_mode: outside.lb_mode, ..node }
}

/// One origin's path through `lb::select` and its attach point.
fn path(
    snapshot: &Snapshot,
    index: &ServiceIndex,
    key: ServiceKey,
    master: &ServiceValue,
    origin: Origin,
    from: IpAddr,
    from_port: Option<u16>,
) -> PathExplanation {
    let mut reasons = Vec::new();
    // `lb::cluster_has_backends`: whether the cluster-wide set (the internal scope) has any.
    let cluster_has_backends =
        snapshot.services.get(&key.with_scope(SCOPE_INTERNAL)).is_some_and(|internal| internal.count > 0);
    let (key, master) = if origin == Origin::Node && master.flags & SVC_F_TWO_SCOPES != 0 {
        let internal = key.with_scope(SCOPE_INTERNAL);
        match snapshot.services.get(&internal) {
            Some(m) => (internal, m),
            None => {
                return PathExplanation {
                    origins: vec![origin],
                    scope: "internal",
                    reasons: vec!["the frontend has two scopes, but its internal-scope master is missing".into()],
                    verdict: Verdict::Refused,
                    summary: "refused: connect() fails at once with ECONNREFUSED".into(),
                    candidates: Vec::new(),
                    sticky_to: None,
                    maglev_slot: None,
                    lb_mode: None,
                };
            }
        }
    } else {
        (key, master)
    };
    set_reasons(master.flags, key.scope, &mut reasons);
    let scope = view::scope_name(key.scope);
    if master.count == 0 {
        let (verdict, summary) = no_backend(master.flags, origin, cluster_has_backends);
        if verdict == Verdict::Dropped {
            reasons.push("externalTrafficPolicy Local and no endpoint on this node: no backend to send it to".into());
        } else {
            reasons.push("the service port has no usable endpoint now (count 0)".into());
        }
        return PathExplanation {
            origins: vec![origin],
            scope,
            reasons,
            verdict,
            summary,
            candidates: Vec::new(),
            sticky_to: None,
            maglev_slot: None,
            lb_mode: None,
        };
    }
    if origin == Origin::Outside && master.flags & SVC_F_SOURCE_RANGES != 0 {
        match admitted(snapshot, key, from) {
            Some(true) => reasons.push(format!("{from} is inside the service's loadBalancerSourceRanges")),
            Some(false) => {
                reasons.push(format!("{from} is outside the service's loadBalancerSourceRanges"));
                return PathExplanation {
                    origins: vec![origin],
                    scope,
                    reasons,
                    verdict: Verdict::Dropped,
                    summary: "dropped: the client is not in loadBalancerSourceRanges (kube-proxy's firewall chain)"
                        .into(),
                    candidates: Vec::new(),
                    sticky_to: None,
                    maglev_slot: None,
                    lb_mode: None,
                };
            }
            None => reasons.push(
                "loadBalancerSourceRanges apply, but the source_ranges map is not pinned: a client outside them \
                 is dropped"
                    .into(),
            ),
        }
    }
    let candidates = candidates(snapshot, key, master.count, master.flags);
    if !candidates.is_empty() && candidates.iter().all(|c| c.terminating) {
        reasons.push("no endpoint is ready: the serving, terminating ones are used (graceful termination)".into());
    }
    let external_kind = master.flags & (SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER) != 0;
    if origin == Origin::Outside && external_kind {
        reasons.push(if master.flags & SVC_F_EXT_LOCAL != 0 {
            "a new flow keeps the client's source address (externalTrafficPolicy Local)".into()
        } else if master.flags & SVC_F_DSR != 0 {
            "a new flow keeps the client's source address (direct server return): a backend on another node gets \
             the frontend in an IPv4 option and answers the client straight from its node"
                .into()
        } else {
            "a new flow is SNATed to a node address, so replies come back through this node".into()
        });
        reasons.push("packets of a flow already in conntrack keep that flow's backend".into());
    }
    let n = master.count;
    let mut verdict = Verdict::Random;
    let mut summary = if n == 1 {
        "to the only backend".to_owned()
    } else {
        format!("to one of {n} backends, uniformly at random (1/{n} each) per connection")
    };
    let mut sticky_to = None;
    // The packet path keys affinity by the client's address; the socket path by the client's
    // netns cookie, known here when exactly one named namespace holds `from`.
    let affinity_id = affinity_service_id(master.service_id, master.flags, key.scope);
    if master.flags & SVC_F_AFFINITY != 0
        && let Some(key) = match origin {
            Origin::Outside => Some(address_key(affinity_id, from)),
            Origin::Node => client_netns(snapshot, from).map(|n| netns_key(affinity_id, n.cookie)),
        }
        && let Some((k, v)) = affinity_entry(snapshot, key)
        && view::affinity_state(snapshot, index, &k, &v) == AffinityState::Fresh
    {
        let row = view::affinity_view(snapshot, index, &k, &v);
        let backend = row.backend.clone().unwrap_or_default();
        let client = if origin == Origin::Node { row.client.clone() } else { from.to_string() };
        verdict = Verdict::Sticky;
        summary = format!(
            "to {backend}: {client} used it {:.0}s ago (ClientIP affinity, timeout {}s)",
            row.age_seconds, master.affinity_timeout
        );
        if row.backend_left_service {
            reasons.push(format!(
                "{backend} is no longer a backend of this service, but the kernel only checks that its id still exists"
            ));
        }
        sticky_to = Some(backend);
    } else if master.flags & SVC_F_AFFINITY != 0 {
        summary += "; the pick is remembered for the client (ClientIP affinity, see below)";
    }
    let mut maglev_slot = None;
    if verdict == Verdict::Random && origin == Origin::Outside && master.flags & SVC_F_MAGLEV != 0 {
        (verdict, summary, maglev_slot) = maglev_pick(snapshot, master, from, from_port.map(|p| (p, key.port)), key);
    }
    let lb_mode = if origin == Origin::Outside { view::lb_mode(master.flags) } else { None };
    PathExplanation {
        origins: vec![origin],
        scope,
        reasons,
        verdict,
        summary,
        candidates,
        sticky_to,
        maglev_slot,
        lb_mode,
    }
}

/// A new flow from outside at a Maglev frontend (`lb::select_flow`): the slot of the set's
/// table that the flow's hash selects (of the client address only under ClientIP affinity).
fn maglev_pick(
    snapshot: &Snapshot,
    master: &ServiceValue,
    from: IpAddr,
    port: Option<(u16, u16)>,
    key: ServiceKey,
) -> (Verdict, String, Option<u32>) {
    let id = master.service_id;
    let Some(&size) = snapshot.maglev_sizes.get(&id) else {
        return (
            Verdict::Random,
            format!("Maglev, but the backend set has no table yet (id {id}): uniformly at random until it is written"),
            None,
        );
    };
    let seed = snapshot.maglev_seed.unwrap_or_default();
    // The datapath hashes the 16-byte map form of the address (IPv4 as IPv4-mapped).
    let src = addr::from_ip(from);
    let hash = if master.flags & SVC_F_AFFINITY != 0 {
        Some(proxy_common::maglev::hash_bytes(&src, seed))
    } else {
        port.map(|(sport, dport)| {
            let flow = CtKey { src, dst: key.address, sport, dport, proto: key.proto, _pad: [0; 3] };
            proxy_common::maglev::flow_hash(&flow, seed)
        })
    };
    let what = if master.flags & SVC_F_AFFINITY != 0 { "the client address" } else { "the flow's 5-tuple" };
    let Some(hash) = hash else {
        return (
            Verdict::Maglev,
            format!(
                "a new flow goes to the backend in slot 1 + hash({what}) % {size} of the set's Maglev table, the \
                 same on every node with the same backends, table size and seed (give --from-port to name it)"
            ),
            None,
        );
    };
    let slot = proxy_common::maglev::slot(hash, size);
    let backend = snapshot
        .maglev_slots
        .get(&id)
        .and_then(|slots| slots.get(slot as usize - 1))
        .map(|id| snapshot.backends.get(id).map_or(format!("backend id {id} (missing)"), view::backend_text));
    let to = backend.map_or_else(|| "the backend there".to_owned(), |b| b.to_string());
    (
        Verdict::Maglev,
        format!("to {to}: Maglev slot {slot} of {size}, by the hash of {what}; the same on every node"),
        Some(slot),
    )
}

/// Why a scope holds the backends it holds.
fn set_reasons(flags: u16, scope: u8, reasons: &mut Vec<String>) {
    let external_kind = flags & (SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER) != 0;
    if flags & SVC_F_TWO_SCOPES != 0 {
        if scope == SCOPE_INTERNAL {
            reasons.push(
                "the service has two backend sets (externalTrafficPolicy Local); traffic from this node is not \
                 external traffic, so it may go to every endpoint (as kube-proxy does)"
                    .into(),
            );
        } else {
            reasons.push(
                "the service has two backend sets (externalTrafficPolicy Local): traffic from outside goes only \
                 to endpoints on this node"
                    .into(),
            );
        }
        return;
    }
    if flags & SVC_F_INT_LOCAL != 0 && !external_kind {
        reasons.push("internalTrafficPolicy Local: only endpoints on this node".into());
    } else if flags & SVC_F_EXT_LOCAL != 0 && external_kind {
        reasons.push("externalTrafficPolicy Local: only endpoints on this node".into());
    } else {
        reasons.push("one backend set for all traffic: every usable endpoint of the service".into());
    }
}

/// What a refusal is in kube-proxy's terms.
const REJECT: &str = " (kube-proxy's REJECT)";

/// The verdict for a scope with `count == 0`, as each attach point handles `NoBackend`: the
/// packet path drops under `externalTrafficPolicy: Local` only while other nodes have
/// endpoints (`cluster_has_backends`), and rejects when there are none anywhere.
fn no_backend(flags: u16, origin: Origin, cluster_has_backends: bool) -> (Verdict, String) {
    match origin {
        Origin::Node => {
            (Verdict::Refused, "refused: connect() fails at once with ECONNREFUSED (kube-proxy's REJECT)".into())
        }
        Origin::Outside if flags & SVC_F_EXT_LOCAL != 0 && cluster_has_backends => {
            (Verdict::Dropped, "dropped: no endpoint on this node under externalTrafficPolicy Local".into())
        }
        Origin::Outside => (
            Verdict::Refused,
            format!("refused: the node's own stack answers with a TCP reset or ICMP port unreachable{REJECT}"),
        ),
    }
}

/// The backends of one scope with their probabilities, in slot order of first appearance.
fn candidates(snapshot: &Snapshot, key: ServiceKey, count: u16, flags: u16) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    for slot in 1..=count {
        let Some(value) = snapshot.services.get(&key.with_slot(slot)) else { continue };
        if let Some(c) = out.iter_mut().find(|c| c.backend_id == value.backend_id) {
            c.slots.push(slot);
            continue;
        }
        let backend = snapshot.backends.get(&value.backend_id);
        out.push(Candidate {
            backend_id: value.backend_id,
            endpoint: backend.map(view::backend_text),
            address: backend.map(|b| addr::to_ip(&b.address)),
            port: backend.map(|b| b.port),
            slots: vec![slot],
            probability: 0.0,
            local: backend.is_some_and(|b| b.flags & BACKEND_F_LOCAL != 0),
            terminating: backend.is_some_and(|b| b.flags & BACKEND_F_TERMINATING != 0),
            lb_mode: view::backend_lb_mode(flags, backend.map_or(0, |b| b.flags)),
        });
    }
    for c in &mut out {
        c.probability = c.slots.len() as f64 / f64::from(count);
    }
    out
}

/// Whether `from` is inside one of the `loadBalancerSourceRanges` of the frontend `key`, as
/// `tc/mod.rs` `admitted` looks it up (the frontend exactly, the client by longest prefix); `None`
/// when the map was not read.
fn admitted(snapshot: &Snapshot, key: ServiceKey, from: IpAddr) -> Option<bool> {
    let ranges = snapshot.source_ranges.as_ref()?;
    let port_be = key.port.to_be_bytes();
    Some(ranges.iter().any(|(prefix_len, range)| {
        let Some(bits) = prefix_len.checked_sub(SOURCE_RANGE_FRONTEND_BITS).filter(|bits| *bits <= 128) else {
            return false;
        };
        let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
        range.address == key.address
            && range.port_be == port_be
            && range.proto == key.proto
            && u128::from_be_bytes(range.client) & mask == u128::from_be_bytes(addr::from_ip(from)) & mask
    }))
}

/// The affinity entry of `key` (`service_id` filled in by the caller).
fn affinity_entry(snapshot: &Snapshot, key: AffinityKey) -> Option<(AffinityKey, AffinityValue)> {
    snapshot.affinity.iter().flatten().find(|(k, _)| *k == key).copied()
}

/// The packet path's affinity key of `from`.
fn address_key(service_id: u32, from: IpAddr) -> AffinityKey {
    AffinityKey { client: addr::from_ip(from), service_id, ..AffinityKey::default() }
}

/// The socket path's affinity key of a client in the namespace with `cookie`.
fn netns_key(service_id: u32, cookie: u64) -> AffinityKey {
    AffinityKey { netns_cookie: cookie, service_id, ..AffinityKey::default() }
}

/// The one namespace holding `from`, if exactly one does.
fn client_netns(snapshot: &Snapshot, from: IpAddr) -> Option<&NetnsInfo> {
    let mut holding = snapshot.netns.iter().filter(|n| n.addresses.contains(&from));
    let first = holding.next()?;
    holding.next().is_none().then_some(first)
}

/// The affinity entries that bear on the query: `from`'s own, and the service's netns-keyed ones.
fn affinity(
    snapshot: &Snapshot,
    index: &ServiceIndex,
    master: &ServiceValue,
    from: IpAddr,
) -> Option<AffinityExplanation> {
    let enabled = master.flags & SVC_F_AFFINITY != 0;
    // Each path remembers picks under the id of the backend set it uses.
    let packet_id = affinity_service_id(master.service_id, master.flags, SCOPE_EXTERNAL);
    let socket_scope = if master.flags & SVC_F_TWO_SCOPES != 0 { SCOPE_INTERNAL } else { SCOPE_EXTERNAL };
    let socket_id = affinity_service_id(master.service_id, master.flags, socket_scope);
    let by_address = affinity_entry(snapshot, address_key(packet_id, from))
        .map(|(k, v)| view::affinity_view(snapshot, index, &k, &v));
    let mut by_netns: Vec<AffinityView> = snapshot
        .affinity
        .iter()
        .flatten()
        .filter(|(k, _)| k.service_id == socket_id && k.netns_cookie != 0)
        .map(|(k, v)| view::affinity_view(snapshot, index, k, v))
        .collect();
    by_netns.sort_by(|a, b| a.client.cmp(&b.client));
    if !enabled && by_address.is_none() && by_netns.is_empty() {
        return None;
    }
    Some(AffinityExplanation {
        enabled,
        timeout_seconds: enabled.then_some(master.affinity_timeout),
        by_address,
        by_netns,
        client_netns: client_netns(snapshot, from).map(|n| n.name.clone()),
    })
}

/// What else the destination is, when it is not a frontend.
fn not_a_frontend_notes(snapshot: &Snapshot, query: &Query) -> Vec<String> {
    let address = addr::from_ip(query.to.ip());
    let mut notes = Vec::new();
    let mut others: Vec<String> = snapshot
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0 && k.scope == SCOPE_EXTERNAL && k.address == address)
        .map(|(k, v)| format!("{}/{} ({})", k.port, proto_name(k.proto), view::service_label(snapshot, v.service_id)))
        .collect();
    if !others.is_empty() {
        others.sort();
        notes.push(format!(
            "{} is a service address, but not on {}/{}: it serves {}",
            query.to.ip(),
            query.to.port(),
            proto_name(query.proto),
            others.join(", ")
        ));
    }
    let index = ServiceIndex::new(snapshot);
    for (id, backend) in &snapshot.backends {
        if backend.address == address && backend.port == query.to.port() && backend.proto == query.proto {
            let users: Vec<String> = index
                .backends
                .iter()
                .filter(|(_, ids)| ids.contains(id))
                .map(|(service, _)| view::service_label(snapshot, *service))
                .collect();
            notes.push(format!(
                "{} is backend {id} (an endpoint of {}): addressed directly, it is not load balanced",
                view::backend_text(backend),
                if users.is_empty() { "no service".to_owned() } else { users.join(", ") }
            ));
        }
    }
    notes
}

/// Who the client is, when the maps know its address.
fn client_notes(snapshot: &Snapshot, from: IpAddr) -> Vec<String> {
    let mut notes = Vec::new();
    let holding: Vec<String> = snapshot
        .netns
        .iter()
        .filter(|n| n.addresses.contains(&from))
        .map(|n| format!("{} (cookie {})", n.name, n.cookie))
        .collect();
    match holding.len() {
        0 => {}
        1 => notes.push(format!("in network namespace {}", holding[0])),
        _ => notes.push(format!(
            "in several network namespaces ({}): which one's affinity entry applies is ambiguous",
            holding.join(", ")
        )),
    }
    let local_pod =
        snapshot.backends.values().any(|b| addr::to_ip(&b.address) == from && b.flags & BACKEND_F_LOCAL != 0);
    if local_pod {
        notes.push("an endpoint on this node: its connects take the socket path (from this node)".to_owned());
    }
    let node_address = snapshot
        .services
        .iter()
        .any(|(k, v)| k.slot == 0 && v.flags & SVC_F_NODE_PORT != 0 && addr::to_ip(&k.address) == from);
    if node_address {
        notes.push("this node's address: its connects take the socket path (from this node)".to_owned());
    }
    notes
}
