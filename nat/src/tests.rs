//! Router behaviour with hand-built frames (smoltcp Reprs) and simulated time.
#![allow(
    clippy::too_many_arguments,
    clippy::field_reassign_with_default,
    clippy::collapsible_match
)]

use std::net::Ipv4Addr;

use proptest::prelude::*;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};
use switchyard_switch::{DropReason, Duration, Instant, MacAddr, NetworkId};

use crate::checksum as ck;
use crate::*;

const NET: NetworkId = NetworkId(1);
const NET2: NetworkId = NetworkId(2);
const GW: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GW_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0x77, 1]);
const C1: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const C1_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0x77, 2]);
const C2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const C2_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0x77, 3]);
const GW2: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const GW2_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0x88, 1]);
const C3: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const C3_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0x88, 2]);
const UP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UP_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x10]);
const NH: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const NH_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn net(id: NetworkId, third: u8, gw: Ipv4Addr, mac: MacAddr) -> NetworkConfig {
    NetworkConfig {
        id,
        subnet: Ipv4Addr::new(10, third, 0, 0),
        prefix_len: 24,
        gateway_ip: gw,
        gateway_mac: mac,
        internal: false,
        mtu: 1500,
    }
}

fn uplink(gateway_mac: Option<MacAddr>) -> UplinkConfig {
    UplinkConfig {
        addr: UP,
        prefix_len: 24,
        mac: UP_MAC,
        gateway: Some(NH),
        gateway_mac,
    }
}

struct Lab {
    r: Router,
    out: Emits,
    now: Instant,
}

impl Lab {
    fn with(cfg: RouterConfig) -> Self {
        let mut r = Router::new(cfg);
        r.add_network(net(NET, 77, GW, GW_MAC)).unwrap();
        r.add_network(net(NET2, 88, GW2, GW2_MAC)).unwrap();
        r.add_endpoint(NET, C1, C1_MAC).unwrap();
        r.add_endpoint(NET, C2, C2_MAC).unwrap();
        r.add_endpoint(NET2, C3, C3_MAC).unwrap();
        r.set_uplink(Some(uplink(Some(NH_MAC))));
        Lab {
            r,
            out: Emits::new(),
            now: Instant::from_secs(1000),
        }
    }
    fn new() -> Self {
        Self::with(RouterConfig::default())
    }
    fn net_rx(&mut self, n: NetworkId, f: &[u8]) -> Verdict {
        self.out.clear();
        self.r
            .handle_from_network(n, f, RxMeta::default(), self.now, &mut self.out)
    }
    fn up_rx(&mut self, f: &[u8]) -> Verdict {
        self.out.clear();
        self.r
            .handle_from_uplink(f, RxMeta::default(), self.now, &mut self.out)
    }
    /// The single frame emitted, with its egress.
    fn one(&self) -> (Egress, Vec<u8>) {
        assert_eq!(self.out.len(), 1, "expected one frame");
        let (e, f) = self.out.get(0).unwrap();
        (e, f.to_vec())
    }
    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
    }
}

fn eth(dst: MacAddr, src: MacAddr, proto: EthernetProtocol, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + payload_len];
    EthernetRepr {
        src_addr: src.into(),
        dst_addr: dst.into(),
        ethertype: proto,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    f
}

fn ip_frame(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: IpProtocol,
    l4_len: usize,
    ttl: u8,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len: l4_len,
        hop_limit: ttl,
    };
    let mut f = eth(dst_mac, src_mac, EthernetProtocol::Ipv4, 20 + l4_len);
    let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
    ip.emit(&mut p, &ChecksumCapabilities::default());
    fill(p.payload_mut());
    f
}

fn udp(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
    ttl: u8,
) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: sport,
        dst_port: dport,
    };
    ip_frame(
        dst_mac,
        src_mac,
        src,
        dst,
        IpProtocol::Udp,
        8 + payload.len(),
        ttl,
        |b| {
            repr.emit(
                &mut UdpPacket::new_unchecked(b),
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
                payload.len(),
                |p| p.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

fn tcp(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    control: TcpControl,
    ack: Option<u32>,
) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control,
        seq_number: TcpSeqNumber(1000),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 1024,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: b"hi",
    };
    ip_frame(
        dst_mac,
        src_mac,
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
    )
}

fn echo(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    request: bool,
    ident: u16,
) -> Vec<u8> {
    let data = b"ping-data";
    let repr = if request {
        Icmpv4Repr::EchoRequest {
            ident,
            seq_no: 7,
            data,
        }
    } else {
        Icmpv4Repr::EchoReply {
            ident,
            seq_no: 7,
            data,
        }
    };
    ip_frame(
        dst_mac,
        src_mac,
        src,
        dst,
        IpProtocol::Icmp,
        repr.buffer_len(),
        64,
        |b| {
            repr.emit(
                &mut Icmpv4Packet::new_unchecked(b),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

fn arp(op: ArpOperation, dst_mac: MacAddr, smac: MacAddr, sip: Ipv4Addr, tip: Ipv4Addr) -> Vec<u8> {
    let mut f = eth(dst_mac, smac, EthernetProtocol::Arp, 28);
    ArpRepr::EthernetIpv4 {
        operation: op,
        source_hardware_addr: smac.into(),
        source_protocol_addr: sip,
        target_hardware_addr: if op == ArpOperation::Reply {
            UP_MAC.into()
        } else {
            EthernetAddress([0; 6])
        },
        target_protocol_addr: tip,
    }
    .emit(&mut ArpPacket::new_unchecked(&mut f[14..]));
    f
}

/// What a test reads back from an emitted IPv4 frame. Asserts every checksum verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    proto: u8,
    sport: u16,
    dport: u16,
}

fn seen(f: &[u8]) -> Seen {
    let e = EthernetFrame::new_checked(f).unwrap();
    assert_eq!(e.ethertype(), EthernetProtocol::Ipv4);
    let p = Ipv4Packet::new_checked(e.payload()).unwrap();
    assert_eq!(p.total_len() as usize, e.payload().len());
    assert_all_checksums(e.payload());
    let l4 = p.payload();
    let (sport, dport) = match p.next_header() {
        IpProtocol::Icmp => (u16::from_be_bytes([l4[4], l4[5]]), u16::from(l4[0])),
        _ => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
    };
    Seen {
        dst_mac: MacAddr(e.dst_addr().0),
        src_mac: MacAddr(e.src_addr().0),
        src: p.src_addr(),
        dst: p.dst_addr(),
        ttl: p.hop_limit(),
        proto: p.next_header().into(),
        sport,
        dport,
    }
}

/// IPv4 header, TCP/UDP (pseudo-header) or ICMP checksum; for ICMP errors also the embedded
/// IPv4 header's.
fn assert_all_checksums(pkt: &[u8]) {
    let p = Ipv4Packet::new_checked(pkt).unwrap();
    let hl = p.header_len() as usize;
    assert!(ck::verifies(&pkt[..hl]), "IPv4 header checksum");
    if p.more_frags() || p.frag_offset() != 0 {
        return;
    }
    let l4 = p.payload();
    match p.next_header() {
        IpProtocol::Tcp => assert!(
            ck::verifies_l4(p.src_addr(), p.dst_addr(), IpProtocol::Tcp, l4),
            "TCP checksum"
        ),
        IpProtocol::Udp => {
            if u16::from_be_bytes([l4[6], l4[7]]) != 0 {
                assert!(
                    ck::verifies_l4(p.src_addr(), p.dst_addr(), IpProtocol::Udp, l4),
                    "UDP checksum"
                );
            }
        }
        IpProtocol::Icmp => {
            assert!(ck::verifies(l4), "ICMP checksum");
            if l4[0] == 3 || l4[0] == 11 {
                let e = &l4[8..];
                let ehl = usize::from(e[0] & 15) * 4;
                assert!(ck::verifies(&e[..ehl]), "embedded IPv4 header checksum");
            }
        }
        _ => {}
    }
}

fn counters(l: &Lab) -> &NatCounters {
    l.r.counters()
}

mod gso;

#[test]
fn gateway_answers_arp_and_ping() {
    let mut l = Lab::new();
    let v = l.net_rx(
        NET,
        &arp(ArpOperation::Request, MacAddr::BROADCAST, C1_MAC, C1, GW),
    );
    assert_eq!(v, Verdict::Answered);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Network(NET));
    let a = ArpRepr::parse(&ArpPacket::new_checked(&f[14..]).unwrap()).unwrap();
    assert_eq!(
        a,
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: GW_MAC.into(),
            source_protocol_addr: GW,
            target_hardware_addr: C1_MAC.into(),
            target_protocol_addr: C1,
        }
    );
    assert_eq!(MacAddr::dst_of(&f), Some(C1_MAC));
    // ARP for someone else: not ours.
    let v = l.net_rx(
        NET,
        &arp(ArpOperation::Request, MacAddr::BROADCAST, C1_MAC, C1, C2),
    );
    assert_eq!(v, Verdict::Dropped(DropReason::NotForUs));
    assert!(l.out.is_empty());

    let v = l.net_rx(NET, &echo(GW_MAC, C1_MAC, C1, GW, true, 42));
    assert_eq!(v, Verdict::Answered);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Network(NET));
    let s = seen(&f);
    assert_eq!(
        (s.src, s.dst, s.dst_mac, s.src_mac),
        (GW, C1, C1_MAC, GW_MAC)
    );
    let icmp = Icmpv4Packet::new_checked(&f[34..]).unwrap();
    assert_eq!(
        Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).unwrap(),
        Icmpv4Repr::EchoReply {
            ident: 42,
            seq_no: 7,
            data: b"ping-data"
        }
    );
    assert_eq!(counters(&l).echo_replies, 1);
}

