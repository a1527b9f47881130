//! Weights repacked at load time for the packed products (`x86_packed` for AVX-512 VNNI,
//! `x86_packed_avx2` for AVX2, which reads each register as two halves of eight rows).
//!
//! A ggml row stores its blocks one after another, so a kernel that reads it produces one
//! output at a time and must reduce eight or sixteen lanes at the end of every row. Here
//! sixteen rows are interleaved instead: for each 32-column block, one 512-bit register holds
//! four consecutive quants of each of the sixteen rows, so `vpdpbusd` with four activation
//! bytes broadcast yields sixteen outputs at once and nothing is ever reduced across lanes.
//! The same code serves one input row (decode) and many (prefill, batched decode), which
//! makes every result independent of the batch it was computed in.
//!
//! Layout of one group of 16 rows, block by block (`block_bytes` each):
//! - `d`: the 16 rows' block scales, f16 (32 bytes); Q4_1 and Q5_1 add the 16 minima `m`
//!   (32 bytes);
//! - quants, unsigned: for 4-bit formats four 64-byte registers, register `k` holding in byte
//!   `4j + t` the quants `4k + t` (low nibble) and `16 + 4k + t` (high nibble) of row `j`;
//!   for Q8_0 eight registers, register `k` holding quants `4k + t` of row `j` plus 128;
//! - Q5_0 and Q5_1: eight 64-bit masks, the fifth bit of each byte of the four low-nibble and then
//!   the four high-nibble registers.
//!
//! Q4_K super-blocks (256 columns) hold `d` and `dmin` (f16), the 6-bit scales and minima of
//! the eight 32-value sub-blocks unpacked to bytes (`[sub-block][row]`), then 32 registers:
//! register `8c + k` holds in byte `4j + t` quant `4k + t` of sub-block `2c` (low nibble) and
//! of sub-block `2c + 1` (high nibble) of row `j`. Its products follow the order of ggml's
//! 8-row interleaved Q4_K kernels (whole super-block integer sums, then one fused
//! multiply-add), as `x86::*::q4k_interleaved` does.
//!
//! Q5_K super-blocks start like Q4_K (header and 32 registers of the low four bits), then
//! hold the fifth bits as 64-bit masks, two per register (`Q5K_HIGHS + 16 * register`: low
//! nibbles, then high nibbles; bit `4j + t` for byte `4j + t`). Its products keep ggml's
//! single-row Q5_K order: eight lanes of integer sums scaled per 32 values, one fused
//! multiply-add per super-block and lane, the minima accumulated apart and added last.
//!
//! Q2_K and Q3_K: see `Q2K_QUANTS` and `Q3K_QUANTS`. Their products keep the order each ISA
//! used for them before packing (see `reference`).
//!
//! Q6_K super-blocks hold `d` (f16), the sixteen 8-bit scales of each row as eight pairs
//! (`[pair][row][2]`), then the unsigned 6-bit quants (stored value + 32) split in two: 32
//! registers of low nibbles, register `8c + l` holding in byte `4j + t` the low bits of quant
//! `4l + t` of 32-value chunk `2c` (low nibble) and `2c + 1` (high nibble); and 16 registers
//! of high bits, register `8c + l` holding the two high bits of that quant for chunks
//! `4c..4c + 4`, chunk `4c + u` at bits `2u`. Products keep ggml's single-row Q6_K order.
//!
//! F32 (only where a model asks for it, `packed_f32`): for each column, the sixteen rows'
//! values, 64 bytes.
//!
//! Signed formats are stored with an offset (8, 16 or 128) that the kernel takes back exactly
//! with sums of the activation quants. The lane `k` products of a register are exactly the
//! eighth lane of ggml's single-row dot product, so the packed kernels keep its summation
//! order (`reference`), and their results equal the single-row kernels' bit for bit. Q4_0
//! is the exception: llama.cpp repacks it itself and sums each block whole (8-row
//! interleaved kernels), so its packed kernel does the same, as `x86::*::q4_0_interleaved`
//! does for a single row.

use crate::blocks::{f16_bits_to_f32, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8K, BlockQ8_0, BlockQ8_1};
use crate::dtype::DType;
use crate::matmul::{AlignedBuf, WeightView};
use crate::KernelError;

