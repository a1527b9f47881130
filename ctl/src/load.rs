//! `kilnctl load`: concurrent streaming chat requests against a router (or any
//! OpenAI-compatible server), or straight to a worker over gRPC to measure what the router
//! adds. Reports time to first token, inter-token gaps and aggregate generated tokens/s.

use crate::http::Client;
use anyhow::{bail, Context, Result};
use kiln_proto::v1 as pb;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct LoadArgs {
    /// Requests in flight at once
    #[arg(short, long, default_value_t = 16)]
    concurrency: usize,
    /// Requests in all (default: the concurrency)
    #[arg(short = 'n', long)]
    requests: Option<usize>,
    /// Tokens generated per request (end-of-sequence is ignored so every request runs this long)
    #[arg(long, default_value_t = 96)]
    max_tokens: u32,
    /// Model name sent with HTTP requests (default: the only one served)
    #[arg(short, long)]
    model: Option<String>,
    /// Send to this worker's gRPC address instead of through the router
    #[arg(long)]
    grpc: Option<String>,
    /// Shared-system-prompt workload: each request opens with one of this many long system
    /// prompts (scattered over the requests), as many users of a few applications do
    #[arg(long)]
    shared_system_prompts: Option<usize>,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

const RULES: &[&str] = &[
    "Answer in plain language and keep each sentence short.",
    "When a question is ambiguous, say which reading you chose.",
    "Prefer concrete examples over abstract definitions.",
    "Never invent citations, names or numbers.",
    "If a calculation is involved, show the steps.",
    "Use metric units unless the user uses others.",
    "Keep lists to at most five items.",
    "Finish with one sentence that sums up the answer.",
];

/// Which of `k` applications request `i` belongs to: scattered, so that no fixed rotation of
/// workers lines up with the applications by accident.
fn application(i: usize, k: usize) -> usize {
    let mut x = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((x ^ (x >> 31)) % k.max(1) as u64) as usize
}

/// A system prompt of some 300 tokens for application `k`, unique to this run so that caches
/// warmed by an earlier run do not flatter this one.
fn system_prompt(run: u64, k: usize) -> String {
    let mut s = format!("You are assistant {k} of deployment {run:x}, serving the customers of application number {k}. ");
    for round in 0..5 {
        for (j, rule) in RULES.iter().enumerate() {
            s.push_str(&format!("Rule {}.{}: {rule} ", round + 1, (j + k) % RULES.len() + 1));
        }
    }
    s
}

const TOPICS: &[&str] = &[
    "the water cycle", "volcanoes", "the history of bread", "how bees communicate", "black holes", "the printing press",
    "coral reefs", "the Roman roads", "photosynthesis", "glaciers", "the first computers", "migratory birds",
    "tea ceremonies", "lighthouses", "the Silk Road", "octopuses",
];

/// A different question per request and per run, so no two share more than the template's
/// prefix and an earlier run's cached prompts do not flatter the next.
fn question(run: u64, i: usize) -> String {
    format!("Request {run:x}-{i}: write a short, detailed paragraph about {}.", TOPICS[i % TOPICS.len()])
}

fn run_id() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

#[derive(Default)]
struct Sample {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
}

struct Outcome {
    samples: Vec<Sample>,
    errors: Vec<String>,
    wall: Duration,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn http_request(client: &Client, model: &str, run: u64, i: usize, max_tokens: u32, shared: Option<usize>) -> Result<Sample> {
    let mut messages = vec![json!({ "role": "user", "content": question(run, i) })];
    if let Some(k) = shared {
        messages.insert(0, json!({ "role": "system", "content": system_prompt(run, application(i, k)) }));
    }
    let body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let start = Instant::now();
    let mut events = client.post_stream("/v1/chat/completions", &body).await?;
    let mut sample = Sample::default();
    let (mut last, mut chunks, mut usage) = (None::<Instant>, 0usize, None);
    while let Some(data) = events.next().await? {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).with_context(|| format!("not JSON: {data}"))?;
        if let Some(msg) = v["error"]["message"].as_str() {
            bail!("{msg}");
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            usage = Some(n as usize);
        }
        if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
            let now = Instant::now();
            match last {
                None => sample.ttft = now - start,
                Some(prev) => sample.gaps.push(now - prev),
            }
            last = Some(now);
            chunks += 1;
        }
    }
    sample.tokens = usage.unwrap_or(chunks);
    Ok(sample)
}

struct GrpcTarget {
    client: pb::worker_client::WorkerClient<tonic::transport::Channel>,
    tokenizer: kiln_shared::tokenizer::Tokenizer,
    template: kiln_shared::chat::ChatTemplate,
}

async fn grpc_target(addr: &str) -> Result<GrpcTarget> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let mut client = pb::worker_client::WorkerClient::connect(url).await.with_context(|| format!("cannot reach the worker at {addr}"))?;
    client = client.max_decoding_message_size(256 << 20);
    let info = client.model_info(pb::ModelInfoRequest {}).await?.into_inner();
    let tokenizer = kiln_shared::tokenizer::Tokenizer::new(serde_json::from_slice(&info.tokenizer_json)?)?;
    let template = kiln_shared::chat::ChatTemplate::or_refusing(&info.chat_template, &info.bos_token, &info.eos_token);
    Ok(GrpcTarget { client, tokenizer, template })
}

