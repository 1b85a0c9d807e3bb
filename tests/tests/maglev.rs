//! Maglev from outside, on the two-node topology of `docs/testing.md`: both agents run with
//! `--lb-algorithm maglev`; the external client reaches an external IP that its route sends
//! to node-1 or to node-2 (as an ECMP router or a cloud load balancer would move a flow). Each
//! connection leaves from a fixed client port, so a set of 5-tuples can be replayed through
//! the other node. Pods answer with their name.
//!
//! The expected backend of each flow is computed here with the agent's pure table builder and
//! the shared flow hash, from the endpoints the test wrote, never from what the flows answered.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    ops::Range,
    time::Duration,
};

use proxy_agent::{
    datapath::writer::MapStore as _,
    maglev::{self, MaglevSettings},
};
use proxy_common::{
    addr,
    conntrack::CtKey,
    maglev::{TABLE_SIZE_INDEX, flow_hash, slot},
    maps,
    proto::TCP,
    service::ServiceKey,
};
use proxy_tests::{
    agent::Agent,
    cluster::{CLIENT_IP, Manifests, NODE_IPS, SEED_PORT, TARGET_PORT, seed_node_port},
    netns::Netns,
    topology::TwoNodes,
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const WAIT: Duration = Duration::from_secs(10);
/// The external IP the client's route sends to one node or the other.
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 1, 10);
/// A small prime table, passed to both agents (the flag is part of what must match).
const TABLE_SIZE: u32 = 1021;
const PODS: [[&str; 3]; 2] = [["pod-a", "pod-b", "pod-c"], ["pod-d", "pod-e", "pod-f"]];

/// Both nodes with an agent each, hashing with Maglev.
struct Cluster {
    agents: Vec<Agent>,
    topology: TwoNodes,
    manifests: Manifests,
}

impl Cluster {
    fn new() -> Self {
        let manifests = Manifests::with_nodes("proxy-maglev");
        let topology = TwoNodes::new([&PODS[0], &PODS[1]], TARGET_PORT, true).expect("building the two nodes");
        let size = TABLE_SIZE.to_string();
        let flags = ["--lb-algorithm", "maglev", "--maglev-table-size", &size];
        let agents =
            topology.nodes.iter().map(|n| manifests.start_agent(AGENT, &n.ns, &n.cgroup, &n.name, &flags)).collect();
        Self { agents, topology, manifests }
    }

    /// Every pod (name, address) but those named in `without`.
    fn pods(&self, without: &[&str]) -> Vec<(String, Ipv4Addr)> {
        let pods = self.topology.nodes.iter().flat_map(|n| n.pods.iter());
        pods.filter(|p| !without.contains(&p.name.as_str())).map(|p| (p.name.clone(), p.ip)).collect()
    }

    /// Writes the service with `pods` as endpoints and waits until both agents hold the table
    /// the builder predicts for them.
    fn serve(&self, pods: &[(String, Ipv4Addr)]) {
        let nodes: Vec<(Ipv4Addr, &str)> = pods
            .iter()
            .map(|(name, ip)| {
                let node = if PODS[0].contains(&name.as_str()) { "node-1" } else { "node-2" };
                (*ip, node)
            })
            .collect();
        let svc = seed_node_port().external_ip(&EXTERNAL_IP.to_string()).build();
        self.manifests.service(&svc, &nodes);
        let want: Vec<Ipv4Addr> = predicted_table(pods).into_iter().map(|name| address_of(pods, &name)).collect();
        for agent in &self.agents {
            wait_for_table(agent, &want);
        }
    }

    /// Sends the client's traffic for the external IP through node `i`.
    fn route_through(&self, i: usize) {
        let via = NODE_IPS[i].to_string();
        self.topology.client.ip(&["route", "replace", &format!("{EXTERNAL_IP}/32"), "via", &via]).expect("a route");
    }
}

fn address_of(pods: &[(String, Ipv4Addr)], name: &str) -> Ipv4Addr {
    pods.iter().find(|(n, _)| n == name).map(|(_, ip)| *ip).expect("a known pod")
}

