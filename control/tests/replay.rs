//! `switchyard replay` end to end: the real binary on topologies and captures made here, and
//! golden captures shipped in tests/replay/<case>/ (regenerate with `UPDATE_GOLDEN=1 cargo test
//! -p switchyard --test replay golden`, then review the diff of expected.jsonl and read
//! expected-out.pcapng with `tcpdump -enr`).

mod frames;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use frames::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

const NEXT_HOP: Mac = [2, 0, 0, 0, 0, 0x01];
const UPLINK_MAC: Mac = [2, 0, 0, 0, 0, 0x10];
const UPLINK_IP: Ip = [192, 0, 2, 10];
const GW1_MAC: Mac = [2, 0, 0, 0, 0x77, 1];
const GW1: Ip = [10, 77, 0, 1];
const C1_MAC: Mac = [2, 0, 0, 0, 0x77, 2];
const C1: Ip = [10, 77, 0, 2];
const C2_MAC: Mac = [2, 0, 0, 0, 0x77, 3];
const C2: Ip = [10, 77, 0, 3];
const GW2_MAC: Mac = [2, 0, 0, 0, 0x88, 1];
const D1_MAC: Mac = [2, 0, 0, 0, 0x88, 2];
const D1: Ip = [10, 88, 0, 2];
const OUTSIDE: Ip = [198, 51, 100, 7];
const CLIENT: Ip = [203, 0, 113, 5];
const STRANGER_MAC: Mac = [2, 0, 0, 0, 0x77, 0x99];

const TOPOLOGY: &str = r#"# Two networks, an uplink, published ports.
[uplink]
addr = "192.0.2.10/24"
mac = "02:00:00:00:00:10"
gateway = "192.0.2.1"
gateway_mac = "02:00:00:00:00:01"

[[network]]
name = "mynet"
subnet = "10.77.0.0/24"
gateway = "10.77.0.1"
gateway_mac = "02:00:00:00:77:01"

[[network]]
name = "big"
subnet = "10.88.0.0/24"
gateway = "10.88.0.1"
gateway_mac = "02:00:00:00:88:01"
mtu = 9000

[[endpoint]]
network = "mynet"
name = "c1"
mac = "02:00:00:00:77:02"
ip = "10.77.0.2"
publish = ["8080:80", "5353:53/udp"]

[[endpoint]]
network = "mynet"
name = "c2"
mac = "02:00:00:00:77:03"
ip = "10.77.0.3"

[[endpoint]]
network = "big"
name = "d1"
mac = "02:00:00:00:88:02"
ip = "10.88.0.2"

[conntrack]
max = 1024
"#;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    out: Vec<u8>,
}

impl Run {
    fn records(&self) -> Vec<Value> {
        assert_eq!(self.code, 0, "replay failed: {}", self.stderr);
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    fn frames(&self) -> Vec<OutFrame> {
        read_pcapng(&self.out).1
    }

    fn error(&self) -> &str {
        assert_eq!(self.code, 1, "want exit 1; stderr {:?}", self.stderr);
        assert!(self.stdout.is_empty(), "stdout on error: {:?}", self.stdout);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {:?}", self.stderr);
        assert!(
            lines[0].starts_with("switchyard: error: "),
            "{:?}",
            lines[0]
        );
        assert!(!self.stderr.contains("panicked"));
        lines[0]
    }
}

fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("replay")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run `switchyard replay --json --out ...` on files already in place.
fn replay_files(topology: &Path, input: &Path, out: &Path, extra: &[&str]) -> Run {
    let _ = std::fs::remove_file(out);
    let o = Command::new(BIN)
        .arg("replay")
        .arg("--topology")
        .arg(topology)
        .arg("--in")
        .arg(input)
        .arg("--out")
        .arg(out)
        .arg("--json")
        .args(extra)
        .output()
        .unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
        out: std::fs::read(out).unwrap_or_default(),
    }
}

fn replay(name: &str, topology: &str, input: &[u8], extra: &[&str]) -> Run {
    let d = dir(name);
    std::fs::write(d.join("topology.toml"), topology).unwrap();
    std::fs::write(d.join("in.pcap"), input).unwrap();
    replay_files(
        &d.join("topology.toml"),
        &d.join("in.pcap"),
        &d.join("out.pcapng"),
        extra,
    )
}

