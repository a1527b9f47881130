//! The layers composed of candle tensor operations on a candle device: its CUDA device in
//! builds with the `cuda` feature, its CPU device everywhere (which checks the composition on
//! machines without a GPU).
//!
//! Weights are uploaded once at load: the ggml formats candle's quantized matmuls support stay
//! quantized, f16/bf16 weights stay 16-bit (`half_product`: inputs rounded to the weight's
//! format, sums in f32, as kiln's CPU kernels and llama.cpp round them), f32 weights are
//! multiplied in f32, and the rest are dequantized to f16 (with a warning naming them). On
//! candle's CPU device the f16/bf16 products are that same operation; the others are kiln's
//! own kernels: candle's CPU quantized matmul rounds differently from ggml and is not what
//! runs on a GPU, so it would only blur what that device checks, the composition. Keys and values live in
//! one device tensor per layer, `[slots, kv_heads * head_dim]`, in half precision for models
//! whose reference caches in half (GGUF) and f32 otherwise. Activations are f32.
//!
//! Attention and the cache writes are kiln's own kernels (`paged`): the block tables and each
//! row's key range reach the device once a step, and the kernel reads keys and values through
//! them. `KILN_CANDLE_ATTENTION=composed` computes attention from candle operations instead
//! (each sequence's keys gathered through its slots, a mask, a softmax): the cross-check the
//! GPU checks run the kernels against.
//!
//! Not yet on this backend: split (tensor-parallel) models; loading one fails with an error
//! naming what is missing.

use super::half_product::HalfProduct;
use super::paged::{self, StepKeys, StepSlots};
use super::{AttendInput, Backend, Flow, KvLayer, KvShape, Part};
use crate::error::{Error, Result};
use crate::layers::attention::{Attention, AttentionConfig};
use crate::layers::embedding::Embedding;
use crate::layers::linear::Linear;
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::moe::MoeMlp;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::{RopeStyle, RopeTable};
use crate::layers::weights::MatrixRef;
use crate::layers::Compute;
use crate::models::batch::Batch;
use crate::models::scratch::{Scratch, TapFn};
use crate::models::{LmHead, Output};
use crate::parallel::Combine;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{DType as TensorType, Device as TensorDevice, Module, Tensor};
use kiln_kernels::attention::KvPrecision;
use kiln_kernels::DType;
use std::any::Any;

pub struct Candle {
    device: TensorDevice,
    name: String,
    attention: AttentionPath,
}

/// How attention is computed on this backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    /// kiln's paged-attention kernel (its Rust reference on candle's CPU device).
    Kernels,
    /// candle operations over each sequence's gathered keys.
    Composed,
}

impl AttentionPath {
    /// From `KILN_CANDLE_ATTENTION` (`kernels`, the default, or `composed`).
    pub fn from_env() -> Result<AttentionPath> {
        match std::env::var("KILN_CANDLE_ATTENTION").ok().as_deref() {
            None | Some("") | Some("kernels") => Ok(AttentionPath::Kernels),
            Some("composed") => Ok(AttentionPath::Composed),
            Some(other) => Err(Error::Backend(format!("KILN_CANDLE_ATTENTION={other}: expected `kernels` or `composed`"))),
        }
    }
}

/// Candle's errors as kiln's, with what was being done.
trait OnDevice<T> {
    fn on_device(self, what: &str) -> Result<T>;
}

impl<T> OnDevice<T> for candle_core::Result<T> {
    fn on_device(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::Backend(format!("{what}: {e}")))
    }
}

impl Candle {
    /// candle's CPU device, attention as `KILN_CANDLE_ATTENTION` says.
    pub fn cpu() -> Result<Candle> {
        Ok(Candle { device: TensorDevice::Cpu, name: "candle-cpu".into(), attention: AttentionPath::from_env()? })
    }

