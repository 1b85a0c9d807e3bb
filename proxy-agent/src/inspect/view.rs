//! A [`Snapshot`] as rows: frontends with their backends in slot order, backends with their
//! users, affinity entries with their age and what the kernel will do with them. Pure: no I/O.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use proxy_common::{
    addr::{self, Addr},
    affinity::{AffinityKey, AffinityValue, affinity_service_id},
    backend::{BACKEND_F_DSR, BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend, BackendId},
    conntrack::{
        CT_F_CLOSING, CT_F_DSR, CT_F_FIN, CT_F_LOCAL, CT_F_PEER_FIN, CT_F_REPLY, CT_F_SNAT, expired, timeout_s,
    },
    service::*,
};
use serde::Serialize;

use super::Snapshot;
use crate::model::proto_name;

/// A NUL-padded string field of a map value.
pub fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A service port as `service_names` names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRef {
    /// The service's namespace.
    pub namespace: String,
    /// The service's name.
    pub name: String,
    /// The port's name (empty for an unnamed port).
    pub port_name: String,
}

impl ServiceRef {
    /// `namespace/name` or `namespace/name:port` (kube-proxy's `ServicePortName`).
    pub fn display(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// The service port behind `id`, from `service_names`.
pub fn service_ref(snapshot: &Snapshot, id: u32) -> Option<ServiceRef> {
    let name = snapshot.names.get(&(id & !SERVICE_ID_LOCAL_SET))?;
    Some(ServiceRef { namespace: text(&name.namespace), name: text(&name.name), port_name: text(&name.port) })
}

/// `namespace/name[:port]`, or `service id N` when `service_names` has no entry.
pub fn service_label(snapshot: &Snapshot, id: u32) -> String {
    service_ref(snapshot, id).map_or_else(|| format!("service id {id} (unnamed)"), |s| s.display())
}

/// `address:port/PROTO` of a frontend (`[address]:port/PROTO` for IPv6).
pub fn frontend_text(key: &ServiceKey) -> String {
    format!("{}/{}", SocketAddr::new(addr::to_ip(&key.address), key.port), proto_name(key.proto))
}

/// `address:port/PROTO` of a backend.
pub fn backend_text(backend: &Backend) -> String {
    format!("{}/{}", SocketAddr::new(addr::to_ip(&backend.address), backend.port), proto_name(backend.proto))
}

/// The frontend kinds in `flags`, in words.
pub fn kinds(flags: u16) -> Vec<&'static str> {
    [
        (SVC_F_CLUSTER_IP, "ClusterIP"),
        (SVC_F_NODE_PORT, "NodePort"),
        (SVC_F_EXTERNAL_IP, "ExternalIP"),
        (SVC_F_LOAD_BALANCER, "LoadBalancer"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, word)| word)
    .collect()
}

/// The policy flags of a master entry, in words: `eTP Local`, `iTP Local`,
/// `affinity ClientIP 10800s`, `terminating fallback`, `two scopes`.
pub fn policies(flags: u16, affinity_timeout: u32) -> Vec<String> {
    let mut out = Vec::new();
    if flags & SVC_F_EXT_LOCAL != 0 {
        out.push("eTP Local".to_owned());
    }
    if flags & SVC_F_INT_LOCAL != 0 {
        out.push("iTP Local".to_owned());
    }
    if flags & SVC_F_AFFINITY != 0 {
        out.push(format!("affinity ClientIP {affinity_timeout}s"));
    }
    if flags & SVC_F_TERMINATING_FALLBACK != 0 {
        out.push("terminating fallback".to_owned());
    }
    if flags & SVC_F_TWO_SCOPES != 0 {
        out.push("two scopes".to_owned());
    }
    if flags & SVC_F_DSR != 0 {
        out.push("dsr".to_owned());
    }
    out
}

/// How traffic from outside reaches a backend on another node at a frontend with `flags`:
/// `dsr` (direct server return), `snat`, or `local` (eTP Local: no other node's backend);
/// `None` for a ClusterIP, which only this node's sockets reach.
pub fn lb_mode(flags: u16) -> Option<&'static str> {
    if flags & (SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER) == 0 {
        None
    } else if flags & SVC_F_EXT_LOCAL != 0 {
        Some("local")
    } else if flags & SVC_F_DSR != 0 {
        Some("dsr")
    } else {
        Some("snat")
    }
}

