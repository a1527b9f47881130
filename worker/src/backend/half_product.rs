//! Products with f16 and bf16 weights on the candle backend: the weights stay in their 16-bit
//! format on the device (half the memory of f32), activations are rounded to the same format,
//! and the products are accumulated and returned in f32.
//!
//! That is the rounding kiln's CPU kernels and llama.cpp apply to these weights (ggml pairs an
//! f16/bf16 row with activations of its own type and sums in f32), so both backends round
//! the same values the same way. candle's own half matmul would also round every *output* to
//! 16 bits (its result has the inputs' type): logits in bf16 are 0.125 apart at 16-32, enough
//! to tie or swap the top tokens, and f16 outputs overflow past 65504. On the GPU this is one
//! cuBLAS `GemmEx` call with half inputs and an f32 result.

use super::paged::contiguous;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape};

/// `y[rows, n] = x[rows, k] · w[n, k]ᵀ` for `x` and `w` both f16 or both bf16, `y` in f32.
pub struct HalfProduct;

/// The two operands' sizes, checked: `(rows, n, k)`.
fn sizes(x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (rows, k) = x.shape().dims2()?;
    let (n, wk) = w.shape().dims2()?;
    if k != wk {
        candle_core::bail!("half product: inputs of width {k} for a weight of {wk} columns");
    }
    Ok((rows, n, k))
}

/// The host version: both operands widened to f32 (exactly), each output one dot product in
/// a fixed order, so a row's result does not depend on the rows beside it (a blocked matmul's
/// would, and with 16-bit roundings downstream that breaks batched == alone).
fn host_product<T: Copy>(x: &[T], w: &[T], (rows, n, k): (usize, usize, usize), widen: impl Fn(T) -> f32) -> Vec<f32> {
    let x: Vec<f32> = x.iter().map(|&v| widen(v)).collect();
    let w: Vec<f32> = w.iter().map(|&v| widen(v)).collect();
    let mut y = vec![0.0f32; rows * n];
    if k == 0 {
        return y;
    }
    for (x_row, y_row) in x.chunks_exact(k).zip(y.chunks_exact_mut(n.max(1))) {
        for (out, w_row) in y_row.iter_mut().zip(w.chunks_exact(k)) {
            *out = dot(x_row, w_row);
        }
    }
    y
}

/// Eight running sums (one vector register once compiled), then added in a fixed order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (ca, cb) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += ca[l] * cb[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

