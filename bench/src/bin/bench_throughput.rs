//! Throughput of one long TCP stream through a NodePort, as a ratio against a direct stream to
//! the same pod measured just before in the same topology: ours (the agent's TC program), kube-
//! proxy's iptables rules and kube-proxy's nftables rules (loaded in the node's namespace).
//!
//! Topology, built fresh for every datapath and round (namespaces only): an external client
//! (172.18.0.100) with a veth to node-1 (172.18.0.2), which routes to a pod (10.244.1.10 on its
//! bridge) running a sink server. The direct stream goes client → node (forwarded, nothing
//! programmed yet) → pod; then the datapath is programmed and the stream goes to 172.18.0.2:30080
//! instead (DNAT to the pod, SNAT to the node as `externalTrafficPolicy: Cluster` asks). Each
//! stream writes 128 KiB chunks for a fixed time; the receiver's bytes over its time is the rate.
//!
//! `bench_throughput [--quick] [--json]`; run by `cargo xtask bench`.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use proxy_bench::{self as bench, BenchAgent, Opts, Progress, SinkServer, median, nftables};
use proxy_tests::{
    cgroup::Cgroup,
    cluster::{CLIENT_IP, NODE_IPS, cluster_node},
    fixtures::{TempDir, write_text, yaml},
    netns::{Netns, veth},
};
use serde_json::json;

const NODE: Ipv4Addr = NODE_IPS[0];
const CLIENT: Ipv4Addr = CLIENT_IP;
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_PORT: u16 = 5201;
const NODE_PORT: u16 = 30080;

