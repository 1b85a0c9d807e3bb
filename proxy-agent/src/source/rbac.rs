//! What the Kubernetes API source does with the API, as RBAC rules: the least privilege the
//! agent's ClusterRole must grant. Groups and resources come from the same k8s-openapi types
//! [`super::kube`] watches, and the verbs from how it reads them (a kube-runtime watcher: an
//! initial list, then a watch). `tests/tests/deploy.rs` checks the ClusterRole in `deploy/`
//! against this table, and this table against the requests the source really makes of a test
//! API server, so none of the three can drift silently.

use k8s_openapi::{
    Resource,
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
};

/// The verbs of a kube-runtime `watcher`: it lists, then watches from the list's version.
pub const WATCHER_VERBS: &[&str] = &["list", "watch"];

/// One RBAC rule: verbs on one resource of one API group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The API group (`""` for the core group).
    pub api_group: &'static str,
    /// The resource, plural (`services`).
    pub resource: &'static str,
    /// The verbs used, sorted.
    pub verbs: &'static [&'static str],
}

const fn watched<K: Resource>() -> Access {
    Access { api_group: K::GROUP, resource: K::URL_PATH_SEGMENT, verbs: WATCHER_VERBS }
}

/// The verbs of kube-runtime's event `Recorder`: it creates an Event, and patches its series
/// when the same one recurs.
pub const EVENT_VERBS: &[&str] = &["create", "patch"];

/// The verbs on Nodes: watched, and this node's own patched (a merge patch setting, or on
/// `--cleanup` removing, the direct server return annotation, `crate::dsr::DSR_ANNOTATION`).
pub const NODE_VERBS: &[&str] = &["list", "patch", "watch"];

/// Everything the Kubernetes API source does: watch Services and EndpointSlices in every
/// namespace, and Nodes (its own by a field selector on its name, which RBAC cannot narrow, or
/// all of them under `--lb-mode dsr|hybrid`); annotate its own Node as taking direct server
/// return; post Events (`events.k8s.io`) on Services it cannot program. It writes nothing else.
pub const ACCESS: &[Access] = &[
    watched::<Service>(),
    watched::<EndpointSlice>(),
    Access { api_group: Node::GROUP, resource: Node::URL_PATH_SEGMENT, verbs: NODE_VERBS },
    Access { api_group: "events.k8s.io", resource: "events", verbs: EVENT_VERBS },
];
