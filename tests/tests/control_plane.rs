//! The control plane end to end: the agent (a real process) watches the test API server over
//! HTTP with the real kube client and programs the real BPF datapath, attached to a cgroup this
//! test made; clients in pod namespaces inside that cgroup make real connections.
//!
//! Tests named `e2e_NN_...` reproduce row NN of `docs/behaviours.md`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::{
    Resource,
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
};
use proxy_common::{
    backend::{Backend, BackendId},
    service::{ServiceKey, ServiceValue},
};
use proxy_tests::{
    agent::{Agent, Synced},
    apiserver::ApiServer,
    client::{Tally, http_get, probe},
    cluster::{self, NODE_IPS, SEED_PORT as PORT, TARGET_PORT, vip},
    fixtures::{service, slice},
    netns::Netns,
    topology::SingleNode,
    wait_until,
};
use serde_json::json;

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
/// Bound for waits on the agent while the API server is up.
const WAIT: Duration = Duration::from_secs(10);
/// Bound for waits that include the watchers' backoff (kube's default: 0.8 s doubling up to 30 s).
const RECOVERY: Duration = Duration::from_secs(45);
/// node-1's InternalIP.
const NODE1: Ipv4Addr = NODE_IPS[0];

/// Address `n` on node-1's pod network.
fn pod_ip(n: u8) -> Ipv4Addr {
    cluster::pod_ip(0, n)
}

fn pod_name(n: u8) -> String {
    format!("pod-{n}")
}

/// The backends of pods `pods` on the target port.
fn backends(pods: &[u8]) -> Vec<SocketAddrV4> {
    pods.iter().map(|n| SocketAddrV4::new(pod_ip(*n), TARGET_PORT)).collect()
}

/// A ClusterIP service `name` at `10.96.0.<last>:6666`.
fn web(name: &str, last: u8) -> Service {
    service(name).cluster_ip(&vip(last).to_string()).port(PORT.into()).build()
}

/// The slice `<name>-a` of service `name` with pods `pods` (ready, on node-1) on port 80.
fn endpoints(name: &str, pods: &[u8]) -> EndpointSlice {
    let ips: Vec<String> = pods.iter().map(|n| pod_ip(*n).to_string()).collect();
    slice(name, "a").port(TARGET_PORT.into()).endpoints(ips.iter().map(String::as_str)).build()
}

/// `default/kubernetes`, which every real cluster has, so the agent's first list is never empty.
fn kubernetes_service() -> (Service, EndpointSlice) {
    let svc = service("kubernetes").cluster_ip("10.96.0.1").named_port("https", 443, "TCP").build();
    let mut eps = slice("kubernetes", "a").port(6443).endpoint(&NODE1.to_string()).build();
    if let Some(port) = eps.ports.as_mut().and_then(|p| p.first_mut()) {
        port.name = Some("https".into());
    }
    (svc, eps)
}

/// node-1 (or another node) with an InternalIP.
fn node(name: &str, internal_ip: Ipv4Addr) -> serde_json::Value {
    json!({
        "metadata": {"name": name},
        "status": {"addresses": [
            {"type": "InternalIP", "address": internal_ip.to_string()},
            {"type": "Hostname", "address": name},
        ]},
    })
}

/// A kubeconfig file, removed on drop.
struct Kubeconfig(PathBuf);

impl Drop for Kubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The test API server, node-1 with pods `pod-<n>` at 10.244.1.<n> (each answering its name on
/// port 80) and a client pod, and the agent watching the server. The agent runs in node-1's
/// namespace (its TC program attaches to every interface there, never to the machine's), and so
/// does the API server, on that namespace's 127.0.0.1. Fields drop in order: the agent first,
/// the runtime serving the API server last.
struct Cluster {
    agent: Agent,
    server: ApiServer,
    kubeconfig: Kubeconfig,
    topology: SingleNode,
    _runtime: tokio::runtime::Runtime,
}

impl Cluster {
    /// Builds the topology, starts the server with `default/kubernetes` and whatever `seed`
    /// stores, then starts the agent (`extra` flags added) and waits for its first sync.
    fn start(pods: &[u8], extra: &[&str], seed: impl FnOnce(&ApiServer)) -> Self {
        let names: Vec<(String, Ipv4Addr)> = pods.iter().map(|n| (pod_name(*n), pod_ip(*n))).collect();
        let refs: Vec<(&str, Ipv4Addr)> = names.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
        let topology = SingleNode::new(&refs, TARGET_PORT).expect("building the namespaces");
        let (runtime, server) = api_server_in(&topology.node);
        let (svc, eps) = kubernetes_service();
        server.apply(&svc);
        server.apply(&eps);
        seed(&server);
        let kubeconfig = kubeconfig(&server);
        let agent = start_agent(&topology, &kubeconfig, extra).expect("starting the agent");
        Self { agent, server, kubeconfig, topology, _runtime: runtime }
    }

    /// `count` TCP connections from the client pod to `address:port` (300 ms timeout each).
    fn connect_to(&self, address: Ipv4Addr, port: u16, count: usize) -> Tally {
        connect(&self.topology, &format!("{address}:{port}"), count)
    }

    /// `count` connections to `10.96.0.<last>:6666`.
    fn connect(&self, last: u8, count: usize) -> Tally {
        self.connect_to(vip(last), PORT, count)
    }

    /// Waits until `10.96.0.<last>:6666` has exactly the backends of `pods` (`None`: no frontend).
    fn wait_for_pods(&self, last: u8, pods: Option<&[u8]>, timeout: Duration) {
        let want = pods.map(backends);
        self.agent.wait_for_backends(vip(last), PORT, want.as_deref(), timeout).unwrap();
    }

    /// Waits until every watch of the agent is open (kube's watcher opens a WATCH only after its
    /// initial list has been consumed, so faults injected before would hit nothing).
    fn wait_for_watches(&self) {
        wait_until("the agent's watches are open", WAIT, || {
            self.server.watch_count::<Service>() > 0
                && self.server.watch_count::<EndpointSlice>() > 0
                && self.server.watch_count::<Node>() > 0
        });
    }
}

fn kubeconfig(server: &ApiServer) -> Kubeconfig {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("proxy-kubeconfig-{}-{n}", std::process::id()));
    server.write_kubeconfig(&path);
    Kubeconfig(path)
}