    /// CUDA device `ordinal`.
    pub fn cuda(ordinal: usize) -> Result<Candle> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::cudarc::driver::CudaContext;
            let count = CudaContext::device_count().map_err(|e| Error::Backend(format!("--device cuda:{ordinal}: the NVIDIA driver reports no usable GPU ({e})")))?;
            if ordinal >= count.max(0) as usize {
                return Err(Error::Backend(format!("--device cuda:{ordinal}: this machine has {count} CUDA device(s)")));
            }
            let device = TensorDevice::new_cuda(ordinal).on_device(&format!("--device cuda:{ordinal}: cannot open the GPU"))?;
            let name = match &device {
                TensorDevice::Cuda(d) => {
                    let ctx = d.cuda_stream().context().clone();
                    let gpu = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
                    let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
                    let total = ctx.total_mem().unwrap_or(0);
                    format!("cuda:{ordinal} ({gpu}, {} MiB, sm_{major}{minor})", total >> 20)
                }
                _ => format!("cuda:{ordinal}"),
            };
            Ok(Candle { device, name, attention: AttentionPath::from_env()? })
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(Error::Backend(format!("--device cuda:{ordinal}: this worker was built without CUDA support (build it with `make build-cuda`)")))
        }
    }

    fn tensor(&self, values: &[f32], shape: (usize, usize), what: &str) -> Result<Tensor> {
        Tensor::from_slice(values, shape, &self.device).on_device(what)
    }

    fn linear(&self, l: Linear) -> Result<DeviceLinear> {
        let name = l.weight.name.clone();
        let half = match l.weight.dtype {
            DType::F16 => Some(TensorType::F16),
            DType::BF16 => Some(TensorType::BF16),
            _ => None,
        };
        if self.device.is_cpu() && half.is_none() {
            // On the host the products are kiln's own (see the module's notes), packed now as
            // the CPU backend packs them; the bias is added there too.
            l.weight.packed();
            return Ok(DeviceLinear { name, product: Product::Host(l), bias: None });
        }
        let w = &l.weight;
        let what = match self.memory() {
            // An upload that fails for room says how much there was.
            Some((free, total)) => format!("uploading `{name}` ({} MiB, with {} MiB of {} MiB free on {})", w.bytes().len() >> 20, free >> 20, total >> 20, self.name),
            None => format!("uploading `{name}`"),
        };
        let quantized = match w.dtype {
            DType::Q4_0 => Some(GgmlDType::Q4_0),
            DType::Q4_1 => Some(GgmlDType::Q4_1),
            DType::Q5_0 => Some(GgmlDType::Q5_0),
            DType::Q5_1 => Some(GgmlDType::Q5_1),
            DType::Q8_0 => Some(GgmlDType::Q8_0),
            DType::Q2K => Some(GgmlDType::Q2K),
            DType::Q3K => Some(GgmlDType::Q3K),
            DType::Q4K => Some(GgmlDType::Q4K),
            DType::Q5K => Some(GgmlDType::Q5K),
            DType::Q6K => Some(GgmlDType::Q6K),
            DType::F32 | DType::F16 | DType::BF16 | DType::Q8_1 | DType::Q8K => None,
        };
        let product = match (quantized, half, w.dtype) {
            (Some(format), _, _) => Product::Device(QMatMul::from_qtensor(qtensor_from_ggml(format, w.bytes(), vec![w.rows, w.cols], &self.device).on_device(&what)?).on_device(&what)?),
            // 16-bit weights stay 16-bit (`half_product`).
            (None, Some(dtype), _) => Product::Half(Tensor::from_raw_buffer(w.bytes(), dtype, &[w.rows, w.cols], &self.device).on_device(&what)?),
            (None, None, DType::F32) => Product::Device(QMatMul::Tensor(Tensor::from_raw_buffer(w.bytes(), TensorType::F32, &[w.rows, w.cols], &self.device).on_device(&what)?)),
            (None, None, format) => {
                let values = self.dequantized(w)?;
                // f16 holds these formats' values (an 8-bit integer times an f16 or f32
                // scale) to within its rounding unless a scale is huge; f32 then.
                if values.iter().all(|v| v.abs() <= f32::from(half::f16::MAX)) {
                    tracing::warn!(tensor = %name, ?format, "{name} has no quantized matmul on this device: dequantized to f16");
                    Product::Half(self.tensor(&values, (w.rows, w.cols), &what).and_then(|t| t.to_dtype(TensorType::F16).on_device(&what))?)
                } else {
                    tracing::warn!(tensor = %name, ?format, "{name} has no quantized matmul on this device and values past f16's range: dequantized to f32");
                    Product::Device(QMatMul::Tensor(self.tensor(&values, (w.rows, w.cols), &what)?))
                }
            }
        };
        let bias = l.bias.as_ref().map(|b| Tensor::from_slice(b, b.len(), &self.device)).transpose().on_device(&what)?;
        Ok(DeviceLinear { name, product, bias })
    }

    /// Every value of a weight in a format the device has no product for, in f32.
    fn dequantized(&self, w: &MatrixRef) -> Result<Vec<f32>> {
        let row_bytes = w.dtype.row_bytes(w.cols).ok_or_else(|| Error::Tensor { name: w.name.clone(), what: format!("{:?} rows of {} values", w.dtype, w.cols) })?;
        let mut values = vec![0.0f32; w.rows * w.cols];
        for (src, dst) in w.bytes().chunks_exact(row_bytes).zip(values.chunks_exact_mut(w.cols)) {
            kiln_kernels::dequant::dequantize_row(w.dtype, src, dst)?;
        }
        Ok(values)
    }

    fn norm(&self, n: &RmsNorm) -> Result<DeviceNorm> {
        Ok(DeviceNorm { weight: Tensor::from_slice(&n.weight, n.weight.len(), &self.device).on_device("uploading a norm")?, eps: n.eps })
    }
}

