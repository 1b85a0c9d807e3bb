//! One service → its frontends. Each rule of docs/behaviours.md "Service semantics" is one small step here.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use proxy_common::{proto, service::*};

use crate::{
    dsr::LbMode,
    maglev::{LB_ALGORITHM_ANNOTATION, LbAlgorithm},
};

use super::{
    Cidr, DEFAULT_AFFINITY_TIMEOUT, Desired, Endpoint, Frontend, FrontendEntry, FrontendKind, HEADLESS_LABEL,
    HealthCheck, IpFamily, NodeInfo, SERVICE_PROXY_NAME_LABEL, ServicePortName, Skip, SkipReason, Slice,
    is_ipv4_mapped, object_key, parse_ip,
};

/// The frontends of one service and the skips found on the way. `slices` are the slices
/// labelled with this service's name.
pub fn service_frontends(service: &Service, slices: &[&Slice], node: &NodeInfo) -> Desired {
    let mut out = Desired::default();
    let mut skips = Skips { object: format!("Service {}", object_key(&service.metadata)), out: Vec::new() };
    let Some(spec) = service.spec.as_ref() else {
        skips.push("spec".into(), SkipReason::Unparseable, "missing");
        out.skipped = skips.out;
        return out;
    };
    if !is_proxied(service) {
        return out;
    }
    let cluster_ips = addresses(&mut skips, cluster_ip_texts(service));
    let families = served_families(spec, &cluster_ips);
    let cluster_ips = of_families(&mut skips, cluster_ips, &families);
    let external_ips = addresses(
        &mut skips,
        spec.external_ips.iter().flatten().enumerate().map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip.as_str())),
    );
    let external_ips = of_families(&mut skips, external_ips, &families);
    let lb_ips = addresses(&mut skips, lb_ip_texts(service));
    let lb_ips = of_families(&mut skips, lb_ips, &families);
    let source_ranges = source_ranges(&mut skips, spec.load_balancer_source_ranges.iter().flatten());
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let ext_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let int_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout = affinity_timeout(service);
    let maglev = lb_algorithm(service, node, &mut skips) == LbAlgorithm::Maglev;

    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let Some((name, number, protocol)) = port_identity(&mut skips, index, port) else { continue };
        let node_port = if node_ports { node_port(&mut skips, index, port) } else { None };
        let service_port = ServicePortName {
            namespace: service.metadata.namespace.clone().unwrap_or_default(),
            name: service.metadata.name.clone().unwrap_or_default(),
            port: name,
            proto: protocol,
        };
        let mut base_flags = 0;
        if ext_local {
            base_flags |= SVC_F_EXT_LOCAL;
        }
        if int_local {
            base_flags |= SVC_F_INT_LOCAL;
        }
        if affinity_timeout != 0 {
            base_flags |= SVC_F_AFFINITY;
        }
        // kube-proxy runs one proxier per family: a family's frontends get that family's
        // endpoints and source ranges only, and every policy is decided per family.
        for &family in &families {
            let endpoints = resolve_endpoints(&mut skips, slices, family, &service_port.port, protocol, node);
            // Topology hints narrow the cluster-wide set only: a Local policy already keeps to this node.
            let topology = Topology::from_hints(&endpoints, node);
            let cluster = usable(&endpoints, |c| topology.admits(c, node));
            let local = usable(&endpoints, |c| c.endpoint.local);
            let internal_set = if int_local { &local } else { &cluster };
            let external_set = if ext_local { &local } else { &cluster };
            let ranges: Vec<Cidr> = source_ranges.iter().filter(|c| c.family() == family).copied().collect();
            let entry = |kind: FrontendKind| {
                // internalTrafficPolicy applies to ClusterIPs only. Traffic from this node to an
                // external frontend of an eTP=Local service goes to every endpoint, as kube-proxy's
                // short-circuit to the cluster chain does.
                let (set, internal) = if kind.is_external() {
                    (external_set, ext_local.then(|| cluster.endpoints.clone()))
                } else {
                    (internal_set, None)
                };
                let mut flags = base_flags | kind_flag(kind);
                if kind == FrontendKind::LoadBalancer && !ranges.is_empty() {
                    flags |= SVC_F_SOURCE_RANGES;
                }
                if internal.is_some() {
                    flags |= SVC_F_TWO_SCOPES;
                }
                if set.fallback {
                    flags |= SVC_F_TERMINATING_FALLBACK;
                }
                // Only traffic from outside can reach another node when the network moves it;
                // ClusterIPs (the socket path) stay random, as every kube-proxy mode.
                if maglev && kind.is_external() {
                    flags |= SVC_F_MAGLEV;
                }
                // Under eTP Local the client's address is kept anyway and the backend local.
                // The option is IPv4's: IPv6 frontends stay SNATed.
                if kind.is_external() && !ext_local && family == IpFamily::V4 && node.lb_mode.dsr_for(protocol) {
                    flags |= SVC_F_DSR;
                }
                FrontendEntry {
                    service: service_port.clone(),
                    kind,
                    flags,
                    affinity_timeout,
                    backends: set.endpoints.clone(),
                    internal,
                    source_ranges: if kind == FrontendKind::LoadBalancer { ranges.clone() } else { Vec::new() },
                }
            };
            let mut add = |address: IpAddr, port: u16, kind: FrontendKind| {
                if IpFamily::of(address) == family {
                    out.frontends.insert(Frontend { address, port, proto: protocol }, entry(kind));
                }
            };
            for &ip in &cluster_ips {
                add(ip, number, FrontendKind::ClusterIp);
            }
            if let Some(node_port) = node_port {
                for &ip in &node.nodeport_addresses {
                    add(ip, node_port, FrontendKind::NodePort);
                }
                // kube-proxy serves localhost nodePorts for IPv4 only (route_localnet has no
                // IPv6 twin).
                if node.localhost_nodeports {
                    add(Ipv4Addr::LOCALHOST.into(), node_port, FrontendKind::NodePort);
                }
            }
            for &ip in &external_ips {
                add(ip, number, FrontendKind::ExternalIp);
            }
            for &ip in &lb_ips {
                add(ip, number, FrontendKind::LoadBalancer);
            }
        }
    }
    out.health_check = health_check(service, slices, node);
    // Each service port reads the slices again: one report per skipped field.
    let mut seen = std::collections::HashSet::new();
    out.skipped = skips.out.into_iter().filter(|skip| seen.insert(skip.clone())).collect();
    out
}

