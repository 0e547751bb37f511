//! The kernel side of a container endpoint: a tap or a veth pair in the container's network
//! namespace, configured like `docker run` would (MAC, MTU, address, default route), with the
//! daemon's end (the tap fd, or an AF_PACKET socket on the host end of the veth) handed back.
//!
//! Every step has its own error variant, and a failure rolls back what was made: nothing is left
//! half-configured.
//!
//! Removing an endpoint:
//! - tap: drop the [`Tap`] (see [`remove_tap_endpoint`]). Closing the last fd of a non-persistent
//!   tap deletes the interface. Note the reverse too: while the daemon holds the tap fd, the
//!   container's network namespace stays alive, even after every process in it has exited; watch
//!   the container (pidfd, netns path) and drop the tap when it goes.
//! - veth: [`remove_veth`] with the host end's name; deleting one end deletes both. A veth whose
//!   namespace dies goes by itself, and the socket on the host end then reads `ENETDOWN`/nothing.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use switchyard_switch::backend::packet::PacketSocket;
use switchyard_switch::backend::tap::Tap;

use crate::netlink::{format_mac, Netlink, NetlinkError};
use crate::netns::{run_in, NetNs};

/// What the container side of an endpoint looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Interface name inside the container (`eth0`).
    pub ifname: String,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// Default route via this address; it must be inside `ip/prefix_len`.
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// A veth endpoint: the container end is configured in its namespace; the daemon drives the host
/// end through `socket`.
#[derive(Debug)]
pub struct VethEndpoint {
    pub socket: PacketSocket,
    pub host_ifname: String,
    pub host_ifindex: u32,
}