fn whole(combine: &Combine, what: &str) -> Result<()> {
    match combine {
        Combine::Whole => Ok(()),
        _ => Err(Error::Backend(format!("{what}: split (tensor-parallel) models do not run on the candle backend yet"))),
    }
}

/// How a linear layer's product is computed.
enum Product {
    /// candle's matmul on the device (quantized where the format allows).
    Device(QMatMul),
    /// A 16-bit weight, times inputs rounded to its format, summed in f32 (`half_product`).
    Half(Tensor),
    /// kiln's kernels, on candle's CPU device (bias included).
    Host(Linear),
}

pub struct DeviceLinear {
    /// The weight's name, for errors.
    name: String,
    product: Product,
    bias: Option<Tensor>,
}

impl DeviceLinear {
    fn forward(&self, c: &Compute, x: &Tensor) -> Result<Tensor> {
        let name = &self.name;
        let y = match &self.product {
            Product::Device(m) => m.forward(x).on_device(name)?,
            Product::Half(w) => x.to_dtype(w.dtype()).and_then(|x| x.contiguous()).and_then(|x| x.apply_op2_no_bwd(w, &HalfProduct)).on_device(name)?,
            Product::Host(l) => {
                let (rows, cols) = x.dims2().on_device(name)?;
                if cols != l.cols() {
                    return Err(Error::Backend(format!("{name}: input of width {cols} for a matrix of {} columns", l.cols())));
                }
                let input = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).on_device(name)?;
                let mut out = vec![0.0f32; rows * l.rows()];
                let mut acts = kiln_kernels::matmul::Activations::default();
                crate::layers::project(c, &input, rows, &mut acts, &mut [crate::layers::Projection { linear: l, out: &mut out }])?;
                Tensor::from_vec(out, (rows, l.rows()), x.device()).on_device(name)?
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b).on_device(name),
            None => Ok(y),
        }
    }
}

pub struct DeviceNorm {
    weight: Tensor,
    eps: f32,
}

impl DeviceNorm {
    /// Normalizes each `dim`-long piece of `x`'s rows.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dim = self.weight.dim(0).on_device("norm")?;
        let shape = x.shape().clone();
        let pieces = x.reshape(((), dim)).on_device("norm")?;
        candle_nn::ops::rms_norm(&pieces.contiguous().on_device("norm")?, &self.weight, self.eps).and_then(|y| y.reshape(shape)).on_device("rms norm")
    }
}

pub struct DeviceAttention {
    q: DeviceLinear,
    k: DeviceLinear,
    v: DeviceLinear,
    o: DeviceLinear,
    q_norm: Option<DeviceNorm>,
    k_norm: Option<DeviceNorm>,
    cfg: AttentionConfig,
}

pub struct DeviceMlp {
    gate: DeviceLinear,
    up: DeviceLinear,
    down: DeviceLinear,
    activation: Activation,
}

pub struct DeviceHead {
    norm: DeviceNorm,
    lm_head: DeviceLinear,
    softcap: Option<f32>,
}

/// Rows on the device; empty until a pass writes them.
#[derive(Default)]
pub struct Rows(Option<Tensor>);

impl Rows {
    fn get(&self) -> Result<&Tensor> {
        self.0.as_ref().ok_or_else(|| Error::Backend("rows read before a pass wrote them".into()))
    }
}

#[derive(Default)]
pub struct DeviceRope {
    cos: Option<Tensor>,
    sin: Option<Tensor>,
}

/// What a block leaves behind for taps, and the host buffer embeddings are looked up in.
#[derive(Default)]
pub struct Work {
    query: Option<Tensor>,
    attn: Option<Tensor>,
    up: Option<Tensor>,
    gated: Option<Tensor>,
    /// What the layers of a step share, made by the first that needs it: each sequence's key
    /// slots and mask for a cache group and window, and the slots new keys go to (by group
    /// and row width).
    views: std::collections::HashMap<(usize, Option<usize>), Vec<SeqView>>,
    write_slots: std::collections::HashMap<(usize, usize), Tensor>,
    /// The same for the kernels: key ranges by cache group, window and head shape; slots by
    /// cache group.
    step_keys: std::collections::HashMap<(usize, Option<usize>, [usize; 3]), StepKeys>,
    step_slots: std::collections::HashMap<usize, StepSlots>,
}

