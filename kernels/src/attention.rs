//! Causal attention over a paged KV cache held in half precision (or, for checkpoints
//! computed in f32, full precision).
//!
//! Keys and values of one layer live in a pool of slots, `[slot, kv_head, head_dim]`; a
//! sequence reaches its positions through a block table (position `p` sits in slot
//! `table[p / block_size] * block_size + p % block_size`), so sequences of any length share
//! one pool without copying. The arithmetic follows llama.cpp's non-flash path: the query is
//! rounded to half precision, scores and the softmax run in f32 (its sum in f64), and the
//! probabilities are rounded to half before weighting the values.

use crate::blocks::{f16_bits_to_f32, f32_to_f16_bits};
use crate::dot::Isa;
use crate::numerics::{self, exp_poly, tree16};
use crate::pool::SharedMut;
use crate::Compute;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How keys and values are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvPrecision {
    /// Half precision, with llama.cpp's roundings of queries and probabilities (the GGUF path,
    /// bit-exact with llama.cpp).
    #[default]
    Half,
    /// f32 throughout, for checkpoints whose reference computes in f32.
    Full,
}

impl KvPrecision {
    pub fn bytes(self) -> usize {
        match self {
            KvPrecision::Half => 2,
            KvPrecision::Full => 4,
        }
    }
}

/// K and V of one layer for every slot of the pool. With `Full` precision the keys and
/// values live in `kf`/`vf` and `k`/`v` stay empty, and the other way round.
pub struct KvStore {
    k: Vec<u16>,
    v: Vec<u16>,
    kf: Vec<f32>,
    vf: Vec<f32>,
    precision: KvPrecision,
    num_kv_heads: usize,
    head_dim: usize,
}

impl KvStore {
    pub fn new(num_slots: usize, num_kv_heads: usize, head_dim: usize) -> KvStore {
        Self::with_precision(num_slots, num_kv_heads, head_dim, KvPrecision::Half)
    }

    pub fn with_precision(num_slots: usize, num_kv_heads: usize, head_dim: usize, precision: KvPrecision) -> KvStore {
        let len = num_slots * num_kv_heads * head_dim;
        let (half, full) = match precision {
            KvPrecision::Half => (len, 0),
            KvPrecision::Full => (0, len),
        };
        KvStore { k: vec![0; half], v: vec![0; half], kf: vec![0.0; full], vf: vec![0.0; full], precision, num_kv_heads, head_dim }
    }

    pub fn precision(&self) -> KvPrecision {
        self.precision
    }

    pub fn num_slots(&self) -> usize {
        self.k.len().max(self.kf.len()) / (self.num_kv_heads * self.head_dim).max(1)
    }

    fn row_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Stores one token's keys and values (`num_kv_heads * head_dim` each) in `slot`.
    pub fn write(&mut self, slot: usize, k: &[f32], v: &[f32]) {
        let n = self.row_len();
        let range = slot * n..(slot + 1) * n;
        if self.precision() == KvPrecision::Full {
            self.kf[range.clone()].copy_from_slice(&k[..n]);
            self.vf[range].copy_from_slice(&v[..n]);
            return;
        }
        to_f16(&k[..n], &mut self.k[range.clone()]);
        to_f16(&v[..n], &mut self.v[range]);
    }

    /// The stored (half-precision) key of `slot` for `kv_head`.
    pub fn key_bits(&self, slot: usize, kv_head: usize) -> &[u16] {
        self.key(slot, kv_head)
    }

    /// Where the key (or value) of `kv_head` at `slot` starts in its store.
    fn offset(&self, slot: usize, kv_head: usize) -> usize {
        (slot * self.num_kv_heads + kv_head) * self.head_dim
    }

    fn key(&self, slot: usize, kv_head: usize) -> &[u16] {
        let start = self.offset(slot, kv_head);
        &self.k[start..start + self.head_dim]
    }

