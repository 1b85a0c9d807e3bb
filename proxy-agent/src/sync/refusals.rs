//! Services refused because a map write failed (a full map). A refused service is retried on
//! every sync, but logged only when the refusal starts and when it ends: at 100 000 services a
//! line per retry made millions of lines. The metric and the Event still count every retry.

use std::collections::BTreeSet;

/// The services refused now.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    refused: BTreeSet<String>,
}

impl Refusals {
    /// Records that `key` was refused; `true` if it was not refused already (a refusal starts).
    pub(crate) fn start(&mut self, key: &str) -> bool {
        self.refused.insert(key.to_owned())
    }

    /// Records that `key` is programmed or gone; `true` if it was refused (a refusal ends).
    pub(crate) fn end(&mut self, key: &str) -> bool {
        self.refused.remove(key)
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
}