/// Starts the test API server on 127.0.0.1 of `ns`, served by a runtime of its own.
fn api_server_in(ns: &Netns) -> (tokio::runtime::Runtime, ApiServer) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the API server");
    let server = ApiServer::start_in(&runtime, ns).expect("starting the API server in the node's namespace");
    (runtime, server)
}

/// Starts the agent in node-1's namespace, watching the server of `kubeconfig`.
fn start_agent(topology: &SingleNode, kubeconfig: &Kubeconfig, extra: &[&str]) -> anyhow::Result<Agent> {
    let flags = agent_flags(kubeconfig, extra);
    Agent::start_in(Some(&topology.node), AGENT.as_ref(), topology.cgroup.path(), &flags)
}

fn agent_flags<'a>(kubeconfig: &'a Kubeconfig, extra: &[&'a str]) -> Vec<&'a str> {
    let path = kubeconfig.0.to_str().expect("a UTF-8 temp path");
    let mut flags = vec!["--kubeconfig", path, "--hostname-override", "node-1"];
    flags.extend_from_slice(extra);
    flags
}

fn connect(topology: &SingleNode, target: &str, count: usize) -> Tally {
    probe(PROBE.as_ref(), &topology.client.ns, Some(&topology.cgroup), &["tcp", target, &count.to_string(), "300"])
        .expect("running the probe")
}

/// Asserts that every answer came from `pods`, and each of them answered at least once.
fn assert_served_by(tally: &Tally, count: usize, pods: &[u8]) {
    assert_eq!(tally.answered(), count, "every connection is answered: {tally:?}");
    let names: BTreeSet<String> = pods.iter().map(|n| pod_name(*n)).collect();
    let seen: BTreeSet<String> = tally.answers.keys().cloned().collect();
    assert_eq!(seen, names, "answers come from exactly the current endpoints: {tally:?}");
}

/// The `services` and `backends` maps' entries.
type Snapshot = (BTreeMap<ServiceKey, ServiceValue>, BTreeMap<BackendId, Backend>);

fn snapshot(agent: &Agent) -> Snapshot {
    let maps = agent.maps().expect("opening the pinned maps");
    (maps.services().collect(), maps.backends().collect())
}

/// The `services` entries of every frontend address but `except`.
fn entries_except(snapshot: &Snapshot, except: Ipv4Addr) -> BTreeMap<ServiceKey, ServiceValue> {
    snapshot.0.iter().filter(|(k, _)| k.address != proxy_common::addr::from_ip(except)).map(|(k, v)| (*k, *v)).collect()
}

/// The master entries (frontends) programmed, as (address, port).
fn frontends(agent: &Agent) -> BTreeSet<(Ipv4Addr, u16)> {
    let maps = agent.maps().expect("opening the pinned maps");
    maps.services()
        .filter(|(k, _)| k.slot == 0)
        .filter_map(|(k, _)| Some((Ipv4Addr::from(proxy_common::addr::to_v4(&k.address)?), k.port)))
        .collect()
}

/// Sums the counts of the agent's `synced` lines after the first `after`.
fn syncs_since(agent: &Agent, after: usize) -> (Vec<Synced>, Synced) {
    let lines: Vec<Synced> = agent.syncs().into_iter().skip(after).collect();
    let total = lines.iter().fold(Synced::default(), |acc, s| Synced {
        services: acc.services + s.services,
        service_writes: acc.service_writes + s.service_writes,
        backend_writes: acc.backend_writes + s.backend_writes,
        skipped: acc.skipped + s.skipped,
        errors: acc.errors + s.errors,
        ..*s
    });
    (lines, total)
}

/// How many times the agent logged a complete list of `K` (kube's watcher `InitDone`).
fn listed<K: Resource>(agent: &Agent) -> usize {
    agent.lines().iter().filter(|l| l.message == "listed" && l.text("kind") == Some(K::KIND)).count()
}

/// e2e row 1 (and row 29): a Service and then an EndpointSlice created through the API server;
/// the ClusterIP refuses while it has no endpoint and then follows the endpoints 0→1→2→1→0.
#[test]
fn e2e_01_serve_a_basic_endpoint_from_pods() {
    let c = Cluster::start(&[2, 3], &[], |_| {});
    c.server.apply(&web("web", 10));
    c.wait_for_pods(10, Some(&[]), WAIT);
    let refused = c.connect(10, 5);
    assert_eq!(refused.errors.get("refused"), Some(&5), "no endpoint yet: refused at once: {refused:?}");

    c.server.apply(&endpoints("web", &[2]));
    c.wait_for_pods(10, Some(&[2]), WAIT);
    assert_served_by(&c.connect(10, 20), 20, &[2]);

    c.server.apply(&endpoints("web", &[2, 3]));
    c.wait_for_pods(10, Some(&[2, 3]), WAIT);
    assert_served_by(&c.connect(10, 200), 200, &[2, 3]);

    c.server.apply(&endpoints("web", &[3]));
    c.wait_for_pods(10, Some(&[3]), WAIT);
    assert_served_by(&c.connect(10, 20), 20, &[3]);

    c.server.apply(&endpoints("web", &[]));
    c.wait_for_pods(10, Some(&[]), WAIT);
    let refused = c.connect(10, 5);
    assert_eq!(refused.errors.get("refused"), Some(&5), "no endpoint left: refused: {refused:?}");
}

/// e2e row 64: endpoints scaled up and down one at a time while a client keeps connecting.
/// Every answer comes from a current endpoint, new endpoints get traffic, removed ones get none,
/// no connection fails, and each change is one sync of that service alone that rewrites at most
/// two slots and the master entry.
#[test]
fn e2e_64_update_endpoints_while_traffic_flows() {
    let mut c = Cluster::start(&[2, 3, 4], &[], |s| {
        s.apply(&web("web", 10));
        s.apply(&endpoints("web", &[2]));
    });
    c.wait_for_pods(10, Some(&[2]), WAIT);
    let target = format!("{}:{PORT}", vip(10));
    let steps: [&[u8]; 5] = [&[2, 3], &[2, 3, 4], &[3, 4], &[4], &[4, 2]];
    let union: BTreeSet<String> = [2, 3, 4].map(pod_name).into();

    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let background = s.spawn(|| {
            let mut total = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                let tally = connect(&c.topology, &target, 50);
                for (name, n) in tally.answers {
                    *total.answers.entry(name).or_default() += n;
                }
                for (kind, n) in tally.errors {
                    *total.errors.entry(kind).or_default() += n;
                }
            }
            total
        });
        for pods in steps {
            let before = c.agent.syncs().len();
            c.server.apply(&endpoints("web", pods));
            c.wait_for_pods(10, Some(pods), WAIT);
            let sync = c.agent.wait_for_sync(before, |_| true, WAIT).unwrap();
            assert_eq!(sync.services, 1, "one endpoint change recomputes that service only: {sync:?}");
            assert!(sync.service_writes <= 3, "at most two slots and the master are written: {sync:?}");
            assert_eq!(sync.backend_writes, 1, "one backend is added or removed: {sync:?}");
            assert_served_by(&c.connect(10, 150), 150, pods);
        }
        stop.store(true, Ordering::Relaxed);
        let during = background.join().expect("the background client does not panic");
        assert!(during.errors.is_empty(), "no connection failed while endpoints changed: {during:?}");
        assert!(during.answered() > 0, "the background client ran: {during:?}");
        let seen: BTreeSet<String> = during.answers.keys().cloned().collect();
        assert!(seen.is_subset(&union), "answers only from endpoints: {during:?}");
    });
}

