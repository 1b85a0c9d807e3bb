//! Moving off kube-proxy, against the real agent binary and the kernel's own netfilter: inside
//! a test network namespace, kube-proxy's rules (generated as kube-proxy writes them, loaded with
//! the node's tools) are found at start and removed by `--cleanup-kube-proxy`, leaving other
//! rules alone; and `--config` reads kube-proxy's configuration file. Nothing here touches the
//! root namespace's rules: every tool runs inside the test's namespace.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use clap::Parser as _;
use proxy_tests::{
    agent::{Agent, LogLine},
    cgroup::Cgroup,
    client::http_get,
    cluster::{Manifests, pod_ip},
    fixtures::TempDir,
    kube_proxy_rules::{Svc, iptables, nftables},
    netns::Netns,
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const WAIT: Duration = Duration::from_secs(10);

/// The iptables backends a node may have used; both are installed on the test machines
/// (`cargo xtask setup`).
const BACKENDS: [&str; 2] = ["iptables-nft", "iptables-legacy"];

/// Two services as kube-proxy would program them, one with a nodePort.
fn services() -> Vec<Svc> {
    let svc = |i: u8, node_port| Svc {
        name: format!("web-{i}"),
        vip: Ipv4Addr::new(10, 96, 0, 10 + i),
        port: 80,
        target_port: 8080,
        node_port,
        endpoints: vec![Ipv4Addr::new(10, 244, 1, 2 * i + 2), Ipv4Addr::new(10, 244, 2, 2 * i + 3)],
    };
    vec![svc(0, None), svc(1, Some(30080))]
}

/// Runs `program args` inside `ns`, failing the test with its stderr.
fn exec(ns: &Netns, program: &str, args: &[&str]) -> String {
    ns.exec(program, args).unwrap_or_else(|e| panic!("{program} {}: {e:#}", args.join(" ")))
}

/// Feeds `text` to `program` (a restore tool or `nft -f`) inside `ns`.
fn load(ns: &Netns, program: &str, flag: Option<&str>, text: &str) {
    let dir = TempDir::new("proxy-migrate-rules").expect("a scratch directory");
    let file = dir.path().join("rules");
    std::fs::write(&file, text).expect("writing the rules");
    let file = file.to_string_lossy().into_owned();
    let args: Vec<&str> = flag.into_iter().chain([file.as_str()]).collect();
    exec(ns, program, &args);
}

/// Loads into `ns` what a node with kube-proxy holds: its iptables rules in both backends, its
/// nftables table (IPv4 with the services, IPv6 empty), its IPVS interface; and beside
/// them rules that are not kube-proxy's (kubelet's chains, a CNI's masquerade, an unrelated
/// nftables table), which must stay.
fn load_kube_proxy(ns: &Netns) {
    let services = services();
    for backend in BACKENDS {
        load(ns, &format!("{backend}-restore"), None, &iptables::full_with_jumps(&services));
        for rule in [
            "-t nat -N KUBE-KUBELET-CANARY",
            "-t nat -N CNI-MASQ",
            "-t nat -A POSTROUTING -s 10.244.0.0/16 -j CNI-MASQ",
            "-t nat -A CNI-MASQ ! -d 10.244.0.0/16 -j MASQUERADE",
            "-t filter -N KUBE-FIREWALL",
            "-t filter -A INPUT -j KUBE-FIREWALL",
        ] {
            exec(ns, backend, &rule.split(' ').collect::<Vec<_>>());
        }
    }
    load(ns, "nft", Some("-f"), &nftables::full(&services, &[Ipv4Addr::new(192, 0, 2, 1)]));
    exec(ns, "nft", &["add", "table", "ip6", "kube-proxy"]);
    exec(ns, "nft", &["add", "table", "inet", "keep"]);
    exec(ns, "nft", &["add", "chain", "inet", "keep", "input", "{ type filter hook input priority 0 ; }"]);
    // A dummy interface on a real node; this kernel has no dummy driver, and a veth (its peer
    // goes with it) is as much an interface to find and delete.
    ns.ip(&["link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "kube-ipvs0p"]).expect("adding kube-ipvs0");
}

/// `proxy-agent --cleanup-kube-proxy` inside `ns`, as a node's admin runs it there.
fn cleanup_kube_proxy(ns: &Netns) -> (Output, Vec<LogLine>) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), AGENT, "--cleanup-kube-proxy", "--log-format", "json"])
        .output()
        .expect("running the agent");
    let lines = String::from_utf8_lossy(&out.stderr).lines().filter_map(LogLine::parse).collect();
    (out, lines)
}

