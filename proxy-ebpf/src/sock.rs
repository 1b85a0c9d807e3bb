//! cgroup sock_addr programs: socket load balancing for every process in the attached cgroup,
//! whatever its network namespace. A connect() (TCP, connected UDP) to a frontend is rewritten
//! to the chosen backend once; an unconnected UDP socket's datagrams are rewritten at sendmsg()
//! and keep one backend per socket; replies (recvmsg) and getpeername() show the service address
//! again. The packets themselves need no translation.
//!
//! Under `--bpf-lb-sock-hostns-only` (for service meshes) only sockets of the host network
//! namespace are translated: a pod's traffic leaves it with the service address, where the
//! pod's sidecar can see it, and TC translates it on the node (`crate::tc`).
//!
//! The IPv6 hooks share everything with the IPv4 ones: the maps hold IPv4 as IPv4-mapped IPv6
//! (`proxy_common::addr`), so an `AF_INET6` socket addressing `::ffff:10.96.0.10` finds the IPv4
//! ClusterIP's entry and is sent to `::ffff:` + the backend's IPv4 address, and its replies and
//! `getpeername` show `::ffff:10.96.0.10` again.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{
    addr::{self, Addr},
    affinity::AffinityKey,
    backend::Backend,
    drop,
    proto::UDP,
    sock::{SockBackendKey, SockBackendValue, SockRevKey, SockRevValue},
    trace::PATH_SOCKET,
};

use crate::{
    drops,
    lb::{self, Origin, Verdict},
    maps::{CONFIG, SOCK_BACKEND, SOCK_HOSTNS_ONLY, SOCK_REV},
    trace,
};

/// Allow the operation (with whatever the program rewrote).
const ALLOW: i32 = 1;
/// Deny the operation; with `bpf_set_retval` the caller sees that errno instead of EPERM.
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V4, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V4, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V6, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V6, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx, Family::V6);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx, Family::V6);
    ALLOW
}

/// The address family of the hook: which field of the context holds the address.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    /// `user_ip4`.
    V4,
    /// `user_ip6`, whose IPv4-mapped addresses reach IPv4 frontends.
    V6,
}

