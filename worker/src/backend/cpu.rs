//! kiln's own kernels on the host: the layers run as loaded, their weights in place in the
//! file's mapping, and rows are plain `f32` buffers kept in the caller's scratch.

use super::{AttendInput, Backend, Flow, KvLayer, KvShape, Part};
use crate::error::Result;
use crate::layers::attention::{Attention, AttentionInput};
use crate::layers::embedding::Embedding;
use crate::layers::mlp::GatedMlp;
use crate::layers::moe::MoeMlp;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::RopeTable;
use crate::layers::Compute;
use crate::models::batch::Batch;
use crate::models::scratch::{LayerScratch, Scratch, TapFn};
use crate::models::{LmHead, Output};
use kiln_kernels::attention::KvStore;
use std::any::Any;

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl KvLayer for KvStore {
    fn copy_slots(&mut self, from: usize, to: usize, n: usize) -> Result<()> {
        for i in 0..n {
            self.copy_slot(from + i, to + i);
        }
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Backend for Cpu {
    type Rows = Vec<f32>;
    /// Attention reads the host tables directly.
    type Rope = ();
    type Work = LayerScratch;
    type Norm = RmsNorm;
    type Attention = Attention;
    type Mlp = GatedMlp;
    type Moe = MoeMlp;
    type Embedding = Embedding;
    type Head = LmHead;
    type Kv = KvStore;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn upload_norm(&self, n: RmsNorm) -> Result<RmsNorm> {
        Ok(n)
    }

    fn upload_attention(&self, a: Attention) -> Result<Attention> {
        Ok(a)
    }

    fn upload_mlp(&self, m: GatedMlp) -> Result<GatedMlp> {
        Ok(m)
    }

    fn upload_moe(&self, m: MoeMlp) -> Result<MoeMlp> {
        Ok(m)
    }

    fn upload_embedding(&self, e: Embedding) -> Result<Embedding> {
        Ok(e)
    }

    fn upload_head(&self, h: LmHead) -> Result<LmHead> {
        Ok(h)
    }

    fn kv_layer(&self, s: KvShape) -> Result<KvStore> {
        Ok(KvStore::with_precision(s.slots, s.kv_heads, s.head_dim, s.precision))
    }

    fn flow<'a>(&self, s: &'a mut Scratch, rows: usize, hidden: usize) -> Result<Flow<'a, Cpu>> {
        s.prepare(rows, hidden);
        Ok(Flow { x: &mut s.x, xn: &mut s.xn, y: &mut s.y, rope: &mut s.rope, rope_tables: &mut s.host_rope_tables, work: &mut s.layer, tap: &mut s.tap })
    }

    fn rope_table(&self, _host: &RopeTable, _out: &mut ()) -> Result<()> {
        Ok(())
    }

    fn embed(&self, _c: &Compute, e: &Embedding, batch: &Batch, out: &mut Vec<f32>) -> Result<()> {
        e.forward(&batch.tokens, out)?;
        batch.apply_placed(out, e.table.cols())
    }

    fn rms_norm(&self, c: &Compute, n: &RmsNorm, x: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        n.forward_on(c, x, out);
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        kiln_kernels::ops::add_in_place(x, y);
        Ok(())
    }

    fn attend(&self, c: &Compute, a: &Attention, i: &AttendInput<Cpu>, kv: &mut KvStore, work: &mut LayerScratch, out: &mut Vec<f32>) -> Result<()> {
        a.forward(c, &AttentionInput { x: i.x, batch: i.batch, rope: i.rope, group: i.group }, kv, work, out)
    }

    fn mlp(&self, c: &Compute, m: &GatedMlp, x: &Vec<f32>, rows: usize, work: &mut LayerScratch, out: &mut Vec<f32>) -> Result<()> {
        m.forward(c, x, rows, work, out)
    }

    fn moe(&self, c: &Compute, m: &MoeMlp, x: &Vec<f32>, rows: usize, work: &mut LayerScratch, out: &mut Vec<f32>) -> Result<()> {
        m.forward(c, x, rows, work, out)
    }

    fn head(&self, c: &Compute, h: &LmHead, batch: &Batch, x: &Vec<f32>, work: &mut LayerScratch, output: Output, out: &mut Vec<f32>) -> Result<()> {
        h.output(c, batch, x, work, output, out)
    }

    fn tap(&self, tap: &mut TapFn, name: &str, x: &Vec<f32>) {
        tap(name, x);
    }

    fn tap_part(&self, tap: &mut TapFn, name: &str, work: &LayerScratch, part: Part) {
        let data = match part {
            Part::Query => &work.q,
            Part::AttnOut => &work.attn,
            Part::Up => &work.up,
            Part::Gated => &work.gate,
        };
        tap(name, data);
    }
}
