//! The per-packet floor of a TC NodePort DNAT, measured the plain way, so `bench_tc`'s figures
//! have a yardstick from the same run: an empty TC program, and a minimal C program (one hash
//! lookup, DNAT with checksum updates), each run with `bpftool prog run ... repeat R`
//! (BPF_PROG_TEST_RUN) on a TCP SYN.
//!
//! BPF_PROG_TEST_RUN runs every repeat on the same buffer, which the first repeat rewrites: run the
//! plain way, the later repeats see the translated packet and miss, so that figure is mostly
//! a miss. It is reported as such, and then measured the way `bench_tc` measures our program: the
//! translated packet gets an entry that translates it back, so every repeat is a hit with a full
//! rewrite (checked: after two repeats the packet is back where it started), with 1 and 10 001
//! services. Two more C rungs add what a conntrack-based NodePort does per packet (see
//! [`TC_LADDER_C`]), to show what that work costs when written minimally.
//! Compiled with clang from the source below (the yardstick's `tc_floor.c`, see `docs/testing.md`), loaded with
//! `bpftool prog loadall` under a bpffs directory of its own, removed on drop. Test runs touch no
//! interface; they run inside a throwaway network namespace all the same.
//!
//! `bench_floor [--quick] [--json]`; run by `cargo xtask bench`. Needs clang, libbpf-dev and
//! bpftool (`cargo xtask setup` installs them).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap, Map, MapData};
use proxy_bench::{self as bench, Opts, Progress, median};
use proxy_tests::{
    client::command_in,
    cluster::{CLIENT_IP, NODE_IPS},
    fixtures::TempDir,
    netns::Netns,
};
use serde_json::json;

/// The minimal C TC program: an empty program and one hash lookup with DNAT.
const TC_FLOOR_C: &str = r#"#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
struct key { __u32 addr; __u16 port; __u8 proto; __u8 pad; };
struct val { __u32 addr; __u16 port; __u16 pad; };
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 65536); __type(key, struct key); __type(value, struct val); } svc SEC(".maps");
SEC("tc") int empty(struct __sk_buff *skb) { return TC_ACT_OK; }
SEC("tc") int dnat(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data; if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP)) return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1); if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl != 5) return TC_ACT_OK;
    struct tcphdr *tcp = (void *)(ip + 1); if ((void *)(tcp + 1) > end) return TC_ACT_OK;
    struct key k = { .addr = ip->daddr, .port = tcp->dest, .proto = IPPROTO_TCP };
    struct val *v = bpf_map_lookup_elem(&svc, &k); if (!v) return TC_ACT_OK;
    __u32 old_ip = ip->daddr, new_ip = v->addr; __u16 old_port = tcp->dest, new_port = v->port;
    int ipoff = ETH_HLEN, l4 = ETH_HLEN + sizeof(struct iphdr);
    bpf_l4_csum_replace(skb, l4 + offsetof(struct tcphdr, check), old_ip, new_ip, BPF_F_PSEUDO_HDR | 4);
    bpf_l4_csum_replace(skb, l4 + offsetof(struct tcphdr, check), old_port, new_port, 2);
    bpf_l3_csum_replace(skb, ipoff + offsetof(struct iphdr, check), old_ip, new_ip, 4);
    bpf_skb_store_bytes(skb, ipoff + offsetof(struct iphdr, daddr), &new_ip, 4, 0);
    bpf_skb_store_bytes(skb, l4 + offsetof(struct tcphdr, dest), &new_port, 2, 0);
    return TC_ACT_OK;
}
char LICENSE[] SEC("license") = "GPL";
"#;

