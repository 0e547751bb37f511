//! Gateway and NAT end to end with the raw uplink: an "outside" namespace (192.0.2.1/24) joined
//! to the daemon's namespace by a veth the daemon owns through AF_PACKET, holding 192.0.2.10 in
//! userspace. Real kernel TCP/UDP/ICMP on both sides. Root only; skipped otherwise.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use switchyard_control::netns::{run_in, NetNs};
use switchyard_control::probe;

const EXT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const UPLINK: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
fn nat_env(extra: &[&str]) -> (Env, Container) {
    let mut args: Vec<&str> = UPLINK_ARGS.to_vec();
    args.extend_from_slice(extra);
    let mut env = Env::prepare(&args);
    let ext = env.outside();
    env.start_daemon();
    (env, ext)
}

/// A TCP server in `ns` that answers each connection with the peer address it saw.
fn tell_peer_tcp(ns: &NetNs, port: u16, conns: usize) -> std::thread::JoinHandle<Vec<SocketAddr>> {
    let l = run_in(ns, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..conns {
            let Ok((mut s, peer)) = l.accept() else { break };
            let _ = writeln!(s, "{peer}");
            seen.push(peer);
        }
        seen
    })
}

/// Connect from `ns` to `dst:port`; returns the line the server wrote.
fn ask_tcp(ns: &NetNs, dst: Ipv4Addr, port: u16) -> Result<String, String> {
    run_in(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(3))
                .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut l = String::new();
        BufReader::new(&mut s)
            .read_line(&mut l)
            .map_err(|e| e.to_string())?;
        Ok(l.trim().to_string())
    })
    .unwrap()
}

fn tell_peer_udp(ns: &NetNs, port: u16, n: usize) -> std::thread::JoinHandle<()> {
    let s = run_in(ns, move || UdpSocket::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        for _ in 0..n {
            let Ok((_, from)) = s.recv_from(&mut buf) else {
                return;
            };
            let _ = s.send_to(from.to_string().as_bytes(), from);
        }
    })
}

fn ask_udp(ns: &NetNs, dst: Ipv4Addr, port: u16) -> Result<String, String> {
    run_in(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect((dst, port)).unwrap();
        s.send(b"who am i").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 200];
        let n = s.recv(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).to_string())
    })
    .unwrap()
}