fn pk(port: &str, us: u64, f: Vec<u8>) -> (String, u64, Vec<u8>) {
    (port.to_string(), us, f)
}

fn verdict(r: &Value) -> (&str, Option<&str>) {
    (r["verdict"].as_str().unwrap(), r["reason"].as_str())
}

fn egress(r: &Value) -> Vec<&str> {
    r["egress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

fn egress_set(r: &Value) -> BTreeSet<&str> {
    egress(r).into_iter().collect()
}

/// Frames that left `port`.
fn on<'a>(frames: &'a [OutFrame], port: &str) -> Vec<&'a [u8]> {
    frames
        .iter()
        .filter(|f| f.0 == port)
        .map(|f| f.2.as_slice())
        .collect()
}

#[test]
fn gateway_answers_arp_and_ping_and_the_uplink_answers_arp() {
    let input = pcapng(&vec![
        pk("c1", 1_000_000, arp_request(C1_MAC, C1, GW1)),
        pk("c1", 2_000_000, ping(GW1_MAC, C1_MAC, C1, GW1, 0x77, 1)),
        pk(
            "uplink",
            3_000_000,
            arp_request(NEXT_HOP, [192, 0, 2, 1], UPLINK_IP),
        ),
    ]);
    let r = replay("gateway", TOPOLOGY, &input, &[]);
    let recs = r.records();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[0]["n"], 1);
    assert_eq!(recs[0]["ingress"], "c1");
    assert_eq!(verdict(&recs[0]), ("answered", None));
    // The broadcast also reaches c2; never d1 (another network) nor the ingress... except
    // that the answer goes back to c1.
    assert_eq!(egress_set(&recs[0]), BTreeSet::from(["c1", "c2"]));
    assert_eq!(verdict(&recs[1]), ("answered", None));
    assert_eq!(egress(&recs[1]), vec!["c1"]);
    assert_eq!(recs[2]["ingress"], "uplink");
    assert_eq!(verdict(&recs[2]), ("answered", None));
    assert_eq!(egress(&recs[2]), vec!["uplink"]);

    let frames = r.frames();
    let to_c1 = on(&frames, "c1");
    assert_eq!(to_c1.len(), 2);
    let want_reply = arp(C1_MAC, GW1_MAC, 2, GW1_MAC, GW1, C1_MAC, C1);
    assert_eq!(
        &to_c1[0][..42],
        &want_reply[..],
        "ARP reply from the gateway"
    );
    let echo = seen(to_c1[1]);
    assert_eq!(
        (echo.src, echo.dst, echo.sip, echo.dip, echo.kind, echo.sport),
        (GW1_MAC, C1_MAC, GW1, C1, 0, 0x77),
        "echo reply"
    );
    assert_eq!(on(&frames, "c2"), vec![&arp_request(C1_MAC, C1, GW1)[..]]);
    let up = on(&frames, "uplink");
    assert_eq!(
        &up[0][..42],
        &arp(
            NEXT_HOP,
            UPLINK_MAC,
            2,
            UPLINK_MAC,
            UPLINK_IP,
            NEXT_HOP,
            [192, 0, 2, 1]
        )[..]
    );
    // Each output frame carries the time of the packet that caused it (nanosecond ticks).
    for (port, ticks, _) in &frames {
        let want = match port.as_str() {
            "uplink" => 3_000_000_000,
            _ => 1_000_000_000,
        };
        if port != "c1" {
            assert_eq!(*ticks, want, "{port}");
        }
    }
    assert_eq!(frames.last().unwrap().1, 3_000_000_000);
    assert_eq!(frames.iter().filter(|f| f.1 == 2_000_000_000).count(), 1);
}

