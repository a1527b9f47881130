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

use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::layers::{Compute, Linear, Projection, RmsNorm, WeightSource};
use batch::Batch;
use config::ModelConfig;
use scratch::Scratch;

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

/// Norm weights as the model uses them: `w + offset` (see `ModelConfig::norm_offset`).
pub fn offset(mut weight: Vec<f32>, offset: f32) -> Vec<f32> {
    if offset != 0.0 {
        weight.iter_mut().for_each(|w| *w += offset);
    }
    weight
}

/// Final norm and output projection, shared by every architecture.
pub struct LmHead {
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub softcap: Option<f32>,
}

impl LmHead {
    /// The output projection is `lm_head.weight`, or the embedding table when tied.
    pub fn load(w: &WeightSource, cfg: &ModelConfig) -> Result<LmHead> {
        let name = if w.has("lm_head.weight") { "lm_head.weight" } else { "model.embed_tokens.weight" };
        let head = w.matrix(name, cfg.vocab_size, cfg.hidden_size)?;
        // Packed now, like every projection, not during the first request.
        head.packed();
        Ok(LmHead {
            norm: RmsNorm { weight: offset(w.vector("model.norm.weight", cfg.hidden_size)?, cfg.norm_offset), eps: cfg.rms_eps },
            lm_head: Linear { weight: head, bias: None },
            softcap: cfg.final_logit_softcap,
        })
    }

    /// Writes `output` for `batch.logit_rows` from the residual stream `s.x`.
    pub fn output(&self, compute: &Compute, batch: &Batch, s: &mut Scratch, output: Output, out: &mut Vec<f32>) -> Result<()> {
        let hidden = self.norm.weight.len();
        let n = batch.logit_rows.len();
        s.head_in.resize(n * hidden, 0.0);
        for (i, &row) in batch.logit_rows.iter().enumerate() {
            self.norm.forward(&s.x[row * hidden..(row + 1) * hidden], &mut s.head_in[i * hidden..(i + 1) * hidden]);
        }
        if output == Output::Hidden {
            out.clear();
            out.extend_from_slice(&s.head_in);
            return Ok(());
        }
        let logits = out;
        logits.resize(n * self.lm_head.rows(), 0.0);
        crate::layers::project(compute, &s.head_in, n, &mut s.layer.acts, &mut [Projection { linear: &self.lm_head, out: logits }])?;
        if let Some(cap) = self.softcap {
            for v in logits.iter_mut() {
                *v = cap * (*v / cap).tanh();
            }
        }
        Ok(())
    }
}
