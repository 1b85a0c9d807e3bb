//! The agent under test, as a real process with its own bpffs root; killed by PID and cleaned
//! up (links detached, pins removed) on drop. It logs JSON (`--log-format json`), and tests
//! match on a line's message, target and named fields, not on free text.

use std::{
    collections::HashMap,
    ffi::OsString,
    fs,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use proxy_agent::datapath::AyaMaps;
use proxy_common::{addr, service::ServiceKey};
use serde_json::{Map, Value};

use crate::netns::Netns;

/// The counts of one `synced` log line (one sync of the agent's loop).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Services recomputed.
    pub services: usize,
    /// `services` map entries written or deleted.
    pub service_writes: usize,
    /// `backends` map entries written or deleted.
    pub backend_writes: usize,
    /// Frontends programmed after the sync.
    pub frontends: usize,
    /// Distinct backends programmed after the sync.
    pub backends: usize,
    /// Skips found.
    pub skipped: usize,
    /// Failed map operations.
    pub errors: usize,
    /// Services refused for lack of room.
    pub refused: usize,
}

impl Synced {
    /// The counts of a `synced` line; `None` for any other line.
    pub fn from_log(line: &LogLine) -> Option<Self> {
        if line.message != "synced" {
            return None;
        }
        let count = |name: &str| line.field(name).and_then(Value::as_u64).and_then(|n| usize::try_from(n).ok());
        Some(Self {
            services: count("services")?,
            service_writes: count("service_writes")?,
            backend_writes: count("backend_writes")?,
            frontends: count("frontends")?,
            backends: count("backends")?,
            skipped: count("skipped")?,
            errors: count("errors")?,
            refused: count("refused")?,
        })
    }
}

/// One line of the agent's JSON log.
#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    /// The module that logged it (`proxy_agent::sync`).
    pub target: String,
    /// The message.
    pub message: String,
    /// The named fields, without the message.
    pub fields: Map<String, Value>,
}

impl LogLine {
    /// Parses one line as tracing-subscriber's JSON formatter writes it; `None` for anything
    /// else (a line another process wrote, such as `nsenter`'s errors).
    pub fn parse(line: &str) -> Option<Self> {
        let Value::Object(mut object) = serde_json::from_str(line).ok()? else { return None };
        let Some(Value::Object(mut fields)) = object.remove("fields") else { return None };
        let text = |v: Option<Value>| match v {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let message = text(fields.remove("message"))?;
        Some(Self { level: text(object.remove("level"))?, target: text(object.remove("target"))?, message, fields })
    }

    /// A named field.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }

    /// A named field that is a string.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.field(name).and_then(Value::as_str)
    }

    /// Whether the message or a string field contains `needle`.
    pub fn mentions(&self, needle: &str) -> bool {
        self.message.contains(needle) || self.fields.values().filter_map(Value::as_str).any(|v| v.contains(needle))
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    bpf_root: PathBuf,
    log: PathBuf,
    /// The network namespace the agent runs in (a node's), if not the test's own.
    netns: Option<PathBuf>,
    /// A command the agent runs behind (it execs its arguments in place), if any.
    wrapper: Vec<String>,
}

impl Agent {
    /// Starts `bin` with `--bpf-root` (a fresh directory under /sys/fs/bpf), `--cgroup-path
    /// cgroup` and `extra` flags, and waits until its first sync is done.
    pub fn start(bin: &Path, cgroup: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_in(None, bin, cgroup, extra)
    }

