//! The dataplane thread: a mio loop over the port fds that feeds the [`Pipeline`].
//!
//! Configuration arrives as closures over a crossbeam channel plus a `mio::Waker`, so the
//! control thread never shares the switch or the router behind a lock: the hot path takes no
//! lock per packet. Each readable fd is drained in batches of [`BATCH`] frames, round-robin, so
//! one busy port cannot starve the others (boringtun's MAX_ITR). After a round that moved frames
//! the loop polls without sleeping for a bounded window ([`BusyPoll`], `--busy-poll`).

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration as StdDuration;

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use switchyard_nat::RxMeta;
use switchyard_switch::backend::packet::PacketSocket;
use switchyard_switch::backend::tap::Tap;
use switchyard_switch::gso::{self, VnetHdr, GSO_NONE, VNET_HDR_LEN};
use switchyard_switch::{DropReason, Instant, PortId};

use crate::error::{Error, Result};
use crate::pipeline::{Out, Pipeline, Verdict};
use crate::uplink::{SocketCounters, SocketUplink, SocketUplinkConfig, TOKEN_BASE};

mod busy_poll;
mod dns_io;

use busy_poll::BusyPoll;

const WAKER: Token = Token(0);
const UPLINK: Token = Token(1);
const PORT_BASE: usize = 2;
/// Frames read from one fd before the loop moves on to the next ready fd.
const BATCH: usize = 64;
/// Largest frame we read: a 65520-byte MTU plus Ethernet header and VLAN tag.
const MAX_FRAME: usize = 65_536 + 18 + 4;
/// How often MAC aging and conntrack expiry run when nothing else wakes the loop.
const HOUSEKEEPING: StdDuration = StdDuration::from_millis(500);

/// The kernel side of an endpoint port.
pub enum PortIo {
    Tap(Tap),
    Packet(PacketSocket),
}

impl PortIo {
    /// Read one frame: it is `buf[start..end]`; with a vnet-header tap, the header when it
    /// asks for something (GSO or a partial checksum).
    fn read(&self, buf: &mut [u8]) -> io::Result<(usize, usize, RxMeta, Option<VnetHdr>)> {
        match self {
            PortIo::Tap(t) if t.vnet_hdr() => {
                let n = t.read(buf)?;
                let Some(h) = VnetHdr::parse(&buf[..n]) else {
                    return Ok((0, 0, RxMeta::default(), None));
                };
                let asks = h.gso() != GSO_NONE || h.needs_csum();
                Ok((VNET_HDR_LEN, n, RxMeta::default(), asks.then_some(h)))
            }
            PortIo::Tap(t) => Ok((0, t.read(buf)?, RxMeta::default(), None)),
            PortIo::Packet(p) => read_packet_vnet_any(p, buf).map(|(n, m, h)| (0, n, m, h)),
        }
    }