#[test]
fn closed_ports_on_the_gateway_get_rst_and_port_unreachable() {
    let mut l = Lab::new();
    let v = l.net_rx(
        NET,
        &tcp(GW_MAC, C1_MAC, C1, 4000, GW, 22, TcpControl::Syn, None),
    );
    assert_eq!(v, Verdict::Answered);
    let (_, f) = l.one();
    let s = seen(&f);
    assert_eq!((s.src, s.dst, s.sport, s.dport), (GW, C1, 22, 4000));
    let t = TcpPacket::new_checked(&f[34..]).unwrap();
    assert!(t.rst() && t.ack());
    assert_eq!(t.ack_number(), TcpSeqNumber(1000 + 1 + 2));

    let v = l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, 4000, GW, 53, b"q", 64));
    assert_eq!(v, Verdict::Answered);
    let (_, f) = l.one();
    let s = seen(&f);
    assert_eq!((s.src, s.dst, s.dport), (GW, C1, 3)); // type 3
    assert_eq!(f[35], 3); // code: port unreachable
}

#[test]
fn uplink_answers_arp_and_resolves_its_next_hop() {
    let mut l = Lab::new();
    l.r.set_uplink(Some(uplink(None)));
    let v = l.up_rx(&arp(
        ArpOperation::Request,
        MacAddr::BROADCAST,
        NH_MAC,
        NH,
        UP,
    ));
    assert_eq!(v, Verdict::Answered);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Uplink);
    assert_eq!(MacAddr::src_of(&f), Some(UP_MAC));
    // The request taught us the next hop: traffic goes straight out.
    let v = l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 64));
    assert_eq!(v, Verdict::Forwarded);
    assert_eq!(seen(&l.one().1).dst_mac, NH_MAC);

    // Forget it: the next packet waits for ARP, which is asked once.
    l.r.set_uplink(None);
    l.r.set_uplink(Some(uplink(None)));
    let v = l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, 5001, REMOTE, 53, b"q", 64));
    assert_eq!(v, Verdict::Consumed);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Uplink);
    assert_eq!(MacAddr::dst_of(&f), Some(MacAddr::BROADCAST));
    let v = l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, 5002, REMOTE, 53, b"q", 64));
    assert_eq!(v, Verdict::Consumed);
    assert!(l.out.is_empty());
    // The reply releases both held packets.
    let v = l.up_rx(&arp(ArpOperation::Reply, UP_MAC, NH_MAC, NH, UP));
    assert_eq!(v, Verdict::Consumed);
    assert_eq!(l.out.len(), 2);
    for (e, f) in l.out.iter() {
        assert_eq!(e, Egress::Uplink);
        let s = seen(f);
        assert_eq!((s.dst_mac, s.src, s.dst), (NH_MAC, UP, REMOTE));
    }
}

#[test]
fn unanswered_arp_drops_held_packets_on_expire() {
    let mut l = Lab::new();
    l.r.set_uplink(Some(uplink(None)));
    let v = l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 64));
    assert_eq!(v, Verdict::Consumed);
    let t = l.r.poll_timeout().unwrap();
    assert_eq!(t, l.now + Duration::from_secs(3));
    l.r.expire(t);
    assert_eq!(counters(&l).dropped(DropReason::NoNeighbor), 1);
}

#[test]
fn ttl_is_decremented_and_exceeded_generates_an_error() {
    let mut l = Lab::new();
    let v = l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 9));
    assert_eq!(v, Verdict::Forwarded);
    assert_eq!(seen(&l.one().1).ttl, 8);

    let orig = udp(GW_MAC, C1_MAC, C1, 5001, REMOTE, 53, b"q", 1);
    let v = l.net_rx(NET, &orig);
    assert_eq!(v, Verdict::Answered);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Network(NET));
    let s = seen(&f);
    assert_eq!((s.src, s.dst, s.dst_mac), (GW, C1, C1_MAC));
    assert_eq!((f[34], f[35]), (11, 0));
    // The original packet is quoted as received.
    assert_eq!(&f[42..], &orig[14..]);
    assert_eq!(counters(&l).dropped(DropReason::TtlExceeded), 1);
    assert_eq!(counters(&l).icmp_errors_sent, 1);
    // No flow was created for it.
    assert_eq!(l.r.conntrack(l.now).len(), 1);
}

#[test]
fn icmp_errors_are_rate_limited() {
    let mut cfg = RouterConfig::default();
    cfg.icmp_burst = 2;
    cfg.icmp_rate_per_sec = 1;
    let mut l = Lab::with(cfg);
    let f = udp(GW_MAC, C1_MAC, C1, 5001, REMOTE, 53, b"q", 1);
    assert_eq!(l.net_rx(NET, &f), Verdict::Answered);
    assert_eq!(l.net_rx(NET, &f), Verdict::Answered);
    assert_eq!(l.net_rx(NET, &f), Verdict::Dropped(DropReason::TtlExceeded));
    assert!(l.out.is_empty());
    l.advance(1);
    assert_eq!(l.net_rx(NET, &f), Verdict::Answered);
    assert_eq!(counters(&l).icmp_rate_limited, 1);
}

#[test]
fn masquerade_udp_and_translate_the_reply_back() {
    let mut l = Lab::new();
    let v = l.net_rx(
        NET,
        &udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"query", 64),
    );
    assert_eq!(v, Verdict::Forwarded);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Uplink);
    let s = seen(&f);
    assert_eq!(
        (s.src_mac, s.dst_mac, s.src, s.sport, s.dst, s.dport),
        (UP_MAC, NH_MAC, UP, 5000, REMOTE, 53)
    );
    assert_eq!(&f[42..], b"query");

    let v = l.up_rx(&udp(UP_MAC, NH_MAC, REMOTE, 53, UP, 5000, b"answer", 60));
    assert_eq!(v, Verdict::Forwarded);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Network(NET));
    let s = seen(&f);
    assert_eq!(
        (s.src_mac, s.dst_mac, s.src, s.sport, s.dst, s.dport, s.ttl),
        (GW_MAC, C1_MAC, REMOTE, 53, C1, 5000, 59)
    );
    let ct = l.r.conntrack(l.now);
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].state, "ASSURED");
    assert_eq!(ct[0].timeout, 120);
    assert_eq!(ct[0].kind, "snat");
    assert_eq!(counters(&l).translated_out, 1);
    assert_eq!(counters(&l).translated_in, 1);

    // A second container with the same source port gets another external port.
    let v = l.net_rx(NET, &udp(GW_MAC, C2_MAC, C2, 5000, REMOTE, 53, b"q2", 64));
    assert_eq!(v, Verdict::Forwarded);
    let s = seen(&l.one().1);
    assert!((32768..=60999).contains(&s.sport));
    // Unsolicited traffic from outside to the uplink address: nothing mapped.
    let v = l.up_rx(&udp(UP_MAC, NH_MAC, REMOTE, 53, UP, 6000, b"x", 60));
    assert_eq!(v, Verdict::Dropped(DropReason::NotForUs));
}

