//! The map handles the writer writes through ([`AyaMaps`], the [`MapStore`] of the real
//! kernel), opened from a loaded object or from the pins.

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, HashOfMaps, Map, MapData, MapError,
        lpm_trie::{Key, LpmTrie},
    },
};
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::{Backend, BackendId},
    config::NodeConfig,
    conntrack::{CtKey, CtValue},
    maglev::{MaglevConfig, TABLE_SIZE_INDEX, elements, inner_entries, slot_place, slot_value},
    maps,
    service::{ServiceKey, ServiceName, ServiceValue, SourceRange},
    sock::{SockBackendKey, SockBackendValue, SockRevKey, SockRevValue},
};
use tracing::warn;

use super::{
    DatapathError,
    writer::{Chunk, MapStore},
};
use crate::{
    model::{Cidr, Frontend},
    sys::bpf::PinnedMap,
};

/// `enum bpf_map_type`: `BPF_MAP_TYPE_LRU_HASH`.
const LRU_HASH: u32 = 9;

/// A hash map (plain or LRU): aya's handle for writes, and the pinned-map reader for reads.
struct Hash<K, V> {
    map: HashMap<MapData, K, V>,
    reader: PinnedMap,
}

impl<K: aya::Pod, V: aya::Pod> Hash<K, V> {
    /// `map`, with a reader opened from its pin.
    fn new(
        map: Result<HashMap<MapData, K, V>, DatapathError>,
        name: &'static str,
        pin: &Path,
    ) -> Result<Self, DatapathError> {
        let reader = PinnedMap::open(pin).map_err(|source| DatapathError::Pinned { name, source })?;
        Ok(Self { map: map?, reader })
    }

    /// The map pinned at `pin`: the real error when it cannot be opened (`EPERM`, `ENOENT`, not
    /// a map), never a bad name.
    fn from_pin(name: &'static str, pin: &Path) -> Result<Self, DatapathError> {
        let reader = PinnedMap::open(pin).map_err(|source| DatapathError::Pinned { name, source })?;
        let fd = reader.try_clone_fd().map_err(|source| DatapathError::Bpffs { path: pin.to_owned(), source })?;
        let data = MapData::from_fd(fd).map_err(|source| DatapathError::Map { name, source })?;
        let map = if reader.info().map_type == LRU_HASH { Map::LruHashMap(data) } else { Map::HashMap(data) };
        let map = HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        Ok(Self { map, reader })
    }

    /// Inserts or replaces `entries` in order, in one system call (`BPF_MAP_UPDATE_BATCH`); on
    /// an error the entries before the failing one may be written.
    fn put_batch(&mut self, entries: &[(K, V)]) -> Result<(), MapError> {
        let info = self.reader.info();
        if info.key_size as usize != size_of::<K>() || info.value_size as usize != size_of::<V>() {
            // Not the layout this handle was built for: aya's per-entry insert says why.
            return entries.iter().try_for_each(|(key, value)| self.map.insert(key, value, 0));
        }
        let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
        crate::sys::bpf::update_batch(self.reader.as_fd(), &keys, &values).map_err(|io_error| {
            MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_update_batch", io_error })
        })
    }

    /// About `max` entries from bucket cursor `from`, and the cursor to go on from (`None`:
    /// the end); every entry at once where batch reads fail.
    fn entries_from(&self, from: Option<u64>, max: usize) -> (Vec<(K, V)>, Option<u64>) {
        match self.reader.entries_from(from, max) {
            Ok(read) => read,
            Err(error) => {
                warn!(%error, "reading a map a range of buckets at a time failed; reading it whole");
                (self.entries(), None)
            }
        }
    }

    /// Every entry, thousands per system call.
    fn entries(&self) -> Vec<(K, V)> {
        match self.reader.entries() {
            Ok(entries) => entries,
            Err(error) => {
                warn!(%error, "reading a map in batches failed; reading it key by key");
                self.map.iter().filter_map(Result::ok).collect()
            }
        }
    }
}

