//! Observability: the `/healthz` server (`--healthz-bind-address`, what kubelet probes and
//! cloud load balancers ask) and the Prometheus `/metrics` server (`--metrics-bind-address`),
//! both answered from the kernel's state: pinned links and their attachment, asked at request
//! time; the interfaces the TC program could not be attached to, as the datapath last tried;
//! the pinned maps' fill, counted on a slow timer (see [`kernel::MapFills`]) so that a
//! scrape costs the same whatever the maps hold; and the datapath's drop counters ([`drops`]).

pub mod drops;
mod health;
mod http;
pub mod kernel;
pub(crate) mod service_health;

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use hyper::StatusCode;
use proxy_common::maps;
use tokio::{net::TcpListener, sync::mpsc};
use tracing::{error, info, warn};

pub use self::health::{HEALTH_TIMEOUT, Health, Report};
use crate::{datapath::Unattached, metrics::Metrics, source::Update};

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

/// How often the pinned maps' entries are counted for `/metrics` (`proxy_map_entries`): a read
/// of every map, about one `bpf()` call per 4096 entries. Prometheus scrapes every 15-30 s.
pub const MAP_FILL_REFRESH: Duration = Duration::from_secs(5);

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
    /// The interfaces that should carry a TC program and do not, kept by the datapath.
    pub unattached: Unattached,
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
    let health = Health::new(
        metrics.clone(),
        config.bpf_root.clone(),
        config.cgroup.clone(),
        config.health_timeout,
        config.unattached.clone(),
    );
    let fills = kernel::MapFills::new(config.bpf_root.clone());
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
        if let Err(error) = fills.refresh_every(MAP_FILL_REFRESH) {
            warn!(%error, "no thread for counting map entries: proxy_map_entries stays empty");
        }
        let (health, root) = (health.clone(), config.bpf_root.clone());
        let handler: http::Handler = Arc::new(move |path| match path {
            "/metrics" => {
                collect(&metrics, &health, &fills, &root);
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

/// Refreshes the metrics that come from the kernel: map fill (as last counted), the drop
/// counters and link attachment (asked now). Costs the same whatever the maps hold.
fn collect(metrics: &Metrics, health: &Health, fills: &kernel::MapFills, root: &std::path::Path) {
    fills.report(metrics);
    // A few dozen counters: cheap at every scrape.
    match drops::read(&root.join(maps::DROPS)) {
        Ok(counts) => metrics.datapath_drops(&counts),
        Err(error) => warn!(%error, "reading the drop counters"),
    }
    // The check records the links' attachment and the unattached interfaces in the metrics.
    let _ = health.check();
}

#[cfg(test)]
mod tests {
    use aya::maps::{HashMap, MapData};
    use proxy_common::{
        addr,
        conntrack::{CtKey, CtValue},
        maps,
    };

    use super::*;
    use crate::{datapath::testing::PinnedMaps, sys::bpf::calls_on_this_thread};

    /// The value of `series` in the exposition `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    /// A `/metrics` scrape makes as many `bpf()` calls with tens of thousands of conntrack
    /// entries as with none: the counting happens on a timer, in batches. (A scrape used to walk
    /// every map key by key: one call per entry.)
    #[test]
    fn a_scrape_costs_the_same_whatever_the_maps_hold() {
        let pins = PinnedMaps::new("scrape", 65_536);
        let metrics = Metrics::new();
        let root = pins.root().to_owned();
        let health = Health::new(metrics.clone(), root.clone(), root.clone(), HEALTH_TIMEOUT, Unattached::default());
        let fills = kernel::MapFills::new(root.clone());
        let scrape = || {
            let before = calls_on_this_thread();
            collect(&metrics, &health, &fills, &root);
            let text = metrics.encode();
            (calls_on_this_thread() - before, text)
        };
        fills.refresh();
        let (empty, text) = scrape();
        assert_eq!(sample(&text, r#"proxy_map_entries{map="conntrack"}"#), Some(0.0));

        let mut conntrack: HashMap<MapData, CtKey, CtValue> =
            HashMap::try_from(aya::maps::Map::LruHashMap(MapData::from_pin(root.join(maps::CONNTRACK)).unwrap()))
                .unwrap();
        for n in 0..50_000u32 {
            let key = CtKey {
                src: addr::from_v4(n.to_be_bytes()),
                dst: addr::from_v4([10, 96, 0, 10]),
                sport: 40_000,
                dport: 80,
                proto: 6,
                _pad: [0; 3],
            };
            conntrack.insert(key, CtValue::default(), 0).unwrap();
        }
        // Counted apart from the agent's reader (an LRU map may evict before it is full).
        let held = conntrack.keys().filter_map(Result::ok).count();
        assert!(held > 40_000, "the map holds {held} entries");

        let before = calls_on_this_thread();
        fills.refresh();
        let refresh = calls_on_this_thread() - before;
        let (full, text) = scrape();
        assert_eq!(full, empty, "a scrape with {held} conntrack entries costs what one with none does");
        assert_eq!(sample(&text, r#"proxy_map_entries{map="conntrack"}"#), Some(held as f64));
        assert_eq!(sample(&text, r#"proxy_map_max_entries{map="conntrack"}"#), Some(65_536.0));
        // The timer's count reads in batches: a few calls per map, one more per 4096 entries
        // (plus a key walk of the small LPM trie, which has no batch reads and is empty here).
        let bound = 4 * maps::ALL.len() as u64 + held as u64 / 4096 + 1;
        assert!(refresh <= bound, "counting took {refresh} bpf() calls for {held} entries (at most {bound})");
    }
}
