#![no_main]
//! Frames from the containers and from the uplink, with time steps and expiry, through the
//! pipeline the daemon runs (the fuzz topology: three networks, one internal, published ports,
//! a 16-flow conntrack table), some as TCP GSO super-frames with a virtio-net header (the
//! offloaded entry points). Invariants: every IPv4 packet the router emits has valid IP and
//! TCP/UDP/ICMP checksums (UDP zero allowed; a GSO frame's once cut); the conntrack table
//! stays within its maximum; nothing larger than the egress MTU plus 18 leaves without a
//! header, and a frame with one is a TCPv4 GSO frame whose segments fit; nothing leaves by
//! its ingress port or into another network; nothing leaves by a raw uplink that is not there.
//!
//! Other ops switch the uplink mode (raw, host socket, both, none) and hand the router bare
//! IPv4 packets from the host uplink (`Pipeline::from_host`, plain or as TCP super-packets),
//! as the socket uplink does in rootless mode. Invariants there: a packet the router hands to
//! the host uplink is a whole IPv4 packet (total length, header checksum, L4 checksum unless
//! the frame's was partial), from a non-internal network and within its MTU, and only in host
//! mode; a packet from the host uplink leaves only into the network of its destination, as
//! that packet behind the gateway's and the endpoint's MACs, within the MTU, and as GSO only
//! a TCPv4 frame that `gso::finish` cuts into valid segments that fit.
//!
//! Every frame also goes, as it is and without the switch in front, to the routers of a
//! [`Twins`]: one takes them in runs through the batch entry points, the other one at a time,
//! and both must agree on everything after each run (see `switchyard_fuzz::batch`).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard_control::pipeline::{Out, Pipeline};
use switchyard_control::topology::Topology;
use switchyard_fuzz::batch::Twins;
use switchyard_fuzz::{
    checksum_error, decode_ops, gso_hdr, host_gso_size, ip_checksum_error, Op, CONNTRACK_MAX,
    HOST_OP, MODE_OP, TOPOLOGY,
};
use switchyard_nat::{RxMeta, UplinkConfig};
use switchyard_switch::frame::ETH_OVERHEAD;
use switchyard_switch::gso::{complete_checksum, finish, segment_tcp4, VnetHdr, GSO_TCPV4};
use switchyard_switch::{Instant, MacAddr, PortId};

/// Per endpoint port: its network (index), that network's MTU and gateway MAC.
type PortInfo = HashMap<PortId, (usize, usize, MacAddr)>;

/// A [`MODE_OP`]: the raw uplink back or away, the host uplink on or off.
fn set_mode(p: &mut Pipeline, raw: Option<UplinkConfig>, flags: u8) {
    p.router.set_uplink(raw.filter(|_| flags & 2 == 0));
    p.set_host_uplink(flags & 1 != 0);
}

/// A [`HOST_OP`]: the frame as a packet from the host uplink, and what comes of it.
fn from_host(p: &mut Pipeline, topo: &Topology, info: &PortInfo, op: &Op, now: Instant) {
    let pkt = &op.frame.0;
    let dst = pkt
        .get(16..20)
        .map(|d| Ipv4Addr::new(d[0], d[1], d[2], d[3]));
    let mut scratch = Vec::new();
    let mut tx = |o: Out, f: &[u8], h: Option<&VnetHdr>| {
        let Out::Port(id) = o else {
            panic!("a packet from the host uplink left by the raw uplink");
        };
        let (net, mtu, gw) = info[&id];
        let n = &topo.networks[net];
        assert!(
            !n.internal,
            "a packet from the host uplink entered an internal network"
        );
        assert!(
            dst.is_some_and(|d| n.subnet.contains(d)),
            "a packet from the host uplink entered a network not its destination's"
        );
        let ep = topo.endpoints.iter().find(|e| Some(e.ip) == dst);
        assert_eq!(MacAddr::src_of(f), Some(gw), "not from the gateway's MAC");
        assert_eq!(
            f.get(..6),
            ep.map(|e| &e.mac.0[..]),
            "not to the endpoint's MAC"
        );
        assert_eq!(f.get(12..14), Some(&[8, 0][..]));
        let len = f.len().saturating_sub(14);
        assert_eq!(f.get(14..), pkt.get(..len), "not the packet as it came");
        match h {
            None => assert!(f.len() <= mtu + 14, "{} bytes into MTU {mtu}", f.len()),
            Some(h) => {
                assert_eq!(h.gso(), GSO_TCPV4, "a header that is not TCPv4 GSO");
                finish(f, Some(h), &mut scratch, &mut |s| {
                    assert!(
                        s.len() <= mtu + 14,
                        "a {} byte segment into MTU {mtu}",
                        s.len()
                    );
                    if let Some(e) = checksum_error(s) {
                        panic!("a segment with a bad {e}: {s:02x?}");
                    }
                })
                .expect("a GSO frame from the host uplink finishes");
            }
        }
        true
    };
    p.from_host(pkt, host_gso_size(op.flags), now, &mut tx);
}

