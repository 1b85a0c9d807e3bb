//! The report of a scale run (`bench_scale`, issue 15): its rows in BENCHMARKS.md's "Where we
//! stand" table, its section "At N services", and how both are spliced into an existing report
//! (a scale run updates its own rows and section and leaves the rest; a full run keeps them).

use std::fmt::Write as _;

use serde_json::Value;

/// Every row of a scale run starts with this (then the size), so that a later run finds and
/// replaces its own rows.
pub const ROW_PREFIX: &str = "| issue 15, ";

/// The goals of issue 15 at `n` services × 10: up to 10 000, the small targets; above, the
/// 100 000 ones.
struct Goals {
    serve_s: f64,
    rss_mib: f64,
    full_sync_ms: Option<f64>,
}

fn goals(n: u64) -> Goals {
    if n <= 10_000 {
        Goals { serve_s: 1.0, rss_mib: 64.0, full_sync_ms: Some(200.0) }
    } else {
        Goals { serve_s: 10.0, rss_mib: 512.0, full_sync_ms: None }
    }
}

/// `n` as the issue writes it: thousands separated by a space from 10 000 on.
pub fn count(n: u64) -> String {
    if n < 10_000 { n.to_string() } else { format!("{} {:03}", n / 1000, n % 1000) }
}

fn get(value: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(value, |v, k| v.get(k))?.as_f64()
}

/// "met", or by how much it missed, or "not measured".
fn verdict(measured: Option<f64>, goal: f64, why_not: &str) -> String {
    match measured {
        None => format!("missed: {why_not}"),
        Some(m) if m <= goal => "met".into(),
        Some(m) if m / goal < 1.5 => format!("missed: {:.0} % over", (m / goal - 1.0) * 100.0),
        Some(m) => format!("missed: {:.1}× the target", m / goal),
    }
}

fn first_problem(run: &Value) -> String {
    run["problems"]
        .as_array()
        .and_then(|p| p.first())
        .and_then(Value::as_str)
        .map_or_else(|| "not measured".into(), |p| p.replace('|', "/"))
}

