//! The core driven with simulated time: local answers, isolation, forwarding, cache, limits,
//! hostile input.

use std::net::{Ipv4Addr, SocketAddrV4};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use proptest::prelude::*;
use switchyard_switch::{Instant, NetworkId};

use super::*;

const NET_A: NetworkId = NetworkId(1);
const NET_B: NetworkId = NetworkId(2);
const GW_A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const GW_B: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
const C1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const C2: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const UP1: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 53), 53);
const UP2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 53), 53);

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms as i64)
}

fn net(third: u8, internal: bool) -> NetInfo {
    NetInfo {
        subnet: Ipv4Addr::new(10, third, 0, 0),
        prefix_len: 24,
        gateway: Ipv4Addr::new(10, third, 0, 1),
        internal,
        search: Vec::new(),
        mtu: 1500,
    }
}

fn server(cfg: DnsConfig) -> DnsServer {
    let mut s = DnsServer::new(cfg);
    s.set_network(NET_A, net(1, false));
    s.set_network(NET_B, net(2, false));
    s.names
        .add(NET_A, C1, &["c1".into(), "web".into()])
        .unwrap();
    s.names.add(NET_A, C2, &["c2".into()]).unwrap();
    s
}

fn with_upstreams() -> DnsServer {
    server(DnsConfig {
        upstreams: vec![UP1, UP2],
        ..DnsConfig::default()
    })
}

fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn client(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 40_000)
}

/// Ask from C1 on NET_A and return the one reply (panics if there is none or something else).
fn ask(s: &mut DnsServer, now: Instant, payload: &[u8]) -> Message {
    ask_from(s, now, NET_A, GW_A, client(C1), payload).expect("a reply")
}

fn ask_from(
    s: &mut DnsServer,
    now: Instant,
    net: NetworkId,
    gw: Ipv4Addr,
    c: SocketAddrV4,
    payload: &[u8],
) -> Option<Message> {
    s.handle_query(now, net, gw, c, payload, 1472);
    let out: Vec<Output> = s.drain().collect();
    assert!(out.len() <= 1, "{out:?}");
    out.into_iter().next().map(|o| match o {
        Output::Reply {
            net: n,
            server,
            client: to,
            payload,
            ..
        } => {
            assert_eq!((n, server, to), (net, gw, c));
            Message::from_vec(&payload).unwrap()
        }
        o => panic!("expected a reply, got {o:?}"),
    })
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(ip)) => Some(*ip),
            _ => None,
        })
        .collect()
}

/// The one upstream query the last call produced: (upstream, port, id, message).
fn upstream(s: &mut DnsServer) -> (SocketAddrV4, u16, Message) {
    let out: Vec<Output> = s.drain().collect();
    assert_eq!(out.len(), 1, "{out:?}");
    match out.into_iter().next().unwrap() {
        Output::Upstream { to, port, payload } => (to, port, Message::from_vec(&payload).unwrap()),
        o => panic!("expected an upstream query, got {o:?}"),
    }
}

fn answer_for(q: &Message, ip: Ipv4Addr, ttl: u32) -> Vec<u8> {
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_available = true;
    m.add_query(q.queries[0].clone());
    m.add_answer(Record::from_rdata(
        q.queries[0].name().clone(),
        ttl,
        RData::A(A(ip)),
    ));
    m.to_vec().unwrap()
}

#[test]
fn local_names_and_aliases_answer_on_the_askers_network() {
    let mut s = with_upstreams();
    let r = ask(&mut s, t(0), &query(7, "c2", RecordType::A));
    assert_eq!(r.metadata.id, 7);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative && r.metadata.recursion_available);
    assert_eq!(a_records(&r), vec![C2]);
    assert_eq!(r.answers[0].ttl, 600);
    // The alias, any letter case, with or without the root dot; the question is echoed.
    let r = ask(&mut s, t(0), &query(8, "WeB.", RecordType::A));
    assert_eq!(a_records(&r), vec![C1]);
    assert_eq!(r.queries[0].name().to_ascii(), "WeB.");
    // AAAA of a local name: no error, no data.
    let r = ask(&mut s, t(0), &query(9, "c1", RecordType::AAAA));
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    // PTR for an address of the network; NXDOMAIN for a free address in it.
    let r = ask(
        &mut s,
        t(0),
        &query(10, "3.0.1.10.in-addr.arpa.", RecordType::PTR),
    );
    match &r.answers[0].data {
        RData::PTR(p) => assert_eq!(p.0.to_ascii(), "c2."),
        d => panic!("{d:?}"),
    }
    let r = ask(
        &mut s,
        t(0),
        &query(11, "99.0.1.10.in-addr.arpa.", RecordType::PTR),
    );
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(!s.has_output());
    assert_eq!(s.counters().forwarded, 0);
}

