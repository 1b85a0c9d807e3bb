//! What users deploy, checked where it can be here (no Docker engine, no kind node image):
//! every manifest in `deploy/` is a valid object of its Kubernetes type (no unknown field),
//! the ClusterRole grants exactly what the agent's Kubernetes source does (derived from its
//! code and from the requests it really makes), the DaemonSet's flags are flags the agent
//! accepts and agree with its probes, mounts and image, and `cargo xtask run --dry-run`
//! prints the whole sequence while running nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use clap::Parser as _;
use k8s_openapi::{
    Resource,
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Container, Node, PodSpec, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use proxy_agent::{cli::Cli, source::rbac};
use proxy_tests::{
    apiserver::ApiServer,
    cluster::{SEED, SEED_NODE_PORT, SEED_PORT, TARGET_PORT, pod_ip, seed, seed_slice},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_owned()
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The YAML files directly in `deploy/<dir>` (as `kubectl apply -f` takes them), sorted.
fn manifest_files(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .map(|e| e.expect("a directory entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .map(|n| format!("{dir}{n}"))
        .collect();
    files.sort();
    files
}

/// Every document of every manifest `kubectl apply -f deploy/` and `-f deploy/sample/` take,
/// as (file, JSON value).
fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for file in manifest_files("deploy/").into_iter().chain(manifest_files("deploy/sample/")) {
        let text = read(&file);
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value: Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{file} document {i}: {e}"));
            if !value.is_null() {
                docs.push((file.clone(), value));
            }
        }
    }
    docs
}

/// Parses `value` as a `K`, failing on any field `K` does not have (a round trip must give the
/// document back unchanged: k8s-openapi ignores unknown fields, the API server would reject them).
fn parse<K: Resource + DeserializeOwned + serde::Serialize>(file: &str, value: &Value) -> K {
    let object: K = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{file}: not a {}: {e}", K::KIND));
    let back = serde_json::to_value(&object).expect("k8s-openapi objects serialize");
    assert_eq!(&back, value, "{file}: a {} with fields its type does not have (typo?)", K::KIND);
    object
}

/// The one object of type `K` in `deploy/` (or `deploy/sample/`).
fn the<K: Resource + DeserializeOwned + serde::Serialize>() -> K {
    let mut found: Vec<K> = documents()
        .iter()
        .filter(|(_, v)| v["kind"] == K::KIND && v["apiVersion"] == K::API_VERSION)
        .map(|(file, v)| parse::<K>(file, v))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {} in deploy/", K::KIND);
    found.remove(0)
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let mut kinds = BTreeMap::<String, usize>::new();
    for (file, value) in documents() {
        let kind = format!("{} {}", value["apiVersion"].as_str().unwrap_or("?"), value["kind"].as_str().unwrap_or("?"));
        match (value["apiVersion"].as_str(), value["kind"].as_str()) {
            (Some("v1"), Some("ServiceAccount")) => _ = parse::<ServiceAccount>(&file, &value),
            (Some("v1"), Some("Service")) => _ = parse::<Service>(&file, &value),
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => _ = parse::<ClusterRole>(&file, &value),
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
                _ = parse::<ClusterRoleBinding>(&file, &value)
            }
            (Some("apps/v1"), Some("DaemonSet")) => _ = parse::<DaemonSet>(&file, &value),
            (Some("apps/v1"), Some("Deployment")) => _ = parse::<Deployment>(&file, &value),
            _ => panic!("{file}: {kind} is not a kind this test knows; add it here"),
        }
        *kinds.entry(kind).or_default() += 1;
    }
    let want = [
        "apps/v1 DaemonSet",
        "apps/v1 Deployment",
        "rbac.authorization.k8s.io/v1 ClusterRole",
        "rbac.authorization.k8s.io/v1 ClusterRoleBinding",
        "v1 Service",
        "v1 ServiceAccount",
    ];
    assert_eq!(kinds.keys().map(String::as_str).collect::<Vec<_>>(), want);
    assert!(kinds.values().all(|n| *n == 1), "one of each: {kinds:?}");
}

type Grants = BTreeMap<(String, String), BTreeSet<String>>;

fn table_grants() -> Grants {
    let mut grants = Grants::new();
    for access in rbac::ACCESS {
        let verbs = grants.entry((access.api_group.into(), access.resource.into())).or_default();
        verbs.extend(access.verbs.iter().map(|v| (*v).to_owned()));
    }
    grants
}

#[test]
fn the_cluster_role_grants_exactly_what_the_source_uses() {
    let role: ClusterRole = the();
    let mut grants = Grants::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(rule.non_resource_urls.is_none() && rule.resource_names.is_none(), "unexpected rule {rule:?}");
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                let verbs = grants.entry((group.clone(), resource.clone())).or_default();
                verbs.extend(rule.verbs.iter().cloned());
            }
        }
    }
    let wildcard = grants.iter().any(|((g, r), v)| g == "*" || r == "*" || v.contains("*"));
    assert!(!wildcard, "no wildcards in a least-privilege role: {grants:?}");
    assert_eq!(grants, table_grants(), "deploy/10-rbac.yaml vs proxy-agent/src/source/rbac.rs");

    // The binding gives the role to the DaemonSet's service account, which exists.
    let binding: ClusterRoleBinding = the();
    let account: ServiceAccount = the();
    let daemonset: DaemonSet = the();
    assert_eq!((binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()), ("ClusterRole", "proxy-agent"));
    assert_eq!(role.metadata.name.as_deref(), Some("proxy-agent"));
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
    assert_eq!(daemonset.metadata.namespace, account.metadata.namespace);
    assert_eq!(pod_spec(&daemonset).service_account_name, account.metadata.name);
}

