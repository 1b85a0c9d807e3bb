//! What the kernel says about our pins, asked the way `bpftool` asks: a pinned link's info
//! (`BPF_OBJ_GET_INFO_BY_FD`, as `bpftool link show`), the programs attached to a cgroup or an
//! interface (`BPF_PROG_QUERY`, as `bpftool cgroup show` and `bpftool net show`), and how many
//! entries a pinned map holds (`BPF_MAP_GET_NEXT_KEY`, as `bpftool map dump` walks it). aya 0.14
//! keeps the link info's attachment fields and the query private, hence the few raw calls here.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
};

use aya::maps::MapData;

/// `enum bpf_cmd` values (linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_UPDATE_ELEM` flags.
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;

/// `enum bpf_link_type` values.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// A failed look at a pin.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A bpf() command on a pin (or the object behind it) failed.
    #[error("{call} on {path}: {source}")]
    Bpf { call: &'static str, path: PathBuf, source: io::Error },
    /// A pinned map could not be opened.
    #[error("map {path}: {source}")]
    Map { path: PathBuf, source: aya::maps::MapError },
}

/// Runs one bpf() command on `attr`, a `#[repr(C)]` prefix of `union bpf_attr`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised `#[repr(C)]` prefix of `union bpf_attr` for `cmd`
    // (the kernel zero-extends a shorter attr), its size is passed along, and every pointer
    // inside it points into a live buffer of the size the command expects.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// `attr.obj_get` of `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens the object pinned at `path`.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGet { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `attr.info` of `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct ObjInfo {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info`: the common head, then the per-type union as bytes (its first field
/// sits at offset 16: the union holds 64-bit members).
#[repr(C, align(8))]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    union: [u8; 64],
}

/// Where a link attaches, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// A cgroup link: the cgroup's id (0 once detached) and the attach type.
    Cgroup { cgroup_id: u64, attach_type: u32 },
    /// A TCX link: the interface index (0 once detached) and the attach type.
    Tcx { ifindex: u32, attach_type: u32 },
    /// Another kind of link (`enum bpf_link_type`).
    Other(u32),
}

/// A pinned link's info.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// The link id (`bpftool link show id N`).
    pub id: u32,
    /// The program it runs.
    pub prog_id: u32,
    /// Where it attaches.
    pub attachment: Attachment,
}

fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut raw = RawLinkInfo { link_type: 0, id: 0, prog_id: 0, _pad: 0, union: [0; 64] };
    let mut attr = ObjInfo {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<RawLinkInfo>() as u32,
        info: std::ptr::from_mut(&mut raw) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at =
        |at: usize| u32::from_ne_bytes([raw.union[at], raw.union[at + 1], raw.union[at + 2], raw.union[at + 3]]);
    let attachment = match raw.link_type {
        // struct { __u64 cgroup_id; __u32 attach_type; } cgroup;
        BPF_LINK_TYPE_CGROUP => {
            let mut id = [0; 8];
            id.copy_from_slice(&raw.union[..8]);
            Attachment::Cgroup { cgroup_id: u64::from_ne_bytes(id), attach_type: u32_at(8) }
        }
        // struct { __u32 ifindex; __u32 attach_type; } tcx;
        BPF_LINK_TYPE_TCX => Attachment::Tcx { ifindex: u32_at(0), attach_type: u32_at(4) },
        other => Attachment::Other(other),
    };
    Ok(LinkInfo { id: raw.id, prog_id: raw.prog_id, attachment })
}

/// `attr.query` of `BPF_PROG_QUERY`.
#[repr(C)]
struct ProgQuery {
    /// A cgroup fd, or an interface index for TCX.
    target: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// The ids of the programs attached directly (not inherited) to `target` for `attach_type`.
fn prog_query(target: u32, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = ProgQuery {
            target,
            attach_type,
            query_flags: 0,
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            _pad: 0,
        };
        match bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                ids.truncate(attr.prog_cnt as usize);
                return Ok(ids);
            }
            // More programs than room: the kernel said how many.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && attr.prog_cnt as usize > ids.len() => {
                ids = vec![0; attr.prog_cnt as usize];
            }
            Err(e) => return Err(e),
        }
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

