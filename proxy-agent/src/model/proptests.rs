//! Hostile and malformed input, generated: Services and EndpointSlices of both families that are
//! valid, nearly valid (an octet of 256, port 70000, protocol `tcp`, a slice of the wrong address
//! type, an IPv4-mapped IPv6 address, a missing label) or arbitrary text. Whatever comes in, the model must not panic, must still
//! program every valid part, and must name every invalid part in a skip with its field and
//! reason.
//!
//! Each case is generated as a plan (what each field is meant to be), built into the objects
//! the API would hold, and judged by an oracle written from docs/behaviours.md and the plan alone: the
//! frontends are exactly the valid (address, port, protocol) combinations, each frontend's
//! backends are exactly the usable endpoints, and the skips are exactly the invalid fields the
//! model reaches.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec, ServiceStatus},
        discovery::v1::{Endpoint as ApiEndpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proptest::{collection, option, prelude::*, sample::select};
use proxy_common::proto;

use super::*;

const NAMESPACE: &str = "ns";
const NODE: &str = "node-1";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, 2);

fn node() -> NodeInfo {
    NodeInfo {
        name: NODE.into(),
        nodeport_addresses: vec![NODE_IP.into(), NODE_IP6.into()],
        pod_cidrs: Vec::new(),
        localhost_nodeports: false,
        zone: String::new(),
        lb_algorithm: LbAlgorithm::Random,
        lb_mode: LbMode::Snat,
        dsr_nodes: BTreeSet::new(),
    }
}

// ---- plans: what each field is meant to be ----

/// The text of an address field.
#[derive(Clone, Debug)]
enum Text {
    /// A valid address of either family.
    Valid(IpAddr),
    /// Anything else (near misses, IPv6, arbitrary text); the oracle judges it.
    Other(String),
}

impl Text {
    fn text(&self) -> String {
        match self {
            Text::Valid(ip) => ip.to_string(),
            Text::Other(text) => text.clone(),
        }
    }
}

/// Texts that nearly are IPv4 addresses, or are IPv6 ones.
const NEAR_MISSES: &[&str] = &[
    "10.96.0.256",
    "10.96.0",
    "10.96.0.1.2",
    "10.96.0.-1",
    " 10.96.0.1",
    "10.96.0.1 ",
    "10.96.0.1\n",
    "0x0a.0.0.1",
    "1e1.0.0.1",
    "10.96.0.1/32",
    "10.96.00001.1",
    "10..0.1",
    "\u{ff11}0.96.0.1",
    "10.96.0.1%eth0",
    "+10.96.0.1",
    "fd00:10:96::a",
    "::1",
    "::ffff:10.96.0.1",
    "2001:db8::1",
    "fd00::1::2",
    "localhost",
];

/// Which kind of service this is meant to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An ordinary service the proxy serves.
    Proxied,
    /// `clusterIP: None`.
    Headless,
    /// `type: ExternalName`.
    ExternalName,
    /// Labelled for another proxy (any value of the label).
    OtherProxy,
    /// No `spec` at all.
    NoSpec,
}

#[derive(Clone, Debug)]
struct PortPlan {
    name: Option<String>,
    port: i32,
    protocol: Option<String>,
    node_port: Option<i32>,
}

#[derive(Clone, Debug)]
struct ServicePlan {
    name: String,
    kind: Kind,
    other_proxy_label: String,
    type_: Option<String>,
    /// `spec.clusterIPs` (with `spec.clusterIP` its first entry); or, when `only_cluster_ip`, just
    /// `spec.clusterIP` from the first text.
    cluster_ips: Vec<Text>,
    only_cluster_ip: bool,
    external_ips: Vec<Text>,
    /// `status.loadBalancer.ingress[].ip` (`None`: a hostname-only entry).
    lb_ips: Vec<Option<Text>>,
    external_policy: Option<String>,
    internal_policy: Option<String>,
    ports: Vec<PortPlan>,
    slices: Vec<SlicePlan>,
}

/// The slice's `kubernetes.io/service-name` label.
#[derive(Clone, Debug)]
enum Label {
    /// This service's name.
    Own,
    /// No label.
    Missing,
    /// Some other value (an absent service, empty, junk).
    Other(String),
}

#[derive(Clone, Debug)]
struct SlicePlan {
    name: String,
    label: Label,
    address_type: String,
    ports: Option<Vec<SlicePortPlan>>,
    endpoints: Vec<EndpointPlan>,
}

#[derive(Clone, Debug)]
struct SlicePortPlan {
    name: Option<String>,
    port: Option<i32>,
    protocol: Option<String>,
}

