//! Conversation affinity: which worker should read which port.
//!
//! A frame one worker reads and writes to a port another worker reads is cheap by itself, but
//! the answer then comes back on that other worker, which must be woken for it: with busy
//! polling that doubled request/response latency (README, Dataplane threads). So the dataplane
//! counts, per port, the frames it exchanges with each peer (another port, or the uplink, which
//! worker 0 reads), and from time to time asks [`Affinity::plan`] for moves:
//! - a port whose traffic has a clear majority peer (two thirds, over a minimum of frames) is
//!   grouped with it; groups are the connected ports, and one that includes the uplink belongs
//!   on worker 0;
//! - a group spread over several workers is gathered on the least loaded one (by frames of the
//!   groups already in place; the lowest of those about as light), biggest group first, so
//!   independent conversations spread and a lone one settles on worker 0;
//! - a worker carrying several groups gives one to a lighter worker only when that at least
//!   halves the gap between them, so a move is never undone by the next plan at steady load;
//! - a port that moved stays put for [`DWELL`].
//!
//! Pure: the dataplane feeds it frames and asks with `now`; moving the fds is the dataplane's.

use switchyard_switch::{Duration, Instant};

/// A port stays on its worker this long after a move.
pub const DWELL: Duration = Duration::from_millis(2000);
/// Frames a port must exchange in one interval for its peers to count.
pub const MIN_FRAMES: u64 = 200;
/// Peers counted per port (the most frequent ones, approximately: space-saving).
const SLOTS: usize = 4;
/// A peer that is not a port.
const UPLINK: u32 = u32::MAX;

/// Whom a port exchanges frames with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Port(u32),
    /// The raw or socket uplink: read by worker 0.
    Uplink,
}

impl Peer {
    fn code(self) -> u32 {
        match self {
            Peer::Port(p) => p,
            Peer::Uplink => UPLINK,
        }
    }
}

/// Where one input frame went: counted only when it went to one peer (not a flood).
#[derive(Clone, Copy, Debug, Default)]
pub struct Outputs {
    first: Option<Peer>,
    many: bool,
}

impl Outputs {
    #[inline]
    pub fn note(&mut self, to: Peer) {
        match self.first {
            None => self.first = Some(to),
            Some(f) if f != to => self.many = true,
            Some(_) => {}
        }
    }
}

/// One port's most frequent peers this interval. Every frame adds one to exactly one slot, so
/// the slots' sum is the port's exact frame count; a slot's count bounds its peer's from above.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    peer: [u32; SLOTS],
    count: [u32; SLOTS],
}

impl Tally {
    #[inline]
    fn add(&mut self, peer: u32) {
        let mut min = 0;
        for i in 0..SLOTS {
            if self.count[i] > 0 && self.peer[i] == peer {
                self.count[i] = self.count[i].saturating_add(1);
                return;
            }
            if self.count[i] < self.count[min] {
                min = i;
            }
        }
        // Space-saving: the newcomer takes the smallest slot (an empty one while there is one).
        self.peer[min] = peer;
        self.count[min] = self.count[min].saturating_add(1);
    }

    fn total(&self) -> u64 {
        self.count.iter().map(|c| u64::from(*c)).sum()
    }

    /// The peer with the most frames (the lowest code on a tie) and its count.
    fn top(&self) -> Option<(u32, u64)> {
        (0..SLOTS)
            .filter(|i| self.count[*i] > 0)
            .map(|i| (self.peer[i], u64::from(self.count[i])))
            .max_by_key(|(p, c)| (*c, std::cmp::Reverse(*p)))
    }
}

/// A port to move from one worker to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub port: u32,
    pub from: usize,
    pub to: usize,
}

/// The counts of the current interval and when each port last moved.
#[derive(Default)]
pub struct Affinity {
    tally: Vec<Tally>,
    moved: Vec<Option<Instant>>,
}

/// Ports that have to share a worker.
struct Group {
    ports: Vec<u32>,
    frames: u64,
    /// Talks to the uplink: belongs on worker 0.
    pinned: bool,
}

