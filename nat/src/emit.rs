//! [`Emits`]: the frames one call produced, appended into one reusable byte arena so a warm
//! dataplane does not allocate per packet (the caller clears it between batches).

use std::ops::Range;

use switchyard_switch::gso::VnetHdr;
use switchyard_switch::NetworkId;

/// Where an emitted frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Egress {
    /// Into this network's switch, as if sent by its router port (gateway MAC to container MAC).
    Network(NetworkId),
    /// Out of the uplink interface (uplink MAC to next-hop MAC).
    Uplink,
    /// To the host-socket uplink: a bare IPv4 packet, no Ethernet header (host mode).
    Host,
}

/// Reusable output buffer of emitted Ethernet frames. A frame may carry a virtio-net header: a
/// TCP GSO super-frame translated whole, for the egress to pass on or to cut.
#[derive(Default, Debug, Clone)]
pub struct Emits {
    arena: Vec<u8>,
    frames: Vec<(Egress, Range<usize>, Option<VnetHdr>)>,
}

impl Emits {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget every frame, keeping the memory.
    pub fn clear(&mut self) {
        self.arena.clear();
        self.frames.clear();
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Every frame with its egress. A frame with a virtio-net header ([`Self::iter_offloaded`])
    /// is not a wire frame: only callers that never feed GSO frames may use this.
    pub fn iter(&self) -> impl Iterator<Item = (Egress, &[u8])> {
        self.frames
            .iter()
            .map(move |(e, r, _)| (*e, &self.arena[r.clone()]))
    }

    /// Every frame with its egress and its virtio-net header, if it is a GSO super-frame.
    pub fn iter_offloaded(&self) -> impl Iterator<Item = (Egress, &[u8], Option<&VnetHdr>)> {
        self.frames
            .iter()
            .map(move |(e, r, h)| (*e, &self.arena[r.clone()], h.as_ref()))
    }

    /// The `i`-th frame.
    pub fn get(&self, i: usize) -> Option<(Egress, &[u8])> {
        self.frames
            .get(i)
            .map(|(e, r, _)| (*e, &self.arena[r.clone()]))
    }

    /// The virtio-net header of the `i`-th frame, when it is a GSO super-frame.
    pub fn offload(&self, i: usize) -> Option<&VnetHdr> {
        self.frames.get(i).and_then(|(_, _, h)| h.as_ref())
    }

    /// Append a zeroed frame of `len` bytes and return it for the caller to fill.
    pub(crate) fn push(&mut self, egress: Egress, len: usize) -> &mut [u8] {
        self.push_offloaded(egress, len, None)
    }

    /// [`Self::push`] for a frame that goes out with a virtio-net header.
    pub(crate) fn push_offloaded(
        &mut self,
        egress: Egress,
        len: usize,
        hdr: Option<VnetHdr>,
    ) -> &mut [u8] {
        let start = self.arena.len();
        self.arena.resize(start + len, 0);
        self.frames.push((egress, start..start + len, hdr));
        &mut self.arena[start..]
    }

    /// Append a copy of `bytes` and return the copy for in-place rewriting.
    pub fn push_copy(&mut self, egress: Egress, bytes: &[u8]) -> &mut [u8] {
        self.push_copy_offloaded(egress, bytes, None)
    }

    /// [`Self::push_copy`] for a frame that goes out with a virtio-net header.
    #[inline]
    pub(crate) fn push_copy_offloaded(
        &mut self,
        egress: Egress,
        bytes: &[u8],
        hdr: Option<VnetHdr>,
    ) -> &mut [u8] {
        let start = self.arena.len();
        self.arena.extend_from_slice(bytes);
        self.frames.push((egress, start..start + bytes.len(), hdr));
        &mut self.arena[start..]
    }

    /// Drop the most recent frame (a rewrite that turned out impossible).
    pub(crate) fn pop(&mut self) {
        if let Some((_, r, _)) = self.frames.pop() {
            self.arena.truncate(r.start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_order_and_bytes() {
        let mut e = Emits::new();
        e.push_copy(Egress::Uplink, &[1, 2, 3]);
        e.push(Egress::Network(NetworkId(4)), 2)[1] = 9;
        e.push_copy(Egress::Uplink, &[7]);
        e.pop();
        let v: Vec<_> = e.iter().map(|(g, b)| (g, b.to_vec())).collect();
        assert_eq!(
            v,
            vec![
                (Egress::Uplink, vec![1, 2, 3]),
                (Egress::Network(NetworkId(4)), vec![0, 9])
            ]
        );
        e.clear();
        assert!(e.is_empty());
    }
}