/// How traffic from outside reaches one backend of a frontend with `flags`: the frontend's
/// [`lb_mode`], except that direct server return is `snat` for a backend on another node
/// that does not take it (no `BACKEND_F_DSR`: its node has no DSR annotation).
pub fn backend_lb_mode(flags: u16, backend_flags: u8) -> Option<&'static str> {
    match lb_mode(flags) {
        Some("dsr") if backend_flags & (BACKEND_F_LOCAL | BACKEND_F_DSR) == 0 => Some("snat"),
        mode => mode,
    }
}

/// One frontend as the kernel sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendView {
    /// `address:port/PROTO`.
    pub frontend: String,
    /// The frontend address.
    pub address: IpAddr,
    /// The frontend port.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: &'static str,
    /// `namespace/name[:port]`, `None` when `service_names` lacks the id.
    pub service: Option<String>,
    /// The service's namespace.
    pub namespace: Option<String>,
    /// The service's name.
    pub name: Option<String>,
    /// The service port's name (empty for an unnamed port).
    pub port_name: Option<String>,
    /// The service port's id (the affinity map's key part).
    pub service_id: u32,
    /// `ClusterIP`, `NodePort`, `ExternalIP`, `LoadBalancer`.
    pub kinds: Vec<&'static str>,
    /// The policy flags in words (see [`policies`]), and the Maglev table when the frontend
    /// hashes (`maglev M=16381`).
    pub policies: Vec<String>,
    /// How traffic from outside picks a backend at this frontend: `random` or `maglev`
    /// (traffic from the node always picks at random).
    pub algorithm: &'static str,
    /// The size of the backend set's Maglev table; `None` when the frontend does not hash, or
    /// its table is not written (yet).
    pub maglev_table_size: Option<u32>,
    /// How traffic from outside reaches a backend on another node ([`lb_mode`]): `dsr`,
    /// `snat` or `local`; `None` for a ClusterIP.
    pub lb_mode: Option<&'static str>,
    /// `Local` or `Cluster`.
    pub external_traffic_policy: &'static str,
    /// `Local` or `Cluster`.
    pub internal_traffic_policy: &'static str,
    /// `sessionAffinity: ClientIP` timeout; `None` without affinity.
    pub affinity_timeout_seconds: Option<u32>,
    /// Only terminating endpoints are left and serve.
    pub terminating_fallback: bool,
    /// Traffic from this node has its own backend set.
    pub two_scopes: bool,
    /// The raw `SVC_F_*` bits.
    pub flags: u16,
    /// The backend sets: one, or external then internal.
    pub scopes: Vec<ScopeView>,
    /// Inconsistencies found in the map (missing slots or backends).
    pub problems: Vec<String>,
}

/// One backend set of a frontend.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScopeView {
    /// `external` (scope 0) or `internal` (scope 1), as the map key names it.
    pub scope: &'static str,
    /// Which traffic uses it: `all`, `from outside the node` or `from this node`.
    pub traffic: &'static str,
    /// The master's `count`: 0 means no usable endpoint.
    pub count: u16,
    /// The backends in slot order (slots the map lacks are left out and reported).
    pub backends: Vec<SlotView>,
}

/// One backend slot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlotView {
    /// The slot (1..=count).
    pub slot: u16,
    /// The backend id it names.
    pub backend_id: BackendId,
    /// `address:port`; `None` when the id is not in `backends`.
    pub endpoint: Option<String>,
    /// The endpoint address.
    pub address: Option<IpAddr>,
    /// The endpoint port.
    pub port: Option<u16>,
    /// The endpoint runs on this node.
    pub local: bool,
    /// The endpoint is terminating.
    pub terminating: bool,
    /// How traffic from outside reaches it ([`backend_lb_mode`]).
    pub lb_mode: Option<&'static str>,
}

/// The traffic that uses scope `scope` of a frontend with these flags.
pub fn scope_traffic(flags: u16, scope: u8) -> &'static str {
    match (flags & SVC_F_TWO_SCOPES != 0, scope) {
        (false, _) => "all",
        (true, SCOPE_INTERNAL) => "from this node",
        (true, _) => "from outside the node",
    }
}

/// The name of a scope as the map key has it.
pub fn scope_name(scope: u8) -> &'static str {
    if scope == SCOPE_INTERNAL { "internal" } else { "external" }
}

