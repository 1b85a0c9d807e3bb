//! The datapath's own thread. Checking and restoring links, rescanning interfaces and finishing
//! a layout upgrade make blocking system calls, and the upgrade waits up to seconds for the
//! kernel to release the old links: none of it may run on the async runtime or hold up the sync
//! loop. The [`Attacher`] runs them on a thread of its own; the sync loop only hands it jobs,
//! and attaches a changed node's interfaces itself only when the datapath is free (a few system
//! calls, so that the TC program is in place before the node's frontends are programmed).

use std::{
    io,
    sync::{
        Arc, Mutex, MutexGuard, TryLockError,
        mpsc::{self, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use tokio::sync::{oneshot, watch};
use tracing::{error, warn};

use super::{Datapath, DatapathError, Upgrade};
use crate::model::{Cidr, NodeInfo};

/// What the attacher's thread does to the datapath (implemented by [`Datapath`]; tests use a
/// fake).
pub trait Attach: Send + 'static {
    /// See [`Datapath::attach_interfaces`].
    fn attach_interfaces(
        &mut self,
        node_addresses: &[std::net::IpAddr],
        pod_cidrs: &[Cidr],
    ) -> Result<Vec<String>, DatapathError>;
    /// See [`Datapath::restore_links`].
    fn restore_links(&mut self) -> Result<Vec<String>, DatapathError>;
    /// See [`Datapath::finish_upgrade`].
    fn finish_upgrade(&mut self) -> Result<Option<Upgrade>, DatapathError>;
}

impl Attach for Datapath {
    fn attach_interfaces(
        &mut self,
        node_addresses: &[std::net::IpAddr],
        pod_cidrs: &[Cidr],
    ) -> Result<Vec<String>, DatapathError> {
        Datapath::attach_interfaces(self, node_addresses, pod_cidrs)
    }

    fn restore_links(&mut self) -> Result<Vec<String>, DatapathError> {
        Datapath::restore_links(self)
    }

    fn finish_upgrade(&mut self) -> Result<Option<Upgrade>, DatapathError> {
        Datapath::finish_upgrade(self)
    }
}

enum Job {
    /// The node changed: attach to its interfaces now.
    Rescan(NodeInfo),
    /// The first full sync is done: swap to the new maps' programs.
    FinishUpgrade,
}

/// How often the attacher's thread does what.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Attaching to interfaces that appeared since (pods' interfaces), and retrying failures.
    pub rescan: Duration,
    /// Checking the links against the kernel and attaching lost ones again (`--sync-period`).
    pub check_links: Duration,
}

/// The datapath, shared by the attacher's thread and [`Attacher::rescan`].
type Shared = Arc<Mutex<dyn Attach>>;

/// A handle on the datapath's thread; the thread ends when the handle is dropped.
pub struct Attacher {
    tx: mpsc::Sender<Job>,
    datapath: Shared,
    cluster_cidrs: Vec<Cidr>,
    /// Resolves when the thread ends (a panic included); taken by [`Attacher::ended`].
    ended: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Attacher {
    /// Moves `datapath` behind a lock and starts a thread of its own that attaches the TC
    /// programs to the interfaces of the node (its addresses, its pod ranges plus
    /// `cluster_cidrs`), as [`Attacher::rescan`] or else `node` last described it, every
    /// `schedule.rescan`; checks the links every `schedule.check_links`; and finishes an
    /// upgrade when asked. The lock is never held across the upgrade's wait for the kernel.
    pub fn spawn(
        datapath: impl Attach,
        mut node: watch::Receiver<NodeInfo>,
        cluster_cidrs: Vec<Cidr>,
        schedule: Schedule,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (alive, ended) = oneshot::channel::<()>();
        let shared: Shared = Arc::new(Mutex::new(datapath));
        let datapath = shared.clone();
        let thread_cidrs = cluster_cidrs.clone();
        std::thread::Builder::new().name("datapath".into()).spawn(move || {
            // Dropped when the thread ends, by a return or a panic's unwinding.
            let _alive = alive;
            let mut next_check = Instant::now() + schedule.check_links;
            let mut info = node.borrow_and_update().clone();
            loop {
                match rx.recv_timeout(schedule.rescan) {
                    Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) => {}
                    // The hook runs before the node's watch is updated: its news are the newest.
                    Ok(Job::Rescan(news)) => info = news,
                    Ok(Job::FinishUpgrade) => finish_upgrade(&datapath),
                }
                if node.has_changed().unwrap_or(false) {
                    info = node.borrow_and_update().clone();
                }
                let mut datapath = lock(&datapath);
                if Instant::now() >= next_check {
                    next_check = Instant::now() + schedule.check_links;
                    match datapath.restore_links() {
                        Ok(lost) if lost.is_empty() => {}
                        Ok(lost) => warn!(?lost, "links removed or detached outside the agent; attaching again"),
                        Err(error) => warn!(%error, "checking the program links failed"),
                    }
                }
                attach(&mut *datapath, &info, &thread_cidrs);
            }
        })?;
        Ok(Self { tx, datapath: shared, cluster_cidrs, ended: Mutex::new(Some(ended)) })
    }

    /// Resolves when the datapath's thread ends, which it must not while the handle lives (a
    /// panic there would leave new interfaces without the TC program): the agent supervises
    /// it as one of its tasks. Only the first call waits; later ones resolve at once.
    pub fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner()).take();
        async move {
            if let Some(ended) = ended {
                let _ = ended.await;
            }
        }
    }

    /// The node changed to `info`: its interfaces are attached now, before the sync that
    /// programs its frontends (a few system calls), unless the datapath is busy (an upgrade
    /// swapping programs), in which case its thread does it next; never waits.
    pub fn rescan(&self, info: &NodeInfo) {
        match self.datapath.try_lock() {
            Ok(mut datapath) => attach(&mut *datapath, info, &self.cluster_cidrs),
            Err(TryLockError::Poisoned(poisoned)) => attach(&mut *poisoned.into_inner(), info, &self.cluster_cidrs),
            Err(TryLockError::WouldBlock) => {
                let _ = self.tx.send(Job::Rescan(info.clone()));
            }
        }
    }

    /// Asks for a layout upgrade to be finished (after the first full sync); returns at once.
    pub fn finish_upgrade(&self) {
        let _ = self.tx.send(Job::FinishUpgrade);
    }
}

