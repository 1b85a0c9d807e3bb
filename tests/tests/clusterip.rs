//! ClusterIP socket load balancing on the real kernel: the agent (a real process) reads a
//! manifest directory and programs the real BPF object, attached to a cgroup this test made;
//! clients in pod namespaces inside that cgroup make real connections. Behaviours that apply
//! to both families run once per way of reaching the service (`proxy_tests::per_family!`).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    thread,
    time::Duration,
};

use proxy_tests::{
    agent::Agent,
    client::{Tally, probe},
    cluster::{self, Family, Manifests, SEED_PORT as PORT, SEED_VIP as VIP, Via},
    fixtures::{service, yaml},
    netns::run,
    per_family,
    pod::{ANSWER_LOCAL_ADDRESS, PEER, PodServer},
    topology::SingleNode,
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(5);

/// Address `n` on node-1's pod network.
fn pod_ip(n: u8) -> Ipv4Addr {
    cluster::pod_ip(0, n)
}

/// Address `n` on node-1's pod network in the family of the service `via` reaches.
fn pod_ip_for(via: Via, n: u8) -> IpAddr {
    via.service_family().pod_ip(0, n)
}

/// The seed service's ClusterIP in the family of the service `via` reaches.
fn vip_for(via: Via) -> IpAddr {
    via.service_family().vip(VIP.octets()[3])
}

/// What the client connects to for the seed service, `via`.
fn target(via: Via) -> String {
    via.target(vip_for(via), PORT).to_string()
}

/// Writes the seed service in the family `via` reaches, with endpoints `pods` (host numbers).
fn seed(manifests: &Manifests, via: Via, pods: &[u8]) {
    let family = via.service_family();
    let ips: Vec<IpAddr> = pods.iter().map(|n| pod_ip_for(via, *n)).collect();
    manifests.seed_in(family, &ips);
}

/// Builds node-1 with pods `pod-<n>` at 10.244.1.<n> (and fd00:10:244:1::<n>) and starts the
/// agent on `manifests`.
fn setup(pods: &[u8], manifests: &Manifests) -> (SingleNode, Agent) {
    let names: Vec<(String, Ipv4Addr)> = pods.iter().map(|n| (format!("pod-{n}"), pod_ip(*n))).collect();
    let refs: Vec<(&str, Ipv4Addr)> = names.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let topology = SingleNode::new(&refs, 80).expect("building the namespaces");
    // The agent runs in node-1's namespace, as it would on a node.
    let agent = manifests.start_agent(AGENT, &topology.node, &topology.cgroup, "node-1", &[]);
    (topology, agent)
}

fn connect(topology: &SingleNode, target: &str, count: usize) -> Tally {
    probe(PROBE.as_ref(), &topology.client.ns, Some(&topology.cgroup), &["tcp", target, &count.to_string(), "500"])
        .expect("running the probe")
}

/// Pearson's chi-square statistic of `counts` against a uniform spread.
fn chi_square(counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    let expected = total as f64 / counts.len() as f64;
    counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum()
}

/// Chi-square critical values at p = 1e-6 for 1 and 2 degrees of freedom: a uniform pick
/// exceeds them less than once in a million runs. (For 2 dof the tail is exp(-x/2).)
const CHI2_CRITICAL_1E6: [f64; 2] = [23.928, 27.631];

fn assert_uniform(via: Via, pods: &[u8], connections: usize) {
    let manifests = Manifests::new("proxy-manifests");
    seed(&manifests, via, pods);
    let (topology, agent) = setup(pods, &manifests);
    agent.wait_for_count(vip_for(via), PORT, Some(pods.len() as u16), WAIT).unwrap();
    let tally = connect(&topology, &target(via), connections);
    assert_eq!(tally.answered(), connections, "every connection is answered: {tally:?}");
    let counts: Vec<usize> = pods.iter().map(|n| tally.from(&format!("pod-{n}"))).collect();
    let chi2 = chi_square(&counts);
    let critical = CHI2_CRITICAL_1E6[pods.len() - 2];
    assert!(
        chi2 < critical,
        "spread {counts:?} over {} backends is not uniform (chi2 {chi2:.1} >= {critical})",
        pods.len()
    );
}

per_family! {
    /// e2e row 1's core: a ClusterIP spreads connections uniformly over two backends.
    fn uniform_pick_between_two_backends(via: Via) {
        assert_uniform(via, &[2, 3], 600);
    }
}

per_family! {
    /// The same with three backends.
    fn uniform_pick_between_three_backends(via: Via) {
        assert_uniform(via, &[2, 3, 4], 900);
    }
}

per_family! {
    /// e2e row 1: endpoints added and removed while a client keeps connecting; every connection
    /// is answered, new endpoints get traffic, removed ones stop getting it.
    fn endpoints_follow_the_manifest_while_traffic_flows(via: Via) {
        let manifests = Manifests::new("proxy-manifests");
        seed(&manifests, via, &[2, 3]);
        let (topology, agent) = setup(&[2, 3, 4], &manifests);
        let vip = vip_for(via);
        agent.wait_for_count(vip, PORT, Some(2), WAIT).unwrap();
        let target = target(via);

        thread::scope(|s| {
            let background = s.spawn(|| connect(&topology, &target, 1500));
            seed(&manifests, via, &[2, 3, 4]);
            agent.wait_for_count(vip, PORT, Some(3), WAIT).unwrap();
            let grown = connect(&topology, &target, 300);
            assert!(grown.from("pod-4") > 0, "the added endpoint gets traffic: {grown:?}");
            seed(&manifests, via, &[2, 4]);
            agent.wait_for_count(vip, PORT, Some(2), WAIT).unwrap();
            let shrunk = connect(&topology, &target, 300);
            assert_eq!(shrunk.from("pod-3"), 0, "the removed endpoint gets no new connection: {shrunk:?}");
            assert_eq!(shrunk.answered(), 300, "{shrunk:?}");
            let during = background.join().unwrap();
            assert!(during.errors.is_empty(), "no connection failed while endpoints changed: {during:?}");
            assert_eq!(during.answered(), 1500);
        });
    }
}

/// Issue 14's "done when" on the socket path: a RequireDualStack service (`ipFamilies: [IPv4,
/// IPv6]`) with one EndpointSlice per family is reached from a pod through both ClusterIPs and
/// through `::ffff:` + its IPv4 ClusterIP on an AF_INET6 socket. Each ClusterIP goes to its own
/// family's endpoints (the pods see the client's address of that family; the mapped connect is
/// IPv4 on the wire), and both pods answer each way (40 connections: one missed with
/// probability 2^-39).
#[test]
fn dual_stack_service_through_both_cluster_ips_and_mapped() {
    let manifests = Manifests::new("proxy-manifests");
    let pods = [2, 3];
    let vips: Vec<IpAddr> = Family::BOTH.iter().map(|f| f.vip(VIP.octets()[3])).collect();
    let slices = Family::BOTH.map(|f| {
        let ips: Vec<IpAddr> = pods.iter().map(|n| f.pod_ip(0, *n)).collect();
        cluster::seed_slice_in(f, &ips).build()
    });
    manifests.put(&service(cluster::SEED).cluster_ips(&vips).port(PORT.into()).build(), &slices);
    let named: Vec<(String, Ipv4Addr)> = pods.iter().map(|n| (format!("pod-{n} {PEER}"), pod_ip(*n))).collect();
    let refs: Vec<(&str, Ipv4Addr)> = named.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let topology = SingleNode::new(&refs, 80).expect("building the namespaces");
    let agent = manifests.start_agent(AGENT, &topology.node, &topology.cgroup, "node-1", &[]);
    for vip in &vips {
        agent.wait_for_count(*vip, PORT, Some(2), WAIT).unwrap();
    }
    let client = &topology.client;
    for via in Via::ALL {
        let family = via.service_family();
        let seen_as = if family == Family::V4 { IpAddr::from(client.ip) } else { client.ip6.into() };
        let target = via.target(family.vip(VIP.octets()[3]), PORT).to_string();
        let tally = connect(&topology, &target, 40);
        assert_eq!(tally.answered(), 40, "{via:?} → {target}: every connection is answered: {tally:?}");
        let seen: BTreeSet<&str> = tally.answers.keys().map(String::as_str).collect();
        let expected: Vec<String> = pods.iter().map(|n| format!("pod-{n} {seen_as}")).collect();
        assert_eq!(
            seen,
            expected.iter().map(String::as_str).collect(),
            "{via:?} → {target}: both {family} endpoints answer, seeing the client's {family} address"
        );
    }
}

/// A service with 1000 endpoints (no cap on the backend set): one namespace holds all 1000
/// addresses and answers with the address each connection reached.
#[test]
fn thousand_endpoint_service() {
    const N: usize = 1000;
    let endpoints: Vec<Ipv4Addr> =
        (0..N).map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 100, 1)) + i as u32)).collect();
    let manifests = Manifests::new("proxy-manifests");
    manifests.seed(&endpoints);
    let (mut topology, agent) = setup(&[], &manifests);
    topology.add_pod("big", pod_ip(50), 81).unwrap();
    let big = topology.pods.last_mut().unwrap();
    big.stop();
    let batch: String = endpoints.iter().map(|ip| format!("addr add {ip}/32 dev eth0\n")).collect();
    let batch_file = std::env::temp_dir().join(format!("proxy-batch-{}", std::process::id()));
    std::fs::write(&batch_file, batch).unwrap();
    run("ip", &["-n", big.ns.name(), "-batch", &batch_file.to_string_lossy()]).unwrap();
    let _ = std::fs::remove_file(&batch_file);
    let _server = PodServer::start(&big.ns, 80, ANSWER_LOCAL_ADDRESS).unwrap();
    topology.node.ip(&["route", "add", "10.244.100.0/22", "via", &pod_ip(50).to_string()]).unwrap();
    agent.wait_for_count(VIP, PORT, Some(N as u16), WAIT).unwrap();

    let tally = connect(&topology, &format!("{VIP}:{PORT}"), 5000);
    assert_eq!(tally.answered(), 5000, "{:?}", tally.errors);
    let wanted: std::collections::HashSet<String> = endpoints.iter().map(Ipv4Addr::to_string).collect();
    assert!(tally.answers.keys().all(|a| wanted.contains(a)), "answers come only from the endpoints");
    // 5000 uniform draws from 1000 reach about 993 distinct endpoints; 950 is > 6 sd below.
    assert!(tally.answers.len() >= 950, "only {} of {N} endpoints reached", tally.answers.len());
}

