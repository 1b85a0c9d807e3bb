//! The only I/O of inspect/explain: reads the pinned maps, the monotonic clock and the names
//! of network namespaces into a [`Snapshot`]. Read-only: nothing here writes a map.

use std::{
    collections::BTreeMap,
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::lpm_trie::Key;
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::{Backend, BackendId},
    conntrack::{CtKey, CtValue},
    maglev::{MaglevConfig, TABLE_SIZE_INDEX},
    maps,
    service::{ServiceKey, ServiceName, ServiceValue, SourceRange},
};

use super::InspectError;
use crate::sys::{self, bpf::PinnedMap};

/// Everything inspect and explain read, at one moment. Built by [`read`] from the pins, or by
/// hand in tests.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The `--bpf-root` the maps came from.
    pub root: PathBuf,
    /// Every `services` entry: masters (slot 0) and backend slots, both scopes.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Every `backends` entry.
    pub backends: BTreeMap<BackendId, Backend>,
    /// Every `service_names` entry.
    pub names: BTreeMap<u32, ServiceName>,
    /// Every `affinity` entry; `None` when the map is not pinned.
    pub affinity: Option<Vec<(AffinityKey, AffinityValue)>>,
    /// Every `conntrack` entry; `None` when the map is not pinned.
    pub conntrack: Option<Vec<(CtKey, CtValue)>>,
    /// Every `source_ranges` entry: the LPM trie's prefix length (over the whole key) and key
    /// data; `None` when the map is not pinned.
    pub source_ranges: Option<Vec<(u32, SourceRange)>>,
    /// CLOCK_MONOTONIC now, in ns: the clock `bpf_ktime_get_ns()` reads.
    pub now_ns: u64,
    /// The network namespaces found (`/run/netns/<name>`, and `self`, the one inspect runs in),
    /// to name the netns cookies of socket-path affinity entries and find a client's namespace.
    /// Empty unless [`netns`] filled it.
    pub netns: Vec<NetnsInfo>,
    /// The size `M` of each Maglev table, by backend-set id (`maglev` map).
    pub maglev_sizes: BTreeMap<u32, u32>,
    /// The slots of the Maglev tables read whole (`explain` reads the one its query needs):
    /// slot `i + 1` is element `i`.
    pub maglev_slots: BTreeMap<u32, Vec<u32>>,
    /// The flow hash's seed (`maglev_config`); `None` when the map is not pinned.
    pub maglev_seed: Option<u32>,
}

/// Reads the maps pinned under `root`.
pub fn read(root: &Path) -> Result<Snapshot, InspectError> {
    match fs::symlink_metadata(root.join(maps::SERVICES)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(InspectError::Permission { path: root.to_owned() });
        }
        // Nothing at all (or a root without the service map): the agent never ran there.
        Err(_) if !has_any_map(root) => return Err(InspectError::NoMaps { root: root.to_owned() }),
        Err(_) => {}
    }
    let services = entries::<ServiceKey, ServiceValue>(root, maps::SERVICES)?.into_iter().collect();
    let backends = entries::<BackendId, Backend>(root, maps::BACKENDS)?.into_iter().collect();
    let names = entries::<u32, ServiceName>(root, maps::SERVICE_NAMES)?.into_iter().collect();
    let affinity = match entries::<AffinityKey, AffinityValue>(root, maps::AFFINITY) {
        Ok(entries) => Some(entries),
        Err(InspectError::MissingMap { .. }) => None,
        Err(e) => return Err(e),
    };
    let conntrack = match entries::<CtKey, CtValue>(root, maps::CONNTRACK) {
        Ok(entries) => Some(entries),
        Err(InspectError::MissingMap { .. }) => None,
        Err(e) => return Err(e),
    };
    let source_ranges = match source_ranges(root) {
        Ok(entries) => Some(entries),
        Err(InspectError::MissingMap { .. }) => None,
        Err(e) => return Err(e),
    };
    // The clock after the maps: an entry written while we read is never "in the future".
    let now_ns = monotonic_now_ns()?;
    Ok(Snapshot {
        root: root.to_owned(),
        services,
        backends,
        names,
        affinity,
        conntrack,
        source_ranges,
        now_ns,
        netns: Vec::new(),
        maglev_sizes: maglev_tables(root).into_iter().filter_map(|(id, table)| Some((id, table.size()?))).collect(),
        maglev_slots: BTreeMap::new(),
        maglev_seed: entries::<u32, MaglevConfig>(root, maps::MAGLEV_CONFIG)
            .ok()
            .and_then(|e| e.first().map(|(_, config)| config.seed)),
    })
}

