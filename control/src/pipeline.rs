//! The in-memory packet pipeline: switch + router, no file descriptors.
//!
//! port rx -> `Switch` (learn, look up, flood within the network) -> router port -> `Router`
//! (ARP/ICMP, conntrack, SNAT/DNAT, hairpin) -> uplink, or back through the `Switch` -> port tx.
//! The daemon's dataplane loop, `switchyard replay` and the fuzz targets all drive this one
//! type, so what a capture does in replay is what the daemon does with it.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use switchyard_nat::{
    Egress as RouterEgress, Emits, NetworkConfig, PortForward, Router, RouterConfig, RxMeta,
    Verdict as RouterVerdict,
};
use switchyard_switch::{
    DropReason, Forward, Instant, MacAddr, NetworkId, PortId, PortKind, Switch, SwitchConfig,
};

use switchyard_switch::gso::{finish, segment_tcp4, VnetHdr, GSO_NONE, GSO_TCPV4};

use crate::dns::packet::{ip_frame, tcp_to, udp_frame, udp_packet, udp_to, DNS_PORT};
use crate::dns::{
    DnsConfig, DnsServer, DnsTcp, NetInfo, Output as DnsOut, TcpConfig, Transport, UpstreamTcp,
};
use crate::error::{Error, Result};

/// Where the pipeline sends a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Out {
    /// An endpoint port of the switch (never a router port: those are handled inside).
    Port(PortId),
    /// The uplink interface.
    Uplink,
}

/// Where offloaded frames go: the egress, the frame, and its virtio-net header if it keeps one
/// (a GSO super-frame or a partial checksum: an egress that cannot take it finishes it in
/// software, `switchyard_switch::gso::finish`).
pub type OffloadTx<'a> = dyn FnMut(Out, &[u8], Option<&VnetHdr>) -> bool + 'a;

/// An [`OffloadTx`] over a transmit that takes wire frames only: an offloaded frame is finished
/// in software first. Only offloaded input makes offloaded output, so for the callers of the
/// plain entry points this never cuts anything; it is there so nothing can leak.
fn wire_tx<'a>(
    tx: &'a mut dyn FnMut(Out, &[u8]) -> bool,
) -> impl FnMut(Out, &[u8], Option<&VnetHdr>) -> bool + 'a {
    move |o, f, h| match h {
        None => tx(o, f),
        Some(h) => {
            let mut ok = true;
            let r = finish(f, Some(h), &mut Vec::new(), &mut |w| ok &= tx(o, w));
            ok && r.is_ok()
        }
    }
}

/// What became of one input frame (replay's verdicts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Left by one port, translated or not.
    Forwarded,
    /// Flooded within its network.
    Flooded,
    /// Taken by the gateway or the uplink address and answered.
    Answered,
    /// Taken and kept (learned ARP reply, fragment held): nothing to send now.
    Consumed,
    Dropped(DropReason),
}

impl Verdict {
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::Flooded => "flooded",
            Verdict::Answered => "answered",
            // A frame the gateway took in without answering is, for a user, dropped here with
            // nothing wrong about it; replay reports it as forwarded to the gateway.
            Verdict::Consumed => "forwarded",
            Verdict::Dropped(_) => "dropped",
        }
    }

    pub fn reason(&self) -> Option<DropReason> {
        match self {
            Verdict::Dropped(r) => Some(*r),
            _ => None,
        }
    }
}

fn from_router(v: RouterVerdict) -> Verdict {
    match v {
        RouterVerdict::Forwarded => Verdict::Forwarded,
        RouterVerdict::Answered => Verdict::Answered,
        RouterVerdict::Consumed => Verdict::Consumed,
        RouterVerdict::Dropped(r) => Verdict::Dropped(r),
    }
}

