//! The name table: per network, endpoint names and aliases to addresses and back.
//!
//! Keyed by network, like aardvark-dns keys its table by the requester's networks: a query is
//! looked up only in the table of the network it arrived on, so a name on another network is
//! simply not there. Names are stored lowercased (DNS compares names case-insensitively).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use switchyard_switch::NetworkId;

/// Names per network at most (endpoints times names each); more are refused.
pub const MAX_NAMES_PER_NETWORK: usize = 65_536;
/// Longest name the table holds (a DNS name is at most 253 characters as text).
pub const MAX_NAME_LEN: usize = 253;

/// What the server needs to know about a network it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetInfo {
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// No forwarding: an internal network resolves its own names only.
    pub internal: bool,
    /// The network's search domains (lowercase, no trailing dot): `NAME.DOMAIN` resolves like
    /// `NAME`; other names in them are forwarded (the domain may have real hosts upstream).
    pub search: Vec<String>,
    /// IP MTU: replies are truncated to fit one unfragmented datagram.
    pub mtu: usize,
}

impl NetInfo {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len.min(32)))
        };
        ip.to_bits() & mask == self.subnet.to_bits() & mask
    }
}

#[derive(Debug)]
struct Net {
    info: NetInfo,
    /// name -> addresses (several endpoints may share an alias: all are answered).
    by_name: BTreeMap<String, Vec<Ipv4Addr>>,
    /// address -> names, the first being the endpoint's own name (PTR answers it).
    by_ip: BTreeMap<Ipv4Addr, Vec<String>>,
}

/// What a reverse lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reverse {
    /// The endpoint's primary name.
    Name(String),
    /// An address of the asker's network with no endpoint: NXDOMAIN, not forwarded.
    Unknown,
    /// Not the asker's network: not ours to answer.
    NotOurs,
}

/// A rejected name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableError {
    UnknownNetwork,
    InvalidName(String),
    Full,
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableError::UnknownNetwork => f.write_str("network has no DNS"),
            TableError::InvalidName(n) => write!(f, "invalid DNS name {n:?}"),
            TableError::Full => f.write_str("too many DNS names on this network"),
        }
    }
}

/// Normalise a name for the table: lowercase, no trailing dot; `None` when it is not a
/// hostname (labels of letters, digits, `-` and `_`, 1-63 characters each, 253 in all).
pub fn normalize(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name);
    if n.is_empty() || n.len() > MAX_NAME_LEN {
        return None;
    }
    let ok = n.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    ok.then(|| n.to_ascii_lowercase())
}

/// All networks' names.
#[derive(Debug, Default)]
pub struct Names {
    nets: BTreeMap<NetworkId, Net>,
}

impl Names {
    /// Serve `net` (its names start empty), or update its settings and keep its names.
    pub fn set_network(&mut self, net: NetworkId, info: NetInfo) {
        match self.nets.get_mut(&net) {
            Some(n) => n.info = info,
            None => {
                self.nets.insert(
                    net,
                    Net {
                        info,
                        by_name: BTreeMap::new(),
                        by_ip: BTreeMap::new(),
                    },
                );
            }
        }
    }

    pub fn remove_network(&mut self, net: NetworkId) {
        self.nets.remove(&net);
    }

    pub fn network(&self, net: NetworkId) -> Option<&NetInfo> {
        self.nets.get(&net).map(|n| &n.info)
    }

    /// The network whose gateway is `ip` (where a query addressed to `ip` is served).
    pub fn serves(&self, net: NetworkId) -> bool {
        self.nets.contains_key(&net)
    }

    /// Give `ip` the names `names` (the first is its primary name, for PTR), replacing what it
    /// had. All or nothing.
    pub fn add(
        &mut self,
        net: NetworkId,
        ip: Ipv4Addr,
        names: &[String],
    ) -> Result<(), TableError> {
        let mut norm: Vec<String> = Vec::with_capacity(names.len());
        for n in names {
            let x = normalize(n).ok_or_else(|| TableError::InvalidName(n.clone()))?;
            if !norm.contains(&x) {
                norm.push(x);
            }
        }
        let n = self.nets.get(&net).ok_or(TableError::UnknownNetwork)?;
        let held: usize = n.by_ip.values().map(Vec::len).sum();
        if held + norm.len() > MAX_NAMES_PER_NETWORK {
            return Err(TableError::Full);
        }
        self.remove(net, ip);
        let n = self.nets.get_mut(&net).ok_or(TableError::UnknownNetwork)?;
        for x in &norm {
            let v = n.by_name.entry(x.clone()).or_default();
            if !v.contains(&ip) {
                v.push(ip);
            }
        }
        if !norm.is_empty() {
            n.by_ip.insert(ip, norm);
        }
        Ok(())
    }

