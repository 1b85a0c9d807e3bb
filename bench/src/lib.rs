//! Shared pieces of the side-by-side benchmarks (`cargo xtask bench`): options and progress,
//! statistics, a synthetic cluster, kube-proxy's iptables and nftables rules for it (written the
//! way kube-proxy writes them), sequential servers for pod namespaces, timed commands inside a
//! namespace, and the agent as a measured process (its pid, `synced` lines, RSS and CPU time).
//!
//! Everything here runs inside namespaces the bench creates: rules are loaded with
//! `iptables-restore` / `nft -f` by a process that entered a bench namespace first, never in the
//! machine's root namespace, and every namespace, cgroup, pin and process is removed on drop.
//! Timings are reported, never asserted.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub mod by_hand;
pub mod scale_report;

use anyhow::{Context as _, bail};
use aya::maps::{Map, MapData};
use proxy_common::{
    addr,
    backend::{Backend, BackendId},
    maps,
    proto::TCP,
    service::{ServiceKey, ServiceValue},
};

pub use proxy_tests::kube_proxy_rules::{CLUSTER_CIDR, NAMESPACE, SERVICE_CIDR, Svc, iptables, nftables};
use proxy_tests::{
    cgroup::Cgroup,
    client::command_in,
    fixtures::{service, slice, yaml},
    netns::Netns,
};

// ---------------------------------------------------------------------------------------------
// Options, progress, interruption
// ---------------------------------------------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The options every bench binary takes: `--quick` (fewer sizes and repetitions, for CI),
/// `--json` (print the result as one JSON document on stdout; progress always goes to stderr),
/// and, to look at one point, `--sizes N,N,...` (only these service counts) and `--datapaths
/// ours,iptables,nftables` (only these datapaths; bench_connect adds `ours-mapped` and `ours-ipv6`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Opts {
    /// The small version: N = 1 and 1 000, fewer repetitions.
    pub quick: bool,
    /// Print JSON on stdout instead of a text table.
    pub json: bool,
    /// `--sizes`, if given.
    sizes: Option<&'static [usize]>,
    /// `--datapaths`, if given.
    datapaths: Option<&'static [&'static str]>,
}

impl Opts {
    /// Parses the process arguments and installs the Ctrl-C handler (a stop flag that the bench
    /// loops check, so guards run and clean up).
    pub fn from_args() -> Self {
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
        let args: Vec<String> = std::env::args().collect();
        let sizes = args.iter().position(|a| a == "--sizes").and_then(|at| args.get(at + 1)).map(|list| {
            let sizes: Vec<usize> = list.split(',').filter_map(|n| n.trim().parse().ok()).filter(|n| *n > 0).collect();
            &*Box::leak(sizes.into_boxed_slice())
        });
        let datapaths = args.iter().position(|a| a == "--datapaths").and_then(|at| args.get(at + 1)).map(|list| {
            let names: Vec<&'static str> =
                list.split(',').map(|n| &*Box::leak(n.trim().to_owned().into_boxed_str())).collect();
            &*Box::leak(names.into_boxed_slice())
        });
        Self { quick: args.iter().any(|a| a == "--quick"), json: args.iter().any(|a| a == "--json"), sizes, datapaths }
    }

    /// Whether to measure `datapath` (`ours`, `iptables`, `nftables`; a variant such as
    /// `iptables --noflush` goes with its datapath).
    pub fn wants(&self, datapath: &str) -> bool {
        let base = datapath.split_whitespace().next().unwrap_or(datapath);
        self.datapaths.is_none_or(|names| names.contains(&base))
    }

    /// The service counts to measure.
    pub fn sizes(&self) -> &'static [usize] {
        match self.sizes {
            Some(sizes) if !sizes.is_empty() => sizes,
            _ if self.quick => &[1, 1_000],
            _ => &[1, 1_000, 10_000],
        }
    }
}

/// Fails once Ctrl-C was pressed, so loops stop and guards clean up.
pub fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Progress lines on stderr, prefixed with the bench's name and the time since it started.
#[derive(Debug)]
pub struct Progress {
    name: &'static str,
    started: Instant,
}

impl Progress {
    /// Starts the clock.
    pub fn new(name: &'static str) -> Self {
        Self { name, started: Instant::now() }
    }