/// Two more rungs, written for this bench in the same style, to show where a full NodePort path's
/// time goes: `dnat_fib` is `dnat` plus the forwarding decision (a FIB lookup and
/// `bpf_redirect_neigh`); `ct_snat_fib` is an established flow as a conntrack-based NodePort
/// handles it: a 5-tuple lookup in an LRU map, a coarse clock read, the backend's lookup, DNAT and
/// SNAT (addresses and ports, checksum differences) and the same forwarding decision.
const TC_LADDER_C: &str = r#"
struct ct_key { __u32 src, dst; __u16 sport, dport; __u8 proto, pad[3]; };
struct ct_val { __u32 src, dst; __u16 sport, dport; __u32 backend; __u64 last_seen; __u32 flags, pad; };
struct backend { __u32 addr; __u16 port; __u8 proto, flags; };
struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __uint(max_entries, 262144); __type(key, struct ct_key); __type(value, struct ct_val); } ct SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 131072); __type(key, __u32); __type(value, struct backend); } backends SEC(".maps");
static __always_inline int fwd(struct __sk_buff *skb, __u32 src, __u32 dst) {
    struct bpf_fib_lookup p = {};
    p.family = 2; p.ipv4_src = src; p.ipv4_dst = dst; p.ifindex = skb->ingress_ifindex;
    int rc = bpf_fib_lookup(skb, &p, sizeof(p), 0);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) return TC_ACT_OK;
    return bpf_redirect_neigh(p.ifindex, 0, 0, 0);
}
SEC("tc") int dnat_fib(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data; if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP)) return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1); if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl != 5) return TC_ACT_OK;
    struct tcphdr *tcp = (void *)(ip + 1); if ((void *)(tcp + 1) > end) return TC_ACT_OK;
    struct key k = { .addr = ip->daddr, .port = tcp->dest, .proto = IPPROTO_TCP };
    struct val *v = bpf_map_lookup_elem(&svc, &k); if (!v) return TC_ACT_OK;
    __u32 src = ip->saddr, old_ip = ip->daddr, new_ip = v->addr; __u16 old_port = tcp->dest, new_port = v->port;
    int ipoff = ETH_HLEN, l4 = ETH_HLEN + sizeof(struct iphdr);
    bpf_l4_csum_replace(skb, l4 + offsetof(struct tcphdr, check), old_ip, new_ip, BPF_F_PSEUDO_HDR | 4);
    bpf_l4_csum_replace(skb, l4 + offsetof(struct tcphdr, check), old_port, new_port, 2);
    bpf_l3_csum_replace(skb, ipoff + offsetof(struct iphdr, check), old_ip, new_ip, 4);
    bpf_skb_store_bytes(skb, ipoff + offsetof(struct iphdr, daddr), &new_ip, 4, 0);
    bpf_skb_store_bytes(skb, l4 + offsetof(struct tcphdr, dest), &new_port, 2, 0);
    return fwd(skb, src, new_ip);
}
SEC("tc") int ct_snat_fib(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data; if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP)) return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1); if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl != 5) return TC_ACT_OK;
    struct tcphdr *tcp = (void *)(ip + 1); if ((void *)(tcp + 1) > end) return TC_ACT_OK;
    struct ct_key k = { .src = ip->saddr, .dst = ip->daddr, .sport = tcp->source, .dport = tcp->dest, .proto = IPPROTO_TCP };
    __u32 old[2] = { ip->saddr, ip->daddr }, old_ports = *(__u32 *)&tcp->source;
    struct ct_val *v = bpf_map_lookup_elem(&ct, &k); if (!v) return TC_ACT_OK;
    __u64 now = bpf_ktime_get_coarse_ns(); if (now - v->last_seen > 1000000000ULL) v->last_seen = now;
    struct backend *b = bpf_map_lookup_elem(&backends, &v->backend); if (!b) return TC_ACT_OK;
    __u32 new[2] = { v->src, v->dst }, new_ports = (__u32)v->sport | ((__u32)v->dport << 16);
    int ipoff = ETH_HLEN, l4 = ETH_HLEN + sizeof(struct iphdr);
    __s64 d = bpf_csum_diff(old, 8, new, 8, 0); if (d < 0) return TC_ACT_SHOT;
    bpf_l3_csum_replace(skb, ipoff + offsetof(struct iphdr, check), 0, d, 0);
    bpf_l4_csum_replace(skb, l4 + offsetof(struct tcphdr, check), 0, d, BPF_F_PSEUDO_HDR);
    bpf_skb_store_bytes(skb, ipoff + offsetof(struct iphdr, saddr), new, 8, 0);
    d = bpf_csum_diff(&old_ports, 4, &new_ports, 4, 0); if (d < 0) return TC_ACT_SHOT;
    bpf_l4_csum_replace(skb, l4 + offsetof(struct tcphdr, check), 0, d, 0);
    bpf_skb_store_bytes(skb, l4, &new_ports, 4, 0);
    return fwd(skb, new[0], new[1]);
}
"#;

