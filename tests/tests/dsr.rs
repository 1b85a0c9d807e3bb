//! Direct server return from outside, on the two-node topology of `docs/testing.md`: both
//! agents run with `--lb-mode` `dsr`, `hybrid` or `snat`; the external client reaches node-1's
//! nodePort. Pods answer with their name and the client address they see. A packet socket on
//! node-1's interface toward the node network counts the replies of node-2's pods that pass
//! node-1 (taps see every packet before the TC programs do).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::Agent,
    cluster::{CLIENT_IP, Manifests, NODE_IPS, SEED_NODE_PORT, TARGET_PORT, seed_node_port},
    netns::Netns,
    pod::PEER,
    topology::TwoNodes,
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const WAIT: Duration = Duration::from_secs(10);
const PODS: [[&str; 2]; 2] = [["pod-a {peer}", "pod-b {peer}"], ["pod-c {peer}", "pod-d {peer}"]];

/// Both nodes with an agent each, in one `--lb-mode`, serving the seed service on pods of
/// both nodes.
struct Cluster {
    agents: Vec<Agent>,
    topology: TwoNodes,
    manifests: Manifests,
}

impl Cluster {
    fn new(mode: &str) -> Self {
        let manifests = Manifests::with_nodes("proxy-dsr");
        let topology = TwoNodes::new([&PODS[0], &PODS[1]], TARGET_PORT, true).expect("building the two nodes");
        let flags = ["--lb-mode", mode];
        let agents =
            topology.nodes.iter().map(|n| manifests.start_agent(AGENT, &n.ns, &n.cgroup, &n.name, &flags)).collect();
        let endpoints: Vec<(Ipv4Addr, &str)> = topology
            .nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (p.ip, if n.name == "node-1" { "node-1" } else { "node-2" })))
            .collect();
        manifests.service(&seed_node_port().build(), &endpoints);
        let cluster = Self { agents, topology, manifests };
        cluster.wait_until_served();
        cluster
    }

    /// Waits until a connection to node-1's nodePort is answered.
    fn wait_until_served(&self) {
        let deadline = Instant::now() + WAIT;
        while self.in_client(|| greeting(node_port()).ok()).is_none() {
            assert!(Instant::now() < deadline, "node-1's nodePort never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` in a thread inside the external client's namespace.
    fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.topology.client, f)
    }

    /// The name of a pod of node-2 (remote to node-1) in an answer.
    fn remote(answer: &str) -> bool {
        PODS[1].iter().any(|p| answer.starts_with(&p.replace(PEER, "")))
    }
}

fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("entering the namespace");
            f()
        })
        .join()
        .expect("the thread does not panic")
    })
}

fn node_port() -> SocketAddr {
    SocketAddr::from((NODE_IPS[0], SEED_NODE_PORT))
}

/// A connection to `to` and the first line it answers.
fn greeting(to: SocketAddr) -> std::io::Result<(TcpStream, String)> {
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok((stream, line.trim().to_owned()))
}

