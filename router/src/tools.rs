//! Tool calling, independent of the API that asked for it: tool definitions and calls in a
//! neutral shape, the call format a model's chat template uses (or kiln's generic one when
//! the template knows no tools), the grammar that keeps the model's calls well-formed, and the
//! reader that turns output back into calls as it streams (docs/api.md, "Tool calling").

use serde_json::{json, Map, Value};

#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: Value,
    /// Arguments must validate against `parameters` (otherwise: any JSON object).
    pub strict: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// Never call a tool.
    None,
    /// Answer in text or call tools, as the model decides.
    Auto,
    /// Call at least one tool.
    Required,
    /// Call this tool.
    Named(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// One message of a conversation that may hold tool calls and results.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Turn {
    pub role: String,
    pub content: String,
    /// An assistant's calls.
    pub tool_calls: Vec<ToolCall>,
    /// A tool result's call.
    pub tool_call_id: Option<String>,
    /// The content in order when it holds images (empty otherwise: `content` is all of it).
    pub parts: Vec<Part>,
}

/// A piece of a message's content.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Text(String),
    /// An image's bytes; `path` names the request field it came from.
    Image { path: String, data: Vec<u8> },
    /// An image named by an http(s) URL, until the router fetches it (`images::resolve`).
    RemoteImage { path: String, url: String },
}

impl Turn {
    /// The content as the template sees it: text, or the parts as transformers passes them
    /// (`{"type": "text", "text": ...}`, `{"type": "image"}`) when the message holds images.
    pub fn content_value(&self) -> Value {
        if self.parts.is_empty() {
            return json!(self.content);
        }
        Value::Array(
            self.parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => json!({"type": "text", "text": t}),
                    Part::Image { .. } | Part::RemoteImage { .. } => json!({"type": "image"}),
                })
                .collect(),
        )
    }
}

/// The images of a conversation in order, with the fields they came from.
pub fn images(turns: &[Turn]) -> Vec<(&str, &[u8])> {
    turns
        .iter()
        .flat_map(|t| &t.parts)
        .filter_map(|p| match p {
            Part::Image { path, data } => Some((path.as_str(), data.as_slice())),
            Part::Text(_) | Part::RemoteImage { .. } => None,
        })
        .collect()
}

/// How a model writes a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call
    /// (Hermes, Qwen 2.5/3, SmolLM3 and most templates; kiln's generic format too).
    Hermes,
    /// A bare `{"name": ..., "parameters": {...}}` (Llama 3.1 to 3.3 with custom tools); one
    /// call per answer.
    LlamaJson,
}

impl Format {
    fn arguments_key(self) -> &'static str {
        match self {
            Format::Hermes => "arguments",
            Format::LlamaJson => "parameters",
        }
    }

    /// The text every answer made of calls starts with.
    fn opening(self) -> &'static str {
        match self {
            Format::Hermes => "<tool_call>",
            Format::LlamaJson => "{",
        }
    }
}

/// The call format of a chat template, and whether the template renders tools itself
/// (`native`); when it does not, kiln describes the tools in the system prompt and writes
/// calls and results into the messages as text.
pub fn format_for(template: &str) -> (Format, bool) {
    // Mistral's calls open with a control token, which never reaches the text a worker
    // streams: those models get kiln's generic format, described in the system prompt.
    if template.contains("[TOOL_CALLS]") {
        return (Format::Hermes, false);
    }
    let knows_tools = template.contains("tools") || template.contains("tool_calls");
    if template.contains("<|python_tag|>") && knows_tools {
        return (Format::LlamaJson, true);
    }
    (Format::Hermes, knows_tools)
}

/// JSON object text of one call as the model writes it.
fn call_json(format: Format, name: &str, arguments: &str) -> String {
    format!("{{\"name\": {}, \"{}\": {}}}", Value::String(name.into()), format.arguments_key(), arguments)
}

fn openai_tools(tools: &[Tool]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| {
                let mut f = Map::new();
                f.insert("name".into(), json!(t.name));
                if let Some(d) = &t.description {
                    f.insert("description".into(), json!(d));
                }
                f.insert("parameters".into(), t.parameters.clone());
                json!({"type": "function", "function": f})
            })
            .collect(),
    )
}