/// The "Where we stand" rows of one scale run (`bench_scale --json`'s document), as Markdown
/// table lines starting with [`ROW_PREFIX`].
pub fn rows(scale: &Value) -> Vec<String> {
    let n = scale["services"].as_u64().unwrap_or(0);
    let g = goals(n);
    let size = format!("{} × 10", count(n));
    let (manifests, api) = (&scale["manifests"], &scale["api"]);
    let mut out = Vec::new();
    let mut row = |what: String, goal: String, measured: String, verdict: String| {
        out.push(format!("{ROW_PREFIX}{size}: {what} | {goal} | {measured} | {verdict} |"));
    };

    // No hidden cap: both sources served with the default map sizes. Whether a refusal names
    // the right flag is for a reader of the warning (quoted in the section) to judge.
    let served = |r: &Value| get(r, &["serve_seconds"]).is_some() && get(r, &["full_sync_ms"]).is_some();
    let warnings = |r: &Value| r["warnings"].as_u64().unwrap_or(0);
    let all_served = served(manifests) && served(api);
    row(
        "no hidden cap: default map sizes".into(),
        "served with the defaults, or the agent names the flag to raise".into(),
        if all_served {
            "served with the defaults".into()
        } else {
            format!(
                "not all served: {} + {} warnings (manifest directory + API source); see the section",
                warnings(manifests),
                warnings(api)
            )
        },
        if all_served { "met".into() } else { "missed: see the warnings in the section".into() },
    );
    for (source, r) in [("manifest directory", manifests), ("API source (paged lists)", api)] {
        let serve = get(r, &["serve_seconds"]);
        row(
            format!("agent start → last service answers, {source}"),
            format!("≤ {} s", g.serve_s),
            serve.map_or("never".into(), |s| format!("{s:.2} s")),
            verdict(serve, g.serve_s, &first_problem(r)),
        );
    }
    let sync = get(manifests, &["full_sync_ms"]);
    row(
        "full program (first full sync's took_ms), manifest directory".into(),
        g.full_sync_ms.map_or("– (reported)".into(), |ms| format!("≤ {:.1} s", ms / 1e3)),
        sync.map_or("never".into(), |ms| format!("{:.3} s", ms / 1e3)),
        match g.full_sync_ms {
            Some(goal) => verdict(sync, goal, &first_problem(manifests)),
            None => "–".into(),
        },
    );
    let rss = [manifests, api]
        .iter()
        .filter_map(|r| get(r, &["usage", "peak_rss_mib"]))
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    row(
        "agent peak RSS (VmHWM), the larger of both sources".into(),
        format!("≤ {} MiB", g.rss_mib),
        rss.map_or("–".into(), |m| format!("{m:.1} MiB")),
        verdict(rss, g.rss_mib, "not measured"),
    );
    let p99 = get(api, &["endpoint_change_ms", "p99"]);
    row(
        "one endpoint change, API write → pinned map, p99".into(),
        "≤ 10 ms".into(),
        p99.map_or("–".into(), |p| format!("{p:.2} ms")),
        verdict(p99, 10.0, &first_problem(api)),
    );
    let check = get(manifests, &["periodic_check_ms"]);
    row(
        "periodic --sync-period check's took_ms (median of the first checks after the sync)".into(),
        "≤ 100 ms (or incremental)".into(),
        check.map_or("–".into(), |c| match get(manifests, &["periodic_check_max_ms"]) {
            Some(max) => format!("{c:.1} ms (max {max:.1})"),
            None => format!("{c:.1} ms"),
        }),
        verdict(check, 100.0, &first_problem(manifests)),
    );
    let (measured, verdict) = tc_row(&scale["tc"], n);
    row(
        "TC established flow ≤ 2× the C floor, flat to this size".into(),
        "≤ 2×, flat (≤ 1.10)".into(),
        measured,
        verdict,
    );
    out
}

/// The TC row's measured cell and verdict: the established flow at 1 service over the C floor
/// (lookup + DNAT, every repeat a hit) of the same run, and at `n` over at 1.
fn tc_row(tc: &Value, n: u64) -> (String, String) {
    let established = |at: u64| {
        tc["rows"]
            .as_array()?
            .iter()
            .find(|r| r["services"].as_u64() == Some(at))
            .and_then(|r| get(r, &["established_ns"]))
    };
    let (Some(one), Some(at_n), Some(floor)) = (established(1), established(n), get(tc, &["floor", "dnat_1_ns"]))
    else {
        let why = tc["problem"].as_str().unwrap_or("not measured").replace('|', "/");
        return ("–".into(), format!("missed: {why}"));
    };
    let (ratio, flat) = (one / floor, at_n / one);
    let measured = format!("{one:.0} ns ÷ {floor:.0} ns = {ratio:.2}×; at {}: {at_n:.0} ns, ×{flat:.2}", count(n));
    let verdict = match (ratio <= 2.0, flat <= 1.10) {
        (true, true) => "met".into(),
        (false, true) => format!("missed: {:.0} % over 2×, flat", (ratio / 2.0 - 1.0) * 100.0),
        (true, false) => format!("missed: ≤ 2×, but ×{flat:.2} at {}", count(n)),
        (false, false) => format!("missed: {ratio:.2}× and ×{flat:.2} at {}", count(n)),
    };
    (measured, verdict)
}

/// The section title of a scale run at `n`.
pub fn title(n: u64) -> String {
    format!("At {} services", count(n))
}

