//! Block layouts of the ggml formats, byte for byte as they sit in a GGUF file.
//!
//! Scales are IEEE half floats kept as raw `u16` bits, so every block is plain data that
//! can be viewed in place over a memory-mapped file (alignment 2, or 4 for `BlockQ8K`).

use crate::dtype::QK_K;
use half::f16;

#[inline(always)]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_0 {
    pub d: u16,
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    pub d: u16,
    pub m: u16,
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_0 {
    pub d: u16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_1 {
    pub d: u16,
    pub m: u16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; 32],
}

/// Activation block for `Q4_1`/`Q5_1` rows: `s` holds `d * sum(qs)` so the rows' offsets
/// cost one multiply per block.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_1 {
    pub d: u16,
    pub s: u16,
    pub qs: [i8; 32],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: u16,
    pub dmin: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4K {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5K {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: u16,
}

/// Activation block for the k-quants; `bsums` are sums of 16 consecutive quants, which
/// fold the rows' minimums into a few multiplies.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// Plain-data blocks that may be viewed over raw bytes.
///
/// # Safety
/// Implementors must be `repr(C)` and valid for every bit pattern.
pub unsafe trait Block: Copy + 'static {
    const LEN: usize;
}

macro_rules! block_impl {
    ($($t:ty => $len:expr, $bytes:expr;)*) => {$(
        unsafe impl Block for $t { const LEN: usize = $len; }
        const _: () = assert!(std::mem::size_of::<$t>() == $bytes);
    )*};
}

block_impl! {
    BlockQ4_0 => 32, 18;
    BlockQ4_1 => 32, 20;
    BlockQ5_0 => 32, 22;
    BlockQ5_1 => 32, 24;
    BlockQ8_0 => 32, 34;
    BlockQ8_1 => 32, 36;
    BlockQ2K => QK_K, 84;
    BlockQ3K => QK_K, 110;
    BlockQ4K => QK_K, 144;
    BlockQ5K => QK_K, 176;
    BlockQ6K => QK_K, 210;
    BlockQ8K => QK_K, 292;
}

/// Views `bytes` as blocks. Returns None when the length is not a whole number of blocks or
/// the start is not aligned for `B`.
pub fn cast_blocks<B: Block>(bytes: &[u8]) -> Option<&[B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>()) {
        return None;
    }
    // SAFETY: length and alignment checked above; B is plain data valid for any bits.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const B, bytes.len() / size) })
}

pub fn cast_blocks_mut<B: Block>(bytes: &mut [u8]) -> Option<&mut [B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>()) {
        return None;
    }
    // SAFETY: as in `cast_blocks`, and the borrow is exclusive.
    Some(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut B, bytes.len() / size) })
}

/// The bytes of a slice of blocks.
pub fn block_bytes<B: Block>(blocks: &[B]) -> &[u8] {
    // SAFETY: B is repr(C) plain data without padding (sizes asserted above).
    unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks)) }
}

/// 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K super-block.
#[inline(always)]
pub fn k4_scale_min(j: usize, scales: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// The sixteen signed 6-bit scales of a Q3_K super-block, unpacked from their 12 bytes.
#[inline(always)]
pub fn q3k_scales(packed: &[u8; 12]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { packed[j] & 0xF } else { packed[j - 8] >> 4 };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = ((low | (high << 4)) as i8) - 32;
    }
    out
}
