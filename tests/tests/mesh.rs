//! `--bpf-lb-sock-hostns-only` (issue 17: service meshes) on the real kernel. Every ClusterIP
//! behaviour runs in both modes, `NAME::<family>::socket` (the default: the socket programs
//! translate the pod's `connect()`) and `NAME::<family>::mesh` (the flag: the pod's packets
//! leave it for the ClusterIP, and TC on the node's pod-facing interfaces translates them),
//! with the same expectations; what differs between the modes is asserted where it shows:
//! whether the node saw the pod's packets addressed to the ClusterIP (a flow in the TC path's
//! conntrack, opened from the pod's own packet), and who a pod reaching itself sees.
//!
//! node-1 (SingleNode: pods on a bridge, veths into the node's namespace) knows its Node object,
//! so the agent finds the pod-facing interfaces from the node's podCIDRs, and has a node
//! address to masquerade hairpin traffic to. The client pod runs in the agent's cgroup in both
//! modes: in mesh mode the socket programs see its connections and leave them alone.

use std::net::{IpAddr, Ipv4Addr};

use proxy_common::addr;
use proxy_tests::{
    agent::Agent,
    client::{Tally, probe},
    cluster::{self, Family, Manifests, SEED, SEED_PORT as PORT, TARGET_PORT},
    fixtures::{service, slice},
    netns::Netns,
    pod::{PEER, PodServer},
    topology::{SingleNode, TwoNodes},
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const FLAG: &str = "--bpf-lb-sock-hostns-only";

/// Who translates a pod's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The socket programs, at `connect()` (no flag).
    Socket,
    /// TC on the node, per packet (`--bpf-lb-sock-hostns-only`).
    Mesh,
}

