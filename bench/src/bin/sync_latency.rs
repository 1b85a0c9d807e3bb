//! Event → map latency: how long after a write to the API server the change is in the pinned
//! BPF maps. Not a test; prints p50/p90/p99/max and how they were measured.
//!
//! The test API server (real HTTP, real kube-rs watch) and the agent run in a network namespace
//! of their own that has only `lo` (so the agent's TC program has nothing to attach to), with a
//! fresh test cgroup for its socket programs. One service gets 1000 endpoint changes, one at a
//! time: change `i` replaces the endpoint of change `i - 1` with a new address. For each change
//! the clock starts just before the API write and stops when a poll of the pinned `backends` map
//! sees the new endpoint's entry and no longer sees the replaced one. The agent deletes a
//! replaced backend last, after the slot naming the new one is written, so that is the moment
//! the datapath serves the new set. Then 1000 background services are added and the same is
//! measured again: the cost of one change does not grow with the number of services.
//!
//! Run as root after `cargo build -p proxy-bench --bins -p proxy-tests --bin agent`: `target/debug/sync_latency`.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proxy_agent::datapath::AyaMaps;
use proxy_tests::{
    agent::Agent,
    apiserver::ApiServer,
    cgroup::Cgroup,
    fixtures::{service, slice},
    netns::Netns,
};

/// Endpoint changes per variant.
const CHANGES: usize = 1000;
/// Background services of the second variant.
const BACKGROUND: usize = 1000;
/// Pause after each change is seen: longer than the agent's `--min-sync-period` (10 ms), so
/// every change is a sync of its own and no change waits for the coalescing window.
const GAP: Duration = Duration::from_millis(12);
/// A change not seen within this is a failure.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole run stops after this.
const BUDGET: Duration = Duration::from_secs(110);
/// The measured service's port and its endpoints' port.
const PORT: u16 = 6666;
const TARGET_PORT: u16 = 80;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    match measure() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sync_latency failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The address of change `i`'s endpoint: 10.244.128.0 + i + 1.
fn endpoint(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 128, 0)) + 1 + i as u32)
}

/// The endpoint every change keeps.
const STEADY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

/// The measured service's slice after change `i`: the steady endpoint and `endpoint(i)`.
fn bench_slice(i: usize) -> EndpointSlice {
    slice("bench", "a")
        .port(TARGET_PORT.into())
        .endpoints([STEADY.to_string().as_str(), &endpoint(i).to_string()])
        .build()
}

/// A kubeconfig file, removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn measure() -> anyhow::Result<()> {
    let started = Instant::now();
    let agent_bin = std::env::current_exe()?.with_file_name("agent");
    if !agent_bin.exists() {
        bail!("{} is missing: build it with `cargo build -p proxy-tests --bin agent`", agent_bin.display());
    }
    // Guards drop in reverse order: the agent first, then the server, the cgroup, the namespace.
    let ns = Netns::new("latency")?;
    let cgroup = Cgroup::new("proxy-latency")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let server = ApiServer::start_in(&runtime, &ns)?;
    server.apply(&service("bench").cluster_ip("10.96.0.10").port(PORT.into()).build());
    server.apply(&bench_slice(0));
    let kubeconfig = TempFile(std::env::temp_dir().join(format!("proxy-latency-kubeconfig-{}", std::process::id())));
    server.write_kubeconfig(&kubeconfig.0);
    let kubeconfig_arg = kubeconfig.0.to_str().context("a UTF-8 temp path")?;
    let mut agent = Agent::start_in(
        Some(&ns),
        &agent_bin,
        cgroup.path(),
        &["--kubeconfig", kubeconfig_arg, "--hostname-override", "node-1"],
    )?;
    let maps = AyaMaps::from_pins(agent.bpf_root())?;
    wait_for(&maps, endpoint(0), None, CHANGE_TIMEOUT).context("the first endpoint is never programmed")?;

    println!("event → map latency: API write → change visible in the pinned BPF map");
    println!(
        "method: the test API server (HTTP, kube-rs watch) and the agent (--min-sync-period 10ms, debug log)\n\
         \x20       in a namespace of their own; {CHANGES} changes to one service's EndpointSlice, one at a time,\n\
         \x20       each replacing one endpoint; the clock runs from just before the API write until this process,\n\
         \x20       polling the pinned `backends` map back to back (AyaMaps::from_pins), sees the new endpoint and\n\
         \x20       no longer the replaced one (the writer's last step); a {} ms pause after each change keeps\n\
         \x20       changes out of each other's coalescing window",
        GAP.as_millis()
    );
    println!("{:<36} {:>7} {:>9} {:>9} {:>9} {:>9}", "", "changes", "p50", "p90", "p99", "max");
    let quiet = run_changes(&server, &maps, 1, started)?;
    report("1 service", &quiet);

    // Background services, all on one shared endpoint, so the backends map stays small and the
    // poll costs the same in both variants.
    let before = agent.syncs().len();
    for n in 0..BACKGROUND {
        let name = format!("bg-{n}");
        let ip = Ipv4Addr::new(10, 96, 4 + (n / 250) as u8, (n % 250 + 1) as u8);
        server.apply(&service(&name).cluster_ip(&ip.to_string()).port(PORT.into()).build());
        server.apply(&slice(&name, "a").port(TARGET_PORT.into()).endpoint("10.244.2.1").build());
    }
    let frontends = 1 + BACKGROUND;
    agent
        .wait_for_sync(before, |s| s.frontends == frontends, Duration::from_secs(30))
        .context("the background services are never all programmed")?;
    let loaded = run_changes(&server, &maps, CHANGES + 1, started)?;
    report(&format!("1 service + {BACKGROUND} background services"), &loaded);
    agent.check_running()?;
    Ok(())
}

/// Makes `CHANGES` changes starting at change number `first` and returns each one's latency.
fn run_changes(server: &ApiServer, maps: &AyaMaps, first: usize, started: Instant) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(CHANGES);
    for i in first..first + CHANGES {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted; cleaning up");
        }
        if started.elapsed() > BUDGET {
            bail!("out of time after {} changes", latencies.len());
        }
        let slice = bench_slice(i);
        let t0 = Instant::now();
        server.apply(&slice);
        wait_for(maps, endpoint(i), Some(endpoint(i - 1)), CHANGE_TIMEOUT)
            .with_context(|| format!("change {i} ({} → {}) never showed", endpoint(i - 1), endpoint(i)))?;
        latencies.push(t0.elapsed());
        thread::sleep(GAP);
    }
    Ok(latencies)
}

/// Polls the `backends` map until it holds `present` and not `gone`.
fn wait_for(maps: &AyaMaps, present: Ipv4Addr, gone: Option<Ipv4Addr>, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (mut seen, mut stale) = (false, false);
        for (_, backend) in maps.backends() {
            let address = proxy_common::addr::to_ip(&backend.address);
            seen |= address == IpAddr::from(present);
            stale |= Some(address) == gone.map(IpAddr::from);
        }
        if seen && !stale {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not seen within {timeout:?}");
        }
        // Give the agent and the server the CPU between polls without sleeping through a timer.
        thread::yield_now();
    }
}

fn report(what: &str, latencies: &[Duration]) {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let at = |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    println!(
        "{what:<36} {:>7} {:>9} {:>9} {:>9} {:>9}",
        sorted.len(),
        ms(at(0.50)),
        ms(at(0.90)),
        ms(at(0.99)),
        ms(sorted[sorted.len() - 1])
    );
}
