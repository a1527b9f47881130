//! `kiln-worker eval`: a model's answers to fixed token sequences as JSON, on any device, for
//! comparing devices and implementations (scripts/gpu-check.sh compares a GPU worker with
//! transformers and with kiln's CPU kernels this way).
//!
//! The input file holds `{"score": [[ids...], ...], "greedy": [[ids...], ...], "max_tokens": N}`.
//! The output holds, for each `score` sequence, the five highest logits at every position
//! (teacher-forced), and for the `greedy` prompts the greedy continuations computed four ways
//! through the batching engine: one request at a time, all at once, all at once again (their
//! prompts now in the prefix cache), and all at once in a cache too small for them together
//! (preemption); and how far the engine's prompt log-probabilities for the `score` sequences
//! (every row's logits through batched steps) lie from their teacher-forced logits.

use anyhow::{bail, Context};
use kiln_shared::sampling::SamplingParams;
use kiln_worker::engine::{Engine, EngineConfig, EngineHandle, Event, GenerationRequest, RequestStream, Session};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(short, long)]
    pub model: String,
    /// The sequences, as JSON (see above)
    #[arg(long, value_name = "FILE")]
    pub input: std::path::PathBuf,
    #[command(flatten)]
    pub engine: super::EngineArgs,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(default)]
    score: Vec<Vec<u32>>,
    #[serde(default)]
    greedy: Vec<Vec<u32>>,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
}

fn default_max_tokens() -> usize {
    32
}

#[derive(Serialize)]
struct Scored {
    /// Per position: the five best token ids, best first, and their logits.
    top_ids: Vec<[u32; 5]>,
    top_logits: Vec<[f32; 5]>,
}

#[derive(Serialize)]
struct Output {
    device: String,
    score: Vec<Scored>,
    greedy_alone: Vec<Vec<u32>>,
    greedy_batched: Vec<Vec<u32>>,
    greedy_cached: Vec<Vec<u32>>,
    greedy_preempted: Vec<Vec<u32>>,
    prefix_hit_tokens: u64,
    preemptions: u64,
    /// Largest |engine prompt log-probability − teacher-forced one| over the `score` sequences.
    prompt_logprob_gap: f32,
}

fn top5(row: &[f32]) -> ([u32; 5], [f32; 5]) {
    let mut best: Vec<u32> = (0..row.len() as u32).collect();
    let k = 5.min(best.len());
    best.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    best.truncate(k);
    best.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    let (mut ids, mut logits) = ([0u32; 5], [f32::NEG_INFINITY; 5]);
    for (i, &t) in best.iter().enumerate() {
        ids[i] = t;
        logits[i] = row[t as usize];
    }
    (ids, logits)
}

fn collect(stream: RequestStream) -> anyhow::Result<Vec<u32>> {
    let mut tokens = Vec::new();
    for e in stream {
        match e {
            Event::Token { id, .. } => tokens.push(id),
            Event::Done { .. } => return Ok(tokens),
            Event::Failed(msg) => bail!("a request failed: {msg}"),
            Event::PromptLogprobs { .. } => {}
        }
    }
    bail!("a request's stream ended without finishing")
}

/// The prompt log-probabilities a scoring request's stream carries.
fn prompt_logprobs(stream: RequestStream) -> anyhow::Result<Vec<f32>> {
    let mut out = Vec::new();
    for e in stream {
        match e {
            Event::PromptLogprobs { tokens, .. } => out.extend(tokens.iter().map(|t| t.logprob)),
            Event::Done { .. } => return Ok(out),
            Event::Failed(msg) => bail!("a scoring request failed: {msg}"),
            Event::Token { .. } => {}
        }
    }
    bail!("a scoring request's stream ended without finishing")
}

fn all_at_once(h: &EngineHandle, prompts: &[Vec<u32>], max_tokens: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let streams = prompts.iter().map(|p| h.submit(greedy(p, max_tokens))).collect::<Result<Vec<_>, _>>()?;
    streams.into_iter().map(collect).collect()
}

fn greedy(prompt: &[u32], max_tokens: usize) -> GenerationRequest {
    GenerationRequest { prompt: prompt.to_vec(), sampling: SamplingParams::greedy(), max_tokens: Some(max_tokens), ignore_eos: true, ..Default::default() }
}

