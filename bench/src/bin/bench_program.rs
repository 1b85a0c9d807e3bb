//! Programming time, side by side, and the agent's memory and CPU.
//!
//! 1. Full program of N services × 10 endpoints, "state known → datapath ready": ours is the
//!    agent's first full sync (its `synced` line's `took_ms`: model, diff and every map write),
//!    with the wall time from starting the process (BPF load, reading the manifest directory)
//!    beside it; the peers' is one `iptables-restore --noflush` of kube-proxy's ruleset (after the
//!    jump rules kube-proxy installs once) and one `nft -f` of kube-proxy's nftables transaction,
//!    each in a fresh namespace.
//! 2. One endpoint change at the largest N: the measured service's tenth endpoint is replaced,
//!    change after change. Ours: the agent watches the real test API server over HTTP (kube-rs),
//!    and the clock runs from the API write until the pinned maps serve the new endpoint and no
//!    longer the old one (read back with single lookups: master entry, slots, backends). The
//!    peers: kube-proxy's partial sync for that change, timed (`iptables-restore --noflush` with
//!    KUBE-SERVICES whole and the changed service's chains, as `MinimizeIPTablesRestore` does;
//!    an `nft -f` transaction with the new endpoint chain and the rewritten service chain).
//! 3. The API-driven agent's peak RSS (VmHWM) and CPU time (utime + stime) after its full sync
//!    of N × 10, and the CPU its endpoint changes cost.
//!
//! `bench_program [--quick] [--json]`; run by `cargo xtask bench`.

use std::{
    net::Ipv4Addr,
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use proxy_bench::{
    self as bench, BenchAgent, MapProbe, Opts, Progress, Summary, Svc, SyncLine, TimedOut, Usage, iptables, median,
    nftables,
};
use proxy_tests::{
    apiserver::ApiServer,
    cgroup::Cgroup,
    fixtures::{TempDir, service, write_text},
    netns::Netns,
};
use serde_json::json;

/// Endpoints per service.
const ENDPOINTS: usize = 10;
/// Pause after each of our changes is seen: longer than the agent's `--min-sync-period` (10 ms),
/// so no change waits in the coalescing window of the one before.
const GAP: Duration = Duration::from_millis(12);
/// One of our changes not seen within this is a failure.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let opts = Opts::from_args();
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_program failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Repetitions of a full program at `n` services.
fn reps(opts: Opts, n: usize, peer: bool) -> usize {
    match (opts.quick, peer && n >= 10_000) {
        (true, _) => 1,
        // A peer's load of 10 000 × 10 takes tens of seconds: once.
        (false, true) => 1,
        (false, false) => 3,
    }
}

/// How long a peer's full load may take: `--noflush` (kube-proxy's invocation) grows much faster
/// than linearly with iptables-nft, so it is cut off and reported as a lower bound.
fn peer_timeout(opts: Opts, peer: &str) -> Duration {
    match (opts.quick, peer == "iptables --noflush") {
        (true, true) => Duration::from_secs(60),
        (false, true) => Duration::from_secs(120),
        (true, false) => Duration::from_secs(120),
        (false, false) => Duration::from_secs(600),
    }
}

/// The address of change `i`'s new endpoint (outside the background range).
fn changed_endpoint(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 64, 0)) + 1 + i as u32)
}

