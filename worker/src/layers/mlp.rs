//! Gated feed-forward block: `down(act(gate(x)) * up(x))`.

use super::linear::{project, Linear, Projection};
use super::Compute;
use crate::error::Result;
use crate::models::scratch::LayerScratch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama).
    Silu,
    /// GeGLU with the tanh approximation (Gemma).
    GeluTanh,
}

pub struct GatedMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub activation: Activation,
}

impl GatedMlp {
    /// `x` is `[rows, hidden]`; the result goes to `out` `[rows, hidden]`.
    pub fn forward(&self, compute: &Compute, x: &[f32], rows: usize, s: &mut LayerScratch, out: &mut [f32]) -> Result<()> {
        let inter = self.gate_proj.rows();
        s.gate.resize(rows * inter, 0.0);
        s.up.resize(rows * inter, 0.0);
        project(
            compute,
            x,
            rows,
            &mut s.acts,
            &mut [Projection { linear: &self.gate_proj, out: &mut s.gate }, Projection { linear: &self.up_proj, out: &mut s.up }],
        )?;
        match self.activation {
            Activation::Silu => kiln_kernels::ops::silu_mul(compute.isa, &mut s.gate, &s.up),
            Activation::GeluTanh => kiln_kernels::ops::gelu_mul(&mut s.gate, &s.up),
        }
        project(compute, &s.gate, rows, &mut s.acts, &mut [Projection { linear: &self.down_proj, out }])
    }
}
