use super::*;
use proptest::prelude::*;

fn ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from_bits(n)
}

fn udp(src: u32, sport: u16, dst: u32, dport: u16) -> Tuple {
    Tuple {
        src: ip(src),
        dst: ip(dst),
        sport,
        dport,
        proto: L4::Udp,
    }
}

/// A masqueraded UDP flow from 10.0.0.x:sport to 8.8.8.8:53 leaving as 192.0.2.10:ext.
fn snat(x: u32, sport: u16, ext: u16, state: State) -> NewConn {
    let orig = udp(0x0a00_0000 + x, sport, 0x0808_0808, 53);
    NewConn {
        orig,
        orig_zone: 1,
        reply: udp(0x0808_0808, 53, 0xc000_020a, ext),
        reply_zone: UPLINK_ZONE,
        network: NetworkId(1),
        state,
        kind: Kind::Snat,
    }
}

fn cfg(max: usize) -> ConntrackConfig {
    ConntrackConfig {
        max,
        ..Default::default()
    }
}

fn t(s: i64) -> Instant {
    Instant::from_secs(s)
}

#[test]
fn both_directions_find_the_same_connection() {
    let mut tb: Table = Table::new(cfg(16), 7);
    let n = snat(2, 5000, 40000, State::UdpUnreplied);
    let r = tb.insert(n, t(0)).unwrap().conn();
    assert_eq!(tb.lookup(1, &n.orig, t(1)), Some((r, Dir::Orig)));
    assert_eq!(
        tb.lookup(UPLINK_ZONE, &n.reply, t(1)),
        Some((r, Dir::Reply))
    );
    // Same tuple, other zone: not found.
    assert_eq!(tb.lookup(2, &n.orig, t(1)), None);
    let c = tb.get(r).unwrap();
    assert_eq!(c.target(Dir::Orig), n.reply.inverse());
    assert_eq!(c.target(Dir::Reply), n.orig.inverse());
    assert_eq!(tb.insert(n, t(1)), Err(InsertError::Clash));
}

#[test]
fn expiry_is_exact_and_lazy_and_gc_collects() {
    let mut tb: Table = Table::new(cfg(16), 7);
    let a = snat(2, 5000, 40000, State::UdpUnreplied);
    let b = snat(3, 5000, 40001, State::UdpUnreplied);
    let ra = tb.insert(a, t(0)).unwrap().conn();
    tb.insert(b, t(0)).unwrap();
    // A reply at 10 s: assured, 120 s from now.
    tb.on_packet(ra, Dir::Reply, None, t(10));
    assert_eq!(tb.get(ra).unwrap().state, State::UdpAssured);
    assert_eq!(tb.next_expiry(), Some(t(30)));
    // b expired at 30 s even though nobody collected it.
    assert_eq!(tb.lookup(1, &b.orig, t(30)), None);
    assert_eq!(tb.len(), 1);
    let (r, d) = tb.lookup(1, &a.orig, t(129)).unwrap();
    tb.on_packet(r, d, None, t(129));
    assert_eq!(tb.expire(t(200)), 0); // refreshed at 129 s: lives until 249 s
    assert_eq!(tb.expire(t(249)), 1);
    assert!(tb.is_empty());
    assert_eq!(tb.next_expiry(), None);
}

#[test]
fn refreshed_entries_are_requeued_not_dropped() {
    let mut tb: Table = Table::new(cfg(16), 7);
    let a = snat(2, 5000, 40000, State::UdpUnreplied);
    let r = tb.insert(a, t(0)).unwrap().conn();
    tb.on_packet(r, Dir::Orig, None, t(20));
    assert_eq!(tb.next_expiry(), Some(t(30)));
    assert_eq!(tb.expire(t(30)), 0);
    assert_eq!(tb.next_expiry(), Some(t(50)));
    assert_eq!(tb.expire(t(50)), 1);
}