/// Every chain and rule line of every table of `backend` in `ns`.
fn saved(ns: &Netns, backend: &str) -> String {
    exec(ns, &format!("{backend}-save"), &[])
}

#[test]
fn cleanup_removes_kube_proxys_rules_from_both_backends_nftables_and_ipvs_and_nothing_else() {
    let ns = Netns::new("migrate").expect("a namespace");
    load_kube_proxy(&ns);
    // The rules really are there, or the test proves nothing.
    for backend in BACKENDS {
        let before = saved(&ns, backend);
        assert!(before.contains(":KUBE-SERVICES") && before.contains("-j KUBE-SEP-"), "{backend}:\n{before}");
    }

    let (out, lines) = cleanup_kube_proxy(&ns);
    assert!(out.status.success(), "{out:?}");
    let removed = lines.iter().find(|l| l.message == "removed kube-proxy's rules").expect("says what it removed");
    let removed = removed.text("removed").unwrap_or_default();
    for thing in ["iptables-nft nat", "iptables-legacy filter", "nftables table ip kube-proxy", "kube-ipvs0"] {
        assert!(removed.contains(thing), "{thing} not in {removed}");
    }

    for backend in BACKENDS {
        let after = saved(&ns, backend);
        let kube: Vec<&str> = after
            .lines()
            .filter(|l| l.contains("KUBE-") && !l.contains("KUBE-KUBELET-CANARY") && !l.contains("KUBE-FIREWALL"))
            .collect();
        assert!(kube.is_empty(), "{backend}: kube-proxy's rules left: {kube:#?}");
        for kept in [
            ":KUBE-KUBELET-CANARY",
            "-A POSTROUTING -s 10.244.0.0/16 -j CNI-MASQ",
            "-A CNI-MASQ ! -d 10.244.0.0/16 -j MASQUERADE",
            "-A INPUT -j KUBE-FIREWALL",
        ] {
            assert!(after.contains(kept), "{backend}: {kept} is gone:\n{after}");
        }
    }
    let tables = exec(&ns, "nft", &["list", "tables"]);
    assert!(!tables.contains("kube-proxy"), "{tables}");
    assert!(tables.contains("table inet keep"), "{tables}");
    let links = ns.ip(&["-o", "link", "show"]).expect("listing links");
    assert!(!links.contains("kube-ipvs0"), "{links}");

    // Safe to run twice: nothing left to do is success.
    let (out, lines) = cleanup_kube_proxy(&ns);
    assert!(out.status.success(), "{out:?}");
    assert!(lines.iter().any(|l| l.message == "no kube-proxy rules on this node"), "{lines:#?}");
}

/// The one start-up warning about kube-proxy's rules, if the agent logged it.
fn kube_proxy_warning(agent: &Agent) -> Option<LogLine> {
    agent
        .lines()
        .into_iter()
        .find(|l| l.level == "WARN" && l.message.starts_with("kube-proxy's rules are on this node"))
}

