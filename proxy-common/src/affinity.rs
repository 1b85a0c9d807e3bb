//! The `affinity` LRU map: `sessionAffinity: ClientIP` memory.

use crate::user_pod;

/// Key of the `affinity` map: one client of one service port.
///
/// On the socket path the client is known by its network namespace (a pod; its source address
/// is not chosen yet at connect time), as Cilium does; on the TC path by its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Socket path: the client's network namespace cookie. TC path: 0.
    pub netns_cookie: u64,
    /// TC path: the client's IPv4 address, network byte order. Socket path: zero.
    pub client: [u8; 4],
    /// [`crate::service::ServiceValue::service_id`] of the service port.
    pub service_id: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 16);

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
