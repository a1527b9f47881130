//! Tensors handed out by name from a memory-mapped model file (GGUF, or a safetensors
//! checkpoint), with the shape checks that make loading strict: a wrong shape or format fails
//! with the tensor's name, and tensors nobody asked for are reported.

use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, TensorInfo};
use crate::formats::names::gguf_name;
use crate::formats::safetensors::Checkpoint;
use kiln_kernels::matmul::WeightView;
use kiln_kernels::DType;
use memmap2::Mmap;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::Arc;

/// A 2-D weight `[rows, cols]` left in place in the file's mapping.
#[derive(Clone)]
pub struct MatrixRef {
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    mmap: Arc<Mmap>,
    offset: usize,
    len: usize,
}

impl MatrixRef {
    pub fn bytes(&self) -> &[u8] {
        &self.mmap[self.offset..self.offset + self.len]
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
            mmap: Arc::clone(&self.mmap),
            offset: self.offset + start * row_bytes,
            len: rows * row_bytes,
        })
    }

    pub fn view(&self) -> WeightView<'_> {
        WeightView::new(self.dtype, self.rows, self.cols, self.bytes()).expect("shape and layout checked when the weight was loaded")
    }
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
}

impl WeightSource {
    pub fn new(gguf: Arc<GgufFile>, arch: &str) -> WeightSource {
        WeightSource { store: Store::Gguf(gguf), arch: arch.to_string(), used: RefCell::new(BTreeSet::new()) }
    }

    /// Tensors of a Hugging Face checkpoint, which already carry the names models ask for.
    pub fn from_checkpoint(checkpoint: Arc<Checkpoint>, arch: &str) -> WeightSource {
        WeightSource { store: Store::Safetensors(checkpoint), arch: arch.to_string(), used: RefCell::new(BTreeSet::new()) }
    }

    fn file_name(&self, name: &str) -> String {
        match self.store {
            Store::Gguf(_) => gguf_name(&self.arch, name).unwrap_or_else(|| name.to_string()),
            Store::Safetensors(_) => name.to_string(),
        }
    }

    fn find(&self, file_name: &str) -> Option<(&TensorInfo, &Arc<Mmap>)> {
        match &self.store {
            Store::Gguf(g) => g.tensor(file_name).map(|t| (t, g.mmap())),
            Store::Safetensors(c) => c.tensor(file_name),
        }
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
            mmap: Arc::clone(mmap),
            offset: info.file_offset as usize,
            len: info.num_bytes as usize,
        };
        WeightView::new(m.dtype, rows, cols, m.bytes()).map_err(|e| Error::Tensor { name: label, what: e.to_string() })?;
        Ok(m)
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

    /// Names of tensors in the file that no layer asked for.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        match &self.store {
            Store::Gguf(g) => g.tensors().iter().filter(|t| !used.contains(&t.name)).map(|t| t.name.clone()).collect(),
            Store::Safetensors(c) => c.names().filter(|n| !used.contains(*n)).map(str::to_string).collect(),
        }
    }
}
