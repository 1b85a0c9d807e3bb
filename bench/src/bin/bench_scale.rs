//! Ours at scale: N services × 10 distinct endpoints on one node (issue 15), from a manifest
//! directory and from the API source. Ours only: kube-proxy's rules for 100 000 × 10 take far
//! longer than this run may (bench_program times them up to 10 000 × 10), and the peers have no
//! manifest source.
//!
//! Per source, in namespaces this bench creates: a client namespace where the agent runs, and a
//! pod namespace on a veth holding the last service's ten endpoint addresses behind one reply
//! server. A client process in the agent's cgroup starts before the agent and connects to the
//! last-created service's ClusterIP every millisecond until a pod answers (through the socket
//! program): **agent start → the last service answers**. Then, from the agent's log and /proc:
//! its first full sync's `took_ms` (every `synced` line until all N frontends are programmed),
//! peak RSS (VmHWM), and (manifest run, `--sync-period 2s`) the first periodic check's
//! `took_ms` after the full sync. With the API
//! source (the test API server, listing in pages as kube-runtime's watcher asks), one endpoint
//! change after another: API write → the pinned maps serve the new endpoint (p50/p99/max).
//!
//! The agent runs with its default map sizes: whether they hold N × 10 is one of the targets. A
//! service not served within the budget is reported as such, with the agent's first warning.
//!
//! `bench_scale --scale N [--json]` (`--quick`: N = 1 000); run by `cargo xtask bench --scale N`.
//! `bench_scale --wait-answer ADDR:PORT SECONDS` is the waiting client itself.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr},
    process::{Child, ExitCode, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use proxy_bench::{self as bench, BenchAgent, MapProbe, Opts, Progress, ReplyServer, Summary, Svc, SyncLine, Usage};
use proxy_tests::{
    apiserver::ApiServer,
    cgroup::Cgroup,
    client::command_in,
    fixtures::{TempDir, service},
    netns::{Netns, veth},
    topology::add_address,
};
use serde_json::{Value, json};

/// Endpoints per service, every one a distinct address.
const ENDPOINTS: usize = 10;
/// The pod's port.
const POD_PORT: u16 = 8080;
/// The client's address on the veth to the pod.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// Services per manifest file.
const PER_FILE: usize = 1_000;
/// The agent's `--sync-period` here: short, so the periodic check comes soon after the sync.
const SYNC_PERIOD: &str = "2s";
/// Periodic checks timed after the full sync: each reads a part of the large maps.
const CHECKS: usize = 5;
/// Pause after each endpoint change is seen: longer than `--min-sync-period` (10 ms).
const GAP: Duration = Duration::from_millis(12);
/// One endpoint change not in the maps within this ends the series (reported, not fatal).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// All endpoint changes of one run.
const CHANGES_BUDGET: Duration = Duration::from_secs(150);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--wait-answer") {
        return wait_answer(&args[2..]);
    }
    let opts = Opts::from_args();
    let scale = match args.iter().position(|a| a == "--scale").map(|at| args.get(at + 1).map(|n| n.parse())) {
        None if opts.quick => 1_000,
        Some(Some(Ok(n))) if (2..=1_000_000).contains(&n) => n,
        _ => {
            eprintln!("usage: bench_scale --scale N [--json] (2 ≤ N ≤ 1 000 000), or --quick");
            return ExitCode::from(2);
        }
    };
    match run(opts, scale) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_scale failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The waiting client: `ADDR:PORT SECONDS`; prints `answered NAME` as soon as a pod answers.
fn wait_answer(args: &[String]) -> ExitCode {
    let (Some(Ok(to)), Some(Ok(seconds))) =
        (args.first().map(|a| a.parse::<SocketAddr>()), args.get(1).map(|a| a.parse::<u64>()))
    else {
        eprintln!("usage: bench_scale --wait-answer ADDR:PORT SECONDS");
        return ExitCode::from(2);
    };
    match bench::wait_answered(to, Duration::from_secs(seconds.min(600))) {
        Some(answer) => {
            println!("answered {answer}");
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

/// The ClusterIP of service `i`: 10.96.0.0/12 holds a million (the 10.96.0.0/16 of the smaller
/// benches holds 65 536).
fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// Background endpoint `k`: distinct addresses in 10.112.0.0/12, never sent traffic.
fn endpoint(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 112, 0, 0)) + k as u32)
}

