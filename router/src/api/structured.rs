//! Structured output: OpenAI's `response_format` (the Responses API's `text.format`) and
//! kiln's `grammar` extension, read into the constraint the worker enforces token by token
//! (docs/api.md). The grammar itself is checked by the worker, which compiles it against the
//! model's vocabulary; its complaints come back as 400s naming the problem.

use crate::error::ApiError;
use crate::params::Fields;
use kiln_proto::v1 as pb;
use pb::constraint::Kind;
use serde_json::Value;

fn constraint(kind: Kind) -> Option<pb::Constraint> {
    Some(pb::Constraint { kind: Some(kind) })
}

/// `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`, or
/// `{"type": "json_schema", "json_schema": {"name", "schema"?, "strict"?, "description"?}}`.
fn response_format(f: &Fields) -> Result<Option<pb::Constraint>, ApiError> {
    let Some(rf) = f.object("response_format")? else { return Ok(None) };
    let rf = Fields::new(rf, "response_format.", &["type", "json_schema"], &[])?;
    match rf.str("type")? {
        Some("text") => Ok(None),
        Some("json_object") => Ok(constraint(Kind::JsonObject(true))),
        Some("json_schema") => {
            let Some(js) = rf.object("json_schema")? else { return Err(ApiError::field(rf.name("json_schema"), "is required when type is json_schema")) };
            let js = Fields::new(js, "response_format.json_schema.", &["name", "schema", "strict", "description"], &[])?;
            named_schema(&js).map(Some)
        }
        Some(other) => Err(ApiError::field(rf.name("type"), format!("unknown type `{other}`; expected text, json_object or json_schema"))),
        None => Err(ApiError::field(rf.name("type"), "is required")),
    }
}

/// A named JSON Schema (`name`, `schema`?, `strict`?, `description`?): chat's
/// `response_format.json_schema`, and the Responses API's `text.format` beside its `type`.
fn named_schema(js: &Fields) -> Result<pb::Constraint, ApiError> {
    let name = js.str("name")?.ok_or_else(|| ApiError::field(js.name("name"), "is required"))?;
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(ApiError::field(js.name("name"), "must be 1 to 64 letters, digits, underscores or dashes"));
    }
    js.bool("strict")?;
    js.str("description")?;
    // Without a schema any JSON value is allowed.
    let schema = match js.get("schema") {
        None => Value::Object(Default::default()),
        Some(s @ (Value::Object(_) | Value::Bool(_))) => s.clone(),
        Some(_) => return Err(ApiError::field(js.name("schema"), "expected a JSON Schema object")),
    };
    Ok(pb::Constraint { kind: Some(Kind::JsonSchema(schema.to_string())) })
}

/// The Responses API's `text`: `{"format": {"type": "text"} | {"type": "json_object"} |
/// {"type": "json_schema", "name", "schema"?, "strict"?, "description"?}, "verbosity"?}`.
/// `verbosity` is a hint for OpenAI's reasoning models, accepted and not acted on.
pub fn text_format(f: &Fields) -> Result<Option<pb::Constraint>, ApiError> {
    let Some(text) = f.object("text")? else { return Ok(None) };
    let t = Fields::new(text, "text.", &["format", "verbosity"], &[])?;
    if let Some(v) = t.str("verbosity")?.filter(|v| !matches!(*v, "low" | "medium" | "high")) {
        return Err(ApiError::field(t.name("verbosity"), format!("unknown value `{v}`; expected low, medium or high")));
    }
    let Some(format) = t.object("format")? else { return Ok(None) };
    let kind = format.get("type").and_then(Value::as_str);
    let known: &[&str] = if kind == Some("json_schema") { &["type", "name", "schema", "strict", "description"] } else { &["type"] };
    let format = Fields::new(format, "text.format.", known, &[])?;
    match format.str("type")? {
        Some("text") => Ok(None),
        Some("json_object") => Ok(constraint(Kind::JsonObject(true))),
        Some("json_schema") => named_schema(&format).map(Some),
        Some(other) => Err(ApiError::field(format.name("type"), format!("unknown type `{other}`; expected text, json_object or json_schema"))),
        None => Err(ApiError::field(format.name("type"), "is required")),
    }
}

/// kiln's `grammar`: `{"type": "regex" | "lark", "value": TEXT}` or
/// `{"type": "json_schema", "value": SCHEMA}`.
fn grammar(f: &Fields) -> Result<Option<pb::Constraint>, ApiError> {
    let Some(g) = f.object("grammar")? else { return Ok(None) };
    let g = Fields::new(g, "grammar.", &["type", "value"], &[])?;
    let value = g.require("value")?;
    let text = || value.as_str().map(str::to_string).ok_or_else(|| ApiError::field(g.name("value"), "expected a string"));
    let kind = match g.str("type")? {
        Some("regex") => Kind::Regex(text()?),
        Some("lark") => Kind::Lark(text()?),
        Some("json_schema") => match value {
            Value::Object(_) | Value::Bool(_) => Kind::JsonSchema(value.to_string()),
            // A schema given as JSON text is taken as it is; the worker says if it is not JSON.
            Value::String(s) => Kind::JsonSchema(s.clone()),
            _ => return Err(ApiError::field(g.name("value"), "expected a JSON Schema object")),
        },
        Some(other) => return Err(ApiError::field(g.name("type"), format!("unknown type `{other}`; expected regex, lark or json_schema"))),
        None => return Err(ApiError::field(g.name("type"), "is required")),
    };
    if matches!(&kind, Kind::Regex(t) | Kind::Lark(t) if t.trim().is_empty()) {
        return Err(ApiError::field(g.name("value"), "is empty"));
    }
    Ok(constraint(kind))
}

/// The constraint of a chat request: `response_format` or `grammar`, not both.
pub fn chat(f: &Fields) -> Result<Option<pb::Constraint>, ApiError> {
    match (response_format(f)?, grammar(f)?) {
        (Some(_), Some(_)) => Err(ApiError::field("grammar", "cannot be combined with a json_object or json_schema response_format")),
        (a, b) => Ok(a.or(b)),
    }
}

/// The constraint of a text completion request (`grammar` only).
pub fn completion(f: &Fields) -> Result<Option<pb::Constraint>, ApiError> {
    grammar(f)
}
