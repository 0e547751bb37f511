//! TCP GSO super-frames through the NAT whole (`Router::handle_gso_*`, fast.rs): the headers
//! and the partial checksum of what comes out, and, once cut with `segment_tcp4`, every
//! segment against the same segments translated one by one on the ordinary path.

use switchyard_switch::gso::{
    complete_checksum, pseudo_sum4, segment_tcp4, VnetHdr, GSO_ECN, GSO_TCPV4, GSO_UDP,
    VNET_F_NEEDS_CSUM,
};

use super::*;

/// The largest TCP payload of one 64 KB super-frame (IPv4 total length 65535).
const MAX_DATA: usize = 65_535 - 40;

/// A TSO frame as a Linux sender hands it over: one TCP header for all the data, the IPv4
/// total length covering the whole, the TCP checksum field holding the pseudo-header sum.
fn gso_frame(
    macs: (MacAddr, MacAddr),
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control: TcpControl::Psh,
        seq_number: TcpSeqNumber(7_000_000),
        ack_number: Some(TcpSeqNumber(42)),
        window_len: 1024,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let mut f = ip_frame(
        macs.0,
        macs.1,
        src,
        dst,
        IpProtocol::Tcp,
        repr.buffer_len(),
        64,
        |b| {
            repr.emit(
                &mut TcpPacket::new_unchecked(b),
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
                &ChecksumCapabilities::default(),
            )
        },
    );
    let partial = pseudo_sum4(src.octets(), dst.octets(), 6, f.len() - 34);
    f[50..52].copy_from_slice(&partial.to_be_bytes());
    f
}

fn vnet(mss: u16) -> VnetHdr {
    VnetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: mss,
        csum_start: 34,
        csum_offset: 16,
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed | 1) ^ (i >> 9) as u8)
        .collect()
}

/// The three NAT paths, each with its flow opened by a SYN: where the super-frame enters,
/// the frame, and the tuple (src, sport, dst, dport) and egress it must leave with.
#[derive(Clone, Copy, Debug)]
enum Path {
    Snat,
    Dnat,
    Hairpin,
}

struct Case {
    uplink: bool,
    frame: Vec<u8>,
    egress: Egress,
    macs: (MacAddr, MacAddr),
    tuple: (Ipv4Addr, u16, Ipv4Addr, u16),
}

fn open(l: &mut Lab, path: Path, payload: &[u8]) -> Case {
    match path {
        Path::Snat => {
            let syn = tcp(GW_MAC, C1_MAC, C1, 4000, REMOTE, 80, TcpControl::Syn, None);
            assert_eq!(l.net_rx(NET, &syn), Verdict::Forwarded);
            let ext = seen(&l.one().1).sport;
            Case {
                uplink: false,
                frame: gso_frame((GW_MAC, C1_MAC), C1, 4000, REMOTE, 80, payload),
                egress: Egress::Uplink,
                macs: (NH_MAC, UP_MAC),
                tuple: (UP, ext, REMOTE, 80),
            }
        }
        Path::Dnat => {
            publish(l, Proto::Tcp, 8080, C2, 80);
            let syn = tcp(
                UP_MAC,
                NH_MAC,
                REMOTE,
                7000,
                UP,
                8080,
                TcpControl::Syn,
                None,
            );
            assert_eq!(l.up_rx(&syn), Verdict::Forwarded);
            Case {
                uplink: true,
                frame: gso_frame((UP_MAC, NH_MAC), REMOTE, 7000, UP, 8080, payload),
                egress: Egress::Network(NET),
                macs: (C2_MAC, GW_MAC),
                tuple: (REMOTE, 7000, C2, 80),
            }
        }
        Path::Hairpin => {
            publish(l, Proto::Tcp, 8080, C2, 80);
            let syn = tcp(GW_MAC, C1_MAC, C1, 45000, UP, 8080, TcpControl::Syn, None);
            assert_eq!(l.net_rx(NET, &syn), Verdict::Forwarded);
            let gw_port = seen(&l.one().1).sport;
            Case {
                uplink: false,
                frame: gso_frame((GW_MAC, C1_MAC), C1, 45000, UP, 8080, payload),
                egress: Egress::Network(NET),
                macs: (C2_MAC, GW_MAC),
                tuple: (GW, gw_port, C2, 80),
            }
        }
    }
}

