//! `proxy-agent inspect drops`: what the datapath dropped or refused, per reason, summed over
//! CPUs (the counters `/metrics` exports as `proxy_datapath_drops_total`).

use std::path::Path;

use proxy_common::maps;

use super::{Format, InspectError, render};
use crate::observe::drops::{self, DropCount, DropsError};

/// Reads the counters pinned under `root` and renders them.
pub fn inspect(root: &Path, format: Format) -> Result<String, InspectError> {
    let path = root.join(maps::DROPS);
    let counts = drops::read(&path).map_err(|e| match e {
        DropsError::Missing { path } => InspectError::MissingMap { name: maps::DROPS, path },
        DropsError::Permission { path } => InspectError::Permission { path },
        other @ DropsError::Map { .. } => InspectError::Drops(other),
    })?;
    Ok(match format {
        Format::Table => table(&counts),
        Format::Json => render::json(&counts),
    })
}

/// A REASON / COUNT table, every reason listed (a zero says that drop did not happen).
fn table(counts: &[DropCount]) -> String {
    let width = counts.iter().map(|c| c.reason.len()).max().unwrap_or(0).max("REASON".len());
    let mut out = format!("{:<width$}  COUNT\n", "REASON");
    for DropCount { reason, count } in counts {
        out.push_str(&format!("{reason:<width$}  {count}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_each_reason_with_its_count() {
        let counts =
            [DropCount { reason: "no_endpoint", count: 0 }, DropCount { reason: "source_range_denied", count: 12 }];
        assert_eq!(table(&counts), "REASON               COUNT\nno_endpoint          0\nsource_range_denied  12\n");
    }
}
