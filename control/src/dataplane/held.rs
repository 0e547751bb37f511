//! Writes held back until a worker has released the pipeline lock.
//!
//! The common case, one frame read and written out again (forwarded as is, or rewritten in
//! place by the NAT), leaves from the worker's own read buffer: the pipeline's transmit
//! callback notes where it is and the worker writes it once the lock is released, so the
//! kernel copy (and, for a tap, the receiving namespace's stack work done in our context)
//! runs in parallel with the other workers. This is sound because the pipeline never
//! changes bytes of its input frame after it has handed them to the callback (see the
//! invariant at `Pipeline::from_port`; `pipeline_gso_tests` checks it on every path that
//! rewrites in place).
//!
//! Once one output is held, every later output of the same input is held too (a frame the
//! pipeline made itself, an ARP answer or an ICMP error, is copied), so outputs leave in the
//! order the pipeline emitted them. An output that comes before anything is held is written
//! at once, under the lock, as with one thread.

use std::ops::Range;

use switchyard_switch::gso::VnetHdr;

use crate::pipeline::Out;

/// Where a held frame's bytes are.
#[derive(Clone, Debug)]
enum Src {
    /// A range of the input frame (the read buffer).
    Input(Range<usize>),
    /// A range of [`Held::copies`].
    Copy(Range<usize>),
}

/// The outputs of one input frame still to be written, in emission order.
#[derive(Default)]
pub(crate) struct Held {
    list: Vec<(Out, Src, Option<VnetHdr>)>,
    copies: Vec<u8>,
    /// The input frame's address range.
    input: Range<usize>,
}

impl Held {
    /// Start holding for a new input frame.
    pub(crate) fn begin(&mut self, input: &[u8]) {
        self.list.clear();
        self.copies.clear();
        let a = input.as_ptr() as usize;
        self.input = a..a + input.len();
    }

    /// Offered an output: true when it is held (to be written by [`Self::drain`]), false when
    /// the caller must write it now.
    pub(crate) fn hold(&mut self, out: Out, frame: &[u8], hdr: Option<&VnetHdr>) -> bool {
        let a = frame.as_ptr() as usize;
        let src = if a >= self.input.start && a + frame.len() <= self.input.end {
            let off = a - self.input.start;
            Src::Input(off..off + frame.len())
        } else if !self.list.is_empty() {
            let s = self.copies.len();
            self.copies.extend_from_slice(frame);
            Src::Copy(s..self.copies.len())
        } else {
            return false;
        };
        self.list.push((out, src, hdr.copied()));
        true
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The held outputs in order; `input` is the input frame as the pipeline left it.
    pub(crate) fn iter<'a>(
        &'a self,
        input: &'a [u8],
    ) -> impl Iterator<Item = (Out, &'a [u8], Option<&'a VnetHdr>)> + 'a {
        self.list.iter().map(move |(o, src, h)| {
            let f = match src {
                Src::Input(r) => &input[r.clone()],
                Src::Copy(r) => &self.copies[r.clone()],
            };
            (*o, f, h.as_ref())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_switch::PortId;

    #[test]
    fn input_frames_are_held_and_later_copies_keep_the_order() {
        let input = vec![1u8, 2, 3, 4, 5, 6];
        let other = vec![9u8, 9];
        let mut h = Held::default();
        h.begin(&input);
        assert!(h.hold(Out::Port(PortId(3)), &input[1..4], None));
        // Made elsewhere, after something was held: copied, held behind it.
        assert!(h.hold(Out::Uplink, &other, None));
        assert!(h.hold(Out::Port(PortId(4)), &input, None));
        let got: Vec<_> = h.iter(&input).map(|(o, f, _)| (o, f.to_vec())).collect();
        assert_eq!(
            got,
            vec![
                (Out::Port(PortId(3)), vec![2, 3, 4]),
                (Out::Uplink, vec![9, 9]),
                (Out::Port(PortId(4)), input.clone()),
            ]
        );
    }

    #[test]
    fn a_first_output_made_elsewhere_is_written_at_once() {
        let input = vec![0u8; 8];
        let other = vec![7u8; 8];
        let mut h = Held::default();
        h.begin(&input);
        assert!(!h.hold(Out::Uplink, &other, None));
        assert!(h.is_empty());
        // Begin forgets the previous frame's outputs.
        assert!(h.hold(Out::Uplink, &input, None));
        h.begin(&other);
        assert!(h.is_empty());
    }
}