const NODE: Ipv4Addr = NODE_IPS[0];
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const CLIENT: Ipv4Addr = CLIENT_IP;
const NODE_PORT: u16 = 30066;
/// Runs of each figure; the median is reported.
const RUNS: usize = 3;

fn main() -> ExitCode {
    let opts = Opts::from_args();
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_floor failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The bench's two bpffs directories (programs, maps), removed on drop, also on failure.
struct Pins {
    progs: PathBuf,
    maps: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.progs);
        let _ = std::fs::remove_dir_all(&self.maps);
    }
}

/// The map key of `address:port`/TCP: address and port in network order, as the program reads them.
fn key(address: Ipv4Addr, port: u16) -> [u8; 8] {
    let mut k = value(address, port);
    k[6] = 6;
    k
}

/// `address:port` in network order, padded to 8 bytes (the ladder's endpoint value).
fn value(address: Ipv4Addr, port: u16) -> [u8; 8] {
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&address.octets());
    v[4..6].copy_from_slice(&port.to_be_bytes());
    v
}

/// (src, dst, sport, dport) in network order: the head of the ladder's conntrack key and value.
fn tuple(out: &mut [u8], (src, sport, dst, dport): (Ipv4Addr, u16, Ipv4Addr, u16)) {
    out[..4].copy_from_slice(&src.octets());
    out[4..8].copy_from_slice(&dst.octets());
    out[8..10].copy_from_slice(&sport.to_be_bytes());
    out[10..12].copy_from_slice(&dport.to_be_bytes());
}

/// The ladder's conntrack key of (src, sport, dst, dport)/TCP.
fn ct_key(flow: (Ipv4Addr, u16, Ipv4Addr, u16)) -> [u8; 16] {
    let mut k = [0u8; 16];
    tuple(&mut k, flow);
    k[12] = 6;
    k
}

/// The ladder's conntrack value: translate to (src, sport, dst, dport), backend 1.
fn ct_value(flow: (Ipv4Addr, u16, Ipv4Addr, u16)) -> [u8; 32] {
    let mut v = [0u8; 32];
    tuple(&mut v, flow);
    v[12..16].copy_from_slice(&1u32.to_ne_bytes());
    v
}

