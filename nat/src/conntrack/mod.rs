//! Connection tracking: a flat, bounded table of connections, each found by either of its two
//! tuples (original and reply direction) with one hash probe.
//!
//! ```text
//!  conns: Vec<Conn>  (slab, free list)        index: open addressing, u64 per slot
//!   [i] tuple[Orig] zone[Orig] ─┐              hash tag (32 bits) | i<<1|dir (+1)
//!       tuple[Reply] zone[Reply]┘◄──────────── both directions point at the same slot
//!       state, last_seen, list links
//! ```
//! Expiry is exact and lazy: a lookup treats an entry past `last_seen + timeout(state)` as gone,
//! so what a packet sees never depends on when [`Table::expire`] last ran. `expire` is garbage
//! collection: one FIFO per state (every entry of a state has the same timeout, so FIFO order is
//! expiry order); a refreshed entry is not moved on the hot path, only re-queued when it reaches
//! the head. Entries are evicted early only when the table is full, and only unassured ones.

pub mod tcp;

use std::fmt;
use std::net::Ipv4Addr;

use switchyard_switch::{Duration, Instant, NetworkId};

use tcp::{Fins, TcpFlags};

use crate::hugepages;
use crate::prefetch::prefetch;

/// The IP version a table is keyed on. Only IPv4 is implemented; IPv6 gets its own impl.
pub trait IpAddress: Copy + Eq + fmt::Debug + 'static {
    const UNSPECIFIED: Self;
    /// Both addresses folded into 64 bits for hashing (lossless for IPv4).
    fn fold_pair(a: &Self, b: &Self) -> u64;
}

impl IpAddress for Ipv4Addr {
    const UNSPECIFIED: Self = Ipv4Addr::UNSPECIFIED;
    #[inline]
    fn fold_pair(a: &Self, b: &Self) -> u64 {
        (u64::from(a.to_bits()) << 32) | u64::from(b.to_bits())
    }
}

/// Transport protocols conntrack follows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum L4 {
    Icmp = 1,
    Tcp = 6,
    Udp = 17,
}

impl L4 {
    pub fn as_str(self) -> &'static str {
        match self {
            L4::Icmp => "icmp",
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

/// One direction of a connection as packets carry it. ICMP echo puts the id in `sport` for a
/// request and in `dport` for a reply (the other is 0), so a reply tuple is the inverse of its
/// request's, as for ports.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Tuple<A = Ipv4Addr> {
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: L4,
}

impl<A: IpAddress> Tuple<A> {
    /// The tuple of a packet going the other way.
    #[inline]
    pub fn inverse(&self) -> Self {
        Tuple {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// The address space a tuple lives in: a network's id, or [`UPLINK_ZONE`].
pub type Zone = u16;
/// The uplink's zone; `NetworkId(u16::MAX)` is reserved for it.
pub const UPLINK_ZONE: Zone = u16::MAX;

/// Direction of a packet relative to the connection's first packet.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Dir {
    Orig = 0,
    Reply = 1,
}

impl Dir {
    #[inline]
    pub fn other(self) -> Dir {
        match self {
            Dir::Orig => Dir::Reply,
            Dir::Reply => Dir::Orig,
        }
    }
    #[inline]
    pub fn idx(self) -> usize {
        self as usize
    }
}

/// Connection state; each has its own timeout (and its own expiry FIFO).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum State {
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
    UdpUnreplied,
    UdpAssured,
    Icmp,
}

impl State {
    pub const COUNT: usize = 11;
    /// States whose entries are never assured: eviction candidates when the table is full.
    const UNASSURED: [State; 4] = [
        State::SynSent,
        State::SynRecv,
        State::UdpUnreplied,
        State::Icmp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::SynSent => "SYN_SENT",
            State::SynRecv => "SYN_RECV",
            State::Established => "ESTABLISHED",
            State::FinWait => "FIN_WAIT",
            State::CloseWait => "CLOSE_WAIT",
            State::LastAck => "LAST_ACK",
            State::TimeWait => "TIME_WAIT",
            State::Close => "CLOSE",
            State::UdpUnreplied => "UNREPLIED",
            State::UdpAssured => "ASSURED",
            State::Icmp => "ICMP",
        }
    }
}

/// What kind of translation a connection carries (for listings and counters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    /// Container to outside, masqueraded to the uplink address.
    Snat,
    /// Outside to a published port.
    Dnat,
    /// Container to its own network's published port (DNAT and SNAT to the gateway).
    Hairpin,
}

