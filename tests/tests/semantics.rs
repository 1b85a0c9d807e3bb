//! Service semantics on the real datapath: ClientIP affinity on the socket path and the TC path,
//! its timeout and live switching, refusal when there is no endpoint, internalTrafficPolicy
//! Local, the terminating fallback, hairpin and the client pod's own address at the backend.
//!
//! Every test builds its namespaces (the address plan of `docs/testing.md`), runs the real agent inside a
//! node's namespace on a manifest directory the test writes, and makes real connections from
//! pods inside the agent's cgroup or from the external client. Tests are named after the row of
//! `docs/behaviours.md` they prove. Where a test is statistical, its comment gives the chance
//! that a correct datapath fails it; every such bound is below 1e-6.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Service;
use proxy_common::{
    addr, proto,
    service::{SVC_F_AFFINITY, SVC_F_TERMINATING_FALLBACK, ServiceKey, ServiceValue},
};
use proxy_tests::{
    agent::Agent,
    cgroup::Cgroup,
    client::{Tally, probe},
    cluster::{self, CLIENT_IP, Manifests, NODE_IPS, POOL_SIZE, Pool, pool_endpoints, vip},
    fixtures::{ServiceBuilder, SliceBuilder, service, slice},
    netns::{Netns, veth},
    pod::PEER,
    topology::{SingleNode, TwoNodes},
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(5);
const VIP: Ipv4Addr = vip(30);
const PORT: u16 = 6666;
const NODE_PORT: u16 = 30066;
const SVC: &str = "cart";

/// The test's ClusterIP service `cart` at VIP:PORT (unnamed TCP port, target 80).
fn cart() -> ServiceBuilder {
    service(SVC).cluster_ip(&VIP.to_string()).port(PORT.into())
}

/// The same as a NodePort service on NODE_PORT.
fn cart_node_port() -> ServiceBuilder {
    cart().node_port(NODE_PORT.into())
}

/// An empty slice of `cart` on port 80.
fn cart_slice() -> SliceBuilder {
    slice(SVC, "a").port(80)
}

fn target(address: Ipv4Addr, port: u16) -> String {
    format!("{address}:{port}")
}

/// `count` TCP connections from `ns` (inside `cgroup`, if any), one socket each.
fn connect(ns: &Netns, cgroup: Option<&Cgroup>, to: &str, count: usize) -> Tally {
    probe(PROBE.as_ref(), ns, cgroup, &["tcp", to, &count.to_string(), "1000"]).expect("running the probe")
}

/// The one backend that answered every connection of `tally` (fails if a connection failed or
/// two backends answered).
fn sticky(tally: &Tally, count: usize, who: &str) -> String {
    assert_eq!(tally.answered(), count, "{who}: every connection is answered: {tally:?}");
    assert_eq!(tally.answers.len(), 1, "{who}: all {count} connections reach the same backend: {tally:?}");
    tally.answers.keys().next().expect("one answer").clone()
}

/// Five connections that must all be refused, at once: the whole batch takes less than one
/// attempt's timeout (2 s), so not a single one waited for a timeout.
fn assert_refused(ns: &Netns, cgroup: Option<&Cgroup>, to: &str, who: &str) {
    let started = Instant::now();
    let tally = probe(PROBE.as_ref(), ns, cgroup, &["tcp", to, "5", "2000"]).expect("running the probe");
    let took = started.elapsed();
    assert_eq!(tally.errors.get("refused"), Some(&5), "{who}: {to} refuses every connection: {tally:?}");
    assert!(took < Duration::from_secs(2), "{who}: {to} refuses at once, not after a timeout (took {took:?})");
}

/// Waits until the TCP frontend's master entry satisfies `done`.
fn wait_for_master(agent: &Agent, address: Ipv4Addr, port: u16, what: &str, done: impl Fn(&ServiceValue) -> bool) {
    let key = ServiceKey::master(addr::from_ip(address), port, proto::TCP);
    let deadline = Instant::now() + WAIT;
    loop {
        let master = agent.maps().expect("opening the pinned maps").services().find(|(k, _)| *k == key).map(|(_, v)| v);
        if master.as_ref().is_some_and(&done) {
            return;
        }
        assert!(Instant::now() < deadline, "{address}:{port}: {what} after {WAIT:?}: {master:?}\n{}", agent.log());
        thread::sleep(Duration::from_millis(10));
    }
}

/// Builds node-1 with `pods` (name, address) serving on port 80 and starts its agent on
/// `manifests`, inside node-1's namespace.
fn node1(pods: &[(&str, Ipv4Addr)], manifests: &Manifests) -> (SingleNode, Agent) {
    // (The topology pins the bridge's MAC, so pods added later keep the gateway reachable.)
    let topology = SingleNode::new(pods, 80).expect("building node-1");
    let agent = manifests.start_agent(AGENT, &topology.node, &topology.cgroup, "node-1", &[]);
    (topology, agent)
}

/// Address `n` on node-1's pod network.
fn pod_ip(n: u8) -> Ipv4Addr {
    cluster::pod_ip(0, n)
}

/// node-1 with the endpoint pool as `svc`'s endpoints, and the agent once it programmed them all.
fn node1_with_pool(svc: &Service, manifests: &Manifests) -> (SingleNode, Agent, Pool) {
    manifests.put(svc, [&Pool::slice(SVC).build()]);
    let (topology, agent) = node1(&[], manifests);
    let pool = Pool::on(&topology.node).expect("adding the endpoint pool");
    agent.wait_for_count(VIP, PORT, Some(POOL_SIZE.into()), WAIT).unwrap();
    (topology, agent, pool)
}

/// Both nodes with an agent each, inside the node's namespace.
struct Cluster {
    // Declared first: the agents stop before the namespaces go.
    agents: Vec<Agent>,
    topology: TwoNodes,
}

impl Cluster {
    fn new(pods: [&[&str]; 2], manifests: &Manifests) -> Self {
        let topology = TwoNodes::new(pods, 80, true).expect("building the two-node topology");
        let agents =
            topology.nodes.iter().map(|n| manifests.start_agent(AGENT, &n.ns, &n.cgroup, &n.name, &[])).collect();
        Self { agents, topology }
    }

    fn pod_ip(&self, node: usize, pod: usize) -> String {
        self.topology.nodes[node].pods[pod].ip.to_string()
    }

    /// Connections from the client pod of node `node` (0 or 1), inside that node's cgroup.
    fn pod_connects(&self, node: usize, to: &str, count: usize) -> Tally {
        let n = &self.topology.nodes[node];
        connect(&n.client.ns, Some(&n.cgroup), to, count)
    }

    /// Connections from the external client (172.18.0.100).
    fn outside_connects(&self, to: &str, count: usize) -> Tally {
        connect(&self.topology.client, None, to, count)
    }

    /// Waits until every agent programmed `count` backends for its own nodePort frontend.
    fn wait_for_node_ports(&self, count: Option<u16>) {
        for (agent, ip) in self.agents.iter().zip(NODE_IPS) {
            agent.wait_for_count(ip, NODE_PORT, count, WAIT).unwrap();
        }
    }
}

/// `n` more external clients on the node network (172.18.0.101...), a namespace each.
fn more_external_clients(topology: &TwoNodes, n: u8) -> Vec<Netns> {
    (0..n)
        .map(|i| {
            let ns = Netns::new("ext").expect("creating a client namespace");
            let port = format!("ext{i}");
            veth(&topology.net, &port, &ns, "eth0").expect("wiring a client");
            topology.net.ip(&["link", "set", &port, "master", "br0"]).expect("plugging a client into the bridge");
            ns.ip(&["addr", "add", &format!("172.18.0.{}/16", 101 + i), "dev", "eth0"]).expect("addressing a client");
            ns
        })
        .collect()
}

/// e2e row 21: with `sessionAffinity: ClientIP` on a ClusterIP, a client pod reaches the same
/// backend connection after connection; other client pods (other network namespaces, which is
/// what the socket path keys affinity by) pick on their own, and each sticks to its pick.
///
/// Six client pods over 100 endpoints: a correct datapath gives all six the same backend with
/// probability 100^-5 = 1e-10.
#[test]
fn e2e_21_client_ip_affinity_sticks_per_client_pod() {
    let manifests = Manifests::new("proxy-semantics");
    let (mut topology, agent, _pool) = node1_with_pool(&cart().session_affinity(None).build(), &manifests);
    wait_for_master(&agent, VIP, PORT, "ClientIP affinity with the default timeout", |m| {
        m.flags & SVC_F_AFFINITY != 0 && m.affinity_timeout == 10_800
    });
    let to = target(VIP, PORT);
    let first = sticky(&connect(&topology.client.ns, Some(&topology.cgroup), &to, 20), 20, "the client pod");
    assert!(pool_endpoints().contains(&first), "{first} is one of the service's endpoints");

    for i in 0..5 {
        topology.add_pod(&format!("client-{i}"), pod_ip(201 + i), 81).expect("adding a client pod");
    }
    let mut picks = BTreeSet::from([first.clone()]);
    for client in topology.pods.iter().filter(|p| p.name.starts_with("client-")) {
        let pick = sticky(&connect(&client.ns, Some(&topology.cgroup), &to, 5), 5, &client.name);
        assert!(pool_endpoints().contains(&pick), "{}: {pick} is one of the service's endpoints", client.name);
        picks.insert(pick);
    }
    assert!(picks.len() >= 2, "six client pods picked independently, yet all reached {picks:?}");
    let again = sticky(&connect(&topology.client.ns, Some(&topology.cgroup), &to, 5), 5, "the client pod again");
    assert_eq!(again, first, "the other pods' picks did not move the first client");
}

/// e2e row 22, short form: with `timeoutSeconds: 2`, use within the timeout keeps (and
/// refreshes) the client's backend, as kube-proxy's `recent --set` on every connection does;
/// after more than 2 s idle the next connection picks afresh, and sticks to that new pick.
///
/// Stickiness: three batches 1.2 s apart span 2.4 s, more than the timeout, so only a refreshed
/// entry keeps them on one backend. Expiry: four waits of 2.5 s (12.4 s of waiting in all); a
/// correct datapath re-picks the first backend after all four with probability 100^-4 = 1e-8.
#[test]
fn e2e_22_client_ip_affinity_expires_after_its_timeout() {
    let manifests = Manifests::new("proxy-semantics");
    let (topology, agent, _pool) = node1_with_pool(&cart().session_affinity(Some(2)).build(), &manifests);
    wait_for_master(&agent, VIP, PORT, "ClientIP affinity with a 2 s timeout", |m| {
        m.flags & SVC_F_AFFINITY != 0 && m.affinity_timeout == 2
    });
    let to = target(VIP, PORT);
    let client = || connect(&topology.client.ns, Some(&topology.cgroup), &to, 3);

    let first = sticky(&client(), 3, "the first batch");
    for batch in 1..=2 {
        thread::sleep(Duration::from_millis(1200));
        let again = sticky(&client(), 3, "a batch within the timeout");
        assert_eq!(again, first, "batch {batch}, 1.2 s after the last use, keeps the backend");
    }

    let mut picks = vec![first];
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(2500));
        // The first connection of the batch picks afresh; the other two stick to that pick.
        picks.push(sticky(&client(), 3, "a batch after the timeout"));
    }
    let distinct: BTreeSet<&String> = picks.iter().collect();
    assert!(distinct.len() >= 2, "after four expiries the client still reached only {distinct:?}: {picks:?}");
}

