//! Port and network identities, and per-port counters keyed by drop reason.

use serde::Serialize;

/// A port of the switch. Ids are small and dense so per-port state lives in a `Vec`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize)]
pub struct PortId(pub u32);

/// A network (an isolated L2 domain). 16 bits: it shares a u64 key with a MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize)]
pub struct NetworkId(pub u16);

/// What sits behind a port.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortKind {
    /// A container endpoint (tap or veth).
    Endpoint,
    /// The network's gateway: frames for it go to the router (ARP, ICMP, NAT).
    Router,
}

/// Why a frame was dropped. One counter each, like Firecracker's per-reason metrics.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    Runt,
    /// Longer than the network MTU plus the Ethernet header and one VLAN tag.
    Oversize,
    /// Source MAC is multicast/broadcast or all zeros.
    InvalidSourceMac,
    /// Source MAC is not the one assigned to the port (anti-spoofing on).
    SpoofedSourceMac,
    /// Source MAC is a static entry that belongs to another port.
    StaticMacConflict,
    /// Frame arrived on a port the switch does not know (removed meanwhile).
    UnknownPort,
    /// The egress port's queue or fd refused the frame.
    TxFailed,
    /// Frame addressed to the sending port itself (it never goes back out).
    Hairpin,
    /// The router could not parse or would not route the packet.
    Malformed,
    /// IPv4 header or TCP/UDP/ICMP checksum wrong.
    BadChecksum,
    /// Routing between two networks is not allowed (Docker's isolation).
    InterNetwork,
    /// Outbound traffic on an internal network, or no uplink.
    NoRoute,
    /// Traffic from outside for a private address, or nothing mapped for it.
    NotForUs,
    /// TTL ran out.
    TtlExceeded,
    /// Conntrack table full.
    TableFull,
    /// Anything the router did not handle (unsupported protocol).
    Unsupported,
    /// No free NAT port (or ICMP id) for a new flow.
    PortsExhausted,
    /// A TCP segment that neither belongs to a tracked connection nor may start one.
    InvalidState,
    /// A non-first IPv4 fragment whose first fragment was not seen (or timed out).
    Fragment,
    /// The uplink next hop did not answer ARP (or its hold queue was full).
    NoNeighbor,
}

impl DropReason {
    pub const ALL: [DropReason; 20] = [
        DropReason::Runt,
        DropReason::Oversize,
        DropReason::InvalidSourceMac,
        DropReason::SpoofedSourceMac,
        DropReason::StaticMacConflict,
        DropReason::UnknownPort,
        DropReason::TxFailed,
        DropReason::Hairpin,
        DropReason::Malformed,
        DropReason::BadChecksum,
        DropReason::InterNetwork,
        DropReason::NoRoute,
        DropReason::NotForUs,
        DropReason::TtlExceeded,
        DropReason::TableFull,
        DropReason::Unsupported,
        DropReason::PortsExhausted,
        DropReason::InvalidState,
        DropReason::Fragment,
        DropReason::NoNeighbor,
    ];
    pub const COUNT: usize = Self::ALL.len();

    pub fn index(self) -> usize {
        self as usize
    }

    /// The snake_case name used in `stats` and replay verdicts.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::Oversize => "oversize",
            DropReason::InvalidSourceMac => "invalid_source_mac",
            DropReason::SpoofedSourceMac => "spoofed_source_mac",
            DropReason::StaticMacConflict => "static_mac_conflict",
            DropReason::UnknownPort => "unknown_port",
            DropReason::TxFailed => "tx_failed",
            DropReason::Hairpin => "hairpin",
            DropReason::Malformed => "malformed",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::InterNetwork => "inter_network",
            DropReason::NoRoute => "no_route",
            DropReason::NotForUs => "not_for_us",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::TableFull => "table_full",
            DropReason::Unsupported => "unsupported",
            DropReason::PortsExhausted => "ports_exhausted",
            DropReason::InvalidState => "invalid_state",
            DropReason::Fragment => "fragment",
            DropReason::NoNeighbor => "no_neighbor",
        }
    }
}

/// Per-port traffic counters. `rx_*` count every frame the port delivered to the switch,
/// `tx_*` every frame written out of it; each dropped frame is counted once, under its reason,
/// on the port it arrived on (or, for `TxFailed`, the port that refused it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: [u64; DropReason::COUNT],
    /// Source MACs not learned because the table or the port's learning limit was full
    /// (the frame is still forwarded, like the Linux bridge).
    pub learn_refused: u64,
}

impl PortCounters {
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Non-zero drop counters by name.
    pub fn drops_by_reason(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.drops[r.index()]))
            .filter(|(_, n)| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_slot() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut c = PortCounters::default();
        c.drop(DropReason::Oversize);
        c.drop(DropReason::Oversize);
        c.drop(DropReason::Runt);
        assert_eq!(c.dropped(DropReason::Oversize), 2);
        assert_eq!(c.total_drops(), 3);
        let v: Vec<_> = c.drops_by_reason().collect();
        assert_eq!(v, vec![(DropReason::Runt, 1), (DropReason::Oversize, 2)]);
    }
}