/// The section "At N services" of one scale run: its table and how it was measured.
pub fn section(scale: &Value) -> String {
    let n = scale["services"].as_u64().unwrap_or(0);
    let mb = scale["manifest_bytes"].as_f64().unwrap_or(0.0) / 1e6;
    let files = scale["manifest_files"].as_u64().unwrap_or(0);
    let ms = |v: Option<f64>| v.map_or("never".to_owned(), |v| format!("{v:.1} ms"));
    let mut body = format!(
        "Written by `cargo xtask bench --scale {n}`: ours only (kube-proxy's rules for this many services take \
         longer than this run may; bench_program times them up to 10 000 × 10, and the peers have no manifest \
         source). {} services × 10 endpoints, every endpoint a distinct address; the agent with its default map \
         sizes; the manifest run with `--sync-period {}` (for the periodic check), the API run with the \
         default period (so that endpoint changes do not queue behind back-to-back checks). Manifest directory: {mb:.0} MB of JSON documents in {files} files. API \
         source: the test API server, which the agent's watchers list in pages (`limit`/`continue`). Load \
         average at the end of the run: {} (two CPUs, shared).\n\n",
        count(n),
        scale["sync_period"].as_str().unwrap_or("?"),
        scale["load_average"].as_str().unwrap_or("?"),
    );
    let mut table = String::from(
        "| source | start → last service answers | first full sync | peak RSS | periodic check | one endpoint change p50 / p99 / max |\n|---|---|---|---|---|---|\n",
    );
    for (what, r) in [("manifest directory", &scale["manifests"]), ("API source", &scale["api"])] {
        let change = match (
            get(r, &["endpoint_change_ms", "p50"]),
            get(r, &["endpoint_change_ms", "p99"]),
            get(r, &["endpoint_change_ms", "max"]),
        ) {
            (Some(a), Some(b), Some(c)) => {
                format!("{a:.2} / {b:.2} / {c:.2} ms ({} changes)", r["endpoint_change_ms"]["n"])
            }
            _ => "–".into(),
        };
        let check = match what {
            "API source" => "– (default period)".to_owned(),
            _ => match get(r, &["periodic_check_max_ms"]) {
                Some(max) => format!("{} (max {max:.1} ms)", ms(get(r, &["periodic_check_ms"]))),
                None => ms(get(r, &["periodic_check_ms"])),
            },
        };
        let _ = writeln!(
            table,
            "| {what} | {} | {} | {} | {check} | {change} |",
            get(r, &["serve_seconds"]).map_or("never".into(), |s| format!("{s:.2} s")),
            ms(get(r, &["full_sync_ms"])),
            get(r, &["usage", "peak_rss_mib"]).map_or("–".into(), |m| format!("{m:.1} MiB")),
        );
    }
    body += &table;
    body += "\n";
    if let Some(lists) = scale["api"]["lists"].as_object() {
        let _ = writeln!(
            body,
            "LIST requests the API source's agent sent (pages of 500 at most): {}.\n",
            lists.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        );
    }
    let (tc, _) = tc_row(&scale["tc"], n);
    if tc != "–" {
        let _ = writeln!(
            body,
            "TC NodePort path, established flow (`bench_tc --sizes 1,{n}` and `bench_floor`, run after the agents: \
             `BPF_PROG_TEST_RUN`, every repeat a conntrack hit, against the minimal C lookup + DNAT): {tc}.\n"
        );
    }
    for (what, r) in [("manifest directory", &scale["manifests"]), ("API source", &scale["api"])] {
        for problem in r["problems"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let _ = writeln!(body, "- {what}: {problem}");
        }
        if let Some(warning) = r["first_warning"].as_str() {
            let warning = warning.split_once(" WARN ").map_or(warning, |(_, m)| m.trim()).replace('`', "'");
            let _ = writeln!(body, "- {what}: {} warnings logged; the first: {warning}", r["warnings"]);
        }
    }
    body += "\nMethod: a client process in the agent's cgroup, in the agent's network namespace, starts before the \
             agent and connects to the last-created service's ClusterIP every millisecond until the pod (a reply \
             server in a namespace holding that service's ten endpoint addresses) answers; the time is from \
             starting the agent to that answer. The first full sync is the sum of the agent's `synced` lines' \
             `took_ms` until every frontend is programmed; the periodic check is the median (and the \
             largest) `took_ms` of the first five `checked the maps` lines after it; peak RSS is VmHWM at the end of the run; an endpoint change is timed from the API \
             write until single lookups of the pinned maps serve the new endpoint and not the old one.\n";
    // Optional lines above leave runs of blank lines.
    while body.contains("\n\n\n") {
        body = body.replace("\n\n\n", "\n\n");
    }
    body
}

