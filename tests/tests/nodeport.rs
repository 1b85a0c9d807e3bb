//! NodePort and external traffic through the TC program, on the two-node topology of `docs/testing.md`: an
//! external client (172.18.0.100) connects to a node's address on the nodePort (or to an
//! external IP / LoadBalancer IP routed to node-1) and must reach pods on both nodes, with the
//! replies finding their way back. One agent per node runs inside that node's namespace.

use std::{net::Ipv4Addr, thread, time::Duration};

use k8s_openapi::api::core::v1::Service;
use proxy_tests::{
    agent::Agent,
    client::{Tally, http_get, probe},
    cluster::{CLIENT_IP, Manifests, NODE_IPS, SEED, SEED_NODE_PORT as NODE_PORT, seed_node_port},
    fixtures::{service, slice},
    netns::run,
    pod::PEER,
    topology::TwoNodes,
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(5);

/// Both nodes with their agents; pods answer `<name> <client address as they see it>`.
struct Cluster {
    agents: Vec<Agent>,
    topology: TwoNodes,
}

impl Cluster {
    fn new(pods: [&[&str]; 2], offload: bool, manifests: &Manifests) -> Self {
        let with_peer: Vec<Vec<String>> =
            pods.iter().map(|names| names.iter().map(|n| format!("{n} {PEER}")).collect()).collect();
        let refs: Vec<Vec<&str>> = with_peer.iter().map(|v| v.iter().map(String::as_str).collect()).collect();
        let topology = TwoNodes::new([&refs[0], &refs[1]], 80, offload).expect("building the two-node topology");
        let agents =
            topology.nodes.iter().map(|n| manifests.start_agent(AGENT, &n.ns, &n.cgroup, &n.name, &[])).collect();
        Self { agents, topology }
    }

    fn pod_ip(&self, node: usize, pod: usize) -> Ipv4Addr {
        self.topology.nodes[node].pods[pod].ip
    }

    /// `count` connections (or datagrams) from the external client.
    fn external(&self, proto: &str, target: &str, count: usize) -> Tally {
        probe(PROBE.as_ref(), &self.topology.client, None, &[proto, target, &count.to_string(), "500"]).unwrap()
    }
}

/// Answers per pod name, and the set of client addresses pods saw.
fn split(tally: &Tally) -> (std::collections::BTreeMap<String, usize>, std::collections::BTreeSet<String>) {
    let mut pods = std::collections::BTreeMap::new();
    let mut peers = std::collections::BTreeSet::new();
    for (answer, count) in &tally.answers {
        let (pod, peer) = answer.split_once(' ').unwrap_or((answer, ""));
        *pods.entry(pod.to_owned()).or_default() += count;
        peers.insert(peer.to_owned());
    }
    (pods, peers)
}

fn seed(cluster: &Cluster, manifests: &Manifests, svc: Service) {
    let endpoints = [(cluster.pod_ip(0, 0), "node-1"), (cluster.pod_ip(1, 0), "node-2")];
    manifests.service(&svc, &endpoints);
    for (agent, ip) in cluster.agents.iter().zip(NODE_IPS) {
        agent.wait_for_count(ip, NODE_PORT, Some(2), WAIT).unwrap();
    }
}

fn nodeport_reaches_pods_on_both_nodes(offload: bool) {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], offload, &manifests);
    seed(&cluster, &manifests, seed_node_port().build());
    for proto in ["tcp", "udp"] {
        let tally = cluster.external(proto, &format!("{}:{NODE_PORT}", NODE_IPS[0]), 400);
        assert_eq!(tally.answered(), 400, "{proto}: every connection is answered: {tally:?}");
        let (pods, peers) = split(&tally);
        // Binomial(400, 1/2): each side below 120 has probability < 1e-18.
        assert!(
            pods.get("pod-a").copied().unwrap_or(0) > 120 && pods.get("pod-b").copied().unwrap_or(0) > 120,
            "{proto}: spread {pods:?}"
        );
        // externalTrafficPolicy: Cluster: SNAT to the node's address, for local and remote pods.
        assert_eq!(peers, [NODE_IPS[0].to_string()].into(), "{proto}: pods see node-1's address");
    }
}