fn gso_rx(l: &mut Lab, uplink: bool, f: &[u8], h: &VnetHdr) -> Option<Verdict> {
    l.out.clear();
    if uplink {
        l.r.handle_gso_from_uplink(f, h, l.now, &mut l.out)
    } else {
        l.r.handle_gso_from_network(NET, f, h, l.now, &mut l.out)
    }
}

/// Cut `f` as an egress without offloads would; every segment's checksums verified.
fn cut(f: &[u8], mss: u16) -> Vec<Vec<u8>> {
    let mut segs = Vec::new();
    segment_tcp4(f, usize::from(mss), &mut Vec::new(), &mut |s| {
        segs.push(s.to_vec())
    })
    .unwrap();
    for s in &segs {
        assert_all_checksums(&s[14..]);
        assert!(s.len() <= 1500 + 14, "{} bytes", s.len());
    }
    segs
}

fn tcp_payload(seg: &[u8]) -> &[u8] {
    let thl = usize::from(seg[14 + 20 + 12] >> 4) * 4;
    &seg[14 + 20 + thl..]
}

#[test]
fn a_64k_super_frame_is_translated_whole_on_every_nat_path() {
    for path in [Path::Snat, Path::Dnat, Path::Hairpin] {
        let mut l = Lab::new();
        let payload = data(MAX_DATA, 7);
        let c = open(&mut l, path, &payload);
        let before = counters(&l).clone();
        let h = vnet(1448);
        assert_eq!(
            gso_rx(&mut l, c.uplink, &c.frame, &h),
            Some(Verdict::Forwarded),
            "{path:?}"
        );
        assert_eq!(l.out.len(), 1);
        let (e, f) = l.out.get(0).unwrap();
        assert_eq!(e, c.egress, "{path:?}");
        assert_eq!(f.len(), c.frame.len(), "one frame, the whole data");
        // Its header: TCPv4 GSO with the sender's segment size, checksum partial at the TCP one.
        let out_h = *l.out.offload(0).unwrap();
        assert_eq!(
            out_h,
            VnetHdr {
                flags: VNET_F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 54,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
            }
        );
        // IPv4: addresses rewritten, TTL decremented, the total length the whole frame's, a
        // valid header checksum.
        let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
        assert_eq!(usize::from(ip.total_len()), f.len() - 14);
        assert!(ip.verify_checksum(), "{path:?}: IPv4 header checksum");
        assert_eq!(ip.hop_limit(), 63);
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        let (src, sport, dst, dport) = c.tuple;
        assert_eq!(
            (ip.src_addr(), t.src_port(), ip.dst_addr(), t.dst_port()),
            (src, sport, dst, dport),
            "{path:?}"
        );
        assert_eq!(
            (MacAddr::dst_of(f), MacAddr::src_of(f)),
            (Some(c.macs.0), Some(c.macs.1))
        );
        // TCP: the checksum field holds the pseudo-header sum of the new addresses.
        let tcp_len = f.len() - 34;
        assert_eq!(
            t.checksum(),
            pseudo_sum4(src.octets(), dst.octets(), 6, tcp_len),
            "{path:?}: partial checksum"
        );
        // Finished as a NIC would (no segmentation), the whole TCP checksum verifies.
        let mut whole = f.to_vec();
        assert!(complete_checksum(&mut whole, 34, 16));
        assert!(ck::verifies_l4(src, dst, IpProtocol::Tcp, &whole[34..]));
        // Cut as an egress without offloads would: valid segments carrying the data intact.
        let segs = cut(f, out_h.gso_size);
        assert_eq!(segs.len(), MAX_DATA.div_ceil(1448));
        let joined: Vec<u8> = segs.iter().flat_map(|s| tcp_payload(s).to_vec()).collect();
        assert_eq!(joined, payload, "{path:?}: payload");
        for s in &segs {
            let sn = seen(s);
            assert_eq!((sn.src, sn.sport, sn.dst, sn.dport), c.tuple);
        }
        // Counted as its segments (and once as a super-frame).
        let after = counters(&l);
        let n = segs.len() as u64;
        let moved = match path {
            Path::Snat => after.translated_out - before.translated_out,
            Path::Dnat => after.translated_in - before.translated_in,
            Path::Hairpin => after.hairpinned - before.hairpinned,
        };
        assert_eq!(moved, n, "{path:?}");
        assert_eq!(after.gso_translated, before.gso_translated + 1);
    }
}

