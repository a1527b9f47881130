//! kiln's own CUDA kernels (`kernels/attention.cu`): attention over the paged key/value cache,
//! read through the block table on the device (prefill and decode rows alike, grouped-query
//! heads, sliding windows and bidirectional spans as per-row key ranges, Gemma's score
//! soft-cap, llama.cpp's half-precision roundings), and the write of new keys and values into
//! their cache slots.
//!
//! Three ways to run the same contract:
//! - the PTX (feature `ptx`), launched by the worker's CUDA backend;
//! - [`attention`] and [`write_cache`] in plain Rust: the reference the kernels are checked
//!   against, and what the worker's candle backend runs on candle's CPU device, so that the
//!   worker's preparation of the kernels' arguments is checked through whole models without
//!   a GPU;
//! - [`emulated`]: the CUDA source itself, compiled for the host with every GPU thread a host
//!   thread (slow; the tests run it against the reference).
//!
//! Every entry point checks its arguments first ([`KeyRanges::new`], [`Launch::check`]): the
//! kernels trust their indices, so nothing unchecked reaches them.

pub mod emulated;
mod reference;

pub use reference::{attention, write_cache};

/// Threads per block of the attention kernel.
pub const THREADS: usize = 128;
/// Threads per block of the cache write.
pub const WRITE_THREADS: usize = 256;
/// Keys whose scores a block keeps in shared memory at once; rows with more keys compute
/// their scores twice rather than keep them in a global buffer.
pub const CHUNK: usize = 4096;
/// Output dimensions one thread accumulates (`KILN_MAX_DIMS_PER_THREAD` in the kernel).
pub const MAX_DIMS_PER_THREAD: usize = 8;

/// The kernels' names in the PTX.
pub const ATTENTION_F16: &str = "kiln_paged_attention_f16";
pub const ATTENTION_F32: &str = "kiln_paged_attention_f32";
pub const WRITE_F16: &str = "kiln_write_cache_f16";
pub const WRITE_F32: &str = "kiln_write_cache_f32";

/// The kernels as PTX for the compute capability of the build's `CUDA_COMPUTE_CAP`.
#[cfg(feature = "ptx")]
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// A block table entry that holds no block.
pub const NO_BLOCK: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("attention shape: {0}")]
    Shape(String),
    #[error("query row {row}: {what}")]
    Row { row: usize, what: String },
    #[error("{what}: {len} values where {expected} were expected")]
    Length { what: &'static str, len: usize, expected: usize },
    #[error("cache write: {0}")]
    Write(String),
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// The heads and the cache an attention call works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Slots per cache block.
    pub block_size: usize,
    /// Slots of the cache (its rows).
    pub slots: usize,
}

impl AttentionShape {
    pub fn check(&self) -> Result<()> {
        let s = self;
        if s.heads == 0 || s.kv_heads == 0 || s.head_dim == 0 || s.block_size == 0 {
            return Err(KernelError::Shape(format!("{} heads, {} key/value heads, head dimension {}, blocks of {} slots: none may be 0", s.heads, s.kv_heads, s.head_dim, s.block_size)));
        }
        if !s.heads.is_multiple_of(s.kv_heads) {
            return Err(KernelError::Shape(format!("{} heads do not share {} key/value heads evenly", s.heads, s.kv_heads)));
        }
        // The kernels index with 32-bit integers where a GPU's are cheapest.
        let fits = |v: usize| i32::try_from(v).is_ok();
        if !fits(s.heads * s.head_dim) || !fits(s.kv_heads * s.head_dim) || !fits(s.slots) {
            return Err(KernelError::Shape(format!("{} heads of {} values over {} slots exceed the kernels' 32-bit indices", s.heads, s.head_dim, s.slots)));
        }
        Ok(())
    }

    /// Values of one query (and output) row.
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Values of one cache slot.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// How scores become probabilities.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scoring {
    /// Multiplies each query-key product.
    pub scale: f32,
    /// Gemma 2's `cap * tanh(score / cap)`, after the scale.
    pub softcap: Option<f32>,
    /// Queries and probabilities rounded to half precision before their products, as
    /// llama.cpp computes against a half-precision cache.
    pub half_rounding: bool,
}

