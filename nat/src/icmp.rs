//! ICMP errors: generating them where a router would (TTL exceeded, unreachable, fragmentation
//! needed), and translating errors about a tracked flow by the header embedded in them.

use std::net::Ipv4Addr;

use smoltcp::wire::{Icmpv4Packet, IpProtocol, Ipv4Packet, IPV4_HEADER_LEN};
use switchyard_switch::{DropReason, MacAddr};

use crate::checksum as ck;
use crate::config::Verdict;
use crate::conntrack::{Tuple, UPLINK_ZONE};
use crate::emit::{Egress, Emits};
use crate::packet::{self, Ip4, L4Info, ETH_LEN, ICMP_DST_UNREACHABLE, ICMP_TIME_EXCEEDED};
use crate::router::{write_eth, Router, Rx};

/// An ICMP (type, code).
pub type Kind = (u8, u8);
pub const TIME_EXCEEDED_TTL: Kind = (ICMP_TIME_EXCEEDED, 0);
pub const PORT_UNREACHABLE: Kind = (ICMP_DST_UNREACHABLE, 3);
pub const FRAG_NEEDED: Kind = (ICMP_DST_UNREACHABLE, 4);

/// Destination unreachable with `code` (0 net, 1 host).
pub fn unreachable(code: u8) -> Kind {
    (ICMP_DST_UNREACHABLE, code)
}

/// Total size of an error we generate (RFC 1812 4.3.2.3: as much of the original as fits 576).
const MAX_ERROR_LEN: usize = 576;

/// RFC 1812 4.3.2.7: no error about an error, a later fragment, or a packet whose source does
/// not name one host.
fn may_send_error(ip: &Ip4, l4: Option<&L4Info>) -> bool {
    !ip.is_later_fragment()
        && !matches!(l4, Some(L4Info::IcmpError { .. }))
        && !ip.src.is_broadcast()
        && !ip.src.is_multicast()
        && !ip.src.is_unspecified()
        && !ip.src.is_loopback()
}

/// Append an Ethernet frame carrying ICMP error `kind` about `orig` (an IPv4 packet as
/// received). `rest` is the second header word (the next-hop MTU for fragmentation needed).
#[allow(clippy::too_many_arguments)]
pub fn emit_error(
    out: &mut Emits,
    egress: Egress,
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: Ipv4Addr,
    orig: &[u8],
    kind: Kind,
    rest: u32,
) {
    let quoted = orig.len().min(MAX_ERROR_LEN - IPV4_HEADER_LEN - 8);
    let icmp_len = 8 + quoted;
    let buf = out.push(egress, ETH_LEN + IPV4_HEADER_LEN + icmp_len);
    write_eth(buf, dst_mac, src_mac);
    buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let orig_src = Ipv4Packet::new_unchecked(orig).src_addr();
    let ip = smoltcp::wire::Ipv4Repr {
        src_addr: src,
        dst_addr: orig_src,
        next_header: IpProtocol::Icmp,
        payload_len: icmp_len,
        hop_limit: 64,
    };
    let mut p = Ipv4Packet::new_unchecked(&mut buf[ETH_LEN..]);
    ip.emit(&mut p, &smoltcp::phy::ChecksumCapabilities::default());
    let payload = p.payload_mut();
    let mut icmp = Icmpv4Packet::new_unchecked(&mut payload[..]);
    icmp.set_msg_type(kind.0.into());
    icmp.set_msg_code(kind.1);
    let data = icmp.into_inner();
    data[4..8].copy_from_slice(&rest.to_be_bytes());
    data[8..].copy_from_slice(&orig[..quoted]);
    data[2..4].copy_from_slice(&[0, 0]);
    let c = ck::full(data);
    data[2..4].copy_from_slice(&c.to_be_bytes());
}

