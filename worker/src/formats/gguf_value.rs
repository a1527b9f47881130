//! GGUF metadata values and the bounds-checked cursor that reads them.

/// A position in the file and what went wrong there.
#[derive(Debug)]
pub struct ReadError {
    pub offset: usize,
    pub what: String,
}

pub struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// Nesting limit for arrays of arrays; real files use at most one level.
const MAX_ARRAY_DEPTH: usize = 4;

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8], pos: usize) -> Cursor<'a> {
        Cursor { bytes, pos }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        if n > self.remaining() {
            return Err(ReadError {
                offset: self.pos,
                what: format!("needs {n} bytes but only {} remain; the file is truncated", self.remaining()),
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        Ok(self.take(N)?.try_into().expect("take returns exactly N bytes"))
    }

    pub fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, ReadError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn string(&mut self) -> Result<String, ReadError> {
        let at = self.pos;
        let len = self.u64()?;
        if len > self.remaining() as u64 {
            return Err(ReadError { offset: at, what: format!("string length {len} exceeds the {} bytes left", self.remaining()) });
        }
        let raw = self.take(len as usize)?;
        // Vocabularies occasionally hold byte sequences that are not UTF-8; keep them readable
        // rather than refusing the whole file.
        Ok(String::from_utf8(raw.to_vec()).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(Array),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Array(Vec<Array>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Integer elements widened to i64, or None for non-integer arrays.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U64(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I64(v) => v.clone(),
            Array::Bool(v) => v.iter().map(|&x| x as i64).collect(),
            _ => return None,
        })
    }
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
            Value::Array(_) => "array",
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// An array of floats (f32 or f64) as f32 values.
    pub fn as_f32_array(&self) -> Option<Vec<f32>> {
        match self {
            Value::Array(Array::F32(v)) => Some(v.clone()),
            Value::Array(Array::F64(v)) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => None,
        }
    }
}

fn element_size(type_id: u32) -> Option<usize> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        // Strings and arrays carry an 8-byte length before their contents.
        8 => 8,
        9 => 12,
        _ => return None,
    })
}

pub fn read_value(cur: &mut Cursor) -> Result<Value, ReadError> {
    let at = cur.pos();
    let type_id = cur.u32()?;
    read_typed(cur, type_id, at, 0)
}

fn read_typed(cur: &mut Cursor, type_id: u32, at: usize, depth: usize) -> Result<Value, ReadError> {
    Ok(match type_id {
        0 => Value::U8(cur.u8()?),
        1 => Value::I8(cur.u8()? as i8),
        2 => Value::U16(cur.u16()?),
        3 => Value::I16(cur.u16()? as i16),
        4 => Value::U32(cur.u32()?),
        5 => Value::I32(cur.u32()? as i32),
        6 => Value::F32(f32::from_bits(cur.u32()?)),
        7 => match cur.u8()? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => return Err(ReadError { offset: cur.pos() - 1, what: format!("boolean byte {b} is neither 0 nor 1") }),
        },
        8 => Value::String(cur.string()?),
        9 => Value::Array(read_array(cur, depth)?),
        10 => Value::U64(cur.u64()?),
        11 => Value::I64(cur.u64()? as i64),
        12 => Value::F64(f64::from_bits(cur.u64()?)),
        other => return Err(ReadError { offset: at, what: format!("unknown value type {other}") }),
    })
}

fn read_array(cur: &mut Cursor, depth: usize) -> Result<Array, ReadError> {
    let at = cur.pos();
    if depth >= MAX_ARRAY_DEPTH {
        return Err(ReadError { offset: at, what: format!("arrays nested deeper than {MAX_ARRAY_DEPTH}") });
    }
    let elem = cur.u32()?;
    let count = cur.u64()?;
    let size = element_size(elem).ok_or_else(|| ReadError { offset: at, what: format!("unknown array element type {elem}") })?;
    if count > (cur.remaining() / size) as u64 {
        return Err(ReadError { offset: at, what: format!("array of {count} elements cannot fit in the {} bytes left", cur.remaining()) });
    }
    let n = count as usize;
    macro_rules! collect {
        ($variant:ident, $read:expr) => {{
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push($read);
            }
            Array::$variant(v)
        }};
    }
    Ok(match elem {
        0 => collect!(U8, cur.u8()?),
        1 => collect!(I8, cur.u8()? as i8),
        2 => collect!(U16, cur.u16()?),
        3 => collect!(I16, cur.u16()? as i16),
        4 => collect!(U32, cur.u32()?),
        5 => collect!(I32, cur.u32()? as i32),
        6 => collect!(F32, f32::from_bits(cur.u32()?)),
        7 => collect!(Bool, cur.u8()? != 0),
        8 => collect!(String, cur.string()?),
        9 => collect!(Array, read_array(cur, depth + 1)?),
        10 => collect!(U64, cur.u64()?),
        11 => collect!(I64, cur.u64()? as i64),
        12 => collect!(F64, f64::from_bits(cur.u64()?)),
        _ => unreachable!("element_size accepted only known types"),
    })
}
