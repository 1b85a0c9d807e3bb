//! Program links: attaching the programs and pinning their links (an earlier agent's link is
//! replaced only once the new one is in), putting back links lost under the agent, checking
//! every pinned link against the kernel (for `/healthz`), and removing them all (`--cleanup`).

use std::{
    collections::BTreeSet,
    fs, io,
    net::IpAddr,
    os::{fd::AsFd as _, fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink as AyaPinnedLink},
        tc::TcAttachOptions,
    },
};
use proxy_common::maps;
use tracing::{debug, info, warn};

use super::{Datapath, DatapathError, interfaces, layout};
use crate::{
    model::Cidr,
    sys::{
        self,
        bpf::{Attachment, LinkInfo},
    },
};

/// The cgroup programs and their names in the object (also their link pin names): the IPv4
/// hooks and their IPv6 twins, which also serve IPv4-mapped addresses on `AF_INET6` sockets.
pub(super) const CGROUP_PROGRAMS: &[&str] =
    &["connect4", "sendmsg4", "recvmsg4", "getpeername4", "connect6", "sendmsg6", "recvmsg6", "getpeername6"];
/// The TC ingress program; its links are pinned as `links/tc_ingress-<interface>`.
pub(super) const TC_PROGRAM: &str = "tc_ingress";
/// The TC egress program (replies of hostNetwork backends); links `links/tc_egress-<interface>`.
pub(super) const TC_EGRESS_PROGRAM: &str = "tc_egress";

