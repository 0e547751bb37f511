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

/// A query for `name` from endpoint `c` (address, MAC) port `sport` to `n`'s gateway.
fn client_query(c: (Ipv4Addr, MacAddr), n: &Net, sport: u16, id: u16, name: &str) -> Vec<u8> {
    let (src, dst) = (SocketAddrV4::new(c.0, sport), SocketAddrV4::new(n.gw, 53));
    udp_frame(c.1, n.gw_mac, src, dst, &query(id, name))
}

fn from_uplink(p: &mut Pipeline, frame: &[u8], now: Instant) -> (Verdict, Sent) {
    let mut sent = Vec::new();
    let v = p.from_uplink(frame, RxMeta::default(), now, &mut |o, f| {
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
    let q = client_query(c1, &a, 40_001, 1, "c2");
    let (v, sent) = send(&mut p, 1, &q, Instant::ZERO);
    assert_eq!(v, Verdict::Answered);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Out::Port(PortId(1)));
    let r = reply_in(&sent[0].1, c1.1, c1.0, a.gw);
    assert_eq!(addrs(&r), vec![Ipv4Addr::new(10, 1, 0, 3)]);
    // "other" lives on network b: not visible from a.
    let q = client_query(c1, &a, 40_002, 2, "other");
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
    let q = client_query(c1, &a, 40_001, 0x4242, "example.org");
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
    let (v, sent) = from_uplink(&mut p, &back, Instant::from_millis(5));
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
    let q = client_query(c2, &a, 5353, 9, "example.net");
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
    let q = client_query(c2, &a, 5354, 10, "slow.example");
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

/// An upstream answer to `q` with `n` A records (none, TC set, when `tc`).
fn answer_with(q: &Message, n: u8, tc: bool) -> Vec<u8> {
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.truncation = tc;
    m.add_query(q.queries[0].clone());
    for i in 0..if tc { 0 } else { n } {
        m.add_answer(Record::from_rdata(
            q.queries[0].name().clone(),
            60,
            RData::A(A(Ipv4Addr::new(203, 0, 113, i))),
        ));
    }
    m.to_vec().unwrap()
}

/// A client query from c1 for `name`, sent; returns the upstream UDP query frame's datagram
/// and message (raw uplink).
fn forwarded(p: &mut Pipeline, a: &Net, name: &str) -> (super::packet::Datagram, Message) {
    let c1 = (Ipv4Addr::new(10, 1, 0, 2), MacAddr([2, 0, 0, 1, 0, 2]));
    let q = udp_frame(
        c1.1,
        a.gw_mac,
        SocketAddrV4::new(c1.0, 40_009),
        SocketAddrV4::new(a.gw, 53),
        &query(0x77, name),
    );
    let (_, sent) = send(p, 1, &q, Instant::ZERO);
    let f = &sent[0].1;
    let d = udp_to(f, NEXT_MAC, *UPSTREAM.ip(), false).unwrap().unwrap();
    let m = Message::from_vec(&f[d.payload.clone()]).unwrap();
    (d, m)
}

#[test]
fn a_truncated_answer_is_fetched_over_tcp_from_the_uplink_address() {
    use crate::queue_dev::QueueDev;
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::socket::tcp;
    use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
    use std::collections::VecDeque;

    let (mut p, a, _) = setup(true);
    let (d, up_q) = forwarded(&mut p, &a, "big.example");
    // TC over UDP: the pipeline opens a TCP connection from the same address and port.
    let tc = udp_frame(
        NEXT_MAC,
        UP_MAC,
        UPSTREAM,
        d.src,
        &answer_with(&up_q, 0, true),
    );
    let (v, mut out) = from_uplink(&mut p, &tc, Instant::from_millis(1));
    assert_eq!(v, Verdict::Forwarded);
    assert_eq!(out.len(), 1, "a SYN to the upstream");
    let syn = super::packet::tcp_to(&out[0].1, NEXT_MAC, *UPSTREAM.ip(), false)
        .unwrap()
        .expect("a TCP segment");
    assert_eq!(
        (out[0].0, syn.src, syn.dst, syn.syn),
        (Out::Uplink, d.src, UPSTREAM, true)
    );

    // The upstream's side: smoltcp listening on its port 53, answering the framed query.
    let mut dev_rx: VecDeque<Vec<u8>> = VecDeque::new();
    let mut dev_tx: Vec<Vec<u8>> = Vec::new();
    let mut dev = QueueDev {
        rx: &mut dev_rx,
        tx: &mut dev_tx,
        mtu: 1500,
    };
    let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, Instant::ZERO);
    iface.update_ip_addrs(|x| {
        let _ = x.push(IpCidr::new(IpAddress::Ipv4(*UPSTREAM.ip()), 32));
    });
    let _ = iface.routes_mut().add_default_ipv4_route(*UPSTREAM.ip());
    let mut set = SocketSet::new(vec![]);
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 4096]),
        tcp::SocketBuffer::new(vec![0; 8192]),
    );
    s.listen(53).unwrap();
    let h = set.add(s);
    let (mut asked, mut answered) = (Vec::new(), false);
    let mut to_ports = Vec::new();
    let mut pending: Vec<Vec<u8>> = out.drain(..).map(|(_, f)| f).collect();
    for step in 0..50 {
        let now = Instant::from_millis(2 + step);
        dev_rx.extend(pending.drain(..).map(|f| f[14..].to_vec()));
        let mut dev = QueueDev {
            rx: &mut dev_rx,
            tx: &mut dev_tx,
            mtu: 1500,
        };
        iface.poll(now, &mut dev, &mut set);
        let s: &mut tcp::Socket = set.get_mut(h);
        while s.can_recv() {
            let _ = s.recv(|b| {
                asked.extend_from_slice(b);
                (b.len(), ())
            });
        }
        if asked.len() >= 2 && !answered && s.can_send() {
            let q = Message::from_vec(&asked[2..]).unwrap();
            assert_eq!(q.queries, up_q.queries);
            let a = answer_with(&q, 5, false);
            s.send_slice(&(a.len() as u16).to_be_bytes()).unwrap();
            s.send_slice(&a).unwrap();
            s.close();
            answered = true;
        }
        iface.poll(now, &mut dev, &mut set);
        for pkt in dev_tx.drain(..) {
            let f = super::packet::ip_frame(NEXT_MAC, UP_MAC, &pkt);
            for (o, f) in from_uplink(&mut p, &f, now).1 {
                match o {
                    Out::Uplink => pending.push(f),
                    Out::Port(_) => to_ports.push(f),
                }
            }
        }
        if pending.is_empty() && answered && !to_ports.is_empty() && p.dns_up_tcp.is_empty() {
            break;
        }
    }
    // The client gets the whole answer (5 records fit its datagram) under its own id.
    assert_eq!(to_ports.len(), 1);
    let c1 = (Ipv4Addr::new(10, 1, 0, 2), MacAddr([2, 0, 0, 1, 0, 2]));
    let r = reply_in(&to_ports[0], c1.1, c1.0, a.gw);
    assert_eq!(r.metadata.id, 0x77);
    assert!(!r.metadata.truncation);
    assert_eq!(addrs(&r).len(), 5);
    assert!(p.dns_up_tcp.is_empty(), "the connection closed");
    assert_eq!(p.dns_up_tcp.counters().answered, 1);
}

