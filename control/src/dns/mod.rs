//! The embedded DNS server, served at the gateway address of each network (Docker's embedded
//! DNS: containers on a user-defined network find each other by name).
//!
//! ```text
//!  container ──UDP──► gateway_ip:53 ──► Pipeline (intercepts before the router)
//!                                          │ DnsServer::handle_query(now, net, ...)
//!                                          ├─ the asker's network's names: A / PTR / NODATA
//!                                          ├─ cache hit: the cached answer, TTLs aged
//!                                          └─ forward: new id + port, pending table
//!                                                 │ raw uplink: UDP from the uplink address
//!                                                 │ otherwise: a host UDP socket (dataplane)
//!  container ◄──UDP── gateway_ip:53 ◄── reply ◄───┘ DnsServer::handle_upstream / expire
//! ```
//! - [`table`]: names per network (a name on another network is not visible).
//! - [`server`]: the pure core (time is an argument; fuzzed in `fuzz/fuzz_targets/dns.rs`).
//! - [`packet`]: UDP/IPv4 framing around it.
//! - [`tcp`]: DNS over TCP at the same gateways (RFC 7766), one smoltcp socket per
//!   connection; complete queries go to the same core, answers come back by connection id.
//! - [`upstream_tcp`]: DNS over TCP toward an upstream whose UDP answer came truncated.
//!
//! Answers that do not fit a datagram go out with TC set; the client's TCP retry gets them
//! whole. An upstream's truncated UDP answer is asked again over TCP (from the uplink address
//! with the raw uplink, through a host TCP socket otherwise); the whole answer is cached, so
//! the client's own TCP retry at the gateway is answered from the cache.

#[cfg(test)]
mod core_tests;
pub mod packet;
#[cfg(test)]
mod pipeline_tests;
pub mod server;
pub mod table;
pub mod tcp;
#[cfg(test)]
mod tcp_tests;
pub mod upstream_tcp;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

pub use server::{DnsConfig, DnsCounters, DnsServer, Output, Transport};
pub use table::{normalize, Names, NetInfo, Reverse};
pub use tcp::{DnsTcp, TcpConfig, TcpCounters, TcpQuery};
pub use upstream_tcp::{Exchange, UpstreamTcp, UpstreamTcpCounters};

/// The nameservers of a resolv.conf text (IPv4 only: the dataplane forwards over IPv4).
pub fn parse_resolv_conf(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.parse().ok())
        })
        .collect()
}

/// The host's upstream resolvers: `/etc/resolv.conf`, or systemd-resolved's real upstreams
/// when the file names only its local stub (127.0.0.53), as Docker does.
pub fn host_upstreams() -> Vec<Ipv4Addr> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|t| parse_resolv_conf(&t))
            .unwrap_or_default()
    };
    let main = read("/etc/resolv.conf");
    if !main.is_empty() && main.iter().all(Ipv4Addr::is_loopback) {
        let real = read("/run/systemd/resolve/resolv.conf");
        if !real.is_empty() {
            return real;
        }
    }
    main
}

/// Upstream socket addresses from `--dns` (or the host's), port 53.
pub fn upstream_addrs(ips: &[Ipv4Addr]) -> Vec<SocketAddrV4> {
    ips.iter().map(|ip| SocketAddrV4::new(*ip, 53)).collect()
}

/// The resolv.conf a container on a network with gateway `gateway` gets.
pub fn container_resolv_conf(gateway: Ipv4Addr, search: &[String]) -> String {
    let mut s = format!(
        "# written by switchyard: the network's embedded DNS server\nnameserver {gateway}\n"
    );
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    s.push_str("options ndots:0\n");
    s
}

/// `/etc/netns/NAME/resolv.conf` for a namespace at `/run/netns/NAME` (`ip netns exec`
/// bind-mounts it over /etc/resolv.conf); `None` for any other path.
pub fn netns_resolv_path(netns: &str) -> Option<std::path::PathBuf> {
    let name = Path::new(netns)
        .strip_prefix("/run/netns")
        .or_else(|_| Path::new(netns).strip_prefix("/var/run/netns"))
        .ok()?;
    let n = name.to_str()?;
    if n.is_empty() || n.contains('/') || n == "." || n == ".." {
        return None;
    }
    Some(Path::new("/etc/netns").join(n).join("resolv.conf"))
}

/// First line of the resolv.conf files we write: only files with it are ever replaced or
/// removed.
const OURS: &str = "# written by switchyard";

/// Write `/etc/netns/NAME/resolv.conf` for an endpoint in `/run/netns/NAME` on a network whose
/// DNS server is `gateway`. A file someone else wrote is left alone; returns whether ours is
/// there now.
pub fn write_netns_resolv(netns: &str, gateway: Ipv4Addr, search: &[String]) -> bool {
    let Some(path) = netns_resolv_path(netns) else {
        return false;
    };
    if let Ok(old) = std::fs::read_to_string(&path) {
        if !old.starts_with(OURS) {
            return false;
        }
        if parse_resolv_conf(&old)
            .first()
            .is_some_and(|g| *g != gateway)
        {
            // Already pointed at the first DNS network's gateway: keep it.
            return true;
        }
    }
    let write = || -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("/etc/netns"));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(".resolv.conf.switchyard");
        std::fs::write(&tmp, container_resolv_conf(gateway, search))?;
        std::fs::rename(&tmp, &path)
    };
    match write() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(path = %path.display(), "writing resolv.conf: {e}");
            false
        }
    }
}

/// Remove the file [`write_netns_resolv`] wrote for `netns` if it names `gateway` (and its
/// directory, when that is empty then).
pub fn remove_netns_resolv(netns: &str, gateway: Ipv4Addr) {
    let Some(path) = netns_resolv_path(netns) else {
        return;
    };
    let Ok(old) = std::fs::read_to_string(&path) else {
        return;
    };
    if old.starts_with(OURS) && parse_resolv_conf(&old).first() == Some(&gateway) {
        let _ = std::fs::remove_file(&path);
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_round_trip() {
        let t = "# x\nsearch a.b\nnameserver 192.0.2.53\nnameserver ::1\nnameserver 198.51.100.1 # c\noptions edns0\n";
        assert_eq!(
            parse_resolv_conf(t),
            vec![Ipv4Addr::new(192, 0, 2, 53), Ipv4Addr::new(198, 51, 100, 1)]
        );
        let c = container_resolv_conf(
            Ipv4Addr::new(10, 9, 0, 1),
            &["corp.test".into(), "lab.test".into()],
        );
        assert_eq!(parse_resolv_conf(&c), vec![Ipv4Addr::new(10, 9, 0, 1)]);
        assert!(c.contains("search corp.test lab.test\n"));
        assert!(!container_resolv_conf(Ipv4Addr::new(10, 9, 0, 1), &[]).contains("search"));
    }

    #[test]
    fn netns_paths() {
        assert_eq!(
            netns_resolv_path("/run/netns/c1"),
            Some("/etc/netns/c1/resolv.conf".into())
        );
        assert_eq!(netns_resolv_path("/proc/12/ns/net"), None);
        assert_eq!(netns_resolv_path("/run/netns/../x"), None);
        assert_eq!(netns_resolv_path("/run/netns/"), None);
    }
}