    fn value(&self, slot: usize, kv_head: usize) -> &[u16] {
        let start = self.offset(slot, kv_head);
        &self.v[start..start + self.head_dim]
    }

    fn key_f32(&self, slot: usize, kv_head: usize) -> &[f32] {
        let start = self.offset(slot, kv_head);
        &self.kf[start..start + self.head_dim]
    }

    /// Asks for the key and value of `kv_head` at `slot` ahead of use. A layer's cache is
    /// far larger than the CPU's caches and a sequence's slots are gathered through its block
    /// table, which the hardware prefetchers do not follow: without this, decode attention
    /// spends about 40% of its time waiting on memory (`kernels/examples/attention_speed`).
    #[inline(always)]
    fn prefetch(&self, slot: usize, kv_head: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let start = self.offset(slot, kv_head);
            // (A full-precision store keeps no half-precision rows: nothing to ask for.)
            let (Some(keys), Some(values)) = (self.k.get(start..start + self.head_dim), self.v.get(start..start + self.head_dim)) else {
                return;
            };
            let (keys, values) = (keys.as_ptr(), values.as_ptr());
            for line in (0..self.head_dim * 2).step_by(64) {
                // SAFETY: a prefetch never faults; both addresses lie inside this slot's row.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>((keys as *const i8).add(line));
                    _mm_prefetch::<_MM_HINT_T0>((values as *const i8).add(line));
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (slot, kv_head);
    }

    /// `prefetch` for the eight keys `ahead` past key `next` of `slots`, when asked to.
    #[inline(always)]
    fn prefetch_ahead(&self, slots: &[u32], next: usize, ahead: Option<usize>, kv_head: usize) {
        if let Some(ahead) = ahead {
            for &slot in slots.iter().skip(next + ahead).take(8) {
                self.prefetch(slot as usize, kv_head);
            }
        }
    }

    fn value_f32(&self, slot: usize, kv_head: usize) -> &[f32] {
        let start = self.offset(slot, kv_head);
        &self.vf[start..start + self.head_dim]
    }

    /// A handle through which several threads may store tokens in distinct slots at once.
    pub fn writer(&mut self) -> KvWriter<'_> {
        let row_len = self.row_len();
        let full = self.precision() == KvPrecision::Full;
        KvWriter {
            store: std::marker::PhantomData,
            k: SharedMut::new(&mut self.k),
            v: SharedMut::new(&mut self.v),
            kf: SharedMut::new(&mut self.kf),
            vf: SharedMut::new(&mut self.vf),
            full,
            row_len,
        }
    }

    /// Copies slot `from` onto slot `to` (used when a shared block must be written).
    pub fn copy_slot(&mut self, from: usize, to: usize) {
        let n = self.row_len();
        if self.precision() == KvPrecision::Full {
            self.kf.copy_within(from * n..(from + 1) * n, to * n);
            self.vf.copy_within(from * n..(from + 1) * n, to * n);
            return;
        }
        self.k.copy_within(from * n..(from + 1) * n, to * n);
        self.v.copy_within(from * n..(from + 1) * n, to * n);
    }
}

/// Writes slots of a `KvStore` from several threads; holds the store's mutable borrow.
pub struct KvWriter<'a> {
    store: std::marker::PhantomData<&'a mut KvStore>,
    k: SharedMut<u16>,
    v: SharedMut<u16>,
    kf: SharedMut<f32>,
    vf: SharedMut<f32>,
    full: bool,
    row_len: usize,
}

impl KvWriter<'_> {
    /// `KvStore::write` through a shared handle; panics when `slot` is outside the store.
    ///
    /// # Safety
    /// No two threads may write the same slot at once.
    pub unsafe fn write(&self, slot: usize, k: &[f32], v: &[f32]) {
        let n = self.row_len;
        let rows = slot * n..(slot + 1) * n;
        // SAFETY: `slice` checks the range; one writer per slot is the caller's contract.
        unsafe {
            if self.full {
                self.kf.slice(rows.clone()).copy_from_slice(&k[..n]);
                self.vf.slice(rows).copy_from_slice(&v[..n]);
                return;
            }
            to_f16(&k[..n], self.k.slice(rows.clone()));
            to_f16(&v[..n], self.v.slice(rows));
        }
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
    /// Position ranges whose queries also see the later keys of their own range (an image's
    /// tokens attend to the whole image, as Gemma 3 does); each lies inside these rows.
    pub bidirectional: &'a [Range<usize>],
}

