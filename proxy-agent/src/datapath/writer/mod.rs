//! The map writer: the only code that changes the service maps. It turns a frontend's desired
//! entry into slot writes, ordered so the kernel never sees a half-updated service:
//!
//! 1. backend entries the new slots need are written first;
//! 2. new and changed slots are written, then the internal-scope master, then the master with
//!    the new `count` (readers see either the old count over valid slots or the new count);
//! 3. slots past the new count are deleted, then backends nobody references any more.
//!
//! Surviving backends keep their slots, and a removed backend's slot is refilled from the tail,
//! so one endpoint change rewrites at most two slots and the master entry.
//!
//! One job per file:
//!
//! - [`ids`]: backend and service-port ids, reference-counted, restored from the maps an
//!   earlier agent left;
//! - [`slots`]: a frontend's backend sets → backend entries, slot entries and their order;
//! - [`reconcile`]: the ordered write of one frontend (upsert, remove, refusal), the sweep of
//!   an earlier agent's leftovers and the periodic compare-and-repair;
//! - [`check`]: that compare-and-repair a range of the large maps at a time;
//! - [`batch`]: a large sync's writes staged and written a map update batch at a time;
//! - [`stale`]: entries that keep clients on backends which left (affinity, UDP sockets,
//!   socket reverse entries, UDP flows);
//! - [`maglev`]: the Maglev table of each backend set that traffic from outside hashes into.

mod batch;
mod check;
#[cfg(test)]
pub(crate) mod fixture;
mod ids;
mod maglev;
#[cfg(test)]
mod maglev_tests;
mod reconcile;
#[cfg(test)]
pub(crate) mod recorder;
mod slots;
mod stale;
#[cfg(test)]
mod stale_tests;
#[cfg(test)]
mod tests;

use hashbrown::{HashMap, HashSet};

use proxy_common::{
    addr,
    affinity::affinity_service_id,
    backend::{Backend, BackendId},
    config::NodeConfig,
    conntrack::{CtKey, CtValue},
    maglev::MaglevConfig,
    service::{SCOPE_INTERNAL, SOURCE_RANGE_FRONTEND_BITS, ServiceKey, ServiceName, ServiceValue, SourceRange},
    sock::{SockRevKey, SockRevValue},
};

use self::ids::{BackendIds, Ids};
pub use self::{batch::Refusal, slots::slot_order, stale::Departed};
use crate::model::{Cidr, Frontend, ServicePortName};

/// The key of a frontend's master entry in the `services` map.
pub(crate) fn master_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey::master(addr::from_ip(frontend.address), frontend.port, frontend.proto)
}

/// The frontend a `services` entry belongs to.
pub(crate) fn frontend_of(key: &ServiceKey) -> Frontend {
    Frontend { address: addr::to_ip(&key.address), port: key.port, proto: key.proto }
}

/// The `source_ranges` entry admitting clients in `cidr` at `frontend`: (prefix length over
/// the whole key, key data).
pub(crate) fn source_range(frontend: &Frontend, cidr: &Cidr) -> (u32, SourceRange) {
    let (client, bits) = cidr.map_prefix();
    let data = SourceRange::new(addr::from_ip(frontend.address), frontend.port, frontend.proto, client);
    (SOURCE_RANGE_FRONTEND_BITS + bits, data)
}

/// Entries read from a map, and the cursor to read on from (`None`: the end was reached).
pub type Chunk<K, V> = (Vec<(K, V)>, Option<u64>);

