//! `/healthz` with kube-proxy's meaning: healthy while syncs succeed in time and the programs
//! are really attached, checked against the kernel on every request.
//!
//! Unhealthy (503) when any of these holds:
//! - no sync has succeeded yet (the first one needs every kind listed);
//! - an update has waited longer than the timeout for the sync loop to take it (kube-proxy's
//!   "oldest pending update");
//! - syncs have failed (map writes) for longer than the timeout (a service refused because a
//!   map is full is not a failing sync: one oversized service must not drain every node);
//! - the API server has not answered a watch for longer than the timeout (the datapath keeps
//!   its last state meanwhile, but it may be stale: the node should not take new traffic);
//! - a cgroup link pinned when the agent started is gone, or any pinned link is not attached
//!   where it belongs (see [`crate::datapath::pinned_links`]);
//! - an interface that should carry the TC program does not, because attaching failed (the
//!   datapath tries again on every interface rescan).

use std::{
    collections::{BTreeSet, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::mpsc;

use crate::{
    datapath::{self, PinnedLink, Unattached},
    metrics::Metrics,
    source::Update,
    sys::bpf::Attachment,
};

/// How long a pending update, a run of failing syncs or an API outage is tolerated by default:
/// kube-proxy's (twice its 30 s `--sync-period`; the agent uses twice its own).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// The health state shared by the sync path and the `/healthz` server; cheap to clone.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    metrics: Metrics,
    started: SystemTime,
    links_dir: PathBuf,
    cgroup: PathBuf,
    /// Cgroup links pinned when the agent started: they must stay.
    required: BTreeSet<String>,
    timeout: Duration,
    /// Interfaces that should carry a TC program and do not.
    unattached: Unattached,
    queue: Mutex<Queue>,
}

/// Updates handed to the sync loop and not yet taken by it.
#[derive(Default)]
struct Queue {
    /// Updates the relay finished handing over.
    delivered: u64,
    /// (sequence number, when it arrived) of every update not known to be taken.
    waiting: VecDeque<(u64, Instant)>,
    next: u64,
    channel: Option<mpsc::WeakSender<Update>>,
}

impl Queue {
    /// Forgets the updates the sync loop has taken: those delivered and no longer in the channel.
    fn prune(&mut self) {
        let in_channel = match self.channel.as_ref().and_then(mpsc::WeakSender::upgrade) {
            Some(tx) => tx.max_capacity() - tx.capacity(),
            None => 0,
        } as u64;
        let taken = self.delivered.saturating_sub(in_channel);
        while self.waiting.front().is_some_and(|(seq, _)| *seq <= taken) {
            self.waiting.pop_front();
        }
    }
}

/// One health check's answer.
#[derive(Clone, Debug)]
pub struct Report {
    /// Whether `/healthz` answers 200.
    pub healthy: bool,
    /// The last successful sync (the agent's start before the first one), as kube-proxy reports.
    pub last_updated: SystemTime,
    /// When the check ran.
    pub current_time: SystemTime,
    /// Why it is unhealthy (empty when healthy).
    pub problems: Vec<String>,
    /// Every pinned link, as the kernel has it.
    pub links: Vec<PinnedLink>,
}

impl Report {
    /// The `/healthz` body: `{"lastUpdated": ..., "currentTime": ..., "problems": [...]}` with
    /// RFC 3339 times.
    pub fn json(&self) -> String {
        let time = |t: SystemTime| k8s_openapi::jiff::Timestamp::try_from(t).map(|t| t.to_string()).unwrap_or_default();
        serde_json::json!({
            "lastUpdated": time(self.last_updated),
            "currentTime": time(self.current_time),
            "problems": self.problems,
        })
        .to_string()
    }
}

impl Health {
    /// Health for the links pinned under `bpf_root/links` that attach to `cgroup`; the cgroup
    /// links pinned now are the ones that must stay. Problems are tolerated for `timeout`;
    /// an interface in `unattached` is one at once.
    pub fn new(
        metrics: Metrics,
        bpf_root: PathBuf,
        cgroup: PathBuf,
        timeout: Duration,
        unattached: Unattached,
    ) -> Self {
        let links_dir = bpf_root.join("links");
        let required = datapath::pinned_links(&links_dir, &cgroup)
            .unwrap_or_default()
            .into_iter()
            .filter(|l| matches!(l.info.map(|i| i.attachment), Some(Attachment::Cgroup { .. })))
            .map(|l| l.pin)
            .collect();
        Self::with_timeout(metrics, links_dir, cgroup, required, timeout, unattached)
    }

    fn with_timeout(
        metrics: Metrics,
        links_dir: PathBuf,
        cgroup: PathBuf,
        required: BTreeSet<String>,
        timeout: Duration,
        unattached: Unattached,
    ) -> Self {
        let inner = Inner {
            metrics,
            started: SystemTime::now(),
            links_dir,
            cgroup,
            required,
            timeout,
            unattached,
            queue: Mutex::new(Queue::default()),
        };
        Self { inner: Arc::new(inner) }
    }

    /// The cgroup links that must stay attached.
    pub fn required_links(&self) -> impl Iterator<Item = &str> {
        self.inner.required.iter().map(String::as_str)
    }

    /// Passes the sources' updates on to the sync loop through a channel of the same size,
    /// noting when each arrives and when the sync loop takes it.
    pub fn track(&self, mut updates: mpsc::Receiver<Update>) -> mpsc::Receiver<Update> {
        let (tx, rx) = mpsc::channel(updates.max_capacity());
        self.queue().channel = Some(tx.downgrade());
        let health = self.clone();
        tokio::spawn(async move {
            while let Some(update) = updates.recv().await {
                {
                    let mut queue = health.queue();
                    queue.next += 1;
                    let seq = queue.next;
                    queue.waiting.push_back((seq, Instant::now()));
                }
                if tx.send(update).await.is_err() {
                    return;
                }
                let mut queue = health.queue();
                queue.delivered += 1;
                queue.prune();
            }
        });
        rx
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks everything now (the links against the kernel).
    pub fn check(&self) -> Report {
        let inner = &self.inner;
        let now = SystemTime::now();
        let secs = |since: SystemTime| now.duration_since(since).unwrap_or_default().as_secs_f64();
        let mut problems = Vec::new();
        let status = inner.metrics.sync_status();
        if status.last_success.is_none() {
            problems.push(format!("no successful sync yet ({:.0} s since start)", secs(inner.started)));
        }
        if let Some(since) = status.failing_since
            && secs(since) > inner.timeout.as_secs_f64()
        {
            problems.push(format!("syncs have failed for {:.0} s (map writes fail; see the log)", secs(since)));
        }
        let oldest = {
            let mut queue = self.queue();
            queue.prune();
            queue.waiting.front().map(|(_, at)| at.elapsed())
        };
        if let Some(waited) = oldest.filter(|w| *w > inner.timeout) {
            problems.push(format!("an update has waited {:.0} s for the sync loop", waited.as_secs_f64()));
        }
        for (kind, since) in inner.metrics.source_failing() {
            if secs(since) > inner.timeout.as_secs_f64() {
                problems.push(format!("the API server has not answered the {kind} watch for {:.0} s", secs(since)));
            }
        }
        let unattached = inner.unattached.list();
        for missing in &unattached {
            problems.push(format!(
                "interface {} should carry program {} and does not: {} (tried again every rescan)",
                missing.interface, missing.program, missing.error
            ));
        }
        inner.metrics.interfaces_unattached(unattached.len());
        let links = match datapath::pinned_links(&inner.links_dir, &inner.cgroup) {
            Ok(links) => links,
            Err(e) => {
                problems.push(format!("reading {}: {e}", inner.links_dir.display()));
                Vec::new()
            }
        };
        for pin in &inner.required {
            if !links.iter().any(|l| &l.pin == pin) {
                problems.push(format!(
                    "link {} is gone: its program is no longer attached",
                    inner.links_dir.join(pin).display()
                ));
            }
        }
        problems.extend(links.iter().filter_map(|l| l.problem.clone()));
        inner.metrics.program_links(links.iter().map(|l| (l.program.as_str(), l.attached)));
        Report {
            healthy: problems.is_empty(),
            last_updated: status.last_success.unwrap_or(inner.started),
            current_time: now,
            problems,
            links,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sync report with `errors` failed writes and `refused` services.
    fn sync_report(errors: u64, refused: u64) -> crate::sync::SyncReport {
        crate::sync::SyncReport {
            frontends: 1,
            frontends_by_family: [1, 0],
            backends: 2,
            errors,
            refused,
            ..Default::default()
        }
    }

    fn health(timeout: Duration) -> (Health, Metrics) {
        let metrics = Metrics::new();
        let dir = std::env::temp_dir().join(format!("proxy-health-unit-{}", std::process::id()));
        let health =
            Health::with_timeout(metrics.clone(), dir.clone(), dir, BTreeSet::new(), timeout, Unattached::default());
        (health, metrics)
    }

    #[test]
    fn unhealthy_until_the_first_successful_sync() {
        let (health, metrics) = health(HEALTH_TIMEOUT);
        let report = health.check();
        assert!(!report.healthy);
        assert!(report.problems[0].starts_with("no successful sync yet"), "{:?}", report.problems);
        metrics.synced(0.001, &sync_report(0, 0));
        assert!(health.check().healthy, "{:?}", health.check().problems);
    }

    #[test]
    fn failing_syncs_are_tolerated_for_the_timeout_only() {
        let (health, metrics) = health(Duration::from_millis(50));
        metrics.synced(0.001, &sync_report(0, 0));
        metrics.synced(0.001, &sync_report(3, 0));
        assert!(health.check().healthy, "a failing sync is not late yet");
        std::thread::sleep(Duration::from_millis(80));
        let report = health.check();
        assert!(!report.healthy);
        assert!(report.problems[0].starts_with("syncs have failed"), "{:?}", report.problems);
        metrics.synced(0.001, &sync_report(0, 0));
        assert!(health.check().healthy);
    }

    #[test]
    fn a_service_refused_for_lack_of_room_leaves_the_node_healthy() {
        let (health, metrics) = health(Duration::from_millis(50));
        metrics.synced(0.001, &sync_report(0, 1));
        std::thread::sleep(Duration::from_millis(80));
        metrics.synced(0.001, &sync_report(0, 1));
        assert!(health.check().healthy, "{:?}", health.check().problems);
        assert!(metrics.encode().contains("proxy_sync_errors_total 2"), "refusals are counted");
    }

    #[tokio::test]
    async fn an_update_the_sync_loop_does_not_take_in_time_is_unhealthy() {
        let (health, metrics) = health(Duration::from_millis(50));
        metrics.synced(0.001, &sync_report(0, 0));
        let (tx, rx) = mpsc::channel(8);
        let mut to_sync = health.track(rx);
        tx.send(Update::Nodes(crate::source::Change::Replace(Vec::new()))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        let report = health.check();
        assert!(report.problems.iter().any(|p| p.contains("waited")), "{:?}", report.problems);
        // The sync loop takes it: healthy again, and the update arrived unchanged.
        assert!(matches!(to_sync.recv().await, Some(Update::Nodes(_))));
        assert!(health.check().healthy, "{:?}", health.check().problems);
        // Updates the loop takes promptly never count as late.
        for _ in 0..20 {
            tx.send(Update::Nodes(crate::source::Change::Replace(Vec::new()))).await.unwrap();
            assert!(to_sync.recv().await.is_some());
        }
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(health.check().healthy, "{:?}", health.check().problems);
        // Closing the sources closes the sync loop's channel.
        drop(tx);
        assert!(to_sync.recv().await.is_none());
    }
}
