//! A small synchronous rtnetlink client: one request at a time, each answered (ACK, error or the
//! end of a dump) before the next, sequence numbers checked.
//!
//! A [`Netlink`] acts in the network namespace of the thread that opened it, whichever thread uses
//! it afterwards: open it inside [`crate::netns::run_in`] to configure a container namespace.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A failed netlink step: what we asked for and the kernel's errno (with its extended-ack message
/// when it sent one).
#[derive(Debug)]
pub struct NetlinkError {
    step: String,
    source: io::Error,
    /// The kernel's extended-ack text, e.g. "Nexthop has invalid gateway".
    detail: Option<String>,
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

impl NetlinkError {
    fn new(step: impl Into<String>, source: io::Error) -> Self {
        NetlinkError {
            step: step.into(),
            source,
            detail: None,
        }
    }

    /// A "no such thing" error for `step` (`ENOENT`).
    pub fn not_found(step: impl Into<String>) -> Self {
        NetlinkError::new(step, io::Error::from_raw_os_error(libc::ENOENT))
    }

    /// The kernel's extended-ack message, when it sent one.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// The step that failed, e.g. `add address 10.77.0.2/24 to eth0`.
    pub fn step(&self) -> &str {
        &self.step
    }

    /// The errno, when the kernel (or a syscall) gave one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// `EEXIST`: the link, address or route is already there.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// `EBUSY`: e.g. an interface name in use by a device that cannot be replaced.
    pub fn is_busy(&self) -> bool {
        self.errno() == Some(libc::EBUSY)
    }

    /// `ENODEV`/`ENOENT`: no such link (or address, route).
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(libc::ENODEV) | Some(libc::ENOENT))
    }

    pub fn io_error(&self) -> &io::Error {
        &self.source
    }
}

impl fmt::Display for NetlinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "netlink: {}: {}", self.step, self.source)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

impl std::error::Error for NetlinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// One link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
}

/// One IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route4 {
    pub destination: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

/// An rtnetlink socket bound to the namespace it was opened in.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buf: Vec<u8>,
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink")
            .field("fd", &self.socket.as_raw_fd())
            .field("sequence", &self.sequence)
            .finish()
    }
}

/// Receive buffer: the kernel sizes dump datagrams up to 32 KiB when the reader's buffer allows.
const RECV_BUFFER: usize = 64 * 1024;
/// How often a dump is restarted when the kernel flags it as inconsistent (`NLM_F_DUMP_INTR`).
const DUMP_RETRIES: usize = 5;
/// `NLMSGERR_ATTR_MSG`: the extended-ack error string.
const NLMSGERR_ATTR_MSG: u16 = 1;