/// kiln's generic instructions, for templates that know no tools.
fn generic_instructions(tools: &[Tool], choice: &ToolChoice) -> String {
    let mut s = String::from("You can call functions to help you answer. The functions, with their arguments as JSON Schema:\n<tools>\n");
    for t in tools {
        let mut f = Map::new();
        f.insert("name".into(), json!(t.name));
        if let Some(d) = &t.description {
            f.insert("description".into(), json!(d));
        }
        f.insert("parameters".into(), t.parameters.clone());
        s.push_str(&Value::Object(f).to_string());
        s.push('\n');
    }
    s.push_str("</tools>\nTo call a function, answer with one block per call, exactly like this and nothing else:\n<tool_call>\n{\"name\": \"<function name>\", \"arguments\": <the arguments as a JSON object>}\n</tool_call>\nEach result comes back in a <tool_response> block.");
    match choice {
        ToolChoice::Required => s.push_str(" Call at least one function now."),
        ToolChoice::Named(n) => s.push_str(&format!(" Call the function `{n}` now.")),
        _ => s.push_str(" When no function is needed, answer normally."),
    }
    s
}

/// The template variables (`messages`, `tools`) for a conversation with tools.
pub fn template_variables(turns: &[Turn], tools: &[Tool], choice: &ToolChoice, format: Format, native: bool) -> Value {
    let offered = if *choice == ToolChoice::None { &[][..] } else { tools };
    if native {
        let messages: Vec<Value> = turns
            .iter()
            .map(|t| {
                let mut m = Map::new();
                m.insert("role".into(), json!(t.role));
                m.insert("content".into(), t.content_value());
                if !t.tool_calls.is_empty() {
                    let calls: Vec<Value> = t
                        .tool_calls
                        .iter()
                        .map(|c| {
                            // Templates index into the arguments (`arguments | tojson`, `.items()`).
                            let args = serde_json::from_str::<Value>(&c.arguments).unwrap_or_else(|_| json!(c.arguments));
                            json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}})
                        })
                        .collect();
                    m.insert("tool_calls".into(), Value::Array(calls));
                }
                if let Some(id) = &t.tool_call_id {
                    m.insert("tool_call_id".into(), json!(id));
                    if let Some(name) = call_name(turns, id) {
                        m.insert("name".into(), json!(name));
                    }
                }
                Value::Object(m)
            })
            .collect();
        let tools = if offered.is_empty() { Value::Null } else { openai_tools(offered) };
        return json!({"messages": messages, "tools": tools});
    }
    let mut messages: Vec<Value> = Vec::with_capacity(turns.len() + 1);
    let instructions = (!offered.is_empty()).then(|| generic_instructions(offered, choice));
    let mut pending = instructions.clone();
    let mut previous_was_tool = false;
    for t in turns {
        let (role, content) = match t.role.as_str() {
            "system" => {
                let content = match pending.take() {
                    Some(i) => format!("{}\n\n{i}", t.content),
                    None => t.content.clone(),
                };
                ("system", content)
            }
            "tool" => ("user", format!("<tool_response>\n{}\n</tool_response>", t.content)),
            "assistant" if !t.tool_calls.is_empty() => {
                let calls: Vec<String> = t.tool_calls.iter().map(|c| format!("<tool_call>\n{}\n</tool_call>", call_json(format, &c.name, &c.arguments))).collect();
                let content = if t.content.is_empty() { calls.join("\n") } else { format!("{}\n{}", t.content, calls.join("\n")) };
                ("assistant", content)
            }
            role => (role, t.content.clone()),
        };
        // Results of one round of calls go back as one message: templates that insist on
        // alternating roles would refuse consecutive user messages.
        let merge = t.role == "tool" && previous_was_tool;
        previous_was_tool = t.role == "tool";
        if let (true, Some(last)) = (merge, messages.last_mut()) {
            last["content"] = json!(format!("{}\n{content}", last["content"].as_str().unwrap_or_default()));
            continue;
        }
        let content = if t.parts.is_empty() || t.role != "user" { json!(content) } else { t.content_value() };
        messages.push(json!({"role": role, "content": content}));
    }
    if let Some(i) = pending {
        messages.insert(0, json!({"role": "system", "content": i}));
    }
    json!({"messages": messages, "tools": Value::Null})
}

fn call_name<'a>(turns: &'a [Turn], id: &str) -> Option<&'a str> {
    turns.iter().flat_map(|t| &t.tool_calls).find(|c| c.id == id).map(|c| c.name.as_str())
}

