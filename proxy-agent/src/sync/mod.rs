//! The sync layer: takes the sources' updates, recomputes the services that changed with the
//! pure model, and hands the differences to the map writer. One job per file:
//!
//! - [`tracker`]: what changed (kube-proxy's change trackers; no-op updates dropped);
//! - [`claims`]: who owns a frontend two services ask for;
//! - [`refusals`]: services refused for lack of room, logged when that starts and ends;
//! - [`run`]: the loop, coalescing bursts (`--min-sync-period`) and the periodic check
//!   (`--sync-period`);
//! - this file: the [`Syncer`], which programs one service at a time through the writer.

mod claims;
mod refusals;
mod run;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod tracker;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node;
use proxy_common::{addr, config::NodeConfig};
use tracing::{debug, info, warn};

pub use self::run::run;
use self::{
    claims::Claims,
    refusals::Refusals,
    tracker::{Kind, Tracker},
};
use crate::{
    datapath::writer::{Departed, MapStore, WriteStats, Writer},
    dsr,
    metrics::Metrics,
    model::{self, Cidr, Frontend, FrontendEntry, HealthCheck, NodeInfo, Skip, SkipReason},
    source::{Change, Sourced, Update},
};

/// What the sync needs to know about this node.
#[derive(Clone, Debug, Default)]
pub struct SyncConfig {
    /// This node's name (`--hostname-override`).
    pub node_name: String,
    /// `--nodeport-addresses`: node addresses in these blocks serve nodePorts (all if empty).
    pub nodeport_cidrs: Vec<Cidr>,
    /// The agent's (the node's) network namespace cookie, for loopback nodePorts; 0: unknown.
    pub host_netns_cookie: u64,
    /// `--lb-algorithm`: how traffic from outside picks a backend, unless a service's
    /// annotation says otherwise.
    pub lb_algorithm: crate::maglev::LbAlgorithm,
    /// `--lb-mode`: SNAT or direct server return for traffic from outside.
    pub lb_mode: dsr::LbMode,
}

/// The outcome of one sync, for the log line and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Services recomputed.
    pub services: usize,
    /// Map writes.
    pub writes: WriteStats,
    /// Frontends programmed after the sync.
    pub frontends: usize,
    /// Of those, IPv4 then IPv6 (the `family` label of `proxy_frontends_programmed`).
    pub frontends_by_family: [usize; 2],
    /// Distinct backends programmed after the sync.
    pub backends: usize,
    /// Skips found.
    pub skipped: usize,
    /// Map operations that failed (a failing sync, for `/healthz`).
    pub errors: u64,
    /// Services refused because a map was full: logged, counted and retried, but the sync did
    /// what it could, so `/healthz` stays healthy (one oversized service must not take every
    /// node out of its load balancers).
    pub refused: u64,
}

/// What runs when this node's info changes.
pub type NodeHook = Box<dyn FnMut(&NodeInfo) + Send>;

/// What runs when a service is refused (`namespace/name`, why): the Kubernetes source posts an
/// Event on the Service.
pub type RefusalHook = Box<dyn FnMut(&str, &str) + Send>;

/// Services changed at once from which a sync stages its writes and writes them in batches
/// (the first full sync, a relist): below it, one `bpf()` call per entry costs little.
const BATCH_FROM: usize = 64;

/// How long one periodic check reads and compares the large maps before it leaves the rest of
/// its round to the next (it runs on the sync loop: a change that comes meanwhile waits). At
/// 100 000 × 10 a round then takes a few dozen checks.
const CHECK_BUDGET: Duration = Duration::from_millis(40);