    /// Prints one progress line.
    pub fn say(&self, message: impl std::fmt::Display) {
        eprintln!("[{} {:>6.1}s] {message}", self.name, self.started.elapsed().as_secs_f64());
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Mean and percentiles of a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Sample size.
    pub n: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Summary {
    /// Summarises `values` (any unit); all zero when empty.
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            n: sorted.len(),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50: percentile(&sorted, 0.50),
            p99: percentile(&sorted, 0.99),
            max: sorted[sorted.len() - 1],
        }
    }
}

/// The nearest-rank percentile of a sorted, non-empty sample.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The median of a sample (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    Summary::of(values).p50
}

// ---------------------------------------------------------------------------------------------
// A synthetic cluster
// ---------------------------------------------------------------------------------------------

/// The ClusterIP of service `index`: 10.96.(1 + index / 250).(index % 250 + 1).
pub fn vip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (1 + index / 250) as u8, (index % 250 + 1) as u8)
}

/// Background endpoints never receive traffic; they only have to be distinct. Endpoint `k` is
/// 10.244.128.0 + (k mod 32 760) on port 8080 + k / 32 760 (32 760 is a multiple of every
/// per-service count used here, so one service's endpoints share a port).
fn background_endpoint(k: usize) -> (Ipv4Addr, u16) {
    const SPAN: usize = 32_760;
    (Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 128, 0)) + (k % SPAN) as u32), 8080 + (k / SPAN) as u16)
}

/// `n` ClusterIP services on port 80 with `per_service` background endpoints each.
pub fn synthetic(n: usize, per_service: usize) -> Vec<Svc> {
    (0..n)
        .map(|i| {
            let endpoints: Vec<(Ipv4Addr, u16)> =
                (0..per_service).map(|j| background_endpoint(i * per_service + j)).collect();
            Svc {
                name: format!("svc-{i}"),
                vip: vip(i),
                port: 80,
                target_port: endpoints.first().map_or(8080, |e| e.1),
                node_port: None,
                endpoints: endpoints.into_iter().map(|e| e.0).collect(),
            }
        })
        .collect()
}

/// The services as one manifest file's text (a Service and an EndpointSlice each).
pub fn manifests(services: &[Svc]) -> String {
    let mut text = String::new();
    for svc in services {
        let mut built = service(&svc.name).cluster_ip(&svc.vip.to_string()).port(svc.port.into());
        if let Some(node_port) = svc.node_port {
            built = built.node_port(node_port.into());
        }
        text += &yaml(&built.build());
        text += &yaml(&endpoint_slice(svc, &svc.endpoints));
    }
    text
}

/// The EndpointSlice of `svc` with `endpoints` (ready, on node-1).
pub fn endpoint_slice(svc: &Svc, endpoints: &[Ipv4Addr]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let addresses: Vec<String> = endpoints.iter().map(Ipv4Addr::to_string).collect();
    slice(&svc.name, "a").port(svc.target_port.into()).endpoints(addresses.iter().map(String::as_str)).build()
}

// ---------------------------------------------------------------------------------------------
// Commands in a namespace, timed
// ---------------------------------------------------------------------------------------------

/// Runs `program args` inside `ns` (entered between fork and exec, so the timing is the tool's
/// own) with `stdin` from a file, and returns how long it ran. Killed (by its pid) after
/// `timeout`; fails with its stderr if it fails.
pub fn timed_in(
    ns: &Netns,
    program: &str,
    args: &[&str],
    stdin: Option<&Path>,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let stderr_path = std::env::temp_dir().join(format!("proxy-bench-stderr-{}-{}", std::process::id(), unique()));
    let _stderr_guard = RemoveFile(stderr_path.clone());
    let stderr = fs::File::create(&stderr_path)?;
    let mut command = command_in(ns, None, Path::new(program))?;
    command.args(args).stdout(Stdio::null()).stderr(stderr);
    match stdin {
        Some(file) => command.stdin(fs::File::open(file).with_context(|| format!("opening {}", file.display()))?),
        None => command.stdin(Stdio::null()),
    };
    let started = Instant::now();
    let mut child =
        command.spawn().with_context(|| format!("starting {program} (is it installed? `cargo xtask setup`)"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send((status, Instant::now()));
    });
    let (status, ended) = match rx.recv_timeout(timeout) {
        Ok(done) => done,
        Err(_) => {
            // SAFETY: kill on the pid of a child this function started and has not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = waiter.join();
            return Err(TimedOut { program: program.to_owned(), after: timeout }.into());
        }
    };
    let _ = waiter.join();
    let status = status?;
    if !status.success() {
        let text = fs::read_to_string(&stderr_path).unwrap_or_default();
        let text: String = text.lines().take(5).collect::<Vec<_>>().join("\n");
        bail!("{program} {} failed ({status}): {text}", args.join(" "));
    }
    Ok(ended - started)
}

