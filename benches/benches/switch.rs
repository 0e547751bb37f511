//! Switch core forwarding rate: 64-byte frames, 4,096 learned MACs across 64 ports, one core.
//! Reported as elements (frames) per second.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use switchyard_switch::{
    Forward, Instant, MacAddr, NetworkId, PortId, PortKind, Switch, SwitchConfig,
};

const PORTS: u32 = 64;
const MACS: u32 = 4096;
const BATCH: usize = 8192;

fn mac(i: u32) -> MacAddr {
    let b = i.to_be_bytes();
    MacAddr([0x02, 0x10, b[0], b[1], b[2], b[3]])
}

fn port_of(i: u32) -> PortId {
    PortId(i % PORTS)
}

fn frame(dst: MacAddr, src: MacAddr) -> [u8; 64] {
    let mut f = [0u8; 64];
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

fn setup() -> (Switch, Vec<(PortId, [u8; 64])>) {
    let mut s = Switch::new(SwitchConfig::default());
    s.add_network(NetworkId(1), 1500).unwrap();
    let t = Instant::from_secs(1);
    for p in 0..PORTS {
        s.add_port(PortId(p), NetworkId(1), PortKind::Endpoint, None, false, t)
            .unwrap();
    }
    // Learn every MAC on its port.
    for i in 0..MACS {
        let f = frame(MacAddr::BROADCAST, mac(i));
        s.handle_frame(port_of(i), &f, t);
    }
    assert_eq!(s.table().dynamic_len(), MACS as usize);
    // A fixed pseudo-random mix of unicast frames between learned stations on different ports.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut frames = Vec::with_capacity(BATCH);
    while frames.len() < BATCH {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (a, b) = ((x % MACS as u64) as u32, ((x >> 32) % MACS as u64) as u32);
        if port_of(a) == port_of(b) {
            continue;
        }
        frames.push((port_of(a), frame(mac(b), mac(a))));
    }
    (s, frames)
}

fn forwarding(c: &mut Criterion) {
    let (mut s, frames) = setup();
    let t = Instant::from_secs(2);
    // Sanity: every frame is a known unicast.
    for (p, f) in &frames {
        assert!(matches!(s.handle_frame(*p, f, t), Forward::Unicast(_)));
    }
    let mut g = c.benchmark_group("switch");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("forward_64B_4096macs_64ports", |b| {
        b.iter(|| {
            for (p, f) in &frames {
                black_box(s.handle_frame(*p, black_box(f), t));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, forwarding);
criterion_main!(benches);