    /// Write one frame. With `hdr` (an offloaded frame from a vnet tap): a vnet tap takes it as
    /// is; any other port gets it finished in software (cut into segments, checksum completed).
    fn write(
        &self,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<usize> {
        match self {
            PortIo::Tap(t) if t.vnet_hdr() => {
                let h = hdr.map(VnetHdr::emit).unwrap_or([0; VNET_HDR_LEN]);
                return t.write_with_hdr(&h, frame);
            }
            PortIo::Packet(p) if p.is_vnet() => {
                let h = hdr.map(VnetHdr::emit).unwrap_or([0; VNET_HDR_LEN]);
                return p.write_with_hdr(&h, frame);
            }
            _ => {}
        }
        write_finished(frame, hdr, scratch, |f| match self {
            PortIo::Tap(t) => t.write(f),
            PortIo::Packet(p) => p.write(f),
        })
    }
    fn raw_fd(&self) -> RawFd {
        match self {
            PortIo::Tap(t) => t.as_raw_fd(),
            PortIo::Packet(p) => p.as_raw_fd(),
        }
    }
}

/// Write an offloaded frame through `raw`, which takes wire frames only: cut or checksummed in
/// software first (see `gso::finish`); the first write error ends it.
fn write_finished(
    frame: &[u8],
    hdr: Option<&VnetHdr>,
    scratch: &mut Vec<u8>,
    raw: impl Fn(&[u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    if hdr.is_none() {
        return raw(frame);
    }
    let mut res = Ok(0);
    let cut = gso::finish(frame, hdr, scratch, &mut |w| {
        if res.is_ok() {
            res = raw(w);
        }
    });
    cut.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("offload: {e:?}")))?;
    res.map(|_| frame.len())
}

/// A frame from an endpoint's AF_PACKET socket with its vnet header when it asks for something.
fn read_packet_vnet_any(
    p: &PacketSocket,
    buf: &mut [u8],
) -> io::Result<(usize, RxMeta, Option<VnetHdr>)> {
    let (n, info) = p.read_meta(buf)?;
    let hdr = info.vnet.filter(|h| h.gso() != GSO_NONE || h.needs_csum());
    Ok((
        n,
        RxMeta {
            partial_csum: info.partial_csum,
        },
        hdr,
    ))
}

/// A frame from an AF_PACKET socket, with the GSO size when the kernel left it unsegmented.
fn read_packet_vnet(
    p: &PacketSocket,
    buf: &mut [u8],
) -> io::Result<(usize, RxMeta, Option<VnetHdr>)> {
    let (n, info) = p.read_meta(buf)?;
    Ok((
        n,
        RxMeta {
            partial_csum: info.partial_csum,
        },
        info.vnet.filter(|h| h.gso() != GSO_NONE),
    ))
}

/// Uplink counters kept by the loop (the router counts the rest).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct UplinkCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_failed: u64,
    /// Offloaded frames we could not segment (UDP/IPv6 GSO, malformed).
    pub gso_dropped: u64,
}

/// Which way a captured frame went, seen from the container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent by the container (read from the port).
    FromContainer,
    /// Delivered to the container (written to the port).
    ToContainer,
}

/// One captured frame.
pub struct Captured {
    pub dir: Direction,
    /// Wall-clock time, microseconds since the Unix epoch.
    pub micros: u64,
    pub frame: Vec<u8>,
}

/// Copies of a port's traffic for `switchyard capture`. The queue is bounded and filled with
/// `try_send`: a slow reader loses copies, the dataplane never waits.
pub const CAPTURE_QUEUE: usize = 4096;

#[derive(Default)]
struct Captures {
    next_id: u64,
    list: Vec<(u64, PortId, Sender<Captured>)>,
    /// Copies not queued because a reader was behind.
    dropped: std::cell::Cell<u64>,
}

impl Captures {
    #[inline]
    fn copy(&self, port: PortId, dir: Direction, frame: &[u8]) {
        if self.list.is_empty() {
            return;
        }
        let mut micros = None;
        for (_, p, tx) in &self.list {
            if *p != port {
                continue;
            }
            let m = *micros.get_or_insert_with(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0)
            });
            let c = Captured {
                dir,
                micros: m,
                frame: frame.to_vec(),
            };
            if tx.try_send(c).is_err() {
                self.dropped.set(self.dropped.get() + 1);
            }
        }
    }
}

/// Everything the dataplane thread owns. Jobs from the control thread get `&mut` to it.
pub struct DpState {
    pub pipeline: Pipeline,
    ports: Vec<Option<PortIo>>,
    uplink: Option<PacketSocket>,
    pub uplink_counters: UplinkCounters,
    captures: Captures,
    /// The socket uplink (host mode), when the daemon runs one.
    host: Option<SocketUplink>,
    /// The embedded DNS server's host socket and timers (see `dns_io.rs`).
    dns_io: dns_io::DnsIo,
    tx_scratch: Vec<u8>,
    registry: Registry,
    start: std::time::Instant,
}

impl DpState {
    /// The dataplane clock: monotonic, from the thread's start.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    /// Start polling `io` as port `id` (the switch port must exist already).
    pub fn attach(&mut self, id: PortId, io: PortIo) -> io::Result<()> {
        let fd = io.raw_fd();
        self.registry.register(
            &mut SourceFd(&fd),
            Token(PORT_BASE + id.0 as usize),
            Interest::READABLE,
        )?;
        let i = id.0 as usize;
        if self.ports.len() <= i {
            self.ports.resize_with(i + 1, || None);
        }
        self.ports[i] = Some(io);
        Ok(())
    }

