//! The conformance suite: the rows of `docs/behaviours.md` (the upstream Kubernetes e2e tests
//! of the service datapath) that no earlier suite proves, one test per row, named
//! `e2e_NN_<what>` after it. `cargo xtask conformance` runs these together with the row tests of
//! the other suites, as `proxy_tests::conformance::ROWS` lists them, and writes `CONFORMANCE.md`.
//!
//! Every test builds the two-node topology of `docs/testing.md` in network namespaces (node-1 172.18.0.2 and
//! node-2 172.18.0.3 with their pods, an external client 172.18.0.100; the traffic-distribution
//! rows add nodes, 172.18.0.4 and on, to have upstream's zones), runs one agent inside
//! each node's namespace on a manifest directory the test writes, and makes real connections:
//! from client pods and node processes inside the node's cgroup (the socket path), and from the
//! external client (the TC path). Everything is removed on drop, also when a test fails.
//!
//! Where upstream's harness depends on a controller (the `yes*` rows), the test writes what
//! that controller would, and its doc comment says so. Where a test is statistical, its comment
//! gives the chance that a correct datapath fails it; every such bound is below 1e-5.
//! Tests marked `#[ignore]` prove a behaviour the datapath lacks today (a missing feature or a
//! known bug); the reason names what is missing, and `cargo xtask conformance` runs them anyway,
//! so the table shows the real state.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_common::{
    addr,
    conntrack::{CT_F_CLOSING, CT_TIMEOUT_CLOSE_WAIT_S, CT_TIMEOUT_CLOSING_S, CtKey, CtValue, expired, timeout_s},
    proto::{SCTP, TCP, UDP},
    service::{ServiceKey, ServiceValue},
};
use proxy_tests::{
    agent::Agent,
    cgroup::Cgroup,
    client::{Tally, http_get, probe},
    cluster::{CLIENT_IP, Family, Manifests, NODE_IPS, POOL_SIZE, Pool, node_ip, node_ip6, vip},
    conformance::{self, Outcome, QUICK_ENV, REPRODUCIBLE_ROWS, ROWS, Reproducible, Verdict},
    fixtures::{SliceBuilder, service, slice, yaml},
    netns::Netns,
    pod::PodServer,
    topology::{Node, Nodes, Pod},
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
/// Bound for the agents to program a change (generous: the machine is shared).
const WAIT: Duration = Duration::from_secs(10);
/// The ClusterIP of most tests' service.
const VIP: Ipv4Addr = vip(40);

// ---------------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------------

/// Whether `cargo xtask conformance --quick` asked for short waits.
fn quick() -> bool {
    std::env::var_os(QUICK_ENV).is_some()
}

/// Who connects: a node's client pod, a node's own processes (hostNetwork), a pod of a node
/// (e.g. an endpoint reaching its own service), all inside that node's cgroup, or the external
/// client.
#[derive(Clone, Copy, Debug)]
enum Who {
    Pod(usize),
    Host(usize),
    PodOf(usize, usize),
    Outside,
}

/// The nodes (two unless a test needs more), each with its agent, and the manifest directory they
/// read. Fields drop in order: the agents first, the namespaces next, the directory last.
struct Cluster<const N: usize = 2> {
    agents: Vec<Agent>,
    topology: Nodes<N>,
    manifests: Manifests,
}

impl<const N: usize> Cluster<N> {
    /// Builds the topology with pods `pods[i]` on node i+1 (each answering its name on TCP and
    /// UDP port 80) and starts every node's agent.
    fn new(pods: [&[&str]; N]) -> Self {
        Self::zoned(pods, [""; N])
    }

    /// The same, with node i+1 labelled in `zones[i]`.
    fn zoned(pods: [&[&str]; N], zones: [&str; N]) -> Self {
        let manifests = Manifests::zoned("proxy-conformance", &zones);
        let topology = Nodes::new(pods, 80, true).expect("building the multi-node topology");
        let agents =
            topology.nodes.iter().map(|n| manifests.start_agent(AGENT, &n.ns, &n.cgroup, &n.name, &[])).collect();
        Self { agents, topology, manifests }
    }

    fn node(&self, node: usize) -> &Node {
        &self.topology.nodes[node]
    }

    fn pod(&self, node: usize, pod: usize) -> &Pod {
        &self.topology.nodes[node].pods[pod]
    }

    fn pod_ip(&self, node: usize, pod: usize) -> String {
        self.pod(node, pod).ip.to_string()
    }

    /// The namespace and cgroup a client of `from` runs in.
    fn client(&self, from: Who) -> (&Netns, Option<&Cgroup>) {
        match from {
            Who::Pod(n) => (&self.node(n).client.ns, Some(&self.node(n).cgroup)),
            Who::Host(n) => (&self.node(n).ns, Some(&self.node(n).cgroup)),
            Who::PodOf(n, p) => (&self.pod(n, p).ns, Some(&self.node(n).cgroup)),
            Who::Outside => (&self.topology.client, None),
        }
    }

    /// `count` attempts of probe `mode` (tcp, udp, tcp-big, udp-big ...) from `from` to `to`.
    fn probe(&self, from: Who, mode: &str, to: &str, count: usize) -> Tally {
        let (ns, cgroup) = self.client(from);
        probe(PROBE.as_ref(), ns, cgroup, &[mode, to, &count.to_string(), "500"]).expect("running the probe")
    }

    /// Waits until node `node`'s agent has `count` backends for the frontend (`None`: absent).
    fn wait(&self, node: usize, address: impl Into<IpAddr>, port: u16, proto: u8, count: Option<u16>) {
        wait_for(&self.agents[node], address, port, proto, count);
    }

    /// [`Self::wait`] on every agent.
    fn wait_both(&self, address: impl Into<IpAddr>, port: u16, proto: u8, count: Option<u16>) {
        let address = address.into();
        for node in 0..N {
            self.wait(node, address, port, proto, count);
        }
    }

    /// Waits until each node's agent has `count` backends for its own address on `node_port`.
    fn wait_node_ports(&self, node_port: u16, proto: u8, count: Option<u16>) {
        for node in 0..N {
            self.wait(node, node_ip(node), node_port, proto, count);
        }
    }
}

/// The master entry of a frontend in `agent`'s maps.
fn master(agent: &Agent, address: impl Into<IpAddr>, port: u16, proto: u8) -> Option<ServiceValue> {
    let key = ServiceKey::master(addr::from_ip(address), port, proto);
    agent.maps().expect("opening the pinned maps").services().find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// Waits until `agent` has `count` backends for the frontend (`None`: no frontend).
fn wait_for(agent: &Agent, address: impl Into<IpAddr>, port: u16, proto: u8, count: Option<u16>) {
    let address = address.into();
    let deadline = Instant::now() + WAIT;
    loop {
        let now = master(agent, address, port, proto).map(|m| m.count);
        if now == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} (protocol {proto}) has {now:?} backends, want {count:?} after {WAIT:?}:\n{}",
            SocketAddr::new(address, port),
            agent.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn at(address: impl std::fmt::Display, port: u16) -> String {
    format!("{address}:{port}")
}

/// Asserts that all `count` attempts were answered, by exactly `names` (each at least once).
fn assert_served(tally: &Tally, count: usize, names: &[&str], what: &str) {
    assert_eq!(tally.answered(), count, "{what}: every attempt is answered: {tally:?}");
    let seen: BTreeSet<&str> = tally.answers.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(seen, want, "{what}: answered by exactly {want:?}: {tally:?}");
}

/// Asserts that no attempt was answered.
fn assert_unanswered(tally: &Tally, what: &str) {
    assert_eq!(tally.answered(), 0, "{what}: nothing answers: {tally:?}");
}

/// Asserts that every attempt was refused at once (ECONNREFUSED: kube-proxy's REJECT).
fn assert_refused(tally: &Tally, count: usize, what: &str) {
    assert_eq!(tally.errors.get("refused"), Some(&count), "{what}: every attempt is refused: {tally:?}");
}

/// The one backend that answered every attempt of `tally`.
fn sticky(tally: &Tally, count: usize, what: &str) -> String {
    assert_eq!(tally.answered(), count, "{what}: every attempt is answered: {tally:?}");
    assert_eq!(tally.answers.len(), 1, "{what}: every attempt reaches the same backend: {tally:?}");
    tally.answers.keys().next().expect("one answer").clone()
}

/// Sets a service's labels.
fn labelled(mut svc: Service, labels: &[(&str, &str)]) -> Service {
    let map: BTreeMap<String, String> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    svc.metadata.labels = (!map.is_empty()).then_some(map);
    svc
}

/// A service's spec, for the fields the builder does not set.
fn spec(svc: &mut Service) -> &mut k8s_openapi::api::core::v1::ServiceSpec {
    svc.spec.get_or_insert_with(Default::default)
}

/// Runs `f` on a thread that has entered `ns` (sockets it makes live there), and returns its result.
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("entering a test namespace");
            f()
        })
        .join()
        .expect("the thread in the namespace does not panic")
    })
}

// ---------------------------------------------------------------------------------------------
// The table itself (no privileges needed)
// ---------------------------------------------------------------------------------------------

/// The table has the 106 rows in order, 101 of them reproducible; every row without a passing
/// path says why; every test it names exists in its suite, and every `e2e_NN` test of this
/// suite is listed under row NN.
#[test]
fn the_row_table_names_real_tests() {
    assert_eq!(ROWS.len(), 106);
    for (i, row) in ROWS.iter().enumerate() {
        assert_eq!(usize::from(row.number), i + 1, "rows are in order");
        if !row.reproducible.counts() || row.tests.is_empty() {
            assert!(!row.gap.is_empty(), "row {} has no test: its gap must say why", row.number);
        }
    }
    assert_eq!(ROWS.iter().filter(|r| r.reproducible.counts()).count(), REPRODUCIBLE_ROWS);
    let suites = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    for (suite, tests) in conformance::suites() {
        let path = suites.join(format!("{suite}.rs"));
        let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for test in tests {
            // A case of a table of cases (`NAME::ipv4::mesh`) is named after its table's `fn NAME(`.
            let function = test.split("::").next().unwrap_or(test);
            assert!(source.contains(&format!("fn {function}(")), "{suite}::{test} is not a test of {}", path.display());
        }
    }
    let this = std::fs::read_to_string(suites.join("conformance.rs")).expect("reading this suite");
    for name in this.lines().filter_map(|l| l.trim().strip_prefix("fn e2e_")).filter_map(|l| l.split_once('(')) {
        let test = format!("conformance::e2e_{}", name.0);
        let digits = name.0.split('_').next().unwrap_or_default();
        let number: u8 = digits.parse().expect("e2e_NN_ names a row");
        let row = &ROWS[usize::from(number) - 1];
        assert!(row.tests.contains(&test.as_str()), "{test} is not listed under row {number}");
    }
}

/// `docs/behaviours.md` is the table's source: each of its rows has the same number, upstream
/// title, [Conformance] tag and reproducibility as the row of `ROWS`, so neither can drift.
#[test]
fn the_row_table_follows_docs_behaviours() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/behaviours.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // `| # | title | C | what | here |`, the only table rows that start with a number (no cell
    // holds a `|`; the C cell may be empty).
    let documented: Vec<Vec<&str>> = text
        .lines()
        .filter_map(|l| l.strip_prefix('|')?.strip_suffix('|'))
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
        .filter(|cells| cells[0].parse::<u8>().is_ok())
        .collect();
    assert_eq!(documented.len(), ROWS.len(), "{} lists every row", path.display());
    for (row, cells) in ROWS.iter().zip(&documented) {
        let [number, title, tag, _, here] = cells[..] else { panic!("row {}: five cells in {cells:?}", row.number) };
        assert_eq!(number, row.number.to_string(), "rows in the same order");
        assert_eq!(title, row.title, "row {}: the upstream title", row.number);
        assert_eq!(tag.starts_with('C'), row.conformance, "row {}: [Conformance]", row.number);
        let label = match row.reproducible {
            Reproducible::Yes => "yes",
            Reproducible::YesStar => "yes*",
            Reproducible::Partial => "partial",
            Reproducible::No => "no",
        };
        let documented_label = here.split(' ').next().unwrap_or_default();
        assert_eq!(documented_label, label, "row {}: reproducible here", row.number);
    }
}