    /// The same, with the agent running inside `netns` (a node's namespace: the TC program
    /// attaches to its interfaces), entered with `nsenter --net` so bpffs and cgroup2 stay
    /// visible.
    pub fn start_in(netns: Option<&Netns>, bin: &Path, cgroup: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut agent = Self::launch(netns, &[], bin, cgroup, extra)?;
        agent.wait_for_sync(0, |_| true, Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Starts `bin` as [`Agent::start_in`] does, behind `wrapper` (a command that execs its
    /// arguments in place, such as `unshare --uts`), and waits for nothing: for tests of how the
    /// agent stops.
    pub fn launch(
        netns: Option<&Netns>,
        wrapper: &[&str],
        bin: &Path,
        cgroup: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bpf_root = PathBuf::from(format!("/sys/fs/bpf/proxy-test-{}-{n}", std::process::id()));
        let log = std::env::temp_dir().join(format!("proxy-agent-{}-{n}.log", std::process::id()));
        let netns = netns.map(Netns::path);
        let wrapper = wrapper.iter().map(ToString::to_string).collect();
        let mut agent = Self { child: None, bpf_root, log, netns, wrapper };
        agent.spawn(bin, cgroup, extra)?;
        Ok(agent)
    }

    fn spawn(&mut self, bin: &Path, cgroup: &Path, extra: &[&str]) -> anyhow::Result<()> {
        let log = fs::File::create(&self.log).with_context(|| format!("creating {}", self.log.display()))?;
        // nsenter (without --fork) and the wrapper exec in place: the child is the agent.
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["nsenter".into(), format!("--net={}", ns.display()).into()]);
        }
        argv.extend(self.wrapper.iter().map(OsString::from));
        argv.push(bin.into());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        let child = command
            .arg("--bpf-root")
            .arg(&self.bpf_root)
            .arg("--cgroup-path")
            .arg(cgroup)
            .args(["--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "debug")
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

    /// Runs `bin <args> --bpf-root ROOT -o json` (an `inspect` or `explain` subcommand) against
    /// this agent's pins and parses its output; panics with stderr or stdout when it fails.
    pub fn cli_json(&self, bin: impl AsRef<Path>, args: &[&str]) -> Value {
        let out = Command::new(bin.as_ref())
            .args(args)
            .arg("--bpf-root")
            .arg(&self.bpf_root)
            .args(["-o", "json"])
            .output()
            .expect("running proxy-agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "proxy-agent {args:?} failed: {stderr}");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("proxy-agent {args:?} printed no JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// The agent's log so far, as written (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's log lines so far, oldest first.
    pub fn lines(&self) -> Vec<LogLine> {
        self.log().lines().filter_map(LogLine::parse).collect()
    }

    /// Whether a log line so far has a message or string field containing `needle`.
    pub fn mentions(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.mentions(needle))
    }

    /// Waits until a log line's message or string field contains `needle`; fails with the log if
    /// the agent exits or time runs out.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.mentions(needle) {
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
    pub fn count(&self, address: impl Into<IpAddr>, port: u16) -> anyhow::Result<Option<u16>> {
        let key = ServiceKey::master(addr::from_ip(address), port, proxy_common::proto::TCP);
        Ok(self.maps()?.services().find(|(k, _)| *k == key).map(|(_, v)| v.count))
    }

    /// Waits until the frontend's master entry has `count` backends (`None`: is absent).
    pub fn wait_for_count(
        &self,
        address: impl Into<IpAddr>,
        port: u16,
        count: Option<u16>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let address = address.into();
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

    /// Kills the agent and starts `bin` again on the same bpffs root (the new agent adopts the
    /// pinned maps and links), with a fresh log; does not wait for anything.
    pub fn restart(&mut self, bin: &Path, cgroup: &Path, extra: &[&str]) -> anyhow::Result<()> {
        self.kill();
        self.spawn(bin, cgroup, extra)
    }

    /// Every `synced` line logged so far, oldest first.
    pub fn syncs(&self) -> Vec<Synced> {
        self.lines().iter().filter_map(Synced::from_log).collect()
    }

    /// Waits until the agent exits (at most `timeout`) and returns its exit status.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let Some(child) = self.child.as_mut() else { bail!("the agent is not running") };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the agent did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a `synced` line after the first `after` ones that satisfies `done`, and
    /// returns it; fails with the log if the agent exits or time runs out.
    pub fn wait_for_sync(
        &mut self,
        after: usize,
        done: impl Fn(&Synced) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<Synced> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.syncs().into_iter().skip(after).find(|s| done(s)) {
                return Ok(found);
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!("the agent logged no matching sync within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails with the log if the agent has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("the agent exited ({status}):\n{}", self.log());
        }
        Ok(())
    }

    /// The backends (address and port) in the slots of a TCP frontend's external scope, in slot
    /// order; `None` if the frontend has no master entry.
    pub fn backends_of(&self, address: impl Into<IpAddr>, port: u16) -> anyhow::Result<Option<Vec<SocketAddr>>> {
        let address = address.into();
        let maps = self.maps()?;
        let master = ServiceKey::master(addr::from_ip(address), port, proxy_common::proto::TCP);
        let services: HashMap<ServiceKey, _> = maps.services().collect();
        let Some(value) = services.get(&master) else { return Ok(None) };
        let backends: HashMap<_, _> = maps.backends().collect();
        let mut out = Vec::with_capacity(usize::from(value.count));
        for slot in 1..=value.count {
            let entry =
                services.get(&master.with_slot(slot)).with_context(|| format!("{address}:{port} slot {slot}"))?;
            let backend = backends.get(&entry.backend_id).with_context(|| format!("backend {}", entry.backend_id))?;
            out.push(SocketAddr::new(addr::to_ip(&backend.address), backend.port));
        }
        Ok(Some(out))
    }

    /// Waits until the frontend's slots hold exactly `want` (in any order; `None`: absent).
    pub fn wait_for_backends(
        &self,
        address: impl Into<IpAddr>,
        port: u16,
        want: Option<&[SocketAddrV4]>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let address = address.into();
        let sorted = |v: &mut dyn Iterator<Item = SocketAddr>| {
            let mut v: Vec<SocketAddr> = v.collect();
            v.sort();
            v
        };
        let want = want.map(|w| sorted(&mut w.iter().map(|&a| SocketAddr::from(a))));
        let deadline = Instant::now() + timeout;
        loop {
            // Slots can be mid-rewrite while we read: a read error is retried like a mismatch.
            let now = self.backends_of(address, port);
            if let Ok(now) = &now
                && now.as_ref().map(|n| sorted(&mut n.iter().copied())) == want
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{address}:{port} has backends {now:?}, want {want:?} after {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `<bin> --cleanup` on this agent's root, as an operator would.
    pub fn cleanup(&self, bin: &Path) -> anyhow::Result<()> {
        let out = Command::new(bin).arg("--cleanup").arg("--bpf-root").arg(&self.bpf_root).output()?;
        if !out.status.success() {
            bail!("--cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Stops the agent with SIGTERM, as a rolling update does, and waits (at most `timeout`)
    /// until it has exited; its pinned programs and maps stay. The child is the agent itself:
    /// `nsenter` without `--fork` execs it in place.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else { bail!("the agent is not running") };
        let pid = i32::try_from(child.id()).context("the agent's pid")?;
        // SAFETY: kill sends a signal to the process this handle started, by its PID; the
        // child is not reaped yet, so the PID is still its own.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sending SIGTERM to the agent");
        }
        let deadline = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("the agent did not exit within {timeout:?} of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = None;
        Ok(())
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
