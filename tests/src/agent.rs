//! The agent under test, as a real process with its own bpffs root; killed by PID and cleaned
//! up (links detached, pins removed) on drop.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use proxy_agent::datapath::AyaMaps;
use proxy_common::service::ServiceKey;

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    bpf_root: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts `bin` with `--bpf-root` (a fresh directory under /sys/fs/bpf), `--cgroup-path
    /// cgroup` and `extra` flags, and waits until its first sync is done.
    pub fn start(bin: &Path, cgroup: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bpf_root = PathBuf::from(format!("/sys/fs/bpf/proxy-test-{}-{n}", std::process::id()));
        let log = std::env::temp_dir().join(format!("proxy-agent-{}-{n}.log", std::process::id()));
        let mut agent = Self { child: None, bpf_root, log };
        agent.spawn(bin, cgroup, extra)?;
        agent.wait_for_log("synced", Duration::from_secs(20))?;
        Ok(agent)
    }

    fn spawn(&mut self, bin: &Path, cgroup: &Path, extra: &[&str]) -> anyhow::Result<()> {
        let log = fs::File::create(&self.log).with_context(|| format!("creating {}", self.log.display()))?;
        let child = Command::new(bin)
            .arg("--bpf-root")
            .arg(&self.bpf_root)
            .arg("--cgroup-path")
            .arg(cgroup)
            .args(extra)
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// The agent's bpffs root.
    pub fn bpf_root(&self) -> &Path {
        &self.bpf_root
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; fails with the log if the agent exits or time runs out.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("the agent exited ({status}) before logging {needle:?}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("the agent did not log {needle:?} within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's pinned maps.
    pub fn maps(&self) -> anyhow::Result<AyaMaps> {
        Ok(AyaMaps::from_pins(&self.bpf_root)?)
    }

    /// The backend count of the master entry for a TCP frontend, if present.
    pub fn count(&self, address: Ipv4Addr, port: u16) -> anyhow::Result<Option<u16>> {
        let key = ServiceKey::master(address.octets(), port, proxy_common::proto::TCP);
        Ok(self.maps()?.services().find(|(k, _)| *k == key).map(|(_, v)| v.count))
    }

    /// Waits until the frontend's master entry has `count` backends (`None`: is absent).
    pub fn wait_for_count(
        &self,
        address: Ipv4Addr,
        port: u16,
        count: Option<u16>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.count(address, port)?;
            if now == count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{address}:{port} has count {now:?}, want {count:?} after {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the agent (SIGKILL, by PID); its pinned programs and maps stay.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        let _ = proxy_agent::datapath::cleanup(&self.bpf_root);
        let _ = fs::remove_file(&self.log);
    }
}
