//! DNS over TCP through the in-memory pipeline: a smoltcp client (checksums verified) inside
//! a container talks to the gateway's port 53; time is simulated.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber,
};
use switchyard_nat::RxMeta;
use switchyard_switch::{Duration, Instant, MacAddr, PortId};

use super::packet::ip_frame;
use super::pipeline_tests::{addrs, endpoint, query, setup, Net, UPSTREAM};
use super::TcpConfig;
use crate::dns::DnsTcp;
use crate::pipeline::{Out, Pipeline, Verdict};

struct Dev<'a> {
    rx: &'a mut VecDeque<Vec<u8>>,
    tx: &'a mut Vec<Vec<u8>>,
}
struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);
impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut v = vec![0u8; len];
        let r = f(&mut v);
        self.0.push(v);
        r
    }
}
impl Device for Dev<'_> {
    type RxToken<'b>
        = Rx
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;
    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        Some((Rx(self.rx.pop_front()?), Tx(self.tx)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        // Checksums computed and verified (the default): the server's are checked.
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = 1500;
        c
    }
}

/// A container on switch port `port` with a smoltcp TCP client socket.
struct Client {
    iface: Interface,
    set: SocketSet<'static>,
    h: SocketHandle,
    rxq: VecDeque<Vec<u8>>,
    port: u32,
    mac: MacAddr,
    gw_mac: MacAddr,
    /// Verdicts of the frames sent.
    verdicts: Vec<Verdict>,
}

const C1: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 1, 0, 2), 2);

impl Client {
    fn new(n: &Net, port: u32, host: u8, sport: u16) -> Client {
        let ip = Ipv4Addr::new(10, 1, 0, host);
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = u64::from(sport);
        let (mut q, mut t) = (VecDeque::new(), Vec::new());
        let mut iface = Interface::new(
            cfg,
            &mut Dev {
                rx: &mut q,
                tx: &mut t,
            },
            Instant::ZERO,
        );
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 24));
        });
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65_536]),
            tcp::SocketBuffer::new(vec![0; 65_536]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s.connect(
            iface.context(),
            (IpAddress::Ipv4(n.gw), 53),
            (IpAddress::Ipv4(ip), sport),
        )
        .unwrap();
        let mut set = SocketSet::new(vec![]);
        let h = set.add(s);
        Client {
            iface,
            set,
            h,
            rxq: VecDeque::new(),
            port,
            mac: MacAddr([2, 0, 0, 1, 0, host]),
            gw_mac: n.gw_mac,
            verdicts: Vec::new(),
        }
    }

    fn sock(&mut self) -> &mut tcp::Socket<'static> {
        self.set.get_mut(self.h)
    }

    /// Exchange packets with the pipeline until both sides are quiet.
    fn pump(&mut self, p: &mut Pipeline, now: Instant) {
        for _ in 0..100 {
            let mut tx = Vec::new();
            self.iface.poll(
                now,
                &mut Dev {
                    rx: &mut self.rxq,
                    tx: &mut tx,
                },
                &mut self.set,
            );
            if tx.is_empty() {
                return;
            }
            for pkt in tx {
                self.inject(p, &pkt, now);
            }
        }
        panic!("no end to the exchange");
    }

    /// One bare IPv4 packet from the client into the pipeline; what comes back is queued.
    fn inject(&mut self, p: &mut Pipeline, pkt: &[u8], now: Instant) {
        let f = ip_frame(self.mac, self.gw_mac, pkt);
        let mut back = Vec::new();
        let v = p.from_port(
            PortId(self.port),
            &f,
            RxMeta::default(),
            now,
            &mut |o, f| {
                back.push((o, f.to_vec()));
                true
            },
        );
        self.verdicts.push(v);
        for (o, f) in back {
            if o == Out::Port(PortId(self.port)) {
                self.rxq.push_back(f[14..].to_vec());
            }
        }
    }

    /// Timers of both sides up to `now`.
    fn tick(&mut self, p: &mut Pipeline, now: Instant) {
        let mut back = Vec::new();
        p.dns_expire(now, &mut |o, f| {
            back.push((o, f.to_vec()));
            true
        });
        for (o, f) in back {
            if o == Out::Port(PortId(self.port)) {
                self.rxq.push_back(f[14..].to_vec());
            }
        }
        self.pump(p, now);
    }

    fn send_msg(&mut self, msg: &[u8]) {
        let mut b = (msg.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(msg);
        assert_eq!(self.sock().send_slice(&b), Ok(b.len()));
    }

    /// The next whole message received, if there is one.
    fn recv_msg(&mut self) -> Option<Message> {
        let s = self.sock();
        let mut len = [0u8; 2];
        if s.peek_slice(&mut len).ok()? < 2 {
            return None;
        }
        let n = usize::from(u16::from_be_bytes(len));
        if s.recv_queue() < 2 + n {
            return None;
        }
        let mut b = vec![0u8; 2 + n];
        assert_eq!(s.recv_slice(&mut b), Ok(2 + n));
        Some(Message::from_vec(&b[2..]).unwrap())
    }
}

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms as i64)
}

