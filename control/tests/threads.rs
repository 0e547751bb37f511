//! The dataplane with two worker threads (`--threads 2`): traffic between several containers,
//! through the NAT and into a published port works, both workers carry frames, a flow's frames
//! keep their order, and the counters lose no increment between the threads. Ports follow
//! their conversations: a pair that talks ends up on one worker, independent pairs on
//! different ones, a port talking through the NAT on worker 0 (the uplink's), and a stream
//! keeps its order across the move. Root only.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
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

/// The worker that reads each named endpoint port, and the migrations so far, from `stats`.
fn placement(env: &Env, names: &[&str]) -> (Vec<u64>, u64) {
    let s = env.json(&["stats"]);
    let ports = s["ports"].as_array().unwrap_or_else(|| panic!("{s}"));
    let w = names
        .iter()
        .map(|n| {
            let p = ports.iter().find(|p| p["port"] == *n);
            p.and_then(|p| p["worker"].as_u64())
                .unwrap_or_else(|| panic!("no worker for {n}: {s}"))
        })
        .collect();
    (w, s["dataplane"]["migrations"].as_u64().unwrap())
}

/// Wait (generously: the move is planned once a second) until `ok` holds for the workers of
/// `names`; panics with the last placement otherwise.
fn wait_placement(env: &Env, names: &[&str], what: &str, ok: impl Fn(&[u64]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (w, m) = placement(env, names);
        if ok(&w) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: workers of {names:?} still {w:?} after {m} migrations\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The containers of a test and their addresses.
type Containers = (Vec<Container>, Vec<Ipv4Addr>);

/// A daemon with two workers (with `uplink`, a raw uplink to the outside namespace, returned
/// too), network `mynet` on `subnet` and `n` containers connected to it in order, container
/// `i` with the extra `connect` arguments `extra(i)`.
fn two_workers(
    subnet: &str,
    n: usize,
    uplink: bool,
    extra: impl Fn(usize) -> &'static [&'static str],
) -> (Env, Option<Container>, Containers) {
    let mut env = Env::prepare(&["--threads", "2"]);
    let ext = uplink.then(|| {
        env.set_extra(&[&UPLINK_ARGS[..], &["--threads", "2"]].concat());
        env.outside()
    });
    env.start_daemon();
    env.ok(&["network", "create", "mynet", "--subnet", subnet]);
    let cs: Vec<Container> = (1..=n).map(|i| env.container(&format!("c{i}"))).collect();
    let ips = cs
        .iter()
        .enumerate()
        .map(|(i, c)| ip_of(&env.connect("mynet", c, extra(i))))
        .collect();
    (env, ext, (cs, ips))
}

/// Numbered datagrams (a 4-byte big-endian count) taken on port 9000 in `c`, in arrival
/// order, until none comes for `idle`; `seen` is one past the last number taken.
fn numbered_receiver(c: &Container, seen: Arc<AtomicU32>, idle: Duration) -> JoinHandle<Vec<u32>> {
    let s = run_in(&c.ns, || UdpSocket::bind(("0.0.0.0", 9000)))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(idle)).unwrap();
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
}