/// libtest's report is read as `cargo xtask conformance` needs it: each test's result, a
/// failure's panic message, an ignored test's reason; rows are judged and counted from them.
#[test]
fn the_report_is_read_and_judged() {
    let report = "\nrunning 3 tests\ntest e2e_01_a ... ok\ntest e2e_02_b ... FAILED\n\
                  test e2e_03_c ... ignored, known bug: no flush\n\nfailures:\n\n---- e2e_02_b stdout ----\n\
                  some output\nthread 'e2e_02_b' panicked at tests/tests/x.rs:10:5:\n\
                  assertion `left == right` failed: every attempt is answered\n  left: 1\n right: 2\n\
                  note: run with `RUST_BACKTRACE=1`\n\n\nfailures:\n    e2e_02_b\n\n\
                  test result: FAILED. 1 passed; 1 failed; 1 ignored\n";
    let output = format!(
        "   Compiling proxy-tests\n     Running tests/other.rs (target/debug/deps/other-1)\n\nrunning 1 test\n\
         test e2e_01_a ... FAILED\n     Running tests/s.rs (target/debug/deps/s-2)\n{report}"
    );
    let reports = conformance::reports_by_suite(&output);
    assert_eq!(reports.keys().collect::<Vec<_>>(), ["other", "s"]);
    assert_eq!(reports["s"], report);
    let outcomes = conformance::parse_libtest(&reports["s"]);
    assert_eq!(outcomes["e2e_01_a"], Outcome::Passed);
    assert_eq!(
        outcomes["e2e_02_b"],
        Outcome::Failed("assertion `left == right` failed: every attempt is answered".into())
    );
    assert_eq!(outcomes["e2e_03_c"], Outcome::NotRun("ignored: known bug: no flush".into()));

    let source =
        "#[test]\n#[ignore = \"missing: the \\\"x\\\" feature\"]\nfn e2e_03_c() {}\n#[test]\nfn e2e_01_a() {}\n";
    assert_eq!(conformance::ignore_reason(source, "e2e_03_c").as_deref(), Some("missing: the \"x\" feature"));
    assert_eq!(conformance::ignore_reason(source, "e2e_01_a"), None);

    let keyed: BTreeMap<String, Outcome> = outcomes.into_iter().map(|(k, v)| (format!("s::{k}"), v)).collect();
    let row = |number, tests: &'static [&'static str], reproducible| conformance::Row {
        number,
        title: "t",
        conformance: false,
        reproducible,
        tests,
        gap: if tests.is_empty() { "needs X" } else { "" },
    };
    let partly = conformance::Row { gap: "needs Y", ..row(5, &["s::e2e_01_a"], Reproducible::Yes) };
    let judged = [
        row(1, &["s::e2e_01_a"], Reproducible::Yes),
        row(2, &["s::e2e_01_a", "s::e2e_02_b"], Reproducible::Yes),
        row(3, &[], Reproducible::YesStar),
        row(4, &[], Reproducible::No),
        partly,
    ]
    .map(|r| (r, conformance::judge(&r, &keyed, |t| (t == "s::e2e_02_b").then(|| "flaky".to_owned()))));
    assert_eq!(judged[0].1, Verdict::Pass);
    assert_eq!(
        judged[1].1,
        Verdict::Fail(
            "`s::e2e_02_b` failed (known: flaky; assertion `left == right` failed: every attempt is answered)".into()
        )
    );
    assert_eq!(judged[2].1, Verdict::Missing("needs X".into()));
    assert_eq!(judged[3].1, Verdict::NotApplicable("needs X".into()));
    assert_eq!(judged[4].1, Verdict::Missing("needs Y (what is proven passes: `s::e2e_01_a`)".into()));
    let table = conformance::render(&judged, "Run by a test.");
    assert!(
        table.contains("**1 of 101 pass** (1 fail, 2 miss a behaviour or a test; 1 rows need a cluster"),
        "{table}"
    );
    assert!(table.contains("| 1 | t |  | yes | pass | `s::e2e_01_a` |"), "{table}");
}

// ---------------------------------------------------------------------------------------------
// Services: ports, types, labels
// ---------------------------------------------------------------------------------------------

/// e2e row 2: two service ports whose named targetPorts resolve to different pods (`portname1`
/// is container port 100 of pod-1, `portname2` container port 101 of pod-2, so the EndpointSlice
/// controller writes one slice per port). Each service port reaches its own pod and port, and
/// follows its pods as they come and go: {} → {pod-1} → {pod-1, pod-2} → {pod-2} → {}.
#[test]
fn e2e_02_multiport_named_target_ports_on_different_pods() {
    let c = Cluster::new([&["pod-1"], &["pod-2"]]);
    let _ports = [
        PodServer::start(&c.pod(0, 0).ns, 100, "pod-1:100").expect("serving port 100"),
        PodServer::start(&c.pod(1, 0).ns, 101, "pod-2:101").expect("serving port 101"),
    ];
    let svc = service("multi")
        .cluster_ip(&VIP.to_string())
        .named_port("portname1", 80, "TCP")
        .named_port("portname2", 81, "TCP")
        .build();
    let pod1 = slice("multi", "a").named_port("portname1", 100, "TCP").endpoint_on(&c.pod_ip(0, 0), "node-1").build();
    let pod2 = slice("multi", "b").named_port("portname2", 101, "TCP").endpoint_on(&c.pod_ip(1, 0), "node-2").build();
    let steps: [(Vec<EndpointSlice>, Option<&str>, Option<&str>); 5] = [
        (vec![], None, None),
        (vec![pod1.clone()], Some("pod-1:100"), None),
        (vec![pod1, pod2.clone()], Some("pod-1:100"), Some("pod-2:101")),
        (vec![pod2], None, Some("pod-2:101")),
        (vec![], None, None),
    ];
    for (slices, port80, port81) in steps {
        c.manifests.put(&svc, &slices);
        for (port, want) in [(80, port80), (81, port81)] {
            c.wait_both(VIP, port, TCP, Some(u16::from(want.is_some())));
            for node in 0..2 {
                let tally = c.probe(Who::Pod(node), "tcp", &at(VIP, port), 10);
                match want {
                    Some(name) => assert_served(&tally, 10, &[name], &format!("node-{}'s pod → :{port}", node + 1)),
                    None => assert_refused(&tally, 10, &format!("node-{}'s pod → :{port} without endpoints", node + 1)),
                }
            }
        }
    }
}

/// The service `web` at VIP with `ports` (name, port, protocol), each targeting port 80 of pod-a
/// (node-1) and pod-b (node-2), written as one slice.
fn web(c: &Cluster, ports: &[(&str, i32, &str)]) -> (Service, EndpointSlice) {
    let svc = ports
        .iter()
        .fold(service("web").cluster_ip(&VIP.to_string()), |s, (name, port, proto)| s.named_port(name, *port, proto));
    let eps = ports.iter().fold(slice("web", "a"), |s, (name, _, proto)| s.named_port(name, 80, proto));
    let eps = eps.endpoint_on(&c.pod_ip(0, 0), "node-1").endpoint_on(&c.pod_ip(1, 0), "node-2").build();
    (svc.build(), eps)
}

/// e2e row 3: service ports added and removed live are programmed and removed: a UDP port and a
/// second TCP port are added next to TCP 80 and answer; TCP 80 is then removed and stops
/// answering while the other two keep working.
///
/// 40 attempts over two backends miss one with probability 2^-39.
#[test]
fn e2e_03_ports_added_and_removed_live() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    let both = ["pod-a", "pod-b"];
    let put = |ports: &[(&str, i32, &str)]| {
        let (svc, eps) = web(&c, ports);
        c.manifests.put(&svc, &[eps]);
    };
    put(&[("tcp", 80, "TCP")]);
    c.wait(0, VIP, 80, TCP, Some(2));
    assert_served(&c.probe(Who::Pod(0), "tcp", &at(VIP, 80), 40), 40, &both, "TCP 80");
    assert_eq!(master(&c.agents[0], VIP, 80, UDP), None, "no UDP port yet");
    assert_unanswered(&c.probe(Who::Pod(0), "udp", &at(VIP, 80), 3), "UDP 80 before it is added");

    put(&[("tcp", 80, "TCP"), ("udp", 80, "UDP"), ("tcp-81", 81, "TCP")]);
    c.wait(0, VIP, 80, UDP, Some(2));
    c.wait(0, VIP, 81, TCP, Some(2));
    assert_served(&c.probe(Who::Pod(0), "udp", &at(VIP, 80), 40), 40, &both, "the added UDP 80");
    assert_served(&c.probe(Who::Pod(0), "tcp", &at(VIP, 81), 40), 40, &both, "the added TCP 81");
    assert_served(&c.probe(Who::Pod(0), "tcp", &at(VIP, 80), 40), 40, &both, "TCP 80 meanwhile");

    put(&[("udp", 80, "UDP"), ("tcp-81", 81, "TCP")]);
    c.wait(0, VIP, 80, TCP, None);
    assert_unanswered(&c.probe(Who::Pod(0), "tcp", &at(VIP, 80), 3), "the removed TCP 80");
    assert_served(&c.probe(Who::Pod(0), "udp", &at(VIP, 80), 40), 40, &both, "UDP 80 after TCP 80 left");
    assert_served(&c.probe(Who::Pod(0), "tcp", &at(VIP, 81), 40), 40, &both, "TCP 81 after TCP 80 left");
}

/// e2e row 11 from a pod: an external IP that no node holds (172.18.5.10) is captured by the
/// socket path for pods, as kube-proxy's rules capture it, next to the ClusterIP. (The external
/// client's side is `nodeport::e2e_11_external_ip_and_load_balancer_ip`.)
#[test]
fn e2e_11_external_ip_from_a_pod() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    let external: Ipv4Addr = "172.18.5.10".parse().unwrap();
    let (mut svc, eps) = web(&c, &[("http", 80, "TCP")]);
    spec(&mut svc).external_ips = Some(vec![external.to_string()]);
    c.manifests.put(&svc, &[eps]);
    c.wait_both(external, 80, TCP, Some(2));
    for node in 0..2 {
        for target in [VIP, external] {
            let tally = c.probe(Who::Pod(node), "tcp", &at(target, 80), 40);
            assert_served(&tally, 40, &["pod-a", "pod-b"], &format!("node-{}'s pod → {target}", node + 1));
        }
    }
}

/// e2e row 12: a TCP ClusterIP service becomes a NodePort with TCP and UDP on the same port and
/// the same nodePort: both protocols answer on both nodes' addresses from outside, and UDP on
/// the ClusterIP from a pod.
#[test]
fn e2e_12_cluster_ip_to_node_port_tcp_and_udp_on_one_port() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    let both = ["pod-a", "pod-b"];
    let (svc, eps) = web(&c, &[("tcp", 53, "TCP")]);
    c.manifests.put(&svc, &[eps]);
    c.wait(0, VIP, 53, TCP, Some(2));
    assert_served(&c.probe(Who::Pod(0), "tcp", &at(VIP, 53), 40), 40, &both, "the ClusterIP service");

    let svc = service("web")
        .cluster_ip(&VIP.to_string())
        .named_port("tcp", 53, "TCP")
        .node_port(30053)
        .named_port("udp", 53, "UDP")
        .node_port(30053)
        .build();
    let (_, eps) = web(&c, &[("tcp", 53, "TCP"), ("udp", 53, "UDP")]);
    c.manifests.put(&svc, &[eps]);
    for proto in [TCP, UDP] {
        c.wait_node_ports(30053, proto, Some(2));
    }
    for ip in NODE_IPS {
        for mode in ["tcp", "udp"] {
            let tally = c.probe(Who::Outside, mode, &at(ip, 30053), 40);
            assert_served(&tally, 40, &both, &format!("{mode} from outside → {ip}:30053"));
        }
    }
    assert_served(&c.probe(Who::Pod(0), "udp", &at(VIP, 53), 40), 40, &both, "UDP on the ClusterIP");
}

/// An ExternalName service `web`: no ClusterIP, a DNS name. `canary` is written with it, so
/// once the canary is programmed the agent has read the ExternalName service too.
fn external_name(c: &Cluster) {
    let mut svc = service("web").named_port("http", 80, "TCP").build();
    let spec = spec(&mut svc);
    spec.type_ = Some("ExternalName".into());
    spec.external_name = Some("web.example.com".into());
    let canary = service("canary").cluster_ip("10.96.0.99").port(80).build();
    c.manifests.write("web.yaml", &(yaml(&svc) + &yaml(&canary)));
    c.wait_both(vip(99), 80, TCP, Some(0));
    for agent in &c.agents {
        let frontends: Vec<_> = agent.maps().unwrap().services().filter(|(k, _)| k.port == 80).collect();
        assert_eq!(frontends.len(), 1, "an ExternalName service has no frontend, only the canary: {frontends:?}");
    }
}

/// e2e row 13: an ExternalName service changed live to ClusterIP gets its VIP, which serves.
#[test]
fn e2e_13_external_name_to_cluster_ip() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    external_name(&c);
    let (svc, eps) = web(&c, &[("http", 80, "TCP")]);
    c.manifests.put(&svc, &[eps]);
    c.wait_both(VIP, 80, TCP, Some(2));
    for node in 0..2 {
        let tally = c.probe(Who::Pod(node), "tcp", &at(VIP, 80), 40);
        assert_served(&tally, 40, &["pod-a", "pod-b"], &format!("node-{}'s pod → the new VIP", node + 1));
    }
}

/// e2e row 14: an ExternalName service changed live to NodePort gets its VIP and its nodePort
/// on every node, from pods and from outside.
#[test]
fn e2e_14_external_name_to_node_port() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    external_name(&c);
    let svc = service("web").cluster_ip(&VIP.to_string()).named_port("http", 80, "TCP").node_port(30014).build();
    let (_, eps) = web(&c, &[("http", 80, "TCP")]);
    c.manifests.put(&svc, &[eps]);
    c.wait_both(VIP, 80, TCP, Some(2));
    c.wait_node_ports(30014, TCP, Some(2));
    let both = ["pod-a", "pod-b"];
    assert_served(&c.probe(Who::Pod(0), "tcp", &at(VIP, 80), 40), 40, &both, "a pod → the VIP");
    for ip in NODE_IPS {
        assert_served(&c.probe(Who::Pod(0), "tcp", &at(ip, 30014), 40), 40, &both, &format!("a pod → {ip}"));
        assert_served(&c.probe(Who::Outside, "tcp", &at(ip, 30014), 40), 40, &both, &format!("outside → {ip}"));
    }
}

/// e2e row 17: a deleted NodePort service releases its nodePort: no frontend is left, and a
/// process on the node can bind the port (TCP and UDP) and is reached there from outside, with
/// nothing of ours in the way. kube-proxy checks that no LISTEN socket holds the port; this
/// datapath holds none to begin with.
#[test]
fn e2e_17_node_ports_released_on_delete() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    let svc = service("web")
        .cluster_ip(&VIP.to_string())
        .named_port("tcp", 80, "TCP")
        .node_port(30017)
        .named_port("udp", 80, "UDP")
        .node_port(30017)
        .build();
    let (_, eps) = web(&c, &[("tcp", 80, "TCP"), ("udp", 80, "UDP")]);
    c.manifests.put(&svc, &[eps]);
    for proto in [TCP, UDP] {
        c.wait_node_ports(30017, proto, Some(2));
    }
    for mode in ["tcp", "udp"] {
        assert_served(&c.probe(Who::Outside, mode, &at(NODE_IPS[0], 30017), 40), 40, &["pod-a", "pod-b"], mode);
    }

    c.manifests.delete("web");
    for proto in [TCP, UDP] {
        c.wait_node_ports(30017, proto, None);
        c.wait_both(VIP, 80, proto, None);
    }
    let _host = PodServer::start(&c.node(0).ns, 30017, "node-1-host").expect("the nodePort is free to bind on node-1");
    for mode in ["tcp", "udp"] {
        let tally = c.probe(Who::Outside, mode, &at(NODE_IPS[0], 30017), 10);
        assert_served(&tally, 10, &["node-1-host"], &format!("{mode}: node-1's own server on the released port"));
    }
    assert_refused(&c.probe(Who::Outside, "tcp", &at(NODE_IPS[1], 30017), 3), 3, "node-2's released port");
}

