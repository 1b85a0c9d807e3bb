//! `cargo xtask <command>`: the one entry point a person needs. Every command first makes sure
//! the machine has what the project needs (idempotent, cached), then runs cargo.

// The conformance table and its reading, shared with the tests (std only).
#[path = "../../tests/src/conformance.rs"]
mod conformance;
mod kind;
mod previous;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, set up, demo and test the eBPF service proxy")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: apt packages (iproute2, bpftool, ...), the nightly's rust-src,
    /// bpf-linker built against the nightly's LLVM; mount bpffs. Safe to run again.
    Setup,
    /// Build the agent (with its embedded BPF object).
    Build {
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Load-balance the example ClusterIP service between pods in network namespaces (root).
    Demo {
        /// Directory of manifests to serve (default: examples/).
        #[arg(long)]
        manifests: Option<PathBuf>,
    },
    /// Benchmark the datapath side by side with kube-proxy's iptables and nftables modes (root):
    /// new-connection latency, programming time, TC per-packet cost against a C floor, agent
    /// memory and CPU, NodePort throughput. Prints progress and tables, writes
    /// target/bench/results.json, and BENCHMARKS.md (with BENCHMARKS.svg) after a full run.
    Bench {
        /// The small version (N = 1 and 1 000, fewer repetitions, under three minutes); its
        /// report goes to target/bench/ instead of BENCHMARKS.md.
        #[arg(long, conflicts_with = "scale")]
        quick: bool,
        /// Instead: ours alone at N services × 10 distinct endpoints (bench_scale, e.g. 100000),
        /// from a manifest directory and from the test API server; updates that size's rows and
        /// section ("At N services") of BENCHMARKS.md.
        #[arg(long, value_name = "N")]
        scale: Option<usize>,
    },
    /// Run the agent on a kind cluster without kube-proxy: create (or reuse) it, build and load
    /// the image, apply deploy/, deploy the sample and check it from a pod and via the nodePort.
    /// Needs docker, kind and kubectl.
    Run {
        /// Print every command and manifest; run nothing.
        #[arg(long)]
        dry_run: bool,
        /// The kind cluster's name.
        #[arg(long, default_value = "proxy")]
        name: String,
    },
    /// Reproduce the upstream Kubernetes e2e tests of the service datapath (root): run the tests
    /// of every row of docs/behaviours.md (the table is tests/src/conformance.rs), print the
    /// table with "N of 101 pass" and write it to CONFORMANCE.md. Fails if a test that is not a
    /// known failure (`#[ignore = "..."]`) fails.
    Conformance {
        /// Shorten the session-affinity timeout rows (4 s instead of upstream's 125 s); the
        /// table goes to target/conformance/ instead of CONFORMANCE.md.
        #[arg(long)]
        quick: bool,
    },
    /// Build (once, cached by commit under target/previous-agent/) the agent of the last commit
    /// with the previous map layout, which the reliability suite's upgrade test starts from, and
    /// print the variable that names it (`PROXY_PREVIOUS_AGENT=...`) for `cargo test` by hand.
    PreviousAgent,
    /// Run every check and test: fmt, clippy -D warnings, unit tests, real-kernel end-to-end
    /// tests (the conformance rows in their quick mode), then `bench --quick` to prove the
    /// benchmark runs (root; timings are not judged).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter; then `bench --quick` is skipped).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match cli.command {
        Cmd::Setup => setup::ensure(),
        Cmd::Build { release } => {
            setup::ensure()?;
            let mut args = vec!["build", "--package", "proxy-agent"];
            if release {
                args.push("--release");
            }
            cargo(&args)
        }
        Cmd::Demo { manifests } => {
            setup::ensure()?;
            setup::require_root("the demo creates network namespaces and attaches BPF programs")?;
            cargo(&["build", "--package", "proxy-tests", "--bins"])?;
            let mut demo = Command::new(root.join("target/debug/demo"));
            if let Some(dir) = manifests {
                demo.arg(dir);
            }
            run(&mut demo)
        }
        Cmd::Bench { scale: Some(n), .. } => bench_scale(&root, n),
        Cmd::Bench { quick, scale: None } => bench(&root, quick),
        Cmd::Conformance { quick } => run_conformance(&root, quick),
        Cmd::PreviousAgent => {
            setup::ensure()?;
            println!("{}={}", previous::ENV, previous::agent(&root)?.display());
            Ok(())
        }
        Cmd::Run { dry_run, name } => kind::run(&root, &kind::Options { dry_run, name }, &mut std::io::stdout()),
        Cmd::Test { args } => {
            setup::ensure()?;
            setup::require_root("the end-to-end tests create network namespaces and attach BPF programs")?;
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
            // The BPF crate for its own target (the host build above compiles none of its
            // code): -D warnings, and a `// SAFETY:` on every unsafe block
            // (clippy::undocumented_unsafe_blocks, denied in proxy-ebpf/src/main.rs).
            let bpf_clippy = ["run", "nightly", "cargo", "clippy", "--package", "proxy-ebpf"];
            let bpf_target = ["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--", "-D", "warnings"];
            run(Command::new("rustup").args(bpf_clippy).args(bpf_target))?;
            let mut test = vec!["test", "--workspace", "--no-fail-fast"];
            test.extend(args.iter().map(String::as_str));
            // The conformance rows in their quick mode (short affinity timeouts); the full suite
            // is `cargo xtask conformance`.
            // The reliability suite upgrades from the previous layout's real agent.
            let previous = previous::agent(&root)?;
            let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            run(Command::new(cargo_bin).args(&test).env(conformance::QUICK_ENV, "1").env(previous::ENV, previous))?;
            // Last: prove the benchmark runs end to end (its timings are reported, never judged).
            if args.is_empty() {
                bench(&root, true)
            } else {
                eprintln!("xtask: a test filter was given; skipping `cargo xtask bench --quick`");
                Ok(())
            }
        }
    }
}