/// The verbs the source used on `K`, from what the test API server served.
fn observed<K: Resource>(server: &ApiServer, grants: &mut Grants) {
    let mut verbs = BTreeSet::new();
    if server.list_count::<K>() > 0 {
        verbs.insert("list".to_owned());
    }
    if server.watch_count::<K>() > 0 {
        verbs.insert("watch".to_owned());
    }
    if server.patch_count::<K>() > 0 {
        verbs.insert("patch".to_owned());
    }
    grants.insert((K::GROUP.to_owned(), K::URL_PATH_SEGMENT.to_owned()), verbs);
}

/// The other side of the derivation: the real Kubernetes source, run against a real HTTP API
/// server, makes exactly the requests the table lists (and no other: no get, no other write).
#[tokio::test]
async fn the_source_makes_exactly_the_requests_the_rbac_table_lists() {
    let server = ApiServer::start().await;
    let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: Some("node-1".into()),
        ..Default::default()
    };
    server.apply(&Node { metadata: meta, ..Default::default() });
    server.apply(&seed().build());
    server.apply(&seed_slice(&[pod_ip(0, 2)]).build());
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().expect("URL"))).expect("client");
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let source = tokio::spawn(proxy_agent::source::kube::run(
        client.clone(),
        "node-1".into(),
        true,
        tx,
        proxy_agent::metrics::Metrics::new(),
    ));
    let mut listed = BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        while listed.len() < 3 {
            use proxy_agent::source::{Change, Update};
            match rx.recv().await.expect("the source runs") {
                Update::Services(Change::Replace(_)) => listed.insert("services"),
                Update::Slices(Change::Replace(_)) => listed.insert("endpointslices"),
                Update::Nodes(Change::Replace(_)) => listed.insert("nodes"),
                _ => false,
            };
        }
        // Each watch starts right after its list.
        // And the Node is annotated as taking direct server return.
        while server.watch_count::<Service>() == 0
            || server.watch_count::<EndpointSlice>() == 0
            || server.watch_count::<Node>() == 0
            || server.patch_count::<Node>() == 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the source lists and watches all three kinds, and annotates its Node, within 15 s");
    let node = server.objects::<Node>().pop().expect("node-1 is stored");
    assert_eq!(node["metadata"]["annotations"]["proxy.kube-ebpf.io/dsr"], "ipv4", "the announcement: {node}");
    // A service the agent cannot program, twice: an Event, then its series.
    let events = proxy_agent::source::kube::refusal_events(client, "node-1".into());
    for _ in 0..2 {
        events.send(("default/apigw-test1".into(), "not programmed: the maps are full".into())).expect("the sender");
        let want = server.posted_events().len() + 1;
        tokio::time::timeout(Duration::from_secs(15), async {
            while server.posted_events().len() < want {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the Event is posted within 15 s");
    }
    // Let anything else it might do happen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    source.abort();

    let mut grants = Grants::new();
    observed::<Service>(&server, &mut grants);
    observed::<EndpointSlice>(&server, &mut grants);
    observed::<Node>(&server, &mut grants);
    let posted = server.posted_events();
    let verbs = posted.iter().map(|(verb, _)| verb.clone()).collect();
    grants.insert(("events.k8s.io".into(), "events".into()), verbs);
    assert_eq!(grants, table_grants(), "what the source did vs proxy-agent/src/source/rbac.rs");
    let (_, event) = posted.last().expect("an Event");
    assert_eq!(event["regarding"]["name"], "apigw-test1", "{event}");
    assert_eq!(event["series"]["count"], 2, "the repeat is counted in the series: {event}");
    let counted: usize = [
        server.list_count::<Service>() + server.watch_count::<Service>(),
        server.list_count::<EndpointSlice>() + server.watch_count::<EndpointSlice>(),
        server.list_count::<Node>() + server.watch_count::<Node>() + server.patch_count::<Node>(),
    ]
    .iter()
    .sum();
    assert_eq!(
        server.request_count(),
        counted + posted.len(),
        "every request the source made was a list, a watch or an Event"
    );
}

fn pod_spec(daemonset: &DaemonSet) -> &PodSpec {
    daemonset.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("a pod template")
}

fn agent_container(daemonset: &DaemonSet) -> &Container {
    let containers = &pod_spec(daemonset).containers;
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The DaemonSet's args with `$(VAR)` references replaced by the value of an env var the
/// container defines (failing on an undefined one: kubelet would pass it literally).
fn expanded_args(container: &Container) -> Vec<String> {
    let env: BTreeSet<&str> = container.env.iter().flatten().map(|e| e.name.as_str()).collect();
    container
        .args
        .iter()
        .flatten()
        .map(|arg| {
            let mut out = arg.clone();
            while let Some(start) = out.find("$(") {
                let end = out[start..].find(')').map(|e| start + e).expect("a closed $(VAR)");
                let var = &out[start + 2..end];
                assert!(env.contains(var), "{arg} refers to ${var}, which the container does not define");
                out.replace_range(start..=end, &format!("value-of-{var}"));
            }
            out
        })
        .collect()
}

#[test]
fn the_daemonsets_flags_are_flags_the_agent_accepts() {
    let daemonset: DaemonSet = the();
    let container = agent_container(&daemonset);
    let command = container.command.as_deref().unwrap_or_default();
    assert_eq!(command, ["/usr/local/bin/proxy-agent"], "the binary the Containerfile installs");
    assert!(read("Containerfile").contains("ENTRYPOINT [\"/usr/local/bin/proxy-agent\"]"));

    let args = expanded_args(container);
    let cli = Cli::try_parse_from(std::iter::once("proxy-agent".to_owned()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("the agent rejects the DaemonSet's args {args:?}:\n{e}"));
    let run = &cli.run;
    assert!(cli.command.is_none(), "the DaemonSet runs the agent itself");
    assert!(!run.cleanup);
    assert!(run.manifests.is_none() && run.kubeconfig.is_none(), "in a cluster: the in-cluster API config");
    assert_eq!(run.hostname_override.as_deref(), Some("value-of-NODE_NAME"));
    let node_name = container.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    let field = node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"));

    // The probes ask the port the agent serves /healthz on.
    let healthz = run.healthz_bind_address.0.expect("healthz enabled");
    assert_eq!(healthz.to_string(), "0.0.0.0:10256", "kube-proxy's address, where load balancers probe");
    let ports = container.ports.as_deref().unwrap_or_default();
    let named = |name: &str| ports.iter().find(|p| p.name.as_deref() == Some(name)).map(|p| p.container_port);
    for (what, probe) in [
        ("startup", &container.startup_probe),
        ("readiness", &container.readiness_probe),
        ("liveness", &container.liveness_probe),
    ] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("a {what} probe"));
        assert_eq!(get.path.as_deref(), Some("/healthz"), "{what} probe");
        let port = match &get.port {
            IntOrString::Int(port) => Some(*port),
            IntOrString::String(name) => named(name),
        };
        assert_eq!(port, Some(i32::from(healthz.port())), "{what} probe port");
    }
    let metrics = run.metrics_bind_address.0.expect("metrics enabled");
    assert_eq!(metrics.to_string(), "127.0.0.1:10249");
    // As with kube-proxy: given twice, the last wins; empty disables.
    let twice =
        Cli::try_parse_from(["proxy-agent", "--healthz-bind-address=", "--healthz-bind-address", "127.0.0.1:1"])
            .expect("a repeated flag");
    assert_eq!(twice.run.healthz_bind_address.0.map(|a| a.port()), Some(1));
    let off = Cli::try_parse_from(["proxy-agent", "--metrics-bind-address="]).expect("an empty address");
    assert_eq!(off.run.metrics_bind_address.0, None);
    // kube-proxy's --sync-period: 30 s unless given; a zero period is refused at parse time.
    assert_eq!(run.sync_period, Duration::from_secs(30));
    let zero = Cli::try_parse_from(["proxy-agent", "--sync-period", "0s"]).expect_err("a zero period");
    assert!(zero.to_string().contains("greater than zero"), "{zero}");

    // --bpf-root lies in the host's bpffs, --cgroup-path is the host's cgroup2 mount.
    let spec = pod_spec(&daemonset);
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let host_path_at = |mount_path: &Path| {
        let mount = mounts
            .iter()
            .filter(|m| mount_path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("no volume mounted at {}", mount_path.display()));
        let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name).expect("the mount's volume");
        let host = volume.host_path.as_ref().map(|h| h.path.clone()).expect("a hostPath volume");
        (mount.clone(), host)
    };
    let (bpffs, host) = host_path_at(&run.bpf_root);
    assert_eq!(host, "/sys/fs/bpf");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"), "a bpffs the agent mounts reaches the host");
    let cgroup = run.cgroup_path.as_deref().expect("--cgroup-path: the host's cgroup2, not the container's");
    let (cgroup_mount, host) = host_path_at(cgroup);
    assert_eq!(host, "/sys/fs/cgroup");
    assert_eq!(Path::new(&cgroup_mount.mount_path), cgroup, "the cgroup2 root itself, so every pod is covered");
}

#[test]
fn the_daemonset_runs_privileged_on_every_node_with_a_pinned_image() {
    let daemonset: DaemonSet = the();
    let spec = pod_spec(&daemonset);
    let container = agent_container(&daemonset);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );
    let security = container.security_context.as_ref().expect("a security context");
    assert_eq!(security.privileged, Some(true));
    let requests = container.resources.as_ref().and_then(|r| r.requests.as_ref()).expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"), "{requests:?}");

    let image = container.image.as_deref().expect("an image");
    let (_, tag) = image.rsplit_once(':').expect("a tag");
    assert_ne!(tag, "latest");
    assert_eq!(tag, env!("CARGO_PKG_VERSION"), "the image is tagged with the workspace version");
    assert_eq!(container.image_pull_policy.as_deref(), Some("IfNotPresent"));
    for (file, value) in documents() {
        let text = value.to_string();
        assert!(!text.contains(":latest"), "{file}: no `latest` images");
    }
}