#[test]
fn switch_floods_unknown_learns_and_unicasts_within_one_network() {
    let data = b"hello";
    let input = pcapng(&vec![
        pk("c1", 1, udp(C2_MAC, C1_MAC, C1, C2, 1000, 2000, data)),
        pk("c1", 2, udp(STRANGER_MAC, C1_MAC, C1, C2, 1000, 2000, data)),
        pk("c2", 3, udp(C1_MAC, STRANGER_MAC, C2, C1, 2000, 1000, data)),
        pk("c1", 4, udp(STRANGER_MAC, C1_MAC, C1, C2, 1000, 2000, data)),
        pk("d1", 5, arp_request(D1_MAC, D1, [10, 88, 0, 50])),
        pk("c1", 6, udp(D1_MAC, C1_MAC, C1, D1, 1000, 2000, data)),
    ]);
    let r = replay("switching", TOPOLOGY, &input, &[]);
    let recs = r.records();
    let got: Vec<_> = recs.iter().map(|r| (verdict(r), egress(r))).collect();
    assert_eq!(
        got,
        vec![
            (("forwarded", None), vec!["c2"]),
            (("flooded", None), vec!["c2"]),
            (("forwarded", None), vec!["c1"]),
            (("forwarded", None), vec!["c2"]),
            // Alone in its network: nobody else hears it.
            (("flooded", None), vec![]),
            // D1's MAC is unknown in mynet: flooded there, never into "big".
            (("flooded", None), vec!["c2"]),
        ]
    );
    let frames = r.frames();
    assert!(on(&frames, "d1").is_empty());
    // Switched frames leave unchanged.
    assert_eq!(
        on(&frames, "c2")[0],
        &udp(C2_MAC, C1_MAC, C1, C2, 1000, 2000, data)[..]
    );
}

#[test]
fn outbound_udp_and_tcp_are_masqueraded_and_replies_come_back() {
    let out_udp = udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 5000, 53, b"query");
    let syn = tcp(GW1_MAC, C1_MAC, C1, OUTSIDE, 40000, 443, 1000, 0, SYN, b"");
    // A UDP datagram without a checksum (zero) keeps zero.
    let mut nocsum = udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 5001, 9, b"discard");
    nocsum[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);

    // c2 uses c1's source port to the same destination: the external tuple is taken.
    let clash = udp(GW1_MAC, C2_MAC, C2, OUTSIDE, 5000, 53, b"query");

    // Pass 1: learn the NAT ports.
    let first = pcapng(&vec![
        pk("c1", 10, out_udp.clone()),
        pk("c1", 20, syn.clone()),
        pk("c1", 30, nocsum.clone()),
        pk("c2", 35, clash),
    ]);
    let r = replay("snat-out", TOPOLOGY, &first, &[]);
    for rec in r.records() {
        assert_eq!(
            (verdict(&rec), egress(&rec)),
            (("forwarded", None), vec!["uplink"])
        );
    }
    let frames = r.frames();
    let up = on(&frames, "uplink");
    assert_eq!(up.len(), 4);
    let u = seen(up[0]);
    assert_eq!((u.src, u.dst), (UPLINK_MAC, NEXT_HOP));
    assert_eq!((u.sip, u.dip, u.dport, u.ttl), (UPLINK_IP, OUTSIDE, 53, 63));
    assert_eq!(
        u.sport, 5000,
        "a free source port is kept, as Linux masquerade does"
    );
    let t = seen(up[1]);
    assert_eq!(
        (t.sip, t.dip, t.dport, t.kind),
        (UPLINK_IP, OUTSIDE, 443, SYN)
    );
    let z = seen(up[2]);
    assert_eq!(z.sip, UPLINK_IP);
    assert_eq!(
        &up[2][14 + 20 + 6..14 + 20 + 8],
        &[0, 0],
        "UDP checksum zero stays zero"
    );
    let c = seen(up[3]);
    assert_eq!((c.sip, c.dip, c.dport), (UPLINK_IP, OUTSIDE, 53));
    assert!((32768..=60999).contains(&c.sport), "NAT port {}", c.sport);

    // Pass 2: the same, with the replies from outside to the NAT ports.
    let reply_udp = udp(
        UPLINK_MAC, NEXT_HOP, OUTSIDE, UPLINK_IP, 53, u.sport, b"answer",
    );
    let synack = tcp(
        UPLINK_MAC,
        NEXT_HOP,
        OUTSIDE,
        UPLINK_IP,
        443,
        t.sport,
        5000,
        1001,
        SYN | ACK,
        b"",
    );
    let ack = tcp(
        GW1_MAC, C1_MAC, C1, OUTSIDE, 40000, 443, 1001, 5001, ACK, b"",
    );
    let input = pcapng(&vec![
        pk("c1", 10, out_udp),
        pk("c1", 20, syn),
        pk("c1", 30, nocsum),
        pk("uplink", 40, reply_udp),
        pk("uplink", 50, synack),
        pk("c1", 60, ack),
    ]);
    let r = replay("snat-both", TOPOLOGY, &input, &[]);
    let recs = r.records();
    assert_eq!(
        (verdict(&recs[3]), egress(&recs[3])),
        (("forwarded", None), vec!["c1"])
    );
    assert_eq!(
        (verdict(&recs[4]), egress(&recs[4])),
        (("forwarded", None), vec!["c1"])
    );
    assert_eq!(
        (verdict(&recs[5]), egress(&recs[5])),
        (("forwarded", None), vec!["uplink"])
    );
    let frames = r.frames();
    let c1 = on(&frames, "c1");
    let back = seen(c1[0]);
    assert_eq!((back.src, back.dst), (GW1_MAC, C1_MAC));
    assert_eq!(
        (back.sip, back.sport, back.dip, back.dport),
        (OUTSIDE, 53, C1, 5000)
    );
    let sa = seen(c1[1]);
    assert_eq!(
        (sa.sip, sa.sport, sa.dip, sa.dport, sa.kind),
        (OUTSIDE, 443, C1, 40000, SYN | ACK)
    );
    let up = on(&frames, "uplink");
    let a = seen(up[3]);
    assert_eq!(
        (a.sip, a.sport, a.kind),
        (UPLINK_IP, t.sport, ACK),
        "same flow, same NAT port"
    );
}