/// e2e row 23: switching `sessionAffinity` live through the manifest, ClientIP → None →
/// ClientIP: sticky, then spread over every backend, then sticky again.
///
/// While None, 80 connections over 4 backends miss one with probability < 4·(3/4)^80 = 4e-10.
#[test]
fn e2e_23_switch_session_affinity_live() {
    let manifests = Manifests::new("proxy-semantics");
    let pods: Vec<(String, Ipv4Addr)> = (2..=5).map(|n| (format!("pod-{n}"), pod_ip(n))).collect();
    let refs: Vec<(&str, Ipv4Addr)> = pods.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let ips: Vec<String> = pods.iter().map(|(_, ip)| ip.to_string()).collect();
    let eps = cart_slice().endpoints(ips.iter().map(String::as_str)).build();
    manifests.put(&cart().session_affinity(None).build(), [&eps]);
    let (topology, agent) = node1(&refs, &manifests);
    agent.wait_for_count(VIP, PORT, Some(4), WAIT).unwrap();
    wait_for_master(&agent, VIP, PORT, "affinity on", |m| m.flags & SVC_F_AFFINITY != 0);
    let to = target(VIP, PORT);
    let client = |count| connect(&topology.client.ns, Some(&topology.cgroup), &to, count);
    sticky(&client(20), 20, "ClientIP");

    manifests.put(&cart().no_session_affinity().build(), [&eps]);
    wait_for_master(&agent, VIP, PORT, "affinity off", |m| m.flags & SVC_F_AFFINITY == 0 && m.count == 4);
    let spread = client(80);
    assert_eq!(spread.answered(), 80, "{spread:?}");
    for (name, _) in &pods {
        assert!(spread.from(name) > 0, "with affinity off every backend gets connections: {spread:?}");
    }

    manifests.put(&cart().session_affinity(None).build(), [&eps]);
    wait_for_master(&agent, VIP, PORT, "affinity on again", |m| m.flags & SVC_F_AFFINITY != 0);
    sticky(&client(20), 20, "ClientIP again");
}

