//! kiln's attention kernels (crate `kiln-cuda-kernels`) as candle operations: attention over
//! the paged cache through the block table, and the write of a step's new keys and values
//! into their slots. On a CUDA device they launch the kernels' PTX; on candle's CPU device
//! they run the kernels' Rust reference, so that the arguments prepared here (block tables,
//! each row's key range, slots) are checked through whole models without a GPU.

use crate::error::{Error, Result};
use crate::kv_cache::NO_BLOCK;
use crate::models::batch::{Batch, SeqBatch};
use candle_core::{CpuStorage, CustomOp3, Device, InplaceOp2, Layout, Shape, Tensor};
use kiln_cuda_kernels as kernels;

/// Where the rows of one step read their keys, for one cache group, window and head shape:
/// made by the first layer that needs it and shared by the others.
pub struct StepKeys {
    ranges: kernels::KeyRanges,
    /// The same arrays on the device, for the kernel (None on candle's CPU device).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    on_device: Option<[Tensor; 4]>,
}

impl StepKeys {
    /// Rows of `batch` see their own position and before, within `window`, and the rest of
    /// an image they belong to, as far as this step has computed it; `shape` is the layers'
    /// (its block size the batch's).
    pub fn new(batch: &Batch, group: usize, window: Option<usize>, shape: kernels::AttentionShape, device: &Device) -> Result<StepKeys> {
        let max_blocks = batch.seqs.iter().map(|s| s.block_tables[group].len()).max().unwrap_or(0).max(1);
        let mut tables = vec![NO_BLOCK; batch.seqs.len() * max_blocks];
        let rows = batch.num_rows();
        let (mut row_seq, mut row_lo, mut row_hi) = (vec![0u32; rows], vec![0u32; rows], vec![0u32; rows]);
        for (s, seq) in batch.seqs.iter().enumerate() {
            tables[s * max_blocks..][..seq.block_tables[group].len()].copy_from_slice(&seq.block_tables[group]);
            for (i, row) in seq.rows.clone().enumerate() {
                let keys = visible_keys(seq, seq.first_pos + i, window);
                let (Some(r), Ok(lo), Ok(hi)) = (row_seq.get_mut(row), u32::try_from(keys.start), u32::try_from(keys.end)) else {
                    return Err(Error::Backend(format!("a batch's sequence takes rows {:?} of {rows}", seq.rows)));
                };
                *r = s as u32;
                row_lo[row] = lo;
                row_hi[row] = hi;
            }
        }
        let ranges = kernels::KeyRanges::new(tables, max_blocks, row_seq, row_lo, row_hi, shape).map_err(|e| Error::Backend(e.to_string()))?;
        let on_device = match device {
            Device::Cpu => None,
            _ => {
                let upload = |v: &[u32]| Tensor::from_slice(v, v.len(), device).map_err(|e| Error::Backend(format!("key ranges: {e}")));
                Some([upload(ranges.block_tables())?, upload(ranges.row_seq())?, upload(ranges.row_lo())?, upload(ranges.row_hi())?])
            }
        };
        Ok(StepKeys { ranges, on_device })
    }

    pub fn shape(&self) -> kernels::AttentionShape {
        self.ranges.shape()
    }
}

/// The positions of `seq` its row at position `pos` sees in this step: its own and before,
/// within `window`, and the rest of an image it belongs to as far as the step computes it.
pub fn visible_keys(seq: &SeqBatch, pos: usize, window: Option<usize>) -> std::ops::Range<usize> {
    let computed_end = seq.first_pos + seq.rows.len();
    let end = seq.bidirectional.iter().find(|r| r.contains(&pos)).map_or(pos + 1, |r| r.end).min(computed_end);
    let start = window.map_or(0, |w| pos.saturating_sub(w.saturating_sub(1)));
    start..end
}

/// The slots a step's new keys and values go to, for one cache group.
pub struct StepSlots {
    /// Checked once against the group's caches (inside them, none twice).
    slots: kernels::CacheSlots,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    on_device: Option<Tensor>,
}

