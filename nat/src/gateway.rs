//! What the router answers itself: ARP for the gateway and uplink addresses, ICMP echo, RSTs and
//! port-unreachables for closed ports on its own addresses; plus the uplink neighbour cache
//! (ARP for the next hop, with a small hold queue) and the ICMP token bucket.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};
use switchyard_switch::{DropReason, Duration, Instant, MacAddr};

use crate::config::{in_subnet, NetworkConfig, UplinkConfig, Verdict};
use crate::conntrack::UPLINK_ZONE;
use crate::emit::{Egress, Emits};
use crate::packet::{L4Info, ETH_LEN};
use crate::router::{Router, Rx};

const ARP_LEN: usize = 28;
/// Seconds between ARP requests for one pending next hop.
const ARP_RETRY: Duration = Duration::from_secs(1);

/// Token bucket on the caller's clock (Linux `icmp_msgs_per_sec` / `icmp_msgs_burst`).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Millionths of a token.
    micro_tokens: u64,
    cap: u64,
    rate: u64,
    last: Option<i64>,
}

impl TokenBucket {
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        let cap = u64::from(burst) * 1_000_000;
        TokenBucket {
            micro_tokens: cap,
            cap,
            rate: u64::from(rate_per_sec),
            last: None,
        }
    }

    /// Take one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let now = now.total_micros();
        if let Some(last) = self.last {
            let dt = u64::try_from(now.saturating_sub(last)).unwrap_or(0);
            self.micro_tokens = self
                .micro_tokens
                .saturating_add(dt.saturating_mul(self.rate))
                .min(self.cap);
        }
        if self.last.is_none_or(|l| now > l) {
            self.last = Some(now);
        }
        if self.micro_tokens >= 1_000_000 {
            self.micro_tokens -= 1_000_000;
            true
        } else {
            false
        }
    }
}

struct Pending {
    since: Instant,
    last_request: Instant,
    held: Vec<Vec<u8>>,
}

/// Uplink neighbours: learned MACs and next hops being resolved.
#[derive(Default)]
pub struct Neighbors {
    known: HashMap<Ipv4Addr, (MacAddr, Instant)>,
    pending: HashMap<Ipv4Addr, Pending>,
}

impl Neighbors {
    pub fn lookup(&self, ip: Ipv4Addr, now: Instant) -> Option<MacAddr> {
        self.known
            .get(&ip)
            .filter(|(_, until)| now < *until)
            .map(|(m, _)| *m)
    }

    pub fn clear(&mut self) {
        self.known.clear();
        self.pending.clear();
    }

    /// Drop holds whose ARP went unanswered and stale entries; returns packets dropped.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> u64 {
        let mut dropped = 0;
        self.pending.retain(|_, p| {
            let keep = now < p.since + timeout;
            if !keep {
                dropped += p.held.len() as u64;
            }
            keep
        });
        self.known.retain(|_, (_, until)| now < *until);
        dropped
    }

    pub fn next_expiry(&self, timeout: Duration) -> Option<Instant> {
        self.pending.values().map(|p| p.since + timeout).min()
    }
}

fn emit_arp(out: &mut Emits, egress: Egress, src_mac: MacAddr, dst_mac: MacAddr, repr: ArpRepr) {
    let buf = out.push(egress, ETH_LEN + ARP_LEN);
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    EthernetRepr {
        src_addr: src_mac.into(),
        dst_addr: dst_mac.into(),
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut eth);
    repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
}

fn parse_arp(frame: &[u8]) -> Option<(ArpOperation, MacAddr, Ipv4Addr, Ipv4Addr)> {
    let p = ArpPacket::new_checked(&frame[ETH_LEN..]).ok()?;
    match ArpRepr::parse(&p).ok()? {
        ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } => Some((
            operation,
            source_hardware_addr.into(),
            source_protocol_addr,
            target_protocol_addr,
        )),
        _ => None,
    }
}

fn arp_reply(our_mac: MacAddr, our_ip: Ipv4Addr, to_mac: MacAddr, to_ip: Ipv4Addr) -> ArpRepr {
    ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: our_mac.into(),
        source_protocol_addr: our_ip,
        target_hardware_addr: to_mac.into(),
        target_protocol_addr: to_ip,
    }
}

