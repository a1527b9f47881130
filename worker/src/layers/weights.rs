//! Tensors handed out by name from a memory-mapped model file (GGUF, or a safetensors
//! checkpoint), with the shape checks that make loading strict: a wrong shape or format fails
//! with the tensor's name, and tensors nobody asked for are reported.

use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, TensorInfo};
use crate::formats::names::gguf_name;
use crate::formats::safetensors::Checkpoint;
use kiln_kernels::matmul::WeightView;
use kiln_kernels::packed::{self, PackedMatrix};
use kiln_kernels::DType;
use memmap2::Mmap;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use crate::parallel::{Combine, Layout, Shard};

/// Where a weight's bytes live: in place in the file's mapping, or (quantized at load) in
/// memory of its own.
#[derive(Clone)]
enum Backing {
    Mapped(Arc<Mmap>),
    Owned(Arc<Vec<u8>>),
}

/// A 2-D weight `[rows, cols]`.
#[derive(Clone)]
pub struct MatrixRef {
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    backing: Backing,
    offset: usize,
    len: usize,
    /// The matrix in the interleaved layout of `kiln_kernels::packed`, made by `packed()`:
    /// at load for projections and the output head, on first use for anything else a product
    /// reads (embedding tables that are only looked up never pay for it).
    packed: Arc<OnceLock<Option<PackedMatrix>>>,
}

impl MatrixRef {
    /// A matrix of f32 values made in memory (`values` is `[rows, cols]`).
    pub fn from_f32(name: &str, rows: usize, cols: usize, values: &[f32]) -> MatrixRef {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let len = bytes.len();
        MatrixRef { name: name.to_string(), dtype: DType::F32, rows, cols, backing: Backing::Owned(Arc::new(bytes)), offset: 0, len, packed: Arc::default() }
    }

    pub fn bytes(&self) -> &[u8] {
        let all: &[u8] = match &self.backing {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        };
        &all[self.offset..self.offset + self.len]
    }

    /// Rows `start..start + rows` as a matrix of their own (a fused projection's parts).
    pub fn row_slice(&self, start: usize, rows: usize) -> Option<MatrixRef> {
        let row_bytes = self.dtype.row_bytes(self.cols)?;
        if start + rows > self.rows {
            return None;
        }
        Some(MatrixRef {
            name: format!("{}[{start}..{}]", self.name, start + rows),
            dtype: self.dtype,
            rows,
            cols: self.cols,
            backing: self.backing.clone(),
            offset: self.offset + start * row_bytes,
            len: rows * row_bytes,
            packed: Arc::default(),
        })
    }

    /// Columns `start..start + cols` of every row, copied into a matrix of their own (a
    /// row-parallel projection's share); None unless both fall on the format's blocks.
    pub fn column_slice(&self, start: usize, cols: usize) -> Option<MatrixRef> {
        let block = self.dtype.block_len();
        if !start.is_multiple_of(block) || !cols.is_multiple_of(block) || start + cols > self.cols {
            return None;
        }
        if start == 0 && cols == self.cols {
            return Some(self.clone());
        }
        let (row_bytes, skip, take) = (self.dtype.row_bytes(self.cols)?, self.dtype.row_bytes(start)?, self.dtype.row_bytes(cols)?);
        let mut out = Vec::with_capacity(take * self.rows);
        for row in self.bytes().chunks_exact(row_bytes) {
            out.extend_from_slice(&row[skip..skip + take]);
        }
        Some(MatrixRef {
            name: format!("{}[:, {start}..{}]", self.name, start + cols),
            dtype: self.dtype,
            rows: self.rows,
            cols,
            len: out.len(),
            backing: Backing::Owned(Arc::new(out)),
            offset: 0,
            packed: Arc::default(),
        })
    }

