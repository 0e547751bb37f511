//! DNS through the in-memory pipeline: frames in, frames out, checksums verified.

use std::net::{Ipv4Addr, SocketAddrV4};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use switchyard_nat::{NetworkConfig, RouterConfig, RxMeta, UplinkConfig};
use switchyard_switch::{Instant, MacAddr, NetworkId, PortId, SwitchConfig};

use super::packet::{udp_frame, udp_to};
use super::NetInfo;
use crate::pipeline::{Out, Pipeline, Verdict};

const UP_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UP_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x10]);
const NEXT_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x01]);
pub(super) const UPSTREAM: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 53), 53);

pub(super) struct Net {
    pub(super) id: NetworkId,
    pub(super) gw: Ipv4Addr,
    pub(super) gw_mac: MacAddr,
}

pub(super) fn net(p: &mut Pipeline, n: u8, dns: bool) -> Net {
    let id = NetworkId(u16::from(n));
    let gw = Ipv4Addr::new(10, n, 0, 1);
    let gw_mac = MacAddr([2, 0, 0, n, 0, 1]);
    let cfg = NetworkConfig {
        id,
        subnet: Ipv4Addr::new(10, n, 0, 0),
        prefix_len: 24,
        gateway_ip: gw,
        gateway_mac: gw_mac,
        internal: false,
        mtu: 1500,
    };
    p.add_network(cfg, PortId(1000 + u32::from(n)), Instant::ZERO)
        .unwrap();
    if dns {
        p.set_dns_network(
            id,
            Some(NetInfo {
                subnet: cfg.subnet,
                prefix_len: 24,
                gateway: gw,
                internal: false,
                search: Vec::new(),
                mtu: 1500,
            }),
        );
    }
    Net { id, gw, gw_mac }
}

pub(super) fn endpoint(
    p: &mut Pipeline,
    n: &Net,
    port: u32,
    host: u8,
    names: &[&str],
) -> (Ipv4Addr, MacAddr) {
    let o = n.gw.octets();
    let ip = Ipv4Addr::new(o[0], o[1], o[2], host);
    let mac = MacAddr([2, 0, 0, o[1], 0, host]);
    p.add_endpoint(PortId(port), n.id, ip, mac, &[], Instant::ZERO)
        .unwrap();
    if p.dns.names.serves(n.id) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        p.dns.names.add(n.id, ip, &names).unwrap();
    }
    (ip, mac)
}

pub(super) fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

type Sent = Vec<(Out, Vec<u8>)>;

fn send(p: &mut Pipeline, port: u32, frame: &[u8], now: Instant) -> (Verdict, Sent) {
    let mut sent = Vec::new();
    let v = p.from_port(PortId(port), frame, RxMeta::default(), now, &mut |o, f| {
        sent.push((o, f.to_vec()));
        true
    });
    (v, sent)
}

/// The DNS reply in a frame delivered to `mac`/`ip`, from `gw`:53 (checksums verified).
fn reply_in(frame: &[u8], mac: MacAddr, ip: Ipv4Addr, gw: Ipv4Addr) -> Message {
    let d = udp_to(frame, mac, ip, false)
        .unwrap()
        .expect("a UDP datagram");
    assert_eq!(d.src, SocketAddrV4::new(gw, 53));
    Message::from_vec(&frame[d.payload]).unwrap()
}

pub(super) fn addrs(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(ip)) => Some(*ip),
            _ => None,
        })
        .collect()
}

pub(super) fn setup(uplink: bool) -> (Pipeline, Net, Net) {
    let mut p = Pipeline::new(SwitchConfig::default(), RouterConfig::default());
    if uplink {
        p.router.set_uplink(Some(UplinkConfig {
            addr: UP_ADDR,
            prefix_len: 24,
            mac: UP_MAC,
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
            gateway_mac: Some(NEXT_MAC),
        }));
    }
    p.dns.set_upstreams(vec![UPSTREAM]);
    let a = net(&mut p, 1, true);
    let b = net(&mut p, 2, true);
    endpoint(&mut p, &a, 1, 2, &["c1", "one"]);
    endpoint(&mut p, &a, 2, 3, &["c2"]);
    endpoint(&mut p, &b, 3, 2, &["other"]);
    (p, a, b)
}

#[test]
fn local_names_answered_from_the_gateway() {
    let (mut p, a, b) = setup(false);
    let c1 = (Ipv4Addr::new(10, 1, 0, 2), MacAddr([2, 0, 0, 1, 0, 2]));
    let q = udp_frame(
        c1.1,
        a.gw_mac,
        SocketAddrV4::new(c1.0, 40_001),
        SocketAddrV4::new(a.gw, 53),
        &query(1, "c2"),
    );
    let (v, sent) = send(&mut p, 1, &q, Instant::ZERO);
    assert_eq!(v, Verdict::Answered);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Out::Port(PortId(1)));
    let r = reply_in(&sent[0].1, c1.1, c1.0, a.gw);
    assert_eq!(addrs(&r), vec![Ipv4Addr::new(10, 1, 0, 3)]);
    // "other" lives on network b: not visible from a.
    let q = udp_frame(
        c1.1,
        a.gw_mac,
        SocketAddrV4::new(c1.0, 40_002),
        SocketAddrV4::new(a.gw, 53),
        &query(2, "other"),
    );
    let (_, sent) = send(&mut p, 1, &q, Instant::ZERO);
    let r = reply_in(&sent[0].1, c1.1, c1.0, a.gw);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    // A spoofed source address is not served.
    let q = udp_frame(
        c1.1,
        a.gw_mac,
        SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 3), 40_003),
        SocketAddrV4::new(a.gw, 53),
        &query(3, "c2"),
    );
    let (v, sent) = send(&mut p, 1, &q, Instant::ZERO);
    assert!(matches!(v, Verdict::Dropped(_)));
    assert!(sent.is_empty());
    let _ = b;
}