/// Timeouts and the table limit. Defaults are netfilter's (`nf_conntrack_*_timeout*`).
#[derive(Clone, Copy, Debug)]
pub struct ConntrackConfig {
    /// Hard limit on tracked connections (netfilter `nf_conntrack_max`).
    pub max: usize,
    pub tcp_syn_sent: Duration,
    pub tcp_syn_recv: Duration,
    pub tcp_established: Duration,
    pub tcp_fin_wait: Duration,
    pub tcp_close_wait: Duration,
    pub tcp_last_ack: Duration,
    pub tcp_time_wait: Duration,
    pub tcp_close: Duration,
    pub udp_unreplied: Duration,
    pub udp_assured: Duration,
    pub icmp: Duration,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig {
            max: 262_144,
            tcp_syn_sent: Duration::from_secs(120),
            tcp_syn_recv: Duration::from_secs(60),
            tcp_established: Duration::from_secs(432_000),
            tcp_fin_wait: Duration::from_secs(120),
            tcp_close_wait: Duration::from_secs(60),
            tcp_last_ack: Duration::from_secs(30),
            tcp_time_wait: Duration::from_secs(120),
            tcp_close: Duration::from_secs(10),
            udp_unreplied: Duration::from_secs(30),
            udp_assured: Duration::from_secs(120),
            icmp: Duration::from_secs(30),
        }
    }
}

impl ConntrackConfig {
    pub fn timeout(&self, s: State) -> Duration {
        match s {
            State::SynSent => self.tcp_syn_sent,
            State::SynRecv => self.tcp_syn_recv,
            State::Established => self.tcp_established,
            State::FinWait => self.tcp_fin_wait,
            State::CloseWait => self.tcp_close_wait,
            State::LastAck => self.tcp_last_ack,
            State::TimeWait => self.tcp_time_wait,
            State::Close => self.tcp_close,
            State::UdpUnreplied => self.udp_unreplied,
            State::UdpAssured => self.udp_assured,
            State::Icmp => self.icmp,
        }
    }
}

const F_LIVE: u8 = 1;
const F_ASSURED: u8 = 2;
const F_SEEN_REPLY: u8 = 4;
const F_FIN_ORIG: u8 = 8;
const F_FIN_REPLY: u8 = 16;
const NIL: u32 = u32::MAX;

/// The [`Kind`] lives in two bits of `flags` so that an IPv4 [`Conn`] is exactly 64 bytes.
const KIND_SHIFT: u8 = 5;

/// A tracked connection. `tuple[d]` is what packets in direction `d` carry when they arrive (in
/// `zone[d]`); they leave as `tuple[other(d)].inverse()`, which is the whole NAT.
///
/// Cache-line aligned, and exactly one line for IPv4 (was 72 bytes, so every lookup touched
/// two lines): with 100k flows the entry read is a cache miss per packet, and that miss is the
/// established-flow path's main cost.
#[derive(Clone, Debug)]
#[repr(align(64))]
pub struct Conn<A = Ipv4Addr> {
    pub tuple: [Tuple<A>; 2],
    pub zone: [Zone; 2],
    /// Microseconds, like [`Instant`]; kept raw so the entry stays small.
    last_seen: i64,
    queued_at: i64,
    prev: u32,
    next: u32,
    gen: u32,
    pub network: NetworkId,
    pub state: State,
    /// `F_*` bits, and the kind at [`KIND_SHIFT`].
    flags: u8,
}

impl<A: IpAddress> Conn<A> {
    /// What kind of translation this connection carries.
    #[inline]
    pub fn kind(&self) -> Kind {
        match (self.flags >> KIND_SHIFT) & 3 {
            0 => Kind::Snat,
            1 => Kind::Dnat,
            _ => Kind::Hairpin,
        }
    }
    pub fn is_assured(&self) -> bool {
        self.flags & F_ASSURED != 0
    }
    pub fn seen_reply(&self) -> bool {
        self.flags & F_SEEN_REPLY != 0
    }
    pub fn generation(&self) -> u32 {
        self.gen
    }
    /// The tuple packets travelling in `dir` are rewritten to.
    #[inline]
    pub fn target(&self, dir: Dir) -> Tuple<A> {
        self.tuple[dir.other().idx()].inverse()
    }
    pub fn last_seen(&self) -> Instant {
        Instant::from_micros(self.last_seen)
    }
}

