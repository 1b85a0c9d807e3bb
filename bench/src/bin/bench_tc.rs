//! Per-packet cost of the TC NodePort path with `BPF_PROG_TEST_RUN` (aya's `TestRun`): the real
//! object, loaded by the agent's own datapath code inside a throwaway network namespace and
//! cgroup, with 1 and with 10 000 services programmed through the real map writer. Prints
//! ns/packet for a new flow (selection, two conntrack inserts, DNAT+SNAT), for an established
//! one (conntrack hit, DNAT+SNAT) and for a packet to no frontend, medians of several runs. The
//! FIB lookup finds no route in the empty namespace, so the redirect itself is not part of the
//! figure. (A repeated run sees the packet its first run translated: the established flow gets
//! a second entry that translates it back, so every repeat is a hit with a full rewrite; new
//! flows are measured one call at a time with the call overhead measured and subtracted.)
//!
//! IPv6: an IPv6 nodePort (16 IPv6 backends) is programmed beside the IPv4 one, and its
//! established flow is measured the same way in the same rounds (`established_v6_ns`): the
//! extension-header walk, 16-byte addresses and the pseudo-header checksum against IPv4's.
//!
//! Tracing: each round also measures new flows with `trace_on` set (as `proxy-agent trace`
//! sets it), the ring drained before the measurement so every event is written (2 000 events
//! fit), side by side with the untraced ones; `new_flow_traced_ns` and the ratio are reported.
//! Established flows and packets for no frontend write no event and read no flag.
//!
//! `bench_tc [--json] [--sizes 1,10000,100000]` (services per row; 1 and 10 000 unless given:
//! the established flow should cost the same at any size); run by `cargo xtask bench`, and by
//! `bench_scale` at its N.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context as _;
use aya::{
    maps::{Map, MapData},
    programs::{TestRun as _, TestRunOptions},
};
use proxy_agent::{
    datapath::{Datapath, LoadOptions, writer::Writer},
    model::{Endpoint, Frontend, FrontendEntry, FrontendKind, ServicePortName},
};
use proxy_common::{
    addr,
    conntrack::{CtKey, CtValue},
    maps,
    proto::TCP,
    service::{SVC_F_CLUSTER_IP, SVC_F_NODE_PORT},
};
use proxy_tests::{
    cgroup::Cgroup,
    cluster::{CLIENT_IP, NODE_IPS},
    frames::{self, SYN},
    netns::Netns,
};

const NODE: Ipv4Addr = NODE_IPS[0];
const CLIENT: Ipv4Addr = CLIENT_IP;
/// The IPv6 node and client, in kind's IPv6 node network.
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 0x64);
const NODE_PORT: u16 = 30066;
const REPEAT: u32 = 1_000_000;
/// Calls per measurement; the new flows of all runs, spread over 16 backends, stay far from
/// exhausting SNAT ports.
const NEW_FLOWS: u16 = 2_000;
const RUNS: usize = 5;

fn entry(name: &str, flags: u16, backends: &[IpAddr]) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName { namespace: "bench".into(), name: name.into(), port: String::new(), proto: TCP },
        kind: if flags & SVC_F_NODE_PORT != 0 { FrontendKind::NodePort } else { FrontendKind::ClusterIp },
        flags,
        affinity_timeout: 0,
        backends: backends
            .iter()
            .map(|&address| Endpoint { address, port: 80, local: false, terminating: false, dsr: false })
            .collect(),
        internal: None,
        source_ranges: Vec::new(),
    }
}

/// An Ethernet + IPv4 + TCP SYN from the client's `sport` to the node's nodePort.
fn syn(sport: u16) -> Vec<u8> {
    syn_to(sport, NODE_PORT)
}