#[test]
fn masquerade_tcp_follows_the_state_machine() {
    let mut l = Lab::new();
    let syn = tcp(GW_MAC, C1_MAC, C1, 40000, REMOTE, 80, TcpControl::Syn, None);
    assert_eq!(l.net_rx(NET, &syn), Verdict::Forwarded);
    let s = seen(&l.one().1);
    assert_eq!((s.src, s.sport), (UP, 40000));
    assert_eq!(l.r.conntrack(l.now)[0].state, "SYN_SENT");
    let synack = tcp(
        UP_MAC,
        NH_MAC,
        REMOTE,
        80,
        UP,
        40000,
        TcpControl::Syn,
        Some(1001),
    );
    assert_eq!(l.up_rx(&synack), Verdict::Forwarded);
    let ack = tcp(
        GW_MAC,
        C1_MAC,
        C1,
        40000,
        REMOTE,
        80,
        TcpControl::None,
        Some(1),
    );
    assert_eq!(l.net_rx(NET, &ack), Verdict::Forwarded);
    let ct = l.r.conntrack(l.now);
    assert_eq!(
        (ct[0].state, ct[0].assured, ct[0].timeout),
        ("ESTABLISHED", true, 432_000)
    );
    let rst = tcp(UP_MAC, NH_MAC, REMOTE, 80, UP, 40000, TcpControl::Rst, None);
    assert_eq!(l.up_rx(&rst), Verdict::Forwarded);
    assert_eq!(l.r.conntrack(l.now)[0].state, "CLOSE");
    // A mid-stream segment with no connection does not open one.
    let stray = tcp(
        GW_MAC,
        C1_MAC,
        C1,
        40001,
        REMOTE,
        80,
        TcpControl::None,
        Some(1),
    );
    assert_eq!(
        l.net_rx(NET, &stray),
        Verdict::Dropped(DropReason::InvalidState)
    );
}

#[test]
fn ping_through_nat_translates_the_echo_id() {
    let mut l = Lab::new();
    assert_eq!(
        l.net_rx(NET, &echo(GW_MAC, C1_MAC, C1, REMOTE, true, 77)),
        Verdict::Forwarded
    );
    assert_eq!(
        l.net_rx(NET, &echo(GW_MAC, C2_MAC, C2, REMOTE, true, 77)),
        Verdict::Forwarded
    );
    let s = seen(&l.one().1);
    assert_eq!(s.src, UP);
    let ext = s.sport;
    assert_ne!(ext, 77);
    assert_eq!(
        l.up_rx(&echo(UP_MAC, NH_MAC, REMOTE, UP, false, ext)),
        Verdict::Forwarded
    );
    let (e, f) = l.one();
    assert_eq!(e, Egress::Network(NET));
    let s = seen(&f);
    assert_eq!((s.dst, s.sport, s.dst_mac), (C2, 77, C2_MAC));
    // The uplink address answers pings itself.
    assert_eq!(
        l.up_rx(&echo(UP_MAC, NH_MAC, REMOTE, UP, true, 9)),
        Verdict::Answered
    );
    assert_eq!(seen(&l.one().1).dst_mac, NH_MAC);
}

/// An ICMP error from outside about a translated flow, quoting `quoted` (a frame we sent).
fn icmp_error_about(quoted: &[u8], from: Ipv4Addr, ty: u8, code: u8, rest: u32) -> Vec<u8> {
    let q = &quoted[14..];
    let len = 8 + q.len();
    ip_frame(UP_MAC, NH_MAC, from, UP, IpProtocol::Icmp, len, 60, |b| {
        b[0] = ty;
        b[1] = code;
        b[4..8].copy_from_slice(&rest.to_be_bytes());
        b[8..].copy_from_slice(q);
        let c = ck::full(b);
        b[2..4].copy_from_slice(&c.to_be_bytes());
    })
}

#[test]
fn port_unreachable_from_outside_is_translated_into_the_container() {
    let mut l = Lab::new();
    let orig = udp(GW_MAC, C2_MAC, C2, 5000, REMOTE, 9999, b"hello", 64);
    // Take port 5000 first so C2's flow gets a different external port.
    assert_eq!(
        l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 9999, b"x", 64)),
        Verdict::Forwarded
    );
    assert_eq!(l.net_rx(NET, &orig), Verdict::Forwarded);
    let sent = l.one().1;
    let ext = seen(&sent).sport;
    assert_ne!(ext, 5000);
    let err = icmp_error_about(&sent, REMOTE, 3, 3, 0);
    assert_eq!(l.up_rx(&err), Verdict::Forwarded);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Network(NET));
    let s = seen(&f); // checks outer, ICMP and embedded IP checksums
    assert_eq!((s.src, s.dst, s.dst_mac, s.ttl), (REMOTE, C2, C2_MAC, 59));
    // The quoted packet is C2's original again, byte for byte except the TTL it left with.
    let quoted = &f[42..];
    let mut want = orig[14..].to_vec();
    want[8] -= 1;
    let c = {
        want[10..12].copy_from_slice(&[0, 0]);
        ck::full(&want[..20])
    };
    want[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(quoted, &want[..]);
    // And its UDP checksum still verifies (the full datagram was quoted).
    assert!(ck::verifies_l4(C2, REMOTE, IpProtocol::Udp, &quoted[20..]));
    assert_eq!(counters(&l).icmp_errors_translated, 1);

    // Fragmentation needed, quoting only 8 bytes of payload, for a TCP flow.
    let syn = tcp(
        GW_MAC,
        C1_MAC,
        C1,
        41000,
        REMOTE,
        443,
        TcpControl::Syn,
        None,
    );
    l.net_rx(NET, &syn);
    let sent = l.one().1;
    let cut = &sent[..14 + 20 + 8];
    assert_eq!(
        l.up_rx(&icmp_error_about(cut, NH, 3, 4, 1400)),
        Verdict::Forwarded
    );
    let f = l.one().1;
    let s = seen(&f);
    assert_eq!((s.src, s.dst), (NH, C1));
    assert_eq!(&f[38..42], &1400u32.to_be_bytes());
    assert_eq!(&f[42 + 12..42 + 16], &C1.octets());
    assert_eq!(&f[42 + 20..42 + 22], &41000u16.to_be_bytes());

    // An error about nothing we track is dropped.
    let bogus = udp(UP_MAC, UP_MAC, UP, 1234, REMOTE, 9, b"", 64);
    assert_eq!(
        l.up_rx(&icmp_error_about(&bogus, REMOTE, 3, 3, 0)),
        Verdict::Dropped(DropReason::NotForUs)
    );
}

fn publish(l: &mut Lab, proto: Proto, host_port: u16, ip: Ipv4Addr, port: u16) {
    l.r.add_forward(PortForward {
        proto,
        host_ip: None,
        host_port,
        network: NET,
        container_ip: ip,
        container_port: port,
    })
    .unwrap();
}

#[test]
fn port_forward_keeps_the_client_address() {
    let mut l = Lab::new();
    publish(&mut l, Proto::Tcp, 8080, C1, 80);
    let syn = tcp(
        UP_MAC,
        NH_MAC,
        REMOTE,
        33333,
        UP,
        8080,
        TcpControl::Syn,
        None,
    );
    assert_eq!(l.up_rx(&syn), Verdict::Forwarded);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Network(NET));
    let s = seen(&f);
    assert_eq!(
        (s.src_mac, s.dst_mac, s.src, s.sport, s.dst, s.dport),
        (GW_MAC, C1_MAC, REMOTE, 33333, C1, 80)
    );
    let synack = tcp(
        GW_MAC,
        C1_MAC,
        C1,
        80,
        REMOTE,
        33333,
        TcpControl::Syn,
        Some(1001),
    );
    assert_eq!(l.net_rx(NET, &synack), Verdict::Forwarded);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Uplink);
    let s = seen(&f);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (UP, 8080, REMOTE, 33333));
    assert_eq!(l.r.conntrack(l.now)[0].kind, "dnat");

    // The container refuses a UDP forward: its port unreachable reaches the client from UP.
    publish(&mut l, Proto::Udp, 5353, C1, 53);
    let q = udp(UP_MAC, NH_MAC, REMOTE, 40000, UP, 5353, b"q", 64);
    assert_eq!(l.up_rx(&q), Verdict::Forwarded);
    let delivered = l.one().1;
    let err = {
        let inner = &delivered[14..];
        ip_frame(
            GW_MAC,
            C1_MAC,
            C1,
            REMOTE,
            IpProtocol::Icmp,
            8 + inner.len(),
            64,
            |b| {
                b[0] = 3;
                b[1] = 3;
                b[8..].copy_from_slice(inner);
                let c = ck::full(b);
                b[2..4].copy_from_slice(&c.to_be_bytes());
            },
        )
    };
    assert_eq!(l.net_rx(NET, &err), Verdict::Forwarded);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Uplink);
    let s = seen(&f);
    assert_eq!((s.src, s.dst), (UP, REMOTE));
    assert_eq!(
        &f[42 + 12..42 + 20],
        &[REMOTE.octets(), UP.octets()].concat()[..]
    );
    assert_eq!(&f[42 + 22..42 + 24], &5353u16.to_be_bytes());

    // Unpublish ends the forward and its flows.
    l.r.remove_forward(Proto::Tcp, None, 8080).unwrap();
    assert!(l.r.conntrack(l.now).iter().all(|c| c.proto != "tcp"));
    assert_eq!(l.up_rx(&syn), Verdict::Dropped(DropReason::NotForUs));
    assert_eq!(l.r.forwards().len(), 1);
    assert!(l.r.remove_forward(Proto::Tcp, None, 8080).is_err());
}