/// A connection to insert.
#[derive(Clone, Copy, Debug)]
pub struct NewConn<A = Ipv4Addr> {
    pub orig: Tuple<A>,
    pub orig_zone: Zone,
    pub reply: Tuple<A>,
    pub reply_zone: Zone,
    pub network: NetworkId,
    pub state: State,
    pub kind: Kind,
}

/// Handle on a connection: its slot and the generation of the slot's occupant.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ConnRef {
    pub idx: u32,
    pub gen: u32,
}

/// What an insert did (firecracker's `NewConnectionReplacing` idea).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Inserted {
    New(ConnRef),
    /// Inserted after evicting the oldest unassured connection.
    Evicting(ConnRef),
}

impl Inserted {
    pub fn conn(self) -> ConnRef {
        match self {
            Inserted::New(c) | Inserted::Evicting(c) => c,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum InsertError {
    /// Full of assured connections.
    Full,
    /// A live connection already owns one of the tuples.
    Clash,
}

/// Table activity, for counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub created: u64,
    pub expired: u64,
    pub evicted: u64,
    pub removed: u64,
}

#[derive(Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

/// The table.
pub struct Table<A: IpAddress = Ipv4Addr> {
    cfg: ConntrackConfig,
    timeout_us: [i64; State::COUNT],
    conns: Vec<Conn<A>>,
    free: Vec<u32>,
    len: usize,
    /// Open addressing, linear probing, backward-shift deletion. A slot holds the hash's top 32
    /// bits (so the home bucket is recoverable) and `(idx << 1 | dir) + 1`; 0 is empty.
    slots: Vec<u64>,
    shift: u32,
    max_slots: usize,
    lists: [List; State::COUNT],
    seed: u64,
    pub stats: TableStats,
}

const MIN_SLOTS: usize = 1024;
/// Slots [`Table::prefetch_conn`] looks at for a tag (the lookup probes on; at most half full,
/// the tuple sits within the first few almost always).
const PREFETCH_PROBES: usize = 4;

#[inline(always)]
fn folded_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a).wrapping_mul(u128::from(b));
    (p as u64) ^ ((p >> 64) as u64)
}

impl<A: IpAddress> Table<A> {
    pub fn new(cfg: ConntrackConfig, seed: u64) -> Self {
        let max = cfg.max.clamp(1, (u32::MAX >> 2) as usize);
        let max_slots = (max * 4).next_power_of_two().max(MIN_SLOTS);
        let mut timeout_us = [0; State::COUNT];
        for (i, t) in timeout_us.iter_mut().enumerate() {
            let s = Self::state_at(i);
            *t = i64::try_from(cfg.timeout(s).total_micros()).unwrap_or(i64::MAX / 4);
        }
        Table {
            cfg: ConntrackConfig { max, ..cfg },
            timeout_us,
            conns: Vec::new(),
            free: Vec::new(),
            len: 0,
            slots: vec![0; MIN_SLOTS],
            shift: 64 - MIN_SLOTS.trailing_zeros(),
            max_slots,
            lists: [List {
                head: NIL,
                tail: NIL,
            }; State::COUNT],
            seed,
            stats: TableStats::default(),
        }
    }

    fn state_at(i: usize) -> State {
        use State::*;
        [
            SynSent,
            SynRecv,
            Established,
            FinWait,
            CloseWait,
            LastAck,
            TimeWait,
            Close,
            UdpUnreplied,
            UdpAssured,
            Icmp,
        ][i]
    }

    pub fn config(&self) -> &ConntrackConfig {
        &self.cfg
    }

    /// Connections held, including expired ones not yet collected.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the table's storage (slab + index + free list).
    pub fn memory_bytes(&self) -> usize {
        self.conns.capacity() * std::mem::size_of::<Conn<A>>()
            + self.slots.capacity() * 8
            + self.free.capacity() * 4
    }

