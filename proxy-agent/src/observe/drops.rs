//! The datapath's drop counters: the pinned `drops` per-CPU array (one `u64` per reason and
//! CPU, `proxy_common::drop`), summed over CPUs. A read is one lookup per reason, whatever the
//! size of the other maps, so `/metrics` can read it on every scrape.

use std::{io, path::Path};

use aya::maps::{Map, MapData, MapError, PerCpuArray};
use proxy_common::drop;

/// Errors of reading the drop counters; each names the pin.
#[derive(Debug, thiserror::Error)]
pub enum DropsError {
    /// The map is not pinned there.
    #[error(
        "{}: no drop counters pinned there: the agent pins them at start-up (an agent older than the \
         `drops` map does not); restart a current agent with this --bpf-root",
        path.display()
    )]
    Missing {
        /// The pin.
        path: std::path::PathBuf,
    },
    /// Not allowed to open it.
    #[error("{}: reading the drop counters needs root (CAP_BPF and CAP_SYS_ADMIN)", path.display())]
    Permission {
        /// The pin.
        path: std::path::PathBuf,
    },
    /// The pin is not a per-CPU array of `u64`, or a lookup failed.
    #[error(
        "{}: {source} (`bpftool map show pinned {}` shows what is pinned there)",
        path.display(),
        path.display()
    )]
    Map {
        /// The pin.
        path: std::path::PathBuf,
        /// What aya reported.
        source: MapError,
    },
}

/// One reason's count, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DropCount {
    /// The reason's name (`proxy_common::drop::name`).
    pub reason: &'static str,
    /// Packets or socket calls dropped or refused for it since the map was created.
    pub count: u64,
}

/// Every reason this build knows, in code order, with its count from the map pinned at `path`.
pub fn read(path: &Path) -> Result<Vec<DropCount>, DropsError> {
    let map_error = |source: MapError| match &source {
        MapError::SyscallError(e) if e.io_error.kind() == io::ErrorKind::NotFound => {
            DropsError::Missing { path: path.to_owned() }
        }
        MapError::SyscallError(e) if matches!(e.io_error.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) => {
            DropsError::Permission { path: path.to_owned() }
        }
        _ => DropsError::Map { path: path.to_owned(), source },
    };
    if !path.exists() {
        return Err(DropsError::Missing { path: path.to_owned() });
    }
    let data = MapData::from_pin(path).map_err(map_error)?;
    let array: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_error)?;
    (0..drop::COUNT)
        .map(|reason| {
            let per_cpu = array.get(&reason, 0).map_err(map_error)?;
            Ok(DropCount { reason: drop::name(reason), count: per_cpu.iter().sum() })
        })
        .collect()
}
