//! Prometheus metrics (`--metrics-bind-address`, `/metrics`), with the `prometheus-client` crate.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::model::SkipReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
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
    frontends: Gauge,
    backends: Gauge,
    last_sync: Gauge,
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
        let frontends = Gauge::default();
        registry.register("frontends_programmed", "Service frontends in the datapath", frontends.clone());
        let backends = Gauge::default();
        registry.register("backends_programmed", "Distinct backends in the datapath", backends.clone());
        let last_sync = Gauge::default();
        registry.register("last_sync_timestamp_seconds", "Unix time of the last successful sync", last_sync.clone());
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                skipped,
                sync_duration,
                sync_errors,
                frontends,
                backends,
                last_sync,
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

    /// Records one sync.
    pub fn synced(&self, seconds: f64, frontends: usize, backends: usize, errors: u64) {
        self.inner.sync_duration.observe(seconds);
        self.inner.sync_errors.inc_by(errors);
        self.inner.frontends.set(frontends as i64);
        self.inner.backends.set(backends as i64);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.inner.last_sync.set(now.as_secs() as i64);
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
