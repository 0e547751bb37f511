#![no_main]
//! Any bytes, on any of four ports of two networks, through the switch: never a panic, never
//! an egress by the ingress port or into the other network.

use libfuzzer_sys::fuzz_target;
use switchyard_switch::{Forward, Instant, NetworkId, PortId, PortKind, Switch, SwitchConfig};

fuzz_target!(|data: &[u8]| {
    let mut s = Switch::new(SwitchConfig::default());
    s.add_network(NetworkId(1), 1500).unwrap();
    s.add_network(NetworkId(2), 1500).unwrap();
    for p in 0..4u32 {
        let net = NetworkId(1 + (p / 2) as u16);
        s.add_port(PortId(p), net, PortKind::Endpoint, None, false, Instant::ZERO).unwrap();
    }
    let Some((&sel, frame)) = data.split_first() else { return };
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
});