/// Rows interleaved per group.
pub const GROUP: usize = 16;

/// Formats whose packed copy every product prefers on CPUs with the packed kernels.
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K)
}

/// Bytes of one group's block (32 columns; a 256-column super-block for the K formats).
pub fn block_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Q4_0 => 32 + 256,
        DType::Q4_1 => 64 + 256,
        DType::Q5_0 => 32 + 256 + 64,
        DType::Q5_1 => 64 + 256 + 64,
        DType::Q8_0 => 32 + 512,
        DType::Q4K => Q4K_QUANTS + 2048,
        DType::Q5K => Q5K_HIGHS + 512,
        DType::Q6K => Q6K_LOWS + 2048 + 1024,
        DType::Q2K => Q2K_QUANTS + 1024,
        DType::Q3K => Q3K_HIGHS + 512,
        DType::F32 => 4 * GROUP,
        _ => 0,
    }
}

/// Where a packed Q4_K super-block's quants start: after `d` and `dmin` (16 f16 each) and
/// the sub-block scales and minima (`[8 sub-blocks][16 rows]` bytes each).
pub const Q4K_QUANTS: usize = 64 + 128 + 128;

/// Where a packed Q5_K super-block's fifth-bit masks start: after a Q4_K-like super-block.
pub const Q5K_HIGHS: usize = Q4K_QUANTS + 2048;

/// Where a packed Q6_K super-block's low quant bits start: after `d` (16 f16) and the
/// scales (`[8 pairs][16 rows][2]` bytes). The two high bits follow the low bits.
pub const Q6K_LOWS: usize = 32 + 256;
pub const Q6K_HIGHS: usize = Q6K_LOWS + 2048;

/// Where a packed Q2_K super-block's quants start: after `d` and `dmin` (16 f16 each) and
/// the sixteen 16-value sub-blocks' scales and minima (`[16 sub-blocks][16 rows]` bytes
/// each). Quants take two bits: register `8c + l` (c = 0, 1) holds in byte `4j + t` quant
/// `4l + t` of the 32-value chunks `4c..4c + 4` of row `j`, chunk `4c + u` at bits `2u`.
pub const Q2K_QUANTS: usize = 64 + 512;

/// Where a packed Q3_K super-block's low two quant bits start (laid out as Q2_K's), after
/// `d` (16 f16) and the sixteen signed scales (`[16 sub-blocks][16 rows]`); the third bits
/// follow as 64-bit masks, one per chunk `c` and lane `l` (`Q3K_HIGHS + 8 * (8c + l)`, bit
/// `4j + t` for quant `4l + t` of row `j`), set where the stored quant is not lowered by 4.
pub const Q3K_QUANTS: usize = 32 + 256;
pub const Q3K_HIGHS: usize = Q3K_QUANTS + 1024;

/// Formats with a per-block minimum (read against Q8_1 activations).
pub fn has_min(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_1 | DType::Q5_1)
}

/// The offset stored quants carry: the format's zero point.
pub fn zero_point(dtype: DType) -> i32 {
    match dtype {
        DType::Q4_0 => 8,
        DType::Q5_0 => 16,
        DType::Q8_0 => 128,
        _ => 0,
    }
}

/// The zero points taken back lane by lane (`BlockTable::corrections`): those of the signed
/// formats whose packed kernels keep ggml's eight lanes. Q4_0's sums whole blocks and reads
/// `BlockTable::sums` instead.
pub const ZERO_POINTS: [i32; 2] = [16, 128];

/// Which of `ZERO_POINTS` a format has; None for formats without a lane-wise one.
pub fn zero_point_index(dtype: DType) -> Option<usize> {
    match dtype {
        DType::Q5_0 => Some(0),
        DType::Q8_0 => Some(1),
        _ => None,
    }
}

/// A weight matrix in the interleaved layout.
pub struct PackedMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    data: AlignedBuf,
}

