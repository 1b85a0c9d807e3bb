//! The rules of docs/behaviours.md "Service semantics", one case each, on objects built with small builders.
//! Every expected value is written from the case's own inputs.

use std::{collections::BTreeSet, fmt::Debug, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeStatus, Service,
            ServicePort, ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{self as discovery, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proxy_common::{
    proto::{TCP, UDP},
    service::*,
};

use super::*;

const NODE: &str = "node-1";

// ---- builders ----

/// A Service in namespace `default`, type ClusterIP until a method says otherwise.
fn service(name: &str) -> ServiceBuilder {
    ServiceBuilder(Service {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some("default".into()), ..ObjectMeta::default() },
        spec: Some(ServiceSpec { type_: Some("ClusterIP".into()), ..ServiceSpec::default() }),
        status: None,
    })
}

struct ServiceBuilder(Service);

impl ServiceBuilder {
    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_with(ServiceSpec::default)
    }

    fn last_port(&mut self) -> &mut ServicePort {
        self.spec().ports.as_mut().and_then(|p| p.last_mut()).expect("add a port first")
    }

    fn namespace(mut self, namespace: &str) -> Self {
        self.0.metadata.namespace = Some(namespace.into());
        self
    }

    fn label(mut self, key: &str, value: &str) -> Self {
        self.0.metadata.labels.get_or_insert_with(Default::default).insert(key.into(), value.into());
        self
    }

    fn type_(mut self, type_: &str) -> Self {
        self.spec().type_ = Some(type_.into());
        self
    }

    /// `spec.clusterIP` alone, as a hand-written manifest has it.
    fn cluster_ip(mut self, ip: &str) -> Self {
        self.spec().cluster_ip = Some(ip.into());
        self
    }

    /// `spec.clusterIPs`, with `spec.clusterIP` the first of them, as the API server writes them.
    fn cluster_ips(mut self, ips: &[&str]) -> Self {
        let spec = self.spec();
        spec.cluster_ip = ips.first().map(|ip| (*ip).into());
        spec.cluster_ips = Some(ips.iter().map(|ip| (*ip).into()).collect());
        self
    }

    /// An unnamed port (protocol absent, which means TCP).
    fn port(self, port: i32) -> Self {
        self.named_port("", port)
    }

    fn named_port(mut self, name: &str, port: i32) -> Self {
        let name = (!name.is_empty()).then(|| name.to_owned());
        let ports = self.spec().ports.get_or_insert_with(Vec::new);
        ports.push(ServicePort { name, port, ..ServicePort::default() });
        self
    }

    /// The protocol of the last port.
    fn protocol(mut self, protocol: &str) -> Self {
        self.last_port().protocol = Some(protocol.into());
        self
    }

    /// The nodePort of the last port; makes the service a NodePort one unless it is a
    /// LoadBalancer.
    fn node_port(mut self, node_port: i32) -> Self {
        self.last_port().node_port = Some(node_port);
        let spec = self.spec();
        if spec.type_.as_deref() != Some("LoadBalancer") {
            spec.type_ = Some("NodePort".into());
        }
        self
    }

    fn external_ip(mut self, ip: &str) -> Self {
        self.spec().external_ips.get_or_insert_with(Vec::new).push(ip.into());
        self
    }

    /// A LoadBalancer ingress entry with `ip`; makes the service a LoadBalancer.
    fn load_balancer_ip(self, ip: &str) -> Self {
        self.load_balancer_ingress(LoadBalancerIngress { ip: Some(ip.into()), ..LoadBalancerIngress::default() })
    }

    /// A LoadBalancer ingress entry with only a hostname.
    fn load_balancer_hostname(self, hostname: &str) -> Self {
        self.load_balancer_ingress(LoadBalancerIngress {
            hostname: Some(hostname.into()),
            ..LoadBalancerIngress::default()
        })
    }

    fn load_balancer_ingress(mut self, ingress: LoadBalancerIngress) -> Self {
        self.spec().type_ = Some("LoadBalancer".into());
        let status = self.0.status.get_or_insert_with(ServiceStatus::default);
        status
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default)
            .ingress
            .get_or_insert_with(Vec::new)
            .push(ingress);
        self
    }

    fn source_range(mut self, cidr: &str) -> Self {
        self.spec().load_balancer_source_ranges.get_or_insert_with(Vec::new).push(cidr.into());
        self
    }

    fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().external_traffic_policy = Some(policy.into());
        self
    }

    fn internal_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().internal_traffic_policy = Some(policy.into());
        self
    }

    fn session_affinity(mut self, affinity: &str) -> Self {
        self.spec().session_affinity = Some(affinity.into());
        self
    }

    fn affinity_timeout(mut self, seconds: i32) -> Self {
        self.spec().session_affinity_config =
            Some(SessionAffinityConfig { client_ip: Some(ClientIPConfig { timeout_seconds: Some(seconds) }) });
        self
    }

    /// `spec.ipFamilies` (what `ipFamilyPolicy` asked for and the API server granted).
    fn ip_families(mut self, families: &[&str]) -> Self {
        self.spec().ip_families = Some(families.iter().map(|f| (*f).into()).collect());
        self
    }

    fn external_name(mut self, name: &str) -> Self {
        let spec = self.spec();
        spec.type_ = Some("ExternalName".into());
        spec.external_name = Some(name.into());
        self
    }

    fn build(self) -> Service {
        self.0
    }
}

/// An IPv4 EndpointSlice `name` in namespace `default`, labelled for `service`.
fn slice(service: &str, name: &str) -> SliceBuilder {
    SliceBuilder(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: Vec::new(),
        ports: None,
    })
}

struct SliceBuilder(EndpointSlice);

impl SliceBuilder {
    fn conditions(&mut self) -> &mut EndpointConditions {
        self.0
            .endpoints
            .last_mut()
            .expect("add an endpoint first")
            .conditions
            .get_or_insert_with(EndpointConditions::default)
    }

    fn namespace(mut self, namespace: &str) -> Self {
        self.0.metadata.namespace = Some(namespace.into());
        self
    }

    fn unlabelled(mut self) -> Self {
        self.0.metadata.labels = None;
        self
    }

    fn address_type(mut self, address_type: &str) -> Self {
        self.0.address_type = address_type.into();
        self
    }

    /// An unnamed port (protocol absent, which means TCP).
    fn port(self, port: i32) -> Self {
        self.named_port("", port)
    }

    fn named_port(mut self, name: &str, port: i32) -> Self {
        let name = (!name.is_empty()).then(|| name.to_owned());
        self.0.ports.get_or_insert_with(Vec::new).push(EndpointPort {
            name,
            port: Some(port),
            ..EndpointPort::default()
        });
        self
    }

    /// The protocol of the last port.
    fn protocol(mut self, protocol: &str) -> Self {
        let port = self.0.ports.as_mut().and_then(|p| p.last_mut()).expect("add a port first");
        port.protocol = Some(protocol.into());
        self
    }

    /// An endpoint with no conditions (which means ready) and no node.
    fn endpoint(mut self, address: &str) -> Self {
        self.0
            .endpoints
            .push(discovery::Endpoint { addresses: vec![address.into()], ..discovery::Endpoint::default() });
        self
    }

    /// The node of the last endpoint.
    fn on_node(mut self, node: &str) -> Self {
        self.0.endpoints.last_mut().expect("add an endpoint first").node_name = Some(node.into());
        self
    }

    fn not_ready(mut self) -> Self {
        self.conditions().ready = Some(false);
        self
    }

    /// `hints.forNodes` of the last endpoint.
    fn for_nodes(mut self, nodes: &[&str]) -> Self {
        let hints = self.hints();
        hints.for_nodes = Some(nodes.iter().map(|n| discovery::ForNode { name: (*n).into() }).collect());
        self
    }

    /// `hints.forZones` of the last endpoint.
    fn for_zones(mut self, zones: &[&str]) -> Self {
        let hints = self.hints();
        hints.for_zones = Some(zones.iter().map(|z| discovery::ForZone { name: (*z).into() }).collect());
        self
    }

    fn hints(&mut self) -> &mut discovery::EndpointHints {
        let endpoint = self.0.endpoints.last_mut().expect("add an endpoint first");
        endpoint.hints.get_or_insert_with(discovery::EndpointHints::default)
    }

    fn serving(mut self) -> Self {
        self.conditions().serving = Some(true);
        self
    }

    fn not_serving(mut self) -> Self {
        self.conditions().serving = Some(false);
        self
    }

    fn terminating(mut self) -> Self {
        self.conditions().terminating = Some(true);
        self
    }

    fn build(self) -> EndpointSlice {
        self.0
    }
}

/// This node, serving nodePorts on `addresses`.
fn node(addresses: &[&str]) -> NodeInfo {
    NodeInfo {
        name: NODE.into(),
        nodeport_addresses: addresses.iter().map(|a| ip(a)).collect(),
        pod_cidrs: Vec::new(),
        localhost_nodeports: false,
        zone: String::new(),
        lb_algorithm: LbAlgorithm::Random,
        lb_mode: LbMode::Snat,
        dsr_nodes: BTreeSet::new(),
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test addresses parse")
}

fn tcp(address: &str, port: u16) -> Frontend {
    Frontend { address: ip(address), port, proto: TCP }
}

fn udp(address: &str, port: u16) -> Frontend {
    Frontend { address: ip(address), port, proto: UDP }
}

/// `service_frontends` over owned slices, kept as the sources keep them.
fn compute(service: &Service, slices: &[EndpointSlice], node: &NodeInfo) -> Desired {
    let slices = compact(slices);
    let slices: Vec<&Slice> = slices.iter().collect();
    service_frontends(service, &slices, node)
}

/// `slices` as the sources keep them.
fn compact(slices: &[EndpointSlice]) -> Vec<Slice> {
    slices.iter().cloned().map(Slice::from).collect()
}

/// The entry of `frontend`, or a panic naming the rule and what is there instead.
fn entry<'a>(desired: &'a Desired, frontend: Frontend, rule: &str) -> &'a FrontendEntry {
    desired.frontends.get(&frontend).unwrap_or_else(|| {
        let present: Vec<String> = desired.frontends.keys().map(ToString::to_string).collect();
        panic!("{rule}: no frontend {frontend}; present: {present:?}")
    })
}

