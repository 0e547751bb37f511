//! The DNS server core: queries in, replies and upstream queries out. Pure: no socket, no
//! clock (time is an argument), seeded randomness, ordered maps; the same inputs give the same
//! outputs, so it is unit-tested with simulated time and fuzzed.
//!
//! A query from network `net` is answered from that network's names ([`Names`]) or forwarded
//! upstream with a fresh id (and source port) from the pending table; the upstream reply is
//! checked (address, port, id, question) and sent back under the client's id, and cached for
//! its TTL. Nothing the client sends can make it panic: bad input is answered with
//! FORMERR/REFUSED/NOTIMP/SERVFAIL or dropped, and counted in [`DnsCounters`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use serde::Serialize;
use switchyard_switch::{Duration, Instant, NetworkId};

use super::table::{normalize, Names, NetInfo, Reverse};

/// Queries longer than this are dropped (a query is one question: real ones are < 300 bytes).
pub const MAX_QUERY: usize = 4096;
/// Payload size we advertise upstream and to EDNS clients (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Classic DNS over UDP limit for clients without EDNS.
const CLASSIC_UDP: usize = 512;

/// Settings. `Default` is what the daemon uses, less the upstreams and the seed.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Where names that are not local are resolved.
    pub upstreams: Vec<SocketAddrV4>,
    /// Wait this long for an upstream before trying the next one.
    pub timeout: Duration,
    /// Tries per query (the first upstream, then the next ones in turn), then SERVFAIL.
    pub attempts: u8,
    /// An upstream's truncated UDP answer is asked again over TCP, with this long for the
    /// whole exchange (connect, query, answer); then SERVFAIL.
    pub tcp_timeout: Duration,
    /// Forwarded queries outstanding at most; more get SERVFAIL.
    pub max_pending: usize,
    /// Cached answers at most.
    pub cache_max: usize,
    /// Cache TTL ceiling, seconds.
    pub cache_max_ttl: u32,
    /// Negative answers (NXDOMAIN, no data) are cached at most this long, seconds.
    pub negative_ttl: u32,
    /// TTL of local answers (Docker's embedded DNS uses 600).
    pub local_ttl: u32,
    /// Queries per second per client address (token bucket refill) and its depth.
    pub rate_per_sec: u32,
    pub burst: u32,
    /// Client buckets tracked at most (idle ones are forgotten first).
    pub max_clients: usize,
    /// Upstream queries leave from a source port in this range (raw uplink: outside the
    /// masquerade range 32768-60999 so the two never collide).
    pub port_range: (u16, u16),
    /// Seeds upstream ids and ports (the daemon randomises it).
    pub seed: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            upstreams: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            tcp_timeout: Duration::from_secs(3),
            max_pending: 1024,
            cache_max: 4096,
            cache_max_ttl: 3600,
            negative_ttl: 60,
            local_ttl: 600,
            rate_per_sec: 200,
            burst: 400,
            max_clients: 4096,
            port_range: (61_000, 65_535),
            seed: 0x0d75_5eed_1234_5678,
        }
    }
}

/// Largest DNS message over TCP (the 2-byte length prefix, RFC 1035 4.2.2).
pub const MAX_TCP_MESSAGE: usize = 65_535;

/// How a query came in, and so how its reply goes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    /// A datagram from the client's address and port.
    Udp,
    /// A message on the gateway's TCP connection with this id (see [`super::tcp`]).
    Tcp(u64),
}

/// What the core wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A reply to `client` on `net`, from `server` (the gateway) port 53, over `transport`.
    Reply {
        net: NetworkId,
        server: Ipv4Addr,
        client: SocketAddrV4,
        transport: Transport,
        payload: Vec<u8>,
    },
    /// A query to upstream `to`, from local source port `port` (used by the raw uplink; a
    /// host socket may send from its own port and report replies with `None`).
    Upstream {
        to: SocketAddrV4,
        port: u16,
        payload: Vec<u8>,
    },
    /// The same question again over TCP to upstream `to` (its UDP answer came truncated), from
    /// local port `port` (raw uplink), as exchange `id`: one message out, one back, reported
    /// through [`DnsServer::handle_upstream_tcp`]. `payload` is the bare message (no prefix).
    UpstreamTcp {
        id: u16,
        to: SocketAddrV4,
        port: u16,
        payload: Vec<u8>,
    },
}

