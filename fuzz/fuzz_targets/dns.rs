#![no_main]
//! The embedded DNS server's query path (`switchyard_control::dns::DnsServer`).
//!
//! First byte even: the rest is one datagram to the gateway's port 53 (real queries make good
//! seeds). Odd: the rest is a sequence of operations: queries, upstream replies (garbage or
//! well-formed answers to what was forwarded), names added and removed, time passing.
//! Operations also drive the TCP side (`DnsTcp`): arbitrary segments for the gateway's port
//! 53 (smoltcp and our framing), queries tagged with a connection, timers; and the upstream
//! TCP exchanges after a truncated answer (`UpstreamTcp`): their answers (well-formed, garbage,
//! failures) and arbitrary segments to the uplink address's client sockets.
//! Never a panic; every reply parses, is a response, fits the client's size (a datagram, or
//! a TCP message); the pending table, the cache and the connections stay within their bounds.

use std::net::{Ipv4Addr, SocketAddrV4};

use arbitrary::{Arbitrary, Unstructured};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use libfuzzer_sys::fuzz_target;
use switchyard_control::dns::{
    DnsConfig, DnsServer, DnsTcp, NetInfo, Output, TcpConfig, Transport, UpstreamTcp,
};
use switchyard_switch::{Instant, NetworkId};

const UP: [SocketAddrV4; 2] = [
    SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 53), 53),
    SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 53), 53),
];

#[derive(Arbitrary, Debug)]
enum Op {
    Query {
        client: u8,
        other_net: bool,
        max_udp: u16,
        bytes: Vec<u8>,
    },
    Upstream {
        second: bool,
        port: Option<u16>,
        bytes: Vec<u8>,
    },
    /// A well-formed answer to the most recent upstream query.
    Answer {
        rcode: u8,
        ttl: u32,
        records: u8,
        truncated: bool,
        wrong_server: bool,
    },
    Tick {
        ms: u16,
    },
    /// A TCP segment (bare IPv4 packet) for the gateway's port 53.
    TcpSegment {
        client: u8,
        syn: bool,
        bytes: Vec<u8>,
    },
    /// A whole message on TCP connection `conn`.
    TcpQuery {
        client: u8,
        conn: u8,
        bytes: Vec<u8>,
    },
    /// The end of the most recent upstream TCP exchange: a well-formed answer with `records`,
    /// the bytes given, or a failure (`None`).
    TcpAnswer {
        records: u8,
        truncated: bool,
        bytes: Option<Vec<u8>>,
        well_formed: bool,
    },
    /// A TCP segment (bare IPv4 packet) to the uplink address, for the exchanges' sockets.
    UpstreamSegment {
        bytes: Vec<u8>,
    },
    AddName {
        host: u8,
        name: String,
        alias: String,
    },
    RemoveName {
        host: u8,
    },
    /// A well-formed query for an external name (`hN.example`, A or AAAA): forwarded, so the
    /// upstream paths are reached without valid DNS bytes in the input.
    Forward {
        name: u8,
        aaaa: bool,
        client: u8,
    },
}

fn net(third: u8) -> NetInfo {
    NetInfo {
        subnet: Ipv4Addr::new(10, third, 0, 0),
        prefix_len: 24,
        gateway: Ipv4Addr::new(10, third, 0, 1),
        internal: third == 2,
        search: if third == 1 {
            vec!["corp.test".to_string()]
        } else {
            Vec::new()
        },
        mtu: 1500,
    }
}

struct Harness {
    s: DnsServer,
    tcp: DnsTcp,
    now: Instant,
    last_upstream: Option<(SocketAddrV4, u16, Vec<u8>)>,
    up_tcp: UpstreamTcp,
    last_tcp: Option<(u16, Vec<u8>)>,
}

const UPLINK: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

impl Harness {
    fn new() -> Self {
        let mut s = DnsServer::new(DnsConfig {
            upstreams: UP.to_vec(),
            max_pending: 8,
            cache_max: 8,
            rate_per_sec: 50,
            burst: 20,
            max_clients: 16,
            ..DnsConfig::default()
        });
        s.set_network(NetworkId(1), net(1));
        s.set_network(NetworkId(2), net(2));
        let _ = s.names.add(
            NetworkId(1),
            Ipv4Addr::new(10, 1, 0, 2),
            &["web".into(), "db".into()],
        );
        Harness {
            s,
            tcp: DnsTcp::new(TcpConfig {
                max_conns: 4,
                max_per_client: 2,
                max_inflight: 3,
                max_queued: 8192,
                ..TcpConfig::default()
            }),
            now: Instant::from_millis(0),
            last_upstream: None,
            up_tcp: UpstreamTcp::new(switchyard_switch::Duration::from_secs(3), 1),
            last_tcp: None,
        }
    }