/// Issue 5: when the backend a client sticks to leaves the service, the client's next
/// connections go to a fresh pick and stick there, even though another service still uses that
/// endpoint (so the backend itself stays in the `backends` map).
#[test]
fn affinity_moves_on_when_its_backend_leaves_the_service() {
    let manifests = Manifests::new("proxy-semantics");
    let pods: Vec<(String, Ipv4Addr)> = (2..=4).map(|n| (format!("pod-{n}"), pod_ip(n))).collect();
    let refs: Vec<(&str, Ipv4Addr)> = pods.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let all: Vec<String> = pods.iter().map(|(_, ip)| ip.to_string()).collect();
    let other_vip = vip(31);
    let other = service("other").cluster_ip(&other_vip.to_string()).port(PORT.into()).build();
    manifests.put(&other, [&slice("other", "a").port(80).endpoints(all.iter().map(String::as_str)).build()]);
    manifests
        .put(&cart().session_affinity(None).build(), [&cart_slice().endpoints(all.iter().map(String::as_str)).build()]);
    let (topology, mut agent) = node1(&refs, &manifests);
    agent.wait_for_count(VIP, PORT, Some(3), WAIT).unwrap();
    agent.wait_for_count(other_vip, PORT, Some(3), WAIT).unwrap();
    let to = target(VIP, PORT);
    let client = |count| connect(&topology.client.ns, Some(&topology.cgroup), &to, count);
    let first = sticky(&client(10), 10, "before");

    let (_, gone_ip) = pods.iter().find(|(name, _)| *name == first).expect("a pod answered");
    let rest: Vec<String> = all.iter().filter(|ip| **ip != gone_ip.to_string()).cloned().collect();
    let syncs = agent.syncs().len();
    manifests.put(
        &cart().session_affinity(None).build(),
        [&cart_slice().endpoints(rest.iter().map(String::as_str)).build()],
    );
    agent.wait_for_sync(syncs, |s| s.service_writes > 0, WAIT).unwrap();
    agent.wait_for_count(VIP, PORT, Some(2), WAIT).unwrap();
    let after = sticky(&client(20), 20, "after its backend left");
    assert_ne!(after, first, "{first} left the service: the client must not be sent there any more");
    let still = connect(&topology.client.ns, Some(&topology.cgroup), &target(other_vip, PORT), 30);
    assert!(still.from(&first) > 0, "{first} still serves the other service: {still:?}");
}

