#![no_main]
//! Any bytes as one frame: through the switch alone (four ports of two networks), through the
//! whole pipeline from every port of the fuzz topology, and straight into the router's parsers
//! from every network and the uplink, with and without partial-checksum metadata.
//! Never a panic; never an egress by the ingress port or into another network.

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard_control::pipeline::Out;
use switchyard_control::topology::Topology;
use switchyard_fuzz::TOPOLOGY;
use switchyard_nat::{Emits, RxMeta};
use switchyard_switch::{
    Forward, Instant, MacAddr, NetworkId, PortId, PortKind, Switch, SwitchConfig,
};

static TOPO: OnceLock<Topology> = OnceLock::new();

fn switch_alone(sel: u8, frame: &[u8]) {
    let mut s = Switch::new(SwitchConfig::default());
    s.add_network(NetworkId(1), 1500).unwrap();
    s.add_network(NetworkId(2), 1500).unwrap();
    for p in 0..4u32 {
        let net = NetworkId(1 + (p / 2) as u16);
        s.add_port(
            PortId(p),
            net,
            PortKind::Endpoint,
            None,
            false,
            Instant::ZERO,
        )
        .unwrap();
    }
    let ingress = PortId(u32::from(sel % 4));
    let net = s.port_network(ingress).unwrap();
    match s.handle_frame(ingress, frame, Instant::ZERO) {
        Forward::Unicast(p) => assert!(p != ingress && s.port_network(p) == Some(net)),
        Forward::Flood(n) => {
            assert_eq!(n, net);
            assert!(s.flood_ports(n, ingress).all(|p| p != ingress));
        }
        Forward::Drop(_) => {}
    }
}

fn pipeline(sel: u8, frame: &[u8]) {
    let topo = TOPO.get_or_init(|| Topology::parse(TOPOLOGY).expect("fuzz topology"));
    let mut p = topo.build(Instant::ZERO).expect("fuzz topology builds");
    let meta = RxMeta {
        partial_csum: sel & 0x80 != 0,
    };
    let now = Instant::from_secs(1);
    let n = topo.endpoints.len() + 1;
    let i = usize::from(sel & 0x7f) % n;
    let mut outs: Vec<(Out, Option<MacAddr>)> = Vec::new();
    let mut tx = |o: Out, f: &[u8]| {
        outs.push((o, MacAddr::src_of(f)));
        true
    };
    if let Some(e) = topo.endpoints.get(i) {
        p.from_port(e.port, frame, meta, now, &mut tx);
        let net = p.switch.port_network(e.port);
        let gateway = topo.networks[e.network].gateway_mac;
        for (o, src) in outs {
            if let Out::Port(q) = o {
                // The gateway may answer the sender (ARP, echo, errors, hairpin); a switched
                // frame never goes back.
                assert!(
                    q != e.port || src == Some(gateway),
                    "left by its ingress port"
                );
                assert_eq!(p.switch.port_network(q), net, "crossed networks");
            }
        }
    } else {
        // Answers (ARP, ICMP errors, RSTs) may go back out of the uplink; nothing to check.
        p.from_uplink(frame, meta, now, &mut tx);
    }
    // The router's parsers directly, from every side.
    let mut emits = Emits::new();
    for net in &topo.networks {
        emits.clear();
        p.router
            .handle_from_network(net.id, frame, meta, now, &mut emits);
    }
    emits.clear();
    p.router.handle_from_uplink(frame, meta, now, &mut emits);
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    switch_alone(sel, frame);
    pipeline(sel, frame);
});