    /// Upper bound of [`Self::memory_bytes`] for a full table of `max` connections.
    pub fn memory_bytes_for(max: usize) -> usize {
        max.next_power_of_two() * std::mem::size_of::<Conn<A>>()
            + (max * 4).next_power_of_two() * 8
            + max.next_power_of_two() * 4
    }

    #[inline(always)]
    fn hash(&self, zone: Zone, t: &Tuple<A>) -> u64 {
        let a = A::fold_pair(&t.src, &t.dst);
        let b = (u64::from(t.sport) << 48)
            | (u64::from(t.dport) << 32)
            | ((t.proto as u64) << 16)
            | u64::from(zone);
        let h = folded_mul(
            a ^ self.seed,
            b ^ 0x243F_6A88_85A3_08D3 ^ self.seed.rotate_left(32),
        );
        // A second round: after one, tuples differing only in a port (the uplink side of
        // masqueraded flows) can get home slots a small step apart, depending on the seed and
        // the addresses, and linear probing turned those into clusters 20+ slots long.
        folded_mul(h, 0x9E37_79B9_7F4A_7C15)
    }

    #[inline(always)]
    fn timeout_of(&self, s: State) -> i64 {
        self.timeout_us[s as usize]
    }

    #[inline(always)]
    fn is_live(&self, c: &Conn<A>, now: i64) -> bool {
        now < c.last_seen.saturating_add(self.timeout_of(c.state))
    }

    /// The slot index and direction holding this tuple, live or not.
    #[inline(always)]
    fn find(&self, zone: Zone, t: &Tuple<A>) -> Option<(u32, Dir)> {
        self.find_hashed(zone, t, self.hash(zone, t))
    }

