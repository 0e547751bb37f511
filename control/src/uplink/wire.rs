//! The packets the socket uplink reads and writes itself (UDP, ping replies, ICMP errors):
//! pure functions over byte slices, no I/O. TCP segments are smoltcp's business.

use std::net::Ipv4Addr;

use smoltcp::wire::IpProtocol;
use switchyard_nat::checksum as ck;
use switchyard_switch::gso::pseudo_sum4;

/// TTL of the packets we originate towards containers.
pub const TTL: u8 = 64;
pub const IP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_UNREACHABLE: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// Destination-unreachable codes.
pub const NET_UNREACHABLE: u8 = 0;
pub const HOST_UNREACHABLE: u8 = 1;
pub const PORT_UNREACHABLE: u8 = 3;
/// Communication administratively prohibited (RFC 1812): what a container's ping gets when
/// the host allows no ping socket.
pub const ADMIN_PROHIBITED: u8 = 13;

/// The transport view of one IPv4 packet from a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    Echo { id: u16 },
    Other,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// One parsed packet: addresses, transport view and where the L4 payload sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub l4: L4,
    /// Offset of the transport header.
    pub l4_off: usize,
    /// End of the IP packet (total length).
    pub end: usize,
}

impl Parsed {
    /// A TCP SYN without ACK: the only segment that may open a flow.
    pub fn is_syn(&self) -> bool {
        matches!(self.l4, L4::Tcp { flags, .. } if flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN)
    }
}

fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parse an IPv4 packet the router already validated; `None` for anything short or odd.
pub fn parse(pkt: &[u8]) -> Option<Parsed> {
    if pkt.len() < IP_HLEN || pkt[0] >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(pkt[0] & 0x0f) * 4;
    let end = usize::from(rd16(pkt, 2));
    if hlen < IP_HLEN || end < hlen || end > pkt.len() {
        return None;
    }
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    let l4b = &pkt[hlen..end];
    let l4 = match pkt[9] {
        6 if l4b.len() >= 20 => L4::Tcp {
            sport: rd16(l4b, 0),
            dport: rd16(l4b, 2),
            flags: l4b[13],
        },
        17 if l4b.len() >= UDP_HLEN => L4::Udp {
            sport: rd16(l4b, 0),
            dport: rd16(l4b, 2),
        },
        1 if l4b.len() >= 8 && l4b[0] == ICMP_ECHO_REQUEST => L4::Echo { id: rd16(l4b, 4) },
        6 | 17 => return None,
        _ => L4::Other,
    };
    Some(Parsed {
        src,
        dst,
        l4,
        l4_off: hlen,
        end,
    })
}

/// The UDP payload of a parsed UDP packet.
pub fn udp_payload<'a>(pkt: &'a [u8], p: &Parsed) -> &'a [u8] {
    let l4 = &pkt[p.l4_off..p.end];
    let len = usize::from(rd16(l4, 4)).clamp(UDP_HLEN, l4.len());
    &l4[UDP_HLEN..len]
}

/// The ICMP message (header and data) of a parsed packet.
pub fn icmp_message<'a>(pkt: &'a [u8], p: &Parsed) -> &'a [u8] {
    &pkt[p.l4_off..p.end]
}

/// In a TCP SYN (or SYN-ACK) a container sent, replace the MSS option's value by `to` and
/// return the one it had (`None`: no MSS option, or options cut short). The TCP checksum is
/// left stale: smoltcp verifies none on the way in (the pipeline did).
pub fn replace_syn_mss(pkt: &mut [u8], p: &Parsed, to: u16) -> Option<u16> {
    let L4::Tcp { flags, .. } = p.l4 else {
        return None;
    };
    if flags & TCP_SYN == 0 {
        return None;
    }
    let tcp = pkt.get_mut(p.l4_off..p.end)?;
    let doff = usize::from(*tcp.get(12)? >> 4) * 4;
    let opts = tcp.get_mut(20..doff)?;
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 || i + len > opts.len() {
                    return None;
                }
                if kind == 2 && len == 4 {
                    let old = rd16(opts, i + 2);
                    opts[i + 2..i + 4].copy_from_slice(&to.to_be_bytes());
                    return Some(old);
                }
                i += len;
            }
        }
    }
    None
}

