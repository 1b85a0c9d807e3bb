//! `proxy-agent trace` on the socket path: a real agent from a manifest directory, real
//! connects from a client pod in the test cgroup, and the trace running as a child process on
//! the agent's pins. Expected values come from the manifests this test wrote (addresses,
//! names), never from trace's own output. The TC path's events are covered in `packets.rs`.

use std::{net::Ipv4Addr, time::Duration};

use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};
use proxy_common::drop;
use proxy_tests::{
    client::probe,
    cluster::Manifests,
    fixtures::{service, slice},
    netns::Netns,
    topology::SingleNode,
    trace::{Trace, drain_events, trace_on},
};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(5);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 41);
const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 42);
const PODS: [(&str, Ipv4Addr); 2] = [("pod-2", Ipv4Addr::new(10, 244, 1, 2)), ("pod-3", Ipv4Addr::new(10, 244, 1, 3))];

/// `count` connects from the client pod to `to`:80; returns (answered, refused).
fn connects(topology: &SingleNode, to: Ipv4Addr, count: usize) -> (usize, usize) {
    let tally = probe(
        PROBE.as_ref(),
        &topology.client.ns,
        Some(&topology.cgroup),
        &["tcp", &format!("{to}:80"), &count.to_string(), "1000"],
    )
    .expect("running the probe");
    (tally.answered(), tally.errors.get("refused").copied().unwrap_or(0))
}

