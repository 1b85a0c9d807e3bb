//! Reliability (issue 8), on the two-node topology of `docs/testing.md` with the agents inside the node
//! namespaces: restarts under load, full maps, state that went stale while the agent was down,
//! least privilege, and a clean shutdown followed by `--cleanup`.
//!
//! Every test is bounded in time; traffic stays inside the namespaces the test made, and
//! everything it made (namespaces, cgroups, pins, client processes) goes away on drop, also
//! when an assertion fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    os::{fd::FromRawFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use proxy_agent::{
    datapath::{layout, writer::MapStore as _},
    sys::bpf::PinnedMap,
};
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::Backend,
    service::{ServiceKey, ServiceValue},
};
use proxy_tests::{
    agent::{Agent, Synced},
    cgroup::Cgroup,
    client::{Tally, command_in, probe},
    cluster::{Manifests, NODE_IPS, SEED_PORT as PORT, TARGET_PORT, pod_ip, vip},
    fixtures::{ServiceBuilder, service},
    netns::{Netns, run},
    topology::{Node, TwoNodes},
    wait_until,
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(10);
/// A TCP service `name` at 10.96.0.<last>:6666 with nodePort `node_port`.
fn nodeport(name: &str, last: u8, node_port: u16) -> ServiceBuilder {
    service(name).cluster_ip(&vip(last).to_string()).named_port("tcp", PORT.into(), "TCP").node_port(node_port.into())
}

/// The two nodes, pods `pod-a` (10.244.1.2, node-1) and `pod-b` (10.244.2.2, node-2) each
/// answering with its name, and an agent in node-1's namespace (and in node-2's if asked).
/// Fields drop in order: agents first, then the namespaces.
struct Cluster {
    agents: Vec<Agent>,
    flags: Vec<Vec<String>>,
    topology: TwoNodes,
    manifests: Manifests,
}

const POD_A: Ipv4Addr = pod_ip(0, 2);
const POD_B: Ipv4Addr = pod_ip(1, 2);
const BOTH: [(Ipv4Addr, &str); 2] = [(POD_A, "node-1"), (POD_B, "node-2")];

impl Cluster {
    /// Builds the topology, writes the services `seed` makes, and starts agents on the first
    /// `nodes` nodes with `extra` flags.
    fn start(nodes: usize, extra: &[&str], seed: impl FnOnce(&Manifests)) -> Self {
        Self::start_with(AGENT.as_ref(), nodes, extra, seed)
    }

    /// [`Cluster::start`] with the agent binary `agent` (another version's).
    fn start_with(agent: &Path, nodes: usize, extra: &[&str], seed: impl FnOnce(&Manifests)) -> Self {
        let topology = TwoNodes::new([&["pod-a"], &["pod-b"]], TARGET_PORT, true).expect("building the topology");
        let manifests = Manifests::with_nodes("proxy-reliability");
        seed(&manifests);
        let mut cluster = Self { agents: Vec::new(), flags: Vec::new(), topology, manifests };
        for i in 0..nodes {
            let node = &cluster.topology.nodes[i];
            let flags = cluster.manifests.agent_flags(&node.name, extra);
            let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
            let agent = Agent::start_in(Some(&node.ns), agent, node.cgroup.path(), &refs).expect("an agent");
            cluster.agents.push(agent);
            cluster.flags.push(flags);
        }
        cluster
    }

    /// SIGKILLs node `i`'s agent and starts a new one on the same pins; returns its first sync
    /// and the time from the kill to that sync.
    fn restart(&mut self, i: usize) -> (Synced, Duration) {
        restart(&mut self.agents[i], &self.flags[i], &self.topology.nodes[i])
    }

    /// Kills node `i`'s agent (SIGKILL): its pins and links stay.
    fn kill(&mut self, i: usize) {
        self.agents[i].kill();
    }

    /// Starts node `i`'s agent again after [`Cluster::kill`]; returns its first sync.
    fn start_again(&mut self, i: usize) -> Synced {
        self.restart(i).0
    }

    /// `count` TCP connections from node-1's client pod (inside node-1's cgroup).
    fn connects_from_pod(&self, target: SocketAddrV4, count: usize) -> Tally {
        let node = &self.topology.nodes[0];
        let args = ["tcp", &target.to_string(), &count.to_string(), "1000"];
        probe(PROBE.as_ref(), &node.client.ns, Some(&node.cgroup), &args).expect("probing from the client pod")
    }

    /// `count` TCP connections from the external client.
    fn connects_from_outside(&self, target: SocketAddrV4, count: usize) -> Tally {
        let args = ["tcp", &target.to_string(), &count.to_string(), "1000"];
        probe(PROBE.as_ref(), &self.topology.client, None, &args).expect("probing from outside")
    }
}

fn node1(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(NODE_IPS[0], port)
}

fn clusterip(last: u8) -> SocketAddrV4 {
    SocketAddrV4::new(vip(last), PORT)
}

/// SIGKILLs `agent` and starts a new one on the same pins (it adopts the maps and links);
/// returns once the new one has logged its first sync, with the time from the kill to it.
fn restart(agent: &mut Agent, flags: &[String], node: &Node) -> (Synced, Duration) {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let started = Instant::now();
    agent.restart(AGENT.as_ref(), node.cgroup.path(), &flags).expect("restarting the agent");
    let first = agent.wait_for_sync(0, |_| true, Duration::from_secs(20)).expect("the first sync");
    (first, started.elapsed())
}

// ---- a paced client loop, in probe processes ----

/// Probe processes started by a load loop, killed (by PID) if the test fails before they end.
struct Clients(Vec<Child>);

impl Drop for Clients {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a load loop did.
#[derive(Debug, Default)]
struct Load {
    tally: Tally,
    attempted: usize,
    took: Duration,
}

/// About `per_second` new TCP connections per second to `target` for `duration`, from `ns`
/// (inside `cgroup` if given): every 100 ms a probe process makes a tenth of them, one socket
/// each, with a 1 s timeout (a dropped SYN is retransmitted only after 1 s, so it shows as a
/// failure). Bounded: `duration` plus the probes' own bound.
fn load(ns: &Netns, cgroup: Option<&Cgroup>, target: SocketAddrV4, per_second: usize, duration: Duration) -> Load {
    const TICK: Duration = Duration::from_millis(100);
    let per_tick = (per_second / 10).max(1);
    let started = Instant::now();
    let mut clients = Clients(Vec::new());
    let mut next = started;
    while next.duration_since(started) < duration {
        let child = command_in(ns, cgroup, PROBE.as_ref())
            .expect("a probe command")
            .args(["tcp", &target.to_string(), &per_tick.to_string(), "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting a probe");
        clients.0.push(child);
        next += TICK;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let mut out = Load { attempted: clients.0.len() * per_tick, ..Load::default() };
    for child in std::mem::take(&mut clients.0) {
        let output = child.wait_with_output().expect("waiting for a probe");
        assert!(output.status.success(), "probe: {}", String::from_utf8_lossy(&output.stderr));
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let (status, what) = line.split_once(' ').unwrap_or((line, ""));
            let into = if status == "ok" { &mut out.tally.answers } else { &mut out.tally.errors };
            *into.entry(what.to_owned()).or_default() += 1;
        }
    }
    out.took = started.elapsed();
    out
}

/// The `services` and `backends` maps under `root`.
type Snapshot = (BTreeMap<ServiceKey, ServiceValue>, BTreeMap<u32, Backend>);

fn snapshot(root: &Path) -> Snapshot {
    let maps = proxy_agent::datapath::AyaMaps::from_pins(root).expect("opening the pinned maps");
    (maps.services().collect(), maps.backends().collect())
}

/// Watches the master entries of `frontends` (TCP) under `root` until `stop`, returning every
/// moment one was missing, had another count than `count`, or named a slot or backend that was
/// not there: what a flush (or a half-written service) would look like to the kernel.
fn watch_masters(root: &Path, frontends: &[SocketAddrV4], count: u16, stop: &AtomicBool) -> (usize, Vec<String>) {
    let maps = proxy_agent::datapath::AyaMaps::from_pins(root).expect("opening the pinned maps");
    let masters: Vec<ServiceKey> = frontends
        .iter()
        .map(|f| ServiceKey::master(proxy_common::addr::from_ip(*f.ip()), f.port(), proxy_common::proto::TCP))
        .collect();
    let mut reads = 0;
    let mut problems = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let services: BTreeMap<ServiceKey, ServiceValue> = maps.services().collect();
        let backends: BTreeSet<u32> = maps.backends().map(|(id, _)| id).collect();
        reads += 1;
        for master in &masters {
            let problem = match services.get(master) {
                None => Some("no master entry".to_owned()),
                Some(value) if value.count != count => Some(format!("count {}", value.count)),
                Some(_) => (1..=count).find_map(|slot| match services.get(&master.with_slot(slot)) {
                    None => Some(format!("slot {slot} missing")),
                    Some(v) if !backends.contains(&v.backend_id) => Some(format!("backend {} missing", v.backend_id)),
                    Some(_) => None,
                }),
            };
            if let Some(problem) = problem
                && problems.len() < 20
            {
                problems.push(format!("{master:?}: {problem}"));
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    (reads, problems)
}

/// Issue 8 item 1: SIGKILL and restart node-1's agent twice while clients open ~200 new
/// connections per second to a ClusterIP (from a pod, socket path) and to a NodePort (from
/// outside, TC path) for 20 s, and one long-lived connection to each is held: nothing fails, the
/// kernel never sees a frontend missing or half written, and each new agent adopts the maps
/// (same entries, same backend and service ids) instead of flushing them.
#[test]
fn restart_under_load_drops_nothing() {
    const LOAD: Duration = Duration::from_secs(20);
    let mut cluster = Cluster::start(2, &[], |m| m.service(&nodeport("web", 10, 30066).build(), &BOTH));
    for agent in &cluster.agents {
        agent.wait_for_count(vip(10), PORT, Some(2), WAIT).expect("programmed");
    }
    let root = cluster.agents[0].bpf_root().to_owned();
    let frontends = [clusterip(10), node1(30066)];
    // Both paths work, to both pods, before anything happens.
    let pod = cluster.connects_from_pod(clusterip(10), 40);
    let outside = cluster.connects_from_outside(node1(30066), 40);
    for tally in [&pod, &outside] {
        assert_eq!(tally.answered(), 40, "{tally:?}");
        assert!(tally.from("pod-a") > 0 && tally.from("pod-b") > 0, "both pods answer: {tally:?}");
    }
    let before = snapshot(&root);

    let stop = AtomicBool::new(false);
    let Cluster { agents, flags, topology, .. } = &mut cluster;
    let node = &topology.nodes[0];
    let (restarts, held, loads, (reads, problems)) = thread::scope(|s| {
        let hold_seconds = (LOAD.as_secs() + 4).to_string();
        let hold = |ns: &'static str| {
            let (netns, cgroup, target) = match ns {
                "pod" => (&node.client.ns, Some(&node.cgroup), clusterip(10)),
                _ => (&topology.client, None, node1(30066)),
            };
            let args = ["hold".to_owned(), target.to_string(), hold_seconds.clone()];
            s.spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                probe(PROBE.as_ref(), netns, cgroup, &args).expect("holding a connection")
            })
        };
        let held = [hold("pod"), hold("outside")];
        let loads = [
            s.spawn(|| load(&node.client.ns, Some(&node.cgroup), clusterip(10), 200, LOAD)),
            s.spawn(|| load(&topology.client, None, node1(30066), 200, LOAD)),
        ];
        let watcher = s.spawn(|| watch_masters(&root, &frontends, 2, &stop));
        // Two SIGKILLs and restarts while the load runs.
        let began = Instant::now();
        let mut restarts = Vec::new();
        for at in [Duration::from_secs(4), Duration::from_secs(11)] {
            thread::sleep((began + at).saturating_duration_since(Instant::now()));
            restarts.push(restart(&mut agents[0], &flags[0], node));
        }
        let loads = loads.map(|l| l.join().expect("a load loop"));
        let held = held.map(|h| h.join().expect("a held connection"));
        stop.store(true, Ordering::Relaxed);
        (restarts, held, loads, watcher.join().expect("the map watcher"))
    });

    let names = ["ClusterIP from a pod", "NodePort from outside"];
    for (name, load) in names.iter().zip(&loads) {
        eprintln!(
            "{name}: {} connections attempted in {:.1} s, {} answered, failures {:?}",
            load.attempted,
            load.took.as_secs_f64(),
            load.tally.answered(),
            load.tally.errors
        );
        assert!(load.attempted >= 3_000, "{name}: about 200 per second: {load:?}");
        assert_eq!(load.tally.answered(), load.attempted, "{name}: zero failed connections: {load:?}");
        assert!(load.tally.from("pod-a") > 0 && load.tally.from("pod-b") > 0, "{name}: both pods: {load:?}");
    }
    for (name, held) in names.iter().zip(&held) {
        assert_eq!(held.answered(), 1, "{name}: the long-lived connection kept working: {held:?}");
    }
    for (i, (first, took)) in restarts.iter().enumerate() {
        eprintln!("restart {}: first sync {:?} after {took:?} (from the SIGKILL)", i + 1, first);
        assert_eq!(first.errors, 0, "restart {}: {first:?}", i + 1);
        // The ClusterIP, node-1's address and 127.0.0.1 on the nodePort; two backends.
        assert_eq!((first.frontends, first.backends), (3, 2), "restart {}: everything re-synced: {first:?}", i + 1);
    }
    eprintln!("map watcher: {reads} reads of the masters across both restarts, problems: {problems:?}");
    assert!(reads > 100, "the watcher kept reading ({reads})");
    assert!(problems.is_empty(), "the kernel never saw a frontend missing or half written: {problems:?}");
    // Adopted, not rebuilt: the same entries with the same ids, and at most one write per entry
    // in each new agent's first sync (rewriting what is there; a flush and refill would be two).
    let after = snapshot(&root);
    assert_eq!(after, before, "the maps hold the same entries and ids as before the restarts");
    for (first, _) in &restarts {
        assert!(first.service_writes <= before.0.len(), "{first:?} vs {} entries", before.0.len());
        assert!(first.backend_writes <= before.1.len(), "{first:?} vs {} backends", before.1.len());
    }
}

// ---- full maps ----

/// `GET /metrics` from the agent of `ns` (on that namespace's 127.0.0.1:10249): every sample.
fn metrics(ns: &Netns) -> BTreeMap<String, f64> {
    let text = thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("entering the node's namespace");
            let deadline = Instant::now() + WAIT;
            loop {
                match TcpStream::connect("127.0.0.1:10249") {
                    Ok(mut stream) => {
                        stream.set_read_timeout(Some(WAIT)).expect("a timeout");
                        stream
                            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                            .expect("GET");
                        let mut text = String::new();
                        stream.read_to_string(&mut text).expect("reading /metrics");
                        return text;
                    }
                    Err(e) if Instant::now() > deadline => panic!("no metrics server: {e}"),
                    Err(_) => thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .join()
        .expect("the metrics thread")
    });
    let body = text.split_once("\r\n\r\n").map_or(text.as_str(), |(_, body)| body);
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(series, value)| Some((series.to_owned(), value.parse().ok()?)))
        .collect()
}

/// One node whose `services` map holds 12 entries: node addresses only (no 127.0.0.1
/// nodePorts), so `a` (ClusterIP and nodePort, two backends) and `b` (ClusterIP) take 9 (a
/// master and two slots each) and are programmed; `c` (6 more) does not fit. `extra` flags
/// follow.
fn c_does_not_fit(extra: &[&str]) -> Cluster {
    let sizes = ["--services-map-size", "12", "--backends-map-size", "16", "--nodeport-addresses", "172.18.0.0/16"];
    let flags = [&sizes[..], extra].concat();
    let cluster = Cluster::start(1, &flags, |m| {
        m.service(&nodeport("a", 11, 30011).build(), &BOTH);
        m.service(&service("b").cluster_ip(&vip(12).to_string()).named_port("tcp", PORT.into(), "TCP").build(), &BOTH);
        m.service(&nodeport("c", 13, 30013).build(), &BOTH);
    });
    for (address, port) in [(vip(11), PORT), (NODE_IPS[0], 30011), (vip(12), PORT)] {
        cluster.agents[0].wait_for_count(address, port, Some(2), WAIT).expect("a and b are programmed");
    }
    cluster
}

/// Issue 8 item 6: with a `services` map of 12 entries, `a` (ClusterIP and nodePort, two
/// backends: 6 entries) and `b` (ClusterIP, two backends: 3) fit and `c` (6 more) does not:
/// `c` is refused as a whole (not even its ClusterIP, which alone would fit), with a log line
/// and `proxy_sync_errors_total`; `a` and `b` keep working; deleting `b` lets `c` in on the
/// very next sync.
///
/// Issue 13 defect 10: `c` is retried on every sync (here every second, `--sync-period 1s`),
/// but its refusal is logged once when it starts and once when it ends, not twice per retry.
#[test]
fn a_service_that_does_not_fit_is_refused_whole_and_let_in_when_room_frees() {
    let mut cluster = c_does_not_fit(&["--sync-period", "1s"]);
    let agent = &cluster.agents[0];
    for (address, port) in [(vip(13), PORT), (NODE_IPS[0], 30013)] {
        assert_eq!(agent.count(address, port).expect("reading the maps"), None, "c is refused as a whole");
    }
    wait_until("c refused", WAIT, || !refusal_lines(agent, "service refused as a whole").is_empty());
    let refused = refusal_lines(agent, "service refused as a whole");
    assert_eq!(refused.len(), 1, "one line when the refusal starts: {refused:#?}");
    let error = refused[0].text("error").unwrap_or_default();
    assert!(
        error.contains("the map is full: raise --services-map-size, which sizes the services map"),
        "the line names the full map and the flag that sizes it: {error}"
    );
    let errors = metrics(&cluster.topology.nodes[0].ns).get("proxy_sync_errors_total").copied().unwrap_or(0.0);
    assert!(errors >= 1.0, "proxy_sync_errors_total counts the failed write: {errors}");
    let failing = agent.syncs().into_iter().find(|s| s.refused > 0).expect("a sync that refused a service");
    assert_eq!(failing.errors, 0, "a refusal for lack of room is not a failing sync: {failing:?}");
    assert_eq!(failing.frontends, 3, "a's two frontends and b's: {failing:?}");
    // Everything already programmed keeps working.
    for target in [clusterip(11), clusterip(12)] {
        let tally = cluster.connects_from_pod(target, 30);
        assert_eq!(tally.answered(), 30, "{target} from a pod: {tally:?}");
    }
    let tally = cluster.connects_from_outside(node1(30011), 30);
    assert_eq!(tally.answered(), 30, "a's nodePort from outside: {tally:?}");
    let tally = cluster.connects_from_outside(node1(30013), 5);
    assert_eq!(tally.answered(), 0, "c's nodePort is not served: {tally:?}");

    // Retried every second, still without room: no new warning.
    wait_until("c retried by the periodic check", WAIT, || refusal_lines(agent, "service still refused").len() >= 3);
    let refused = refusal_lines(agent, "service refused as a whole");
    assert_eq!(refused.len(), 1, "retries add no warning: {refused:#?}");
    let warnings = agent.lines().into_iter().filter(|l| l.level == "WARN" && l.text("service") == Some("default/c"));
    assert_eq!(warnings.count(), 1, "no other warning about c either:\n{}", agent.log());

    // Room frees: b goes, c comes in on the same sync.
    let seen = agent.syncs().len();
    cluster.manifests.delete("b");
    let synced = cluster.agents[0].wait_for_sync(seen, |s| s.frontends == 4, WAIT).expect("a sync with c in");
    let agent = &cluster.agents[0];
    assert_eq!(synced.errors, 0, "c fits now: {synced:?}");
    assert_eq!(agent.count(vip(12), PORT).expect("reading the maps"), None, "b is gone");
    for (address, port) in [(vip(13), PORT), (NODE_IPS[0], 30013)] {
        assert_eq!(agent.count(address, port).expect("reading the maps"), Some(2), "c is in");
    }
    let tally = cluster.connects_from_pod(clusterip(13), 30);
    assert_eq!(tally.answered(), 30, "c from a pod: {tally:?}");
    assert!(tally.from("pod-a") > 0 && tally.from("pod-b") > 0, "{tally:?}");
    let tally = cluster.connects_from_outside(node1(30013), 30);
    assert_eq!(tally.answered(), 30, "c's nodePort from outside: {tally:?}");
    let tally = cluster.connects_from_pod(clusterip(11), 30);
    assert_eq!(tally.answered(), 30, "a still works: {tally:?}");
    let agent = &cluster.agents[0];
    let ended = refusal_lines(agent, "service no longer refused: programmed");
    assert_eq!(ended.len(), 1, "one line when the refusal ends: {ended:#?}");
    assert_eq!(refusal_lines(agent, "service refused as a whole").len(), 1);
}

/// Issue 15: the other way in for a refused service, a flag raise and a restart. With the
/// same 12-entry `services` map, `c` is refused (one log line, counted in
/// `proxy_sync_errors_total`, saying which size would hold it) while `a` and `b` work; node-1's
/// agent is then restarted over the same --bpf-root with that size: the layout code replaces
/// the services map and the maps sized from it, and `c` is programmed by the first sync. So it
/// is after a second restart with `--services-map-size 131072`, past
/// `service_names`' old fixed size (65 536), which no flag lifted: the kernel's own record of the
/// pinned maps (`bpftool map show`) has both at the flag's size.
#[test]
fn a_refused_service_is_programmed_once_a_restart_raises_the_map_size() {
    const RAISED: u32 = 131_072;
    let mut cluster = c_does_not_fit(&[]);
    let agent = &cluster.agents[0];
    wait_until("c refused", WAIT, || !refusal_lines(agent, "service refused as a whole").is_empty());
    let refused = refusal_lines(agent, "service refused as a whole");
    assert_eq!(refused.len(), 1, "one line:\n{}", agent.log());
    let error = refused[0].text("error").unwrap_or_default();
    let suggested: u32 = error
        .split_once("; --services-map-size ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .and_then(|(size, _)| size.parse().ok())
        .unwrap_or_else(|| panic!("the line says which size holds c: {error}"));
    assert!(suggested > 12, "{error}");
    let errors = metrics(&cluster.topology.nodes[0].ns).get("proxy_sync_errors_total").copied().unwrap_or(0.0);
    assert!(errors >= 1.0, "proxy_sync_errors_total counts the refusal: {errors}");
    assert_eq!(agent.count(vip(13), PORT).expect("reading the maps"), None, "c is refused");
    let tally = cluster.connects_from_pod(clusterip(11), 20);
    assert_eq!(tally.answered(), 20, "a works meanwhile: {tally:?}");

    // The size the line suggested, then one past service_names' old fixed size.
    for size in [suggested, RAISED] {
        let flag = cluster.flags[0].iter().position(|f| f == "--services-map-size").expect("the flag") + 1;
        cluster.flags[0][flag] = size.to_string();
        cluster.restart(0);
        let agent = &mut cluster.agents[0];
        for (address, port) in [(vip(13), PORT), (NODE_IPS[0], 30013), (vip(11), PORT), (vip(12), PORT)] {
            agent.wait_for_count(address, port, Some(2), WAIT).expect("c is programmed, a and b still are");
        }
        agent.wait_for_log("upgrade done", WAIT).expect("the resized maps take the pins");
        assert!(refusal_lines(agent, "service refused as a whole").is_empty(), "nothing refused:\n{}", agent.log());
        let root = agent.bpf_root().to_owned();
        for map in [proxy_common::maps::SERVICES, proxy_common::maps::SERVICE_NAMES] {
            assert_eq!(bpftool_max_entries(&root.join(map)), size, "{map} follows --services-map-size");
        }
    }
    for (target, name) in [(clusterip(13), "c"), (clusterip(11), "a"), (clusterip(12), "b")] {
        let tally = cluster.connects_from_pod(target, 20);
        assert_eq!(tally.answered(), 20, "{name} from a pod: {tally:?}");
    }
    let tally = cluster.connects_from_outside(node1(30013), 20);
    assert_eq!(tally.answered(), 20, "c's nodePort from outside: {tally:?}");
}

/// Issue 15: `--preallocate-bpf-maps` (Cilium's flag) preallocates the maps only the agent
/// writes, whose inserts are the largest cost of a full sync. With it the agent serves as
/// without, over maps the kernel reports preallocated; a restart without it replaces them
/// with the object's non-preallocated ones as an upgrade does (the services stay served), and
/// one with it again preallocates them again.
#[test]
fn preallocated_maps_serve_and_a_restart_changing_the_flag_replaces_them() {
    let sizes = ["--services-map-size", "4096", "--backends-map-size", "4096", "--nodeport-addresses", "172.18.0.0/16"];
    let flags = [&sizes[..], &["--preallocate-bpf-maps"]].concat();
    let mut cluster = Cluster::start(1, &flags, |m| {
        m.service(&nodeport("a", 11, 30011).build(), &BOTH);
    });
    for preallocated in [true, false, true] {
        if !preallocated {
            cluster.flags[0].retain(|f| f != "--preallocate-bpf-maps");
            cluster.restart(0);
        } else if cluster.flags[0].iter().all(|f| f != "--preallocate-bpf-maps") {
            cluster.flags[0].push("--preallocate-bpf-maps".into());
            cluster.restart(0);
        }
        let agent = &mut cluster.agents[0];
        for (address, port) in [(vip(11), PORT), (NODE_IPS[0], 30011)] {
            agent.wait_for_count(address, port, Some(2), WAIT).expect("a is programmed");
        }
        let root = agent.bpf_root().to_owned();
        // Flag 1 is BPF_F_NO_PREALLOC. After a restart that changes it, the new maps take the
        // pins once the first full sync has filled them (the upgrade's swap).
        let flags = |map: &str| PinnedMap::open(&root.join(map)).map(|m| m.info().map_flags).unwrap_or(u32::MAX);
        wait_until("the maps as the flag asks", WAIT, || {
            layout::PREALLOCATABLE.iter().all(|map| (flags(map) & 1 == 0) == preallocated)
        });
        let shown: Vec<String> = layout::PREALLOCATABLE.iter().map(|m| format!("{m} {:#x}", flags(m))).collect();
        assert!(
            layout::PREALLOCATABLE.iter().all(|map| (flags(map) & 1 == 0) == preallocated),
            "preallocated: {preallocated}: {shown:?}"
        );
        let tally = cluster.connects_from_pod(clusterip(11), 20);
        assert_eq!(tally.answered(), 20, "a from a pod, preallocated: {preallocated}: {tally:?}");
        let tally = cluster.connects_from_outside(node1(30011), 20);
        assert_eq!(tally.answered(), 20, "a's nodePort from outside, preallocated: {preallocated}: {tally:?}");
    }
}

/// `max_entries` of the map pinned at `pin`, as `bpftool map show` reports it.
fn bpftool_max_entries(pin: &Path) -> u32 {
    let program = if Path::new("/usr/sbin/bpftool").exists() { "/usr/sbin/bpftool" } else { "bpftool" };
    let output =
        Command::new(program).args(["--json", "map", "show", "pinned"]).arg(pin).output().expect("running bpftool");
    assert!(output.status.success(), "bpftool map show {}: {}", pin.display(), String::from_utf8_lossy(&output.stderr));
    let map: serde_json::Value = serde_json::from_slice(&output.stdout).expect("bpftool's JSON");
    let max = map["max_entries"].as_u64().unwrap_or_else(|| panic!("no max_entries for {}: {map}", pin.display()));
    u32::try_from(max).expect("a u32")
}

/// The agent's log lines about service `default/c` whose message starts with `message`.
fn refusal_lines(agent: &Agent, message: &str) -> Vec<proxy_tests::agent::LogLine> {
    agent
        .lines()
        .into_iter()
        .filter(|l| l.message.starts_with(message) && l.text("service") == Some("default/c"))
        .collect()
}

// ---- stale state after a restart ----

/// Issue 8 item 4, each case on its own service, all changed while node-1's agent was down:
/// `zero` scales to zero, `gone` is deleted, `shrunk` loses pod-b. After the restarted agent's
/// first sync, no new connection (ClusterIP from a pod, NodePort from outside) reaches a backend
/// that is no longer there for it.
#[test]
fn no_new_flow_reaches_a_backend_removed_while_the_agent_was_down() {
    let cases = [("zero", 21, 30021), ("gone", 22, 30022), ("shrunk", 23, 30023)];
    let mut cluster = Cluster::start(1, &[], |m| {
        for (name, last, node_port) in cases {
            m.service(&nodeport(name, last, node_port).build(), &BOTH);
        }
    });
    for (_, last, node_port) in cases {
        cluster.agents[0].wait_for_count(vip(last), PORT, Some(2), WAIT).expect("programmed");
        cluster.agents[0].wait_for_count(NODE_IPS[0], node_port, Some(2), WAIT).expect("programmed");
        // Flows to both pods before, on both paths (conntrack and affinity-free selection).
        for tally in
            [cluster.connects_from_pod(clusterip(last), 30), cluster.connects_from_outside(node1(node_port), 30)]
        {
            assert!(tally.from("pod-a") > 0 && tally.from("pod-b") > 0, "{tally:?}");
        }
    }

    cluster.kill(0);
    let web = |name: &str, last: u8, node_port: u16| nodeport(name, last, node_port).build();
    cluster.manifests.service(&web("zero", 21, 30021), &[]);
    cluster.manifests.delete("gone");
    cluster.manifests.service(&web("shrunk", 23, 30023), &[(POD_A, "node-1")]);
    // Meanwhile the kernel still serves the old state (nothing reads the files).
    assert_eq!(cluster.connects_from_pod(clusterip(22), 10).answered(), 10);

    let first = cluster.start_again(0);
    eprintln!("first sync after the restart: {first:?}");
    assert_eq!(first.errors, 0, "{first:?}");
    for (what, tally) in [
        ("ClusterIP", cluster.connects_from_pod(clusterip(21), 20)),
        ("NodePort", cluster.connects_from_outside(node1(30021), 20)),
    ] {
        assert_eq!(tally.answered(), 0, "zero, {what}: no endpoint, no answer: {tally:?}");
        assert_eq!(tally.errors.get("refused"), Some(&20), "zero, {what}: refused (kube-proxy's REJECT): {tally:?}");
    }
    for (what, tally) in [
        ("ClusterIP", cluster.connects_from_pod(clusterip(22), 20)),
        ("NodePort", cluster.connects_from_outside(node1(30022), 20)),
    ] {
        assert_eq!(tally.answered(), 0, "gone, {what}: nothing serves a deleted service: {tally:?}");
    }
    for (what, tally) in [
        ("ClusterIP", cluster.connects_from_pod(clusterip(23), 100)),
        ("NodePort", cluster.connects_from_outside(node1(30023), 100)),
    ] {
        assert_eq!(tally.from("pod-a"), 100, "shrunk, {what}: only pod-a: {tally:?}");
    }
}

/// Runs `upgrade` 3 s into 8 s of load on node-1: about 200 new connections per second to
/// ClusterIP `vip(vip_last)` from its client pod and to its `node_port` from outside, and one
/// long-lived connection on each path. Asserts that no connection failed and that both
/// long-lived ones kept working; returns what `upgrade` returned.
fn upgrade_under_load<R>(topology: &TwoNodes, vip_last: u8, node_port: u16, upgrade: impl FnOnce() -> R) -> R {
    const LOAD: Duration = Duration::from_secs(8);
    let node = &topology.nodes[0];
    let (result, held, loads) = thread::scope(|s| {
        let hold_seconds = (LOAD.as_secs() + 3).to_string();
        let hold = |netns, cgroup, target: SocketAddrV4| {
            let args = ["hold".to_owned(), target.to_string(), hold_seconds.clone()];
            s.spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                probe(PROBE.as_ref(), netns, cgroup, &args).expect("holding a connection")
            })
        };
        let held = [
            hold(&node.client.ns, Some(&node.cgroup), clusterip(vip_last)),
            hold(&topology.client, None, node1(node_port)),
        ];
        let loads = [
            s.spawn(|| load(&node.client.ns, Some(&node.cgroup), clusterip(vip_last), 200, LOAD)),
            s.spawn(|| load(&topology.client, None, node1(node_port), 200, LOAD)),
        ];
        thread::sleep(Duration::from_secs(3));
        let result = upgrade();
        (result, held.map(|h| h.join().expect("a held connection")), loads.map(|l| l.join().expect("a load loop")))
    });
    let names = ["ClusterIP from a pod", "NodePort from outside"];
    for (name, load) in names.iter().zip(&loads) {
        let (attempted, answered) = (load.attempted, load.tally.answered());
        eprintln!("{name}: {attempted} attempted, {answered} answered, failures {:?}", load.tally.errors);
    }
    for (name, held) in names.iter().zip(&held) {
        assert_eq!(held.answered(), 1, "{name}: the long-lived connection kept working: {held:?}");
    }
    for (name, load) in names.iter().zip(&loads) {
        assert!(load.attempted >= 1_200, "{name}: about 200 per second: {load:?}");
        assert_eq!(load.tally.answered(), load.attempted, "{name}: zero failed connections: {load:?}");
    }
    result
}