/// `address:port` of each endpoint, sorted.
fn endpoints(set: &[Endpoint]) -> Vec<String> {
    let mut out: Vec<String> = set.iter().map(|e| format!("{}:{}", e.address, e.port)).collect();
    out.sort();
    out
}

fn strings(items: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
    out.sort();
    out
}

/// (object, field, reason) of every skip.
fn skips(desired: &Desired) -> BTreeSet<(String, String, SkipReason)> {
    desired.skipped.iter().map(|s| (s.object.clone(), s.field.clone(), s.reason)).collect()
}

/// The rules a table broke, so that one run names all of them, not only the first.
#[derive(Default)]
#[must_use = "call `assert_none`"]
struct Broken(Vec<String>);

impl Broken {
    fn check_eq<T: PartialEq + Debug>(&mut self, rule: &str, what: &str, got: T, want: T) {
        if got != want {
            self.0.push(format!("{rule}\n    {what}: got {got:?}, want {want:?}"));
        }
    }

    fn check(&mut self, rule: &str, ok: bool, what: &str) {
        if !ok {
            self.0.push(format!("{rule}\n    {what}"));
        }
    }

    /// The entry of `frontend`, noting the rule as broken when it is missing.
    fn frontend<'a>(&mut self, desired: &'a Desired, frontend: Frontend, rule: &str) -> Option<&'a FrontendEntry> {
        let found = desired.frontends.get(&frontend);
        if found.is_none() {
            let present: Vec<String> = desired.frontends.keys().map(ToString::to_string).collect();
            self.0.push(format!("{rule}\n    no frontend {frontend}; present: {present:?}"));
        }
        found
    }

    fn assert_none(self) {
        assert!(self.0.is_empty(), "{} broken:\n{}", self.0.len(), self.0.join("\n"));
    }
}

// ---- frontends ----

#[test]
fn frontends_per_service_port() {
    use FrontendKind::*;

    struct Case {
        rule: &'static str,
        service: Service,
        want: Vec<(Frontend, FrontendKind)>,
    }
    let node = node(&["172.18.0.2", "172.18.0.3"]);
    let cases = [
        Case {
            rule: "every IPv4 entry of spec.clusterIPs is a frontend",
            service: service("s").cluster_ips(&["10.96.0.10", "10.96.0.11"]).port(6666).build(),
            want: vec![(tcp("10.96.0.10", 6666), ClusterIp), (tcp("10.96.0.11", 6666), ClusterIp)],
        },
        Case {
            rule: "spec.clusterIP is the frontend when spec.clusterIPs is absent",
            service: service("s").cluster_ip("10.96.0.10").port(6666).build(),
            want: vec![(tcp("10.96.0.10", 6666), ClusterIp)],
        },
        Case {
            rule: "each family's ClusterIP of a dual-stack service is a frontend",
            service: service("s").cluster_ips(&["10.96.0.10", "fd00:10:96::a"]).port(6666).build(),
            want: vec![(tcp("10.96.0.10", 6666), ClusterIp), (tcp("fd00:10:96::a", 6666), ClusterIp)],
        },
        Case {
            rule: "a leading-zero address is decimal: 010.096.000.011 is 10.96.0.11",
            service: service("s").cluster_ip("010.096.000.011").port(6666).build(),
            want: vec![(tcp("10.96.0.11", 6666), ClusterIp)],
        },
        Case {
            rule: "a nodePort is served on every node address",
            service: service("apigw-test1").cluster_ip("10.96.0.10").port(6666).node_port(30066).build(),
            want: vec![
                (tcp("10.96.0.10", 6666), ClusterIp),
                (tcp("172.18.0.2", 30066), NodePort),
                (tcp("172.18.0.3", 30066), NodePort),
            ],
        },
        Case {
            rule: "a LoadBalancer service without ingress IPs yet serves its nodePorts",
            service: service("s").type_("LoadBalancer").cluster_ip("10.96.0.10").port(80).node_port(30080).build(),
            want: vec![
                (tcp("10.96.0.10", 80), ClusterIp),
                (tcp("172.18.0.2", 30080), NodePort),
                (tcp("172.18.0.3", 30080), NodePort),
            ],
        },
        Case {
            rule: "every spec.externalIPs entry is a frontend on the service port",
            service: service("s")
                .cluster_ip("10.96.0.10")
                .port(80)
                .external_ip("192.0.2.10")
                .external_ip("192.0.2.11")
                .build(),
            want: vec![
                (tcp("10.96.0.10", 80), ClusterIp),
                (tcp("192.0.2.10", 80), ExternalIp),
                (tcp("192.0.2.11", 80), ExternalIp),
            ],
        },
        Case {
            rule: "every status.loadBalancer.ingress IP is a frontend on the service port",
            service: service("s")
                .cluster_ip("10.96.0.10")
                .port(80)
                .node_port(30080)
                .load_balancer_ip("198.51.100.7")
                .load_balancer_hostname("lb.example.com")
                .load_balancer_ip("198.51.100.8")
                .build(),
            want: vec![
                (tcp("10.96.0.10", 80), ClusterIp),
                (tcp("172.18.0.2", 30080), NodePort),
                (tcp("172.18.0.3", 30080), NodePort),
                (tcp("198.51.100.7", 80), LoadBalancer),
                (tcp("198.51.100.8", 80), LoadBalancer),
            ],
        },
        Case {
            rule: "each service port has its own frontends, told apart by protocol",
            service: service("dns")
                .cluster_ip("10.96.0.10")
                .named_port("dns", 53)
                .protocol("UDP")
                .named_port("dns-tcp", 53)
                .protocol("TCP")
                .named_port("metrics", 9153)
                .build(),
            want: vec![
                (udp("10.96.0.10", 53), ClusterIp),
                (tcp("10.96.0.10", 53), ClusterIp),
                (tcp("10.96.0.10", 9153), ClusterIp),
            ],
        },
        Case {
            rule: "a headless service (clusterIP: None) gets nothing",
            service: service("s").cluster_ip("None").port(80).build(),
            want: vec![],
        },
        Case {
            rule: "an ExternalName service gets nothing",
            service: service("s").external_name("db.example.com").port(5432).build(),
            want: vec![],
        },
        Case {
            rule: "a service labelled service.kubernetes.io/service-proxy-name belongs to another proxy",
            service: service("s")
                .label(SERVICE_PROXY_NAME_LABEL, "other-proxy")
                .cluster_ip("10.96.0.10")
                .port(80)
                .build(),
            want: vec![],
        },
        Case {
            rule: "a service labelled service.kubernetes.io/headless is not proxied",
            service: service("s").label(HEADLESS_LABEL, "").cluster_ip("10.96.0.10").port(80).build(),
            want: vec![],
        },
    ];
    let mut broken = Broken::default();
    for case in cases {
        let desired = compute(&case.service, &[], &node);
        let got: BTreeSet<(Frontend, FrontendKind)> = desired.frontends.iter().map(|(f, e)| (*f, e.kind)).collect();
        let want: BTreeSet<(Frontend, FrontendKind)> = case.want.into_iter().collect();
        broken.check_eq(case.rule, "frontends", got, want);
        for (frontend, entry) in &desired.frontends {
            let kind_flag = match entry.kind {
                ClusterIp => SVC_F_CLUSTER_IP,
                NodePort => SVC_F_NODE_PORT,
                ExternalIp => SVC_F_EXTERNAL_IP,
                LoadBalancer => SVC_F_LOAD_BALANCER,
            };
            broken.check(case.rule, entry.flags & kind_flag != 0, &format!("{frontend}: flags {:#x}", entry.flags));
        }
    }
    broken.assert_none();
}

#[test]
fn load_balancer_source_ranges_apply_to_load_balancer_frontends_only() {
    let service = service("s")
        .cluster_ip("10.96.0.10")
        .port(80)
        .node_port(30080)
        .external_ip("192.0.2.10")
        .load_balancer_ip("198.51.100.7")
        .source_range("203.0.113.0/24")
        .source_range(" 198.51.100.0/25 ")
        .build();
    let desired = compute(&service, &[], &node(&["172.18.0.2"]));
    let want: Vec<Cidr> = ["203.0.113.0/24", "198.51.100.0/25"].iter().map(|c| c.parse().unwrap()).collect();
    assert_eq!(desired.frontends.len(), 4);
    for (frontend, entry) in &desired.frontends {
        let expected: &[Cidr] = if entry.kind == FrontendKind::LoadBalancer { &want } else { &[] };
        assert_eq!(entry.source_ranges, expected, "{frontend} ({:?})", entry.kind);
    }
}

