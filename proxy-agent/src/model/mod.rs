//! The desired state: a pure function from (Services, EndpointSlices, this node, config) to the
//! frontends and backends the datapath must hold. No I/O; every rule of the service semantics
//! (docs/behaviours.md) lives here, so the manifest directory and the API server feed the same code.

pub(crate) mod addr;
#[cfg(test)]
mod proptests;
mod service;
mod slice;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use k8s_openapi::api::core::v1::Node;
pub use service::service_frontends;

pub use self::{
    addr::{Cidr, IpFamily, is_ipv4_mapped, parse_ip, parse_ipv4},
    slice::{Hints, Slice, SliceEndpoint},
};
use crate::{dsr::LbMode, maglev::LbAlgorithm};

/// The label that names a slice's service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are not proxied (headless).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The Node label naming the node's zone (topology hints name zones by it).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// What the model needs to know about the agent's own node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name (`--hostname-override`), compared with endpoints' `nodeName`.
    pub name: String,
    /// Node addresses of both families that serve nodePorts, already filtered by
    /// `--nodeport-addresses`, sorted (IPv4 first).
    pub nodeport_addresses: Vec<IpAddr>,
    /// The node's pod ranges of both families (`spec.podCIDRs`): the TC program also attaches
    /// to interfaces routing into them, where local backends' replies arrive.
    pub pod_cidrs: Vec<Cidr>,
    /// Serve nodePorts on 127.0.0.1 too (to the node's own processes), as kube-proxy's
    /// iptables mode does unless `--nodeport-addresses` leaves out 127.0.0.0/8.
    pub localhost_nodeports: bool,
    /// The node's zone (its `topology.kubernetes.io/zone` label), empty when unlabelled: endpoints
    /// hinted for this zone are preferred (topology-aware routing).
    pub zone: String,
    /// `--lb-algorithm`: how traffic from outside picks a backend where a service's
    /// [`LB_ALGORITHM_ANNOTATION`](crate::maglev::LB_ALGORITHM_ANNOTATION) does not choose.
    pub lb_algorithm: LbAlgorithm,
    /// `--lb-mode`: SNAT or direct server return for traffic from outside under
    /// `externalTrafficPolicy: Cluster`.
    pub lb_mode: LbMode,
    /// The Nodes that take direct server return (their
    /// [`DSR_ANNOTATION`](crate::dsr::DSR_ANNOTATION)): DSR flows go only to backends on
    /// these, any other remote backend is SNATed.
    pub dsr_nodes: BTreeSet<String>,
}

impl NodeInfo {
    /// Takes the node's InternalIP/ExternalIP addresses of both families, keeping those inside
    /// `filter`, its pod ranges and its zone label. As kube-proxy's per-family proxiers read
    /// `--nodeport-addresses`, each family is filtered by that family's ranges, and a family
    /// without any keeps all its addresses. IPv4-mapped IPv6 addresses are left out: they would
    /// alias IPv4 entries.
    pub fn from_node(name: &str, node: Option<&Node>, filter: &[Cidr]) -> Self {
        let addresses = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| parse_ip(&a.address))
            .filter(|a| !is_ipv4_mapped(*a))
            .filter(|a| nodeport_filter_admits(filter, *a));
        let mut nodeport_addresses: Vec<IpAddr> = addresses.collect();
        nodeport_addresses.sort();
        nodeport_addresses.dedup();
        let spec = node.and_then(|n| n.spec.as_ref());
        let cidrs =
            spec.and_then(|s| s.pod_cidrs.clone()).or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]));
        let pod_cidrs = cidrs.into_iter().flatten().filter_map(|c| c.trim().parse().ok()).collect();
        let localhost_nodeports = nodeport_filter_admits(filter, Ipv4Addr::LOCALHOST.into());
        let zone =
            node.and_then(|n| n.metadata.labels.as_ref()).and_then(|l| l.get(ZONE_LABEL)).cloned().unwrap_or_default();
        Self {
            name: name.to_owned(),
            nodeport_addresses,
            pod_cidrs,
            localhost_nodeports,
            zone,
            lb_algorithm: LbAlgorithm::default(),
            lb_mode: LbMode::default(),
            dsr_nodes: BTreeSet::new(),
        }
    }

    /// The same node with `--lb-algorithm` `algorithm`.
    pub fn with_lb_algorithm(self, lb_algorithm: LbAlgorithm) -> Self {
        Self { lb_algorithm, ..self }
    }

    /// The same node with `--lb-mode` `lb_mode`.
    pub fn with_lb_mode(self, lb_mode: LbMode) -> Self {
        Self { lb_mode, ..self }
    }

    /// The same node knowing that the Nodes `dsr_nodes` take direct server return.
    pub fn with_dsr_nodes(self, dsr_nodes: BTreeSet<String>) -> Self {
        Self { dsr_nodes, ..self }
    }
}

