//! Bounded busy polling: after a round that moved frames, the loop polls without sleeping for a
//! short window, so a reply that follows a request within microseconds is taken without the
//! thread going to sleep in `epoll_wait` and being woken and scheduled again. The window only
//! opens on work, so an idle dataplane blocks; it never extends itself, so a quiet period costs
//! at most one window of CPU.

use std::time::{Duration, Instant};

/// When the loop may spin instead of blocking. Pure: callers pass `now`.
#[derive(Debug, Clone)]
pub struct BusyPoll {
    window: Duration,
    until: Option<Instant>,
}

impl BusyPoll {
    /// `window` zero turns busy polling off.
    pub fn new(window: Duration) -> BusyPoll {
        BusyPoll {
            window,
            until: None,
        }
    }

    /// Record a finished round: one that did work (re)opens the window from `now`.
    pub fn round(&mut self, did_work: bool, now: Instant) {
        if did_work && !self.window.is_zero() {
            self.until = Some(now + self.window);
        }
    }

    /// The poll timeout: zero while the window is open, else `blocking` (the time until the
    /// next timer). Closes the window once it has passed.
    pub fn timeout(&mut self, blocking: Duration, now: Instant) -> Duration {
        match self.until {
            Some(t) if now < t => Duration::ZERO,
            _ => {
                self.until = None;
                blocking
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: Duration = Duration::from_millis(500);

    #[test]
    fn off_always_blocks() {
        let t0 = Instant::now();
        let mut b = BusyPoll::new(Duration::ZERO);
        b.round(true, t0);
        assert_eq!(b.timeout(BLOCK, t0), BLOCK);
    }

    #[test]
    fn idle_never_spins() {
        let t0 = Instant::now();
        let mut b = BusyPoll::new(Duration::from_micros(50));
        for i in 0..10 {
            let now = t0 + Duration::from_micros(i);
            b.round(false, now);
            assert_eq!(b.timeout(BLOCK, now), BLOCK);
        }
    }

    #[test]
    fn work_opens_a_bounded_window() {
        let t0 = Instant::now();
        let w = Duration::from_micros(50);
        let mut b = BusyPoll::new(w);
        b.round(true, t0);
        assert_eq!(b.timeout(BLOCK, t0), Duration::ZERO);
        // Empty rounds inside the window keep spinning but do not stretch it.
        let mid = t0 + Duration::from_micros(30);
        b.round(false, mid);
        assert_eq!(b.timeout(BLOCK, mid), Duration::ZERO);
        let end = t0 + w;
        b.round(false, end);
        assert_eq!(b.timeout(BLOCK, end), BLOCK);
        // Closed: later empty rounds block too.
        let later = end + Duration::from_micros(1);
        b.round(false, later);
        assert_eq!(b.timeout(BLOCK, later), BLOCK);
    }

    #[test]
    fn work_restarts_the_window() {
        let t0 = Instant::now();
        let w = Duration::from_micros(50);
        let mut b = BusyPoll::new(w);
        b.round(true, t0);
        let t1 = t0 + Duration::from_micros(40);
        b.round(true, t1);
        let t2 = t0 + Duration::from_micros(80);
        assert_eq!(b.timeout(BLOCK, t2), Duration::ZERO);
        let t3 = t1 + w;
        assert_eq!(b.timeout(BLOCK, t3), BLOCK);
    }

    #[test]
    fn a_nearer_timer_still_wins_when_blocking() {
        let t0 = Instant::now();
        let mut b = BusyPoll::new(Duration::from_micros(50));
        let soon = Duration::from_micros(10);
        assert_eq!(b.timeout(soon, t0), soon);
    }
}