#[test]
fn start_up_warns_once_about_kube_proxys_rules_and_says_what_to_do_and_only_when_they_are_there() {
    let cgroup = Cgroup::new("proxy-migrate").expect("a cgroup");
    let manifests = Manifests::new("proxy-migrate-manifests");
    manifests.seed(&[pod_ip(0, 2)]);
    let with_rules = Netns::new("migrate").expect("a namespace");
    load_kube_proxy(&with_rules);
    let clean = Netns::new("migrate").expect("a namespace");

    let mut agent = manifests.start_agent(AGENT, &with_rules, &cgroup, "node-1", &["--healthz-bind-address", ""]);
    let warning = kube_proxy_warning(&agent).unwrap_or_else(|| panic!("no warning:\n{}", agent.log()));
    let found = warning.text("found").unwrap_or_default();
    for thing in ["iptables-nft nat KUBE-SERVICES", "iptables-legacy nat KUBE-SERVICES", "nftables table ip kube-proxy"]
    {
        assert!(found.contains(thing), "{thing} not in {found}");
    }
    assert!(found.contains("IPVS interface kube-ipvs0"), "{found}");
    let what_to_do = warning.text("what_to_do").unwrap_or_default();
    assert!(what_to_do.contains("--cleanup-kube-proxy"), "{what_to_do}");
    let warnings = agent.lines().iter().filter(|l| l.mentions("kube-proxy's rules")).count();
    assert_eq!(warnings, 1, "one line:\n{}", agent.log());
    agent.terminate(WAIT).expect("the agent stops");

    let agent = manifests.start_agent(AGENT, &clean, &cgroup, "node-1", &["--healthz-bind-address", ""]);
    assert_eq!(kube_proxy_warning(&agent), None, "nothing to warn about:\n{}", agent.log());
}

/// A kube-proxy configuration as kubeadm writes it, with this node's name and servers set.
const CONFIG: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: ""
  qps: 0
clusterCIDR: 10.244.0.0/16
conntrack:
  maxPerCore: null
  min: null
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
hostnameOverride: node-1
healthzBindAddress: 127.0.0.1:20256
metricsBindAddress: 127.0.0.1
iptables:
  masqueradeAll: false
  minSyncPeriod: 0s
  syncPeriod: 0s
kind: KubeProxyConfiguration
mode: ""
nodePortAddresses: null
futureKnob: true
"#;

/// The agent `--config FILE --manifests DIR` in a fresh namespace, with `extra` flags.
fn agent_with_config(config: &str, extra: &[&str]) -> (Agent, Netns, Manifests, Cgroup, TempDir) {
    let dir = TempDir::new("proxy-migrate-config").expect("a scratch directory");
    let file = dir.path().join("config.conf");
    std::fs::write(&file, config).expect("writing config.conf");
    let manifests = Manifests::with_nodes("proxy-migrate-manifests");
    manifests.seed(&[pod_ip(0, 2)]);
    let ns = Netns::new("migrate").expect("a namespace");
    let cgroup = Cgroup::new("proxy-migrate").expect("a cgroup");
    let file = file.to_string_lossy().into_owned();
    let manifests_dir = manifests.arg();
    let flags: Vec<&str> = ["--config", file.as_str(), "--manifests", manifests_dir.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let agent = Agent::start_in(Some(&ns), Path::new(AGENT), cgroup.path(), &flags)
        .unwrap_or_else(|e| panic!("starting the agent: {e:#}"));
    (agent, ns, manifests, cgroup, dir)
}

#[test]
fn config_takes_the_node_name_and_servers_from_kube_proxys_file_and_flags_win() {
    let (agent, ns, _manifests, _cgroup, _dir) =
        agent_with_config(CONFIG, &["--metrics-bind-address", "127.0.0.1:20249"]);

    // hostnameOverride from the file: the agent is node-1 (no --hostname-override was given).
    let ready = agent.lines().into_iter().find(|l| l.message == "datapath ready").expect("the datapath is ready");
    assert_eq!(ready.text("node"), Some("node-1"), "{}", agent.log());
    // healthzBindAddress from the file; metricsBindAddress from the flag, over the file's.
    let healthz = SocketAddr::from(([127, 0, 0, 1], 20256));
    let (status, body) = http_get(&ns, healthz, "/healthz").expect("GET /healthz on the file's address");
    assert_eq!(status, 200, "{body}");
    let metrics = SocketAddr::from(([127, 0, 0, 1], 20249));
    let (status, body) = http_get(&ns, metrics, "/metrics").expect("GET /metrics on the flag's address");
    assert_eq!(status, 200, "{body}");
    assert!(http_get(&ns, SocketAddr::from(([127, 0, 0, 1], 10249)), "/metrics").is_err(), "the file's port is unused");

    let lines = agent.lines();
    let read = lines.iter().find(|l| l.message.starts_with("read kube-proxy's configuration")).expect("a line");
    assert_eq!(read.text("used"), Some("hostnameOverride, clusterCIDR, healthzBindAddress"), "{read:?}");
    let ignored = lines.iter().find(|l| l.text("ignored").is_some()).expect("an ignored line");
    assert_eq!(
        ignored.text("ignored"),
        Some(
            "bindAddress, clientConnection.acceptContentTypes, clientConnection.burst, clientConnection.contentType, clientConnection.qps, conntrack, iptables, mode"
        )
    );
    let unknown: Vec<&LogLine> = lines.iter().filter(|l| l.text("unknown").is_some()).collect();
    assert_eq!(unknown.len(), 1, "one warning");
    assert_eq!((unknown[0].level.as_str(), unknown[0].text("unknown")), ("WARN", Some("futureKnob")));
}

#[test]
fn a_bad_config_stops_the_agent_with_the_file_and_field_named() {
    let config = CONFIG.replace("healthzBindAddress: 127.0.0.1:20256", "healthzBindAddress: 0.0.0.0/0");
    let dir = TempDir::new("proxy-migrate-config").expect("a scratch directory");
    let file = dir.path().join("config.conf");
    std::fs::write(&file, config).expect("writing config.conf");
    // `inspect` of a bpffs root that does not exist: were the file accepted, the agent would
    // still change nothing on this machine.
    let out = Command::new(AGENT)
        .arg("--config")
        .arg(&file)
        .args(["--bpf-root", "/nonexistent/proxy-migrate", "inspect", "services"])
        .output()
        .expect("running the agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}: field healthzBindAddress:", file.display())), "{stderr}");
}

