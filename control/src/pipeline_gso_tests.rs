//! TCP GSO super-frames through the whole in-memory pipeline (switch, router, switch): an
//! established flow's frame reaches its egress whole, with its virtio-net header, on the three
//! NAT paths; anything else is cut before the router, and no frame without a header is ever
//! larger than the MTU. Every call also checks that the pipeline leaves alone the bytes of its
//! input it has handed out (what lets the dataplane write them after releasing its lock).

use std::net::Ipv4Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};
use switchyard_nat::RxMeta;
use switchyard_switch::gso::{pseudo_sum4, segment_tcp4, VnetHdr, GSO_TCPV4, VNET_F_NEEDS_CSUM};
use switchyard_switch::{Instant, MacAddr, PortId};

use crate::dataplane::held::Held;
use crate::pipeline::{OffloadTx, Out, Pipeline, Verdict};
use crate::topology::Topology;

const TOPOLOGY: &str = r#"
[uplink]
addr = "192.0.2.10/24"
mac = "02:00:00:00:00:10"
gateway = "192.0.2.1"
gateway_mac = "02:00:00:00:00:01"
[[network]]
name = "mynet"
subnet = "10.77.0.0/24"
gateway = "10.77.0.1"
gateway_mac = "02:00:00:00:77:01"
[[endpoint]]
network = "mynet"
name = "c1"
mac = "02:00:00:00:77:02"
ip = "10.77.0.2"
publish = ["8080:80"]
[[endpoint]]
network = "mynet"
name = "c2"
mac = "02:00:00:00:77:03"
ip = "10.77.0.3"
"#;

const UP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UP_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x10]);
const NH_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const GW_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0x77, 1]);
const C1: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const C1_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0x77, 2]);
const C2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const C2_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0x77, 3]);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const MSS: u16 = 1448;

/// An Ethernet/IPv4/TCP frame; with `partial`, the checksum field holds the pseudo-header sum.
fn tcp(
    macs: (MacAddr, MacAddr),
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    control: TcpControl,
    payload: &[u8],
    partial: bool,
) -> Vec<u8> {
    let t = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control,
        seq_number: TcpSeqNumber(1),
        ack_number: (control != TcpControl::Syn).then_some(TcpSeqNumber(1)),
        window_len: 1024,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: t.buffer_len(),
        hop_limit: 64,
    };
    let mut f = vec![0u8; 14 + 20 + t.buffer_len()];
    f[0..6].copy_from_slice(&macs.0 .0);
    f[6..12].copy_from_slice(&macs.1 .0);
    f[12..14].copy_from_slice(&[8, 0]);
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut f[14..]), &caps);
    t.emit(
        &mut TcpPacket::new_unchecked(&mut f[34..]),
        &IpAddress::Ipv4(src),
        &IpAddress::Ipv4(dst),
        &caps,
    );
    if partial {
        let s = pseudo_sum4(src.octets(), dst.octets(), 6, f.len() - 34);
        f[50..52].copy_from_slice(&s.to_be_bytes());
    }
    f
}

fn hdr() -> VnetHdr {
    VnetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: MSS,
        csum_start: 34,
        csum_offset: 16,
    }
}

/// What left: egress, frame, header.
type Sent = Vec<(Out, Vec<u8>, Option<VnetHdr>)>;

fn setup() -> (Pipeline, PortId, PortId) {
    let t = Topology::parse(TOPOLOGY).unwrap();
    let p = t.build(Instant::ZERO).unwrap();
    (p, t.endpoints[0].port, t.endpoints[1].port)
}

/// Every frame sent: one with a header is a TCPv4 GSO frame whose segments fit the MTU, one
/// without fits the MTU itself.
fn check_sizes(sent: &Sent) {
    for (o, f, h) in sent {
        match h {
            Some(h) => {
                assert_eq!(h.gso(), GSO_TCPV4);
                segment_tcp4(f, usize::from(h.gso_size), &mut Vec::new(), &mut |s| {
                    assert!(s.len() <= 1514, "{o:?}: a {} byte segment", s.len())
                })
                .unwrap();
            }
            None => assert!(f.len() <= 1514, "{o:?}: {} bytes without a header", f.len()),
        }
    }
}