/// Issue 8 item 2, an upgrade that changes map layouts, under load. Node-1's agent is killed
/// and started again (1) over pins made to look like what agents before layout versions left
/// (layout 1: no `layout-v<N>` record) while they are really today's, and (2) with
/// `--services-map-size` and `--backends-map-size` changed, so those two maps no longer fit and
/// must be replaced (see `proxy_agent::datapath::layout`). Meanwhile clients open ~200
/// connections per second on both paths and hold one long-lived connection each. The new agent
/// shares the maps unchanged since layout 1 and replaces the others (changed since, or
/// resized): new maps, entries carried over as they are (their sizes, not the missing record,
/// say they need no conversion), first sync, then the swap of programs and pins. No connection
/// fails, the long-lived ones keep working (the flows' conntrack entries were carried), ids are
/// kept, the new sizes are in place, and the old maps are released.
#[test]
fn an_upgrade_that_changes_map_layouts_drops_nothing() {
    const SERVICES_SIZE: u32 = 100_000;
    const BACKENDS_SIZE: u32 = 50_000;
    let mut cluster = Cluster::start(1, &[], |m| m.service(&nodeport("web", 50, 30050).build(), &BOTH));
    cluster.agents[0].wait_for_count(vip(50), PORT, Some(2), WAIT).expect("programmed");
    let root = cluster.agents[0].bpf_root().to_owned();
    let record = root.join(format!("layout-v{}", proxy_common::maps::LAYOUT_VERSION));
    assert!(record.is_dir(), "the agent records its layout beside the pins");
    let info = |name: &str| {
        let map = aya::maps::MapData::from_pin(root.join(name)).expect("a pinned map");
        let info = map.info().expect("its info");
        (info.id(), info.max_entries())
    };
    let old: BTreeMap<&str, (u32, u32)> = proxy_common::maps::ALL.iter().map(|m| (*m, info(m))).collect();
    assert!(
        old[proxy_common::maps::SERVICES].1 != SERVICES_SIZE && old[proxy_common::maps::BACKENDS].1 != BACKENDS_SIZE
    );
    let before = snapshot(&root);

    let Cluster { agents, flags, topology, .. } = &mut cluster;
    let node = &topology.nodes[0];
    let sizes = ["--services-map-size", &SERVICES_SIZE.to_string(), "--backends-map-size", &BACKENDS_SIZE.to_string()]
        .map(str::to_owned);
    flags[0].extend(sizes);
    let upgrade = upgrade_under_load(topology, 50, 30050, || {
        agents[0].kill();
        std::fs::remove_dir(&record).expect("making the pins layout 1's");
        let upgrade = restart(&mut agents[0], &flags[0], node);
        agents[0].wait_for_log("upgrade done", WAIT).expect("the agent swaps to the new maps");
        upgrade
    });
    eprintln!("upgrade: first sync {:?} after {:?} (from the SIGKILL)", upgrade.0, upgrade.1);
    // service_names, source_ranges and maglev are sized from --services-map-size.
    let replaced = [
        proxy_common::maps::SERVICES,
        proxy_common::maps::BACKENDS,
        proxy_common::maps::SERVICE_NAMES,
        proxy_common::maps::SOURCE_RANGES,
        proxy_common::maps::MAGLEV,
    ];
    for name in proxy_common::maps::ALL {
        let (id, size) = info(name);
        match replaced.contains(name) || proxy_common::maps::changed_in(name) > 1 {
            true => assert_ne!(id, old[name].0, "{name} is a new map"),
            false => assert_eq!((id, size), old[name], "{name} is shared with the old programs"),
        }
    }
    let sizes = replaced.map(|name| info(name).1);
    assert_eq!(sizes, [SERVICES_SIZE, BACKENDS_SIZE, SERVICES_SIZE, SERVICES_SIZE, SERVICES_SIZE], "the new sizes");
    assert_eq!(snapshot(&root), before, "the same services and backends, with the same ids");
    assert!(record.is_dir(), "the layout is recorded again");
    assert!(!root.join(format!("upgrade-v{}", proxy_common::maps::LAYOUT_VERSION)).exists(), "no staging left");
    wait_until("the replaced maps are released", WAIT, || {
        let live: BTreeSet<u32> = aya::maps::loaded_maps().filter_map(Result::ok).map(|m| m.id()).collect();
        replaced.iter().all(|name| !live.contains(&old[name].0))
    });
    let attached = bpftool_cgroup(cluster.topology.nodes[0].cgroup.path());
    assert_eq!(attached, 8, "the eight socket programs (four hooks per family), once each");
}