    /// Start copying port `id`'s traffic; the receiver ends when the port goes.
    pub fn add_capture(&mut self, id: PortId) -> (u64, Receiver<Captured>) {
        let (tx, rx) = crossbeam_channel::bounded(CAPTURE_QUEUE);
        self.captures.next_id += 1;
        let cid = self.captures.next_id;
        self.captures.list.push((cid, id, tx));
        (cid, rx)
    }

    pub fn remove_capture(&mut self, cid: u64) {
        self.captures.list.retain(|(c, _, _)| *c != cid);
    }

    /// Copies lost because a capture reader was too slow.
    pub fn capture_drops(&self) -> u64 {
        self.captures.dropped.get()
    }

    /// Stop polling port `id` and hand its fd back (dropping it closes a tap).
    pub fn detach(&mut self, id: PortId) -> Option<PortIo> {
        self.captures.list.retain(|(_, p, _)| *p != id);
        let io = self.ports.get_mut(id.0 as usize)?.take()?;
        let fd = io.raw_fd();
        if let Err(e) = self.registry.deregister(&mut SourceFd(&fd)) {
            tracing::warn!(port = id.0, "deregister: {e}");
        }
        Some(io)
    }

    /// Every attached port's fd, for shutdown.
    pub fn detach_all(&mut self) -> Vec<(PortId, PortIo)> {
        let ids: Vec<PortId> = (0..self.ports.len())
            .filter(|i| self.ports[*i].is_some())
            .map(|i| PortId(i as u32))
            .collect();
        ids.into_iter()
            .filter_map(|id| self.detach(id).map(|io| (id, io)))
            .collect()
    }