#[test]
fn handshake_one_query_then_several_on_one_connection() {
    let (mut p, a, _) = setup(false);
    let mut c = Client::new(&a, 1, C1.1, 40_000);
    c.pump(&mut p, t(0));
    assert_eq!(c.sock().state(), State::Established);
    assert_eq!(p.dns_tcp.len(), 1);
    c.send_msg(&query(7, "c2"));
    c.pump(&mut p, t(1));
    let r = c.recv_msg().expect("an answer");
    assert_eq!(r.metadata.id, 7);
    assert_eq!(r.metadata.message_type, MessageType::Response);
    assert_eq!(addrs(&r), vec![Ipv4Addr::new(10, 1, 0, 3)]);
    // Pipelined, in one segment: answered in order.
    for (id, name) in [(8, "c1"), (9, "one"), (10, "nothere")] {
        c.send_msg(&query(id, name));
    }
    c.pump(&mut p, t(2));
    let r: Vec<Message> = std::iter::from_fn(|| c.recv_msg()).collect();
    assert_eq!(r.len(), 3);
    assert_eq!(addrs(&r[0]), vec![C1.0]);
    assert_eq!(addrs(&r[1]), vec![C1.0]);
    assert_eq!(r[2].metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(p.dns.counters().tcp_queries, 4);
    // The client closes: so does the server, and the connection is gone.
    c.sock().close();
    c.pump(&mut p, t(3));
    assert!(matches!(c.sock().state(), State::TimeWait | State::Closed));
    assert_eq!(p.dns_tcp.len(), 0);
    assert_eq!(p.dns_tcp.counters().closed, 1);
}

#[test]
fn a_query_split_across_segments() {
    let (mut p, a, _) = setup(false);
    let mut c = Client::new(&a, 1, C1.1, 40_001);
    c.pump(&mut p, t(0));
    let q = query(3, "c2");
    let mut b = (q.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(&q);
    // One byte of the prefix, then the other and half the message, then the rest.
    for part in [&b[..1], &b[1..b.len() / 2], &b[b.len() / 2..]] {
        assert!(c.recv_msg().is_none());
        c.sock().send_slice(part).unwrap();
        c.pump(&mut p, t(1));
    }
    let r = c.recv_msg().expect("the answer after the last piece");
    assert_eq!(addrs(&r), vec![Ipv4Addr::new(10, 1, 0, 3)]);
}

#[test]
fn a_large_answer_comes_whole_over_tcp() {
    let (mut p, a, _) = setup(false);
    for h in 10..60u8 {
        endpoint(
            &mut p,
            &a,
            100 + u32::from(h),
            h,
            &[&format!("n{h}"), "big"],
        );
    }
    let mut c = Client::new(&a, 1, C1.1, 40_002);
    c.pump(&mut p, t(0));
    c.send_msg(&query(1, "big"));
    c.pump(&mut p, t(1));
    let r = c.recv_msg().unwrap();
    assert!(!r.metadata.truncation);
    assert_eq!(addrs(&r).len(), 50);
    assert_eq!(p.dns.counters().truncated, 0);
}

#[test]
fn a_forwarded_answer_reaches_its_connection() {
    let (mut p, a, _) = setup(false);
    let mut c = Client::new(&a, 1, C1.1, 40_003);
    let mut d = Client::new(&a, 2, 3, 40_003);
    c.pump(&mut p, t(0));
    d.pump(&mut p, t(0));
    c.send_msg(&query(5, "example.org"));
    c.pump(&mut p, t(1));
    d.send_msg(&query(5, "example.net"));
    d.pump(&mut p, t(1));
    let ups = p.dns_take_upstream();
    assert_eq!(ups.len(), 2);
    // Answer them in reverse order, with many records (too big for a classic datagram).
    for (to, q) in ups.iter().rev() {
        assert_eq!(*to, UPSTREAM);
        let q = Message::from_vec(q).unwrap();
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.add_query(q.queries[0].clone());
        for i in 0..60u8 {
            r.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, i))),
            ));
        }
        p.dns_from_host(UPSTREAM, &r.to_vec().unwrap(), t(2), &mut |o, f| {
            let cl = if o == Out::Port(PortId(1)) {
                &mut c
            } else {
                &mut d
            };
            cl.rxq.push_back(f[14..].to_vec());
            true
        });
    }
    c.pump(&mut p, t(3));
    d.pump(&mut p, t(3));
    let (rc, rd) = (c.recv_msg().unwrap(), d.recv_msg().unwrap());
    assert_eq!((rc.metadata.id, rd.metadata.id), (5, 5));
    assert_eq!(rc.queries[0].name().to_ascii(), "example.org.");
    assert_eq!(rd.queries[0].name().to_ascii(), "example.net.");
    assert_eq!(addrs(&rc).len(), 60);
    // A connection that closes with a query pending: the late answer finds nobody.
    c.send_msg(&query(6, "late.example"));
    c.pump(&mut p, t(4));
    assert_eq!(p.dns.pending_len(), 1);
    c.sock().abort();
    c.pump(&mut p, t(5));
    assert_eq!(p.dns_tcp.len(), 1);
    assert_eq!(p.dns.pending_len(), 0);
}

