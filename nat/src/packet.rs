//! Parsing the IPv4 packets the router handles (once, through smoltcp's checked views) and
//! rewriting them in place with incremental checksum updates.
//!
//! Field writes go through smoltcp views; checksum fixes are RFC 1624 updates from
//! [`crate::checksum`] rather than the views' `fill_checksum`, because a full sum per rewrite
//! would dominate the established-flow fast path (measured in benches/benches/nat.rs).

use std::net::Ipv4Addr;

use smoltcp::wire::{
    IpProtocol, Ipv4Packet, TcpPacket, UdpPacket, IPV4_HEADER_LEN, TCP_HEADER_LEN, UDP_HEADER_LEN,
};
use switchyard_switch::DropReason;

use crate::checksum as ck;
use crate::conntrack::{Tuple, L4};

pub const ETH_LEN: usize = 14;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DST_UNREACHABLE: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAM_PROBLEM: u8 = 12;

/// The IPv4 header fields the router reasons about.
#[derive(Clone, Copy, Debug)]
pub struct Ip4 {
    pub hlen: usize,
    pub total: usize,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    pub ident: u16,
    pub df: bool,
    pub mf: bool,
    pub frag_off: u16,
}

impl Ip4 {
    pub fn is_fragment(&self) -> bool {
        self.mf || self.frag_off != 0
    }
    /// A fragment that does not carry the L4 header.
    pub fn is_later_fragment(&self) -> bool {
        self.frag_off != 0
    }
}

/// Parse and validate an IPv4 header at the start of `pkt` (lengths, version, checksum).
#[inline]
pub fn parse_ip4(pkt: &[u8]) -> Result<Ip4, DropReason> {
    let p = Ipv4Packet::new_checked(pkt).map_err(|_| DropReason::Malformed)?;
    if p.version() != 4 {
        return Err(DropReason::Malformed);
    }
    if !ck::verifies(&pkt[..usize::from(p.header_len())]) {
        return Err(DropReason::BadChecksum);
    }
    Ok(Ip4 {
        hlen: usize::from(p.header_len()),
        total: usize::from(p.total_len()),
        src: p.src_addr(),
        dst: p.dst_addr(),
        proto: p.next_header().into(),
        ttl: p.hop_limit(),
        ident: p.ident(),
        df: p.dont_frag(),
        mf: p.more_frags(),
        frag_off: p.frag_offset(),
    })
}

/// The transport view of a packet (or of its first fragment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Info {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Echo {
        request: bool,
        id: u16,
    },
    /// Destination unreachable, time exceeded, parameter problem: an IP header is embedded.
    IcmpError {
        ty: u8,
        code: u8,
    },
    /// Any other ICMP message.
    IcmpOther,
}

impl L4Info {
    /// The conntrack tuple of a packet with this transport view.
    #[inline]
    pub fn tuple(&self, ip: &Ip4) -> Option<Tuple> {
        let (proto, sport, dport) = match *self {
            L4Info::Tcp { sport, dport, .. } => (L4::Tcp, sport, dport),
            L4Info::Udp { sport, dport } => (L4::Udp, sport, dport),
            L4Info::Echo { request: true, id } => (L4::Icmp, id, 0),
            L4Info::Echo { request: false, id } => (L4::Icmp, 0, id),
            _ => return None,
        };
        Some(Tuple {
            src: ip.src,
            dst: ip.dst,
            sport,
            dport,
            proto,
        })
    }
}