impl Datapath {
    /// Attaches the loaded cgroup program `name` to the cgroup and pins its link, replacing the
    /// link pinned there before only once the new one is in.
    pub(super) fn attach_cgroup(&mut self, name: &'static str) -> Result<(), DatapathError> {
        let cgroup = fs::File::open(&self.cgroup)
            .map_err(|source| DatapathError::Cgroup { path: self.cgroup.clone(), source })?;
        let pin = self.root.join("links").join(name);
        let program: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .ok_or(ProgramError::UnexpectedProgramType)
            .and_then(TryInto::try_into)
            .map_err(|source| DatapathError::Program { name, source })?;
        let id = program
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| DatapathError::Program { name, source })?;
        let link = program.take_link(id).map_err(|source| DatapathError::Program { name, source })?;
        pin_link(link, &pin)?;
        info!(program = name, cgroup = %self.cgroup.display(), "attached");
        Ok(())
    }

    /// Puts back programs whose link was removed or detached under the agent (a deleted pin,
    /// `bpftool link detach`), checked against the kernel as `/healthz` does: cgroup programs
    /// are attached again at once, TC links are forgotten so that the next
    /// [`Datapath::attach_interfaces`] attaches them again. Returns the links lost.
    pub fn restore_links(&mut self) -> Result<Vec<String>, DatapathError> {
        if self.upgrading() {
            return Ok(Vec::new());
        }
        let links = self.root.join("links");
        let present = pinned_links(&links, &self.cgroup)
            .map_err(|source| DatapathError::Bpffs { path: links.clone(), source })?;
        let attached: BTreeSet<&str> = present.iter().filter(|l| l.attached).map(|l| l.pin.as_str()).collect();
        let mut lost = Vec::new();
        for &name in CGROUP_PROGRAMS.iter().filter(|name| !attached.contains(*name)) {
            self.attach_cgroup(name)?;
            lost.push(name.to_owned());
        }
        for (program, attached_to) in
            [(TC_PROGRAM, &mut self.interfaces), (TC_EGRESS_PROGRAM, &mut self.egress_interfaces)]
        {
            let pin = |interface: &str| format!("{program}-{interface}");
            let detached: Vec<String> = attached_to
                .iter()
                .filter(|i| !attached.contains(pin(i).as_str()) && sys::net::interface_index(i).is_some())
                .cloned()
                .collect();
            for interface in detached {
                attached_to.remove(&interface);
                lost.push(pin(&interface));
            }
        }
        Ok(lost)
    }

    /// Attaches the TC ingress program to the node's interfaces that do not have it yet: those
    /// holding one of `node_addresses` (NodePort traffic arrives there, and remote backends'
    /// replies) and those routing into `pod_cidrs` (local backends' replies come from there: a
    /// pod bridge, or kind's per-pod veths); and the TC egress program to the first kind only
    /// (the replies of hostNetwork backends leave the node there). Nothing else is touched: an
    /// agent run outside a node attaches to no interface at all. Called again when the node
    /// changes and periodically, so pods' interfaces created later are covered, and attaches
    /// that failed are tried again; returns the interfaces newly attached.
    pub fn attach_interfaces(
        &mut self,
        node_addresses: &[IpAddr],
        pod_cidrs: &[Cidr],
    ) -> Result<Vec<String>, DatapathError> {
        if self.upgrading() {
            // The old programs serve until the swap attaches the new ones.
            return Ok(Vec::new());
        }
        let mut present = interfaces::node_interfaces(node_addresses, pod_cidrs).map_err(DatapathError::Interfaces)?;
        let mut node_facing = interfaces::node_interfaces(node_addresses, &[]).map_err(DatapathError::Interfaces)?;
        if self.sock_hostns_only {
            // Pods' own traffic is translated on the way in from them: on every pod-facing
            // interface, a pod bridge's ports included (a reply between two pods of one bridge
            // never reaches the bridge's own hooks); and replies of hostNetwork backends to pods
            // leave through the pod-facing interfaces.
            let pods = interfaces::pod_interfaces(pod_cidrs).map_err(DatapathError::Interfaces)?;
            self.set_pod_interfaces(&pods)?;
            node_facing.extend(interfaces::node_interfaces(&[], pod_cidrs).map_err(DatapathError::Interfaces)?);
            present.extend(pods);
        }
        let added = self.attach_tc(TC_PROGRAM, TcAttachType::Ingress, &present)?;
        self.attach_tc(TC_EGRESS_PROGRAM, TcAttachType::Egress, &node_facing)?;
        Ok(added)
    }

    /// Attaches TC program `name` (`kind`: ingress or egress) to each of `wanted` it is not on
    /// yet, pinning its links as `links/<name>-<interface>`, and forgets the interfaces it was
    /// on that are gone (their links went with them). An interface that vanished meanwhile is
    /// skipped quietly; any other failure is logged at warn when it starts or changes, and kept
    /// in [`Datapath::unattached`] (for `/healthz` and `/metrics`) until an attach succeeds or
    /// the interface is no longer wanted. Returns the interfaces newly attached.
    pub(super) fn attach_tc(
        &mut self,
        name: &'static str,
        kind: TcAttachType,
        wanted: &BTreeSet<String>,
    ) -> Result<Vec<String>, DatapathError> {
        self.attach_tc_as(name, kind, wanted, false)
    }

    /// [`Datapath::attach_tc`] for an upgrade's swap: each new link runs in front of the old
    /// one and is pinned beside it (`<pin>_new`) until [`promote_staged`] takes the old links
    /// out (see [`Datapath::finish_upgrade`] for how the two share the packets meanwhile).
    pub(super) fn attach_tc_staged(
        &mut self,
        name: &'static str,
        kind: TcAttachType,
        wanted: &BTreeSet<String>,
    ) -> Result<Vec<String>, DatapathError> {
        self.attach_tc_as(name, kind, wanted, true)
    }

    fn attach_tc_as(
        &mut self,
        name: &'static str,
        kind: TcAttachType,
        wanted: &BTreeSet<String>,
        staged: bool,
    ) -> Result<Vec<String>, DatapathError> {
        let links = self.root.join("links");
        let attached = if name == TC_PROGRAM { &mut self.interfaces } else { &mut self.egress_interfaces };
        let program = classifier(&mut self.ebpf, name)?;
        let mut added = Vec::new();
        for interface in wanted.iter().filter(|n| !attached.contains(*n)) {
            let attached = if staged {
                program.attach_with_options(interface, kind, TcAttachOptions::TcxOrder(LinkOrder::first()))
            } else {
                program.attach(interface, kind)
            };
            let id = match attached {
                Ok(id) => id,
                // An interface can vanish between listing and attaching (a pod going away).
                Err(error) if sys::net::interface_index(interface).is_none() => {
                    debug!(interface, %error, program = name, "interface gone before the TC program was attached");
                    self.unattached.forget(name, interface);
                    continue;
                }
                Err(error) => {
                    let error = crate::error_chain(&error);
                    if self.unattached.failed(name, interface, &error) {
                        warn!(
                            interface,
                            error,
                            program = name,
                            "attaching the TC program failed; retrying on every interface rescan"
                        );
                    } else {
                        debug!(interface, error, program = name, "attaching the TC program failed again");
                    }
                    continue;
                }
            };
            let pin = links.join(format!("{name}-{interface}"));
            let link = program.take_link(id).map_err(|source| DatapathError::Program { name, source })?;
            if staged {
                pin_staged(link, &pin)?;
            } else {
                pin_link(link, &pin)?;
            }
            if self.unattached.forget(name, interface) {
                info!(program = name, interface, "attached after earlier failures");
            } else {
                info!(program = name, interface, "attached");
            }
            added.push(interface.clone());
        }
        attached.extend(added.iter().cloned());
        // Interfaces that no longer exist (a pod gone) took their links with them; forget their
        // pins. One that merely is not wanted now keeps its program: detaching is --cleanup's.
        let gone: Vec<String> = attached.iter().filter(|n| sys::net::interface_index(n).is_none()).cloned().collect();
        for interface in &gone {
            let _ = fs::remove_file(links.join(format!("{name}-{interface}")));
            attached.remove(interface);
        }
        self.unattached.retain(name, |interface| wanted.contains(interface));
        Ok(added)
    }

    /// The interfaces that should carry a TC program and do not (shared with `/healthz`).
    pub fn unattached(&self) -> &super::Unattached {
        &self.unattached
    }
}

