//! The kernel side as the agent sees it: load the embedded BPF object, pin its maps under the
//! bpffs root, attach the programs, and write the maps (only through [`writer::Writer`]).

mod bpffs;
pub mod writer;

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError,
        links::{FdLink, PinnedLink},
    },
};
use proxy_common::{
    backend::{Backend, BackendId},
    maps,
    service::{ServiceKey, ServiceName, ServiceValue},
};
use tracing::{debug, info};

pub use self::bpffs::{ensure_bpffs, find_cgroup2_mount};
use self::writer::MapStore;

/// The BPF object, built by build.rs from `proxy-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy"));

/// The cgroup programs and their names in the object (also their link pin names).
const CGROUP_PROGRAMS: &[&str] = &["connect4"];

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
}

/// The loaded and attached datapath. Links are pinned, so the programs stay attached when the
/// agent exits (traffic keeps flowing) until `--cleanup` removes the pins.
pub struct Datapath {
    _ebpf: Ebpf,
    root: PathBuf,
}

impl Datapath {
    /// Loads the object, reusing maps already pinned under the root (an earlier agent's), and
    /// attaches the programs, replacing an earlier agent's links only once the new ones are in.
    pub fn load(opts: &LoadOptions) -> Result<(Self, AyaMaps), DatapathError> {
        ensure_bpffs(&opts.bpf_root).map_err(|source| DatapathError::Bpffs { path: opts.bpf_root.clone(), source })?;
        let links = opts.bpf_root.join("links");
        fs::create_dir_all(&links).map_err(|source| DatapathError::Bpffs { path: links.clone(), source })?;
        let pins: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|m| (*m, opts.bpf_root.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(maps::SERVICES, opts.services_max)
            .map_max_entries(maps::BACKENDS, opts.backends_max)
            .map_max_entries(maps::AFFINITY, opts.affinity_max)
            .map_max_entries(maps::SERVICE_NAMES, opts.services_max.min(maps::SERVICE_NAMES_MAX_ENTRIES));
        let mut ebpf = loader.load(OBJECT)?;
        let cgroup = fs::File::open(&opts.cgroup)
            .map_err(|source| DatapathError::Cgroup { path: opts.cgroup.clone(), source })?;
        for &name in CGROUP_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(ProgramError::UnexpectedProgramType)
                .and_then(TryInto::try_into)
                .map_err(|source| DatapathError::Program { name, source })?;
            program.load().map_err(|source| DatapathError::Program { name, source })?;
            let id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Program { name, source })?;
            let link = program.take_link(id).map_err(|source| DatapathError::Program { name, source })?;
            let link: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| DatapathError::Pin {
                path: links.join(name),
                detail: e.to_string(),
            })?;
            replace_pinned_link(link, &links.join(name))?;
            info!(program = name, cgroup = %opts.cgroup.display(), "attached");
        }
        let maps = AyaMaps::open(&mut ebpf)?;
        Ok((Self { _ebpf: ebpf, root: opts.bpf_root.clone() }, maps))
    }

    /// The bpffs root of this datapath.
    pub fn root(&self) -> &Path {
        &self.root
    }
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
    for &name in CGROUP_PROGRAMS {
        for path in [links.join(name), links.join(format!("{name}_new"))] {
            if path.exists() {
                // Unpinning the last reference detaches the link.
                if let Ok(link) = PinnedLink::from_pin(&path) {
                    let _ = link.unpin();
                } else {
                    fs::remove_file(&path)?;
                }
                removed += 1;
            }
        }
    }
    for name in maps::ALL {
        let path = root.join(name);
        if path.exists() {
            fs::remove_file(&path)?;
            removed += 1;
        }
    }
    for dir in [links.as_path(), root] {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        }
    }
    Ok(removed)
}

/// The service maps, written through [`writer::Writer`].
pub struct AyaMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendId, Backend>,
    names: HashMap<MapData, u32, ServiceName>,
}

impl AyaMaps {
    fn open(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        fn take<K: aya::Pod, V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<HashMap<MapData, K, V>, DatapathError> {
            let map = ebpf
                .take_map(name)
                .ok_or(DatapathError::Map { name, source: MapError::InvalidName { name: name.into() } })?;
            HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })
        }
        Ok(Self {
            services: take(ebpf, maps::SERVICES)?,
            backends: take(ebpf, maps::BACKENDS)?,
            names: take(ebpf, maps::SERVICE_NAMES)?,
        })
    }

    /// Opens the maps pinned under `root` (for tools that run beside the agent).
    pub fn from_pins(root: &Path) -> Result<Self, DatapathError> {
        fn open<K: aya::Pod, V: aya::Pod>(
            root: &Path,
            name: &'static str,
        ) -> Result<HashMap<MapData, K, V>, DatapathError> {
            let data = MapData::from_pin(root.join(name)).map_err(|source| DatapathError::Map { name, source })?;
            HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|source| DatapathError::Map { name, source })
        }
        Ok(Self {
            services: open(root, maps::SERVICES)?,
            backends: open(root, maps::BACKENDS)?,
            names: open(root, maps::SERVICE_NAMES)?,
        })
    }

    /// Every `services` entry.
    pub fn services(&self) -> impl Iterator<Item = (ServiceKey, ServiceValue)> + '_ {
        self.services.iter().filter_map(Result::ok)
    }

    /// Every `service_names` entry.
    pub fn service_names(&self) -> impl Iterator<Item = (u32, ServiceName)> + '_ {
        self.names.iter().filter_map(Result::ok)
    }

    /// Every `backends` entry.
    pub fn backends(&self) -> impl Iterator<Item = (BackendId, Backend)> + '_ {
        self.backends.iter().filter_map(Result::ok)
    }
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

    fn service_keys(&self) -> Vec<ServiceKey> {
        self.services.keys().filter_map(Result::ok).collect()
    }

    fn backend_ids(&self) -> Vec<BackendId> {
        self.backends.keys().filter_map(Result::ok).collect()
    }

    fn service_names(&self) -> Vec<(u32, ServiceName)> {
        self.service_names().collect()
    }
}
