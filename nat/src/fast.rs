//! The established-flow fast path: a TCP or UDP packet of a live connection, with nothing
//! unusual about it, parsed by reading the few header fields it needs straight from the bytes
//! and rewritten in place with RFC 1624 incremental checksum updates.
//!
//! Why hand-written: the full path ([`Router::handle_from_network`] through `Router::forward`)
//! builds smoltcp views (each accessor re-checks lengths), sums the L4 checksum through
//! `pseudo_header_v4` + `checksum::data` + `combine`, builds an `Rx`, an `L4Info` and a route
//! `Hop`, runs several subnet/fragment/host-mode branches and applies six or seven separately
//! folded RFC 1624 updates. Here: one fixed-size header array (no bounds checks), a 64-bit
//! checksum sum with a branch-free fold, and one fold per checksum for all its changes
//! ([`combined`], proven and tested bit-identical to the chain). Measured with callgrind
//! (deterministic instruction counts) on the 100k-flow benchmark, uplink->container 64-byte
//! UDP: 1,165 instructions per packet before, 931 with the first fast path, 789 after (the rest:
//! the conntrack probe ~100, `Emits::push_copy` + memcpy ~80, `on_packet` ~50, the endpoint
//! map ~40; the batch path's later cuts are in the README). Wall clock is dominated by the
//! two conntrack cache misses, hence the batch API.
//!
//! Contract: a fast-path function either returns `None` *without any side effect* (no table,
//! counter or output change), and the caller runs the full path, or it does exactly what the
//! full path would have done for that packet: same verdict, same bytes emitted (checksums
//! equal bit for bit, even the 0x0000/0xffff representation), same
//! conntrack update, same counters. Anything unusual bails out: IP options, fragments,
//! offloaded partial checksums, ICMP, a miss or an expired entry in conntrack, TTL <= 1, an
//! unresolved next hop or unknown endpoint, a packet over the egress MTU, local or
//! inter-network destinations, host mode. (A packet to the uplink address from a network is
//! a hairpin flow's when conntrack has it, as on the full path.)
//!
//! TCP GSO super-frames (up to 64 KB with a virtio-net header, from a TSO sender or GRO) take
//! this same path whole ([`Router::handle_gso_from_network`]): the MTU checks apply to their
//! largest segment, the TCP checksum is left partial (the pseudo-header sum of the new
//! addresses and the whole TCP length, Linux's CHECKSUM_PARTIAL convention) for the egress or
//! `segment_tcp4` to finish, and the counters count the segments. What the fast path refuses
//! the caller cuts, and each segment takes the ordinary path.

use std::net::Ipv4Addr;

use switchyard_switch::{Instant, MacAddr, NetworkId};

use switchyard_switch::gso::{pseudo_sum4, VnetHdr, GSO_TCPV4, VNET_F_NEEDS_CSUM};

use crate::config::{in_subnet, RxMeta, Verdict};
use crate::conntrack::tcp::TcpFlags;
use crate::conntrack::{ConnRef, Dir, Kind, Tuple, Zone, L4, UPLINK_ZONE};
use crate::emit::{Egress, Emits};
use crate::packet::ETH_LEN;
use crate::prefetch::prefetch;
use crate::router::Router;

const IP_HDR: usize = 20;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

#[inline(always)]
fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn wr16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline(always)]
fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Ones'-complement sum of `data` read as little-endian 16-bit words (an odd last byte as the
/// low byte of its word), partly folded: below 2^33, and zero only when every byte is.
///
/// Byte order (RFC 1071's byte-order independence): the big-endian word `a·2^8 + b` read
/// little-endian is `b·2^8 + a`, which is `2^8` times it modulo 0xffff (2^16 = 1 there); so
/// this is `2^8` times the Internet checksum's sum, mod 0xffff. [`verifies`] gives the same
/// answer for both (2^8 is invertible mod 0xffff), and a big-endian term joins as `term << 8`.
/// Little-endian 64-bit words need no byte swap here and add with an end-around carry (2^64 =
/// 1 mod 0xffff): about half the instructions of splitting swapped words into halves.
#[inline(always)]
fn sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    let mut s: u64 = 0;
    for c in &mut chunks {
        s = add_carry(
            s,
            u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
        );
    }
    // The last 0..=7 bytes as words in place (a zero-padded copy cost a memcpy call per
    // packet).
    let mut rest = chunks.remainder();
    let mut t: u64 = 0;
    if let [a, b, c, d, r @ ..] = rest {
        t += u64::from(u32::from_le_bytes([*a, *b, *c, *d]));
        rest = r;
    }
    if let [a, b, r @ ..] = rest {
        t += u64::from(u16::from_le_bytes([*a, *b]));
        rest = r;
    }
    if let [a] = rest {
        t += u64::from(*a);
    }
    let s = add_carry(s, t);
    (s & 0xffff_ffff) + (s >> 32)
}

