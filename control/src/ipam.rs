//! IPv4 address management: subnets, gateways and per-network allocation.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// An IPv4 prefix, always stored with host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    len: u8,
}

impl Ipv4Net {
    /// `addr/len` with host bits of `addr` required to be zero (Docker rejects them too).
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self> {
        if len > 32 {
            return Err(Error::invalid(format!("invalid prefix length /{len}")));
        }
        let n = Ipv4Net { addr, len };
        if n.network() != addr {
            return Err(Error::invalid(format!(
                "invalid subnet {addr}/{len}: host bits set (did you mean {}/{len}?)",
                n.network()
            )));
        }
        Ok(n)
    }

    pub fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        }
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    pub fn prefix_len(&self) -> u8 {
        self.len
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }
    /// The n-th address of the prefix (0 = network address).
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.len));
        (u64::from(n) < size).then(|| Ipv4Addr::from(u32::from(self.network()).wrapping_add(n)))
    }
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Net {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::invalid(format!("invalid CIDR {s:?} (want e.g. 10.77.0.0/24)"));
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        if len > 32 {
            return Err(bad());
        }
        Ipv4Net::new(addr, len)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Addresses in use on one network. The network, gateway and broadcast addresses are never
/// handed out.
#[derive(Clone, Debug)]
pub struct Pool {
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    used: BTreeSet<Ipv4Addr>,
}

impl Pool {
    pub fn new(subnet: Ipv4Net, gateway: Ipv4Addr) -> Result<Self> {
        if subnet.prefix_len() > 30 {
            return Err(Error::invalid(format!(
                "subnet {subnet} is too small: it needs room for a gateway and endpoints (/30 at most)"
            )));
        }
        if !subnet.contains(gateway) {
            return Err(Error::invalid(format!(
                "gateway {gateway} is not in subnet {subnet}"
            )));
        }
        if gateway == subnet.network() || gateway == subnet.broadcast() {
            return Err(Error::invalid(format!(
                "gateway {gateway} is the network or broadcast address of {subnet}"
            )));
        }
        Ok(Pool {
            subnet,
            gateway,
            used: BTreeSet::new(),
        })
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    fn reserved(&self, ip: Ipv4Addr) -> bool {
        ip == self.gateway || ip == self.subnet.network() || ip == self.subnet.broadcast()
    }

    /// Take `ip` (from `--ip`), checking it against the subnet and current use.
    pub fn take(&mut self, ip: Ipv4Addr) -> Result<()> {
        if !self.subnet.contains(ip) {
            return Err(Error::invalid(format!(
                "address {ip} is not in subnet {}",
                self.subnet
            )));
        }
        if self.reserved(ip) {
            return Err(Error::invalid(format!(
                "address {ip} is reserved (network, gateway or broadcast address of {})",
                self.subnet
            )));
        }
        if !self.used.insert(ip) {
            return Err(Error::conflict(format!("address {ip} is already in use")));
        }
        Ok(())
    }

    /// The first free address.
    pub fn allocate(&mut self) -> Result<Ipv4Addr> {
        let size = self.subnet.size() as u32;
        for n in 1..size.saturating_sub(1) {
            let ip = self.subnet.nth(n).expect("n < size");
            if !self.reserved(ip) && !self.used.contains(&ip) {
                self.used.insert(ip);
                return Ok(ip);
            }
        }
        Err(Error::exhausted(format!(
            "no free address left in {}",
            self.subnet
        )))
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

/// The next free /16 from 172.18.0.0 upwards that overlaps none of `taken` (Docker's default
/// address pools: 172.17-31/16, then 192.168.0-240/20 steps).
pub fn next_free_subnet(taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    let candidates = (18..=31u8)
        .map(|b| Ipv4Net::new(Ipv4Addr::new(172, b, 0, 0), 16).expect("valid"))
        .chain(
            (0..=240u8)
                .step_by(16)
                .map(|c| Ipv4Net::new(Ipv4Addr::new(192, 168, c, 0), 20).expect("valid")),
        );
    candidates
        .into_iter()
        .find(|c| !taken.iter().any(|t| t.overlaps(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn parse_cidr() {
        let n = net("10.77.0.0/24");
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 77, 0, 255));
        assert!(n.contains(Ipv4Addr::new(10, 77, 0, 9)));
        assert!(!n.contains(Ipv4Addr::new(10, 77, 1, 9)));
        for bad in [
            "10.77.0.0",
            "10.77.0.0/33",
            "10.77.0/24",
            "x/24",
            "10.77.0.1/24",
            "",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
        assert!(net("10.0.0.0/8").overlaps(&net("10.77.0.0/24")));
        assert!(!net("10.76.0.0/24").overlaps(&net("10.77.0.0/24")));
    }

    #[test]
    fn pool_allocates_first_free_and_reserves() {
        let mut p = Pool::new(net("10.77.0.0/29"), Ipv4Addr::new(10, 77, 0, 1)).unwrap();
        let got: Vec<_> = (0..5).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(got[0], Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(got[4], Ipv4Addr::new(10, 77, 0, 6));
        assert_eq!(
            p.allocate().unwrap_err().code,
            crate::error::ErrorCode::Exhausted
        );
        p.release(Ipv4Addr::new(10, 77, 0, 3));
        assert_eq!(p.allocate().unwrap(), Ipv4Addr::new(10, 77, 0, 3));
        assert!(p.take(Ipv4Addr::new(10, 77, 0, 1)).is_err(), "gateway");
        assert!(p.take(Ipv4Addr::new(10, 77, 0, 7)).is_err(), "broadcast");
        assert!(p.take(Ipv4Addr::new(10, 77, 0, 0)).is_err(), "network");
        assert!(p.take(Ipv4Addr::new(10, 77, 1, 2)).is_err(), "outside");
        assert_eq!(
            p.take(Ipv4Addr::new(10, 77, 0, 2)).unwrap_err().code,
            crate::error::ErrorCode::Conflict
        );
    }

    #[test]
    fn gateway_checks() {
        assert!(Pool::new(net("10.77.0.0/24"), Ipv4Addr::new(10, 78, 0, 1)).is_err());
        assert!(Pool::new(net("10.77.0.0/24"), Ipv4Addr::new(10, 77, 0, 255)).is_err());
        assert!(Pool::new(net("10.77.0.0/31"), Ipv4Addr::new(10, 77, 0, 1)).is_err());
    }

    #[test]
    fn next_subnet_skips_taken() {
        assert_eq!(
            next_free_subnet(&[net("172.17.0.0/16")]),
            Some(net("172.18.0.0/16"))
        );
        assert_eq!(
            next_free_subnet(&[net("172.17.0.0/16"), net("172.18.5.0/24")]),
            Some(net("172.19.0.0/16"))
        );
    }
}