pub fn main(args: EvalArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let input: Input = serde_json::from_str(&text).with_context(|| format!("{}: expected {{\"score\": [[ids]], \"greedy\": [[ids]], \"max_tokens\": N}}", args.input.display()))?;
    if input.score.is_empty() && input.greedy.is_empty() {
        bail!("{}: no sequences to score and no prompts to continue", args.input.display());
    }
    let model = super::load_model(&args.model, true, args.engine.isq, None, None, &args.engine.device)?;
    let compute = super::compute(args.threads);
    let vocab = model.model.config().vocab_size;
    let mut score = Vec::with_capacity(input.score.len());
    // Each sequence's teacher-forced log-probability of every token after the first.
    let mut forced = Vec::with_capacity(input.score.len());
    for tokens in &input.score {
        if tokens.is_empty() {
            bail!("an empty sequence to score");
        }
        let logits = Session::new(Arc::clone(&model), Arc::clone(&compute), tokens.len() + 1)?.score(tokens)?;
        let (top_ids, top_logits) = logits.chunks(vocab).map(top5).unzip();
        score.push(Scored { top_ids, top_logits });
        forced.push(logits.chunks(vocab).zip(&tokens[1..]).map(|(row, &next)| kiln_worker::sampler::select::log_prob(row, next)).collect::<Vec<f32>>());
    }
    let longest = input.greedy.iter().map(Vec::len).max().unwrap_or(0) + input.max_tokens + 1;
    let cfg = EngineConfig { max_context_len: Some(longest.max(16)), ..args.engine.config(16, None) };
    let h = Engine::start(Arc::clone(&model), Arc::clone(&compute), cfg.clone())?;
    let greedy_alone = input.greedy.iter().map(|p| collect(h.submit(greedy(p, input.max_tokens))?)).collect::<anyhow::Result<Vec<_>>>()?;
    let greedy_batched = all_at_once(&h, &input.greedy, input.max_tokens)?;
    let greedy_cached = all_at_once(&h, &input.greedy, input.max_tokens)?;
    let prefix_hit_tokens = h.stats().scheduler.prefix_hit_tokens;
    let mut prompt_logprob_gap = 0f32;
    let longest_scored = input.score.iter().map(Vec::len).max().unwrap_or(0);
    if longest_scored >= 2 {
        // The sequences scored through the engine, all at once.
        let scoring = EngineConfig { max_context_len: Some(longest_scored + 2), ..cfg.clone() };
        let hs = Engine::start(Arc::clone(&model), Arc::clone(&compute), scoring)?;
        let streams = input.score.iter().filter(|t| t.len() >= 2).map(|t| hs.submit(GenerationRequest { prompt_logprobs: Some(0), ..greedy(t, 1) })).collect::<Result<Vec<_>, _>>()?;
        for (stream, want) in streams.into_iter().zip(forced.iter().filter(|f| !f.is_empty())) {
            let got = prompt_logprobs(stream)?;
            if got.len() != want.len() {
                bail!("the engine scored {} prompt tokens of {}", got.len(), want.len());
            }
            prompt_logprob_gap = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(prompt_logprob_gap, f32::max);
        }
    }
    drop(h);
    // Room for about two of the sequences at a time, so the rest wait or are preempted.
    let blocks_per_seq = longest.div_ceil(cfg.block_size) + 1;
    let block_bytes: usize = kiln_worker::kv_cache::KvCache::block_bytes(model.model.config(), cfg.block_size).iter().sum();
    let tight = EngineConfig { kv_cache_bytes: Some(2 * blocks_per_seq * block_bytes + block_bytes), ..cfg };
    let h = Engine::start(Arc::clone(&model), compute, tight)?;
    let greedy_preempted = all_at_once(&h, &input.greedy, input.max_tokens)?;
    let preemptions = h.stats().scheduler.preemptions;
    let out = Output { device: model.model.device(), score, greedy_alone, greedy_batched, greedy_cached, greedy_preempted, prefix_hit_tokens, preemptions, prompt_logprob_gap };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
