//! The `bpf()` commands the agent issues itself, asked the way `bpftool` asks: a pinned object
//! (`BPF_OBJ_GET`), a map's or link's info (`BPF_OBJ_GET_INFO_BY_FD`), the programs attached to
//! a cgroup or interface (`BPF_PROG_QUERY`), and a pinned map's entries, read in batches
//! (`BPF_MAP_LOOKUP_BATCH`, thousands per call) or key by key where the map type has no batch
//! reads. aya 0.14 keeps the link info's attachment fields and the query private, and its map
//! iterators cost two calls per entry, hence these raw calls.
//!
//! Every call is counted per thread ([`calls_on_this_thread`]), so tests can show what a code
//! path costs in system calls.

use std::{
    cell::Cell,
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

/// `enum bpf_cmd` values (linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_MAP_UPDATE_ELEM` flags.
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// `enum bpf_map_type` values the reader treats specially.
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;

/// `enum bpf_link_type` values.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// Entries read from a hash map and the bucket cursor to read on from (`None`: the end).
pub type Range<K, V> = (Vec<(K, V)>, Option<u64>);

/// Entries per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: usize = 4096;

thread_local! {
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

/// How many `bpf()` calls this module has made on the calling thread.
pub fn calls_on_this_thread() -> u64 {
    CALLS.get()
}

/// A failed `bpf()` command on a pinned object.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The command failed; `path` is the pin it was about.
    #[error("{call} on {path}: {source}")]
    Call { call: &'static str, path: PathBuf, source: io::Error },
    /// The map's key or value size is not that of the types it is read as (an agent of another
    /// version pinned it).
    #[error(
        "{path}: key {key} B and value {value} B, expected {want_key} B and {want_value} B (pinned by another version? restart the agent, or run --cleanup)"
    )]
    Size { path: PathBuf, key: u32, value: u32, want_key: u32, want_value: u32 },
    /// A per-CPU map: a lookup returns one value per possible CPU, which this reader does not
    /// size its buffers for.
    #[error("{path} is a per-CPU map (type {map_type}): read it with aya's per-CPU map types")]
    PerCpu { path: PathBuf, map_type: u32 },
    /// Two maps differ in type, key size or value size: entries of one do not fit the other.
    #[error("{from} (type {}, key {} B, value {} B) and {to} (type {}, key {} B, value {} B) differ", .shapes.0.0, .shapes.0.1, .shapes.0.2, .shapes.1.0, .shapes.1.1, .shapes.1.2)]
    Layout { from: PathBuf, to: PathBuf, shapes: ((u32, u32, u32), (u32, u32, u32)) },
}

