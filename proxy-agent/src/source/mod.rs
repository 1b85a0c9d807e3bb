//! Where the cluster's objects come from. Every source (the manifest directory, the Kubernetes
//! API) sends the same [`Update`]s, so the model and the datapath cannot tell them apart.

pub mod kube;
pub mod manifests;
pub mod rbac;
pub mod wire;

use std::sync::Arc;

use k8s_openapi::{
    api::{
        core::v1::{Node, NodeSpec, NodeStatus, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{dsr::DSR_ANNOTATION, maglev::LB_ALGORITHM_ANNOTATION, model::Slice};

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
    /// EndpointSlices changed (kept in the model's compact form).
    Slices(Change<Slice>),
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
        // A list read from JSON has room for four entries: a port is ~110 bytes, and at 100 000
        // services the spare room of `ports` alone was 33 MiB, kept for each service's life.
        if let Some(spec) = &mut self.spec {
            if let Some(ports) = &mut spec.ports {
                ports.shrink_to_fit();
            }
            let lists = [&mut spec.cluster_ips, &mut spec.ip_families, &mut spec.external_ips];
            for list in lists.into_iter().chain([&mut spec.load_balancer_source_ranges]).flatten() {
                list.shrink_to_fit();
            }
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

/// What a source keeps of an object as it arrives: Services and Nodes trimmed, EndpointSlices
/// in the model's compact [`Slice`] form (the API's endpoint type is most of a large
/// cluster's bytes). Converted before anything stores the object, a full list included.
pub trait Keep: Sized {
    /// The form kept.
    type Kept;
    /// Drops what the model does not read.
    fn keep(self) -> Self::Kept;
}

impl Keep for Service {
    type Kept = Service;

    fn keep(mut self) -> Service {
        self.trim();
        self
    }
}

impl Keep for Node {
    type Kept = Node;

    fn keep(mut self) -> Node {
        self.trim();
        self
    }
}

impl Keep for EndpointSlice {
    type Kept = Slice;

    fn keep(self) -> Slice {
        Slice::from(self)
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

    /// A kept Service's lists hold no spare room (serde's lists grow to four entries).
    #[test]
    fn trim_leaves_no_spare_room_in_a_services_lists() {
        let mut service: Service = serde_json::from_str(
            r#"{"spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"], "ipFamilies": ["IPv4"],
                "externalIPs": ["192.0.2.1"], "loadBalancerSourceRanges": ["192.0.2.0/24"],
                "ports": [{"port": 80}]}}"#,
        )
        .unwrap();
        service.trim();
        let spec = service.spec.unwrap();
        let ports = spec.ports.unwrap();
        assert_eq!((ports.len(), ports.capacity()), (1, 1), "ports");
        for (name, list) in [
            ("clusterIPs", spec.cluster_ips),
            ("ipFamilies", spec.ip_families),
            ("externalIPs", spec.external_ips),
            ("loadBalancerSourceRanges", spec.load_balancer_source_ranges),
        ] {
            let list = list.unwrap();
            assert_eq!((list.len(), list.capacity()), (1, 1), "{name}");
        }
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
        let mut service: Service = serde_json::from_value(json!({
            "metadata": meta, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "r", "message": "m",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        }))
        .unwrap();
        let mut expected = service.clone();
        expected.metadata = ObjectMeta {
            name: Some("web".into()),
            namespace: Some("prod".into()),
            labels: service.metadata.labels.clone(),
            ..ObjectMeta::default()
        };
        expected.status.as_mut().unwrap().conditions = None;
        service.trim();
        assert_eq!(service, expected);

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
