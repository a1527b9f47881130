//! Linear layers over any ggml weight format. Quantization is a property of the weight,
//! not of the model: the kernels pick the product for whatever format the file holds.

use super::weights::MatrixRef;
use super::Compute;
use crate::error::Result;
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
