//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), the part both sides share: the table
//! sizes, the layout of a table, the `maglev_config` value and the flow hash.
//!
//! A table is an inner `u64` array of the `maglev` map-in-map, keyed by the id of the backend
//! set it serves (`affinity::affinity_service_id`): element [`TABLE_SIZE_INDEX`] holds the table
//! size `M`, the elements after it the backend ids of slots `1..=M`, two to an element
//! ([`slot_place`]): the kernel rounds array elements up to 8 bytes, so one `u32` an element
//! would cost twice the memory. A new flow to a frontend whose master has `SVC_F_MAGLEV` takes
//! the backend in slot `1 + hash % M`. The agent builds a whole new array and
//! swaps it into the outer map with one update, so a lookup sees the old table or the new one,
//! never a mix; carrying its own size makes every table readable whatever `--maglev-table-size`
//! the agent that wrote it had.

use crate::{addr::Addr, conntrack::CtKey, user_pod};

/// Default table size `M` (`--maglev-table-size`), Cilium's: a prime, and above 100 times the
/// backends of most services, where Maglev's imbalance stays near 1 %.
pub const TABLE_SIZE_DEFAULT: u32 = 16_381;
/// Smallest table size accepted (a prime).
pub const TABLE_SIZE_MIN: u32 = 251;
/// Largest table size accepted: the largest prime below 2^16, so a slot number fits the trace
/// event's and `explain`'s 16-bit slot field. 65 521 slots serve 655 backends at ~1 % imbalance.
pub const TABLE_SIZE_MAX: u32 = 65_521;

/// Element of a table holding its size; the slots follow it.
pub const TABLE_SIZE_INDEX: u32 = 0;

/// Elements of the inner array holding a table of `table_size` slots: the size, then two
/// slots an element.
pub const fn inner_entries(table_size: u32) -> u32 {
    1 + table_size.div_ceil(2)
}

/// Where slot `slot` (`1..=M`) is: its element, and the shift of its half (0: the low 32 bits,
/// 32: the high ones).
#[inline(always)]
pub const fn slot_place(slot: u32) -> (u32, u32) {
    let i = slot.saturating_sub(1);
    (1 + i / 2, (i % 2) * 32)
}

/// The backend id in the half of `element` at `shift` ([`slot_place`]).
#[inline(always)]
pub const fn slot_value(element: u64, shift: u32) -> u32 {
    (element >> shift) as u32
}

/// The elements of the table whose slots are `slots` (slot `i + 1` is `slots[i]`): its size,
/// then the slots two to an element.
pub fn elements(slots: &[u32]) -> impl Iterator<Item = u64> + '_ {
    let pairs = slots.chunks(2).map(|pair| u64::from(pair[0]) | u64::from(pair.get(1).copied().unwrap_or(0)) << 32);
    core::iter::once(slots.len() as u64).chain(pairs)
}

/// Value of the `maglev_config` array at index 0, written by the agent from
/// `--maglev-hash-seed` before any table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MaglevConfig {
    /// Seed of the flow hash ([`flow_hash`]), derived from the seed string, so that every node
    /// of a cluster (same flag) hashes a flow alike.
    pub seed: u32,
}
const _: () = assert!(size_of::<MaglevConfig>() == 4);

user_pod!(MaglevConfig);

/// FNV-1a over `bytes`, then murmur3's finaliser so that the low bits (`% M`) depend on every
/// input bit. Over a fixed-size array so the BPF loop has a constant bound (the compiler
/// unrolls it), and generic so a wider address changes only the type.
#[inline(always)]
pub fn hash_bytes<const N: usize>(bytes: &[u8; N], seed: u32) -> u32 {
    fmix32(fnv(seed ^ FNV_OFFSET, bytes))
}

/// FNV-1a's offset basis, mixed with the seed.
const FNV_OFFSET: u32 = 0x811c_9dc5;

