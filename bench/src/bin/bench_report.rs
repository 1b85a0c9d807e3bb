//! The benchmark report: reads target/bench/results.json (written by `cargo xtask bench`), prints
//! the tables and where we stand against issue 7's targets, and writes the Markdown report with
//! the machine's description and one SVG chart (via-ClusterIP ÷ direct latency against N, for
//! the three datapaths), drawn with plotters.
//!
//! `bench_report --results PATH --markdown PATH --svg PATH`; run by `cargo xtask bench`.
//! `bench_report --scale PATH --markdown PATH` adds one scale run's rows and section (`cargo
//! xtask bench --scale N`); a full run keeps them.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::Context as _;
use plotters::prelude::*;
use proxy_bench::{by_hand, scale_report};
use serde_json::Value;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_report failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    results: PathBuf,
    markdown: PathBuf,
    svg: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| -> anyhow::Result<PathBuf> {
        let at = args.iter().position(|a| a == flag).with_context(|| format!("missing {flag}"))?;
        args.get(at + 1).map(PathBuf::from).with_context(|| format!("{flag} needs a path"))
    };
    Ok(Args { results: get("--results")?, markdown: get("--markdown")?, svg: get("--svg")? })
}

// ---------------------------------------------------------------------------------------------
// Reading the results
// ---------------------------------------------------------------------------------------------

fn f(value: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(value, |v, k| v.get(k))?.as_f64()
}

fn rows<'a>(value: &'a Value, path: &[&str]) -> Vec<&'a Value> {
    path.iter()
        .try_fold(value, |v, k| v.get(k))
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn s(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "–".into(), |x| format!("{x:.digits$}"))
}

/// Thousands with a thin separator, as the issue writes N.
fn count(n: f64) -> String {
    let n = n.round() as u64;
    if n < 10_000 {
        return n.to_string();
    }
    format!("{} {:03}", n / 1000, n % 1000)
}