fn peer_ip(s: &str) -> Ipv4Addr {
    s.parse::<SocketAddr>()
        .ok()
        .and_then(|a| match a {
            SocketAddr::V4(v) => Some(*v.ip()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("not an address: {s:?}"))
}

#[test]
fn outbound_tcp_udp_and_ping_are_masqueraded() {
    if !root() {
        return;
    }
    let (mut env, ext) = nat_env(&[]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let c1 = env.container("c1");
    let c2 = env.container("c2");
    env.connect("mynet", &c1, &[]);
    env.connect("mynet", &c2, &["--type", "veth"]);
    assert_eq!(
        probe::ping(
            &c1.ns,
            Ipv4Addr::new(10, 77, 0, 1),
            1,
            Duration::from_secs(2)
        )
        .unwrap()
        .len(),
        1
    );
    assert_eq!(
        probe::ping(&c1.ns, EXT, 3, Duration::from_secs(2))
            .unwrap()
            .len(),
        3,
        "{}",
        env.log()
    );
    let srv = tell_peer_tcp(&ext.ns, 8000, 2);
    for c in [&c1, &c2] {
        let seen = ask_tcp(&c.ns, EXT, 8000).unwrap();
        assert_eq!(
            peer_ip(&seen),
            UPLINK,
            "the outside sees the uplink address"
        );
    }
    srv.join().unwrap();
    let u = tell_peer_udp(&ext.ns, 5300, 1);
    assert_eq!(peer_ip(&ask_udp(&c2.ns, EXT, 5300).unwrap()), UPLINK);
    u.join().unwrap();
    // A larger transfer, content checked, through the NAT.
    let http = probe::serve_http(&ext.ns, 8001, 4 << 20, 1).unwrap();
    assert_eq!(probe::http_get(&c1.ns, EXT, 8001).unwrap().0, 4 << 20);
    http.join().unwrap();
    let ct = env.json(&["conntrack"]);
    let protos: Vec<String> = ct
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["proto"].to_string())
        .collect();
    assert!(
        protos.iter().any(|p| p.contains("tcp")) && protos.iter().any(|p| p.contains("udp")),
        "{ct}"
    );
}

#[test]
fn published_ports_keep_the_client_address_and_hairpin_works() {
    if !root() {
        return;
    }
    let (mut env, ext) = nat_env(&[]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let (c1, c2) = (env.container("c1"), env.container("c2"));
    let e1 = env.connect("mynet", &c1, &["-p", "8080:80", "-p", "5353:53/udp"]);
    env.connect("mynet", &c2, &[]);
    assert_eq!(e1["ports"].as_array().unwrap().len(), 2);
    let srv = tell_peer_tcp(&c1.ns, 80, 2);
    let seen = ask_tcp(&ext.ns, UPLINK, 8080).unwrap();
    assert_eq!(peer_ip(&seen), EXT, "the container sees the real client");
    // Hairpin: c2 reaches c1 through the published port on the uplink address.
    let seen = ask_tcp(&c2.ns, UPLINK, 8080).unwrap();
    assert_eq!(
        peer_ip(&seen),
        Ipv4Addr::new(10, 77, 0, 1),
        "hairpin is masqueraded to the gateway"
    );
    srv.join().unwrap();
    let u = tell_peer_udp(&c1.ns, 53, 1);
    assert_eq!(peer_ip(&ask_udp(&ext.ns, UPLINK, 5353).unwrap()), EXT);
    u.join().unwrap();

    // publish / port / unpublish at run time.
    env.ok(&["publish", "mynet", "c1", "9000:9000"]);
    let ports = env.json(&["port", "mynet", "c1"]);
    assert_eq!(ports.as_array().unwrap().len(), 3, "{ports}");
    assert!(env
        .ok(&["port", "mynet", "c1"])
        .contains("9000/tcp -> 0.0.0.0:9000"));
    let srv = tell_peer_tcp(&c1.ns, 9000, 1);
    assert_eq!(peer_ip(&ask_tcp(&ext.ns, UPLINK, 9000).unwrap()), EXT);
    srv.join().unwrap();
    assert!(env
        .err(&["publish", "mynet", "c2", "9000:9000"])
        .contains("already published"));
    env.ok(&["unpublish", "mynet", "c1", "9000:9000"]);
    assert_eq!(
        env.json(&["port", "mynet", "c1"]).as_array().unwrap().len(),
        2
    );
    let _keep = run_in(&c1.ns, || TcpListener::bind(("0.0.0.0", 9000)))
        .unwrap()
        .unwrap();
    assert!(
        ask_tcp(&ext.ns, UPLINK, 9000).is_err(),
        "closed after unpublish"
    );
    // Outside traffic for a container's private address goes nowhere.
    assert!(ask_tcp(&ext.ns, Ipv4Addr::new(10, 77, 0, 2), 80).is_err());
}

#[test]
fn udp_to_a_closed_port_gets_port_unreachable_inside() {
    if !root() {
        return;
    }
    let (mut env, _ext) = nat_env(&[]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let c1 = env.container("c1");
    env.connect("mynet", &c1, &[]);
    let r = run_in(&c1.ns, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect((EXT, 9)).unwrap();
        s.send(b"anyone?").unwrap();
        let mut b = [0u8; 16];
        s.recv(&mut b)
    })
    .unwrap();
    let e = r.expect_err("no answer expected");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "ICMP port unreachable translated back: {e}"
    );
}

#[test]
fn ten_thousand_concurrent_outbound_connections_never_collide() {
    if !root() {
        return;
    }
    let _ =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 65536, 65536);
    let (mut env, ext) = nat_env(&[]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let c1 = env.container("c1");
    env.connect("mynet", &c1, &[]);
    const N: usize = 10_000;
    // The server runs as its own process (python3): each side holds 10,000 sockets, and one
    // process may only have 20,000 fds here.
    let script = format!(
        "import socket\n\
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
s.bind(('0.0.0.0', 7000)); s.listen(4096)\n\
print('ready', flush=True)\n\
held = [s.accept() for _ in range({N})]\n\
print('\\n'.join('%s:%d' % a for _, a in held), flush=True)\n"
    );
    let mut server = std::process::Command::new(BIN)
        .args([
            "__in-netns",
            ext.path.to_str().unwrap(),
            "--",
            "python3",
            "-c",
            &script,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert_eq!(l.trim(), "ready");
    let clients = run_in(&c1.ns, || {
        let mut v = Vec::with_capacity(N);
        for i in 0..N {
            match TcpStream::connect_timeout(&SocketAddr::from((EXT, 7000)), Duration::from_secs(5))
            {
                Ok(s) => v.push(s),
                Err(e) => panic!("connection {i}: {e}"),
            }
        }
        v
    })
    .unwrap();
    let mut peers: Vec<String> = out.lines().take(N).map(|l| l.unwrap()).collect();
    let _ = server.wait();
    assert_eq!(peers.len(), N);
    assert!(peers.iter().all(|p| peer_ip(p) == UPLINK));
    peers.sort();
    peers.dedup();
    assert_eq!(peers.len(), N, "every flow has its own external port");
    assert!(env.json(&["conntrack"]).as_array().unwrap().len() >= N);
    drop(clients);
}

#[test]
fn conntrack_entries_expire_and_a_full_table_spares_established_flows() {
    if !root() {
        return;
    }
    let (mut env, ext) = nat_env(&[
        "--conntrack-max",
        "4",
        "--conntrack-timeout",
        "udp_unreplied=2",
        "--conntrack-timeout",
        "udp_assured=2",
    ]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let c1 = env.container("c1");
    env.connect("mynet", &c1, &[]);
    // UDP flow: tracked, then gone after its short timeout.
    let u = tell_peer_udp(&ext.ns, 5300, 1);
    ask_udp(&c1.ns, EXT, 5300).unwrap();
    u.join().unwrap();
    let is_udp = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .any(|e| e.to_string().contains("udp"))
    };
    assert!(is_udp(&env.json(&["conntrack"])));
    std::thread::sleep(Duration::from_millis(3500));
    assert!(!is_udp(&env.json(&["conntrack"])), "expired after 2 s");

    // Four established TCP flows fill the table; a fifth is refused; the four keep working.
    let l = run_in(&ext.ns, || TcpListener::bind(("0.0.0.0", 7100)))
        .unwrap()
        .unwrap();
    let echo = std::thread::spawn(move || {
        let mut hs = Vec::new();
        for _ in 0..4 {
            let (mut s, _) = l.accept().unwrap();
            hs.push(std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            }));
        }
        hs
    });
    let mut flows: Vec<TcpStream> = run_in(&c1.ns, || {
        (0..4)
            .map(|_| {
                TcpStream::connect_timeout(&SocketAddr::from((EXT, 7100)), Duration::from_secs(3))
                    .unwrap()
            })
            .collect()
    })
    .unwrap();
    let fifth = run_in(&c1.ns, || {
        TcpStream::connect_timeout(&SocketAddr::from((EXT, 7100)), Duration::from_secs(1))
    })
    .unwrap();
    assert!(fifth.is_err(), "table full: the new flow is dropped");
    for (i, f) in flows.iter_mut().enumerate() {
        f.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let msg = format!("flow {i}");
        f.write_all(msg.as_bytes()).unwrap();
        let mut b = vec![0u8; msg.len()];
        f.read_exact(&mut b).unwrap();
        assert_eq!(b, msg.as_bytes());
    }
    assert!(
        env.ok(&["stats", "--json"]).contains("table_full"),
        "counted"
    );
    drop(flows);
    for h in echo.join().unwrap() {
        let _ = h.join();
    }
}

#[test]
fn internal_networks_have_no_way_out_and_networks_are_isolated() {
    if !root() {
        return;
    }
    let (mut env, _ext) = nat_env(&[]);
    env.ok(&[
        "network",
        "create",
        "inside",
        "--subnet",
        "10.60.0.0/24",
        "--internal",
    ]);
    env.ok(&["network", "create", "other", "--subnet", "10.61.0.0/24"]);
    let (a, b) = (env.container("a"), env.container("b"));
    env.connect("inside", &a, &[]);
    let eb = env.connect("other", &b, &[]);
    let t = Duration::from_millis(700);
    assert!(probe::ping(&a.ns, EXT, 1, t).is_err(), "internal: no NAT");
    assert!(
        probe::ping(&a.ns, ip_of(&eb), 1, t).is_err(),
        "no route between networks"
    );
    assert!(probe::ping(&b.ns, Ipv4Addr::new(10, 60, 0, 2), 1, t).is_err());
    assert_eq!(
        probe::ping(&b.ns, EXT, 1, Duration::from_secs(2))
            .unwrap()
            .len(),
        1
    );
    let _ = Instant::now();
    assert!(env.ok(&["stats", "--json"]).contains("inter_network"));
}

/// A TCP sink in `ns` on `port`: reads one connection to its end and checks the bytes are
/// the probe pattern; returns how many it got.
fn sink_tcp(ns: &NetNs, port: u16) -> std::thread::JoinHandle<Result<usize, String>> {
    let l = run_in(ns, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0usize;
        loop {
            let k = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if k == 0 {
                return Ok(n);
            }
            if let Some(i) = (0..k).find(|i| buf[*i] != probe::pattern(n + i)) {
                return Err(format!("byte {} differs", n + i));
            }
            n += k;
        }
    })
}

/// Send `len` pattern bytes from `ns` to `dst:port`, then close.
fn upload_tcp(ns: &NetNs, dst: Ipv4Addr, port: u16, len: usize) -> Result<(), String> {
    run_in(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(3))
                .map_err(|e| format!("connect {dst}:{port}: {e}"))?;
        let data: Vec<u8> = (0..len).map(probe::pattern).collect();
        s.write_all(&data).map_err(|e| format!("write: {e}"))
    })
    .map_err(|e| e.to_string())
    .and_then(|r| r)
}