/// A command [`timed_in`] killed because it ran out of time (a lower bound, not a failure).
#[derive(Debug)]
pub struct TimedOut {
    /// The program.
    pub program: String,
    /// How long it was given.
    pub after: Duration,
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} did not finish within {:?}; killed", self.program, self.after)
    }
}

impl std::error::Error for TimedOut {}

fn unique() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A file removed on drop.
#[derive(Debug)]
pub struct RemoveFile(pub PathBuf);

impl Drop for RemoveFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Writes `text` to a fresh temp file (removed on drop) and returns its guard.
pub fn temp_file(prefix: &str, text: &str) -> anyhow::Result<RemoveFile> {
    let path = std::env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), unique()));
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(RemoveFile(path))
}

/// kube-proxy's rules for `services` in one complete `iptables-restore` (jump rules included;
/// the tables are flushed first, which in a fresh namespace costs nothing), timed.
pub fn iptables_load(ns: &Netns, services: &[Svc], timeout: Duration) -> anyhow::Result<Duration> {
    let file = temp_file("proxy-bench-iptables", &iptables::full_with_jumps(services))?;
    timed_in(ns, "iptables-restore", &[], Some(&file.0), timeout)
}

/// kube-proxy's own invocation: its jump rules installed once (untimed), then the sync's
/// ruleset with `iptables-restore --noflush`, timed.
pub fn iptables_load_noflush(ns: &Netns, services: &[Svc], timeout: Duration) -> anyhow::Result<Duration> {
    let jumps = temp_file("proxy-bench-jumps", &iptables::jumps())?;
    timed_in(ns, "iptables-restore", &["--noflush"], Some(&jumps.0), Duration::from_secs(30))
        .context("installing kube-proxy's jump rules")?;
    iptables_apply(ns, &iptables::full(services), timeout)
}

/// `iptables-restore --noflush` of `ruleset` in `ns`, timed.
pub fn iptables_apply(ns: &Netns, ruleset: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let file = temp_file("proxy-bench-iptables", ruleset)?;
    timed_in(ns, "iptables-restore", &["--noflush"], Some(&file.0), timeout)
}

/// `nft -f` of `ruleset` in `ns`, timed.
pub fn nft_apply(ns: &Netns, ruleset: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let file = temp_file("proxy-bench-nft", ruleset)?;
    let path = file.0.to_string_lossy().into_owned();
    timed_in(ns, "nft", &["-f", &path], None, timeout)
}

// ---------------------------------------------------------------------------------------------
// Servers in pod namespaces
// ---------------------------------------------------------------------------------------------

/// A TCP listener bound inside `ns` on every address, port `port`.
fn listen_in(ns: &Netns, port: u16) -> anyhow::Result<TcpListener> {
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<TcpListener> {
            ns.enter()?;
            // Both families on one socket (IPV6_V6ONLY off), as a dual-stack pod listens.
            let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            socket.set_only_v6(false)?;
            socket.set_reuse_address(true)?;
            let any = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
            socket.bind(&any.into()).with_context(|| format!("binding {any} in {}", ns.name()))?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bind thread panicked"))?
    })
}

/// Waits until `listener` has a connection or 100 ms pass; `false` on timeout.
fn readable(listener: &TcpListener) -> bool {
    let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, 100) > 0 }
}

/// A sequential request/response server, like a minimal C echo server: accept, read the request,
/// answer with the name, close; one connection at a time, so it adds no thread start-up to a
/// connection's latency. Stops on drop.
#[derive(Debug)]
pub struct ReplyServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ReplyServer {
    /// Serves inside `ns` on `port`.
    pub fn start(ns: &Netns, port: u16, name: &str) -> anyhow::Result<Self> {
        let listener = listen_in(ns, port)?;
        let stop = Arc::new(AtomicBool::new(false));
        let reply = name.as_bytes().to_vec();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if !readable(&listener) {
                        continue;
                    }
                    if let Ok((mut conn, _)) = listener.accept() {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                        if conn.read(&mut buf).is_ok_and(|n| n > 0) {
                            let _ = conn.write_all(&reply);
                        }
                    }
                }
            })
        };
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for ReplyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One stream a [`SinkServer`] received: bytes and the time from accept to end of stream.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// Payload bytes.
    pub bytes: u64,
    /// Accept → EOF.
    pub elapsed: Duration,
}

