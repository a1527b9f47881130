//! attention.cu run on the host through kernels/emulate.h: every GPU thread a host thread,
//! blocks one after another. For tests: it checks the kernels' own logic (indexing, masks,
//! reductions, barriers) without a GPU, against [`crate::attention`].

use crate::{check_buffers, check_write, CacheSlots, CacheValue, KeyRanges, Launch, Result, Scoring, WRITE_THREADS};
use std::ffi::{c_float, c_int, c_uint, c_void};

extern "C" {
    fn kiln_emulate_paged_attention(
        cache_is_half: c_int,
        out: *mut c_float,
        q: *const c_float,
        k_cache: *const c_void,
        v_cache: *const c_void,
        block_tables: *const c_uint,
        row_seq: *const c_uint,
        row_lo: *const c_uint,
        row_hi: *const c_uint,
        rows: c_int,
        heads: c_int,
        kv_heads: c_int,
        head_dim: c_int,
        block_size: c_int,
        max_blocks: c_int,
        chunk: c_int,
        scale: c_float,
        softcap: c_float,
        half_rounding: c_int,
        threads: c_int,
        shared_bytes: usize,
    );
    fn kiln_emulate_write_cache(cache_is_half: c_int, cache: *mut c_void, src: *const c_float, slots: *const c_uint, rows: c_int, width: c_int, threads: c_int);
}

/// The attention kernel's result for `ranges`, run with `launch`'s threads and chunk.
pub fn attention<T: CacheValue>(ranges: &KeyRanges, scoring: &Scoring, q: &[f32], k: &[T], v: &[T], launch: Launch) -> Result<Vec<f32>> {
    let s = ranges.shape();
    check_buffers(ranges, q.len(), k.len(), v.len())?;
    launch.check(&s)?;
    let mut out = vec![0.0f32; q.len()];
    let int = |x: usize| x as c_int; // every size was checked to fit (AttentionShape::check, KeyRanges::new, Launch::check)
    // SAFETY: the buffers have the lengths the kernel reads and writes (check_buffers), every
    // position a row reads has a block inside the cache (KeyRanges::new, against this shape),
    // the head dimension fits the threads (Launch::check), and `T` is f32 or IEEE half, the
    // layouts of the kernel's `float` and `_Float16`.
    unsafe {
        kiln_emulate_paged_attention(
            c_int::from(T::HALF),
            out.as_mut_ptr(),
            q.as_ptr(),
            k.as_ptr().cast(),
            v.as_ptr().cast(),
            ranges.block_tables().as_ptr(),
            ranges.row_seq().as_ptr(),
            ranges.row_lo().as_ptr(),
            ranges.row_hi().as_ptr(),
            int(ranges.rows()),
            int(s.heads),
            int(s.kv_heads),
            int(s.head_dim),
            int(s.block_size),
            int(ranges.max_blocks()),
            int(launch.chunk),
            scoring.scale,
            scoring.softcap_arg(),
            c_int::from(scoring.half_rounding),
            int(launch.threads),
            launch.shared_bytes(&s),
        );
    }
    Ok(out)
}

/// The cache write kernel's result: row `r` of `src` into slot `slots[r]` of `cache`.
pub fn write_cache<T: CacheValue>(cache: &mut [T], width: usize, src: &[f32], slots: &CacheSlots) -> Result<()> {
    check_write(cache.len(), width, src.len(), slots)?;
    let slots = slots.slots();
    // SAFETY: every slot is inside the cache (CacheSlots::new, against the cache's slots that
    // check_write matched), `src` holds `width` values per slot (check_write), and the row
    // count fits an int (CacheSlots::new); `T` is f32 or IEEE half.
    unsafe {
        kiln_emulate_write_cache(c_int::from(T::HALF), cache.as_mut_ptr().cast(), src.as_ptr(), slots.as_ptr(), slots.len() as c_int, width as c_int, WRITE_THREADS as c_int);
    }
    Ok(())
}
