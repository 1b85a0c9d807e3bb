//! A test client: `probe tcp|udp ADDR:PORT [COUNT] [TIMEOUT_MS]` connects (or sends) COUNT
//! times, one socket each, and prints `ok <answer>` or `err <kind>` per attempt.
//! `tcp-peer`, `udp-peer` (unconnected, one socket per datagram) and `udp-connected` print
//! `ok <answer>@<address the reply came from, or getpeername>`; `udp-sticky` sends COUNT
//! datagrams from ONE unconnected socket, printing `ok <answer>@<source>` for each.
//! `http` sends `GET /` and prints `ok <status code> <body>`.
//! `udp-big` sends one 3000-byte datagram per attempt (fragmented on a 1500-byte MTU);
//! `tcp-big` sends 2048 bytes after the greeting and checks they are echoed back.
//! `probe udp-hold ADDR:PORT SECONDS` keeps one connected UDP socket, round-tripping every
//! 100 ms, and prints `ok <first answer>` or, at the first failure, `err <kind>`.
//! `probe hold ADDR:PORT SECONDS` keeps one connection and round-trips a line every 100 ms for
//! SECONDS, printing `ok <greeting>` if every round trip worked. Bounded in count
//! (at most 100 000) and in time: after 60 s the remaining attempts are reported as `err budget`. Run inside a test namespace and cgroup (see `proxy_tests::client`).
//!
//! Sockets follow the family of ADDR: `10.96.0.10:6666` an AF_INET socket, `[fd00:10:96::10]:6666`
//! an AF_INET6 one, and `[::ffff:10.96.0.10]:6666` an AF_INET6 socket to an IPv4-mapped address
//! (IPV6_V6ONLY off), as a dual-stack application reaches an IPv4 service. Answers show the
//! peer as that socket sees it (`[::ffff:10.96.0.10]:6666` in the last case).

use std::{
    io::{BufRead as _, BufReader, ErrorKind},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

fn kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused",
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
        ErrorKind::PermissionDenied => "denied",
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "unreachable",
        ErrorKind::ConnectionReset => "reset",
        ErrorKind::ConnectionAborted => "aborted",
        _ => "other",
    }
}

fn tcp(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

fn tcp_peer(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let peer = stream.peer_addr()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(format!("{}@{peer}", line.trim()))
}

fn udp_exchange(socket: &UdpSocket, addr: Option<SocketAddr>) -> std::io::Result<(String, SocketAddr)> {
    match addr {
        Some(addr) => socket.send_to(b"hello\n", addr)?,
        None => socket.send(b"hello\n")?,
    };
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from))
}

/// An unconnected UDP socket on an ephemeral port, of the family of `target`; an AF_INET6 one
/// takes IPv4-mapped targets too (IPV6_V6ONLY off, whatever the sysctl default).
fn udp_socket(target: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(target), Type::DGRAM, None)?;
    let any: SocketAddr = if target.is_ipv6() {
        socket.set_only_v6(false)?;
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    socket.bind(&any.into())?;
    Ok(socket.into())
}

fn udp_peer(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let socket = udp_socket(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    let (answer, from) = udp_exchange(&socket, Some(addr))?;
    Ok(format!("{answer}@{from}"))
}

fn udp_connected(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let socket = udp_socket(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(addr)?;
    let (answer, _) = udp_exchange(&socket, None)?;
    Ok(format!("{answer}@{}", socket.peer_addr()?))
}

fn http_get(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: probe\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).unwrap_or("?").to_owned();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned();
    Ok(format!("{status} {body}"))
}

fn udp_big(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let socket = udp_socket(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(&[b'x'; 3000], addr)?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

fn tcp_big(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    let request = [b'y'; 2048];
    writer.write_all(&request)?;
    let mut echo = vec![0u8; request.len()];
    reader.read_exact(&mut echo)?;
    if echo != request {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "echo mismatch"));
    }
    Ok(greeting.trim().to_owned())
}

fn udp(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let socket = udp_socket(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"hello\n", addr)?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// One long-lived connection that must keep working.
fn hold(addr: SocketAddr, seconds: u64) -> std::io::Result<String> {
    use std::io::Write as _;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    let until = std::time::Instant::now() + Duration::from_secs(seconds.min(60));
    while std::time::Instant::now() < until {
        writer.write_all(b"ping\n")?;
        let mut echo = String::new();
        reader.read_line(&mut echo)?;
        if echo != "ping\n" {
            return Err(std::io::Error::new(ErrorKind::InvalidData, "echo mismatch"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(greeting.trim().to_owned())
}

/// One connected UDP socket that must keep working (or fail visibly).
fn udp_hold(addr: SocketAddr, seconds: u64) -> std::io::Result<String> {
    let socket = udp_socket(addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    socket.connect(addr)?;
    let (first, _) = udp_exchange(&socket, None)?;
    let until = std::time::Instant::now() + Duration::from_secs(seconds.min(60));
    while std::time::Instant::now() < until {
        udp_exchange(&socket, None)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(first)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(proto), Some(Ok(addr))) = (args.first(), args.get(1).map(|a| a.parse::<SocketAddr>())) else {
        eprintln!("usage: probe tcp|udp ADDR:PORT [COUNT] [TIMEOUT_MS]");
        return ExitCode::from(2);
    };
    let count: usize = args.get(2).and_then(|c| c.parse().ok()).unwrap_or(1).min(100_000);
    let timeout = Duration::from_millis(args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1000));
    if proto == "udp-hold" {
        let seconds = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
        match udp_hold(addr, seconds) {
            Ok(first) => println!("ok {first}"),
            Err(e) => println!("err {}", kind(&e)),
        }
        return ExitCode::SUCCESS;
    }
    if proto == "hold" {
        let seconds = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
        match hold(addr, seconds) {
            Ok(greeting) => println!("ok {greeting}"),
            Err(e) => println!("err {}", kind(&e)),
        }
        return ExitCode::SUCCESS;
    }
    if proto == "udp-sticky" {
        let socket = match udp_socket(addr).and_then(|s| s.set_read_timeout(Some(timeout)).map(|()| s)) {
            Ok(socket) => socket,
            Err(e) => {
                eprintln!("binding a UDP socket: {e}");
                return ExitCode::FAILURE;
            }
        };
        for _ in 0..count {
            match udp_exchange(&socket, Some(addr)) {
                Ok((answer, from)) => println!("ok {answer}@{from}"),
                Err(e) => println!("err {}", kind(&e)),
            }
        }
        return ExitCode::SUCCESS;
    }
    let attempt = match proto.as_str() {
        "tcp" => tcp,
        "udp" => udp,
        "tcp-peer" => tcp_peer,
        "tcp-big" => tcp_big,
        "http" => http_get,
        "udp-big" => udp_big,
        "udp-peer" => udp_peer,
        "udp-connected" => udp_connected,
        _ => {
            eprintln!("unknown protocol {proto}");
            return ExitCode::from(2);
        }
    };
    let budget = std::time::Instant::now() + Duration::from_secs(60);
    for _ in 0..count {
        if std::time::Instant::now() > budget {
            println!("err budget");
            continue;
        }
        match attempt(addr, timeout) {
            Ok(answer) if !answer.is_empty() => println!("ok {answer}"),
            Ok(_) => println!("err empty"),
            Err(e) => println!("err {}", kind(&e)),
        }
    }
    ExitCode::SUCCESS
}