/// Puts `rows` (replacing earlier rows of the same size) at the end of the "Where we stand"
/// table and `section` as "## `title`" (replacing one of that title, else before "## Machine"
/// or at the end).
pub fn splice(md: &str, rows: &[String], title: &str, section: &str) -> String {
    let size = rows.first().and_then(|r| r.strip_prefix(ROW_PREFIX)).and_then(|r| r.split_once(':')).map(|(s, _)| s);
    let mut lines: Vec<String> = md.lines().map(str::to_owned).collect();
    lines.retain(|l| size.is_none_or(|size| !l.starts_with(&format!("{ROW_PREFIX}{size}:"))));
    if let Some(header) = lines.iter().position(|l| l == "## Where we stand") {
        // The table's last line: the last `|` line of the first block of them after the header.
        let first = (header..lines.len()).find(|&i| lines[i].starts_with('|'));
        let end =
            first.map(|first| (first..lines.len()).take_while(|&i| lines[i].starts_with('|')).last().unwrap_or(first));
        match end {
            Some(end) => {
                for (k, row) in rows.iter().enumerate() {
                    lines.insert(end + 1 + k, row.clone());
                }
            }
            None => {
                let table = ["| target | goal | measured | verdict |".to_owned(), "|---|---|---|---|".to_owned()];
                let at = header + 1;
                lines.splice(at..at, std::iter::once(String::new()).chain(table).chain(rows.iter().cloned()));
            }
        }
    }
    let mut text = lines.join("\n") + "\n";
    let heading = format!("## {title}\n");
    let new = format!("{heading}\n{}\n", section.trim_end());
    if let Some(start) = text.find(&heading) {
        let end = text[start + heading.len()..].find("\n## ").map_or(text.len(), |e| start + heading.len() + e + 1);
        text.replace_range(start..end, &new);
    } else if let Some(at) = text.find("## Machine\n") {
        text.insert_str(at, &format!("{new}\n"));
    } else {
        text += &format!("\n{new}");
    }
    text
}

