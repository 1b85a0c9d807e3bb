//! The proxy agent: watches Services, EndpointSlices and its Node and keeps the eBPF service
//! maps current. A pipeline with one room per stage:
//!
//! - [`source`]: where objects come from (a manifest directory, the Kubernetes API);
//! - [`model`]: the pure desired state (no I/O);
//! - [`maglev`]: Maglev consistent-hashing tables, built from a backend set (pure);
//! - [`sync`]: change tracking and the diff, feeding the writer;
//! - [`datapath`]: loading and attaching the BPF object, and the map writer (the only code that
//!   touches the maps);
//! - [`metrics`]: what the agent reports;
//! - `tasks`: the long-running tasks, whose first end stops the agent;
//! - [`inspect`]: `inspect` and `explain`, reading the pinned maps;
//! - [`trace`]: `trace`, every translation and drop live from the datapath's ring buffer;
//! - [`kube_proxy`]: moving off kube-proxy (its config file, finding and removing its rules);
//! - [`observe`]: the `/healthz` and `/metrics` servers, answered from the kernel's state;
//! - [`sys`]: the raw Linux calls (bpf(), namespaces, interfaces, statfs), each once.

pub mod cli;
pub mod datapath;
pub mod dsr;
pub mod inspect;
pub mod kube_proxy;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod observe;
pub(crate) mod preflight;
pub mod source;
pub mod sync;
pub mod sys;
pub(crate) mod tasks;
pub mod trace;

/// `error` with its sources, joined by `: ` (aya and the writer keep the errno in a source).
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
