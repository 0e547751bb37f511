//! Frame builders and checkers for replay tests and the fuzz corpus (fuzz/ includes this file
//! by path). Frames are assembled field by field; checksums come from smoltcp's packet views,
//! never from the code under test.
#![allow(dead_code)]

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, TcpPacket,
    UdpPacket,
};

pub type Mac = [u8; 6];
pub type Ip = [u8; 4];

pub const BROADCAST: Mac = [0xff; 6];

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP packet (op 1 request, 2 reply) in an Ethernet frame.
pub fn arp(dst: Mac, src: Mac, op: u16, sha: Mac, spa: Ip, tha: Mac, tpa: Ip) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa);
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa);
    eth(dst, src, 0x0806, &a)
}

pub fn arp_request(src: Mac, spa: Ip, tpa: Ip) -> Vec<u8> {
    arp(BROADCAST, src, 1, src, spa, [0; 6], tpa)
}

/// IPv4 header fields that tests vary.
#[derive(Clone, Copy, Debug)]
pub struct IpOpts {
    pub ttl: u8,
    pub id: u16,
    /// Flags and fragment offset word (0x4000 = DF).
    pub frag: u16,
}

impl Default for IpOpts {
    fn default() -> Self {
        IpOpts {
            ttl: 64,
            id: 0x1234,
            frag: 0x4000,
        }
    }
}

/// An IPv4 packet in an Ethernet frame, with a valid header checksum. The L4 checksum is left
/// as given in `l4`: call [`fill_l4`] for a valid one.
pub fn ipv4_with(dst: Mac, src: Mac, sip: Ip, dip: Ip, proto: u8, o: IpOpts, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&o.id.to_be_bytes());
    p.extend_from_slice(&o.frag.to_be_bytes());
    p.extend_from_slice(&[o.ttl, proto, 0, 0]);
    p.extend_from_slice(&sip);
    p.extend_from_slice(&dip);
    p.extend_from_slice(l4);
    let mut f = eth(dst, src, 0x0800, &p);
    Ipv4Packet::new_unchecked(&mut f[14..]).fill_checksum();
    f
}

/// Compute the TCP/UDP/ICMP checksum of an unfragmented IPv4 frame.
pub fn fill_l4(mut f: Vec<u8>) -> Vec<u8> {
    let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
    let (s, d) = (
        IpAddress::Ipv4(ip.src_addr()),
        IpAddress::Ipv4(ip.dst_addr()),
    );
    match ip.next_header() {
        IpProtocol::Tcp => TcpPacket::new_unchecked(ip.payload_mut()).fill_checksum(&s, &d),
        IpProtocol::Udp => UdpPacket::new_unchecked(ip.payload_mut()).fill_checksum(&s, &d),
        IpProtocol::Icmp => Icmpv4Packet::new_unchecked(ip.payload_mut()).fill_checksum(),
        _ => {}
    }
    f
}

pub fn udp_l4(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

pub fn tcp_l4(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

/// ICMP echo request (type 8) or reply (type 0).
pub fn echo_l4(request: bool, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut i = vec![if request { 8 } else { 0 }, 0, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&seq.to_be_bytes());
    i.extend_from_slice(payload);
    i
}

pub fn udp(dst: Mac, src: Mac, sip: Ip, dip: Ip, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let l4 = udp_l4(sport, dport, data);
    fill_l4(ipv4_with(dst, src, sip, dip, 17, IpOpts::default(), &l4))
}

#[allow(clippy::too_many_arguments)]
pub fn tcp(
    dst: Mac,
    src: Mac,
    sip: Ip,
    dip: Ip,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    data: &[u8],
) -> Vec<u8> {
    let l4 = tcp_l4(sport, dport, seq, ack, flags, data);
    fill_l4(ipv4_with(dst, src, sip, dip, 6, IpOpts::default(), &l4))
}

pub fn ping(dst: Mac, src: Mac, sip: Ip, dip: Ip, id: u16, seq: u16) -> Vec<u8> {
    let l4 = echo_l4(true, id, seq, b"switchyard-ping!");
    fill_l4(ipv4_with(dst, src, sip, dip, 1, IpOpts::default(), &l4))
}

/// An 802.1Q-tagged copy of `f`.
pub fn vlan(f: &[u8], vid: u16) -> Vec<u8> {
    let mut v = f[..12].to_vec();
    v.extend_from_slice(&[0x81, 0x00]);
    v.extend_from_slice(&vid.to_be_bytes());
    v.extend_from_slice(&f[12..]);
    v
}

/// A parsed view of an IPv4 frame for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub dst: Mac,
    pub src: Mac,
    pub sip: Ip,
    pub dip: Ip,
    pub ttl: u8,
    pub proto: u8,
    /// Ports for TCP/UDP, (id, 0) for ICMP echo.
    pub sport: u16,
    pub dport: u16,
    /// ICMP type, TCP flags.
    pub kind: u8,
}

/// Parse an IPv4 frame and check every checksum (UDP zero allowed). Panics with the reason.
pub fn seen(f: &[u8]) -> Seen {
    let e = EthernetFrame::new_checked(f).expect("ethernet");
    assert_eq!(e.ethertype(), EthernetProtocol::Ipv4, "not IPv4");
    let ip = Ipv4Packet::new_checked(e.payload()).expect("ipv4");
    assert!(ip.verify_checksum(), "IPv4 header checksum");
    let (s, d) = (
        IpAddress::Ipv4(ip.src_addr()),
        IpAddress::Ipv4(ip.dst_addr()),
    );
    let whole = !ip.more_frags() && ip.frag_offset() == 0;
    let (sport, dport, kind) = match ip.next_header() {
        IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(ip.payload()).expect("tcp");
            assert!(!whole || t.verify_checksum(&s, &d), "TCP checksum");
            (t.src_port(), t.dst_port(), ip.payload()[13])
        }
        IpProtocol::Udp => {
            let u = UdpPacket::new_checked(ip.payload()).expect("udp");
            assert!(
                !whole || u.checksum() == 0 || u.verify_checksum(&s, &d),
                "UDP checksum"
            );
            (u.src_port(), u.dst_port(), 0)
        }
        IpProtocol::Icmp => {
            let i = Icmpv4Packet::new_checked(ip.payload()).expect("icmp");
            assert!(!whole || i.verify_checksum(), "ICMP checksum");
            let p = ip.payload();
            (u16::from_be_bytes([p[4], p[5]]), 0, p[0])
        }
        _ => (0, 0, 0),
    };
    Seen {
        dst: e.dst_addr().0,
        src: e.src_addr().0,
        sip: ip.src_addr().octets(),
        dip: ip.dst_addr().octets(),
        ttl: ip.hop_limit(),
        proto: u8::from(ip.next_header()),
        sport,
        dport,
        kind,
    }
}