/// Names the agent binary of [`PREVIOUS_LAYOUT_COMMIT`], which `cargo xtask test` builds and
/// caches under `target/previous-agent/` (`cargo xtask previous-agent` prints it).
const PREVIOUS_AGENT_ENV: &str = "PROXY_PREVIOUS_AGENT";
/// The last commit whose maps have layout 2 (4-byte IPv4 addresses in every map).
const PREVIOUS_LAYOUT_COMMIT: &str = "295edb55bfb9e06f76b4bf1eda11da2c624f8af7";

/// The previous agent's binary; a clear failure (never a skip) when it was not built.
fn previous_agent() -> PathBuf {
    let Some(path) = std::env::var_os(PREVIOUS_AGENT_ENV).map(PathBuf::from) else {
        panic!(
            "{PREVIOUS_AGENT_ENV} is not set: it names the agent of commit {PREVIOUS_LAYOUT_COMMIT} (the last \
             layout 2), which `cargo xtask test` builds; run `cargo xtask previous-agent` and export the \
             {PREVIOUS_AGENT_ENV}=... line it prints"
        )
    };
    assert!(path.is_file(), "{PREVIOUS_AGENT_ENV}={}: no such file; run `cargo xtask previous-agent`", path.display());
    path
}

/// The entries of the map `name` pinned under `root`, read as `K` and `V`.
fn pinned_entries<K: aya::Pod, V: aya::Pod>(root: &Path, name: &str) -> Vec<(K, V)> {
    let map = PinnedMap::open(&root.join(name)).unwrap_or_else(|e| panic!("opening {name}: {e}"));
    map.entries().unwrap_or_else(|e| panic!("reading {name}: {e}"))
}

