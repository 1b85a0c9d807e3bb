//! Direct server return (`--lb-mode dsr|hybrid`): the node that receives a flow from outside
//! DNATs it to a backend on another node without SNAT, and carries the frontend (address and
//! port) to that node in an IPv4 option, as Cilium's "opt" mode does. The backend's node
//! records it in the `dsr` LRU, keyed by the flow's reply tuple, and rewrites the backend's
//! replies to come from the frontend, sent straight to the client.
//!
//! The option is 8 bytes, put right behind the fixed IPv4 header:
//!
//! ```text
//! | type 0x9a | length 8 | frontend port (network order) | frontend address (4 bytes) |
//! ```
//!
//! Type 0x9a is the "copied" bit and number 26, unassigned (the one Cilium uses, so a capture
//! reads the same); a receiving stack ignores an option it does not know.

use crate::{addr::Addr, user_pod};

/// The option's type byte.
pub const OPT_TYPE: u8 = 0x9a;
/// The option's length, type and length bytes included.
pub const OPT_LEN: u8 = 8;
/// The option's first word (type, length, port 0) in host order: the port is or'ed in.
pub const OPT_WORD: u32 = (OPT_TYPE as u32) << 24 | (OPT_LEN as u32) << 16;

/// Value of the `dsr` map (key: the flow's reply tuple, backend → client, a
/// [`crate::conntrack::CtKey`]): the frontend the client addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DsrValue {
    /// The frontend's address ([`crate::addr`]).
    pub address: Addr,
    /// The frontend's port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<DsrValue>() == 24);

/// The option's two words (network order, as they sit in the packet) for a frontend at IPv4
/// address `v4` (network order bytes) and `port`.
pub const fn option_words(v4: [u8; 4], port: u16) -> [u32; 2] {
    [(OPT_WORD | port as u32).to_be(), u32::from_ne_bytes(v4)]
}

/// The frontend (IPv4 address in network order bytes, port) an option's words carry, if they
/// are ours.
pub const fn parse_option(words: [u32; 2]) -> Option<([u8; 4], u16)> {
    let head = u32::from_be(words[0]);
    if head & 0xffff_0000 != OPT_WORD {
        return None;
    }
    Some((words[1].to_ne_bytes(), head as u16))
}

user_pod!(DsrValue);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_option_carries_the_frontend_and_reads_back() {
        let words = option_words([172, 18, 0, 2], 30_066);
        let bytes = (words[0].to_ne_bytes(), words[1].to_ne_bytes());
        assert_eq!(bytes, ([0x9a, 8, 0x75, 0x72], [172, 18, 0, 2]), "as it sits in the packet");
        assert_eq!(parse_option(words), Some(([172, 18, 0, 2], 30_066)));
    }

    #[test]
    fn another_option_is_not_ours() {
        let mut words = option_words([10, 0, 0, 1], 80);
        words[0] = u32::from_be_bytes([0x94, 4, 0, 0]); // Router Alert
        assert_eq!(parse_option(words), None);
    }
}