    /// The packed copy the kernels prefer on this CPU, made now if not yet; None where the
    /// CPU or the format has no packed product.
    pub fn packed(&self) -> Option<&PackedMatrix> {
        self.packed
            .get_or_init(|| {
                let wanted = repacking_allowed() && kiln_kernels::Isa::detect().avx2() && packed::supports(self.dtype) && self.rows.is_multiple_of(packed::GROUP);
                wanted.then(|| PackedMatrix::pack(&self.view()).ok()).flatten()
            })
            .as_ref()
    }

    /// For an F32 matrix on a CPU with the column-order kernels (`kiln_kernels::packed_f32`):
    /// the matrix packed for them, so every product with it takes their order whatever the
    /// number of input rows. Faster on many rows than the dot-product order, which llama.cpp's
    /// F32 products share; so for models with no llama.cpp results to match (encoders). F16
    /// and BF16 matrices are widened to F32 first (exactly; twice their memory, which for an
    /// encoder is little, for products three times as fast). Other formats, and other CPUs,
    /// keep their products.
    pub fn in_column_order(mut self) -> MatrixRef {
        let wanted = repacking_allowed()
            && matches!(self.dtype, DType::F32 | DType::F16 | DType::BF16)
            && self.rows.is_multiple_of(packed::GROUP)
            && kiln_kernels::packed_f32::kernel(kiln_kernels::Isa::detect()).is_some();
        if wanted && self.dtype != DType::F32 {
            let Some(row_bytes) = self.dtype.row_bytes(self.cols).filter(|&b| b > 0 && self.rows > 0) else { return self };
            let mut values = vec![0f32; self.rows * self.cols];
            let rows = self.bytes().chunks_exact(row_bytes).zip(values.chunks_exact_mut(self.cols));
            if rows.map(|(row, out)| kiln_kernels::dequant::dequantize_row(self.dtype, row, out)).any(|r| r.is_err()) {
                return self;
            }
            self = MatrixRef::from_f32(&self.name, self.rows, self.cols, &values);
        }
        if wanted {
            // A fresh cell: the one loading filled (no packed copy for F32) may be shared.
            self.packed = Arc::new(OnceLock::from(PackedMatrix::pack(&self.view()).ok()));
        }
        self
    }

    pub fn view(&self) -> WeightView<'_> {
        WeightView::new(self.dtype, self.rows, self.cols, self.bytes()).expect("shape and layout checked when the weight was loaded")
    }
}

/// Whether weights may be repacked for the kernels: `KILN_REPACK=0` keeps every product on
/// the weights as stored (for comparisons).
fn repacking_allowed() -> bool {
    std::env::var_os("KILN_REPACK").is_none_or(|v| v != "0")
}

enum Store {
    Gguf(Arc<GgufFile>),
    Safetensors(Arc<Checkpoint>),
}

/// Hands out tensors by their Hugging Face names; GGUF names are found through `names`.
pub struct WeightSource {
    store: Store,
    arch: String,
    used: RefCell<BTreeSet<String>>,
    /// Load-time quantization of projection weights (`linear`), and what it did.
    isq: Option<DType>,
    pub isq_report: RefCell<IsqReport>,
    /// The tensor-parallel rank being loaded, when the model is split.
    shard: Option<Shard>,
    /// Name prefixes models ask for and where the checkpoint keeps them (a multimodal
    /// checkpoint nests its language model under `language_model.` or similar).
    renames: Vec<(String, String)>,
}

/// What load-time quantization did to the projection weights.
#[derive(Clone, Debug, Default)]
pub struct IsqReport {
    pub quantized: usize,
    /// Tensors whose row length does not divide into the type's blocks, and the type used instead.
    pub fallbacks: Vec<(String, DType)>,
    /// Tensors already quantized in the file, left as they were.
    pub kept: usize,
    pub bytes_before: usize,
    pub bytes_after: usize,
}

impl WeightSource {
    pub fn new(gguf: Arc<GgufFile>, arch: &str) -> WeightSource {
        Self::with_store(Store::Gguf(gguf), arch)
    }

    /// Tensors of a Hugging Face checkpoint, which already carry the names models ask for.
    pub fn from_checkpoint(checkpoint: Arc<Checkpoint>, arch: &str) -> WeightSource {
        Self::with_store(Store::Safetensors(checkpoint), arch)
    }

