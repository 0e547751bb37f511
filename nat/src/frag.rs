//! IPv4 fragments are translated, not reassembled: the first fragment carries the ports and
//! goes through conntrack like any packet; it leaves a note here so later fragments of the same
//! datagram (same zone, src, dst, id, protocol) get the same address rewrite. The table is
//! bounded (oldest note forgotten first) and notes time out, so nothing leaks; a later fragment
//! with no note (out of order, or timed out) is dropped and counted.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use switchyard_switch::{Duration, Instant};

use crate::conntrack::{ConnRef, Dir, Zone};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FragKey {
    pub zone: Zone,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ident: u16,
    pub proto: u8,
}

#[derive(Clone, Copy, Debug)]
struct Note {
    conn: ConnRef,
    dir: Dir,
    expires: i64,
}

pub struct FragTable {
    notes: HashMap<FragKey, Note>,
    /// Insertion order = expiry order (every note lives `timeout`).
    order: VecDeque<(FragKey, i64)>,
    max: usize,
    timeout_us: i64,
}

impl FragTable {
    pub fn new(max: usize, timeout: Duration) -> Self {
        FragTable {
            notes: HashMap::new(),
            order: VecDeque::new(),
            max: max.max(1),
            timeout_us: timeout.total_micros().min(i64::MAX as u64 / 4) as i64,
        }
    }

    pub fn len(&self) -> usize {
        self.notes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.notes.is_empty()
    }

    /// Remember where fragments of this datagram go (first fragment seen).
    pub fn record(&mut self, key: FragKey, conn: ConnRef, dir: Dir, now: Instant) {
        let expires = now.total_micros().saturating_add(self.timeout_us);
        if let Some(n) = self.notes.get_mut(&key) {
            n.conn = conn;
            n.dir = dir;
            return;
        }
        if self.notes.len() >= self.max {
            if let Some((k, _)) = self.order.pop_front() {
                self.notes.remove(&k);
            }
        }
        self.notes.insert(key, Note { conn, dir, expires });
        self.order.push_back((key, expires));
    }

    /// Where a later fragment goes, if its first fragment was seen and has not timed out.
    pub fn lookup(&self, key: &FragKey, now: Instant) -> Option<(ConnRef, Dir)> {
        self.notes
            .get(key)
            .filter(|n| now.total_micros() < n.expires)
            .map(|n| (n.conn, n.dir))
    }

    pub fn expire(&mut self, now: Instant) {
        let now = now.total_micros();
        while let Some((k, e)) = self.order.front().copied() {
            if e > now {
                break;
            }
            self.order.pop_front();
            self.notes.remove(&k);
        }
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.order.front().map(|(_, e)| Instant::from_micros(*e))
    }

    /// Forget notes for connections that no longer exist (after a configuration change).
    pub fn clear(&mut self) {
        self.notes.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ident: u16) -> FragKey {
        FragKey {
            zone: 1,
            src: Ipv4Addr::new(10, 0, 0, 2),
            dst: Ipv4Addr::new(8, 8, 8, 8),
            ident,
            proto: 17,
        }
    }

    #[test]
    fn bounded_and_timed() {
        let mut f = FragTable::new(2, Duration::from_secs(30));
        let c = ConnRef { idx: 1, gen: 0 };
        f.record(key(1), c, Dir::Orig, Instant::from_secs(0));
        f.record(key(2), c, Dir::Orig, Instant::from_secs(1));
        f.record(key(3), c, Dir::Orig, Instant::from_secs(2));
        assert_eq!(f.len(), 2);
        assert!(f.lookup(&key(1), Instant::from_secs(2)).is_none());
        assert!(f.lookup(&key(2), Instant::from_secs(30)).is_some());
        assert!(f.lookup(&key(2), Instant::from_secs(31)).is_none());
        assert_eq!(f.next_expiry(), Some(Instant::from_secs(31)));
        f.expire(Instant::from_secs(40));
        assert_eq!(f.len(), 0);
        assert_eq!(f.next_expiry(), None);
    }
}
