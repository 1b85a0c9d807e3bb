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

/// Events of `proxy-agent trace` ([`crate::trace::TraceEvent`]): a ring buffer, written only
/// while [`TRACE_ON`] says someone reads.
pub const TRACE_EVENTS: &str = "trace_events";
/// Whether (until when) the programs write [`TRACE_EVENTS`] ([`crate::trace::TraceUntil`]),
/// one entry at index 0.
pub const TRACE_ON: &str = "trace_on";

/// Direct server return on the backend's node: the flow's reply tuple → the frontend its
/// replies come from ([`crate::dsr`]), an LRU.
pub const DSR: &str = "dsr";

/// Maglev tables (`crate::maglev`): a hash of maps, backend-set id → inner `u64` array (the size, then two slots an element).
pub const MAGLEV: &str = "maglev";
/// The flow hash's seed ([`crate::maglev::MaglevConfig`]), one entry at index 0.
pub const MAGLEV_CONFIG: &str = "maglev_config";

/// Whether the socket programs translate only for sockets of the host network namespace
/// (`--bpf-lb-sock-hostns-only`, for service meshes): a `u32` array of one entry, 1 for yes.
/// Like [`HANDOVER`], not pinned and not in [`ALL`]: every loaded object has its own, written
/// by the agent that loaded it before anything is attached, so the setting follows the flag of
/// the agent whose programs run and no pinned map changes layout.
pub const SOCK_HOSTNS_ONLY: &str = "sock_hostns_only";
/// The pod-facing interfaces (ifindex → 1) whose packets the TC ingress program translates as
/// the socket programs would, when those leave pods alone ([`SOCK_HOSTNS_ONLY`]): empty
/// otherwise. Not pinned, as [`SOCK_HOSTNS_ONLY`]; rewritten by the agent on every interface scan.
pub const POD_INTERFACES: &str = "pod_interfaces";
/// Size of [`POD_INTERFACES`]: far more pods than a node runs (kubelet's default is 110).
pub const POD_INTERFACES_MAX_ENTRIES: u32 = 16_384;

/// Default size of [`SERVICES`] (`--services-map-size`): 100 000 services with 10 endpoints
/// (a master entry and ten slots each on a ClusterIP: 1 100 000 entries) fit, with room for
/// nodePorts. The map is not preallocated (see the agent's `datapath` module), so the size is
/// a cap: the kernel memory follows the entries held, plus 16 bytes a hash bucket (the kernel
/// rounds the buckets up to a power of two, hence this one).
pub const SERVICES_MAX_ENTRIES: u32 = 2_097_152;
/// Default size of [`BACKENDS`] (`--backends-map-size`): 1 000 000 distinct endpoints fit.
/// Not preallocated either.
pub const BACKENDS_MAX_ENTRIES: u32 = 1_048_576;
/// Default size of [`AFFINITY`] (`--affinity-map-size`), an LRU (preallocated by the kernel).
pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;

/// Default size of [`CONNTRACK`] (`--conntrack-map-size`, two entries per flow), an LRU.
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;

/// Size of [`SERVICE_NAMES`] for a services map of `services` entries: every service port
/// needs its own master entry in [`SERVICES`], so it can never hold more service ports than
/// that (a fixed size here refused services no flag could let in).
pub const fn service_names_max_entries(services: u32) -> u32 {
    services
}

/// Size of [`SOURCE_RANGES`] for a services map of `services` entries: an LPM trie is never
/// preallocated, so this is only a cap, as large as the frontends the services map can hold.
pub const fn source_ranges_max_entries(services: u32) -> u32 {
    services
}

/// Size of [`MAGLEV`] for a services map of `services` entries: at most one table per service
/// port (its external backend set), and every service port needs a master entry in
/// [`SERVICES`]. Not preallocated: an entry exists only for a service that uses Maglev.
pub const fn maglev_max_entries(services: u32) -> u32 {
    services
}

/// Size of [`SOCK_REV`] and [`SOCK_BACKEND`] for a conntrack map of `conntrack` entries: one
/// entry a connected (or unconnected UDP) socket, sized like the flows conntrack holds (two
/// entries each). LRUs: when full, the least recently used socket's entry goes.
pub const fn sock_max_entries(conntrack: u32) -> u32 {
    if conntrack < 2 { 1 } else { conntrack / 2 }
}

/// Size of [`DSR`] for a conntrack map of `conntrack` entries: one entry a flow served from
/// this node by direct server return, which on the node that received it holds two conntrack
/// entries; an LRU.
pub const fn dsr_max_entries(conntrack: u32) -> u32 {
    if conntrack < 2 { 1 } else { conntrack / 2 }
}

/// Size of [`FRAGMENTS`] for a conntrack map of `conntrack` entries: fragmented datagrams in
/// flight are a small share of the flows (an LRU, entries live milliseconds).
pub const fn fragments_max_entries(conntrack: u32) -> u32 {
    if conntrack < 32 { 1 } else { conntrack / 32 }
}

// The defaults hold 100 000 services of 10 endpoints on a ClusterIP each (a master entry and
// ten slots), 1 000 000 distinct endpoints and a name per service port.
const _: () = assert!(SERVICES_MAX_ENTRIES >= 100_000 * (1 + 10));
const _: () = assert!(BACKENDS_MAX_ENTRIES >= 1_000_000);
const _: () = assert!(service_names_max_entries(SERVICES_MAX_ENTRIES) >= 100_000);

