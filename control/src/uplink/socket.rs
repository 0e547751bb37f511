//! The socket uplink: container flows to the outside are terminated in userspace and relayed
//! over ordinary host sockets, so the daemon needs no privilege and no interface of its own.
//!
//! - TCP: smoltcp terminates the container side ([`super::tcp`]); the host side is a
//!   non-blocking `TcpStream`, connected before the container's SYN is answered, so a refused
//!   connect is a RST inside and an unreachable host an ICMP unreachable.
//! - UDP: one connected host socket per flow (container address and port, remote address and
//!   port), dropped after `udp_timeout` idle.
//! - ICMP echo: one unprivileged ping socket (`SOCK_DGRAM`, `IPPROTO_ICMP`) per (container,
//!   id, remote); where `net.ipv4.ping_group_range` does not allow it, one log line and an
//!   ICMP "administratively prohibited" back to the container.
//! - Published ports: a host listener per port (TCP and UDP); a connection or datagram enters
//!   the container from the client's own address and port (a loopback client appears as the
//!   network's gateway).
//! - `host_loopback`: an address containers use to reach the host's 127.0.0.1.
//!
//! The dataplane owns one [`SocketUplink`]: it hands it the router's [`Egress::Host`] packets
//! ([`SocketUplink::from_container`]) and the mio events of its tokens ([`SocketUplink::event`],
//! tokens from [`TOKEN_BASE`] up), runs [`SocketUplink::flush`] once per loop round and injects
//! what [`SocketUplink::take_out`] returns into the networks.
//!
//! [`Egress::Host`]: switchyard_nat::Egress::Host

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use mio::{Interest, Registry, Token};
use serde::Serialize;
use smoltcp::time::Instant as SInstant;
use switchyard_nat::{PortForward, Proto, Router};

use super::tcp::{Connect, Key, Stack, TcpFlow};
use super::wire::{self, Parsed, L4};

/// mio tokens of the uplink's sockets start here (the dataplane's ports are far below).
pub const TOKEN_BASE: usize = 1 << 32;
const MAX_DATAGRAM: usize = 65_536;
/// Packet buffers kept for reuse (up to 64 KiB each at the largest MTU).
const SPARE_BUFFERS: usize = 64;

#[derive(Clone, Debug)]
pub struct SocketUplinkConfig {
    /// Containers reach the host's 127.0.0.1 through this address.
    pub host_loopback: Option<Ipv4Addr>,
    /// smoltcp buffer per TCP flow, each way.
    pub tcp_buffer: usize,
    pub udp_timeout: Duration,
    pub ping_timeout: Duration,
    /// Flows of each kind at most; more are refused (RST / dropped).
    pub max_flows: usize,
}

impl Default for SocketUplinkConfig {
    fn default() -> Self {
        SocketUplinkConfig {
            host_loopback: None,
            // 256 KiB held the published-port path to about two thirds of what 1 MiB gives
            // at a 65520 MTU (64 KiB segments: only four in flight).
            tcp_buffer: 1 << 20,
            udp_timeout: Duration::from_secs(60),
            ping_timeout: Duration::from_secs(30),
            max_flows: 65_536,
        }
    }
}

/// Counters for `switchyard stats`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SocketCounters {
    pub tcp_flows: usize,
    pub udp_flows: usize,
    pub ping_flows: usize,
    pub listeners: usize,
    pub tcp_opened: u64,
    pub tcp_accepted: u64,
    pub tcp_refused: u64,
    pub tcp_unreachable: u64,
    pub tcp_resets_sent: u64,
    pub udp_opened: u64,
    pub udp_expired: u64,
    pub udp_too_big: u64,
    pub ping_opened: u64,
    pub ping_refused: u64,
    pub flows_refused: u64,
    pub socket_errors: u64,
}

enum UdpPeer {
    /// Our own connected host socket.
    Outbound(mio::net::UdpSocket),
    /// A published port's listener (its slot) and the client's real address.
    Published { listener: usize, client: SocketAddr },
}

