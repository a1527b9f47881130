//! Safe kernel entry points given arguments that would make their vector code read or write
//! out of bounds (or two threads write one place) stop with a panic instead.

use kiln_kernels::attention::{attention, scores, AttentionParams, AttentionScratch, KvStore, SeqSpan};
use kiln_kernels::ops::{rope_apply, RopeStyle};
use kiln_kernels::{Compute, Isa};
use std::panic::{catch_unwind, AssertUnwindSafe};

fn panics(what: &str, f: impl FnOnce()) {
    let r = catch_unwind(AssertUnwindSafe(f));
    assert!(r.is_err(), "{what}: accepted");
}

#[test]
fn rope_tables_longer_than_half_the_vector_are_refused() {
    for style in [RopeStyle::Interleaved, RopeStyle::SplitHalf] {
        let (cos, sin) = (vec![1.0f32; 64], vec![0.0f32; 64]);
        panics("cos/sin of 64 over 64 values", || rope_apply(&mut [0.0f32; 64], &cos, &sin, style));
        panics("sin shorter than cos", || rope_apply(&mut [0.0f32; 128], &cos, &sin[..32], style));
        // The same call with a vector that is long enough works.
        let mut x = vec![1.0f32; 128];
        rope_apply(&mut x, &cos, &sin, style);
        assert!(x.iter().all(|&v| v == 1.0));
    }
}

#[test]
fn scores_need_queries_as_long_as_the_keys() {
    let kv = KvStore::new(16, 1, 64);
    for isa in Isa::available() {
        let mut out = vec![0.0f32; 8];
        panics("a 128-value query against 64-value keys", || scores(isa, &[0.0; 128], &kv, &[0, 1, 2, 3, 4, 5, 6, 7], 0, &mut out));
        scores(isa, &[0.0; 64], &kv, &[0, 1, 2, 3, 4, 5, 6, 7], 0, &mut out);
        eprintln!("scores: checked on {isa:?}");
    }
}

#[test]
fn kv_writes_outside_the_store_are_refused() {
    let mut kv = KvStore::new(4, 1, 8);
    let w = kv.writer();
    // SAFETY: one thread writes.
    panics("slot 4 of 4", || unsafe { w.write(4, &[0.0; 8], &[0.0; 8]) });
    // SAFETY: one thread writes.
    unsafe { w.write(3, &[1.0; 8], &[1.0; 8]) };
}

#[test]
fn attention_spans_must_be_disjoint_and_inside_the_batch() {
    let p = AttentionParams { num_heads: 2, num_kv_heads: 1, head_dim: 8, scale: 1.0, window: None, softcap: None, block_size: 4 };
    let kv = KvStore::new(16, 1, 8);
    let compute = Compute::new(2);
    let table = [0u32, 1, 2, 3];
    let q = vec![0.5f32; 4 * 16];
    let run = |spans: &[SeqSpan], rows: usize| {
        let mut out = vec![0.0f32; rows * 16];
        attention(&compute, &p, &kv, spans, &q[..rows * 16], &mut out, &mut AttentionScratch::default());
    };
    let span = |rows: std::ops::Range<usize>| SeqSpan { first_pos: 0, rows, block_table: &table, bidirectional: &[] };
    panics("overlapping spans", || run(&[span(0..2), span(1..3)], 4));
    panics("a span past the batch", || run(&[span(0..2), span(2..5)], 4));
    let bad = AttentionParams { num_heads: 3, ..p };
    panics("heads not a multiple of key/value heads", || {
        let mut out = vec![0.0f32; 16];
        attention(&compute, &bad, &kv, &[span(0..1)], &q[..16], &mut out, &mut AttentionScratch::default());
    });
    run(&[span(0..2), span(2..4)], 4);
}