/// The TC program `name` of the object.
pub(super) fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(|source| DatapathError::Program { name, source })
}

/// Pins a program's new `link` at `pin` (see [`replace_pinned_link`]).
fn pin_link(link: impl TryInto<FdLink, Error = LinkError>, pin: &Path) -> Result<(), DatapathError> {
    let link = link.try_into().map_err(|e| DatapathError::Pin { path: pin.to_owned(), detail: e.to_string() })?;
    replace_pinned_link(link, pin)
}

/// Where a link is pinned until it takes `path`.
fn staging_pin(path: &Path) -> std::path::PathBuf {
    path.with_file_name(format!("{}_new", path.file_name().and_then(|n| n.to_str()).unwrap_or("link")))
}

/// Pins `link` beside `path` ([`staging_pin`]), for [`promote_staged`].
fn pin_staged(link: impl TryInto<FdLink, Error = LinkError>, path: &Path) -> Result<(), DatapathError> {
    let pin_error = |detail: String| DatapathError::Pin { path: path.to_owned(), detail };
    let link = link.try_into().map_err(|e| pin_error(e.to_string()))?;
    let staging = staging_pin(path);
    let _ = fs::remove_file(&staging);
    // The pin keeps the link; our fd can go.
    drop(link.pin(&staging).map_err(|e| pin_error(e.to_string()))?);
    Ok(())
}

