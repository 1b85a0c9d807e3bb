//! What the kernel says about our pins, for `/metrics` and `/healthz`: the links (checked in
//! [`crate::datapath::pinned_links`]) and how full each pinned map is.
//!
//! Counting a map's entries means reading the whole map: the kernel keeps a count for hash maps
//! but gives it to no system call (`struct bpf_map_info` has no such field; the
//! `bpf_map_sum_elem_count()` kfunc of Linux 6.6 is for BPF programs such as a map iterator).
//! So a scrape does not count: [`MapFills`] counts every map on a slow timer, in batches
//! ([`PinnedMap::count`]: about one `bpf()` call per 4096 entries, where walking key by key took
//! one per entry, ~260 000 per scrape with a full conntrack map), and a scrape reads the last
//! counts, whatever the maps hold.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use proxy_common::maps;
use tracing::{debug, warn};

pub use crate::{
    datapath::{PinnedLink, pinned_links},
    sys::bpf::{Attachment, LinkInfo},
};
use crate::{metrics::Metrics, sys::bpf::PinnedMap};

/// A pinned map's entry count and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// Entries the kernel holds (for an array: its size).
    pub entries: u64,
    /// `max_entries`.
    pub max_entries: u64,
}

#[derive(Default)]
struct Counts {
    fills: BTreeMap<&'static str, MapFill>,
    /// The last error per map, logged when it changes.
    errors: BTreeMap<&'static str, String>,
}

/// The fill of every pinned map under a bpf root, as last counted. Cheap to clone; clones share.
#[derive(Clone)]
pub struct MapFills {
    root: PathBuf,
    counts: Arc<Mutex<Counts>>,
}

impl MapFills {
    /// Nothing counted yet for the maps pinned under `root`.
    pub fn new(root: PathBuf) -> Self {
        Self { root, counts: Arc::default() }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts every pinned map now: a read of each map, in batches. A map that cannot be read
    /// keeps its last count; its error is logged when it changes.
    pub fn refresh(&self) {
        for name in maps::ALL {
            let fill = PinnedMap::open(&self.root.join(name)).and_then(|map| {
                let max_entries = u64::from(map.info().max_entries);
                // A ring buffer has no entries to count (its size is in bytes).
                let entries = if *name == maps::TRACE_EVENTS { 0 } else { map.count()?.min(max_entries) };
                Ok(MapFill { entries, max_entries })
            });
            let mut counts = self.counts();
            match fill {
                Ok(fill) => {
                    counts.fills.insert(name, fill);
                    counts.errors.remove(name);
                }
                Err(error) => {
                    let error = error.to_string();
                    if counts.errors.get(name) != Some(&error) {
                        warn!(map = name, error, "counting the entries of a map failed");
                    } else {
                        debug!(map = name, error, "counting the entries of a map failed again");
                    }
                    counts.errors.insert(name, error);
                }
            }
        }
    }

    /// Counts every map now and then every `period`, on a thread of its own, for as long as
    /// the process runs.
    pub fn refresh_every(&self, period: Duration) -> std::io::Result<()> {
        let fills = self.clone();
        std::thread::Builder::new().name("map-fill".into()).spawn(move || {
            loop {
                fills.refresh();
                std::thread::sleep(period);
            }
        })?;
        Ok(())
    }

    /// Puts the last counts into `metrics`: no system call.
    pub fn report(&self, metrics: &Metrics) {
        for (name, fill) in &self.counts().fills {
            metrics.map_filled(name, fill.entries, fill.max_entries);
        }
    }

    /// The last count of map `name`.
    pub fn get(&self, name: &str) -> Option<MapFill> {
        self.counts().fills.get(name).copied()
    }
}
