//! The only I/O of inspect/explain: reads the pinned maps, the monotonic clock and the names
//! of network namespaces into a [`Snapshot`]. Read-only: nothing here writes a map.

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError};
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::{Backend, BackendId},
    conntrack::{CtKey, CtValue},
    maps,
    service::{ServiceKey, ServiceName, ServiceValue, SourceRange},
};

use super::InspectError;

/// Everything inspect and explain read, at one moment. Built by [`read`] from the pins, or by
/// hand in tests.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The `--bpf-root` the maps came from.
    pub root: PathBuf,
    /// Every `services` entry: masters (slot 0) and backend slots, both scopes.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Every `backends` entry.
    pub backends: BTreeMap<BackendId, Backend>,
    /// Every `service_names` entry.
    pub names: BTreeMap<u32, ServiceName>,
    /// Every `affinity` entry; `None` when the map is not pinned.
    pub affinity: Option<Vec<(AffinityKey, AffinityValue)>>,
    /// Every `conntrack` entry; `None` when the map is not pinned.
    pub conntrack: Option<Vec<(CtKey, CtValue)>>,
    /// Every `source_ranges` entry: the LPM trie's prefix length (over the whole key) and key
    /// data; `None` when the map is not pinned.
    pub source_ranges: Option<Vec<(u32, SourceRange)>>,
    /// CLOCK_MONOTONIC now, in ns: the clock `bpf_ktime_get_ns()` reads.
    pub now_ns: u64,
    /// The network namespaces found (`/run/netns/<name>`, and `self`, the one inspect runs in),
    /// to name the netns cookies of socket-path affinity entries and find a client's namespace.
    /// Empty unless [`netns`] filled it.
    pub netns: Vec<NetnsInfo>,
}

/// Reads the maps pinned under `root`.
pub fn read(root: &Path) -> Result<Snapshot, InspectError> {
    match fs::symlink_metadata(root.join(maps::SERVICES)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(InspectError::Permission { path: root.to_owned() });
        }
        // Nothing at all (or a root without the service map): the agent never ran there.
        Err(_) if !has_any_map(root) => return Err(InspectError::NoMaps { root: root.to_owned() }),
        Err(_) => {}
    }
    let services = entries::<ServiceKey, ServiceValue>(root, maps::SERVICES)?.into_iter().collect();
    let backends = entries::<BackendId, Backend>(root, maps::BACKENDS)?.into_iter().collect();
    let names = entries::<u32, ServiceName>(root, maps::SERVICE_NAMES)?.into_iter().collect();
    let affinity = match entries::<AffinityKey, AffinityValue>(root, maps::AFFINITY) {
        Ok(entries) => Some(entries),
        Err(InspectError::MissingMap { .. }) => None,
        Err(e) => return Err(e),
    };
    let conntrack = match entries::<CtKey, CtValue>(root, maps::CONNTRACK) {
        Ok(entries) => Some(entries),
        Err(InspectError::MissingMap { .. }) => None,
        Err(e) => return Err(e),
    };
    let source_ranges = match source_ranges(root) {
        Ok(entries) => Some(entries),
        Err(InspectError::MissingMap { .. }) => None,
        Err(e) => return Err(e),
    };
    // The clock after the maps: an entry written while we read is never "in the future".
    let now_ns = monotonic_now_ns()?;
    Ok(Snapshot {
        root: root.to_owned(),
        services,
        backends,
        names,
        affinity,
        conntrack,
        source_ranges,
        now_ns,
        netns: Vec::new(),
    })
}

fn has_any_map(root: &Path) -> bool {
    maps::ALL.iter().any(|name| fs::symlink_metadata(root.join(name)).is_ok())
}

/// Opens the hash (or LRU hash) map pinned as `root/name` and reads every entry.
fn entries<K: aya::Pod, V: aya::Pod>(root: &Path, name: &'static str) -> Result<Vec<(K, V)>, InspectError> {
    let (map, map_error) = open(root, name)?;
    // Accepts BPF_MAP_TYPE_HASH and BPF_MAP_TYPE_LRU_HASH, and checks key and value sizes.
    let map: HashMap<MapData, K, V> = HashMap::try_from(map).map_err(&map_error)?;
    map.iter().collect::<Result<Vec<_>, _>>().map_err(map_error)
}