#[derive(Clone, Debug)]
struct EndpointPlan {
    addresses: Vec<Text>,
    conditions: Option<(Option<bool>, Option<bool>, Option<bool>)>,
    node_name: Option<String>,
}

// ---- strategies ----

/// An IPv4 address `a.b.<index>.h` or, a third of the time, the IPv6 `<v6>:<index>::h`.
fn arb_ip(a: u8, b: u8, v6: [u16; 3], index: u8, hosts: std::ops::RangeInclusive<u8>) -> BoxedStrategy<IpAddr> {
    prop_oneof![
        2 => hosts.clone().prop_map(move |h| IpAddr::from(Ipv4Addr::new(a, b, index, h))),
        1 => hosts.prop_map(move |h| {
            IpAddr::from(Ipv6Addr::new(v6[0], v6[1], v6[2], u16::from(index), 0, 0, 0, u16::from(h)))
        }),
    ]
    .boxed()
}

fn arb_text(valid: impl Strategy<Value = IpAddr> + 'static) -> BoxedStrategy<Text> {
    prop_oneof![
        6 => valid.prop_map(Text::Valid),
        2 => select(NEAR_MISSES).prop_map(|t| Text::Other(t.into())),
        1 => "[0-9.]{0,16}".prop_map(Text::Other),
        1 => any::<String>().prop_map(Text::Other),
    ]
    .boxed()
}

fn arb_port_number() -> BoxedStrategy<i32> {
    prop_oneof![
        8 => 1..=65_535i32,
        1 => Just(0),
        1 => 65_536..=i32::MAX,
        1 => i32::MIN..0,
    ]
    .boxed()
}

fn arb_protocol() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        3 => Just(None),
        3 => select(&["TCP", "UDP", "SCTP"][..]).prop_map(|p| Some(p.to_owned())),
        1 => select(&["tcp", "ICMP", "", "TCP ", "HTTP"][..]).prop_map(|p| Some(p.to_owned())),
        1 => ".{0,6}".prop_map(Some),
    ]
    .boxed()
}

/// Port names from a small set, so that slice ports often match service ports.
fn arb_port_name() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        2 => Just(None),
        3 => select(&["", "http", "dns"][..]).prop_map(|n| Some(n.to_owned())),
        1 => ".{0,8}".prop_map(Some),
    ]
    .boxed()
}

fn arb_policy() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some("Cluster".to_owned())),
        1 => Just(Some("Local".to_owned())),
        1 => ".{0,6}".prop_map(Some),
    ]
    .boxed()
}

fn arb_port() -> impl Strategy<Value = PortPlan> {
    let node_port = prop_oneof![
        3 => Just(None),
        1 => Just(Some(0)),
        3 => (30_000..=32_767i32).prop_map(Some),
        1 => arb_port_number().prop_map(Some),
    ];
    (arb_port_name(), arb_port_number(), arb_protocol(), node_port)
        .prop_map(|(name, port, protocol, node_port)| PortPlan { name, port, protocol, node_port })
}

fn arb_endpoint(index: u8) -> impl Strategy<Value = EndpointPlan> {
    // Few distinct pod addresses, so duplicates (within and across slices) are common.
    let address = arb_text(arb_ip(10, 244, [0xfd00, 0x10, 0x244], index, 2..=7));
    let condition = || option::of(any::<bool>());
    let node_name = prop_oneof![Just(None), Just(Some(NODE.to_owned())), Just(Some("node-2".to_owned()))];
    (collection::vec(address, 0..3), option::of((condition(), condition(), condition())), node_name)
        .prop_map(|(addresses, conditions, node_name)| EndpointPlan { addresses, conditions, node_name })
}

fn arb_slice(service: String, index: u8, k: usize) -> impl Strategy<Value = SlicePlan> {
    let label = prop_oneof![
        8 => Just(Label::Own),
        1 => Just(Label::Missing),
        1 => prop_oneof![Just(String::new()), Just("absent".to_owned()), ".{0,12}"].prop_map(Label::Other),
    ];
    let address_type = prop_oneof![
        6 => Just("IPv4".to_owned()),
        3 => Just("IPv6".to_owned()),
        1 => Just("FQDN".to_owned()),
        1 => ".{0,6}",
    ];
    let slice_port = (arb_port_name(), option::of(arb_port_number()), arb_protocol())
        .prop_map(|(name, port, protocol)| SlicePortPlan { name, port, protocol });
    let ports = option::weighted(0.9, collection::vec(slice_port, 0..4));
    (label, address_type, ports, collection::vec(arb_endpoint(index), 0..6)).prop_map(
        move |(label, address_type, ports, endpoints)| SlicePlan {
            name: format!("{service}-{k}"),
            label,
            address_type,
            ports,
            endpoints,
        },
    )
}

