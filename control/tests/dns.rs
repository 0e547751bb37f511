//! The embedded DNS server end to end, with the real libc resolver: `getent hosts` run inside
//! container namespaces through `ip netns exec` (which bind-mounts the daemon's
//! /etc/netns/NAME/resolv.conf) or through `switchyard run`. External names go to a test
//! upstream server (hickory-proto, in the test) in the outside namespace, through the raw
//! uplink, or in the daemon's own namespace, through its host socket. Root only.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use switchyard_control::netns::{run_in, NetNs};

const EXTERNAL: &str = "external.test.";
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 77);

/// A tiny authoritative server on `addr`:53 in `ns`: `external.test` has an A record, other
/// types of it no data; `bigN.test` (and `tcN.test`) have N A records, but over UDP only a
/// truncated (TC) empty answer: the whole one is served over TCP (when `tcp`); everything else
/// is NXDOMAIN. It notes who asked what (", tcp" for questions over TCP).
struct Upstream {
    seen: Arc<Mutex<Vec<(SocketAddr, String)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The many addresses of `bigN.test`.
fn big_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, i as u8 + 1)
}

/// How many A records `name` has on the test upstream when it is a `bigN.`/`tcN.` name.
fn big_count(name: &str) -> Option<usize> {
    let rest = name
        .strip_prefix("big")
        .or_else(|| name.strip_prefix("tc"))?;
    rest.strip_suffix(".test.")?.parse().ok()
}

/// The test upstream's answer to `q` (over TCP when `tcp`).
fn respond(q: &Message, tcp: bool) -> Option<Message> {
    let query = q.queries.first()?.clone();
    let name = query.name().to_ascii().to_ascii_lowercase();
    let mut r = Message::response(q.metadata.id, OpCode::Query);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_query(query.clone());
    if name == EXTERNAL {
        if query.query_type() == RecordType::A {
            r.add_answer(Record::from_rdata(
                query.name().clone(),
                120,
                RData::A(A(EXTERNAL_IP)),
            ));
        }
    } else if let Some(n) = big_count(&name) {
        if query.query_type() == RecordType::A {
            if !tcp {
                r.metadata.truncation = true;
                return Some(r);
            }
            for i in 0..n {
                r.add_answer(Record::from_rdata(
                    query.name().clone(),
                    300,
                    RData::A(A(big_ip(i))),
                ));
            }
        }
    } else {
        r.metadata.response_code = ResponseCode::NXDomain;
    }
    if r.answers.is_empty() {
        // Negative answers carry the zone's SOA: cacheable (RFC 2308).
        let soa = SOA::new(
            Name::from_ascii("ns.test.").unwrap(),
            Name::from_ascii("admin.test.").unwrap(),
            1,
            3600,
            600,
            86400,
            60,
        );
        r.add_authority(Record::from_rdata(
            Name::from_ascii("test.").unwrap(),
            60,
            RData::SOA(soa),
        ));
    }
    Some(r)
}

fn note(seen: &Mutex<Vec<(SocketAddr, String)>>, from: SocketAddr, q: &Message, tcp: bool) {
    if let Some(query) = q.queries.first() {
        let name = query.name().to_ascii().to_ascii_lowercase();
        let how = if tcp { ", tcp" } else { "" };
        seen.lock()
            .unwrap()
            .push((from, format!("{name} {}{how}", query.query_type())));
    }
}

/// What the test upstream does on TCP port 53.
#[derive(Clone, Copy, PartialEq)]
enum Tcp {
    Answer,
    /// Nothing listens: connections are refused.
    Refuse,
    /// Connections are taken (by the kernel) and never read or answered.
    Hang,
}

impl Upstream {
    fn start(ns: &NetNs, addr: Ipv4Addr) -> Upstream {
        Upstream::start_with(ns, addr, Tcp::Answer)
    }