/// e2e row 6: three services; deleting one stops its ClusterIP (connects no longer reach its
/// old backend, its frontend and slots leave the maps) and leaves the other two alone.
#[test]
fn e2e_06_up_and_down_services() {
    let mut c = Cluster::start(&[2, 3, 4], &[], |s| {
        for (name, last, pod) in [("web-1", 11, 2), ("web-2", 12, 3), ("web-3", 13, 4)] {
            s.apply(&web(name, last));
            s.apply(&endpoints(name, &[pod]));
        }
    });
    for (last, pod) in [(11, 2), (12, 3), (13, 4)] {
        c.wait_for_pods(last, Some(&[pod]), WAIT);
        assert_served_by(&c.connect(last, 10), 10, &[pod]);
    }
    let before = snapshot(&c.agent);

    // The service goes first; its slice outlives it for a while (garbage collection is async).
    assert!(c.server.delete::<Service>(None, "web-2"));
    c.wait_for_pods(12, None, WAIT);
    c.agent.wait_for_log("EndpointSlice default/web-2-a", WAIT).unwrap();
    let after = snapshot(&c.agent);
    assert!(
        after.0.keys().all(|k| k.address != proxy_common::addr::from_ip(vip(12))),
        "no entry of the deleted frontend is left: {:?}",
        after.0
    );
    assert!(
        after.1.values().all(|b| b.address != proxy_common::addr::from_ip(pod_ip(3))),
        "the deleted service's only backend is gone: {:?}",
        after.1
    );
    assert_eq!(entries_except(&after, vip(12)), entries_except(&before, vip(12)), "other services untouched");
    let gone = c.connect(12, 3);
    assert_eq!(gone.answered(), 0, "the deleted ClusterIP reaches no backend: {gone:?}");
    assert_served_by(&c.connect(11, 10), 10, &[2]);
    assert_served_by(&c.connect(13, 10), 10, &[4]);
    let orphan =
        c.agent.lines().iter().any(|l| l.mentions("EndpointSlice default/web-2-a") && l.mentions("no_service"));
    assert!(orphan, "the orphaned slice is reported as such:\n{}", c.agent.log());

    assert!(c.server.delete::<EndpointSlice>(None, "web-2-a"));
    c.server.apply(&web("web-4", 14));
    c.server.apply(&endpoints("web-4", &[3]));
    c.wait_for_pods(14, Some(&[3]), WAIT);
    assert_eq!(c.connect(12, 3).answered(), 0);
    assert_served_by(&c.connect(14, 10), 10, &[3]);
    c.agent.check_running().unwrap();
}

/// e2e row 7: a deleted service recreated with a new ClusterIP works at the new one only; its
/// slice has a new name, as the EndpointSlice controller's `generateName` gives. The old slice
/// goes first, and the test waits until the agent has seen that: the Service and EndpointSlice
/// watches are separate streams, and an old slice whose deletion arrives after the new Service
/// would briefly serve it, then empty it until the new slice arrives (what made this test
/// flaky once).
#[test]
fn e2e_07_works_after_the_service_has_been_recreated() {
    let c = Cluster::start(&[2, 3], &[], |s| {
        s.apply(&web("web", 10));
        s.apply(&endpoints("web", &[2, 3]));
    });
    c.wait_for_pods(10, Some(&[2, 3]), WAIT);
    assert!(c.server.delete::<EndpointSlice>(None, "web-a"));
    c.wait_for_pods(10, Some(&[]), WAIT);
    assert!(c.server.delete::<Service>(None, "web"));
    c.wait_for_pods(10, None, WAIT);
    c.server.apply(&web("web", 20));
    let ips = [2, 3].map(|n| pod_ip(n).to_string());
    c.server.apply(&slice("web", "b").port(TARGET_PORT.into()).endpoints(ips.iter().map(String::as_str)).build());
    c.wait_for_pods(20, Some(&[2, 3]), WAIT);
    assert_served_by(&c.connect(20, 100), 100, &[2, 3]);
    assert_eq!(c.connect(10, 3).answered(), 0, "the old ClusterIP is gone");
}

/// e2e row 8: the agent is killed; traffic keeps flowing through the pinned programs and maps;
/// changes made while it is down (an endpoint replaced, a service deleted) are applied by the
/// next agent, which keeps the unchanged services' ids.
#[test]
fn e2e_08_works_after_restarting_the_agent() {
    let mut c = Cluster::start(&[2, 3, 4], &[], |s| {
        for (name, last, pods) in [("web-1", 11, &[2, 3][..]), ("web-2", 12, &[4][..])] {
            s.apply(&web(name, last));
            s.apply(&endpoints(name, pods));
        }
    });
    c.wait_for_pods(11, Some(&[2, 3]), WAIT);
    c.wait_for_pods(12, Some(&[4]), WAIT);
    let kubernetes = ServiceKey::master(proxy_common::addr::from_v4([10, 96, 0, 1]), 443, proxy_common::proto::TCP);
    let master = snapshot(&c.agent).0[&kubernetes];
    c.agent.kill();
    assert_served_by(&c.connect(11, 50), 50, &[2, 3]);

    c.server.apply(&endpoints("web-1", &[2, 4]));
    assert!(c.server.delete::<Service>(None, "web-2"));
    assert!(c.server.delete::<EndpointSlice>(None, "web-2-a"));
    let flags = agent_flags(&c.kubeconfig, &[]);
    c.agent.restart(AGENT.as_ref(), c.topology.cgroup.path(), &flags).unwrap();
    c.agent.wait_for_log("synced", WAIT).unwrap();
    c.wait_for_pods(11, Some(&[2, 4]), WAIT);
    c.wait_for_pods(12, None, WAIT);
    assert_served_by(&c.connect(11, 100), 100, &[2, 4]);
    assert_eq!(c.connect(12, 3).answered(), 0, "the service deleted while the agent was down is gone");
    assert_eq!(snapshot(&c.agent).0[&kubernetes], master, "an unchanged service keeps its master entry and id");
}

