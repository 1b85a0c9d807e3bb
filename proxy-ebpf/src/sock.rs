//! cgroup sock_addr programs: socket load balancing. A connect() to a frontend is rewritten to
//! the chosen backend once, for every process in the attached cgroup, whatever its network
//! namespace; the packets then need no translation.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::affinity::AffinityKey;

use crate::lb::{self, Origin, Verdict};

/// Allow the operation (with whatever the program rewrote).
const ALLOW: i32 = 1;
/// Deny the operation; with `bpf_set_retval` the caller sees that errno instead of EPERM.
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: plain helper call on the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    translate(sa, AffinityKey { netns_cookie, ..AffinityKey::default() })
}

/// Rewrites the destination of `sa` if it is a service frontend; refuses it if the frontend has
/// no usable endpoint.
#[inline(always)]
fn translate(sa: &mut bpf_sock_addr, client: AffinityKey) -> i32 {
    let address = sa.user_ip4.to_ne_bytes();
    // user_port holds the port in network order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let proto = sa.protocol as u8;
    match lb::select(address, port, proto, client, Origin::Node) {
        Verdict::NotAService => ALLOW,
        Verdict::NoBackend(_) => {
            // SAFETY: plain helper call, allowed from cgroup sock_addr programs.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            DENY
        }
        Verdict::Backend(selected) => {
            sa.user_ip4 = u32::from_ne_bytes(selected.backend.address);
            sa.user_port = u32::from(selected.backend.port.to_be());
            ALLOW
        }
    }
}
