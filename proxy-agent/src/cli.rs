//! The command line: kube-proxy's flag names where the meaning is the same.

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum, parser::ValueSource};
use tokio::sync::mpsc;
use tracing::{error, info};

use crate::{
    datapath::{self, Datapath, LoadOptions, writer::Writer},
    dsr::{self, LbMode},
    maglev::{self, LbAlgorithm, MaglevSettings},
    metrics::Metrics,
    model::Cidr,
    observe,
    source::{kube, manifests},
    sync::{self, SyncConfig, Syncer},
    tasks::{Tasks, panic_message},
};

/// eBPF service load balancer: a drop-in replacement for kube-proxy.
#[derive(Debug, Parser)]
#[command(name = "proxy-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands besides running the agent.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what the pinned maps hold (services, backends, affinity, conntrack); the agent need
    /// not run.
    Inspect(crate::inspect::InspectArgs),
    /// Explain where a connect or packet from a client to address:port goes, and why.
    Explain(crate::inspect::ExplainArgs),
    /// Stream every translation and drop of both datapaths as it happens, until Ctrl-C.
    Trace(crate::trace::TraceArgs),
}

/// Flags of the agent itself.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Path to a kubeconfig file (default: in-cluster config, then the usual kubeconfig search).
    #[arg(long, value_name = "PATH", global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// Read Services, EndpointSlices and Nodes from this directory of YAML instead of the API
    /// server, and watch it for changes.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// The name of this node (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,

    /// Comma-separated CIDRs of either family: only node addresses inside them serve nodePorts
    /// (default: all).
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    pub nodeport_addresses: Vec<Cidr>,

    /// The pod CIDR ranges of the cluster, comma-separated, at most one per family (`v4,v6`, as
    /// kube-proxy takes them).
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    pub cluster_cidr: Vec<Cidr>,

    /// Socket load balancing only for the host network namespace (Cilium's flag, for service
    /// meshes): pods' connections leave them with the service address, where a sidecar or node
    /// proxy sees it, and are translated per packet on the node (TC on the pod-facing
    /// interfaces, DNAT without SNAT), with the same backend choice. Needs --cluster-cidr or
    /// the Node's podCIDRs to find those interfaces.
    #[arg(long)]
    pub bpf_lb_sock_hostns_only: bool,

    /// Preallocate the maps only the agent writes (`services`, `backends`, `service_names`;
    /// Cilium's flag): their inserts are ~3× faster (the full program of 10 000 services × 10
    /// endpoints in about half the time), but the kernel holds their whole size from the start
    /// (~300 MiB at the default sizes, against ~66 MiB plus ~100 bytes an entry held without)
    /// and the first load takes longer. Worth it with the --*-map-size flags sized to the
    /// cluster. Changing it across a restart replaces the three maps as an upgrade does.
    #[arg(long)]
    pub preallocate_bpf_maps: bool,

    /// bpffs directory where maps and links are pinned.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/proxy", global = true)]
    pub bpf_root: PathBuf,

    /// cgroup v2 directory the socket programs attach to (default: the cgroup2 mount).
    #[arg(long, value_name = "DIR")]
    pub cgroup_path: Option<PathBuf>,

    /// Bursts of changes are applied at most this often (e.g. 10ms, 1s).
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = period)]
    pub min_sync_period: Duration,

    /// How often the maps are checked against what was programmed (entries deleted or changed
    /// outside the agent are put back, stale affinity, socket and flow entries removed), and
    /// half of how long `/healthz` tolerates a problem, such as an unreachable API server.
    /// The large maps are read a part per check (~40 ms, 10 000 to 40 000 entries): at
    /// 100 000 services × 10 endpoints a round over all of them takes ~55 to 270 checks.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = positive_duration)]
    pub sync_period: Duration,

    /// Size of the services map: a frontend (ClusterIP, nodePort, external or LoadBalancer
    /// address and port) takes one entry plus one per endpoint. Also sizes `service_names` (one
    /// entry per service port) and `source_ranges`. Not preallocated: a cap, the kernel memory
    /// follows the entries held. The default holds 100 000 services of 10 endpoints.
    #[arg(long, value_name = "N", default_value_t = proxy_common::maps::SERVICES_MAX_ENTRIES)]
    pub services_map_size: u32,

    /// Size of the backends map: one entry per distinct endpoint (address, port, protocol).
    /// Not preallocated; the default holds 1 000 000 endpoints.
    #[arg(long, value_name = "N", default_value_t = proxy_common::maps::BACKENDS_MAX_ENTRIES)]
    pub backends_map_size: u32,

    /// Size of the session-affinity LRU map: one entry per client and ClientIP-affinity service
    /// port; when full the least recently used goes. Preallocated by the kernel.
    #[arg(long, value_name = "N", default_value_t = proxy_common::maps::AFFINITY_MAX_ENTRIES)]
    pub affinity_map_size: u32,

    /// Size of the connection-tracking LRU map of the NodePort path (two entries per flow).
    /// Also sizes the socket maps `sock_rev` and `sock_backend` (half of it: one entry per
    /// socket) and `fragments` (a 32nd). LRUs, preallocated by the kernel.
    #[arg(long, value_name = "N", default_value_t = proxy_common::maps::CONNTRACK_MAX_ENTRIES)]
    pub conntrack_map_size: u32,

    /// How traffic from outside the node (nodePorts, externalIPs, LoadBalancer IPs) picks a
    /// backend: `random` on each node (kube-proxy's behaviour), or `maglev`: the entry of the
    /// backend set's Maglev table for a hash of the flow's 5-tuple (of the client address under
    /// ClientIP affinity), so a flow the network moves to another node keeps its backend. A
    /// service's `proxy.kube-ebpf.io/lb-algorithm` annotation (`random` or `maglev`) overrides
    /// this for that service. ClusterIP traffic is always random.
    #[arg(long, value_name = "ALGORITHM", value_enum, default_value_t = LbAlgorithm::Random)]
    pub lb_algorithm: LbAlgorithm,

    /// How traffic from outside under `externalTrafficPolicy: Cluster` reaches a backend on
    /// another node: `snat` to the receiving node (kube-proxy's behaviour), `dsr`: direct
    /// server return, the client's address kept and the reply sent straight from the
    /// backend's node (IPv4; IPv6 stays SNATed), or `hybrid`: DSR for TCP, SNAT for UDP.
    /// DSR needs this agent on every node that runs backends (a DaemonSet): the backend's node
    /// rewrites the replies.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = LbMode::Snat)]
    pub lb_mode: LbMode,

    /// Slots per Maglev table: a prime in [251, 65521]; 16381 by default, as Cilium. Keep it
    /// above 100 times the largest backend set (imbalance near 1 %). A table costs 4 bytes a
    /// slot (64 KiB at 16381) and exists only for a service port that uses Maglev and has an
    /// external frontend with endpoints (one per port, shared by its frontends): 10 000 such
    /// services take 628 MiB at 16381, 42 MiB at 1021. The number of tables is bounded by
    /// --services-map-size. Every node must use the same value.
    #[arg(long, value_name = "N", default_value_t = proxy_common::maglev::TABLE_SIZE_DEFAULT, value_parser = maglev::parse_table_size)]
    pub maglev_table_size: u32,

    /// Seed of the Maglev permutations and flow hash. Every node must use the same, or a flow
    /// moved to another node lands on another backend.
    #[arg(long, value_name = "STRING", default_value = maglev::DEFAULT_SEED)]
    pub maglev_hash_seed: String,

    /// Serve the health check (`GET /healthz`) here; empty disables it. Given twice, the last wins.
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:10256", overrides_with = "healthz_bind_address")]
    pub healthz_bind_address: observe::BindAddress,

    /// Serve Prometheus metrics (`GET /metrics`) here; empty disables them. Given twice, the last wins.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:10249", overrides_with = "metrics_bind_address")]
    pub metrics_bind_address: observe::BindAddress,

    /// Detach every program and remove every pin under --bpf-root, then exit.
    #[arg(long)]
    pub cleanup: bool,

    /// Read kube-proxy's configuration file (the `config.conf` of kubeadm's `kube-proxy`
    /// ConfigMap): the fields that mean the same here are used; flags given win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Remove kube-proxy's iptables chains, nftables tables and IPVS interface from this node
    /// (as `kube-proxy --cleanup` does), then exit. Stop kube-proxy first.
    #[arg(long)]
    pub cleanup_kube_proxy: bool,

    /// Log verbosity: -v for debug, -vv for trace (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Log format: `text` for people (coloured only on a terminal), `json` for log shippers
    /// (one object per line).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line of text per event; ANSI colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per event: `timestamp`, `level`, `target`, and `fields` with `message`
    /// and the event's named fields.
    Json,
}

