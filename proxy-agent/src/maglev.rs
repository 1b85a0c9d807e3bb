//! Maglev tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, section 3.4), built here and read by the TC program
//! (`proxy_common::maglev` has the layout and the flow hash both sides share).
//!
//! Each backend has a permutation of the `M` slots, `offset + j·skip mod M`, with offset and
//! skip from two hashes of its *name* (address and port) and the seed; backends take turns
//! claiming their next free slot until every slot is taken. Two nodes with the same backend
//! set, table size and seed therefore build the same table, whatever ids their backends have
//! locally, and removing one of N backends moves little more than its own 1/N of the slots.
//!
//! Pure: no I/O. The writer (`datapath::writer`) turns a table into map writes.

use std::collections::BTreeMap;

use proxy_common::{
    addr::Addr,
    maglev::{TABLE_SIZE_DEFAULT, TABLE_SIZE_MAX, TABLE_SIZE_MIN, fmix32},
};

/// The default `--maglev-hash-seed`. Any string works; every node of a cluster must use the
/// same one, or their tables (and flow hashes) differ.
pub const DEFAULT_SEED: &str = "proxy.kube-ebpf.io/maglev-v1";

/// The per-Service annotation that chooses the algorithm for one service, overriding
/// `--lb-algorithm`: `random` or `maglev`.
pub const LB_ALGORITHM_ANNOTATION: &str = "proxy.kube-ebpf.io/lb-algorithm";

/// How traffic from outside picks a backend (`--lb-algorithm`, or the annotation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum LbAlgorithm {
    /// Uniformly at random on each node (kube-proxy's behaviour).
    #[default]
    Random,
    /// The Maglev table entry for the flow's hash: the same backend whichever node the flow
    /// reaches.
    Maglev,
}

impl LbAlgorithm {
    /// The annotation's (and flag's) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LbAlgorithm::Random => "random",
            LbAlgorithm::Maglev => "maglev",
        }
    }

    /// Parses the annotation's value; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "random" => Some(LbAlgorithm::Random),
            "maglev" => Some(LbAlgorithm::Maglev),
            _ => None,
        }
    }
}

/// The Maglev settings every node of a cluster must share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevSettings {
    /// Slots per table (`--maglev-table-size`), a prime.
    pub table_size: u32,
    /// `--maglev-hash-seed`.
    pub seed: String,
}

impl Default for MaglevSettings {
    fn default() -> Self {
        Self { table_size: TABLE_SIZE_DEFAULT, seed: DEFAULT_SEED.to_owned() }
    }
}

impl MaglevSettings {
    /// The seed of the datapath's flow hash (`MaglevConfig::seed`), derived from the string.
    pub fn flow_seed(&self) -> u32 {
        fmix32(hash64(&self.seed, 0, &[]) as u32)
    }

    /// Kernel memory of one table: 8-byte elements holding the size and two slots each, plus
    /// the map's bookkeeping (`bpftool map show` reports 65 848 bytes at the default size).
    pub fn table_bytes(&self) -> u64 {
        8 * u64::from(proxy_common::maglev::inner_entries(self.table_size)) + 312
    }
}

/// A refused `--maglev-table-size`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableSizeError {
    /// Not a number.
    #[error("--maglev-table-size {0}: not a number; give a prime in [{TABLE_SIZE_MIN}, {TABLE_SIZE_MAX}], e.g. 16381")]
    NotANumber(String),
    /// Outside the accepted range.
    #[error("--maglev-table-size {0}: out of range; give a prime in [{TABLE_SIZE_MIN}, {TABLE_SIZE_MAX}], e.g. 16381")]
    OutOfRange(u64),
    /// Not a prime: the permutations would not cover every slot.
    #[error(
        "--maglev-table-size {0}: not a prime (Maglev's permutations cover every slot only for a prime size); \
         the nearest primes are {1} and {2}"
    )]
    NotPrime(u32, u32, u32),
}