#[test]
fn published_ports_are_dnatted_keeping_the_client_address() {
    let syn = tcp(
        UPLINK_MAC, NEXT_HOP, CLIENT, UPLINK_IP, 40001, 8080, 7, 0, SYN, b"",
    );
    let synack = tcp(
        GW1_MAC,
        C1_MAC,
        C1,
        CLIENT,
        80,
        40001,
        900,
        8,
        SYN | ACK,
        b"",
    );
    let dns = udp(UPLINK_MAC, NEXT_HOP, CLIENT, UPLINK_IP, 5555, 5353, b"q");
    let private = udp(UPLINK_MAC, NEXT_HOP, CLIENT, C1, 5555, 53, b"q");
    let input = pcapng(&vec![
        pk("uplink", 1, syn),
        pk("c1", 2, synack),
        pk("uplink", 3, dns),
        pk("uplink", 4, private),
    ]);
    let r = replay("dnat", TOPOLOGY, &input, &[]);
    let recs = r.records();
    assert_eq!(
        (verdict(&recs[0]), egress(&recs[0])),
        (("forwarded", None), vec!["c1"])
    );
    assert_eq!(
        (verdict(&recs[1]), egress(&recs[1])),
        (("forwarded", None), vec!["uplink"])
    );
    assert_eq!(
        (verdict(&recs[2]), egress(&recs[2])),
        (("forwarded", None), vec!["c1"])
    );
    assert_eq!(verdict(&recs[3]), ("dropped", Some("not_for_us")));
    assert!(egress(&recs[3]).is_empty());
    let frames = r.frames();
    let c1 = on(&frames, "c1");
    let s = seen(c1[0]);
    assert_eq!((s.src, s.dst), (GW1_MAC, C1_MAC));
    assert_eq!(
        (s.sip, s.sport, s.dip, s.dport, s.kind),
        (CLIENT, 40001, C1, 80, SYN),
        "the client's own address and port reach the container"
    );
    let d = seen(c1[1]);
    assert_eq!((d.sip, d.sport, d.dip, d.dport), (CLIENT, 5555, C1, 53));
    let up = seen(on(&frames, "uplink")[0]);
    assert_eq!((up.src, up.dst), (UPLINK_MAC, NEXT_HOP));
    assert_eq!(
        (up.sip, up.sport, up.dip, up.dport),
        (UPLINK_IP, 8080, CLIENT, 40001)
    );
}