/// The `healthCheckNodePort` of a LoadBalancer with `externalTrafficPolicy: Local`, with the
/// number of distinct ready endpoints on this node.
fn health_check(service: &Service, slices: &[&Slice], node: &NodeInfo) -> Option<(u16, HealthCheck)> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer") || spec.external_traffic_policy.as_deref() != Some("Local") {
        return None;
    }
    let port = valid_port(spec.health_check_node_port?)?;
    // A dual-stack pod is in one slice of each family: count per family, report the larger.
    let mut local_ready: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for slice in slices.iter().filter(|s| IpFamily::from_api_name(&s.address_type).is_some()) {
        let ready = slice
            .endpoints
            .iter()
            .filter(|e| !node.name.is_empty() && e.node_name.as_deref() == Some(node.name.as_str()))
            .filter(|e| e.ready)
            .filter_map(|e| e.address.as_deref());
        local_ready.entry(slice.address_type.as_str()).or_default().extend(ready);
    }
    let local_endpoints = local_ready.values().map(BTreeSet::len).max().unwrap_or(0);
    let check = HealthCheck {
        namespace: service.metadata.namespace.clone().unwrap_or_default(),
        name: service.metadata.name.clone().unwrap_or_default(),
        local_endpoints,
    };
    Some((port, check))
}

/// Headless services, ExternalName services and services of another proxy get no frontends.
fn is_proxied(service: &Service) -> bool {
    let labels = service.metadata.labels.as_ref();
    let has_label = |l: &str| labels.is_some_and(|m| m.contains_key(l));
    let spec = service.spec.as_ref();
    let headless = spec.and_then(|s| s.cluster_ip.as_deref()) == Some("None");
    let external_name = spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName");
    !(has_label(SERVICE_PROXY_NAME_LABEL) || has_label(HEADLESS_LABEL) || headless || external_name)
}

fn kind_flag(kind: FrontendKind) -> u16 {
    match kind {
        FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
        FrontendKind::NodePort => SVC_F_NODE_PORT,
        FrontendKind::ExternalIp => SVC_F_EXTERNAL_IP,
        FrontendKind::LoadBalancer => SVC_F_LOAD_BALANCER,
    }
}

/// Collects skips for one object.
struct Skips {
    object: String,
    out: Vec<Skip>,
}

impl Skips {
    fn push(&mut self, field: String, reason: SkipReason, detail: impl Into<String>) {
        self.out.push(Skip { object: self.object.clone(), field, reason, detail: detail.into() });
    }
}