#[test]
fn nodeport_addresses_come_from_the_node() {
    struct Case {
        rule: &'static str,
        addresses: &'static [(&'static str, &'static str)],
        filter: &'static [&'static str],
        want: &'static [&'static str],
    }
    let cases = [
        Case {
            rule: "InternalIP and ExternalIP addresses serve nodePorts, other types do not",
            addresses: &[
                ("InternalIP", "172.18.0.2"),
                ("ExternalIP", "203.0.113.5"),
                ("Hostname", "node-1"),
                ("InternalDNS", "node-1.cluster.local"),
            ],
            filter: &[],
            want: &["172.18.0.2", "203.0.113.5"],
        },
        Case {
            rule: "--nodeport-addresses keeps only the addresses inside its CIDRs",
            addresses: &[("InternalIP", "172.18.0.2"), ("InternalIP", "10.0.0.2"), ("ExternalIP", "203.0.113.5")],
            filter: &["172.18.0.0/16", "203.0.113.5/32"],
            want: &["172.18.0.2", "203.0.113.5"],
        },
        Case {
            rule: "IPv6 node addresses serve nodePorts too",
            addresses: &[("InternalIP", "fc00:f853:ccd:e793::2"), ("InternalIP", "172.18.0.2")],
            filter: &[],
            want: &["172.18.0.2", "fc00:f853:ccd:e793::2"],
        },
        Case {
            rule: "--nodeport-addresses filters each family by its own CIDRs",
            addresses: &[
                ("InternalIP", "fc00:f853:ccd:e793::2"),
                ("InternalIP", "fd00:1::2"),
                ("InternalIP", "172.18.0.2"),
                ("InternalIP", "10.0.0.2"),
            ],
            filter: &["172.18.0.0/16", "fc00:f853:ccd:e793::/64"],
            want: &["172.18.0.2", "fc00:f853:ccd:e793::2"],
        },
        Case {
            rule: "a family without a range in --nodeport-addresses keeps all its addresses (kube-proxy's per-family rule)",
            addresses: &[
                ("InternalIP", "fc00:f853:ccd:e793::2"),
                ("InternalIP", "172.18.0.2"),
                ("InternalIP", "10.0.0.2"),
            ],
            filter: &["172.18.0.0/16"],
            want: &["172.18.0.2", "fc00:f853:ccd:e793::2"],
        },
        Case {
            rule: "an IPv6-only --nodeport-addresses keeps every IPv4 address",
            addresses: &[
                ("InternalIP", "fc00:f853:ccd:e793::2"),
                ("InternalIP", "fd00:1::2"),
                ("InternalIP", "172.18.0.2"),
            ],
            filter: &["fc00:f853:ccd:e793::/64"],
            want: &["172.18.0.2", "fc00:f853:ccd:e793::2"],
        },
        Case {
            rule: "an IPv4-mapped node address is left out (it would alias the IPv4 one)",
            addresses: &[("InternalIP", "::ffff:172.18.0.9"), ("InternalIP", "172.18.0.2")],
            filter: &[],
            want: &["172.18.0.2"],
        },
        Case {
            rule: "an address listed twice serves once",
            addresses: &[("InternalIP", "172.18.0.2"), ("ExternalIP", "172.18.0.2")],
            filter: &[],
            want: &["172.18.0.2"],
        },
    ];
    let mut broken = Broken::default();
    for case in cases {
        let node = Node {
            metadata: ObjectMeta { name: Some(NODE.into()), ..ObjectMeta::default() },
            status: Some(NodeStatus {
                addresses: Some(
                    case.addresses
                        .iter()
                        .map(|(type_, address)| NodeAddress { type_: (*type_).into(), address: (*address).into() })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        let filter: Vec<Cidr> = case.filter.iter().map(|c| c.parse().unwrap()).collect();
        let info = NodeInfo::from_node(NODE, Some(&node), &filter);
        let mut want: Vec<IpAddr> = case.want.iter().map(|a| ip(a)).collect();
        want.sort();
        broken.check_eq(case.rule, "nodePort addresses", info.nodeport_addresses, want);
        broken.check_eq(case.rule, "name", info.name.as_str(), NODE);
    }
    broken.assert_none();
    assert!(
        NodeInfo::from_node(NODE, None, &[]).nodeport_addresses.is_empty(),
        "without a Node object there is no nodePort address"
    );
}

#[test]
fn the_zone_comes_from_the_node_label() {
    let labelled = Node {
        metadata: ObjectMeta {
            name: Some(NODE.into()),
            labels: Some([(ZONE_LABEL.to_owned(), "zone-a".to_owned())].into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    assert_eq!(NodeInfo::from_node(NODE, Some(&labelled), &[]).zone, "zone-a");
    let unlabelled =
        Node { metadata: ObjectMeta { name: Some(NODE.into()), ..ObjectMeta::default() }, ..Node::default() };
    assert_eq!(NodeInfo::from_node(NODE, Some(&unlabelled), &[]).zone, "", "no label: no zone");
    assert_eq!(NodeInfo::from_node(NODE, None, &[]).zone, "", "no Node object: no zone");
}

// ---- backends ----

#[test]
fn backends_of_a_service_port() {
    struct Case {
        rule: &'static str,
        slices: Vec<EndpointSlice>,
        want: &'static [&'static str],
        fallback: bool,
    }
    let cases = [
        Case {
            rule: "an endpoint whose conditions say nothing is ready",
            slices: vec![slice("web", "web-a").named_port("http", 8080).endpoint("10.244.1.2").build()],
            want: &["10.244.1.2:8080"],
            fallback: false,
        },
        Case {
            rule: "an endpoint that is not ready is not used while a ready one exists",
            slices: vec![
                slice("web", "web-a")
                    .named_port("http", 8080)
                    .endpoint("10.244.1.2")
                    .endpoint("10.244.1.3")
                    .not_ready()
                    .build(),
            ],
            want: &["10.244.1.2:8080"],
            fallback: false,
        },
        Case {
            rule: "the endpoints of every slice of the service are used",
            slices: vec![
                slice("web", "web-a").named_port("http", 8080).endpoint("10.244.1.2").build(),
                slice("web", "web-b").named_port("http", 8080).endpoint("10.244.2.3").build(),
            ],
            want: &["10.244.1.2:8080", "10.244.2.3:8080"],
            fallback: false,
        },
        Case {
            rule: "an endpoint listed in two slices counts once",
            slices: vec![
                slice("web", "web-a").named_port("http", 8080).endpoint("10.244.1.2").build(),
                slice("web", "web-b").named_port("http", 8080).endpoint("10.244.1.2").endpoint("10.244.2.3").build(),
            ],
            want: &["10.244.1.2:8080", "10.244.2.3:8080"],
            fallback: false,
        },
        Case {
            rule: "a slice port of another name contributes nothing",
            slices: vec![
                slice("web", "web-a").named_port("http", 8080).endpoint("10.244.1.2").build(),
                slice("web", "web-b").named_port("admin", 9000).endpoint("10.244.2.3").build(),
            ],
            want: &["10.244.1.2:8080"],
            fallback: false,
        },
        Case {
            rule: "ready endpoints win over terminating ones",
            slices: vec![
                slice("web", "web-a")
                    .named_port("http", 8080)
                    .endpoint("10.244.1.2")
                    .endpoint("10.244.1.3")
                    .not_ready()
                    .serving()
                    .terminating()
                    .build(),
            ],
            want: &["10.244.1.2:8080"],
            fallback: false,
        },
        Case {
            rule: "with no ready endpoint, the serving terminating ones are used",
            slices: vec![
                slice("web", "web-a")
                    .named_port("http", 8080)
                    .endpoint("10.244.1.2")
                    .not_ready()
                    .serving()
                    .terminating()
                    .endpoint("10.244.1.3")
                    .not_ready()
                    .serving()
                    .terminating()
                    .endpoint("10.244.1.4")
                    .not_ready()
                    .not_serving()
                    .terminating()
                    .endpoint("10.244.1.5")
                    .not_ready()
                    .serving()
                    .build(),
            ],
            want: &["10.244.1.2:8080", "10.244.1.3:8080"],
            fallback: true,
        },
        Case {
            rule: "serving absent means serving (the API reads nil as true), so it is a fallback endpoint",
            slices: vec![
                slice("web", "web-a")
                    .named_port("http", 8080)
                    .endpoint("10.244.1.2")
                    .on_node(NODE)
                    .not_ready()
                    .terminating()
                    .build(),
            ],
            want: &["10.244.1.2:8080"],
            fallback: true,
        },
        Case {
            rule: "a terminating endpoint that is not serving is never used",
            slices: vec![
                slice("web", "web-a")
                    .named_port("http", 8080)
                    .endpoint("10.244.1.2")
                    .not_ready()
                    .not_serving()
                    .terminating()
                    .build(),
            ],
            want: &[],
            fallback: false,
        },
        Case {
            rule: "an IPv6 slice contributes nothing",
            slices: vec![
                slice("web", "web-a").named_port("http", 8080).endpoint("10.244.1.2").build(),
                slice("web", "web-v6")
                    .address_type("IPv6")
                    .named_port("http", 8080)
                    .endpoint("fd00:10:244:1::2")
                    .build(),
            ],
            want: &["10.244.1.2:8080"],
            fallback: false,
        },
        Case {
            rule: "a service port without endpoints has no backend (connections are refused)",
            slices: vec![],
            want: &[],
            fallback: false,
        },
    ];
    let service = service("web").cluster_ip("10.96.0.10").named_port("http", 80).build();
    let mut broken = Broken::default();
    for case in cases {
        let desired = compute(&service, &case.slices, &node(&[]));
        let Some(entry) = broken.frontend(&desired, tcp("10.96.0.10", 80), case.rule) else { continue };
        broken.check_eq(case.rule, "backends", endpoints(&entry.backends), strings(case.want));
        let fallback = entry.flags & SVC_F_TERMINATING_FALLBACK != 0;
        broken.check_eq(case.rule, "SVC_F_TERMINATING_FALLBACK", fallback, case.fallback);
    }
    broken.assert_none();
}

#[test]
fn ports_resolve_by_name_and_protocol_across_slices() {
    let service = service("dns")
        .cluster_ip("10.96.0.10")
        .named_port("dns", 53)
        .protocol("UDP")
        .named_port("dns-tcp", 53)
        .protocol("TCP")
        .build();
    let slices = [
        slice("dns", "dns-a")
            .named_port("dns-tcp", 5353)
            .protocol("TCP")
            .named_port("dns", 5353)
            .protocol("UDP")
            .endpoint("10.244.1.2")
            .build(),
        slice("dns", "dns-b").named_port("dns", 5354).protocol("UDP").endpoint("10.244.2.3").build(),
        // The right name with the wrong protocol is another port.
        slice("dns", "dns-c").named_port("dns", 7777).protocol("TCP").endpoint("10.244.3.4").build(),
    ];
    let desired = compute(&service, &slices, &node(&[]));
    let cases = [
        (
            "the UDP port takes each slice's UDP port named dns",
            udp("10.96.0.10", 53),
            &["10.244.1.2:5353", "10.244.2.3:5354"][..],
        ),
        ("the TCP port takes the slice port named dns-tcp", tcp("10.96.0.10", 53), &["10.244.1.2:5353"][..]),
    ];
    for (rule, frontend, want) in cases {
        assert_eq!(endpoints(&entry(&desired, frontend, rule).backends), strings(want), "{rule}");
    }
    assert_eq!(desired.frontends.len(), 2);
}

#[test]
fn traffic_policies_choose_local_endpoints() {
    struct Case {
        rule: &'static str,
        external: Option<&'static str>,
        internal: Option<&'static str>,
        slices: Vec<EndpointSlice>,
        /// ClusterIP backends (used by everyone).
        cluster_ip: &'static [&'static str],
        /// NodePort backends for traffic from outside the node.
        node_port_outside: &'static [&'static str],
        /// NodePort backends for traffic from this node.
        node_port_inside: &'static [&'static str],
    }
    let both = || {
        vec![
            slice("web", "web-a")
                .port(8080)
                .endpoint("10.244.1.2")
                .on_node(NODE)
                .endpoint("10.244.2.3")
                .on_node("node-2")
                .build(),
        ]
    };
    const ALL: &[&str] = &["10.244.1.2:8080", "10.244.2.3:8080"];
    const LOCAL: &[&str] = &["10.244.1.2:8080"];
    let cases = [
        Case {
            rule: "Cluster policies (the default): every endpoint for everyone",
            external: None,
            internal: None,
            slices: both(),
            cluster_ip: ALL,
            node_port_outside: ALL,
            node_port_inside: ALL,
        },
        Case {
            rule: "externalTrafficPolicy Local: external frontends use only local endpoints, this node's own traffic all",
            external: Some("Local"),
            internal: None,
            slices: both(),
            cluster_ip: ALL,
            node_port_outside: LOCAL,
            node_port_inside: ALL,
        },
        Case {
            rule: "externalTrafficPolicy Local without a local endpoint: external traffic is dropped",
            external: Some("Local"),
            internal: None,
            slices: vec![slice("web", "web-a").port(8080).endpoint("10.244.2.3").on_node("node-2").build()],
            cluster_ip: &["10.244.2.3:8080"],
            node_port_outside: &[],
            node_port_inside: &["10.244.2.3:8080"],
        },
        Case {
            rule: "internalTrafficPolicy Local: the ClusterIP uses only local endpoints, external frontends all",
            external: None,
            internal: Some("Local"),
            slices: both(),
            cluster_ip: LOCAL,
            node_port_outside: ALL,
            node_port_inside: ALL,
        },
        Case {
            rule: "both Local: ClusterIP and outside traffic local; this node's traffic to an external frontend short-circuits to all",
            external: Some("Local"),
            internal: Some("Local"),
            slices: both(),
            cluster_ip: LOCAL,
            node_port_outside: LOCAL,
            node_port_inside: ALL,
        },
    ];
    let mut broken = Broken::default();
    for case in cases {
        let mut builder = service("web").cluster_ip("10.96.0.10").port(80).node_port(30080);
        if let Some(policy) = case.external {
            builder = builder.external_traffic_policy(policy);
        }
        if let Some(policy) = case.internal {
            builder = builder.internal_traffic_policy(policy);
        }
        let desired = compute(&builder.build(), &case.slices, &node(&["172.18.0.2"]));

        if let Some(cluster_ip) = broken.frontend(&desired, tcp("10.96.0.10", 80), case.rule) {
            broken.check_eq(case.rule, "ClusterIP", endpoints(&cluster_ip.backends), strings(case.cluster_ip));
            broken.check(case.rule, cluster_ip.internal.is_none(), "a ClusterIP has one scope");
        }
        if let Some(node_port) = broken.frontend(&desired, tcp("172.18.0.2", 30080), case.rule) {
            let outside = endpoints(&node_port.backends);
            broken.check_eq(case.rule, "NodePort from outside", outside, strings(case.node_port_outside));
            let inside = endpoints(node_port.internal.as_ref().unwrap_or(&node_port.backends));
            broken.check_eq(case.rule, "NodePort from this node", inside, strings(case.node_port_inside));
            let two_scopes = node_port.flags & SVC_F_TWO_SCOPES != 0;
            broken.check_eq(
                case.rule,
                "SVC_F_TWO_SCOPES iff an internal set",
                two_scopes,
                node_port.internal.is_some(),
            );
            if case.external == Some("Local") {
                broken.check(case.rule, two_scopes, "Local external policy has two scopes");
            }
        }
        // The policy flags mark the frontends each policy governs.
        for (frontend, entry) in &desired.frontends {
            if entry.kind.is_external() {
                let ext_local = entry.flags & SVC_F_EXT_LOCAL != 0;
                let want = case.external == Some("Local");
                broken.check_eq(case.rule, &format!("{frontend} SVC_F_EXT_LOCAL"), ext_local, want);
            } else {
                let int_local = entry.flags & SVC_F_INT_LOCAL != 0;
                let want = case.internal == Some("Local");
                broken.check_eq(case.rule, &format!("{frontend} SVC_F_INT_LOCAL"), int_local, want);
            }
        }
    }
    broken.assert_none();
}

/// Topology-aware routing (kube-proxy's pkg/proxy/topology.go): this node is node-1 in zone-a
/// unless a case says otherwise; endpoints A (node-1), B (node-2) and C (node-3) carry the
/// hints the EndpointSlice controller would write for the service's `trafficDistribution`.
#[test]
fn topology_hints_narrow_the_cluster_wide_set() {
    struct Case {
        rule: &'static str,
        zone: &'static str,
        external: Option<&'static str>,
        internal: Option<&'static str>,
        slice: SliceBuilder,
        /// ClusterIP backends.
        cluster_ip: &'static [&'static str],
        /// NodePort backends for traffic from outside the node.
        node_port_outside: &'static [&'static str],
        /// NodePort backends for traffic from this node.
        node_port_inside: &'static [&'static str],
        /// Whether the ClusterIP's set is the terminating fallback.
        fallback: bool,
    }
    const A: &str = "10.244.1.2:8080";
    const B: &str = "10.244.2.3:8080";
    const C: &str = "10.244.3.4:8080";
    const ALL: &[&str] = &[A, B, C];
    let a = |s: SliceBuilder| s.endpoint("10.244.1.2").on_node(NODE);
    let b = |s: SliceBuilder| s.endpoint("10.244.2.3").on_node("node-2");
    let c = |s: SliceBuilder| s.endpoint("10.244.3.4").on_node("node-3");
    let web = || slice("web", "web-a").port(8080);
    // PreferSameNode: each endpoint hinted for its node and its zone.
    let same_node = || {
        let s = a(web()).for_nodes(&[NODE]).for_zones(&["zone-a"]);
        let s = b(s).for_nodes(&["node-2"]).for_zones(&["zone-a"]);
        c(s).for_nodes(&["node-3"]).for_zones(&["zone-b"])
    };
    // PreferClose / PreferSameZone: each endpoint hinted for its zone.
    let same_zone = || c(b(a(web()).for_zones(&["zone-a"])).for_zones(&["zone-a"])).for_zones(&["zone-b"]);
    // Hints that leave this node's own endpoint out of zone-a (to tell the Local sets apart).
    let elsewhere = || c(b(a(web()).for_zones(&["zone-b"])).for_zones(&["zone-a"])).for_zones(&["zone-b"]);
    let case = |rule, zone, slice, want: &'static [&'static str]| Case {
        rule,
        zone,
        external: None,
        internal: None,
        slice,
        cluster_ip: want,
        node_port_outside: want,
        node_port_inside: want,
        fallback: false,
    };
    let cases = [
        case("no hints: every endpoint", "zone-a", c(b(a(web()))), ALL),
        case("every endpoint hinted for a node, one for this node: only those", "zone-a", same_node(), &[A]),
        case(
            "node hints, none for this node: the zone hints decide",
            "zone-a",
            c(b(web()).for_nodes(&["node-2"]).for_zones(&["zone-a"])).for_nodes(&["node-3"]).for_zones(&["zone-b"]),
            &[B],
        ),
        case(
            "a node hint missing on one endpoint: the zone hints decide",
            "zone-a",
            c(b(a(web()).for_nodes(&[NODE]).for_zones(&["zone-a"])).for_zones(&["zone-a"])).for_zones(&["zone-b"]),
            &[A, B],
        ),
        case("every endpoint hinted for a zone, some for this one: only those", "zone-a", same_zone(), &[A, B]),
        case(
            "a zone hint missing on one ready endpoint: every endpoint",
            "zone-a",
            c(b(a(web()).for_zones(&["zone-a"])).for_zones(&["zone-a"])),
            ALL,
        ),
        case("no endpoint hinted for this zone: every endpoint", "zone-c", same_zone(), ALL),
        case("a node without a zone label ignores zone hints", "", same_zone(), ALL),
        case("a node without a zone label still follows node hints", "", same_node(), &[A]),
        case(
            "endpoints that are not ready need no hints",
            "zone-a",
            same_zone().endpoint("10.244.3.5").on_node("node-3").not_ready(),
            &[A, B],
        ),
        Case {
            internal: Some("Local"),
            node_port_outside: &[B],
            node_port_inside: &[B],
            ..case(
                "internalTrafficPolicy Local: the ClusterIP keeps this node's endpoints whatever the hints",
                "zone-a",
                elsewhere(),
                &[A],
            )
        },
        Case {
            external: Some("Local"),
            node_port_outside: &[A],
            ..case(
                "externalTrafficPolicy Local: outside traffic keeps this node's endpoints, this node's own follows the hints",
                "zone-a",
                elsewhere(),
                &[B],
            )
        },
        Case {
            fallback: true,
            ..case(
                "nothing ready: every serving terminating endpoint, whatever its hints",
                "zone-a",
                c(a(web()).not_ready().serving().terminating().for_zones(&["zone-a"]))
                    .not_ready()
                    .serving()
                    .terminating()
                    .for_zones(&["zone-b"]),
                &[A, C],
            )
        },
    ];
    let mut broken = Broken::default();
    for case in cases {
        let mut builder = service("web").cluster_ip("10.96.0.10").port(80).node_port(30080);
        if let Some(policy) = case.external {
            builder = builder.external_traffic_policy(policy);
        }
        if let Some(policy) = case.internal {
            builder = builder.internal_traffic_policy(policy);
        }
        let node = NodeInfo { zone: case.zone.into(), ..node(&["172.18.0.2"]) };
        let desired = compute(&builder.build(), &[case.slice.build()], &node);

        if let Some(cluster_ip) = broken.frontend(&desired, tcp("10.96.0.10", 80), case.rule) {
            broken.check_eq(case.rule, "ClusterIP", endpoints(&cluster_ip.backends), strings(case.cluster_ip));
            let fallback = cluster_ip.flags & SVC_F_TERMINATING_FALLBACK != 0;
            broken.check_eq(case.rule, "ClusterIP terminating fallback", fallback, case.fallback);
        }
        if let Some(node_port) = broken.frontend(&desired, tcp("172.18.0.2", 30080), case.rule) {
            let outside = endpoints(&node_port.backends);
            broken.check_eq(case.rule, "NodePort from outside", outside, strings(case.node_port_outside));
            let inside = endpoints(node_port.internal.as_ref().unwrap_or(&node_port.backends));
            broken.check_eq(case.rule, "NodePort from this node", inside, strings(case.node_port_inside));
        }
    }
    broken.assert_none();
}