/// Puts every link staged under `links` ([`Datapath::attach_tc_staged`]) in place of the link
/// pinned where it belongs, detaching that one first: one tight loop over the interfaces, so a
/// flow crossing two of them meets the old and the new programs for microseconds at most.
/// Returns how many links took over.
pub(super) fn promote_staged(links: &Path) -> Result<usize, DatapathError> {
    let staged: Vec<_> = fs::read_dir(links)
        .map_err(|source| DatapathError::Bpffs { path: links.to_owned(), source })?
        .flatten()
        .filter_map(|e| Some(links.join(e.file_name().to_str()?.strip_suffix("_new")?)))
        .collect();
    for path in &staged {
        let pin_error = |detail: String| DatapathError::Pin { path: path.to_owned(), detail };
        if let Ok(old) = sys::bpf::obj_get(path) {
            sys::bpf::link_detach(old.as_fd()).map_err(|e| pin_error(format!("detaching the old link: {e}")))?;
            fs::remove_file(path).map_err(|e| pin_error(e.to_string()))?;
        }
        let staging = staging_pin(path);
        fs::rename(&staging, path).map_err(|e| pin_error(format!("rename from {}: {e}", staging.display())))?;
    }
    Ok(staged.len())
}

/// Pins `link` at `path`; an earlier link pinned there (an earlier agent's) is detached only
/// after the new one is attached, so no connect goes untranslated in between.
fn replace_pinned_link(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    let pin_error = |detail: String| DatapathError::Pin { path: path.to_owned(), detail };
    let staging = staging_pin(path);
    let _ = fs::remove_file(&staging);
    let pinned = link.pin(&staging).map_err(|e| pin_error(e.to_string()))?;
    if path.exists() {
        debug!(path = %path.display(), "replacing the link of an earlier agent");
        fs::remove_file(path).map_err(|e| pin_error(e.to_string()))?;
    }
    fs::rename(&staging, path).map_err(|e| pin_error(format!("rename from {}: {e}", staging.display())))?;
    // The pin keeps the link (and the program) alive; our fd can go.
    drop(pinned);
    Ok(())
}

/// Detaches every program and removes every pin under `root` (`--cleanup`). Safe to run twice
/// and when nothing is there.
pub fn cleanup(root: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let links = root.join("links");
    let link_ids = pinned_link_ids(&links);
    for entry in fs::read_dir(&links).into_iter().flatten().flatten() {
        // Removing the last pin of a link detaches it.
        fs::remove_file(entry.path())?;
        removed += 1;
    }
    wait_for_release(&link_ids);
    for name in maps::ALL {
        let path = root.join(name);
        if path.exists() {
            fs::remove_file(&path)?;
            removed += 1;
        }
    }
    // An upgrade's new maps, and the layout records.
    layout::remove_all(root)?;
    for dir in [links.as_path(), root] {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        }
    }
    Ok(removed)
}

/// The ids of the links pinned in `links`.
pub(super) fn pinned_link_ids(links: &Path) -> Vec<u32> {
    let pins = fs::read_dir(links).into_iter().flatten().flatten();
    pins.filter_map(|entry| AyaPinnedLink::from_pin(entry.path()).ok())
        .filter_map(|link| FdLink::from(link).info().ok().map(|info| info.id()))
        .collect()
}