/// A Markdown table.
fn md_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out =
        format!("| {} |\n|{}|\n", header.join(" | "), header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// One of issue 7's targets and where we stand.
struct Target {
    what: String,
    goal: String,
    measured: String,
    met: Option<bool>,
    note: String,
}

fn targets(b: &Value) -> Vec<Target> {
    let mut out = Vec::new();
    // 1. Latency ratio at the largest N.
    let ours: Vec<&Value> =
        rows(b, &["bench_connect", "results"]).into_iter().filter(|r| s(r, "datapath") == "ours").collect();
    if let Some(last) = ours.iter().max_by_key(|r| r.get("services").and_then(Value::as_u64).unwrap_or(0)) {
        let ratio = f(last, &["ratio_p50"]);
        let n = f(last, &["services"]).unwrap_or(0.0);
        out.push(Target {
            what: format!("new connection via ClusterIP ÷ direct (p50), N = {}", count(n)),
            goal: "≤ 1.05".into(),
            measured: num(ratio, 3),
            met: ratio.map(|r| r <= 1.05),
            note: ratio.map_or_else(String::new, |r| {
                // The spread over rounds says how much of a small miss is the machine's noise.
                let rounds: Vec<f64> = rows(last, &["ratios_p50"]).iter().filter_map(|v| v.as_f64()).collect();
                let low = rounds.iter().copied().fold(f64::INFINITY, f64::min);
                let high = rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                match miss(r, 1.05) {
                    m if m.is_empty() || rounds.is_empty() => m,
                    m => format!("{m}; rounds ranged {low:.2}–{high:.2}"),
                }
            }),
        });
    }
    // 2. Full program.
    let full: Vec<&Value> =
        rows(b, &["bench_program", "full_program"]).into_iter().filter(|r| s(r, "datapath") == "ours").collect();
    if let Some(last) = full.iter().max_by_key(|r| r.get("services").and_then(Value::as_u64).unwrap_or(0)) {
        let secs = f(last, &["seconds"]);
        let n = f(last, &["services"]).unwrap_or(0.0);
        out.push(Target {
            what: format!("full program of {} × 10 endpoints (the agent's sync)", count(n)),
            goal: "≤ 0.2 s".into(),
            measured: secs.map_or_else(String::new, |s| format!("{s:.3} s")),
            met: secs.map(|s| s <= 0.2),
            note: secs.map_or_else(String::new, |s| miss(s, 0.2)),
        });
    }
    // 3. One endpoint change.
    if let Some(p99) = f(b, &["bench_program", "endpoint_change", "ours", "p99_ms"]) {
        let n = f(b, &["bench_program", "endpoint_change", "services"]).unwrap_or(0.0);
        out.push(Target {
            what: format!("one endpoint change at N = {} (API write → maps), p99", count(n)),
            goal: "≤ 10 ms".into(),
            measured: format!("{p99:.2} ms"),
            met: Some(p99 <= 10.0),
            note: match f(b, &["bench_program", "endpoint_change", "ours_agent_sync", "p50_ms"]) {
                Some(sync) if p99 > 10.0 => {
                    format!("{}; the agent's own sync of one change takes {sync:.1} ms (p50)", miss(p99, 10.0))
                }
                _ => miss(p99, 10.0),
            },
        });
    }
    // 4. TC per packet against the floor, and flatness.
    let tc = rows(b, &["bench_tc"]);
    let established = |n: u64| {
        tc.iter().find(|r| r.get("services").and_then(Value::as_u64) == Some(n)).and_then(|r| f(r, &["established_ns"]))
    };
    if let (Some(e1), Some(floor)) = (established(1), f(b, &["bench_floor", "dnat_1_ns"])) {
        let ratio = e1 / floor;
        out.push(Target {
            what: "TC NodePort, established flow ÷ minimal C DNAT floor, every repeat a hit (N = 1)".into(),
            goal: "≤ 2×".into(),
            measured: format!("{e1:.0} ns ÷ {floor:.0} ns = {ratio:.2}×"),
            met: Some(ratio <= 2.0),
            note: match f(b, &["bench_floor", "ct_snat_fib_ns"]) {
                Some(ladder) if ratio > 2.0 => {
                    format!("{}; a C program doing the same per-packet work: {ladder:.0} ns", miss(ratio, 2.0))
                }
                _ => miss(ratio, 2.0),
            },
        });
    }
    if let (Some(e1), Some(e10k)) = (established(1), established(10_000)) {
        let ratio = e10k / e1;
        out.push(Target {
            what: "TC NodePort, established flow at N = 10 000 ÷ N = 1".into(),
            goal: "flat (≤ 1.10)".into(),
            measured: format!("{e10k:.0} ns ÷ {e1:.0} ns = {ratio:.2}"),
            met: Some(ratio <= 1.10),
            note: miss(ratio, 1.10),
        });
    }
    // 5. RSS.
    if let Some(peak) = f(b, &["bench_program", "agent", "after_changes", "peak_rss_mib"]) {
        let n = f(b, &["bench_program", "agent", "services"]).unwrap_or(0.0);
        out.push(Target {
            what: format!("agent peak RSS at N = {} × 10, API source (full sync and changes)", count(n)),
            goal: "≤ 64 MiB".into(),
            measured: format!("{peak:.1} MiB"),
            met: Some(peak <= 64.0),
            note: {
                // The manifest-source agent's peak at the smallest and largest N, for scale.
                let ours = |pick: fn(u64, u64) -> bool| {
                    full.iter()
                        .filter(|r| r.get("services").and_then(Value::as_u64).is_some())
                        .reduce(|a, b| {
                            let (x, y) = (a["services"].as_u64().unwrap_or(0), b["services"].as_u64().unwrap_or(0));
                            if pick(x, y) { a } else { b }
                        })
                        .and_then(|r| Some((f(r, &["services"])?, f(r, &["peak_rss_mib"])?)))
                };
                match (miss(peak, 64.0), ours(|x, y| x <= y), ours(|x, y| x >= y)) {
                    (m, Some((n0, low)), Some((n1, high))) if !m.is_empty() => format!(
                        "{m}; from a manifest directory: {low:.1} MiB at N = {}, {high:.1} MiB at N = {} × 10",
                        count(n0),
                        count(n1)
                    ),
                    (m, ..) => m,
                }
            },
        });
    }
    out
}

/// "" when met, else by how much the measurement exceeds the goal.
fn miss(measured: f64, goal: f64) -> String {
    let over = measured / goal;
    match over {
        _ if measured <= goal => String::new(),
        _ if over < 1.5 => format!("{:.0} % over", (over - 1.0) * 100.0),
        _ => format!("{over:.1}× the target"),
    }
}

// ---------------------------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------------------------

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_owned())
        .unwrap_or_else(|| "(not found)".into())
}

fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let dirty = Command::new("git").args(["status", "--porcelain"]).output().is_ok_and(|o| !o.stdout.is_empty());
    vec![
        ("CPU".into(), format!("{model}, {cpus} CPUs")),
        ("memory".into(), format!("{:.1} GiB", mem_kib / 1024.0 / 1024.0)),
        ("kernel".into(), first_line("uname", &["-srvm"])),
        ("iptables".into(), first_line("iptables", &["--version"])),
        ("nftables".into(), first_line("nft", &["--version"])),
        ("bpftool".into(), first_line("bpftool", &["--version"])),
        ("clang".into(), first_line("clang", &["--version"])),
        ("rustc".into(), first_line("rustc", &["--version"])),
        (
            "commit".into(),
            format!(
                "{}{}",
                first_line("git", &["rev-parse", "--short", "HEAD"]),
                if dirty { " with uncommitted changes" } else { "" }
            ),
        ),
        ("date".into(), first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])),
        (
            "load average at the end".into(),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The chart
// ---------------------------------------------------------------------------------------------

/// One datapath's line: its name, colour and (N, ratio) points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn chart(b: &Value, path: &Path) -> anyhow::Result<()> {
    let results = rows(b, &["bench_connect", "results"]);
    let series: Vec<Series> = [
        ("ours", RGBColor(0x1f, 0x77, 0xb4)),
        ("iptables", RGBColor(0xd6, 0x27, 0x28)),
        ("nftables", RGBColor(0x2c, 0xa0, 0x2c)),
    ]
    .into_iter()
    .map(|(name, color)| {
        let mut points: Vec<(f64, f64)> = results
            .iter()
            .filter(|r| s(r, "datapath") == name)
            .filter_map(|r| Some((f(r, &["services"])?, f(r, &["ratio_p50"])?)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        (name, color, points)
    })
    .collect();
    let top = series.iter().flat_map(|s| s.2.iter().map(|p| p.1)).fold(1.1f64, f64::max) * 1.1;
    let x_max = series.iter().flat_map(|s| s.2.iter().map(|p| p.0)).fold(10.0f64, f64::max) * 2.0;
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("New connection via ClusterIP ÷ direct to the pod (p50)", ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d((0.5f64..x_max).log_scale(), 0.9f64..top)?;
    chart
        .configure_mesh()
        .x_desc("services programmed (N, log scale)")
        .y_desc("latency ratio")
        .x_label_formatter(&|x| count(*x))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;
    chart
        .draw_series(DashedLineSeries::new([(0.5, 1.05), (x_max, 1.05)], 6, 4, BLACK.mix(0.6).stroke_width(1)))?
        .label("target ≤ 1.05")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));
    for (name, color, points) in &series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// The sections: (title, text table for the terminal, Markdown body).
fn sections(b: &Value, svg_name: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();

    // 1. Latency.
    let connect = &b["bench_connect"];
    let rs = rows(connect, &["results"]);
    if !rs.is_empty() {
        let header = [
            "datapath",
            "services",
            "direct p50 µs",
            "via VIP mean µs",
            "via VIP p50 µs",
            "via VIP p99 µs",
            "ratio (p50)",
            "direct through the datapath, p50 µs",
        ];
        let table: Vec<Vec<String>> = rs
            .iter()
            .map(|r| {
                vec![
                    s(r, "datapath"),
                    count(f(r, &["services"]).unwrap_or(0.0)),
                    num(f(r, &["direct", "p50_us"]), 1),
                    num(f(r, &["via_vip", "mean_us"]), 1),
                    num(f(r, &["via_vip", "p50_us"]), 1),
                    num(f(r, &["via_vip", "p99_us"]), 1),
                    num(f(r, &["ratio_p50"]), 3),
                    num(f(r, &["direct_from_proxied_client", "p50_us"]), 1),
                ]
            })
            .collect();
        let md = format!(
            "![latency ratio against N]({svg_name})\n\n{}\n{} sequential connections per target and round (connect, one request, answer, close with RST), {} rounds, \
             medians over rounds; the ratio is the via-VIP p50 over the bare client's direct p50, per round, and its median over rounds \
             (`results.json` also has the ratio of means, which single scheduling stalls on a shared machine can swing). \
             The last column is a direct connection from the proxied client: what the datapath costs connections that are not for a service.\n",
            md_table(&header, &table),
            s(connect, "count"),
            s(connect, "rounds"),
        );
        out.push(("1. New-connection latency".into(), bench_table(&header, &table), md));
    }

    // 2. Programming.
    let program = &b["bench_program"];
    let full = rows(program, &["full_program"]);
    if !full.is_empty() {
        let header = ["datapath", "size", "state known → datapath ready", "notes"];
        let table: Vec<Vec<String>> = full
            .iter()
            .map(|r| {
                let notes = if s(r, "datapath") == "ours" {
                    format!(
                        "start → synced {} s (load, read manifests, sync); {} MiB peak RSS, {} ms CPU",
                        num(f(r, &["wall_seconds"]), 3),
                        num(f(r, &["peak_rss_mib"]), 1),
                        num(f(r, &["cpu_ms"]), 0)
                    )
                } else {
                    format!("{} run(s)", s(r, "runs"))
                };
                vec![
                    s(r, "datapath"),
                    format!("{} × 10", count(f(r, &["services"]).unwrap_or(0.0))),
                    if r["timed_out"].as_bool() == Some(true) {
                        format!("> {} s (killed at the timeout)", num(f(r, &["seconds"]), 0))
                    } else {
                        format!("{} s", num(f(r, &["seconds"]), 4))
                    },
                    notes,
                ]
            })
            .collect();
        let change = &program["endpoint_change"];
        let change_header = ["datapath", "changes", "p50 ms", "p99 ms", "max ms"];
        let change_table: Vec<Vec<String>> = [
            ("ours: API write → maps", "ours"),
            ("ours: the agent's sync alone", "ours_agent_sync"),
            ("iptables: partial iptables-restore", "iptables"),
            ("nftables: nft -f transaction", "nftables"),
        ]
        .into_iter()
        .map(|(label, key)| {
            vec![
                label.into(),
                s(&change[key], "n"),
                num(f(change, &[key, "p50_ms"]), 2),
                num(f(change, &[key, "p99_ms"]), 2),
                num(f(change, &[key, "max_ms"]), 2),
            ]
        })
        .collect();
        let n = count(f(change, &["services"]).unwrap_or(0.0));
        let md = format!(
            "Full program of N services × 10 endpoints:\n\n{}\n{FULL_PROGRAM_NOTE}\n\nOne endpoint change at N = {n} × 10:\n\n{}\n{CHANGE_NOTE}\n",
            md_table(&header, &table),
            md_table(&change_header, &change_table)
        );
        let text = format!(
            "{}\none endpoint change at N = {n} × 10\n{}",
            bench_table(&header, &table),
            bench_table(&change_header, &change_table)
        );
        out.push(("2. Programming time".into(), text, md));
    }

    // 3. TC per packet.
    let tc = rows(b, &["bench_tc"]);
    let floor = &b["bench_floor"];
    if !tc.is_empty() || floor.is_object() {
        let header = ["program", "services", "ns/packet"];
        let mut table: Vec<Vec<String>> = Vec::new();
        for r in &tc {
            let n = count(f(r, &["services"]).unwrap_or(0.0));
            table.push(vec!["ours, new flow (conntrack miss)".into(), n.clone(), num(f(r, &["new_flow_ns"]), 0)]);
            table.push(vec!["ours, established (conntrack hit)".into(), n.clone(), num(f(r, &["established_ns"]), 0)]);
            if let Some(v6) = f(r, &["established_v6_ns"]) {
                table.push(vec!["ours, established over IPv6 (conntrack hit)".into(), n.clone(), format!("{v6:.0}")]);
            }
            if let Some(pass) = f(r, &["pass_through_ns"]) {
                table.push(vec!["ours, packet for no frontend (passes)".into(), n, format!("{pass:.0}")]);
            }
        }
        table.push(vec!["C: empty TC program".into(), "–".into(), num(f(floor, &["empty_ns"]), 0)]);
        table.push(vec![
            "C: lookup + DNAT, plain repeats (repeats after the first miss)".into(),
            "1".into(),
            num(f(floor, &["dnat_anchor_method_ns"]), 0),
        ]);
        table.push(vec![
            "C floor: lookup + DNAT, every repeat a hit".into(),
            "1".into(),
            num(f(floor, &["dnat_1_ns"]), 0),
        ]);
        table.push(vec![
            "C floor: lookup + DNAT, every repeat a hit".into(),
            "10 001".into(),
            num(f(floor, &["dnat_10001_ns"]), 0),
        ]);
        table.push(vec!["C: + FIB lookup and redirect".into(), "1".into(), num(f(floor, &["dnat_fib_ns"]), 0)]);
        table.push(vec![
            "C: conntrack (LRU) + backend + DNAT/SNAT + FIB, established".into(),
            "1".into(),
            num(f(floor, &["ct_snat_fib_ns"]), 0),
        ]);
        let md = format!(
            "{}\nBPF_PROG_TEST_RUN on a TCP SYN to the nodePort, in the same run: ours through aya's `TestRun` (`bench_tc`), \
             the C programs through `bpftool prog run ... repeat {}` (`bench_floor`; a minimal `tc_floor.c` plus two rungs). \
             A test run repeats on one buffer, which the first repeat rewrites; run the plain way, later \
             repeats see the translated packet and miss, so that row is mostly a lookup miss. The floor the targets use gives \
             the translated packet an entry back, so every repeat is a hit with a full rewrite (checked after two repeats), as \
             `bench_tc` does for our established flow. The last two rows add, rung by rung, the work a conntrack-based NodePort \
             does for an established flow, written minimally in C.\n",
            md_table(&header, &table),
            s(floor, "repeat")
        );
        out.push(("3. TC NodePort path, per packet".into(), bench_table(&header, &table), md));
    }

    // Tracing: off against on, each measured side by side in one run.
    let connect = rows(b, &["bench_connect", "results"]);
    let traced_connect: Vec<&&Value> =
        connect.iter().filter(|r| r.get("trace_ratio_p50").is_some_and(Value::is_f64)).collect();
    if tc.iter().any(|r| r.get("new_flow_traced_ns").is_some()) || !traced_connect.is_empty() {
        let header = ["what", "services", "off", "on", "on ÷ off"];
        let mut table: Vec<Vec<String>> = Vec::new();
        for r in &tc {
            table.push(vec![
                "TC new flow, ns/packet".into(),
                count(f(r, &["services"]).unwrap_or(0.0)),
                num(f(r, &["new_flow_ns"]), 0),
                num(f(r, &["new_flow_traced_ns"]), 0),
                num(f(r, &["trace_ratio_new_flow"]), 2),
            ]);
        }
        for r in &traced_connect {
            table.push(vec![
                "connect via the ClusterIP, p50 ratio of rounds".into(),
                count(f(r, &["services"]).unwrap_or(0.0)),
                "".into(),
                "".into(),
                num(f(r, &["trace_ratio_p50"]), 2),
            ]);
        }
        let md = format!(
            "{}\nThe programs write `proxy-agent trace` events only while the `trace_on` array holds a time in the future; \
             off, a new flow or a connect pays one array lookup, and established flows and packets for no frontend read no \
             flag (their rows in section 3 are the same with tracing on). On: `bench_tc` sets the flag, drains the ring before \
             each batch of 2 000 new flows (all of whose events fit) and checks one event per flow; `bench_connect` runs a real \
             `proxy-agent trace` reader for the traced rounds, on the same 2 cores as the client and servers.\n",
            md_table(&header, &table)
        );
        out.push(("Tracing".into(), bench_table(&header, &table), md));
    }

    // Maglev: spread, disruption and per-packet cost (`bench_maglev`).
    let maglev = &b["bench_maglev"];
    if maglev.is_object() {
        let header = ["N backends", "M", "flows", "max/min", "max/mean", "moved on 1 removal", "ideal 1/N"];
        let pct = |x: Option<f64>| x.map_or_else(|| "–".to_owned(), |x| format!("{:.2} %", x * 100.0));
        let mut table: Vec<Vec<String>> = rows(maglev, &["spread"])
            .iter()
            .map(|r| {
                vec![
                    count(f(r, &["backends"]).unwrap_or(0.0)),
                    count(f(r, &["table_size"]).unwrap_or(0.0)),
                    num(f(r, &["flows"]), 0),
                    num(f(r, &["max_over_min"]), 3),
                    num(f(r, &["max_over_mean"]), 3),
                    pct(f(r, &["moved_flows_share"])),
                    pct(f(r, &["ideal_share"])),
                ]
            })
            .collect();
        let cost = &maglev["cost"];
        table.push(vec![
            format!("TC new flow, {} backends", count(f(cost, &["backends"]).unwrap_or(0.0))),
            format!("random {} ns", num(f(cost, &["random_new_flow_ns"]), 0)),
            format!("Maglev {} ns", num(f(cost, &["maglev_new_flow_ns"]), 0)),
            format!("×{}", num(f(cost, &["ratio"]), 2)),
            String::new(),
            String::new(),
            String::new(),
        ]);
        let md = format!(
            "{}\n`bench_maglev`: the agent's table for N backends, then distinct 5-tuples hashed with the datapath's flow \
             hash (`proxy_common::maglev`): flows per backend (max ÷ min, max ÷ mean), and the share of the same flows \
             that change backend when one backend leaves (mean over removing each of the first ten). The last row is \
             `BPF_PROG_TEST_RUN` ns/packet for a new flow (a SYN) at a random and at a Maglev nodePort over the same 16 \
             backends, measured side by side in one run (call overhead subtracted, as section 3).\n",
            md_table(&header, &table)
        );
        out.push(("Maglev consistent hashing".into(), bench_table(&header, &table), md));
    }

    // 4. Agent memory and CPU.
    let agent = &program["agent"];
    if agent.is_object() {
        let header = ["agent (API source)", "peak RSS MiB", "RSS MiB", "CPU ms"];
        let n = count(f(agent, &["services"]).unwrap_or(0.0));
        let table = vec![
            vec![
                format!("after the full sync of {n} × 10"),
                num(f(agent, &["after_full_sync", "peak_rss_mib"]), 1),
                num(f(agent, &["after_full_sync", "rss_mib"]), 1),
                num(f(agent, &["after_full_sync", "cpu_ms"]), 0),
            ],
            vec![
                format!("after {} endpoint changes", s(agent, "changes")),
                num(f(agent, &["after_changes", "peak_rss_mib"]), 1),
                num(f(agent, &["after_changes", "rss_mib"]), 1),
                format!(
                    "{} (+{})",
                    num(f(agent, &["after_changes", "cpu_ms"]), 0),
                    num(f(agent, &["changes_cpu_ms"]), 0)
                ),
            ],
        ];
        let md = format!(
            "{}\nVmHWM and VmRSS from /proc/<pid>/status, utime + stime from /proc/<pid>/stat. The CPU of the full sync \
             includes start-up, loading the BPF object and listing every object over HTTP from the test API server.\n",
            md_table(&header, &table)
        );
        out.push(("4. Agent memory and CPU".into(), bench_table(&header, &table), md));
    }

    // 5. Throughput.
    let tput = &b["bench_throughput"];
    let rs = rows(tput, &["results"]);
    if !rs.is_empty() {
        let header = ["datapath", "direct Gbit/s", "via nodePort Gbit/s", "ratio"];
        let table: Vec<Vec<String>> = rs
            .iter()
            .map(|r| {
                vec![
                    s(r, "datapath"),
                    num(f(r, &["direct_gbps"]), 2),
                    num(f(r, &["nodeport_gbps"]), 2),
                    num(f(r, &["ratio"]), 3),
                ]
            })
            .collect();
        let md = format!(
            "{}\nOne TCP stream of {} s per measurement, {} round(s), medians; each ratio against the direct stream measured just \
             before in the same fresh topology.\n",
            md_table(&header, &table),
            s(tput, "seconds"),
            s(tput, "rounds")
        );
        out.push(("5. Throughput of one TCP stream through a NodePort".into(), bench_table(&header, &table), md));
    }

    // sync_latency's own report.
    if let Some(text) = b.get("sync_latency").and_then(Value::as_str) {
        out.push(("Event → map latency (sync_latency)".into(), format!("{text}\n"), format!("```\n{text}\n```\n")));
    }
    out
}

fn bench_table(header: &[&str], rows: &[Vec<String>]) -> String {
    proxy_bench::table(header, rows)
}

const FULL_PROGRAM_NOTE: &str = "Ours: the `took_ms` of the agent's first full sync from a manifest directory (model, \
diff and every map write), median of runs. `iptables`: one complete `iptables-restore` of kube-proxy's ruleset (its jump \
rules included) into a fresh namespace. `iptables --noflush`: kube-proxy's own invocation (jump rules first, then \
`iptables-restore --noflush`), which the iptables-nft backend makes grow much faster than linearly; it is killed at a \
timeout and shown as a lower bound. `nftables`: one `nft -f` transaction of kube-proxy's nftables layout.";

const CHANGE_NOTE: &str = "The measured service's tenth endpoint is replaced, change after change. Ours: the agent \
watches the test API server over HTTP; the clock runs from the API write until the pinned maps serve the new endpoint \
and not the old one; \"the agent's sync alone\" is its own `took_ms` for each change. The peers: kube-proxy's partial \
sync for the same change (KUBE-SERVICES whole plus the changed chains, `--noflush`; an nft transaction with the new \
endpoint chain and the rewritten service chain), as many as fit a time budget.";

const METHOD: &str = "\
- **Where.** Everything runs in network namespaces the bench creates; rules are loaded with `iptables-restore` / \
`nft -f` by a process that entered one of them, never in the machine's root namespace; every namespace, cgroup, pin and \
process is removed at the end, also on failure.
- **The peers' rules** are generated the way kube-proxy writes them (pkg/proxy/iptables and pkg/proxy/nftables): \
KUBE-SERVICES → KUBE-SVC-* (`statistic --mode random`) → KUBE-SEP-* DNAT with KUBE-MARK-MASQ and KUBE-POSTROUTING, plus \
the filter-table jumps, loaded with `iptables-restore` (and with `--noflush`, as kube-proxy calls it, where noted; \
endpoint changes as kube-proxy's partial syncs); and `table ip kube-proxy` with the \
`service-ips` verdict map, per-service chains with `numgen random mod n vmap`, endpoint chains with `dnat`, and the \
filter-side checks, as one `nft -f` transaction. Chain names use a stand-in hash of kube-proxy's length.
- **Ours** is the real agent (the `agent` binary, the same `main` as `proxy-agent`) with a manifest directory of N \
services (or, for endpoint changes and memory, the test API server over HTTP), its socket programs on a cgroup the \
bench made, its TC program on the node namespace's interfaces.
- **Latency.** The probed service is the last of N (2 endpoints each; its endpoints are real servers in two pod \
namespaces). The direct baseline comes from a bare client namespace on the same bridge that passes through no rules \
and no programs, so the ratio does not hide the datapath's cost.
- **Programming time.** Ours: the `took_ms` of the agent's first full sync (model, diff, every map write), with the \
wall time from process start beside it. Peers: one restore / transaction of the whole ruleset in a fresh namespace. \
Endpoint changes: ours from the API write until the pinned maps serve the new endpoint and not the old one; the \
peers' partial syncs as kube-proxy does them (KUBE-SERVICES whole plus the changed chains; an nft transaction with \
the new endpoint chain).
- **Noise.** The machine is shared with other builds and tests; every figure is a median of repetitions, and each \
ratio is taken against a baseline from the same run. Timings are reported, never asserted.
";

/// `bench_report --scale PATH --markdown PATH`: splices one scale run's rows and section into
/// the report.
fn scale(path: &Path, markdown: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let run: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let n = run["services"].as_u64().with_context(|| format!("{} names no services count", path.display()))?;
    let rows = scale_report::rows(&run);
    let section = scale_report::section(&run);
    println!("\n== {}\n{}\n{}", scale_report::title(n), rows.join("\n"), section);
    let old = std::fs::read_to_string(markdown).unwrap_or_default();
    let md = scale_report::splice(&old, &rows, &scale_report::title(n), &section);
    std::fs::write(markdown, md).with_context(|| format!("writing {}", markdown.display()))?;
    eprintln!("bench_report: wrote the {} section of {}", scale_report::title(n), markdown.display());
    Ok(())
}

fn run() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(at) = argv.iter().position(|a| a == "--scale") {
        let markdown = argv.iter().position(|a| a == "--markdown").and_then(|m| argv.get(m + 1));
        let (Some(path), Some(markdown)) = (argv.get(at + 1), markdown) else {
            anyhow::bail!("usage: bench_report --scale PATH --markdown PATH");
        };
        return scale(Path::new(path), Path::new(markdown));
    }
    let args = args()?;
    let text = std::fs::read_to_string(&args.results).with_context(|| format!("reading {}", args.results.display()))?;
    let all: Value = serde_json::from_str(&text).context("parsing the results")?;
    let benches = &all["benches"];
    let quick = all["quick"].as_bool().unwrap_or(false);
    let svg_name = args.svg.file_name().and_then(|n| n.to_str()).unwrap_or("BENCHMARKS.svg").to_owned();
    chart(benches, &args.svg).with_context(|| format!("drawing {}", args.svg.display()))?;
    let sections = sections(benches, &svg_name);
    let targets = targets(benches);
    let target_rows: Vec<Vec<String>> = targets
        .iter()
        .map(|t| {
            let verdict = match t.met {
                Some(true) => "met".to_owned(),
                Some(false) => format!("missed: {}", t.note),
                None => "–".to_owned(),
            };
            vec![t.what.clone(), t.goal.clone(), t.measured.clone(), verdict]
        })
        .collect();
    let target_header = ["target (issue 7)", "goal", "measured", "verdict"];

    // The terminal.
    println!();
    for (title, table, _) in &sections {
        println!("== {title}\n{table}");
    }
    println!("== Targets\n{}", bench_table(&target_header, &target_rows));

    // The Markdown report.
    let mut md = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench{}` ({:.0} s); do not edit by hand. Ours against kube-proxy's iptables and nftables \
         modes on the same machine in the same run.\n",
        if quick { " --quick" } else { "" },
        all["seconds"].as_f64().unwrap_or(0.0)
    );
    md += "## Where we stand\n\n";
    md += &md_table(&target_header, &target_rows);
    md += "\n";
    for (title, _, body) in &sections {
        let _ = writeln!(md, "## {title}\n\n{body}");
    }
    md += "## Machine\n\n";
    for (key, value) in machine() {
        let _ = writeln!(md, "- {key}: {value}");
    }
    md += "\n## How to reproduce\n\n```sh\ncargo xtask bench          # N = 1, 1 000 and 10 000; writes this file and BENCHMARKS.svg\n\
           cargo xtask bench --quick  # N = 1 and 1 000, fewer repetitions, under three minutes; report in target/bench/\n\
           cargo xtask bench --scale 100000  # ours at 100 000 services × 10 (bench_scale); its rows and section here\n```\n\n\
           As root, after the README's set-up (`cargo xtask setup` also installs clang and libbpf-dev for the C floor). \
           Raw figures: `target/bench/results.json`. One binary per measurement in `bench/src/bin/` (`bench_connect`, \
           `bench_program`, `bench_tc`, `bench_floor`, `bench_throughput`, `sync_latency`), each runnable alone with \
           `--quick` and `--json`.\n\n## Method\n\n";
    md += METHOD;
    // Scale runs (`--scale N`) are separate: keep the rows and sections they wrote, and every
    // block entered by hand.
    let old = std::fs::read_to_string(&args.markdown).unwrap_or_default();
    let md = by_hand::carry(&old, &scale_report::carry(&old, &md));
    std::fs::write(&args.markdown, md).with_context(|| format!("writing {}", args.markdown.display()))?;
    eprintln!("bench_report: wrote {} and {}", args.markdown.display(), args.svg.display());
    Ok(())
}