/// Parse the transport header in `l4` (the IP payload). `verify`: check the L4 checksum (off
/// for fragments and offloaded partial checksums). Only the first 8 bytes are needed when
/// `truncated` (a header embedded in an ICMP error).
#[inline]
pub fn parse_l4(ip: &Ip4, l4: &[u8], verify: bool) -> Result<L4Info, DropReason> {
    match IpProtocol::from(ip.proto) {
        IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(l4).map_err(|_| DropReason::Malformed)?;
            if verify && !ck::verifies_l4(ip.src, ip.dst, IpProtocol::Tcp, l4) {
                return Err(DropReason::BadChecksum);
            }
            Ok(L4Info::Tcp {
                sport: t.src_port(),
                dport: t.dst_port(),
                flags: l4[13],
            })
        }
        IpProtocol::Udp => {
            if l4.len() < UDP_HEADER_LEN {
                return Err(DropReason::Malformed);
            }
            let u = UdpPacket::new_unchecked(l4);
            // A first fragment's UDP length covers the whole datagram, not this piece.
            if !ip.mf && usize::from(u.len()) != l4.len() {
                return Err(DropReason::Malformed);
            }
            if verify && u.checksum() != 0 && !ck::verifies_l4(ip.src, ip.dst, IpProtocol::Udp, l4)
            {
                return Err(DropReason::BadChecksum);
            }
            Ok(L4Info::Udp {
                sport: u.src_port(),
                dport: u.dst_port(),
            })
        }
        IpProtocol::Icmp => {
            if l4.len() < 8 {
                return Err(DropReason::Malformed);
            }
            if verify && !ck::verifies(l4) {
                return Err(DropReason::BadChecksum);
            }
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            Ok(match (l4[0], l4[1]) {
                (ICMP_ECHO_REQUEST, 0) => L4Info::Echo { request: true, id },
                (ICMP_ECHO_REPLY, 0) => L4Info::Echo { request: false, id },
                (ty @ (ICMP_DST_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM), code) => {
                    L4Info::IcmpError { ty, code }
                }
                _ => L4Info::IcmpOther,
            })
        }
        _ => Err(DropReason::Unsupported),
    }
}

/// The first 8 bytes of an L4 header embedded in an ICMP error: enough for ports and echo ids.
pub fn parse_embedded_l4(proto: u8, l4: &[u8]) -> Option<L4Info> {
    if l4.len() < 8 {
        return None;
    }
    let w = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
    match IpProtocol::from(proto) {
        IpProtocol::Tcp => Some(L4Info::Tcp {
            sport: w(0),
            dport: w(2),
            flags: 0,
        }),
        IpProtocol::Udp => Some(L4Info::Udp {
            sport: w(0),
            dport: w(2),
        }),
        IpProtocol::Icmp => match (l4[0], l4[1]) {
            (ICMP_ECHO_REQUEST, 0) => Some(L4Info::Echo {
                request: true,
                id: w(4),
            }),
            (ICMP_ECHO_REPLY, 0) => Some(L4Info::Echo {
                request: false,
                id: w(4),
            }),
            _ => None,
        },
        _ => None,
    }
}

fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn wr16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Rewrite the IPv4 source and destination of `pkt` (header at 0) and fix the header checksum.
/// Returns the old addresses for the caller's L4 pseudo-header update.
#[inline]
fn set_addrs(pkt: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) -> (u32, u32) {
    let mut p = Ipv4Packet::new_unchecked(&mut pkt[..]);
    let (os, od) = (p.src_addr().to_bits(), p.dst_addr().to_bits());
    let mut c = p.checksum();
    if os != src.to_bits() {
        c = ck::update32(c, os, src.to_bits());
        p.set_src_addr(src);
    }
    if od != dst.to_bits() {
        c = ck::update32(c, od, dst.to_bits());
        p.set_dst_addr(dst);
    }
    p.set_checksum(c);
    (os, od)
}

/// Decrement the TTL of the IPv4 header at 0 (caller checked it is > 1).
#[inline]
pub fn dec_ttl(pkt: &mut [u8]) {
    let old = rd16(pkt, 8);
    pkt[8] = pkt[8].wrapping_sub(1);
    let new = rd16(pkt, 8);
    let c = ck::update16(rd16(pkt, 10), old, new);
    wr16(pkt, 10, c);
}

