//! OpenAI's Responses API (`/v1/responses`) against scripted workers: the response object,
//! the stream's typed events in order, function calls, a conversation of items put to the
//! model exactly as the same chat conversation is, and the refusals that name their field.

mod fake;

use axum::http::StatusCode;
use fake::{call, post, router_over, sse, Mode};
use kiln_router::RouterConfig;
use serde_json::{json, Value};

const WEATHER: &str = r#"{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}"#;

fn weather_tool() -> Value {
    json!({ "type": "function", "name": "get_weather", "description": "Current weather", "parameters": serde_json::from_str::<Value>(WEATHER).unwrap() })
}

/// The typed events of a Responses stream: each event's name, and its data (whose `type`
/// must be the name).
fn events(text: &str) -> Vec<(String, Value)> {
    let (data, names) = sse(text);
    assert_eq!(data.len(), names.len(), "every event is named: {text}");
    names
        .into_iter()
        .zip(data)
        .map(|(name, d)| {
            let v: Value = serde_json::from_str(&d).unwrap();
            assert_eq!(v["type"], name.as_str(), "{v}");
            (name, v)
        })
        .collect()
}

/// An output item without its random ids.
fn without_ids(item: &Value) -> Value {
    let mut item = item.clone();
    for key in ["id", "call_id"] {
        if let Some(map) = item.as_object_mut() {
            map.remove(key);
        }
    }
    item
}

#[tokio::test]
async fn a_response_carries_its_text_usage_and_the_request_settings() {
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let body = json!({
        "model": "fake", "instructions": "be brief", "input": "hi", "max_output_tokens": 20, "temperature": 0.5,
        "metadata": { "run": "7" }, "include": ["message.output_text.logprobs"], "top_logprobs": 1, "user": "u1", "store": true,
    });
    let (status, r) = post(&app, "/v1/responses", body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!((r["object"].as_str(), r["status"].as_str()), (Some("response"), Some("completed")), "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!((&r["error"], &r["incomplete_details"]), (&Value::Null, &Value::Null));
    let [message] = r["output"].as_array().unwrap().as_slice() else { panic!("one item: {r}") };
    assert_eq!((message["type"].as_str(), message["role"].as_str(), message["status"].as_str()), (Some("message"), Some("assistant"), Some("completed")));
    let part = &message["content"][0];
    assert_eq!((part["type"].as_str(), part["text"].as_str()), (Some("output_text"), Some(fake::REPLY)));
    let logprobs = part["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), fake::REPLY.len());
    assert_eq!((logprobs[0]["token"].as_str(), logprobs[0]["logprob"].as_f64()), (Some("H"), Some(-0.5)));
    assert_eq!(logprobs[0]["top_logprobs"].as_array().unwrap().len(), 1);
    // The settings come back; nothing is stored whatever `store` asked.
    assert_eq!((r["instructions"].as_str(), r["max_output_tokens"].as_u64(), r["temperature"].as_f64()), (Some("be brief"), Some(20), Some(0.5)));
    assert_eq!((r["store"].as_bool(), r["metadata"]["run"].as_str(), r["user"].as_str()), (Some(false), Some("7"), Some("u1")));
    assert_eq!(r["text"]["format"]["type"], "text");
    let sent = records[0].requests.lock().unwrap()[0].clone();
    assert_eq!((sent.max_tokens, sent.logprobs, sent.top_logprobs, sent.n), (Some(20), true, 1, 1));
    let usage = &r["usage"];
    assert_eq!(usage["input_tokens"].as_u64(), Some(sent.prompt.len() as u64));
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], fake::CACHED);
    assert_eq!(usage["output_tokens"].as_u64(), Some(fake::REPLY.len() as u64));
    assert_eq!(usage["total_tokens"].as_u64(), Some((sent.prompt.len() + fake::REPLY.len()) as u64));
    // `instructions` and `input` make the prompt that chat's system and user messages make.
    let chat = json!({ "model": "fake", "messages": [{ "role": "system", "content": "be brief" }, { "role": "user", "content": "hi" }] });
    assert_eq!(post(&app, "/v1/chat/completions", chat).await.0, StatusCode::OK);
    assert_eq!(records[0].requests.lock().unwrap()[1].prompt, sent.prompt);
}

#[tokio::test]
async fn a_streamed_response_sends_the_typed_events_in_order() {
    let (app, _, _) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let body = json!({ "model": "fake", "input": [{ "role": "user", "content": "hi" }], "stream": true });
    let (status, text) = call(&app, "POST", "/v1/responses", body.clone(), &[]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let events = events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let deltas = fake::REPLY.len();
    let mut expected = vec!["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    expected.extend(["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]);
    assert_eq!(names, expected);
    for (i, (_, v)) in events.iter().enumerate() {
        assert_eq!(v["sequence_number"].as_u64(), Some(i as u64), "{v}");
    }
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    assert_eq!(events[0].1["response"]["output"], json!([]));
    let streamed: String = events.iter().filter(|(n, _)| n == "response.output_text.delta").map(|(_, v)| v["delta"].as_str().unwrap()).collect();
    assert_eq!(streamed, fake::REPLY);
    let item_id = &events[2].1["item"]["id"];
    assert!(events[3..events.len() - 1].iter().all(|(_, v)| v.get("item_id").is_none_or(|id| id == item_id)));
    assert_eq!(events[events.len() - 3].1["part"]["text"], fake::REPLY);
    // The final response is what the same request answers unstreamed.
    let done = &events.last().unwrap().1["response"];
    let (_, whole) = post(&app, "/v1/responses", json!({ "model": "fake", "input": [{ "role": "user", "content": "hi" }] })).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["usage"], whole["usage"]);
    let items = |r: &Value| r["output"].as_array().unwrap().iter().map(without_ids).collect::<Vec<_>>();
    assert_eq!(items(done), items(&whole));
    assert_eq!(&done["output"][0]["id"], item_id);
}