#[test]
fn the_sample_is_the_seeds_apigw_test1() {
    let deployment: Deployment = the();
    let service: Service = the();
    assert_eq!(deployment.metadata.name.as_deref(), Some(SEED));
    assert_eq!(service.metadata.name.as_deref(), Some(SEED));
    let spec = deployment.spec.as_ref().expect("a deployment spec");
    assert_eq!(spec.replicas, Some(2), "two pods");
    let pod_labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    let service_spec = service.spec.as_ref().expect("a service spec");
    let selector = service_spec.selector.clone().unwrap_or_default();
    assert!(!selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "selects the pods");
    assert_eq!(service_spec.type_.as_deref(), Some("NodePort"));
    let ports = service_spec.ports.as_deref().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!((ports[0].port, ports[0].node_port), (SEED_PORT.into(), Some(SEED_NODE_PORT.into())));
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(TARGET_PORT.into())));
    let containers = &spec.template.spec.as_ref().expect("a pod spec").containers;
    let serves_80 = containers.iter().flat_map(|c| c.ports.iter().flatten()).any(|p| p.container_port == 80);
    assert!(serves_80, "the pods serve port 80");
}

#[test]
fn the_kind_cluster_has_no_kube_proxy() {
    let config: Value = serde_yaml_ng::from_str(&read("deploy/kind/cluster.yaml")).expect("YAML");
    assert_eq!(config["kind"], "Cluster");
    assert_eq!(config["apiVersion"], "kind.x-k8s.io/v1alpha4");
    assert_eq!(config["networking"]["kubeProxyMode"], "none");
    let nodes = config["nodes"].as_array().expect("nodes");
    assert!(nodes.len() >= 2, "a worker for the sample pods besides the control plane");
    for node in nodes {
        let image = node["image"].as_str().expect("a pinned node image");
        assert!(image.starts_with("kindest/node:v1.") && image.contains("@sha256:"), "{image}");
    }
    // The sample's nodePort is published on the host for the check from outside the cluster.
    let service: Service = the();
    let node_port = service.spec.and_then(|s| s.ports).and_then(|p| p[0].node_port).expect("nodePort");
    let published = nodes
        .iter()
        .flat_map(|n| n["extraPortMappings"].as_array().into_iter().flatten())
        .any(|m| m["containerPort"] == node_port && m["hostPort"] == node_port && m["listenAddress"] == "127.0.0.1");
    assert!(published, "nodePort {node_port} published on 127.0.0.1");
}

