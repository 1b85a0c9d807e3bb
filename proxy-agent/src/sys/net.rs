//! Network namespaces and interfaces: the calling thread's netns cookie, running a closure on a
//! thread inside another namespace, interface addresses (`getifaddrs`), interface indexes and
//! the routing tables of both families. All of these answer for the calling thread's network namespace.

use std::{
    ffi::{CStr, CString},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

/// `SO_NETNS_COOKIE` (Linux 5.14) in asm-generic numbering (x86, arm, riscv); `libc` does not
/// export it for these targets.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`): what
/// `bpf_get_netns_cookie()` gives programs for sockets there. Asked of a Unix socket, which sends
/// nothing.
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: socket() has no memory preconditions; a non-negative result is a new fd we own.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns; OwnedFd closes it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a writable u64 buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Runs `f` on a short-lived thread that has entered the network namespace at `path` (a
/// `/proc/<pid>/ns/net` or `/run/netns/<name>`): setns changes only the calling thread's
/// namespace, and that thread ends with `f`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = fs::File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid namespace fd; it affects only this thread, which ends here.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("entering {}: {e}", path.display())));
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other(format!("a thread inside {} panicked", path.display()))))
    })
}

/// Every IPv4 and IPv6 address of this namespace's interfaces, with the interface's name.
pub fn addresses() -> io::Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we own until freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut entry = head;
    while !entry.is_null() {
        // SAFETY: `entry` is a non-null node of the list getifaddrs returned, alive until it is
        // freed below; `ifa_addr` is checked for null and is a `sockaddr_in` when its family is
        // AF_INET, a `sockaddr_in6` when it is AF_INET6; `ifa_name` is a NUL-terminated string.
        unsafe {
            let addr = (*entry).ifa_addr;
            let ip = if addr.is_null() {
                None
            } else {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = addr.cast::<libc::sockaddr_in>();
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = addr.cast::<libc::sockaddr_in6>();
                        Some(IpAddr::V6(Ipv6Addr::from((*sin6).sin6_addr.s6_addr)))
                    }
                    _ => None,
                }
            };
            if let Some(ip) = ip {
                out.push((CStr::from_ptr((*entry).ifa_name).to_string_lossy().into_owned(), ip));
            }
            entry = (*entry).ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once; nothing points into it any more.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The index of the interface called `name`, if this namespace has one.
pub fn interface_index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The ports of the bridges called `bridges` in this namespace (a pod bridge's veths), from an
/// `RTM_GETLINK` dump: each interface whose `IFLA_MASTER` is one of them. Asked of netlink, not
/// `/sys/class/net`, which shows the namespace sysfs was mounted in.
pub fn bridge_ports(bridges: &[String]) -> io::Result<Vec<String>> {
    let masters: Vec<u32> = bridges.iter().filter_map(|b| interface_index(b)).collect();
    if masters.is_empty() {
        return Ok(Vec::new());
    }
    Ok(links()?.into_iter().filter(|(_, _, master)| masters.contains(master)).map(|(name, _, _)| name).collect())
}

/// `RTM_GETLINK`'s attributes read here (`linux/if_link.h`).
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;

/// Every interface of this namespace: (name, index, master's index or 0).
fn links() -> io::Result<Vec<(String, u32, u32)>> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // nlmsghdr (16 bytes) + ifinfomsg (16 bytes, all zero: every family, every interface).
    let mut request = [0u8; 32];
    request[0..4].copy_from_slice(&32u32.to_ne_bytes());
    request[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    request[6..8].copy_from_slice(&flags.to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    socket.send(&request, 0)?;
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::new();
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        if parse_links(&buf[..size], &mut out)? {
            return Ok(out);
        }
    }
}

/// Reads one batch of an `RTM_GETLINK` dump into `out`; whether the dump ended.
fn parse_links(mut buf: &[u8], out: &mut Vec<(String, u32, u32)>) -> io::Result<bool> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("RTM_GETLINK dump: {what}"));
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    while buf.len() >= 16 {
        let length = u32_at(buf, 0) as usize;
        if length < 16 || length > buf.len() {
            return Err(invalid("a message overruns the buffer"));
        }
        let kind = u16_at(buf, 4);
        if kind == libc::NLMSG_DONE as u16 {
            return Ok(true);
        }
        if kind == libc::NLMSG_ERROR as u16 {
            let code = if length >= 20 { u32_at(buf, 16) as i32 } else { 0 };
            return Err(io::Error::from_raw_os_error(-code));
        }
        if kind == libc::RTM_NEWLINK && length >= 32 {
            let index = u32_at(buf, 20);
            let (mut name, mut master) = (String::new(), 0);
            let mut attrs = &buf[32..length];
            while attrs.len() >= 4 {
                let size = usize::from(u16_at(attrs, 0));
                if size < 4 || size > attrs.len() {
                    break;
                }
                let value = &attrs[4..size];
                match u16_at(attrs, 2) {
                    IFLA_IFNAME => name = String::from_utf8_lossy(value).trim_end_matches('\0').to_owned(),
                    IFLA_MASTER if value.len() >= 4 => master = u32_at(value, 0),
                    _ => {}
                }
                attrs = &attrs[size.next_multiple_of(4).min(attrs.len())..];
            }
            out.push((name, index, master));
        }
        buf = &buf[length.next_multiple_of(4).min(buf.len())..];
    }
    Ok(false)
}

