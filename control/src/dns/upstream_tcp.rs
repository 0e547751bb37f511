//! DNS over TCP toward the upstream resolvers, for the queries whose UDP answer came back
//! truncated ([`super::Output::UpstreamTcp`]): one connection per exchange, one
//! length-prefixed query out, one answer back, then close (RFC 7766 5).
//!
//! - [`Exchange`]: the framing of that one exchange, shared by both transports.
//! - [`UpstreamTcp`]: the raw uplink's transport. The daemon owns the uplink address in
//!   userspace, so no host socket can use it; a smoltcp TCP client socket per exchange, on the
//!   uplink address and the pending query's source port (outside the masquerade range, like
//!   the UDP queries), polled through one `Medium::Ip` interface ([`QueueDev`]). Its segments
//!   leave through the router like the UDP queries; the pipeline hands it the segments that
//!   come back. Pure: time is an argument, the interface is seeded.
//! - With the socket uplink the dataplane uses a non-blocking host `TcpStream` per exchange
//!   (`dataplane/dns_io.rs`), with the same [`Exchange`].
//!
//! Both are bounded (connections at once; beyond, the exchange fails at once) and time out;
//! a refused, reset or hung exchange ends as a failure, and the core answers SERVFAIL.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};

use serde::Serialize;
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{IpAddress, IpEndpoint, IpListenEndpoint};
use switchyard_switch::{Duration, Instant};

use super::server::MAX_TCP_MESSAGE;
use crate::queue_dev::{ip_interface, QueueDev as Dev};

/// Exchanges at once (each holds a connection and up to a 64 KiB answer).
pub const MAX_EXCHANGES: usize = 32;
/// The uplink's IP MTU as the client's segments assume it (the MSS it announces).
const MTU: usize = 1500;

/// One query out and one answer in over a byte stream.
#[derive(Debug)]
pub struct Exchange {
    /// The query with its 2-byte length prefix, and how much of it is written.
    out: Vec<u8>,
    written: usize,
    /// The answer read so far (prefix included).
    got: Vec<u8>,
}

impl Exchange {
    /// `None` for a message too long for a length prefix.
    pub fn new(query: &[u8]) -> Option<Exchange> {
        let len = u16::try_from(query.len()).ok()?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(query);
        Some(Exchange {
            out,
            written: 0,
            got: Vec::new(),
        })
    }

    /// What is left to write.
    pub fn unsent(&self) -> &[u8] {
        &self.out[self.written..]
    }

    pub fn wrote(&mut self, n: usize) {
        self.written = (self.written + n).min(self.out.len());
    }

    /// How many more bytes the answer needs (its prefix first): read no more than this, so
    /// nothing past the answer is taken.
    pub fn wanted(&self) -> usize {
        if self.got.len() < 2 {
            return 2 - self.got.len();
        }
        2 + usize::from(u16::from_be_bytes([self.got[0], self.got[1]])) - self.got.len()
    }

    /// Bytes read (at most [`Self::wanted`]); the whole answer once it is complete.
    pub fn read(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let n = self.wanted().min(bytes.len());
        self.got.extend_from_slice(&bytes[..n]);
        (self.got.len() >= 2 && self.wanted() == 0).then(|| self.got[2..].to_vec())
    }
}

/// Counters (part of the DNS stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UpstreamTcpCounters {
    pub connections: u64,
    /// Exchanges that got their answer.
    pub answered: u64,
    /// Refused or reset, closed before the answer, timed out, or no room (over the limit).
    pub failed: u64,
    pub timed_out: u64,
    pub over_limit: u64,
}

struct Conn {
    handle: SocketHandle,
    local: SocketAddrV4,
    remote: SocketAddrV4,
    x: Exchange,
    deadline: Instant,
    /// The answer is in: closing politely until the deadline.
    done: bool,
}

/// The raw uplink's TCP client for upstream exchanges. See the module doc.
pub struct UpstreamTcp {
    timeout: Duration,
    seed: u64,
    /// The interface, for the uplink address it was made with.
    iface: Option<(Ipv4Addr, Interface)>,
    set: SocketSet<'static>,
    conns: BTreeMap<u16, Conn>,
    rxq: VecDeque<Vec<u8>>,
    /// smoltcp's next timer.
    next: Option<Instant>,
    out: Vec<Vec<u8>>,
    results: Vec<(u16, Option<Vec<u8>>)>,
    counters: UpstreamTcpCounters,
}