/// One sequence's keys as its queries see them in one step.
struct SeqView {
    /// Cache slots of the keys, oldest first.
    index: Tensor,
    /// `[1, 1, queries, keys]`: 0 where a query sees a key, -inf elsewhere.
    mask: Tensor,
    keys: usize,
}

/// The buffers of a pass, kept in `Scratch::device` between passes.
#[derive(Default)]
struct State {
    x: Rows,
    xn: Rows,
    y: Rows,
    rope: Vec<RopeTable>,
    rope_tables: Vec<DeviceRope>,
    work: Work,
}

/// One layer's keys and values, `[slots, kv_heads * head_dim]` each.
pub struct DeviceKv {
    k: Tensor,
    v: Tensor,
    precision: KvPrecision,
}

impl KvLayer for DeviceKv {
    fn copy_slots(&mut self, from: usize, to: usize, n: usize) -> Result<()> {
        for t in [&self.k, &self.v] {
            let src = t.narrow(0, from, n).and_then(|s| s.copy()).on_device("copying cache slots")?;
            t.slice_set(&src, 0, to).on_device("copying cache slots")?;
        }
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A mixture-of-experts block: the router and every expert on the device. Routing is decided
/// on the host (each row's top experts from the router's logits, the one read-back of the
/// block), then each chosen expert runs once over the rows that chose it.
pub struct DeviceMoe {
    router: DeviceLinear,
    experts: Vec<DeviceMlp>,
    top_k: usize,
    renormalize: bool,
}

impl Backend for Candle {
    type Rows = Rows;
    type Rope = DeviceRope;
    type Work = Work;
    type Norm = DeviceNorm;
    type Attention = DeviceAttention;
    type Mlp = DeviceMlp;
    type Moe = DeviceMoe;
    type Embedding = Embedding;
    type Head = DeviceHead;
    type Kv = DeviceKv;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn memory(&self) -> Option<(usize, usize)> {
        match &self.device {
            #[cfg(feature = "cuda")]
            TensorDevice::Cuda(d) => d.cuda_stream().context().mem_get_info().ok(),
            _ => None,
        }
    }

    fn upload_norm(&self, n: RmsNorm) -> Result<DeviceNorm> {
        self.norm(&n)
    }

    fn upload_attention(&self, a: Attention) -> Result<DeviceAttention> {
        whole(&a.combine, &a.o_proj.weight.name)?;
        Ok(DeviceAttention {
            q: self.linear(a.q_proj)?,
            k: self.linear(a.k_proj)?,
            v: self.linear(a.v_proj)?,
            o: self.linear(a.o_proj)?,
            q_norm: a.q_norm.as_ref().map(|n| self.norm(n)).transpose()?,
            k_norm: a.k_norm.as_ref().map(|n| self.norm(n)).transpose()?,
            cfg: a.cfg,
        })
    }

    fn upload_mlp(&self, m: GatedMlp) -> Result<DeviceMlp> {
        whole(&m.combine, &m.down_proj.weight.name)?;
        Ok(DeviceMlp { gate: self.linear(m.gate_proj)?, up: self.linear(m.up_proj)?, down: self.linear(m.down_proj)?, activation: m.activation })
    }

    fn upload_moe(&self, m: MoeMlp) -> Result<DeviceMoe> {
        whole(&m.combine, &m.router.weight.name)?;
        let experts = m.experts.into_iter().map(|e| self.upload_mlp(e)).collect::<Result<Vec<_>>>()?;
        Ok(DeviceMoe { router: self.linear(m.router)?, experts, top_k: m.top_k, renormalize: m.renormalize })
    }

    fn upload_embedding(&self, e: Embedding) -> Result<Embedding> {
        // Looked up on the host (rows of a quantized table dequantized as they are needed),
        // and only the batch's rows are sent to the device.
        whole(&e.combine, &e.table.weight.name)?;
        Ok(e)
    }

    fn upload_head(&self, h: LmHead) -> Result<DeviceHead> {
        if h.shard.is_some() {
            return Err(Error::Backend(format!("{}: split (tensor-parallel) models do not run on the candle backend yet", h.lm_head.weight.name)));
        }
        Ok(DeviceHead { norm: self.norm(&h.norm)?, lm_head: self.linear(h.lm_head)?, softcap: h.softcap })
    }

    fn kv_layer(&self, s: KvShape) -> Result<DeviceKv> {
        let dtype = match s.precision {
            KvPrecision::Half => TensorType::F16,
            KvPrecision::Full => TensorType::F32,
        };
        let shape = (s.slots, s.kv_heads * s.head_dim);
        let what = format!("allocating a key/value cache of {} slots", s.slots);
        Ok(DeviceKv {
            k: Tensor::zeros(shape, dtype, &self.device).on_device(&what)?,
            v: Tensor::zeros(shape, dtype, &self.device).on_device(&what)?,
            precision: s.precision,
        })
    }

    fn flow<'a>(&self, s: &'a mut Scratch, _rows: usize, _hidden: usize) -> Result<Flow<'a, Candle>> {
        if !s.device.as_ref().is_some_and(|d| d.is::<State>()) {
            s.device = Some(Box::new(State::default()));
        }
        let state = s.device.as_mut().and_then(|d| d.downcast_mut::<State>()).ok_or_else(|| Error::Backend("the pass's buffers are missing".into()))?;
        state.work.views.clear();
        state.work.write_slots.clear();
        state.work.step_keys.clear();
        state.work.step_slots.clear();
        Ok(Flow { x: &mut state.x, xn: &mut state.xn, y: &mut state.y, rope: &mut state.rope, rope_tables: &mut state.rope_tables, work: &mut state.work, tap: &mut s.tap })
    }