impl PackedMatrix {
    /// Repacks `w`; its row count must be a multiple of `GROUP` and its format supported (or
    /// F32, for `packed_f32`).
    pub fn pack(w: &WeightView) -> Result<PackedMatrix, KernelError> {
        if !supports(w.dtype) && w.dtype != DType::F32 {
            return Err(KernelError::Unsupported(format!("no packed layout for {}", w.dtype)));
        }
        if !w.rows.is_multiple_of(GROUP) {
            return Err(KernelError::Shape(format!("{} rows are not whole groups of {GROUP}", w.rows)));
        }
        let blocks = w.cols / w.dtype.block_len();
        let bb = block_bytes(w.dtype);
        let mut data = AlignedBuf::zeroed_huge(w.rows / GROUP * blocks * bb);
        let out = data.bytes_mut();
        for g in 0..w.rows / GROUP {
            for b in 0..blocks {
                let dst = &mut out[(g * blocks + b) * bb..(g * blocks + b + 1) * bb];
                let rows: [&[u8]; GROUP] = std::array::from_fn(|j| w.row(g * GROUP + j));
                pack_block(w.dtype, &rows, b, dst);
            }
        }
        Ok(PackedMatrix { dtype: w.dtype, rows: w.rows, cols: w.cols, data })
    }

    pub fn blocks(&self) -> usize {
        self.cols / self.dtype.block_len()
    }

    /// The packed bytes of group `g` (rows `16g..16g + 16`).
    pub fn group(&self, g: usize) -> &[u8] {
        self.groups(g..g + 1)
    }

    /// Consecutive groups, one after the other.
    pub fn groups(&self, range: std::ops::Range<usize>) -> &[u8] {
        let n = self.blocks() * block_bytes(self.dtype);
        &self.data.bytes()[range.start * n..range.end * n]
    }

    pub fn size_bytes(&self) -> usize {
        self.data.bytes().len()
    }
}

/// Quants of block `b` of one row as unsigned values (zero point added) with its scale bits
/// and, for Q4_1 and Q5_1, minimum bits.
fn unsigned_quants(dtype: DType, row: &[u8], b: usize) -> ([u8; 32], u16, u16) {
    let mut q = [0u8; 32];
    let at = |size: usize| &row[b * size..(b + 1) * size];
    match dtype {
        DType::Q4_0 => {
            let x: &BlockQ4_0 = bytemuck_block(at(18));
            (nibble_quants(&x.qs, 0), x.d, 0)
        }
        DType::Q4_1 => {
            let x: &BlockQ4_1 = bytemuck_block(at(20));
            (nibble_quants(&x.qs, 0), x.d, x.m)
        }
        DType::Q5_0 => {
            let x: &BlockQ5_0 = bytemuck_block(at(22));
            (nibble_quants(&x.qs, u32::from_le_bytes(x.qh)), x.d, 0)
        }
        DType::Q5_1 => {
            let x: &BlockQ5_1 = bytemuck_block(at(24));
            (nibble_quants(&x.qs, u32::from_le_bytes(x.qh)), x.d, x.m)
        }
        DType::Q8_0 => {
            let x: &BlockQ8_0 = bytemuck_block(at(34));
            for (q, &v) in q.iter_mut().zip(&x.qs) {
                *q = (v as u8) ^ 0x80;
            }
            (q, x.d, 0)
        }
        other => unreachable!("{other} has no packed layout"),
    }
}

/// The 32 quants of a 32-value block stored as nibbles (values `i` and `16 + i` in byte `i`),
/// with bit `i` of `fifth` as the fifth bit of value `i` (zero for the 4-bit formats).
fn nibble_quants(qs: &[u8; 16], fifth: u32) -> [u8; 32] {
    std::array::from_fn(|i| {
        let nibble = if i < 16 { qs[i] & 0x0F } else { qs[i - 16] >> 4 };
        nibble | ((((fifth >> i) & 1) as u8) << 4)
    })
}

/// A 64-bit mask over one packed register (byte `4j + t` is quant `t` of row `j`'s four),
/// its bits set where `fifth_bit(j, t)` holds.
fn fifth_bit_mask(fifth_bit: impl Fn(usize, usize) -> bool) -> u64 {
    let mut mask = 0u64;
    for j in 0..GROUP {
        for t in 0..4 {
            if fifth_bit(j, t) {
                mask |= 1 << (4 * j + t);
            }
        }
    }
    mask
}