/// e2e row 27: a service labelled `service.kubernetes.io/service-proxy-name` belongs to another
/// proxy and is ignored; removing the label live makes it served, adding it back removes it.
/// An unlabelled service is served throughout.
#[test]
fn e2e_27_service_proxy_name_label_toggled_live() {
    label_toggled_live("service.kubernetes.io/service-proxy-name", "foo-bar");
}

/// e2e row 28: the same with `service.kubernetes.io/headless`.
#[test]
fn e2e_28_headless_label_toggled_live() {
    label_toggled_live("service.kubernetes.io/headless", "");
}

fn label_toggled_live(label: &str, value: &str) {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    let (svc, eps) = web(&c, &[("http", 80, "TCP")]);
    let plain_vip = vip(41);
    let plain = service("plain").cluster_ip(&plain_vip.to_string()).named_port("http", 80, "TCP").build();
    let mut plain_eps = eps.clone();
    plain_eps.metadata.name = Some("plain-a".into());
    plain_eps.metadata.labels = Some(BTreeMap::from([("kubernetes.io/service-name".to_owned(), "plain".to_owned())]));
    c.manifests.put(&plain, &[plain_eps]);
    let both = ["pod-a", "pod-b"];
    for (on, round) in [(true, "labelled"), (false, "label removed"), (true, "label added back")] {
        let labels: &[(&str, &str)] = if on { &[(label, value)] } else { &[] };
        c.manifests.put(&labelled(svc.clone(), labels), std::slice::from_ref(&eps));
        c.wait_both(VIP, 80, TCP, if on { None } else { Some(2) });
        c.wait_both(plain_vip, 80, TCP, Some(2));
        for node in 0..2 {
            let who = format!("{round}: node-{}'s pod", node + 1);
            if on {
                assert_unanswered(&c.probe(Who::Pod(node), "tcp", &at(VIP, 80), 3), &who);
            } else {
                assert_served(&c.probe(Who::Pod(node), "tcp", &at(VIP, 80), 40), 40, &both, &who);
            }
            assert_served(&c.probe(Who::Pod(node), "tcp", &at(plain_vip, 80), 40), 40, &both, &format!("{who}, plain"));
        }
    }
}

/// e2e row 40: TCP and UDP on the same port of one service both serve; removing one protocol's
/// port stops that protocol only, and either can go on its own.
#[test]
fn e2e_40_same_port_tcp_and_udp_each_removable() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    let both = ["pod-a", "pod-b"];
    let put = |ports: &[(&str, i32, &str)]| {
        let (svc, eps) = web(&c, ports);
        c.manifests.put(&svc, &[eps]);
    };
    put(&[("tcp", 80, "TCP"), ("udp", 80, "UDP")]);
    c.wait_both(VIP, 80, TCP, Some(2));
    c.wait_both(VIP, 80, UDP, Some(2));
    for node in 0..2 {
        for mode in ["tcp", "udp"] {
            let tally = c.probe(Who::Pod(node), mode, &at(VIP, 80), 40);
            assert_served(&tally, 40, &both, &format!("{mode} from node-{}", node + 1));
        }
    }
    put(&[("tcp", 80, "TCP")]);
    c.wait_both(VIP, 80, UDP, None);
    assert_unanswered(&c.probe(Who::Pod(0), "udp", &at(VIP, 80), 3), "UDP after its port was removed");
    assert_served(&c.probe(Who::Pod(0), "tcp", &at(VIP, 80), 40), 40, &both, "TCP after UDP left");

    put(&[("udp", 80, "UDP")]);
    c.wait_both(VIP, 80, TCP, None);
    c.wait_both(VIP, 80, UDP, Some(2));
    assert_unanswered(&c.probe(Who::Pod(0), "tcp", &at(VIP, 80), 3), "TCP after its port was removed");
    assert_served(&c.probe(Who::Pod(0), "udp", &at(VIP, 80), 40), 40, &both, "UDP after TCP left");
}

/// e2e row 41: the same port for TCP and UDP on a LoadBalancer service that has no load
/// balancer yet (no ingress IP): its ClusterIP serves both protocols, from pods on both nodes.
#[test]
fn e2e_41_same_port_tcp_and_udp_on_a_load_balancer_cluster_ip() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    let mut svc = service("web")
        .cluster_ip(&VIP.to_string())
        .named_port("tcp", 80, "TCP")
        .node_port(30041)
        .named_port("udp", 80, "UDP")
        .node_port(30041)
        .build();
    spec(&mut svc).type_ = Some("LoadBalancer".into());
    let (_, eps) = web(&c, &[("tcp", 80, "TCP"), ("udp", 80, "UDP")]);
    c.manifests.put(&svc, &[eps]);
    c.wait_both(VIP, 80, TCP, Some(2));
    c.wait_both(VIP, 80, UDP, Some(2));
    for node in 0..2 {
        for mode in ["tcp", "udp"] {
            let tally = c.probe(Who::Pod(node), mode, &at(VIP, 80), 40);
            assert_served(&tally, 40, &["pod-a", "pod-b"], &format!("{mode} from node-{}", node + 1));
        }
    }
}

/// e2e row 42: an SCTP service with an endpoint is programmed (its frontend is in the maps on
/// both nodes) without the kernel loading `sctp`: the agent never opens an SCTP socket. (On a
/// kernel without SCTP, as CI's may be, the module cannot appear at all; the frontend check
/// still holds.) A TCP port of the same service serves meanwhile.
#[test]
fn e2e_42_sctp_service_loads_no_module() {
    let sctp_loaded = || Path::new("/sys/module/sctp").exists();
    let before = sctp_loaded();
    let c = Cluster::new([&["pod-a"], &[]]);
    let svc =
        service("sctp").cluster_ip(&VIP.to_string()).named_port("sctp", 5060, "SCTP").named_port("tcp", 80, "TCP");
    let eps = slice("sctp", "a")
        .named_port("sctp", 5060, "SCTP")
        .named_port("tcp", 80, "TCP")
        .endpoint_on(&c.pod_ip(0, 0), "node-1")
        .build();
    c.manifests.put(&svc.build(), &[eps]);
    c.wait_both(VIP, 5060, SCTP, Some(1));
    c.wait_both(VIP, 80, TCP, Some(1));
    assert_served(&c.probe(Who::Pod(1), "tcp", &at(VIP, 80), 10), 10, &["pod-a"], "the TCP port");
    assert!(before || !sctp_loaded(), "programming an SCTP service made the kernel load the sctp module");
}

/// e2e row 44: a service reaching a port of a pod's sidecar (a restartable init container):
/// kubelet's part is only to run it, so the harness runs a second server in pod-a on 8080; the
/// service targets that port and reaches the sidecar, not the main container.
#[test]
fn e2e_44_sidecar_port() {
    sidecar(("", 8080), "");
}

/// e2e row 45: the same through a named targetPort: the EndpointSlice controller resolves the
/// name to the sidecar's container port (the harness writes the slice port `sidecar-http` =
/// 8080 as it would); the proxy matches the service port to it by name.
#[test]
fn e2e_45_named_sidecar_port() {
    sidecar(("sidecar-http", 8080), "sidecar-http");
}

fn sidecar((slice_port, number): (&str, i32), service_port: &str) {
    let c = Cluster::new([&["pod-a"], &[]]);
    let _sidecar = PodServer::start(&c.pod(0, 0).ns, 8080, "pod-a-sidecar").expect("starting the sidecar");
    let svc = service("web").cluster_ip(&VIP.to_string()).named_port(service_port, 80, "TCP").build();
    let eps = slice("web", "a").named_port(slice_port, number, "TCP").endpoint_on(&c.pod_ip(0, 0), "node-1").build();
    c.manifests.put(&svc, &[eps]);
    c.wait_both(VIP, 80, TCP, Some(1));
    for node in 0..2 {
        let tally = c.probe(Who::Pod(node), "tcp", &at(VIP, 80), 10);
        assert_served(&tally, 10, &["pod-a-sidecar"], &format!("node-{}'s pod → the sidecar", node + 1));
    }
}

/// e2e row 88 (CVE-2021-29923): a ClusterIP written with a leading zero, `10.96.0.011`, is
/// 10.96.0.11 (decimal, as Kubernetes parses it), never 10.96.0.9 (octal).
#[test]
fn e2e_88_leading_zero_cluster_ip_is_decimal() {
    let c = Cluster::new([&["pod-a"], &[]]);
    let svc = service("funny-ip").cluster_ip("10.96.0.011").named_port("http", 7180, "TCP").build();
    let eps = slice("funny-ip", "a").named_port("http", 80, "TCP").endpoint_on(&c.pod_ip(0, 0), "node-1").build();
    c.manifests.put(&svc, &[eps]);
    let (decimal, octal) = (Ipv4Addr::new(10, 96, 0, 11), Ipv4Addr::new(10, 96, 0, 9));
    c.wait_both(decimal, 7180, TCP, Some(1));
    for agent in &c.agents {
        assert_eq!(master(agent, octal, 7180, TCP), None, "never the octal reading");
    }
    assert_served(&c.probe(Who::Pod(0), "tcp", &at(decimal, 7180), 10), 10, &["pod-a"], "10.96.0.11");
    assert_unanswered(&c.probe(Who::Pod(0), "tcp", &at(octal, 7180), 3), "10.96.0.9");
}

// ---------------------------------------------------------------------------------------------
// Services: endpoint conditions, traffic policies, session affinity timeouts
// ---------------------------------------------------------------------------------------------

/// Stands in for the EndpointSlice controller (`podToEndpoint` in
/// pkg/controller/endpointslice): `ready` is publishNotReadyAddresses or the pod's readiness,
/// and never true for a terminating pod without publishNotReadyAddresses; `serving` is the
/// pod's readiness; `terminating` is a deletion in progress.
fn controller_endpoint(
    s: SliceBuilder,
    ip: &str,
    node: &str,
    publish_not_ready: bool,
    pod_ready: bool,
    terminating: bool,
) -> SliceBuilder {
    let ready = publish_not_ready || (pod_ready && !terminating);
    s.endpoint_with(ip, node, ready, pod_ready, terminating)
}

/// e2e row 18 (yes*: the harness writes the slices the EndpointSlice controller would, see
/// [`controller_endpoint`]): with publishNotReadyAddresses a pod that never becomes ready is
/// served; turning the flag off live cuts it (refused: no endpoint), on again restores it, and
/// it stays served while terminating.
#[test]
fn e2e_18_publish_not_ready_addresses_toggled_live() {
    let c = Cluster::new([&["pod-a"], &[]]);
    let put = |publish_not_ready: bool, terminating: bool| {
        let mut svc = service("web").cluster_ip(&VIP.to_string()).named_port("http", 80, "TCP").build();
        spec(&mut svc).publish_not_ready_addresses = Some(publish_not_ready);
        let eps = slice("web", "a").named_port("http", 80, "TCP");
        let eps = controller_endpoint(eps, &c.pod_ip(0, 0), "node-1", publish_not_ready, false, terminating);
        c.manifests.put(&svc, &[eps.build()]);
    };
    for (publish_not_ready, terminating, what) in [
        (true, false, "unready, publishNotReadyAddresses"),
        (false, false, "unready, the flag turned off"),
        (true, false, "unready, the flag back on"),
        (true, true, "unready and terminating, publishNotReadyAddresses"),
    ] {
        put(publish_not_ready, terminating);
        c.wait_both(VIP, 80, TCP, Some(u16::from(publish_not_ready)));
        for node in 0..2 {
            let tally = c.probe(Who::Pod(node), "tcp", &at(VIP, 80), 10);
            let who = format!("{what}: node-{}'s pod", node + 1);
            if publish_not_ready {
                assert_served(&tally, 10, &["pod-a"], &who);
            } else {
                assert_refused(&tally, 10, &who);
            }
        }
    }
}

/// e2e row 19 (yes*, as row 18): a terminating, unready pod of a publishNotReadyAddresses
/// service (the controller writes ready=true, serving=false, terminating=true) is still
/// reached through the ClusterIP and both nodes' nodePorts, from a pod and from outside.
#[test]
fn e2e_19_terminating_unready_endpoint_served_with_publish_not_ready_addresses() {
    let c = Cluster::new([&["pod-a"], &[]]);
    let mut svc = service("web").cluster_ip(&VIP.to_string()).named_port("http", 80, "TCP").node_port(30019).build();
    spec(&mut svc).publish_not_ready_addresses = Some(true);
    let eps = controller_endpoint(
        slice("web", "a").named_port("http", 80, "TCP"),
        &c.pod_ip(0, 0),
        "node-1",
        true,
        false,
        true,
    );
    c.manifests.put(&svc, &[eps.build()]);
    c.wait_both(VIP, 80, TCP, Some(1));
    c.wait_node_ports(30019, TCP, Some(1));
    let targets = [at(VIP, 80), at(NODE_IPS[0], 30019), at(NODE_IPS[1], 30019)];
    for to in &targets {
        assert_served(&c.probe(Who::Pod(1), "tcp", to, 10), 10, &["pod-a"], &format!("node-2's pod → {to}"));
    }
    for to in &targets[1..] {
        assert_served(&c.probe(Who::Outside, "tcp", to, 10), 10, &["pod-a"], &format!("outside → {to}"));
    }
}

/// The service `web` at VIP:80 with `internalTrafficPolicy: Local`, targeting `port` of one
/// endpoint on node-1.
fn internal_local(c: &Cluster, endpoint: &str, port: i32) {
    let svc =
        service("web").cluster_ip(&VIP.to_string()).named_port("http", 80, "TCP").internal_traffic_policy("Local");
    let eps = slice("web", "a").named_port("http", port, "TCP").endpoint_on(endpoint, "node-1").build();
    c.manifests.put(&svc.build(), &[eps]);
    c.wait(0, VIP, 80, TCP, Some(1));
    c.wait(1, VIP, 80, TCP, Some(0));
}

