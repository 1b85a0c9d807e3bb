//! `cargo xtask <command>`: the one entry point a person needs. Every command first makes sure
//! the machine has what the project needs (idempotent, cached), then runs cargo.

mod kind;
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
    /// Measure the datapath (root): per-packet cost of the TC NodePort path with
    /// BPF_PROG_TEST_RUN at 1 and 10 000 services, and the API-event-to-map latency. Prints a
    /// table and writes target/bench/results.json.
    Bench,
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
    /// Run every check and test: fmt, clippy -D warnings, unit tests, real-kernel end-to-end
    /// tests (root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
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
        Cmd::Bench => {
            setup::ensure()?;
            setup::require_root("the benchmarks load BPF programs and create namespaces")?;
            cargo(&["build", "--release", "--package", "proxy-tests", "--bins"])?;
            let out_dir = root.join("target/bench");
            std::fs::create_dir_all(&out_dir)?;
            let mut results = Vec::new();
            for bench in ["bench_tc", "sync_latency"] {
                let bin = root.join("target/release").join(bench);
                if !bin.exists() {
                    continue;
                }
                eprintln!("xtask: running {bench}");
                let out = Command::new(&bin).arg("--json").env("PATH", setup::path_with_tools()).output()?;
                eprint!("{}", String::from_utf8_lossy(&out.stderr));
                if !out.status.success() {
                    bail!("{bench} failed ({})", out.status);
                }
                let text = String::from_utf8_lossy(&out.stdout);
                println!("{bench}:\n{text}");
                let trimmed = text.trim();
                // JSON output is kept as is; a text report is kept as a JSON string.
                let value = if trimmed.starts_with('[') || trimmed.starts_with('{') {
                    trimmed.to_owned()
                } else {
                    json_string(trimmed)
                };
                results.push(format!("{{\"bench\": \"{bench}\", \"results\": {value}}}"));
            }
            let path = out_dir.join("results.json");
            std::fs::write(&path, format!("[{}]\n", results.join(",\n")))?;
            eprintln!("xtask: wrote {}", path.display());
            Ok(())
        }
        Cmd::Run { dry_run, name } => kind::run(&root, &kind::Options { dry_run, name }, &mut std::io::stdout()),
        Cmd::Test { args } => {
            setup::ensure()?;
            setup::require_root("the end-to-end tests create network namespaces and attach BPF programs")?;
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
            let mut test = vec!["test", "--workspace", "--no-fail-fast"];
            test.extend(args.iter().map(String::as_str));
            cargo(&test)
        }
    }
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
