//! Small traffic probes run inside a namespace: ICMP echo, a TCP transfer with content check,
//! a UDP echo. Used by `switchyard demo` and the end-to-end tests.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Ipv4Packet};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::{run_in, NetNs};

/// Round-trip times of ICMP echo requests from inside `ns` to `dst`; `Err` names what failed.
pub fn ping(
    ns: &NetNs,
    dst: Ipv4Addr,
    count: u16,
    timeout: Duration,
) -> Result<Vec<Duration>, String> {
    run_in(ns, move || ping_here(dst, count, timeout))
        .map_err(|e| e.to_string())
        .and_then(|r| r)
}

fn ping_here(dst: Ipv4Addr, count: u16, timeout: Duration) -> Result<Vec<Duration>, String> {
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        .map_err(|e| format!("raw ICMP socket: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let ident = (std::process::id() as u16) ^ 0x5a5a;
    let payload = [0xa5u8; 56];
    let mut rtts = Vec::new();
    for seq in 0..count {
        let repr = Icmpv4Repr::EchoRequest {
            ident,
            seq_no: seq,
            data: &payload,
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(&mut buf),
            &ChecksumCapabilities::default(),
        );
        let start = Instant::now();
        let to = SocketAddr::V4(SocketAddrV4::new(dst, 0));
        s.send_to(&buf, &to.into())
            .map_err(|e| format!("send to {dst}: {e}"))?;
        let deadline = start + timeout;
        loop {
            let mut rx = [0u8; 2048];
            let n = match (&s).read(&mut rx) {
                Ok(n) => n,
                Err(_) => return Err(format!("no echo reply from {dst} (seq {seq})")),
            };
            let Ok(ip) = Ipv4Packet::new_checked(&rx[..n]) else {
                continue;
            };
            if ip.src_addr() != dst {
                continue;
            }
            let Ok(icmp) = Icmpv4Packet::new_checked(ip.payload()) else {
                continue;
            };
            if let Ok(Icmpv4Repr::EchoReply {
                ident: i,
                seq_no,
                data,
            }) = Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default())
            {
                if i == ident && seq_no == seq && data == payload {
                    rtts.push(start.elapsed());
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no echo reply from {dst} (seq {seq})"));
            }
        }
    }
    Ok(rtts)
}

/// Deterministic test content: byte i of a transfer.
pub fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 8)) as u8
}

/// A TCP server inside `ns` on `port` that sends `len` pattern bytes to each of `conns` clients
/// as an HTTP/1.0 response, then ends.
pub fn serve_http(
    ns: &NetNs,
    port: u16,
    len: usize,
    conns: usize,
) -> Result<std::thread::JoinHandle<()>, String> {
    let l = run_in(ns, move || TcpListener::bind(("0.0.0.0", port)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind :{port}: {e}"))?;
    Ok(std::thread::spawn(move || {
        let body: Vec<u8> = (0..len).map(pattern).collect();
        for _ in 0..conns {
            let Ok((mut s, _)) = l.accept() else { return };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\n\r\n");
            let _ = s
                .write_all(head.as_bytes())
                .and_then(|_| s.write_all(&body));
        }
    }))
}

/// GET `/` from `dst:port` inside `ns`; checks the body is the pattern. Returns (bytes, time).
pub fn http_get(ns: &NetNs, dst: Ipv4Addr, port: u16) -> Result<(usize, Duration), String> {
    run_in(ns, move || {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::V4(SocketAddrV4::new(dst, port)),
            Duration::from_secs(5),
        )
        .map_err(|e| format!("connect {dst}:{port}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        s.read_to_end(&mut all).map_err(|e| format!("read: {e}"))?;
        let elapsed = start.elapsed();
        let split = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no HTTP header in the reply")?;
        let body = &all[split + 4..];
        if let Some(i) = body.iter().enumerate().position(|(i, b)| *b != pattern(i)) {
            return Err(format!("body differs at byte {i}"));
        }
        Ok((body.len(), elapsed))
    })
    .map_err(|e| e.to_string())
    .and_then(|r| r)
}

/// A UDP echo server inside `ns` on `port`, answering `count` datagrams.
pub fn serve_udp_echo(
    ns: &NetNs,
    port: u16,
    count: usize,
) -> Result<std::thread::JoinHandle<()>, String> {
    let s = run_in(ns, move || UdpSocket::bind(("0.0.0.0", port)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind udp :{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    Ok(std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..count {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                return;
            };
            let _ = s.send_to(&buf[..n], from);
        }
    }))
}

/// Send `count` numbered datagrams from inside `ns` to `dst:port` and check each echo.
pub fn udp_echo(ns: &NetNs, dst: Ipv4Addr, port: u16, count: usize) -> Result<usize, String> {
    run_in(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        s.connect((dst, port)).map_err(|e| e.to_string())?;
        let mut ok = 0;
        for i in 0..count {
            let msg: Vec<u8> = format!("switchyard datagram {i} ")
                .bytes()
                .chain((0..200).map(pattern))
                .collect();
            s.send(&msg).map_err(|e| format!("send: {e}"))?;
            let mut buf = [0u8; 2048];
            let n = s
                .recv(&mut buf)
                .map_err(|e| format!("no echo for datagram {i}: {e}"))?;
            if buf[..n] != msg[..] {
                return Err(format!("echo of datagram {i} differs"));
            }
            ok += 1;
        }
        Ok(ok)
    })
    .map_err(|e| e.to_string())
    .and_then(|r| r)
}

/// A TCP server in `ns` on `port` that answers each of `conns` connections with the peer
/// address it saw (one line), then ends.
pub fn serve_tell_peer(
    ns: &NetNs,
    port: u16,
    conns: usize,
) -> Result<std::thread::JoinHandle<Vec<SocketAddr>>, String> {
    let l = run_in(ns, move || TcpListener::bind(("0.0.0.0", port)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind :{port}: {e}"))?;
    Ok(std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..conns {
            let Ok((mut s, peer)) = l.accept() else { break };
            let _ = writeln!(s, "{peer}");
            seen.push(peer);
        }
        seen
    }))
}

/// Connect from `ns` to `dst:port` and return the address the server says it saw.
pub fn ask_peer(ns: &NetNs, dst: Ipv4Addr, port: u16) -> Result<SocketAddr, String> {
    run_in(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(3))
                .map_err(|e| format!("connect {dst}:{port}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut s), &mut line)
            .map_err(|e| format!("read: {e}"))?;
        line.trim()
            .parse()
            .map_err(|_| format!("unexpected answer {line:?}"))
    })
    .map_err(|e| e.to_string())
    .and_then(|r| r)
}