/// e2e row 24: ClientIP affinity through the nodePort, from outside: the TC path keys affinity
/// by the client's address, so the external client sticks to one backend on each node, and other
/// external clients (other addresses) pick on their own.
///
/// Ten external clients over six backends all land on one with probability 6^-9 = 1e-7.
#[test]
fn e2e_24_client_ip_affinity_via_node_port() {
    let manifests = Manifests::with_nodes("proxy-semantics");
    let cluster = Cluster::new([&["pod-a", "pod-b", "pod-c"], &["pod-d", "pod-e", "pod-f"]], &manifests);
    let eps = (0..2)
        .flat_map(|n| (0..3).map(move |p| (n, p)))
        .fold(cart_slice(), |s, (n, p)| s.endpoint_on(&cluster.pod_ip(n, p), &format!("node-{}", n + 1)))
        .build();
    manifests.put(&cart_node_port().session_affinity(None).build(), [&eps]);
    cluster.wait_for_node_ports(Some(6));
    for (agent, ip) in cluster.agents.iter().zip(NODE_IPS) {
        wait_for_master(agent, ip, NODE_PORT, "affinity on the nodePort", |m| m.flags & SVC_F_AFFINITY != 0);
    }
    let node1 = target(NODE_IPS[0], NODE_PORT);
    let first = sticky(&cluster.outside_connects(&node1, 20), 20, &format!("{CLIENT_IP} → node-1"));
    // node-2's agent keeps its own affinity map, as each node's kube-proxy does.
    sticky(&cluster.outside_connects(&target(NODE_IPS[1], NODE_PORT), 20), 20, &format!("{CLIENT_IP} → node-2"));

    let clients = more_external_clients(&cluster.topology, 9);
    let mut picks = BTreeSet::from([first.clone()]);
    for (i, client) in clients.iter().enumerate() {
        picks.insert(sticky(&connect(client, None, &node1, 5), 5, &format!("client 172.18.0.{}", 101 + i)));
    }
    assert!(picks.len() >= 2, "ten external clients picked independently, yet all reached {picks:?}");
    let again = sticky(&cluster.outside_connects(&node1, 5), 5, &format!("{CLIENT_IP} → node-1 again"));
    assert_eq!(again, first, "the other clients' picks did not move {CLIENT_IP}");
}

