//! Address parsing as Kubernetes does it, for both families.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// An IP family: the label value of the metrics that have a `family` label, and the families
/// a dual-stack Service serves (kube-proxy runs one proxier per family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4 (`spec.ipFamilies` `IPv4`, EndpointSlice `addressType: IPv4`).
    V4,
    /// IPv6 (`spec.ipFamilies` `IPv6`, EndpointSlice `addressType: IPv6`).
    V6,
}

impl IpFamily {
    /// Both families, IPv4 first.
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// The family of an address.
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 }
    }

    /// The metric label value: `ipv4` or `ipv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "ipv4",
            IpFamily::V6 => "ipv6",
        }
    }

    /// The name Kubernetes gives the family (`spec.ipFamilies`, `addressType`).
    pub fn api_name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    /// The family Kubernetes calls `name`, if any.
    pub fn from_api_name(name: &str) -> Option<Self> {
        match name {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }
}

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

/// Parses an address of either family: IPv4 as [`parse_ipv4`] does, IPv6 in any of its text
/// forms. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) stays IPv6 here: callers refuse it
/// (see [`is_ipv4_mapped`]).
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    if text.contains(':') { text.parse::<Ipv6Addr>().ok().map(IpAddr::V6) } else { parse_ipv4(text).map(IpAddr::V4) }
}

/// Whether `ip` is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`). The maps hold IPv4 in that
/// form, so such an address in a Service or slice would alias an IPv4 entry: it is refused.
pub fn is_ipv4_mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

/// A CIDR block of either family (`--nodeport-addresses`, `--cluster-cidr`,
/// `loadBalancerSourceRanges`, `spec.podCIDRs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub network: IpAddr,
    /// Prefix length, 0..=32 for IPv4 and 0..=128 for IPv6.
    pub prefix: u8,
}

impl Cidr {
    /// The block's family.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.network)
    }

    /// The block as the maps hold it ([`proxy_common::addr`]): its network address in map form
    /// and its prefix length over the map form's 128 bits (an IPv4 `/n` is the mapped `/96+n`,
    /// an IPv6 prefix is its own length).
    pub fn map_prefix(&self) -> (proxy_common::addr::Addr, u32) {
        let network = proxy_common::addr::from_ip(self.network);
        let prefix = u32::from(self.prefix);
        match self.network {
            IpAddr::V4(_) => (network, proxy_common::addr::V4_MAPPED_PREFIX_BITS + prefix),
            IpAddr::V6(_) => (network, prefix),
        }
    }

    /// Whether `addr` is inside the block (never for an address of the other family).
    pub fn contains(&self, addr: impl Into<IpAddr>) -> bool {
        match (self.network, addr.into()) {
            (IpAddr::V4(network), IpAddr::V4(addr)) => u32::from(addr) & v4_mask(self.prefix) == u32::from(network),
            (IpAddr::V6(network), IpAddr::V6(addr)) => u128::from(addr) & v6_mask(self.prefix) == u128::from(network),
            _ => false,
        }
    }
}

fn v4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// A CIDR that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not a CIDR (want a.b.c.d/n with n <= 32, or an IPv6 block such as fd00:10:96::/112 with n <= 128; \
     IPv4-mapped IPv6 blocks are written as IPv4)"
)]
pub struct CidrError(String);

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let bad = || CidrError(text.to_owned());
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr = parse_ip(addr).filter(|ip| !is_ipv4_mapped(*ip)).ok_or_else(bad)?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let network = match addr {
            IpAddr::V4(v4) if prefix <= 32 => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & v4_mask(prefix))),
            IpAddr::V6(v6) if prefix <= 128 => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & v6_mask(prefix))),
            _ => return Err(bad()),
        };
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        assert_eq!(parse_ip("010.096.000.011"), Some(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11))));
    }

    #[test]
    fn rejects_what_is_not_a_dotted_quad() {
        for bad in ["", "10.96.0", "10.96.0.1.2", "10.96.0.256", "10.96.0.-1", "a.b.c.d", "0010.1.1.1", "::1"] {
            assert_eq!(parse_ipv4(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ipv6_parses_in_every_text_form_and_mapped_addresses_are_recognised() {
        let ula = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0xa);
        assert_eq!(parse_ip("fd00:10:96::a"), Some(IpAddr::V6(ula)));
        assert_eq!(parse_ip("fd00:0010:0096:0:0:0:0:000a"), Some(IpAddr::V6(ula)));
        for bad in ["fd00::10::1", "[fd00::1]", "fd00::1%eth0", "fd00:10:96::g"] {
            assert_eq!(parse_ip(bad), None, "{bad:?}");
        }
        let mapped = parse_ip("::ffff:10.96.0.10").unwrap();
        assert!(is_ipv4_mapped(mapped));
        assert!(!is_ipv4_mapped(IpAddr::V6(ula)));
        assert!(!is_ipv4_mapped(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))));
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

    #[test]
    fn ipv6_cidr_contains_only_its_block_and_never_the_other_family() {
        let cidr: Cidr = "fd00:10:244:1::5/64".parse().unwrap();
        assert_eq!(cidr.to_string(), "fd00:10:244:1::/64", "host bits are cleared");
        assert_eq!(cidr.family(), IpFamily::V6);
        assert!(cidr.contains("fd00:10:244:1::abcd".parse::<Ipv6Addr>().unwrap()));
        assert!(!cidr.contains("fd00:10:244:2::1".parse::<Ipv6Addr>().unwrap()));
        let all_v6: Cidr = "::/0".parse().unwrap();
        assert!(all_v6.contains(Ipv6Addr::LOCALHOST));
        assert!(!all_v6.contains(Ipv4Addr::LOCALHOST), "::/0 holds no IPv4 address");
        let all_v4: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(!all_v4.contains(Ipv6Addr::LOCALHOST), "0.0.0.0/0 holds no IPv6 address");
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("::ffff:10.0.0.0/104".parse::<Cidr>().is_err(), "an IPv4-mapped block would alias IPv4");
        assert!("fd00::/+64".parse::<Cidr>().is_err());
    }

    #[test]
    fn map_prefix_is_96_plus_n_for_ipv4_and_n_for_ipv6() {
        let v4: Cidr = "10.244.0.0/16".parse().unwrap();
        assert_eq!(v4.map_prefix(), (proxy_common::addr::from_v4([10, 244, 0, 0]), 112));
        let v6: Cidr = "fd00:10:244::/56".parse().unwrap();
        let network: Ipv6Addr = "fd00:10:244::".parse().unwrap();
        assert_eq!(v6.map_prefix(), (network.octets(), 56));
    }
}