impl CustomOp2 for HalfProduct {
    fn name(&self) -> &'static str {
        "kiln-half-product"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = sizes(l1, l2)?;
        let (rows, n, _) = dims;
        let y = match (s1, s2) {
            (CpuStorage::F16(x), CpuStorage::F16(w)) => host_product(contiguous(x, l1, "half product inputs")?, contiguous(w, l2, "half product weights")?, dims, half::f16::to_f32),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => host_product(contiguous(x, l1, "half product inputs")?, contiguous(w, l2, "half product weights")?, dims, half::bf16::to_f32),
            _ => candle_core::bail!("half product: inputs and weights must both be f16 or both bf16"),
        };
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::product(s1, l1, s2, l2)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::sizes;
    use crate::backend::paged::cuda::view;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Shape};
    use std::ffi::c_void;

    pub fn product(s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, n, k) = sizes(l1, l2)?;
        let dev = s1.device().clone();
        let out = match (s1.dtype(), s2.dtype()) {
            (DType::BF16, DType::BF16) => gemm(&dev, view(s1.as_cuda_slice::<half::bf16>()?, l1, "half product inputs")?, view(s2.as_cuda_slice::<half::bf16>()?, l2, "half product weights")?, sys::cudaDataType_t::CUDA_R_16BF, (rows, n, k))?,
            (DType::F16, DType::F16) => gemm(&dev, view(s1.as_cuda_slice::<half::f16>()?, l1, "half product inputs")?, view(s2.as_cuda_slice::<half::f16>()?, l2, "half product weights")?, sys::cudaDataType_t::CUDA_R_16F, (rows, n, k))?,
            _ => candle_core::bail!("half product: inputs and weights must both be f16 or both bf16"),
        };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((rows, n))))
    }

    /// One cuBLAS call: 16-bit `x` (rows × k) and `w` (n × k), an f32 result (rows × n).
    fn gemm<T: DeviceRepr>(dev: &CudaDevice, x: CudaView<T>, w: CudaView<T>, format: sys::cudaDataType_t, (rows, n, k): (usize, usize, usize)) -> candle_core::Result<CudaSlice<f32>> {
        if rows == 0 || n == 0 || k == 0 {
            return dev.alloc_zeros::<f32>(rows * n);
        }
        if x.len() != rows * k || w.len() != n * k {
            candle_core::bail!("half product: buffers of {} and {} values for {rows} × {k} and {n} × {k}", x.len(), w.len());
        }
        let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("half product: size {v} is past cuBLAS's 32-bit sizes")));
        let (m_, n_, k_) = (int(n)?, int(rows)?, int(k)?);
        // SAFETY: cuBLAS writes every element of `out` (beta is 0) before anything reads it.
        let mut out = unsafe { dev.alloc::<f32>(rows * n)? };
        let stream = out.stream().clone();
        let blas = dev.cublas_handle();
        let (alpha, beta) = (1.0f32, 0.0f32);
        {
            let (x_ptr, _x_guard) = x.device_ptr(&stream);
            let (w_ptr, _w_guard) = w.device_ptr(&stream);
            let (y_ptr, _y_guard) = out.device_ptr_mut(&stream);
            // Row-major y[rows, n] = x[rows, k] · w[n, k]ᵀ is, in cuBLAS's column-major
            // terms, yᵀ (n × rows) = op(w) · xᵀ, with w read as a k × n matrix and transposed.
            // SAFETY: the pointers are live device buffers of the sizes given (checked above:
            // x rows × k and w n × k elements of `format`, y rows × n f32), alpha and beta are
            // f32 as CUBLAS_COMPUTE_32F requires, and the handle works on candle's stream,
            // on which the guards order the buffers' uses.
            unsafe {
                gemm_ex(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    m_,
                    n_,
                    k_,
                    (&alpha) as *const f32 as *const c_void,
                    w_ptr as *const c_void,
                    format,
                    k_,
                    x_ptr as *const c_void,
                    format,
                    k_,
                    (&beta) as *const f32 as *const c_void,
                    y_ptr as *mut c_void,
                    sys::cudaDataType_t::CUDA_R_32F,
                    m_,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            }
            .w()?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// The product of 16-bit values summed in f64, the exact result up to one f32 rounding.
    fn exact(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * n];
        for i in 0..rows {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn rounds_inputs_to_the_weight_format_and_sums_in_f32() {
        let (rows, n, k) = (3, 5, 70);
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.0137).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.0211).collect();
        for dtype in [DType::F16, DType::BF16] {
            let xt = Tensor::from_slice(&x, (rows, k), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
            let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
            let y = xt.apply_op2_no_bwd(&wt, &HalfProduct).unwrap();
            assert_eq!(y.dtype(), DType::F32);
            assert_eq!(y.dims(), &[rows, n]);
            let got = y.flatten_all().and_then(|t| t.to_vec1::<f32>()).unwrap();
            let xr = xt.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).unwrap();
            let wr = wt.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).unwrap();
            let want = exact(&xr, &wr, rows, n, k);
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{dtype:?}: worst relative difference {worst}");
            // The output is not rounded to 16 bits: some results are not representable there.
            let rounded = y.to_dtype(dtype).and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).unwrap();
            assert!(got.iter().zip(&rounded).any(|(a, b)| a != b), "{dtype:?}: outputs look rounded to 16 bits");
            // The inputs are: the product of the f32 inputs differs.
            let unrounded = exact(&x, &w, rows, n, k);
            assert!(got.iter().zip(&unrounded).any(|(a, b)| (a - b).abs() > 1e-4), "{dtype:?}: inputs look unrounded");
        }
    }

    /// The same values as kiln's CPU kernels (which round the inputs as ggml does) up to the
    /// order of the f32 sums.
    #[test]
    fn matches_kilns_cpu_kernels() {
        use kiln_kernels::matmul::{matmul, Activations, WeightView};
        let (rows, n, k) = (4, 32, 576);
        let x: Vec<f32> = (0..rows * k).map(|i| (((i * 7919) % 1013) as f32 / 1013.0 - 0.5) * 3.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (((i * 104729) % 997) as f32 / 997.0 - 0.5) * 0.2).collect();
        let compute = kiln_kernels::Compute::new(1);
        for (dtype, format) in [(DType::F16, kiln_kernels::DType::F16), (DType::BF16, kiln_kernels::DType::BF16)] {
            let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
            let bytes: Vec<u8> = match dtype {
                DType::F16 => wt.flatten_all().and_then(|t| t.to_vec1::<half::f16>()).unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => wt.flatten_all().and_then(|t| t.to_vec1::<half::bf16>()).unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            let mut want = vec![0.0f32; rows * n];
            matmul(&compute, WeightView::new(format, n, k, &bytes).unwrap(), &x, rows, &mut Activations::default(), &mut want).unwrap();
            let xt = Tensor::from_slice(&x, (rows, k), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
            let got = xt.apply_op2_no_bwd(&wt, &HalfProduct).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).unwrap();
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{dtype:?}: worst relative difference from kiln's kernels {worst}");
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let (n, k) = (24, 200);
        let x: Vec<f32> = (0..9 * k).map(|i| ((i * 31 % 211) as f32 - 105.0) * 0.01).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 17 % 193) as f32 - 96.0) * 0.003).collect();
        let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu).and_then(|t| t.to_dtype(DType::BF16)).unwrap();
        let all = Tensor::from_slice(&x, (9, k), &Device::Cpu).and_then(|t| t.to_dtype(DType::BF16)).unwrap();
        let batched = all.apply_op2_no_bwd(&wt, &HalfProduct).and_then(|t| t.to_vec2::<f32>()).unwrap();
        for (i, row) in batched.iter().enumerate() {
            let alone = all.narrow(0, i, 1).and_then(|r| r.apply_op2_no_bwd(&wt, &HalfProduct)).and_then(|t| t.to_vec2::<f32>()).unwrap();
            assert_eq!(&alone[0], row, "row {i}");
        }
    }

    #[test]
    fn refuses_mismatched_operands() {
        let x = Tensor::zeros((2, 8), DType::BF16, &Device::Cpu).unwrap();
        let w16 = Tensor::zeros((4, 8), DType::F16, &Device::Cpu).unwrap();
        let narrow = Tensor::zeros((4, 6), DType::BF16, &Device::Cpu).unwrap();
        let mixed = x.apply_op2_no_bwd(&w16, &HalfProduct).unwrap_err().to_string();
        assert!(mixed.contains("must both be f16 or both bf16"), "{mixed}");
        let width = x.apply_op2_no_bwd(&narrow, &HalfProduct).unwrap_err().to_string();
        assert!(width.contains("width 8") && width.contains("6 columns"), "{width}");
    }

    #[test]
    fn handles_empty_batches() {
        let x = Tensor::zeros((0, 8), DType::F16, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 8), DType::F16, &Device::Cpu).unwrap();
        let y = x.apply_op2_no_bwd(&w, &HalfProduct).unwrap();
        assert_eq!(y.dims(), &[0, 4]);
    }
}