/// Service `svc-<index>`: its valid addresses come from blocks of its own (10.96.<index>.0/24
/// and so on), so two services collide only through arbitrary text or equal nodePorts.
fn arb_service(index: u8) -> impl Strategy<Value = ServicePlan> {
    let name = format!("svc-{index}");
    let kind = prop_oneof![
        12 => Just(Kind::Proxied),
        1 => Just(Kind::Headless),
        1 => Just(Kind::ExternalName),
        1 => Just(Kind::OtherProxy),
        1 => Just(Kind::NoSpec),
    ];
    let type_ = prop_oneof![
        2 => Just(None),
        2 => Just(Some("ClusterIP".to_owned())),
        3 => Just(Some("NodePort".to_owned())),
        2 => Just(Some("LoadBalancer".to_owned())),
        1 => ".{0,8}".prop_map(Some),
    ];
    let cluster_ip = arb_text(arb_ip(10, 96, [0xfd00, 0x10, 0x96], index, 1..=250));
    let external_ip = arb_text(arb_ip(192, 0, [0x2001, 0xdb8, 0x192], index, 1..=250));
    let lb_ip = option::weighted(0.8, arb_text(arb_ip(198, 51, [0x2001, 0xdb8, 0x198], index, 1..=250)));
    let addresses = (
        collection::vec(cluster_ip, 0..3),
        any::<bool>(),
        collection::vec(external_ip, 0..3),
        collection::vec(lb_ip, 0..2),
    );
    let policies = (arb_policy(), arb_policy(), prop_oneof![Just(String::new()), ".{0,8}"]);
    let slice_count = 0..4usize;
    (kind, type_, addresses, policies, collection::vec(arb_port(), 0..5), slice_count).prop_flat_map(
        move |(kind, type_, (cluster_ips, only_cluster_ip, external_ips, lb_ips), policies, ports, slices)| {
            let name = name.clone();
            let slices: Vec<_> = (0..slices).map(|k| arb_slice(name.clone(), index, k)).collect();
            let (external_policy, internal_policy, other_proxy_label) = policies;
            let plan = ServicePlan {
                name,
                kind,
                other_proxy_label,
                type_,
                cluster_ips,
                only_cluster_ip,
                external_ips,
                lb_ips,
                external_policy,
                internal_policy,
                ports,
                slices: Vec::new(),
            };
            (Just(plan), slices).prop_map(|(plan, slices)| ServicePlan { slices, ..plan })
        },
    )
}

fn arb_services() -> impl Strategy<Value = Vec<ServicePlan>> {
    (1..4u8).prop_flat_map(|n| (0..n).map(arb_service).collect::<Vec<_>>())
}

// ---- plans into objects ----

fn build_service(plan: &ServicePlan) -> Service {
    let mut labels = BTreeMap::new();
    if plan.kind == Kind::OtherProxy {
        labels.insert(SERVICE_PROXY_NAME_LABEL.to_owned(), plan.other_proxy_label.clone());
    }
    let metadata = ObjectMeta {
        name: Some(plan.name.clone()),
        namespace: Some(NAMESPACE.into()),
        labels: (!labels.is_empty()).then_some(labels),
        ..ObjectMeta::default()
    };
    if plan.kind == Kind::NoSpec {
        return Service { metadata, spec: None, status: None };
    }
    let texts: Vec<String> = plan.cluster_ips.iter().map(Text::text).collect();
    let (cluster_ip, cluster_ips) = match plan.kind {
        Kind::Headless => (Some("None".to_owned()), Some(vec!["None".to_owned()])),
        _ if plan.only_cluster_ip => (texts.first().cloned(), None),
        _ => (texts.first().cloned(), Some(texts)),
    };
    let type_ = if plan.kind == Kind::ExternalName { Some("ExternalName".to_owned()) } else { plan.type_.clone() };
    let ports = plan
        .ports
        .iter()
        .map(|p| ServicePort {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.clone(),
            node_port: p.node_port,
            ..ServicePort::default()
        })
        .collect();
    let spec = ServiceSpec {
        type_,
        cluster_ip,
        cluster_ips,
        external_ips: Some(plan.external_ips.iter().map(Text::text).collect()),
        external_traffic_policy: plan.external_policy.clone(),
        internal_traffic_policy: plan.internal_policy.clone(),
        ports: Some(ports),
        ..ServiceSpec::default()
    };
    let ingress = plan
        .lb_ips
        .iter()
        .map(|ip| match ip {
            Some(ip) => LoadBalancerIngress { ip: Some(ip.text()), ..LoadBalancerIngress::default() },
            None => LoadBalancerIngress { hostname: Some("lb.example.com".into()), ..LoadBalancerIngress::default() },
        })
        .collect();
    let status = ServiceStatus {
        load_balancer: Some(LoadBalancerStatus { ingress: Some(ingress) }),
        ..ServiceStatus::default()
    };
    Service { metadata, spec: Some(spec), status: Some(status) }
}

