//! The `affinity` LRU map: `sessionAffinity: ClientIP` memory.

use crate::{
    addr::Addr,
    service::{SCOPE_INTERNAL, SERVICE_ID_LOCAL_SET, SVC_F_CLUSTER_IP, SVC_F_EXT_LOCAL, SVC_F_INT_LOCAL},
    user_pod,
};

/// Key of the `affinity` map: one client of one service port.
///
/// On the socket path the client is known by its network namespace (a pod; its source address
/// is not chosen yet at connect time), as Cilium does; on the TC path by its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Socket path: the client's network namespace cookie. TC path: 0.
    pub netns_cookie: u64,
    /// TC path: the client's address ([`crate::addr`]). Socket path: zero.
    pub client: Addr,
    /// The id of the backend set the client was picked from: the `service_id` of the frontend's
    /// master in the scope the lookup used ([`affinity_service_id`]).
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 32);

/// Value of the `affinity` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns()` when the client last used the backend (CLOCK_MONOTONIC).
    pub last_used_ns: u64,
    /// The backend the client was sent to.
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

user_pod!(AffinityKey, AffinityValue);

/// Whether a frontend's backend set in `scope` holds only this node's endpoints. `flags` are
/// the frontend's `SVC_F_*` bits (the same in both scopes' masters). The internal scope exists
/// only when `externalTrafficPolicy: Local` splits an external frontend, and then holds the
/// cluster-wide set; the external scope is the local set under the policy that applies to the
/// frontend's kind (`internalTrafficPolicy` for a ClusterIP, `externalTrafficPolicy` for the
/// rest).
pub const fn set_is_local(flags: u16, scope: u8) -> bool {
    if scope == SCOPE_INTERNAL {
        return false;
    }
    let policy = if flags & SVC_F_CLUSTER_IP != 0 { SVC_F_INT_LOCAL } else { SVC_F_EXT_LOCAL };
    flags & policy != 0
}

/// The `service_id` that `affinity` and `sock_backend` entries carry for a frontend's backend
/// set in `scope`: the service port's id, with [`SERVICE_ID_LOCAL_SET`] exactly when the set is
/// node-local ([`set_is_local`]). ClientIP affinity is thus remembered per service port and
/// backend set, so a pick from the cluster-wide set never overrides the local one.
///
/// The agent writes this id into each scope's master (`ServiceValue::service_id`) and the
/// kernel copies the master's id of the scope it used into the entries, so the writer, its
/// stale-entry cleanup and `inspect` compute the id here instead of reading it back. The result
/// does not depend on whether `service_id` already has the bit: applying it to a master's id
/// gives the same id.
///
/// [`SERVICE_ID_LOCAL_SET`]: crate::service::SERVICE_ID_LOCAL_SET
pub const fn affinity_service_id(service_id: u32, flags: u16, scope: u8) -> u32 {
    if set_is_local(flags, scope) { service_id | SERVICE_ID_LOCAL_SET } else { service_id & !SERVICE_ID_LOCAL_SET }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{SCOPE_EXTERNAL, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT, SVC_F_TWO_SCOPES};

    #[test]
    fn the_local_set_bit_marks_exactly_the_node_local_sets() {
        const ID: u32 = 7;
        const LOCAL: u32 = ID | SERVICE_ID_LOCAL_SET;
        let node_port_local = SVC_F_NODE_PORT | SVC_F_EXT_LOCAL | SVC_F_TWO_SCOPES;
        // (rule, flags, scope, id the entries carry)
        let cases = [
            ("a ClusterIP under iTP Cluster: cluster-wide", SVC_F_CLUSTER_IP, SCOPE_EXTERNAL, ID),
            ("a ClusterIP under iTP Local: local", SVC_F_CLUSTER_IP | SVC_F_INT_LOCAL, SCOPE_EXTERNAL, LOCAL),
            ("eTP Local does not touch a ClusterIP", SVC_F_CLUSTER_IP | SVC_F_EXT_LOCAL, SCOPE_EXTERNAL, ID),
            ("a NodePort under eTP Cluster: cluster-wide", SVC_F_NODE_PORT, SCOPE_EXTERNAL, ID),
            ("iTP Local does not touch a NodePort", SVC_F_NODE_PORT | SVC_F_INT_LOCAL, SCOPE_EXTERNAL, ID),
            ("a NodePort under eTP Local, external scope: local", node_port_local, SCOPE_EXTERNAL, LOCAL),
            ("a NodePort under eTP Local, internal scope: cluster-wide", node_port_local, SCOPE_INTERNAL, ID),
            ("a LoadBalancer under eTP Local: local", SVC_F_LOAD_BALANCER | SVC_F_EXT_LOCAL, SCOPE_EXTERNAL, LOCAL),
        ];
        for (rule, flags, scope, want) in cases {
            assert_eq!(affinity_service_id(ID, flags, scope), want, "{rule}");
            assert_eq!(affinity_service_id(LOCAL, flags, scope), want, "{rule}, from a master's id");
        }
    }
}