fn run(opts: Opts) -> anyhow::Result<()> {
    let progress = Progress::new("program");
    let largest = *opts.sizes().last().context("no sizes")?;
    let mut full = Vec::new();
    let mut rows = Vec::new();
    // The peers' namespaces at the largest N stay loaded for the change measurement.
    let mut kept_iptables = None;
    let mut kept_nft = None;
    for &n in opts.sizes() {
        let services = bench::synthetic(n, ENDPOINTS);
        // Ours.
        let mut runs = Vec::new();
        for rep in 0..if opts.wants("ours") { reps(opts, n, false) } else { 0 } {
            bench::check_interrupt()?;
            let r = ours_full(&services).with_context(|| format!("our full sync of {n} × {ENDPOINTS}"))?;
            progress.say(format!(
                "ours N={n}×{ENDPOINTS} run {}: sync {:.1} ms, start → synced {:.0} ms, peak RSS {:.1} MiB, \
                 periodic check {:.1} ms",
                rep + 1,
                r.sync_s * 1e3,
                r.wall_s * 1e3,
                r.usage.peak_rss_mib,
                r.check_s * 1e3
            ));
            runs.push(r);
        }
        if !runs.is_empty() {
            push_ours(&mut rows, &mut full, n, &runs);
        }
        // The peers.
        for peer in ["iptables", "iptables --noflush", "nftables"].into_iter().filter(|p| opts.wants(p)) {
            let mut times = Vec::new();
            let mut timed_out = false;
            let runs = if peer == "iptables --noflush" { 1 } else { reps(opts, n, true) };
            for rep in 0..runs {
                bench::check_interrupt()?;
                let ns = Netns::new("bench-rules")?;
                progress.say(format!("{peer} N={n}×{ENDPOINTS} run {}: loading", rep + 1));
                let timeout = peer_timeout(opts, peer);
                let took = match peer {
                    "iptables" => bench::iptables_load(&ns, &services, timeout),
                    "iptables --noflush" => bench::iptables_load_noflush(&ns, &services, timeout),
                    _ => bench::nft_apply(&ns, &nftables::full(&services, &[]), timeout),
                };
                let took = match took {
                    Ok(took) => took.as_secs_f64(),
                    // Out of time: the timeout is a lower bound of the load time.
                    Err(e) if e.downcast_ref::<TimedOut>().is_some() => {
                        timed_out = true;
                        timeout.as_secs_f64()
                    }
                    Err(e) => return Err(e.context(format!("{peer} with {n} × {ENDPOINTS}"))),
                };
                progress.say(format!(
                    "{peer} N={n}×{ENDPOINTS} run {}: {}{took:.3} s",
                    rep + 1,
                    if timed_out { "killed after " } else { "" }
                ));
                times.push(took);
                if n == largest && peer != "iptables --noflush" {
                    if peer == "iptables" {
                        kept_iptables = Some(ns);
                    } else {
                        kept_nft = Some(ns);
                    }
                }
            }
            let seconds = median(&times);
            let shown = if timed_out { format!("> {seconds:.0}") } else { format!("{seconds:.4}") };
            rows.push(vec![peer.into(), format!("{n}×{ENDPOINTS}"), shown, String::new()]);
            full.push(json!({
                "datapath": peer, "services": n, "endpoints": n * ENDPOINTS, "runs": times.len(),
                "seconds": seconds, "all_seconds": times, "timed_out": timed_out,
            }));
        }
    }

    // One endpoint change at the largest N.
    let services = bench::synthetic(largest, ENDPOINTS);
    let ours = if opts.wants("ours") {
        let changes = if opts.quick { 200 } else { 1_000 };
        Some(ours_changes_run(&progress, &services, changes).context("our endpoint changes")?)
    } else {
        None
    };
    let peer_budget = Duration::from_secs(if opts.quick { 10 } else { 60 });
    let peer_count = if opts.quick { 50 } else { 200 };
    let ipt = match kept_iptables.take() {
        Some(ns) => Some(peer_changes(&progress, "iptables", &ns, &services, peer_count, peer_budget)?),
        None => None,
    };
    let nft = match kept_nft.take() {
        Some(ns) => Some(peer_changes(&progress, "nftables", &ns, &services, peer_count, peer_budget)?),
        None => None,
    };

    let mut change_rows = Vec::new();
    if let Some((ours, _)) = &ours {
        change_rows.push(change_row("ours (API write → maps)", &ours.latency_ms));
        change_rows.push(change_row("ours (agent's sync alone)", &ours.sync_ms));
    }
    if let Some(ipt) = &ipt {
        change_rows.push(change_row("iptables (partial restore)", ipt));
    }
    if let Some(nft) = &nft {
        change_rows.push(change_row("nftables (transaction)", nft));
    }
    let mut text = format!("full program, N services × {ENDPOINTS} endpoints (seconds)\n");
    text += &bench::table(&["datapath", "size", "program s", "notes"], &rows);
    text += &format!("\none endpoint change at N = {largest} × {ENDPOINTS} (ms)\n");
    text += &bench::table(&["datapath", "changes", "p50 ms", "p99 ms", "max ms"], &change_rows);
    let mut value = json!({
        "endpoints_per_service": ENDPOINTS,
        "full_program": full,
        "endpoint_change": {
            "services": largest,
            "iptables": ipt.as_ref().map(ms),
            "nftables": nft.as_ref().map(ms),
        },
    });
    if let Some((ours, agent)) = &ours {
        let changes_cpu = agent.after_changes.cpu_ms - agent.after_sync.cpu_ms;
        text += &format!(
            "\nagent at N = {largest} × {ENDPOINTS} (API source): after the full sync peak RSS {:.1} MiB, CPU {:.0} ms; \
             {} endpoint changes cost {changes_cpu:.0} ms CPU, peak RSS after them {:.1} MiB\n",
            agent.after_sync.peak_rss_mib, agent.after_sync.cpu_ms, ours.latency_ms.n, agent.after_changes.peak_rss_mib
        );
        value["endpoint_change"]["ours"] = ms(&ours.latency_ms);
        value["endpoint_change"]["ours_agent_sync"] = ms(&ours.sync_ms);
        value["agent"] = json!({
            "services": largest,
            "endpoints": largest * ENDPOINTS,
            "full_sync_seconds": agent.sync_s,
            "after_full_sync": agent.after_sync,
            "changes": ours.latency_ms.n,
            "after_changes": agent.after_changes,
            "changes_cpu_ms": changes_cpu,
        });
    }
    bench::emit(opts, &value, &text);
    Ok(())
}

