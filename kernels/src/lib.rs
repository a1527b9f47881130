//! kiln's CPU compute kernels.
//!
//! Weights stay in their ggml block formats (viewed in place over a memory-mapped file);
//! activations are quantized per product the way ggml does it, so results track llama.cpp
//! closely. Every SIMD kernel has a scalar reference in `dot_ref`/`dequant` that the tests
//! hold it to.

pub mod activation;
pub mod attention;
pub mod blocks;
pub mod dense_attention;
pub mod dequant;
pub mod dot;
pub mod dot_ref;
pub mod dtype;
pub mod matmul;
pub mod memory;
pub mod numerics;
pub mod ops;
pub mod packed;
pub mod packed_f32;
pub mod pool;
pub mod quantize;
pub mod unpack;
#[cfg(target_arch = "x86_64")]
pub mod x86;
#[cfg(target_arch = "x86_64")]
pub mod x86_packed;
#[cfg(target_arch = "x86_64")]
pub mod x86_packed_avx2;
#[cfg(target_arch = "x86_64")]
pub mod x86_wide;

pub use dot::Isa;
pub use dtype::DType;

/// Where arithmetic runs: the compute threads and the instruction set chosen for this CPU.
pub struct Compute {
    pub pool: pool::ThreadPool,
    pub isa: Isa,
}

impl Compute {
    pub fn new(num_threads: usize) -> Compute {
        Compute { pool: pool::ThreadPool::new(num_threads.max(1)), isa: Isa::detect() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("bad data layout: {0}")]
    Layout(&'static str),
    #[error("unsupported: {0}")]
    Unsupported(String),
}
