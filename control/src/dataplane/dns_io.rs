//! The dataplane's I/O for the embedded DNS server ([`crate::dns`]): with no raw uplink,
//! upstream queries go out of one host UDP socket (opened on first use, in the daemon's own
//! network namespace) and its answers come back through the mio loop; the server's timers run
//! on the loop's clock. An upstream's truncated answer is asked again over a host TCP
//! connection per exchange (non-blocking, bounded, with a deadline; see
//! [`crate::dns::upstream_tcp`]). With a raw uplink the pipeline sends upstream queries as
//! packets from the uplink address and nothing here is used but the timers.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant as WallInstant};

use mio::{Interest, Token};

use super::{DpState, Out, Wire};
use crate::dns::upstream_tcp::MAX_EXCHANGES;
use crate::dns::{Exchange, UpstreamTcpCounters};
use crate::uplink::TOKEN_BASE;

/// The DNS socket's mio token (port tokens are far below, socket-uplink tokens above).
pub(super) const DNS_TOKEN: Token = Token(TOKEN_BASE - 1);
/// Tokens of upstream TCP exchanges: this plus the exchange id (a u16), below [`DNS_TOKEN`].
const TCP_TOKEN_BASE: usize = TOKEN_BASE - 2 - (1 << 16);

/// Is `t` an upstream TCP exchange's token?
pub(super) fn is_tcp_token(t: Token) -> bool {
    (TCP_TOKEN_BASE..TCP_TOKEN_BASE + (1 << 16)).contains(&t.0)
}

/// One upstream TCP exchange on a host socket.
struct HostExchange {
    stream: mio::net::TcpStream,
    x: Exchange,
    deadline: WallInstant,
}

/// The DNS server's host-side state in the dataplane.
#[derive(Default)]
pub(super) struct DnsIo {
    sock: Option<mio::net::UdpSocket>,
    /// Upstream TCP exchanges by id.
    tcp: BTreeMap<u16, HostExchange>,
    pub tcp_counters: UpstreamTcpCounters,
    /// Host socket errors (open, send): logged once, counted.
    pub errors: u64,
}

impl DpState {
    /// The upstream TCP exchanges' counters (raw uplink and host sockets together) and how
    /// many are open.
    pub fn dns_upstream_tcp(&self) -> (UpstreamTcpCounters, usize) {
        let (a, b) = (
            self.pipeline.dns_up_tcp.counters(),
            self.dns_io.tcp_counters,
        );
        let c = UpstreamTcpCounters {
            connections: a.connections + b.connections,
            answered: a.answered + b.answered,
            failed: a.failed + b.failed,
            timed_out: a.timed_out + b.timed_out,
            over_limit: a.over_limit + b.over_limit,
        };
        (c, self.pipeline.dns_up_tcp.len() + self.dns_io.tcp.len())
    }
}

impl DpState {
    /// When the loop should wake for the DNS server's timers (an upstream timeout, a TCP
    /// retransmission or idle timeout).
    pub(super) fn dns_due(&self) -> Option<WallInstant> {
        let tcp = self.dns_io.tcp.values().map(|e| e.deadline).min();
        let Some(at) = self.pipeline.dns_poll_at() else {
            return tcp;
        };
        let now = self.now();
        let left = if at > now {
            (at - now).total_micros()
        } else {
            0
        };
        let core = WallInstant::now() + Duration::from_micros(left);
        Some(tcp.map_or(core, |t| t.min(core)))
    }

