//! Writes the seed corpora, fuzz/corpus/<target>/seed-*, from real frames:
//! `cargo run --manifest-path fuzz/Cargo.toml --bin gen-corpus` (the files are committed; run
//! it again after changing a seed or the op encoding).

use std::path::{Path, PathBuf};

use switchyard_fuzz::frames::*;
use switchyard_fuzz::{encode_ops, Frame, Op, HOST_OP, MODE_OP};

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
const GW3_MAC: Mac = [2, 0, 0, 0, 0x99, 1];
const I1_MAC: Mac = [2, 0, 0, 0, 0x99, 2];
const I1: Ip = [10, 99, 0, 2];
const OUTSIDE: Ip = [198, 51, 100, 7];
const CLIENT: Ip = [203, 0, 113, 5];

// Ports of the nat target (TOPOLOGY's endpoint order, then the uplink).
const P_C1: u8 = 0;
const P_C2: u8 = 1;
const P_D1: u8 = 2;
const P_I1: u8 = 3;
const P_UP: u8 = 4;

fn from_c1(l4: Vec<u8>, proto: u8, dip: Ip) -> Vec<u8> {
    fill_l4(ipv4_with(
        GW1_MAC,
        C1_MAC,
        C1,
        dip,
        proto,
        IpOpts::default(),
        &l4,
    ))
}

fn to_uplink(sip: Ip, l4: Vec<u8>, proto: u8) -> Vec<u8> {
    fill_l4(ipv4_with(
        UPLINK_MAC,
        NEXT_HOP,
        sip,
        UPLINK_IP,
        proto,
        IpOpts::default(),
        &l4,
    ))
}

/// A UDP datagram from c1 to the outside in two fragments (checksum over the whole).
fn fragments() -> (Vec<u8>, Vec<u8>) {
    let whole = udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 7000, 7001, &[0x42; 40]);
    let l4 = &whole[34..];
    let first = ipv4_with(
        GW1_MAC,
        C1_MAC,
        C1,
        OUTSIDE,
        17,
        IpOpts {
            frag: 0x2000,
            id: 0x99,
            ..IpOpts::default()
        },
        &l4[..24],
    );
    let second = ipv4_with(
        GW1_MAC,
        C1_MAC,
        C1,
        OUTSIDE,
        17,
        IpOpts {
            frag: 3,
            id: 0x99,
            ..IpOpts::default()
        },
        &l4[24..],
    );
    (first, second)
}

/// An ICMP port unreachable from the outside about c1's masqueraded UDP flow.
fn icmp_unreachable() -> Vec<u8> {
    let inner = udp(NEXT_HOP, UPLINK_MAC, UPLINK_IP, OUTSIDE, 5000, 53, b"query");
    let mut l4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&inner[14..14 + 28]);
    to_uplink(OUTSIDE, l4, 1)
}