/// The map operations the writer needs; the real implementation is over the pinned BPF maps.
pub trait MapStore {
    /// The error of a failed map operation.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Inserts or replaces a `services` entry.
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Self::Error>;
    /// Inserts or replaces `services` entries in order, as few system calls as the store can
    /// (the kernel's batch update); on an error, the entries before the failing one may be
    /// written.
    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<(), Self::Error> {
        entries.iter().try_for_each(|(key, value)| self.put_service(*key, *value))
    }
    /// Deletes a `services` entry (absent is fine).
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), Self::Error>;
    /// Inserts or replaces a `backends` entry.
    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), Self::Error>;
    /// Inserts or replaces `backends` entries in order, as [`MapStore::put_services`] does.
    fn put_backends(&mut self, entries: &[(BackendId, Backend)]) -> Result<(), Self::Error> {
        entries.iter().try_for_each(|(id, backend)| self.put_backend(*id, *backend))
    }
    /// Deletes a `backends` entry (absent is fine).
    fn delete_backend(&mut self, id: BackendId) -> Result<(), Self::Error>;
    /// Inserts or replaces a `service_names` entry.
    fn put_service_name(&mut self, id: u32, name: ServiceName) -> Result<(), Self::Error>;
    /// Inserts or replaces `service_names` entries in order, as [`MapStore::put_services`] does.
    fn put_service_names(&mut self, entries: &[(u32, ServiceName)]) -> Result<(), Self::Error> {
        entries.iter().try_for_each(|(id, name)| self.put_service_name(*id, *name))
    }
    /// Deletes a `service_names` entry (absent is fine).
    fn delete_service_name(&mut self, id: u32) -> Result<(), Self::Error>;
    /// Deletes affinity and UDP-socket entries that keep a client on a backend which left that
    /// service port (`gone(service id, backend id)` says which); returns how many went.
    fn forget(&mut self, gone: &dyn Fn(u32, BackendId) -> bool) -> Result<usize, Self::Error>;
    /// Every `conntrack` entry.
    fn conntrack_entries(&self) -> Vec<(CtKey, CtValue)>;
    /// Deletes a `conntrack` entry (absent is fine).
    fn delete_conntrack(&mut self, key: CtKey) -> Result<(), Self::Error>;
    /// Every `sock_rev` entry (socket and backend → the frontend it addressed).
    fn sock_rev_entries(&self) -> Vec<(SockRevKey, SockRevValue)>;
    /// Deletes a `sock_rev` entry (absent is fine).
    fn delete_sock_rev(&mut self, key: SockRevKey) -> Result<(), Self::Error>;
    /// Admits clients in `cidr` at a frontend (`source_ranges` LPM trie).
    fn put_source_range(&mut self, frontend: &Frontend, cidr: &Cidr) -> Result<(), Self::Error>;
    /// Removes a `source_ranges` entry (absent is fine).
    fn delete_source_range(&mut self, frontend: &Frontend, cidr: &Cidr) -> Result<(), Self::Error>;
    /// Writes the node's settings (`config` map).
    fn put_config(&mut self, config: NodeConfig) -> Result<(), Self::Error>;
    /// Every `services` entry present.
    fn service_entries(&self) -> Vec<(ServiceKey, ServiceValue)>;
    /// Every `backends` entry present.
    fn backend_entries(&self) -> Vec<(BackendId, Backend)>;
    /// About `max` `services` entries from cursor `from` (`None`: the start) and the cursor to
    /// go on from (`None`: the end); reading on until the end shows every entry that stayed
    /// in the map once. By default every entry at once.
    fn service_entries_from(&self, from: Option<u64>, max: usize) -> Chunk<ServiceKey, ServiceValue> {
        let _ = (from, max);
        (self.service_entries(), None)
    }
    /// [`MapStore::service_entries_from`] for `backends`.
    fn backend_entries_from(&self, from: Option<u64>, max: usize) -> Chunk<BackendId, Backend> {
        let _ = (from, max);
        (self.backend_entries(), None)
    }
    /// Every `service_names` entry present.
    fn service_names(&self) -> Vec<(u32, ServiceName)>;
    /// [`MapStore::service_entries_from`] for `service_names`.
    fn service_names_from(&self, from: Option<u64>, max: usize) -> Chunk<u32, ServiceName> {
        let _ = (from, max);
        (self.service_names(), None)
    }
    /// Writes the flow hash's seed (`maglev_config` map).
    fn put_maglev_config(&mut self, config: MaglevConfig) -> Result<(), Self::Error>;
    /// Puts `slots` (slot `i + 1` → `slots[i]`) as backend set `id`'s Maglev table, replacing
    /// any earlier one in one update: a lookup sees the old table or the new one.
    fn put_maglev_table(&mut self, id: u32, slots: &[BackendId]) -> Result<(), Self::Error>;
    /// Deletes backend set `id`'s Maglev table (absent is fine).
    fn delete_maglev_table(&mut self, id: u32) -> Result<(), Self::Error>;
    /// The ids of the Maglev tables present.
    fn maglev_tables(&self) -> Vec<u32>;
    /// Entry `index` of Maglev table `id`: index 0 is its size `M`, `1..=M` its slots.
    fn maglev_entry(&self, id: u32, index: u32) -> Option<u32>;
}

/// What is programmed for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    /// `loadBalancerSourceRanges` entries written for the frontend.
    ranges: Vec<Cidr>,
    /// The external scope's master entry as written.
    master: ServiceValue,
    /// The external scope's backend ids in slot order.
    external: Vec<BackendId>,
    /// The internal scope's backend ids in slot order, when the frontend has that scope.
    internal: Option<Vec<BackendId>>,
    /// The service port the frontend belongs to (shared with its other frontends and the
    /// service-port ids).
    service: std::sync::Arc<ServicePortName>,
}

impl Programmed {
    /// The internal scope's master, when the frontend has that scope.
    fn internal_master(&self) -> Option<ServiceValue> {
        Some(internal_master(&self.master, self.internal.as_ref()?.len()))
    }