    /// One round: read answers (when `readable`), move upstream TCP exchanges on (when
    /// `tcp_ready`, or at a deadline), send queued upstream queries, run timers.
    pub(super) fn dns_round(&mut self, readable: bool, tcp_ready: bool) {
        let now = self.now();
        let DpState {
            pipeline,
            ports,
            uplink,
            captures,
            dns_io,
            registry,
            tx_scratch,
            shared,
            ..
        } = self;
        let capturing = !captures.list.is_empty();
        let mut wire = Wire {
            ports,
            uplink: uplink.as_deref(),
            captures: capturing.then_some(&*captures),
            scratch: tx_scratch,
            counters: &shared.uplink,
        };
        let mut tx = |o: Out, frame: &[u8]| -> bool { wire.send(o, frame, None) };
        if readable {
            if let Some(s) = &dns_io.sock {
                let mut buf = [0u8; 4096];
                // Edge-triggered: drain to WouldBlock, or the rest waits for the next datagram.
                loop {
                    match s.recv_from(&mut buf) {
                        Ok((n, SocketAddr::V4(from))) => {
                            pipeline.dns_from_host(from, &buf[..n], now, &mut tx)
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
        }
        if tcp_ready || !dns_io.tcp.is_empty() {
            for (id, answer) in dns_io.tcp_step(tcp_ready, registry) {
                pipeline.dns_from_host_tcp(id, answer.as_deref(), now, &mut tx);
            }
        }
        if pipeline.dns_poll_at().is_some_and(|t| t <= now) {
            pipeline.dns_expire(now, &mut tx);
        }
        // Exchanges that cannot start (the limit, a socket error) end at once.
        loop {
            let opened = pipeline.dns_take_upstream_tcp();
            if opened.is_empty() {
                break;
            }
            let timeout = pipeline.dns.config().tcp_timeout;
            for (id, to, payload) in opened {
                if !dns_io.tcp_open(id, to, &payload, timeout, registry) {
                    pipeline.dns_from_host_tcp(id, None, now, &mut tx);
                }
            }
        }
        let ups = pipeline.dns_take_upstream();
        if ups.is_empty() {
            return;
        }
        if dns_io.sock.is_none() {
            match open_socket(registry) {
                Ok(s) => dns_io.sock = Some(s),
                Err(e) => {
                    if dns_io.errors == 0 {
                        tracing::warn!("DNS: opening the upstream socket: {e}");
                    }
                    dns_io.errors += 1;
                    return;
                }
            }
        }
        let Some(s) = &dns_io.sock else { return };
        for (to, payload) in ups {
            if let Err(e) = s.send_to(&payload, SocketAddr::V4(to)) {
                if dns_io.errors == 0 {
                    tracing::warn!(upstream = %to, "DNS: sending upstream: {e}");
                }
                dns_io.errors += 1;
            }
        }
    }
}

impl DnsIo {
    /// Start exchange `id`: a non-blocking connect to `to`, the query written when it is up.
    fn tcp_open(
        &mut self,
        id: u16,
        to: SocketAddrV4,
        query: &[u8],
        timeout: switchyard_switch::Duration,
        registry: &mio::Registry,
    ) -> bool {
        if self.tcp.len() >= MAX_EXCHANGES {
            self.tcp_counters.over_limit += 1;
            self.tcp_counters.failed += 1;
            return false;
        }
        let (Some(x), false) = (Exchange::new(query), self.tcp.contains_key(&id)) else {
            self.tcp_counters.failed += 1;
            return false;
        };
        let opened = mio::net::TcpStream::connect(SocketAddr::V4(to)).and_then(|mut s| {
            let t = Token(TCP_TOKEN_BASE + usize::from(id));
            registry.register(&mut s, t, Interest::READABLE | Interest::WRITABLE)?;
            Ok(s)
        });
        match opened {
            Ok(stream) => {
                self.tcp_counters.connections += 1;
                let deadline = WallInstant::now() + Duration::from_micros(timeout.total_micros());
                self.tcp.insert(
                    id,
                    HostExchange {
                        stream,
                        x,
                        deadline,
                    },
                );
                true
            }
            Err(e) => {
                if self.errors == 0 {
                    tracing::warn!(upstream = %to, "DNS: TCP to the upstream: {e}");
                }
                self.errors += 1;
                self.tcp_counters.failed += 1;
                false
            }
        }
    }

    /// Write, read and time out the exchanges (edge-triggered: each to WouldBlock); the ones
    /// that ended: (id, the answer or `None`).
    fn tcp_step(&mut self, ready: bool, registry: &mio::Registry) -> Vec<(u16, Option<Vec<u8>>)> {
        let now = WallInstant::now();
        let mut ended = Vec::new();
        for (id, e) in self.tcp.iter_mut() {
            if now >= e.deadline {
                self.tcp_counters.timed_out += 1;
                ended.push((*id, None));
                continue;
            }
            if !ready {
                continue;
            }
            match pump(e) {
                Ok(None) => {}
                Ok(Some(answer)) => ended.push((*id, Some(answer))),
                Err(_) => ended.push((*id, None)),
            }
        }
        for (id, answer) in &ended {
            if let Some(mut e) = self.tcp.remove(id) {
                let _ = registry.deregister(&mut e.stream);
            }
            if answer.is_some() {
                self.tcp_counters.answered += 1;
            } else {
                self.tcp_counters.failed += 1;
            }
        }
        ended
    }
}

/// Move one exchange on: the query out, the answer in. `Ok(Some)`: the whole answer;
/// `Err`: refused, reset, or closed before the whole answer.
fn pump(e: &mut HostExchange) -> std::io::Result<Option<Vec<u8>>> {
    // A failed connect shows up as the socket's error.
    if let Some(err) = e.stream.take_error()? {
        return Err(err);
    }
    while !e.x.unsent().is_empty() {
        match e.stream.write(e.x.unsent()) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => e.x.wrote(n),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            // Not connected yet, or the send buffer is full: a later event.
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) => {
                return Ok(None)
            }
            Err(err) => return Err(err),
        }
    }
    let mut buf = [0u8; 4096];
    loop {
        let want = e.x.wanted().min(buf.len());
        match e.stream.read(&mut buf[..want]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                if let Some(a) = e.x.read(&buf[..n]) {
                    return Ok(Some(a));
                }
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(err) => return Err(err),
        }
    }
}

fn open_socket(registry: &mio::Registry) -> std::io::Result<mio::net::UdpSocket> {
    let mut s = mio::net::UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(
        std::net::Ipv4Addr::UNSPECIFIED,
        0,
    )))?;
    registry.register(&mut s, DNS_TOKEN, Interest::READABLE)?;
    Ok(s)
}
