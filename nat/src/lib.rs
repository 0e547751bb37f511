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
//! Fragments are translated, not reassembled ([`frag`]); an egress MTU smaller than a packet
//! gets ICMP fragmentation-needed when DF is set and a drop (`oversize`) otherwise: the router
//! never fragments. IPv6 has room in the types ([`conntrack::IpAddress`], generic tuples) but is
//! not implemented.

#![forbid(unsafe_code)]

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
mod icmp;
mod local;
mod packet;
pub mod ports;
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