/// An Ethernet + IPv4 + TCP SYN from the client to the node's nodePort (as the plain method builds it).
fn syn() -> Vec<u8> {
    let mut packet = vec![0u8; 14 + 20 + 20];
    packet[0..6].fill(0x02);
    packet[6..12].fill(0x04);
    packet[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut packet[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[4..6].copy_from_slice(&1u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&CLIENT.octets());
    ip[16..20].copy_from_slice(&NODE.octets());
    let sum = proxy_tests::frames::checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let tcp = &mut packet[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&NODE_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    packet
}

/// Runs a tool inside `ns`, returning its stdout; fails with its stderr.
fn tool(ns: &Netns, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out =
        command_in(ns, None, Path::new(program))?.args(args).stdin(Stdio::null()).output().with_context(|| {
            format!("running {program} (`cargo xtask setup` installs clang, libbpf-dev and bpftool)")
        })?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// ns/packet of one `bpftool prog run` of the pinned program `name`.
/// Runs the pinned program `name` `repeat` times on the SYN and checks where the packet's
/// destination ends up: after one run it must be the backend (the program did the work, not an
/// early exit); with ping-pong entries, after two runs it is back at the node (the second run hit
/// too, so every repeat of a measurement is a hit with a full rewrite).
fn check_run(
    ns: &Netns,
    pins: &Pins,
    name: &str,
    packet: &Path,
    out: &Path,
    repeat: u32,
    want: Ipv4Addr,
) -> anyhow::Result<()> {
    let prog = pins.progs.join(name);
    let (prog, packet, out_arg) = (prog.to_string_lossy(), packet.to_string_lossy(), out.to_string_lossy());
    let repeat = repeat.to_string();
    tool(
        ns,
        "bpftool",
        &["prog", "run", "pinned", &prog, "data_in", &packet, "data_out", &out_arg, "repeat", &repeat],
    )?;
    let bytes = std::fs::read(out)?;
    let dst = bytes.get(30..34).map(|b| Ipv4Addr::new(b[0], b[1], b[2], b[3]));
    if dst != Some(want) {
        bail!("{name} after {repeat} run(s): destination {dst:?}, want {want}");
    }
    Ok(())
}

fn prog_run(ns: &Netns, pins: &Pins, name: &str, packet: &Path, repeat: u32) -> anyhow::Result<f64> {
    let prog = pins.progs.join(name);
    let out = tool(
        ns,
        "bpftool",
        &[
            "prog",
            "run",
            "pinned",
            &prog.to_string_lossy(),
            "data_in",
            &packet.to_string_lossy(),
            "repeat",
            &repeat.to_string(),
        ],
    )?;
    // "Return value: 0, duration (average): 22ns"
    let average = out
        .split("duration (average):")
        .nth(1)
        .map(|rest| rest.trim().trim_end_matches("ns").trim())
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("no average duration in bpftool's output {out:?}"))?;
    Ok(average)
}

fn run(opts: Opts) -> anyhow::Result<()> {
    let progress = Progress::new("floor");
    let repeat: u32 = if opts.quick { 1_000_000 } else { 2_000_000 };
    let dir = TempDir::new("proxy-bench-floor")?;
    let source = dir.path().join("tc_floor.c");
    let object = dir.path().join("tc_floor.o");
    let packet = dir.path().join("syn.bin");
    std::fs::write(&source, format!("{TC_FLOOR_C}{TC_LADDER_C}"))?;
    std::fs::write(&packet, syn())?;
    let ns = Netns::new("bench-floor")?;
    let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    tool(
        &ns,
        "clang",
        &[
            "-O2",
            "-g",
            "-target",
            "bpf",
            &format!("-I{multiarch}"),
            "-c",
            &source.to_string_lossy(),
            "-o",
            &object.to_string_lossy(),
        ],
    )
    .context("compiling the C floor program")?;
    let id = std::process::id();
    let pins = Pins {
        progs: PathBuf::from(format!("/sys/fs/bpf/proxy-bench-floor-{id}")),
        maps: PathBuf::from(format!("/sys/fs/bpf/proxy-bench-floor-{id}-maps")),
    };
    tool(
        &ns,
        "bpftool",
        &[
            "prog",
            "loadall",
            &object.to_string_lossy(),
            &pins.progs.to_string_lossy(),
            "pinmaps",
            &pins.maps.to_string_lossy(),
        ],
    )
    .context("loading the C floor program")?;
    let mut svc: HashMap<MapData, [u8; 8], [u8; 8]> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(pins.maps.join("svc")).context("opening the floor's map")?))?;
    svc.insert(key(NODE, NODE_PORT), value(BACKEND, 80), 0)?;
    let out = dir.path().join("out.bin");
    // `hits`: whether the maps hold the ping-pong entries, so every repeat is a hit.
    let measure = |name: &str, what: &str, hits: bool| -> anyhow::Result<f64> {
        if name != "empty" {
            check_run(&ns, &pins, name, &packet, &out, 1, BACKEND)?;
            if hits {
                check_run(&ns, &pins, name, &packet, &out, 2, NODE)?;
            }
        }
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            bench::check_interrupt()?;
            runs.push(prog_run(&ns, &pins, name, &packet, repeat)?);
        }
        let m = median(&runs);
        progress.say(format!("{what}: {m:.0} ns/packet (runs {runs:?}, repeat {repeat})"));
        Ok(m)
    };
    let empty = measure("empty", "empty TC program", false)?;
    // Measured the plain way: the first repeat translates the SYN, later repeats see the
    // translated packet, which no longer matches (a lookup miss).
    let anchor = measure("dnat", "C lookup + DNAT, plain repeats (repeats after the first miss)", false)?;
    // Every repeat a hit: the translated packet has an entry that translates it back.
    svc.insert(key(BACKEND, 80), value(NODE, NODE_PORT), 0)?;
    let dnat_1 = measure("dnat", "C lookup + DNAT, every repeat a hit, 1 service", true)?;
    let dnat_fib = measure("dnat_fib", "C lookup + DNAT + FIB lookup and redirect, every repeat a hit", true)?;
    // The ladder's established flow: the SYN's 5-tuple SNATed to the node and sent to backend 1,
    // and the translated tuple's entry back.
    let ct_map = MapData::from_pin(pins.maps.join("ct")).context("opening the ladder's ct map")?;
    let mut ct: HashMap<MapData, [u8; 16], [u8; 32]> = HashMap::try_from(Map::LruHashMap(ct_map))?;
    let backends_map = MapData::from_pin(pins.maps.join("backends")).context("opening the ladder's backends")?;
    let mut backends: HashMap<MapData, u32, [u8; 8]> = HashMap::try_from(Map::HashMap(backends_map))?;
    let client = (CLIENT, 40000u16, NODE, NODE_PORT);
    let translated = (NODE, 40001u16, BACKEND, 80u16);
    ct.insert(ct_key(client), ct_value(translated), 0)?;
    ct.insert(ct_key(translated), ct_value(client), 0)?;
    backends.insert(1, value(BACKEND, 80), 0)?;
    let ct_snat_fib =
        measure("ct_snat_fib", "C conntrack (LRU) + backend + DNAT/SNAT + FIB, every repeat a hit", true)?;
    for i in 0..10_000u32 {
        let vip = Ipv4Addr::new(10, 96, (1 + i / 250) as u8, (i % 250 + 1) as u8);
        svc.insert(key(vip, 80), value(Ipv4Addr::new(10, 244, 100, 1), 80), 0)?;
    }
    let dnat_10k = measure("dnat", "C lookup + DNAT, every repeat a hit, 10 002 entries", true)?;
    drop((svc, ct, backends));
    let value = json!({
        "repeat": repeat, "runs": RUNS, "empty_ns": empty, "dnat_anchor_method_ns": anchor,
        "dnat_1_ns": dnat_1, "dnat_10001_ns": dnat_10k, "dnat_fib_ns": dnat_fib, "ct_snat_fib_ns": ct_snat_fib,
    });
    let text = bench::table(
        &["TC floor (BPF_PROG_TEST_RUN)", "ns/packet"],
        &[
            vec!["empty program".into(), format!("{empty:.0}")],
            vec!["C lookup + DNAT, plain repeats (later repeats miss)".into(), format!("{anchor:.0}")],
            vec!["C lookup + DNAT, every repeat a hit, 1 service".into(), format!("{dnat_1:.0}")],
            vec!["C lookup + DNAT, every repeat a hit, 10 001 services".into(), format!("{dnat_10k:.0}")],
            vec!["C lookup + DNAT + FIB redirect".into(), format!("{dnat_fib:.0}")],
            vec!["C conntrack + backend + DNAT/SNAT + FIB".into(), format!("{ct_snat_fib:.0}")],
        ],
    );
    bench::emit(opts, &value, &text);
    Ok(())
}
