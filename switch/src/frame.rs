//! Ethernet addresses and the few header fields the switch reads.
//!
//! Deeper parsing (ARP, IPv4, ICMP, TCP, UDP) reuses `smoltcp::wire` views in the gateway; the
//! switch only needs the two addresses, read from a slice whose length was checked once.

use std::fmt;
use std::str::FromStr;

/// Length of an Ethernet II header (no VLAN tag).
pub const ETH_HEADER_LEN: usize = 14;
/// Bytes a frame may carry on top of the network MTU: the Ethernet header plus one VLAN tag.
pub const ETH_OVERHEAD: usize = 18;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// Group bit set: broadcast and multicast destinations are flooded.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// A source address no station may use: a group address or all zeros.
    pub fn is_invalid_source(&self) -> bool {
        self.is_multicast() || self.is_zero()
    }

    /// The address as the low 48 bits of a u64, last octet lowest (the octets that vary most
    /// between stations end up in the low bits, which the MAC table's hash relies on).
    pub fn to_u64(self) -> u64 {
        let b = self.0;
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    pub fn from_u64(v: u64) -> MacAddr {
        let b = v.to_be_bytes();
        MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    /// A locally administered unicast address derived from `seed` (stable per endpoint).
    pub fn local_from_seed(seed: u64) -> MacAddr {
        // splitmix64 spreads nearby seeds over the whole space.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let mut m = MacAddr::from_u64(z);
        m.0[0] = (m.0[0] & 0xfc) | 0x02;
        m
    }

    /// Destination address of `frame`, if it holds a full header.
    pub fn dst_of(frame: &[u8]) -> Option<MacAddr> {
        frame
            .get(0..6)
            .map(|b| MacAddr(b.try_into().expect("6 bytes")))
    }

    /// Source address of `frame`, if it holds a full header.
    pub fn src_of(frame: &[u8]) -> Option<MacAddr> {
        frame
            .get(6..12)
            .map(|b| MacAddr(b.try_into().expect("6 bytes")))
    }
}

impl From<smoltcp::wire::EthernetAddress> for MacAddr {
    fn from(a: smoltcp::wire::EthernetAddress) -> Self {
        MacAddr(a.0)
    }
}

impl From<MacAddr> for smoltcp::wire::EthernetAddress {
    fn from(a: MacAddr) -> Self {
        smoltcp::wire::EthernetAddress(a.0)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error for a MAC address that is not six hex octets separated by ':' or '-'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseMacError(pub String);

impl fmt::Display for ParseMacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid MAC address {:?} (want six hex octets like 02:42:ac:11:00:02)",
            self.0
        )
    }
}

impl std::error::Error for ParseMacError {}

impl FromStr for MacAddr {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_string());
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(err());
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(parts) {
            if p.is_empty() || p.len() > 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        Ok(MacAddr(out))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let m: MacAddr = "02:42:AC:11:00:02".parse().unwrap();
        assert_eq!(m.0, [0x02, 0x42, 0xac, 0x11, 0x00, 0x02]);
        assert_eq!(m.to_string(), "02:42:ac:11:00:02");
        assert_eq!("02-42-ac-11-00-02".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "0g:00:00:00:00:00",
            "002:0:0:0:0:0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn u64_round_trip_and_flags() {
        let m = MacAddr([1, 2, 3, 4, 5, 6]);
        assert_eq!(MacAddr::from_u64(m.to_u64()), m);
        assert!(m.is_multicast());
        assert!(MacAddr::BROADCAST.is_invalid_source());
        assert!(MacAddr::ZERO.is_invalid_source());
        let l = MacAddr::local_from_seed(7);
        assert!(!l.is_multicast() && l.0[0] & 0x02 != 0);
        assert_ne!(l, MacAddr::local_from_seed(8));
    }

    #[test]
    fn header_accessors_check_length() {
        assert_eq!(MacAddr::dst_of(&[0; 5]), None);
        assert_eq!(MacAddr::src_of(&[0; 11]), None);
        let f = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2];
        assert_eq!(MacAddr::src_of(&f), Some(MacAddr([2; 6])));
    }
}