/// Switch and router, wired together.
pub struct Pipeline {
    pub switch: Switch,
    pub router: Router,
    router_ports: HashMap<NetworkId, PortId>,
    emits: Emits,
    flood: Vec<PortId>,
    /// Bare IPv4 packets for the host-socket uplink from the last top-level call (host mode).
    host: Emits,
    /// Segments of an offloaded frame on their way to the router.
    seg: Vec<u8>,
    /// The embedded DNS server, at the gateway of every network it serves (none by default).
    pub dns: DnsServer,
    /// DNS over TCP at the same gateways (RFC 7766), answered by `dns`.
    pub dns_tcp: DnsTcp,
    /// Upstream DNS queries waiting for a host socket (no raw uplink): (upstream, message).
    dns_host: Vec<(SocketAddrV4, Vec<u8>)>,
    /// TCP exchanges with upstreams (after a truncated answer) from the raw uplink address.
    pub dns_up_tcp: UpstreamTcp,
    /// TCP exchanges waiting for a host socket (no raw uplink): (id, upstream, message).
    dns_host_tcp: Vec<(u16, SocketAddrV4, Vec<u8>)>,
}

impl Pipeline {
    pub fn new(switch: SwitchConfig, router: RouterConfig) -> Self {
        Pipeline {
            switch: Switch::new(switch),
            router: Router::new(router),
            router_ports: HashMap::new(),
            emits: Emits::new(),
            flood: Vec::new(),
            host: Emits::new(),
            seg: Vec::new(),
            dns: DnsServer::new(DnsConfig::default()),
            dns_tcp: DnsTcp::new(TcpConfig::default()),
            dns_host: Vec::new(),
            dns_up_tcp: UpstreamTcp::new(DnsConfig::default().tcp_timeout, 0x0d75_7c9a),
            dns_host_tcp: Vec::new(),
        }
    }

    /// Note which switch port is the router port of `net` (the caller adds the port itself).
    pub fn set_router_port(&mut self, net: NetworkId, port: Option<PortId>) {
        match port {
            Some(p) => self.router_ports.insert(net, p),
            None => self.router_ports.remove(&net),
        };
    }

    pub fn router_port(&self, net: NetworkId) -> Option<PortId> {
        self.router_ports.get(&net).copied()
    }

    /// Add a network the way the daemon does: the network in the switch and the router, and
    /// its router port `router_port` with the gateway MAC as a static entry. All or nothing.
    pub fn add_network(
        &mut self,
        cfg: NetworkConfig,
        router_port: PortId,
        now: Instant,
    ) -> Result<()> {
        self.switch
            .add_network(cfg.id, cfg.mtu)
            .map_err(|e| Error::conflict(e.to_string()))?;
        if let Err(e) = self.router.add_network(cfg) {
            let _ = self.switch.remove_network(cfg.id);
            return Err(Error::invalid(e.to_string()));
        }
        let kind = PortKind::Router;
        let mac = Some(cfg.gateway_mac);
        if let Err(e) = self
            .switch
            .add_port(router_port, cfg.id, kind, mac, false, now)
        {
            let _ = self.router.remove_network(cfg.id);
            let _ = self.switch.remove_network(cfg.id);
            return Err(Error::conflict(e.to_string()));
        }
        self.set_router_port(cfg.id, Some(router_port));
        Ok(())
    }

    /// Add an endpoint the way the daemon does: port `port` on `net` with `mac` as a static
    /// entry, its address told to the router (which then never ARPs for it), and its published
    /// ports (already expanded, one per host port). All or nothing.
    pub fn add_endpoint(
        &mut self,
        port: PortId,
        net: NetworkId,
        ip: Ipv4Addr,
        mac: MacAddr,
        forwards: &[PortForward],
        now: Instant,
    ) -> Result<()> {
        self.switch
            .add_port(port, net, PortKind::Endpoint, Some(mac), false, now)
            .map_err(|e| Error::conflict(e.to_string()))?;
        let undo = |p: &mut Pipeline, added: &[PortForward]| {
            for f in added {
                let _ = p.router.remove_forward(f.proto, f.host_ip, f.host_port);
            }
            p.router.remove_endpoint(net, ip);
            let _ = p.switch.remove_port(port);
        };
        if let Err(e) = self.router.add_endpoint(net, ip, mac) {
            undo(self, &[]);
            return Err(Error::invalid(e.to_string()));
        }
        for (i, f) in forwards.iter().enumerate() {
            if let Err(e) = self.router.add_forward(*f) {
                undo(self, &forwards[..i]);
                return Err(Error::conflict(e.to_string()));
            }
        }
        Ok(())
    }