fn bytemuck_block<B: crate::blocks::Block>(bytes: &[u8]) -> &B {
    &crate::blocks::cast_blocks::<B>(bytes).expect("rows are validated and aligned for their blocks")[0]
}

fn pack_block(dtype: DType, rows: &[&[u8]; GROUP], b: usize, dst: &mut [u8]) {
    match dtype {
        DType::Q4K => return pack_q4k(rows, b, dst),
        DType::Q5K => return pack_q5k(rows, b, dst),
        DType::Q6K => return pack_q6k(rows, b, dst),
        DType::Q2K | DType::Q3K => return pack_k2(dtype, rows, b, dst),
        DType::F32 => {
            for (j, row) in rows.iter().enumerate() {
                dst[4 * j..4 * j + 4].copy_from_slice(&row[4 * b..4 * b + 4]);
            }
            return;
        }
        _ => {}
    }
    let unpacked: [([u8; 32], u16, u16); GROUP] = std::array::from_fn(|j| unsigned_quants(dtype, rows[j], b));
    let mut at = 0;
    for (j, (_, d, _)) in unpacked.iter().enumerate() {
        dst[2 * j..2 * j + 2].copy_from_slice(&d.to_le_bytes());
    }
    at += 32;
    if has_min(dtype) {
        for (j, (_, _, m)) in unpacked.iter().enumerate() {
            dst[at + 2 * j..at + 2 * j + 2].copy_from_slice(&m.to_le_bytes());
        }
        at += 32;
    }
    if dtype == DType::Q8_0 {
        for k in 0..8 {
            for (j, (q, _, _)) in unpacked.iter().enumerate() {
                for t in 0..4 {
                    dst[at + 64 * k + 4 * j + t] = q[4 * k + t];
                }
            }
        }
        return;
    }
    for k in 0..4 {
        for (j, (q, _, _)) in unpacked.iter().enumerate() {
            for t in 0..4 {
                dst[at + 64 * k + 4 * j + t] = (q[4 * k + t] & 0x0F) | ((q[16 + 4 * k + t] & 0x0F) << 4);
            }
        }
    }
    at += 256;
    if matches!(dtype, DType::Q5_0 | DType::Q5_1) {
        for half in 0..2 {
            for k in 0..4 {
                let mask = fifth_bit_mask(|j, t| unpacked[j].0[16 * half + 4 * k + t] & 0x10 != 0);
                let m = at + 8 * (4 * half + k);
                dst[m..m + 8].copy_from_slice(&mask.to_le_bytes());
            }
        }
    }
}

fn pack_q4k(rows: &[&[u8]; GROUP], b: usize, dst: &mut [u8]) {
    let blocks: [&BlockQ4K; GROUP] = std::array::from_fn(|j| bytemuck_block(&rows[j][b * 144..(b + 1) * 144]));
    let unpacked: [crate::unpack::KBlock; GROUP] = std::array::from_fn(|j| crate::unpack::q4k(blocks[j]));
    pack_k4(&blocks.map(|x| (x.d, x.dmin)), &unpacked, dst);
}

fn pack_q5k(rows: &[&[u8]; GROUP], b: usize, dst: &mut [u8]) {
    let blocks: [&BlockQ5K; GROUP] = std::array::from_fn(|j| bytemuck_block(&rows[j][b * 176..(b + 1) * 176]));
    let unpacked: [crate::unpack::KBlock; GROUP] = std::array::from_fn(|j| crate::unpack::q5k(blocks[j]));
    pack_k4(&blocks.map(|x| (x.d, x.dmin)), &unpacked, dst);
    for c in 0..4 {
        for k in 0..8 {
            for half in 0..2 {
                let mask = fifth_bit_mask(|j, t| unpacked[j].q[64 * c + 32 * half + 4 * k + t] & 0x10 != 0);
                let at = Q5K_HIGHS + 16 * (8 * c + k) + 8 * half;
                dst[at..at + 8].copy_from_slice(&mask.to_le_bytes());
            }
        }
    }
}

