//! The agent as a process: how it stops when it cannot go on (a non-zero status and the cause
//! in the log, so a DaemonSet restarts it) and how it writes its log (plain text to a pipe,
//! JSON lines on request). Each agent runs in a namespace and cgroup of its own.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use proxy_tests::{
    agent::{Agent, LogLine},
    cgroup::Cgroup,
    netns::Netns,
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const WAIT: Duration = Duration::from_secs(20);
const NO_SERVERS: [&str; 2] = ["--healthz-bind-address=", "--metrics-bind-address="];

/// An empty manifest directory, removed on drop.
struct EmptyManifests(PathBuf);

impl EmptyManifests {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("proxy-process-manifests-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the manifest directory");
        Self(dir)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for EmptyManifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent's ERROR lines.
fn errors(agent: &Agent) -> Vec<LogLine> {
    agent.lines().into_iter().filter(|l| l.level == "ERROR").collect()
}

/// Defect 1 (issue 13): a task that ended was ignored (a panicked sync loop exited with status
/// 0, its JoinError dropped), so a DaemonSet would not restart the agent. Now the first task to
/// end stops the agent with a failure status and the cause: here the manifest source, failing
/// when its directory is removed, named in the log. (A panicking task takes the same path:
/// `tasks.rs`'s unit tests.)
#[test]
fn a_failing_source_stops_the_agent_with_a_failure_status_and_the_cause() {
    let node = Netns::new("procsource").expect("a namespace");
    let cgroup = Cgroup::new("proxy-procsource").expect("a cgroup");
    let manifests = EmptyManifests::new();
    let flags = [&NO_SERVERS[..], &["--manifests", manifests.arg(), "--hostname-override", "node-1"]].concat();
    let mut agent = Agent::start_in(Some(&node), Path::new(AGENT), cgroup.path(), &flags).expect("starting");
    std::fs::remove_dir_all(&manifests.0).expect("removing the manifest directory");
    let status = agent.wait_for_exit(WAIT).expect("the agent stops");
    assert_eq!(status.code(), Some(1), "a failure status:\n{}", agent.log());
    let last = errors(&agent).pop().expect("an error line");
    assert!(last.message.starts_with("the source task failed: "), "{last:?}");
    assert!(last.message.contains(manifests.arg()), "the directory is named: {last:?}");
}

/// Defect 6 (issue 13): with a blank host name and no `--hostname-override` the node name was
/// empty, so no endpoint was local and all `externalTrafficPolicy: Local` traffic from outside
/// was dropped. The agent now refuses to start and says which flag to pass. The host name is
/// blanked in a UTS namespace of the agent's own.
#[test]
fn a_blank_host_name_stops_the_agent_at_start_naming_the_flag() {
    let node = Netns::new("prochost").expect("a namespace");
    let cgroup = Cgroup::new("proxy-prochost").expect("a cgroup");
    let manifests = EmptyManifests::new();
    let blank_hostname =
        ["unshare", "--uts", "sh", "-c", "printf ' ' > /proc/sys/kernel/hostname && exec \"$0\" \"$@\""];
    let flags = [&NO_SERVERS[..], &["--manifests", manifests.arg()]].concat();
    let mut agent =
        Agent::launch(Some(&node), &blank_hostname, Path::new(AGENT), cgroup.path(), &flags).expect("starting");
    let status = agent.wait_for_exit(WAIT).expect("the agent stops");
    assert_eq!(status.code(), Some(1), "a failure status:\n{}", agent.log());
    let last = errors(&agent).pop().expect("an error line");
    assert!(
        last.message.contains("/proc/sys/kernel/hostname is empty - pass --hostname-override"),
        "the line says what to do: {last:?}"
    );
    assert!(agent.lines().iter().all(|l| l.message != "datapath ready"), "nothing was loaded:\n{}", agent.log());
}

/// `proxy-agent --cleanup` on a root that holds nothing, with `extra` flags, stderr to a pipe
/// and `NO_COLOR` unset (as under a container runtime).
fn cleanup_logging(extra: &[&str]) -> Output {
    let root = format!("/sys/fs/bpf/proxy-test-logs-{}", std::process::id());
    let output = Command::new(AGENT)
        .args(["--cleanup", "--bpf-root", &root])
        .args(extra)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("running the agent");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    output
}

/// Defect 9 (issue 13): the text log carried ANSI colour codes on a file or a pipe (`kubectl
/// logs` shows them raw). To a pipe it is plain now.
#[test]
fn the_text_log_to_a_pipe_has_no_colour_codes() {
    let output = cleanup_logging(&[]);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("INFO") && log.contains("cleaned up"), "{log}");
    assert!(!output.stderr.contains(&0x1b), "no escape byte: {log:?}");
}

/// `--log-format json`: every line is one JSON object with the level, the target, the message
/// and the named fields, for log shippers.
#[test]
fn json_log_lines_parse_with_their_fields() {
    let output = cleanup_logging(&["--log-format", "json"]);
    let log = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = log.lines().collect();
    let parsed: Vec<LogLine> = lines.iter().filter_map(|l| LogLine::parse(l)).collect();
    assert_eq!(parsed.len(), lines.len(), "every line is a JSON log line: {log}");
    let done = parsed.iter().find(|l| l.message == "cleaned up").expect("the cleanup's line");
    assert_eq!((done.level.as_str(), done.target.as_str()), ("INFO", "proxy_agent::cli"), "{done:?}");
    assert_eq!(done.field("removed").and_then(serde_json::Value::as_u64), Some(0), "{done:?}");
    let root = format!("/sys/fs/bpf/proxy-test-logs-{}", std::process::id());
    assert_eq!(done.text("bpf_root"), Some(root.as_str()), "{done:?}");
}