/// e2e rows 8 and 21 together: a client of a `sessionAffinity: ClientIP` service keeps its
/// backend across an agent restart. The affinity map remembers backend ids, so the restarted
/// agent must program the same endpoints under the same ids.
#[test]
fn session_affinity_survives_an_agent_restart() {
    let mut c = Cluster::start(&[2, 3, 4, 5], &[], |s| {
        let mut svc = web("sticky", 10);
        if let Some(spec) = svc.spec.as_mut() {
            spec.session_affinity = Some("ClientIP".into());
        }
        s.apply(&svc);
        s.apply(&endpoints("sticky", &[2, 3, 4, 5]));
    });
    c.wait_for_pods(10, Some(&[2, 3, 4, 5]), WAIT);
    let first = c.connect(10, 20);
    assert_eq!(first.answers.len(), 1, "ClientIP affinity: one backend for this client: {first:?}");
    assert_eq!(first.answered(), 20);
    let (before_services, before_backends) = snapshot(&c.agent);

    let flags = agent_flags(&c.kubeconfig, &[]);
    c.agent.restart(AGENT.as_ref(), c.topology.cgroup.path(), &flags).unwrap();
    c.agent.wait_for_log("synced", WAIT).unwrap();
    let (services, backends) = snapshot(&c.agent);
    assert_eq!(
        (services, backends),
        (before_services, before_backends),
        "the restarted agent adopts the programmed backend ids (affinity entries name them)"
    );
    let again = c.connect(10, 20);
    assert_eq!(again.answers, first.answers, "the client sticks to its backend across the restart");
}

/// The watches are cut and the server has compacted its history (`410 Gone` on re-watch): the
/// agent relists every kind, and since nothing changed it writes nothing at all. Then a change
/// made while the watch was blind is picked up by the next relist, which rewrites that service
/// alone.
#[test]
fn relist_after_410_rewrites_only_what_changed() {
    let mut c = Cluster::start(&[2, 3, 4, 5], &[], |s| {
        for (name, last, pod) in [("web-1", 11, 2), ("web-2", 12, 3), ("web-3", 13, 4)] {
            s.apply(&web(name, last));
            s.apply(&endpoints(name, &[pod]));
        }
    });
    for (last, pod) in [(11, 2), (12, 3), (13, 4)] {
        c.wait_for_pods(last, Some(&[pod]), WAIT);
    }
    c.wait_for_watches();
    let before = snapshot(&c.agent);
    let syncs = c.agent.syncs().len();
    let lists =
        [c.server.list_count::<Service>(), c.server.list_count::<EndpointSlice>(), c.server.list_count::<Node>()];
    let logged = [listed::<Service>(&c.agent), listed::<EndpointSlice>(&c.agent), listed::<Node>(&c.agent)];

    // Nothing changed: compaction, then every watch is cut; the re-watch gets 410 and relists.
    c.server.compact();
    c.server.drop_watches();
    wait_until("the agent relisted every kind", RECOVERY, || {
        listed::<Service>(&c.agent) > logged[0]
            && listed::<EndpointSlice>(&c.agent) > logged[1]
            && listed::<Node>(&c.agent) > logged[2]
    });
    assert!(c.server.list_count::<Service>() > lists[0], "services were listed again");
    assert!(c.server.list_count::<EndpointSlice>() > lists[1], "slices were listed again");
    assert!(c.server.list_count::<Node>() > lists[2], "nodes were listed again");
    // Longer than --min-sync-period: a sync the relist caused would have been logged by now.
    thread::sleep(Duration::from_millis(300));
    let (lines, total) = syncs_since(&c.agent, syncs);
    assert_eq!(
        (total.service_writes, total.backend_writes),
        (0, 0),
        "a relist of an unchanged cluster writes no map entry: {lines:?}"
    );
    assert_eq!(snapshot(&c.agent), before, "the maps (entries, backend and service ids) are unchanged");
    for (last, pod) in [(11, 2), (12, 3), (13, 4)] {
        assert_served_by(&c.connect(last, 10), 10, &[pod]);
    }

    // A change the watch never delivers (stalled), then history is lost and the watch is cut.
    c.wait_for_watches();
    let syncs = c.agent.syncs().len();
    let logged = listed::<EndpointSlice>(&c.agent);
    c.server.set_stalled::<EndpointSlice>(true);
    c.server.apply(&endpoints("web-2", &[3, 5]));
    c.server.compact();
    c.server.drop_watches();
    c.server.set_stalled::<EndpointSlice>(false);
    wait_until("the agent relisted the slices", RECOVERY, || listed::<EndpointSlice>(&c.agent) > logged);
    assert!(c.agent.mentions("too old resource version"), "the re-watch was answered 410:\n{}", c.agent.log());
    c.wait_for_pods(12, Some(&[3, 5]), WAIT);
    let sync = c.agent.wait_for_sync(syncs, |s| s.services > 0, WAIT).unwrap();
    let (lines, total) = syncs_since(&c.agent, syncs);
    assert_eq!(total.services, 1, "only the changed service is recomputed: {lines:?} (first {sync:?})");
    assert_eq!((total.service_writes, total.backend_writes), (2, 1), "one slot and the master, one backend: {lines:?}");
    assert_eq!(entries_except(&snapshot(&c.agent), vip(12)), entries_except(&before, vip(12)), "others untouched");
    assert_served_by(&c.connect(12, 100), 100, &[3, 5]);
    assert_served_by(&c.connect(11, 10), 10, &[2]);
}