    /// Housekeeping the daemon runs on a timer: MAC aging, conntrack and fragment expiry.
    pub fn expire(&mut self, now: Instant) {
        self.switch.expire(now);
        self.router.expire(now);
    }

    /// A frame received on endpoint port `ingress`. `tx` writes a frame out and says whether it
    /// was taken; refusals are counted as `TxFailed` on the egress port. Packets for the host
    /// uplink (host mode) are kept for [`Self::host_packets`] until the next call.
    ///
    /// Invariant of every entry point (the dataplane's workers rely on it to write after
    /// releasing the pipeline's lock): bytes of the input frame handed to `tx` are never
    /// changed afterwards by the same call. An in-place rewrite (the NAT on a GSO frame) comes
    /// before the frame's first output; a flooded frame is never rewritten.
    pub fn from_port(
        &mut self,
        ingress: PortId,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        tx: &mut dyn FnMut(Out, &[u8]) -> bool,
    ) -> Verdict {
        self.host.clear();
        self.port_rx(ingress, frame, meta, now, &mut wire_tx(tx))
    }

    /// Turn host mode on or off: with no raw uplink, traffic to outside addresses is handed to
    /// the caller through [`Self::host_packets`] instead of dropped.
    pub fn set_host_uplink(&mut self, on: bool) {
        self.router.set_host_uplink(on);
    }

    /// The bare IPv4 packets the last `from_port`/`from_uplink` call produced for the host uplink.
    pub fn host_packets(&self) -> impl Iterator<Item = &[u8]> {
        self.host.iter().map(|(_, p)| p)
    }

    /// An IPv4 packet from the host uplink for a container: framed by the router and delivered
    /// through the container's network. With `gso_size`, a TCP super-packet: it leaves as one
    /// GSO frame (`tx` is given its header: a vnet tap takes it whole, other ports cut it).
    pub fn from_host(
        &mut self,
        packet: &[u8],
        gso_size: Option<u16>,
        now: Instant,
        tx: &mut OffloadTx<'_>,
    ) -> Verdict {
        let mut emits = std::mem::take(&mut self.emits);
        emits.clear();
        let v = match gso_size {
            None => self.router.inject_from_host(packet, now, &mut emits),
            Some(g) => self.router.inject_gso_from_host(packet, g, now, &mut emits),
        };
        self.deliver(&emits, now, tx);
        self.emits = emits;
        from_router(v)
    }

    fn port_rx(
        &mut self,
        ingress: PortId,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        tx: &mut OffloadTx<'_>,
    ) -> Verdict {
        match self.switch.handle_frame(ingress, frame, now) {
            Forward::Drop(r) => Verdict::Dropped(r),
            Forward::Unicast(p) => self.output(p, frame, meta, now, tx, false),
            Forward::Flood(net) => {
                self.flood(net, ingress, |s, p| s.output(p, frame, meta, now, tx, true))
            }
        }
    }

    /// A flooded frame out of every port of `net` but `ingress`, each through `out`:
    /// `Answered` if the router answered it on any of them, else `Flooded`.
    fn flood(
        &mut self,
        net: NetworkId,
        ingress: PortId,
        mut out: impl FnMut(&mut Self, PortId) -> Verdict,
    ) -> Verdict {
        let mut ports = std::mem::take(&mut self.flood);
        ports.clear();
        ports.extend(self.switch.flood_ports(net, ingress));
        let mut verdict = Verdict::Flooded;
        for p in &ports {
            if let Verdict::Answered = out(self, *p) {
                verdict = Verdict::Answered;
            }
        }
        self.flood = ports;
        verdict
    }

    /// An offloaded frame from an endpoint port: a GSO super-frame and/or one whose L4 checksum
    /// is partial, as `hdr` describes. Endpoint egresses get it whole, with its header (`tx` is
    /// given `Some(hdr)`: a vnet-capable port passes it on, others finish it in software); the
    /// router translates an established TCP flow's super-frame whole, rewriting it in `frame`
    /// (no copy), and gets anything else cut into wire-sized segments with complete checksums.
    pub fn from_port_offloaded(
        &mut self,
        ingress: PortId,
        frame: &mut [u8],
        hdr: &VnetHdr,
        now: Instant,
        tx: &mut OffloadTx<'_>,
    ) -> Verdict {
        self.host.clear();
        self.port_rx_offloaded(ingress, frame, hdr, now, tx)
    }

