//! Safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Each file is memory-mapped; its JSON header is checked
//! entry by entry (dtype, shape, offsets inside the data, no overlaps, no gaps past the end)
//! so a damaged or truncated file fails naming the file and the tensor, and tensors are then
//! used in place.

use crate::error::{Error, Result};
use crate::formats::gguf::TensorInfo;
use kiln_kernels::DType;
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest header accepted; real ones are a few hundred kilobytes.
const MAX_HEADER: u64 = 100 << 20;

pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    tensors: Vec<TensorInfo>,
    /// Tensors of types models do not compute with (integer buffers such as position ids):
    /// name and dtype. Their sizes are checked like the others'.
    pub others: Vec<(String, String)>,
    pub metadata: BTreeMap<String, String>,
}

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::ModelSource { name: path.display().to_string(), what: what.into() }
}

fn dtype(name: &str) -> Option<DType> {
    match name {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        _ => None,
    }
}

/// Bytes per element of the other types the format defines.
fn other_size(name: &str) -> Option<u64> {
    match name {
        "F64" | "I64" | "U64" => Some(8),
        "I32" | "U32" => Some(4),
        "I16" | "U16" => Some(2),
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => Some(1),
        _ => None,
    }
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and model files are not modified while served.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Arc::new(mmap))
    }

    pub fn parse(path: &Path, mmap: Arc<Mmap>) -> Result<SafetensorsFile> {
        let len = mmap.len() as u64;
        if len < 8 {
            return Err(bad(path, format!("{len} bytes is too short for a safetensors file")));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().map_err(|_| bad(path, "unreadable header length"))?);
        if header_len > MAX_HEADER || 8 + header_len > len {
            return Err(bad(path, format!("header length {header_len} does not fit the file ({len} bytes); not a safetensors file, or truncated")));
        }
        let data_start = 8 + header_len;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&mmap[8..data_start as usize])
            .map_err(|e| bad(path, format!("the header is not a JSON object: {e}")))?;
        let mut tensors = Vec::with_capacity(header.len());
        let mut others = Vec::new();
        let mut spans_of_others = Vec::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in &header {
            if name == "__metadata__" {
                for (k, v) in entry.as_object().into_iter().flatten() {
                    metadata.insert(k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string));
                }
                continue;
            }
            let (info, kind) = Self::entry(path, name, entry, data_start, len)?;
            match kind {
                None => tensors.push(info),
                Some(kind) => {
                    spans_of_others.push((info.file_offset, info.file_offset + info.num_bytes, name.clone()));
                    others.push((name.clone(), kind));
                }
            }
        }
        // Tensors may not share bytes.
        let mut spans: Vec<(u64, u64, &str)> = tensors.iter().map(|t| (t.file_offset, t.file_offset + t.num_bytes, t.name.as_str())).collect();
        spans.extend(spans_of_others.iter().map(|(b, e, n)| (*b, *e, n.as_str())));
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(bad(path, format!("tensors `{}` and `{}` overlap", w[0].2, w[1].2)));
            }
        }
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, tensors, others, metadata })
    }

    /// A checked entry; the dtype's name comes back when it is not one models compute with.
    fn entry(path: &Path, name: &str, entry: &serde_json::Value, data_start: u64, file_len: u64) -> Result<(TensorInfo, Option<String>)> {
        let terr = |what: String| Error::Tensor { name: name.to_string(), what: format!("in {}: {what}", path.display()) };
        let kind = entry["dtype"].as_str().ok_or_else(|| terr("has no dtype".into()))?;
        let (dtype, elem_bytes, other) = match (dtype(kind), other_size(kind)) {
            (Some(d), _) => (d, d.row_bytes(1).unwrap_or(4) as u64, None),
            (None, Some(size)) => (DType::F32, size, Some(kind.to_string())),
            (None, None) => return Err(terr(format!("has unknown dtype {kind}"))),
        };
        let shape: Vec<u64> = entry["shape"]
            .as_array()
            .ok_or_else(|| terr("has no shape".into()))?
            .iter()
            .map(|d| d.as_u64().ok_or_else(|| terr(format!("has a bad dimension {d}"))))
            .collect::<Result<_>>()?;
        let offsets = entry["data_offsets"].as_array().filter(|o| o.len() == 2).ok_or_else(|| terr("has no data_offsets pair".into()))?;
        let (begin, end) = match (offsets[0].as_u64(), offsets[1].as_u64()) {
            (Some(b), Some(e)) if b <= e => (b, e),
            _ => return Err(terr(format!("has bad data_offsets {offsets:?}"))),
        };
        let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        let expected = elements.checked_mul(elem_bytes).ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        if end - begin != expected {
            return Err(terr(format!("holds {} bytes, but shape {shape:?} of {kind} needs {expected}", end - begin)));
        }
        let file_offset = data_start.checked_add(begin).ok_or_else(|| terr("data offset overflows".into()))?;
        if data_start + end > file_len {
            return Err(terr(format!("data [{file_offset}, {}) runs past the end of the file ({file_len} bytes); the file is truncated", data_start + end)));
        }
        // ggml order: the contiguous dimension first.
        let mut dims = shape;
        dims.reverse();
        if dims.is_empty() {
            dims.push(1);
        }
        Ok((TensorInfo { name: name.to_string(), dims, dtype, file_offset, num_bytes: expected }, other))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
}