/// Tracker, model and writer together.
pub struct Syncer<S: MapStore> {
    tracker: Tracker,
    writer: Writer<S>,
    config: SyncConfig,
    metrics: Metrics,
    node_info: NodeInfo,
    /// Whether the first full sync (and the sweep of an earlier agent's entries) is done.
    swept: bool,
    /// Publishes this node's info.
    node_tx: tokio::sync::watch::Sender<NodeInfo>,
    /// Runs when this node's info changes, before the sync that follows (the TC attachment:
    /// a frontend must not be programmed before its node's interfaces carry the program).
    node_hook: Option<NodeHook>,
    /// Runs once, after the first full sync (an upgrade's swap to the new maps).
    first_sync_hook: Option<Box<dyn FnOnce() + Send>>,
    /// Runs when a service is refused.
    refusal_hook: Option<RefusalHook>,
    /// Each service's `healthCheckNodePort`, by service key.
    health_checks: HashMap<String, (u16, HealthCheck)>,
    /// Publishes the health checks to serve, by port.
    health_tx: tokio::sync::watch::Sender<BTreeMap<u16, HealthCheck>>,
    /// Who holds each frontend, and who waits for it.
    claims: Claims,
    /// Services refused because a map write failed (a full map): retried on every sync, after
    /// that sync's other changes, which may have freed room.
    refusals: Refusals,
}

impl<S: MapStore> Syncer<S> {
    /// A syncer writing through `writer`.
    pub fn new(writer: Writer<S>, config: SyncConfig, metrics: Metrics) -> Self {
        let node_info = NodeInfo::from_node(&config.node_name, None, &config.nodeport_cidrs)
            .with_lb_algorithm(config.lb_algorithm)
            .with_lb_mode(config.lb_mode);
        let mut syncer = Self {
            tracker: Tracker::default(),
            writer,
            config,
            metrics,
            node_info,
            swept: false,
            node_tx: tokio::sync::watch::Sender::new(NodeInfo::default()),
            node_hook: None,
            first_sync_hook: None,
            refusal_hook: None,
            health_checks: HashMap::new(),
            health_tx: tokio::sync::watch::Sender::new(BTreeMap::new()),
            claims: Claims::default(),
            refusals: Refusals::default(),
        };
        syncer.write_node_config();
        syncer
    }

    /// Writes the node's settings for the datapath: the SNAT address for traffic to externalIPs
    /// and LoadBalancer IPs (the first nodePort address) and the node's netns cookie.
    fn write_node_config(&mut self) {
        let first = |v4: bool| {
            let addresses = self.node_info.nodeport_addresses.iter();
            addresses.filter(|a| a.is_ipv4() == v4).map(|&a| addr::from_ip(a)).next().unwrap_or(addr::UNSPECIFIED)
        };
        let config = NodeConfig {
            snat_v4: first(true),
            snat_v6: first(false),
            host_netns_cookie: self.config.host_netns_cookie,
        };
        if let Err(error) = self.writer.set_node_config(config) {
            warn!(%error, "writing the node's settings to the config map failed");
        }
    }

    /// The writer (for its store in tests and tools).
    pub fn writer(&self) -> &Writer<S> {
        &self.writer
    }

    /// Whether every kind has been listed once, so a sync may delete what is gone.
    pub fn ready(&self) -> bool {
        self.tracker.ready()
    }

    /// Whether a sync has work to do (the first one always has: it sweeps an earlier agent's
    /// leftovers even when the cluster is empty).
    pub fn pending(&self) -> bool {
        self.tracker.pending() || !self.swept
    }

    /// Sets what runs when this node's info changes, before the sync that follows.
    pub fn on_node_change(&mut self, hook: NodeHook) {
        self.node_hook = Some(hook);
    }

    /// Sets what runs when a service is refused (a map write failed).
    pub fn on_refused(&mut self, hook: RefusalHook) {
        self.refusal_hook = Some(hook);
    }

    /// Sets what runs once the first full sync is done.
    pub fn on_first_sync(&mut self, hook: Box<dyn FnOnce() + Send>) {
        self.first_sync_hook = Some(hook);
    }

    /// This node's info as it changes (addresses, pod ranges).
    pub fn node_updates(&self) -> tokio::sync::watch::Receiver<NodeInfo> {
        self.node_tx.subscribe()
    }

