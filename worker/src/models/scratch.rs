//! Buffers a forward pass works in, kept between passes so that a steady decode loop does
//! not allocate.

use crate::layers::rope::RopeTable;
use kiln_kernels::attention::AttentionScratch;
use kiln_kernels::matmul::Activations;

/// Buffers private to one layer's attention or MLP.
#[derive(Default)]
pub struct LayerScratch {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub attn: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub acts: Activations,
    pub attention: AttentionScratch,
    /// A split block's whole input, gathered from the ranks (exact layout).
    pub gathered: Vec<f32>,
    /// This rank's share of a split block's output rows, before they are gathered.
    pub partial: Vec<f32>,
    /// Rows that need logits, final-normed `[logit_rows, hidden]`.
    pub head_in: Vec<f32>,
    /// This rank's logits before they are gathered (or the logits themselves, moved out).
    pub head_out: Vec<f32>,
}

#[derive(Default)]
pub struct Scratch {
    /// Residual stream `[rows, hidden]`.
    pub x: Vec<f32>,
    /// Normed input of the current block `[rows, hidden]`.
    pub xn: Vec<f32>,
    /// Output of the current block `[rows, hidden]`.
    pub y: Vec<f32>,
    /// Rotary angles, one table per distinct frequency base of the model.
    pub rope: Vec<RopeTable>,
    /// What the CPU backend keeps of `rope` besides the tables themselves: nothing.
    pub host_rope_tables: Vec<()>,
    pub layer: LayerScratch,
    /// The buffers of a backend that keeps its rows off the host (see `backend::Flow`).
    pub device: Option<Box<dyn std::any::Any + Send>>,
    /// Receives intermediate tensors by name (llama.cpp's names, e.g. `l_out-3`) when set;
    /// used by tools that compare kiln with a reference implementation step by step.
    pub tap: Option<TapFn>,
}

pub type TapFn = Box<dyn FnMut(&str, &[f32]) + Send>;

impl Scratch {

    /// Sizes the row buffers for `rows` rows of `hidden` values.
    pub fn prepare(&mut self, rows: usize, hidden: usize) {
        for b in [&mut self.x, &mut self.xn, &mut self.y] {
            b.resize(rows * hidden, 0.0);
        }
    }
}
