//! Operating the agent, against a real agent process and the real kernel: `/healthz` and
//! `/metrics` scraped over HTTP (inside the node's network namespace, on 127.0.0.1), health
//! that follows the kernel's attachment and not a flag, `--cleanup` leaving nothing, and SIGTERM
//! leaving the datapath to a successor that adopts it while the service keeps answering.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant, SystemTime},
};

use proxy_common::maps;
use proxy_tests::{
    agent::Agent,
    cgroup::Cgroup,
    client::{Tally, probe},
    cluster::{Manifests, SEED_PORT as PORT, SEED_VIP as VIP, TARGET_PORT, cluster_node, pod_ip},
    fixtures::{service, yaml},
    netns::{Netns, run},
    topology::SingleNode,
};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(5);
/// The agent's servers, on loopback inside the node's namespace.
const HEALTHZ: u16 = 10256;
const METRICS: u16 = 10249;
const SERVER_FLAGS: [&str; 4] =
    ["--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249"];

/// The seed service with `endpoints` on node-1, and `extra` YAML beside it.
fn manifests(endpoints: &[Ipv4Addr], extra: &str) -> Manifests {
    let manifests = Manifests::new("proxy-ops-manifests");
    manifests.seed(endpoints);
    if !extra.is_empty() {
        manifests.write("extra.yaml", extra);
    }
    manifests
}

/// node-1 as a bare namespace (no interfaces but `lo`), a cgroup, and the agent running in the
/// namespace with both servers on its loopback.
struct Bare {
    // Field order: the agent goes first, then its namespace and cgroup.
    agent: Agent,
    _manifests: Manifests,
    cgroup: Cgroup,
    node: Netns,
}

fn bare(extra_yaml: &str, extra_flags: &[&str]) -> Bare {
    let node = Netns::new("opsnode").expect("a namespace");
    let cgroup = Cgroup::new("proxy-ops").expect("a cgroup");
    let manifests = manifests(&[pod_ip(0, 2), pod_ip(0, 3)], extra_yaml);
    let agent = manifests.start_agent(AGENT, &node, &cgroup, "node-1", &[&SERVER_FLAGS[..], extra_flags].concat());
    agent.wait_for_count(VIP, PORT, Some(2), WAIT).expect("the service is programmed");
    Bare { agent, _manifests: manifests, cgroup, node }
}

/// An HTTP answer.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// One HTTP/1.1 request to 127.0.0.1:`port` inside `ns` (from a thread that enters it),
/// retrying the connect for a moment while the server starts.
fn http(ns: &Netns, port: u16, method: &str, path: &str) -> Response {
    thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("entering the node's namespace");
            let deadline = Instant::now() + WAIT;
            let mut stream = loop {
                match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
                    Ok(stream) => break stream,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("connecting to 127.0.0.1:{port} in {}: {e}", ns.name()),
                }
            };
            stream.set_read_timeout(Some(WAIT)).expect("timeout");
            let request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).expect("sending the request");
            let mut raw = String::new();
            stream.read_to_string(&mut raw).expect("reading the response");
            let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP response: {raw:?}"));
            let mut lines = head.lines();
            let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            Response { status: status.expect("a status code"), headers, body: body.to_owned() }
        })
        .join()
        .expect("the HTTP thread")
    })
}

/// `/healthz`: the status and the JSON body.
fn healthz(ns: &Netns) -> (u16, Value) {
    let response = http(ns, HEALTHZ, "GET", "/healthz");
    assert_eq!(response.headers.get("content-type").map(String::as_str), Some("application/json"));
    let body = serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("{e}: {:?}", response.body));
    (response.status, body)
}

/// Polls `/healthz` until it answers `status`.
fn wait_for_healthz(ns: &Netns, status: u16) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (now, body) = healthz(ns);
        if now == status {
            return body;
        }
        assert!(Instant::now() < deadline, "/healthz answers {now}, not {status}: {body}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn timestamp(body: &Value, field: &str) -> k8s_openapi::jiff::Timestamp {
    body[field].as_str().and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{field} is an RFC 3339 time: {body}"))
}

