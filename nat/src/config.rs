//! Configuration and the small result types of the router's API.

use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;
use switchyard_switch::{DropReason, Duration, MacAddr, NetworkId};

use crate::conntrack::ConntrackConfig;

/// Router-wide settings. `Default` gives netfilter-like timeouts and a 262144-flow table.
#[derive(Clone, Copy, Debug)]
pub struct RouterConfig {
    pub conntrack: ConntrackConfig,
    /// ICMP errors (and RSTs) generated per second, token bucket refill (Linux: 1000).
    pub icmp_rate_per_sec: u32,
    /// Token bucket depth (Linux `icmp_msgs_burst`: 50).
    pub icmp_burst: u32,
    /// Masquerade source ports and ICMP ids come from here (inclusive; Linux's ephemeral range).
    pub port_range: (u16, u16),
    /// IP MTU of the uplink.
    pub uplink_mtu: usize,
    /// Non-first fragments are matched to their first fragment for this long (Linux ipfrag_time).
    pub frag_timeout: Duration,
    /// Datagrams whose fragments are tracked at once (oldest forgotten beyond it).
    pub frag_max: usize,
    /// Packets held per uplink next hop while its MAC is resolved.
    pub arp_hold: usize,
    /// Held packets are dropped when ARP got no answer within this.
    pub arp_timeout: Duration,
    /// Learned uplink neighbours are trusted this long, then resolved again.
    pub neighbor_ttl: Duration,
    /// Learned uplink neighbours kept at most.
    pub neighbor_max: usize,
    /// Seeds the conntrack hash and the port allocator's probe order (the daemon randomises it;
    /// replay keeps the default so runs are byte-identical).
    pub seed: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            conntrack: ConntrackConfig::default(),
            icmp_rate_per_sec: 1000,
            icmp_burst: 50,
            port_range: (32768, 60999),
            uplink_mtu: 1500,
            frag_timeout: Duration::from_secs(30),
            frag_max: 1024,
            arp_hold: 4,
            arp_timeout: Duration::from_secs(3),
            neighbor_ttl: Duration::from_secs(300),
            neighbor_max: 256,
            seed: 0x5317_c4a2_d00d_f00d,
        }
    }
}

/// One network's gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    pub id: NetworkId,
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway_ip: Ipv4Addr,
    pub gateway_mac: MacAddr,
    /// No route out and no NAT (Docker's `--internal`).
    pub internal: bool,
    /// IP MTU.
    pub mtu: usize,
}

/// The raw uplink's address and next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UplinkConfig {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: MacAddr,
    pub gateway: Option<Ipv4Addr>,
    /// When set, the gateway's MAC is never resolved with ARP.
    pub gateway_mac: Option<MacAddr>,
}

/// Transport protocol of a port forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// A published port (one per host port: the caller expands ranges).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PortForward {
    pub proto: Proto,
    /// `None`: the uplink address. An address that is not the uplink's never matches on the raw
    /// uplink.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub network: NetworkId,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
}

/// Receive metadata from the port backend.
#[derive(Default, Clone, Copy, Debug)]
pub struct RxMeta {
    /// The L4 checksum is not computed yet (offload): it is not verified, and it is completed
    /// in software on output.
    pub partial_csum: bool,
}

/// What the router did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Translated or routed, and sent on.
    Forwarded,
    /// Answered by the router: ARP reply, ICMP echo reply, ICMP error or RST.
    Answered,
    Dropped(DropReason),
    /// Taken without a reply: an ARP reply learned, a packet held for ARP.
    Consumed,
}

/// Configuration errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NatError {
    UnknownNetwork(NetworkId),
    NetworkExists(NetworkId),
    /// `NetworkId(u16::MAX)` names the uplink side internally.
    ReservedNetworkId(NetworkId),
    InvalidPrefix(u8),
    GatewayOutsideSubnet(Ipv4Addr),
    AddressOutsideSubnet(Ipv4Addr),
    ForwardExists(Proto, Option<Ipv4Addr>, u16),
    UnknownForward(Proto, Option<Ipv4Addr>, u16),
}

impl fmt::Display for NatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = |ip: &Option<Ipv4Addr>, port: &u16| match ip {
            Some(ip) => format!("{ip}:{port}"),
            None => format!("{port}"),
        };
        match self {
            NatError::UnknownNetwork(n) => write!(f, "no network with id {}", n.0),
            NatError::NetworkExists(n) => write!(f, "network id {} exists", n.0),
            NatError::ReservedNetworkId(n) => write!(f, "network id {} is reserved", n.0),
            NatError::InvalidPrefix(p) => write!(f, "invalid prefix length /{p}"),
            NatError::GatewayOutsideSubnet(ip) => write!(f, "gateway {ip} is outside the subnet"),
            NatError::AddressOutsideSubnet(ip) => write!(f, "address {ip} is outside the subnet"),
            NatError::ForwardExists(p, ip, port) => {
                write!(f, "{:?} port {} is already published", p, host(ip, port))
            }
            NatError::UnknownForward(p, ip, port) => {
                write!(f, "{:?} port {} is not published", p, host(ip, port))
            }
        }
    }
}

impl std::error::Error for NatError {}

/// True when `ip` is inside `net/prefix`.
pub(crate) fn in_subnet(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = mask(prefix);
    ip.to_bits() & mask == net.to_bits() & mask
}

pub(crate) fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}