/// The part Q4_K and Q5_K share: `d` and `dmin`, the sub-block scales and minima as bytes,
/// and the low four bits of every quant.
fn pack_k4(scales: &[(u16, u16); GROUP], unpacked: &[crate::unpack::KBlock; GROUP], dst: &mut [u8]) {
    for (j, (d, dmin)) in scales.iter().enumerate() {
        dst[2 * j..2 * j + 2].copy_from_slice(&d.to_le_bytes());
        dst[32 + 2 * j..32 + 2 * j + 2].copy_from_slice(&dmin.to_le_bytes());
    }
    for sub in 0..8 {
        for (j, u) in unpacked.iter().enumerate() {
            // KBlock repeats each sub-block's scale for its two 16-value halves.
            dst[64 + 16 * sub + j] = u.scales[2 * sub] as u8;
            dst[192 + 16 * sub + j] = u.mins[2 * sub] as u8;
        }
    }
    for c in 0..4 {
        for k in 0..8 {
            for (j, u) in unpacked.iter().enumerate() {
                for t in 0..4 {
                    let (lo, hi) = (u.q[64 * c + 4 * k + t] as u8 & 0xF, u.q[64 * c + 32 + 4 * k + t] as u8 & 0xF);
                    dst[Q4K_QUANTS + 64 * (8 * c + k) + 4 * j + t] = lo | (hi << 4);
                }
            }
        }
    }
}

/// Q2_K and Q3_K: header, scales (and Q2_K's minima) as bytes, the low two bits of every
/// quant, and (Q3_K) the third bits.
fn pack_k2(dtype: DType, rows: &[&[u8]; GROUP], b: usize, dst: &mut [u8]) {
    // Each row's block unpacked, with its `d` and `dmin` as stored.
    let unpacked: [(crate::unpack::KBlock, u16, u16); GROUP] = std::array::from_fn(|j| {
        if dtype == DType::Q2K {
            let x: &BlockQ2K = bytemuck_block(&rows[j][b * 84..(b + 1) * 84]);
            (crate::unpack::q2k(x), x.d, x.dmin)
        } else {
            let x: &BlockQ3K = bytemuck_block(&rows[j][b * 110..(b + 1) * 110]);
            (crate::unpack::q3k(x), x.d, 0)
        }
    });
    let quants_at = if dtype == DType::Q2K { Q2K_QUANTS } else { Q3K_QUANTS };
    for (j, (u, d, dmin)) in unpacked.iter().enumerate() {
        dst[2 * j..2 * j + 2].copy_from_slice(&d.to_le_bytes());
        let scales_at = if dtype == DType::Q2K {
            dst[32 + 2 * j..34 + 2 * j].copy_from_slice(&dmin.to_le_bytes());
            64
        } else {
            32
        };
        for sub in 0..16 {
            dst[scales_at + 16 * sub + j] = u.scales[sub] as u8;
            if dtype == DType::Q2K {
                dst[scales_at + 256 + 16 * sub + j] = u.mins[sub] as u8;
            }
        }
    }
    // Q3_K quants are -4..3: the low two bits of q + 4, and its third bit.
    let unsigned = |j: usize, i: usize| (unpacked[j].0.q[i] + if dtype == DType::Q3K { 4 } else { 0 }) as u8;
    for c in 0..2 {
        for l in 0..8 {
            for j in 0..GROUP {
                for t in 0..4 {
                    dst[quants_at + 64 * (8 * c + l) + 4 * j + t] = (0..4).map(|u| (unsigned(j, 32 * (4 * c + u) + 4 * l + t) & 3) << (2 * u)).sum::<u8>();
                }
            }
        }
    }
    if dtype == DType::Q3K {
        for c in 0..8 {
            for l in 0..8 {
                let mask = fifth_bit_mask(|j, t| unsigned(j, 32 * c + 4 * l + t) & 4 != 0);
                let at = Q3K_HIGHS + 8 * (8 * c + l);
                dst[at..at + 8].copy_from_slice(&mask.to_le_bytes());
            }
        }
    }
}

