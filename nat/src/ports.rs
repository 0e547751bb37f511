//! External port (and ICMP echo id) allocation for masquerade and hairpin.
//!
//! There is no separate port bitmap: a port is in use exactly when a live connection owns the
//! external tuple (proto, our address, port, remote address, remote port), which the conntrack
//! index answers in one probe, so the same port serves many remote peers (like Linux) and is
//! free again the moment its flow expires. The probe order follows Linux's
//! `nf_nat_l4proto_unique_tuple`: the original port if free, then up to 128 consecutive ports from
//! a pseudo-random offset, then 64, 32, 16 from new offsets, so a crowded range costs a bounded
//! number of lookups.

use switchyard_switch::Instant;

use crate::conntrack::{Table, Tuple, Zone};

/// xorshift64*: deterministic (seeded from the config) so replays are reproducible.
pub fn next_rand(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = if x == 0 { 0x9E37_79B9_7F4A_7C15 } else { x };
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// A free value for `template.dport` (the reply tuple's destination port, i.e. our side) in
/// `zone`, preferring `preserve`, else from `range` (inclusive).
pub fn allocate(
    table: &mut Table,
    zone: Zone,
    template: Tuple,
    preserve: u16,
    range: (u16, u16),
    rng: &mut u64,
    now: Instant,
) -> Option<u16> {
    let mut t = template;
    t.dport = preserve;
    if !table.in_use(zone, &t, now) {
        return Some(preserve);
    }
    let (lo, hi) = (range.0.min(range.1), range.0.max(range.1));
    let size = u32::from(hi - lo) + 1;
    let mut attempts = size.min(128);
    let mut off = next_rand(rng) as u32;
    loop {
        for _ in 0..attempts {
            t.dport = lo + (off % size) as u16;
            if !table.in_use(zone, &t, now) {
                return Some(t.dport);
            }
            off = off.wrapping_add(1);
        }
        if attempts >= size || attempts < 16 {
            return None;
        }
        attempts /= 2;
        off = next_rand(rng) as u32;
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use switchyard_switch::NetworkId;

    use super::*;
    use crate::conntrack::{ConntrackConfig, Kind, NewConn, State, L4, UPLINK_ZONE};

    #[test]
    fn preserves_then_allocates_then_runs_out() {
        let mut tb: Table = Table::new(ConntrackConfig::default(), 1);
        let mut rng = 7;
        let now = Instant::from_secs(0);
        let remote = Ipv4Addr::new(8, 8, 8, 8);
        let up = Ipv4Addr::new(192, 0, 2, 10);
        let tpl = Tuple {
            src: remote,
            dst: up,
            sport: 53,
            dport: 0,
            proto: L4::Udp,
        };
        let mut got = Vec::new();
        for i in 0..6u8 {
            let Some(p) = allocate(
                &mut tb,
                UPLINK_ZONE,
                tpl,
                5000,
                (40000, 40003),
                &mut rng,
                now,
            ) else {
                break;
            };
            got.push(p);
            let orig = Tuple {
                src: Ipv4Addr::new(10, 0, 0, i + 2),
                dst: remote,
                sport: 5000,
                dport: 53,
                proto: L4::Udp,
            };
            let n = NewConn {
                orig,
                orig_zone: 1,
                reply: Tuple { dport: p, ..tpl },
                reply_zone: UPLINK_ZONE,
                network: NetworkId(1),
                state: State::UdpUnreplied,
                kind: Kind::Snat,
            };
            tb.insert(n, now).unwrap();
        }
        assert_eq!(got[0], 5000);
        let mut rest = got[1..].to_vec();
        rest.sort();
        assert_eq!(rest, vec![40000, 40001, 40002, 40003]);
        // Another remote peer may reuse the same ports.
        let other = Tuple {
            src: Ipv4Addr::new(1, 1, 1, 1),
            ..tpl
        };
        assert_eq!(
            allocate(
                &mut tb,
                UPLINK_ZONE,
                other,
                5000,
                (40000, 40003),
                &mut rng,
                now
            ),
            Some(5000)
        );
        // After expiry (30 s unreplied) the ports are free again.
        let later = Instant::from_secs(31);
        assert_eq!(
            allocate(
                &mut tb,
                UPLINK_ZONE,
                tpl,
                5000,
                (40000, 40003),
                &mut rng,
                later
            ),
            Some(5000)
        );
    }
}