impl StepSlots {
    pub fn new(slots: &[u32], cache_slots: usize, device: &Device) -> Result<StepSlots> {
        let slots = kernels::CacheSlots::new(slots.to_vec(), cache_slots).map_err(|e| Error::Backend(e.to_string()))?;
        let on_device = match device {
            Device::Cpu => None,
            _ => Some(Tensor::from_slice(slots.slots(), slots.slots().len(), device).map_err(|e| Error::Backend(format!("cache slots: {e}")))?),
        };
        Ok(StepSlots { slots, on_device })
    }
}

/// Attention of `q` (`[rows, heads * head_dim]`, f32) over the caches `k` and `v`
/// (`[slots, kv_heads * head_dim]`, f16 or f32) through `keys`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, keys: &StepKeys, scoring: kernels::Scoring) -> Result<Tensor> {
    let q = q.contiguous().map_err(|e| Error::Backend(format!("queries: {e}")))?;
    q.apply_op3_no_bwd(k, v, &PagedAttention { keys, scoring }).map_err(|e| Error::Backend(format!("paged attention: {e}")))
}

/// Writes row `r` of `src` (`[rows, width]`, f32) into slot `r` of `slots` in `cache`.
pub fn write_cache(cache: &Tensor, src: &Tensor, slots: &StepSlots) -> Result<()> {
    let src = src.contiguous().map_err(|e| Error::Backend(format!("cache write: {e}")))?;
    cache.inplace_op2(&src, &WriteCache { slots }).map_err(|e| Error::Backend(format!("cache write: {e}")))
}

struct PagedAttention<'a> {
    keys: &'a StepKeys,
    scoring: kernels::Scoring,
}

struct WriteCache<'a> {
    slots: &'a StepSlots,
}

pub(super) fn contiguous<'s, T>(values: &'s [T], layout: &Layout, what: &str) -> candle_core::Result<&'s [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) if end <= values.len() => Ok(&values[start..end]),
        _ => candle_core::bail!("{what} is not contiguous"),
    }
}

