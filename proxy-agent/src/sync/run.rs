//! The sync loop: applies the sources' updates as they come, coalesces bursts
//! (`--min-sync-period`), and runs the periodic check (`--sync-period`).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info};

use super::Syncer;
use crate::{datapath::writer::MapStore, source::Update};

/// Runs the sync loop until every source has closed: applies updates as they come, and syncs
/// at most once per `min_sync_period` (the first change of a burst waits at most that long);
/// every `sync_period` checks the maps against what was programmed ([`Syncer::resync`]).
pub async fn run<S: MapStore>(
    mut syncer: Syncer<S>,
    mut updates: mpsc::Receiver<Update>,
    min_sync_period: Duration,
    sync_period: Duration,
) {
    // The first change is applied at once.
    let mut last_sync = Instant::now().checked_sub(min_sync_period).unwrap_or_else(Instant::now);
    let mut resync = tokio::time::interval_at((Instant::now() + sync_period).into(), sync_period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let update = tokio::select! {
            update = updates.recv() => match update {
                Some(update) => update,
                None => return,
            },
            _ = resync.tick() => {
                let started = Instant::now();
                let report = syncer.resync();
                debug!(
                    service_writes = report.writes.service_writes,
                    backend_writes = report.writes.backend_writes,
                    errors = report.errors,
                    took_ms = format_args!("{:.2}", started.elapsed().as_secs_f64() * 1e3),
                    "checked the maps against what was programmed"
                );
                continue;
            }
        };
        syncer.apply(update);
        let deadline = last_sync + min_sync_period;
        loop {
            // Take everything already queued, then wait out the rest of the period.
            while let Ok(update) = updates.try_recv() {
                syncer.apply(update);
            }
            match tokio::time::timeout_at(deadline.into(), updates.recv()).await {
                Ok(Some(update)) => syncer.apply(update),
                Ok(None) | Err(_) => break,
            }
        }
        if !syncer.pending() || !syncer.ready() {
            continue;
        }
        let started = Instant::now();
        let report = syncer.sync();
        last_sync = Instant::now();
        info!(
            services = report.services,
            service_writes = report.writes.service_writes,
            backend_writes = report.writes.backend_writes,
            frontends = report.frontends,
            backends = report.backends,
            skipped = report.skipped,
            errors = report.errors,
            refused = report.refused,
            took_ms = format_args!("{:.2}", started.elapsed().as_secs_f64() * 1e3),
            "synced"
        );
    }
}
