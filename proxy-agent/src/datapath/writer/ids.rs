//! Ids: backend and service-port ids, reference-counted, kept across agent restarts (restored
//! from the maps an earlier agent left) and not reused soon after release.
//!
//! Backends are a million at 100 000 services × 10 endpoints, so their ids live in one flat
//! table ([`BackendIds`]): each backend once, in a slab of fixed-size records, found by id and
//! by value through two hash tables of slab indexes (4 bytes a bucket). Keyed hash maps of
//! owned values, one per direction, took ~140 MiB there; this takes ~50 MiB.

use std::{hash::BuildHasher as _, sync::Arc};

use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable};
use proxy_common::{
    backend::{Backend, BackendId},
    service::ServiceName,
};

use super::{MapStore, Programmed, WriteStats, Writer};
use crate::model::ServicePortName;

/// Where [`Ids::acquire`]'s id came from, which says whether its map entry must be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Acquired {
    /// Another reference already holds it: its entry is written.
    Held,
    /// An earlier agent gave the key this id: its entry is in the map with this very key
    /// (that is how it was restored), so nothing is written, and nothing is deleted if the
    /// write that took it is undone.
    Adopted,
    /// A new id: its entry must be written.
    Fresh,
}

/// Ids handed out for keys, with reference counts. Ids are not reused soon after release: an
/// affinity entry or an in-flight lookup that still holds a released id must not find another
/// service's backend under it, so ids count up and wrap only after 2^32 allocations.
#[derive(Debug)]
pub(super) struct Ids<K> {
    /// Each key's id and reference count. The key is shared with what holds it (a service
    /// port's name, once for all its frontends).
    pub(super) ids: HashMap<Arc<K>, (u32, usize)>,
    /// Ids held by a key or reserved for one.
    pub(super) in_use: HashSet<u32>,
    /// Where the search for a free id starts.
    pub(super) next: u32,
    /// Ids an earlier agent gave keys: a key gets its old id back (until the sweep).
    pub(super) reserved: HashMap<K, u32>,
}

impl<K: std::hash::Hash + Eq + Clone> Ids<K> {
    /// Every held id and its key, sorted by id (to be found by binary search).
    pub(super) fn sorted_by_id(&self) -> Vec<(u32, &K)> {
        let mut held: Vec<(u32, &K)> = self.ids.iter().map(|(key, (id, _))| (*id, &**key)).collect();
        held.sort_unstable_by_key(|(id, _)| *id);
        held
    }

    pub(super) fn new() -> Self {
        Self { ids: HashMap::default(), in_use: HashSet::default(), next: 1, reserved: HashMap::default() }
    }

    /// The id of `key`, taking a reference, where it came from, and the key as shared.
    pub(super) fn acquire(&mut self, key: &K) -> (u32, Acquired, Arc<K>) {
        if let Some((shared, (id, refs))) = self.ids.get_key_value_mut(key) {
            *refs += 1;
            return (*id, Acquired::Held, Arc::clone(shared));
        }
        let (id, acquired) = match self.reserved.remove(key) {
            Some(id) => (id, Acquired::Adopted),
            None => {
                // 0 is never an id; skip ids in use (or reserved) after a wrap.
                while self.next == 0 || self.in_use.contains(&self.next) {
                    self.next = self.next.wrapping_add(1);
                }
                self.next = self.next.wrapping_add(1);
                (self.next.wrapping_sub(1), Acquired::Fresh)
            }
        };
        self.in_use.insert(id);
        let shared = Arc::new(key.clone());
        self.ids.insert(Arc::clone(&shared), (id, 1));
        (id, acquired, shared)
    }

    /// Drops a reference; returns the id when it was the last one.
    pub(super) fn release(&mut self, key: &K) -> Option<u32> {
        let (id, refs) = self.ids.get_mut(key)?;
        *refs -= 1;
        if *refs > 0 {
            return None;
        }
        let id = *id;
        self.ids.remove(key);
        self.in_use.remove(&id);
        Some(id)
    }
}

