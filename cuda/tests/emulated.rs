//! The CUDA kernels' own source, run on the host through the emulation, against the plain
//! Rust reference: grouped and multi-query heads, head dimensions that do not divide the
//! threads, shuffled block tables, windows and bidirectional spans as key ranges, soft-caps,
//! half and f32 caches, rows longer than a chunk (scores computed twice) and shorter.
//!
//! Tolerances: f32 caches 1e-5 (the kernel sums its exponentials per thread and then across
//! the block, the reference in key order: measured differences are a few 1e-7); half caches
//! 1e-3, where a probability that falls within a rounding of a half-precision step can round
//! the other way (one step is 2^-11 of it).

use half::f16;
use kiln_cuda_kernels::{attention, emulated, write_cache, AttentionShape, CacheSlots, CacheValue, KernelError, KeyRanges, Launch, Scoring, NO_BLOCK};

/// xorshift64*: reproducible values without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Sequences of the given lengths in a cache of shuffled blocks (with spare blocks between
/// them), and each sequence's tail of `new` rows (prefill when `new` is the length, decode
/// when 1) seeing positions from its window or span.
struct Case {
    shape: AttentionShape,
    ranges: KeyRanges,
}

/// `heads` is (query heads, key/value heads, head dimension).
fn case(rng: &mut Rng, (heads, kv_heads, head_dim): (usize, usize, usize), block_size: usize, seqs: &[(usize, usize)], window: Option<usize>, bidirectional: bool) -> Case {
    let max_blocks = seqs.iter().map(|&(len, _)| len.div_ceil(block_size)).max().unwrap_or(1) + 1;
    let total_blocks = seqs.len() * max_blocks + 3;
    let mut order: Vec<u32> = (0..total_blocks as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let shape = AttentionShape { heads, kv_heads, head_dim, block_size, slots: total_blocks * block_size };
    let mut tables = vec![NO_BLOCK; seqs.len() * max_blocks];
    let mut next = order.into_iter();
    let (mut row_seq, mut row_lo, mut row_hi) = (vec![], vec![], vec![]);
    for (s, &(len, new)) in seqs.iter().enumerate() {
        for b in 0..len.div_ceil(block_size) {
            tables[s * max_blocks + b] = next.next().expect("enough blocks");
        }
        for pos in len - new..len {
            // A bidirectional span: rows of the middle third see each other.
            let span = bidirectional && (len / 3..2 * len / 3).contains(&pos);
            let hi = if span { 2 * len / 3 } else { pos + 1 };
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            row_seq.push(s as u32);
            row_lo.push(lo as u32);
            row_hi.push(hi as u32);
        }
    }
    let ranges = KeyRanges::new(tables, max_blocks, row_seq, row_lo, row_hi, shape).expect("valid ranges");
    Case { shape, ranges }
}

fn values<T: CacheValue>(rng: &mut Rng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.uniform())).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check<T: CacheValue>(c: &Case, scoring: Scoring, launch: Launch, seed: u64, tolerance: f32) -> f32 {
    let mut rng = Rng(seed);
    let q: Vec<f32> = (0..c.ranges.rows() * c.shape.q_width()).map(|_| rng.uniform() * 2.0).collect();
    let k: Vec<T> = values(&mut rng, c.shape.slots * c.shape.kv_width());
    let v: Vec<T> = values(&mut rng, c.shape.slots * c.shape.kv_width());
    let reference = attention(&c.ranges, &scoring, &q, &k, &v).expect("reference");
    let kernel = emulated::attention(&c.ranges, &scoring, &q, &k, &v, launch).expect("kernel");
    assert!(kernel.iter().all(|x| x.is_finite()), "the kernel left values unwritten or not finite");
    let diff = max_diff(&reference, &kernel);
    eprintln!("{:?} half={} {launch:?}: max difference {diff:e}", c.shape, T::HALF);
    assert!(diff <= tolerance, "{:?} {scoring:?} {launch:?}: kernel and reference differ by {diff}", c.shape);
    // Each output is a convex combination of values in [-1, 1]; a zero output everywhere
    // would mean nothing was summed.
    assert!(reference.iter().any(|x| x.abs() > 1e-3));
    diff
}

const PLAIN: Scoring = Scoring { scale: 0.25, softcap: None, half_rounding: false };

