//! Causal attention over a paged KV cache held in half precision.
//!
//! Keys and values of one layer live in a pool of slots, `[slot, kv_head, head_dim]`; a
//! sequence reaches its positions through a block table (position `p` sits in slot
//! `table[p / block_size] * block_size + p % block_size`), so sequences of any length share
//! one pool without copying. The arithmetic follows llama.cpp's non-flash path: the query is
//! rounded to half precision, scores and the softmax run in f32 (its sum in f64), and the
//! probabilities are rounded to half before weighting the values.

use crate::blocks::{f16_bits_to_f32, f32_to_f16_bits};
use crate::dot::Isa;
use crate::ops::softmax_in_place;
use crate::pool::{split_range, SharedMut, ThreadPool};
use std::ops::Range;

/// K and V of one layer for every slot of the pool.
pub struct KvStore {
    k: Vec<u16>,
    v: Vec<u16>,
    num_kv_heads: usize,
    head_dim: usize,
}

impl KvStore {
    pub fn new(num_slots: usize, num_kv_heads: usize, head_dim: usize) -> KvStore {
        let len = num_slots * num_kv_heads * head_dim;
        KvStore { k: vec![0; len], v: vec![0; len], num_kv_heads, head_dim }
    }

    pub fn num_slots(&self) -> usize {
        self.k.len() / (self.num_kv_heads * self.head_dim).max(1)
    }

    fn row_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Stores one token's keys and values (`num_kv_heads * head_dim` each) in `slot`.
    pub fn write(&mut self, slot: usize, k: &[f32], v: &[f32]) {
        let n = self.row_len();
        let range = slot * n..(slot + 1) * n;
        for (dst, &x) in self.k[range.clone()].iter_mut().zip(k) {
            *dst = f32_to_f16_bits(x);
        }
        for (dst, &x) in self.v[range].iter_mut().zip(v) {
            *dst = f32_to_f16_bits(x);
        }
    }

    fn key(&self, slot: usize, kv_head: usize) -> &[u16] {
        let start = (slot * self.num_kv_heads + kv_head) * self.head_dim;
        &self.k[start..start + self.head_dim]
    }

    fn value(&self, slot: usize, kv_head: usize) -> &[u16] {
        let start = (slot * self.num_kv_heads + kv_head) * self.head_dim;
        &self.v[start..start + self.head_dim]
    }

    /// Copies slot `from` onto slot `to` (used when a shared block must be written).
    pub fn copy_slot(&mut self, from: usize, to: usize) {
        let n = self.row_len();
        self.k.copy_within(from * n..(from + 1) * n, to * n);
        self.v.copy_within(from * n..(from + 1) * n, to * n);
    }
}

#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies raw scores before the softmax.
    pub scale: f32,
    /// Sliding window: a query at position p sees keys at p - window + 1 ..= p.
    pub window: Option<usize>,
    /// Gemma 2 style score soft-capping: `cap * tanh(score / cap)`.
    pub softcap: Option<f32>,
    pub block_size: usize,
}

/// One sequence's rows in a batch: its new tokens sit at rows `rows` of `q` and `out`, at
/// positions `first_pos..first_pos + rows.len()`, and its keys are reached through `block_table`.
pub struct SeqSpan<'a> {
    pub rows: Range<usize>,
    pub first_pos: usize,
    pub block_table: &'a [u32],
}

/// Per-thread score buffers, kept between calls.
#[derive(Default)]
pub struct AttentionScratch {
    scores: Vec<Vec<f32>>,
}

