//! Maglev, measured (issue 16):
//!
//! - spread: the agent's table for N backends (M = 16 381, the default), then 1 000 000 flows
//!   (distinct 5-tuples from 65 536 clients) hashed with the datapath's flow hash: the busiest
//!   and the idlest backend's flows, max ÷ min and max ÷ mean;
//! - disruption: the share of the same flows whose backend changes when one of N backends is
//!   removed (averaged over removing each of the first ten), against the ideal 1/N;
//! - cost: `BPF_PROG_TEST_RUN` ns/packet for a new flow (a SYN) at a random nodePort and at a
//!   Maglev one over the same 16 backends, in the same run, alternating rounds, each batch one
//!   call per fresh packet with the call overhead (a packet for no frontend) subtracted, as
//!   `bench_tc` measures.
//!
//! `bench_maglev [--json] [--quick]` (quick: 100 000 flows, fewer packets; run in CI); run by
//! `cargo xtask bench`.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use aya::programs::{TestRun as _, TestRunOptions};
use proxy_agent::{
    datapath::{Datapath, LoadOptions, writer::Writer},
    maglev::{self, MaglevSettings},
    model::{Endpoint, Frontend, FrontendEntry, FrontendKind, ServicePortName},
};
use proxy_common::{
    addr,
    conntrack::CtKey,
    maglev::{TABLE_SIZE_DEFAULT, flow_hash, slot},
    maps,
    proto::TCP,
    service::{SVC_F_MAGLEV, SVC_F_NODE_PORT},
};
use proxy_tests::{
    cgroup::Cgroup,
    cluster::{CLIENT_IP, NODE_IPS},
    frames::{self, SYN},
    netns::Netns,
};

const NODE: Ipv4Addr = NODE_IPS[0];
const RANDOM_PORT: u16 = 30066;
const MAGLEV_PORT: u16 = 30067;
const ROUNDS: usize = 5;

/// `n` backends named like pods spread over 10.244.0.0/16, port 80.
fn backends(n: usize) -> Vec<Ipv4Addr> {
    (0..n).map(|i| Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250 + 1) as u8)).collect()
}

/// The agent's table (backend indexes by slot) for `pods`.
fn table(pods: &[Ipv4Addr], settings: &MaglevSettings) -> Vec<usize> {
    let named: Vec<(usize, Vec<u8>)> =
        pods.iter().enumerate().map(|(i, p)| (i, maglev::backend_name(addr::from_v4(p.octets()), 80))).collect();
    maglev::build(&named, settings.table_size, &settings.seed)
}

/// `flows` distinct flows to an external IP: client addresses in 100.64.0.0/16, ports from 1024.
fn flow(i: u32) -> CtKey {
    let client = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (i & 0xffff);
    CtKey {
        src: addr::from_v4(Ipv4Addr::from(client).octets()),
        dst: addr::from_v4([203, 0, 113, 10]),
        sport: 1024 + (i >> 16) as u16,
        dport: 443,
        proto: TCP,
        _pad: [0; 3],
    }
}

/// The backend (its index in `pods`) of each flow.
fn assign(table: &[usize], flows: u32, seed: u32) -> Vec<usize> {
    let m = table.len() as u32;
    (0..flows).map(|i| table[slot(flow_hash(&flow(i), seed), m) as usize - 1]).collect()
}

/// Flows per backend: (max, min, max ÷ mean).
fn spread(assigned: &[usize], n: usize) -> (usize, usize, f64) {
    let mut counts = vec![0usize; n];
    for &b in assigned {
        counts[b] += 1;
    }
    let (max, min) = (*counts.iter().max().unwrap_or(&0), *counts.iter().min().unwrap_or(&0));
    (max, min, max as f64 * n as f64 / assigned.len() as f64)
}

/// The share of flows whose backend changes when backend `removed` of `pods` leaves, and the
/// same over table slots.
fn moved(pods: &[Ipv4Addr], removed: usize, before: &[usize], flows: u32, settings: &MaglevSettings) -> (f64, f64) {
    let rest: Vec<Ipv4Addr> = pods.iter().enumerate().filter(|(i, _)| *i != removed).map(|(_, p)| *p).collect();
    // Indexes in `rest` back to indexes in `pods`.
    let after: Vec<usize> = table(&rest, settings).into_iter().map(|i| if i >= removed { i + 1 } else { i }).collect();
    let old = table(pods, settings);
    let slots = old.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / old.len() as f64;
    let now = assign(&after, flows, settings.flow_seed());
    let flows_moved = before.iter().zip(&now).filter(|(a, b)| a != b).count() as f64 / before.len() as f64;
    (flows_moved, slots)
}

/// A SYN from the client's `sport` to the node's `dport`.
fn syn(sport: u16, dport: u16) -> Vec<u8> {
    frames::tcp_frame((CLIENT_IP, sport), (NODE, dport), SYN)
}

fn entry(flags: u16, pods: &[Ipv4Addr]) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName {
            namespace: "bench".into(),
            name: format!("np-{flags}"),
            port: String::new(),
            proto: TCP,
        },
        kind: FrontendKind::NodePort,
        flags,
        affinity_timeout: 0,
        backends: pods
            .iter()
            .map(|&address| Endpoint {
                address: address.into(),
                port: 80,
                local: false,
                terminating: false,
                dsr: false,
            })
            .collect(),
        internal: None,
        source_ranges: Vec::new(),
    }
}