/// One test per family and mode: `NAME::ipv4::socket`, `NAME::ipv4::mesh`, `NAME::ipv6::...`.
macro_rules! per_mode {
    ($(#[$doc:meta])* fn $name:ident($family:ident: Family, $mode:ident: Mode) $body:block) => {
        $(#[$doc])*
        mod $name {
            #[allow(unused_imports, reason = "the body uses what the suite imports")]
            use super::*;

            fn case($family: Family, $mode: Mode) $body

            mod ipv4 {
                #[test]
                fn socket() {
                    super::case(super::Family::V4, super::Mode::Socket);
                }

                #[test]
                fn mesh() {
                    super::case(super::Family::V4, super::Mode::Mesh);
                }
            }

            mod ipv6 {
                #[test]
                fn socket() {
                    super::case(super::Family::V6, super::Mode::Socket);
                }

                #[test]
                fn mesh() {
                    super::case(super::Family::V6, super::Mode::Mesh);
                }
            }
        }
    };
}

/// node-1 with pods `pod-<n>` (each answering its name and the client address it sees) and the
/// agent in `mode` on `manifests` (which hold the Nodes).
fn setup(pods: &[u8], manifests: &Manifests, mode: Mode) -> (SingleNode, Agent) {
    let names: Vec<(String, Ipv4Addr)> =
        pods.iter().map(|n| (format!("pod-{n} {PEER}"), cluster::pod_ip(0, *n))).collect();
    let refs: Vec<(&str, Ipv4Addr)> = names.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let topology = SingleNode::new(&refs, TARGET_PORT).expect("building the namespaces");
    let flags: &[&str] = match mode {
        Mode::Socket => &[],
        Mode::Mesh => &[FLAG],
    };
    let agent = manifests.start_agent(AGENT, &topology.node, &topology.cgroup, "node-1", flags);
    (topology, agent)
}

/// The seed service's ClusterIP in `family`.
fn vip(family: Family) -> IpAddr {
    family.vip(cluster::SEED_VIP.octets()[3])
}

/// Pod `n`'s address in `family`.
fn pod(family: Family, n: u8) -> IpAddr {
    family.pod_ip(0, n)
}

/// The client pod's address in `family`.
fn client(family: Family) -> IpAddr {
    match family {
        Family::V4 => cluster::client_pod_ip(0).into(),
        Family::V6 => cluster::pod_twin6(cluster::client_pod_ip(0)).into(),
    }
}

/// Writes the seed service (TCP and UDP on [`PORT`]) in `family` with `configure` applied and
/// endpoints `pods` on (pod number, node name).
fn put_seed(
    manifests: &Manifests,
    family: Family,
    pods: &[(u8, &str)],
    configure: impl FnOnce(proxy_tests::fixtures::ServiceBuilder) -> proxy_tests::fixtures::ServiceBuilder,
) {
    let svc = service(SEED).cluster_ips(&[vip(family)]).named_port("tcp", PORT.into(), "TCP").named_port(
        "udp",
        PORT.into(),
        "UDP",
    );
    let mut eps = slice(SEED, &family.name().to_lowercase())
        .address_type(family.name())
        .named_port("tcp", TARGET_PORT.into(), "TCP")
        .named_port("udp", TARGET_PORT.into(), "UDP");
    for (n, node) in pods {
        eps = eps.endpoint_on(&pod(family, *n).to_string(), node);
    }
    manifests.put(&configure(svc).build(), &[eps.build()]);
}

/// `probe <how> <vip>:<port> <count>` from `ns`, inside the agent's cgroup.
fn run(topology: &SingleNode, ns: &Netns, how: &str, family: Family, count: usize) -> Tally {
    let target = std::net::SocketAddr::new(vip(family), PORT).to_string();
    probe(PROBE.as_ref(), ns, Some(&topology.cgroup), &[how, &target, &count.to_string(), "1000"])
        .expect("running the probe")
}

/// The TC path's conntrack entries of flows the node saw leave `from` (anyone: `None`) for
/// the ClusterIP.
fn flows_to_vip(agent: &Agent, family: Family, from: Option<IpAddr>) -> usize {
    let snapshot = proxy_agent::inspect::pins::read(agent.bpf_root()).expect("reading the pinned maps");
    let (from, to) = (from.map(addr::from_ip), addr::from_ip(vip(family)));
    let entries = snapshot.conntrack.expect("the conntrack map is pinned");
    entries.iter().filter(|(k, _)| from.is_none_or(|f| k.src == f) && k.dst == to && k.dport == PORT).count()
}

/// Asserts where the pod's traffic was translated: in mesh mode the node saw `connections`
/// flows from `from` to the ClusterIP (the pod's packets carried it on the pod's own wire);
/// with the socket path, none (they carried the backend's address already).
fn assert_translated_where(mode: Mode, agent: &Agent, family: Family, from: IpAddr, connections: usize) {
    let flows = flows_to_vip(agent, family, Some(from));
    match mode {
        Mode::Mesh => assert_eq!(flows, connections, "each connection left the pod for the ClusterIP"),
        Mode::Socket => assert_eq!(flows, 0, "connect() was rewritten in the pod: no packet carried the ClusterIP"),
    }
}

/// Chi-square critical value at p = 1e-6 for 1 degree of freedom.
const CHI2_CRITICAL_1E6: f64 = 23.928;

per_mode! {
    /// e2e row 1's core: connections from a pod to a ClusterIP spread uniformly over two
    /// backends, which see the pod's own address (no SNAT, as kube-proxy).
    fn uniform_pick_without_snat(family: Family, mode: Mode) {
        const CONNECTIONS: usize = 300;
        let manifests = Manifests::with_nodes("proxy-mesh");
        put_seed(&manifests, family, &[(2, "node-1"), (3, "node-1")], |s| s);
        let (topology, agent) = setup(&[2, 3], &manifests, mode);
        agent.wait_for_count(vip(family), PORT, Some(2), WAIT).unwrap();
        let tally = run(&topology, &topology.client.ns, "tcp", family, CONNECTIONS);
        let seen = client(family);
        let counts = [2, 3].map(|n| tally.from(&format!("pod-{n} {seen}")));
        assert_eq!(counts.iter().sum::<usize>(), CONNECTIONS, "every connection answered, unSNATed: {tally:?}");
        let expected = CONNECTIONS as f64 / 2.0;
        let chi2: f64 = counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum();
        assert!(chi2 < CHI2_CRITICAL_1E6, "spread {counts:?} is not uniform (chi2 {chi2:.1})");
        assert_translated_where(mode, &agent, family, seen, CONNECTIONS);
    }
}

per_mode! {
    /// e2e row 21: under ClientIP affinity every connection of a pod goes to one backend.
    fn client_ip_affinity(family: Family, mode: Mode) {
        let manifests = Manifests::with_nodes("proxy-mesh");
        put_seed(&manifests, family, &[(2, "node-1"), (3, "node-1")], |s| s.session_affinity(None));
        let (topology, agent) = setup(&[2, 3], &manifests, mode);
        agent.wait_for_count(vip(family), PORT, Some(2), WAIT).unwrap();
        let tally = run(&topology, &topology.client.ns, "tcp", family, 40);
        assert_eq!(tally.answered(), 40, "{tally:?}");
        assert_eq!(tally.answers.len(), 1, "one backend for all 40 connections: {tally:?}");
        assert_translated_where(mode, &agent, family, client(family), 40);
    }
}

per_mode! {
    /// e2e row 29: a service without endpoints is REJECTed: TCP connections and connected UDP
    /// sockets are refused at once (in mesh mode by an ICMP port unreachable from the node).
    fn no_endpoints_refused(family: Family, mode: Mode) {
        let manifests = Manifests::with_nodes("proxy-mesh");
        put_seed(&manifests, family, &[], |s| s);
        let (topology, agent) = setup(&[2], &manifests, mode);
        agent.wait_for_count(vip(family), PORT, Some(0), WAIT).unwrap();
        for how in ["tcp", "udp-connected"] {
            let tally = run(&topology, &topology.client.ns, how, family, 5);
            assert_eq!(tally.errors.get("refused"), Some(&5), "{how}: every attempt refused: {tally:?}");
        }
    }
}

per_mode! {
    /// e2e rows 47 and 6's UDP: datagrams from a pod reach both backends, and the replies come
    /// from the ClusterIP.
    fn udp_replies_from_the_cluster_ip(family: Family, mode: Mode) {
        let manifests = Manifests::with_nodes("proxy-mesh");
        put_seed(&manifests, family, &[(2, "node-1"), (3, "node-1")], |s| s);
        let (topology, agent) = setup(&[2, 3], &manifests, mode);
        agent.wait_for_count(vip(family), PORT, Some(2), WAIT).unwrap();
        let tally = run(&topology, &topology.client.ns, "udp-peer", family, 40);
        let from = std::net::SocketAddr::new(vip(family), PORT);
        let seen = client(family);
        for n in [2, 3] {
            let answer = format!("pod-{n} {seen}@{from}");
            assert!(tally.from(&answer) > 0, "{answer} among the answers: {tally:?}");
        }
        assert_eq!(tally.answered(), 40, "every datagram answered from the ClusterIP: {tally:?}");
    }
}

per_mode! {
    /// e2e rows 31 and 32: under `internalTrafficPolicy: Local` a pod's connections go only to
    /// this node's endpoints, never to the one the slice puts on node-2.
    fn internal_traffic_policy_local(family: Family, mode: Mode) {
        let manifests = Manifests::with_nodes("proxy-mesh");
        put_seed(&manifests, family, &[(2, "node-1"), (3, "node-2")], |s| s.internal_traffic_policy("Local"));
        let (topology, agent) = setup(&[2, 3], &manifests, mode);
        agent.wait_for_count(vip(family), PORT, Some(1), WAIT).unwrap();
        let tally = run(&topology, &topology.client.ns, "tcp", family, 40);
        let local = format!("pod-2 {}", client(family));
        assert_eq!(tally.from(&local), 40, "only node-1's endpoint answers: {tally:?}");
    }
}

per_mode! {
    /// Hairpin: a pod reaching itself through the ClusterIP is answered. With the socket path
    /// its connect() goes to its own address; in mesh mode the node masquerades it, as
    /// kube-proxy does (the pod would drop a packet from its own address), so the pod sees the
    /// node's address.
    fn hairpin(family: Family, mode: Mode) {
        let manifests = Manifests::with_nodes("proxy-mesh");
        put_seed(&manifests, family, &[(2, "node-1")], |s| s);
        let (topology, agent) = setup(&[2], &manifests, mode);
        agent.wait_for_count(vip(family), PORT, Some(1), WAIT).unwrap();
        let tally = run(&topology, &topology.pods[0].ns, "tcp", family, 20);
        let seen = match mode {
            Mode::Socket => pod(family, 2),
            Mode::Mesh => family.node_ip(0),
        };
        assert_eq!(tally.from(&format!("pod-2 {seen}")), 20, "{tally:?}");
        assert_translated_where(mode, &agent, family, pod(family, 2), 20);
    }
}

per_mode! {
    /// e2e row 82's same-node part: `trafficDistribution: PreferSameNode` with every
    /// endpoint hinted for its node (as the EndpointSlice controller writes it): a pod's
    /// connections go only to the endpoint hinted for node-1, never to node-2's.
    fn topology_hints_same_node(family: Family, mode: Mode) {
        let manifests = Manifests::zoned("proxy-mesh", &["zone-a", "zone-b"]);
        let svc = service(SEED)
            .cluster_ips(&[vip(family)])
            .named_port("tcp", PORT.into(), "TCP")
            .traffic_distribution("PreferSameNode");
        let eps = slice(SEED, &family.name().to_lowercase())
            .address_type(family.name())
            .named_port("tcp", TARGET_PORT.into(), "TCP")
            .endpoint_on(&pod(family, 2).to_string(), "node-1")
            .for_zones(&["zone-a"])
            .for_nodes(&["node-1"])
            .endpoint_on(&pod(family, 3).to_string(), "node-2")
            .for_zones(&["zone-b"])
            .for_nodes(&["node-2"]);
        manifests.put(&svc.build(), &[eps.build()]);
        let (topology, agent) = setup(&[2, 3], &manifests, mode);
        agent.wait_for_count(vip(family), PORT, Some(1), WAIT).unwrap();
        let tally = run(&topology, &topology.client.ns, "tcp", family, 40);
        let hinted = format!("pod-2 {}", client(family));
        assert_eq!(tally.from(&hinted), 40, "only the endpoint hinted for node-1 answers: {tally:?}");
    }
}

per_mode! {
    /// e2e row 33's backend side: a hostNetwork endpoint (a server in node-1's own namespace, at
    /// its pod-bridge address) serves a pod's connections to the ClusterIP. In mesh mode the
    /// node delivers the DNATed packets locally and its replies, which leave through the stack
    /// towards the pod, are translated back on their way out.
    fn host_network_backend(family: Family, mode: Mode) {
        let manifests = Manifests::with_nodes("proxy-mesh");
        let gateway: IpAddr = match family {
            Family::V4 => cluster::pod_gateway(0).into(),
            Family::V6 => cluster::pod_gateway6(0).into(),
        };
        let svc = service(SEED).cluster_ips(&[vip(family)]).named_port("tcp", PORT.into(), "TCP");
        let eps = slice(SEED, &family.name().to_lowercase())
            .address_type(family.name())
            .named_port("tcp", TARGET_PORT.into(), "TCP")
            .endpoint_on(&gateway.to_string(), "node-1");
        manifests.put(&svc.build(), &[eps.build()]);
        let (topology, agent) = setup(&[], &manifests, mode);
        let _host = PodServer::start(&topology.node, TARGET_PORT, &format!("host {PEER}")).expect("a host server");
        agent.wait_for_count(vip(family), PORT, Some(1), WAIT).unwrap();
        let tally = run(&topology, &topology.client.ns, "tcp", family, 20);
        let seen = format!("host {}", client(family));
        assert_eq!(tally.from(&seen), 20, "the node's server answers, seeing the pod: {tally:?}");
        assert_translated_where(mode, &agent, family, client(family), 20);
    }
}

per_mode! {
    /// e2e row 1 across nodes (TwoNodes: pods on node-1 and node-2, each node with its agent):
    /// a pod on node-1 reaches the ClusterIP's endpoints on both nodes, and the one on node-2
    /// sees the pod's own address. In mesh mode the packet crosses to node-2 addressed to the
    /// backend (DNAT on node-1, no SNAT) and node-2's reply comes back into node-1 from outside,
    /// where the flow's conntrack entry translates it back.
    fn endpoints_on_both_nodes(family: Family, mode: Mode) {
        let manifests = Manifests::with_nodes("proxy-mesh");
        let remote = family.pod_ip(1, 2);
        let names = [format!("pod-a {PEER}"), format!("pod-b {PEER}")];
        let topology = TwoNodes::new([&[names[0].as_str()], &[names[1].as_str()]], TARGET_PORT, true)
            .expect("building the two nodes");
        let svc = service(SEED).cluster_ips(&[vip(family)]).named_port("tcp", PORT.into(), "TCP");
        let eps = slice(SEED, &family.name().to_lowercase())
            .address_type(family.name())
            .named_port("tcp", TARGET_PORT.into(), "TCP")
            .endpoint_on(&pod(family, 2).to_string(), "node-1")
            .endpoint_on(&remote.to_string(), "node-2");
        manifests.put(&svc.build(), &[eps.build()]);
        let flags: &[&str] = if mode == Mode::Mesh { &[FLAG] } else { &[] };
        let agents: Vec<Agent> =
            topology.nodes.iter().map(|n| manifests.start_agent(AGENT, &n.ns, &n.cgroup, &n.name, flags)).collect();
        agents[0].wait_for_count(vip(family), PORT, Some(2), WAIT).unwrap();
        let node1 = &topology.nodes[0];
        let target = std::net::SocketAddr::new(vip(family), PORT).to_string();
        let tally = probe(PROBE.as_ref(), &node1.client.ns, Some(&node1.cgroup), &["tcp", &target, "40", "1000"])
            .expect("running the probe");
        let seen = client(family);
        for name in ["pod-a", "pod-b"] {
            assert!(tally.from(&format!("{name} {seen}")) > 0, "{name} answers, seeing the pod: {tally:?}");
        }
        assert_eq!(tally.answered(), 40, "{tally:?}");
        assert_translated_where(mode, &agents[0], family, seen, 40);
    }
}

per_mode! {
    /// The host network namespace keeps the socket path in both modes: a process of node-1's own
    /// namespace (a hostNetwork client, in the agent's cgroup) is translated at `connect()`, so
    /// no packet of it carries the ClusterIP (e2e row 32's client side).
    fn host_network_client_keeps_the_socket_path(family: Family, mode: Mode) {
        let manifests = Manifests::with_nodes("proxy-mesh");
        put_seed(&manifests, family, &[(2, "node-1")], |s| s);
        let (topology, agent) = setup(&[2], &manifests, mode);
        agent.wait_for_count(vip(family), PORT, Some(1), WAIT).unwrap();
        let tally = run(&topology, &topology.node, "tcp", family, 20);
        assert_eq!(tally.answered(), 20, "{tally:?}");
        assert_eq!(flows_to_vip(&agent, family, None), 0, "connect() was rewritten on the node");
    }
}
