//! A cache prefetch hint, the batch path's way to overlap the conntrack misses of several
//! packets (with `hugepages`, the crate's only unsafe code).
//!
//! Why not a plain load (as `Table::warm` did before): a load that misses holds up retirement,
//! so a group of them stalls the core until the slowest returns, and the packet work behind
//! them cannot start; a prefetch retires at once and the work goes on while the line arrives.

/// Ask for the cache line holding `p` (any address: nothing is read or dereferenced).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint with no architectural effect: it never faults, for any
    // address (unmapped or null included), and reads nothing into the program. SSE, which it
    // needs, is part of the x86_64 baseline.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