/// The same SYN to another port of the node.
fn syn_to(sport: u16, dport: u16) -> Vec<u8> {
    frames::tcp_frame((CLIENT, sport), (NODE, dport), SYN)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// ns/packet of the TC program's paths.
struct Costs {
    /// A packet for no frontend (parse, conntrack miss, frontend miss).
    pass: f64,
    /// A connection's first packet (selection, two conntrack inserts, DNAT + SNAT).
    new_flow: f64,
    /// A packet of a tracked flow (conntrack hit, DNAT + SNAT).
    established: f64,
    /// The same over IPv6.
    established_v6: f64,
    /// A new flow with tracing on (its event written to the ring).
    new_flow_traced: f64,
}

/// The costs with `services` extra services programmed.
fn measure(services: u32) -> anyhow::Result<Costs> {
    let ns = Netns::new("bench")?;
    let cgroup = Cgroup::new("proxy-bench")?;
    let pins = Pins(std::path::PathBuf::from(format!("/sys/fs/bpf/proxy-bench-{}-{services}", std::process::id())));
    let bpf_root = &pins.0;
    // Load and attach inside the throwaway namespace, on a thread of its own.
    // `pins` outlives the scope: programs and pins go when this function returns.
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<Costs> {
            ns.enter()?;
            let opts = LoadOptions {
                bpf_root: bpf_root.to_owned(),
                cgroup: cgroup.path().to_owned(),
                services_max: maps::SERVICES_MAX_ENTRIES,
                backends_max: maps::BACKENDS_MAX_ENTRIES,
                affinity_max: maps::AFFINITY_MAX_ENTRIES,
                conntrack_max: maps::CONNTRACK_MAX_ENTRIES,
                sock_hostns_only: false,
                preallocate: false,
            };
            let (datapath, store) = Datapath::load(&opts).context("loading the datapath")?;
            let mut writer = Writer::new(store);
            let backends: Vec<IpAddr> = (0..16).map(|i| Ipv4Addr::new(10, 244, 1 + i % 2, 2 + i / 2).into()).collect();
            let nodeport = Frontend { address: NODE.into(), port: NODE_PORT, proto: TCP };
            writer.upsert(nodeport, &entry("nodeport", SVC_F_NODE_PORT, &backends))?;
            let backends: Vec<IpAddr> =
                (0..16).map(|i| Ipv6Addr::new(0xfd00, 0x10, 0x244, 1 + i % 2, 0, 0, 0, 2 + i / 2).into()).collect();
            let nodeport = Frontend { address: NODE6.into(), port: NODE_PORT, proto: TCP };
            writer.upsert(nodeport, &entry("nodeport6", SVC_F_NODE_PORT, &backends))?;
            for i in 0..services {
                let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i);
                let pods = [
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 1)) + 2 * i),
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 2)) + 2 * i),
                ];
                writer.upsert(
                    Frontend { address: vip.into(), port: 80, proto: TCP },
                    &entry(&format!("svc-{i}"), SVC_F_CLUSTER_IP, &pods.map(IpAddr::from)),
                )?;
            }
            let program = datapath.tc_program().context("no TC program in the object")?;
            // BPF_PROG_TEST_RUN runs `repeat` times on one skb, which the first run translates:
            // a repeated run of a NodePort packet would measure the translated packet (not a
            // frontend). So: the pass-through path (a packet for no frontend) with a million
            // repeats, and the flow paths one call at a time with a fresh packet each, minus the
            // cost of one call for the pass-through packet (the call overhead), plus its
            // per-packet cost.
            let run = |packet: &[u8], repeat: u32| -> anyhow::Result<f64> {
                let result =
                    program.test_run(TestRunOptions { data_in: Some(packet), repeat, ..Default::default() })?;
                Ok(result.duration.as_nanos() as f64)
            };
            let calls = |packets: &mut dyn Iterator<Item = Vec<u8>>| -> anyhow::Result<f64> {
                let (mut total, mut n) = (0.0, 0.0);
                for packet in packets {
                    total += run(&packet, 1)?;
                    n += 1.0;
                }
                Ok(total / n)
            };
            let mut conntrack: aya::maps::HashMap<MapData, CtKey, CtValue> =
                aya::maps::HashMap::try_from(Map::LruHashMap(MapData::from_pin(bpf_root.join(maps::CONNTRACK))?))?;
            // Established: a tracked flow's packet, repeated. Its first run translates the
            // packet; an extra entry for the translated tuple translates it back, so every run
            // is a conntrack hit with a full rewrite.
            let mut established_cost = |client: IpAddr, node: IpAddr, sport: u16| -> anyhow::Result<f64> {
                let tracked = frames::tcp_frame(SocketAddr::new(client, sport), SocketAddr::new(node, NODE_PORT), SYN);
                run(&tracked, 1)?;
                let original = CtKey {
                    src: addr::from_ip(client),
                    dst: addr::from_ip(node),
                    sport,
                    dport: NODE_PORT,
                    proto: TCP,
                    _pad: [0; 3],
                };
                let forward = conntrack.get(&original, 0)?;
                let translated = CtKey {
                    src: forward.src,
                    dst: forward.dst,
                    sport: forward.sport,
                    dport: forward.dport,
                    proto: TCP,
                    _pad: [0; 3],
                };
                let back = CtValue {
                    src: original.src,
                    dst: original.dst,
                    sport: original.sport,
                    dport: original.dport,
                    ..forward
                };
                conntrack.insert(translated, back, 0)?;
                run(&tracked, REPEAT)
            };
            let (mut pass, mut new_flow, mut established) = (Vec::new(), Vec::new(), Vec::new());
            let mut established_v6 = Vec::new();
            let mut new_flow_traced = Vec::new();
            let mut trace_on: aya::maps::Array<MapData, u64> =
                aya::maps::Array::try_from(Map::Array(MapData::from_pin(bpf_root.join(maps::TRACE_ON))?))?;
            let mut ring =
                aya::maps::RingBuf::try_from(Map::RingBuf(MapData::from_pin(bpf_root.join(maps::TRACE_EVENTS))?))?;
            for round in 0..RUNS as u16 {
                let per_packet = run(&syn_to(1024, 12345), REPEAT)?;
                let overhead = calls(&mut (0..NEW_FLOWS).map(|_| syn_to(1024, 12345)))? - per_packet;
                let sport = 1000 - round;
                established.push(established_cost(CLIENT.into(), NODE.into(), sport)?);
                established_v6.push(established_cost(CLIENT6.into(), NODE6.into(), sport)?);
                let new = calls(&mut (0..NEW_FLOWS).map(|i| syn(1024 + round * NEW_FLOWS + i)))?;
                while ring.next().is_some() {}
                trace_on.set(0, u64::MAX, 0)?;
                let first = 1024 + RUNS as u16 * NEW_FLOWS + round * NEW_FLOWS;
                let traced = calls(&mut (0..NEW_FLOWS).map(|i| syn(first + i)));
                trace_on.set(0, 0, 0)?;
                let mut events = 0;
                while ring.next().is_some() {
                    events += 1;
                }
                anyhow::ensure!(events == usize::from(NEW_FLOWS), "{events} trace events for {NEW_FLOWS} new flows");
                pass.push(per_packet);
                new_flow.push(new - overhead);
                new_flow_traced.push(traced? - overhead);
            }
            Ok(Costs {
                pass: median(pass),
                new_flow: median(new_flow),
                established: median(established),
                established_v6: median(established_v6),
                new_flow_traced: median(new_flow_traced),
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bench thread panicked"))?
    })
}

