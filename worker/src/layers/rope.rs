//! Rotary position embeddings: angles computed once per position and frequency base for a
//! whole forward pass, then applied to every head of every layer that shares them.

pub use kiln_kernels::ops::RopeStyle;
use kiln_kernels::ops;

#[derive(Clone, Copy, Debug)]
pub struct Rope {
    pub base: f32,
    pub rotary_dims: usize,
    pub style: RopeStyle,
}

/// cos/sin of every row's position: `[rows, rotary_dims / 2]` each.
#[derive(Default)]
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    /// Angles per row (`rotary_dims / 2`).
    pub fn half(&self) -> usize {
        self.half
    }

    pub fn fill(&mut self, rope: &Rope, positions: &[usize]) {
        self.half = rope.rotary_dims / 2;
        self.cos.resize(positions.len() * self.half, 0.0);
        self.sin.resize(positions.len() * self.half, 0.0);
        for (i, &p) in positions.iter().enumerate() {
            let range = i * self.half..(i + 1) * self.half;
            ops::rope_angles(p, rope.rotary_dims, rope.base, &mut self.cos[range.clone()], &mut self.sin[range]);
        }
    }

    /// Multimodal rotary angles (Qwen2-VL's M-RoPE): frequency `k` turns with the first
    /// position component for the first `sections[0]` frequencies, the second for the next
    /// `sections[1]`, the third for the rest.
    pub fn fill_sections(&mut self, rope: &Rope, positions: &[[usize; 3]], sections: &[usize; 3]) {
        self.half = rope.rotary_dims / 2;
        self.cos.resize(positions.len() * self.half, 0.0);
        self.sin.resize(positions.len() * self.half, 0.0);
        let (mut cos, mut sin) = ([vec![0.0; self.half], vec![0.0; self.half], vec![0.0; self.half]], [vec![0.0; self.half], vec![0.0; self.half], vec![0.0; self.half]]);
        for (i, p) in positions.iter().enumerate() {
            for c in 0..3 {
                ops::rope_angles(p[c], rope.rotary_dims, rope.base, &mut cos[c], &mut sin[c]);
            }
            for k in 0..self.half {
                let c = if k < sections[0] { 0 } else if k < sections[0] + sections[1] { 1 } else { 2 };
                self.cos[i * self.half + k] = cos[c][k];
                self.sin[i * self.half + k] = sin[c][k];
            }
        }
    }

    /// Rotates every `head_dim` piece of row `row` of `x` (`[heads * head_dim]`).
    pub fn apply(&self, rope: &Rope, row: usize, x: &mut [f32], head_dim: usize) {
        let range = row * self.half..(row + 1) * self.half;
        for head in x.chunks_exact_mut(head_dim) {
            ops::rope_apply(head, &self.cos[range.clone()], &self.sin[range.clone()], rope.style);
        }
    }
}