/// A server that reads each connection to its end and records how much came and how fast.
/// Stops on drop.
#[derive(Debug)]
pub struct SinkServer {
    stop: Arc<AtomicBool>,
    received: Arc<Mutex<Vec<Received>>>,
    thread: Option<JoinHandle<()>>,
}

impl SinkServer {
    /// Serves inside `ns` on `port`.
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Self> {
        let listener = listen_in(ns, port)?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, received) = (stop.clone(), received.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if !readable(&listener) {
                        continue;
                    }
                    let Ok((mut conn, _)) = listener.accept() else { continue };
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                    let started = Instant::now();
                    let mut bytes = 0u64;
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        bytes += n as u64;
                    }
                    let record = Received { bytes, elapsed: started.elapsed() };
                    received.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(record);
                }
            })
        };
        Ok(Self { stop, received, thread: Some(thread) })
    }

    /// How many streams have ended so far.
    pub fn count(&self) -> usize {
        self.received.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Waits (at most `timeout`) for a stream that carried data, numbered `after` or later
    /// (0-based), to end: connections that only checked reachability carry none.
    pub fn wait_for_stream(&self, after: usize, timeout: Duration) -> anyhow::Result<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .skip(after)
                .find(|r| r.bytes > 0)
                .copied();
            if let Some(r) = found {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("the receiver saw no stream end within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for SinkServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// From inside `ns`, connects to `to` and writes as fast as it can for `duration`, then closes.
/// Returns the bytes written.
pub fn send_stream(ns: &Netns, to: SocketAddr, duration: Duration) -> anyhow::Result<u64> {
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<u64> {
            ns.enter()?;
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .with_context(|| format!("connecting to {to} from {}", ns.name()))?;
            stream.set_write_timeout(Some(Duration::from_secs(2)))?;
            let chunk = vec![0x5au8; 128 * 1024];
            let until = Instant::now() + duration;
            let mut sent = 0u64;
            while Instant::now() < until {
                stream.write_all(&chunk).with_context(|| format!("writing to {to}"))?;
                sent += chunk.len() as u64;
            }
            stream.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the sender thread panicked"))?
    })
}

/// From inside `ns`, connects to `to` (retrying for up to `timeout`) and closes at once: a
/// check that the datapath answers before measuring.
pub fn wait_reachable(ns: &Netns, to: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<()> {
            ns.enter()?;
            let deadline = Instant::now() + timeout;
            loop {
                match TcpStream::connect_timeout(&to, Duration::from_millis(300)) {
                    Ok(_) => return Ok(()),
                    Err(e) if Instant::now() > deadline => bail!("{to} is not reachable from {}: {e}", ns.name()),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
    })
}

// ---------------------------------------------------------------------------------------------
// The connection-latency client (a child process, so it can join a cgroup)
// ---------------------------------------------------------------------------------------------

/// What one client run measured, in microseconds.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ConnectRun {
    /// Latency of the successful attempts (µs).
    pub latency: Summary,
    /// Failed attempts.
    pub fails: usize,
    /// Answers by the name the server replied with (which backends were reached).
    pub answers: std::collections::BTreeMap<String, usize>,
}

/// Sequential TCP connect + one request/response + close (RST, as a minimal C connect loop does), `count`
/// times after `warmup` untimed ones, within `budget`. Runs in the calling process: this is the
/// body of the client child process.
pub fn connect_loop(to: SocketAddr, warmup: usize, count: usize, budget: Duration) -> ConnectRun {
    let deadline = Instant::now() + budget;
    for _ in 0..warmup {
        let _ = connect_once(to);
    }
    let mut latencies = Vec::with_capacity(count);
    let mut answers = std::collections::BTreeMap::new();
    let mut fails = 0;
    for _ in 0..count {
        if Instant::now() > deadline {
            fails += 1;
            continue;
        }
        let started = Instant::now();
        match connect_once(to) {
            Ok(answer) => {
                latencies.push(started.elapsed().as_secs_f64() * 1e6);
                *answers.entry(answer).or_default() += 1;
            }
            Err(_) => fails += 1,
        }
    }
    ConnectRun { latency: Summary::of(&latencies), fails, answers }
}

/// Connects to `to` (one request, one answer) again and again until it is answered or `budget`
/// runs out, and returns the answer: the body of a client child process that waits for a
/// service to be served. A failed attempt (no route yet, refused, no answer) is retried after a
/// millisecond.
pub fn wait_answered(to: SocketAddr, budget: Duration) -> Option<String> {
    let deadline = Instant::now() + budget;
    while Instant::now() < deadline {
        if let Ok(answer) = connect_once(to) {
            return Some(answer);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// One connection: socket, SO_LINGER 0, connect (1 s timeout), write a byte, read the answer,
/// close; returns the answer. The socket's family is `to`'s: an IPv4-mapped `to` is an AF_INET6
/// socket to an IPv4 address, as a dual-stack application connects.
fn connect_once(to: SocketAddr) -> std::io::Result<String> {
    let family = if to.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket syscalls on a descriptor owned by this function and closed on every
    // path; the structs passed live for the duration of each call.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let result = (|| {
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
            let size = |n: usize| n as libc::socklen_t;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size(size_of_val(&linger)),
            );
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const timeout).cast(),
                size(size_of_val(&timeout)),
            );
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size(size_of_val(&timeout)),
            );
            let connected = match to {
                SocketAddr::V4(to) => {
                    let addr = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: to.port().to_be(),
                        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.ip().octets()) },
                        sin_zero: [0; 8],
                    };
                    libc::connect(fd, (&raw const addr).cast(), size(size_of_val(&addr)))
                }
                SocketAddr::V6(to) => {
                    let addr = libc::sockaddr_in6 {
                        sin6_family: libc::AF_INET6 as libc::sa_family_t,
                        sin6_port: to.port().to_be(),
                        sin6_flowinfo: 0,
                        sin6_addr: libc::in6_addr { s6_addr: to.ip().octets() },
                        sin6_scope_id: 0,
                    };
                    libc::connect(fd, (&raw const addr).cast(), size(size_of_val(&addr)))
                }
            };
            if connected != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::write(fd, b"x".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            let mut buf = [0u8; 64];
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                return Err(std::io::Error::other("no answer"));
            }
            Ok(String::from_utf8_lossy(&buf[..n as usize]).trim().to_owned())
        })();
        libc::close(fd);
        result
    }
}

