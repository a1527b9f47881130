//! The router's HTTP handlers against scripted workers: response and stream shapes of both
//! APIs, failover, error mapping, cancellation on disconnect, API keys and backpressure.

mod fake;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fake::{call, post, router_over, sse, Mode};
use kiln_router::upstream::WorkerPool;
use kiln_router::{api, AppState, RouterConfig};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use http_body_util::BodyExt;
use tower::ServiceExt;

fn chat_body() -> Value {
    json!({ "model": "fake", "messages": [{ "role": "user", "content": "hi" }] })
}

#[tokio::test]
async fn chat_completion_shape_and_usage() {
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let (status, body) = post(&app, "/v1/chat/completions", json!({ "model": "fake", "messages": [{ "role": "user", "content": "hi" }], "n": 2, "logprobs": true, "top_logprobs": 1, "seed": 9, "stop": "zz", "max_tokens": 20 })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"].as_array().unwrap().len(), 2);
    assert_eq!(body["choices"][1]["message"]["content"], fake::REPLY);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][0]["logprobs"]["content"].as_array().unwrap().len(), fake::REPLY.len());
    assert_eq!(body["usage"]["completion_tokens"], 2 * fake::REPLY.len());
    // The prompt is the ChatML rendering of the conversation.
    let sent = records[0].requests.lock().unwrap()[0].clone();
    assert_eq!(body["usage"]["prompt_tokens"], sent.prompt.len());
    assert_eq!((sent.n, sent.logprobs, sent.top_logprobs, sent.max_tokens), (2, true, 1, Some(20)));
    assert_eq!(sent.sampling.as_ref().unwrap().seed, Some(9));
    assert_eq!(sent.stop, vec!["zz".to_string()]);
}

#[tokio::test]
async fn chat_stream_chunks_end_with_usage_and_done() {
    let (app, _, _) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let mut body = chat_body();
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let (status, text) = call(&app, "POST", "/v1/chat/completions", body, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let (data, _) = sse(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect();
    assert_eq!(text, fake::REPLY);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], fake::REPLY.len());
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
}

#[tokio::test]
async fn anthropic_message_and_stream_events() {
    let (app, _, _) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let body = json!({ "model": "fake", "max_tokens": 20, "system": "be brief", "messages": [{ "role": "user", "content": [{ "type": "text", "text": "hi" }] }] });
    let (status, reply) = post(&app, "/v1/messages", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["type"], "message");
    assert_eq!(reply["content"][0]["text"], fake::REPLY);
    assert_eq!(reply["stop_reason"], "end_turn");
    assert_eq!(reply["usage"]["output_tokens"], fake::REPLY.len());
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, text) = call(&app, "POST", "/v1/messages", streamed, &[]).await;
    let (data, names) = sse(&text);
    let deltas = names.iter().filter(|n| *n == "content_block_delta").count();
    assert_eq!(deltas, fake::REPLY.len());
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(&names[names.len() - 3..], ["content_block_stop", "message_delta", "message_stop"]);
    let delta: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    // The cache hit is known from the first token, so message_start splits the prompt as the
    // final usage does.
    let start: Value = serde_json::from_str(&data[0]).unwrap();
    let prompt = reply["usage"]["input_tokens"].as_u64().unwrap() + fake::CACHED as u64;
    assert_eq!(reply["usage"]["cache_read_input_tokens"], fake::CACHED);
    for usage in [&start["message"]["usage"], &delta["usage"]] {
        assert_eq!(usage["input_tokens"].as_u64(), Some(prompt - fake::CACHED as u64), "{usage}");
        assert_eq!(usage["cache_read_input_tokens"], fake::CACHED, "{usage}");
    }
    let (_, count) = post(&app, "/v1/messages/count_tokens", json!({ "model": "fake", "messages": [{ "role": "user", "content": "hi" }] })).await;
    assert!(count["input_tokens"].as_u64().unwrap() > 2);
}

#[tokio::test]
async fn fails_over_to_a_worker_that_answers() {
    let (app, state, records) = router_over(&[Mode::Unavailable, Mode::Reply], RouterConfig::default()).await;
    for _ in 0..2 {
        let (status, body) = post(&app, "/v1/chat/completions", chat_body()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], fake::REPLY);
    }
    assert_eq!(records[0].requests.lock().unwrap().len(), 1, "the first worker was tried, then left out");
    assert!(!state.pool.workers()[0].is_healthy());
    let (_, metrics) = call(&app, "GET", "/metrics", Value::Null, &[]).await;
    let dead = &state.pool.workers()[0].addr;
    assert!(metrics.contains(&format!("kiln_router_upstream_errors_total{{worker=\"{dead}\"}} 1")), "{metrics}");
}