fn pack_q6k(rows: &[&[u8]; GROUP], b: usize, dst: &mut [u8]) {
    let blocks: [&BlockQ6K; GROUP] = std::array::from_fn(|j| bytemuck_block(&rows[j][b * 210..(b + 1) * 210]));
    let unpacked: [crate::unpack::KBlock; GROUP] = std::array::from_fn(|j| crate::unpack::q6k(blocks[j]));
    for (j, x) in blocks.iter().enumerate() {
        dst[2 * j..2 * j + 2].copy_from_slice(&x.d.to_le_bytes());
        for pair in 0..8 {
            dst[32 + 32 * pair + 2 * j] = x.scales[2 * pair] as u8;
            dst[32 + 32 * pair + 2 * j + 1] = x.scales[2 * pair + 1] as u8;
        }
    }
    let quant = |j: usize, chunk: usize, i: usize| (unpacked[j].q[32 * chunk + i] + 32) as u8;
    for c in 0..4 {
        for l in 0..8 {
            for j in 0..GROUP {
                for t in 0..4 {
                    let i = 4 * l + t;
                    dst[Q6K_LOWS + 64 * (8 * c + l) + 4 * j + t] = (quant(j, 2 * c, i) & 0xF) | ((quant(j, 2 * c + 1, i) & 0xF) << 4);
                }
            }
        }
    }
    for c in 0..2 {
        for l in 0..8 {
            for j in 0..GROUP {
                for t in 0..4 {
                    let i = 4 * l + t;
                    dst[Q6K_HIGHS + 64 * (8 * c + l) + 4 * j + t] = (0..4).map(|u| (quant(j, 4 * c + u, i) >> 4) << (2 * u)).sum::<u8>();
                }
            }
        }
    }
}

/// `reference` for Q6_K against Q8_K activations: ggml's single-row order, eight lanes of
/// integer sums (each scaled per 16 values, minus 32 x the scaled activation sums of lane-pair
/// `l`), one fused multiply-add per super-block and lane, the lanes added pairwise.
fn reference_q6k(w: &[u8], a: &[u8], cols: usize) -> f32 {
    let mut acc = [0f32; 8];
    for b in 0..cols / 256 {
        let x: &BlockQ6K = bytemuck_block(&w[b * 210..(b + 1) * 210]);
        let y: &BlockQ8K = bytemuck_block(&a[b * 292..(b + 1) * 292]);
        let u = crate::unpack::q6k(x);
        let d = y.d * f16_bits_to_f32(x.d);
        for (l, acc) in acc.iter_mut().enumerate() {
            let mut lane = -32 * (y.bsums[2 * l] as i32 * x.scales[2 * l] as i32 + y.bsums[2 * l + 1] as i32 * x.scales[2 * l + 1] as i32);
            for chunk in 0..8 {
                let scale = x.scales[2 * chunk + usize::from(l >= 4)] as i32;
                let p: i32 = (0..4).map(|t| (u.q[32 * chunk + 4 * l + t] as i32 + 32) * y.qs[32 * chunk + 4 * l + t] as i32).sum();
                lane += scale * p;
            }
            *acc = d.mul_add(lane as f32, *acc);
        }
    }
    fold8(&acc)
}

/// `reference` for Q5_K against Q8_K activations: ggml's single-row order, eight lanes of
/// integer sums (lane `l`: quants `4l..4l + 4` of every 32-value sub-block times its scale),
/// one fused multiply-add per super-block and lane, the lanes added pairwise; the minima's
/// integer sum scaled and accumulated once per super-block, added last.
fn reference_q5k(w: &[u8], a: &[u8], cols: usize) -> f32 {
    let mut acc = [0f32; 8];
    let mut mins = 0f32;
    for b in 0..cols / 256 {
        let x: &BlockQ5K = bytemuck_block(&w[b * 176..(b + 1) * 176]);
        let y: &BlockQ8K = bytemuck_block(&a[b * 292..(b + 1) * 292]);
        let u = crate::unpack::q5k(x);
        let total_min: i32 = (0..8).map(|s| u.mins[2 * s] * (y.bsums[2 * s] as i32 + y.bsums[2 * s + 1] as i32)).sum();
        mins = (-y.d * f16_bits_to_f32(x.dmin)).mul_add(total_min as f32, mins);
        let d = y.d * f16_bits_to_f32(x.d);
        for (l, acc) in acc.iter_mut().enumerate() {
            let lane: i32 = (0..8)
                .map(|s| u.scales[2 * s] * (0..4).map(|t| u.q[32 * s + 4 * l + t] as i32 * y.qs[32 * s + 4 * l + t] as i32).sum::<i32>())
                .sum();
            *acc = d.mul_add(lane as f32, *acc);
        }
    }
    fold8(&acc) + mins
}

