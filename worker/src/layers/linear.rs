//! Linear layers over any ggml weight format. Quantization is a property of the weight,
//! not of the model: the kernels pick the product for whatever format the file holds.

use super::weights::MatrixRef;
use super::Compute;
use crate::error::Result;
use crate::models::scratch::LayerScratch;
use crate::parallel::{gather_rows, Combine};
use kiln_kernels::matmul::{matmul_group, Activations, MatMulJob};
use kiln_kernels::DType;

pub struct Linear {
    pub weight: MatrixRef,
    /// Added to every output row (Qwen2's q/k/v projections carry one).
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn rows(&self) -> usize {
        self.weight.rows
    }

    pub fn cols(&self) -> usize {
        self.weight.cols
    }
}

/// One linear layer of a grouped projection and where its output goes (`[num_rows, rows]`).
pub struct Projection<'a, 'b> {
    pub linear: &'a Linear,
    pub out: &'b mut [f32],
}

/// The output projection of a split block (o, down) from this rank's share of its input
/// `[num_rows, share]`, the whole result `[num_rows, hidden]` going to `out` on every rank.
pub fn project_out(compute: &Compute, combine: &Combine, linear: &Linear, input: &[f32], num_rows: usize, s: &mut LayerScratch, out: &mut [f32]) -> Result<()> {
    match combine {
        Combine::Whole => project(compute, input, num_rows, &mut s.acts, &mut [Projection { linear, out }]),
        Combine::Sum(c) => {
            project(compute, input, num_rows, &mut s.acts, &mut [Projection { linear, out: &mut *out }])?;
            Ok(c.all_reduce_sum(&mut out[..num_rows * linear.rows()])?)
        }
        Combine::Gather(c) => {
            let (mut whole, mut mine) = (std::mem::take(&mut s.gathered), std::mem::take(&mut s.partial));
            whole.resize(num_rows * linear.cols(), 0.0);
            mine.resize(num_rows * linear.rows(), 0.0);
            let result = gather_rows(c.as_ref(), input, num_rows, &mut whole)
                .map_err(crate::error::Error::from)
                .and_then(|()| project(compute, &whole, num_rows, &mut s.acts, &mut [Projection { linear, out: &mut mine }]))
                .and_then(|()| Ok(gather_rows(c.as_ref(), &mine, num_rows, out)?));
            (s.gathered, s.partial) = (whole, mine);
            result
        }
    }
}

/// Computes several linear layers that read the same input (`[num_rows, cols]`): the input
/// is converted once per activation format, and layers sharing a format run in one dispatch.
pub fn project(compute: &Compute, input: &[f32], num_rows: usize, acts: &mut Activations, projections: &mut [Projection]) -> Result<()> {
    let mut done = vec![false; projections.len()];
    for i in 0..projections.len() {
        if done[i] {
            continue;
        }
        let act_type: DType = projections[i].linear.weight.dtype.activation_type();
        acts.prepare_on(Some(compute), input, num_rows, projections[i].linear.cols(), projections[i].linear.weight.dtype)?;
        let mut jobs = Vec::new();
        for (j, p) in projections.iter_mut().enumerate().skip(i) {
            if !done[j] && p.linear.weight.dtype.activation_type() == act_type {
                done[j] = true;
                jobs.push(MatMulJob { weight: p.linear.weight.view(), packed: p.linear.weight.packed(), out: &mut *p.out });
            }
        }
        matmul_group(compute, acts, &mut jobs)?;
    }
    for p in projections.iter_mut() {
        if let Some(bias) = &p.linear.bias {
            for row in p.out.chunks_exact_mut(bias.len()).take(num_rows) {
                kiln_kernels::ops::add_in_place(row, bias);
            }
        }
    }
    Ok(())
}
