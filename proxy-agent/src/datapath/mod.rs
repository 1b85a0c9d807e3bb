//! The kernel side as the agent sees it: load the embedded BPF object, pin its maps under the
//! bpffs root, attach the programs, and write the maps (only through [`writer::Writer`]).
//!
//! - [`load`](Datapath::load): loading the object, reusing or replacing pinned maps
//!   (`load.rs`, with the layout upgrade in [`layout`]);
//! - links: attaching, pinning, checking and removing program links (`links.rs`);
//! - interfaces: which interfaces should carry the TC programs, and those that do not
//!   (`interfaces.rs`);
//! - [`AyaMaps`]: the map handles the writer writes through (`maps.rs`);
//! - [`sockets`]: destroying UDP sockets still sent to departed backends, off the sync loop;
//! - [`Attacher`]: the thread that owns the `Datapath` once the agent runs, so that no blocking
//!   kernel work (attaching, link checks, an upgrade's wait) runs on the async runtime.

mod attacher;
mod bpffs;
mod interfaces;
pub mod layout;
mod links;
mod load;
mod maps;
pub(crate) mod sockets;
pub mod writer;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::PathBuf,
};

use aya::{Ebpf, maps::MapError, programs::ProgramError};
use proxy_common::maps as names;

pub(crate) use self::maps::table_entry as maglev_table_entry;
pub use self::{
    attacher::{Attach, Attacher, Schedule},
    bpffs::{ensure_bpffs, find_cgroup2_mount},
    interfaces::{Unattached, UnattachedInterface},
    links::{PinnedLink, cleanup, pinned_links},
    load::Upgrade,
    maps::{AyaMaps, WriteError},
};
pub use crate::sys::net::netns_cookie;

/// Errors of loading, attaching and pinning.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The bpffs root could not be prepared.
    #[error("bpffs at {path}: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    /// The object did not load (verifier, missing BTF, permissions).
    #[error("loading the BPF object failed (are you root with CAP_BPF and CAP_SYS_ADMIN?): {0}")]
    Load(#[from] aya::EbpfError),
    /// A program did not load or attach.
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    /// The cgroup could not be opened.
    #[error("cgroup {path}: {source} (pass --cgroup-path with a cgroup v2 directory)")]
    Cgroup { path: PathBuf, source: io::Error },
    /// A link could not be pinned or replaced.
    #[error("pinning link {path}: {detail}")]
    Pin { path: PathBuf, detail: String },
    /// A map is missing from the object or has the wrong type.
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    /// A pinned map could not be opened or read (the OS error says why: `EPERM` without
    /// CAP_BPF, `ENOENT` when the agent never ran with this `--bpf-root`).
    #[error("map {name}: {source}")]
    Pinned { name: &'static str, source: crate::sys::bpf::BpfError },
    /// The interfaces could not be listed.
    #[error("listing the interfaces: {0}")]
    Interfaces(io::Error),
    /// Carrying state over to a new map layout failed.
    #[error("upgrading the map layout: {0}")]
    Upgrade(String),
}

/// Where and how to load the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory for the pins (`--bpf-root`).
    pub bpf_root: PathBuf,
    /// cgroup v2 directory for the socket programs (`--cgroup-path`).
    pub cgroup: PathBuf,
    /// Size of the `services` map.
    pub services_max: u32,
    /// Size of the `backends` map.
    pub backends_max: u32,
    /// Size of the `affinity` map.
    pub affinity_max: u32,
    /// Size of the `conntrack` map.
    pub conntrack_max: u32,
    /// `--bpf-lb-sock-hostns-only`: the socket programs translate only for the host network
    /// namespace's sockets, and TC on the pod-facing interfaces translates pods' traffic.
    pub sock_hostns_only: bool,
    /// `--preallocate-bpf-maps`: the maps only the agent writes (`services`, `backends`,
    /// `service_names`) are preallocated: inserts ~3× faster, their whole size in kernel
    /// memory from the start.
    pub preallocate: bool,
}

impl LoadOptions {
    /// The size of every map the flags size (`names::size_flag`), directly or derived: the
    /// others are fixed-size arrays. No map keeps a size of its own that no flag lifts.
    pub fn map_sizes(&self) -> BTreeMap<&'static str, u32> {
        BTreeMap::from([
            (names::SERVICES, self.services_max),
            (names::SERVICE_NAMES, names::service_names_max_entries(self.services_max)),
            (names::SOURCE_RANGES, names::source_ranges_max_entries(self.services_max)),
            (names::MAGLEV, names::maglev_max_entries(self.services_max)),
            (names::BACKENDS, self.backends_max),
            (names::AFFINITY, self.affinity_max),
            (names::CONNTRACK, self.conntrack_max),
            (names::SOCK_REV, names::sock_max_entries(self.conntrack_max)),
            (names::SOCK_BACKEND, names::sock_max_entries(self.conntrack_max)),
            (names::FRAGMENTS, names::fragments_max_entries(self.conntrack_max)),
            (names::DSR, names::dsr_max_entries(self.conntrack_max)),
        ])
    }
}

