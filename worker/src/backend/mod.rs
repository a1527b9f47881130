//! Where a model's arithmetic runs. Each architecture in `models` is written once over the
//! `Backend` trait: its loader reads the file into the host layers of `layers` (weights
//! viewed in place in the mapping), the backend takes them over (`upload_*`), and its forward
//! pass is a sequence of backend operations on rows that live wherever the backend keeps
//! them.
//!
//! - `Cpu`: kiln's own kernels on the host (the layers as loaded, nothing copied).
//! - `Candle`: the same operations composed of candle tensors on a candle device; in builds
//!   without the `cuda` feature that is candle's CPU device, which is how the composition the
//!   CUDA backend runs is checked on machines without a GPU.

pub mod candle;
pub mod cpu;
mod half_product;
mod paged;

pub use self::candle::Candle;
pub use cpu::Cpu;

use crate::error::{Error, Result};
use crate::layers::attention::Attention;
use crate::layers::embedding::Embedding;
use crate::layers::mlp::GatedMlp;
use crate::layers::moe::MoeMlp;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::RopeTable;
use crate::layers::Compute;
use crate::models::batch::Batch;
use crate::models::scratch::{Scratch, TapFn};
use crate::models::{LmHead, Output};
use kiln_kernels::attention::KvPrecision;
use std::any::Any;

/// One layer's key/value storage, `[slot, kv_head, head_dim]` for keys and again for values,
/// wherever the backend keeps it. The block tables that say which slots a sequence uses stay
/// on the host (`kv_cache`).
pub trait KvLayer: Send {
    /// Copies slots `from..from + n` onto `to..to + n` (copy-on-write of a shared block).
    fn copy_slots(&mut self, from: usize, to: usize, n: usize) -> Result<()>;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The shape of one layer's key/value storage.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub slots: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub precision: KvPrecision,
}

/// Intermediate tensors of a block that tools comparing kiln with a reference can tap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Queries after norm and rotation (llama.cpp's `Qcur`).
    Query,
    /// Attention output before the output projection (`kqv_out`).
    AttnOut,
    /// The MLP's up projection (`ffn_up`).
    Up,
    /// The MLP's activated gate times up (`ffn_geglu`).
    Gated,
}

/// The buffers of one forward pass, borrowed from the caller's scratch.
pub struct Flow<'a, B: Backend> {
    /// Residual stream `[rows, hidden]`.
    pub x: &'a mut B::Rows,
    /// Normed input of the current block `[rows, hidden]`.
    pub xn: &'a mut B::Rows,
    /// Output of the current block `[rows, hidden]`.
    pub y: &'a mut B::Rows,
    /// Rotary angles on the host, one table per frequency base of the model.
    pub rope: &'a mut Vec<RopeTable>,
    /// The same tables where the backend reads them.
    pub rope_tables: &'a mut Vec<B::Rope>,
    /// Buffers private to a block.
    pub work: &'a mut B::Work,
    pub tap: &'a mut Option<TapFn>,
}

/// What an attention block reads besides its own weights.
pub struct AttendInput<'a, B: Backend> {
    /// The normed rows `[rows, hidden]`.
    pub x: &'a B::Rows,
    pub batch: &'a Batch,
    pub rope: &'a RopeTable,
    pub rope_table: &'a B::Rope,
    /// The cache group of this layer: which block tables and slots it uses.
    pub group: usize,
}