/// Per-thread buffers, kept between calls.
#[derive(Default)]
pub struct AttentionScratch {
    threads: Vec<ThreadScratch>,
}

#[derive(Default)]
struct ThreadScratch {
    /// `[heads, keys]` of the item being computed.
    scores: Vec<f32>,
    /// Value accumulators, `[64 buckets, head_dim]` (AVX-512: `[heads, 64 buckets, 64]`);
    /// key position p goes to bucket p % 64.
    buckets: Vec<f32>,
    /// The item's queries, `[heads, head_dim]`.
    q: Vec<f32>,
    /// Cache slot of each key position attended to.
    slots: Vec<u32>,
    /// Where each attended value starts in the value store (AVX-512 path).
    value_at: Vec<usize>,
}

/// Writes `out[row, head, :]` for every row of every span. `q` and `out` are
/// `[rows, num_heads * head_dim]`; the keys of the new tokens must already be in `kv`.
pub fn attention(
    compute: &Compute,
    p: &AttentionParams,
    kv: &KvStore,
    spans: &[SeqSpan],
    q: &[f32],
    out: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    let (pool, isa) = (&compute.pool, compute.isa);
    let n_threads = pool.num_threads();
    scratch.threads.resize_with(n_threads, ThreadScratch::default);
    let row_len = p.num_heads * p.head_dim;
    check_shapes(p, kv, spans, q, out);
    let group = p.num_heads / p.num_kv_heads;
    // Query heads that share a key/value head are taken together, so each key and value is
    // widened once for all of them, unless that would leave too few items to share out.
    let rows: usize = spans.iter().map(|s| s.rows.len()).sum();
    let heads_per_item = if rows * p.num_kv_heads >= 4 * n_threads { group.max(1) } else { 1 };
    let items_per_row = p.num_heads / heads_per_item;
    // Work items are (span, row, head chunk) triples, numbered in that order.
    let mut starts = Vec::with_capacity(spans.len() + 1);
    let mut total = 0usize;
    for s in spans {
        starts.push(total);
        total += s.rows.len() * items_per_row;
    }
    starts.push(total);
    let scratch_ptr = SharedMut::new(&mut scratch.threads);
    let out_ptr = SharedMut::new(out);
    let attend_item = |item: usize, ts: &mut ThreadScratch| {
        let si = starts.partition_point(|&s| s <= item) - 1;
        let span = &spans[si];
        let local = item - starts[si];
        let (i, chunk) = (local / items_per_row, local % items_per_row);
        let heads = chunk * heads_per_item..(chunk + 1) * heads_per_item;
        let row = span.rows.start + i;
        let cols = row * row_len + heads.start * p.head_dim..row * row_len + heads.end * p.head_dim;
        // SAFETY: every (row, head) pair is claimed by exactly one thread.
        let dst = unsafe { out_ptr.slice(cols.clone()) };
        let queries = Queries { pos: span.first_pos + i, q: &q[cols], kv_head: heads.start / group };
        attend(isa, p, kv, span, &queries, ts, dst);
    };
    // Items are claimed a few at a time from a shared counter: under a causal mask later rows
    // attend to more keys, so equal shares of items would leave one thread waiting.
    let next = AtomicUsize::new(0);
    let chunk = (total / (n_threads * 32)).clamp(1, 16);
    let work = |thread: usize| {
        // SAFETY: each thread uses only its own scratch.
        let ts = unsafe { &mut scratch_ptr.slice(thread..thread + 1)[0] };
        loop {
            let first = next.fetch_add(chunk, Ordering::Relaxed);
            if first >= total {
                break;
            }
            for item in first..(first + chunk).min(total) {
                attend_item(item, ts);
            }
        }
    };
    if total <= 1 || n_threads == 1 {
        (0..n_threads).for_each(work);
    } else {
        pool.run(&work);
    }
}