#[test]
fn the_containerfile_builds_with_the_pinned_toolchains() {
    let file = read("Containerfile");
    assert!(file.matches("\nFROM ").count() >= 2, "multi-stage");
    assert!(!file.contains(":latest"));
    let arg = |name: &str| {
        file.lines()
            .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
            .unwrap_or_else(|| panic!("ARG {name}=..."))
            .to_owned()
    };
    let workspace = read("Cargo.toml");
    let msrv =
        workspace.lines().find_map(|l| l.strip_prefix("rust-version = ")).expect("rust-version").trim_matches('"');
    assert!(arg("RUST_VERSION").starts_with(msrv), "stable {msrv}");
    assert!(arg("NIGHTLY").starts_with("nightly-20"), "a dated nightly");
    let setup = read("xtask/src/setup.rs");
    let linker = setup
        .lines()
        .find_map(|l| l.trim().strip_prefix("const BPF_LINKER_VERSION: &str = "))
        .expect("setup.rs pins bpf-linker");
    assert_eq!(format!("\"{}\";", arg("BPF_LINKER_VERSION")), linker, "the bpf-linker `cargo xtask setup` builds");
    assert!(file.contains("--component rust-src") && file.contains("--features llvm-22"));
    // The build needs every workspace member.
    let members = workspace.lines().find_map(|l| l.strip_prefix("members = ")).expect("members");
    for member in members.trim_matches(|c| c == '[' || c == ']').split(',').map(|m| m.trim().trim_matches('"')) {
        assert!(file.contains(&format!("COPY {member} {member}")), "the Containerfile copies {member}");
    }
    let runtime = file.rsplit("\nFROM ").next().expect("a last stage");
    let copies: Vec<&str> = runtime.lines().filter(|l| l.starts_with("COPY")).collect();
    assert_eq!(copies, ["COPY --from=build /out/proxy-agent /usr/local/bin/proxy-agent"], "the agent binary only");
}