#[tokio::test]
async fn a_response_cut_off_by_max_output_tokens_is_incomplete() {
    let (app, _, _) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let (status, r) = post(&app, "/v1/responses", json!({ "model": "fake", "input": "hi", "max_output_tokens": 4 })).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!((r["status"].as_str(), r["incomplete_details"]["reason"].as_str()), (Some("incomplete"), Some("max_output_tokens")), "{r}");
    assert_eq!((r["output"][0]["status"].as_str(), r["output"][0]["content"][0]["text"].as_str()), (Some("incomplete"), Some("Hell")));
    let (_, text) = call(&app, "POST", "/v1/responses", json!({ "model": "fake", "input": "hi", "max_output_tokens": 4, "stream": true }), &[]).await;
    let events = events(&text);
    let (last, v) = events.last().unwrap();
    assert_eq!(last, "response.incomplete");
    assert_eq!(v["response"]["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(events[events.len() - 2].1["item"]["status"], "incomplete");
}

#[tokio::test]
async fn function_calls_come_back_as_items_whole_and_streamed() {
    let (app, _, records) = router_over(&[Mode::Calls], RouterConfig::default()).await;
    let body = json!({ "model": "fake", "input": "Weather in Paris?", "tools": [weather_tool()], "tool_choice": "required" });
    let (status, r) = post(&app, "/v1/responses", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let [call_item] = r["output"].as_array().unwrap().as_slice() else { panic!("one call: {r}") };
    assert_eq!((call_item["type"].as_str(), call_item["name"].as_str(), call_item["status"].as_str()), (Some("function_call"), Some("get_weather"), Some("completed")));
    assert!(call_item["call_id"].as_str().unwrap().starts_with("call_") && call_item["id"].as_str().unwrap().starts_with("fc_"));
    assert_eq!(serde_json::from_str::<Value>(call_item["arguments"].as_str().unwrap()).unwrap(), json!({ "city": "Paris" }));
    // Function tools are strict unless they say otherwise, and the call is held to the grammar.
    assert_eq!(r["tools"][0]["strict"], true);
    assert!(records[0].requests.lock().unwrap()[0].constraint.is_some());
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, text) = call(&app, "POST", "/v1/responses", streamed, &[]).await;
    let events = events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[2], "response.output_item.added");
    assert_eq!(events[2].1["item"]["type"], "function_call");
    assert_eq!(events[2].1["item"]["name"], "get_weather");
    assert_eq!(&names[names.len() - 3..], ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]);
    let arguments: String = events.iter().filter(|(n, _)| n == "response.function_call_arguments.delta").map(|(_, v)| v["delta"].as_str().unwrap()).collect();
    assert_eq!(arguments, call_item["arguments"].as_str().unwrap());
    assert_eq!(events[names.len() - 3].1["arguments"], call_item["arguments"]);
    assert!(!names.contains(&"response.output_text.delta"));
}