/// The pod each client sticks to at the ClientIP-affinity service 10.96.0.61 (ClusterIP from
/// node-1's client pod, nodePort 30061 from outside): ten connections each, all to one pod.
fn stuck_to(cluster: &Cluster) -> [String; 2] {
    let tallies = [cluster.connects_from_pod(clusterip(61), 10), cluster.connects_from_outside(node1(30061), 10)];
    tallies.map(|tally| {
        assert_eq!(tally.answered(), 10, "{tally:?}");
        assert_eq!(tally.answers.len(), 1, "ClientIP affinity: one pod per client: {tally:?}");
        tally.answers.into_keys().next().expect("one pod")
    })
}

/// Issue 14, "an upgrade from today's layout under load drops nothing": node-1 runs the real
/// agent of the last layout-2 commit ([`PREVIOUS_LAYOUT_COMMIT`]: 4-byte addresses in every
/// map), serving a service and a ClientIP-affinity service; a client pod and the outside client
/// each stick to a pod. Under ~200 new connections per second on both paths and one held
/// connection on each, the old agent is SIGKILLed and today's agent starts over its pins: it
/// replaces every map whose layout changed, carries the entries over converted (IPv4-mapped
/// 16-byte addresses), syncs and swaps. No connection fails; the held NodePort connection
/// keeps working (its conntrack entries were converted: without them the new TC program drops
/// its packets as not new); the affinity and backend entries arrive converted with the same ids;
/// each client still reaches its pod.
#[test]
fn an_upgrade_from_layout_2_under_load_drops_nothing() {
    use proxy_agent::datapath::layout::v2;
    use proxy_common::{
        conntrack::{CtKey, CtValue},
        maps,
    };

    let previous = previous_agent();
    let mut cluster = Cluster::start_with(&previous, 1, &[], |m| {
        m.service(&nodeport("web", 60, 30060).build(), &BOTH);
        m.service(&nodeport("sticky", 61, 30061).session_affinity(None).build(), &BOTH);
    });
    let root = cluster.agents[0].bpf_root().to_owned();
    assert!(root.join("layout-v2").is_dir(), "the previous agent pinned layout 2");
    for (what, tally) in [
        ("ClusterIP", cluster.connects_from_pod(clusterip(60), 40)),
        ("NodePort", cluster.connects_from_outside(node1(30060), 40)),
    ] {
        assert_eq!(tally.answered(), 40, "{what} through the previous agent: {tally:?}");
        assert!(tally.from("pod-a") > 0 && tally.from("pod-b") > 0, "{what}: both pods: {tally:?}");
    }
    let sticky = stuck_to(&cluster);
    let old_affinity: Vec<(v2::AffinityKey, AffinityValue)> = pinned_entries(&root, maps::AFFINITY);
    assert_eq!(old_affinity.len(), 2, "one entry per client: {old_affinity:?}");
    let old_backends: Vec<(u32, v2::Backend)> = pinned_entries(&root, maps::BACKENDS);
    let map_id = |name: &str| {
        let map = aya::maps::MapData::from_pin(root.join(name)).expect("a pinned map");
        map.info().expect("its info").id()
    };
    // The maps added after layout 2 (Maglev's) are not pinned yet: today's agent creates them.
    let old_ids: BTreeMap<&str, u32> =
        maps::ALL.iter().filter(|m| root.join(m).exists()).map(|m| (*m, map_id(m))).collect();
    assert!(!old_ids.contains_key(maps::MAGLEV), "the previous agent has no Maglev maps");

    let Cluster { agents, flags, topology, .. } = &mut cluster;
    let node = &topology.nodes[0];
    let upgrade = upgrade_under_load(topology, 60, 30060, || {
        // Today's agent over the previous agent's pins (`restart` starts this build's agent).
        let upgrade = restart(&mut agents[0], &flags[0], node);
        agents[0].wait_for_log("upgrade done", WAIT).expect("the agent swaps to the new maps");
        upgrade
    });
    eprintln!("upgrade from layout 2: first sync {:?} after {:?} (from the SIGKILL)", upgrade.0, upgrade.1);
    assert_eq!(upgrade.0.errors, 0, "{:?}", upgrade.0);
    // Every map of a changed layout is a new one (the previous agent's are gone with their
    // pins); the two unchanged since layout 1 are shared; the maps it did not have are created.
    for name in maps::ALL {
        match old_ids.get(name) {
            Some(&old) => {
                let shared = maps::changed_in(name) <= 2;
                assert_eq!(map_id(name) == old, shared, "{name}: shared only if its layout did not change");
            }
            None => assert!(map_id(name) > 0, "{name} is created"),
        }
    }
    assert!(root.join(format!("layout-v{}", maps::LAYOUT_VERSION)).is_dir(), "the new layout is recorded");
    assert!(!root.join("layout-v2").exists() && !layout::staging(&root).exists(), "no old record, no staging");
    // Converted, same ids: the backends, and the affinity entries as the old agent left them
    // (nothing has used the sticky service since).
    let backends: BTreeMap<u32, Backend> = pinned_entries(&root, maps::BACKENDS).into_iter().collect();
    let want: BTreeMap<u32, Backend> = old_backends.into_iter().map(|(id, b)| (id, b.into())).collect();
    assert_eq!(backends, want, "the backends with their ids, addresses IPv4-mapped");
    let affinity: Vec<(AffinityKey, AffinityValue)> = pinned_entries(&root, maps::AFFINITY);
    for (key, value) in &old_affinity {
        let new = affinity.iter().find(|(k, _)| *k == AffinityKey::from(*key)).map(|(_, v)| v);
        assert_eq!(new, Some(value), "{key:?} kept: {affinity:?}");
    }
    let conntrack: Vec<(CtKey, CtValue)> = pinned_entries(&root, maps::CONNTRACK);
    assert!(conntrack.iter().all(|(k, _)| proxy_common::addr::is_v4(&k.src)), "{} flows", conntrack.len());
    assert_eq!(stuck_to(&cluster), sticky, "each client still reaches the pod it stuck to");
}

