//! The topology file of `switchyard replay` (DESIGN.md §3): networks, endpoints, an optional
//! uplink and conntrack limit, in TOML. [`Topology::parse`] checks everything the daemon would
//! refuse (overlapping subnets, addresses outside their subnet, duplicate names, MACs and
//! published ports, bad specs) and reports it as one line; [`Topology::build`] turns it into the
//! [`Pipeline`] the daemon would have, through the same builder calls.
//!
//! ```toml
//! [uplink]                     # optional: without it there is no NAT path
//! addr = "192.0.2.10/24"
//! mac = "02:00:00:00:00:10"
//! gateway = "192.0.2.1"        # optional next hop
//! gateway_mac = "02:00:00:00:00:01"   # optional: without it the next hop is resolved by ARP
//! [[network]]
//! name = "mynet"
//! subnet = "10.77.0.0/24"
//! gateway = "10.77.0.1"
//! gateway_mac = "02:00:00:00:77:01"
//! internal = false             # optional
//! mtu = 1500                   # optional
//! [[endpoint]]
//! network = "mynet"
//! name = "c1"
//! mac = "02:00:00:00:77:02"
//! ip = "10.77.0.2"
//! publish = ["8080:80", "5353:53/udp"]   # optional, the -p grammar
//! [conntrack]
//! max = 262144                 # optional
//! ```
//! Ids are given in file order: network `i` (from 0) is `NetworkId(i + 1)` with router port
//! `PortId(i)`; endpoint `j` is port `PortId(networks + j)`.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::Deserialize;
use switchyard_nat::{NetworkConfig, PortForward, Proto as NatProto, RouterConfig, UplinkConfig};
use switchyard_switch::{Instant, MacAddr, NetworkId, PortId, SwitchConfig};

use crate::error::{Error, Result};
use crate::ipam::Ipv4Net;
use crate::pipeline::Pipeline;
use crate::spec::{PortMapping, Proto, PublishSpec};

/// The conntrack table size when the file gives none (the daemon's default too).
pub const DEFAULT_CONNTRACK_MAX: usize = 262_144;
/// A network's MTU when the file gives none.
pub const DEFAULT_MTU: u32 = 1500;
/// The port name of the uplink in captures and in replay's output.
pub const UPLINK_PORT: &str = "uplink";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    uplink: Option<UplinkToml>,
    #[serde(default)]
    network: Vec<NetworkToml>,
    #[serde(default)]
    endpoint: Vec<EndpointToml>,
    conntrack: Option<ConntrackToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UplinkToml {
    addr: String,
    mac: String,
    gateway: Option<String>,
    gateway_mac: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkToml {
    name: String,
    subnet: String,
    gateway: String,
    gateway_mac: String,
    #[serde(default)]
    internal: bool,
    mtu: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointToml {
    network: String,
    name: String,
    mac: String,
    ip: String,
    #[serde(default)]
    publish: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConntrackToml {
    max: i64,
}

/// The uplink: its address on its link, its MAC and next hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: MacAddr,
    pub gateway: Option<Ipv4Addr>,
    pub gateway_mac: Option<MacAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub id: NetworkId,
    pub router_port: PortId,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub gateway_mac: MacAddr,
    pub internal: bool,
    pub mtu: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    /// Index into [`Topology::networks`].
    pub network: usize,
    pub port: PortId,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// Published ports, expanded (one per host port; bare container ports got theirs from
    /// 32768 up, in file order, like the daemon's `-p`).
    pub publish: Vec<PortMapping>,
}

/// A checked topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub uplink: Option<Uplink>,
    pub networks: Vec<Network>,
    pub endpoints: Vec<Endpoint>,
    pub conntrack_max: usize,
}

fn mac(what: &str, s: &str) -> Result<MacAddr> {
    let m: MacAddr = s
        .parse()
        .map_err(|e| Error::invalid(format!("{what}: {e}")))?;
    if m.is_invalid_source() {
        return Err(Error::invalid(format!(
            "{what}: {m} is not a unicast address"
        )));
    }
    Ok(m)
}

fn ip(what: &str, s: &str) -> Result<Ipv4Addr> {
    s.parse()
        .map_err(|_| Error::invalid(format!("{what}: {s:?} is not an IPv4 address")))
}

/// `a.b.c.d/len`, host bits allowed (an interface address, not a subnet).
fn if_addr(what: &str, s: &str) -> Result<(Ipv4Addr, u8)> {
    s.split_once('/')
        .and_then(|(a, l)| Some((a.parse().ok()?, l.parse::<u8>().ok()?)))
        .filter(|(_, l)| (1..=32).contains(l))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{what}: {s:?} is not an address with a prefix (want e.g. 192.0.2.10/24)"
            ))
        })
}

