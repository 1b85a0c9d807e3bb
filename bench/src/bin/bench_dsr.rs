//! Throughput of one long TCP stream through node-1's nodePort to a pod on node-2, under
//! `--lb-mode snat` and `--lb-mode dsr`, as a ratio DSR / SNAT (issue 16).
//!
//! Topology, built fresh for every mode and round: the two-node bed of `docs/testing.md`
//! (`proxy_tests::topology::TwoNodes`, namespaces only) with an agent on each node and one pod
//! on node-2 running a sink (upload: client → pod) and a source (download: pod → client). Under
//! SNAT both directions pass node-1; under DSR the pod's packets (the download's data, the
//! upload's ACKs) go from node-2 straight to the client. Each stream runs for a fixed time; the
//! receiver's bytes over its time is the rate.
//!
//! `bench_dsr [--quick] [--json]`; run by `cargo xtask bench`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use proxy_bench::{self as bench, BenchAgent, Opts, Progress, SinkServer, median};
use proxy_tests::{
    cluster::{Manifests, NODE_IPS, TARGET_PORT},
    fixtures::{service, slice},
    netns::Netns,
    topology::TwoNodes,
};
use serde_json::json;

const SINK_PORT: u16 = 5201;
const SOURCE_PORT: u16 = 5202;
const UP_NODE_PORT: u16 = 30080;
const DOWN_NODE_PORT: u16 = 30081;

fn main() -> ExitCode {
    let opts = Opts::from_args();
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_dsr failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A server in a pod that writes 128 KiB chunks to every connection until it closes.
struct SourceServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SourceServer {
    fn start(ns: &Netns, port: u16) -> anyhow::Result<Self> {
        let listener = std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<TcpListener> {
                ns.enter()?;
                let listener = TcpListener::bind(("0.0.0.0", port))?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the listener thread panicked"))?
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let chunk = vec![0xa5u8; 128 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                    while !stop.load(Ordering::Relaxed) && conn.write_all(&chunk).is_ok() {}
                }
            })
        };
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for SourceServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The bed with both agents in one mode; servers stop and agents exit before the namespaces go.
struct Bed {
    sink: SinkServer,
    _source: SourceServer,
    _agents: Vec<BenchAgent>,
    _manifests: Manifests,
    topology: TwoNodes,
}

impl Bed {
    fn new(mode: &str) -> anyhow::Result<Self> {
        let topology = TwoNodes::new([&[], &["pod"]], TARGET_PORT, true)?;
        let pod = &topology.nodes[1].pods[0];
        let sink = SinkServer::start(&pod.ns, SINK_PORT)?;
        let source = SourceServer::start(&pod.ns, SOURCE_PORT)?;
        let manifests = Manifests::with_nodes("proxy-bench-dsr");
        let svc = service("stream")
            .cluster_ip("10.96.0.50")
            .named_port("up", 80, "TCP")
            .node_port(UP_NODE_PORT.into())
            .named_port("down", 81, "TCP")
            .node_port(DOWN_NODE_PORT.into())
            .build();
        let endpoints = slice("stream", "a")
            .named_port("up", SINK_PORT.into(), "TCP")
            .named_port("down", SOURCE_PORT.into(), "TCP")
            .endpoint_on(&pod.ip.to_string(), "node-2")
            .build();
        manifests.put(&svc, [&endpoints]);
        let mut agents = Vec::new();
        for node in &topology.nodes {
            let flags = manifests.agent_flags(&node.name, &["--lb-mode", mode]);
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let mut agent = BenchAgent::start(&node.ns, &node.cgroup, &flags)?;
            // Two ClusterIP ports and two nodePorts on each of the node's addresses.
            agent.wait_for_sync(0, |s| s.frontends >= 4, Duration::from_secs(30))?;
            agents.push(agent);
        }
        Ok(Self { sink, _source: source, _agents: agents, _manifests: manifests, topology })
    }

    /// One upload of `duration` through node-1's nodePort, in Gbit/s as the pod saw it.
    fn upload(&self, duration: Duration) -> anyhow::Result<f64> {
        let to = SocketAddr::from((NODE_IPS[0], UP_NODE_PORT));
        bench::wait_reachable(&self.topology.client, to, Duration::from_secs(10))?;
        let before = self.sink.count();
        bench::send_stream(&self.topology.client, to, duration)?;
        let received = self.sink.wait_for_stream(before, Duration::from_secs(10))?;
        Ok(received.bytes as f64 * 8.0 / received.elapsed.as_secs_f64() / 1e9)
    }

    /// One download of `duration` through node-1's nodePort, in Gbit/s as the client saw it.
    fn download(&self, duration: Duration) -> anyhow::Result<f64> {
        let to = SocketAddr::from((NODE_IPS[0], DOWN_NODE_PORT));
        std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<f64> {
                self.topology.client.enter()?;
                let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                    .with_context(|| format!("connecting to {to}"))?;
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut buf = vec![0u8; 256 * 1024];
                let started = Instant::now();
                let mut bytes = 0u64;
                while started.elapsed() < duration {
                    let n = stream.read(&mut buf).with_context(|| format!("reading from {to}"))?;
                    anyhow::ensure!(n > 0, "{to} closed the stream");
                    bytes += n as u64;
                }
                Ok(bytes as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
        })
    }
}

fn run(opts: Opts) -> anyhow::Result<()> {
    let progress = Progress::new("dsr");
    let (seconds, rounds) = if opts.quick { (1, 1) } else { (3, 3) };
    let duration = Duration::from_secs(seconds);
    progress.say(format!("one TCP stream of {seconds} s each way through node-1 to node-2's pod, {rounds} round(s)"));
    let modes = ["snat", "dsr"];
    // [mode][direction] → rates.
    let mut rates: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; modes.len()];
    for round in 0..rounds {
        for (i, mode) in modes.iter().enumerate() {
            bench::check_interrupt()?;
            let bed = Bed::new(mode).with_context(|| format!("the two nodes under --lb-mode {mode}"))?;
            let up = bed.upload(duration).with_context(|| format!("the upload under {mode}"))?;
            let down = bed.download(duration).with_context(|| format!("the download under {mode}"))?;
            progress
                .say(format!("round {}/{rounds} {mode}: upload {up:.2} Gbit/s, download {down:.2} Gbit/s", round + 1));
            rates[i][0].push(up);
            rates[i][1].push(down);
        }
    }
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for (d, direction) in ["upload", "download"].iter().enumerate() {
        let (snat, dsr) = (median(&rates[0][d]), median(&rates[1][d]));
        rows.push(vec![(*direction).into(), format!("{snat:.2}"), format!("{dsr:.2}"), format!("{:.3}", dsr / snat)]);
        results.push(json!({ "direction": direction, "snat_gbps": snat, "dsr_gbps": dsr, "ratio": dsr / snat }));
    }
    let value = json!({ "seconds": seconds, "rounds": rounds, "results": results });
    let text = bench::table(&["stream", "SNAT Gbit/s", "DSR Gbit/s", "DSR / SNAT"], &rows);
    bench::emit(opts, &value, &text);
    Ok(())
}
