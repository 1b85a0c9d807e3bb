//! An EndpointSlice as the model reads it, and no more. The API's `Endpoint` is about 350 bytes
//! before its strings (a target reference, topology, hints, three optional conditions), and a
//! slice's list grows to 16 entries for 10 endpoints: at 100 000 services × 10 endpoints the
//! stored slices alone were over 550 MiB. Kept in this form an endpoint is 48 bytes and one
//! short string, and a node's name is shared by every endpoint on that node.

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock, Mutex, PoisonError},
};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};

use super::SERVICE_NAME_LABEL;

/// The fields of an EndpointSlice the model reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Slice {
    /// `metadata.namespace` (empty when absent).
    pub namespace: String,
    /// `metadata.name` (empty when absent).
    pub name: String,
    /// The `kubernetes.io/service-name` label: the service the slice belongs to.
    pub service_name: Option<String>,
    /// `addressType` (`IPv4`, `IPv6` or `FQDN`).
    pub address_type: String,
    /// `ports`, without `appProtocol` (the datapath does not read it).
    pub ports: Box<[EndpointPort]>,
    /// `endpoints`, in order (skips name an endpoint by its index).
    pub endpoints: Box<[SliceEndpoint]>,
}

/// The fields of one endpoint the model reads. Absent conditions are resolved as the API
/// defines them: `ready` and `serving` true, `terminating` false.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first of `addresses` (kube-proxy uses only it); `None` when the list is empty.
    pub address: Option<Box<str>>,
    /// `nodeName`, shared with every other endpoint on that node.
    pub node_name: Option<Arc<str>>,
    /// `hints`, boxed: most endpoints carry none.
    pub hints: Option<Box<Hints>>,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
}

/// An endpoint's topology hints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// The node names of `forNodes`.
    pub for_nodes: Vec<String>,
    /// The zone names of `forZones`.
    pub for_zones: Vec<String>,
}

impl Slice {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The `namespace/name` of the service the slice belongs to, from its label.
    pub fn service(&self) -> Option<String> {
        self.service_name.as_ref().map(|name| format!("{}/{name}", self.namespace))
    }
}

impl From<EndpointSlice> for Slice {
    fn from(slice: EndpointSlice) -> Self {
        let meta = slice.metadata;
        let service_name = meta.labels.and_then(|mut labels| labels.remove(SERVICE_NAME_LABEL));
        let ports = slice.ports.unwrap_or_default().into_iter().map(|p| EndpointPort { app_protocol: None, ..p });
        Self {
            namespace: meta.namespace.unwrap_or_default(),
            name: meta.name.unwrap_or_default(),
            service_name,
            address_type: slice.address_type,
            ports: ports.collect(),
            endpoints: slice.endpoints.into_iter().map(SliceEndpoint::from).collect(),
        }
    }
}

impl From<Endpoint> for SliceEndpoint {
    fn from(endpoint: Endpoint) -> Self {
        let hints = endpoint.hints.map(|h| Hints {
            for_nodes: h.for_nodes.into_iter().flatten().map(|n| n.name).collect(),
            for_zones: h.for_zones.into_iter().flatten().map(|z| z.name).collect(),
        });
        let address = endpoint.addresses.into_iter().next().map(String::into_boxed_str);
        Self::from_api(address, endpoint.node_name.as_deref(), hints, endpoint.conditions.unwrap_or_default())
    }
}

impl SliceEndpoint {
    /// An endpoint from the API's fields the model reads, whichever way they were decoded:
    /// `address` is the first of `addresses`, the node name is shared with every other
    /// endpoint on that node, empty hints are no hints, and absent conditions read as the API
    /// defines them.
    pub fn from_api(
        address: Option<Box<str>>,
        node_name: Option<&str>,
        hints: Option<Hints>,
        conditions: EndpointConditions,
    ) -> Self {
        Self {
            address,
            node_name: node_name.map(self::node_name),
            // No hints and an empty hint list mean the same to the model (no hint).
            hints: hints.filter(|h| !h.for_nodes.is_empty() || !h.for_zones.is_empty()).map(Box::new),
            ready: conditions.ready.unwrap_or(true),
            serving: conditions.serving.unwrap_or(true),
            terminating: conditions.terminating.unwrap_or(false),
        }
    }
}

/// The node names seen, each stored once: a cluster has thousands of nodes and a million
/// endpoints. Names no endpoint holds any more are dropped whenever the set has doubled since
/// the last such sweep, so nodes coming and going cannot grow it without bound.
struct NodeNames {
    names: HashSet<Arc<str>>,
    swept_at: usize,
}

static NODE_NAMES: LazyLock<Mutex<NodeNames>> =
    LazyLock::new(|| Mutex::new(NodeNames { names: HashSet::new(), swept_at: 0 }));

/// `name`, shared with every other endpoint on that node.
fn node_name(name: &str) -> Arc<str> {
    // The set stays consistent whatever a panicking holder did: it only ever inserts or drops.
    let mut known = NODE_NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(shared) = known.names.get(name) {
        return shared.clone();
    }
    if known.names.len() >= 2 * known.swept_at.max(1024) {
        known.names.retain(|n| Arc::strong_count(n) > 1);
        known.swept_at = known.names.len();
    }
    let shared: Arc<str> = name.into();
    known.names.insert(shared.clone());
    shared
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Every field the model reads survives, absent conditions read as the API defines them,
    /// and the rest (target references, zones, appProtocol, other labels) is gone.
    #[test]
    fn a_slice_keeps_what_the_model_reads() {
        let api: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-a", "namespace": "prod",
                         "labels": {SERVICE_NAME_LABEL: "web", "other": "x"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1", "10.0.0.9"], "nodeName": "n1", "zone": "a",
                 "conditions": {"ready": false, "terminating": true},
                 "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": "n1"}]},
                 "targetRef": {"kind": "Pod", "name": "web-0"}},
                {"addresses": [], "nodeName": "n1", "hints": {}},
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
        }))
        .unwrap();
        let slice = Slice::from(api);
        assert_eq!((slice.key(), slice.service().as_deref()), ("prod/web-a".to_owned(), Some("prod/web")));
        assert_eq!(slice.address_type, "IPv4");
        let port = EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        };
        assert_eq!(*slice.ports, [port]);
        let hints = Hints { for_nodes: vec!["n1".into()], for_zones: vec!["a".into()] };
        let first = SliceEndpoint {
            address: Some("10.0.0.1".into()),
            node_name: Some("n1".into()),
            hints: Some(Box::new(hints)),
            ready: false,
            serving: true,
            terminating: true,
        };
        let second = SliceEndpoint {
            address: None,
            node_name: Some("n1".into()),
            hints: None,
            ready: true,
            serving: true,
            terminating: false,
        };
        assert_eq!(*slice.endpoints, [first, second]);
        let [a, b] = &*slice.endpoints else { unreachable!() };
        assert!(Arc::ptr_eq(a.node_name.as_ref().unwrap(), b.node_name.as_ref().unwrap()), "one copy of n1");
    }

    /// Without the label a slice names no service.
    #[test]
    fn an_unlabelled_slice_names_no_service() {
        let api = EndpointSlice { address_type: "IPv4".into(), ..Default::default() };
        assert_eq!(Slice::from(api).service(), None);
    }
}
