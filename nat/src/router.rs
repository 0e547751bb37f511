//! The [`Router`]: configuration, the two entry points and the shared forwarding step.
//!
//! Every packet goes: size checks, L2 (ARP or IPv4 for us), IPv4 header validation, then either
//! local delivery (the gateway or uplink address answers), conntrack (an existing flow in
//! either direction), or a new flow (masquerade, port forward, hairpin). [`Router::forward`]
//! is the one place a tracked packet is rewritten and sent.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::Ipv4Addr;

use smoltcp::wire::{EthernetAddress, EthernetFrame, EthernetProtocol};
use switchyard_switch::mac_table::KeyHasher;
use switchyard_switch::{DropReason, Instant, MacAddr, NetworkId};

use crate::config::{
    in_subnet, NatError, NetworkConfig, Proto, RouterConfig, RxMeta, UplinkConfig, Verdict,
};
use crate::conntrack::tcp::TcpFlags;
use crate::conntrack::{ConnRef, Dir, Kind, Table, Zone, UPLINK_ZONE};
use crate::counters::{ConnInfo, NatCounters};
use crate::dnat::Forwards;
use crate::emit::{Egress, Emits};
use crate::fast::Hint;
use crate::frag::{FragKey, FragTable};
use crate::gateway::{Neighbors, TokenBucket};
use crate::packet::{self, Ip4, L4Info, ETH_LEN};
use crate::PortForward;

/// One received IPv4 packet, parsed once.
pub(crate) struct Rx<'a> {
    /// The frame, trimmed to the IPv4 total length (Ethernet padding dropped).
    pub frame: &'a [u8],
    pub ip: Ip4,
    pub zone: Zone,
    pub src_mac: MacAddr,
    pub meta: RxMeta,
    pub now: Instant,
}

impl Rx<'_> {
    #[inline]
    pub fn pkt(&self) -> &[u8] {
        &self.frame[ETH_LEN..]
    }
    #[inline]
    pub fn l4(&self) -> &[u8] {
        &self.frame[ETH_LEN + self.ip.hlen..]
    }
}

/// Where a packet leaves: the L2 addresses and the MTU of that side.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hop {
    pub egress: Egress,
    pub src_mac: MacAddr,
    /// `None`: the uplink next hop is being resolved; hold the frame.
    pub dst_mac: Option<MacAddr>,
    pub next_hop: Ipv4Addr,
    pub mtu: usize,
}

/// Why no hop: ICMP destination-unreachable codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unreachable {
    Net = 0,
    Host = 1,
}

type EndpointMap = HashMap<u64, MacAddr, BuildHasherDefault<KeyHasher>>;

fn ep_key(net: NetworkId, ip: Ipv4Addr) -> u64 {
    (u64::from(net.0) << 32) | u64::from(ip.to_bits())
}

/// All gateways of all networks, the uplink side and conntrack. Pure: time is an argument, the
/// output goes into an [`Emits`].
pub struct Router {
    pub(crate) cfg: RouterConfig,
    pub(crate) nets: Vec<NetworkConfig>,
    pub(crate) endpoints: EndpointMap,
    pub(crate) uplink: Option<UplinkConfig>,
    pub(crate) neigh: Neighbors,
    pub(crate) forwards: Forwards,
    pub(crate) table: Table,
    pub(crate) frags: FragTable,
    pub(crate) bucket: TokenBucket,
    pub(crate) rng: u64,
    pub(crate) counters: NatCounters,
    /// Outside traffic goes to [`Egress::Host`] when there is no raw uplink (see `host.rs`).
    pub(crate) host_uplink: bool,
}