/// e2e row 32: `internalTrafficPolicy: Local` applies to hostNetwork clients (processes of the
/// node itself): node-1's reach its endpoint, node-2's, with no local endpoint, do not (this
/// datapath refuses at once where kube-proxy drops; e2e row 31 explains).
#[test]
fn e2e_32_internal_traffic_policy_local_host_network_clients() {
    let c = Cluster::new([&["pod-a"], &[]]);
    internal_local(&c, &c.pod_ip(0, 0), 80);
    assert_served(&c.probe(Who::Host(0), "tcp", &at(VIP, 80), 10), 10, &["pod-a"], "node-1 itself");
    assert_unanswered(&c.probe(Who::Host(1), "tcp", &at(VIP, 80), 3), "node-2 itself");
}

/// e2e row 33: `internalTrafficPolicy: Local` with a hostNetwork endpoint (node-1's own address,
/// port 8080): pods and processes of node-1 reach it, those of node-2 do not.
#[test]
fn e2e_33_internal_traffic_policy_local_host_network_backend() {
    let c = Cluster::new([&[], &[]]);
    let _backend = PodServer::start(&c.node(0).ns, 8080, "node-1-host").expect("serving on node-1 itself");
    internal_local(&c, &NODE_IPS[0].to_string(), 8080);
    for from in [Who::Pod(0), Who::Host(0)] {
        assert_served(&c.probe(from, "tcp", &at(VIP, 80), 10), 10, &["node-1-host"], &format!("{from:?}"));
    }
    for from in [Who::Pod(1), Who::Host(1)] {
        assert_unanswered(&c.probe(from, "tcp", &at(VIP, 80), 3), &format!("{from:?}"));
    }
}

/// The affinity timeout of rows 22 and 25: upstream's 125 s, or 4 s in quick mode.
fn affinity_timeout() -> u64 {
    if quick() { 4 } else { 125 }
}

/// ClientIP affinity with [`affinity_timeout`] seen from `from`: 15 connections in a row reach
/// one endpoint; after half the timeout idle, still that one (and the use refreshes it); after
/// the timeout idle, the next connection picks afresh. Against the pool, a fresh pick repeats
/// the old one with probability 1/100; three expiries in a row leave it sticky with 1e-6.
fn affinity_expires(c: &Cluster, from: Who, to: &str) {
    let timeout = affinity_timeout();
    let first = sticky(&c.probe(from, "tcp", to, 15), 15, "15 connections in a row");
    thread::sleep(Duration::from_secs(timeout / 2));
    assert_eq!(sticky(&c.probe(from, "tcp", to, 3), 3, "within the timeout"), first, "sticky at half the timeout");
    let mut picks = vec![first.clone()];
    for _ in 0..3 {
        thread::sleep(Duration::from_secs(timeout + 2));
        let pick = sticky(&c.probe(from, "tcp", to, 3), 3, "after the timeout");
        if pick != first {
            return;
        }
        picks.push(pick);
    }
    panic!("{to}: still sticky after three idle periods longer than the {timeout} s timeout: {picks:?}");
}

/// e2e row 22: ClientIP affinity on a ClusterIP with `timeoutSeconds: 125` (upstream's value;
/// 4 s with `--quick`): sticky, then expired after the timeout.
#[test]
fn e2e_22_affinity_timeout_125s_cluster_ip() {
    let c = Cluster::new([&[], &[]]);
    let _pool = Pool::on(&c.node(0).ns).expect("adding the endpoint pool");
    let timeout = affinity_timeout();
    let svc = service("web").cluster_ip(&VIP.to_string()).port(80).session_affinity(Some(timeout as i32)).build();
    c.manifests.put(&svc, [&Pool::slice("web").build()]);
    c.wait(0, VIP, 80, TCP, Some(POOL_SIZE.into()));
    let programmed = master(&c.agents[0], VIP, 80, TCP).expect("the ClusterIP's master entry");
    assert_eq!(u64::from(programmed.affinity_timeout), timeout, "the timeout is programmed: {programmed:?}");
    affinity_expires(&c, Who::Pod(0), &at(VIP, 80));
}

/// e2e row 25: the same through node-1's nodePort from outside (the TC path keys affinity by
/// the client's address).
#[test]
fn e2e_25_affinity_timeout_125s_node_port() {
    let c = Cluster::new([&[], &[]]);
    let _pool = Pool::on(&c.node(0).ns).expect("adding the endpoint pool");
    let timeout = affinity_timeout();
    let svc = service("web")
        .cluster_ip(&VIP.to_string())
        .port(80)
        .node_port(30025)
        .session_affinity(Some(timeout as i32))
        .build();
    c.manifests.put(&svc, [&Pool::slice("web").build()]);
    c.wait(0, NODE_IPS[0], 30025, TCP, Some(POOL_SIZE.into()));
    affinity_expires(&c, Who::Outside, &at(NODE_IPS[0], 30025));
}

/// e2e row 26: switching `sessionAffinity` live on a NodePort service, ClientIP → None →
/// ClientIP: sticky, spread over every endpoint, sticky again; through node-1's nodePort from
/// outside (the TC path, keyed by client address) and from a pod on node-1 (the socket path).
///
/// While None, 80 connections over four endpoints miss one with probability < 4·(3/4)^80.
#[test]
fn e2e_26_switch_affinity_node_port() {
    let c = Cluster::new([&["pod-a", "pod-b"], &["pod-c", "pod-d"]]);
    let all = ["pod-a", "pod-b", "pod-c", "pod-d"];
    let eps = [(0, 0), (0, 1), (1, 0), (1, 1)]
        .into_iter()
        .fold(slice("web", "a").port(80), |s, (n, p)| s.endpoint_on(&c.pod_ip(n, p), &c.node(n).name))
        .build();
    let put = |affinity: bool| {
        let svc = service("web").cluster_ip(&VIP.to_string()).port(80).node_port(30026);
        let svc = if affinity { svc.session_affinity(None) } else { svc.no_session_affinity() };
        c.manifests.put(&svc.build(), std::slice::from_ref(&eps));
        let deadline = Instant::now() + WAIT;
        while master(&c.agents[0], NODE_IPS[0], 30026, TCP)
            .is_none_or(|m| m.count != 4 || (m.flags & proxy_common::service::SVC_F_AFFINITY != 0) != affinity)
        {
            assert!(Instant::now() < deadline, "affinity {affinity} was not programmed:\n{}", c.agents[0].log());
            thread::sleep(Duration::from_millis(10));
        }
    };
    let to = at(NODE_IPS[0], 30026);
    for (affinity, round) in [(true, "ClientIP"), (false, "None"), (true, "ClientIP again")] {
        put(affinity);
        for from in [Who::Outside, Who::Pod(0)] {
            if affinity {
                sticky(&c.probe(from, "tcp", &to, 20), 20, &format!("{round}: {from:?}"));
            } else {
                assert_served(&c.probe(from, "tcp", &to, 80), 80, &all, &format!("{round}: {from:?}"));
            }
        }
    }
}

