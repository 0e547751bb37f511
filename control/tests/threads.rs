//! The dataplane with two worker threads (`--threads 2`): traffic between several containers,
//! through the NAT and into a published port works, both workers carry frames, a flow's frames
//! keep their order, and the counters lose no increment between the threads. Root only.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use switchyard_control::netns::run_in;
use switchyard_control::probe;

const EXT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const UPLINK: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// (frames read by each worker, ports each reads) from `stats`.
fn workers(env: &Env) -> (Vec<u64>, Vec<u64>) {
    let s = env.json(&["stats"]);
    let d = &s["dataplane"];
    let w = d["workers"].as_array().unwrap_or_else(|| panic!("{s}"));
    assert_eq!(d["threads"].as_u64(), Some(w.len() as u64), "{d}");
    (
        w.iter().map(|w| w["frames"].as_u64().unwrap()).collect(),
        w.iter().map(|w| w["ports"].as_u64().unwrap()).collect(),
    )
}

#[test]
fn two_workers_carry_traffic_between_containers_and_through_the_nat() {
    if !root() {
        return;
    }
    let mut env = Env::prepare(&[&UPLINK_ARGS[..], &["--threads", "2"]].concat());
    let ext = env.outside();
    env.start_daemon();
    env.ok(&["network", "create", "mynet", "--subnet", "10.78.0.0/24"]);
    let cs: Vec<Container> = (1..=4).map(|i| env.container(&format!("c{i}"))).collect();
    let mut ips = Vec::new();
    for (i, c) in cs.iter().enumerate() {
        let mut extra = vec!["--type", if i % 2 == 0 { "tap" } else { "veth" }];
        if i == 3 {
            extra.extend_from_slice(&["-p", "8080:80"]);
        }
        ips.push(ip_of(&env.connect("mynet", c, &extra)));
    }
    let (_, ports) = workers(&env);
    assert_eq!(ports, [2, 2], "ports are spread over the workers");

    // Container to container, both ways across the workers (c1, c2 on different ones).
    let srv = probe::serve_http(&cs[1].ns, 8000, 4 << 20, 1).unwrap();
    assert_eq!(probe::http_get(&cs[0].ns, ips[1], 8000).unwrap().0, 4 << 20);
    srv.join().unwrap();
    let srv = probe::serve_http(&cs[2].ns, 8000, 4 << 20, 1).unwrap();
    assert_eq!(probe::http_get(&cs[3].ns, ips[2], 8000).unwrap().0, 4 << 20);
    srv.join().unwrap();
    // Through the NAT, from every container at once.
    let srv = probe::serve_http(&ext.ns, 8001, 2 << 20, cs.len()).unwrap();
    let gets: Vec<_> = cs
        .iter()
        .map(|c| {
            let ns = switchyard_control::netns::NetNs::open(&c.path).unwrap();
            std::thread::spawn(move || probe::http_get(&ns, EXT, 8001).map(|r| r.0))
        })
        .collect();
    for g in gets {
        assert_eq!(g.join().unwrap(), Ok(2 << 20), "{}", env.log());
    }
    srv.join().unwrap();
    // From outside into the published port.
    let srv = probe::serve_http(&cs[3].ns, 80, 2 << 20, 1).unwrap();
    assert_eq!(probe::http_get(&ext.ns, UPLINK, 8080).unwrap().0, 2 << 20);
    srv.join().unwrap();

    let (frames, _) = workers(&env);
    assert!(
        frames.iter().all(|f| *f > 100),
        "both workers carried frames: {frames:?}"
    );
}