/// e2e row 29: a service port without endpoints refuses connections at once (kube-proxy's
/// REJECT), not by timing out: from a pod to the ClusterIP and to the nodePorts (the socket
/// program sets ECONNREFUSED), and from outside to every node's nodePort (the node's own stack
/// answers with a reset). Once an endpoint appears, the same addresses answer.
#[test]
fn e2e_29_no_endpoints_refuses_at_once() {
    let manifests = Manifests::with_nodes("proxy-semantics");
    let cluster = Cluster::new([&["pod-a"], &[]], &manifests);
    manifests.put(&cart_node_port().build(), [&cart_slice().build()]);
    cluster.agents[0].wait_for_count(VIP, PORT, Some(0), WAIT).unwrap();
    cluster.wait_for_node_ports(Some(0));
    let node1 = &cluster.topology.nodes[0];
    let frontends = [target(VIP, PORT), target(NODE_IPS[0], NODE_PORT), target(NODE_IPS[1], NODE_PORT)];
    for to in &frontends {
        assert_refused(&node1.client.ns, Some(&node1.cgroup), to, "a pod on node-1");
    }
    for to in &frontends[1..] {
        assert_refused(&cluster.topology.client, None, to, "the external client");
    }

    manifests.put(&cart_node_port().build(), [&cart_slice().endpoint_on(&cluster.pod_ip(0, 0), "node-1").build()]);
    cluster.agents[0].wait_for_count(VIP, PORT, Some(1), WAIT).unwrap();
    cluster.wait_for_node_ports(Some(1));
    for to in &frontends {
        assert_eq!(cluster.pod_connects(0, to, 5).from("pod-a"), 5, "a pod on node-1 reaches {to} now");
    }
    for to in &frontends[1..] {
        assert_eq!(cluster.outside_connects(to, 5).from("pod-a"), 5, "the external client reaches {to} now");
    }
}

/// e2e row 29 under `externalTrafficPolicy: Local`: a service with no endpoint anywhere is
/// rejected from outside too. kube-proxy only drops (`"has no local endpoints"`) when the
/// service has endpoints elsewhere; with none at all it REJECTs internal and external traffic
/// alike (`"has no endpoints"`). A node that merely lacks a local endpoint drops (e2e row 34,
/// nodeport.rs).
#[test]
fn e2e_29_no_endpoints_refuses_external_traffic_policy_local_too() {
    let manifests = Manifests::with_nodes("proxy-semantics");
    let cluster = Cluster::new([&["pod-a"], &[]], &manifests);
    manifests.put(&cart_node_port().external_traffic_policy("Local").build(), [&cart_slice().build()]);
    cluster.wait_for_node_ports(Some(0));
    let node1 = &cluster.topology.nodes[0];
    assert_refused(&node1.client.ns, Some(&node1.cgroup), &target(VIP, PORT), "a pod on node-1");
    for ip in NODE_IPS {
        assert_refused(&cluster.topology.client, None, &target(ip, NODE_PORT), "the external client");
    }
}