/// The shapes `attention` relies on for writing from several threads: heads that divide
/// into key/value heads the store has, and spans whose rows lie inside `q` and `out` without
/// overlapping (each row is written by one thread). Panics otherwise: a caller's bug.
fn check_shapes(p: &AttentionParams, kv: &KvStore, spans: &[SeqSpan], q: &[f32], out: &[f32]) {
    let row_len = p.num_heads * p.head_dim;
    assert!(p.num_kv_heads > 0 && p.num_heads.is_multiple_of(p.num_kv_heads), "{} heads over {} key/value heads", p.num_heads, p.num_kv_heads);
    assert!(p.head_dim == kv.head_dim && p.num_kv_heads <= kv.num_kv_heads, "attention shape differs from the cache's");
    assert!(p.block_size > 0, "block size 0");
    assert!(q.len() == out.len() && out.len().is_multiple_of(row_len.max(1)), "q has {} values, out {}, rows {row_len}", q.len(), out.len());
    let rows = out.len() / row_len.max(1);
    let mut taken: Vec<&Range<usize>> = spans.iter().map(|s| &s.rows).filter(|r| !r.is_empty()).collect();
    taken.sort_by_key(|r| r.start);
    for pair in taken.windows(2) {
        assert!(pair[0].end <= pair[1].start, "spans {:?} and {:?} overlap", pair[0], pair[1]);
    }
    assert!(taken.last().is_none_or(|r| r.end <= rows), "a span reaches past the {rows} rows");
    for s in spans {
        let computed = s.first_pos..s.first_pos + s.rows.len();
        for r in s.bidirectional {
            // Later keys of a range must be in this batch, or they would be read unwritten.
            assert!(r.end <= computed.end && r.start < r.end, "bidirectional range {r:?} reaches past the rows {computed:?}");
        }
    }
}

/// Consecutive query heads of one row that read the same key/value head: their position,
/// their values (`[heads, head_dim]`) and that head.
struct Queries<'a> {
    pos: usize,
    q: &'a [f32],
    kv_head: usize,
}

/// How many keys ahead of the ones being scored their keys and values are asked for (a
/// sequence's only new row, as in decode: each of its keys is read once a step, and from
/// memory), or None when the sequence has several rows in the batch, whose keys the rows
/// share from cache. About 4 KiB of keys, which arrive while the keys before them are scored.
fn prefetch_distance(span: &SeqSpan, head_dim: usize) -> Option<usize> {
    (span.rows.len() == 1).then(|| (2048 / head_dim.max(1)).clamp(8, 32))
}

/// At most this many queries share one pass over the keys (their accumulators must fit in
/// registers).
const SHARED_QUERIES: usize = 4;