/// The flag that sizes map `name`, directly or through one of the functions above; `None`
/// for the fixed-size maps ([`CONFIG`], [`DROPS`], [`TRACE_EVENTS`], [`TRACE_ON`],
/// [`MAGLEV_CONFIG`]).
pub fn size_flag(name: &str) -> Option<&'static str> {
    match name {
        SERVICES | SERVICE_NAMES | SOURCE_RANGES | MAGLEV => Some("--services-map-size"),
        BACKENDS => Some("--backends-map-size"),
        AFFINITY => Some("--affinity-map-size"),
        CONNTRACK | SOCK_REV | SOCK_BACKEND | FRAGMENTS | DSR => Some("--conntrack-map-size"),
        _ => None,
    }
}

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
    TRACE_EVENTS,
    TRACE_ON,
    MAGLEV,
    MAGLEV_CONFIG,
    DSR,
];

/// The version of the maps' layout: their names, key and value types, and what their fields
/// and bits mean, recorded beside the pins. Bump it with any change to a type these maps hold,
/// and note the new version against the changed maps in [`CHANGED_IN`]. Maps pinned before
/// versions were recorded are layout 1 (layout 2 added the record, and changed no map). A new
/// map changes no pinned one: an agent adopting older pins creates it, so it needs no bump.
/// Layout 3 widened every address to 16 bytes (IPv4 as IPv4-mapped IPv6, [`crate::addr`]).
pub const LAYOUT_VERSION: u32 = 3;

/// The layout version in which each map last changed in a way its older entries or programs
/// cannot share (its type, key or value, or what they mean). A map pinned under layout P is
/// reused by an agent of layout L when it has not changed since P (and has the size asked for);
/// otherwise the agent replaces it with a new map, carrying its entries over where they fit
/// (proxy-agent's `datapath::layout`). Additive changes (a new flag bit old entries simply do
/// not have) need no entry here.
pub const CHANGED_IN: &[(&str, u32)] = &[
    // Layout 3: 16-byte addresses.
    (SERVICES, 3),
    (BACKENDS, 3),
    (SERVICE_NAMES, 1),
    (AFFINITY, 3),
    (CONNTRACK, 3),
    (SOCK_REV, 3),
    (SOCK_BACKEND, 3),
    (SOURCE_RANGES, 3),
    (FRAGMENTS, 3),
    (CONFIG, 3),
    // Added after layout 2 and never changed since: any pinned `drops` map fits.
    (DROPS, 1),
    // Layout 3: events with 16-byte addresses.
    (TRACE_EVENTS, 3),
    (TRACE_ON, 1),
    // Added after layout 2, with the additive `SVC_F_MAGLEV` bit (older programs ignore it):
    // new maps need no bump.
    (MAGLEV, 1),
    (MAGLEV_CONFIG, 1),
    // Added after layout 3, with the additive `SVC_F_DSR` and `CT_F_DSR` bits: a new map needs
    // no bump.
    (DSR, 1),
];

/// The TC programs' `handover` array: where an upgrade's swap stands for them. Not pinned and
/// not in [`ALL`]: every loaded object has its own, [`HANDOVER_NONE`] unless its agent is
/// taking over from an older agent's programs, which then run after these on each interface.
pub const HANDOVER: &str = "handover";
/// Alone on the interfaces: a packet of no flow passes to the stack, as always.
pub const HANDOVER_NONE: u32 = 0;
/// Attached in front of the old programs, which still do everything: every packet goes on to them.
pub const HANDOVER_DORMANT: u32 = 1;
/// Serving, with the old programs behind: a packet these programs have no flow for (a flow the
/// old ones opened) goes on to them rather than passing or being dropped.
pub const HANDOVER_TAKING_OVER: u32 = 2;

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
        assert_eq!(
            (super::LAYOUT_VERSION, sizes),
            (3, [24, 16, 152, 36, 20, 32, 16, 40, 56, 40, 4, 32, 20, 32, 8, 40])
        );
    }

    #[test]
    fn every_map_but_the_fixed_arrays_is_sized_by_a_flag() {
        for map in super::ALL {
            let fixed =
                [super::CONFIG, super::DROPS, super::TRACE_EVENTS, super::TRACE_ON, super::MAGLEV_CONFIG].contains(map);
            assert_eq!(super::size_flag(map).is_none(), fixed, "{map}");
        }
    }

    #[test]
    fn derived_sizes_follow_their_flag_past_any_fixed_cap() {
        // 65 536 was service_names' fixed size: 100 000 services need more.
        assert_eq!(super::service_names_max_entries(2_097_152), 2_097_152);
        assert_eq!(super::source_ranges_max_entries(12), 12);
        assert_eq!(super::sock_max_entries(super::CONNTRACK_MAX_ENTRIES), 131_072);
        assert_eq!(super::fragments_max_entries(super::CONNTRACK_MAX_ENTRIES), 8_192);
        // Tiny conntrack maps still give the derived maps an entry (a map cannot be empty).
        assert_eq!((super::sock_max_entries(1), super::fragments_max_entries(1)), (1, 1));
    }

    #[test]
    fn every_map_has_a_layout_version_no_newer_than_the_current_one() {
        for map in super::ALL {
            let version = super::CHANGED_IN.iter().find(|(name, _)| name == map).map(|(_, v)| *v);
            assert!(version.is_some_and(|v| v <= super::LAYOUT_VERSION), "{map}: {version:?}");
        }
    }
}
