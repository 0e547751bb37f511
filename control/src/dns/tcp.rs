//! DNS over TCP at the gateway (RFC 7766): what a client does after a truncated (TC) UDP
//! answer, or always with `dig +tcp` / `options use-vc`.
//!
//! Each connection to `gateway:53` is terminated by its own smoltcp TCP socket (one listening
//! socket per SYN, in a [`SocketSet`] of its own so a segment only ever meets its socket),
//! polled through an any-IP [`Interface`] with `Medium::Ip` (one per MTU, for the MSS), as the
//! socket uplink terminates container flows. smoltcp rather than a purpose-built state
//! machine: a correct server needs retransmission of our answers, reassembly of out-of-order
//! segments, windows, MSS, FIN/RST handling and TIME-WAIT-free teardown, which smoltcp
//! already does (and the workspace already depends on and trusts it); what is left here is
//! the DNS framing, the limits and the timers. It stays pure: no socket, time is an argument,
//! the interfaces are seeded, maps are ordered.
//!
//! The stream carries 2-byte length-prefixed messages, several per connection, pipelined.
//! Complete queries go out through [`DnsTcp::take_queries`] to the DNS core, tagged with the
//! connection's id; the core's answers (at once, or later for a forwarded query) come back
//! through [`DnsTcp::reply`] with that id, so a late answer finds its connection or, when the
//! connection is gone, nothing. Bounds: connections per client address and in all, a
//! socket buffer each way, replies queued beyond the send buffer, queries outstanding per
//! connection (reading stops, the window closes), an idle timeout (then FIN, then RST).

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};

use serde::Serialize;
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{IpAddress, IpListenEndpoint};
use switchyard_switch::{Duration, Instant, NetworkId};

use super::server::MAX_QUERY;
use crate::queue_dev::{ip_interface, QueueDev as Dev};

/// Limits and timers.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Connections at once, in all and per client address.
    pub max_conns: usize,
    pub max_per_client: usize,
    /// smoltcp socket buffers (receive: at least one largest query and its prefix).
    pub rx_buffer: usize,
    pub tx_buffer: usize,
    /// Reply bytes waiting for room in the send buffer at most; beyond, the connection is
    /// reset (a client that asks and never reads).
    pub max_queued: usize,
    /// Queries a connection may have outstanding (forwarded, unanswered); beyond, its bytes
    /// wait in the receive buffer.
    pub max_inflight: usize,
    /// No query and no answer for this long: we close (RFC 7766 6.2.3).
    pub idle: Duration,
    /// After our FIN, this long for the client to finish before a reset.
    pub linger: Duration,
    pub seed: u64,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_conns: 256,
            max_per_client: 16,
            rx_buffer: 8 * 1024,
            tx_buffer: 16 * 1024,
            max_queued: 256 * 1024,
            max_inflight: 32,
            idle: Duration::from_secs(10),
            linger: Duration::from_secs(5),
            seed: 0x7c9_d115_5eed,
        }
    }
}

/// Counters (part of the DNS stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TcpCounters {
    pub accepted: u64,
    /// SYNs refused (reset) for a connection limit.
    pub refused: u64,
    /// Connections over: closed by either side, timed out or reset.
    pub closed: u64,
    pub idle_closed: u64,
    /// Reset for a length prefix above [`MAX_QUERY`].
    pub oversize: u64,
    /// Reset for replies piling up unread.
    pub backlog: u64,
    /// Segments for no connection (answered with a reset by smoltcp).
    pub stray: u64,
}

/// A complete query from a connection, for the DNS core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpQuery {
    pub net: NetworkId,
    pub server: Ipv4Addr,
    pub client: SocketAddrV4,
    pub conn: u64,
    pub payload: Vec<u8>,
}

type Key = (NetworkId, SocketAddrV4);

struct Conn {
    id: u64,
    server: Ipv4Addr,
    mtu: usize,
    set: SocketSet<'static>,
    handle: SocketHandle,
    rxq: VecDeque<Vec<u8>>,
    /// The start of a message read from the socket (prefix included).
    partial: Vec<u8>,
    /// Framed replies waiting for room in the send buffer.
    queued: Vec<u8>,
    /// Queries handed to the core and not answered yet.
    inflight: usize,
    /// Last query in or reply out.
    last: Instant,
    /// When we sent our FIN (idle).
    closing: Option<Instant>,
    /// smoltcp's next timer.
    poll_at: Option<Instant>,
}

/// The TCP side of the gateway's DNS server. See the module doc.
pub struct DnsTcp {
    cfg: TcpConfig,
    ifaces: BTreeMap<usize, Interface>,
    empty: SocketSet<'static>,
    conns: BTreeMap<Key, Conn>,
    ids: BTreeMap<u64, Key>,
    next_id: u64,
    queries: Vec<TcpQuery>,
    out: Vec<(NetworkId, Vec<u8>)>,
    closed: Vec<u64>,
    counters: TcpCounters,
}

