//! New-connection latency through a ClusterIP, versus a direct connection to the same pod, for
//! three datapaths side by side: ours (the real agent, its cgroup `connect4` program), kube-proxy's
//! iptables rules (`iptables-restore`) and kube-proxy's nftables rules (`nft -f`), at N services
//! with 2 endpoints each. The probed service is the last one programmed; its endpoints are two pod
//! namespaces with sequential request/response servers.
//!
//! Layout, all in namespaces this bench creates: a bridge namespace (`net`) with the two pods and
//! two kinds of client on it, one veth hop each. The *bare* client has no proxy at all: the
//! direct baseline, which passes through none of the peers' rules and none of our programs. For
//! each (datapath, N) a fresh *proxied* client namespace gets the datapath: the peer's rules are
//! loaded inside it (its OUTPUT hook, as on a node), or our agent runs in it with the client
//! process in the agent's cgroup. Per round: direct from the bare client, via the ClusterIP from
//! the proxied client, and direct from the proxied client (what the datapath costs connections
//! that are not for a service). The ratio is via-VIP ÷ bare direct, per round; the median over
//! rounds is reported.
//!
//! Tracing: for ours, each round also connects via the ClusterIP with `proxy-agent trace`
//! running (the flag set and a real reader draining the ring, its JSON lines collected), side
//! by side with the untraced run; `trace_ratio_p50` is traced ÷ untraced p50, median over rounds.
//!
//! Families: `ours-mapped` is ours again with an AF_INET6 client socket to the IPv4 ClusterIP
//! written IPv4-mapped (`[::ffff:10.96.x.y]:port`, the connect6 program), against a direct
//! AF_INET6 connection to `[::ffff:<pod>]`; `ours-ipv6` makes the probed service a single-stack
//! IPv6 one (an fd00:10:96:: ClusterIP, an IPv6 EndpointSlice of the pods' IPv6 addresses), against
//! a direct IPv6 connection. Pods and clients are dual-stack (`nodad` ULA addresses).
//!
//! `bench_connect [--quick] [--json]`; run by `cargo xtask bench`. `bench_connect --client
//! ADDR:PORT WARMUP COUNT` is the client process itself.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use proxy_bench::{
    self as bench, BenchAgent, ConnectRun, Opts, Progress, ReplyServer, Summary, median, nftables, run_client,
};
use proxy_tests::{
    cgroup::Cgroup,
    cluster::{pod_twin6, vip6},
    fixtures::{TempDir, service, slice, write_text, yaml},
    netns::{Netns, veth},
    topology::add_address,
    trace::Trace,
};
use serde_json::json;

/// The pods' port.
const POD_PORT: u16 = 8080;
/// The probed service's endpoints: (name, address).
const PODS: [(&str, Ipv4Addr); 2] =
    [("pod-a", Ipv4Addr::new(10, 244, 1, 10)), ("pod-b", Ipv4Addr::new(10, 244, 1, 11))];
/// The bare client's address.
const BARE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 9);
/// A client run stops after this.
const CLIENT_BUDGET: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Datapath {
    Ours,
    /// Ours, the client an AF_INET6 socket to the IPv4-mapped ClusterIP.
    OursMapped,
    /// Ours, the probed service IPv6.
    OursIpv6,
    Iptables,
    Nftables,
}

impl Datapath {
    const ALL: [Datapath; 5] =
        [Datapath::Ours, Datapath::OursMapped, Datapath::OursIpv6, Datapath::Iptables, Datapath::Nftables];

