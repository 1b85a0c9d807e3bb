//! Frontend lookup and backend selection, shared by every attach point so the socket path and
//! the TC path cannot disagree on which backend wins.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns};
use proxy_common::{
    addr::Addr,
    affinity::{AffinityKey, AffinityValue},
    backend::{Backend, BackendId},
    conntrack::CtKey,
    maglev::Tuple,
    service::{SCOPE_INTERNAL, SVC_F_AFFINITY, SVC_F_MAGLEV, SVC_F_TWO_SCOPES, ServiceKey, ServiceValue},
    trace::{PICK_AFFINITY, PICK_MAGLEV, PICK_RANDOM},
};

use crate::{
    maglev,
    maps::{AFFINITY, BACKENDS, SERVICES},
};

/// Where a frontend lookup leads.
pub enum Verdict {
    /// Not a service frontend: leave the traffic alone.
    NotAService,
    /// A frontend with no usable endpoint (its master's flags): refuse, as kube-proxy's REJECT
    /// does, or drop for external traffic under `externalTrafficPolicy: Local`.
    NoBackend(u16),
    /// Send the traffic to this endpoint.
    Backend(Selected),
}

/// A chosen backend.
#[derive(Default)]
pub struct Selected {
    /// The endpoint.
    pub backend: Backend,
    /// Its id.
    pub id: BackendId,
    /// The frontend master's `SVC_F_*` flags.
    pub flags: u16,
    /// The service port's id.
    pub service_id: u32,
    /// How it was chosen (`proxy_common::trace::PICK_*`), for `trace`.
    pub pick: u8,
    /// The backend set it came from (`SCOPE_*`): the internal one under a Local policy that
    /// applies only to external traffic, or the other way round.
    pub scope: u8,
    /// The slot picked at random, or the Maglev table's slot; 0 for an affinity hit.
    pub slot: u16,
}

/// Which backend set applies to the traffic.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Started on this node (socket path).
    Node,
    /// Entered the node from outside (TC path).
    External,
}

/// Whether the frontend's cluster-wide backend set (its internal scope, present whenever a
/// Local policy gives it two) has any backend.
#[inline(always)]
pub fn cluster_has_backends(address: Addr, port: u16, proto: u8) -> bool {
    let key = ServiceKey::master(address, port, proto).with_scope(SCOPE_INTERNAL);
    master(&key).is_some_and(|m| m.count > 0)
}

/// Whether (address, port, proto) is a frontend that still has backends for `origin`'s traffic
/// (the set [`select`] would pick from).
#[inline(always)]
pub fn serving(address: Addr, port: u16, proto: u8, origin: Origin) -> bool {
    let key = ServiceKey::master(address, port, proto);
    master(&key).and_then(|m| in_scope(key, m, origin)).is_some_and(|(_, m)| m.count > 0)
}

/// The backend set `origin`'s traffic uses at a frontend whose external-scope master is
/// (`key`, `master`): traffic from the node uses the internal scope when the frontend has two.
/// `None`: that set's master is missing (no backend for this traffic).
#[inline(always)]
fn in_scope(key: ServiceKey, master: ServiceValue, origin: Origin) -> Option<(ServiceKey, ServiceValue)> {
    if origin == Origin::Node && master.flags & SVC_F_TWO_SCOPES != 0 {
        let key = key.with_scope(SCOPE_INTERNAL);
        return self::master(&key).map(|internal| (key, internal));
    }
    Some((key, master))
}

/// Looks up the frontend (address, port, proto) and picks a backend uniformly at random, or the
/// client's remembered backend under ClientIP affinity. `client` identifies the client for
/// affinity; its `service_id` is filled in here.
#[inline(always)]
pub fn select(address: Addr, port: u16, proto: u8, client: AffinityKey, origin: Origin) -> Verdict {
    select_flow::<CtKey>(address, port, proto, client, origin, None)
}