/// The bench's bpffs root: programs detached and pins removed on drop, also on failure.
struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = proxy_agent::datapath::cleanup(&self.0);
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let sizes: Vec<u32> = match args.iter().position(|a| a == "--sizes").and_then(|at| args.get(at + 1)) {
        Some(list) => list
            .split(',')
            .map(|n| n.trim().parse().ok().filter(|&n| n > 0))
            .collect::<Option<_>>()
            .with_context(|| format!("--sizes {list}: expected service counts above 0, e.g. 1,10000,100000"))?,
        None => vec![1, 10_000],
    };
    let mut rows = Vec::new();
    for services in sizes {
        let Costs { pass, new_flow, established, established_v6, new_flow_traced } = measure(services - 1)?;
        if !json {
            println!(
                "TC NodePort path, {services:>6} services: new flow {new_flow:7.1} ns/packet (traced {new_flow_traced:7.1}, ×{:.2}), established {established:7.1} ns/packet (IPv6 {established_v6:7.1}), not a service {pass:6.1} ns/packet",
                new_flow_traced / new_flow
            );
        }
        rows.push(serde_json::json!({
            "services": services,
            "new_flow_ns": new_flow,
            "established_ns": established,
            "established_v6_ns": established_v6,
            "pass_through_ns": pass,
            "new_flow_traced_ns": new_flow_traced,
            "trace_ratio_new_flow": new_flow_traced / new_flow,
        }));
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
    }
    Ok(())
}