/// Counts the packets that arrive on `dev` of `ns` from node-2's pods (source address in
/// 10.244.2.0/24), with an `AF_PACKET` socket, until dropped.
struct ReplyCounter {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ReplyCounter {
    fn start(ns: &Netns, dev: &str) -> Self {
        let (count, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ns, dev) = (ns.path().to_owned(), dev.to_owned());
        let thread = {
            let (count, stop) = (count.clone(), stop.clone());
            std::thread::spawn(move || {
                let file = std::fs::File::open(&ns).expect("the node's namespace");
                // SAFETY: setns on a valid namespace fd affects only this thread.
                assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) }, 0);
                let socket = packet_socket(&dev);
                ready_tx.send(()).expect("the test waits");
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: `buf` is valid for its length; the socket is ours.
                    let n = unsafe { libc::recv(socket, buf.as_mut_ptr().cast(), buf.len(), 0) };
                    // An IPv4 frame (EtherType at 12) whose source (26..30) is in 10.244.2.0/24.
                    if n >= 34 && buf[12..14] == [0x08, 0x00] && buf[26..29] == [10, 244, 2] {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // SAFETY: closing our own descriptor once.
                unsafe { libc::close(socket) };
            })
        };
        ready_rx.recv_timeout(WAIT).expect("the packet socket opened");
        Self { count, stop, thread: Some(thread) }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for ReplyCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An `AF_PACKET` socket receiving every incoming frame of `dev`, with a short read timeout
/// (so the counter's thread sees its stop flag).
fn packet_socket(dev: &str) -> i32 {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation.
    let socket = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
    assert!(socket >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(dev).expect("an interface name");
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0, "no interface {dev}");
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = ifindex as i32;
    let size = size_of::<libc::sockaddr_ll>() as u32;
    // SAFETY: `address` is a valid sockaddr_ll of `size` bytes.
    let rc = unsafe { libc::bind(socket, (&raw const address).cast(), size) };
    assert_eq!(rc, 0, "binding to {dev}: {}", std::io::Error::last_os_error());
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: a valid timeval for SO_RCVTIMEO.
    let rc = unsafe {
        libc::setsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(rc, 0);
    socket
}

/// Opens `n` connections to node-1's nodePort from the client and returns what each answered.
fn answers(cluster: &Cluster, n: usize) -> Vec<String> {
    cluster.in_client(|| {
        (0..n)
            .map(|i| greeting(node_port()).map(|(_, a)| a).unwrap_or_else(|e| panic!("connection {i} failed: {e}")))
            .collect()
    })
}

/// Issue 16: with `--lb-mode dsr` every connection through a nodePort is answered, every pod,
/// local or remote, sees the client's own address, and no reply of node-2's pods passes
/// node-1. The same count under `snat` sees those replies: the counter does count them.
#[test]
fn dsr_answers_every_connection_with_the_client_address_and_replies_skip_node_1() {
    let want = |a: &str| a.ends_with(&format!(" {CLIENT_IP}"));
    let snat_replies = {
        let cluster = Cluster::new("snat");
        let counter = ReplyCounter::start(&cluster.topology.nodes[0].ns, "eth0");
        let got = answers(&cluster, 30);
        assert!(got.iter().any(|a| Cluster::remote(a)), "some flows reach node-2: {got:?}");
        assert!(got.iter().filter(|a| Cluster::remote(a)).all(|a| !want(a)), "SNAT hides the client: {got:?}");
        counter.count()
    };
    assert!(snat_replies > 0, "under snat, node-2's replies pass node-1 and are counted");

    let cluster = Cluster::new("dsr");
    let counter = ReplyCounter::start(&cluster.topology.nodes[0].ns, "eth0");
    let got = answers(&cluster, 40);
    let remote = got.iter().filter(|a| Cluster::remote(a)).count();
    assert!(remote > 0 && remote < got.len(), "flows reach pods of both nodes: {got:?}");
    assert!(got.iter().all(|a| want(a)), "every pod sees the client's address {CLIENT_IP}: {got:?}");
    let udp = udp_peer_of_remote_pod(&cluster);
    assert!(want(&udp), "over UDP too (every datagram carries the option): {udp}");
    assert_eq!(counter.count(), 0, "no reply of node-2's pods passes node-1");
}

/// Sends `bytes` through one connection to a pod of node-2 and reads the echo back; returns
/// the time it took. Connections to node-1's pods are skipped (closed) until one lands on
/// node-2.
fn stream_to_remote_pod(cluster: &Cluster, bytes: usize) -> Duration {
    cluster.in_client(|| {
        let stream = (0..50)
            .find_map(|_| {
                let (stream, answer) = greeting(node_port()).expect("a connection");
                Cluster::remote(&answer).then_some(stream)
            })
            .expect("one of 50 connections lands on node-2");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("a timeout");
        let started = Instant::now();
        let writer = {
            let mut stream = stream.try_clone().expect("a second handle");
            std::thread::spawn(move || {
                let chunk = vec![0x5a_u8; 64 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len());
                    stream.write_all(&chunk[..n]).expect("writing the stream");
                    left -= n;
                }
            })
        };
        let mut buf = vec![0u8; 64 * 1024];
        let (mut read, mut reader) = (0, &stream);
        while read < bytes {
            let n = reader.read(&mut buf).expect("reading the echo");
            assert!(n > 0, "the stream ended after {read} of {bytes} bytes");
            assert!(buf[..n].iter().all(|b| *b == 0x5a), "the echo is what was sent");
            read += n;
        }
        writer.join().expect("the writer finished");
        started.elapsed()
    })
}

/// Issue 16: a long TCP stream through DSR to a pod on the other node arrives whole both ways
/// (only the SYN carries the 8-byte option, so full-sized segments still fit the path).
#[test]
fn a_long_tcp_stream_through_dsr_arrives_whole() {
    let cluster = Cluster::new("dsr");
    let counter = ReplyCounter::start(&cluster.topology.nodes[0].ns, "eth0");
    stream_to_remote_pod(&cluster, 64 << 20);
    assert_eq!(counter.count(), 0, "the echo came straight from node-2");
}

/// The client address a pod of node-2 sees for UDP through node-1's nodePort.
fn udp_peer_of_remote_pod(cluster: &Cluster) -> String {
    cluster.in_client(|| {
        for port in 47_000..47_100 {
            let socket = UdpSocket::bind((CLIENT_IP, port)).expect("a UDP socket");
            socket.set_read_timeout(Some(Duration::from_secs(2))).expect("a timeout");
            socket.send_to(b"hello\n", node_port()).expect("sending");
            let mut buf = [0u8; 256];
            let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no UDP answer for port {port}: {e}"));
            let answer = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
            if Cluster::remote(&answer) {
                return answer;
            }
        }
        panic!("no UDP flow of 100 landed on node-2")
    })
}

/// Issue 16: `hybrid` is DSR for TCP and SNAT for UDP: a remote pod sees the client over TCP
/// and node-1 over UDP (whose answer still arrives, through node-1); `inspect services` shows
/// the mode of each frontend, read from the real pins, and `explain` says it.
#[test]
fn hybrid_keeps_the_client_for_tcp_and_snats_udp() {
    let cluster = Cluster::new("hybrid");
    let services = cluster.agents[0].cli_json(AGENT, &["inspect", "services"]);
    let mode = |protocol: &str| {
        let frontends = services.as_array().expect("a list of frontends");
        let node_port = |f: &&serde_json::Value| {
            f["address"] == NODE_IPS[0].to_string() && f["port"] == SEED_NODE_PORT && f["protocol"] == protocol
        };
        frontends.iter().find(node_port).map(|f| f["lb_mode"].clone()).expect("the nodePort is listed")
    };
    assert_eq!((mode("TCP"), mode("UDP")), ("dsr".into(), "snat".into()));
    let to = format!("{}:{SEED_NODE_PORT}", NODE_IPS[0]);
    let answer = cluster.agents[0].cli_json(AGENT, &["explain", "--from", &CLIENT_IP.to_string(), "--to", &to]);
    let paths = answer["paths"].as_array().expect("paths");
    assert!(paths.iter().any(|p| p["lb_mode"] == "dsr"), "explain says dsr for traffic from outside: {answer:#}");

    let tcp = answers(&cluster, 20);
    assert!(tcp.iter().all(|a| a.ends_with(&format!(" {CLIENT_IP}"))), "TCP keeps the client: {tcp:?}");
    let udp = udp_peer_of_remote_pod(&cluster);
    assert!(udp.ends_with(&format!(" {}", NODE_IPS[0])), "UDP is SNATed to node-1: {udp}");
}

/// What a remote pod (one of node-2) answers, over up to 50 connections, once `done` accepts
/// it; panics after [`WAIT`] (the agents take a Node change within a sync).
fn remote_answer_once(cluster: &Cluster, done: impl Fn(&str) -> bool + Sync) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = cluster.in_client(|| {
            (0..50).find_map(|_| greeting(node_port()).ok().map(|(_, a)| a).filter(|a| Cluster::remote(a)))
        });
        match answer {
            Some(answer) if done(&answer) => return answer,
            last => assert!(Instant::now() < deadline, "no remote answer accepted within {WAIT:?}; last {last:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 16: node-2's Node without the DSR annotation (as when its node runs no agent): every
/// connection through node-1's nodePort is still answered, node-2's pods see node-1's SNAT
/// address (and their replies pass node-1), node-1's own pods the client; with the annotation
/// back, node-2's pods see the client again.
#[test]
fn flows_to_a_node_without_the_dsr_annotation_are_snated_and_answered() {
    let cluster = Cluster::new("dsr");
    let (client, node_1) = (format!(" {CLIENT_IP}"), format!(" {}", NODE_IPS[0]));
    cluster.manifests.put_nodes_taking_dsr(&[true, false]);
    remote_answer_once(&cluster, |a| a.ends_with(&node_1));
    let counter = ReplyCounter::start(&cluster.topology.nodes[0].ns, "eth0");
    let got = answers(&cluster, 40);
    let (remote, local): (Vec<&String>, Vec<&String>) = got.iter().partition(|a| Cluster::remote(a));
    assert!(!remote.is_empty() && !local.is_empty(), "flows reach pods of both nodes: {got:?}");
    assert!(remote.iter().all(|a| a.ends_with(&node_1)), "node-2's pods see node-1's SNAT address: {got:?}");
    assert!(local.iter().all(|a| a.ends_with(&client)), "node-1's pods see the client: {got:?}");
    assert!(counter.count() > 0, "node-2's replies come back through node-1");
    let services = cluster.agents[0].cli_json(AGENT, &["inspect", "services"]);
    let node_port = services
        .as_array()
        .expect("a list of frontends")
        .iter()
        .find(|f| f["address"] == NODE_IPS[0].to_string() && f["port"] == SEED_NODE_PORT && f["protocol"] == "TCP");
    let backends = node_port.expect("the nodePort is listed")["scopes"][0]["backends"].as_array().cloned();
    let modes: Vec<(bool, String)> = backends
        .expect("its backends")
        .iter()
        .map(|b| (b["endpoint"].as_str().is_some_and(|e| e.starts_with("10.244.2.")), b["lb_mode"].to_string()))
        .collect();
    assert!(modes.iter().any(|(remote, _)| *remote), "node-2's pods are listed: {modes:?}");
    assert!(modes.iter().all(|(remote, mode)| mode == if *remote { "\"snat\"" } else { "\"dsr\"" }), "{modes:?}");

    cluster.manifests.put_nodes_taking_dsr(&[true, true]);
    remote_answer_once(&cluster, |a| a.ends_with(&client));
    let got = answers(&cluster, 40);
    assert!(got.iter().all(|a| a.ends_with(&client)), "the annotation back: every pod sees the client: {got:?}");
}