impl<K, V> std::ops::Deref for Hash<K, V> {
    type Target = HashMap<MapData, K, V>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<K, V> std::ops::DerefMut for Hash<K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

/// The service maps, written through [`super::writer::Writer`].
pub struct AyaMaps {
    conntrack: Hash<CtKey, CtValue>,
    sock_rev: Hash<SockRevKey, SockRevValue>,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    affinity: Hash<AffinityKey, AffinityValue>,
    sock_backend: Hash<SockBackendKey, SockBackendValue>,
    services: Hash<ServiceKey, ServiceValue>,
    backends: Hash<BackendId, Backend>,
    names: Hash<u32, ServiceName>,
    config: Array<MapData, NodeConfig>,
    maglev: HashOfMaps<MapData, u32, MapData>,
    maglev_config: Array<MapData, MaglevConfig>,
}

impl AyaMaps {
    /// The object's maps, pinned at `pin(name)`.
    pub(super) fn open(ebpf: &mut Ebpf, pin: impl Fn(&str) -> PathBuf) -> Result<Self, DatapathError> {
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DatapathError> {
            ebpf.take_map(name).ok_or(DatapathError::Map { name, source: MapError::InvalidName { name: name.into() } })
        }
        fn hash<K: aya::Pod, V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
            pin: &Path,
        ) -> Result<Hash<K, V>, DatapathError> {
            let map = take(ebpf, name)
                .and_then(|map| HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source }));
            Hash::new(map, name, pin)
        }
        let config = take(ebpf, maps::CONFIG)?;
        let ranges = take(ebpf, maps::SOURCE_RANGES)?;
        let maglev = take(ebpf, maps::MAGLEV)?;
        let maglev_config = take(ebpf, maps::MAGLEV_CONFIG)?;
        Ok(Self {
            conntrack: hash(ebpf, maps::CONNTRACK, &pin(maps::CONNTRACK))?,
            sock_rev: hash(ebpf, maps::SOCK_REV, &pin(maps::SOCK_REV))?,
            source_ranges: LpmTrie::try_from(ranges)
                .map_err(|source| DatapathError::Map { name: maps::SOURCE_RANGES, source })?,
            affinity: hash(ebpf, maps::AFFINITY, &pin(maps::AFFINITY))?,
            sock_backend: hash(ebpf, maps::SOCK_BACKEND, &pin(maps::SOCK_BACKEND))?,
            services: hash(ebpf, maps::SERVICES, &pin(maps::SERVICES))?,
            backends: hash(ebpf, maps::BACKENDS, &pin(maps::BACKENDS))?,
            names: hash(ebpf, maps::SERVICE_NAMES, &pin(maps::SERVICE_NAMES))?,
            config: Array::try_from(config).map_err(|source| DatapathError::Map { name: maps::CONFIG, source })?,
            maglev: HashOfMaps::try_from(maglev).map_err(|source| DatapathError::Map { name: maps::MAGLEV, source })?,
            maglev_config: Array::try_from(maglev_config)
                .map_err(|source| DatapathError::Map { name: maps::MAGLEV_CONFIG, source })?,
        })
    }

    /// Opens the maps pinned under `root` (for tools that run beside the agent). A pin that
    /// cannot be opened is reported with its path and the OS error.
    pub fn from_pins(root: &Path) -> Result<Self, DatapathError> {
        let data = |name: &'static str| -> Result<MapData, DatapathError> {
            let pin = root.join(name);
            let reader = PinnedMap::open(&pin).map_err(|source| DatapathError::Pinned { name, source })?;
            let fd = reader.try_clone_fd().map_err(|source| DatapathError::Bpffs { path: pin, source })?;
            MapData::from_fd(fd).map_err(|source| DatapathError::Map { name, source })
        };
        let config = data(maps::CONFIG)?;
        let ranges = data(maps::SOURCE_RANGES)?;
        let maglev = data(maps::MAGLEV)?;
        let maglev_config = data(maps::MAGLEV_CONFIG)?;
        Ok(Self {
            conntrack: Hash::from_pin(maps::CONNTRACK, &root.join(maps::CONNTRACK))?,
            sock_rev: Hash::from_pin(maps::SOCK_REV, &root.join(maps::SOCK_REV))?,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(ranges))
                .map_err(|source| DatapathError::Map { name: maps::SOURCE_RANGES, source })?,
            affinity: Hash::from_pin(maps::AFFINITY, &root.join(maps::AFFINITY))?,
            sock_backend: Hash::from_pin(maps::SOCK_BACKEND, &root.join(maps::SOCK_BACKEND))?,
            services: Hash::from_pin(maps::SERVICES, &root.join(maps::SERVICES))?,
            backends: Hash::from_pin(maps::BACKENDS, &root.join(maps::BACKENDS))?,
            names: Hash::from_pin(maps::SERVICE_NAMES, &root.join(maps::SERVICE_NAMES))?,
            config: Array::try_from(Map::Array(config))
                .map_err(|source| DatapathError::Map { name: maps::CONFIG, source })?,
            maglev: HashOfMaps::try_from(Map::HashOfMaps(maglev))
                .map_err(|source| DatapathError::Map { name: maps::MAGLEV, source })?,
            maglev_config: Array::try_from(Map::Array(maglev_config))
                .map_err(|source| DatapathError::Map { name: maps::MAGLEV_CONFIG, source })?,
        })
    }

    /// Every `services` entry.
    pub fn services(&self) -> impl Iterator<Item = (ServiceKey, ServiceValue)> + '_ {
        self.services.entries().into_iter()
    }

    /// Every `service_names` entry.
    pub fn service_names(&self) -> impl Iterator<Item = (u32, ServiceName)> + '_ {
        self.names.entries().into_iter()
    }

    /// Every `backends` entry.
    pub fn backends(&self) -> impl Iterator<Item = (BackendId, Backend)> + '_ {
        self.backends.entries().into_iter()
    }
}

