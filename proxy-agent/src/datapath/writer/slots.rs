//! Slots: a frontend's backend sets → `backends` entries, the slot entries that name them, and
//! the slot order that keeps survivors in place.

use std::collections::HashSet;

use proxy_common::{
    addr,
    backend::{BACKEND_F_DSR, BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend, BackendId},
    service::{ServiceKey, ServiceValue},
};

use super::{MapStore, WriteStats, Writer, ids::Acquired};
use crate::model::Endpoint;

impl<S: MapStore> Writer<S> {
    /// Takes a reference on the backend of every endpoint (writing entries for new ones, not
    /// for those an earlier agent left in the map under the same id) and
    /// returns the slot order: survivors keep their slots, a survivor beyond the new count moves
    /// into a hole, new backends fill the remaining holes. `release` later drops the old
    /// layout's references. With `staged`, new backends are collected there for a batch
    /// instead of written.
    pub(super) fn layout(
        &mut self,
        old: &[BackendId],
        wanted: &[Endpoint],
        proto: u8,
        taken: &mut Vec<BackendId>,
        stats: &mut WriteStats,
        mut staged: Option<&mut Vec<BackendId>>,
    ) -> Result<Vec<BackendId>, S::Error> {
        let mut ids = Vec::with_capacity(wanted.len());
        let mut seen = Seen::new(wanted.len());
        for endpoint in wanted {
            let backend = backend_of(endpoint, proto);
            if !seen.insert(backend) {
                continue;
            }
            let (id, acquired) = self.backend_by_id.acquire(&backend);
            taken.push(id);
            if acquired == Acquired::Fresh {
                match staged.as_deref_mut() {
                    Some(staged) => staged.push(id),
                    None => self.store.put_backend(id, backend)?,
                }
                stats.backend_writes += 1;
            }
            ids.push(id);
        }
        Ok(slot_order(old, &ids))
    }

    /// Writes the slots of `new` that differ from `old` (slot i is `key` at slot i + 1).
    pub(super) fn write_slots(
        &mut self,
        key: ServiceKey,
        old: &[BackendId],
        new: &[BackendId],
        stats: &mut WriteStats,
    ) -> Result<(), S::Error> {
        for (i, &id) in new.iter().enumerate() {
            if old.get(i) != Some(&id) {
                let value = ServiceValue { backend_id: id, ..ServiceValue::default() };
                self.store.put_service(key.with_slot(i as u16 + 1), value)?;
                stats.service_writes += 1;
            }
        }
        Ok(())
    }

    /// Deletes slots `keep + 1..=had`.
    pub(super) fn trim_slots(
        &mut self,
        key: ServiceKey,
        had: usize,
        keep: usize,
        stats: &mut WriteStats,
    ) -> Result<(), S::Error> {
        for slot in keep + 1..=had {
            self.store.delete_service(key.with_slot(slot as u16))?;
            stats.service_writes += 1;
        }
        Ok(())
    }
}

/// The backends a layout has taken so far: a short list searched in place (a service has
/// ten endpoints or so, and a set for each of a million would cost more than the search),
/// a set for long ones.
enum Seen {
    Few(Vec<Backend>),
    Many(HashSet<Backend>),
}

impl Seen {
    /// Up to this many, a search of the list.
    const FEW: usize = 32;

    fn new(len: usize) -> Self {
        if len <= Self::FEW { Seen::Few(Vec::with_capacity(len)) } else { Seen::Many(HashSet::with_capacity(len)) }
    }

    /// Adds `backend`; false when it was there.
    fn insert(&mut self, backend: Backend) -> bool {
        match self {
            Seen::Few(list) if list.contains(&backend) => false,
            Seen::Few(list) => {
                list.push(backend);
                true
            }
            Seen::Many(set) => set.insert(backend),
        }
    }
}

/// The `backends` map value of an endpoint.
fn backend_of(endpoint: &Endpoint, proto: u8) -> Backend {
    let mut flags = 0;
    if endpoint.local {
        flags |= BACKEND_F_LOCAL;
    }
    if endpoint.terminating {
        flags |= BACKEND_F_TERMINATING;
    }
    if endpoint.dsr {
        flags |= BACKEND_F_DSR;
    }
    Backend { address: addr::from_ip(endpoint.address), port: endpoint.port, proto, flags }
}

/// New slot order for the backend ids `wanted` (distinct) given the `old` order: survivors keep
/// their index when it is still in range, survivors beyond the new length and then new ids fill
/// the holes in order. One removal therefore moves at most one backend.
pub fn slot_order(old: &[BackendId], wanted: &[BackendId]) -> Vec<BackendId> {
    if old.is_empty() {
        // A new frontend (every one in a full sync): the order wanted.
        return wanted.to_vec();
    }
    let n = wanted.len();
    let wanted_set: HashSet<BackendId> = wanted.iter().copied().collect();
    let old_set: HashSet<BackendId> = old.iter().copied().collect();
    let mut slots: Vec<Option<BackendId>> = vec![None; n];
    let mut movers = Vec::new();
    for (i, id) in old.iter().enumerate() {
        if wanted_set.contains(id) {
            if i < n {
                slots[i] = Some(*id);
            } else {
                movers.push(*id);
            }
        }
    }
    let mut fill = movers.into_iter().chain(wanted.iter().filter(|id| !old_set.contains(id)).copied());
    slots.into_iter().filter_map(|slot| slot.or_else(|| fill.next())).collect()
}