/// The last service's endpoints: ten addresses of the pod namespace.
fn pod_addresses() -> Vec<Ipv4Addr> {
    (0..ENDPOINTS as u8).map(|j| Ipv4Addr::new(10, 244, 1, 10 + j)).collect()
}

/// N services × 10 distinct endpoints; the last one's are the pod's.
fn services(n: usize) -> Vec<Svc> {
    (0..n)
        .map(|i| Svc {
            name: format!("svc-{i}"),
            vip: vip(i),
            port: 80,
            target_port: POD_PORT,
            node_port: None,
            endpoints: if i + 1 == n {
                pod_addresses()
            } else {
                (0..ENDPOINTS).map(|j| endpoint(i * ENDPOINTS + j)).collect()
            },
        })
        .collect()
}

/// Writes the services as JSON documents (a Service and an EndpointSlice each), `PER_FILE`
/// services a file; returns the bytes written.
fn write_manifests(dir: &std::path::Path, services: &[Svc]) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for (f, chunk) in services.chunks(PER_FILE).enumerate() {
        let path = dir.join(format!("services-{f:04}.json"));
        let mut out = std::io::BufWriter::new(fs::File::create(&path).with_context(|| format!("{}", path.display()))?);
        for svc in chunk {
            serde_json::to_writer(&mut out, &service(&svc.name).cluster_ip(&svc.vip.to_string()).port(80).build())?;
            out.write_all(b"\n")?;
            serde_json::to_writer(&mut out, &bench::endpoint_slice(svc, &svc.endpoints))?;
            out.write_all(b"\n")?;
        }
        out.flush().with_context(|| format!("writing {}", path.display()))?;
        bytes += fs::metadata(&path)?.len();
    }
    Ok(bytes)
}

/// The client namespace (where the agent runs) and the pod namespace behind it.
struct Lab {
    _server: ReplyServer,
    _pod: Netns,
    client: Netns,
}

impl Lab {
    fn new() -> anyhow::Result<Self> {
        let client = Netns::new("bench-scale")?;
        let pod = Netns::new("bench-scale-pod")?;
        veth(&client, "eth0", &pod, "eth0")?;
        add_address(&client, CLIENT, 24, "eth0")?;
        for ip in pod_addresses() {
            add_address(&pod, ip, 24, "eth0")?;
        }
        let server = ReplyServer::start(&pod, POD_PORT, "pod")?;
        Ok(Self { _server: server, _pod: pod, client })
    }
}

/// The waiting client process; killed by its pid on drop.
struct Waiter {
    child: Child,
    answered: mpsc::Receiver<(Instant, String)>,
}

impl Waiter {
    fn start(ns: &Netns, cgroup: &Cgroup, to: SocketAddr, budget: Duration) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = command_in(ns, Some(cgroup), &exe)?
            .args(["--wait-answer", &to.to_string(), &budget.as_secs().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the waiting client")?;
        let stdout = child.stdout.take().context("the client's stdout")?;
        let (tx, answered) = mpsc::channel();
        // The moment its line arrives is when the service answered (a pipe write away).
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(answer) = line.strip_prefix("answered ") {
                    let _ = tx.send((Instant::now(), answer.to_owned()));
                }
            }
        });
        Ok(Self { child, answered })
    }

    /// When and by whom it was answered; `None` if the client gave up or `timeout` passed.
    fn wait(&mut self, agent: &mut BenchAgent, timeout: Duration) -> anyhow::Result<Option<(Instant, String)>> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            bench::check_interrupt()?;
            if let Ok(answered) = self.answered.recv_timeout(Duration::from_millis(20)) {
                return Ok(Some(answered));
            }
            if self.child.try_wait()?.is_some() {
                // Its last line may still be on the way: the reader ends (and the channel
                // closes) at the end of the pipe. `try_recv` here lost answers under load.
                return Ok(self.answered.recv().ok());
            }
            agent.check_running()?;
        }
        Ok(None)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the agent reads its state.
