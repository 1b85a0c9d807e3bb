//! Prometheus metrics (`--metrics-bind-address`, `/metrics`), with the `prometheus-client` crate.

use std::{
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::SystemTime,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::model::{IpFamily, SkipReason};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabel {
    family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
    state: &'static str,
}

/// When syncs last succeeded and since when they fail, for `/healthz`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// The end of the last sync without failed map writes.
    pub last_success: Option<SystemTime>,
    /// The end of the first sync of the current run of failing ones (`None` if the last succeeded).
    pub failing_since: Option<SystemTime>,
}

/// The agent's metrics; cheap to clone, shared by every part that counts something.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Mutex<Registry>,
    skipped: Family<ReasonLabel, Counter>,
    sync_duration: Histogram,
    sync_errors: Counter,
    frontends: Family<FamilyLabel, Gauge>,
    backends: Gauge,
    last_sync: Gauge,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    map_fill: Family<MapLabel, Gauge<f64, AtomicU64>>,
    program_links: Family<ProgramLabels, Gauge>,
    interfaces_unattached: Gauge,
    source_up: Family<KindLabel, Gauge>,
    drops: Family<ReasonLabel, Counter>,
    status: Mutex<SyncStatus>,
    /// Since when each kind's watch has failed (absent: it works).
    source_failing: Mutex<std::collections::BTreeMap<String, SystemTime>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("proxy");
        let skipped = Family::<ReasonLabel, Counter>::default();
        registry.register("skipped_objects", "Objects or fields skipped, by reason", skipped.clone());
        let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
        let sync_duration = Histogram::new(buckets);
        registry.register("sync_duration_seconds", "Time to compute and write one sync", sync_duration.clone());
        let sync_errors = Counter::default();
        registry.register("sync_errors", "Map writes that failed", sync_errors.clone());
        let frontends = Family::<FamilyLabel, Gauge>::default();
        registry.register(
            "frontends_programmed",
            "Service frontends in the datapath, by address family (ipv4, ipv6)",
            frontends.clone(),
        );
        let backends = Gauge::default();
        registry.register("backends_programmed", "Distinct backends in the datapath", backends.clone());
        let last_sync = Gauge::default();
        registry.register("last_sync_timestamp_seconds", "Unix time of the last successful sync", last_sync.clone());
        let map_entries = Family::<MapLabel, Gauge>::default();
        registry.register("map_entries", "Entries in each pinned map, as the kernel has them", map_entries.clone());
        let map_capacity = Family::<MapLabel, Gauge>::default();
        registry.register("map_max_entries", "Size of each pinned map", map_capacity.clone());
        let map_fill = Family::<MapLabel, Gauge<f64, AtomicU64>>::default();
        registry.register("map_fill_ratio", "Entries over size of each pinned map", map_fill.clone());
        let program_links = Family::<ProgramLabels, Gauge>::default();
        registry.register(
            "program_links",
            "Pinned program links by program and state (attached: the kernel runs the program where it belongs)",
            program_links.clone(),
        );
        let interfaces_unattached = Gauge::default();
        registry.register(
            "interfaces_unattached",
            "Interfaces that should carry a TC program and do not: attaching failed (see /healthz and the log)",
            interfaces_unattached.clone(),
        );
        let source_up = Family::<KindLabel, Gauge>::default();
        registry.register(
            "source_up",
            "1 while the watch of a kind works, 0 while the API server does not answer it",
            source_up.clone(),
        );
        let drops = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "datapath_drops",
            "Packets and socket calls the datapath dropped or refused, by reason (summed over CPUs)",
            drops.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                skipped,
                sync_duration,
                sync_errors,
                frontends,
                backends,
                last_sync,
                map_entries,
                map_capacity,
                map_fill,
                program_links,
                interfaces_unattached,
                source_up,
                drops,
                status: Mutex::new(SyncStatus::default()),
                source_failing: Mutex::default(),
            }),
        }
    }

    /// Counts one skipped object or field.
    pub fn skipped(&self, reason: SkipReason) {
        self.inner.skipped.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc();
    }

    /// How many skips of `reason` were counted.
    pub fn skipped_count(&self, reason: SkipReason) -> u64 {
        self.inner.skipped.get_or_create(&ReasonLabel { reason: reason.as_str() }).get()
    }

    /// Records one sync; it succeeded if no map write failed (services refused for lack of room
    /// are counted as errors, but leave the sync successful).
    pub fn synced(&self, seconds: f64, report: &crate::sync::SyncReport) {
        self.inner.sync_duration.observe(seconds);
        self.inner.sync_errors.inc_by(report.errors + report.refused);
        for (family, count) in IpFamily::ALL.into_iter().zip(report.frontends_by_family) {
            self.inner.frontends.get_or_create(&FamilyLabel { family: family.as_str() }).set(count as i64);
        }
        self.inner.backends.set(report.backends as i64);
        let now = SystemTime::now();
        let mut status = self.inner.status.lock().unwrap_or_else(|e| e.into_inner());
        if report.errors == 0 {
            status.last_success = Some(now);
            status.failing_since = None;
            let unix = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            self.inner.last_sync.set(unix.as_secs() as i64);
        } else {
            status.failing_since.get_or_insert(now);
        }
    }

    /// When syncs last succeeded and since when they fail.
    pub fn sync_status(&self) -> SyncStatus {
        *self.inner.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records whether the watch of `kind` works: a failure starts (or continues) an outage, an
    /// event ends it.
    pub fn source(&self, kind: &str, up: bool) {
        self.inner.source_up.get_or_create(&KindLabel { kind: kind.to_owned() }).set(i64::from(up));
        let mut failing = self.inner.source_failing.lock().unwrap_or_else(|e| e.into_inner());
        match up {
            true => failing.remove(kind),
            false => Some(*failing.entry(kind.to_owned()).or_insert_with(SystemTime::now)),
        };
    }

    /// The kinds whose watch fails, with since when.
    pub fn source_failing(&self) -> Vec<(String, SystemTime)> {
        let failing = self.inner.source_failing.lock().unwrap_or_else(|e| e.into_inner());
        failing.iter().map(|(kind, since)| (kind.clone(), *since)).collect()
    }

    /// Records how full a pinned map is.
    pub fn map_filled(&self, map: &str, entries: u64, max_entries: u64) {
        let label = MapLabel { map: map.to_owned() };
        self.inner.map_entries.get_or_create(&label).set(entries as i64);
        self.inner.map_capacity.get_or_create(&label).set(max_entries as i64);
        let ratio = if max_entries == 0 { 0.0 } else { entries as f64 / max_entries as f64 };
        self.inner.map_fill.get_or_create(&label).set(ratio);
    }

    /// Replaces the program link counts with `links`: one `(program, attached)` per pinned link.
    pub fn program_links<'a>(&self, links: impl IntoIterator<Item = (&'a str, bool)>) {
        let mut counts: std::collections::BTreeMap<&str, [i64; 2]> = std::collections::BTreeMap::new();
        for (program, attached) in links {
            counts.entry(program).or_default()[usize::from(!attached)] += 1;
        }
        // Both states of every program, so a detached link shows as a change of value, not a
        // new series; links gone for good drop out.
        let family = &self.inner.program_links;
        family.clear();
        for (program, [attached, detached]) in counts {
            for (state, n) in [("attached", attached), ("detached", detached)] {
                family.get_or_create(&ProgramLabels { program: program.to_owned(), state }).set(n);
            }
        }
    }

    /// Sets the drop counters to the kernel's counts (which only grow while the map lives).
    pub fn datapath_drops(&self, counts: &[crate::observe::drops::DropCount]) {
        for count in counts {
            let counter = self.inner.drops.get_or_create(&ReasonLabel { reason: count.reason });
            counter.inner().store(count.count, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Records how many (program, interface) pairs should be attached and are not.
    pub fn interfaces_unattached(&self, count: usize) {
        self.inner.interfaces_unattached.set(count as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.inner.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}