#[test]
fn host_ip_bound_forward_only_matches_its_address() {
    let mut l = Lab::new();
    l.r.add_forward(PortForward {
        proto: Proto::Tcp,
        host_ip: Some(Ipv4Addr::new(127, 0, 0, 1)),
        host_port: 8080,
        network: NET,
        container_ip: C1,
        container_port: 80,
    })
    .unwrap();
    let syn = tcp(
        UP_MAC,
        NH_MAC,
        REMOTE,
        33333,
        UP,
        8080,
        TcpControl::Syn,
        None,
    );
    assert_eq!(l.up_rx(&syn), Verdict::Dropped(DropReason::NotForUs));
}

#[test]
fn outside_cannot_reach_private_addresses() {
    let mut l = Lab::new();
    let f = udp(UP_MAC, NH_MAC, REMOTE, 53, C1, 5000, b"x", 64);
    assert_eq!(l.up_rx(&f), Verdict::Dropped(DropReason::NotForUs));
    assert!(l.out.is_empty());
}

#[test]
fn hairpin_reaches_the_published_container_through_the_gateway() {
    let mut l = Lab::new();
    publish(&mut l, Proto::Tcp, 8080, C1, 80);
    let syn = tcp(GW_MAC, C2_MAC, C2, 45000, UP, 8080, TcpControl::Syn, None);
    assert_eq!(l.net_rx(NET, &syn), Verdict::Forwarded);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Network(NET));
    let s = seen(&f);
    assert_eq!((s.dst_mac, s.src, s.dst, s.dport), (C1_MAC, GW, C1, 80));
    let gw_port = s.sport;
    let synack = tcp(
        GW_MAC,
        C1_MAC,
        C1,
        80,
        GW,
        gw_port,
        TcpControl::Syn,
        Some(1001),
    );
    assert_eq!(l.net_rx(NET, &synack), Verdict::Forwarded);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Network(NET));
    let s = seen(&f);
    assert_eq!(
        (s.dst_mac, s.src, s.sport, s.dst, s.dport),
        (C2_MAC, UP, 8080, C2, 45000)
    );
    assert_eq!(counters(&l).hairpinned, 2);
    // A container on another network may not use NET's published port.
    let syn3 = tcp(GW2_MAC, C3_MAC, C3, 45000, UP, 8080, TcpControl::Syn, None);
    assert_eq!(
        l.net_rx(NET2, &syn3),
        Verdict::Dropped(DropReason::InterNetwork)
    );
}

#[test]
fn networks_are_isolated_and_internal_networks_have_no_route() {
    let mut l = Lab::new();
    let f = udp(GW_MAC, C1_MAC, C1, 5000, C3, 53, b"x", 64);
    assert_eq!(
        l.net_rx(NET, &f),
        Verdict::Dropped(DropReason::InterNetwork)
    );
    let f = udp(GW_MAC, C1_MAC, C1, 5000, GW2, 53, b"x", 64);
    assert_eq!(
        l.net_rx(NET, &f),
        Verdict::Dropped(DropReason::InterNetwork)
    );
    assert_eq!(counters(&l).dropped(DropReason::InterNetwork), 2);

    let mut n3 = net(
        NetworkId(3),
        99,
        Ipv4Addr::new(10, 99, 0, 1),
        MacAddr([2, 0, 0, 0, 0x99, 1]),
    );
    n3.internal = true;
    l.r.add_network(n3).unwrap();
    let c = Ipv4Addr::new(10, 99, 0, 2);
    let cm = MacAddr([2, 0, 0, 0, 0x99, 2]);
    l.r.add_endpoint(NetworkId(3), c, cm).unwrap();
    let f = udp(n3.gateway_mac, cm, c, 5000, REMOTE, 53, b"x", 64);
    assert_eq!(
        l.net_rx(NetworkId(3), &f),
        Verdict::Dropped(DropReason::NoRoute)
    );
    // Its gateway still answers.
    let f = echo(n3.gateway_mac, cm, c, n3.gateway_ip, true, 1);
    assert_eq!(l.net_rx(NetworkId(3), &f), Verdict::Answered);
    // No uplink at all: no route either.
    l.r.set_uplink(None);
    let f = udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"x", 64);
    assert_eq!(l.net_rx(NET, &f), Verdict::Dropped(DropReason::NoRoute));
}

#[test]
fn validation_drops_bad_frames_with_reasons() {
    let mut l = Lab::new();
    assert_eq!(l.net_rx(NET, &[0; 13]), Verdict::Dropped(DropReason::Runt));
    assert_eq!(
        l.net_rx(NET, &vec![0; 1519]),
        Verdict::Dropped(DropReason::Oversize)
    );
    let mut f = udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"x", 64);
    f[14 + 10] ^= 1;
    assert_eq!(l.net_rx(NET, &f), Verdict::Dropped(DropReason::BadChecksum));
    let mut f = udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"x", 64);
    f[14 + 20 + 6] ^= 1;
    assert_eq!(l.net_rx(NET, &f), Verdict::Dropped(DropReason::BadChecksum));
    let mut f = tcp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, TcpControl::Syn, None);
    let n = f.len();
    f[n - 1] ^= 1;
    assert_eq!(l.net_rx(NET, &f), Verdict::Dropped(DropReason::BadChecksum));
    let mut f = echo(GW_MAC, C1_MAC, C1, REMOTE, true, 1);
    f[40] ^= 1;
    assert_eq!(l.net_rx(NET, &f), Verdict::Dropped(DropReason::BadChecksum));
    assert_eq!(counters(&l).dropped(DropReason::BadChecksum), 4);
    assert!(l.r.conntrack(l.now).is_empty());
    let f = udp(
        MacAddr([2, 9, 9, 9, 9, 9]),
        C1_MAC,
        C1,
        5000,
        REMOTE,
        53,
        b"x",
        64,
    );
    assert_eq!(l.net_rx(NET, &f), Verdict::Dropped(DropReason::NotForUs));
}

#[test]
fn udp_zero_checksum_stays_zero_and_partial_checksums_are_completed() {
    let mut l = Lab::new();
    let mut f = udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"x", 64);
    f[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(l.net_rx(NET, &f), Verdict::Forwarded);
    let out = l.one().1;
    assert_eq!(&out[40..42], &[0, 0]);

    // Offloaded: the checksum field holds garbage (the pseudo-header sum); we complete it.
    let mut f = tcp(GW_MAC, C1_MAC, C1, 5001, REMOTE, 80, TcpControl::Syn, None);
    f[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&[0x12, 0x34]);
    l.out.clear();
    let v =
        l.r.handle_from_network(NET, &f, RxMeta { partial_csum: true }, l.now, &mut l.out);
    assert_eq!(v, Verdict::Forwarded);
    seen(&l.one().1); // verifies
}

#[test]
fn padding_is_stripped_and_dont_fragment_over_mtu_gets_frag_needed() {
    let mut l = Lab::new();
    let mut f = udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"x", 64);
    f.resize(60, 0);
    assert_eq!(l.net_rx(NET, &f), Verdict::Forwarded);
    assert_eq!(l.one().1.len(), 14 + 20 + 9);

    // A network with a 1400-byte MTU, a 1500-byte packet from outside with DF.
    let mut n3 = net(
        NetworkId(3),
        99,
        Ipv4Addr::new(10, 99, 0, 1),
        MacAddr([2, 0, 0, 0, 0x99, 1]),
    );
    n3.mtu = 1400;
    l.r.add_network(n3).unwrap();
    let c = Ipv4Addr::new(10, 99, 0, 2);
    l.r.add_endpoint(NetworkId(3), c, MacAddr([2, 0, 0, 0, 0x99, 2]))
        .unwrap();
    l.r.add_forward(PortForward {
        proto: Proto::Udp,
        host_ip: None,
        host_port: 9000,
        network: NetworkId(3),
        container_ip: c,
        container_port: 9000,
    })
    .unwrap();
    let big = udp(UP_MAC, NH_MAC, REMOTE, 1234, UP, 9000, &[7; 1472], 64);
    assert_eq!(big.len(), 1514);
    assert_eq!(l.up_rx(&big), Verdict::Answered);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Uplink);
    let s = seen(&f);
    assert_eq!((s.src, s.dst, f[34], f[35]), (UP, REMOTE, 3, 4));
    assert_eq!(&f[38..42], &1400u32.to_be_bytes());
    assert_eq!(f.len(), 14 + 576);
}

