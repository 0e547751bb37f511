//! One dataplane worker: a mio loop over the port fds assigned to it.
//!
//! Every endpoint port is read by exactly one worker (chosen at attach, then moved to follow
//! its conversation: `affinity.rs`, `DpState::hand_over`), so a flow's frames from one
//! container are taken in order by one thread. Reading (the kernel's copy into our
//! buffer) happens outside the state lock; the pipeline (switch, conntrack, NAT) runs under
//! it, one frame at a time; the frame's own output, usually the only one, is written after
//! the lock is released (`held.rs`). Worker 0 also reads the raw uplink, runs the socket
//! uplink, the DNS server's sockets, the timers and the control thread's jobs.
//!
//! Why one lock rather than sharded cores: perf on TCP through the dataplane puts most of the
//! time in the kernel copies (AF_PACKET send, tap read and write, which also run the receiving
//! namespace's stack in our context), not in the switch or the NAT, so running those copies in
//! parallel is what pays; the pipeline's own work per frame is short, and the lock is taken
//! once per frame.

use std::cell::Cell;
use std::collections::HashSet;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration as StdDuration, Instant as WallInstant};

use crossbeam_channel::{Receiver, TryRecvError};
use mio::{Events, Poll, Token};
use switchyard_nat::RxMeta;
use switchyard_switch::backend::packet::PacketSocket;
use switchyard_switch::gso::VnetHdr;
use switchyard_switch::PortId;

use super::busy_poll::BusyPoll;
use super::held::Held;
use super::{
    dns_io, read_packet_vnet, DpState, Job, PortIo, Shared, Wire, HOUSEKEEPING, MAX_FRAME,
    PORT_BASE, UPLINK, WAKER,
};
use crate::pipeline::Out;
use crate::uplink::TOKEN_BASE;

/// Frames read from one fd before the loop moves on to the next ready fd.
const BATCH: usize = 64;

thread_local! {
    static ON_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Is this thread a dataplane worker? (It must never wait for the workers.)
pub(super) fn on_worker() -> bool {
    ON_WORKER.with(Cell::get)
}

pub(super) struct Worker {
    k: usize,
    state: Arc<Mutex<DpState>>,
    shared: Arc<Shared>,
    /// The raw uplink: read by worker 0 (only its poll has it), written by any.
    uplink: Option<Arc<PacketSocket>>,
    /// This worker's copy of the port table (see `DpState::ports`), as of `gen`.
    ports: Vec<Option<Arc<PortIo>>>,
    owner: Vec<usize>,
    gen: u64,
    /// Hold outputs until the lock is released: only worth it with other workers to run.
    hold: bool,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    held: Held,
    /// Held writes to ports that failed, to count once the lock is taken again.
    failed: Vec<(PortId, usize)>,
    /// Frames of this round left work for worker 0 (socket uplink, DNS).
    side: bool,
}

/// A worker's copy of the port table, borrowed apart from the rest of the worker.
struct Table<'a> {
    shared: &'a Shared,
    ports: &'a mut Vec<Option<Arc<PortIo>>>,
    owner: &'a mut Vec<usize>,
    gen: &'a mut u64,
}

impl Table<'_> {
    /// Copy the table again from `st` (the caller holds the lock) if it changed.
    fn refresh(self, st: &DpState) {
        let g = self.shared.gen.load(Ordering::Acquire);
        if g != *self.gen {
            self.ports.clone_from(&st.ports);
            self.owner.clone_from(&st.owner);
            *self.gen = g;
        }
    }
}

/// Where a port or the uplink reads from.
enum Reader {
    Port(PortId, Arc<PortIo>),
    Uplink(Arc<PacketSocket>),
}