struct UdpFlow {
    key: Key,
    peer: UdpPeer,
    mtu: usize,
    last: Instant,
}

struct PingFlow {
    key: (Ipv4Addr, u16, Ipv4Addr),
    sock: mio::net::UdpSocket,
    mtu: usize,
    last: Instant,
}

enum Listener {
    Tcp(mio::net::TcpListener),
    Udp(mio::net::UdpSocket),
}

struct Published {
    fwd: PortForward,
    sock: Listener,
}

enum Slot {
    Tcp(Box<TcpFlow>),
    Udp(UdpFlow),
    Ping(PingFlow),
    Listen(Published),
}

type ListenKey = (Proto, Option<Ipv4Addr>, u16);

/// IPv4 packets for containers; `gso` names those (by index, ascending) that are TCP
/// super-packets, larger than their network's MTU, with the payload size to cut them at (see
/// `Pipeline::from_host`). Their TCP checksum field holds the pseudo-header sum.
#[derive(Default)]
pub struct ToContainers {
    pub packets: Vec<Vec<u8>>,
    pub gso: Vec<(usize, u16)>,
}

pub struct SocketUplink {
    cfg: SocketUplinkConfig,
    registry: Registry,
    start: Instant,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    tcp: HashMap<Key, usize>,
    udp: HashMap<Key, usize>,
    ping: HashMap<(Ipv4Addr, u16, Ipv4Addr), usize>,
    listeners: HashMap<ListenKey, usize>,
    stack: Stack,
    dirty: Vec<usize>,
    timers: BTreeSet<(SInstant, usize)>,
    out: Vec<Vec<u8>>,
    /// Which of `out` are TCP super-packets, and the payload size to cut them at.
    gso: Vec<(usize, u16)>,
    /// Buffers of packets already delivered, for smoltcp's next ones (see `queue_dev`).
    spare: Vec<Vec<u8>>,
    buf: Vec<u8>,
    ping_warned: bool,
    counters: SocketCounters,
}

fn sock_err_is(e: &io::Error, codes: &[i32]) -> bool {
    e.raw_os_error().is_some_and(|c| codes.contains(&c))
}

impl SocketUplink {
    pub fn new(cfg: SocketUplinkConfig, registry: Registry, seed: u64) -> SocketUplink {
        SocketUplink {
            cfg,
            registry,
            start: Instant::now(),
            slots: Vec::new(),
            free: Vec::new(),
            tcp: HashMap::new(),
            udp: HashMap::new(),
            ping: HashMap::new(),
            listeners: HashMap::new(),
            stack: Stack::new(seed),
            dirty: Vec::new(),
            timers: BTreeSet::new(),
            out: Vec::new(),
            gso: Vec::new(),
            spare: Vec::new(),
            buf: vec![0u8; MAX_DATAGRAM],
            ping_warned: false,
            counters: SocketCounters::default(),
        }
    }

    pub fn counters(&self) -> SocketCounters {
        let mut c = self.counters;
        c.tcp_flows = self.tcp.len();
        c.udp_flows = self.udp.len();
        c.ping_flows = self.ping.len();
        c.listeners = self.listeners.len();
        c
    }

    fn snow(&self, now: Instant) -> SInstant {
        SInstant::from_micros(now.saturating_duration_since(self.start).as_micros() as i64)
    }