/// e2e row 9: the API server goes away for a few seconds. The datapath keeps serving the
/// existing service throughout (every connection answered by its endpoints), the agent keeps
/// running and retries, and after recovery a newly created service works.
#[test]
fn e2e_09_apiserver_restart() {
    let mut c = Cluster::start(&[2, 3, 4], &[], |s| {
        s.apply(&web("web", 10));
        s.apply(&endpoints("web", &[2, 3]));
    });
    c.wait_for_pods(10, Some(&[2, 3]), WAIT);
    c.wait_for_watches();
    let target = format!("{}:{PORT}", vip(10));

    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let background = s.spawn(|| {
            let mut batches = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                batches.push(connect(&c.topology, &target, 20));
                thread::sleep(Duration::from_millis(20));
            }
            batches
        });
        c.server.set_available(false);
        let down = Instant::now();
        c.agent.wait_for_log("watch failed", WAIT).unwrap();
        thread::sleep(Duration::from_secs(4).saturating_sub(down.elapsed()));
        c.agent.check_running().unwrap();
        c.server.set_available(true);
        c.server.apply(&web("web-new", 20));
        c.server.apply(&endpoints("web-new", &[4]));
        c.wait_for_pods(20, Some(&[4]), RECOVERY);
        stop.store(true, Ordering::Relaxed);
        let batches = background.join().expect("the background client does not panic");
        assert!(batches.len() >= 10, "the client kept connecting through the outage: {} batches", batches.len());
        let names: BTreeSet<String> = [2, 3].map(pod_name).into();
        for tally in &batches {
            assert_eq!(tally.answered(), 20, "every connection is answered during the outage: {tally:?}");
            assert!(tally.answers.keys().all(|n| names.contains(n)), "answers from the endpoints only: {tally:?}");
        }
    });
    assert_served_by(&c.connect(20, 10), 10, &[4]);
    assert_served_by(&c.connect(10, 50), 50, &[2, 3]);
}

/// Issue 8 item 3: with `--sync-period 1s`, `/healthz` tolerates problems for twice that, 2 s.
/// The API server goes away: the datapath keeps serving, `/healthz` answers 503 naming the
/// unanswered watches once the outage is longer than the window (never before), and 200 again
/// once the agent has reconnected.
#[test]
fn healthz_turns_unhealthy_after_the_api_outage_window_and_back_after_recovery() {
    const WINDOW: Duration = Duration::from_secs(2);
    let c = Cluster::start(&[2, 3], &["--sync-period", "1s"], |s| {
        s.apply(&web("web", 10));
        s.apply(&endpoints("web", &[2, 3]));
    });
    c.wait_for_pods(10, Some(&[2, 3]), WAIT);
    c.wait_for_watches();
    let healthz = || {
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, 10256));
        http_get(&c.topology.node, to, "/healthz").expect("asking /healthz")
    };
    wait_until("/healthz answers 200 after the first sync", WAIT, || healthz().0 == 200);

    c.server.set_available(false);
    let down = Instant::now();
    let mut body = String::new();
    wait_until("/healthz answers 503 during the outage", WAIT, || {
        let (status, text) = healthz();
        body = text;
        status == 503
    });
    let unhealthy_after = down.elapsed();
    assert!(unhealthy_after >= WINDOW, "503 only after the window: after {unhealthy_after:?}: {body}");
    assert!(body.contains("the API server has not answered"), "the problem is named: {body}");
    assert_served_by(&c.connect(10, 50), 50, &[2, 3]);

    c.server.set_available(true);
    wait_until("/healthz answers 200 after recovery", RECOVERY, || healthz().0 == 200);
    c.server.apply(&web("web-new", 20));
    c.server.apply(&endpoints("web-new", &[4]));
    c.wait_for_pods(20, Some(&[4]), RECOVERY);
}

/// Issue 8 item 6, in a cluster: a service that does not fit the maps (`--services-map-size 6`:
/// `kubernetes` takes two entries, `web` three, `big` would need four) is refused, and the agent
/// posts a Warning Event on it, which `kubectl describe service big` shows; `web` keeps working,
/// and the node stays healthy past `/healthz`'s window (2 s with `--sync-period 1s`, the refused
/// service retried every second): one oversized service must not take every node out of its
/// load balancers.
#[test]
fn a_service_that_does_not_fit_gets_a_warning_event() {
    let c = Cluster::start(&[2, 3, 4], &["--services-map-size", "6", "--sync-period", "1s"], |s| {
        s.apply(&web("web", 10));
        s.apply(&endpoints("web", &[2, 3]));
    });
    c.wait_for_pods(10, Some(&[2, 3]), WAIT);
    c.server.apply(&web("big", 20));
    c.server.apply(&endpoints("big", &[2, 3, 4]));
    wait_until("an Event on the refused service", WAIT, || !c.server.posted_events().is_empty());
    let (verb, event) = c.server.posted_events().remove(0);
    assert_eq!(verb, "create");
    assert_eq!(
        (event["regarding"]["kind"].as_str(), event["regarding"]["name"].as_str()),
        (Some("Service"), Some("big"))
    );
    assert_eq!(event["metadata"]["namespace"], "default", "{event}");
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("ServiceNotProgrammed")));
    let note = event["note"].as_str().unwrap_or_default();
    assert!(note.contains("not programmed") && note.contains("map is full"), "the note says why: {note}");
    assert_eq!(event["reportingInstance"], "node-1", "{event}");
    c.wait_for_pods(20, None, WAIT);
    assert_served_by(&c.connect(10, 20), 20, &[2, 3]);
    thread::sleep(Duration::from_secs(3));
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, 10256));
    let (status, body) = http_get(&c.topology.node, to, "/healthz").expect("asking /healthz");
    assert_eq!(status, 200, "healthy with a refused service: {body}");
    let lines = c.agent.lines();
    let about_big = |message: &str| {
        lines.iter().filter(|l| l.message.starts_with(message) && l.text("service") == Some("default/big")).count()
    };
    assert!(about_big("service still refused") >= 2, "the refused service was retried meanwhile:\n{}", c.agent.log());
    assert_eq!(about_big("service refused as a whole"), 1, "and its refusal logged once:\n{}", c.agent.log());
}