impl std::fmt::Debug for UpstreamTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTcp")
            .field("conns", &self.conns.len())
            .field("counters", &self.counters)
            .finish()
    }
}

impl UpstreamTcp {
    /// Exchanges time out after `timeout` (the core's `tcp_timeout`).
    pub fn new(timeout: Duration, seed: u64) -> Self {
        UpstreamTcp {
            timeout,
            seed,
            iface: None,
            set: SocketSet::new(vec![]),
            conns: BTreeMap::new(),
            rxq: VecDeque::new(),
            next: None,
            out: Vec::new(),
            results: Vec::new(),
            counters: UpstreamTcpCounters::default(),
        }
    }

    pub fn counters(&self) -> UpstreamTcpCounters {
        self.counters
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Start exchange `id`: `query` to `to` from `local` (the uplink address, the query's
    /// source port). A failure (over the limit, a port in use) is reported at once.
    pub fn open(
        &mut self,
        now: Instant,
        id: u16,
        local: SocketAddrV4,
        to: SocketAddrV4,
        query: &[u8],
    ) {
        if self.conns.len() >= MAX_EXCHANGES {
            self.counters.over_limit += 1;
            return self.refuse(id);
        }
        let taken = self.conns.contains_key(&id) || self.conns.values().any(|c| c.local == local);
        let Some(x) = Exchange::new(query).filter(|_| !taken) else {
            return self.refuse(id);
        };
        if self.iface.as_ref().is_none_or(|(a, _)| *a != *local.ip()) {
            // A new uplink address: the old connections cannot go on.
            self.reset_all();
            self.iface = Some((*local.ip(), make_iface(self.seed, *local.ip(), now)));
        }
        let Some((_, iface)) = self.iface.as_mut() else {
            return self.refuse(id);
        };
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; MAX_TCP_MESSAGE + 2]),
            tcp::SocketBuffer::new(vec![0u8; x.unsent().len()]),
        );
        s.set_nagle_enabled(false);
        s.set_timeout(Some(self.timeout));
        let remote = IpEndpoint::new(IpAddress::Ipv4(*to.ip()), to.port());
        let lep = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*local.ip())),
            port: local.port(),
        };
        if s.connect(iface.context(), remote, lep).is_err() {
            return self.refuse(id);
        }
        let handle = self.set.add(s);
        self.conns.insert(
            id,
            Conn {
                handle,
                local,
                remote: to,
                x,
                deadline: now + self.timeout,
                done: false,
            },
        );
        self.counters.connections += 1;
        self.poll(now);
    }

    /// Exchange `id` cannot start: it fails at once.
    fn refuse(&mut self, id: u16) {
        self.counters.failed += 1;
        self.results.push((id, None));
    }

    fn reset_all(&mut self) {
        for (id, c) in std::mem::take(&mut self.conns) {
            self.set.remove(c.handle);
            if !c.done {
                self.counters.failed += 1;
                self.results.push((id, None));
            }
        }
    }

    /// Is a TCP segment from `from` to local port `port` on the uplink address one of ours?
    pub fn takes(&self, from: SocketAddrV4, port: u16) -> bool {
        self.conns
            .values()
            .any(|c| c.remote == from && c.local.port() == port)
    }

    /// A segment (the bare IPv4 packet, checked by the caller) for one of our connections.
    pub fn segment(&mut self, now: Instant, packet: &[u8]) {
        self.rxq.push_back(packet.to_vec());
        self.poll(now);
    }

    /// When [`Self::expire`] has something to do next.
    pub fn poll_at(&self) -> Option<Instant> {
        let deadline = self.conns.values().map(|c| c.deadline).min();
        match (deadline, self.next.filter(|_| !self.conns.is_empty())) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Timers: smoltcp's (retransmissions), and exchanges past their deadline.
    pub fn expire(&mut self, now: Instant) {
        self.poll(now);
        let due: Vec<u16> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(c) = self.conns.get(&id) else {
                continue;
            };
            let s: &mut tcp::Socket = self.set.get_mut(c.handle);
            s.abort();
            if !c.done {
                self.counters.timed_out += 1;
                self.counters.failed += 1;
                self.results.push((id, None));
            }
            if let Some(c) = self.conns.get_mut(&id) {
                c.done = true;
            }
        }
        // The resets go out, then the aborted sockets are gone.
        self.poll(now);
    }

    /// Bare IPv4 packets for the uplink since the last call.
    pub fn take_packets(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.out)
    }

    /// Exchanges that ended since the last call: (id, the answer or `None`).
    pub fn take_results(&mut self) -> Vec<(u16, Option<Vec<u8>>)> {
        std::mem::take(&mut self.results)
    }

    fn poll(&mut self, now: Instant) {
        let Some((_, iface)) = self.iface.as_mut() else {
            self.rxq.clear();
            return;
        };
        for round in 0..2 {
            let mut dev = Dev {
                rx: &mut self.rxq,
                tx: &mut self.out,
                mtu: MTU,
            };
            iface.poll(now, &mut dev, &mut self.set);
            if round == 1 {
                break;
            }
            let mut gone = Vec::new();
            for (id, c) in self.conns.iter_mut() {
                let s: &mut tcp::Socket = self.set.get_mut(c.handle);
                if !c.done {
                    if s.can_send() && !c.x.unsent().is_empty() {
                        if let Ok(n) = s.send_slice(c.x.unsent()) {
                            c.x.wrote(n);
                        }
                    }
                    let mut answer = None;
                    while answer.is_none() && s.can_recv() {
                        let want = c.x.wanted();
                        let x = &mut c.x;
                        match s.recv(|b| {
                            let n = want.min(b.len());
                            (n, x.read(&b[..n]))
                        }) {
                            Ok(a) => answer = a,
                            Err(_) => break,
                        }
                    }
                    if let Some(a) = answer {
                        c.done = true;
                        self.counters.answered += 1;
                        self.results.push((*id, Some(a)));
                        s.close();
                    } else if !s.is_open() || (!s.may_recv() && s.state() != State::SynSent) {
                        // Refused, reset, or closed by the upstream before the whole answer.
                        c.done = true;
                        self.counters.failed += 1;
                        self.results.push((*id, None));
                        s.abort();
                    }
                }
                if c.done && matches!(s.state(), State::Closed | State::TimeWait) {
                    gone.push(*id);
                }
            }
            for id in gone {
                if let Some(c) = self.conns.remove(&id) {
                    self.set.remove(c.handle);
                }
            }
        }
        self.next = iface.poll_at(now, &self.set);
    }
}