    fn alloc(&mut self, s: Slot) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(s);
                i
            }
            None => {
                self.slots.push(Some(s));
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, i: usize) -> Option<Slot> {
        let s = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        Some(s)
    }

    fn token(i: usize) -> Token {
        Token(TOKEN_BASE + i)
    }

    /// Packets for containers produced since the last call.
    pub fn take_out(&mut self) -> ToContainers {
        ToContainers {
            packets: std::mem::take(&mut self.out),
            gso: std::mem::take(&mut self.gso),
        }
    }

    /// Put back what [`Self::take_out`] returned, once delivered: the vectors and the packet
    /// buffers are reused.
    pub fn give_back(&mut self, mut v: ToContainers) {
        let room = SPARE_BUFFERS.saturating_sub(self.spare.len());
        self.spare.extend(v.packets.drain(..).take(room));
        if self.out.is_empty() {
            self.out = v.packets;
            v.gso.clear();
            self.gso = v.gso;
        }
    }

    /// Where a container's destination is on the host, or `None` when there is nothing to
    /// reach there (a gateway, loopback, broadcast, ...).
    fn host_target(&self, dst: Ipv4Addr, router: &Router) -> Option<Ipv4Addr> {
        if Some(dst) == self.cfg.host_loopback {
            return Some(Ipv4Addr::LOCALHOST);
        }
        if router.network_for(dst).is_some()
            || dst.is_loopback()
            || dst.is_unspecified()
            || dst.is_broadcast()
            || dst.is_multicast()
        {
            return None;
        }
        Some(dst)
    }

    fn mtu_of(router: &Router, c: Ipv4Addr) -> usize {
        router.network_for(c).map(|n| n.mtu).unwrap_or(1500)
    }

    // ---- from the containers ----

    /// A packet the router handed to the host uplink.
    pub fn from_container(&mut self, pkt: &[u8], router: &Router, now: Instant) {
        let Some(p) = wire::parse(pkt) else { return };
        match p.l4 {
            L4::Tcp { sport, dport, .. } => self.tcp_in(pkt, &p, sport, dport, router, now),
            L4::Udp { sport, dport } => self.udp_in(pkt, &p, sport, dport, router, now),
            L4::Echo { id } => self.ping_in(pkt, &p, id, router, now),
            L4::Other => {}
        }
    }

    fn reset(&mut self, pkt: &[u8], now: Instant) {
        let before = self.out.len();
        let sn = self.snow(now);
        self.stack.answer_stray(pkt, sn, &mut self.out);
        self.counters.tcp_resets_sent += (self.out.len() - before) as u64;
    }

    fn tcp_in(
        &mut self,
        pkt: &[u8],
        p: &Parsed,
        sport: u16,
        dport: u16,
        router: &Router,
        now: Instant,
    ) {
        let key = Key {
            c: p.src,
            cport: sport,
            r: p.dst,
            rport: dport,
        };
        if let Some(&i) = self.tcp.get(&key) {
            if let Some(Slot::Tcp(f)) = &mut self.slots[i] {
                // Retransmitted SYNs while the host connect runs are dropped.
                if f.handle.is_some() {
                    let mut v = pkt[..p.end].to_vec();
                    f.take_syn_mss(&mut v, p);
                    f.rxq.push_back(v);
                    self.dirty.push(i);
                }
            }
            return;
        }
        if !p.is_syn() {
            return self.reset(pkt, now);
        }
        let Some(target) = self.host_target(p.dst, router) else {
            return self.reset(pkt, now);
        };
        if self.tcp.len() >= self.cfg.max_flows {
            self.counters.flows_refused += 1;
            return self.reset(pkt, now);
        }
        let addr = SocketAddr::V4(SocketAddrV4::new(target, dport));
        let mut stream = match mio::net::TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => return self.connect_failed(pkt, p, &e, now),
        };
        let _ = stream.set_nodelay(true);
        let mtu = Self::mtu_of(router, p.src);
        let i = self.free.last().copied().unwrap_or(self.slots.len());
        if let Err(e) = self.registry.register(
            &mut stream,
            Self::token(i),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::debug!("socket uplink: register: {e}");
            self.counters.socket_errors += 1;
            return self.reset(pkt, now);
        }
        let mut syn = pkt[..p.end].to_vec();
        let mut flow = TcpFlow::outbound(key, mtu, Vec::new(), stream);
        flow.take_syn_mss(&mut syn, p);
        flow.phase = super::tcp::Phase::Connecting { syn };
        let got = self.alloc(Slot::Tcp(Box::new(flow)));
        debug_assert_eq!(got, i);
        self.tcp.insert(key, i);
        self.counters.tcp_opened += 1;
    }

    fn connect_failed(&mut self, syn: &[u8], p: &Parsed, e: &io::Error, now: Instant) {
        if sock_err_is(e, &[libc::EHOSTUNREACH, libc::ENETUNREACH, libc::ETIMEDOUT]) {
            self.counters.tcp_unreachable += 1;
            let code = if sock_err_is(e, &[libc::ENETUNREACH]) {
                wire::NET_UNREACHABLE
            } else {
                wire::HOST_UNREACHABLE
            };
            let mut v = Vec::new();
            wire::unreachable_for(&mut v, syn, p, code);
            self.out.push(v);
        } else {
            if sock_err_is(e, &[libc::ECONNREFUSED]) {
                self.counters.tcp_refused += 1;
            } else {
                tracing::debug!("socket uplink: connect to {}: {e}", p.dst);
                self.counters.socket_errors += 1;
            }
            self.reset(syn, now);
        }
    }

    fn udp_in(
        &mut self,
        pkt: &[u8],
        p: &Parsed,
        sport: u16,
        dport: u16,
        router: &Router,
        now: Instant,
    ) {
        let key = Key {
            c: p.src,
            cport: sport,
            r: p.dst,
            rport: dport,
        };
        let payload = wire::udp_payload(pkt, p);
        let i = match self.udp.get(&key) {
            Some(&i) => i,
            None => {
                let Some(target) = self.host_target(p.dst, router) else {
                    if router.network_for(p.dst).is_some() {
                        let mut v = Vec::new();
                        wire::unreachable_for(&mut v, pkt, p, wire::PORT_UNREACHABLE);
                        self.out.push(v);
                    }
                    return;
                };
                if self.udp.len() >= self.cfg.max_flows {
                    self.counters.flows_refused += 1;
                    return;
                }
                match self.open_udp(target, dport) {
                    Ok(sock) => {
                        let flow = UdpFlow {
                            key,
                            peer: UdpPeer::Outbound(sock),
                            mtu: Self::mtu_of(router, p.src),
                            last: now,
                        };
                        let i = self.alloc(Slot::Udp(flow));
                        if let Some(Slot::Udp(f)) = &mut self.slots[i] {
                            if let UdpPeer::Outbound(s) = &mut f.peer {
                                if let Err(e) =
                                    self.registry
                                        .register(s, Self::token(i), Interest::READABLE)
                                {
                                    tracing::debug!("socket uplink: register: {e}");
                                }
                            }
                        }
                        self.udp.insert(key, i);
                        self.counters.udp_opened += 1;
                        i
                    }
                    Err(e) => {
                        tracing::debug!("socket uplink: udp socket: {e}");
                        self.counters.socket_errors += 1;
                        return;
                    }
                }
            }
        };
        let mut refused = false;
        let mut via = None;
        if let Some(Slot::Udp(f)) = &mut self.slots[i] {
            f.last = now;
            match &f.peer {
                UdpPeer::Outbound(s) => {
                    if let Err(e) = s.send(payload) {
                        refused = sock_err_is(&e, &[libc::ECONNREFUSED]);
                    }
                }
                UdpPeer::Published { listener, client } => via = Some((*listener, *client)),
            }
        }
        if let Some((l, client)) = via {
            if let Some(Some(Slot::Listen(Published {
                sock: Listener::Udp(u),
                ..
            }))) = self.slots.get(l)
            {
                let _ = u.send_to(payload, client);
            }
        }
        if refused {
            let mut v = Vec::new();
            wire::unreachable_for(&mut v, pkt, p, wire::PORT_UNREACHABLE);
            self.out.push(v);
        }
    }

    fn open_udp(&self, target: Ipv4Addr, port: u16) -> io::Result<mio::net::UdpSocket> {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect((target, port))?;
        s.set_nonblocking(true)?;
        Ok(mio::net::UdpSocket::from_std(s))
    }

    fn ping_in(&mut self, pkt: &[u8], p: &Parsed, id: u16, router: &Router, now: Instant) {
        let key = (p.src, id, p.dst);
        let msg = wire::icmp_message(pkt, p);
        if let Some(&i) = self.ping.get(&key) {
            if let Some(Slot::Ping(f)) = &mut self.slots[i] {
                f.last = now;
                let _ = f.sock.send(msg);
            }
            return;
        }
        let Some(target) = self.host_target(p.dst, router) else {
            return;
        };
        if self.ping.len() >= self.cfg.max_flows {
            self.counters.flows_refused += 1;
            return;
        }
        let sock = match open_ping(target) {
            Ok(s) => s,
            Err(e) => {
                self.counters.ping_refused += 1;
                if !self.ping_warned {
                    self.ping_warned = true;
                    let gid = nix::unistd::getegid();
                    tracing::warn!(
                        "ICMP echo from containers is refused: no ping socket ({e}); allow it with sysctl net.ipv4.ping_group_range=\"{gid} {gid}\" (or a range holding gid {gid})"
                    );
                }
                // Tell the container at once rather than let its ping time out.
                let mut v = Vec::new();
                wire::unreachable_for(&mut v, pkt, p, wire::ADMIN_PROHIBITED);
                self.out.push(v);
                return;
            }
        };
        let flow = PingFlow {
            key,
            sock,
            mtu: Self::mtu_of(router, p.src),
            last: now,
        };
        let i = self.alloc(Slot::Ping(flow));
        if let Some(Slot::Ping(f)) = &mut self.slots[i] {
            let _ = self
                .registry
                .register(&mut f.sock, Self::token(i), Interest::READABLE);
            let _ = f.sock.send(msg);
        }
        self.ping.insert(key, i);
        self.counters.ping_opened += 1;
    }

    // ---- published ports ----

    /// Listen on the host for a published port. Errors name the address and are the caller's
    /// to report (`address in use`, `permission denied` for a low port, ...).
    pub fn publish(&mut self, fwd: &PortForward) -> io::Result<()> {
        let key = (fwd.proto, fwd.host_ip, fwd.host_port);
        if self.listeners.contains_key(&key) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "already published",
            ));
        }
        let addr = SocketAddr::V4(SocketAddrV4::new(
            fwd.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            fwd.host_port,
        ));
        let mut sock = match fwd.proto {
            Proto::Tcp => {
                let s = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                s.set_reuse_address(true)?;
                s.bind(&addr.into())?;
                s.listen(1024)?;
                s.set_nonblocking(true)?;
                Listener::Tcp(mio::net::TcpListener::from_std(s.into()))
            }
            Proto::Udp => {
                let s = std::net::UdpSocket::bind(addr)?;
                s.set_nonblocking(true)?;
                Listener::Udp(mio::net::UdpSocket::from_std(s))
            }
        };
        let i = self.free.last().copied().unwrap_or(self.slots.len());
        match &mut sock {
            Listener::Tcp(l) => self
                .registry
                .register(l, Self::token(i), Interest::READABLE)?,
            Listener::Udp(u) => self
                .registry
                .register(u, Self::token(i), Interest::READABLE)?,
        }
        let got = self.alloc(Slot::Listen(Published { fwd: *fwd, sock }));
        debug_assert_eq!(got, i);
        self.listeners.insert(key, i);
        Ok(())
    }

    /// Stop listening for a published port (connections already made go on).
    pub fn unpublish(&mut self, proto: Proto, host_ip: Option<Ipv4Addr>, host_port: u16) {
        if let Some(i) = self.listeners.remove(&(proto, host_ip, host_port)) {
            if let Some(Slot::Listen(mut l)) = self.release(i) {
                let _ = match &mut l.sock {
                    Listener::Tcp(t) => self.registry.deregister(t),
                    Listener::Udp(u) => self.registry.deregister(u),
                };
            }
        }
    }

    /// The address a client appears from inside: itself, or the gateway for loopback.
    fn client_inside(router: &Router, fwd: &PortForward, client: SocketAddr) -> Option<Ipv4Addr> {
        let SocketAddr::V4(c) = client else {
            return None;
        };
        if c.ip().is_loopback() {
            return router.network_for(fwd.container_ip).map(|n| n.gateway_ip);
        }
        Some(*c.ip())
    }

    fn accept(&mut self, i: usize, router: &Router, now: Instant) {
        loop {
            let (stream, client, fwd) = match &self.slots.get(i) {
                Some(Some(Slot::Listen(Published {
                    fwd,
                    sock: Listener::Tcp(l),
                }))) => match l.accept() {
                    Ok((s, c)) => (s, c, *fwd),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::debug!("socket uplink: accept: {e}");
                        self.counters.socket_errors += 1;
                        return;
                    }
                },
                _ => return,
            };
            self.inbound_tcp(stream, client, fwd, router, now);
        }
    }

    fn inbound_tcp(
        &mut self,
        mut stream: mio::net::TcpStream,
        client: SocketAddr,
        fwd: PortForward,
        router: &Router,
        now: Instant,
    ) {
        let Some(src) = Self::client_inside(router, &fwd, client) else {
            return;
        };
        if self.tcp.len() >= self.cfg.max_flows {
            self.counters.flows_refused += 1;
            return;
        }
        let mut key = Key {
            c: fwd.container_ip,
            cport: fwd.container_port,
            r: src,
            rport: client.port(),
        };
        // Two loopback clients can map onto one gateway address and port: move the second.
        let mut tries = 0u32;
        while self.tcp.contains_key(&key) && tries < 1000 {
            key.rport = key.rport.wrapping_add(1).max(1024);
            tries += 1;
        }
        let _ = stream.set_nodelay(true);
        let mtu = Self::mtu_of(router, fwd.container_ip);
        let sn = self.snow(now);
        let i = self.free.last().copied().unwrap_or(self.slots.len());
        if self
            .registry
            .register(
                &mut stream,
                Self::token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.counters.socket_errors += 1;
            return;
        }
        match TcpFlow::inbound(key, mtu, stream, &mut self.stack, self.cfg.tcp_buffer, sn) {
            Ok(flow) => {
                let got = self.alloc(Slot::Tcp(Box::new(flow)));
                debug_assert_eq!(got, i);
                self.tcp.insert(key, i);
                self.dirty.push(i);
                self.counters.tcp_accepted += 1;
            }
            Err(e) => {
                tracing::debug!("socket uplink: inbound connect: {e}");
                self.counters.socket_errors += 1;
            }
        }
    }

    fn udp_listener_rx(&mut self, i: usize, router: &Router, now: Instant) {
        loop {
            let (n, client, fwd) = match &self.slots.get(i) {
                Some(Some(Slot::Listen(Published {
                    fwd,
                    sock: Listener::Udp(u),
                }))) => match u.recv_from(&mut self.buf) {
                    Ok((n, c)) => (n, c, *fwd),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                },
                _ => return,
            };
            let Some(src) = Self::client_inside(router, &fwd, client) else {
                continue;
            };
            let key = Key {
                c: fwd.container_ip,
                cport: fwd.container_port,
                r: src,
                rport: client.port(),
            };
            let mtu = Self::mtu_of(router, fwd.container_ip);
            match self.udp.get(&key) {
                Some(&j) => {
                    if let Some(Slot::Udp(f)) = &mut self.slots[j] {
                        f.last = now;
                    }
                }
                None => {
                    if self.udp.len() >= self.cfg.max_flows {
                        self.counters.flows_refused += 1;
                        continue;
                    }
                    let flow = UdpFlow {
                        key,
                        peer: UdpPeer::Published {
                            listener: i,
                            client,
                        },
                        mtu,
                        last: now,
                    };
                    let j = self.alloc(Slot::Udp(flow));
                    self.udp.insert(key, j);
                }
            }
            self.udp_to_container(key, n, mtu);
        }
    }

    /// `self.buf[..n]` as a datagram from the flow's remote to the container.
    fn udp_to_container(&mut self, key: Key, n: usize, mtu: usize) {
        if wire::IP_HLEN + wire::UDP_HLEN + n > mtu {
            self.counters.udp_too_big += 1;
            return;
        }
        let mut v = Vec::new();
        wire::udp_packet(&mut v, key.r, key.rport, key.c, key.cport, &self.buf[..n]);
        self.out.push(v);
    }

    // ---- events and timers ----

    /// A mio event for one of our tokens; `read_closed`: epoll saw the peer's FIN, a hangup
    /// or an error on it.
    pub fn event(&mut self, token: Token, read_closed: bool, router: &Router, now: Instant) {
        let Some(i) = token.0.checked_sub(TOKEN_BASE) else {
            return;
        };
        match self.slots.get_mut(i) {
            Some(Some(Slot::Tcp(f))) => {
                f.readable = true;
                f.writable = true;
                f.host_rdhup |= read_closed;
                self.dirty.push(i);
            }
            Some(Some(Slot::Udp(_))) => self.udp_rx(i, now),
            Some(Some(Slot::Ping(_))) => self.ping_rx(i, now),
            Some(Some(Slot::Listen(l))) => match l.sock {
                Listener::Tcp(_) => self.accept(i, router, now),
                Listener::Udp(_) => self.udp_listener_rx(i, router, now),
            },
            _ => {}
        }
    }

    fn udp_rx(&mut self, i: usize, now: Instant) {
        loop {
            let Some(Some(Slot::Udp(f))) = self.slots.get_mut(i) else {
                return;
            };
            let UdpPeer::Outbound(s) = &f.peer else {
                return;
            };
            match s.recv(&mut self.buf) {
                Ok(n) => {
                    f.last = now;
                    let (key, mtu) = (f.key, f.mtu);
                    self.udp_to_container(key, n, mtu);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if sock_err_is(&e, &[libc::ECONNREFUSED]) {
                        // Port unreachable from the remote: tell the container.
                        let key = f.key;
                        let mut orig = Vec::new();
                        wire::udp_packet(&mut orig, key.c, key.cport, key.r, key.rport, &[]);
                        if let Some(p) = wire::parse(&orig) {
                            let mut v = Vec::new();
                            wire::unreachable_for(&mut v, &orig, &p, wire::PORT_UNREACHABLE);
                            self.out.push(v);
                        }
                    }
                    return;
                }
            }
        }
    }

    fn ping_rx(&mut self, i: usize, now: Instant) {
        loop {
            let Some(Some(Slot::Ping(f))) = self.slots.get_mut(i) else {
                return;
            };
            match f.sock.recv(&mut self.buf) {
                Ok(n) => {
                    f.last = now;
                    let ((c, id, r), mtu) = (f.key, f.mtu);
                    if n < 8 || self.buf[0] != wire::ICMP_ECHO_REPLY || wire::IP_HLEN + n > mtu {
                        continue;
                    }
                    let mut v = Vec::new();
                    wire::icmp_packet(&mut v, r, c, &self.buf[..n], Some(id));
                    self.out.push(v);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Step every flow that got packets, events or a due timer. Call once per loop round.
    pub fn flush(&mut self, now: Instant) {
        let sn = self.snow(now);
        while let Some(&(t, i)) = self.timers.first() {
            if t > sn {
                break;
            }
            self.timers.pop_first();
            self.dirty.push(i);
        }
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &i in &dirty {
            self.step_tcp(i, sn);
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    fn step_tcp(&mut self, i: usize, sn: SInstant) {
        let Some(Some(Slot::Tcp(f))) = self.slots.get_mut(i) else {
            return;
        };
        if f.handle.is_none() {
            match f.connect_state() {
                Connect::Pending => return,
                Connect::Done => f.open(self.cfg.tcp_buffer),
                Connect::Failed(e) => {
                    let syn = match &f.phase {
                        super::tcp::Phase::Connecting { syn } => syn.clone(),
                        super::tcp::Phase::Open => Vec::new(),
                    };
                    self.remove_tcp(i);
                    if let Some(p) = wire::parse(&syn) {
                        let now = self.start + Duration::from_micros(sn.total_micros() as u64);
                        self.connect_failed(&syn, &p, &e, now);
                    }
                    return;
                }
            }
        }
        let Some(Some(Slot::Tcp(f))) = self.slots.get_mut(i) else {
            return;
        };
        let old = f.deadline;
        let before = self.out.len();
        let done = f.step(&mut self.stack, sn, &mut self.out, &mut self.spare);
        for (j, pkt) in self.out.iter_mut().enumerate().skip(before) {
            if pkt.len() > f.mtu {
                if let Some(thl) = wire::to_partial_tcp(pkt) {
                    let g = u16::try_from(f.gso_size(thl)).unwrap_or(u16::MAX);
                    self.gso.push((j, g));
                }
            }
        }
        let new = f.deadline;
        if let Some(t) = old {
            self.timers.remove(&(t, i));
        }
        if done {
            self.remove_tcp(i);
        } else if let Some(t) = new {
            self.timers.insert((t, i));
        }
    }

    fn remove_tcp(&mut self, i: usize) {
        if let Some(Slot::Tcp(mut f)) = self.release(i) {
            if let Some(t) = f.deadline {
                self.timers.remove(&(t, i));
            }
            let _ = self.registry.deregister(&mut f.host);
            self.tcp.remove(&f.key);
            tracing::trace!(peer = %f.peer(), "socket uplink: tcp flow closed");
        }
    }

    /// When [`Self::flush`] has timer work next.
    pub fn poll_at(&self) -> Option<Instant> {
        if !self.dirty.is_empty() {
            return Some(Instant::now());
        }
        self.timers
            .first()
            .map(|(t, _)| self.start + Duration::from_micros(t.total_micros().max(0) as u64))
    }

    /// Drop idle UDP and ping flows.
    pub fn expire(&mut self, now: Instant) {
        let (ut, pt) = (self.cfg.udp_timeout, self.cfg.ping_timeout);
        let mut gone = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            match s {
                Some(Slot::Udp(f)) if now.saturating_duration_since(f.last) > ut => gone.push(i),
                Some(Slot::Ping(f)) if now.saturating_duration_since(f.last) > pt => gone.push(i),
                _ => {}
            }
        }
        for i in gone {
            match self.release(i) {
                Some(Slot::Udp(mut f)) => {
                    if let UdpPeer::Outbound(s) = &mut f.peer {
                        let _ = self.registry.deregister(s);
                    }
                    self.udp.remove(&f.key);
                    self.counters.udp_expired += 1;
                }
                Some(Slot::Ping(mut f)) => {
                    let _ = self.registry.deregister(&mut f.sock);
                    self.ping.remove(&f.key);
                }
                _ => {}
            }
        }
    }
}

fn open_ping(target: Ipv4Addr) -> io::Result<mio::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::ICMPV4),
    )?;
    s.connect(&SocketAddr::V4(SocketAddrV4::new(target, 0)).into())?;
    s.set_nonblocking(true)?;
    Ok(mio::net::UdpSocket::from_std(s.into()))
}
