//! virtio-net headers and software segmentation.
//!
//! A veth peer with TSO, or GRO on a NIC, hands an AF_PACKET reader TCP frames of up to 64 KB
//! that carry a `virtio_net_hdr` (PACKET_VNET_HDR) saying how to cut them. Where the egress
//! cannot take such a frame (a plain tap, an AF_PACKET socket without vnet headers) or the NAT
//! will not take it whole (a new flow, local traffic), it is cut here into MSS-sized frames
//! with their IPv4 and TCP headers fixed and both checksums computed in full. Pure: fuzzed and
//! unit-tested in memory.

use smoltcp::wire::{IpAddress, Ipv4Packet, TcpPacket};

/// Size of the legacy `struct virtio_net_hdr`.
pub const VNET_HDR_LEN: usize = 10;
pub const VNET_F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// `struct virtio_net_hdr` (legacy layout, native endianness, as AF_PACKET and tun use it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn emit(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & VNET_F_NEEDS_CSUM != 0
    }

    /// The GSO kind without the ECN bit.
    pub fn gso(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }
}

/// Why a frame could not be segmented (it is then dropped and counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoError {
    /// Not Ethernet + IPv4 + TCP, or headers cut short.
    Malformed,
    /// A GSO kind we do not cut in software (UDP, IPv6).
    Unsupported,
    /// `gso_size` of zero, or segments that would not fit `max_frame`.
    BadSize,
}

/// Cut an Ethernet/IPv4/TCP frame into segments of at most `mss` payload bytes and hand each,
/// headers and checksums complete, to `out` (through `scratch`, reused). Frames no larger than
/// one segment come out once, with checksums completed.
pub fn segment_tcp4(
    frame: &[u8],
    mss: usize,
    scratch: &mut Vec<u8>,
    out: &mut dyn FnMut(&[u8]),
) -> Result<usize, GsoError> {
    if mss == 0 {
        return Err(GsoError::BadSize);
    }
    let l3 = match frame.get(12..14) {
        Some([0x08, 0x00]) => 14,
        Some([0x81, 0x00]) if frame.get(16..18) == Some(&[0x08, 0x00]) => 18,
        Some(_) => return Err(GsoError::Unsupported),
        None => return Err(GsoError::Malformed),
    };
    let ip = Ipv4Packet::new_checked(frame.get(l3..).ok_or(GsoError::Malformed)?)
        .map_err(|_| GsoError::Malformed)?;
    if ip.next_header() != smoltcp::wire::IpProtocol::Tcp
        || ip.more_frags()
        || ip.frag_offset() != 0
    {
        return Err(GsoError::Unsupported);
    }
    let ihl = ip.header_len() as usize;
    let l4 = l3 + ihl;
    // GSO frames may carry a total length that is not the frame's (0, or capped): trust the frame.
    let tcp_bytes = frame.get(l4..).ok_or(GsoError::Malformed)?;
    let tcp = TcpPacket::new_checked(tcp_bytes).map_err(|_| GsoError::Malformed)?;
    let thl = tcp.header_len() as usize;
    let hdrs = l4 + thl;
    let payload = frame.get(hdrs..).ok_or(GsoError::Malformed)?;
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let (id0, seq0) = (ip.ident(), tcp.seq_number());
    let (fin, psh, cwr) = (tcp.fin(), tcp.psh(), tcp.cwr());
    let chunks = payload.len().div_ceil(mss).max(1);
    if hdrs - l3 + mss.min(payload.len().max(1)) > 65_535 {
        return Err(GsoError::BadSize);
    }
    for i in 0..chunks {
        let body = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or(&[]);
        let last = i + 1 == chunks;
        scratch.clear();
        scratch.extend_from_slice(&frame[..hdrs]);
        scratch.extend_from_slice(body);
        {
            let mut ipm = Ipv4Packet::new_unchecked(&mut scratch[l3..]);
            ipm.set_total_len((ihl + thl + body.len()) as u16);
            ipm.set_ident(id0.wrapping_add(i as u16));
            ipm.fill_checksum();
        }
        {
            let mut t = TcpPacket::new_unchecked(&mut scratch[l4..]);
            t.set_seq_number(seq0 + i * mss);
            t.set_fin(fin && last);
            t.set_psh(psh && last);
            t.set_cwr(cwr && i == 0);
            t.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
        }
        out(scratch);
    }
    Ok(chunks)
}

