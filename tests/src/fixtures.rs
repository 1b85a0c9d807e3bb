//! Small builders for the objects tests feed the agent, instead of pages of YAML:
//! `service("apigw-test1").cluster_ip("10.96.0.10").port(6666)` and
//! `slice("apigw-test1", "a").port(80).endpoint("10.244.1.2")`.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use k8s_openapi::Resource;
use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, Node, NodeAddress, NodeSpec, NodeStatus, Service, ServicePort,
            ServiceSpec, SessionAffinityConfig,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Serialize;

/// A Node named `name` with `ip` as its InternalIP and `pod_cidr` as its pod range.
pub fn node(name: &str, ip: &str, pod_cidr: &str) -> Node {
    Node {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(NodeSpec {
            pod_cidr: Some(pod_cidr.into()),
            pod_cidrs: Some(vec![pod_cidr.into()]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: ip.into() }]),
            ..Default::default()
        }),
    }
}

/// The same, labelled `topology.kubernetes.io/zone: zone` (as the cloud provider labels it).
pub fn node_in_zone(name: &str, ip: &str, pod_cidr: &str, zone: &str) -> Node {
    let mut node = node(name, ip, pod_cidr);
    node.metadata.labels = Some(BTreeMap::from([("topology.kubernetes.io/zone".to_owned(), zone.to_owned())]));
    node
}

/// A Service being built (namespace `default`, type ClusterIP).
#[derive(Clone, Debug)]
pub struct ServiceBuilder(Service);

/// Starts a ClusterIP service named `name` in `default`.
pub fn service(name: &str) -> ServiceBuilder {
    ServiceBuilder(Service {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some("default".into()), ..Default::default() },
        spec: Some(ServiceSpec { type_: Some("ClusterIP".into()), ..Default::default() }),
        status: None,
    })
}

impl ServiceBuilder {
    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_with(Default::default)
    }

    /// Sets the ClusterIP (`clusterIP` and `clusterIPs`), written as given (malformed is fine).
    pub fn cluster_ip(mut self, ip: &str) -> Self {
        self.spec().cluster_ip = Some(ip.into());
        self.spec().cluster_ips = Some(vec![ip.into()]);
        self
    }

    /// Sets the ClusterIPs of a dual-stack or single-stack service as the API server writes
    /// them: `clusterIP` is the first, `clusterIPs` all, `ipFamilies` their families in order,
    /// `ipFamilyPolicy` `SingleStack` for one address and `RequireDualStack` for two.
    pub fn cluster_ips(mut self, ips: &[std::net::IpAddr]) -> Self {
        let spec = self.spec();
        spec.cluster_ip = ips.first().map(ToString::to_string);
        spec.cluster_ips = Some(ips.iter().map(ToString::to_string).collect());
        spec.ip_families = Some(ips.iter().map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" }.into()).collect());
        spec.ip_family_policy = Some(if ips.len() > 1 { "RequireDualStack" } else { "SingleStack" }.into());
        self
    }

    /// Adds an unnamed TCP port (any i32, to test bad ones).
    pub fn port(mut self, port: i32) -> Self {
        self.spec().ports.get_or_insert_with(Vec::new).push(ServicePort {
            port,
            protocol: Some("TCP".into()),
            ..Default::default()
        });
        self
    }

    /// Adds a named port with a protocol.
    pub fn named_port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.spec().ports.get_or_insert_with(Vec::new).push(ServicePort {
            name: Some(name.into()),
            port,
            protocol: Some(protocol.into()),
            ..Default::default()
        });
        self
    }

    /// Makes it a NodePort service with `node_port` on its last port.
    pub fn node_port(mut self, node_port: i32) -> Self {
        self.spec().type_ = Some("NodePort".into());
        if let Some(port) = self.spec().ports.as_mut().and_then(|p| p.last_mut()) {
            port.node_port = Some(node_port);
        }
        self
    }

    /// Sets `externalTrafficPolicy`.
    pub fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().external_traffic_policy = Some(policy.into());
        self
    }

    /// Adds `spec.externalIPs`.
    pub fn external_ip(mut self, ip: &str) -> Self {
        self.spec().external_ips.get_or_insert_with(Vec::new).push(ip.into());
        self
    }

    /// Sets `healthCheckNodePort`.
    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.spec().health_check_node_port = Some(port);
        self
    }

    /// Adds a `loadBalancerSourceRanges` entry.
    pub fn load_balancer_source_range(mut self, cidr: &str) -> Self {
        self.spec().load_balancer_source_ranges.get_or_insert_with(Vec::new).push(cidr.into());
        self
    }

    /// Makes it a LoadBalancer with `ip` in `status.loadBalancer.ingress`.
    pub fn load_balancer_ip(mut self, ip: &str) -> Self {
        self.spec().type_ = Some("LoadBalancer".into());
        let status = self.0.status.get_or_insert_with(Default::default);
        let lb = status.load_balancer.get_or_insert_with(Default::default);
        lb.ingress.get_or_insert_with(Vec::new).push(LoadBalancerIngress { ip: Some(ip.into()), ..Default::default() });
        self
    }

    /// Sets `sessionAffinity: ClientIP`, with `sessionAffinityConfig.clientIP.timeoutSeconds`
    /// if given (the API's default is 10800 s).
    pub fn session_affinity(mut self, timeout_seconds: Option<i32>) -> Self {
        self.spec().session_affinity = Some("ClientIP".into());
        self.spec().session_affinity_config = timeout_seconds
            .map(|t| SessionAffinityConfig { client_ip: Some(ClientIPConfig { timeout_seconds: Some(t) }) });
        self
    }

    /// Sets `sessionAffinity: None` explicitly (what the API server writes when it is absent).
    pub fn no_session_affinity(mut self) -> Self {
        self.spec().session_affinity = Some("None".into());
        self.spec().session_affinity_config = None;
        self
    }

    /// Sets `trafficDistribution` (the EndpointSlice controller reads it; the proxy reads the
    /// hints the controller writes).
    pub fn traffic_distribution(mut self, distribution: &str) -> Self {
        self.spec().traffic_distribution = Some(distribution.into());
        self
    }

    /// Sets `internalTrafficPolicy`.
    pub fn internal_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().internal_traffic_policy = Some(policy.into());
        self
    }

    /// The Service.
    pub fn build(self) -> Service {
        self.0
    }
}