    fn rope_table(&self, host: &RopeTable, out: &mut DeviceRope) -> Result<()> {
        let half = host.half();
        let rows = host.cos.len() / half.max(1);
        out.cos = Some(self.tensor(&host.cos, (rows, half), "rotary angles")?);
        out.sin = Some(self.tensor(&host.sin, (rows, half), "rotary angles")?);
        Ok(())
    }

    fn embed(&self, _c: &Compute, e: &Embedding, batch: &Batch, out: &mut Rows) -> Result<()> {
        let hidden = e.table.cols();
        let mut host = vec![0.0; batch.tokens.len() * hidden];
        e.forward(&batch.tokens, &mut host)?;
        batch.apply_placed(&mut host, hidden)?;
        out.0 = Some(Tensor::from_vec(host, (batch.tokens.len(), hidden), &self.device).on_device("embeddings")?);
        Ok(())
    }

    fn rms_norm(&self, _c: &Compute, n: &DeviceNorm, x: &Rows, out: &mut Rows) -> Result<()> {
        out.0 = Some(n.forward(x.get()?)?);
        Ok(())
    }

    fn add(&self, x: &mut Rows, y: &Rows) -> Result<()> {
        let sum = (x.get()? + y.get()?).on_device("residual add")?;
        x.0 = Some(sum);
        Ok(())
    }

    fn attend(&self, cc: &Compute, a: &DeviceAttention, input: &AttendInput<Candle>, kv: &mut DeviceKv, work: &mut Work, out: &mut Rows) -> Result<()> {
        let c = &a.cfg;
        let batch = input.batch;
        let rows = batch.num_rows();
        let x = input.x.get()?;
        let heads = |t: Tensor, n: usize| t.reshape((rows, n, c.head_dim)).on_device("attention heads");
        let mut q = heads(a.q.forward(cc, x)?, c.num_heads)?;
        let mut k = heads(a.k.forward(cc, x)?, c.num_kv_heads)?;
        let v = a.v.forward(cc, x)?;
        if let Some(n) = &a.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &a.k_norm {
            k = n.forward(&k)?;
        }
        q = rotate(&q, input.rope_table, c)?;
        k = rotate(&k, input.rope_table, c)?;
        if let Some(scale) = c.query_scale {
            q = q.affine(f64::from(scale), 0.0).on_device("query scale")?;
        }
        let attn = match self.attention {
            AttentionPath::Kernels => self.attend_kernels(a, input, &q, &k, &v, kv, work)?,
            AttentionPath::Composed => self.attend_composed(a, input, &q, &k, &v, kv, work)?,
        };
        work.query = Some(q.reshape((rows, c.num_heads * c.head_dim)).on_device("queries")?);
        out.0 = Some(a.o.forward(cc, &attn)?);
        work.attn = Some(attn);
        Ok(())
    }

    fn mlp(&self, cc: &Compute, m: &DeviceMlp, x: &Rows, _rows: usize, work: &mut Work, out: &mut Rows) -> Result<()> {
        let (y, up, gated) = gated_mlp(cc, m, x.get()?)?;
        out.0 = Some(y);
        work.up = Some(up);
        work.gated = Some(gated);
        Ok(())
    }

