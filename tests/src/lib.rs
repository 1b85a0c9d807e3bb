//! The end-to-end test bed: network namespaces as nodes and pods, test cgroups, pod servers,
//! clients, the agent as a real process, and a real HTTP test API server. Shared by the
//! integration tests in `tests/` and the demo (`cargo xtask demo`).

pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod cgroup;
pub mod client;
pub mod conformance;
pub mod fixtures;
pub mod netns;
pub mod pod;
pub mod topology;
