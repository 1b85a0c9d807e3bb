//! Socket-path state: the reverse map that makes replies and `getpeername` show the service
//! address, and the backend an unconnected UDP socket keeps across `sendmsg` calls.

use crate::{addr::Addr, user_pod};

/// Key of the `sock_rev` LRU map: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Backend address ([`crate::addr`]).
    pub address: Addr,
    /// Backend port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<SockRevKey>() == 32);

/// Value of the `sock_rev` map: the frontend the socket addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevValue {
    /// Frontend address ([`crate::addr`]).
    pub address: Addr,
    /// Frontend port, host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SockRevValue>() == 20);

/// Key of the `sock_backend` LRU map: an unconnected UDP socket and a frontend it sends to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockBackendKey {
    /// The socket's cookie.
    pub cookie: u64,
    /// Frontend address ([`crate::addr`]).
    pub address: Addr,
    /// Frontend port, host byte order.
    pub port: u16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<SockBackendKey>() == 32);

/// Value of the `sock_backend` map: the backend the socket keeps while it is in the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockBackendValue {
    /// The backend.
    pub backend_id: u32,
    /// The service port it was chosen for (the agent deletes entries whose backend left it).
    pub service_id: u32,
}
const _: () = assert!(size_of::<SockBackendValue>() == 8);

user_pod!(SockRevKey, SockRevValue, SockBackendKey, SockBackendValue);