#[test]
fn large_transfers_through_the_nat_are_byte_exact_with_vnet_taps() {
    if !root() {
        return;
    }
    const LEN: usize = 16 << 20;
    let (mut env, ext) = nat_env(&[]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let (c1, c2) = (env.container("c1"), env.container("c2"));
    // Tap endpoints (the default), which take and hand over TSO super-frames.
    env.connect("mynet", &c1, &["-p", "8080:80", "-p", "8081:81"]);
    env.connect("mynet", &c2, &[]);
    // Masquerade, both ways: the outside sends to c1, c1 sends to the outside.
    let http = probe::serve_http(&ext.ns, 8001, LEN, 1).unwrap();
    assert_eq!(probe::http_get(&c1.ns, EXT, 8001).unwrap().0, LEN);
    http.join().unwrap();
    let sink = sink_tcp(&ext.ns, 8002);
    upload_tcp(&c1.ns, EXT, 8002, LEN).unwrap();
    assert_eq!(sink.join().unwrap(), Ok(LEN), "{}", env.log());
    // A published port, both ways, and hairpin from c2.
    let http = probe::serve_http(&c1.ns, 80, LEN, 2).unwrap();
    assert_eq!(probe::http_get(&ext.ns, UPLINK, 8080).unwrap().0, LEN);
    assert_eq!(probe::http_get(&c2.ns, UPLINK, 8080).unwrap().0, LEN);
    http.join().unwrap();
    let sink = sink_tcp(&c1.ns, 81);
    upload_tcp(&ext.ns, UPLINK, 8081, LEN).unwrap();
    assert_eq!(sink.join().unwrap(), Ok(LEN));
    let sink = sink_tcp(&c1.ns, 81);
    upload_tcp(&c2.ns, UPLINK, 8081, LEN).unwrap();
    assert_eq!(sink.join().unwrap(), Ok(LEN));
    // The super-frames crossed the NAT whole (the kernel hands them over on these paths).
    let stats = env.json(&["stats"]);
    let whole = stats["nat"]["gso_translated"].as_u64().unwrap();
    assert!(whole > 0, "no GSO frame translated whole: {stats}");
}