fn build_slice(service: &str, plan: &SlicePlan) -> EndpointSlice {
    let label = match &plan.label {
        Label::Own => Some(service.to_owned()),
        Label::Missing => None,
        Label::Other(value) => Some(value.clone()),
    };
    let endpoints = plan
        .endpoints
        .iter()
        .map(|e| ApiEndpoint {
            addresses: e.addresses.iter().map(Text::text).collect(),
            conditions: e.conditions.map(|(ready, serving, terminating)| EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            node_name: e.node_name.clone(),
            ..ApiEndpoint::default()
        })
        .collect();
    let ports = plan.ports.as_ref().map(|ports| {
        ports
            .iter()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: p.port,
                protocol: p.protocol.clone(),
                ..EndpointPort::default()
            })
            .collect()
    });
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(plan.name.clone()),
            namespace: Some(NAMESPACE.into()),
            labels: label.map(|l| BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), l)])),
            ..ObjectMeta::default()
        },
        address_type: plan.address_type.clone(),
        endpoints,
        ports,
    }
}

// ---- the oracle, from docs/behaviours.md and the plan ----

/// What an address text is, judged independently of the model: IPv4 as Kubernetes parses it
/// (four decimal parts of one to three digits, leading zeros allowed), IPv6, or neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Judged {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
    Mapped,
    Bad,
}

impl Judged {
    /// The address, if it is one the model may serve.
    fn ip(self) -> Option<IpAddr> {
        match self {
            Judged::V4(ip) => Some(ip.into()),
            Judged::V6(ip) => Some(ip.into()),
            Judged::Mapped | Judged::Bad => None,
        }
    }
}

fn judge(text: &str) -> Judged {
    let parts: Vec<&str> = text.split('.').collect();
    let octets: Vec<u8> = parts
        .iter()
        .filter(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|p| p.parse().ok())
        .collect();
    if parts.len() == 4 && octets.len() == 4 {
        return Judged::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]));
    }
    match text.parse::<Ipv6Addr>() {
        Ok(ip) if ip.to_ipv4_mapped().is_some() => Judged::Mapped,
        Ok(ip) => Judged::V6(ip),
        Err(_) => Judged::Bad,
    }
}

fn protocol_of(text: Option<&str>) -> Option<u8> {
    match text {
        None | Some("TCP") => Some(proto::TCP),
        Some("UDP") => Some(proto::UDP),
        Some("SCTP") => Some(proto::SCTP),
        Some(_) => None,
    }
}

fn port_of(number: i32) -> Option<u16> {
    (1..=65_535).contains(&number).then_some(number as u16)
}

/// A skip as the oracle expects it: (object, field, reason).
type Expected = (String, String, SkipReason);

/// What one service must come to.
#[derive(Debug, Default)]
struct Oracle {
    /// Every frontend, with the names of the service ports that may own it.
    frontends: BTreeMap<Frontend, BTreeSet<String>>,
    /// Every skip.
    skips: BTreeSet<Expected>,
}

impl ServicePlan {
    fn object(&self) -> String {
        format!("Service {NAMESPACE}/{}", self.name)
    }

    fn proxied(&self) -> bool {
        self.kind == Kind::Proxied
    }

    fn own_slices(&self) -> impl Iterator<Item = &SlicePlan> {
        self.slices.iter().filter(|s| matches!(s.label, Label::Own))
    }