#[test]
fn full_table_evicts_unassured_first_and_never_assured() {
    let mut tb: Table = Table::new(cfg(3), 7);
    let a = tb
        .insert(snat(1, 1, 40001, State::UdpUnreplied), t(0))
        .unwrap()
        .conn();
    tb.on_packet(a, Dir::Reply, None, t(0)); // assured
    let b = tb
        .insert(snat(2, 1, 40002, State::UdpUnreplied), t(1))
        .unwrap()
        .conn();
    let c = tb
        .insert(snat(3, 1, 40003, State::UdpUnreplied), t(2))
        .unwrap()
        .conn();
    // Full: the oldest unassured (b) makes room.
    let d = tb
        .insert(snat(4, 1, 40004, State::UdpUnreplied), t(3))
        .unwrap();
    assert!(matches!(d, Inserted::Evicting(_)));
    assert!(tb.get(b).is_none() && tb.get(a).is_some() && tb.get(c).is_some());
    assert_eq!(tb.stats.evicted, 1);
    // Make everything assured: the next insert fails.
    tb.on_packet(c, Dir::Reply, None, t(4));
    tb.on_packet(d.conn(), Dir::Reply, None, t(4));
    assert_eq!(
        tb.insert(snat(5, 1, 40005, State::UdpUnreplied), t(5)),
        Err(InsertError::Full)
    );
    assert_eq!(tb.len(), 3);
    // Once one expires, room again.
    assert!(tb
        .insert(snat(5, 1, 40005, State::UdpUnreplied), t(125))
        .is_ok());
}

#[test]
fn tcp_states_pick_timeouts() {
    let mut c = cfg(16);
    c.tcp_syn_sent = Duration::from_secs(5);
    c.tcp_established = Duration::from_secs(100);
    let mut tb: Table = Table::new(c, 1);
    let mut n = snat(2, 5000, 40000, State::SynSent);
    n.orig.proto = L4::Tcp;
    n.reply.proto = L4::Tcp;
    let r = tb.insert(n, t(0)).unwrap().conn();
    let fl = |b| Some(TcpFlags::from_byte(b));
    tb.on_packet(r, Dir::Reply, fl(0x12), t(1));
    tb.on_packet(r, Dir::Orig, fl(0x10), t(2));
    let c = tb.get(r).unwrap();
    assert_eq!(c.state, State::Established);
    assert!(c.is_assured());
    assert!(tb.lookup(1, &n.orig, t(101)).is_some());
    assert!(tb.lookup(1, &n.orig, t(202)).is_none());
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u8, u16),
    Touch(u8),
    Reply(u8),
    Remove(u8),
    Expire,
    Tick(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), any::<u16>()).prop_map(|(a, p)| Op::Insert(a, p)),
        2 => any::<u8>().prop_map(Op::Touch),
        2 => any::<u8>().prop_map(Op::Reply),
        1 => any::<u8>().prop_map(Op::Remove),
        1 => Just(Op::Expire),
        2 => any::<u8>().prop_map(Op::Tick),
    ]
}

proptest! {
    /// Random operations: the limit holds, every live connection is found by both tuples, an
    /// external tuple never belongs to two live connections, assured ones are never evicted.
    #[test]
    fn table_invariants(ops in proptest::collection::vec(op(), 1..300), max in 1usize..40) {
        let mut tb: Table = Table::new(cfg(max), 99);
        let mut now = 0i64;
        let mut refs: Vec<ConnRef> = Vec::new();
        for o in ops {
            let at = Instant::from_secs(now);
            match o {
                Op::Insert(a, p) => {
                    let n = snat(u32::from(a % 32), p % 8, 40000 + p % 16, State::UdpUnreplied);
                    let assured_before: Vec<_> = refs.iter().copied()
                        .filter(|r| tb.get_live(*r, at).is_some_and(|c| c.is_assured())).collect();
                    if let Ok(i) = tb.insert(n, at) { refs.push(i.conn()); }
                    for r in assured_before { prop_assert!(tb.get(r).is_some()); }
                }
                Op::Touch(i) | Op::Reply(i) if !refs.is_empty() => {
                    let r = refs[i as usize % refs.len()];
                    if tb.get_live(r, at).is_some() {
                        let d = if matches!(o, Op::Reply(_)) { Dir::Reply } else { Dir::Orig };
                        tb.on_packet(r, d, None, at);
                    }
                }
                Op::Remove(i) if !refs.is_empty() => { tb.remove(refs[i as usize % refs.len()]); }
                Op::Expire => { tb.expire(at); }
                Op::Tick(s) => now += i64::from(s % 40),
                _ => {}
            }
            prop_assert!(tb.len() <= max);
            let at = Instant::from_secs(now);
            let mut ext = std::collections::HashSet::new();
            let live: Vec<_> = tb.iter_live(at).map(|(c, _)| c.clone()).collect();
            for c in &live {
                prop_assert!(ext.insert((c.zone[1], c.tuple[1])));
                for d in [Dir::Orig, Dir::Reply] {
                    let (idx, dd) = tb.find(c.zone[d.idx()], &c.tuple[d.idx()]).unwrap();
                    prop_assert_eq!(dd, d);
                    prop_assert_eq!(tb.conns[idx as usize].gen, c.gen);
                }
            }
        }
    }
}

