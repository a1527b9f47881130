//! `kiln-worker bench`: prompt processing (ppN) and generation (tgN) speed, measured the
//! way llama-bench measures them, so the two can be compared side by side.

use kiln_worker::engine::Session;
use kiln_worker::sampler::Rng;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(short, long, default_value = "smollm2")]
    pub model: String,
    /// Prompt tokens of the prefill test (0 skips it)
    #[arg(short = 'p', long, default_value_t = 512)]
    pub n_prompt: usize,
    /// Generated tokens of the decode test (0 skips it)
    #[arg(short = 'n', long, default_value_t = 128)]
    pub n_gen: usize,
    /// Repetitions
    #[arg(short = 'r', long, default_value_t = 3)]
    pub repetitions: usize,
    /// Run N requests at once through the batching engine, for each N given (e.g. 1,4,16);
    /// reports aggregate decode speed and time to first token
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    #[command(flatten)]
    pub engine: super::EngineArgs,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Print a JSON array (llama-bench's key names)
    #[arg(long)]
    pub json: bool,
    /// With --concurrency: hold some of the requests to the JSON Schema in this file
    #[arg(long, value_name = "FILE", requires = "concurrency")]
    pub json_schema: Option<std::path::PathBuf>,
    /// How many of each concurrency level's requests carry --json-schema (default: half)
    #[arg(long, requires = "json_schema")]
    pub constrained: Option<usize>,
    /// Embedding models: sentences per second embedding batches of each size given (e.g.
    /// 1,64) of inputs of --n-prompt tokens
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    pub embed_batch: Vec<usize>,
    /// Vision-language models: time preparing and encoding these images (PNG, JPEG, WebP,
    /// GIF), one at a time, and the tokens each takes in the prompt
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["concurrency", "embed_batch"])]
    pub image: Vec<std::path::PathBuf>,
}

#[derive(Serialize)]
struct TestResult {
    model_filename: String,
    model_type: String,
    n_threads: usize,
    n_prompt: usize,
    n_gen: usize,
    avg_ns: u64,
    stddev_ns: u64,
    avg_ts: f64,
    stddev_ts: f64,
    samples_ns: Vec<u64>,
    samples_ts: Vec<f64>,
}

pub(super) fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

