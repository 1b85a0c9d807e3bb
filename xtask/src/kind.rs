//! `cargo xtask run`: the agent where users first try it, on a kind cluster without kube-proxy.
//! Creates (or reuses) the cluster, builds the image, loads it, points the agent at the API
//! server, applies `deploy/`, deploys the sample and checks `apigw-test1` from a pod (ClusterIP
//! and nodePort) and from this machine (nodePort), printing every command as it goes.
//! `--dry-run` prints every command and manifest and runs nothing.

use std::{
    fmt,
    io::{Read as _, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// The kind cluster's configuration (kube-proxy disabled).
const KIND_CONFIG: &str = "deploy/kind/cluster.yaml";
/// What `kubectl apply` gets: the agent.
const DEPLOY_DIR: &str = "deploy/";
/// The agent's DaemonSet (its image is the one built).
const DAEMONSET: &str = "deploy/20-daemonset.yaml";
/// The sample app.
const SAMPLE_DIR: &str = "deploy/sample/";
const SAMPLE: &str = "deploy/sample/apigw-test1.yaml";
/// The ConfigMap the DaemonSet reads the API server's address from.
const APISERVER_CONFIGMAP: &str = "proxy-agent-apiserver";
/// The sample Service and its ports.
const SERVICE: &str = "apigw-test1";
const PORT: u16 = 6666;
const NODE_PORT: u16 = 30066;
/// The client pod of the in-cluster check.
const PROBE_POD: &str = "apigw-probe";
/// Requests per check.
const REQUESTS: usize = 20;

/// What `cargo xtask run` was asked.
#[derive(Clone, Debug)]
pub struct Options {
    /// Print, do not run.
    pub dry_run: bool,
    /// The kind cluster's name.
    pub name: String,
}

/// A tool this needs, what for, and how to get it.
struct Tool {
    name: &'static str,
    why: &'static str,
    how: &'static str,
}

const TOOLS: &[Tool] = &[
    Tool {
        name: "docker",
        why: "builds the image and runs kind's nodes",
        how: "install Docker Engine (https://docs.docker.com/engine/install/) and start it; `docker info` must work",
    },
    Tool {
        name: "kind",
        why: "creates the cluster",
        how: "`go install sigs.k8s.io/kind@v0.30.0`, or download https://kind.sigs.k8s.io/dl/v0.30.0/kind-linux-amd64 \
              (-arm64 on ARM) into a directory on PATH and `chmod +x` it",
    },
    Tool {
        name: "kubectl",
        why: "applies the manifests and runs the checks",
        how: "download https://dl.k8s.io/release/v1.34.0/bin/linux/amd64/kubectl (arm64 on ARM) into a directory \
              on PATH and `chmod +x` it (https://kubernetes.io/docs/tasks/tools/)",
    },
];

/// A command line, printed as a shell would take it.
struct Cmd {
    program: &'static str,
    args: Vec<String>,
}

impl Cmd {
    fn new(program: &'static str, args: &[&str]) -> Self {
        Self { program, args: args.iter().map(|a| (*a).to_owned()).collect() }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(self.program);
        command.args(&self.args);
        command
    }
}

/// Quotes `word` for a POSIX shell if it needs it.
fn quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program)?;
        for arg in &self.args {
            write!(f, " {}", quote(arg))?;
        }
        Ok(())
    }
}

/// Whether `program` is an executable file on PATH.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(program))
        .any(|path| path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The value of the first `key:` line of a YAML file (enough for the image lines we read).
fn yaml_value(root: &Path, file: &str, key: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(root.join(file)).with_context(|| format!("reading {file}"))?;
    text.lines()
        .filter_map(|line| line.trim_start().trim_start_matches("- ").strip_prefix(key))
        .find_map(|rest| rest.strip_prefix(':'))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .with_context(|| format!("{file} has no `{key}:` line"))
}

/// Prints the steps and runs them (unless dry).
struct Runner<'a> {
    root: PathBuf,
    dry_run: bool,
    out: &'a mut dyn Write,
    context: String,
}

