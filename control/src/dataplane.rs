//! The dataplane: worker threads running mio loops over the port fds that feed the
//! [`Pipeline`] (see `worker.rs` for how work is split between them).
//!
//! Configuration arrives as closures over a crossbeam channel plus a `mio::Waker`, run by
//! worker 0 holding the state lock. Each readable fd is drained in batches, round-robin, so one
//! busy port cannot starve the others (boringtun's MAX_ITR). After a round that moved frames a
//! worker polls without sleeping for a bounded window ([`BusyPoll`], `--busy-poll`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration as StdDuration;

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Interest, Poll, Registry, Token, Waker};
use switchyard_nat::RxMeta;
use switchyard_switch::backend::packet::PacketSocket;
use switchyard_switch::backend::tap::Tap;
use switchyard_switch::gso::{self, VnetHdr, GSO_NONE, VNET_HDR_LEN};
use switchyard_switch::{DropReason, Instant, PortId};

use crate::error::{Error, Result};
use crate::pipeline::{Out, Pipeline, Verdict};
use crate::uplink::{SocketCounters, SocketUplink, SocketUplinkConfig};

mod affinity;
mod busy_poll;
mod dns_io;
pub(crate) mod held;
mod worker;

use affinity::{Affinity, Move, Outputs, Peer};
use busy_poll::BusyPoll;
use held::Held;

const WAKER: Token = Token(0);
const UPLINK: Token = Token(1);
const PORT_BASE: usize = 2;
/// Largest frame we read: a 65520-byte MTU plus Ethernet header and VLAN tag.
const MAX_FRAME: usize = 65_536 + 18 + 4;
/// How often MAC aging and conntrack expiry run when nothing else wakes the loop.
const HOUSEKEEPING: StdDuration = StdDuration::from_millis(500);
/// How often ports are moved between workers to follow their conversations (`affinity.rs`).
const AFFINITY_INTERVAL: switchyard_switch::Duration =
    switchyard_switch::Duration::from_millis(1000);

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
    /// Frames the kernel could not hand us (an AF_PACKET socket's ring or buffer was full)
    /// since the port was attached; a tap's are counted by the kernel on the interface.
    pub fn rx_lost(&self) -> u64 {
        match self {
            PortIo::Tap(_) => 0,
            PortIo::Packet(p) => p.drops(),
        }
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

/// Uplink counters, atomics because any worker may write to the uplink.
#[derive(Default)]
struct UplinkAtomics {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_failed: AtomicU64,
    gso_dropped: AtomicU64,
}

impl UplinkAtomics {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn tx(&self, ok: bool, len: usize, hdr: Option<&VnetHdr>) {
        if ok {
            let (pk, by) = gso::wire_size(len, hdr);
            Self::add(&self.tx_packets, pk);
            Self::add(&self.tx_bytes, by);
        } else {
            Self::add(&self.tx_failed, 1);
        }
    }

    fn snapshot(&self) -> UplinkCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UplinkCounters {
            rx_packets: g(&self.rx_packets),
            rx_bytes: g(&self.rx_bytes),
            tx_packets: g(&self.tx_packets),
            tx_bytes: g(&self.tx_bytes),
            tx_failed: g(&self.tx_failed),
            gso_dropped: g(&self.gso_dropped),
        }
    }
}

/// One worker as the others see it.
struct WorkerHandle {
    registry: Registry,
    waker: Waker,
    /// Frames this worker read (ports and the raw uplink).
    frames: AtomicU64,
    /// Ports it must hand over to another worker are waiting in `DpState::pending`.
    handover: AtomicBool,
}

/// What the workers share outside the state lock.
struct Shared {
    workers: Vec<WorkerHandle>,
    /// Bumped, under the state lock, whenever the port table changes: workers then copy it
    /// again (`worker::Worker::refresh`).
    gen: AtomicU64,
    uplink: UplinkAtomics,
    stop: AtomicBool,
    /// Ports moved from one worker to another.
    migrations: AtomicU64,
}

impl Shared {
    fn wake_all(&self) {
        for w in &self.workers {
            let _ = w.waker.wake();
        }
    }
}