/// The routes of both families in this namespace (`/proc/self/net/route` and
/// `/proc/self/net/ipv6_route`): (interface, destination) pairs. A kernel without IPv6 has no
/// `ipv6_route`, which counts as no IPv6 route.
pub fn routes() -> io::Result<Vec<(String, IpAddr)>> {
    let read = |path: &str| fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")));
    let mut out = parse_routes(&read("/proc/self/net/route")?);
    match read("/proc/self/net/ipv6_route") {
        Ok(text) => out.extend(parse_ipv6_routes(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}

/// Parses `/proc/net/route`: `Iface Destination Gateway ...`, the destination in host-order hex
/// of the network-order bytes.
fn parse_routes(text: &str) -> Vec<(String, IpAddr)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let iface = fields.next()?;
            let dest = u32::from_str_radix(fields.next()?, 16).ok()?;
            Some((iface.to_owned(), IpAddr::V4(Ipv4Addr::from(dest.to_le_bytes()))))
        })
        .collect()
}

/// Parses `/proc/net/ipv6_route`: no header; ten fields a line, the destination first (32 hex
/// digits in network order) and the interface last.
fn parse_ipv6_routes(text: &str) -> Vec<(String, IpAddr)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [dest, .., iface] = fields.as_slice() else { return None };
            if fields.len() != 10 || dest.len() != 32 {
                return None;
            }
            let dest = u128::from_str_radix(dest, 16).ok()?;
            Some(((*iface).to_owned(), IpAddr::V6(Ipv6Addr::from(dest))))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `RTM_NEWLINK` message: ifinfomsg with `index`, then IFLA_IFNAME and, if not 0,
    /// IFLA_MASTER.
    fn newlink(index: u32, name: &str, master: u32) -> Vec<u8> {
        let attr = |kind: u16, value: &[u8]| {
            let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
            a.extend(kind.to_ne_bytes());
            a.extend(value);
            a.resize(a.len().next_multiple_of(4), 0);
            a
        };
        let mut body = vec![0u8; 16];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        body.extend(attr(IFLA_IFNAME, format!("{name}\0").as_bytes()));
        if master != 0 {
            body.extend(attr(IFLA_MASTER, &master.to_ne_bytes()));
        }
        let mut message = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        message.extend(libc::RTM_NEWLINK.to_ne_bytes());
        message.extend([0u8; 10]);
        message.extend(body);
        message
    }

    #[test]
    fn a_link_dump_names_each_interface_and_its_master() {
        let mut batch = newlink(1, "lo", 0);
        batch.extend(newlink(4, "veth0", 3));
        batch.extend(newlink(3, "br0", 0));
        let mut out = Vec::new();
        assert!(!parse_links(&batch, &mut out).unwrap(), "no NLMSG_DONE yet");
        assert_eq!(out, [("lo".into(), 1, 0), ("veth0".into(), 4, 3), ("br0".into(), 3, 0)]);
        let mut done = 16u32.to_ne_bytes().to_vec();
        done.extend((libc::NLMSG_DONE as u16).to_ne_bytes());
        done.extend([0u8; 10]);
        assert!(parse_links(&done, &mut out).unwrap(), "NLMSG_DONE ends the dump");
        let mut cut = newlink(5, "eth0", 0);
        cut.truncate(cut.len() - 8);
        assert!(parse_links(&cut, &mut Vec::new()).is_err(), "a message longer than the batch is refused");
    }

    #[test]
    fn loopback_is_no_bridge_port() {
        let ports = bridge_ports(&["lo".into()]).unwrap();
        assert!(ports.is_empty(), "{ports:?}");
        assert!(bridge_ports(&["no-such-interface".into()]).unwrap().is_empty());
    }

    #[test]
    fn routes_are_read_in_network_order() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    cni0\t0001F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    broken\tzz\n";
        assert_eq!(
            parse_routes(text),
            vec![("eth0".into(), Ipv4Addr::UNSPECIFIED.into()), ("cni0".into(), Ipv4Addr::new(10, 244, 1, 0).into())]
        );
    }

    #[test]
    fn ipv6_routes_are_read_in_network_order() {
        let text = "fd000010024400010000000000000000 40 00000000000000000000000000000000 00 \
                    00000000000000000000000000000000 00000400 00000001 00000000 00000001   cni0\n\
                    00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
                    fd000000000000000000000000000001 00000400 00000001 00000000 00000003   eth0\n\
                    short line\n";
        let pods: Ipv6Addr = "fd00:10:244:1::".parse().unwrap();
        assert_eq!(
            parse_ipv6_routes(text),
            vec![("cni0".into(), pods.into()), ("eth0".into(), Ipv6Addr::UNSPECIFIED.into())]
        );
    }

    #[test]
    fn this_namespace_has_a_cookie_and_loopback() {
        assert!(netns_cookie().unwrap() != 0);
        assert!(interface_index("lo").is_some());
        assert!(interface_index("no-such-interface0").is_none());
        let addresses = addresses().unwrap();
        assert!(addresses.contains(&("lo".to_owned(), Ipv4Addr::LOCALHOST.into())), "{addresses:?}");
        let same = in_netns(Path::new("/proc/self/ns/net"), netns_cookie).unwrap().unwrap();
        assert_eq!(same, netns_cookie().unwrap(), "entering our own namespace changes nothing");
    }
}