/// Runs `exe --client ADDR:PORT WARMUP COUNT` inside `ns` (and `cgroup`), and parses its JSON.
pub fn run_client(
    exe: &Path,
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    to: SocketAddr,
    warmup: usize,
    count: usize,
) -> anyhow::Result<ConnectRun> {
    let out = command_in(ns, cgroup, exe)?
        .args(["--client", &to.to_string(), &warmup.to_string(), &count.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running the client in {}", ns.name()))?;
    if !out.status.success() {
        bail!("the client in {} failed ({})", ns.name(), out.status);
    }
    serde_json::from_slice(&out.stdout).context("parsing the client's output")
}

// ---------------------------------------------------------------------------------------------
// The agent as a measured process
// ---------------------------------------------------------------------------------------------

/// One `synced` log line of the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SyncLine {
    /// Services recomputed.
    pub services: usize,
    /// Frontends programmed after the sync.
    pub frontends: usize,
    /// Distinct backends programmed after the sync.
    pub backends: usize,
    /// Map operations that failed.
    pub errors: usize,
    /// The sync's own time (model, diff, map writes), as the agent measured it.
    pub took_ms: f64,
}

impl SyncLine {
    /// Parses `... synced services=1 ... frontends=2 backends=2 ... took_ms=0.12`.
    pub fn parse(line: &str) -> Option<Self> {
        let (_, fields) = line.split_once(" synced ")?;
        let mut out = Self::default();
        for (key, value) in fields.split_whitespace().filter_map(|f| f.split_once('=')) {
            match key {
                "services" => out.services = value.parse().ok()?,
                "frontends" => out.frontends = value.parse().ok()?,
                "backends" => out.backends = value.parse().ok()?,
                "errors" => out.errors = value.parse().ok()?,
                "took_ms" => out.took_ms = value.parse().ok()?,
                _ => {}
            }
        }
        Some(out)
    }
}

/// Memory and CPU of a process, from /proc.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Usage {
    /// Peak resident set (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Resident set now (VmRSS), MiB.
    pub rss_mib: f64,
    /// utime + stime, ms.
    pub cpu_ms: f64,
}