/// e2e row 10: a NodePort reaches pods on both nodes from outside; the pods see node-1's
/// address (SNAT, kube-proxy's KUBE-MARK-MASQ), TCP and UDP, with checksum offload on.
#[test]
fn e2e_10_nodeport_reaches_pods_on_both_nodes() {
    nodeport_reaches_pods_on_both_nodes(true);
}

/// The same with checksum offload off on every veth (full checksums computed in software).
#[test]
fn nodeport_works_without_checksum_offload() {
    nodeport_reaches_pods_on_both_nodes(false);
}

/// e2e row 34: externalTrafficPolicy: Local keeps the client's address, serves only the node's
/// own endpoints, and a node without local endpoints drops.
#[test]
fn e2e_34_external_traffic_policy_local() {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &[]], true, &manifests);
    let endpoints = [(cluster.pod_ip(0, 0), "node-1")];
    manifests.service(&seed_node_port().external_traffic_policy("Local").build(), &endpoints);
    cluster.agents[0].wait_for_count(NODE_IPS[0], NODE_PORT, Some(1), WAIT).unwrap();
    cluster.agents[1].wait_for_count(NODE_IPS[1], NODE_PORT, Some(0), WAIT).unwrap();
    let tally = cluster.external("tcp", &format!("{}:{NODE_PORT}", NODE_IPS[0]), 50);
    let (pods, peers) = split(&tally);
    assert_eq!(pods.get("pod-a"), Some(&50), "{tally:?}");
    assert_eq!(peers, [CLIENT_IP.to_string()].into(), "the pod sees the client's own address");
    let dropped = cluster.external("tcp", &format!("{}:{NODE_PORT}", NODE_IPS[1]), 3);
    assert_eq!(dropped.answered(), 0, "node-2 has no local endpoint and drops: {dropped:?}");
    assert_eq!(dropped.errors.get("timeout"), Some(&3), "dropped, not refused: {dropped:?}");
}

/// e2e row 11: external IPs and LoadBalancer ingress IPs routed to node-1 work like the nodePort.
#[test]
fn e2e_11_external_ip_and_load_balancer_ip() {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], true, &manifests);
    let external_ip = "172.18.1.10";
    let lb_ip = "172.18.2.10";
    for ip in [external_ip, lb_ip] {
        cluster.topology.client.ip(&["route", "add", &format!("{ip}/32"), "via", &NODE_IPS[0].to_string()]).unwrap();
    }
    seed(&cluster, &manifests, seed_node_port().external_ip(external_ip).load_balancer_ip(lb_ip).build());
    for ip in [external_ip, lb_ip] {
        cluster.agents[0].wait_for_count(ip.parse::<std::net::IpAddr>().unwrap(), 6666, Some(2), WAIT).unwrap();
        let tally = cluster.external("tcp", &format!("{ip}:6666"), 100);
        assert_eq!(tally.answered(), 100, "{ip}: {tally:?}");
        let (pods, peers) = split(&tally);
        assert_eq!(pods.len(), 2, "{ip}: both pods answer: {pods:?}");
        assert_eq!(peers, [NODE_IPS[0].to_string()].into(), "{ip}: SNAT to node-1's address");
    }
}

/// Large requests through the NodePort: a 3000-byte UDP datagram arrives in two IPv4
/// fragments (the later one has no ports: the first one's are remembered) and a 2 KB TCP
/// request is echoed back, to pods on both nodes.
#[test]
fn large_requests_and_fragments_through_the_nodeport() {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], true, &manifests);
    seed(&cluster, &manifests, seed_node_port().build());
    let target = format!("{}:{NODE_PORT}", NODE_IPS[0]);
    for mode in ["udp-big", "tcp-big"] {
        let tally = cluster.external(mode, &target, 40);
        assert_eq!(tally.answered(), 40, "{mode}: {tally:?}");
        assert_eq!(split(&tally).0.len(), 2, "{mode}: both pods answer: {tally:?}");
    }
    // The datagrams really were fragmented: node-1 recorded first fragments' ports.
    let pinned = cluster.agents[0].bpf_root().join("fragments");
    let fragments: Vec<serde_json::Value> =
        serde_json::from_str(&run("bpftool", &["-j", "map", "dump", "pinned", &pinned.to_string_lossy()]).unwrap())
            .unwrap();
    assert!(!fragments.is_empty(), "no fragment was seen: the test did not test fragments");
}