#[tokio::test]
async fn a_conversation_of_items_is_put_to_the_model_as_the_same_chat_is() {
    let (app, _, records) = router_over(&[Mode::Calls], RouterConfig::default()).await;
    let arguments = r#"{"city": "Paris"}"#;
    let input = json!([
        { "type": "message", "role": "developer", "content": "Use tools." },
        { "role": "user", "content": [{ "type": "input_text", "text": "Weather in " }, { "type": "input_text", "text": "Paris?" }] },
        { "type": "message", "role": "assistant", "content": [{ "type": "output_text", "text": "Let me look.", "annotations": [] }], "status": "completed", "id": "msg_1" },
        { "type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": arguments, "id": "fc_1", "status": "completed" },
        { "type": "function_call_output", "call_id": "call_9", "output": "18 C, sunny" },
    ]);
    let (status, r) = post(&app, "/v1/responses", json!({ "model": "fake", "input": input, "tools": [weather_tool()] })).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let function = json!({ "name": "get_weather", "description": "Current weather", "parameters": serde_json::from_str::<Value>(WEATHER).unwrap() });
    let chat = json!({ "model": "fake", "tools": [{ "type": "function", "function": function }], "messages": [
        { "role": "system", "content": "Use tools." },
        { "role": "user", "content": "Weather in Paris?" },
        { "role": "assistant", "content": "Let me look.", "tool_calls": [{ "id": "call_9", "type": "function", "function": { "name": "get_weather", "arguments": arguments } }] },
        { "role": "tool", "tool_call_id": "call_9", "content": "18 C, sunny" },
    ]});
    let (status, c) = post(&app, "/v1/chat/completions", chat).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    let sent = records[0].requests.lock().unwrap().clone();
    assert_eq!(sent[0].prompt, sent[1].prompt, "the same conversation makes the same prompt");
    let prompt = String::from_utf8(sent[0].prompt.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect()).unwrap_or_default();
    assert!(prompt.contains("18 C, sunny") && prompt.contains("Let me look."), "{prompt}");
}