/// e2e row 43: a LoadBalancer whose only endpoint is on node-1 switches `externalTrafficPolicy`
/// Local → Cluster → Local. Under Local: node-1's healthCheckNodePort answers 200 and node-2's
/// 503; from outside, node-1's nodePort keeps the client's address and node-2's drops; node-2's
/// own processes still reach the endpoint through node-2's nodePort (kube-proxy's short-circuit
/// for traffic from the node). Under Cluster: no health check server on either node, and both
/// nodePorts serve from outside, SNATed to the node. Upstream uses three nodes (the client pod
/// on a third); the policy's effects on a node with and one without the endpoint are all here.
#[test]
fn e2e_43_node_port_and_health_check_follow_external_traffic_policy() {
    let c = Cluster::new([&["pod-a {peer}"], &[]]);
    let eps = slice("web", "a").port(80).endpoint_on(&c.pod_ip(0, 0), "node-1").build();
    let put = |policy: &str| {
        let svc = service("web")
            .cluster_ip(&VIP.to_string())
            .port(80)
            .node_port(30043)
            .load_balancer_ip("172.18.3.10")
            .health_check_node_port(32043)
            .external_traffic_policy(policy)
            .build();
        c.manifests.put(&svc, std::slice::from_ref(&eps));
    };
    let health = |node: usize, want: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let tally = c.probe(Who::Outside, "http", &at(NODE_IPS[node], 32043), 1);
            let seen = tally.answers.keys().next().map(|a| a.split(' ').next().unwrap_or_default().to_owned());
            let seen = seen.or_else(|| tally.errors.keys().next().cloned()).unwrap_or_default();
            if seen == want {
                return;
            }
            assert!(Instant::now() < deadline, "node-{}'s health check: want {want}, got {tally:?}", node + 1);
            thread::sleep(Duration::from_millis(50));
        }
    };
    for (policy, round) in [("Local", "Local"), ("Cluster", "Cluster"), ("Local", "Local again")] {
        put(policy);
        let local = policy == "Local";
        c.wait(0, NODE_IPS[0], 30043, TCP, Some(1));
        c.wait(1, NODE_IPS[1], 30043, TCP, Some(u16::from(!local)));
        if local {
            health(0, "200");
            health(1, "503");
            let tally = c.probe(Who::Outside, "tcp", &at(NODE_IPS[0], 30043), 10);
            assert_served(&tally, 10, &[&format!("pod-a {CLIENT_IP}")], &format!("{round}: outside → node-1"));
            let dropped = c.probe(Who::Outside, "tcp", &at(NODE_IPS[1], 30043), 3);
            assert_eq!(dropped.errors.get("timeout"), Some(&3), "{round}: node-2 drops: {dropped:?}");
            let own = c.probe(Who::Host(1), "tcp", &at(NODE_IPS[1], 30043), 10);
            assert_eq!(own.answered(), 10, "{round}: node-2's processes reach the endpoint: {own:?}");
        } else {
            health(0, "refused");
            health(1, "refused");
            for (node, ip) in NODE_IPS.iter().enumerate() {
                let tally = c.probe(Who::Outside, "tcp", &at(ip, 30043), 10);
                assert_served(&tally, 10, &[&format!("pod-a {ip}")], &format!("{round}: outside → node-{}", node + 1));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Conntrack rows: UDP flows across backend changes, invalid packets, half-closed flows
// ---------------------------------------------------------------------------------------------

/// The slots of a frontend's master, as endpoint addresses (`None`: no frontend).
fn backends(agent: &Agent, address: Ipv4Addr, port: u16, proto: u8) -> Option<BTreeSet<Ipv4Addr>> {
    let maps = agent.maps().ok()?;
    let services: BTreeMap<ServiceKey, ServiceValue> = maps.services().collect();
    let master_key = ServiceKey::master(addr::from_ip(address), port, proto);
    let count = services.get(&master_key)?.count;
    let all: BTreeMap<_, _> = maps.backends().collect();
    (1..=count)
        .map(|slot| {
            let id = services.get(&master_key.with_slot(slot))?.backend_id;
            all.get(&id).and_then(|b| addr::to_v4(&b.address)).map(Ipv4Addr::from)
        })
        .collect()
}

/// Waits until the frontend's slots name exactly `want`.
fn wait_backends(agent: &Agent, address: Ipv4Addr, port: u16, proto: u8, want: &[&str]) {
    let want: BTreeSet<Ipv4Addr> = want.iter().map(|a| a.parse().expect("an address")).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let now = backends(agent, address, port, proto);
        if now.as_ref() == Some(&want) {
            return;
        }
        assert!(Instant::now() < deadline, "{address}:{port} has backends {now:?}, want {want:?}:\n{}", agent.log());
        thread::sleep(Duration::from_millis(10));
    }
}

/// The UDP service `svc-udp` (port 80 → 80; `node_port` if any; `internalTrafficPolicy: Local`
/// if `local`) with the one endpoint `pod` of node `node`.
fn udp_service(c: &Cluster, node_port: Option<i32>, local: bool, (node, pod): (usize, usize)) {
    let mut svc = service("svc-udp").cluster_ip(&VIP.to_string()).named_port("udp", 80, "UDP");
    if let Some(node_port) = node_port {
        svc = svc.node_port(node_port);
    }
    if local {
        svc = svc.internal_traffic_policy("Local");
    }
    let name = &c.node(node).name;
    let eps = slice("svc-udp", "a").named_port("udp", 80, "UDP").endpoint_on(&c.pod_ip(node, pod), name).build();
    c.manifests.put(&svc.build(), &[eps]);
}

/// Rows 47 to 49: the UDP service's only endpoint, pod-1 on node `node`, is replaced by pod-2
/// (pod-1 loses its interface, as a deleted pod does). A client of `from` sending datagrams
/// from a new socket each time (as upstream's `nc -u` per try) reaches pod-1, then pod-2 as soon
/// as the agent has programmed the change: nothing of the old flow is left to blackhole it.
fn udp_server_pod_cycles(c: &Cluster, from: Who, node: usize, local: bool) {
    let client_node = match from {
        Who::Pod(n) | Who::Host(n) | Who::PodOf(n, _) => n,
        Who::Outside => 0,
    };
    udp_service(c, None, local, (node, 0));
    c.wait(client_node, VIP, 80, UDP, Some(1));
    assert_served(&c.probe(from, "udp", &at(VIP, 80), 10), 10, &["pod-1"], "before");
    udp_service(c, None, local, (node, 1));
    c.pod(node, 0).ns.ip(&["link", "set", "eth0", "down"]).expect("taking pod-1 away");
    wait_backends(&c.agents[client_node], VIP, 80, UDP, &[&c.pod_ip(node, 1)]);
    assert_served(&c.probe(from, "udp", &at(VIP, 80), 20), 20, &["pod-2"], "after the change");
}

/// e2e row 46: UDP from a client pod on node-1 to node-2's nodePort, from one source port
/// (12345) all along, as upstream's client does; the only endpoint, pod-1 on node-2, is
/// replaced by pod-2. The flow goes through node-2's TC path, whose conntrack entry names
/// pod-1: it must not be followed once pod-1 leaves, so the client reaches pod-2 within
/// upstream's minute (here 20 s, though a second would do).
#[test]
fn e2e_46_udp_node_port_server_pod_cycles() {
    let c = Cluster::new([&[], &["pod-1", "pod-2"]]);
    udp_service(&c, Some(30046), false, (1, 0));
    c.wait(1, NODE_IPS[1], 30046, UDP, Some(1));
    let answers = Mutex::new(Vec::<String>::new());
    let stop = AtomicBool::new(false);
    let seen_since = |since: usize, name: &str| answers.lock().unwrap()[since..].iter().any(|a| a == name);
    thread::scope(|s| {
        s.spawn(|| {
            c.node(0).client.ns.enter().expect("entering the client pod");
            let socket = UdpSocket::bind("0.0.0.0:12345").expect("binding source port 12345");
            socket.connect(SocketAddr::from((NODE_IPS[1], 30046))).expect("connecting the UDP socket");
            socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                let answer = match socket.send(b"hostname\n").and_then(|_| socket.recv(&mut buf)) {
                    Ok(n) => String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
                    Err(e) => format!("err {:?}", e.kind()),
                };
                answers.lock().unwrap().push(answer);
                thread::sleep(Duration::from_millis(200));
            }
        });
        let deadline = Instant::now() + WAIT;
        while !seen_since(0, "pod-1") {
            assert!(Instant::now() < deadline, "pod-1 never answered: {:?}", answers.lock().unwrap());
            thread::sleep(Duration::from_millis(50));
        }
        udp_service(&c, Some(30046), false, (1, 1));
        c.pod(1, 0).ns.ip(&["link", "set", "eth0", "down"]).expect("taking pod-1 away");
        wait_backends(&c.agents[1], NODE_IPS[1], 30046, UDP, &[&c.pod_ip(1, 1)]);
        let since = answers.lock().unwrap().len();
        let deadline = Instant::now() + Duration::from_secs(20);
        let reached = loop {
            if seen_since(since, "pod-2") {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            thread::sleep(Duration::from_millis(50));
        };
        stop.store(true, Ordering::Relaxed);
        let after: Vec<String> = answers.lock().unwrap()[since..].to_vec();
        assert!(reached, "the flow from port 12345 never reached pod-2 in 20 s: {after:?}");
    });
}

/// e2e row 47: the same for a ClusterIP, client pod on node-1, endpoints on node-2 (the socket
/// path: each socket is translated when it is used, so there is no flow state to go stale).
#[test]
fn e2e_47_udp_cluster_ip_server_pod_cycles() {
    let c = Cluster::new([&[], &["pod-1", "pod-2"]]);
    udp_server_pod_cycles(&c, Who::Pod(0), 1, false);
}

/// e2e row 48: the same with `internalTrafficPolicy: Local`, client and endpoints on node-1.
#[test]
fn e2e_48_udp_internal_traffic_policy_local_server_pod_cycles() {
    let c = Cluster::new([&["pod-1", "pod-2"], &[]]);
    udp_server_pod_cycles(&c, Who::Pod(0), 0, true);
}

/// e2e row 49: the same with a hostNetwork client (a process of node-1), endpoints on node-2.
#[test]
fn e2e_49_udp_host_network_client_server_pod_cycles() {
    let c = Cluster::new([&[], &["pod-1", "pod-2"]]);
    udp_server_pod_cycles(&c, Who::Host(0), 1, false);
}

/// e2e row 50: the only endpoint starts unready (in the slice, `ready: false`, as while an init
/// container runs): datagrams are refused at once; once it is ready, every datagram reaches it.
/// Nothing sent while it was unready leaves state that blackholes the traffic after.
#[test]
fn e2e_50_udp_initially_unready_endpoint_gets_ready() {
    let c = Cluster::new([&[], &["pod-1"]]);
    let svc = service("svc-udp").cluster_ip(&VIP.to_string()).named_port("udp", 80, "UDP").build();
    let eps = |ready: bool| {
        slice("svc-udp", "a").named_port("udp", 80, "UDP").endpoint_with(&c.pod_ip(1, 0), "node-2", ready, ready, false)
    };
    c.manifests.put(&svc, &[eps(false).build()]);
    c.wait(0, VIP, 80, UDP, Some(0));
    assert_refused(&c.probe(Who::Pod(0), "udp", &at(VIP, 80), 5), 5, "while the endpoint is unready");
    c.manifests.put(&svc, &[eps(true).build()]);
    c.wait(0, VIP, 80, UDP, Some(1));
    assert_served(&c.probe(Who::Pod(0), "udp", &at(VIP, 80), 20), 20, &["pod-1"], "once it is ready");
}

/// A TCP segment from `from` to `to` far outside the receiver's window (an ACK with a sequence
/// number half the sequence space away from `seq_hint`), with its TCP checksum; the kernel fills
/// in the IPv4 header's checksum and identification (raw(7), IP_HDRINCL).
fn out_of_window_segment(from: SocketAddrV4, to: SocketAddrV4, seq_hint: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&from.ip().octets());
    p[16..20].copy_from_slice(&to.ip().octets());
    p[20..22].copy_from_slice(&from.port().to_be_bytes());
    p[22..24].copy_from_slice(&to.port().to_be_bytes());
    p[24..28].copy_from_slice(&seq_hint.wrapping_add(0x8000_0000).to_be_bytes());
    p[28..32].copy_from_slice(&seq_hint.wrapping_mul(2_654_435_761).to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10; // ACK
    p[34..36].copy_from_slice(&1024u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&p[12..20]);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&p[20..40]);
    let mut sum: u32 = pseudo.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[36..38].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p
}

/// Upstream's boom-server: a TCP server in a pod that greets each client, sends it five
/// out-of-window segments through a raw socket, then echoes its lines. It counts the segments
/// it sent and the connection resets it saw: with a proxy that lets such a packet reach the
/// client untranslated, the client answers it with a reset and the connection dies.
struct Boom {
    injected: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Boom {
    fn start(ns: &Netns, port: u16) -> Self {
        let (listener, raw) = in_netns(ns, || {
            let listener = TcpListener::bind(("0.0.0.0", port)).expect("binding the boom server");
            // SAFETY: socket(2) with constant arguments; the fd is owned at once.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            assert!(fd >= 0, "a raw socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            (listener, Arc::new(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }))
        });
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let (injected, resets, stop) = (Arc::default(), Arc::default(), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (injected, resets, stop): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicBool>) =
                (Arc::clone(&injected), Arc::clone(&resets), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((conn, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let (raw, injected, resets) = (Arc::clone(&raw), Arc::clone(&injected), Arc::clone(&resets));
                    thread::spawn(move || boom(conn, &raw, &injected, &resets));
                }
            })
        };
        Self { injected, resets, stop, thread: Some(thread) }
    }
}

impl Drop for Boom {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One boom-server connection.
fn boom(conn: TcpStream, raw: &std::os::fd::OwnedFd, injected: &AtomicUsize, resets: &AtomicUsize) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let (Ok(SocketAddr::V4(local)), Ok(SocketAddr::V4(peer))) = (conn.local_addr(), conn.peer_addr()) else { return };
    let mut writer = match conn.try_clone() {
        Ok(writer) => writer,
        Err(_) => return,
    };
    if writer.write_all(b"boom\n").is_err() {
        return;
    }
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(peer.ip().octets()) },
        sin_zero: [0; 8],
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let seed = now.subsec_nanos() ^ (u32::from(peer.port()) << 16);
    for i in 0..5u32 {
        let segment = out_of_window_segment(local, peer, seed.wrapping_add(i.wrapping_mul(0x1000_0000)));
        // SAFETY: a valid fd, buffer and address of the stated lengths.
        let sent = unsafe {
            libc::sendto(
                raw.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent == segment.len() as isize {
            injected.fetch_add(1, Ordering::Relaxed);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
            Err(e) => {
                if e.kind() == ErrorKind::ConnectionReset {
                    resets.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

/// e2e row 51: packets of a connection that conntrack would call INVALID (out of the window)
/// must not reach the client untranslated, where it answers them with a reset that kills the
/// connection (the kube-proxy bug behind upstream's boom-server test). The boom server on
/// node-2 injects such segments into every connection; clients hold their connection for 3 s,
/// round-tripping every 100 ms: a pod on node-1 through the ClusterIP (socket path: the client
/// talks to the pod's address, nothing to translate) and the external client through node-1's
/// nodePort (TC path: the reply direction is translated whatever the sequence numbers).
#[test]
fn e2e_51_out_of_window_packet_causes_no_reset() {
    let c = Cluster::new([&[], &["pod-b"]]);
    let boom = Boom::start(&c.pod(1, 0).ns, 9000);
    let svc = service("boom-server").cluster_ip(&VIP.to_string()).named_port("tcp", 9000, "TCP").node_port(30051);
    let eps = slice("boom-server", "a").named_port("tcp", 9000, "TCP").endpoint_on(&c.pod_ip(1, 0), "node-2").build();
    c.manifests.put(&svc.build(), &[eps]);
    c.wait(0, VIP, 9000, TCP, Some(1));
    c.wait(0, NODE_IPS[0], 30051, TCP, Some(1));
    for (from, to) in [(Who::Pod(0), at(VIP, 9000)), (Who::Outside, at(NODE_IPS[0], 30051))] {
        let before = boom.injected.load(Ordering::Relaxed);
        let (ns, cgroup) = c.client(from);
        let held = probe(PROBE.as_ref(), ns, cgroup, &["hold", &to, "3"]).expect("running the probe");
        assert_eq!(held.answers.get("boom"), Some(&1), "{from:?} → {to}: the connection survived: {held:?}");
        let injected = boom.injected.load(Ordering::Relaxed) - before;
        assert!(injected >= 5, "{from:?} → {to}: the boom server injected {injected} segments");
        assert_eq!(boom.resets.load(Ordering::Relaxed), 0, "{from:?} → {to}: the boom server saw a reset");
    }
}

/// The first connection `listener` accepts within [`WAIT`].
fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).expect("a non-blocking listener");
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).expect("a blocking connection");
                return conn;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("no connection accepted within {WAIT:?}: {e}"),
        }
    }
}

/// The TC-path conntrack entries of the external client's flow from `client_port`, as node
/// `node`'s datapath holds them, with the clock they were read at (the programs' monotonic
/// clock): the original direction (keyed by the client's packet) and the reply direction
/// (rewritten to the client).
fn client_flow(c: &Cluster, node: usize, client_port: u16) -> (u64, Vec<(CtKey, CtValue)>) {
    let snapshot = proxy_agent::inspect::pins::read(c.agents[node].bpf_root()).expect("reading the pinned maps");
    let client = (addr::from_ip(CLIENT_IP), client_port);
    let entries = snapshot
        .conntrack
        .expect("the conntrack map is pinned")
        .into_iter()
        .filter(|(k, v)| (k.src, k.sport) == client || (v.dst, v.dport) == client)
        .collect();
    (snapshot.now_ns, entries)
}

/// e2e row 52: kube-proxy sets conntrack's CLOSE_WAIT timeout to an hour, so a half-closed TCP
/// connection keeps working in the direction still open. The external client connects through
/// node-1's nodePort (TC path, SNAT) to a server in pod-b on node-2, sends a line and
/// half-closes (shutdown(SHUT_WR)); the server reads the line and the FIN. Longer than the
/// 10 s closing timeout later, both conntrack entries of the flow are half-closed, not
/// closing, with about an hour left; and the open direction still carries 4 MB from the server
/// to the client, more than any window, so the client's ACKs must still be translated. Once the
/// server closes too, FINs went both ways and the flow is closing (10 s).
#[test]
fn e2e_52_half_closed_flow_lives_an_hour() {
    const PORT: u16 = 9052;
    const NODE_PORT: u16 = 30052;
    const BULK: usize = 4 << 20;
    const NS: u64 = 1_000_000_000;
    let c = Cluster::new([&[], &["pod-b"]]);
    let listener = in_netns(&c.pod(1, 0).ns, || TcpListener::bind(("0.0.0.0", PORT)).expect("binding the server"));
    let port = i32::from(PORT);
    let svc =
        service("close-wait").cluster_ip(&VIP.to_string()).named_port("tcp", port, "TCP").node_port(NODE_PORT.into());
    let eps = slice("close-wait", "a").named_port("tcp", port, "TCP").endpoint_on(&c.pod_ip(1, 0), "node-2").build();
    c.manifests.put(&svc.build(), &[eps]);
    c.wait(0, NODE_IPS[0], NODE_PORT, TCP, Some(1));

    let frontend = SocketAddr::from((NODE_IPS[0], NODE_PORT));
    let mut client = in_netns(&c.topology.client, || TcpStream::connect_timeout(&frontend, WAIT))
        .expect("connecting through node-1's nodePort");
    let mut server = accept(&listener);
    for conn in [&client, &server] {
        conn.set_read_timeout(Some(Duration::from_secs(5))).expect("a read timeout");
        conn.set_write_timeout(Some(WAIT)).expect("a write timeout");
    }
    client.write_all(b"request\n").expect("sending the request");
    client.shutdown(std::net::Shutdown::Write).expect("half-closing the client");
    let mut request = Vec::new();
    server.read_to_end(&mut request).expect("the server reads the request and the client's FIN");
    assert_eq!(request, b"request\n");

    let client_port = client.local_addr().expect("the client's address").port();
    thread::sleep(Duration::from_secs(CT_TIMEOUT_CLOSING_S + 3));
    let (now, entries) = client_flow(&c, 0, client_port);
    assert_eq!(entries.len(), 2, "the flow's original and reply entries: {entries:?}");
    for (key, value) in &entries {
        let idle = now.saturating_sub(value.last_seen_ns);
        let left = (timeout_s(value.flags, TCP) * NS).saturating_sub(idle);
        assert_eq!(value.flags & CT_F_CLOSING, 0, "{key:?} → {value:?}: half-closed is not closing");
        assert!(!expired(value.flags, TCP, value.last_seen_ns, now), "{key:?} → {value:?} expired after {idle} ns");
        assert!(
            left <= CT_TIMEOUT_CLOSE_WAIT_S * NS && left > (CT_TIMEOUT_CLOSE_WAIT_S - 60) * NS,
            "{key:?} → {value:?}: {left} ns left, want about {CT_TIMEOUT_CLOSE_WAIT_S} s"
        );
    }

    let received = thread::scope(|s| {
        s.spawn(move || {
            let _ = server.write_all(&vec![b'z'; BULK]);
        });
        let (mut received, mut buf) = (0, vec![0u8; 1 << 16]);
        loop {
            match client.read(&mut buf) {
                Ok(0) => break Ok(received),
                Ok(n) => received += n,
                Err(e) => break Err(format!("{e} after {received} bytes")),
            }
        }
    });
    assert_eq!(received, Ok(BULK), "the server's 4 MB reach the half-closed client, then its FIN");
    let (now, entries) = client_flow(&c, 0, client_port);
    assert_eq!(entries.len(), 2, "the flow's original and reply entries: {entries:?}");
    for (key, value) in &entries {
        assert_ne!(value.flags & CT_F_CLOSING, 0, "{key:?} → {value:?}: FINs went both ways, so the flow is closing");
        assert_eq!(timeout_s(value.flags, TCP), CT_TIMEOUT_CLOSING_S, "{key:?} → {value:?} at {now}");
    }
}

/// e2e row 53: kube-proxy's URLs on every node: `/healthz` on port 10256 answers 200 with
/// `lastUpdated`, and `/proxyMode` on the metrics port 10249 names the proxy's mode.
#[test]
fn e2e_53_proxy_mode_url() {
    let c = Cluster::new([&[], &[]]);
    for node in 0..2 {
        let ns = &c.node(node).ns;
        let (status, body) = http_get(ns, SocketAddr::from(([127, 0, 0, 1], 10256)), "/healthz").expect("GET /healthz");
        assert_eq!(status, 200, "node-{}: /healthz: {body}", node + 1);
        assert!(body.contains("lastUpdated"), "node-{}: /healthz: {body}", node + 1);
        let (status, body) =
            http_get(ns, SocketAddr::from(([127, 0, 0, 1], 10249)), "/proxyMode").expect("GET /proxyMode");
        assert_eq!(status, 200, "node-{}: /proxyMode: {body}", node + 1);
        assert!(!body.trim().is_empty(), "node-{}: /proxyMode names the mode", node + 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Networking granular checks
// ---------------------------------------------------------------------------------------------

/// The nodePorts of [`netcheck`]: HTTP, UDP.
const NETCHECK_NODE_PORTS: (u16, u16) = (30080, 30090);

/// Upstream's NetworkingTestConfig service `netcheck` at VIP: HTTP on 80 and UDP on 90, with
/// nodePorts 30080 and 30090, both targeting `target` of `endpoints` (address, node); waits
/// until both agents have programmed every frontend.
fn netcheck(c: &Cluster, endpoints: &[(String, &str)], target: i32, affinity: bool) {
    put_netcheck(c, "netcheck", VIP, NETCHECK_NODE_PORTS, endpoints, target, affinity);
}

fn put_netcheck(
    c: &Cluster,
    name: &str,
    vip: Ipv4Addr,
    (http, udp): (u16, u16),
    endpoints: &[(String, &str)],
    target: i32,
    affinity: bool,
) {
    let mut svc = service(name)
        .cluster_ip(&vip.to_string())
        .named_port("http", 80, "TCP")
        .node_port(http.into())
        .named_port("udp", 90, "UDP")
        .node_port(udp.into());
    if affinity {
        svc = svc.session_affinity(None);
    }
    let eps = slice(name, "a").named_port("http", target, "TCP").named_port("udp", target, "UDP");
    let eps = endpoints.iter().fold(eps, |s, (ip, node)| s.endpoint_on(ip, node)).build();
    c.manifests.put(&svc.build(), &[eps]);
    let count = Some(endpoints.len() as u16);
    c.wait_both(vip, 80, TCP, count);
    c.wait_both(vip, 90, UDP, count);
    c.wait_node_ports(http, TCP, count);
    c.wait_node_ports(udp, UDP, count);
}

/// pod-a on node-1 and pod-b on node-2, as endpoints.
fn pods_ab(c: &Cluster) -> Vec<(String, &'static str)> {
    vec![(c.pod_ip(0, 0), "node-1"), (c.pod_ip(1, 0), "node-2")]
}

/// The frontends of [`netcheck`] for `mode`'s protocol: the ClusterIP and every node's nodePort.
fn netcheck_targets(mode: &str) -> Vec<String> {
    let (port, node_port) =
        if mode.starts_with("udp") { (90, NETCHECK_NODE_PORTS.1) } else { (80, NETCHECK_NODE_PORTS.0) };
    [at(VIP, port)].into_iter().chain(NODE_IPS.iter().map(|ip| at(ip, node_port))).collect()
}

/// `from` reaches every one of `names` through the ClusterIP and every node's nodePort, 40
/// attempts each (two endpoints: one is missed with probability 2^-39).
fn reaches_all(c: &Cluster, from: Who, mode: &str, names: &[&str]) {
    for to in netcheck_targets(mode) {
        assert_served(&c.probe(from, mode, &to, 40), 40, names, &format!("{from:?} → {to} ({mode})"));
    }
}

/// e2e row 54: pod → ClusterIP and → each node's nodePort over TCP: every endpoint answers.
#[test]
fn e2e_54_pod_to_service_tcp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    reaches_all(&c, Who::Pod(0), "tcp", &["pod-a", "pod-b"]);
}

/// e2e row 55: the same over UDP.
#[test]
fn e2e_55_pod_to_service_udp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    reaches_all(&c, Who::Pod(0), "udp", &["pod-a", "pod-b"]);
}

/// e2e row 57: the node itself (a host-network process) → ClusterIP and nodePorts over TCP.
#[test]
fn e2e_57_node_to_service_tcp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    reaches_all(&c, Who::Host(0), "tcp", &["pod-a", "pod-b"]);
}

/// e2e row 58: the same over UDP.
#[test]
fn e2e_58_node_to_service_udp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    reaches_all(&c, Who::Host(0), "udp", &["pod-a", "pod-b"]);
}

/// e2e row 60: an endpoint (pod-a) → its own service over TCP: every endpoint answers, pod-a
/// itself included (hairpin), through the ClusterIP and both nodePorts.
#[test]
fn e2e_60_endpoint_to_own_service_tcp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    reaches_all(&c, Who::PodOf(0, 0), "tcp", &["pod-a", "pod-b"]);
}

