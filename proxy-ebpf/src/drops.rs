//! Counting drops: every place a program discards a packet, or refuses a socket call, counts it
//! here under a `proxy_common::drop` reason (Cilium's `update_metrics`), so nothing the
//! datapath throws away goes unseen.

use aya_ebpf::bindings::TC_ACT_SHOT;

use crate::maps::DROPS;

/// Adds one to this CPU's counter of `reason`.
#[inline(always)]
pub fn count(reason: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        // SAFETY: the pointer comes from a successful lookup of this CPU's own slot, a plain
        // `u64` no other CPU writes (a program preempted on its CPU may lose one count).
        unsafe { *counter += 1 };
    }
}

/// Counts `reason` and returns the TC verdict that drops the packet.
#[inline(always)]
pub fn shot(reason: u32) -> i32 {
    count(reason);
    TC_ACT_SHOT
}
