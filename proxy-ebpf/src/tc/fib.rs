//! Sending a translated packet on: a FIB lookup and `bpf_redirect_neigh`, which also keeps the
//! kernel from dropping a reply whose new source is a local address as martian.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNREACHABLE, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibLookup,
    },
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::{
    addr::{self, Addr},
    drop,
};

use crate::drops;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The FIB's answer for a packet: the `BPF_FIB_LKUP_RET_*` code (negative: an error) and the
/// interface to send it out of.
pub struct Route {
    /// `BPF_FIB_LKUP_RET_*`, or a negative errno as `u32`.
    pub rc: u32,
    /// The interface of the route.
    pub ifindex: u32,
}

/// Sends a translated packet out of the interface the routing table picks for it.
pub fn forward(ctx: &TcContext, src: &Addr, dst: &Addr) -> i32 {
    deliver(route(ctx, src, dst))
}

/// The FIB's answer for a packet from `src` to `dst` that arrived on this packet's interface.
/// Written to use little stack: it is called from the deepest frames of the TC program.
pub fn route(ctx: &TcContext, src: &Addr, dst: &Addr) -> Route {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut params: FibLookup = unsafe { core::mem::zeroed() };
    if addr::is_v4(src) && addr::is_v4(dst) {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[12], src[13], src[14], src[15]]);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[12], dst[13], dst[14], dst[15]]);
    } else {
        params.family = AF_INET6;
        // SAFETY: 16 bytes as four words, in the same (network) order the helper reads them.
        unsafe {
            params.__bindgen_anon_3.ipv6_src = core::mem::transmute::<Addr, [u32; 4]>(*src);
            params.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<Addr, [u32; 4]>(*dst);
        }
    }
    // SAFETY: the context pointer is the program's own skb.
    params.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let size = size_of::<FibLookup>() as i32;
    // SAFETY: params is a valid bpf_fib_lookup of `size` bytes.
    let rc = unsafe { bpf_fib_lookup(ctx.skb.skb.cast(), &mut params, size, 0) } as u32;
    Route { rc, ifindex: params.ifindex }
}

/// Whether the route is one the packet cannot take (or the lookup failed): the stack, which
/// then gets the packet, discards it or answers with an ICMP error.
fn fails(rc: u32) -> bool {
    (rc as i32) < 0
        || rc == BPF_FIB_LKUP_RET_BLACKHOLE
        || rc == BPF_FIB_LKUP_RET_UNREACHABLE
        || rc == BPF_FIB_LKUP_RET_PROHIBIT
}

/// Redirects to the route's interface, resolving the next hop; with no route to forward on (a
/// local destination among them), lets the stack decide.
pub fn deliver(route: Route) -> i32 {
    if route.rc != BPF_FIB_LKUP_RET_SUCCESS && route.rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        if fails(route.rc) {
            drops::count(drop::FIB_FAILED);
        }
        return TC_ACT_OK;
    }
    // SAFETY: a null neighbour means "resolve the next hop from the FIB".
    let verdict = unsafe { bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    if verdict == TC_ACT_SHOT {
        drops::count(drop::REDIRECT_FAILED);
    }
    verdict
}