/// One worker's figures, for `stats`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerStats {
    /// Frames it read from its ports (and, worker 0, the raw uplink).
    pub frames: u64,
    /// Endpoint ports it reads.
    pub ports: usize,
}

/// Everything the workers share behind the state lock. Jobs from the control thread get `&mut`
/// to it.
pub struct DpState {
    pub pipeline: Pipeline,
    /// The endpoint ports' fds. Workers keep a copy of this table (the `Arc`s), so a port's fd
    /// is read and written without the lock.
    ports: Vec<Option<Arc<PortIo>>>,
    /// The worker that reads each port.
    owner: Vec<usize>,
    /// Which ports talk to which (counted with more than one worker), for moving them.
    affinity: Affinity,
    /// Moves planned and not yet done: each by the worker the port leaves (`hand_over`).
    pending: Vec<Move>,
    next_plan: Instant,
    uplink: Option<Arc<PacketSocket>>,
    captures: Captures,
    /// The socket uplink (host mode), when the daemon runs one.
    host: Option<SocketUplink>,
    /// The embedded DNS server's host socket and timers (see `dns_io.rs`).
    dns_io: dns_io::DnsIo,
    tx_scratch: Vec<u8>,
    /// Worker 0's registry: the socket uplink and the DNS sockets are polled there.
    registry: Registry,
    start: std::time::Instant,
    shared: Arc<Shared>,
}

/// Writes out of the dataplane, now: to a port by its table, or to the raw uplink.
struct Wire<'a> {
    ports: &'a [Option<Arc<PortIo>>],
    uplink: Option<&'a PacketSocket>,
    /// None when the caller knows no capture is on.
    captures: Option<&'a Captures>,
    scratch: &'a mut Vec<u8>,
    counters: &'a UplinkAtomics,
}

impl Wire<'_> {
    fn send(&mut self, out: Out, frame: &[u8], hdr: Option<&VnetHdr>) -> bool {
        match out {
            Out::Port(p) => {
                let Some(io) = self.ports.get(p.0 as usize).and_then(Option::as_ref) else {
                    return false;
                };
                let ok = io.write(frame, hdr, self.scratch).is_ok();
                if let (Some(c), true) = (self.captures, ok) {
                    c.copy(p, Direction::ToContainer, frame);
                }
                ok
            }
            Out::Uplink => {
                let Some(u) = self.uplink else { return false };
                let r = match hdr {
                    Some(h) if u.is_vnet() => u.write_with_hdr(&h.emit(), frame),
                    _ => write_finished(frame, hdr, self.scratch, |f| u.write(f)),
                };
                self.counters.tx(r.is_ok(), frame.len(), hdr);
                r.is_ok()
            }
        }
    }
}

/// A port taken out of the dataplane. Workers may hold its fd a moment longer (their copy of
/// the port table, dropped when they next look at it); dropping this waits, bounded, until
/// they have let go, so the fd is closed once the drop returns: the daemon relies on that
/// (closing a tap removes the device and lets its namespace go).
pub struct Detached(Option<Arc<PortIo>>);

impl Detached {
    fn settle(&mut self) -> Option<Arc<PortIo>> {
        let a = self.0.take()?;
        if !worker::on_worker() {
            let deadline = std::time::Instant::now() + StdDuration::from_secs(2);
            while Arc::strong_count(&a) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(StdDuration::from_micros(200));
            }
        }
        Some(a)
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        drop(self.settle());
    }
}

