//! Matrix products `out[t, r] = dot(weight[r, :], x[t, :])` over quantized weights.
//!
//! Activations are first converted to the weight format's activation type (see
//! `DType::activation_type`), then rows are split across the thread pool. Several matrices
//! that read the same input (q/k/v, gate/up) run in one pool dispatch.

use crate::activation;
use crate::blocks::{cast_blocks_mut, BlockQ8K, BlockQ8_0, BlockQ8_1};
use crate::dot::{kernel_for_matrix, DotFn};
use crate::dtype::DType;
use crate::pool::{split_range, SharedMut};
use crate::{Compute, KernelError};

/// A row-major `[rows, cols]` weight matrix viewed in place.
#[derive(Clone, Copy)]
pub struct WeightView<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl<'a> WeightView<'a> {
    /// Checks that `bytes` holds exactly `rows` rows of `cols` values of `dtype`.
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: &'a [u8]) -> Result<Self, KernelError> {
        if !dtype.is_weight_type() {
            return Err(KernelError::Unsupported(format!("{dtype} cannot be a weight format")));
        }
        let row_bytes = dtype
            .row_bytes(cols)
            .ok_or_else(|| KernelError::Shape(format!("{cols} columns are not whole {dtype} blocks of {}", dtype.block_len())))?;
        if row_bytes.checked_mul(rows) != Some(bytes.len()) {
            return Err(KernelError::Shape(format!(
                "{rows}x{cols} {dtype} needs {} bytes, found {}",
                row_bytes.saturating_mul(rows),
                bytes.len()
            )));
        }
        if dtype != DType::F32 && !(bytes.as_ptr() as usize).is_multiple_of(2) {
            return Err(KernelError::Layout("weight data is not aligned for its format"));
        }
        Ok(WeightView { dtype, rows, cols, bytes })
    }

    pub fn row_bytes(&self) -> usize {
        self.bytes.len() / self.rows.max(1)
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.bytes[r * n..(r + 1) * n]
    }
}

/// A growable byte buffer aligned for every block type.
#[derive(Default)]
pub struct AlignedBuf {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBuf {
    pub fn resize(&mut self, len: usize) {
        let words = len.div_ceil(8);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
        self.len = len;
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: u64 storage reinterpreted as bytes, within its length.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
}

/// Input rows converted to one activation format; reused across steps to avoid allocation.
#[derive(Default)]
pub struct Activations {
    dtype: Option<DType>,
    cols: usize,
    num_rows: usize,
    row_bytes: usize,
    buf: AlignedBuf,
}

impl Activations {
    /// Converts `x` (`num_rows` rows of `cols` values) for multiplication with `weight_type`.
    pub fn prepare(&mut self, x: &[f32], num_rows: usize, cols: usize, weight_type: DType) -> Result<(), KernelError> {
        let at = weight_type.activation_type();
        let row_bytes = at
            .row_bytes(cols)
            .ok_or_else(|| KernelError::Shape(format!("{cols} columns are not whole {at} blocks")))?;
        if x.len() != num_rows * cols {
            return Err(KernelError::Shape(format!("input has {} values, expected {num_rows}x{cols}", x.len())));
        }
        self.buf.resize(row_bytes * num_rows);
        let bytes = self.buf.bytes_mut();
        for (src, dst) in x.chunks_exact(cols.max(1)).zip(bytes.chunks_exact_mut(row_bytes.max(1))) {
            convert_row(at, src, dst);
        }
        self.dtype = Some(at);
        self.cols = cols;
        self.num_rows = num_rows;
        self.row_bytes = row_bytes;
        Ok(())
    }

    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    pub fn num_rows(&self) -> usize {
        self.num_rows
    }