/// One Maglev table, opened from the id the outer map holds.
struct InnerTable(aya::maps::MapData);

impl InnerTable {
    fn entry(&self, index: u32) -> Option<u32> {
        crate::datapath::maglev_table_entry(&self.0, index)
    }

    fn size(&self) -> Option<u32> {
        self.entry(TABLE_SIZE_INDEX)
    }
}

/// The Maglev tables pinned under `root`, by backend-set id; none when the map is not pinned
/// (maps of an agent from before Maglev) or cannot be read.
fn maglev_tables(root: &Path) -> Vec<(u32, InnerTable)> {
    let Ok(outer) = PinnedMap::open(&root.join(maps::MAGLEV)) else { return Vec::new() };
    // A map-in-map's value, read from userspace, is the inner map's id.
    let ids: Vec<(u32, u32)> = outer.entries().unwrap_or_default();
    ids.into_iter()
        .filter_map(|(id, map_id)| Some((id, InnerTable(aya::maps::MapData::from_id(map_id).ok()?))))
        .collect()
}

/// The slots of Maglev table `id` under `root` (one lookup per slot: only for `explain`).
pub fn maglev_slots(root: &Path, id: u32) -> Option<Vec<u32>> {
    let (_, table) = maglev_tables(root).into_iter().find(|(table, _)| *table == id)?;
    let size = table.size()?;
    (1..=size).map(|slot| table.entry(slot)).collect()
}

fn has_any_map(root: &Path) -> bool {
    maps::ALL.iter().any(|name| fs::symlink_metadata(root.join(name)).is_ok())
}

/// Reads every entry of the map pinned as `root/name` (in batches where the map type has them).
fn entries<K: aya::Pod, V: aya::Pod>(root: &Path, name: &'static str) -> Result<Vec<(K, V)>, InspectError> {
    let path = root.join(name);
    match fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(InspectError::Permission { path }),
        Err(_) => return Err(InspectError::MissingMap { name, path }),
    }
    let map_error = |source: sys::bpf::BpfError| match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => InspectError::Permission { path: path.clone() },
        _ => InspectError::Map { name, path: path.clone(), source },
    };
    PinnedMap::open(&path).and_then(|map| map.entries()).map_err(map_error)
}

/// Reads every `source_ranges` entry as (prefix length over the whole key, key data).
fn source_ranges(root: &Path) -> Result<Vec<(u32, SourceRange)>, InspectError> {
    let keys = entries::<Key<SourceRange>, u8>(root, maps::SOURCE_RANGES)?;
    Ok(keys.into_iter().map(|(key, _)| (key.prefix_len(), key.data())).collect())
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_now_ns() -> Result<u64, InspectError> {
    sys::fs::monotonic_ns().map_err(InspectError::Clock)
}

/// A network namespace: its cookie (what the socket path keys affinity by), a name and its
/// addresses of both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetnsInfo {
    /// The netns cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie()`).
    pub cookie: u64,
    /// Its name under `/run/netns` (as `ip netns` and CNI plugins name pods' namespaces), or
    /// `self` for the namespace inspect runs in (on a node: the host's).
    pub name: String,
    /// The addresses of its interfaces.
    pub addresses: Vec<IpAddr>,
}

/// Every namespace under `/run/netns`, then this process's own. Best effort: a namespace that
/// cannot be entered is left out; a namespace bound under two names keeps the first.
pub fn netns() -> Vec<NetnsInfo> {
    let named = fs::read_dir("/run/netns").into_iter().flatten().flatten();
    let mut candidates: Vec<(PathBuf, String)> =
        named.map(|entry| (entry.path(), entry.file_name().to_string_lossy().into_owned())).collect();
    candidates.sort();
    candidates.push((PathBuf::from("/proc/thread-self/ns/net"), "self".to_owned()));
    let mut out: Vec<NetnsInfo> = Vec::new();
    for (path, name) in candidates {
        if let Some((cookie, addresses)) = netns_info(&path)
            && !out.iter().any(|n| n.cookie == cookie)
        {
            out.push(NetnsInfo { cookie, name, addresses });
        }
    }
    out
}

/// The cookie and addresses of the namespace at `path`, read by a thread inside it.
fn netns_info(path: &Path) -> Option<(u64, Vec<IpAddr>)> {
    let (cookie, addresses) = sys::net::in_netns(path, || (sys::net::netns_cookie(), sys::net::addresses())).ok()?;
    Some((cookie.ok()?, addresses.ok()?.into_iter().map(|(_, ip)| ip).collect()))
}