/// Complete a partial L4 checksum in place (`NEEDS_CSUM` without GSO): the field at
/// `csum_start + csum_offset` holds the pseudo-header sum; fold in the data from `csum_start`.
pub fn complete_checksum(frame: &mut [u8], csum_start: usize, csum_offset: usize) -> bool {
    let at = csum_start + csum_offset;
    if at + 2 > frame.len() || csum_start > frame.len() {
        return false;
    }
    // The stored pseudo-header sum is folded in by summing the region with it in place.
    let sum = !ones_sum(&frame[csum_start..]);
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// The folded pseudo-header sum (not inverted) a CHECKSUM_PARTIAL IPv4 TCP/UDP header carries
/// in its checksum field: addresses, protocol and the L4 length of the whole (super-)frame, as
/// Linux writes it (`~tcp_v4_check(len, ..)`) and its software GSO expects.
pub fn pseudo_sum4(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: usize) -> u16 {
    let w = |b: [u8; 4]| {
        u32::from(u16::from_be_bytes([b[0], b[1]])) + u32::from(u16::from_be_bytes([b[2], b[3]]))
    };
    let mut s =
        w(src) + w(dst) + u32::from(proto) + (l4_len as u32 >> 16) + (l4_len as u32 & 0xffff);
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Finish an offloaded frame in software for an egress that takes no virtio-net header: a
/// TCPv4 GSO frame is cut into segments, a partial checksum completed (through `scratch`);
/// a frame that asks nothing passes as is. Each wire frame goes to `out`; the count is returned.
pub fn finish(
    frame: &[u8],
    hdr: Option<&VnetHdr>,
    scratch: &mut Vec<u8>,
    out: &mut dyn FnMut(&[u8]),
) -> Result<usize, GsoError> {
    match hdr {
        Some(h) if h.gso() == GSO_TCPV4 => {
            segment_tcp4(frame, usize::from(h.gso_size), scratch, out)
        }
        Some(h) if h.gso() != GSO_NONE => Err(GsoError::Unsupported),
        Some(h) if h.needs_csum() => {
            scratch.clear();
            scratch.extend_from_slice(frame);
            if !complete_checksum(
                scratch,
                usize::from(h.csum_start),
                usize::from(h.csum_offset),
            ) {
                return Err(GsoError::Malformed);
            }
            out(scratch);
            Ok(1)
        }
        _ => {
            out(frame);
            Ok(1)
        }
    }
}

/// What an offloaded frame amounts to on the wire once cut: (packets, bytes). For counters.
pub fn wire_size(frame_len: usize, hdr: Option<&VnetHdr>) -> (u64, u64) {
    match hdr {
        Some(h) if h.gso() != GSO_NONE && h.gso_size > 0 => {
            let hl = usize::from(h.hdr_len).min(frame_len);
            let segs = (frame_len - hl).div_ceil(usize::from(h.gso_size)).max(1);
            (segs as u64, (frame_len + (segs - 1) * hl) as u64)
        }
        _ => (1, frame_len as u64),
    }
}

/// The folded one's-complement sum of `data` (RFC 1071), not inverted.
pub fn ones_sum(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u64::from(*b) << 8;
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Ipv4Address, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber};

    fn big_frame(payload: &[u8], fin: bool) -> Vec<u8> {
        let src = Ipv4Address::new(192, 0, 2, 1);
        let dst = Ipv4Address::new(192, 0, 2, 10);
        let tcp = TcpRepr {
            src_port: 8000,
            dst_port: 40000,
            control: if fin {
                TcpControl::Fin
            } else {
                TcpControl::Psh
            },
            seq_number: TcpSeqNumber(1000),
            ack_number: Some(TcpSeqNumber(5)),
            window_len: 500,
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
            next_header: smoltcp::wire::IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut f = vec![0u8; 14 + ip.buffer_len() + tcp.buffer_len()];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut f[14..]), &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(&mut f[34..]),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            &caps,
        );
        f
    }

    #[test]
    fn cuts_into_valid_segments_that_add_up() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let f = big_frame(&payload, true);
        let mut segs: Vec<Vec<u8>> = Vec::new();
        let n = segment_tcp4(&f, 1448, &mut Vec::new(), &mut |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(n, 7);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let ip = Ipv4Packet::new_checked(&s[14..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(ip.total_len() as usize, s.len() - 14);
            let t = TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(t.verify_checksum(
                &IpAddress::Ipv4(ip.src_addr()),
                &IpAddress::Ipv4(ip.dst_addr())
            ));
            assert_eq!(t.seq_number(), TcpSeqNumber(1000 + (i * 1448) as i32));
            assert_eq!(t.fin(), i == 6, "FIN only on the last");
            assert!(t.payload().len() <= 1448);
            joined.extend_from_slice(t.payload());
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn rejects_what_it_cannot_cut() {
        let f = big_frame(&[1; 100], false);
        assert_eq!(
            segment_tcp4(&f, 0, &mut Vec::new(), &mut |_| {}),
            Err(GsoError::BadSize)
        );
        assert_eq!(
            segment_tcp4(&f[..20], 50, &mut Vec::new(), &mut |_| {}),
            Err(GsoError::Malformed)
        );
        let mut udp = f.clone();
        udp[14 + 9] = 17;
        assert_eq!(
            segment_tcp4(&udp, 50, &mut Vec::new(), &mut |_| {}),
            Err(GsoError::Unsupported)
        );
        let mut v6 = f.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(
            segment_tcp4(&v6, 50, &mut Vec::new(), &mut |_| {}),
            Err(GsoError::Unsupported)
        );
        for cut in 0..f.len() {
            let _ = segment_tcp4(&f[..cut], 7, &mut Vec::new(), &mut |_| {});
        }
    }

    #[test]
    fn vnet_header_round_trip_and_partial_checksum() {
        let h = VnetHdr {
            flags: 1,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::parse(&h.emit()), Some(h));
        assert_eq!(h.gso(), GSO_TCPV4);
        assert!(VnetHdr::parse(&[0; 9]).is_none());
        // A frame whose TCP checksum holds only the pseudo-header sum gets the full sum.
        let mut f = big_frame(b"hello world", false);
        let good = f.clone();
        let len = (f.len() - 34) as u16;
        let mut ph = vec![192, 0, 2, 1, 192, 0, 2, 10, 0, 6];
        ph.extend_from_slice(&len.to_be_bytes());
        f[50..52].copy_from_slice(&ones_sum(&ph).to_be_bytes());
        assert!(complete_checksum(&mut f, 34, 16));
        assert_eq!(f, good);
        assert!(!complete_checksum(&mut f, 100, 16));
    }
}
