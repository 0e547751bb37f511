#![no_main]
//! A sequence of frames on nine ports of three networks (MTUs 1500, 9000 and 68), with time
//! steps, expiry, port churn and a small MAC table. Invariants: a frame never leaves by its
//! ingress port, never reaches another network, never leaves larger than its network's MTU
//! plus 18, and never goes to a port that does not exist.

use libfuzzer_sys::fuzz_target;
use switchyard_fuzz::decode_ops;
use switchyard_switch::frame::ETH_OVERHEAD;
use switchyard_switch::mac_table::MacTableConfig;
use switchyard_switch::{
    Duration, Forward, Instant, MacAddr, NetworkId, PortId, PortKind, Switch, SwitchConfig,
};

const PORTS: u32 = 9;

fn add_port(s: &mut Switch, p: u32, now: Instant) {
    let net = NetworkId(1 + (p / 3) as u16);
    // Every third port has a static MAC (an endpoint the daemon made), port 4 anti-spoofing.
    let mac = p
        .is_multiple_of(3)
        .then_some(MacAddr([2, 0, 0, 0, p as u8, 1]));
    let kind = if p == 8 {
        PortKind::Router
    } else {
        PortKind::Endpoint
    };
    s.add_port(PortId(p), net, kind, mac, p == 4, now).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let ops = decode_ops(data);
    let mut s = Switch::new(SwitchConfig {
        mac_table: MacTableConfig {
            aging: Duration::from_secs(10),
            max_entries: 24,
            max_per_port: 6,
        },
    });
    for (i, mtu) in [1500usize, 9000, 68].into_iter().enumerate() {
        s.add_network(NetworkId(i as u16 + 1), mtu).unwrap();
    }
    let mut now = Instant::ZERO;
    for p in 0..PORTS {
        add_port(&mut s, p, now);
    }
    for op in ops {
        now += Duration::from_millis(u64::from(op.dt_ms));
        if op.flags & 2 != 0 {
            s.expire(now);
        }
        let ingress = PortId(u32::from(op.port) % PORTS);
        if op.flags & 4 != 0 {
            // Unplug and replug: nothing learned on the old port may survive it.
            s.remove_port(ingress).unwrap();
            add_port(&mut s, ingress.0, now);
        }
        let net = s.port_network(ingress).unwrap();
        let limit = s.network_mtu(net).unwrap() + ETH_OVERHEAD;
        match s.handle_frame(ingress, &op.frame.0, now) {
            Forward::Unicast(p) => {
                assert_ne!(p, ingress, "unicast back out of the ingress port");
                assert_eq!(s.port_network(p), Some(net), "unicast into another network");
                assert!(op.frame.0.len() <= limit, "oversize frame forwarded");
            }
            Forward::Flood(n) => {
                assert_eq!(n, net, "flooded into another network");
                assert!(op.frame.0.len() <= limit, "oversize frame flooded");
                for p in s.flood_ports(n, ingress) {
                    assert_ne!(p, ingress, "flooded back out of the ingress port");
                    assert_eq!(s.port_network(p), Some(net));
                }
            }
            Forward::Drop(_) => {}
        }
    }
});