/// e2e row 61: the same over UDP.
#[test]
fn e2e_61_endpoint_to_own_service_udp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    reaches_all(&c, Who::PodOf(0, 0), "udp", &["pod-a", "pod-b"]);
}

/// e2e row 63: two services with the same endpoints both serve them (from an endpoint, TCP
/// and UDP); deleting the first leaves the second whole, its ClusterIP and its nodePorts.
#[test]
fn e2e_63_services_sharing_endpoints() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    let both = ["pod-a", "pod-b"];
    netcheck(&c, &pods_ab(&c), 80, false);
    let (second, second_ports) = (vip(41), (30081, 30091));
    put_netcheck(&c, "netcheck-2", second, second_ports, &pods_ab(&c), 80, false);
    for vip in [VIP, second] {
        for (mode, port) in [("tcp", 80), ("udp", 90)] {
            assert_served(&c.probe(Who::PodOf(0, 0), mode, &at(vip, port), 40), 40, &both, &format!("{vip} {mode}"));
        }
    }
    c.manifests.delete("netcheck");
    c.wait_both(VIP, 80, TCP, None);
    c.wait_both(VIP, 90, UDP, None);
    assert_unanswered(&c.probe(Who::PodOf(0, 0), "tcp", &at(VIP, 80), 3), "the deleted service");
    let targets = [("tcp", at(second, 80)), ("udp", at(second, 90))]
        .into_iter()
        .chain(NODE_IPS.iter().flat_map(|ip| [("tcp", at(ip, second_ports.0)), ("udp", at(ip, second_ports.1))]));
    for (mode, to) in targets {
        assert_served(&c.probe(Who::PodOf(0, 0), mode, &to, 40), 40, &both, &format!("the second service: {to}"));
    }
}

/// e2e row 65: endpoints updated over UDP: pod-b leaves, and every datagram, to the ClusterIP
/// and to both nodePorts, reaches pod-a only.
#[test]
fn e2e_65_update_endpoints_udp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    reaches_all(&c, Who::Pod(0), "udp", &["pod-a", "pod-b"]);
    netcheck(&c, &pods_ab(&c)[..1], 80, false);
    reaches_all(&c, Who::Pod(0), "udp", &["pod-a"]);
}

/// Rows 66 and 68: the nodePorts serve from the node and from outside, then the service is
/// deleted and they stop answering.
fn update_node_port(mode: &str) {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    let node_ports: Vec<String> = netcheck_targets(mode).into_iter().skip(1).collect();
    for to in &node_ports {
        for from in [Who::Host(0), Who::Outside] {
            let tally = c.probe(from, mode, to, 40);
            assert_served(&tally, 40, &["pod-a", "pod-b"], &format!("{from:?} → {to}"));
        }
    }
    c.manifests.delete("netcheck");
    let (http, udp) = NETCHECK_NODE_PORTS;
    c.wait_node_ports(http, TCP, None);
    c.wait_node_ports(udp, UDP, None);
    for to in &node_ports {
        for from in [Who::Host(0), Who::Outside] {
            assert_unanswered(&c.probe(from, mode, to, 3), &format!("{from:?} → {to} after the delete"));
        }
    }
}

/// e2e row 66: the nodePort over TCP stops answering once its service is deleted.
#[test]
fn e2e_66_update_node_port_tcp() {
    update_node_port("tcp");
}

/// e2e row 67: a UDP nodePort, from the node itself, reaches every endpoint through both
/// nodes' addresses.
#[test]
fn e2e_67_udp_node_port_from_the_host() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    for to in netcheck_targets("udp").into_iter().skip(1) {
        assert_served(&c.probe(Who::Host(0), "udp", &to, 40), 40, &["pod-a", "pod-b"], &format!("node-1 → {to}"));
    }
}

/// e2e row 68: the same as row 66 over UDP.
#[test]
fn e2e_68_update_node_port_udp() {
    update_node_port("udp");
}

/// e2e row 70: ClientIP affinity over UDP: every datagram of a client pod, each from a new
/// socket, reaches one endpoint; a pod of the other node sticks to its own pick too.
///
/// 20 datagrams over four endpoints without affinity stay on one with probability 4^-19.
#[test]
fn e2e_70_client_ip_affinity_udp() {
    let c = Cluster::new([&["pod-a", "pod-b"], &["pod-c", "pod-d"]]);
    let endpoints = vec![
        (c.pod_ip(0, 0), "node-1"),
        (c.pod_ip(0, 1), "node-1"),
        (c.pod_ip(1, 0), "node-2"),
        (c.pod_ip(1, 1), "node-2"),
    ];
    netcheck(&c, &endpoints, 80, true);
    for node in 0..2 {
        sticky(&c.probe(Who::Pod(node), "udp", &at(VIP, 90), 20), 20, &format!("node-{}'s pod", node + 1));
    }
}

/// e2e row 71: a 2 KB request over TCP through the ClusterIP is echoed back whole, by every
/// endpoint.
#[test]
fn e2e_71_large_request_tcp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    assert_served(&c.probe(Who::Pod(0), "tcp-big", &at(VIP, 80), 40), 40, &["pod-a", "pod-b"], "2 KB over TCP");
}

/// e2e row 72: a large UDP datagram through the ClusterIP (3000 bytes: more than upstream's
/// 2 KB, so it is fragmented on the 1500-byte links) reaches every endpoint and is answered.
#[test]
fn e2e_72_large_request_udp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    assert_served(&c.probe(Who::Pod(0), "udp-big", &at(VIP, 90), 40), 40, &["pod-a", "pod-b"], "3000 B over UDP");
}

/// Both nodes serving on their own address, port 8080, as [`netcheck`]'s endpoints.
fn host_network_netcheck(c: &Cluster) -> [PodServer; 2] {
    let hosts = [
        PodServer::start(&c.node(0).ns, 8080, "node-1-host").expect("serving on node-1"),
        PodServer::start(&c.node(1).ns, 8080, "node-2-host").expect("serving on node-2"),
    ];
    netcheck(c, &[(NODE_IPS[0].to_string(), "node-1"), (NODE_IPS[1].to_string(), "node-2")], 8080, false);
    hosts
}

/// e2e row 73: rows 54-72 again with hostNetwork endpoints (each node's own address, port
/// 8080) and, as upstream, a hostNetwork client: node-1 reaches both nodes' servers through the
/// ClusterIP and its own nodePort, TCP and UDP, with large requests too; a pod as well. Through
/// the TC path too: node-1's processes reach node-2's nodePorts and the external client both
/// nodes' nodePorts, where every other connection picks the receiving node's own endpoint (the
/// node delivers it to itself, and its replies leave through the stack, where the egress
/// program translates them back): every attempt is answered, by both endpoints, and every UDP
/// answer comes from the nodePort address the client sent to (a TCP connection whose answers
/// came from another address would not get established at all).
#[test]
fn e2e_73_host_network_endpoints() {
    let c = Cluster::new([&[], &[]]);
    let _hosts = host_network_netcheck(&c);
    let hosts = ["node-1-host", "node-2-host"];
    let (http, udp) = NETCHECK_NODE_PORTS;
    for (mode, to) in [
        ("tcp", at(VIP, 80)),
        ("tcp", at(NODE_IPS[0], http)),
        ("udp", at(VIP, 90)),
        ("udp", at(NODE_IPS[0], udp)),
        ("tcp-big", at(VIP, 80)),
        ("udp-big", at(VIP, 90)),
    ] {
        for from in [Who::Host(0), Who::Pod(0)] {
            assert_served(&c.probe(from, mode, &to, 40), 40, &hosts, &format!("{from:?} → {to} ({mode})"));
        }
    }
    for (from, node) in [(Who::Host(0), 1), (Who::Outside, 1), (Who::Outside, 0)] {
        let (tcp, udp) = (at(NODE_IPS[node], http), at(NODE_IPS[node], udp));
        for mode in ["tcp", "tcp-big"] {
            assert_served(&c.probe(from, mode, &tcp, 40), 40, &hosts, &format!("{from:?} → {tcp} ({mode})"));
        }
        let from_node_port: Vec<String> = hosts.iter().map(|h| format!("{h}@{udp}")).collect();
        let from_node_port: Vec<&str> = from_node_port.iter().map(String::as_str).collect();
        let what = format!("{from:?} → {udp} (udp)");
        assert_served(&c.probe(from, "udp-peer", &udp, 40), 40, &from_node_port, &what);
    }
}