#[test]
fn networks_without_dns_keep_port_unreachable() {
    let mut p = Pipeline::new(SwitchConfig::default(), RouterConfig::default());
    let n = net(&mut p, 7, false);
    let (ip, mac) = endpoint(&mut p, &n, 1, 2, &[]);
    let q = udp_frame(
        mac,
        n.gw_mac,
        SocketAddrV4::new(ip, 40_000),
        SocketAddrV4::new(n.gw, 53),
        &query(1, "c2"),
    );
    let (v, sent) = send(&mut p, 1, &q, Instant::ZERO);
    assert_eq!(v, Verdict::Answered);
    // The router's ICMP port unreachable (IP protocol 1), not a DNS answer.
    assert_eq!(sent[0].1[14 + 9], 1);
}

#[test]
fn forwarded_through_the_raw_uplink_from_its_address() {
    let (mut p, a, _) = setup(true);
    let c1 = (Ipv4Addr::new(10, 1, 0, 2), MacAddr([2, 0, 0, 1, 0, 2]));
    let q = udp_frame(
        c1.1,
        a.gw_mac,
        SocketAddrV4::new(c1.0, 40_001),
        SocketAddrV4::new(a.gw, 53),
        &query(0x4242, "example.org"),
    );
    let (v, sent) = send(&mut p, 1, &q, Instant::ZERO);
    assert_eq!(v, Verdict::Consumed);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Out::Uplink);
    let f = &sent[0].1;
    assert_eq!(&f[0..6], &NEXT_MAC.0);
    let d = udp_to(f, NEXT_MAC, *UPSTREAM.ip(), false).unwrap().unwrap();
    assert_eq!(*d.src.ip(), UP_ADDR);
    assert_eq!(d.dst, UPSTREAM);
    let up_q = Message::from_vec(&f[d.payload.clone()]).unwrap();
    // The upstream answers the uplink address; the container gets it under its own id.
    let mut ans = Message::response(up_q.metadata.id, OpCode::Query);
    ans.add_query(up_q.queries[0].clone());
    ans.add_answer(Record::from_rdata(
        up_q.queries[0].name().clone(),
        60,
        RData::A(A(Ipv4Addr::new(203, 0, 113, 5))),
    ));
    let back = udp_frame(NEXT_MAC, UP_MAC, UPSTREAM, d.src, &ans.to_vec().unwrap());
    let mut sent = Vec::new();
    let v = p.from_uplink(
        &back,
        RxMeta::default(),
        Instant::from_millis(5),
        &mut |o, f| {
            sent.push((o, f.to_vec()));
            true
        },
    );
    assert_eq!(v, Verdict::Forwarded);
    assert_eq!(sent[0].0, Out::Port(PortId(1)));
    let r = reply_in(&sent[0].1, c1.1, c1.0, a.gw);
    assert_eq!(r.metadata.id, 0x4242);
    assert_eq!(addrs(&r), vec![Ipv4Addr::new(203, 0, 113, 5)]);
    // The same datagram again matches nothing pending: it goes to the NAT path (dropped there).
    let v = p.from_uplink(
        &back,
        RxMeta::default(),
        Instant::from_millis(6),
        &mut |_, _| true,
    );
    assert!(matches!(v, Verdict::Dropped(_)));
}

#[test]
fn forwarded_through_host_sockets_without_a_raw_uplink() {
    let (mut p, a, _) = setup(false);
    let c2 = (Ipv4Addr::new(10, 1, 0, 3), MacAddr([2, 0, 0, 1, 0, 3]));
    let q = udp_frame(
        c2.1,
        a.gw_mac,
        SocketAddrV4::new(c2.0, 5353),
        SocketAddrV4::new(a.gw, 53),
        &query(9, "example.net"),
    );
    let (_, sent) = send(&mut p, 2, &q, Instant::ZERO);
    assert!(sent.is_empty());
    let ups = p.dns_take_upstream();
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].0, UPSTREAM);
    let up_q = Message::from_vec(&ups[0].1).unwrap();
    let mut ans = Message::response(up_q.metadata.id, OpCode::Query);
    ans.add_query(up_q.queries[0].clone());
    let mut sent = Vec::new();
    p.dns_from_host(
        UPSTREAM,
        &ans.to_vec().unwrap(),
        Instant::from_millis(3),
        &mut |o, f| {
            sent.push((o, f.to_vec()));
            true
        },
    );
    assert_eq!(sent[0].0, Out::Port(PortId(2)));
    let r = reply_in(&sent[0].1, c2.1, c2.0, a.gw);
    assert_eq!(r.metadata.id, 9);
    // A query that never gets an answer: SERVFAIL after the retries.
    let q = udp_frame(
        c2.1,
        a.gw_mac,
        SocketAddrV4::new(c2.0, 5354),
        SocketAddrV4::new(a.gw, 53),
        &query(10, "slow.example"),
    );
    send(&mut p, 2, &q, Instant::ZERO);
    let mut sent = Vec::new();
    for ms in [2_000, 4_000] {
        p.dns_expire(Instant::from_millis(ms), &mut |o, f| {
            sent.push((o, f.to_vec()));
            true
        });
    }
    let r = reply_in(&sent[0].1, c2.1, c2.0, a.gw);
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
}