    fn query(&mut self, client: u8, other: bool, max_udp: usize, bytes: &[u8]) {
        let (id, third) = if other { (2, 2) } else { (1, 1) };
        let c = SocketAddrV4::new(
            Ipv4Addr::new(10, third, 0, client),
            40_000 + u16::from(client),
        );
        self.s.handle_query(
            self.now,
            NetworkId(id),
            Ipv4Addr::new(10, third, 0, 1),
            c,
            bytes,
            max_udp,
        );
        self.check(max_udp);
    }

    /// Queries read on TCP connections to the core, its answers back, until quiet.
    fn pump_tcp(&mut self) {
        loop {
            let qs = self.tcp.take_queries();
            for q in &qs {
                assert!(q.payload.len() <= 4096);
                self.s
                    .handle_query_tcp(self.now, q.net, q.server, q.client, q.conn, &q.payload);
            }
            self.check(1472);
            for q in &qs {
                let w = self.s.tcp_pending(q.net, q.client, q.conn);
                self.tcp.settle(self.now, q.conn, w);
            }
            for id in self.tcp.take_closed() {
                self.s.forget_tcp(id);
            }
            for (_, p) in self.tcp.take_packets() {
                assert!(p.len() >= 40 && p[0] >> 4 == 4 && p[9] == 6);
            }
            assert!(self.tcp.len() <= self.tcp.config().max_conns);
            if qs.is_empty() {
                return;
            }
        }
    }

    fn check(&mut self, max_udp: usize) {
        let cfg = self.s.config().clone();
        assert!(self.s.pending_len() <= cfg.max_pending);
        assert!(self.s.cache_len() <= cfg.cache_max);
        let out: Vec<Output> = self.s.drain().collect();
        for o in out {
            match o {
                Output::Reply {
                    transport: Transport::Tcp(conn),
                    payload,
                    ..
                } => {
                    assert!(payload.len() <= 65_535);
                    let m = Message::from_vec(&payload).expect("replies parse");
                    assert_eq!(m.metadata.message_type, MessageType::Response);
                    self.tcp.reply(self.now, conn, &payload);
                }
                Output::Reply { payload, .. } => {
                    assert!(payload.len() <= max_udp);
                    let m = Message::from_vec(&payload).expect("replies parse");
                    assert_eq!(m.metadata.message_type, MessageType::Response);
                }
                Output::Upstream { to, port, payload } => {
                    assert!(UP.contains(&to));
                    let m = Message::from_vec(&payload).expect("upstream queries parse");
                    assert_eq!(m.queries.len(), 1);
                    self.last_upstream = Some((to, port, payload));
                }
                Output::UpstreamTcp {
                    id,
                    to,
                    port,
                    payload,
                } => {
                    assert!(UP.contains(&to));
                    let m = Message::from_vec(&payload).expect("upstream queries parse");
                    assert_eq!(m.metadata.id, id);
                    let local = SocketAddrV4::new(UPLINK, port);
                    self.up_tcp.open(self.now, id, local, to, &payload);
                    self.last_tcp = Some((id, payload));
                }
            }
        }
    }
}

impl Harness {
    /// The exchanges' ends to the core, their packets checked.
    fn pump_up_tcp(&mut self) {
        for _ in 0..8 {
            for p in self.up_tcp.take_packets() {
                assert!(p.len() >= 40 && p[0] >> 4 == 4 && p[9] == 6);
                assert_eq!(p[12..16], UPLINK.octets());
            }
            let results = self.up_tcp.take_results();
            if results.is_empty() {
                return;
            }
            for (id, answer) in results {
                self.s.handle_upstream_tcp(self.now, id, answer.as_deref());
            }
            self.check(1472);
            assert!(self.up_tcp.len() <= switchyard_control::dns::upstream_tcp::MAX_EXCHANGES);
        }
    }
}