/// One backend of [`BackendIds`]: its id, its value and the slots naming it.
#[derive(Clone, Copy, Debug)]
struct Held {
    /// 0 marks a free record (0 is never an id).
    id: BackendId,
    /// Slots naming it; 0: reserved for an earlier agent's entry nobody claimed yet.
    refs: u32,
    backend: Backend,
}

/// Backend ids, one per distinct `backends` value, counted per slot naming it: [`Ids`] for
/// backends, in a flat table. A backend an earlier agent left is reserved (its record counts
/// no slot) until a slot claims it or the sweep drops it. Ids count up, as [`Ids`]' do.
#[derive(Debug)]
pub(super) struct BackendIds {
    /// The records; free ones (id 0) are listed in `free`.
    slab: Vec<Held>,
    free: Vec<u32>,
    /// Slab indexes by the record's id.
    by_id: HashTable<u32>,
    /// Slab indexes by the record's backend.
    by_value: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// Records counting a slot.
    held: usize,
    /// Where the search for a free id starts.
    next: BackendId,
}

impl BackendIds {
    pub(super) fn new() -> Self {
        Self {
            slab: Vec::new(),
            free: Vec::new(),
            by_id: HashTable::new(),
            by_value: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            held: 0,
            next: 1,
        }
    }

    fn index_of_id(&self, id: BackendId) -> Option<u32> {
        let slab = &self.slab;
        self.by_id.find(self.hasher.hash_one(id), |&i| slab[i as usize].id == id).copied()
    }

    fn index_of_value(&self, backend: &Backend) -> Option<u32> {
        let slab = &self.slab;
        self.by_value.find(self.hasher.hash_one(backend), |&i| slab[i as usize].backend == *backend).copied()
    }

    /// Adds a record, found by id and (with `by_value`) by value; neither may be in the
    /// table yet.
    fn insert(&mut self, held: Held, by_value: bool) {
        let index = match self.free.pop() {
            Some(index) => {
                self.slab[index as usize] = held;
                index
            }
            None => {
                self.slab.push(held);
                (self.slab.len() - 1) as u32
            }
        };
        let (slab, hasher) = (&self.slab, &self.hasher);
        self.by_id.insert_unique(hasher.hash_one(held.id), index, |&i| hasher.hash_one(slab[i as usize].id));
        if by_value {
            self.by_value
                .insert_unique(hasher.hash_one(held.backend), index, |&i| hasher.hash_one(slab[i as usize].backend));
        }
    }

    /// Removes record `index`.
    fn remove(&mut self, index: u32) {
        let Held { id, backend, .. } = self.slab[index as usize];
        let hasher = &self.hasher;
        if let Ok(entry) = self.by_id.find_entry(hasher.hash_one(id), |&i| i == index) {
            entry.remove();
        }
        if let Ok(entry) = self.by_value.find_entry(hasher.hash_one(backend), |&i| i == index) {
            entry.remove();
        }
        self.slab[index as usize].id = 0;
        self.free.push(index);
    }

    /// Reserves `id` for `backend`, as an earlier agent left them (a second entry with the
    /// same value keeps its id reserved too, and goes with the sweep).
    pub(super) fn reserve(&mut self, id: BackendId, backend: Backend) {
        if id == 0 || self.index_of_id(id).is_some() {
            return;
        }
        // A second record of one value is found by id only.
        let by_value = self.index_of_value(&backend).is_none();
        self.insert(Held { id, refs: 0, backend }, by_value);
        self.next = self.next.max(id.wrapping_add(1)).max(1);
    }

    /// The id of `backend`, taking a reference, and where it came from.
    pub(super) fn acquire(&mut self, backend: &Backend) -> (BackendId, Acquired) {
        if let Some(index) = self.index_of_value(backend) {
            let held = &mut self.slab[index as usize];
            held.refs += 1;
            if held.refs > 1 {
                return (held.id, Acquired::Held);
            }
            self.held += 1;
            return (held.id, Acquired::Adopted);
        }
        // 0 is never an id; skip ids in use (or reserved) after a wrap.
        while self.next == 0 || self.index_of_id(self.next).is_some() {
            self.next = self.next.wrapping_add(1);
        }
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        self.insert(Held { id, refs: 1, backend: *backend }, true);
        self.held += 1;
        (id, Acquired::Fresh)
    }