    /// Read up to BATCH frames from `token`'s fd; true when it is drained (would block, or gone).
    fn service(&mut self, token: Token, buf: &mut [u8]) -> bool {
        let now = self.now();
        let wall = std::time::Instant::now();
        let DpState {
            pipeline,
            ports,
            uplink,
            uplink_counters: up,
            captures,
            host,
            tx_scratch,
            ..
        } = self;
        let captures = &*captures;
        // Captures are copied outside the tx closure's borrow: note them, copy after.
        let capturing = !captures.list.is_empty();
        let (ports, uplink) = (&*ports, uplink.as_ref());
        let (mut tx_pk, mut tx_by, mut tx_fail, mut rx_pk, mut rx_by) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut tx = |out: Out, frame: &[u8], hdr: Option<&VnetHdr>| -> bool {
            let r = match out {
                Out::Port(p) => match ports.get(p.0 as usize).and_then(Option::as_ref) {
                    Some(io) => {
                        let r = io.write(frame, hdr, tx_scratch);
                        if capturing && r.is_ok() {
                            captures.copy(p, Direction::ToContainer, frame);
                        }
                        r
                    }
                    None => return false,
                },
                Out::Uplink => {
                    let Some(u) = uplink else { return false };
                    let r = match hdr {
                        Some(h) if u.is_vnet() => u.write_with_hdr(&h.emit(), frame),
                        _ => write_finished(frame, hdr, tx_scratch, |f| u.write(f)),
                    };
                    if r.is_ok() {
                        let (pk, by) = gso::wire_size(frame.len(), hdr);
                        tx_pk += pk;
                        tx_by += by;
                    } else {
                        tx_fail += 1;
                    }
                    r
                }
            };
            r.is_ok()
        };
        let mut budget = BATCH;
        let drained = loop {
            if budget == 0 {
                break false;
            }
            budget -= 1;
            let (r, port) = if token == UPLINK {
                match uplink {
                    Some(u) => (read_packet_vnet(u, buf).map(|(n, m, g)| (0, n, m, g)), None),
                    None => break true,
                }
            } else {
                let id = PortId((token.0 - PORT_BASE) as u32);
                match ports.get(id.0 as usize).and_then(Option::as_ref) {
                    Some(io) => (io.read(buf), Some(id)),
                    None => break true,
                }
            };
            match r {
                Ok((start, n, meta, gso)) => {
                    let frame = &mut buf[start..n];
                    match port {
                        Some(id) => {
                            if capturing {
                                captures.copy(id, Direction::FromContainer, frame);
                            }
                            match &gso {
                                Some(h) => {
                                    pipeline.from_port_offloaded(id, frame, h, now, &mut tx);
                                }
                                None => {
                                    pipeline.from_port(id, frame, meta, now, &mut |o, f| {
                                        tx(o, f, None)
                                    });
                                }
                            }
                            if let Some(h) = host.as_mut() {
                                for p in pipeline.host_packets() {
                                    h.from_container(p, &pipeline.router, wall);
                                }
                            }
                        }
                        None => {
                            let (pk, by) = gso::wire_size(n, gso.as_ref());
                            rx_pk += pk;
                            rx_by += by;
                            match gso {
                                // A TSO/GRO frame from the uplink: translated whole where the
                                // flow allows, cut otherwise (see from_uplink_offloaded).
                                Some(h) => {
                                    let v = pipeline.from_uplink_offloaded(frame, &h, now, &mut tx);
                                    if matches!(
                                        v,
                                        Verdict::Dropped(
                                            DropReason::Unsupported | DropReason::Malformed
                                        )
                                    ) {
                                        up.gso_dropped += 1;
                                    }
                                }
                                None => {
                                    pipeline
                                        .from_uplink(frame, meta, now, &mut |o, f| tx(o, f, None));
                                }
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A vanished interface (veth deleted, netns gone) reads as an error until the
                    // control thread detaches it; it must not spin the loop meanwhile.
                    tracing::debug!(token = token.0, "read: {e}");
                    break true;
                }
            }
        };
        up.tx_packets += tx_pk;
        up.tx_bytes += tx_by;
        up.tx_failed += tx_fail;
        up.rx_packets += rx_pk;
        up.rx_bytes += rx_by;
        drained
    }

    fn housekeeping(&mut self) {
        let now = self.now();
        self.pipeline.switch.expire(now);
        self.pipeline.router.expire(now);
        if let Some(h) = &mut self.host {
            h.expire(std::time::Instant::now());
        }
    }

    /// Run the socket uplink (host mode) with `cfg`, or stop it with `None`.
    pub fn set_socket_uplink(
        &mut self,
        cfg: Option<SocketUplinkConfig>,
        seed: u64,
    ) -> io::Result<()> {
        self.host = match cfg {
            Some(c) => Some(SocketUplink::new(c, self.registry.try_clone()?, seed)),
            None => None,
        };
        self.pipeline.set_host_uplink(self.host.is_some());
        Ok(())
    }

    /// The socket uplink, when there is one (published-port listeners live there).
    pub fn socket_uplink(&mut self) -> Option<&mut SocketUplink> {
        self.host.as_mut()
    }

    pub fn socket_counters(&self) -> Option<SocketCounters> {
        self.host.as_ref().map(|h| h.counters())
    }

    fn host_event(&mut self, t: Token, read_closed: bool) {
        if let Some(h) = &mut self.host {
            h.event(
                t,
                read_closed,
                &self.pipeline.router,
                std::time::Instant::now(),
            );
        }
    }

    /// Step the socket uplink's flows and deliver what it has for the containers.
    fn host_flush(&mut self) {
        let now = self.now();
        let DpState {
            pipeline,
            ports,
            captures,
            host,
            tx_scratch,
            ..
        } = self;
        let Some(h) = host.as_mut() else { return };
        h.flush(std::time::Instant::now());
        let out = h.take_out();
        if out.packets.is_empty() {
            h.give_back(out);
            return;
        }
        let (ports, captures) = (&*ports, &*captures);
        let capturing = !captures.list.is_empty();
        let mut tx = |o: Out, frame: &[u8], hdr: Option<&VnetHdr>| -> bool {
            let Out::Port(p) = o else { return false };
            let Some(io) = ports.get(p.0 as usize).and_then(Option::as_ref) else {
                return false;
            };
            let ok = io.write(frame, hdr, tx_scratch).is_ok();
            if capturing && ok {
                captures.copy(p, Direction::ToContainer, frame);
            }
            ok
        };
        let mut gso = out.gso.iter().peekable();
        for (i, p) in out.packets.iter().enumerate() {
            let g = gso.next_if(|(j, _)| *j == i).map(|&(_, g)| g);
            pipeline.from_host(p, g, now, &mut tx);
        }
        h.give_back(out);
    }
}

fn run(mut poll: Poll, jobs: Receiver<Job>, mut st: DpState, mut busy: BusyPoll) {
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; MAX_FRAME];
    let mut ready: Vec<Token> = Vec::new();
    let mut is_ready: HashSet<Token> = HashSet::new();
    let mut next_housekeeping = std::time::Instant::now() + HOUSEKEEPING;
    loop {
        let timeout = if ready.is_empty() {
            let mut due = next_housekeeping;
            if let Some(t) = st.host.as_ref().and_then(SocketUplink::poll_at) {
                due = due.min(t);
            }
            if let Some(t) = st.dns_due() {
                due = due.min(t);
            }
            let now = std::time::Instant::now();
            busy.timeout(due.saturating_duration_since(now), now)
        } else {
            StdDuration::ZERO
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!("dataplane poll: {e}");
                return;
            }
        }
        busy.round(!events.is_empty(), std::time::Instant::now());
        let (mut dns_readable, mut dns_tcp) = (false, false);
        for ev in events.iter() {
            let t = ev.token();
            if t == dns_io::DNS_TOKEN {
                dns_readable = true;
            } else if dns_io::is_tcp_token(t) {
                dns_tcp = true;
            } else if t.0 >= TOKEN_BASE {
                st.host_event(t, ev.is_read_closed() || ev.is_error());
            } else if t != WAKER && is_ready.insert(t) {
                ready.push(t);
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => job(&mut st),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return,
            }
        }
        // One batch per ready fd, round-robin; fds still holding frames stay in the list.
        let mut i = 0;
        while i < ready.len() {
            if st.service(ready[i], &mut buf) {
                is_ready.remove(&ready[i]);
                ready.swap_remove(i);
            } else {
                i += 1;
            }
        }
        st.host_flush();
        st.dns_round(dns_readable, dns_tcp);
        if std::time::Instant::now() >= next_housekeeping {
            st.housekeeping();
            next_housekeeping = std::time::Instant::now() + HOUSEKEEPING;
        }
    }
}

type Job = Box<dyn FnOnce(&mut DpState) + Send>;

/// Handle to the dataplane thread.
pub struct Dataplane {
    jobs: Sender<Job>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Dataplane {
    /// `busy_poll`: how long the loop keeps polling without sleeping after a round that moved
    /// frames (zero: always block).
    pub fn spawn(
        pipeline: Pipeline,
        uplink: Option<PacketSocket>,
        busy_poll: StdDuration,
    ) -> io::Result<Dataplane> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let registry = poll.registry().try_clone()?;
        if let Some(u) = &uplink {
            registry.register(&mut SourceFd(&u.as_raw_fd()), UPLINK, Interest::READABLE)?;
        }
        let (jobs, rx) = crossbeam_channel::bounded::<Job>(1024);
        let state = DpState {
            pipeline,
            ports: Vec::new(),
            uplink,
            uplink_counters: UplinkCounters::default(),
            captures: Captures::default(),
            host: None,
            dns_io: dns_io::DnsIo::default(),
            tx_scratch: Vec::with_capacity(MAX_FRAME),
            registry,
            start: std::time::Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("dataplane".into())
            .spawn(move || run(poll, rx, state, BusyPoll::new(busy_poll)))?;
        Ok(Dataplane {
            jobs,
            waker,
            thread: Some(thread),
        })
    }

    /// Run `f` on the dataplane thread and wait for its result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DpState) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job: Job = Box::new(move |st| {
            let _ = tx.send(f(st));
        });
        self.jobs
            .send_timeout(job, StdDuration::from_secs(5))
            .map_err(|_| Error::unavailable("dataplane is not taking requests"))?;
        self.waker
            .wake()
            .map_err(|e| Error::internal(format!("waking the dataplane: {e}")))?;
        rx.recv_timeout(StdDuration::from_secs(10))
            .map_err(|_| Error::unavailable("dataplane did not answer"))
    }

    /// Stop the thread; returns the port fds it held.
    pub fn shutdown(mut self) -> Vec<(PortId, PortIo)> {
        let ios = self.call(|st| st.detach_all()).unwrap_or_default();
        let (tx, _rx) = crossbeam_channel::bounded::<Job>(0);
        let jobs = std::mem::replace(&mut self.jobs, tx);
        drop(jobs);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        ios
    }
}
