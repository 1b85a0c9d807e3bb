//! Addresses as the maps hold them: 16 bytes in network order, IPv6 as it is and IPv4 as an
//! IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, RFC 4291 2.5.5.2), the form Linux itself gives an
//! IPv4 peer on a dual-stack socket. One key type serves both families, so an `AF_INET6` socket
//! connecting to `::ffff:10.96.0.10` finds the IPv4 ClusterIP's entry with no translation of
//! its own, and `bpftool` prints the family in the address.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A map address: IPv6, or IPv4-mapped IPv6 for IPv4.
pub type Addr = [u8; 16];

/// The all-zero address (`::`): "none" in fields that may be empty.
pub const UNSPECIFIED: Addr = [0; 16];

/// The 12 bytes before an IPv4 address in its mapped form.
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Bits of the mapped prefix: an IPv4 prefix of length `n` is a mapped prefix of `96 + n`.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// The map form of an IPv4 address.
pub const fn from_v4(v4: [u8; 4]) -> Addr {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// The IPv4 address a mapped address stands for; `None` for an IPv6 one.
pub const fn to_v4(addr: &Addr) -> Option<[u8; 4]> {
    if is_v4(addr) { Some([addr[12], addr[13], addr[14], addr[15]]) } else { None }
}

/// Whether the address is IPv4 (in its mapped form).
pub const fn is_v4(addr: &Addr) -> bool {
    let mut i = 0;
    while i < V4_MAPPED_PREFIX.len() {
        if addr[i] != V4_MAPPED_PREFIX[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The map form of an address of either family.
pub fn from_ip(ip: impl Into<IpAddr>) -> Addr {
    match ip.into() {
        IpAddr::V4(v4) => from_v4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a map address stands for: IPv4 for a mapped one.
pub fn to_ip(addr: &Addr) -> IpAddr {
    match to_v4(addr) {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(*addr)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_round_trips_through_its_mapped_form() {
        let mapped = from_v4([10, 96, 0, 10]);
        assert_eq!(mapped, Ipv4Addr::new(10, 96, 0, 10).to_ipv6_mapped().octets());
        assert!(is_v4(&mapped));
        assert_eq!(to_v4(&mapped), Some([10, 96, 0, 10]));
        let v6: Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0xa).octets();
        assert!(!is_v4(&v6));
        assert_eq!(to_v4(&v6), None);
        assert!(!is_v4(&UNSPECIFIED), ":: is IPv6");
        for ip in [IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), IpAddr::V6(Ipv6Addr::from(v6))] {
            assert_eq!(to_ip(&from_ip(ip)), ip);
        }
    }
}
