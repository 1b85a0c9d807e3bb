//! The datapath's own thread. Attaching to interfaces, checking and restoring links, and
//! finishing a layout upgrade all make blocking system calls, and the upgrade waits up to
//! seconds for the kernel to release the old links: none of it may run on the async runtime or
//! hold up the sync loop. The [`Attacher`] owns the [`Datapath`] on a thread of its own; the
//! sync loop and the node watch only hand it jobs, which never wait.

use std::{
    io,
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{error, warn};

use super::{Datapath, DatapathError, Upgrade};
use crate::model::{Cidr, NodeInfo};

/// What the attacher's thread does to the datapath (implemented by [`Datapath`]; tests use a
/// fake).
pub trait Attach: Send + 'static {
    /// See [`Datapath::attach_interfaces`].
    fn attach_interfaces(
        &mut self,
        node_addresses: &[std::net::Ipv4Addr],
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
        node_addresses: &[std::net::Ipv4Addr],
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
    /// Attach to the node's interfaces now (the node changed).
    Rescan,
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

/// A handle on the datapath's thread; the thread ends when the handle is dropped.
pub struct Attacher {
    tx: mpsc::Sender<Job>,
}

impl Attacher {
    /// Moves `datapath` onto a thread of its own that attaches the TC programs to the interfaces
    /// of the node `node` describes (its pod ranges plus `cluster_cidr`): at once, on
    /// [`Attacher::rescan`], and every `schedule.rescan`; and checks the links every
    /// `schedule.check_links`.
    pub fn spawn(
        mut datapath: impl Attach,
        node: watch::Receiver<NodeInfo>,
        cluster_cidr: Option<Cidr>,
        schedule: Schedule,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new().name("datapath".into()).spawn(move || {
            let mut next_check = Instant::now() + schedule.check_links;
            loop {
                match rx.recv_timeout(schedule.rescan) {
                    Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) | Ok(Job::Rescan) => {}
                    Ok(Job::FinishUpgrade) => finish_upgrade(&mut datapath),
                }
                if Instant::now() >= next_check {
                    next_check = Instant::now() + schedule.check_links;
                    match datapath.restore_links() {
                        Ok(lost) if lost.is_empty() => {}
                        Ok(lost) => warn!(?lost, "links removed or detached outside the agent; attaching again"),
                        Err(error) => warn!(%error, "checking the program links failed"),
                    }
                }
                let info = node.borrow().clone();
                let pod_cidrs: Vec<Cidr> = info.pod_cidrs.iter().copied().chain(cluster_cidr).collect();
                if let Err(error) = datapath.attach_interfaces(&info.nodeport_addresses, &pod_cidrs) {
                    warn!(%error, "attaching the TC program to the node's interfaces failed");
                }
            }
        })?;
        Ok(Self { tx })
    }

    /// Asks for the node's interfaces to be attached now; returns at once.
    pub fn rescan(&self) {
        let _ = self.tx.send(Job::Rescan);
    }

    /// Asks for a layout upgrade to be finished (after the first full sync); returns at once.
    pub fn finish_upgrade(&self) {
        let _ = self.tx.send(Job::FinishUpgrade);
    }
}

/// Swaps to the new programs and maps; on failure the old programs keep serving.
fn finish_upgrade(datapath: &mut impl Attach) {
    let result = datapath.finish_upgrade().and_then(|upgrade| upgrade.map_or(Ok(()), Upgrade::complete));
    if let Err(error) = result {
        error!(%error, "swapping to the new map layout failed; the old programs keep serving");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A datapath whose upgrade blocks until the test releases it, recording what it was asked.
    struct Slow {
        calls: Arc<Mutex<Vec<&'static str>>>,
        release: mpsc::Receiver<()>,
    }

    impl Attach for Slow {
        fn attach_interfaces(&mut self, _: &[std::net::Ipv4Addr], _: &[Cidr]) -> Result<Vec<String>, DatapathError> {
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

    /// The sync loop's first-sync hook and node hook hand jobs over and return while the
    /// upgrade still waits for the kernel: nothing the sync loop does waits on it.
    #[test]
    fn the_sync_loop_never_waits_for_an_upgrade_to_finish() {
        let (release, released) = mpsc::channel();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let slow = Slow { calls: calls.clone(), release: released };
        let (_node_tx, node) = watch::channel(NodeInfo::default());
        let schedule = Schedule { rescan: Duration::from_secs(3600), check_links: Duration::from_secs(3600) };
        let attacher = Attacher::spawn(slow, node, None, schedule).unwrap();
        attacher.finish_upgrade();
        wait_for(&calls, "upgrade");
        // The upgrade is blocked in the kernel's wait now; these return all the same.
        attacher.rescan();
        attacher.finish_upgrade();
        assert!(!calls.lock().unwrap().contains(&"upgraded"));
        release.send(()).unwrap();
        wait_for(&calls, "attach");
        release.send(()).unwrap();
        drop(attacher);
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls[..3], ["upgrade", "upgraded", "attach"], "the node's interfaces follow the swap");
    }
}
