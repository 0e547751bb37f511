#![no_main]
//! Frames from the containers and from the uplink, with time steps and expiry, through the
//! pipeline the daemon runs (the fuzz topology: three networks, one internal, published ports,
//! a 16-flow conntrack table), some as TCP GSO super-frames with a virtio-net header (the
//! offloaded entry points). Invariants: every IPv4 packet the router emits has valid IP and
//! TCP/UDP/ICMP checksums (UDP zero allowed; a GSO frame's once cut); the conntrack table
//! stays within its maximum; nothing larger than the egress MTU plus 18 leaves without a
//! header, and a frame with one is a TCPv4 GSO frame whose segments fit; nothing leaves by
//! its ingress port or into another network.

use std::collections::HashMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard_control::pipeline::Out;
use switchyard_control::topology::Topology;
use switchyard_fuzz::{checksum_error, decode_ops, gso_hdr, CONNTRACK_MAX, TOPOLOGY};
use switchyard_nat::RxMeta;
use switchyard_switch::frame::ETH_OVERHEAD;
use switchyard_switch::gso::{complete_checksum, segment_tcp4, VnetHdr, GSO_TCPV4};
use switchyard_switch::{Instant, MacAddr, PortId};

/// Per endpoint port: its network (index), that network's MTU and gateway MAC.
type PortInfo = HashMap<PortId, (usize, usize, MacAddr)>;

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
    let ports = topo.endpoints.len() + 1;
    let mut now_ms: i64 = 0;
    for op in decode_ops(data) {
        now_ms += i64::from(op.dt_ms);
        let now = Instant::from_millis(now_ms);
        if op.flags & 2 != 0 {
            p.expire(now);
        }
        let meta = RxMeta {
            partial_csum: op.flags & 1 != 0,
        };
        let ingress = topo
            .endpoints
            .get(usize::from(op.port) % ports)
            .map(|e| e.port);
        let ingress_net = ingress.map(|id| info[&id].0);
        let mut tx = |o: Out, f: &[u8]| {
            let (limit, from_router) = match o {
                Out::Uplink => (1500 + ETH_OVERHEAD, true),
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
        match (ingress, gso_hdr(op.flags)) {
            (Some(id), Some(h)) => p.from_port_offloaded(id, &mut frame, &h, now, &mut otx),
            (None, Some(h)) => p.from_uplink_offloaded(&mut frame, &h, now, &mut otx),
            (Some(id), None) => p.from_port(id, &op.frame.0, meta, now, &mut tx),
            (None, None) => p.from_uplink(&op.frame.0, meta, now, &mut tx),
        };
        assert!(
            p.router.conntrack_len() <= CONNTRACK_MAX,
            "conntrack over its maximum"
        );
    }
});