/// Writes `out[row, head, :]` for every row of every span. `q` and `out` are
/// `[rows, num_heads * head_dim]`; the keys of the new tokens must already be in `kv`.
pub fn attention(
    pool: &ThreadPool,
    isa: Isa,
    p: &AttentionParams,
    kv: &KvStore,
    spans: &[SeqSpan],
    q: &[f32],
    out: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    let n_threads = pool.num_threads();
    let max_ctx = spans.iter().map(|s| s.first_pos + s.rows.len()).max().unwrap_or(0);
    scratch.scores.resize_with(n_threads, Vec::new);
    for s in &mut scratch.scores {
        if s.len() < max_ctx {
            s.resize(max_ctx, 0.0);
        }
    }
    // Work items are (span, row, head) triples, numbered in that order.
    let mut starts = Vec::with_capacity(spans.len() + 1);
    let mut total = 0usize;
    for s in spans {
        starts.push(total);
        total += s.rows.len() * p.num_heads;
    }
    starts.push(total);
    let scores = SharedMut::new(&mut scratch.scores);
    let out_ptr = SharedMut::new(out);
    let row_len = p.num_heads * p.head_dim;
    let group = p.num_heads / p.num_kv_heads.max(1);
    let work = |thread: usize| {
        // SAFETY: each thread uses only its own scratch buffer.
        let scores = unsafe { &mut scores.slice(thread..thread + 1)[0] };
        let mut q16 = vec![0u16; p.head_dim];
        let mut acc = vec![0.0f32; p.head_dim];
        for item in split_range(total, 1, n_threads, thread) {
            let si = starts.partition_point(|&s| s <= item) - 1;
            let span = &spans[si];
            let local = item - starts[si];
            let (i, head) = (local / p.num_heads, local % p.num_heads);
            let row = span.rows.start + i;
            let pos = span.first_pos + i;
            let kv_head = head / group;
            let q_row = &q[row * row_len + head * p.head_dim..][..p.head_dim];
            for (d, &x) in q16.iter_mut().zip(q_row) {
                *d = f32_to_f16_bits(x);
            }
            let first = match p.window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let n_keys = pos + 1 - first;
            let s = &mut scores[..n_keys];
            for (j, sc) in s.iter_mut().enumerate() {
                let slot = slot_of(span.block_table, p.block_size, first + j);
                let mut v = dot_f16(isa, &q16, kv.key(slot, kv_head)) * p.scale;
                if let Some(cap) = p.softcap {
                    v = cap * (v / cap).tanh();
                }
                *sc = v;
            }
            softmax_in_place(s);
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (j, &w) in s.iter().enumerate() {
                let slot = slot_of(span.block_table, p.block_size, first + j);
                let w = f16_bits_to_f32(f32_to_f16_bits(w));
                axpy_f16(isa, &mut acc, w, kv.value(slot, kv_head));
            }
            // SAFETY: every (row, head) pair is written by exactly one thread.
            let dst = unsafe { out_ptr.slice(row * row_len + head * p.head_dim..row * row_len + (head + 1) * p.head_dim) };
            dst.copy_from_slice(&acc);
        }
    };
    if total <= 1 {
        work(0);
        for t in 1..n_threads {
            work(t);
        }
    } else {
        pool.run(&work);
    }
}

#[inline]
pub fn slot_of(block_table: &[u32], block_size: usize, pos: usize) -> usize {
    block_table[pos / block_size] as usize * block_size + pos % block_size
}

fn dot_f16(isa: Isa, a: &[u16], b: &[u16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: AVX2/F16C presence is implied by `isa`; both slices have the same length.
        return unsafe { crate::x86::f16_dot(a.as_ptr(), b.as_ptr(), a.len().min(b.len())) };
    }
    let _ = isa;
    a.iter().zip(b).map(|(&x, &y)| f16_bits_to_f32(x) * f16_bits_to_f32(y)).sum()
}

fn axpy_f16(isa: Isa, acc: &mut [f32], w: f32, v: &[u16]) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: as in `dot_f16`.
        unsafe { crate::x86::axpy_f16(acc, w, v) };
        return;
    }
    let _ = isa;
    for (a, &x) in acc.iter_mut().zip(v) {
        *a += w * f16_bits_to_f32(x);
    }
}