static TOPO: OnceLock<(Topology, PortInfo)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (topo, info) = TOPO.get_or_init(|| {
        let t = Topology::parse(TOPOLOGY).expect("fuzz topology");
        assert_eq!(t.conntrack_max, CONNTRACK_MAX);
        let info = t
            .endpoints
            .iter()
            .map(|e| {
                let n = &t.networks[e.network];
                (e.port, (e.network, n.mtu as usize, n.gateway_mac))
            })
            .collect();
        (t, info)
    });
    let mut p = topo.build(Instant::ZERO).expect("fuzz topology builds");
    let mut twins = Twins::new(|| {
        topo.build(Instant::ZERO)
            .expect("fuzz topology builds")
            .router
    });
    let raw = p.router.uplink().copied();
    let ports = topo.endpoints.len() + 1;
    let mut now_ms: i64 = 0;
    for op in decode_ops(data) {
        now_ms += i64::from(op.dt_ms);
        let now = Instant::from_millis(now_ms);
        match op.port & 0xc0 {
            MODE_OP => {
                set_mode(&mut p, raw, op.flags);
                twins.set_mode(raw.filter(|_| op.flags & 2 == 0), op.flags & 1 != 0);
                continue;
            }
            HOST_OP => {
                from_host(&mut p, topo, info, &op, now);
                continue;
            }
            _ => {}
        }
        if op.flags & 2 != 0 {
            p.expire(now);
            twins.expire(now);
        }
        let has_raw = p.router.uplink().is_some();
        let meta = RxMeta {
            partial_csum: op.flags & 1 != 0,
        };
        let ingress = topo
            .endpoints
            .get(usize::from(op.port) % ports)
            .map(|e| e.port);
        let ingress_net = ingress.map(|id| info[&id].0);
        twins.push(
            ingress_net.map(|n| topo.networks[n].id),
            meta,
            now,
            &op.frame.0,
        );
        let mut tx = |o: Out, f: &[u8]| {
            let (limit, from_router) = match o {
                Out::Uplink => {
                    assert!(has_raw, "left by a raw uplink that is not there");
                    (1500 + ETH_OVERHEAD, true)
                }
                Out::Port(id) => {
                    let (net, mtu, gw) = info[&id];
                    let from_router = MacAddr::src_of(f) == Some(gw);
                    // The gateway may answer the sender (ARP, echo, errors, hairpin); a
                    // switched frame never goes back.
                    assert!(
                        Some(id) != ingress || from_router,
                        "left by its ingress port"
                    );
                    if let Some(n) = ingress_net {
                        assert_eq!(net, n, "crossed networks");
                    }
                    (mtu + ETH_OVERHEAD, from_router)
                }
            };
            assert!(f.len() <= limit, "{} bytes out of {o:?}", f.len());
            if from_router {
                if let Some(e) = checksum_error(f) {
                    panic!("router emitted a bad {e} to {o:?}: {f:02x?}");
                }
            }
            true
        };
        let mut scratch = Vec::new();
        let mut otx = |o: Out, f: &[u8], h: Option<&VnetHdr>| {
            let Some(h) = h else { return tx(o, f) };
            let from_router = match o {
                Out::Uplink => true,
                Out::Port(id) => MacAddr::src_of(f) == Some(info[&id].2),
            };
            if !from_router {
                // Switched with the sender's header: the egress port (the kernel) checks it.
                let Out::Port(id) = o else { unreachable!() };
                assert!(Some(id) != ingress, "left by its ingress port");
                if let Some(n) = ingress_net {
                    assert_eq!(info[&id].0, n, "crossed networks");
                }
                return true;
            }
            // Translated whole: a TCPv4 GSO frame with a valid IPv4 header and total length,
            // whose partial checksum finishes into the right one, and whose segments fit.
            assert_eq!(h.gso(), GSO_TCPV4, "a header that is not TCPv4 GSO");
            assert_eq!(
                usize::from(u16::from_be_bytes([f[16], f[17]])),
                f.len() - 14
            );
            let mut whole = f.to_vec();
            assert!(complete_checksum(
                &mut whole,
                usize::from(h.csum_start),
                usize::from(h.csum_offset)
            ));
            if let Some(e) = checksum_error(&whole) {
                panic!("router emitted a GSO frame with a bad {e} to {o:?}");
            }
            segment_tcp4(f, usize::from(h.gso_size), &mut scratch, &mut |s| {
                tx(o, s);
            })
            .expect("an emitted GSO frame cuts");
            true
        };
        let mut frame = op.frame.0.clone();
        let gso = gso_hdr(op.flags);
        match (ingress, gso) {
            (Some(id), Some(h)) => p.from_port_offloaded(id, &mut frame, &h, now, &mut otx),
            (None, Some(h)) => p.from_uplink_offloaded(&mut frame, &h, now, &mut otx),
            (Some(id), None) => p.from_port(id, &op.frame.0, meta, now, &mut tx),
            (None, None) => p.from_uplink(&op.frame.0, meta, now, &mut tx),
        };
        // For the host uplink: whole IPv4 packets, from a network that has a way out. A
        // partial checksum stays partial (the socket uplink terminates the flow).
        let partial = meta.partial_csum && gso.is_none();
        for pkt in p.host_packets() {
            assert!(
                p.router.host_mode(),
                "a packet for the host uplink out of host mode"
            );
            let net = ingress_net.expect("a packet for the host uplink from the raw uplink");
            assert!(
                !topo.networks[net].internal,
                "host packet from an internal network"
            );
            assert!(
                pkt.len() <= topo.networks[net].mtu as usize,
                "host packet over the MTU"
            );
            let total = pkt
                .get(2..4)
                .map(|t| usize::from(u16::from_be_bytes([t[0], t[1]])));
            assert_eq!(total, Some(pkt.len()), "host packet not its total length");
            assert!(
                pkt.get(6..8).is_some_and(|f| f[0] & 0x3f == 0 && f[1] == 0),
                "a fragment"
            );
            if let Some(e) = ip_checksum_error(pkt, !partial) {
                panic!("router handed the host uplink a bad {e}: {pkt:02x?}");
            }
        }
        assert!(
            p.router.conntrack_len() <= CONNTRACK_MAX,
            "conntrack over its maximum"
        );
    }
    twins.flush();
});