/// The YAML of `deploy/<relative>`.
fn deploy_yaml(relative: &str) -> serde_yaml_ng::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The agent container's args in a DaemonSet or a patch of one.
fn container_args(daemonset: &serde_yaml_ng::Value) -> Vec<String> {
    let containers = &daemonset["spec"]["template"]["spec"]["containers"];
    let agent = containers.as_sequence().and_then(|c| c.first()).expect("a container");
    assert_eq!(agent["name"].as_str(), Some("proxy-agent"), "the patch merges by the container's name");
    let args = agent["args"].as_sequence().expect("args");
    args.iter().map(|a| a.as_str().expect("string args").to_owned()).collect()
}

#[test]
fn the_kube_proxy_config_patch_mounts_kube_proxys_configmap_where_config_points_and_keeps_the_daemonsets_flags() {
    let patch = deploy_yaml("kube-proxy/use-kube-proxy-config.yaml");
    let args = container_args(&patch);
    let expanded: Vec<String> = args.iter().map(|a| a.replace("$(NODE_NAME)", "node-1")).collect();
    proxy_agent::cli::Cli::try_parse_from(std::iter::once("proxy-agent".to_owned()).chain(expanded.clone()))
        .unwrap_or_else(|e| panic!("the patch's flags: {e}"));
    let config = args.iter().find_map(|a| a.strip_prefix("--config=")).expect("--config");

    let pod = &patch["spec"]["template"]["spec"];
    let mount = pod["containers"][0]["volumeMounts"].as_sequence().and_then(|m| m.first()).expect("a mount");
    assert_eq!(Path::new(config).parent(), mount["mountPath"].as_str().map(Path::new), "--config is in the mount");
    let volume = pod["volumes"].as_sequence().and_then(|v| v.first()).expect("a volume");
    assert_eq!(volume["name"], mount["name"]);
    assert_eq!(volume["configMap"]["name"].as_str(), Some("kube-proxy"), "kubeadm's ConfigMap");

    // The args list replaces the DaemonSet's: every flag of it but the server addresses (taken
    // from the file) must be there.
    let base = container_args(&deploy_yaml("20-daemonset.yaml"));
    let kept: Vec<&String> = base.iter().filter(|a| !a.contains("-bind-address")).collect();
    let patched: Vec<&String> = args.iter().filter(|a| !a.starts_with("--config=")).collect();
    assert_eq!(patched, kept);
}
