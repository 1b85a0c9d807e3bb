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

use std::collections::{HashMap, HashSet};

use proxy_common::{
    backend::{BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend, BackendId},
    config::NodeConfig,
    conntrack::{CT_F_REPLY, CtKey, CtValue},
    proto,
    service::{
        SCOPE_INTERNAL, SERVICE_ID_LOCAL_SET, SVC_F_EXT_LOCAL, SVC_F_INT_LOCAL, ServiceKey, ServiceName, ServiceValue,
    },
    sock::{SockRevKey, SockRevValue},
};

use crate::model::{Cidr, Endpoint, Frontend, FrontendEntry, ServicePortName};

/// The map operations the writer needs; the real implementation is over the pinned BPF maps.
pub trait MapStore {
    /// The error of a failed map operation.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Inserts or replaces a `services` entry.
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Self::Error>;
    /// Deletes a `services` entry (absent is fine).
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), Self::Error>;
    /// Inserts or replaces a `backends` entry.
    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), Self::Error>;
    /// Deletes a `backends` entry (absent is fine).
    fn delete_backend(&mut self, id: BackendId) -> Result<(), Self::Error>;
    /// Inserts or replaces a `service_names` entry.
    fn put_service_name(&mut self, id: u32, name: ServiceName) -> Result<(), Self::Error>;
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
    /// Every `service_names` entry present.
    fn service_names(&self) -> Vec<(u32, ServiceName)>;
}

/// What is programmed for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    /// `loadBalancerSourceRanges` entries written for the frontend.
    ranges: Vec<Cidr>,
    master: ServiceValue,
    external: Vec<BackendId>,
    internal: Option<Vec<BackendId>>,
    service: ServicePortName,
}

impl Programmed {
    /// Its backend sets, each with the service id its affinity and socket entries carry: the
    /// external set under the master's id (local-set bit included), the internal one (empty when
    /// there is none) under the plain id.
    fn sets(&self) -> [(u32, &[BackendId]); 2] {
        let plain = self.master.service_id & !SERVICE_ID_LOCAL_SET;
        [(self.master.service_id, &self.external), (plain, self.internal.as_deref().unwrap_or(&[]))]
    }
}

/// What [`Writer::forget_departed`] cleaned up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Departed {
    /// Affinity, UDP-socket and UDP conntrack entries deleted.
    pub entries: usize,
    /// Cookies of sockets the socket path had sent to a departed backend.
    pub sockets: HashSet<u64>,
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

/// Ids handed out for keys, with reference counts. Ids are not reused soon after release: an
/// affinity entry or an in-flight lookup that still holds a released id must not find another
/// service's backend under it, so ids count up and wrap only after 2^32 allocations.
#[derive(Debug)]
struct Ids<K> {
    ids: HashMap<K, (u32, usize)>,
    in_use: HashSet<u32>,
    next: u32,
    /// Ids an earlier agent gave keys: a key gets its old id back (until the sweep).
    reserved: HashMap<K, u32>,
}

impl<K: std::hash::Hash + Eq + Clone> Ids<K> {
    fn new() -> Self {
        Self { ids: HashMap::new(), in_use: HashSet::new(), next: 1, reserved: HashMap::new() }
    }

    /// The id of `key`, taking a reference; `true` when the id is new.
    fn acquire(&mut self, key: &K) -> (u32, bool) {
        if let Some((id, refs)) = self.ids.get_mut(key) {
            *refs += 1;
            return (*id, false);
        }
        let id = match self.reserved.remove(key) {
            Some(id) => id,
            None => {
                // 0 is never an id; skip ids in use (or reserved) after a wrap.
                while self.next == 0 || self.in_use.contains(&self.next) {
                    self.next = self.next.wrapping_add(1);
                }
                self.next = self.next.wrapping_add(1);
                self.next.wrapping_sub(1)
            }
        };
        self.in_use.insert(id);
        self.ids.insert(key.clone(), (id, 1));
        (id, true)
    }