/// A stream of malformed objects: each is skipped with one log line naming it and the reason,
/// and the good services (before and after) are served.
#[test]
fn malformed_objects_are_skipped_and_the_rest_is_served() {
    let mut c = Cluster::start(&[2, 3, 4], &[], |s| {
        s.apply(&web("web", 10));
        s.apply(&endpoints("web", &[2]));
    });
    c.wait_for_pods(10, Some(&[2]), WAIT);
    c.wait_for_watches();
    let svc = |name: &str, ip: &str, port: i64, protocol: &str| {
        json!({"metadata": {"name": name, "namespace": "default"},
               "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                        "ports": [{"port": port, "protocol": protocol, "targetPort": 80}]}})
    };
    let eps = |name: &str, service: Option<&str>, addresses: &[&str]| {
        let labels = service.map_or(json!({}), |s| json!({"kubernetes.io/service-name": s}));
        let endpoints: Vec<_> = addresses
            .iter()
            .map(|a| json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": "node-1"}))
            .collect();
        json!({"metadata": {"name": name, "namespace": "default", "labels": labels},
               "addressType": "IPv4", "endpoints": endpoints, "ports": [{"port": 80, "protocol": "TCP"}]})
    };
    // (kind, object, namespace/name logged, reason logged)
    let stream = [
        ("Service", svc("bad-ip", "10.96.0.300", 6666, "TCP"), "default/bad-ip", "bad_address"),
        ("Service", svc("bad-port", "10.96.0.31", 70000, "TCP"), "default/bad-port", "bad_port"),
        ("Service", svc("bad-proto", "10.96.0.32", 6666, "ICMP"), "default/bad-proto", "unknown_protocol"),
        ("Service", svc("half", "10.96.0.33", 6666, "TCP"), "", ""),
        (
            "EndpointSlice",
            eps("half-a", Some("half"), &["10.244.1.999", "10.244.1.3"]),
            "default/half-a",
            "bad_address",
        ),
        ("EndpointSlice", eps("no-label", None, &["10.244.1.4"]), "default/no-label", "missing_service_label"),
        ("EndpointSlice", eps("orphan-a", Some("missing"), &["10.244.1.4"]), "default/orphan-a", "no_service"),
    ];
    for (kind, object, ..) in &stream {
        c.server.apply_raw(kind, object.clone());
    }
    c.server.apply(&web("after", 20));
    c.server.apply(&endpoints("after", &[4]));
    c.wait_for_pods(20, Some(&[4]), WAIT);
    c.wait_for_pods(33, Some(&[3]), WAIT);
    for (_, _, object, reason) in stream.iter().filter(|s| !s.2.is_empty()) {
        let deadline = Instant::now() + WAIT;
        while !c.agent.lines().iter().any(|l| l.mentions(object) && l.mentions(reason)) {
            c.agent.check_running().unwrap();
            assert!(Instant::now() < deadline, "no log line names {object} and {reason}:\n{}", c.agent.log());
            thread::sleep(Duration::from_millis(20));
        }
    }
    let named = ["10.96.0.300", "70000", "ICMP"].iter().all(|value| c.agent.mentions(value));
    assert!(named, "the bad values:\n{}", c.agent.log());
    let want: BTreeSet<(Ipv4Addr, u16)> =
        [(vip(1), 443), (vip(10), PORT), (vip(20), PORT), (vip(33), PORT)].into_iter().collect();
    assert_eq!(frontends(&c.agent), want, "only the good frontends are programmed");
    assert_served_by(&c.connect(10, 20), 20, &[2]);
    assert_served_by(&c.connect(20, 20), 20, &[4]);
    assert_served_by(&c.connect(33, 20), 20, &[3]);
    c.agent.check_running().unwrap();
}

/// The NodePort service of e2e row 10 against node-1's Node object.
fn nodeport_seed(server: &ApiServer) {
    server.apply_raw("Node", node("node-1", NODE1));
    server.apply_raw("Node", node("node-2", NODE_IPS[1]));
    server.apply(&service("np").cluster_ip(&vip(40).to_string()).port(PORT.into()).node_port(30080).build());
    server.apply(&endpoints("np", &[2, 3]));
}

/// e2e row 10: a NodePort service is served on node-1's InternalIP (from its Node object) at
/// the nodePort, besides its ClusterIP; node-2's address is not ours; a new node address moves
/// the frontend.
#[test]
fn e2e_10_nodeport_on_the_node_address() {
    let c = Cluster::start(&[2, 3], &[], nodeport_seed);
    c.wait_for_pods(40, Some(&[2, 3]), WAIT);
    c.agent.wait_for_backends(NODE1, 30080, Some(&backends(&[2, 3])), WAIT).unwrap();
    assert!(!frontends(&c.agent).contains(&(NODE_IPS[1], 30080)), "node-2's address is not ours");
    assert_served_by(&c.connect_to(NODE1, 30080, 100), 100, &[2, 3]);

    let moved = Ipv4Addr::new(172, 18, 0, 5);
    c.server.apply_raw("Node", node("node-1", moved));
    c.agent.wait_for_backends(moved, 30080, Some(&backends(&[2, 3])), WAIT).unwrap();
    c.agent.wait_for_backends(NODE1, 30080, None, WAIT).unwrap();
    c.wait_for_pods(40, Some(&[2, 3]), WAIT);
}

/// `--nodeport-addresses 10.0.0.0/8` leaves node-1's 172.18.0.2 out: no nodePort frontend,
/// the ClusterIP still there.
#[test]
fn nodeport_addresses_filter_the_node_address() {
    let c = Cluster::start(&[2, 3], &["--nodeport-addresses", "10.0.0.0/8"], nodeport_seed);
    c.wait_for_pods(40, Some(&[2, 3]), WAIT);
    let programmed = frontends(&c.agent);
    assert!(programmed.iter().all(|(_, port)| *port != 30080), "no nodePort frontend: {programmed:?}");
    assert_eq!(c.agent.count(NODE1, 30080).unwrap(), None);
    assert_eq!(c.connect_to(NODE1, 30080, 3).answered(), 0);
}

/// An agent started against an empty cluster (no Service, no EndpointSlice, no Node yet) must
/// still complete its first sync: that sync is where the entries an earlier agent left behind
/// are swept, and the first `synced` line is what readiness waits for.
#[test]
fn first_sync_happens_on_an_empty_cluster() {
    let topology = SingleNode::new(&[("pod-2", pod_ip(2))], TARGET_PORT).unwrap();
    let (_runtime, server) = api_server_in(&topology.node);
    let kubeconfig = kubeconfig(&server);
    let agent = start_agent(&topology, &kubeconfig, &[]);
    let agent = agent.expect("the agent completes a first sync on an empty cluster");
    server.apply(&web("web", 10));
    server.apply(&endpoints("web", &[2]));
    agent.wait_for_backends(vip(10), PORT, Some(&backends(&[2])), WAIT).unwrap();
}

// ---- dual stack (issue 14) ----

/// The dual-stack service's ClusterIPs: `clusterIPs[0]` (IPv4) and the IPv6 one.
const DUAL_VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const DUAL_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x14);

/// Address `n` on node-1's IPv6 pod network `fd00:10:244:1::/64`.
fn pod_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, n.into())
}