    fn oracle(&self, node: &NodeInfo) -> Oracle {
        let mut out = Oracle::default();
        if self.kind == Kind::NoSpec {
            out.skips.insert((self.object(), "spec".into(), SkipReason::Unparseable));
        }
        if !self.proxied() {
            return out;
        }
        let object = self.object();
        let addresses = |fields: Vec<(String, String)>, out: &mut Oracle| {
            let mut valid = Vec::new();
            for (field, text) in fields {
                match judge(&text) {
                    Judged::Mapped => {
                        out.skips.insert((object.clone(), field, SkipReason::Ipv4Mapped));
                    }
                    Judged::Bad => {
                        out.skips.insert((object.clone(), field, SkipReason::BadAddress));
                    }
                    judged => valid.extend(judged.ip().map(|ip| (field, ip))),
                }
            }
            valid
        };
        let cluster_fields: Vec<(String, String)> = if self.only_cluster_ip {
            self.cluster_ips.first().map(|t| ("spec.clusterIP".to_owned(), t.text())).into_iter().collect()
        } else {
            self.cluster_ips.iter().enumerate().map(|(i, t)| (format!("spec.clusterIPs[{i}]"), t.text())).collect()
        };
        // An empty ClusterIP is no ClusterIP (the API's "unset").
        let cluster = addresses(cluster_fields.into_iter().filter(|(_, t)| !t.is_empty()).collect(), &mut out);
        let external_fields =
            self.external_ips.iter().enumerate().map(|(i, t)| (format!("spec.externalIPs[{i}]"), t.text())).collect();
        let external = addresses(external_fields, &mut out);
        let lb_fields = self
            .lb_ips
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((format!("status.loadBalancer.ingress[{i}].ip"), t.as_ref()?.text())))
            .collect();
        let lb = addresses(lb_fields, &mut out);
        // The families of the ClusterIPs, else IPv4; other families' addresses are skipped.
        let mut families: Vec<IpFamily> = Vec::new();
        for (_, ip) in &cluster {
            if !families.contains(&IpFamily::of(*ip)) {
                families.push(IpFamily::of(*ip));
            }
        }
        if families.is_empty() {
            families.push(IpFamily::V4);
        }
        let served = |list: Vec<(String, IpAddr)>, out: &mut Oracle| {
            let mut kept = Vec::new();
            for (field, ip) in list {
                if families.contains(&IpFamily::of(ip)) {
                    kept.push(ip);
                } else {
                    out.skips.insert((object.clone(), field, SkipReason::OtherFamily));
                }
            }
            kept
        };
        let cluster = served(cluster, &mut out);
        let external = served(external, &mut out);
        let lb = served(lb, &mut out);
        let node_ports = matches!(self.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        for (i, port) in self.ports.iter().enumerate() {
            let Some(protocol) = protocol_of(port.protocol.as_deref()) else {
                out.skips.insert((object.clone(), format!("spec.ports[{i}].protocol"), SkipReason::UnknownProtocol));
                continue;
            };
            let Some(number) = port_of(port.port) else {
                out.skips.insert((object.clone(), format!("spec.ports[{i}].port"), SkipReason::BadPort));
                continue;
            };
            let name = port.name.clone().unwrap_or_default();
            let mut add = |address: IpAddr, port: u16| {
                out.frontends.entry(Frontend { address, port, proto: protocol }).or_default().insert(name.clone());
            };
            for &ip in cluster.iter().chain(&external).chain(&lb) {
                add(ip, number);
            }
            if node_ports && let Some(node_port) = port.node_port.filter(|p| *p != 0) {
                match port_of(node_port) {
                    Some(node_port) => node
                        .nodeport_addresses
                        .iter()
                        .filter(|ip| families.contains(&IpFamily::of(**ip)))
                        .for_each(|ip| add(*ip, node_port)),
                    None => {
                        out.skips.insert((object.clone(), format!("spec.ports[{i}].nodePort"), SkipReason::BadPort));
                    }
                }
            }
            for &family in &families {
                self.slice_skips(&name, protocol, family, &mut out.skips);
            }
        }
        out
    }

    /// The skips resolving the service port (`name`, `protocol`) for `family` meets in this
    /// service's slices: those of the family, and those of no family.
    fn slice_skips(&self, name: &str, protocol: u8, family: IpFamily, skips: &mut BTreeSet<Expected>) {
        for slice in self.own_slices() {
            let object = format!("EndpointSlice {NAMESPACE}/{}", slice.name);
            match slice.address_type.as_str() {
                t if t == family.api_name() => {}
                "IPv4" | "IPv6" => continue,
                _ => {
                    skips.insert((object, "addressType".into(), SkipReason::UnsupportedAddressType));
                    continue;
                }
            }
            let Some((j, port)) = slice_port(slice, name, protocol) else { continue };
            if port.port.and_then(port_of).is_none() {
                skips.insert((object, format!("ports[{j}].port"), SkipReason::BadPort));
                continue;
            }
            for (i, endpoint) in slice.endpoints.iter().enumerate() {
                let Some(first) = endpoint.addresses.first() else {
                    skips.insert((object.clone(), format!("endpoints[{i}].addresses"), SkipReason::BadAddress));
                    continue;
                };
                let field = format!("endpoints[{i}].addresses[0]");
                match judge(&first.text()) {
                    Judged::Mapped => {
                        skips.insert((object.clone(), field, SkipReason::Ipv4Mapped));
                    }
                    judged if judged.ip().is_some_and(|ip| IpFamily::of(ip) == family) => {}
                    _ => {
                        skips.insert((object.clone(), field, SkipReason::BadAddress));
                    }
                }
            }
        }
    }