/// ICMP errors of tracked flows find their way back: UDP to a nodePort whose pods have nothing
/// listening on the target port makes the pod answer "port unreachable" about the translated
/// datagram; the TC path rewrites the quoted header back to what the client sent, so the
/// client's connected socket sees "connection refused" instead of waiting for a timeout.
#[test]
fn icmp_errors_of_tracked_flows_reach_the_client() {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], true, &manifests);
    let svc = service("closed").cluster_ip("10.96.0.30").named_port("udp", 7000, "UDP").node_port(30070).build();
    // Target port 81: the pods serve 80 only.
    let eps = slice("closed", "a")
        .named_port("udp", 81, "UDP")
        .endpoint_on(&cluster.pod_ip(0, 0).to_string(), "node-1")
        .endpoint_on(&cluster.pod_ip(1, 0).to_string(), "node-2")
        .build();
    manifests.put(&svc, &[eps]);
    let key = proxy_common::service::ServiceKey::master(
        proxy_common::addr::from_ip(NODE_IPS[0]),
        30070,
        proxy_common::proto::UDP,
    );
    let deadline = std::time::Instant::now() + WAIT;
    while !cluster.agents[0].maps().unwrap().services().any(|(k, v)| k == key && v.count == 2) {
        assert!(std::time::Instant::now() < deadline, "the UDP nodePort was not programmed");
        thread::sleep(Duration::from_millis(10));
    }
    // Few attempts: pods rate-limit their ICMP errors.
    let tally = cluster.external("udp-connected", &format!("{}:30070", NODE_IPS[0]), 4);
    assert_eq!(tally.errors.get("refused"), Some(&4), "the client sees the pods' port-unreachable: {tally:?}");
}

/// `inspect conntrack` shows the NodePort flows as the test made them: from the client to
/// node-1's nodePort, rewritten to come from node-1 (SNAT) and go to a pod on port 80, and the
/// reply direction that undoes it.
#[test]
fn inspect_conntrack_shows_the_flows() {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], true, &manifests);
    seed(&cluster, &manifests, seed_node_port().build());
    let target = format!("{}:{NODE_PORT}", NODE_IPS[0]);
    assert_eq!(cluster.external("tcp", &target, 3).answered(), 3);
    let out = std::process::Command::new(AGENT)
        .args(["inspect", "conntrack", "-o", "json", "--bpf-root"])
        .arg(cluster.agents[0].bpf_root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let original: Vec<_> = rows.iter().filter(|r| r["direction"] == "original").collect();
    assert_eq!(original.len(), 3, "one original entry per connection: {rows:?}");
    let pods = [format!("{}:80", cluster.pod_ip(0, 0)), format!("{}:80", cluster.pod_ip(1, 0))];
    for row in &original {
        assert!(row["from"].as_str().unwrap().starts_with(&format!("{CLIENT_IP}:")), "{row}");
        assert_eq!(row["to"], target.as_str());
        assert!(row["new_from"].as_str().unwrap().starts_with(&format!("{}:", NODE_IPS[0])), "SNAT: {row}");
        assert!(pods.contains(&row["new_to"].as_str().unwrap().to_owned()), "to a pod: {row}");
        assert_eq!(row["snat"], true);
    }
    let replies = rows.iter().filter(|r| r["direction"] == "reply").count();
    assert_eq!(replies, 3, "each flow has its reply entry: {rows:?}");
}

