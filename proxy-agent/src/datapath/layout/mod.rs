//! Upgrades across map layouts. The layout of the maps (their key and value types and what
//! their bits mean) has a version, [`LAYOUT_VERSION`], recorded beside the pins as an empty
//! directory `layout-v<N>` under the bpf root (bpffs holds only BPF objects and directories);
//! maps pinned before versions were recorded are layout 1. Each map notes the version in which
//! it last changed ([`maps::CHANGED_IN`]).
//!
//! A starting agent reuses every pinned map that has not changed since the pinned layout and
//! has the size it asks for (`--*-map-size`): old and new programs then share it, and nothing
//! is lost. A map that changed or is resized is *replaced*, while the old programs keep serving
//! from the old map:
//! 1. the object is loaded with a new map pinned under `upgrade-v<N>/`, attaching nothing;
//! 2. the entries are carried over ([`carry`]): backends and service names first (every id
//!    stays what flow and affinity entries name), then flows, affinity and socket entries;
//!    copied as they are where key and value still fit, converted from an older layout's types
//!    where this agent knows them ([`v2`]: 4-byte IPv4 addresses become IPv4-mapped), else the
//!    map starts empty (logged); the services and Maglev maps are rebuilt by the sync;
//! 3. the first full sync fills the new maps;
//! 4. [`super::Datapath::finish_upgrade`] swaps. The socket programs' links are replaced once
//!    the new ones are attached. The TC programs, whose flows live in the conntrack map, change
//!    hands so that no packet of a flow meets a program without its entries: the new ones go in
//!    front of the old ones on every interface, dormant (every packet goes on to the old
//!    ones); one write to their `handover` array wakes them on all interfaces at once; a
//!    packet of no flow of theirs then goes on to the old programs behind them, which open no
//!    flow any more; the old flows are carried over, and only then are the old links detached.
//!    The new maps then take the old ones' pins.
//!
//! The upgrade from layout 2 (4-byte addresses) is tested under load with that agent's own
//! binary (`tests/tests/reliability.rs`, built by `cargo xtask previous-agent`).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use proxy_common::maps::{self, LAYOUT_VERSION};
use tracing::{info, warn};

use crate::sys::bpf::{BpfError, PinnedMap};

pub mod v2;

/// The maps whose entries an upgrade carries over, ids first. The others are rebuilt (services,
/// source ranges, config, Maglev tables and seed) or short-lived (fragments).
const CARRIED: &[&str] =
    &[maps::BACKENDS, maps::SERVICE_NAMES, maps::CONNTRACK, maps::AFFINITY, maps::SOCK_REV, maps::SOCK_BACKEND];

/// The flow and socket maps: carried again at the swap, for flows that started meanwhile.
const FLOWS: &[&str] = &[maps::CONNTRACK, maps::AFFINITY, maps::SOCK_REV, maps::SOCK_BACKEND];

/// What decides whether a pinned map can serve the new programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// `max_entries`.
    pub max_entries: u32,
    /// `map_flags`: a preallocated map pinned by an older agent is replaced by the object's
    /// non-preallocated one.
    pub map_flags: u32,
}

/// The maps `--preallocate-bpf-maps` preallocates: hash maps only the agent writes, which the
/// object declares `BPF_F_NO_PREALLOC`.
pub const PREALLOCATABLE: &[&str] = &[maps::SERVICES, maps::BACKENDS, maps::SERVICE_NAMES];

/// `BPF_F_NO_PREALLOC`.
const NO_PREALLOC: u32 = aya_obj::generated::BPF_F_NO_PREALLOC;