fn ms(s: &Summary) -> serde_json::Value {
    json!({ "n": s.n, "mean_ms": s.mean, "p50_ms": s.p50, "p99_ms": s.p99, "max_ms": s.max })
}

fn change_row(what: &str, s: &Summary) -> Vec<String> {
    vec![what.into(), s.n.to_string(), format!("{:.2}", s.p50), format!("{:.2}", s.p99), format!("{:.2}", s.max)]
}

/// Adds ours' full-program row (medians over runs).
fn push_ours(rows: &mut Vec<Vec<String>>, full: &mut Vec<serde_json::Value>, n: usize, runs: &[OursFull]) {
    let sync_s = median(&runs.iter().map(|r| r.sync_s).collect::<Vec<_>>());
    let wall_s = median(&runs.iter().map(|r| r.wall_s).collect::<Vec<_>>());
    let peak = median(&runs.iter().map(|r| r.usage.peak_rss_mib).collect::<Vec<_>>());
    let cpu = median(&runs.iter().map(|r| r.usage.cpu_ms).collect::<Vec<_>>());
    let check = median(&runs.iter().map(|r| r.check_s).collect::<Vec<_>>());
    rows.push(vec![
        "ours".into(),
        format!("{n}×{ENDPOINTS}"),
        format!("{sync_s:.4}"),
        format!(
            "{wall_s:.3} (start → synced, {peak:.1} MiB peak, {cpu:.0} ms CPU); periodic check {:.1} ms",
            check * 1e3
        ),
    ]);
    full.push(json!({
        "datapath": "ours", "services": n, "endpoints": n * ENDPOINTS, "runs": runs.len(),
        "seconds": sync_s, "wall_seconds": wall_s, "peak_rss_mib": peak, "cpu_ms": cpu,
        "periodic_check_seconds": check,
        "all_seconds": runs.iter().map(|r| r.sync_s).collect::<Vec<_>>(),
    }));
}

/// One full sync of ours from a manifest directory.
struct OursFull {
    sync_s: f64,
    wall_s: f64,
    usage: Usage,
    /// The first periodic check after it (`--sync-period`: every map entry compared with what
    /// was programmed, stale affinity/socket/flow entries looked for).
    check_s: f64,
}

/// The periodic check's cost: `--sync-period` of the full-program runs.
const SYNC_PERIOD: &str = "2s";

fn ours_full(services: &[Svc]) -> anyhow::Result<OursFull> {
    let n = services.len();
    let ns = Netns::new("bench-agent")?;
    let cgroup = Cgroup::new("proxy-bench")?;
    let dir = TempDir::new("proxy-bench-manifests")?;
    write_text(dir.path(), "services.yaml", &bench::manifests(services))?;
    let mut agent = BenchAgent::start(
        &ns,
        &cgroup,
        &[
            "--manifests",
            &dir.arg(),
            "--hostname-override",
            "node-1",
            "--cluster-cidr",
            bench::CLUSTER_CIDR,
            "--sync-period",
            SYNC_PERIOD,
        ],
    )?;
    let (syncs, seen) = agent.wait_for_sync(0, |s| s.frontends >= n, Duration::from_secs(300))?;
    check_errors(&syncs)?;
    let usage = agent.usage()?;
    let check_s = agent.periodic_check_ms(|s| s.frontends >= n, Duration::from_secs(60))? / 1e3;
    Ok(OursFull {
        sync_s: syncs.iter().map(|s| s.took_ms).sum::<f64>() / 1e3,
        wall_s: (seen - agent.started()).as_secs_f64(),
        usage,
        check_s,
    })
}

fn check_errors(syncs: &[SyncLine]) -> anyhow::Result<()> {
    let errors: usize = syncs.iter().map(|s| s.errors).sum();
    if errors > 0 {
        bail!("the agent's sync reported {errors} failed map operations");
    }
    Ok(())
}

/// Our endpoint changes through the API server.
struct OursChanges {
    latency_ms: Summary,
    sync_ms: Summary,
}

/// The API-driven agent's figures.
struct AgentFigures {
    sync_s: f64,
    after_sync: Usage,
    after_changes: Usage,
}

