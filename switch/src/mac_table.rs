//! The MAC table: (network, MAC) -> port, with aging, a table limit, a per-port learning limit
//! and static entries that learning never moves or evicts.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::frame::MacAddr;
use crate::port::{NetworkId, PortId};
use crate::{Duration, Instant};

/// One entry of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub port: PortId,
    pub last_seen: Instant,
    pub is_static: bool,
}

/// What `learn` did with a source address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learn {
    /// New entry, or refreshed / moved dynamic entry.
    Learned,
    /// A static entry for this port: nothing to do.
    Static,
    /// A static entry for another port: the sender claims an address it was not given.
    StaticConflict,
    /// Not learned: the table or the port's learning limit is full.
    Refused,
}

/// Key hashing on the hot path. The key is already a well-spread u64 (MAC in the low 48 bits,
/// network above), so SipHash's DoS resistance buys nothing here while costing ~20 ns a lookup:
/// a folded 128-bit multiply (the rustc-hash/foldhash construction) mixes high and low bits in
/// about 2 ns. Flooding the table with chosen MACs cannot degrade it because the table is bounded.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let p = (self.0 as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
        (p as u64) ^ ((p >> 64) as u64)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

fn key(net: NetworkId, mac: MacAddr) -> u64 {
    (u64::from(net.0) << 48) | mac.to_u64()
}

/// Limits and timers of the table.
#[derive(Clone, Copy, Debug)]
pub struct MacTableConfig {
    /// Dynamic entries older than this are ignored and then removed (Linux bridge: 300 s).
    pub aging: Duration,
    /// Dynamic entries across all networks.
    pub max_entries: usize,
    /// Dynamic entries one port may own (a MAC flood from one container stops there).
    pub max_per_port: usize,
}

impl Default for MacTableConfig {
    fn default() -> Self {
        MacTableConfig {
            aging: Duration::from_secs(300),
            max_entries: 65_536,
            max_per_port: 1_024,
        }
    }
}

/// The table itself. Per-port dynamic counts are kept so the per-port limit is O(1).
pub struct MacTable {
    cfg: MacTableConfig,
    map: KeyMap<Entry>,
    dynamic: usize,
    per_port: HashMap<PortId, usize>,
}

impl MacTable {
    pub fn new(cfg: MacTableConfig) -> Self {
        MacTable {
            cfg,
            map: KeyMap::default(),
            dynamic: 0,
            per_port: HashMap::new(),
        }
    }

    pub fn config(&self) -> MacTableConfig {
        self.cfg
    }

    pub fn set_aging(&mut self, aging: Duration) {
        self.cfg.aging = aging;
    }

    fn is_live(&self, e: &Entry, now: Instant) -> bool {
        e.is_static || now < e.last_seen + self.cfg.aging
    }

    /// The port for `mac` on `net`, if known and not aged out.
    #[inline]
    pub fn lookup(&self, net: NetworkId, mac: MacAddr, now: Instant) -> Option<PortId> {
        match self.map.get(&key(net, mac)) {
            Some(e) if self.is_live(e, now) => Some(e.port),
            _ => None,
        }
    }

    /// Learn (or refresh) `mac` as reachable through `port`.
    #[inline]
    pub fn learn(&mut self, net: NetworkId, mac: MacAddr, port: PortId, now: Instant) -> Learn {
        let k = key(net, mac);
        if let Some(e) = self.map.get_mut(&k) {
            if e.is_static {
                return if e.port == port {
                    Learn::Static
                } else {
                    Learn::StaticConflict
                };
            }
            if e.port == port {
                e.last_seen = now;
                return Learn::Learned;
            }
            // The station moved. Charge the new port, which must have room.
            let old = e.port;
            if self.per_port.get(&port).copied().unwrap_or(0) >= self.cfg.max_per_port {
                return Learn::Refused;
            }
            e.port = port;
            e.last_seen = now;
            self.dec_port(old);
            *self.per_port.entry(port).or_insert(0) += 1;
            return Learn::Learned;
        }
        if self.dynamic >= self.cfg.max_entries
            || self.per_port.get(&port).copied().unwrap_or(0) >= self.cfg.max_per_port
        {
            return Learn::Refused;
        }
        self.map.insert(
            k,
            Entry {
                port,
                last_seen: now,
                is_static: false,
            },
        );
        self.dynamic += 1;
        *self.per_port.entry(port).or_insert(0) += 1;
        Learn::Learned
    }