/// `reference` for Q4_0 against Q8_0 activations: the order of ggml's 8-row interleaved
/// kernels (every packed matrix has a multiple of 8 rows), each block's integer sum scaled
/// and accumulated on its own.
fn reference_q4_0(w: &[u8], a: &[u8], cols: usize) -> f32 {
    let mut acc = 0f32;
    for b in 0..cols / 32 {
        let (q, dw, _) = unsigned_quants(DType::Q4_0, w, b);
        let y: &BlockQ8_0 = bytemuck_block(&a[b * 34..(b + 1) * 34]);
        let total: i32 = q.iter().zip(&y.qs).map(|(&q, &a)| (q as i32 - 8) * a as i32).sum();
        acc = (total as f32).mul_add(f16_bits_to_f32(dw) * f16_bits_to_f32(y.d), acc);
    }
    acc
}

/// `reference` for Q4_K against Q8_K activations.
fn reference_q4k(w: &[u8], a: &[u8], cols: usize) -> f32 {
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for b in 0..cols / 256 {
        let x: &BlockQ4K = bytemuck_block(&w[b * 144..(b + 1) * 144]);
        let y: &BlockQ8K = bytemuck_block(&a[b * 292..(b + 1) * 292]);
        let u = crate::unpack::q4k(x);
        let total: i32 = (0..256).map(|v| u.q[v] as i32 * y.qs[v] as i32 * u.scales[v / 16]).sum();
        let total_min: i32 = (0..8).map(|s| u.mins[2 * s] * (y.bsums[2 * s] as i32 + y.bsums[2 * s + 1] as i32)).sum();
        acc = (total as f32).mul_add(f16_bits_to_f32(x.d) * y.d, acc);
        acc_min = (total_min as f32).mul_add(f16_bits_to_f32(x.dmin) * y.d, acc_min);
    }
    acc - acc_min
}

/// `reference` for Q2_K and Q3_K against Q8_K activations, in the order of the single-row
/// kernels (`x86::*::q2k`, `q3k`): eight lanes of integer sums, lane `l` holding quants
/// `4l..4l + 4` of every 32-value chunk times its 16-value scale. Q3_K adds each lane scaled
/// once per super-block; Q2_K first adds the minima's lanes (lane `l`: sub-blocks `2l` and
/// `2l + 1`), scaled by -dmin, then the products'. With `interleaved` (Q2_K matrices on
/// AVX-512 CPUs), llama.cpp's 8-row order instead: whole super-block sums of products and of
/// minima, each scaled and accumulated on its own, the minima subtracted at the end.
fn reference_k2(dtype: DType, interleaved: bool, w: &[u8], a: &[u8], cols: usize) -> f32 {
    let mut acc = [0f32; 8];
    let (mut total, mut mins) = (0f32, 0f32);
    for b in 0..cols / 256 {
        let y: &BlockQ8K = bytemuck_block(&a[b * 292..(b + 1) * 292]);
        let u = if dtype == DType::Q2K {
            crate::unpack::q2k(bytemuck_block::<BlockQ2K>(&w[b * 84..(b + 1) * 84]))
        } else {
            crate::unpack::q3k(bytemuck_block::<BlockQ3K>(&w[b * 110..(b + 1) * 110]))
        };
        let lanes: [i32; 8] = std::array::from_fn(|l| {
            (0..8).map(|c| u.scales[2 * c + usize::from(l >= 4)] * (0..4).map(|t| u.q[32 * c + 4 * l + t] as i32 * y.qs[32 * c + 4 * l + t] as i32).sum::<i32>()).sum()
        });
        if interleaved {
            let summ: i32 = (0..16).map(|s| u.mins[s] * y.bsums[s] as i32).sum();
            total = (lanes.iter().sum::<i32>() as f32).mul_add(u.d * y.d, total);
            mins = (summ as f32).mul_add(u.dmin * y.d, mins);
            continue;
        }
        for (l, acc) in acc.iter_mut().enumerate() {
            if dtype == DType::Q2K {
                let m = u.mins[2 * l] * y.bsums[2 * l] as i32 + u.mins[2 * l + 1] * y.bsums[2 * l + 1] as i32;
                *acc = (-y.d * u.dmin).mul_add(m as f32, *acc);
            }
            *acc = (y.d * u.d).mul_add(lanes[l] as f32, *acc);
        }
    }
    if interleaved {
        total - mins
    } else {
        fold8(&acc)
    }
}