#[test]
fn without_a_raw_uplink_a_truncated_answer_goes_to_a_host_tcp_exchange() {
    let (mut p, a, _) = setup(false);
    let c2 = (Ipv4Addr::new(10, 1, 0, 3), MacAddr([2, 0, 0, 1, 0, 3]));
    let q = client_query(c2, &a, 5353, 12, "big.example");
    send(&mut p, 2, &q, Instant::ZERO);
    let (to, up) = p.dns_take_upstream().pop().unwrap();
    let up_q = Message::from_vec(&up).unwrap();
    let mut sent = Vec::new();
    let mut tx = |o: Out, f: &[u8]| {
        sent.push((o, f.to_vec()));
        true
    };
    p.dns_from_host(
        to,
        &answer_with(&up_q, 0, true),
        Instant::from_millis(1),
        &mut tx,
    );
    let x = p.dns_take_upstream_tcp();
    assert_eq!(x.len(), 1);
    assert_eq!((x[0].0, x[0].1), (up_q.metadata.id, UPSTREAM));
    let tq = Message::from_vec(&x[0].2).unwrap();
    assert_eq!(tq.queries, up_q.queries);
    p.dns_from_host_tcp(
        x[0].0,
        Some(&answer_with(&tq, 4, false)),
        Instant::from_millis(2),
        &mut tx,
    );
    assert_eq!(sent.len(), 1);
    let r = reply_in(&sent[0].1, c2.1, c2.0, a.gw);
    assert_eq!((r.metadata.id, addrs(&r).len()), (12, 4));
}