/// Query heads against their sequence's keys `first..=pos` (further inside a bidirectional
/// range); `out` is `[heads, head_dim]`.
fn attend(isa: Isa, p: &AttentionParams, kv: &KvStore, span: &SeqSpan, queries: &Queries, ts: &mut ThreadScratch, out: &mut [f32]) {
    let Queries { pos, q, kv_head } = *queries;
    let d = p.head_dim;
    let heads = q.len() / d;
    let first = match p.window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    };
    // A query inside a bidirectional range also sees the rest of the range.
    let last = span.bidirectional.iter().find(|r| r.contains(&pos)).map_or(pos, |r| r.end - 1);
    let n_keys = last + 1 - first;
    let full = kv.precision() == KvPrecision::Full;
    // Queries rounded to half precision (in half mode), held as f32 for the products.
    ts.q.clear();
    ts.q.extend_from_slice(q);
    if !full {
        round_f16(isa, &mut ts.q);
    }
    ts.slots.clear();
    let bs = p.block_size;
    let mut key = first;
    while key <= last {
        let base = span.block_table[key / bs] as usize * bs;
        let end = (key / bs + 1) * bs;
        ts.slots.extend((key..end.min(last + 1)).map(|k| (base + k % bs) as u32));
        key = end;
    }
    // The kernels below ask for keys `ahead` of the ones they score; the first ones are asked
    // for here.
    let ahead = prefetch_distance(span, d).filter(|_| !full);
    for &slot in ts.slots.iter().take(ahead.unwrap_or(0)) {
        kv.prefetch(slot as usize, kv_head);
    }
    ts.scores.resize(heads * n_keys, 0.0);
    #[cfg(target_arch = "x86_64")]
    let shared = !full && isa.avx2() && d.is_multiple_of(64);
    #[cfg(not(target_arch = "x86_64"))]
    let shared = false;
    if shared {
        #[cfg(target_arch = "x86_64")]
        for h0 in (0..heads).step_by(SHARED_QUERIES) {
            let h1 = (h0 + SHARED_QUERIES).min(heads);
            scores_shared(isa, &ts.q[h0 * d..h1 * d], d, kv, (&ts.slots, ahead), kv_head, &mut ts.scores[h0 * n_keys..h1 * n_keys]);
        }
    } else {
        for (qh, sc) in ts.q.chunks(d).zip(ts.scores.chunks_mut(n_keys)) {
            if full {
                for (o, &slot) in sc.iter_mut().zip(&ts.slots) {
                    *o = qh.iter().zip(kv.key_f32(slot as usize, kv_head)).map(|(a, b)| a * b).sum();
                }
            } else {
                scores_prefetching(isa, qh, kv, (&ts.slots, ahead), kv_head, sc);
            }
        }
    }
    for sc in ts.scores.chunks_mut(n_keys) {
        for v in sc.iter_mut() {
            *v *= p.scale;
            if let Some(cap) = p.softcap {
                *v = cap * (*v / cap).tanh();
            }
        }
        softmax_by_position(isa, sc, first);
    }
    if full {
        for (o, sc) in out.chunks_mut(d).zip(ts.scores.chunks(n_keys)) {
            o.fill(0.0);
            for (&w, &slot) in sc.iter().zip(&ts.slots) {
                for (o, &v) in o.iter_mut().zip(kv.value_f32(slot as usize, kv_head)) {
                    *o = v.mul_add(w, *o);
                }
            }
        }
        return;
    }
    // Probabilities are rounded to half precision before weighting the values.
    round_f16(isa, &mut ts.scores);
    #[cfg(target_arch = "x86_64")]
    if shared {
        return weigh_values_by_bucket(isa, d, kv, kv_head, first, ts, out);
    }
    ts.buckets.resize(64 * d, 0.0);
    for (o, sc) in out.chunks_mut(d).zip(ts.scores.chunks(n_keys)) {
        let mut touched = [false; 64];
        for (j, (&w, &slot)) in sc.iter().zip(&ts.slots).enumerate() {
            let b = (first + j) % 64;
            let acc = &mut ts.buckets[b * d..(b + 1) * d];
            // A bucket's first key starts it from zero: fma(v, w, 0), the same bits as
            // accumulating onto zeroed memory.
            fma_f16(isa, acc, w, kv.value(slot as usize, kv_head), !touched[b]);
            touched[b] = true;
        }
        fold_buckets(isa, &ts.buckets, &touched, d, o);
    }
}