/// A checkpoint: every tensor of one or more safetensors files, by name.
pub struct Checkpoint {
    files: Vec<SafetensorsFile>,
    by_name: HashMap<String, (usize, usize)>,
}

impl Checkpoint {
    /// Opens the checkpoint in a model directory: `model.safetensors`, or the shards
    /// `model.safetensors.index.json` names (every one must be present).
    pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| Error::Io { path: index.clone(), source })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&index, format!("not JSON: {e}")))?;
            let map = v["weight_map"].as_object().ok_or_else(|| bad(&index, "has no weight_map"))?;
            let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(str::to_string)).collect();
            shards.sort();
            shards.dedup();
            if shards.iter().any(|s| s.contains('/') || s.contains("..")) {
                return Err(bad(&index, "names a shard outside the model directory"));
            }
            let missing: Vec<&String> = shards.iter().filter(|s| !dir.join(s).exists()).collect();
            if !missing.is_empty() {
                return Err(bad(&index, format!("shards missing from {}: {missing:?}", dir.display())));
            }
            shards.iter().map(|s| dir.join(s)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(bad(dir, "has neither model.safetensors nor model.safetensors.index.json"));
        };
        let files = paths.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<Vec<_>>>()?;
        Self::from_files(files)
    }

    pub fn from_files(files: Vec<SafetensorsFile>) -> Result<Checkpoint> {
        let mut by_name = HashMap::new();
        for (f, file) in files.iter().enumerate() {
            for (t, info) in file.tensors.iter().enumerate() {
                if by_name.insert(info.name.clone(), (f, t)).is_some() {
                    return Err(bad(file.path(), format!("tensor `{}` appears in more than one shard", info.name)));
                }
            }
        }
        Ok(Checkpoint { files, by_name })
    }

    /// The dtype of a tensor present in the checkpoint but of a type models cannot use.
    pub fn other_dtype(&self, name: &str) -> Option<&str> {
        self.files.iter().flat_map(|f| f.others.iter()).find(|(n, _)| n == name).map(|(_, d)| d.as_str())
    }

    pub fn tensor(&self, name: &str) -> Option<(&TensorInfo, &Arc<Mmap>)> {
        self.by_name.get(name).map(|&(f, t)| (&self.files[f].tensors[t], &self.files[f].mmap))
    }

    /// Names of the tensors models can use.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.iter().flat_map(|f| f.tensors.iter().map(|t| t.name.as_str()))
    }

    /// Names and dtypes of the tensors of other types (integer buffers and the like).
    pub fn others(&self) -> impl Iterator<Item = &(String, String)> {
        self.files.iter().flat_map(|f| f.others.iter())
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}