    /// Takes one update from a source, marking what it affects.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Services(change) => self.tracker.services_changed(change),
            Update::Slices(change) => {
                for slice in self.tracker.slices_changed(change) {
                    self.report(&model::missing_label(&slice.object), slice.origin.as_deref());
                }
            }
            Update::Nodes(change) => self.apply_nodes(change),
        }
    }

    fn apply_nodes(&mut self, change: Change<Node>) {
        let name = self.config.node_name.clone();
        let mine = |n: &Sourced<Node>| n.object.metadata.name.as_deref() == Some(name.as_str());
        let mut dsr_nodes = self.node_info.dsr_nodes.clone();
        let node = match change {
            Change::Replace(list) => {
                self.tracker.listed(Kind::Nodes);
                dsr_nodes = list
                    .iter()
                    .filter(|n| dsr::takes_dsr(&n.object))
                    .filter_map(|n| n.object.metadata.name.clone())
                    .collect();
                list.into_iter().find(mine).map(|n| n.object)
            }
            Change::Apply(node) => {
                let node_name = node.object.metadata.name.clone().unwrap_or_default();
                if dsr::takes_dsr(&node.object) {
                    dsr_nodes.insert(node_name);
                } else {
                    dsr_nodes.remove(&node_name);
                }
                if !mine(&node) {
                    return self.set_dsr_nodes(dsr_nodes);
                }
                Some(node.object)
            }
            Change::Delete(key) => {
                let node_name = key.trim_start_matches('/');
                dsr_nodes.remove(node_name);
                if node_name != name {
                    return self.set_dsr_nodes(dsr_nodes);
                }
                None
            }
        };
        let info = NodeInfo::from_node(&name, node.as_deref(), &self.config.nodeport_cidrs)
            .with_lb_algorithm(self.config.lb_algorithm)
            .with_lb_mode(self.config.lb_mode)
            .with_dsr_nodes(self.node_info.dsr_nodes.clone());
        if info != self.node_info {
            info!(node = name, addresses = ?info.nodeport_addresses, zone = %info.zone, "node addresses for nodePorts");
            if let Some(hook) = &mut self.node_hook {
                hook(&info);
            }
            self.node_tx.send_replace(info.clone());
            self.node_info = info;
            self.write_node_config();
            self.tracker.mark_all();
        }
        self.set_dsr_nodes(dsr_nodes);
    }

    /// Takes the Nodes that take direct server return: a change re-flags their backends (every
    /// service is recomputed, as for a change of this node).
    fn set_dsr_nodes(&mut self, dsr_nodes: BTreeSet<String>) {
        if dsr_nodes != self.node_info.dsr_nodes {
            info!(nodes = ?dsr_nodes, "nodes that take direct server return");
            self.node_info.dsr_nodes = dsr_nodes;
            self.tracker.mark_all();
        }
    }

    fn report(&self, skip: &Skip, origin: Option<&str>) {
        match skip.reason {
            // Not malformed: the address belongs to a family the service is not served in.
            SkipReason::OtherFamily => info!(origin, "ignoring {skip}"),
            _ => warn!(origin, "skipping {skip}"),
        }
        self.metrics.skipped(skip.reason);
    }

    /// Recomputes every changed service and writes the differences. Before every kind has been
    /// listed once, nothing is done (a half-listed cluster must not look like deleted services).
    pub fn sync(&mut self) -> SyncReport {
        let mut report = SyncReport::default();
        if !self.ready() {
            return report;
        }
        let started = Instant::now();
        let mut keys = self.tracker.take_dirty(self.claims.services());
        let mut health_changed = false;
        // Refused services go last: the changes before them may free the room they need.
        let mut retry = self.refusals.services();
        if keys.len() >= BATCH_FROM {
            self.writer.begin_batch();
        }
        loop {
            // Releasing a frontend can let a contender in: keep going until nothing is left.
            while let Some(key) = keys.pop_first() {
                retry.remove(&key);
                report.services += 1;
                let desired = self.compute(&key);
                health_changed |= self.set_health_check(&key, desired.health_check.clone());
                report.skipped += desired.skipped.len();
                let origin = self.tracker.service(&key).and_then(|s| s.origin.clone());
                for skip in &desired.skipped {
                    self.report(skip, origin.as_deref());
                }
                self.program(&key, desired.frontends, &mut report, &mut keys);
            }
            for (frontend, error) in self.writer.end_batch() {
                self.refuse_batched(&frontend, &error, &mut report, &mut keys);
            }
            for key in self.refusals.end_deferred() {
                self.no_longer_refused(&key);
            }
            if !keys.is_empty() {
                // Refusals let contenders in.
                continue;
            }
            if retry.is_empty() {
                break;
            }
            keys = std::mem::take(&mut retry);
        }
        if health_changed {
            self.publish_health_checks();
        }
        let departed = self.writer.forget_departed();
        self.forget(departed, &mut report);
        if !self.swept {
            self.swept = true;
            match self.writer.sweep() {
                Ok(stats) => report.writes += stats,
                Err(error) => {
                    warn!(%error, "removing entries of an earlier agent failed");
                    report.errors += 1;
                }
            }
            if let Some(hook) = self.first_sync_hook.take() {
                hook();
            }
        }
        report.frontends = self.writer.frontends();
        report.frontends_by_family = self.claims.held_by_family();
        report.backends = self.writer.backends();
        self.metrics.synced(started.elapsed().as_secs_f64(), &report);
        report
    }

    /// The periodic full check (`--sync-period`, as kube-proxy's full resync): retries refused
    /// services, puts back map entries deleted or changed under the agent, rewrites the node's
    /// settings, and removes affinity, socket and UDP flow entries whose backend is no longer
    /// behind their service (whatever events were missed). Nothing before the first full sync.
    pub fn resync(&mut self) -> SyncReport {
        if !self.swept {
            return SyncReport::default();
        }
        let mut report = if self.refusals.is_empty() { SyncReport::default() } else { self.sync() };
        let started = Instant::now();
        self.write_node_config();
        // A range of the large maps at a time: their missing entries show once a round read
        // them all (see the writer's `check`).
        match self.writer.check(CHECK_BUDGET) {
            Ok(stats) => {
                if stats != WriteStats::default() {
                    warn!(
                        service_writes = stats.service_writes,
                        backend_writes = stats.backend_writes,
                        "restored map entries that were deleted or changed outside the agent"
                    );
                }
                report.writes += stats;
            }
            Err(error) => {
                warn!(error = error_chain(&error), "restoring the service maps failed");
                report.errors += 1;
            }
        }
        let stale = self.writer.forget_stale();
        self.forget(stale, &mut report);
        report.frontends = self.writer.frontends();
        report.frontends_by_family = self.claims.held_by_family();
        report.backends = self.writer.backends();
        self.metrics.synced(started.elapsed().as_secs_f64(), &report);
        report
    }

    /// Logs what [`Writer::forget_departed`] or [`Writer::forget_stale`] removed, and destroys
    /// the UDP sockets still sent to departed backends (on a thread of its own).
    fn forget(&self, departed: Result<Departed, S::Error>, report: &mut SyncReport) {
        match departed {
            Ok(departed) => {
                if departed.entries > 0 {
                    debug!(
                        entries = departed.entries,
                        "removed affinity, socket and flow entries of departed backends"
                    );
                }
                // Walking every namespace takes long: a thread of its own does it.
                crate::datapath::sockets::destroy_udp_later(departed.sockets);
            }
            Err(error) => {
                warn!(error = error_chain(&error), "removing affinity entries of departed backends failed");
                report.errors += 1;
            }
        }
    }

    /// Records a service's health check; whether anything changed.
    fn set_health_check(&mut self, key: &str, check: Option<(u16, HealthCheck)>) -> bool {
        let changed = self.health_checks.get(key) != check.as_ref();
        match check {
            Some(check) => self.health_checks.insert(key.to_owned(), check),
            None => self.health_checks.remove(key),
        };
        changed
    }

    /// Publishes every `healthCheckNodePort` to serve (a port claimed twice goes to the first
    /// service by namespace/name).
    fn publish_health_checks(&self) {
        let mut by_port = BTreeMap::new();
        let mut services: Vec<_> = self.health_checks.iter().collect();
        services.sort_by_key(|(key, _)| *key);
        for (key, (port, check)) in services {
            if by_port.contains_key(port) {
                warn!(service = key, port, "healthCheckNodePort is already served for another service");
                continue;
            }
            by_port.insert(*port, check.clone());
        }
        self.health_tx.send_replace(by_port);
    }

    /// The `healthCheckNodePort`s to serve, as they change.
    pub fn health_checks(&self) -> tokio::sync::watch::Receiver<BTreeMap<u16, HealthCheck>> {
        self.health_tx.subscribe()
    }

    fn compute(&self, key: &str) -> model::Desired {
        let slices = self.tracker.slices_of(key);
        match self.tracker.service(key) {
            Some(service) => model::service_frontends(&service.object, &slices, &self.node_info),
            None => model::Desired { skipped: slices.into_iter().map(model::orphan).collect(), ..Default::default() },
        }
    }

    /// Programs service `key`'s frontends: releases those it no longer has, writes the others
    /// unless another service holds them, and refuses the service as a whole if a write fails.
    fn program(
        &mut self,
        key: &str,
        desired: BTreeMap<Frontend, FrontendEntry>,
        report: &mut SyncReport,
        requeue: &mut BTreeSet<String>,
    ) {
        let old = self.claims.take_owned(key);
        // The room the service needs, for the refusal's hint.
        let needs: usize = desired
            .values()
            .map(|e| crate::datapath::writer::service_entries(e.backends.len(), e.internal.as_ref().map(Vec::len)))
            .sum();
        for frontend in old.iter().filter(|f| !desired.contains_key(f)) {
            self.release_frontend(key, frontend, report, requeue);
        }
        let mut owned = BTreeSet::new();
        for (frontend, entry) in desired {
            if let Some(holder) = self.claims.held_by_other(&frontend, key) {
                let skip = Skip {
                    object: format!("Service {key}"),
                    field: "frontend".into(),
                    reason: SkipReason::FrontendConflict,
                    detail: format!("{frontend} is already served for service {holder}"),
                };
                self.report(&skip, None);
                self.claims.contend(frontend, key);
                continue;
            }
            if entry.backends.len() > usize::from(u16::MAX)
                || entry.internal.as_ref().is_some_and(|i| i.len() > usize::from(u16::MAX))
            {
                let skip = Skip {
                    object: format!("Service {key}"),
                    field: "endpoints".into(),
                    reason: SkipReason::MapFull,
                    detail: format!(
                        "{frontend} has {} endpoints; at most {} fit a service",
                        entry.backends.len(),
                        u16::MAX
                    ),
                };
                self.report(&skip, None);
                continue;
            }
            match self.writer.upsert(frontend, &entry) {
                Ok(stats) => report.writes += stats,
                Err(e) => {
                    self.refuse(key, old.union(&owned), report, requeue);
                    self.refused(key, &frontend, &e, needs, report);
                    return;
                }
            }
            self.claims.claim(frontend, key);
            owned.insert(frontend);
        }
        self.claims.set_owned(key, owned);
        if self.writer.batching() {
            // Staged, not written: the batch says whether it fits.
            self.refusals.defer_end(key);
        } else if self.refusals.end(key) {
            self.no_longer_refused(key);
        }
    }

    /// Logs the end of service `key`'s refusal.
    fn no_longer_refused(&self, key: &str) {
        match self.tracker.service(key) {
            Some(_) => info!(service = key, "service no longer refused: programmed"),
            None => info!(service = key, "service no longer refused: deleted"),
        }
    }

    /// Logs, counts and reports the refusal of service `key`, whose write of `frontend` failed
    /// with `e`; `needs` is how many `services` entries it takes.
    fn refused(&mut self, key: &str, frontend: &Frontend, e: &S::Error, needs: usize, report: &mut SyncReport) {
        let mut error = count_failure(e, report);
        if full_map(e) == Some(proxy_common::maps::SERVICES) {
            let held = self.writer.service_entries_held();
            error.push_str(&format!(
                "; --services-map-size {} would hold it ({held} entries in use, {needs} for {key})",
                held + needs
            ));
        }
        if self.refusals.start(key) {
            warn!(
                service = key,
                %frontend,
                error,
                "service refused as a whole (a map write failed); retried on every sync, logged again when it \
                 is programmed or deleted"
            );
        } else {
            debug!(service = key, %frontend, error, "service still refused");
        }
        if let Some(hook) = &mut self.refusal_hook {
            hook(key, &format!("not programmed: writing {frontend} failed: {error}; retried on every sync"));
        }
    }

    /// Refuses the service holding `frontend`, which a batch could not write (the writer has
    /// removed it already): its other frontends go too, as after a failed upsert.
    fn refuse_batched(
        &mut self,
        frontend: &Frontend,
        error: &S::Error,
        report: &mut SyncReport,
        requeue: &mut BTreeSet<String>,
    ) {
        let Some(key) = self.claims.holder(frontend).map(str::to_owned) else { return };
        let held = self.claims.take_owned(&key);
        self.refuse(&key, held.iter(), report, requeue);
        let needs = self
            .compute(&key)
            .frontends
            .values()
            .map(|e| crate::datapath::writer::service_entries(e.backends.len(), e.internal.as_ref().map(Vec::len)))
            .sum();
        self.refused(&key, frontend, error, needs, report);
    }

    /// Refuses a service as a whole after a failed write: removes every frontend it still holds
    /// (the writer has already removed the one that failed), so it is absent rather than half
    /// there.
    fn refuse<'a>(
        &mut self,
        key: &str,
        held: impl Iterator<Item = &'a Frontend>,
        report: &mut SyncReport,
        requeue: &mut BTreeSet<String>,
    ) {
        for frontend in held {
            if self.claims.holds(key, frontend) {
                self.release_frontend(key, frontend, report, requeue);
            }
        }
    }

    /// Removes `frontend` of service `key` from the maps and lets services that wanted it in.
    fn release_frontend(
        &mut self,
        key: &str,
        frontend: &Frontend,
        report: &mut SyncReport,
        requeue: &mut BTreeSet<String>,
    ) {
        match self.writer.remove(*frontend) {
            Ok(stats) => report.writes += stats,
            Err(e) => {
                let error = count_failure(&e, report);
                warn!(service = key, %frontend, error, "removing a frontend from the service maps failed");
            }
        }
        requeue.extend(self.claims.release(frontend));
    }
}

