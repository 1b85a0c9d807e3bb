//! Address parsing as Kubernetes does it.

use std::net::Ipv4Addr;

/// Parses a dotted-quad IPv4 address the way Kubernetes' `ParseIPSloppy` does: each part is
/// decimal even with leading zeros (`010.096.000.011` is 10.96.0.11, never octal: the
/// CVE-2021-29923 behaviour kube-proxy keeps for compatibility). Returns `None` for anything else,
/// IPv6 included.
pub fn parse_ipv4(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// Whether `text` looks like an IPv6 address (skipped with a reason, not an error).
pub fn is_ipv6(text: &str) -> bool {
    text.contains(':') && text.parse::<std::net::Ipv6Addr>().is_ok()
}

/// An IPv4 CIDR block (`--nodeport-addresses`, `--cluster-cidr`, `loadBalancerSourceRanges`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub network: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl Cidr {
    /// The block as the maps hold it ([`proxy_common::addr`]): its network address in map form
    /// and its prefix length over the map form's 128 bits.
    pub fn map_prefix(&self) -> (proxy_common::addr::Addr, u32) {
        let network = proxy_common::addr::from_ip(self.network);
        (network, proxy_common::addr::V4_MAPPED_PREFIX_BITS + u32::from(self.prefix))
    }

    /// Whether `addr` is inside the block.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
        u32::from(addr) & mask == u32::from(self.network)
    }
}

/// A CIDR that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an IPv4 CIDR (want a.b.c.d/n with n <= 32)")]
pub struct CidrError(String);

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let bad = || CidrError(text.to_owned());
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr = parse_ipv4(addr).ok_or_else(bad)?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        Ok(Cidr { network: Ipv4Addr::from(u32::from(addr) & mask), prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zeros_are_decimal_not_octal() {
        assert_eq!(parse_ipv4("010.096.000.011"), Some(Ipv4Addr::new(10, 96, 0, 11)));
        assert_eq!(parse_ipv4("10.96.0.10"), Some(Ipv4Addr::new(10, 96, 0, 10)));
    }

    #[test]
    fn rejects_what_is_not_a_dotted_quad() {
        for bad in ["", "10.96.0", "10.96.0.1.2", "10.96.0.256", "10.96.0.-1", "a.b.c.d", "0010.1.1.1", "::1"] {
            assert_eq!(parse_ipv4(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cidr_contains_only_its_block() {
        let cidr: Cidr = "172.18.0.0/16".parse().unwrap();
        assert!(cidr.contains(Ipv4Addr::new(172, 18, 3, 4)));
        assert!(!cidr.contains(Ipv4Addr::new(172, 19, 0, 1)));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        let host: Cidr = "172.18.0.2/32".parse().unwrap();
        assert!(host.contains(Ipv4Addr::new(172, 18, 0, 2)) && !host.contains(Ipv4Addr::new(172, 18, 0, 3)));
        assert!("172.18.0.0/33".parse::<Cidr>().is_err());
    }
}