/// Single frames, each named.
fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let (frag1, frag2) = fragments();
    let mut bad_ip = from_c1(udp_l4(5000, 53, b"q"), 17, OUTSIDE);
    bad_ip[24] ^= 0xff;
    let mut bad_l4 = from_c1(udp_l4(5000, 53, b"q"), 17, OUTSIDE);
    bad_l4[41] ^= 0xff;
    let mut long_total = from_c1(udp_l4(5000, 53, b"q"), 17, OUTSIDE);
    long_total[16] = 0x40;
    let mut bad_ihl = from_c1(udp_l4(5000, 53, b"q"), 17, OUTSIDE);
    bad_ihl[14] = 0x4f;
    let mut options = from_c1(udp_l4(5000, 53, b"q"), 17, OUTSIDE);
    options[14] = 0x46;
    options.splice(34..34, [1, 1, 1, 0]);
    vec![
        ("arp-gateway", arp_request(C1_MAC, C1, GW1)),
        (
            "arp-reply-next-hop",
            arp(
                UPLINK_MAC,
                NEXT_HOP,
                2,
                NEXT_HOP,
                [192, 0, 2, 1],
                UPLINK_MAC,
                UPLINK_IP,
            ),
        ),
        (
            "arp-uplink",
            arp_request(NEXT_HOP, [192, 0, 2, 1], UPLINK_IP),
        ),
        ("ping-gateway", ping(GW1_MAC, C1_MAC, C1, GW1, 1, 1)),
        ("ping-outside", ping(GW1_MAC, C1_MAC, C1, OUTSIDE, 2, 1)),
        (
            "ping-uplink",
            ping(UPLINK_MAC, NEXT_HOP, CLIENT, UPLINK_IP, 3, 1),
        ),
        (
            "tcp-syn-out",
            tcp(GW1_MAC, C1_MAC, C1, OUTSIDE, 40000, 443, 1, 0, SYN, b""),
        ),
        (
            "tcp-syn-published",
            tcp(
                UPLINK_MAC, NEXT_HOP, CLIENT, UPLINK_IP, 40001, 8080, 1, 0, SYN, b"",
            ),
        ),
        (
            "tcp-rst",
            tcp(GW1_MAC, C1_MAC, C1, OUTSIDE, 40000, 443, 1, 0, RST, b""),
        ),
        (
            "tcp-syn-gateway",
            tcp(GW1_MAC, C1_MAC, C1, GW1, 40000, 22, 1, 0, SYN, b""),
        ),
        (
            "udp-out",
            udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 5000, 53, b"query"),
        ),
        ("udp-c2", udp(C2_MAC, C1_MAC, C1, C2, 5000, 53, b"query")),
        (
            "udp-hairpin",
            udp(GW1_MAC, C2_MAC, C2, UPLINK_IP, 5000, 5353, b"q"),
        ),
        (
            "udp-inter-network",
            udp(GW1_MAC, C1_MAC, C1, D1, 1, 2, b"x"),
        ),
        (
            "udp-internal",
            udp(GW3_MAC, I1_MAC, I1, OUTSIDE, 1, 2, b"x"),
        ),
        ("frag-first", frag1),
        ("frag-second", frag2),
        ("icmp-unreachable", icmp_unreachable()),
        ("vlan", vlan(&udp(C2_MAC, C1_MAC, C1, C2, 1, 2, b"x"), 7)),
        ("ipv6", eth(GW1_MAC, C1_MAC, 0x86dd, &[0x60; 48])),
        ("bad-ip-checksum", bad_ip),
        ("bad-udp-checksum", bad_l4),
        ("ip-total-too-long", long_total),
        ("ip-bad-ihl", bad_ihl),
        ("ip-options", options),
        ("runt", vec![0xff; 13]),
        (
            "truncated-ip",
            ping(GW1_MAC, C1_MAC, C1, GW1, 1, 1)[..30].to_vec(),
        ),
        (
            "big-d1",
            udp(GW2_MAC, D1_MAC, D1, OUTSIDE, 1, 2, &[0x33; 4000]),
        ),
    ]
}

fn op(port: u8, dt_ms: u16, f: Vec<u8>) -> Op {
    Op {
        port,
        flags: 0,
        dt_ms,
        frame: Frame(f),
    }
}