#[test]
fn idle_connections_are_closed_then_reset() {
    let (mut p, a, _) = setup(false);
    let idle = p.dns_tcp.config().idle;
    let mut c = Client::new(&a, 1, C1.1, 40_004);
    c.pump(&mut p, t(0));
    c.send_msg(&query(1, "c2"));
    c.pump(&mut p, t(1));
    assert!(p.dns_poll_at().is_some());
    c.tick(&mut p, t(1) + idle - Duration::from_millis(1));
    assert_eq!(c.sock().state(), State::Established);
    // Idle: our FIN; the client answers with its own and all is over.
    c.tick(&mut p, t(1) + idle);
    assert_eq!(c.sock().state(), State::CloseWait);
    c.sock().close();
    c.pump(&mut p, t(1) + idle);
    assert_eq!(p.dns_tcp.len(), 0);
    assert_eq!(p.dns_tcp.counters().idle_closed, 1);

    // A client that never finishes: reset after the linger time.
    let mut c = Client::new(&a, 1, C1.1, 40_005);
    let start = t(100_000);
    c.pump(&mut p, start);
    c.tick(&mut p, start + idle);
    assert_eq!(c.sock().state(), State::CloseWait);
    let linger = p.dns_tcp.config().linger;
    c.tick(&mut p, start + idle + linger);
    assert_eq!(p.dns_tcp.len(), 0);
    assert_eq!(c.sock().state(), State::Closed, "reset");
}

#[test]
fn connection_limits_reset_the_rest() {
    let (mut p, a, _) = setup(false);
    p.dns_tcp = DnsTcp::new(TcpConfig {
        max_conns: 3,
        max_per_client: 2,
        ..TcpConfig::default()
    });
    let mut cs: Vec<Client> = (0..3)
        .map(|i| Client::new(&a, 1, C1.1, 41_000 + i))
        .collect();
    for c in &mut cs {
        c.pump(&mut p, t(0));
    }
    let states: Vec<State> = cs.iter_mut().map(|c| c.sock().state()).collect();
    assert_eq!(
        states,
        vec![State::Established, State::Established, State::Closed]
    );
    // Another client still gets one, then the total is reached.
    let mut d = Client::new(&a, 2, 3, 41_000);
    d.pump(&mut p, t(0));
    assert_eq!(d.sock().state(), State::Established);
    let mut e = Client::new(&a, 2, 3, 41_001);
    e.pump(&mut p, t(0));
    assert_eq!(e.sock().state(), State::Closed);
    assert_eq!(p.dns_tcp.len(), 3);
    assert_eq!(p.dns_tcp.counters().refused, 2);
}

