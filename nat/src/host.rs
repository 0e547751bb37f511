//! The host-socket uplink's side of the router ("host mode").
//!
//! With no raw uplink and host mode on, a packet from a non-internal network to an address
//! outside every network leaves as [`Egress::Host`]: the bare IPv4 packet (TTL handled), for a
//! userspace stack that relays it over ordinary host sockets. TCP and UDP addressed to a
//! gateway go the same way (a published port's loopback client appears inside as the gateway
//! address, so its replies must reach the socket uplink); ping and ARP stay the gateway's.
//! No conntrack entry is made: the socket uplink keeps its own flows.
//!
//! The way back is [`Router::inject_from_host`]: an IPv4 packet for a container address gets
//! the Ethernet header the router knows (gateway MAC to endpoint MAC) and enters that network.

use std::net::Ipv4Addr;

use switchyard_switch::gso::{VnetHdr, GSO_TCPV4, VNET_F_NEEDS_CSUM};
use switchyard_switch::{DropReason, Instant};

use crate::config::{in_subnet, NetworkConfig, Verdict};
use crate::emit::{Egress, Emits};
use crate::packet::{self, L4Info, ETH_LEN};
use crate::router::{write_eth, Router, Rx};

impl Router {
    /// Send traffic for outside addresses to [`Egress::Host`] when there is no raw uplink.
    pub fn set_host_uplink(&mut self, on: bool) {
        self.host_uplink = on;
    }

    /// Host mode is on and no raw uplink overrides it.
    #[inline]
    pub fn host_mode(&self) -> bool {
        self.host_uplink && self.uplink.is_none()
    }

    /// The network whose subnet holds `ip` (subnets never overlap).
    pub fn network_for(&self, ip: Ipv4Addr) -> Option<&NetworkConfig> {
        self.nets
            .iter()
            .find(|n| in_subnet(ip, n.subnet, n.prefix_len))
    }

    /// Hand a packet to the host uplink, as a router would: TTL first.
    pub(crate) fn send_to_host(
        &mut self,
        rx: &Rx,
        l4: &L4Info,
        local: bool,
        out: &mut Emits,
    ) -> Verdict {
        if rx.ip.is_fragment() {
            // The socket uplink terminates flows; it needs whole datagrams.
            return Verdict::Dropped(DropReason::Fragment);
        }
        if !local && rx.ip.ttl <= 1 {
            return self.icmp_error_back(
                rx,
                Some(l4),
                crate::icmp::TIME_EXCEEDED_TTL,
                0,
                DropReason::TtlExceeded,
                out,
            );
        }
        let buf = out.push_copy(Egress::Host, rx.pkt());
        if !local {
            packet::dec_ttl(buf);
        }
        self.counters.host_out += 1;
        Verdict::Forwarded
    }

    /// An IPv4 packet from the host uplink for a container: it gets the gateway's and the
    /// endpoint's MACs and is emitted into the container's network. Internal networks, unknown
    /// addresses and packets over the network's MTU are dropped.
    pub fn inject_from_host(&mut self, pkt: &[u8], _now: Instant, out: &mut Emits) -> Verdict {
        let v = self.inject(pkt, None, out);
        if let Verdict::Dropped(r) = v {
            self.counters.drop(r);
        }
        v
    }

    /// [`Self::inject_from_host`] for a TCP super-packet of the host uplink, larger than the
    /// network's MTU: it enters the network as one GSO frame cut at `gso_size` payload bytes
    /// (each segment must fit the MTU), its TCP checksum field holding the pseudo-header sum
    /// (CHECKSUM_PARTIAL, as a vnet tap takes it; software segmentation recomputes it).
    pub fn inject_gso_from_host(
        &mut self,
        pkt: &[u8],
        gso_size: u16,
        _now: Instant,
        out: &mut Emits,
    ) -> Verdict {
        let v = self.inject(pkt, Some(gso_size), out);
        if let Verdict::Dropped(r) = v {
            self.counters.drop(r);
        }
        v
    }

    fn inject(&mut self, pkt: &[u8], gso_size: Option<u16>, out: &mut Emits) -> Verdict {
        let ip = match packet::parse_ip4(pkt) {
            Ok(ip) => ip,
            Err(r) => return Verdict::Dropped(r),
        };
        if ip.total < packet::MIN_IP || ip.total > pkt.len() {
            return Verdict::Dropped(DropReason::Malformed);
        }
        let Some(n) = self.network_for(ip.dst).copied() else {
            return Verdict::Dropped(DropReason::NoRoute);
        };
        if n.internal {
            return Verdict::Dropped(DropReason::NoRoute);
        }
        let Some(mac) = self.endpoint(n.id, ip.dst) else {
            return Verdict::Dropped(DropReason::NotForUs);
        };
        let (wire, hdr) = match gso_size {
            None => (ip.total, None),
            Some(g) => {
                let thl = pkt.get(ip.hlen + 12).map_or(0, |b| usize::from(b >> 4) * 4);
                if ip.proto != 6 || g == 0 || thl < 20 || ip.hlen + thl > ip.total {
                    return Verdict::Dropped(DropReason::Malformed);
                }
                if ip.is_fragment() {
                    // Segmentation (the kernel's or gso::finish) cuts whole TCP packets only.
                    return Verdict::Dropped(DropReason::Fragment);
                }
                let hdr = VnetHdr {
                    flags: VNET_F_NEEDS_CSUM,
                    gso_type: GSO_TCPV4,
                    hdr_len: (ETH_LEN + ip.hlen + thl) as u16,
                    gso_size: g,
                    csum_start: (ETH_LEN + ip.hlen) as u16,
                    csum_offset: 16,
                };
                (ip.hlen + thl + usize::from(g), Some(hdr))
            }
        };
        if wire > n.mtu {
            return Verdict::Dropped(DropReason::Oversize);
        }
        let buf = out.push_offloaded(Egress::Network(n.id), ETH_LEN + ip.total, hdr);
        write_eth(buf, mac, n.gateway_mac);
        buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        buf[ETH_LEN..].copy_from_slice(&pkt[..ip.total]);
        self.counters.host_in += 1;
        Verdict::Forwarded
    }
}