/// `a + b` with the carry out of bit 63 added back in (2^64 = 1 mod 0xffff): nonzero when
/// either is.
#[inline(always)]
fn add_carry(a: u64, b: u64) -> u64 {
    let (s, c) = a.overflowing_add(b);
    s + u64::from(c)
}

/// True when the folded sum is 0xffff, i.e. the data with its checksum verifies. Equivalent to
/// smoltcp's `checksum::data(..) == 0xffff` (both: sum = 0 mod 0xffff and not all-zero).
/// Branch-free fold: after the 32-bit step the value is < 2^33, and three 16-bit steps bring
/// any such value to 16 bits with the end-around carries.
#[inline(always)]
fn verifies(s: u64) -> bool {
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s == 0xffff
}

/// The parsed packet: what the rewrite and conntrack need.
struct Pkt {
    /// Ethernet + IP total length (the frame without Ethernet padding).
    len: usize,
    /// The IP length of one packet on the wire, for the MTU checks: the IP total length, or
    /// for a GSO super-frame the length of its largest segment.
    wire: usize,
    src: u32,
    dst: u32,
    ttl: u8,
    tcp: bool,
    sport: u16,
    dport: u16,
    flags: u8,
}

/// Parse and validate an Ethernet/IPv4 (no options, not a fragment)/TCP-or-UDP frame with the
/// same acceptance as `parse_rx` + `parse_l4`, checksums aside ([`checksums_ok`]); `None`
/// otherwise (the full path then decides, possibly accepting what this refuses, never the
/// reverse). With `gso` (a TCPv4 GSO header): a TCP super-frame whose IP total length is the
/// whole frame, with data to cut.
#[inline(always)]
fn parse(frame: &[u8], gso: Option<&VnetHdr>) -> Option<Pkt> {
    // Everything up to the UDP header's end through one fixed-size array: no bounds checks.
    let h: &[u8; ETH_LEN + IP_HDR + 8] = frame.get(..ETH_LEN + IP_HDR + 8)?.try_into().ok()?;
    // IPv4, version 4, 20-byte header; no MF, offset 0 (DF and the reserved bit pass, as in
    // the full path).
    if h[12..14] != [8, 0] || h[14] != 0x45 || rd16(h, 20) & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(rd16(h, 16));
    if total < IP_HDR + 8 || ETH_LEN + total > frame.len() {
        return None;
    }
    let (src, dst) = (rd32(h, 26), rd32(h, 30));
    // Not broadcast, multicast or unspecified.
    if src == u32::MAX || src >> 28 == 0xe || src == 0 {
        return None;
    }
    let proto = h[23];
    let l4len = total - IP_HDR;
    let l4 = &frame[ETH_LEN + IP_HDR..ETH_LEN + total];
    let mut wire = total;
    let tcp = match proto {
        PROTO_TCP => {
            // smoltcp's TcpPacket::check_len: 20 bytes, data offset in 20..=len.
            if l4len < 20 {
                return None;
            }
            let doff = usize::from(l4[12] >> 4) * 4;
            if doff < 20 || doff > l4len {
                return None;
            }
            if let Some(g) = gso {
                let mss = usize::from(g.gso_size);
                let data = l4len - doff;
                let partial_at = |start: u16, off: u16| {
                    usize::from(start) == ETH_LEN + IP_HDR && usize::from(off) == 16
                };
                if g.gso() != GSO_TCPV4
                    || mss == 0
                    || data == 0
                    || ETH_LEN + total != frame.len()
                    || (g.needs_csum() && !partial_at(g.csum_start, g.csum_offset))
                {
                    return None;
                }
                wire = IP_HDR + doff + mss.min(data);
            }
            true
        }
        PROTO_UDP if gso.is_none() => {
            if usize::from(rd16(h, 38)) != l4len {
                return None;
            }
            false
        }
        _ => return None,
    };
    Some(Pkt {
        len: ETH_LEN + total,
        wire,
        src,
        dst,
        ttl: h[22],
        tcp,
        sport: rd16(h, 34),
        dport: rd16(h, 36),
        flags: if tcp { l4[13] } else { 0 },
    })
}

/// The IPv4 header checksum check of the full path (summed little-endian, as [`sum`]).
#[inline(always)]
fn ip_checksum_ok(frame: &[u8]) -> bool {
    let Some(ip) = frame.get(ETH_LEN..).and_then(|b| b.first_chunk::<IP_HDR>()) else {
        return false;
    };
    let w = |i: usize| u64::from(u32::from_le_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]));
    verifies(w(0) + w(4) + w(8) + w(12) + w(16))
}

