//! Gated feed-forward block: `down(act(gate(x)) * up(x))`.

use super::linear::{project, Linear, Projection};
use super::Compute;
use crate::error::Result;
use super::WeightSource;
use crate::models::scratch::LayerScratch;
use crate::parallel::Combine;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama).
    Silu,
    /// GeGLU with the tanh approximation (Gemma), through llama.cpp's half-precision table.
    GeluTanh,
    /// The same, computed in f32 as PyTorch's `gelu(approximate="tanh")` does.
    GeluTanhExact,
}

fn gelu_tanh_mul(g: &mut [f32], u: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (x, &y) in g.iter_mut().zip(u) {
        let v = *x;
        *x = 0.5 * v * (1.0 + (SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)).tanh()) * y;
    }
}

pub struct GatedMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub activation: Activation,
    /// How the down projection gives every rank of a split model the whole result.
    pub combine: Combine,
}

impl GatedMlp {
    /// `gate`, `up` and `down` of a dense block, this rank's share of the `inter` hidden
    /// units when the model is split: gate and up by rows, down as the layout splits it.
    pub fn load(w: &WeightSource, [gate, up, down]: [&str; 3], inter: usize, hidden: usize, activation: Activation) -> Result<GatedMlp> {
        let range = w.inner_split(down, hidden, inter)?;
        let linear = |weight| Linear { weight, bias: None };
        Ok(GatedMlp {
            gate_proj: linear(w.linear_rows(gate, inter, hidden, range.clone())?),
            up_proj: linear(w.linear_rows(up, inter, hidden, range.clone())?),
            down_proj: linear(w.out_projection(down, hidden, inter, range)?),
            activation,
            combine: w.combine(),
        })
    }

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
        // Row by row: the activation functions group values from each row's start.
        let (gate, up) = (kiln_kernels::pool::SharedMut::new(&mut s.gate), &s.up);
        compute.pool.for_ranges(rows, 4, &|range| {
            for r in range {
                // SAFETY: each row is handled by one thread.
                let g = unsafe { gate.slice(r * inter..(r + 1) * inter) };
                let u = &up[r * inter..(r + 1) * inter];
                match self.activation {
                    Activation::Silu => kiln_kernels::ops::silu_mul(compute.isa, g, u),
                    Activation::GeluTanh => kiln_kernels::ops::gelu_mul(g, u),
                    Activation::GeluTanhExact => gelu_tanh_mul(g, u),
                }
            }
        });
        let gate = std::mem::take(&mut s.gate);
        let result = super::linear::project_out(compute, &self.combine, &self.down_proj, &gate, rows, s, out);
        s.gate = gate;
        result
    }
}
