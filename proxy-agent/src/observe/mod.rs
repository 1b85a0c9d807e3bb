//! Observability: the `/healthz` server (`--healthz-bind-address`, what kubelet probes and
//! cloud load balancers ask) and the Prometheus `/metrics` server (`--metrics-bind-address`),
//! both answered from the kernel's state at request time: pinned links and their attachment,
//! pinned maps and their fill, and the datapath's drop counters ([`drops`]).

pub mod drops;
mod health;
mod http;
pub mod kernel;
pub mod service_health;

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use hyper::StatusCode;
use proxy_common::maps;
use tokio::{net::TcpListener, sync::mpsc};
use tracing::{error, info, warn};

pub use self::health::{HEALTH_TIMEOUT, Health, Report};
use crate::{metrics::Metrics, source::Update};

/// An `IP:PORT` to serve on, or nothing (an empty flag value disables the server, as with
/// kube-proxy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindAddress(pub Option<SocketAddr>);

impl FromStr for BindAddress {
    type Err = std::net::AddrParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().is_empty() {
            return Ok(Self(None));
        }
        text.trim().parse().map(|a| Self(Some(a)))
    }
}

impl fmt::Display for BindAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(address) => write!(f, "{address}"),
            None => Ok(()),
        }
    }
}

/// How often a server whose address is taken tries again (kube-proxy's interval).
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Errors of the servers.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The address could not be bound.
    #[error("{flag} {address}: cannot listen: {source} (is another proxy, such as kube-proxy, running on this node?)")]
    Bind { flag: &'static str, address: SocketAddr, source: std::io::Error },
}

/// What the servers serve.
#[derive(Clone, Debug)]
pub struct ObserveConfig {
    /// `--healthz-bind-address`.
    pub healthz: BindAddress,
    /// `--metrics-bind-address`.
    pub metrics: BindAddress,
    /// `--bpf-root`: the pinned maps and `links/`.
    pub bpf_root: PathBuf,
    /// The cgroup the socket programs attach to.
    pub cgroup: PathBuf,
    /// How long `/healthz` tolerates a problem (twice `--sync-period`).
    pub health_timeout: Duration,
}

/// The running servers and the health state they answer from.
pub struct Observer {
    health: Health,
}

impl Observer {
    /// Passes the sources' updates on to the sync loop, timing how long each waits there.
    pub fn track(&self, updates: mpsc::Receiver<Update>) -> mpsc::Receiver<Update> {
        self.health.track(updates)
    }

    /// The health state.
    pub fn health(&self) -> &Health {
        &self.health
    }
}

/// Serves both addresses on background tasks (inside a Tokio runtime). Call it once the
/// datapath is loaded: the cgroup links pinned then are the ones `/healthz` requires. As with
/// kube-proxy, an address that cannot be bound is logged and retried, never fatal: the
/// datapath matters more than its probes.
pub fn start(config: ObserveConfig, metrics: Metrics) -> Observer {
    let health = Health::new(metrics.clone(), config.bpf_root.clone(), config.cgroup.clone(), config.health_timeout);
    let required: Vec<&str> = health.required_links().collect();
    if required.is_empty() {
        warn!(bpf_root = %config.bpf_root.display(), "no cgroup link is pinned: /healthz will not see the socket programs");
    }
    if let Some(address) = config.healthz.0 {
        let (health, last) = (health.clone(), std::sync::Mutex::new(Vec::new()));
        let handler: http::Handler = Arc::new(move |path| (path == "/healthz").then(|| healthz(&health, &last)));
        tokio::spawn(serve("--healthz-bind-address", address, "/healthz", handler));
    }
    if let Some(address) = config.metrics.0 {
        let (health, root) = (health.clone(), config.bpf_root.clone());
        let handler: http::Handler = Arc::new(move |path| match path {
            "/metrics" => {
                collect(&metrics, &health, &root);
                Some(http::reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.encode(),
                ))
            }
            // kube-proxy names its mode here (iptables, ipvs, nftables).
            "/proxyMode" => Some(http::reply(StatusCode::OK, "text/plain", "ebpf".into())),
            _ => None,
        });
        tokio::spawn(serve("--metrics-bind-address", address, "/metrics", handler));
    }
    if !required.is_empty() {
        info!(links = ?required, "/healthz requires these cgroup links");
    }
    Observer { health }
}

/// Binds `address` (retrying while it is taken) and serves `path` there.
async fn serve(flag: &'static str, address: SocketAddr, path: &'static str, handler: http::Handler) {
    loop {
        match TcpListener::bind(address).await {
            Ok(listener) => {
                info!(%address, "serving {path}");
                return http::serve(listener, path, handler).await;
            }
            Err(source) => {
                let error = ObserveError::Bind { flag, address, source };
                error!(%error, "retrying in {} s", BIND_RETRY.as_secs());
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    }
}

/// Answers `/healthz`; logs the problems when they change (`last`), not on every probe.
fn healthz(health: &Health, last: &std::sync::Mutex<Vec<String>>) -> http::Reply {
    let report = health.check();
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    if *last != report.problems {
        match report.healthy {
            true => info!("healthy"),
            false => warn!(problems = ?report.problems, "unhealthy"),
        }
        last.clone_from(&report.problems);
    }
    let status = if report.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    http::reply(status, "application/json", report.json())
}

/// Refreshes the metrics that come from the kernel: map fill and link attachment.
fn collect(metrics: &Metrics, health: &Health, root: &std::path::Path) {
    for name in maps::ALL {
        match kernel::map_fill(&root.join(name)) {
            Ok(fill) => metrics.map_filled(name, fill.entries, fill.max_entries),
            Err(error) => warn!(%error, "reading the fill of a map"),
        }
    }
    // A few dozen counters: cheap at every scrape.
    match drops::read(&root.join(maps::DROPS)) {
        Ok(counts) => metrics.datapath_drops(&counts),
        Err(error) => warn!(%error, "reading the drop counters"),
    }
    // The check records the links' attachment in the metrics.
    let _ = health.check();
}
