//! Every map of the datapath. Names and default sizes come from `proxy_common::maps` (the names
//! are repeated as literals because the attribute needs one; the agent checks them at load).

use aya_ebpf::{
    bindings::{BPF_F_INNER_MAP, BPF_F_NO_PREALLOC},
    btf_maps::{Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::{Backend, BackendId},
    config::NodeConfig,
    conntrack::{CtKey, CtValue, FragKey, FragPorts},
    dsr::DsrValue,
    maglev::{MaglevConfig, TABLE_SIZE_DEFAULT, inner_entries},
    maps::{
        AFFINITY_MAX_ENTRIES, BACKENDS_MAX_ENTRIES, CONNTRACK_MAX_ENTRIES, DROPS_MAX_ENTRIES,
        POD_INTERFACES_MAX_ENTRIES, SERVICES_MAX_ENTRIES, dsr_max_entries, fragments_max_entries, maglev_max_entries,
        service_names_max_entries, sock_max_entries, source_ranges_max_entries,
    },
    service::{ServiceKey, ServiceName, ServiceValue, SourceRange},
    sock::{SockBackendKey, SockBackendValue, SockRevKey, SockRevValue},
    trace::{TRACE_EVENTS_BYTES, TraceEvent, TraceUntil},
};

/// Flags of the maps only the agent writes: not preallocated, so their kernel memory follows
/// the entries held rather than the size (100 000 services need a size that, preallocated,
/// would take hundreds of MiB on every node). Lookups cost the same; programs never insert
/// into them, where preallocation matters.
const AGENT_WRITTEN: usize = BPF_F_NO_PREALLOC as usize;

/// Frontends (slot 0) and their backend slots (1..=count).
#[btf_map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { SERVICES_MAX_ENTRIES as usize }, AGENT_WRITTEN> =
    HashMap::new();

/// Backend id → endpoint.
#[btf_map(name = "backends")]
pub static BACKENDS: HashMap<BackendId, Backend, { BACKENDS_MAX_ENTRIES as usize }, AGENT_WRITTEN> = HashMap::new();

/// Service id → service port name. Written by the agent for inspection; never read here.
#[btf_map(name = "service_names")]
pub static SERVICE_NAMES: HashMap<
    u32,
    ServiceName,
    { service_names_max_entries(SERVICES_MAX_ENTRIES) as usize },
    AGENT_WRITTEN,
> = HashMap::new();

/// ClientIP session affinity: (client, service port) → (backend, last use).
#[btf_map(name = "affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_MAX_ENTRIES as usize }> = LruHashMap::new();

/// Per-flow NAT state of the TC path: original and reply direction of each flow.
#[btf_map(name = "conntrack")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, { CONNTRACK_MAX_ENTRIES as usize }> = LruHashMap::new();

/// The node's settings (index 0), written by the agent.
#[btf_map(name = "config")]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();

/// 1 (index 0) under `--bpf-lb-sock-hostns-only`: the socket programs leave sockets outside the
/// host network namespace alone, and pods' traffic is translated per packet by TC instead.
/// Not pinned: this object's own, written by the agent that loaded it.
#[btf_map(name = "sock_hostns_only")]
pub static SOCK_HOSTNS_ONLY: Array<u32, 1> = Array::new();

/// Pod-facing interfaces (ifindex → 1) whose packets TC translates as the socket path would
/// (`--bpf-lb-sock-hostns-only`); empty without it. Not pinned, as [`SOCK_HOSTNS_ONLY`].
#[btf_map(name = "pod_interfaces")]
pub static POD_INTERFACES: HashMap<u32, u32, { POD_INTERFACES_MAX_ENTRIES as usize }, AGENT_WRITTEN> = HashMap::new();

/// Socket and backend → the frontend it addressed: replies (`recvmsg`) and `getpeername` show
/// the service address.
#[btf_map(name = "sock_rev")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue, { sock_max_entries(CONNTRACK_MAX_ENTRIES) as usize }> =
    LruHashMap::new();

/// Unconnected UDP socket and frontend → the backend it keeps across `sendmsg` calls.
#[btf_map(name = "sock_backend")]
pub static SOCK_BACKEND: LruHashMap<
    SockBackendKey,
    SockBackendValue,
    { sock_max_entries(CONNTRACK_MAX_ENTRIES) as usize },
> = LruHashMap::new();

/// `loadBalancerSourceRanges`: (frontend, client prefix) entries; a hit admits the client.
#[btf_map(name = "source_ranges")]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u8, { source_ranges_max_entries(SERVICES_MAX_ENTRIES) as usize }> =
    LpmTrie::new();

/// Direct server return on the backend's node: a flow's reply tuple (backend → client) → the
/// frontend its replies come from, learnt from the option the receiving node added.
#[btf_map(name = "dsr")]
pub static DSR: LruHashMap<CtKey, DsrValue, { dsr_max_entries(CONNTRACK_MAX_ENTRIES) as usize }> = LruHashMap::new();

/// Ports of fragmented datagrams in flight: the first fragment records them for the rest.
#[btf_map(name = "fragments")]
pub static FRAGMENTS: LruHashMap<FragKey, FragPorts, { fragments_max_entries(CONNTRACK_MAX_ENTRIES) as usize }> =
    LruHashMap::new();

/// Packets and socket calls dropped or refused, per CPU, indexed by reason
/// (`proxy_common::drop`).
#[btf_map(name = "drops")]
pub static DROPS: PerCpuArray<u64, { DROPS_MAX_ENTRIES as usize }> = PerCpuArray::new();

/// `proxy-agent trace`: every translation and drop, while [`TRACE_ON`] says someone reads.
#[btf_map(name = "trace_events")]
pub static TRACE_EVENTS: RingBuf<TraceEvent, { TRACE_EVENTS_BYTES as usize }> = RingBuf::new();

/// Until when (index 0) the programs write [`TRACE_EVENTS`]; 0: nobody traces.
#[btf_map(name = "trace_on")]
pub static TRACE_ON: Array<TraceUntil, 1> = Array::new();

/// Flags of a Maglev table: `BPF_F_INNER_MAP` lets tables of any size sit in [`MAGLEV`] (each
/// carries its size, `proxy_common::maglev`), so `--maglev-table-size` needs no new object.
const MAGLEV_TABLE: usize = BPF_F_INNER_MAP as usize;

/// One Maglev table: element 0 holds its size `M`, the rest the backend ids of slots `1..=M`,
/// two to an element (`proxy_common::maglev::slot_place`). The size here is only the
/// template's; the agent creates each table with the size it was asked for.
pub type MaglevTable = Array<u64, { inner_entries(TABLE_SIZE_DEFAULT) as usize }, MAGLEV_TABLE>;

/// Backend-set id (`affinity_service_id`) → its Maglev table. The agent swaps a whole new
/// table in with one update, so a lookup never sees a half-built one.
#[btf_map(name = "maglev")]
pub static MAGLEV: HashOfMaps<u32, MaglevTable, { maglev_max_entries(SERVICES_MAX_ENTRIES) as usize }, AGENT_WRITTEN> =
    HashOfMaps::new();

/// The flow hash's seed (index 0), from `--maglev-hash-seed`.
#[btf_map(name = "maglev_config")]
pub static MAGLEV_CONFIG: Array<MaglevConfig, 1> = Array::new();