/// Union-find over port indices (and one more node, the uplink).
fn find(parent: &mut [usize], mut x: usize) -> usize {
    while parent[x] != x {
        parent[x] = parent[parent[x]];
        x = parent[x];
    }
    x
}

impl Affinity {
    /// One frame read from `from` whose outputs were `outs`.
    #[inline]
    pub fn frame(&mut self, from: Peer, outs: &Outputs) {
        let (Some(to), false) = (outs.first, outs.many) else {
            return;
        };
        if to == from {
            return;
        }
        for (a, b) in [(from, to), (to, from)] {
            if let Peer::Port(p) = a {
                let i = p as usize;
                if i >= self.tally.len() {
                    self.tally.resize(i + 1, Tally::default());
                }
                self.tally[i].add(b.code());
            }
        }
    }

    /// Port `p` was attached or detached: its history is not the new port's.
    pub fn forget(&mut self, p: u32) {
        if let Some(t) = self.tally.get_mut(p as usize) {
            *t = Tally::default();
        }
        if let Some(m) = self.moved.get_mut(p as usize) {
            *m = None;
        }
    }

    fn dwelling(&self, p: u32, now: Instant) -> bool {
        matches!(self.moved.get(p as usize), Some(Some(t)) if now < *t + DWELL)
    }

