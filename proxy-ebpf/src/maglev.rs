//! Maglev lookup: a new flow's backend from the table of its backend set
//! (`proxy_common::maglev`), so that every node sends the same flow to the same backend.

use proxy_common::{
    backend::BackendId,
    maglev::{TABLE_SIZE_INDEX, Tuple, hash_bytes, slot, slot_place, slot_value},
};

use crate::maps::{MAGLEV, MAGLEV_CONFIG};

/// The slot (`1..=M`) and backend id that the flow's hash selects in table `table`: the hash
/// of its whole 5-tuple, or under ClientIP affinity of its client's address only (every
/// connection of a client then lands on one backend, on any node). `None` when the set has no
/// table (yet), which the caller answers with a random pick.
#[inline(always)]
pub fn pick<F: Tuple>(table: u32, flow: &F, affinity: bool) -> Option<(u16, BackendId)> {
    let packed = lookup(table, flow, affinity);
    (packed != 0).then_some(((packed >> 32) as u16, packed as BackendId))
}

/// [`pick`]'s work, as a call of its own (BPF-to-BPF): the TC program's lookup (`tc::choose`)
/// sits at the 512-byte stack limit, so this takes everything by reference and returns slot
/// and id packed in one register (`slot << 32 | id`; 0, as slots start at 1: no table) rather
/// than through a slot of the caller's frame, and needs 16 bytes of stack of its own.
#[inline(never)]
fn lookup<F: Tuple>(table: u32, flow: &F, affinity: bool) -> u64 {
    let seed = MAGLEV_CONFIG.get(0).map_or(0, |config| config.seed);
    let hash = if affinity { hash_bytes(flow.client(), seed) } else { flow.tuple_hash(seed) };
    // SAFETY: the inner map is only read here; the agent replaces tables whole, never in place.
    let Some(inner) = (unsafe { MAGLEV.get(&table) }) else { return 0 };
    let size = inner.get(TABLE_SIZE_INDEX).map_or(0, |&size| size as u32);
    if size == 0 {
        return 0;
    }
    let slot = slot(hash, size);
    let (element, shift) = slot_place(slot);
    // Table sizes are at most TABLE_SIZE_MAX < 2^16 (the agent refuses larger ones).
    inner.get(element).map_or(0, |&e| u64::from(slot) << 32 | u64::from(slot_value(e, shift)))
}