per_family! {
    /// Connections to addresses that are not service frontends are not touched: a pod
    /// directly, another port of the ClusterIP, an unused address in the service range.
    fn connects_to_other_addresses_are_untouched(via: Via) {
        let manifests = Manifests::new("proxy-manifests");
        seed(&manifests, via, &[2, 3]);
        let (topology, agent) = setup(&[2, 3], &manifests);
        agent.wait_for_count(vip_for(via), PORT, Some(2), WAIT).unwrap();
        let direct = connect(&topology, &via.target(pod_ip_for(via, 3), 80).to_string(), 50);
        assert_eq!(direct.from("pod-3"), 50, "a direct connection reaches exactly that pod: {direct:?}");
        let unused = via.service_family().vip(99);
        for target in [via.target(vip_for(via), 7777), via.target(unused, PORT)] {
            let target = target.to_string();
            let tally =
                probe(PROBE.as_ref(), &topology.client.ns, Some(&topology.cgroup), &["tcp", &target, "3", "300"])
                    .unwrap();
            assert_eq!(tally.answered(), 0, "{target} is not a frontend and must not be translated: {tally:?}");
        }
    }
}

per_family! {
    /// Without the agent's program on the client's cgroup, the ClusterIP goes nowhere: the
    /// translation above is ours.
    fn clients_outside_the_cgroup_are_not_translated(via: Via) {
        let manifests = Manifests::new("proxy-manifests");
        seed(&manifests, via, &[2]);
        let (topology, agent) = setup(&[2], &manifests);
        agent.wait_for_count(vip_for(via), PORT, Some(1), WAIT).unwrap();
        let inside = connect(&topology, &target(via), 5);
        assert_eq!(inside.from("pod-2"), 5, "{inside:?}");
        let outside = probe(PROBE.as_ref(), &topology.client.ns, None, &["tcp", &target(via), "3", "300"]).unwrap();
        assert_eq!(outside.answered(), 0, "{outside:?}");
    }
}