/// One failed plumbing step. Netlink errors already name their step and interface
/// (`netlink: add address 10.77.0.2/24 to eth0: File exists (os error 17)`).
#[derive(Debug, thiserror::Error)]
pub enum PlumbingError {
    #[error("invalid endpoint: {0}")]
    InvalidSpec(String),
    #[error("enter network namespace: {0}")]
    EnterNetns(#[source] io::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("interface name {ifname} is already in use in the container namespace")]
    IfnameBusy { ifname: String },
    #[error("interface name {ifname} is already in use in the daemon's namespace")]
    HostIfnameBusy { ifname: String },
    #[error("no free interface name {prefix}N in the container namespace")]
    NoFreeIfname { prefix: String },
    #[error("create tap {ifname}: {source}")]
    CreateTap {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    CreateVeth(NetlinkError),
    #[error(transparent)]
    SetMac(NetlinkError),
    #[error(transparent)]
    SetMtu(NetlinkError),
    #[error(transparent)]
    AddAddress(NetlinkError),
    #[error(transparent)]
    LinkUp(NetlinkError),
    /// Making the host end inert (`arp off`, `addrgenmode none`).
    #[error(transparent)]
    HostEnd(NetlinkError),
    #[error(transparent)]
    LoopbackUp(NetlinkError),
    #[error(transparent)]
    DefaultRoute(NetlinkError),
    #[error("turn off tx checksum offload on {ifname}: {source}")]
    TxChecksum {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("open AF_PACKET socket on {ifname}: {source}")]
    PacketSocket {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    RemoveVeth(NetlinkError),
}

pub type Result<T> = std::result::Result<T, PlumbingError>;

/// The loopback device has index 1 in every network namespace (whatever its name).
const LOOPBACK_IFINDEX: u32 = 1;

/// The first `{prefix}N` (N = 0, 1, ...) that names no interface in `ns`: `eth1` when `eth0`
/// exists.
pub fn first_free_ifname(ns: &NetNs, prefix: &str) -> Result<String> {
    let names = run_in(ns, || Netlink::open()?.link_names())
        .map_err(PlumbingError::EnterNetns)?
        .map_err(PlumbingError::Netlink)?;
    (0..10_000)
        .map(|n| format!("{prefix}{n}"))
        .take_while(|name| name.len() < libc::IFNAMSIZ)
        .find(|name| !names.contains(name))
        .ok_or_else(|| PlumbingError::NoFreeIfname {
            prefix: prefix.to_string(),
        })
}

/// Creates tap `spec.ifname` in `ns` and configures it (MAC, MTU, address, up, `lo` up, default
/// route unless `ns` already has one). The returned [`Tap`] is the daemon's end; the interface lives in `ns` and goes when it
/// is dropped. An existing `spec.ifname` is [`PlumbingError::IfnameBusy`] and changes nothing.
pub fn create_tap_endpoint(ns: &NetNs, spec: &EndpointSpec) -> Result<Tap> {
    validate(spec)?;
    run_in(ns, || {
        let mut nl = Netlink::open().map_err(PlumbingError::Netlink)?;
        ensure_free(&mut nl, &spec.ifname)?;
        let tap = create_offload_tap(&spec.ifname).map_err(|source| {
            // Lost a race with someone creating that name: EBUSY (a tap) or EINVAL (another kind).
            match source.raw_os_error() {
                Some(libc::EBUSY) | Some(libc::EINVAL) => PlumbingError::IfnameBusy {
                    ifname: spec.ifname.clone(),
                },
                _ => PlumbingError::CreateTap {
                    ifname: spec.ifname.clone(),
                    source,
                },
            }
        })?;
        // From here a failure drops `tap`, which deletes the interface with everything set on it.
        let index = nl
            .link_index(tap.name())
            .map_err(PlumbingError::Netlink)?
            .ok_or_else(|| PlumbingError::CreateTap {
                ifname: spec.ifname.clone(),
                source: io::Error::new(io::ErrorKind::NotFound, "created, then gone"),
            })?;
        configure_container_link(&mut nl, index, spec)?;
        Ok(tap)
    })
    .map_err(PlumbingError::EnterNetns)?
}

/// A tap with virtio-net headers and checksum/TSO offloads, so the container's stack hands us
/// (and takes from us) 64 KB TCP segments with partial checksums instead of MTU-sized frames:
/// the switch moves one frame where it would move forty. Falls back to a plain tap where the
/// kernel lacks IFF_VNET_HDR.
pub fn create_offload_tap(name: &str) -> io::Result<Tap> {
    use switchyard_switch::backend::tap::offload;
    match Tap::create(name, true) {
        Ok(t) => {
            t.set_vnet_hdr_size(switchyard_switch::gso::VNET_HDR_LEN as i32)?;
            t.set_offload(offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN)?;
            Ok(t)
        }
        Err(e) if e.kind() == io::ErrorKind::Unsupported => Tap::create(name, false),
        Err(e) => Err(e),
    }
}

/// Removes a tap endpoint: closing the tap fd deletes the interface (and releases the reference
/// the fd held on the container's namespace).
pub fn remove_tap_endpoint(tap: Tap) {
    drop(tap);
}

/// Creates a veth pair, `host_ifname` in the caller's namespace and `spec.ifname` straight in
/// `ns`, configures the container end like a tap endpoint, turns tx checksum offload off on both
/// ends, brings the host end up with the same MTU (inert: no ARP, no IPv6 address) and opens an
/// AF_PACKET socket on it. Any
/// failure after the pair exists deletes it.
pub fn create_veth_endpoint(
    ns: &NetNs,
    spec: &EndpointSpec,
    host_ifname: &str,
) -> Result<VethEndpoint> {
    validate(spec)?;
    check_ifname(host_ifname)?;
    let mut host = Netlink::open().map_err(PlumbingError::Netlink)?;
    if host
        .link_index(host_ifname)
        .map_err(PlumbingError::Netlink)?
        .is_some()
    {
        return Err(PlumbingError::HostIfnameBusy {
            ifname: host_ifname.to_string(),
        });
    }
    run_in(ns, || ensure_free(&mut Netlink::open()?, &spec.ifname))
        .map_err(PlumbingError::EnterNetns)??;

    let host_ifindex = host
        .create_veth(host_ifname, &spec.ifname, Some(ns.as_fd()))
        .map_err(PlumbingError::CreateVeth)?;
    let mut finish = || -> Result<PacketSocket> {
        host.set_mtu(host_ifindex, spec.mtu)
            .map_err(PlumbingError::SetMtu)?;
        // The host end is a wire, not a host interface: no ARP answers from the daemon's
        // namespace, no IPv6 link-local address or router solicitations of its own.
        host.set_noarp(host_ifindex, true)
            .map_err(PlumbingError::HostEnd)?;
        if let Err(e) = host.set_ipv6_addrgen_none(host_ifindex) {
            // Only a kernel without IPv6 refuses; then there is nothing to silence.
            if e.errno() != Some(libc::EAFNOSUPPORT) {
                return Err(PlumbingError::HostEnd(e));
            }
        }
        host.set_up(host_ifindex).map_err(PlumbingError::LinkUp)?;
        run_in(ns, || {
            let mut nl = Netlink::open().map_err(PlumbingError::Netlink)?;
            let index = nl
                .link_index(&spec.ifname)
                .map_err(PlumbingError::Netlink)?
                .ok_or_else(|| {
                    PlumbingError::CreateVeth(NetlinkError::not_found(format!(
                        "find veth peer {} in the container namespace",
                        spec.ifname
                    )))
                })?;
            configure_container_link(&mut nl, index, spec)
        })
        .map_err(PlumbingError::EnterNetns)??;
        // Offloads stay on at both ends: with virtio-net headers on the socket, TSO segments
        // and partial checksums cross the switch whole and the kernel finishes them.
        PacketSocket::open_vnet(host_ifindex).map_err(|source| PlumbingError::PacketSocket {
            ifname: host_ifname.to_string(),
            source,
        })
    };
    match finish() {
        Ok(socket) => Ok(VethEndpoint {
            socket,
            host_ifname: host_ifname.to_string(),
            host_ifindex,
        }),
        Err(e) => {
            let _ = host.delete_link(host_ifindex);
            Err(e)
        }
    }
}

/// Deletes the veth whose host end is `host_ifname` (in the caller's namespace); both ends go.
/// Already gone is fine.
pub fn remove_veth(host_ifname: &str) -> Result<()> {
    let mut nl = Netlink::open().map_err(PlumbingError::Netlink)?;
    let Some(index) = nl
        .link_index(host_ifname)
        .map_err(PlumbingError::RemoveVeth)?
    else {
        return Ok(());
    };
    match nl.delete_link(index) {
        Err(e) if !e.is_not_found() => Err(PlumbingError::RemoveVeth(e)),
        _ => Ok(()),
    }
}

/// MAC, MTU, address, up, `lo` up, default route: in that order, as the default route needs the
/// link up and the gateway on-link. An existing default route is kept (a second network).
fn configure_container_link(nl: &mut Netlink, index: u32, spec: &EndpointSpec) -> Result<()> {
    nl.set_mac(index, spec.mac).map_err(PlumbingError::SetMac)?;
    nl.set_mtu(index, spec.mtu).map_err(PlumbingError::SetMtu)?;
    nl.add_address(index, spec.ip, spec.prefix_len)
        .map_err(PlumbingError::AddAddress)?;
    nl.set_up(index).map_err(PlumbingError::LinkUp)?;
    nl.set_up(LOOPBACK_IFINDEX)
        .map_err(PlumbingError::LoopbackUp)?;
    match nl.add_default_route(spec.gateway, Some(index)) {
        // The container already has a default route (its first network's): keep it, as Docker
        // does; this network's subnet stays reachable through the interface's prefix route.
        Err(e) if e.is_exists() => Ok(()),
        other => other.map_err(PlumbingError::DefaultRoute),
    }
}

fn ensure_free(nl: &mut Netlink, ifname: &str) -> Result<()> {
    match nl.link_index(ifname).map_err(PlumbingError::Netlink)? {
        Some(_) => Err(PlumbingError::IfnameBusy {
            ifname: ifname.to_string(),
        }),
        None => Ok(()),
    }
}

fn validate(spec: &EndpointSpec) -> Result<()> {
    let invalid = |what: String| Err(PlumbingError::InvalidSpec(what));
    check_ifname(&spec.ifname)?;
    if spec.prefix_len == 0 || spec.prefix_len > 30 {
        return invalid(format!(
            "prefix length /{} leaves no room for an address and a gateway",
            spec.prefix_len
        ));
    }
    if !(68..=65535).contains(&spec.mtu) {
        return invalid(format!("mtu {} is outside 68..=65535", spec.mtu));
    }
    if spec.mac[0] & 1 != 0 || spec.mac == [0; 6] {
        return invalid(format!(
            "mac {} is not a unicast address",
            format_mac(spec.mac)
        ));
    }
    let mask = u32::MAX << (32 - u32::from(spec.prefix_len));
    if u32::from(spec.ip) & mask != u32::from(spec.gateway) & mask || spec.ip == spec.gateway {
        return invalid(format!(
            "gateway {} is not another address of {}/{}",
            spec.gateway, spec.ip, spec.prefix_len
        ));
    }
    Ok(())
}

fn check_ifname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == b'%' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(PlumbingError::InvalidSpec(format!(
            "invalid interface name {name:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> EndpointSpec {
        EndpointSpec {
            ifname: "eth0".into(),
            mac: [0x02, 0, 0, 0, 0x77, 2],
            ip: Ipv4Addr::new(10, 77, 0, 2),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 77, 0, 1),
            mtu: 1500,
        }
    }

    #[test]
    fn validation() {
        assert!(validate(&spec()).is_ok());
        let bad = [
            EndpointSpec {
                gateway: Ipv4Addr::new(10, 78, 0, 1),
                ..spec()
            },
            EndpointSpec {
                gateway: Ipv4Addr::new(10, 77, 0, 2),
                ..spec()
            },
            EndpointSpec { mtu: 67, ..spec() },
            EndpointSpec {
                prefix_len: 31,
                ..spec()
            },
            EndpointSpec {
                mac: [1, 0, 0, 0, 0, 1],
                ..spec()
            },
            EndpointSpec {
                ifname: "eth%d".into(),
                ..spec()
            },
            EndpointSpec {
                ifname: "a-very-long-name0".into(),
                ..spec()
            },
        ];
        for s in bad {
            assert!(
                matches!(validate(&s), Err(PlumbingError::InvalidSpec(_))),
                "{s:?}"
            );
        }
    }
}
