//! Clients run as separate processes inside a test namespace and a test cgroup (cgroup
//! membership is per process), using the `probe` binary.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{cgroup::Cgroup, netns::Netns};

/// A `Command` that, between fork and exec, joins `cgroup` (if any) and enters `ns`.
pub fn command_in(ns: &Netns, cgroup: Option<&Cgroup>, program: &Path) -> anyhow::Result<Command> {
    let netns = File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
    let procs =
        cgroup.map(|c| CString::new(c.procs().to_string_lossy().into_owned())).transpose().context("cgroup path")?;
    let mut command = Command::new(program);
    // SAFETY: only async-signal-safe calls (open, write, close, setns) run in the child.
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

/// What a batch of probes saw: answers per backend name, and errors per kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Answers by the name the backend replied with.
    pub answers: BTreeMap<String, usize>,
    /// Failures by kind (`refused`, `timeout`, ...).
    pub errors: BTreeMap<String, usize>,
}

impl Tally {
    /// Total answers.
    pub fn answered(&self) -> usize {
        self.answers.values().sum()
    }

    /// Answers from `name`.
    pub fn from(&self, name: &str) -> usize {
        self.answers.get(name).copied().unwrap_or(0)
    }
}

/// Runs `probe <args>` in `ns` (and `cgroup`) and tallies its output lines
/// (`ok <name>` / `err <kind>`).
pub fn probe(probe_bin: &Path, ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> anyhow::Result<Tally> {
    let out = command_in(ns, cgroup, probe_bin)?
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", probe_bin.display()))?;
    if !out.status.success() {
        bail!("probe {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    let mut tally = Tally::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        match line.split_once(' ') {
            Some(("ok", name)) => *tally.answers.entry(name.to_owned()).or_default() += 1,
            Some(("err", kind)) => *tally.errors.entry(kind.to_owned()).or_default() += 1,
            _ => bail!("unexpected probe output {line:?}"),
        }
    }
    Ok(tally)
}

/// A plain HTTP/1.1 GET from inside `ns` (a thread that enters it): the status and the body.
pub fn http_get(ns: &Netns, to: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter()?;
            let timeout = std::time::Duration::from_secs(5);
            let mut conn =
                std::net::TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connecting to {to}"))?;
            conn.set_read_timeout(Some(timeout))?;
            write!(conn, "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n")?;
            let mut response = String::new();
            conn.read_to_string(&mut response).with_context(|| format!("reading the answer of {to}{path}"))?;
            let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            Ok((status, body))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?
    })
}
