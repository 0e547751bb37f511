//! The L2 switch end to end: real kernel stacks in namespaces, the daemon in its own namespace.
//! Root only; skipped otherwise.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use switchyard_control::netns::{run_in, NetNs};
use switchyard_control::probe;
use switchyard_switch::backend::packet::PacketSocket;

const T: Duration = Duration::from_secs(2);

/// An AF_PACKET socket on `ifname` inside `ns` (the switch's own backend), for sending raw
/// frames and capturing what the container receives.
fn packet_socket(ns: &NetNs, ifname: &str) -> PacketSocket {
    let ifname = ifname.to_string();
    run_in(ns, move || {
        let idx = nix::net::if_::if_nametoindex(ifname.as_str()).unwrap();
        PacketSocket::open(idx).unwrap()
    })
    .unwrap()
}

fn send_raw(s: &PacketSocket, frame: &[u8]) -> std::io::Result<usize> {
    s.write(frame)
}

/// Frames captured on `s` for `dur`.
fn capture(s: &PacketSocket, dur: Duration) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let end = Instant::now() + dur;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(n) => out.push(buf[..n].to_vec()),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    out
}

fn mac_bytes(v: &serde_json::Value) -> [u8; 6] {
    let m: switchyard_switch::MacAddr = v["mac"].as_str().unwrap().parse().unwrap();
    m.0
}

#[test]
fn three_containers_exchange_ping_tcp_and_udp() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let (c1, c2, c3) = (
        env.container("c1"),
        env.container("c2"),
        env.container("c3"),
    );
    let e1 = env.connect("mynet", &c1, &[]);
    let e2 = env.connect("mynet", &c2, &["--type", "veth"]);
    let e3 = env.connect("mynet", &c3, &["--ip", "10.77.0.50"]);
    assert_eq!(ip_of(&e3), Ipv4Addr::new(10, 77, 0, 50));
    assert_eq!(
        ip_of(&e1),
        Ipv4Addr::new(10, 77, 0, 2),
        "first free address"
    );
    assert_eq!(e2["type"], "veth");

    assert_eq!(probe::ping(&c1.ns, ip_of(&e3), 3, T).unwrap().len(), 3);
    assert_eq!(probe::ping(&c2.ns, ip_of(&e1), 3, T).unwrap().len(), 3);
    assert_eq!(probe::ping(&c3.ns, ip_of(&e2), 3, T).unwrap().len(), 3);

    let len = 10 << 20;
    let server = probe::serve_http(&c3.ns, 8000, len, 2).unwrap();
    assert_eq!(probe::http_get(&c1.ns, ip_of(&e3), 8000).unwrap().0, len);
    assert_eq!(probe::http_get(&c2.ns, ip_of(&e3), 8000).unwrap().0, len);
    server.join().unwrap();

    let echo = probe::serve_udp_echo(&c2.ns, 7000, 50).unwrap();
    assert_eq!(probe::udp_echo(&c1.ns, ip_of(&e2), 7000, 50).unwrap(), 50);
    echo.join().unwrap();

    // The daemon's view matches.
    let net = env.json(&["network", "inspect", "mynet"]);
    assert_eq!(net["subnet"], "10.77.0.0/24");
    assert_eq!(net["gateway"], "10.77.0.1");
    let eps = net["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 3);
    for e in eps {
        assert!(e["netns"].as_str().unwrap().starts_with("/run/netns/"));
        assert!(e["mac"].as_str().unwrap().len() == 17);
    }
    let stats = env.json(&["stats"]);
    let c3s = stats["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == "c3")
        .unwrap()
        .clone();
    assert!(
        c3s["rx_bytes"].as_u64().unwrap() > 2 * len as u64,
        "c3 sent both transfers: {c3s}"
    );
    assert!(c3s["tx_packets"].as_u64().unwrap() > 0, "{c3s}");
}

#[test]
fn broadcast_reaches_every_port_of_the_network_only() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    env.ok(&["network", "create", "a", "--subnet", "10.81.0.0/24"]);
    env.ok(&["network", "create", "b", "--subnet", "10.82.0.0/24"]);
    let (a1, a2, a3) = (
        env.container("a1"),
        env.container("a2"),
        env.container("a3"),
    );
    let (b1, b2) = (env.container("b1"), env.container("b2"));
    let ea1 = env.connect("a", &a1, &[]);
    env.connect("a", &a2, &["--type", "veth"]);
    env.connect("a", &a3, &[]);
    let eb1 = env.connect("b", &b1, &[]);
    env.connect("b", &b2, &[]);
    let caps: Vec<PacketSocket> = [&a2, &a3, &b1, &b2]
        .iter()
        .map(|c| packet_socket(&c.ns, "eth0"))
        .collect();
    // Traffic on b at the same time: b1 <-> b2 pings must keep working.
    let b1ns = NetNs::open(&b1.path).unwrap();
    let b2_ip = Ipv4Addr::new(10, 82, 0, 3);
    let bping = std::thread::spawn(move || probe::ping(&b1ns, b2_ip, 5, T));
    // a1 asks for an address nobody has: the ARP broadcasts go to a2 and a3, never to b.
    let _ = probe::ping(
        &a1.ns,
        Ipv4Addr::new(10, 81, 0, 99),
        1,
        Duration::from_millis(1500),
    );
    let a1_mac = mac_bytes(&ea1);
    let seen: Vec<bool> = caps
        .iter()
        .map(|s| {
            capture(s, Duration::from_millis(300)).iter().any(|f| {
                f.len() >= 42
                    && f[6..12] == a1_mac
                    && f[12..14] == [0x08, 0x06]
                    && f[38..42] == [10, 81, 0, 99]
            })
        })
        .collect();
    assert_eq!(
        seen,
        vec![true, true, false, false],
        "ARP seen on a2, a3, b1, b2"
    );
    assert_eq!(bping.join().unwrap().unwrap().len(), 5);
    // a1 cannot reach b1 at all (different network, no route between them).
    assert!(probe::ping(&a1.ns, ip_of(&eb1), 1, Duration::from_millis(500)).is_err());
    // No MAC of network a is known on network b.
    let macs = env.json(&["macs", "b"]);
    assert!(macs.as_array().unwrap().iter().all(|m| m["network"] == "b"));
    assert!(!macs
        .to_string()
        .contains(&ea1["mac"].as_str().unwrap().to_string()));
}