/// What pod `n` answers on its IPv6 address (its IPv4 server answers `pod-<n>`).
fn pod_name6(n: u8) -> String {
    format!("pod-{n}-v6")
}

/// Servers on pods' IPv6 addresses, answering every TCP connection and UDP datagram on port 80
/// with `pod-<n>-v6`; they stop on drop.
struct Ipv6Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Ipv6Servers {
    /// Puts node-1's bridge, the pods `pods` and the client pod on `fd00:10:244:1::/64` (`nodad`:
    /// nothing waits on duplicate address detection; on-link, so nothing is routed beyond the
    /// bridge) and starts a server in each pod.
    fn start(topology: &SingleNode, pods: &[u8]) -> Self {
        let add = |ns: &Netns, dev: &str, n: u8| {
            ns.ip(&["-6", "addr", "add", &format!("{}/64", pod_ip6(n)), "dev", dev, "nodad"]).expect("an IPv6 address");
        };
        add(&topology.node, "br0", 1);
        add(&topology.client.ns, "eth0", 200);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (pod, &n) in topology.pods.iter().zip(pods) {
            add(&pod.ns, "eth0", n);
            let bound = thread::scope(|s| {
                s.spawn(|| {
                    pod.ns.enter().expect("entering the pod");
                    let at = SocketAddr::from((pod_ip6(n), TARGET_PORT));
                    (TcpListener::bind(at).expect("binding tcp"), UdpSocket::bind(at).expect("binding udp"))
                })
                .join()
                .expect("binding in the pod")
            });
            let (tcp, udp) = bound;
            tcp.set_nonblocking(true).unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let answer = format!("{}\n", pod_name6(n));
            let (stop_tcp, answer_tcp) = (stop.clone(), answer.clone());
            threads.push(thread::spawn(move || {
                while !stop_tcp.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut conn, _)) => {
                            let _ = std::io::Write::write_all(&mut conn, answer_tcp.as_bytes());
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
            let stop_udp = stop.clone();
            threads.push(thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop_udp.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(answer.as_bytes(), peer);
                    }
                }
            }));
        }
        Self { stop, threads }
    }
}

impl Drop for Ipv6Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// `default/dual`: RequireDualStack, ClusterIPs 10.96.0.20 and fd00:10:96::14, TCP and UDP on
/// 6666, as the API server allocates them.
fn dual_stack_service() -> Service {
    let mut svc = service("dual").named_port("tcp", PORT.into(), "TCP").named_port("udp", PORT.into(), "UDP").build();
    let spec = svc.spec.as_mut().expect("a spec");
    spec.cluster_ip = Some(DUAL_VIP4.to_string());
    spec.cluster_ips = Some(vec![DUAL_VIP4.to_string(), DUAL_VIP6.to_string()]);
    spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
    spec.ip_family_policy = Some("RequireDualStack".into());
    svc
}

/// The slice `dual-<suffix>` of `address_type` with `addresses` on port 80, TCP and UDP.
fn dual_stack_slice(suffix: &str, address_type: &str, addresses: &[String]) -> EndpointSlice {
    let mut slice = slice("dual", suffix)
        .named_port("tcp", TARGET_PORT.into(), "TCP")
        .named_port("udp", TARGET_PORT.into(), "UDP")
        .endpoints(addresses.iter().map(String::as_str))
        .build();
    slice.address_type = address_type.into();
    slice
}

/// `count` probes of `mode` (`tcp-peer`, `udp-peer`) from the client pod to `to`: the backend
/// names that answered, and the addresses the answers came from (getpeername for TCP, the
/// reply's source for UDP).
fn peers(c: &Cluster, mode: &str, to: SocketAddr, count: usize) -> (BTreeSet<String>, BTreeSet<String>) {
    let tally = probe(
        PROBE.as_ref(),
        &c.topology.client.ns,
        Some(&c.topology.cgroup),
        &[mode, &to.to_string(), &count.to_string(), "300"],
    )
    .expect("running the probe");
    assert_eq!(tally.answered(), count, "{mode} {to}: every probe is answered: {tally:?}");
    let split = tally.answers.keys().map(|a| a.split_once('@').expect("answer@peer"));
    (split.clone().map(|(name, _)| name.to_owned()).collect(), split.map(|(_, peer)| peer.to_owned()).collect())
}

