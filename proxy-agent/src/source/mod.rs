//! Where the cluster's objects come from. Every source (the manifest directory, the Kubernetes
//! API) sends the same [`Update`]s, so the model and the datapath cannot tell them apart.

pub mod kube;
pub mod manifests;
pub mod rbac;

use crate::{dsr::DSR_ANNOTATION, maglev::LB_ALGORITHM_ANNOTATION};
use std::sync::Arc;

use k8s_openapi::{
    api::{
        core::v1::{Node, NodeSpec, NodeStatus, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
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

/// Drops what the model never reads from an object as it arrives, so the stores keep only what
/// programming needs: in a real cluster `managedFields`, the `last-applied-configuration`
/// annotation and a Node's image list are most of the bytes. An update that changes only
/// dropped fields then compares equal to the stored object and costs nothing downstream.
pub trait Trim {
    /// Clears the fields the model does not read.
    fn trim(&mut self);
}

/// The metadata the model reads: name, namespace and labels (the service-name, headless,
/// service-proxy-name and zone labels). The rest (annotations, managedFields, owner
/// references, resourceVersion, uid, timestamps) is dropped.
fn trim_meta(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: meta.labels.take(),
        ..ObjectMeta::default()
    };
}

impl Trim for Service {
    fn trim(&mut self) {
        // spec and status (LoadBalancer ingress) are read; only the status conditions are not.
        // Of the annotations, only the one choosing the load-balancing algorithm.
        let algorithm = self.metadata.annotations.as_mut().and_then(|a| a.remove_entry(LB_ALGORITHM_ANNOTATION));
        trim_meta(&mut self.metadata);
        self.metadata.annotations = algorithm.map(|entry| [entry].into());
        if let Some(status) = &mut self.status {
            status.conditions = None;
        }
    }
}

impl Trim for EndpointSlice {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        // Addresses, conditions, nodeName and hints are read. A Pod's targetRef alone is four
        // strings per endpoint: at a million endpoints, hundreds of MiB kept for nothing.
        for endpoint in &mut self.endpoints {
            endpoint.target_ref = None;
            endpoint.hostname = None;
            endpoint.zone = None;
            endpoint.deprecated_topology = None;
        }
    }
}

impl Trim for Node {
    fn trim(&mut self) {
        // Of the annotations, only the one saying the node takes direct server return.
        let dsr = self.metadata.annotations.as_mut().and_then(|a| a.remove_entry(DSR_ANNOTATION));
        trim_meta(&mut self.metadata);
        self.metadata.annotations = dsr.map(|entry| [entry].into());
        // Addresses (nodePort addresses) and pod CIDRs (local traffic) are all the model reads.
        let spec = self.spec.take().unwrap_or_default();
        self.spec = Some(NodeSpec { pod_cidr: spec.pod_cidr, pod_cidrs: spec.pod_cidrs, ..NodeSpec::default() });
        let addresses = self.status.take().and_then(|s| s.addresses);
        self.status = Some(NodeStatus { addresses, ..NodeStatus::default() });
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::NodeAddress;
    use serde_json::json;

    use super::*;

    /// The algorithm annotation is the one annotation the model reads: it survives the trim
    /// (without this, `proxy.kube-ebpf.io/lb-algorithm` never reached the model).
    #[test]
    fn trim_keeps_the_lb_algorithm_annotation_only() {
        let mut service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "annotations": {
                LB_ALGORITHM_ANNOTATION: "maglev",
                "kubectl.kubernetes.io/last-applied-configuration": "{...}",
            }},
        }))
        .unwrap();
        service.trim();
        let kept = service.metadata.annotations.expect("the annotation survives");
        assert_eq!(kept.into_iter().collect::<Vec<_>>(), [(LB_ALGORITHM_ANNOTATION.to_owned(), "maglev".to_owned())]);
    }

    /// The DSR annotation is the one annotation of a Node the model reads: it survives the
    /// trim (without this, no node would ever be seen to take direct server return).
    #[test]
    fn trim_keeps_the_dsr_annotation_of_a_node_only() {
        let mut node: Node = serde_json::from_value(json!({
            "metadata": {"name": "node-2", "annotations": {
                DSR_ANNOTATION: "ipv4",
                "node.alpha.kubernetes.io/ttl": "0",
            }},
        }))
        .unwrap();
        node.trim();
        let kept = node.metadata.annotations.expect("the annotation survives");
        assert_eq!(kept.into_iter().collect::<Vec<_>>(), [(DSR_ANNOTATION.to_owned(), "ipv4".to_owned())]);
    }

    /// A trimmed object reads the same to the model: every field it uses survives.
    #[test]
    fn trim_keeps_what_the_model_reads_and_drops_the_rest() {
        let meta = json!({
            "name": "web", "namespace": "prod", "labels": {"kubernetes.io/service-name": "web"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u1"}],
            "resourceVersion": "42", "uid": "u2",
        });
        let mut slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": meta, "addressType": "IPv4",
            "endpoints": [{
                "addresses": ["10.0.0.1"], "conditions": {"ready": true}, "nodeName": "n1",
                "hints": {"forZones": [{"name": "a"}]}, "zone": "a", "hostname": "web-0",
                "targetRef": {"kind": "Pod", "namespace": "prod", "name": "web-0", "uid": "u3"},
            }],
            "ports": [{"port": 80}],
        }))
        .unwrap();
        let mut expected = slice.clone();
        let endpoint = &mut expected.endpoints[0];
        (endpoint.target_ref, endpoint.hostname, endpoint.zone) = (None, None, None);
        expected.metadata = ObjectMeta {
            name: Some("web".into()),
            namespace: Some("prod".into()),
            labels: slice.metadata.labels.clone(),
            ..ObjectMeta::default()
        };
        slice.trim();
        assert_eq!(slice, expected);

        let mut node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "a"}, "annotations": {"x": "y"}},
            "spec": {"podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24"], "providerID": "cloud://n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}],
                       "images": [{"names": ["registry/app:1"], "sizeBytes": 1}]},
        }))
        .unwrap();
        node.trim();
        assert_eq!(node.metadata.annotations, None);
        assert_eq!(node.metadata.labels.unwrap()["topology.kubernetes.io/zone"], "a");
        let spec = node.spec.unwrap();
        assert_eq!((spec.pod_cidr.as_deref(), spec.provider_id), (Some("10.1.0.0/24"), None));
        assert_eq!(spec.pod_cidrs.unwrap(), ["10.1.0.0/24"]);
        let status = node.status.unwrap();
        assert_eq!(status.images, None);
        let address = NodeAddress { type_: "InternalIP".into(), address: "192.0.2.1".into() };
        assert_eq!(status.addresses.unwrap(), [address]);
    }
}