pub trait Backend: Sized + Send + Sync + 'static {
    /// Activations `[rows, width]`.
    type Rows: Send;
    /// A table of rotary angles as attention reads it.
    type Rope: Default + Send;
    /// Buffers private to one block, kept between passes.
    type Work: Send;
    type Norm: Send + Sync;
    type Attention: Send + Sync;
    type Mlp: Send + Sync;
    type Moe: Send + Sync;
    type Embedding: Send + Sync;
    type Head: Send + Sync;
    /// One layer's key/value storage.
    type Kv: KvLayer + 'static;

    /// A short name for messages ("cpu", "candle-cpu", "cuda:0 (...)").
    fn name(&self) -> String;

    /// Free and total bytes of the device's memory; None for the host.
    fn memory(&self) -> Option<(usize, usize)> {
        None
    }

    fn upload_norm(&self, n: RmsNorm) -> Result<Self::Norm>;
    fn upload_attention(&self, a: Attention) -> Result<Self::Attention>;
    fn upload_mlp(&self, m: GatedMlp) -> Result<Self::Mlp>;
    fn upload_moe(&self, m: MoeMlp) -> Result<Self::Moe>;
    fn upload_embedding(&self, e: Embedding) -> Result<Self::Embedding>;
    fn upload_head(&self, h: LmHead) -> Result<Self::Head>;
    fn kv_layer(&self, shape: KvShape) -> Result<Self::Kv>;

    /// This backend's buffers in `s`, sized for `rows` rows of `hidden` values.
    fn flow<'a>(&self, s: &'a mut Scratch, rows: usize, hidden: usize) -> Result<Flow<'a, Self>>;
    /// Makes `host` readable by attention.
    fn rope_table(&self, host: &RopeTable, out: &mut Self::Rope) -> Result<()>;
    /// The embeddings of `batch`'s tokens, with placed image embeddings on their rows.
    fn embed(&self, c: &Compute, e: &Self::Embedding, batch: &Batch, out: &mut Self::Rows) -> Result<()>;
    fn rms_norm(&self, c: &Compute, n: &Self::Norm, x: &Self::Rows, out: &mut Self::Rows) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Rows, y: &Self::Rows) -> Result<()>;
    /// Writes the batch's keys and values into `kv` and the block's output to `out`.
    fn attend(&self, c: &Compute, a: &Self::Attention, input: &AttendInput<Self>, kv: &mut Self::Kv, work: &mut Self::Work, out: &mut Self::Rows) -> Result<()>;
    fn mlp(&self, c: &Compute, m: &Self::Mlp, x: &Self::Rows, rows: usize, work: &mut Self::Work, out: &mut Self::Rows) -> Result<()>;
    fn moe(&self, c: &Compute, m: &Self::Moe, x: &Self::Rows, rows: usize, work: &mut Self::Work, out: &mut Self::Rows) -> Result<()>;
    /// Writes `output` for `batch.logit_rows` of the residual stream `x` to `out`, on the host.
    #[allow(clippy::too_many_arguments)]
    fn head(&self, c: &Compute, h: &Self::Head, batch: &Batch, x: &Self::Rows, work: &mut Self::Work, output: Output, out: &mut Vec<f32>) -> Result<()>;

    /// Hands `x` to the tap, as host values.
    fn tap(&self, tap: &mut TapFn, name: &str, x: &Self::Rows);
    /// Hands a block's intermediate `part` to the tap, where the backend keeps it.
    fn tap_part(&self, tap: &mut TapFn, name: &str, work: &Self::Work, part: Part);
}

/// `kv` as this backend's storage: a cache made for another backend is refused.
pub fn kv_of<'a, B: Backend>(kv: &'a mut dyn KvLayer, backend: &B) -> Result<&'a mut B::Kv> {
    kv.as_any_mut().downcast_mut::<B::Kv>().ok_or_else(|| Error::Backend(format!("a key/value cache made for another backend was handed to {}", backend.name())))
}

/// Hands `x` to the tap if one is installed; `name` is only built when it is.
#[inline]
pub fn tap<B: Backend>(b: &B, tap: &mut Option<TapFn>, name: impl FnOnce() -> String, x: &B::Rows) {
    if let Some(f) = tap.as_mut() {
        b.tap(f, &name(), x);
    }
}

/// `tap` for a block's intermediate.
#[inline]
pub fn tap_part<B: Backend>(b: &B, tap: &mut Option<TapFn>, name: impl FnOnce() -> String, work: &B::Work, part: Part) {
    if let Some(f) = tap.as_mut() {
        b.tap_part(f, &name(), work, part);
    }
}

/// Where a worker computes (`--device`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// kiln's kernels on the host.
    #[default]
    Cpu,
    /// The candle composition on candle's CPU device: what the CUDA backend runs, checked
    /// on the host (slow; for tests and comparisons).
    CandleCpu,
    /// CUDA device N, through candle (builds with the `cuda` feature).
    Cuda(usize),
}

impl Device {
    /// The kind of device, as the worker's `device` label in the cluster: cpu or cuda.
    pub fn kind(&self) -> &'static str {
        match self {
            Device::Cpu | Device::CandleCpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "candle-cpu" => Ok(Device::CandleCpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device `{s}`: expected cpu, cuda, cuda:N or candle-cpu")),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::CandleCpu => write!(f, "candle-cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Evaluates `$body` with `$b` bound to the backend for `$device` (each architecture's
/// loader is generic over the backend; this picks one at run time).
#[macro_export]
macro_rules! on_device {
    ($device:expr, $b:ident => $body:expr) => {
        match $device {
            $crate::backend::Device::Cpu => {
                let $b = $crate::backend::Cpu;
                $body
            }
            $crate::backend::Device::CandleCpu => {
                let $b = $crate::backend::Candle::cpu()?;
                $body
            }
            $crate::backend::Device::Cuda(n) => {
                let $b = $crate::backend::Candle::cuda(*n)?;
                $body
            }
        }
    };
}