    fn start_with(ns: &NetNs, addr: Ipv4Addr, tcp: Tcp) -> Upstream {
        let sock = run_in(ns, move || UdpSocket::bind((addr, 53)))
            .unwrap()
            .unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let mut threads = vec![std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                note(&seen2, from, &q, false);
                if let Some(r) = respond(&q, false) {
                    let _ = sock.send_to(&r.to_vec().unwrap(), from);
                }
            }
        })];
        if tcp != Tcp::Refuse {
            let l = run_in(ns, move || TcpListener::bind((addr, 53)))
                .unwrap()
                .unwrap();
            l.set_nonblocking(true).unwrap();
            let (seen2, stop2) = (seen.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    if tcp == Tcp::Hang {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let Ok((mut c, from)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    // Length-prefixed queries until the client closes.
                    loop {
                        let mut len = [0u8; 2];
                        if c.read_exact(&mut len).is_err() {
                            break;
                        }
                        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if c.read_exact(&mut msg).is_err() {
                            break;
                        }
                        let Ok(q) = Message::from_vec(&msg) else {
                            break;
                        };
                        note(&seen2, from, &q, true);
                        let Some(r) = respond(&q, true) else { break };
                        let b = r.to_vec().unwrap();
                        let mut out = (b.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&b);
                        if c.write_all(&out).is_err() {
                            break;
                        }
                    }
                }
            }));
        }
        Upstream {
            seen,
            stop,
            threads,
        }
    }

    fn seen(&self) -> Vec<(SocketAddr, String)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A daemon whose own namespace (the "host") runs the test upstream on its loopback at
/// `addr`, started with `args`.
fn on_loopback(args: &[&str], addr: Ipv4Addr, tcp: Tcp) -> (Env, Upstream) {
    let mut env = Env::prepare(args);
    let host = NetNs::open(&env.host).unwrap();
    run_in(&host, || {
        let mut nl = switchyard_control::netlink::Netlink::open().unwrap();
        nl.set_up(1).unwrap();
    })
    .unwrap();
    let upstream = Upstream::start_with(&host, addr, tcp);
    env.start_daemon();
    (env, upstream)
}

/// `getent hosts NAME` inside container `c` (through `ip netns exec`, so with its
/// /etc/netns resolv.conf): the addresses it printed, or `None` when the name did not resolve.
fn getent(c: &Container, name: &str) -> Option<Vec<String>> {
    let o = Command::new("timeout")
        .args([
            "20", "ip", "netns", "exec", &c.name, "getent", "hosts", name,
        ])
        .output()
        .expect("ip netns exec");
    if !o.status.success() {
        return None;
    }
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    Some(
        out.lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect(),
    )
}

/// A DNS query for `name`'s A record (recursion desired).
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new(id, hickory_proto::op::MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(hickory_proto::op::Query::query(
        Name::from_ascii(name).unwrap(),
        RecordType::A,
    ));
    m.to_vec().unwrap()
}

/// Send `payload` over UDP from inside `c` to `server` and wait up to 2 s for a reply.
fn ask_udp(c: &Container, server: &str, payload: &[u8]) -> Option<Message> {
    let (server, payload) = (server.to_string(), payload.to_vec());
    run_in(&c.ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(&payload, &server).unwrap();
        let mut buf = [0u8; 65_535];
        let n = s.recv(&mut buf).ok()?;
        Message::from_vec(&buf[..n]).ok()
    })
    .unwrap()
}