fn lock(datapath: &Shared) -> MutexGuard<'_, dyn Attach> {
    datapath.lock().unwrap_or_else(|e| e.into_inner())
}

/// Attaches the TC programs to the interfaces of the node `info` describes.
fn attach(datapath: &mut dyn Attach, info: &NodeInfo, cluster_cidrs: &[Cidr]) {
    let pod_cidrs: Vec<Cidr> = info.pod_cidrs.iter().chain(cluster_cidrs).copied().collect();
    if let Err(error) = datapath.attach_interfaces(&info.nodeport_addresses, &pod_cidrs) {
        warn!(%error, "attaching the TC program to the node's interfaces failed");
    }
}

/// Swaps to the new programs and maps; on failure the old programs keep serving. The lock is
/// held while the new programs are attached, not while the kernel releases the old links.
fn finish_upgrade(datapath: &Shared) {
    let started = lock(datapath).finish_upgrade();
    if let Err(error) = started.and_then(|upgrade| upgrade.map_or(Ok(()), Upgrade::complete)) {
        error!(%error, "swapping to the new map layout failed; the old programs keep serving");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datapath whose upgrade blocks until the test releases it, recording what it was asked.
    struct Slow {
        calls: Arc<Mutex<Vec<&'static str>>>,
        release: mpsc::Receiver<()>,
    }

    impl Attach for Slow {
        fn attach_interfaces(&mut self, _: &[std::net::IpAddr], _: &[Cidr]) -> Result<Vec<String>, DatapathError> {
            self.calls.lock().unwrap().push("attach");
            Ok(Vec::new())
        }

        fn restore_links(&mut self) -> Result<Vec<String>, DatapathError> {
            self.calls.lock().unwrap().push("restore");
            Ok(Vec::new())
        }

        fn finish_upgrade(&mut self) -> Result<Option<Upgrade>, DatapathError> {
            self.calls.lock().unwrap().push("upgrade");
            // As long as the kernel takes to release the old links.
            self.release.recv().unwrap();
            self.calls.lock().unwrap().push("upgraded");
            Ok(None)
        }
    }

    fn wait_for(calls: &Mutex<Vec<&'static str>>, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !calls.lock().unwrap().contains(&what) {
            assert!(Instant::now() < deadline, "{what} never happened: {:?}", calls.lock().unwrap());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The sync loop's first-sync hook and node hook return while the upgrade still holds the
    /// datapath: nothing the sync loop does waits on it.
    #[test]
    fn the_sync_loop_never_waits_for_an_upgrade_to_finish() {
        let (release, released) = mpsc::channel();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let slow = Slow { calls: calls.clone(), release: released };
        let (_node_tx, node) = watch::channel(NodeInfo::default());
        let schedule = Schedule { rescan: Duration::from_secs(3600), check_links: Duration::from_secs(3600) };
        let attacher = Attacher::spawn(slow, node, Vec::new(), schedule).unwrap();
        attacher.finish_upgrade();
        wait_for(&calls, "upgrade");
        // The upgrade is blocked in the kernel's wait now; these return all the same.
        attacher.rescan(&NodeInfo::default());
        attacher.finish_upgrade();
        assert!(!calls.lock().unwrap().contains(&"upgraded"));
        release.send(()).unwrap();
        wait_for(&calls, "attach");
        release.send(()).unwrap();
        drop(attacher);
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls[..3], ["upgrade", "upgraded", "attach"], "the node's interfaces follow the swap");
    }

    /// Records the node addresses it is asked to attach for.
    struct Recorder(Arc<Mutex<Vec<Vec<std::net::IpAddr>>>>);

    impl Attach for Recorder {
        fn attach_interfaces(
            &mut self,
            addresses: &[std::net::IpAddr],
            _: &[Cidr],
        ) -> Result<Vec<String>, DatapathError> {
            self.0.lock().unwrap().push(addresses.to_vec());
            Ok(Vec::new())
        }

        fn restore_links(&mut self) -> Result<Vec<String>, DatapathError> {
            Ok(Vec::new())
        }

        fn finish_upgrade(&mut self) -> Result<Option<Upgrade>, DatapathError> {
            Ok(None)
        }
    }

    /// The sync loop calls the node hook before it publishes the node on its watch: the rescan
    /// uses the node the hook was given, not the watch's older one.
    #[test]
    fn a_rescan_attaches_for_the_node_the_hook_was_given() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (_node_tx, node) = watch::channel(NodeInfo::default());
        let schedule = Schedule { rescan: Duration::from_secs(3600), check_links: Duration::from_secs(3600) };
        let attacher = Attacher::spawn(Recorder(seen.clone()), node, Vec::new(), schedule).unwrap();
        let address = std::net::IpAddr::from([172, 18, 0, 2]);
        attacher.rescan(&NodeInfo { nodeport_addresses: vec![address], ..NodeInfo::default() });
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "no attach after a rescan");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(seen.lock().unwrap()[0], [address]);
    }

    /// Panics on the thread's first periodic check of the links.
    struct Crashing;

    impl Attach for Crashing {
        fn attach_interfaces(&mut self, _: &[std::net::IpAddr], _: &[Cidr]) -> Result<Vec<String>, DatapathError> {
            Ok(Vec::new())
        }

        fn restore_links(&mut self) -> Result<Vec<String>, DatapathError> {
            panic!("a bug in the link check");
        }

        fn finish_upgrade(&mut self) -> Result<Option<Upgrade>, DatapathError> {
            Ok(None)
        }
    }

    /// A panic on the datapath's thread is not silent: `ended` resolves, so the agent's task
    /// set stops the agent (a thread that died would leave new interfaces without the TC
    /// program for good), while the thread of a live handle never ends.
    #[tokio::test]
    async fn the_thread_ending_by_a_panic_is_seen_and_a_live_one_is_not() {
        let schedule = Schedule { rescan: Duration::from_millis(10), check_links: Duration::from_millis(10) };
        let (_node_tx, node) = watch::channel(NodeInfo::default());
        let crashing = Attacher::spawn(Crashing, node.clone(), Vec::new(), schedule).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), crashing.ended()).await;
        assert!(ended.is_ok(), "the panicked thread's end was seen");

        let seen = Arc::new(Mutex::new(Vec::new()));
        let live = Attacher::spawn(Recorder(seen.clone()), node, Vec::new(), schedule).unwrap();
        let ended = tokio::time::timeout(Duration::from_millis(300), live.ended()).await;
        assert!(ended.is_err(), "a live thread does not end");
        assert!(!seen.lock().unwrap().is_empty(), "and keeps rescanning");
    }
}
