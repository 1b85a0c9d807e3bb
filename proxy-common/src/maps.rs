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

/// Every map the agent pins, in the order `inspect` lists them.
pub const ALL: &[&str] =
    &[SERVICES, BACKENDS, SERVICE_NAMES, AFFINITY, CONNTRACK, SOCK_REV, SOCK_BACKEND, SOURCE_RANGES, FRAGMENTS, CONFIG];
