//! Destroying the UDP sockets the socket path pointed at a backend that has left its service:
//! without it a connected (or sticky unconnected) UDP socket keeps sending into a pod that is
//! gone for as long as the client keeps it open, the well-known stale DNS failure. Sockets are
//! found by the cookies the socket path recorded, in every network namespace of the host, and
//! destroyed with sock_diag `SOCK_DESTROY` (as `ss -K` does); their owners see an error and
//! open a new socket, which the socket path then sends to a live backend.
//!
//! TCP connections are left alone: like kube-proxy, existing connections to an endpoint that
//! leaves are allowed to finish.
//!
//! Walking `/proc` and every namespace takes long on a busy node, so it runs on a thread of its
//! own ([`SocketReaper`]): the sync loop hands the cookies over and goes on.

use std::{
    collections::{BTreeMap, HashSet},
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{OnceLock, mpsc},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    message::SockDiagDestroy,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use tracing::{debug, info, warn};

use crate::sys::net::in_netns;

/// One path per network namespace of the host: every process's `ns/net` (deduplicated by
/// device and inode) and the named namespaces under /run/netns.
fn namespaces() -> Vec<PathBuf> {
    let mut found: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let procs = fs::read_dir("/proc").into_iter().flatten().flatten();
    let pids = procs.filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())));
    let named = fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.path());
    for path in pids.map(|e| e.path().join("ns/net")).chain(named) {
        if let Ok(meta) = fs::metadata(&path) {
            found.entry((meta.dev(), meta.ino())).or_insert(path);
        }
    }
    found.into_values().collect()
}

/// Destroys every UDP socket (AF_INET, and AF_INET6: IPv6 and IPv4-mapped destinations) whose
/// cookie is in `cookies`, in every network namespace.
/// Returns how many were destroyed. Blocks for as long as the walk takes: see [`SocketReaper`].
pub fn destroy_udp(cookies: &HashSet<u64>) -> io::Result<usize> {
    if cookies.is_empty() {
        return Ok(0);
    }
    let mut destroyed = 0;
    for path in namespaces() {
        // A process that exited meanwhile took its namespace reference with it.
        match in_netns(&path, || destroy_here(cookies)) {
            Ok(Ok(n)) => destroyed += n,
            Ok(Err(error)) => debug!(namespace = %path.display(), %error, "sock_diag failed"),
            Err(error) => debug!(%error, "skipping a network namespace"),
        }
    }
    Ok(destroyed)
}

/// Destroys UDP sockets on a thread of its own, so that nothing waits for the walk. Cookies
/// handed over while a walk runs are destroyed together in the next one.
pub struct SocketReaper {
    tx: mpsc::Sender<HashSet<u64>>,
}

impl SocketReaper {
    /// A reaper running `destroy` (the real one: [`destroy_udp`]) on its own thread.
    pub fn new(destroy: impl Fn(&HashSet<u64>) -> io::Result<usize> + Send + 'static) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<HashSet<u64>>();
        std::thread::Builder::new().name("udp-reaper".into()).spawn(move || {
            while let Ok(mut cookies) = rx.recv() {
                while let Ok(more) = rx.try_recv() {
                    cookies.extend(more);
                }
                match destroy(&cookies) {
                    Ok(0) => {}
                    Ok(destroyed) => info!(destroyed, "destroyed UDP sockets still sent to departed backends"),
                    Err(error) => warn!(%error, "destroying UDP sockets of departed backends failed"),
                }
            }
        })?;
        Ok(Self { tx })
    }

    /// Hands `cookies` to the reaper's thread; returns at once.
    pub fn destroy(&self, cookies: HashSet<u64>) {
        if !cookies.is_empty() {
            // The thread runs as long as the sender lives.
            let _ = self.tx.send(cookies);
        }
    }
}