/// Turn a TCP packet smoltcp built (checksums complete) into a GSO super-packet's form: the
/// TCP checksum field holds the pseudo-header sum over the whole TCP length (CHECKSUM_PARTIAL,
/// what a vnet tap takes with GSO; software segmentation recomputes every checksum). Returns
/// the TCP header length, `None` when it is not an unfragmented TCP packet.
pub fn to_partial_tcp(pkt: &mut [u8]) -> Option<usize> {
    let p = parse(pkt)?;
    if !matches!(p.l4, L4::Tcp { .. }) || rd16(pkt, 6) & 0x3fff != 0 {
        return None;
    }
    let thl = usize::from(pkt[p.l4_off + 12] >> 4) * 4;
    if thl < 20 || p.l4_off + thl > p.end {
        return None;
    }
    let sum = pseudo_sum4(p.src.octets(), p.dst.octets(), 6, p.end - p.l4_off);
    pkt[p.l4_off + 16..p.l4_off + 18].copy_from_slice(&sum.to_be_bytes());
    Some(thl)
}

fn ip_header(buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, proto: u8, total: usize) {
    buf[0] = 0x45;
    buf[1] = 0;
    buf[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    buf[4..8].copy_from_slice(&[0, 0, 0x40, 0]); // id 0, DF
    buf[8] = TTL;
    buf[9] = proto;
    buf[10..12].copy_from_slice(&[0, 0]);
    buf[12..16].copy_from_slice(&src.octets());
    buf[16..20].copy_from_slice(&dst.octets());
    let c = ck::full(&buf[..IP_HLEN]);
    buf[10..12].copy_from_slice(&c.to_be_bytes());
}

/// A UDP datagram `src:sport -> dst:dport` carrying `payload`, written into `out` (cleared).
pub fn udp_packet(
    out: &mut Vec<u8>,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) {
    let total = IP_HLEN + UDP_HLEN + payload.len();
    out.clear();
    out.resize(total, 0);
    ip_header(out, src, dst, 17, total);
    let u = &mut out[IP_HLEN..];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((UDP_HLEN + payload.len()) as u16).to_be_bytes());
    u[UDP_HLEN..].copy_from_slice(payload);
    let mut c = ck::full_l4(src, dst, IpProtocol::Udp, u);
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
}

