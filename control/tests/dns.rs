//! The embedded DNS server end to end, with the real libc resolver: `getent hosts` run inside
//! container namespaces through `ip netns exec` (which bind-mounts the daemon's
//! /etc/netns/NAME/resolv.conf) or through `switchyard run`. External names go to a test
//! upstream server (hickory-proto, in the test) in the outside namespace, through the raw
//! uplink, or in the daemon's own namespace, through its host socket. Root only.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
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
/// types of it no data, everything else is NXDOMAIN. It notes who asked what.
struct Upstream {
    seen: Arc<Mutex<Vec<(SocketAddr, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(ns: &NetNs, addr: Ipv4Addr) -> Upstream {
        let sock = run_in(ns, move || UdpSocket::bind((addr, 53)))
            .unwrap()
            .unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(query) = q.queries.first().cloned() else {
                    continue;
                };
                let name = query.name().to_ascii().to_ascii_lowercase();
                seen2
                    .lock()
                    .unwrap()
                    .push((from, format!("{name} {}", query.query_type())));
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
                let _ = sock.send_to(&r.to_vec().unwrap(), from);
            }
        });
        Upstream {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<(SocketAddr, String)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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

const UPLINK_ARGS: [&str; 8] = [
    "--uplink",
    "up0",
    "--uplink-addr",
    "192.0.2.10/24",
    "--uplink-gateway",
    "192.0.2.1",
    "--dns",
    "192.0.2.1",
];

#[test]
fn names_resolve_on_their_own_network_and_external_names_go_upstream() {
    if !root() || !tools() {
        return;
    }
    let mut env = Env::prepare(&UPLINK_ARGS);
    let ext = env.outside();
    let upstream = Upstream::start(&ext.ns, Ipv4Addr::new(192, 0, 2, 1));
    env.start_daemon();
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
    let mut env = Env::new(&[]);
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
    let mut env = Env::prepare(&["--dns", "127.0.0.1"]);
    let host = NetNs::open(&env.host).unwrap();
    run_in(&host, || {
        let mut nl = switchyard_control::netlink::Netlink::open().unwrap();
        nl.set_up(1).unwrap();
    })
    .unwrap();
    let upstream = Upstream::start(&host, Ipv4Addr::LOCALHOST);
    env.start_daemon();
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
