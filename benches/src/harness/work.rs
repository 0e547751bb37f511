//! The workloads: iperf3 for TCP throughput, and our own UDP packet generator, TCP ping-pong
//! and connection-rate loops. Our own clients and servers are threads of this process whose
//! sockets were created inside the right namespace (a socket stays in the namespace it was
//! created in, whichever thread uses it later).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, sockopt, MsgFlags, MultiHeaders, SockaddrIn};
use nix::sys::time::TimeVal;
use switchyard_control::netns::{run_in, NetNs};

use super::sys::{self, cpu_seconds, run_cmd, spawn_in, wait_listening};

/// Named figures one test produced, or why it failed.
pub type Outcome = Result<Vec<(&'static str, f64)>, String>;

/// UDP payload of a 64-byte Ethernet frame: 64 - 4 (FCS) - 14 - 20 - 8.
pub const UDP_PAYLOAD: usize = 18;
/// Flows (source sockets) the generator spreads its packets over.
pub const UDP_FLOWS: usize = 4;
const BATCH: usize = 64;
/// RR message size.
pub const RR_BYTES: usize = 64;

/// Runs `f` on a thread inside the namespace at `ns`.
pub fn in_ns<T: Send>(ns: &Path, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    let h = NetNs::open(ns).map_err(|e| e.to_string())?;
    run_in(&h, f).map_err(|e| e.to_string())
}

fn cpu_delta(pid: Option<u32>, before: Option<f64>) -> Option<f64> {
    Some(cpu_seconds(pid?)? - before?)
}

// ---- TCP throughput (iperf3, one stream) ----

/// iperf3 from `src` to `target`, with the server in `dst` on `server_port`.
pub fn tcp_throughput(
    src: &Path,
    dst: &Path,
    server_port: u16,
    target: SocketAddrV4,
    secs: u32,
    cpu_pid: Option<u32>,
) -> Outcome {
    let mut server = spawn_in(
        dst,
        Command::new("iperf3")
            .args(["-s", "-4", "-1", "-p"])
            .arg(server_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let result = (|| {
        wait_listening(&mut server, server_port, Duration::from_secs(5))
            .map_err(|e| format!("iperf3 server: {e}"))?;
        let cpu0 = cpu_pid.and_then(cpu_seconds);
        let out = run_cmd(
            Some(src),
            Command::new("iperf3")
                .args(["-4", "-J", "--connect-timeout", "3000", "-c"])
                .arg(target.ip().to_string())
                .arg("-p")
                .arg(target.port().to_string())
                .arg("-t")
                .arg(secs.to_string()),
            Duration::from_secs(secs as u64 + 20),
        );
        let cpu = cpu_delta(cpu_pid, cpu0);
        let out = out.map_err(|e| {
            // iperf3 -J reports its error inside the JSON on stdout.
            let msg = e.lines().next().unwrap_or("").to_string();
            format!("iperf3 to {target}: {msg}")
        })?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("iperf3 output is not JSON: {e}"))?;
        if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
            return Err(format!("iperf3 to {target}: {err}"));
        }
        let recv = &v["end"]["sum_received"];
        let bps = recv["bits_per_second"].as_f64().unwrap_or(0.0);
        let bytes = recv["bytes"].as_f64().unwrap_or(0.0);
        let mut figs = vec![("gbps", bps / 1e9)];
        if let Some(cpu) = cpu {
            if bytes > 0.0 {
                figs.push(("cpu_s_per_gbit", cpu / (bytes * 8.0 / 1e9)));
            }
        }
        Ok(figs)
    })();
    sys::stop_child(&mut server, Duration::from_secs(2));
    result
}

// ---- UDP 64-byte packets per second (our generator) ----

struct UdpRun {
    sent: u64,
    received: u64,
    secs: f64,
    cpu: Option<f64>,
}

fn set_timeouts<F: AsFd>(fd: &F, t: Duration) -> io::Result<()> {
    let tv = TimeVal::new(t.as_secs() as i64, t.subsec_micros() as i64);
    socket::setsockopt(fd, sockopt::ReceiveTimeout, &tv)?;
    socket::setsockopt(fd, sockopt::SendTimeout, &tv)?;
    Ok(())
}

/// Sends 64-byte-frame UDP packets from `senders` (connected sockets, one per flow) to
/// `receiver` for `warmup + secs`, counting what arrives within the `secs` window.
fn udp_run(
    senders: Vec<UdpSocket>,
    receiver: UdpSocket,
    warmup: Duration,
    secs: f64,
    cpu_pid: Option<u32>,
) -> Result<UdpRun, String> {
    for s in &senders {
        set_timeouts(s, Duration::from_millis(100)).map_err(|e| e.to_string())?;
    }
    set_timeouts(&receiver, Duration::from_millis(100)).map_err(|e| e.to_string())?;
    let _ = socket::setsockopt(&receiver, sockopt::RcvBufForce, &(8 << 20));
    let start = Instant::now();
    let win0 = start + warmup;
    let win1 = win0 + Duration::from_secs_f64(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let in_window = Arc::new(AtomicU64::new(0));

    let rx = {
        let stop = stop.clone();
        let in_window = in_window.clone();
        std::thread::spawn(move || {
            let fd = receiver.as_raw_fd();
            let mut bufs = vec![[0u8; 256]; BATCH];
            let mut hdrs = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
            let mut n = 0u64;
            // Bounded: the sender stops at win1 + 0.1 s; we stop once told or 5 s past win1.
            while !stop.load(Ordering::Relaxed) && Instant::now() < win1 + Duration::from_secs(5) {
                let mut iovs: Vec<[io::IoSliceMut; 1]> = bufs
                    .iter_mut()
                    .map(|b| [io::IoSliceMut::new(&mut b[..])])
                    .collect();
                let got = match socket::recvmmsg(
                    fd,
                    &mut hdrs,
                    iovs.iter_mut(),
                    MsgFlags::MSG_WAITFORONE,
                    None,
                ) {
                    Ok(r) => r.count() as u64,
                    Err(_) => 0,
                };
                let now = Instant::now();
                if now >= win0 && now < win1 {
                    n += got;
                }
            }
            in_window.store(n, Ordering::SeqCst);
        })
    };

    let tx = std::thread::spawn(move || {
        let payload = [0x5au8; UDP_PAYLOAD];
        let fds: Vec<i32> = senders.iter().map(|s| s.as_raw_fd()).collect();
        let mut hdrs = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
        let iovs: Vec<[io::IoSlice; 1]> =
            (0..BATCH).map(|_| [io::IoSlice::new(&payload)]).collect();
        let addrs: Vec<Option<SockaddrIn>> = vec![None; BATCH];
        let mut sent = 0u64;
        let end = win1 + Duration::from_millis(100);
        let mut i = 0usize;
        loop {
            let now = Instant::now();
            if now >= end || sys::stopping() {
                break;
            }
            let fd = fds[i % fds.len()];
            i += 1;
            if let Ok(r) = socket::sendmmsg(fd, &mut hdrs, &iovs, &addrs, [], MsgFlags::empty()) {
                // Count what was sent within the measuring window only.
                if now >= win0 && now < win1 {
                    sent += r.count() as u64;
                }
            }
        }
        drop(senders);
        sent
    });

    // CPU of the dataplane over the window only.
    sleep_until(win0);
    let cpu0 = cpu_pid.and_then(cpu_seconds);
    sleep_until(win1);
    let cpu = cpu_delta(cpu_pid, cpu0);
    let sent = tx.join().map_err(|_| "sender panicked")?;
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    rx.join().map_err(|_| "receiver panicked")?;
    Ok(UdpRun {
        sent,
        received: in_window.load(Ordering::SeqCst),
        secs,
        cpu,
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn udp_senders(n: usize, target: SocketAddrV4) -> io::Result<Vec<UdpSocket>> {
    (0..n)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(target)?;
            Ok(s)
        })
        .collect()
}

/// UDP packets per second from `src` to `target`, received in `dst` on `port`.
pub fn udp_pps(
    src: &Path,
    dst: &Path,
    port: u16,
    target: SocketAddrV4,
    secs: f64,
    cpu_pid: Option<u32>,
) -> Outcome {
    let receiver =
        in_ns(dst, || UdpSocket::bind(("0.0.0.0", port)))?.map_err(|e| format!("udp sink: {e}"))?;
    let senders = in_ns(src, || udp_senders(UDP_FLOWS, target))?
        .map_err(|e| format!("udp generator: {e}"))?;
    let r = udp_run(senders, receiver, Duration::from_millis(300), secs, cpu_pid)?;
    if r.received == 0 {
        return Err(format!(
            "no UDP packet arrived at {target} ({} sent)",
            r.sent
        ));
    }
    let mut figs = vec![
        ("mpps", r.received as f64 / r.secs / 1e6),
        ("sent_mpps", r.sent as f64 / r.secs / 1e6),
    ];
    if let Some(cpu) = r.cpu {
        figs.push(("cpu_s_per_mpkt", cpu / (r.received as f64 / 1e6)));
    }
    Ok(figs)
}

/// The generator's own ceiling: the same run over loopback in the harness's namespace.
pub fn udp_ceiling(secs: f64) -> Outcome {
    let receiver = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = receiver.local_addr().map_err(|e| e.to_string())?.port();
    let senders = udp_senders(UDP_FLOWS, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
        .map_err(|e| e.to_string())?;
    let r = udp_run(senders, receiver, Duration::from_millis(200), secs, None)?;
    Ok(vec![
        ("sent_mpps", r.sent as f64 / r.secs / 1e6),
        ("mpps", r.received as f64 / r.secs / 1e6),
    ])
}

// ---- TCP request/response latency ----

fn accept_until(l: &TcpListener, deadline: Instant) -> io::Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sys::stopping() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no client"));
        }
        let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
        let ms = left.as_millis().min(100) as u16;
        poll(&mut fds, PollTimeout::from(ms)).map_err(io::Error::from)?;
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn listener(ns: &Path, port: u16) -> Result<TcpListener, String> {
    let l = in_ns(ns, || TcpListener::bind(("0.0.0.0", port)))?
        .map_err(|e| format!("listen on {port}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(l)
}

/// TCP ping-pong of RR_BYTES messages from `src` to `target` (server in `dst` on `port`):
/// p50 and p99 round-trip time in microseconds.
pub fn rr_latency(src: &Path, dst: &Path, port: u16, target: SocketAddrV4, secs: f64) -> Outcome {
    let l = listener(dst, port)?;
    let limit = Duration::from_secs_f64(secs) + Duration::from_secs(10);
    let server = std::thread::spawn(move || -> io::Result<()> {
        let mut s = accept_until(&l, Instant::now() + limit)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; RR_BYTES];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let client = (|| -> Result<Vec<u32>, String> {
        let mut c = in_ns(src, || {
            TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(3))
        })?
        .map_err(|e| format!("connect {target}: {e}"))?;
        c.set_nodelay(true).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let msg = [0x42u8; RR_BYTES];
        let mut buf = [0u8; RR_BYTES];
        let mut rtts = Vec::with_capacity(100_000);
        let warm_end = Instant::now() + Duration::from_millis(200);
        let end = warm_end + Duration::from_secs_f64(secs);
        // Bounded by time and by a count (10 M round trips is more than any path does here).
        for _ in 0..10_000_000u32 {
            let t0 = Instant::now();
            if t0 >= end || sys::stopping() {
                break;
            }
            c.write_all(&msg)
                .and_then(|_| c.read_exact(&mut buf))
                .map_err(|e| format!("round trip to {target}: {e}"))?;
            if t0 >= warm_end {
                rtts.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            }
        }
        Ok(rtts)
    })();
    let served = server.join().map_err(|_| "rr server panicked")?;
    let mut rtts = client?;
    served.map_err(|e| format!("rr server: {e}"))?;
    if rtts.is_empty() {
        return Err("no round trip completed".into());
    }
    rtts.sort_unstable();
    let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p).round() as usize] as f64 / 1e3;
    Ok(vec![("p50_us", pct(0.50)), ("p99_us", pct(0.99))])
}

// ---- NAT connections per second ----

/// Connect / read one byte / close, in a loop from `src` to `target` (server in `dst` on
/// `port` writes a byte and closes first, so the client keeps no TIME_WAIT).
pub fn conn_rate(src: &Path, dst: &Path, port: u16, target: SocketAddrV4, secs: f64) -> Outcome {
    let l = listener(dst, port)?;
    let done = Arc::new(AtomicBool::new(false));
    let hard_end = Instant::now() + Duration::from_secs_f64(secs) + Duration::from_secs(10);
    let server = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut served = 0u64;
            while !done.load(Ordering::Relaxed) && Instant::now() < hard_end {
                let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::from(50u16)).unwrap_or(0) == 0 {
                    continue;
                }
                while let Ok((mut s, _)) = l.accept() {
                    let _ = s.write_all(b"x");
                    served += 1;
                }
            }
            served
        })
    };
    let res = in_ns(src, || {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let (mut ok, mut failed, mut failed_in_row) = (0u64, 0u64, 0u32);
        let mut last_err = String::new();
        let t0 = Instant::now();
        while Instant::now() < end && !sys::stopping() && failed_in_row < 20 {
            let r = (|| -> io::Result<()> {
                let mut c =
                    TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(1))?;
                c.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut b = [0u8; 1];
                c.read_exact(&mut b)?;
                Ok(())
            })();
            match r {
                Ok(()) => {
                    ok += 1;
                    failed_in_row = 0;
                }
                Err(e) => {
                    failed += 1;
                    failed_in_row += 1;
                    last_err = e.to_string();
                }
            }
        }
        (ok, failed, t0.elapsed().as_secs_f64(), last_err)
    });
    done.store(true, Ordering::SeqCst);
    let _ = server.join();
    let (ok, failed, elapsed, last_err) = res?;
    if ok == 0 || failed * 100 > ok {
        return Err(format!(
            "{ok} connections, {failed} failed to {target} (last: {last_err})"
        ));
    }
    Ok(vec![("cps", ok as f64 / elapsed)])
}