impl Usage {
    /// Reads /proc/<pid>/status and /proc/<pid>/stat.
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc/<pid>/status")?;
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc/<pid>/stat")?;
        // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok(Self {
            peak_rss_mib: kib("VmHWM:") / 1024.0,
            rss_mib: kib("VmRSS:") / 1024.0,
            cpu_ms: (ticks(11) + ticks(12)) * 1e3 / hz,
        })
    }
}

/// The agent under measurement: the `agent` binary next to the bench, started inside `ns` with
/// `nsenter --net` (bpffs and cgroup2 stay visible), logging at `info` (as in production; the
/// sync loop at `debug`) to a file; killed by its pid, its links detached and pins removed on drop.
#[derive(Debug)]
pub struct BenchAgent {
    child: Option<Child>,
    pid: u32,
    bpf_root: PathBuf,
    log: PathBuf,
    started: Instant,
}

impl BenchAgent {
    /// Starts the agent with its own bpffs root, `--cgroup-path cgroup`, no health or metrics
    /// servers, and `flags`.
    pub fn start(ns: &Netns, cgroup: &Cgroup, flags: &[&str]) -> anyhow::Result<Self> {
        let bin = std::env::current_exe()?.with_file_name("agent");
        if !bin.exists() {
            bail!("{} is missing: build it with `cargo build --release -p proxy-tests --bin agent`", bin.display());
        }
        let n = unique();
        let bpf_root = PathBuf::from(format!("/sys/fs/bpf/proxy-bench-{}-{n}", std::process::id()));
        let log = std::env::temp_dir().join(format!("proxy-bench-agent-{}-{n}.log", std::process::id()));
        let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        // nsenter without --fork execs the agent in place: the child's pid is the agent's.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg(&bin)
            .arg("--bpf-root")
            .arg(&bpf_root)
            .arg("--cgroup-path")
            .arg(cgroup.path())
            .args(["--healthz-bind-address=", "--metrics-bind-address="])
            .args(flags)
            // The sync loop's debug lines say what the periodic check (`--sync-period`) took.
            .env("RUST_LOG", "info,proxy_agent::sync=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { pid: child.id(), child: Some(child), bpf_root, log, started })
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The agent's bpffs root.
    pub fn bpf_root(&self) -> &Path {
        &self.bpf_root
    }

    /// When the agent was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every `synced` line so far.
    pub fn syncs(&self) -> Vec<SyncLine> {
        self.log().lines().filter_map(SyncLine::parse).collect()
    }

    /// Waits until a `synced` line after the first `after` satisfies `done`; returns every sync
    /// line from `after` up to and including it, and when it was seen. Fails with the log's tail
    /// if the agent exits or time runs out.
    pub fn wait_for_sync(
        &mut self,
        after: usize,
        done: impl Fn(&SyncLine) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<(Vec<SyncLine>, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let syncs = self.syncs();
            if let Some(at) = syncs.iter().skip(after).position(&done) {
                return Ok((syncs[after..=after + at].to_vec(), Instant::now()));
            }
            self.check_running()?;
            check_interrupt()?;
            if Instant::now() > deadline {
                bail!("the agent logged no matching sync within {timeout:?}:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Fails with the log's tail if the agent has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("the agent exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The `took_ms` of the first periodic check the agent logged after the first `synced` line
    /// that satisfies `synced` (a check before it, while the agent was still reading its
    /// sources, has nothing to compare), waiting up to `timeout`.
    pub fn periodic_check_ms(&mut self, synced: impl Fn(&SyncLine) -> bool, timeout: Duration) -> anyhow::Result<f64> {
        Ok(self.periodic_checks_ms(synced, 1, timeout)?[0])
    }

    /// The `took_ms` of the first `count` periodic checks after that `synced` line (a check
    /// reads the large maps a part at a time: one says little about the next).
    pub fn periodic_checks_ms(
        &mut self,
        synced: impl Fn(&SyncLine) -> bool,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<f64>> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            let lines: Vec<&str> = log
                .lines()
                .skip_while(|l| !SyncLine::parse(l).is_some_and(|s| synced(&s)))
                .filter(|l| l.contains("checked the maps against what was programmed"))
                .take(count)
                .collect();
            if lines.len() == count {
                let mut out = Vec::with_capacity(count);
                for line in lines {
                    let field = |name: &str| {
                        let value = line.split(&format!("{name}=")).nth(1).and_then(|v| v.split_whitespace().next());
                        value.unwrap_or_default().parse::<f64>().with_context(|| format!("{name} in {line:?}"))
                    };
                    // After a full sync the maps hold what was programmed: a check that finds
                    // anything to write misread them.
                    if field("service_writes")? + field("backend_writes")? > 0.0 {
                        bail!("a periodic check after a full sync rewrote entries: {line}");
                    }
                    out.push(field("took_ms")?);
                }
                return Ok(out);
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!("{count} periodic checks not logged within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Copies the log so far to `to` (it is removed with the agent).
    pub fn keep_log(&self, to: &Path) -> anyhow::Result<()> {
        fs::copy(&self.log, to).with_context(|| format!("copying the agent's log to {}", to.display()))?;
        Ok(())
    }

    /// Its memory and CPU now.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        Usage::of(self.pid)
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = proxy_agent::datapath::cleanup(&self.bpf_root);
        let _ = fs::remove_file(&self.log);
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's pinned maps, read back
// ---------------------------------------------------------------------------------------------

/// Single-key reads of the agent's pinned maps.
pub struct MapProbe {
    services: aya::maps::HashMap<MapData, ServiceKey, ServiceValue>,
    backends: aya::maps::HashMap<MapData, BackendId, Backend>,
}

impl MapProbe {
    /// Opens the pinned service and backend maps under the agent's bpffs root.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let open = |name: &str| -> anyhow::Result<Map> {
            Ok(Map::HashMap(MapData::from_pin(root.join(name)).with_context(|| format!("opening pinned {name}"))?))
        };
        Ok(Self {
            services: aya::maps::HashMap::try_from(open(maps::SERVICES)?)?,
            backends: aya::maps::HashMap::try_from(open(maps::BACKENDS)?)?,
        })
    }

    /// The (address, port) of every backend in the frontend's slots; `None` if a read failed
    /// (slots can be mid-rewrite).
    pub fn backends_of(&self, frontend: (Ipv4Addr, u16)) -> Option<Vec<(Ipv4Addr, u16)>> {
        let master = ServiceKey::master(addr::from_ip(frontend.0), frontend.1, TCP);
        let count = self.services.get(&master, 0).ok()?.count;
        (1..=count)
            .map(|slot| {
                let id = self.services.get(&master.with_slot(slot), 0).ok()?.backend_id;
                let backend = self.backends.get(&id, 0).ok()?;
                Some((Ipv4Addr::from(addr::to_v4(&backend.address)?), backend.port))
            })
            .collect()
    }

    /// Polls until the frontend serves `present` and not `gone`.
    pub fn wait(
        &self,
        frontend: (Ipv4Addr, u16),
        present: (Ipv4Addr, u16),
        gone: (Ipv4Addr, u16),
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(now) = self.backends_of(frontend)
                && now.contains(&present)
                && !now.contains(&gone)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not seen within {timeout:?}");
            }
            // Give the agent and the server the CPU between polls without sleeping through a timer.
            std::thread::yield_now();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

/// Prints `value` as JSON (with `--json`) or `text` otherwise.
pub fn emit(opts: Opts, value: &serde_json::Value, text: &str) {
    if opts.json {
        println!("{value}");
    } else {
        print!("{text}");
    }
}

/// A text table: a header row and rows, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i == 0 {
                let _ = write!(out, "{cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(out, "  {}{cell}", " ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&values);
        assert_eq!((s.n, s.p50, s.p99, s.max), (100, 50.0, 99.0, 100.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
    }

    #[test]
    fn background_endpoints_are_distinct() {
        let services = synthetic(10_000, 10);
        let mut all: Vec<(Ipv4Addr, u16)> =
            services.iter().flat_map(|s| s.endpoints.iter().map(|e| (*e, s.target_port))).collect();
        let total = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), total);
    }

    #[test]
    fn sync_lines_parse() {
        let line = "2026-01-01T00:00:00Z  INFO proxy_agent::sync: synced services=3 service_writes=9 backend_writes=6 frontends=3 backends=6 skipped=0 errors=0 took_ms=1.25";
        let parsed = SyncLine::parse(line).unwrap();
        assert_eq!((parsed.frontends, parsed.backends, parsed.took_ms), (3, 6, 1.25));
    }
}