/// The shapes of the object's maps, with `max_entries` overridden as the loader will, and the
/// [`PREALLOCATABLE`] maps preallocated when `preallocate`.
pub fn wanted(
    object: &[u8],
    max_entries: &BTreeMap<&str, u32>,
    preallocate: bool,
) -> Result<BTreeMap<String, Shape>, String> {
    let object = aya_obj::Object::parse(object).map_err(|e| format!("parsing the BPF object: {e}"))?;
    Ok(object
        .maps
        .iter()
        .map(|(name, map)| {
            let preallocated = preallocate && PREALLOCATABLE.contains(&name.as_str());
            let shape = Shape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: max_entries.get(name.as_str()).copied().unwrap_or_else(|| map.max_entries()),
                map_flags: if preallocated { map.map_flags() & !NO_PREALLOC } else { map.map_flags() },
            };
            (name.clone(), shape)
        })
        .collect())
}

/// Creates map `name` of `shape` and pins it at `path`, where the loader then finds it.
pub fn create_pinned(path: &Path, name: &str, shape: &Shape) -> Result<(), aya::maps::MapError> {
    let def = aya_obj::Map::new_from_params(
        shape.map_type,
        shape.key_size,
        shape.value_size,
        shape.max_entries,
        shape.map_flags,
    );
    let map = aya::maps::MapData::create(def, name, None)?;
    map.pin(path).map_err(|error| aya::maps::MapError::PinError { name: Some(name.to_owned()), error })
}

/// The shape of the map pinned at `path`.
fn pinned_shape(path: &Path) -> Result<Shape, BpfError> {
    let info = PinnedMap::open(path)?.info();
    Ok(Shape {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        map_flags: info.map_flags,
    })
}

/// The pinned maps the new programs cannot share: changed since layout `pinned` (see
/// [`pinned`]), or of another shape than `wanted`. Maps not pinned yet are simply created.
pub fn to_replace(root: &Path, pinned: u32, wanted: &BTreeMap<String, Shape>) -> Vec<&'static str> {
    let mut replace = Vec::new();
    for &name in maps::ALL {
        let path = root.join(name);
        if !path.exists() {
            continue;
        }
        let shape = pinned_shape(&path);
        let why = match (&shape, wanted.get(name)) {
            _ if maps::changed_in(name) > pinned => format!("changed in layout {}", maps::changed_in(name)),
            (Ok(have), Some(want)) if have == want => continue,
            (Ok(have), want) => format!("pinned {have:?}, wanted {want:?}"),
            (Err(e), _) => format!("cannot read it: {e}"),
        };
        info!(map = name, why, "replacing the map");
        replace.push(name);
    }
    replace
}

fn marker(version: u32) -> String {
    format!("layout-v{version}")
}

/// Where an upgrade to this agent's layout pins its new maps until the swap.
pub fn staging(root: &Path) -> PathBuf {
    root.join(format!("upgrade-v{LAYOUT_VERSION}"))
}

/// The layout of the maps pinned under `root`: `None` when none is pinned, 1 for maps pinned
/// before layouts were recorded.
pub fn pinned(root: &Path) -> io::Result<Option<u32>> {
    let mut recorded = None;
    for entry in fs::read_dir(root)? {
        let name = entry?.file_name();
        if let Some(version) = name.to_str().and_then(|n| n.strip_prefix("layout-v")).and_then(|v| v.parse().ok()) {
            recorded = recorded.max(Some(version));
        }
    }
    if recorded.is_some() {
        return Ok(recorded);
    }
    Ok(maps::ALL.iter().any(|m| root.join(m).exists()).then_some(1))
}

/// Records that the maps pinned under `root` have this agent's layout.
pub fn record(root: &Path) -> io::Result<()> {
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("layout-v") && name != marker(LAYOUT_VERSION) {
            fs::remove_dir(entry.path())?;
        }
    }
    match fs::create_dir(root.join(marker(LAYOUT_VERSION))) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Removes every upgrade's staging directory and every layout record under `root` (for
/// `--cleanup`, after the maps).
pub fn remove_all(root: &Path) -> io::Result<()> {
    for entry in fs::read_dir(root).into_iter().flatten() {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("upgrade-v") {
            remove_pins(&entry.path())?;
        } else if name.starts_with("layout-v") {
            fs::remove_dir(entry.path())?;
        }
    }
    Ok(())
}