#[tokio::test]
async fn no_answering_worker_is_503_and_refusals_are_400() {
    let (app, _, _) = router_over(&[Mode::Unavailable], RouterConfig::default()).await;
    let (status, body) = post(&app, "/v1/chat/completions", chat_body()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("fake worker is down"));

    let (app, _, _) = router_over(&[Mode::Invalid], RouterConfig::default()).await;
    let (status, body) = post(&app, "/v1/chat/completions", chat_body()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["message"], "fake worker refuses: bad thing");
}

#[tokio::test]
async fn a_worker_dying_mid_stream_with_nowhere_to_resume_ends_the_stream_with_an_error() {
    let (app, _, _) = router_over(&[Mode::DiesMidStream], RouterConfig::default()).await;
    let mut body = chat_body();
    body["stream"] = json!(true);
    let (_, text) = call(&app, "POST", "/v1/chat/completions", body, &[]).await;
    let (data, _) = sse(&text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    let message = last["error"]["message"].as_str().unwrap();
    assert!(message.contains("fake worker crashed") && message.contains("could not be resumed"), "{text}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    let (status, body) = post(&app, "/v1/chat/completions", chat_body()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "the crashed worker is ejected: {body}");
}

#[tokio::test]
async fn a_request_refused_mid_stream_is_neither_resumed_nor_held_against_the_worker() {
    let (app, _, records) = router_over(&[Mode::RefusesMidStream, Mode::Reply], RouterConfig::default()).await;
    let mut body = chat_body();
    body["stream"] = json!(true);
    // Round robin sends one of two requests to each worker.
    let mut errors = vec![];
    for _ in 0..2 {
        let (_, text) = call(&app, "POST", "/v1/chat/completions", body.clone(), &[]).await;
        let (data, _) = sse(&text);
        if data.last().map(String::as_str) != Some("[DONE]") {
            let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
            errors.push(last["error"]["message"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("fake grammar") && !errors[0].contains("resumed"), "{errors:?}");
    assert!(records[1].requests.lock().unwrap().iter().all(|r| r.resume.is_none()), "a refused request is not resumed elsewhere");
    // Both workers stay in rotation: round robin reaches the refusing one again.
    for _ in 0..2 {
        post(&app, "/v1/chat/completions", chat_body()).await;
    }
    assert_eq!(records[0].requests.lock().unwrap().len(), 2, "the refusing worker was taken out of rotation");
}

#[tokio::test]
async fn a_worker_dying_mid_stream_is_resumed_on_another_with_the_tokens_sent() {
    {
        let (app, _, records) = router_over(&[Mode::DiesMidStream, Mode::Reply], RouterConfig::default()).await;
        let mut body = chat_body();
        body["stream"] = json!(true);
        body["seed"] = json!(5);
        for _ in 0..2 {
            let (_, text) = call(&app, "POST", "/v1/chat/completions", body.clone(), &[]).await;
            let (data, _) = sse(&text);
            assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
            let content: String = data
                .iter()
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
                .collect();
            assert_eq!(content, fake::REPLY, "one uninterrupted reply");
        }
        let died = records[0].requests.lock().unwrap().clone();
        assert_eq!(died.len(), 1, "the dying worker got one request and was then left out");
        let resumed: Vec<_> = records[1].requests.lock().unwrap().iter().filter_map(|r| r.resume.clone()).collect();
        assert_eq!(resumed.len(), 1);
        assert_eq!(resumed[0].tokens, vec![u32::from(b'H'), u32::from(b'e')]);
        assert_eq!(died[0].sampling.as_ref().and_then(|s| s.seed), Some(5), "the seed travels");
        let (_, metrics) = call(&app, "GET", "/metrics", Value::Null, &[]).await;
        assert!(metrics.contains("kiln_router_resumed_total{model=\"fake\"} 1"), "{metrics}");
    }
}

#[tokio::test]
async fn dropping_the_response_closes_the_worker_stream() {
    let (app, state, records) = router_over(&[Mode::Endless], RouterConfig::default()).await;
    let mut body = chat_body();
    body["stream"] = json!(true);
    let req = Request::post("/v1/chat/completions").header("content-type", "application/json").body(Body::from(body.to_string())).unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    let mut body = response.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    assert_eq!(state.pool.load().0, 1);
    drop(body);
    for _ in 0..100 {
        if records[0].closed_early.load(Ordering::SeqCst) == 1 && state.pool.load().0 == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker's stream was not closed after the client left");
}

#[tokio::test]
async fn api_key_guards_api_routes() {
    let config = RouterConfig { api_key: Some("k3y".into()), ..RouterConfig::default() };
    let (app, _, _) = router_over(&[Mode::Reply], config).await;
    let (status, body) = call(&app, "POST", "/v1/chat/completions", chat_body(), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = call(&app, "POST", "/v1/messages", json!({}), &[("x-api-key", "nope")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("authentication_error") && body.contains("\"type\":\"error\""));
    let (status, _) = call(&app, "POST", "/v1/chat/completions", chat_body(), &[("authorization", "Bearer k3y")]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&app, "GET", "/v1/models", Value::Null, &[("x-api-key", "k3y")]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&app, "GET", "/health", Value::Null, &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn requests_beyond_the_queue_get_429() {
    // The fake worker runs 2 sequences; with no queue the third request is refused.
    let config = RouterConfig { max_queue: 0, ..RouterConfig::default() };
    let (app, _, _) = router_over(&[Mode::Endless], config).await;
    let mut bodies = vec![];
    for _ in 0..2 {
        let mut b = chat_body();
        b["stream"] = json!(true);
        let req = Request::post("/v1/chat/completions").header("content-type", "application/json").body(Body::from(b.to_string())).unwrap();
        bodies.push(app.clone().oneshot(req).await.unwrap());
    }
    let (status, body) = post(&app, "/v1/chat/completions", chat_body()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    drop(bodies);
}

/// What a completion may generate when the request leaves `max_tokens` out: chat until the
/// context is full, legacy completions 16 tokens (OpenAI's default), and never past the
/// router's `--max-tokens`, which such a request must not escape; always within the context
/// the prompt leaves.
#[tokio::test]
async fn a_request_without_max_tokens_gets_the_default_budget_and_the_routers_cap() {
    let sent_budget = |records: &[Arc<fake::Record>], i: usize| records[0].requests.lock().unwrap()[i].max_tokens;
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    assert_eq!(post(&app, "/v1/chat/completions", chat_body()).await.0, StatusCode::OK);
    assert_eq!(sent_budget(&records, 0), None, "chat without a cap runs until the context is full");
    let (status, body) = post(&app, "/v1/completions", json!({ "model": "fake", "prompt": "hi" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(sent_budget(&records, 1), Some(16));
    // A prompt that leaves fewer than 16 tokens of the context gets what is left.
    let (status, body) = post(&app, "/v1/completions", json!({ "model": "fake", "prompt": "x".repeat(fake::CONTEXT as usize - 5) })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(sent_budget(&records, 2), Some(5));
    let (status, _) = post(&app, "/v1/completions", json!({ "model": "fake", "prompt": "hi", "max_tokens": 40 })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sent_budget(&records, 3), Some(40), "an explicit budget is kept");

    let mut config = RouterConfig::default();
    config.limits.max_tokens = Some(8);
    let (app, _, records) = router_over(&[Mode::Reply], config).await;
    assert_eq!(post(&app, "/v1/chat/completions", chat_body()).await.0, StatusCode::OK);
    assert_eq!(sent_budget(&records, 0), Some(8), "the cap bounds a chat that names no budget");
    assert_eq!(post(&app, "/v1/completions", json!({ "model": "fake", "prompt": "hi" })).await.0, StatusCode::OK);
    assert_eq!(sent_budget(&records, 1), Some(8));
    let (status, body) = post(&app, "/v1/chat/completions", json!({ "model": "fake", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 9 })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("more than this server allows (8)"), "{body}");
}

#[tokio::test]
async fn prompt_longer_than_the_context_reports_counts() {
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let (status, body) = post(&app, "/v1/completions", json!({ "model": "fake", "prompt": "x".repeat(100) })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("100 tokens") && msg.contains(&format!("{} tokens", fake::CONTEXT)), "{msg}");
    let (status, body) = post(&app, "/v1/completions", json!({ "model": "fake", "prompt": "x".repeat(40), "max_tokens": 30 })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("40 in the prompt, 30 for the completion"));
    assert!(records[0].requests.lock().unwrap().is_empty(), "nothing reaches the worker");
}

#[tokio::test]
async fn a_stalled_worker_is_left_and_the_generation_resumed_elsewhere() {
    let mut config = RouterConfig::default();
    config.timeouts.stall = Duration::from_millis(300);
    let (app, state, records) = router_over(&[Mode::StallsMidStream, Mode::Reply], config).await;
    for _ in 0..2 {
        let (status, body) = post(&app, "/v1/chat/completions", chat_body()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], fake::REPLY);
    }
    assert_eq!(records[0].requests.lock().unwrap().len(), 1);
    assert_eq!(records[0].closed_early.load(Ordering::SeqCst), 1, "the stalled stream is closed, cancelling it there");
    assert!(!state.pool.workers()[0].is_healthy(), "the stalled worker is ejected");
    let (_, metrics) = call(&app, "GET", "/metrics", Value::Null, &[]).await;
    let stalled = &state.pool.workers()[0].id;
    assert!(metrics.contains(&format!("kiln_router_stalled_total{{worker=\"{stalled}\"}} 1")), "{metrics}");
}

#[tokio::test]
async fn model_names_no_worker_serves_share_one_metrics_label() {
    let (app, _, _) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    for i in 0..50 {
        let (status, _) = post(&app, "/v1/chat/completions", json!({ "model": format!("invented-{i}"), "messages": [{ "role": "user", "content": "hi" }] })).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    assert_eq!(post(&app, "/v1/chat/completions", chat_body()).await.0, StatusCode::OK);
    let (_, metrics) = call(&app, "GET", "/metrics", json!(null), &[]).await;
    assert!(!metrics.contains("invented-"), "{metrics}");
    assert_eq!(metrics.lines().filter(|l| l.starts_with("kiln_router_requests_total") && l.ends_with(r#"status="404"} 50"#)).count(), 1, "{metrics}");
    assert!(metrics.contains(r#"model="fake",status="200"} 1"#), "{metrics}");
}

/// A completions body scoring "abc" (one token per byte with the fake's tokenizer).
fn scoring_body(stream: bool) -> Value {
    json!({ "model": "fake", "prompt": "abc", "max_tokens": 11, "logprobs": 1, "echo": true, "stream": stream })
}

/// Checks `logprobs` of a choice that echoed "abc" and then generated REPLY.
fn check_echoed_logprobs(lp: &Value) {
    let prompt_len = 3;
    let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let expected: Vec<String> = "abc".chars().chain(fake::REPLY.chars()).map(String::from).collect();
    assert_eq!(tokens, expected, "prompt tokens, then the generated ones");
    let values = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(values[0], Value::Null, "the first prompt token has no log-probability");
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    for pos in 1..prompt_len {
        assert_eq!(values[pos].as_f64().unwrap() as f32, fake::prompt_logprob(pos), "position {pos}");
        let top = lp["top_logprobs"][pos].as_object().unwrap();
        let name = &expected[pos];
        assert_eq!(top.get(name.as_str()).and_then(Value::as_f64).map(|v| v as f32), Some(fake::prompt_logprob(pos)), "{top:?}");
    }
    assert!(values[prompt_len..].iter().all(|v| v.as_f64() == Some(-0.5)), "generated tokens keep theirs: {values:?}");
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert_eq!(offsets, (0..expected.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn echo_with_logprobs_scores_the_prompt() {
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let (status, v) = post(&app, "/v1/completions", scoring_body(false)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], format!("abc{}", fake::REPLY));
    check_echoed_logprobs(&v["choices"][0]["logprobs"]);
    assert_eq!(records[0].requests.lock().unwrap()[0].prompt_logprobs, Some(1));

    // Streamed: the echo chunk carries the prompt's log-probabilities.
    let (status, text) = call(&app, "POST", "/v1/completions", scoring_body(true), &[]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (data, _) = sse(&text);
    let chunks: Vec<Value> = data.iter().filter_map(|d| serde_json::from_str(d).ok()).collect();
    let mut joined = json!({ "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [] });
    for c in &chunks {
        let lp = &c["choices"][0]["logprobs"];
        if lp.is_object() {
            for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                joined[key].as_array_mut().unwrap().extend(lp[key].as_array().unwrap().iter().cloned());
            }
        }
    }
    check_echoed_logprobs(&joined);

    // Neither echo alone nor logprobs alone asks the worker to score the prompt.
    for body in [json!({ "model": "fake", "prompt": "abc", "echo": true }), json!({ "model": "fake", "prompt": "abc", "logprobs": 1 })] {
        let (status, v) = post(&app, "/v1/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let requests = records[0].requests.lock().unwrap().clone();
    assert_eq!(requests.iter().map(|r| r.prompt_logprobs).collect::<Vec<_>>(), [Some(1), Some(1), None, None]);
}

#[tokio::test]
async fn a_scored_prompt_is_not_scored_again_when_its_generation_resumes() {
    let (app, _, records) = router_over(&[Mode::DiesMidStream, Mode::Reply], RouterConfig::default()).await;
    let mut body = scoring_body(false);
    body["seed"] = json!(3);
    // Round robin sends one of the two requests to the dying worker first.
    for _ in 0..2 {
        let (status, v) = post(&app, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["choices"][0]["text"], format!("abc{}", fake::REPLY));
        check_echoed_logprobs(&v["choices"][0]["logprobs"]);
    }
    assert_eq!(records[0].requests.lock().unwrap().len(), 1);
    let resumed: Vec<_> = records[1].requests.lock().unwrap().iter().filter(|r| r.resume.is_some()).cloned().collect();
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].prompt_logprobs, None, "the first worker had already sent the prompt's");
}

#[tokio::test]
async fn tokenizer_info_names_the_special_tokens_and_template() {
    let (app, _, _) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let (status, text) = call(&app, "GET", "/tokenizer_info", Value::Null, &[]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["eos_token"], "<|im_end|>");
    assert_eq!(v["bos_token"], Value::Null);
    assert_eq!(v["model_max_length"], fake::CONTEXT);
    assert_eq!(v["chat_template"], kiln_shared::chat::builtin_template("llama"));
    let (status, text) = call(&app, "GET", "/tokenizer_info?model=nope", Value::Null, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
}

#[tokio::test]
async fn several_prompts_in_one_completions_request() {
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let prompts = json!(["abc", [104, 105], "hello there"]);
    let lens = [3u64, 2, 11];
    let body = json!({ "model": "fake", "prompt": prompts, "n": 2, "max_tokens": 20, "echo": true });
    let (status, v) = post(&app, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    let echoed = ["abc", "hi", "hello there"];
    assert_eq!(choices.len(), 6);
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["index"], i);
        assert_eq!(ch["text"], format!("{}{}", echoed[i / 2], fake::REPLY), "choice {i}: prompt {}'s", i / 2);
    }
    assert_eq!(v["usage"]["prompt_tokens"], lens.iter().sum::<u64>(), "each prompt counted once");
    assert_eq!(v["usage"]["completion_tokens"], 6 * fake::REPLY.len());
    let sent: Vec<Vec<u32>> = records[0].requests.lock().unwrap().iter().map(|r| r.prompt.clone()).collect();
    assert_eq!(sent.len(), 3);
    for p in [b"abc".to_vec(), b"hi".to_vec(), b"hello there".to_vec()] {
        assert!(sent.contains(&p.iter().map(|&b| u32::from(b)).collect()), "{sent:?}");
    }

    // Streamed: the same choices, interleaved, then the usage of all of them.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let (status, text) = call(&app, "POST", "/v1/completions", streamed, &[]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (data, _) = sse(&text);
    let mut texts = vec![String::new(); 6];
    let mut usage = Value::Null;
    for chunk in data.iter().filter_map(|d| serde_json::from_str::<Value>(d).ok()) {
        for ch in chunk["choices"].as_array().unwrap() {
            texts[ch["index"].as_u64().unwrap() as usize].push_str(ch["text"].as_str().unwrap());
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(t, &format!("{}{}", echoed[i / 2], fake::REPLY), "streamed choice {i}");
    }
    assert_eq!(usage["prompt_tokens"], lens.iter().sum::<u64>());
    assert_eq!(usage["completion_tokens"], 6 * fake::REPLY.len());
}

#[tokio::test]
async fn malformed_prompt_lists_are_400_naming_the_prompt() {
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let long = "x".repeat(fake::CONTEXT as usize + 5);
    let cases = [
        (json!([]), "prompt"),
        (json!([1, "a"]), "prompt[0]"),
        (json!(["ok", {"text": "no"}]), "prompt[1]"),
        (json!(["ok", [1, 999]]), "prompt[1][1]"),
        (json!(["ok", long]), "prompt[1]"),
        (json!(vec!["a"; 257]), "prompt"),
    ];
    for (prompt, field) in cases {
        let (status, v) = post(&app, "/v1/completions", json!({ "model": "fake", "prompt": prompt })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
    // Bounds on what one request may make the router hold.
    let (status, v) = post(&app, "/v1/completions", json!({ "model": "fake", "prompt": vec!["a"; 20], "n": 13 })).await;
    assert_eq!((status, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("n")), "{v}");
    let scored = vec![vec![1; 60]; 256];
    let (status, v) = post(&app, "/v1/completions", json!({ "model": "fake", "prompt": scored, "echo": true, "logprobs": 20, "max_tokens": 1 })).await;
    assert_eq!((status, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("prompt")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("322560 log-probabilities"), "{v}");
    assert!(records[0].requests.lock().unwrap().is_empty(), "nothing reached the worker");
}

#[tokio::test]
async fn a_request_without_model_goes_to_the_only_model_served() {
    let (app, _, _) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let (status, v) = post(&app, "/v1/completions", json!({ "prompt": "abc", "max_tokens": 4 })).await;
    assert_eq!((status, v["model"].as_str()), (StatusCode::OK, Some("fake")), "{v}");
    let (status, v) = post(&app, "/v1/chat/completions", json!({ "messages": [{ "role": "user", "content": "hi" }] })).await;
    assert_eq!((status, v["model"].as_str()), (StatusCode::OK, Some("fake")), "{v}");

    // With two models the request must say which.
    let (a, _) = fake::spawn_serving(Mode::Reply, "first").await;
    let (b, _) = fake::spawn_serving(Mode::Reply, "second").await;
    let pool = WorkerPool::new(&[a, b]).unwrap();
    pool.refresh_all().await;
    let app = api::router(Arc::new(AppState::new(pool, RouterConfig::default())));
    let (status, v) = post(&app, "/v1/completions", json!({ "prompt": "abc" })).await;
    assert_eq!((status, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("model")), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("first") && message.contains("second"), "{message}");
}

#[tokio::test]
async fn max_tokens_zero_with_echo_scores_the_prompt_alone() {
    let (app, _, records) = router_over(&[Mode::Reply], RouterConfig::default()).await;
    let body = json!({ "model": "fake", "prompt": "abc", "max_tokens": 0, "echo": true, "logprobs": 1 });
    let (status, v) = post(&app, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let choice = &v["choices"][0];
    assert_eq!((choice["text"].as_str(), choice["finish_reason"].as_str()), (Some("abc"), Some("length")), "{v}");
    assert_eq!(choice["logprobs"]["tokens"], json!(["a", "b", "c"]));
    assert_eq!(choice["logprobs"]["token_logprobs"][2].as_f64().map(|x| x as f32), Some(fake::prompt_logprob(2)));
    assert_eq!((v["usage"]["prompt_tokens"].as_u64(), v["usage"]["completion_tokens"].as_u64()), (Some(3), Some(0)));
    assert_eq!(records[0].requests.lock().unwrap()[0].max_tokens, Some(1), "the worker samples one token, which is dropped");

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, text) = call(&app, "POST", "/v1/completions", streamed, &[]).await;
    let (data, _) = sse(&text);
    let chunks: Vec<Value> = data.iter().filter_map(|d| serde_json::from_str(d).ok()).collect();
    let joined: String = chunks.iter().flat_map(|c| c["choices"].as_array().unwrap().iter().map(|ch| ch["text"].as_str().unwrap().to_string())).collect();
    assert_eq!(joined, "abc");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "length"), "{text}");

    // Without echo there is nothing to return: still a 400.
    let (status, v) = post(&app, "/v1/completions", json!({ "model": "fake", "prompt": "abc", "max_tokens": 0 })).await;
    assert_eq!((status, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("max_tokens")), "{v}");
}

#[tokio::test]
async fn a_worker_that_does_not_score_the_prompt_is_an_error_not_nulls() {
    // The endless fake streams tokens and never reports prompt log-probabilities, as a worker
    // of a kiln before them would.
    let (app, _, records) = router_over(&[Mode::Endless], RouterConfig::default()).await;
    let (status, v) = post(&app, "/v1/completions", scoring_body(false)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("did not report the prompt's log-probabilities"), "{v}");
    for _ in 0..100 {
        if records[0].closed_early.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the worker's stream was not closed");
}