    fn with_store(store: Store, arch: &str) -> WeightSource {
        WeightSource { store, arch: arch.to_string(), used: RefCell::new(BTreeSet::new()), isq: None, isq_report: RefCell::default(), shard: None, renames: Vec::new() }
    }

    /// Finds tensors asked for under `asked` at `stored` instead (first matching rule wins).
    pub fn with_renames(mut self, renames: Vec<(String, String)>) -> WeightSource {
        self.renames = renames;
        self
    }

    /// Quantizes projection weights to `dtype` as they are loaded.
    pub fn with_isq(mut self, dtype: Option<DType>) -> WeightSource {
        self.isq = dtype;
        self
    }

    /// Loads only the slices of tensor-parallel rank `shard` (see `crate::parallel`).
    pub fn with_shard(mut self, shard: Option<Shard>) -> WeightSource {
        self.shard = shard;
        self
    }

    pub fn shard(&self) -> Option<&Shard> {
        self.shard.as_ref()
    }

    /// (rank, size) of the tensor-parallel group; (0, 1) for a whole model.
    pub fn tp(&self) -> (usize, usize) {
        self.shard.as_ref().map_or((0, 1), |s| (s.rank, s.size))
    }

    /// How a split block's output projection combines the ranks' shares.
    pub fn combine(&self) -> Combine {
        Combine::over(self.shard.as_ref())
    }

    fn layout(&self) -> Layout {
        self.shard.as_ref().map_or(Layout::Exact, |s| s.layout)
    }

    /// The output projection of a block (o or down, `[rows, cols]`) whose input this rank
    /// computes columns `inner` of: in the Megatron layout those columns, in the exact layout
    /// the whole input and this rank's share of the output rows (see `Layout`).
    pub fn out_projection(&self, name: &str, rows: usize, cols: usize, inner: Range<usize>) -> Result<MatrixRef> {
        match self.layout() {
            Layout::Megatron => self.linear_cols(name, rows, cols, inner),
            Layout::Exact => self.linear_rows(name, rows, cols, self.even_split(rows)),
        }
    }

    /// This rank's share of `len` outputs: in groups of 16 rows where they divide (the packed
    /// kernels' row groups), else as evenly as possible.
    pub fn even_split(&self, len: usize) -> Range<usize> {
        let (rank, size) = self.tp();
        let unit = if len.is_multiple_of(16) && len / 16 >= size { 16 } else { 1 };
        let part = crate::parallel::split_even(len / unit, rank, size);
        part.start * unit..part.end * unit
    }

    /// Output rows `range` of a projection (a column-parallel share): a view of the file.
    pub fn linear_rows(&self, name: &str, rows: usize, cols: usize, range: Range<usize>) -> Result<MatrixRef> {
        let m = self.quantized(self.matrix_rows(name, rows, cols, range)?)?;
        m.packed();
        Ok(m)
    }

    /// Input columns `range` of a projection (a row-parallel share), copied; quantized at load
    /// to the type the whole matrix would get, so every rank's blocks are the whole model's.
    pub fn linear_cols(&self, name: &str, rows: usize, cols: usize, range: Range<usize>) -> Result<MatrixRef> {
        let m = self.matrix(name, rows, cols)?;
        let target = self.isq_type(&m);
        let m = if range == (0..cols) {
            m
        } else {
            m.column_slice(range.start, range.len()).ok_or_else(|| Error::Tensor {
                name: m.name.clone(),
                what: format!("cannot be split at columns {range:?}: its {} blocks hold {} values", m.dtype.name(), m.dtype.block_len()),
            })?
        };
        let m = self.quantize_to(m, target)?;
        m.packed();
        Ok(m)
    }

