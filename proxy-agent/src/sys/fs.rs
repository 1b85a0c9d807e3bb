//! Filesystems: which one a path is on (`statfs`), mounting a bpffs, and the monotonic clock.

use std::{ffi::CString, io, os::unix::ffi::OsStrExt, path::Path};

/// `BPF_FS_MAGIC` from linux/magic.h.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: NUL in path", path.display())))
}

/// Whether `path` is on a filesystem with this magic number (`statfs`'s `f_type`).
pub fn is_fs(path: &Path, magic: i64) -> io::Result<bool> {
    let c = c_path(path)?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a writable struct of the type statfs fills.
    if unsafe { libc::statfs(c.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as i64 == magic)
}

/// Mounts a bpffs on `path`.
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: every argument is a NUL-terminated string or null (no mount data).
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> io::Result<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}