    fn port_rx_offloaded(
        &mut self,
        ingress: PortId,
        frame: &mut [u8],
        hdr: &VnetHdr,
        now: Instant,
        tx: &mut OffloadTx<'_>,
    ) -> Verdict {
        // The size on the wire of one segment, for the MTU check (a lower bound: TCP options
        // are not counted, so a legal frame is never refused).
        let wire = if hdr.gso() == GSO_NONE {
            frame.len()
        } else {
            usize::from(hdr.csum_start) + 20 + usize::from(hdr.gso_size)
        };
        match self.switch.handle_frame_sized(ingress, frame, now, wire) {
            Forward::Drop(r) => Verdict::Dropped(r),
            Forward::Unicast(p) => self.output_offloaded(p, frame, hdr, now, tx, false),
            Forward::Flood(net) => self.flood(net, ingress, |s, p| {
                s.output_offloaded(p, frame, hdr, now, tx, true)
            }),
        }
    }

    fn output_offloaded(
        &mut self,
        port: PortId,
        frame: &mut [u8],
        hdr: &VnetHdr,
        now: Instant,
        tx: &mut OffloadTx<'_>,
        flooded: bool,
    ) -> Verdict {
        if self.switch.port_kind(port) != Some(PortKind::Router) {
            return if tx(Out::Port(port), frame, Some(hdr)) {
                self.switch.note_tx(port, frame.len());
                Verdict::Forwarded
            } else {
                self.switch.note_drop(port, DropReason::TxFailed);
                Verdict::Dropped(DropReason::TxFailed)
            };
        }
        if hdr.gso() == GSO_NONE {
            let meta = RxMeta {
                partial_csum: hdr.needs_csum(),
            };
            return self.output(port, frame, meta, now, tx, flooded);
        }
        if hdr.gso() != GSO_TCPV4 {
            self.switch.note_drop(port, DropReason::Unsupported);
            return Verdict::Dropped(DropReason::Unsupported);
        }
        // An established TCP flow: translated whole, in place. Anything else is cut here and
        // each segment takes the wire path (new flows, local traffic, ICMP errors, host mode).
        // A flooded frame is never the gateway's unicast (its MAC is a static entry) and goes
        // to other ports too: it stays as it came.
        if let (Some(net), false) = (self.switch.port_network(port), flooded) {
            let whole = self
                .router
                .handle_gso_from_network_in_place(net, frame, hdr, now);
            if let Some((egress, out_hdr)) = whole {
                self.switch.note_tx(port, frame.len());
                self.send_whole(egress, frame, &out_hdr, now, tx);
                return Verdict::Forwarded;
            }
        }
        let mut scratch = std::mem::take(&mut self.seg);
        let mut verdict = Verdict::Dropped(DropReason::Malformed);
        let r = segment_tcp4(frame, usize::from(hdr.gso_size), &mut scratch, &mut |seg| {
            verdict = self.output(port, seg, RxMeta::default(), now, tx, flooded);
        });
        self.seg = scratch;
        if r.is_err() {
            self.switch.note_drop(port, DropReason::Malformed);
        }
        verdict
    }

    /// A frame received on the uplink.
    pub fn from_uplink(
        &mut self,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        tx: &mut dyn FnMut(Out, &[u8]) -> bool,
    ) -> Verdict {
        self.host.clear();
        if self.dns_on_uplink(frame, meta, now, tx) {
            return Verdict::Forwarded;
        }
        let mut emits = std::mem::take(&mut self.emits);
        emits.clear();
        let v = self.router.handle_from_uplink(frame, meta, now, &mut emits);
        self.deliver(&emits, now, &mut wire_tx(tx));
        self.emits = emits;
        from_router(v)
    }