/// e2e row 74 (the eBPF analog of "should recreate its iptables rules if they are deleted") and
/// issue 8 item 4's periodic reconciliation, with `--sync-period 1s`: someone flushes the
/// `services` and `backends` maps and unpins every program link (which detaches the programs),
/// and rewrites an affinity entry to a backend that is not behind its service. Without any
/// change in the cluster, the periodic check puts the maps and links back and removes the stale
/// affinity entry; then ClusterIP (socket path) and NodePort (TC path) serve both pods again.
#[test]
fn wiped_maps_and_links_are_restored_by_the_periodic_check() {
    let mut cluster = Cluster::start(1, &["--sync-period", "1s"], |m| {
        m.service(&nodeport("web", 30, 30030).build(), &BOTH);
        m.service(&nodeport("sticky", 31, 30031).session_affinity(None).build(), &BOTH);
    });
    for last in [30, 31] {
        cluster.agents[0].wait_for_count(vip(last), PORT, Some(2), WAIT).expect("programmed");
    }
    let root = cluster.agents[0].bpf_root().to_owned();

    // An affinity entry, scribbled to name a backend no service has.
    let sticky = cluster.connects_from_pod(clusterip(31), 5);
    assert_eq!(sticky.answered(), 5, "{sticky:?}");
    let affinity_pin = aya::maps::MapData::from_pin(root.join(proxy_common::maps::AFFINITY)).expect("affinity pin");
    let mut affinity: aya::maps::HashMap<_, AffinityKey, AffinityValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(affinity_pin)).expect("the affinity map");
    let (key, value) = affinity.iter().next().expect("the connects left an affinity entry").expect("reading it");
    const NO_SUCH_BACKEND: u32 = 0x7fff_fff0;
    affinity.insert(key, AffinityValue { backend_id: NO_SUCH_BACKEND, ..value }, 0).expect("rewriting the entry");

    // Flush the service maps and unpin every link.
    let mut maps = proxy_agent::datapath::AyaMaps::from_pins(&root).expect("opening the pinned maps");
    let (services, backends) = snapshot(&root);
    for key in services.keys() {
        maps.delete_service(*key).expect("deleting a services entry");
    }
    for id in backends.keys() {
        maps.delete_backend(*id).expect("deleting a backends entry");
    }
    let links: Vec<PathBuf> =
        std::fs::read_dir(root.join("links")).expect("links/").map(|e| e.expect("an entry").path()).collect();
    assert!(links.len() >= 5, "four cgroup links and at least one TC link: {links:?}");
    for link in &links {
        std::fs::remove_file(link).expect("unpinning a link");
    }

    let agent = &mut cluster.agents[0];
    agent.wait_for_log("restored map entries", WAIT).expect("the agent restores the maps");
    agent.wait_for_log("links removed or detached outside the agent", WAIT).expect("the agent restores the links");
    wait_until("every link is pinned again", WAIT, || links.iter().all(|l| l.exists()));
    assert_eq!(snapshot(&root), (services, backends), "the maps hold what they held before the flush");
    wait_until("the stale affinity entry is removed", WAIT, || {
        affinity.get(&key, 0).map_or(true, |v| v.backend_id != NO_SUCH_BACKEND)
    });
    let attached = bpftool_cgroup(cluster.topology.nodes[0].cgroup.path());
    assert_eq!(
        attached, 8,
        "the eight socket programs (four hooks per family) are attached to the node's cgroup again"
    );
    for (what, tally) in [
        ("ClusterIP", cluster.connects_from_pod(clusterip(30), 40)),
        ("NodePort", cluster.connects_from_outside(node1(30030), 40)),
    ] {
        assert_eq!(tally.answered(), 40, "{what}: {tally:?}");
        assert!(tally.from("pod-a") > 0 && tally.from("pod-b") > 0, "{what}: both pods serve again: {tally:?}");
    }
}