/// Split an IPv4 frame into two fragments at `at` bytes of payload (a multiple of 8).
fn fragment(frame: &[u8], at: usize) -> (Vec<u8>, Vec<u8>) {
    let hdr = &frame[..34];
    let payload = &frame[34..];
    let mk = |part: &[u8], off: usize, more: bool| {
        let mut f = hdr.to_vec();
        f.extend_from_slice(part);
        let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
        p.set_total_len((20 + part.len()) as u16);
        p.set_ident(0x4242);
        p.set_dont_frag(false);
        p.set_more_frags(more);
        p.set_frag_offset(off as u16);
        p.fill_checksum();
        f
    };
    (mk(&payload[..at], 0, true), mk(&payload[at..], at, false))
}

#[test]
fn fragments_follow_their_first_fragment() {
    let mut l = Lab::new();
    let whole = udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, &[1; 40], 64);
    let (a, b) = fragment(&whole, 24);
    // A later fragment first: nothing to match it with.
    assert_eq!(l.net_rx(NET, &b), Verdict::Dropped(DropReason::Fragment));
    assert_eq!(l.net_rx(NET, &a), Verdict::Forwarded);
    let fa = l.one().1;
    assert_eq!(l.net_rx(NET, &b), Verdict::Forwarded);
    let fb = l.one().1;
    for f in [&fa, &fb] {
        let s = seen(f);
        assert_eq!((s.src, s.dst), (UP, REMOTE));
    }
    // Reassembled, the datagram's UDP checksum verifies under the new addresses.
    let mut dgram = fa[34..].to_vec();
    dgram.extend_from_slice(&fb[34..]);
    assert!(ck::verifies_l4(UP, REMOTE, IpProtocol::Udp, &dgram));
    assert_eq!(counters(&l).fragments_translated, 1);
    // Notes time out.
    l.advance(31);
    assert_eq!(l.net_rx(NET, &b), Verdict::Dropped(DropReason::Fragment));
}

#[test]
fn table_full_evicts_unreplied_first_and_never_assured() {
    let mut cfg = RouterConfig::default();
    cfg.conntrack.max = 3;
    let mut l = Lab::with(cfg);
    let out = |l: &mut Lab, sport: u16| {
        l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, sport, REMOTE, 53, b"q", 64))
    };
    assert_eq!(out(&mut l, 1), Verdict::Forwarded);
    // Assure flow 1 with a reply.
    assert_eq!(
        l.up_rx(&udp(UP_MAC, NH_MAC, REMOTE, 53, UP, 1, b"a", 64)),
        Verdict::Forwarded
    );
    l.advance(1);
    assert_eq!(out(&mut l, 2), Verdict::Forwarded);
    l.advance(1);
    assert_eq!(out(&mut l, 3), Verdict::Forwarded);
    l.advance(1);
    assert_eq!(out(&mut l, 4), Verdict::Forwarded); // evicts 2, the oldest unreplied
    let ports: Vec<_> =
        l.r.conntrack(l.now)
            .iter()
            .map(|c| c.original.sport.unwrap())
            .collect();
    assert_eq!(ports.len(), 3);
    assert!(ports.contains(&1) && !ports.contains(&2));
    assert_eq!(counters(&l).flows_evicted, 1);
    // Assure the rest: now nothing may be evicted.
    for p in [3, 4] {
        assert_eq!(
            l.up_rx(&udp(UP_MAC, NH_MAC, REMOTE, 53, UP, p, b"a", 64)),
            Verdict::Forwarded
        );
    }
    assert_eq!(out(&mut l, 5), Verdict::Dropped(DropReason::TableFull));
    assert_eq!(counters(&l).table_full, 1);
    assert_eq!(counters(&l).dropped(DropReason::TableFull), 1);
    assert_eq!(l.r.conntrack_len(), 3);
}

#[test]
fn short_timeouts_expire_flows_and_free_ports() {
    let mut cfg = RouterConfig::default();
    cfg.conntrack.udp_unreplied = Duration::from_secs(5);
    cfg.conntrack.udp_assured = Duration::from_secs(10);
    cfg.conntrack.icmp = Duration::from_secs(2);
    let mut l = Lab::with(cfg);
    assert_eq!(
        l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 64)),
        Verdict::Forwarded
    );
    assert_eq!(
        l.net_rx(NET, &echo(GW_MAC, C1_MAC, C1, REMOTE, true, 5)),
        Verdict::Forwarded
    );
    assert_eq!(l.r.poll_timeout(), Some(l.now + Duration::from_secs(2)));
    l.advance(2);
    l.r.expire(l.now);
    assert_eq!(l.r.conntrack(l.now).len(), 1);
    assert_eq!(l.r.conntrack(l.now)[0].timeout, 3);
    l.advance(3);
    // Expired: the reply finds nothing (whether or not expire ran).
    assert_eq!(
        l.up_rx(&udp(UP_MAC, NH_MAC, REMOTE, 53, UP, 5000, b"a", 64)),
        Verdict::Dropped(DropReason::NotForUs)
    );
    l.r.expire(l.now);
    assert_eq!(l.r.conntrack_len(), 0);
    assert_eq!(counters(&l).flows_expired, 2);
    assert_eq!(l.r.poll_timeout(), None);
    // C2 can now have port 5000.
    assert_eq!(
        l.net_rx(NET, &udp(GW_MAC, C2_MAC, C2, 5000, REMOTE, 53, b"q", 64)),
        Verdict::Forwarded
    );
    assert_eq!(seen(&l.one().1).sport, 5000);
}

#[test]
fn port_exhaustion_drops_new_flows() {
    let mut cfg = RouterConfig::default();
    cfg.port_range = (50000, 50001);
    let mut l = Lab::with(cfg);
    for i in 0..3u8 {
        let c = Ipv4Addr::new(10, 77, 0, 10 + i);
        let m = MacAddr([2, 0, 0, 0, 0x77, 10 + i]);
        l.r.add_endpoint(NET, c, m).unwrap();
        let v = l.net_rx(NET, &udp(GW_MAC, m, c, 5000, REMOTE, 53, b"q", 64));
        assert_eq!(v, Verdict::Forwarded, "flow {i}");
    }
    let c = Ipv4Addr::new(10, 77, 0, 20);
    l.r.add_endpoint(NET, c, C2_MAC).unwrap();
    let v = l.net_rx(NET, &udp(GW_MAC, C2_MAC, c, 5000, REMOTE, 53, b"q", 64));
    assert_eq!(v, Verdict::Dropped(DropReason::PortsExhausted));
    assert_eq!(counters(&l).ports_exhausted, 1);
    // Another remote port is another external tuple.
    let v = l.net_rx(NET, &udp(GW_MAC, C2_MAC, c, 5000, REMOTE, 54, b"q", 64));
    assert_eq!(v, Verdict::Forwarded);
}

#[test]
fn configuration_changes_remove_state() {
    let mut l = Lab::new();
    publish(&mut l, Proto::Tcp, 8080, C1, 80);
    l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 64));
    l.net_rx(NET, &udp(GW_MAC, C2_MAC, C2, 5000, REMOTE, 53, b"q", 64));
    l.r.remove_endpoint(NET, C1);
    assert_eq!(l.r.conntrack(l.now).len(), 1);
    assert_eq!(counters(&l).flows_removed, 1);
    l.r.remove_network(NET).unwrap();
    assert!(l.r.conntrack(l.now).is_empty());
    assert!(l.r.forwards().is_empty());
    assert_eq!(l.r.remove_network(NET), Err(NatError::UnknownNetwork(NET)));
    assert!(l
        .r
        .add_network(net(
            NetworkId(u16::MAX),
            1,
            Ipv4Addr::new(10, 1, 0, 1),
            GW_MAC
        ))
        .is_err());
    assert!(l.r.add_endpoint(NET2, C1, C1_MAC).is_err());
}

