//! Destroying the UDP sockets the socket path pointed at a backend that has left its service:
//! without it a connected (or sticky unconnected) UDP socket keeps sending into a pod that is
//! gone for as long as the client keeps it open, the well-known stale DNS failure. Sockets are
//! found by the cookies the socket path recorded, in every network namespace of the host, and
//! destroyed with sock_diag `SOCK_DESTROY` (as `ss -K` does); their owners see an error and
//! open a new socket, which the socket path then sends to a live backend.
//!
//! TCP connections are left alone: like kube-proxy, existing connections to an endpoint that
//! leaves are allowed to finish.

use std::{
    collections::{BTreeMap, HashSet},
    fs, io,
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    path::PathBuf,
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    message::SockDiagDestroy,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use tracing::debug;

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

/// Destroys every IPv4 UDP socket whose cookie is in `cookies`, in every network namespace.
/// Returns how many were destroyed.
pub fn destroy_udp(cookies: &HashSet<u64>) -> io::Result<usize> {
    if cookies.is_empty() {
        return Ok(0);
    }
    let namespaces = namespaces();
    // setns changes only the calling thread: walk the namespaces on a thread of our own.
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut destroyed = 0;
            for path in &namespaces {
                let Ok(file) = fs::File::open(path) else { continue };
                // SAFETY: setns on a valid namespace fd affects only this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    continue;
                }
                match destroy_here(cookies) {
                    Ok(n) => destroyed += n,
                    Err(error) => debug!(namespace = %path.display(), %error, "sock_diag failed"),
                }
            }
            Ok(destroyed)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the socket-destroying thread panicked")))
    })
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

fn inet_request(socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family: AF_INET,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    })
}

/// Dumps this namespace's UDP sockets and destroys those with a listed cookie.
fn destroy_here(cookies: &HashSet<u64>) -> io::Result<usize> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&request(NLM_F_REQUEST | NLM_F_DUMP, inet_request(SocketId::new_v4())), 0)?;
    let mut targets = Vec::new();
    let mut buf = vec![0u8; 65536];
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
    let mut destroyed = 0;
    for id in targets {
        socket.send(&request(NLM_F_REQUEST | NLM_F_ACK, SockDiagDestroy::new(inet_request(id))), 0)?;
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