    /// Its backend sets, each with the id its affinity and UDP-socket entries carry (the kernel
    /// copies it from the master of the scope it used): the external set and the internal one
    /// (empty when there is none).
    fn sets(&self) -> [(u32, &[BackendId]); 2] {
        let internal_id = internal_master(&self.master, 0).service_id;
        [(self.master.service_id, &self.external), (internal_id, self.internal.as_deref().unwrap_or(&[]))]
    }
}

/// The internal scope's master of a frontend whose external master is `master`: the same flags
/// and timeout over `count` slots, under the id of the internal (cluster-wide) set. The scopes'
/// ids differ under `externalTrafficPolicy: Local`, so a pick from one set is never remembered
/// as a pick from the other.
fn internal_master(master: &ServiceValue, count: usize) -> ServiceValue {
    let service_id = affinity_service_id(master.service_id, master.flags, SCOPE_INTERNAL);
    ServiceValue { count: count as u16, service_id, ..*master }
}

/// Counts of what one call wrote, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// `services` entries written or deleted.
    pub service_writes: usize,
    /// `backends` entries written or deleted.
    pub backend_writes: usize,
}

impl std::ops::AddAssign for WriteStats {
    fn add_assign(&mut self, other: Self) {
        self.service_writes += other.service_writes;
        self.backend_writes += other.backend_writes;
    }
}

/// Keeps the maps equal to the desired frontends, one frontend at a time.
pub struct Writer<S: MapStore> {
    store: S,
    programmed: HashMap<Frontend, Programmed>,
    /// Backend ids, one per distinct `backends` value, counted per slot naming it, and the
    /// value behind each id (read like a map of id → backend).
    backend_by_id: BackendIds,
    /// Service-port ids, counted per frontend.
    services: Ids<ServicePortName>,
    /// (affinity id, backend id) pairs that stopped being valid since the last
    /// [`Writer::forget_departed`].
    gone: HashSet<(u32, BackendId)>,
    /// Maglev settings and tables.
    maglev: maglev::Tables,
    /// The open batch's staged writes ([`Writer::begin_batch`]).
    staged: Option<batch::Staged>,
    /// Frontends the open batch could not program, for [`Writer::end_batch`].
    refused: Vec<Refusal<S::Error>>,
    /// The `services` entries an earlier agent left, by frontend, until this writer first
    /// writes the frontend or the sweep: a batch neither rewrites nor undoes what serves
    /// already ([`batch`]).
    adopted: HashMap<Frontend, Vec<(ServiceKey, ServiceValue)>>,
    /// The periodic check's round ([`check`]).
    round: check::Round,
    /// Whether the maps held anything when this writer started: if not, the sweep has nothing
    /// to look for (and skips reading maps of a million buckets).
    inherited: bool,
}

impl<S: MapStore> Writer<S> {
    /// A writer over `store`. Maps left by an earlier agent keep serving: new backend ids start
    /// above every id present, so nothing an old slot points to is overwritten, and
    /// [`Writer::sweep`] removes what the first full sync did not claim.
    pub fn new(store: S) -> Self {
        let (backends, services) = ids::restored(&store);
        let mut adopted: HashMap<Frontend, Vec<_>> = HashMap::new();
        for (key, value) in store.service_entries() {
            adopted.entry(frontend_of(&key)).or_default().push((key, value));
        }
        let inherited = !adopted.is_empty()
            || backends.has_reserved()
            || !services.reserved.is_empty()
            || !store.maglev_tables().is_empty();
        Self {
            store,
            programmed: HashMap::new(),
            backend_by_id: backends,
            services,
            gone: HashSet::new(),
            maglev: maglev::Tables::default(),
            staged: None,
            refused: Vec::new(),
            adopted,
            round: check::Round::default(),
            inherited,
        }
    }

    /// Writes the node's settings for the datapath.
    pub fn set_node_config(&mut self, config: NodeConfig) -> Result<(), S::Error> {
        self.store.put_config(config)
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The underlying store, for tests that write what the kernel would.
    #[cfg(test)]
    pub(crate) fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Frontends programmed.
    pub fn frontends(&self) -> usize {
        self.programmed.len()
    }

    /// Distinct backends programmed.
    pub fn backends(&self) -> usize {
        self.backend_by_id.len()
    }

    /// Every frontend currently programmed.
    pub fn programmed(&self) -> impl Iterator<Item = &Frontend> {
        self.programmed.keys()
    }

    /// `services` entries the programmed frontends hold (to say how large a full map must
    /// grow; counted only then, it walks every frontend).
    pub fn service_entries_held(&self) -> usize {
        self.programmed.values().map(|p| service_entries(p.external.len(), p.internal.as_ref().map(Vec::len))).sum()
    }
}

/// `services` entries a frontend takes: a master and a slot per backend, and the same again for
/// the internal scope when it has one. Duplicate endpoints share a slot, so for a desired entry
/// this is an upper bound.
pub fn service_entries(external: usize, internal: Option<usize>) -> usize {
    1 + external + internal.map_or(0, |n| 1 + n)
}