// ---------------------------------------------------------------------------------------------
// EndpointSlices written by hand or mirrored
// ---------------------------------------------------------------------------------------------

/// The selector-less service of upstream's EndpointSlice tests: ports `port80` (80) and
/// `port81` (81), its slices written by hand.
fn custom_endpoints_service() -> Service {
    service("example-custom-endpoints")
        .cluster_ip(&VIP.to_string())
        .named_port("port80", 80, "TCP")
        .named_port("port81", 81, "TCP")
        .build()
}

/// A hand-written slice as upstream writes it: one endpoint with only `ready: true` (no
/// nodeName, no other condition), one named port, and a `managed-by` label of its own.
fn custom_slice(suffix: &str, ip: &str, port: (&str, i32), managed_by: &str) -> EndpointSlice {
    let mut eps = slice("example-custom-endpoints", suffix).named_port(port.0, port.1, "TCP").endpoint(ip).build();
    for endpoint in &mut eps.endpoints {
        endpoint.node_name = None;
        endpoint.conditions =
            Some(k8s_openapi::api::discovery::v1::EndpointConditions { ready: Some(true), ..Default::default() });
    }
    let labels = eps.metadata.labels.get_or_insert_with(Default::default);
    labels.insert("endpointslice.kubernetes.io/managed-by".into(), managed_by.into());
    eps
}

/// Rows 75 and 77: one pod serving 8090 and 9090; `port80` of the service reaches 8090,
/// `port81` 9090, through slices written by `managed_by`.
fn one_ip_two_slices(managed_by: &str) {
    let c = Cluster::new([&["pod-a"], &[]]);
    let pod = &c.pod(0, 0).ns;
    let _ports = [
        PodServer::start(pod, 8090, "pod-a:8090").expect("serving 8090"),
        PodServer::start(pod, 9090, "pod-a:9090").expect("serving 9090"),
    ];
    let ip = c.pod_ip(0, 0);
    let slices =
        [custom_slice("1", &ip, ("port80", 8090), managed_by), custom_slice("2", &ip, ("port81", 9090), managed_by)];
    c.manifests.put(&custom_endpoints_service(), &slices);
    c.wait_both(VIP, 80, TCP, Some(1));
    c.wait_both(VIP, 81, TCP, Some(1));
    for node in 0..2 {
        for (port, want) in [(80, "pod-a:8090"), (81, "pod-a:9090")] {
            let tally = c.probe(Who::Pod(node), "tcp", &at(VIP, port), 10);
            assert_served(&tally, 10, &[want], &format!("node-{}'s pod → :{port}", node + 1));
        }
    }
}

/// e2e row 75: a selector-less service whose ports are in separate hand-written slices, both
/// naming the same pod: each service port reaches its own port of that pod.
#[test]
fn e2e_75_one_ip_ports_in_separate_slices() {
    one_ip_two_slices("e2e-test");
}

/// e2e row 76: a selector-less service whose ports are in separate hand-written slices naming
/// different pods (both on 8090): `port80` reaches pod-a only, `port81` pod-b only.
#[test]
fn e2e_76_endpoint_ips_in_separate_slices() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    let _ports = [
        PodServer::start(&c.pod(0, 0).ns, 8090, "pod-a:8090").expect("serving 8090 in pod-a"),
        PodServer::start(&c.pod(1, 0).ns, 8090, "pod-b:8090").expect("serving 8090 in pod-b"),
    ];
    let slices = [
        custom_slice("1", &c.pod_ip(0, 0), ("port80", 8090), "e2e-test"),
        custom_slice("2", &c.pod_ip(1, 0), ("port81", 8090), "e2e-test"),
    ];
    c.manifests.put(&custom_endpoints_service(), &slices);
    c.wait_both(VIP, 80, TCP, Some(1));
    c.wait_both(VIP, 81, TCP, Some(1));
    for node in 0..2 {
        for (port, want) in [(80, "pod-a:8090"), (81, "pod-b:8090")] {
            let tally = c.probe(Who::Pod(node), "tcp", &at(VIP, port), 10);
            assert_served(&tally, 10, &[want], &format!("node-{}'s pod → :{port}", node + 1));
        }
    }
}

/// e2e row 77 (yes*: the harness writes what the EndpointSlice mirroring controller makes of a
/// custom Endpoints object with two subsets, the same IP and different ports: one slice per
/// subset, labelled as mirrored): both service ports reach their port of the pod.
#[test]
fn e2e_77_mirrored_slices_same_ip() {
    one_ip_two_slices("endpointslicemirroring-controller.k8s.io");
}

// ---------------------------------------------------------------------------------------------
// Traffic distribution (topology-aware routing)
// ---------------------------------------------------------------------------------------------

/// Stands in for the EndpointSlice controller's hints for a service's `trafficDistribution`
/// (pkg/controller/endpointslice, the `trafficdist` heuristics): with PreferClose and
/// PreferSameZone every endpoint is hinted for its node's zone, with PreferSameNode for its node
/// too. Writes the service `web` (VIP:80) with one ready endpoint per `(node, pod)` of `servers`,
/// node i+1 being in `zones[i]`.
fn distribute<const N: usize>(c: &Cluster<N>, distribution: &str, zones: [&str; N], servers: &[(usize, usize)]) {
    let svc = service("web").cluster_ip(&VIP.to_string()).port(80).traffic_distribution(distribution).build();
    let eps = servers.iter().fold(slice("web", "a").port(80), |eps, &(node, pod)| {
        let name = c.node(node).name.as_str();
        let eps = eps.endpoint_on(&c.pod_ip(node, pod), name).for_zones(&[zones[node]]);
        if distribution == "PreferSameNode" { eps.for_nodes(&[name]) } else { eps }
    });
    c.manifests.put(&svc, &[eps.build()]);
}

/// For each `(node, servers)`: once that node's agent has programmed exactly those servers for
/// the ClusterIP, 40 connections from the node's client pod are answered by exactly them (with
/// at most three servers, one is missed with probability below 3·(2/3)^40 < 1e-6).
fn assert_distribution<const N: usize>(c: &Cluster<N>, expect: &[(usize, &[(usize, usize)])], what: &str) {
    for &(node, servers) in expect {
        let ips: Vec<String> = servers.iter().map(|&(n, p)| c.pod_ip(n, p)).collect();
        wait_backends(&c.agents[node], VIP, 80, TCP, &ips.iter().map(String::as_str).collect::<Vec<_>>());
        let names: Vec<&str> = servers.iter().map(|&(n, p)| c.pod(n, p).name.as_str()).collect();
        let tally = c.probe(Who::Pod(node), "tcp", &at(VIP, 80), 40);
        assert_served(&tally, 40, &names, &format!("{what}: node-{}'s client", node + 1));
    }
}

/// Upstream's zones for rows 78 and 80: one node in each of three zones.
const THREE_ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// Rows 78 and 80 (upstream's `allocateClientsAndServers`): servers on node-1 (zone-a) and
/// node-2 (zone-b), a client on every node. node-1's and node-2's clients reach only the server
/// of their zone; node-3's, with none in zone-c, reaches both.
fn same_zone(distribution: &str) -> Cluster<3> {
    let c = Cluster::zoned([&["server-1"], &["server-2"], &[]], THREE_ZONES);
    distribute(&c, distribution, THREE_ZONES, &[(0, 0), (1, 0)]);
    assert_distribution(&c, &[(0, &[(0, 0)]), (1, &[(1, 0)]), (2, &[(0, 0), (1, 0)])], distribution);
    c
}

/// Upstream's zones for rows 79, 81 and 82: two nodes in zone-a, two in zone-b, one in zone-c.
const FIVE_NODES: [&str; 5] = ["zone-a", "zone-a", "zone-b", "zone-b", "zone-c"];

/// Rows 79, 81 and 82 (upstream's `allocateMultiNodeClientsAndServers`, on the five of its
/// six nodes that hold a pod): in zone-a a server and a client on node-1 and on node-2; in
/// zone-b a client on node-3 and a server on node-4; in zone-c only a client, on node-5. Clients
/// reach `zone_a[i]` from zone-a's node i+1, zone-b's server from node-3, and every server
/// from node-5.
fn multi_node(distribution: &str, zone_a: [&[(usize, usize)]; 2]) {
    let c = Cluster::zoned([&["server-1"], &["server-2"], &[], &["server-4"], &[]], FIVE_NODES);
    let servers = [(0, 0), (1, 0), (3, 0)];
    distribute(&c, distribution, FIVE_NODES, &servers);
    let expect: [(usize, &[(usize, usize)]); 4] = [(0, zone_a[0]), (1, zone_a[1]), (2, &[(3, 0)]), (4, &servers)];
    assert_distribution(&c, &expect, distribution);
}

/// e2e row 78 (yes*: the test stands in for the EndpointSlice controller by writing the hints
/// itself, see [`distribute`]): PreferClose keeps each client in its zone when its zone has an
/// endpoint, and falls back to every zone when it has none (see [`same_zone`]). Then node-3 is
/// relabelled into zone-a: its agent re-runs the service and its client reaches node-1's
/// server only.
#[test]
fn e2e_78_prefer_close_routes_to_the_same_zone() {
    let c = same_zone("PreferClose");
    c.manifests.put_nodes(&["zone-a", "zone-b", "zone-a"]);
    assert_distribution(&c, &[(2, &[(0, 0)])], "node-3 relabelled into zone-a");
}

/// e2e row 79 (yes*: the test stands in for the EndpointSlice controller by writing the hints
/// itself, see [`distribute`]): PreferClose with two nodes per zone (see [`multi_node`]): both
/// zone-a clients reach both zone-a servers, zone-b's client the server on the other node of
/// its zone, zone-c's every server.
#[test]
fn e2e_79_prefer_close_across_nodes_of_a_zone() {
    let zone_a: &[(usize, usize)] = &[(0, 0), (1, 0)];
    multi_node("PreferClose", [zone_a, zone_a]);
}

/// e2e row 80 (yes*: the test stands in for the EndpointSlice controller by writing the hints
/// itself, see [`distribute`]): as row 78 with PreferSameZone.
#[test]
fn e2e_80_prefer_same_zone_routes_to_the_same_zone() {
    same_zone("PreferSameZone");
}

/// e2e row 81 (yes*: the test stands in for the EndpointSlice controller by writing the hints
/// itself, see [`distribute`]): as row 79 with PreferSameZone.
#[test]
fn e2e_81_prefer_same_zone_across_nodes_of_a_zone() {
    let zone_a: &[(usize, usize)] = &[(0, 0), (1, 0)];
    multi_node("PreferSameZone", [zone_a, zone_a]);
}

/// e2e row 82 (yes*: the test stands in for the EndpointSlice controller by writing the hints
/// itself, see [`distribute`]): PreferSameNode on upstream's layout (see [`multi_node`]): each
/// zone-a client reaches only the server on its own node, zone-b's client, with no server on
/// its node, falls back to its zone's, and zone-c's to every server.
#[test]
fn e2e_82_prefer_same_node_falls_back_to_the_zone_then_all() {
    multi_node("PreferSameNode", [&[(0, 0)], &[(1, 0)]]);
}

/// e2e row 83 (yes*: the test stands in for the EndpointSlice controller by writing the hints
/// itself, see [`distribute`]): PreferSameNode with a server and a client on each of two nodes
/// of one zone. Each client reaches its own node's server; when node-1's endpoint is deleted
/// (its server keeps running, so a stale route to it would show) both reach node-2's; when it
/// is back, each its own again.
#[test]
fn e2e_83_prefer_same_node_falls_back_when_the_local_endpoint_goes() {
    let zones = ["zone-a", "zone-a"];
    let c = Cluster::zoned([&["server-1"], &["server-2"]], zones);
    let own: [(usize, &[(usize, usize)]); 2] = [(0, &[(0, 0)]), (1, &[(1, 0)])];
    distribute(&c, "PreferSameNode", zones, &[(0, 0), (1, 0)]);
    assert_distribution(&c, &own, "both endpoints");
    distribute(&c, "PreferSameNode", zones, &[(1, 0)]);
    assert_distribution(&c, &[(0, &[(1, 0)]), (1, &[(1, 0)])], "node-1's endpoint deleted");
    distribute(&c, "PreferSameNode", zones, &[(0, 0), (1, 0)]);
    assert_distribution(&c, &own, "node-1's endpoint recreated");
}

// ---------------------------------------------------------------------------------------------
// Localhost nodePorts
// ---------------------------------------------------------------------------------------------

/// e2e row 85: a process of node-1 reaches `127.0.0.1:<nodePort>`, served by endpoints on both
/// nodes (kube-proxy's iptables mode does this with route_localnet and a DNAT in OUTPUT).
#[test]
fn e2e_85_localhost_node_port() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck(&c, &pods_ab(&c), 80, false);
    let to = at(Ipv4Addr::LOCALHOST, NETCHECK_NODE_PORTS.0);
    assert_served(&c.probe(Who::Host(0), "tcp", &to, 40), 40, &["pod-a", "pod-b"], "node-1 → 127.0.0.1");
}

/// e2e row 86: ClientIP affinity holds for `127.0.0.1:<nodePort>`.
#[test]
fn e2e_86_localhost_node_port_affinity() {
    let c = Cluster::new([&["pod-a", "pod-b"], &["pod-c", "pod-d"]]);
    let endpoints = [(0, 0, "node-1"), (0, 1, "node-1"), (1, 0, "node-2"), (1, 1, "node-2")]
        .map(|(n, p, node)| (c.pod_ip(n, p), node));
    netcheck(&c, &endpoints, 80, true);
    let to = at(Ipv4Addr::LOCALHOST, NETCHECK_NODE_PORTS.0);
    sticky(&c.probe(Who::Host(0), "tcp", &to, 20), 20, "node-1 → 127.0.0.1");
}

// ---------------------------------------------------------------------------------------------
// Dual stack ([Feature:IPv6DualStack], upstream's dual_stack.go)
// ---------------------------------------------------------------------------------------------