impl Scoring {
    /// The kernels' encoding of the soft-cap: 0 for none.
    pub fn softcap_arg(&self) -> f32 {
        self.softcap.unwrap_or(0.0)
    }
}

/// Which keys each query row sees: the positions `[lo, hi)` of its sequence, found in the
/// cache through the sequence's block table. Checked against a cache when made, so every
/// position a row reads has a block inside the cache.
#[derive(Clone, Debug)]
pub struct KeyRanges {
    block_tables: Vec<u32>,
    max_blocks: usize,
    row_seq: Vec<u32>,
    row_lo: Vec<u32>,
    row_hi: Vec<u32>,
    shape: AttentionShape,
    longest: usize,
}

impl KeyRanges {
    /// `block_tables` is `[sequences, max_blocks]`; row `r` belongs to sequence `row_seq[r]`
    /// and sees its keys at positions `row_lo[r]..row_hi[r]`.
    pub fn new(block_tables: Vec<u32>, max_blocks: usize, row_seq: Vec<u32>, row_lo: Vec<u32>, row_hi: Vec<u32>, shape: AttentionShape) -> Result<KeyRanges> {
        shape.check()?;
        if max_blocks == 0 || !block_tables.len().is_multiple_of(max_blocks) {
            return Err(KernelError::Shape(format!("block tables of {} entries are not rows of {max_blocks} blocks", block_tables.len())));
        }
        let rows = row_seq.len();
        for (what, v) in [("row_lo", &row_lo), ("row_hi", &row_hi)] {
            if v.len() != rows {
                return Err(KernelError::Length { what, len: v.len(), expected: rows });
            }
        }
        // Rows are the grid's x dimension (up to 2^31 - 1 blocks), heads its y (up to 65535).
        if i32::try_from(rows).is_err() || shape.heads > 65535 || i32::try_from(max_blocks.saturating_mul(shape.block_size)).is_err() {
            return Err(KernelError::Shape(format!("{rows} rows of {} heads and up to {} keys exceed what one launch can index", shape.heads, max_blocks.saturating_mul(shape.block_size))));
        }
        let seqs = block_tables.len() / max_blocks;
        let mut longest = 0;
        for row in 0..rows {
            let (seq, lo, hi) = (row_seq[row] as usize, row_lo[row] as usize, row_hi[row] as usize);
            if seq >= seqs {
                return Err(KernelError::Row { row, what: format!("sequence {seq} of {seqs}") });
            }
            if lo >= hi {
                return Err(KernelError::Row { row, what: format!("sees no keys (positions {lo}..{hi})") });
            }
            if hi > max_blocks * shape.block_size {
                return Err(KernelError::Row { row, what: format!("position {} is past its table of {max_blocks} blocks", hi - 1) });
            }
            let table = &block_tables[seq * max_blocks..(seq + 1) * max_blocks];
            let (first, last) = (lo / shape.block_size, (hi - 1) / shape.block_size);
            for (b, &block) in table.iter().enumerate().take(last + 1).skip(first) {
                if block == NO_BLOCK || (block as usize + 1) * shape.block_size > shape.slots {
                    return Err(KernelError::Row { row, what: format!("reads block {b} of its table, which holds {} for a cache of {} slots", if block == NO_BLOCK { "no block".to_string() } else { format!("block {block}") }, shape.slots) });
                }
            }
            longest = longest.max(hi - lo);
        }
        Ok(KeyRanges { block_tables, max_blocks, row_seq, row_lo, row_hi, shape, longest })
    }

    pub fn rows(&self) -> usize {
        self.row_seq.len()
    }

    /// The most keys any row sees.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// The shape the ranges were checked against.
    pub fn shape(&self) -> AttentionShape {
        self.shape
    }

    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    pub fn block_tables(&self) -> &[u32] {
        &self.block_tables
    }

    pub fn row_seq(&self) -> &[u32] {
        &self.row_seq
    }

    pub fn row_lo(&self) -> &[u32] {
        &self.row_lo
    }

    pub fn row_hi(&self) -> &[u32] {
        &self.row_hi
    }

    /// The slot of position `p` of sequence `seq` (checked at construction for every
    /// position a row sees).
    fn slot(&self, seq: usize, p: usize) -> usize {
        let bs = self.shape.block_size;
        self.block_tables[seq * self.max_blocks + p / bs] as usize * bs + p % bs
    }
}