/// The table the agent's builder makes for `pods` with the agents' settings: pod names by slot.
fn predicted_table(pods: &[(String, Ipv4Addr)]) -> Vec<String> {
    let named: Vec<(usize, Vec<u8>)> = pods
        .iter()
        .enumerate()
        .map(|(i, (_, ip))| (i, maglev::backend_name(addr::from_v4(ip.octets()), TARGET_PORT)))
        .collect();
    let settings = settings();
    maglev::build(&named, settings.table_size, &settings.seed).into_iter().map(|i| pods[i].0.clone()).collect()
}

fn settings() -> MaglevSettings {
    MaglevSettings { table_size: TABLE_SIZE, ..MaglevSettings::default() }
}

/// The pod the table sends the flow from the client's `port` to, by the datapath's flow hash.
fn predicted(table: &[String], port: u16) -> String {
    let key = CtKey {
        src: addr::from_v4(CLIENT_IP.octets()),
        dst: addr::from_v4(EXTERNAL_IP.octets()),
        sport: port,
        dport: SEED_PORT,
        proto: TCP,
        _pad: [0; 3],
    };
    let slot = slot(flow_hash(&key, settings().flow_seed()), TABLE_SIZE);
    table[slot as usize - 1].clone()
}

/// Waits until `agent`'s Maglev table of the external IP's TCP port holds `want` (backend
/// addresses by slot).
fn wait_for_table(agent: &Agent, want: &[Ipv4Addr]) {
    let deadline = std::time::Instant::now() + WAIT;
    let master = ServiceKey::master(addr::from_v4(EXTERNAL_IP.octets()), SEED_PORT, TCP);
    loop {
        // A starting agent may not have pinned its maps yet.
        let held = agent.maps().ok().and_then(|maps| held_table(&maps, &master));
        if held.as_deref() == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent's table never became the predicted one:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The backend addresses, by slot, of the Maglev table of `master`'s backend set.
fn held_table(maps: &proxy_agent::datapath::AyaMaps, master: &ServiceKey) -> Option<Vec<Ipv4Addr>> {
    let backends: BTreeMap<u32, Ipv4Addr> =
        maps.backends().filter_map(|(id, b)| Some((id, addr::to_v4(&b.address)?.into()))).collect();
    let id = maps.services().find(|(key, _)| key == master).map(|(_, value)| value.service_id)?;
    if maps.maglev_entry(id, TABLE_SIZE_INDEX) != Some(TABLE_SIZE) {
        return None;
    }
    (1..=TABLE_SIZE).map(|i| maps.maglev_entry(id, i).and_then(|b| backends.get(&b).copied())).collect()
}

/// An open connection and the greeting it got, or why it failed.
type Opened = Result<(TcpStream, String), String>;

/// Connections from the client's `ports` (one each) to the external IP, opened in the client's
/// namespace; each with the greeting it got, or why it failed.
fn connect(client: &Netns, ports: Range<u16>) -> Vec<(u16, Opened)> {
    std::thread::scope(|s| {
        s.spawn(|| {
            client.enter().expect("entering the client's namespace");
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            ports.map(|port| (port, runtime.block_on(open(port)).map_err(|e| e.to_string()))).collect()
        })
        .join()
        .expect("the client thread does not panic")
    })
}

/// One connection from CLIENT_IP:`port`, its greeting read. SO_LINGER 0: closing resets
/// instead of leaving TIME_WAIT, so the same 5-tuple can be used again at once.
async fn open(port: u16) -> std::io::Result<(TcpStream, String)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((CLIENT_IP, port)))?;
    let target = SocketAddr::from(SocketAddrV4::new(EXTERNAL_IP, SEED_PORT));
    let stream = tokio::time::timeout(Duration::from_secs(2), socket.connect(target)).await??;
    stream.set_zero_linger()?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut greeting = String::new();
    BufReader::new(&stream).read_line(&mut greeting)?;
    Ok((stream, greeting.trim().to_owned()))
}

