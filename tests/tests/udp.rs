//! UDP and peer addresses on the socket path: connected and unconnected UDP to a ClusterIP,
//! replies and getpeername() showing the service address (not the pod's), one backend per
//! unconnected socket, ECONNREFUSED without endpoints, and TCP's getpeername; each for an
//! AF_INET socket, an AF_INET6 socket to the IPv4-mapped ClusterIP and an IPv6 service
//! (`proxy_tests::per_family!`).

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use proxy_tests::{
    agent::Agent,
    client::{Tally, probe},
    cluster::{Manifests, Via, pod_ip},
    fixtures::{ServiceBuilder, service, slice},
    per_family,
    topology::SingleNode,
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const PORT: u16 = 53;
const WAIT: Duration = Duration::from_secs(5);
const POD_2: Ipv4Addr = pod_ip(0, 2);
const POD_3: Ipv4Addr = pod_ip(0, 3);

/// The DNS-like service's ClusterIP in the family `via` reaches (10.96.0.53 or fd00:10:96::53).
fn vip(via: Via) -> IpAddr {
    via.service_family().vip(VIP.octets()[3])
}

/// What the client sends to: the ClusterIP as `via` writes it.
fn target(via: Via) -> String {
    via.target(vip(via), PORT).to_string()
}

/// node-1 with pods pod-2 and pod-3 serving TCP and UDP on 5353, the agent on a DNS-like
/// service at [`vip`]`:53` (TCP and UDP) → :5353 with endpoints `pods` (host numbers, in the
/// service's family).
fn setup(via: Via, pods: &[u8]) -> (SingleNode, Agent, Manifests) {
    let (topology, dir) = topology();
    write_endpoints(&dir, via, pods);
    let agent = dir.start_agent(AGENT, &topology.node, &topology.cgroup, "node-1", &[]);
    agent.wait_for_count(vip(via), PORT, Some(pods.len() as u16), WAIT).unwrap();
    (topology, agent, dir)
}

fn topology() -> (SingleNode, Manifests) {
    let pods = [("pod-2", POD_2), ("pod-3", POD_3)];
    (SingleNode::new(&pods, 5353).expect("building the namespaces"), Manifests::new("proxy-udp"))
}

/// The DNS-like service's ports: `dns` over UDP, `dns-tcp` over TCP, both 53.
fn dns_ports(svc: ServiceBuilder) -> ServiceBuilder {
    svc.named_port("dns", PORT.into(), "UDP").named_port("dns-tcp", PORT.into(), "TCP")
}

/// Writes the service, single-stack in the family `via` reaches, with endpoints `pods`.
fn write_endpoints(dir: &Manifests, via: Via, pods: &[u8]) {
    let family = via.service_family();
    let svc = dns_ports(service("dns").cluster_ips(&[vip(via)])).build();
    let ips: Vec<String> = pods.iter().map(|n| family.pod_ip(0, *n).to_string()).collect();
    let eps =
        slice("dns", "a").address_type(family.name()).named_port("dns", 5353, "UDP").named_port("dns-tcp", 5353, "TCP");
    let eps = ips.iter().fold(eps, |s, ip| s.endpoint(ip)).build();
    dir.put(&svc, [&eps]);
}

fn run(topology: &SingleNode, via: Via, mode: &str, count: usize) -> Tally {
    probe(PROBE.as_ref(), &topology.client.ns, Some(&topology.cgroup), &[mode, &target(via), &count.to_string(), "500"])
        .unwrap()
}

/// Answers split into (backend name, address the client saw it from).
fn answers(tally: &Tally) -> Vec<(String, String)> {
    tally
        .answers
        .iter()
        .flat_map(|(a, n)| {
            let (name, from) = a.split_once('@').unwrap_or((a, ""));
            std::iter::repeat_n((name.to_owned(), from.to_owned()), *n)
        })
        .collect()
}

per_family! {
    /// DNS-style request/response over an unconnected UDP socket: answered by the pods, and
    /// every reply appears to come from the service address as the client wrote it (recvmsg4,
    /// recvmsg6: `[::ffff:10.96.0.53]:53` on an AF_INET6 socket), not the pod.
    fn unconnected_udp_replies_come_from_the_service_address(via: Via) {
        let (topology, _agent, _dir) = setup(via, &[2, 3]);
        let tally = run(&topology, via, "udp-peer", 200);
        assert_eq!(tally.answered(), 200, "{tally:?}");
        let seen = answers(&tally);
        assert!(seen.iter().all(|(_, from)| *from == target(via)), "replies show the VIP: {tally:?}");
        assert!(
            seen.iter().any(|(n, _)| n == "pod-2") && seen.iter().any(|(n, _)| n == "pod-3"),
            "both pods serve: {tally:?}"
        );
    }
}

per_family! {
    /// A connected UDP socket: getpeername() shows the service address (getpeername4/6).
    fn connected_udp_getpeername_shows_the_service_address(via: Via) {
        let (topology, _agent, _dir) = setup(via, &[2]);
        let tally = run(&topology, via, "udp-connected", 20);
        assert_eq!(tally.answers.get(&format!("pod-2@{}", target(via))), Some(&20), "{tally:?}");
    }
}

per_family! {
    /// TCP: getpeername() shows the service address too, as with kube-proxy's DNAT.
    fn tcp_getpeername_shows_the_service_address(via: Via) {
        let (topology, _agent, _dir) = setup(via, &[3]);
        let tally = run(&topology, via, "tcp-peer", 20);
        assert_eq!(tally.answers.get(&format!("pod-3@{}", target(via))), Some(&20), "{tally:?}");
    }
}

per_family! {
    /// One unconnected socket keeps one backend across sendmsg calls (not a fresh pick per
    /// datagram): with two backends, 30 datagrams from one socket all reach the same pod, which
    /// a per-datagram pick would do with probability 2^-29.
    fn unconnected_udp_keeps_one_backend_per_socket(via: Via) {
        let (topology, _agent, _dir) = setup(via, &[2, 3]);
        for _ in 0..3 {
            let tally = run(&topology, via, "udp-sticky", 30);
            assert_eq!(tally.answered(), 30, "{tally:?}");
            let pods: std::collections::BTreeSet<String> = answers(&tally).into_iter().map(|(n, _)| n).collect();
            assert_eq!(pods.len(), 1, "one socket, one backend: {tally:?}");
        }
    }
}

per_family! {
    /// No endpoint: a UDP send to the service fails at once with ECONNREFUSED, like TCP's
    /// connect.
    fn udp_without_endpoints_is_refused(via: Via) {
        let (topology, _agent, _dir) = setup(via, &[]);
        let udp = run(&topology, via, "udp", 3);
        assert_eq!(udp.errors.get("refused"), Some(&3), "{udp:?}");
        let tcp = run(&topology, via, "tcp", 3);
        assert_eq!(tcp.errors.get("refused"), Some(&3), "{tcp:?}");
    }
}

per_family! {
    /// A connected UDP socket to a backend that leaves the service is destroyed (in the client's
    /// network namespace), so the client sees an error instead of talking to the old pod for as
    /// long as it keeps the socket; a new socket reaches the remaining backend. The old pod
    /// keeps answering here, so without the destroy the socket would go on working.
    fn udp_sockets_to_a_removed_backend_are_destroyed(via: Via) {
        let (topology, mut agent, dir) = setup(via, &[2]);
        std::thread::scope(|s| {
            let held = s.spawn(|| {
                let args = ["udp-hold", &target(via), "6"];
                probe(PROBE.as_ref(), &topology.client.ns, Some(&topology.cgroup), &args).unwrap()
            });
            std::thread::sleep(Duration::from_millis(800));
            write_endpoints(&dir, via, &[3]);
            agent.wait_for_log("destroyed UDP sockets", WAIT).unwrap();
            let held = held.join().unwrap();
            assert_eq!(held.answered(), 0, "the socket to the removed backend was destroyed: {held:?}");
            assert_eq!(held.errors.len(), 1, "{held:?}");
        });
        let fresh = run(&topology, via, "udp-connected", 5);
        assert_eq!(fresh.answers.get(&format!("pod-3@{}", target(via))), Some(&5), "{fresh:?}");
    }
}

/// Defect 7: a frontend with two scopes (an externalIP under `externalTrafficPolicy: Local`)
/// whose endpoints are all on another node serves nothing from outside (its external scope is
/// empty) yet serves this node (its internal scope has both pods). An unconnected UDP socket
/// here keeps one backend across datagrams, as it does for a ClusterIP: the check that the
/// kept backend's frontend still serves reads the socket path's scope, not the external one
/// (which made every datagram pick afresh: 30 datagrams hit one pod with probability 2^-29).
#[test]
fn unconnected_udp_keeps_one_backend_at_an_etp_local_frontend_without_local_endpoints() {
    const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 53);
    let (topology, dir) = topology();
    let svc = service("dns").cluster_ip(&VIP.to_string()).external_ip(&EXTERNAL_IP.to_string());
    let svc = dns_ports(svc.external_traffic_policy("Local")).build();
    let eps = slice("dns", "a")
        .named_port("dns", 5353, "UDP")
        .named_port("dns-tcp", 5353, "TCP")
        .endpoint_on(&POD_2.to_string(), "node-2")
        .endpoint_on(&POD_3.to_string(), "node-2")
        .build();
    dir.put(&svc, [&eps]);
    let agent = dir.start_agent(AGENT, &topology.node, &topology.cgroup, "node-1", &[]);
    agent.wait_for_count(VIP, PORT, Some(2), WAIT).unwrap();
    agent.wait_for_count(EXTERNAL_IP, PORT, Some(0), WAIT).expect("no local endpoint: the external scope is empty");
    let target = format!("{EXTERNAL_IP}:{PORT}");
    for _ in 0..3 {
        let tally =
            probe(PROBE.as_ref(), &topology.client.ns, Some(&topology.cgroup), &["udp-sticky", &target, "30", "500"])
                .unwrap();
        assert_eq!(tally.answered(), 30, "the node reaches the remote endpoints: {tally:?}");
        let pods: std::collections::BTreeSet<String> = answers(&tally).into_iter().map(|(n, _)| n).collect();
        assert_eq!(pods.len(), 1, "one socket, one backend: {tally:?}");
    }
}
