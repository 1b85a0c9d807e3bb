//! The kernel side as the agent sees it: load the embedded BPF object, pin its maps under the
//! bpffs root, attach the programs, and write the maps (only through [`writer::Writer`]).

mod bpffs;
pub mod layout;
pub mod sockets;
pub mod writer;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::Ipv4Addr,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::{Backend, BackendId},
    config::NodeConfig,
    conntrack::{CtKey, CtValue},
    maps,
    maps::LAYOUT_VERSION,
    service::{SOURCE_RANGE_FRONTEND_BITS, ServiceKey, ServiceName, ServiceValue, SourceRange},
    sock::{SockBackendKey, SockBackendValue, SockRevKey, SockRevValue},
};
use tracing::{debug, info};

pub use self::bpffs::{ensure_bpffs, find_cgroup2_mount};
use self::writer::MapStore;
use crate::model::{Cidr, Frontend};

/// The BPF object, built by build.rs from `proxy-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy"));

/// The cgroup programs and their names in the object (also their link pin names).
const CGROUP_PROGRAMS: &[&str] = &["connect4", "sendmsg4", "recvmsg4", "getpeername4"];
/// The TC ingress program; its links are pinned as `links/tc_ingress-<interface>`.
const TC_PROGRAM: &str = "tc_ingress";
/// The TC egress program (replies of hostNetwork backends); links `links/tc_egress-<interface>`.
const TC_EGRESS_PROGRAM: &str = "tc_egress";

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`), what
/// `bpf_get_netns_cookie` gives programs for sockets there.
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a u64 buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Whether this network namespace has an interface called `name`.
fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else { return false };
    // SAFETY: a NUL-terminated name; the call only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// The interfaces of this network namespace that hold one of `addresses` or carry a route into
/// one of `cidrs` (read from getifaddrs and /proc/self/net/route, both per network namespace).
fn node_interfaces(addresses: &[Ipv4Addr], cidrs: &[Cidr]) -> io::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    // SAFETY: getifaddrs fills a list freed below; every pointer is checked before use.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut entry = head;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let sin = &*(addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if addresses.contains(&ip) {
                    names.insert(std::ffi::CStr::from_ptr((*entry).ifa_name).to_string_lossy().into_owned());
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; addresses in host-order hex of
    // the network-order bytes.
    for line in fs::read_to_string("/proc/self/net/route")?.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(iface), Some(dest)) = (fields.first(), fields.get(1).and_then(|d| u32::from_str_radix(d, 16).ok()))
        else {
            continue;
        };
        let dest = Ipv4Addr::from(dest.to_le_bytes());
        if *iface != "lo" && dest != Ipv4Addr::UNSPECIFIED && cidrs.iter().any(|c| c.contains(dest)) {
            names.insert((*iface).to_owned());
        }
    }
    Ok(names)
}

/// Errors of loading, attaching and pinning.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The bpffs root could not be prepared.
    #[error("bpffs at {path}: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    /// The object did not load (verifier, missing BTF, permissions).
    #[error("loading the BPF object failed (are you root with CAP_BPF and CAP_SYS_ADMIN?): {0}")]
    Load(#[from] aya::EbpfError),
    /// A program did not load or attach.
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    /// The cgroup could not be opened.
    #[error("cgroup {path}: {source} (pass --cgroup-path with a cgroup v2 directory)")]
    Cgroup { path: PathBuf, source: io::Error },
    /// A link could not be pinned or replaced.
    #[error("pinning link {path}: {detail}")]
    Pin { path: PathBuf, detail: String },
    /// A map is missing from the object or has the wrong type.
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    /// Carrying state over to a new map layout failed.
    #[error("upgrading the map layout: {0}")]
    Upgrade(String),
}

/// Where and how to load the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory for the pins (`--bpf-root`).
    pub bpf_root: PathBuf,
    /// cgroup v2 directory for the socket programs (`--cgroup-path`).
    pub cgroup: PathBuf,
    /// Size of the `services` map.
    pub services_max: u32,
    /// Size of the `backends` map.
    pub backends_max: u32,
    /// Size of the `affinity` map.
    pub affinity_max: u32,
    /// Size of the `conntrack` map.
    pub conntrack_max: u32,
}

/// The loaded and attached datapath. Links are pinned, so the programs stay attached when the
/// agent exits (traffic keeps flowing) until `--cleanup` removes the pins.
pub struct Datapath {
    ebpf: Ebpf,
    root: PathBuf,
    /// The cgroup the socket programs attach to.
    cgroup: PathBuf,
    /// Interfaces the TC ingress program is attached to (by this agent).
    interfaces: BTreeSet<String>,
    /// Interfaces the TC egress program is attached to (by this agent).
    egress_interfaces: BTreeSet<String>,
    /// Pinned maps being replaced by new ones (see [`layout`]): nothing is attached until
    /// [`Datapath::finish_upgrade`].
    replacing: Vec<&'static str>,
}

impl Datapath {
    /// Loads the object, reusing maps already pinned under the root (an earlier agent's), and
    /// attaches the programs, replacing an earlier agent's links only once the new ones are in.
    pub fn load(opts: &LoadOptions) -> Result<(Self, AyaMaps), DatapathError> {
        let root = &opts.bpf_root;
        let bpffs_error = |path: &Path| {
            let path = path.to_owned();
            move |source| DatapathError::Bpffs { path, source }
        };
        ensure_bpffs(root).map_err(bpffs_error(root))?;
        let links = root.join("links");
        fs::create_dir_all(&links).map_err(bpffs_error(&links))?;
        let sizes = BTreeMap::from([
            (maps::SERVICES, opts.services_max),
            (maps::BACKENDS, opts.backends_max),
            (maps::AFFINITY, opts.affinity_max),
            (maps::SERVICE_NAMES, opts.services_max.min(maps::SERVICE_NAMES_MAX_ENTRIES)),
            (maps::CONNTRACK, opts.conntrack_max),
        ]);
        // Pinned maps the new programs cannot share stay with the old programs until the swap
        // (the object is parsed for its maps' shapes only when there are pinned maps).
        let pinned = layout::pinned(root).map_err(bpffs_error(root))?;
        let replacing = match pinned {
            Some(version) => {
                let wanted = layout::wanted(OBJECT, &sizes).map_err(DatapathError::Upgrade)?;
                layout::to_replace(root, version, &wanted)
            }
            None => Vec::new(),
        };
        if !replacing.is_empty() {
            let staging = layout::staging(root);
            layout::fresh_staging(root).map_err(bpffs_error(&staging))?;
            info!(from = pinned, to = LAYOUT_VERSION, maps = ?replacing, "replacing maps the new programs cannot share");
        }
        let pin_dir = |name: &str| if replacing.contains(&name) { layout::staging(root) } else { root.clone() };
        let pins: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|m| (*m, pin_dir(m).join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, size) in &sizes {
            loader.map_max_entries(name, *size);
        }
        let mut ebpf = loader.load(OBJECT)?;
        for name in [TC_PROGRAM, TC_EGRESS_PROGRAM] {
            classifier(&mut ebpf, name)?.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        for &name in CGROUP_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(ProgramError::UnexpectedProgramType)
                .and_then(TryInto::try_into)
                .map_err(|source| DatapathError::Program { name, source })?;
            program.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        let maps = AyaMaps::open(&mut ebpf, |name| pin_dir(name).join(name))?;
        let mut datapath = Self {
            ebpf,
            root: root.clone(),
            cgroup: opts.cgroup.clone(),
            interfaces: BTreeSet::new(),
            egress_interfaces: BTreeSet::new(),
            replacing,
        };
        if datapath.upgrading() {
            let staging = layout::staging(root);
            layout::carry(root, &staging, &datapath.replacing, false)
                .map_err(|e| DatapathError::Upgrade(e.to_string()))?;
            return Ok((datapath, maps));
        }
        for &name in CGROUP_PROGRAMS {
            datapath.attach_cgroup(name)?;
        }
        layout::record(root).map_err(bpffs_error(root))?;
        Ok((datapath, maps))
    }

    /// Whether this agent is replacing maps (see [`layout`]) and has not swapped yet: its
    /// programs are not attached, the old ones serve.
    pub fn upgrading(&self) -> bool {
        !self.replacing.is_empty()
    }

    /// Completes an upgrade after the first full sync filled the new maps (see [`layout`]): the
    /// new programs replace the old ones on the cgroup and on every interface the old TC
    /// program was on, the flows that started meanwhile are carried over, and the new maps take
    /// the old ones' pins. Nothing to do when not upgrading.
    pub fn finish_upgrade(&mut self) -> Result<(), DatapathError> {
        let replacing = std::mem::take(&mut self.replacing);
        if replacing.is_empty() {
            return Ok(());
        }
        let staging = layout::staging(&self.root);
        let carry = |root: &Path| {
            layout::carry(root, &staging, &replacing, true).map_err(|e| DatapathError::Upgrade(e.to_string()))
        };
        // Flows the old programs started since the first carry, right before the swap, and
        // again once the old programs are gone (those started in between).
        carry(&self.root)?;
        let links = self.root.join("links");
        let old_links = pinned_link_ids(&links);
        let tc = [(TC_PROGRAM, TcAttachType::Ingress), (TC_EGRESS_PROGRAM, TcAttachType::Egress)];
        for (program, kind) in tc {
            // Every interface the old program is on, as its pins say.
            let prefix = format!("{program}-");
            let on: BTreeSet<String> = fs::read_dir(&links)
                .map_err(|source| DatapathError::Bpffs { path: links.clone(), source })?
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix(&prefix).map(str::to_owned))
                .filter(|name| !name.ends_with("_new"))
                .collect();
            let attached = if program == TC_PROGRAM { &mut self.interfaces } else { &mut self.egress_interfaces };
            attach_tc(&mut self.ebpf, program, kind, &on, attached, &links)?;
        }
        for &name in CGROUP_PROGRAMS {
            self.attach_cgroup(name)?;
        }
        wait_for_release(&old_links);
        carry(&self.root)?;
        layout::swap_pins(&self.root, &staging, &replacing)
            .map_err(|source| DatapathError::Bpffs { path: staging, source })?;
        info!(layout = LAYOUT_VERSION, "upgrade done: the new programs serve from the new maps");
        Ok(())
    }

    /// Attaches the loaded cgroup program `name` to the cgroup and pins its link, replacing the
    /// link pinned there before only once the new one is in.
    fn attach_cgroup(&mut self, name: &'static str) -> Result<(), DatapathError> {
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
        let present = crate::observe::kernel::pinned_links(&links, &self.cgroup)
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
                .filter(|i| !attached.contains(pin(i).as_str()) && interface_exists(i))
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
    /// changes and periodically, so pods' interfaces created later are covered; returns the
    /// interfaces newly attached.
    pub fn attach_interfaces(
        &mut self,
        node_addresses: &[Ipv4Addr],
        pod_cidrs: &[Cidr],
    ) -> Result<Vec<String>, DatapathError> {
        if self.upgrading() {
            // The old programs serve until the swap attaches the new ones.
            return Ok(Vec::new());
        }
        let lookup_error = |source| DatapathError::Bpffs { path: "/proc/self/net/route".into(), source };
        let present = node_interfaces(node_addresses, pod_cidrs).map_err(lookup_error)?;
        let node_facing = node_interfaces(node_addresses, &[]).map_err(lookup_error)?;
        let links = self.root.join("links");
        let added =
            attach_tc(&mut self.ebpf, TC_PROGRAM, TcAttachType::Ingress, &present, &mut self.interfaces, &links)?;
        attach_tc(
            &mut self.ebpf,
            TC_EGRESS_PROGRAM,
            TcAttachType::Egress,
            &node_facing,
            &mut self.egress_interfaces,
            &links,
        )?;
        Ok(added)
    }

    /// The loaded TC program (for `BPF_PROG_TEST_RUN` measurements).
    pub fn tc_program(&self) -> Option<&SchedClassifier> {
        self.ebpf.program(TC_PROGRAM).and_then(|p| p.try_into().ok())
    }

    /// The bpffs root of this datapath.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The TC program `name` of the object.
fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(|source| DatapathError::Program { name, source })
}

/// Attaches TC program `name` (`kind`: ingress or egress) to each of `wanted` not in
/// `attached` yet, pinning its links as `links/<name>-<interface>`, and forgets the
/// interfaces of `attached` that are gone (their links went with them). Returns the
/// interfaces newly attached.
fn attach_tc(
    ebpf: &mut Ebpf,
    name: &'static str,
    kind: TcAttachType,
    wanted: &BTreeSet<String>,
    attached: &mut BTreeSet<String>,
    links: &Path,
) -> Result<Vec<String>, DatapathError> {
    let program = classifier(ebpf, name)?;
    let mut added = Vec::new();
    for interface in wanted.iter().filter(|n| !attached.contains(*n)) {
        let id = match program.attach(interface, kind) {
            Ok(id) => id,
            // An interface can vanish between listing and attaching (a pod going away).
            Err(error) => {
                debug!(interface, %error, program = name, "not attaching the TC program");
                continue;
            }
        };
        let pin = links.join(format!("{name}-{interface}"));
        let link = program.take_link(id).map_err(|source| DatapathError::Program { name, source })?;
        pin_link(link, &pin)?;
        info!(program = name, interface, "attached");
        added.push(interface.clone());
    }
    attached.extend(added.iter().cloned());
    // Interfaces that no longer exist (a pod gone) took their links with them; forget their
    // pins. One that merely is not wanted now keeps its program: detaching is --cleanup's.
    let gone: Vec<String> = attached.iter().filter(|n| !interface_exists(n)).cloned().collect();
    for interface in &gone {
        let _ = fs::remove_file(links.join(format!("{name}-{interface}")));
        attached.remove(interface);
    }
    Ok(added)
}

/// Pins a program's new `link` at `pin` (see [`replace_pinned_link`]).
fn pin_link(link: impl TryInto<FdLink, Error = LinkError>, pin: &Path) -> Result<(), DatapathError> {
    let link = link.try_into().map_err(|e| DatapathError::Pin { path: pin.to_owned(), detail: e.to_string() })?;
    replace_pinned_link(link, pin)
}

/// Pins `link` at `path`; an earlier link pinned there (an earlier agent's) is detached only
/// after the new one is attached, so no connect goes untranslated in between.
fn replace_pinned_link(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    let pin_error = |detail: String| DatapathError::Pin { path: path.to_owned(), detail };
    let staging = path.with_file_name(format!("{}_new", path.file_name().and_then(|n| n.to_str()).unwrap_or("link")));
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
fn pinned_link_ids(links: &Path) -> Vec<u32> {
    let pins = fs::read_dir(links).into_iter().flatten().flatten();
    pins.filter_map(|entry| PinnedLink::from_pin(entry.path()).ok())
        .filter_map(|link| FdLink::from(link).info().ok().map(|info| info.id()))
        .collect()
}

/// The kernel releases an unpinned link asynchronously (a work item, then RCU): wait, bounded,
/// until none of `ids` is loaded, so that when `--cleanup` returns nothing of ours is attached.
fn wait_for_release(ids: &[u32]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let live: BTreeSet<u32> = aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
        if ids.iter().all(|id| !live.contains(id)) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A hash map (plain or LRU) with a second handle on it for batch reads.
struct Hash<K, V> {
    map: HashMap<MapData, K, V>,
    fd: OwnedFd,
}

impl<K: aya::Pod, V: aya::Pod> Hash<K, V> {
    /// `map`, and a second handle from its pin.
    fn new(map: Result<HashMap<MapData, K, V>, DatapathError>, pin: &Path) -> Result<Self, DatapathError> {
        let fd = crate::observe::kernel::open_pinned(pin)
            .map_err(|source| DatapathError::Bpffs { path: pin.to_owned(), source })?;
        Ok(Self { map: map?, fd })
    }

    /// Every entry, thousands per system call; one at a time on kernels without batch reads.
    fn entries(&self) -> Vec<(K, V)> {
        match crate::observe::kernel::dump(self.fd.as_fd()) {
            Ok(entries) => entries,
            Err(_) => self.map.iter().filter_map(Result::ok).collect(),
        }
    }
}

impl<K, V> std::ops::Deref for Hash<K, V> {
    type Target = HashMap<MapData, K, V>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<K, V> std::ops::DerefMut for Hash<K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

/// The service maps, written through [`writer::Writer`].
pub struct AyaMaps {
    conntrack: Hash<CtKey, CtValue>,
    sock_rev: Hash<SockRevKey, SockRevValue>,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    affinity: Hash<AffinityKey, AffinityValue>,
    sock_backend: Hash<SockBackendKey, SockBackendValue>,
    services: Hash<ServiceKey, ServiceValue>,
    backends: Hash<BackendId, Backend>,
    names: Hash<u32, ServiceName>,
    config: Array<MapData, NodeConfig>,
}

impl AyaMaps {
    /// The object's maps, pinned at `pin(name)`.
    fn open(ebpf: &mut Ebpf, pin: impl Fn(&str) -> PathBuf) -> Result<Self, DatapathError> {
        fn take<K: aya::Pod, V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<HashMap<MapData, K, V>, DatapathError> {
            let map = ebpf
                .take_map(name)
                .ok_or(DatapathError::Map { name, source: MapError::InvalidName { name: name.into() } })?;
            HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })
        }
        let config = ebpf.take_map(maps::CONFIG).ok_or(DatapathError::Map {
            name: maps::CONFIG,
            source: MapError::InvalidName { name: maps::CONFIG.into() },
        })?;
        let ranges = ebpf.take_map(maps::SOURCE_RANGES).ok_or(DatapathError::Map {
            name: maps::SOURCE_RANGES,
            source: MapError::InvalidName { name: maps::SOURCE_RANGES.into() },
        })?;
        Ok(Self {
            conntrack: Hash::new(lru(ebpf.take_map(maps::CONNTRACK), maps::CONNTRACK), &pin(maps::CONNTRACK))?,
            sock_rev: Hash::new(lru(ebpf.take_map(maps::SOCK_REV), maps::SOCK_REV), &pin(maps::SOCK_REV))?,
            source_ranges: LpmTrie::try_from(ranges)
                .map_err(|source| DatapathError::Map { name: maps::SOURCE_RANGES, source })?,
            affinity: Hash::new(lru(ebpf.take_map(maps::AFFINITY), maps::AFFINITY), &pin(maps::AFFINITY))?,
            sock_backend: Hash::new(
                lru(ebpf.take_map(maps::SOCK_BACKEND), maps::SOCK_BACKEND),
                &pin(maps::SOCK_BACKEND),
            )?,
            services: Hash::new(take(ebpf, maps::SERVICES), &pin(maps::SERVICES))?,
            backends: Hash::new(take(ebpf, maps::BACKENDS), &pin(maps::BACKENDS))?,
            names: Hash::new(take(ebpf, maps::SERVICE_NAMES), &pin(maps::SERVICE_NAMES))?,
            config: Array::try_from(config).map_err(|source| DatapathError::Map { name: maps::CONFIG, source })?,
        })
    }

    /// Opens the maps pinned under `root` (for tools that run beside the agent).
    pub fn from_pins(root: &Path) -> Result<Self, DatapathError> {
        fn open<K: aya::Pod, V: aya::Pod>(root: &Path, name: &'static str) -> Result<Hash<K, V>, DatapathError> {
            let data = MapData::from_pin(root.join(name)).map_err(|source| DatapathError::Map { name, source });
            let map = data.and_then(|data| {
                HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|source| DatapathError::Map { name, source })
            });
            Hash::new(map, &root.join(name))
        }
        fn open_lru<K: aya::Pod, V: aya::Pod>(root: &Path, name: &'static str) -> Result<Hash<K, V>, DatapathError> {
            let data = MapData::from_pin(root.join(name)).map(aya::maps::Map::LruHashMap).ok();
            Hash::new(lru(data, name), &root.join(name))
        }
        let config = MapData::from_pin(root.join(maps::CONFIG))
            .map_err(|source| DatapathError::Map { name: maps::CONFIG, source })?;
        let ranges = MapData::from_pin(root.join(maps::SOURCE_RANGES))
            .map_err(|source| DatapathError::Map { name: maps::SOURCE_RANGES, source })?;
        Ok(Self {
            conntrack: open_lru(root, maps::CONNTRACK)?,
            sock_rev: open_lru(root, maps::SOCK_REV)?,
            source_ranges: LpmTrie::try_from(aya::maps::Map::LpmTrie(ranges))
                .map_err(|source| DatapathError::Map { name: maps::SOURCE_RANGES, source })?,
            affinity: open_lru(root, maps::AFFINITY)?,
            sock_backend: open_lru(root, maps::SOCK_BACKEND)?,
            services: open(root, maps::SERVICES)?,
            backends: open(root, maps::BACKENDS)?,
            names: open(root, maps::SERVICE_NAMES)?,
            config: Array::try_from(aya::maps::Map::Array(config))
                .map_err(|source| DatapathError::Map { name: maps::CONFIG, source })?,
        })
    }

    /// Every `services` entry.
    pub fn services(&self) -> impl Iterator<Item = (ServiceKey, ServiceValue)> + '_ {
        self.services.entries().into_iter()
    }

    /// Every `service_names` entry.
    pub fn service_names(&self) -> impl Iterator<Item = (u32, ServiceName)> + '_ {
        self.names.entries().into_iter()
    }

    /// Every `backends` entry.
    pub fn backends(&self) -> impl Iterator<Item = (BackendId, Backend)> + '_ {
        self.backends.entries().into_iter()
    }
}

/// The `source_ranges` key admitting `cidr` at `frontend`.
fn source_range_key(frontend: &Frontend, cidr: &Cidr) -> Key<SourceRange> {
    let data = SourceRange::new(frontend.address.octets(), frontend.port, frontend.proto, cidr.network.octets());
    Key::new(SOURCE_RANGE_FRONTEND_BITS + u32::from(cidr.prefix), data)
}

/// An LRU hash map, or why not.
fn lru<K: aya::Pod, V: aya::Pod>(
    map: Option<aya::maps::Map>,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    let map = map.ok_or(DatapathError::Map { name, source: MapError::InvalidName { name: name.into() } })?;
    HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// Deleting an absent key is not an error for the writer.
fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl MapStore for AyaMaps {
    type Error = MapError;

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.services.insert(key, value, 0)
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        absent_ok(self.services.remove(&key))
    }

    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), MapError> {
        self.backends.insert(id, backend, 0)
    }

    fn delete_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        absent_ok(self.backends.remove(&id))
    }

    fn put_service_name(&mut self, id: u32, name: ServiceName) -> Result<(), MapError> {
        self.names.insert(id, name, 0)
    }

    fn delete_service_name(&mut self, id: u32) -> Result<(), MapError> {
        absent_ok(self.names.remove(&id))
    }

    fn put_config(&mut self, config: NodeConfig) -> Result<(), MapError> {
        self.config.set(0, config, 0)
    }

    fn forget(&mut self, gone: &dyn Fn(u32, BackendId) -> bool) -> Result<usize, MapError> {
        let stale_affinity: Vec<AffinityKey> = self
            .affinity
            .entries()
            .into_iter()
            .filter(|(k, v)| gone(k.service_id, v.backend_id))
            .map(|(k, _)| k)
            .collect();
        let stale_sockets: Vec<SockBackendKey> = self
            .sock_backend
            .entries()
            .into_iter()
            .filter(|(_, v)| gone(v.service_id, v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for key in &stale_affinity {
            absent_ok(self.affinity.remove(key))?;
        }
        for key in &stale_sockets {
            absent_ok(self.sock_backend.remove(key))?;
        }
        Ok(stale_affinity.len() + stale_sockets.len())
    }

    fn conntrack_entries(&self) -> Vec<(CtKey, CtValue)> {
        self.conntrack.entries()
    }

    fn delete_conntrack(&mut self, key: CtKey) -> Result<(), MapError> {
        absent_ok(self.conntrack.remove(&key))
    }

    fn sock_rev_entries(&self) -> Vec<(SockRevKey, SockRevValue)> {
        self.sock_rev.entries()
    }

    fn delete_sock_rev(&mut self, key: SockRevKey) -> Result<(), MapError> {
        absent_ok(self.sock_rev.remove(&key))
    }

    fn put_source_range(&mut self, frontend: &Frontend, cidr: &Cidr) -> Result<(), MapError> {
        self.source_ranges.insert(&source_range_key(frontend, cidr), 1, 0)
    }

    fn delete_source_range(&mut self, frontend: &Frontend, cidr: &Cidr) -> Result<(), MapError> {
        absent_ok(self.source_ranges.remove(&source_range_key(frontend, cidr)))
    }

    fn service_entries(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services().collect()
    }

    fn backend_entries(&self) -> Vec<(BackendId, Backend)> {
        self.backends().collect()
    }

    fn service_names(&self) -> Vec<(u32, ServiceName)> {
        self.service_names().collect()
    }
}
