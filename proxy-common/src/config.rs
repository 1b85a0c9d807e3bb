//! The `config` array map: what the datapath needs to know about its node.

use crate::user_pod;

/// Value of the `config` map at index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// The address external traffic is SNATed to when its frontend is not itself a node
    /// address (externalIPs, LoadBalancer IPs), network byte order. Zero: not known yet.
    pub snat_address: [u8; 4],
    pub _pad: [u8; 4],
    /// The node's own network namespace cookie: loopback frontends (`127.0.0.1:<nodePort>`)
    /// are translated only for sockets there (host-network processes), never for a pod's own
    /// loopback. Zero: not known, no loopback translation.
    pub host_netns_cookie: u64,
}
const _: () = assert!(size_of::<NodeConfig>() == 16);

user_pod!(NodeConfig);