    /// [`Self::find`] with the key's hash already computed (`h == self.hash(zone, t)`).
    #[inline(always)]
    fn find_hashed(&self, zone: Zone, t: &Tuple<A>, h: u64) -> Option<(u32, Dir)> {
        let mask = self.slots.len() - 1;
        let mut i = (h >> self.shift) as usize;
        loop {
            let v = self.slots[i];
            if v == 0 {
                return None;
            }
            if (v ^ h) >> 32 == 0 {
                let code = (v as u32) - 1;
                let (idx, dir) = (
                    code >> 1,
                    if code & 1 == 0 { Dir::Orig } else { Dir::Reply },
                );
                let c = &self.conns[idx as usize];
                if c.zone[dir.idx()] == zone && c.tuple[dir.idx()] == *t {
                    return Some((idx, dir));
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// The live connection a packet with tuple `t` arriving in `zone` belongs to, and its
    /// direction. An expired entry found on the way is removed.
    #[inline]
    pub fn lookup(&mut self, zone: Zone, t: &Tuple<A>, now: Instant) -> Option<(ConnRef, Dir)> {
        let (idx, dir) = self.find(zone, t)?;
        let c = &self.conns[idx as usize];
        if self.is_live(c, now.total_micros()) {
            Some((ConnRef { idx, gen: c.gen }, dir))
        } else {
            self.remove_idx(idx);
            self.stats.expired += 1;
            None
        }
    }

    /// [`Self::lookup`] without side effects, for the fast path: `None` for a missing *or
    /// expired* entry (the caller then takes the full path, whose `lookup` collects it).
    #[inline(always)]
    pub(crate) fn lookup_live(&self, zone: Zone, t: &Tuple<A>, now_us: i64) -> Option<(u32, Dir)> {
        self.lookup_live_hashed(zone, t, self.hash(zone, t), now_us)
    }

    /// [`Self::lookup_live`] with the key's hash from [`Self::prefetch_slot`] (the batch path
    /// hashes each key once). `h` must be that key's hash: it depends only on the key and the
    /// seed, so one taken before the index grew stays valid.
    #[inline(always)]
    pub(crate) fn lookup_live_hashed(
        &self,
        zone: Zone,
        t: &Tuple<A>,
        h: u64,
        now_us: i64,
    ) -> Option<(u32, Dir)> {
        let (idx, dir) = self.find_hashed(zone, t, h)?;
        let c = &self.conns[idx as usize];
        self.is_live(c, now_us).then_some((idx, dir))
    }

    /// First stage of a batched lookup ([`crate::fast`]'s pipeline): the key's hash, with the
    /// index line of its home slot asked for. A hint only: the lookup itself probes properly.
    #[inline(always)]
    pub(crate) fn prefetch_slot(&self, zone: Zone, t: &Tuple<A>) -> u64 {
        let h = self.hash(zone, t);
        prefetch(self.slots.as_ptr().wrapping_add((h >> self.shift) as usize));
        h
    }

    /// Second stage, some packets later: the entry the first slot tagged like `h` points at
    /// asked for (the slot line is there by now), and returned. The hash does not depend on the
    /// index size, so a table grown in between only makes the hint useless, never wrong.
    #[inline(always)]
    pub(crate) fn prefetch_conn(&self, h: u64) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let home = (h >> self.shift) as usize;
        for i in home..home + PREFETCH_PROBES {
            let v = self.slots[i & mask];
            if v == 0 {
                return None;
            }
            if (v ^ h) >> 32 == 0 {
                let idx = ((v as u32) - 1) >> 1;
                prefetch(self.conns.as_ptr().wrapping_add(idx as usize));
                return Some(idx);
            }
        }
        None
    }

    /// What a live-indexed slot translates packets of `dir` to: the target tuple, the egress
    /// zone, the kind and the handle (the fast path's `get` + `target`).
    #[inline(always)]
    pub(crate) fn translation(&self, idx: u32, dir: Dir) -> (Tuple<A>, Zone, Kind, ConnRef) {
        let c = &self.conns[idx as usize];
        let o = dir.other().idx();
        (
            c.tuple[o].inverse(),
            c.zone[o],
            c.kind(),
            ConnRef { idx, gen: c.gen },
        )
    }

    /// True when a live connection owns `t` in `zone` (expired owners are collected).
    pub fn in_use(&mut self, zone: Zone, t: &Tuple<A>, now: Instant) -> bool {
        self.lookup(zone, t, now).is_some()
    }

    /// The connection behind a handle, if it is still that connection.
    #[inline]
    pub fn get(&self, r: ConnRef) -> Option<&Conn<A>> {
        self.conns
            .get(r.idx as usize)
            .filter(|c| c.gen == r.gen && c.flags & F_LIVE != 0)
    }

    /// Like [`Self::get`], and not expired at `now`.
    pub fn get_live(&self, r: ConnRef, now: Instant) -> Option<&Conn<A>> {
        self.get(r).filter(|c| self.is_live(c, now.total_micros()))
    }

    /// Live connections with their remaining time.
    pub fn iter_live(&self, now: Instant) -> impl Iterator<Item = (&Conn<A>, Duration)> {
        let now = now.total_micros();
        self.conns.iter().filter_map(move |c| {
            if c.flags & F_LIVE == 0 {
                return None;
            }
            let end = c.last_seen.saturating_add(self.timeout_of(c.state));
            (now < end).then(|| (c, Duration::from_micros((end - now) as u64)))
        })
    }

    /// Insert a connection in `state`. When full: collect expired entries, then evict the
    /// oldest unassured connection; assured ones are never touched.
    pub fn insert(&mut self, n: NewConn<A>, now: Instant) -> Result<Inserted, InsertError> {
        if self.in_use(n.orig_zone, &n.orig, now) || self.in_use(n.reply_zone, &n.reply, now) {
            return Err(InsertError::Clash);
        }
        if n.orig_zone == n.reply_zone && n.orig == n.reply {
            return Err(InsertError::Clash);
        }
        let mut evicted = false;
        if self.len >= self.cfg.max {
            self.expire(now);
        }
        if self.len >= self.cfg.max {
            if !self.evict_one() {
                return Err(InsertError::Full);
            }
            evicted = true;
        }
        self.grow_for(self.len + 1);
        let now_us = now.total_micros();
        let conn = Conn {
            tuple: [n.orig, n.reply],
            zone: [n.orig_zone, n.reply_zone],
            last_seen: now_us,
            queued_at: now_us,
            prev: NIL,
            next: NIL,
            gen: 0,
            network: n.network,
            state: n.state,
            flags: F_LIVE | ((n.kind as u8) << KIND_SHIFT),
        };
        let idx = match self.free.pop() {
            Some(i) => {
                let gen = self.conns[i as usize].gen.wrapping_add(1);
                self.conns[i as usize] = Conn { gen, ..conn };
                i
            }
            None => {
                hugepages::reserve_one(&mut self.conns);
                self.conns.push(conn);
                (self.conns.len() - 1) as u32
            }
        };
        self.len += 1;
        self.index_insert(idx, Dir::Orig);
        self.index_insert(idx, Dir::Reply);
        self.push_tail(idx, n.state, now_us);
        self.stats.created += 1;
        let r = ConnRef {
            idx,
            gen: self.conns[idx as usize].gen,
        };
        Ok(if evicted {
            Inserted::Evicting(r)
        } else {
            Inserted::New(r)
        })
    }

    /// Account a packet of `r` in `dir`: refresh, mark replies, and run the TCP machine.
    #[inline(always)]
    pub fn on_packet(&mut self, r: ConnRef, dir: Dir, tcp: Option<TcpFlags>, now: Instant) {
        let now_us = now.total_micros();
        let Some(c) = self.conns.get_mut(r.idx as usize) else {
            return;
        };
        c.last_seen = now_us;
        let old = c.state;
        let mut new = old;
        if dir == Dir::Reply {
            c.flags |= F_SEEN_REPLY;
            if old == State::UdpUnreplied {
                new = State::UdpAssured;
                c.flags |= F_ASSURED;
            }
        }
        if let Some(f) = tcp {
            let mut fins = Fins {
                orig: c.flags & F_FIN_ORIG != 0,
                reply: c.flags & F_FIN_REPLY != 0,
            };
            new = tcp::transition(old, &mut fins, dir, f);
            c.flags &= !(F_FIN_ORIG | F_FIN_REPLY);
            if fins.orig {
                c.flags |= F_FIN_ORIG;
            }
            if fins.reply {
                c.flags |= F_FIN_REPLY;
            }
            if new == State::Established {
                c.flags |= F_ASSURED;
            } else if new == State::SynSent && old != State::SynSent {
                // Reopened: a fresh, unassured attempt.
                c.flags &= !(F_ASSURED | F_SEEN_REPLY);
            }
        }
        if new != old {
            self.requeue(r.idx, new, now_us);
        }
    }

    /// Move entry `idx` to the expiry FIFO of its new state (kept out of [`Self::on_packet`],
    /// which is inlined on the fast path where the state rarely changes).
    #[inline(never)]
    fn requeue(&mut self, idx: u32, new: State, now_us: i64) {
        self.unlink(idx);
        self.conns[idx as usize].state = new;
        self.push_tail(idx, new, now_us);
    }

    /// Remove a connection by handle.
    pub fn remove(&mut self, r: ConnRef) -> bool {
        if self.get(r).is_none() {
            return false;
        }
        self.remove_idx(r.idx);
        self.stats.removed += 1;
        true
    }

    /// Remove every connection for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&Conn<A>) -> bool) {
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            if c.flags & F_LIVE != 0 && !keep(c) {
                self.remove_idx(i as u32);
                self.stats.removed += 1;
            }
        }
    }

    /// Collect expired connections; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let now_us = now.total_micros();
        let mut n = 0;
        for s in 0..State::COUNT {
            let to = self.timeout_us[s];
            loop {
                let h = self.lists[s].head;
                if h == NIL {
                    break;
                }
                let c = &self.conns[h as usize];
                if c.queued_at.saturating_add(to) > now_us {
                    break;
                }
                if c.last_seen.saturating_add(to) <= now_us {
                    self.remove_idx(h);
                    n += 1;
                } else {
                    // Refreshed since it was queued: back of the line, at its real age (never
                    // before the current tail, to keep the FIFO ordered).
                    let tail_q = self.conns[self.lists[s].tail as usize].queued_at;
                    let q = c.last_seen.max(tail_q);
                    let st = c.state;
                    self.unlink(h);
                    self.push_tail(h, st, q);
                }
            }
        }
        self.stats.expired += n as u64;
        n
    }