/// The checksum checks of the full path (IPv4 header; TCP, or UDP unless its checksum is 0,
/// under the pseudo-header) for a frame [`parse`] accepted. Run after the conntrack lookup
/// hit, so a new flow (which takes the full path anyway) does not pay for them twice.
#[inline(always)]
fn checksums_ok(frame: &[u8], p: &Pkt) -> bool {
    if !ip_checksum_ok(frame) {
        return false;
    }
    let l4 = &frame[ETH_LEN + IP_HDR..p.len];
    // Zero UDP checksum: none to verify.
    if !p.tcp && rd16(l4, 6) == 0 {
        return true;
    }
    let proto = if p.tcp { PROTO_TCP } else { PROTO_UDP };
    l4_verifies(p.src, p.dst, proto, l4)
}

/// True when a TCP/UDP segment verifies under the IPv4 pseudo-header (`checksum::verifies_l4`).
#[inline(always)]
fn l4_verifies(src: u32, dst: u32, proto: u8, l4: &[u8]) -> bool {
    let pseudo = u64::from(src) + u64::from(dst) + u64::from(proto) + l4.len() as u64;
    // The pseudo-header is summed big-endian, `sum` little-endian: see `sum`.
    verifies((pseudo << 8) + sum(l4))
}

/// Frames between the stages of [`Router::pipelined`]: enough handling time to cover a
/// miss to memory, few enough that the lines asked for are still cached when used.
const LAG: usize = 4;
/// Hints kept by [`Router::pipelined`]: at least `2 * LAG + 1`, a power of two for the index.
const RING: usize = 4 * LAG;

/// The conntrack key a TCP/UDP frame would have, read without any validation (for
/// [`Router::pipelined`] only: a wrong guess costs a useless hint, never a wrong result).
#[inline(always)]
fn peek_key(f: &[u8]) -> Option<Tuple> {
    if f.len() < ETH_LEN + IP_HDR + 4 || f[12..14] != [8, 0] || f[14] != 0x45 {
        return None;
    }
    let proto = match f[23] {
        PROTO_TCP => L4::Tcp,
        PROTO_UDP => L4::Udp,
        _ => return None,
    };
    Some(Tuple {
        src: Ipv4Addr::from_bits(rd32(f, 26)),
        dst: Ipv4Addr::from_bits(rd32(f, 30)),
        sport: rd16(f, 34),
        dport: rd16(f, 36),
        proto,
    })
}

/// A frame's guessed key ([`peek_key`]) and its hash, kept from the first stage of
/// [`Router::pipelined`] so that the lookup does not hash again. Used only when the parsed key
/// is the same (the guess reads no header length, checksum or MAC).
#[derive(Clone, Copy)]
pub(crate) struct Hint {
    key: Tuple,
    hash: u64,
}

impl Router {
    /// The batch entry points: `one` (the single-frame entry point) on every frame in order,
    /// software-pipelined so that the two dependent conntrack misses of a frame (index slot,
    /// then entry) are in flight while the frames before it are handled. At step `s`: frame
    /// `s + LAG` is asked for, frame `s`'s key hashed and its index slot asked for, frame
    /// `s - LAG`'s slot read and its entry asked for, and frame `s - 2 * LAG` handled. Hints
    /// only: every frame still takes the whole single-frame path, so results are the same.
    #[inline(always)]
    pub(crate) fn pipelined(
        &mut self,
        zone: Zone,
        frames: &[&[u8]],
        verdicts: &mut Vec<Verdict>,
        mut one: impl FnMut(&mut Self, &[u8], Option<Hint>) -> Verdict,
    ) {
        // Frames `s - 2 * LAG ..= s` have their hints alive at step `s`: one more than
        // `2 * LAG` (with exactly `2 * LAG`, frame `s` overwrote the hint of the frame handled
        // in the same step, and only the last frames of a batch got their own).
        let mut hints: [Option<Hint>; RING] = [None; RING];
        for s in 0..frames.len() + 2 * LAG {
            if let Some(f) = frames.get(s + LAG) {
                prefetch(f.as_ptr());
            }
            if let Some(f) = frames.get(s) {
                hints[s % RING] = peek_key(f).map(|key| Hint {
                    hash: self.table.prefetch_slot(zone, &key),
                    key,
                });
            }
            if let Some(Some(h)) = s
                .checked_sub(LAG)
                .and_then(|i| (i < frames.len()).then(|| hints[i % RING]))
            {
                let _ = self.table.prefetch_conn(h.hash);
            }
            if let Some(i) = s.checked_sub(2 * LAG).filter(|&i| i < frames.len()) {
                verdicts.push(one(self, frames[i], hints[i % RING]));
            }
        }
    }

