//! The one cluster every suite starts from: the address plan of `docs/testing.md` (a kind
//! cluster's), the Node objects of the standard nodes, the seed service `apigw-test1`, and the
//! manifest directory the agents read. Suites build on these instead of re-declaring addresses
//! and rewriting the same YAML; what a test changes stays in the test.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Node, NodeAddress, Service},
    discovery::v1::EndpointSlice,
};

use proxy_agent::dsr::{DSR_ANNOTATION, DSR_ANNOTATION_VALUE};

use crate::{
    agent::Agent,
    cgroup::Cgroup,
    fixtures::{ServiceBuilder, SliceBuilder, TempDir, node, node_in_zone, service, slice, write_text, yaml},
    netns::{Netns, veth},
    pod::{ANSWER_LOCAL_ADDRESS, PodServer},
    topology::{add_address, dual_stack_netns},
};

// ---------------------------------------------------------------------------------------------
// The address plan
// ---------------------------------------------------------------------------------------------

/// The external client's address on the node network.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

/// The address of node `i + 1` on the node network: 172.18.0.2 for node-1, 172.18.0.3 for
/// node-2, and so on.
pub const fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, 2 + i as u8)
}

/// The two standard nodes' addresses on the node network.
pub const NODE_IPS: [Ipv4Addr; 2] = [node_ip(0), node_ip(1)];

/// The name of node `i + 1`: `node-1`, `node-2` ...
pub fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

/// Node `i + 1`'s pod range, 10.244.<i+1>.0/24.
pub fn pod_cidr(i: usize) -> String {
    format!("10.244.{}.0/24", i + 1)
}

/// Address `host` in node `i + 1`'s pod range: `pod_ip(0, 2)` is 10.244.1.2.
pub const fn pod_ip(i: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1 + i as u8, host)
}

/// The pod network's gateway on node `i + 1` (its pod bridge), 10.244.<i+1>.1.
pub const fn pod_gateway(i: usize) -> Ipv4Addr {
    pod_ip(i, 1)
}

/// The client pod's address on node `i + 1`, 10.244.<i+1>.200.
pub const fn client_pod_ip(i: usize) -> Ipv4Addr {
    pod_ip(i, 200)
}

/// ClusterIP `10.96.0.<last>` (the service range is 10.96.0.0/16).
pub const fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, last)
}

// ---------------------------------------------------------------------------------------------
// The IPv6 half of the plan (dual stack, as a dual-stack kind cluster): ULA ranges only
// ---------------------------------------------------------------------------------------------

/// The external client's IPv6 address on the node network.
pub const CLIENT_IP6: Ipv6Addr = node_net6(100);

/// `n` (below 1000) written with the same digits in hex, so that an IPv6 twin reads like its
/// IPv4 address: host 200 of 10.244.1.0/24 is fd00:10:244:1::200.
const fn same_digits(n: u16) -> u16 {
    ((n / 100) << 8) | ((n / 10 % 10) << 4) | (n % 10)
}

/// Address `host` of the node network's IPv6 range, fd00:172:18::/64 (a ULA block standing in
/// for 172.18.0.0/16).
const fn node_net6(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, same_digits(host))
}

/// The IPv6 address of node `i + 1` on the node network: fd00:172:18::2 for node-1, and so on.
pub const fn node_ip6(i: usize) -> Ipv6Addr {
    node_net6(2 + i as u16)
}

/// The IPv6 twin of a pod-network address: 10.244.n.h is fd00:10:244:n::h (digits kept).
pub const fn pod_twin6(ip: Ipv4Addr) -> Ipv6Addr {
    let [_, _, n, h] = ip.octets();
    Ipv6Addr::new(0xfd00, 0x10, 0x244, same_digits(n as u16), 0, 0, 0, same_digits(h as u16))
}

/// The IPv6 gateway of node `i + 1`'s pods (its pod bridge), fd00:10:244:<i+1>::1.
pub const fn pod_gateway6(i: usize) -> Ipv6Addr {
    pod_ip6(i, 1)
}