/// The backend set of one scope of a frontend: its master's slots in order, plus problems.
pub fn scope_view(snapshot: &Snapshot, key: ServiceKey, flags: u16, problems: &mut Vec<String>) -> Option<ScopeView> {
    let master = snapshot.services.get(&key.with_slot(0))?;
    let mut backends = Vec::with_capacity(usize::from(master.count));
    for slot in 1..=master.count {
        let Some(value) = snapshot.services.get(&key.with_slot(slot)) else {
            problems.push(format!(
                "{} scope: slot {slot} of {} is missing (a pick of it retries once, then is refused)",
                scope_name(key.scope),
                master.count
            ));
            continue;
        };
        let backend = snapshot.backends.get(&value.backend_id);
        if backend.is_none() {
            problems.push(format!(
                "{} scope: slot {slot} names backend {}, which the backends map lacks",
                scope_name(key.scope),
                value.backend_id
            ));
        }
        backends.push(SlotView {
            slot,
            backend_id: value.backend_id,
            endpoint: backend.map(|b| SocketAddr::new(addr::to_ip(&b.address), b.port).to_string()),
            address: backend.map(|b| addr::to_ip(&b.address)),
            port: backend.map(|b| b.port),
            local: backend.is_some_and(|b| b.flags & BACKEND_F_LOCAL != 0),
            terminating: backend.is_some_and(|b| b.flags & BACKEND_F_TERMINATING != 0),
            lb_mode: backend_lb_mode(flags, backend.map_or(0, |b| b.flags)),
        });
    }
    Some(ScopeView {
        scope: scope_name(key.scope),
        traffic: scope_traffic(flags, key.scope),
        count: master.count,
        backends,
    })
}

/// The view of the frontend whose external-scope master is `key` (slot 0, scope 0).
pub fn frontend_view(snapshot: &Snapshot, key: ServiceKey, master: &ServiceValue) -> FrontendView {
    let flags = master.flags;
    let mut problems = Vec::new();
    let service = service_ref(snapshot, master.service_id);
    if service.is_none() {
        problems.push(format!("service id {} has no service_names entry", master.service_id));
    }
    let mut scopes: Vec<ScopeView> = scope_view(snapshot, key, flags, &mut problems).into_iter().collect();
    let internal_key = key.with_scope(SCOPE_INTERNAL);
    if flags & SVC_F_TWO_SCOPES != 0 {
        match scope_view(snapshot, internal_key, flags, &mut problems) {
            Some(scope) => scopes.push(scope),
            None => problems.push(
                "two scopes flagged but the internal-scope master is missing: connects from this node are refused"
                    .to_owned(),
            ),
        }
    } else if snapshot.services.contains_key(&internal_key) {
        problems.push("an internal-scope master without the two-scopes flag: the kernel ignores it".to_owned());
    }
    let affinity = flags & SVC_F_AFFINITY != 0;
    let maglev = flags & SVC_F_MAGLEV != 0;
    let maglev_table_size = snapshot.maglev_sizes.get(&master.service_id).copied().filter(|_| maglev);
    let mut policies = policies(flags, master.affinity_timeout);
    match maglev_table_size {
        Some(size) => policies.push(format!("maglev M={size}")),
        None if maglev => {
            policies.push("maglev (no table)".to_owned());
            problems.push("Maglev frontend without a table: new flows from outside are picked at random".to_owned());
        }
        None => {}
    }
    FrontendView {
        frontend: frontend_text(&key),
        address: addr::to_ip(&key.address),
        port: key.port,
        protocol: proto_name(key.proto),
        service: service.as_ref().map(ServiceRef::display),
        namespace: service.as_ref().map(|s| s.namespace.clone()),
        name: service.as_ref().map(|s| s.name.clone()),
        port_name: service.as_ref().map(|s| s.port_name.clone()),
        service_id: master.service_id,
        kinds: kinds(flags),
        policies,
        algorithm: if maglev { "maglev" } else { "random" },
        maglev_table_size,
        lb_mode: lb_mode(flags),
        external_traffic_policy: if flags & SVC_F_EXT_LOCAL != 0 { "Local" } else { "Cluster" },
        internal_traffic_policy: if flags & SVC_F_INT_LOCAL != 0 { "Local" } else { "Cluster" },
        affinity_timeout_seconds: affinity.then_some(master.affinity_timeout),
        terminating_fallback: flags & SVC_F_TERMINATING_FALLBACK != 0,
        two_scopes: flags & SVC_F_TWO_SCOPES != 0,
        flags,
        scopes,
        problems,
    }
}