impl DpState {
    /// The dataplane clock: monotonic, from the dataplane's start.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    fn table_changed(&self) {
        self.shared.gen.fetch_add(1, Ordering::Release);
    }

    /// Start polling `io` as port `id` (the switch port must exist already) on the worker with
    /// the fewest ports (worker 0 counts one more: it also runs the uplink and the jobs).
    pub fn attach(&mut self, id: PortId, io: PortIo) -> io::Result<()> {
        let mut load = vec![0usize; self.shared.workers.len()];
        load[0] = 1;
        for (p, w) in self.ports.iter().zip(&self.owner) {
            if p.is_some() {
                load[*w] += 1;
            }
        }
        let k = (0..load.len()).min_by_key(|w| load[*w]).unwrap_or(0);
        let fd = io.raw_fd();
        let i = id.0 as usize;
        if self.ports.len() <= i {
            self.ports.resize_with(i + 1, || None);
            self.owner.resize(i + 1, 0);
        }
        self.affinity.forget(id.0);
        self.pending.retain(|m| m.port != id.0);
        // In the table before the fd can signal: a worker woken by it finds the port.
        self.ports[i] = Some(Arc::new(io));
        self.owner[i] = k;
        self.table_changed();
        let r = self.shared.workers[k].registry.register(
            &mut SourceFd(&fd),
            Token(PORT_BASE + i),
            Interest::READABLE,
        );
        if r.is_err() {
            self.ports[i] = None;
            self.table_changed();
        }
        r
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
    pub fn detach(&mut self, id: PortId) -> Option<Detached> {
        self.captures.list.retain(|(_, p, _)| *p != id);
        let i = id.0 as usize;
        let io = self.ports.get_mut(i)?.take()?;
        self.affinity.forget(id.0);
        self.pending.retain(|m| m.port != id.0);
        let fd = io.raw_fd();
        if let Err(e) = self.shared.workers[self.owner[i]]
            .registry
            .deregister(&mut SourceFd(&fd))
        {
            tracing::warn!(port = id.0, "deregister: {e}");
        }
        self.table_changed();
        // Workers drop their copy of the fd when they next wake.
        self.shared.wake_all();
        Some(Detached(Some(io)))
    }

    /// Every attached port's fd, for shutdown.
    pub fn detach_all(&mut self) -> Vec<(PortId, Detached)> {
        let ids: Vec<PortId> = (0..self.ports.len())
            .filter(|i| self.ports[*i].is_some())
            .map(|i| PortId(i as u32))
            .collect();
        ids.into_iter()
            .filter_map(|id| self.detach(id).map(|io| (id, io)))
            .collect()
    }

    /// Frames lost on receive before the dataplane saw them, by port (see `PortIo::rx_lost`).
    pub fn port_rx_lost(&self, id: PortId) -> u64 {
        self.ports
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .map_or(0, |io| io.rx_lost())
    }

    /// The raw uplink's counters.
    pub fn uplink_counters(&self) -> UplinkCounters {
        self.shared.uplink.snapshot()
    }

    /// Ports moved between workers so far.
    pub fn migrations(&self) -> u64 {
        self.shared.migrations.load(Ordering::Relaxed)
    }

    /// The worker that reads port `id`.
    pub fn port_worker(&self, id: PortId) -> Option<usize> {
        let i = id.0 as usize;
        self.ports.get(i)?.as_ref()?;
        self.owner.get(i).copied()
    }

    /// Plan moves for the interval that ends now (worker 0, at housekeeping): each is posted to
    /// the worker the port leaves; worker 0's own are done at once (it is between reads).
    fn plan_moves(&mut self) {
        let now = self.now();
        let workers = self.shared.workers.len();
        if workers < 2 || now < self.next_plan {
            return;
        }
        self.next_plan = now + AFFINITY_INTERVAL;
        // Moves still under way: the owners are not settled yet.
        if !self.pending.is_empty() {
            return;
        }
        let owners: Vec<Option<usize>> = self
            .ports
            .iter()
            .zip(&self.owner)
            .map(|(p, o)| p.as_ref().map(|_| *o))
            .collect();
        self.pending = self.affinity.plan(&owners, workers, now);
        for m in &self.pending {
            if m.from != 0 {
                let w = &self.shared.workers[m.from];
                w.handover.store(true, Ordering::Release);
                let _ = w.waker.wake();
            }
        }
        self.hand_over(0);
    }

    /// Worker `k`, between its reads: give the ports planned away from it to their new
    /// workers. It no longer reads them once it has refreshed its table (the owner changed),
    /// and it holds none of their frames, so the new worker reads on in order.
    fn hand_over(&mut self, k: usize) {
        let mine: Vec<Move> = self
            .pending
            .iter()
            .filter(|m| m.from == k)
            .copied()
            .collect();
        if mine.is_empty() {
            return;
        }
        self.pending.retain(|m| m.from != k);
        for m in mine {
            let i = m.port as usize;
            let Some(fd) = self
                .ports
                .get(i)
                .and_then(Option::as_ref)
                .map(|io| io.raw_fd())
            else {
                continue;
            };
            if self.owner[i] != k || m.to >= self.shared.workers.len() {
                continue;
            }
            let token = Token(PORT_BASE + i);
            let (old, new) = (&self.shared.workers[k], &self.shared.workers[m.to]);
            if let Err(e) = old.registry.deregister(&mut SourceFd(&fd)) {
                tracing::warn!(port = m.port, "moving a port: deregister: {e}");
                continue;
            }
            // Owner first: the new worker, woken by the fd, finds the port its own. An fd
            // that is already readable reports on registration (epoll checks it on add).
            self.owner[i] = m.to;
            self.table_changed();
            if let Err(e) = new
                .registry
                .register(&mut SourceFd(&fd), token, Interest::READABLE)
            {
                tracing::warn!(port = m.port, "moving a port: register: {e}");
                self.owner[i] = k;
                self.table_changed();
                if let Err(e) = old
                    .registry
                    .register(&mut SourceFd(&fd), token, Interest::READABLE)
                {
                    tracing::error!(port = m.port, "port left unread: {e}");
                }
                continue;
            }
            let _ = new.waker.wake();
            self.shared.migrations.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                port = m.port,
                from = k,
                to = m.to,
                "port moved to its peers' worker"
            );
        }
    }

    /// Per-worker frame and port counts.
    pub fn workers(&self) -> Vec<WorkerStats> {
        self.shared
            .workers
            .iter()
            .enumerate()
            .map(|(k, w)| WorkerStats {
                frames: w.frames.load(Ordering::Relaxed),
                ports: self
                    .ports
                    .iter()
                    .zip(&self.owner)
                    .filter(|(p, o)| p.is_some() && **o == k)
                    .count(),
            })
            .collect()
    }

    /// One frame a worker read from port `from` (`None`: the raw uplink), through the
    /// pipeline. With `hold`, outputs may be left in `held` for the worker to write once it
    /// has released the lock (see `held.rs`); anything else is written now. With `track`,
    /// says whether it left work for worker 0's timers (socket uplink, DNS).
    #[allow(clippy::too_many_arguments)]
    fn process(
        &mut self,
        from: Option<PortId>,
        frame: &mut [u8],
        meta: RxMeta,
        gso: Option<VnetHdr>,
        held: &mut Held,
        hold: bool,
        track: bool,
    ) -> bool {
        let now = self.now();
        let wall = std::time::Instant::now();
        let dns_due = if track {
            self.pipeline.dns_poll_at()
        } else {
            None
        };
        let DpState {
            pipeline,
            ports,
            uplink,
            captures,
            host,
            tx_scratch,
            shared,
            affinity,
            ..
        } = self;
        let captures = &*captures;
        let capturing = !captures.list.is_empty();
        // A capture copies what is written under the lock: nothing is held then.
        let hold = hold && !capturing;
        let counting = shared.workers.len() > 1;
        let mut outs = Outputs::default();
        held.begin(frame);
        let mut wire = Wire {
            ports,
            uplink: uplink.as_deref(),
            captures: capturing.then_some(captures),
            scratch: tx_scratch,
            counters: &shared.uplink,
        };
        let mut tx = |o: Out, f: &[u8], h: Option<&VnetHdr>| -> bool {
            outs.note(o.into());
            (hold && held.hold(o, f, h)) || wire.send(o, f, h)
        };
        let mut side = false;
        match from {
            Some(id) => {
                if capturing {
                    captures.copy(id, Direction::FromContainer, frame);
                }
                match &gso {
                    Some(h) => {
                        pipeline.from_port_offloaded(id, frame, h, now, &mut tx);
                    }
                    None => {
                        pipeline.from_port(id, frame, meta, now, &mut |o, f| tx(o, f, None));
                    }
                }
                if let Some(h) = host.as_mut() {
                    for p in pipeline.host_packets() {
                        h.from_container(p, &pipeline.router, wall);
                        side = true;
                    }
                }
                if side {
                    outs.note(Peer::Uplink);
                }
                if counting {
                    affinity.frame(Peer::Port(id.0), &outs);
                }
            }
            None => {
                let (pk, by) = gso::wire_size(frame.len(), gso.as_ref());
                UplinkAtomics::add(&shared.uplink.rx_packets, pk);
                UplinkAtomics::add(&shared.uplink.rx_bytes, by);
                match gso {
                    // A TSO/GRO frame from the uplink: translated whole where the flow
                    // allows, cut otherwise (see from_uplink_offloaded).
                    Some(h) => {
                        let v = pipeline.from_uplink_offloaded(frame, &h, now, &mut tx);
                        if matches!(
                            v,
                            Verdict::Dropped(DropReason::Unsupported | DropReason::Malformed)
                        ) {
                            UplinkAtomics::add(&shared.uplink.gso_dropped, 1);
                        }
                    }
                    None => {
                        pipeline.from_uplink(frame, meta, now, &mut |o, f| tx(o, f, None));
                    }
                }
                if counting {
                    affinity.frame(Peer::Uplink, &outs);
                }
            }
        }
        track && (side || pipeline.dns_host_pending() || pipeline.dns_poll_at() != dns_due)
    }

    fn housekeeping(&mut self) {
        let now = self.now();
        self.pipeline.switch.expire(now);
        self.pipeline.router.expire(now);
        if let Some(h) = &mut self.host {
            h.expire(std::time::Instant::now());
        }
        self.plan_moves();
    }

    /// When worker 0 must run next for the socket uplink's and the DNS server's timers.
    fn timers_due(&self) -> Option<std::time::Instant> {
        let host = self.host.as_ref().and_then(SocketUplink::poll_at);
        match (host, self.dns_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
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
            shared,
            affinity,
            ..
        } = self;
        let Some(h) = host.as_mut() else { return };
        h.flush(std::time::Instant::now());
        let out = h.take_out();
        if out.packets.is_empty() {
            h.give_back(out);
            return;
        }
        let mut wire = Wire {
            ports,
            uplink: None,
            captures: Some(captures),
            scratch: tx_scratch,
            counters: &shared.uplink,
        };
        let counting = shared.workers.len() > 1;
        let mut gso = out.gso.iter().peekable();
        for (i, p) in out.packets.iter().enumerate() {
            let g = gso.next_if(|(j, _)| *j == i).map(|&(_, g)| g);
            let mut outs = Outputs::default();
            pipeline.from_host(p, g, now, &mut |o, frame, hdr| {
                outs.note(o.into());
                wire.send(o, frame, hdr)
            });
            if counting {
                affinity.frame(Peer::Uplink, &outs);
            }
        }
        h.give_back(out);
    }
}