impl Router {
    /// ARP on a network: only requests for the gateway address are answered.
    pub(crate) fn arp_from_network(
        &mut self,
        n: &NetworkConfig,
        frame: &[u8],
        out: &mut Emits,
    ) -> Verdict {
        let Some((op, smac, sip, tip)) = parse_arp(frame) else {
            return Verdict::Dropped(DropReason::Malformed);
        };
        if op != ArpOperation::Request || tip != n.gateway_ip || smac.is_invalid_source() {
            return Verdict::Dropped(DropReason::NotForUs);
        }
        emit_arp(
            out,
            Egress::Network(n.id),
            n.gateway_mac,
            smac,
            arp_reply(n.gateway_mac, n.gateway_ip, smac, sip),
        );
        self.counters.arp_replies += 1;
        Verdict::Answered
    }

    /// ARP on the uplink: answer for our address, learn next hops from replies (and from
    /// requests addressed to us), release packets held for them.
    pub(crate) fn arp_from_uplink(
        &mut self,
        up: &UplinkConfig,
        frame: &[u8],
        now: Instant,
        out: &mut Emits,
    ) -> Verdict {
        let Some((op, smac, sip, tip)) = parse_arp(frame) else {
            return Verdict::Dropped(DropReason::Malformed);
        };
        if tip != up.addr || smac.is_invalid_source() {
            return Verdict::Dropped(DropReason::NotForUs);
        }
        let on_link = in_subnet(sip, up.addr, up.prefix_len) && sip != up.addr;
        let wanted = self.neigh.pending.contains_key(&sip) || self.neigh.known.contains_key(&sip);
        if on_link && (op == ArpOperation::Request || wanted) {
            self.learn(sip, smac, now, out);
        }
        if op == ArpOperation::Request {
            emit_arp(
                out,
                Egress::Uplink,
                up.mac,
                smac,
                arp_reply(up.mac, up.addr, smac, sip),
            );
            self.counters.arp_replies += 1;
            return Verdict::Answered;
        }
        if op == ArpOperation::Reply && on_link {
            return Verdict::Consumed;
        }
        Verdict::Dropped(DropReason::NotForUs)
    }

    fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr, now: Instant, out: &mut Emits) {
        let full =
            self.neigh.known.len() >= self.cfg.neighbor_max && !self.neigh.known.contains_key(&ip);
        if !full {
            self.neigh
                .known
                .insert(ip, (mac, now + self.cfg.neighbor_ttl));
        }
        if let Some(p) = self.neigh.pending.remove(&ip) {
            for mut f in p.held {
                f[0..6].copy_from_slice(&mac.0);
                out.push_copy(Egress::Uplink, &f);
            }
        }
    }

    /// Hold a translated frame until `next_hop` answers ARP (bounded per next hop).
    pub(crate) fn hold_for_arp(
        &mut self,
        up: &UplinkConfig,
        next_hop: Ipv4Addr,
        frame: Vec<u8>,
        now: Instant,
        out: &mut Emits,
    ) -> Verdict {
        let send = match self.neigh.pending.get_mut(&next_hop) {
            Some(p) => {
                if p.held.len() >= self.cfg.arp_hold {
                    return Verdict::Dropped(DropReason::NoNeighbor);
                }
                p.held.push(frame);
                let due = now >= p.last_request + ARP_RETRY;
                if due {
                    p.last_request = now;
                }
                due
            }
            None => {
                if self.neigh.pending.len() >= self.cfg.neighbor_max || self.cfg.arp_hold == 0 {
                    return Verdict::Dropped(DropReason::NoNeighbor);
                }
                self.neigh.pending.insert(
                    next_hop,
                    Pending {
                        since: now,
                        last_request: now,
                        held: vec![frame],
                    },
                );
                true
            }
        };
        if send {
            let req = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: up.mac.into(),
                source_protocol_addr: up.addr,
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: next_hop,
            };
            emit_arp(out, Egress::Uplink, up.mac, MacAddr::BROADCAST, req);
            self.counters.arp_requests += 1;
        }
        self.counters.held_for_arp += 1;
        Verdict::Consumed
    }

    /// Our own address side of a packet: the MAC and IP it answers from, and where answers go.
    fn local_side(&self, rx: &Rx) -> Option<(Egress, MacAddr)> {
        if rx.zone == UPLINK_ZONE {
            return self.uplink.map(|u| (Egress::Uplink, u.mac));
        }
        let n = self.net(switchyard_switch::NetworkId(rx.zone))?;
        Some((Egress::Network(n.id), n.gateway_mac))
    }

    /// A packet for one of our own addresses with no connection: echo is answered, TCP gets a
    /// RST, UDP a port unreachable (rate-limited like every error).
    pub(crate) fn local_delivery(&mut self, rx: &Rx, l4: &L4Info, out: &mut Emits) -> Verdict {
        match *l4 {
            L4Info::Echo { request: true, .. } => self.echo_reply(rx, out),
            L4Info::Tcp { flags, .. } => {
                if flags & 0x04 != 0 {
                    return Verdict::Dropped(DropReason::NotForUs);
                }
                if rx.ip.is_fragment() || !self.bucket.take(rx.now) {
                    self.counters.icmp_rate_limited += u64::from(!rx.ip.is_fragment());
                    return Verdict::Dropped(DropReason::NotForUs);
                }
                self.tcp_reset(rx, out)
            }
            L4Info::Udp { .. } => self.icmp_error_back(
                rx,
                Some(l4),
                crate::icmp::PORT_UNREACHABLE,
                0,
                DropReason::NotForUs,
                out,
            ),
            _ => Verdict::Dropped(DropReason::NotForUs),
        }
    }

    fn echo_reply(&mut self, rx: &Rx, out: &mut Emits) -> Verdict {
        let Some((egress, mac)) = self.local_side(rx) else {
            return Verdict::Dropped(DropReason::NotForUs);
        };
        if rx.ip.is_fragment() {
            return Verdict::Dropped(DropReason::Unsupported);
        }
        let icmp = Icmpv4Packet::new_unchecked(rx.l4());
        let (ident, seq_no, data) = (icmp.echo_ident(), icmp.echo_seq_no(), icmp.data());
        let reply = Icmpv4Repr::EchoReply {
            ident,
            seq_no,
            data,
        };
        let ip = Ipv4Repr {
            src_addr: rx.ip.dst,
            dst_addr: rx.ip.src,
            next_header: IpProtocol::Icmp,
            payload_len: reply.buffer_len(),
            hop_limit: 64,
        };
        let caps = ChecksumCapabilities::default();
        let buf = out.push(egress, ETH_LEN + ip.buffer_len() + reply.buffer_len());
        crate::router::write_eth(buf, rx.src_mac, mac);
        buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut p = Ipv4Packet::new_unchecked(&mut buf[ETH_LEN..]);
        ip.emit(&mut p, &caps);
        reply.emit(&mut Icmpv4Packet::new_unchecked(p.payload_mut()), &caps);
        self.counters.echo_replies += 1;
        Verdict::Answered
    }

    /// RFC 793 reset for a segment to a closed port.
    fn tcp_reset(&mut self, rx: &Rx, out: &mut Emits) -> Verdict {
        let Some((egress, mac)) = self.local_side(rx) else {
            return Verdict::Dropped(DropReason::NotForUs);
        };
        let seg = TcpPacket::new_unchecked(rx.l4());
        let seg_len = seg.payload().len() + usize::from(seg.syn()) + usize::from(seg.fin());
        let (seq, ack) = if seg.ack() {
            (seg.ack_number(), None)
        } else {
            (TcpSeqNumber(0), Some(seg.seq_number() + seg_len))
        };
        let repr = TcpRepr {
            src_port: seg.dst_port(),
            dst_port: seg.src_port(),
            control: TcpControl::Rst,
            seq_number: seq,
            ack_number: ack,
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let ip = Ipv4Repr {
            src_addr: rx.ip.dst,
            dst_addr: rx.ip.src,
            next_header: IpProtocol::Tcp,
            payload_len: repr.buffer_len(),
            hop_limit: 64,
        };
        let caps = ChecksumCapabilities::default();
        let buf = out.push(egress, ETH_LEN + ip.buffer_len() + repr.buffer_len());
        crate::router::write_eth(buf, rx.src_mac, mac);
        buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut p = Ipv4Packet::new_unchecked(&mut buf[ETH_LEN..]);
        ip.emit(&mut p, &caps);
        let (s, d) = (IpAddress::Ipv4(rx.ip.dst), IpAddress::Ipv4(rx.ip.src));
        repr.emit(
            &mut TcpPacket::new_unchecked(p.payload_mut()),
            &s,
            &d,
            &caps,
        );
        self.counters.resets_sent += 1;
        Verdict::Answered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_with_time() {
        let mut b = TokenBucket::new(10, 2);
        let t = Instant::from_millis;
        assert!(b.take(t(0)) && b.take(t(0)));
        assert!(!b.take(t(0)));
        assert!(!b.take(t(50)));
        assert!(b.take(t(100)));
        assert!(b.take(t(10_000)) && b.take(t(10_000)) && !b.take(t(10_000)));
    }
}
