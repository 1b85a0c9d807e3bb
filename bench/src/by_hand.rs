//! Blocks of BENCHMARKS.md entered by hand: figures from runs `cargo xtask bench` does not make
//! (before/after comparisons, a bench that is not rendered yet, profiles). Each sits between
//! [`START`] and [`END`]; a regenerated report keeps them, each at the end of the section it
//! was in, so a full run never loses a measurement written down by hand.

/// Opens a block entered by hand (a Markdown comment: not rendered).
pub const START: &str = "<!-- by hand -->";
/// Closes it.
pub const END: &str = "<!-- end by hand -->";

/// A block of `report` and the `## ` section it is in.
struct Block<'a> {
    section: &'a str,
    text: &'a str,
}

/// The by-hand blocks of `report`, markers included, in order; an unclosed one runs to the end.
fn blocks(report: &str) -> Vec<Block<'_>> {
    let mut out = Vec::new();
    let mut rest = report;
    while let Some(start) = rest.find(START) {
        let end = rest[start..].find(END).map_or(rest.len(), |e| start + e + END.len());
        let before = &report[..report.len() - rest.len() + start];
        let section = before.lines().rev().find_map(|line| line.strip_prefix("## ")).unwrap_or("");
        out.push(Block { section, text: &rest[start..end] });
        rest = &rest[end..];
    }
    out
}

/// `new` (a regenerated report) with the by-hand blocks of `old` it lacks, each at the end of
/// its section, or, when `new` has no such section, in a section of that name before
/// `## Machine` (the end when there is none).
pub fn carry(old: &str, new: &str) -> String {
    let mut out = new.to_owned();
    for block in blocks(old) {
        if out.contains(block.text) {
            continue;
        }
        let heading = format!("\n## {}\n", block.section);
        out = match out.find(&heading) {
            Some(at) => {
                let body = at + heading.len();
                let end = out[body..].find("\n## ").map_or(out.len(), |e| body + e + 1);
                format!("{}\n\n{}\n\n{}", out[..end].trim_end(), block.text, &out[end..])
            }
            None => {
                let at = out.find("\n## Machine\n").map_or(out.len(), |m| m + 1);
                format!("{}## {}\n\n{}\n\n{}", &out[..at], block.section, block.text, &out[at..])
            }
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "# Benchmarks\n\n## 2. Programming time\n\ntable\n\n<!-- by hand -->\n### Before and after\n\
                       figures\n<!-- end by hand -->\n\n## Direct server return\n\n<!-- by hand -->\nDSR rows\n\
                       <!-- end by hand -->\n\n## Machine\n\n- CPU: x\n";
    const NEW: &str =
        "# Benchmarks\n\n## 2. Programming time\n\nnew table\n\n## Tracing\n\nrows\n\n## Machine\n\n- CPU: y\n";

    #[test]
    fn a_regenerated_report_keeps_each_block_in_its_section_or_one_of_its_own() {
        let out = carry(OLD, NEW);
        assert_eq!(
            out,
            "# Benchmarks\n\n## 2. Programming time\n\nnew table\n\n<!-- by hand -->\n### Before and after\nfigures\n\
             <!-- end by hand -->\n\n## Tracing\n\nrows\n\n## Direct server return\n\n<!-- by hand -->\nDSR rows\n\
             <!-- end by hand -->\n\n## Machine\n\n- CPU: y\n"
        );
    }

    #[test]
    fn carrying_twice_adds_nothing_and_a_report_without_blocks_is_unchanged() {
        let once = carry(OLD, NEW);
        assert_eq!(carry(OLD, &once), once);
        assert_eq!(carry(NEW, NEW), NEW);
    }

    #[test]
    fn a_block_in_the_last_section_goes_to_the_end() {
        let old = "## A\n\nx\n\n<!-- by hand -->\nhand\n<!-- end by hand -->\n";
        assert_eq!(
            carry(old, "# B\n\n## A\n\ny\n"),
            "# B\n\n## A\n\ny\n\n<!-- by hand -->\nhand\n<!-- end by hand -->\n\n"
        );
    }
}