/// `scores` for up to `SHARED_QUERIES` queries (`qs` is `[queries, d]`) into `out`
/// (`[queries, keys]`), eight keys at a time with every key widened once for all queries.
#[cfg(target_arch = "x86_64")]
fn scores_shared(isa: Isa, qs: &[f32], d: usize, kv: &KvStore, slots: (&[u32], Option<usize>), kv_head: usize, out: &mut [f32]) {
    fn run<const Q: usize>(isa: Isa, qs: &[f32], d: usize, kv: &KvStore, (slots, ahead): (&[u32], Option<usize>), kv_head: usize, out: &mut [f32]) {
        let n = slots.len();
        let xs: [*const f32; Q] = std::array::from_fn(|h| qs[h * d..].as_ptr());
        let mut j = 0;
        while j + 8 <= n {
            kv.prefetch_ahead(slots, j, ahead, kv_head);
            let keys: [*const u16; 8] = std::array::from_fn(|k| kv.key(slots[j + k] as usize, kv_head).as_ptr());
            // SAFETY: the caller checked AVX2 (AVX-512 for the wide form); every key and
            // query holds `d` values.
            let r = unsafe {
                if isa.vnni() {
                    crate::x86_wide::dot8_queries::<Q>(&xs, &keys, d)
                } else {
                    crate::x86::dot8_queries::<Q>(&xs, &keys, d)
                }
            };
            for (h, r) in r.iter().enumerate() {
                out[h * n + j..h * n + j + 8].copy_from_slice(r);
            }
            j += 8;
        }
        for h in 0..Q {
            scores_prefetching(isa, &qs[h * d..(h + 1) * d], kv, (&slots[j..], None), kv_head, &mut out[h * n + j..(h + 1) * n]);
        }
    }
    match qs.len() / d {
        1 => run::<1>(isa, qs, d, kv, slots, kv_head, out),
        2 => run::<2>(isa, qs, d, kv, slots, kv_head, out),
        3 => run::<3>(isa, qs, d, kv, slots, kv_head, out),
        _ => run::<4>(isa, qs, d, kv, slots, kv_head, out),
    }
}

/// The bucketed value sums of `attend`, one bucket at a time and 64 dimensions at a time so
/// that a bucket's sum stays in registers, for up to `SHARED_QUERIES` heads at once: every
/// bucket receives the same additions in the same order as there, so the results are
/// identical.
#[cfg(target_arch = "x86_64")]
fn weigh_values_by_bucket(isa: Isa, d: usize, kv: &KvStore, kv_head: usize, first: usize, ts: &mut ThreadScratch, out: &mut [f32]) {
    let n_keys = ts.slots.len();
    let heads = out.len() / d;
    ts.value_at.clear();
    ts.value_at.extend(ts.slots.iter().map(|&slot| kv.offset(slot as usize, kv_head)));
    let mut touched = [false; 64];
    for (b, t) in touched.iter_mut().enumerate() {
        *t = (b + 64 - first % 64) % 64 < n_keys;
    }
    ts.buckets.resize(SHARED_QUERIES * 64 * 64, 0.0);
    for h0 in (0..heads).step_by(SHARED_QUERIES) {
        let h1 = (h0 + SHARED_QUERIES).min(heads);
        let scores = &ts.scores[h0 * n_keys..h1 * n_keys];
        for dim in (0..d).step_by(64) {
            for b in 0..64 {
                let j0 = (b + 64 - first % 64) % 64;
                let at = &ts.value_at;
                let buckets = ts.buckets.as_mut_ptr();
                // SAFETY: AVX2 (and for the wide forms AVX-512) checked by the caller; every
                // value holds `d` halves, so
                // dimensions dim..dim + 64 are in bounds; bucket b of head h lies inside
                // `buckets` (SHARED_QUERIES * 64 blocks of 64).
                unsafe {
                    let dst = |h: usize| buckets.add((h * 64 + b) * 64);
                    let w = |h: usize| &scores[h * n_keys..(h + 1) * n_keys];
                    macro_rules! bucket_sums {
                        ($k:path) => {{
                            use $k as k;
                            match h1 - h0 {
                                1 => k::bucket_sum_queries::<1>(&[w(0)], at, j0, &kv.v, dim, [dst(0)]),
                                2 => k::bucket_sum_queries::<2>(&[w(0), w(1)], at, j0, &kv.v, dim, [dst(0), dst(1)]),
                                3 => k::bucket_sum_queries::<3>(&[w(0), w(1), w(2)], at, j0, &kv.v, dim, [dst(0), dst(1), dst(2)]),
                                _ => k::bucket_sum_queries::<4>(&[w(0), w(1), w(2), w(3)], at, j0, &kv.v, dim, [dst(0), dst(1), dst(2), dst(3)]),
                            }
                        }};
                    }
                    if isa.vnni() {
                        bucket_sums!(crate::x86_wide)
                    } else {
                        bucket_sums!(crate::x86)
                    }
                }
            }
            for h in h0..h1 {
                let buckets = &ts.buckets[(h - h0) * 4096..(h - h0 + 1) * 4096];
                fold_buckets(isa, buckets, &touched, 64, &mut out[h * d + dim..h * d + dim + 64]);
            }
        }
    }
}

