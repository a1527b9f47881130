//! The paged key/value cache.
//!
//! Storage is organized in blocks of `block_size` token slots. Layers that attend alike share
//! block tables and form a group: all layers of most models are one group, while Gemma 3's
//! sliding-window layers form a second group whose blocks can be released once they fall out
//! of the window. Each group has its own `BlockPool`.

pub mod block_pool;
pub mod prefix;

pub use block_pool::{BlockId, BlockPool, NO_BLOCK};

use crate::backend::{Backend, Cpu, KvLayer, KvShape};
use crate::error::Result;
use crate::models::config::ModelConfig;

/// One group's layers, and how much of each sequence's history they attend to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupLayout {
    pub layers: Vec<usize>,
    /// Sliding window of every layer in the group, or None for full attention.
    pub window: Option<usize>,
}

/// Splits a model's layers into groups: full-attention layers, then sliding-window ones.
pub fn group_layouts(cfg: &ModelConfig) -> Vec<GroupLayout> {
    let global: Vec<usize> = (0..cfg.num_layers).filter(|&i| !cfg.is_sliding[i] || cfg.sliding_window.is_none()).collect();
    let sliding: Vec<usize> = (0..cfg.num_layers).filter(|&i| cfg.is_sliding[i] && cfg.sliding_window.is_some()).collect();
    let mut out = Vec::new();
    if !global.is_empty() {
        out.push(GroupLayout { layers: global, window: None });
    }
    if !sliding.is_empty() {
        out.push(GroupLayout { layers: sliding, window: cfg.sliding_window });
    }
    out
}

pub struct KvGroup {
    pub layout: GroupLayout,
    pub num_blocks: usize,
    /// One store per layer of the group, where the model computes.
    stores: Vec<Box<dyn KvLayer>>,
}

pub struct KvCache {
    pub block_size: usize,
    pub groups: Vec<KvGroup>,
    /// For each model layer: (group, index within the group).
    layer_slot: Vec<(usize, usize)>,
    /// Whether `copy_block` records its copies in `copies`: set by a tensor-parallel leader,
    /// which sends them to the other ranks with the next step.
    pub record_copies: bool,
    /// Block copies (group, from, to) made since the leader last sent a step.
    pub copies: Vec<(usize, u32, u32)>,
}

impl KvCache {
    /// A cache on the host (the CPU backend's stores) with `blocks[g]` blocks for group `g` of
    /// `group_layouts(cfg)`.
    pub fn new(cfg: &ModelConfig, block_size: usize, blocks: &[usize]) -> Result<KvCache> {
        Self::with_stores(cfg, block_size, blocks, |shape| Ok(Box::new(Cpu.kv_layer(shape)?)))
    }

    /// A cache whose layers' stores `make` creates (where the model computes).
    pub fn with_stores(cfg: &ModelConfig, block_size: usize, blocks: &[usize], make: impl Fn(KvShape) -> Result<Box<dyn KvLayer>>) -> Result<KvCache> {
        let layouts = group_layouts(cfg);
        assert_eq!(layouts.len(), blocks.len(), "one block count per group");
        let mut layer_slot = vec![(0, 0); cfg.num_layers];
        let mut groups = Vec::with_capacity(layouts.len());
        for (g, (layout, &num_blocks)) in layouts.into_iter().zip(blocks).enumerate() {
            for (j, &l) in layout.layers.iter().enumerate() {
                layer_slot[l] = (g, j);
            }
            let shape = KvShape { slots: num_blocks * block_size, kv_heads: cfg.num_kv_heads, head_dim: cfg.head_dim, precision: cfg.kv_precision };
            let stores = layout.layers.iter().map(|_| make(shape)).collect::<Result<Vec<_>>>()?;
            groups.push(KvGroup { layout, num_blocks, stores });
        }
        Ok(KvCache { block_size, groups, layer_slot, record_copies: false, copies: Vec::new() })
    }

    /// The group of `layer` and its storage.
    pub fn layer(&mut self, layer: usize) -> (usize, &mut dyn KvLayer) {
        let (g, j) = self.layer_slot[layer];
        (g, self.groups[g].stores[j].as_mut())
    }

    /// Copies block `from` onto block `to` in every layer of group `g`.
    pub fn copy_block(&mut self, g: usize, from: u32, to: u32) -> Result<()> {
        let bs = self.block_size;
        if self.record_copies {
            self.copies.push((g, from, to));
        }
        for store in &mut self.groups[g].stores {
            store.copy_slots(from as usize * bs, to as usize * bs, bs)?;
        }
        Ok(())
    }

    /// Bytes one block of each group occupies (keys and values).
    pub fn block_bytes(cfg: &ModelConfig, block_size: usize) -> Vec<usize> {
        let elem = cfg.kv_precision.bytes();
        group_layouts(cfg).iter().map(|g| g.layers.len() * cfg.num_kv_heads * cfg.head_dim * 2 * elem * block_size).collect()
    }
}