per_family! {
    /// e2e row 29: a service port with no endpoint refuses the connection at once
    /// (kube-proxy's REJECT), instead of timing out.
    fn no_endpoints_refuses_connections(via: Via) {
        let manifests = Manifests::new("proxy-manifests");
        seed(&manifests, via, &[]);
        let (topology, agent) = setup(&[2], &manifests);
        agent.wait_for_count(vip_for(via), PORT, Some(0), WAIT).unwrap();
        let tally = connect(&topology, &target(via), 5);
        assert_eq!(tally.errors.get("refused"), Some(&5), "{tally:?}");
    }
}

/// Malformed input is skipped with one log line naming the file and the field; the good
/// service in the same directory is still served.
#[test]
fn malformed_manifests_are_skipped_and_the_rest_is_served() {
    let manifests = Manifests::new("proxy-manifests");
    manifests.seed(&[pod_ip(2)]);
    manifests.write("broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: x\n");
    let bad_ip = service("bad-ip").cluster_ip("10.96.0.300").port(80).build();
    let bad_port = service("bad-port").cluster_ip("10.96.0.11").port(70000).build();
    manifests.write("bad.yaml", &(yaml(&bad_ip) + &yaml(&bad_port)));
    let (topology, mut agent) = setup(&[2], &manifests);
    agent.wait_for_count(VIP, PORT, Some(1), WAIT).unwrap();
    agent.wait_for_log("spec.clusterIPs[0]", WAIT).unwrap();
    agent.wait_for_log("spec.ports[0].port", WAIT).unwrap();
    let log = agent.log();
    assert!(agent.mentions("broken.yaml"), "the unparseable file is named:\n{log}");
    assert!(agent.mentions("default/bad-ip") && agent.mentions("10.96.0.300"), "the bad address is named:\n{log}");
    assert!(agent.mentions("default/bad-port") && agent.mentions("70000"), "the bad port is named:\n{log}");
    let frontends: Vec<_> = agent.maps().unwrap().services().filter(|(k, _)| k.slot == 0).map(|(k, _)| k).collect();
    assert_eq!(frontends.len(), 1, "only the good frontend is programmed: {frontends:?}");
    assert_eq!(agent.count(Ipv4Addr::new(10, 96, 0, 11), 70000u32 as u16).unwrap(), None);
    let tally = connect(&topology, &format!("{VIP}:{PORT}"), 10);
    assert_eq!(tally.from("pod-2"), 10, "{tally:?}");
}

