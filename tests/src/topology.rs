//! Test topologies from SPEC.md's address plan, built from network namespaces only.
//!
//! [`SingleNode`]: node-1's namespace holds a bridge (10.244.1.1/24) with one veth per pod; each
//! pod is a namespace with `eth0` on the bridge and a [`PodServer`] answering with its name; the
//! client pod's processes run in a cgroup the topology created, where the agent attaches.
//! Nothing is routed anywhere else: a connect the datapath does not translate goes nowhere.

use std::net::Ipv4Addr;

use crate::{
    cgroup::Cgroup,
    netns::{Netns, veth},
    pod::PodServer,
};

/// The pod network's gateway on node-1.
pub const NODE1_POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

/// One pod: its namespace, address and server.
#[derive(Debug)]
pub struct Pod {
    /// The pod's name (what its server answers).
    pub name: String,
    /// The pod's address.
    pub ip: Ipv4Addr,
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
        let node = Netns::new("node1")?;
        node.ip(&["link", "add", "br0", "type", "bridge"])?;
        node.ip(&["addr", "add", &format!("{NODE1_POD_GATEWAY}/24"), "dev", "br0"])?;
        node.ip(&["link", "set", "br0", "up"])?;
        // A new namespace does not forward; the node routes between its pods.
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let cgroup = Cgroup::new("proxy-test")?;
        let mut built = Vec::new();
        for (i, (name, ip)) in pods.iter().enumerate() {
            built.push(add_pod(&node, i, name, *ip, Some(port))?);
        }
        let client = add_pod(&node, pods.len(), "client", Ipv4Addr::new(10, 244, 1, 200), None)?;
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
    let ns = Netns::new("pod")?;
    let host_if = format!("veth{index}");
    veth(node, &host_if, &ns, "eth0")?;
    node.ip(&["link", "set", &host_if, "master", "br0"])?;
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.ip(&["route", "add", "default", "via", &NODE1_POD_GATEWAY.to_string()])?;
    let server = port.map(|port| PodServer::start(&ns, port, name)).transpose()?;
    Ok(Pod { name: name.to_owned(), ip, server, ns })
}