/// An EndpointSlice being built.
#[derive(Clone, Debug)]
pub struct SliceBuilder(EndpointSlice);

/// Starts an IPv4 slice `<service>-<suffix>` labelled for `service` in `default`.
pub fn slice(service: &str, suffix: &str) -> SliceBuilder {
    let labels = BTreeMap::from([("kubernetes.io/service-name".to_owned(), service.to_owned())]);
    SliceBuilder(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-{suffix}")),
            namespace: Some("default".into()),
            labels: Some(labels),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Vec::new(),
        ports: None,
    })
}

impl SliceBuilder {
    /// Adds an unnamed TCP port.
    pub fn port(mut self, port: i32) -> Self {
        self.0.ports.get_or_insert_with(Vec::new).push(EndpointPort {
            port: Some(port),
            protocol: Some("TCP".into()),
            ..Default::default()
        });
        self
    }

    /// Sets `addressType` (`IPv4`, the default here, `IPv6` or `FQDN`).
    pub fn address_type(mut self, address_type: &str) -> Self {
        self.0.address_type = address_type.into();
        self
    }

    /// Adds a ready endpoint on node-1.
    pub fn endpoint(self, ip: &str) -> Self {
        self.endpoint_on(ip, "node-1")
    }

    /// Adds a ready endpoint on `node`.
    pub fn endpoint_on(mut self, ip: &str, node: &str) -> Self {
        self.0.endpoints.push(Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions { ready: Some(true), serving: Some(true), terminating: Some(false) }),
            node_name: Some(node.into()),
            ..Default::default()
        });
        self
    }

    /// Adds an endpoint on `node` with explicit conditions (`ready`, `serving`, `terminating`),
    /// as the EndpointSlice controller writes them for not-ready and terminating pods.
    pub fn endpoint_with(mut self, ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Self {
        self.0.endpoints.push(Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            node_name: Some(node.into()),
            ..Default::default()
        });
        self
    }

    /// Sets `hints.forNodes` of the last endpoint.
    pub fn for_nodes(mut self, nodes: &[&str]) -> Self {
        let hints = self.hints();
        hints.for_nodes = Some(nodes.iter().map(|n| ForNode { name: (*n).into() }).collect());
        self
    }

    /// Sets `hints.forZones` of the last endpoint.
    pub fn for_zones(mut self, zones: &[&str]) -> Self {
        let hints = self.hints();
        hints.for_zones = Some(zones.iter().map(|z| ForZone { name: (*z).into() }).collect());
        self
    }

    fn hints(&mut self) -> &mut EndpointHints {
        let endpoint = self.0.endpoints.last_mut().expect("add an endpoint first");
        endpoint.hints.get_or_insert_with(Default::default)
    }

    /// Adds a named port with a protocol.
    pub fn named_port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.0.ports.get_or_insert_with(Vec::new).push(EndpointPort {
            name: Some(name.into()),
            port: Some(port),
            protocol: Some(protocol.into()),
            ..Default::default()
        });
        self
    }

    /// Adds ready endpoints.
    pub fn endpoints<'a>(self, ips: impl IntoIterator<Item = &'a str>) -> Self {
        ips.into_iter().fold(self, Self::endpoint)
    }

    /// The EndpointSlice.
    pub fn build(self) -> EndpointSlice {
        self.0
    }
}

/// One YAML document for `object`, with `kind` and `apiVersion` as kubectl writes them.
pub fn yaml<T: Serialize + Resource>(object: &T) -> String {
    let mut value = serde_json::to_value(object).expect("k8s-openapi objects serialize");
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), T::API_VERSION.into());
        map.insert("kind".into(), T::KIND.into());
    }
    format!("---\n{}", serde_yaml_ng::to_string(&value).expect("JSON values serialize as YAML"))
}

/// Writes text into `dir/file` atomically (write, then rename), as a careful editor does.
pub fn write_text(dir: &Path, file: &str, text: &str) -> anyhow::Result<()> {
    let staging = dir.join(format!(".{file}.tmp"));
    std::fs::write(&staging, text).with_context(|| format!("writing {}", staging.display()))?;
    std::fs::rename(&staging, dir.join(file)).with_context(|| format!("renaming to {file}"))?;
    Ok(())
}

/// A fresh directory under the system's temp dir (`<prefix>-<pid>-<n>`), removed on drop: a
/// manifest directory for an agent, or any scratch space a test needs.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// Creates the directory.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The directory as a command-line argument.
    pub fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