fn kernel_error(e: kernels::KernelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "kiln-paged-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let r = &self.keys.ranges;
        let CpuStorage::F32(q) = s1 else { candle_core::bail!("queries must be f32") };
        let q = contiguous(q, l1, "queries")?;
        let out = match (s2, s3) {
            (CpuStorage::F16(k), CpuStorage::F16(v)) => kernels::attention(r, &self.scoring, q, contiguous(k, l2, "key cache")?, contiguous(v, l3, "value cache")?),
            (CpuStorage::F32(k), CpuStorage::F32(v)) => kernels::attention(r, &self.scoring, q, contiguous(k, l2, "key cache")?, contiguous(v, l3, "value cache")?),
            _ => candle_core::bail!("the key and value caches must both be f16 or both f32"),
        }
        .map_err(kernel_error)?;
        Ok((CpuStorage::F32(out), Shape::from((r.rows(), r.shape().q_width()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout, s3: &candle_core::CudaStorage, l3: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::attention(self, s1, l1, s2, l2, s3, l3)
    }
}

impl InplaceOp2 for WriteCache<'_> {
    fn name(&self) -> &'static str {
        "kiln-write-cache"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let width = l1.dims().last().copied().unwrap_or(0);
        let CpuStorage::F32(src) = s2 else { candle_core::bail!("new keys and values must be f32") };
        let src = contiguous(src, l2, "new keys and values")?;
        if l1.contiguous_offsets() != Some((0, l1.shape().elem_count())) {
            candle_core::bail!("the cache is not one contiguous tensor");
        }
        match s1 {
            CpuStorage::F16(cache) => kernels::write_cache(cache, width, src, &self.slots.slots),
            CpuStorage::F32(cache) => kernels::write_cache(cache, width, src, &self.slots.slots),
            _ => candle_core::bail!("the cache must be f16 or f32"),
        }
        .map_err(kernel_error)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        cuda::write_cache(self, s1, l1, s2, l2)
    }
}

#[cfg(feature = "cuda")]
pub(super) mod cuda {
    //! The launches. Every size and index the kernels trust was checked on the host first
    //! (`KeyRanges::new`, `CacheSlots::new`, `check_buffers`, `check_write`, `Launch::check`).

    use super::{kernel_error, PagedAttention, WriteCache};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Shape, Storage, StorageRef};
    use kiln_cuda_kernels as kernels;

    const MODULE: &str = "kiln_attention";

    pub(in crate::backend) fn view<'a, T: DeviceRepr>(slice: &'a CudaSlice<T>, layout: &Layout, what: &str) -> candle_core::Result<CudaView<'a, T>> {
        match layout.contiguous_offsets() {
            Some((start, end)) if end <= slice.len() => Ok(slice.slice(start..end)),
            _ => candle_core::bail!("{what} is not contiguous"),
        }
    }

    /// The u32 device slices of `tensors`, through their storages held in `guards`.
    fn u32_slices<'g>(guards: &'g [StorageRef<'_>]) -> candle_core::Result<Vec<&'g CudaSlice<u32>>> {
        guards
            .iter()
            .map(|g| match &**g {
                Storage::Cuda(s) => s.as_cuda_slice::<u32>(),
                _ => candle_core::bail!("key ranges and slots must be on the GPU"),
            })
            .collect()
    }

    pub(super) fn attention(op: &PagedAttention, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let r = &op.keys.ranges;
        let shape = r.shape();
        let launch = kernels::Launch::default();
        launch.check(&shape).map_err(kernel_error)?;
        let Some([tables, row_seq, row_lo, row_hi]) = &op.keys.on_device else { candle_core::bail!("key ranges are not on the GPU") };
        let dev = s1.device().clone();
        let q = view(s1.as_cuda_slice::<f32>()?, l1, "queries")?;
        let name = match (s2.dtype(), s3.dtype()) {
            (DType::F16, DType::F16) => kernels::ATTENTION_F16,
            (DType::F32, DType::F32) => kernels::ATTENTION_F32,
            _ => candle_core::bail!("the key and value caches must both be f16 or both f32"),
        };
        // The kernel reads each cache from its start: they must be whole tensors.
        let (k_len, v_len) = (l2.shape().elem_count(), l3.shape().elem_count());
        if l2.contiguous_offsets() != Some((0, k_len)) || l3.contiguous_offsets() != Some((0, v_len)) {
            candle_core::bail!("the key and value caches are not whole contiguous tensors");
        }
        kernels::check_buffers(r, q.len(), k_len, v_len).map_err(kernel_error)?;
        let func = dev.get_or_load_custom_func(name, MODULE, kernels::PTX)?;
        let mut out = dev.alloc_zeros::<f32>(q.len())?;
        let ints: [i32; 6] = [shape.heads, shape.kv_heads, shape.head_dim, shape.block_size, r.max_blocks(), launch.chunk].map(|v| v as i32);
        let (scale, softcap, half) = (op.scoring.scale, op.scoring.softcap_arg(), i32::from(op.scoring.half_rounding));
        let cfg = LaunchConfig { grid_dim: (r.rows() as u32, shape.heads as u32, 1), block_dim: (launch.threads as u32, 1, 1), shared_mem_bytes: launch.shared_bytes(&shape) as u32 };
        let guards: Vec<StorageRef> = [tables, row_seq, row_lo, row_hi].iter().map(|t| t.storage_and_layout().0).collect();
        let ranges = u32_slices(&guards)?;
        let mut b = func.builder();
        b.arg(&mut out);
        b.arg(&q);
        match s2.dtype() {
            DType::F16 => {
                b.arg(s2.as_cuda_slice::<half::f16>()?);
                b.arg(s3.as_cuda_slice::<half::f16>()?);
            }
            _ => {
                b.arg(s2.as_cuda_slice::<f32>()?);
                b.arg(s3.as_cuda_slice::<f32>()?);
            }
        }
        for slice in &ranges {
            b.arg(*slice);
        }
        for v in &ints {
            b.arg(v);
        }
        b.arg(&scale);
        b.arg(&softcap);
        b.arg(&half);
        // SAFETY: the arguments match the kernel's parameters in order and type (the ranges
        // in the kernel's order: tables, row_seq, row_lo, row_hi), and every index it follows
        // was checked against these buffers.
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((r.rows(), shape.q_width()))))
    }

    pub(super) fn write_cache(op: &WriteCache, s1: &mut CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        let width = l1.dims().last().copied().unwrap_or(0);
        if l1.contiguous_offsets() != Some((0, l1.shape().elem_count())) {
            candle_core::bail!("the cache is not one contiguous tensor");
        }
        let slots = op.slots.slots.slots();
        if slots.is_empty() {
            return Ok(());
        }
        let Some(on_device) = &op.slots.on_device else { candle_core::bail!("cache slots are not on the GPU") };
        let dev = s1.device().clone();
        let src = view(s2.as_cuda_slice::<f32>()?, l2, "new keys and values")?;
        kernels::check_write(l1.shape().elem_count(), width, src.len(), &op.slots.slots).map_err(kernel_error)?;
        let name = match s1.dtype() {
            DType::F16 => kernels::WRITE_F16,
            DType::F32 => kernels::WRITE_F32,
            _ => candle_core::bail!("the cache must be f16 or f32"),
        };
        let func = dev.get_or_load_custom_func(name, MODULE, kernels::PTX)?;
        let cfg = LaunchConfig { grid_dim: (slots.len() as u32, 1, 1), block_dim: (kernels::WRITE_THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        let width = width as i32;
        let guards = [on_device.storage_and_layout().0];
        let device_slots = u32_slices(&guards)?;
        let mut b = func.builder();
        match s1.dtype() {
            DType::F16 => b.arg(s1.as_cuda_slice_mut::<half::f16>()?),
            _ => b.arg(s1.as_cuda_slice_mut::<f32>()?),
        };
        b.arg(&src);
        b.arg(device_slots[0]);
        b.arg(&width);
        // SAFETY: every slot is inside the cache and written once (CacheSlots::new, for the
        // cache size check_write matched), and `src` holds `width` values per slot.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::batch::Logits;

    fn shape(slots: usize) -> kernels::AttentionShape {
        kernels::AttentionShape { heads: 2, kv_heads: 1, head_dim: 4, block_size: 4, slots }
    }

    fn ranges(k: &StepKeys) -> Vec<(u32, u32, u32)> {
        let r = &k.ranges;
        (0..r.rows()).map(|i| (r.row_seq()[i], r.row_lo()[i], r.row_hi()[i])).collect()
    }

    #[test]
    fn rows_see_their_past_their_window_and_their_image() {
        let mut batch = Batch::new(4);
        // A sequence decoding at position 9, then one prefilling positions 0..6 whose
        // positions 2..8 are an image seen both ways (computed up to position 5 in this step).
        batch.push_seq(&[7], 9, vec![vec![5, 2, 0]], Logits::Last);
        batch.push_seq(&[1, 2, 3, 4, 5, 6], 0, vec![vec![1, 3]], Logits::Last);
        batch.seqs[1].bidirectional.push(2..8);
        let keys = StepKeys::new(&batch, 0, None, shape(24), &Device::Cpu).unwrap();
        assert_eq!(ranges(&keys), [(0, 0, 10), (1, 0, 1), (1, 0, 2), (1, 0, 6), (1, 0, 6), (1, 0, 6), (1, 0, 6)]);
        assert_eq!(keys.ranges.block_tables(), [5, 2, 0, 1, 3, NO_BLOCK]);
        let windowed = StepKeys::new(&batch, 0, Some(3), shape(24), &Device::Cpu).unwrap();
        assert_eq!(ranges(&windowed), [(0, 7, 10), (1, 0, 1), (1, 0, 2), (1, 0, 6), (1, 1, 6), (1, 2, 6), (1, 3, 6)]);
    }

    #[test]
    fn a_row_reading_a_freed_or_foreign_block_is_an_error() {
        let mut batch = Batch::new(4);
        batch.push_seq(&[7], 9, vec![vec![NO_BLOCK, 2, 0]], Logits::Last);
        // With a window of 4 the row reads positions 6..10, blocks 1 and 2 only.
        assert!(StepKeys::new(&batch, 0, Some(4), shape(12), &Device::Cpu).is_ok());
        let err = StepKeys::new(&batch, 0, None, shape(12), &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("query row 0: reads block 0 of its table, which holds no block"), "{err}");
        // Block 2 lies past a cache of 8 slots.
        let err = StepKeys::new(&batch, 0, Some(4), shape(8), &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("block 2 for a cache of 8 slots"), "{err}");
    }
}