    /// Forget every name of `ip` on `net`.
    pub fn remove(&mut self, net: NetworkId, ip: Ipv4Addr) {
        let Some(n) = self.nets.get_mut(&net) else {
            return;
        };
        let Some(names) = n.by_ip.remove(&ip) else {
            return;
        };
        for x in names {
            if let Some(v) = n.by_name.get_mut(&x) {
                v.retain(|a| *a != ip);
                if v.is_empty() {
                    n.by_name.remove(&x);
                }
            }
        }
    }

    /// Addresses of `name` (normalised) as seen from `net`: `NAME` or `NAME.DOMAIN`.
    pub fn lookup(&self, net: NetworkId, name: &str) -> Option<&[Ipv4Addr]> {
        let n = self.nets.get(&net)?;
        if let Some(v) = n.by_name.get(name) {
            return Some(v);
        }
        n.info.search.iter().find_map(|d| {
            let short = name.strip_suffix(d.as_str())?.strip_suffix('.')?;
            n.by_name.get(short).map(Vec::as_slice)
        })
    }

    pub fn reverse(&self, net: NetworkId, ip: Ipv4Addr) -> Reverse {
        let Some(n) = self.nets.get(&net) else {
            return Reverse::NotOurs;
        };
        if !n.info.contains(ip) {
            return Reverse::NotOurs;
        }
        match n.by_ip.get(&ip).and_then(|v| v.first()) {
            Some(name) => Reverse::Name(match n.info.search.first() {
                Some(d) => format!("{name}.{d}"),
                None => name.clone(),
            }),
            None => Reverse::Unknown,
        }
    }

    /// Names held on `net`.
    pub fn len(&self, net: NetworkId) -> usize {
        self.nets
            .get(&net)
            .map(|n| n.by_ip.values().map(Vec::len).sum())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.nets.values().all(|n| n.by_ip.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(third: u8) -> NetInfo {
        NetInfo {
            subnet: Ipv4Addr::new(10, 0, third, 0),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, third, 1),
            internal: false,
            search: Vec::new(),
            mtu: 1500,
        }
    }

    #[test]
    fn names_are_per_network() {
        let (a, b) = (NetworkId(1), NetworkId(2));
        let mut t = Names::default();
        t.set_network(a, info(1));
        t.set_network(b, info(2));
        let ip = Ipv4Addr::new(10, 0, 1, 2);
        t.add(a, ip, &["Web".into(), "www".into()]).unwrap();
        assert_eq!(t.lookup(a, "web"), Some(&[ip][..]));
        assert_eq!(t.lookup(a, "www"), Some(&[ip][..]));
        assert_eq!(t.lookup(b, "web"), None);
        assert_eq!(t.reverse(a, ip), Reverse::Name("web".into()));
        assert_eq!(t.reverse(b, ip), Reverse::NotOurs);
        assert_eq!(t.reverse(a, Ipv4Addr::new(10, 0, 1, 9)), Reverse::Unknown);
        t.remove(a, ip);
        assert_eq!(t.lookup(a, "web"), None);
        assert!(t.is_empty());
    }

    #[test]
    fn shared_alias_answers_every_address() {
        let a = NetworkId(1);
        let mut t = Names::default();
        t.set_network(a, info(1));
        let (x, y) = (Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(10, 0, 1, 3));
        t.add(a, x, &["x".into(), "db".into()]).unwrap();
        t.add(a, y, &["y".into(), "db".into()]).unwrap();
        assert_eq!(t.lookup(a, "db"), Some(&[x, y][..]));
        t.remove(a, x);
        assert_eq!(t.lookup(a, "db"), Some(&[y][..]));
    }

    #[test]
    fn domain_names_and_bad_names() {
        let a = NetworkId(1);
        let mut t = Names::default();
        let mut i = info(1);
        i.search = vec!["corp.test".into(), "lab.test".into()];
        t.set_network(a, i);
        let ip = Ipv4Addr::new(10, 0, 1, 2);
        t.add(a, ip, &["web".into()]).unwrap();
        assert_eq!(t.lookup(a, "web.corp.test"), Some(&[ip][..]));
        assert_eq!(t.lookup(a, "web.lab.test"), Some(&[ip][..]));
        assert_eq!(t.lookup(a, "webcorp.test"), None);
        assert_eq!(t.lookup(a, "web.other.test"), None);
        assert_eq!(t.reverse(a, ip), Reverse::Name("web.corp.test".into()));
        assert!(matches!(
            t.add(a, ip, &["bad name".into()]),
            Err(TableError::InvalidName(_))
        ));
        assert!(normalize("a..b").is_none());
        assert!(normalize(&"a".repeat(64)).is_none());
        assert_eq!(normalize("A.B."), Some("a.b".into()));
        // A failed add left the old names in place.
        assert_eq!(t.lookup(a, "web"), Some(&[ip][..]));
    }
}
