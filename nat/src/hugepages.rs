//! Transparent huge pages for the conntrack table's large buffers (with `prefetch`, the crate's
//! only unsafe code).
//!
//! With 100k flows the table is ~10 MB touched at random, so with 4 KiB pages nearly every
//! lookup also misses the TLB. Where THP is in `madvise` mode (common), a buffer only gets
//! 2 MiB pages if it asks; in `never` mode, or without THP in the kernel, asking does nothing.

use std::mem::size_of;

/// Huge page size on x86_64 and (with 4 KiB base pages) aarch64.
const HUGE: usize = 2 << 20;

/// The whole 2 MiB pages inside `[addr, addr + len)`, as `(offset from addr, length)`;
/// `None` when the range holds none (in particular, when `len` is under 2 MiB).
pub(crate) fn huge_part(addr: usize, len: usize) -> Option<(usize, usize)> {
    let start = addr.checked_add(HUGE - 1)? & !(HUGE - 1);
    let end = addr.checked_add(len)? & !(HUGE - 1);
    (end > start).then(|| (start - addr, end - start))
}

/// Ask for huge pages for `v`'s whole allocation (its spare capacity included). Best done
/// before the pages are first touched: pages already faulted in stay small until the kernel's
/// background collapse gets to them.
#[allow(clippy::ptr_arg)] // the capacity is the point
pub(crate) fn advise<T>(v: &Vec<T>) {
    let Some((off, len)) = huge_part(v.as_ptr() as usize, v.capacity() * size_of::<T>()) else {
        return;
    };
    #[cfg(target_os = "linux")]
    // SAFETY: the range is inside the allocation `v` owns (`huge_part`), so no other memory is
    // affected; MADV_HUGEPAGE only changes which page size later faults (and the kernel's
    // collapse) use for it, never its contents or its mapping. The result is ignored on
    // purpose: EINVAL where the kernel has no THP leaves the plain pages, which is correct.
    unsafe {
        libc::madvise(
            v.as_ptr().cast::<u8>().add(off) as *mut _,
            len,
            libc::MADV_HUGEPAGE,
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (off, len);
}

/// Make room for one more element like `Vec::push` would (double the capacity), advising the
/// new buffer before the old contents are copied into it, which is its first touch.
pub(crate) fn reserve_one<T>(v: &mut Vec<T>) {
    if v.len() < v.capacity() {
        return;
    }
    let mut new = Vec::with_capacity((v.capacity() * 2).max(4));
    advise(&new);
    new.append(v);
    *v = new;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_or_unaligned_ranges_get_no_advice() {
        assert_eq!(huge_part(HUGE, HUGE - 1), None);
        assert_eq!(huge_part(HUGE + 4096, HUGE), None);
        assert_eq!(
            huge_part(HUGE + 4096, 3 * HUGE),
            Some((HUGE - 4096, 2 * HUGE))
        );
        assert_eq!(huge_part(usize::MAX - 4096, 2 * HUGE), None);
    }

    proptest! {
        #[test]
        fn huge_part_is_the_aligned_inside(addr in 0usize..1 << 40, len in 0usize..1 << 26) {
            match huge_part(addr, len) {
                Some((off, n)) => {
                    prop_assert_eq!((addr + off) % HUGE, 0);
                    prop_assert_eq!(n % HUGE, 0);
                    prop_assert!(n > 0 && off + n <= len);
                    // The largest such range: less than a huge page left out either side.
                    prop_assert!(off < HUGE && len - off - n < HUGE);
                }
                None => prop_assert!(addr.div_ceil(HUGE) * HUGE + HUGE > addr + len),
            }
        }
    }

    #[test]
    fn reserve_one_keeps_the_contents_and_doubles() {
        let mut v: Vec<u64> = Vec::new();
        for i in 0..(3 * HUGE / 8) as u64 {
            let cap = v.capacity();
            reserve_one(&mut v);
            assert!(v.capacity() > v.len());
            assert!(cap == v.capacity() || v.capacity() == (cap * 2).max(4));
            v.push(i);
        }
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
    }

    /// The kernel records the advice as the `hg` flag of the mapping (`/proc/self/smaps`),
    /// whatever THP mode is set; skipped where the kernel has no THP.
    #[cfg(target_os = "linux")]
    #[test]
    fn advised_buffer_is_marked_for_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            eprintln!("skipped: no transparent huge pages in this kernel");
            return;
        }
        let v: Vec<u8> = Vec::with_capacity(8 * HUGE);
        advise(&v);
        let (off, _) = huge_part(v.as_ptr() as usize, v.capacity()).unwrap();
        let page = v.as_ptr() as usize + off;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&page);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    flags = Some(f.split_whitespace().any(|f| f == "hg"));
                }
            }
        }
        assert_eq!(flags, Some(true), "no hg flag on the advised mapping");
    }
}