#[tokio::test]
async fn a_worker_failing_mid_stream_ends_it_with_response_failed() {
    let (app, _, _) = router_over(&[Mode::DiesMidStream], RouterConfig::default()).await;
    let (status, text) = call(&app, "POST", "/v1/responses", json!({ "model": "fake", "input": "hi", "stream": true }), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let events = events(&text);
    let (last, v) = events.last().unwrap();
    assert_eq!(last, "response.failed", "{text}");
    assert_eq!(v["response"]["status"], "failed");
    assert_eq!(v["response"]["error"]["code"], "server_error");
    assert!(!v["response"]["error"]["message"].as_str().unwrap().is_empty());
    assert_eq!(v["response"]["output"][0]["content"][0]["text"], "He", "what was written stays in the failed response");
}

#[tokio::test]
async fn what_cannot_work_is_refused_naming_the_field() {
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let base = || json!({ "model": "fake", "input": "hi" });
    let with = |key: &str, value: Value| {
        let mut b = base();
        b[key] = value;
        b
    };
    let cases = [
        (with("previous_response_id", json!("resp_1")), "previous_response_id", "whole conversation"),
        (with("conversation", json!("conv_1")), "conversation", "keeps no responses"),
        (with("input", json!([])), "input", "at least one item"),
        (with("input", json!(7)), "input", "expected a string or an array"),
        (with("input", json!([{ "type": "reasoning", "summary": [] }])), "input[0].type", "reasoning items"),
        (with("input", json!([{ "type": "item_reference", "id": "msg_1" }])), "input[0].type", "send the item itself"),
        (with("input", json!([{ "type": "function_call_output", "call_id": "call_1", "output": "x" }])), "input[0].call_id", "no function_call item"),
        (with("input", json!([{ "type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops" }])), "input[0].arguments", "JSON"),
        (with("input", json!([{ "role": "user", "content": [{ "type": "output_text", "text": "x" }] }])), "input[0].content[0].type", "not allowed in user"),
        (with("input", json!([{ "role": "user", "content": [{ "type": "input_file", "file_id": "f" }] }])), "input[0].content[0].type", "not supported"),
        (with("input", json!([{ "role": "tool", "content": "x" }])), "input[0].role", "unknown role"),
        (with("tools", json!([{ "type": "web_search" }])), "tools[0].type", "only function and mcp tools"),
        (with("tools", json!([{ "type": "mcp", "server_label": "files" }])), "tools[0]", "this router has no MCP servers"),
        (with("tool_choice", json!("required")), "tool_choice", "needs `tools`"),
        (with("text", json!({ "format": { "type": "json_schema", "schema": {} } })), "text.format.name", "is required"),
        (with("text", json!({ "format": { "type": "xml" } })), "text.format.type", "unknown type"),
        (with("truncation", json!("middle")), "truncation", "unknown value"),
        (with("include", json!(["file_search_call.results"])), "include[0]", "not supported"),
        (with("reasoning", json!({ "effort": "high" })), "reasoning", "not supported"),
        (with("max_output_tokens", json!(1000)), "max_output_tokens", "out of range"),
        (with("top_logprobs", json!(21)), "top_logprobs", "out of range"),
        (with("metadata", json!({ "k": 1 })), "metadata.k", "expected a string"),
        (with("max_tokens", json!(5)), "max_tokens", "not a recognized field"),
    ];
    for (body, param, message) in cases {
        let (status, v) = post(&app, "/v1/responses", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{body} -> {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(message), "{body} -> {v}");
    }
    // A named function that is not among the tools.
    let named = json!({ "model": "fake", "input": "hi", "tools": [weather_tool()], "tool_choice": { "type": "function", "name": "nope" } });
    let (status, v) = post(&app, "/v1/responses", named).await;
    assert_eq!((status, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("tool_choice.name")), "{v}");
    // Calls and a JSON text format cannot both hold the output.
    let both = json!({ "model": "fake", "input": "hi", "tools": [weather_tool()], "tool_choice": "required", "text": { "format": { "type": "json_object" } } });
    assert_eq!(post(&app, "/v1/responses", both).await.0, StatusCode::BAD_REQUEST);
    assert!(records[0].requests.lock().unwrap().is_empty(), "nothing refused reached the worker");
    // Nothing is stored, so nothing can be fetched or deleted.
    for method in ["GET", "DELETE"] {
        let (status, text) = call(&app, method, "/v1/responses/resp_123", Value::Null, &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("resp_123"), "{v}");
    }
}

#[tokio::test]
async fn a_json_schema_text_format_becomes_the_constraint() {
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let format = json!({ "type": "json_schema", "name": "city", "schema": { "type": "object", "properties": { "name": { "type": "string" } } }, "strict": true });
    let (status, r) = post(&app, "/v1/responses", json!({ "model": "fake", "input": "hi", "text": { "format": format, "verbosity": "low" } })).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["text"]["format"], format);
    let sent = records[0].requests.lock().unwrap()[0].clone();
    let Some(kiln_proto::v1::constraint::Kind::JsonSchema(schema)) = sent.constraint.and_then(|c| c.kind) else { panic!("a JSON Schema constraint") };
    assert_eq!(serde_json::from_str::<Value>(&schema).unwrap(), format["schema"]);
}

#[tokio::test]
async fn truncation_auto_drops_the_oldest_exchanges_until_the_conversation_fits() {
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let old = "a".repeat(30);
    let input = json!([
        { "role": "user", "content": old },
        { "type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}" },
        { "type": "function_call_output", "call_id": "c1", "output": "b".repeat(20) },
        { "role": "assistant", "content": "c".repeat(20) },
        { "role": "user", "content": "hi" },
    ]);
    let body = json!({ "model": "fake", "instructions": "sys", "input": input, "max_output_tokens": 4, "tools": [weather_tool()], "tool_choice": "none" });
    let (status, v) = post(&app, "/v1/responses", body.clone()).await;
    assert_eq!((status, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("input")), "too long without truncation: {v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("context"), "{v}");
    let mut auto = body;
    auto["truncation"] = json!("auto");
    let (status, r) = post(&app, "/v1/responses", auto).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["truncation"], "auto");
    // The first exchange went whole (the call's output with its call); the instructions and
    // the last message stayed.
    let sent = records[0].requests.lock().unwrap()[0].clone();
    let prompt: String = sent.prompt.iter().filter(|&&t| t < 256).map(|&t| t as u8 as char).collect();
    assert!(prompt.contains("sys") && prompt.contains("hi"), "{prompt}");
    assert!(!prompt.contains(&old), "{prompt}");
    assert!(!prompt.contains("bbbb") && !prompt.contains("cccc"), "{prompt}");
    assert!(sent.prompt.len() + 4 <= fake::CONTEXT as usize);
    // Even the last exchange alone does not fit: refused with its size.
    let long = json!({ "model": "fake", "input": "x".repeat(80), "truncation": "auto" });
    let (status, v) = post(&app, "/v1/responses", long).await;
    assert_eq!((status, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("input")), "{v}");
}
