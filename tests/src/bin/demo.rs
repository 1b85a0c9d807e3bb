//! `cargo xtask demo`: a real kernel load-balancing the seed's ClusterIP service between pods
//! in network namespaces. Builds node-1 with the pods the example's EndpointSlice names, runs
//! the agent on a copy of `examples/`, connects a hundred times from a client pod, then removes
//! one endpoint from the manifest and shows the traffic move. Everything it made is removed at
//! the end, also on Ctrl-C.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_agent::{model::parse_ipv4, source::manifests};
use proxy_tests::{
    agent::Agent,
    client::{Tally, probe},
    fixtures::{TempDir, write_text, yaml},
    topology::SingleNode,
};
use serde::Deserialize as _;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// A binary built next to this one.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!("{} is missing: run the demo with `cargo xtask demo`", path.display());
    }
    Ok(path)
}

fn demo() -> anyhow::Result<()> {
    // demo [MANIFESTS_DIR] [CONNECTIONS]
    let examples = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"));
    let connections: usize = std::env::args().nth(2).and_then(|n| n.parse().ok()).unwrap_or(100).min(100_000);
    let read = manifests::read_dir(&examples)?;
    let service = read.services.first().context("no Service in the examples")?.object.clone();
    let service_name = service.metadata.name.clone().unwrap_or_default();
    let kept = read
        .slices
        .iter()
        .find(|s| s.object.service_name.as_ref() == Some(&service_name))
        .context("no EndpointSlice for the example's service")?;
    // The file the slice is in: its origin is `path (document N)`.
    let file = kept.origin.as_deref().and_then(|o| o.split(" (").next()).context("slice origin")?;
    let file = PathBuf::from(file);
    let slice = api_slice(&file, &kept.object.name)?;
    let (vip, port) = frontend(&service)?;
    let target_port = slice.ports.iter().flatten().find_map(|p| p.port).context("the slice has no port")? as u16;
    let pods: Vec<(String, Ipv4Addr)> = slice
        .endpoints
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let ip = parse_ipv4(e.addresses.first()?)?;
            let name = e.target_ref.as_ref().and_then(|r| r.name.clone()).unwrap_or_else(|| format!("pod-{i}"));
            Some((name, ip))
        })
        .collect();
    if pods.len() < 2 {
        bail!("the example's slice needs two endpoints");
    }

    println!("== building node-1 in network namespaces: {} pods serving :{target_port}, one client pod", pods.len());
    let pod_refs: Vec<(&str, Ipv4Addr)> = pods.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let topology = SingleNode::new(&pod_refs, target_port)?;
    for pod in &topology.pods {
        println!("   pod {:<32} {}", pod.name, pod.ip);
    }
    println!("   client pod {} in cgroup {}", topology.client.ip, topology.cgroup.path().display());

    let work = TempDir::new("proxy-demo")?;
    for entry in std::fs::read_dir(&examples)? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::copy(&path, work.path().join(path.file_name().unwrap_or_default()))?;
        }
    }
    println!("== starting proxy-agent --manifests {} --hostname-override node-1", work.path().display());
    // The agent runs in node-1's namespace, as it would on a node.
    let flags = ["--manifests", &work.arg(), "--hostname-override", "node-1"];
    let agent = Agent::start_in(Some(&topology.node), &sibling("agent")?, topology.cgroup.path(), &flags)?;
    agent.wait_for_count(vip, port, Some(pods.len() as u16), Duration::from_secs(5))?;
    println!(
        "   maps pinned under {}; `bpftool map dump pinned {}/services` shows them",
        agent.bpf_root().display(),
        agent.bpf_root().display()
    );
    check_interrupt()?;

    let probe_bin = sibling("probe")?;
    let target = format!("{vip}:{port}");
    println!("== {connections} connections from the client pod to {service_name} at {target}");
    let before = probe(
        &probe_bin,
        &topology.client.ns,
        Some(&topology.cgroup),
        &["tcp", &target, &connections.to_string(), "1000"],
    )?;
    show(&before, &pods);
    check_interrupt()?;

    let (removed_name, removed_ip) = pods.last().cloned().context("two pods")?;
    println!("== removing {removed_name} ({removed_ip}) from the EndpointSlice manifest");
    let mut shrunk = slice.clone();
    shrunk.endpoints.retain(|e| e.addresses.first().and_then(|a| parse_ipv4(a)) != Some(removed_ip));
    let file_name = file.file_name().and_then(|f| f.to_str()).context("slice file")?.to_owned();
    let edited = Instant::now();
    write_text(work.path(), &file_name, &(yaml(&*service) + &yaml(&shrunk)))?;
    agent.wait_for_count(vip, port, Some(pods.len() as u16 - 1), Duration::from_secs(5))?;
    println!("   the datapath followed the file in {:.1} ms", edited.elapsed().as_secs_f64() * 1e3);
    check_interrupt()?;

    println!("== {connections} connections again");
    let after = probe(
        &probe_bin,
        &topology.client.ns,
        Some(&topology.cgroup),
        &["tcp", &target, &connections.to_string(), "1000"],
    )?;
    show(&after, &pods);
    if after.from(&removed_name) != 0 {
        bail!("{removed_name} still got traffic after its removal");
    }
    println!("== done; removing the namespaces, cgroup, programs and pins");
    Ok(())
}

/// EndpointSlice `name` as `file` has it: the agent's reader keeps only what it programs, and
/// the demo wants the pods' names and writes the slice back edited.
fn api_slice(file: &Path, name: &str) -> anyhow::Result<EndpointSlice> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(document).with_context(|| format!("parsing {}", file.display()))?;
        let items = match value["kind"].as_str() {
            Some(kind) if kind.ends_with("List") => value["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![value],
        };
        if let Some(item) = items.into_iter().find(|i| i["kind"] == "EndpointSlice" && i["metadata"]["name"] == name) {
            return Ok(serde_json::from_value(item)?);
        }
    }
    bail!("no EndpointSlice {name} in {}", file.display())
}

fn frontend(service: &Service) -> anyhow::Result<(Ipv4Addr, u16)> {
    let spec = service.spec.as_ref().context("the service has no spec")?;
    let ip =
        spec.cluster_ip.as_deref().and_then(parse_ipv4).context("the example's service needs an IPv4 clusterIP")?;
    let port = spec.ports.iter().flatten().next().context("the service has no port")?.port as u16;
    Ok((ip, port))
}

fn show(tally: &Tally, pods: &[(String, Ipv4Addr)]) {
    let total = tally.answered().max(1);
    let mut rows: BTreeMap<&str, usize> = pods.iter().map(|(n, _)| (n.as_str(), 0)).collect();
    for (name, count) in &tally.answers {
        rows.insert(name, *count);
    }
    for (name, count) in rows {
        println!("   {name:<32} {count:>4}  {}", "#".repeat(count * 50 / total));
    }
    for (kind, count) in &tally.errors {
        println!("   error {kind:<26} {count:>4}");
    }
}