    /// Drops a reference; returns the id when it was the last one.
    fn release(&mut self, key: &K) -> Option<u32> {
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

    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Keeps the maps equal to the desired frontends, one frontend at a time.
pub struct Writer<S> {
    store: S,
    programmed: HashMap<Frontend, Programmed>,
    backends: Ids<Backend>,
    backend_by_id: HashMap<BackendId, Backend>,
    services: Ids<ServicePortName>,
    /// (service id, backend id) pairs that stopped being valid since the last `forget_gone`.
    gone: HashSet<(u32, BackendId)>,
}

impl<S: MapStore> Writer<S> {
    /// A writer over `store`. Maps left by an earlier agent keep serving: new backend ids start
    /// above every id present, so nothing an old slot points to is overwritten, and
    /// [`Writer::sweep`] removes what the first full sync did not claim.
    pub fn new(store: S) -> Self {
        // Backends keep their ids too: affinity entries and conntrack name backends by id.
        let mut backends = Ids::new();
        for (id, backend) in store.backend_entries() {
            backends.in_use.insert(id);
            backends.reserved.insert(backend, id);
        }
        backends.next = backends.in_use.iter().max().copied().unwrap_or(0).wrapping_add(1);
        // Service ids are kept across agents (their affinity entries stay valid), the rest start
        // above them.
        let mut services = Ids::new();
        for (id, name) in store.service_names() {
            services.in_use.insert(id);
            services.reserved.insert(service_port_name(&name), id);
        }
        services.next = services.in_use.iter().max().copied().unwrap_or(0).wrapping_add(1);
        Self {
            store,
            programmed: HashMap::new(),
            backends,
            backend_by_id: HashMap::new(),
            services,
            gone: HashSet::new(),
        }
    }

    /// After backends left services: deletes the affinity and UDP-socket entries that still
    /// point at them (a client must not stay stuck to a removed endpoint that another service
    /// still uses), and the socket path's reverse entries of sockets sent to a backend that is
    /// no longer behind that frontend. Returns those sockets' cookies, to be destroyed.
    pub fn forget_departed(&mut self) -> Result<Departed, S::Error> {
        if self.gone.is_empty() {
            return Ok(Departed::default());
        }
        let gone = std::mem::take(&mut self.gone);
        self.forget_where(&|service, backend| gone.contains(&(service, backend)))
    }

    /// The periodic check behind [`Writer::forget_departed`]: deletes every affinity, socket
    /// and UDP flow entry whose backend is not behind its service now, whatever the events
    /// said (entries an earlier agent left, or ones an event was lost for).
    pub fn forget_stale(&mut self) -> Result<Departed, S::Error> {
        self.gone.clear();
        let mut live = HashSet::new();
        for (id, set) in self.programmed.values().flat_map(Programmed::sets) {
            live.extend(set.iter().map(|b| (id, *b)));
        }
        self.forget_where(&|service, backend| !live.contains(&(service, backend)))
    }

    fn forget_where(&mut self, gone: &dyn Fn(u32, BackendId) -> bool) -> Result<Departed, S::Error> {
        let entries = self.store.forget(gone)?;
        let mut sockets = HashSet::new();
        for (key, frontend) in self.store.sock_rev_entries() {
            // sock_rev does not record the protocol: either frontend will do.
            let live = [proto::TCP, proto::UDP]
                .iter()
                .any(|&p| self.behind(frontend.address, frontend.port, p, key.address, key.port));
            if !live {
                self.store.delete_sock_rev(key)?;
                sockets.insert(key.cookie);
            }
        }
        // UDP flows of the packet path to a backend that left their frontend are flushed, as
        // kube-proxy deletes their conntrack entries: the next datagram picks a live backend.
        // TCP flows are left to finish.
        let mut flows = 0;
        for (key, value) in self.store.conntrack_entries() {
            if key.proto != proto::UDP {
                continue;
            }
            let frontend = if value.flags & CT_F_REPLY != 0 { (value.src, value.sport) } else { (key.dst, key.dport) };
            let backend = self.backend_by_id.get(&value.backend_id).map(|b| (b.address, b.port));
            if !backend.is_some_and(|(address, port)| self.behind(frontend.0, frontend.1, proto::UDP, address, port)) {
                self.store.delete_conntrack(key)?;
                flows += 1;
            }
        }
        Ok(Departed { entries: entries + flows, sockets })
    }

    /// Whether backend (address, port) is behind the programmed frontend (address, port, proto).
    /// Looks at that one frontend only: it runs once per socket or flow entry, after syncs that
    /// removed backends, and must stay cheap however many services there are.
    fn behind(&self, address: [u8; 4], port: u16, proto: u8, backend: [u8; 4], backend_port: u16) -> bool {
        let frontend = Frontend { address: address.into(), port, proto };
        let Some(programmed) = self.programmed.get(&frontend) else { return false };
        programmed
            .external
            .iter()
            .chain(programmed.internal.iter().flatten())
            .filter_map(|id| self.backend_by_id.get(id))
            .any(|b| b.address == backend && b.port == backend_port)
    }

    /// Writes the node's settings for the datapath.
    pub fn set_node_config(&mut self, config: NodeConfig) -> Result<(), S::Error> {
        self.store.put_config(config)
    }

    /// Deletes every map entry this writer did not program (an earlier agent's leftovers):
    /// masters first, then slots, then backends.
    pub fn sweep(&mut self) -> Result<WriteStats, S::Error> {
        let mut stats = WriteStats::default();
        let services: Vec<ServiceKey> = self.store.service_entries().into_iter().map(|(key, _)| key).collect();
        for (_, id) in std::mem::take(&mut self.backends.reserved) {
            self.backends.in_use.remove(&id);
        }
        let backends: Vec<BackendId> = self.store.backend_entries().into_iter().map(|(id, _)| id).collect();
        self.delete_unprogrammed(services, backends, &mut stats)?;
        for (_, id) in std::mem::take(&mut self.services.reserved) {
            self.services.in_use.remove(&id);
            self.store.delete_service_name(id)?;
        }
        Ok(stats)
    }

    /// Deletes the `services` keys and backend ids among those given that this writer did not
    /// program: masters first, then slots, then backends.
    fn delete_unprogrammed(
        &mut self,
        services: Vec<ServiceKey>,
        backends: Vec<BackendId>,
        stats: &mut WriteStats,
    ) -> Result<(), S::Error> {
        let mut stale: Vec<ServiceKey> = services.into_iter().filter(|key| !self.is_programmed(key)).collect();
        stale.sort_by_key(|k| (k.slot, k.scope));
        for key in stale {
            self.store.delete_service(key)?;
            stats.service_writes += 1;
        }
        for id in backends.into_iter().filter(|id| !self.backend_by_id.contains_key(id)) {
            self.store.delete_backend(id)?;
            stats.backend_writes += 1;
        }
        Ok(())
    }

    /// Compares the maps with what this writer programmed and puts back whatever differs:
    /// entries deleted or changed under the agent are rewritten, entries nobody programmed are
    /// deleted (kube-proxy's periodic full sync restores its rules the same way). Writes in
    /// [`Writer::upsert`]'s order: backends, names and source ranges, slots, then masters;
    /// deletions as the sweep does them. Only after the first sweep (ids reserved from an
    /// earlier agent are settled by then).
    pub fn restore(&mut self) -> Result<WriteStats, S::Error> {
        let mut stats = WriteStats::default();
        let backends: HashMap<BackendId, Backend> = self.store.backend_entries().into_iter().collect();
        for (id, backend) in &self.backend_by_id {
            if backends.get(id) != Some(backend) {
                self.store.put_backend(*id, *backend)?;
                stats.backend_writes += 1;
            }
        }
        let names: HashMap<u32, ServiceName> = self.store.service_names().into_iter().collect();
        for (service, (id, _)) in &self.services.ids {
            let name = service_name(service);
            if names.get(id) != Some(&name) {
                self.store.put_service_name(*id, name)?;
            }
        }
        let present: HashMap<ServiceKey, ServiceValue> = self.store.service_entries().into_iter().collect();
        let mut masters = Vec::with_capacity(self.programmed.len());
        for (frontend, p) in &self.programmed {
            // Idempotent, and LPM trie lookups do not say which prefix matched: simply rewritten.
            for cidr in &p.ranges {
                self.store.put_source_range(frontend, cidr)?;
            }
            let key = ServiceKey::master(frontend.address.octets(), frontend.port, frontend.proto);
            let scopes = [(key, Some(&p.external)), (key.with_scope(SCOPE_INTERNAL), p.internal.as_ref())];
            for (scope, ids) in scopes {
                for (i, &backend_id) in ids.into_iter().flatten().enumerate() {
                    let slot = scope.with_slot(i as u16 + 1);
                    let value = ServiceValue { backend_id, ..ServiceValue::default() };
                    if present.get(&slot) != Some(&value) {
                        self.store.put_service(slot, value)?;
                        stats.service_writes += 1;
                    }
                }
            }
            if let Some(internal) = &p.internal {
                masters
                    .push((key.with_scope(SCOPE_INTERNAL), ServiceValue { count: internal.len() as u16, ..p.master }));
            }
            masters.push((key, p.master));
        }
        for (key, value) in masters {
            if present.get(&key) != Some(&value) {
                self.store.put_service(key, value)?;
                stats.service_writes += 1;
            }
        }
        self.delete_unprogrammed(present.into_keys().collect(), backends.into_keys().collect(), &mut stats)?;
        Ok(stats)
    }

    fn is_programmed(&self, key: &ServiceKey) -> bool {
        let frontend = Frontend { address: key.address.into(), port: key.port, proto: key.proto };
        let Some(p) = self.programmed.get(&frontend) else { return false };
        let slots = if key.scope == SCOPE_INTERNAL { p.internal.as_deref() } else { Some(&p.external[..]) };
        slots.is_some_and(|slots| usize::from(key.slot) <= slots.len())
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Frontends programmed.
    pub fn frontends(&self) -> usize {
        self.programmed.len()
    }

    /// Distinct backends programmed.
    pub fn backends(&self) -> usize {
        self.backends.len()
    }

    /// Programs `entry` for `frontend`, writing only what differs from what is there. If a
    /// write fails (a full map), the frontend is refused as a whole: whatever was written for
    /// it is removed again, so it is absent rather than half there, and the error is returned.
    pub fn upsert(&mut self, frontend: Frontend, entry: &FrontendEntry) -> Result<WriteStats, S::Error> {
        let old = self.programmed.remove(&frontend);
        let mut taken = Vec::new();
        match self.write(frontend, entry, old.as_ref(), &mut taken) {
            Ok((new, mut stats)) => {
                if let Some(old) = &old {
                    self.departed(old, Some(&new));
                }
                self.programmed.insert(frontend, new);
                if let Some(old) = old {
                    self.release(&old, &mut stats)?;
                }
                Ok(stats)
            }
            Err(error) => {
                self.refuse(frontend, entry, old, &taken);
                Err(error)
            }
        }
    }

    /// The writes of [`Writer::upsert`]; `taken` collects every backend reference it takes.
    fn write(
        &mut self,
        frontend: Frontend,
        entry: &FrontendEntry,
        old: Option<&Programmed>,
        taken: &mut Vec<Backend>,
    ) -> Result<(Programmed, WriteStats), S::Error> {
        let mut stats = WriteStats::default();
        let (service_id, new_service) = self.services.acquire(&entry.service);
        if new_service {
            self.store.put_service_name(service_id, service_name(&entry.service))?;
        }
        let old_external = old.map_or(&[][..], |o| &o.external[..]);
        let old_internal = old.and_then(|o| o.internal.as_deref());
        let external = self.layout(old_external, &entry.backends, frontend.proto, taken, &mut stats)?;
        let internal = match &entry.internal {
            Some(set) => Some(self.layout(old_internal.unwrap_or(&[]), set, frontend.proto, taken, &mut stats)?),
            None => None,
        };
        // The external scope's set is node-local under a Local policy; the internal scope (when
        // there is one) is the cluster-wide set.
        let local_set = match entry.kind.is_external() {
            true => entry.flags & SVC_F_EXT_LOCAL != 0,
            false => entry.flags & SVC_F_INT_LOCAL != 0,
        };
        let master = ServiceValue {
            backend_id: 0,
            count: external.len() as u16,
            flags: entry.flags,
            service_id: if local_set { service_id | SERVICE_ID_LOCAL_SET } else { service_id },
            affinity_timeout: entry.affinity_timeout,
        };
        let key = ServiceKey::master(frontend.address.octets(), frontend.port, frontend.proto);
        let internal_key = key.with_scope(SCOPE_INTERNAL);
        // Admitted client ranges before the master that turns the check on.
        let old_ranges = old.map_or(&[][..], |o| &o.ranges[..]);
        for cidr in entry.source_ranges.iter().filter(|c| !old_ranges.contains(c)) {
            self.store.put_source_range(&frontend, cidr)?;
        }
        // The internal scope's slots and master before the master that points to it.
        if let Some(internal) = &internal {
            self.write_slots(internal_key, old_internal.unwrap_or(&[]), internal, &mut stats)?;
            let scope_master = ServiceValue { count: internal.len() as u16, ..master };
            let old_scope_master =
                old.and_then(|o| Some(ServiceValue { count: o.internal.as_ref()?.len() as u16, ..o.master }));
            if old_scope_master != Some(scope_master) {
                self.store.put_service(internal_key, scope_master)?;
                stats.service_writes += 1;
            }
        }
        self.write_slots(key, old_external, &external, &mut stats)?;
        if old.map(|o| o.master) != Some(master) {
            self.store.put_service(key, master)?;
            stats.service_writes += 1;
        }
        // Only now may entries the old master could reach go away: a master before its slots.
        self.trim_slots(key, old_external.len(), external.len(), &mut stats)?;
        if let Some(old_internal) = old_internal {
            if internal.is_none() {
                self.store.delete_service(internal_key)?;
                stats.service_writes += 1;
            }
            let keep = internal.as_ref().map_or(0, Vec::len);
            self.trim_slots(internal_key, old_internal.len(), keep, &mut stats)?;
        }
        for cidr in old_ranges.iter().filter(|c| !entry.source_ranges.contains(c)) {
            self.store.delete_source_range(&frontend, cidr)?;
        }
        let ranges = entry.source_ranges.clone();
        Ok((Programmed { ranges, master, external, internal, service: entry.service.clone() }, stats))
    }

    /// Undoes a failed upsert: removes every entry the frontend may have (old or new), then drops
    /// the references both layouts held. Best effort: a failing delete leaves an entry the next
    /// sweep removes.
    fn refuse(&mut self, frontend: Frontend, entry: &FrontendEntry, old: Option<Programmed>, taken: &[Backend]) {
        let key = ServiceKey::master(frontend.address.octets(), frontend.port, frontend.proto);
        let old_len = |internal: bool| {
            old.as_ref()
                .map_or(0, |o| if internal { o.internal.as_ref().map_or(0, Vec::len) } else { o.external.len() })
        };
        let external_len = old_len(false).max(entry.backends.len());
        let internal_len = old_len(true).max(entry.internal.as_ref().map_or(0, Vec::len));
        let mut stats = WriteStats::default();
        let _ = self.store.delete_service(key);
        let _ = self.store.delete_service(key.with_scope(SCOPE_INTERNAL));
        let _ = self.trim_slots(key, external_len, 0, &mut stats);
        let _ = self.trim_slots(key.with_scope(SCOPE_INTERNAL), internal_len, 0, &mut stats);
        for cidr in entry.source_ranges.iter().chain(old.iter().flat_map(|o| o.ranges.iter())) {
            let _ = self.store.delete_source_range(&frontend, cidr);
        }
        for backend in taken {
            self.release_backend(backend);
        }
        if let Some(id) = self.services.release(&entry.service) {
            let _ = self.store.delete_service_name(id);
        }
        if let Some(old) = old {
            let _ = self.release(&old, &mut stats);
        }
    }

    /// Removes `frontend` and everything only it referenced.
    pub fn remove(&mut self, frontend: Frontend) -> Result<WriteStats, S::Error> {
        let mut stats = WriteStats::default();
        let Some(old) = self.programmed.remove(&frontend) else { return Ok(stats) };
        self.departed(&old, None);
        let key = ServiceKey::master(frontend.address.octets(), frontend.port, frontend.proto);
        self.store.delete_service(key)?;
        stats.service_writes += 1;
        self.trim_slots(key, old.external.len(), 0, &mut stats)?;
        for cidr in &old.ranges {
            self.store.delete_source_range(&frontend, cidr)?;
        }
        if let Some(internal) = &old.internal {
            self.store.delete_service(key.with_scope(SCOPE_INTERNAL))?;
            stats.service_writes += 1;
            self.trim_slots(key.with_scope(SCOPE_INTERNAL), internal.len(), 0, &mut stats)?;
        }
        self.release(&old, &mut stats)?;
        Ok(stats)
    }

    /// Every frontend currently programmed.
    pub fn programmed(&self) -> impl Iterator<Item = &Frontend> {
        self.programmed.keys()
    }

    /// Records the (affinity id, backend) pairs `old` had and `new` no longer has, per backend
    /// set (the external set under the master's id, the internal one under the plain id).
    fn departed(&mut self, old: &Programmed, new: Option<&Programmed>) {
        let now = new.map(Programmed::sets);
        for (i, (id, had)) in old.sets().into_iter().enumerate() {
            let has: HashSet<BackendId> = now.map_or(&[][..], |sets| sets[i].1).iter().copied().collect();
            self.gone.extend(had.iter().filter(|b| !has.contains(b)).map(|b| (id, *b)));
        }
    }

    /// Takes a reference on the backend of every endpoint (writing entries for new ones) and
    /// returns the slot order: survivors keep their slots, a survivor beyond the new count moves
    /// into a hole, new backends fill the remaining holes. `release` later drops the old
    /// layout's references.
    fn layout(
        &mut self,
        old: &[BackendId],
        wanted: &[Endpoint],
        proto: u8,
        taken: &mut Vec<Backend>,
        stats: &mut WriteStats,
    ) -> Result<Vec<BackendId>, S::Error> {
        let mut ids = Vec::with_capacity(wanted.len());
        let mut seen = HashSet::with_capacity(wanted.len());
        for endpoint in wanted {
            let backend = backend_of(endpoint, proto);
            if !seen.insert(backend) {
                continue;
            }
            let (id, new) = self.backends.acquire(&backend);
            taken.push(backend);
            if new {
                self.store.put_backend(id, backend)?;
                self.backend_by_id.insert(id, backend);
                stats.backend_writes += 1;
            }
            ids.push(id);
        }
        Ok(slot_order(old, &ids))
    }

    /// Writes the slots of `new` that differ from `old` (slot i is `key` at slot i + 1).
    fn write_slots(
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
    fn trim_slots(&mut self, key: ServiceKey, had: usize, keep: usize, stats: &mut WriteStats) -> Result<(), S::Error> {
        for slot in keep + 1..=had {
            self.store.delete_service(key.with_slot(slot as u16))?;
            stats.service_writes += 1;
        }
        Ok(())
    }

    /// Drops the references `old` held, deleting backends nobody uses any more.
    fn release(&mut self, old: &Programmed, stats: &mut WriteStats) -> Result<(), S::Error> {
        let mut result = Ok(());
        for id in old.external.iter().chain(old.internal.iter().flatten()) {
            let Some(backend) = self.backend_by_id.get(id).copied() else { continue };
            if let Some(deleted) = self.release_backend(&backend) {
                stats.backend_writes += 1;
                result = result.and(deleted);
            }
        }
        if let Some(id) = self.services.release(&old.service) {
            result = result.and(self.store.delete_service_name(id));
        }
        result
    }

    /// Drops one reference to `backend`; deletes its entry (and returns how that went) when it
    /// was the last.
    fn release_backend(&mut self, backend: &Backend) -> Option<Result<(), S::Error>> {
        let id = self.backends.release(backend)?;
        self.backend_by_id.remove(&id);
        Some(self.store.delete_backend(id))
    }
}

/// The `service_names` value of a service port (names longer than a field are cut, which
/// Kubernetes' own limits never need).
fn service_name(service: &ServicePortName) -> ServiceName {
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

/// The `backends` map value of an endpoint.
fn backend_of(endpoint: &Endpoint, proto: u8) -> Backend {
    let mut flags = 0;
    if endpoint.local {
        flags |= BACKEND_F_LOCAL;
    }
    if endpoint.terminating {
        flags |= BACKEND_F_TERMINATING;
    }
    Backend { address: endpoint.address.octets(), port: endpoint.port, proto, flags }
}

/// New slot order for the backend ids `wanted` (distinct) given the `old` order: survivors keep
/// their index when it is still in range, survivors beyond the new length and then new ids fill
/// the holes in order. One removal therefore moves at most one backend.
pub fn slot_order(old: &[BackendId], wanted: &[BackendId]) -> Vec<BackendId> {
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

#[cfg(test)]
mod tests {
    //! The writer against a recording store: the maps end up holding exactly what was programmed,
    //! and replaying the recorded operations one at a time never shows a lookup a half-written
    //! service.

    use std::{
        cell::Cell,
        collections::{BTreeMap, BTreeSet},
        net::Ipv4Addr,
        rc::Rc,
    };

    use proptest::{collection, option, prelude::*};
    use proxy_common::{
        proto::TCP,
        service::{SCOPE_EXTERNAL, SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_TWO_SCOPES},
    };

    use super::*;
    use crate::model::FrontendKind;

    /// One map operation, in the order the kernel sees them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Op {
        PutService(ServiceKey, ServiceValue),
        DeleteService(ServiceKey),
        PutBackend(BackendId, Backend),
        DeleteBackend(BackendId),
    }

    impl Op {
        fn is_service(self) -> bool {
            matches!(self, Op::PutService(..) | Op::DeleteService(_))
        }
    }

    /// The two maps as the kernel holds them.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    struct Maps {
        services: HashMap<ServiceKey, ServiceValue>,
        backends: HashMap<BackendId, Backend>,
    }

    impl Maps {
        fn apply(&mut self, op: Op) {
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
        fn half_written(&self) -> Option<String> {
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
    struct Recorder {
        ops: Vec<Op>,
        maps: Maps,
        /// Once this many operations are recorded, every put fails as if the maps were full.
        full_after: Rc<Cell<Option<usize>>>,
    }

    /// A put into a full map.
    #[derive(Debug, thiserror::Error)]
    #[error("map full")]
    struct Full;

    impl Recorder {
        fn put(&mut self, op: Op) -> Result<(), Full> {
            if self.full_after.get().is_some_and(|n| self.ops.len() >= n) {
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
        fn put_service_name(&mut self, _: u32, _: ServiceName) -> Result<(), Full> {
            Ok(())
        }

        fn delete_service_name(&mut self, _: u32) -> Result<(), Full> {
            Ok(())
        }

        fn service_names(&self) -> Vec<(u32, ServiceName)> {
            Vec::new()
        }

        fn put_config(&mut self, _: NodeConfig) -> Result<(), Full> {
            Ok(())
        }

        fn forget(&mut self, _: &dyn Fn(u32, BackendId) -> bool) -> Result<usize, Full> {
            Ok(0)
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

        fn put_source_range(&mut self, _: &Frontend, _: &Cidr) -> Result<(), Full> {
            Ok(())
        }

        fn delete_source_range(&mut self, _: &Frontend, _: &Cidr) -> Result<(), Full> {
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
    }

    /// One scope of one frontend, its slots resolved to the backends they name.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Scope {
        flags: u16,
        affinity_timeout: u32,
        /// One per slot, sorted.
        backends: Vec<Backend>,
    }

    /// Every (frontend, scope) the maps serve.
    type View = BTreeMap<(Frontend, u8), Scope>;

    /// Desired frontends, as the sync loop hands them to the writer.
    type State = BTreeMap<Frontend, FrontendEntry>;

    /// The maps read back through their masters, with the `services` keys no master reaches and
    /// the backend ids no slot names.
    fn read_back(maps: &Maps) -> (View, Vec<ServiceKey>, Vec<BackendId>) {
        let mut view = View::new();
        let mut reached = HashSet::new();
        let mut named = HashSet::new();
        for (key, master) in maps.services.iter().filter(|(key, _)| key.slot == 0) {
            reached.insert(*key);
            let mut backends = Vec::new();
            for slot in 1..=master.count {
                let slot_key = key.with_slot(slot);
                let id = maps.services[&slot_key].backend_id;
                reached.insert(slot_key);
                named.insert(id);
                backends.push(maps.backends[&id]);
            }
            backends.sort();
            let frontend = Frontend { address: Ipv4Addr::from(key.address), port: key.port, proto: key.proto };
            let scope = Scope { flags: master.flags, affinity_timeout: master.affinity_timeout, backends };
            view.insert((frontend, key.scope), scope);
        }
        let unreached = maps.services.keys().filter(|key| !reached.contains(*key)).copied().collect();
        let unnamed = maps.backends.keys().filter(|id| !named.contains(*id)).copied().collect();
        (view, unreached, unnamed)
    }

    /// What the maps must serve for `state`, worked out from the entries alone.
    fn expected(state: &State) -> View {
        let mut view = View::new();
        for (frontend, entry) in state {
            let scope = |set: &[Endpoint]| Scope {
                flags: entry.flags,
                affinity_timeout: entry.affinity_timeout,
                backends: backends(set, frontend.proto),
            };
            view.insert((*frontend, SCOPE_EXTERNAL), scope(&entry.backends));
            if let Some(internal) = &entry.internal {
                view.insert((*frontend, SCOPE_INTERNAL), scope(internal));
            }
        }
        view
    }

    /// The distinct `backends` values of `set`, sorted.
    fn backends(set: &[Endpoint], proto: u8) -> Vec<Backend> {
        let distinct: BTreeSet<Backend> = set
            .iter()
            .map(|e| {
                let local = if e.local { BACKEND_F_LOCAL } else { 0 };
                let terminating = if e.terminating { BACKEND_F_TERMINATING } else { 0 };
                Backend { address: e.address.octets(), port: e.port, proto, flags: local | terminating }
            })
            .collect();
        distinct.into_iter().collect()
    }

    /// Every master of a service port carries that port's one id, and no two ports share one.
    fn check_service_ids(maps: &Maps, state: &State, label: &str) {
        let mut ids: BTreeMap<&ServicePortName, BTreeSet<u32>> = BTreeMap::new();
        for (frontend, entry) in state {
            let master = ServiceKey::master(frontend.address.octets(), frontend.port, frontend.proto);
            let scopes = [Some(SCOPE_EXTERNAL), entry.internal.as_ref().map(|_| SCOPE_INTERNAL)];
            for scope in scopes.into_iter().flatten() {
                ids.entry(&entry.service).or_default().insert(maps.services[&master.with_scope(scope)].service_id);
            }
        }
        let all: BTreeSet<u32> = ids.values().flatten().copied().collect();
        assert!(!all.contains(&0), "{label}: service id 0 in {ids:?}");
        assert!(ids.values().all(|set| set.len() == 1), "{label}: a service port with several ids: {ids:?}");
        assert_eq!(all.len(), ids.len(), "{label}: service ports sharing an id: {ids:?}");
    }

    /// `services` and `backends` operations in `ops`.
    fn counts(ops: &[Op]) -> WriteStats {
        let services = ops.iter().filter(|op| op.is_service()).count();
        WriteStats { service_writes: services, backend_writes: ops.len() - services }
    }

    /// A writer over a recording store, and the kernel maps replayed from its operations so far.
    struct Harness {
        label: String,
        writer: Writer<Recorder>,
        kernel: Maps,
        replayed: usize,
        /// Whether the maps may hold entries the writer did not program (before the sweep).
        leftovers: bool,
        last: State,
        /// The store's [`Recorder::full_after`].
        full_after: Rc<Cell<Option<usize>>>,
    }

    impl Harness {
        fn new(label: &str) -> Self {
            Self::over(label, Maps::default())
        }

        /// A writer started over maps an earlier agent left behind.
        fn over(label: &str, maps: Maps) -> Self {
            let leftovers = maps != Maps::default();
            let full_after = Rc::default();
            let store = Recorder { maps: maps.clone(), full_after: Rc::clone(&full_after), ..Recorder::default() };
            let writer = Writer::new(store);
            Self { label: label.into(), writer, kernel: maps, replayed: 0, leftovers, last: State::new(), full_after }
        }

        /// Programs `state` as the sync loop does (removes what is gone, upserts the rest), then
        /// checks every new operation and the result. Returns the operations.
        fn program(&mut self, state: &State) -> Vec<Op> {
            let gone: Vec<Frontend> = self.writer.programmed().filter(|f| !state.contains_key(f)).copied().collect();
            let mut stats = WriteStats::default();
            for frontend in gone {
                stats += self.writer.remove(frontend).unwrap();
            }
            for (frontend, entry) in state {
                stats += self.writer.upsert(*frontend, entry).unwrap();
            }
            let ops = self.replay();
            assert_eq!(stats, counts(&ops), "{}: the stats count what was written", self.label);
            self.last = state.clone();
            self.check();
            ops
        }

        /// The first full sync is done: sweeps what the writer did not program.
        fn sweep(&mut self) -> Vec<Op> {
            let stats = self.writer.sweep().unwrap();
            let ops = self.replay();
            assert_eq!(stats, counts(&ops), "{}: the sweep's stats count what it wrote", self.label);
            self.leftovers = false;
            self.check();
            ops
        }

        /// The periodic check: puts back what differs from the last state. The maps may be half
        /// written when it starts (that is why it runs), so only the end is checked.
        fn restore(&mut self) -> WriteStats {
            let stats = self.writer.restore().unwrap();
            let ops = self.writer.store().ops[self.replayed..].to_vec();
            for op in &ops {
                self.kernel.apply(*op);
            }
            self.replayed += ops.len();
            assert_eq!(self.kernel, self.writer.store().maps, "{}: replay and store disagree", self.label);
            assert_eq!(stats, counts(&ops), "{}: the restore's stats count what it wrote", self.label);
            self.check();
            stats
        }

        /// Replays the operations recorded since the last call on the kernel maps, checking after
        /// every single one that no lookup can find a half-written service.
        fn replay(&mut self) -> Vec<Op> {
            let ops = self.writer.store().ops[self.replayed..].to_vec();
            for (i, op) in ops.iter().enumerate() {
                self.kernel.apply(*op);
                if let Some(problem) = self.kernel.half_written() {
                    panic!("{}: after operation {} of {} ({op:?}): {problem}", self.label, i + 1, ops.len());
                }
            }
            self.replayed += ops.len();
            assert_eq!(self.kernel, self.writer.store().maps, "{}: replay and store disagree", self.label);
            ops
        }

        /// The maps serve exactly the last state (or, before the sweep, at least that).
        fn check(&self) {
            let label = &self.label;
            let state = &self.last;
            let (mut view, unreached, unnamed) = read_back(&self.kernel);
            let want = expected(state);
            if self.leftovers {
                view.retain(|key, _| want.contains_key(key));
            } else {
                assert!(unreached.is_empty(), "{label}: services entries no master reaches: {unreached:?}");
                assert!(unnamed.is_empty(), "{label}: backends no slot names: {unnamed:?}");
            }
            assert_eq!(view, want, "{label}: the maps serve what was programmed");
            check_service_ids(&self.kernel, state, label);
            assert_eq!(self.writer.frontends(), state.len(), "{label}: frontends");
        }
    }

    /// ClusterIP 10.96.0.`n`:80/TCP.
    fn frontend(n: u8) -> Frontend {
        Frontend { address: Ipv4Addr::new(10, 96, 0, n), port: 80, proto: TCP }
    }

    /// Endpoint `n`: a pod address of its own on port 8080; even ones are on this node.
    fn endpoint(n: u32) -> Endpoint {
        let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n);
        Endpoint { address, port: 8080, local: n.is_multiple_of(2), terminating: false }
    }

    /// A ClusterIP entry of service port `default/<service>` with endpoints `ns`.
    fn entry(service: &str, ns: impl IntoIterator<Item = u32>) -> FrontendEntry {
        FrontendEntry {
            service: ServicePortName {
                namespace: "default".into(),
                name: service.into(),
                port: String::new(),
                proto: TCP,
            },
            kind: FrontendKind::ClusterIp,
            flags: SVC_F_CLUSTER_IP,
            affinity_timeout: 0,
            backends: endpoints(ns),
            internal: None,
            source_ranges: Vec::new(),
        }
    }

    fn endpoints(ns: impl IntoIterator<Item = u32>) -> Vec<Endpoint> {
        let mut set: Vec<Endpoint> = ns.into_iter().map(endpoint).collect();
        set.sort();
        set
    }

    /// `entry` with a separate internal-scope set.
    fn with_internal(mut entry: FrontendEntry, ns: impl IntoIterator<Item = u32>) -> FrontendEntry {
        entry.internal = Some(endpoints(ns));
        entry.flags |= SVC_F_TWO_SCOPES;
        entry
    }

    fn with_affinity(mut entry: FrontendEntry) -> FrontendEntry {
        entry.affinity_timeout = 10_800;
        entry.flags |= SVC_F_AFFINITY;
        entry
    }

    fn state<const N: usize>(entries: [(Frontend, FrontendEntry); N]) -> State {
        entries.into_iter().collect()
    }

    #[test]
    fn every_operation_leaves_whole_services() {
        let (a, b) = (frontend(10), frontend(11));
        let thousand = || 1..=1000;
        let cases: Vec<(&str, Vec<State>)> = vec![
            ("growing 2 → 3", vec![state([(a, entry("a", [1, 2]))]), state([(a, entry("a", [1, 2, 3]))])]),
            (
                "shrinking 3 → 1, keeping the last",
                vec![state([(a, entry("a", [1, 2, 3]))]), state([(a, entry("a", [3]))])],
            ),
            (
                "shrinking 3 → 1, keeping the first",
                vec![state([(a, entry("a", [1, 2, 3]))]), state([(a, entry("a", [1]))])],
            ),
            (
                "replacing a middle endpoint",
                vec![state([(a, entry("a", [1, 2, 3]))]), state([(a, entry("a", [1, 4, 3]))])],
            ),
            ("replacing every endpoint", vec![state([(a, entry("a", [1, 2, 3]))]), state([(a, entry("a", [4, 5]))])]),
            (
                "down to 0 endpoints and back",
                vec![state([(a, entry("a", [1, 2]))]), state([(a, entry("a", []))]), state([(a, entry("a", [3]))])],
            ),
            (
                "a 1000-endpoint service changes",
                vec![
                    state([(a, entry("a", thousand()))]),
                    state([(a, entry("a", thousand().filter(|&n| n != 500).chain([1001])))]),
                    state([(a, entry("a", 2..=1000))]),
                    state([(a, entry("a", 1..=10))]),
                ],
            ),
            (
                "the internal scope switched on, changed, then off",
                vec![
                    state([(a, entry("a", [1, 2]))]),
                    state([(a, with_internal(entry("a", [1, 2]), [2]))]),
                    state([(a, with_internal(entry("a", [1, 2]), [2, 4, 6]))]),
                    state([(a, entry("a", [1, 2]))]),
                    state([(a, with_internal(entry("a", [1, 2]), []))]),
                    state([(a, entry("a", [1, 2]))]),
                ],
            ),
            (
                "a frontend with an internal scope from the start",
                vec![
                    state([(a, with_internal(entry("a", [1, 2, 3]), [2]))]),
                    state([(a, with_internal(entry("a", [3]), [2]))]),
                ],
            ),
            (
                "two frontends of two services share backends",
                vec![
                    state([(a, entry("a", [1, 2])), (b, entry("b", [2, 3]))]),
                    state([(a, entry("a", [1])), (b, entry("b", [2, 3]))]),
                    state([(b, entry("b", [2]))]),
                    state([(a, entry("a", [2])), (b, entry("b", [2]))]),
                ],
            ),
            (
                "two frontends of one service port share its id",
                vec![state([(a, entry("a", [1, 2])), (b, entry("a", [1, 2]))]), state([(b, entry("a", [1]))])],
            ),
            (
                "affinity switched on",
                vec![state([(a, entry("a", [1, 2]))]), state([(a, with_affinity(entry("a", [1, 2])))])],
            ),
            ("an endpoint turns terminating", {
                let mut terminating = entry("a", [1, 2]);
                terminating.backends[1].terminating = true;
                vec![state([(a, entry("a", [1, 2]))]), state([(a, terminating)])]
            }),
        ];
        for (rule, mut steps) in cases {
            // Every scenario ends with everything removed.
            steps.push(State::new());
            let mut harness = Harness::new(rule);
            for step in &steps {
                harness.program(step);
            }
            assert_eq!(harness.kernel, Maps::default(), "{rule}: nothing is left");
        }
    }

    #[test]
    fn one_endpoint_change_in_a_large_service_writes_a_few_entries() {
        let a = frontend(10);
        let thousand = || 1..=1000;
        let cases: [(&str, Vec<u32>); 5] = [
            ("one endpoint replaced", thousand().filter(|&n| n != 500).chain([1001]).collect()),
            ("one endpoint added", thousand().chain([1001]).collect()),
            ("one endpoint removed from the middle", thousand().filter(|&n| n != 500).collect()),
            ("the first endpoint removed", (2..=1000).collect()),
            ("the last endpoint removed", (1..=999).collect()),
        ];
        for (rule, after) in cases {
            let mut harness = Harness::new(rule);
            harness.program(&state([(a, entry("a", thousand()))]));
            let ops = harness.program(&state([(a, entry("a", after))]));
            let written = counts(&ops);
            assert!(written.service_writes <= 3 && written.backend_writes <= 2, "{rule}: wrote {written:?}: {ops:?}");
        }
    }

    #[test]
    fn an_unchanged_upsert_writes_nothing() {
        let a = frontend(10);
        let cases = [
            ("plain", entry("a", [1, 2, 3])),
            ("no endpoints", entry("a", [])),
            ("two scopes", with_internal(entry("a", [1, 2, 3]), [2])),
            ("affinity", with_affinity(entry("a", [1]))),
        ];
        for (rule, entry) in cases {
            let mut harness = Harness::new(rule);
            harness.program(&state([(a, entry.clone())]));
            let stats = harness.writer.upsert(a, &entry).unwrap();
            assert_eq!(stats, WriteStats::default(), "{rule}");
            let ops = harness.replay();
            assert!(ops.is_empty(), "{rule}: {ops:?}");
        }
    }

    #[test]
    fn slot_order_keeps_survivors_in_place() {
        // (rule, old order, wanted ids, new order)
        type Ids = &'static [BackendId];
        let cases: [(&str, Ids, Ids, Ids); 8] = [
            ("an added id takes the next slot", &[1, 2, 3], &[1, 2, 3, 4], &[1, 2, 3, 4]),
            ("a replaced id's slot goes to the new one", &[1, 2, 3], &[1, 3, 4], &[1, 4, 3]),
            ("a removed id's slot goes to the last survivor", &[1, 2, 3, 4], &[1, 3, 4], &[1, 4, 3]),
            ("removing the last id moves nothing", &[1, 2, 3], &[1, 2], &[1, 2]),
            ("the order of the wanted ids does not matter", &[1, 2, 3], &[3, 2, 1], &[1, 2, 3]),
            ("survivors beyond the new length fill holes in order", &[1, 2, 3, 4, 5], &[5, 1, 4], &[1, 4, 5]),
            ("from nothing: the wanted order", &[], &[7, 5, 6], &[7, 5, 6]),
            ("to nothing", &[1, 2, 3], &[], &[]),
        ];
        for (rule, old, wanted, want) in cases {
            assert_eq!(slot_order(old, wanted), want, "{rule}");
        }
    }

    #[test]
    fn a_new_writer_takes_over_an_earlier_agents_maps() {
        let (a, stale) = (frontend(10), frontend(99));
        // An earlier agent served `a` over backends 7, 40 and 41 (41 also in its internal scope)
        // and `stale`, which is gone now, over 7 and 40.
        let mut maps = Maps::default();
        let backend = |n: u32| backends(&[endpoint(n)], TCP)[0];
        for (id, n) in [(7, 1), (40, 2), (41, 3)] {
            maps.backends.insert(id, backend(n));
        }
        let master = |f: Frontend| ServiceKey::master(f.address.octets(), f.port, f.proto);
        let slot = |id| ServiceValue { backend_id: id, ..ServiceValue::default() };
        let value = |count, flags| ServiceValue { count, flags, service_id: 3, ..ServiceValue::default() };
        maps.services.insert(master(a), value(3, SVC_F_CLUSTER_IP | SVC_F_TWO_SCOPES));
        for (s, id) in [(1, 7), (2, 40), (3, 41)] {
            maps.services.insert(master(a).with_slot(s), slot(id));
        }
        maps.services.insert(master(a).with_scope(SCOPE_INTERNAL), value(1, SVC_F_CLUSTER_IP | SVC_F_TWO_SCOPES));
        maps.services.insert(master(a).with_scope(SCOPE_INTERNAL).with_slot(1), slot(41));
        maps.services.insert(master(stale), value(2, SVC_F_CLUSTER_IP));
        for (s, id) in [(1, 7), (2, 40)] {
            maps.services.insert(master(stale).with_slot(s), slot(id));
        }
        assert_eq!(maps.half_written(), None, "the earlier agent's maps are whole");

        let mut harness = Harness::over("takeover", maps);
        let ops = harness.program(&state([(a, entry("a", [2, 4]))]));
        let put: BTreeMap<BackendId, Backend> =
            ops.iter().filter_map(|op| if let Op::PutBackend(id, b) = op { Some((*id, *b)) } else { None }).collect();
        // Endpoint 2 was backend 40 before: it keeps that id (affinity and conntrack entries
        // name it); endpoint 4 is new and gets an id above every id present.
        assert_eq!(put.get(&40), Some(&backend(2)), "a surviving backend keeps its id: {put:?}");
        let fresh: Vec<BackendId> = put.keys().copied().filter(|id| *id != 40).collect();
        assert_eq!(fresh.len(), 1, "{put:?}");
        assert!(fresh[0] > 41, "a new backend's id is above every id present: {fresh:?}");

        let swept = harness.sweep();
        let deleted: BTreeSet<BackendId> =
            swept.iter().filter_map(|op| if let Op::DeleteBackend(id) = op { Some(*id) } else { None }).collect();
        assert_eq!(deleted, BTreeSet::from([7, 41]), "the sweep deletes the backends nobody claimed");
        assert!(harness.kernel.services.keys().all(|key| key.address == a.address.octets()), "`stale` is gone");
        let again = harness.sweep();
        assert!(again.is_empty(), "a second sweep finds nothing: {again:?}");
        harness.program(&State::new());
        assert_eq!(harness.kernel, Maps::default());
    }

    #[test]
    fn restore_puts_back_entries_deleted_or_changed_under_the_writer() {
        let (a, b, foreign) = (frontend(10), frontend(11), frontend(99));
        let mut harness = Harness::new("restore");
        harness.program(&state([(a, with_internal(entry("a", [1, 2, 3]), [2])), (b, entry("b", [3, 4]))]));
        harness.sweep();
        assert_eq!(harness.restore(), WriteStats::default(), "maps as programmed: nothing is written");

        // Someone deletes and scribbles on entries (`bpftool map delete/update`).
        let master = |f: Frontend| ServiceKey::master(f.address.octets(), f.port, f.proto);
        let slot = |backend_id| ServiceValue { backend_id, ..ServiceValue::default() };
        let maps = &mut harness.writer.store.maps;
        maps.services.remove(&master(a));
        maps.services.remove(&master(b).with_slot(2));
        maps.services.insert(master(a).with_scope(SCOPE_INTERNAL).with_slot(1), slot(999));
        let some_backend = *maps.backends.keys().min().unwrap();
        maps.backends.remove(&some_backend);
        maps.services.insert(master(foreign), ServiceValue { count: 1, ..ServiceValue::default() });
        maps.services.insert(master(foreign).with_slot(1), slot(12_345));
        maps.backends.insert(12_345, backends(&[endpoint(9)], TCP)[0]);
        harness.kernel = maps.clone();

        let stats = harness.restore();
        // Master of a, slot 2 of b, a's internal slot, the foreign master and slot.
        assert_eq!(stats.service_writes, 5, "{stats:?}");
        // The deleted backend back, the foreign one gone.
        assert_eq!(stats.backend_writes, 2, "{stats:?}");
        assert_eq!(harness.restore(), WriteStats::default(), "restored maps need nothing more");
    }

    #[test]
    fn a_failed_write_is_repaired_by_the_next_upsert() {
        let a = frontend(10);
        let before = state([(a, with_internal(entry("a", [1, 2]), [2]))]);
        let after = state([(a, with_internal(entry("a", [2, 3, 4]), [3, 5]))]);
        let ops = {
            let mut harness = Harness::new("nothing fails");
            harness.program(&before);
            harness.program(&after)
        };
        let needed = ops.len();
        // A full map fails inserts; deletes always go through.
        let puts = (0..needed).filter(|&i| matches!(ops[i], Op::PutService(..) | Op::PutBackend(..)));
        for done in puts {
            let mut harness = Harness::new(&format!("the maps fill up after {done} of {needed} operations"));
            harness.program(&before);
            harness.full_after.set(Some(harness.writer.store().ops.len() + done));
            assert!(harness.writer.upsert(a, &after[&a]).is_err(), "{}: the upsert fails", harness.label);
            harness.replay();
            // The sync loop upserts the service again on its next change.
            harness.full_after.set(None);
            harness.program(&after);
            harness.program(&State::new());
            assert_eq!(harness.kernel, Maps::default(), "{}: nothing is left", harness.label);
        }
    }

    /// A random state over three frontends (two of them of one service port) and eight
    /// endpoints, each frontend maybe absent, maybe with an internal scope or affinity.
    fn arb_state() -> impl Strategy<Value = State> {
        let set = || collection::btree_set(1..=8u32, 0..6);
        let arb_entry = (set(), option::of(set()), any::<bool>());
        collection::vec(option::of(arb_entry), 3).prop_map(|frontends| {
            let mut state = State::new();
            for (i, chosen) in frontends.into_iter().enumerate() {
                let Some((external, internal, affinity)) = chosen else { continue };
                let mut entry = entry(if i < 2 { "a" } else { "b" }, external);
                if let Some(internal) = internal {
                    entry = with_internal(entry, internal);
                }
                if affinity {
                    entry = with_affinity(entry);
                }
                state.insert(frontend(10 + i as u8), entry);
            }
            state
        })
    }

    proptest! {
        // A failing case is printed, not saved next to the source.
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn random_changes_never_show_a_half_written_service(steps in collection::vec(arb_state(), 1..10)) {
            let mut harness = Harness::new("random steps");
            for step in &steps {
                harness.program(step);
            }
            harness.program(&State::new());
            prop_assert_eq!(&harness.kernel, &Maps::default());
        }

        #[test]
        fn a_restarted_agent_takes_over_whole(
            before in collection::vec(arb_state(), 1..5),
            after in collection::vec(arb_state(), 1..5),
        ) {
            let mut first = Harness::new("first agent");
            for step in &before {
                first.program(step);
            }
            let mut second = Harness::over("restarted agent", first.kernel.clone());
            for (i, step) in after.iter().enumerate() {
                second.program(step);
                if i == 0 {
                    second.sweep();
                }
            }
        }

        #[test]
        fn slot_order_is_a_permutation_keeping_survivors(
            old in collection::btree_set(1..=12u32, 0..10),
            wanted in collection::btree_set(1..=12u32, 0..10),
            shuffle in any::<u64>(),
        ) {
            // Some order for `old` other than sorted.
            let mut old: Vec<BackendId> = old.into_iter().collect();
            old.sort_by_key(|id| (u64::from(*id)).wrapping_mul(shuffle | 1).rotate_left(17));
            let wanted: Vec<BackendId> = wanted.into_iter().collect();
            let order = slot_order(&old, &wanted);
            let mut sorted = order.clone();
            sorted.sort();
            prop_assert_eq!(&sorted, &wanted, "a permutation of the wanted ids");
            for (i, id) in old.iter().enumerate() {
                if i < wanted.len() && wanted.contains(id) {
                    prop_assert_eq!(order[i], *id, "survivor {} keeps slot {}", id, i + 1);
                }
            }
        }
    }
}