#[test]
fn an_ipv4_connection_is_one_cache_line() {
    assert_eq!(std::mem::size_of::<Conn<Ipv4Addr>>(), 64);
    assert_eq!(std::mem::align_of::<Conn<Ipv4Addr>>(), 64);
}

proptest! {
    /// The batch path's prefetch stages: the first hashes like the lookup; the second, for any
    /// hash at all, never panics and, for a tracked tuple, points at its connection (or at one
    /// whose tuple shares the 32-bit tag), also after the index grew and entries were removed.
    #[test]
    fn prefetch_stages_agree_with_lookup(n in 1u32..700, gone in 0u32..50, seed in any::<u64>(),
                                         junk in proptest::collection::vec(any::<u64>(), 0..64)) {
        let mut tb: Table = Table::new(cfg(1024), seed);
        let flows: Vec<NewConn> = (0..n)
            .map(|i| snat(i % 250, 1024 + (i / 250) as u16, 20_000 + i as u16, State::UdpAssured))
            .collect();
        let refs: Vec<ConnRef> = flows.iter().map(|f| tb.insert(*f, t(0)).unwrap().conn()).collect();
        for r in refs.iter().take(gone as usize) {
            tb.remove(*r);
        }
        for h in junk {
            let _ = tb.prefetch_conn(h);
        }
        let (mut found, mut hinted) = (0, 0);
        for f in &flows {
            for (zone, key) in [(f.orig_zone, f.orig), (f.reply_zone, f.reply)] {
                let h = tb.prefetch_slot(zone, &key);
                prop_assert_eq!(h, tb.hash(zone, &key));
                let Some((idx, dir)) = tb.find(zone, &key) else { continue };
                found += 1;
                if let Some(hint) = tb.prefetch_conn(h) {
                    hinted += 1;
                    let c = &tb.conns[hint as usize];
                    let same_tag = (0..2).any(|d| (tb.hash(c.zone[d], &c.tuple[d]) ^ h) >> 32 == 0);
                    prop_assert!(hint == idx || same_tag, "{} vs {} {:?}", hint, idx, dir);
                }
            }
        }
        // At most half full: nearly every tuple sits within the first probes.
        prop_assert!(hinted * 10 >= found * 9, "{} of {} hinted", hinted, found);
    }
}

proptest! {
    /// The batch path's lookup with the hash from the first prefetch stage finds exactly what
    /// the plain lookup finds, for tracked, removed and never-seen tuples, with the hashes
    /// taken before the index grew (several times) and entries were removed or expired.
    #[test]
    fn hashed_lookup_agrees_with_plain_lookup(n in 1u32..700, gone in 0u32..50,
                                              seed in any::<u64>(), now in 0i64..200) {
        let mut tb: Table = Table::new(cfg(1024), seed);
        let slots_before = tb.slots.len();
        let flows: Vec<NewConn> = (0..n)
            .map(|i| snat(i % 250, 1024 + (i / 250) as u16, 20_000 + i as u16,
                          if i % 3 == 0 { State::UdpUnreplied } else { State::UdpAssured }))
            .collect();
        let mut keys: Vec<(Zone, Tuple)> =
            flows.iter().flat_map(|f| [(f.orig_zone, f.orig), (f.reply_zone, f.reply)]).collect();
        keys.push((1, udp(0x0a00_00ff, 9, 0x0808_0808, 53)));
        keys.push((UPLINK_ZONE, udp(0x0808_0808, 53, 0xc000_020a, 1)));
        // Hashed while the table is still empty, i.e. at its smallest index.
        let hashes: Vec<u64> = keys.iter().map(|(z, k)| tb.prefetch_slot(*z, k)).collect();
        let refs: Vec<ConnRef> = flows.iter().map(|f| tb.insert(*f, t(0)).unwrap().conn()).collect();
        for r in refs.iter().take(gone as usize) {
            tb.remove(*r);
        }
        prop_assert!(n <= 256 || tb.slots.len() > slots_before, "the index never grew");
        for at in [0, now] {
            let now_us = t(at).total_micros();
            let mut found = 0;
            for ((zone, key), h) in keys.iter().zip(&hashes) {
                let plain = tb.lookup_live(*zone, key, now_us);
                prop_assert_eq!(tb.lookup_live_hashed(*zone, key, *h, now_us), plain);
                found += u32::from(plain.is_some());
            }
            // Not vacuous: at first every flow not removed is found, both ways.
            prop_assert!(at != 0 || found == 2 * (n - gone.min(n)), "{} found", found);
        }
    }
}
