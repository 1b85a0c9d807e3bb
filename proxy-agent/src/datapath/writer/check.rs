//! The periodic check, a part at a time: each call reads the next range of buckets of the two
//! large maps (`services` and `backends`, a million entries each at 100 000 × 10, which took
//! seconds to read and compare whole) and repairs what it finds there: values changed under
//! the agent are rewritten, entries nobody programmed deleted. Missing entries cannot be seen
//! in a range: once a round has read every bucket, the entries found are counted against what
//! was programmed, and a shortfall runs the whole [`Writer::restore`]. A round this writer
//! wrote during (a sync between two checks) cannot be counted: its missing entries wait for
//! the next round.

use super::{MapStore, WriteStats, Writer, reconcile::Repairs};

/// Entries of each large map one check reads: at most ~10 checks a round at 100 000 × 10,
/// and a map smaller than this is read whole every time (a round a check).
const CHUNK: usize = 131_072;

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
    /// Programmed `services` entries found so far.
    found_services: usize,
    /// Programmed `backends` entries found so far.
    found_backends: usize,
    /// Whether this writer wrote since the round began: its counts then say nothing.
    pub(super) disturbed: bool,
}

impl<S: MapStore> Writer<S> {
    /// One periodic check ([`super::check`]): names, source ranges and Maglev tables whole, the
    /// next range of `services` and `backends`, and at the end of a round the missing entries.
    /// Writes in [`Writer::restore`]'s order within what it read.
    pub fn check(&mut self) -> Result<WriteStats, S::Error> {
        self.settle();
        if self.round.services == Cursor::Start && self.round.backends == Cursor::Start {
            // Writes before the round's first read are in what it reads.
            self.round.disturbed = false;
        }
        let mut stats = WriteStats::default();
        self.restore_names_and_ranges()?;
        let mut stale_backends = Vec::new();
        if let Some(from) = self.round.backends.next() {
            let (entries, next) = self.store.backend_entries_from(from, CHUNK);
            self.round.backends = Cursor::after(next);
            let (found, stale) = self.repair_backends(&entries, &mut stats)?;
            self.round.found_backends += found;
            stale_backends = stale;
        }
        if let Some(from) = self.round.services.next() {
            let (entries, next) = self.store.service_entries_from(from, CHUNK);
            self.round.services = Cursor::after(next);
            let Repairs { found, slots, masters, stale } = self.compare_services(&entries);
            self.round.found_services += found;
            self.put_services_in_order(slots, masters, &mut stats)?;
            self.delete_unprogrammed(stale, Vec::new(), &mut stats)?;
        }
        // Only now: a stale slot read above may have named one of them.
        self.delete_unprogrammed(Vec::new(), stale_backends, &mut stats)?;
        self.restore_maglev()?;
        if (self.round.services, self.round.backends) == (Cursor::Done, Cursor::Done) {
            let round = std::mem::take(&mut self.round);
            let missing =
                round.found_services < self.service_entries_held() || round.found_backends < self.backend_by_id.len();
            if missing && !round.disturbed {
                stats += self.restore()?;
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
impl<S: MapStore> Writer<S> {
    /// Whether the last check ended a round (or none ran yet).
    pub(super) fn round_ended(&self) -> bool {
        (self.round.services, self.round.backends) == (Cursor::Start, Cursor::Start)
    }
}