    /// Drops a reference to backend `id`; returns true when it was the last one (the id is
    /// free then).
    pub(super) fn release(&mut self, id: BackendId) -> bool {
        let Some(index) = self.index_of_id(id) else { return false };
        let held = &mut self.slab[index as usize];
        if held.refs == 0 {
            return false;
        }
        held.refs -= 1;
        if held.refs > 0 {
            return false;
        }
        self.held -= 1;
        self.remove(index);
        true
    }

    /// The backend behind `id`, when a slot names it.
    pub(super) fn get(&self, id: &BackendId) -> Option<&Backend> {
        let held = &self.slab[self.index_of_id(*id)? as usize];
        (held.refs > 0).then_some(&held.backend)
    }

    /// Whether a slot names backend `id`.
    pub(super) fn contains_key(&self, id: &BackendId) -> bool {
        self.get(id).is_some()
    }

    /// Backends a slot names.
    pub(super) fn len(&self) -> usize {
        self.held
    }

    /// Whether ids an earlier agent left are still reserved.
    pub(super) fn has_reserved(&self) -> bool {
        self.slab.len() - self.free.len() > self.held
    }

    /// Frees the ids reserved for an earlier agent's entries that no slot claimed (the
    /// sweep), and gives the memory of a first sync's growth back.
    pub(super) fn drop_reserved(&mut self) {
        for index in 0..self.slab.len() as u32 {
            let held = self.slab[index as usize];
            if held.id != 0 && held.refs == 0 {
                self.remove(index);
            }
        }
        self.shrink();
    }

    /// Gives spare capacity back: the slab is sized for the backends held, not for the most
    /// ever held (free records at its end are cut).
    pub(super) fn shrink(&mut self) {
        while self.slab.last().is_some_and(|held| held.id == 0) {
            self.slab.pop();
        }
        let len = self.slab.len() as u32;
        self.free.retain(|&index| index < len);
        self.slab.shrink_to_fit();
        self.free.shrink_to_fit();
        let (slab, hasher) = (&self.slab, &self.hasher);
        self.by_id.shrink_to_fit(|&i| hasher.hash_one(slab[i as usize].id));
        self.by_value.shrink_to_fit(|&i| hasher.hash_one(slab[i as usize].backend));
    }

    /// Every backend a slot names, with its id.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&BackendId, &Backend)> {
        self.slab.iter().filter(|held| held.id != 0 && held.refs > 0).map(|held| (&held.id, &held.backend))
    }
}

impl<'a> IntoIterator for &'a BackendIds {
    type Item = (&'a BackendId, &'a Backend);
    type IntoIter = Box<dyn Iterator<Item = Self::Item> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

/// The ids an earlier agent left in the maps, reserved for the keys they named: backends by
/// their `backends` entry, service ports by their `service_names` entry. New ids start above
/// every id present, so nothing an old slot or affinity entry points to is handed to another
/// key; [`Writer::sweep`] frees what the first full sync did not claim.
pub(super) fn restored<S: MapStore>(store: &S) -> (BackendIds, Ids<ServicePortName>) {
    // Backends keep their ids too: affinity entries and conntrack name backends by id.
    let mut backends = BackendIds::new();
    for (id, backend) in store.backend_entries() {
        backends.reserve(id, backend);
    }
    // Service ids are kept across agents (their affinity entries stay valid), the rest start
    // above them.
    let mut services = Ids::new();
    for (id, name) in store.service_names() {
        services.in_use.insert(id);
        services.reserved.insert(service_port_name(&name), id);
    }
    services.next = services.in_use.iter().max().copied().unwrap_or(0).wrapping_add(1);
    (backends, services)
}

impl<S: MapStore> Writer<S> {
    /// Drops the references `old` held, deleting backends nobody uses any more.
    pub(super) fn release(&mut self, old: &Programmed, stats: &mut WriteStats) -> Result<(), S::Error> {
        let mut result = Ok(());
        for id in old.external.iter().chain(old.internal.iter().flatten()) {
            if let Some(deleted) = self.release_backend(*id) {
                stats.backend_writes += 1;
                result = result.and(deleted);
            }
        }
        if let Some(id) = self.services.release(&old.service) {
            result = result.and(self.store.delete_service_name(id));
        }
        result
    }

