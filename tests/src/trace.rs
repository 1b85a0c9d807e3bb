//! `proxy-agent trace` as a child process: started on a bpffs root, its JSON lines collected,
//! stopped with SIGTERM as Ctrl-C would; killed on drop if a test fails first.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, Map, MapData};
use proxy_common::maps;
use serde_json::Value;

/// A running `proxy-agent trace -o json`.
pub struct Trace {
    child: Child,
    lines: Receiver<String>,
}

impl Trace {
    /// Starts `agent_bin trace -o json --bpf-root root <args>` and waits (up to `wait`) until it
    /// says tracing is on.
    pub fn start(agent_bin: &Path, root: &Path, args: &[&str], wait: Duration) -> anyhow::Result<Self> {
        Self::start_with(agent_bin, root, &["-o", "json"], args, wait)
    }

    /// As [`Trace::start`], in the table format: [`Trace::collect_text`] reads its lines.
    pub fn start_table(agent_bin: &Path, root: &Path, wait: Duration) -> anyhow::Result<Self> {
        Self::start_with(agent_bin, root, &[], &[], wait)
    }

    fn start_with(
        agent_bin: &Path,
        root: &Path,
        format: &[&str],
        args: &[&str],
        wait: Duration,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(agent_bin)
            .arg("trace")
            .args(format)
            .arg("--bpf-root")
            .arg(root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} trace", agent_bin.display()))?;
        let (out_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().context("trace's stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if out_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (err_tx, errors) = mpsc::channel();
        let stderr = child.stderr.take().context("trace's stderr")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("trace: {line}");
                let _ = err_tx.send(line);
            }
        });
        let mut trace = Self { child, lines };
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match errors.recv_timeout(left) {
                Ok(line) if line.contains("tracing:") => return Ok(trace),
                Ok(_) => {}
                Err(_) => {
                    let status = trace.child.try_wait()?;
                    bail!("trace did not start within {wait:?} (exit: {status:?})");
                }
            }
        }
    }

    /// Collects output lines as JSON until `done` holds for them or `wait` passes; returns
    /// what it has either way.
    pub fn collect(&self, wait: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + wait;
        while !done(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => seen.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))),
                Err(_) => break,
            }
        }
        seen
    }

    /// Collects `count` output lines as text, or what came within `wait`.
    pub fn collect_text(&self, wait: Duration, count: usize) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        while seen.len() < count {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        seen
    }

    /// Sends SIGTERM (as a service manager, or Ctrl-C's SIGINT, would) and waits for the exit;
    /// fails unless it exits successfully within `wait`.
    pub fn stop(mut self, wait: Duration) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("trace's pid")?;
        // SAFETY: a signal to our own child, still unreaped (its pid cannot be reused).
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to trace: {}", std::io::Error::last_os_error());
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("trace exited with {status}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("trace still running {wait:?} after SIGTERM")
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `trace_on` value pinned under `root`: 0 when nobody traces.
pub fn trace_on(root: &Path) -> anyhow::Result<u64> {
    let data = MapData::from_pin(root.join(maps::TRACE_ON)).context("the pinned trace_on map")?;
    let array: Array<MapData, u64> = Array::try_from(Map::Array(data)).context("trace_on is an array")?;
    Ok(array.get(&0, 0)?)
}

/// Drains the `trace_events` ring buffer pinned under `root`: the number of events it held.
pub fn drain_events(root: &Path) -> anyhow::Result<usize> {
    let data = MapData::from_pin(root.join(maps::TRACE_EVENTS)).context("the pinned trace_events map")?;
    let mut ring = aya::maps::RingBuf::try_from(Map::RingBuf(data)).context("trace_events is a ring buffer")?;
    let mut count = 0;
    while ring.next().is_some() {
        count += 1;
    }
    Ok(count)
}
