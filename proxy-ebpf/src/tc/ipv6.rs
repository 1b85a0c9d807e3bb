//! The IPv6 header and the walk over its extension headers to the upper-layer header, bounded
//! as Cilium's `ipv6_hdrlen_offset` (`bpf/lib/ipv6.h`) bounds it: at most
//! [`MAX_EXT_HEADERS`] extension headers, a packet with more is not parsed.

use aya_ebpf::programs::TcContext;

use super::packet::{ETH_HLEN, Skip};

/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Length of the fixed IPv6 header.
pub const IP6_HLEN: usize = 40;
/// Offsets of the next-header field, the source and the destination address in the frame.
pub const IP6_NEXTHDR: usize = ETH_HLEN + 6;
pub const IP6_SRC: usize = ETH_HLEN + 8;
pub const IP6_DST: usize = ETH_HLEN + 24;

/// Extension headers this walk steps over (RFC 8200 4.1); the fragment header is 8 bytes, the
/// others say their length in 8-byte units after the first 8.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// The most extension headers walked, as Cilium's `IPV6_MAX_HEADERS`.
const MAX_EXT_HEADERS: usize = 4;

/// The fragment header's fields (RFC 8200 4.5).
#[derive(Clone, Copy)]
pub struct Fragment {
    /// Identification, host order.
    pub id: u32,
    /// Whether this is a later fragment (offset not 0): it carries no upper-layer header.
    pub later: bool,
    /// The M flag: more fragments follow.
    pub more: bool,
}

/// Where the walk ended: the upper-layer protocol and its header's offset in the frame.
pub struct Upper {
    /// The last next-header value: the upper-layer protocol (of a later fragment: the one its
    /// fragment header names).
    pub proto: u8,
    /// Offset of the upper-layer header (of a later fragment: of its payload).
    pub offset: usize,
    /// The fragment header, if the packet is a fragment.
    pub fragment: Option<Fragment>,
}

/// Walks the extension headers of the IPv6 packet after the Ethernet header, whose fixed
/// header names `nexthdr`. A later fragment ends the walk at its fragment header: what follows
/// is payload.
#[inline(always)]
pub fn walk(ctx: &TcContext, nexthdr: u8) -> Result<Upper, Skip> {
    let mut upper = Upper { proto: nexthdr, offset: ETH_HLEN + IP6_HLEN, fragment: None };
    for _ in 0..MAX_EXT_HEADERS {
        match upper.proto {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let head: [u8; 2] = ctx.load(upper.offset).map_err(|_| Skip::Malformed)?;
                upper.proto = head[0];
                upper.offset += (usize::from(head[1]) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let head: [u8; 8] = ctx.load(upper.offset).map_err(|_| Skip::Malformed)?;
                let offset_flags = u16::from_be_bytes([head[2], head[3]]);
                let fragment = Fragment {
                    id: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
                    later: offset_flags & !0x7 != 0,
                    more: offset_flags & 1 != 0,
                };
                upper.proto = head[0];
                upper.offset += 8;
                upper.fragment = Some(fragment);
                if fragment.later {
                    return Ok(upper);
                }
            }
            _ => return Ok(upper),
        }
    }
    if is_extension(upper.proto) { Err(Skip::Malformed) } else { Ok(upper) }
}

/// Whether `nexthdr` names an extension header the walk steps over.
fn is_extension(nexthdr: u8) -> bool {
    matches!(nexthdr, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST)
}