impl Router {
    pub fn new(cfg: RouterConfig) -> Self {
        Router {
            table: Table::new(cfg.conntrack, cfg.seed),
            frags: FragTable::new(cfg.frag_max, cfg.frag_timeout),
            bucket: TokenBucket::new(cfg.icmp_rate_per_sec, cfg.icmp_burst),
            neigh: Neighbors::default(),
            rng: cfg.seed | 1,
            cfg,
            nets: Vec::new(),
            endpoints: EndpointMap::default(),
            uplink: None,
            forwards: Forwards::default(),
            counters: NatCounters::default(),
            host_uplink: false,
        }
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    pub fn add_network(&mut self, mut n: NetworkConfig) -> Result<(), NatError> {
        if n.id.0 == UPLINK_ZONE {
            return Err(NatError::ReservedNetworkId(n.id));
        }
        if n.prefix_len > 32 {
            return Err(NatError::InvalidPrefix(n.prefix_len));
        }
        if !in_subnet(n.gateway_ip, n.subnet, n.prefix_len) {
            return Err(NatError::GatewayOutsideSubnet(n.gateway_ip));
        }
        if self.net(n.id).is_some() {
            return Err(NatError::NetworkExists(n.id));
        }
        n.subnet = Ipv4Addr::from_bits(n.subnet.to_bits() & crate::config::mask(n.prefix_len));
        self.nets.push(n);
        Ok(())
    }

    /// Remove a network with its endpoints, forwards and connections.
    pub fn remove_network(&mut self, id: NetworkId) -> Result<(), NatError> {
        let i = self
            .nets
            .iter()
            .position(|n| n.id == id)
            .ok_or(NatError::UnknownNetwork(id))?;
        self.nets.swap_remove(i);
        self.endpoints.retain(|k, _| (k >> 32) as u16 != id.0);
        self.forwards.retain(|f| f.network != id);
        self.table.retain(|c| c.network != id);
        self.frags.clear();
        self.sync_table_stats();
        Ok(())
    }

    /// Set or clear the uplink. A new address ends every connection that used the old one.
    pub fn set_uplink(&mut self, u: Option<UplinkConfig>) {
        let old = self.uplink.map(|u| u.addr);
        if old != u.map(|u| u.addr) {
            self.table.retain(|_| false);
            self.frags.clear();
        }
        if self.uplink != u {
            self.neigh.clear();
        }
        self.uplink = u;
        self.sync_table_stats();
    }

    pub fn uplink(&self) -> Option<&UplinkConfig> {
        self.uplink.as_ref()
    }

    /// Tell the gateway an endpoint's MAC (it never ARPs for endpoints).
    pub fn add_endpoint(
        &mut self,
        net: NetworkId,
        ip: Ipv4Addr,
        mac: MacAddr,
    ) -> Result<(), NatError> {
        let n = self.net(net).ok_or(NatError::UnknownNetwork(net))?;
        if !in_subnet(ip, n.subnet, n.prefix_len) {
            return Err(NatError::AddressOutsideSubnet(ip));
        }
        self.endpoints.insert(ep_key(net, ip), mac);
        Ok(())
    }

    /// Forget an endpoint and end its connections.
    pub fn remove_endpoint(&mut self, net: NetworkId, ip: Ipv4Addr) {
        if self.endpoints.remove(&ep_key(net, ip)).is_none() {
            return;
        }
        self.table.retain(|c| {
            let inside = match c.kind() {
                Kind::Snat => c.tuple[0].src == ip,
                Kind::Dnat => c.tuple[1].src == ip,
                Kind::Hairpin => c.tuple[0].src == ip || c.tuple[1].src == ip,
            };
            !(c.network == net && inside)
        });
        self.sync_table_stats();
    }

    pub fn add_forward(&mut self, f: PortForward) -> Result<(), NatError> {
        let n = self
            .net(f.network)
            .ok_or(NatError::UnknownNetwork(f.network))?;
        if !in_subnet(f.container_ip, n.subnet, n.prefix_len) {
            return Err(NatError::AddressOutsideSubnet(f.container_ip));
        }
        self.forwards.add(f)
    }

    /// Unpublish a port and end the connections it carried.
    pub fn remove_forward(
        &mut self,
        proto: Proto,
        host_ip: Option<Ipv4Addr>,
        host_port: u16,
    ) -> Result<(), NatError> {
        let f = self.forwards.remove(proto, host_ip, host_port)?;
        let l4 = crate::dnat::l4_of(f.proto);
        self.table.retain(|c| {
            let o = &c.tuple[0];
            let hit = c.kind() != Kind::Snat
                && c.network == f.network
                && o.proto == l4
                && o.dport == f.host_port
                && c.tuple[1].src == f.container_ip
                && c.tuple[1].sport == f.container_port;
            !hit
        });
        self.sync_table_stats();
        Ok(())
    }

    /// Every published port, sorted.
    pub fn forwards(&self) -> Vec<PortForward> {
        self.forwards.list()
    }

    /// Collect expired connections, fragment notes and unanswered ARP holds.
    pub fn expire(&mut self, now: Instant) {
        self.table.expire(now);
        self.frags.expire(now);
        let dropped = self.neigh.expire(now, self.cfg.arp_timeout);
        self.counters.drops[DropReason::NoNeighbor.index()] += dropped;
        self.sync_table_stats();
    }

    /// When [`Self::expire`] has something to do next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.table.next_expiry(),
            self.frags.next_expiry(),
            self.neigh.next_expiry(self.cfg.arp_timeout),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Live connections at `now`.
    pub fn conntrack(&self, now: Instant) -> Vec<ConnInfo> {
        self.table
            .iter_live(now)
            .map(|(c, left)| ConnInfo::new(c, left))
            .collect()
    }

    pub fn counters(&self) -> &NatCounters {
        &self.counters
    }

    /// Connections held (including expired ones not yet collected).
    pub fn conntrack_len(&self) -> usize {
        self.table.len()
    }

    /// Bytes used by the conntrack table's storage.
    pub fn conntrack_memory(&self) -> usize {
        self.table.memory_bytes()
    }

    /// A frame the switch delivered to the router port of network `net` (dst MAC = gateway MAC
    /// or broadcast).
    pub fn handle_from_network(
        &mut self,
        net: NetworkId,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
    ) -> Verdict {
        self.hinted_from_network(net, frame, meta, now, out, None)
    }

    /// [`Self::handle_from_network`] with the batch path's hashed key, if any.
    #[inline(always)]
    fn hinted_from_network(
        &mut self,
        net: NetworkId,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
        hint: Option<Hint>,
    ) -> Verdict {
        if self
            .fast_from_network(net, frame, meta, now, out, hint)
            .is_some()
        {
            // No `finish`: a forwarded packet counts no drop, and the fast path changes no
            // table statistics, so the counters' copy of them is still current.
            return Verdict::Forwarded;
        }
        let v = self.network_rx(net, frame, meta, now, out);
        self.finish(v)
    }

    /// A frame received on the uplink interface.
    pub fn handle_from_uplink(
        &mut self,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
    ) -> Verdict {
        self.hinted_from_uplink(frame, meta, now, out, None)
    }

    /// [`Self::handle_from_uplink`] with the batch path's hashed key, if any.
    #[inline(always)]
    fn hinted_from_uplink(
        &mut self,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
        hint: Option<Hint>,
    ) -> Verdict {
        if self.fast_from_uplink(frame, meta, now, out, hint).is_some() {
            // No `finish`: see `hinted_from_network`.
            return Verdict::Forwarded;
        }
        let v = self.uplink_rx(frame, meta, now, out);
        self.finish(v)
    }

    /// [`Self::handle_from_network`] for several frames received together on `net`'s router
    /// port, one verdict per frame pushed to `verdicts`. Same results, in the same order, as
    /// calling it per frame; faster because the conntrack reads of the next frames are under
    /// way while one is handled (see `Router::pipelined`).
    pub fn handle_batch_from_network(
        &mut self,
        net: NetworkId,
        frames: &[&[u8]],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
        verdicts: &mut Vec<Verdict>,
    ) {
        self.pipelined(net.0, frames, verdicts, |r, f, h| {
            r.hinted_from_network(net, f, meta, now, out, h)
        });
    }

    /// [`Self::handle_from_uplink`] for several frames received together (see
    /// [`Self::handle_batch_from_network`]).
    pub fn handle_batch_from_uplink(
        &mut self,
        frames: &[&[u8]],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
        verdicts: &mut Vec<Verdict>,
    ) {
        self.pipelined(UPLINK_ZONE, frames, verdicts, |r, f, h| {
            r.hinted_from_uplink(f, meta, now, out, h)
        });
    }

    #[inline]
    pub(crate) fn finish(&mut self, v: Verdict) -> Verdict {
        if let Verdict::Dropped(r) = v {
            self.counters.drop(r);
        }
        self.sync_table_stats();
        v
    }

    #[inline]
    fn sync_table_stats(&mut self) {
        let s = self.table.stats;
        self.counters.flows_created = s.created;
        self.counters.flows_expired = s.expired;
        self.counters.flows_evicted = s.evicted;
        self.counters.flows_removed = s.removed;
    }

    #[inline]
    pub(crate) fn net(&self, id: NetworkId) -> Option<&NetworkConfig> {
        self.nets.iter().find(|n| n.id == id)
    }

    #[inline]
    pub(crate) fn endpoint(&self, net: NetworkId, ip: Ipv4Addr) -> Option<MacAddr> {
        self.endpoints.get(&ep_key(net, ip)).copied()
    }

    pub(crate) fn network_rx(
        &mut self,
        net: NetworkId,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
    ) -> Verdict {
        let Some(n) = self.net(net).copied() else {
            return Verdict::Dropped(DropReason::UnknownPort);
        };
        if frame.len() < ETH_LEN {
            return Verdict::Dropped(DropReason::Runt);
        }
        if frame.len() > n.mtu + switchyard_switch::frame::ETH_OVERHEAD {
            return Verdict::Dropped(DropReason::Oversize);
        }
        let eth = EthernetFrame::new_unchecked(frame);
        match eth.ethertype() {
            EthernetProtocol::Arp => return self.arp_from_network(&n, frame, out),
            EthernetProtocol::Ipv4 => {}
            _ => return Verdict::Dropped(DropReason::Unsupported),
        }
        if eth.dst_addr() != EthernetAddress::from(n.gateway_mac) {
            return Verdict::Dropped(DropReason::NotForUs);
        }
        let rx = match parse_rx(frame, net.0, meta, now) {
            Ok(rx) => rx,
            Err(r) => return Verdict::Dropped(r),
        };
        let dst = rx.ip.dst;
        if dst.is_broadcast() || dst.is_multicast() || dst == subnet_broadcast(&n) {
            return Verdict::Dropped(DropReason::NotForUs);
        }
        let to_gateway = dst == n.gateway_ip;
        let to_uplink = self.uplink.is_some_and(|u| u.addr == dst);
        if !to_gateway {
            if !to_uplink && in_subnet(dst, n.subnet, n.prefix_len) {
                // On-link: the switch delivers these; the router does not bounce them back.
                return Verdict::Dropped(DropReason::NotForUs);
            }
            if !to_uplink
                && self.nets.iter().any(|o| {
                    o.id != net && (in_subnet(dst, o.subnet, o.prefix_len) || dst == o.gateway_ip)
                })
            {
                return Verdict::Dropped(DropReason::InterNetwork);
            }
            if n.internal || (self.uplink.is_none() && !self.host_uplink) {
                return Verdict::Dropped(DropReason::NoRoute);
            }
        }
        let host = self.host_mode() && !n.internal;
        if rx.ip.is_later_fragment() {
            if host && !to_gateway {
                return Verdict::Dropped(DropReason::Fragment);
            }
            return self.forward_fragment(&rx, out);
        }
        let l4 = match packet::parse_l4(&rx.ip, rx.l4(), verify_l4(&rx)) {
            Ok(l4) => l4,
            Err(r) => return Verdict::Dropped(r),
        };
        if host {
            let transport = matches!(l4, L4Info::Tcp { .. } | L4Info::Udp { .. });
            if !to_gateway {
                return self.send_to_host(&rx, &l4, false, out);
            }
            if transport {
                return self.send_to_host(&rx, &l4, true, out);
            }
        }
        if let L4Info::IcmpError { .. } = l4 {
            return self.translate_icmp_error(&rx, out);
        }
        let Some(key) = l4.tuple(&rx.ip) else {
            return Verdict::Dropped(DropReason::Unsupported);
        };
        if let Some((r, dir)) = self.table.lookup(rx.zone, &key, now) {
            return self.forward(&rx, &l4, r, dir, out);
        }
        if to_gateway {
            return self.local_delivery(&rx, &l4, out);
        }
        if to_uplink {
            if matches!(l4, L4Info::Echo { .. }) {
                return self.local_delivery(&rx, &l4, out);
            }
            return self.hairpin(&rx, &n, &l4, key, out);
        }
        self.masquerade(&rx, &n, &l4, key, out)
    }

    pub(crate) fn uplink_rx(
        &mut self,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
    ) -> Verdict {
        let Some(up) = self.uplink else {
            return Verdict::Dropped(DropReason::NoRoute);
        };
        if frame.len() < ETH_LEN {
            return Verdict::Dropped(DropReason::Runt);
        }
        if frame.len() > self.cfg.uplink_mtu + switchyard_switch::frame::ETH_OVERHEAD {
            return Verdict::Dropped(DropReason::Oversize);
        }
        let eth = EthernetFrame::new_unchecked(frame);
        match eth.ethertype() {
            EthernetProtocol::Arp => return self.arp_from_uplink(&up, frame, now, out),
            EthernetProtocol::Ipv4 => {}
            _ => return Verdict::Dropped(DropReason::Unsupported),
        }
        if eth.dst_addr() != EthernetAddress::from(up.mac) {
            return Verdict::Dropped(DropReason::NotForUs);
        }
        let rx = match parse_rx(frame, UPLINK_ZONE, meta, now) {
            Ok(rx) => rx,
            Err(r) => return Verdict::Dropped(r),
        };
        if rx.ip.dst != up.addr {
            // Container addresses are private: nothing from outside reaches them directly.
            return Verdict::Dropped(DropReason::NotForUs);
        }
        if rx.ip.is_later_fragment() {
            return self.forward_fragment(&rx, out);
        }
        let l4 = match packet::parse_l4(&rx.ip, rx.l4(), verify_l4(&rx)) {
            Ok(l4) => l4,
            Err(r) => return Verdict::Dropped(r),
        };
        if let L4Info::IcmpError { .. } = l4 {
            return self.translate_icmp_error(&rx, out);
        }
        let Some(key) = l4.tuple(&rx.ip) else {
            return Verdict::Dropped(DropReason::Unsupported);
        };
        if let Some((r, dir)) = self.table.lookup(UPLINK_ZONE, &key, now) {
            return self.forward(&rx, &l4, r, dir, out);
        }
        match l4 {
            L4Info::Echo { request: true, .. } => self.local_delivery(&rx, &l4, out),
            L4Info::Tcp { .. } | L4Info::Udp { .. } => {
                match self.forwards.find(key.proto, up.addr, key.dport) {
                    Some(f) => self.port_forward(&rx, &l4, key, f, out),
                    None => Verdict::Dropped(DropReason::NotForUs),
                }
            }
            _ => Verdict::Dropped(DropReason::NotForUs),
        }
    }

    /// Where a packet for `dst` leaves when it goes to `zone`.
    #[inline]
    pub(crate) fn resolve(
        &mut self,
        zone: Zone,
        dst: Ipv4Addr,
        now: Instant,
    ) -> Result<Hop, Unreachable> {
        if zone == UPLINK_ZONE {
            let up = self.uplink.ok_or(Unreachable::Net)?;
            let next_hop = if in_subnet(dst, up.addr, up.prefix_len) {
                dst
            } else {
                up.gateway.ok_or(Unreachable::Net)?
            };
            let dst_mac = match up.gateway_mac {
                Some(m) if Some(next_hop) == up.gateway => Some(m),
                _ => self.neigh.lookup(next_hop, now),
            };
            return Ok(Hop {
                egress: Egress::Uplink,
                src_mac: up.mac,
                dst_mac,
                next_hop,
                mtu: self.cfg.uplink_mtu,
            });
        }
        let id = NetworkId(zone);
        let n = *self.net(id).ok_or(Unreachable::Net)?;
        let mac = self.endpoint(id, dst).ok_or(Unreachable::Host)?;
        Ok(Hop {
            egress: Egress::Network(id),
            src_mac: n.gateway_mac,
            dst_mac: Some(mac),
            next_hop: dst,
            mtu: n.mtu,
        })
    }

    /// The checks every routed packet passes before it is rewritten: TTL, a way out, the MTU.
    /// `Err` carries the verdict (an ICMP error may have been sent).
    #[inline]
    pub(crate) fn route_checks(
        &mut self,
        rx: &Rx,
        l4: Option<&L4Info>,
        zone: Zone,
        dst: Ipv4Addr,
        out: &mut Emits,
    ) -> Result<Hop, Verdict> {
        if rx.ip.ttl <= 1 {
            return Err(self.icmp_error_back(
                rx,
                l4,
                crate::icmp::TIME_EXCEEDED_TTL,
                0,
                DropReason::TtlExceeded,
                out,
            ));
        }
        let hop = match self.resolve(zone, dst, rx.now) {
            Ok(h) => h,
            Err(u) => {
                let reason = if u == Unreachable::Net {
                    DropReason::NoRoute
                } else {
                    DropReason::NotForUs
                };
                return Err(self.icmp_error_back(
                    rx,
                    l4,
                    crate::icmp::unreachable(u as u8),
                    0,
                    reason,
                    out,
                ));
            }
        };
        if rx.ip.total > hop.mtu {
            if rx.ip.df {
                let mtu = hop.mtu.min(0xffff) as u32;
                return Err(self.icmp_error_back(
                    rx,
                    l4,
                    crate::icmp::FRAG_NEEDED,
                    mtu,
                    DropReason::Oversize,
                    out,
                ));
            }
            // Not fragmented here: see the crate doc.
            return Err(Verdict::Dropped(DropReason::Oversize));
        }
        Ok(hop)
    }

    /// Rewrite and send a packet of tracked connection `r` travelling in `dir`.
    #[inline]
    pub(crate) fn forward(
        &mut self,
        rx: &Rx,
        l4: &L4Info,
        r: ConnRef,
        dir: Dir,
        out: &mut Emits,
    ) -> Verdict {
        let Some(c) = self.table.get(r) else {
            return Verdict::Dropped(DropReason::NotForUs);
        };
        let to = c.target(dir);
        let ezone = c.zone[dir.other().idx()];
        let kind = c.kind();
        let hop = match self.route_checks(rx, Some(l4), ezone, to.dst, out) {
            Ok(h) => h,
            Err(v) => return v,
        };
        let tcp = match *l4 {
            L4Info::Tcp { flags, .. } => Some(TcpFlags::from_byte(flags)),
            _ => None,
        };
        self.table.on_packet(r, dir, tcp, rx.now);
        let buf = out.push_copy(hop.egress, rx.frame);
        write_eth(buf, hop.dst_mac.unwrap_or(MacAddr::ZERO), hop.src_mac);
        let pkt = &mut buf[ETH_LEN..];
        packet::rewrite(pkt, &rx.ip, l4, &to, rx.meta.partial_csum);
        packet::dec_ttl(pkt);
        if rx.ip.mf {
            let key = frag_key(rx);
            self.frags.record(key, r, dir, rx.now);
        }
        self.count_translated(kind, rx.zone, ezone, 1);
        self.finish_hop(hop, rx.now, out)
    }

    /// A later fragment: the address rewrite its first fragment got.
    fn forward_fragment(&mut self, rx: &Rx, out: &mut Emits) -> Verdict {
        let Some((r, dir)) = self.frags.lookup(&frag_key(rx), rx.now) else {
            return Verdict::Dropped(DropReason::Fragment);
        };
        let Some(c) = self.table.get_live(r, rx.now) else {
            return Verdict::Dropped(DropReason::Fragment);
        };
        let to = c.target(dir);
        let ezone = c.zone[dir.other().idx()];
        let kind = c.kind();
        let hop = match self.route_checks(rx, None, ezone, to.dst, out) {
            Ok(h) => h,
            Err(v) => return v,
        };
        self.table.on_packet(r, dir, None, rx.now);
        let buf = out.push_copy(hop.egress, rx.frame);
        write_eth(buf, hop.dst_mac.unwrap_or(MacAddr::ZERO), hop.src_mac);
        let pkt = &mut buf[ETH_LEN..];
        packet::rewrite_addrs(pkt, to.src, to.dst);
        packet::dec_ttl(pkt);
        self.counters.fragments_translated += 1;
        self.count_translated(kind, rx.zone, ezone, 1);
        self.finish_hop(hop, rx.now, out)
    }

    /// The frame just pushed goes out now, or waits for ARP on the uplink.
    #[inline]
    pub(crate) fn finish_hop(&mut self, hop: Hop, now: Instant, out: &mut Emits) -> Verdict {
        if hop.dst_mac.is_some() {
            return Verdict::Forwarded;
        }
        let Some(up) = self.uplink else {
            out.pop();
            return Verdict::Dropped(DropReason::NoRoute);
        };
        let frame = out
            .get(out.len() - 1)
            .map(|(_, f)| f.to_vec())
            .unwrap_or_default();
        out.pop();
        self.hold_for_arp(&up, hop.next_hop, frame, now, out)
    }

    #[inline]
    pub(crate) fn count_translated(&mut self, kind: Kind, from: Zone, to: Zone, packets: u64) {
        if kind == Kind::Hairpin {
            self.counters.hairpinned += packets;
        } else if to == UPLINK_ZONE {
            self.counters.translated_out += packets;
        } else if from == UPLINK_ZONE {
            self.counters.translated_in += packets;
        }
    }
}

fn subnet_broadcast(n: &NetworkConfig) -> Ipv4Addr {
    Ipv4Addr::from_bits(n.subnet.to_bits() | !crate::config::mask(n.prefix_len))
}

#[inline]
fn verify_l4(rx: &Rx) -> bool {
    !rx.meta.partial_csum && !rx.ip.is_fragment()
}

pub(crate) fn frag_key(rx: &Rx) -> FragKey {
    FragKey {
        zone: rx.zone,
        src: rx.ip.src,
        dst: rx.ip.dst,
        ident: rx.ip.ident,
        proto: rx.ip.proto,
    }
}

#[inline]
pub(crate) fn write_eth(buf: &mut [u8], dst: MacAddr, src: MacAddr) {
    buf[0..6].copy_from_slice(&dst.0);
    buf[6..12].copy_from_slice(&src.0);
}

/// Validate the IPv4 header of an Ethernet frame and trim the frame to the IP total length.
#[inline]
fn parse_rx(frame: &[u8], zone: Zone, meta: RxMeta, now: Instant) -> Result<Rx<'_>, DropReason> {
    let ip = packet::parse_ip4(&frame[ETH_LEN..])?;
    if ip.total < packet::MIN_IP {
        return Err(DropReason::Malformed);
    }
    let src_mac = MacAddr::src_of(frame).unwrap_or(MacAddr::ZERO);
    if ip.src.is_broadcast() || ip.src.is_multicast() || ip.src.is_unspecified() {
        return Err(DropReason::Malformed);
    }
    Ok(Rx {
        frame: &frame[..ETH_LEN + ip.total],
        ip,
        zone,
        src_mac,
        meta,
        now,
    })
}
