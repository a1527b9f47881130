//! `kiln-worker bench --concurrency 1,4,16`: N requests at once through the batching engine,
//! measured like llama-batched-bench: prompt processing speed until every request has its
//! first token, then aggregate decode speed, plus the mean time to first token.

use super::bench::{mean_sd, BenchArgs};
use kiln_shared::sampling::SamplingParams;
use kiln_worker::constraint::{Constraint, GrammarSpec, Grammars};
use kiln_worker::engine::{Engine, Event, GenerationRequest};
use kiln_worker::sampler::Rng;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

#[derive(Serialize)]
struct ParallelResult {
    model_filename: String,
    n_threads: usize,
    n_prompt: usize,
    n_gen: usize,
    n_parallel: usize,
    /// Aggregate decode tokens/s over all sequences.
    avg_ts: f64,
    stddev_ts: f64,
    /// Prompt tokens/s until every sequence had its first token.
    pp_avg_ts: f64,
    /// Mean time from submission to first token.
    ttft_ms: f64,
    samples_ts: Vec<f64>,
    /// Requests held to --json-schema.
    n_constrained: usize,
    /// Time to compute one grammar mask, from the constrained outputs replayed (µs).
    mask_p50_us: Option<f64>,
    mask_p99_us: Option<f64>,
}

struct Sample {
    decode_ts: f64,
    pp_ts: f64,
    ttft_ms: f64,
    /// Tokens of each constrained output, for timing its masks afterwards.
    constrained_outputs: Vec<Vec<u32>>,
}

/// The requests the first `constrained.1` of which carry the constraint.
type Constrained<'a> = Option<(&'a Arc<Constraint>, usize)>;

fn run_once(engine: &kiln_worker::engine::EngineHandle, n: usize, n_prompt: usize, n_gen: usize, vocab: u64, rng: &mut Rng, constrained: Constrained) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..n {
        // Distinct random prompts: no prefix is shared.
        let prompt: Vec<u32> = (0..n_prompt).map(|_| (rng.next_u64() % vocab) as u32).collect();
        let constraint = constrained.filter(|&(_, k)| i < k).map(|(c, _)| Arc::clone(c));
        let req = GenerationRequest { prompt, sampling: SamplingParams::greedy(), max_tokens: Some(n_gen), ignore_eos: true, constraint, ..Default::default() };
        let stream = engine.submit(req)?;
        handles.push(std::thread::spawn(move || -> Result<(Vec<Instant>, Vec<u32>), String> {
            let (mut times, mut tokens) = (Vec::new(), Vec::new());
            for e in stream {
                match e {
                    Event::Token { id, .. } => {
                        times.push(Instant::now());
                        tokens.push(id);
                    }
                    Event::Done { .. } => return Ok((times, tokens)),
                    Event::Failed(m) => return Err(m.to_string()),
                    Event::PromptLogprobs { .. } => {}
                }
            }
            Err("stream ended early".into())
        }));
    }
    let mut all = Vec::new();
    let mut constrained_outputs = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let (times, tokens) = h.join().map_err(|_| anyhow::anyhow!("collector panicked"))?.map_err(|e| anyhow::anyhow!(e))?;
        if constrained.is_some_and(|(_, k)| i < k) {
            constrained_outputs.push(tokens);
        }
        all.push(times);
    }
    let prefill_done = all.iter().filter_map(|t| t.first()).max().copied().unwrap_or(start);
    let end = all.iter().filter_map(|t| t.last()).max().copied().unwrap_or(start);
    let decoded = all.iter().flatten().filter(|&&t| t > prefill_done).count();
    let ttft: Vec<f64> = all.iter().filter_map(|t| t.first()).map(|t| t.duration_since(start).as_secs_f64() * 1e3).collect();
    Ok(Sample {
        decode_ts: decoded as f64 / end.duration_since(prefill_done).as_secs_f64().max(1e-9),
        pp_ts: (n * n_prompt) as f64 / prefill_done.duration_since(start).as_secs_f64().max(1e-9),
        ttft_ms: ttft.iter().sum::<f64>() / ttft.len().max(1) as f64,
        constrained_outputs,
    })
}