// ---- `cargo xtask run --dry-run` ----

/// The xtask binary, built once into this test's own target directory (the workspace's is
/// locked by the `cargo test` running us).
fn xtask() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    BUILT
        .get_or_init(|| {
            let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("xtask");
            let out = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--locked", "--offline", "--package", "xtask", "--target-dir"])
                .arg(&target)
                .current_dir(root())
                .output()
                .expect("running cargo");
            assert!(out.status.success(), "building xtask: {}", String::from_utf8_lossy(&out.stderr));
            target.join("debug/xtask")
        })
        .clone()
}

/// A directory for a fake PATH, removed on drop; fake tools log their arguments to `calls`.
struct FakePath {
    dir: PathBuf,
}

impl FakePath {
    fn new(tools: &[&str]) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("proxy-fake-path-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fake PATH");
        for tool in tools {
            let script = format!("#!/bin/sh\necho \"{tool} $*\" >> '{}'\n", dir.join("calls").display());
            let path = dir.join(tool);
            std::fs::write(&path, script).expect("writing a fake tool");
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        Self { dir }
    }

    fn calls(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("calls")).ok()
    }

    fn xtask(&self, args: &[&str]) -> Output {
        Command::new(xtask())
            .args(args)
            .env("PATH", &self.dir)
            .env_remove("KUBECONFIG")
            .output()
            .expect("running xtask")
    }
}

impl Drop for FakePath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Asserts `needles` appear in `text` in this order.
fn assert_in_order(text: &str, needles: &[String]) {
    let mut at = 0;
    for needle in needles {
        match text[at..].find(needle.as_str()) {
            Some(found) => at += found + needle.len(),
            None => panic!("missing (or out of order) in the dry run: {needle:?}\n---\n{text}"),
        }
    }
}