/// A UDP frame of exactly `len` bytes from c1 to `dst_mac`/`dip`.
fn sized(dst_mac: Mac, src_mac: Mac, sip: Ip, dip: Ip, len: usize) -> Vec<u8> {
    let f = udp(dst_mac, src_mac, sip, dip, 1, 2, &vec![0xab; len - 42]);
    assert_eq!(f.len(), len);
    f
}

#[test]
fn runts_and_oversize_frames_are_dropped_and_nothing_oversize_leaves() {
    let big = {
        let l4 = udp_l4(7, 9, &vec![0x5a; 3000]);
        fill_l4(ipv4_with(
            GW2_MAC,
            D1_MAC,
            D1,
            OUTSIDE,
            17,
            IpOpts::default(),
            &l4,
        ))
    };
    let input = pcapng(&vec![
        pk("c1", 1, C2_MAC[..].to_vec()),
        pk(
            "c1",
            2,
            udp(C2_MAC, C1_MAC, C1, C2, 1, 2, b"x")[..13].to_vec(),
        ),
        pk("c1", 3, sized(C2_MAC, C1_MAC, C1, C2, 1519)),
        pk("c1", 4, sized(C2_MAC, C1_MAC, C1, C2, 1518)),
        pk("uplink", 5, vec![0xff; 10]),
        pk(
            "uplink",
            6,
            sized(UPLINK_MAC, NEXT_HOP, OUTSIDE, UPLINK_IP, 1519),
        ),
        // 9000-byte network, 1500-byte uplink, DF set: it cannot leave as it is.
        pk("d1", 7, big),
        pk("d1", 8, sized(GW2_MAC, D1_MAC, D1, OUTSIDE, 9019)),
    ]);
    let r = replay("sizes", TOPOLOGY, &input, &[]);
    let recs = r.records();
    let v: Vec<_> = recs.iter().map(verdict).collect();
    assert_eq!(v[0], ("dropped", Some("runt")));
    assert_eq!(v[1], ("dropped", Some("runt")));
    assert_eq!(v[2], ("dropped", Some("oversize")));
    assert_eq!(v[3], ("forwarded", None));
    assert_eq!(v[4], ("dropped", Some("runt")));
    assert_eq!(v[5], ("dropped", Some("oversize")));
    assert_ne!(v[6].0, "forwarded", "{:?}", recs[6]);
    assert_eq!(v[7], ("dropped", Some("oversize")));
    for i in [0, 1, 2, 4, 5, 7] {
        assert!(egress(&recs[i]).is_empty(), "{:?}", recs[i]);
    }
    for (port, _, f) in r.frames() {
        let mtu = if port == "d1" { 9000 } else { 1500 };
        assert!(f.len() <= mtu + 18, "{} bytes left {port}", f.len());
        assert_ne!(
            port, "uplink",
            "a 3000-byte DF packet went out a 1500-byte uplink"
        );
    }
}

#[test]
fn bad_checksums_are_dropped_unless_partial_csum_completes_them() {
    let mut bad_udp = udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 5000, 53, b"query");
    bad_udp[14 + 20 + 7] ^= 0x55;
    let mut bad_ip = udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 5002, 53, b"query");
    bad_ip[14 + 10] ^= 0x55;
    // What an offloading interface captures: the TCP checksum not filled in yet.
    let mut partial_tcp = tcp(GW1_MAC, C1_MAC, C1, OUTSIDE, 40000, 443, 1, 0, SYN, b"");
    partial_tcp[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&[0x12, 0x34]);
    let input = pcapng(&vec![
        pk("c1", 1, bad_udp),
        pk("c1", 2, bad_ip),
        pk("c1", 3, partial_tcp),
    ]);
    let r = replay("csum", TOPOLOGY, &input, &[]);
    for rec in r.records() {
        assert_eq!(verdict(&rec), ("dropped", Some("bad_checksum")), "{rec}");
        assert!(egress(&rec).is_empty());
    }
    assert!(r.frames().is_empty());

    let r = replay("csum-partial", TOPOLOGY, &input, &["--partial-csum"]);
    for rec in r.records() {
        assert_eq!(
            (verdict(&rec), egress(&rec)),
            (("forwarded", None), vec!["uplink"])
        );
    }
    let frames = r.frames();
    assert_eq!(frames.len(), 3);
    for (_, _, f) in &frames {
        assert_eq!(seen(f).sip, UPLINK_IP);
    }
}