#[test]
fn other_networks_names_are_not_visible() {
    let mut s = with_upstreams();
    let cb = client(Ipv4Addr::new(10, 2, 0, 2));
    let r = ask_from(
        &mut s,
        t(0),
        NET_B,
        GW_B,
        cb,
        &query(1, "c1", RecordType::A),
    )
    .unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(r.answers.is_empty());
    // Nor by address: a reverse lookup of NET_A's address from NET_B is not answered locally.
    let q = query(2, "2.0.1.10.in-addr.arpa.", RecordType::PTR);
    s.handle_query(t(0), NET_B, GW_B, cb, &q, 1472);
    let (_, _, m) = upstream(&mut s);
    assert_eq!(m.queries[0].query_type(), RecordType::PTR);
    // After removal the name is gone on its own network too.
    s.names.remove(NET_A, C2);
    let r = ask(&mut s, t(0), &query(3, "c2", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn forwarding_maps_ids_and_checks_the_reply() {
    let mut s = with_upstreams();
    s.handle_query(
        t(0),
        NET_A,
        GW_A,
        client(C1),
        &query(0x1234, "example.org", RecordType::A),
        1472,
    );
    let (to, port, q) = upstream(&mut s);
    assert_eq!(to, UP1);
    assert!((61_000..=65_535).contains(&port));
    assert!(q.metadata.recursion_desired);
    assert!(s.expects(UP1, port));
    let ans = answer_for(&q, Ipv4Addr::new(203, 0, 113, 7), 300);
    // From the wrong server, to the wrong port, with the wrong id or question: ignored.
    s.handle_upstream(t(10), UP2, Some(port), &ans);
    s.handle_upstream(t(10), UP1, Some(port.wrapping_add(1)), &ans);
    let mut wrong_id = Message::from_vec(&ans).unwrap();
    wrong_id.metadata.id = q.metadata.id.wrapping_add(1);
    s.handle_upstream(t(10), UP1, Some(port), &wrong_id.to_vec().unwrap());
    let mut wrong_q = q.clone();
    wrong_q.queries[0].set_name(Name::from_ascii("evil.org.").unwrap());
    s.handle_upstream(
        t(10),
        UP1,
        Some(port),
        &answer_for(&wrong_q, Ipv4Addr::LOCALHOST, 300),
    );
    s.handle_upstream(t(10), UP1, Some(port), b"\x00garbage");
    assert!(!s.has_output());
    assert_eq!(s.counters().upstream_unmatched, 5);
    // The real one goes back under the client's id.
    s.handle_upstream(t(10), UP1, Some(port), &ans);
    let out: Vec<Output> = s.drain().collect();
    let Output::Reply {
        client: c, payload, ..
    } = &out[0]
    else {
        panic!("{out:?}")
    };
    assert_eq!(*c, client(C1));
    let r = Message::from_vec(payload).unwrap();
    assert_eq!(r.metadata.id, 0x1234);
    assert_eq!(a_records(&r), vec![Ipv4Addr::new(203, 0, 113, 7)]);
    assert_eq!(s.pending_len(), 0);
    assert!(!s.expects(UP1, port));
    // A late duplicate of the reply is unmatched now.
    s.handle_upstream(t(20), UP1, Some(port), &ans);
    assert!(!s.has_output());
}

#[test]
fn timeouts_retry_the_next_upstream_then_servfail() {
    let mut s = with_upstreams();
    s.handle_query(
        t(0),
        NET_A,
        GW_A,
        client(C1),
        &query(5, "slow.example", RecordType::A),
        1472,
    );
    let (to, _, q1) = upstream(&mut s);
    assert_eq!(to, UP1);
    assert_eq!(s.poll_timeout(), Some(t(2000)));
    s.expire(t(1999));
    assert!(!s.has_output());
    s.expire(t(2000));
    let (to, _, q2) = upstream(&mut s);
    assert_eq!(to, UP2);
    assert_eq!(q2.metadata.id, q1.metadata.id);
    // The first server's late answer no longer counts: the query is UP2's now.
    s.handle_upstream(
        t(2100),
        UP1,
        None,
        &answer_for(&q1, Ipv4Addr::LOCALHOST, 60),
    );
    assert!(!s.has_output());
    s.expire(t(4000));
    let out: Vec<Output> = s.drain().collect();
    let Output::Reply { payload, .. } = &out[0] else {
        panic!("{out:?}")
    };
    let r = Message::from_vec(payload).unwrap();
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (5, ResponseCode::ServFail)
    );
    assert_eq!(s.counters().servfail, 1);
    assert_eq!(s.counters().upstream_timeouts, 2);
    assert_eq!(s.pending_len(), 0);
}

#[test]
fn timeout_reply_is_servfail_to_the_client() {
    let mut s = server(DnsConfig {
        upstreams: vec![UP1],
        attempts: 1,
        ..DnsConfig::default()
    });
    s.handle_query(
        t(0),
        NET_A,
        GW_A,
        client(C1),
        &query(77, "slow.example", RecordType::A),
        1472,
    );
    let _ = upstream(&mut s);
    s.expire(t(2000));
    let out: Vec<Output> = s.drain().collect();
    let Output::Reply { payload, .. } = &out[0] else {
        panic!("{out:?}")
    };
    let r = Message::from_vec(payload).unwrap();
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (77, ResponseCode::ServFail)
    );
}

#[test]
fn answers_are_cached_for_their_ttl() {
    let mut s = with_upstreams();
    s.handle_query(
        t(0),
        NET_A,
        GW_A,
        client(C1),
        &query(1, "cached.example", RecordType::A),
        1472,
    );
    let (_, port, q) = upstream(&mut s);
    s.handle_upstream(
        t(50),
        UP1,
        Some(port),
        &answer_for(&q, Ipv4Addr::new(203, 0, 113, 9), 30),
    );
    s.drain();
    // 10 s later, from another container of the network: from the cache, TTL aged.
    let r = ask_from(
        &mut s,
        t(10_050),
        NET_A,
        GW_A,
        client(C2),
        &query(2, "CACHED.example", RecordType::A),
    )
    .unwrap();
    assert_eq!(r.metadata.id, 2);
    assert_eq!(a_records(&r), vec![Ipv4Addr::new(203, 0, 113, 9)]);
    assert_eq!(r.answers[0].ttl, 20);
    assert_eq!(r.queries[0].name().to_ascii(), "CACHED.example.");
    assert_eq!(s.counters().cache_hits, 1);
    // Expired: asked upstream again.
    s.handle_query(
        t(30_050),
        NET_A,
        GW_A,
        client(C1),
        &query(3, "cached.example", RecordType::A),
        1472,
    );
    let _ = upstream(&mut s);
    // NXDOMAIN is cached for the SOA minimum, capped by negative_ttl.
    s.handle_query(
        t(31_000),
        NET_A,
        GW_A,
        client(C1),
        &query(4, "nope.example", RecordType::A),
        1472,
    );
    let (_, port, q) = upstream(&mut s);
    let mut nx = Message::response(q.metadata.id, OpCode::Query);
    nx.metadata.response_code = ResponseCode::NXDomain;
    nx.add_query(q.queries[0].clone());
    let soa = SOA::new(
        Name::from_ascii("ns.example.").unwrap(),
        Name::from_ascii("h.example.").unwrap(),
        1,
        2,
        3,
        4,
        5,
    );
    nx.add_authority(Record::from_rdata(
        Name::from_ascii("example.").unwrap(),
        900,
        RData::SOA(soa),
    ));
    s.handle_upstream(t(31_010), UP1, Some(port), &nx.to_vec().unwrap());
    s.drain();
    let r = ask(&mut s, t(33_000), &query(5, "nope.example", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    s.handle_query(
        t(36_100),
        NET_A,
        GW_A,
        client(C1),
        &query(6, "nope.example", RecordType::A),
        1472,
    );
    let _ = upstream(&mut s);
}

#[test]
fn cache_is_bounded() {
    let mut s = server(DnsConfig {
        upstreams: vec![UP1],
        cache_max: 3,
        ..DnsConfig::default()
    });
    for i in 0..10u16 {
        let name = format!("n{i}.example");
        s.handle_query(
            t(u64::from(i)),
            NET_A,
            GW_A,
            client(C1),
            &query(i, &name, RecordType::A),
            1472,
        );
        let (_, port, q) = upstream(&mut s);
        s.handle_upstream(
            t(u64::from(i)),
            UP1,
            Some(port),
            &answer_for(&q, Ipv4Addr::LOCALHOST, 100 + u32::from(i)),
        );
        s.drain();
        assert!(s.cache_len() <= 3);
    }
    assert_eq!(s.counters().cache_evicted, 7);
}

#[test]
fn per_client_rate_limit() {
    let mut s = server(DnsConfig {
        rate_per_sec: 2,
        burst: 3,
        ..DnsConfig::default()
    });
    let q = query(1, "c1", RecordType::A);
    for _ in 0..3 {
        assert!(ask_from(&mut s, t(0), NET_A, GW_A, client(C1), &q).is_some());
    }
    assert!(ask_from(&mut s, t(0), NET_A, GW_A, client(C1), &q).is_none());
    assert_eq!(s.counters().rate_limited, 1);
    // Another client is not affected; half a second refills one token.
    assert!(ask_from(&mut s, t(0), NET_A, GW_A, client(C2), &q).is_some());
    assert!(ask_from(&mut s, t(500), NET_A, GW_A, client(C1), &q).is_some());
    assert!(ask_from(&mut s, t(500), NET_A, GW_A, client(C1), &q).is_none());
}

#[test]
fn client_table_is_bounded() {
    let mut s = server(DnsConfig {
        max_clients: 4,
        ..DnsConfig::default()
    });
    for i in 0..50u8 {
        let c = client(Ipv4Addr::new(10, 1, 0, 10 + i));
        assert!(ask_from(&mut s, t(0), NET_A, GW_A, c, &query(1, "c1", RecordType::A)).is_some());
    }
}

#[test]
fn hostile_queries_get_errors_or_are_dropped() {
    let mut s = with_upstreams();
    // Too short for a header, and a response sent to us: dropped.
    assert!(ask_from(&mut s, t(0), NET_A, GW_A, client(C1), b"\x12\x34\x01").is_none());
    let mut resp = Message::from_vec(&query(1, "c1", RecordType::A)).unwrap();
    resp.metadata.message_type = MessageType::Response;
    assert!(ask_from(
        &mut s,
        t(0),
        NET_A,
        GW_A,
        client(C1),
        &resp.to_vec().unwrap()
    )
    .is_none());
    // Garbage after a header: FORMERR under the client's id.
    let mut bad = query(0xbeef, "c1", RecordType::A);
    bad.truncate(17);
    let r = ask(&mut s, t(0), &bad);
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (0xbeef, ResponseCode::FormErr)
    );
    // Two questions: FORMERR. An opcode we do not do: NOTIMP.
    let mut two = Message::from_vec(&query(2, "c1", RecordType::A)).unwrap();
    two.add_query(Query::query(Name::from_ascii("c2").unwrap(), RecordType::A));
    assert_eq!(
        ask(&mut s, t(0), &two.to_vec().unwrap())
            .metadata
            .response_code,
        ResponseCode::FormErr
    );
    let mut st = Message::from_vec(&query(3, "c1", RecordType::A)).unwrap();
    st.metadata.op_code = OpCode::Status;
    assert_eq!(
        ask(&mut s, t(0), &st.to_vec().unwrap())
            .metadata
            .response_code,
        ResponseCode::NotImp
    );
    // Chaos class, zone transfers and names with odd bytes: REFUSED, never forwarded.
    let mut ch = Message::from_vec(&query(4, "version.bind", RecordType::TXT)).unwrap();
    ch.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(
        ask(&mut s, t(0), &ch.to_vec().unwrap())
            .metadata
            .response_code,
        ResponseCode::Refused
    );
    assert_eq!(
        ask(&mut s, t(0), &query(5, "example.org", RecordType::AXFR))
            .metadata
            .response_code,
        ResponseCode::Refused
    );
    let odd = Name::from_labels(vec![b"a b\x01".to_vec(), b"example".to_vec()]).unwrap();
    let mut m = Message::new(6, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(odd, RecordType::A));
    assert_eq!(
        ask(&mut s, t(0), &m.to_vec().unwrap())
            .metadata
            .response_code,
        ResponseCode::Refused
    );
    // Oversized: dropped.
    let mut big = query(7, "c1", RecordType::A);
    big.resize(MAX_QUERY_TEST, 0);
    assert!(ask_from(&mut s, t(0), NET_A, GW_A, client(C1), &big).is_none());
    assert_eq!(s.counters().oversize_dropped, 1);
    assert_eq!(s.counters().forwarded, 0);
    // A network the server does not serve: dropped.
    s.handle_query(
        t(0),
        NetworkId(9),
        GW_A,
        client(C1),
        &query(8, "c1", RecordType::A),
        1472,
    );
    assert!(!s.has_output());
}

const MAX_QUERY_TEST: usize = server::MAX_QUERY + 1;

#[test]
fn big_answers_are_truncated_for_the_client() {
    let mut s = with_upstreams();
    for i in 0..60u8 {
        s.names
            .add(
                NET_A,
                Ipv4Addr::new(10, 1, 0, 100 + i),
                &[format!("x{i}"), "many".into()],
            )
            .unwrap();
    }
    let r = ask(&mut s, t(0), &query(1, "many", RecordType::A));
    assert!(r.metadata.truncation);
    assert!(r.answers.is_empty());
    // With EDNS and room for 1232 bytes, all 60 fit.
    let mut m = Message::from_vec(&query(2, "many", RecordType::A)).unwrap();
    let mut e = Edns::new();
    e.set_max_payload(4096);
    m.set_edns(e);
    let r = ask(&mut s, t(0), &m.to_vec().unwrap());
    assert!(!r.metadata.truncation);
    assert_eq!(a_records(&r).len(), 60);
}

#[test]
fn pending_table_is_bounded_and_retransmissions_are_not_forwarded_twice() {
    let mut s = server(DnsConfig {
        upstreams: vec![UP1],
        max_pending: 2,
        ..DnsConfig::default()
    });
    let q = query(1, "a.example", RecordType::A);
    s.handle_query(t(0), NET_A, GW_A, client(C1), &q, 1472);
    let _ = upstream(&mut s);
    s.handle_query(t(100), NET_A, GW_A, client(C1), &q, 1472);
    assert!(!s.has_output());
    assert_eq!(s.counters().duplicates, 1);
    s.handle_query(
        t(0),
        NET_A,
        GW_A,
        client(C1),
        &query(2, "b.example", RecordType::A),
        1472,
    );
    let _ = upstream(&mut s);
    let r = ask(&mut s, t(0), &query(3, "c.example", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(s.counters().pending_full, 1);
}

#[test]
fn internal_networks_and_no_upstreams_do_not_forward() {
    let mut s = DnsServer::new(DnsConfig::default());
    s.set_network(NET_A, net(1, false));
    s.set_network(NET_B, net(2, true));
    let r = ask(&mut s, t(0), &query(1, "example.org", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    let mut s = with_upstreams();
    s.set_network(NET_B, net(2, true));
    let cb = client(Ipv4Addr::new(10, 2, 0, 2));
    let r = ask_from(
        &mut s,
        t(0),
        NET_B,
        GW_B,
        cb,
        &query(1, "example.org", RecordType::A),
    )
    .unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn search_domain_names() {
    let mut s = with_upstreams();
    let mut i = net(1, false);
    i.search = vec!["corp.test".into()];
    s.set_network(NET_A, i);
    let r = ask(&mut s, t(0), &query(1, "c1.corp.test", RecordType::A));
    assert_eq!(a_records(&r), vec![C1]);
    assert_eq!(s.counters().forwarded, 0);
    // Other names of the domain may be real hosts: forwarded, not answered here.
    s.handle_query(
        t(0),
        NET_A,
        GW_A,
        client(C1),
        &query(2, "zz.corp.test", RecordType::A),
        1472,
    );
    assert!(s.drain().any(|o| matches!(o, Output::Upstream { .. })));
    assert_eq!(s.counters().forwarded, 1);
}

#[test]
fn same_inputs_same_outputs() {
    let run = || {
        let mut s = with_upstreams();
        let mut all = Vec::new();
        for i in 0..20u16 {
            s.handle_query(
                t(u64::from(i) * 300),
                NET_A,
                GW_A,
                client(C1),
                &query(i, &format!("h{i}.example"), RecordType::A),
                1472,
            );
            s.expire(t(u64::from(i) * 300));
            all.extend(s.drain());
        }
        all
    };
    assert_eq!(run(), run());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// Any bytes, as a query or as an upstream reply: no panic, and every reply parses.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600), up in any::<bool>()) {
        let mut s = with_upstreams();
        s.handle_query(t(0), NET_A, GW_A, client(C1), &query(1, "x.example", RecordType::A), 1472);
        s.drain();
        if up {
            s.handle_upstream(t(1), UP1, None, &data);
        } else {
            s.handle_query(t(1), NET_A, GW_A, client(C1), &data, 1472);
        }
        s.expire(t(10_000));
        for o in s.drain() {
            if let Output::Reply { payload, .. } = o {
                prop_assert!(Message::from_vec(&payload).is_ok());
                prop_assert!(payload.len() <= 1472);
            }
        }
    }

    /// Mutated real queries (more likely to get deep into the parser).
    #[test]
    fn mutated_queries_never_panic(i in 0usize..64, b in any::<u8>(), cut in 12usize..64) {
        let mut q = query(9, "web.example.org", RecordType::A);
        if i < q.len() { q[i] = b; }
        q.truncate(cut.max(12));
        let mut s = with_upstreams();
        s.handle_query(t(0), NET_A, GW_A, client(C1), &q, 1472);
        s.drain();
    }
}

/// An upstream answer to `q` with `n` A records, TC set or not.
fn many_for(q: &Message, n: u8, tc: bool) -> Vec<u8> {
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_available = true;
    m.metadata.truncation = tc;
    m.add_query(q.queries[0].clone());
    if !tc {
        for i in 0..n {
            m.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                300,
                RData::A(A(Ipv4Addr::new(203, 0, 113, i))),
            ));
        }
    }
    m.to_vec().unwrap()
}

/// The one TCP exchange the last call asked for: (id, upstream, port, message).
fn upstream_tcp(s: &mut DnsServer) -> TcpAsk {
    let out: Vec<Output> = s.drain().collect();
    assert_eq!(out.len(), 1, "{out:?}");
    match out.into_iter().next().unwrap() {
        Output::UpstreamTcp {
            id,
            to,
            port,
            payload,
        } => (id, to, port, Message::from_vec(&payload).unwrap()),
        o => panic!("expected a TCP exchange, got {o:?}"),
    }
}

fn reply_of(s: &mut DnsServer) -> (Transport, Message) {
    let out: Vec<Output> = s.drain().collect();
    assert_eq!(out.len(), 1, "{out:?}");
    match out.into_iter().next().unwrap() {
        Output::Reply {
            transport, payload, ..
        } => (transport, Message::from_vec(&payload).unwrap()),
        o => panic!("expected a reply, got {o:?}"),
    }
}

/// A TCP exchange the core asked for: (id, upstream, port, message).
type TcpAsk = (u16, SocketAddrV4, u16, Message);
/// An upstream query over UDP: (upstream, port, message).
type UdpAsk = (SocketAddrV4, u16, Message);

/// Ask `name` (id `id`) from C1 at `at`; the upstream answers TC. Returns the TCP exchange
/// asked for and the UDP query.
fn truncated_then_tcp(s: &mut DnsServer, id: u16, name: &str, at: u64) -> (TcpAsk, UdpAsk) {
    let q = query(id, name, RecordType::A);
    s.handle_query(t(at), NET_A, GW_A, client(C1), &q, 1472);
    let (to, port, q) = upstream(s);
    s.handle_upstream(t(at), to, Some(port), &many_for(&q, 0, true));
    (upstream_tcp(s), (to, port, q))
}

#[test]
fn truncated_upstream_answers_are_asked_again_over_tcp() {
    let mut s = with_upstreams();
    // TC from the upstream: not passed on, asked again over TCP to the same upstream.
    let ((id, tto, tport, tq), (to, port, q)) = truncated_then_tcp(&mut s, 7, "big.example", 0);
    assert_eq!((id, tto, tport), (q.metadata.id, to, port));
    assert_eq!(tq.queries, q.queries);
    assert_eq!(s.counters().upstream_tcp, 1);
    // A late UDP answer does not end it now.
    s.handle_upstream(t(20), to, Some(port), &many_for(&q, 3, false));
    assert_eq!(s.drain().count(), 0);
    assert!(!s.expects(to, port));
    // The whole answer over TCP: 5 records fit the client's 512 bytes, all sent over UDP.
    s.handle_upstream_tcp(t(30), id, Some(&many_for(&tq, 5, false)));
    let (tr, r) = reply_of(&mut s);
    assert_eq!(tr, Transport::Udp);
    assert_eq!(r.metadata.id, 7);
    assert!(!r.metadata.truncation);
    assert_eq!(a_records(&r).len(), 5);
    assert_eq!(s.pending_len(), 0);
    // A second TCP answer for it is nobody's.
    s.handle_upstream_tcp(t(40), id, Some(&many_for(&tq, 5, false)));
    assert_eq!(s.drain().count(), 0);
}

#[test]
fn a_whole_answer_too_big_for_the_client_is_truncated_then_served_over_tcp_from_the_cache() {
    let mut s = with_upstreams();
    let ((id, _, _, tq), _) = truncated_then_tcp(&mut s, 8, "big.example", 0);
    // 60 records: more than a 512-byte datagram holds.
    s.handle_upstream_tcp(t(20), id, Some(&many_for(&tq, 60, false)));
    let (_, r) = reply_of(&mut s);
    assert!(r.metadata.truncation);
    assert_eq!(s.counters().truncated, 1);
    // The client's retry over TCP at the gateway: all of it, from the cache.
    s.handle_query_tcp(
        t(30),
        NET_A,
        GW_A,
        client(C1),
        4,
        &query(9, "big.example", RecordType::A),
    );
    let (tr, r) = reply_of(&mut s);
    assert_eq!(tr, Transport::Tcp(4));
    assert!(!r.metadata.truncation);
    assert_eq!(a_records(&r).len(), 60);
    assert_eq!(s.counters().cache_hits, 1);
    assert_eq!(s.counters().forwarded, 1);
}

#[test]
fn a_failed_or_hung_or_bad_tcp_exchange_is_servfail() {
    let mut s = with_upstreams();
    let start = |s: &mut DnsServer, id: u16, at: u64| {
        truncated_then_tcp(s, id, &format!("h{id}.example"), at).0
    };
    // Refused or reset: SERVFAIL at once.
    let (id, ..) = start(&mut s, 1, 0);
    s.handle_upstream_tcp(t(5), id, None);
    let (_, r) = reply_of(&mut s);
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (1, ResponseCode::ServFail)
    );
    // An answer to another question, or still truncated: SERVFAIL.
    let (id, _, _, tq) = start(&mut s, 2, 0);
    let other = Message::from_vec(&query(id, "other.example", RecordType::A)).unwrap();
    s.handle_upstream_tcp(t(5), id, Some(&many_for(&other, 1, false)));
    assert_eq!(
        reply_of(&mut s).1.metadata.response_code,
        ResponseCode::ServFail
    );
    let (id, _, _, tq2) = start(&mut s, 3, 0);
    s.handle_upstream_tcp(t(5), id, Some(&many_for(&tq2, 0, true)));
    assert_eq!(
        reply_of(&mut s).1.metadata.response_code,
        ResponseCode::ServFail
    );
    let _ = tq;
    // Hung: SERVFAIL at the TCP timeout, and no retry over UDP.
    let (id, ..) = start(&mut s, 4, 100);
    let due = t(100) + DnsConfig::default().tcp_timeout;
    assert_eq!(s.poll_timeout(), Some(due));
    s.expire(due - switchyard_switch::Duration::from_millis(1));
    assert_eq!(s.drain().count(), 0);
    s.expire(due);
    let (_, r) = reply_of(&mut s);
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (4, ResponseCode::ServFail)
    );
    s.handle_upstream_tcp(due, id, None);
    assert_eq!(s.drain().count(), 0);
    assert_eq!(s.counters().upstream_tcp, 4);
    assert_eq!(s.counters().upstream_tcp_failed, 4);
    assert_eq!(s.pending_len(), 0);
}
