//! An in-memory [`MapStore`] for unit tests: it records every `services` and `backends`
//! operation in order (so a test can replay them one at a time, as a racing lookup would see
//! them) and keeps every map the writer touches, plus the kernel-written `affinity` and
//! `sock_backend` maps that tests fill as the kernel would. `inspect`'s packet-flow tables read
//! it through [`crate::inspect::explain::snapshot_of`].

use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet, HashMap},
    rc::Rc,
};

use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::{Backend, BackendId},
    config::NodeConfig,
    conntrack::{CtKey, CtValue},
    maglev::MaglevConfig,
    service::{SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_TWO_SCOPES, ServiceKey, ServiceName, ServiceValue, SourceRange},
    sock::{SockBackendKey, SockBackendValue, SockRevKey, SockRevValue},
};

use super::MapStore;
use crate::model::{Cidr, Frontend};

/// One map operation, in the order the kernel sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    PutBackend(BackendId, Backend),
    DeleteBackend(BackendId),
}

impl Op {
    pub(crate) fn is_service(self) -> bool {
        matches!(self, Op::PutService(..) | Op::DeleteService(_))
    }
}

/// The two maps as the kernel holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Maps {
    /// `services`.
    pub(crate) services: HashMap<ServiceKey, ServiceValue>,
    /// `backends`.
    pub(crate) backends: HashMap<BackendId, Backend>,
}

impl Maps {
    pub(crate) fn apply(&mut self, op: Op) {
        match op {
            Op::PutService(key, value) => {
                self.services.insert(key, value);
            }
            Op::DeleteService(key) => {
                self.services.remove(&key);
            }
            Op::PutBackend(id, backend) => {
                self.backends.insert(id, backend);
            }
            Op::DeleteBackend(id) => {
                self.backends.remove(&id);
            }
        }
    }

    /// What a lookup racing with the writer could trip over, if anything: a master whose
    /// slots `1..=count` are not all there, a slot naming a missing backend, or a two-scope
    /// master without its internal-scope master.
    pub(crate) fn half_written(&self) -> Option<String> {
        for (key, master) in self.services.iter().filter(|(key, _)| key.slot == 0) {
            for slot in 1..=master.count {
                let Some(value) = self.services.get(&key.with_slot(slot)) else {
                    return Some(format!("{key:?} has count {} but no slot {slot}", master.count));
                };
                if !self.backends.contains_key(&value.backend_id) {
                    return Some(format!("{key:?} slot {slot} names missing backend {}", value.backend_id));
                }
            }
            let two_scopes = key.scope == SCOPE_EXTERNAL && master.flags & SVC_F_TWO_SCOPES != 0;
            if two_scopes && !self.services.contains_key(&key.with_scope(SCOPE_INTERNAL)) {
                return Some(format!("{key:?} has two scopes but no internal-scope master"));
            }
        }
        None
    }
}

/// A [`MapStore`] that records every operation and keeps the resulting maps.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    /// `services` and `backends` operations, in order.
    pub(crate) ops: Vec<Op>,
    /// `services` and `backends` as the operations left them.
    pub(crate) maps: Maps,
    /// Once this many operations are recorded, every put of a new key fails as if the maps were
    /// full (replacing an entry's value needs no room, in the kernel's hash maps too).
    pub(crate) full_after: Rc<Cell<Option<usize>>>,
    /// `service_names`.
    pub(crate) names: BTreeMap<u32, ServiceName>,
    /// `source_ranges`: the client prefixes admitted per frontend.
    pub(crate) ranges: BTreeSet<(Frontend, Cidr)>,
    /// `affinity`: written by tests as the kernel would ([`MapStore::forget`] deletes).
    pub(crate) affinity: HashMap<AffinityKey, AffinityValue>,
    /// `sock_backend`: written by tests as the kernel would ([`MapStore::forget`] deletes).
    pub(crate) sock_backend: HashMap<SockBackendKey, SockBackendValue>,
    /// Maglev tables and seed.
    pub(crate) maglev: MemMaglev,
    /// Entries a ranged read returns at most (every entry when `None`), to test reads over
    /// several calls.
    pub(crate) read_max: Option<usize>,
}

/// Up to `max` of `entries` from cursor `from`, as the kernel's ranged read of a hash map: the
/// entries are ordered by a fixed hash of their key (their "bucket"), and the cursor is the
/// next bucket, so an entry that stays is read once however the others change meanwhile.
fn ranged<K: std::hash::Hash + Copy, V: Copy>(
    entries: impl Iterator<Item = (K, V)>,
    from: Option<u64>,
    max: usize,
) -> (Vec<(K, V)>, Option<u64>) {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let bucket = |key: &K| BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
    let mut sorted: Vec<(u64, K, V)> =
        entries.map(|(k, v)| (bucket(&k), k, v)).filter(|(b, _, _)| *b >= from.unwrap_or(0)).collect();
    sorted.sort_by_key(|(b, _, _)| *b);
    let next = sorted.get(max).map(|(b, _, _)| *b);
    // Whole buckets, as the kernel reads them.
    let end = next.map_or(sorted.len(), |next| sorted.partition_point(|(b, _, _)| *b < next));
    (sorted[..end].iter().map(|(_, k, v)| (*k, *v)).collect(), next)
}

/// The Maglev maps of the in-memory stores: tables as the kernel's `maglev` map holds them
/// (element 0 the table's size, then its slots) and the seed last written.
#[derive(Clone, Debug, Default)]
pub(crate) struct MemMaglev {
    /// Table id → the size, then the slots.
    pub(crate) tables: BTreeMap<u32, Vec<u32>>,
    /// `maglev_config`.
    pub(crate) config: Option<MaglevConfig>,
}

