//! The established-flow fast path: a TCP or UDP packet of a live connection, with nothing
//! unusual about it, parsed by reading the few header fields it needs straight from the bytes
//! and rewritten in place with RFC 1624 incremental checksum updates.
//!
//! Why hand-written: the full path ([`Router::handle_from_network`] through
//! [`Router::forward`]) builds smoltcp views (each accessor re-checks lengths), sums the L4
//! checksum through `pseudo_header_v4` + `checksum::data` + `combine`, builds an [`Rx`], an
//! `L4Info` and a route `Hop`, and runs several subnet/fragment/host-mode branches. Measured with
//! callgrind on the 100k-flow benchmark (benches/benches/nat.rs) that was ~1,160 instructions per
//! 64-byte packet; this path is ~300 (see the commit messages for the criterion numbers).
//!
//! Contract: a fast-path function either returns `None` *without any side effect* (no table,
//! counter or output change), and the caller runs the full path, or it does exactly what the
//! full path would have done for that packet: same verdict, same bytes emitted (the same
//! checksum update sequence, so even the 0x0000/0xffff representation matches), same
//! conntrack update, same counters. Anything unusual bails out: IP options, fragments,
//! offloaded partial checksums, ICMP, a miss or an expired entry in conntrack, TTL <= 1, an
//! unresolved next hop or unknown endpoint, a packet over the egress MTU, local or
//! inter-network destinations, host mode.

use std::net::Ipv4Addr;

use switchyard_switch::{Instant, MacAddr, NetworkId};

use crate::checksum as ck;
use crate::config::{in_subnet, RxMeta};
use crate::conntrack::tcp::TcpFlags;
use crate::conntrack::{Tuple, Zone, L4, UPLINK_ZONE, WARM_MAX};
use crate::emit::{Egress, Emits};
use crate::packet::ETH_LEN;
use crate::router::Router;

const IP_HDR: usize = 20;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

#[inline(always)]
fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn wr16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline(always)]
fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Ones'-complement sum of `data` as big-endian 16-bit words (an odd last byte padded with a
/// zero), not yet folded: 32-bit words summed into 64 bits, which is the same sum modulo
/// 0xffff (2^16 = 1 there) and zero only when every word is.
#[inline(always)]
fn sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(4);
    let mut s: u64 = 0;
    for c in &mut chunks {
        s += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        s += u64::from(rd16(rest, i));
        i += 2;
    }
    if i < rest.len() {
        s += u64::from(rest[i]) << 8;
    }
    s
}