/// Node `i + 1`'s IPv6 pod range, fd00:10:244:<i+1>::/64.
pub fn pod_cidr6(i: usize) -> String {
    format!("fd00:10:244:{}::/64", i + 1)
}

/// Address `host` in node `i + 1`'s IPv6 pod range: `pod_ip6(0, 2)` is fd00:10:244:1::2, the
/// IPv6 twin of [`pod_ip`]`(0, 2)`.
pub const fn pod_ip6(i: usize, host: u8) -> Ipv6Addr {
    pod_twin6(pod_ip(i, host))
}

/// IPv6 ClusterIP `fd00:10:96::<last>` (the IPv6 service range is fd00:10:96::/112), the twin
/// of [`vip`]`(last)`.
pub const fn vip6(last: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, same_digits(last as u16))
}

/// An address family of the dual-stack plan: every address of the plan has a twin in each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (the plan of `docs/testing.md`).
    V4,
    /// IPv6 (its ULA twin).
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const BOTH: [Self; 2] = [Self::V4, Self::V6];

    /// The name Kubernetes gives the family (`spec.ipFamilies`, an EndpointSlice's
    /// `addressType`).
    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    /// [`vip`] or [`vip6`].
    pub fn vip(self, last: u8) -> IpAddr {
        match self {
            Self::V4 => vip(last).into(),
            Self::V6 => vip6(last).into(),
        }
    }

    /// [`pod_ip`] or [`pod_ip6`].
    pub fn pod_ip(self, i: usize, host: u8) -> IpAddr {
        match self {
            Self::V4 => pod_ip(i, host).into(),
            Self::V6 => pod_ip6(i, host).into(),
        }
    }

    /// [`node_ip`] or [`node_ip6`].
    pub fn node_ip(self, i: usize) -> IpAddr {
        match self {
            Self::V4 => node_ip(i).into(),
            Self::V6 => node_ip6(i).into(),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a client on the socket path reaches a service: the cases the socket-path suites run
/// for every behaviour that applies to both families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// An AF_INET socket to the IPv4 ClusterIP.
    Ipv4,
    /// An AF_INET6 socket to the IPv4 ClusterIP written IPv4-mapped, `::ffff:a.b.c.d` (what
    /// Java and other dual-stack applications do): the IPv4 service, through connect6/sendmsg6.
    Mapped,
    /// An AF_INET6 socket to an IPv6 ClusterIP (an IPv6 service with IPv6 EndpointSlices).
    Ipv6,
}

impl Via {
    /// Every case.
    pub const ALL: [Self; 3] = [Self::Ipv4, Self::Mapped, Self::Ipv6];

    /// The family of the service (and its endpoints) the client reaches.
    pub fn service_family(self) -> Family {
        match self {
            Self::Ipv4 | Self::Mapped => Family::V4,
            Self::Ipv6 => Family::V6,
        }
    }

    /// What the client connects to for the service at `address` (of [`Self::service_family`]):
    /// the address itself, or IPv4-mapped.
    pub fn target(self, address: IpAddr, port: u16) -> SocketAddr {
        match (self, address) {
            (Self::Mapped, IpAddr::V4(v4)) => SocketAddr::new(v4.to_ipv6_mapped().into(), port),
            _ => SocketAddr::new(address, port),
        }
    }
}

/// One test per way of reaching a service ([`Via`]) for a behaviour that applies to both
/// families: `NAME::ipv4` (an AF_INET socket to the IPv4 ClusterIP), `NAME::mapped` (an AF_INET6
/// socket to `::ffff:` + that ClusterIP) and `NAME::ipv6` (an IPv6 ClusterIP with an IPv6
/// EndpointSlice), each running the body with `via` set. A table of cases rather than copies;
/// separate tests so that one family's failure does not hide the others' results.
#[macro_export]
macro_rules! per_family {
    ($(#[$doc:meta])* fn $name:ident($via:ident: Via) $body:block) => {
        $(#[$doc])*
        mod $name {
            #[allow(unused_imports, reason = "the body uses what its suite imports")]
            use super::*;

            fn case($via: $crate::cluster::Via) $body

            #[test]
            fn ipv4() {
                case($crate::cluster::Via::Ipv4);
            }

            #[test]
            fn mapped() {
                case($crate::cluster::Via::Mapped);
            }

            #[test]
            fn ipv6() {
                case($crate::cluster::Via::Ipv6);
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The seed service
// ---------------------------------------------------------------------------------------------

/// The seed service's name (`examples/apigw-test1.yaml`, the README's example).
pub const SEED: &str = "apigw-test1";
/// The seed service's ClusterIP.
pub const SEED_VIP: Ipv4Addr = vip(10);
/// The seed service's port.
pub const SEED_PORT: u16 = 6666;
/// The port every test pod serves on, and so every fixture service's `targetPort`.
pub const TARGET_PORT: u16 = 80;
/// The seed service's nodePort.
pub const SEED_NODE_PORT: u16 = 30066;

/// The seed service: ClusterIP [`SEED_VIP`], one unnamed TCP port [`SEED_PORT`].
pub fn seed() -> ServiceBuilder {
    service(SEED).cluster_ip(&SEED_VIP.to_string()).port(SEED_PORT.into())
}

/// The seed service as a NodePort: the same port, by name, for TCP and UDP, each on
/// [`SEED_NODE_PORT`].
pub fn seed_node_port() -> ServiceBuilder {
    service(SEED)
        .cluster_ip(&SEED_VIP.to_string())
        .named_port("tcp", SEED_PORT.into(), "TCP")
        .node_port(SEED_NODE_PORT.into())
        .named_port("udp", SEED_PORT.into(), "UDP")
        .node_port(SEED_NODE_PORT.into())
}

/// The seed service's slice: one unnamed TCP port [`TARGET_PORT`], ready endpoints on node-1.
pub fn seed_slice(endpoints: &[Ipv4Addr]) -> SliceBuilder {
    let ips: Vec<String> = endpoints.iter().map(Ipv4Addr::to_string).collect();
    slice(SEED, "a").port(TARGET_PORT.into()).endpoints(ips.iter().map(String::as_str))
}

/// The seed service in `family`, single-stack (`ipFamilies: [family]`): ClusterIP
/// `family.vip(10)`, one unnamed TCP port [`SEED_PORT`].
pub fn seed_in(family: Family) -> ServiceBuilder {
    service(SEED).cluster_ips(&[family.vip(SEED_VIP.octets()[3])]).port(SEED_PORT.into())
}

/// The seed service's slice of `family`'s endpoints (`addressType`), on node-1.
pub fn seed_slice_in(family: Family, endpoints: &[IpAddr]) -> SliceBuilder {
    let ips: Vec<String> = endpoints.iter().map(IpAddr::to_string).collect();
    let slice = slice(SEED, &family.name().to_lowercase()).address_type(family.name());
    slice.port(TARGET_PORT.into()).endpoints(ips.iter().map(String::as_str))
}

/// The seed service with these endpoints on node-1, as one YAML file's text.
pub fn seed_yaml(endpoints: &[Ipv4Addr]) -> String {
    yaml(&seed().build()) + &yaml(&seed_slice(endpoints).build())
}

/// A slice of `svc` whose ports mirror the service's (name and protocol), all on
/// [`TARGET_PORT`], with ready `endpoints` (address, node name).
pub fn mirrored_slice(svc: &Service, endpoints: &[(Ipv4Addr, &str)]) -> EndpointSlice {
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref()).unwrap_or_default();
    let with_ports = ports.iter().fold(slice(name, "a"), |s, p| {
        s.named_port(p.name.as_deref().unwrap_or(""), TARGET_PORT.into(), p.protocol.as_deref().unwrap_or("TCP"))
    });
    endpoints.iter().fold(with_ports, |s, (ip, node)| s.endpoint_on(&ip.to_string(), node)).build()
}

// ---------------------------------------------------------------------------------------------
// Nodes and the manifest directory
// ---------------------------------------------------------------------------------------------

/// The Node object of standard node `i + 1`: its address and pod range from the plan, and the
/// label `topology.kubernetes.io/zone: zone` unless `zone` is empty.
///
/// Dual stack, as the topologies build the nodes: an IPv6 InternalIP ([`node_ip6`]) and pod
/// range ([`pod_cidr6`]) follow the IPv4 ones (the primary family comes first, as a dual-stack
/// cluster lists them).
///
/// Annotated as taking direct server return (`proxy.kube-ebpf.io/dsr: ipv4`, what the agent
/// sets on its own Node through the API): every node of the test bed runs an agent.
pub fn cluster_node(i: usize, zone: &str) -> Node {
    let (name, ip, cidr) = (node_name(i), node_ip(i).to_string(), pod_cidr(i));
    let mut node = if zone.is_empty() { node(&name, &ip, &cidr) } else { node_in_zone(&name, &ip, &cidr, zone) };
    if let Some(addresses) = node.status.as_mut().and_then(|s| s.addresses.as_mut()) {
        addresses.push(NodeAddress { type_: "InternalIP".into(), address: node_ip6(i).to_string() });
    }
    if let Some(cidrs) = node.spec.as_mut().and_then(|s| s.pod_cidrs.as_mut()) {
        cidrs.push(pod_cidr6(i));
    }
    node.metadata.annotations = Some([(DSR_ANNOTATION.to_owned(), DSR_ANNOTATION_VALUE.to_owned())].into());
    node
}

/// The agents' manifest directory (removed on drop): `nodes.yaml` with the Nodes, and one
/// `<service>.yaml` per service with its slices, each written atomically.
#[derive(Debug)]
pub struct Manifests(TempDir);

impl Manifests {
    /// An empty directory under the temp dir, named after `prefix`. A single node serving
    /// ClusterIPs needs no Node object.
    pub fn new(prefix: &str) -> Self {
        Self(TempDir::new(prefix).expect("creating a manifest directory"))
    }

    /// The directory with the two standard Nodes (their addresses serve the nodePorts).
    pub fn with_nodes(prefix: &str) -> Self {
        Self::zoned(prefix, &["", ""])
    }

    /// The directory with Nodes node-1 to node-N, node i+1 in `zones[i]` (no label if empty).
    pub fn zoned(prefix: &str, zones: &[&str]) -> Self {
        let manifests = Self::new(prefix);
        manifests.put_nodes(zones);
        manifests
    }

    /// Writes (or replaces) `nodes.yaml` with nodes node-1 to node-N, node i+1 in `zones[i]`.
    pub fn put_nodes(&self, zones: &[&str]) {
        let text = zones.iter().enumerate().map(|(i, zone)| yaml(&cluster_node(i, zone))).collect::<String>();
        self.write("nodes.yaml", &text);
    }

    /// Writes (or replaces) `nodes.yaml` with nodes node-1 to node-N (no zone), node i+1
    /// annotated as taking direct server return only if `takes_dsr[i]`.
    pub fn put_nodes_taking_dsr(&self, takes_dsr: &[bool]) {
        let node = |(i, takes): (usize, &bool)| {
            let mut node = cluster_node(i, "");
            if !takes {
                node.metadata.annotations = None;
            }
            yaml(&node)
        };
        self.write("nodes.yaml", &takes_dsr.iter().enumerate().map(node).collect::<String>());
    }

    /// Writes (or replaces) `<name>.yaml` with a service and its slices.
    pub fn put<'a>(&self, svc: &Service, slices: impl IntoIterator<Item = &'a EndpointSlice>) {
        let name = svc.metadata.name.as_deref().expect("fixtures name their services");
        let text = slices.into_iter().fold(yaml(svc), |text, s| text + &yaml(s));
        self.write(&format!("{name}.yaml"), &text);
    }

    /// Writes `svc` with one slice mirroring its ports (see [`mirrored_slice`]) with
    /// `endpoints` (address, node name).
    pub fn service(&self, svc: &Service, endpoints: &[(Ipv4Addr, &str)]) {
        self.put(svc, &[mirrored_slice(svc, endpoints)]);
    }

    /// Writes (or replaces) the seed service with these endpoints on node-1.
    pub fn seed(&self, endpoints: &[Ipv4Addr]) {
        self.put(&seed().build(), &[seed_slice(endpoints).build()]);
    }

    /// Writes (or replaces) the seed service in `family` ([`seed_in`]) with these endpoints
    /// (of that family) on node-1.
    pub fn seed_in(&self, family: Family, endpoints: &[IpAddr]) {
        self.put(&seed_in(family).build(), &[seed_slice_in(family, endpoints).build()]);
    }

    /// Writes (or replaces) `file` with `text`, atomically.
    pub fn write(&self, file: &str, text: &str) {
        write_text(self.0.path(), file, text).unwrap_or_else(|e| panic!("writing {file}: {e:#}"));
    }

    /// Deletes service `name` and its slices (its file).
    pub fn delete(&self, name: &str) {
        let path = self.0.path().join(format!("{name}.yaml"));
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// The directory as a command-line argument.
    pub fn arg(&self) -> String {
        self.0.arg()
    }

    /// The flags that run an agent as `node` on this directory, followed by `extra`.
    pub fn agent_flags(&self, node: &str, extra: &[&str]) -> Vec<String> {
        let own = ["--manifests".to_owned(), self.arg(), "--hostname-override".to_owned(), node.to_owned()];
        own.into_iter().chain(extra.iter().map(|f| (*f).to_owned())).collect()
    }

    /// Starts the agent `bin` as `node` on this directory inside `ns`, its socket programs on
    /// `cgroup`, with `extra` flags.
    pub fn start_agent(
        &self,
        bin: impl Into<PathBuf>,
        ns: &Netns,
        cgroup: &Cgroup,
        node: &str,
        extra: &[&str],
    ) -> Agent {
        let flags = self.agent_flags(node, extra);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Agent::start_in(Some(ns), &bin.into(), cgroup.path(), &flags)
            .unwrap_or_else(|e| panic!("starting the agent as {node}: {e:#}"))
    }
}

// ---------------------------------------------------------------------------------------------
// The endpoint pool
// ---------------------------------------------------------------------------------------------

/// The address of the pod that holds the endpoint pool on node-1 (see [`Pool`]).
pub const POOL_POD: Ipv4Addr = pod_ip(0, 50);
/// The pool's IPv6 range, the twin of 10.244.100.0/24.
const POOL_RANGE6: &str = "fd00:10:244:100::/64";
/// Endpoints in the pool: 10.244.100.1..=POOL_SIZE.
pub const POOL_SIZE: u8 = 100;

/// The pool's endpoint addresses, 10.244.100.1..=[`POOL_SIZE`].
pub fn pool_endpoints() -> Vec<String> {
    (1..=POOL_SIZE).map(|i| Ipv4Addr::new(10, 244, 100, i).to_string()).collect()
}

/// A pod on node-1 that owns all of 10.244.100.0/24 (a local route) and answers on
/// [`TARGET_PORT`] with the address it was reached at: one namespace stands for [`POOL_SIZE`]
/// endpoints, so a statistical bound (an affinity re-pick landing on the old endpoint, six
/// clients picking alike) gets strong without a hundred pods.
#[derive(Debug)]
pub struct Pool {
    // Declared first: the server stops before its namespace goes.
    _server: PodServer,
    _ns: Netns,
}

impl Pool {
    /// Plugs the pool into node-1's pod bridge (`br0` in `node`) and routes the pool's range
    /// to it from the node.
    pub fn on(node: &Netns) -> anyhow::Result<Self> {
        let ns = dual_stack_netns("pool")?;
        veth(node, "vpool", &ns, "eth0")?;
        node.ip(&["link", "set", "vpool", "master", "br0"])?;
        add_address(&ns, POOL_POD, 24, "eth0")?;
        add_address(&ns, pod_twin6(POOL_POD), 64, "eth0")?;
        ns.ip(&["route", "add", "default", "via", &pod_gateway(0).to_string()])?;
        ns.ip(&["-6", "route", "add", "default", "via", &pod_gateway6(0).to_string()])?;
        ns.ip(&["route", "add", "local", "10.244.100.0/24", "dev", "lo"])?;
        ns.ip(&["-6", "route", "add", "local", POOL_RANGE6, "dev", "lo"])?;
        let server = PodServer::start(&ns, TARGET_PORT, ANSWER_LOCAL_ADDRESS)?;
        node.ip(&["route", "add", "10.244.100.0/24", "via", &POOL_POD.to_string()])?;
        node.ip(&["-6", "route", "add", POOL_RANGE6, "via", &pod_twin6(POOL_POD).to_string()])?;
        Ok(Self { _server: server, _ns: ns })
    }

    /// The pool's endpoints on node-1, port [`TARGET_PORT`], in a slice of `service`.
    pub fn slice(service: &str) -> SliceBuilder {
        let endpoints = pool_endpoints();
        endpoints.iter().fold(slice(service, "a").port(TARGET_PORT.into()), |s, ip| s.endpoint_on(ip, "node-1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_numbers_nodes_from_one() {
        assert_eq!(node_ip(0), Ipv4Addr::new(172, 18, 0, 2));
        assert_eq!(node_ip(1), Ipv4Addr::new(172, 18, 0, 3));
        assert_eq!(pod_ip(1, 2), Ipv4Addr::new(10, 244, 2, 2));
        assert_eq!(pod_cidr(1), "10.244.2.0/24");
        assert_eq!((node_name(0), client_pod_ip(0)), ("node-1".to_owned(), Ipv4Addr::new(10, 244, 1, 200)));
    }

    #[test]
    fn the_ipv6_twins_read_like_their_ipv4_addresses() {
        let twins = [
            (pod_ip6(0, 200), "fd00:10:244:1::200"),
            (pod_ip6(1, 2), "fd00:10:244:2::2"),
            (pod_twin6(Ipv4Addr::new(10, 244, 100, 37)), "fd00:10:244:100::37"),
            (vip6(10), "fd00:10:96::10"),
            (node_ip6(1), "fd00:172:18::3"),
            (CLIENT_IP6, "fd00:172:18::100"),
        ];
        for (ip, text) in twins {
            assert_eq!(ip, text.parse::<Ipv6Addr>().unwrap());
        }
        assert_eq!(pod_cidr6(1), "fd00:10:244:2::/64");
        assert_eq!(Family::V6.vip(10), IpAddr::from(vip6(10)));
    }

    #[test]
    fn a_mapped_target_is_the_ipv4_address_on_an_ipv6_socket() {
        let target = Via::Mapped.target(SEED_VIP.into(), SEED_PORT);
        assert_eq!(target.to_string(), "[::ffff:10.96.0.10]:6666");
        assert_eq!(Via::Ipv4.target(SEED_VIP.into(), SEED_PORT).to_string(), "10.96.0.10:6666");
    }

    #[test]
    fn a_mirrored_slice_carries_every_service_port_on_the_target_port() {
        let eps = mirrored_slice(&seed_node_port().build(), &[(pod_ip(0, 2), "node-1"), (pod_ip(1, 2), "node-2")]);
        let ports: Vec<(Option<&str>, Option<i32>, Option<&str>)> =
            eps.ports.iter().flatten().map(|p| (p.name.as_deref(), p.port, p.protocol.as_deref())).collect();
        assert_eq!(ports, [(Some("tcp"), Some(80), Some("TCP")), (Some("udp"), Some(80), Some("UDP"))]);
        let nodes: Vec<Option<&str>> = eps.endpoints.iter().map(|e| e.node_name.as_deref()).collect();
        assert_eq!(nodes, [Some("node-1"), Some("node-2")]);
    }
}
