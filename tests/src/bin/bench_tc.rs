//! Per-packet cost of the TC NodePort path with `BPF_PROG_TEST_RUN` (aya's `TestRun`): the real
//! object, loaded by the agent's own datapath code inside a throwaway network namespace and
//! cgroup, with 1 and with 10 000 services programmed through the real map writer. Prints
//! ns/packet for a new flow (a conntrack miss: selection, two conntrack inserts, DNAT+SNAT) and
//! for an established one (a conntrack hit), medians of several runs. The FIB lookup finds no
//! route in the empty namespace, so the redirect itself is not part of the figure.
//!
//! `bench_tc [--json]`; run by `cargo xtask bench`.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use aya::programs::{TestRun as _, TestRunOptions};
use proxy_agent::{
    datapath::{Datapath, LoadOptions, writer::Writer},
    model::{Endpoint, Frontend, FrontendEntry, FrontendKind, ServicePortName},
};
use proxy_common::{
    maps,
    proto::TCP,
    service::{SVC_F_CLUSTER_IP, SVC_F_NODE_PORT},
};
use proxy_tests::{cgroup::Cgroup, netns::Netns};

const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
const NODE_PORT: u16 = 30066;
const REPEAT: u32 = 1_000_000;
/// New flows per run; spread over 16 backends they stay far from exhausting SNAT ports.
const NEW_FLOWS: u16 = 2_000;
const RUNS: usize = 5;

fn entry(name: &str, flags: u16, backends: &[Ipv4Addr]) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName { namespace: "bench".into(), name: name.into(), port: String::new(), proto: TCP },
        kind: if flags & SVC_F_NODE_PORT != 0 { FrontendKind::NodePort } else { FrontendKind::ClusterIp },
        flags,
        affinity_timeout: 0,
        backends: backends
            .iter()
            .map(|&address| Endpoint { address, port: 80, local: false, terminating: false })
            .collect(),
        internal: None,
        source_ranges: Vec::new(),
    }
}

/// An Ethernet + IPv4 + TCP SYN from the client's `sport` to the node's nodePort.
fn syn(sport: u16) -> Vec<u8> {
    let mut packet = vec![0u8; 14 + 20 + 20];
    packet[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut packet[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = TCP;
    ip[12..16].copy_from_slice(&CLIENT.octets());
    ip[16..20].copy_from_slice(&NODE.octets());
    let sum = checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let tcp = &mut packet[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&NODE_PORT.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    packet
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum >> 16) + (sum & 0xffff);
    }
    !(sum as u16)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// (new flow, established) ns/packet with `services` extra services programmed.
fn measure(services: u32) -> anyhow::Result<(f64, f64)> {
    let ns = Netns::new("bench")?;
    let cgroup = Cgroup::new("proxy-bench")?;
    let pins = Pins(std::path::PathBuf::from(format!("/sys/fs/bpf/proxy-bench-{}-{services}", std::process::id())));
    let bpf_root = &pins.0;
    // Load and attach inside the throwaway namespace, on a thread of its own.
    // `pins` outlives the scope: programs and pins go when this function returns.
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<(f64, f64)> {
            ns.enter()?;
            let opts = LoadOptions {
                bpf_root: bpf_root.to_owned(),
                cgroup: cgroup.path().to_owned(),
                services_max: maps::SERVICES_MAX_ENTRIES,
                backends_max: maps::BACKENDS_MAX_ENTRIES,
                affinity_max: maps::AFFINITY_MAX_ENTRIES,
                conntrack_max: maps::CONNTRACK_MAX_ENTRIES,
            };
            let (datapath, store) = Datapath::load(&opts).context("loading the datapath")?;
            let mut writer = Writer::new(store);
            let backends: Vec<Ipv4Addr> = (0..16).map(|i| Ipv4Addr::new(10, 244, 1 + i % 2, 2 + i / 2)).collect();
            let nodeport = Frontend { address: NODE, port: NODE_PORT, proto: TCP };
            writer.upsert(nodeport, &entry("nodeport", SVC_F_NODE_PORT, &backends))?;
            for i in 0..services {
                let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i);
                let pods = [
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 1)) + 2 * i),
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 2)) + 2 * i),
                ];
                writer.upsert(
                    Frontend { address: vip, port: 80, proto: TCP },
                    &entry(&format!("svc-{i}"), SVC_F_CLUSTER_IP, &pods),
                )?;
            }
            let program = datapath.tc_program().context("no TC program in the object")?;
            let mut new_flow = Vec::new();
            let mut established = Vec::new();
            for run in 0..RUNS {
                // New flows: a different source port each time, so every packet misses conntrack.
                let mut total = Duration::ZERO;
                for i in 0..NEW_FLOWS {
                    let packet = syn(1024 + (run as u16) * NEW_FLOWS + i);
                    total += program
                        .test_run(TestRunOptions { data_in: Some(&packet), repeat: 1, ..Default::default() })?
                        .duration;
                }
                new_flow.push(total.as_nanos() as f64 / f64::from(NEW_FLOWS));
                // Established: the same (now tracked) packet a million times.
                let packet = syn(1024);
                let result = program.test_run(TestRunOptions {
                    data_in: Some(&packet),
                    repeat: REPEAT,
                    ..Default::default()
                })?;
                established.push(result.duration.as_nanos() as f64);
            }
            Ok((median(new_flow), median(established)))
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
    let json = std::env::args().any(|a| a == "--json");
    let mut rows = Vec::new();
    for services in [1u32, 10_000] {
        let (new_flow, established) = measure(services - 1)?;
        if !json {
            println!(
                "TC NodePort path, {services:>6} services: new flow {new_flow:7.1} ns/packet, established {established:7.1} ns/packet"
            );
        }
        rows.push(serde_json::json!({ "services": services, "new_flow_ns": new_flow, "established_ns": established }));
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
    }
    Ok(())
}
