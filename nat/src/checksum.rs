//! Internet checksums: full sums through `smoltcp::wire::checksum` (RFC 1071) and incremental
//! updates (RFC 1624) for the rewrites NAT does, so a translated packet costs a few adds instead
//! of a pass over its payload.

use std::net::Ipv4Addr;

use smoltcp::wire::{checksum, IpProtocol};

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for one 16-bit word `m` changed to `m'`.
/// UDP needs the zero special case on top: see [`update_udp16`].
#[inline(always)]
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    !fold(sum)
}

/// As [`update16`] for a 32-bit field (an IPv4 address): two words at once.
#[inline(always)]
pub fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!csum)
        + u32::from(!(old >> 16) as u16)
        + u32::from(!old as u16)
        + (new >> 16)
        + (new & 0xffff);
    !fold(sum)
}

/// UDP flavour: a zero checksum means "none" and stays zero; a computed zero is sent as 0xffff.
#[inline(always)]
pub fn update_udp16(csum: u16, old: u16, new: u16) -> u16 {
    if csum == 0 {
        return 0;
    }
    nonzero(update16(csum, old, new))
}

/// UDP flavour of [`update32`].
#[inline(always)]
pub fn update_udp32(csum: u16, old: u32, new: u32) -> u16 {
    if csum == 0 {
        return 0;
    }
    nonzero(update32(csum, old, new))
}

#[inline(always)]
fn nonzero(c: u16) -> u16 {
    if c == 0 {
        0xffff
    } else {
        c
    }
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Full checksum of `data` (complemented, ready to store), e.g. an ICMP message.
pub fn full(data: &[u8]) -> u16 {
    !checksum::data(data)
}

/// Full TCP/UDP checksum of `segment` (with its checksum field zeroed) under the IPv4
/// pseudo-header. UDP callers map 0 to 0xffff.
pub fn full_l4(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, segment: &[u8]) -> u16 {
    !checksum::combine(&[
        checksum::pseudo_header_v4(&src, &dst, proto, segment.len() as u32),
        checksum::data(segment),
    ])
}

/// True when `data` (checksum field included) sums to 0xffff.
pub fn verifies(data: &[u8]) -> bool {
    checksum::data(data) == 0xffff
}

/// True when a TCP/UDP segment verifies under the IPv4 pseudo-header.
pub fn verifies_l4(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, segment: &[u8]) -> bool {
    checksum::combine(&[
        checksum::pseudo_header_v4(&src, &dst, proto, segment.len() as u32),
        checksum::data(segment),
    ]) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn store(buf: &mut [u8], at: usize, v: u16) {
        buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    fn load(buf: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([buf[at], buf[at + 1]])
    }

    proptest! {
        #[test]
        fn incremental_matches_full(mut data in proptest::collection::vec(any::<u8>(), 8..64),
                                    word in 1usize..3, new16 in any::<u16>(), new32 in any::<u32>()) {
            let n = data.len() & !1;
            data.truncate(n);
            store(&mut data, 0, 0);
            let c = full(&data);
            store(&mut data, 0, c);
            prop_assert!(verifies(&data));

            let at = word * 2;
            let old = load(&data, at);
            store(&mut data, at, new16);
            let c = update16(load(&data, 0), old, new16);
            store(&mut data, 0, c);
            prop_assert!(verifies(&data));

            if data.len() >= 8 {
                let old = u32::from_be_bytes(data[4..8].try_into().unwrap());
                data[4..8].copy_from_slice(&new32.to_be_bytes());
                let c = update32(load(&data, 0), old, new32);
                store(&mut data, 0, c);
                prop_assert!(verifies(&data));
            }
        }
    }

    #[test]
    fn udp_zero_stays_zero() {
        assert_eq!(update_udp16(0, 1234, 4321), 0);
        assert_eq!(update_udp32(0, 1, 2), 0);
        assert_ne!(update_udp16(0xfffe, 0, 1), 0);
    }
}
