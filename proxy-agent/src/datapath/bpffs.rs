//! Finding and preparing the kernel filesystems the datapath needs.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::sys::fs::{BPF_FS_MAGIC, is_fs, mount_bpffs};

fn is_bpffs(path: &Path) -> io::Result<bool> {
    is_fs(path, BPF_FS_MAGIC)
}

/// Makes `root` a directory on a bpffs: created inside an existing bpffs, or with bpffs mounted
/// on its parent (`/sys/fs/bpf` at boot) or on itself when nothing else works.
pub fn ensure_bpffs(root: &Path) -> io::Result<()> {
    if fs::create_dir_all(root).is_err()
        && let Some(parent) = root.parent()
        && parent.is_dir()
        && !is_bpffs(parent)?
    {
        mount_bpffs(parent)?;
        fs::create_dir_all(root)?;
    }
    if !is_bpffs(root)? {
        mount_bpffs(root)?;
    }
    Ok(())
}

/// The first cgroup v2 mount in /proc/mounts (`/sys/fs/cgroup` on most nodes).
pub fn find_cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"cgroup2"))
        .and_then(|fields| fields.get(1).map(PathBuf::from))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount in /proc/mounts"))
}