/// Checks every link pinned under `links_dir`: a cgroup link must be attached to `cgroup`
/// (the link's cgroup id is the cgroup's, and the cgroup lists the link's program for its attach
/// type); a TCX link to the interface it names (the interface lists the program).
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
            let info = obj_get(&path).and_then(|fd| link_info(fd.as_fd()));
            let (info, problem) = match info {
                Ok(info) => (Some(info), check(&pin, &path, &info, cgroup, &cgroup_dir, cgroup_id)),
                Err(e) => (None, Some(format!("link {}: cannot read it: {e}", path.display()))),
            };
            let attached = info.is_some() && problem.is_none() && !is_gone_interface(&info);
            PinnedLink { pin, program, info, attached, problem }
        })
        .collect())
}

fn is_gone_interface(info: &Option<LinkInfo>) -> bool {
    matches!(info, Some(LinkInfo { attachment: Attachment::Tcx { ifindex: 0, .. }, .. }))
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
            match prog_query(dir.as_raw_fd() as u32, attach_type) {
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
            let c_name = CString::new(interface).ok()?;
            // SAFETY: if_nametoindex reads a NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
            (index != 0).then(|| format!("{link} is detached, but interface {interface} is still there"))
        }
        Attachment::Tcx { ifindex, attach_type } => match prog_query(ifindex, attach_type) {
            Ok(ids) if ids.contains(&info.prog_id) => None,
            Ok(ids) => Some(format!("{link}: interface {ifindex} runs programs {ids:?}, not ours")),
            Err(e) => Some(format!("querying the programs of interface {ifindex}: {e}")),
        },
        Attachment::Other(_) => (info.prog_id == 0).then(|| format!("{link} has no program")),
    }
}

/// `attr` of `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
struct NextKey {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// A pinned map's entry count and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// Entries the kernel holds (for an array: its size).
    pub entries: u64,
    /// `max_entries`.
    pub max_entries: u64,
}

/// Counts the entries of the map pinned at `path` by walking its keys.
pub fn map_fill(path: &Path) -> Result<MapFill, KernelError> {
    let map = MapData::from_pin(path).map_err(|source| KernelError::Map { path: path.to_owned(), source })?;
    let info = map.info().map_err(|source| KernelError::Map { path: path.to_owned(), source })?;
    let max_entries = u64::from(info.max_entries());
    let entries = walk_keys(path, &map, info.key_size(), max_entries, |_| Ok(()))?;
    Ok(MapFill { entries: entries.min(max_entries), max_entries })
}

/// Calls `f` with every key of `map` (pinned at `path`, keys of `key_size` bytes); returns how
/// many keys there were. A key deleted under the walk restarts it from the top: bounded to
/// twice `max_entries` steps.
fn walk_keys(
    path: &Path,
    map: &MapData,
    key_size: u32,
    max_entries: u64,
    mut f: impl FnMut(&[u8]) -> Result<(), KernelError>,
) -> Result<u64, KernelError> {
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let key_size = (key_size as usize).max(1);
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut entries = 0u64;
    let mut first = true;
    while entries <= 2 * max_entries {
        let mut attr = NextKey {
            map_fd: fd,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                entries += 1;
                first = false;
                std::mem::swap(&mut key, &mut next);
                f(&key)?;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(source) => {
                return Err(KernelError::Bpf { call: "BPF_MAP_GET_NEXT_KEY", path: path.to_owned(), source });
            }
        }
    }
    Ok(entries)
}

/// `attr.batch` of `BPF_MAP_LOOKUP_BATCH`.
#[repr(C)]
struct Batch {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Opens the map pinned at `path` for [`dump`].
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    obj_get(path)
}