/// Counters, one per outcome (for `switchyard stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DnsCounters {
    pub queries: u64,
    /// Of which over TCP.
    pub tcp_queries: u64,
    pub local_answers: u64,
    pub nxdomain: u64,
    pub forwarded: u64,
    pub cache_hits: u64,
    pub upstream_replies: u64,
    pub upstream_timeouts: u64,
    pub upstream_retries: u64,
    /// Replies from upstream that matched no pending query (late, spoofed, garbage).
    pub upstream_unmatched: u64,
    /// Truncated upstream answers asked again over TCP, and those exchanges that failed
    /// (refused, reset, timed out, no room for a connection, a bad answer): SERVFAIL.
    pub upstream_tcp: u64,
    pub upstream_tcp_failed: u64,
    pub servfail: u64,
    pub formerr: u64,
    pub refused: u64,
    pub notimp: u64,
    /// Replies that did not fit the client's size and went out with TC set.
    pub truncated: u64,
    pub rate_limited: u64,
    /// Dropped without an answer: too short, a response sent to us, oversized.
    pub malformed_dropped: u64,
    pub oversize_dropped: u64,
    /// A client's retransmission of a query already pending (dropped; the reply will come).
    pub duplicates: u64,
    pub pending_full: u64,
    pub cache_evicted: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ClientKey {
    net: NetworkId,
    client: SocketAddrV4,
    transport: Transport,
    id: u16,
}

/// Where a reply goes.
#[derive(Clone, Copy, Debug)]
struct Dest {
    net: NetworkId,
    server: Ipv4Addr,
    client: SocketAddrV4,
    transport: Transport,
}

#[derive(Debug)]
struct Pending {
    key: ClientKey,
    server: Ipv4Addr,
    /// The question as the client asked it (its letter case is echoed back).
    query: Query,
    edns: bool,
    max_udp: usize,
    upstream: usize,
    port: u16,
    tries: u8,
    deadline: Instant,
    /// Asked again over TCP (after a truncated answer): only that exchange answers it now.
    tcp: bool,
}

impl Pending {
    fn dest(&self) -> Dest {
        Dest {
            net: self.key.net,
            server: self.server,
            client: self.key.client,
            transport: self.key.transport,
        }
    }
}

type CacheKey = (String, u16, u16);

#[derive(Debug)]
struct Cached {
    msg: Message,
    stored: Instant,
    expires: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u64,
    last: Instant,
}

/// One millisecond of rate limiting, in tokens scaled by 1000 (integer arithmetic).
const SCALE: u64 = 1000;

/// The server: names, pending forwards, cache, rate limits. See the module doc.
#[derive(Debug)]
pub struct DnsServer {
    cfg: DnsConfig,
    pub names: Names,
    pending: BTreeMap<u16, Pending>,
    by_client: BTreeMap<ClientKey, u16>,
    cache: BTreeMap<CacheKey, Cached>,
    buckets: BTreeMap<Ipv4Addr, Bucket>,
    rng: u64,
    out: Vec<Output>,
    counters: DnsCounters,
}

impl DnsServer {
    pub fn new(cfg: DnsConfig) -> Self {
        DnsServer {
            rng: cfg.seed | 1,
            cfg,
            names: Names::default(),
            pending: BTreeMap::new(),
            by_client: BTreeMap::new(),
            cache: BTreeMap::new(),
            buckets: BTreeMap::new(),
            out: Vec::new(),
            counters: DnsCounters::default(),
        }
    }

    pub fn config(&self) -> &DnsConfig {
        &self.cfg
    }