/// The scale rows and "At N services" sections of `old` (a report written before), carried into
/// `new` (a freshly written full report), so a full run keeps what scale runs measured.
pub fn carry(old: &str, new: &str) -> String {
    let rows: Vec<String> = old.lines().filter(|l| l.starts_with(ROW_PREFIX)).map(str::to_owned).collect();
    let mut out = new.to_owned();
    let mut sizes: Vec<&str> = Vec::new();
    for row in &rows {
        if let Some((size, _)) = row[ROW_PREFIX.len()..].split_once(':')
            && !sizes.contains(&size)
        {
            sizes.push(size);
        }
    }
    for size in sizes {
        let of_size: Vec<String> =
            rows.iter().filter(|r| r.starts_with(&format!("{ROW_PREFIX}{size}:"))).cloned().collect();
        let n = size.trim_end_matches(" × 10");
        let title = format!("At {n} services");
        let heading = format!("## {title}\n");
        let section = old.find(&heading).map(|start| {
            let body = &old[start + heading.len()..];
            body[..body.find("\n## ").map_or(body.len(), |e| e + 1)].trim().to_owned()
        });
        out = splice(&out, &of_size, &title, section.as_deref().unwrap_or("(section lost)"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "# Benchmarks\n\n## Where we stand\n\n| target | goal | measured | verdict |\n|---|---|---|---|\n\
                          | a | b | c | met |\n\n## Latency\n\ntext\n\n## Machine\n\n- CPU: x\n";

    fn row(size: &str, what: &str) -> String {
        format!("{ROW_PREFIX}{size}: {what} | g | m | met |")
    }

    #[test]
    fn a_scale_run_adds_its_rows_and_section_before_the_machine() {
        let out = splice(REPORT, &[row("10 000 × 10", "x")], "At 10 000 services", "body");
        assert_eq!(
            out,
            "# Benchmarks\n\n## Where we stand\n\n| target | goal | measured | verdict |\n|---|---|---|---|\n\
             | a | b | c | met |\n| issue 15, 10 000 × 10: x | g | m | met |\n\n## Latency\n\ntext\n\n\
             ## At 10 000 services\n\nbody\n\n## Machine\n\n- CPU: x\n"
        );
    }

    #[test]
    fn a_second_run_of_the_same_size_replaces_rows_and_section_and_keeps_other_sizes() {
        let once = splice(REPORT, &[row("10 000 × 10", "old")], "At 10 000 services", "old body");
        let other = splice(&once, &[row("100 000 × 10", "big")], "At 100 000 services", "big body");
        let twice = splice(&other, &[row("10 000 × 10", "new")], "At 10 000 services", "new body");
        assert!(!twice.contains("old"), "{twice}");
        assert_eq!(twice.matches("## At 10 000 services").count(), 1);
        assert!(twice.contains("| issue 15, 100 000 × 10: big |") && twice.contains("big body"), "{twice}");
        assert!(twice.contains("| issue 15, 10 000 × 10: new |") && twice.contains("new body"), "{twice}");
    }

    #[test]
    fn a_full_run_carries_the_scale_rows_and_sections() {
        let scaled = splice(REPORT, &[row("100 000 × 10", "big")], "At 100 000 services", "big body");
        let fresh = REPORT.replace("text", "new text");
        assert_eq!(
            carry(&scaled, &fresh),
            splice(&fresh, &[row("100 000 × 10", "big")], "At 100 000 services", "big body")
        );
    }

    #[test]
    fn the_tc_row_judges_the_floor_ratio_and_flatness_from_the_same_run() {
        let tc = |one: f64, at_n: f64| {
            serde_json::json!({
                "rows": [{"services": 1, "established_ns": one}, {"services": 100_000, "established_ns": at_n}],
                "floor": {"dnat_1_ns": 50.0},
            })
        };
        assert_eq!(
            tc_row(&tc(90.0, 95.0), 100_000),
            ("90 ns ÷ 50 ns = 1.80×; at 100 000: 95 ns, ×1.06".into(), "met".into())
        );
        assert_eq!(tc_row(&tc(120.0, 121.0), 100_000).1, "missed: 20 % over 2×, flat");
        assert_eq!(tc_row(&tc(90.0, 200.0), 100_000).1, "missed: ≤ 2×, but ×2.22 at 100 000");
        assert_eq!(tc_row(&serde_json::json!({"problem": "bench_floor failed"}), 10).1, "missed: bench_floor failed");
    }

    #[test]
    fn rows_judge_each_target_at_its_size() {
        let run = serde_json::json!({
            "services": 100_000,
            "manifests": {"serve_seconds": 4.0, "full_sync_ms": 900.0, "usage": {"peak_rss_mib": 300.0},
                          "periodic_check_ms": 250.0, "problems": []},
            "api": {"serve_seconds": null, "usage": {"peak_rss_mib": 600.0},
                    "problems": ["svc-99999 (10.97.134.160:80) did not answer within 180s"],
                    "first_warning": "WARN service default/svc-1 refused: raise --services-map-size"},
        });
        let rows = rows(&run);
        let verdicts: Vec<&str> = rows.iter().map(|r| r.rsplit(" | ").next().unwrap_or_default()).collect();
        assert_eq!(
            verdicts,
            [
                "missed: see the warnings in the section |",
                "met |",
                "missed: svc-99999 (10.97.134.160:80) did not answer within 180s |",
                "– |",
                "missed: 17 % over |",
                "missed: svc-99999 (10.97.134.160:80) did not answer within 180s |",
                "missed: 2.5× the target |",
                "missed: not measured |",
            ]
        );
    }
}