/// Port rx counters summed over the endpoints (the gateway's are the router's, not read).
fn endpoint_rx(stats: &Value) -> u64 {
    stats["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["port"] != "gateway")
        .map(|p| p["rx_packets"].as_u64().unwrap())
        .sum()
}

#[test]
fn a_flow_keeps_its_order_and_counters_lose_nothing_across_workers() {
    if !root() {
        return;
    }
    // No raw uplink: every frame a worker reads comes from an endpoint port.
    let mut env = Env::new(&["--threads", "2"]);
    env.ok(&["network", "create", "mynet", "--subnet", "10.79.0.0/24"]);
    let cs: Vec<Container> = (1..=4).map(|i| env.container(&format!("c{i}"))).collect();
    let ips: Vec<Ipv4Addr> = cs
        .iter()
        .map(|c| ip_of(&env.connect("mynet", c, &[])))
        .collect();
    // Two numbered UDP streams at once, c1 -> c2 and c4 -> c3, crossing between the workers:
    // what arrives arrives in the order sent.
    const N: u32 = 3000;
    // The sender keeps at most WINDOW datagrams ahead of what its receiver has taken (both
    // run in this process), so a loaded machine slows the stream instead of dropping it; a
    // window with no progress for 50 ms is given up on (a loss), so a drop cannot stall it.
    const WINDOW: u32 = 128;
    let recv = |i: usize, seen: Arc<AtomicU32>| {
        let s = run_in(&cs[i].ns, || UdpSocket::bind(("0.0.0.0", 9000)))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut b = [0u8; 64];
            while let Ok(n) = s.recv(&mut b) {
                if n == 4 {
                    let k = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                    got.push(k);
                    seen.store(k + 1, Ordering::Release);
                }
            }
            got
        })
    };
    let send = |i: usize, to: Ipv4Addr, seen: Arc<AtomicU32>| {
        let ns = switchyard_control::netns::NetNs::open(&cs[i].path).unwrap();
        std::thread::spawn(move || {
            run_in(&ns, || {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                // The first datagram waits for ARP; later ones are sent once it has arrived.
                // Sent meanwhile, they would race the kernel's flush of its queue of unresolved
                // packets and be reordered inside the sender's stack, before the dataplane.
                let _ = s.send_to(&0u32.to_be_bytes(), (to, 9000));
                let arp = Instant::now();
                while seen.load(Ordering::Acquire) == 0 && arp.elapsed() < Duration::from_secs(2) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                for k in 1..N {
                    let stalled = Instant::now();
                    while k >= seen.load(Ordering::Acquire) + WINDOW
                        && stalled.elapsed() < Duration::from_millis(50)
                    {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    let _ = s.send_to(&k.to_be_bytes(), (to, 9000));
                }
            })
            .unwrap()
        })
    };
    let (seen2, seen3) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (r2, r3) = (recv(1, seen2.clone()), recv(2, seen3.clone()));
    let (s1, s4) = (send(0, ips[1], seen2), send(3, ips[2], seen3));
    s1.join().unwrap();
    s4.join().unwrap();
    for r in [r2, r3] {
        let got = r.join().unwrap();
        assert!(got.len() as u32 > N / 2, "{} of {N} arrived", got.len());
        assert!(got.windows(2).all(|w| w[0] < w[1]), "reordered: {got:?}");
    }
    // Every frame a worker read was counted once by the switch (taken under the lock, from
    // both threads). A frame in flight between the read and the lock can make one reading
    // uneven: the figures must meet once the containers are quiet.
    let mut last = (0, 0);
    for _ in 0..50 {
        let s = env.json(&["stats"]);
        let frames: u64 = s["dataplane"]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["frames"].as_u64().unwrap())
            .sum();
        last = (frames, endpoint_rx(&s));
        if last.0 == last.1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(last.0, last.1, "frames read vs counted by the switch");
    assert!(last.0 >= u64::from(N), "{last:?}");
    let (frames, _) = workers(&env);
    assert!(frames.iter().all(|f| *f > 0), "{frames:?}");
    // Idle, the workers block: no spinning once the traffic and its busy-poll windows are over.
    let cpu = || {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", env.daemon_pid())).unwrap();
        let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu();
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu() - before;
    assert!(used <= 30, "an idle daemon used {used} CPU ticks in 3 s");
}
