//! Finding and preparing the kernel filesystems the datapath needs.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: all arguments are NUL-terminated strings or null.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