/// The JSON Schema of one call of `tool` in `format`, laid out on one line.
fn call_schema(format: Format, tool: &Tool) -> Value {
    let arguments = if tool.strict { tool.parameters.clone() } else { json!({"type": "object"}) };
    json!({
        "type": "object",
        "properties": {"name": {"const": tool.name}, (format.arguments_key()): arguments},
        "required": ["name", format.arguments_key()],
        "additionalProperties": false,
    })
}

/// The Lark grammar (llguidance's dialect) the answer must follow: calls only, for `required`
/// and a named tool; calls or text that does not start like a call, for `auto`. None when no
/// tool may be called.
pub fn grammar(tools: &[Tool], choice: &ToolChoice, parallel: bool, format: Format) -> Option<String> {
    let callable: Vec<&Tool> = match choice {
        ToolChoice::None => return None,
        ToolChoice::Named(n) => tools.iter().filter(|t| &t.name == n).collect(),
        ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
    };
    if callable.is_empty() {
        return None;
    }
    let mut schema = if callable.len() == 1 { call_schema(format, callable[0]) } else { json!({"anyOf": callable.iter().map(|t| call_schema(format, t)).collect::<Vec<_>>()}) };
    schema["x-guidance"] = json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
    // A named tool is one call; several calls need a format that can hold them.
    let several = parallel && !matches!(choice, ToolChoice::Named(_));
    let (call, more) = match format {
        Format::Hermes => (format!("\"<tool_call>\\n\" %json {schema} \"\\n</tool_call>\""), several),
        Format::LlamaJson => (format!("%json {schema}"), false),
    };
    let calls = if more { "calls: call (\"\\n\" call)*" } else { "calls: call" };
    let start = match choice {
        ToolChoice::Auto => {
            // Text may start with anything but the calls' opening character.
            let first = regex_escape_char(format.opening().chars().next().unwrap_or('<'));
            format!("start: calls | TEXT\nTEXT: /[^{first}](.|\\n)*/")
        }
        _ => "start: calls".to_string(),
    };
    Some(format!("{start}\n{calls}\ncall: {call}\n"))
}

/// A character for a regex character class, as a hex escape (valid whatever the character).
fn regex_escape_char(c: char) -> String {
    format!("\\x{{{:X}}}", c as u32)
}

/// The complete calls of a whole answer, as (name, arguments), or None when the answer is
/// text. A call cut off by the token limit is left out.
pub fn read_calls(format: Format, text: &str) -> Option<Vec<(String, String)>> {
    let mut reader = CallReader::new(format);
    reader.push(text);
    reader.finish();
    reader.is_calls().then(|| reader.calls().filter(|c| c.2).map(|(name, args, _)| (name.to_string(), args.to_string())).collect())
}

/// What a piece of streamed output adds.
#[derive(Clone, Debug, PartialEq)]
pub enum Delta {
    Text(String),
    /// Call `index` begins; its name is known.
    CallStart { index: usize, name: String },
    /// More of call `index`'s arguments (JSON text).
    Arguments { index: usize, fragment: String },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Undecided,
    Text,
    Calls,
}

/// Reads an answer as it streams: plain text, or calls whose names and arguments come out as
/// soon as they are written. The grammar fixes the calls' layout; output that strays from it
/// (an unconstrained model) stays text.
pub struct CallReader {
    format: Format,
    mode: Mode,
    buffer: String,
    /// Byte offset in `buffer` up to which calls have been read.
    pos: usize,
    calls: Vec<PartialCall>,
}

#[derive(Clone, Debug, Default)]
struct PartialCall {
    name: String,
    arguments: String,
    complete: bool,
}