/// An ICMP message `msg` (header and data, checksum recomputed, echo id set to `id` when it
/// is an echo reply) from `src` to `dst`, written into `out`.
pub fn icmp_packet(out: &mut Vec<u8>, src: Ipv4Addr, dst: Ipv4Addr, msg: &[u8], id: Option<u16>) {
    let total = IP_HLEN + msg.len();
    out.clear();
    out.resize(total, 0);
    ip_header(out, src, dst, 1, total);
    let m = &mut out[IP_HLEN..];
    m.copy_from_slice(msg);
    if let (Some(id), true) = (id, m.len() >= 8) {
        m[4..6].copy_from_slice(&id.to_be_bytes());
    }
    if m.len() >= 4 {
        m[2..4].copy_from_slice(&[0, 0]);
        let c = ck::full(m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
    }
}

/// A destination-unreachable error about `orig` (a packet a container sent), from `orig`'s
/// destination back to its source, quoting its IP header and the first 8 payload bytes.
pub fn unreachable_for(out: &mut Vec<u8>, orig: &[u8], p: &Parsed, code: u8) {
    let quote = &orig[..(p.l4_off + 8).min(p.end)];
    let mut msg = Vec::with_capacity(8 + quote.len());
    msg.extend_from_slice(&[ICMP_UNREACHABLE, code, 0, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(quote);
    icmp_packet(out, p.dst, p.src, &msg, None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Ipv4Packet, UdpPacket};

    const A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

    #[test]
    fn udp_packets_round_trip_and_verify() {
        let mut out = Vec::new();
        udp_packet(&mut out, B, 53, A, 4000, b"answer");
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.hop_limit(), TTL);
        let u = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(u.verify_checksum(&B.into(), &A.into()));
        let p = parse(&out).unwrap();
        assert_eq!(
            p.l4,
            L4::Udp {
                sport: 53,
                dport: 4000
            }
        );
        assert_eq!((p.src, p.dst), (B, A));
        assert_eq!(udp_payload(&out, &p), b"answer");
    }

    #[test]
    fn echo_replies_get_the_container_id_back() {
        let kernel = [0u8, 0, 0x12, 0x34, 0xab, 0xcd, 0, 7, b'x', b'y'];
        let mut out = Vec::new();
        icmp_packet(&mut out, B, A, &kernel, Some(9));
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        let repr = Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).unwrap();
        assert_eq!(
            repr,
            Icmpv4Repr::EchoReply {
                ident: 9,
                seq_no: 7,
                data: b"xy"
            }
        );
    }

    #[test]
    fn unreachable_quotes_the_original() {
        let mut orig = Vec::new();
        udp_packet(&mut orig, A, 4000, B, 53, b"a long question here");
        let p = parse(&orig).unwrap();
        let mut out = Vec::new();
        unreachable_for(&mut out, &orig, &p, PORT_UNREACHABLE);
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (B, A));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!((icmp.msg_type().into(), icmp.msg_code()), (3u8, 3u8));
        assert_eq!(&ip.payload()[8..], &orig[..28]);
    }

    #[test]
    fn parse_rejects_truncation_and_finds_syn() {
        assert!(parse(&[0x45; 10]).is_none());
        let mut out = Vec::new();
        udp_packet(&mut out, A, 1, B, 2, b"");
        out.truncate(25);
        assert!(parse(&out).is_none(), "total length beyond the buffer");
        let mut syn = vec![0u8; 40];
        syn[0] = 0x45;
        syn[2..4].copy_from_slice(&40u16.to_be_bytes());
        syn[9] = 6;
        syn[33] = TCP_SYN;
        assert!(parse(&syn).unwrap().is_syn());
        syn[33] = TCP_SYN | TCP_ACK;
        assert!(!parse(&syn).unwrap().is_syn());
    }

    /// IPv4 + TCP `B:80 -> A:4000` with `opts` and `payload`, checksums complete.
    fn tcp_packet(flags: u8, opts: &[u8], payload: &[u8]) -> Vec<u8> {
        let thl = 20 + opts.len();
        let total = IP_HLEN + thl + payload.len();
        let mut b = vec![0u8; total];
        ip_header(&mut b, B, A, 6, total);
        let t = &mut b[IP_HLEN..];
        t[0..2].copy_from_slice(&80u16.to_be_bytes());
        t[2..4].copy_from_slice(&4000u16.to_be_bytes());
        t[4..8].copy_from_slice(&7u32.to_be_bytes());
        t[12] = ((thl / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        t[20..thl].copy_from_slice(opts);
        t[thl..].copy_from_slice(payload);
        smoltcp::wire::TcpPacket::new_unchecked(&mut b[IP_HLEN..])
            .fill_checksum(&B.into(), &A.into());
        b
    }

    #[test]
    fn the_mss_option_of_a_syn_is_replaced_and_returned() {
        // NOP NOP SACK-permitted MSS 1460 window-scale 7, end.
        let opts = [1, 1, 4, 2, 2, 4, 0x05, 0xb4, 3, 3, 7, 0];
        let mut syn = tcp_packet(TCP_SYN, &opts, b"");
        let p = parse(&syn).unwrap();
        assert_eq!(replace_syn_mss(&mut syn, &p, 65_000), Some(1460));
        assert_eq!(&syn[IP_HLEN + 26..IP_HLEN + 28], &65_000u16.to_be_bytes());
        assert_eq!(replace_syn_mss(&mut syn, &p, 1), Some(65_000));
        // Not a SYN; no MSS option; an option running past the header: untouched.
        for (flags, opts) in [
            (TCP_ACK, &opts[..]),
            (TCP_SYN, &[1, 1, 4, 2][..]),
            (TCP_SYN, &[1, 2, 9, 0][..]),
        ] {
            let mut pkt = tcp_packet(flags, opts, b"");
            let before = pkt.clone();
            let p = parse(&pkt).unwrap();
            assert_eq!(replace_syn_mss(&mut pkt, &p, 9), None);
            assert_eq!(pkt, before);
        }
    }

    #[test]
    fn a_partial_super_packet_cuts_into_verified_segments_within_the_mss() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let mut pkt = tcp_packet(TCP_ACK | 0x08, &[], &payload);
        let full = pkt[IP_HLEN + 16..IP_HLEN + 18].to_vec();
        assert_eq!(to_partial_tcp(&mut pkt), Some(20));
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&pkt);
        // The CHECKSUM_PARTIAL convention: completing it gives the full checksum back.
        let mut done = frame.clone();
        assert!(switchyard_switch::gso::complete_checksum(
            &mut done,
            14 + IP_HLEN,
            16
        ));
        assert_eq!(done[14 + IP_HLEN + 16..14 + IP_HLEN + 18], full[..]);
        let mut got = Vec::new();
        let n = switchyard_switch::gso::segment_tcp4(&frame, 1460, &mut Vec::new(), &mut |s| {
            assert!(s.len() <= 14 + 1500, "{}", s.len());
            let ip = Ipv4Packet::new_checked(&s[14..]).unwrap();
            assert!(ip.verify_checksum());
            let t = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(t.verify_checksum(&B.into(), &A.into()));
            got.extend_from_slice(t.payload());
        })
        .unwrap();
        assert_eq!((n, got), (4, payload));
        // Not TCP, or a fragment: left alone.
        let mut u = Vec::new();
        udp_packet(&mut u, B, 53, A, 4000, b"x");
        assert_eq!(to_partial_tcp(&mut u), None);
        let mut frag = tcp_packet(TCP_ACK, &[], b"abc");
        frag[6] |= 0x20;
        assert_eq!(to_partial_tcp(&mut frag), None);
    }
}