/// Parses `--maglev-table-size`: a prime in [`TABLE_SIZE_MIN`, `TABLE_SIZE_MAX`].
pub fn parse_table_size(text: &str) -> Result<u32, TableSizeError> {
    let n: u64 = text.trim().parse().map_err(|_| TableSizeError::NotANumber(text.to_owned()))?;
    if !(u64::from(TABLE_SIZE_MIN)..=u64::from(TABLE_SIZE_MAX)).contains(&n) {
        return Err(TableSizeError::OutOfRange(n));
    }
    let n = n as u32;
    if !is_prime(n) {
        let below = (TABLE_SIZE_MIN..n).rev().find(|&p| is_prime(p)).unwrap_or(TABLE_SIZE_MIN);
        let above = (n..=TABLE_SIZE_MAX).find(|&p| is_prime(p)).unwrap_or(TABLE_SIZE_MAX);
        return Err(TableSizeError::NotPrime(n, below, above));
    }
    Ok(n)
}

/// Trial division: table sizes are below 2^16.
pub fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// A backend's name for the permutation: the 16 bytes of its address in map form
/// ([`proxy_common::addr`]: IPv4 as IPv4-mapped IPv6), then its port in network order. The map
/// form, not the address's text: it has one spelling per address, so every node of either
/// family builds the same table from the same backends.
pub fn backend_name(address: Addr, port: u16) -> Vec<u8> {
    let mut name = address.to_vec();
    name.extend_from_slice(&port.to_be_bytes());
    name
}