    /// When the oldest queued entry may expire: call [`Self::expire`] then.
    pub fn next_expiry(&self) -> Option<Instant> {
        (0..State::COUNT)
            .filter_map(|s| {
                let h = self.lists[s].head;
                (h != NIL).then(|| {
                    let q = self.conns[h as usize].queued_at;
                    q.saturating_add(self.timeout_us[s])
                })
            })
            .min()
            .map(Instant::from_micros)
    }

    fn evict_one(&mut self) -> bool {
        let victim = State::UNASSURED
            .iter()
            .filter_map(|s| {
                let h = self.lists[*s as usize].head;
                (h != NIL && self.conns[h as usize].flags & F_ASSURED == 0)
                    .then(|| (self.conns[h as usize].queued_at, h))
            })
            .min();
        match victim {
            Some((_, h)) => {
                self.remove_idx(h);
                self.stats.evicted += 1;
                true
            }
            None => false,
        }
    }

    fn remove_idx(&mut self, idx: u32) {
        self.index_remove(idx, Dir::Orig);
        self.index_remove(idx, Dir::Reply);
        self.unlink(idx);
        let c = &mut self.conns[idx as usize];
        c.flags = 0;
        self.free.push(idx);
        self.len -= 1;
    }

    fn push_tail(&mut self, idx: u32, s: State, queued_at: i64) {
        let l = &mut self.lists[s as usize];
        let old_tail = l.tail;
        if old_tail == NIL {
            l.head = idx;
        }
        l.tail = idx;
        if old_tail != NIL {
            self.conns[old_tail as usize].next = idx;
        }
        let c = &mut self.conns[idx as usize];
        c.prev = old_tail;
        c.next = NIL;
        c.queued_at = queued_at;
    }

