//! Packets the daemon itself sends and receives through the router's two sides (the embedded
//! DNS server: its replies into a network, its upstream queries from the uplink address).

use std::net::Ipv4Addr;

use switchyard_switch::{DropReason, Instant, MacAddr, NetworkId};

use crate::config::Verdict;
use crate::conntrack::UPLINK_ZONE;
use crate::emit::Emits;
use crate::packet::{self, ETH_LEN};
use crate::router::{write_eth, Router};

impl Router {
    /// The MAC of endpoint `ip` on `net`, as the gateway knows it.
    pub fn endpoint_mac(&self, net: NetworkId, ip: Ipv4Addr) -> Option<MacAddr> {
        self.endpoint(net, ip)
    }

    /// Send an IPv4 packet the daemon made (source: the uplink address) out of the raw uplink:
    /// the next hop is resolved like any routed packet's, with the packet held while ARP runs.
    /// No conntrack entry and no TTL change: it is our own packet.
    pub fn send_from_uplink_addr(&mut self, pkt: &[u8], now: Instant, out: &mut Emits) -> Verdict {
        let v = self.local_out(pkt, now, out);
        if let Verdict::Dropped(r) = v {
            self.counters.drop(r);
        }
        v
    }

    fn local_out(&mut self, pkt: &[u8], now: Instant, out: &mut Emits) -> Verdict {
        let Some(up) = self.uplink else {
            return Verdict::Dropped(DropReason::NoRoute);
        };
        let ip = match packet::parse_ip4(pkt) {
            Ok(ip) => ip,
            Err(r) => return Verdict::Dropped(r),
        };
        if ip.src != up.addr || ip.total > pkt.len() {
            return Verdict::Dropped(DropReason::Malformed);
        }
        if ip.total > self.cfg.uplink_mtu {
            return Verdict::Dropped(DropReason::Oversize);
        }
        let hop = match self.resolve(UPLINK_ZONE, ip.dst, now) {
            Ok(h) => h,
            Err(_) => return Verdict::Dropped(DropReason::NoRoute),
        };
        let buf = out.push(hop.egress, ETH_LEN + ip.total);
        write_eth(buf, hop.dst_mac.unwrap_or(MacAddr::ZERO), hop.src_mac);
        buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        buf[ETH_LEN..].copy_from_slice(&pkt[..ip.total]);
        self.finish_hop(hop, now, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Egress, RouterConfig, UplinkConfig};

    fn udp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        smoltcp::wire::Ipv4Packet::new_unchecked(&mut p[..]).fill_checksum();
        p
    }

    #[test]
    fn own_packets_leave_by_the_uplink_or_wait_for_arp() {
        let mut r = Router::new(RouterConfig::default());
        let me = Ipv4Addr::new(192, 0, 2, 10);
        let gw_mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let up = UplinkConfig {
            addr: me,
            prefix_len: 24,
            mac: MacAddr([2, 0, 0, 0, 0, 10]),
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
            gateway_mac: Some(gw_mac),
        };
        let mut out = Emits::new();
        let p = udp(me, Ipv4Addr::new(198, 51, 100, 53));
        assert_eq!(
            r.send_from_uplink_addr(&p, Instant::ZERO, &mut out),
            Verdict::Dropped(DropReason::NoRoute)
        );
        r.set_uplink(Some(up));
        assert_eq!(
            r.send_from_uplink_addr(&p, Instant::ZERO, &mut out),
            Verdict::Forwarded
        );
        let (e, f) = out.get(0).unwrap();
        assert_eq!(e, Egress::Uplink);
        assert_eq!(&f[0..6], &gw_mac.0);
        assert_eq!(&f[ETH_LEN..], &p[..]);
        // On-link, unknown neighbour: an ARP request goes out, the packet waits.
        out.clear();
        let v = r.send_from_uplink_addr(
            &udp(me, Ipv4Addr::new(192, 0, 2, 7)),
            Instant::ZERO,
            &mut out,
        );
        assert_eq!(v, Verdict::Consumed);
        assert_eq!(out.len(), 1);
        // Not from our address: refused.
        let v = r.send_from_uplink_addr(
            &udp(Ipv4Addr::new(10, 0, 0, 1), me),
            Instant::ZERO,
            &mut out,
        );
        assert_eq!(v, Verdict::Dropped(DropReason::Malformed));
    }
}
