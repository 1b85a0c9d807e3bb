//! `proxy-agent inspect` and `proxy-agent explain` against a datapath the real agent programmed
//! from a manifest directory. Every expected value comes from the manifests this test wrote
//! (addresses, ports, policies), never from the tool's own output.
//!
//! The agent runs in a namespace of its own (nothing to attach its TC program to there) with its
//! socket programs on a test cgroup; inspect and explain only read the pinned maps.

use std::{collections::BTreeSet, net::Ipv4Addr, process::Command, time::Duration};

use k8s_openapi::api::core::v1::{Service, SessionAffinityConfig};
use proxy_tests::{
    agent::Agent,
    cgroup::Cgroup,
    client::probe,
    cluster::{Manifests, NODE_IPS, SEED_PORT, SEED_VIP, TARGET_PORT},
    fixtures::{service, slice, yaml},
    netns::Netns,
    topology::SingleNode,
};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(5);
/// node-1's address (its nodePort address).
const NODE_IP: Ipv4Addr = NODE_IPS[0];
/// The client pod's and the external client's addresses of the plan, as command-line text.
const CLIENT_POD: &str = "10.244.1.200";
const EXTERNAL_CLIENT: &str = "172.18.0.100";

/// The agent on `manifests` as node-1, in a namespace of its own, attached to `cgroup`.
fn agent(ns: &Netns, cgroup: &Cgroup, manifests: &Manifests) -> Agent {
    manifests.start_agent(AGENT, ns, cgroup, "node-1", &[])
}

/// Runs `proxy-agent <args> --bpf-root ROOT -o json` and parses its output.
fn json(agent: &Agent, args: &[&str]) -> Value {
    agent.cli_json(AGENT, args)
}