#[test]
fn disconnect_removes_interface_mac_and_address() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let (c1, c2) = (env.container("c1"), env.container("c2"));
    env.connect("mynet", &c1, &[]);
    let e2 = env.connect("mynet", &c2, &["--type", "veth"]);
    let host_if = e2["host_ifname"].as_str().unwrap().to_string();
    assert!(links(&env.host).contains(&host_if));
    assert!(links(&c2.path).contains(&"eth0".to_string()));
    env.ok(&["disconnect", "mynet", "c2"]);
    assert!(
        !links(&c2.path).contains(&"eth0".to_string()),
        "container side gone"
    );
    assert!(!links(&env.host).contains(&host_if), "host side gone");
    let macs = env.json(&["macs", "mynet"]);
    assert!(!macs.to_string().contains(e2["mac"].as_str().unwrap()));
    assert_eq!(
        env.json(&["network", "inspect", "mynet"])["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The address is free again, and the same namespace can join once more (as a tap).
    let again = env.connect("mynet", &c2, &[]);
    assert_eq!(again["ip"], e2["ip"]);
    // Disconnecting twice is a clear error.
    env.ok(&["disconnect", "mynet", "c2"]);
    let e = env.err(&["disconnect", "mynet", "c2"]);
    assert!(e.contains("not found"), "{e}");
}

#[test]
fn learned_entries_age_out() {
    if !root() {
        return;
    }
    let mut env = Env::new(&["--mac-aging", "2"]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let (c1, c2) = (env.container("c1"), env.container("c2"));
    env.connect("mynet", &c1, &[]);
    env.connect("mynet", &c2, &[]);
    // A station behind c1 with its own MAC (as a nested bridge or macvlan would have).
    let s = packet_socket(&c1.ns, "eth0");
    let station = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01];
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&station);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.resize(60, 0);
    send_raw(&s, &f).unwrap();
    let find = |env: &Env| -> Option<serde_json::Value> {
        env.json(&["macs", "mynet"])
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mac"] == "02:aa:bb:cc:dd:01")
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let e = loop {
        if let Some(e) = find(&env) {
            break e;
        }
        assert!(Instant::now() < deadline, "station never learned");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(e["type"], "learned");
    assert_eq!(e["port"], "c1");
    std::thread::sleep(Duration::from_millis(3500));
    assert!(find(&env).is_none(), "aged out after 2 s");
    // Static entries do not age.
    assert_eq!(env.json(&["macs", "mynet"]).as_array().unwrap().len(), 3);
}

#[test]
fn daemon_survives_a_burst_of_malformed_frames() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let (c1, c2) = (env.container("c1"), env.container("c2"));
    env.connect("mynet", &c1, &[]);
    let e2 = env.connect("mynet", &c2, &["--type", "veth"]);
    for c in [&c1, &c2] {
        let s = packet_socket(&c.ns, "eth0");
        let mut x: u64 = 0x1234_5678_9abc_def0;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..3000 {
            let len = match i % 5 {
                0 => (next() % 14) as usize, // runts
                _ => 14 + (next() % 1500) as usize,
            };
            let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 5 == 1 && f.len() >= 12 {
                f[6..12].copy_from_slice(&[0; 6]); // zero source
            }
            if i % 5 == 2 && f.len() >= 12 {
                f[6] |= 1; // multicast source
            }
            let _ = send_raw(&s, &f);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    // Still forwarding, still answering.
    assert_eq!(probe::ping(&c1.ns, ip_of(&e2), 2, T).unwrap().len(), 2);
    let stats = env.json(&["stats"]);
    let drops: u64 = stats["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["drops"]["invalid_source_mac"].as_u64())
        .sum();
    assert!(
        drops >= 1000,
        "multicast/zero sources dropped and counted: {stats}"
    );
}

#[test]
fn capture_writes_a_pcap_that_tcpdump_reads() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.77.0.0/24"]);
    let (c1, c2) = (env.container("c1"), env.container("c2"));
    let e1 = env.connect("mynet", &c1, &[]);
    let e2 = env.connect("mynet", &c2, &["--type", "veth"]);
    let file = env.dir.join("c1.pcap");
    let mut cap = std::process::Command::new(BIN)
        .arg("--socket")
        .arg(&env.socket)
        .args(["capture", "mynet", "c1", "-c", "20", "-w"])
        .arg(&file)
        .spawn()
        .unwrap();
    // Wait until the daemon has the capture running.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env.log().contains("capture started") {
        assert!(Instant::now() < deadline, "capture did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // 10 echo requests and 10 replies (ARP is already resolved by a first ping).
    probe::ping(&c1.ns, ip_of(&e2), 1, T).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(10);
    while cap.try_wait().unwrap().is_none() {
        let _ = probe::ping(&c1.ns, ip_of(&e2), 1, T);
        assert!(Instant::now() < deadline, "capture never reached 20 frames");
    }
    // Our own reader: every frame is c1's, both directions present.
    let mut r = pcap_file::pcap::PcapReader::new(std::fs::File::open(&file).unwrap()).unwrap();
    let mac1 = mac_bytes(&e1);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    while let Some(p) = r.next_packet() {
        frames.push(p.unwrap().data.into_owned());
    }
    assert_eq!(frames.len(), 20);
    // c1 also receives what c2 floods (its IPv6 multicast, an ARP broadcast): group-addressed
    // frames belong to c1's traffic too.
    assert!(frames
        .iter()
        .all(|f| f[0..6] == mac1 || f[6..12] == mac1 || f[0] & 1 == 1));
    assert!(frames.iter().any(|f| f[6..12] == mac1) && frames.iter().any(|f| f[0..6] == mac1));
    // tcpdump reads it too.
    let o = std::process::Command::new("tcpdump")
        .args(["-nr"])
        .arg(&file)
        .output();
    match o {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert!(
                text.contains("ICMP echo request") && text.contains("ICMP echo reply"),
                "{text}"
            );
        }
        Err(e) => panic!("tcpdump is needed for this test (.ci/run installs it): {e}"),
    }
    // A capture of an unknown endpoint is a clear error.
    assert!(env
        .err(&["capture", "mynet", "nope", "-c", "1"])
        .contains("not found"));
}