/// e2e row 31: `internalTrafficPolicy: Local`: a client pod reaches only the endpoints on its
/// own node. With no endpoint on its node, kube-proxy drops (the client times out); this
/// datapath refuses the connection at once instead, as for a service without endpoints, which
/// tells the client the same thing sooner. Asserted as such.
///
/// 100 connections over node-1's two endpoints miss one with probability 2^-99.
#[test]
fn e2e_31_internal_traffic_policy_local() {
    let manifests = Manifests::with_nodes("proxy-semantics");
    let cluster = Cluster::new([&["pod-a", "pod-b"], &["pod-c"]], &manifests);
    let all = cart_slice()
        .endpoint_on(&cluster.pod_ip(0, 0), "node-1")
        .endpoint_on(&cluster.pod_ip(0, 1), "node-1")
        .endpoint_on(&cluster.pod_ip(1, 0), "node-2")
        .build();
    let local = || cart().internal_traffic_policy("Local").build();
    manifests.put(&local(), [&all]);
    cluster.agents[0].wait_for_count(VIP, PORT, Some(2), WAIT).unwrap();
    cluster.agents[1].wait_for_count(VIP, PORT, Some(1), WAIT).unwrap();
    let to = target(VIP, PORT);

    let node1 = cluster.pod_connects(0, &to, 100);
    assert_eq!(node1.answered(), 100, "{node1:?}");
    assert!(node1.from("pod-a") > 0 && node1.from("pod-b") > 0, "both of node-1's endpoints serve: {node1:?}");
    assert_eq!(node1.from("pod-c"), 0, "node-2's endpoint is not used from node-1: {node1:?}");
    let node2 = cluster.pod_connects(1, &to, 20);
    assert_eq!(node2.from("pod-c"), 20, "node-2's client reaches only node-2's endpoint: {node2:?}");

    let remote_only = cart_slice().endpoint_on(&cluster.pod_ip(1, 0), "node-2").build();
    manifests.put(&local(), [&remote_only]);
    cluster.agents[0].wait_for_count(VIP, PORT, Some(0), WAIT).unwrap();
    let n1 = &cluster.topology.nodes[0];
    assert_refused(&n1.client.ns, Some(&n1.cgroup), &to, "node-1 without a local endpoint");
    assert_eq!(cluster.pod_connects(1, &to, 10).from("pod-c"), 10, "node-2 still reaches its endpoint");

    // The policy, not the endpoint, was the reason: Cluster sends node-1's client to node-2.
    manifests.put(&cart().internal_traffic_policy("Cluster").build(), [&remote_only]);
    cluster.agents[0].wait_for_count(VIP, PORT, Some(1), WAIT).unwrap();
    assert_eq!(cluster.pod_connects(0, &to, 10).from("pod-c"), 10, "internalTrafficPolicy Cluster reaches node-2");
}

/// e2e row 31 with ClientIP affinity: a remembered backend must still be one the policy allows.
/// kube-proxy's local chain (`KUBE-SVL-*`) only checks the `recent` lists of local endpoints,
/// so a client that went to node-2's endpoint through the nodePort (cluster-wide under
/// `externalTrafficPolicy: Cluster`) still gets a local endpoint through the ClusterIP under
/// `internalTrafficPolicy: Local`.
///
/// Deterministic: while node-1 has no endpoint, the nodePort can only pick node-2's; then
/// node-1 gets one, and the ClusterIP may only use that one.
#[test]
fn e2e_31_affinity_does_not_override_internal_traffic_policy_local() {
    let manifests = Manifests::with_nodes("proxy-semantics");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], &manifests);
    let svc = cart_node_port().internal_traffic_policy("Local").session_affinity(None).build();
    let remote = |s: SliceBuilder| s.endpoint_on(&cluster.pod_ip(1, 0), "node-2");
    manifests.put(&svc, [&remote(cart_slice()).build()]);
    let agent = &cluster.agents[0];
    agent.wait_for_count(NODE_IPS[0], NODE_PORT, Some(1), WAIT).unwrap();
    agent.wait_for_count(VIP, PORT, Some(0), WAIT).unwrap();
    let node_port = target(NODE_IPS[0], NODE_PORT);
    // A pod on node-1 uses its node's nodePort (socket path, the cluster-wide set): node-2's pod.
    assert_eq!(sticky(&cluster.pod_connects(0, &node_port, 5), 5, "via the nodePort"), "pod-b");

    manifests.put(&svc, [&remote(cart_slice().endpoint_on(&cluster.pod_ip(0, 0), "node-1")).build()]);
    agent.wait_for_count(VIP, PORT, Some(1), WAIT).unwrap();
    agent.wait_for_count(NODE_IPS[0], NODE_PORT, Some(2), WAIT).unwrap();
    let via_cluster_ip = cluster.pod_connects(0, &target(VIP, PORT), 10);
    assert_eq!(
        via_cluster_ip.from("pod-a"),
        10,
        "internalTrafficPolicy Local: the ClusterIP only reaches node-1's endpoint, whatever the client used \
         before through the nodePort: {via_cluster_ip:?}"
    );
}