#[test]
fn classic_pcap_enters_the_port_given() {
    let input = pcap(&[
        (1_500_000, ping(GW1_MAC, C1_MAC, C1, GW1, 1, 1)),
        (2_500_000, arp_request(C1_MAC, C1, GW1)),
    ]);
    let r = replay("pcap", TOPOLOGY, &input, &["--port", "c1"]);
    let recs = r.records();
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r["ingress"] == "c1"));
    assert_eq!(verdict(&recs[0]), ("answered", None));
    let frames = r.frames();
    assert_eq!(frames[0].1, 1_500_000_000, "timestamps carry over");

    let e = replay("pcap-noport", TOPOLOGY, &input, &[]);
    assert!(e.error().contains("--port"), "{}", e.stderr);
    let e = replay("pcap-badport", TOPOLOGY, &input, &["--port", "nope"]);
    assert!(e.error().contains("\"nope\""), "{}", e.stderr);
}

#[test]
fn malformed_captures_and_topologies_are_one_line_errors() {
    let good = pcapng(&vec![pk("c1", 1, ping(GW1_MAC, C1_MAC, C1, GW1, 1, 1))]);
    let unknown = pcapng(&vec![
        pk("c1", 1, ping(GW1_MAC, C1_MAC, C1, GW1, 1, 1)),
        pk("eth7", 2, ping(GW1_MAC, C1_MAC, C1, GW1, 1, 2)),
    ]);
    let e = replay("unknown-iface", TOPOLOGY, &unknown, &[]);
    let line = e.error();
    assert!(
        line.contains("\"eth7\"") && line.contains("packet 2"),
        "{line}"
    );
    assert!(e.out.is_empty(), "no output file on error");

    let truncated = &good[..good.len() - 5];
    assert!(replay("truncated", TOPOLOGY, truncated, &[])
        .error()
        .contains("truncated"));
    replay("garbage", TOPOLOGY, b"this is not a capture", &[]).error();
    replay("empty", TOPOLOGY, b"", &[]).error();

    let topologies = [
        TOPOLOGY.replace("[[network]]\nname = \"big\"", "[[network]\nname = \"big\""),
        TOPOLOGY.replace("mtu = 9000", "mtu = 9000\ncolour = \"blue\""),
        TOPOLOGY.replace("10.88.0.0/24", "10.77.0.0/16"),
        TOPOLOGY.replace("ip = \"10.88.0.2\"", "ip = \"10.77.0.9\""),
        TOPOLOGY.replace("name = \"c2\"", "name = \"c1\""),
        TOPOLOGY.replace("network = \"big\"", "network = \"small\""),
        TOPOLOGY.replace("02:00:00:00:77:03", "02:00:00:00:77"),
        TOPOLOGY.replace("\"8080:80\"", "\"8080:80:70:60\""),
        TOPOLOGY.replace("max = 1024", "max = -1"),
    ];
    for (i, t) in topologies.iter().enumerate() {
        assert_ne!(t, TOPOLOGY, "case {i} changed nothing");
        let line = replay(&format!("bad-topology-{i}"), t, &good, &[])
            .error()
            .to_string();
        assert!(line.contains("topology"), "case {i}: {line}");
    }
    assert_eq!(replay("good", TOPOLOGY, &good, &[]).records().len(), 1);
}

/// A capture with a bit of everything, for determinism and golden files.
fn mixed() -> Packets {
    let mut p = Vec::new();
    let mut t = 1_700_000_000_000_000u64;
    let mut add = |port: &str, f: Vec<u8>| {
        t += 1500;
        p.push(pk(port, t, f));
    };
    add("c1", arp_request(C1_MAC, C1, GW1));
    add("c1", ping(GW1_MAC, C1_MAC, C1, GW1, 9, 1));
    for i in 0..4u16 {
        add("c1", udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 6000 + i, 53, b"q"));
        add(
            "c2",
            tcp(GW1_MAC, C2_MAC, C2, OUTSIDE, 41000 + i, 80, 1, 0, SYN, b""),
        );
    }
    add("c1", ping(GW1_MAC, C1_MAC, C1, OUTSIDE, 77, 1));
    add(
        "uplink",
        tcp(
            UPLINK_MAC, NEXT_HOP, CLIENT, UPLINK_IP, 40001, 8080, 7, 0, SYN, b"",
        ),
    );
    add("c2", udp(C1_MAC, C2_MAC, C2, C1, 1, 2, b"x"));
    add("d1", udp(GW2_MAC, D1_MAC, D1, C1, 1, 2, b"across"));
    p
}

