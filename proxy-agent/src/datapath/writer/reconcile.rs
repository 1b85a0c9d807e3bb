//! Reconcile: the ordered write of one frontend (upsert, remove, and undoing a refused
//! upsert), the sweep of what an earlier agent left, and the periodic compare-and-repair.

use hashbrown::{HashMap, HashSet};

use proxy_common::{
    affinity::affinity_service_id,
    backend::{Backend, BackendId},
    service::{SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceKey, ServiceValue},
};

use super::{
    MapStore, Programmed, WriteStats, Writer, check, frontend_of,
    ids::{Acquired, service_name},
    internal_master, master_key,
};
use crate::model::{Frontend, FrontendEntry};

impl<S: MapStore> Writer<S> {
    /// Programs `entry` for `frontend`, writing only what differs from what is there. If a
    /// write fails (a full map), the frontend is refused as a whole: whatever was written for
    /// it is removed again, so it is absent rather than half there, and the error is returned.
    pub fn upsert(&mut self, frontend: Frontend, entry: &FrontendEntry) -> Result<WriteStats, S::Error> {
        self.round.disturbed = true;
        if self.stages(&frontend) {
            return self.upsert_staged(frontend, entry);
        }
        // Whatever a batch staged goes first: this write may name its backends.
        self.settle();
        // Written over from here on: no longer an earlier agent's.
        self.adopted.remove(&frontend);
        let old = self.programmed.remove(&frontend);
        let mut taken = Vec::new();
        match self.write(frontend, entry, old.as_ref(), &mut taken) {
            Ok((new, mut stats)) => {
                if let Some(old) = &old {
                    self.departed(old, Some(&new));
                }
                self.programmed.insert(frontend, new);
                // The table names the new backends (written above) and none that `release`
                // deletes next.
                self.update_maglev(frontend);
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
        taken: &mut Vec<BackendId>,
    ) -> Result<(Programmed, WriteStats), S::Error> {
        let mut stats = WriteStats::default();
        let (service_id, new_service, service) = self.services.acquire(&entry.service);
        if new_service == Acquired::Fresh {
            self.store.put_service_name(service_id, service_name(&entry.service))?;
        }
        let old_external = old.map_or(&[][..], |o| &o.external[..]);
        let old_internal = old.and_then(|o| o.internal.as_deref());
        let external = self.layout(old_external, &entry.backends, frontend.proto, taken, &mut stats, None)?;
        let internal = match &entry.internal {
            Some(set) => {
                Some(self.layout(old_internal.unwrap_or(&[]), set, frontend.proto, taken, &mut stats, None)?)
            }
            None => None,
        };
        let master = master_of(service_id, entry, external.len());
        let key = master_key(&frontend);
        let internal_key = key.with_scope(SCOPE_INTERNAL);
        // Admitted client ranges before the master that turns the check on.
        let old_ranges = old.map_or(&[][..], |o| &o.ranges[..]);
        for cidr in entry.source_ranges.iter().filter(|c| !old_ranges.contains(c)) {
            self.store.put_source_range(&frontend, cidr)?;
        }
        // The internal scope's slots and master before the master that points to it.
        if let Some(internal) = &internal {
            self.write_slots(internal_key, old_internal.unwrap_or(&[]), internal, &mut stats)?;
            let scope_master = internal_master(&master, internal.len());
            if old.and_then(Programmed::internal_master) != Some(scope_master) {
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
        Ok((Programmed { ranges, master, external, internal, service }, stats))
    }

    /// [`Writer::upsert`] of a new frontend while a batch is open: its source ranges are
    /// written, everything else is staged (see [`super::batch`]).
    fn upsert_staged(&mut self, frontend: Frontend, entry: &FrontendEntry) -> Result<WriteStats, S::Error> {
        let mut stats = WriteStats::default();
        let mut taken = Vec::new();
        let mut fresh = Vec::new();
        let (service_id, new_service, service) = self.services.acquire(&entry.service);
        let proto = frontend.proto;
        let external = self.layout(&[], &entry.backends, proto, &mut taken, &mut stats, Some(&mut fresh))?;
        let internal = match &entry.internal {
            Some(set) => Some(self.layout(&[], set, proto, &mut taken, &mut stats, Some(&mut fresh))?),
            None => None,
        };
        for cidr in &entry.source_ranges {
            if let Err(error) = self.store.put_source_range(&frontend, cidr) {
                self.refuse(frontend, entry, None, &taken);
                return Err(error);
            }
        }
        let master = master_of(service_id, entry, external.len());
        let ranges = entry.source_ranges.clone();
        let p = Programmed { ranges, master, external, internal, service };
        self.programmed.insert(frontend, p);
        let adopted = self.adopted.remove(&frontend).unwrap_or_default();
        stats.service_writes += self.stage(frontend, fresh, new_service == Acquired::Fresh, adopted);
        Ok(stats)
    }

    /// Undoes a failed upsert: removes every entry the frontend may have (old or new), then drops
    /// the references both layouts held. Best effort: a failing delete leaves an entry the next
    /// sweep removes.
    fn refuse(&mut self, frontend: Frontend, entry: &FrontendEntry, old: Option<Programmed>, taken: &[BackendId]) {
        let key = master_key(&frontend);
        let old_len = |internal: bool| {
            old.as_ref()
                .map_or(0, |o| if internal { o.internal.as_ref().map_or(0, Vec::len) } else { o.external.len() })
        };
        let external_len = old_len(false).max(entry.backends.len());
        let internal_len = old_len(true).max(entry.internal.as_ref().map_or(0, Vec::len));
        let mut stats = WriteStats::default();
        self.update_maglev(frontend);
        let _ = self.store.delete_service(key);
        let _ = self.store.delete_service(key.with_scope(SCOPE_INTERNAL));
        let _ = self.trim_slots(key, external_len, 0, &mut stats);
        let _ = self.trim_slots(key.with_scope(SCOPE_INTERNAL), internal_len, 0, &mut stats);
        for cidr in entry.source_ranges.iter().chain(old.iter().flat_map(|o| o.ranges.iter())) {
            let _ = self.store.delete_source_range(&frontend, cidr);
        }
        for id in taken {
            self.release_backend(*id);
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
        self.round.disturbed = true;
        self.settle();
        self.remove_now(frontend)
    }

    /// [`Writer::remove`] without writing a batch's staged entries first.
    pub(super) fn remove_now(&mut self, frontend: Frontend) -> Result<WriteStats, S::Error> {
        let mut stats = WriteStats::default();
        let Some(old) = self.programmed.remove(&frontend) else { return Ok(stats) };
        self.departed(&old, None);
        self.update_maglev(frontend);
        let key = master_key(&frontend);
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

    /// Deletes every map entry this writer did not program (an earlier agent's leftovers):
    /// masters first, then slots, then backends.
    pub fn sweep(&mut self) -> Result<WriteStats, S::Error> {
        self.settle();
        // What no frontend claimed goes now: nothing is adopted any more.
        self.adopted = HashMap::new();
        let mut stats = WriteStats::default();
        self.backend_by_id.drop_reserved();
        // Over maps that were empty at the start, every entry is this writer's: reading maps
        // of millions of buckets would find nothing (the periodic check deletes whatever else
        // appears later).
        if std::mem::take(&mut self.inherited) {
            let services: Vec<ServiceKey> = self.store.service_entries().into_iter().map(|(key, _)| key).collect();
            let backends: Vec<BackendId> = self.store.backend_entries().into_iter().map(|(id, _)| id).collect();
            self.delete_unprogrammed(services, backends, &mut stats)?;
        }
        for (_, id) in std::mem::take(&mut self.services.reserved) {
            self.services.in_use.remove(&id);
            self.store.delete_service_name(id)?;
        }
        let tables = self.store.maglev_tables().into_iter().collect();
        self.sweep_maglev(tables)?;
        Ok(stats)
    }

    /// Deletes the `services` keys and backend ids among those given that this writer did not
    /// program: masters first, then slots, then backends.
    pub(super) fn delete_unprogrammed(
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
        self.settle();
        let mut stats = WriteStats::default();
        // The maps are read once and compared entry by entry with what was programmed, without
        // a copy of them as hash maps (at 100 000 × 10 that copy cost more than the reading);
        // counting the entries found tells whether any are missing, which is rare.
        let backends = self.store.backend_entries();
        let (found, stale_backends) = self.repair_backends(&backends, &mut stats)?;
        if found < self.backend_by_id.len() {
            let present: HashSet<BackendId> = backends.iter().map(|(id, _)| *id).collect();
            for (id, backend) in &self.backend_by_id {
                if !present.contains(id) {
                    self.store.put_backend(*id, *backend)?;
                    stats.backend_writes += 1;
                }
            }
        }
        drop(backends);
        self.restore_names()?;
        self.restore_ranges()?;
        let present = self.store.service_entries();
        let Repairs { found, mut slots, mut masters, stale } = self.compare_services(&present);
        if found < self.service_entries_held() {
            self.missing_service_entries(&present, &mut slots, &mut masters);
        }
        drop(present);
        self.put_services_in_order(slots, masters, &mut stats)?;
        self.delete_unprogrammed(stale, stale_backends, &mut stats)?;
        self.restore_maglev()?;
        Ok(stats)
    }

    /// Rewrites the `backends` entries among `entries` whose value differs from what was
    /// programmed; returns how many programmed ones were there, and the ids nobody programmed.
    pub(super) fn repair_backends(
        &mut self,
        entries: &[(BackendId, Backend)],
        stats: &mut WriteStats,
    ) -> Result<(usize, Vec<BackendId>), S::Error> {
        let (mut found, mut stale) = (0, Vec::new());
        for (id, backend) in entries {
            match self.backend_by_id.get(id) {
                Some(programmed) if programmed == backend => found += 1,
                Some(programmed) => {
                    self.store.put_backend(*id, *programmed)?;
                    stats.backend_writes += 1;
                    found += 1;
                }
                None => stale.push(*id),
            }
        }
        Ok((found, stale))
    }

    /// Puts back `service_names` entries that differ or are missing.
    pub(super) fn restore_names(&mut self) -> Result<(), S::Error> {
        // The map is read a range at a time and each range compared with the programmed names
        // sorted by id: a copy of the whole map was 15 MiB at 100 000 services.
        let programmed = self.services.sorted_by_id();
        let mut right = vec![false; programmed.len()];
        let mut cursor = None;
        loop {
            let (entries, next) = self.store.service_names_from(cursor, check::STEP);
            for (id, name) in entries {
                if let Ok(i) = programmed.binary_search_by_key(&id, |(id, _)| *id) {
                    right[i] = service_name(programmed[i].1) == name;
                }
            }
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        for ((id, service), _) in programmed.iter().zip(&right).filter(|(_, right)| !**right) {
            self.store.put_service_name(*id, service_name(service))?;
        }
        Ok(())
    }

    /// Puts back every frontend's source ranges.
    pub(super) fn restore_ranges(&mut self) -> Result<(), S::Error> {
        for (frontend, p) in &self.programmed {
            // Idempotent, and LPM trie lookups do not say which prefix matched: simply rewritten.
            for cidr in &p.ranges {
                self.store.put_source_range(frontend, cidr)?;
            }
        }
        Ok(())
    }

    /// Compares `services` entries read from the map with what was programmed.
    pub(super) fn compare_services(&self, entries: &[(ServiceKey, ServiceValue)]) -> Repairs {
        let mut repairs = Repairs::default();
        for (key, value) in entries {
            match self.programmed_value(key) {
                Some(programmed) if programmed == *value => repairs.found += 1,
                Some(programmed) => {
                    repairs.found += 1;
                    let wrong = if key.slot == 0 { &mut repairs.masters } else { &mut repairs.slots };
                    wrong.push((*key, programmed));
                }
                None => repairs.stale.push(*key),
            }
        }
        repairs
    }

    /// Writes `slots`, then `masters`: slots before the masters that count them, an
    /// internal-scope master before the external one that points to it.
    pub(super) fn put_services_in_order(
        &mut self,
        slots: Vec<(ServiceKey, ServiceValue)>,
        mut masters: Vec<(ServiceKey, ServiceValue)>,
        stats: &mut WriteStats,
    ) -> Result<(), S::Error> {
        masters.sort_by_key(|(key, _)| std::cmp::Reverse(key.scope));
        for (key, value) in slots.into_iter().chain(masters) {
            self.store.put_service(key, value)?;
            stats.service_writes += 1;
        }
        Ok(())
    }

    /// The value this writer programmed for `services` entry `key`, if it programmed one.
    fn programmed_value(&self, key: &ServiceKey) -> Option<ServiceValue> {
        let p = self.programmed.get(&frontend_of(key))?;
        let internal = key.scope == SCOPE_INTERNAL;
        if key.slot == 0 {
            return if internal { p.internal_master() } else { Some(p.master) };
        }
        let ids = if internal { p.internal.as_deref()? } else { &p.external[..] };
        let backend_id = *ids.get(usize::from(key.slot) - 1)?;
        Some(ServiceValue { backend_id, ..ServiceValue::default() })
    }

    /// Adds the programmed `services` entries missing from `present` to `slots` and `masters`.
    fn missing_service_entries(
        &self,
        present: &[(ServiceKey, ServiceValue)],
        slots: &mut Vec<(ServiceKey, ServiceValue)>,
        masters: &mut Vec<(ServiceKey, ServiceValue)>,
    ) {
        let present: HashSet<ServiceKey> = present.iter().map(|(key, _)| *key).collect();
        for (frontend, p) in &self.programmed {
            let key = master_key(frontend);
            let scopes = [(key, Some(&p.external)), (key.with_scope(SCOPE_INTERNAL), p.internal.as_ref())];
            for (scope, ids) in scopes {
                for (i, &backend_id) in ids.into_iter().flatten().enumerate() {
                    let slot = scope.with_slot(i as u16 + 1);
                    if !present.contains(&slot) {
                        slots.push((slot, ServiceValue { backend_id, ..ServiceValue::default() }));
                    }
                }
            }
            if let Some(internal) = p.internal_master()
                && !present.contains(&key.with_scope(SCOPE_INTERNAL))
            {
                masters.push((key.with_scope(SCOPE_INTERNAL), internal));
            }
            if !present.contains(&key) {
                masters.push((key, p.master));
            }
        }
    }

    pub(super) fn is_programmed(&self, key: &ServiceKey) -> bool {
        let frontend = frontend_of(key);
        let Some(p) = self.programmed.get(&frontend) else { return false };
        let slots = if key.scope == SCOPE_INTERNAL { p.internal.as_deref() } else { Some(&p.external[..]) };
        slots.is_some_and(|slots| usize::from(key.slot) <= slots.len())
    }
}

/// The external scope's master of `entry` over `count` slots, for service-port id `service_id`.
fn master_of(service_id: u32, entry: &FrontendEntry, count: usize) -> ServiceValue {
    ServiceValue {
        backend_id: 0,
        count: count as u16,
        flags: entry.flags,
        // With the local-set bit when a Local policy makes this set node-local.
        service_id: affinity_service_id(service_id, entry.flags, SCOPE_EXTERNAL),
        affinity_timeout: entry.affinity_timeout,
    }
}

/// `services` entries read from the map against what was programmed.
#[derive(Debug, Default)]
pub(super) struct Repairs {
    /// Programmed entries found (with the right value or not).
    pub(super) found: usize,
    /// Slots to rewrite, with the programmed value.
    pub(super) slots: Vec<(ServiceKey, ServiceValue)>,
    /// Masters to rewrite, with the programmed value.
    pub(super) masters: Vec<(ServiceKey, ServiceValue)>,
    /// Entries nobody programmed.
    pub(super) stale: Vec<ServiceKey>,
}