#[test]
fn dry_run_prints_every_command_and_manifest_and_runs_nothing() {
    let fake = FakePath::new(&["docker", "kind", "kubectl"]);
    let out = fake.xtask(&["run", "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fake.calls(), None, "a dry run runs nothing");
    assert!(!stdout.contains("missing "), "every tool is on PATH: {stdout}");

    let daemonset: DaemonSet = the();
    let image = agent_container(&daemonset).image.clone().expect("image");
    let k = "kubectl --context kind-proxy";
    let mut want: Vec<String> = vec![
        "$ kind get clusters".into(),
        read("deploy/kind/cluster.yaml").trim_end().into(),
        "$ kind create cluster --name proxy --config deploy/kind/cluster.yaml".into(),
        format!("$ docker build -f Containerfile -t {image} ."),
        format!("$ kind load docker-image {image} --name proxy"),
        format!("$ {k} -n default get endpointslice kubernetes"),
        format!("$ {k} apply -f -"),
        "kind: ConfigMap".into(),
    ];
    want.extend(manifest_files("deploy/").iter().map(|f| read(f).trim_end().to_owned()));
    want.extend([
        format!("$ {k} apply -f deploy/\n"),
        format!("$ {k} -n kube-system rollout status daemonset/proxy-agent"),
    ]);
    want.extend(manifest_files("deploy/sample/").iter().map(|f| read(f).trim_end().to_owned()));
    want.extend([
        format!("$ {k} apply -f deploy/sample/\n"),
        format!("$ {k} rollout status deployment/apigw-test1"),
        format!("$ {k} run apigw-probe"),
        ":6666/hostname".into(),
        ":30066/hostname".into(),
        format!("$ {k} logs pod/apigw-probe"),
        "GET http://127.0.0.1:30066/hostname".into(),
        "kind delete cluster --name proxy".into(),
    ]);
    assert_in_order(&stdout, &want);

    // The ConfigMap it creates is the one the DaemonSet reads the API server's address from.
    let refs: BTreeSet<(String, String)> = agent_container(&daemonset)
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value_from.as_ref()?.config_map_key_ref.as_ref())
        .map(|r| (r.name.clone(), r.key.clone()))
        .collect();
    let start = stdout.find("apiVersion: v1\nkind: ConfigMap").expect("the ConfigMap");
    let end = stdout[start..].find("\n\n").map_or(stdout.len(), |e| start + e);
    let configmap: k8s_openapi::api::core::v1::ConfigMap =
        serde_yaml_ng::from_str(&stdout[start..end]).expect("the printed ConfigMap parses");
    let name = configmap.metadata.name.clone().expect("a name");
    let keys: BTreeSet<(String, String)> =
        configmap.data.unwrap_or_default().into_keys().map(|key| (name.clone(), key)).collect();
    assert_eq!(keys, refs, "the DaemonSet's configMapKeyRefs");
    assert_eq!(configmap.metadata.namespace, daemonset.metadata.namespace);

    // Another cluster name reaches every command.
    let out = fake.xtask(&["run", "--dry-run", "--name", "other"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("kind create cluster --name other") && stdout.contains("--context kind-other"));
    assert!(!stdout.contains("kind-proxy"), "{stdout}");
    assert_eq!(fake.calls(), None);
}

#[test]
fn missing_tools_are_named_with_how_to_get_them() {
    let empty = FakePath::new(&[]);
    // A dry run says what is missing and goes on.
    let out = empty.xtask(&["run", "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for (tool, hint) in [("docker", "docs.docker.com"), ("kind", "sigs.k8s.io/kind"), ("kubectl", "dl.k8s.io")] {
        let line =
            stdout.lines().find(|l| l.contains(&format!("missing {tool} "))).unwrap_or_else(|| panic!("{stdout}"));
        assert!(line.contains(hint), "{line}");
    }
    // The real thing stops before doing anything, naming all three.
    let out = empty.xtask(&["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for tool in ["docker", "kind", "kubectl"] {
        assert!(stderr.contains(&format!("- {tool} (")), "{stderr}");
    }
    assert!(!String::from_utf8_lossy(&out.stdout).contains("$ "), "no command ran");

    // With the tools but no Docker engine, it says so instead of failing obscurely.
    let broken = FakePath::new(&["kind", "kubectl"]);
    let failing_docker = broken.dir.join("docker");
    std::fs::write(&failing_docker, "#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
        .expect("fake");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&failing_docker, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = broken.xtask(&["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no engine answers"), "{stderr}");
    assert_eq!(broken.calls(), None, "nothing but `docker info` ran");
}