/// Softmax over scores of consecutive positions starting at `first`: exponentials and
/// their sum grouped 16 at a time by absolute position (see `numerics`).
fn softmax_by_position(isa: Isa, s: &mut [f32], first: usize) {
    // Sixteen running maxima, so the scan vectorizes; the largest of them is the same value
    // a sequential scan finds (only the sign of a zero maximum may differ, which no
    // difference `s - max` below can tell).
    let mut maxima = [f32::NEG_INFINITY; 16];
    let mut chunks = s.chunks_exact(16);
    for chunk in &mut chunks {
        for (m, &v) in maxima.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    let max = chunks.remainder().iter().chain(&maxima).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f64;
    let mut lanes = [0f32; 16];
    let mut pos = first - first % 16;
    let end = first + s.len();
    while pos < end {
        if pos >= first && pos + 16 <= end {
            let chunk = &mut s[pos - first..pos - first + 16];
            for (lane, &v) in lanes.iter_mut().zip(chunk.iter()) {
                *lane = v - max;
            }
            exp16(isa, &mut lanes);
            sum += tree16(&lanes) as f64;
            chunk.copy_from_slice(&lanes);
            pos += 16;
            continue;
        }
        for (l, lane) in lanes.iter_mut().enumerate() {
            let p = pos + l;
            *lane = if p >= first && p < end { s[p - first] - max } else { f32::NEG_INFINITY };
        }
        exp16(isa, &mut lanes);
        sum += tree16(&lanes) as f64;
        for (l, lane) in lanes.iter().enumerate() {
            let p = pos + l;
            if p >= first && p < end {
                s[p - first] = *lane;
            }
        }
        pos += 16;
    }
    let inv = (1.0 / sum) as f32;
    for v in s.iter_mut() {
        *v *= inv;
    }
}

fn exp16(isa: Isa, lanes: &mut [f32; 16]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: AVX2/FMA presence is implied by `isa`.
        unsafe {
            use std::arch::x86_64::*;
            let lo = crate::x86::exp_poly8(_mm256_loadu_ps(lanes.as_ptr()));
            let hi = crate::x86::exp_poly8(_mm256_loadu_ps(lanes.as_ptr().add(8)));
            _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
        }
        return;
    }
    let _ = isa;
    for l in lanes.iter_mut() {
        *l = exp_poly(*l);
    }
}

/// `out[d] = tree16 over lanes l of (b[l] + b[32+l]) + (b[16+l] + b[48+l])` at each `d`.
fn fold_buckets(isa: Isa, buckets: &[f32], touched: &[bool; 64], d: usize, out: &mut [f32]) {
    let at = |b: usize, i: usize| if touched[b] { buckets[b * d + i] } else { 0.0 };
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() && d.is_multiple_of(8) {
        // SAFETY: AVX2 implied by `isa`; every index stays below 64 * d.
        unsafe { crate::x86::fold_buckets(buckets, touched, d, out) };
        return;
    }
    let _ = isa;
    for (i, o) in out.iter_mut().enumerate().take(d) {
        let lanes: [f32; 16] = std::array::from_fn(|l| (at(l, i) + at(32 + l, i)) + (at(16 + l, i) + at(48 + l, i)));
        *o = tree16(&lanes);
    }
}