    /// A TCP GSO super-frame received on the uplink (`hdr`: GRO, or a TSO peer through
    /// PACKET_VNET_HDR): an established flow's is translated whole and leaves with its header
    /// (`tx` is given `Some`); anything else is cut and each segment taken by
    /// [`Self::from_uplink`]. Other offloads (UDP, IPv6 GSO) are dropped as unsupported.
    pub fn from_uplink_offloaded(
        &mut self,
        frame: &mut [u8],
        hdr: &VnetHdr,
        now: Instant,
        tx: &mut OffloadTx<'_>,
    ) -> Verdict {
        self.host.clear();
        if hdr.gso() == GSO_NONE {
            let meta = RxMeta {
                partial_csum: hdr.needs_csum(),
            };
            return self.from_uplink(frame, meta, now, &mut |o, f| tx(o, f, None));
        }
        if hdr.gso() != GSO_TCPV4 {
            return Verdict::Dropped(DropReason::Unsupported);
        }
        let whole = self.router.handle_gso_from_uplink_in_place(frame, hdr, now);
        if let Some((egress, out_hdr)) = whole {
            self.send_whole(egress, frame, &out_hdr, now, tx);
            return Verdict::Forwarded;
        }
        let mut scratch = std::mem::take(&mut self.seg);
        let mut verdict = Verdict::Dropped(DropReason::Malformed);
        let r = segment_tcp4(frame, usize::from(hdr.gso_size), &mut scratch, &mut |seg| {
            verdict = self.from_uplink(seg, RxMeta::default(), now, &mut |o, f| tx(o, f, None));
        });
        self.seg = scratch;
        if r.is_err() {
            return Verdict::Dropped(DropReason::Malformed);
        }
        verdict
    }

    fn output(
        &mut self,
        port: PortId,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        tx: &mut OffloadTx<'_>,
        flooded: bool,
    ) -> Verdict {
        if self.switch.port_kind(port) == Some(PortKind::Router) {
            let Some(net) = self.switch.port_network(port) else {
                return Verdict::Dropped(DropReason::UnknownPort);
            };
            if let Some(v) = self.dns_query(net, frame, meta, now, &mut |o, f| tx(o, f, None)) {
                self.switch.note_tx(port, frame.len());
                return v;
            }
            let mut emits = std::mem::take(&mut self.emits);
            emits.clear();
            let v = self
                .router
                .handle_from_network(net, frame, meta, now, &mut emits);
            match v {
                // A flooded broadcast the gateway has no use for is not a drop.
                RouterVerdict::Dropped(_) if flooded => {}
                RouterVerdict::Dropped(r) => self.switch.note_drop(port, r),
                _ => self.switch.note_tx(port, frame.len()),
            }
            self.deliver(&emits, now, tx);
            self.emits = emits;
            return from_router(v);
        }
        if tx(Out::Port(port), frame, None) {
            self.switch.note_tx(port, frame.len());
            Verdict::Forwarded
        } else {
            self.switch.note_drop(port, DropReason::TxFailed);
            Verdict::Dropped(DropReason::TxFailed)
        }
    }

    /// A super-frame the router translated in place: out of the uplink, or into a network
    /// through its router port, with its header.
    fn send_whole(
        &mut self,
        egress: RouterEgress,
        frame: &mut [u8],
        hdr: &VnetHdr,
        now: Instant,
        tx: &mut OffloadTx<'_>,
    ) {
        match egress {
            RouterEgress::Uplink => {
                tx(Out::Uplink, frame, Some(hdr));
            }
            RouterEgress::Network(net) => {
                if let Some(rp) = self.router_port(net) {
                    // The switch never hands a frame back by its ingress (the router port).
                    self.port_rx_offloaded(rp, frame, hdr, now, tx);
                }
            }
            // Host mode has no raw uplink, and then nothing is translated whole.
            RouterEgress::Host => {}
        }
    }