#[test]
fn counters_and_conntrack_serialize() {
    let mut l = Lab::new();
    l.net_rx(NET, &echo(GW_MAC, C1_MAC, C1, REMOTE, true, 77));
    let ct = l.r.conntrack(l.now);
    assert_eq!(ct[0].original.id, Some(77));
    assert_eq!(ct[0].proto, "icmp");
    let s = format!("{:?}", ct[0]);
    assert!(s.contains("ICMP"));
    let _ = l.net_rx(NET, &[0; 3]);
    let c = counters(&l);
    assert_eq!(c.dropped(DropReason::Runt), 1);
}

// ---- properties ----

fn any_l4() -> impl Strategy<Value = u8> {
    prop_oneof![Just(6u8), Just(17u8), Just(1u8)]
}

/// A first packet from a container (C1 or C2) to a remote host.
fn build_out(proto: u8, c: bool, sport: u16, remote: u32, dport: u16) -> Vec<u8> {
    let (ip, mac) = if c { (C1, C1_MAC) } else { (C2, C2_MAC) };
    let dst = Ipv4Addr::from_bits(0xc633_6400 | (remote & 0xff));
    match proto {
        6 => tcp(GW_MAC, mac, ip, sport, dst, dport, TcpControl::Syn, None),
        17 => udp(GW_MAC, mac, ip, sport, dst, dport, b"payload", 64),
        _ => echo(GW_MAC, mac, ip, dst, true, sport),
    }
}

/// The reply a remote host would send to a packet we emitted on the uplink.
fn reply_to(f: &[u8]) -> Vec<u8> {
    let s = seen(f);
    match s.proto {
        6 => tcp(
            UP_MAC,
            NH_MAC,
            s.dst,
            s.dport,
            s.src,
            s.sport,
            TcpControl::Syn,
            Some(1001),
        ),
        17 => udp(UP_MAC, NH_MAC, s.dst, s.dport, s.src, s.sport, b"reply", 64),
        _ => echo(UP_MAC, NH_MAC, s.dst, s.src, false, s.sport),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Out through SNAT, back through the reply's swapped tuple: the container sees the exact
    /// inverse of what it sent, checksums verify at every step, and no two live flows share an
    /// external tuple.
    #[test]
    fn reply_inverts_the_original(flows in proptest::collection::vec(
        (any_l4(), any::<bool>(), 1u16..4, 0u32..3, 1u16..3), 1..40), max in 2usize..20) {
        let mut cfg = RouterConfig::default();
        cfg.conntrack.max = max;
        cfg.port_range = (40000, 40063);
        let mut l = Lab::with(cfg);
        for (proto, c, sport, remote, dport) in flows {
            let f = build_out(proto, c, sport, remote, dport);
            let orig = seen(&f);
            let v = l.net_rx(NET, &f);
            if v != Verdict::Forwarded {
                prop_assert!(matches!(v, Verdict::Dropped(DropReason::TableFull | DropReason::PortsExhausted)));
                continue;
            }
            let (e, out) = l.one();
            prop_assert_eq!(e, Egress::Uplink);
            let s = seen(&out);
            prop_assert_eq!(s.src, UP);
            let back = reply_to(&out);
            prop_assert_eq!(l.up_rx(&back), Verdict::Forwarded);
            let (e, f2) = l.one();
            prop_assert_eq!(e, Egress::Network(NET));
            let r = seen(&f2);
            prop_assert_eq!((r.src, r.dst, r.dst_mac), (orig.dst, orig.src, orig.src_mac));
            if proto == 1 {
                prop_assert_eq!(r.sport, orig.sport); // echo id
            } else {
                prop_assert_eq!((r.sport, r.dport), (orig.dport, orig.sport));
            }
            let ct = l.r.conntrack(l.now);
            prop_assert!(ct.len() <= max);
            let mut ext = std::collections::HashSet::new();
            for c in &ct {
                prop_assert!(ext.insert((c.proto, c.reply.src, c.reply.sport, c.reply.dst, c.reply.dport, c.reply.id)));
            }
            l.advance(1);
        }
    }

    /// Random bytes, and random mutations of valid frames, never panic on either side.
    #[test]
    fn random_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                 flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
                                 which in 0usize..6, partial in any::<bool>()) {
        let mut l = Lab::new();
        publish(&mut l, Proto::Udp, 5353, C1, 53);
        let meta = RxMeta { partial_csum: partial };
        let mut out = Emits::new();
        l.r.handle_from_network(NET, &bytes, meta, l.now, &mut out);
        l.r.handle_from_uplink(&bytes, meta, l.now, &mut out);
        let seed = l.net_rx(NET, &udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 64));
        prop_assert_eq!(seed, Verdict::Forwarded);
        let sent = l.one().1;
        let mut base = match which {
            0 => udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 64),
            1 => icmp_error_about(&sent, REMOTE, 3, 3, 0),
            2 => udp(UP_MAC, NH_MAC, REMOTE, 1, UP, 5353, b"q", 64),
            3 => arp(ArpOperation::Request, MacAddr::BROADCAST, NH_MAC, NH, UP),
            4 => fragment(&udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, &[0; 40], 64), 16).1,
            _ => echo(GW_MAC, C1_MAC, C1, GW, true, 1),
        };
        for (i, b) in flips {
            let n = base.len();
            base[i % n] ^= b;
        }
        l.r.handle_from_network(NET, &base, meta, l.now, &mut out);
        l.r.handle_from_uplink(&base, meta, l.now, &mut out);
        for (_, f) in out.iter() {
            if f.len() >= 34 && f[12..14] == [8, 0] && !partial {
                assert_all_checksums(&f[14..]);
            }
        }
        l.r.expire(l.now + Duration::from_secs(1_000_000));
    }
}

// ---- host mode (the socket uplink) ----

fn host_lab() -> Lab {
    let mut l = Lab::new();
    l.r.set_uplink(None);
    l.r.set_host_uplink(true);
    l
}

/// A bare IPv4 packet (the frame without its Ethernet header).
fn bare(f: &[u8]) -> Vec<u8> {
    f[14..].to_vec()
}

#[test]
fn host_mode_sends_outside_traffic_to_the_host_as_bare_ip() {
    let mut l = host_lab();
    let f = udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 64);
    assert_eq!(l.net_rx(NET, &f), Verdict::Forwarded);
    let (e, p) = l.one();
    assert_eq!(e, Egress::Host);
    let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
    assert_eq!(ip.hop_limit(), 63, "TTL is decremented");
    assert_eq!((ip.src_addr(), ip.dst_addr()), (C1, REMOTE));
    assert!(ck::verifies(&p[..20]));
    assert_eq!(&p[20..], &bare(&f)[20..], "the payload is untouched");
    assert_eq!(l.r.counters().host_out, 1);
    assert_eq!(
        l.r.conntrack_len(),
        0,
        "the socket uplink keeps its own flows"
    );

    // TTL 1: time exceeded from the gateway, nothing to the host.
    let f = udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 1);
    assert_eq!(l.net_rx(NET, &f), Verdict::Answered);
    assert_eq!(l.one().0, Egress::Network(NET));
    // TCP and echo go out too.
    let f = tcp(GW_MAC, C1_MAC, C1, 4000, REMOTE, 80, TcpControl::Syn, None);
    assert_eq!(l.net_rx(NET, &f), Verdict::Forwarded);
    assert_eq!(l.one().0, Egress::Host);
    let f = echo(GW_MAC, C1_MAC, C1, REMOTE, true, 9);
    assert_eq!(l.net_rx(NET, &f), Verdict::Forwarded);
    assert_eq!(l.one().0, Egress::Host);
}

