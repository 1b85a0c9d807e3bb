//! Start-up checks: before the agent touches the kernel, it makes sure the machine gives it what
//! it needs, and if not, says in one line everything that is missing (instead of an `EPERM`
//! from deep inside the loader).
//!
//! - CAP_BPF (or CAP_SYS_ADMIN, which implies it) to create maps and load programs;
//! - CAP_NET_ADMIN to attach the cgroup and TC programs;
//! - a bpffs for the pins: `--bpf-root` on one, or a bpffs the agent can mount (the kernel
//!   supports it and the agent has CAP_SYS_ADMIN);
//! - a cgroup v2 mount (and `--cgroup-path`, when given, on it);
//! - the kernel's BTF at `/sys/kernel/btf/vmlinux` (CO-RE and BTF-described maps).
//!
//! Capabilities are read from `CapEff` in `/proc/self/status`: the effective set is what the
//! kernel checks, whatever the user id.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use crate::sys::fs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, is_fs};

/// `CAP_NET_ADMIN` from linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;
/// `CAP_SYS_ADMIN`.
const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_BPF` (Linux 5.8).
const CAP_BPF: u32 = 39;
/// Where the kernel publishes its own BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// One thing the agent needs and does not have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// The effective capabilities could not be read at all.
    Capabilities(String),
    /// Neither CAP_BPF nor CAP_SYS_ADMIN is effective.
    CapBpf,
    /// CAP_NET_ADMIN is not effective.
    CapNetAdmin,
    /// No bpffs at the root, and none can be mounted (the detail says why).
    Bpffs { root: PathBuf, detail: String },
    /// No cgroup v2 mount, or `--cgroup-path` is not on one.
    Cgroup2(String),
    /// The kernel's BTF is not there.
    Btf,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Capabilities(detail) => write!(f, "capabilities unknown ({detail})"),
            Missing::CapBpf => f.write_str("CAP_BPF or CAP_SYS_ADMIN (to load BPF programs and maps)"),
            Missing::CapNetAdmin => f.write_str("CAP_NET_ADMIN (to attach programs to cgroups and interfaces)"),
            Missing::Bpffs { root, detail } => write!(f, "bpffs for {} ({detail})", root.display()),
            Missing::Cgroup2(detail) => write!(f, "cgroup v2 ({detail})"),
            Missing::Btf => write!(f, "kernel BTF at {VMLINUX_BTF} (a kernel built with CONFIG_DEBUG_INFO_BTF=y)"),
        }
    }
}

/// The start-up check failed: everything missing, in one line.
#[derive(Debug, thiserror::Error)]
#[error(
    "preflight: missing {}; run the agent as root with these capabilities (in a cluster: a privileged \
     DaemonSet pod with the host's /sys/fs/bpf and cgroup2 mount)",
    list(.missing)
)]
pub struct PreflightError {
    /// What is missing, in the order checked.
    pub missing: Vec<Missing>,
}

fn list(missing: &[Missing]) -> String {
    missing.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Checks that the agent can load, pin and attach its programs: capabilities, a bpffs for
/// `bpf_root`, a cgroup v2 mount (with `cgroup` on it, when given) and the kernel's BTF.
pub fn check(bpf_root: &Path, cgroup: Option<&Path>) -> Result<(), PreflightError> {
    let facts = Facts {
        cap_eff: fs::read_to_string("/proc/self/status").map_err(|e| e.to_string()).and_then(|s| cap_eff(&s)),
        bpffs_supported: fs::read_to_string("/proc/filesystems").is_ok_and(|f| supports_bpffs(&f)),
        bpffs_at: nearest_existing(bpf_root).map(|dir| is_fs(&dir, BPF_FS_MAGIC).unwrap_or(false)),
        cgroup2_mounted: fs::read_to_string("/proc/mounts").is_ok_and(|m| has_cgroup2(&m)),
        cgroup_on_cgroup2: cgroup.map(|path| is_fs(path, CGROUP2_SUPER_MAGIC).map_err(|e| e.to_string())),
        btf: Path::new(VMLINUX_BTF).is_file(),
    };
    facts.judge(bpf_root, cgroup)
}

/// What [`check`] found on the machine (separate, so the judgement is testable).
#[derive(Clone, Debug)]
struct Facts {
    /// The effective capability set, or why it is unknown.
    cap_eff: Result<u64, String>,
    /// `/proc/filesystems` lists `bpf`.
    bpffs_supported: bool,
    /// Whether the root (or its nearest existing ancestor) is on a bpffs; `None` if nothing of
    /// the path exists.
    bpffs_at: Option<bool>,
    /// `/proc/mounts` has a cgroup2 mount.
    cgroup2_mounted: bool,
    /// Whether `--cgroup-path` is on cgroup2 (or why it cannot be told).
    cgroup_on_cgroup2: Option<Result<bool, String>>,
    /// `/sys/kernel/btf/vmlinux` is there.
    btf: bool,
}

impl Facts {
    fn judge(&self, bpf_root: &Path, cgroup: Option<&Path>) -> Result<(), PreflightError> {
        let mut missing = Vec::new();
        let has = |cap: u32| self.cap_eff.as_ref().is_ok_and(|set| set & (1 << cap) != 0);
        match &self.cap_eff {
            Err(detail) => missing.push(Missing::Capabilities(detail.clone())),
            Ok(_) => {
                if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
                    missing.push(Missing::CapBpf);
                }
                if !has(CAP_NET_ADMIN) {
                    missing.push(Missing::CapNetAdmin);
                }
            }
        }
        // The agent mounts a bpffs itself when the root is not on one (see `ensure_bpffs`).
        if self.bpffs_at != Some(true) {
            let detail = if !self.bpffs_supported {
                Some("the kernel has no bpf filesystem (CONFIG_BPF_SYSCALL)".to_owned())
            } else if !has(CAP_SYS_ADMIN) {
                Some("not on a bpffs, and mounting one needs CAP_SYS_ADMIN: mount -t bpf bpf /sys/fs/bpf".to_owned())
            } else {
                None
            };
            if let Some(detail) = detail {
                missing.push(Missing::Bpffs { root: bpf_root.to_owned(), detail });
            }
        }
        match (cgroup, &self.cgroup_on_cgroup2) {
            (Some(path), Some(Ok(false))) => {
                missing.push(Missing::Cgroup2(format!("--cgroup-path {} is not on a cgroup2 mount", path.display())))
            }
            (Some(path), Some(Err(e))) => {
                missing.push(Missing::Cgroup2(format!("--cgroup-path {}: {e}", path.display())))
            }
            (None, _) if !self.cgroup2_mounted => {
                missing.push(Missing::Cgroup2("no cgroup2 mount in /proc/mounts".into()))
            }
            _ => {}
        }
        if !self.btf {
            missing.push(Missing::Btf);
        }
        if missing.is_empty() { Ok(()) } else { Err(PreflightError { missing }) }
    }
}

/// The `CapEff` line of `/proc/<pid>/status`.
fn cap_eff(status: &str) -> Result<u64, String> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:")).ok_or("no CapEff in /proc/self/status")?;
    u64::from_str_radix(line.trim(), 16).map_err(|e| format!("CapEff {:?}: {e}", line.trim()))
}

/// Whether `/proc/filesystems` lists `bpf` (`nodev\tbpf`).
fn supports_bpffs(filesystems: &str) -> bool {
    filesystems.lines().any(|l| l.split_whitespace().last() == Some("bpf"))
}

/// Whether `/proc/mounts` has a mount of type cgroup2.
fn has_cgroup2(mounts: &str) -> bool {
    mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
}

/// `path`, or its nearest ancestor that exists.
fn nearest_existing(path: &Path) -> Option<PathBuf> {
    path.ancestors().find(|p| p.exists()).map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything the agent needs.
    fn all_there() -> Facts {
        Facts {
            cap_eff: Ok(1 << CAP_BPF | 1 << CAP_SYS_ADMIN | 1 << CAP_NET_ADMIN),
            bpffs_supported: true,
            bpffs_at: Some(true),
            cgroup2_mounted: true,
            cgroup_on_cgroup2: Some(Ok(true)),
            btf: true,
        }
    }

    fn missing(facts: Facts, cgroup: Option<&str>) -> Vec<Missing> {
        match facts.judge(Path::new("/sys/fs/bpf/proxy"), cgroup.map(Path::new)) {
            Ok(()) => Vec::new(),
            Err(e) => e.missing,
        }
    }

    #[test]
    fn each_requirement_is_named_when_missing() {
        let root = PathBuf::from("/sys/fs/bpf/proxy");
        let cases: Vec<(&str, Facts, Option<&str>, Vec<Missing>)> = vec![
            ("everything there", all_there(), Some("/sys/fs/cgroup/x"), vec![]),
            (
                "CAP_SYS_ADMIN stands in for CAP_BPF",
                Facts { cap_eff: Ok(1 << CAP_SYS_ADMIN | 1 << CAP_NET_ADMIN), ..all_there() },
                None,
                vec![],
            ),
            (
                "CAP_BPF alone will do with a bpffs there",
                Facts { cap_eff: Ok(1 << CAP_BPF | 1 << CAP_NET_ADMIN), ..all_there() },
                None,
                vec![],
            ),
            (
                "no capability at all",
                Facts { cap_eff: Ok(0), ..all_there() },
                None,
                vec![Missing::CapBpf, Missing::CapNetAdmin],
            ),
            (
                "no CAP_NET_ADMIN",
                Facts { cap_eff: Ok(1 << CAP_BPF | 1 << CAP_SYS_ADMIN), ..all_there() },
                None,
                vec![Missing::CapNetAdmin],
            ),
            (
                "unreadable capabilities",
                Facts { cap_eff: Err("no CapEff".into()), ..all_there() },
                None,
                vec![Missing::Capabilities("no CapEff".into())],
            ),
            ("no bpffs yet, but the agent may mount one", Facts { bpffs_at: Some(false), ..all_there() }, None, vec![]),
            (
                "no bpffs and no CAP_SYS_ADMIN to mount one",
                Facts { bpffs_at: Some(false), cap_eff: Ok(1 << CAP_BPF | 1 << CAP_NET_ADMIN), ..all_there() },
                None,
                vec![Missing::Bpffs {
                    root: root.clone(),
                    detail: "not on a bpffs, and mounting one needs CAP_SYS_ADMIN: mount -t bpf bpf /sys/fs/bpf".into(),
                }],
            ),
            (
                "a kernel without bpffs",
                Facts { bpffs_at: Some(false), bpffs_supported: false, ..all_there() },
                None,
                vec![Missing::Bpffs {
                    root: root.clone(),
                    detail: "the kernel has no bpf filesystem (CONFIG_BPF_SYSCALL)".into(),
                }],
            ),
            (
                "no cgroup2 mount",
                Facts { cgroup2_mounted: false, cgroup_on_cgroup2: None, ..all_there() },
                None,
                vec![Missing::Cgroup2("no cgroup2 mount in /proc/mounts".into())],
            ),
            (
                "--cgroup-path on cgroup v1",
                Facts { cgroup_on_cgroup2: Some(Ok(false)), ..all_there() },
                Some("/sys/fs/cgroup/cpu"),
                vec![Missing::Cgroup2("--cgroup-path /sys/fs/cgroup/cpu is not on a cgroup2 mount".into())],
            ),
            (
                "--cgroup-path that does not exist",
                Facts { cgroup_on_cgroup2: Some(Err("No such file or directory (os error 2)".into())), ..all_there() },
                Some("/nowhere"),
                vec![Missing::Cgroup2("--cgroup-path /nowhere: No such file or directory (os error 2)".into())],
            ),
            ("no kernel BTF", Facts { btf: false, ..all_there() }, None, vec![Missing::Btf]),
        ];
        for (rule, facts, cgroup, want) in cases {
            assert_eq!(missing(facts, cgroup), want, "{rule}");
        }
    }

    #[test]
    fn the_error_is_one_line_naming_everything_missing() {
        let facts = Facts { cap_eff: Ok(0), btf: false, ..all_there() };
        let error = facts.judge(Path::new("/sys/fs/bpf/proxy"), None).unwrap_err().to_string();
        assert!(!error.contains('\n'), "{error}");
        for name in ["CAP_BPF or CAP_SYS_ADMIN", "CAP_NET_ADMIN", "/sys/kernel/btf/vmlinux"] {
            assert!(error.contains(name), "{error} names {name}");
        }
        assert!(error.starts_with("preflight: missing "), "{error}");
    }

    #[test]
    fn reads_the_effective_set_from_proc_status() {
        let status = "Name:\tproxy-agent\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t0000008000001000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(cap_eff(status), Ok(1 << CAP_BPF | 1 << CAP_NET_ADMIN));
        assert!(cap_eff("Name:\tx\n").is_err());
        assert!(cap_eff("CapEff:\tzz\n").is_err());
        assert!(supports_bpffs("nodev\tsysfs\nnodev\tbpf\n"));
        assert!(!supports_bpffs("nodev\tsysfs\n\text4\n"));
        assert!(has_cgroup2("cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n"));
        assert!(!has_cgroup2("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"));
    }

    /// On the machine the tests run on (as root, with BTF): nothing is missing.
    #[test]
    fn this_machine_as_root_passes() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let root = Path::new("/sys/fs/bpf/proxy-preflight-test-never-created");
        check(root, None).unwrap();
        assert!(!root.exists(), "the check creates nothing");
    }
}
