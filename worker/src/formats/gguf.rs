//! GGUF reader: header, metadata and tensor index over a memory-mapped file.
//!
//! Follows the GGUF specification (version 2 and 3, little-endian). The file is treated as
//! hostile: every count and length is checked against the bytes that remain before anything
//! is allocated, offsets use checked arithmetic, nested arrays are bounded, and each error
//! names the byte offset, key or tensor it concerns. Tensor data is never copied; `tensor_data`
//! returns a slice of the mapping.

use super::gguf_value::{read_value, Cursor, Value};
use crate::error::{Error, Result};
use kiln_kernels::DType;
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    pub dtype: DType,
    /// Offset of the data from the start of the file.
    pub file_offset: u64,
    pub num_bytes: u64,
}

impl TensorInfo {
    pub fn num_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    pub version: u32,
    metadata: HashMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        if file.metadata().map_err(io)?.is_dir() {
            return Err(Error::Io { path: path.to_path_buf(), source: std::io::Error::other("is a directory, not a GGUF file") });
        }
        // SAFETY: the mapping is read-only; a file truncated underneath us by another process
        // is outside what any reader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Arc::new(mmap))
    }

    /// Parses an in-memory image of a GGUF file; `label` stands in for the path in errors.
    pub fn from_bytes(label: &str, bytes: &[u8]) -> Result<GgufFile> {
        let io = |source| Error::Io { path: PathBuf::from(label), source };
        let mut anon = memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(io)?;
        anon[..bytes.len()].copy_from_slice(bytes);
        let mmap = anon.make_read_only().map_err(io)?;
        // An empty image still maps one page; parse exactly the bytes given.
        if bytes.is_empty() {
            return Err(Error::NotGguf { path: PathBuf::from(label), found: vec![] });
        }
        Self::parse(Path::new(label), Arc::new(mmap))
    }

    fn parse(path: &Path, mmap: Arc<Mmap>) -> Result<GgufFile> {
        let bytes: &[u8] = &mmap;
        let bad = |offset: usize, what: String| Error::Gguf { path: path.to_path_buf(), offset: offset as u64, what };
        if bytes.len() < 4 || &bytes[..4] != MAGIC {
            return Err(Error::NotGguf { path: path.to_path_buf(), found: bytes[..bytes.len().min(4)].to_vec() });
        }
        let mut cur = Cursor::new(bytes, 4);
        let version = cur.u32().map_err(|e| bad(e.offset, e.what))?;
        if version == 1 {
            return Err(bad(4, "GGUF version 1 is obsolete; re-convert the model".into()));
        }
        if version != 2 && version != 3 {
            let hint = if version.swap_bytes() <= 3 { " (a big-endian file?)" } else { "" };
            return Err(bad(4, format!("unsupported GGUF version {version}{hint}")));
        }
        let num_tensors = cur.u64().map_err(|e| bad(e.offset, e.what))?;
        let num_kv = cur.u64().map_err(|e| bad(e.offset, e.what))?;
        // Each record needs at least 8 + 4 bytes (empty key, type), which bounds the counts.
        if num_kv > (cur.remaining() / 12) as u64 {
            return Err(bad(cur.pos(), format!("metadata count {num_kv} exceeds what the file can hold")));
        }
        if num_tensors > (cur.remaining() / 24) as u64 {
            return Err(bad(cur.pos(), format!("tensor count {num_tensors} exceeds what the file can hold")));
        }

        let mut metadata = HashMap::with_capacity(num_kv as usize);
        for _ in 0..num_kv {
            let at = cur.pos();
            let key = cur.string().map_err(|e| bad(e.offset, e.what))?;
            let value = read_value(&mut cur).map_err(|e| bad(e.offset, format!("value of `{key}`: {}", e.what)))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(bad(at, format!("duplicate metadata key `{key}`")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(Error::Metadata { key: "general.alignment".into(), what: format!("must be a power of two, found {v:?}") }),
            },
        };

        let mut raw = Vec::with_capacity(num_tensors as usize);
        for _ in 0..num_tensors {
            let at = cur.pos();
            let name = cur.string().map_err(|e| bad(e.offset, e.what))?;
            let n_dims = cur.u32().map_err(|e| bad(e.offset, e.what))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(at, format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(cur.u64().map_err(|e| bad(e.offset, e.what))?);
            }
            let type_id = cur.u32().map_err(|e| bad(e.offset, e.what))?;
            let offset = cur.u64().map_err(|e| bad(e.offset, e.what))?;
            raw.push((at, name, dims, type_id, offset));
        }
        let data_start = (cur.pos() as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for (at, name, dims, type_id, offset) in raw {
            let terr = |what: String| Error::Tensor { name: name.clone(), what };
            let dtype = DType::from_ggml_id(type_id).filter(|t| t.is_weight_type()).ok_or_else(|| {
                terr(format!("has type {} (id {type_id}), which kiln cannot compute with", DType::ggml_name(type_id)))
            })?;
            if dims.contains(&0) {
                return Err(terr(format!("has an empty dimension {dims:?}")));
            }
            let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let row_len = usize::try_from(dims[0]).map_err(|_| terr(format!("row length {} is too large", dims[0])))?;
            if row_len % dtype.block_len() != 0 {
                return Err(terr(format!("row length {} is not a multiple of the {dtype} block size {}", dims[0], dtype.block_len())));
            }
            let row_bytes = dtype.row_bytes(row_len).ok_or_else(|| terr(format!("row length {} is too large", dims[0])))?;
            let num_bytes = elements
                .and_then(|e| (e / dims[0]).checked_mul(row_bytes as u64))
                .ok_or_else(|| terr(format!("dimensions {dims:?} overflow")))?;
            if offset % alignment != 0 {
                return Err(terr(format!("data offset {offset} is not aligned to {alignment}")));
            }
            let file_offset = data_start.checked_add(offset).ok_or_else(|| terr("data offset overflows".into()))?;
            let end = file_offset.checked_add(num_bytes).ok_or_else(|| terr("data range overflows".into()))?;
            if end > file_len {
                return Err(terr(format!(
                    "data [{file_offset}, {end}) runs past the end of the file ({file_len} bytes); the file is truncated"
                )));
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad(at, format!("duplicate tensor name `{name}`")));
            }
            tensors.push(TensorInfo { name, dims, dtype, file_offset, num_bytes });
        }
        Ok(GgufFile { path: path.to_path_buf(), mmap, version, metadata, tensors, by_name })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mmap(&self) -> &Arc<Mmap> {
        &self.mmap
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor, in place in the mapping. Bounds were checked at open.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.file_offset as usize..(info.file_offset + info.num_bytes) as usize]
    }

    // Typed metadata accessors; each error names the key.

    pub fn string(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            other => Err(self.wrong_type(key, "a string", other)),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f64().map(|x| x as f32).ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    pub fn bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            other => Err(self.wrong_type(key, "a boolean", other)),
        }
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.metadata.get(key).map(|_| self.u64(key)).transpose()
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.metadata.get(key).map(|_| self.f32(key)).transpose()
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.metadata.get(key).map(|_| self.bool(key)).transpose()
    }

    pub fn opt_string(&self, key: &str) -> Result<Option<&str>> {
        self.metadata.get(key).map(|_| self.string(key)).transpose()
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| Error::Metadata { key: key.to_string(), what: "missing".into() })
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        Error::Metadata { key: key.to_string(), what: format!("expected {expected}, found {}", found.type_name()) }
    }
}