/// e2e rows 37 and 39: the terminating fallback under the Local policies is per node: node-1,
/// whose only endpoint is terminating (and serving), uses it, from its pods (iTP Local) and
/// from outside through its nodePort (eTP Local), rather than node-2's ready endpoint; node-2
/// uses its ready one.
#[test]
fn e2e_37_39_local_terminating_fallback() {
    let manifests = Manifests::with_nodes("proxy-semantics");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], &manifests);
    let svc = cart_node_port().internal_traffic_policy("Local").external_traffic_policy("Local").build();
    let eps = cart_slice()
        .endpoint_with(&cluster.pod_ip(0, 0), "node-1", false, true, true)
        .endpoint_on(&cluster.pod_ip(1, 0), "node-2")
        .build();
    manifests.put(&svc, [&eps]);
    cluster.wait_for_node_ports(Some(1));
    for agent in &cluster.agents {
        agent.wait_for_count(VIP, PORT, Some(1), WAIT).unwrap();
    }
    for (node, pod) in [(0, "pod-a"), (1, "pod-b")] {
        let name = &cluster.topology.nodes[node].name;
        assert_eq!(cluster.pod_connects(node, &target(VIP, PORT), 20).from(pod), 20, "{name}'s pod → ClusterIP");
        let to = target(NODE_IPS[node], NODE_PORT);
        assert_eq!(cluster.outside_connects(&to, 20).from(pod), 20, "outside → {name}'s nodePort");
    }
}

/// e2e row 36 (and row 20): when no endpoint is ready, the ones that are serving and terminating
/// still get connections (graceful termination); one that is terminating and not serving is
/// never used; as soon as an endpoint is ready, only ready endpoints are used.
///
/// 60 connections over the two terminating endpoints miss one with probability 2^-59.
#[test]
fn e2e_36_terminating_endpoints_serve_when_none_is_ready() {
    let manifests = Manifests::new("proxy-semantics");
    let pods: Vec<(String, Ipv4Addr)> = (2..=5).map(|n| (format!("pod-{n}"), pod_ip(n))).collect();
    let refs: Vec<(&str, Ipv4Addr)> = pods.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let draining = |s: SliceBuilder| {
        s.endpoint_with(&pod_ip(2).to_string(), "node-1", false, true, true)
            .endpoint_with(&pod_ip(3).to_string(), "node-1", false, true, true)
            .endpoint_with(&pod_ip(4).to_string(), "node-1", false, false, true)
    };
    manifests.put(&cart().build(), [&draining(cart_slice()).build()]);
    let (topology, agent) = node1(&refs, &manifests);
    agent.wait_for_count(VIP, PORT, Some(2), WAIT).unwrap();
    wait_for_master(&agent, VIP, PORT, "the terminating fallback", |m| m.flags & SVC_F_TERMINATING_FALLBACK != 0);
    let to = target(VIP, PORT);
    let client = |count| connect(&topology.client.ns, Some(&topology.cgroup), &to, count);

    let fallback = client(60);
    assert_eq!(fallback.answered(), 60, "serving terminating endpoints serve: {fallback:?}");
    assert!(fallback.from("pod-2") > 0 && fallback.from("pod-3") > 0, "both serve: {fallback:?}");
    assert_eq!(fallback.from("pod-4"), 0, "a terminating endpoint that is not serving is never used");

    manifests.put(&cart().build(), [&draining(cart_slice()).endpoint(&pod_ip(5).to_string()).build()]);
    wait_for_master(&agent, VIP, PORT, "the ready endpoint alone", |m| {
        m.count == 1 && m.flags & SVC_F_TERMINATING_FALLBACK == 0
    });
    assert_eq!(client(30).from("pod-5"), 30, "a ready endpoint takes all new connections");
}

/// e2e rows 38 and 20 across nodes: the terminating fallback through both nodes' nodePorts from
/// outside and through the ClusterIP from both nodes' pods; then, with only a terminating
/// endpoint that is not serving left, every one of those refuses.
#[test]
fn e2e_38_terminating_fallback_via_node_ports_and_e2e_20_not_serving_is_refused() {
    let manifests = Manifests::with_nodes("proxy-semantics");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], &manifests);
    let serving = |s: SliceBuilder| s.endpoint_with(&cluster.pod_ip(0, 0), "node-1", false, true, true);
    let not_serving = |s: SliceBuilder| s.endpoint_with(&cluster.pod_ip(1, 0), "node-2", false, false, true);
    manifests.put(&cart_node_port().build(), [&not_serving(serving(cart_slice())).build()]);
    cluster.wait_for_node_ports(Some(1));
    for agent in &cluster.agents {
        agent.wait_for_count(VIP, PORT, Some(1), WAIT).unwrap();
    }
    let node_ports = [target(NODE_IPS[0], NODE_PORT), target(NODE_IPS[1], NODE_PORT)];
    for to in &node_ports {
        assert_eq!(cluster.outside_connects(to, 20).from("pod-a"), 20, "from outside via {to}");
    }
    for (node, name) in ["node-1", "node-2"].into_iter().enumerate() {
        let tally = cluster.pod_connects(node, &target(VIP, PORT), 20);
        assert_eq!(tally.from("pod-a"), 20, "from {name}'s pod: {tally:?}");
    }

    manifests.put(&cart_node_port().build(), [&not_serving(cart_slice()).build()]);
    cluster.wait_for_node_ports(Some(0));
    for agent in &cluster.agents {
        agent.wait_for_count(VIP, PORT, Some(0), WAIT).unwrap();
    }
    for to in &node_ports {
        assert_refused(&cluster.topology.client, None, to, "the external client");
    }
    for node in &cluster.topology.nodes {
        assert_refused(&node.client.ns, Some(&node.cgroup), &target(VIP, PORT), &format!("{}'s pod", node.name));
    }
}

