//! A cgroup v2 directory for test clients, removed on drop. Programs are attached here, never
//! to the root cgroup.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

/// A child cgroup of the cgroup2 mount, named `<prefix>-<pid>-<n>`.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the cgroup.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let mount = proxy_agent::datapath::find_cgroup2_mount().context("this test needs a cgroup v2 mount")?;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = mount.join(format!("{prefix}-{}-{n}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// The cgroup's directory (for `--cgroup-path`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `cgroup.procs` file a process writes to join.
    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Our clients have exited by now; a cgroup empties a moment after its last process exits.
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