    pub fn row(&self, t: usize) -> &[u8] {
        &self.buf.bytes()[t * self.row_bytes..(t + 1) * self.row_bytes]
    }
}

fn convert_row(at: DType, src: &[f32], dst: &mut [u8]) {
    const WHY: &str = "activation buffers are allocated aligned and sized in whole blocks";
    match at {
        DType::F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        DType::F16 | DType::BF16 => {
            let convert = if at == DType::F16 { activation::convert_f16 } else { activation::convert_bf16 };
            let mut half = [0u16; 1];
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                convert(std::slice::from_ref(s), &mut half);
                d.copy_from_slice(&half[0].to_le_bytes());
            }
        }
        DType::Q8_0 => activation::quantize_q8_0(src, cast_blocks_mut::<BlockQ8_0>(dst).expect(WHY)),
        DType::Q8_1 => activation::quantize_q8_1(src, cast_blocks_mut::<BlockQ8_1>(dst).expect(WHY)),
        DType::Q8K => activation::quantize_q8k(src, cast_blocks_mut::<BlockQ8K>(dst).expect(WHY)),
        other => unreachable!("{other} is never an activation format"),
    }
}

/// One matrix of a grouped product and where its results go: `out` is `[num_rows, rows]`.
pub struct MatMulJob<'a, 'b> {
    pub weight: WeightView<'a>,
    pub out: &'b mut [f32],
}

/// Rows of one weight matrix processed together so their bytes stay in L1 across inputs.
const ROW_TILE: usize = 8;

/// Multiplies every matrix in `jobs` with the same prepared activations, in one pool dispatch.
/// All weights must share the activation format `act` was prepared for.
pub fn matmul_group(compute: &Compute, act: &Activations, jobs: &mut [MatMulJob]) -> Result<(), KernelError> {
    let (pool, isa) = (&compute.pool, compute.isa);
    let num_rows = act.num_rows;
    struct Plan<'a> {
        weight: WeightView<'a>,
        dot: DotFn,
        out: SharedMut<f32>,
        first_global_row: usize,
    }
    let mut plans = Vec::with_capacity(jobs.len());
    let mut total_rows = 0;
    for job in jobs.iter_mut() {
        let w = job.weight;
        if Some(w.dtype.activation_type()) != act.dtype || w.cols != act.cols {
            return Err(KernelError::Shape(format!(
                "weight {}x{} {} does not fit activations of {} columns in {:?}",
                w.rows, w.cols, w.dtype, act.cols, act.dtype
            )));
        }
        if job.out.len() != num_rows * w.rows {
            return Err(KernelError::Shape(format!("output has {} values, expected {}x{}", job.out.len(), num_rows, w.rows)));
        }
        plans.push(Plan { weight: w, dot: kernel_for_matrix(w.dtype, w.rows, isa), out: SharedMut::new(job.out), first_global_row: total_rows });
        total_rows += w.rows;
    }
    let n_threads = pool.num_threads();
    let work = |thread: usize| {
        let range = split_range(total_rows, ROW_TILE, n_threads, thread);
        for plan in &plans {
            let lo = range.start.max(plan.first_global_row);
            let hi = range.end.min(plan.first_global_row + plan.weight.rows);
            let mut r0 = lo;
            while r0 < hi {
                let r1 = (r0 + ROW_TILE).min(hi);
                for t in 0..num_rows {
                    let a = act.row(t);
                    let local = (r0 - plan.first_global_row)..(r1 - plan.first_global_row);
                    // SAFETY: each thread owns a disjoint range of rows of every output.
                    let out = unsafe { plan.out.slice(t * plan.weight.rows + local.start..t * plan.weight.rows + local.end) };
                    for (o, r) in out.iter_mut().zip(local) {
                        // SAFETY: row and activation lengths were validated against `cols` above.
                        *o = unsafe { (plan.dot)(plan.weight.row(r).as_ptr(), a.as_ptr(), plan.weight.cols) };
                    }
                }
                r0 = r1;
            }
        }
    };
    if total_rows <= ROW_TILE || n_threads == 1 {
        (0..n_threads).for_each(work);
    } else {
        pool.run(&work);
    }
    Ok(())
}

/// `out = x · weightᵀ` for `num_rows` input rows; convenience for a single matrix.
pub fn matmul(
    compute: &Compute,
    weight: WeightView,
    x: &[f32],
    num_rows: usize,
    act: &mut Activations,
    out: &mut [f32],
) -> Result<(), KernelError> {
    act.prepare(x, num_rows, weight.cols, weight.dtype)?;
    matmul_group(compute, act, &mut [MatMulJob { weight, out }])
}