fn ours_changes_run(
    progress: &Progress,
    services: &[Svc],
    changes: usize,
) -> anyhow::Result<(OursChanges, AgentFigures)> {
    let n = services.len();
    // Guards drop in reverse order: the agent, the kubeconfig, the server, the cgroup, the namespace.
    let ns = Netns::new("bench-api")?;
    let cgroup = Cgroup::new("proxy-bench")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let server = ApiServer::start_in(&runtime, &ns)?;
    progress.say(format!("ours: {n} services × {ENDPOINTS} endpoints into the test API server"));
    for svc in services {
        server.apply(&service(&svc.name).cluster_ip(&svc.vip.to_string()).port(svc.port.into()).build());
        server.apply(&bench::endpoint_slice(svc, &svc.endpoints));
    }
    let kubeconfig =
        bench::RemoveFile(std::env::temp_dir().join(format!("proxy-bench-kubeconfig-{}", std::process::id())));
    server.write_kubeconfig(&kubeconfig.0);
    let kubeconfig_arg = kubeconfig.0.to_str().context("a UTF-8 temp path")?.to_owned();
    let mut agent = BenchAgent::start(
        &ns,
        &cgroup,
        &["--kubeconfig", &kubeconfig_arg, "--hostname-override", "node-1", "--cluster-cidr", bench::CLUSTER_CIDR],
    )?;
    let (syncs, _) = agent.wait_for_sync(0, |s| s.frontends >= n, Duration::from_secs(300))?;
    check_errors(&syncs)?;
    let sync_s = syncs.iter().map(|s| s.took_ms).sum::<f64>() / 1e3;
    let after_sync = agent.usage()?;
    progress.say(format!(
        "ours: API source, full sync of {n}×{ENDPOINTS} {:.1} ms; peak RSS {:.1} MiB, CPU {:.0} ms; {changes} endpoint changes",
        sync_s * 1e3,
        after_sync.peak_rss_mib,
        after_sync.cpu_ms
    ));
    let probe = MapProbe::open(agent.bpf_root())?;
    let mut measured = services[n - 1].clone();
    let frontend = (measured.vip, measured.port);
    let mut old = measured.endpoints[ENDPOINTS - 1];
    let syncs_before = agent.syncs().len();
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(changes);
    for i in 0..changes {
        bench::check_interrupt()?;
        if started.elapsed() > Duration::from_secs(240) {
            bail!("out of time after {i} changes");
        }
        let new = changed_endpoint(i);
        measured.endpoints[ENDPOINTS - 1] = new;
        let slice = bench::endpoint_slice(&measured, &measured.endpoints);
        let t0 = Instant::now();
        server.apply(&slice);
        probe
            .wait(frontend, (new, measured.target_port), (old, measured.target_port), CHANGE_TIMEOUT)
            .with_context(|| format!("change {i} ({old} → {new}) never showed:\n{}", tail(&agent.log())))?;
        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
        old = new;
        if (i + 1) % 200 == 0 {
            progress.say(format!("ours: {} changes, p50 so far {:.2} ms", i + 1, median(&latencies)));
        }
        thread::sleep(GAP);
    }
    agent.check_running()?;
    // Let the last sync line reach the log.
    thread::sleep(Duration::from_millis(50));
    let change_syncs: Vec<f64> = agent.syncs().iter().skip(syncs_before).map(|s| s.took_ms).collect();
    let after_changes = agent.usage()?;
    drop(agent);
    drop(server);
    Ok((
        OursChanges { latency_ms: Summary::of(&latencies), sync_ms: Summary::of(&change_syncs) },
        AgentFigures { sync_s, after_sync, after_changes },
    ))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// A peer's partial sync for one endpoint change, timed, repeated `count` times or until
/// `budget` is spent.
fn peer_changes(
    progress: &Progress,
    peer: &str,
    ns: &Netns,
    services: &[Svc],
    count: usize,
    budget: Duration,
) -> anyhow::Result<Summary> {
    let mut services = services.to_vec();
    let last = services.len() - 1;
    let started = Instant::now();
    let mut times = Vec::new();
    for i in 0..count {
        bench::check_interrupt()?;
        if started.elapsed() > budget {
            break;
        }
        let old = services[last].endpoints[ENDPOINTS - 1];
        let new = changed_endpoint(i);
        services[last].endpoints[ENDPOINTS - 1] = new;
        let took = if peer == "iptables" {
            let old_chain = iptables::sep_chain(&services[last], old);
            bench::iptables_apply(ns, &iptables::partial(&services, last, &[old_chain]), Duration::from_secs(60))?
        } else {
            bench::nft_apply(ns, &nftables::change(&services[last], old, new), Duration::from_secs(60))?
        };
        times.push(took.as_secs_f64() * 1e3);
    }
    let summary = Summary::of(&times);
    progress.say(format!(
        "{peer}: {} endpoint changes at N={}: p50 {:.1} ms, p99 {:.1} ms",
        summary.n,
        services.len(),
        summary.p50,
        summary.p99
    ));
    Ok(summary)
}