impl CallReader {
    pub fn new(format: Format) -> CallReader {
        CallReader { format, mode: Mode::Undecided, buffer: String::new(), pos: 0, calls: Vec::new() }
    }

    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        self.buffer.push_str(text);
        match self.mode {
            Mode::Text => vec![Delta::Text(text.to_string())],
            Mode::Undecided => {
                let head = self.buffer.trim_start();
                let opening = self.format.opening();
                if head.len() < opening.len() && opening.starts_with(head) {
                    return Vec::new();
                }
                if head.starts_with(opening) {
                    self.mode = Mode::Calls;
                    self.pos = self.buffer.len() - head.len();
                    self.read_calls()
                } else {
                    self.mode = Mode::Text;
                    vec![Delta::Text(self.buffer.clone())]
                }
            }
            Mode::Calls => self.read_calls(),
        }
    }

    /// Text held back at the end (an answer shorter than a call's opening).
    pub fn finish(&mut self) -> Vec<Delta> {
        if self.mode == Mode::Undecided && !self.buffer.is_empty() {
            self.mode = Mode::Text;
            return vec![Delta::Text(self.buffer.clone())];
        }
        Vec::new()
    }

    /// The calls read so far: (name, arguments, complete).
    pub fn calls(&self) -> impl Iterator<Item = (&str, &str, bool)> {
        self.calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str(), c.complete))
    }

    pub fn is_calls(&self) -> bool {
        self.mode == Mode::Calls
    }

    fn read_calls(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        loop {
            let index = self.calls.len();
            let open = self.calls.last().is_some_and(|c| !c.complete);
            if !open {
                // A new call: its name, then where its arguments start.
                let rest = &self.buffer[self.pos..];
                let key = format!("\"{}\": ", self.format.arguments_key());
                let Some(name_at) = rest.find("\"name\": \"") else { return out };
                let name_start = name_at + "\"name\": \"".len();
                let Some(name_len) = rest[name_start..].find('"') else { return out };
                let name = rest[name_start..name_start + name_len].to_string();
                let Some(args_at) = rest[name_start + name_len..].find(&key) else { return out };
                self.pos += name_start + name_len + args_at + key.len();
                self.calls.push(PartialCall { name: name.clone(), ..PartialCall::default() });
                out.push(Delta::CallStart { index, name });
                continue;
            }
            let index = index - 1;
            let already = self.calls[index].arguments.len();
            let rest = &self.buffer[self.pos..];
            let (end, complete) = match json_value_end(rest) {
                Some(end) => (end, true),
                None => (rest.len(), false),
            };
            if end > already {
                let fragment = rest[already..end].to_string();
                self.calls[index].arguments.push_str(&fragment);
                out.push(Delta::Arguments { index, fragment });
            }
            if !complete {
                return out;
            }
            self.calls[index].complete = true;
            self.pos += end;
        }
    }
}