    /// Send what the router emitted: to the uplink as is, into a network through its router
    /// port; a GSO super-frame keeps its header on both ways.
    fn deliver(&mut self, emits: &Emits, now: Instant, tx: &mut OffloadTx<'_>) {
        for (egress, frame, hdr) in emits.iter_offloaded() {
            match egress {
                RouterEgress::Uplink => {
                    tx(Out::Uplink, frame, hdr);
                }
                RouterEgress::Host => {
                    self.host.push_copy(RouterEgress::Host, frame);
                }
                RouterEgress::Network(net) => {
                    if let Some(rp) = self.router_port(net) {
                        // From the router port the switch never hands a frame back to the
                        // router (no egress by the ingress port), so this cannot recurse.
                        match hdr {
                            // Only the Emits flavour of the router's GSO entry points makes
                            // these (the pipeline uses the in-place one): a copy is fine.
                            Some(h) => self.port_rx_offloaded(rp, &mut frame.to_vec(), h, now, tx),
                            None => self.port_rx(rp, frame, RxMeta::default(), now, tx),
                        };
                    }
                }
            }
        }
    }
}

/// The embedded DNS server's side of the pipeline: queries to a gateway's port 53 are taken
/// before the router (which would answer port-unreachable, or hand them to the socket
/// uplink), replies go back into the network from the gateway, upstream queries leave from
/// the raw uplink's address or wait in [`Pipeline::dns_take_upstream`] for a host socket.
impl Pipeline {
    /// Serve DNS at `net`'s gateway (`Some`), or stop (`None`: its names go too).
    pub fn set_dns_network(&mut self, net: NetworkId, info: Option<NetInfo>) {
        match info {
            Some(i) => self.dns.set_network(net, i),
            None => {
                self.dns.forget_network(net);
                self.dns_tcp.forget_network(net);
                self.dns_tcp.take_closed();
            }
        }
    }

    /// A query for `net`'s gateway port 53 from one of its endpoints: answered, forwarded or
    /// dropped here. `None`: not DNS for us; the router takes the frame.
    fn dns_query(
        &mut self,
        net: NetworkId,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        tx: &mut dyn FnMut(Out, &[u8]) -> bool,
    ) -> Option<Verdict> {
        let info = self.dns.names.network(net)?;
        let (gateway, mtu) = (info.gateway, info.mtu);
        let gw_mac = self.router.network_for(gateway)?.gateway_mac;
        let d = match udp_to(frame, gw_mac, gateway, meta.partial_csum) {
            Ok(Some(d)) => d,
            Ok(None) => {
                return self.dns_tcp_segment(net, gateway, gw_mac, mtu, frame, meta, now, tx)
            }
            Err(_) => return None,
        };
        if d.dst.port() != DNS_PORT {
            return None;
        }
        // Only the network's own endpoints are served (the table is keyed by the asker).
        if self.router.endpoint_mac(net, *d.src.ip()) != Some(d.src_mac) {
            return Some(Verdict::Dropped(DropReason::NotForUs));
        }
        let max_udp = mtu.saturating_sub(28);
        self.dns
            .handle_query(now, net, gateway, d.src, &frame[d.payload], max_udp);
        Some(if self.dns_flush(now, tx) {
            Verdict::Answered
        } else {
            Verdict::Consumed
        })
    }

    /// A TCP segment for `net`'s gateway port 53 from one of its endpoints: to its connection.
    /// `None`: not DNS over TCP for us (the router takes it: a bad checksum is its to count).
    #[allow(clippy::too_many_arguments)]
    fn dns_tcp_segment(
        &mut self,
        net: NetworkId,
        gateway: Ipv4Addr,
        gw_mac: MacAddr,
        mtu: usize,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        tx: &mut dyn FnMut(Out, &[u8]) -> bool,
    ) -> Option<Verdict> {
        let Ok(Some(s)) = tcp_to(frame, gw_mac, gateway, meta.partial_csum) else {
            return None;
        };
        if s.dst.port() != DNS_PORT {
            return None;
        }
        if self.router.endpoint_mac(net, *s.src.ip()) != Some(s.src_mac) {
            return Some(Verdict::Dropped(DropReason::NotForUs));
        }
        self.dns_tcp
            .segment(now, net, gateway, s.src, mtu, s.syn, &frame[s.packet]);
        Some(if self.dns_flush(now, tx) {
            Verdict::Answered
        } else {
            Verdict::Consumed
        })
    }

