//! `kiln-worker bench --concurrency 1,4,16`: N requests at once through the batching engine,
//! measured like llama-batched-bench: prompt processing speed until every request has its
//! first token, then aggregate decode speed, plus the mean time to first token.

use super::bench::{mean_sd, BenchArgs};
use kiln_shared::sampling::SamplingParams;
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
}

struct Sample {
    decode_ts: f64,
    pp_ts: f64,
    ttft_ms: f64,
}

fn run_once(engine: &kiln_worker::engine::EngineHandle, n: usize, n_prompt: usize, n_gen: usize, vocab: u64, rng: &mut Rng) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..n {
        // Distinct random prompts: no prefix is shared.
        let prompt: Vec<u32> = (0..n_prompt).map(|_| (rng.next_u64() % vocab) as u32).collect();
        let req = GenerationRequest { prompt, sampling: SamplingParams::greedy(), max_tokens: Some(n_gen), stop: vec![], ignore_eos: true, logprobs: false, ..Default::default() };
        let stream = engine.submit(req)?;
        handles.push(std::thread::spawn(move || -> Result<Vec<Instant>, String> {
            let mut times = Vec::new();
            for e in stream {
                match e {
                    Event::Token { .. } => times.push(Instant::now()),
                    Event::Done { .. } => return Ok(times),
                    Event::Failed(m) => return Err(m),
                }
            }
            Err("stream ended early".into())
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.push(h.join().map_err(|_| anyhow::anyhow!("collector panicked"))?.map_err(|e| anyhow::anyhow!(e))?);
    }
    let prefill_done = all.iter().filter_map(|t| t.first()).max().copied().unwrap_or(start);
    let end = all.iter().filter_map(|t| t.last()).max().copied().unwrap_or(start);
    let decoded = all.iter().flatten().filter(|&&t| t > prefill_done).count();
    let ttft: Vec<f64> = all.iter().filter_map(|t| t.first()).map(|t| t.duration_since(start).as_secs_f64() * 1e3).collect();
    Ok(Sample {
        decode_ts: decoded as f64 / end.duration_since(prefill_done).as_secs_f64().max(1e-9),
        pp_ts: (n * n_prompt) as f64 / prefill_done.duration_since(start).as_secs_f64().max(1e-9),
        ttft_ms: ttft.iter().sum::<f64>() / ttft.len().max(1) as f64,
    })
}

pub fn main(args: &BenchArgs) -> anyhow::Result<()> {
    if args.n_gen < 2 || args.n_prompt == 0 {
        anyhow::bail!("--concurrency needs -p of at least 1 and -n of at least 2");
    }
    let model = super::load_model(&args.model, args.json, args.engine.isq)?;
    let threads = args.threads.unwrap_or_else(super::default_threads);
    let compute = super::compute(Some(threads));
    let vocab = model.model.config().vocab_size as u64;
    let mut rng = Rng::seeded(4321);
    let mut results = Vec::new();
    for &n in &args.concurrency {
        if n == 0 {
            anyhow::bail!("concurrency levels must be positive");
        }
        let cfg = args.engine.config(n, Some(args.n_prompt + args.n_gen + 1));
        let engine = Engine::start(Arc::clone(&model), Arc::clone(&compute), cfg)?;
        run_once(&engine, n, args.n_prompt.min(16), 4, vocab, &mut rng)?; // warm-up
        let samples: Vec<Sample> = (0..args.repetitions).map(|_| run_once(&engine, n, args.n_prompt, args.n_gen, vocab, &mut rng)).collect::<anyhow::Result<_>>()?;
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
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("| parallel | prompt | gen | prefill t/s | decode t/s (aggregate) | mean TTFT ms |");
        println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in &results {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} ± {:.1} | {:.0} |",
                r.n_parallel, r.n_prompt, r.n_gen, r.pp_avg_ts, r.avg_ts, r.stddev_ts, r.ttft_ms
            );
        }
    }
    Ok(())
}
