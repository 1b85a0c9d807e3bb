//! Test topologies on the address plan of `docs/testing.md` ([`crate::cluster`]), built from
//! network namespaces only.
//!
//! [`SingleNode`]: node-1's namespace holds a bridge (10.244.1.1/24) with one veth per pod; each
//! pod is a namespace with `eth0` on the bridge and a [`PodServer`] answering with its name; the
//! client pod's processes run in a cgroup the topology created, where the agent attaches.
//! Nothing is routed anywhere else: a connect the datapath does not translate goes nowhere.
//!
//! Every topology is dual stack: each address of the IPv4 plan has its IPv6 twin on the same
//! interface ([`crate::cluster::pod_twin6`], [`crate::cluster::node_ip6`]), added with `nodad`
//! (nothing waits for duplicate address detection, link-local addresses included: see
//! [`dual_stack_netns`]), with the same routes and forwarding.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{
    cgroup::Cgroup,
    cluster::{
        CLIENT_IP, CLIENT_IP6, client_pod_ip, node_ip, node_ip6, node_name, pod_cidr, pod_cidr6, pod_gateway,
        pod_gateway6, pod_ip, pod_twin6,
    },
    netns::{Netns, veth},
    pod::PodServer,
};

/// Adds `address/prefix` to `dev` in `ns`, IPv6 without duplicate address detection (an
/// address in DAD is tentative for a second or more, and a test's first packets would fail).
pub fn add_address(ns: &Netns, address: impl Into<std::net::IpAddr>, prefix: u8, dev: &str) -> anyhow::Result<()> {
    let address = address.into();
    let cidr = format!("{address}/{prefix}");
    if address.is_ipv6() {
        ns.ip(&["-6", "addr", "add", &cidr, "dev", dev, "nodad"])?;
    } else {
        ns.ip(&["addr", "add", &cidr, "dev", dev])?;
    }
    Ok(())
}

/// A namespace for the dual-stack bed: [`Netns::new`] with IPv6 duplicate address detection off
/// for every interface made in it afterwards. `nodad` covers the addresses we add, but each
/// interface's link-local address would still be tentative for a second or more after it comes
/// up, and neighbour discovery from and towards it (a node routing to a pod) loses the first
/// packets of a test meanwhile.
pub fn dual_stack_netns(prefix: &str) -> anyhow::Result<Netns> {
    let ns = Netns::new(prefix)?;
    ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])?;
    Ok(ns)
}

/// Turns on routing in `ns` for both families (a new namespace forwards neither).
fn forward(ns: &Netns) -> anyhow::Result<()> {
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
    Ok(())
}

/// One pod: its namespace, address and server.
#[derive(Debug)]
pub struct Pod {
    /// The pod's name (what its server answers).
    pub name: String,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (the twin of `ip`).
    pub ip6: Ipv6Addr,
    // Declared before `ns`: the server stops before the namespace goes.
    server: Option<PodServer>,
    /// The pod's namespace.
    pub ns: Netns,
}

impl Pod {
    /// Stops the pod's server (the pod stays reachable but answers nothing).
    pub fn stop(&mut self) {
        self.server = None;
    }
}

/// One node with pods on a bridge and a client pod in a test cgroup.
#[derive(Debug)]
pub struct SingleNode {
    /// Backend pods.
    pub pods: Vec<Pod>,
    /// The client pod (no server).
    pub client: Pod,
    /// The cgroup client processes run in (and the agent attaches to).
    pub cgroup: Cgroup,
    /// node-1's namespace.
    pub node: Netns,
}

impl SingleNode {
    /// Builds node-1 with one pod per (name, address) serving on `port`, and a client pod at
    /// 10.244.1.200.
    pub fn new(pods: &[(&str, Ipv4Addr)], port: u16) -> anyhow::Result<Self> {
        let node = dual_stack_netns("node1")?;
        // A fixed MAC: a bridge otherwise takes its lowest port's, which changes as pods are
        // added, and pods that cached the old one lose the gateway until their ARP entry expires.
        node.ip(&["link", "add", "br0", "address", "02:00:0a:f4:01:01", "type", "bridge"])?;
        add_address(&node, pod_gateway(0), 24, "br0")?;
        add_address(&node, pod_gateway6(0), 64, "br0")?;
        node.ip(&["link", "set", "br0", "up"])?;
        // The node routes between its pods.
        forward(&node)?;
        let cgroup = Cgroup::new("proxy-test")?;
        let mut built = Vec::new();
        for (i, (name, ip)) in pods.iter().enumerate() {
            built.push(add_pod(&node, i, name, *ip, Some(port))?);
        }
        let client = add_pod(&node, pods.len(), "client", client_pod_ip(0), None)?;
        Ok(Self { pods: built, client, cgroup, node })
    }

    /// Adds another backend pod.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr, port: u16) -> anyhow::Result<()> {
        let index = self.pods.len() + 1;
        self.pods.push(add_pod(&self.node, index, name, ip, Some(port))?);
        Ok(())
    }
}

fn add_pod(node: &Netns, index: usize, name: &str, ip: Ipv4Addr, port: Option<u16>) -> anyhow::Result<Pod> {
    add_pod_on(node, index, name, ip, port, pod_gateway(0))
}