/// Counts a failed write (a full map is a refusal, anything else an error); returns the error
/// with its causes.
fn count_failure(error: &(dyn std::error::Error + 'static), report: &mut SyncReport) -> String {
    match is_full(error) {
        true => report.refused += 1,
        false => report.errors += 1,
    }
    error_chain(error)
}

/// An error with its sources (a map write's errno is in a source), and what to do when it says
/// the map is full (`E2BIG` from a full BPF hash map): the flag that sizes that map.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = crate::error_chain(error);
    if is_full(error) {
        let flag = full_map(error).and_then(proxy_common::maps::size_flag);
        match (full_map(error), flag) {
            (Some(map), Some(flag)) => text.push_str(&format!(
                " (the map is full: raise {flag}, which sizes the {map} map; proxy_map_entries{{map=\"{map}\"}} \
                 and proxy_map_max_entries show its use)"
            )),
            _ => text.push_str(" (the map is full: raise --services-map-size or --backends-map-size)"),
        }
    }
    text
}

/// The map a failed write was to, when the write failed because that map is full ([`is_full`])
/// and the error names it ([`crate::datapath::WriteError`]). Any other failure (`ENOMEM` when
/// the kernel cannot allocate an element, say) names no map: raising a size would not help.
fn full_map(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    if !is_full(error) {
        return None;
    }
    let mut next = Some(error);
    while let Some(cause) = next {
        if let Some(write) = cause.downcast_ref::<crate::datapath::WriteError>() {
            return Some(write.map);
        }
        next = cause.source();
    }
    None
}

/// Whether a map write failed because the map is full (`E2BIG` from a BPF hash map, `ENOSPC`
/// from the LPM trie of source ranges).
fn is_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = error.source();
    while let Some(cause) = source {
        let errno = cause.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error);
        if matches!(errno, Some(libc::E2BIG | libc::ENOSPC)) {
            return true;
        }
        source = cause.source();
    }
    false
}
