//! The agent of the last commit with the previous map layout, for the reliability suite's
//! upgrade test (`tests/tests/reliability.rs`, `an_upgrade_from_layout_2_under_load_drops_nothing`):
//! its source is taken from git into `target/previous-agent/<commit>/src` and built with this
//! tree's target directory, so the registry crates are reused and only its own crates compile
//! (about two minutes, once); the binary is cached by commit id.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The last commit whose maps have layout 2 (4-byte IPv4 addresses in every map).
pub const COMMIT: &str = "295edb55bfb9e06f76b4bf1eda11da2c624f8af7";
/// The variable that names the binary for the tests.
pub const ENV: &str = "PROXY_PREVIOUS_AGENT";
/// Appended to the old tree's package versions: its crates then have other package ids than
/// this tree's, so sharing the target directory can never mix the two trees' artifacts.
const VERSION_SUFFIX: &str = "-layout2";

/// The previous agent's binary, built first if it is not cached.
pub fn agent(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join("target/previous-agent").join(COMMIT);
    let bin = dir.join("proxy-agent");
    if bin.is_file() {
        return Ok(bin);
    }
    let started = std::time::Instant::now();
    eprintln!("xtask: building the agent of {COMMIT} (layout 2) for the upgrade test, once");
    let src = dir.join("src");
    if src.exists() {
        fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let tar = dir.join("src.tar");
    let archived = Command::new("git")
        .args(["archive", "--format=tar", "-o"])
        .arg(&tar)
        .arg(COMMIT)
        .current_dir(root)
        .status()
        .context("running git archive")?;
    if !archived.success() {
        bail!("git archive {COMMIT} failed: is it in this clone? (a shallow clone: `git fetch --unshallow`)");
    }
    crate::run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&src))?;
    fs::remove_file(&tar)?;
    let manifest = src.join("Cargo.toml");
    let text = fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let text = with_version_suffix(&text)
        .with_context(|| format!("{}: no version in [workspace.package]", manifest.display()))?;
    fs::write(&manifest, text)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(
        Command::new(cargo)
            .args(["build", "--package", "proxy-agent"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", root.join("target")),
    )?;
    // The old build took the shared `target/debug/proxy-agent`: keep its copy, and remove the
    // shared one so nothing runs the old agent by that name (this tree's next build of the
    // agent puts its own back).
    let built = root.join("target/debug/proxy-agent");
    let partial = dir.join("proxy-agent.partial");
    fs::copy(&built, &partial).with_context(|| format!("copying {}", built.display()))?;
    fs::rename(&partial, &bin)?;
    fs::remove_file(&built)?;
    eprintln!("xtask: built {} in {:.0} s", bin.display(), started.elapsed().as_secs_f64());
    Ok(bin)
}

/// `toml` (a workspace manifest) with [`VERSION_SUFFIX`] on the version of `[workspace.package]`.
fn with_version_suffix(toml: &str) -> Option<String> {
    let mut in_section = false;
    let mut done = false;
    let mut out = String::with_capacity(toml.len() + VERSION_SUFFIX.len());
    for line in toml.lines() {
        if line.starts_with('[') {
            in_section = line.trim() == "[workspace.package]";
        }
        match line.strip_prefix("version = \"").and_then(|rest| rest.strip_suffix('"')) {
            Some(version) if in_section && !done => {
                out.push_str(&format!("version = \"{version}{VERSION_SUFFIX}\""));
                done = true;
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    done.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_workspace_package_version_gets_the_suffix() {
        let toml = "[workspace]\nmembers = []\n\n[workspace.package]\nversion = \"0.1.0\"\n\n[x]\nversion = \"2\"\n";
        let want =
            "[workspace]\nmembers = []\n\n[workspace.package]\nversion = \"0.1.0-layout2\"\n\n[x]\nversion = \"2\"\n";
        assert_eq!(with_version_suffix(toml).as_deref(), Some(want));
        assert_eq!(with_version_suffix("[package]\nversion = \"1\"\n"), None);
    }
}