/// One node of [`Nodes`].
#[derive(Debug)]
pub struct Node {
    /// `node-1`, `node-2` ...
    pub name: String,
    /// Address on the node network.
    pub ip: Ipv4Addr,
    /// Its pods.
    pub pods: Vec<Pod>,
    /// A client pod on this node, inside `cgroup`.
    pub client: Pod,
    /// The cgroup of this node's client pod (its agent attaches there).
    pub cgroup: Cgroup,
    /// The node's namespace.
    pub ns: Netns,
}

/// The standard two-node topology (see [`Nodes`]).
pub type TwoNodes = Nodes<2>;

/// The multi-node topology with `N` nodes: node-n (172.18.0.<n+1>) and an external client
/// (172.18.0.100) on a bridge in a namespace of its own (the node network); each node has a pod
/// bridge (10.244.<n>.1/24) with its pods, and routes to every other node's pods, as kind's CNI
/// sets them. No namespace has a route anywhere else.
#[derive(Debug)]
pub struct Nodes<const N: usize> {
    /// node-1 to node-N.
    pub nodes: Vec<Node>,
    /// The external client's namespace.
    pub client: Netns,
    /// The node network's namespace (holds the bridge).
    pub net: Netns,
}

impl<const N: usize> Nodes<N> {
    /// Builds the nodes with pods `pods[i]` (names) on node i+1, serving on `port` and
    /// answering with their name (where a name contains [`crate::pod::PEER`], the client address
    /// they see). `offload: false` turns checksum offload off on every veth.
    pub fn new(pods: [&[&str]; N], port: u16, offload: bool) -> anyhow::Result<Self> {
        let net = dual_stack_netns("net")?;
        net.ip(&["link", "add", "br0", "type", "bridge"])?;
        net.ip(&["link", "set", "br0", "up"])?;
        let client = dual_stack_netns("ext")?;
        veth(&net, "ext", &client, "eth0")?;
        net.ip(&["link", "set", "ext", "master", "br0"])?;
        add_address(&client, CLIENT_IP, 16, "eth0")?;
        add_address(&client, CLIENT_IP6, 64, "eth0")?;
        let mut nodes = Vec::new();
        for (i, names) in pods.iter().enumerate() {
            let n = i + 1;
            let ns = dual_stack_netns(&format!("node{n}"))?;
            veth(&net, &format!("node{n}"), &ns, "eth0")?;
            net.ip(&["link", "set", &format!("node{n}"), "master", "br0"])?;
            add_address(&ns, node_ip(i), 16, "eth0")?;
            add_address(&ns, node_ip6(i), 64, "eth0")?;
            ns.ip(&["link", "add", "br0", "address", &format!("02:00:0a:f4:{n:02x}:01"), "type", "bridge"])?;
            add_address(&ns, pod_gateway(i), 24, "br0")?;
            add_address(&ns, pod_gateway6(i), 64, "br0")?;
            ns.ip(&["link", "set", "br0", "up"])?;
            for other in (0..N).filter(|&o| o != i) {
                ns.ip(&["route", "add", &pod_cidr(other), "via", &node_ip(other).to_string()])?;
                ns.ip(&["-6", "route", "add", &pod_cidr6(other), "via", &node_ip6(other).to_string()])?;
            }
            forward(&ns)?;
            let mut built = Vec::new();
            for (j, name) in names.iter().enumerate() {
                built.push(add_pod_on(&ns, j, name, pod_ip(i, 2 + j as u8), Some(port), pod_gateway(i))?);
            }
            let client_pod = add_pod_on(&ns, names.len(), "client", client_pod_ip(i), None, pod_gateway(i))?;
            let cgroup = Cgroup::new(&format!("proxy-node{n}"))?;
            nodes.push(Node { name: node_name(i), ip: node_ip(i), pods: built, client: client_pod, cgroup, ns });
        }
        if !offload {
            for ns in nodes.iter().map(|n| &n.ns).chain([&client, &net]) {
                for link in ns.ip(&["-o", "link", "show", "type", "veth"])?.lines() {
                    if let Some(name) = link.split(": ").nth(1).and_then(|n| n.split('@').next()) {
                        ns.exec("ethtool", &["-K", name, "tx", "off", "rx", "off"])?;
                    }
                }
            }
        }
        Ok(Self { nodes, client, net })
    }
}

fn add_pod_on(
    node: &Netns,
    index: usize,
    name: &str,
    ip: Ipv4Addr,
    port: Option<u16>,
    gateway: Ipv4Addr,
) -> anyhow::Result<Pod> {
    let ns = dual_stack_netns("pod")?;
    let host_if = format!("veth{index}");
    veth(node, &host_if, &ns, "eth0")?;
    node.ip(&["link", "set", &host_if, "master", "br0"])?;
    let ip6 = pod_twin6(ip);
    add_address(&ns, ip, 24, "eth0")?;
    add_address(&ns, ip6, 64, "eth0")?;
    ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
    ns.ip(&["-6", "route", "add", "default", "via", &pod_twin6(gateway).to_string()])?;
    let server = port.map(|port| PodServer::start(&ns, port, name)).transpose()?;
    Ok(Pod { name: name.to_owned(), ip, ip6, server, ns })
}