/// Whether `--nodeport-addresses` (`filter`) lets `address` serve nodePorts: when a range of
/// its family holds it, or when no range is of its family (kube-proxy's `NodePortAddresses`:
/// an IPv4-only list leaves the IPv6 proxier matching every address).
fn nodeport_filter_admits(filter: &[Cidr], address: IpAddr) -> bool {
    let mut same_family = filter.iter().filter(|c| c.family() == IpFamily::of(address)).peekable();
    same_family.peek().is_none() || same_family.any(|c| c.contains(address))
}

/// One frontend: what a client connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// The address (ClusterIP, node address, external IP or LoadBalancer IP).
    pub address: IpAddr,
    /// The port (service port, or nodePort).
    pub port: u16,
    /// IP protocol number (`proxy_common::proto`).
    pub proto: u8,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.address, self.port), proto_name(self.proto))
    }
}

/// The name of an IP protocol number as Kubernetes writes it.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        proxy_common::proto::TCP => "TCP",
        proxy_common::proto::UDP => "UDP",
        proxy_common::proto::SCTP => "SCTP",
        _ => "?",
    }
}

/// A service port by name: `namespace/name:port` (kube-proxy's `ServicePortName`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    /// The service's namespace.
    pub namespace: String,
    /// The service's name.
    pub name: String,
    /// The port's name (empty for a single unnamed port).
    pub port: String,
    /// IP protocol number.
    pub proto: u8,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", proto_name(self.proto))
    }
}

/// One endpoint a frontend may send traffic to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// Pod (or host) address.
    pub address: IpAddr,
    /// Resolved target port.
    pub port: u16,
    /// Runs on this node.
    pub local: bool,
    /// Terminating (used only when nothing ready is left).
    pub terminating: bool,
    /// Its node takes direct server return ([`NodeInfo::dsr_nodes`]).
    pub dsr: bool,
}

/// How a frontend was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    /// A ClusterIP.
    ClusterIp,
    /// A node address on a nodePort.
    NodePort,
    /// An `externalIPs` entry.
    ExternalIp,
    /// A LoadBalancer ingress IP.
    LoadBalancer,
}

impl FrontendKind {
    /// Whether traffic to this frontend may come from outside the cluster
    /// (`externalTrafficPolicy` applies).
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }
}

/// Everything the datapath needs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendEntry {
    /// The service port it belongs to.
    pub service: ServicePortName,
    /// How it is reached.
    pub kind: FrontendKind,
    /// `proxy_common::service::SVC_F_*` bits.
    pub flags: u16,
    /// ClientIP affinity timeout in seconds, 0 for none.
    pub affinity_timeout: u32,
    /// The backends for traffic from outside the node (and for all traffic when `internal` is
    /// `None`), sorted.
    pub backends: Vec<Endpoint>,
    /// A separate backend set for traffic from this node, when the traffic policies make the
    /// two differ.
    pub internal: Option<Vec<Endpoint>>,
    /// `loadBalancerSourceRanges` (LoadBalancer frontends only; empty admits everyone).
    pub source_ranges: Vec<Cidr>,
}

/// Why an object, or a part of one, was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// An address that is not an IP address (or not of its slice's `addressType`).
    BadAddress,
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`): the maps hold IPv4 in that form, so it
    /// would alias an IPv4 entry.
    Ipv4Mapped,
    /// An externalIP or LoadBalancer IP of a family the service has no ClusterIP of (kube-proxy's
    /// proxier of that family does not see the service).
    OtherFamily,
    /// A port outside 1..=65535, or missing.
    BadPort,
    /// A protocol other than TCP, UDP and SCTP.
    UnknownProtocol,
    /// A slice without the `kubernetes.io/service-name` label.
    MissingServiceLabel,
    /// A slice whose service does not exist.
    NoService,
    /// A slice of an address type other than IPv4/IPv6 (FQDN).
    UnsupportedAddressType,
    /// A file or object that does not parse.
    Unparseable,
    /// Another service already holds this frontend.
    FrontendConflict,
    /// The maps had no room for the service.
    MapFull,
}

impl SkipReason {
    /// The value of the metric's `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::BadAddress => "bad_address",
            SkipReason::Ipv4Mapped => "ipv4_mapped",
            SkipReason::OtherFamily => "other_family",
            SkipReason::BadPort => "bad_port",
            SkipReason::UnknownProtocol => "unknown_protocol",
            SkipReason::MissingServiceLabel => "missing_service_label",
            SkipReason::NoService => "no_service",
            SkipReason::UnsupportedAddressType => "unsupported_address_type",
            SkipReason::Unparseable => "unparseable",
            SkipReason::FrontendConflict => "frontend_conflict",
            SkipReason::MapFull => "map_full",
        }
    }
}

