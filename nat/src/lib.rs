//! switchyard's gateway and connection-tracking NAT. Pure logic: time is an argument, output
//! goes into a reusable [`Emits`]; no I/O, no clock, no threads, no panics on any input.
//!
//! ```text
//!  handle_from_network(net, frame)            handle_from_uplink(frame)
//!      │ size, ARP for the gateway                │ size, ARP for the uplink address / next hop
//!      │ IPv4 header + L4 checksum checks         │ IPv4 header + L4 checksum checks
//!      ├─ to the gateway: echo, RST, unreachable  ├─ not our address: dropped (not_for_us)
//!      ├─ other network: dropped (inter_network)  ├─ later fragment ─► frag note ─┐
//!      ├─ later fragment ─► frag note ──────┐     ├─ ICMP error ─► embedded tuple ┤
//!      ├─ ICMP error ─► embedded tuple ─────┤     ├─ conntrack hit ───────────────┤
//!      ├─ conntrack hit ────────────────────┤     ├─ echo request: answered       │
//!      ├─ to the uplink address: hairpin    │     └─ published port: DNAT ────────┤
//!      └─ new flow: masquerade (SNAT) ──────┤                                     │
//!                                           ▼                                     ▼
//!        Router::forward: TTL, next hop (endpoint MAC | uplink neighbour), MTU, conntrack
//!        state, rewrite to the connection's other tuple (RFC 1624 checksums) ─► Emits
//! ```
//! Conntrack ([`conntrack`]) keys each connection by both of its tuples, each in its zone (a
//! network id or the uplink), so SNAT, DNAT and hairpin are one mechanism: a packet matching
//! tuple `t[d]` leaves as `t[other(d)].inverse()`.
//!
//! TCP GSO super-frames (64 KB from a TSO sender or GRO, with a virtio-net header) of
//! established flows are translated whole ([`Router::handle_gso_from_network`],
//! [`Router::handle_gso_from_uplink`]) and emitted with their header, their TCP checksum left
//! partial; the caller cuts whatever those refuse and feeds the segments to the entry points
//! above.
//!
//! Fragments are translated, not reassembled ([`frag`]); an egress MTU smaller than a packet
//! gets ICMP fragmentation-needed when DF is set and a drop (`oversize`) otherwise: the router
//! never fragments. IPv6 has room in the types ([`conntrack::IpAddress`], generic tuples) but is
//! not implemented.

#![deny(unsafe_code)]

pub mod checksum;
mod config;
pub mod conntrack;
mod counters;
mod dnat;
mod emit;
mod fast;
pub mod frag;
mod gateway;
mod host;
#[allow(unsafe_code)]
mod hugepages;
mod icmp;
mod local;
mod packet;
pub mod ports;
#[allow(unsafe_code)]
mod prefetch;
mod router;
mod snat;

pub use config::{
    NatError, NetworkConfig, PortForward, Proto, RouterConfig, RxMeta, UplinkConfig, Verdict,
};
pub use conntrack::ConntrackConfig;
pub use counters::{ConnInfo, NatCounters, TupleInfo};
pub use emit::{Egress, Emits};
pub use router::Router;

#[cfg(test)]
mod tests;