#[test]
fn replay_is_deterministic_and_causal() {
    let packets = mixed();
    let input = pcapng(&packets);
    let a = replay("det-a", TOPOLOGY, &input, &[]);
    let b = replay("det-b", TOPOLOGY, &input, &[]);
    assert_eq!(a.code, 0, "{}", a.stderr);
    assert!(!a.out.is_empty());
    assert_eq!(a.out, b.out, "byte-identical output");
    assert_eq!(a.stdout, b.stdout);
    // What packet k causes depends only on packets 1..k: a prefix replays to a prefix.
    let k = packets.len() / 2;
    let prefix = replay("det-prefix", TOPOLOGY, &pcapng(&packets[..k].to_vec()), &[]);
    let all = a.records();
    assert_eq!(prefix.records()[..], all[..k]);
    let pf = prefix.frames();
    assert_eq!(pf[..], a.frames()[..pf.len()]);
    // Without --json: a summary line, and the same output file.
    let d = dir("det-summary");
    std::fs::write(d.join("t.toml"), TOPOLOGY).unwrap();
    std::fs::write(d.join("in.pcapng"), &input).unwrap();
    let o = Command::new(BIN)
        .args(["replay", "--topology"])
        .arg(d.join("t.toml"))
        .arg("--in")
        .arg(d.join("in.pcapng"))
        .arg("--out")
        .arg(d.join("out.pcapng"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(
        s.starts_with(&format!("{} packets in", packets.len())),
        "{s}"
    );
    assert_eq!(std::fs::read(d.join("out.pcapng")).unwrap(), a.out);
}

// ---- golden files ----

fn golden_cases() -> Vec<(&'static str, Packets)> {
    let gateway = vec![
        pk("c1", 1_000_000, arp_request(C1_MAC, C1, GW1)),
        pk("c1", 1_100_000, ping(GW1_MAC, C1_MAC, C1, GW1, 0x77, 1)),
        pk(
            "c1",
            1_200_000,
            udp(C2_MAC, C1_MAC, C1, C2, 1000, 2000, b"hi c2"),
        ),
        pk(
            "c1",
            1_300_000,
            udp(STRANGER_MAC, C1_MAC, C1, C2, 1000, 2000, b"who?"),
        ),
        pk(
            "uplink",
            1_400_000,
            arp_request(NEXT_HOP, [192, 0, 2, 1], UPLINK_IP),
        ),
        pk("c2", 1_500_000, arp_request(C2_MAC, C2, GW1)),
    ];
    let mut t = 2_000_000;
    let mut nat = Vec::new();
    let mut add = |port: &str, f: Vec<u8>| {
        t += 100_000;
        nat.push(pk(port, t, f));
    };
    add("c1", udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 5000, 53, b"query"));
    add(
        "uplink",
        udp(
            UPLINK_MAC, NEXT_HOP, OUTSIDE, UPLINK_IP, 53, 5000, b"answer",
        ),
    );
    add("c2", udp(GW1_MAC, C2_MAC, C2, OUTSIDE, 5000, 53, b"query"));
    // c2's flow could not keep port 5000: the allocator gave it 52545 (seeded, reproducible).
    add(
        "uplink",
        udp(
            UPLINK_MAC,
            NEXT_HOP,
            OUTSIDE,
            UPLINK_IP,
            53,
            52545,
            b"answer 2",
        ),
    );
    add(
        "c2",
        tcp(GW1_MAC, C2_MAC, C2, OUTSIDE, 40000, 443, 100, 0, SYN, b""),
    );
    add(
        "uplink",
        tcp(
            UPLINK_MAC,
            NEXT_HOP,
            OUTSIDE,
            UPLINK_IP,
            443,
            40000,
            900,
            101,
            SYN | ACK,
            b"",
        ),
    );
    add(
        "c2",
        tcp(GW1_MAC, C2_MAC, C2, OUTSIDE, 40000, 443, 101, 901, ACK, b""),
    );
    add("c1", ping(GW1_MAC, C1_MAC, C1, OUTSIDE, 0x4242, 1));
    add("uplink", {
        let l4 = echo_l4(false, 0x4242, 1, b"switchyard-ping!");
        fill_l4(ipv4_with(
            UPLINK_MAC,
            NEXT_HOP,
            OUTSIDE,
            UPLINK_IP,
            1,
            IpOpts::default(),
            &l4,
        ))
    });
    add(
        "uplink",
        tcp(
            UPLINK_MAC, NEXT_HOP, CLIENT, UPLINK_IP, 40001, 8080, 7, 0, SYN, b"",
        ),
    );
    add(
        "c1",
        tcp(
            GW1_MAC,
            C1_MAC,
            C1,
            CLIENT,
            80,
            40001,
            500,
            8,
            SYN | ACK,
            b"",
        ),
    );
    add(
        "uplink",
        udp(UPLINK_MAC, NEXT_HOP, CLIENT, UPLINK_IP, 5555, 5353, b"dns?"),
    );
    let mut bad_csum = udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 5000, 53, b"query");
    bad_csum[14 + 20 + 7] ^= 0x01;
    let ttl1 = fill_l4(ipv4_with(
        GW1_MAC,
        C1_MAC,
        C1,
        OUTSIDE,
        17,
        IpOpts {
            ttl: 1,
            ..IpOpts::default()
        },
        &udp_l4(33434, 33434, b"traceroute"),
    ));
    let drops = vec![
        pk("c1", 10, vec![0x02; 13]),
        pk("c1", 20, sized(C2_MAC, C1_MAC, C1, C2, 1519)),
        pk("c1", 30, bad_csum),
        pk(
            "c1",
            40,
            udp(GW1_MAC, C1_MAC, C1, D1, 1, 2, b"to another network"),
        ),
        pk(
            "uplink",
            50,
            udp(UPLINK_MAC, NEXT_HOP, OUTSIDE, C1, 53, 5000, b"private"),
        ),
        pk(
            "c1",
            60,
            vlan(&udp(C2_MAC, C1_MAC, C1, C2, 1, 2, b"tagged"), 5),
        ),
        pk("c1", 70, eth(GW1_MAC, C1_MAC, 0x86dd, &[0x60; 40])),
        pk("c1", 80, ttl1),
    ];
    vec![("gateway", gateway), ("nat", nat), ("drops", drops)]
}