/// Send datagram 0 and wait (up to 2 s) until it arrived. The first datagram waits for ARP;
/// later ones sent meanwhile would race the kernel's flush of its queue of unresolved packets
/// and be reordered inside the sender's stack, before the dataplane.
fn first_after_arp(s: &UdpSocket, to: SocketAddrV4, seen: &AtomicU32) {
    let _ = s.send_to(&0u32.to_be_bytes(), to);
    let arp = Instant::now();
    while seen.load(Ordering::Acquire) == 0 && arp.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A UDP conversation: a client sends a datagram to `to` and waits for its echo from a server
/// on `port`, over and over, until dropped.
struct Talk {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl Talk {
    fn start(client: &Container, server: &Container, port: u16, to: SocketAddrV4) -> Talk {
        let srv = run_in(&server.ns, || UdpSocket::bind(("0.0.0.0", port)))
            .unwrap()
            .unwrap();
        let cl = run_in(&client.ns, || UdpSocket::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        for s in [&srv, &cl] {
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let echo = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            let mut n = 0;
            while !st.load(Ordering::Relaxed) {
                if let Ok((len, from)) = srv.recv_from(&mut b) {
                    let _ = srv.send_to(&b[..len], from);
                    n += 1;
                }
            }
            n
        });
        let st = stop.clone();
        let ask = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            let mut n = 0;
            while !st.load(Ordering::Relaxed) {
                let _ = cl.send_to(b"ping", to);
                if cl.recv(&mut b).is_ok() {
                    n += 1;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            n
        });
        Talk {
            stop,
            threads: vec![echo, ask],
        }
    }

    /// Stop; the echoes the client got.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut got = 0;
        for t in self.threads.drain(..) {
            got = t.join().unwrap();
        }
        got
    }
}

impl Drop for Talk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_talking_pair_shares_a_worker_and_independent_pairs_spread() {
    if !root() {
        return;
    }
    let (env, _, (cs, ips)) = two_workers("10.80.0.0/24", 4, false, |i| {
        if i < 2 {
            &["--type", "tap"]
        } else {
            &["--type", "veth"]
        }
    });
    let names = ["c1", "c2", "c3", "c4"];
    // Attached by fewest ports: each pair starts split over the two workers.
    let (w, m) = placement(&env, &names);
    assert!(w[0] != w[1] && w[2] != w[3] && m == 0, "{w:?} {m}");

    let one = Talk::start(&cs[0], &cs[1], 7000, SocketAddrV4::new(ips[1], 7000));
    wait_placement(&env, &names, "c1-c2 together", |w| w[0] == w[1]);
    let two = Talk::start(&cs[2], &cs[3], 7000, SocketAddrV4::new(ips[3], 7000));
    let apart = |w: &[u64]| w[0] == w[1] && w[2] == w[3] && w[0] != w[2];
    wait_placement(&env, &names, "c3-c4 together, apart from c1-c2", apart);
    // Settled: both workers carry their pair's frames.
    let (before, _) = workers(&env);
    std::thread::sleep(Duration::from_secs(1));
    let (after, _) = workers(&env);
    let (w, m) = placement(&env, &names);
    assert!(apart(&w), "the pairs stayed put: {w:?}");
    assert!(m >= 2, "{m} migrations");
    // The table says it too.
    let table = env.ok(&["stats"]);
    let shown = table
        .lines()
        .find_map(|l| l.strip_prefix("dataplane: threads=2 migrations="))
        .and_then(|r| r.split(';').next()?.parse::<u64>().ok());
    assert!(shown.is_some_and(|n| n >= m), "{table}");
    assert!(
        before.iter().zip(&after).all(|(b, a)| a - b > 100),
        "both workers carry frames: {before:?} -> {after:?}"
    );
    assert!(one.finish() > 100 && two.finish() > 100);
}

#[test]
fn ports_talking_through_the_nat_or_a_published_port_move_to_worker_0() {
    if !root() {
        return;
    }
    let (env, ext, (cs, _)) = two_workers("10.81.0.0/24", 3, true, |i| {
        if i == 2 {
            &["-p", "8080:80/udp"]
        } else {
            &[]
        }
    });
    let ext = ext.unwrap();
    let names = ["c1", "c3"];
    // Worker 0 counts one port more (the uplink): c1 and c3 start on worker 1.
    assert_eq!(placement(&env, &names).0, [1, 1]);
    let snat = Talk::start(&cs[0], &ext, 9000, SocketAddrV4::new(EXT, 9000));
    wait_placement(&env, &names, "c1 (SNAT) on worker 0", |w| w[0] == 0);
    assert!(snat.finish() > 100);
    let publ = Talk::start(&ext, &cs[2], 80, SocketAddrV4::new(UPLINK, 8080));
    wait_placement(&env, &names, "c3 (published) on worker 0", |w| w == [0, 0]);
    assert!(publ.finish() > 100);
}

#[test]
fn a_stream_keeps_its_order_and_loses_nothing_across_a_move() {
    if !root() {
        return;
    }
    let (env, _, (cs, ips)) = two_workers("10.82.0.0/24", 2, false, |_| &[]);
    let names = ["c1", "c2"];
    assert_ne!(placement(&env, &names).0[0], placement(&env, &names).0[1]);
    // c1 streams numbered datagrams to c2, at most WINDOW ahead of what c2 has taken (both
    // run in this process), so no socket buffer overflows: every datagram must arrive, in
    // order, also while the ports change workers. It streams on for a while after the move.
    const WINDOW: u32 = 64;
    let seen = Arc::new(AtomicU32::new(0));
    let moved = Arc::new(AtomicBool::new(false));
    let recv = numbered_receiver(&cs[1], seen.clone(), Duration::from_secs(2));
    let tx = run_in(&cs[0].ns, || UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    let (sseen, smoved) = (seen.clone(), moved.clone());
    let send = std::thread::spawn(move || {
        let to = SocketAddrV4::new(ips[1], 9000);
        let start = Instant::now();
        first_after_arp(&tx, to, &sseen);
        let mut k = 1u32;
        let mut after = None;
        while start.elapsed() < Duration::from_secs(60) {
            if after.is_none() && smoved.load(Ordering::Acquire) {
                after = Some(k);
            }
            if after.is_some_and(|a| k >= a + 20_000) {
                break;
            }
            let stalled = Instant::now();
            while k >= sseen.load(Ordering::Acquire) + WINDOW
                && stalled.elapsed() < Duration::from_secs(1)
            {
                std::thread::yield_now();
            }
            let _ = tx.send_to(&k.to_be_bytes(), to);
            k += 1;
        }
        k
    });
    wait_placement(&env, &names, "c1-c2 together", |w| w[0] == w[1]);
    moved.store(true, Ordering::Release);
    let sent = send.join().unwrap();
    let got = recv.join().unwrap();
    assert!(placement(&env, &names).1 >= 1);
    let expect: Vec<u32> = (0..sent).collect();
    if got != expect {
        let first = got.iter().zip(&expect).position(|(g, e)| g != e);
        panic!(
            "{} of {sent} arrived; first difference at {first:?}: {:?}",
            got.len(),
            first.map(|i| &got[i.saturating_sub(3)..(i + 3).min(got.len())])
        );
    }
}

#[test]
fn two_workers_carry_traffic_between_containers_and_through_the_nat() {
    if !root() {
        return;
    }
    let (env, ext, (cs, ips)) = two_workers("10.78.0.0/24", 4, true, |i| match i {
        3 => &["--type", "veth", "-p", "8080:80"],
        1 => &["--type", "veth"],
        _ => &["--type", "tap"],
    });
    let ext = ext.unwrap();
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
    let (env, _, (cs, ips)) = two_workers("10.79.0.0/24", 4, false, |_| &[]);
    // Two numbered UDP streams at once, c1 -> c2 and c4 -> c3, crossing between the workers:
    // what arrives arrives in the order sent.
    const N: u32 = 3000;
    // The sender keeps at most WINDOW datagrams ahead of what its receiver has taken (both
    // run in this process), so a loaded machine slows the stream instead of dropping it; a
    // window with no progress for 50 ms is given up on (a loss), so a drop cannot stall it.
    const WINDOW: u32 = 128;
    let recv = |i: usize, seen| numbered_receiver(&cs[i], seen, Duration::from_millis(500));
    let send = |i: usize, to: Ipv4Addr, seen: Arc<AtomicU32>| {
        let ns = switchyard_control::netns::NetNs::open(&cs[i].path).unwrap();
        std::thread::spawn(move || {
            run_in(&ns, || {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                first_after_arp(&s, SocketAddrV4::new(to, 9000), &seen);
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
