//! The carried maps' types as layout 2 had them (IPv4 addresses of 4 bytes), and their
//! conversion to today's: an address becomes IPv4-mapped ([`addr::from_v4`]), new padding is
//! zero, every other field keeps its value. An agent upgrading from layout 2 converts the
//! entries of the maps it carries over ([`super::carry`]); `service_names`, `affinity` values and
//! `sock_backend` values did not change and are copied as they are.

use proxy_common::{addr, affinity, backend, conntrack, maps, sock};

use crate::sys::bpf::{BpfError, PinnedMap};

/// Layout 2's `backends` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Endpoint IPv4 address, network byte order.
    pub address: [u8; 4],
    /// Endpoint port, host byte order.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
}
const _: () = assert!(size_of::<Backend>() == 8);

impl From<Backend> for backend::Backend {
    fn from(old: Backend) -> Self {
        Self { address: addr::from_v4(old.address), port: old.port, proto: old.proto, flags: old.flags }
    }
}

/// Layout 2's `conntrack` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtKey {
    /// Source address, network byte order.
    pub src: [u8; 4],
    /// Destination address, network byte order.
    pub dst: [u8; 4],
    /// Source port, host byte order.
    pub sport: u16,
    /// Destination port, host byte order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Padding.
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey>() == 16);

impl From<CtKey> for conntrack::CtKey {
    fn from(old: CtKey) -> Self {
        Self {
            src: addr::from_v4(old.src),
            dst: addr::from_v4(old.dst),
            sport: old.sport,
            dport: old.dport,
            proto: old.proto,
            _pad: [0; 3],
        }
    }
}

/// Layout 2's `conntrack` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// New source address, network byte order.
    pub src: [u8; 4],
    /// New destination address, network byte order.
    pub dst: [u8; 4],
    /// New source port, host byte order.
    pub sport: u16,
    /// New destination port, host byte order.
    pub dport: u16,
    /// The backend of the flow.
    pub backend_id: u32,
    /// `bpf_ktime_get_ns()` of the last packet.
    pub last_seen_ns: u64,
    /// `CT_F_*` bits.
    pub flags: u16,
    /// Padding.
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<CtValue>() == 32);

impl From<CtValue> for conntrack::CtValue {
    fn from(old: CtValue) -> Self {
        Self {
            src: addr::from_v4(old.src),
            dst: addr::from_v4(old.dst),
            sport: old.sport,
            dport: old.dport,
            backend_id: old.backend_id,
            last_seen_ns: old.last_seen_ns,
            flags: old.flags,
            _pad: [0; 6],
        }
    }
}

/// Layout 2's `affinity` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    /// Socket path: the client's network namespace cookie. TC path: 0.
    pub netns_cookie: u64,
    /// TC path: the client's IPv4 address, network byte order. Socket path: zero.
    pub client: [u8; 4],
    /// The backend set's id.
    pub service_id: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 16);

impl From<AffinityKey> for affinity::AffinityKey {
    fn from(old: AffinityKey) -> Self {
        // The socket path's entries have no client address: zero stays zero (`::`), which is
        // what today's socket programs look up, not `::ffff:0.0.0.0`.
        let client = if old.client == [0; 4] { addr::UNSPECIFIED } else { addr::from_v4(old.client) };
        Self { netns_cookie: old.netns_cookie, client, service_id: old.service_id, _pad: 0 }
    }
}

/// Layout 2's `sock_rev` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevKey {
    /// The socket's cookie.
    pub cookie: u64,
    /// Backend IPv4 address, network byte order.
    pub address: [u8; 4],
    /// Backend port, host byte order.
    pub port: u16,
    /// Padding.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SockRevKey>() == 16);

impl From<SockRevKey> for sock::SockRevKey {
    fn from(old: SockRevKey) -> Self {
        Self { cookie: old.cookie, address: addr::from_v4(old.address), port: old.port, _pad: [0; 6] }
    }
}

/// Layout 2's `sock_rev` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    /// Frontend IPv4 address, network byte order.
    pub address: [u8; 4],
    /// Frontend port, host byte order.
    pub port: u16,
    /// Padding.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SockRevValue>() == 8);

impl From<SockRevValue> for sock::SockRevValue {
    fn from(old: SockRevValue) -> Self {
        Self { address: addr::from_v4(old.address), port: old.port, _pad: [0; 2] }
    }
}

/// Layout 2's `sock_backend` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockBackendKey {
    /// The socket's cookie.
    pub cookie: u64,
    /// Frontend IPv4 address, network byte order.
    pub address: [u8; 4],
    /// Frontend port, host byte order.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Padding.
    pub _pad: u8,
}
const _: () = assert!(size_of::<SockBackendKey>() == 16);

impl From<SockBackendKey> for sock::SockBackendKey {
    fn from(old: SockBackendKey) -> Self {
        Self { cookie: old.cookie, address: addr::from_v4(old.address), port: old.port, proto: old.proto, _pad: [0; 5] }
    }
}

// SAFETY: each type is `#[repr(C)]` with integer fields only and every padding byte an explicit
// field (the size assertions above), so any bytes of its size are a valid value.
unsafe impl aya::Pod for Backend {}
// SAFETY: as above.
unsafe impl aya::Pod for CtKey {}
// SAFETY: as above.
unsafe impl aya::Pod for CtValue {}
// SAFETY: as above.
unsafe impl aya::Pod for AffinityKey {}
// SAFETY: as above.
unsafe impl aya::Pod for SockRevKey {}
// SAFETY: as above.
unsafe impl aya::Pod for SockRevValue {}
// SAFETY: as above.
unsafe impl aya::Pod for SockBackendKey {}

