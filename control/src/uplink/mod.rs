//! How traffic leaves a network. The raw uplink (AF_PACKET on an interface the daemon owns) is
//! packet-level NAT inside the router; the socket uplink ([`socket`]) terminates flows in
//! userspace and relays them over host sockets, which needs no privilege.

pub mod socket;
mod tcp;
pub mod wire;

pub use socket::{SocketCounters, SocketUplink, SocketUplinkConfig, TOKEN_BASE};