    /// The endpoints of `family` the service port (`name`, `protocol`) may use among those `keep` admits:
    /// the ready ones, else the serving and terminating ones. The first occurrence of an
    /// address and port (slices in name order) is the one that counts.
    fn usable(&self, name: &str, protocol: u8, family: IpFamily, keep: impl Fn(&Endpoint) -> bool) -> Vec<Endpoint> {
        let mut slices: Vec<&SlicePlan> = self.own_slices().filter(|s| s.address_type == family.api_name()).collect();
        slices.sort_by(|a, b| a.name.cmp(&b.name));
        let mut seen = HashSet::new();
        let mut candidates = Vec::new();
        for slice in slices {
            let Some(port) = slice_port(slice, name, protocol).and_then(|(_, p)| p.port.and_then(port_of)) else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let address = endpoint.addresses.first().and_then(|t| judge(&t.text()).ip());
                let Some(address) = address.filter(|ip| IpFamily::of(*ip) == family) else { continue };
                if !seen.insert((address, port)) {
                    continue;
                }
                let (ready, serving, terminating) = endpoint.conditions.unwrap_or_default();
                let terminating = terminating.unwrap_or(false);
                let local = endpoint.node_name.as_deref() == Some(NODE);
                let endpoint_ = Endpoint { address, port, local, terminating, dsr: false };
                candidates.push((endpoint_, ready.unwrap_or(true), serving.unwrap_or(true)));
            }
        }
        candidates.retain(|(e, _, _)| keep(e));
        let ready: Vec<Endpoint> = candidates.iter().filter(|c| c.1).map(|c| c.0).collect();
        let mut set = if ready.is_empty() {
            candidates.iter().filter(|c| c.2 && c.0.terminating).map(|c| c.0).collect()
        } else {
            ready
        };
        set.sort();
        set
    }
}

/// The slice's port for a service port: the first one with the same name (absent is empty) and
/// protocol.
fn slice_port<'a>(slice: &'a SlicePlan, name: &str, protocol: u8) -> Option<(usize, &'a SlicePortPlan)> {
    slice
        .ports
        .iter()
        .flatten()
        .enumerate()
        .find(|(_, p)| p.name.as_deref().unwrap_or("") == name && protocol_of(p.protocol.as_deref()) == Some(protocol))
}

/// One service through `service_frontends`, judged against the oracle; returns the model's answer.
fn check_service(plan: &ServicePlan) -> Result<Desired, TestCaseError> {
    let node = node();
    let service = build_service(plan);
    let slices: Vec<Slice> = plan.own_slices().map(|s| build_slice(&plan.name, s).into()).collect();
    let refs: Vec<&Slice> = slices.iter().collect();
    let desired = service_frontends(&service, &refs, &node);
    let oracle = plan.oracle(&node);

    let got: BTreeSet<&Frontend> = desired.frontends.keys().collect();
    let want: BTreeSet<&Frontend> = oracle.frontends.keys().collect();
    prop_assert_eq!(got, want, "frontends of {}", plan.name);

    let int_local = plan.internal_policy.as_deref() == Some("Local");
    let ext_local = plan.external_policy.as_deref() == Some("Local");
    for (frontend, entry) in &desired.frontends {
        let names = &oracle.frontends[frontend];
        prop_assert!(names.contains(&entry.service.port), "{frontend} belongs to port {:?}", entry.service.port);
        prop_assert_eq!(&entry.service.name, &plan.name);
        let (name, protocol) = (entry.service.port.as_str(), frontend.proto);
        let local_only = if entry.kind.is_external() { ext_local } else { int_local };
        let family = IpFamily::of(frontend.address);
        let want = plan.usable(name, protocol, family, |e| !local_only || e.local);
        prop_assert_eq!(&entry.backends, &want, "backends of {} ({:?})", frontend, entry.kind);
        if entry.kind.is_external() && ext_local {
            prop_assert_eq!(entry.internal.as_ref(), Some(&plan.usable(name, protocol, family, |_| true)));
        } else {
            prop_assert_eq!(entry.internal.as_ref(), None);
        }
    }

    let got: BTreeSet<Expected> =
        desired.skipped.iter().map(|s| (s.object.clone(), s.field.clone(), s.reason)).collect();
    prop_assert_eq!(&got, &oracle.skips, "skips of {}", plan.name);
    Ok(desired)
}