/// Where the JSON value at the start of `s` ends (byte offset), if it is complete.
fn json_value_end(s: &str) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped, mut started) = (0usize, false, false, false);
    for (i, c) in s.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    in_string = false;
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                started = true;
            }
            // Scalars (numbers, true, false, null) end at a delimiter.
            ',' | '}' | ']' if depth == 0 && started => return Some(i),
            '{' | '[' => {
                depth += 1;
                started = true;
            }
            '}' | ']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            c if c.is_whitespace() && !started => {}
            _ => started = true,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            strict: true,
        }
    }

    fn read_all(format: Format, text: &str, piece: usize) -> (Vec<Delta>, CallReader) {
        let mut r = CallReader::new(format);
        let mut deltas = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for chunk in chars.chunks(piece) {
            deltas.extend(r.push(&chunk.iter().collect::<String>()));
        }
        deltas.extend(r.finish());
        (deltas, r)
    }

    #[test]
    fn calls_stream_out_in_any_pieces_and_reassemble() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris \\\"}\\\" \", \"n\": [1, {\"a\": 2}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        for piece in [1, 2, 3, 7, 1000] {
            let (deltas, r) = read_all(Format::Hermes, text, piece);
            let calls: Vec<_> = r.calls().collect();
            assert_eq!(calls, vec![("get_weather", "{\"city\": \"Paris \\\"}\\\" \", \"n\": [1, {\"a\": 2}]}", true), ("get_time", "{}", true)], "piece {piece}");
            let mut args = vec![String::new(); 2];
            for d in &deltas {
                match d {
                    Delta::Arguments { index, fragment } => args[*index].push_str(fragment),
                    Delta::Text(t) => panic!("text {t:?}"),
                    Delta::CallStart { .. } => {}
                }
            }
            assert_eq!(args[0], calls[0].1);
            assert_eq!(deltas.iter().filter(|d| matches!(d, Delta::CallStart { .. })).count(), 2);
        }
    }

    #[test]
    fn text_answers_stay_text_and_short_ones_come_out_at_the_end() {
        for piece in [1, 4, 100] {
            let (deltas, r) = read_all(Format::Hermes, "The weather is fine.", piece);
            let text: String = deltas.iter().map(|d| if let Delta::Text(t) = d { t.clone() } else { panic!() }).collect();
            assert_eq!(text, "The weather is fine.");
            assert!(!r.is_calls());
        }
        let (deltas, _) = read_all(Format::Hermes, "<tool", 1);
        assert_eq!(deltas, vec![Delta::Text("<tool".into())]);
    }

    #[test]
    fn llama_json_calls_use_parameters() {
        let (_, r) = read_all(Format::LlamaJson, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}", 3);
        assert_eq!(r.calls().collect::<Vec<_>>(), vec![("get_weather", "{\"city\": \"Oslo\"}", true)]);
    }

    #[test]
    fn grammars_follow_the_choice() {
        let tools = [weather(), Tool { name: "get_time".into(), description: None, parameters: json!({}), strict: false }];
        assert_eq!(grammar(&tools, &ToolChoice::None, true, Format::Hermes), None);
        let auto = grammar(&tools, &ToolChoice::Auto, true, Format::Hermes).unwrap();
        assert!(auto.starts_with("start: calls | TEXT") && auto.contains("anyOf") && auto.contains("(\"\\n\" call)*"), "{auto}");
        let named = grammar(&tools, &ToolChoice::Named("get_weather".into()), false, Format::Hermes).unwrap();
        assert!(named.starts_with("start: calls\ncalls: call\n") && !named.contains("get_time") && named.contains("\"required\":[\"city\"]"), "{named}");
        // Non-strict tools take any object as arguments.
        let loose = grammar(&tools, &ToolChoice::Named("get_time".into()), true, Format::Hermes).unwrap();
        assert!(loose.contains("\"arguments\":{\"type\":\"object\"}"), "{loose}");
        assert_eq!(grammar(&tools, &ToolChoice::Named("nope".into()), true, Format::Hermes), None);
    }

    #[test]
    fn generic_rendering_describes_tools_and_writes_calls_and_results_as_text() {
        let turns = vec![
            Turn { role: "user".into(), content: "Weather in Paris?".into(), ..Turn::default() },
            Turn { role: "assistant".into(), tool_calls: vec![ToolCall { id: "c1".into(), name: "get_weather".into(), arguments: "{\"city\": \"Paris\"}".into() }], ..Turn::default() },
            Turn { role: "tool".into(), content: "18 C".into(), tool_call_id: Some("c1".into()), ..Turn::default() },
        ];
        let v = template_variables(&turns, &[weather()], &ToolChoice::Auto, Format::Hermes, false);
        let m = v["messages"].as_array().unwrap();
        assert_eq!(m[0]["role"], "system");
        assert!(m[0]["content"].as_str().unwrap().contains("\"name\":\"get_weather\""));
        assert_eq!(m[2]["content"], "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>");
        assert_eq!(m[3], json!({"role": "user", "content": "<tool_response>\n18 C\n</tool_response>"}));
        // Two results of one round share a message.
        let mut two = turns.clone();
        two.push(Turn { role: "tool".into(), content: "19 C".into(), tool_call_id: Some("c2".into()), ..Turn::default() });
        let v = template_variables(&two, &[weather()], &ToolChoice::Auto, Format::Hermes, false);
        assert_eq!(v["messages"].as_array().unwrap().len(), 4);
        assert_eq!(v["messages"][3]["content"], "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n19 C\n</tool_response>");
        let native = template_variables(&turns, &[weather()], &ToolChoice::Auto, Format::Hermes, true);
        assert_eq!(native["messages"][1]["tool_calls"][0]["function"]["arguments"], json!({"city": "Paris"}));
        assert_eq!(native["messages"][2]["name"], "get_weather");
        assert_eq!(native["tools"][0]["function"]["name"], "get_weather");
    }

    #[test]
    fn template_formats() {
        assert_eq!(format_for("{{ messages }}"), (Format::Hermes, false));
        assert_eq!(format_for("{% if tools %}<tool_call>{% endif %}"), (Format::Hermes, true));
        assert_eq!(format_for("{% if tools %}<|python_tag|>{% endif %}"), (Format::LlamaJson, true));
        assert_eq!(format_for("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"), (Format::Hermes, false));
    }
}