    /// Rows `range` of a matrix read as it is stored (embedding tables, the output head).
    pub fn matrix_rows(&self, name: &str, rows: usize, cols: usize, range: Range<usize>) -> Result<MatrixRef> {
        let m = self.matrix(name, rows, cols)?;
        if range == (0..rows) {
            return Ok(m);
        }
        m.row_slice(range.start, range.len()).ok_or_else(|| Error::Tensor { name: m.name.clone(), what: format!("has no rows {range:?}") })
    }

    /// The values the columns of projection `name` can be split at: its blocks, and those of
    /// the type load-time quantization gives it.
    pub fn column_block(&self, name: &str, rows: usize, cols: usize) -> Result<usize> {
        let m = self.matrix(name, rows, cols)?;
        let block = m.dtype.block_len();
        let target = self.isq_type(&m).map_or(1, |t| t.block_len());
        // Both are powers of two (1, 32 or 256): the larger is their least common multiple.
        Ok(block.max(target))
    }

    /// This rank's share of a hidden dimension of `len` read by `reader` (the block's output
    /// projection, of `rows` outputs): in the Megatron layout the reader's columns are split
    /// with it, so the split falls on whole blocks of the reader's format.
    pub fn inner_split(&self, reader: &str, rows: usize, len: usize) -> Result<Range<usize>> {
        let (rank, size) = self.tp();
        if size == 1 {
            return Ok(0..len);
        }
        if self.layout() == Layout::Exact {
            // The reader takes the whole input: any split of it will do.
            return Ok(self.even_split(len));
        }
        let block = self.column_block(reader, rows, len)?;
        crate::parallel::split_blocks(len, block, rank, size, &format!("the hidden layer read by `{}`", self.file_name(reader))).map_err(|what| Error::Sharding { size, what })
    }

    /// Values `range` of a 1-D tensor of `len` (the biases of a column-parallel share).
    pub fn vector_range(&self, name: &str, len: usize, range: Range<usize>) -> Result<Vec<f32>> {
        let all = self.vector(name, len)?;
        all.get(range.clone()).map(<[f32]>::to_vec).ok_or_else(|| Error::Tensor { name: name.into(), what: format!("has no values {range:?}") })
    }

    /// A projection weight: like `matrix`, quantized to the load-time type when one is set
    /// and the stored weight is in a float format, and packed for this CPU's kernels now
    /// rather than during the first request.
    pub fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<MatrixRef> {
        self.linear_rows(name, rows, cols, 0..rows)
    }

    /// The type load-time quantization gives `m`, if any. Like llama.cpp, rows that do not
    /// divide into 256-value super-blocks take a 32-value format of similar size instead.
    fn isq_type(&self, m: &MatrixRef) -> Option<DType> {
        let target = self.isq?;
        if !matches!(m.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return None;
        }
        if m.cols.is_multiple_of(target.block_len()) {
            Some(target)
        } else if m.cols.is_multiple_of(32) {
            Some(match target {
                DType::Q2K | DType::Q3K | DType::Q4K => DType::Q4_1,
                DType::Q5K => DType::Q5_1,
                _ => DType::Q8_0,
            })
        } else {
            None
        }
    }

    /// `m` quantized as load-time quantization asks.
    fn quantized(&self, m: MatrixRef) -> Result<MatrixRef> {
        let target = self.isq_type(&m);
        self.quantize_to(m, target)
    }

    fn quantize_to(&self, m: MatrixRef, target: Option<DType>) -> Result<MatrixRef> {
        let Some(wanted) = self.isq else { return Ok(m) };
        if !matches!(m.dtype, DType::F32 | DType::F16 | DType::BF16) {
            self.isq_report.borrow_mut().kept += 1;
            return Ok(m);
        }
        let Some(dtype) = target else {
            self.isq_report.borrow_mut().fallbacks.push((m.name.clone(), m.dtype));
            return Ok(m);
        };
        if dtype != wanted {
            self.isq_report.borrow_mut().fallbacks.push((m.name.clone(), dtype));
        }
        let q = quantize_matrix(&m, dtype).map_err(|e| Error::Tensor { name: m.name.clone(), what: format!("cannot be quantized: {e}") })?;
        let mut report = self.isq_report.borrow_mut();
        report.quantized += 1;
        report.bytes_before += m.len;
        report.bytes_after += q.len;
        Ok(q)
    }

