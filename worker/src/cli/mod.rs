//! Command-line front ends over the worker library.

pub mod bench;
pub mod bench_parallel;
pub mod cuda;
pub mod eval;
pub mod info;
pub mod placement;
pub mod pull;
pub mod quantize;
pub mod run;
pub mod serve;
pub mod template;
pub mod tp;

use kiln_worker::layers::Compute;
use kiln_worker::loader::LoadedModel;
use std::sync::Arc;
use std::time::Instant;

/// One line for an error and its causes, without a backtrace.
pub fn describe(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Resolves a model argument (path, directory, known name or repo id, fetched on first use)
/// and loads it, quantizing its projection weights to `isq` when given; with `tp`, rank 0's
/// share of it, once every rank of the group has joined and loaded its own.
#[allow(clippy::too_many_arguments)]
pub fn load_model(arg: &str, quiet: bool, isq: Option<kiln_kernels::DType>, tp: Option<&kiln_worker::parallel::TpConfig>, mmproj: Option<&std::path::Path>, device: &kiln_worker::backend::Device) -> anyhow::Result<Arc<LoadedModel>> {
    if tp.is_some() && *device != kiln_worker::backend::Device::Cpu {
        anyhow::bail!("--device {device}: tensor-parallel groups compute on the CPU only for now (use --device cpu)");
    }
    let path = kiln_worker::assets::resolve(arg, &mut |msg| eprintln!("kiln: {msg}"))?;
    let t = Instant::now();
    if mmproj.is_some() && tp.is_some() {
        anyhow::bail!("--mmproj: vision-language models cannot be split across ranks yet");
    }
    let mut model = match tp {
        Some(cfg) => {
            if !quiet {
                eprintln!("kiln: rank 0 of group `{}`: waiting for {} more ranks at {}", cfg.group, cfg.size - 1, cfg.leader);
            }
            kiln_worker::parallel::load_rank(&path, isq, cfg)?.model
        }
        None => LoadedModel::load_on(&path, isq, None, device)?,
    };
    if let (Some(r), Some(dtype)) = (&model.isq, isq) {
        if !quiet {
            let mib = |b: usize| b as f64 / (1 << 20) as f64;
            eprintln!(
                "kiln: quantized {} projection weights to {} at load ({:.1} MiB -> {:.1} MiB); {} already quantized, {} in another format: {}",
                r.quantized,
                dtype.name(),
                mib(r.bytes_before),
                mib(r.bytes_after),
                r.kept,
                r.fallbacks.len(),
                r.fallbacks.iter().map(|(n, d)| format!("{n} ({})", d.name())).collect::<Vec<_>>().join(", ")
            );
        }
    }
    if let Some(mmproj) = mmproj {
        if model.vision.is_some() {
            anyhow::bail!("--mmproj: {} already has its own vision encoder", path.display());
        }
        let hidden = model.model.config().hidden_size;
        let vision = kiln_worker::vision::VisionModel::from_mmproj(mmproj, hidden, &model.tokenizer).map_err(|e| anyhow::anyhow!("--mmproj {}: {e}", mmproj.display()))?;
        model.vision = Some(Arc::new(vision));
    }
    if !model.unused_tensors.is_empty() {
        eprintln!("kiln: warning: {} tensors in the file were not used: {}", model.unused_tensors.len(), model.unused_tensors.join(", "));
    }
    if !quiet {
        let cfg = model.model.config();
        eprintln!(
            "kiln: loaded {} ({}, {} layers, vocab {}) from {} in {:.0} ms",
            cfg.name,
            cfg.architecture,
            cfg.num_layers,
            cfg.vocab_size,
            path.display(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(Arc::new(model))
}

/// Engine settings shared by the commands that run one.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineArgs {
    /// KV cache size in MiB (default: room for every sequence at full context, at most a
    /// quarter of free memory)
    #[arg(long, env = "KILN_WORKER_KV_CACHE_MB")]
    pub kv_cache_mb: Option<usize>,
    /// Token slots per KV cache block
    #[arg(long, default_value_t = 16, env = "KILN_WORKER_BLOCK_SIZE")]
    pub block_size: usize,
    /// Most tokens computed in one engine step (prompt chunks and decodes together)
    #[arg(long, default_value_t = 512, env = "KILN_WORKER_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: usize,
    /// Quantize projection weights while loading: q4_0 q4_1 q5_0 q5_1 q8_0 q2k q3k q4k q5k q6k
    /// (embeddings and the output head keep their precision)
    #[arg(long, value_parser = kiln_worker::loader::parse_isq, env = "KILN_WORKER_ISQ")]
    pub isq: Option<kiln_kernels::DType>,
    /// A llama.cpp multimodal projector (`mmproj` GGUF) giving a GGUF language model its vision
    /// encoder (Gemma 3)
    #[arg(long, value_name = "FILE", env = "KILN_WORKER_MMPROJ")]
    pub mmproj: Option<std::path::PathBuf>,
    /// Where the model computes: cpu (kiln's kernels), cuda or cuda:N (a GPU; workers built
    /// with `make build-cuda`), candle-cpu (the GPU backend's operations on the host: slow,
    /// for checking them)
    #[arg(long, default_value = "cpu", env = "KILN_WORKER_DEVICE")]
    pub device: kiln_worker::backend::Device,
    /// On a GPU without --kv-cache-mb: the share of the device memory left free by the
    /// weights that the KV cache takes
    #[arg(long, default_value_t = 0.9, env = "KILN_WORKER_GPU_MEMORY_FRACTION")]
    pub gpu_memory_fraction: f64,
    #[command(flatten)]
    pub tp: tp::TpArgs,
}

impl EngineArgs {
    pub fn config(&self, max_seqs: usize, max_context_len: Option<usize>) -> kiln_worker::engine::EngineConfig {
        kiln_worker::engine::EngineConfig {
            max_seqs,
            max_batch_tokens: self.max_batch_tokens,
            block_size: self.block_size,
            kv_cache_bytes: self.kv_cache_mb.map(|mb| mb << 20),
            max_context_len,
            gpu_memory_fraction: self.gpu_memory_fraction,
        }
    }
}

pub fn compute(threads: Option<usize>) -> Arc<Compute> {
    Arc::new(Compute::new(threads.unwrap_or_else(default_threads)))
}

/// Resolves when the process is asked to stop (SIGTERM, or Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