/// Destroys the UDP sockets with these cookies on the agent's reaper thread (started on first
/// use); returns at once. Without a thread (the system refused one) it is done here.
pub fn destroy_udp_later(cookies: HashSet<u64>) {
    static REAPER: OnceLock<Option<SocketReaper>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        SocketReaper::new(destroy_udp)
            .inspect_err(|error| warn!(%error, "no thread for destroying UDP sockets; doing it on the sync loop"))
            .ok()
    });
    match reaper {
        Some(reaper) => reaper.destroy(cookies),
        None => {
            if let Err(error) = destroy_udp(&cookies) {
                warn!(%error, "destroying UDP sockets of departed backends failed");
            }
        }
    }
}

/// A netlink request with `payload`, serialized.
fn request<T: NetlinkSerializable>(flags: u16, payload: T) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

fn inet_request(family: u8, socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    })
}

/// Dumps this namespace's UDP sockets of both families and destroys those with a listed cookie.
/// A dump covers one family: an AF_INET6 socket (the socket path serves those through
/// connect6/sendmsg6, IPv4-mapped destinations included) is only in the AF_INET6 dump.
fn destroy_here(cookies: &HashSet<u64>) -> io::Result<usize> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut buf = vec![0u8; 65536];
    let mut targets = Vec::new();
    for (family, any) in [(AF_INET, SocketId::new_v4()), (AF_INET6, SocketId::new_v6())] {
        socket.send(&request(NLM_F_REQUEST | NLM_F_DUMP, inet_request(family, any)), 0)?;
        targets.extend(dump(&mut socket, &mut buf, cookies)?.into_iter().map(|id| (family, id)));
    }
    let mut destroyed = 0;
    for (family, id) in targets {
        socket.send(&request(NLM_F_REQUEST | NLM_F_ACK, SockDiagDestroy::new(inet_request(family, id))), 0)?;
        let size = socket.recv(&mut &mut buf[..], 0)?;
        if let Ok(ack) = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[..size])
            && let NetlinkPayload::Error(error) = ack.payload
            && error.code.is_none()
        {
            destroyed += 1;
        }
    }
    Ok(destroyed)
}

/// Reads the answer to one dump request: the sockets with a listed cookie.
fn dump(socket: &mut Socket, buf: &mut [u8], cookies: &HashSet<u64>) -> io::Result<Vec<SocketId>> {
    let mut targets = Vec::new();
    'dump: loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let id = &response.header.socket_id;
                    if cookies.contains(&u64::from_ne_bytes(id.cookie)) {
                        targets.push(id.clone());
                    }
                }
                NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => break 'dump,
                _ => {}
            }
            if length == 0 {
                break 'dump;
            }
            offset += length;
        }
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc, time::Duration};

    use super::*;

    /// The sync loop hands cookies over and goes on while a walk is still running; what it hands
    /// over meanwhile is destroyed together in the next walk.
    #[test]
    fn handing_cookies_over_never_waits_for_the_walk() {
        let (started_tx, started) = mpsc::channel::<HashSet<u64>>();
        let (release, released) = mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        let reaper = SocketReaper::new(move |cookies| {
            started_tx.send(cookies.clone()).unwrap();
            // A walk that takes as long as the test wants.
            released.lock().unwrap().recv().unwrap();
            Ok(cookies.len())
        })
        .unwrap();
        reaper.destroy(HashSet::from([1]));
        assert_eq!(started.recv_timeout(Duration::from_secs(10)).unwrap(), HashSet::from([1]));
        // The walk is blocked now: handing over more returns all the same.
        reaper.destroy(HashSet::from([2]));
        reaper.destroy(HashSet::from([3]));
        reaper.destroy(HashSet::new());
        assert!(started.try_recv().is_err(), "one walk at a time");
        release.send(()).unwrap();
        assert_eq!(started.recv_timeout(Duration::from_secs(10)).unwrap(), HashSet::from([2, 3]));
        release.send(()).unwrap();
    }
}