/// e2e rows 35 and 34's health check: a LoadBalancer with externalTrafficPolicy Local serves
/// kube-proxy's health check on its healthCheckNodePort: 200 with the local endpoint count on
/// the node with a ready endpoint, 503 on the node without one, 503 when only a terminating
/// endpoint is left (which still serves the nodePort), and no server once the policy is Cluster.
#[test]
fn e2e_35_health_check_node_port() {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &[]], true, &manifests);
    let lb = |policy: &str| {
        seed_node_port()
            .external_traffic_policy(policy)
            .load_balancer_ip("172.18.3.10")
            .health_check_node_port(32000)
            .build()
    };
    let pod_a = cluster.pod_ip(0, 0).to_string();
    let write = |svc: &Service, terminating: bool| {
        let endpoint = if terminating {
            slice(SEED, "a").endpoint_with(&pod_a, "node-1", false, true, true)
        } else {
            slice(SEED, "a").endpoint_on(&pod_a, "node-1")
        };
        let eps = endpoint.named_port("tcp", 80, "TCP").named_port("udp", 80, "UDP").build();
        manifests.put(svc, &[eps]);
    };
    let health = |node: usize| {
        let target = format!("{}:32000", NODE_IPS[node]);
        probe(PROBE.as_ref(), &cluster.topology.client, None, &["http", &target, "1", "500"]).unwrap()
    };
    let wait_for = |node: usize, want: &str| {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let tally = health(node);
            if tally.answers.keys().any(|a| a.starts_with(want)) {
                return tally;
            }
            assert!(std::time::Instant::now() < deadline, "node-{} health check: want {want}, got {tally:?}", node + 1);
            thread::sleep(Duration::from_millis(50));
        }
    };
    write(&lb("Local"), false);
    let ok = wait_for(0, "200 ");
    let body: serde_json::Value =
        serde_json::from_str(ok.answers.keys().next().unwrap().trim_start_matches("200 ")).unwrap();
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["name"], SEED);
    assert_eq!(body["service"]["namespace"], "default");
    let none = wait_for(1, "503 ");
    assert!(none.answers.keys().any(|a| a.contains("\"localEndpoints\":0")), "{none:?}");
    // Only a terminating endpoint left: the check fails, the nodePort still serves (fallback).
    write(&lb("Local"), true);
    wait_for(0, "503 ");
    let served = cluster.external("tcp", &format!("{}:{NODE_PORT}", NODE_IPS[0]), 5);
    assert_eq!(served.answered(), 5, "the terminating endpoint still serves: {served:?}");
    // externalTrafficPolicy Cluster: no health check server any more.
    write(&lb("Cluster"), false);
    let deadline = std::time::Instant::now() + WAIT;
    while !health(0).errors.contains_key("refused") {
        assert!(std::time::Instant::now() < deadline, "the health check port was not released");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A UDP flow from outside whose backend leaves the service is flushed (kube-proxy deletes such
/// conntrack entries), even when that endpoint lives on in another service: the client's next
/// datagram on the same socket reaches a remaining backend.
#[test]
fn udp_flows_leave_a_backend_removed_from_the_service() {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], true, &manifests);
    let (pod_a, pod_b) = (cluster.pod_ip(0, 0), cluster.pod_ip(1, 0));
    let udp = service("dns").cluster_ip("10.96.0.40").named_port("udp", 53, "UDP").node_port(30053).build();
    let other = service("keeps-pod-b").cluster_ip("10.96.0.41").named_port("udp", 53, "UDP").build();
    manifests.service(&other, &[(pod_b, "node-2")]);
    manifests.service(&udp, &[(pod_a, "node-1"), (pod_b, "node-2")]);
    let programmed = |count: u16| {
        let key = proxy_common::service::ServiceKey::master(
            proxy_common::addr::from_ip(NODE_IPS[0]),
            30053,
            proxy_common::proto::UDP,
        );
        let deadline = std::time::Instant::now() + WAIT;
        while !cluster.agents[0].maps().unwrap().services().any(|(k, v)| k == key && v.count == count) {
            assert!(std::time::Instant::now() < deadline, "the UDP nodePort does not have {count} backends");
            thread::sleep(Duration::from_millis(10));
        }
    };
    programmed(2);
    let target = std::net::SocketAddr::from((NODE_IPS[0], 30053));
    thread::scope(|s| {
        s.spawn(|| {
            cluster.topology.client.enter().unwrap();
            let ask = |socket: &std::net::UdpSocket| -> Option<String> {
                socket.send_to(b"hello\n", target).ok()?;
                let mut buf = [0u8; 512];
                let (n, _) = socket.recv_from(&mut buf).ok()?;
                Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
            };
            // A socket whose flow went to pod-b (each socket is its own flow).
            let socket = (0..32)
                .map(|_| {
                    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                    socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                    socket
                })
                .find(|socket| ask(socket).is_some_and(|a| a.starts_with("pod-b")))
                .expect("one of 32 flows reaches pod-b");
            manifests.service(&udp, &[(pod_a, "node-1")]);
            programmed(1);
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                let answer = ask(&socket);
                if answer.as_deref().is_some_and(|a| a.starts_with("pod-a")) {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "the flow stayed on pod-b: {answer:?}");
                thread::sleep(Duration::from_millis(50));
            }
        })
        .join()
        .unwrap();
    });
}