/// The loaded and attached datapath. Links are pinned, so the programs stay attached when the
/// agent exits (traffic keeps flowing) until `--cleanup` removes the pins.
pub struct Datapath {
    ebpf: Ebpf,
    root: PathBuf,
    /// The cgroup the socket programs attach to.
    cgroup: PathBuf,
    /// Interfaces the TC ingress program is attached to (by this agent).
    interfaces: BTreeSet<String>,
    /// Interfaces the TC egress program is attached to (by this agent).
    egress_interfaces: BTreeSet<String>,
    /// Interfaces that should carry a TC program and do not (shared with `/healthz`).
    unattached: Unattached,
    /// Pinned maps being replaced by new ones (see [`layout`]): nothing is attached until
    /// [`Datapath::finish_upgrade`].
    replacing: Vec<&'static str>,
    /// `--bpf-lb-sock-hostns-only` ([`LoadOptions::sock_hostns_only`]).
    sock_hostns_only: bool,
    /// The ifindexes last written to the `pod_interfaces` map.
    pod_interfaces: BTreeSet<u32>,
}

/// For tests of code that reads pinned maps: the object's maps, created and pinned without any
/// program, under a scratch directory of the bpffs that is removed on drop.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    use aya::EbpfLoader;
    use proxy_common::maps;

    /// The object's maps pinned under a scratch bpffs directory; removed on drop.
    pub struct PinnedMaps {
        root: PathBuf,
        // Holds the maps' descriptors until the pins are removed.
        _ebpf: aya::Ebpf,
    }

    impl PinnedMaps {
        /// The maps pinned under `/sys/fs/bpf/proxy-unit-<name>-<pid>`, `conntrack` with room for
        /// `conntrack_max` entries.
        pub fn new(name: &str, conntrack_max: u32) -> Self {
            Self::sized(name, conntrack_max, None)
        }

        /// [`PinnedMaps::new`] with room for `services_max` `services` entries (the object's
        /// default when `None`).
        pub fn sized(name: &str, conntrack_max: u32, services_max: Option<u32>) -> Self {
            let root = PathBuf::from(format!("/sys/fs/bpf/proxy-unit-{name}-{}", std::process::id()));
            let _ = super::cleanup(&root);
            super::ensure_bpffs(&root).expect("a bpffs directory (run as root)");
            let mut loader = EbpfLoader::new();
            let pins: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|m| (*m, root.join(m))).collect();
            for (map, path) in &pins {
                loader.map_pin_path(map, path.as_path());
            }
            loader.map_max_entries(maps::CONNTRACK, conntrack_max);
            if let Some(services_max) = services_max {
                loader.map_max_entries(maps::SERVICES, services_max);
            }
            let ebpf = loader.load(super::load::OBJECT).expect("creating the object's maps");
            Self { root, _ebpf: ebpf }
        }

        /// Where the maps are pinned.
        pub fn root(&self) -> &Path {
            &self.root
        }
    }

    impl Drop for PinnedMaps {
        fn drop(&mut self) {
            let _ = super::cleanup(&self.root);
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use proxy_common::maps as names;

    use super::LoadOptions;

    fn options(services_max: u32, conntrack_max: u32) -> LoadOptions {
        LoadOptions {
            bpf_root: PathBuf::new(),
            cgroup: PathBuf::new(),
            services_max,
            backends_max: 7,
            affinity_max: 5,
            conntrack_max,
            sock_hostns_only: false,
            preallocate: false,
        }
    }

    /// Issue 15: `service_names` was fixed at 65 536 entries, so at 100 000 services a third
    /// were refused whatever --services-map-size said.
    #[test]
    fn service_names_follows_the_services_map_past_the_old_fixed_size() {
        let sizes = options(2_097_152, 1024).map_sizes();
        assert_eq!(sizes[names::SERVICE_NAMES], 2_097_152);
        assert_eq!(sizes[names::SOURCE_RANGES], 2_097_152);
        assert_eq!(sizes[names::MAGLEV], 2_097_152, "a table per service port at most");
        assert_eq!(options(12, 1024).map_sizes()[names::SERVICE_NAMES], 12);
    }

    #[test]
    fn every_map_a_flag_sizes_gets_its_size_from_the_flags() {
        let sizes = options(100, 64).map_sizes();
        for map in names::ALL {
            assert_eq!(sizes.contains_key(map), names::size_flag(map).is_some(), "{map}");
        }
        let got = [names::BACKENDS, names::AFFINITY, names::CONNTRACK, names::SOCK_REV, names::SOCK_BACKEND]
            .map(|m| sizes[m]);
        assert_eq!(got, [7, 5, 64, 32, 32]);
        assert_eq!(sizes[names::FRAGMENTS], 2);
    }
}
