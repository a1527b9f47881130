//! Building blocks every architecture assembles: weights viewed in place, linear layers
//! over any ggml format, norms, embeddings, rotary embeddings and attention.

pub mod attention;
pub mod bidirectional;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod weights;

pub use attention::Attention;
pub use embedding::Embedding;
pub use linear::{project, Linear, Projection};
pub use norm::{LayerNorm, RmsNorm};
pub use weights::WeightSource;

pub use kiln_kernels::Compute;