    fn unlink(&mut self, idx: u32) {
        let (prev, next, s) = {
            let c = &self.conns[idx as usize];
            (c.prev, c.next, c.state as usize)
        };
        if prev == NIL {
            self.lists[s].head = next;
        } else {
            self.conns[prev as usize].next = next;
        }
        if next == NIL {
            self.lists[s].tail = prev;
        } else {
            self.conns[next as usize].prev = prev;
        }
        let c = &mut self.conns[idx as usize];
        c.prev = NIL;
        c.next = NIL;
    }

    fn index_insert(&mut self, idx: u32, dir: Dir) {
        let c = &self.conns[idx as usize];
        let h = self.hash(c.zone[dir.idx()], &c.tuple[dir.idx()]);
        let v = (h & !0xffff_ffff) | u64::from(((idx << 1) | dir as u32) + 1);
        let mask = self.slots.len() - 1;
        let mut i = (h >> self.shift) as usize;
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = v;
    }

    fn index_remove(&mut self, idx: u32, dir: Dir) {
        let c = &self.conns[idx as usize];
        let h = self.hash(c.zone[dir.idx()], &c.tuple[dir.idx()]);
        let code = ((idx << 1) | dir as u32) + 1;
        let mask = self.slots.len() - 1;
        let mut i = (h >> self.shift) as usize;
        loop {
            let v = self.slots[i];
            if v == 0 {
                return; // not indexed: nothing to do
            }
            if v as u32 == code {
                break;
            }
            i = (i + 1) & mask;
        }
        // Backward-shift deletion: pull later entries of the cluster into the hole when the
        // hole lies between their home bucket and where they sit.
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let v = self.slots[j];
            if v == 0 {
                break;
            }
            let home = (v >> self.shift) as usize;
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = v;
                hole = j;
            }
        }
        self.slots[hole] = 0;
    }

    /// Keep the index at most half full (two keys per connection) for `conns` connections.
    fn grow_for(&mut self, conns: usize) {
        let keys = conns * 2;
        if keys * 2 <= self.slots.len() || self.slots.len() >= self.max_slots {
            return;
        }
        let new_len = (self.slots.len() * 2).min(self.max_slots);
        // Zeroed memory this large comes untouched from mmap: advise it before the rehash.
        self.slots = vec![0; new_len];
        hugepages::advise(&self.slots);
        self.shift = 64 - new_len.trailing_zeros();
        for i in 0..self.conns.len() as u32 {
            if self.conns[i as usize].flags & F_LIVE != 0 {
                self.index_insert(i, Dir::Orig);
                self.index_insert(i, Dir::Reply);
            }
        }
    }
}

#[cfg(test)]
mod tests;