#[test]
fn host_mode_keeps_the_gateway_isolation_and_internal_networks() {
    let mut l = host_lab();
    // TCP/UDP to the gateway go to the host uplink (a loopback client's replies), unchanged TTL.
    let f = tcp(GW_MAC, C1_MAC, C1, 4000, GW, 80, TcpControl::Syn, None);
    assert_eq!(l.net_rx(NET, &f), Verdict::Forwarded);
    let (e, p) = l.one();
    assert_eq!(e, Egress::Host);
    assert_eq!(p, bare(&f));
    // Ping to the gateway is still answered by the gateway.
    let f = echo(GW_MAC, C1_MAC, C1, GW, true, 3);
    assert_eq!(l.net_rx(NET, &f), Verdict::Answered);
    assert_eq!(l.one().0, Egress::Network(NET));
    // Another network's addresses stay unreachable.
    let f = udp(GW_MAC, C1_MAC, C1, 5000, C3, 53, b"q", 64);
    assert_eq!(
        l.net_rx(NET, &f),
        Verdict::Dropped(DropReason::InterNetwork)
    );
    let f = udp(GW_MAC, C1_MAC, C1, 5000, GW2, 53, b"q", 64);
    assert_eq!(
        l.net_rx(NET, &f),
        Verdict::Dropped(DropReason::InterNetwork)
    );
    // An internal network has no way out, and its gateway answers for itself.
    let mut l = Lab::new();
    l.r.set_uplink(None);
    l.r.set_host_uplink(true);
    let net3 = NetworkId(3);
    let mut n = net(
        net3,
        99,
        Ipv4Addr::new(10, 99, 0, 1),
        MacAddr([2, 0, 0, 0, 0x99, 1]),
    );
    n.internal = true;
    l.r.add_network(n).unwrap();
    let c = Ipv4Addr::new(10, 99, 0, 2);
    let cm = MacAddr([2, 0, 0, 0, 0x99, 2]);
    l.r.add_endpoint(net3, c, cm).unwrap();
    let f = udp(n.gateway_mac, cm, c, 5000, REMOTE, 53, b"q", 64);
    assert_eq!(l.net_rx(net3, &f), Verdict::Dropped(DropReason::NoRoute));
    let f = tcp(
        n.gateway_mac,
        cm,
        c,
        4000,
        n.gateway_ip,
        80,
        TcpControl::Syn,
        None,
    );
    assert_eq!(
        l.net_rx(net3, &f),
        Verdict::Answered,
        "RST from the gateway"
    );
    assert_eq!(l.one().0, Egress::Network(net3));
    // Injection into an internal network is refused.
    let back = udp(GW_MAC, C1_MAC, REMOTE, 53, c, 5000, b"a", 64);
    l.out.clear();
    let v = l.r.inject_from_host(&bare(&back), l.now, &mut l.out);
    assert_eq!(v, Verdict::Dropped(DropReason::NoRoute));
    assert!(l.out.is_empty());
}

#[test]
fn a_raw_uplink_overrides_host_mode_and_host_mode_off_drops() {
    let mut l = Lab::new();
    l.r.set_host_uplink(true);
    let f = udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 64);
    assert_eq!(l.net_rx(NET, &f), Verdict::Forwarded);
    assert_eq!(l.one().0, Egress::Uplink);
    let mut l = Lab::new();
    l.r.set_uplink(None);
    assert_eq!(l.net_rx(NET, &f), Verdict::Dropped(DropReason::NoRoute));
}

#[test]
fn injected_packets_get_the_gateway_and_endpoint_macs() {
    let mut l = host_lab();
    let back = udp(GW_MAC, C1_MAC, REMOTE, 53, C1, 5000, b"answer", 60);
    l.out.clear();
    let v = l.r.inject_from_host(&bare(&back), l.now, &mut l.out);
    assert_eq!(v, Verdict::Forwarded);
    let (e, f) = l.one();
    assert_eq!(e, Egress::Network(NET));
    let s = seen(&f);
    assert_eq!((s.dst_mac, s.src_mac), (C1_MAC, GW_MAC));
    assert_eq!((s.src, s.dst, s.ttl), (REMOTE, C1, 60));
    assert_eq!(l.r.counters().host_in, 1);
    // An address no endpoint holds, an address in no network, garbage, an oversize packet.
    let cases = [
        (
            udp(
                GW_MAC,
                C1_MAC,
                REMOTE,
                53,
                Ipv4Addr::new(10, 77, 0, 99),
                1,
                b"a",
                9,
            ),
            DropReason::NotForUs,
        ),
        (
            udp(
                GW_MAC,
                C1_MAC,
                REMOTE,
                53,
                Ipv4Addr::new(10, 55, 0, 2),
                1,
                b"a",
                9,
            ),
            DropReason::NoRoute,
        ),
        (vec![0u8; 30], DropReason::Malformed),
        (
            udp(GW_MAC, C1_MAC, REMOTE, 53, C1, 1, &[0u8; 1600], 9),
            DropReason::Oversize,
        ),
    ];
    for (f, why) in cases {
        l.out.clear();
        let pkt = if f.len() == 30 { f.clone() } else { bare(&f) };
        assert_eq!(
            l.r.inject_from_host(&pkt, l.now, &mut l.out),
            Verdict::Dropped(why)
        );
        assert!(l.out.is_empty());
    }
    assert_eq!(l.r.network_for(C1).map(|n| n.id), Some(NET));
    assert_eq!(l.r.network_for(REMOTE), None);
}

#[test]
fn host_super_packets_enter_as_one_gso_frame_cut_within_the_mtu() {
    let mut l = host_lab();
    let f = tcp(
        GW_MAC,
        C1_MAC,
        REMOTE,
        80,
        C1,
        5000,
        TcpControl::None,
        Some(1),
    );
    let mut pkt = bare(&f);
    pkt.truncate(40);
    pkt.extend((0..4000u32).map(|i| i as u8));
    let total = (pkt.len() as u16).to_be_bytes();
    pkt[2..4].copy_from_slice(&total);
    pkt[10..12].copy_from_slice(&[0, 0]);
    let c = ck::full(&pkt[..20]);
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
    l.out.clear();
    let v = l.r.inject_gso_from_host(&pkt, 1460, l.now, &mut l.out);
    assert_eq!(v, Verdict::Forwarded);
    let frames: Vec<_> = l.out.iter_offloaded().collect();
    assert_eq!(frames.len(), 1);
    let (e, f, h) = frames[0];
    assert_eq!(e, Egress::Network(NET));
    assert_eq!(&f[14..], &pkt[..]);
    assert_eq!(
        h,
        Some(&switchyard_switch::gso::VnetHdr {
            flags: switchyard_switch::gso::VNET_F_NEEDS_CSUM,
            gso_type: switchyard_switch::gso::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1460,
            csum_start: 34,
            csum_offset: 16,
        })
    );
    // Segments that would not fit the MTU, the packet whole without GSO, a UDP packet, a
    // zero segment size, a fragment (found by the nat fuzz target: no segmentation cuts it).
    let u = bare(&udp(GW_MAC, C1_MAC, REMOTE, 53, C1, 1, &[0u8; 1600], 9));
    let mut frag = pkt.clone();
    frag[6] |= 0x20;
    frag[10..12].copy_from_slice(&[0, 0]);
    let c = ck::full(&frag[..20]);
    frag[10..12].copy_from_slice(&c.to_be_bytes());
    for (p, g, why) in [
        (&pkt, Some(1461), DropReason::Oversize),
        (&pkt, None, DropReason::Oversize),
        (&u, Some(1000), DropReason::Malformed),
        (&pkt, Some(0), DropReason::Malformed),
        (&frag, Some(1460), DropReason::Fragment),
    ] {
        l.out.clear();
        let v = match g {
            Some(g) => l.r.inject_gso_from_host(p, g, l.now, &mut l.out),
            None => l.r.inject_from_host(p, l.now, &mut l.out),
        };
        assert_eq!(v, Verdict::Dropped(why));
        assert!(l.out.is_empty());
    }
}

// ---- the established-flow fast path (fast.rs) against the full path ----

/// Two identical labs; `b` is driven through the full path only.
fn twin_labs() -> (Lab, Lab) {
    let mk = || {
        let mut l = Lab::new();
        publish(&mut l, Proto::Tcp, 8080, C2, 80);
        l
    };
    (mk(), mk())
}