/// Sequences for the nat target (ports: c1, c2, d1, i1, uplink).
fn nat_sequences() -> Vec<(&'static str, Vec<Op>)> {
    let (frag1, frag2) = fragments();
    let c1 = |sp, dp, seq, ack, fl| tcp(GW1_MAC, C1_MAC, C1, OUTSIDE, sp, dp, seq, ack, fl, b"");
    let out = |sp, dp, seq, ack, fl| {
        tcp(
            UPLINK_MAC, NEXT_HOP, OUTSIDE, UPLINK_IP, sp, dp, seq, ack, fl, b"",
        )
    };
    let tcp_session = vec![
        op(P_C1, 0, c1(40000, 443, 100, 0, SYN)),
        op(P_UP, 10, out(443, 40000, 900, 101, SYN | ACK)),
        op(P_C1, 10, c1(40000, 443, 101, 901, ACK)),
        op(
            P_C1,
            10,
            tcp(
                GW1_MAC,
                C1_MAC,
                C1,
                OUTSIDE,
                40000,
                443,
                101,
                901,
                PSH | ACK,
                b"GET /",
            ),
        ),
        op(P_UP, 10, out(443, 40000, 901, 106, ACK)),
        op(P_C1, 10, c1(40000, 443, 106, 901, FIN | ACK)),
        op(P_UP, 10, out(443, 40000, 901, 107, FIN | ACK)),
        op(P_C1, 10, c1(40000, 443, 107, 902, ACK)),
    ];
    let published = vec![
        op(
            P_UP,
            0,
            tcp(
                UPLINK_MAC, NEXT_HOP, CLIENT, UPLINK_IP, 40001, 8080, 7, 0, SYN, b"",
            ),
        ),
        op(
            P_C1,
            5,
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
        ),
        op(
            P_UP,
            5,
            tcp(
                UPLINK_MAC, NEXT_HOP, CLIENT, UPLINK_IP, 40001, 8080, 8, 501, RST, b"",
            ),
        ),
        op(P_UP, 5, to_uplink(CLIENT, udp_l4(5555, 5353, b"dns"), 17)),
        op(
            P_C2,
            5,
            udp(GW1_MAC, C2_MAC, C2, UPLINK_IP, 6000, 5353, b"hairpin"),
        ),
    ];
    let udp_icmp = vec![
        op(
            P_C1,
            0,
            udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 5000, 53, b"query"),
        ),
        op(P_UP, 5, to_uplink(OUTSIDE, udp_l4(53, 5000, b"answer"), 17)),
        op(P_UP, 5, icmp_unreachable()),
        op(P_C1, 5, ping(GW1_MAC, C1_MAC, C1, OUTSIDE, 0x42, 1)),
        op(
            P_UP,
            5,
            to_uplink(OUTSIDE, echo_l4(false, 0x42, 1, b"switchyard-ping!"), 1),
        ),
        op(P_C1, 5, frag1),
        op(P_C1, 1, frag2),
        op(
            P_D1,
            5,
            udp(GW2_MAC, D1_MAC, D1, OUTSIDE, 1, 2, &[0x33; 4000]),
        ),
        op(P_I1, 5, udp(GW3_MAC, I1_MAC, I1, OUTSIDE, 1, 2, b"x")),
    ];
    // More flows than the table holds, then time enough for them to expire.
    let mut flood: Vec<Op> = (0..24u16)
        .map(|i| {
            op(
                P_C1,
                1,
                udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 10000 + i, 53, b"q"),
            )
        })
        .collect();
    flood.push(Op {
        flags: 2,
        ..op(P_C1, 60000, udp(GW1_MAC, C1_MAC, C1, OUTSIDE, 9, 53, b"q"))
    });
    let mut partial = c1(40002, 443, 1, 0, SYN);
    partial[50..52].copy_from_slice(&[0, 0]);
    let offload = vec![Op {
        flags: 1,
        ..op(P_C1, 0, partial)
    }];
    // TCP GSO super-frames (flags: partial checksum, GSO, segment size 88 + 44 * 31) both ways
    // of an established masquerade flow.
    let body: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let big = |mut f: Vec<u8>, src: [u8; 4], dst: [u8; 4]| {
        let s = switchyard_switch::gso::pseudo_sum4(src, dst, 6, f.len() - 34);
        f[50..52].copy_from_slice(&s.to_be_bytes());
        Op {
            flags: 1 | 4 | (31 << 3),
            ..op(P_C1, 5, f)
        }
    };
    let gso = vec![
        op(P_C1, 0, c1(40003, 443, 100, 0, SYN)),
        op(P_UP, 10, out(443, 40003, 900, 101, SYN | ACK)),
        big(
            tcp(
                GW1_MAC,
                C1_MAC,
                C1,
                OUTSIDE,
                40003,
                443,
                101,
                901,
                PSH | ACK,
                &body,
            ),
            C1,
            OUTSIDE,
        ),
        Op {
            port: P_UP,
            ..big(
                tcp(
                    UPLINK_MAC,
                    NEXT_HOP,
                    OUTSIDE,
                    UPLINK_IP,
                    443,
                    40003,
                    901,
                    20101,
                    PSH | ACK,
                    &body,
                ),
                OUTSIDE,
                UPLINK_IP,
            )
        },
    ];
    vec![
        ("gso-session", gso),
        ("tcp-session", tcp_session),
        ("published", published),
        ("udp-icmp-frag", udp_icmp),
        ("table-flood", flood),
        ("partial-csum", offload),
    ]
}