/// The `source_ranges` key admitting `cidr` at `frontend`.
fn source_range_key(frontend: &Frontend, cidr: &Cidr) -> Key<SourceRange> {
    let (bits, data) = super::writer::source_range(frontend, cidr);
    Key::new(bits, data)
}

/// Deleting an absent key is not an error for the writer.
fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// A failed write to pinned map `map` (its source says why: `E2BIG`, or `ENOSPC` from the
/// LPM trie, when the map is full).
#[derive(Debug, thiserror::Error)]
#[error("writing map {map}{}", max_entries.map(|n| format!(" (max_entries {n})")).unwrap_or_default())]
pub struct WriteError {
    /// The map written, as pinned (`proxy_common::maps`).
    pub map: &'static str,
    /// Its size, where the handle knows it.
    pub max_entries: Option<u32>,
    /// The failed map operation.
    #[source]
    pub source: MapError,
}

/// Names `map` in a failed write.
fn on(map: &'static str) -> impl Fn(MapError) -> WriteError {
    move |source| WriteError { map, max_entries: None, source }
}

/// Names `map` and its size in a failed write.
fn on_sized<K, V>(map: &'static str, hash: &Hash<K, V>) -> impl Fn(MapError) -> WriteError {
    let max_entries = Some(hash.reader.info().max_entries);
    move |source| WriteError { map, max_entries, source }
}