enum Source<'a> {
    Manifests(&'a TempDir),
    Api(&'a Svc),
}

/// What one agent run at N measured.
#[derive(Debug, Default, serde::Serialize)]
struct SourceRun {
    /// Agent start → the last service answered; `None`: not within the budget.
    serve_seconds: Option<f64>,
    /// The name the pod answered with.
    answered_by: Option<String>,
    /// The first full sync's `took_ms` (summed over `synced` lines until every frontend).
    full_sync_ms: Option<f64>,
    /// Frontends programmed at the last `synced` line seen.
    frontends: usize,
    /// After the full sync (or at the end of the budget).
    usage: Usage,
    /// The median `took_ms` of the first periodic `--sync-period` checks after the full sync.
    periodic_check_ms: Option<f64>,
    /// The largest of those.
    periodic_check_max_ms: Option<f64>,
    /// API source: one endpoint change, API write → pinned maps (ms).
    endpoint_change_ms: Option<Summary>,
    /// API source: the agent's own `synced` took_ms for those changes (ms).
    change_sync_ms: Option<Summary>,
    /// API source: LIST requests served per kind (pages of 500 prove the paging).
    lists: Option<Value>,
    /// WARN lines the agent logged, and the first one.
    warnings: usize,
    first_warning: Option<String>,
    /// What kept a figure from being measured.
    problems: Vec<String>,
}

fn run(opts: Opts, n: usize) -> anyhow::Result<()> {
    let progress = Progress::new("scale");
    let budget = Duration::from_secs(if n > 10_000 { 180 } else { 60 });
    let services = services(n);
    let dir = TempDir::new("proxy-bench-scale")?;
    let written = Instant::now();
    let bytes = write_manifests(dir.path(), &services)?;
    progress.say(format!(
        "{n} × {ENDPOINTS}: {:.0} MB of JSON manifests in {} files ({:.1} s)",
        bytes as f64 / 1e6,
        n.div_ceil(PER_FILE),
        written.elapsed().as_secs_f64()
    ));
    let manifests = measure(&progress, &services, Source::Manifests(&dir), budget, 0)?;
    drop(dir);
    let changes = if opts.quick { 50 } else { 200 };
    let api = measure(&progress, &services, Source::Api(&services[n - 1]), budget, changes)?;
    let tc = tc_path(&progress, n);

    let mut text = format!("ours at {n} services × {ENDPOINTS} endpoints\n");
    let cell = |v: Option<f64>, unit: &str| v.map_or("never".to_owned(), |v| format!("{v:.3}{unit}"));
    let rows: Vec<Vec<String>> = [("manifest directory", &manifests), ("API source", &api)]
        .iter()
        .map(|(what, r)| {
            vec![
                what.to_string(),
                cell(r.serve_seconds, " s"),
                cell(r.full_sync_ms, " ms"),
                format!("{:.1} MiB", r.usage.peak_rss_mib),
                cell(r.periodic_check_ms, " ms"),
                r.endpoint_change_ms.map_or("–".into(), |s| format!("{:.2} / {:.2} / {:.2}", s.p50, s.p99, s.max)),
            ]
        })
        .collect();
    text += &bench::table(
        &["source", "start → answered", "full sync", "peak RSS", "periodic check", "change p50/p99/max ms"],
        &rows,
    );
    for (what, r) in [("manifests", &manifests), ("api", &api)] {
        for problem in &r.problems {
            text += &format!("{what}: {problem}\n");
        }
    }
    let value = json!({
        "services": n,
        "endpoints_per_service": ENDPOINTS,
        "manifest_bytes": bytes,
        "manifest_files": n.div_ceil(PER_FILE),
        "budget_seconds": budget.as_secs(),
        "sync_period": SYNC_PERIOD,
        // Two cores shared with other work: the load says how much the figures are worth.
        "load_average": fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "manifests": manifests,
        "api": api,
        "tc": tc,
    });
    bench::emit(opts, &value, &text);
    Ok(())
}

/// The TC established flow at 1 and `n` services beside the C floor, in this run: the sibling
/// benches `bench_tc --sizes 1,N --json` and `bench_floor --json`, one after the other
/// (`{"rows": [...], "floor": {...}}`, or `{"problem": ...}` when either fails).
fn tc_path(progress: &Progress, n: usize) -> Value {
    let run = |bin: &str, args: &[&str]| -> anyhow::Result<Value> {
        let path = std::env::current_exe()?.with_file_name(bin);
        let out = std::process::Command::new(&path)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("starting {}", path.display()))?;
        anyhow::ensure!(out.status.success(), "{bin} failed ({})", out.status);
        serde_json::from_slice(&out.stdout).with_context(|| format!("{bin} printed no JSON"))
    };
    progress.say(format!("TC path: bench_tc at 1 and {n} services, then bench_floor"));
    let sizes = format!("1,{n}");
    match run("bench_tc", &["--json", "--sizes", &sizes]).and_then(|rows| Ok((rows, run("bench_floor", &["--json"])?)))
    {
        Ok((rows, floor)) => json!({ "rows": rows, "floor": floor }),
        Err(e) => json!({ "problem": format!("{e:#}") }),
    }
}