#[test]
fn local_endpoints_are_marked_local() {
    let service = service("web").cluster_ip("10.96.0.10").port(80).build();
    let slices = [slice("web", "web-a")
        .port(8080)
        .endpoint("10.244.1.2")
        .on_node(NODE)
        .endpoint("10.244.2.3")
        .on_node("node-2")
        .endpoint("10.244.3.4")
        .build()];
    let desired = compute(&service, &slices, &node(&[]));
    let local: Vec<(String, bool)> = entry(&desired, tcp("10.96.0.10", 80), "locality")
        .backends
        .iter()
        .map(|e| (e.address.to_string(), e.local))
        .collect();
    assert_eq!(local, [("10.244.1.2".into(), true), ("10.244.2.3".into(), false), ("10.244.3.4".into(), false)]);
}

#[test]
fn session_affinity() {
    struct Case {
        rule: &'static str,
        affinity: Option<&'static str>,
        timeout: Option<i32>,
        want: u32,
    }
    let cases = [
        Case { rule: "no sessionAffinity: no affinity", affinity: None, timeout: None, want: 0 },
        Case { rule: "sessionAffinity None: no affinity", affinity: Some("None"), timeout: Some(60), want: 0 },
        Case { rule: "ClientIP without a timeout: 10800 s", affinity: Some("ClientIP"), timeout: None, want: 10_800 },
        Case { rule: "ClientIP with a timeout: that timeout", affinity: Some("ClientIP"), timeout: Some(60), want: 60 },
        Case {
            rule: "ClientIP with the largest allowed timeout, 86400 s",
            affinity: Some("ClientIP"),
            timeout: Some(86_400),
            want: 86_400,
        },
        Case {
            rule: "ClientIP with timeout 0 (out of 1..=86400): the default",
            affinity: Some("ClientIP"),
            timeout: Some(0),
            want: 10_800,
        },
        Case {
            rule: "ClientIP with timeout 86401 (out of 1..=86400): the default",
            affinity: Some("ClientIP"),
            timeout: Some(86_401),
            want: 10_800,
        },
        Case {
            rule: "ClientIP with a negative timeout: the default",
            affinity: Some("ClientIP"),
            timeout: Some(-1),
            want: 10_800,
        },
    ];
    let slices = [slice("web", "web-a").port(8080).endpoint("10.244.1.2").build()];
    let mut broken = Broken::default();
    for case in cases {
        let mut builder = service("web").cluster_ip("10.96.0.10").port(80).node_port(30080);
        if let Some(affinity) = case.affinity {
            builder = builder.session_affinity(affinity);
        }
        if let Some(timeout) = case.timeout {
            builder = builder.affinity_timeout(timeout);
        }
        let desired = compute(&builder.build(), &slices, &node(&["172.18.0.2"]));
        broken.check_eq(case.rule, "frontends", desired.frontends.len(), 2);
        for (frontend, entry) in &desired.frontends {
            broken.check_eq(case.rule, &format!("{frontend} timeout"), entry.affinity_timeout, case.want);
            let affinity = entry.flags & SVC_F_AFFINITY != 0;
            broken.check_eq(case.rule, &format!("{frontend} SVC_F_AFFINITY"), affinity, case.want != 0);
        }
    }
    broken.assert_none();
}