/// FNV-1a's steps over `bytes`, from `hash`: hashing two arrays one after the other is hashing
/// their concatenation.
#[inline(always)]
fn fnv<const N: usize>(mut hash: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i < N {
        hash ^= bytes[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

/// murmur3's 32-bit finaliser.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The hash of a flow's 5-tuple: the bytes of its original-direction conntrack key (client,
/// frontend, ports, protocol, zeroed padding). Ports are stored in host order, so nodes of one
/// cluster must share the byte order (every Kubernetes architecture is little-endian).
#[inline(always)]
pub fn flow_hash(key: &CtKey, seed: u32) -> u32 {
    tuple_hash(&key.src, &key.dst, [key.sport, key.dport], key.proto, seed)
}

/// [`flow_hash`] from the tuple's fields, hashed in place: exactly the bytes of the [`CtKey`]
/// they make, in its field order, with its three padding bytes as zeros. The TC program hashes
/// its parsed packet so, because a 40-byte key built for the hash would not fit its stack.
#[inline(always)]
pub fn tuple_hash(src: &Addr, dst: &Addr, ports: [u16; 2], proto: u8, seed: u32) -> u32 {
    let hash = fnv(fnv(seed ^ FNV_OFFSET, src), dst);
    let [s0, s1] = ports[0].to_ne_bytes();
    let [d0, d1] = ports[1].to_ne_bytes();
    fmix32(fnv(hash, &[s0, s1, d0, d1, proto, 0, 0, 0]))
}

/// A new flow whose 5-tuple the Maglev hash reads ([`flow_hash`]): a conntrack key, or a
/// parsed packet that is never copied into one.
pub trait Tuple {
    /// [`flow_hash`] of the tuple.
    fn tuple_hash(&self, seed: u32) -> u32;
    /// The client's address (the source): what ClientIP affinity hashes instead.
    fn client(&self) -> &Addr;
}

impl Tuple for CtKey {
    #[inline(always)]
    fn tuple_hash(&self, seed: u32) -> u32 {
        flow_hash(self, seed)
    }

    #[inline(always)]
    fn client(&self) -> &Addr {
        &self.src
    }
}

/// The slot (`1..=table_size`) a hash selects.
#[inline(always)]
pub const fn slot(hash: u32, table_size: u32) -> u32 {
    hash % table_size + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::from_v4;

    #[test]
    fn the_flow_hash_covers_every_field_of_the_tuple() {
        let key = CtKey {
            src: from_v4([172, 18, 0, 100]),
            dst: from_v4([172, 18, 0, 50]),
            sport: 40000,
            dport: 80,
            proto: 6,
            _pad: [0; 3],
        };
        let base = flow_hash(&key, 7);
        assert_eq!(base, flow_hash(&key, 7), "deterministic");
        let others = [
            CtKey { src: from_v4([172, 18, 0, 101]), ..key },
            CtKey { dst: from_v4([172, 18, 0, 51]), ..key },
            CtKey { sport: 40001, ..key },
            CtKey { dport: 81, ..key },
            CtKey { proto: 17, ..key },
        ];
        for other in others {
            assert_ne!(flow_hash(&other, 7), base, "{other:?}");
        }
        assert_ne!(flow_hash(&key, 8), base, "the seed counts");
    }

    #[test]
    fn the_flow_hash_is_the_hash_of_the_conntrack_keys_bytes() {
        let key = CtKey {
            src: from_v4([172, 18, 0, 100]),
            dst: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50],
            sport: 40000,
            dport: 443,
            proto: 17,
            _pad: [0; 3],
        };
        // SAFETY: `CtKey` is `#[repr(C)]` with integer fields and explicit padding: all of its
        // bytes are initialised.
        let bytes: &[u8; size_of::<CtKey>()] = unsafe { &*(&key as *const CtKey).cast() };
        assert_eq!(flow_hash(&key, 9), hash_bytes(bytes, 9), "hashing in place hashes the key's bytes");
    }

    #[test]
    fn slots_pack_two_to_an_element_after_the_size() {
        let slots = [11, 12, 13, 14, 15];
        let packed: [u64; 4] = [5, 11 | 12 << 32, 13 | 14 << 32, 15];
        assert!(elements(&slots).eq(packed));
        assert_eq!(inner_entries(5), 4);
        for (i, &id) in slots.iter().enumerate() {
            let (element, shift) = slot_place(i as u32 + 1);
            assert_eq!(slot_value(packed[element as usize], shift), id, "slot {}", i + 1);
        }
        assert_eq!(inner_entries(TABLE_SIZE_DEFAULT), 8192, "64 KiB at the default size");
    }

    #[test]
    fn a_slot_is_never_the_size_index_and_never_past_the_table() {
        for hash in [0, 1, 250, 251, u32::MAX] {
            let slot = slot(hash, TABLE_SIZE_MIN);
            assert!((1..=TABLE_SIZE_MIN).contains(&slot), "{hash} -> {slot}");
        }
        const { assert!(TABLE_SIZE_MAX < 1 << 16) };
    }
}