    fn file_name(&self, name: &str) -> String {
        match self.store {
            Store::Gguf(_) => gguf_name(&self.arch, name).unwrap_or_else(|| name.to_string()),
            Store::Safetensors(_) => match self.renames.iter().find(|(asked, _)| name.starts_with(asked.as_str())) {
                Some((asked, stored)) => format!("{stored}{}", &name[asked.len()..]),
                None => name.to_string(),
            },
        }
    }

    fn find(&self, file_name: &str) -> Option<(&TensorInfo, &Arc<Mmap>)> {
        match &self.store {
            Store::Gguf(g) => g.tensor(file_name).map(|t| (t, g.mmap())),
            Store::Safetensors(c) => c.tensor(file_name),
        }
    }

    /// Counts `name` as used without reading it (another rank's share).
    pub fn mark_used(&self, name: &str) {
        self.used.borrow_mut().insert(self.file_name(name));
    }

    pub fn has(&self, name: &str) -> bool {
        self.find(&self.file_name(name)).is_some()
    }

    /// Looks a tensor up; errors name both the checkpoint name and the name in the file.
    fn info(&self, name: &str) -> Result<(&TensorInfo, &Arc<Mmap>, String)> {
        let file_name = self.file_name(name);
        let label = if file_name == name { name.to_string() } else { format!("{file_name} ({name})") };
        let (info, mmap) = self.find(&file_name).ok_or_else(|| {
            let what = match &self.store {
                Store::Safetensors(c) => c.other_dtype(&file_name).map(|d| format!("has dtype {d}, which kiln cannot compute with")),
                Store::Gguf(_) => None,
            };
            Error::Tensor { name: label.clone(), what: what.unwrap_or_else(|| "is missing from the model file".into()) }
        })?;
        self.used.borrow_mut().insert(file_name);
        Ok((info, mmap, label))
    }