/// The kernel releases an unpinned link asynchronously (a work item, then RCU): wait, bounded,
/// until none of `ids` is loaded, so that when `--cleanup` returns nothing of ours is attached.
/// Blocks for up to 5 s: never call it on an async task.
pub(super) fn wait_for_release(ids: &[u32]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let live: BTreeSet<u32> = aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
        if ids.iter().all(|id| !live.contains(id)) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What became of one pinned link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedLink {
    /// The pin's file name under `<bpf-root>/links`.
    pub pin: String,
    /// The program's name: the pin name up to its first `-` (`connect4`, `tc_ingress-eth0`).
    pub program: String,
    /// The kernel's answer, if the pin could be read.
    pub info: Option<LinkInfo>,
    /// Whether the kernel runs the program where the link says.
    pub attached: bool,
    /// Why not, when it matters: `None` when attached, and for a TC link whose interface went
    /// away (the agent forgets those pins itself).
    pub problem: Option<String>,
}

/// Checks every link pinned under `links_dir` as `bpftool` would: a cgroup link must be
/// attached to `cgroup` (the link's cgroup id is the cgroup's, and the cgroup lists the link's
/// program for its attach type); a TCX link to the interface it names (the interface lists the
/// program).
pub fn pinned_links(links_dir: &Path, cgroup: &Path) -> io::Result<Vec<PinnedLink>> {
    let mut pins: Vec<String> = match fs::read_dir(links_dir) {
        Ok(entries) => entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    // `<name>_new` is a link being swapped in by a starting agent.
    pins.retain(|p| !p.ends_with("_new"));
    pins.sort();
    let cgroup_dir = fs::File::open(cgroup);
    let cgroup_id = cgroup_dir.as_ref().ok().and_then(|f| f.metadata().ok()).map(|m| m.ino());
    Ok(pins
        .into_iter()
        .map(|pin| {
            let path = links_dir.join(&pin);
            let program = pin.split_once('-').map_or(pin.as_str(), |(p, _)| p).to_owned();
            let info = sys::bpf::obj_get(&path)
                .map_err(|e| e.to_string())
                .and_then(|fd| sys::bpf::link_info(fd.as_fd()).map_err(|e| e.to_string()));
            let (info, problem) = match info {
                Ok(info) => (Some(info), check(&pin, &path, &info, cgroup, &cgroup_dir, cgroup_id)),
                Err(e) => (None, Some(format!("link {}: cannot read it: {e}", path.display()))),
            };
            let gone_interface = matches!(info, Some(LinkInfo { attachment: Attachment::Tcx { ifindex: 0, .. }, .. }));
            let attached = info.is_some() && problem.is_none() && !gone_interface;
            PinnedLink { pin, program, info, attached, problem }
        })
        .collect())
}

/// Why `info` is not attached where it belongs, if it is not.
fn check(
    pin: &str,
    path: &Path,
    info: &LinkInfo,
    cgroup: &Path,
    cgroup_dir: &io::Result<fs::File>,
    cgroup_id: Option<u64>,
) -> Option<String> {
    let link = format!("link {} (id {}, program id {})", path.display(), info.id, info.prog_id);
    match info.attachment {
        Attachment::Cgroup { cgroup_id: 0, .. } => Some(format!("{link} is detached from its cgroup")),
        Attachment::Cgroup { cgroup_id: linked, attach_type } => {
            let dir = match cgroup_dir {
                Ok(dir) => dir,
                Err(e) => return Some(format!("cgroup {}: {e}", cgroup.display())),
            };
            if Some(linked) != cgroup_id {
                return Some(format!("{link} is attached to cgroup id {linked}, not to {}", cgroup.display()));
            }
            match sys::bpf::prog_query(dir.as_raw_fd() as u32, attach_type) {
                Ok(ids) if ids.contains(&info.prog_id) => None,
                Ok(ids) => Some(format!(
                    "{link}: cgroup {} runs programs {ids:?} for attach type {attach_type}, not ours",
                    cgroup.display()
                )),
                Err(e) => Some(format!("querying the programs of cgroup {}: {e}", cgroup.display())),
            }
        }
        Attachment::Tcx { ifindex: 0, .. } => {
            // Detached: fine if its interface is gone (a pod went away), not if it is still here.
            let interface = pin.split_once('-').map(|(_, i)| i)?;
            sys::net::interface_index(interface)
                .map(|_| format!("{link} is detached, but interface {interface} is still there"))
        }
        Attachment::Tcx { ifindex, attach_type } => match sys::bpf::prog_query(ifindex, attach_type) {
            Ok(ids) if ids.contains(&info.prog_id) => None,
            Ok(ids) => Some(format!("{link}: interface {ifindex} runs programs {ids:?}, not ours")),
            Err(e) => Some(format!("querying the programs of interface {ifindex}: {e}")),
        },
        Attachment::Other(_) => (info.prog_id == 0).then(|| format!("{link} has no program")),
    }
}