/// The maps carry BTF: `bpftool map dump` prints keys and values with field names. Addresses
/// are 16 bytes, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`: ten zeros, two 255s, the four).
#[test]
fn bpftool_shows_maps_with_field_names() {
    let manifests = Manifests::new("proxy-manifests");
    manifests.seed(&[pod_ip(2), pod_ip(3)]);
    let (_topology, agent) = setup(&[2, 3], &manifests);
    agent.wait_for_count(VIP, PORT, Some(2), WAIT).unwrap();
    let dump =
        run("bpftool", &["-j", "map", "dump", "pinned", &agent.bpf_root().join("services").to_string_lossy()]).unwrap();
    let entries: Vec<serde_json::Value> = serde_json::from_str(&dump).unwrap();
    let master = entries
        .iter()
        .map(|e| e.get("formatted").unwrap_or(e))
        .find(|e| e["key"]["slot"] == 0)
        .unwrap_or_else(|| panic!("no master entry with named fields in {dump}"));
    assert_eq!(master["key"]["address"], serde_json::json!(VIP.to_ipv6_mapped().octets()));
    assert_eq!(master["key"]["port"], PORT);
    assert_eq!(master["value"]["count"], 2);
    let backends =
        run("bpftool", &["-j", "map", "dump", "pinned", &agent.bpf_root().join("backends").to_string_lossy()]).unwrap();
    let backends: Vec<serde_json::Value> = serde_json::from_str(&backends).unwrap();
    let mut addresses: Vec<_> =
        backends.iter().map(|e| e.get("formatted").unwrap_or(e)["value"]["address"].clone()).collect();
    addresses.sort_by_key(|a| a.to_string());
    let mapped = |ip: Ipv4Addr| serde_json::json!(ip.to_ipv6_mapped().octets());
    assert_eq!(addresses, vec![mapped(pod_ip(2)), mapped(pod_ip(3))]);
}