#[test]
fn grouped_heads_prefill_and_decode_in_one_call() {
    let mut rng = Rng(1);
    // Two sequences prefilling, two decoding, 3 queries per key/value head.
    let c = case(&mut rng, (6, 2, 16), 4, &[(9, 9), (13, 1), (6, 6), (21, 1)], None, false);
    for launch in [Launch { threads: 32, chunk: 4096 }, Launch { threads: 64, chunk: 5 }, Launch { threads: 128, chunk: 7 }] {
        check::<f32>(&c, PLAIN, launch, 10, 1e-5);
        check::<f16>(&c, Scoring { half_rounding: true, ..PLAIN }, launch, 11, 1e-3);
    }
}

#[test]
fn multi_query_and_odd_head_dimensions() {
    let mut rng = Rng(2);
    // One key/value head for 5 query heads; 24 and 40 values per head (not a multiple of
    // the threads); blocks of 16 slots.
    for head_dim in [24, 40] {
        let c = case(&mut rng, (5, 1, head_dim), 16, &[(37, 37), (50, 1)], None, false);
        check::<f32>(&c, PLAIN, Launch { threads: 32, chunk: 16 }, 20, 1e-5);
        check::<f16>(&c, Scoring { half_rounding: true, ..PLAIN }, Launch { threads: 64, chunk: 4096 }, 21, 1e-3);
    }
}

#[test]
fn widest_heads_use_every_dimension_slot_of_a_thread() {
    let mut rng = Rng(3);
    // Gemma 3's 256 values per head over 32 threads: 8 dimensions each.
    let c = case(&mut rng, (4, 1, 256), 16, &[(20, 20), (33, 1)], None, false);
    check::<f16>(&c, Scoring { scale: 0.0625, softcap: None, half_rounding: true }, Launch { threads: 32, chunk: 4096 }, 30, 1e-3);
    check::<f32>(&c, Scoring { scale: 0.0625, softcap: None, half_rounding: false }, Launch { threads: 128, chunk: 3 }, 31, 1e-5);
}

#[test]
fn sliding_windows_and_bidirectional_spans_are_key_ranges() {
    let mut rng = Rng(4);
    let windowed = case(&mut rng, (4, 2, 32), 4, &[(30, 30), (41, 1)], Some(8), false);
    check::<f32>(&windowed, PLAIN, Launch { threads: 64, chunk: 3 }, 40, 1e-5);
    check::<f16>(&windowed, Scoring { half_rounding: true, ..PLAIN }, Launch::default(), 41, 1e-3);
    let spans = case(&mut rng, (4, 2, 32), 4, &[(24, 24)], None, true);
    check::<f32>(&spans, PLAIN, Launch { threads: 32, chunk: 5 }, 42, 1e-5);
}

#[test]
fn soft_capped_scores() {
    let mut rng = Rng(5);
    let c = case(&mut rng, (8, 4, 32), 8, &[(19, 19), (40, 1)], None, false);
    // A large scale and a cap of 2 saturate the tanh: a missing cap changes the result.
    let capped = Scoring { scale: 3.0, softcap: Some(2.0), half_rounding: false };
    check::<f32>(&c, capped, Launch { threads: 64, chunk: 6 }, 50, 1e-5);
    check::<f16>(&c, Scoring { half_rounding: true, ..capped }, Launch { threads: 32, chunk: 4096 }, 51, 1e-3);
    let mut rng = Rng(50);
    let q: Vec<f32> = (0..c.ranges.rows() * c.shape.q_width()).map(|_| rng.uniform() * 2.0).collect();
    let (k, v): (Vec<f32>, Vec<f32>) = (values(&mut rng, c.shape.slots * c.shape.kv_width()), values(&mut rng, c.shape.slots * c.shape.kv_width()));
    // (The reference, which the kernel was just held to.)
    let uncapped = attention(&c.ranges, &Scoring { softcap: None, ..capped }, &q, &k, &v).unwrap();
    let with_cap = attention(&c.ranges, &capped, &q, &k, &v).unwrap();
    assert!(max_diff(&uncapped, &with_cap) > 1e-2, "the soft-cap made no difference");
}

#[test]
fn cache_writes_land_in_their_slots() {
    let mut rng = Rng(6);
    let (width, slots) = (48, 40);
    let rows = CacheSlots::new(vec![7, 0, 39, 12, 13], slots).unwrap();
    let src: Vec<f32> = (0..rows.slots().len() * width).map(|_| rng.uniform() * 100.0).collect();
    let mut by_kernel = vec![f16::from_f32(-1.0); slots * width];
    let mut by_reference = by_kernel.clone();
    emulated::write_cache(&mut by_kernel, width, &src, &rows).unwrap();
    write_cache(&mut by_reference, width, &src, &rows).unwrap();
    assert_eq!(by_kernel, by_reference);
    assert_eq!(by_kernel[39 * width + 5], f16::from_f32(src[2 * width + 5]));
    assert_eq!(by_kernel[width], f16::from_f32(-1.0), "slot 1 was not written");
    let mut full = vec![0.0f32; slots * width];
    emulated::write_cache(&mut full, width, &src, &rows).unwrap();
    assert_eq!(&full[12 * width..13 * width], &src[3 * width..4 * width]);
}