/// The Prometheus text of `/metrics`, as `name{labels}` → value.
fn metrics(ns: &Netns) -> BTreeMap<String, f64> {
    let response = http(ns, METRICS, "GET", "/metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    let content_type = response.headers.get("content-type").cloned().unwrap_or_default();
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    assert!(response.body.trim_end().ends_with("# EOF"), "a complete exposition");
    response
        .body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {l}"));
            (series.to_owned(), value.parse().unwrap_or_else(|_| panic!("a number in {l}")))
        })
        .collect()
}

fn metric(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples.get(series).unwrap_or_else(|| panic!("no {series} in /metrics: {:#?}", samples.keys()))
}

fn bpftool(args: &[&str]) -> Value {
    let program = ["/usr/sbin/bpftool", "/sbin/bpftool", "bpftool"]
        .into_iter()
        .find(|p| !p.contains('/') || Path::new(p).exists())
        .expect("bpftool");
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = run(program, &full).expect("bpftool (`cargo xtask setup` installs it)");
    if out.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool {args:?}: {e}: {out}"))
}

/// The programs attached directly to `cgroup`, as `bpftool cgroup show` lists them.
fn cgroup_programs(cgroup: &Path) -> Vec<Value> {
    let listed = bpftool(&["cgroup", "show", &cgroup.to_string_lossy()]);
    listed.as_array().cloned().unwrap_or_default()
}

/// The socket programs the agent attaches to its cgroup, one link each: the IPv4 hooks and
/// their IPv6 twins, sorted by name.
const SOCKET_PROGRAMS: [&str; 8] =
    ["connect4", "connect6", "getpeername4", "getpeername6", "recvmsg4", "recvmsg6", "sendmsg4", "sendmsg6"];

/// The names of the programs attached to `cgroup`, sorted.
fn program_names(cgroup: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        cgroup_programs(cgroup).iter().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect();
    names.sort();
    names
}

#[test]
fn healthz_is_200_with_its_json_body_after_a_sync() {
    let node = bare("", &[]);
    let (status, body) = healthz(&node.node);
    assert_eq!(status, 200, "{body}");
    let (updated, now) = (timestamp(&body, "lastUpdated"), timestamp(&body, "currentTime"));
    assert!(updated <= now, "{body}");
    let wall = k8s_openapi::jiff::Timestamp::try_from(SystemTime::now()).expect("now");
    assert!(wall.duration_since(updated).as_secs() < 30, "the last sync was just now: {body}");
    assert_eq!(body["problems"], Value::Array(Vec::new()));

    // Only GET and HEAD of /healthz.
    assert_eq!(http(&node.node, HEALTHZ, "GET", "/nope").status, 404);
    let post = http(&node.node, HEALTHZ, "POST", "/healthz");
    assert_eq!(post.status, 405);
    assert_eq!(post.headers.get("allow").map(String::as_str), Some("GET, HEAD"));
    assert_eq!(http(&node.node, HEALTHZ, "HEAD", "/healthz").status, 200);
}