    /// When the DNS timers ([`Self::dns_expire`]) have something to do next.
    pub fn dns_poll_at(&self) -> Option<Instant> {
        [
            self.dns.poll_timeout(),
            self.dns_tcp.poll_at(),
            self.dns_up_tcp.poll_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// An upstream's answer to the uplink address (a datagram for a pending query, a segment
    /// for a TCP exchange): true when the DNS server took it.
    fn dns_on_uplink(
        &mut self,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        tx: &mut dyn FnMut(Out, &[u8]) -> bool,
    ) -> bool {
        if self.dns.pending_len() == 0 && self.dns_up_tcp.is_empty() {
            return false;
        }
        let Some(up) = self.router.uplink().copied() else {
            return false;
        };
        let (mac, addr, partial) = (up.mac, up.addr, meta.partial_csum);
        if let Ok(Some(d)) = udp_to(frame, mac, addr, partial) {
            if d.src.port() != DNS_PORT || !self.dns.expects(d.src, d.dst.port()) {
                return false;
            }
            self.dns
                .handle_upstream(now, d.src, Some(d.dst.port()), &frame[d.payload]);
        } else if let Ok(Some(s)) = tcp_to(frame, mac, addr, partial) {
            if !self.dns_up_tcp.takes(s.src, s.dst.port()) {
                return false;
            }
            self.dns_up_tcp.segment(now, &frame[s.packet]);
        } else {
            return false;
        }
        self.dns_flush(now, tx);
        true
    }

    /// The end of a TCP exchange with an upstream on a host socket: its answer or `None`.
    pub fn dns_from_host_tcp(
        &mut self,
        id: u16,
        answer: Option<&[u8]>,
        now: Instant,
        tx: &mut dyn FnMut(Out, &[u8]) -> bool,
    ) {
        self.dns.handle_upstream_tcp(now, id, answer);
        self.dns_flush(now, tx);
    }

    /// TCP exchanges for host sockets: (id, upstream, DNS message).
    pub fn dns_take_upstream_tcp(&mut self) -> Vec<(u16, SocketAddrV4, Vec<u8>)> {
        std::mem::take(&mut self.dns_host_tcp)
    }

    /// An upstream's answer received on a host socket.
    pub fn dns_from_host(
        &mut self,
        from: SocketAddrV4,
        payload: &[u8],
        now: Instant,
        tx: &mut dyn FnMut(Out, &[u8]) -> bool,
    ) {
        self.dns.handle_upstream(now, from, None, payload);
        self.dns_flush(now, tx);
    }

    /// Retry or fail overdue forwarded queries, run the TCP connections' timers (the
    /// dataplane calls it on its timer, [`Self::dns_poll_at`]).
    pub fn dns_expire(&mut self, now: Instant, tx: &mut dyn FnMut(Out, &[u8]) -> bool) {
        self.dns.expire(now);
        self.dns_tcp.expire(now);
        self.dns_up_tcp.expire(now);
        self.dns_flush(now, tx);
    }

    /// Are upstream queries or TCP exchanges waiting for host sockets?
    pub fn dns_host_pending(&self) -> bool {
        !self.dns_host.is_empty() || !self.dns_host_tcp.is_empty()
    }

    /// Upstream queries for a host socket: (upstream, DNS message).
    pub fn dns_take_upstream(&mut self) -> Vec<(SocketAddrV4, Vec<u8>)> {
        std::mem::take(&mut self.dns_host)
    }

    /// Send what the DNS server and its TCP connections produced, hand the queries read on
    /// the connections to the server, until neither has more; true when something went to a
    /// container.
    fn dns_flush(&mut self, now: Instant, tx: &mut dyn FnMut(Out, &[u8]) -> bool) -> bool {
        let mut sent = false;
        // Ends: every query read consumed bytes of a bounded receive buffer.
        loop {
            sent |= self.dns_flush_core(now, tx);
            let qs = self.dns_tcp.take_queries();
            for q in &qs {
                self.dns
                    .handle_query_tcp(now, q.net, q.server, q.client, q.conn, &q.payload);
            }
            sent |= self.dns_flush_core(now, tx);
            for q in &qs {
                let waiting = self.dns.tcp_pending(q.net, q.client, q.conn);
                self.dns_tcp.settle(now, q.conn, waiting);
            }
            for id in self.dns_tcp.take_closed() {
                self.dns.forget_tcp(id);
            }
            for (net, pkt) in self.dns_tcp.take_packets() {
                sent |= self.dns_tcp_send(net, &pkt, now, tx);
            }
            let results = self.dns_up_tcp.take_results();
            for (id, answer) in &results {
                self.dns.handle_upstream_tcp(now, *id, answer.as_deref());
            }
            for pkt in self.dns_up_tcp.take_packets() {
                self.send_from_uplink_addr(&pkt, now, tx);
            }
            if qs.is_empty() && results.is_empty() {
                return sent;
            }
        }
    }

    /// A TCP segment (bare IPv4) from the gateway of `net` to one of its endpoints.
    fn dns_tcp_send(
        &mut self,
        net: NetworkId,
        pkt: &[u8],
        now: Instant,
        tx: &mut dyn FnMut(Out, &[u8]) -> bool,
    ) -> bool {
        let (Some(src), Some(dst)) = (pkt.get(12..16), pkt.get(16..20)) else {
            return false;
        };
        let src = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
        let dst = Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]);
        let Some(mac) = self.router.endpoint_mac(net, dst) else {
            return false;
        };
        let Some(gw_mac) = self.router.network_for(src).map(|n| n.gateway_mac) else {
            return false;
        };
        let Some(rp) = self.router_port(net) else {
            return false;
        };
        let f = ip_frame(gw_mac, mac, pkt);
        self.port_rx(rp, &f, RxMeta::default(), now, &mut wire_tx(tx));
        true
    }

