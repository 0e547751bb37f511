//! An in-memory port: frames pushed in one end come out of the other, for tests and benches.

use std::collections::VecDeque;

/// A bounded queue of frames. A full queue refuses (and the caller counts `TxFailed`).
#[derive(Debug)]
pub struct MemoryPort {
    queue: VecDeque<Vec<u8>>,
    capacity: usize,
}

impl MemoryPort {
    pub fn new(capacity: usize) -> Self {
        MemoryPort {
            queue: VecDeque::with_capacity(capacity.min(1024)),
            capacity,
        }
    }

    /// Queue a frame; false when the queue is full.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        if self.queue.len() >= self.capacity {
            return false;
        }
        self.queue.push_back(frame.to_vec());
        true
    }

    pub fn recv(&mut self) -> Option<Vec<u8>> {
        self.queue.pop_front()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_fifo() {
        let mut p = MemoryPort::new(2);
        assert!(p.send(b"a"));
        assert!(p.send(b"b"));
        assert!(!p.send(b"c"));
        assert_eq!(p.recv().as_deref(), Some(&b"a"[..]));
        assert_eq!(p.len(), 1);
    }
}