/// A TCP connection from the external client's fixed source `port` to `target`, closed with a
/// reset (no TIME_WAIT, so the same 4-tuple can open again at once): the answer, or the error.
fn connect_from(ns: &Netns, port: u16, target: SocketAddrV4) -> Result<String, String> {
    thread::scope(|s| {
        s.spawn(|| {
            ns.enter().map_err(|e| e.to_string())?;
            // SAFETY: plain socket calls on a descriptor this function owns; it ends in a TcpStream.
            let stream = unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error().to_string());
                }
                let stream = TcpStream::from_raw_fd(fd);
                let one: libc::c_int = 1;
                let size = |n: usize| n as libc::socklen_t;
                libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&one as *const i32).cast(), size(4));
                let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                let linger_size = size(size_of::<libc::linger>());
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    linger_size,
                );
                let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
                let tv_size = size(size_of::<libc::timeval>());
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    tv_size,
                );
                let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                    sin_zero: [0; 8],
                };
                let sin_size = size(size_of::<libc::sockaddr_in>());
                let local = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
                if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), sin_size) != 0 {
                    return Err(format!("bind :{port}: {}", std::io::Error::last_os_error()));
                }
                let remote = sockaddr(target);
                if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), sin_size) != 0 {
                    return Err(format!("connect: {}", std::io::Error::last_os_error()));
                }
                stream
            };
            stream.set_read_timeout(Some(Duration::from_secs(1))).map_err(|e| e.to_string())?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).map_err(|e| e.to_string())?;
            Ok(line.trim().to_owned())
        })
        .join()
        .expect("the client thread")
    })
}