    /// Fast path of [`Router::handle_from_network`]; `None`: take the full path.
    #[inline(always)]
    pub(crate) fn fast_from_network(
        &mut self,
        net: NetworkId,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
        hint: Option<Hint>,
    ) -> Option<()> {
        if meta.partial_csum {
            return None;
        }
        let plan = self.plan_network(net, frame, None, now, hint)?;
        self.commit_copy(&plan, frame, now, out);
        Some(())
    }

    /// Fast path of [`Router::handle_from_uplink`]; `None`: take the full path.
    #[inline(always)]
    pub(crate) fn fast_from_uplink(
        &mut self,
        frame: &[u8],
        meta: RxMeta,
        now: Instant,
        out: &mut Emits,
        hint: Option<Hint>,
    ) -> Option<()> {
        if meta.partial_csum {
            return None;
        }
        let plan = self.plan_uplink(frame, None, now, hint)?;
        self.commit_copy(&plan, frame, now, out);
        Some(())
    }

    /// A TCP GSO super-frame (`hdr`: TCPv4 GSO, its checksum partial or not) of an established
    /// connection from `net`, translated whole: it leaves as one frame with a virtio-net
    /// header (partial checksum over the new addresses), counted as its segments. `None`, with
    /// no side effect at all, for anything the fast path would not take (a new flow, local
    /// traffic, a segment over the egress MTU, ...): the caller cuts it
    /// (`switchyard_switch::gso::segment_tcp4`) and hands the segments to
    /// [`Router::handle_from_network`], which then decides exactly as for wire packets.
    pub fn handle_gso_from_network(
        &mut self,
        net: NetworkId,
        frame: &[u8],
        hdr: &VnetHdr,
        now: Instant,
        out: &mut Emits,
    ) -> Option<Verdict> {
        let plan = self.plan_network(net, frame, Some(hdr), now, None)?;
        self.commit_copy(&plan, frame, now, out);
        Some(self.finish(Verdict::Forwarded))
    }

    /// [`Self::handle_gso_from_network`] for a super-frame received on the uplink (GRO, or a
    /// TSO peer); `None`: cut it and hand the segments to [`Router::handle_from_uplink`].
    pub fn handle_gso_from_uplink(
        &mut self,
        frame: &[u8],
        hdr: &VnetHdr,
        now: Instant,
        out: &mut Emits,
    ) -> Option<Verdict> {
        let plan = self.plan_uplink(frame, Some(hdr), now, None)?;
        self.commit_copy(&plan, frame, now, out);
        Some(self.finish(Verdict::Forwarded))
    }

    /// [`Self::handle_gso_from_network`] rewriting `frame` where it is instead of copying 64 KB
    /// into an [`Emits`]: when taken, `frame` leaves by the returned egress with the returned
    /// header; `None` leaves it (and everything else) untouched.
    pub fn handle_gso_from_network_in_place(
        &mut self,
        net: NetworkId,
        frame: &mut [u8],
        hdr: &VnetHdr,
        now: Instant,
    ) -> Option<(Egress, VnetHdr)> {
        let plan = self.plan_network(net, frame, Some(hdr), now, None)?;
        self.commit(&plan, frame, now);
        self.finish(Verdict::Forwarded);
        Some((plan.egress, plan.hdr?))
    }

    /// [`Self::handle_gso_from_uplink`] rewriting `frame` where it is (see
    /// [`Self::handle_gso_from_network_in_place`]).
    pub fn handle_gso_from_uplink_in_place(
        &mut self,
        frame: &mut [u8],
        hdr: &VnetHdr,
        now: Instant,
    ) -> Option<(Egress, VnetHdr)> {
        let plan = self.plan_uplink(frame, Some(hdr), now, None)?;
        self.commit(&plan, frame, now);
        self.finish(Verdict::Forwarded);
        Some((plan.egress, plan.hdr?))
    }

    /// A frame from `net` for the fast path, whole (`gso`: a TCP super-frame): what to do
    /// with it, decided without any side effect.
    #[inline(always)]
    fn plan_network(
        &self,
        net: NetworkId,
        frame: &[u8],
        gso: Option<&VnetHdr>,
        now: Instant,
        hint: Option<Hint>,
    ) -> Option<Plan> {
        // Host mode and "no route" both need `uplink == None`: excluded here.
        let up = self.uplink?;
        let n = self.net(net)?;
        let limit = n.mtu + switchyard_switch::frame::ETH_OVERHEAD;
        if n.internal
            || (gso.is_none() && frame.len() > limit)
            || frame.get(0..6)? != n.gateway_mac.0
        {
            return None;
        }
        let p = parse(frame, gso)?;
        if ETH_LEN + p.wire > limit {
            return None;
        }
        let d = Ipv4Addr::from_bits(p.dst);
        let bcast = n.subnet.to_bits() | !crate::config::mask(n.prefix_len);
        if d.is_broadcast()
            || d.is_multicast()
            || p.dst == bcast
            || d == n.gateway_ip
            || (d != up.addr
                && (in_subnet(d, n.subnet, n.prefix_len)
                    || self.nets.iter().any(|o| {
                        o.id != net && (in_subnet(d, o.subnet, o.prefix_len) || d == o.gateway_ip)
                    })))
        {
            return None;
        }
        self.plan(net.0, frame, p, gso, now, hint)
    }