#[inline]
pub fn slot_of(block_table: &[u32], block_size: usize, pos: usize) -> usize {
    block_table[pos / block_size] as usize * block_size + pos % block_size
}

fn to_f16(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::detect().avx2() {
        // SAFETY: F16C presence checked just above.
        unsafe { crate::x86::f32_to_f16_slice(src, dst) };
        return;
    }
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = f32_to_f16_bits(x);
    }
}

fn round_f16(isa: Isa, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: F16C presence is implied by `isa`.
        unsafe { crate::x86::round_to_f16(x) };
        return;
    }
    let _ = isa;
    for v in x.iter_mut() {
        *v = f16_bits_to_f32(f32_to_f16_bits(*v));
    }
}

/// Raw scores q·k of the keys in `slots`, for a query already rounded to half precision;
/// the same values whichever kernel computes them.
pub fn scores(isa: Isa, q: &[f32], kv: &KvStore, slots: &[u32], kv_head: usize, out: &mut [f32]) {
    scores_prefetching(isa, q, kv, (slots, None), kv_head, out)
}

/// `scores`, asking for the keys and values `ahead` keys ahead of the ones scored.
fn scores_prefetching(isa: Isa, q: &[f32], kv: &KvStore, (slots, ahead): (&[u32], Option<usize>), kv_head: usize, out: &mut [f32]) {
    // The vector kernels read `q.len()` values from each key.
    assert_eq!(q.len(), kv.head_dim, "a query of {} values against keys of {}", q.len(), kv.head_dim);
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() && q.len().is_multiple_of(64) {
        while j + 8 <= slots.len() {
            kv.prefetch_ahead(slots, j, ahead, kv_head);
            let keys: [*const u16; 8] = std::array::from_fn(|k| kv.key(slots[j + k] as usize, kv_head).as_ptr());
            // SAFETY: AVX2 implied by `isa`; every key holds `q.len()` values.
            let r = unsafe { crate::x86::dot8_f32_f16_ordered(q.as_ptr(), &keys, q.len(), isa.vnni()) };
            out[j..j + 8].copy_from_slice(&r);
            j += 8;
        }
    }
    for (o, &slot) in out[j..].iter_mut().zip(&slots[j..]) {
        *o = dot_q_f16(isa, q, kv.key(slot as usize, kv_head));
    }
}

/// `numerics::dot_f16` with the first operand already widened from half precision.
fn dot_q_f16(isa: Isa, q: &[f32], k: &[u16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: AVX2/F16C presence is implied by `isa`; both slices have the same length.
        return unsafe { crate::x86::dot_f32_f16_ordered(q.as_ptr(), k.as_ptr(), q.len().min(k.len()), isa.vnni()) };
    }
    let _ = isa;
    let q16: Vec<u16> = q.iter().map(|&x| f32_to_f16_bits(x)).collect();
    numerics::dot_f16(&q16, k)
}

/// `acc = fma(v, w, acc)` elementwise (or `fma(v, w, 0)` when `start`), `v` in half precision.
fn fma_f16(isa: Isa, acc: &mut [f32], w: f32, v: &[u16], start: bool) {
    #[cfg(target_arch = "x86_64")]
    if isa.vnni() {
        // SAFETY: AVX-512 presence is implied by `isa`.
        unsafe { crate::x86_wide::axpy_f16(acc, w, v, start) };
        return;
    }
    if isa.avx2() {
        // SAFETY: AVX2/F16C presence is implied by `isa`.
        unsafe { crate::x86::axpy_f16(acc, w, v, start) };
        return;
    }
    let _ = isa;
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = f16_bits_to_f32(x).mul_add(w, if start { 0.0 } else { *a });
    }
}