    fn moe(&self, cc: &Compute, m: &DeviceMoe, x: &Rows, rows: usize, _work: &mut Work, out: &mut Rows) -> Result<()> {
        let x = x.get()?;
        let hidden = x.dim(1).on_device("expert input")?;
        let n_experts = m.experts.len();
        let logits = m.router.forward(cc, x)?.flatten_all().and_then(|t| t.to_vec1::<f32>()).on_device("router logits")?;
        if logits.len() != rows * n_experts {
            return Err(Error::Backend(format!("{}: {} router logits for {rows} rows of {n_experts} experts", m.router.name, logits.len())));
        }
        let mut assigned: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n_experts];
        for (r, row) in logits.chunks_exact(n_experts).enumerate() {
            for (e, w) in crate::layers::moe::route(row, m.top_k, m.renormalize) {
                assigned[e].0.push(r as u32);
                assigned[e].1.push(w);
            }
        }
        // Each row's weighted expert outputs added in expert order, as the CPU backend adds them.
        let mut sum = Tensor::zeros((rows, hidden), TensorType::F32, &self.device).on_device("expert outputs")?;
        for (expert, (picked, weights)) in m.experts.iter().zip(assigned) {
            if picked.is_empty() {
                continue;
            }
            let n = picked.len();
            let index = Tensor::from_vec(picked, n, &self.device).on_device("expert rows")?;
            let (y, _, _) = gated_mlp(cc, expert, &x.index_select(&index, 0).on_device("expert rows")?)?;
            let weights = Tensor::from_vec(weights, (n, 1), &self.device).on_device("expert weights")?;
            let weighted = y.broadcast_mul(&weights).on_device("expert weights")?;
            sum = sum.index_add(&index, &weighted, 0).on_device("expert outputs")?;
        }
        out.0 = Some(sum);
        Ok(())
    }

    fn head(&self, cc: &Compute, h: &DeviceHead, batch: &Batch, x: &Rows, _work: &mut Work, output: Output, out: &mut Vec<f32>) -> Result<()> {
        let picked: Vec<u32> = batch.logit_rows.iter().map(|&r| r as u32).collect();
        let n = picked.len();
        let index = Tensor::from_vec(picked, n, &self.device).on_device("logit rows")?;
        let normed = h.norm.forward(&x.get()?.index_select(&index, 0).on_device("logit rows")?)?;
        let result = match output {
            Output::Hidden => normed,
            Output::Logits => {
                let logits = h.lm_head.forward(cc, &normed)?;
                match h.softcap {
                    Some(cap) => soft_cap(&logits, cap).on_device("logit soft-cap")?,
                    None => logits,
                }
            }
        };
        *out = result.flatten_all().and_then(|t| t.to_vec1::<f32>()).on_device("reading logits back")?;
        Ok(())
    }

    fn tap(&self, tap: &mut TapFn, name: &str, x: &Rows) {
        if let Some(values) = x.0.as_ref().and_then(host_values) {
            tap(name, &values);
        }
    }

    fn tap_part(&self, tap: &mut TapFn, name: &str, work: &Work, part: Part) {
        let t = match part {
            Part::Query => &work.query,
            Part::AttnOut => &work.attn,
            Part::Up => &work.up,
            Part::Gated => &work.gated,
        };
        if let Some(values) = t.as_ref().and_then(host_values) {
            tap(name, &values);
        }
    }
}

/// A gated MLP over `x`: its output, and the up projection and gated activation (for taps).
fn gated_mlp(cc: &Compute, m: &DeviceMlp, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (gate, up) = (m.gate.forward(cc, x)?, m.up.forward(cc, x)?);
    let act = match m.activation {
        Activation::Silu => gate.silu(),
        // candle's GELU is the tanh approximation, computed in f32.
        Activation::GeluTanh | Activation::GeluTanhExact => gate.gelu(),
    };
    let gated = act.and_then(|g| g * &up).on_device("gated activation")?;
    Ok((m.down.forward(cc, &gated)?, up, gated))
}

/// `cap * tanh(t / cap)` (Gemma 2's soft-capping of scores and logits).
fn soft_cap(t: &Tensor, cap: f32) -> candle_core::Result<Tensor> {
    t.affine(1.0 / f64::from(cap), 0.0)?.tanh()?.affine(f64::from(cap), 0.0)
}

/// `t`'s values on the host, for a tap (which skips what cannot be read back).
fn host_values(t: &Tensor) -> Option<Vec<f32>> {
    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok()
}

/// Rotates the first `rotary_dims` values of each head of `x` (`[rows, heads, head_dim]`)
/// by the rows' angles.
fn rotate(x: &Tensor, rope: &DeviceRope, c: &AttentionConfig) -> Result<Tensor> {
    let (Some(cos), Some(sin)) = (&rope.cos, &rope.sin) else {
        return Err(Error::Backend("rotary angles used before they were uploaded".into()));
    };
    let rot = c.rope.rotary_dims;
    let part = x.narrow(2, 0, rot).on_device("rope")?;
    let rotated = match c.rope.style {
        // candle's kernels: (batch, rows, heads, dims) for halves, (batch, heads, rows, dims)
        // for adjacent pairs.
        RopeStyle::SplitHalf => part.unsqueeze(0).and_then(|p| p.contiguous()).and_then(|p| candle_nn::rotary_emb::rope_thd(&p, cos, sin)).and_then(|p| p.squeeze(0)),
        RopeStyle::Interleaved => part
            .transpose(0, 1)
            .and_then(|p| p.unsqueeze(0))
            .and_then(|p| p.contiguous())
            .and_then(|p| candle_nn::rotary_emb::rope_i(&p, cos, sin))
            .and_then(|p| p.squeeze(0))
            .and_then(|p| p.transpose(0, 1)),
    }
    .on_device("rope")?;
    if rot == c.head_dim {
        return Ok(rotated);
    }
    let rest = x.narrow(2, rot, c.head_dim - rot).on_device("rope")?;
    Tensor::cat(&[&rotated, &rest], 2).on_device("rope")
}