/// ggml's horizontal sum of eight lanes (`hsum_float_8`).
fn fold8(acc: &[f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// Per-block values of prepared activation rows that the packed kernels read, indexed by
/// `row * blocks + block`: the scale in single precision, (Q8_1 rows) the stored `d·Σq`, and
/// (Q8_0 rows) for each of `ZERO_POINTS` and each group of four quants, minus the zero point
/// times the group's sum: `corrections[(.. * ZERO_POINTS.len() + zero point index) * 8 +
/// lane]`. Kept ready so the kernels start each lane's integer sum from a broadcast load.
#[derive(Default)]
pub struct BlockTable {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub corrections: Vec<i32>,
    /// (Q8_0 rows) the sum of each block's quants.
    pub sums: Vec<i32>,
}

/// The packed kernels' arithmetic from the original rows: weight row `w` (in `dtype`)
/// against one activation row (Q8_0, or Q8_1 for Q4_1 and Q5_1). For the 32-value formats
/// other than Q4_0 this is the single-row order of the `x86` kernels (and of ggml's AVX2 dot
/// products): eight lanes, lane `l` holding the integer sum over quants `4l..4l + 4` of each
/// block, scaled and accumulated with a fused multiply-add per block, the lanes added
/// pairwise at the end; the `m·s` terms summed separately in block order and added last.
///
/// Q2_K is the one format whose order depends on the CPU (see `dot::interleaved_order`): its
/// packed matrices are summed in llama.cpp's 8-row order on AVX-512 CPUs, as `isa` says.
pub fn reference(isa: crate::Isa, dtype: DType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    match dtype {
        DType::Q2K | DType::Q3K => return reference_k2(dtype, crate::dot::interleaved_order(dtype, GROUP, isa), w, a, cols),
        DType::Q4K => return reference_q4k(w, a, cols),
        DType::Q5K => return reference_q5k(w, a, cols),
        DType::Q6K => return reference_q6k(w, a, cols),
        DType::Q4_0 => return reference_q4_0(w, a, cols),
        _ => {}
    }
    let mut acc = [0f32; 8];
    let mut off = 0f32;
    for b in 0..cols / 32 {
        let (q, dw, mw) = unsigned_quants(dtype, w, b);
        let (da, sa, qa): (u16, u16, &[i8; 32]) = if has_min(dtype) {
            let y: &BlockQ8_1 = bytemuck_block(&a[b * 36..(b + 1) * 36]);
            (y.d, y.s, &y.qs)
        } else {
            let y: &BlockQ8_0 = bytemuck_block(&a[b * 34..(b + 1) * 34]);
            (y.d, 0, &y.qs)
        };
        let d = f16_bits_to_f32(dw) * f16_bits_to_f32(da);
        for (l, acc) in acc.iter_mut().enumerate() {
            let lane: i32 = (4 * l..4 * l + 4).map(|i| (q[i] as i32 - zero_point(dtype)) * qa[i] as i32).sum();
            *acc = d.mul_add(lane as f32, *acc);
        }
        if has_min(dtype) {
            off += f16_bits_to_f32(mw) * f16_bits_to_f32(sa);
        }
    }
    let sum = fold8(&acc);
    if has_min(dtype) {
        sum + off
    } else {
        sum
    }
}