/// A [`MODE_OP`] (flags: bit 0 host uplink on, bit 1 raw uplink off).
fn mode(flags: u8) -> Op {
    Op {
        port: MODE_OP,
        flags,
        ..op(0, 0, Vec::new())
    }
}

/// A [`HOST_OP`]: the IPv4 packet of `f`, from the host uplink, with these flags.
fn from_host(flags: u8, f: &[u8]) -> Op {
    Op {
        port: HOST_OP,
        flags,
        ..op(0, 5, f[14..].to_vec())
    }
}

/// A TCP super-packet from the host uplink to `dst` (segment size 300 * `seg`), its checksum
/// field holding the pseudo-header sum as the socket uplink writes it.
fn host_gso(dst_mac: Mac, gw_mac: Mac, dst: Ip, seg: u8, body: &[u8]) -> Op {
    let mut f = tcp(
        dst_mac,
        gw_mac,
        OUTSIDE,
        dst,
        443,
        40010,
        901,
        101,
        PSH | ACK,
        body,
    );
    let s = switchyard_switch::gso::pseudo_sum4(OUTSIDE, dst, 6, f.len() - 34);
    f[50..52].copy_from_slice(&s.to_be_bytes());
    from_host(1 | 4 | (seg << 3), &f)
}

/// Host (socket uplink) mode: c1's TCP session to the outside through the host uplink, GSO
/// super-packets back into both networks, UDP to a gateway, d1's large datagram, the
/// internal network refused both ways; then the raw uplink back.
fn host_session() -> Vec<Op> {
    let body: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
    let c1 = |fl, data: &[u8]| tcp(GW1_MAC, C1_MAC, C1, OUTSIDE, 40010, 443, 100, 0, fl, data);
    // A super-packet marked as a first fragment: refused (no segmentation cuts it).
    let mut frag = host_gso(C1_MAC, GW1_MAC, C1, 4, &body);
    frag.frame.0[6] |= 0x20;
    smoltcp::wire::Ipv4Packet::new_unchecked(&mut frag.frame.0[..]).fill_checksum();
    vec![
        mode(1 | 2),
        op(P_C1, 0, c1(SYN, b"")),
        from_host(
            0,
            &tcp(
                C1_MAC,
                GW1_MAC,
                OUTSIDE,
                C1,
                443,
                40010,
                900,
                101,
                SYN | ACK,
                b"",
            ),
        ),
        op(P_C1, 5, c1(ACK, b"")),
        op(P_C1, 5, c1(PSH | ACK, b"GET /")),
        host_gso(C1_MAC, GW1_MAC, C1, 4, &body),
        host_gso(D1_MAC, GW2_MAC, D1, 29, &body),
        host_gso(C1_MAC, GW1_MAC, C1, 5, &body),
        frag,
        op(P_C1, 5, udp(GW1_MAC, C1_MAC, C1, GW1, 5000, 7000, b"local")),
        op(P_C1, 5, ping(GW1_MAC, C1_MAC, C1, GW1, 7, 1)),
        op(
            P_D1,
            5,
            udp(GW2_MAC, D1_MAC, D1, OUTSIDE, 1, 2, &[0x33; 4000]),
        ),
        op(P_I1, 5, udp(GW3_MAC, I1_MAC, I1, OUTSIDE, 1, 2, b"x")),
        from_host(0, &udp(I1_MAC, GW3_MAC, OUTSIDE, I1, 2, 1, b"x")),
        from_host(0, &udp(C2_MAC, GW1_MAC, OUTSIDE, C2, 53, 5000, b"answer")),
        mode(0),
        from_host(0, &udp(C2_MAC, GW1_MAC, OUTSIDE, C2, 53, 5000, b"raw")),
        op(P_C1, 5, c1(SYN, b"")),
    ]
}