impl MemMaglev {
    /// Stores table `id` with `slots`, as the writer's table write leaves it.
    pub(crate) fn put(&mut self, id: u32, slots: &[BackendId]) {
        let size = slots.len() as u32;
        self.tables.insert(id, std::iter::once(size).chain(slots.iter().copied()).collect());
    }

    /// Element `index` of table `id` (0: the size).
    pub(crate) fn entry(&self, id: u32, index: u32) -> Option<u32> {
        self.tables.get(&id)?.get(index as usize).copied()
    }
}

/// A put into a full map.
#[derive(Debug, thiserror::Error)]
#[error("map full")]
pub(crate) struct Full;

impl Recorder {
    /// The `source_ranges` trie's entries: (prefix length over the whole key, key data), as
    /// the pinned store writes them.
    pub(crate) fn source_range_entries(&self) -> Vec<(u32, SourceRange)> {
        self.ranges.iter().map(|(frontend, cidr)| super::source_range(frontend, cidr)).collect()
    }

    fn put(&mut self, op: Op) -> Result<(), Full> {
        let present = match op {
            Op::PutService(key, _) => self.maps.services.contains_key(&key),
            Op::PutBackend(id, _) => self.maps.backends.contains_key(&id),
            Op::DeleteService(_) | Op::DeleteBackend(_) => true,
        };
        if !present && self.full_after.get().is_some_and(|n| self.ops.len() >= n) {
            return Err(Full);
        }
        self.delete(op)
    }

    fn delete(&mut self, op: Op) -> Result<(), Full> {
        self.ops.push(op);
        self.maps.apply(op);
        Ok(())
    }
}

impl MapStore for Recorder {
    fn put_service_name(&mut self, id: u32, name: ServiceName) -> Result<(), Full> {
        self.names.insert(id, name);
        Ok(())
    }

    fn delete_service_name(&mut self, id: u32) -> Result<(), Full> {
        self.names.remove(&id);
        Ok(())
    }

    fn service_names(&self) -> Vec<(u32, ServiceName)> {
        self.names.iter().map(|(id, name)| (*id, *name)).collect()
    }

    fn service_names_from(&self, from: Option<u64>, max: usize) -> super::Chunk<u32, ServiceName> {
        ranged(self.names.iter().map(|(id, name)| (*id, *name)), from, self.read_max.unwrap_or(max))
    }

    fn put_config(&mut self, _: NodeConfig) -> Result<(), Full> {
        Ok(())
    }

    fn forget(&mut self, gone: &dyn Fn(u32, BackendId) -> bool) -> Result<usize, Full> {
        let before = self.affinity.len() + self.sock_backend.len();
        self.affinity.retain(|key, value| !gone(key.service_id, value.backend_id));
        self.sock_backend.retain(|_, value| !gone(value.service_id, value.backend_id));
        Ok(before - self.affinity.len() - self.sock_backend.len())
    }

    fn sock_rev_entries(&self) -> Vec<(SockRevKey, SockRevValue)> {
        Vec::new()
    }

    fn conntrack_entries(&self) -> Vec<(CtKey, CtValue)> {
        Vec::new()
    }

    fn delete_conntrack(&mut self, _: CtKey) -> Result<(), Full> {
        Ok(())
    }

    fn delete_sock_rev(&mut self, _: SockRevKey) -> Result<(), Full> {
        Ok(())
    }

    fn put_source_range(&mut self, frontend: &Frontend, cidr: &Cidr) -> Result<(), Full> {
        self.ranges.insert((*frontend, *cidr));
        Ok(())
    }

    fn delete_source_range(&mut self, frontend: &Frontend, cidr: &Cidr) -> Result<(), Full> {
        self.ranges.remove(&(*frontend, *cidr));
        Ok(())
    }

    type Error = Full;

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Full> {
        self.put(Op::PutService(key, value))
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), Full> {
        self.delete(Op::DeleteService(key))
    }

    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), Full> {
        self.put(Op::PutBackend(id, backend))
    }

    fn delete_backend(&mut self, id: BackendId) -> Result<(), Full> {
        self.delete(Op::DeleteBackend(id))
    }

    fn service_entries(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.maps.services.iter().map(|(key, value)| (*key, *value)).collect()
    }

    fn backend_entries(&self) -> Vec<(BackendId, Backend)> {
        self.maps.backends.iter().map(|(id, backend)| (*id, *backend)).collect()
    }

    fn service_entries_from(&self, from: Option<u64>, max: usize) -> super::Chunk<ServiceKey, ServiceValue> {
        ranged(self.maps.services.iter().map(|(k, v)| (*k, *v)), from, self.read_max.unwrap_or(max))
    }

    fn backend_entries_from(&self, from: Option<u64>, max: usize) -> super::Chunk<BackendId, Backend> {
        ranged(self.maps.backends.iter().map(|(k, v)| (*k, *v)), from, self.read_max.unwrap_or(max))
    }

    fn put_maglev_config(&mut self, config: MaglevConfig) -> Result<(), Full> {
        self.maglev.config = Some(config);
        Ok(())
    }

    fn put_maglev_table(&mut self, id: u32, slots: &[BackendId]) -> Result<(), Full> {
        self.maglev.put(id, slots);
        Ok(())
    }

    fn delete_maglev_table(&mut self, id: u32) -> Result<(), Full> {
        self.maglev.tables.remove(&id);
        Ok(())
    }

    fn maglev_tables(&self) -> Vec<u32> {
        self.maglev.tables.keys().copied().collect()
    }

    fn maglev_entry(&self, id: u32, index: u32) -> Option<u32> {
        self.maglev.entry(id, index)
    }
}