impl Candle {
    /// Attention through kiln's kernels: the new keys and values written into their slots,
    /// then every row's queries against its key range, read through the block tables.
    #[allow(clippy::too_many_arguments)]
    fn attend_kernels(&self, a: &DeviceAttention, input: &AttendInput<Candle>, q: &Tensor, k: &Tensor, v: &Tensor, kv: &mut DeviceKv, work: &mut Work) -> Result<Tensor> {
        let c = &a.cfg;
        let batch = input.batch;
        let rows = batch.num_rows();
        let kv_width = c.num_kv_heads * c.head_dim;
        let cache_slots = kv.k.dim(0).on_device("cache")?;
        let slots = match work.step_slots.entry(input.group) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(StepSlots::new(&batch.slots[input.group], cache_slots, &self.device)?),
        };
        for (cache, new) in [(&kv.k, k), (&kv.v, v)] {
            paged::write_cache(cache, &new.reshape((rows, kv_width)).on_device("cache write")?, slots)?;
        }
        let keys = match work.step_keys.entry((input.group, c.sliding_window, [c.num_heads, c.num_kv_heads, c.head_dim])) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let shape = kiln_cuda_kernels::AttentionShape { heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim, block_size: batch.block_size, slots: cache_slots };
                e.insert(StepKeys::new(batch, input.group, c.sliding_window, shape, &self.device)?)
            }
        };
        if keys.shape().slots != cache_slots {
            return Err(Error::Backend(format!("a layer's cache of {cache_slots} slots in a group of {}", keys.shape().slots)));
        }
        let scoring = kiln_cuda_kernels::Scoring { scale: c.score_scale, softcap: c.softcap, half_rounding: kv.precision == KvPrecision::Half };
        paged::attention(&q.reshape((rows, c.num_heads * c.head_dim)).on_device("queries")?, &kv.k, &kv.v, keys, scoring)
    }

    /// Attention composed of candle operations: each sequence's keys gathered through its
    /// slots, scored against its queries under a mask.
    #[allow(clippy::too_many_arguments)]
    fn attend_composed(&self, a: &DeviceAttention, input: &AttendInput<Candle>, q: &Tensor, k: &Tensor, v: &Tensor, kv: &mut DeviceKv, work: &mut Work) -> Result<Tensor> {
        let c = &a.cfg;
        let batch = input.batch;
        let rows = batch.num_rows();
        // New keys and values into their slots.
        let kv_width = c.num_kv_heads * c.head_dim;
        let index = match work.write_slots.entry((input.group, kv_width)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let slots: Vec<u32> = batch.slots[input.group].to_vec();
                e.insert(
                    Tensor::from_vec(slots, (rows, 1), &self.device)
                        .and_then(|i| i.broadcast_as((rows, kv_width)))
                        .and_then(|i| i.contiguous())
                        .on_device("cache slots")?,
                )
            }
        };
        let store = |cache: &Tensor, t: &Tensor| -> Result<()> {
            let t = t.reshape((rows, kv_width)).and_then(|t| t.to_dtype(cache.dtype())).and_then(|t| t.contiguous()).on_device("cache write")?;
            cache.scatter_set(index, &t, 0).on_device("cache write")
        };
        store(&kv.k, k)?;
        store(&kv.v, v)?;
        // Each sequence's queries against its history, read back through its block table.
        let views = match work.views.entry((input.group, c.sliding_window)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.seq_views(batch, input.group, c.sliding_window)?),
        };
        let mut outs = Vec::with_capacity(views.len());
        for (seq, view) in batch.seqs.iter().zip(views.iter()) {
            let q_seq = q.narrow(0, seq.rows.start, seq.rows.len()).on_device("queries")?;
            outs.push(self.attend_seq(c, kv, view, &q_seq)?);
        }
        Tensor::cat(&outs, 0).on_device("attention output")
    }

    /// Each sequence's key slots and mask for cache group `group` under `window`, in the
    /// order of `batch.seqs`, whose rows must follow one another from row 0.
    fn seq_views(&self, batch: &Batch, group: usize, window: Option<usize>) -> Result<Vec<SeqView>> {
        let mut next_row = 0;
        let mut views = Vec::with_capacity(batch.seqs.len());
        for seq in &batch.seqs {
            if seq.rows.start != next_row || seq.rows.is_empty() {
                return Err(Error::Backend(format!("a batch's sequence takes rows {:?} where row {next_row} was next", seq.rows)));
            }
            next_row = seq.rows.end;
            let (n, first_pos, table) = (seq.rows.len(), seq.first_pos, &seq.block_tables[group]);
            let last_pos = first_pos + n - 1;
            // The keys any of the queries sees: a window reaches back from the first query.
            let first_key = paged::visible_keys(seq, first_pos, window).start;
            let keys = last_pos + 1 - first_key;
            let bs = batch.block_size;
            let mut slots = Vec::with_capacity(keys);
            for p in first_key..=last_pos {
                let Some(block) = table.get(p / bs).copied().filter(|&b| b != crate::kv_cache::NO_BLOCK) else {
                    return Err(Error::Backend(format!("position {p} has no cache block (table of {} blocks)", table.len())));
                };
                slots.push(block * bs as u32 + (p % bs) as u32);
            }
            // Which keys each query sees: its own position and before, within the window, and
            // the rest of an image it belongs to.
            let mut mask = vec![f32::NEG_INFINITY; n * keys];
            for i in 0..n {
                for kp in paged::visible_keys(seq, first_pos + i, window) {
                    mask[i * keys + kp - first_key] = 0.0;
                }
            }
            views.push(SeqView {
                index: Tensor::from_vec(slots, keys, &self.device).on_device("key slots")?,
                mask: Tensor::from_vec(mask, (1, 1, n, keys), &self.device).on_device("attention mask")?,
                keys,
            });
        }
        if next_row != batch.num_rows() {
            return Err(Error::Backend(format!("a batch's sequences cover {next_row} of its {} rows", batch.num_rows())));
        }
        Ok(views)
    }

    /// One sequence's queries `[n, heads, head_dim]` against its keys and values, read from
    /// the cache through `view`; the result is `[n, heads * head_dim]`.
    fn attend_seq(&self, c: &AttentionConfig, kv: &DeviceKv, view: &SeqView, q: &Tensor) -> Result<Tensor> {
        let n = q.dim(0).on_device("queries")?;
        let (keys, index) = (view.keys, &view.index);
        let (kvh, hd) = (c.num_kv_heads, c.head_dim);
        let group = c.num_heads / kvh;
        let gather = |cache: &Tensor| {
            cache
                .index_select(index, 0)
                .and_then(|t| t.to_dtype(TensorType::F32))
                .and_then(|t| t.reshape((keys, kvh, hd)))
                .and_then(|t| t.transpose(0, 1))
                .and_then(|t| t.contiguous())
                .on_device("reading the cache")
        };
        let (k, v) = (gather(&kv.k)?, gather(&kv.v)?);
        let half = kv.precision == KvPrecision::Half;
        // Queries grouped by the key/value head they share: [kv_heads, group * n, head_dim].
        let mut q = q
            .reshape((n, kvh, group, hd))
            .and_then(|t| t.permute((1, 2, 0, 3)))
            .and_then(|t| t.reshape((kvh, group * n, hd)))
            .and_then(|t| t.contiguous())
            .on_device("queries")?;
        if half {
            // A half-precision cache multiplies half-precision queries (as llama.cpp does).
            q = q.to_dtype(TensorType::F16).and_then(|t| t.to_dtype(TensorType::F32)).on_device("queries")?;
        }
        let mut scores = q.matmul(&k.t().on_device("keys")?).and_then(|s| s.affine(f64::from(c.score_scale), 0.0)).on_device("attention scores")?;
        if let Some(cap) = c.softcap {
            scores = soft_cap(&scores, cap).on_device("score soft-cap")?;
        }
        let scores = scores.reshape((kvh, group, n, keys)).and_then(|s| s.broadcast_add(&view.mask)).on_device("attention mask")?;
        let mut probs = candle_nn::ops::softmax_last_dim(&scores).on_device("softmax")?;
        if half {
            probs = probs.to_dtype(TensorType::F16).and_then(|t| t.to_dtype(TensorType::F32)).on_device("softmax")?;
        }
        probs
            .reshape((kvh, group * n, keys))
            .and_then(|p| p.matmul(&v))
            .and_then(|o| o.reshape((kvh, group, n, hd)))
            .and_then(|o| o.permute((2, 0, 1, 3)))
            .and_then(|o| o.reshape((n, kvh * group * hd)))
            .on_device("attention output")
    }
}