/// A process on a node (in the agent's cgroup) reaches its own node's and the other node's
/// address on the nodePort, and a host-network one 127.0.0.1 on the nodePort: the socket path
/// translates those too.
#[test]
fn node_local_clients_reach_node_ports() {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], true, &manifests);
    seed(&cluster, &manifests, seed_node_port().build());
    let node1 = &cluster.topology.nodes[0];
    for ip in NODE_IPS {
        let target = format!("{ip}:{NODE_PORT}");
        let tally =
            probe(PROBE.as_ref(), &node1.client.ns, Some(&node1.cgroup), &["tcp", &target, "20", "500"]).unwrap();
        assert_eq!(tally.answered(), 20, "{target}: {tally:?}");
    }
    // Localhost nodePorts: a host-network process on node-1 reaches 127.0.0.1:<nodePort>, as
    // with kube-proxy's iptables mode; a pod's own loopback stays its own.
    let localhost = format!("127.0.0.1:{NODE_PORT}");
    let host = probe(PROBE.as_ref(), &node1.ns, Some(&node1.cgroup), &["tcp", &localhost, "20", "500"]).unwrap();
    assert_eq!(host.answered(), 20, "from the node's own namespace: {host:?}");
    let pod = probe(PROBE.as_ref(), &node1.client.ns, Some(&node1.cgroup), &["tcp", &localhost, "3", "500"]).unwrap();
    assert_eq!(pod.errors.get("refused"), Some(&3), "a pod's 127.0.0.1 is its own: {pod:?}");
}

/// loadBalancerSourceRanges: a client outside the listed CIDRs is dropped at the LoadBalancer
/// IP (kube-proxy's firewall chain) but can still use the nodePort, which kube-proxy leaves
/// open; a listed client is admitted.
#[test]
fn load_balancer_source_ranges_admit_only_listed_clients() {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], true, &manifests);
    let (allowed_ip, denied_ip) = ("172.18.2.10", "172.18.2.11");
    for ip in [allowed_ip, denied_ip] {
        cluster.topology.client.ip(&["route", "add", &format!("{ip}/32"), "via", &NODE_IPS[0].to_string()]).unwrap();
    }
    let endpoints = [(cluster.pod_ip(0, 0), "node-1"), (cluster.pod_ip(1, 0), "node-2")];
    let admits = service("admits")
        .cluster_ip("10.96.0.20")
        .named_port("tcp", 6666, "TCP")
        .node_port(30067)
        .load_balancer_ip(allowed_ip)
        .load_balancer_source_range(&format!("{CLIENT_IP}/32"))
        .build();
    let denies = service("denies")
        .cluster_ip("10.96.0.21")
        .named_port("tcp", 6666, "TCP")
        .node_port(30068)
        .load_balancer_ip(denied_ip)
        .load_balancer_source_range("10.0.0.0/8")
        .build();
    manifests.service(&admits, &endpoints);
    manifests.service(&denies, &endpoints);
    for ip in [allowed_ip, denied_ip] {
        cluster.agents[0].wait_for_count(ip.parse::<std::net::IpAddr>().unwrap(), 6666, Some(2), WAIT).unwrap();
    }
    let admitted = cluster.external("tcp", &format!("{allowed_ip}:6666"), 20);
    assert_eq!(admitted.answered(), 20, "a listed client is admitted: {admitted:?}");
    let dropped = cluster.external("tcp", &format!("{denied_ip}:6666"), 3);
    assert_eq!(dropped.answered(), 0, "an unlisted client is dropped at the LoadBalancer IP: {dropped:?}");
    assert_eq!(dropped.errors.get("timeout"), Some(&3), "dropped, not refused: {dropped:?}");
    let nodeport = cluster.external("tcp", &format!("{}:30068", NODE_IPS[0]), 20);
    assert_eq!(nodeport.answered(), 20, "the nodePort stays open to the same client: {nodeport:?}");
    // Every dropped SYN (three attempts, each maybe retransmitted) is counted, and both
    // /metrics and `inspect drops` show the same count (no traffic is dropped in between).
    let node1 = &cluster.topology.nodes[0];
    let (status, body) = http_get(&node1.ns, "127.0.0.1:10249".parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    let series = r#"proxy_datapath_drops_total{reason="source_range_denied"}"#;
    let scraped: f64 = body
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{body}"));
    assert!(scraped >= 3.0, "each denied SYN counted: {scraped}");
    let out = std::process::Command::new(AGENT)
        .args(["inspect", "drops", "-o", "json", "--bpf-root"])
        .arg(cluster.agents[0].bpf_root())
        .output()
        .expect("running inspect drops");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("inspect drops -o json");
    let row = rows.iter().find(|r| r["reason"] == "source_range_denied").expect("a source_range_denied row");
    assert_eq!(row["count"].as_f64(), Some(scraped), "inspect and /metrics agree: {rows:?}");
}