/// Several services and all their slices (mislabelled ones too) through `desired`.
fn check_desired(plans: &[ServicePlan]) -> Result<(), TestCaseError> {
    let node = node();
    let services: Vec<Service> = plans.iter().map(build_service).collect();
    let slices: Vec<Slice> =
        plans.iter().flat_map(|p| p.slices.iter().map(|s| build_slice(&p.name, s).into())).collect();
    let desired = desired(&services, &slices, &node);

    // Every frontend of every service is served, by it or (when contested) by another one,
    // with a conflict skip naming the loser.
    let conflicts: BTreeSet<&str> = desired
        .skipped
        .iter()
        .filter(|s| s.reason == SkipReason::FrontendConflict)
        .map(|s| s.object.as_str())
        .collect();
    let mut wanted = BTreeSet::new();
    for plan in plans {
        for frontend in plan.oracle(&node).frontends.keys() {
            wanted.insert(*frontend);
            let served_by = desired.frontends.get(frontend).map(|e| e.service.name.as_str());
            prop_assert!(
                served_by == Some(plan.name.as_str()) || (served_by.is_some() && conflicts.contains(&*plan.object())),
                "{frontend} of {} is served by {served_by:?}",
                plan.name
            );
        }
    }
    let got: BTreeSet<Frontend> = desired.frontends.keys().copied().collect();
    prop_assert_eq!(got, wanted, "no frontend is invented");

    let mut want: BTreeSet<Expected> = plans.iter().flat_map(|p| p.oracle(&node).skips).collect();
    let names: BTreeSet<&str> = plans.iter().map(|p| p.name.as_str()).collect();
    for plan in plans {
        for slice in &plan.slices {
            let object = format!("EndpointSlice {NAMESPACE}/{}", slice.name);
            let field = format!("metadata.labels[{SERVICE_NAME_LABEL}]");
            match &slice.label {
                Label::Own => {}
                Label::Missing => {
                    want.insert((object, field, SkipReason::MissingServiceLabel));
                }
                // A label naming one of the services makes the slice that service's.
                Label::Other(value) if names.contains(value.as_str()) => {}
                Label::Other(_) => {
                    want.insert((object, field, SkipReason::NoService));
                }
            }
        }
    }
    let got: BTreeSet<Expected> = desired
        .skipped
        .iter()
        .filter(|s| s.reason != SkipReason::FrontendConflict)
        .map(|s| (s.object.clone(), s.field.clone(), s.reason))
        .collect();
    // Slices relabelled onto another service bring that service their own skips: compare the
    // skips the oracle cannot attribute only loosely.
    let relabelled =
        plans.iter().flat_map(|p| &p.slices).any(|s| matches!(&s.label, Label::Other(v) if names.contains(v.as_str())));
    if relabelled {
        prop_assert!(want.iter().filter(|w| !w.0.starts_with("EndpointSlice")).all(|w| got.contains(w)));
    } else {
        prop_assert_eq!(got, want);
    }
    Ok(())
}

proptest! {
    // A failing case is printed, not saved next to the source.
    #![proptest_config(ProptestConfig { failure_persistence: None, cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_service_yields_its_valid_frontends_and_a_skip_per_invalid_field(plan in arb_service(0)) {
        check_service(&plan)?;
    }

    #[test]
    fn any_set_of_services_and_slices_is_served_or_skipped_never_a_panic(plans in arb_services()) {
        check_desired(&plans)?;
    }

    #[test]
    fn arbitrary_text_in_every_string_field_never_panics(
        texts in collection::vec(any::<String>(), 12),
        numbers in collection::vec(any::<i32>(), 3),
    ) {
        // No plan: raw text straight into the objects (names, labels, types, policies too).
        let t = |i: usize| texts[i].clone();
        let service = Service {
            metadata: ObjectMeta {
                name: Some(t(0)),
                namespace: Some(t(1)),
                labels: Some(BTreeMap::from([(t(2), t(3))])),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(t(4)),
                cluster_ip: Some(t(5)),
                cluster_ips: Some(vec![t(5), t(6)]),
                external_ips: Some(vec![t(7)]),
                external_traffic_policy: Some(t(8)),
                session_affinity: Some(t(9)),
                ports: Some(vec![ServicePort {
                    name: Some(t(10)),
                    port: numbers[0],
                    node_port: Some(numbers[1]),
                    protocol: Some(t(11)),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        };
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(t(0)),
                namespace: Some(t(1)),
                labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), t(0))])),
                ..ObjectMeta::default()
            },
            address_type: t(2),
            endpoints: vec![ApiEndpoint { addresses: vec![t(3), t(7)], node_name: Some(t(4)), ..ApiEndpoint::default() }],
            ports: Some(vec![EndpointPort {
                name: Some(t(10)),
                port: Some(numbers[2]),
                protocol: Some(t(11)),
                ..EndpointPort::default()
            }]),
        };
        let node = NodeInfo { name: t(4), ..node() };
        let slice = Slice::from(slice);
        let one = service_frontends(&service, &[&slice], &node);
        let all = desired([&service], [&slice], &node);
        prop_assert_eq!(one.frontends.len(), all.frontends.len());
        for skip in one.skipped.iter().chain(&all.skipped) {
            prop_assert!(!skip.field.is_empty() && !skip.object.is_empty(), "{skip}");
        }
    }
}