/// The ClusterIPs with their field names: `spec.clusterIPs`, or `spec.clusterIP` when the list
/// is absent (older objects).
fn cluster_ip_texts(service: &Service) -> Vec<(String, &str)> {
    let spec = service.spec.as_ref();
    let texts: Vec<(String, &str)> = match spec.and_then(|s| s.cluster_ips.as_ref()).filter(|ips| !ips.is_empty()) {
        Some(ips) => ips.iter().enumerate().map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str())).collect(),
        None => {
            spec.and_then(|s| s.cluster_ip.as_deref()).map(|ip| ("spec.clusterIP".to_owned(), ip)).into_iter().collect()
        }
    };
    texts.into_iter().filter(|(_, ip)| !ip.is_empty()).collect()
}

/// The LoadBalancer ingress IPs with their field names (hostname-only entries have none).
fn lb_ip_texts(service: &Service) -> Vec<(String, &str)> {
    let status = service.status.as_ref().and_then(|s| s.load_balancer.as_ref());
    let ingress = status.and_then(|lb| lb.ingress.as_ref()).into_iter().flatten().enumerate();
    ingress
        .filter_map(|(i, entry)| Some((format!("status.loadBalancer.ingress[{i}].ip"), entry.ip.as_deref()?)))
        .collect()
}

/// Parses addresses of both families with their field names, skipping bad and IPv4-mapped
/// ones with a reason naming the field.
fn addresses<'a>(skips: &mut Skips, texts: impl IntoIterator<Item = (String, &'a str)>) -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    for (field, text) in texts {
        match parse_ip(text) {
            Some(ip) if is_ipv4_mapped(ip) => {
                skips.push(field, SkipReason::Ipv4Mapped, format!("{text} is IPv4-mapped IPv6: write it as IPv4"))
            }
            Some(ip) => out.push((field, ip)),
            None => skips.push(field, SkipReason::BadAddress, format!("{text:?} is not an IP address")),
        }
    }
    out
}

/// The families the service is served in: those of its ClusterIPs (what the API server
/// allocated for its `ipFamilyPolicy`, `clusterIPs[0]` first), else those of `spec.ipFamilies`,
/// else IPv4 (objects written before dual stack).
fn served_families(spec: &ServiceSpec, cluster_ips: &[(String, IpAddr)]) -> Vec<IpFamily> {
    let mut families: Vec<IpFamily> = cluster_ips.iter().map(|(_, ip)| IpFamily::of(*ip)).collect();
    if families.is_empty() {
        families = spec.ip_families.iter().flatten().filter_map(|f| IpFamily::from_api_name(f)).collect();
    }
    if families.is_empty() {
        families.push(IpFamily::V4);
    }
    let mut seen = BTreeSet::new();
    families.retain(|f| seen.insert(*f));
    families
}

/// The addresses of the served families, sorted; the others are skipped with their field, as
/// kube-proxy's proxier of a family ignores the other family's externalIPs and LoadBalancer IPs.
fn of_families(skips: &mut Skips, addresses: Vec<(String, IpAddr)>, families: &[IpFamily]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (field, ip) in addresses {
        let family = IpFamily::of(ip);
        if families.contains(&family) {
            out.push(ip);
        } else {
            let detail =
                format!("{ip} is {}, and the service has no {} ClusterIP", family.api_name(), family.api_name());
            skips.push(field, SkipReason::OtherFamily, detail);
        }
    }
    out.sort();
    out.dedup();
    out
}

fn source_ranges<'a>(skips: &mut Skips, texts: impl Iterator<Item = &'a String>) -> Vec<Cidr> {
    let mut out = Vec::new();
    for (i, text) in texts.enumerate() {
        match text.trim().parse::<Cidr>() {
            Ok(cidr) => out.push(cidr),
            Err(e) => skips.push(format!("spec.loadBalancerSourceRanges[{i}]"), SkipReason::BadAddress, e.to_string()),
        }
    }
    out
}

fn affinity_timeout(service: &Service) -> u32 {
    let spec = service.spec.as_ref();
    if spec.and_then(|s| s.session_affinity.as_deref()) != Some("ClientIP") {
        return 0;
    }
    let configured = spec
        .and_then(|s| s.session_affinity_config.as_ref())
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match configured {
        Some(t) if (1..=86_400).contains(&t) => t as u32,
        _ => DEFAULT_AFFINITY_TIMEOUT,
    }
}