/// The longest period either sync flag (or `--config`'s syncPeriod, minSyncPeriod) takes. Longer makes no sense for a proxy, and the
/// loop's clock arithmetic (`Instant` ± the period) must not overflow.
pub(crate) const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// A duration up to a day (`10ms`, `1s`); zero means no coalescing.
fn period(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d > MAX_PERIOD => Err("must be at most 24h".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration greater than zero and up to a day (`1s`, `30s`).
fn positive_duration(text: &str) -> Result<Duration, String> {
    match period(text)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

/// How often the TC program is attached to interfaces that appeared since.
const INTERFACE_RESCAN: Duration = Duration::from_secs(2);

/// glibc malloc arenas: two keep freed memory reusable across the agent's threads.
const MALLOC_ARENAS: i32 = 2;

/// The binary's entry point.
pub fn main() -> ExitCode {
    // Before the async runtime starts its threads.
    crate::sys::alloc::limit_arenas(MALLOC_ARENAS);
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(cli.run.verbose, cli.run.log_format);
    log_panics();
    if let Some(path) = cli.run.config.clone()
        && let Err(e) = read_config(&path, &mut cli.run, &matches)
    {
        error!("{e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        None if cli.run.cleanup => cleanup(&cli.run, &runtime),
        None if cli.run.cleanup_kube_proxy => crate::kube_proxy::cleanup().map_err(Into::into),
        None => runtime.block_on(run(cli.run)),
        Some(Command::Inspect(args)) => crate::inspect::run_inspect(&cli.run.bpf_root, &args).map_err(Into::into),
        Some(Command::Explain(args)) => crate::inspect::run_explain(&cli.run.bpf_root, &args).map_err(Into::into),
        Some(Command::Trace(args)) => runtime.block_on(crate::trace::run(&cli.run.bpf_root, &args)).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Applies kube-proxy's configuration file at `path` to `args` under the flags given in
/// `matches`, and says in one line each what was used, ignored and unknown.
fn read_config(
    path: &Path,
    args: &mut RunArgs,
    matches: &clap::ArgMatches,
) -> Result<(), crate::kube_proxy::config::ConfigError> {
    let config = crate::kube_proxy::config::FileConfig::load(path)?;
    let used = config.apply(args, |id| {
        matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
    });
    let file = path.display();
    info!(config = %file, used = used.join(", "), "read kube-proxy's configuration; flags given override it");
    if !config.ignored.is_empty() {
        info!(config = %file, ignored = config.ignored.join(", "), "ignored: these fields tune kube-proxy itself");
    }
    if !config.unknown.is_empty() {
        tracing::warn!(
            config = %file,
            unknown = config.unknown.join(", "),
            "unknown fields in kube-proxy's configuration (misspelt, or from a newer kube-proxy): ignored"
        );
    }
    for note in &config.notes {
        tracing::warn!(config = %file, "{note}");
    }
    Ok(())
}

fn init_logging(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        // A file or a pipe (`kubectl logs`) would show colour codes raw; NO_COLOR is the
        // convention for turning them off on a terminal too.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal() && no_color_unset()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Whether the `NO_COLOR` convention (no-color.org: set and not empty) leaves colours on.
fn no_color_unset() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Logs panics through `tracing`, so a panic is one line in the log's format (a JSON line for
/// log shippers) with where it happened; `RUST_BACKTRACE=1` adds the backtrace.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => backtrace.to_string(),
            _ => String::new(),
        };
        let thread = std::thread::current();
        error!(thread = thread.name(), location, backtrace, "panicked: {}", panic_message(info.payload()));
    }));
}

fn cleanup(args: &RunArgs, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let removed =
        datapath::cleanup(&args.bpf_root).with_context(|| format!("cleaning up {}", args.bpf_root.display()))?;
    info!(bpf_root = %args.bpf_root.display(), removed, "cleaned up");
    // The Node's direct server return annotation goes too (other nodes would keep sending DSR
    // flows here), when there is an API server to ask: in a cluster, or with --kubeconfig.
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if args.manifests.is_none() && (in_cluster || args.kubeconfig.is_some()) {
        let node_name = node_name(args.hostname_override.as_deref(), Path::new(HOSTNAME_FILE))?;
        let withdraw = async {
            let client = kube::client(args.kubeconfig.as_deref()).await?;
            anyhow::Ok(kube::withdraw_dsr(client, &node_name).await?)
        };
        runtime.block_on(withdraw).with_context(|| {
            format!("removing the annotation {} of Node {node_name}: remove it by hand (kubectl annotate node {node_name} {}-)", dsr::DSR_ANNOTATION, dsr::DSR_ANNOTATION)
        })?;
        info!(node = node_name, annotation = dsr::DSR_ANNOTATION, "withdrew direct server return from the Node");
    }
    Ok(())
}

/// Where Linux keeps the host name (what Go's `os.Hostname` reads for kube-proxy).
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

/// This node's name as kube-proxy derives it: `--hostname-override`, else the host name read
/// from `hostname_file`; trimmed and lowercased. An empty name is an error: no endpoint would be
/// local, so all `externalTrafficPolicy: Local` traffic from outside would be dropped.
fn node_name(hostname_override: Option<&str>, hostname_file: &Path) -> anyhow::Result<String> {
    let name = match hostname_override.map(str::trim).filter(|n| !n.is_empty()) {
        Some(name) => name.to_owned(),
        None => std::fs::read_to_string(hostname_file).with_context(|| {
            format!("reading the host name from {} - pass --hostname-override", hostname_file.display())
        })?,
    };
    let name = name.trim();
    anyhow::ensure!(
        !name.is_empty(),
        "the host name in {} is empty - pass --hostname-override with this node's name",
        hostname_file.display()
    );
    Ok(name.to_lowercase())
}

/// `--cluster-cidr` as kube-proxy accepts it: one range, or two of different families
/// (`10.244.0.0/16,fd00:10:244::/56`).
fn check_cluster_cidrs(cidrs: &[Cidr]) -> anyhow::Result<()> {
    let dual_stack = matches!(cidrs, [a, b] if a.family() != b.family());
    anyhow::ensure!(
        cidrs.len() <= 1 || dual_stack,
        "--cluster-cidr {} (or clusterCIDR in --config): give one range, or one IPv4 and one IPv6 range \
         separated by a comma",
        cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    );
    Ok(())
}

/// Runs the agent until SIGINT or SIGTERM. Programs and pinned maps stay in place on exit, so
/// traffic keeps flowing and the next agent adopts them.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node_name = node_name(args.hostname_override.as_deref(), Path::new(HOSTNAME_FILE))?;
    check_cluster_cidrs(&args.cluster_cidr)?;
    crate::kube_proxy::warn_if_present();
    crate::preflight::check(&args.bpf_root, args.cgroup_path.as_deref())?;
    let cgroup = match &args.cgroup_path {
        Some(path) => path.clone(),
        None => datapath::find_cgroup2_mount().context("finding the cgroup v2 mount - pass --cgroup-path")?,
    };
    let opts = LoadOptions {
        bpf_root: args.bpf_root.clone(),
        cgroup,
        services_max: args.services_map_size,
        backends_max: args.backends_map_size,
        affinity_max: args.affinity_map_size,
        conntrack_max: args.conntrack_map_size,
        sock_hostns_only: args.bpf_lb_sock_hostns_only,
        preallocate: args.preallocate_bpf_maps,
    };
    let (datapath, maps) = Datapath::load(&opts).context("loading the datapath")?;
    let metrics = Metrics::new();
    let observe = observe::ObserveConfig {
        healthz: args.healthz_bind_address,
        metrics: args.metrics_bind_address,
        bpf_root: opts.bpf_root.clone(),
        cgroup: opts.cgroup.clone(),
        health_timeout: args.sync_period * 2,
        unattached: datapath.unattached().clone(),
    };
    let observer = observe::start(observe, metrics.clone());
    let host_netns_cookie = datapath::netns_cookie().unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot read this network namespace's cookie: no localhost nodePorts");
        0
    });
    let config = SyncConfig {
        node_name: node_name.clone(),
        nodeport_cidrs: args.nodeport_addresses.clone(),
        host_netns_cookie,
        lb_algorithm: args.lb_algorithm,
        lb_mode: args.lb_mode,
    };
    info!(node = config.node_name, bpf_root = %opts.bpf_root.display(), cgroup = %opts.cgroup.display(), "datapath ready");
    let settings = MaglevSettings { table_size: args.maglev_table_size, seed: args.maglev_hash_seed.clone() };
    info!(
        lb_algorithm = args.lb_algorithm.as_str(),
        lb_mode = args.lb_mode.as_str(),
        maglev_table_size = settings.table_size,
        maglev_table_bytes = settings.table_bytes(),
        "backend selection for traffic from outside"
    );
    let mut writer = Writer::new(maps);
    writer.set_maglev(settings).context("writing the Maglev hash seed (map maglev_config)")?;
    let mut syncer = Syncer::new(writer, config, metrics.clone());
    let (updates_tx, updates) = mpsc::channel(1024);
    let updates = observer.track(updates);
    let mut tasks = Tasks::default();
    match &args.manifests {
        Some(dir) => {
            let source = manifests::run(dir.clone(), updates_tx, metrics.clone());
            tasks.spawn("source", async move { Ok(source.await?) });
        }
        None => {
            let client = kube::client(args.kubeconfig.as_deref()).await?;
            let events = kube::refusal_events(client.clone(), node_name.clone());
            syncer.on_refused(Box::new(move |service, message| {
                let _ = events.send((service.to_owned(), message.to_owned()));
            }));
            let args_lb_mode = args.lb_mode;
            tasks.spawn("source", async move {
                kube::run(client, node_name, args_lb_mode != LbMode::Snat, updates_tx, metrics).await;
                Ok(())
            });
        }
    }
    tokio::spawn(observe::service_health::run(syncer.health_checks()));
    // The TC program goes on the node's interfaces, known once the Node is: attached as soon as
    // the node changes, before the sync that programs its frontends, and again periodically
    // for pods' interfaces that appear later. All of it on the datapath's own thread: the sync
    // loop only hands jobs over, and never waits for the kernel.
    let upgrading = datapath.upgrading();
    let schedule = datapath::Schedule { rescan: INTERFACE_RESCAN, check_links: args.sync_period };
    let attacher = std::sync::Arc::new(
        datapath::Attacher::spawn(datapath, syncer.node_updates(), args.cluster_cidr.clone(), schedule)
            .context("starting the datapath thread")?,
    );
    let datapath_thread = attacher.ended();
    tasks.spawn("datapath thread", async move {
        datapath_thread.await;
        Ok(())
    });
    let on_node = attacher.clone();
    syncer.on_node_change(Box::new(move |info| on_node.rescan(info)));
    if upgrading {
        // The new maps are filled by the first sync; only then may the new programs serve.
        let attacher = attacher.clone();
        syncer.on_first_sync(Box::new(move || attacher.finish_upgrade()));
    }
    let sync = sync::run(syncer, updates, args.min_sync_period, args.sync_period);
    tasks.spawn("sync", async move {
        sync.await;
        Ok(())
    });
    // Every task runs until the agent stops: the first to end is a failure (exit status 1,
    // so the DaemonSet restarts the agent). Dropping `tasks` aborts the others.
    tokio::select! {
        ended = tasks.first_ended() => Err(ended.into()),
        () = shutdown_signal() => {
            info!("shutting down; programs and maps stay in place");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return std::future::pending().await };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host name file with `content`, removed on drop.
    struct HostnameFile(PathBuf);

    impl HostnameFile {
        fn new(content: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("proxy-hostname-{}-{n}", std::process::id()));
            std::fs::write(&path, content).expect("writing the host name file");
            Self(path)
        }
    }

    impl Drop for HostnameFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Periods beyond a day are refused at parse time: `Instant` arithmetic with such a value
    /// used to panic the sync loop (a 300 000 000 000-year `--min-sync-period` did).
    #[test]
    fn sync_periods_are_bounded_and_the_periodic_check_is_never_zero() {
        let parse = |flag: &str, value: &str| Cli::try_parse_from(["proxy-agent", flag, value]).map(|c| c.run);
        for flag in ["--min-sync-period", "--sync-period"] {
            let error = parse(flag, "300000000000y").expect_err("refused").to_string();
            assert!(error.contains(flag) && error.contains("at most 24h"), "{error}");
            assert!(parse(flag, "24h").is_ok(), "{flag} 24h is accepted");
        }
        assert_eq!(parse("--min-sync-period", "0s").expect("no coalescing").min_sync_period, Duration::ZERO);
        let error = parse("--sync-period", "0s").expect_err("refused").to_string();
        assert!(error.contains("greater than zero"), "{error}");
    }

    #[test]
    fn the_maglev_flags_default_as_documented_and_refuse_a_size_that_is_not_a_prime_in_range() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["proxy-agent"], args].concat()).map(|c| c.run);
        let defaults = parse(&[]).expect("no flags");
        assert_eq!(defaults.lb_algorithm, LbAlgorithm::Random, "kube-proxy's behaviour by default");
        assert_eq!(defaults.lb_mode, LbMode::Snat, "kube-proxy's behaviour by default");
        let modes = ["snat", "dsr", "hybrid"].map(|m| parse(&["--lb-mode", m]).expect("valid").lb_mode);
        assert_eq!(modes, [LbMode::Snat, LbMode::Dsr, LbMode::Hybrid]);
        assert!(parse(&["--lb-mode", "tunnel"]).is_err(), "an unknown mode is refused");
        assert_eq!((defaults.maglev_table_size, defaults.maglev_hash_seed.as_str()), (16_381, maglev::DEFAULT_SEED));
        let chosen = parse(&["--lb-algorithm", "maglev", "--maglev-table-size", "1021"]).expect("valid");
        assert_eq!((chosen.lb_algorithm, chosen.maglev_table_size), (LbAlgorithm::Maglev, 1021));
        for bad in ["16383", "100", "70000", "x"] {
            let error = parse(&["--maglev-table-size", bad]).expect_err("refused").to_string();
            assert!(error.contains(&format!("--maglev-table-size {bad}")), "{error}");
        }
        assert!(parse(&["--lb-algorithm", "round-robin"]).is_err());
    }

    #[test]
    fn cidr_flags_take_both_families_comma_separated() {
        let cli = Cli::try_parse_from([
            "proxy-agent",
            "--nodeport-addresses",
            "172.18.0.0/16,fd00:172:18::/64",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
        ])
        .unwrap();
        let text = |cidrs: &[Cidr]| cidrs.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(text(&cli.run.nodeport_addresses), ["172.18.0.0/16", "fd00:172:18::/64"]);
        assert_eq!(text(&cli.run.cluster_cidr), ["10.244.0.0/16", "fd00:10:244::/56"]);
        assert!(check_cluster_cidrs(&cli.run.cluster_cidr).is_ok());
        let error = Cli::try_parse_from(["proxy-agent", "--nodeport-addresses", "fd00::/129"]).unwrap_err();
        assert!(error.to_string().contains("fd00::/129"), "{error}");
    }

    #[test]
    fn cluster_cidr_is_one_range_or_one_per_family() {
        let cidrs = |list: &[&str]| list.iter().map(|c| c.parse::<Cidr>().unwrap()).collect::<Vec<_>>();
        assert!(check_cluster_cidrs(&[]).is_ok());
        assert!(check_cluster_cidrs(&cidrs(&["fd00:10:244::/56"])).is_ok());
        for bad in [
            &["10.244.0.0/16", "10.245.0.0/16"][..],
            &["fd00::/56", "fd01::/56"],
            &["10.0.0.0/8", "fd00::/8", "11.0.0.0/8"],
        ] {
            let error = check_cluster_cidrs(&cidrs(bad)).unwrap_err().to_string();
            assert!(error.contains("one IPv4 and one IPv6"), "{error}");
        }
    }

    #[test]
    fn the_node_name_is_the_override_else_the_host_name_trimmed_and_lowercased() {
        let file = HostnameFile::new("Node-1.Example\n");
        assert_eq!(node_name(Some("node-7"), &file.0).unwrap(), "node-7");
        assert_eq!(node_name(None, &file.0).unwrap(), "node-1.example");
        assert_eq!(node_name(Some(" "), &file.0).unwrap(), "node-1.example", "an empty override is no override");
    }

    #[test]
    fn an_empty_host_name_is_an_error_naming_the_flag() {
        let file = HostnameFile::new("\n");
        let error = format!("{:#}", node_name(None, &file.0).unwrap_err());
        assert!(error.contains("is empty - pass --hostname-override"), "{error}");
    }

    #[test]
    fn an_unreadable_host_name_is_an_error_naming_the_file_and_the_flag() {
        let missing = std::env::temp_dir().join(format!("proxy-no-hostname-{}", std::process::id()));
        let error = format!("{:#}", node_name(None, &missing).unwrap_err());
        assert!(error.contains(&missing.display().to_string()), "{error}");
        assert!(error.contains("pass --hostname-override"), "{error}");
    }
}