/// The pod each port's connection reached (connections closed).
fn ask(client: &Netns, ports: Range<u16>) -> BTreeMap<u16, String> {
    connect(client, ports)
        .into_iter()
        .map(|(port, result)| match result {
            Ok((_, pod)) => (port, pod),
            Err(e) => panic!("the connection from port {port} failed: {e}"),
        })
        .collect()
}

/// Issue 16: the same 5-tuples through node-1 then node-2 reach the same backends, each the
/// one the table predicts.
#[test]
fn the_same_flows_reach_the_same_backends_through_either_node() {
    let cluster = Cluster::new();
    let pods = cluster.pods(&[]);
    cluster.serve(&pods);
    let table = predicted_table(&pods);
    let ports = 41_000..41_050;
    cluster.route_through(0);
    let through_1 = ask(&cluster.topology.client, ports.clone());
    cluster.route_through(1);
    let through_2 = ask(&cluster.topology.client, ports.clone());
    assert_eq!(through_1, through_2, "every flow keeps its backend whichever node receives it");
    let want: BTreeMap<u16, String> = ports.map(|p| (p, predicted(&table, p))).collect();
    assert_eq!(through_1, want, "each flow on the backend its table slot names");
    let reached: std::collections::BTreeSet<&String> = through_1.values().collect();
    assert!(reached.len() >= 4, "the flows spread over the pods of both nodes: {reached:?}");
}

/// Issue 16: when a backend leaves, established flows to the others keep theirs (conntrack),
/// and new flows go where the new table says, on both nodes.
#[test]
fn removing_a_backend_keeps_established_flows_and_moves_new_ones_as_the_table_predicts() {
    let cluster = Cluster::new();
    let all = cluster.pods(&[]);
    cluster.serve(&all);
    cluster.route_through(0);
    let held = connect(&cluster.topology.client, 42_000..42_030);
    let held: Vec<(u16, TcpStream, String)> = held
        .into_iter()
        .map(|(port, result)| {
            let (stream, pod) = result.unwrap_or_else(|e| panic!("port {port}: {e}"));
            (port, stream, pod)
        })
        .collect();
    let leaving = "pod-b";
    let others: Vec<_> = held.iter().filter(|(_, _, pod)| pod != leaving).collect();
    assert!(others.len() < held.len() && !others.is_empty(), "some flows on {leaving}, some elsewhere");

    let rest = cluster.pods(&[leaving]);
    cluster.serve(&rest);
    for (port, stream, pod) in others {
        (&*stream).write_all(b"still there?\n").unwrap_or_else(|e| panic!("port {port} ({pod}): {e}"));
        let mut echo = String::new();
        BufReader::new(stream).read_line(&mut echo).unwrap_or_else(|e| panic!("port {port} ({pod}): {e}"));
        assert_eq!(echo, "still there?\n", "port {port} still reaches {pod}");
    }
    drop(held);

    let table = predicted_table(&rest);
    let ports = 43_000..43_040;
    let want: BTreeMap<u16, String> = ports.clone().map(|p| (p, predicted(&table, p))).collect();
    for node in [0, 1] {
        cluster.route_through(node);
        assert_eq!(ask(&cluster.topology.client, ports.clone()), want, "new flows through node-{}", node + 1);
    }
}