    /// The moves for the interval that ends now (its counts are dropped). `owners[p]`: the
    /// worker reading port `p`, `None` for no port; `workers`: how many there are.
    pub fn plan(&mut self, owners: &[Option<usize>], workers: usize, now: Instant) -> Vec<Move> {
        let tally = std::mem::take(&mut self.tally);
        if workers < 2 {
            return Vec::new();
        }
        let n = owners.len();
        let owner = |p: u32| owners.get(p as usize).copied().flatten();
        let mut parent: Vec<usize> = (0..=n).collect();
        let mut frames = vec![0u64; n];
        for (p, t) in tally.iter().enumerate().take(n) {
            if owners[p].is_none() {
                continue;
            }
            frames[p] = t.total();
            let Some((peer, c)) = t.top() else { continue };
            if frames[p] < MIN_FRAMES || c * 3 < frames[p] * 2 {
                continue;
            }
            let node = match peer {
                UPLINK => n,
                q if owner(q).is_some() => q as usize,
                _ => continue,
            };
            let (a, b) = (find(&mut parent, p), find(&mut parent, node));
            parent[a] = b;
        }
        let uplink = find(&mut parent, n);
        let mut groups: Vec<Group> = Vec::new();
        let mut index = vec![usize::MAX; n + 1];
        for p in (0..n).filter(|p| owners[*p].is_some()) {
            let r = find(&mut parent, p);
            if index[r] == usize::MAX {
                index[r] = groups.len();
                groups.push(Group {
                    ports: Vec::new(),
                    frames: 0,
                    pinned: r == uplink,
                });
            }
            let g = &mut groups[index[r]];
            g.ports.push(p as u32);
            g.frames += frames[p];
        }
        let on = |g: &Group| -> Option<usize> {
            let w = owner(g.ports[0])?;
            let same = g.ports.iter().all(|p| owner(*p) == Some(w));
            (same && (!g.pinned || w == 0)).then_some(w)
        };
        let mut load = vec![0u64; workers];
        let mut spread = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            match on(g) {
                Some(w) => load[w.min(workers - 1)] += g.frames,
                None => spread.push(i),
            }
        }
        // Worker 0's groups first (they weigh on it whatever happens), then the biggest, then
        // by lowest port, for a deterministic plan.
        spread.sort_by_key(|i| {
            let g = &groups[*i];
            (!g.pinned, std::cmp::Reverse(g.frames), g.ports[0])
        });
        let mut moves = Vec::new();
        for i in spread {
            let g = &groups[i];
            let mut share = vec![0u64; workers];
            for p in &g.ports {
                if let Some(w) = owner(*p).filter(|w| *w < workers) {
                    share[w] += frames[*p as usize];
                }
            }
            // The least loaded worker; among those about as light (within an eighth of the
            // group or of that load), the lowest: so that a lone conversation gathers on
            // worker 0, with the uplink, and stays there when it also talks to the outside.
            let least = load.iter().copied().min().unwrap_or(0);
            let slack = (least.max(g.frames) / 8).max(MIN_FRAMES);
            let to = if g.pinned {
                0
            } else {
                (0..workers)
                    .find(|w| load[*w] <= least + slack)
                    .unwrap_or(0)
            };
            if g.ports
                .iter()
                .any(|p| owner(*p) != Some(to) && self.dwelling(*p, now))
            {
                for (w, s) in share.iter().enumerate() {
                    load[w] += s;
                }
                continue;
            }
            moves.extend(g.ports.iter().filter_map(|p| {
                let from = owner(*p)?;
                (from != to).then_some(Move { port: *p, from, to })
            }));
            load[to] += g.frames;
        }
        if moves.is_empty() {
            moves = self.rebalance(&groups, &load, owner, now);
        }
        for m in &moves {
            let i = m.port as usize;
            if i >= self.moved.len() {
                self.moved.resize(i + 1, None);
            }
            self.moved[i] = Some(now);
        }
        moves
    }

    /// One group of two ports or more from the busiest worker to the least busy one, when that
    /// at least halves the gap between them.
    fn rebalance(
        &self,
        groups: &[Group],
        load: &[u64],
        owner: impl Fn(u32) -> Option<usize>,
        now: Instant,
    ) -> Vec<Move> {
        let (Some(h), Some(l)) = (
            (0..load.len()).max_by_key(|w| (load[*w], std::cmp::Reverse(*w))),
            (0..load.len()).min_by_key(|w| (load[*w], *w)),
        ) else {
            return Vec::new();
        };
        let gap = load[h] - load[l];
        let best = groups
            .iter()
            .filter(|g| {
                !g.pinned
                    && g.ports.len() > 1
                    && g.frames > 0
                    && g.ports.iter().all(|p| owner(*p) == Some(h))
                    && !g.ports.iter().any(|p| self.dwelling(*p, now))
            })
            .map(|g| (gap.abs_diff(2 * g.frames), g))
            .filter(|(after, _)| *after * 2 <= gap)
            .min_by_key(|(after, g)| (*after, g.ports[0]));
        match best {
            Some((_, g)) => g
                .ports
                .iter()
                .map(|p| Move {
                    port: *p,
                    from: h,
                    to: l,
                })
                .collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Instant {
        Instant::from_millis(ms)
    }

    /// `k` frames from `from` to `to`.
    fn talk(a: &mut Affinity, from: Peer, to: Peer, k: u32) {
        let mut o = Outputs::default();
        o.note(to);
        for _ in 0..k {
            a.frame(from, &o);
        }
    }

    fn owners(list: &[usize]) -> Vec<Option<usize>> {
        list.iter().map(|w| Some(*w)).collect()
    }

    #[test]
    fn a_split_pair_is_gathered_on_one_worker() {
        let mut a = Affinity::default();
        talk(&mut a, Peer::Port(0), Peer::Port(1), 300);
        talk(&mut a, Peer::Port(1), Peer::Port(0), 200);
        let m = a.plan(&owners(&[1, 0]), 2, at(0));
        // Both idle: the lower one.
        assert_eq!(
            m,
            vec![Move {
                port: 0,
                from: 1,
                to: 0
            }]
        );
        // Together now: nothing more to do.
        talk(&mut a, Peer::Port(0), Peer::Port(1), 500);
        assert!(a.plan(&owners(&[0, 0]), 2, at(1000)).is_empty());
    }

    #[test]
    fn a_lone_pair_gathers_on_worker_0_despite_a_little_traffic_there() {
        let mut a = Affinity::default();
        // Most of the pair's frames are port 0's, on worker 1; worker 0 has some chatter.
        talk(&mut a, Peer::Port(0), Peer::Port(1), 3000);
        talk(&mut a, Peer::Port(0), Peer::Port(2), 100);
        talk(&mut a, Peer::Port(2), Peer::Port(3), 150);
        let m = a.plan(&owners(&[1, 0, 0, 0]), 2, at(0));
        assert_eq!(
            m,
            vec![Move {
                port: 0,
                from: 1,
                to: 0
            }]
        );
    }

    #[test]
    fn a_pair_goes_where_the_uplink_traffic_is_not() {
        let mut a = Affinity::default();
        // 2 talks to the uplink from worker 1 (it must go to 0), 0-1 is split: it spreads to
        // worker 1 even though it is the bigger group.
        talk(&mut a, Peer::Port(0), Peer::Port(1), 3000);
        talk(&mut a, Peer::Port(2), Peer::Uplink, 2000);
        let mut m = a.plan(&owners(&[0, 1, 1]), 2, at(0));
        m.sort_by_key(|mv| mv.port);
        assert_eq!(
            m,
            vec![
                Move {
                    port: 0,
                    from: 0,
                    to: 1
                },
                Move {
                    port: 2,
                    from: 1,
                    to: 0
                }
            ]
        );
    }

    #[test]
    fn independent_pairs_spread_over_the_workers() {
        let mut a = Affinity::default();
        // 0-1 and 2-3, each split across the two workers; 0-1 is the busier.
        talk(&mut a, Peer::Port(0), Peer::Port(1), 900);
        talk(&mut a, Peer::Port(2), Peer::Port(3), 600);
        let own = owners(&[1, 0, 1, 0]);
        let m = a.plan(&own, 2, at(0));
        let mut own = own;
        for mv in &m {
            assert_eq!(own[mv.port as usize], Some(mv.from));
            own[mv.port as usize] = Some(mv.to);
        }
        assert_eq!(own[0], own[1], "{m:?}");
        assert_eq!(own[2], own[3], "{m:?}");
        assert_ne!(own[0], own[2], "{m:?}");
        assert_eq!(m.len(), 2, "one port of each pair moves: {m:?}");
    }

    #[test]
    fn two_pairs_on_one_worker_are_rebalanced_once() {
        let mut a = Affinity::default();
        let own = owners(&[0, 0, 0, 0]);
        talk(&mut a, Peer::Port(0), Peer::Port(1), 800);
        talk(&mut a, Peer::Port(2), Peer::Port(3), 700);
        let m = a.plan(&own, 2, at(0));
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m.iter().all(|mv| mv.from == 0 && mv.to == 1));
        let moved: Vec<u32> = m.iter().map(|mv| mv.port).collect();
        assert!(
            moved == [0, 1] || moved == [2, 3],
            "a whole pair moves: {moved:?}"
        );
        // Balanced afterwards: the same traffic plans nothing, at any time.
        let mut own = own;
        for mv in &m {
            own[mv.port as usize] = Some(mv.to);
        }
        for t in [1000, 5000] {
            talk(&mut a, Peer::Port(0), Peer::Port(1), 800);
            talk(&mut a, Peer::Port(2), Peer::Port(3), 700);
            assert!(a.plan(&own, 2, at(t)).is_empty());
        }
    }

    #[test]
    fn one_pair_alone_stays_where_it_is() {
        let mut a = Affinity::default();
        talk(&mut a, Peer::Port(0), Peer::Port(1), 5000);
        talk(&mut a, Peer::Port(2), Peer::Port(3), 10);
        assert!(a.plan(&owners(&[0, 0, 1, 1]), 2, at(0)).is_empty());
    }

    #[test]
    fn a_port_talking_to_the_uplink_goes_to_worker_0() {
        let mut a = Affinity::default();
        talk(&mut a, Peer::Port(2), Peer::Uplink, 400);
        talk(&mut a, Peer::Uplink, Peer::Port(2), 400);
        // Even with worker 0 busier than worker 1.
        talk(&mut a, Peer::Port(0), Peer::Port(1), 5000);
        let m = a.plan(&owners(&[0, 0, 1]), 2, at(0));
        assert_eq!(
            m,
            vec![Move {
                port: 2,
                from: 1,
                to: 0
            }]
        );
    }

    #[test]
    fn a_peer_of_a_port_on_the_uplink_follows_it_to_worker_0() {
        // 1 forwards for 0 (a chain): 0 -> 1 -> uplink.
        let mut a = Affinity::default();
        talk(&mut a, Peer::Port(0), Peer::Port(1), 500);
        talk(&mut a, Peer::Port(1), Peer::Uplink, 2000);
        let m = a.plan(&owners(&[1, 1]), 2, at(0));
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m.iter().all(|mv| mv.to == 0));
    }

    #[test]
    fn no_clear_majority_or_too_few_frames_moves_nothing() {
        let mut a = Affinity::default();
        talk(&mut a, Peer::Port(0), Peer::Port(1), 300);
        talk(&mut a, Peer::Port(0), Peer::Port(2), 300);
        talk(&mut a, Peer::Port(1), Peer::Port(3), 2000);
        talk(&mut a, Peer::Port(2), Peer::Port(4), 2000);
        // 0 has no two-thirds peer; 1-3 and 2-4 are each together already.
        assert!(a.plan(&owners(&[0, 0, 1, 0, 1]), 2, at(0)).is_empty());
        let mut a = Affinity::default();
        talk(
            &mut a,
            Peer::Port(0),
            Peer::Port(1),
            (MIN_FRAMES / 2) as u32,
        );
        assert!(a.plan(&owners(&[1, 0]), 2, at(0)).is_empty());
    }

    #[test]
    fn a_moved_port_dwells_before_moving_again() {
        let mut a = Affinity::default();
        // 0-1 split over idle workers: 0 joins 1 on worker 0.
        talk(&mut a, Peer::Port(0), Peer::Port(1), 500);
        let mut own = owners(&[1, 0, 1, 0, 0]);
        let m = a.plan(&own, 2, at(0));
        assert_eq!(
            m,
            vec![Move {
                port: 0,
                from: 1,
                to: 0
            }]
        );
        own[0] = Some(0);
        // Then 0 talks to 2 on worker 1, and 3-4 keep worker 0 busy: 0 belongs on worker 1,
        // but only once its dwell is over.
        let next = |a: &mut Affinity, t| {
            talk(a, Peer::Port(0), Peer::Port(2), 500);
            talk(a, Peer::Port(3), Peer::Port(4), 5000);
            a.plan(&own, 2, at(t))
        };
        assert!(next(&mut a, 500).is_empty());
        assert!(next(&mut a, DWELL.total_millis() as i64 - 1).is_empty());
        assert_eq!(
            next(&mut a, DWELL.total_millis() as i64),
            vec![Move {
                port: 0,
                from: 0,
                to: 1
            }]
        );
    }

    #[test]
    fn floods_and_self_answers_are_not_counted() {
        let mut a = Affinity::default();
        let mut o = Outputs::default();
        o.note(Peer::Port(1));
        o.note(Peer::Port(2));
        let mut me = Outputs::default();
        me.note(Peer::Port(0));
        for _ in 0..1000 {
            a.frame(Peer::Port(0), &o);
            a.frame(Peer::Port(0), &me);
        }
        assert!(a.plan(&owners(&[1, 0, 0]), 2, at(0)).is_empty());
    }

    #[test]
    fn one_worker_or_detached_peers_plan_nothing() {
        let mut a = Affinity::default();
        talk(&mut a, Peer::Port(0), Peer::Port(1), 500);
        assert!(a.plan(&owners(&[0, 0]), 1, at(0)).is_empty());
        talk(&mut a, Peer::Port(0), Peer::Port(1), 500);
        assert!(a.plan(&[Some(1), None], 2, at(0)).is_empty());
    }

    #[test]
    fn the_tally_keeps_exact_totals_and_the_big_peers() {
        let mut t = Tally::default();
        for i in 0..1000u32 {
            t.add(7);
            t.add(100 + i % 9);
        }
        assert_eq!(t.total(), 2000);
        assert_eq!(t.top().map(|(p, _)| p), Some(7));
    }
}