/// FNV-1a (64 bits) over the seed, a tag byte and `name`, then murmur3's 64-bit finaliser.
fn hash64(seed: &str, tag: u8, name: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.bytes().chain([0, tag]).chain(name.iter().copied()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The Maglev table of `backends` (each a value to store and its [`backend_name`]) with
/// `table_size` slots: entry `i` is the backend of slot `i + 1`. Backends are ordered by name
/// (and duplicates by name dropped) first, so the input order does not matter. Empty when there
/// is no backend.
pub fn build<T: Copy>(backends: &[(T, Vec<u8>)], table_size: u32, seed: &str) -> Vec<T> {
    let by_name: BTreeMap<&[u8], T> = backends.iter().map(|(value, name)| (name.as_slice(), *value)).collect();
    if by_name.is_empty() || table_size == 0 {
        return Vec::new();
    }
    let m = u64::from(table_size);
    // (offset, skip, next j) per backend: the permutation is offset + j·skip mod M.
    let mut turns: Vec<(u64, u64, u64, T)> = by_name
        .iter()
        .map(|(name, value)| {
            let offset = hash64(seed, 1, name) % m;
            let skip = if m > 1 { hash64(seed, 2, name) % (m - 1) + 1 } else { 1 };
            (offset, skip, 0, *value)
        })
        .collect();
    let mut table: Vec<Option<T>> = vec![None; table_size as usize];
    let mut filled = 0;
    'fill: loop {
        for (offset, skip, next, value) in &mut turns {
            // With M prime every skip is coprime to M: the permutation visits every slot, so
            // a free one is always found.
            let mut slot = (*offset + *next * *skip) % m;
            while table[slot as usize].is_some() {
                *next += 1;
                slot = (*offset + *next * *skip) % m;
            }
            table[slot as usize] = Some(*value);
            *next += 1;
            filled += 1;
            if filled == table.len() {
                break 'fill;
            }
        }
    }
    table.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proxy_common::addr::from_v4;

    use super::*;

    /// `n` backends named like pods of 10.244.0.0/16 on port 8080, valued by index.
    fn backends(n: usize) -> Vec<(usize, Vec<u8>)> {
        (0..n).map(|i| (i, backend_name(from_v4([10, 244, (i / 250) as u8, (i % 250 + 1) as u8]), 8080))).collect()
    }

    fn counts(table: &[usize]) -> HashMap<usize, usize> {
        let mut counts = HashMap::new();
        for &b in table {
            *counts.entry(b).or_default() += 1;
        }
        counts
    }

    #[test]
    fn the_same_backends_size_and_seed_give_the_same_table_in_any_order() {
        let set = backends(7);
        let mut reversed = set.clone();
        reversed.reverse();
        let a = build(&set, 251, DEFAULT_SEED);
        assert_eq!(a, build(&reversed, 251, DEFAULT_SEED));
        assert_eq!(a.len(), 251);
        assert_ne!(a, build(&set, 251, "another seed"), "the seed changes the permutations");
    }

    /// Backends take turns, one slot a turn: each ends with ⌊M/N⌋ or ⌈M/N⌉ slots.
    #[test]
    fn every_backend_gets_its_share_of_the_slots_within_one() {
        for n in [1, 2, 3, 10, 100] {
            let m = TABLE_SIZE_DEFAULT as usize;
            let counts = counts(&build(&backends(n), TABLE_SIZE_DEFAULT, DEFAULT_SEED));
            assert_eq!(counts.len(), n, "every backend has slots");
            for (&b, &c) in &counts {
                assert!(c == m / n || c == m.div_ceil(n), "n={n}: backend {b} has {c} slots");
            }
        }
    }

    /// The removed backend's slots must move (1/N). Maglev trades strict minimal disruption for
    /// balance (paper, section 3.4): turns shift, so some other slots move too, fewer the larger
    /// M/N. At M/N ≥ 100 it stays within a small multiple of the ideal; we allow three times
    /// it (consistent hashing's bound is that order, a rehash would move (N-1)/N).
    #[test]
    fn removing_one_of_n_backends_moves_close_to_one_nth_of_the_slots() {
        for n in [10, 100] {
            let all = backends(n);
            let before = build(&all, TABLE_SIZE_DEFAULT, DEFAULT_SEED);
            let after = build(&all[1..], TABLE_SIZE_DEFAULT, DEFAULT_SEED);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / before.len() as f64;
            let share = 1.0 / n as f64;
            assert!(moved >= share * 0.99 && moved <= share * 3.0, "n={n}: {moved:.4} of the slots moved");
            assert!(!after.contains(&0), "the removed backend has no slot left");
        }
    }

    #[test]
    fn duplicate_names_share_one_backend_and_no_backend_gives_no_table() {
        let set = vec![(1, backend_name(from_v4([10, 0, 0, 1]), 80)), (2, backend_name(from_v4([10, 0, 0, 1]), 80))];
        assert_eq!(counts(&build(&set, 251, DEFAULT_SEED)).len(), 1);
        assert!(build::<usize>(&[], 251, DEFAULT_SEED).is_empty());
    }

    #[test]
    fn the_table_size_is_a_prime_in_range_or_refused_naming_the_flag() {
        assert_eq!(parse_table_size("16381"), Ok(16_381));
        assert_eq!(parse_table_size("251"), Ok(251));
        assert_eq!(parse_table_size("65521"), Ok(65_521));
        assert_eq!(parse_table_size("16383"), Err(TableSizeError::NotPrime(16_383, 16_381, 16_411)));
        assert_eq!(parse_table_size("250"), Err(TableSizeError::OutOfRange(250)));
        assert_eq!(parse_table_size("131071"), Err(TableSizeError::OutOfRange(131_071)));
        assert!(matches!(parse_table_size("big"), Err(TableSizeError::NotANumber(_))));
        let text = parse_table_size("16383").unwrap_err().to_string();
        assert!(text.contains("--maglev-table-size 16383") && text.contains("16381"), "{text}");
        let text = parse_table_size("7").unwrap_err().to_string();
        assert!(text.contains("[251, 65521]"), "{text}");
    }

    #[test]
    fn primes_are_told_from_composites() {
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(!is_prime(65_535) && is_prime(65_521) && is_prime(TABLE_SIZE_DEFAULT));
    }

    #[test]
    fn the_flow_seed_follows_the_seed_string() {
        let a = MaglevSettings::default();
        let b = MaglevSettings { seed: "other".into(), ..MaglevSettings::default() };
        assert_eq!(a.flow_seed(), MaglevSettings::default().flow_seed());
        assert_ne!(a.flow_seed(), b.flow_seed());
    }

    /// As `bpftool map show` reported for tables of these sizes on this project's kernel.
    #[test]
    fn the_table_memory_matches_what_the_kernel_reports() {
        let bytes = |table_size| MaglevSettings { table_size, ..MaglevSettings::default() }.table_bytes();
        assert_eq!((bytes(16_381), bytes(1021)), (65_848, 4408));
    }

    #[test]
    fn the_annotation_value_names_an_algorithm() {
        assert_eq!(LbAlgorithm::parse("maglev"), Some(LbAlgorithm::Maglev));
        assert_eq!(LbAlgorithm::parse(" random "), Some(LbAlgorithm::Random));
        assert_eq!(LbAlgorithm::parse("Maglev"), None);
    }
}
