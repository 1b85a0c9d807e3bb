//! Ids: backend and service-port ids, reference-counted, kept across agent restarts (restored
//! from the maps an earlier agent left) and not reused soon after release.

use std::collections::{HashMap, HashSet};

use proxy_common::{backend::Backend, service::ServiceName};

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
    /// Each key's id and reference count.
    pub(super) ids: HashMap<K, (u32, usize)>,
    /// Ids held by a key or reserved for one.
    pub(super) in_use: HashSet<u32>,
    /// Where the search for a free id starts.
    pub(super) next: u32,
    /// Ids an earlier agent gave keys: a key gets its old id back (until the sweep).
    pub(super) reserved: HashMap<K, u32>,
}

impl<K: std::hash::Hash + Eq + Clone> Ids<K> {
    pub(super) fn new() -> Self {
        Self { ids: HashMap::new(), in_use: HashSet::new(), next: 1, reserved: HashMap::new() }
    }

    /// The id of `key`, taking a reference, and where it came from.
    pub(super) fn acquire(&mut self, key: &K) -> (u32, Acquired) {
        if let Some((id, refs)) = self.ids.get_mut(key) {
            *refs += 1;
            return (*id, Acquired::Held);
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
        self.ids.insert(key.clone(), (id, 1));
        (id, acquired)
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

    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }
}

/// The ids an earlier agent left in the maps, reserved for the keys they named: backends by
/// their `backends` entry, service ports by their `service_names` entry. New ids start above
/// every id present, so nothing an old slot or affinity entry points to is handed to another
/// key; [`Writer::sweep`] frees what the first full sync did not claim.
pub(super) fn restored<S: MapStore>(store: &S) -> (Ids<Backend>, Ids<ServicePortName>) {
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
    (backends, services)
}

impl<S: MapStore> Writer<S> {
    /// Drops the references `old` held, deleting backends nobody uses any more.
    pub(super) fn release(&mut self, old: &Programmed, stats: &mut WriteStats) -> Result<(), S::Error> {
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
    pub(super) fn release_backend(&mut self, backend: &Backend) -> Option<Result<(), S::Error>> {
        let id = self.backends.release(backend)?;
        self.backend_by_id.remove(&id);
        Some(self.store.delete_backend(id))
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