#[test]
fn oversize_prefixes_and_garbage_never_hurt() {
    let (mut p, a, _) = setup(false);
    // A length above the largest query: reset.
    let mut c = Client::new(&a, 1, C1.1, 40_006);
    c.pump(&mut p, t(0));
    c.sock().send_slice(&[0xff, 0xff, 1, 2, 3]).unwrap();
    c.pump(&mut p, t(1));
    assert_eq!(c.sock().state(), State::Closed);
    assert_eq!(p.dns_tcp.len(), 0);
    assert_eq!(p.dns_tcp.counters().oversize, 1);

    // Junk messages: FORMERR or dropped, the connection keeps serving.
    let mut c = Client::new(&a, 1, C1.1, 40_007);
    c.pump(&mut p, t(2));
    for n in [0usize, 1, 11, 12, 40, 300] {
        let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
        c.send_msg(&junk);
    }
    c.send_msg(&query(77, "c2"));
    c.pump(&mut p, t(3));
    let got: Vec<Message> = std::iter::from_fn(|| c.recv_msg()).collect();
    let last = got.last().expect("answers");
    assert_eq!(last.metadata.id, 77);
    assert_eq!(addrs(last), vec![Ipv4Addr::new(10, 1, 0, 3)]);

    // Hand-made segments: a stray ACK and a stray RST for no connection, a SYN with a
    // payload, odd flags; then every truncation of a segment.
    let seg = |sport: u16, control: TcpControl, ack: Option<u32>, payload: &[u8]| {
        let tr = TcpRepr {
            src_port: sport,
            dst_port: 53,
            control,
            seq_number: TcpSeqNumber(1000),
            ack_number: ack.map(|x| TcpSeqNumber(x as i32)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ir = Ipv4Repr {
            src_addr: C1.0,
            dst_addr: a.gw,
            next_header: IpProtocol::Tcp,
            payload_len: tr.buffer_len(),
            hop_limit: 64,
        };
        let mut b = vec![0u8; 20 + tr.buffer_len()];
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        ir.emit(&mut Ipv4Packet::new_unchecked(&mut b[..]), &caps);
        tr.emit(
            &mut TcpPacket::new_unchecked(&mut b[20..]),
            &IpAddress::Ipv4(C1.0),
            &IpAddress::Ipv4(a.gw),
            &caps,
        );
        b
    };
    let mut raw = Client::new(&a, 1, C1.1, 1);
    let before = p.dns_tcp.counters().stray;
    raw.inject(
        &mut p,
        &seg(50_000, TcpControl::None, Some(5), b"hello"),
        t(4),
    );
    assert_eq!(raw.verdicts.last(), Some(&Verdict::Answered), "a reset");
    raw.inject(&mut p, &seg(50_001, TcpControl::Rst, None, b""), t(4));
    assert_eq!(
        raw.verdicts.last(),
        Some(&Verdict::Consumed),
        "no reset for a reset"
    );
    assert_eq!(p.dns_tcp.counters().stray, before + 2);
    let syn_data = seg(50_002, TcpControl::Syn, None, &[0, 5, 1, 2, 3, 4, 5]);
    raw.inject(&mut p, &syn_data, t(4));
    let fin_syn = seg(50_003, TcpControl::Fin, Some(1), b"x");
    raw.inject(&mut p, &fin_syn, t(4));
    for n in 0..syn_data.len() {
        raw.inject(&mut p, &syn_data[..n], t(4));
        let mut bad = syn_data.clone();
        bad[n] ^= 0x41;
        raw.inject(&mut p, &bad, t(4));
    }
    // Still serving.
    let mut c = Client::new(&a, 1, C1.1, 40_008);
    c.pump(&mut p, t(5));
    c.send_msg(&query(78, "c1"));
    c.pump(&mut p, t(5));
    assert_eq!(addrs(&c.recv_msg().unwrap()), vec![C1.0]);
}

#[test]
fn not_from_the_network_or_no_dns_there_is_not_served() {
    let (mut p, a, _) = setup(false);
    // A MAC the network does not know for that address.
    let mut c = Client::new(&a, 1, C1.1, 40_009);
    c.mac = MacAddr([2, 0, 0, 9, 9, 9]);
    c.pump(&mut p, t(0));
    assert_ne!(c.sock().state(), State::Established);
    assert_eq!(p.dns_tcp.len(), 0);
    // Without DNS on the network the router has port 53 as before (a reset).
    p.set_dns_network(a.id, None);
    let mut c = Client::new(&a, 1, C1.1, 40_010);
    c.pump(&mut p, t(0));
    assert_eq!(c.sock().state(), State::Closed);
    assert_eq!(p.dns_tcp.len(), 0);
}