/// The health check asks the kernel: a link detached under the agent (its pin still there)
/// makes `/healthz` 503, although nothing in the agent changed.
#[test]
fn healthz_is_503_once_the_program_is_detached_under_it() {
    let node = bare("", &[]);
    wait_for_healthz(&node.node, 200);
    assert_eq!(program_names(node.cgroup.path()), SOCKET_PROGRAMS, "the socket programs on the test cgroup");
    let pin = node.agent.bpf_root().join("links/connect4");
    bpftool(&["link", "detach", "pinned", &pin.to_string_lossy()]);
    assert!(pin.exists(), "the pin stays; only the kernel's attachment changed");
    assert!(!program_names(node.cgroup.path()).contains(&"connect4".to_owned()), "connect4 is detached");

    let body = wait_for_healthz(&node.node, 503);
    let problems = body["problems"].to_string();
    assert!(problems.contains("connect4") && problems.contains("detached"), "{body}");
    let samples = metrics(&node.node);
    assert_eq!(metric(&samples, r#"proxy_program_links{program="connect4",state="detached"}"#), 1.0);
    assert_eq!(metric(&samples, r#"proxy_program_links{program="connect4",state="attached"}"#), 0.0);
}

/// Removing the link's pin (its last reference) detaches the program: 503.
#[test]
fn healthz_is_503_once_the_links_pin_is_removed() {
    let node = bare("", &[]);
    wait_for_healthz(&node.node, 200);
    std::fs::remove_file(node.agent.bpf_root().join("links/connect4")).expect("unpinning connect4");
    let deadline = Instant::now() + WAIT;
    while program_names(node.cgroup.path()).contains(&"connect4".to_owned()) {
        assert!(Instant::now() < deadline, "the program is still attached after its last pin went");
        thread::sleep(Duration::from_millis(20));
    }
    let body = wait_for_healthz(&node.node, 503);
    assert!(body["problems"].to_string().contains("connect4 is gone"), "{body}");
}

#[test]
fn metrics_report_what_was_programmed() {
    // A second service with a malformed ClusterIP: skipped, counted by reason.
    let bad = yaml(&service("broken").cluster_ip("10.96.0.999").port(80).build());
    let node = bare(&bad, &["--services-map-size", "1024"]);
    // Map fill is counted on a timer (a scrape must not read whole maps): wait for the count
    // that follows the first sync.
    let deadline = Instant::now() + WAIT + 2 * proxy_agent::observe::MAP_FILL_REFRESH;
    let samples = loop {
        let samples = metrics(&node.node);
        if samples.get(r#"proxy_map_entries{map="backends"}"#) == Some(&2.0) {
            break samples;
        }
        assert!(Instant::now() < deadline, "the backends map's count never reached 2: {samples:#?}");
        thread::sleep(Duration::from_millis(200));
    };
    let maps_now = node.agent.maps().expect("the pinned maps");

    assert_eq!(metric(&samples, r#"proxy_frontends_programmed{family="ipv4"}"#), 1.0);
    assert_eq!(metric(&samples, r#"proxy_frontends_programmed{family="ipv6"}"#), 0.0);
    assert_eq!(metric(&samples, "proxy_backends_programmed"), 2.0);
    assert!(metric(&samples, r#"proxy_skipped_objects_total{reason="bad_address"}"#) >= 1.0);
    assert!(metric(&samples, "proxy_sync_duration_seconds_count") >= 1.0);
    let last_sync = metric(&samples, "proxy_last_sync_timestamp_seconds");
    let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_secs_f64();
    assert!((unix - last_sync).abs() < 60.0, "last sync at {last_sync}, now {unix}");
    assert_eq!(metric(&samples, r#"proxy_program_links{program="connect4",state="attached"}"#), 1.0);
    assert_eq!(metric(&samples, r#"proxy_program_links{program="connect4",state="detached"}"#), 0.0);

    // Map fill, per map, as the kernel has it.
    let services = maps_now.services().count() as f64;
    assert!(services >= 3.0, "a master entry and two slots at least");
    assert_eq!(metric(&samples, r#"proxy_map_entries{map="services"}"#), services);
    assert_eq!(metric(&samples, r#"proxy_map_max_entries{map="services"}"#), 1024.0);
    assert_eq!(metric(&samples, r#"proxy_map_fill_ratio{map="services"}"#), services / 1024.0);
    assert_eq!(metric(&samples, r#"proxy_map_entries{map="backends"}"#), maps_now.backends().count() as f64);
    assert_eq!(metric(&samples, r#"proxy_map_entries{map="service_names"}"#), maps_now.service_names().count() as f64);
    assert_eq!(metric(&samples, r#"proxy_map_entries{map="affinity"}"#), 0.0);
    for map in maps::ALL {
        let series = format!(r#"proxy_map_max_entries{{map="{map}"}}"#);
        assert!(metric(&samples, &series) > 0.0, "{series}");
    }
    if maps::ALL.contains(&"conntrack") {
        assert_eq!(metric(&samples, r#"proxy_map_entries{map="conntrack"}"#), 0.0, "no NodePort traffic yet");
    }
    assert_eq!(http(&node.node, METRICS, "GET", "/healthz").status, 404, "the metrics server serves /metrics");
}

fn agent_cleanup(root: &Path) -> std::process::Output {
    Command::new(AGENT).arg("--cleanup").arg("--bpf-root").arg(root).output().expect("running --cleanup")
}

fn link_exists(id: u32) -> bool {
    let program = if Path::new("/usr/sbin/bpftool").exists() { "/usr/sbin/bpftool" } else { "bpftool" };
    Command::new(program).args(["link", "show", "id", &id.to_string()]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn cleanup_leaves_nothing_and_is_safe_to_repeat() {
    let mut node = bare(&yaml(&cluster_node(0, "")), &["--cluster-cidr", "10.244.0.0/16"]);
    // An interface routing into the pod range: the TC ingress program goes there; and one
    // holding the node's address: both TC programs go there.
    for (interface, peer, address) in [("ops0", "ops1", "10.244.1.1/24"), ("ops2", "ops3", "172.18.0.2/16")] {
        node.node.ip(&["link", "add", interface, "type", "veth", "peer", "name", peer]).expect("a veth");
        node.node.ip(&["addr", "add", address, "dev", interface]).expect("an address");
        node.node.ip(&["link", "set", interface, "up"]).expect("up");
        node.node.ip(&["link", "set", peer, "up"]).expect("up");
    }
    let root = node.agent.bpf_root().to_owned();
    let links = root.join("links");
    let want = ["tc_ingress-ops0", "tc_ingress-ops2", "tc_egress-ops2"];
    // Asked from inside the node's namespace, where the interface indexes mean its interfaces.
    let pinned_now = || {
        thread::scope(|s| {
            s.spawn(|| {
                node.node.enter().expect("entering the node's namespace");
                proxy_agent::observe::kernel::pinned_links(&links, node.cgroup.path()).expect("links")
            })
            .join()
            .expect("the thread in the node's namespace does not panic")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pinned = pinned_now();
    while !want.iter().all(|w| pinned.iter().any(|l| l.pin == *w)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        pinned = pinned_now();
    }
    for pin in want {
        assert!(pinned.iter().any(|l| l.pin == pin && l.attached), "{pin} is pinned and attached: {pinned:?}");
    }
    assert!(!pinned.iter().any(|l| l.pin == "tc_egress-ops0"), "no egress program on a pod-side interface");
    let ids: Vec<u32> = pinned.iter().filter_map(|l| l.info.map(|i| i.id)).collect();
    assert!(ids.len() >= 2, "connect4 and TC links are pinned: {pinned:?}");
    assert!(ids.iter().all(|id| link_exists(*id)));

    // The agent dies (SIGKILL): everything stays pinned and attached.
    node.agent.kill();
    assert_eq!(program_names(node.cgroup.path()), SOCKET_PROGRAMS);

    let out = agent_cleanup(&root);
    assert!(out.status.success(), "--cleanup: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!root.exists(), "the bpffs root is gone");
    assert_eq!(cgroup_programs(node.cgroup.path()), Vec::<Value>::new(), "nothing on the cgroup");
    for id in ids {
        assert!(!link_exists(id), "link {id} is gone (bpftool link show id {id})");
    }

    // Twice, and on an empty or missing root: nothing to do, success.
    let again = agent_cleanup(&root);
    assert!(again.status.success(), "--cleanup again: {}", String::from_utf8_lossy(&again.stderr));
    let empty = PathBuf::from(format!("/sys/fs/bpf/proxy-test-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("an empty root");
    let out = agent_cleanup(&empty);
    assert!(out.status.success(), "--cleanup on an empty root: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!empty.exists());
    let out = agent_cleanup(&empty);
    assert!(out.status.success(), "--cleanup on a missing root: {}", String::from_utf8_lossy(&out.stderr));
}

/// The kernel's ids of the pinned maps (the same ids: the same maps).
fn map_ids(root: &Path) -> Vec<u64> {
    maps::ALL
        .iter()
        .map(|m| {
            let shown = bpftool(&["map", "show", "pinned", &root.join(m).to_string_lossy()]);
            shown["id"].as_u64().unwrap_or_else(|| panic!("map {m}: {shown}"))
        })
        .collect()
}

fn connect(topology: &SingleNode, count: usize) -> Tally {
    let target = format!("{VIP}:{PORT}");
    probe(PROBE.as_ref(), &topology.client.ns, Some(&topology.cgroup), &["tcp", &target, &count.to_string(), "500"])
        .expect("running the probe")
}

#[test]
fn sigterm_leaves_the_datapath_and_a_new_agent_adopts_it() {
    let pods = [("pod-2", pod_ip(0, 2)), ("pod-3", pod_ip(0, 3))];
    let topology = SingleNode::new(&pods, TARGET_PORT).expect("building the namespaces");
    let manifests = manifests(&[pods[0].1, pods[1].1], "");
    // The node's pod bridge routes into the cluster's pod range: the TC program goes there.
    let extra = [&["--cluster-cidr", "10.244.0.0/16"][..], &SERVER_FLAGS[..]].concat();
    // The same flags again for the successor below.
    let flags = manifests.agent_flags("node-1", &extra);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut agent =
        Agent::start_in(Some(&topology.node), AGENT.as_ref(), topology.cgroup.path(), &flags).expect("the agent");
    agent.wait_for_count(VIP, PORT, Some(2), WAIT).expect("programmed");
    // Healthy with the TC program on the node's interfaces too.
    let links = agent.bpf_root().join("links");
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_dir(&links)
        .expect("links")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("tc_"))
    {
        assert!(Instant::now() < deadline, "no TC link pinned:\n{}", agent.log());
        thread::sleep(Duration::from_millis(50));
    }
    let body = wait_for_healthz(&topology.node, 200);
    assert_eq!(body["problems"], Value::Array(Vec::new()));
    let root = agent.bpf_root().to_owned();
    let maps_before = map_ids(&root);

    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        // Connections all along: before, while no agent runs, and after the new one took over.
        let traffic = s.spawn(|| {
            let mut total = Tally::default();
            // Bounded: a failed assertion on the main thread must not leave this running.
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                let batch = connect(&topology, 20);
                for (k, v) in batch.answers {
                    *total.answers.entry(k).or_default() += v;
                }
                for (k, v) in batch.errors {
                    *total.errors.entry(k).or_default() += v;
                }
            }
            total
        });

        thread::sleep(Duration::from_millis(300));
        agent.terminate(WAIT).expect("the agent exits on SIGTERM");
        assert!(agent.mentions("programs and maps stay in place"), "{}", agent.log());
        // No agent now: programs and maps stay, the service keeps answering.
        assert_eq!(program_names(topology.cgroup.path()), SOCKET_PROGRAMS, "the socket programs stay attached");
        assert_eq!(map_ids(&root), maps_before, "the maps are still pinned");
        let meanwhile = connect(&topology, 50);
        assert_eq!(meanwhile.answered(), 50, "answered with no agent running: {meanwhile:?}");

        // The successor adopts the pinned maps (same map ids, the same entries).
        agent.restart(AGENT.as_ref(), topology.cgroup.path(), &flags).expect("a new agent");
        agent.wait_for_log("synced", Duration::from_secs(20)).expect("the new agent syncs");
        assert_eq!(map_ids(&root), maps_before, "adopted, not recreated");
        agent.wait_for_count(VIP, PORT, Some(2), WAIT).expect("still programmed");
        wait_for_healthz(&topology.node, 200);
        assert_eq!(program_names(topology.cgroup.path()), SOCKET_PROGRAMS, "one of each: the old links were replaced");
        thread::sleep(Duration::from_millis(300));

        stop.store(true, Ordering::Relaxed);
        let during = traffic.join().expect("the traffic thread");
        assert!(during.errors.is_empty(), "no connection failed across the restart: {during:?}");
        assert!(during.answered() > 0);
        assert!(during.from("pod-2") > 0 && during.from("pod-3") > 0, "both backends served: {during:?}");
    });
}

/// Pins left by an agent from before the `drops` map (layout 2 without it) are adopted as they
/// are: the successor keeps every other map (same ids), creates `drops` beside them, and its
/// programs count into the new map (a refused connect shows in `/metrics`).
#[test]
fn pins_from_before_the_drops_map_are_adopted_and_the_map_created() {
    let node = Netns::new("opsnode").expect("a namespace");
    let cgroup = Cgroup::new("proxy-ops").expect("a cgroup");
    let manifests = manifests(&[], "");
    let mut flags = vec!["--manifests".to_owned(), manifests.arg(), "--hostname-override".into(), "node-1".into()];
    flags.extend(SERVER_FLAGS.iter().map(|f| (*f).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut agent = Agent::start_in(Some(&node), AGENT.as_ref(), cgroup.path(), &flags).expect("starting the agent");
    agent.wait_for_count(VIP, PORT, Some(0), WAIT).expect("the service is programmed, without endpoints");
    let root = agent.bpf_root().to_owned();
    agent.terminate(WAIT).expect("the agent exits on SIGTERM");
    std::fs::remove_file(root.join(maps::DROPS)).expect("unpinning drops, as an older agent never pinned it");
    let others: Vec<&str> = maps::ALL.iter().copied().filter(|m| *m != maps::DROPS).collect();
    let ids = |names: &[&str]| -> Vec<u64> {
        names
            .iter()
            .map(|m| bpftool(&["map", "show", "pinned", &root.join(m).to_string_lossy()])["id"].as_u64().unwrap_or(0))
            .collect()
    };
    let before = ids(&others);

    agent.restart(AGENT.as_ref(), cgroup.path(), &flags).expect("a new agent");
    agent.wait_for_log("synced", Duration::from_secs(20)).expect("the new agent syncs");
    assert_eq!(ids(&others), before, "every other map adopted, not recreated");
    assert!(root.join(maps::DROPS).exists(), "the drops map is pinned");
    let target = format!("{VIP}:{PORT}");
    let refused = probe(PROBE.as_ref(), &node, Some(&cgroup), &["tcp", &target, "1", "500"]).expect("probing");
    assert_eq!(refused.errors.get("refused"), Some(&1), "{refused:?}");
    let samples = metrics(&node);
    assert_eq!(metric(&samples, r#"proxy_datapath_drops_total{reason="connect_refused"}"#), 1.0);
}

/// `enum bpf_cmd`, `enum bpf_prog_type` and `enum bpf_attach_type` values (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;

/// `attr` of `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `attr` of `BPF_LINK_CREATE` for a TCX link (appended: no relative program).
#[repr(C)]
struct TcxLinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, with its size; its
    // pointers point into buffers that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both commands return a new file descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(rc as i32) })
}

/// Fills the TCX ingress hook of `interface` in `ns` with do-nothing programs (`return
/// TCX_NEXT`) until the kernel refuses another (ERANGE: a hook holds at most
/// `MAX_BPF_MPROG_CNT` programs), so that attaching one more fails while the interface stays.
/// Closing the returned links detaches the programs.
fn fill_tcx_ingress(ns: &Netns, interface: &str) -> Vec<std::os::fd::OwnedFd> {
    // r0 = -1 (TCX_NEXT); exit.
    let insns: [u64; 2] = [0xffff_ffff_0000_00b7, 0x95];
    let license = c"GPL";
    thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("entering the node's namespace");
            let name = std::ffi::CString::new(interface).expect("an interface name");
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(ifindex, 0, "{interface} in {}", ns.name());
            let mut links = Vec::new();
            for _ in 0..100 {
                let mut load = ProgLoad {
                    prog_type: BPF_PROG_TYPE_SCHED_CLS,
                    insn_cnt: insns.len() as u32,
                    insns: insns.as_ptr() as u64,
                    license: license.as_ptr() as u64,
                    log_level: 0,
                    log_size: 0,
                    log_buf: 0,
                    kern_version: 0,
                    prog_flags: 0,
                    prog_name: *b"filler\0\0\0\0\0\0\0\0\0\0",
                    prog_ifindex: 0,
                    expected_attach_type: BPF_TCX_INGRESS,
                };
                let program = bpf(BPF_PROG_LOAD, &mut load).expect("loading a do-nothing TC program");
                let mut link = TcxLinkCreate {
                    prog_fd: std::os::fd::AsRawFd::as_raw_fd(&program) as u32,
                    target_ifindex: ifindex,
                    attach_type: BPF_TCX_INGRESS,
                    flags: 0,
                    relative_fd: 0,
                    _pad: 0,
                    expected_revision: 0,
                };
                match bpf(BPF_LINK_CREATE, &mut link) {
                    Ok(link) => links.push(link),
                    Err(e) if e.raw_os_error() == Some(libc::ERANGE) => return links,
                    Err(e) => panic!("attaching filler program {} to {interface}: {e}", links.len() + 1),
                }
            }
            panic!("{interface} took 100 TCX programs: no limit to provoke a failed attach with");
        })
        .join()
        .expect("the filling thread")
    })
}

/// An interface that should carry the TC program but refuses it (its TCX hook is full) is not
/// skipped quietly: a warning, `/healthz` 503 naming the interface, and
/// `proxy_interfaces_unattached`; once the hook has room, the next rescan attaches the program
/// and all is well again.
#[test]
fn an_interface_the_tc_program_cannot_be_attached_to_is_reported_until_it_is() {
    let ns = Netns::new("opsattach").expect("a namespace");
    // A veth pair inside the namespace (this kernel has no dummy interfaces).
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]).expect("an interface");
    ns.ip(&["link", "set", "eth0p", "up"]).expect("eth0p up");
    ns.ip(&["addr", "add", "172.18.0.2/24", "dev", "eth0"]).expect("the node's address");
    ns.ip(&["link", "set", "eth0", "up"]).expect("eth0 up");
    let fillers = fill_tcx_ingress(&ns, "eth0");
    let cgroup = Cgroup::new("proxy-ops-attach").expect("a cgroup");
    let manifests = manifests(&[pod_ip(0, 2)], &yaml(&cluster_node(0, "")));
    let mut flags = vec!["--manifests".to_owned(), manifests.arg(), "--hostname-override".into(), "node-1".into()];
    flags.extend(SERVER_FLAGS.iter().map(|f| (*f).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut agent = Agent::start_in(Some(&ns), AGENT.as_ref(), cgroup.path(), &flags).expect("starting the agent");

    agent.wait_for_log("attaching the TC program failed", WAIT).expect("a warning about eth0");
    let lines = agent.lines();
    let warning = lines.iter().find(|l| l.message.starts_with("attaching the TC program failed")).expect("logged");
    assert_eq!(warning.level, "WARN", "{warning:?}");
    assert_eq!((warning.text("interface"), warning.text("program")), (Some("eth0"), Some("tc_ingress")), "{warning:?}");
    let body = wait_for_healthz(&ns, 503);
    let problems = body["problems"].to_string();
    assert!(problems.contains("interface eth0 should carry program tc_ingress"), "{body}");
    assert_eq!(metric(&metrics(&ns), "proxy_interfaces_unattached"), 1.0);
    // The egress hook had room: only the ingress program is missing.
    assert!(agent.bpf_root().join("links/tc_egress-eth0").exists());
    assert!(!agent.bpf_root().join("links/tc_ingress-eth0").exists());

    drop(fillers);
    agent.wait_for_log("attached after earlier failures", WAIT).expect("the rescan attaches it");
    wait_for_healthz(&ns, 200);
    assert_eq!(metric(&metrics(&ns), "proxy_interfaces_unattached"), 0.0);
    assert!(agent.bpf_root().join("links/tc_ingress-eth0").exists());
    drop(agent);
}