/// Connects to a ClusterIP with two endpoints and one to a service without endpoints: each
/// connect is one `socket` line naming the client pod's namespace, the frontend, the service
/// and an endpoint of it picked at random; the refused one carries its reason. After SIGTERM
/// the flag is off, and while it is off nothing is written. A trace with `--service` shows only
/// that service's lines; under ClientIP affinity the lines say `affinity` after the first pick.
#[test]
fn socket_translations_and_refusals_are_traced_and_filtered() {
    let manifests = Manifests::new("proxy-trace");
    let web = service("web").cluster_ip(&WEB.to_string()).port(80).build();
    let ips = PODS.map(|(_, ip)| ip.to_string());
    manifests.put(&web, [&slice("web", "a").port(80).endpoints(ips.iter().map(String::as_str)).build()]);
    manifests.put(&service("empty").cluster_ip(&EMPTY.to_string()).port(80).build(), []);
    let mut sticky = service("sticky").cluster_ip(&STICKY.to_string()).port(80).build();
    let spec = sticky.spec.as_mut().expect("the builder sets a spec");
    spec.session_affinity = Some("ClientIP".into());
    spec.session_affinity_config =
        Some(SessionAffinityConfig { client_ip: Some(ClientIPConfig { timeout_seconds: Some(600) }) });
    manifests.put(&sticky, [&slice("sticky", "a").port(80).endpoints(ips.iter().map(String::as_str)).build()]);
    let topology = SingleNode::new(&PODS, 80).expect("building the namespaces");
    let ns = Netns::new("agent").unwrap();
    let agent = manifests.start_agent(AGENT, &ns, &topology.cgroup, "node-1", &[]);
    agent.wait_for_count(WEB, 80, Some(2), WAIT).unwrap();
    agent.wait_for_count(EMPTY, 80, Some(0), WAIT).unwrap();
    agent.wait_for_count(STICKY, 80, Some(2), WAIT).unwrap();
    let root = agent.bpf_root();
    assert_eq!(trace_on(root).unwrap(), 0, "nobody traces yet");

    let trace = Trace::start(AGENT.as_ref(), root, &[], WAIT).expect("starting trace");
    assert_ne!(trace_on(root).unwrap(), 0, "trace turned the flag on");
    assert_eq!(connects(&topology, WEB, 4), (4, 0));
    assert_eq!(connects(&topology, EMPTY, 1), (0, 1));
    let lines = trace.collect(WAIT, |seen| seen.len() >= 5);
    trace.stop(WAIT).expect("trace stops on SIGTERM");
    assert_eq!(trace_on(root).unwrap(), 0, "trace cleared the flag on exit");

    lines.iter().for_each(|l| eprintln!("{l}"));
    assert_eq!(lines.len(), 5, "one line per connect: {lines:#?}");
    let endpoints: Vec<String> = PODS.iter().map(|(_, ip)| format!("{ip}:80/TCP")).collect();
    for line in &lines {
        assert_eq!(line["path"], "socket", "{line}");
        assert_eq!(line["client"], format!("netns {}", topology.client.ns.name()), "{line}");
        assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
    }
    let (picks, refused): (Vec<&Value>, Vec<&Value>) = lines.iter().partition(|l| l.get("drop").is_none());
    assert_eq!(picks.len(), 4, "{lines:#?}");
    for pick in &picks {
        assert_eq!(pick["frontend"], format!("{WEB}:80/TCP"));
        assert_eq!(pick["service"], "default/web");
        assert!(endpoints.iter().any(|e| pick["backend"] == *e), "an endpoint of web: {pick}");
        assert_eq!(pick["pick"], "random");
        assert!(pick["slot"].as_u64().is_some_and(|s| (1..=2).contains(&s)), "{pick}");
        assert_eq!(pick["endpoints"], "cluster");
    }
    assert_eq!(refused.len(), 1, "{lines:#?}");
    assert_eq!(refused[0]["frontend"], format!("{EMPTY}:80/TCP"));
    assert_eq!(refused[0]["service"], "default/empty");
    assert_eq!(refused[0]["drop"], drop::name(drop::CONNECT_REFUSED));
    assert!(refused[0].get("backend").is_none());

    // With the flag off the programs write nothing (trace read everything it was sent).
    assert_eq!(drain_events(root).unwrap(), 0);
    assert_eq!(connects(&topology, WEB, 1), (1, 0));
    assert_eq!(connects(&topology, EMPTY, 1), (0, 1));
    assert_eq!(drain_events(root).unwrap(), 0, "no events with tracing off");
    let filtered = Trace::start(AGENT.as_ref(), root, &["--service", "default/empty"], WAIT).expect("trace");
    assert_eq!(connects(&topology, WEB, 2), (2, 0));
    assert_eq!(connects(&topology, EMPTY, 2), (0, 2));
    let lines = filtered.collect(WAIT, |seen| seen.len() >= 2);
    // Anything else (a web line, the connect made while nobody traced) would come before or
    // among these: wait briefly for a stray third line.
    let more = filtered.collect(Duration::from_millis(300), |seen| !seen.is_empty());
    filtered.stop(WAIT).expect("trace stops on SIGTERM");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(more.is_empty(), "only default/empty's lines: {more:#?}");
    assert!(lines.iter().all(|l| l["service"] == "default/empty" && l["drop"] == "connect_refused"), "{lines:#?}");
    assert_eq!(trace_on(root).unwrap(), 0);

    // ClientIP affinity: the first connect is picked at random, the next ones are affinity
    // hits on the same backend.
    let sticky = Trace::start(AGENT.as_ref(), root, &["--service", "default/sticky"], WAIT).expect("trace");
    assert_eq!(connects(&topology, STICKY, 3), (3, 0));
    let lines = sticky.collect(WAIT, |seen| seen.len() >= 3);
    sticky.stop(WAIT).expect("trace stops on SIGTERM");
    let picks: Vec<(&str, &str)> =
        lines.iter().map(|l| (l["pick"].as_str().unwrap_or("?"), l["backend"].as_str().unwrap_or("?"))).collect();
    assert_eq!(picks.len(), 3, "{lines:#?}");
    assert_eq!(picks[0].0, "random", "{lines:#?}");
    assert_eq!(&picks[1..], [("affinity", picks[0].1); 2], "{lines:#?}");
    assert!(lines[1].get("slot").is_none(), "an affinity hit has no slot: {}", lines[1]);

    // The table for people: one line per event, with the same facts.
    let table = Trace::start_table(AGENT.as_ref(), root, WAIT).expect("trace");
    assert_eq!(connects(&topology, WEB, 2), (2, 0));
    assert_eq!(connects(&topology, EMPTY, 1), (0, 1));
    let text = table.collect_text(WAIT, 3);
    table.stop(WAIT).expect("trace stops on SIGTERM");
    eprintln!("{}", text.join("\n"));
    assert_eq!(text.len(), 3, "{text:#?}");
    let client = format!("socket netns {} -> ", topology.client.ns.name());
    for line in &text[..2] {
        assert!(line.contains(&client) && line.contains(&format!("{WEB}:80/TCP (default/web) => ")), "{line}");
        assert!(line.contains("[random slot "), "{line}");
    }
    assert!(text[2].ends_with(&format!("{EMPTY}:80/TCP (default/empty) DROPPED connect_refused")), "{}", text[2]);
}