fn ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut h = Harness::new();
    for _ in 0..64 {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        match op {
            Op::Query {
                client,
                other_net,
                max_udp,
                bytes,
            } => {
                let max = usize::from(max_udp).clamp(512, 1472);
                h.query(client, other_net, max, &bytes);
            }
            Op::Upstream {
                second,
                port,
                bytes,
            } => {
                h.s.handle_upstream(h.now, UP[usize::from(second)], port, &bytes);
                h.check(1472);
            }
            Op::Answer {
                rcode,
                ttl,
                records,
                truncated,
                wrong_server,
            } => {
                let Some((to, port, q)) = h.last_upstream.clone() else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&q) else {
                    continue;
                };
                let mut r = Message::response(q.metadata.id, OpCode::Query);
                r.metadata.response_code = ResponseCode::from_low(rcode & 0x0f);
                r.metadata.truncation = truncated;
                r.queries = q.queries.clone();
                for i in 0..records.min(100) {
                    r.add_answer(Record::from_rdata(
                        q.queries[0].name().clone(),
                        ttl,
                        RData::A(A(Ipv4Addr::new(203, 0, 113, i))),
                    ));
                }
                let from = if wrong_server {
                    if to == UP[0] {
                        UP[1]
                    } else {
                        UP[0]
                    }
                } else {
                    to
                };
                if let Ok(bytes) = r.to_vec() {
                    h.s.handle_upstream(h.now, from, Some(port), &bytes);
                }
                h.check(1472);
            }
            Op::Tick { ms } => {
                h.now += switchyard_switch::Duration::from_millis(u64::from(ms) * 10);
                h.s.expire(h.now);
                h.check(1472);
                h.tcp.expire(h.now);
                h.pump_tcp();
                h.up_tcp.expire(h.now);
                h.pump_up_tcp();
            }
            Op::TcpAnswer {
                records,
                truncated,
                bytes,
                well_formed,
            } => {
                let Some((id, q)) = h.last_tcp.clone() else {
                    continue;
                };
                let answer = match (well_formed, bytes) {
                    (true, _) => Message::from_vec(&q).ok().and_then(|q| {
                        let mut r = Message::response(id, OpCode::Query);
                        r.metadata.truncation = truncated;
                        r.queries = q.queries.clone();
                        for i in 0..records.min(200) {
                            r.add_answer(Record::from_rdata(
                                q.queries[0].name().clone(),
                                60,
                                RData::A(A(Ipv4Addr::new(203, 0, 113, i))),
                            ));
                        }
                        r.to_vec().ok()
                    }),
                    (false, b) => b,
                };
                h.s.handle_upstream_tcp(h.now, id, answer.as_deref());
                h.check(1472);
            }
            Op::UpstreamSegment { bytes } => {
                h.up_tcp.segment(h.now, &bytes);
                h.pump_up_tcp();
            }
            Op::TcpSegment { client, syn, bytes } => {
                let c = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, client % 4), 40_000);
                let gw = Ipv4Addr::new(10, 1, 0, 1);
                h.tcp.segment(h.now, NetworkId(1), gw, c, 1500, syn, &bytes);
                h.pump_tcp();
            }
            Op::TcpQuery {
                client,
                conn,
                bytes,
            } => {
                let c = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, client), 40_000);
                let gw = Ipv4Addr::new(10, 1, 0, 1);
                h.s.handle_query_tcp(h.now, NetworkId(1), gw, c, u64::from(conn), &bytes);
                h.pump_tcp();
            }
            Op::AddName { host, name, alias } => {
                let _ =
                    h.s.names
                        .add(NetworkId(1), Ipv4Addr::new(10, 1, 0, host), &[name, alias]);
            }
            Op::Forward { name, aaaa, client } => {
                let mut m = Message::new(u16::from(name), MessageType::Query, OpCode::Query);
                m.metadata.recursion_desired = true;
                let qtype = if aaaa {
                    RecordType::AAAA
                } else {
                    RecordType::A
                };
                if let Ok(n) = Name::from_ascii(format!("h{name}.example.")) {
                    m.add_query(Query::query(n, qtype));
                }
                if let Ok(bytes) = m.to_vec() {
                    h.query(client % 8 + 2, false, 1472, &bytes);
                }
            }
            Op::RemoveName { host } => {
                h.s.names
                    .remove(NetworkId(1), Ipv4Addr::new(10, 1, 0, host));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let mut h = Harness::new();
        h.query(2, mode & 2 != 0, 1472, rest);
        h.s.expire(Instant::from_millis(10_000));
        h.check(1472);
    } else {
        ops(rest);
    }
});