    /// A matrix of `rows` outputs by `cols` inputs (GGUF dims `[cols, rows]`).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<MatrixRef> {
        let (info, mmap, label) = self.info(name)?;
        let expected = [cols as u64, rows as u64];
        if info.dims != expected {
            return Err(Error::Tensor { name: label, what: format!("has shape {:?}, expected {expected:?}", info.dims) });
        }
        let m = MatrixRef {
            name: label.clone(),
            dtype: info.dtype,
            rows,
            cols,
            backing: Backing::Mapped(Arc::clone(mmap)),
            offset: info.file_offset as usize,
            len: info.num_bytes as usize,
            packed: Arc::default(),
        };
        WeightView::new(m.dtype, rows, cols, m.bytes()).map_err(|e| Error::Tensor { name: label, what: e.to_string() })?;
        Ok(m)
    }

    /// The experts of a merged 3-D tensor (`[cols, rows, n]` in GGUF order, as llama.cpp
    /// stores mixture-of-experts weights), each as its own `rows x cols` matrix.
    pub fn experts(&self, name: &str, n: usize, rows: usize, cols: usize) -> Result<Vec<MatrixRef>> {
        let (info, mmap, label) = self.info(name)?;
        let expected = [cols as u64, rows as u64, n as u64];
        if info.dims != expected {
            return Err(Error::Tensor { name: label, what: format!("has shape {:?}, expected {expected:?}", info.dims) });
        }
        let all = MatrixRef {
            name: label.clone(),
            dtype: info.dtype,
            rows: rows * n,
            cols,
            backing: Backing::Mapped(Arc::clone(mmap)),
            offset: info.file_offset as usize,
            len: info.num_bytes as usize,
            packed: Arc::default(),
        };
        WeightView::new(all.dtype, all.rows, cols, all.bytes()).map_err(|e| Error::Tensor { name: label.clone(), what: e.to_string() })?;
        (0..n).map(|e| all.row_slice(e * rows, rows).ok_or_else(|| Error::Tensor { name: label.clone(), what: "cannot be split by expert".into() })).collect()
    }

    /// A 1-D tensor of `len` values, converted to f32 (norm weights and the like).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (info, mmap, label) = self.info(name)?;
        if info.dims != [len as u64] {
            return Err(Error::Tensor { name: label, what: format!("has shape {:?}, expected [{len}]", info.dims) });
        }
        let mut out = vec![0.0; len];
        let bytes = &mmap[info.file_offset as usize..(info.file_offset + info.num_bytes) as usize];
        kiln_kernels::dequant::dequantize_row(info.dtype, bytes, &mut out)
            .map_err(|e| Error::Tensor { name: label.clone(), what: e.to_string() })?;
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::Tensor { name: label, what: format!("holds a non-finite value at index {i}") });
        }
        Ok(out)
    }

    /// A tensor of any shape (`dims` outermost first, as Hugging Face writes them), converted
    /// to f32: convolution kernels, position tables, weights stored transposed.
    pub fn tensor_f32(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        let (info, mmap, label) = self.info(name)?;
        let expected: Vec<u64> = dims.iter().rev().map(|&d| d as u64).collect();
        if info.dims != expected {
            return Err(Error::Tensor { name: label, what: format!("has shape {:?}, expected {expected:?}", info.dims) });
        }
        let mut out = vec![0.0; dims.iter().product()];
        let bytes = &mmap[info.file_offset as usize..(info.file_offset + info.num_bytes) as usize];
        kiln_kernels::dequant::dequantize_row(info.dtype, bytes, &mut out).map_err(|e| Error::Tensor { name: label.clone(), what: e.to_string() })?;
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::Tensor { name: label, what: format!("holds a non-finite value at index {i}") });
        }
        Ok(out)
    }

    /// Names of tensors in the file that no layer asked for.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        match &self.store {
            Store::Gguf(g) => g.tensors().iter().filter(|t| !used.contains(&t.name)).map(|t| t.name.clone()).collect(),
            Store::Safetensors(c) => c.names().filter(|n| !used.contains(*n)).map(str::to_string).collect(),
        }
    }
}

/// `m` quantized to `dtype`, its rows shared out over the machine's cores; each thread
/// converts one row at a time, so no f32 copy of the matrix is ever held.
fn quantize_matrix(m: &MatrixRef, dtype: DType) -> std::result::Result<MatrixRef, kiln_kernels::KernelError> {
    let out_row = dtype.row_bytes(m.cols).ok_or_else(|| kiln_kernels::KernelError::Shape("row too long".into()))?;
    let in_row = m.dtype.row_bytes(m.cols).ok_or_else(|| kiln_kernels::KernelError::Shape("row too long".into()))?;
    let mut out = vec![0u8; out_row * m.rows];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(m.rows.max(1));
    let rows_per = m.rows.div_ceil(threads);
    let src = m.bytes();
    std::thread::scope(|scope| {
        let handles: Vec<_> = out
            .chunks_mut(rows_per * out_row)
            .enumerate()
            .map(|(t, chunk)| {
                scope.spawn(move || {
                    let mut row = vec![0.0f32; m.cols];
                    for (i, dst) in chunk.chunks_exact_mut(out_row).enumerate() {
                        let r = t * rows_per + i;
                        kiln_kernels::dequant::dequantize_row(m.dtype, &src[r * in_row..(r + 1) * in_row], &mut row)?;
                        kiln_kernels::quantize::quantize_row(dtype, &row, dst)?;
                    }
                    Ok::<(), kiln_kernels::KernelError>(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().unwrap_or(Err(kiln_kernels::KernelError::Layout("a quantizing thread panicked"))))
    })?;
    let len = out.len();
    Ok(MatrixRef { name: m.name.clone(), dtype, rows: m.rows, cols: m.cols, backing: Backing::Owned(Arc::new(out)), offset: 0, len, packed: Arc::default() })
}
