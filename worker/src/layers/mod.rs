//! Building blocks every architecture assembles: weights viewed in place, linear layers
//! over any ggml format, norms, embeddings, rotary embeddings and attention.

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rope;
pub mod weights;

pub use attention::Attention;
pub use embedding::Embedding;
pub use linear::{project, Linear, Projection};
pub use norm::RmsNorm;
pub use weights::WeightSource;

use kiln_kernels::pool::ThreadPool;
use kiln_kernels::Isa;

/// Where arithmetic runs: the compute threads and the instruction set chosen for this CPU.
pub struct Compute {
    pub pool: ThreadPool,
    pub isa: Isa,
}

impl Compute {
    pub fn new(num_threads: usize) -> Compute {
        Compute { pool: ThreadPool::new(num_threads.max(1)), isa: Isa::detect() }
    }
}
