//! The one cluster every suite starts from: the address plan of `docs/testing.md` (a kind
//! cluster's), the Node objects of the standard nodes, the seed service `apigw-test1`, and the
//! manifest directory the agents read. Suites build on these instead of re-declaring addresses
//! and rewriting the same YAML; what a test changes stays in the test.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    agent::Agent,
    cgroup::Cgroup,
    fixtures::{ServiceBuilder, SliceBuilder, TempDir, node, node_in_zone, service, slice, write_text, yaml},
    netns::{Netns, veth},
    pod::{ANSWER_LOCAL_ADDRESS, PodServer},
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
pub fn cluster_node(i: usize, zone: &str) -> Node {
    let (name, ip, cidr) = (node_name(i), node_ip(i).to_string(), pod_cidr(i));
    if zone.is_empty() { node(&name, &ip, &cidr) } else { node_in_zone(&name, &ip, &cidr, zone) }
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
        let ns = Netns::new("pool")?;
        veth(node, "vpool", &ns, "eth0")?;
        node.ip(&["link", "set", "vpool", "master", "br0"])?;
        ns.ip(&["addr", "add", &format!("{POOL_POD}/24"), "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", &pod_gateway(0).to_string()])?;
        ns.ip(&["route", "add", "local", "10.244.100.0/24", "dev", "lo"])?;
        let server = PodServer::start(&ns, TARGET_PORT, ANSWER_LOCAL_ADDRESS)?;
        node.ip(&["route", "add", "10.244.100.0/24", "via", &POOL_POD.to_string()])?;
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
    fn a_mirrored_slice_carries_every_service_port_on_the_target_port() {
        let eps = mirrored_slice(&seed_node_port().build(), &[(pod_ip(0, 2), "node-1"), (pod_ip(1, 2), "node-2")]);
        let ports: Vec<(Option<&str>, Option<i32>, Option<&str>)> =
            eps.ports.iter().flatten().map(|p| (p.name.as_deref(), p.port, p.protocol.as_deref())).collect();
        assert_eq!(ports, [(Some("tcp"), Some(80), Some("TCP")), (Some("udp"), Some(80), Some("UDP"))]);
        let nodes: Vec<Option<&str>> = eps.endpoints.iter().map(|e| e.node_name.as_deref()).collect();
        assert_eq!(nodes, [Some("node-1"), Some("node-2")]);
    }
}
