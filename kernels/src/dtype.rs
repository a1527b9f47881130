//! Element formats of weight and activation tensors, numbered as ggml numbers them.
//!
//! A quantized format stores a row as consecutive blocks; `block_len` values share one
//! block of `block_bytes` bytes. The numbering is the one GGUF files carry on disk.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

/// Elements per super-block of the k-quant formats.
pub const QK_K: usize = 256;

impl DType {
    pub const ALL: [DType; 15] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q8_1,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::Q8K,
    ];

    /// The ggml type id used in GGUF tensor records.
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q8_1 => 9,
            DType::Q2K => 10,
            DType::Q3K => 11,
            DType::Q4K => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::Q8K => 15,
            DType::BF16 => 30,
        }
    }

    pub fn from_ggml_id(id: u32) -> Option<DType> {
        DType::ALL.iter().copied().find(|t| t.ggml_id() == id)
    }

    /// Name of any ggml type id, including those kiln cannot compute with, for error messages.
    pub fn ggml_name(id: u32) -> &'static str {
        const NAMES: [&str; 41] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4",
            "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4", "NVFP4",
        ];
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }

    pub fn name(self) -> &'static str {
        DType::ggml_name(self.ggml_id())
    }

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::Q8_1 => 32,
            DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K | DType::Q8K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::Q8_1 => 36,
            DType::Q2K => 84,
            DType::Q3K => 110,
            DType::Q4K => 144,
            DType::Q5K => 176,
            DType::Q6K => 210,
            DType::Q8K => 292,
        }
    }

    /// Bytes of a row of `len` values, or None when `len` is not a whole number of blocks.
    pub fn row_bytes(self, len: usize) -> Option<usize> {
        if !len.is_multiple_of(self.block_len()) {
            return None;
        }
        (len / self.block_len()).checked_mul(self.block_bytes())
    }

    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// The format activations are converted to before a dot product with a row of this type,
    /// so that the inner loop runs on integers. This pairing is ggml's, which keeps kiln's
    /// rounding identical to llama.cpp's.
    pub fn activation_type(self) -> DType {
        match self {
            DType::F32 => DType::F32,
            DType::F16 => DType::F16,
            DType::BF16 => DType::BF16,
            DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => DType::Q8_0,
            DType::Q4_1 | DType::Q5_1 => DType::Q8_1,
            DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => DType::Q8K,
            DType::Q8_1 | DType::Q8K => self,
        }
    }

    /// Whether rows of this type can be stored as model weights and multiplied.
    pub fn is_weight_type(self) -> bool {
        !matches!(self, DType::Q8_1 | DType::Q8K)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_names_match() {
        for t in DType::ALL {
            assert_eq!(DType::from_ggml_id(t.ggml_id()), Some(t));
        }
        assert_eq!(DType::Q4K.name(), "Q4_K");
        assert_eq!(DType::BF16.name(), "BF16");
        assert_eq!(DType::ggml_name(16), "IQ2_XXS");
        assert_eq!(DType::ggml_name(999), "unknown");
        assert_eq!(DType::from_ggml_id(16), None);
    }

    #[test]
    fn row_bytes_requires_whole_blocks() {
        assert_eq!(DType::Q4_1.row_bytes(576), Some(18 * 20));
        assert_eq!(DType::Q4K.row_bytes(640), None);
        assert_eq!(DType::F32.row_bytes(3), Some(12));
    }
}