fn a_of(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn resolv_of(c: &Container) -> std::path::PathBuf {
    Path::new("/etc/netns").join(&c.name).join("resolv.conf")
}

fn tools() -> bool {
    let ok = ["ip", "getent", "timeout"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        println!("skipped: needs ip, getent and timeout");
    }
    ok
}

/// A daemon with the raw uplink, and the test upstream at 192.0.2.1 in the outside namespace.
fn behind_raw_uplink() -> (Env, Upstream) {
    let mut env = Env::prepare(&[&UPLINK_ARGS[..], &["--dns", "192.0.2.1"]].concat());
    let ext = env.outside();
    let upstream = Upstream::start(&ext.ns, Ipv4Addr::new(192, 0, 2, 1));
    env.start_daemon();
    (env, upstream)
}

#[test]
fn names_resolve_on_their_own_network_and_external_names_go_upstream() {
    if !root() || !tools() {
        return;
    }
    let (mut env, upstream) = behind_raw_uplink();
    env.ok(&["network", "create", "appnet", "--subnet", "10.89.0.0/24"]);
    env.ok(&["network", "create", "othernet", "--subnet", "10.90.0.0/24"]);
    let a1 = env.container("a1");
    let a2 = env.container("a2");
    let b1 = env.container("b1");
    let c1 = env.container("c1");
    let e1 = env.connect("appnet", &a1, &[]);
    let e2 = env.connect("appnet", &a2, &["--alias", "db", "--alias", "Cache"]);
    env.connect("othernet", &b1, &[]);
    env.connect("bridge", &c1, &[]);
    let (ip1, ip2) = (ip_of(&e1).to_string(), ip_of(&e2).to_string());
    assert_eq!(e2["aliases"], serde_json::json!(["db", "Cache"]));
    let info = env.json(&["network", "inspect", "appnet"]);
    assert_eq!(info["dns"], true);
    assert_eq!(env.json(&["network", "inspect", "bridge"])["dns"], false);

    // The containers were told: /etc/netns/NAME/resolv.conf names the gateway; not on bridge.
    let r = std::fs::read_to_string(resolv_of(&a1)).expect("resolv.conf for a1");
    assert!(r.contains("nameserver 10.89.0.1\n"), "{r}");
    assert!(
        !resolv_of(&c1).exists(),
        "no DNS on the default bridge network"
    );

    // By name and by alias (any case), both ways.
    assert_eq!(getent(&a1, "a2"), Some(vec![ip2.clone()]));
    assert_eq!(getent(&a1, "db"), Some(vec![ip2.clone()]));
    assert_eq!(getent(&a1, "CACHE"), Some(vec![ip2.clone()]));
    assert_eq!(getent(&a2, "a1"), Some(vec![ip1.clone()]));
    // Reverse: the address's name.
    let o = Command::new("ip")
        .args(["netns", "exec", &a2.name, "getent", "hosts", &ip1])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(" a1"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    // Another network does not see them (and they do not see it).
    assert_eq!(getent(&b1, "a2"), None);
    assert_eq!(getent(&b1, "db"), None);
    assert_eq!(getent(&a1, "b1"), None);

    // An external name: resolved by the upstream, asked from the uplink address.
    assert_eq!(
        getent(&a1, "external.test"),
        Some(vec![EXTERNAL_IP.to_string()])
    );
    let seen = upstream.seen();
    assert!(
        seen.iter()
            .any(|(from, q)| from.ip() == Ipv4Addr::new(192, 0, 2, 10) && q.starts_with(EXTERNAL)),
        "{seen:?}"
    );
    // Local names never went upstream.
    assert!(
        !seen
            .iter()
            .any(|(_, q)| q.starts_with("a2.") || q.starts_with("db.")),
        "{seen:?}"
    );
    // Cached: a second lookup from another container does not ask again.
    let asked = upstream.seen().len();
    assert_eq!(
        getent(&a2, "external.test"),
        Some(vec![EXTERNAL_IP.to_string()])
    );
    assert_eq!(upstream.seen().len(), asked, "answered from the cache");
    // Unknown external names: NXDOMAIN from upstream.
    assert_eq!(getent(&a1, "nothing.test"), None);

    // After disconnect the name is gone and so is its resolv.conf.
    env.ok(&["disconnect", "appnet", "a2"]);
    assert_eq!(getent(&a1, "a2"), None);
    assert_eq!(getent(&a1, "db"), None);
    assert!(!resolv_of(&a2).exists());

    // A malformed datagram to the gateway's port 53 does not hurt the server.
    run_in(&a1.ns, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for n in [0usize, 3, 12, 40, 600] {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let _ = s.send_to(&junk, "10.89.0.1:53");
        }
    })
    .unwrap();
    assert_eq!(getent(&a1, "a1"), Some(vec![ip1.clone()]));
    let stats = env.json(&["stats"]);
    let dns = &stats["dns"];
    assert!(dns["local_answers"].as_u64().unwrap() >= 5, "{dns}");
    assert!(dns["forwarded"].as_u64().unwrap() >= 1, "{dns}");
    assert!(dns["cache_hits"].as_u64().unwrap() >= 1, "{dns}");
    assert!(
        dns["formerr"].as_u64().unwrap() + dns["malformed_dropped"].as_u64().unwrap() >= 3,
        "{dns}"
    );

    // Stopping the daemon takes its resolv.conf files away.
    env.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    assert!(!resolv_of(&a1).exists());
    drop(upstream);
}

#[test]
fn aliases_survive_a_restart_and_run_gets_a_resolv_conf() {
    if !root() || !tools() {
        return;
    }
    // An upstream on the daemon's loopback: names of the search domains that are no endpoint
    // go there (and get a quick NXDOMAIN).
    let (mut env, upstream) =
        on_loopback(&["--dns", "127.0.0.1"], Ipv4Addr::LOCALHOST, Tcp::Answer);
    // A search domain is a DNS name: anything else is refused.
    let err = env.err(&["network", "create", "badnet", "--dns-search", "bad domain"]);
    assert!(err.contains("search domain"), "{err}");
    env.ok(&[
        "network",
        "create",
        "webnet",
        "--subnet",
        "10.91.0.0/24",
        "--dns-search",
        "Corp.Test",
        "--dns-search",
        "lab.test",
    ]);
    let w1 = env.container("w1");
    let e = env.connect("webnet", &w1, &["--alias", "web"]);
    let ip = ip_of(&e).to_string();
    let info = env.json(&["network", "inspect", "webnet"]);
    assert_eq!(
        info["dns_search"],
        serde_json::json!(["corp.test", "lab.test"])
    );
    let text = env.ok(&["network", "inspect", "webnet"]);
    assert!(text.contains("Search:    corp.test lab.test"), "{text}");
    // The namespace's resolv.conf searches the domains, and qualified names resolve.
    let r = std::fs::read_to_string(resolv_of(&w1)).expect("resolv.conf for w1");
    assert!(r.contains("search corp.test lab.test\n"), "{r}");
    assert_eq!(getent(&w1, "web.corp.test"), Some(vec![ip.clone()]));
    assert_eq!(getent(&w1, "W1.LAB.test"), Some(vec![ip.clone()]));
    // Other names of the domain may be real hosts there: asked upstream, not answered here.
    assert_eq!(getent(&w1, "nothing.corp.test"), None);
    assert!(
        upstream
            .seen()
            .iter()
            .any(|(_, q)| q.starts_with("nothing.corp.test. ")),
        "{:?}",
        upstream.seen()
    );
    // An invalid alias is refused before anything is made.
    let w2 = env.container("w2");
    let err = env.err(&[
        "connect",
        "webnet",
        "--netns",
        w2.path.to_str().unwrap(),
        "--alias",
        "bad name",
    ]);
    assert!(err.contains("alias"), "{err}");

    env.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    env.start_daemon();
    let info = env.json(&["network", "inspect", "webnet"]);
    assert_eq!(info["endpoints"][0]["aliases"], serde_json::json!(["web"]));
    assert_eq!(
        info["dns_search"],
        serde_json::json!(["corp.test", "lab.test"])
    );

    // `switchyard run` on the network: the command resolves through the gateway.
    let o = Command::new("timeout")
        .args(["30", BIN, "--socket"])
        .arg(&env.socket)
        .args(["run", "--network", "webnet", "--", "getent", "hosts", "web"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "run: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        env.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).split_whitespace().next(),
        Some(ip.as_str())
    );
    // Its resolv.conf: the gateway and the search line; a qualified name resolves there too.
    let o = Command::new("timeout")
        .args(["30", BIN, "--socket"])
        .arg(&env.socket)
        .args(["run", "--network", "webnet", "--", "sh", "-c"])
        .arg("cat /etc/resolv.conf && getent hosts web.lab.test")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "run: {out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("nameserver 10.91.0.1\n"), "{out}");
    assert!(out.contains("search corp.test lab.test\n"), "{out}");
    assert!(out.contains(&format!("{ip} ")), "{out}");
}

#[test]
fn the_default_bridge_resolves_names_only_when_turned_on() {
    if !root() || !tools() {
        return;
    }
    for on in [false, true] {
        let args: &[&str] = if on { &["--bridge-dns"] } else { &[] };
        let mut env = Env::new(args);
        let b1 = env.container("b1");
        let b2 = env.container("b2");
        env.connect("bridge", &b1, &[]);
        let e2 = env.connect("bridge", &b2, &[]);
        assert_eq!(env.json(&["network", "inspect", "bridge"])["dns"], on);
        assert_eq!(resolv_of(&b1).exists(), on);
        // Asked directly (no resolv.conf needed): the gateway answers only when turned on.
        let r = ask_udp(&b1, "172.17.0.1:53", &query(7, short(&b2.name)));
        if on {
            let r = r.expect("an answer from the bridge's gateway");
            assert_eq!(a_of(&r), vec![ip_of(&e2)]);
            assert_eq!(
                getent(&b1, short(&b2.name)),
                Some(vec![ip_of(&e2).to_string()])
            );
        } else {
            assert!(r.is_none(), "{r:?}");
        }
    }
}

#[test]
fn without_a_raw_uplink_external_names_go_through_a_host_socket() {
    if !root() || !tools() {
        return;
    }
    // The daemon's namespace is the "host": its loopback runs the upstream server.
    let (mut env, upstream) =
        on_loopback(&["--dns", "127.0.0.1"], Ipv4Addr::LOCALHOST, Tcp::Answer);
    env.ok(&["network", "create", "sockdns", "--subnet", "10.92.0.0/24"]);
    let s1 = env.container("s1");
    env.connect("sockdns", &s1, &[]);
    assert_eq!(
        getent(&s1, "external.test"),
        Some(vec![EXTERNAL_IP.to_string()])
    );
    assert!(upstream
        .seen()
        .iter()
        .any(|(from, q)| from.ip() == Ipv4Addr::LOCALHOST && q.starts_with(EXTERNAL)));
    assert_eq!(getent(&s1, "s1"), Some(vec!["10.92.0.2".to_string()]));
}

#[test]
fn tcp_lookups_and_truncated_answers_retried_over_tcp() {
    if !root() || !tools() {
        return;
    }
    let mut env = Env::new(&[]);
    env.ok(&["network", "create", "tcpnet", "--subnet", "10.93.0.0/24"]);
    let t1 = env.container("t1");
    let t2 = env.container("t2");
    env.connect("tcpnet", &t1, &[]);
    let e2 = env.connect("tcpnet", &t2, &[]);
    let ip2 = ip_of(&e2).to_string();

    // `options use-vc` in this namespace's resolv.conf (the daemon's file, its first line
    // kept so the daemon still removes it): the libc resolver asks over TCP only.
    let path = resolv_of(&t1);
    let mut r = std::fs::read_to_string(&path).expect("resolv.conf for t1");
    r.push_str("options use-vc\n");
    std::fs::write(&path, r).unwrap();
    assert_eq!(getent(&t1, "t2"), Some(vec![ip2.clone()]));
    let dns = env.json(&["stats"])["dns"].clone();
    assert!(dns["tcp_queries"].as_u64().unwrap() >= 1, "{dns}");
    assert!(dns["tcp"]["accepted"].as_u64().unwrap() >= 1, "{dns}");
    assert_eq!(dns["truncated"].as_u64(), Some(0), "{dns}");

    // One name on many endpoints (a shared alias): the answer does not fit a 512-byte
    // datagram, so UDP gets it truncated and the resolver retries over TCP for all of it.
    const MANY: usize = 40;
    let mut ips = Vec::new();
    for i in 0..MANY {
        let c = env.container(&format!("m{i}"));
        let e = env.connect("tcpnet", &c, &["--alias", "many"]);
        ips.push(ip_of(&e).to_string());
    }
    let before = env.json(&["stats"])["dns"]["tcp_queries"].as_u64().unwrap();
    let mut got = getent(&t2, "many").expect("the big name resolves");
    got.sort();
    ips.sort();
    assert_eq!(got, ips);
    let dns = env.json(&["stats"])["dns"].clone();
    assert!(dns["truncated"].as_u64().unwrap() >= 1, "{dns}");
    assert!(dns["tcp_queries"].as_u64().unwrap() > before, "{dns}");
}

/// `getent hosts NAME` in `c`: the addresses, sorted.
fn all_of(c: &Container, name: &str) -> Option<Vec<String>> {
    getent(c, name).map(|mut v| {
        v.sort();
        v.dedup();
        v
    })
}

fn big_ips(n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n).map(|i| big_ip(i).to_string()).collect();
    v.sort();
    v
}

#[test]
fn truncated_upstream_answers_are_fetched_over_tcp_from_the_uplink_address() {
    if !root() || !tools() {
        return;
    }
    let (mut env, upstream) = behind_raw_uplink();
    env.ok(&["network", "create", "tcnet", "--subnet", "10.94.0.0/24"]);
    let c1 = env.container("c1");
    let c2 = env.container("c2");
    env.connect("tcnet", &c1, &[]);
    env.connect("tcnet", &c2, &[]);

    // Three records: the whole answer fits the client's datagram.
    assert_eq!(all_of(&c1, "tc3.test"), Some(big_ips(3)));
    // Forty: too big for 512 bytes, so the client gets TC, retries over TCP at the gateway and
    // is answered from the cache, which holds the whole answer.
    assert_eq!(all_of(&c1, "big40.test"), Some(big_ips(40)));
    let seen = upstream.seen();
    for name in ["tc3.test. A, tcp", "big40.test. A, tcp"] {
        assert!(
            seen.iter()
                .any(|(from, q)| from.ip() == Ipv4Addr::new(192, 0, 2, 10) && q == name),
            "{name}: {seen:?}"
        );
    }
    let asked = seen.len();
    assert_eq!(all_of(&c2, "big40.test"), Some(big_ips(40)));
    assert_eq!(upstream.seen().len(), asked, "answered from the cache");
    let dns = env.json(&["stats"])["dns"].clone();
    assert!(
        dns["tcp_upstream"]["answered"].as_u64().unwrap() >= 2,
        "{dns}"
    );
    assert_eq!(dns["tcp_upstream"]["failed"].as_u64(), Some(0), "{dns}");
    assert_eq!(dns["upstream_tcp_failed"].as_u64(), Some(0), "{dns}");
    assert!(dns["upstream_tcp"].as_u64().unwrap() >= 2, "{dns}");
    assert!(dns["tcp_queries"].as_u64().unwrap() >= 1, "{dns}");
    // Local names still answer (nothing stalled).
    assert_eq!(getent(&c1, "c2"), Some(vec!["10.94.0.3".to_string()]));
}

#[test]
fn without_a_raw_uplink_truncated_answers_go_over_a_host_tcp_socket() {
    if !root() || !tools() {
        return;
    }
    // Two upstreams on the daemon's loopback: 127.0.0.1 answers TCP, 127.0.0.2 refuses it.
    let (mut env, upstream) =
        on_loopback(&["--dns", "127.0.0.1"], Ipv4Addr::LOCALHOST, Tcp::Answer);
    env.ok(&["network", "create", "tcsock", "--subnet", "10.95.0.0/24"]);
    let s1 = env.container("s1");
    env.connect("tcsock", &s1, &[]);
    assert_eq!(all_of(&s1, "big30.test"), Some(big_ips(30)));
    assert_eq!(all_of(&s1, "tc2.test"), Some(big_ips(2)));
    let seen = upstream.seen();
    assert!(
        seen.iter()
            .any(|(from, q)| from.ip() == Ipv4Addr::LOCALHOST && q == "big30.test. A, tcp"),
        "{seen:?}"
    );
    let dns = env.json(&["stats"])["dns"].clone();
    assert!(
        dns["tcp_upstream"]["answered"].as_u64().unwrap() >= 2,
        "{dns}"
    );
    drop(upstream);
    drop(env);

    // An upstream that refuses TCP: SERVFAIL for that name, quickly, and nothing else stalls.
    let (mut env, upstream) = on_loopback(
        &["--dns", "127.0.0.2"],
        Ipv4Addr::new(127, 0, 0, 2),
        Tcp::Refuse,
    );
    env.ok(&["network", "create", "tcref", "--subnet", "10.96.0.0/24"]);
    let r1 = env.container("r1");
    let e = env.connect("tcref", &r1, &[]);
    let asked = std::time::Instant::now();
    let r = ask_udp(&r1, "10.96.0.1:53", &query(42, "big30.test"));
    let r = r.expect("an answer");
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "{r:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(getent(&r1, "r1"), Some(vec![ip_of(&e).to_string()]));
    assert_eq!(
        getent(&r1, "external.test"),
        Some(vec![EXTERNAL_IP.to_string()])
    );
    let dns = env.json(&["stats"])["dns"].clone();
    assert!(dns["upstream_tcp_failed"].as_u64().unwrap() >= 1, "{dns}");
    drop(upstream);
    drop(env);

    // An upstream that takes the connection and never answers: SERVFAIL at the TCP timeout,
    // and meanwhile other queries are answered.
    let (mut env, upstream) = on_loopback(
        &["--dns", "127.0.0.4"],
        Ipv4Addr::new(127, 0, 0, 4),
        Tcp::Hang,
    );
    env.ok(&["network", "create", "tchang", "--subnet", "10.99.0.0/24"]);
    let h1 = env.container("h1");
    let e = env.connect("tchang", &h1, &[]);
    let ns = NetNs::open(&h1.path).unwrap();
    let slow = std::thread::spawn(move || {
        run_in(&ns, || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.send_to(&query(43, "big30.test"), "10.99.0.1:53").unwrap();
            let mut buf = [0u8; 1500];
            let n = s.recv(&mut buf).ok()?;
            Message::from_vec(&buf[..n]).ok()
        })
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    let r = ask_udp(&h1, "10.99.0.1:53", &query(44, "h1")).expect("a local answer meanwhile");
    assert_eq!(a_of(&r), vec![ip_of(&e)]);
    assert_eq!(env.json(&["stats"])["dns"]["tcp_upstream"]["open"], 1);
    let r = slow.join().unwrap().expect("an answer at the timeout");
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "{r:?}");
    let dns = env.json(&["stats"])["dns"].clone();
    assert!(dns["upstream_tcp_failed"].as_u64().unwrap() >= 1, "{dns}");
    assert_eq!(dns["tcp_upstream"]["open"], 0, "{dns}");
    drop(upstream);
}

/// A query on the wire, built by hand (so it may hold what no name parser would make).
fn raw_query(id: u16, labels: &[&[u8]], qtype: u16, qclass: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in labels {
        q.push(l.len() as u8);
        q.extend_from_slice(l);
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&qclass.to_be_bytes());
    q
}

#[test]
fn odd_queries_are_refused_or_counted_and_a_flood_is_rate_limited_per_client() {
    if !root() || !tools() {
        return;
    }
    let mut env = Env::new(&[]);
    // MTU 9000: an oversized query (above 4096 bytes) still fits one unfragmented datagram.
    env.ok(&[
        "network",
        "create",
        "oddnet",
        "--subnet",
        "10.97.0.0/24",
        "--mtu",
        "9000",
    ]);
    let o1 = env.container("o1");
    let o2 = env.container("o2");
    let e1 = env.connect("oddnet", &o1, &[]);
    env.connect("oddnet", &o2, &[]);
    let gw = "10.97.0.1:53";
    // A local name's AAAA: no error, no data.
    let r = ask_udp(&o2, gw, &raw_query(1, &[b"o1"], 28, 1)).expect("an answer");
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    // Names no hostname has (a space, a control byte, a non-ASCII byte), another class, a zone
    // transfer: REFUSED.
    for (i, q) in [
        raw_query(2, &[b"we b", b"test"], 1, 1),
        raw_query(3, &[b"a\x01b", b"test"], 1, 1),
        raw_query(4, &[b"caf\xc3\xa9", b"test"], 1, 1),
        raw_query(5, &[b"version", b"bind"], 16, 3),
        raw_query(6, &[b"test"], 252, 1),
    ]
    .iter()
    .enumerate()
    {
        let r = ask_udp(&o2, gw, q).unwrap_or_else(|| panic!("query {i}: no answer"));
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "query {i}");
    }
    // Malformed: a question cut short gets FORMERR; oversized is dropped without a word.
    let mut cut = raw_query(7, &[b"o1"], 1, 1);
    cut.truncate(cut.len() - 3);
    let r = ask_udp(&o2, gw, &cut).expect("an answer");
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    let mut big = raw_query(8, &[b"o1"], 1, 1);
    big.resize(5000, 0);
    assert!(ask_udp(&o2, gw, &big).is_none());
    let dns = env.json(&["stats"])["dns"].clone();
    assert!(dns["refused"].as_u64().unwrap() >= 5, "{dns}");
    assert!(dns["formerr"].as_u64().unwrap() >= 1, "{dns}");
    assert!(dns["oversize_dropped"].as_u64().unwrap() >= 1, "{dns}");

    // A flood from o2 (1000 queries at once, above the 400 burst): the rest are dropped and
    // counted; o1 is still answered.
    let answered = run_in(&o2.ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        for i in 0..1000u16 {
            let _ = s.send_to(&raw_query(i, &[b"o1"], 1, 1), gw);
        }
        let mut buf = [0u8; 1500];
        let mut n = 0;
        while s.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    })
    .unwrap();
    assert!((1..1000).contains(&answered), "{answered} of 1000 answered");
    let dns = env.json(&["stats"])["dns"].clone();
    assert!(dns["rate_limited"].as_u64().unwrap() >= 500, "{dns}");
    assert_eq!(getent(&o1, "o1"), Some(vec![ip_of(&e1).to_string()]));
}

#[test]
fn upstreams_from_repeated_dns_options_are_tried_in_turn() {
    if !root() || !tools() {
        return;
    }
    // The first upstream is silent: the query is asked again of the second.
    let (mut env, upstream) = on_loopback(
        &["--dns", "127.0.0.3", "--dns", "127.0.0.1"],
        Ipv4Addr::LOCALHOST,
        Tcp::Answer,
    );
    env.ok(&["network", "create", "twoup", "--subnet", "10.98.0.0/24"]);
    let u1 = env.container("u1");
    env.connect("twoup", &u1, &[]);
    assert_eq!(
        getent(&u1, "external.test"),
        Some(vec![EXTERNAL_IP.to_string()])
    );
    assert!(upstream.seen().iter().any(|(_, q)| q.starts_with(EXTERNAL)));
    let dns = env.json(&["stats"])["dns"].clone();
    assert!(dns["upstream_timeouts"].as_u64().unwrap() >= 1, "{dns}");
    assert!(dns["upstream_retries"].as_u64().unwrap() >= 1, "{dns}");
}