/// Runs `proxy-agent <args> --bpf-root ROOT` (table output).
fn table(agent: &Agent, args: &[&str]) -> String {
    let out = Command::new(AGENT).args(args).arg("--bpf-root").arg(agent.bpf_root()).output().expect("running");
    assert!(out.status.success(), "proxy-agent {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn explain(agent: &Agent, from: &str, to: &str) -> Value {
    json(agent, &["explain", "--from", from, "--to", to])
}

/// The `inspect services` row of `frontend` (`address:port/PROTO`).
fn frontend(services: &Value, frontend: &str) -> Value {
    let rows = services.as_array().expect("inspect services prints a list");
    rows.iter()
        .find(|row| row["frontend"] == frontend)
        .cloned()
        .unwrap_or_else(|| panic!("no frontend {frontend} in {services:#}"))
}

/// The endpoints (`address:port`) of a scope row, sorted, after checking that the slots are
/// exactly 1..=count.
fn scope_endpoints(scope: &Value) -> Vec<String> {
    let backends = scope["backends"].as_array().expect("a scope lists its backends");
    let slots: Vec<u64> = backends.iter().map(|b| b["slot"].as_u64().unwrap()).collect();
    let count = scope["count"].as_u64().unwrap();
    assert_eq!(slots, (1..=count).collect::<Vec<_>>(), "slots in order, none missing: {scope:#}");
    let mut endpoints: Vec<String> = backends.iter().map(|b| b["endpoint"].as_str().unwrap().to_owned()).collect();
    endpoints.sort();
    endpoints
}

/// The endpoints and probabilities of an explain path, sorted by endpoint.
fn candidates(path: &Value) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = path["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["endpoint"].as_str().unwrap().to_owned(), c["probability"].as_f64().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn sorted(items: &[String]) -> Vec<String> {
    let mut items = items.to_vec();
    items.sort();
    items
}

fn spec(service: &mut Service) -> &mut k8s_openapi::api::core::v1::ServiceSpec {
    service.spec.as_mut().expect("the builder sets a spec")
}

/// A ClusterIP with two endpoints: inspect shows the frontend, its service and both
/// endpoints as addresses; backends lists them; explain gives each 1/2 for all traffic.
#[test]
fn cluster_ip_with_two_endpoints() {
    let (vip, port, target) = (SEED_VIP, SEED_PORT, TARGET_PORT);
    let pods = ["10.244.1.2", "10.244.1.3"];
    let manifests = Manifests::new("proxy-inspect");
    manifests.seed(&pods.map(|p| p.parse().unwrap()));
    let (ns, cgroup) = (Netns::new("agent").unwrap(), Cgroup::new("proxy-inspect").unwrap());
    let agent = agent(&ns, &cgroup, &manifests);
    agent.wait_for_count(vip, port, Some(2), WAIT).unwrap();
    let expected: Vec<String> = sorted(&pods.map(|p| format!("{p}:{target}")));

    let services = json(&agent, &["inspect", "services"]);
    let row = frontend(&services, &format!("{vip}:{port}/TCP"));
    assert_eq!(row["namespace"], "default");
    assert_eq!(row["name"], "apigw-test1");
    assert_eq!(row["service"], "default/apigw-test1");
    assert_eq!(row["kinds"], serde_json::json!(["ClusterIP"]));
    assert_eq!(row["two_scopes"], false);
    assert_eq!(row["scopes"].as_array().unwrap().len(), 1);
    assert_eq!(scope_endpoints(&row["scopes"][0]), expected);

    let backends = json(&agent, &["inspect", "backends"]);
    let mut listed: Vec<String> =
        backends.as_array().unwrap().iter().map(|b| b["endpoint"].as_str().unwrap().to_owned()).collect();
    listed.sort();
    assert_eq!(listed, pods.map(|p| format!("{p}:{target}/TCP")));
    for b in backends.as_array().unwrap() {
        assert_eq!(b["local"], true, "endpoints on node-1 are local to the agent's node: {b}");
        assert_eq!(b["used_by"], serde_json::json!(["default/apigw-test1"]));
    }

    let e = explain(&agent, CLIENT_POD, &format!("{vip}:{port}"));
    assert_eq!(e["service_frontend"], true);
    assert_eq!(e["frontend"]["service"], "default/apigw-test1");
    let paths = e["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 1, "one backend set serves all traffic: {e:#}");
    assert_eq!(paths[0]["origins"], serde_json::json!(["node", "outside"]));
    assert_eq!(paths[0]["verdict"], "random");
    let odds: Vec<(String, f64)> = expected.iter().map(|ep| (format!("{ep}/TCP"), 0.5)).collect();
    assert_eq!(candidates(&paths[0]), odds);

    let text = table(&agent, &["inspect", "services"]);
    let line = text.lines().find(|l| l.starts_with(&format!("{vip}:{port}/TCP"))).unwrap_or_else(|| panic!("{text}"));
    for ep in &expected {
        assert!(line.contains(ep.as_str()) && line.contains("default/apigw-test1"), "{text}");
    }
}

/// A NodePort service: its node address frontend (from the Node manifest) next to the
/// ClusterIP, both with the same endpoints; explain from the external client.
#[test]
fn node_port_service() {
    let (vip, port, node_port) = (Ipv4Addr::new(10, 96, 0, 11), 6666u16, 30066u16);
    let manifests = Manifests::new("proxy-inspect");
    manifests.put_nodes(&[""]);
    let svc = service("web").cluster_ip(&vip.to_string()).port(port.into()).node_port(node_port.into()).build();
    let eps = slice("web", "a").port(80).endpoints(["10.244.1.2", "10.244.1.3"]).build();
    manifests.put(&svc, [&eps]);
    let (ns, cgroup) = (Netns::new("agent").unwrap(), Cgroup::new("proxy-inspect").unwrap());
    let agent = agent(&ns, &cgroup, &manifests);
    agent.wait_for_count(NODE_IP, node_port, Some(2), WAIT).unwrap();

    let services = json(&agent, &["inspect", "services"]);
    let np = frontend(&services, &format!("{NODE_IP}:{node_port}/TCP"));
    assert_eq!(np["kinds"], serde_json::json!(["NodePort"]));
    assert_eq!(np["service"], "default/web");
    assert_eq!(np["external_traffic_policy"], "Cluster");
    assert_eq!(scope_endpoints(&np["scopes"][0]), ["10.244.1.2:80", "10.244.1.3:80"]);
    let cip = frontend(&services, &format!("{vip}:{port}/TCP"));
    assert_eq!(cip["kinds"], serde_json::json!(["ClusterIP"]));
    assert_eq!(cip["service_id"], np["service_id"], "one service port, one id");

    let e = explain(&agent, EXTERNAL_CLIENT, &format!("{NODE_IP}:{node_port}"));
    assert_eq!(e["frontend"]["kinds"], serde_json::json!(["NodePort"]));
    let path = &e["paths"][0];
    assert_eq!(path["verdict"], "random");
    assert_eq!(candidates(path), [("10.244.1.2:80/TCP".to_owned(), 0.5), ("10.244.1.3:80/TCP".to_owned(), 0.5)]);
    let reasons = path["reasons"].to_string();
    assert!(reasons.contains("SNATed to a node address"), "eTP Cluster: traffic from outside is SNATed: {e:#}");
}

/// A service with no endpoints: inspect shows count 0, explain says refused.
#[test]
fn service_without_endpoints_is_refused() {
    let (vip, port) = (Ipv4Addr::new(10, 96, 0, 12), 5432u16);
    let manifests = Manifests::new("proxy-inspect");
    let svc = service("db").cluster_ip(&vip.to_string()).port(port.into()).build();
    manifests.put(&svc, []);
    let (ns, cgroup) = (Netns::new("agent").unwrap(), Cgroup::new("proxy-inspect").unwrap());
    let agent = agent(&ns, &cgroup, &manifests);
    agent.wait_for_count(vip, port, Some(0), WAIT).unwrap();

    let row = frontend(&json(&agent, &["inspect", "services"]), &format!("{vip}:{port}/TCP"));
    assert_eq!(row["scopes"][0]["count"], 0);
    assert!(row["scopes"][0]["backends"].as_array().unwrap().is_empty());
    let e = explain(&agent, CLIENT_POD, &format!("{vip}:{port}"));
    for path in e["paths"].as_array().unwrap() {
        assert_eq!(path["verdict"], "refused", "{e:#}");
        assert!(path["candidates"].as_array().unwrap().is_empty());
    }
    assert!(e["paths"][0]["summary"].as_str().unwrap().contains("ECONNREFUSED"), "{e:#}");
    let text = table(&agent, &["explain", "--from", CLIENT_POD, "--to", &format!("{vip}:{port}")]);
    assert!(text.contains("refused: connect() fails at once with ECONNREFUSED"), "{text}");
}

/// Addresses that are no frontend: another port of a ClusterIP, an unused service address.
#[test]
fn non_service_addresses_are_left_alone() {
    let (vip, port) = (Ipv4Addr::new(10, 96, 0, 13), 6666u16);
    let manifests = Manifests::new("proxy-inspect");
    let svc = service("api").cluster_ip(&vip.to_string()).port(port.into()).build();
    let eps = slice("api", "a").port(80).endpoints(["10.244.1.2"]).build();
    manifests.put(&svc, [&eps]);
    let (ns, cgroup) = (Netns::new("agent").unwrap(), Cgroup::new("proxy-inspect").unwrap());
    let agent = agent(&ns, &cgroup, &manifests);
    agent.wait_for_count(vip, port, Some(1), WAIT).unwrap();

    let other_port = explain(&agent, CLIENT_POD, &format!("{vip}:7777"));
    assert_eq!(other_port["service_frontend"], false);
    assert!(other_port["paths"].as_array().unwrap().is_empty());
    assert!(other_port["notes"].to_string().contains(&format!("{port}/TCP (default/api)")), "{other_port:#}");
    let unused = explain(&agent, CLIENT_POD, "10.96.0.99:6666");
    assert_eq!(unused["service_frontend"], false);
    let udp = json(&agent, &["explain", "--from", CLIENT_POD, "--to", &format!("{vip}:{port}"), "--proto", "udp"]);
    assert_eq!(udp["service_frontend"], false, "the service port is TCP only");
    let text = table(&agent, &["explain", "--from", CLIENT_POD, "--to", "10.96.0.99:6666"]);
    assert!(text.contains("not a service frontend: the datapath leaves it alone"), "{text}");
}

/// externalTrafficPolicy Local with one endpoint on this node and one on node-2: the NodePort
/// frontend has two scopes (outside: the local endpoint only; this node: both), the ClusterIP
/// one; explain shows both sets and why.
#[test]
fn etp_local_has_two_scopes() {
    let (vip, port, node_port) = (Ipv4Addr::new(10, 96, 0, 14), 80u16, 30080u16);
    let (local, remote) = ("10.244.1.5", "10.244.2.7");
    let manifests = Manifests::new("proxy-inspect");
    manifests.put_nodes(&[""]);
    let mut svc = service("shop").cluster_ip(&vip.to_string()).port(port.into()).node_port(node_port.into()).build();
    spec(&mut svc).external_traffic_policy = Some("Local".into());
    let mut eps = slice("shop", "a").port(8080).endpoints([local, remote]).build();
    eps.endpoints[1].node_name = Some("node-2".into());
    manifests.put(&svc, [&eps]);
    let (ns, cgroup) = (Netns::new("agent").unwrap(), Cgroup::new("proxy-inspect").unwrap());
    let agent = agent(&ns, &cgroup, &manifests);
    agent.wait_for_count(NODE_IP, node_port, Some(1), WAIT).unwrap();
    let (local_ep, remote_ep) = (format!("{local}:8080"), format!("{remote}:8080"));

    let services = json(&agent, &["inspect", "services"]);
    let np = frontend(&services, &format!("{NODE_IP}:{node_port}/TCP"));
    assert_eq!(np["two_scopes"], true);
    assert_eq!(np["external_traffic_policy"], "Local");
    let policies = np["policies"].to_string();
    assert!(policies.contains("eTP Local") && policies.contains("two scopes"), "{np:#}");
    let scopes = np["scopes"].as_array().unwrap();
    assert_eq!((scopes[0]["scope"].as_str(), scopes[1]["scope"].as_str()), (Some("external"), Some("internal")));
    assert_eq!(scope_endpoints(&scopes[0]), std::slice::from_ref(&local_ep), "outside: only this node's endpoint");
    assert_eq!(scope_endpoints(&scopes[1]), sorted(&[local_ep.clone(), remote_ep.clone()]), "this node: all");
    let cip = frontend(&services, &format!("{vip}:{port}/TCP"));
    assert_eq!(cip["two_scopes"], false, "eTP does not apply to a ClusterIP");
    assert_eq!(scope_endpoints(&cip["scopes"][0]), sorted(&[local_ep.clone(), remote_ep.clone()]));

    let backends = json(&agent, &["inspect", "backends"]);
    let local_of = |ep: &str| {
        backends.as_array().unwrap().iter().find(|b| b["endpoint"] == format!("{ep}/TCP")).unwrap()["local"].clone()
    };
    assert_eq!((local_of(&local_ep), local_of(&remote_ep)), (Value::Bool(true), Value::Bool(false)));

    let e = explain(&agent, EXTERNAL_CLIENT, &format!("{NODE_IP}:{node_port}"));
    let paths = e["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 2, "{e:#}");
    assert_eq!(paths[0]["origins"], serde_json::json!(["outside"]));
    assert_eq!(paths[0]["scope"], "external");
    assert_eq!(candidates(&paths[0]), [(format!("{local_ep}/TCP"), 1.0)]);
    assert!(paths[0]["reasons"].to_string().contains("externalTrafficPolicy Local"), "{e:#}");
    assert_eq!(paths[1]["origins"], serde_json::json!(["node"]));
    assert_eq!(paths[1]["scope"], "internal");
    assert_eq!(candidates(&paths[1]), [(format!("{local_ep}/TCP"), 0.5), (format!("{remote_ep}/TCP"), 0.5)]);
}

/// sessionAffinity ClientIP: inspect shows it with its configured timeout (and kube-proxy's
/// default of 10800 s when none is configured).
#[test]
fn session_affinity_is_shown_with_its_timeout() {
    let manifests = Manifests::new("proxy-inspect");
    let mut documents = Vec::new();
    for (name, vip, timeout) in [("sticky", "10.96.0.15", Some(600)), ("sticky-default", "10.96.0.16", None)] {
        let mut svc = service(name).cluster_ip(vip).port(80).build();
        spec(&mut svc).session_affinity = Some("ClientIP".into());
        if let Some(t) = timeout {
            spec(&mut svc).session_affinity_config = Some(SessionAffinityConfig {
                client_ip: Some(k8s_openapi::api::core::v1::ClientIPConfig { timeout_seconds: Some(t) }),
            });
        }
        documents.push(yaml(&svc));
        documents.push(yaml(&slice(name, "a").port(80).endpoints(["10.244.1.2"]).build()));
    }
    manifests.write("sticky.yaml", &documents.concat());
    let (ns, cgroup) = (Netns::new("agent").unwrap(), Cgroup::new("proxy-inspect").unwrap());
    let agent = agent(&ns, &cgroup, &manifests);
    agent.wait_for_count(Ipv4Addr::new(10, 96, 0, 16), 80, Some(1), WAIT).unwrap();

    let services = json(&agent, &["inspect", "services"]);
    for (vip, timeout) in [("10.96.0.15", 600), ("10.96.0.16", 10_800)] {
        let row = frontend(&services, &format!("{vip}:80/TCP"));
        assert_eq!(row["affinity_timeout_seconds"], timeout, "{row:#}");
        assert!(row["policies"].to_string().contains(&format!("affinity ClientIP {timeout}s")), "{row:#}");
    }
    let text = table(&agent, &["inspect", "services"]);
    assert!(text.contains("affinity ClientIP 600s"), "{text}");
}

/// A real connection to a ClientIP service from a client pod: inspect affinity shows one
/// entry, keyed by the client pod's network namespace, whose backend is the pod that answered;
/// explain from the client's address finds that namespace and says the connect sticks there.
#[test]
fn affinity_entry_names_the_pod_that_answered() {
    let (vip, port) = (Ipv4Addr::new(10, 96, 0, 17), 80u16);
    let pods = [("pod-2", Ipv4Addr::new(10, 244, 1, 2)), ("pod-3", Ipv4Addr::new(10, 244, 1, 3))];
    let manifests = Manifests::new("proxy-inspect");
    let mut svc = service("sticky").cluster_ip(&vip.to_string()).port(port.into()).build();
    spec(&mut svc).session_affinity = Some("ClientIP".into());
    spec(&mut svc).session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(k8s_openapi::api::core::v1::ClientIPConfig { timeout_seconds: Some(600) }),
    });
    let ips = pods.map(|(_, ip)| ip.to_string());
    let eps = slice("sticky", "a").port(80).endpoints(ips.iter().map(String::as_str)).build();
    manifests.put(&svc, [&eps]);
    let topology = SingleNode::new(&pods, 80).expect("building the namespaces");
    let ns = Netns::new("agent").unwrap();
    let agent = agent(&ns, &topology.cgroup, &manifests);
    agent.wait_for_count(vip, port, Some(2), WAIT).unwrap();

    let tally = probe(
        PROBE.as_ref(),
        &topology.client.ns,
        Some(&topology.cgroup),
        &["tcp", &format!("{vip}:{port}"), "5", "1000"],
    )
    .expect("running the probe");
    assert_eq!(tally.answered(), 5, "{tally:?}");
    assert_eq!(tally.answers.len(), 1, "ClientIP affinity: one pod answers every connection: {tally:?}");
    let answered = tally.answers.keys().next().unwrap();
    let (_, answered_ip) = pods.iter().find(|(name, _)| name == answered).expect("a pod of the test answered");

    let entries = json(&agent, &["inspect", "affinity"]);
    let entries = entries.as_array().unwrap();
    assert_eq!(entries.len(), 1, "one client, one service port: {entries:#?}");
    let entry = &entries[0];
    assert_eq!(entry["service"], "default/sticky");
    assert_eq!(entry["path"], "socket", "connects from a pod take the socket path");
    assert_eq!(entry["netns"], topology.client.ns.name(), "keyed by the client pod's namespace");
    assert!(entry["netns_cookie"].as_u64().is_some_and(|c| c != 0));
    assert_eq!(entry["backend_address"], answered_ip.to_string());
    assert_eq!(entry["backend_port"], 80);
    assert_eq!(entry["timeout_seconds"], 600);
    assert_eq!(entry["state"], "fresh");
    let age = entry["age_seconds"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&age), "the entry was used moments ago, not {age}s");

    // Test beds running in parallel reuse the client's 10.244.1.200 in other namespaces, and
    // explain does not guess between them: give this client an address of its own as well.
    let pid = std::process::id();
    let unique = Ipv4Addr::new(10, 250, (pid >> 8) as u8, pid as u8);
    topology.client.ns.ip(&["addr", "add", &format!("{unique}/32"), "dev", "eth0"]).unwrap();
    let e = explain(&agent, &unique.to_string(), &format!("{vip}:{port}"));
    assert_eq!(e["affinity"]["client_netns"], topology.client.ns.name(), "{e:#}");
    let node = e["paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["origins"].as_array().unwrap().contains(&Value::from("node")))
        .unwrap_or_else(|| panic!("no path for traffic from this node: {e:#}"));
    assert_eq!(node["verdict"], "sticky", "{e:#}");
    assert_eq!(node["sticky_to"], format!("{answered_ip}:80/TCP"));
    let listed: BTreeSet<String> = e["affinity"]["by_netns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["backend_address"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, BTreeSet::from([answered_ip.to_string()]));
    let text = table(&agent, &["inspect", "affinity"]);
    assert!(text.contains(topology.client.ns.name()) && text.contains("fresh"), "{text}");
}

/// loadBalancerSourceRanges: explain reads the pinned `source_ranges` trie and, as the TC
/// program does, drops a new connection from outside the ranges at the LoadBalancer address
/// and load balances one from inside them.
#[test]
fn source_ranges_decide_explain_from_outside() {
    let (vip, lb, port) = (Ipv4Addr::new(10, 96, 0, 18), Ipv4Addr::new(203, 0, 113, 10), 80u16);
    let manifests = Manifests::zoned("proxy-inspect", &[""]);
    let svc = service("guarded")
        .cluster_ip(&vip.to_string())
        .port(port.into())
        .node_port(30090)
        .load_balancer_ip(&lb.to_string())
        .load_balancer_source_range("192.0.2.0/24")
        .build();
    let eps = slice("guarded", "a").port(8080).endpoints(["10.244.1.5"]).build();
    manifests.put(&svc, [&eps]);
    let (ns, cgroup) = (Netns::new("agent").unwrap(), Cgroup::new("proxy-inspect").unwrap());
    let agent = agent(&ns, &cgroup, &manifests);
    agent.wait_for_count(lb, port, Some(1), WAIT).unwrap();

    let outside = |from: &str| {
        let e = explain(&agent, from, &format!("{lb}:{port}"));
        let paths = e["paths"].as_array().unwrap();
        let path = paths.iter().find(|p| p["origins"].as_array().unwrap().contains(&Value::from("outside")));
        path.unwrap_or_else(|| panic!("a path for traffic from outside: {e:#}"))["verdict"].clone()
    };
    assert_eq!(outside("192.0.2.7"), "random", "inside 192.0.2.0/24");
    assert_eq!(outside("198.51.100.7"), "dropped", "outside 192.0.2.0/24");
}