/// Sequences for the nat target with uplink mode changes and packets from the host uplink
/// (not for replay: a capture has neither).
fn host_sequences() -> Vec<(&'static str, Vec<Op>)> {
    vec![
        ("host-session", host_session()),
        ("host-mode-both", host_modes(1)),
        ("host-mode-none", host_modes(2)),
    ]
}

/// The other uplink modes (`flags` of the [`MODE_OP`]) with traffic both ways.
fn host_modes(flags: u8) -> Vec<Op> {
    vec![
        mode(flags),
        op(
            P_C1,
            0,
            tcp(GW1_MAC, C1_MAC, C1, OUTSIDE, 40011, 443, 1, 0, SYN, b""),
        ),
        from_host(0, &udp(C1_MAC, GW1_MAC, OUTSIDE, C1, 53, 5000, b"answer")),
        op(P_UP, 5, to_uplink(OUTSIDE, udp_l4(53, 5000, b"answer"), 17)),
    ]
}

/// Sequences for the switch target (ports 0-8; 0, 3, 6 have static MACs 02:00:00:00:p:01).
fn switch_sequences() -> Vec<(&'static str, Vec<Op>)> {
    let m = |p: u8| [2, 0, 0, 0, p, 1];
    let dyn_mac = |p: u8| [2, 0, 0, 0, p, 0x55];
    let u = |dst, src| udp(dst, src, C1, C2, 1, 2, b"x");
    vec![
        (
            "learn-unicast",
            vec![
                op(1, 0, u(m(0), dyn_mac(1))),
                op(0, 10, u(dyn_mac(1), m(0))),
                op(2, 10, u(dyn_mac(1), dyn_mac(2))),
                op(1, 10, u(BROADCAST, dyn_mac(1))),
            ],
        ),
        (
            "move-and-age",
            vec![
                op(1, 0, u(BROADCAST, dyn_mac(1))),
                op(2, 10, u(BROADCAST, dyn_mac(1))),
                Op {
                    flags: 2,
                    ..op(0, 20000, u(dyn_mac(1), m(0)))
                },
                Op {
                    flags: 4,
                    ..op(2, 10, u(dyn_mac(1), m(0)))
                },
            ],
        ),
        (
            "spoof-and-static",
            vec![
                op(4, 0, u(BROADCAST, [2, 0, 0, 0, 9, 9])),
                op(5, 0, u(BROADCAST, m(3))),
                op(7, 0, u(m(6), [2, 0, 0, 0, 7, 7])),
                op(8, 0, vec![0xab; 100]),
            ],
        ),
    ]
}

