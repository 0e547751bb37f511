//! What the fuzz targets share: the operation encoding, the topology they run, the invariant
//! checks, and the frame builders (control/tests/frames, included by path) that the seed corpus
//! is made from.
//!
//! An input of the `switch` and `nat` targets is a sequence of [`Op`]s, each
//! `[port: u8][flags: u8][dt_ms: u16 LE][len: u16 LE][len bytes of frame]`, read with
//! `arbitrary` until the input ends. The encoding is plain so that [`encode_ops`] can write
//! seeds from real frames and libFuzzer's mutations stay meaningful.

#![forbid(unsafe_code)]

use arbitrary::{Arbitrary, Unstructured};
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, TcpPacket,
    UdpPacket,
};

pub mod batch;
#[path = "../../control/tests/frames/mod.rs"]
pub mod frames;

/// At most this many operations are taken from one input.
pub const MAX_OPS: usize = 512;

/// A frame of up to 65535 bytes, length-prefixed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(pub Vec<u8>);

impl<'a> Arbitrary<'a> for Frame {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = usize::from(u16::arbitrary(u)?);
        let n = len.min(u.len());
        Ok(Frame(u.bytes(n)?.to_vec()))
    }
}

/// One step, `dt_ms` after the one before: a frame arrives on port `port % ports`, or (nat
/// target, by the top bits of `port`) a packet comes from the host uplink ([`HOST_OP`]) or
/// the uplink mode changes ([`MODE_OP`]).
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub port: u8,
    /// Bit 0: the frame's L4 checksum is marked partial (offload metadata).
    /// Bit 1: run housekeeping (expiry) before the frame.
    /// Bit 2 (nat target): the frame comes as a TCPv4 GSO super-frame ([`gso_hdr`]).
    pub flags: u8,
    pub dt_ms: u16,
    pub frame: Frame,
}

/// Every whole operation in `data`.
pub fn decode_ops(data: &[u8]) -> Vec<Op> {
    let mut u = Unstructured::new(data);
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < MAX_OPS {
        match Op::arbitrary(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    ops
}

/// The bytes [`decode_ops`] reads back as these operations.
pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut v = Vec::new();
    for op in ops {
        v.push(op.port);
        v.push(op.flags);
        v.extend_from_slice(&op.dt_ms.to_le_bytes());
        v.extend_from_slice(&(op.frame.0.len() as u16).to_le_bytes());
        v.extend_from_slice(&op.frame.0);
    }
    v
}

/// The virtio-net header of an op whose flags ask for GSO (bit 2): TCPv4, the checksum
/// partial at the TCP one when bit 0 is set too, a segment size picked by bits 3-7.
pub fn gso_hdr(flags: u8) -> Option<switchyard_switch::gso::VnetHdr> {
    use switchyard_switch::gso::{VnetHdr, GSO_TCPV4, VNET_F_NEEDS_CSUM};
    (flags & 4 != 0).then(|| VnetHdr {
        flags: if flags & 1 != 0 { VNET_F_NEEDS_CSUM } else { 0 },
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 88 + 44 * u16::from(flags >> 3),
        csum_start: 34,
        csum_offset: 16,
    })
}

/// nat target: `port & 0xc0 == HOST_OP`: the frame is a bare IPv4 packet from the host
/// (socket) uplink, for `Pipeline::from_host`; as a TCP super-packet with [`host_gso_size`]
/// when flag bit 2 is set.
pub const HOST_OP: u8 = 0x80;

/// nat target: `port & 0xc0 == MODE_OP` changes the uplink mode (the frame is ignored):
/// flag bit 0 turns the host uplink on, bit 1 takes the raw uplink away. Host mode is bit 0
/// without the raw uplink (it overrides); both off leaves no way out. Inputs start raw.
pub const MODE_OP: u8 = 0xc0;

/// The segment size of a [`HOST_OP`] with flag bit 2: bits 3-7 times 300 (0 to 9300, so
/// zero, sizes that fit each network's MTU and sizes that do not).
pub fn host_gso_size(flags: u8) -> Option<u16> {
    (flags & 4 != 0).then(|| 300 * u16::from(flags >> 3))
}

/// The conntrack limit of [`TOPOLOGY`]: small, so the fuzzer can fill it.
pub const CONNTRACK_MAX: usize = 16;

/// Two networks (one with a large MTU, one internal), three endpoints with published ports,
/// and an uplink. Port order for ops: c1, c2, d1, i1, uplink.
pub const TOPOLOGY: &str = r#"
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
[[network]]
name = "big"
subnet = "10.88.0.0/24"
gateway = "10.88.0.1"
gateway_mac = "02:00:00:00:88:01"
mtu = 9000
[[network]]
name = "closed"
subnet = "10.99.0.0/24"
gateway = "10.99.0.1"
gateway_mac = "02:00:00:00:99:01"
internal = true
[[endpoint]]
network = "mynet"
name = "c1"
mac = "02:00:00:00:77:02"
ip = "10.77.0.2"
publish = ["8080:80", "5353:53/udp", "9000-9003:9000-9003"]
[[endpoint]]
network = "mynet"
name = "c2"
mac = "02:00:00:00:77:03"
ip = "10.77.0.3"
[[endpoint]]
network = "big"
name = "d1"
mac = "02:00:00:00:88:02"
ip = "10.88.0.2"
publish = ["8081:81"]
[[endpoint]]
network = "closed"
name = "i1"
mac = "02:00:00:00:99:02"
ip = "10.99.0.2"
[conntrack]
max = 16
"#;

/// Why an emitted frame is wrong, if it is: an IPv4 frame must carry a valid header checksum
/// and, when unfragmented, a valid TCP/UDP/ICMP checksum (a UDP checksum of zero is allowed).
pub fn checksum_error(frame: &[u8]) -> Option<&'static str> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    ip_checksum_error(eth.payload(), true)
}

/// [`checksum_error`] for a bare IPv4 packet; the L4 checksum only with `l4`.
pub fn ip_checksum_error(pkt: &[u8], l4: bool) -> Option<&'static str> {
    let Ok(ip) = Ipv4Packet::new_checked(pkt) else {
        return Some("truncated IPv4 header");
    };
    if !ip.verify_checksum() {
        return Some("IPv4 header checksum");
    }
    if !l4 || ip.more_frags() || ip.frag_offset() != 0 {
        return None;
    }
    let (s, d) = (
        IpAddress::Ipv4(ip.src_addr()),
        IpAddress::Ipv4(ip.dst_addr()),
    );
    match ip.next_header() {
        IpProtocol::Tcp => match TcpPacket::new_checked(ip.payload()) {
            Ok(t) if t.verify_checksum(&s, &d) => None,
            Ok(_) => Some("TCP checksum"),
            Err(_) => Some("truncated TCP header"),
        },
        IpProtocol::Udp => match UdpPacket::new_checked(ip.payload()) {
            Ok(u) if u.checksum() == 0 || u.verify_checksum(&s, &d) => None,
            Ok(_) => Some("UDP checksum"),
            Err(_) => Some("truncated UDP header"),
        },
        IpProtocol::Icmp => match Icmpv4Packet::new_checked(ip.payload()) {
            Ok(i) if i.verify_checksum() => None,
            Ok(_) => Some("ICMP checksum"),
            Err(_) => Some("truncated ICMP header"),
        },
        _ => None,
    }
}