/// A protocol name as Kubernetes writes it (absent means TCP).
pub(crate) fn parse_protocol(text: Option<&str>) -> Option<u8> {
    match text.unwrap_or("TCP") {
        "TCP" => Some(proto::TCP),
        "UDP" => Some(proto::UDP),
        "SCTP" => Some(proto::SCTP),
        _ => None,
    }
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// (name, port, protocol) of a service port, or a skip.
fn port_identity(skips: &mut Skips, index: usize, port: &ServicePort) -> Option<(String, u16, u8)> {
    let Some(protocol) = parse_protocol(port.protocol.as_deref()) else {
        let detail = format!("{:?} is not TCP, UDP or SCTP", port.protocol.as_deref().unwrap_or_default());
        skips.push(format!("spec.ports[{index}].protocol"), SkipReason::UnknownProtocol, detail);
        return None;
    };
    let Some(number) = valid_port(port.port) else {
        skips.push(
            format!("spec.ports[{index}].port"),
            SkipReason::BadPort,
            format!("{} is not in 1..=65535", port.port),
        );
        return None;
    };
    Some((port.name.clone().unwrap_or_default(), number, protocol))
}

fn node_port(skips: &mut Skips, index: usize, port: &ServicePort) -> Option<u16> {
    let node_port = port.node_port.filter(|&p| p != 0)?;
    let valid = valid_port(node_port);
    if valid.is_none() {
        skips.push(
            format!("spec.ports[{index}].nodePort"),
            SkipReason::BadPort,
            format!("{node_port} is not in 1..=65535"),
        );
    }
    valid
}

/// An endpoint with its readiness and topology hints, before the fallback rule picks a set.
struct Candidate {
    endpoint: Endpoint,
    ready: bool,
    serving: bool,
    /// The nodes of `hints.forNodes`.
    for_nodes: Vec<String>,
    /// The zones of `hints.forZones`.
    for_zones: Vec<String>,
}

/// Which hints narrow the cluster-wide set (kube-proxy's topology mode, which the EndpointSlice
/// controller's hints for `trafficDistribution` drive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// No hints apply: every endpoint.
    Any,
    /// Only endpoints hinted for this node.
    SameNode,
    /// Only endpoints hinted for this node's zone.
    SameZone,
}

impl Topology {
    /// kube-proxy's rule (pkg/proxy/topology.go `topologyModeFromHints`, PreferSameNode on): a
    /// kind of hint applies when every ready endpoint carries one (hints being rolled out must
    /// not shrink the set) and one of them names this node, or else this node's zone; otherwise
    /// every endpoint is used. Node hints come first, so PreferSameNode falls back to the zone.
    fn from_hints(candidates: &[Candidate], node: &NodeInfo) -> Self {
        let applies = |hints: fn(&Candidate) -> &[String], mine: &str| {
            let mut ready = candidates.iter().filter(|c| c.ready);
            !mine.is_empty()
                && ready.clone().all(|c| !hints(c).is_empty())
                && ready.any(|c| hints(c).iter().any(|h| h == mine))
        };
        if applies(|c| &c.for_nodes, &node.name) {
            Topology::SameNode
        } else if applies(|c| &c.for_zones, &node.zone) {
            Topology::SameZone
        } else {
            Topology::Any
        }
    }

    /// Whether `candidate` may be in the cluster-wide set. Some ready endpoint always passes
    /// when hints apply, so the terminating fallback only ever sees [`Topology::Any`], which
    /// ignores topology as kube-proxy's does.
    fn admits(self, candidate: &Candidate, node: &NodeInfo) -> bool {
        match self {
            Topology::Any => true,
            Topology::SameNode => candidate.for_nodes.contains(&node.name),
            Topology::SameZone => candidate.for_zones.contains(&node.zone),
        }
    }
}