    /// A frame from the uplink for the fast path, whole (`gso`: a TCP super-frame); no side
    /// effect.
    #[inline(always)]
    fn plan_uplink(
        &self,
        frame: &[u8],
        gso: Option<&VnetHdr>,
        now: Instant,
        hint: Option<Hint>,
    ) -> Option<Plan> {
        let up = self.uplink?;
        let limit = self.cfg.uplink_mtu + switchyard_switch::frame::ETH_OVERHEAD;
        if (gso.is_none() && frame.len() > limit) || frame.get(0..6)? != up.mac.0 {
            return None;
        }
        let p = parse(frame, gso)?;
        if ETH_LEN + p.wire > limit || p.dst != up.addr.to_bits() {
            return None;
        }
        self.plan(UPLINK_ZONE, frame, p, gso, now, hint)
    }

    /// [`Router::forward`]'s decisions for a parsed fast-path packet arriving in `zone`.
    #[inline(always)]
    fn plan(
        &self,
        zone: Zone,
        frame: &[u8],
        p: Pkt,
        gso: Option<&VnetHdr>,
        now: Instant,
        hint: Option<Hint>,
    ) -> Option<Plan> {
        if p.ttl <= 1 {
            return None;
        }
        let key = Tuple {
            src: Ipv4Addr::from_bits(p.src),
            dst: Ipv4Addr::from_bits(p.dst),
            sport: p.sport,
            dport: p.dport,
            proto: if p.tcp { L4::Tcp } else { L4::Udp },
        };
        let now_us = now.total_micros();
        let (idx, dir) = match hint {
            Some(h) if h.key == key => self.table.lookup_live_hashed(zone, &key, h.hash, now_us)?,
            _ => self.table.lookup_live(zone, &key, now_us)?,
        };
        // A super-frame's TCP checksum is not verified (its sender offloaded it, or GRO checked
        // the segments); the IPv4 header's is.
        let ok = match gso {
            None => checksums_ok(frame, &p),
            Some(_) => ip_checksum_ok(frame),
        };
        if !ok {
            return None;
        }
        let (to, ezone, kind, r) = self.table.translation(idx, dir);
        // Router::resolve, without its error branches (they send ICMP: full path).
        let (egress, src_mac, dst_mac, mtu) = if ezone == UPLINK_ZONE {
            let up = self.uplink?;
            let next_hop = if in_subnet(to.dst, up.addr, up.prefix_len) {
                to.dst
            } else {
                up.gateway?
            };
            let dst_mac = match up.gateway_mac {
                Some(m) if Some(next_hop) == up.gateway => m,
                _ => self.neigh.lookup(next_hop, now)?,
            };
            (Egress::Uplink, up.mac, dst_mac, self.cfg.uplink_mtu)
        } else {
            let id = NetworkId(ezone);
            let n = self.net(id)?;
            let (gw_mac, mtu) = (n.gateway_mac, n.mtu);
            let mac = self.endpoint(id, to.dst)?;
            (Egress::Network(id), gw_mac, mac, mtu)
        };
        if p.wire > mtu {
            return None;
        }
        let hdr = gso.map(|g| {
            let thl = usize::from(frame[ETH_LEN + IP_HDR + 12] >> 4) * 4;
            VnetHdr {
                flags: VNET_F_NEEDS_CSUM,
                gso_type: g.gso_type,
                hdr_len: (ETH_LEN + IP_HDR + thl) as u16,
                gso_size: g.gso_size,
                csum_start: (ETH_LEN + IP_HDR) as u16,
                csum_offset: 16,
            }
        });
        Some(Plan {
            p,
            zone,
            to,
            ezone,
            kind,
            r,
            dir,
            egress,
            src_mac,
            dst_mac,
            hdr,
        })
    }

    /// Carry out `plan` on a copy of `frame` pushed to `out`.
    #[inline(always)]
    fn commit_copy(&mut self, plan: &Plan, frame: &[u8], now: Instant, out: &mut Emits) {
        let buf = out.push_copy_offloaded(plan.egress, &frame[..plan.p.len], plan.hdr);
        self.commit(plan, buf, now);
    }