/// An empty staging directory for an upgrade (a crashed upgrade's pins are removed: that one
/// starts over from the maps still in use).
pub fn fresh_staging(root: &Path) -> io::Result<PathBuf> {
    let dir = staging(root);
    remove_pins(&dir)?;
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Removes `dir` and the pins in it, if it exists.
fn remove_pins(dir: &Path) -> io::Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                fs::remove_file(entry?.path())?;
            }
            fs::remove_dir(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copies the entries of the `replaced` maps that are carried over from their pins under `from`
/// to the new maps under `to`; with `only_flows`, just the flow and socket maps, keeping the
/// entries already there (the new programs' own). A map whose entries do not fit is skipped
/// with a warning; returns the entries copied.
pub fn carry(from: &Path, to: &Path, replaced: &[&str], only_flows: bool) -> Result<u64, BpfError> {
    let mut copied = 0;
    let carried = if only_flows { FLOWS } else { CARRIED };
    for name in carried.iter().filter(|m| replaced.contains(m)) {
        let copy = PinnedMap::open(&from.join(name))
            .and_then(|source| carry_map(name, &source, &PinnedMap::open(&to.join(name))?, only_flows));
        match copy {
            Ok(n) => {
                info!(map = name, entries = n, "carried over to the new map");
                copied += n;
            }
            Err(error @ BpfError::Layout { .. }) => {
                warn!(%error, "map {name}: its entries do not fit, starting it empty")
            }
            Err(error) => return Err(error),
        }
    }
    Ok(copied)
}

/// Copies map `name`'s entries from `source` to `target`: as they are when the two have the
/// same shape, else converted from the layout the source's key and value sizes say it has (the
/// sizes, not the recorded layout version, decide: a record can be missing or wrong).
fn carry_map(name: &str, source: &PinnedMap, target: &PinnedMap, only_missing: bool) -> Result<u64, BpfError> {
    let shape = |m: &PinnedMap| {
        let info = m.info();
        (info.map_type, info.key_size, info.value_size)
    };
    if shape(source) == shape(target) {
        return source.copy_to(target, only_missing);
    }
    info!(map = name, "converting the entries of an older layout");
    v2::convert(name, source, target, only_missing)
}

/// Puts the `replaced` maps pinned under `staging` in place of those under `root` (whose
/// programs are detached by now) and records the new layout.
pub fn swap_pins(root: &Path, staging: &Path, replaced: &[&str]) -> io::Result<()> {
    for name in replaced {
        let (old, new) = (root.join(name), staging.join(name));
        match fs::remove_file(&old) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::rename(&new, &old)?;
    }
    remove_pins(staging)?;
    record(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory standing in for the bpf root (the records are plain directories;
    /// a plain file stands in for a pinned map).
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("proxy-layout-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_pinned_layout_is_the_recorded_one_or_1_for_unrecorded_maps() {
        let root = scratch("pinned");
        assert_eq!(pinned(&root).unwrap(), None, "nothing pinned");
        fs::write(root.join(maps::CONNTRACK), b"").unwrap();
        assert_eq!(pinned(&root).unwrap(), Some(1), "maps without a record are layout 1's");
        fs::create_dir(root.join("layout-v1")).unwrap();
        record(&root).unwrap();
        assert_eq!(pinned(&root).unwrap(), Some(LAYOUT_VERSION));
        assert!(!root.join("layout-v1").exists(), "one record: the older one goes");
        remove_all(&root).unwrap();
        assert_eq!(pinned(&root).unwrap(), Some(1), "--cleanup removes the records (the map is the test's)");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_map_changed_since_the_pinned_layout_is_replaced_whatever_its_shape() {
        let root = scratch("replace");
        // An unreadable pin (a plain file) is replaced too; an absent one is just created.
        fs::write(root.join(maps::SERVICES), b"").unwrap();
        let replaced = to_replace(&root, LAYOUT_VERSION, &BTreeMap::new());
        assert_eq!(replaced, vec![maps::SERVICES]);
        fs::remove_dir_all(&root).unwrap();
    }

    /// Issue 15: `services`, `backends` and `service_names` are no longer preallocated. A map an
    /// older agent pinned preallocated, of the same size, is replaced rather than kept: the
    /// flags are part of the shape (pinned here from the object, so the kernel's own flags).
    #[test]
    fn a_map_pinned_with_other_flags_is_replaced() {
        let pins = crate::datapath::testing::PinnedMaps::new("layout-flags", 4096);
        let sizes = BTreeMap::from([(maps::CONNTRACK, 4096)]);
        let mut wanted = wanted(super::super::load::OBJECT, &sizes, false).unwrap();
        assert_eq!(to_replace(pins.root(), LAYOUT_VERSION, &wanted), Vec::<&str>::new(), "the same shapes");
        let services = wanted.get_mut(maps::SERVICES).unwrap();
        assert_ne!(services.map_flags, 0, "the object's services map is not preallocated");
        services.map_flags = 0;
        assert_eq!(to_replace(pins.root(), LAYOUT_VERSION, &wanted), vec![maps::SERVICES]);
    }

    /// Maps of layout 2's shapes (4-byte addresses), made with bpftool as that agent pinned
    /// them, each with the map type of today's object's map.
    struct V2Pins(PathBuf);

    impl V2Pins {
        fn new(name: &str) -> Self {
            let root = PathBuf::from(format!("/sys/fs/bpf/proxy-unit-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            crate::datapath::ensure_bpffs(&root).expect("a bpffs directory (run as root)");
            let types = wanted(super::super::load::OBJECT, &BTreeMap::new(), false).unwrap();
            let shapes =
                [(maps::CONNTRACK, 16, 32), (maps::AFFINITY, 16, 16), (maps::BACKENDS, 4, 8), (maps::SOCK_REV, 16, 8)];
            for (map, key, value) in shapes {
                let kind = match types[map].map_type {
                    1 => "hash",
                    9 => "lru_hash",
                    other => panic!("{map}: map type {other} not expected"),
                };
                let path = root.join(map);
                let (key, value) = (key.to_string(), value.to_string());
                let args = ["map", "create"].into_iter().chain([path.to_str().unwrap(), "type", kind, "key", &key]);
                let args: Vec<&str> = args.chain(["value", &value, "entries", "64", "name", map]).collect();
                let out = std::process::Command::new("bpftool").args(&args).output().expect("running bpftool");
                assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Self(root)
        }

        fn insert<K: aya::Pod, V: aya::Pod>(&self, map: &str, key: K, value: V) {
            let data = aya::maps::MapData::from_pin(self.0.join(map)).expect("a pinned map");
            let mut hash = aya::maps::HashMap::<_, K, V>::try_from(aya::maps::Map::from_map_data(data).unwrap())
                .expect("a hash map");
            hash.insert(key, value, 0).expect("inserting");
        }
    }

    impl Drop for V2Pins {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Issue 14: an agent of layout 3 replacing layout 2's maps used to start `conntrack`,
    /// `affinity`, `backends` and the socket maps empty ("its entries do not fit"): NodePort
    /// flows, ClientIP affinity and backend ids were lost. Real maps of both layouts: every entry
    /// arrives converted, and the second carry (at the swap) keeps what the new programs wrote.
    #[test]
    fn entries_of_layout_2_maps_are_converted_into_the_new_ones() {
        use proxy_common::{affinity::*, backend::Backend, conntrack::*, sock::*};

        let old = V2Pins::new("layout-v2");
        let new = crate::datapath::testing::PinnedMaps::new("layout-v3", 64);
        let flow =
            v2::CtKey { src: [192, 0, 2, 7], dst: [10, 0, 0, 1], sport: 40000, dport: 30050, proto: 6, _pad: [0; 3] };
        let translated =
            v2::CtValue { dst: [10, 244, 2, 2], dport: 8080, backend_id: 2, last_seen_ns: 5, ..Default::default() };
        old.insert(maps::CONNTRACK, flow, translated);
        let client = v2::AffinityKey { netns_cookie: 0, client: [192, 0, 2, 7], service_id: 9 };
        old.insert(maps::AFFINITY, client, AffinityValue { last_used_ns: 11, backend_id: 2, _pad: 0 });
        old.insert(maps::BACKENDS, 2u32, v2::Backend { address: [10, 244, 2, 2], port: 8080, proto: 6, flags: 0 });
        let socket = v2::SockRevKey { cookie: 3, address: [10, 244, 2, 2], port: 8080, _pad: [0; 2] };
        old.insert(maps::SOCK_REV, socket, v2::SockRevValue { address: [10, 96, 0, 50], port: 6666, _pad: [0; 2] });

        let replaced = [maps::BACKENDS, maps::CONNTRACK, maps::AFFINITY, maps::SOCK_REV];
        assert_eq!(carry(&old.0, new.root(), &replaced, false).unwrap(), 4, "every entry is carried");
        let read = |map: &str| PinnedMap::open(&new.root().join(map)).unwrap();
        let flows: Vec<(CtKey, CtValue)> = read(maps::CONNTRACK).entries().unwrap();
        assert_eq!(flows, [(CtKey::from(flow), CtValue::from(translated))]);
        assert_eq!(flows[0].0.src, std::net::Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped().octets());
        let affinity: Vec<(AffinityKey, AffinityValue)> = read(maps::AFFINITY).entries().unwrap();
        assert_eq!(affinity, [(AffinityKey::from(client), AffinityValue { last_used_ns: 11, backend_id: 2, _pad: 0 })]);
        let backends: Vec<(u32, Backend)> = read(maps::BACKENDS).entries().unwrap();
        assert_eq!(
            backends.iter().map(|(id, b)| (*id, proxy_common::addr::to_ip(&b.address))).collect::<Vec<_>>(),
            [(2, std::net::Ipv4Addr::new(10, 244, 2, 2).into())]
        );
        let sockets: Vec<(SockRevKey, SockRevValue)> = read(maps::SOCK_REV).entries().unwrap();
        assert_eq!(
            sockets,
            [(
                SockRevKey::from(socket),
                SockRevValue::from(v2::SockRevValue { address: [10, 96, 0, 50], port: 6666, _pad: [0; 2] })
            )]
        );

        // The new programs refreshed the flow meanwhile: the second carry keeps their entry.
        let mut conntrack = aya::maps::HashMap::<_, CtKey, CtValue>::try_from(
            aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(new.root().join(maps::CONNTRACK)).unwrap())
                .unwrap(),
        )
        .unwrap();
        let newer = CtValue { last_seen_ns: 99, ..CtValue::from(translated) };
        conntrack.insert(CtKey::from(flow), newer, 0).unwrap();
        assert_eq!(carry(&old.0, new.root(), &replaced, true).unwrap(), 0, "nothing missing");
        assert_eq!(conntrack.get(&CtKey::from(flow), 0).unwrap(), newer);
    }

    #[test]
    fn a_map_of_an_unknown_shape_starts_empty() {
        let old = V2Pins::new("layout-odd");
        let new = crate::datapath::testing::PinnedMaps::new("layout-odd-v3", 64);
        // service_names has no layout-2 conversion: its shape never changed. A pin of another
        // shape under its name is not read as anything.
        fs::rename(old.0.join(maps::SOCK_REV), old.0.join(maps::SERVICE_NAMES)).unwrap();
        let socket = v2::SockRevKey { cookie: 3, address: [10, 244, 2, 2], port: 8080, _pad: [0; 2] };
        old.insert(maps::SERVICE_NAMES, socket, v2::SockRevValue::default());
        assert_eq!(carry(&old.0, new.root(), &[maps::SERVICE_NAMES], false).unwrap(), 0);
    }
}
