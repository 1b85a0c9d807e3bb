//! Why the datapath dropped or refused a packet or a socket call: the index of the `drops`
//! per-CPU array, as Cilium's `DROP_*` codes index its metrics map. Each program counts every
//! packet it discards (or hands to the stack to be refused) under one of these reasons; the
//! agent sums the CPUs and exports `proxy_datapath_drops_total{reason}`.
//!
//! Reasons are only ever added (at the end, below [`crate::maps::DROPS_MAX_ENTRIES`]): a new one
//! changes no map layout, and an older agent simply does not read it.

/// TC: a frontend with no endpoint anywhere. The packet goes to the node's stack, which answers
/// with a TCP RST or an ICMP port unreachable (kube-proxy's REJECT).
pub const NO_ENDPOINT: u32 = 0;
/// TC: `externalTrafficPolicy: Local` and no endpoint on this node (other nodes have some).
pub const NO_LOCAL_ENDPOINT: u32 = 1;
/// TC: the client is outside the frontend's `loadBalancerSourceRanges`.
pub const SOURCE_RANGE_DENIED: u32 = 2;
/// TC: a TCP packet other than a SYN for a frontend, with no tracked flow (conntrack INVALID).
pub const NOT_A_NEW_CONNECTION: u32 = 3;
/// TC: every SNAT port tried for a new flow was taken.
pub const SNAT_PORTS_EXHAUSTED: u32 = 4;
/// TC: a new flow's conntrack entry could not be written.
pub const CONNTRACK_INSERT_FAILED: u32 = 5;
/// TC: a flow to be SNATed, and no node address configured to SNAT to.
pub const NO_SNAT_ADDRESS: u32 = 6;
/// TC: an IPv4 TCP/UDP packet too short for its headers, or with a bad header length; left to
/// the stack, which discards it.
pub const MALFORMED: u32 = 7;
/// TC: a later IPv4 fragment whose first fragment was not seen, so its ports are unknown; left
/// untranslated to the stack.
pub const FRAGMENT_WITHOUT_STATE: u32 = 8;
/// TC: the route lookup for a translated packet failed (unreachable, blackhole, prohibited or an
/// error); the stack decides what becomes of it.
pub const FIB_FAILED: u32 = 9;
/// TC: rewriting a packet (addresses, ports, checksums) failed.
pub const REWRITE_FAILED: u32 = 10;
/// TC: redirecting a translated packet to its interface failed.
pub const REDIRECT_FAILED: u32 = 11;
/// Socket path: `connect()` to a frontend with no endpoint, refused with ECONNREFUSED.
pub const CONNECT_REFUSED: u32 = 12;
/// Socket path: `sendmsg()` to a frontend with no endpoint, refused with ECONNREFUSED.
pub const SENDMSG_REFUSED: u32 = 13;

/// The number of reasons defined (the indexes `0..COUNT`).
pub const COUNT: u32 = 14;

/// Each reason's name, as the metric's `reason` label and `inspect drops` show it.
const NAMES: [&str; COUNT as usize] = [
    "no_endpoint",
    "no_local_endpoint",
    "source_range_denied",
    "not_a_new_connection",
    "snat_ports_exhausted",
    "conntrack_insert_failed",
    "no_snat_address",
    "malformed",
    "fragment_without_state",
    "fib_failed",
    "rewrite_failed",
    "redirect_failed",
    "connect_refused",
    "sendmsg_refused",
];

/// The name of `reason`, or `"unknown"` for an index this build does not define (written by a
/// newer program).
pub const fn name(reason: u32) -> &'static str {
    if reason < COUNT { NAMES[reason as usize] } else { "unknown" }
}

const _: () = assert!(COUNT <= crate::maps::DROPS_MAX_ENTRIES);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_name() {
        for (i, a) in NAMES.iter().enumerate() {
            assert!(!a.is_empty() && a.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{a}");
            for b in &NAMES[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(name(SOURCE_RANGE_DENIED), "source_range_denied");
        assert_eq!(name(SENDMSG_REFUSED), "sendmsg_refused");
        assert_eq!(name(COUNT), "unknown");
    }
}