/// Times the mask of every position of the constrained outputs, replayed through a fresh
/// matcher (the same computation the engine ran while decoding them): (p50, p99) in µs.
fn mask_costs(constraint: &Constraint, outputs: &[Vec<u32>]) -> anyhow::Result<Option<(f64, f64)>> {
    let mut us = Vec::new();
    for tokens in outputs {
        let mut m = constraint.start();
        for &t in tokens {
            let t0 = Instant::now();
            m.prepare();
            us.push(t0.elapsed().as_secs_f64() * 1e6);
            m.consume(t)?;
        }
    }
    if us.is_empty() {
        return Ok(None);
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
    Ok(Some((at(0.5), at(0.99))))
}

pub fn main(args: &BenchArgs) -> anyhow::Result<()> {
    if args.n_gen < 2 || args.n_prompt == 0 {
        anyhow::bail!("--concurrency needs -p of at least 1 and -n of at least 2");
    }
    let model = super::load_model(&args.model, args.json, args.engine.isq, args.engine.tp.config()?.as_ref(), args.engine.mmproj.as_deref(), &args.engine.device)?;
    let threads = args.threads.unwrap_or_else(super::default_threads);
    let compute = super::compute(Some(threads));
    let vocab = model.model.config().vocab_size as u64;
    let mut rng = Rng::seeded(4321);
    let constraint = match &args.json_schema {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            let schema = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", path.display()))?;
            Some(Grammars::new(Arc::clone(&model.tokenizer)).compile(&GrammarSpec::JsonSchema(schema))?)
        }
        None => None,
    };
    let mut results = Vec::new();
    for &n in &args.concurrency {
        if n == 0 {
            anyhow::bail!("concurrency levels must be positive");
        }
        let cfg = args.engine.config(n, Some(args.n_prompt + args.n_gen + 1));
        let engine = Engine::start(Arc::clone(&model), Arc::clone(&compute), cfg)?;
        let constrained = constraint.as_ref().map(|c| (c, args.constrained.unwrap_or(n / 2).min(n)));
        run_once(&engine, n, args.n_prompt.min(16), 4, vocab, &mut rng, constrained)?; // warm-up
        let samples: Vec<Sample> =
            (0..args.repetitions).map(|_| run_once(&engine, n, args.n_prompt, args.n_gen, vocab, &mut rng, constrained)).collect::<anyhow::Result<_>>()?;
        let outputs: Vec<Vec<u32>> = samples.iter().flat_map(|s| s.constrained_outputs.iter().cloned()).collect();
        let masks = match &constraint {
            Some(c) => mask_costs(c, &outputs)?,
            None => None,
        };
        engine.shutdown();
        let ts: Vec<f64> = samples.iter().map(|s| s.decode_ts).collect();
        let (avg_ts, stddev_ts) = mean_sd(&ts);
        results.push(ParallelResult {
            model_filename: model.path.display().to_string(),
            n_threads: threads,
            n_prompt: args.n_prompt,
            n_gen: args.n_gen,
            n_parallel: n,
            avg_ts,
            stddev_ts,
            pp_avg_ts: mean_sd(&samples.iter().map(|s| s.pp_ts).collect::<Vec<_>>()).0,
            ttft_ms: mean_sd(&samples.iter().map(|s| s.ttft_ms).collect::<Vec<_>>()).0,
            samples_ts: ts,
            n_constrained: constrained.map_or(0, |(_, k)| k),
            mask_p50_us: masks.map(|m| m.0),
            mask_p99_us: masks.map(|m| m.1),
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("| parallel | constrained | prompt | gen | prefill t/s | decode t/s (aggregate) | mean TTFT ms | mask p50/p99 µs |");
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in &results {
            let masks = match (r.mask_p50_us, r.mask_p99_us) {
                (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
                _ => "-".into(),
            };
            println!(
                "| {} | {} | {} | {} | {:.1} | {:.1} ± {:.1} | {:.0} | {masks} |",
                r.n_parallel, r.n_constrained, r.n_prompt, r.n_gen, r.pp_avg_ts, r.avg_ts, r.stddev_ts, r.ttft_ms
            );
        }
    }
    Ok(())
}