impl std::fmt::Debug for DnsTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsTcp")
            .field("conns", &self.conns.len())
            .field("counters", &self.counters)
            .finish()
    }
}

fn iface(
    ifaces: &mut BTreeMap<usize, Interface>,
    seed: u64,
    mtu: usize,
    now: Instant,
) -> &mut Interface {
    // Any-IP: it answers for every gateway; each socket listens on its own.
    ifaces.entry(mtu).or_insert_with(|| {
        let addr = Ipv4Addr::new(169, 254, 255, 253);
        ip_interface(seed ^ mtu as u64, mtu, addr, true, now)
    })
}

impl DnsTcp {
    pub fn new(cfg: TcpConfig) -> Self {
        DnsTcp {
            cfg,
            ifaces: BTreeMap::new(),
            empty: SocketSet::new(vec![]),
            conns: BTreeMap::new(),
            ids: BTreeMap::new(),
            next_id: 1,
            queries: Vec::new(),
            out: Vec::new(),
            closed: Vec::new(),
            counters: TcpCounters::default(),
        }
    }

    pub fn config(&self) -> &TcpConfig {
        &self.cfg
    }

    pub fn counters(&self) -> TcpCounters {
        self.counters
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Complete queries read since the last call.
    pub fn take_queries(&mut self) -> Vec<TcpQuery> {
        std::mem::take(&mut self.queries)
    }

    /// IPv4 packets for clients since the last call, with their network.
    pub fn take_packets(&mut self) -> Vec<(NetworkId, Vec<u8>)> {
        std::mem::take(&mut self.out)
    }

    /// Connections that ended since the last call (the core forgets their pending queries).
    pub fn take_closed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.closed)
    }

    /// When [`Self::expire`] has something to do next.
    pub fn poll_at(&self) -> Option<Instant> {
        self.conns
            .values()
            .flat_map(|c| {
                let idle = match c.closing {
                    Some(t) => t + self.cfg.linger,
                    None if c.inflight == 0 => c.last + self.cfg.idle,
                    None => c.last + self.cfg.idle + self.cfg.idle,
                };
                [Some(idle), c.poll_at]
            })
            .flatten()
            .min()
    }

    /// A TCP segment (`packet`: the bare IPv4 packet) from `client` on `net` for `server`:53,
    /// checked by the caller (addresses, checksums, sender). `syn`: SYN without ACK or RST.
    #[allow(clippy::too_many_arguments)]
    pub fn segment(
        &mut self,
        now: Instant,
        net: NetworkId,
        server: Ipv4Addr,
        client: SocketAddrV4,
        mtu: usize,
        syn: bool,
        packet: &[u8],
    ) {
        let key = (net, client);
        if !self.conns.contains_key(&key) {
            if !syn {
                self.counters.stray += 1;
                return self.stray(net, mtu, packet, now);
            }
            let per_client = self
                .conns
                .range(
                    (net, SocketAddrV4::new(*client.ip(), 0))
                        ..=(net, SocketAddrV4::new(*client.ip(), u16::MAX)),
                )
                .count();
            if self.conns.len() >= self.cfg.max_conns || per_client >= self.cfg.max_per_client {
                self.counters.refused += 1;
                return self.stray(net, mtu, packet, now);
            }
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; self.cfg.rx_buffer.max(MAX_QUERY + 2)]),
                tcp::SocketBuffer::new(vec![0u8; self.cfg.tx_buffer.max(512)]),
            );
            s.set_nagle_enabled(false);
            s.set_ack_delay(None);
            // No progress (unacknowledged data, a handshake never finished) for this long:
            // smoltcp resets.
            s.set_timeout(Some(self.cfg.idle + self.cfg.linger));
            if s.listen(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(server)),
                port: super::packet::DNS_PORT,
            })
            .is_err()
            {
                return;
            }
            let mut set = SocketSet::new(vec![]);
            let handle = set.add(s);
            let id = self.next_id;
            self.next_id += 1;
            self.conns.insert(
                key,
                Conn {
                    id,
                    server,
                    mtu,
                    set,
                    handle,
                    rxq: VecDeque::new(),
                    partial: Vec::new(),
                    queued: Vec::new(),
                    inflight: 0,
                    last: now,
                    closing: None,
                    poll_at: None,
                },
            );
            self.ids.insert(id, key);
            self.counters.accepted += 1;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.rxq.push_back(packet.to_vec());
        }
        self.step(key, now);
    }

    /// Let smoltcp answer a segment no connection takes: a reset (never for a reset).
    fn stray(&mut self, net: NetworkId, mtu: usize, packet: &[u8], now: Instant) {
        let mut q = VecDeque::from([packet.to_vec()]);
        let mut tx = Vec::new();
        let i = iface(&mut self.ifaces, self.cfg.seed, mtu, now);
        let mut dev = Dev {
            rx: &mut q,
            tx: &mut tx,
            mtu,
        };
        i.poll(now, &mut dev, &mut self.empty);
        self.out.extend(tx.into_iter().map(|p| (net, p)));
    }

    /// The core's answer to a query of connection `conn`: framed and sent (or queued).
    pub fn reply(&mut self, now: Instant, conn: u64, payload: &[u8]) {
        let Some(key) = self.ids.get(&conn).copied() else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.inflight = c.inflight.saturating_sub(1);
        c.last = now;
        let Ok(len) = u16::try_from(payload.len()) else {
            return;
        };
        if c.queued.len() + payload.len() + 2 > self.cfg.max_queued {
            self.counters.backlog += 1;
            let s: &mut tcp::Socket = c.set.get_mut(c.handle);
            s.abort();
        } else {
            c.queued.extend_from_slice(&len.to_be_bytes());
            c.queued.extend_from_slice(payload);
        }
        self.step(key, now);
    }

    /// The core dropped or answered some of `conn`'s queries without telling [`Self::reply`]
    /// (rate limited, malformed): `waiting` are still pending there.
    pub fn settle(&mut self, now: Instant, conn: u64, waiting: usize) {
        let Some(key) = self.ids.get(&conn).copied() else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.inflight != waiting {
            c.inflight = waiting;
            self.step(key, now);
        }
    }

    /// Timers: smoltcp's (retransmissions), idle connections closed, lingering ones reset.
    pub fn expire(&mut self, now: Instant) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let s: &mut tcp::Socket = c.set.get_mut(c.handle);
            match c.closing {
                Some(t) if now >= t + self.cfg.linger => s.abort(),
                Some(_) => {}
                None => {
                    // A forwarded query keeps it open; the core answers or fails it in time.
                    let idle = if c.inflight == 0 {
                        self.cfg.idle
                    } else {
                        self.cfg.idle + self.cfg.idle
                    };
                    if now >= c.last + idle {
                        self.counters.idle_closed += 1;
                        c.closing = Some(now);
                        s.close();
                    }
                }
            }
            if c.closing.is_some() || c.poll_at.is_some_and(|t| t <= now) {
                self.step(key, now);
            }
        }
    }

    /// Forget `net`'s connections (it no longer has DNS), without a word to the clients.
    pub fn forget_network(&mut self, net: NetworkId) {
        let gone: Vec<Key> = self.conns.keys().filter(|k| k.0 == net).copied().collect();
        for k in gone {
            self.remove(k);
        }
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.ids.remove(&c.id);
            self.closed.push(c.id);
            self.counters.closed += 1;
        }
    }

    /// Feed the connection's queued segments, move replies in and queries out, send what
    /// smoltcp has; remove it when it is over.
    fn step(&mut self, key: Key, now: Instant) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let i = iface(&mut self.ifaces, self.cfg.seed, c.mtu, now);
        let mut tx = Vec::new();
        let mut reset = false;
        for round in 0..2 {
            let mut dev = Dev {
                rx: &mut c.rxq,
                tx: &mut tx,
                mtu: c.mtu,
            };
            i.poll(now, &mut dev, &mut c.set);
            if round == 1 {
                break;
            }
            let s: &mut tcp::Socket = c.set.get_mut(c.handle);
            // Replies into the send buffer.
            if !c.queued.is_empty() && s.can_send() {
                if let Ok(n) = s.send_slice(&c.queued) {
                    c.queued.drain(..n);
                }
            }
            // Whole messages out of the receive buffer, while the core may take more.
            while c.inflight < self.cfg.max_inflight && s.can_recv() {
                let need = if c.partial.len() < 2 {
                    2 - c.partial.len()
                } else {
                    2 + usize::from(u16::from_be_bytes([c.partial[0], c.partial[1]]))
                        - c.partial.len()
                };
                let partial = &mut c.partial;
                let got = s.recv(|b| {
                    let n = need.min(b.len());
                    partial.extend_from_slice(&b[..n]);
                    (n, n)
                });
                if !matches!(got, Ok(n) if n > 0) {
                    break;
                }
                if c.partial.len() < 2 {
                    continue;
                }
                let len = usize::from(u16::from_be_bytes([c.partial[0], c.partial[1]]));
                if len > MAX_QUERY {
                    self.counters.oversize += 1;
                    s.abort();
                    reset = true;
                    break;
                }
                if c.partial.len() == 2 + len {
                    let payload = c.partial.split_off(2);
                    c.partial.clear();
                    c.inflight += 1;
                    c.last = now;
                    self.queries.push(TcpQuery {
                        net: key.0,
                        server: c.server,
                        client: key.1,
                        conn: c.id,
                        payload,
                    });
                }
            }
            // The client is done asking and has all its answers: our FIN.
            if s.state() == State::CloseWait
                && !s.can_recv()
                && c.inflight == 0
                && c.queued.is_empty()
            {
                s.close();
            }
        }
        self.out.extend(tx.into_iter().map(|p| (key.0, p)));
        let s: &mut tcp::Socket = c.set.get_mut(c.handle);
        let over = reset || matches!(s.state(), State::Closed | State::TimeWait | State::Listen);
        c.poll_at = i.poll_at(now, &c.set);
        if over {
            self.remove(key);
        }
    }
}