/// Every entry of a hash map (plain or LRU), read in batches of thousands per system call
/// (`BPF_MAP_LOOKUP_BATCH`) instead of two calls per entry. `K` and `V` must be the map's key
/// and value types (plain `#[repr(C)]` data, as every type of `proxy_common` is).
pub fn dump<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    const CHUNK: usize = 4096;
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    let mut keys = vec![0u8; CHUNK * key_size];
    let mut values = vec![0u8; CHUNK * value_size];
    // The batch token: a bucket index for hash maps.
    let (mut token, mut next) = (0u64, 0u64);
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = Batch {
            in_batch: if first { 0 } else { std::ptr::from_mut(&mut token) as u64 },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        for i in 0..attr.count as usize {
            // SAFETY: the kernel filled `count` keys and values of the map's sizes, which are
            // those of the plain-data types `K` and `V`; unaligned reads of Pod types are sound.
            let entry = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * key_size).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * value_size).cast::<V>()),
                )
            };
            out.push(entry);
        }
        match result {
            Ok(_) => {}
            // The end of the map (the last entries came with it).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        first = false;
        token = next;
    }
}

/// `attr` of `BPF_MAP_LOOKUP_ELEM` and `BPF_MAP_UPDATE_ELEM`.
#[repr(C)]
struct Elem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Why a map's entries were not copied.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The two maps differ in type, key size or value size: their entries do not fit.
    #[error("{from} (type {}, key {} B, value {} B) and {to} (type {}, key {} B, value {} B) differ", .shapes.0.0, .shapes.0.1, .shapes.0.2, .shapes.1.0, .shapes.1.1, .shapes.1.2)]
    Layout { from: PathBuf, to: PathBuf, shapes: ((u32, u32, u32), (u32, u32, u32)) },
    /// Reading or writing failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// Copies every entry of the map pinned at `from` into the map pinned at `to`, byte for byte
/// (the two must have the same type, key and value sizes); with `only_missing`, entries `to`
/// already has are kept. Entries deleted during the copy are skipped, an entry that does not
/// fit (a full map) ends the copy with an error. Returns how many entries were written.
pub fn copy_map(from: &Path, to: &Path, only_missing: bool) -> Result<u64, CopyError> {
    let open = |path: &Path| -> Result<(MapData, aya::maps::MapInfo), KernelError> {
        let map = MapData::from_pin(path).map_err(|source| KernelError::Map { path: path.to_owned(), source })?;
        let info = map.info().map_err(|source| KernelError::Map { path: path.to_owned(), source })?;
        Ok((map, info))
    };
    let ((source, source_info), (target, target_info)) = (open(from)?, open(to)?);
    let shape = |i: &aya::maps::MapInfo| (i.map_type().map_or(u32::MAX, |t| t as u32), i.key_size(), i.value_size());
    if shape(&source_info) != shape(&target_info) {
        let shapes = (shape(&source_info), shape(&target_info));
        return Err(CopyError::Layout { from: from.to_owned(), to: to.to_owned(), shapes });
    }
    let (source_fd, target_fd) = (source.fd().as_fd().as_raw_fd() as u32, target.fd().as_fd().as_raw_fd() as u32);
    let mut value = vec![0u8; (source_info.value_size() as usize).max(1)];
    let flags = if only_missing { BPF_NOEXIST } else { BPF_ANY };
    let mut written = 0;
    walk_keys(from, &source, source_info.key_size(), u64::from(source_info.max_entries()), |key| {
        let mut lookup =
            Elem { map_fd: source_fd, _pad: 0, key: key.as_ptr() as u64, value: value.as_mut_ptr() as u64, flags: 0 };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut lookup) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(source) => return Err(KernelError::Bpf { call: "BPF_MAP_LOOKUP_ELEM", path: from.to_owned(), source }),
        }
        let mut update =
            Elem { map_fd: target_fd, _pad: 0, key: key.as_ptr() as u64, value: value.as_ptr() as u64, flags };
        match bpf(BPF_MAP_UPDATE_ELEM, &mut update) {
            Ok(_) => written += 1,
            Err(e) if only_missing && e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => return Err(KernelError::Bpf { call: "BPF_MAP_UPDATE_ELEM", path: to.to_owned(), source }),
        }
        Ok(())
    })?;
    Ok(written)
}