impl Netlink {
    /// Opens an rtnetlink socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink> {
        let step = "open rtnetlink socket";
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| NetlinkError::new(step, e))?;
        socket
            .bind(&SocketAddr::new(0, 0))
            .map_err(|e| NetlinkError::new(step, e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| NetlinkError::new(step, e))?;
        // Both best effort: short ACKs and readable error strings.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
        Ok(Netlink {
            socket,
            sequence: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// The index of link `name`, `None` when there is none.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(
            &format!("look up link {name}"),
            RouteNetlinkMessage::GetLink(msg),
            0,
        ) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let replies = self.dump("list links", || {
            RouteNetlinkMessage::GetLink(LinkMessage::default())
        })?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from_message(&l)),
                _ => None,
            })
            .collect())
    }

    /// The names of every link of the namespace.
    pub fn link_names(&mut self) -> Result<Vec<String>> {
        Ok(self.links()?.into_iter().map(|l| l.name).collect())
    }

    /// Link `index`, `None` when there is none.
    pub fn link(&mut self, index: u32) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self.request(
            &format!("get link {index}"),
            RouteNetlinkMessage::GetLink(msg),
            0,
        ) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from_message(&l)),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Brings link `index` up.
    pub fn set_up(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.link_request(
            index,
            |link| format!("set {link} up"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// Sets or clears `IFF_NOARP` on link `index` (`ip link set DEV arp off|on`): with it set, the
    /// kernel neither answers nor sends ARP on that link.
    pub fn set_noarp(&mut self, index: u32, noarp: bool) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = if noarp {
            LinkFlags::Noarp
        } else {
            LinkFlags::empty()
        };
        msg.header.change_mask = LinkFlags::Noarp;
        self.link_request(
            index,
            |link| format!("set arp {} on {link}", if noarp { "off" } else { "on" }),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// Stops the kernel from giving link `index` IPv6 addresses of its own (`ip link set DEV
    /// addrgenmode none`); takes effect when the link next comes up.
    pub fn set_ipv6_addrgen_none(&mut self, index: u32) -> Result<()> {
        let attr =
            LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(
                In6AddrGenMode::None,
            )])]);
        self.set_link_attribute(index, attr, |link| {
            format!("set addrgenmode none on {link}")
        })
    }

    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<()> {
        self.set_link_attribute(index, LinkAttribute::Mtu(mtu), |link| {
            format!("set mtu {mtu} on {link}")
        })
    }

    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<()> {
        self.set_link_attribute(index, LinkAttribute::Address(mac.to_vec()), |link| {
            format!("set mac {} on {link}", format_mac(mac))
        })
    }

    /// Renames link `index` (the kernel refuses while it is up: `EBUSY`).
    pub fn rename(&mut self, index: u32, name: &str) -> Result<()> {
        self.set_link_attribute(index, LinkAttribute::IfName(name.to_string()), |link| {
            format!("rename {link} to {name}")
        })
    }

    /// Moves link `index` into the namespace `netns` is an fd of.
    pub fn move_to_netns(&mut self, index: u32, netns: BorrowedFd<'_>) -> Result<()> {
        self.set_link_attribute(index, LinkAttribute::NetNsFd(netns.as_raw_fd()), |link| {
            format!("move {link} to another netns")
        })
    }

    /// Deletes link `index` (for a veth, both ends go).
    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.link_request(
            index,
            |link| format!("delete {link}"),
            RouteNetlinkMessage::DelLink(msg),
            0,
        )
    }

    /// Creates a veth pair: `name` here, `peer_name` in the namespace `peer_netns` is an fd of
    /// (here when `None`), created there directly, so the peer never appears in this namespace.
    /// Returns the index of `name`. `EEXIST` when either name is taken in its namespace.
    pub fn create_veth(
        &mut self,
        name: &str,
        peer_name: &str,
        peer_netns: Option<BorrowedFd<'_>>,
    ) -> Result<u32> {
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(peer_name.to_string()));
        if let Some(fd) = peer_netns {
            peer.attributes.push(LinkAttribute::NetNsFd(fd.as_raw_fd()));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        let step = format!("create veth {name} (peer {peer_name})");
        self.request(
            &step,
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        self.link_index(name)?.ok_or_else(|| {
            NetlinkError::new(
                step,
                io::Error::new(io::ErrorKind::NotFound, "created, then gone"),
            )
        })
    }

    /// Adds `ip/prefix_len` to link `index` (with the subnet broadcast, as `ip addr add ... brd +`).
    pub fn add_address(&mut self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
        let describe = |link: &str| format!("add address {ip}/{prefix_len} to {link}");
        if prefix_len > 32 {
            return Err(NetlinkError::new(
                describe(&format!("link {index}")),
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(ip.into()));
        msg.attributes.push(AddressAttribute::Address(ip.into()));
        if prefix_len < 31 {
            let host_mask = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
            let broadcast = Ipv4Addr::from(u32::from(ip) | host_mask);
            msg.attributes.push(AddressAttribute::Broadcast(broadcast));
        }
        self.link_request(
            index,
            describe,
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// The IPv4 addresses (with prefix lengths) of link `index`.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        let replies = self.dump(&format!("list addresses of link {index}"), || {
            let mut msg = AddressMessage::default();
            msg.header.family = AddressFamily::Inet;
            RouteNetlinkMessage::GetAddress(msg)
        })?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Local(std::net::IpAddr::V4(ip))
                        | AddressAttribute::Address(std::net::IpAddr::V4(ip)) => {
                            Some((*ip, a.header.prefix_len))
                        }
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds `default via gateway [dev oif]` to the main table.
    pub fn add_default_route(&mut self, gateway: Ipv4Addr, oif: Option<u32>) -> Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 0;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        let mut step = format!("add default route via {gateway}");
        if let Some(oif) = oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
            step.push_str(&format!(" dev {oif}"));
        }
        self.request(
            &step,
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// The IPv4 routes of the main table.
    pub fn routes(&mut self) -> Result<Vec<Route4>> {
        let replies = self.dump("list routes", || {
            let mut msg = RouteMessage::default();
            msg.header.address_family = AddressFamily::Inet;
            RouteNetlinkMessage::GetRoute(msg)
        })?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if r.header.table == RouteHeader::RT_TABLE_MAIN
                        && r.header.address_family == AddressFamily::Inet =>
                {
                    Some(route_from_message(&r))
                }
                _ => None,
            })
            .collect())
    }

    fn set_link_attribute(
        &mut self,
        index: u32,
        attr: LinkAttribute,
        describe: impl Fn(&str) -> String,
    ) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(attr);
        self.link_request(index, describe, RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// A request about link `index`; a failure names the link by its name when it still has one
    /// (`set mtu 9000 on eth0`), by its index otherwise.
    fn link_request(
        &mut self,
        index: u32,
        describe: impl Fn(&str) -> String,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<()> {
        let by_index = format!("link {index}");
        match self.request(&describe(&by_index), msg, flags) {
            Ok(_) => Ok(()),
            Err(mut e) => {
                if let Ok(Some(link)) = self.link(index) {
                    e.step = describe(&link.name);
                }
                Err(e)
            }
        }
    }

    /// A dump request, restarted when the kernel says the dump was interrupted by a change.
    fn dump(
        &mut self,
        step: &str,
        make: impl Fn() -> RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        for _ in 0..DUMP_RETRIES {
            let (replies, interrupted) = self.exchange(step, make(), NLM_F_DUMP)?;
            if !interrupted {
                return Ok(replies);
            }
        }
        Err(NetlinkError::new(
            step,
            io::Error::new(
                io::ErrorKind::Interrupted,
                "dump kept changing under us (NLM_F_DUMP_INTR)",
            ),
        ))
    }

    /// A request answered by an ACK (after any replies).
    fn request(
        &mut self,
        step: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.exchange(step, msg, flags | NLM_F_ACK).map(|(r, _)| r)
    }

    /// Sends one request and reads until its ACK, error or `NLMSG_DONE`. Messages of another
    /// sequence number (left over from an earlier request that failed half-way) are skipped.
    fn exchange(
        &mut self,
        step: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool)> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(|e| NetlinkError::new(step, e))?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            self.buf.clear();
            let len = self
                .socket
                .recv(&mut self.buf, 0)
                .map_err(|e| NetlinkError::new(step, e))?;
            let datagram = &self.buf[..len.min(self.buf.len())];
            let mut offset = 0;
            while offset < datagram.len() {
                let message =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..])
                        .map_err(|e| {
                            NetlinkError::new(
                                step,
                                io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    format!("bad reply: {e}"),
                                ),
                            )
                        })?;
                let length = message.header.length as usize;
                offset += length.next_multiple_of(4).max(16);
                if message.header.sequence_number != sequence {
                    continue;
                }
                interrupted |= message.header.flags & NLM_F_DUMP_INTR != 0;
                match message.payload {
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    NetlinkPayload::Done(_) => return Ok((replies, interrupted)),
                    NetlinkPayload::Error(e) => match e.code {
                        None if !dump => return Ok((replies, interrupted)),
                        None => {}
                        Some(code) => {
                            let mut err = NetlinkError::new(
                                step,
                                io::Error::from_raw_os_error(code.get().saturating_abs()),
                            );
                            err.detail = extack_message(message.header.flags, &e.header);
                            return Err(err);
                        }
                    },
                    NetlinkPayload::Overrun(_) => {
                        return Err(NetlinkError::new(step, io::Error::other("netlink overrun")))
                    }
                    _ => {}
                }
            }
        }
    }
}

fn link_from_message(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mtu: None,
        mac: None,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
            LinkAttribute::Address(mac) => link.mac = <[u8; 6]>::try_from(mac.as_slice()).ok(),
            _ => {}
        }
    }
    link
}

fn route_from_message(msg: &RouteMessage) -> Route4 {
    let mut route = Route4 {
        destination: Ipv4Addr::UNSPECIFIED,
        prefix_len: msg.header.destination_prefix_length,
        gateway: None,
        oif: None,
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.destination = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
            RouteAttribute::Oif(oif) => route.oif = Some(*oif),
            _ => {}
        }
    }
    route
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The `NLMSGERR_ATTR_MSG` string of an error message: after the error code comes the echoed
/// request (only its 16-byte header when capped), then the extended-ack attributes.
fn extack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < 16 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        u32::from_ne_bytes(payload[..4].try_into().ok()?) as usize
    };
    let mut tlvs = payload.get(echoed.next_multiple_of(4)..)?;
    while tlvs.len() >= 4 {
        let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &tlvs[4..len];
            let text = text.split(|&b| b == 0).next().unwrap_or(text);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        tlvs = tlvs.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    None
}
