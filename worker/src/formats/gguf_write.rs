//! GGUF writer: metadata and tensors into a version-3 file image, aligned as the
//! specification requires. Used to build small models in tests and to write converted models.

use super::gguf_value::{Array, Value};
use kiln_kernels::DType;

pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, DType, Vec<u8>)>,
    alignment: usize,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter { metadata: Vec::new(), tensors: Vec::new(), alignment: 32 }
    }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
        self
    }

    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self
    }

    /// Adds a tensor; `dims` are in GGUF order (row length first) and `data` must hold
    /// exactly that many values of `dtype`.
    pub fn tensor(&mut self, name: &str, dims: &[u64], dtype: DType, data: Vec<u8>) -> &mut Self {
        self.tensors.retain(|(n, ..)| n != name);
        self.tensors.push((name.to_string(), dims.to_vec(), dtype, data));
        self
    }

    pub fn remove_tensor(&mut self, name: &str) -> &mut Self {
        self.tensors.retain(|(n, ..)| n != name);
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, dtype, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&dtype.ggml_id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(self.alignment as u64) * self.alignment as u64;
        }
        out.resize(out.len().div_ceil(self.alignment) * self.alignment, 0);
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend_from_slice(data);
        }
        out.resize(out.len().div_ceil(self.alignment) * self.alignment, 0);
        out
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(&type_id(v).to_le_bytes());
    put_payload(out, v);
}

fn put_payload(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    macro_rules! elems {
        ($id:expr, $v:expr, $put:expr) => {{
            out.extend_from_slice(&($id as u32).to_le_bytes());
            out.extend_from_slice(&($v.len() as u64).to_le_bytes());
            for x in $v {
                $put(out, x);
            }
        }};
    }
    match a {
        Array::U8(v) => elems!(0, v, |o: &mut Vec<u8>, x: &u8| o.push(*x)),
        Array::I8(v) => elems!(1, v, |o: &mut Vec<u8>, x: &i8| o.push(*x as u8)),
        Array::U16(v) => elems!(2, v, |o: &mut Vec<u8>, x: &u16| o.extend_from_slice(&x.to_le_bytes())),
        Array::I16(v) => elems!(3, v, |o: &mut Vec<u8>, x: &i16| o.extend_from_slice(&x.to_le_bytes())),
        Array::U32(v) => elems!(4, v, |o: &mut Vec<u8>, x: &u32| o.extend_from_slice(&x.to_le_bytes())),
        Array::I32(v) => elems!(5, v, |o: &mut Vec<u8>, x: &i32| o.extend_from_slice(&x.to_le_bytes())),
        Array::F32(v) => elems!(6, v, |o: &mut Vec<u8>, x: &f32| o.extend_from_slice(&x.to_le_bytes())),
        Array::Bool(v) => elems!(7, v, |o: &mut Vec<u8>, x: &bool| o.push(u8::from(*x))),
        Array::String(v) => elems!(8, v, |o: &mut Vec<u8>, x: &String| put_str(o, x)),
        Array::U64(v) => elems!(10, v, |o: &mut Vec<u8>, x: &u64| o.extend_from_slice(&x.to_le_bytes())),
        Array::I64(v) => elems!(11, v, |o: &mut Vec<u8>, x: &i64| o.extend_from_slice(&x.to_le_bytes())),
        Array::F64(v) => elems!(12, v, |o: &mut Vec<u8>, x: &f64| o.extend_from_slice(&x.to_le_bytes())),
        Array::Array(v) => elems!(9, v, |o: &mut Vec<u8>, x: &Array| put_array(o, x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufFile;

    #[test]
    fn written_files_read_back() {
        let mut w = GgufWriter::new();
        w.set("general.architecture", Value::String("llama".into()))
            .set("n", Value::U32(7))
            .set("list", Value::Array(Array::String(vec!["a".into(), "bc".into()])))
            .set("nested", Value::Array(Array::Array(vec![Array::I32(vec![1, -2])])));
        let data: Vec<u8> = (0..3 * 4).map(|i| i as u8).collect();
        w.tensor("t", &[3], DType::F32, data.clone()).tensor("u", &[1], DType::F32, vec![0, 0, 128, 63]);
        let g = GgufFile::from_bytes("mem", &w.to_bytes()).unwrap();
        assert_eq!(g.string("general.architecture").unwrap(), "llama");
        assert_eq!(g.u64("n").unwrap(), 7);
        assert_eq!(g.get("list"), Some(&Value::Array(Array::String(vec!["a".into(), "bc".into()]))));
        assert_eq!(g.tensor_data(g.tensor("t").unwrap()), &data[..]);
        assert_eq!(g.tensor_data(g.tensor("u").unwrap()), &[0, 0, 128, 63]);
    }
}