async fn grpc_request(target: &GrpcTarget, run: u64, i: usize, max_tokens: u32) -> Result<Sample> {
    let start = Instant::now();
    let messages = [kiln_shared::chat::ChatMessage::new("user", question(run, i))];
    let prompt = kiln_shared::chat::encode_rendered(&target.tokenizer, &target.template.render(&messages, true)?);
    let request = pb::GenerateRequest {
        prompt,
        sampling: Some(pb::SamplingParams { temperature: 0.0, top_p: 1.0, repeat_penalty: 1.0, repeat_last_n: 64, ..Default::default() }),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        n: 1,
        ..Default::default()
    };
    let mut stream = target.client.clone().generate(request).await?.into_inner();
    let mut sample = Sample::default();
    let mut last = None::<Instant>;
    while let Some(e) = stream.message().await? {
        match e.event {
            Some(pb::generate_event::Event::Token(t)) if !t.text.is_empty() => {
                let now = Instant::now();
                match last {
                    None => sample.ttft = now - start,
                    Some(prev) => sample.gaps.push(now - prev),
                }
                last = Some(now);
                sample.tokens += 1;
            }
            Some(pb::generate_event::Event::Token(_)) => sample.tokens += 1,
            Some(pb::generate_event::Event::Done(_)) => break,
            Some(pb::generate_event::Event::PromptLogprobs(_)) | None => {}
        }
    }
    Ok(sample)
}

async fn model_name(client: &Client, asked: Option<String>) -> Result<String> {
    if let Some(m) = asked {
        return Ok(m);
    }
    let models = client.get_json("/v1/models").await?;
    models["data"][0]["id"].as_str().map(str::to_string).context("the server lists no model; pass --model")
}

pub async fn run(client: Client, args: LoadArgs) -> Result<()> {
    if args.shared_system_prompts.is_some() && args.grpc.is_some() {
        bail!("--shared-system-prompts goes through the router; it cannot be combined with --grpc");
    }
    let total = args.requests.unwrap_or(args.concurrency);
    let next = Arc::new(AtomicUsize::new(0));
    let grpc = match &args.grpc {
        Some(addr) => Some(Arc::new(grpc_target(addr).await?)),
        None => None,
    };
    let model = if grpc.is_some() { String::new() } else { model_name(&client, args.model.clone()).await? };
    let client = Arc::new(client);
    let run = run_id();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(total) {
        let (next, grpc, client, model, max_tokens) = (Arc::clone(&next), grpc.clone(), Arc::clone(&client), model.clone(), args.max_tokens);
        let shared = args.shared_system_prompts;
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return results;
                }
                let r = match &grpc {
                    Some(target) => grpc_request(target, run, i, max_tokens).await,
                    None => http_request(&client, &model, run, i, max_tokens, shared).await,
                };
                results.push(r.map_err(|e| format!("{e:#}")));
            }
        }));
    }
    let mut outcome = Outcome { samples: Vec::new(), errors: Vec::new(), wall: Duration::ZERO };
    for t in tasks {
        for r in t.await? {
            match r {
                Ok(s) => outcome.samples.push(s),
                Err(e) => outcome.errors.push(e),
            }
        }
    }
    outcome.wall = start.elapsed();
    report(&args, total, &outcome);
    Ok(())
}

fn report(args: &LoadArgs, total: usize, o: &Outcome) {
    let mut ttft: Vec<f64> = o.samples.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect();
    ttft.sort_by(f64::total_cmp);
    let mut gaps: Vec<f64> = o.samples.iter().flat_map(|s| s.gaps.iter().map(|g| g.as_secs_f64() * 1e3)).collect();
    gaps.sort_by(f64::total_cmp);
    let tokens: usize = o.samples.iter().map(|s| s.tokens).sum();
    let secs = o.wall.as_secs_f64();
    let summary = json!({
        "target": if args.grpc.is_some() { "grpc" } else { "http" },
        "concurrency": args.concurrency,
        "requests": total,
        "errors": o.errors.len(),
        "max_tokens": args.max_tokens,
        "shared_system_prompts": args.shared_system_prompts,
        "generated_tokens": tokens,
        "wall_s": secs,
        "generated_tokens_per_s": tokens as f64 / secs,
        "ttft_ms_p50": percentile(&ttft, 50.0),
        "ttft_ms_p99": percentile(&ttft, 99.0),
        "inter_token_ms_p50": percentile(&gaps, 50.0),
        "inter_token_ms_p99": percentile(&gaps, 99.0),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} requests ({} at once, {} tokens each): {} errors, {tokens} tokens in {secs:.2} s = {:.1} tokens/s; \
             TTFT p50 {:.0} ms p99 {:.0} ms; inter-token p50 {:.1} ms p99 {:.1} ms",
            total,
            args.concurrency,
            args.max_tokens,
            o.errors.len(),
            tokens as f64 / secs,
            percentile(&ttft, 50.0),
            percentile(&ttft, 99.0),
            percentile(&gaps, 50.0),
            percentile(&gaps, 99.0)
        );
    }
    for e in o.errors.iter().take(5) {
        eprintln!("error: {e}");
    }
}