/// A new TCP flow that happens to reuse the 4-tuple of a flow closed moments before (a client
/// with a fixed source port, or port reuse under load) must not be sent to a backend removed
/// while the agent was down.
#[test]
fn a_reused_tcp_tuple_does_not_reach_a_removed_backend() {
    let mut cluster = Cluster::start(1, &[], |m| m.service(&nodeport("web", 10, 30066).build(), &BOTH));
    cluster.agents[0].wait_for_count(NODE_IPS[0], 30066, Some(2), WAIT).expect("programmed");
    // A source port whose flow went to pod-b.
    let port = (40_000..40_064)
        .find(|port| connect_from(&cluster.topology.client, *port, node1(30066)).as_deref() == Ok("pod-b"))
        .expect("one of 64 flows reaches pod-b");
    cluster.kill(0);
    cluster.manifests.service(&nodeport("web", 10, 30066).build(), &[(POD_A, "node-1")]);
    cluster.start_again(0);
    let answer = connect_from(&cluster.topology.client, port, node1(30066));
    assert_eq!(answer.as_deref(), Ok("pod-a"), "a new flow from port {port} after pod-b left the service");
}

/// A UDP client that keeps one socket (a fixed source port) is moved off a backend removed
/// while the agent was down, once the restarted agent has synced (kube-proxy deletes the UDP
/// conntrack entries of removed endpoints for this reason).
#[test]
fn a_udp_flow_from_outside_leaves_a_removed_backend() {
    let udp = |name: &str| {
        service(name).cluster_ip(&vip(10).to_string()).named_port("udp", PORT.into(), "UDP").node_port(30066).build()
    };
    let mut cluster = Cluster::start(1, &[], |m| m.service(&udp("dns"), &BOTH));
    let ask = |socket: &UdpSocket| -> Option<String> {
        socket.send_to(b"hello\n", node1(30066)).ok()?;
        let mut buf = [0u8; 512];
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    };
    let (socket, answers) = thread::scope(|s| {
        s.spawn(|| {
            cluster.topology.client.enter().expect("entering the client's namespace");
            // Sockets keep the namespace they were made in.
            let sockets: Vec<UdpSocket> =
                (0..32).map(|_| UdpSocket::bind("0.0.0.0:0").expect("a UDP socket")).collect();
            for socket in &sockets {
                socket.set_read_timeout(Some(Duration::from_secs(1))).expect("a timeout");
            }
            let socket = sockets.into_iter().find(|s| ask(s).as_deref() == Some("pod-b")).expect("a flow to pod-b");
            let answers: Vec<Option<String>> = (0..3).map(|_| ask(&socket)).collect();
            (socket, answers)
        })
        .join()
        .expect("the client thread")
    });
    assert!(answers.iter().all(|a| a.as_deref() == Some("pod-b")), "one socket, one flow: {answers:?}");
    cluster.kill(0);
    cluster.manifests.service(&udp("dns"), &[(POD_A, "node-1")]);
    cluster.start_again(0);
    let after: Vec<Option<String>> = (0..5).map(|_| ask(&socket)).collect();
    assert!(
        after.iter().all(|a| a.as_deref() != Some("pod-b")),
        "after the sync, the flow no longer reaches pod-b: {after:?}"
    );
}

// ---- least privilege ----