/// Issue 14's "done when", socket path, through the real API: a RequireDualStack Service with
/// one IPv4 and one IPv6 EndpointSlice is reached from a pod through both ClusterIPs, and
/// through `::ffff:` + its IPv4 ClusterIP on an AF_INET6 socket, over TCP and UDP; each family
/// reaches only its own family's endpoints, and `getpeername()` and UDP replies show the
/// address the client used.
#[test]
fn a_dual_stack_service_is_reached_through_both_clusterips_and_the_ipv4_mapped_one() {
    let c = Cluster::start(&[2, 3], &[], |_| {});
    let _servers = Ipv6Servers::start(&c.topology, &[2, 3]);
    let v4: Vec<String> = [2, 3].iter().map(|n| pod_ip(*n).to_string()).collect();
    let v6: Vec<String> = [2, 3].iter().map(|n| pod_ip6(*n).to_string()).collect();
    c.server.apply(&dual_stack_service());
    c.server.apply(&dual_stack_slice("v4", "IPv4", &v4));
    c.server.apply(&dual_stack_slice("v6", "IPv6", &v6));
    c.agent.wait_for_backends(DUAL_VIP4, PORT, Some(&backends(&[2, 3])), WAIT).unwrap();
    wait_until("the IPv6 ClusterIP has both IPv6 endpoints", WAIT, || {
        c.agent.backends_of(DUAL_VIP6, PORT).ok().flatten().map(|b| b.into_iter().collect::<BTreeSet<_>>())
            == Some(v6.iter().map(|a| SocketAddr::new(a.parse().unwrap(), TARGET_PORT)).collect())
    });

    // default/kubernetes and the IPv4 ClusterIP's TCP and UDP ports; the IPv6 ClusterIP's two.
    let (status, text) =
        http_get(&c.topology.node, SocketAddr::from((Ipv4Addr::LOCALHOST, 10249)), "/metrics").unwrap();
    assert_eq!(status, 200);
    for series in [r#"proxy_frontends_programmed{family="ipv4"} 3"#, r#"proxy_frontends_programmed{family="ipv6"} 2"#] {
        assert!(text.lines().any(|l| l == series), "{series} in /metrics:\n{text}");
    }

    let ipv4_pods: BTreeSet<String> = [2, 3].iter().map(|n| pod_name(*n)).collect();
    let ipv6_pods: BTreeSet<String> = [2, 3].iter().map(|n| pod_name6(*n)).collect();
    let mapped = SocketAddr::new(IpAddr::V6(DUAL_VIP4.to_ipv6_mapped()), PORT);
    let cases = [
        (SocketAddr::from((DUAL_VIP4, PORT)), &ipv4_pods),
        (SocketAddr::from((DUAL_VIP6, PORT)), &ipv6_pods),
        // An AF_INET6 socket to the IPv4 ClusterIP reaches the IPv4 endpoints.
        (mapped, &ipv4_pods),
    ];
    for (to, pods) in cases {
        for mode in ["tcp-peer", "udp-peer"] {
            let (names, seen_from) = peers(&c, mode, to, 40);
            assert_eq!(&names, pods, "{mode} {to}: each endpoint of its family answers, no other");
            assert_eq!(seen_from, BTreeSet::from([to.to_string()]), "{mode} {to}: the peer is the service address");
        }
    }

    // The IPv6 slice emptied: the IPv6 ClusterIP refuses while the IPv4 one still serves.
    c.server.apply(&dual_stack_slice("v6", "IPv6", &[]));
    wait_until("the IPv6 ClusterIP has no endpoint", WAIT, || {
        c.agent.backends_of(DUAL_VIP6, PORT).ok().flatten().is_some_and(|b| b.is_empty())
    });
    let refused = probe(
        PROBE.as_ref(),
        &c.topology.client.ns,
        Some(&c.topology.cgroup),
        &["tcp", &SocketAddr::from((DUAL_VIP6, PORT)).to_string(), "5", "300"],
    )
    .expect("running the probe");
    assert_eq!(refused.errors.get("refused"), Some(&5), "REJECT per family: {refused:?}");
    let (names, _) = peers(&c, "tcp-peer", SocketAddr::from((DUAL_VIP4, PORT)), 20);
    assert_eq!(names, ipv4_pods, "the IPv4 family is untouched");
}

/// node-1's IPv6 InternalIP, inside `--nodeport-addresses`, and an IPv6 ExternalIP outside it.
const NODE1_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, 2);
const NODE1_V6_FILTERED: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2);

/// A dual-stack node-1 and the dual-stack service as a NodePort on 30081 (TCP), with a slice of
/// each family.
fn dual_stack_nodeport_seed(server: &ApiServer) {
    server.apply_raw(
        "Node",
        json!({
            "metadata": {"name": "node-1"},
            // Only the IPv6 range: the TC program must find br0 through the IPv6 routes.
            "spec": {"podCIDRs": ["fd00:10:244:1::/64"]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": NODE1.to_string()},
                {"type": "InternalIP", "address": NODE1_V6.to_string()},
                {"type": "ExternalIP", "address": NODE1_V6_FILTERED.to_string()},
            ]},
        }),
    );
    let mut svc = dual_stack_service();
    let spec = svc.spec.as_mut().expect("a spec");
    spec.type_ = Some("NodePort".into());
    spec.ports.as_mut().expect("ports")[0].node_port = Some(30081);
    server.apply(&svc);
    let v4: Vec<String> = [2, 3].iter().map(|n| pod_ip(*n).to_string()).collect();
    let v6: Vec<String> = [2, 3].iter().map(|n| pod_ip6(*n).to_string()).collect();
    server.apply(&dual_stack_slice("v4", "IPv4", &v4));
    server.apply(&dual_stack_slice("v6", "IPv6", &v6));
}

/// A nodePort is served on the node's addresses of both families (its Node object's InternalIPs),
/// each family's with that family's endpoints; `--nodeport-addresses` takes IPv6 ranges beside
/// IPv4 ones (an IPv6 range used to stop the agent at start) and filters each family; no
/// localhost nodePort on IPv6. Traffic from a pod goes through the socket path. The node's only
/// pod range is IPv6 (`spec.podCIDRs`): the TC program goes on the bridge routing into it.
#[test]
fn a_nodeport_is_served_on_the_nodes_ipv6_address_too() {
    let filter = ["--nodeport-addresses", "172.18.0.0/16,fd00:172:18::/64"];
    let c = Cluster::start(&[2, 3], &filter, dual_stack_nodeport_seed);
    let _servers = Ipv6Servers::start(&c.topology, &[2, 3]);
    c.agent.wait_for_backends(NODE1, 30081, Some(&backends(&[2, 3])), WAIT).unwrap();
    let v6_backends: BTreeSet<SocketAddr> =
        [2, 3].iter().map(|n| SocketAddr::from((pod_ip6(*n), TARGET_PORT))).collect();
    wait_until("the IPv6 node address serves the nodePort", WAIT, || {
        c.agent.backends_of(NODE1_V6, 30081).ok().flatten().map(|b| b.into_iter().collect::<BTreeSet<_>>())
            == Some(v6_backends.clone())
    });
    assert_eq!(c.agent.count(NODE1_V6_FILTERED, 30081).unwrap(), None, "outside --nodeport-addresses");
    assert_eq!(c.agent.count(Ipv6Addr::LOCALHOST, 30081).unwrap(), None, "no IPv6 localhost nodePort");

    let ipv6_pods: BTreeSet<String> = [2, 3].iter().map(|n| pod_name6(*n)).collect();
    let (names, _) = peers(&c, "tcp-peer", SocketAddr::from((NODE1_V6, 30081)), 40);
    assert_eq!(names, ipv6_pods);
    let ipv4_pods: BTreeSet<String> = [2, 3].iter().map(|n| pod_name(*n)).collect();
    let (names, _) = peers(&c, "tcp-peer", SocketAddr::from((NODE1, 30081)), 40);
    assert_eq!(names, ipv4_pods);

    // The bridge got its IPv6 route when the pods got their addresses; the next rescan finds it.
    wait_until("tc_ingress attached to br0 for the IPv6 pod range", WAIT, || {
        c.agent.lines().iter().any(|l| {
            l.message.starts_with("attached")
                && l.text("program") == Some("tc_ingress")
                && l.text("interface") == Some("br0")
        })
    });
}
