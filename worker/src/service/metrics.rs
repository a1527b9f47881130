//! The worker's Prometheus endpoint: engine gauges and counters in text exposition format.

use super::grpc::{Backend, Serving};
use crate::embed_queue::EmbedStats;
use crate::kv_cache::block_pool::PoolStats;
use std::fmt::Write;
use std::sync::atomic::Ordering;

fn writer(out: &mut String) -> impl FnMut(&str, &str, &str, &[(String, f64)]) + '_ {
    move |name, kind, help, samples| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

pub fn render(serving: &Serving) -> String {
    let m = format!("model=\"{}\"", serving.info.model_id.replace('"', "'"));
    let mut out = match &serving.backend {
        Backend::Generate { engine, model, .. } => {
            let mut out = generation(engine, &m);
            if let Some(group) = &model.group {
                let mut metric = writer(&mut out);
                metric("kiln_worker_tp_ranks", "gauge", "Ranks of the tensor-parallel group this worker leads (rank 0).", &[(m.clone(), group.size() as f64)]);
                metric(
                    "kiln_worker_tp_collective_seconds_total",
                    "counter",
                    "Seconds rank 0 spent in the group's collectives (sending steps, all-reduces, gathers), waits for slower ranks included.",
                    &[(m.clone(), group.seconds())],
                );
            }
            out
        }
        Backend::Embed(queue) => embedding(&queue.stats, &m),
    };
    {
        let mut metric = writer(&mut out);
        let device = format!("{m},device=\"{}\"", serving.info.device.replace('"', "'"));
        metric("kiln_worker_device_info", "gauge", "Where the model computes (the device label: cpu, or a GPU with its name, memory and compute capability); always 1.", &[(device, 1.0)]);
    }
    if let Some((allocated, resident)) = kiln_telemetry::heap::figures() {
        let mut metric = writer(&mut out);
        metric("kiln_worker_heap_allocated_bytes", "gauge", "Heap bytes allocated and not yet freed (model weights mapped from the file are not heap).", &[(m.clone(), allocated as f64)]);
        metric("kiln_worker_heap_resident_bytes", "gauge", "Bytes of the allocator's pages that are resident.", &[(m, resident as f64)]);
    }
    out
}

fn embedding(s: &EmbedStats, m: &str) -> String {
    let mut out = String::new();
    let mut metric = writer(&mut out);
    let v = |n: f64| [(m.to_string(), n)];
    metric("kiln_worker_embed_running_requests", "gauge", "Embedding requests in the pass being computed.", &v(s.running.load(Ordering::Relaxed) as f64));
    metric("kiln_worker_embed_waiting_requests", "gauge", "Embedding requests waiting for a pass.", &v(s.waiting.load(Ordering::Relaxed) as f64));
    metric("kiln_worker_embed_requests_total", "counter", "Embedding requests computed.", &v(s.requests.load(Ordering::Relaxed) as f64));
    metric("kiln_worker_embed_inputs_total", "counter", "Inputs embedded.", &v(s.inputs.load(Ordering::Relaxed) as f64));
    metric("kiln_worker_embed_tokens_total", "counter", "Tokens embedded.", &v(s.tokens.load(Ordering::Relaxed) as f64));
    metric("kiln_worker_embed_passes_total", "counter", "Embedding passes run (each over one or more requests).", &v(s.batches.load(Ordering::Relaxed) as f64));
    drop(metric);
    out
}

fn generation(engine: &crate::engine::EngineHandle, m: &str) -> String {
    let s = engine.stats();
    let mut out = String::new();
    let m = m.to_string();
    let mut metric = writer(&mut out);
    metric("kiln_worker_running_sequences", "gauge", "Sequences being computed.", &[(m.clone(), s.scheduler.running as f64)]);
    metric("kiln_worker_waiting_sequences", "gauge", "Sequences waiting to be admitted.", &[(m.clone(), s.scheduler.waiting as f64)]);
    let groups = |f: fn(&PoolStats) -> usize| -> Vec<(String, f64)> {
        s.blocks.iter().enumerate().map(|(g, b)| (format!("{m},group=\"{g}\""), f(b) as f64)).collect()
    };
    metric("kiln_worker_kv_blocks_in_use", "gauge", "KV cache blocks referenced by sequences.", &groups(|b| b.in_use));
    metric("kiln_worker_kv_blocks_cached", "gauge", "Unreferenced KV cache blocks holding reusable prefixes.", &groups(|b| b.cached));
    metric("kiln_worker_kv_blocks_capacity", "gauge", "KV cache blocks.", &groups(|b| b.num_blocks));
    metric("kiln_worker_kv_blocks_written", "gauge", "KV cache blocks written at least once since start.", &groups(|b| b.written));
    // The cache is allocated whole, but its pages become resident only as blocks are first
    // written: this is the part of the process's memory the cache accounts for.
    let written: usize = s.blocks.iter().zip(&s.kv_block_bytes).map(|(b, bytes)| b.written * bytes).sum();
    metric("kiln_worker_kv_written_bytes", "gauge", "Bytes of KV cache written at least once (resident).", &[(m.clone(), written as f64)]);
    metric("kiln_worker_prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.", &[(m.clone(), s.scheduler.prefix_query_tokens as f64)]);
    metric("kiln_worker_prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.", &[(m.clone(), s.scheduler.prefix_hit_tokens as f64)]);
    metric("kiln_worker_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.", &[(m.clone(), s.scheduler.preemptions as f64)]);
    metric("kiln_worker_generated_tokens_total", "counter", "Tokens generated.", &[(m.clone(), s.generated_tokens as f64)]);
    metric("kiln_worker_completions_total", "counter", "Completions that ended on their own.", &[(m.clone(), s.completed as f64)]);
    metric("kiln_worker_cancelled_total", "counter", "Completions cancelled because the client left or asked to stop.", &[(m.clone(), s.cancelled as f64)]);
    metric("kiln_worker_images_encoded_total", "counter", "Images run through the vision encoder.", &[(m.clone(), s.images_encoded as f64)]);
    metric("kiln_worker_steps_total", "counter", "Engine steps run.", &[(m, s.steps as f64)]);
    drop(metric);
    out
}
