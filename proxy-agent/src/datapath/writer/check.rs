//! The periodic check, a part at a time: each call reads the next ranges of buckets of the
//! three large maps (`services` and `backends`, a million entries each at 100 000 × 10, and
//! `service_names`, which took seconds to read and compare whole) and repairs what it finds
//! there: values changed under the agent are rewritten, entries nobody programmed deleted. A
//! call reads ranges until its time budget is spent: it runs on the sync loop, so a change
//! that arrives meanwhile waits for it. Missing entries cannot be seen in a range: once a
//! round has read every bucket, the entries found are counted against what was programmed,
//! and a shortfall runs the whole [`Writer::restore`] (for names, their whole map). A round
//! this writer wrote during (a sync between two checks) cannot be counted: its missing
//! entries wait for the next round.

use std::time::{Duration, Instant};

use proxy_common::service::ServiceName;
use tracing::debug;

use super::{MapStore, WriteStats, Writer, ids::service_name, reconcile::Repairs};

/// Entries of each large map read at a time: a few milliseconds of reading and comparing (up
/// to ~5 µs an entry when the writer's tables have gone cold in the CPU caches between two
/// checks), so a check ends soon after its budget is spent; [`Writer::restore_names`]'s
/// ranges too. A few in tests, so that their maps are read in several ranges.
pub(super) const STEP: usize = if cfg!(test) { 16 } else { 2_048 };

/// Where a map's reading stands in the current round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Cursor {
    /// Not read yet.
    #[default]
    Start,
    /// Read up to this cursor.
    At(u64),
    /// Read to the end.
    Done,
}

impl Cursor {
    /// Where to read from next, unless the map is read to the end.
    fn next(self) -> Option<Option<u64>> {
        match self {
            Cursor::Start => Some(None),
            Cursor::At(cursor) => Some(Some(cursor)),
            Cursor::Done => None,
        }
    }

    fn after(next: Option<u64>) -> Self {
        next.map_or(Cursor::Done, Cursor::At)
    }
}

/// The current round of the periodic check.
#[derive(Debug, Default)]
pub(super) struct Round {
    services: Cursor,
    backends: Cursor,
    names: Cursor,
    /// Programmed `services` entries found so far.
    found_services: usize,
    /// Programmed `backends` entries found so far.
    found_backends: usize,
    /// `service_names` entries of held service ids found so far.
    found_names: usize,
    /// Checks this round took so far.
    checks: usize,
    /// Whether this writer wrote since the round began: its counts then say nothing.
    pub(super) disturbed: bool,
}

impl Round {
    fn started(&self) -> bool {
        [self.services, self.backends, self.names] != [Cursor::Start; 3]
    }

    fn ended(&self) -> bool {
        [self.services, self.backends, self.names] == [Cursor::Done; 3]
    }
}

impl<S: MapStore> Writer<S> {
    /// One periodic check ([`super::check`]): source ranges whole, then the next ranges of
    /// `service_names`, `backends` and `services`, in turn, until `budget` is spent (at least
    /// one range; `Duration::ZERO`: just that) or the round ends, and at the end of a round the
    /// Maglev tables and the missing entries. Writes in [`Writer::restore`]'s order within what it
    /// read.
    pub fn check(&mut self, budget: Duration) -> Result<WriteStats, S::Error> {
        let started = Instant::now();
        self.settle();
        if !self.round.started() {
            // Writes before the round's first read are in what it reads.
            self.round.disturbed = false;
        }
        self.round.checks += 1;
        let mut stats = WriteStats::default();
        self.restore_ranges()?;
        let (mut names, mut stale_backends) = (Vec::new(), Vec::new());
        // At least one range a check; then as many as the budget allows.
        let spent = |round: &Round, read: bool| round.ended() || (read && started.elapsed() >= budget);
        let mut read = false;
        loop {
            if let Some(from) = self.round.names.next() {
                let (entries, next) = self.store.service_names_from(from, STEP);
                self.round.names = Cursor::after(next);
                names.extend(entries);
                read = true;
            }
            if spent(&self.round, read) {
                break;
            }
            if let Some(from) = self.round.backends.next() {
                let (entries, next) = self.store.backend_entries_from(from, STEP);
                self.round.backends = Cursor::after(next);
                let (found, stale) = self.repair_backends(&entries, &mut stats)?;
                self.round.found_backends += found;
                stale_backends.extend(stale);
                read = true;
            }
            if spent(&self.round, read) {
                break;
            }
            if let Some(from) = self.round.services.next() {
                let (entries, next) = self.store.service_entries_from(from, STEP);
                self.round.services = Cursor::after(next);
                let Repairs { found, slots, masters, stale } = self.compare_services(&entries);
                self.round.found_services += found;
                self.put_services_in_order(slots, masters, &mut stats)?;
                self.delete_unprogrammed(stale, Vec::new(), &mut stats)?;
                read = true;
            }
            if spent(&self.round, read) {
                break;
            }
        }
        self.repair_names(names)?;
        // Only now: a stale slot read above may have named one of them.
        self.delete_unprogrammed(Vec::new(), stale_backends, &mut stats)?;
        if self.round.ended() {
            // Once a round: finding the tables walks the `maglev` map's keys (its millions of
            // buckets even when it holds none), a tenth of a check's time.
            self.restore_maglev()?;
            let round = std::mem::take(&mut self.round);
            debug!(checks = round.checks, disturbed = round.disturbed, "the periodic check read every map entry");
            if !round.disturbed {
                if round.found_names < self.services.ids.len() {
                    self.restore_names()?;
                }
                if round.found_services < self.service_entries_held() || round.found_backends < self.backend_by_id.len()
                {
                    stats += self.restore()?;
                }
            }
        }
        Ok(stats)
    }

    /// Puts back the names among `entries` (read from `service_names`) of held service ids
    /// that differ.
    fn repair_names(&mut self, entries: Vec<(u32, ServiceName)>) -> Result<(), S::Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let programmed = self.services.sorted_by_id();
        let (mut found, mut wrong) = (0, Vec::new());
        for (id, present) in entries {
            let Ok(i) = programmed.binary_search_by_key(&id, |(id, _)| *id) else { continue };
            found += 1;
            let name = service_name(programmed[i].1);
            if present != name {
                wrong.push((id, name));
            }
        }
        self.round.found_names += found;
        wrong.into_iter().try_for_each(|(id, name)| self.store.put_service_name(id, name))
    }
}

#[cfg(test)]
impl<S: MapStore> Writer<S> {
    /// Whether the last check ended a round (or none ran yet).
    pub(super) fn round_ended(&self) -> bool {
        !self.round.started()
    }
}
