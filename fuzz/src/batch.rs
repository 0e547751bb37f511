//! The NAT's batch entry points (`Router::handle_batch_from_*`) against one frame at a time:
//! two routers of the same topology fed the same frames, one in runs through the batch entry
//! point, the other frame by frame through `handle_from_*`. The batch path promises exactly
//! the single-frame results (its prefetch pipeline and hashed-key hints are hints only), so
//! after every run both must agree on the verdicts, the frames emitted (bytes, egress, order,
//! virtio-net headers), the counters and the conntrack table.

use switchyard_nat::{Emits, Router, RxMeta, UplinkConfig, Verdict};
use switchyard_switch::{Instant, NetworkId};

/// Frames per run at most: several times the pipeline's depth (8), so that runs reach its
/// steady state, and short enough that one input has many runs.
pub const RUN_MAX: usize = 40;

/// Where a run enters: a network's router port, or the uplink (`None`).
type Ingress = Option<NetworkId>;

pub struct Twins {
    batch: Router,
    single: Router,
    /// The pending run's ingress, metadata and time (every frame of a run shares them, as
    /// the batch entry points take one of each).
    run: Option<(Ingress, RxMeta, Instant)>,
    frames: Vec<Vec<u8>>,
    out_batch: Emits,
    out_single: Emits,
    verdicts: Vec<Verdict>,
}

impl Twins {
    /// `make` builds the router; it is called twice and must build the same one both times.
    pub fn new(mut make: impl FnMut() -> Router) -> Self {
        Twins {
            batch: make(),
            single: make(),
            run: None,
            frames: Vec::new(),
            out_batch: Emits::new(),
            out_single: Emits::new(),
            verdicts: Vec::new(),
        }
    }

    /// A frame for the run: it joins the pending one when it enters the same way with the
    /// same metadata, else that run is checked first and a new one starts at `now`.
    pub fn push(&mut self, ingress: Ingress, meta: RxMeta, now: Instant, frame: &[u8]) {
        let same = self
            .run
            .is_some_and(|(i, m, _)| i == ingress && m.partial_csum == meta.partial_csum);
        if !same || self.frames.len() >= RUN_MAX {
            self.flush();
        }
        if self.run.is_none() {
            self.run = Some((ingress, meta, now));
        }
        self.frames.push(frame.to_vec());
    }

    /// Housekeeping on both, after the pending run.
    pub fn expire(&mut self, now: Instant) {
        self.flush();
        self.batch.expire(now);
        self.single.expire(now);
    }

    /// An uplink mode change on both (see the nat target's `MODE_OP`), after the pending run.
    pub fn set_mode(&mut self, raw: Option<UplinkConfig>, host: bool) {
        self.flush();
        for r in [&mut self.batch, &mut self.single] {
            r.set_uplink(raw);
            r.set_host_uplink(host);
        }
    }

    /// Run the pending frames through both routers and check that they agree.
    pub fn flush(&mut self) {
        let Some((ingress, meta, now)) = self.run.take() else {
            return;
        };
        let frames: Vec<&[u8]> = self.frames.iter().map(Vec::as_slice).collect();
        self.out_batch.clear();
        self.out_single.clear();
        self.verdicts.clear();
        let (a, b) = (&mut self.batch, &mut self.single);
        let (oa, ob) = (&mut self.out_batch, &mut self.out_single);
        match ingress {
            Some(net) => {
                a.handle_batch_from_network(net, &frames, meta, now, oa, &mut self.verdicts)
            }
            None => a.handle_batch_from_uplink(&frames, meta, now, oa, &mut self.verdicts),
        }
        let single: Vec<Verdict> = frames
            .iter()
            .map(|f| match ingress {
                Some(net) => b.handle_from_network(net, f, meta, now, ob),
                None => b.handle_from_uplink(f, meta, now, ob),
            })
            .collect();
        assert_eq!(
            self.verdicts, single,
            "batch and single-frame verdicts differ"
        );
        assert_eq!(
            oa.len(),
            ob.len(),
            "batch and single frames emit differently many"
        );
        for (i, (x, y)) in oa.iter_offloaded().zip(ob.iter_offloaded()).enumerate() {
            assert_eq!(
                x, y,
                "emitted frame {i} differs between batch and single frames"
            );
        }
        assert_eq!(a.counters(), b.counters(), "counters differ");
        assert_eq!(a.conntrack(now), b.conntrack(now), "conntrack differs");
        assert_eq!(a.poll_timeout(), b.poll_timeout(), "next expiry differs");
        self.frames.clear();
    }
}