impl BpfError {
    /// The OS error behind this one, if any (`EPERM`, `ENOENT`, ...).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Call { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Runs one bpf() command on `attr`, a `#[repr(C)]` prefix of `union bpf_attr`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    CALLS.set(CALLS.get() + 1);
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

/// Opens the object (map, link, program) pinned at `path`.
pub fn obj_get(path: &Path) -> Result<OwnedFd, BpfError> {
    let error = |source| BpfError::Call { call: "BPF_OBJ_GET", path: path.to_owned(), source };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| error(io::Error::new(io::ErrorKind::InvalidInput, "NUL in path")))?;
    let mut attr = ObjGet { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(BPF_OBJ_GET, &mut attr).map_err(error)?;
    let fd = i32::try_from(fd).map_err(|e| error(io::Error::other(e)))?;
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

/// Fills `info` (a `#[repr(C)]` prefix of the kernel's info struct for `fd`'s object type).
fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = ObjInfo {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: std::ptr::from_mut(info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
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

/// A link's info.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// The link id (`bpftool link show id N`).
    pub id: u32,
    /// The program it runs.
    pub prog_id: u32,
    /// Where it attaches.
    pub attachment: Attachment,
}

/// The info of the link `fd`.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut raw = RawLinkInfo { link_type: 0, id: 0, prog_id: 0, _pad: 0, union: [0; 64] };
    obj_info(fd, &mut raw)?;
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

/// `attr.link_detach` of `BPF_LINK_DETACH`.
#[repr(C)]
struct LinkDetach {
    link_fd: u32,
}

/// Detaches the link `fd` now (its program stops running where it was attached), whoever else
/// holds the link: unlike dropping the last reference, which the kernel finishes later.
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    bpf(BPF_LINK_DETACH, &mut LinkDetach { link_fd: fd.as_raw_fd() as u32 }).map(drop)
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

/// The ids of the programs attached directly (not inherited) to `target` (a cgroup fd, or an
/// interface index for TCX) for `attach_type`.
pub fn prog_query(target: u32, attach_type: u32) -> io::Result<Vec<u32>> {
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

/// The head of `struct bpf_map_info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(8))]
pub struct MapInfo {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    /// The map id (`bpftool map show id N`).
    pub id: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// `max_entries`.
    pub max_entries: u32,
    /// `map_flags`.
    pub map_flags: u32,
}

/// `attr` of `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
struct NextKey {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
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

/// Writes `values` into the `u64` array map `fd` at indexes `0..values.len()` with
/// `BPF_MAP_UPDATE_BATCH`: one call for a whole Maglev table where element updates would take
/// one each (8 192 for the default size).
pub fn fill_u64_array(fd: BorrowedFd<'_>, values: &[u64]) -> io::Result<()> {
    let keys: Vec<u32> = (0..values.len() as u32).collect();
    update_batch(fd, &keys, values)
}

/// Inserts or replaces `keys[i]` → `values[i]` in map `fd`, in order, with
/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6 and later): one call for the lot. `K` and `V` must be
/// the map's key and value layouts. On an error (`E2BIG`: the map is full), the entries before
/// the failing one are written.
pub fn update_batch<K: Copy, V: Copy>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut done = 0;
    while done < keys.len() {
        let mut attr = Batch {
            in_batch: 0,
            out_batch: 0,
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let result = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        // The kernel says how many it wrote, also when it stops early.
        done += attr.count as usize;
        result?;
        if attr.count == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
    }
    Ok(())
}

/// The `u64` at `index` of array map `fd` (`BPF_MAP_LOOKUP_ELEM`); `None` past its end.
pub fn lookup_u64(fd: BorrowedFd<'_>, index: u32) -> io::Result<Option<u64>> {
    let mut value = 0u64;
    let mut attr = Elem {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(&index) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A map opened from its pin: the one reader of pinned maps (the writer's second handle, inspect,
/// `/metrics` and upgrades all read through it).
#[derive(Debug)]
pub struct PinnedMap {
    path: PathBuf,
    fd: OwnedFd,
    info: MapInfo,
}

impl PinnedMap {
    /// Opens the map pinned at `path`. The error keeps the OS error (`EPERM` without CAP_BPF,
    /// `ENOENT`, `EINVAL` for a file that is not a BPF object) and the path.
    pub fn open(path: &Path) -> Result<Self, BpfError> {
        let fd = obj_get(path)?;
        let mut info = MapInfo::default();
        // A pinned link or program answers too, but with another struct: check the type of object.
        obj_info(fd.as_fd(), &mut info).map_err(|source| BpfError::Call {
            call: "BPF_OBJ_GET_INFO_BY_FD",
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { path: path.to_owned(), fd, info })
    }

    /// Where it is pinned.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its type and sizes.
    pub fn info(&self) -> MapInfo {
        self.info
    }

    /// A second descriptor of the map (for an aya handle on the same map).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    fn error(&self, call: &'static str) -> impl FnOnce(io::Error) -> BpfError + '_ {
        move |source| BpfError::Call { call, path: self.path.clone(), source }
    }

    /// Whether `K` and `V` have the sizes of the map's key and value.
    fn check_sizes<K, V>(&self) -> Result<(), BpfError> {
        let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
        if (key_size, value_size) != (self.info.key_size as usize, self.info.value_size as usize) {
            return Err(BpfError::Size {
                path: self.path.clone(),
                key: self.info.key_size,
                value: self.info.value_size,
                want_key: key_size as u32,
                want_value: value_size as u32,
            });
        }
        Ok(())
    }

    /// Every entry, as `K` and `V`, which must be the map's key and value types (plain
    /// `#[repr(C)]` data, as every type of `proxy_common` is; the sizes are checked).
    pub fn entries<K: aya::Pod, V: aya::Pod>(&self) -> Result<Vec<(K, V)>, BpfError> {
        self.check_sizes::<K, V>()?;
        let mut out = Vec::new();
        self.for_each(|key, value| out.push((read_pod(key), read_pod(value))))?;
        Ok(out)
    }

    /// About `max` entries of a hash map from bucket cursor `from` (`None`: the first bucket),
    /// and the cursor to go on from (`None`: the last bucket was read). Whole buckets, so a
    /// few more than `max` may come; a map read this way over several calls shows every entry
    /// that stayed in it once. `BPF_MAP_LOOKUP_BATCH` only: other map types, or a kernel
    /// without it, fail.
    pub fn entries_from<K: aya::Pod, V: aya::Pod>(
        &self,
        from: Option<u64>,
        max: usize,
    ) -> Result<Range<K, V>, BpfError> {
        self.check_sizes::<K, V>()?;
        let mut out = Vec::new();
        let mut cursor = from;
        while out.len() < max {
            // At least a few buckets' worth per call (a bucket holds a handful of entries).
            let count = (max - out.len()).clamp(64, BATCH);
            cursor = self.batch_from(cursor, count, &mut |key, value| out.push((read_pod(key), read_pod(value))))?;
            if cursor.is_none() {
                break;
            }
        }
        Ok((out, cursor))
    }

    /// How many entries the map holds (an array: its size). Batch reads for hash maps
    /// (`entries / 4096 + 1` calls), a walk of the keys alone for the others.
    pub fn count(&self) -> Result<u64, BpfError> {
        let mut count = 0u64;
        match self.info.map_type {
            BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY => return Ok(u64::from(self.info.max_entries)),
            BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_LRU_HASH => self.for_each(|_, _| count += 1)?,
            _ => self.walk_keys(|_| {
                count += 1;
                Ok(())
            })?,
        }
        Ok(count)
    }

    /// Calls `f` with every entry's key and value bytes: in batches for hash maps, key by key
    /// for the other types (and for a kernel without batch reads). Not for per-CPU maps, whose
    /// values are one per CPU.
    fn for_each(&self, mut f: impl FnMut(&[u8], &[u8])) -> Result<(), BpfError> {
        if matches!(
            self.info.map_type,
            BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_LRU_PERCPU_HASH
        ) {
            return Err(BpfError::PerCpu { path: self.path.clone(), map_type: self.info.map_type });
        }
        if matches!(self.info.map_type, BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_LRU_HASH) {
            match self.for_each_batch(&mut f) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {}
                other => return other,
            }
        }
        let mut value = vec![0u8; (self.info.value_size as usize).max(1)];
        self.walk_keys(|key| {
            if self.lookup(key, &mut value)? {
                f(key, &value);
            }
            Ok(())
        })
    }

    /// `BPF_MAP_LOOKUP_BATCH` over a hash map.
    fn for_each_batch(&self, f: &mut impl FnMut(&[u8], &[u8])) -> Result<(), BpfError> {
        let mut cursor = None;
        loop {
            cursor = self.batch_from(cursor, BATCH, f)?;
            if cursor.is_none() {
                return Ok(());
            }
        }
    }

    /// One `BPF_MAP_LOOKUP_BATCH` call of up to `count` (at most [`BATCH`]) entries from bucket
    /// cursor `from` (`None`: the start) over a hash map; returns the cursor to go on from,
    /// `None` at the end.
    fn batch_from(
        &self,
        from: Option<u64>,
        count: usize,
        f: &mut impl FnMut(&[u8], &[u8]),
    ) -> Result<Option<u64>, BpfError> {
        let (key_size, value_size) = (self.info.key_size as usize, self.info.value_size as usize);
        let count = count.min(BATCH);
        let mut keys = vec![0u8; count * key_size];
        let mut values = vec![0u8; count * value_size];
        // The batch token: a bucket index for hash maps.
        let (mut token, mut next) = (from.unwrap_or_default(), 0u64);
        let mut attr = Batch {
            in_batch: if from.is_none() { 0 } else { std::ptr::from_mut(&mut token) as u64 },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: count as u32,
            map_fd: self.fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        if count < BATCH && result.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::ENOSPC)) {
            // The next bucket holds more than `count` entries: read it with room to spare.
            return self.batch_from(from, BATCH, f);
        }
        // With ENOENT (the end of the map) the last entries come along.
        let filled = if result.is_ok() || result.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::ENOENT)) {
            (attr.count as usize).min(count)
        } else {
            0
        };
        for i in 0..filled {
            f(&keys[i * key_size..(i + 1) * key_size], &values[i * value_size..(i + 1) * value_size]);
        }
        match result {
            Ok(_) => Ok(Some(next)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(self.error("BPF_MAP_LOOKUP_BATCH")(e)),
        }
    }

    /// The value of `key` into `value`; false when there is none (deleted meanwhile).
    fn lookup(&self, key: &[u8], value: &mut [u8]) -> Result<bool, BpfError> {
        let mut attr = Elem {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(self.error("BPF_MAP_LOOKUP_ELEM")(e)),
        }
    }

    /// Calls `f` with every key (`BPF_MAP_GET_NEXT_KEY`). A key deleted under the walk restarts
    /// it from the top: bounded to twice `max_entries` steps.
    fn walk_keys(&self, mut f: impl FnMut(&[u8]) -> Result<(), BpfError>) -> Result<(), BpfError> {
        let key_size = (self.info.key_size as usize).max(1);
        let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
        let mut first = true;
        for _ in 0..=2 * u64::from(self.info.max_entries) {
            let mut attr = NextKey {
                map_fd: self.fd.as_raw_fd() as u32,
                _pad: 0,
                key: if first { 0 } else { key.as_ptr() as u64 },
                next_key: next.as_mut_ptr() as u64,
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {
                    first = false;
                    std::mem::swap(&mut key, &mut next);
                    f(&key)?;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(e) => return Err(self.error("BPF_MAP_GET_NEXT_KEY")(e)),
            }
        }
        Ok(())
    }

    /// Copies every entry into `to`, byte for byte (the two must have the same type, key and
    /// value sizes); with `only_missing`, entries `to` already has are kept. An entry that does
    /// not fit (a full map) ends the copy with an error. Returns how many entries were written.
    pub fn copy_to(&self, to: &PinnedMap, only_missing: bool) -> Result<u64, BpfError> {
        let shape = |i: &MapInfo| (i.map_type, i.key_size, i.value_size);
        if shape(&self.info) != shape(&to.info) {
            return Err(self.layout_error(to));
        }
        self.copy_with(to, only_missing, |key, value, new_key, new_value| {
            new_key.extend_from_slice(key);
            new_value.extend_from_slice(value);
        })
    }

    /// Copies every entry into `to` as [`PinnedMap::copy_to`] does, converted by `convert` from
    /// this map's key and value types `K`, `V` to `to`'s `K2`, `V2` (an upgrade across a layout
    /// change). Both maps must be of one type, with exactly those sizes.
    pub fn copy_converted<K: aya::Pod, V: aya::Pod, K2: aya::Pod, V2: aya::Pod>(
        &self,
        to: &PinnedMap,
        only_missing: bool,
        convert: impl Fn(K, V) -> (K2, V2),
    ) -> Result<u64, BpfError> {
        let sizes = |i: &MapInfo| (i.key_size as usize, i.value_size as usize);
        if self.info.map_type != to.info.map_type
            || sizes(&self.info) != (size_of::<K>(), size_of::<V>())
            || sizes(&to.info) != (size_of::<K2>(), size_of::<V2>())
        {
            return Err(self.layout_error(to));
        }
        self.copy_with(to, only_missing, |key, value, new_key, new_value| {
            let (key, value) = convert(read_pod(key), read_pod(value));
            new_key.extend_from_slice(pod_bytes(&key));
            new_value.extend_from_slice(pod_bytes(&value));
        })
    }

    /// The error for copying between this map and `to` when their entries do not fit.
    pub fn layout_error(&self, to: &PinnedMap) -> BpfError {
        let shape = |i: &MapInfo| (i.map_type, i.key_size, i.value_size);
        BpfError::Layout { from: self.path.clone(), to: to.path.clone(), shapes: (shape(&self.info), shape(&to.info)) }
    }

    /// Writes every entry into `to` as `entry` makes it from this map's key and value bytes
    /// (into the two cleared buffers it is given, sized for `to`).
    fn copy_with(
        &self,
        to: &PinnedMap,
        only_missing: bool,
        mut entry: impl FnMut(&[u8], &[u8], &mut Vec<u8>, &mut Vec<u8>),
    ) -> Result<u64, BpfError> {
        let flags = if only_missing { BPF_NOEXIST } else { BPF_ANY };
        let (mut key, mut value) = (Vec::new(), Vec::new());
        let mut written = 0;
        let mut result = Ok(());
        self.for_each(|old_key, old_value| {
            if result.is_err() {
                return;
            }
            key.clear();
            value.clear();
            entry(old_key, old_value, &mut key, &mut value);
            debug_assert_eq!((key.len(), value.len()), (to.info.key_size as usize, to.info.value_size as usize));
            let mut update = Elem {
                map_fd: to.fd.as_raw_fd() as u32,
                _pad: 0,
                key: key.as_ptr() as u64,
                value: value.as_ptr() as u64,
                flags,
            };
            match bpf(BPF_MAP_UPDATE_ELEM, &mut update) {
                Ok(_) => written += 1,
                Err(e) if only_missing && e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => result = Err(to.error("BPF_MAP_UPDATE_ELEM")(e)),
            }
        })?;
        result.map(|()| written)
    }
}

/// A `T` read from `bytes`, which hold exactly its size (checked by the callers against the
/// map's key and value sizes).
fn read_pod<T: aya::Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), size_of::<T>(), "a map entry read as a type of another size");
    // SAFETY: `bytes` holds `size_of::<T>()` bytes (asserted), `T` is plain data for which any
    // bytes are a value (`aya::Pod`), and the read is unaligned.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// The bytes of a plain-data value, as the kernel takes them.
fn pod_bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `T` is plain data with every padding byte an explicit field (`aya::Pod`), so all
    // `size_of::<T>()` bytes behind the reference are initialised, and they live as long as it.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }
}

impl AsFd for PinnedMap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
