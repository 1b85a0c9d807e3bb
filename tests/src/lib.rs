//! The end-to-end test bed: network namespaces as nodes and pods, test cgroups, pod servers,
//! clients, the agent as a real process, and a real HTTP test API server. Shared by the
//! integration tests in `tests/`, the demo (`cargo xtask demo`) and the benchmarks (the
//! `proxy-bench` crate in `bench/`).

pub mod agent;
pub mod apiserver;
pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod conformance;
pub mod fixtures;
pub mod frames;
pub mod kube_proxy_rules;
pub mod netns;
pub mod pod;
pub mod topology;
pub mod trace;

use std::time::{Duration, Instant};

/// Polls `done` every 10 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