    /// Drops one reference to backend `id`; deletes its entry (and returns how that went) when
    /// it was the last.
    pub(super) fn release_backend(&mut self, id: BackendId) -> Option<Result<(), S::Error>> {
        self.backend_by_id.release(id).then(|| self.store.delete_backend(id))
    }
}

/// The `service_names` value of a service port (names longer than a field are cut, which
/// Kubernetes' own limits never need).
pub(super) fn service_name(service: &ServicePortName) -> ServiceName {
    fn copy<const N: usize>(text: &str) -> [u8; N] {
        let mut out = [0; N];
        let len = text.len().min(N);
        out[..len].copy_from_slice(&text.as_bytes()[..len]);
        out
    }
    ServiceName {
        namespace: copy(&service.namespace),
        name: copy(&service.name),
        port: copy(&service.port),
        proto: service.proto,
        _pad: [0; 7],
    }
}

/// The service port a `service_names` value names.
fn service_port_name(name: &ServiceName) -> ServicePortName {
    fn text(bytes: &[u8]) -> String {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }
    ServicePortName {
        namespace: text(&name.namespace),
        name: text(&name.name),
        port: text(&name.port),
        proto: name.proto,
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{addr, proto::TCP};

    use super::*;

    fn backend(n: u8) -> Backend {
        Backend { address: addr::from_ip(std::net::Ipv4Addr::new(10, 244, 1, n)), port: 80, proto: TCP, flags: 0 }
    }

    #[test]
    fn backend_ids_count_up_and_a_released_id_is_not_handed_out_again() {
        let mut ids = BackendIds::new();
        assert_eq!(ids.acquire(&backend(1)), (1, Acquired::Fresh));
        assert_eq!(ids.acquire(&backend(2)), (2, Acquired::Fresh));
        assert_eq!(ids.acquire(&backend(1)), (1, Acquired::Held), "a second slot shares the id");
        assert!(!ids.release(1), "one slot still names backend 1");
        assert_eq!(ids.get(&1), Some(&backend(1)));
        assert!(ids.release(1), "the last slot let go");
        assert_eq!((ids.get(&1), ids.len()), (None, 1));
        assert!(!ids.release(1), "a released id holds nothing");
        assert_eq!(ids.acquire(&backend(1)), (3, Acquired::Fresh), "a new id, not the released one");
        let held: Vec<(BackendId, Backend)> = ids.iter().map(|(id, b)| (*id, *b)).collect();
        assert_eq!(held, [(3, backend(1)), (2, backend(2))], "record 0 was reused for id 3");
    }

    #[test]
    fn reserved_backend_ids_are_adopted_by_value_and_the_rest_dropped() {
        let mut ids = BackendIds::new();
        // An earlier agent's map: backend 1 twice (ids 7 and 9), backend 2 under 40.
        for (id, n) in [(7, 1), (9, 1), (40, 2)] {
            ids.reserve(id, backend(n));
        }
        assert!(ids.has_reserved());
        assert_eq!((ids.len(), ids.get(&7)), (0, None), "reserved ids name no slot yet");
        assert_eq!(ids.acquire(&backend(1)), (7, Acquired::Adopted));
        assert_eq!(ids.acquire(&backend(1)), (7, Acquired::Held));
        assert_eq!(ids.acquire(&backend(3)), (41, Acquired::Fresh), "new ids start above every id present");
        ids.drop_reserved();
        assert!(!ids.has_reserved());
        assert_eq!(ids.len(), 2);
        assert_eq!((ids.get(&9), ids.get(&40)), (None, None), "unclaimed ids are free");
        assert_eq!(ids.acquire(&backend(2)), (42, Acquired::Fresh), "backend 2 lost its reservation");
        assert_eq!((ids.get(&7), ids.get(&41)), (Some(&backend(1)), Some(&backend(3))), "found after the shrink");
    }
}