/// The bench binaries of proxy-bench (`bench/src/bin/`), in the order they run; `true`: also in `--quick`.
const BENCHES: &[(&str, bool)] = &[
    ("bench_tc", true),
    ("bench_floor", true),
    ("bench_connect", true),
    ("bench_program", true),
    ("bench_throughput", true),
    ("bench_maglev", true),
    ("bench_dsr", true),
    ("sync_latency", false),
];

/// `cargo xtask bench [--quick]`: builds the bench binaries in release, runs each (progress on
/// the terminal as it goes), collects their JSON into target/bench/results.json, then
/// `bench_report` prints the tables and writes the report: BENCHMARKS.md and BENCHMARKS.svg
/// for a full run, target/bench/ for a quick one (so a quick run never dirties the tree).
fn bench(root: &std::path::Path, quick: bool) -> anyhow::Result<()> {
    setup::ensure()?;
    setup::require_root("the benchmarks load BPF programs and create namespaces")?;
    // The benches start the agent binary found beside them (proxy-tests builds it). `--quick` is
    // CI's smoke run, whose figures go to target/bench only: it builds in the dev profile, whose
    // dependencies the tests have built already (a release build of them alone took ~10 of CI's
    // 27 minutes on 2 cores); the BPF object is built optimised either way.
    let (profile_args, profile_dir): (&[&str], _) = if quick { (&[], "debug") } else { (&["--release"], "release") };
    let mut args = vec!["build"];
    args.extend_from_slice(profile_args);
    args.extend_from_slice(&["--package", "proxy-bench", "--bins", "--package", "proxy-tests", "--bin", "agent"]);
    cargo(&args)?;
    let bin_dir = root.join("target").join(profile_dir);
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let started = std::time::Instant::now();
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for &(bench, in_quick) in BENCHES {
        if quick && !in_quick {
            continue;
        }
        let bin = bin_dir.join(bench);
        eprintln!("xtask: == {bench} ({:.0} s in)", started.elapsed().as_secs_f64());
        let mut command = Command::new(&bin);
        command.arg("--json").env("PATH", setup::path_with_tools()).stderr(std::process::Stdio::inherit());
        if quick {
            command.arg("--quick");
        }
        let out = command.output().with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            eprintln!("xtask: {bench} failed ({})", out.status);
            failed.push(bench);
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let trimmed = text.trim();
        // JSON output is kept as is; a text report is kept as a JSON string.
        let value = if trimmed.starts_with('[') || trimmed.starts_with('{') {
            trimmed.to_owned()
        } else {
            json_string(trimmed)
        };
        results.push(format!("{}: {value}", json_string(bench)));
    }
    let path = out_dir.join("results.json");
    std::fs::write(
        &path,
        format!(
            "{{\"quick\": {quick}, \"seconds\": {:.0}, \"benches\": {{\n{}\n}}}}\n",
            started.elapsed().as_secs_f64(),
            results.join(",\n")
        ),
    )?;
    eprintln!("xtask: wrote {}", path.display());
    let (markdown, svg) = if quick {
        (out_dir.join("BENCHMARKS.md"), out_dir.join("BENCHMARKS.svg"))
    } else {
        (root.join("BENCHMARKS.md"), root.join("BENCHMARKS.svg"))
    };
    run(Command::new(bin_dir.join("bench_report"))
        .arg("--results")
        .arg(&path)
        .arg("--markdown")
        .arg(&markdown)
        .arg("--svg")
        .arg(&svg))?;
    if !failed.is_empty() {
        bail!("benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask bench --scale N`: builds in release, runs `bench_scale --scale N` (progress on
/// the terminal), keeps its JSON in target/bench/scale-N.json, then `bench_report --scale`
/// splices its rows and section into BENCHMARKS.md.
fn bench_scale(root: &std::path::Path, n: usize) -> anyhow::Result<()> {
    setup::ensure()?;
    setup::require_root("the benchmark loads BPF programs and creates namespaces")?;
    cargo(&["build", "--release", "--package", "proxy-bench", "--bins", "--package", "proxy-tests", "--bin", "agent"])?;
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let bin = root.join("target/release/bench_scale");
    let out = Command::new(&bin)
        .args(["--scale", &n.to_string(), "--json"])
        .env("PATH", setup::path_with_tools())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("bench_scale --scale {n} failed ({})", out.status);
    }
    let path = out_dir.join(format!("scale-{n}.json"));
    std::fs::write(&path, &out.stdout).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    run(Command::new(root.join("target/release/bench_report"))
        .arg("--scale")
        .arg(&path)
        .arg("--markdown")
        .arg(root.join("BENCHMARKS.md")))
}

/// `cargo xtask conformance [--quick]`: runs the tests `conformance::ROWS` names in one `cargo
/// test` (known failures too: `--include-ignored`, so the table shows what really happens),
/// judges every row from libtest's reports, prints the table and writes it. It builds into a
/// target directory of its own (target/conformance), so other builds of the workspace cannot
/// swap the agent binary under a running suite. A failure of a test that is not marked as known
/// (`#[ignore = "..."]`) is a regression: the command fails, after writing the table.
fn run_conformance(root: &std::path::Path, quick: bool) -> anyhow::Result<()> {
    use std::io::BufRead as _;

    setup::ensure()?;
    setup::require_root("the conformance tests create network namespaces and attach BPF programs")?;
    let started = std::time::Instant::now();
    let suites = conformance::suites();
    let names: std::collections::BTreeSet<&str> = suites.values().flatten().copied().collect();
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.args(["test", "--package", "proxy-tests", "--no-fail-fast"]);
    for suite in suites.keys() {
        command.args(["--test", suite]);
    }
    command
        .args(["--", "--include-ignored", "--exact"])
        .args(&names)
        .env("CARGO_TARGET_DIR", root.join("target/conformance"))
        .env("PATH", setup::path_with_tools());
    if quick {
        command.env(conformance::QUICK_ENV, "1");
    } else {
        command.env_remove(conformance::QUICK_ENV);
    }
    // cargo's progress (stderr) and the tests' reports (stdout) in one stream, in order: a
    // suite's report follows cargo's `Running tests/<suite>.rs` line.
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    command.stdout(writer.try_clone()?).stderr(writer);
    eprintln!("xtask: {} tests of the suites {:?}, built in target/conformance", names.len(), suites.keys());
    let mut child = command.spawn().with_context(|| format!("running {command:?}"))?;
    // The parent's copies of the pipe's write end must go, or the reader never sees its end.
    drop(command);
    let mut output = String::new();
    for line in std::io::BufReader::new(reader).lines() {
        let line = line?;
        println!("{line}");
        output.push_str(&line);
        output.push('\n');
    }
    let status = child.wait()?;
    let reports = conformance::reports_by_suite(&output);
    let mut outcomes = std::collections::BTreeMap::new();
    let mut known = std::collections::BTreeMap::new();
    for (suite, tests) in &suites {
        let source = std::fs::read_to_string(root.join("tests/tests").join(format!("{suite}.rs"))).unwrap_or_default();
        let parsed = reports.get(*suite).map(|r| conformance::parse_libtest(r)).unwrap_or_default();
        for test in tests {
            let key = format!("{suite}::{test}");
            let outcome = parsed.get(*test).cloned().unwrap_or_else(|| {
                conformance::Outcome::NotRun(if reports.contains_key(*suite) {
                    "not in its suite's report".into()
                } else {
                    format!("its suite did not run: `cargo test` {status}")
                })
            });
            if let Some(reason) = conformance::ignore_reason(&source, test) {
                known.insert(key.clone(), reason);
            }
            outcomes.insert(key, outcome);
        }
    }
    let verdicts: Vec<_> = conformance::ROWS
        .iter()
        .map(|row| (*row, conformance::judge(row, &outcomes, |test| known.get(test).cloned())))
        .collect();
    let date = Command::new("date").args(["-u", "+%Y-%m-%d"]).output().ok();
    let date = date.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let preamble = format!(
        "Written by `cargo xtask conformance{}` on {date} (kernel {}, {:.0} min). Every row of \
         `docs/behaviours.md` (the upstream Kubernetes e2e tests of the service datapath) with the \
         tests that reproduce it here (`suite::test`: a file of `tests/tests/` and a test in it; the \
         table is `tests/src/conformance.rs`) and how they did. {}\n\n\
         *pass*: every test of the row passed. *fail*: a test failed; *known* gives the reason its \
         `#[ignore]` states (known failures run all the same). *missing*: what the row needs that \
         nothing proves yet, a behaviour the datapath lacks or a test (tests that prove part of the \
         row are named). *n/a*: needs DNS, kubelet or a controller's trigger; not counted.",
        if quick { " --quick" } else { "" },
        kernel.trim(),
        started.elapsed().as_secs_f64() / 60.0,
        if quick {
            "Quick mode: the session-affinity timeout rows used a 4 s timeout instead of upstream's 125 s."
        } else {
            "Full mode: the session-affinity timeout rows wait out upstream's 125 s timeout."
        }
    );
    let table = conformance::render(&verdicts, &preamble);
    println!("\n{table}");
    let path = if quick { root.join("target/conformance/CONFORMANCE.md") } else { root.join("CONFORMANCE.md") };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask: {}; wrote {}", conformance::Summary::of(&verdicts).headline(), path.display());
    let regressions: Vec<&String> = outcomes
        .iter()
        .filter(|(test, outcome)| **outcome != conformance::Outcome::Passed && !known.contains_key(*test))
        .map(|(test, _)| test)
        .collect();
    if !regressions.is_empty() {
        bail!("tests that are not known failures failed or did not run: {regressions:?}");
    }
    Ok(())
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The workspace root (this crate's parent).
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// Runs cargo with the tool directories on PATH.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args))
}

/// Runs a command with the tool directories on PATH, failing if it fails.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    command.env("PATH", setup::path_with_tools());
    let status = command.status().with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