fn requests() -> Vec<(&'static str, &'static str)> {
    vec![
        ("version", r#"{"v":1,"id":1,"method":"version"}"#),
        (
            "network-create",
            r#"{"v":1,"id":2,"method":"network.create","params":{"name":"n","subnet":"10.1.0.0/24","gateway":"10.1.0.1","internal":true,"mtu":9000}}"#,
        ),
        (
            "network-ls",
            r#"{"v":1,"id":3,"method":"network.ls","params":{}}"#,
        ),
        (
            "network-inspect",
            r#"{"v":1,"id":4,"method":"network.inspect","params":{"name":"n"}}"#,
        ),
        (
            "network-rm",
            r#"{"v":1,"id":5,"method":"network.rm","params":{"name":"n","force":true}}"#,
        ),
        (
            "connect",
            r#"{"v":1,"id":6,"method":"endpoint.connect","params":{"network":"n","pid":42,"name":"c1","ip":"10.1.0.5","mac":"02:42:ac:11:00:02","ifname":"eth0","type":"veth","publish":["8080:80","127.0.0.1:53:53/udp"]}}"#,
        ),
        (
            "disconnect",
            r#"{"v":1,"id":7,"method":"endpoint.disconnect","params":{"network":"n","name":"c1"}}"#,
        ),
        (
            "publish",
            r#"{"v":1,"id":8,"method":"port.publish","params":{"network":"n","name":"c1","specs":["80"]}}"#,
        ),
        (
            "unpublish",
            r#"{"v":1,"id":9,"method":"port.unpublish","params":{"network":"n","name":"c1","specs":["80"]}}"#,
        ),
        (
            "port-list",
            r#"{"v":1,"id":10,"method":"port.list","params":{"network":"n","name":"c1"}}"#,
        ),
        (
            "macs",
            r#"{"v":1,"id":11,"method":"macs","params":{"network":"n"}}"#,
        ),
        ("stats", r#"{"v":1,"id":12,"method":"stats"}"#),
        ("conntrack", r#"{"v":1,"id":13,"method":"conntrack"}"#),
        (
            "capture",
            r#"{"v":1,"id":14,"method":"capture","params":{"network":"n","name":"c1"}}"#,
        ),
        ("bad-version", r#"{"v":2,"id":15,"method":"stats"}"#),
        ("bad-json", r#"{"v":1,"id":16,"method":"#),
        (
            "bad-params",
            r#"{"v":1,"id":17,"method":"network.create","params":{"name":5,"subnet":"10.0.0.1/24"}}"#,
        ),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn main() {
    let root: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let singles = frames();

    // frame: [selector][frame]; the selector picks the ingress port (low 7 bits) and the
    // partial-checksum flag (high bit).
    for (name, f) in &singles {
        let sel = if name.contains("uplink")
            || name.contains("published")
            || name.contains("unreachable")
            || name.contains("next-hop")
        {
            P_UP
        } else if name.contains("d1") {
            P_D1
        } else if name.contains("internal") {
            P_I1
        } else if name.contains("hairpin") {
            P_C2
        } else {
            P_C1
        };
        let mut v = vec![sel];
        v.extend_from_slice(f);
        write(&root.join("frame"), name, &v);
    }
    for (name, ops) in nat_sequences().into_iter().chain(host_sequences()) {
        write(&root.join("nat"), name, &encode_ops(&ops));
    }
    // Each single frame is also a one-op nat input.
    for (name, f) in &singles {
        let port = if name.contains("uplink") || name.contains("unreachable") {
            P_UP
        } else {
            P_C1
        };
        write(
            &root.join("nat"),
            name,
            &encode_ops(&[op(port, 0, f.clone())]),
        );
    }
    // uplink: the IPv4 packets of the single frames, as the router hands them to the socket
    // uplink (no Ethernet header).
    for (name, f) in &singles {
        if f.len() > 14 && f[12..14] == [0x08, 0x00] {
            write(&root.join("uplink"), name, &f[14..]);
        }
    }
    for (name, ops) in switch_sequences() {
        write(&root.join("switch"), name, &encode_ops(&ops));
    }
    for (name, line) in requests() {
        write(&root.join("control"), name, line.as_bytes());
    }

    // replay: captures. Ports: c1, c2, d1, i1, uplink.
    let names = ["c1", "c2", "d1", "i1", "uplink"];
    for (name, ops) in nat_sequences() {
        let mut t = 1_000_000u64;
        let packets: Packets = ops
            .iter()
            .map(|o| {
                t += u64::from(o.dt_ms) * 1000;
                (
                    names[usize::from(o.port) % 5].to_string(),
                    t,
                    o.frame.0.clone(),
                )
            })
            .collect();
        write(
            &root.join("replay"),
            &format!("{name}.pcapng"),
            &pcapng(&packets),
        );
    }
    let classic: Vec<(u64, Vec<u8>)> = singles
        .iter()
        .enumerate()
        .map(|(i, (_, f))| (i as u64 * 1000, f.clone()))
        .collect();
    write(&root.join("replay"), "classic.pcap", &pcap(&classic));
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../control/tests/replay");
    for case in ["gateway", "nat", "drops"] {
        if let Ok(b) = std::fs::read(golden.join(case).join("in.pcapng")) {
            write(&root.join("replay"), &format!("golden-{case}.pcapng"), &b);
        }
    }
    println!("seed corpora written under {}", root.display());
}