impl Worker {
    pub(super) fn new(
        k: usize,
        threads: usize,
        state: Arc<Mutex<DpState>>,
        shared: Arc<Shared>,
        uplink: Option<Arc<PacketSocket>>,
    ) -> Worker {
        Worker {
            k,
            state,
            shared,
            uplink,
            ports: Vec::new(),
            owner: Vec::new(),
            gen: u64::MAX,
            hold: threads > 1,
            buf: vec![0u8; MAX_FRAME],
            scratch: Vec::with_capacity(MAX_FRAME),
            held: Held::default(),
            failed: Vec::new(),
            side: false,
        }
    }

    fn lock(state: &Mutex<DpState>) -> MutexGuard<'_, DpState> {
        state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Copy the port table again if it changed.
    fn refresh(&mut self) {
        if self.shared.gen.load(Ordering::Acquire) != self.gen {
            let st = Self::lock(&self.state);
            Table {
                shared: &self.shared,
                ports: &mut self.ports,
                owner: &mut self.owner,
                gen: &mut self.gen,
            }
            .refresh(&st);
        }
    }

    pub(super) fn run(mut self, mut poll: Poll, jobs: Option<Receiver<Job>>, mut busy: BusyPoll) {
        ON_WORKER.with(|w| w.set(true));
        let mut events = Events::with_capacity(256);
        let mut ready: Vec<Token> = Vec::new();
        let mut is_ready: HashSet<Token> = HashSet::new();
        let mut host_events: Vec<(Token, bool)> = Vec::new();
        let mut next_housekeeping = WallInstant::now() + HOUSEKEEPING;
        // Worker 0's next timer (socket uplink, DNS), as of the last time it held the lock.
        let mut timers: Option<WallInstant> = None;
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            self.refresh();
            let timeout = if ready.is_empty() {
                let now = WallInstant::now();
                // Only worker 0 has timers; the others sleep until their fds or a wake.
                let due = match jobs {
                    Some(_) => timers.map_or(next_housekeeping, |t| t.min(next_housekeeping)),
                    None => now + HOUSEKEEPING,
                };
                busy.timeout(due.saturating_duration_since(now), now)
            } else {
                StdDuration::ZERO
            };
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(worker = self.k, "dataplane poll: {e}");
                    return;
                }
            }
            busy.round(!events.is_empty(), WallInstant::now());
            self.refresh();
            let (mut dns_readable, mut dns_tcp) = (false, false);
            for ev in events.iter() {
                let t = ev.token();
                if t == dns_io::DNS_TOKEN {
                    dns_readable = true;
                } else if dns_io::is_tcp_token(t) {
                    dns_tcp = true;
                } else if t.0 >= TOKEN_BASE {
                    host_events.push((t, ev.is_read_closed() || ev.is_error()));
                } else if t != WAKER && is_ready.insert(t) {
                    ready.push(t);
                }
            }
            // One batch per ready fd, round-robin; fds still holding frames stay in the list.
            let mut moved = false;
            let mut i = 0;
            while i < ready.len() {
                let (drained, n) = self.service(ready[i]);
                moved |= n > 0;
                if drained {
                    is_ready.remove(&ready[i]);
                    ready.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            // Between reads, holding no frame: the moment to give ports away (`hand_over`).
            if self.shared.workers[self.k]
                .handover
                .swap(false, Ordering::AcqRel)
            {
                let mut st = Self::lock(&self.state);
                st.hand_over(self.k);
            }
            let Some(jobs) = &jobs else {
                // Work this worker's frames left for the socket uplink or the DNS server:
                // done here, then worker 0 is woken to set its timers.
                if std::mem::take(&mut self.side) {
                    let mut st = Self::lock(&self.state);
                    st.host_flush();
                    st.dns_round(false, false);
                    drop(st);
                    let _ = self.shared.workers[0].waker.wake();
                }
                continue;
            };
            let now = WallInstant::now();
            let due = timers.is_some_and(|t| t <= now) || now >= next_housekeeping;
            let job = match jobs.try_recv() {
                Ok(j) => Some(j),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => {
                    self.shared.stop.store(true, Ordering::Release);
                    self.shared.wake_all();
                    return;
                }
            };
            // Worker 0 takes the lock for its own duties only when there are some, so that
            // busy polling does not contend with the other workers for nothing.
            if !(moved || due || !events.is_empty() || job.is_some() || self.side) {
                continue;
            }
            self.side = false;
            let mut st = Self::lock(&self.state);
            for (t, closed) in host_events.drain(..) {
                st.host_event(t, closed);
            }
            if let Some(j) = job {
                j(&mut st);
                while let Ok(j) = jobs.try_recv() {
                    j(&mut st);
                }
            }
            st.host_flush();
            st.dns_round(dns_readable, dns_tcp);
            if WallInstant::now() >= next_housekeeping {
                st.housekeeping();
                next_housekeeping = WallInstant::now() + HOUSEKEEPING;
            }
            timers = st.timers_due();
        }
    }

    /// Read up to BATCH frames from `token`'s fd: whether it is drained (would block, or
    /// gone), and how many frames it gave.
    fn service(&mut self, token: Token) -> (bool, usize) {
        let reader = if token == UPLINK {
            match &self.uplink {
                Some(u) => Reader::Uplink(u.clone()),
                None => return (true, 0),
            }
        } else {
            let i = token.0 - PORT_BASE;
            match self.ports.get(i).and_then(Option::as_ref) {
                Some(io) if self.owner.get(i) == Some(&self.k) => {
                    Reader::Port(PortId(i as u32), io.clone())
                }
                _ => return (true, 0),
            }
        };
        let mut n = 0;
        while n < BATCH {
            let r = match &reader {
                Reader::Uplink(u) => {
                    read_packet_vnet(u, &mut self.buf).map(|(len, m, g)| (0, len, m, g))
                }
                Reader::Port(_, io) => io.read(&mut self.buf),
            };
            match r {
                Ok((start, end, meta, gso)) => {
                    n += 1;
                    self.shared.workers[self.k]
                        .frames
                        .fetch_add(1, Ordering::Relaxed);
                    let from = match &reader {
                        Reader::Port(id, _) => Some(*id),
                        Reader::Uplink(_) => None,
                    };
                    self.frame(from, start, end, meta, gso);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (true, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // A vanished interface (veth deleted, netns gone) reads as an error until
                    // the control thread detaches it; it must not spin the loop meanwhile.
                    tracing::debug!(token = token.0, "read: {e}");
                    return (true, n);
                }
            }
        }
        (false, n)
    }

    /// One frame read into `buf[start..end]`: through the pipeline under the lock, then its
    /// held outputs written without it.
    fn frame(
        &mut self,
        from: Option<PortId>,
        start: usize,
        end: usize,
        meta: RxMeta,
        gso: Option<VnetHdr>,
    ) {
        let Worker {
            k,
            shared,
            ports,
            owner,
            gen,
            uplink,
            hold,
            buf,
            scratch,
            held,
            failed,
            side,
            state,
            ..
        } = self;
        let mut st = Self::lock(state);
        // The pipeline may pick a port attached since the last refresh: write by a table at
        // least as new as the one it decided with.
        Table {
            shared,
            ports,
            owner,
            gen,
        }
        .refresh(&st);
        let frame = &mut buf[start..end];
        *side |= st.process(from, frame, meta, gso, held, *hold, *k != 0);
        drop(st);
        if held.is_empty() {
            return;
        }
        let mut wire = Wire {
            ports,
            uplink: uplink.as_deref(),
            captures: None,
            scratch,
            counters: &shared.uplink,
        };
        for (o, f, h) in held.iter(frame) {
            if !wire.send(o, f, h) {
                if let Out::Port(p) = o {
                    failed.push((p, f.len()));
                }
            }
        }
        if !failed.is_empty() {
            let mut st = Self::lock(state);
            for (p, len) in failed.drain(..) {
                st.pipeline.switch.revoke_tx(p, len);
            }
        }
    }
}