/// Feed `f` to both labs (fast-path-enabled `a`, full-path-only `b`) and require identical
/// verdicts, emitted frames, counters and conntrack.
fn same_on_both(a: &mut Lab, b: &mut Lab, uplink: bool, f: &[u8], meta: RxMeta) -> Verdict {
    a.out.clear();
    b.out.clear();
    let va = if uplink {
        a.r.handle_from_uplink(f, meta, a.now, &mut a.out)
    } else {
        a.r.handle_from_network(NET, f, meta, a.now, &mut a.out)
    };
    let vb = if uplink {
        let v = b.r.uplink_rx(f, meta, b.now, &mut b.out);
        b.r.finish(v)
    } else {
        let v = b.r.network_rx(NET, f, meta, b.now, &mut b.out);
        b.r.finish(v)
    };
    assert_eq!(va, vb);
    let fa: Vec<_> = a.out.iter().map(|(e, f)| (e, f.to_vec())).collect();
    let fb: Vec<_> = b.out.iter().map(|(e, f)| (e, f.to_vec())).collect();
    assert_eq!(fa, fb);
    assert_eq!(a.r.counters(), b.r.counters());
    let ca: Vec<_> =
        a.r.conntrack(a.now)
            .into_iter()
            .map(|c| format!("{c:?}"))
            .collect();
    let cb: Vec<_> =
        b.r.conntrack(b.now)
            .into_iter()
            .map(|c| format!("{c:?}"))
            .collect();
    assert_eq!(ca, cb);
    assert_eq!(a.r.conntrack_len(), b.r.conntrack_len());
    va
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Established TCP/UDP flows (SNAT and DNAT), then mutated frames of them in both
    /// directions: the fast path behaves exactly as the full path, byte for byte.
    #[test]
    fn fast_path_matches_full_path(
        steps in proptest::collection::vec(
            (0usize..9, proptest::collection::vec((0usize..80, any::<u8>()), 0..3),
             any::<bool>(), 0u64..200, 0u8..4, proptest::collection::vec(any::<u8>(), 0..24)),
            1..12),
    ) {
        let (mut a, mut b) = twin_labs();
        let m = RxMeta::default();
        // Open: UDP out, its reply; TCP out handshake; a DNAT'd TCP connection in.
        let u = udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, b"q", 64);
        same_on_both(&mut a, &mut b, false, &u, m);
        let ext = a.out.get(0).map(|(_, f)| u16::from_be_bytes([f[34], f[35]])).unwrap();
        let s = tcp(GW_MAC, C1_MAC, C1, 4000, REMOTE, 80, TcpControl::Syn, None);
        same_on_both(&mut a, &mut b, false, &s, m);
        let text = a.out.get(0).map(|(_, f)| u16::from_be_bytes([f[34], f[35]])).unwrap();
        let d = tcp(UP_MAC, NH_MAC, REMOTE, 7000, UP, 8080, TcpControl::Syn, None);
        same_on_both(&mut a, &mut b, true, &d, m);
        let h = tcp(GW_MAC, C1_MAC, C1, 45000, UP, 8080, TcpControl::Syn, None);
        same_on_both(&mut a, &mut b, false, &h, m);
        for (which, flips, partial, secs, ttl_sel, payload) in steps {
            let ttl = [64, 2, 1, 0][usize::from(ttl_sel)];
            let ctl = [TcpControl::None, TcpControl::Fin, TcpControl::Rst, TcpControl::Syn][which % 4];
            let (up, mut f) = match which {
                0 => (false, udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, &payload, ttl)),
                1 => (true, udp(UP_MAC, NH_MAC, REMOTE, 53, UP, ext, &payload, ttl)),
                2 => (false, tcp(GW_MAC, C1_MAC, C1, 4000, REMOTE, 80, ctl, Some(5))),
                3 => (true, tcp(UP_MAC, NH_MAC, REMOTE, 80, UP, text, ctl, Some(9))),
                4 => (true, tcp(UP_MAC, NH_MAC, REMOTE, 7000, UP, 8080, ctl, Some(1))),
                5 => (false, tcp(GW_MAC, C2_MAC, C2, 80, REMOTE, 7000, ctl, Some(2))),
                6 => (true, udp(UP_MAC, NH_MAC, REMOTE, 53, UP, ext, &payload, 64)),
                7 => (false, udp(GW_MAC, C1_MAC, C1, 5000, REMOTE, 53, &payload, 64)),
                // Hairpin: to the uplink address's published port from inside.
                _ => (false, tcp(GW_MAC, C1_MAC, C1, 45000, UP, 8080, ctl, Some(3))),
            };
            if (6..8).contains(&which) && !payload.is_empty() {
                // Zero UDP checksum, Ethernet padding, and a TTL on the edge.
                f[40..42].copy_from_slice(&[0, 0]);
                f.extend_from_slice(&payload[..payload.len() % 5]);
            }
            for (i, x) in flips {
                let n = f.len();
                f[i % n] ^= x;
            }
            let meta = RxMeta { partial_csum: partial && which % 3 == 0 };
            same_on_both(&mut a, &mut b, up, &f, meta);
            a.advance(secs);
            b.advance(secs);
        }
    }
}

/// `refs` through `a`'s batch entry point and one at a time through `b`'s: the same verdicts,
/// frames, counters and conntrack size, which are returned.
fn batch_and_single(
    a: &mut Lab,
    b: &mut Lab,
    refs: &[&[u8]],
    uplink: bool,
) -> (Vec<Verdict>, Vec<(Egress, Vec<u8>)>) {
    let m = RxMeta::default();
    a.out.clear();
    b.out.clear();
    let mut va = Vec::new();
    if uplink {
        a.r.handle_batch_from_uplink(refs, m, a.now, &mut a.out, &mut va);
    } else {
        a.r.handle_batch_from_network(NET, refs, m, a.now, &mut a.out, &mut va);
    }
    let vb: Vec<Verdict> = refs
        .iter()
        .map(|f| match uplink {
            true => b.r.handle_from_uplink(f, m, b.now, &mut b.out),
            false => b.r.handle_from_network(NET, f, m, b.now, &mut b.out),
        })
        .collect();
    assert_eq!(va, vb);
    let fa: Vec<_> = a.out.iter().map(|(e, f)| (e, f.to_vec())).collect();
    let fb: Vec<_> = b.out.iter().map(|(e, f)| (e, f.to_vec())).collect();
    assert_eq!(fa, fb);
    assert_eq!(a.r.counters(), b.r.counters());
    assert_eq!(a.r.conntrack_len(), b.r.conntrack_len());
    (va, fa)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The batch entry points give the same verdicts, frames, counters and conntrack as calling
    /// the single-frame ones in order (new flows, replies, junk and mutated frames mixed).
    #[test]
    fn batch_matches_single_frames(
        frames in proptest::collection::vec((0usize..6, 0u16..4, any::<bool>(), proptest::collection::vec((0usize..64, any::<u8>()), 0..2)), 0..40),
    ) {
        let (mut a, mut b) = twin_labs();
        for uplink in [false, true] {
            let fs: Vec<Vec<u8>> = frames
                .iter()
                .map(|(which, port, mutate, flips)| {
                    let mut f = match (uplink, which) {
                        (false, 0..=2) => udp(GW_MAC, C1_MAC, C1, 5000 + port, REMOTE, 53, b"q", 64),
                        (false, 3) => tcp(GW_MAC, C2_MAC, C2, 4000 + port, REMOTE, 80, TcpControl::Syn, None),
                        (false, 4) => echo(GW_MAC, C1_MAC, C1, REMOTE, true, *port),
                        (true, 0..=3) => udp(UP_MAC, NH_MAC, REMOTE, 53, UP, 32768 + port, b"r", 64),
                        (true, 4) => tcp(UP_MAC, NH_MAC, REMOTE, 7000 + port, UP, 8080, TcpControl::Syn, None),
                        _ => vec![0u8; usize::from(*port) * 20],
                    };
                    if *mutate {
                        for (i, x) in flips {
                            if !f.is_empty() {
                                let n = f.len();
                                f[i % n] ^= x;
                            }
                        }
                    }
                    f
                })
                .collect();
            let refs: Vec<&[u8]> = fs.iter().map(|f| &f[..]).collect();
            batch_and_single(&mut a, &mut b, &refs, uplink);
        }
    }
}

/// Long batches (far more frames than the pipeline's depth) whose new flows grow the conntrack
/// index mid-batch, then their replies and the established flows again: the same verdicts,
/// frames, counters and conntrack as one frame at a time.
#[test]
fn batch_matches_single_frames_across_index_growth() {
    let (mut a, mut b) = twin_labs();
    let outs: Vec<Vec<u8>> = (0..700u16)
        .map(|i| udp(GW_MAC, C1_MAC, C1, 10_000 + i, REMOTE, 53, b"q", 64))
        .collect();
    let run = |a: &mut Lab, b: &mut Lab, fs: &[Vec<u8>], uplink: bool| {
        let refs: Vec<&[u8]> = fs.iter().map(|f| &f[..]).collect();
        let (v, out) = batch_and_single(a, b, &refs, uplink);
        assert!(v.iter().all(|v| *v == Verdict::Forwarded), "{v:?}");
        out
    };
    let sent = run(&mut a, &mut b, &outs, false);
    assert_eq!(a.r.conntrack_len(), 700);
    let replies: Vec<Vec<u8>> = sent
        .iter()
        .map(|(_, f)| {
            let ext = u16::from_be_bytes([f[34], f[35]]);
            udp(UP_MAC, NH_MAC, REMOTE, 53, UP, ext, b"r", 64)
        })
        .collect();
    let back = run(&mut a, &mut b, &replies, true);
    assert!(back.iter().all(|(e, _)| *e == Egress::Network(NET)));
    run(&mut a, &mut b, &outs, false);
    assert_eq!(a.r.counters().translated_out, 1400);
    assert_eq!(a.r.counters().translated_in, 700);
}