    fn name(self) -> &'static str {
        match self {
            Datapath::Ours => "ours",
            Datapath::OursMapped => "ours-mapped",
            Datapath::OursIpv6 => "ours-ipv6",
            Datapath::Iptables => "iptables",
            Datapath::Nftables => "nftables",
        }
    }

    /// The address a client connects to for `ip` (a ClusterIP or a pod of the IPv4 plan, with
    /// its IPv6 twin `ip6`): as is, IPv4-mapped, or the twin.
    fn address(self, ip: Ipv4Addr, ip6: Ipv6Addr) -> IpAddr {
        match self {
            Datapath::OursMapped => ip.to_ipv6_mapped().into(),
            Datapath::OursIpv6 => ip6.into(),
            _ => ip.into(),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        return client(&args[2..]);
    }
    let opts = Opts::from_args();
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_connect failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The client process: `ADDR:PORT WARMUP COUNT`, prints one JSON [`ConnectRun`].
fn client(args: &[String]) -> ExitCode {
    let (Some(Ok(to)), Some(Ok(warmup)), Some(Ok(count))) = (
        args.first().map(|a| a.parse::<SocketAddr>()),
        args.get(1).map(|a| a.parse::<usize>()),
        args.get(2).map(|a| a.parse::<usize>()),
    ) else {
        eprintln!("usage: bench_connect --client ADDR:PORT WARMUP COUNT");
        return ExitCode::from(2);
    };
    let result = bench::connect_loop(to, warmup.min(10_000), count.min(100_000), CLIENT_BUDGET);
    println!("{}", serde_json::to_string(&result).unwrap_or_default());
    ExitCode::SUCCESS
}

/// The pods, the bare client and the bridge; dropped servers first, then namespaces.
struct Lab {
    _servers: Vec<ReplyServer>,
    _pods: Vec<Netns>,
    bare: Netns,
    net: Netns,
}

impl Lab {
    fn new() -> anyhow::Result<Self> {
        let net = Netns::new("bench-net")?;
        net.ip(&["link", "add", "br0", "type", "bridge"])?;
        net.ip(&["link", "set", "br0", "up"])?;
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for (i, (name, ip)) in PODS.iter().enumerate() {
            let ns = Netns::new("bench-pod")?;
            attach(&net, &format!("p{i}"), &ns, *ip)?;
            servers.push(ReplyServer::start(&ns, POD_PORT, name)?);
            pods.push(ns);
        }
        let bare = Netns::new("bench-bare")?;
        attach(&net, "bare", &bare, BARE)?;
        Ok(Self { _servers: servers, _pods: pods, bare, net })
    }

    /// A fresh proxied client namespace on the bridge, number `k` (its own address, so the pods'
    /// neighbour caches never hold a stale entry for it).
    fn client(&self, k: usize) -> anyhow::Result<Netns> {
        let ns = Netns::new("bench-client")?;
        attach(&self.net, &format!("c{k}"), &ns, Ipv4Addr::new(10, 244, 1, 20 + k as u8))?;
        // The peers' OUTPUT DNAT runs after the route lookup: the service range needs a route.
        ns.ip(&["route", "add", bench::SERVICE_CIDR, "dev", "eth0"])?;
        Ok(ns)
    }
}

/// Puts `ns` on `net`'s bridge as `eth0` with `ip`/24 and its IPv6 twin /64.
fn attach(net: &Netns, host_if: &str, ns: &Netns, ip: Ipv4Addr) -> anyhow::Result<()> {
    veth(net, host_if, ns, "eth0")?;
    net.ip(&["link", "set", host_if, "master", "br0"])?;
    add_address(ns, ip, 24, "eth0")?;
    add_address(ns, pod_twin6(ip), 64, "eth0")?;
    Ok(())
}

/// What programs a datapath, kept alive while measuring (agent before its cgroup).
enum Programmed {
    Ours { agent: BenchAgent, _dir: TempDir, cgroup: Cgroup },
    Rules,
}

impl Programmed {
    fn cgroup(&self) -> Option<&Cgroup> {
        match self {
            Programmed::Ours { cgroup, .. } => Some(cgroup),
            Programmed::Rules => None,
        }
    }
}

/// N synthetic services, the last one backed by the two pods.
fn services(n: usize) -> Vec<bench::Svc> {
    let mut services = bench::synthetic(n, 2);
    if let Some(last) = services.last_mut() {
        last.endpoints = PODS.iter().map(|p| p.1).collect();
        last.target_port = POD_PORT;
    }
    services
}

/// The IPv6 twin of the probed service's ClusterIP (`10.96.a.b` → `fd00:10:96::b`, in the
/// IPv6 service range; the probed service is the last, so its twin is free).
fn vip_twin(vip: Ipv4Addr) -> Ipv6Addr {
    vip6(vip.octets()[3])
}

/// The manifests of `services` for ours: as they are, or with the probed (last) service a
/// single-stack IPv6 one on its twin ClusterIP, backed by the pods' IPv6 addresses.
fn our_manifests(datapath: Datapath, services: &[bench::Svc]) -> String {
    let Some((probed, rest)) = services.split_last().filter(|_| datapath == Datapath::OursIpv6) else {
        return bench::manifests(services);
    };
    let svc = service(&probed.name).cluster_ips(&[vip_twin(probed.vip).into()]).port(probed.port.into());
    let pods: Vec<String> = PODS.iter().map(|(_, ip)| pod_twin6(*ip).to_string()).collect();
    let eps = slice(&probed.name, "ipv6").address_type("IPv6").port(probed.target_port.into());
    let eps = eps.endpoints(pods.iter().map(String::as_str)).build();
    bench::manifests(rest) + &yaml(&svc.build()) + &yaml(&eps)
}

/// Programs `datapath` for `services` in `ns`; returns the guard and the time it took.
fn program(datapath: Datapath, ns: &Netns, services: &[bench::Svc]) -> anyhow::Result<(Programmed, f64)> {
    let n = services.len();
    match datapath {
        Datapath::Ours | Datapath::OursMapped | Datapath::OursIpv6 => {
            let cgroup = Cgroup::new("proxy-bench")?;
            let dir = TempDir::new("proxy-bench-manifests")?;
            write_text(dir.path(), "services.yaml", &our_manifests(datapath, services))?;
            let mut agent = BenchAgent::start(
                ns,
                &cgroup,
                &["--manifests", &dir.arg(), "--hostname-override", "node-1", "--cluster-cidr", bench::CLUSTER_CIDR],
            )?;
            let (syncs, _) = agent
                .wait_for_sync(0, |s| s.frontends >= n, Duration::from_secs(300))
                .context("the agent never programmed every service")?;
            let took: f64 = syncs.iter().map(|s| s.took_ms).sum::<f64>() / 1e3;
            Ok((Programmed::Ours { agent, _dir: dir, cgroup }, took))
        }
        Datapath::Iptables => {
            let took = bench::iptables_load(ns, services, Duration::from_secs(300))?;
            Ok((Programmed::Rules, took.as_secs_f64()))
        }
        Datapath::Nftables => {
            let took = bench::nft_apply(ns, &nftables::full(services, &[]), Duration::from_secs(600))?;
            Ok((Programmed::Rules, took.as_secs_f64()))
        }
    }
}

/// A via-VIP run with `proxy-agent trace` reading every event (the agent binary beside this
/// one); checks that it saw one line per connection.
fn traced(
    exe: &std::path::Path,
    agent: &BenchAgent,
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    vip: SocketAddr,
    warmup: usize,
    count: usize,
) -> anyhow::Result<ConnectRun> {
    let wait = Duration::from_secs(10);
    let trace = Trace::start(&exe.with_file_name("agent"), agent.bpf_root(), &[], wait)?;
    let run = run_client(exe, ns, cgroup, vip, warmup, count)?;
    let lines = trace.collect(wait, |seen| seen.len() >= warmup + count);
    trace.stop(wait)?;
    if lines.len() < warmup + count {
        bail!("trace saw {} of {} connections", lines.len(), warmup + count);
    }
    Ok(run)
}

/// Fails unless a run reached servers on (nearly) every attempt.
fn sane(what: &str, run: &ConnectRun, count: usize, want_backends: usize) -> anyhow::Result<()> {
    if run.fails * 100 > count {
        bail!("{what}: {} of {count} connections failed", run.fails);
    }
    if run.answers.len() < want_backends {
        bail!("{what}: reached {:?}, want {want_backends} backends", run.answers);
    }
    Ok(())
}

/// Medians over rounds of each statistic.
fn merge(runs: &[ConnectRun]) -> Summary {
    let pick = |f: fn(&Summary) -> f64| median(&runs.iter().map(|r| f(&r.latency)).collect::<Vec<_>>());
    Summary {
        n: runs.iter().map(|r| r.latency.n).sum(),
        mean: pick(|s| s.mean),
        p50: pick(|s| s.p50),
        p99: pick(|s| s.p99),
        max: pick(|s| s.max),
    }
}

fn micros(s: &Summary) -> serde_json::Value {
    json!({ "mean_us": s.mean, "p50_us": s.p50, "p99_us": s.p99, "n": s.n })
}

fn run(opts: Opts) -> anyhow::Result<()> {
    let progress = Progress::new("connect");
    let exe = std::env::current_exe()?;
    // Many short rounds rather than a few long ones: a burst of load from elsewhere on a shared
    // machine then spoils one round's ratio, which the median over rounds sets aside.
    let (count, rounds, warmup) = if opts.quick { (600, 3, 100) } else { (2_000, 7, 200) };
    progress.say(format!(
        "new-connection latency: {count} sequential connections × {rounds} rounds per target, sizes {:?}",
        opts.sizes()
    ));
    let lab = Lab::new()?;
    let mut results = Vec::new();
    let mut rows = Vec::new();
    let mut trace_rows = Vec::new();
    let mut k = 0;
    for &n in opts.sizes() {
        let services = services(n);
        let probed = &services[n - 1];
        for datapath in Datapath::ALL.into_iter().filter(|d| opts.wants(d.name())) {
            // Each family against a direct connection of the same family and socket kind.
            let vip = SocketAddr::new(datapath.address(probed.vip, vip_twin(probed.vip)), probed.port);
            let direct_to = SocketAddr::new(datapath.address(PODS[0].1, pod_twin6(PODS[0].1)), POD_PORT);
            bench::check_interrupt()?;
            k += 1;
            let ns = lab.client(k)?;
            progress.say(format!("{} N={n}: programming {n} services", datapath.name()));
            let (mut programmed, load_s) = program(datapath, &ns, &services)
                .with_context(|| format!("programming {} with {n} services", datapath.name()))?;
            progress.say(format!("{} N={n}: programmed in {load_s:.3} s; measuring", datapath.name()));
            let (mut direct, mut via, mut same, mut ratios_p50, mut ratios_mean) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut trace_ratios = Vec::new();
            for round in 0..rounds {
                bench::check_interrupt()?;
                let d = run_client(&exe, &lab.bare, None, direct_to, warmup, count)?;
                sane("direct", &d, count, 1)?;
                let v = run_client(&exe, &ns, programmed.cgroup(), vip, warmup, count)?;
                sane(&format!("{} via {vip}", datapath.name()), &v, count, PODS.len())?;
                let s = run_client(&exe, &ns, programmed.cgroup(), direct_to, warmup, count)?;
                sane("direct from the proxied client", &s, count, 1)?;
                if let (Programmed::Ours { agent, .. }, Datapath::Ours) = (&programmed, datapath) {
                    let t = traced(&exe, agent, &ns, programmed.cgroup(), vip, warmup, count)?;
                    sane("via the VIP, traced", &t, count, PODS.len())?;
                    trace_ratios.push(t.latency.p50 / v.latency.p50);
                    progress.say(format!("ours N={n}: traced via VIP p50 {:.1} µs", t.latency.p50));
                }
                ratios_p50.push(v.latency.p50 / d.latency.p50);
                ratios_mean.push(v.latency.mean / d.latency.mean);
                progress.say(format!(
                    "{} N={n} round {}/{rounds}: direct p50 {:.1} µs, via VIP p50 {:.1} µs (ratio {:.2}), direct from the proxied client p50 {:.1} µs",
                    datapath.name(),
                    round + 1,
                    d.latency.p50,
                    v.latency.p50,
                    v.latency.p50 / d.latency.p50,
                    s.latency.p50
                ));
                direct.push(d);
                via.push(v);
                same.push(s);
            }
            if let Programmed::Ours { agent, .. } = &mut programmed {
                agent.check_running()?;
            }
            drop(programmed);
            drop(ns);
            let (d, v, s) = (merge(&direct), merge(&via), merge(&same));
            let (ratio_p50, ratio_mean) = (median(&ratios_p50), median(&ratios_mean));
            let fails: usize = direct.iter().chain(&via).chain(&same).map(|r| r.fails).sum();
            rows.push(vec![
                datapath.name().to_owned(),
                n.to_string(),
                format!("{load_s:.3}"),
                format!("{:.1}", d.p50),
                format!("{:.1}", v.mean),
                format!("{:.1}", v.p50),
                format!("{:.1}", v.p99),
                format!("{ratio_p50:.3}"),
                format!("{ratio_mean:.3}"),
                format!("{:.1}", s.p50),
            ]);
            results.push(json!({
                "datapath": datapath.name(),
                "services": n,
                "program_s": load_s,
                "direct": micros(&d),
                "via_vip": micros(&v),
                "direct_from_proxied_client": micros(&s),
                "ratio_p50": ratio_p50,
                "ratio_mean": ratio_mean,
                "ratios_p50": ratios_p50,
                "fails": fails,
                "trace_ratio_p50": (!trace_ratios.is_empty()).then(|| median(&trace_ratios)),
            }));
            if !trace_ratios.is_empty() {
                trace_rows.push(format!("ours N={n}: via VIP traced ÷ untraced, p50: {:.3}", median(&trace_ratios)));
            }
        }
    }
    let header = [
        "datapath",
        "services",
        "program s",
        "direct p50 µs",
        "VIP mean µs",
        "VIP p50 µs",
        "VIP p99 µs",
        "ratio p50",
        "ratio mean",
        "proxied-direct p50 µs",
    ];
    let text = format!("{}\n{}", bench::table(&header, &rows), trace_rows.join("\n"));
    let value = json!({ "count": count, "rounds": rounds, "warmup": warmup, "results": results });
    bench::emit(opts, &value, &text);
    Ok(())
}