fn main() -> ExitCode {
    let opts = Opts::from_args();
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_throughput failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The external client, node-1 and the pod; the server stops before the namespaces go.
struct Topology {
    sink: SinkServer,
    _pod: Netns,
    node: Netns,
    client: Netns,
}

impl Topology {
    fn new() -> anyhow::Result<Self> {
        let client = Netns::new("bench-ext")?;
        let node = Netns::new("bench-node")?;
        let pod = Netns::new("bench-tpod")?;
        veth(&node, "eth0", &client, "eth0")?;
        node.ip(&["addr", "add", &format!("{NODE}/16"), "dev", "eth0"])?;
        node.ip(&["link", "add", "br0", "type", "bridge"])?;
        node.ip(&["addr", "add", "10.244.1.1/24", "dev", "br0"])?;
        node.ip(&["link", "set", "br0", "up"])?;
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        veth(&node, "p0", &pod, "eth0")?;
        node.ip(&["link", "set", "p0", "master", "br0"])?;
        pod.ip(&["addr", "add", &format!("{POD}/24"), "dev", "eth0"])?;
        pod.ip(&["route", "add", "default", "via", "10.244.1.1"])?;
        client.ip(&["addr", "add", &format!("{CLIENT}/16"), "dev", "eth0"])?;
        client.ip(&["route", "add", "10.244.0.0/16", "via", &NODE.to_string()])?;
        let sink = SinkServer::start(&pod, POD_PORT)?;
        Ok(Self { sink, _pod: pod, node, client })
    }

    /// One stream of `seconds` from the client to `to`, in Gbit/s as the receiver saw it.
    fn stream(&self, to: SocketAddr, duration: Duration) -> anyhow::Result<f64> {
        bench::wait_reachable(&self.client, to, Duration::from_secs(10))?;
        let before = self.sink.count();
        bench::send_stream(&self.client, to, duration)?;
        let received = self.sink.wait_for_stream(before, Duration::from_secs(10))?;
        Ok(received.bytes as f64 * 8.0 / received.elapsed.as_secs_f64() / 1e9)
    }
}

/// The service behind the nodePort.
fn svc() -> bench::Svc {
    bench::Svc {
        name: "stream".into(),
        vip: Ipv4Addr::new(10, 96, 0, 50),
        port: 80,
        target_port: POD_PORT,
        node_port: Some(NODE_PORT),
        endpoints: vec![POD],
    }
}

/// Keeps a datapath programmed (the agent before its cgroup and manifests).
enum Programmed {
    Ours { _agent: BenchAgent, _dir: TempDir, _cgroup: Cgroup },
    Rules,
}

fn program(datapath: &str, topology: &Topology) -> anyhow::Result<Programmed> {
    let services = [svc()];
    match datapath {
        "ours" => {
            let cgroup = Cgroup::new("proxy-bench")?;
            let dir = TempDir::new("proxy-bench-manifests")?;
            let text = yaml(&cluster_node(0, "")) + &bench::manifests(&services);
            write_text(dir.path(), "cluster.yaml", &text)?;
            let mut agent = BenchAgent::start(
                &topology.node,
                &cgroup,
                &["--manifests", &dir.arg(), "--hostname-override", "node-1"],
            )?;
            // The ClusterIP and the nodePort frontend.
            agent.wait_for_sync(0, |s| s.frontends >= 2, Duration::from_secs(30))?;
            Ok(Programmed::Ours { _agent: agent, _dir: dir, _cgroup: cgroup })
        }
        "iptables" => {
            bench::iptables_load(&topology.node, &services, Duration::from_secs(30))?;
            Ok(Programmed::Rules)
        }
        _ => {
            bench::nft_apply(&topology.node, &nftables::full(&services, &[NODE]), Duration::from_secs(30))?;
            Ok(Programmed::Rules)
        }
    }
}

fn run(opts: Opts) -> anyhow::Result<()> {
    let progress = Progress::new("throughput");
    let (seconds, rounds) = if opts.quick { (1, 1) } else { (3, 3) };
    let duration = Duration::from_secs(seconds);
    progress.say(format!("one TCP stream of {seconds} s through a NodePort vs direct, {rounds} round(s)"));
    let datapaths: Vec<&str> = ["ours", "iptables", "nftables"].into_iter().filter(|d| opts.wants(d)).collect();
    let mut direct: Vec<Vec<f64>> = vec![Vec::new(); datapaths.len()];
    let mut via: Vec<Vec<f64>> = vec![Vec::new(); datapaths.len()];
    for round in 0..rounds {
        for (i, datapath) in datapaths.iter().enumerate() {
            bench::check_interrupt()?;
            let topology = Topology::new()?;
            let d = topology
                .stream(SocketAddr::V4(SocketAddrV4::new(POD, POD_PORT)), duration)
                .context("the direct stream")?;
            let programmed = program(datapath, &topology).with_context(|| format!("programming {datapath}"))?;
            let v = topology
                .stream(SocketAddr::V4(SocketAddrV4::new(NODE, NODE_PORT)), duration)
                .with_context(|| format!("the stream through {datapath}'s nodePort"))?;
            drop(programmed);
            progress.say(format!(
                "round {}/{rounds} {datapath}: direct {d:.2} Gbit/s, via nodePort {v:.2} Gbit/s (ratio {:.3})",
                round + 1,
                v / d
            ));
            direct[i].push(d);
            via[i].push(v);
        }
    }
    let mut results = Vec::new();
    let mut rows = Vec::new();
    for (i, datapath) in datapaths.iter().enumerate() {
        let ratios: Vec<f64> = via[i].iter().zip(&direct[i]).map(|(v, d)| v / d).collect();
        let (d, v, r) = (median(&direct[i]), median(&via[i]), median(&ratios));
        rows.push(vec![(*datapath).into(), format!("{d:.2}"), format!("{v:.2}"), format!("{r:.3}")]);
        results.push(json!({
            "datapath": datapath, "direct_gbps": d, "nodeport_gbps": v, "ratio": r, "ratios": ratios,
        }));
    }
    let value = json!({ "seconds": seconds, "rounds": rounds, "results": results });
    let text = bench::table(&["datapath", "direct Gbit/s", "via nodePort Gbit/s", "ratio"], &rows);
    bench::emit(opts, &value, &text);
    Ok(())
}