type Job = Box<dyn FnOnce(&mut DpState) + Send>;

/// Handle to the dataplane threads.
pub struct Dataplane {
    jobs: Sender<Job>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Dataplane {
    /// `busy_poll`: how long a worker keeps polling without sleeping after a round that moved
    /// frames (zero: always block). `threads`: how many workers (at least one).
    pub fn spawn(
        pipeline: Pipeline,
        uplink: Option<PacketSocket>,
        busy_poll: StdDuration,
        threads: usize,
    ) -> io::Result<Dataplane> {
        let mut polls = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..threads.max(1) {
            let poll = Poll::new()?;
            handles.push(WorkerHandle {
                registry: poll.registry().try_clone()?,
                waker: Waker::new(poll.registry(), WAKER)?,
                frames: AtomicU64::new(0),
                handover: AtomicBool::new(false),
            });
            polls.push(poll);
        }
        let uplink = uplink.map(Arc::new);
        if let Some(u) = &uplink {
            handles[0].registry.register(
                &mut SourceFd(&u.as_raw_fd()),
                UPLINK,
                Interest::READABLE,
            )?;
        }
        let shared = Arc::new(Shared {
            workers: handles,
            gen: AtomicU64::new(0),
            uplink: UplinkAtomics::default(),
            stop: AtomicBool::new(false),
            migrations: AtomicU64::new(0),
        });
        let (jobs, rx) = crossbeam_channel::bounded::<Job>(1024);
        let state = Arc::new(Mutex::new(DpState {
            pipeline,
            ports: Vec::new(),
            owner: Vec::new(),
            affinity: Affinity::default(),
            pending: Vec::new(),
            next_plan: Instant::from_micros(0) + AFFINITY_INTERVAL,
            uplink: uplink.clone(),
            captures: Captures::default(),
            host: None,
            dns_io: dns_io::DnsIo::default(),
            tx_scratch: Vec::with_capacity(MAX_FRAME),
            registry: shared.workers[0].registry.try_clone()?,
            start: std::time::Instant::now(),
            shared: shared.clone(),
        }));
        let n = polls.len();
        let mut threads = Vec::new();
        for (k, poll) in polls.into_iter().enumerate() {
            let w = worker::Worker::new(k, n, state.clone(), shared.clone(), uplink.clone());
            let jobs = (k == 0).then(|| rx.clone());
            let busy = BusyPoll::new(busy_poll);
            let name = if k == 0 {
                "dataplane".to_string()
            } else {
                format!("dataplane-{k}")
            };
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || w.run(poll, jobs, busy));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.stop.store(true, Ordering::Release);
                    shared.wake_all();
                    return Err(e);
                }
            }
        }
        Ok(Dataplane {
            jobs,
            shared,
            threads,
        })
    }

    /// Run `f` on the dataplane (worker 0, holding the state lock) and wait for its result.
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
        self.shared.workers[0]
            .waker
            .wake()
            .map_err(|e| Error::internal(format!("waking the dataplane: {e}")))?;
        rx.recv_timeout(StdDuration::from_secs(10))
            .map_err(|_| Error::unavailable("dataplane did not answer"))
    }

    /// Stop the threads; returns the port fds they held.
    pub fn shutdown(mut self) -> Vec<(PortId, Detached)> {
        let ios = self.call(|st| st.detach_all()).unwrap_or_default();
        let (tx, _rx) = crossbeam_channel::bounded::<Job>(0);
        drop(std::mem::replace(&mut self.jobs, tx));
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        ios
    }
}