impl Router {
    /// Answer a packet we will not forward with an ICMP error from our address on its side
    /// (rate-limited). The packet counts as dropped for `reason` either way.
    pub(crate) fn icmp_error_back(
        &mut self,
        rx: &Rx,
        l4: Option<&L4Info>,
        kind: Kind,
        rest: u32,
        reason: DropReason,
        out: &mut Emits,
    ) -> Verdict {
        let l4 = match l4 {
            Some(l) => Some(*l),
            None if rx.ip.is_later_fragment() => None,
            None => packet::parse_l4(&rx.ip, rx.l4(), false).ok(),
        };
        let side = if rx.zone == UPLINK_ZONE {
            self.uplink.map(|u| (Egress::Uplink, u.mac, u.addr))
        } else {
            self.net(switchyard_switch::NetworkId(rx.zone))
                .map(|n| (Egress::Network(n.id), n.gateway_mac, n.gateway_ip))
        };
        let Some((egress, mac, addr)) = side else {
            return Verdict::Dropped(reason);
        };
        if !may_send_error(&rx.ip, l4.as_ref()) {
            return Verdict::Dropped(reason);
        }
        if !self.bucket.take(rx.now) {
            self.counters.icmp_rate_limited += 1;
            return Verdict::Dropped(reason);
        }
        emit_error(out, egress, mac, rx.src_mac, addr, rx.pkt(), kind, rest);
        self.counters.icmp_errors_sent += 1;
        self.counters.drop(reason);
        Verdict::Answered
    }

    /// An ICMP error about a tracked flow: found through the inverse of the embedded tuple,
    /// the outer destination and the embedded header are put back the way the flow's other
    /// side knows them, and every checksum is fixed.
    /// An ICMP error about a tracked flow: found through the inverse of the embedded tuple,
    /// the outer destination and the embedded header are put back the way the flow's other
    /// side knows them, and every checksum is fixed. The quoted packet may be cut after 8 bytes
    /// of payload, so only what is read is checked.
    pub(crate) fn translate_icmp_error(&mut self, rx: &Rx, out: &mut Emits) -> Verdict {
        let icmp = rx.l4();
        let emb = &icmp[8..];
        if emb.len() < IPV4_HEADER_LEN || emb[0] >> 4 != 4 {
            return Verdict::Dropped(DropReason::Malformed);
        }
        let ehlen = usize::from(emb[0] & 0x0f) * 4;
        if ehlen < IPV4_HEADER_LEN || emb.len() < ehlen + 8 {
            return Verdict::Dropped(DropReason::Malformed);
        }
        let e = Ipv4Packet::new_unchecked(emb);
        let (esrc, edst, eproto) = (e.src_addr(), e.dst_addr(), u8::from(e.next_header()));
        if e.frag_offset() != 0 {
            return Verdict::Dropped(DropReason::NotForUs);
        }
        let Some(el4) = packet::parse_embedded_l4(eproto, &emb[ehlen..]) else {
            return Verdict::Dropped(DropReason::NotForUs);
        };
        let eip = Ip4 {
            hlen: ehlen,
            total: emb.len(),
            src: esrc,
            dst: edst,
            proto: eproto,
            ttl: 0,
            ident: 0,
            df: false,
            mf: false,
            frag_off: 0,
        };
        let Some(etuple) = el4.tuple(&eip) else {
            return Verdict::Dropped(DropReason::NotForUs);
        };
        let Some((r, dir)) = self.table.lookup(rx.zone, &etuple.inverse(), rx.now) else {
            return Verdict::Dropped(DropReason::NotForUs);
        };
        let Some(c) = self.table.get(r) else {
            return Verdict::Dropped(DropReason::NotForUs);
        };
        // The quoted packet went the other way; before translation it looked like this.
        let before: Tuple = c.tuple[dir.other().idx()];
        let ezone = c.zone[dir.other().idx()];
        let outer_dst = before.src;
        let outer_src = if rx.ip.src == etuple.dst {
            before.dst
        } else {
            rx.ip.src
        };
        if rx.ip.ttl <= 1 {
            return Verdict::Dropped(DropReason::TtlExceeded);
        }
        let hop = match self.resolve(ezone, outer_dst, rx.now) {
            Ok(h) => h,
            Err(_) => return Verdict::Dropped(DropReason::NoRoute),
        };
        if rx.ip.total > hop.mtu {
            return Verdict::Dropped(DropReason::Oversize);
        }
        let buf = out.push_copy(hop.egress, rx.frame);
        write_eth(buf, hop.dst_mac.unwrap_or(MacAddr::ZERO), hop.src_mac);
        let pkt = &mut buf[ETH_LEN..];
        packet::rewrite_addrs(pkt, outer_src, outer_dst);
        packet::dec_ttl(pkt);
        let icmp = &mut pkt[rx.ip.hlen..rx.ip.total];
        packet::rewrite_embedded(&mut icmp[8..], ehlen, &el4, &before);
        icmp[2..4].copy_from_slice(&[0, 0]);
        let c = ck::full(icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        self.counters.icmp_errors_translated += 1;
        self.finish_hop(hop, rx.now, out)
    }
}