#[test]
fn golden() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/replay");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (name, packets) in golden_cases() {
        let d = root.join(name);
        let (topo, input) = (d.join("topology.toml"), d.join("in.pcapng"));
        let (jsonl, out) = (d.join("expected.jsonl"), d.join("expected-out.pcapng"));
        if update {
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(&topo, TOPOLOGY).unwrap();
            std::fs::write(&input, pcapng(&packets)).unwrap();
        }
        assert!(
            input.exists(),
            "{} is missing: run UPDATE_GOLDEN=1 cargo test -p switchyard --test replay golden",
            input.display()
        );
        let tmp = dir(&format!("golden-{name}"));
        let r = replay_files(&topo, &input, &tmp.join("out.pcapng"), &[]);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        if update {
            std::fs::write(&jsonl, &r.stdout).unwrap();
            std::fs::write(&out, &r.out).unwrap();
        }
        let want = std::fs::read_to_string(&jsonl).unwrap();
        assert_eq!(
            r.stdout,
            want,
            "{name}: --json differs from {}",
            jsonl.display()
        );
        assert!(
            r.out == std::fs::read(&out).unwrap(),
            "{name}: output differs from {}",
            out.display()
        );
        // Whatever the golden says, every IPv4 frame that left has valid checksums.
        for (_, _, f) in r.frames() {
            if f.len() > 14 && f[12..14] == [0x08, 0x00] {
                seen(&f);
            }
        }
    }
}
