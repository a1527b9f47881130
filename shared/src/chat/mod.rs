//! Chat templates: Jinja templates as shipped in model files, rendered with minijinja in
//! the same mode Hugging Face uses (`trim_blocks`, `lstrip_blocks`, Python string methods),
//! plus built-in templates for architectures whose files carry none.

mod pycompat;

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("chat template does not parse: {0}")]
    Syntax(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
    #[error("chat template uses a feature kiln cannot render: {0}")]
    Unsupported(String),
}

/// Gemma's turn format: system text leads the first user turn, the assistant is "model",
/// and message text is trimmed.
const GEMMA: &str = r#"{{- bos_token -}}
{%- set state = namespace(system="") -%}
{%- for message in messages -%}
{%- if message.role == "system" -%}
{%- set state.system = state.system + (message.content | trim) -%}
{%- else -%}
{%- set role = "model" if message.role == "assistant" else message.role -%}
{{- "<start_of_turn>" ~ role ~ "\n" -}}
{%- if state.system and role != "model" -%}
{{- state.system ~ "\n\n" -}}
{%- set state.system = "" -%}
{%- endif -%}
{{- (message.content | trim) ~ "<end_of_turn>\n" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "<start_of_turn>model\n" -}}
{%- endif -%}"#;

/// ChatML, the fallback for files without a template.
const CHATML: &str = r#"{%- for message in messages -%}
{{- "<|im_start|>" ~ message.role ~ "\n" ~ message.content ~ "<|im_end|>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "<|im_start|>assistant\n" -}}
{%- endif -%}"#;

/// The template kiln uses for an architecture whose model file has none.
pub fn builtin_template(architecture: &str) -> &'static str {
    match architecture {
        "gemma" | "gemma2" | "gemma3" => GEMMA,
        _ => CHATML,
    }
}

/// Instructions one render may run.
pub const TEMPLATE_FUEL: u64 = 10_000_000;
/// Nesting of macro calls and includes one render may reach.
const TEMPLATE_RECURSION: usize = 100;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Why this template cannot render, for a model served without a usable one.
    refusal: Option<ChatTemplateError>,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatTemplateError> {
        if let Some(feature) = pycompat::unsupported_feature(source) {
            return Err(ChatTemplateError::Unsupported(feature.to_string()));
        }
        let mut env = Environment::new();
        // A template comes with a model file: one that loops without end or recurses deeply
        // stops with an error instead of holding a request (real templates use well under
        // 1% of this fuel on long conversations).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(pycompat::format);
        env.add_filter("tojson", pycompat::tojson);
        env.add_filter("string", pycompat::string);
        env.add_filter("safe", pycompat::safe);
        env.add_test("iterable", pycompat::is_iterable);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| -> String { strftime_utc_now(&format) });
        env.add_template_owned("chat", pycompat::without_generation_tags(source)).map_err(|e| ChatTemplateError::Syntax(e.to_string()))?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string(), refusal: None })
    }

    /// The template in `source`, or, when it cannot be used, one whose every render fails with
    /// the reason: a model whose template kiln cannot render still serves raw completions,
    /// and chat requests get that error rather than a prompt rendered wrongly.
    pub fn or_refusing(source: &str, bos_token: &str, eos_token: &str) -> ChatTemplate {
        ChatTemplate::new(source, bos_token, eos_token).unwrap_or_else(|e| ChatTemplate {
            env: Environment::new(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            refusal: Some(e),
        })
    }

    /// Why every render fails, for a template made by `or_refusing` from an unusable source.
    pub fn refusal(&self) -> Option<&ChatTemplateError> {
        self.refusal.as_ref()
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatTemplateError> {
        let messages = serde_json::to_value(messages).map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        self.render_with(&serde_json::json!({ "messages": messages, "add_generation_prompt": add_generation_prompt }))
    }

    /// Renders with the variables transformers' `apply_chat_template` passes: `messages` (as
    /// JSON: tool calls, content parts and all), `tools`, `add_generation_prompt` and any
    /// extra ones (`enable_thinking`, `documents`, ...); `bos_token` and `eos_token` are added
    /// unless given.
    pub fn render_with(&self, variables: &serde_json::Value) -> Result<String, ChatTemplateError> {
        if let Some(refusal) = &self.refusal {
            return Err(refusal.clone());
        }
        let template = self.env.get_template("chat").map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        let mut ctx = match variables {
            serde_json::Value::Object(map) => map.clone(),
            other => return Err(ChatTemplateError::Render(format!("template variables must be a JSON object, not {other}"))),
        };
        ctx.entry("bos_token").or_insert_with(|| self.bos_token.clone().into());
        ctx.entry("eos_token").or_insert_with(|| self.eos_token.clone().into());
        ctx.entry("add_generation_prompt").or_insert(false.into());
        // transformers always passes these, as None when absent (`tools is none` holds).
        ctx.entry("tools").or_insert(serde_json::Value::Null);
        ctx.entry("documents").or_insert(serde_json::Value::Null);
        template.render(Value::from_serialize(&ctx)).map_err(|e| ChatTemplateError::Render(describe(&e)))
    }
}

/// Tokenizes a rendered conversation; control tokens written by the template are recognized.
/// A `tokenizer.json` tokenizer adds nothing (transformers' `apply_chat_template`: the
/// template writes every special token it wants). A GGUF vocabulary gets BOS when the
/// template did not write it (llama.cpp's rule).
pub fn encode_rendered(tokenizer: &crate::tokenizer::Tokenizer, rendered: &str) -> Vec<u32> {
    if tokenizer.is_hugging_face() {
        return tokenizer.encode(rendered, false, true);
    }
    let template_has_bos = tokenizer.bos_text().is_some_and(|b| !b.is_empty() && rendered.starts_with(b));
    tokenizer.encode(rendered, !template_has_bos, true)
}

fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) if e.kind() == ErrorKind::InvalidOperation => detail.to_string(),
        _ => e.to_string(),
    }
}

/// A small strftime for templates that stamp the date (`%Y %m %d %b %B %H %M %S %%`).
fn strftime_utc_now(format: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format_utc(secs, format)
}

fn format_utc(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", " Hi! "),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Bye"),
        ]
    }

    #[test]
    fn gemma_template_folds_system_into_first_user_turn() {
        let t = ChatTemplate::new(builtin_template("gemma3"), "<bos>", "<eos>").unwrap();
        let out = t.render(&conversation(), true).unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn chatml_fallback_and_generation_prompt() {
        let t = ChatTemplate::new(builtin_template("llama"), "", "").unwrap();
        let out = t.render(&conversation()[1..2], false).unwrap();
        assert_eq!(out, "<|im_start|>user\n Hi! <|im_end|>\n");
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}\
                   {{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[ChatMessage::new("user", "  x ")], false).unwrap(), "X");
        let err = t.render(&[ChatMessage::new("system", "x")], false).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn bad_template_is_a_syntax_error() {
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(ChatTemplateError::Syntax(_))));
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC
        assert_eq!(format_utc(1_709_211_909, "%d %b %Y %H:%M:%S %B %%"), "29 Feb 2024 13:05:09 February %");
    }
}
