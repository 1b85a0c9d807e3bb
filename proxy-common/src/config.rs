//! The `config` array map: what the datapath needs to know about its node.

use crate::{addr::Addr, user_pod};

/// Value of the `config` map at index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// The IPv4 address (mapped, [`crate::addr`]) IPv4 external traffic is SNATed to when its
    /// frontend is not itself a node address (externalIPs, LoadBalancer IPs). Zero: none.
    pub snat_v4: Addr,
    /// The same for IPv6 traffic: the node's IPv6 address. Zero: none.
    pub snat_v6: Addr,
    /// The node's own network namespace cookie: loopback frontends (`127.0.0.1:<nodePort>`)
    /// are translated only for sockets there (host-network processes), never for a pod's own
    /// loopback. Zero: not known, no loopback translation.
    pub host_netns_cookie: u64,
}
const _: () = assert!(size_of::<NodeConfig>() == 40);

user_pod!(NodeConfig);
