//! The UDP/IPv4 around DNS messages: picking queries for a gateway out of frames, and framing
//! replies and upstream queries (checksums computed). Views from `smoltcp::wire`, checked once.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket, UdpRepr,
};
use switchyard_switch::{DropReason, MacAddr};

pub const DNS_PORT: u16 = 53;
const ETH: usize = 14;
const IP: usize = 20;
const UDP: usize = 8;

/// A UDP datagram found in a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub src_mac: MacAddr,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// Where the UDP payload sits in the frame.
    pub payload: Range<usize>,
}

/// The IPv4 part of a frame for the gateway: who sent it, and where its L4 bytes are.
struct V4 {
    src_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    header_len: usize,
    /// The L4 header and payload within the frame (no Ethernet padding).
    l4: Range<usize>,
}

/// The IPv4 packet of protocol `proto` in `frame` if it is addressed to `dst_mac` and `dst_ip`
/// and whole (not a fragment: those are the router's business), with a good header checksum.
fn ipv4_to(
    frame: &[u8],
    dst_mac: MacAddr,
    dst_ip: Ipv4Addr,
    proto: IpProtocol,
) -> Result<Option<V4>, DropReason> {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Ok(None);
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 || eth.dst_addr() != EthernetAddress(dst_mac.0) {
        return Ok(None);
    }
    let Ok(ip) = Ipv4Packet::new_checked(&frame[ETH..]) else {
        return Ok(None);
    };
    if ip.version() != 4 || ip.dst_addr() != dst_ip || ip.next_header() != proto {
        return Ok(None);
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Ok(None);
    }
    if !ip.verify_checksum() {
        return Err(DropReason::BadChecksum);
    }
    let hl = usize::from(ip.header_len());
    Ok(Some(V4 {
        src_mac: MacAddr(eth.src_addr().0),
        src: ip.src_addr(),
        dst: ip.dst_addr(),
        header_len: hl,
        l4: ETH + hl..ETH + usize::from(ip.total_len()),
    }))
}

/// The UDP datagram in `frame` if it is one addressed to `dst_mac` and `dst_ip`, whole (not a
/// fragment) and with good checksums. `Ok(None)`: not UDP for that address at all (someone
/// else's business); `Err`: UDP for it, but broken.
pub fn udp_to(
    frame: &[u8],
    dst_mac: MacAddr,
    dst_ip: Ipv4Addr,
    partial_csum: bool,
) -> Result<Option<Datagram>, DropReason> {
    let Some(v4) = ipv4_to(frame, dst_mac, dst_ip, IpProtocol::Udp)? else {
        return Ok(None);
    };
    let (hl, l4, src, dst) = (v4.header_len, &frame[v4.l4.clone()], v4.src, v4.dst);
    let Ok(udp) = UdpPacket::new_checked(l4) else {
        return Err(DropReason::Malformed);
    };
    if !partial_csum && !udp.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)) {
        return Err(DropReason::BadChecksum);
    }
    let start = ETH + hl + UDP;
    let end = ETH + hl + usize::from(udp.len());
    Ok(Some(Datagram {
        src_mac: v4.src_mac,
        src: SocketAddrV4::new(src, udp.src_port()),
        dst: SocketAddrV4::new(dst, udp.dst_port()),
        payload: start..end,
    }))
}

/// A TCP segment found in a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src_mac: MacAddr,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// SYN without ACK or RST: the only segment that may open a connection.
    pub syn: bool,
    /// Where the IPv4 packet sits in the frame (its total length, no Ethernet padding).
    pub packet: Range<usize>,
}

/// The TCP segment in `frame` if it is one addressed to `dst_mac` and `dst_ip`, whole (not a
/// fragment) and with good checksums (the TCP one unless `partial_csum`). `Ok(None)`: not TCP
/// for that address; `Err`: TCP for it, but broken.
pub fn tcp_to(
    frame: &[u8],
    dst_mac: MacAddr,
    dst_ip: Ipv4Addr,
    partial_csum: bool,
) -> Result<Option<Segment>, DropReason> {
    let Some(v4) = ipv4_to(frame, dst_mac, dst_ip, IpProtocol::Tcp)? else {
        return Ok(None);
    };
    let (l4, src, dst) = (&frame[v4.l4.clone()], v4.src, v4.dst);
    let Ok(tcp) = TcpPacket::new_checked(l4) else {
        return Err(DropReason::Malformed);
    };
    if !partial_csum && !tcp.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)) {
        return Err(DropReason::BadChecksum);
    }
    Ok(Some(Segment {
        src_mac: v4.src_mac,
        src: SocketAddrV4::new(src, tcp.src_port()),
        dst: SocketAddrV4::new(dst, tcp.dst_port()),
        syn: tcp.syn() && !tcp.ack() && !tcp.rst(),
        packet: ETH..v4.l4.end,
    }))
}

/// An Ethernet frame around a bare IPv4 packet.
pub fn ip_frame(src_mac: MacAddr, dst_mac: MacAddr, packet: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; ETH + packet.len()];
    let eth = EthernetRepr {
        src_addr: EthernetAddress(src_mac.0),
        dst_addr: EthernetAddress(dst_mac.0),
        ethertype: EthernetProtocol::Ipv4,
    };
    eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    buf[ETH..].copy_from_slice(packet);
    buf
}

/// A bare IPv4/UDP packet (TTL 64, DF set, checksums filled).
pub fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; IP + UDP + payload.len()];
    emit_ip_udp(&mut buf, src, dst, payload);
    buf
}

/// An Ethernet frame carrying an IPv4/UDP packet.
pub fn udp_frame(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let mut buf = vec![0u8; ETH + IP + UDP + payload.len()];
    let eth = EthernetRepr {
        src_addr: EthernetAddress(src_mac.0),
        dst_addr: EthernetAddress(dst_mac.0),
        ethertype: EthernetProtocol::Ipv4,
    };
    eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    emit_ip_udp(&mut buf[ETH..], src, dst, payload);
    buf
}

fn emit_ip_udp(buf: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
    let caps = ChecksumCapabilities::default();
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: UDP + payload.len(),
        hop_limit: 64,
    };
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut p, &caps);
    p.set_dont_frag(true);
    p.fill_checksum();
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut buf[IP..]),
        &IpAddress::Ipv4(*src.ip()),
        &IpAddress::Ipv4(*dst.ip()),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_datagram_parses_back() {
        let (a, b) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 53);
        let f = udp_frame(a, b, src, dst, b"hello");
        let d = udp_to(&f, b, *dst.ip(), false).unwrap().unwrap();
        assert_eq!((d.src_mac, d.src, d.dst), (a, src, dst));
        assert_eq!(&f[d.payload], b"hello");
        // Another address: not ours; a flipped payload bit: a bad checksum.
        assert_eq!(udp_to(&f, b, Ipv4Addr::new(10, 0, 0, 9), false), Ok(None));
        let mut bad = f.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            udp_to(&bad, b, *dst.ip(), false),
            Err(DropReason::BadChecksum)
        );
        assert!(udp_to(&bad, b, *dst.ip(), true).unwrap().is_some());
        // Every truncation is handled without a panic.
        for n in 0..f.len() {
            let _ = udp_to(&f[..n], b, *dst.ip(), false);
        }
    }
}