impl Runner<'_> {
    fn step(&mut self, what: &str) -> anyhow::Result<()> {
        writeln!(self.out, "\n== {what}")?;
        Ok(())
    }

    fn say(&mut self, text: &str) -> anyhow::Result<()> {
        writeln!(self.out, "   {text}")?;
        Ok(())
    }

    fn show(&mut self, cmd: &Cmd) -> anyhow::Result<()> {
        writeln!(self.out, "$ {cmd}")?;
        self.out.flush()?;
        Ok(())
    }

    /// `kubectl --context kind-<name> <args>`.
    fn kubectl(&self, args: &[&str]) -> Cmd {
        let mut cmd = Cmd::new("kubectl", &["--context", &self.context]);
        cmd.args.extend(args.iter().map(|a| (*a).to_owned()));
        cmd
    }

    /// Runs `cmd` with its output shown.
    fn run(&mut self, cmd: &Cmd) -> anyhow::Result<()> {
        self.show(cmd)?;
        if self.dry_run {
            return Ok(());
        }
        let status = cmd.command().current_dir(&self.root).status().with_context(|| format!("running {cmd}"))?;
        if !status.success() {
            bail!("`{cmd}` failed ({status})");
        }
        Ok(())
    }

    /// Runs `cmd` and returns its standard output, trimmed; a dry run returns `placeholder`.
    fn output(&mut self, cmd: &Cmd, placeholder: &str) -> anyhow::Result<String> {
        self.show(cmd)?;
        if self.dry_run {
            return Ok(placeholder.to_owned());
        }
        let out = cmd
            .command()
            .current_dir(&self.root)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {cmd}"))?;
        if !out.status.success() {
            bail!("`{cmd}` failed ({})", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Prints a manifest file as it is applied.
    fn manifest(&mut self, file: &str) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(self.root.join(file)).with_context(|| format!("reading {file}"))?;
        writeln!(self.out, "--- {file}\n{}", text.trim_end())?;
        Ok(())
    }

    /// Prints every YAML manifest directly in `dir` (as `kubectl apply -f dir` takes them).
    fn manifests(&mut self, dir: &str) -> anyhow::Result<()> {
        let mut files: Vec<String> = std::fs::read_dir(self.root.join(dir))
            .with_context(|| format!("reading {dir}"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml") || n.ends_with(".json"))
            .collect();
        files.sort();
        for file in files {
            self.manifest(&format!("{dir}{file}"))?;
        }
        Ok(())
    }

    /// `kubectl apply -f -` with `manifest` on its standard input.
    fn apply_text(&mut self, manifest: &str) -> anyhow::Result<()> {
        let cmd = self.kubectl(&["apply", "-f", "-"]);
        self.show(&cmd)?;
        writeln!(self.out, "{}", manifest.trim_end())?;
        if self.dry_run {
            return Ok(());
        }
        let mut child = cmd.command().stdin(Stdio::piped()).spawn().with_context(|| format!("running {cmd}"))?;
        child.stdin.take().context("stdin of kubectl")?.write_all(manifest.as_bytes())?;
        let status = child.wait()?;
        if !status.success() {
            bail!("`{cmd}` failed ({status})");
        }
        Ok(())
    }
}

/// Runs (or prints) the whole sequence; `out` gets the narration.
pub fn run(root: &Path, opts: &Options, out: &mut dyn Write) -> anyhow::Result<()> {
    let image = yaml_value(root, DAEMONSET, "image")?;
    let client_image = yaml_value(root, SAMPLE, "image")?;
    let name = opts.name.as_str();
    let mut r = Runner { root: root.to_owned(), dry_run: opts.dry_run, out, context: format!("kind-{name}") };
    if opts.dry_run {
        r.say("dry run: every command and manifest is printed, nothing is run")?;
    }

    r.step("checking for docker, kind and kubectl")?;
    let missing: Vec<&Tool> = TOOLS.iter().filter(|t| !on_path(t.name)).collect();
    for tool in &missing {
        r.say(&format!("missing {} ({}): {}", tool.name, tool.why, tool.how))?;
    }
    if !missing.is_empty() && !opts.dry_run {
        let list: Vec<String> = missing.iter().map(|t| format!("- {} ({}): {}", t.name, t.why, t.how)).collect();
        bail!("`cargo xtask run` needs tools that are not on PATH:\n{}", list.join("\n"));
    }
    if missing.is_empty() {
        r.say("all there")?;
    }
    let info = Cmd::new("docker", &["info", "--format", "{{.ServerVersion}}"]);
    let engine = r.output(&info, "<docker engine version>").map_err(|e| {
        e.context(
            "docker is installed but no engine answers: start it (e.g. `systemctl start docker`) or check DOCKER_HOST",
        )
    })?;
    r.say(&format!("docker engine {engine}"))?;

    r.step(&format!("kind cluster {name}, kube-proxy disabled ({KIND_CONFIG})"))?;
    let clusters = r.output(&Cmd::new("kind", &["get", "clusters"]), "")?;
    let exists = clusters.lines().any(|c| c.trim() == name);
    if exists {
        r.say(&format!("reusing cluster {name}"))?;
        let kube_proxy = r.output(
            &r.kubectl(&["-n", "kube-system", "get", "daemonset", "kube-proxy", "--ignore-not-found", "-o", "name"]),
            "",
        )?;
        if !kube_proxy.is_empty() {
            bail!(
                "cluster {name} runs kube-proxy, which would fight the agent: delete it (`kind delete cluster --name \
                 {name}`) or pass --name for a new cluster"
            );
        }
    } else {
        if opts.dry_run {
            r.say(&format!(
                "(created unless `kind get clusters` lists {name}; reused clusters must not run kube-proxy)"
            ))?;
        }
        r.manifest(KIND_CONFIG)?;
        r.run(&Cmd::new("kind", &["create", "cluster", "--name", name, "--config", KIND_CONFIG, "--wait", "120s"]))?;
    }

    r.step(&format!("building the agent image {image}"))?;
    r.run(&Cmd::new("docker", &["build", "-f", "Containerfile", "-t", &image, "."]))?;
    r.step(&format!("loading {image} into the cluster's nodes"))?;
    r.run(&Cmd::new("kind", &["load", "docker-image", &image, "--name", name]))?;

    r.step("pointing the agent at the API server (nothing translates its ClusterIP before the agent runs)")?;
    let endpoint = r.output(
        &r.kubectl(&[
            "-n",
            "default",
            "get",
            "endpointslice",
            "kubernetes",
            "-o",
            "jsonpath={.endpoints[0].addresses[0]} {.ports[0].port}",
        ]),
        "<apiserver-address> <apiserver-port>",
    )?;
    let (host, port) = endpoint
        .split_once(' ')
        .with_context(|| format!("the `kubernetes` EndpointSlice gave {endpoint:?}, not an address and a port"))?;
    let configmap = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {APISERVER_CONFIGMAP}\n  namespace: kube-system\n\
         data:\n  host: \"{host}\"\n  port: \"{port}\"\n"
    );
    r.apply_text(&configmap)?;

    r.step(&format!("applying {DEPLOY_DIR}: ServiceAccount, ClusterRole, binding, DaemonSet"))?;
    r.manifests(DEPLOY_DIR)?;
    r.run(&r.kubectl(&["apply", "-f", DEPLOY_DIR]))?;
    if exists || opts.dry_run {
        if opts.dry_run {
            r.say("(on a reused cluster only: the agents pick up the new image, adopting their predecessors' pins)")?;
        }
        r.run(&r.kubectl(&["-n", "kube-system", "rollout", "restart", "daemonset/proxy-agent"]))?;
    }
    r.step("waiting for the agent on every node (ready = /healthz answers 200)")?;
    r.run(&r.kubectl(&["-n", "kube-system", "rollout", "status", "daemonset/proxy-agent", "--timeout=300s"]))?;

    r.step(&format!("deploying the sample: {SERVICE}, two pods behind port {PORT} and nodePort {NODE_PORT}"))?;
    r.manifests(SAMPLE_DIR)?;
    r.run(&r.kubectl(&["apply", "-f", SAMPLE_DIR]))?;
    r.run(&r.kubectl(&["rollout", "status", &format!("deployment/{SERVICE}"), "--timeout=180s"]))?;

    r.step(&format!("checking {SERVICE} from a pod: its ClusterIP and a node's nodePort, {REQUESTS} requests each"))?;
    let cluster_ip =
        r.output(&r.kubectl(&["get", "service", SERVICE, "-o", "jsonpath={.spec.clusterIP}"]), "<clusterIP>")?;
    let node_ip = r.output(
        &r.kubectl(&["get", "nodes", "-o", "jsonpath={.items[0].status.addresses[?(@.type==\"InternalIP\")].address}"]),
        "<nodeIP>",
    )?;
    let pods_text = r.output(
        &r.kubectl(&["get", "pods", "-l", &format!("app={SERVICE}"), "-o", "jsonpath={.items[*].metadata.name}"]),
        "<pods>",
    )?;
    let pods: Vec<&str> = pods_text.split_whitespace().collect();
    let script = format!(
        "for i in $(seq {REQUESTS}); do \
         echo \"clusterip $(curl -s --max-time 3 http://{cluster_ip}:{PORT}/hostname || echo FAILED)\"; \
         echo \"nodeport $(curl -s --max-time 3 http://{node_ip}:{NODE_PORT}/hostname || echo FAILED)\"; done"
    );
    r.run(&r.kubectl(&["delete", "pod", PROBE_POD, "--ignore-not-found", "--wait=true"]))?;
    r.run(&r.kubectl(&[
        "run",
        PROBE_POD,
        "--restart=Never",
        &format!("--image={client_image}"),
        "--command",
        "--",
        "sh",
        "-c",
        &script,
    ]))?;
    r.run(&r.kubectl(&[
        "wait",
        &format!("pod/{PROBE_POD}"),
        "--for=jsonpath={.status.phase}=Succeeded",
        "--timeout=180s",
    ]))?;
    let log = r.output(&r.kubectl(&["logs", &format!("pod/{PROBE_POD}")]), "")?;
    r.run(&r.kubectl(&["delete", "pod", PROBE_POD, "--wait=false"]))?;
    if !opts.dry_run {
        for via in ["clusterip", "nodeport"] {
            let answers: Vec<&str> = log.lines().filter_map(|l| l.strip_prefix(via)).map(str::trim).collect();
            tally(&mut r, &format!("{via} from pod {PROBE_POD}"), &answers, &pods)?;
        }
    }

    r.step(&format!("checking the nodePort from this machine (outside the cluster): 127.0.0.1:{NODE_PORT}"))?;
    r.say(&format!("GET http://127.0.0.1:{NODE_PORT}/hostname, {REQUESTS} times (kind publishes the nodePort there)"))?;
    if !opts.dry_run {
        let answers: Vec<String> =
            (0..REQUESTS).map(|_| get_hostname(NODE_PORT).unwrap_or_else(|e| format!("FAILED ({e})"))).collect();
        let answers: Vec<&str> = answers.iter().map(String::as_str).collect();
        tally(&mut r, "nodeport from this machine", &answers, &pods)?;
    }

    r.step("done")?;
    r.say(&format!(
        "the cluster stays up: `kubectl --context kind-{name} -n kube-system logs ds/proxy-agent`; \
         delete it with `kind delete cluster --name {name}`"
    ))?;
    Ok(())
}

/// Prints which pod answered how often; fails unless every request was answered by a sample pod.
fn tally(r: &mut Runner<'_>, what: &str, answers: &[&str], pods: &[&str]) -> anyhow::Result<()> {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for answer in answers {
        *counts.entry(answer).or_default() += 1;
    }
    r.say(&format!("{what}:"))?;
    for (answer, n) in &counts {
        r.say(&format!("  {answer:<40} {n:>3}  {}", "#".repeat(*n)))?;
    }
    let good = answers.iter().filter(|a| pods.contains(a)).count();
    if answers.len() != REQUESTS || good != REQUESTS {
        bail!(
            "{what}: {good} of {REQUESTS} requests answered by {SERVICE}'s pods {pods:?}; see \
             `kubectl -n kube-system logs ds/proxy-agent`"
        );
    }
    Ok(())
}

/// One `GET /hostname` to `127.0.0.1:port`: the answering pod's name.
fn get_hostname(port: u16) -> anyhow::Result<String> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"GET /hostname HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{}", head.lines().next().unwrap_or_default());
    }
    Ok(body.trim().to_owned())
}