    /// Carry out `plan` on `buf` (the frame, or its copy): from here on this is the full
    /// path's work, in its order.
    #[inline(always)]
    fn commit(&mut self, plan: &Plan, buf: &mut [u8], now: Instant) {
        let p = &plan.p;
        let tcp = p.tcp.then(|| TcpFlags::from_byte(p.flags));
        self.table.on_packet(plan.r, plan.dir, tcp, now);
        rewrite(
            buf,
            p,
            &plan.to,
            plan.dst_mac,
            plan.src_mac,
            plan.hdr.is_some(),
        );
        let segs = match &plan.hdr {
            Some(h) => {
                self.counters.gso_translated += 1;
                switchyard_switch::gso::wire_size(p.len, Some(h)).0
            }
            None => 1,
        };
        self.count_translated(plan.kind, plan.zone, plan.ezone, segs);
    }
}

/// What the fast path decided for one packet ([`Router::plan`]), before it changes anything.
struct Plan {
    p: Pkt,
    zone: Zone,
    to: Tuple,
    ezone: Zone,
    kind: Kind,
    r: ConnRef,
    dir: Dir,
    egress: Egress,
    src_mac: MacAddr,
    dst_mac: MacAddr,
    /// The header a GSO super-frame leaves with.
    hdr: Option<VnetHdr>,
}

/// `write_eth` + `packet::rewrite` + `packet::dec_ttl` for a fast-path packet: the same
/// updates in the same order, so the bytes are identical. `partial`: the TCP checksum field
/// gets the pseudo-header sum of the new addresses (CHECKSUM_PARTIAL, for a GSO super-frame).
#[inline(always)]
fn rewrite(buf: &mut [u8], p: &Pkt, to: &Tuple, dst_mac: MacAddr, src_mac: MacAddr, partial: bool) {
    // Every byte written lies in the headers [`parse`] saw whole (a TCP header has 20 bytes
    // or more, a UDP one 8): one length check for all of them instead of one per field.
    if p.tcp {
        rewrite_in::<{ ETH_LEN + IP_HDR + 20 }>(buf, p, to, dst_mac, src_mac, partial, 16);
    } else {
        rewrite_in::<{ ETH_LEN + IP_HDR + 8 }>(buf, p, to, dst_mac, src_mac, false, 6);
    }
}

/// [`rewrite`] on the first `N` bytes of `buf` (through the L4 header's end), the L4
/// checksum at `at` in the L4 header.
#[inline(always)]
fn rewrite_in<const N: usize>(
    buf: &mut [u8],
    p: &Pkt,
    to: &Tuple,
    dst_mac: MacAddr,
    src_mac: MacAddr,
    partial: bool,
    at: usize,
) {
    // `buf` holds the packet [`parse`] accepted, so this never fails.
    let Some(h) = buf.first_chunk_mut::<N>() else {
        return;
    };
    h[0..6].copy_from_slice(&dst_mac.0);
    h[6..12].copy_from_slice(&src_mac.0);
    let pkt = &mut h[ETH_LEN..];
    let (os, od) = (p.src, p.dst);
    let (ns, nd) = (to.src.to_bits(), to.dst.to_bits());
    // IP header: addresses, then the TTL. The full path applies one RFC 1624 update per
    // changed field (set_addrs skips unchanged addresses, then dec_ttl); `combined` gives the
    // same 16 bits for the same terms (see its proof), with one fold instead of three.
    let mut t = 0;
    if os != ns {
        t += delta32(os, ns);
        pkt[12..16].copy_from_slice(&ns.to_be_bytes());
    }
    if od != nd {
        t += delta32(od, nd);
        pkt[16..20].copy_from_slice(&nd.to_be_bytes());
    }
    let old = rd16(pkt, 8);
    pkt[8] = pkt[8].wrapping_sub(1);
    t += delta16(old, rd16(pkt, 8));
    let c = combined(rd16(pkt, 10), t);
    wr16(pkt, 10, c);
    // Ports and the L4 checksum: the pseudo-header addresses and both ports, always all four
    // updates (as packet::rewrite), UDP keeping "no checksum" and never producing 0.
    let seg = &mut pkt[IP_HDR..];
    wr16(seg, 0, to.sport);
    wr16(seg, 2, to.dport);
    if partial {
        let l4_len = p.len - ETH_LEN - IP_HDR;
        wr16(
            seg,
            at,
            pseudo_sum4(ns.to_be_bytes(), nd.to_be_bytes(), PROTO_TCP, l4_len),
        );
        return;
    }
    let c = rd16(seg, at);
    let t =
        delta32(os, ns) + delta32(od, nd) + delta16(p.sport, to.sport) + delta16(p.dport, to.dport);
    let c = if p.tcp {
        combined(c, t)
    } else if c == 0 {
        0
    } else {
        match combined(c, t) {
            0 => 0xffff,
            c => c,
        }
    };
    wr16(seg, at, c);
}

/// The RFC 1624 terms of a 32-bit field changing from `old` to `new`: `~m + m'` per word.
#[inline(always)]
fn delta32(old: u32, new: u32) -> u32 {
    (!old >> 16) + (!old & 0xffff) + (new >> 16) + (new & 0xffff)
}