/// e2e row 5: a pod reaching its own service's ClusterIP, when picked itself, gets the answer
/// from itself. The socket path connects it straight to its own address, so (unlike kube-proxy,
/// which masquerades hairpin traffic) it even sees its own address as the peer.
///
/// 60 connections over two endpoints miss the pod itself with probability 2^-60.
#[test]
fn e2e_05_hairpin_to_itself_through_its_service() {
    let manifests = Manifests::new("proxy-semantics");
    let (a, b) = (format!("pod-2 {PEER}"), format!("pod-3 {PEER}"));
    let both = cart_slice().endpoints([pod_ip(2).to_string().as_str(), &pod_ip(3).to_string()]).build();
    manifests.put(&cart().build(), [&both]);
    let alone_vip = vip(32);
    let alone = service("alone").cluster_ip(&alone_vip.to_string()).port(PORT.into()).build();
    manifests.put(&alone, [&slice("alone", "a").port(80).endpoint(&pod_ip(2).to_string()).build()]);
    let (topology, agent) = node1(&[(a.as_str(), pod_ip(2)), (b.as_str(), pod_ip(3))], &manifests);
    agent.wait_for_count(VIP, PORT, Some(2), WAIT).unwrap();
    agent.wait_for_count(alone_vip, PORT, Some(1), WAIT).unwrap();
    let backend = &topology.pods[0];
    let itself = format!("pod-2 {}", pod_ip(2));

    let only = connect(&backend.ns, Some(&topology.cgroup), &target(alone_vip, PORT), 10);
    assert_eq!(only.from(&itself), 10, "the service's only endpoint reaches itself: {only:?}");
    let shared = connect(&backend.ns, Some(&topology.cgroup), &target(VIP, PORT), 60);
    assert_eq!(shared.answered(), 60, "{shared:?}");
    assert!(shared.from(&itself) > 0, "picked itself, the pod answers itself: {shared:?}");
    assert_eq!(shared.from(&itself) + shared.from(&format!("pod-3 {}", pod_ip(2))), 60, "{shared:?}");
}

/// e2e row 4: no SNAT for pod → ClusterIP: the backend sees the client pod's own address, on
/// the same node and across nodes, from a client pod on either node.
///
/// 60 connections over two endpoints miss one with probability 2^-59.
#[test]
fn e2e_04_backends_see_the_client_pod_address() {
    let manifests = Manifests::with_nodes("proxy-semantics");
    let (a, b) = (format!("pod-a {PEER}"), format!("pod-b {PEER}"));
    let cluster = Cluster::new([&[a.as_str()], &[b.as_str()]], &manifests);
    let eps =
        cart_slice().endpoint_on(&cluster.pod_ip(0, 0), "node-1").endpoint_on(&cluster.pod_ip(1, 0), "node-2").build();
    manifests.put(&cart().build(), [&eps]);
    for agent in &cluster.agents {
        agent.wait_for_count(VIP, PORT, Some(2), WAIT).unwrap();
    }
    for (i, node) in cluster.topology.nodes.iter().enumerate() {
        let tally = cluster.pod_connects(i, &target(VIP, PORT), 60);
        let client = node.client.ip;
        let want: BTreeSet<String> = [format!("pod-a {client}"), format!("pod-b {client}")].into();
        let got: BTreeSet<String> = tally.answers.keys().cloned().collect();
        assert_eq!(got, want, "from {}'s pod: both backends answer and see {client}: {tally:?}", node.name);
        assert_eq!(tally.answered(), 60, "{tally:?}");
    }
}