// ---- what is skipped ----

#[test]
fn malformed_parts_are_skipped_with_a_reason_naming_the_field() {
    use SkipReason::*;

    struct Case {
        rule: &'static str,
        service: Service,
        slices: Vec<EndpointSlice>,
        /// (object, field, reason, a text the detail must quote).
        want: (&'static str, &'static str, SkipReason, &'static str),
        /// A frontend that still works despite the skip.
        still_served: Option<Frontend>,
    }
    let web = || service("web").cluster_ip("10.96.0.10").port(80);
    let cases = [
        Case {
            rule: "an IPv4-mapped clusterIP is refused (it would alias the IPv4 entry)",
            service: service("web").cluster_ips(&["fd00:10:96::a", "::ffff:10.96.0.10"]).port(80).build(),
            slices: vec![],
            want: ("Service default/web", "spec.clusterIPs[1]", Ipv4Mapped, "::ffff:10.96.0.10"),
            still_served: Some(tcp("fd00:10:96::a", 80)),
        },
        Case {
            rule: "an IPv4-mapped externalIP is refused",
            service: web().external_ip("::ffff:192.0.2.10").external_ip("192.0.2.11").build(),
            slices: vec![],
            want: ("Service default/web", "spec.externalIPs[0]", Ipv4Mapped, "::ffff:192.0.2.10"),
            still_served: Some(tcp("192.0.2.11", 80)),
        },
        Case {
            rule: "an IPv4-mapped endpoint in an IPv6 slice is refused",
            service: service("web").cluster_ips(&["fd00:10:96::a"]).port(80).build(),
            slices: vec![
                slice("web", "web-v6")
                    .address_type("IPv6")
                    .port(8080)
                    .endpoint("::ffff:10.244.1.2")
                    .endpoint("fd00:10:244:1::2")
                    .build(),
            ],
            want: ("EndpointSlice default/web-v6", "endpoints[0].addresses[0]", Ipv4Mapped, "::ffff:10.244.1.2"),
            still_served: Some(tcp("fd00:10:96::a", 80)),
        },
        Case {
            rule: "an IPv4 address in an IPv6 slice is a bad address",
            service: service("web").cluster_ips(&["fd00:10:96::a"]).port(80).build(),
            slices: vec![slice("web", "web-v6").address_type("IPv6").port(8080).endpoint("10.244.1.2").build()],
            want: ("EndpointSlice default/web-v6", "endpoints[0].addresses[0]", BadAddress, "10.244.1.2"),
            still_served: Some(tcp("fd00:10:96::a", 80)),
        },
        Case {
            rule: "an IPv6 externalIP of an IPv4-only service is ignored, as kube-proxy's IPv6 proxier never sees it",
            service: web().external_ip("2001:db8::10").build(),
            slices: vec![],
            want: ("Service default/web", "spec.externalIPs[0]", OtherFamily, "2001:db8::10"),
            still_served: Some(tcp("10.96.0.10", 80)),
        },
        Case {
            rule: "an IPv4 LoadBalancer IP of an IPv6-only service is ignored",
            service: service("web").cluster_ips(&["fd00:10:96::a"]).port(80).load_balancer_ip("198.51.100.7").build(),
            slices: vec![],
            want: ("Service default/web", "status.loadBalancer.ingress[0].ip", OtherFamily, "198.51.100.7"),
            still_served: Some(tcp("fd00:10:96::a", 80)),
        },
        Case {
            rule: "a bad address in spec.clusterIPs",
            service: service("web").cluster_ips(&["10.96.0.300"]).port(80).external_ip("192.0.2.10").build(),
            slices: vec![],
            want: ("Service default/web", "spec.clusterIPs[0]", BadAddress, "10.96.0.300"),
            still_served: Some(tcp("192.0.2.10", 80)),
        },
        Case {
            rule: "a bad spec.clusterIP (no clusterIPs) names spec.clusterIP",
            service: service("web").cluster_ip("10.96.0.300").port(80).external_ip("192.0.2.10").build(),
            slices: vec![],
            want: ("Service default/web", "spec.clusterIP", BadAddress, "10.96.0.300"),
            still_served: Some(tcp("192.0.2.10", 80)),
        },
        Case {
            rule: "a bad address in spec.externalIPs",
            service: web().external_ip("192.0.2.10").external_ip("not-an-ip").build(),
            slices: vec![],
            want: ("Service default/web", "spec.externalIPs[1]", BadAddress, "not-an-ip"),
            still_served: Some(tcp("192.0.2.10", 80)),
        },
        Case {
            rule: "a bad LoadBalancer IP names its own ingress entry (after a hostname-only one)",
            service: web().load_balancer_hostname("lb.example.com").load_balancer_ip("198.51.100.300").build(),
            slices: vec![],
            want: ("Service default/web", "status.loadBalancer.ingress[1].ip", BadAddress, "198.51.100.300"),
            still_served: Some(tcp("10.96.0.10", 80)),
        },
        Case {
            rule: "a bad loadBalancerSourceRanges entry",
            service: web().load_balancer_ip("198.51.100.7").source_range("203.0.113.0/33").build(),
            slices: vec![],
            want: ("Service default/web", "spec.loadBalancerSourceRanges[0]", BadAddress, "203.0.113.0/33"),
            still_served: Some(tcp("198.51.100.7", 80)),
        },
        Case {
            rule: "a bad endpoint address",
            service: web().build(),
            slices: vec![slice("web", "web-a").port(8080).endpoint("10.244.1.2").endpoint("10.244.1").build()],
            want: ("EndpointSlice default/web-a", "endpoints[1].addresses[0]", BadAddress, "10.244.1"),
            still_served: Some(tcp("10.96.0.10", 80)),
        },
        Case {
            rule: "service port 0 is out of range",
            service: service("web").cluster_ip("10.96.0.10").port(0).port(81).build(),
            slices: vec![],
            want: ("Service default/web", "spec.ports[0].port", BadPort, "0"),
            still_served: Some(tcp("10.96.0.10", 81)),
        },
        Case {
            rule: "service port 70000 is out of range",
            service: service("web").cluster_ip("10.96.0.10").port(70_000).port(81).build(),
            slices: vec![],
            want: ("Service default/web", "spec.ports[0].port", BadPort, "70000"),
            still_served: Some(tcp("10.96.0.10", 81)),
        },
        Case {
            rule: "nodePort 70000 is out of range, the ClusterIP still serves",
            service: web().node_port(70_000).build(),
            slices: vec![],
            want: ("Service default/web", "spec.ports[0].nodePort", BadPort, "70000"),
            still_served: Some(tcp("10.96.0.10", 80)),
        },
        Case {
            rule: "a slice port 70000 is out of range",
            service: web().build(),
            slices: vec![slice("web", "web-a").port(70_000).endpoint("10.244.1.2").build()],
            want: ("EndpointSlice default/web-a", "ports[0].port", BadPort, "70000"),
            still_served: Some(tcp("10.96.0.10", 80)),
        },
        Case {
            rule: "protocol ICMP is not a service protocol",
            service: service("web").cluster_ip("10.96.0.10").port(80).protocol("ICMP").port(81).build(),
            slices: vec![],
            want: ("Service default/web", "spec.ports[0].protocol", UnknownProtocol, "ICMP"),
            still_served: Some(tcp("10.96.0.10", 81)),
        },
        Case {
            rule: "an FQDN slice is not supported",
            service: web().build(),
            slices: vec![slice("web", "web-fqdn").address_type("FQDN").port(8080).endpoint("db.example.com").build()],
            want: ("EndpointSlice default/web-fqdn", "addressType", UnsupportedAddressType, "FQDN"),
            still_served: Some(tcp("10.96.0.10", 80)),
        },
        Case {
            rule: "a slice without an addressType says it is missing",
            service: web().build(),
            slices: vec![slice("web", "web-x").address_type("").port(8080).endpoint("10.244.1.2").build()],
            want: ("EndpointSlice default/web-x", "addressType", UnsupportedAddressType, "missing"),
            still_served: Some(tcp("10.96.0.10", 80)),
        },
        Case {
            rule: "a slice skipped for a service of two ports is reported once, not per port",
            service: service("web").cluster_ip("10.96.0.10").named_port("a", 80).named_port("b", 81).build(),
            slices: vec![
                slice("web", "web-fqdn").address_type("FQDN").named_port("a", 8080).endpoint("db.example.com").build(),
            ],
            want: ("EndpointSlice default/web-fqdn", "addressType", UnsupportedAddressType, "FQDN"),
            still_served: Some(tcp("10.96.0.10", 81)),
        },
        Case {
            rule: "an endpoint without addresses is skipped, the others are used",
            service: web().build(),
            slices: vec![{
                let mut slice = slice("web", "web-a").port(8080).endpoint("10.244.1.2").build();
                slice.endpoints.push(discovery::Endpoint::default());
                slice
            }],
            want: ("EndpointSlice default/web-a", "endpoints[1].addresses", BadAddress, "empty"),
            still_served: Some(tcp("10.96.0.10", 80)),
        },
        Case {
            rule: "a Service without a spec",
            service: Service { spec: None, ..web().build() },
            slices: vec![],
            want: ("Service default/web", "spec", Unparseable, "missing"),
            still_served: None,
        },
    ];
    let mut broken = Broken::default();
    for case in cases {
        let desired = compute(&case.service, &case.slices, &node(&["172.18.0.2"]));
        let (object, field, reason, quoted) = case.want;
        let got: Vec<(&str, &str, SkipReason)> =
            desired.skipped.iter().map(|s| (s.object.as_str(), s.field.as_str(), s.reason)).collect();
        broken.check_eq(case.rule, "skips", got, vec![(object, field, reason)]);
        for skip in &desired.skipped {
            broken.check(
                case.rule,
                skip.detail.contains(quoted),
                &format!("detail {:?} quotes {quoted:?}", skip.detail),
            );
        }
        if let Some(frontend) = case.still_served {
            broken.frontend(&desired, frontend, case.rule);
        }
    }
    broken.assert_none();
}

// ---- the whole state ----

#[test]
fn slices_without_a_service_are_reported() {
    let services = [service("web").cluster_ip("10.96.0.10").port(80).build()];
    let slices = [
        slice("web", "web-a").port(8080).endpoint("10.244.1.2").build(),
        slice("web", "stray").unlabelled().port(8080).endpoint("10.244.9.9").build(),
        slice("gone", "gone-a").port(8080).endpoint("10.244.8.8").build(),
        // Same name as the service, other namespace: a different service.
        slice("web", "web-x").namespace("other").port(8080).endpoint("10.244.7.7").build(),
    ];
    let desired = desired(&services, &compact(&slices), &node(&[]));
    let want: BTreeSet<_> = [
        ("EndpointSlice default/stray", SERVICE_NAME_LABEL, SkipReason::MissingServiceLabel),
        ("EndpointSlice default/gone-a", SERVICE_NAME_LABEL, SkipReason::NoService),
        ("EndpointSlice other/web-x", SERVICE_NAME_LABEL, SkipReason::NoService),
    ]
    .into_iter()
    .map(|(object, label, reason)| (object.to_owned(), format!("metadata.labels[{label}]"), reason))
    .collect();
    assert_eq!(skips(&desired), want);
    let web = entry(&desired, tcp("10.96.0.10", 80), "the service's own slice still serves");
    assert_eq!(endpoints(&web.backends), strings(&["10.244.1.2:8080"]));
}

#[test]
fn a_contested_frontend_goes_to_the_first_service_by_namespace_and_name() {
    struct Case {
        rule: &'static str,
        /// (namespace, name) in the order given to `desired`.
        services: [(&'static str, &'static str); 2],
        winner: (&'static str, &'static str),
        loser: (&'static str, &'static str),
    }
    let cases = [
        Case {
            rule: "same namespace: the first name wins, whatever the input order",
            services: [("default", "b-svc"), ("default", "a-svc")],
            winner: ("default", "a-svc"),
            loser: ("default", "b-svc"),
        },
        Case {
            rule: "the namespace orders first",
            services: [("ns-b", "aaa"), ("ns-a", "zzz")],
            winner: ("ns-a", "zzz"),
            loser: ("ns-b", "aaa"),
        },
    ];
    let mut broken = Broken::default();
    for case in cases {
        let services: Vec<Service> = case
            .services
            .iter()
            .enumerate()
            .map(|(i, (namespace, name))| {
                service(name)
                    .namespace(namespace)
                    .cluster_ip(&format!("10.96.0.{}", 10 + i))
                    .port(80)
                    .external_ip("192.0.2.10")
                    .build()
            })
            .collect();
        let desired = desired(&services, &[], &node(&[]));
        if let Some(contested) = broken.frontend(&desired, tcp("192.0.2.10", 80), case.rule) {
            let holder = (contested.service.namespace.as_str(), contested.service.name.as_str());
            broken.check_eq(case.rule, "holder", holder, case.winner);
        }
        let want: BTreeSet<_> = [(
            format!("Service {}/{}", case.loser.0, case.loser.1),
            "frontend".to_owned(),
            SkipReason::FrontendConflict,
        )]
        .into();
        broken.check_eq(case.rule, "skips", skips(&desired), want);
        // Both keep their own ClusterIP.
        broken.check_eq(case.rule, "frontends", desired.frontends.len(), 3);
    }
    broken.assert_none();
}

#[test]
fn a_bad_service_does_not_affect_another() {
    let services = [
        service("bad").cluster_ip("10.96.0.10").port(70_000).build(),
        service("good").cluster_ip("10.96.0.11").port(80).build(),
    ];
    let slices = [
        slice("bad", "bad-a").port(8080).endpoint("10.244.1.2").build(),
        slice("good", "good-a").port(8080).endpoint("10.244.2.3").build(),
    ];
    let desired = desired(&services, &compact(&slices), &node(&[]));
    let want: BTreeSet<_> =
        [("Service default/bad".to_owned(), "spec.ports[0].port".to_owned(), SkipReason::BadPort)].into();
    assert_eq!(skips(&desired), want);
    assert_eq!(desired.frontends.len(), 1);
    let good = entry(&desired, tcp("10.96.0.11", 80), "the good service serves");
    assert_eq!(endpoints(&good.backends), strings(&["10.244.2.3:8080"]));
}

#[test]
fn health_check_node_port_counts_ready_local_endpoints() {
    let with_port = |policy: &str, type_: &str| {
        let mut svc = service("web")
            .cluster_ip("10.96.0.10")
            .named_port("", 80)
            .type_(type_)
            .external_traffic_policy(policy)
            .build();
        svc.spec.as_mut().unwrap().health_check_node_port = Some(32000);
        svc
    };
    let slices = [slice("web", "web-a")
        .named_port("", 8080)
        .endpoint("10.244.1.2")
        .on_node(NODE)
        .endpoint("10.244.1.3")
        .on_node(NODE)
        .not_ready()
        .terminating()
        .endpoint("10.244.2.2")
        .on_node("node-2")
        .build()];
    let here = node(&["172.18.0.2"]);
    let desired = compute(&with_port("Local", "LoadBalancer"), &slices, &here);
    let (port, check) = desired.health_check.expect("a LoadBalancer with eTP Local and a healthCheckNodePort");
    assert_eq!(port, 32000);
    assert_eq!((check.namespace.as_str(), check.name.as_str()), ("default", "web"));
    assert_eq!(check.local_endpoints, 1, "the ready local endpoint only: not the terminating one, not node-2's");
    assert_eq!(compute(&with_port("Cluster", "LoadBalancer"), &slices, &here).health_check, None, "eTP Cluster");
    assert_eq!(compute(&with_port("Local", "NodePort"), &slices, &here).health_check, None, "not a LoadBalancer");
}

#[test]
fn localhost_node_ports_when_the_filter_allows_them() {
    let svc = service("web").cluster_ip("10.96.0.10").named_port("", 80).node_port(30080).build();
    let mut here = node(&["172.18.0.2"]);
    here.localhost_nodeports = true;
    let desired = compute(&svc, &[], &here);
    let localhost = entry(&desired, tcp("127.0.0.1", 30080), "localhost nodePort");
    assert_eq!(localhost.kind, FrontendKind::NodePort);
    here.localhost_nodeports = false;
    assert!(!compute(&svc, &[], &here).frontends.contains_key(&tcp("127.0.0.1", 30080)), "left out by the filter");
    let cidrs = |list: &[&str]| list.iter().map(|c| c.parse().unwrap()).collect::<Vec<Cidr>>();
    assert!(NodeInfo::from_node(NODE, None, &[]).localhost_nodeports, "no --nodeport-addresses: served");
    assert!(NodeInfo::from_node(NODE, None, &cidrs(&["127.0.0.0/8"])).localhost_nodeports);
    assert!(!NodeInfo::from_node(NODE, None, &cidrs(&["172.18.0.0/16"])).localhost_nodeports);
    assert!(
        NodeInfo::from_node(NODE, None, &cidrs(&["fd00::/8"])).localhost_nodeports,
        "IPv6 ranges only: the IPv4 family is unfiltered, localhost included (kube-proxy)"
    );
}

// ---- dual stack: one proxier per family ----

/// A dual-stack node: one address of each family.
fn dual_node() -> NodeInfo {
    node(&["172.18.0.2", "fd00:172:18::2"])
}

#[test]
fn dual_stack_frontends_follow_the_clusterips_families() {
    use FrontendKind::*;

    struct Case {
        rule: &'static str,
        service: Service,
        want: Vec<(Frontend, FrontendKind)>,
    }
    let cases = [
        Case {
            rule: "RequireDualStack (IPv4 first): each ClusterIP, and the nodePort on both families' node addresses",
            service: service("s")
                .ip_families(&["IPv4", "IPv6"])
                .cluster_ips(&["10.96.0.10", "fd00:10:96::a"])
                .port(80)
                .node_port(30080)
                .build(),
            want: vec![
                (tcp("10.96.0.10", 80), ClusterIp),
                (tcp("fd00:10:96::a", 80), ClusterIp),
                (tcp("172.18.0.2", 30080), NodePort),
                (tcp("fd00:172:18::2", 30080), NodePort),
            ],
        },
        Case {
            rule: "IPv6 first (clusterIP is the IPv6 one): the same frontends",
            service: service("s")
                .ip_families(&["IPv6", "IPv4"])
                .cluster_ips(&["fd00:10:96::a", "10.96.0.10"])
                .port(80)
                .node_port(30080)
                .build(),
            want: vec![
                (tcp("10.96.0.10", 80), ClusterIp),
                (tcp("fd00:10:96::a", 80), ClusterIp),
                (tcp("172.18.0.2", 30080), NodePort),
                (tcp("fd00:172:18::2", 30080), NodePort),
            ],
        },
        Case {
            rule: "IPv6 single stack: the nodePort is served on the IPv6 node address only",
            service: service("s")
                .ip_families(&["IPv6"])
                .cluster_ips(&["fd00:10:96::a"])
                .port(80)
                .node_port(30080)
                .build(),
            want: vec![(tcp("fd00:10:96::a", 80), ClusterIp), (tcp("fd00:172:18::2", 30080), NodePort)],
        },
        Case {
            rule: "PreferDualStack granted one family serves that family only",
            service: service("s").ip_families(&["IPv4"]).cluster_ips(&["10.96.0.10"]).port(80).node_port(30080).build(),
            want: vec![(tcp("10.96.0.10", 80), ClusterIp), (tcp("172.18.0.2", 30080), NodePort)],
        },
        Case {
            rule: "without ClusterIPs, spec.ipFamilies says which node addresses serve the nodePort",
            service: service("s").ip_families(&["IPv6"]).port(80).node_port(30080).build(),
            want: vec![(tcp("fd00:172:18::2", 30080), NodePort)],
        },
        Case {
            rule: "externalIPs and LoadBalancer IPs of both families on a dual-stack service",
            service: service("s")
                .cluster_ips(&["10.96.0.10", "fd00:10:96::a"])
                .port(80)
                .external_ip("192.0.2.10")
                .external_ip("2001:db8::10")
                .load_balancer_ip("198.51.100.7")
                .load_balancer_ip("2001:db8:1::7")
                .build(),
            want: vec![
                (tcp("10.96.0.10", 80), ClusterIp),
                (tcp("fd00:10:96::a", 80), ClusterIp),
                (tcp("192.0.2.10", 80), ExternalIp),
                (tcp("2001:db8::10", 80), ExternalIp),
                (tcp("198.51.100.7", 80), LoadBalancer),
                (tcp("2001:db8:1::7", 80), LoadBalancer),
            ],
        },
    ];
    let mut broken = Broken::default();
    for case in cases {
        let desired = compute(&case.service, &[], &dual_node());
        let got: BTreeSet<(Frontend, FrontendKind)> = desired.frontends.iter().map(|(f, e)| (*f, e.kind)).collect();
        let want: BTreeSet<(Frontend, FrontendKind)> = case.want.into_iter().collect();
        broken.check_eq(case.rule, "frontends", got, want);
        broken.check_eq(case.rule, "skips", skips(&desired), BTreeSet::new());
    }
    broken.assert_none();
}

#[test]
fn localhost_node_ports_stay_ipv4_only() {
    let svc = service("web").cluster_ips(&["10.96.0.10", "fd00:10:96::a"]).port(80).node_port(30080).build();
    let mut here = dual_node();
    here.localhost_nodeports = true;
    let desired = compute(&svc, &[], &here);
    assert!(desired.frontends.contains_key(&tcp("127.0.0.1", 30080)), "IPv4 localhost serves");
    assert!(!desired.frontends.contains_key(&tcp("::1", 30080)), "kube-proxy has no IPv6 localhost nodePort");
    let v6_only = service("web").cluster_ips(&["fd00:10:96::a"]).port(80).node_port(30080).build();
    let desired = compute(&v6_only, &[], &here);
    assert!(!desired.frontends.contains_key(&tcp("127.0.0.1", 30080)), "an IPv6-only service has no IPv4 localhost");
}

/// A dual-stack service `web` (IPv4 first) on port 80, nodePort 30080, LoadBalancer IPs of
/// both families.
fn dual_web() -> ServiceBuilder {
    service("web")
        .type_("LoadBalancer")
        .ip_families(&["IPv4", "IPv6"])
        .cluster_ips(&["10.96.0.10", "fd00:10:96::a"])
        .named_port("", 80)
        .node_port(30080)
        .load_balancer_ip("198.51.100.7")
        .load_balancer_ip("2001:db8:1::7")
}

#[test]
fn each_familys_frontends_get_that_familys_endpoints_only() {
    let slices = [
        slice("web", "web-v4").named_port("", 8080).endpoint("10.244.1.2").endpoint("10.244.2.2").build(),
        slice("web", "web-v6").address_type("IPv6").named_port("", 8080).endpoint("fd00:10:244:1::2").build(),
    ];
    let desired = compute(&dual_web().build(), &slices, &dual_node());
    for v4 in [tcp("10.96.0.10", 80), tcp("172.18.0.2", 30080), tcp("198.51.100.7", 80)] {
        let entry = entry(&desired, v4, "IPv4 frontend");
        assert_eq!(endpoints(&entry.backends), strings(&["10.244.1.2:8080", "10.244.2.2:8080"]), "{v4}");
    }
    for v6 in [tcp("fd00:10:96::a", 80), tcp("fd00:172:18::2", 30080), tcp("2001:db8:1::7", 80)] {
        let entry = entry(&desired, v6, "IPv6 frontend");
        assert_eq!(endpoints(&entry.backends), strings(&["fd00:10:244:1::2:8080"]), "{v6}");
    }
    assert_eq!(skips(&desired), BTreeSet::new());
}

#[test]
fn a_family_without_endpoints_rejects_while_the_other_serves() {
    let slices = [slice("web", "web-v4").named_port("", 8080).endpoint("10.244.1.2").build()];
    let desired = compute(&dual_web().build(), &slices, &dual_node());
    let v4 = entry(&desired, tcp("10.96.0.10", 80), "IPv4 ClusterIP");
    assert_eq!(endpoints(&v4.backends), strings(&["10.244.1.2:8080"]));
    let v6 = entry(&desired, tcp("fd00:10:96::a", 80), "IPv6 ClusterIP");
    assert!(v6.backends.is_empty(), "no IPv6 endpoint: the IPv6 ClusterIP is a frontend with count 0 (REJECT)");
}

#[test]
fn every_policy_is_decided_per_family() {
    let here = dual_node();
    // eTP Local: the IPv4 endpoint runs here, the IPv6 one elsewhere.
    let slices = [
        slice("web", "web-v4").named_port("", 8080).endpoint("10.244.1.2").on_node(NODE).build(),
        slice("web", "web-v6")
            .address_type("IPv6")
            .named_port("", 8080)
            .endpoint("fd00:10:244:2::2")
            .on_node("node-2")
            .build(),
    ];
    let local = compute(&dual_web().external_traffic_policy("Local").build(), &slices, &here);
    assert_eq!(
        endpoints(&entry(&local, tcp("172.18.0.2", 30080), "v4 nodePort").backends),
        strings(&["10.244.1.2:8080"])
    );
    let v6 = entry(&local, tcp("fd00:172:18::2", 30080), "v6 nodePort");
    assert!(v6.backends.is_empty(), "no local IPv6 endpoint: dropped from outside");
    assert_eq!(v6.internal.as_deref().map(endpoints), Some(strings(&["fd00:10:244:2::2:8080"])), "from this node: all");

    // iTP Local, per family.
    let internal = compute(&dual_web().internal_traffic_policy("Local").build(), &slices, &here);
    assert_eq!(endpoints(&entry(&internal, tcp("10.96.0.10", 80), "v4").backends), strings(&["10.244.1.2:8080"]));
    assert!(entry(&internal, tcp("fd00:10:96::a", 80), "v6").backends.is_empty());

    // ClientIP affinity on both families' frontends.
    let sticky = compute(&dual_web().session_affinity("ClientIP").build(), &slices, &here);
    for frontend in [tcp("10.96.0.10", 80), tcp("fd00:10:96::a", 80)] {
        let entry = entry(&sticky, frontend, "affinity");
        assert!(entry.flags & SVC_F_AFFINITY != 0 && entry.affinity_timeout == DEFAULT_AFFINITY_TIMEOUT, "{frontend}");
    }

    // Terminating fallback: IPv4 has a ready endpoint, IPv6 only a terminating one.
    let slices = [
        slice("web", "web-v4").named_port("", 8080).endpoint("10.244.1.2").build(),
        slice("web", "web-v6")
            .address_type("IPv6")
            .named_port("", 8080)
            .endpoint("fd00:10:244:1::2")
            .not_ready()
            .serving()
            .terminating()
            .build(),
    ];
    let fallback = compute(&dual_web().build(), &slices, &here);
    let v4 = entry(&fallback, tcp("10.96.0.10", 80), "v4");
    assert_eq!(v4.flags & SVC_F_TERMINATING_FALLBACK, 0);
    let v6 = entry(&fallback, tcp("fd00:10:96::a", 80), "v6");
    assert_ne!(v6.flags & SVC_F_TERMINATING_FALLBACK, 0);
    assert_eq!(endpoints(&v6.backends), strings(&["fd00:10:244:1::2:8080"]));

    // Topology hints: every IPv6 endpoint is hinted (one for this node), the IPv4 ones are not.
    let slices = [
        slice("web", "web-v4").named_port("", 8080).endpoint("10.244.1.2").endpoint("10.244.2.2").build(),
        slice("web", "web-v6")
            .address_type("IPv6")
            .named_port("", 8080)
            .endpoint("fd00:10:244:1::2")
            .for_nodes(&[NODE])
            .endpoint("fd00:10:244:2::2")
            .for_nodes(&["node-2"])
            .build(),
    ];
    let hinted = compute(&dual_web().build(), &slices, &here);
    assert_eq!(endpoints(&entry(&hinted, tcp("10.96.0.10", 80), "v4").backends).len(), 2, "IPv4 has no hints");
    assert_eq!(
        endpoints(&entry(&hinted, tcp("fd00:10:96::a", 80), "v6").backends),
        strings(&["fd00:10:244:1::2:8080"])
    );
}

#[test]
fn load_balancer_source_ranges_apply_to_their_own_family() {
    let slices = [slice("web", "web-v4").named_port("", 8080).endpoint("10.244.1.2").build()];
    let svc = dual_web().source_range("203.0.113.0/24").source_range("2001:db8:ff::/48").build();
    let desired = compute(&svc, &slices, &dual_node());
    let v4 = entry(&desired, tcp("198.51.100.7", 80), "v4 LB");
    assert_eq!(v4.source_ranges, vec!["203.0.113.0/24".parse::<Cidr>().unwrap()]);
    assert_ne!(v4.flags & SVC_F_SOURCE_RANGES, 0);
    let v6 = entry(&desired, tcp("2001:db8:1::7", 80), "v6 LB");
    assert_eq!(v6.source_ranges, vec!["2001:db8:ff::/48".parse::<Cidr>().unwrap()]);
    assert_ne!(v6.flags & SVC_F_SOURCE_RANGES, 0);

    // kube-proxy's proxier of a family sees only that family's ranges: none means open.
    let v4_only = compute(&dual_web().source_range("203.0.113.0/24").build(), &slices, &dual_node());
    let v6 = entry(&v4_only, tcp("2001:db8:1::7", 80), "v6 LB");
    assert!(v6.source_ranges.is_empty() && v6.flags & SVC_F_SOURCE_RANGES == 0);
}

#[test]
fn the_health_check_counts_a_dual_stack_pod_once() {
    let mut svc = dual_web().external_traffic_policy("Local").build();
    svc.spec.as_mut().unwrap().health_check_node_port = Some(32000);
    let slices = [
        slice("web", "web-v4").named_port("", 8080).endpoint("10.244.1.2").on_node(NODE).build(),
        slice("web", "web-v6")
            .address_type("IPv6")
            .named_port("", 8080)
            .endpoint("fd00:10:244:1::2")
            .on_node(NODE)
            .build(),
    ];
    let (_, check) = compute(&svc, &slices, &dual_node()).health_check.expect("a health check");
    assert_eq!(check.local_endpoints, 1, "one pod, listed in a slice of each family");
    let (_, check) = compute(&svc, &slices[1..], &dual_node()).health_check.expect("a health check");
    assert_eq!(check.local_endpoints, 1, "an IPv6-only endpoint counts too");
}

#[test]
fn fqdn_slices_are_skipped_with_their_reason() {
    let slices =
        [slice("web", "web-fqdn").address_type("FQDN").named_port("", 8080).endpoint("db.example.com").build()];
    let desired = compute(&dual_web().build(), &slices, &dual_node());
    let want: BTreeSet<_> =
        [("EndpointSlice default/web-fqdn".to_owned(), "addressType".to_owned(), SkipReason::UnsupportedAddressType)]
            .into();
    assert_eq!(skips(&desired), want, "one skip, not one per family");
}

/// `--lb-mode`: direct server return on external IPv4 frontends under eTP Cluster; `hybrid`
/// for TCP only; never on a ClusterIP, under eTP Local, or for IPv6 (the option is IPv4's).
#[test]
fn lb_mode_marks_external_ipv4_frontends_under_etp_cluster_for_dsr() {
    let build = |policy: &str| {
        service("s")
            .ip_families(&["IPv4", "IPv6"])
            .cluster_ips(&["10.96.0.10", "fd00:10:96::a"])
            .port(80)
            .node_port(30080)
            .port(53)
            .protocol("UDP")
            .node_port(30053)
            .external_ip("192.0.2.10")
            .external_traffic_policy(policy)
            .build()
    };
    let dsr_frontends = |mode: LbMode, policy: &str| -> BTreeSet<String> {
        let node = NodeInfo { lb_mode: mode, ..node(&["172.18.0.2", "fc00::2"]) };
        let desired = compute(&build(policy), &[], &node);
        desired.frontends.iter().filter(|(_, e)| e.flags & SVC_F_DSR != 0).map(|(f, _)| f.to_string()).collect()
    };
    let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(dsr_frontends(LbMode::Snat, "Cluster"), BTreeSet::new(), "snat: none");
    assert_eq!(
        dsr_frontends(LbMode::Dsr, "Cluster"),
        names(&["172.18.0.2:30080/TCP", "172.18.0.2:30053/UDP", "192.0.2.10:80/TCP", "192.0.2.10:53/UDP"])
    );
    assert_eq!(dsr_frontends(LbMode::Hybrid, "Cluster"), names(&["172.18.0.2:30080/TCP", "192.0.2.10:80/TCP"]));
    assert_eq!(dsr_frontends(LbMode::Dsr, "Local"), BTreeSet::new(), "eTP Local keeps the client anyway");
}

/// Issue 16: an endpoint is marked for direct server return only when its `nodeName` is one
/// of the Nodes that take it; one on another node, or without a node, is not (SNATed).
#[test]
fn only_endpoints_on_nodes_that_take_dsr_are_marked_dsr() {
    let svc = service("s").port(80).node_port(30080).build();
    let slices = [slice("s", "s-a")
        .port(80)
        .endpoint("10.244.1.2")
        .on_node(NODE)
        .endpoint("10.244.2.3")
        .on_node("node-2")
        .endpoint("10.244.3.4")
        .on_node("node-3")
        .endpoint("10.244.4.5")
        .build()];
    let marked = |dsr_nodes: &[&str]| -> BTreeSet<String> {
        let node = NodeInfo {
            lb_mode: LbMode::Dsr,
            dsr_nodes: dsr_nodes.iter().map(|n| (*n).to_owned()).collect(),
            ..node(&["172.18.0.2"])
        };
        let desired = compute(&svc, &slices, &node);
        let (_, entry) = desired.frontends.iter().find(|(f, _)| f.port == 30080).expect("the nodePort");
        entry.backends.iter().filter(|e| e.dsr).map(|e| e.address.to_string()).collect()
    };
    let set = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(marked(&[NODE, "node-2"]), set(&["10.244.1.2", "10.244.2.3"]));
    assert_eq!(marked(&["node-2", "node-3"]), set(&["10.244.2.3", "10.244.3.4"]), "a node losing it loses the mark");
    assert_eq!(marked(&[]), set(&[]), "no node takes it: every backend is SNATed");
    let snat = NodeInfo { dsr_nodes: [NODE.to_owned()].into(), ..node(&["172.18.0.2"]) };
    let desired = compute(&svc, &slices, &snat);
    let flagged = desired.frontends.values().flat_map(|e| &e.backends).filter(|e| e.dsr).count();
    assert_eq!(flagged, 0, "under snat no backend is flagged (the backends map stays as before)");
}