#[test]
fn a_frame_without_a_partial_checksum_and_with_ecn_keeps_its_gso_kind() {
    // GRO on the uplink hands over merged frames whose checksum is already checked
    // (no NEEDS_CSUM): the NAT makes it partial, so the egress can finish it.
    let mut l = Lab::new();
    let payload = data(20_000, 3);
    let c = open(&mut l, Path::Dnat, &payload);
    let mut f = c.frame.clone();
    f[50..52].copy_from_slice(&[0xde, 0xad]);
    let h = VnetHdr {
        flags: 0,
        gso_type: GSO_TCPV4 | GSO_ECN,
        csum_start: 0,
        csum_offset: 0,
        ..vnet(1000)
    };
    assert_eq!(gso_rx(&mut l, true, &f, &h), Some(Verdict::Forwarded));
    let out_h = *l.out.offload(0).unwrap();
    assert_eq!(out_h.gso_type, GSO_TCPV4 | GSO_ECN);
    assert!(out_h.needs_csum());
    let (_, out) = l.out.get(0).unwrap();
    let joined: Vec<u8> = cut(out, 1000)
        .iter()
        .flat_map(|s| tcp_payload(s).to_vec())
        .collect();
    assert_eq!(joined, payload);
}

#[test]
fn what_the_whole_path_refuses_it_leaves_untouched_for_cutting() {
    let payload = data(8000, 5);
    // Each case: a lab with an SNAT flow, then a change that must send the frame back.
    type Change = fn(&mut Vec<u8>, &mut VnetHdr);
    let cases: [(&str, Change); 9] = [
        ("no flow", |f, _| f[34] ^= 0x40),
        ("to the gateway", |f, _| {
            f[30..34].copy_from_slice(&GW.octets());
        }),
        ("segment over the uplink MTU", |_, h| h.gso_size = 1461),
        ("TTL 1", |f, _| f[22] = 1),
        ("bad IPv4 header checksum", |f, _| f[24] ^= 1),
        ("total length not the frame's", |f, _| {
            f[16..18].copy_from_slice(&[0, 0]);
        }),
        ("UDP GSO", |_, h| h.gso_type = GSO_UDP),
        ("zero segment size", |_, h| h.gso_size = 0),
        ("checksum asked elsewhere", |_, h| h.csum_start = 40),
    ];
    for (name, change) in cases {
        let mut l = Lab::new();
        let c = open(&mut l, Path::Snat, &payload);
        let mut f = c.frame.clone();
        let mut h = vnet(1448);
        change(&mut f, &mut h);
        let before = (
            counters(&l).clone(),
            l.r.conntrack(l.now).len(),
            l.r.conntrack_len(),
        );
        let ct: Vec<_> =
            l.r.conntrack(l.now)
                .iter()
                .map(|c| format!("{c:?}"))
                .collect();
        assert_eq!(gso_rx(&mut l, false, &f, &h), None, "{name}");
        assert!(l.out.is_empty(), "{name}");
        let after = (
            counters(&l).clone(),
            l.r.conntrack(l.now).len(),
            l.r.conntrack_len(),
        );
        assert_eq!(before, after, "{name}: no side effect");
        let ct2: Vec<_> =
            l.r.conntrack(l.now)
                .iter()
                .map(|c| format!("{c:?}"))
                .collect();
        assert_eq!(ct, ct2, "{name}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Translating a super-frame whole and then cutting it gives the very segments (checksums
    /// aside, which both verify) that cutting it first and translating each one gives, with
    /// the same counters and conntrack state, on every NAT path.
    #[test]
    fn whole_then_cut_equals_cut_then_translated(
        path in prop_oneof![Just(Path::Snat), Just(Path::Dnat), Just(Path::Hairpin)],
        len in 1usize..=MAX_DATA,
        mss in 88u16..=1460,
        seed in any::<u8>(),
        fin in any::<bool>(),
    ) {
        let payload = data(len, seed);
        let (mut a, mut b) = (Lab::new(), Lab::new());
        let ca = open(&mut a, path, &payload);
        let cb = open(&mut b, path, &payload);
        let mut f = ca.frame.clone();
        if fin {
            // FIN rides on the last segment only once cut.
            f[14 + 20 + 13] |= 0x01;
        }
        prop_assert_eq!(&ca.frame, &cb.frame);
        let h = vnet(mss);
        prop_assert_eq!(gso_rx(&mut a, ca.uplink, &f, &h), Some(Verdict::Forwarded));
        let whole: Vec<Vec<u8>> = a.out.get(0).map(|(_, o)| cut(o, mss)).unwrap();
        let mut one_by_one = Vec::new();
        for s in cut(&f, mss) {
            let v = if cb.uplink { b.up_rx(&s) } else { b.net_rx(NET, &s) };
            prop_assert_eq!(v, Verdict::Forwarded);
            let (e, o) = b.one();
            prop_assert_eq!(e, cb.egress);
            assert_all_checksums(&o[14..]);
            one_by_one.push(o);
        }
        prop_assert_eq!(whole.len(), one_by_one.len());
        let blank = |s: &[u8]| {
            let mut s = s.to_vec();
            s[24..26].copy_from_slice(&[0, 0]);
            s[50..52].copy_from_slice(&[0, 0]);
            s
        };
        for (x, y) in whole.iter().zip(&one_by_one) {
            prop_assert_eq!(blank(x), blank(y));
        }
        let mut ca_counters = a.r.counters().clone();
        ca_counters.gso_translated = 0;
        prop_assert_eq!(&ca_counters, b.r.counters());
        let ct = |l: &Lab| -> Vec<String> {
            l.r.conntrack(l.now).iter().map(|c| format!("{c:?}")).collect()
        };
        prop_assert_eq!(ct(&a), ct(&b));
    }
}

#[test]
fn in_place_translation_equals_the_copying_one() {
    for path in [Path::Snat, Path::Dnat, Path::Hairpin] {
        let payload = data(30_000, 11);
        let (mut a, mut b) = (Lab::new(), Lab::new());
        let c = open(&mut a, path, &payload);
        open(&mut b, path, &payload);
        let h = vnet(1448);
        assert_eq!(
            gso_rx(&mut a, c.uplink, &c.frame, &h),
            Some(Verdict::Forwarded)
        );
        let mut f = c.frame.clone();
        let taken = if c.uplink {
            b.r.handle_gso_from_uplink_in_place(&mut f, &h, b.now)
        } else {
            b.r.handle_gso_from_network_in_place(NET, &mut f, &h, b.now)
        };
        let (e, copied) = a.out.get(0).unwrap();
        assert_eq!(taken, Some((e, *a.out.offload(0).unwrap())), "{path:?}");
        assert_eq!(f, copied, "{path:?}");
        assert_eq!(a.r.counters(), b.r.counters());
        // Refused: the frame and the router stay as they were.
        let mut g = c.frame.clone();
        g[22] = 1;
        let before = b.r.counters().clone();
        let refused = if c.uplink {
            b.r.handle_gso_from_uplink_in_place(&mut g, &h, b.now)
        } else {
            b.r.handle_gso_from_network_in_place(NET, &mut g, &h, b.now)
        };
        assert_eq!(refused, None);
        assert_eq!(g[22], 1);
        assert_eq!(&g[23..], &c.frame[23..]);
        assert_eq!(b.r.counters(), &before);
    }
}