/// Rewrite a whole packet or a first fragment (IPv4 header at 0, `hlen` long) so it carries
/// tuple `to`. Checksums are updated incrementally; `complete` recomputes the L4 checksum
/// instead (offloaded partial checksum, or when the caller rewrote more).
#[inline]
pub fn rewrite(pkt: &mut [u8], ip: &Ip4, l4: &L4Info, to: &Tuple, complete: bool) {
    let (os, od) = set_addrs(pkt, to.src, to.dst);
    let (ns, nd) = (to.src.to_bits(), to.dst.to_bits());
    let hlen = ip.hlen;
    let seg = &mut pkt[hlen..];
    match *l4 {
        L4Info::Tcp { sport, dport, .. } | L4Info::Udp { sport, dport } => {
            let tcp = matches!(l4, L4Info::Tcp { .. });
            let at = if tcp { 16 } else { 6 };
            wr16(seg, 0, to.sport);
            wr16(seg, 2, to.dport);
            let mut c = rd16(seg, at);
            if tcp {
                c = ck::update32(c, os, ns);
                c = ck::update32(c, od, nd);
                c = ck::update16(c, sport, to.sport);
                c = ck::update16(c, dport, to.dport);
            } else {
                c = ck::update_udp32(c, os, ns);
                c = ck::update_udp32(c, od, nd);
                c = ck::update_udp16(c, sport, to.sport);
                c = ck::update_udp16(c, dport, to.dport);
            }
            wr16(seg, at, c);
            if complete && !ip.is_fragment() {
                complete_l4(pkt, ip);
            }
        }
        L4Info::Echo { request, id } => {
            let new_id = if request { to.sport } else { to.dport };
            wr16(seg, 4, new_id);
            let c = ck::update16(rd16(seg, 2), id, new_id);
            wr16(seg, 2, c);
            if complete && !ip.is_fragment() {
                complete_l4(pkt, ip);
            }
        }
        L4Info::IcmpError { .. } | L4Info::IcmpOther => {}
    }
}

/// Rewrite only the addresses of a later fragment (no L4 header in it).
pub fn rewrite_addrs(pkt: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) {
    set_addrs(pkt, src, dst);
}

/// Recompute the L4 checksum of a whole packet (IPv4 header at 0) from scratch.
pub fn complete_l4(pkt: &mut [u8], ip: &Ip4) {
    let (src, dst) = {
        let p = Ipv4Packet::new_unchecked(&pkt[..]);
        (p.src_addr(), p.dst_addr())
    };
    let seg = &mut pkt[ip.hlen..ip.total];
    match IpProtocol::from(ip.proto) {
        IpProtocol::Tcp if seg.len() >= TCP_HEADER_LEN => {
            wr16(seg, 16, 0);
            let c = ck::full_l4(src, dst, IpProtocol::Tcp, seg);
            wr16(seg, 16, c);
        }
        IpProtocol::Udp if seg.len() >= UDP_HEADER_LEN => {
            wr16(seg, 6, 0);
            let c = ck::full_l4(src, dst, IpProtocol::Udp, seg);
            wr16(seg, 6, if c == 0 { 0xffff } else { c });
        }
        IpProtocol::Icmp if seg.len() >= 8 => {
            wr16(seg, 2, 0);
            let c = ck::full(seg);
            wr16(seg, 2, c);
        }
        _ => {}
    }
}

/// Rewrite the IP header and first 8 L4 bytes embedded in an ICMP error (`emb` starts at the
/// embedded IP header) to carry tuple `to`. The embedded L4 checksum is updated when it lies
/// within the quoted bytes; the caller recomputes the outer ICMP checksum.
pub fn rewrite_embedded(emb: &mut [u8], hlen: usize, l4: &L4Info, to: &Tuple) {
    let (os, od) = set_addrs(emb, to.src, to.dst);
    let (ns, nd) = (to.src.to_bits(), to.dst.to_bits());
    let seg = &mut emb[hlen..];
    match *l4 {
        L4Info::Tcp { sport, dport, .. } | L4Info::Udp { sport, dport } => {
            let tcp = matches!(l4, L4Info::Tcp { .. });
            wr16(seg, 0, to.sport);
            wr16(seg, 2, to.dport);
            let at = if tcp { 16 } else { 6 };
            if seg.len() >= at + 2 {
                let mut c = rd16(seg, at);
                if tcp {
                    c = ck::update32(c, os, ns);
                    c = ck::update32(c, od, nd);
                    c = ck::update16(c, sport, to.sport);
                    c = ck::update16(c, dport, to.dport);
                } else {
                    c = ck::update_udp32(c, os, ns);
                    c = ck::update_udp32(c, od, nd);
                    c = ck::update_udp16(c, sport, to.sport);
                    c = ck::update_udp16(c, dport, to.dport);
                }
                wr16(seg, at, c);
            }
        }
        L4Info::Echo { request, id } => {
            let new_id = if request { to.sport } else { to.dport };
            wr16(seg, 4, new_id);
            let c = ck::update16(rd16(seg, 2), id, new_id);
            wr16(seg, 2, c);
        }
        _ => {}
    }
}

/// Minimum bytes of an IPv4 packet the router looks at.
pub const MIN_IP: usize = IPV4_HEADER_LEN;