    /// Replace the upstream list (pending queries finish against the old one or time out).
    pub fn set_upstreams(&mut self, u: Vec<SocketAddrV4>) {
        self.cfg.upstreams = u;
    }

    pub fn counters(&self) -> DnsCounters {
        self.counters
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Take what is to be sent.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Is a reply from `from` to local port `port` one we wait for? (The raw uplink asks this
    /// before it takes a packet away from the NAT path.)
    pub fn expects(&self, from: SocketAddrV4, port: u16) -> bool {
        self.pending
            .values()
            .any(|p| !p.tcp && p.port == port && self.cfg.upstreams.get(p.upstream) == Some(&from))
    }

    /// When [`Self::expire`] has something to do next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn allow(&mut self, ip: Ipv4Addr, now: Instant) -> bool {
        let (rate, burst) = (
            u64::from(self.cfg.rate_per_sec),
            u64::from(self.cfg.burst.max(1)) * SCALE,
        );
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.cfg.max_clients {
            // Forget clients whose bucket refilled (idle for a while), then any if need be.
            let idle = Duration::from_millis(burst / rate.max(1));
            self.buckets.retain(|_, b| now - b.last < idle);
            if self.buckets.len() >= self.cfg.max_clients {
                self.buckets.clear();
            }
        }
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        if now > b.last {
            let ms = (now - b.last).total_millis();
            b.tokens = (b.tokens + ms.saturating_mul(rate)).min(burst);
            b.last = now;
        }
        if b.tokens >= SCALE {
            b.tokens -= SCALE;
            true
        } else {
            false
        }
    }

    /// A UDP datagram to `server`:53 from `client` on network `net`. `max_udp` is the largest
    /// reply the network carries in one datagram (its MTU less the IP and UDP headers).
    pub fn handle_query(
        &mut self,
        now: Instant,
        net: NetworkId,
        server: Ipv4Addr,
        client: SocketAddrV4,
        payload: &[u8],
        max_udp: usize,
    ) {
        let to = Dest {
            net,
            server,
            client,
            transport: Transport::Udp,
        };
        self.query(now, to, payload, max_udp)
    }

    /// One complete message (length prefix removed) on TCP connection `conn` to `server`:53
    /// from `client`: answered like a datagram, but replies are never truncated below
    /// [`MAX_TCP_MESSAGE`] and come back as [`Transport::Tcp`]`(conn)`.
    pub fn handle_query_tcp(
        &mut self,
        now: Instant,
        net: NetworkId,
        server: Ipv4Addr,
        client: SocketAddrV4,
        conn: u64,
        payload: &[u8],
    ) {
        let to = Dest {
            net,
            server,
            client,
            transport: Transport::Tcp(conn),
        };
        self.query(now, to, payload, MAX_TCP_MESSAGE)
    }

    fn query(&mut self, now: Instant, to: Dest, payload: &[u8], max_udp: usize) {
        let Dest {
            net,
            server,
            client,
            transport,
        } = to;
        let tcp = matches!(transport, Transport::Tcp(_));
        self.counters.queries += 1;
        if tcp {
            self.counters.tcp_queries += 1;
        }
        let Some(info) = self.names.network(net).cloned() else {
            self.counters.malformed_dropped += 1;
            return;
        };
        if payload.len() > MAX_QUERY {
            self.counters.oversize_dropped += 1;
            return;
        }
        if !self.allow(*client.ip(), now) {
            self.counters.rate_limited += 1;
            return;
        }
        // Below a header, or a response (QR set: never answer answers, no reflection loops).
        if payload.len() < 12 || payload[2] & 0x80 != 0 {
            self.counters.malformed_dropped += 1;
            return;
        }
        let id = u16::from_be_bytes([payload[0], payload[1]]);
        let first = if tcp {
            max_udp
        } else {
            CLASSIC_UDP.min(max_udp)
        };
        let reply = |s: &mut Self, m: Message| s.send_reply(to, m, first);
        let msg = match Message::from_vec(payload) {
            Ok(m) => m,
            Err(_) => {
                let op = OpCode::from_u8((payload[2] >> 3) & 0x0f);
                let mut m = Message::error_msg(id, op, ResponseCode::FormErr);
                m.metadata.recursion_desired = payload[2] & 0x01 != 0;
                self.counters.formerr += 1;
                return reply(self, m);
            }
        };
        let mut resp = Message::response(id, msg.metadata.op_code);
        resp.metadata.recursion_desired = msg.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.checking_disabled = msg.metadata.checking_disabled;
        let edns = msg.edns.is_some();
        let limit = match &msg.edns {
            // Over TCP the message size is the only limit (RFC 7766 8).
            _ if tcp => max_udp,
            Some(e) => usize::from(e.max_payload().max(512)).min(usize::from(EDNS_PAYLOAD)),
            None => CLASSIC_UDP,
        }
        .min(max_udp);
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(EDNS_PAYLOAD);
            resp.set_edns(e);
        }
        if msg.metadata.op_code != OpCode::Query {
            self.counters.notimp += 1;
            resp.metadata.response_code = ResponseCode::NotImp;
            return self.send_reply(to, resp, limit);
        }
        if msg.queries.len() != 1 {
            self.counters.formerr += 1;
            resp.metadata.response_code = ResponseCode::FormErr;
            return self.send_reply(to, resp, limit);
        }
        let q = msg.queries[0].clone();
        resp.add_query(q.clone());
        let qtype = q.query_type();
        let text = q.name().to_ascii();
        let name = normalize(&text);
        let refuse = q.query_class() != DNSClass::IN
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR | RecordType::OPT);
        let Some(name) = name.filter(|_| !refuse) else {
            // Another class, a zone transfer, or a name no hostname has (spaces, controls,
            // odd bytes): not ours to resolve, and not worth an upstream's time.
            self.counters.refused += 1;
            resp.metadata.response_code = ResponseCode::Refused;
            return self.send_reply(to, resp, limit);
        };
        // Local names: the asker's network only.
        if let Some(addrs) = self.names.lookup(net, &name) {
            resp.metadata.authoritative = true;
            if matches!(qtype, RecordType::A | RecordType::ANY) {
                let ttl = self.cfg.local_ttl;
                for a in addrs {
                    resp.add_answer(Record::from_rdata(q.name().clone(), ttl, RData::A(A(*a))));
                }
            }
            // AAAA and other types of a local name: NOERROR, no data (IPv4 only for now).
            self.counters.local_answers += 1;
            return self.send_reply(to, resp, limit);
        }
        if qtype == RecordType::PTR {
            if let Some(ip) = arpa_v4(&name) {
                match self.names.reverse(net, ip) {
                    Reverse::Name(n) => {
                        if let Ok(target) = Name::from_ascii(format!("{n}.")) {
                            resp.metadata.authoritative = true;
                            resp.add_answer(Record::from_rdata(
                                q.name().clone(),
                                self.cfg.local_ttl,
                                RData::PTR(PTR(target)),
                            ));
                            self.counters.local_answers += 1;
                            return self.send_reply(to, resp, limit);
                        }
                    }
                    Reverse::Unknown => return self.nxdomain(to, resp, limit),
                    Reverse::NotOurs => {}
                }
            }
        }
        // A single label that is no endpoint here: nobody upstream knows it better.
        if !name.contains('.') {
            return self.nxdomain(to, resp, limit);
        }
        if info.internal {
            self.counters.refused += 1;
            resp.metadata.response_code = ResponseCode::Refused;
            return self.send_reply(to, resp, limit);
        }
        let key = (name, u16::from(qtype), u16::from(q.query_class()));
        if let Some(c) = self.cache.get(&key) {
            if c.expires > now {
                let age = ((now - c.stored).secs()).min(u64::from(u32::MAX)) as u32;
                let mut m = c.msg.clone();
                m.metadata.id = id;
                m.metadata.recursion_desired = resp.metadata.recursion_desired;
                m.queries = vec![q];
                m.edns = resp.edns.clone();
                for r in m
                    .answers
                    .iter_mut()
                    .chain(m.authorities.iter_mut())
                    .chain(m.additionals.iter_mut())
                {
                    r.ttl = r.ttl.saturating_sub(age);
                }
                self.counters.cache_hits += 1;
                return self.send_reply(to, m, limit);
            }
            self.cache.remove(&key);
        }
        let ck = ClientKey {
            net,
            client,
            transport,
            id,
        };
        if self.by_client.contains_key(&ck) {
            self.counters.duplicates += 1;
            return;
        }
        if self.cfg.upstreams.is_empty() || self.pending.len() >= self.cfg.max_pending {
            if !self.cfg.upstreams.is_empty() {
                self.counters.pending_full += 1;
            }
            self.counters.servfail += 1;
            resp.metadata.response_code = ResponseCode::ServFail;
            return self.send_reply(to, resp, limit);
        }
        let mut uid = self.rand() as u16;
        while self.pending.contains_key(&uid) {
            uid = uid.wrapping_add(1);
        }
        let (lo, hi) = self.cfg.port_range;
        let span = u64::from(hi.saturating_sub(lo)) + 1;
        let port = lo.saturating_add((self.rand() % span) as u16);
        // The first upstream first, as resolv.conf orders them; the next ones on timeouts.
        let upstream = 0;
        let p = Pending {
            key: ck,
            server,
            query: q,
            edns,
            max_udp: limit,
            upstream,
            port,
            tries: 1,
            deadline: now + self.cfg.timeout,
            tcp: false,
        };
        self.send_upstream(uid, &p);
        self.by_client.insert(ck, uid);
        self.pending.insert(uid, p);
        self.counters.forwarded += 1;
    }

    fn nxdomain(&mut self, to: Dest, mut resp: Message, limit: usize) {
        self.counters.nxdomain += 1;
        resp.metadata.response_code = ResponseCode::NXDomain;
        self.send_reply(to, resp, limit)
    }

    fn send_upstream(&mut self, uid: u16, p: &Pending) {
        let Some(to) = self.cfg.upstreams.get(p.upstream).copied() else {
            return;
        };
        if let Some(payload) = upstream_query(uid, &p.query) {
            self.out.push(Output::Upstream {
                to,
                port: p.port,
                payload,
            });
        }
    }

    /// Encode `m` for a client that takes `limit` bytes; too big goes out truncated (TC set,
    /// question only), as a client then retries over TCP.
    fn send_reply(&mut self, to: Dest, m: Message, limit: usize) {
        let payload = match m.to_vec() {
            Ok(p) if p.len() <= limit => p,
            Ok(_) => {
                self.counters.truncated += 1;
                let mut t = m.truncate();
                t.edns = m.edns.clone();
                match t.to_vec() {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
            Err(_) => {
                let mut e =
                    Message::error_msg(m.metadata.id, m.metadata.op_code, ResponseCode::ServFail);
                e.queries = m.queries.clone();
                self.counters.servfail += 1;
                match e.to_vec() {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        self.out.push(Output::Reply {
            net: to.net,
            server: to.server,
            client: to.client,
            transport: to.transport,
            payload,
        });
    }

    /// A datagram from `from` (an upstream's port 53) to our source port `port` (`None`: a
    /// host socket that does not tell).
    pub fn handle_upstream(
        &mut self,
        now: Instant,
        from: SocketAddrV4,
        port: Option<u16>,
        payload: &[u8],
    ) {
        let Ok(m) = Message::from_vec(payload) else {
            self.counters.upstream_unmatched += 1;
            return;
        };
        let uid = m.metadata.id;
        let matched = self.pending.get(&uid).is_some_and(|p| {
            !p.tcp
                && self.cfg.upstreams.get(p.upstream) == Some(&from)
                && port.is_none_or(|x| x == p.port)
                && answers(&m, &p.query)
        });
        if !matched {
            self.counters.upstream_unmatched += 1;
            return;
        }
        if m.metadata.truncation {
            // The whole answer is only to be had over TCP (RFC 7766 5): ask again there.
            if let Some(p) = self.pending.get_mut(&uid) {
                p.tcp = true;
                p.deadline = now + self.cfg.tcp_timeout;
                let (to, port) = (from, p.port);
                let payload = upstream_query(uid, &p.query);
                self.counters.upstream_tcp += 1;
                if let Some(payload) = payload {
                    self.out.push(Output::UpstreamTcp {
                        id: uid,
                        to,
                        port,
                        payload,
                    });
                }
            }
            return;
        }
        self.answer(now, uid, m);
    }

    /// The end of TCP exchange `id` ([`Output::UpstreamTcp`]): the answer, or `None` when it
    /// failed (refused, reset, closed early, timed out, no connection to be had).
    pub fn handle_upstream_tcp(&mut self, now: Instant, id: u16, answer: Option<&[u8]>) {
        let Some(p) = self.pending.get(&id).filter(|p| p.tcp) else {
            if answer.is_some() {
                self.counters.upstream_unmatched += 1;
            }
            return;
        };
        let m = answer
            .and_then(|a| Message::from_vec(a).ok())
            .filter(|m| m.metadata.id == id && !m.metadata.truncation && answers(m, &p.query));
        match m {
            Some(m) => self.answer(now, id, m),
            None => {
                self.counters.upstream_tcp_failed += 1;
                self.fail(id);
            }
        }
    }

    /// Pending query `uid`'s upstream answer `m` (checked): cached, and sent to the client
    /// under its id.
    fn answer(&mut self, now: Instant, uid: u16, m: Message) {
        let Some(p) = self.pending.remove(&uid) else {
            return;
        };
        self.by_client.remove(&p.key);
        self.counters.upstream_replies += 1;
        let rcode = m.metadata.response_code;
        if !m.metadata.truncation && matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain)
        {
            self.store(&p.query, &m, now);
        }
        let mut r = m;
        r.metadata.id = p.key.id;
        r.metadata.recursion_available = true;
        let to = p.dest();
        r.queries = vec![p.query];
        r.edns = p.edns.then(|| {
            let mut e = Edns::new();
            e.set_max_payload(EDNS_PAYLOAD);
            e
        });
        r.signature = None;
        if rcode == ResponseCode::NXDomain {
            self.counters.nxdomain += 1;
        }
        self.send_reply(to, r, p.max_udp);
    }

    /// Give up on pending query `uid`: SERVFAIL to its client.
    fn fail(&mut self, uid: u16) {
        let Some(p) = self.pending.remove(&uid) else {
            return;
        };
        self.by_client.remove(&p.key);
        let mut m = Message::error_msg(p.key.id, OpCode::Query, ResponseCode::ServFail);
        m.metadata.recursion_available = true;
        m.metadata.recursion_desired = true;
        let to = p.dest();
        m.add_query(p.query);
        self.counters.servfail += 1;
        self.send_reply(to, m, p.max_udp);
    }

    fn store(&mut self, q: &Query, m: &Message, now: Instant) {
        let negative = m.answers.is_empty();
        let ttl = if negative {
            m.authorities
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SOA(s) => Some(r.ttl.min(s.minimum)),
                    _ => None,
                })
                .min()
                .unwrap_or(0)
                .min(self.cfg.negative_ttl)
        } else {
            m.answers.iter().map(|r| r.ttl).min().unwrap_or(0)
        }
        .min(self.cfg.cache_max_ttl);
        if ttl == 0 || self.cfg.cache_max == 0 {
            return;
        }
        let Some(name) = normalize(&q.name().to_ascii()) else {
            return;
        };
        if self.cache.len() >= self.cfg.cache_max {
            self.cache.retain(|_, c| c.expires > now);
            while self.cache.len() >= self.cfg.cache_max {
                // Evict the entry that expires first.
                let Some(k) = self
                    .cache
                    .iter()
                    .min_by_key(|(_, c)| c.expires)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                self.cache.remove(&k);
                self.counters.cache_evicted += 1;
            }
        }
        let mut msg = m.clone();
        msg.edns = None;
        msg.signature = None;
        self.cache.insert(
            (name, u16::from(q.query_type()), u16::from(q.query_class())),
            Cached {
                msg,
                stored: now,
                expires: now + Duration::from_secs(u64::from(ttl)),
            },
        );
    }

    /// Retry or fail forwarded queries whose upstream did not answer in time; drop expired
    /// cache entries.
    pub fn expire(&mut self, now: Instant) {
        let due: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for uid in due {
            let Some(mut p) = self.pending.remove(&uid) else {
                continue;
            };
            self.counters.upstream_timeouts += 1;
            if p.tcp {
                self.counters.upstream_tcp_failed += 1;
                self.pending.insert(uid, p);
                self.fail(uid);
                continue;
            }
            if p.tries < self.cfg.attempts && !self.cfg.upstreams.is_empty() {
                p.tries += 1;
                p.upstream = (p.upstream + 1) % self.cfg.upstreams.len();
                p.deadline = now + self.cfg.timeout;
                self.counters.upstream_retries += 1;
                self.send_upstream(uid, &p);
                self.pending.insert(uid, p);
                continue;
            }
            self.pending.insert(uid, p);
            self.fail(uid);
        }
        if self.cache.len() * 2 >= self.cfg.cache_max {
            self.cache.retain(|_, c| c.expires > now);
        }
    }

    /// Queries of TCP connection `conn` (from `client` on `net`) waiting for an upstream.
    pub fn tcp_pending(&self, net: NetworkId, client: SocketAddrV4, conn: u64) -> usize {
        let k = |id| ClientKey {
            net,
            client,
            transport: Transport::Tcp(conn),
            id,
        };
        self.by_client.range(k(0)..=k(u16::MAX)).count()
    }

    /// Forget the queries pending for TCP connection `conn` (it closed: nobody to answer).
    pub fn forget_tcp(&mut self, conn: u64) {
        let gone = |k: &ClientKey| k.transport == Transport::Tcp(conn);
        self.pending.retain(|_, p| !gone(&p.key));
        self.by_client.retain(|k, _| !gone(k));
    }

    /// Forget what was pending for network `net` (it went away).
    pub fn forget_network(&mut self, net: NetworkId) {
        self.names.remove_network(net);
        self.pending.retain(|_, p| p.key.net != net);
        self.by_client.retain(|k, _| k.net != net);
    }

    /// Serve `net`.
    pub fn set_network(&mut self, net: NetworkId, info: NetInfo) {
        self.names.set_network(net, info);
    }
}

/// Our query to an upstream: id `uid`, recursion desired, EDNS with our payload size.
fn upstream_query(uid: u16, q: &Query) -> Option<Vec<u8>> {
    let mut m = Message::new(uid, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.checking_disabled = false;
    m.add_query(q.clone());
    let mut e = Edns::new();
    e.set_max_payload(EDNS_PAYLOAD);
    m.set_edns(e);
    m.to_vec().ok()
}

/// Is `m` a response to question `q` (type, class, name in any case)?
fn answers(m: &Message, q: &Query) -> bool {
    m.metadata.message_type == MessageType::Response
        && m.queries.len() == 1
        && m.queries[0].query_type() == q.query_type()
        && m.queries[0].query_class() == q.query_class()
        && m.queries[0]
            .name()
            .to_ascii()
            .eq_ignore_ascii_case(&q.name().to_ascii())
}

/// The IPv4 address of `d.c.b.a.in-addr.arpa` (normalised, no trailing dot).
pub fn arpa_v4(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let mut o = [0u8; 4];
    let mut n = 0;
    for (i, l) in rest.split('.').enumerate() {
        if i >= 4 || l.is_empty() || l.len() > 3 || (l.len() > 1 && l.starts_with('0')) {
            return None;
        }
        o[3 - i] = l.parse().ok()?;
        n += 1;
    }
    (n == 4).then(|| Ipv4Addr::from(o))
}