/// One agent run at N from `source`.
fn measure(
    progress: &Progress,
    services: &[Svc],
    source: Source<'_>,
    budget: Duration,
    changes: usize,
) -> anyhow::Result<SourceRun> {
    let n = services.len();
    let what = match source {
        Source::Manifests(_) => "manifests",
        Source::Api(_) => "api",
    };
    // Guards drop in reverse order: agent, waiter, kubeconfig, server, cgroup, lab.
    let lab = Lab::new()?;
    let cgroup = Cgroup::new("proxy-bench")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut server = None;
    let mut kubeconfig = None;
    let mut flags: Vec<String> = Vec::new();
    match source {
        Source::Manifests(dir) => flags.extend(["--manifests".into(), dir.arg()]),
        Source::Api(_) => {
            let api = ApiServer::start_in(&runtime, &lab.client)?;
            let loaded = Instant::now();
            for svc in services {
                api.apply(&service(&svc.name).cluster_ip(&svc.vip.to_string()).port(80).build());
                api.apply(&bench::endpoint_slice(svc, &svc.endpoints));
            }
            // Forget the history of the load (a real server's is compacted too): half the memory.
            api.compact();
            progress.say(format!("{what}: {n} services and slices in the test API server ({:.1} s)", secs(loaded)));
            let path =
                bench::RemoveFile(std::env::temp_dir().join(format!("proxy-bench-scale-{}", std::process::id())));
            api.write_kubeconfig(&path.0);
            flags.extend(["--kubeconfig".into(), path.0.to_str().context("a UTF-8 temp path")?.to_owned()]);
            kubeconfig = Some(path);
            server = Some(api);
        }
    }
    flags.extend(
        ["--hostname-override", "node-1", "--cluster-cidr", bench::CLUSTER_CIDR, "--sync-period", SYNC_PERIOD]
            .map(String::from),
    );
    let last = &services[n - 1];
    let to = SocketAddr::from((last.vip, last.port));
    let mut waiter = Waiter::start(&lab.client, &cgroup, to, budget)?;
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut agent = BenchAgent::start(&lab.client, &cgroup, &flags)?;
    let mut out = SourceRun::default();

    match waiter.wait(&mut agent, budget)? {
        Some((at, answer)) => {
            out.serve_seconds = Some((at - agent.started()).as_secs_f64());
            out.answered_by = Some(answer);
        }
        None => out.problems.push(format!("{} ({to}) did not answer within {budget:?}", last.name)),
    }
    progress.say(format!("{what}: start → {} answered: {:?} s", last.name, out.serve_seconds));
    let remaining = budget.saturating_sub(agent.started().elapsed()).max(Duration::from_secs(5));
    match agent.wait_for_sync(0, |s| s.frontends >= n, remaining) {
        Ok((syncs, _)) => {
            out.full_sync_ms = Some(syncs.iter().map(|s| s.took_ms).sum());
            out.frontends = syncs.last().map_or(0, |s| s.frontends);
        }
        Err(e) => {
            out.frontends = agent.syncs().last().map_or(0, |s: &SyncLine| s.frontends);
            out.problems.push(format!("no full sync of {n} frontends: {}", first_line(&e.to_string())));
        }
    }
    out.usage = agent.usage()?;
    progress.say(format!(
        "{what}: full sync {:?} ms, {} frontends, peak RSS {:.1} MiB",
        out.full_sync_ms, out.frontends, out.usage.peak_rss_mib
    ));
    if out.full_sync_ms.is_some() && matches!(source, Source::Manifests(_)) {
        match agent.periodic_checks_ms(|s| s.frontends >= n, CHECKS, Duration::from_secs(60)) {
            Ok(ms) => {
                out.periodic_check_ms = Some(Summary::of(&ms).p50);
                out.periodic_check_max_ms = ms.iter().copied().reduce(f64::max);
            }
            Err(e) => out.problems.push(format!("periodic check: {}", first_line(&e.to_string()))),
        }
    }
    if let (Source::Api(measured), Some(api)) = (&source, &server)
        && out.serve_seconds.is_some()
    {
        let syncs_before = agent.syncs().len();
        let (latencies, problem) = endpoint_changes(&agent, api, measured, changes)?;
        if !latencies.is_empty() {
            out.endpoint_change_ms = Some(Summary::of(&latencies));
            // Let the last sync line reach the log.
            thread::sleep(Duration::from_millis(50));
            let own: Vec<f64> = agent.syncs().iter().skip(syncs_before).map(|s| s.took_ms).collect();
            out.change_sync_ms = Some(Summary::of(&own));
        }
        out.problems.extend(problem.map(|p| format!("endpoint changes: {p}")));
        out.lists = Some(json!({
            "services": api.list_count::<k8s_openapi::api::core::v1::Service>(),
            "endpointslices": api.list_count::<k8s_openapi::api::discovery::v1::EndpointSlice>(),
        }));
    }
    agent.check_running()?;
    out.usage = agent.usage()?;
    // Kept for a look at what the agent did (target/bench/ when run from the workspace).
    let kept = std::env::current_exe()?.with_file_name(format!("../bench/scale-{n}-{what}-agent.log"));
    if let Err(e) = agent.keep_log(&kept) {
        progress.say(format!("{what}: {e:#}"));
    }
    let log = agent.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    out.warnings = warnings.len();
    // The message, not the timestamp and level; long enough for the error and its hint.
    out.first_warning =
        warnings.first().map(|l| l.split_once(" WARN ").map_or(*l, |(_, m)| m.trim()).chars().take(600).collect());
    progress.say(format!(
        "{what}: periodic check {:?} ms, endpoint change {:?}, {} warnings",
        out.periodic_check_ms, out.endpoint_change_ms, out.warnings
    ));
    drop(agent);
    drop(waiter);
    drop(kubeconfig);
    drop(server);
    Ok(out)
}

