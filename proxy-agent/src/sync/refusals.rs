//! Services refused because a map write failed (a full map). A refused service is retried on
//! every sync, but logged only when the refusal starts and when it ends: at 100 000 services a
//! line per retry made millions of lines. The metric and the Event still count every retry.

use std::collections::BTreeSet;

/// The services refused now.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    refused: BTreeSet<String>,
    /// Refused services whose writes an open batch holds: whether they fit is known only once
    /// the batch is written, so their refusal ends (or goes on) then, one outcome per sync.
    deferred: BTreeSet<String>,
}

impl Refusals {
    /// Records that `key` was refused; `true` if it was not refused already (a refusal starts).
    pub(crate) fn start(&mut self, key: &str) -> bool {
        self.deferred.remove(key);
        self.refused.insert(key.to_owned())
    }

    /// Records that `key` is programmed or gone; `true` if it was refused (a refusal ends).
    pub(crate) fn end(&mut self, key: &str) -> bool {
        self.deferred.remove(key);
        self.refused.remove(key)
    }

    /// Records that `key`'s writes went into an open batch: if it is refused, its refusal ends
    /// with [`Refusals::end_deferred`] unless the batch refuses it again first.
    pub(crate) fn defer_end(&mut self, key: &str) {
        if self.refused.contains(key) {
            self.deferred.insert(key.to_owned());
        }
    }

    /// The batch is written: ends the refusals it deferred and did not renew; returns those
    /// services.
    pub(crate) fn end_deferred(&mut self) -> Vec<String> {
        let deferred = std::mem::take(&mut self.deferred);
        deferred.into_iter().filter(|key| self.refused.remove(key)).collect()
    }

    /// The services to retry.
    pub(crate) fn services(&self) -> BTreeSet<String> {
        self.refused.clone()
    }

    /// Whether no service is refused.
    pub(crate) fn is_empty(&self) -> bool {
        self.refused.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_starts_once_and_ends_once() {
        let mut refusals = Refusals::default();
        assert!(refusals.start("default/big"), "the first refusal starts one");
        assert!(!refusals.start("default/big"), "a retry refused again is the same refusal");
        assert_eq!(refusals.services(), BTreeSet::from(["default/big".to_owned()]));
        assert!(refusals.end("default/big"), "programmed at last: the refusal ends");
        assert!(!refusals.end("default/big"), "and ends once");
        assert!(refusals.is_empty());
    }

    #[test]
    fn a_refusal_retried_in_a_batch_ends_or_goes_on_once_the_batch_is_written() {
        let mut refusals = Refusals::default();
        refusals.start("default/big");
        refusals.start("default/small");
        refusals.defer_end("default/big");
        refusals.defer_end("default/small");
        refusals.defer_end("default/never-refused");
        assert!(!refusals.start("default/big"), "refused again by the batch: the same refusal");
        assert_eq!(refusals.end_deferred(), ["default/small"], "only the one that fit ends");
        assert_eq!(refusals.services(), BTreeSet::from(["default/big".to_owned()]));
        assert!(refusals.end_deferred().is_empty(), "each deferral ends once");
    }
}