impl MapStore for AyaMaps {
    type Error = WriteError;

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), WriteError> {
        self.services.insert(key, value, 0).map_err(on_sized(maps::SERVICES, &self.services))
    }

    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<(), WriteError> {
        self.services.put_batch(entries).map_err(on_sized(maps::SERVICES, &self.services))
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError> {
        absent_ok(self.services.remove(&key)).map_err(on(maps::SERVICES))
    }

    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), WriteError> {
        self.backends.insert(id, backend, 0).map_err(on_sized(maps::BACKENDS, &self.backends))
    }

    fn put_backends(&mut self, entries: &[(BackendId, Backend)]) -> Result<(), WriteError> {
        self.backends.put_batch(entries).map_err(on_sized(maps::BACKENDS, &self.backends))
    }

    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        absent_ok(self.backends.remove(&id)).map_err(on(maps::BACKENDS))
    }

    fn put_service_name(&mut self, id: u32, name: ServiceName) -> Result<(), WriteError> {
        self.names.insert(id, name, 0).map_err(on_sized(maps::SERVICE_NAMES, &self.names))
    }

    fn put_service_names(&mut self, entries: &[(u32, ServiceName)]) -> Result<(), WriteError> {
        self.names.put_batch(entries).map_err(on_sized(maps::SERVICE_NAMES, &self.names))
    }

    fn delete_service_name(&mut self, id: u32) -> Result<(), WriteError> {
        absent_ok(self.names.remove(&id)).map_err(on(maps::SERVICE_NAMES))
    }

    fn put_config(&mut self, config: NodeConfig) -> Result<(), WriteError> {
        self.config.set(0, config, 0).map_err(on(maps::CONFIG))
    }

    fn forget(&mut self, gone: &dyn Fn(u32, BackendId) -> bool) -> Result<usize, WriteError> {
        let stale_affinity: Vec<AffinityKey> = self
            .affinity
            .entries()
            .into_iter()
            .filter(|(k, v)| gone(k.service_id, v.backend_id))
            .map(|(k, _)| k)
            .collect();
        let stale_sockets: Vec<SockBackendKey> = self
            .sock_backend
            .entries()
            .into_iter()
            .filter(|(_, v)| gone(v.service_id, v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for key in &stale_affinity {
            absent_ok(self.affinity.remove(key)).map_err(on(maps::AFFINITY))?;
        }
        for key in &stale_sockets {
            absent_ok(self.sock_backend.remove(key)).map_err(on(maps::SOCK_BACKEND))?;
        }
        Ok(stale_affinity.len() + stale_sockets.len())
    }

    fn conntrack_entries(&self) -> Vec<(CtKey, CtValue)> {
        self.conntrack.entries()
    }

    fn delete_conntrack(&mut self, key: CtKey) -> Result<(), WriteError> {
        absent_ok(self.conntrack.remove(&key)).map_err(on(maps::CONNTRACK))
    }

    fn sock_rev_entries(&self) -> Vec<(SockRevKey, SockRevValue)> {
        self.sock_rev.entries()
    }

    fn delete_sock_rev(&mut self, key: SockRevKey) -> Result<(), WriteError> {
        absent_ok(self.sock_rev.remove(&key)).map_err(on(maps::SOCK_REV))
    }

    fn put_source_range(&mut self, frontend: &Frontend, cidr: &Cidr) -> Result<(), WriteError> {
        self.source_ranges.insert(&source_range_key(frontend, cidr), 1, 0).map_err(on(maps::SOURCE_RANGES))
    }

    fn delete_source_range(&mut self, frontend: &Frontend, cidr: &Cidr) -> Result<(), WriteError> {
        absent_ok(self.source_ranges.remove(&source_range_key(frontend, cidr))).map_err(on(maps::SOURCE_RANGES))
    }

    fn service_entries(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services().collect()
    }

    fn backend_entries(&self) -> Vec<(BackendId, Backend)> {
        self.backends().collect()
    }

    fn service_entries_from(&self, from: Option<u64>, max: usize) -> Chunk<ServiceKey, ServiceValue> {
        self.services.entries_from(from, max)
    }

    fn backend_entries_from(&self, from: Option<u64>, max: usize) -> Chunk<BackendId, Backend> {
        self.backends.entries_from(from, max)
    }

    fn service_names(&self) -> Vec<(u32, ServiceName)> {
        self.service_names().collect()
    }

    fn service_names_from(&self, from: Option<u64>, max: usize) -> Chunk<u32, ServiceName> {
        self.names.entries_from(from, max)
    }

    fn put_maglev_config(&mut self, config: MaglevConfig) -> Result<(), WriteError> {
        self.maglev_config.set(0, config, 0).map_err(on(maps::MAGLEV_CONFIG))
    }

    fn put_maglev_table(&mut self, id: u32, slots: &[BackendId]) -> Result<(), WriteError> {
        let size = slots.len() as u32;
        // A new inner array each time, filled before it is reachable, then swapped in whole.
        let def = aya_obj::Map::new_from_params(ARRAY, 4, 8, inner_entries(size), INNER_MAP);
        let table = MapData::create(def, "maglev_table", None).map_err(on(maps::MAGLEV))?;
        let values: Vec<u64> = elements(slots).collect();
        crate::sys::bpf::fill_u64_array(table.fd().as_fd(), &values).map_err(|io_error| {
            on(maps::MAGLEV)(MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_update_batch", io_error }))
        })?;
        // The outer map keeps the table; this descriptor (and the replaced table, once no
        // program runs on it) goes.
        self.maglev.insert(id, &table, 0).map_err(on(maps::MAGLEV))
    }

    fn delete_maglev_table(&mut self, id: u32) -> Result<(), WriteError> {
        absent_ok(self.maglev.remove(&id)).map_err(on(maps::MAGLEV))
    }

    fn maglev_tables(&self) -> Vec<u32> {
        self.maglev.keys().filter_map(Result::ok).collect()
    }

    fn maglev_entry(&self, id: u32, index: u32) -> Option<u32> {
        table_entry(&self.maglev.get(&id, 0).ok()?, index)
    }
}

/// Entry `index` of the Maglev table `table` (0: its size, `1..=size`: the slots), unpacked
/// from its `u64` elements (`proxy_common::maglev::slot_place`).
pub(crate) fn table_entry(table: &MapData, index: u32) -> Option<u32> {
    let element = |i| crate::sys::bpf::lookup_u64(table.fd().as_fd(), i).ok().flatten();
    let size = element(TABLE_SIZE_INDEX)? as u32;
    if index == TABLE_SIZE_INDEX {
        return Some(size);
    }
    if index > size {
        return None;
    }
    let (at, shift) = slot_place(index);
    Some(slot_value(element(at)?, shift))
}

/// `BPF_MAP_TYPE_ARRAY`, a Maglev table's type.
const ARRAY: u32 = 2;
/// `BPF_F_INNER_MAP`: tables of any size fit the outer map's template (the program reads each
/// table's size from the table).
const INNER_MAP: u32 = 1 << 12;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::testing::PinnedMaps;

    #[test]
    fn opens_the_pinned_maps_and_reads_them_in_batches() {
        let pins = PinnedMaps::new("maps-open", 4096);
        let mut maps = AyaMaps::from_pins(pins.root()).expect("opening the pinned maps");
        let name = ServiceName { namespace: [0; 64], name: [0; 64], port: [0; 16], proto: 6, _pad: [0; 7] };
        for id in 1..=3000 {
            maps.put_service_name(id, name).unwrap();
        }
        let mut ids: Vec<u32> = maps.service_names().map(|(id, _)| id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..=3000).collect::<Vec<_>>());
    }

    /// A table is a new inner array swapped in whole: its size and slots read back, a smaller
    /// one replaces it, and a deleted one is gone.
    #[test]
    fn a_maglev_table_is_written_whole_and_replaced_by_one_of_another_size() {
        let pins = PinnedMaps::new("maps-maglev", 4096);
        let mut maps = AyaMaps::from_pins(pins.root()).expect("opening the pinned maps");
        let big: Vec<u32> = (0..16_381).map(|i| i % 7 + 1).collect();
        maps.put_maglev_table(5, &big).expect("writing a table");
        assert_eq!(maps.maglev_tables(), [5]);
        assert_eq!(maps.maglev_entry(5, TABLE_SIZE_INDEX), Some(16_381));
        assert_eq!((1..=16_381).map(|i| maps.maglev_entry(5, i).unwrap()).collect::<Vec<_>>(), big);
        assert_eq!(maps.maglev_entry(5, 16_382), None, "nothing past the table");
        maps.put_maglev_table(5, &[9; 251]).expect("replacing it");
        assert_eq!((maps.maglev_entry(5, 0), maps.maglev_entry(5, 251)), (Some(251), Some(9)));
        maps.delete_maglev_table(5).expect("deleting it");
        assert!(maps.maglev_tables().is_empty());
        maps.delete_maglev_table(5).expect("an absent table is no error");
    }

    /// A pin that is there but cannot be opened is reported with its path and the OS error, not
    /// as a bad map name (it was, for the LRU maps).
    #[test]
    fn a_pin_that_does_not_open_is_reported_with_the_os_error() {
        let pins = PinnedMaps::new("maps-unopenable", 4096);
        let path = pins.root().join(maps::CONNTRACK);
        std::fs::remove_file(&path).unwrap();
        // A directory where the map's pin belongs: BPF_OBJ_GET refuses it.
        std::fs::create_dir(&path).unwrap();
        let error = match AyaMaps::from_pins(pins.root()) {
            Ok(_) => panic!("a directory opened as the conntrack map"),
            Err(error) => error,
        };
        std::fs::remove_dir(&path).unwrap();
        let DatapathError::Pinned { name, source } = &error else { panic!("not the pin's error: {error}") };
        assert_eq!(*name, maps::CONNTRACK);
        assert!(source.raw_os_error().is_some(), "{error}");
        let text = error.to_string();
        assert!(text.contains(&path.display().to_string()), "{text} names the pin");
        assert!(text.contains("os error"), "{text} keeps the OS error");
    }
}