/// The launch of the attention kernel: threads per block and keys per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub threads: usize,
    pub chunk: usize,
}

impl Default for Launch {
    fn default() -> Launch {
        Launch { threads: THREADS, chunk: CHUNK }
    }
}

impl Launch {
    pub fn check(&self, shape: &AttentionShape) -> Result<()> {
        if !self.threads.is_power_of_two() || !(32..=1024).contains(&self.threads) {
            return Err(KernelError::Shape(format!("{} threads per block: a power of two from 32 to 1024 is needed", self.threads)));
        }
        if self.chunk == 0 || i32::try_from(self.chunk).is_err() {
            return Err(KernelError::Shape(format!("chunks of {} keys", self.chunk)));
        }
        if shape.head_dim > MAX_DIMS_PER_THREAD * self.threads {
            return Err(KernelError::Shape(format!("head dimension {} is over {MAX_DIMS_PER_THREAD} per thread of {}", shape.head_dim, self.threads)));
        }
        Ok(())
    }

    /// Dynamic shared memory of one block: the query, one chunk's scores, the reduction
    /// buffer.
    pub fn shared_bytes(&self, shape: &AttentionShape) -> usize {
        (shape.head_dim + self.chunk + self.threads) * std::mem::size_of::<f32>()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// The element types a cache holds: f32, or IEEE half precision (which the kernels read as
/// CUDA's `__half`). Sealed: the kernels know no others.
pub trait CacheValue: sealed::Sealed + Copy + Send + Sync + 'static {
    const HALF: bool;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl CacheValue for f32 {
    const HALF: bool = false;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl CacheValue for half::f16 {
    const HALF: bool = true;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> half::f16 {
        half::f16::from_f32(v)
    }
}

/// Checks the buffers of an attention call against its ranges: `q` is `[rows, heads *
/// head_dim]`, each cache `[slots, kv_heads * head_dim]`.
pub fn check_buffers(ranges: &KeyRanges, q: usize, k: usize, v: usize) -> Result<()> {
    let s = ranges.shape;
    let expected_q = ranges.rows() * s.q_width();
    if q != expected_q {
        return Err(KernelError::Length { what: "queries", len: q, expected: expected_q });
    }
    for (what, len) in [("key cache", k), ("value cache", v)] {
        if len != s.slots * s.kv_width() {
            return Err(KernelError::Length { what, len, expected: s.slots * s.kv_width() });
        }
    }
    Ok(())
}

/// The slots one cache write puts its rows in, checked once against a cache of `cache_slots`
/// slots (the layers of a step share them): every slot inside it, none twice (a GPU would
/// race on a repeated slot).
#[derive(Clone, Debug)]
pub struct CacheSlots {
    slots: Vec<u32>,
    cache_slots: usize,
}

impl CacheSlots {
    pub fn new(slots: Vec<u32>, cache_slots: usize) -> Result<CacheSlots> {
        if i32::try_from(slots.len()).is_err() {
            return Err(KernelError::Write(format!("{} rows in one call", slots.len())));
        }
        if let Some(&slot) = slots.iter().find(|&&s| s as usize >= cache_slots) {
            return Err(KernelError::Write(format!("slot {slot} of a cache of {cache_slots}")));
        }
        let mut sorted = slots.clone();
        sorted.sort_unstable();
        if let Some(pair) = sorted.windows(2).find(|p| p[0] == p[1]) {
            return Err(KernelError::Write(format!("slot {} written twice in one call", pair[0])));
        }
        Ok(CacheSlots { slots, cache_slots })
    }

    pub fn slots(&self) -> &[u32] {
        &self.slots
    }
}

/// Checks a cache write's buffers against its slots: the cache is `[cache_slots, width]`,
/// `src` one row of `width` values per slot.
pub fn check_write(cache_len: usize, width: usize, src: usize, slots: &CacheSlots) -> Result<()> {
    if width == 0 || cache_len != slots.cache_slots * width || i32::try_from(width).is_err() {
        return Err(KernelError::Write(format!("a cache of {cache_len} values is not {} slots of {width}", slots.cache_slots)));
    }
    if src != slots.slots.len() * width {
        return Err(KernelError::Length { what: "new keys or values", len: src, expected: slots.slots.len() * width });
    }
    Ok(())
}
