//! The paged key/value cache: per-layer storage of fixed-size blocks of token slots.

use kiln_kernels::attention::KvStore;

pub struct KvCache {
    pub layers: Vec<KvStore>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, num_blocks: usize, block_size: usize, num_kv_heads: usize, head_dim: usize) -> KvCache {
        let slots = num_blocks * block_size;
        KvCache { layers: (0..num_layers).map(|_| KvStore::new(slots, num_kv_heads, head_dim)).collect(), block_size, num_blocks }
    }

    /// Bytes of cache per token across all layers (keys and values in half precision).
    pub fn bytes_per_token(num_layers: usize, num_kv_heads: usize, head_dim: usize) -> usize {
        num_layers * num_kv_heads * head_dim * 2 * 2
    }
}
