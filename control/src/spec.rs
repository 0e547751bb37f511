//! Publish specs, parsed like Docker's `-p`:
//! `[HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]`, or `CONTAINER_PORT[-END][/proto]`
//! alone, which takes free host ports from 32768-60999 (like `docker -P`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// First and last host port handed out for a bare `CONTAINER_PORT` spec.
pub const EPHEMERAL_PORTS: (u16, u16) = (32768, 60999);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A parsed `-p` spec. Host ports are `None` for a bare container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishSpec {
    pub host_ip: Option<Ipv4Addr>,
    pub host_ports: Option<(u16, u16)>,
    pub container_ports: (u16, u16),
    pub proto: Proto,
}

/// One published port, after ranges are expanded and free ports chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortMapping {
    pub proto: Proto,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
}

impl PortMapping {
    /// Two mappings collide when they share protocol and host port and their host IPs can
    /// overlap (an unbound one overlaps every address).
    pub fn collides(&self, other: &PortMapping) -> bool {
        self.proto == other.proto
            && self.host_port == other.host_port
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }
}

impl fmt::Display for PortMapping {
    /// `docker port` style: `80/tcp -> 0.0.0.0:8080`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        write!(
            f,
            "{}/{} -> {}:{}",
            self.container_port, self.proto, ip, self.host_port
        )
    }
}

fn port_range(s: &str, whole: &str) -> Result<(u16, u16)> {
    let bad = |why: &str| Error::invalid(format!("invalid port spec {whole:?}: {why}"));
    let one = |p: &str| -> Result<u16> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad(&format!("{p:?} is not a port (1-65535)"))),
            Ok(n) => Ok(n),
        }
    };
    match s.split_once('-') {
        None => {
            let p = one(s)?;
            Ok((p, p))
        }
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            if a > b {
                return Err(bad("range end is before its start"));
            }
            Ok((a, b))
        }
    }
}

impl FromStr for PublishSpec {
    type Err = Error;
    fn from_str(whole: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid(format!("invalid port spec {whole:?}: {why}"));
        let (rest, proto) = match whole.rsplit_once('/') {
            Some((r, "tcp")) => (r, Proto::Tcp),
            Some((r, "udp")) => (r, Proto::Udp),
            Some((_, p)) => return Err(bad(&format!("unknown protocol {p:?} (tcp or udp)"))),
            None => (whole, Proto::Tcp),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let (host_ip, host, cont) = match parts.as_slice() {
            [c] => (None, None, *c),
            [h, c] => (None, Some(*h), *c),
            [ip, h, c] => {
                let ip: Ipv4Addr = ip
                    .parse()
                    .map_err(|_| bad(&format!("{ip:?} is not an IPv4 address")))?;
                let ip = (!ip.is_unspecified()).then_some(ip);
                (ip, if h.is_empty() { None } else { Some(*h) }, *c)
            }
            _ => return Err(bad("want [HOST_IP:]HOST_PORT:CONTAINER_PORT[/PROTO]")),
        };
        let container_ports = port_range(cont, whole)?;
        let host_ports = host.map(|h| port_range(h, whole)).transpose()?;
        if let Some((a, b)) = host_ports {
            if b - a != container_ports.1 - container_ports.0 {
                return Err(bad("host and container port ranges differ in length"));
            }
        }
        Ok(PublishSpec {
            host_ip,
            host_ports,
            container_ports,
            proto,
        })
    }
}

impl PublishSpec {
    /// Expand into one mapping per port. A bare container port takes the first free host ports
    /// from [`EPHEMERAL_PORTS`], where `is_free` says whether a mapping would collide.
    pub fn expand(&self, is_free: impl Fn(&PortMapping) -> bool) -> Result<Vec<PortMapping>> {
        let n = self.container_ports.1 - self.container_ports.0;
        let mk = |host_port: u16, i: u16| PortMapping {
            proto: self.proto,
            host_ip: self.host_ip,
            host_port,
            container_port: self.container_ports.0 + i,
        };
        if let Some((h, _)) = self.host_ports {
            let v: Vec<_> = (0..=n).map(|i| mk(h + i, i)).collect();
            if let Some(m) = v.iter().find(|m| !is_free(m)) {
                return Err(Error::conflict(format!(
                    "host port {}/{} is already published",
                    m.host_port, m.proto
                )));
            }
            return Ok(v);
        }
        let mut v = Vec::new();
        let mut next = EPHEMERAL_PORTS.0;
        for i in 0..=n {
            loop {
                if next > EPHEMERAL_PORTS.1 {
                    return Err(Error::exhausted("no free host port left in 32768-60999"));
                }
                let m = mk(next, i);
                next += 1;
                if is_free(&m) && !v.iter().any(|o: &PortMapping| o.collides(&m)) {
                    v.push(m);
                    break;
                }
            }
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PublishSpec {
        s.parse().unwrap()
    }

    #[test]
    fn docker_forms() {
        assert_eq!(
            p("8080:80"),
            PublishSpec {
                host_ip: None,
                host_ports: Some((8080, 8080)),
                container_ports: (80, 80),
                proto: Proto::Tcp
            }
        );
        assert_eq!(p("5353:53/udp").proto, Proto::Udp);
        let s = p("127.0.0.1:9000-9002:90-92/tcp");
        assert_eq!(s.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(s.host_ports, Some((9000, 9002)));
        assert_eq!(s.container_ports, (90, 92));
        assert_eq!(p("80").host_ports, None);
        assert_eq!(p("0.0.0.0:8080:80").host_ip, None);
        assert_eq!(p("127.0.0.1::80").host_ports, None);
        for bad in [
            "",
            "x",
            "0:80",
            "80:0",
            "70000:80",
            "1-3:1-2",
            "5-1:5-1",
            "8080:80/sctp",
            "1:2:3:4",
            "a.b.c.d:1:2",
            "80/",
        ] {
            assert!(bad.parse::<PublishSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn expand_ranges_and_ephemeral() {
        let v = p("9000-9001:90-91").expand(|_| true).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v[1].host_port, v[1].container_port), (9001, 91));
        let taken = PortMapping {
            proto: Proto::Tcp,
            host_ip: None,
            host_port: 32768,
            container_port: 1,
        };
        let v = p("80-81").expand(|m| !m.collides(&taken)).unwrap();
        assert_eq!(
            v.iter().map(|m| m.host_port).collect::<Vec<_>>(),
            vec![32769, 32770]
        );
        let err = p("9000:90").expand(|_| false).unwrap_err();
        assert_eq!(err.code, crate::error::ErrorCode::Conflict);
    }

    #[test]
    fn collisions_respect_ip_and_proto() {
        let a = PortMapping {
            proto: Proto::Tcp,
            host_ip: None,
            host_port: 80,
            container_port: 80,
        };
        let b = PortMapping {
            host_ip: Some(Ipv4Addr::LOCALHOST),
            ..a
        };
        let c = PortMapping {
            proto: Proto::Udp,
            ..a
        };
        let d = PortMapping {
            host_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..b
        };
        assert!(a.collides(&b));
        assert!(!a.collides(&c));
        assert!(!b.collides(&d));
        assert_eq!(a.to_string(), "80/tcp -> 0.0.0.0:80");
    }
}
