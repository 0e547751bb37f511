//! NAT counters and the conntrack listing, both `Serialize` for `switchyard stats` and
//! `switchyard conntrack --json`.

use std::net::Ipv4Addr;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use switchyard_switch::{DropReason, Duration};

use crate::conntrack::{Conn, Kind, Tuple, L4};

/// Router counters. A packet the router refused is counted once under its reason in `drops`,
/// also when an ICMP error or RST was sent back about it (its verdict is then `Answered`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NatCounters {
    #[serde(serialize_with = "drops_by_name")]
    pub drops: [u64; DropReason::COUNT],
    pub flows_created: u64,
    pub flows_expired: u64,
    /// Unassured flows evicted to make room for new ones.
    pub flows_evicted: u64,
    /// Flows removed by configuration (network, endpoint, forward or uplink removed).
    pub flows_removed: u64,
    /// New flows refused because the table was full of assured flows.
    pub table_full: u64,
    /// Packets translated towards the uplink.
    pub translated_out: u64,
    /// Packets translated from the uplink into a network.
    pub translated_in: u64,
    /// Packets translated from a network back into the same network (hairpin).
    pub hairpinned: u64,
    /// TCP GSO super-frames translated whole (their segments are counted above too).
    pub gso_translated: u64,
    pub fragments_translated: u64,
    pub icmp_errors_sent: u64,
    pub icmp_errors_translated: u64,
    pub icmp_rate_limited: u64,
    pub echo_replies: u64,
    pub resets_sent: u64,
    pub arp_replies: u64,
    pub arp_requests: u64,
    pub held_for_arp: u64,
    pub ports_exhausted: u64,
    /// Packets handed to the host-socket uplink (host mode).
    pub host_out: u64,
    /// Packets the host-socket uplink injected into a network.
    pub host_in: u64,
}

impl NatCounters {
    pub fn drop(&mut self, r: DropReason) {
        self.drops[r.index()] += 1;
    }
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }
}

fn drops_by_name<S: Serializer>(d: &[u64; DropReason::COUNT], s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(DropReason::COUNT))?;
    for r in DropReason::ALL {
        m.serialize_entry(r.as_str(), &d[r.index()])?;
    }
    m.end()
}

/// One direction of a listed connection. ICMP echo shows its `id`, TCP/UDP their ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TupleInfo {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u16>,
}

impl From<&Tuple> for TupleInfo {
    fn from(t: &Tuple) -> Self {
        let icmp = t.proto == L4::Icmp;
        TupleInfo {
            src: t.src,
            dst: t.dst,
            sport: (!icmp).then_some(t.sport),
            dport: (!icmp).then_some(t.dport),
            id: icmp.then_some(t.sport | t.dport),
        }
    }
}

/// A tracked connection as `switchyard conntrack` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnInfo {
    /// "tcp", "udp" or "icmp".
    pub proto: &'static str,
    /// As the first packet arrived.
    pub original: TupleInfo,
    /// As replies arrive.
    pub reply: TupleInfo,
    /// TCP state (SYN_SENT ... CLOSE), or UNREPLIED / ASSURED for UDP, ICMP for echo.
    pub state: &'static str,
    /// Seconds until it expires unless refreshed (rounded up).
    pub timeout: u64,
    /// The network id the connection belongs to.
    pub network: u16,
    /// "snat", "dnat" or "hairpin".
    pub kind: &'static str,
    pub assured: bool,
}

impl ConnInfo {
    pub(crate) fn new(c: &Conn, left: Duration) -> Self {
        ConnInfo {
            proto: c.tuple[0].proto.as_str(),
            original: (&c.tuple[0]).into(),
            reply: (&c.tuple[1]).into(),
            state: c.state.as_str(),
            timeout: left.total_micros().div_ceil(1_000_000),
            network: c.network.0,
            kind: match c.kind() {
                Kind::Snat => "snat",
                Kind::Dnat => "dnat",
                Kind::Hairpin => "hairpin",
            },
            assured: c.is_assured(),
        }
    }
}
