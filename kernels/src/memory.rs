//! Large buffers the kernels stream through every step (the repacked weights) in 2 MiB pages
//! where the kernel allows it.
//!
//! With 4 KiB pages a decode step touches tens of thousands of pages, more than the TLB
//! holds, and every new page costs a page walk before its data can even be requested.
//! Linux's transparent huge pages are often enabled only for memory that asks (`madvise`
//! mode), so these buffers ask. (The KV cache was tried too and gained nothing measurable:
//! its reads wait on memory, not on page walks; see docs/perf.md.)

/// Asks for huge pages over the whole 2 MiB pages inside `buf`. Best done before the buffer is
/// first written (its pages are then faulted in large); otherwise the kernel may collapse them
/// later. Only a hint: nothing changes where the kernel does not support it.
pub fn prefer_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (first, last) = (start.next_multiple_of(HUGE), end - end % HUGE);
        if first < last {
            // SAFETY: madvise changes no memory contents; the range lies inside `buf`, which
            // this call borrows mutably, and is aligned to whole pages.
            unsafe {
                libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

#[cfg(test)]
mod tests {
    use super::prefer_huge_pages;

    #[test]
    fn advice_keeps_contents_and_accepts_any_buffer() {
        // Advice that dropped pages (MADV_DONTNEED, MADV_FREE) would read back zeros here.
        let mut big: Vec<u32> = (0..3 << 20).collect();
        prefer_huge_pages(&mut big);
        assert!(big.iter().enumerate().all(|(i, &v)| v == i as u32));
        prefer_huge_pages::<u8>(&mut []);
        let mut small = [7u8; 3];
        prefer_huge_pages(&mut small);
        assert_eq!(small, [7; 3]);
    }
}
