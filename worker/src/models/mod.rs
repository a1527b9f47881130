//! Model architectures, each assembled from `layers`, and the registry that picks one by
//! the architecture name in the file.

pub mod batch;
pub mod bert;
pub mod config;
pub mod gemma3;
pub mod hf_config;
pub mod llama;
pub mod registry;
pub mod scratch;

use crate::backend::Backend;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::layers::{Compute, Linear, Projection, RmsNorm, WeightSource};
use batch::Batch;
use config::ModelConfig;
use scratch::{LayerScratch, Scratch};

/// What a forward pass writes for the rows of `Batch::logit_rows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Logits, `[rows, vocab_size]`.
    Logits,
    /// The final-normed hidden states, `[rows, hidden_size]` (embeddings from a decoder).
    Hidden,
}

/// A decoder-only language model.
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// Runs `batch`, storing its keys and values in `kv`, and writes `output` for
    /// `batch.logit_rows` to `out`.
    fn run(&self, compute: &Compute, batch: &Batch, kv: &mut KvCache, scratch: &mut Scratch, output: Output, out: &mut Vec<f32>) -> Result<()>;

    /// A key/value cache for this model with `blocks[g]` blocks of `block_size` slots for
    /// cache group `g`, kept where the model computes.
    fn kv_cache(&self, block_size: usize, blocks: &[usize]) -> Result<KvCache> {
        KvCache::new(self.config(), block_size, blocks)
    }

    /// Where the model computes ("cpu", "cuda:0 (...)").
    fn device(&self) -> String {
        "cpu".into()
    }

    /// Free and total bytes of the device's memory, for a model on a GPU; None on the host.
    fn device_memory(&self) -> Option<(usize, usize)> {
        None
    }

    /// `run` for the logits of `batch.logit_rows` (`[logit_rows, vocab_size]`).
    fn forward(&self, compute: &Compute, batch: &Batch, kv: &mut KvCache, scratch: &mut Scratch, logits: &mut Vec<f32>) -> Result<()> {
        self.run(compute, batch, kv, scratch, Output::Logits, logits)
    }
}

/// An encoder: every token's final hidden state, each sequence attending to all of itself.
pub trait Encoder: Send + Sync {
    fn hidden_size(&self) -> usize;

    /// Positions the model has embeddings for: the longest input it can read.
    fn max_positions(&self) -> usize;

    /// The hidden states of `seqs`, `[total tokens, hidden]`, sequences in order. A
    /// sequence's rows do not depend on the others in the batch.
    fn forward(&self, compute: &Compute, seqs: &[&[u32]], scratch: &mut Scratch, out: &mut Vec<f32>) -> Result<()>;
}

/// An architecture's forward pass over the layers it loaded onto backend `B`.
pub trait Architecture<B: Backend>: Send + Sync {
    /// `CausalLm::run`, on `b`, for a model of configuration `cfg`.
    #[allow(clippy::too_many_arguments)]
    fn run(&self, b: &B, cfg: &ModelConfig, compute: &Compute, batch: &Batch, kv: &mut KvCache, s: &mut Scratch, output: Output, out: &mut Vec<f32>) -> Result<()>;
}

/// A loaded architecture with the backend it computes on: what every architecture's loader
/// returns as its `CausalLm`.
pub struct OnBackend<B: Backend, A: Architecture<B>> {
    pub backend: B,
    /// The configuration as this rank computes it (its share of the heads).
    pub cfg: ModelConfig,
    pub model: A,
}

impl<B: Backend, A: Architecture<B>> CausalLm for OnBackend<B, A> {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn run(&self, compute: &Compute, batch: &Batch, kv: &mut KvCache, s: &mut Scratch, output: Output, out: &mut Vec<f32>) -> Result<()> {
        self.model.run(&self.backend, &self.cfg, compute, batch, kv, s, output, out)
    }

    fn kv_cache(&self, block_size: usize, blocks: &[usize]) -> Result<KvCache> {
        KvCache::with_stores(&self.cfg, block_size, blocks, |shape| Ok(Box::new(self.backend.kv_layer(shape)?)))
    }

    fn device(&self) -> String {
        self.backend.name()
    }

    fn device_memory(&self) -> Option<(usize, usize)> {
        self.backend.memory()
    }
}

/// Norm weights as the model uses them: `w + offset` (see `ModelConfig::norm_offset`).
pub fn offset(mut weight: Vec<f32>, offset: f32) -> Vec<f32> {
    if offset != 0.0 {
        weight.iter_mut().for_each(|w| *w += offset);
    }
    weight
}

/// The attention heads of this rank (all of them unless the model is split), and where its
/// slices of the q/k/v rows and o columns lie.
pub struct HeadShare {
    pub heads: crate::parallel::HeadSplit,
    pub head_dim: usize,
}

