//! Reading request bodies field by field, so that every mistake is answered with a 400
//! naming the field: malformed JSON, a field kiln does not know or support, a wrong type,
//! a value out of range. `null` counts as absent, as OpenAI's API treats it.

use crate::error::ApiError;
use serde_json::{Map, Value};

/// Parses a request body that must be a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("the request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
    }
}

/// The fields of one JSON object, checked against the ones a route accepts.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    /// Prefix for field names in errors (e.g. `messages[2].`).
    path: String,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Fields<'a> {
    /// Fails on the first field that is neither in `known` nor `null`. `unsupported` lists
    /// fields of the API that kiln recognizes but does not implement, for a clearer message.
    pub fn new(map: &'a Map<String, Value>, path: &str, known: &[&str], unsupported: &[&str]) -> Result<Fields<'a>, ApiError> {
        for (key, value) in map {
            if known.contains(&key.as_str()) || value.is_null() {
                continue;
            }
            let name = format!("{path}{key}");
            return Err(if unsupported.contains(&key.as_str()) {
                ApiError::field(name, "is not supported by this server")
            } else {
                ApiError::field(name, "is not a recognized field")
            });
        }
        Ok(Fields { map, path: path.to_string() })
    }

    pub fn name(&self, key: &str) -> String {
        format!("{}{key}", self.path)
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &Value) -> ApiError {
        ApiError::field(self.name(key), format!("expected {expected}, got {}", type_name(got)))
    }

    pub fn require(&self, key: &str) -> Result<&'a Value, ApiError> {
        self.get(key).ok_or_else(|| ApiError::field(self.name(key), "is required"))
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "a boolean", v)),
        }
    }

    /// A number within `min..=max`.
    pub fn f32(&self, key: &str, min: f32, max: f32) -> Result<Option<f32>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN) as f32;
                if x.is_finite() && (min..=max).contains(&x) {
                    Ok(Some(x))
                } else {
                    Err(ApiError::field(self.name(key), format!("{n} is out of range ({min} to {max})")))
                }
            }
            Some(v) => Err(self.wrong_type(key, "a number", v)),
        }
    }

    /// An integer within `min..=max`.
    pub fn int(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
                Some(_) => Err(ApiError::field(self.name(key), format!("{n} is out of range ({min} to {max})"))),
                None if n.is_u64() => Err(ApiError::field(self.name(key), format!("{n} is out of range ({min} to {max})"))),
                None => Err(ApiError::field(self.name(key), format!("expected an integer, got {n}"))),
            },
            Some(v) => Err(self.wrong_type(key, "an integer", v)),
        }
    }

    /// An unsigned 64-bit integer (seeds).
    pub fn u64(&self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(x), _) => Ok(Some(x)),
                // Negative seeds are accepted as their two's-complement bits.
                (None, Some(x)) => Ok(Some(x as u64)),
                _ => Err(ApiError::field(self.name(key), format!("expected an integer, got {n}"))),
            },
            Some(v) => Err(self.wrong_type(key, "an integer", v)),
        }
    }

    pub fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.wrong_type(key, "an object", v)),
        }
    }

    pub fn array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong_type(key, "an array", v)),
        }
    }

    /// A string or an array of strings (OpenAI's `stop`), at most `max` of them, none empty.
    pub fn strings(&self, key: &str, max: usize) -> Result<Vec<String>, ApiError> {
        let out = match self.get(key) {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        v => return Err(ApiError::field(format!("{}[{i}]", self.name(key)), format!("expected a string, got {}", type_name(v)))),
                    }
                }
                out
            }
            Some(v) => return Err(self.wrong_type(key, "a string or an array of strings", v)),
        };
        if out.len() > max {
            return Err(ApiError::field(self.name(key), format!("at most {max} are allowed, got {}", out.len())));
        }
        if out.iter().any(|s| s.is_empty()) {
            return Err(ApiError::field(self.name(key), "an empty string cannot be a stop sequence"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn unknown_and_unsupported_fields_are_named() {
        let m = map(json!({"a": 1, "tools": [1], "x": null}));
        let e = Fields::new(&m, "", &["a"], &["tools"]).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("tools"));
        assert!(e.message.contains("not supported"));
        let m = map(json!({"a": 1, "bogus": 2}));
        let e = Fields::new(&m, "messages[0].", &["a"], &[]).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("messages[0].bogus"));
    }

    #[test]
    fn types_and_ranges_are_checked() {
        let m = map(json!({"t": "hot", "n": 0, "p": 1.5, "f": 2.5, "s": ["a", 3], "seed": -1, "none": null}));
        let f = Fields::new(&m, "", &["t", "n", "p", "f", "s", "seed"], &[]).unwrap();
        assert!(f.f32("t", 0.0, 2.0).unwrap_err().message.contains("expected a number, got a string"));
        assert!(f.int("n", 1, 16).unwrap_err().message.contains("out of range"));
        assert!(f.f32("p", 0.0, 1.0).is_err());
        assert!(f.int("f", 0, 10).unwrap_err().message.contains("integer"));
        assert_eq!(f.strings("s", 4).unwrap_err().param.as_deref(), Some("s[1]"));
        assert_eq!(f.u64("seed").unwrap(), Some(u64::MAX));
        assert_eq!(f.f32("none", 0.0, 1.0).unwrap(), None);
        assert!(parse_object(b"{\"a\": ").unwrap_err().message.contains("not valid JSON"));
        assert!(parse_object(b"[1]").unwrap_err().message.contains("JSON object"));
    }
}
