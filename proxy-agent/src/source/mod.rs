//! Where the cluster's objects come from. Every source (the manifest directory, the Kubernetes
//! API) sends the same [`Update`]s, so the model and the datapath cannot tell them apart.

pub mod kube;
pub mod manifests;
pub mod rbac;

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// An object and where it came from (a file and document, for log lines).
#[derive(Clone, Debug, PartialEq)]
pub struct Sourced<T> {
    /// The object.
    pub object: Arc<T>,
    /// `path (document N)` for the manifest directory; `None` for the API server.
    pub origin: Option<Arc<str>>,
}

impl<T> Sourced<T> {
    /// An object from the API server.
    pub fn api(object: T) -> Self {
        Self { object: Arc::new(object), origin: None }
    }
}

/// A change to one kind of object.
#[derive(Clone, Debug)]
pub enum Change<T> {
    /// The complete current set (a list, or a re-read of the directory): replaces everything
    /// known of this kind. Unchanged objects cause no work downstream.
    Replace(Vec<Sourced<T>>),
    /// One object added or modified.
    Apply(Sourced<T>),
    /// One object deleted, by `namespace/name`.
    Delete(String),
}

/// What a source sends to the sync loop.
#[derive(Clone, Debug)]
pub enum Update {
    /// Services changed.
    Services(Change<Service>),
    /// EndpointSlices changed.
    Slices(Change<EndpointSlice>),
    /// Nodes changed (only the agent's own node matters).
    Nodes(Change<Node>),
}