/// A capture to write: (interface name, timestamp in microseconds, frame).
pub type Packets = Vec<(String, u64, Vec<u8>)>;

/// A pcapng with one IDB per distinct interface name (in order of first use, default
/// microsecond resolution) and one EPB per packet.
pub fn pcapng(packets: &Packets) -> Vec<u8> {
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
    use pcap_file::pcapng::blocks::interface_description::{
        InterfaceDescriptionBlock, InterfaceDescriptionOption,
    };
    use pcap_file::pcapng::blocks::section_header::SectionHeaderBlock;
    use pcap_file::pcapng::PcapNgWriter;
    use std::borrow::Cow;
    let section = SectionHeaderBlock {
        endianness: pcap_file::Endianness::Little,
        ..Default::default()
    };
    let mut w = PcapNgWriter::with_section_header(Vec::new(), section).unwrap();
    let mut names: Vec<&str> = Vec::new();
    for (n, _, _) in packets {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    for n in &names {
        w.write_pcapng_block(InterfaceDescriptionBlock {
            linktype: pcap_file::DataLink::ETHERNET,
            snaplen: 0,
            options: vec![InterfaceDescriptionOption::IfName(Cow::Borrowed(*n))],
        })
        .unwrap();
    }
    for (n, us, f) in packets {
        let id = names.iter().position(|x| x == n).unwrap() as u32;
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: id,
            // pcap-file writes the duration's nanoseconds as the raw tick count, and the
            // interface's resolution is microseconds: so the ticks are `us`.
            timestamp: std::time::Duration::from_nanos(*us),
            original_len: f.len() as u32,
            data: Cow::Borrowed(f),
            options: vec![],
        })
        .unwrap();
    }
    w.into_inner()
}

/// A classic (microsecond) pcap of frames: (timestamp in microseconds, frame).
pub fn pcap(packets: &[(u64, Vec<u8>)]) -> Vec<u8> {
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    let header = PcapHeader {
        datalink: pcap_file::DataLink::ETHERNET,
        endianness: pcap_file::Endianness::Little,
        ..Default::default()
    };
    let mut w = PcapWriter::with_header(Vec::new(), header).unwrap();
    for (us, f) in packets {
        w.write_packet(&PcapPacket::new(
            std::time::Duration::from_micros(*us),
            f.len() as u32,
            f,
        ))
        .unwrap();
    }
    w.into_writer()
}

/// A frame read back from an output pcapng: (interface name, raw timestamp ticks, bytes).
pub type OutFrame = (String, u64, Vec<u8>);

/// Read replay's output: the interface names in IDB order and every packet.
pub fn read_pcapng(bytes: &[u8]) -> (Vec<String>, Vec<OutFrame>) {
    use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
    use pcap_file::pcapng::{Block, PcapNgParser};
    let (mut rest, mut p) = PcapNgParser::new(bytes).unwrap();
    let mut names = Vec::new();
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let (r, b) = p.next_block(rest).unwrap();
        rest = r;
        match b {
            Block::InterfaceDescription(idb) => {
                let name = idb.options.iter().find_map(|o| match o {
                    InterfaceDescriptionOption::IfName(n) => Some(n.to_string()),
                    _ => None,
                });
                names.push(name.expect("every interface is named"));
            }
            Block::EnhancedPacket(e) => frames.push((
                names[e.interface_id as usize].clone(),
                e.timestamp.as_nanos() as u64,
                e.data.to_vec(),
            )),
            _ => {}
        }
    }
    (names, frames)
}