fn make_iface(seed: u64, addr: Ipv4Addr, now: Instant) -> Interface {
    let mut i = ip_interface(seed, MTU, addr, false, now);
    // Every upstream is reached out of the device (the router picks the next hop).
    let _ = i.routes_mut().add_default_ipv4_route(addr);
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 61_234);
    const UP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 53);
    const TIMEOUT: Duration = Duration::from_secs(3);

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms as i64)
    }

    /// The upstream: a smoltcp interface on `UP`'s address, listening on port 53 when
    /// `listen`; it answers one framed query with `answer` (framed) when `answer` is set.
    struct Server {
        iface: Interface,
        set: SocketSet<'static>,
        handle: SocketHandle,
        rx: VecDeque<Vec<u8>>,
        answer: Option<Vec<u8>>,
        asked: Vec<u8>,
    }

    impl Server {
        fn new(listen: bool, answer: Option<Vec<u8>>) -> Server {
            let iface = make_iface(7, *UP.ip(), t(0));
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; 4096]),
                tcp::SocketBuffer::new(vec![0u8; 70_000]),
            );
            if listen {
                s.listen(53).unwrap();
            }
            let mut set = SocketSet::new(vec![]);
            let handle = set.add(s);
            Server {
                iface,
                set,
                handle,
                rx: VecDeque::new(),
                answer,
                asked: Vec::new(),
            }
        }

        /// Packets from the client in; the server's packets out.
        fn step(&mut self, now: Instant, from_client: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
            self.rx.extend(from_client);
            let mut out = Vec::new();
            for _ in 0..2 {
                let mut dev = Dev {
                    rx: &mut self.rx,
                    tx: &mut out,
                    mtu: MTU,
                };
                self.iface.poll(now, &mut dev, &mut self.set);
                let s: &mut tcp::Socket = self.set.get_mut(self.handle);
                while s.can_recv() {
                    let _ = s.recv(|b| {
                        self.asked.extend_from_slice(b);
                        (b.len(), ())
                    });
                }
                if self.asked.len() >= 2 && s.can_send() {
                    if let Some(a) = self.answer.take() {
                        let mut framed = (a.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&a);
                        s.send_slice(&framed).unwrap();
                        s.close();
                    }
                }
            }
            out
        }
    }

    /// Shuttle packets between client and server until neither has any, at `now`.
    fn run(c: &mut UpstreamTcp, srv: &mut Server, now: Instant) {
        for _ in 0..100 {
            let to_srv = c.take_packets();
            let back = srv.step(now, to_srv);
            if back.is_empty() && c.out.is_empty() {
                return;
            }
            for p in back {
                c.segment(now, &p);
            }
        }
    }

    /// Exchange `id` (query `q`) begun against a server, and everything said until quiet.
    fn begun(listen: bool, answer: Option<Vec<u8>>, id: u16, q: &[u8]) -> (UpstreamTcp, Server) {
        let mut srv = Server::new(listen, answer);
        let mut c = UpstreamTcp::new(TIMEOUT, 1);
        c.open(t(0), id, LOCAL, UP, q);
        run(&mut c, &mut srv, t(1));
        (c, srv)
    }

    #[test]
    fn framing_takes_exactly_one_message() {
        let mut x = Exchange::new(b"hello").unwrap();
        assert_eq!(x.unsent(), b"\x00\x05hello");
        x.wrote(3);
        assert_eq!(x.unsent(), b"ello");
        assert_eq!(x.wanted(), 2);
        assert_eq!(x.read(b"\x00"), None);
        // The prefix is complete with one more byte: the rest is left for the next call.
        assert_eq!(x.read(b"\x03ab"), None);
        assert_eq!(x.wanted(), 3);
        assert_eq!(x.read(b"ab"), None);
        assert_eq!(x.wanted(), 1);
        // Bytes past the answer are not taken.
        assert_eq!(x.read(b"cdef"), Some(b"abc".to_vec()));
        assert!(Exchange::new(&vec![0u8; 70_000]).is_none());
    }

    #[test]
    fn a_whole_answer_over_several_segments() {
        let answer: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let (mut c, mut srv) = begun(true, Some(answer.clone()), 77, b"the query");
        assert_eq!(&srv.asked[..], b"\x00\x09the query");
        assert_eq!(c.take_results(), vec![(77, Some(answer))]);
        assert!(c.takes(UP, LOCAL.port()) || c.is_empty());
        // Closed on both sides: nothing left open.
        run(&mut c, &mut srv, t(2));
        assert!(c.is_empty(), "{c:?}");
        assert_eq!(c.counters().answered, 1);
        assert_eq!(c.counters().failed, 0);
    }

    #[test]
    fn refused_is_a_failure_at_once() {
        let (mut c, _) = begun(false, None, 5, b"q");
        assert_eq!(c.take_results(), vec![(5, None)]);
        assert!(c.is_empty());
        assert_eq!(c.counters().failed, 1);
    }

    #[test]
    fn a_hung_upstream_times_out_and_is_reset() {
        let (mut c, _) = begun(true, None, 6, b"q");
        assert!(c.take_results().is_empty());
        assert_eq!(c.poll_at().map(|p| p <= t(0) + TIMEOUT), Some(true));
        c.expire(t(0) + TIMEOUT);
        assert_eq!(c.take_results(), vec![(6, None)]);
        assert_eq!(c.counters().timed_out, 1);
        // The reset went out and the connection is gone.
        assert!(!c.take_packets().is_empty());
        assert!(c.is_empty());
    }

    #[test]
    fn exchanges_are_bounded() {
        let mut c = UpstreamTcp::new(TIMEOUT, 1);
        for i in 0..MAX_EXCHANGES as u16 {
            let local = SocketAddrV4::new(*LOCAL.ip(), 61_000 + i);
            c.open(t(0), i, local, UP, b"q");
        }
        assert!(c.take_results().is_empty());
        c.open(t(0), 999, SocketAddrV4::new(*LOCAL.ip(), 62_000), UP, b"q");
        assert_eq!(c.take_results(), vec![(999, None)]);
        assert_eq!(c.counters().over_limit, 1);
        assert_eq!(c.len(), MAX_EXCHANGES);
        // A segment for none of them is not taken.
        assert!(!c.takes(UP, 62_000));
    }
}