/// Runs one entry point with a `tx` that records what left, and checks the invariant the
/// dataplane's workers rely on to write after releasing the lock (`dataplane/held.rs`): the
/// outputs held from the first one taken from the input frame on, read again from the input
/// once the pipeline has returned, are what `tx` was handed.
fn run_checked(
    input: &mut [u8],
    call: impl FnOnce(&mut [u8], &mut OffloadTx<'_>) -> Verdict,
) -> (Verdict, Sent) {
    let mut sent = Sent::new();
    let mut held = Held::default();
    held.begin(input);
    let mut tx = |o: Out, f: &[u8], h: Option<&VnetHdr>| {
        sent.push((o, f.to_vec(), h.copied()));
        held.hold(o, f, h);
        true
    };
    let v = call(input, &mut tx);
    let later: Sent = held
        .iter(input)
        .map(|(o, f, h)| (o, f.to_vec(), h.copied()))
        .collect();
    assert_eq!(
        later[..],
        sent[sent.len() - later.len()..],
        "the input frame changed after an output was taken from it"
    );
    check_sizes(&sent);
    (v, sent)
}

fn from_port(p: &mut Pipeline, port: PortId, f: &[u8], gso: bool) -> (Verdict, Sent) {
    run_checked(&mut f.to_vec(), |f, tx| {
        if gso {
            p.from_port_offloaded(port, f, &hdr(), Instant::ZERO, tx)
        } else {
            p.from_port(port, f, RxMeta::default(), Instant::ZERO, &mut |o, f| {
                tx(o, f, None)
            })
        }
    })
}

fn from_uplink(p: &mut Pipeline, f: &[u8], gso: bool) -> (Verdict, Sent) {
    run_checked(&mut f.to_vec(), |f, tx| {
        if gso {
            p.from_uplink_offloaded(f, &hdr(), Instant::ZERO, tx)
        } else {
            p.from_uplink(f, RxMeta::default(), Instant::ZERO, &mut |o, f| {
                tx(o, f, None)
            })
        }
    })
}

fn sport(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[34], f[35]])
}

#[test]
fn established_flows_carry_super_frames_whole_to_their_egress() {
    let data: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let (mut p, c1, c2) = setup();

    // Masquerade: c1 -> outside, the whole frame out of the uplink with its header.
    let syn = tcp(
        (GW_MAC, C1_MAC),
        (C1, 4000),
        (REMOTE, 80),
        TcpControl::Syn,
        &[],
        false,
    );
    let (v, sent) = from_port(&mut p, c1, &syn, false);
    assert_eq!(v, Verdict::Forwarded, "{:?}", p.router.counters());
    let ext = sport(&sent[0].1);
    let big = tcp(
        (GW_MAC, C1_MAC),
        (C1, 4000),
        (REMOTE, 80),
        TcpControl::Psh,
        &data,
        true,
    );
    let (v, sent) = from_port(&mut p, c1, &big, true);
    assert_eq!(v, Verdict::Forwarded);
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].0, sent[0].1.len()), (Out::Uplink, big.len()));
    assert_eq!(sent[0].2.map(|h| h.gso_size), Some(MSS));
    assert_eq!(sport(&sent[0].1), ext);

    // A published port: outside -> c1, whole into c1's port.
    let syn = tcp(
        (UP_MAC, NH_MAC),
        (REMOTE, 7000),
        (UP, 8080),
        TcpControl::Syn,
        &[],
        false,
    );
    from_uplink(&mut p, &syn, false);
    let big = tcp(
        (UP_MAC, NH_MAC),
        (REMOTE, 7000),
        (UP, 8080),
        TcpControl::Psh,
        &data,
        true,
    );
    let (v, sent) = from_uplink(&mut p, &big, true);
    assert_eq!(v, Verdict::Forwarded);
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].0, sent[0].1.len()), (Out::Port(c1), big.len()));
    assert!(sent[0].2.is_some());
    assert_eq!(&sent[0].1[0..6], &C1_MAC.0);

    // Hairpin: c2 -> uplink address:8080 -> c1, whole.
    let syn = tcp(
        (GW_MAC, C2_MAC),
        (C2, 45000),
        (UP, 8080),
        TcpControl::Syn,
        &[],
        false,
    );
    from_port(&mut p, c2, &syn, false);
    let big = tcp(
        (GW_MAC, C2_MAC),
        (C2, 45000),
        (UP, 8080),
        TcpControl::Psh,
        &data,
        true,
    );
    let (v, sent) = from_port(&mut p, c2, &big, true);
    assert_eq!(v, Verdict::Forwarded);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Out::Port(c1));
    assert!(sent[0].2.is_some());
    assert_eq!(p.router.counters().gso_translated, 3);
}

