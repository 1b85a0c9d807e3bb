//! Fresh-machine set-up, as docs/toolchain.md describes: idempotent and cached, so a
//! second run installs nothing and rebuilds nothing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run;

/// Debian packages the tests, demo and users need, by the command each provides.
const APT: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("nsenter", "util-linux"),
    ("ethtool", "ethtool"),
    // The benchmark's TC floor: a minimal C program compiled for BPF.
    ("clang", "clang"),
    // A header package has no command: `found` joins an absolute path as that path itself.
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
];

/// The bpf-linker release that builds against the nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}

/// Where cargo installs binaries (bpf-linker lands here; users' PATH usually has it).
fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| home().join(".cargo")).join("bin")
}

/// PATH with cargo's bin directory and the sbin directories (where ip and bpftool live) added.
pub fn path_with_tools() -> std::ffi::OsString {
    let mut dirs = vec![cargo_bin(), PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    dirs.dedup();
    std::env::join_paths(dirs).unwrap_or_default()
}

fn found(program: &str) -> bool {
    std::env::split_paths(&path_with_tools()).any(|dir| dir.join(program).is_file())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).env("PATH", path_with_tools()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with `why` unless running as root.
pub fn require_root(why: &str) -> anyhow::Result<()> {
    if output("id", &["-u"]).as_deref().map(str::trim) != Some("0") {
        bail!("this needs root: {why}. Run it as root (e.g. `sudo -E cargo xtask ...`).");
    }
    Ok(())
}

/// Everything, in order; each step checks before it acts.
pub fn ensure() -> anyhow::Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT.iter().filter(|(cmd, _)| !found(cmd)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    if !found("apt-get") {
        bail!("missing {}; install them with your package manager", missing.join(", "));
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let installed = output("rustup", &["component", "list", "--installed", "--toolchain", "nightly"])
        .context("rustup with a nightly toolchain is needed to build the BPF programs")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must link with the nightly's own libLLVM (docs/toolchain.md): point LLVM_PREFIX at a
/// directory of symlinks into the nightly's sysroot and build it from crates.io once.
fn bpf_linker() -> anyhow::Result<()> {
    let linker = cargo_bin().join("bpf-linker");
    if linker.is_file()
        && output(&linker.to_string_lossy(), &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"]).context("rustc +nightly --print sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let prefix = home().join(".cache/llvm-rust-nightly");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib).with_context(|| format!("creating {}", prefix_lib.display()))?;
    let versioned: Vec<PathBuf> = std::fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .collect();
    let Some(first) = versioned.first() else {
        bail!("no libLLVM.so.*-rust-* in {}: is the nightly toolchain installed?", lib.display());
    };
    for target in &versioned {
        symlink(target, &prefix_lib.join(target.file_name().unwrap_or_default()))?;
    }
    symlink(first, &prefix_lib.join("libLLVM.so"))?;
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)", first.display());
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &prefix))
}

fn symlink(target: &Path, link: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there (as root only; the agent mounts
/// its own root too).
fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")) || require_root("").is_err() {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