/// Copies the entries of `from`, map `name` pinned by a layout-2 agent, into `to` (today's
/// types), converting each; with `only_missing`, entries `to` has are kept. A map with no
/// conversion here, or whose sizes are not layout 2's, is a [`BpfError::Layout`].
pub fn convert(name: &str, from: &PinnedMap, to: &PinnedMap, only_missing: bool) -> Result<u64, BpfError> {
    match name {
        maps::BACKENDS => from.copy_converted(to, only_missing, |id: u32, b: Backend| (id, backend::Backend::from(b))),
        maps::CONNTRACK => from.copy_converted(to, only_missing, |k: CtKey, v: CtValue| {
            (conntrack::CtKey::from(k), conntrack::CtValue::from(v))
        }),
        maps::AFFINITY => from.copy_converted(to, only_missing, |k: AffinityKey, v: affinity::AffinityValue| {
            (affinity::AffinityKey::from(k), v)
        }),
        maps::SOCK_REV => from.copy_converted(to, only_missing, |k: SockRevKey, v: SockRevValue| {
            (sock::SockRevKey::from(k), sock::SockRevValue::from(v))
        }),
        maps::SOCK_BACKEND => from.copy_converted(to, only_missing, |k: SockBackendKey, v: sock::SockBackendValue| {
            (sock::SockBackendKey::from(k), v)
        }),
        _ => Err(from.layout_error(to)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn mapped(a: u8, b: u8, c: u8, d: u8) -> addr::Addr {
        Ipv4Addr::new(a, b, c, d).to_ipv6_mapped().octets()
    }

    #[test]
    fn a_conntrack_entry_keeps_its_flow_with_mapped_addresses() {
        let key = CtKey { src: [192, 0, 2, 7], dst: [10, 0, 0, 1], sport: 40000, dport: 30050, proto: 6, _pad: [9; 3] };
        let value = CtValue {
            src: [10, 0, 0, 1],
            dst: [10, 244, 2, 2],
            sport: 51000,
            dport: 8080,
            backend_id: 7,
            last_seen_ns: 123_456_789,
            flags: conntrack::CT_F_REPLY,
            _pad: [9; 6],
        };
        let want_key = conntrack::CtKey {
            src: mapped(192, 0, 2, 7),
            dst: mapped(10, 0, 0, 1),
            sport: 40000,
            dport: 30050,
            proto: 6,
            _pad: [0; 3],
        };
        assert_eq!(conntrack::CtKey::from(key), want_key, "old padding is not carried");
        let want_value = conntrack::CtValue {
            src: mapped(10, 0, 0, 1),
            dst: mapped(10, 244, 2, 2),
            sport: 51000,
            dport: 8080,
            backend_id: 7,
            last_seen_ns: 123_456_789,
            flags: conntrack::CT_F_REPLY,
            _pad: [0; 6],
        };
        assert_eq!(conntrack::CtValue::from(value), want_value);
    }

    #[test]
    fn affinity_keys_map_a_client_address_and_keep_the_socket_paths_zero() {
        let tc = AffinityKey { netns_cookie: 0, client: [192, 0, 2, 7], service_id: 3 };
        let want = affinity::AffinityKey { netns_cookie: 0, client: mapped(192, 0, 2, 7), service_id: 3, _pad: 0 };
        assert_eq!(affinity::AffinityKey::from(tc), want);
        let socket = AffinityKey { netns_cookie: 4097, client: [0; 4], service_id: 3 };
        let want = affinity::AffinityKey { netns_cookie: 4097, client: addr::UNSPECIFIED, service_id: 3, _pad: 0 };
        assert_eq!(affinity::AffinityKey::from(socket), want);
    }

    #[test]
    fn backends_and_socket_entries_get_mapped_addresses() {
        let b = Backend { address: [10, 244, 1, 2], port: 8080, proto: 17, flags: backend::BACKEND_F_LOCAL };
        let want =
            backend::Backend { address: mapped(10, 244, 1, 2), port: 8080, proto: 17, flags: backend::BACKEND_F_LOCAL };
        assert_eq!(backend::Backend::from(b), want);
        let rev = SockRevKey { cookie: 77, address: [10, 244, 1, 2], port: 8080, _pad: [1; 2] };
        let want = sock::SockRevKey { cookie: 77, address: mapped(10, 244, 1, 2), port: 8080, _pad: [0; 6] };
        assert_eq!(sock::SockRevKey::from(rev), want);
        let frontend = SockRevValue { address: [10, 96, 0, 10], port: 53, _pad: [1; 2] };
        let want = sock::SockRevValue { address: mapped(10, 96, 0, 10), port: 53, _pad: [0; 2] };
        assert_eq!(sock::SockRevValue::from(frontend), want);
        let kept = SockBackendKey { cookie: 77, address: [10, 96, 0, 10], port: 53, proto: 17, _pad: 1 };
        let want =
            sock::SockBackendKey { cookie: 77, address: mapped(10, 96, 0, 10), port: 53, proto: 17, _pad: [0; 5] };
        assert_eq!(sock::SockBackendKey::from(kept), want);
    }
}
