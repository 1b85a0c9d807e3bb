//! Tiny servers that stand in for pods: each answers every TCP connection and UDP datagram with
//! its own name, so a client can count which backend it reached. They listen on both families
//! (one AF_INET6 socket with IPV6_V6ONLY off), as a dual-stack pod does.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use socket2::{Domain, Socket, Type};

use crate::netns::Netns;

/// Answer with the address the client reached instead of a fixed name (one namespace can then
/// stand in for many endpoints).
pub const ANSWER_LOCAL_ADDRESS: &str = "@address";

/// In a pod's name, replaced by the client's address as the pod sees it (to check SNAT).
pub const PEER: &str = "{peer}";

/// The line a pod answers: its name, with [`PEER`] filled in, or the address it was reached at.
/// IPv4 addresses are written as such, not as the IPv4-mapped form the dual-stack socket sees.
fn answer(name: &str, name_is_address: bool, local: Option<SocketAddr>, peer: SocketAddr) -> String {
    match local {
        Some(local) if name_is_address => format!("{}\n", local.ip().to_canonical()),
        _ => format!("{}\n", name.replace(PEER, &peer.ip().to_canonical().to_string())),
    }
}

/// A socket of type `ty` bound to `[::]:port` that takes both families: IPV6_V6ONLY is turned
/// off whatever the namespace's `net.ipv6.bindv6only` says.
fn dual_stack(ty: Type, port: u16) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, ty, None)?;
    socket.set_only_v6(false)?;
    if ty == Type::STREAM {
        // As std's TcpListener: a restarted server rebinds while old connections linger.
        socket.set_reuse_address(true)?;
    }
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    if ty == Type::STREAM {
        socket.listen(1024)?;
    }
    Ok(socket)
}

/// Greets a TCP client, then echoes whatever it sends until it closes or idles for 10 s (so a
/// client can hold a long-lived connection and check it still works).
fn serve(mut conn: std::net::TcpStream, greeting: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    if conn.write_all(greeting.as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// A server bound inside a pod namespace; stops on drop.
#[derive(Debug)]
pub struct PodServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PodServer {
    /// Serves `name` (or [`ANSWER_LOCAL_ADDRESS`]) on TCP and UDP `port` of every address in `ns`,
    /// IPv4 and IPv6.
    pub fn start(ns: &Netns, port: u16, name: &str) -> anyhow::Result<Self> {
        let (tcp, udp) = std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<_> {
                // Sockets live in the namespace they were created in, whichever thread uses them.
                ns.enter()?;
                let tcp = dual_stack(Type::STREAM, port)
                    .with_context(|| format!("binding tcp [::]:{port} in {}", ns.name()))?;
                let udp = dual_stack(Type::DGRAM, port)
                    .with_context(|| format!("binding udp [::]:{port} in {}", ns.name()))?;
                Ok((TcpListener::from(tcp), UdpSocket::from(udp)))
            })
            .join()
            .expect("the bind thread does not panic")
        })?;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(20)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let reply = name.to_owned();
        let name_is_address = name == ANSWER_LOCAL_ADDRESS;
        let tcp_thread = {
            let (stop, reply) = (stop.clone(), reply.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((conn, peer)) => {
                            let answer = answer(&reply, name_is_address, conn.local_addr().ok(), peer);
                            std::thread::spawn(move || serve(conn, &answer));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        let udp_thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let local = udp.local_addr().ok();
                        let _ = udp.send_to(answer(&reply, name_is_address, local, peer).as_bytes(), peer);
                    }
                }
            })
        };
        Ok(Self { stop, threads: vec![tcp_thread, udp_thread] })
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