/// Runs the agent in `ns` under `setpriv` with `privileges` (setpriv's options), waits (bounded)
/// for it to exit, and returns its stderr lines and whether it failed.
fn agent_with(
    ns: &Netns,
    cgroup: &Cgroup,
    bpf_root: &Path,
    manifests: &Manifests,
    privileges: &[&str],
) -> (bool, Vec<String>) {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net={}", ns.path().display())).arg("setpriv").args(privileges).arg("--").arg(AGENT);
    command.arg("--bpf-root").arg(bpf_root).arg("--cgroup-path").arg(cgroup.path());
    command.args(["--manifests", &manifests.arg(), "--hostname-override", "node-1"]);
    let child = command
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the agent under setpriv");
    let mut clients = Clients(vec![child]);
    let deadline = Instant::now() + WAIT;
    while clients.0[0].try_wait().expect("waiting for the agent").is_none() {
        if Instant::now() > deadline {
            drop(clients);
            let _ = proxy_agent::datapath::cleanup(bpf_root);
            panic!("the agent kept running under {privileges:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let child = clients.0.pop().expect("the agent");
    let output = child.wait_with_output().expect("the agent's output");
    let lines = String::from_utf8_lossy(&output.stderr).lines().map(str::to_owned).collect();
    (!output.status.success(), lines)
}

/// Issue 8 item 8: without its capabilities the agent refuses to start, in one line naming
/// what is missing, and touches nothing; pinned maps are readable only by root.
#[test]
fn without_capabilities_the_agent_says_what_is_missing_in_one_line() {
    let ns = Netns::new("preflight").expect("a namespace");
    let cgroup = Cgroup::new("proxy-preflight").expect("a cgroup");
    let manifests = Manifests::with_nodes("proxy-reliability");
    manifests.service(&nodeport("web", 10, 30066).build(), &BOTH);
    let root = PathBuf::from(format!("/sys/fs/bpf/proxy-test-preflight-{}", std::process::id()));
    /// setpriv's options, the names the line must carry, and names it must not.
    struct Case {
        name: &'static str,
        privileges: &'static [&'static str],
        named: &'static [&'static str],
        not_named: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "every capability dropped",
            privileges: &["--bounding-set=-all", "--inh-caps=-all"],
            named: &["CAP_BPF or CAP_SYS_ADMIN", "CAP_NET_ADMIN"],
            not_named: &[],
        },
        Case {
            name: "CAP_NET_ADMIN dropped",
            privileges: &["--bounding-set=-net_admin", "--inh-caps=-all"],
            named: &["CAP_NET_ADMIN"],
            not_named: &["CAP_BPF"],
        },
    ];
    for Case { name: case, privileges, named, not_named } in cases {
        let (failed, lines) = agent_with(&ns, &cgroup, &root, &manifests, privileges);
        assert!(failed, "{case}: the agent exits with an error: {lines:?}");
        assert_eq!(lines.len(), 1, "{case}: one line: {lines:?}");
        let line = &lines[0];
        assert!(line.contains("preflight: missing"), "{case}: {line}");
        for name in named {
            assert!(line.contains(name), "{case}: names {name}: {line}");
        }
        for name in not_named {
            assert!(!line.contains(name), "{case}: does not name {name}: {line}");
        }
        assert!(!root.exists(), "{case}: nothing was pinned");
        assert_eq!(bpftool_cgroup(cgroup.path()), 0, "{case}: nothing attached");
        eprintln!("{case}: {line}");
    }

    // With its capabilities it starts, and what it pins is root's alone.
    let agent_flags = ["--manifests", &manifests.arg(), "--hostname-override", "node-1"];
    let agent = Agent::start_in(Some(&ns), AGENT.as_ref(), cgroup.path(), &agent_flags).expect("the agent");
    let mut pins = Vec::new();
    for entry in std::fs::read_dir(agent.bpf_root()).expect("the pins").flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let mode = entry.metadata().expect("a pin's metadata").permissions().mode();
            pins.push((entry.file_name().to_string_lossy().into_owned(), mode & 0o777));
        }
    }
    assert!(!pins.is_empty());
    for (pin, mode) in &pins {
        assert_eq!(mode & 0o077, 0, "{pin} is root's alone: {mode:o}");
    }
}

/// How many programs `bpftool cgroup show` lists on `cgroup`.
fn bpftool_cgroup(cgroup: &Path) -> usize {
    let out = run("bpftool", &["-j", "cgroup", "show", &cgroup.to_string_lossy()]).expect("bpftool cgroup show");
    serde_json::from_str::<serde_json::Value>(out.trim()).ok().and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0)
}

// ---- clean shutdown and cleanup ----

/// What BPF programs and qdiscs sit on the interfaces of `ns`: TCX programs (asked of the
/// kernel for every interface, from inside the namespace), legacy tc and XDP programs
/// (`bpftool net show`), and any clsact/ingress qdisc.
fn attached_in(ns: &Netns) -> Vec<String> {
    let links = ns.ip(&["-o", "link", "show"]).expect("ip link show");
    let names: Vec<String> =
        links.lines().filter_map(|l| l.split(": ").nth(1)?.split('@').next().map(str::to_owned)).collect();
    let mut found: Vec<String> = thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("entering the namespace");
            let mut found = Vec::new();
            for name in &names {
                for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
                    let programs = SchedClassifier::query_tcx(name, direction).map(|(_, p)| p).unwrap_or_default();
                    found.extend(programs.iter().map(|p| {
                        format!("{} {name} tcx {direction:?}: {}", ns.name(), p.name_as_str().unwrap_or("?"))
                    }));
                }
            }
            found
        })
        .join()
        .expect("the query thread")
    });
    let net = ns.exec("bpftool", &["-j", "net", "show"]).expect("bpftool net show");
    let value: serde_json::Value = serde_json::from_str(net.trim()).expect("bpftool's JSON");
    for table in value.as_array().into_iter().flatten() {
        for (kind, entries) in table.as_object().into_iter().flatten() {
            for entry in entries.as_array().into_iter().flatten() {
                found.push(format!("{} {kind}: {entry}", ns.name()));
            }
        }
    }
    let qdiscs = ns.exec("tc", &["qdisc", "show"]).expect("tc qdisc show");
    found.extend(
        qdiscs.lines().filter(|l| l.contains("clsact") || l.contains("ingress")).map(|l| format!("{}: {l}", ns.name())),
    );
    found
}

/// `count` connections to the ClusterIP from a pod and to both nodePorts from outside must
/// see `want` answers each.
fn answered_everywhere(cluster: &Cluster, what: &str, want: usize) {
    let from_pod = cluster.connects_from_pod(clusterip(10), 50);
    assert_eq!(from_pod.answered(), want, "{what}: ClusterIP from a pod: {from_pod:?}");
    for ip in NODE_IPS {
        let outside = cluster.connects_from_outside(SocketAddrV4::new(ip, 30066), 50);
        assert_eq!(outside.answered(), want, "{what}: NodePort of {ip} from outside: {outside:?}");
    }
}

/// Issue 8 item 7: SIGTERM both agents: traffic keeps flowing on both paths with no agent
/// running; then `--cleanup` leaves no pin, nothing on the cgroups and nothing on any interface
/// of the test's namespaces, and the service addresses stop working (it was our programs).
#[test]
fn sigterm_keeps_traffic_flowing_and_cleanup_leaves_nothing() {
    let mut cluster = Cluster::start(2, &[], |m| m.service(&nodeport("web", 10, 30066).build(), &BOTH));
    for (agent, ip) in cluster.agents.iter().zip(NODE_IPS) {
        agent.wait_for_count(ip, 30066, Some(2), WAIT).expect("programmed");
    }
    // The TC program is on each node's interfaces (eth0 and the pod bridge).
    let deadline = Instant::now() + WAIT;
    while cluster.topology.nodes.iter().any(|n| attached_in(&n.ns).len() < 2) {
        assert!(
            Instant::now() < deadline,
            "TC programs attached: {:?}",
            cluster.topology.nodes.iter().map(|n| attached_in(&n.ns)).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(100));
    }
    for agent in &mut cluster.agents {
        agent.terminate(WAIT).expect("the agent exits on SIGTERM");
        assert!(agent.mentions("shutting down"), "{}", agent.log());
    }
    let roots: Vec<PathBuf> = cluster.agents.iter().map(|a| a.bpf_root().to_owned()).collect();
    answered_everywhere(&cluster, "no agent running", 50);

    for agent in &mut cluster.agents {
        agent.kill();
        agent.cleanup(AGENT.as_ref()).expect("--cleanup");
    }
    for root in &roots {
        assert!(!root.exists(), "{} is gone", root.display());
    }
    for node in &cluster.topology.nodes {
        assert_eq!(bpftool_cgroup(node.cgroup.path()), 0, "nothing on {}'s cgroup", node.name);
    }
    let topology = &cluster.topology;
    let namespaces =
        topology.nodes.iter().flat_map(|n| [&n.ns, &n.client.ns].into_iter().chain(n.pods.iter().map(|p| &p.ns)));
    let left: Vec<String> = namespaces.chain([&topology.client, &topology.net]).flat_map(attached_in).collect();
    assert!(left.is_empty(), "nothing left on any interface: {left:?}");
    answered_everywhere(&cluster, "after --cleanup", 0);
}