pub fn main(args: BenchArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 {
        anyhow::bail!("--repetitions must be at least 1");
    }
    if args.engine.tp.is_follower() {
        return super::tp::follow(&args.model, args.engine.isq, args.threads, &args.engine.tp);
    }
    if !args.concurrency.is_empty() {
        return super::bench_parallel::main(&args);
    }
    if !args.embed_batch.is_empty() {
        return embed(&args);
    }
    if !args.image.is_empty() {
        return images(&args);
    }
    let model = super::load_model(&args.model, args.json, args.engine.isq, args.engine.tp.config()?.as_ref(), args.engine.mmproj.as_deref(), &args.engine.device)?;
    let threads = args.threads.unwrap_or_else(super::default_threads);
    let compute = super::compute(Some(threads));
    let ctx = (args.n_prompt.max(args.n_gen) + 1).max(16);
    let mut session = Session::new(Arc::clone(&model), compute, ctx)?;
    let cfg = model.model.config().clone();
    let vocab = cfg.vocab_size as u64;
    let mut rng = Rng::seeded(1234);
    let mut random_tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect() };

    let mut tests = Vec::new();
    if args.n_prompt > 0 {
        tests.push((args.n_prompt, 0));
    }
    if args.n_gen > 0 {
        tests.push((0, args.n_gen));
    }
    let mut results = Vec::new();
    for (n_prompt, n_gen) in tests {
        let mut run = || -> anyhow::Result<u64> {
            session.reset();
            let t = Instant::now();
            if n_prompt > 0 {
                session.eval(&random_tokens(n_prompt), 0)?;
            } else {
                for (pos, tok) in random_tokens(n_gen).into_iter().enumerate() {
                    session.eval(&[tok], pos)?;
                }
            }
            Ok(t.elapsed().as_nanos() as u64)
        };
        run()?; // warm-up, as llama-bench does
        let collectives_before = model.group.as_ref().map(|g| g.seconds());
        let samples_ns: Vec<u64> = (0..args.repetitions).map(|_| run()).collect::<anyhow::Result<_>>()?;
        if let (Some(g), Some(before)) = (&model.group, collectives_before) {
            // Decode runs one step per token; prefill one step for the prompt.
            let steps = args.repetitions * if n_prompt > 0 { 1 } else { n_gen };
            let total_s = samples_ns.iter().sum::<u64>() as f64 / 1e9;
            eprintln!(
                "kiln: {} ranks, {}: collectives {:.3} ms per step ({:.0}% of the time)",
                g.size(),
                if n_prompt > 0 { format!("pp{n_prompt}") } else { format!("tg{n_gen}") },
                (g.seconds() - before) * 1e3 / steps as f64,
                100.0 * (g.seconds() - before) / total_s
            );
        }
        let n = (n_prompt + n_gen) as f64;
        let samples_ts: Vec<f64> = samples_ns.iter().map(|&ns| n / (ns as f64 / 1e9)).collect();
        let (avg_ts, stddev_ts) = mean_sd(&samples_ts);
        let (avg_ns, stddev_ns) = mean_sd(&samples_ns.iter().map(|&x| x as f64).collect::<Vec<_>>());
        results.push(TestResult {
            model_filename: model.path.display().to_string(),
            model_type: format!("{} {}", cfg.architecture, cfg.name),
            n_threads: threads,
            n_prompt,
            n_gen,
            avg_ns: avg_ns as u64,
            stddev_ns: stddev_ns as u64,
            avg_ts,
            stddev_ts,
            samples_ns,
            samples_ts,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        let size_mib = std::fs::metadata(&model.path).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64;
        println!("| model | size | threads | test | t/s |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for r in &results {
            let test = if r.n_prompt > 0 { format!("pp{}", r.n_prompt) } else { format!("tg{}", r.n_gen) };
            println!("| {} | {:.2} MiB | {} | {} | {:.2} ± {:.2} |", r.model_type, size_mib, r.n_threads, test, r.avg_ts, r.stddev_ts);
        }
    }
    Ok(())
}

/// `--embed-batch`: batches of random-token inputs of `n_prompt` tokens (with the model's
/// special tokens at the ends), each size timed `repetitions` times after a warm-up.
/// Time to prepare (decode, resize, normalize) and to encode each image, and its tokens.
fn images(args: &BenchArgs) -> anyhow::Result<()> {
    let model = super::load_model(&args.model, args.json, args.engine.isq, None, args.engine.mmproj.as_deref(), &args.engine.device)?;
    let Some(vision) = model.vision.clone() else { anyhow::bail!("`{}` does not take images", args.model) };
    let compute = super::compute(args.threads);
    let mut scratch = kiln_worker::models::scratch::Scratch::default();
    println!("| image | threads | resized | tokens | prepare ms | encode ms | encode ms per token |");
    println!("|---|---|---|---|---|---|---|");
    for path in &args.image {
        let data = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let limits = kiln_shared::image::ImageLimits::default();
        let image = vision.processor.prepare(&data, &limits)?;
        vision.encode(&compute, &[&image], &mut scratch)?;
        let (mut prepare, mut encode) = (Vec::new(), Vec::new());
        for _ in 0..args.repetitions {
            let t = Instant::now();
            let image = vision.processor.prepare(&data, &limits)?;
            prepare.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            vision.encode(&compute, &[&image], &mut scratch)?;
            encode.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let tokens = vision.info.tokens_for(image.width, image.height);
        let ((p, _), (e, sd)) = (mean_sd(&prepare), mean_sd(&encode));
        let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        println!("| {name} | {} | {}x{} | {tokens} | {p:.1} | {e:.1} ± {sd:.1} | {:.2} |", compute.pool.num_threads(), image.width, image.height, e / tokens as f64);
    }
    Ok(())
}

fn embed(args: &BenchArgs) -> anyhow::Result<()> {
    let path = kiln_worker::assets::resolve(&args.model, &mut |msg| eprintln!("kiln: {msg}"))?;
    let e = kiln_worker::embedding::Embedder::load(&path)?;
    let compute = super::compute(args.threads);
    let len = args.n_prompt.clamp(2, e.pooling.max_tokens);
    let vocab = e.tokenizer.vocab_size() as u64;
    let ends = e.encode("", false)?;
    let mut rng = Rng::seeded(7);
    let mut scratch = kiln_worker::models::scratch::Scratch::default();
    println!("| model | threads | tokens per input | batch | sentences/s | ms per batch |");
    println!("|---|---|---|---|---|---|");
    for &batch in &args.embed_batch {
        let inputs: Vec<Vec<u32>> = (0..batch.max(1))
            .map(|_| {
                let mut ids: Vec<u32> = (0..len).map(|_| (1000 + rng.next_u64() % (vocab - 1000)) as u32).collect();
                if let (Some(&first), Some(&last)) = (ends.first(), ends.last()) {
                    ids[0] = first;
                    ids[len - 1] = last;
                }
                ids
            })
            .collect();
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        e.embed(&compute, &refs, &mut scratch)?;
        let mut rates = Vec::new();
        for _ in 0..args.repetitions {
            let t = Instant::now();
            e.embed(&compute, &refs, &mut scratch)?;
            rates.push(refs.len() as f64 / t.elapsed().as_secs_f64());
        }
        let (mean, sd) = mean_sd(&rates);
        println!("| {} | {} | {len} | {} | {mean:.1} ± {sd:.1} | {:.1} |", e.name, compute.pool.num_threads(), refs.len(), 1e3 * refs.len() as f64 / mean);
    }
    Ok(())
}