/// The bench's bpffs root: programs detached and pins removed on drop, also on failure.
struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = proxy_agent::datapath::cleanup(&self.0);
    }
}

/// Median ns/packet of a new flow at the random and at the Maglev nodePort, `flows` per batch.
fn cost(flows: u16) -> anyhow::Result<(f64, f64)> {
    let ns = Netns::new("bench")?;
    let cgroup = Cgroup::new("proxy-bench-maglev")?;
    let pins = Pins(std::path::PathBuf::from(format!("/sys/fs/bpf/proxy-bench-maglev-{}", std::process::id())));
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<(f64, f64)> {
            ns.enter()?;
            let opts = LoadOptions {
                bpf_root: pins.0.clone(),
                cgroup: cgroup.path().to_owned(),
                services_max: 4096,
                backends_max: 4096,
                affinity_max: 1024,
                conntrack_max: maps::CONNTRACK_MAX_ENTRIES,
                sock_hostns_only: false,
                preallocate: false,
            };
            let (datapath, store) = Datapath::load(&opts).context("loading the datapath")?;
            let mut writer = Writer::new(store);
            writer.set_maglev(MaglevSettings::default())?;
            let pods = backends(16);
            let frontend = |port| Frontend { address: NODE.into(), port, proto: TCP };
            writer.upsert(frontend(RANDOM_PORT), &entry(SVC_F_NODE_PORT, &pods))?;
            writer.upsert(frontend(MAGLEV_PORT), &entry(SVC_F_NODE_PORT | SVC_F_MAGLEV, &pods))?;
            let program = datapath.tc_program().context("no TC program in the object")?;
            let run = |packet: &[u8], repeat: u32| -> anyhow::Result<f64> {
                let result =
                    program.test_run(TestRunOptions { data_in: Some(packet), repeat, ..Default::default() })?;
                Ok(result.duration.as_nanos() as f64)
            };
            let batch = |packets: &mut dyn Iterator<Item = Vec<u8>>| -> anyhow::Result<f64> {
                let (mut total, mut n) = (0.0, 0.0);
                for packet in packets {
                    total += run(&packet, 1)?;
                    n += 1.0;
                }
                Ok(total / n)
            };
            let (mut random, mut hashed) = (Vec::new(), Vec::new());
            for round in 0..ROUNDS as u16 {
                let per_packet = run(&syn(1024, 12345), 100_000)?;
                let overhead = batch(&mut (0..flows).map(|_| syn(1024, 12345)))? - per_packet;
                let first = 1024 + round * flows;
                // Alternating which goes first, so neither always runs on a warmer cache.
                let measure = |port: u16| batch(&mut (0..flows).map(|i| syn(first + i, port)));
                let (r, m) = if round % 2 == 0 {
                    let r = measure(RANDOM_PORT)?;
                    (r, measure(MAGLEV_PORT)?)
                } else {
                    let m = measure(MAGLEV_PORT)?;
                    (measure(RANDOM_PORT)?, m)
                };
                random.push(r - overhead);
                hashed.push(m - overhead);
            }
            Ok((proxy_bench::median(&random), proxy_bench::median(&hashed)))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bench thread panicked"))?
    })
}

fn main() -> anyhow::Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    let quick = std::env::args().any(|a| a == "--quick");
    let flows: u32 = if quick { 100_000 } else { 1_000_000 };
    let settings = MaglevSettings::default();
    let mut rows = Vec::new();
    for n in [10usize, 100] {
        let pods = backends(n);
        let assigned = assign(&table(&pods, &settings), flows, settings.flow_seed());
        let (max, min, over_mean) = spread(&assigned, n);
        let removals = n.min(10);
        let (mut flows_moved, mut slots_moved) = (0.0, 0.0);
        for removed in 0..removals {
            let (f, s) = moved(&pods, removed, &assigned, flows, &settings);
            flows_moved += f / removals as f64;
            slots_moved += s / removals as f64;
        }
        if !json {
            println!(
                "Maglev N={n:>3} M={TABLE_SIZE_DEFAULT}: {flows} flows, max {max} min {min} (max/min {:.3}, max/mean {over_mean:.3}); \
                 one backend removed: {:.2} % of flows moved ({:.2} % of slots), ideal {:.2} %",
                max as f64 / min as f64,
                flows_moved * 100.0,
                slots_moved * 100.0,
                100.0 / n as f64
            );
        }
        rows.push(serde_json::json!({
            "backends": n,
            "table_size": TABLE_SIZE_DEFAULT,
            "flows": flows,
            "max_flows": max,
            "min_flows": min,
            "max_over_min": max as f64 / min as f64,
            "max_over_mean": over_mean,
            "moved_flows_share": flows_moved,
            "moved_slots_share": slots_moved,
            "ideal_share": 1.0 / n as f64,
        }));
    }
    let (random, hashed) = cost(if quick { 300 } else { 2_000 })?;
    if !json {
        println!(
            "TC new flow, 16 backends: random {random:.0} ns/packet, Maglev {hashed:.0} ns/packet (×{:.2})",
            hashed / random
        );
    }
    if json {
        let cost = serde_json::json!({"backends": 16, "random_new_flow_ns": random, "maglev_new_flow_ns": hashed, "ratio": hashed / random});
        println!("{}", serde_json::json!({"spread": rows, "cost": cost}));
    }
    Ok(())
}