/// [`select`] for a packet of a new flow (its 5-tuple): at a frontend with `SVC_F_MAGLEV`,
/// traffic from outside takes the backend set's Maglev table entry for the flow's hash (of the
/// client address under ClientIP affinity), so every node picks the same backend for it.
/// Without a table (not written yet) the pick is random.
#[inline(always)]
pub fn select_flow<F: Tuple>(
    address: Addr,
    port: u16,
    proto: u8,
    client: AffinityKey,
    origin: Origin,
    flow: Option<&F>,
) -> Verdict {
    let key = ServiceKey::master(address, port, proto);
    let Some(external) = master(&key) else {
        return Verdict::NotAService;
    };
    let Some((key, master)) = in_scope(key, external, origin) else {
        return Verdict::NoBackend(external.flags);
    };
    if master.count == 0 {
        return Verdict::NoBackend(master.flags);
    }
    let affinity = master.flags & SVC_F_AFFINITY != 0;
    let affinity_key = AffinityKey { service_id: master.service_id, ..client };
    // SAFETY: a plain helper call without arguments.
    let now = if affinity { unsafe { bpf_ktime_get_coarse_ns() } } else { 0 };
    let selected = |backend, id, pick, slot| Selected {
        backend,
        id,
        flags: master.flags,
        service_id: master.service_id,
        pick,
        scope: key.scope,
        slot,
    };
    if affinity && let Some((id, backend)) = remembered(&affinity_key, master.affinity_timeout, now) {
        return Verdict::Backend(selected(backend, id, PICK_AFFINITY, 0));
    }
    let hashed = match flow {
        Some(flow) if origin == Origin::External && master.flags & SVC_F_MAGLEV != 0 => {
            // The master's id is its backend set's (affinity_service_id): the table's key.
            maglev::pick(master.service_id, flow, affinity).and_then(|(slot, id)| Some((slot, id, backend(id)?)))
        }
        _ => None,
    };
    let (pick_kind, (slot, id, backend)) = match hashed {
        Some(picked) => (PICK_MAGLEV, picked),
        None => match pick(key, master.count) {
            Some(picked) => (PICK_RANDOM, picked),
            None => return Verdict::NoBackend(master.flags),
        },
    };
    if affinity {
        let value = AffinityValue { last_used_ns: now, backend_id: id, _pad: 0 };
        // Losing the affinity record only costs stickiness for the next connection.
        let _ = AFFINITY.insert(affinity_key, value, 0);
    }
    Verdict::Backend(selected(backend, id, pick_kind, slot))
}

#[inline(always)]
fn master(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: the value is copied out at once; the agent only replaces whole entries.
    unsafe { SERVICES.get(key).copied() }
}

/// Whether the backend with this id still exists (nothing copied out).
#[inline(always)]
pub fn backend_exists(id: BackendId) -> bool {
    // SAFETY: only whether there is an entry is read.
    unsafe { BACKENDS.get(id) }.is_some()
}

/// The backend with this id, if it still exists.
#[inline(always)]
pub fn backend(id: BackendId) -> Option<Backend> {
    // SAFETY: copied out at once, as above.
    unsafe { BACKENDS.get(id).copied() }
}

/// Picks slot `random % count + 1`. The agent lowers `count` before it removes slots, but a
/// lookup can race with that; one retry against the new count covers it.
#[inline(always)]
fn pick(key: ServiceKey, count: u16) -> Option<(u16, BackendId, Backend)> {
    // SAFETY: a plain helper call without arguments (and below).
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(count)) as u16 + 1;
    if let Some((id, backend)) = slot_backend(key.with_slot(slot)) {
        return Some((slot, id, backend));
    }
    let count = master(&key)?.count;
    if count == 0 {
        return None;
    }
    // SAFETY: as above.
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(count)) as u16 + 1;
    slot_backend(key.with_slot(slot)).map(|(id, backend)| (slot, id, backend))
}

#[inline(always)]
fn slot_backend(key: ServiceKey) -> Option<(BackendId, Backend)> {
    let id = master(&key)?.backend_id;
    Some((id, backend(id)?))
}

/// The client's backend from the affinity map, if it was used within `timeout` seconds and
/// still exists; refreshes its last use.
#[inline(always)]
fn remembered(key: &AffinityKey, timeout: u32, now: u64) -> Option<(BackendId, Backend)> {
    let entry = AFFINITY.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; fields are plain integers.
    let (last_used, id) = unsafe { ((*entry).last_used_ns, (*entry).backend_id) };
    if now.saturating_sub(last_used) > u64::from(timeout) * 1_000_000_000 {
        return None;
    }
    let backend = backend(id)?;
    // SAFETY: the same pointer, still valid: the entry lives in the map.
    unsafe { (*entry).last_used_ns = now };
    Some((id, backend))
}