/// One skipped object or field, with what was wrong, for one log line and one metric.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Skip {
    /// `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    /// The offending field, e.g. `spec.clusterIPs[0]`.
    pub field: String,
    /// The reason, as a metric label.
    pub reason: SkipReason,
    /// What was found there.
    pub detail: String,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {} ({})", self.object, self.field, self.detail, self.reason.as_str())
    }
}

/// The model's answer for a set of services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every frontend to program.
    pub frontends: BTreeMap<Frontend, FrontendEntry>,
    /// Everything skipped on the way.
    pub skipped: Vec<Skip>,
    /// The `healthCheckNodePort` this node serves for the service, if any.
    pub health_check: Option<(u16, HealthCheck)>,
}

/// What a service's `healthCheckNodePort` reports (kube-proxy's service health server): a
/// LoadBalancer with `externalTrafficPolicy: Local` asks each node whether it has local
/// endpoints, so the cloud load balancer sends traffic only to nodes that do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// The service's namespace.
    pub namespace: String,
    /// The service's name.
    pub name: String,
    /// Ready endpoints on this node (terminating ones do not count: 503 when only they are left).
    pub local_endpoints: usize,
}

/// `namespace/name` of an object.
pub fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!("{}/{}", meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or(""))
}

/// The `namespace/name` of the service a slice belongs to, from its label.
pub fn slice_service(slice: &Slice) -> Option<String> {
    slice.service()
}

/// The whole desired state at once: groups slices by service, reports orphans, and merges the
/// per-service answers (the first service in name order keeps a contested frontend).
pub fn desired<'a>(
    services: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Service>,
    slices: impl IntoIterator<Item = &'a Slice>,
    node: &NodeInfo,
) -> Desired {
    let mut by_service: BTreeMap<String, Vec<&Slice>> = BTreeMap::new();
    let mut out = Desired::default();
    for slice in slices {
        match slice_service(slice) {
            Some(service) => by_service.entry(service).or_default().push(slice),
            None => out.skipped.push(missing_label(slice)),
        }
    }
    let mut services: Vec<_> = services.into_iter().map(|s| (object_key(&s.metadata), s)).collect();
    services.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, service) in &services {
        let slices = by_service.remove(key).unwrap_or_default();
        let computed = service_frontends(service, &slices, node);
        out.skipped.extend(computed.skipped);
        for (frontend, entry) in computed.frontends {
            merge(&mut out, frontend, entry);
        }
    }
    for slices in by_service.into_values() {
        out.skipped.extend(slices.into_iter().map(orphan));
    }
    out
}

fn merge(out: &mut Desired, frontend: Frontend, entry: FrontendEntry) {
    if let Some(holder) = out.frontends.get(&frontend) {
        out.skipped.push(Skip {
            object: format!("Service {}/{}", entry.service.namespace, entry.service.name),
            field: "frontend".into(),
            reason: SkipReason::FrontendConflict,
            detail: format!("{frontend} is already served for {}", holder.service),
        });
        return;
    }
    out.frontends.insert(frontend, entry);
}

/// The skip for a slice without the service-name label.
pub fn missing_label(slice: &Slice) -> Skip {
    Skip {
        object: format!("EndpointSlice {}", slice.key()),
        field: format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
        reason: SkipReason::MissingServiceLabel,
        detail: "missing".into(),
    }
}

/// The skip for a slice whose service does not exist.
pub fn orphan(slice: &Slice) -> Skip {
    Skip {
        object: format!("EndpointSlice {}", slice.key()),
        field: format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
        reason: SkipReason::NoService,
        detail: format!("service {} does not exist", slice_service(slice).unwrap_or_default()),
    }
}
