//! cgroup sock_addr programs: socket load balancing for every process in the attached cgroup,
//! whatever its network namespace. A connect() (TCP, connected UDP) to a frontend is rewritten
//! to the chosen backend once; an unconnected UDP socket's datagrams are rewritten at sendmsg()
//! and keep one backend per socket; replies (recvmsg) and getpeername() show the service address
//! again. The packets themselves need no translation.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{
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
    maps::{CONFIG, SOCK_BACKEND, SOCK_REV},
    trace,
};

/// Allow the operation (with whatever the program rewrote).
const ALLOW: i32 = 1;
/// Deny the operation; with `bpf_set_retval` the caller sees that errno instead of EPERM.
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx);
    ALLOW
}

/// The destination of a sock_addr context: (address, host-order port, protocol).
#[inline(always)]
fn destination(sa: &bpf_sock_addr) -> ([u8; 4], u16, u8) {
    // user_port holds the port in network order in its low 16 bits.
    (sa.user_ip4.to_ne_bytes(), u16::from_be(sa.user_port as u16), sa.protocol as u8)
}

/// Rewrites the destination if it is a service frontend and remembers the frontend for
/// replies; refuses it if the frontend has no usable endpoint. `sticky`: an unconnected UDP
/// socket keeps the backend it got first while that backend still exists.
#[inline(always)]
fn translate(ctx: &SockAddrContext, sticky: bool) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (address, port, proto) = destination(sa);
    // SAFETY: a plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let sticky_key = SockBackendKey { cookie, address, port, proto, _pad: 0 };
    if sticky
        && proto == UDP
        && let Some(backend) = kept_backend(&sticky_key)
    {
        rewrite(sa, cookie, &backend, address, port);
        return ALLOW;
    }
    // SAFETY: as above.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // 127.0.0.1:<nodePort> is the node's, not a pod's own loopback.
    if address[0] == 127 && !in_host_netns(netns_cookie) {
        return ALLOW;
    }
    let client = AffinityKey { netns_cookie, ..AffinityKey::default() };
    match lb::select(address, port, proto, client, Origin::Node) {
        Verdict::NotAService => ALLOW,
        Verdict::NoBackend(_) => {
            let reason = if sticky { drop::SENDMSG_REFUSED } else { drop::CONNECT_REFUSED };
            drops::count(reason);
            if trace::on() {
                let mut event = trace::dropped(PATH_SOCKET, proto, address, port, reason);
                event.netns_cookie = netns_cookie;
                trace::emit(event);
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
            rewrite(sa, cookie, &selected.backend, address, port);
            if trace::on() {
                let mut event = trace::translated(PATH_SOCKET, proto, address, port, &selected);
                event.netns_cookie = netns_cookie;
                trace::emit(event);
            }
            ALLOW
        }
    }
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

#[inline(always)]
fn rewrite(sa: &mut bpf_sock_addr, cookie: u64, backend: &Backend, address: [u8; 4], port: u16) {
    let key = SockRevKey { cookie, address: backend.address, port: backend.port, _pad: [0; 2] };
    let value = SockRevValue { address, port, _pad: [0; 2] };
    // Without it replies show the backend's address: worse, not broken.
    let _ = SOCK_REV.insert(key, value, 0);
    sa.user_ip4 = u32::from_ne_bytes(backend.address);
    sa.user_port = u32::from(backend.port.to_be());
}

/// recvmsg/getpeername: a backend's address becomes the frontend this socket addressed.
#[inline(always)]
fn restore_frontend(ctx: &SockAddrContext) {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (address, port, _) = destination(sa);
    // SAFETY: a plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey { cookie, address, port, _pad: [0; 2] };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { SOCK_REV.get(key).copied() } {
        sa.user_ip4 = u32::from_ne_bytes(frontend.address);
        sa.user_port = u32::from(frontend.port.to_be());
    }
}