    /// Send what the DNS server produced (TCP replies to their connections); true when a
    /// reply went to a container.
    fn dns_flush_core(&mut self, now: Instant, tx: &mut dyn FnMut(Out, &[u8]) -> bool) -> bool {
        let outs: Vec<DnsOut> = self.dns.drain().collect();
        let mut replied = false;
        for o in outs {
            match o {
                DnsOut::Reply {
                    transport: Transport::Tcp(conn),
                    payload,
                    ..
                } => self.dns_tcp.reply(now, conn, &payload),
                DnsOut::Reply {
                    net,
                    server,
                    client,
                    payload,
                    ..
                } => {
                    let Some(mac) = self.router.endpoint_mac(net, *client.ip()) else {
                        continue;
                    };
                    let Some(gw_mac) = self.router.network_for(server).map(|n| n.gateway_mac)
                    else {
                        continue;
                    };
                    let Some(rp) = self.router_port(net) else {
                        continue;
                    };
                    let from = SocketAddrV4::new(server, DNS_PORT);
                    let f = udp_frame(gw_mac, mac, from, client, &payload);
                    self.port_rx(rp, &f, RxMeta::default(), now, &mut wire_tx(tx));
                    replied = true;
                }
                DnsOut::Upstream { to, port, payload } => {
                    match self.router.uplink().map(|u| u.addr) {
                        Some(addr) => {
                            let pkt = udp_packet(SocketAddrV4::new(addr, port), to, &payload);
                            self.send_from_uplink_addr(&pkt, now, tx);
                        }
                        None => self.dns_host.push((to, payload)),
                    }
                }
                DnsOut::UpstreamTcp {
                    id,
                    to,
                    port,
                    payload,
                } => match self.router.uplink().map(|u| u.addr) {
                    Some(addr) => {
                        let local = SocketAddrV4::new(addr, port);
                        self.dns_up_tcp.open(now, id, local, to, &payload);
                    }
                    None => self.dns_host_tcp.push((id, to, payload)),
                },
            }
        }
        replied
    }

    /// Our own packet (source: the uplink address) out of the raw uplink.
    fn send_from_uplink_addr(
        &mut self,
        pkt: &[u8],
        now: Instant,
        tx: &mut dyn FnMut(Out, &[u8]) -> bool,
    ) {
        let mut emits = std::mem::take(&mut self.emits);
        emits.clear();
        self.router.send_from_uplink_addr(pkt, now, &mut emits);
        self.deliver(&emits, now, &mut wire_tx(tx));
        self.emits = emits;
    }
}

#[cfg(test)]
#[path = "pipeline_gso_tests.rs"]
mod gso_tests;