/// Every frontend (every external-scope master), grouped by service, then by address.
pub fn services(snapshot: &Snapshot) -> Vec<FrontendView> {
    let mut out: Vec<FrontendView> = snapshot
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0 && k.scope == SCOPE_EXTERNAL)
        .map(|(k, v)| frontend_view(snapshot, *k, v))
        .collect();
    out.sort_by(|a, b| (&a.service, a.address, a.port, a.protocol).cmp(&(&b.service, b.address, b.port, b.protocol)));
    out
}

/// One backend.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendView {
    /// Its id (the key of `backends`, named by service slots).
    pub id: BackendId,
    /// `address:port/PROTO`.
    pub endpoint: String,
    /// The endpoint address.
    pub address: IpAddr,
    /// The endpoint port.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: &'static str,
    /// Runs on this node.
    pub local: bool,
    /// Terminating.
    pub terminating: bool,
    /// The service ports whose slots name it, sorted; empty for an unused backend.
    pub used_by: Vec<String>,
    /// How many slots (over all frontends and scopes) name it.
    pub slots: usize,
}

/// Every backend with the service ports that use it.
pub fn backends(snapshot: &Snapshot) -> Vec<BackendView> {
    let masters = masters_by_frontend(snapshot);
    let mut users: BTreeMap<BackendId, (Vec<String>, usize)> = BTreeMap::new();
    for (key, value) in snapshot.services.iter().filter(|(k, _)| k.slot != 0) {
        let master = masters.get(&(key.address, key.port, key.proto));
        let user = users.entry(value.backend_id).or_default();
        user.1 += 1;
        if let Some(master) = master {
            user.0.push(service_label(snapshot, master.service_id));
        }
    }
    snapshot
        .backends
        .iter()
        .map(|(&id, b)| {
            let (mut used_by, slots) = users.remove(&id).unwrap_or_default();
            used_by.sort();
            used_by.dedup();
            BackendView {
                id,
                endpoint: backend_text(b),
                address: addr::to_ip(&b.address),
                port: b.port,
                protocol: proto_name(b.proto),
                local: b.flags & BACKEND_F_LOCAL != 0,
                terminating: b.flags & BACKEND_F_TERMINATING != 0,
                used_by,
                slots,
            }
        })
        .collect()
}

/// External-scope masters by (address, port, proto).
fn masters_by_frontend(snapshot: &Snapshot) -> BTreeMap<(Addr, u16, u8), ServiceValue> {
    snapshot
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0 && k.scope == SCOPE_EXTERNAL)
        .map(|(k, v)| ((k.address, k.port, k.proto), *v))
        .collect()
}

/// Per affinity id (a service port's backend set, [`affinity_service_id`]): a master entry (all
/// frontends of a service port share flags and timeout) and the backend ids its slots name.
/// Built once per snapshot.
#[derive(Clone, Debug, Default)]
pub struct ServiceIndex {
    /// A master entry of each affinity id.
    pub masters: BTreeMap<u32, ServiceValue>,
    /// The backend ids any slot of any frontend names in a scope with that affinity id.
    pub backends: BTreeMap<u32, BTreeSet<BackendId>>,
}

impl ServiceIndex {
    /// Indexes `snapshot`.
    pub fn new(snapshot: &Snapshot) -> Self {
        let mut index = Self::default();
        let mut ids = BTreeMap::new();
        for (key, master) in snapshot.services.iter().filter(|(k, _)| k.slot == 0) {
            let id = affinity_service_id(master.service_id, master.flags, key.scope);
            index.masters.entry(id).or_insert(*master);
            ids.insert(*key, id);
        }
        for (key, value) in snapshot.services.iter().filter(|(k, _)| k.slot != 0) {
            if let Some(id) = ids.get(&key.with_slot(0)) {
                index.backends.entry(*id).or_default().insert(value.backend_id);
            }
        }
        index
    }
}

/// What the kernel does with an affinity entry at the snapshot's time, as `lb.rs` decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AffinityState {
    /// Used within the timeout and the backend exists: the client goes there again.
    Fresh,
    /// Older than the timeout: the next connection picks anew (and overwrites it).
    Expired,
    /// The backend id is gone from `backends`: the next connection picks anew.
    BackendGone,
    /// The service port no longer has session affinity: the entry is ignored.
    AffinityOff,
    /// No frontend has this service id any more: the entry is never read again.
    ServiceGone,
}