/// Is `a` usable as a host address of `net` (not its network or broadcast address)?
fn host_of(net: &Ipv4Net, a: Ipv4Addr) -> bool {
    net.contains(a) && (net.prefix_len() >= 31 || (a != net.network() && a != net.broadcast()))
}

/// One line from a TOML error: its message and where it is.
fn toml_error(text: &str, e: &toml::de::Error) -> Error {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text.as_bytes()[..start]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            Error::invalid(format!("line {line}: {msg}"))
        }
        None => Error::invalid(msg),
    }
}

impl Topology {
    /// Read and check a topology file. Errors name the file.
    pub fn load(path: &Path) -> Result<Topology> {
        let ctx = || format!("topology {}", path.display());
        let bytes = std::fs::read(path).map_err(|e| Error::from(e).context(ctx()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::invalid("not UTF-8 text").context(ctx()))?;
        Topology::parse(&text).map_err(|e| e.context(ctx()))
    }

    /// Parse and check a topology.
    pub fn parse(text: &str) -> Result<Topology> {
        let f: FileToml = toml::from_str(text).map_err(|e| toml_error(text, &e))?;

        let uplink = match &f.uplink {
            None => None,
            Some(u) => {
                let (addr, prefix_len) = if_addr("uplink addr", &u.addr)?;
                let gateway = u
                    .gateway
                    .as_deref()
                    .map(|g| ip("uplink gateway", g))
                    .transpose()?;
                let gateway_mac = u
                    .gateway_mac
                    .as_deref()
                    .map(|m| mac("uplink gateway_mac", m))
                    .transpose()?;
                if gateway_mac.is_some() && gateway.is_none() {
                    return Err(Error::invalid(
                        "uplink: gateway_mac without a gateway address",
                    ));
                }
                Some(Uplink {
                    addr,
                    prefix_len,
                    mac: mac("uplink mac", &u.mac)?,
                    gateway,
                    gateway_mac,
                })
            }
        };
        let uplink_net = uplink.as_ref().map(|u| {
            let mask = Ipv4Net::new(Ipv4Addr::UNSPECIFIED, u.prefix_len)
                .map(|n| n.mask())
                .unwrap_or(0);
            Ipv4Net::new(Ipv4Addr::from(u32::from(u.addr) & mask), u.prefix_len)
                .expect("host bits cleared")
        });

        if f.network.len() >= usize::from(u16::MAX) - 1 {
            return Err(Error::invalid("too many networks"));
        }
        let mut networks: Vec<Network> = Vec::new();
        for (i, n) in f.network.iter().enumerate() {
            if n.name.is_empty() {
                return Err(Error::invalid(format!("network {}: empty name", i + 1)));
            }
            let what = |k: &str| format!("network {:?}: {k}", n.name);
            if networks.iter().any(|o| o.name == n.name) {
                return Err(Error::invalid(format!(
                    "network {:?} is defined twice",
                    n.name
                )));
            }
            let subnet: Ipv4Net = n
                .subnet
                .parse()
                .map_err(|e: Error| e.context(what("subnet")))?;
            if subnet.prefix_len() > 30 {
                return Err(Error::invalid(format!(
                    "{}: {subnet} is too small (at most /30)",
                    what("subnet")
                )));
            }
            if let Some(o) = networks.iter().find(|o| o.subnet.overlaps(&subnet)) {
                return Err(Error::invalid(format!(
                    "{}: {subnet} overlaps subnet {} of network {:?}",
                    what("subnet"),
                    o.subnet,
                    o.name
                )));
            }
            if let Some(up) = uplink_net.filter(|u| u.overlaps(&subnet)) {
                return Err(Error::invalid(format!(
                    "{}: {subnet} overlaps the uplink's subnet {up}",
                    what("subnet")
                )));
            }
            let gateway = ip(&what("gateway"), &n.gateway)?;
            if !host_of(&subnet, gateway) {
                return Err(Error::invalid(format!(
                    "{}: {gateway} is not a host address of {subnet}",
                    what("gateway")
                )));
            }
            let mtu = n.mtu.unwrap_or(DEFAULT_MTU);
            if !(68..=65520).contains(&mtu) {
                return Err(Error::invalid(format!(
                    "{}: {mtu} is out of range (68-65520)",
                    what("mtu")
                )));
            }
            networks.push(Network {
                name: n.name.clone(),
                id: NetworkId(i as u16 + 1),
                router_port: PortId(i as u32),
                subnet,
                gateway,
                gateway_mac: mac(&what("gateway_mac"), &n.gateway_mac)?,
                internal: n.internal,
                mtu,
            });
        }

        let mut endpoints: Vec<Endpoint> = Vec::new();
        let mut published: Vec<PortMapping> = Vec::new();
        let mut names = HashSet::new();
        for (j, e) in f.endpoint.iter().enumerate() {
            if e.name.is_empty() {
                return Err(Error::invalid(format!("endpoint {}: empty name", j + 1)));
            }
            let what = |k: &str| format!("endpoint {:?}: {k}", e.name);
            if e.name == UPLINK_PORT {
                return Err(Error::invalid(format!(
                    "endpoint {:?}: that name is the uplink's",
                    e.name
                )));
            }
            if !names.insert(e.name.as_str()) {
                return Err(Error::invalid(format!(
                    "endpoint {:?} is defined twice (names are unique across networks)",
                    e.name
                )));
            }
            let ni = networks
                .iter()
                .position(|n| n.name == e.network)
                .ok_or_else(|| {
                    Error::invalid(format!("{}: no network {:?}", what("network"), e.network))
                })?;
            let net = &networks[ni];
            let addr = ip(&what("ip"), &e.ip)?;
            if !host_of(&net.subnet, addr) || addr == net.gateway {
                return Err(Error::invalid(format!(
                    "{}: {addr} is not a free host address of {} ({})",
                    what("ip"),
                    net.name,
                    net.subnet
                )));
            }
            let emac = mac(&what("mac"), &e.mac)?;
            let same_net = endpoints.iter().filter(|o| o.network == ni);
            for o in same_net {
                if o.ip == addr {
                    return Err(Error::invalid(format!(
                        "{}: {addr} is taken by endpoint {:?}",
                        what("ip"),
                        o.name
                    )));
                }
                if o.mac == emac {
                    return Err(Error::invalid(format!(
                        "{}: {emac} is taken by endpoint {:?}",
                        what("mac"),
                        o.name
                    )));
                }
            }
            if emac == net.gateway_mac {
                return Err(Error::invalid(format!(
                    "{}: {emac} is the gateway's",
                    what("mac")
                )));
            }
            let mut publish = Vec::new();
            for s in &e.publish {
                let spec: PublishSpec = s.parse().map_err(|e: Error| e.context(what("publish")))?;
                let m = spec
                    .expand(|m| !published.iter().any(|o| o.collides(m)))
                    .map_err(|e| e.context(what("publish")))?;
                published.extend(m.iter().copied());
                publish.extend(m);
            }
            endpoints.push(Endpoint {
                name: e.name.clone(),
                network: ni,
                port: PortId((networks.len() + j) as u32),
                mac: emac,
                ip: addr,
                publish,
            });
        }

        let conntrack_max = match &f.conntrack {
            None => DEFAULT_CONNTRACK_MAX,
            Some(c) => usize::try_from(c.max)
                .ok()
                .filter(|&m| m >= 1)
                .ok_or_else(|| {
                    Error::invalid(format!("conntrack max: {} is not a positive size", c.max))
                })?,
        };
        Ok(Topology {
            uplink,
            networks,
            endpoints,
            conntrack_max,
        })
    }

    /// The endpoint named `name`.
    pub fn endpoint(&self, name: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// The router's configuration for this topology: defaults (with the fixed seed, so runs
    /// are reproducible) and the conntrack limit.
    pub fn router_config(&self) -> RouterConfig {
        let mut cfg = RouterConfig::default();
        cfg.conntrack.max = self.conntrack_max;
        cfg
    }

    /// The pipeline the daemon would run for this topology, built at time `now`.
    pub fn build(&self, now: Instant) -> Result<Pipeline> {
        let mut p = Pipeline::new(SwitchConfig::default(), self.router_config());
        if let Some(u) = &self.uplink {
            p.router.set_uplink(Some(UplinkConfig {
                addr: u.addr,
                prefix_len: u.prefix_len,
                mac: u.mac,
                gateway: u.gateway,
                gateway_mac: u.gateway_mac,
            }));
        }
        for n in &self.networks {
            let cfg = NetworkConfig {
                id: n.id,
                subnet: n.subnet.network(),
                prefix_len: n.subnet.prefix_len(),
                gateway_ip: n.gateway,
                gateway_mac: n.gateway_mac,
                internal: n.internal,
                mtu: n.mtu as usize,
            };
            p.add_network(cfg, n.router_port, now)
                .map_err(|e| e.context(format!("network {:?}", n.name)))?;
        }
        for e in &self.endpoints {
            let net = &self.networks[e.network];
            let forwards: Vec<PortForward> = e
                .publish
                .iter()
                .map(|m| PortForward {
                    proto: match m.proto {
                        Proto::Tcp => NatProto::Tcp,
                        Proto::Udp => NatProto::Udp,
                    },
                    host_ip: m.host_ip,
                    host_port: m.host_port,
                    network: net.id,
                    container_ip: e.ip,
                    container_port: m.container_port,
                })
                .collect();
            p.add_endpoint(e.port, net.id, e.ip, e.mac, &forwards, now)
                .map_err(|err| err.context(format!("endpoint {:?}", e.name)))?;
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[uplink]
addr = "192.0.2.10/24"
mac = "02:00:00:00:00:10"
gateway = "192.0.2.1"
gateway_mac = "02:00:00:00:00:01"
[[network]]
name = "mynet"
subnet = "10.77.0.0/24"
gateway = "10.77.0.1"
gateway_mac = "02:00:00:00:77:01"
[[network]]
name = "other"
subnet = "10.78.0.0/24"
gateway = "10.78.0.1"
gateway_mac = "02:00:00:00:78:01"
internal = true
mtu = 9000
[[endpoint]]
network = "mynet"
name = "c1"
mac = "02:00:00:00:77:02"
ip = "10.77.0.2"
publish = ["8080:80", "5353:53/udp", "90-91"]
[[endpoint]]
network = "other"
name = "c2"
mac = "02:00:00:00:77:02"
ip = "10.78.0.2"
[conntrack]
max = 10
"#;

    #[test]
    fn parses_every_key_with_defaults() {
        let t = Topology::parse(GOOD).unwrap();
        let u = t.uplink.as_ref().unwrap();
        assert_eq!((u.addr, u.prefix_len), (Ipv4Addr::new(192, 0, 2, 10), 24));
        assert_eq!(u.gateway_mac, Some("02:00:00:00:00:01".parse().unwrap()));
        assert_eq!(t.networks[0].mtu, 1500);
        assert!(!t.networks[0].internal);
        assert_eq!((t.networks[1].mtu, t.networks[1].internal), (9000, true));
        assert_eq!(t.networks[1].id, NetworkId(2));
        assert_eq!(t.endpoints[0].port, PortId(2));
        assert_eq!(t.endpoints[1].port, PortId(3));
        assert_eq!(t.conntrack_max, 10);
        let hp: Vec<(u16, u16, Proto)> = t.endpoints[0]
            .publish
            .iter()
            .map(|m| (m.host_port, m.container_port, m.proto))
            .collect();
        assert_eq!(
            hp,
            vec![
                (8080, 80, Proto::Tcp),
                (5353, 53, Proto::Udp),
                (32768, 90, Proto::Tcp),
                (32769, 91, Proto::Tcp)
            ]
        );
        let p = t.build(Instant::ZERO).unwrap();
        assert_eq!(p.router.forwards().len(), 4);
        assert_eq!(p.router_port(NetworkId(1)), Some(PortId(0)));
        assert_eq!(p.switch.port_mac(PortId(2)), Some(t.endpoints[0].mac));
    }

    #[test]
    fn minimal_file_has_defaults() {
        let t = Topology::parse("").unwrap();
        assert!(t.uplink.is_none() && t.networks.is_empty() && t.endpoints.is_empty());
        assert_eq!(t.conntrack_max, DEFAULT_CONNTRACK_MAX);
    }

    fn err(text: &str) -> String {
        let e = Topology::parse(text).unwrap_err().to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    fn with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    }

    #[test]
    fn rejects_what_the_daemon_would() {
        let cases = [
            (with("[uplink]", "[uplink"), "line 2"),
            (with("internal = true", "internl = true"), "unknown field"),
            (with("max = 10", "max = 0"), "conntrack max"),
            (with("max = 10", "max = \"x\""), "line"),
            (with("10.78.0.0/24", "10.77.0.128/25"), "overlaps"),
            (with("10.78.0.0/24", "192.0.2.0/28"), "uplink's subnet"),
            (with("10.78.0.0/24", "10.78.0.1/24"), "host bits"),
            (
                with("ip = \"10.78.0.2\"", "ip = \"10.77.0.3\""),
                "not a free host",
            ),
            (
                with("ip = \"10.78.0.2\"", "ip = \"10.78.0.1\""),
                "not a free host",
            ),
            (
                with("ip = \"10.78.0.2\"", "ip = \"10.78.0.255\""),
                "not a free host",
            ),
            (with("name = \"c2\"", "name = \"c1\""), "defined twice"),
            (with("name = \"c2\"", "name = \"uplink\""), "uplink"),
            (
                with("name = \"other\"", "name = \"mynet\""),
                "defined twice",
            ),
            (
                with("network = \"other\"", "network = \"nope\""),
                "no network",
            ),
            (with("02:00:00:00:77:01", "02:00:00:00:77"), "invalid MAC"),
            (
                with("02:00:00:00:77:01", "ff:ff:ff:ff:ff:ff"),
                "not a unicast",
            ),
            (with("\"8080:80\"", "\"8080:80/sctp\""), "publish"),
            (with("\"5353:53/udp\"", "\"8080:81\""), "already published"),
            (with("mtu = 9000", "mtu = 65521"), "mtu"),
            (
                with("gateway = \"10.78.0.1\"", "gateway = \"10.77.0.1\""),
                "gateway",
            ),
            (
                with("addr = \"192.0.2.10/24\"", "addr = \"192.0.2.10\""),
                "uplink addr",
            ),
            (with("gateway = \"192.0.2.1\"\n", ""), "gateway_mac without"),
            (with("mtu = 9000", "mtu = 9000\nmtu = 1"), "line"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn same_mac_in_one_network_is_refused() {
        let text = with("ip = \"10.78.0.2\"", "ip = \"10.77.0.9\"").replacen(
            "network = \"other\"",
            "network = \"mynet\"",
            1,
        );
        assert!(err(&text).contains("taken by endpoint \"c1\""));
    }
}