impl From<Out> for Peer {
    fn from(o: Out) -> Peer {
        match o {
            Out::Port(p) => Peer::Port(p.0),
            Out::Uplink => Peer::Uplink,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// `hand_over` relies on this: an fd moved from one worker's (edge-triggered) poll to
    /// another's while frames wait in it reports readable to the new one, without a new frame.
    #[test]
    fn a_readable_fd_moved_to_another_poll_reports_there() {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let (mut p0, mut p1) = (Poll::new().unwrap(), Poll::new().unwrap());
        let mut ev = mio::Events::with_capacity(8);
        let fd = b.as_raw_fd();
        let t = Token(PORT_BASE + 3);
        p0.registry()
            .register(&mut SourceFd(&fd), t, Interest::READABLE)
            .unwrap();
        a.send(b"one").unwrap();
        a.send(b"two").unwrap();
        p0.poll(&mut ev, Some(StdDuration::from_secs(1))).unwrap();
        assert!(ev.iter().any(|e| e.token() == t && e.is_readable()));
        // Read one of the two (a batch cut short), then move the fd.
        let mut buf = [0u8; 8];
        assert_eq!(b.recv(&mut buf).unwrap(), 3);
        p0.registry().deregister(&mut SourceFd(&fd)).unwrap();
        p1.registry()
            .register(&mut SourceFd(&fd), t, Interest::READABLE)
            .unwrap();
        p1.poll(&mut ev, Some(StdDuration::from_millis(100)))
            .unwrap();
        assert!(ev.iter().any(|e| e.token() == t && e.is_readable()));
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"two");
        // The old poll hears nothing more of it.
        a.send(b"three").unwrap();
        p0.poll(&mut ev, Some(StdDuration::from_millis(50)))
            .unwrap();
        assert!(ev.is_empty());
    }
}