#[test]
fn what_the_kernels_cannot_run_is_refused() {
    let shape = AttentionShape { heads: 4, kv_heads: 2, head_dim: 16, block_size: 4, slots: 16 };
    let err = |r: Result<KeyRanges, KernelError>| r.map(|_| ()).unwrap_err().to_string();
    // A row reading a position whose block is missing, or past the cache.
    let e = err(KeyRanges::new(vec![0, NO_BLOCK], 2, vec![0], vec![0], vec![6], shape));
    assert!(e.contains("query row 0: reads block 1 of its table, which holds no block"), "{e}");
    let e = err(KeyRanges::new(vec![0, 4], 2, vec![0], vec![0], vec![6], shape));
    assert!(e.contains("block 4 for a cache of 16 slots"), "{e}");
    let e = err(KeyRanges::new(vec![0, 1], 2, vec![1], vec![0], vec![2], shape));
    assert!(e.contains("sequence 1 of 1"), "{e}");
    let e = err(KeyRanges::new(vec![0, 1], 2, vec![0], vec![3], vec![3], shape));
    assert!(e.contains("sees no keys"), "{e}");
    let e = err(KeyRanges::new(vec![0, 1], 2, vec![0], vec![0], vec![9], shape));
    assert!(e.contains("past its table of 2 blocks"), "{e}");
    let e = err(KeyRanges::new(vec![0, 1], 2, vec![0], vec![0, 1], vec![2], shape));
    assert!(e.contains("row_lo: 2 values where 1 were expected"), "{e}");
    let e = err(KeyRanges::new(vec![0, 1], 2, vec![0], vec![0], vec![2], AttentionShape { heads: 3, ..shape }));
    assert!(e.contains("3 heads do not share 2 key/value heads evenly"), "{e}");

    let ranges = KeyRanges::new(vec![0, 1], 2, vec![0], vec![0], vec![5], shape).unwrap();
    let (q, kv) = (vec![0.0f32; 64], vec![0.0f32; 16 * 32]);
    let e = emulated::attention(&ranges, &PLAIN, &q[..63], &kv, &kv, Launch::default()).unwrap_err().to_string();
    assert!(e.contains("queries: 63 values where 64 were expected"), "{e}");
    let e = emulated::attention(&ranges, &PLAIN, &q, &kv[1..], &kv, Launch::default()).unwrap_err().to_string();
    assert!(e.contains("key cache"), "{e}");
    let e = emulated::attention(&ranges, &PLAIN, &q, &kv, &kv, Launch { threads: 48, chunk: 8 }).unwrap_err().to_string();
    assert!(e.contains("48 threads per block"), "{e}");
    let wide = KeyRanges::new(vec![0, 1], 2, vec![0], vec![0], vec![5], AttentionShape { head_dim: 257, kv_heads: 4, slots: 8, ..shape }).unwrap();
    let (q, kv) = (vec![0.0f32; 4 * 257], vec![0.0f32; 8 * 4 * 257]);
    let e = emulated::attention(&wide, &PLAIN, &q, &kv, &kv, Launch { threads: 32, chunk: 8 }).unwrap_err().to_string();
    assert!(e.contains("head dimension 257 is over 8 per thread of 32"), "{e}");

    let mut cache = vec![0.0f32; 4 * 8];
    let e = CacheSlots::new(vec![1, 1], 4).unwrap_err().to_string();
    assert!(e.contains("slot 1 written twice"), "{e}");
    let e = CacheSlots::new(vec![4], 4).unwrap_err().to_string();
    assert!(e.contains("slot 4 of a cache of 4"), "{e}");
    let one = CacheSlots::new(vec![0], 4).unwrap();
    let e = write_cache(&mut cache, 8, &[0.0; 9], &one).unwrap_err().to_string();
    assert!(e.contains("9 values where 8 were expected"), "{e}");
    // Slots checked against one cache do not pass for another of a different size.
    let e = emulated::write_cache(&mut cache[..24], 8, &[0.0; 8], &one).unwrap_err().to_string();
    assert!(e.contains("a cache of 24 values is not 4 slots of 8"), "{e}");
}