/// Many parallel connections from the one client keep distinct, working flows (no SNAT port
/// clash), and a long-lived connection keeps working while an unrelated service changes.
#[test]
fn parallel_flows_and_a_long_lived_connection() {
    let manifests = Manifests::with_nodes("proxy-np");
    let cluster = Cluster::new([&["pod-a"], &["pod-b"]], true, &manifests);
    seed(&cluster, &manifests, seed_node_port().build());
    let target = format!("{}:{NODE_PORT}", NODE_IPS[0]);
    thread::scope(|s| {
        let held = s.spawn(|| probe(PROBE.as_ref(), &cluster.topology.client, None, &["hold", &target, "4"]).unwrap());
        let parallel: Vec<_> = (0..6).map(|_| s.spawn(|| cluster.external("tcp", &target, 150))).collect();
        for i in 0..5 {
            let other = service(&format!("other-{i}"))
                .cluster_ip(&format!("10.96.1.{i}"))
                .port(80)
                .node_port(30100 + i)
                .build();
            manifests.service(&other, &[(cluster.pod_ip(1, 0), "node-2")]);
            thread::sleep(Duration::from_millis(300));
        }
        for handle in parallel {
            let tally = handle.join().unwrap();
            assert_eq!(tally.answered(), 150, "parallel flows all work: {tally:?}");
        }
        let held = held.join().unwrap();
        assert_eq!(held.answered(), 1, "the long-lived connection kept working: {held:?}");
    });
}

/// Without the agent's programs nothing from the client reaches the pods: the tests above
/// prove our datapath did the work.
#[test]
fn without_our_programs_the_nodeport_goes_nowhere() {
    let manifests = Manifests::with_nodes("proxy-np");
    let mut cluster = Cluster::new([&["pod-a"], &["pod-b"]], true, &manifests);
    seed(&cluster, &manifests, seed_node_port().build());
    let target = format!("{}:{NODE_PORT}", NODE_IPS[0]);
    assert_eq!(cluster.external("tcp", &target, 5).answered(), 5);
    // As an operator would: stop the agents, then remove what they left.
    for agent in &mut cluster.agents {
        agent.kill();
        agent.cleanup(AGENT.as_ref()).unwrap();
    }
    let tally = cluster.external("tcp", &target, 5);
    assert_eq!(tally.answered(), 0, "{tally:?}");
    assert_eq!(tally.errors.get("refused"), Some(&5), "the node itself answers with a reset: {tally:?}");
}
