//! Map names (as pinned under the bpffs root) and default sizes, the one place both sides take
//! them from. The agent can resize maps at load time; the BPF object's sizes are the defaults.

/// Frontends and backend slots ([`crate::service`]).
pub const SERVICES: &str = "services";
/// Backend id → endpoint ([`crate::backend`]).
pub const BACKENDS: &str = "backends";
/// ClientIP affinity LRU ([`crate::affinity`]).
pub const AFFINITY: &str = "affinity";

/// Service id → service port name, for inspection ([`crate::service::ServiceName`]).
pub const SERVICE_NAMES: &str = "service_names";

/// Per-flow NAT state of the TC path ([`crate::conntrack`]).
pub const CONNTRACK: &str = "conntrack";
/// The node's settings for the datapath ([`crate::config`]), one entry at index 0.
pub const CONFIG: &str = "config";

/// Socket → frontend, for replies and `getpeername` ([`crate::sock`]).
pub const SOCK_REV: &str = "sock_rev";
/// Unconnected UDP socket → its backend ([`crate::sock`]).
pub const SOCK_BACKEND: &str = "sock_backend";

/// `loadBalancerSourceRanges` per LoadBalancer frontend (LPM trie, value unused: `u8`).
pub const SOURCE_RANGES: &str = "source_ranges";

/// Ports of fragmented datagrams in flight ([`crate::conntrack::FragKey`]).
pub const FRAGMENTS: &str = "fragments";

/// Packets and socket calls dropped or refused, per reason ([`crate::drop`]): a per-CPU array
/// of `u64` counters indexed by reason.
pub const DROPS: &str = "drops";

/// Default size of [`SERVICES`]: 10 000 services with 10 endpoints on two frontends each fit.
pub const SERVICES_MAX_ENTRIES: u32 = 262_144;
/// Default size of [`BACKENDS`].
pub const BACKENDS_MAX_ENTRIES: u32 = 131_072;
/// Default size of [`AFFINITY`].
pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;

/// Default size of [`SERVICE_NAMES`].
pub const SERVICE_NAMES_MAX_ENTRIES: u32 = 65_536;

/// Default size of [`CONNTRACK`] (two entries per flow).
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;

/// Default size of [`SOCK_REV`] and [`SOCK_BACKEND`].
pub const SOCK_MAX_ENTRIES: u32 = 131_072;

/// Default size of [`FRAGMENTS`].
pub const FRAGMENTS_MAX_ENTRIES: u32 = 8_192;

/// Default size of [`SOURCE_RANGES`].
pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 16_384;

/// Size of [`DROPS`]: room for reasons added later without a new map layout.
pub const DROPS_MAX_ENTRIES: u32 = 64;

/// Every map the agent pins, in the order `inspect` lists them.
pub const ALL: &[&str] = &[
    SERVICES,
    BACKENDS,
    SERVICE_NAMES,
    AFFINITY,
    CONNTRACK,
    SOCK_REV,
    SOCK_BACKEND,
    SOURCE_RANGES,
    FRAGMENTS,
    CONFIG,
    DROPS,
];

/// The version of the maps' layout: their names, key and value types, and what their fields
/// and bits mean, recorded beside the pins. Bump it with any change to a type these maps hold,
/// and note the new version against the changed maps in [`CHANGED_IN`]. Maps pinned before
/// versions were recorded are layout 1 (layout 2 added the record, and changed no map). A new
/// map changes no pinned one: an agent adopting older pins creates it, so it needs no bump.
pub const LAYOUT_VERSION: u32 = 2;

/// The layout version in which each map last changed in a way its older entries or programs
/// cannot share (its type, key or value, or what they mean). A map pinned under layout P is
/// reused by an agent of layout L when it has not changed since P (and has the size asked for);
/// otherwise the agent replaces it with a new map, carrying its entries over where they fit
/// (proxy-agent's `datapath::layout`). Additive changes (a new flag bit old entries simply do
/// not have) need no entry here.
pub const CHANGED_IN: &[(&str, u32)] = &[
    (SERVICES, 1),
    (BACKENDS, 1),
    (SERVICE_NAMES, 1),
    (AFFINITY, 1),
    (CONNTRACK, 1),
    (SOCK_REV, 1),
    (SOCK_BACKEND, 1),
    (SOURCE_RANGES, 1),
    (FRAGMENTS, 1),
    (CONFIG, 1),
    // Added after layout 2 and never changed since: any pinned `drops` map fits.
    (DROPS, 1),
];

/// The layout version in which map `name` last changed ([`CHANGED_IN`]).
pub fn changed_in(name: &str) -> u32 {
    CHANGED_IN.iter().find(|(map, _)| *map == name).map_or(LAYOUT_VERSION, |(_, version)| *version)
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use crate::{affinity::*, backend::*, config::*, conntrack::*, service::*, sock::*};

    /// A change to any map type changes these sizes (not every change does: a reordered or
    /// reinterpreted field needs the same bump). If this fails, bump [`super::LAYOUT_VERSION`],
    /// say in `datapath::layout` which maps an upgrade cannot carry over, then update the list.
    #[test]
    fn a_changed_map_type_comes_with_a_new_layout_version() {
        let sizes = [
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            size_of::<ServiceName>(),
            size_of::<SourceRange>(),
            size_of::<Backend>(),
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            size_of::<FragKey>(),
            size_of::<FragPorts>(),
            size_of::<SockRevKey>(),
            size_of::<SockRevValue>(),
            size_of::<SockBackendKey>(),
            size_of::<SockBackendValue>(),
            size_of::<NodeConfig>(),
        ];
        assert_eq!((super::LAYOUT_VERSION, sizes), (2, [12, 16, 152, 12, 8, 16, 16, 16, 32, 12, 4, 16, 8, 16, 8, 16]));
    }

    #[test]
    fn every_map_has_a_layout_version_no_newer_than_the_current_one() {
        for map in super::ALL {
            let version = super::CHANGED_IN.iter().find(|(name, _)| name == map).map(|(_, v)| *v);
            assert!(version.is_some_and(|v| v <= super::LAYOUT_VERSION), "{map}: {version:?}");
        }
    }
}
