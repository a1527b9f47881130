//! Self-attention: q/k/v projections, optional per-head q/k RMSNorm, rotary embeddings,
//! the write of new keys and values into the paged cache, attention over each sequence's
//! history, and the output projection.

use super::linear::{project, Linear, Projection};
use super::norm::RmsNorm;
use super::rope::{Rope, RopeTable};
use super::Compute;
use crate::error::Result;
use crate::models::batch::Batch;
use crate::models::scratch::LayerScratch;
use crate::parallel::Combine;
use kiln_kernels::attention::{attention, AttentionParams, KvStore, SeqSpan};
use kiln_kernels::pool::SharedMut;

#[derive(Clone, Copy, Debug)]
pub struct AttentionConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies raw q·k scores (1/sqrt(head_dim) for most models).
    pub score_scale: f32,
    /// Multiplies queries before the product instead (Gemma's query_pre_attn_scalar).
    pub query_scale: Option<f32>,
    pub sliding_window: Option<usize>,
    pub softcap: Option<f32>,
    pub rope: Rope,
}

/// What an attention block reads: the normed rows `[rows, hidden]`, the batch they belong to
/// and the rotary angles of their positions.
pub struct AttentionInput<'a> {
    pub x: &'a [f32],
    pub batch: &'a Batch,
    pub rope: &'a RopeTable,
    /// The cache group of this layer: which block tables and slots it uses.
    pub group: usize,
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub cfg: AttentionConfig,
    /// How the output projection gives every rank of a split model the whole result.
    pub combine: Combine,
}

impl Attention {
    /// Writes the block's output `[rows, hidden]` to `out`.
    pub fn forward(&self, compute: &Compute, input: &AttentionInput, kv: &mut KvStore, s: &mut LayerScratch, out: &mut [f32]) -> Result<()> {
        let AttentionInput { x, batch, rope, group } = *input;
        let c = &self.cfg;
        let rows = batch.num_rows();
        let (q_len, kv_len) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        s.q.resize(rows * q_len, 0.0);
        s.k.resize(rows * kv_len, 0.0);
        s.v.resize(rows * kv_len, 0.0);
        s.attn.resize(rows * q_len, 0.0);
        project(
            compute,
            x,
            rows,
            &mut s.acts,
            &mut [
                Projection { linear: &self.q_proj, out: &mut s.q },
                Projection { linear: &self.k_proj, out: &mut s.k },
                Projection { linear: &self.v_proj, out: &mut s.v },
            ],
        )?;
        let (q_all, k_all, v_all) = (SharedMut::new(&mut s.q), SharedMut::new(&mut s.k), &s.v);
        let writer = kv.writer();
        compute.pool.for_ranges(rows, 4, &|range| {
            for r in range {
                // SAFETY: every row's q and k, and its cache slot, belong to one thread.
                let (q, k) = unsafe { (q_all.slice(r * q_len..(r + 1) * q_len), k_all.slice(r * kv_len..(r + 1) * kv_len)) };
                if let Some(n) = &self.q_norm {
                    n.forward_in_place(q);
                }
                if let Some(n) = &self.k_norm {
                    n.forward_in_place(k);
                }
                rope.apply(&c.rope, r, q, c.head_dim);
                rope.apply(&c.rope, r, k, c.head_dim);
                if let Some(scale) = c.query_scale {
                    kiln_kernels::ops::scale_in_place(q, scale);
                }
                // SAFETY: each row of a batch has its own slot.
                unsafe { writer.write(batch.slots[group][r] as usize, k, &v_all[r * kv_len..(r + 1) * kv_len]) };
            }
        });
        let spans: Vec<SeqSpan> = batch
            .seqs
            .iter()
            .map(|seq| SeqSpan { rows: seq.rows.clone(), first_pos: seq.first_pos, block_table: &seq.block_tables[group], bidirectional: &seq.bidirectional })
            .collect();
        let params = AttentionParams {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: c.score_scale,
            window: c.sliding_window,
            softcap: c.softcap,
            block_size: batch.block_size,
        };
        attention(compute, &params, kv, &spans, &s.q, &mut s.attn, &mut s.attention);
        let attn = std::mem::take(&mut s.attn);
        let result = super::linear::project_out(compute, &self.combine, &self.o_proj, &attn, rows, s, out);
        s.attn = attn;
        result
    }
}
