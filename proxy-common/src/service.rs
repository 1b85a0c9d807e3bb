//! The `services` map: frontends and their backend slots, laid out like Cilium's `lb4_key` /
//! `lb4_service`.
//!
//! A service frontend (address, port, protocol) owns `count + 1` entries: slot 0 is the master
//! entry with `count`, `flags`, `service_id` and the affinity timeout; slots `1..=count` each name
//! one backend id. Selection reads slot 0, then slot `random % count + 1`. The agent writes new
//! slots before it raises `count` and lowers `count` before it deletes slots, so a lookup never
//! sees a slot that is not there; a backend set has no size cap.

use crate::{addr::Addr, user_pod};

/// Key of the `services` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address ([`crate::addr`]: IPv4 as IPv4-mapped IPv6).
    pub address: Addr,
    /// Frontend port, host byte order.
    pub port: u16,
    /// 0: the master entry; `1..=count`: a backend slot.
    pub slot: u16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    /// [`SCOPE_EXTERNAL`] or [`SCOPE_INTERNAL`].
    pub scope: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<ServiceKey>() == 24);

/// The backend set used by traffic that enters the node from outside (and by every frontend whose
/// master entry lacks [`SVC_F_TWO_SCOPES`]).
pub const SCOPE_EXTERNAL: u8 = 0;
/// The backend set used by traffic from this node when the service has two scopes (a traffic
/// policy of `Local` applies to one kind of traffic and not to the other).
pub const SCOPE_INTERNAL: u8 = 1;

impl ServiceKey {
    /// The master entry (slot 0) of a frontend in the external scope.
    pub const fn master(address: Addr, port: u16, proto: u8) -> Self {
        Self { address, port, slot: 0, proto, scope: SCOPE_EXTERNAL, _pad: [0; 2] }
    }

    /// The same frontend at another slot.
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }

    /// The same frontend in another scope.
    pub const fn with_scope(self, scope: u8) -> Self {
        Self { scope, ..self }
    }
}

/// Value of the `services` map. In the master entry every field but `backend_id` is meaningful;
/// in a backend slot only `backend_id` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Backend slot: the id of the backend (a key of the `backends` map). Master entry: 0.
    pub backend_id: u32,
    /// Master entry: number of backend slots. 0 means no usable endpoint: the connection is refused.
    pub count: u16,
    /// Master entry: `SVC_F_*` bits.
    pub flags: u16,
    /// Master entry: the service port's id, shared by all its frontends (ClientIP affinity is per
    /// service port, as kube-proxy's `recent` lists are).
    pub service_id: u32,
    /// Master entry: `sessionAffinity: ClientIP` timeout in seconds; 0 means no affinity.
    pub affinity_timeout: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 16);

/// Set in a master's `service_id` when its backend set holds only this node's endpoints (a
/// traffic policy of `Local`): ClientIP affinity is remembered per backend set, so a client's
/// pick from the cluster-wide set never overrides the local one (as kube-proxy's per-chain
/// `recent` lists do). The rest of the id names the service port (`service_names`).
pub const SERVICE_ID_LOCAL_SET: u32 = 1 << 31;

/// The frontend is a ClusterIP.
pub const SVC_F_CLUSTER_IP: u16 = 1 << 0;
/// The frontend is a node address on a nodePort.
pub const SVC_F_NODE_PORT: u16 = 1 << 1;
/// The frontend is an `externalIPs` entry.
pub const SVC_F_EXTERNAL_IP: u16 = 1 << 2;
/// The frontend is a LoadBalancer ingress IP.
pub const SVC_F_LOAD_BALANCER: u16 = 1 << 3;
/// External traffic keeps its source address (`externalTrafficPolicy: Local`); otherwise it is
/// SNATed to the node address.
pub const SVC_F_EXT_LOCAL: u16 = 1 << 4;
/// Traffic from this node only goes to this node's endpoints (`internalTrafficPolicy: Local`).
pub const SVC_F_INT_LOCAL: u16 = 1 << 5;
/// The frontend has a separate [`SCOPE_INTERNAL`] backend set for traffic from this node.
pub const SVC_F_TWO_SCOPES: u16 = 1 << 6;
/// `sessionAffinity: ClientIP`.
pub const SVC_F_AFFINITY: u16 = 1 << 7;
/// Only terminating endpoints are left, and they serve (graceful-termination fallback).
pub const SVC_F_TERMINATING_FALLBACK: u16 = 1 << 8;
/// `loadBalancerSourceRanges`: traffic from outside is admitted only from the client prefixes
/// in the `source_ranges` map.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 9;
/// Traffic from outside picks its backend from the Maglev table of the frontend's backend set
/// (`crate::maglev`) instead of at random, so every node sends a flow to the same backend.
/// Set only on external frontends (nodePort, externalIP, LoadBalancer).
pub const SVC_F_MAGLEV: u16 = 1 << 10;
/// Traffic from outside to a backend on another node goes by direct server return
/// (`crate::dsr`): DNATed without SNAT, the frontend carried to the backend's node in an IPv4
/// option, and answered from there. Set only on external frontends under
/// `externalTrafficPolicy: Cluster` (`--lb-mode dsr`, or `hybrid` for TCP).
pub const SVC_F_DSR: u16 = 1 << 11;

/// Data of a `source_ranges` LPM trie key (the trie's key is this behind a `u32` prefix
/// length): a frontend, then a client prefix. The prefix length counts the
/// [`SOURCE_RANGE_FRONTEND_BITS`] of the frontend fields plus the client prefix's length, so a
/// lookup with the full client address matches the frontend exactly and the client by longest
/// prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    /// Frontend address ([`crate::addr`]).
    pub address: Addr,
    /// Frontend port, network byte order (the trie compares bytes in order).
    pub port_be: [u8; 2],
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    pub _pad: u8,
    /// Client address (prefix), in the frontend's family ([`crate::addr`]): an IPv4 prefix of
    /// length `n` is the mapped prefix of length `96 + n`.
    pub client: Addr,
}
const _: () = assert!(size_of::<SourceRange>() == 36);

/// Bits of a [`SourceRange`] before the client prefix.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 160;

impl SourceRange {
    /// The data for `client` at a frontend.
    pub const fn new(address: Addr, port: u16, proto: u8, client: Addr) -> Self {
        Self { address, port_be: port.to_be_bytes(), proto, _pad: 0, client }
    }
}

/// Value of the `service_names` map (key: [`ServiceValue::service_id`]): which service port an id
/// stands for, so `inspect` and `bpftool` can name it. The datapath never reads it. Strings are
/// NUL-padded UTF-8 (Kubernetes names fit: namespaces and services are at most 63 bytes, port
/// names 15).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    /// The service's namespace.
    pub namespace: [u8; 64],
    /// The service's name.
    pub name: [u8; 64],
    /// The port's name (empty for an unnamed port).
    pub port: [u8; 16],
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<ServiceName>() == 152);

impl Default for ServiceName {
    fn default() -> Self {
        Self { namespace: [0; 64], name: [0; 64], port: [0; 16], proto: 0, _pad: [0; 7] }
    }
}

user_pod!(ServiceKey, ServiceValue, ServiceName, SourceRange);