/// The writer's batches against the kernel: `BPF_MAP_UPDATE_BATCH` into real maps, and a full
/// `services` map refusing only the service that does not fit.
#[cfg(test)]
mod batch_tests {
    use std::net::Ipv4Addr;

    use proxy_common::{proto::TCP, service::SVC_F_CLUSTER_IP};

    use super::*;
    use crate::{
        datapath::{testing::PinnedMaps, writer::Writer},
        model::{Endpoint, FrontendEntry, FrontendKind, ServicePortName},
    };

    /// ClusterIP 10.96.0.`n`:80 of service `svc-<n>` with `count` endpoints of its own.
    fn service(n: u8, count: u32) -> (Frontend, FrontendEntry) {
        let frontend = Frontend { address: Ipv4Addr::new(10, 96, 0, n).into(), port: 80, proto: TCP };
        let backends = (0..count)
            .map(|i| Endpoint {
                address: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, n, 0)) + i).into(),
                port: 8080,
                local: false,
                terminating: false,
                dsr: false,
            })
            .collect();
        let service =
            ServicePortName { namespace: "default".into(), name: format!("svc-{n}"), port: String::new(), proto: TCP };
        let entry = FrontendEntry {
            service,
            kind: FrontendKind::ClusterIp,
            flags: SVC_F_CLUSTER_IP,
            affinity_timeout: 0,
            backends,
            internal: None,
            source_ranges: Vec::new(),
        };
        (frontend, entry)
    }

    /// Programs `services` in one batch over maps with room for `room` `services` entries;
    /// returns the refused frontends and the masters' counts read back from the kernel.
    fn batch(name: &str, room: u32, services: &[(Frontend, FrontendEntry)]) -> (Vec<Frontend>, Vec<(Frontend, u16)>) {
        let pins = PinnedMaps::sized(name, 4096, Some(room));
        let mut writer = Writer::new(AyaMaps::from_pins(pins.root()).expect("opening the pinned maps"));
        writer.begin_batch();
        for (frontend, entry) in services {
            writer.upsert(*frontend, entry).expect("staging writes nothing");
        }
        let refused = writer.end_batch().into_iter().map(|(frontend, _)| frontend).collect();
        let entries = writer.store().service_entries();
        let mut masters: Vec<(Frontend, u16)> = entries
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| (super::super::writer::frontend_of(k), v.count))
            .collect();
        masters.sort();
        let slots = entries.iter().filter(|(k, _)| k.slot != 0).count();
        assert_eq!(
            slots,
            masters.iter().map(|(_, n)| usize::from(*n)).sum::<usize>(),
            "only the masters' slots are there"
        );
        (refused, masters)
    }

    #[test]
    fn a_batch_programs_every_service_through_the_kernel() {
        let services = [service(1, 10), service(2, 50), service(3, 10)];
        let (refused, masters) = batch("batch-room", 128, &services);
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(masters, services.iter().map(|(f, e)| (*f, e.backends.len() as u16)).collect::<Vec<_>>());
    }

    /// The periodic check's ranged reads: read on from the cursor until the end, a real
    /// `services` map shows each of its entries once.
    #[test]
    fn a_map_read_a_range_at_a_time_shows_every_entry_once() {
        let pins = PinnedMaps::sized("ranged", 4096, Some(4096));
        let mut writer = Writer::new(AyaMaps::from_pins(pins.root()).expect("opening the pinned maps"));
        for n in 1..=40 {
            let (frontend, entry) = service(n, 5);
            writer.upsert(frontend, &entry).expect("room for 40 services");
        }
        let mut whole = writer.store().service_entries();
        let (mut read, mut cursor, mut calls) = (Vec::new(), None, 0);
        loop {
            let (entries, next) = writer.store().service_entries_from(cursor, 16);
            read.extend(entries);
            calls += 1;
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert!(calls > 1, "16 at a time: several reads");
        whole.sort_by_key(|(key, _)| *key);
        read.sort_by_key(|(key, _)| *key);
        assert_eq!(whole.len(), 40 * 6);
        assert_eq!(read, whole, "every entry once");
    }

    /// The periodic check reads `service_names` a range at a time (16 names in tests, so this
    /// one check reads three) and puts back the names deleted or changed under the agent,
    /// wherever they are in the map.
    #[test]
    fn the_check_puts_back_service_names_read_a_range_at_a_time() {
        let pins = PinnedMaps::sized("names", 4096, Some(4096));
        let mut writer = Writer::new(AyaMaps::from_pins(pins.root()).expect("opening the pinned maps"));
        for n in 1..=40 {
            let (frontend, entry) = service(n, 2);
            writer.upsert(frontend, &entry).expect("room for 40 services");
        }
        writer.sweep().expect("nothing to sweep");
        let mut programmed = MapStore::service_names(writer.store());
        programmed.sort_by_key(|(id, _)| *id);
        assert_eq!(programmed.len(), 40, "one name per service port");
        let store = writer.store_mut();
        for (id, _) in [programmed[0], programmed[17], programmed[39]] {
            store.delete_service_name(id).expect("deleting a name");
        }
        let (id, mut wrong) = programmed[25];
        wrong.name = [b'x'; 64];
        store.put_service_name(id, wrong).expect("scribbling on a name");
        writer.check(std::time::Duration::from_secs(60)).expect("the check: a round");
        let mut read = MapStore::service_names(writer.store());
        read.sort_by_key(|(id, _)| *id);
        assert_eq!(read, programmed, "every name as programmed again");
    }

    /// 11 + 51 + 11 entries for 60 places: the batch of slots fails part way; the redo refuses
    /// the second service only (one write at a time would have), the third still fits.
    #[test]
    fn a_full_services_map_refuses_only_the_service_that_does_not_fit() {
        let services = [service(1, 10), service(2, 50), service(3, 10)];
        let (refused, masters) = batch("batch-full", 60, &services);
        assert_eq!(refused, [services[1].0]);
        assert_eq!(masters, [(services[0].0, 10), (services[2].0, 10)]);
    }
}