/// True when the folded sum is 0xffff, i.e. the data with its checksum verifies. Equivalent to
/// smoltcp's `checksum::data(..) == 0xffff` (both: sum = 0 mod 0xffff and not all-zero).
#[inline(always)]
fn verifies(mut s: u64) -> bool {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

/// The parsed packet: what the rewrite and conntrack need.
struct Pkt {
    /// Ethernet + IP total length (the frame without Ethernet padding).
    len: usize,
    src: u32,
    dst: u32,
    ttl: u8,
    tcp: bool,
    sport: u16,
    dport: u16,
    flags: u8,
}

/// Parse and validate an Ethernet/IPv4 (no options, not a fragment)/TCP-or-UDP frame with the
/// same acceptance as `parse_rx` + `parse_l4` with checksum verification; `None` otherwise (the
/// full path then decides, possibly accepting what this refuses, never the reverse).
#[inline(always)]
fn parse(frame: &[u8]) -> Option<Pkt> {
    if frame.len() < ETH_LEN + IP_HDR + 8 || frame[12..14] != [8, 0] {
        return None;
    }
    let ip = &frame[ETH_LEN..];
    // Version 4, 20-byte header; no MF, offset 0 (DF and the reserved bit pass, as in full).
    if ip[0] != 0x45 || rd16(ip, 6) & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(rd16(ip, 2));
    if total < IP_HDR + 8 || total > ip.len() {
        return None;
    }
    let ip = &ip[..total];
    if !verifies(sum(&ip[..IP_HDR])) {
        return None;
    }
    let (src, dst) = (rd32(ip, 12), rd32(ip, 16));
    let s = Ipv4Addr::from_bits(src);
    if s.is_broadcast() || s.is_multicast() || s.is_unspecified() {
        return None;
    }
    let proto = ip[9];
    let l4 = &ip[IP_HDR..];
    let tcp = match proto {
        PROTO_TCP => {
            // smoltcp's TcpPacket::check_len: 20 bytes, data offset in 20..=len.
            let doff = usize::from(l4.get(12)? >> 4) * 4;
            if l4.len() < 20 || doff < 20 || doff > l4.len() {
                return None;
            }
            true
        }
        PROTO_UDP => {
            if usize::from(rd16(l4, 4)) != l4.len() {
                return None;
            }
            false
        }
        _ => return None,
    };
    // Zero UDP checksum: none to verify.
    if tcp || rd16(l4, 6) != 0 {
        let pseudo = u64::from(src >> 16)
            + u64::from(src & 0xffff)
            + u64::from(dst >> 16)
            + u64::from(dst & 0xffff)
            + u64::from(proto)
            + l4.len() as u64;
        if !verifies(pseudo + sum(l4)) {
            return None;
        }
    }
    Some(Pkt {
        len: ETH_LEN + total,
        src,
        dst,
        ttl: ip[8],
        tcp,
        sport: rd16(l4, 0),
        dport: rd16(l4, 2),
        flags: if tcp { l4[13] } else { 0 },
    })
}

/// The conntrack key a TCP/UDP frame would have, read without any validation (for
/// [`Router::warm`] only: a wrong guess costs a useless read, never a wrong result).
#[inline(always)]
fn peek_key(f: &[u8]) -> Option<Tuple> {
    if f.len() < ETH_LEN + IP_HDR + 4 || f[12..14] != [8, 0] || f[14] != 0x45 {
        return None;
    }
    let proto = match f[23] {
        PROTO_TCP => L4::Tcp,
        PROTO_UDP => L4::Udp,
        _ => return None,
    };
    Some(Tuple {
        src: Ipv4Addr::from_bits(rd32(f, 26)),
        dst: Ipv4Addr::from_bits(rd32(f, 30)),
        sport: rd16(f, 34),
        dport: rd16(f, 36),
        proto,
    })
}

impl Router {
    /// Start the conntrack reads for a group of frames arriving in `zone` (batch API).
    #[inline]
    pub(crate) fn warm(&self, zone: Zone, frames: &[&[u8]]) -> u64 {
        let mut keys = [(
            zone,
            Tuple {
                src: Ipv4Addr::UNSPECIFIED,
                dst: Ipv4Addr::UNSPECIFIED,
                sport: 0,
                dport: 0,
                proto: L4::Udp,
            },
        ); WARM_MAX];
        let mut n = 0;
        for f in frames.iter().take(WARM_MAX) {
            if let Some(t) = peek_key(f) {
                keys[n].1 = t;
                n += 1;
            }
        }
        self.table.warm(&keys[..n])
    }

    /// Fast path of [`Router::handle_from_network`]; `None`: take the full path.
    #[inline]
    pub(crate) fn fast_from_network(
        &mut self,
        net: NetworkId,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
    ) -> Option<()> {
        // Host mode and "no route" both need `uplink == None`: excluded here.
        let up = self.uplink?;
        let n = self.net(net)?;
        if meta.partial_csum
            || n.internal
            || frame.len() > n.mtu + switchyard_switch::frame::ETH_OVERHEAD
            || frame.get(0..6)? != n.gateway_mac.0
        {
            return None;
        }
        let p = parse(frame)?;
        let d = Ipv4Addr::from_bits(p.dst);
        let bcast = n.subnet.to_bits() | !crate::config::mask(n.prefix_len);
        if d.is_broadcast()
            || d.is_multicast()
            || p.dst == bcast
            || d == n.gateway_ip
            || d == up.addr
            || in_subnet(d, n.subnet, n.prefix_len)
            || self
                .nets
                .iter()
                .any(|o| o.id != net && (in_subnet(d, o.subnet, o.prefix_len) || d == o.gateway_ip))
        {
            return None;
        }
        self.fast_forward(net.0, frame, &p, now, out)
    }

    /// Fast path of [`Router::handle_from_uplink`]; `None`: take the full path.
    #[inline]
    pub(crate) fn fast_from_uplink(
        &mut self,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
    ) -> Option<()> {
        let up = self.uplink?;
        if meta.partial_csum
            || frame.len() > self.cfg.uplink_mtu + switchyard_switch::frame::ETH_OVERHEAD
            || frame.get(0..6)? != up.mac.0
        {
            return None;
        }
        let p = parse(frame)?;
        if p.dst != up.addr.to_bits() {
            return None;
        }
        self.fast_forward(UPLINK_ZONE, frame, &p, now, out)
    }

    /// [`Router::forward`] for a parsed fast-path packet arriving in `zone`.
    #[inline(always)]
    fn fast_forward(
        &mut self,
        zone: Zone,
        frame: &[u8],
        p: &Pkt,
        now: Instant,
        out: &mut Emits,
    ) -> Option<()> {
        if p.ttl <= 1 {
            return None;
        }
        let key = Tuple {
            src: Ipv4Addr::from_bits(p.src),
            dst: Ipv4Addr::from_bits(p.dst),
            sport: p.sport,
            dport: p.dport,
            proto: if p.tcp { L4::Tcp } else { L4::Udp },
        };
        let (idx, dir) = self.table.lookup_live(zone, &key, now.total_micros())?;
        let (to, ezone, kind, r) = self.table.translation(idx, dir);
        // Router::resolve, without its error branches (they send ICMP: full path).
        let (egress, src_mac, dst_mac, mtu) = if ezone == UPLINK_ZONE {
            let up = self.uplink?;
            let next_hop = if in_subnet(to.dst, up.addr, up.prefix_len) {
                to.dst
            } else {
                up.gateway?
            };
            let dst_mac = match up.gateway_mac {
                Some(m) if Some(next_hop) == up.gateway => m,
                _ => self.neigh.lookup(next_hop, now)?,
            };
            (Egress::Uplink, up.mac, dst_mac, self.cfg.uplink_mtu)
        } else {
            let id = NetworkId(ezone);
            let n = self.net(id)?;
            let (gw_mac, mtu) = (n.gateway_mac, n.mtu);
            let mac = self.endpoint(id, to.dst)?;
            (Egress::Network(id), gw_mac, mac, mtu)
        };
        if p.len - ETH_LEN > mtu {
            return None;
        }
        // Committed: from here on this is the full path's work, in its order.
        let tcp = p.tcp.then(|| TcpFlags::from_byte(p.flags));
        self.table.on_packet(r, dir, tcp, now);
        let buf = out.push_copy(egress, &frame[..p.len]);
        rewrite(buf, p, &to, dst_mac, src_mac);
        self.count_translated(kind, zone, ezone);
        Some(())
    }
}

/// `write_eth` + `packet::rewrite` + `packet::dec_ttl` for a fast-path packet: the same
/// updates in the same order, so the bytes are identical.
#[inline(always)]
fn rewrite(buf: &mut [u8], p: &Pkt, to: &Tuple, dst_mac: MacAddr, src_mac: MacAddr) {
    buf[0..6].copy_from_slice(&dst_mac.0);
    buf[6..12].copy_from_slice(&src_mac.0);
    let pkt = &mut buf[ETH_LEN..];
    let (os, od) = (p.src, p.dst);
    let (ns, nd) = (to.src.to_bits(), to.dst.to_bits());
    // IP header: addresses (checksum updated only for the ones that change, as set_addrs).
    let mut c = rd16(pkt, 10);
    if os != ns {
        c = ck::update32(c, os, ns);
        pkt[12..16].copy_from_slice(&ns.to_be_bytes());
    }
    if od != nd {
        c = ck::update32(c, od, nd);
        pkt[16..20].copy_from_slice(&nd.to_be_bytes());
    }
    // TTL (dec_ttl) on the address-updated checksum.
    let old = rd16(pkt, 8);
    pkt[8] = pkt[8].wrapping_sub(1);
    c = ck::update16(c, old, rd16(pkt, 8));
    wr16(pkt, 10, c);
    // Ports and the L4 checksum over the pseudo-header change.
    let seg = &mut pkt[IP_HDR..];
    wr16(seg, 0, to.sport);
    wr16(seg, 2, to.dport);
    let at = if p.tcp { 16 } else { 6 };
    let mut c = rd16(seg, at);
    if p.tcp {
        c = ck::update32(c, os, ns);
        c = ck::update32(c, od, nd);
        c = ck::update16(c, p.sport, to.sport);
        c = ck::update16(c, p.dport, to.dport);
    } else {
        c = ck::update_udp32(c, os, ns);
        c = ck::update_udp32(c, od, nd);
        c = ck::update_udp16(c, p.sport, to.sport);
        c = ck::update_udp16(c, p.dport, to.dport);
    }
    wr16(seg, at, c);
}