    fn dec_port(&mut self, port: PortId) {
        if let Some(n) = self.per_port.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.per_port.remove(&port);
            }
        }
    }

    /// Pin `mac` on `net` to `port`. Replaces any dynamic entry. Static entries do not count
    /// against the limits: a flood of learned MACs can never push them out.
    pub fn add_static(&mut self, net: NetworkId, mac: MacAddr, port: PortId, now: Instant) {
        let k = key(net, mac);
        if let Some(old) = self.map.insert(
            k,
            Entry {
                port,
                last_seen: now,
                is_static: true,
            },
        ) {
            if !old.is_static {
                self.dynamic -= 1;
                self.dec_port(old.port);
            }
        }
    }

    /// Remove every entry (static and dynamic) that points at `port`.
    pub fn remove_port(&mut self, port: PortId) {
        let mut removed_dynamic = 0;
        self.map.retain(|_, e| {
            if e.port == port {
                if !e.is_static {
                    removed_dynamic += 1;
                }
                false
            } else {
                true
            }
        });
        self.dynamic -= removed_dynamic;
        self.per_port.remove(&port);
    }

    /// Remove every entry of a network.
    pub fn remove_network(&mut self, net: NetworkId) {
        let ports: Vec<PortId> = self
            .map
            .iter()
            .filter(|(k, _)| (*k >> 48) as u16 == net.0)
            .map(|(_, e)| e.port)
            .collect();
        for p in ports {
            self.remove_port(p);
        }
    }

    /// Drop dynamic entries that aged out. Returns how many went.
    pub fn expire(&mut self, now: Instant) -> usize {
        let aging = self.cfg.aging;
        let mut gone: Vec<PortId> = Vec::new();
        self.map.retain(|_, e| {
            let keep = e.is_static || now < e.last_seen + aging;
            if !keep {
                gone.push(e.port);
            }
            keep
        });
        for p in &gone {
            self.dynamic -= 1;
            self.dec_port(*p);
        }
        gone.len()
    }

    /// Dynamic entries currently held (aged ones included until `expire`).
    pub fn dynamic_len(&self) -> usize {
        self.dynamic
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Dynamic entries owned by `port`.
    pub fn port_dynamic_len(&self, port: PortId) -> usize {
        self.per_port.get(&port).copied().unwrap_or(0)
    }

    /// Live entries as (network, mac, entry), sorted for stable output.
    pub fn entries(&self, now: Instant) -> Vec<(NetworkId, MacAddr, Entry)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .filter(|(_, e)| self.is_live(e, now))
            .map(|(k, e)| (NetworkId((k >> 48) as u16), MacAddr::from_u64(*k), *e))
            .collect();
        v.sort_by_key(|(n, m, _)| (*n, *m));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: NetworkId = NetworkId(1);

    fn mac(i: u32) -> MacAddr {
        let b = i.to_be_bytes();
        MacAddr([0x02, 0, b[0], b[1], b[2], b[3]])
    }

    fn t(s: u64) -> Instant {
        Instant::from_secs(s as i64)
    }

    #[test]
    fn learns_and_ages_out() {
        let mut tb = MacTable::new(MacTableConfig {
            aging: Duration::from_secs(10),
            ..Default::default()
        });
        assert_eq!(tb.learn(N, mac(1), PortId(3), t(0)), Learn::Learned);
        assert_eq!(tb.lookup(N, mac(1), t(9)), Some(PortId(3)));
        assert_eq!(tb.lookup(NetworkId(2), mac(1), t(9)), None, "other network");
        assert_eq!(tb.lookup(N, mac(1), t(10)), None, "aged");
        assert_eq!(tb.expire(t(10)), 1);
        assert_eq!(tb.dynamic_len(), 0);
        assert_eq!(tb.port_dynamic_len(PortId(3)), 0);
    }

    #[test]
    fn refresh_keeps_entry_alive_and_moves_follow_station() {
        let mut tb = MacTable::new(MacTableConfig {
            aging: Duration::from_secs(10),
            ..Default::default()
        });
        tb.learn(N, mac(1), PortId(1), t(0));
        tb.learn(N, mac(1), PortId(1), t(8));
        assert_eq!(tb.lookup(N, mac(1), t(15)), Some(PortId(1)));
        tb.learn(N, mac(1), PortId(2), t(15));
        assert_eq!(tb.lookup(N, mac(1), t(15)), Some(PortId(2)));
        assert_eq!(tb.port_dynamic_len(PortId(1)), 0);
        assert_eq!(tb.port_dynamic_len(PortId(2)), 1);
        assert_eq!(tb.dynamic_len(), 1);
    }

    #[test]
    fn limits_refuse_but_never_touch_static() {
        let mut tb = MacTable::new(MacTableConfig {
            aging: Duration::from_secs(300),
            max_entries: 8,
            max_per_port: 4,
        });
        tb.add_static(N, mac(1000), PortId(9), t(0));
        for i in 0..4 {
            assert_eq!(tb.learn(N, mac(i), PortId(1), t(0)), Learn::Learned);
        }
        assert_eq!(
            tb.learn(N, mac(4), PortId(1), t(0)),
            Learn::Refused,
            "per port"
        );
        for i in 10..14 {
            assert_eq!(tb.learn(N, mac(i), PortId(2), t(0)), Learn::Learned);
        }
        assert_eq!(
            tb.learn(N, mac(20), PortId(3), t(0)),
            Learn::Refused,
            "table"
        );
        assert_eq!(tb.dynamic_len(), 8);
        assert_eq!(
            tb.lookup(N, mac(1000), t(10_000)),
            Some(PortId(9)),
            "static never ages"
        );
        assert_eq!(
            tb.learn(N, mac(1000), PortId(1), t(0)),
            Learn::StaticConflict
        );
        assert_eq!(tb.learn(N, mac(1000), PortId(9), t(0)), Learn::Static);
        tb.remove_port(PortId(1));
        assert_eq!(tb.dynamic_len(), 4);
        assert_eq!(tb.learn(N, mac(20), PortId(3), t(0)), Learn::Learned);
    }

    #[test]
    fn static_replaces_dynamic_and_remove_network() {
        let mut tb = MacTable::new(MacTableConfig::default());
        tb.learn(N, mac(1), PortId(1), t(0));
        tb.add_static(N, mac(1), PortId(2), t(0));
        assert_eq!(tb.dynamic_len(), 0);
        assert_eq!(tb.port_dynamic_len(PortId(1)), 0);
        tb.learn(NetworkId(2), mac(5), PortId(7), t(0));
        tb.remove_network(N);
        assert_eq!(tb.len(), 1);
        let e = tb.entries(t(0));
        assert_eq!(e[0].0, NetworkId(2));
        assert_eq!(e[0].1, mac(5));
    }
}