/// Reads every `source_ranges` entry as (prefix length over the whole key, key data).
fn source_ranges(root: &Path) -> Result<Vec<(u32, SourceRange)>, InspectError> {
    let (map, map_error) = open(root, maps::SOURCE_RANGES)?;
    let trie: LpmTrie<MapData, SourceRange, u8> = LpmTrie::try_from(map).map_err(&map_error)?;
    let keys = trie.keys().collect::<Result<Vec<_>, _>>().map_err(map_error)?;
    Ok(keys.into_iter().map(|key| (key.prefix_len(), key.data())).collect())
}

/// Opens the map pinned as `root/name`, with the conversion of its errors.
fn open(root: &Path, name: &'static str) -> Result<(Map, impl Fn(MapError) -> InspectError), InspectError> {
    let path = root.join(name);
    match fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(InspectError::Permission { path }),
        Err(_) => return Err(InspectError::MissingMap { name, path }),
    }
    let map_error = move |source: MapError| match &source {
        MapError::SyscallError(e) if matches!(e.io_error.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) => {
            InspectError::Permission { path: path.clone() }
        }
        _ => InspectError::Map { name, path: path.clone(), source },
    };
    let data = MapData::from_pin(root.join(name)).map_err(&map_error)?;
    let map = Map::from_map_data(data).map_err(&map_error)?;
    Ok((map, map_error))
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_now_ns() -> Result<u64, InspectError> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(InspectError::Clock(io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// `SO_NETNS_COOKIE` (Linux 5.14) in asm-generic numbering (x86, arm, riscv); `libc` does not
/// export it for these targets.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// A network namespace: its cookie (what the socket path keys affinity by), a name and its
/// IPv4 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetnsInfo {
    /// The netns cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie()`).
    pub cookie: u64,
    /// Its name under `/run/netns` (as `ip netns` and CNI plugins name pods' namespaces), or
    /// `self` for the namespace inspect runs in (on a node: the host's).
    pub name: String,
    /// The IPv4 addresses of its interfaces.
    pub addresses: Vec<Ipv4Addr>,
}

/// Every namespace under `/run/netns`, then this process's own. Best effort: a namespace that
/// cannot be entered is left out; a namespace bound under two names keeps the first.
pub fn netns() -> Vec<NetnsInfo> {
    let named = fs::read_dir("/run/netns").into_iter().flatten().flatten();
    let mut candidates: Vec<(PathBuf, String)> =
        named.map(|entry| (entry.path(), entry.file_name().to_string_lossy().into_owned())).collect();
    candidates.sort();
    candidates.push((PathBuf::from("/proc/thread-self/ns/net"), "self".to_owned()));
    let mut out: Vec<NetnsInfo> = Vec::new();
    for (path, name) in candidates {
        if let Some((cookie, addresses)) = netns_info(&path)
            && !out.iter().any(|n| n.cookie == cookie)
        {
            out.push(NetnsInfo { cookie, name, addresses });
        }
    }
    out
}

/// The cookie and addresses of the namespace at `path`, read by a short-lived thread inside it
/// (setns changes only the calling thread's namespace, and that thread then ends).
fn netns_info(path: &Path) -> Option<(u64, Vec<Ipv4Addr>)> {
    let file = fs::File::open(path).ok()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid namespace fd affects only this thread, which ends here.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            Some((own_netns_cookie()?, own_addresses()))
        })
        .join()
        .ok()
        .flatten()
    })
}

/// The IPv4 addresses of the calling thread's namespace (getifaddrs asks netlink there).
fn own_addresses() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut entry = head;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let sin = addr.cast::<libc::sockaddr_in>();
                out.push(Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr)));
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

/// The cookie of the calling thread's network namespace: a Unix socket (no traffic) reports it.
fn own_netns_cookie() -> Option<u64> {
    // SAFETY: plain syscalls on a socket we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len);
        libc::close(fd);
        (rc == 0 && len as usize == size_of::<u64>()).then_some(cookie)
    }
}