/// Issue 16: `inspect services` shows the algorithm per frontend, read from the real pins, and
/// `explain` names the Maglev slot and backend a flow takes, the one it does take.
#[test]
fn inspect_shows_maglev_frontends_and_explain_names_the_slot_the_flow_takes() {
    let cluster = Cluster::new();
    let pods = cluster.pods(&[]);
    cluster.serve(&pods);
    let agent = &cluster.agents[0];
    let services = agent.cli_json(AGENT, &["inspect", "services"]);
    let frontends = services.as_array().expect("a list of frontends");
    let algorithm = |address: &str, port: u64| {
        let f = frontends.iter().find(|f| f["address"] == address && f["port"] == port && f["protocol"] == "TCP");
        f.map(|f| (f["algorithm"].clone(), f["maglev_table_size"].clone())).expect("the frontend is listed")
    };
    let size = serde_json::json!(TABLE_SIZE);
    assert_eq!(algorithm(&EXTERNAL_IP.to_string(), SEED_PORT.into()), ("maglev".into(), size.clone()));
    assert_eq!(algorithm(&NODE_IPS[0].to_string(), 30_066), ("maglev".into(), size));
    assert_eq!(algorithm("10.96.0.10", SEED_PORT.into()), ("random".into(), serde_json::Value::Null), "ClusterIP");

    let port = 44_000;
    let to = format!("{EXTERNAL_IP}:{SEED_PORT}");
    let answer = agent
        .cli_json(AGENT, &["explain", "--from", &CLIENT_IP.to_string(), "--from-port", &port.to_string(), "--to", &to]);
    let paths = answer["paths"].as_array().expect("paths");
    let outside = paths.iter().find(|p| p["verdict"] == "maglev").expect("a Maglev path for traffic from outside");
    let table = predicted_table(&pods);
    let want = predicted(&table, port);
    let slot = outside["maglev_slot"].as_u64().expect("the slot is named") as usize;
    assert_eq!(table[slot - 1], want, "explain's slot holds the predicted pod");
    let want_ip = address_of(&pods, &want);
    let summary = outside["summary"].as_str().unwrap_or_default();
    assert!(summary.contains(&format!("{want_ip}:{TARGET_PORT}")), "{summary}");
    cluster.route_through(0);
    assert_eq!(ask(&cluster.topology.client, port..port + 1)[&port], want, "the flow goes where explain said");
}

/// The id of the map pinned at `path` (`bpftool -j map show pinned`).
fn map_id(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(path)
        .output()
        .expect("running bpftool");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    shown["id"].as_u64().unwrap_or_else(|| panic!("no map pinned at {}", path.display()))
}

/// Pins left by an agent from before Maglev (no `maglev`, `maglev_config`) are adopted as they
/// are: every other map keeps its id, the Maglev maps are created beside them and the first
/// sync writes the tables, which then serve flows from outside.
#[test]
fn pins_from_before_maglev_are_adopted_and_the_tables_written() {
    let mut cluster = Cluster::new();
    let pods = cluster.pods(&[]);
    cluster.serve(&pods);
    let node = &cluster.topology.nodes[0];
    let (root, cgroup) = (cluster.agents[0].bpf_root().to_owned(), node.cgroup.path().to_owned());
    cluster.agents[0].terminate(WAIT).expect("the agent exits on SIGTERM");
    for map in [maps::MAGLEV, maps::MAGLEV_CONFIG] {
        std::fs::remove_file(root.join(map)).expect("unpinning a map an older agent never pinned");
    }
    let others: Vec<&str> =
        maps::ALL.iter().copied().filter(|m| ![maps::MAGLEV, maps::MAGLEV_CONFIG].contains(m)).collect();
    let ids = || -> Vec<u64> { others.iter().map(|m| map_id(&root.join(m))).collect() };
    let before = ids();
    let size = TABLE_SIZE.to_string();
    let flags = cluster.manifests.agent_flags("node-1", &["--lb-algorithm", "maglev", "--maglev-table-size", &size]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    cluster.agents[0].restart(AGENT.as_ref(), &cgroup, &flags).expect("a new agent");
    let want: Vec<Ipv4Addr> = predicted_table(&pods).into_iter().map(|name| address_of(&pods, &name)).collect();
    wait_for_table(&cluster.agents[0], &want);
    assert_eq!(ids(), before, "every other map adopted, not recreated");
    cluster.route_through(0);
    let table = predicted_table(&pods);
    let ports = 45_000..45_020;
    let want: BTreeMap<u16, String> = ports.clone().map(|p| (p, predicted(&table, p))).collect();
    assert_eq!(ask(&cluster.topology.client, ports), want, "the new tables serve");
}