impl HeadShare {
    /// Splits the heads for `w`'s rank; `o_proj` (one layer's output projection) must split
    /// at the heads' columns in whole blocks of its format.
    pub fn new(cfg: &ModelConfig, w: &WeightSource, o_proj: &str) -> Result<HeadShare> {
        let (rank, size) = w.tp();
        let heads = crate::parallel::split_heads(cfg.num_heads, cfg.num_kv_heads, rank, size).map_err(|what| crate::error::Error::Sharding { size, what })?;
        let share = HeadShare { heads, head_dim: cfg.head_dim };
        if size > 1 && w.shard().is_some_and(|s| s.layout == crate::parallel::Layout::Megatron) {
            let block = w.column_block(o_proj, cfg.hidden_size, cfg.num_heads * cfg.head_dim)?;
            let cols = share.q_rows();
            if !cols.start.is_multiple_of(block) || !cols.len().is_multiple_of(block) {
                return Err(crate::error::Error::Sharding {
                    size,
                    what: format!("rank {rank}'s heads {:?} are columns {cols:?} of the output projection, which is stored in blocks of {block}", share.heads.q),
                });
            }
        }
        Ok(share)
    }

    pub fn q_rows(&self) -> std::ops::Range<usize> {
        self.heads.q.start * self.head_dim..self.heads.q.end * self.head_dim
    }

    pub fn kv_rows(&self) -> std::ops::Range<usize> {
        self.heads.kv.start * self.head_dim..self.heads.kv.end * self.head_dim
    }

    /// `cfg` as this rank computes it: its heads (what its KV cache holds).
    pub fn local_config(&self, cfg: &ModelConfig) -> ModelConfig {
        ModelConfig { num_heads: self.heads.q.len(), num_kv_heads: self.heads.kv.len(), ..cfg.clone() }
    }
}

/// Final norm and output projection, shared by every architecture.
pub struct LmHead {
    pub norm: RmsNorm,
    /// This rank's rows of the vocabulary (all of them unless the model is split).
    pub lm_head: Linear,
    pub softcap: Option<f32>,
    /// Gathers the ranks' logits to rank 0 when the vocabulary is split.
    pub shard: Option<crate::parallel::Shard>,
}

impl LmHead {
    /// The output projection is `lm_head.weight`, or the embedding table when tied.
    pub fn load(w: &WeightSource, cfg: &ModelConfig) -> Result<LmHead> {
        let name = if w.has("lm_head.weight") { "lm_head.weight" } else { "model.embed_tokens.weight" };
        // The same rows as the embedding table's, in whole groups of 16 (the packed kernels').
        let rows = w.even_split(cfg.vocab_size);
        let head = w.matrix_rows(name, cfg.vocab_size, cfg.hidden_size, rows)?;
        // Packed now, like every projection, not during the first request.
        head.packed();
        Ok(LmHead {
            norm: RmsNorm { weight: offset(w.vector("model.norm.weight", cfg.hidden_size)?, cfg.norm_offset), eps: cfg.rms_eps },
            lm_head: Linear { weight: head, bias: None },
            softcap: cfg.final_logit_softcap,
            shard: w.shard().filter(|s| s.size > 1).cloned(),
        })
    }

    /// Writes `output` for `batch.logit_rows` from the residual stream `x`.
    pub fn output(&self, compute: &Compute, batch: &Batch, x: &[f32], s: &mut LayerScratch, output: Output, out: &mut Vec<f32>) -> Result<()> {
        let hidden = self.norm.weight.len();
        let n = batch.logit_rows.len();
        s.head_in.resize(n * hidden, 0.0);
        for (i, &row) in batch.logit_rows.iter().enumerate() {
            self.norm.forward(&x[row * hidden..(row + 1) * hidden], &mut s.head_in[i * hidden..(i + 1) * hidden]);
        }
        if output == Output::Hidden {
            out.clear();
            out.extend_from_slice(&s.head_in);
            return Ok(());
        }
        let mut local = std::mem::take(&mut s.head_out);
        local.resize(n * self.lm_head.rows(), 0.0);
        crate::layers::project(compute, &s.head_in, n, &mut s.acts, &mut [Projection { linear: &self.lm_head, out: &mut local }])?;
        if let Some(cap) = self.softcap {
            for v in local.iter_mut() {
                *v = cap * (*v / cap).tanh();
            }
        }
        let Some(shard) = &self.shard else {
            std::mem::swap(out, &mut local);
            s.head_out = local;
            return Ok(());
        };
        // Rank 0 puts each row back together from the ranks' slices of the vocabulary.
        let gathered = shard.collective.gather(&local);
        s.head_out = local;
        out.clear();
        if let Some(parts) = gathered? {
            out.resize(parts.iter().map(Vec::len).sum(), 0.0);
            crate::parallel::join_rows(&parts, n, out)?;
        }
        Ok(())
    }
}