/// `changes` endpoint changes of `measured` through the API server, each timed from the write
/// until the pinned maps serve the new endpoint and not the old one. Returns the latencies (ms)
/// measured, and why it stopped early, if it did.
fn endpoint_changes(
    agent: &BenchAgent,
    api: &ApiServer,
    measured: &Svc,
    changes: usize,
) -> anyhow::Result<(Vec<f64>, Option<String>)> {
    let probe = MapProbe::open(agent.bpf_root())?;
    let mut svc = measured.clone();
    let frontend = (svc.vip, svc.port);
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(changes);
    for i in 0..changes {
        bench::check_interrupt()?;
        if started.elapsed() > CHANGES_BUDGET {
            return Ok((latencies, Some(format!("out of time ({CHANGES_BUDGET:?}) after {i} changes"))));
        }
        // The tenth endpoint moves to a fresh address, change after change (outside both ranges).
        let old = svc.endpoints[ENDPOINTS - 1];
        let new = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 64, 1)) + i as u32);
        svc.endpoints[ENDPOINTS - 1] = new;
        let t0 = Instant::now();
        api.apply(&bench::endpoint_slice(&svc, &svc.endpoints));
        if let Err(e) = probe.wait(frontend, (new, svc.target_port), (old, svc.target_port), CHANGE_TIMEOUT) {
            return Ok((latencies, Some(format!("change {i} ({old} → {new}): {e}"))));
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
        thread::sleep(GAP);
    }
    Ok((latencies, None))
}

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_at_a_million_endpoints() {
        let vips: std::collections::BTreeSet<Ipv4Addr> = (0..100_000).map(vip).collect();
        assert_eq!(vips.len(), 100_000);
        assert!(vips.iter().all(|v| v.octets()[0] == 10 && (96..112).contains(&v.octets()[1])));
        let services = services(100_000);
        let endpoints: std::collections::BTreeSet<Ipv4Addr> =
            services.iter().flat_map(|s| s.endpoints.iter().copied()).collect();
        assert_eq!(endpoints.len(), 1_000_000);
        assert_eq!(services[99_999].endpoints, pod_addresses());
    }
}