/// The endpoints of the `family` slices' port named `port_name` with `protocol`, deduplicated
/// across slices (the first slice in name order wins). The other family's slices are its own
/// frontends' business; slices of another address type (FQDN) are skipped.
fn resolve_endpoints(
    skips: &mut Skips,
    slices: &[&Slice],
    family: IpFamily,
    port_name: &str,
    protocol: u8,
    node: &NodeInfo,
) -> Vec<Candidate> {
    let mut slices = slices.to_vec();
    slices.sort_by_key(|s| &s.name);
    let mut out: Vec<Candidate> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for slice in slices {
        let mut slice_skips = Skips { object: format!("EndpointSlice {}", slice.key()), out: Vec::new() };
        match IpFamily::from_api_name(&slice.address_type) {
            Some(f) if f == family => {}
            Some(_) => continue,
            None => {
                let other = slice.address_type.as_str();
                let detail = if other.is_empty() { "missing" } else { other };
                slice_skips.push("addressType".into(), SkipReason::UnsupportedAddressType, detail);
                skips.out.append(&mut slice_skips.out);
                continue;
            }
        }
        let Some(port) = slice_port(&mut slice_skips, slice, port_name, protocol) else {
            skips.out.append(&mut slice_skips.out);
            continue;
        };
        for (i, endpoint) in slice.endpoints.iter().enumerate() {
            // kube-proxy uses the first address of an endpoint.
            let Some(text) = endpoint.address.as_deref() else {
                slice_skips.push(format!("endpoints[{i}].addresses"), SkipReason::BadAddress, "empty");
                continue;
            };
            let field = || format!("endpoints[{i}].addresses[0]");
            let address = match parse_ip(text) {
                Some(ip) if is_ipv4_mapped(ip) => {
                    let detail = format!("{text} is IPv4-mapped IPv6: list it in an IPv4 slice");
                    slice_skips.push(field(), SkipReason::Ipv4Mapped, detail);
                    continue;
                }
                Some(ip) if IpFamily::of(ip) == family => ip,
                _ => {
                    let detail = format!("{text:?} is not an {} address", family.api_name());
                    slice_skips.push(field(), SkipReason::BadAddress, detail);
                    continue;
                }
            };
            if !seen.insert((address, port)) {
                continue;
            }
            let local = endpoint.node_name.as_deref() == Some(node.name.as_str()) && !node.name.is_empty();
            // Only a mode with DSR flags backends: under `snat` the backends map stays as it was.
            let dsr = node.lb_mode != LbMode::Snat
                && endpoint.node_name.as_deref().is_some_and(|n| node.dsr_nodes.contains(n));
            let hints = endpoint.hints.as_deref().cloned().unwrap_or_default();
            out.push(Candidate {
                endpoint: Endpoint { address, port, local, terminating: endpoint.terminating, dsr },
                ready: endpoint.ready,
                serving: endpoint.serving,
                for_nodes: hints.for_nodes,
                for_zones: hints.for_zones,
            });
        }
        skips.out.append(&mut slice_skips.out);
    }
    out
}

/// The slice's port for the service port `name`/`protocol`; absent names match the empty name.
fn slice_port(skips: &mut Skips, slice: &Slice, name: &str, protocol: u8) -> Option<u16> {
    let (i, port) = slice.ports.iter().enumerate().find(|(_, p)| {
        p.name.as_deref().unwrap_or("") == name && parse_protocol(p.protocol.as_deref()) == Some(protocol)
    })?;
    let valid = port.port.and_then(valid_port);
    if valid.is_none() {
        let detail = port.port.map_or("missing".into(), |p| format!("{p} is not in 1..=65535"));
        skips.push(format!("ports[{i}].port"), SkipReason::BadPort, detail);
    }
    valid
}

/// A chosen backend set and whether it came from the terminating fallback.
struct Usable {
    endpoints: Vec<Endpoint>,
    fallback: bool,
}

/// The ready endpoints among those `keep` admits; if none is ready, the serving and terminating
/// ones (graceful termination), as kube-proxy does.
fn usable(candidates: &[Candidate], keep: impl Fn(&Candidate) -> bool) -> Usable {
    let kept = || candidates.iter().filter(|c| keep(c));
    let mut endpoints: Vec<Endpoint> = kept().filter(|c| c.ready).map(|c| c.endpoint).collect();
    let fallback = endpoints.is_empty();
    if fallback {
        endpoints = kept().filter(|c| c.serving && c.endpoint.terminating).map(|c| c.endpoint).collect();
    }
    endpoints.sort();
    Usable { fallback: fallback && !endpoints.is_empty(), endpoints }
}

/// The service's algorithm for traffic from outside: its
/// [`LB_ALGORITHM_ANNOTATION`] when that names one, else `--lb-algorithm`. An unknown value is
/// reported and ignored.
fn lb_algorithm(service: &Service, node: &NodeInfo, skips: &mut Skips) -> LbAlgorithm {
    let annotations = service.metadata.annotations.as_ref();
    let Some(value) = annotations.and_then(|a| a.get(LB_ALGORITHM_ANNOTATION)) else { return node.lb_algorithm };
    LbAlgorithm::parse(value).unwrap_or_else(|| {
        let field = format!("metadata.annotations[{LB_ALGORITHM_ANNOTATION}]");
        skips.push(
            field,
            SkipReason::Unparseable,
            format!("{value:?} is neither random nor maglev; using --lb-algorithm"),
        );
        node.lb_algorithm
    })
}