#[test]
fn other_super_frames_are_cut_before_the_router() {
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 13) as u8).collect();
    let segs = data.len().div_ceil(usize::from(MSS));
    let (mut p, c1, _) = setup();
    // An established flow, but a frame whose IPv4 total length is not the frame's (a sender
    // may cap it): not taken whole; cut (trusting the frame), each segment is translated as
    // a wire packet and leaves without a header.
    let syn = tcp(
        (GW_MAC, C1_MAC),
        (C1, 4000),
        (REMOTE, 80),
        TcpControl::Syn,
        &[],
        false,
    );
    from_port(&mut p, c1, &syn, false);
    let mut big = tcp(
        (GW_MAC, C1_MAC),
        (C1, 4000),
        (REMOTE, 80),
        TcpControl::Psh,
        &data,
        true,
    );
    big[16..18].copy_from_slice(&1000u16.to_be_bytes());
    let (v, sent) = from_port(&mut p, c1, &big, true);
    assert_eq!(v, Verdict::Forwarded);
    assert_eq!(sent.len(), segs);
    assert!(sent
        .iter()
        .all(|(o, _, h)| *o == Out::Uplink && h.is_none()));
    // From outside to a port nobody published: cut, every segment refused like a wire packet.
    let big = tcp(
        (UP_MAC, NH_MAC),
        (REMOTE, 7000),
        (UP, 9999),
        TcpControl::Psh,
        &data,
        true,
    );
    let (v, sent) = from_uplink(&mut p, &big, true);
    assert!(matches!(v, Verdict::Dropped(_)), "{v:?}");
    assert!(sent.is_empty());
    assert_eq!(p.router.counters().gso_translated, 0);
    assert_eq!(p.router.counters().translated_out, 1 + segs as u64);
}

#[test]
fn flooded_super_frames_leave_unchanged_by_every_port() {
    let data: Vec<u8> = (0..30_000u32).map(|i| (i % 7) as u8).collect();
    let (mut p, c1, c2) = setup();
    // To a MAC nobody has: flooded to c2 (whole) and to the gateway (which drops it: not its
    // MAC), the input never rewritten.
    let unknown = MacAddr([2, 0, 0, 0, 0x77, 0x99]);
    let big = tcp(
        (unknown, C1_MAC),
        (C1, 4000),
        (C2, 80),
        TcpControl::Psh,
        &data,
        true,
    );
    let (v, sent) = from_port(&mut p, c1, &big, true);
    assert_eq!(v, Verdict::Flooded);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Out::Port(c2));
    assert_eq!(sent[0].1, big);
    // The same as a plain broadcast frame.
    let mut bcast = big[..1514].to_vec();
    bcast[0..6].copy_from_slice(&[0xff; 6]);
    bcast[16..18].copy_from_slice(&1500u16.to_be_bytes());
    let (_, sent) = from_port(&mut p, c1, &bcast, false);
    assert_eq!(
        sent.iter().map(|s| s.0).collect::<Vec<_>>(),
        [Out::Port(c2)]
    );
}