/// The families of upstream's dual-stack cluster, primary first: IPv4, then the secondary
/// IPv6 that the granular checks dial.
const DUAL: [Family; 2] = [Family::V4, Family::V6];

/// An endpoint of both families: its address in each, and its node.
#[derive(Clone, Copy, Debug)]
struct DualEndpoint {
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    node: &'static str,
}

impl DualEndpoint {
    fn address(self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.v4.into(),
            Family::V6 => self.v6.into(),
        }
    }
}

/// Pods `(node, pod)` of the cluster as endpoints of both families.
fn dual_pods(c: &Cluster, pods: &[(usize, usize)]) -> Vec<DualEndpoint> {
    let nodes = ["node-1", "node-2"];
    pods.iter().map(|&(n, p)| DualEndpoint { v4: c.pod(n, p).ip, v6: c.pod(n, p).ip6, node: nodes[n] }).collect()
}

/// pod-a on node-1 and pod-b on node-2, both families.
fn dual_pods_ab(c: &Cluster) -> Vec<DualEndpoint> {
    dual_pods(c, &[(0, 0), (1, 0)])
}

/// `address:port`, IPv6 in brackets.
fn sock(address: IpAddr, port: u16) -> String {
    SocketAddr::new(address, port).to_string()
}

/// [`netcheck`] of a dual-stack service: ClusterIPs [`VIP`]'s twins of `families` in that order
/// (the first is primary; `ipFamilyPolicy` RequireDualStack for two), HTTP 80 and UDP 90 on the
/// [`NETCHECK_NODE_PORTS`], one EndpointSlice per family (`addressType`) with the `endpoints`'
/// addresses of that family on `target`; waits until both agents have programmed every frontend
/// of every family: the ClusterIPs, and each node's address of each family on the nodePorts.
fn netcheck_dual(c: &Cluster, families: &[Family], endpoints: &[DualEndpoint], target: i32, affinity: bool) {
    let (http, udp) = NETCHECK_NODE_PORTS;
    let vips: Vec<IpAddr> = families.iter().map(|f| f.vip(VIP.octets()[3])).collect();
    let mut svc = service("netcheck")
        .cluster_ips(&vips)
        .named_port("http", 80, "TCP")
        .node_port(http.into())
        .named_port("udp", 90, "UDP")
        .node_port(udp.into());
    if affinity {
        svc = svc.session_affinity(None);
    }
    let slices: Vec<EndpointSlice> = families
        .iter()
        .map(|f| {
            let eps = slice("netcheck", &f.name().to_lowercase()).address_type(f.name());
            let eps = eps.named_port("http", target, "TCP").named_port("udp", target, "UDP");
            endpoints.iter().fold(eps, |s, e| s.endpoint_on(&e.address(*f).to_string(), e.node)).build()
        })
        .collect();
    c.manifests.put(&svc.build(), &slices);
    let count = Some(endpoints.len() as u16);
    for (family, vip) in families.iter().zip(vips) {
        c.wait_both(vip, 80, TCP, count);
        c.wait_both(vip, 90, UDP, count);
        for node in 0..2 {
            c.wait(node, family.node_ip(node), http, TCP, count);
            c.wait(node, family.node_ip(node), udp, UDP, count);
        }
    }
}

/// The frontends of [`netcheck_dual`] in `family` for `mode`'s protocol: the ClusterIP and every
/// node's address on the nodePort.
fn dual_targets(family: Family, mode: &str) -> Vec<String> {
    let (port, node_port) =
        if mode.starts_with("udp") { (90, NETCHECK_NODE_PORTS.1) } else { (80, NETCHECK_NODE_PORTS.0) };
    let vip = family.vip(VIP.octets()[3]);
    [sock(vip, port)].into_iter().chain((0..2).map(|n| sock(family.node_ip(n), node_port))).collect()
}

/// `from` reaches every one of `names` through `family`'s ClusterIP and every node's address of
/// that family on the nodePort, 40 attempts each (two endpoints: one is missed with probability
/// 2^-39).
fn reaches_all_in(c: &Cluster, from: Who, mode: &str, family: Family, names: &[&str]) {
    for to in dual_targets(family, mode) {
        assert_served(&c.probe(from, mode, &to, 40), 40, names, &format!("{from:?} → {to} ({mode})"));
    }
}

/// Rows 89-92, upstream's "should create service with ... cluster ip" on the datapath: a
/// NodePort service (TCP and UDP, as upstream's) with ClusterIPs of `families` and one slice
/// per family, with pod-a on node-1 and pod-b on node-2. For each family: node-1's client pod
/// reaches both pods through that family's ClusterIP, and the pods see the client's address of
/// that family (the families never mix: an IPv6 frontend goes to IPv6 endpoints); the external
/// client reaches both pods through each node's address of that family on the nodePort, and
/// the pods see that node's address of the family (SNAT under externalTrafficPolicy Cluster).
fn cluster_ips_of(families: &[Family]) {
    let c = Cluster::new([&["pod-a {peer}"], &["pod-b {peer}"]]);
    netcheck_dual(&c, families, &dual_pods_ab(&c), 80, false);
    let client = &c.node(0).client;
    for &family in families {
        let seen_as = |peer: IpAddr| [format!("pod-a {peer}"), format!("pod-b {peer}")];
        let client_ip = if family == Family::V4 { IpAddr::from(client.ip) } else { client.ip6.into() };
        let [pod, node_port] = [(80, 90), NETCHECK_NODE_PORTS];
        for (mode, port) in [("tcp", pod.0), ("udp", pod.1)] {
            let to = sock(family.vip(VIP.octets()[3]), port);
            let names = seen_as(client_ip);
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            assert_served(&c.probe(Who::Pod(0), mode, &to, 40), 40, &names, &format!("client pod → {to} ({mode})"));
        }
        for node in 0..2 {
            for (mode, port) in [("tcp", node_port.0), ("udp", node_port.1)] {
                let to = sock(family.node_ip(node), port);
                let names = seen_as(family.node_ip(node));
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                assert_served(&c.probe(Who::Outside, mode, &to, 40), 40, &names, &format!("outside → {to} ({mode})"));
            }
        }
    }
}

/// e2e row 89: a single-stack IPv4 service (`ipFamilies: [IPv4]`).
#[test]
fn e2e_89_ipv4_cluster_ip() {
    cluster_ips_of(&[Family::V4]);
}

/// e2e row 90: a single-stack IPv6 service with an IPv6 EndpointSlice, through the IPv6 ClusterIP
/// (socket path) and the nodes' IPv6 addresses on the nodePort (TC path, SNAT to the node's
/// IPv6 address).
#[test]
fn e2e_90_ipv6_cluster_ip() {
    cluster_ips_of(&[Family::V6]);
}

/// e2e row 91: a RequireDualStack service, IPv4 first.
#[test]
fn e2e_91_ipv4_ipv6_cluster_ips() {
    cluster_ips_of(&[Family::V4, Family::V6]);
}

/// e2e row 92: a RequireDualStack service, IPv6 first.
#[test]
fn e2e_92_ipv6_ipv4_cluster_ips() {
    cluster_ips_of(&[Family::V6, Family::V4]);
}

/// Rows 93-99: `from` reaches both endpoints of a dual-stack service through its secondary
/// family's (IPv6) ClusterIP and every node's IPv6 address on the nodePort, over `mode`.
fn secondary_family_reaches_all(from: Who, mode: &str) {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck_dual(&c, &DUAL, &dual_pods_ab(&c), 80, false);
    reaches_all_in(&c, from, mode, Family::V6, &["pod-a", "pod-b"]);
}

/// e2e row 93: pod → the secondary ClusterIP and nodePorts over TCP.
#[test]
fn e2e_93_pod_to_secondary_family_tcp() {
    secondary_family_reaches_all(Who::Pod(0), "tcp");
}

/// e2e row 94: the same over UDP.
#[test]
fn e2e_94_pod_to_secondary_family_udp() {
    secondary_family_reaches_all(Who::Pod(0), "udp");
}

/// e2e row 96: the node itself (a host-network process) → the secondary ClusterIP and nodePorts
/// over TCP.
#[test]
fn e2e_96_node_to_secondary_family_tcp() {
    secondary_family_reaches_all(Who::Host(0), "tcp");
}

/// e2e row 97: the same over UDP.
#[test]
fn e2e_97_node_to_secondary_family_udp() {
    secondary_family_reaches_all(Who::Host(0), "udp");
}

/// e2e row 98: an endpoint (pod-a) → its own service's secondary ClusterIP and nodePorts over
/// TCP: both endpoints answer, pod-a itself included (hairpin).
#[test]
fn e2e_98_endpoint_to_own_secondary_family_tcp() {
    secondary_family_reaches_all(Who::PodOf(0, 0), "tcp");
}

/// e2e row 99: the same over UDP.
#[test]
fn e2e_99_endpoint_to_own_secondary_family_udp() {
    secondary_family_reaches_all(Who::PodOf(0, 0), "udp");
}

/// Rows 100 and 101: pod-b leaves both slices, and every attempt over `mode`, to the IPv6
/// ClusterIP and to both nodes' IPv6 nodePorts, reaches pod-a only.
fn update_secondary_family_endpoints(mode: &str) {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck_dual(&c, &DUAL, &dual_pods_ab(&c), 80, false);
    reaches_all_in(&c, Who::Pod(0), mode, Family::V6, &["pod-a", "pod-b"]);
    netcheck_dual(&c, &DUAL, &dual_pods_ab(&c)[..1], 80, false);
    reaches_all_in(&c, Who::Pod(0), mode, Family::V6, &["pod-a"]);
}

/// e2e row 100: endpoints updated, over TCP.
#[test]
fn e2e_100_update_secondary_family_endpoints_tcp() {
    update_secondary_family_endpoints("tcp");
}

/// e2e row 101: endpoints updated, over UDP.
#[test]
fn e2e_101_update_secondary_family_endpoints_udp() {
    update_secondary_family_endpoints("udp");
}

/// Rows 102 and 103: ClientIP affinity on the IPv6 ClusterIP: every attempt of a client pod
/// (a new socket each) reaches one endpoint, on either node. 20 attempts over four endpoints
/// without affinity stay on one with probability 4^-19.
fn secondary_family_affinity(mode: &str, port: u16) {
    let c = Cluster::new([&["pod-a", "pod-b"], &["pod-c", "pod-d"]]);
    netcheck_dual(&c, &DUAL, &dual_pods(&c, &[(0, 0), (0, 1), (1, 0), (1, 1)]), 80, true);
    let to = sock(Family::V6.vip(VIP.octets()[3]), port);
    for node in 0..2 {
        sticky(&c.probe(Who::Pod(node), mode, &to, 20), 20, &format!("node-{}'s pod → {to}", node + 1));
    }
}

/// e2e row 102: ClientIP affinity over TCP.
#[test]
fn e2e_102_secondary_family_client_ip_affinity_tcp() {
    secondary_family_affinity("tcp", 80);
}

/// e2e row 103: ClientIP affinity over UDP.
#[test]
fn e2e_103_secondary_family_client_ip_affinity_udp() {
    secondary_family_affinity("udp", 90);
}

/// e2e row 104: a 2 KB request over TCP through the IPv6 ClusterIP is echoed back whole, by
/// every endpoint.
#[test]
fn e2e_104_secondary_family_large_request_tcp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck_dual(&c, &DUAL, &dual_pods_ab(&c), 80, false);
    let to = sock(Family::V6.vip(VIP.octets()[3]), 80);
    assert_served(&c.probe(Who::Pod(0), "tcp-big", &to, 40), 40, &["pod-a", "pod-b"], "2 KB over TCP");
}

/// e2e row 105: a 3000-byte UDP datagram through the IPv6 ClusterIP (more than upstream's 2 KB,
/// so the sender fragments it on the 1500-byte links) reaches every endpoint and is answered.
#[test]
fn e2e_105_secondary_family_large_request_udp() {
    let c = Cluster::new([&["pod-a"], &["pod-b"]]);
    netcheck_dual(&c, &DUAL, &dual_pods_ab(&c), 80, false);
    let to = sock(Family::V6.vip(VIP.octets()[3]), 90);
    assert_served(&c.probe(Who::Pod(0), "udp-big", &to, 40), 40, &["pod-a", "pod-b"], "3000 B over UDP");
}

/// e2e row 106: rows 93-105 with hostNetwork endpoints (each node's own addresses, port 8080):
/// node-1's processes and its client pod reach both nodes' servers through the IPv6 ClusterIP
/// (TCP, UDP, large requests) and node-1's IPv6 nodePorts; the external client through both
/// nodes' IPv6 nodePorts (where a connection may pick the receiving node itself).
#[test]
fn e2e_106_secondary_family_host_network_endpoints() {
    let c = Cluster::new([&[], &[]]);
    let _hosts = [
        PodServer::start(&c.node(0).ns, 8080, "node-1-host").expect("serving on node-1"),
        PodServer::start(&c.node(1).ns, 8080, "node-2-host").expect("serving on node-2"),
    ];
    let nodes = [(0, "node-1"), (1, "node-2")].map(|(n, node)| DualEndpoint { v4: node_ip(n), v6: node_ip6(n), node });
    netcheck_dual(&c, &DUAL, &nodes, 8080, false);
    let hosts = ["node-1-host", "node-2-host"];
    let (http, udp) = NETCHECK_NODE_PORTS;
    let vip = Family::V6.vip(VIP.octets()[3]);
    let own = IpAddr::from(node_ip6(0));
    for (mode, to) in [
        ("tcp", sock(vip, 80)),
        ("udp", sock(vip, 90)),
        ("tcp-big", sock(vip, 80)),
        ("udp-big", sock(vip, 90)),
        ("tcp", sock(own, http)),
        ("udp", sock(own, udp)),
    ] {
        for from in [Who::Host(0), Who::Pod(0)] {
            assert_served(&c.probe(from, mode, &to, 40), 40, &hosts, &format!("{from:?} → {to} ({mode})"));
        }
    }
    for node in 0..2 {
        for (mode, port) in [("tcp", http), ("udp", udp)] {
            let to = sock(node_ip6(node).into(), port);
            assert_served(&c.probe(Who::Outside, mode, &to, 40), 40, &hosts, &format!("outside → {to} ({mode})"));
        }
    }
}
