//! Services as a cluster states them, programmed through the real model and writer into a
//! [`Recorder`]: tests start from a Service and its EndpointSlice, never from hand-made map
//! entries, so what they check is what the agent would write.
//!
//! One node, `node-1` (address [`NODE_IP`]); every service has one port `http`, 80 → 8080/TCP.

use std::net::Ipv4Addr;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{Value, json};

use super::{Writer, recorder::Recorder};
use crate::model::{NodeInfo, service_frontends};

/// This node's name.
pub(crate) const NODE: &str = "node-1";
/// Another node's name.
pub(crate) const OTHER_NODE: &str = "node-2";
/// This node's address: its nodePorts' frontend.
pub(crate) const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
/// Every service's port.
pub(crate) const PORT: u16 = 80;
/// Every endpoint's port.
pub(crate) const TARGET_PORT: u16 = 8080;

/// The conditions of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Condition {
    /// Ready (and serving).
    Ready,
    /// Terminating but still serving: used only when no endpoint is ready.
    Terminating,
}

/// A Service and its endpoints.
pub(crate) struct Svc {
    service: Value,
    endpoints: Vec<Value>,
}

impl Svc {
    /// A ClusterIP service `default/<name>` at `cluster_ip`.
    pub(crate) fn cluster_ip(name: &str, cluster_ip: Ipv4Addr) -> Self {
        let service = json!({
            "metadata": { "name": name, "namespace": "default" },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": cluster_ip.to_string(),
                "ports": [{ "name": "http", "port": PORT, "targetPort": TARGET_PORT, "protocol": "TCP" }],
            },
        });
        Self { service, endpoints: Vec::new() }
    }

    /// Type NodePort, on `node_port`.
    pub(crate) fn node_port(mut self, node_port: u16) -> Self {
        self.service["spec"]["type"] = json!("NodePort");
        self.service["spec"]["ports"][0]["nodePort"] = json!(node_port);
        self
    }

    /// Type LoadBalancer on `node_port`, with ingress address `ip`.
    pub(crate) fn load_balancer(self, node_port: u16, ip: Ipv4Addr) -> Self {
        let mut svc = self.node_port(node_port);
        svc.service["spec"]["type"] = json!("LoadBalancer");
        svc.service["status"] = json!({ "loadBalancer": { "ingress": [{ "ip": ip.to_string() }] } });
        svc
    }

    /// Sets `spec.<field>` (a traffic policy, `sessionAffinity`, `loadBalancerSourceRanges`).
    pub(crate) fn spec(mut self, field: &str, value: Value) -> Self {
        self.service["spec"][field] = value;
        self
    }

    /// An endpoint at `address` on node `node`.
    pub(crate) fn annotate(mut self, key: &str, value: &str) -> Self {
        self.service["metadata"]["annotations"][key] = json!(value);
        self
    }

    pub(crate) fn endpoint(mut self, address: Ipv4Addr, node: &str, condition: Condition) -> Self {
        let ready = condition == Condition::Ready;
        self.endpoints.push(json!({
            "addresses": [address.to_string()],
            "nodeName": node,
            "conditions": { "ready": ready, "serving": true, "terminating": !ready },
        }));
        self
    }

    pub(crate) fn objects(&self) -> (Service, EndpointSlice) {
        let name = &self.service["metadata"]["name"];
        let slice = json!({
            "metadata": {
                "name": format!("{}-1", name.as_str().unwrap_or_default()),
                "namespace": "default",
                "labels": { "kubernetes.io/service-name": name },
            },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": TARGET_PORT, "protocol": "TCP" }],
            "endpoints": self.endpoints,
        });
        let service = serde_json::from_value(self.service.clone()).expect("the fixture's Service is valid");
        let slice = serde_json::from_value(slice).expect("the fixture's EndpointSlice is valid");
        (service, slice)
    }
}

/// This node, serving nodePorts on [`NODE_IP`].
pub(crate) fn node() -> NodeInfo {
    NodeInfo { name: NODE.into(), nodeport_addresses: vec![NODE_IP.into()], ..NodeInfo::default() }
}

/// Programs `services` as the sync loop would (the model's frontends, upserted one by one).
pub(crate) fn program(writer: &mut Writer<Recorder>, services: &[Svc]) {
    for svc in services {
        let (service, slice) = svc.objects();
        let desired = service_frontends(&service, &[&slice.into()], &node());
        assert!(desired.skipped.is_empty(), "the fixture's objects parse whole: {:?}", desired.skipped);
        for (frontend, entry) in &desired.frontends {
            writer.upsert(*frontend, entry).expect("the recorder has room");
        }
    }
}

/// A writer over an empty recorder with `services` programmed.
pub(crate) fn programmed(services: &[Svc]) -> Writer<Recorder> {
    let mut writer = Writer::new(Recorder::default());
    program(&mut writer, services);
    writer
}