impl AffinityState {
    /// The state in a few words for the table.
    pub fn words(self) -> &'static str {
        match self {
            AffinityState::Fresh => "fresh: sticks",
            AffinityState::Expired => "expired: next pick is random",
            AffinityState::BackendGone => "backend gone: next pick is random",
            AffinityState::AffinityOff => "ignored: affinity is off",
            AffinityState::ServiceGone => "ignored: service gone",
        }
    }
}

/// One affinity entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AffinityView {
    /// The client in words: `netns NAME (cookie N)` or an address.
    pub client: String,
    /// `socket` (keyed by netns cookie: cgroup connect/sendmsg) or `packet` (keyed by address: TC).
    pub path: &'static str,
    /// Socket path: the client's network namespace cookie.
    pub netns_cookie: Option<u64>,
    /// Socket path: the namespace's name, when found (`/run/netns/NAME`, or `self`).
    pub netns: Option<String>,
    /// Packet path: the client's address.
    pub client_address: Option<IpAddr>,
    /// The service port's id.
    pub service_id: u32,
    /// `namespace/name[:port]`.
    pub service: Option<String>,
    /// The remembered backend's id.
    pub backend_id: BackendId,
    /// `address:port/PROTO`; `None` when the id is gone.
    pub backend: Option<String>,
    /// The backend's address.
    pub backend_address: Option<IpAddr>,
    /// The backend's port.
    pub backend_port: Option<u16>,
    /// `bpf_ktime_get_ns()` at the last use.
    pub last_used_ns: u64,
    /// Seconds since the last use (CLOCK_MONOTONIC).
    pub age_seconds: f64,
    /// The service port's timeout; `None` when affinity is off or the service is gone.
    pub timeout_seconds: Option<u32>,
    /// What the kernel does with it now.
    pub state: AffinityState,
    /// Fresh, yet the backend is no longer among the service's slots: the kernel still sends
    /// the client there (it checks only that the backend id exists).
    pub backend_left_service: bool,
}

/// The state of one affinity entry, checked in the kernel's order (`select`, `remembered`).
pub fn affinity_state(
    snapshot: &Snapshot,
    index: &ServiceIndex,
    key: &AffinityKey,
    value: &AffinityValue,
) -> AffinityState {
    let Some(master) = index.masters.get(&key.service_id) else { return AffinityState::ServiceGone };
    if master.flags & SVC_F_AFFINITY == 0 {
        return AffinityState::AffinityOff;
    }
    if snapshot.now_ns.saturating_sub(value.last_used_ns) > u64::from(master.affinity_timeout) * 1_000_000_000 {
        return AffinityState::Expired;
    }
    if !snapshot.backends.contains_key(&value.backend_id) {
        return AffinityState::BackendGone;
    }
    AffinityState::Fresh
}

/// The name of the namespace with `cookie`, when [`super::pins::netns`] found it.
pub fn netns_name(snapshot: &Snapshot, cookie: u64) -> Option<&str> {
    snapshot.netns.iter().find(|n| n.cookie == cookie).map(|n| n.name.as_str())
}

/// The client of an affinity key in words.
pub fn client_text(snapshot: &Snapshot, key: &AffinityKey) -> String {
    if key.netns_cookie == 0 {
        return addr::to_ip(&key.client).to_string();
    }
    match netns_name(snapshot, key.netns_cookie) {
        Some(name) => format!("netns {name} (cookie {})", key.netns_cookie),
        None => format!("netns cookie {}", key.netns_cookie),
    }
}