/// The destination of a sock_addr context: (address, host-order port, protocol).
#[inline(always)]
fn destination(sa: &bpf_sock_addr, family: Family) -> (Addr, u16, u8) {
    let address = match family {
        Family::V4 => addr::from_v4(sa.user_ip4.to_ne_bytes()),
        Family::V6 => {
            let mut address = addr::UNSPECIFIED;
            for (i, word) in sa.user_ip6.iter().enumerate() {
                address[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            address
        }
    };
    // user_port holds the port in network order in its low 16 bits.
    (address, u16::from_be(sa.user_port as u16), sa.protocol as u8)
}

/// Sets the destination of a sock_addr context. An IPv4 hook is only ever given IPv4
/// addresses: its frontends are IPv4 and a family's frontends use that family's endpoints.
#[inline(always)]
fn set_destination(sa: &mut bpf_sock_addr, family: Family, address: &Addr, port: u16) {
    match family {
        Family::V4 => sa.user_ip4 = u32::from_ne_bytes([address[12], address[13], address[14], address[15]]),
        Family::V6 => {
            for (i, word) in sa.user_ip6.iter_mut().enumerate() {
                *word =
                    u32::from_ne_bytes([address[i * 4], address[i * 4 + 1], address[i * 4 + 2], address[i * 4 + 3]]);
            }
        }
    }
    sa.user_port = u32::from(port.to_be());
}

/// Rewrites the destination if it is a service frontend and remembers the frontend for
/// replies; refuses it if the frontend has no usable endpoint. `sticky`: an unconnected UDP
/// socket keeps the backend it got first while that backend still exists.
#[inline(always)]
fn translate(ctx: &SockAddrContext, family: Family, sticky: bool) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (address, port, proto) = destination(sa, family);
    // SAFETY: a plain helper call on the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if host_netns_only() && !in_host_netns(netns_cookie) {
        // A pod's socket: its traffic is translated per packet on the node (TC).
        return ALLOW;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let sticky_key = SockBackendKey { cookie, address, port, proto, _pad: [0; 5] };
    if sticky && proto == UDP && reuse_kept_backend(ctx, family, &sticky_key) {
        return ALLOW;
    }
    // 127.0.0.1:<nodePort> is the node's, not a pod's own loopback.
    if addr::to_v4(&address).is_some_and(|v4| v4[0] == 127) && !in_host_netns(netns_cookie) {
        return ALLOW;
    }
    let client = AffinityKey { netns_cookie, ..AffinityKey::default() };
    match lb::select(address, port, proto, client, Origin::Node) {
        Verdict::NotAService => ALLOW,
        Verdict::NoBackend(_) => {
            let reason = if sticky { drop::SENDMSG_REFUSED } else { drop::CONNECT_REFUSED };
            drops::count(reason);
            if trace::on() {
                trace::emit(|event| {
                    trace::dropped(event, (PATH_SOCKET, proto), &address, port, reason);
                    event.netns_cookie = netns_cookie;
                });
            }
            // SAFETY: plain helper call, allowed from cgroup sock_addr programs.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            DENY
        }
        Verdict::Backend(selected) => {
            if sticky && proto == UDP {
                let value = SockBackendValue { backend_id: selected.id, service_id: selected.service_id };
                // Losing it only means the socket's next datagram is picked afresh.
                let _ = SOCK_BACKEND.insert(sticky_key, value, 0);
            }
            rewrite(ctx, family, &selected.backend, &address, port);
            if trace::on() {
                trace::emit(|event| {
                    trace::translated(event, (PATH_SOCKET, proto), &address, port, &selected);
                    event.netns_cookie = netns_cookie;
                });
            }
            ALLOW
        }
    }
}

/// Whether only the host network namespace's sockets are translated (`--bpf-lb-sock-hostns-only`).
#[inline(always)]
fn host_netns_only() -> bool {
    SOCK_HOSTNS_ONLY.get(0).is_some_and(|on| *on != 0)
}

/// Whether a socket's network namespace is the node's own.
#[inline(always)]
fn in_host_netns(netns_cookie: u64) -> bool {
    CONFIG.get(0).is_some_and(|c| c.host_netns_cookie != 0 && c.host_netns_cookie == netns_cookie)
}

/// The backend an unconnected UDP socket already uses for this frontend, if it is still there
/// and the frontend still serves this node's traffic (the agent also deletes entries whose
/// backend left the service). The scope is the socket path's: a frontend with two scopes and
/// no local endpoint serves nothing from outside, yet serves the node.
#[inline(always)]
fn kept_backend(key: &SockBackendKey) -> Option<Backend> {
    // SAFETY: copied out at once.
    let kept = unsafe { SOCK_BACKEND.get(key).copied() }?;
    if !lb::serving(key.address, key.port, key.proto, Origin::Node) {
        return None;
    }
    lb::backend(kept.backend_id)
}

/// Sends an unconnected UDP socket's datagram to the backend it already uses for the frontend
/// (`key`), if [`kept_backend`] finds one. A function of its own (a BPF-to-BPF call): its stack
/// is not added to a fresh pick's.
#[inline(never)]
fn reuse_kept_backend(ctx: &SockAddrContext, family: Family, key: &SockBackendKey) -> bool {
    let Some(backend) = kept_backend(key) else { return false };
    rewrite(ctx, family, &backend, &key.address, key.port);
    true
}

/// Sends the socket to `backend` and remembers the frontend (`address`, `port`) it addressed.
/// A function of its own (a BPF-to-BPF call): its stack is not added to the pick's.
#[inline(never)]
fn rewrite(ctx: &SockAddrContext, family: Family, backend: &Backend, address: &Addr, port: u16) {
    // SAFETY: a plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = SockRevKey { cookie, address: backend.address, port: backend.port, _pad: [0; 6] };
    let value = SockRevValue { address: *address, port, _pad: [0; 2] };
    // Without it replies show the backend's address: worse, not broken.
    let _ = SOCK_REV.insert(key, value, 0);
    set_destination(sa, family, &backend.address, backend.port);
}

/// recvmsg/getpeername: a backend's address becomes the frontend this socket addressed.
#[inline(always)]
fn restore_frontend(ctx: &SockAddrContext, family: Family) {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (address, port, _) = destination(sa, family);
    // SAFETY: a plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey { cookie, address, port, _pad: [0; 6] };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { SOCK_REV.get(key).copied() } {
        set_destination(sa, family, &frontend.address, frontend.port);
    }
}