// ---- sizes no generator reaches in a reasonable number of cases ----

/// A valid service at 10.96.0.10 with `ports` ports (80, 81, ...; TCP) named `p<i>`.
fn big_service(ports: usize) -> ServicePlan {
    ServicePlan {
        name: "svc-0".into(),
        kind: Kind::Proxied,
        other_proxy_label: String::new(),
        type_: Some("NodePort".into()),
        cluster_ips: vec![Text::Valid(Ipv4Addr::new(10, 96, 0, 10).into())],
        only_cluster_ip: false,
        external_ips: Vec::new(),
        lb_ips: Vec::new(),
        external_policy: None,
        internal_policy: None,
        ports: (0..ports)
            .map(|i| PortPlan {
                name: Some(format!("p{i}")),
                port: 80 + i as i32,
                protocol: None,
                node_port: Some(30_000 + i as i32),
            })
            .collect(),
        slices: Vec::new(),
    }
}

fn ready(address: Ipv4Addr) -> EndpointPlan {
    EndpointPlan { addresses: vec![Text::Valid(address.into())], conditions: None, node_name: Some(NODE.into()) }
}

/// 2 000 ports, some of them broken, each with its own endpoints in one slice.
#[test]
fn thousands_of_ports_each_served_or_skipped() {
    let mut plan = big_service(2_000);
    for (i, port) in plan.ports.iter_mut().enumerate() {
        match i % 100 {
            1 => port.port = 70_000,
            2 => port.protocol = Some("ICMP".into()),
            3 => port.node_port = Some(-1),
            _ => {}
        }
    }
    let ports =
        (0..2_000).map(|i| SlicePortPlan { name: Some(format!("p{i}")), port: Some(8_000 + i), protocol: None });
    plan.slices.push(SlicePlan {
        name: "svc-0-a".into(),
        label: Label::Own,
        address_type: "IPv4".into(),
        ports: Some(ports.collect()),
        endpoints: (2..=4).map(|h| ready(Ipv4Addr::new(10, 244, 1, h))).collect(),
    });
    let started = Instant::now();
    let desired = check_service(&plan).unwrap();
    check_desired(std::slice::from_ref(&plan)).unwrap();
    // 2 000 ports × (ClusterIP + nodePort), less the broken ones.
    assert_eq!(desired.frontends.len(), 2 * 2_000 - 2 * 40 - 20);
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

/// The number of endpoints of [`one_hundred_thousand_endpoints_in_one_service`].
const HUGE: usize = 100_000;

/// One service with 100 000 endpoints over 10 slices, some duplicated and some broken: the
/// model keeps every distinct valid one, once, and names each broken one.
#[test]
fn one_hundred_thousand_endpoints_in_one_service() {
    let mut plan = big_service(1);
    let address = |n: usize| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + n as u32);
    for k in 0..10 {
        let mut endpoints: Vec<EndpointPlan> = (0..HUGE / 10).map(|i| ready(address(k * HUGE / 10 + i))).collect();
        // A few broken addresses and duplicates of another slice's endpoints in every slice.
        endpoints[0].addresses = vec![Text::Other("10.244.0.300".into())];
        endpoints[1] = ready(address((k + 1) % 10 * HUGE / 10 + 5));
        plan.slices.push(SlicePlan {
            name: format!("svc-0-{k}"),
            label: Label::Own,
            address_type: "IPv4".into(),
            ports: Some(vec![SlicePortPlan { name: Some("p0".into()), port: Some(8080), protocol: None }]),
            endpoints,
        });
    }
    let started = Instant::now();
    let desired = check_service(&plan).unwrap();
    let elapsed = started.elapsed();
    let cluster =
        &desired.frontends[&Frontend { address: Ipv4Addr::new(10, 96, 0, 10).into(), port: 80, proto: proto::TCP }];
    // Each slice loses its first endpoint (broken) and its second (a duplicate of another's).
    assert_eq!(cluster.backends.len(), HUGE - 2 * 10);
    assert_eq!(desired.skipped.iter().filter(|s| s.reason == SkipReason::BadAddress).count(), 10);
    eprintln!("100 000 endpoints: the model and the oracle took {elapsed:?}");
}