/// One affinity entry as a row.
pub fn affinity_view(
    snapshot: &Snapshot,
    index: &ServiceIndex,
    key: &AffinityKey,
    value: &AffinityValue,
) -> AffinityView {
    let socket = key.netns_cookie != 0;
    let backend = snapshot.backends.get(&value.backend_id);
    let state = affinity_state(snapshot, index, key, value);
    let timeout =
        index.masters.get(&key.service_id).filter(|m| m.flags & SVC_F_AFFINITY != 0).map(|m| m.affinity_timeout);
    let age_ns = snapshot.now_ns.saturating_sub(value.last_used_ns);
    AffinityView {
        client: client_text(snapshot, key),
        path: if socket { "socket" } else { "packet" },
        netns_cookie: socket.then_some(key.netns_cookie),
        netns: if socket { netns_name(snapshot, key.netns_cookie).map(str::to_owned) } else { None },
        client_address: (!socket).then(|| addr::to_ip(&key.client)),
        service_id: key.service_id,
        service: service_ref(snapshot, key.service_id).map(|s| s.display()),
        backend_id: value.backend_id,
        backend: backend.map(backend_text),
        backend_address: backend.map(|b| addr::to_ip(&b.address)),
        backend_port: backend.map(|b| b.port),
        last_used_ns: value.last_used_ns,
        // Millisecond precision is plenty for a timeout counted in seconds.
        age_seconds: (age_ns / 1_000_000) as f64 / 1000.0,
        timeout_seconds: timeout,
        state,
        backend_left_service: state == AffinityState::Fresh
            && !index.backends.get(&key.service_id).is_some_and(|ids| ids.contains(&value.backend_id)),
    }
}

/// Every affinity entry, by service then client.
pub fn affinity(snapshot: &Snapshot) -> Vec<AffinityView> {
    let index = ServiceIndex::new(snapshot);
    let mut out: Vec<AffinityView> =
        snapshot.affinity.iter().flatten().map(|(k, v)| affinity_view(snapshot, &index, k, v)).collect();
    out.sort_by(|a, b| {
        (&a.service, a.service_id, a.path, &a.client).cmp(&(&b.service, b.service_id, b.path, &b.client))
    });
    out
}

/// One `conntrack` entry: a direction of a flow of the packet path.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConntrackView {
    /// `original` (client → frontend, as it arrives) or `reply` (backend → client or node).
    pub direction: &'static str,
    /// `TCP` or `UDP`.
    pub proto: &'static str,
    /// The packet as it arrives: source.
    pub from: SocketAddr,
    /// The packet as it arrives: destination.
    pub to: SocketAddr,
    /// What the packet is rewritten to: source.
    pub new_from: SocketAddr,
    /// What the packet is rewritten to: destination.
    pub new_to: SocketAddr,
    /// The flow's backend id.
    pub backend_id: BackendId,
    /// The source was SNATed to a node address (externalTrafficPolicy: Cluster).
    pub snat: bool,
    /// The backend is the node itself (hostNetwork): no SNAT, replies translated on egress.
    pub local: bool,
    /// Direct server return to a backend on another node: not SNATed, the replies go
    /// straight from there to the client (this node sees none).
    pub dsr: bool,
    /// A FIN went one way only: the flow is half-closed (CLOSE_WAIT), the other way still open.
    pub close_wait: bool,
    /// FINs went both ways, or a RST: the flow is closing.
    pub closing: bool,
    /// The idle timeout the entry's state gives it.
    pub timeout_seconds: u64,
    /// Seconds since the flow's last packet (refreshed at most once a second).
    pub idle_seconds: f64,
    /// Whether the kernel would treat the entry as expired now.
    pub expired: bool,
}

/// Every conntrack entry, original directions first, then by client.
pub fn conntrack(snapshot: &Snapshot) -> Vec<ConntrackView> {
    let addr = |a: Addr, p: u16| SocketAddr::new(addr::to_ip(&a), p);
    let mut rows: Vec<ConntrackView> = snapshot
        .conntrack
        .iter()
        .flatten()
        .map(|(k, v)| ConntrackView {
            direction: if v.flags & CT_F_REPLY != 0 { "reply" } else { "original" },
            proto: proto_name(k.proto),
            from: addr(k.src, k.sport),
            to: addr(k.dst, k.dport),
            new_from: addr(v.src, v.sport),
            new_to: addr(v.dst, v.dport),
            backend_id: v.backend_id,
            snat: v.flags & CT_F_SNAT != 0,
            local: v.flags & CT_F_LOCAL != 0,
            dsr: v.flags & CT_F_DSR != 0,
            close_wait: v.flags & CT_F_CLOSING == 0 && v.flags & (CT_F_FIN | CT_F_PEER_FIN) != 0,
            closing: v.flags & CT_F_CLOSING != 0,
            timeout_seconds: timeout_s(v.flags, k.proto),
            idle_seconds: snapshot.now_ns.saturating_sub(v.last_seen_ns) as f64 / 1e9,
            expired: expired(v.flags, k.proto, v.last_seen_ns, snapshot.now_ns),
        })
        .collect();
    rows.sort_by_key(|r| (r.direction != "original", r.from, r.to));
    rows
}