/// The RFC 1624 terms of a 16-bit field changing.
#[inline(always)]
fn delta16(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

/// `HC' = ~(~HC + terms)` folded once for a whole chain of changes (at most 13 words here,
/// so the sum is below 2^20 and two folds finish it). Equal, bit for bit, to applying
/// `checksum::update16`/`update32` once per change in order: a step's result is the
/// canonical representative (0..=0xfffe) of the updated value unless its sum is exactly
/// zero, which needs HC = 0xffff and all its terms zero; an input of 0xffff in turn only comes
/// from such a step, so the chain ends in the non-canonical 0xffff exactly when every term of
/// every step is zero, which is exactly when the combined sum is zero. (The UDP variants add
/// "0 stays 0" and "0 becomes 0xffff", which commute with this.) Tested exhaustively on the
/// edge values in `combined_equals_sequential`.
#[inline(always)]
fn combined(csum: u16, terms: u32) -> u16 {
    let s = u32::from(!csum) + terms;
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum as ck;
    use proptest::prelude::*;
    use smoltcp::wire::IpProtocol;

    proptest! {
        /// The hand-written sum agrees with smoltcp's on verification, valid or not.
        #[test]
        fn sum_verifies_like_smoltcp(mut data in proptest::collection::vec(any::<u8>(), 2..80),
                                     fix in any::<bool>(),
                                     flip in proptest::option::of((any::<usize>(), 1..=255u8))) {
            if fix {
                data[0] = 0;
                data[1] = 0;
                let c = ck::full(&data);
                data[..2].copy_from_slice(&c.to_be_bytes());
                if let Some((at, x)) = flip {
                    let n = data.len();
                    data[at % n] ^= x;
                }
            }
            prop_assert_eq!(verifies(sum(&data)), ck::verifies(&data));
        }

        /// The IPv4 header check agrees with smoltcp's, valid or not.
        #[test]
        fn ip_checksum_like_smoltcp(mut hdr in any::<[u8; IP_HDR]>(), fix in any::<bool>(),
                                    flip in proptest::option::of((any::<usize>(), 1..=255u8))) {
            if fix {
                hdr[10..12].fill(0);
                let c = ck::full(&hdr);
                hdr[10..12].copy_from_slice(&c.to_be_bytes());
                if let Some((at, x)) = flip {
                    hdr[at % IP_HDR] ^= x;
                }
            }
            let mut frame = vec![0u8; ETH_LEN];
            frame.extend_from_slice(&hdr);
            prop_assert_eq!(ip_checksum_ok(&frame), ck::verifies(&hdr));
        }

        /// The pseudo-header check agrees with smoltcp's, valid or not, at every length.
        #[test]
        fn l4_verifies_like_smoltcp(mut seg in proptest::collection::vec(any::<u8>(), 8..80),
                                    src in any::<u32>(), dst in any::<u32>(), tcp in any::<bool>(),
                                    fix in any::<bool>(),
                                    flip in proptest::option::of((any::<usize>(), 1..=255u8))) {
            let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
            let (s, d) = (Ipv4Addr::from_bits(src), Ipv4Addr::from_bits(dst));
            let ip_proto = if tcp { IpProtocol::Tcp } else { IpProtocol::Udp };
            if fix {
                seg[6..8].fill(0);
                let c = ck::full_l4(s, d, ip_proto, &seg);
                seg[6..8].copy_from_slice(&c.to_be_bytes());
                if let Some((at, x)) = flip {
                    let n = seg.len();
                    seg[at % n] ^= x;
                }
            }
            prop_assert_eq!(l4_verifies(src, dst, proto, &seg), ck::verifies_l4(s, d, ip_proto, &seg));
        }
    }

    fn sequential(tcp: bool, c: u16, a: [(u32, u32); 2], b: [(u16, u16); 2]) -> u16 {
        if tcp {
            let c = ck::update32(c, a[0].0, a[0].1);
            let c = ck::update32(c, a[1].0, a[1].1);
            let c = ck::update16(c, b[0].0, b[0].1);
            ck::update16(c, b[1].0, b[1].1)
        } else {
            let c = ck::update_udp32(c, a[0].0, a[0].1);
            let c = ck::update_udp32(c, a[1].0, a[1].1);
            let c = ck::update_udp16(c, b[0].0, b[0].1);
            ck::update_udp16(c, b[1].0, b[1].1)
        }
    }

    fn one_fold(tcp: bool, c: u16, a: [(u32, u32); 2], b: [(u16, u16); 2]) -> u16 {
        let t = delta32(a[0].0, a[0].1)
            + delta32(a[1].0, a[1].1)
            + delta16(b[0].0, b[0].1)
            + delta16(b[1].0, b[1].1);
        if tcp {
            combined(c, t)
        } else if c == 0 {
            0
        } else {
            match combined(c, t) {
                0 => 0xffff,
                c => c,
            }
        }
    }

    /// Every combination of edge values (0, 1, 0xfffe, 0xffff words) for the checksum and
    /// each field: the one-fold update is bit-identical to the full path's chain.
    #[test]
    fn combined_equals_sequential() {
        let w16 = [0u16, 1, 0x7fff, 0xfffe, 0xffff];
        let w32 = [
            0u32,
            1,
            0xffff,
            0x1_0000,
            0xffff_fffe,
            0xffff_ffff,
            0x0000_ffff,
            0xffff_0000,
        ];
        for tcp in [true, false] {
            for &c in &w16 {
                for &a0 in &w32 {
                    for &a1 in &w32 {
                        for &b0 in &w16 {
                            for &b1 in &w16 {
                                for &n in &[0u32, 0xffff_ffff, 0x0a4d_0002] {
                                    let a = [(a0, n), (a1, !n)];
                                    let a2 = [(a0, a0), (a1, a1)];
                                    let b = [(b0, b1), (b1, b0)];
                                    let b2 = [(b0, b0), (0xffff, 0)];
                                    for (a, b) in [(a, b), (a2, b2), (a, b2), (a2, b)] {
                                        assert_eq!(
                                            one_fold(tcp, c, a, b),
                                            sequential(tcp, c, a, b),
                                            "{tcp} {c:x} {a:x?} {b:x?}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The fully degenerate chain (every step's sum exactly zero) and its near misses.
    #[test]
    fn combined_equals_sequential_degenerate() {
        let z = [(u32::MAX, 0), (u32::MAX, 0)];
        let zb = [(u16::MAX, 0), (u16::MAX, 0)];
        for tcp in [true, false] {
            for c in [0xffff, 0xfffe, 0, 1] {
                for (i, j) in [(0, 0), (1, 0), (0, 1), (2, 0), (0, 2)] {
                    let mut a = z;
                    let mut b = zb;
                    if i > 0 {
                        a[i - 1].1 = 1;
                    }
                    if j > 0 {
                        b[j - 1].1 = 1;
                    }
                    assert_eq!(one_fold(tcp, c, a, b), sequential(tcp, c, a, b));
                }
            }
        }
        assert_eq!(sequential(true, 0xffff, z, zb), 0xffff);
    }

    proptest! {
        #[test]
        fn combined_equals_sequential_random(tcp in any::<bool>(), c in any::<u16>(),
                                             a in any::<[(u32, u32); 2]>(), b in any::<[(u16, u16); 2]>()) {
            prop_assert_eq!(one_fold(tcp, c, a, b), sequential(tcp, c, a, b));
        }
    }

    /// Every frame of a batch is handled with its own key's hint (the hint ring once held
    /// one slot too few, so all but the last frames got the hint of a frame 8 later, which
    /// the key check refused: results stayed right, and each key was hashed twice).
    #[test]
    fn pipeline_hands_each_frame_its_own_hint() {
        let mut r = Router::new(crate::RouterConfig::default());
        let frames: Vec<Vec<u8>> = (0..300u32)
            .map(|i| {
                let mut f = vec![0u8; ETH_LEN + IP_HDR + 8];
                f[12..14].copy_from_slice(&[8, 0]);
                f[14] = 0x45;
                f[23] = if i % 3 == 0 { PROTO_TCP } else { PROTO_UDP };
                f[26..30].copy_from_slice(&(0x0a00_0000 + i).to_be_bytes());
                f[34..36].copy_from_slice(&(i as u16).to_be_bytes());
                f
            })
            .collect();
        for n in [0, 1, 7, 8, 9, 17, 256, 300] {
            let batch: Vec<&[u8]> = frames[..n].iter().map(|f| f.as_slice()).collect();
            let (mut seen, mut verdicts) = (Vec::new(), Vec::new());
            r.pipelined(UPLINK_ZONE, &batch, &mut verdicts, |_, f, h| {
                seen.push((f.as_ptr(), h.map(|h| h.key)));
                Verdict::Forwarded
            });
            assert_eq!(verdicts.len(), n);
            let want: Vec<_> = batch.iter().map(|f| (f.as_ptr(), peek_key(f))).collect();
            assert_eq!(seen, want, "batch of {n}");
        }
    }

    #[test]
    fn sum_edge_cases() {
        assert!(!verifies(sum(&[])));
        assert!(!verifies(sum(&[0; 33])));
        assert!(verifies(sum(&[0xff, 0xff])));
        assert!(verifies(sum(&[0xff; 1480])));
        assert_eq!(verifies(sum(&[0xff])), ck::verifies(&[0xff]));
    }
}
