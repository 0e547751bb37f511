#![no_main]
//! Any bytes as an IPv4 packet a container sends to the socket uplink: its parser
//! (`uplink::wire::parse`) and every packet the uplink builds from what it parsed (the UDP
//! datagram relayed back, an echo reply, the ICMP errors quoting it: unreachable, refused,
//! prohibited), and the TCP rewrites (a SYN's MSS, a super-packet's partial checksum). Never
//! a panic; offsets stay inside the packet; what is built parses back with the addresses
//! swapped and verifies.

use libfuzzer_sys::fuzz_target;
use smoltcp::wire::{IpAddress, Ipv4Packet, UdpPacket};
use switchyard_control::uplink::wire::{self, Parsed, L4};

/// An IPv4 packet we built: header checksum right, `src -> dst`, protocol `proto`, and its
/// transport part (ICMP here) with a checksum that sums to zero.
fn check_built(out: &[u8], p: &Parsed, proto: u8) -> Vec<u8> {
    let ip = Ipv4Packet::new_checked(out).expect("built packet parses");
    assert!(ip.verify_checksum());
    assert_eq!(usize::from(ip.total_len()), out.len());
    assert_eq!(u8::from(ip.next_header()), proto);
    assert_eq!((ip.src_addr(), ip.dst_addr()), (p.dst, p.src));
    ip.payload().to_vec()
}

fn icmp_sums_to_zero(m: &[u8]) -> bool {
    switchyard_nat::checksum::full(m) == 0
}

fuzz_target!(|data: &[u8]| {
    let Some(p) = wire::parse(data) else {
        return;
    };
    assert!(p.l4_off >= wire::IP_HLEN && p.l4_off <= p.end && p.end <= data.len());
    match p.l4 {
        L4::Udp { sport, dport } => {
            let payload = wire::udp_payload(data, &p);
            assert!(payload.len() <= p.end - p.l4_off - wire::UDP_HLEN);
            let mut out = Vec::new();
            wire::udp_packet(&mut out, p.dst, dport, p.src, sport, payload);
            let l4 = check_built(&out, &p, 17);
            let u = UdpPacket::new_checked(&l4[..]).expect("udp parses");
            assert!(u.verify_checksum(&IpAddress::Ipv4(p.dst), &IpAddress::Ipv4(p.src)));
            assert_eq!(
                (u.src_port(), u.dst_port(), u.payload()),
                (dport, sport, payload)
            );
        }
        L4::Echo { id } => {
            let msg = wire::icmp_message(data, &p);
            let mut out = Vec::new();
            wire::icmp_packet(&mut out, p.dst, p.src, msg, Some(id));
            let m = check_built(&out, &p, 1);
            assert!(icmp_sums_to_zero(&m));
            assert_eq!(u16::from_be_bytes([m[4], m[5]]), id);
        }
        L4::Tcp { .. } => {
            // The MSS rewrite of a SYN: only the option's two bytes change, and a second
            // rewrite reads back the first one's value.
            let mut pkt = data.to_vec();
            if let Some(_old) = wire::replace_syn_mss(&mut pkt, &p, 0xfedc) {
                let changed: Vec<usize> = (0..pkt.len()).filter(|&i| pkt[i] != data[i]).collect();
                assert!(changed.len() <= 2 && changed.iter().all(|&i| i >= p.l4_off + 20));
                assert_eq!(wire::replace_syn_mss(&mut pkt, &p, 1), Some(0xfedc));
            }
            // A super-packet's partial checksum: only the TCP checksum field changes.
            let mut pkt = data.to_vec();
            if let Some(thl) = wire::to_partial_tcp(&mut pkt) {
                assert!(thl >= 20 && p.l4_off + thl <= p.end);
                let at = p.l4_off + 16;
                assert_eq!((&pkt[..at], &pkt[at + 2..]), (&data[..at], &data[at + 2..]));
            }
        }
        L4::Other => {}
    }
    for code in [
        wire::NET_UNREACHABLE,
        wire::HOST_UNREACHABLE,
        wire::PORT_UNREACHABLE,
        wire::ADMIN_PROHIBITED,
    ] {
        let mut out = Vec::new();
        wire::unreachable_for(&mut out, data, &p, code);
        let m = check_built(&out, &p, 1);
        assert_eq!((m[0], m[1]), (wire::ICMP_UNREACHABLE, code));
        assert!(icmp_sums_to_zero(&m));
        // The quote: the original IP header and up to 8 bytes after it.
        assert_eq!(&m[8..], &data[..(p.l4_off + 8).min(p.end)]);
    }
});
