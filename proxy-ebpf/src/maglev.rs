//! Maglev lookup: a new flow's backend from the table of its backend set
//! (`proxy_common::maglev`), so that every node sends the same flow to the same backend.

use proxy_common::{
    backend::BackendId,
    conntrack::CtKey,
    maglev::{TABLE_SIZE_INDEX, flow_hash, hash_bytes, slot, slot_place, slot_value},
};

use crate::maps::{MAGLEV, MAGLEV_CONFIG};

/// The hash that picks the slot: of the whole 5-tuple, or under ClientIP affinity of the
/// client's address only (every connection of a client then lands on one backend, on any node).
#[inline(always)]
pub fn hash<const N: usize>(flow: &CtKey, client: &[u8; N], affinity: bool) -> u32 {
    let seed = MAGLEV_CONFIG.get(0).map_or(0, |config| config.seed);
    if affinity { hash_bytes(client, seed) } else { flow_hash(flow, seed) }
}

/// The slot (`1..=M`) and backend id that `hash` selects in table `table`; `None` when the set
/// has no table (yet), which the caller answers with a random pick.
#[inline(always)]
pub fn pick(table: u32, hash: u32) -> Option<(u16, BackendId)> {
    // SAFETY: the inner map is only read here; the agent replaces tables whole, never in place.
    let inner = unsafe { MAGLEV.get(&table) }?;
    let size = *inner.get(TABLE_SIZE_INDEX)? as u32;
    if size == 0 {
        return None;
    }
    let slot = slot(hash, size);
    let (element, shift) = slot_place(slot);
    let id = slot_value(*inner.get(element)?, shift);
    // Table sizes are at most TABLE_SIZE_MAX < 2^16 (the agent refuses larger ones).
    Some((slot as u16, id))
}
