//! The engine thread: owns the model, the KV cache and the scheduler, and loops
//! commands → schedule → forward → sample → stream until shut down.

use super::decoding::Decoding;
use super::handle::{Capacity, Command, EngineHandle, EngineStats, Event, Failure, Shared};
use super::GenerationRequest;
use crate::error::{Error, Result};
use crate::kv_cache::{group_layouts, KvCache};
use crate::layers::Compute;
use crate::loader::LoadedModel;
use crate::models::batch::{Batch, Logits};
use crate::models::scratch::Scratch;
use crate::scheduler::{Plan, Scheduler, SchedulerConfig, SeqId, SeqState};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_seqs: usize,
    pub max_batch_tokens: usize,
    pub block_size: usize,
    /// KV cache budget; None picks one from the context length, `max_seqs` and free memory.
    pub kv_cache_bytes: Option<usize>,
    /// Longest sequence (prompt and output); None uses the model's, at most 4096.
    pub max_context_len: Option<usize>,
    /// For a model on a GPU without `kv_cache_bytes`: the share of the device's free memory
    /// (after the weights) the cache takes.
    pub gpu_memory_fraction: f64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_seqs: 16, max_batch_tokens: 512, block_size: 16, kv_cache_bytes: None, max_context_len: None, gpu_memory_fraction: 0.9 }
    }
}

/// About how much memory the logits of rows scoring a prompt may take in one step (at least
/// 16 rows are scored at a time): 64 MiB is 341 rows of SmolLM2's 49,152-token vocabulary,
/// 64 of Gemma 3's 262,144.
const SCORED_LOGITS_BYTES: usize = 64 << 20;

/// A request accepted by `EngineHandle::submit`, on its way to the engine thread.
pub(super) struct Admission {
    id: SeqId,
    req: GenerationRequest,
    max_len: usize,
    events: Sender<Event>,
    submitted: Instant,
    /// For a resumed completion, its state after the tokens it had already produced.
    resumed: Option<Decoding>,
}

impl Admission {
    pub(super) fn new(id: SeqId, req: GenerationRequest, max_len: usize, events: Sender<Event>, resumed: Option<Decoding>) -> Admission {
        Admission { id, req, max_len, events, submitted: Instant::now(), resumed }
    }
}

/// One completion the engine is working on (a request with `n` completions has `n`).
pub(super) struct Active {
    pub(super) request: SeqId,
    pub(super) index: usize,
    pub(super) req: Arc<GenerationRequest>,
    pub(super) decoding: Decoding,
    pub(super) events: Sender<Event>,
    pub(super) max_len: usize,
    pub(super) submitted: Instant,
    pub(super) first_token: Option<Instant>,
    /// Completions still to be forked from this one when its prompt is done.
    pub(super) forks_pending: usize,
}

pub struct Engine {
    pub(super) model: Arc<LoadedModel>,
    compute: Arc<Compute>,
    pub(super) kv: KvCache,
    scratch: Scratch,
    pub(super) logits: Vec<f32>,
    pub(super) scheduler: Scheduler,
    pub(super) active: HashMap<SeqId, Active>,
    /// Sequences of each request (more than one for `n` > 1).
    pub(super) requests: HashMap<SeqId, Vec<SeqId>>,
    /// Ids for forked completions, far above the handle's request ids.
    pub(super) next_fork_id: SeqId,
    shared: Arc<Shared>,
    pub(super) stats: EngineStats,
    vision_scratch: Scratch,
}

/// Bytes of memory this process may still use, or None where it cannot tell: what the system
/// reports available, and no more than the container's memory limit leaves (a pod's limit is
/// far below the node's free memory, which is all /proc/meminfo shows inside a container).
fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    let system = kib * 1024;
    Some(cgroup_memory_left().map_or(system, |left| left.min(system)))
}

/// The cgroup memory limit less current use (cgroup v2, else v1), when a limit is set.
fn cgroup_memory_left() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<usize>().ok());
    let (limit, used) = match read("/sys/fs/cgroup/memory.max") {
        Some(limit) => (limit, read("/sys/fs/cgroup/memory.current")?),
        // "max" (no limit) does not parse; v1 reports no limit as a huge number.
        None => (read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?, read("/sys/fs/cgroup/memory/memory.usage_in_bytes")?),
    };
    (limit < (1 << 50)).then(|| limit.saturating_sub(used))
}

/// Blocks per cache group for the budget: full-attention groups get as many as fit; sliding
/// groups only what `max_seqs` sequences can hold inside their windows.
fn size_cache(model: &LoadedModel, cfg: &EngineConfig, context_len: usize) -> Result<Vec<(usize, Option<usize>)>> {
    let mcfg = model.model.config();
    let layouts = group_layouts(mcfg);
    let block_bytes = KvCache::block_bytes(mcfg, cfg.block_size);
    let per_seq = context_len.div_ceil(cfg.block_size) + 1;
    let window_cap = |w: usize| cfg.max_seqs * ((w + cfg.max_batch_tokens).div_ceil(cfg.block_size) + 2);
    let bytes_for = |n: usize| -> usize {
        layouts.iter().zip(&block_bytes).map(|(l, b)| b * l.window.map_or(n, |w| n.min(window_cap(w)))).sum()
    };
    let budget = match cfg.kv_cache_bytes {
        Some(b) => b,
        None => match model.model.device_memory() {
            // On a GPU the cache takes its share of what the weights left: the more blocks,
            // the more prefixes stay cached.
            Some((free, _total)) => (free as f64 * cfg.gpu_memory_fraction.clamp(0.0, 1.0)) as usize,
            None => {
                // Room for every sequence at full length, but at most a quarter of free memory.
                let wanted = bytes_for(cfg.max_seqs * per_seq);
                wanted.min(available_memory().map_or(wanted, |m| m / 4)).max(bytes_for(per_seq))
            }
        },
    };
    // The largest block count whose groups fit the budget (bytes_for is monotonic).
    let (mut lo, mut hi) = (0usize, budget / block_bytes.iter().copied().min().unwrap_or(1).max(1) + 1);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if bytes_for(mid) <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // Less than a full-length sequence is allowed: each request is checked against what it
    // could grow to when it is submitted.
    if lo < 2 {
        return Err(Error::InvalidRequest(format!(
            "a KV cache of {} KiB holds {lo} blocks of {} tokens; it needs at least 2",
            budget >> 10,
            cfg.block_size
        )));
    }
    Ok(layouts.iter().map(|l| (l.window.map_or(lo, |w| lo.min(window_cap(w))), l.window)).collect())
}

impl Engine {
    /// Starts the engine thread and returns its handle.
    pub fn start(model: Arc<LoadedModel>, compute: Arc<Compute>, cfg: EngineConfig) -> Result<EngineHandle> {
        if cfg.max_seqs == 0 || cfg.max_batch_tokens == 0 || cfg.block_size == 0 {
            return Err(Error::InvalidRequest("max_seqs, max_batch_tokens and block_size must be positive".into()));
        }
        let mcfg = model.model.config();
        let context_len = cfg.max_context_len.unwrap_or(mcfg.max_context_len.min(4096)).min(mcfg.max_context_len).max(2);
        let groups = size_cache(&model, &cfg, context_len)?;
        let blocks: Vec<usize> = groups.iter().map(|g| g.0).collect();
        let kv = model.model.kv_cache(cfg.block_size, &blocks)?;
        let kv_block_bytes = KvCache::block_bytes(mcfg, cfg.block_size);
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: cfg.max_batch_tokens,
                max_seqs: cfg.max_seqs,
                block_size: cfg.block_size,
                // At least 16 rows, and no more than a step computes (which may be fewer than 16).
                max_scored_rows: (SCORED_LOGITS_BYTES / (mcfg.vocab_size.max(1) * 4)).max(16).min(cfg.max_batch_tokens),
            },
            &groups,
        );
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(1),
            tokenizer: Arc::clone(&model.tokenizer),
            vision: model.vision.as_ref().map(|v| v.info.clone()),
            stats: Mutex::new(EngineStats::default()),
            capacity: Capacity {
                block_size: cfg.block_size,
                groups,
                max_batch_tokens: cfg.max_batch_tokens,
                max_context_len: context_len,
                vocab_size: mcfg.vocab_size,
            },
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let engine = Engine {
            model,
            compute,
            kv,
            scratch: Scratch::default(),
            logits: Vec::new(),
            scheduler,
            active: HashMap::new(),
            requests: HashMap::new(),
            next_fork_id: 1 << 48,
            shared: Arc::clone(&shared),
            stats: EngineStats { kv_block_bytes, ..EngineStats::default() },
            vision_scratch: Scratch::default(),
        };
        std::thread::Builder::new()
            .name("kiln-engine".into())
            .spawn(move || engine.run(rx))
            .map_err(|e| Error::InvalidRequest(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle { tx, shared })
    }

    fn run(mut self, rx: Receiver<Command>) {
        loop {
            if self.scheduler.is_idle() {
                self.publish_stats();
                match rx.recv() {
                    Ok(cmd) => {
                        if !self.command(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !self.command(cmd) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.scheduler.is_idle() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            if !self.scheduler.is_idle() {
                self.step();
            }
        }
    }

    /// Applies one command; false means stop.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(a) => {
                let a = *a;
                // A resumed completion recomputes the cache over the prompt and what it had
                // produced (most of it usually found in the prefix cache).
                let mut tokens = a.req.prompt.clone();
                let index = a.req.resume.as_ref().map_or(0, |r| {
                    tokens.extend_from_slice(&r.tokens);
                    r.index
                });
                let mut seq = SeqState::new(a.id, tokens, self.kv.groups.len());
                seq.prompt_len = a.req.prompt.len();
                if a.req.prompt_logprobs.is_some() {
                    seq.score_from = Some(0);
                }
                let has_images = !a.req.images.is_empty();
                let req = Arc::new(a.req);
                let resumed = a.resumed.is_some();
                self.active.insert(
                    a.id,
                    Active {
                        request: a.id,
                        index,
                        decoding: a.resumed.unwrap_or_else(|| Decoding::for_choice(&req, 0)),
                        forks_pending: if resumed { 0 } else { req.n.max(1) - 1 },
                        req,
                        events: a.events,
                        max_len: a.max_len,
                        submitted: a.submitted,
                        first_token: None,
                    },
                );
                self.requests.insert(a.id, vec![a.id]);
                if has_images {
                    let placed = match (&self.model.vision, self.active.get(&a.id)) {
                        (Some(vision), Some(active)) => vision.place(&seq.tokens, &active.req.images).map_err(|e| e.to_string()),
                        _ => Err("this model does not take images".to_string()),
                    };
                    match placed {
                        Ok(spans) => seq.images = spans,
                        Err(msg) => {
                            if let Some(a) = self.active.remove(&a.id) {
                                let _ = a.events.send(Event::Failed(Failure::Request(msg)));
                            }
                            self.requests.remove(&a.id);
                            return true;
                        }
                    }
                }
                self.scheduler.add(seq);
            }
            Command::Cancel(request) => self.cancel_request(request),
            Command::Shutdown => {
                for (_, a) in self.active.drain() {
                    let _ = a.events.send(Event::Failed(Failure::Worker("the engine is shutting down".into())));
                }
                return false;
            }
        }
        true
    }

    /// Encodes the images whose rows this step computes and that have no embeddings yet, in
    /// one batch (an image several sequences hold, once), and gives them to their sequences.
    /// An image the prefix cache already holds is never computed, so never encoded. False
    /// when encoding failed: the sequences that needed it have been failed, and the step must
    /// be planned again.
    fn encode_planned_images(&mut self, plan: &Plan) -> bool {
        // (sequence, its image, that image's place in `unique`)
        let mut needed: Vec<(SeqId, usize, usize)> = Vec::new();
        let mut unique: Vec<Arc<crate::vision::PreparedImage>> = Vec::new();
        for e in &plan.entries {
            let Some(seq) = self.scheduler.get(e.id) else { continue };
            for (i, span) in seq.images.iter().enumerate() {
                if span.embeddings.is_some() || !span.needed_by(e.start..e.start + e.len) {
                    continue;
                }
                let Some(img) = self.active.get(&e.id).and_then(|a| a.req.images.get(i)) else { continue };
                let at = unique.iter().position(|u| u.key == img.key).unwrap_or_else(|| {
                    unique.push(Arc::clone(img));
                    unique.len() - 1
                });
                needed.push((e.id, i, at));
            }
        }
        if needed.is_empty() {
            return true;
        }
        let encoded = match &self.model.vision {
            Some(vision) => {
                let refs: Vec<&crate::vision::PreparedImage> = unique.iter().map(|i| i.as_ref()).collect();
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vision.encode(&self.compute, &refs, &mut self.vision_scratch)));
                run.unwrap_or_else(|_| Err(Error::InvalidRequest("internal error while encoding images".into())))
            }
            None => Err(Error::InvalidRequest("this model does not take images".into())),
        };
        match encoded {
            Ok(embeddings) => {
                self.stats.images_encoded += unique.len() as u64;
                for (id, i, at) in needed {
                    if let Some(span) = self.scheduler.get_mut(id).and_then(|seq| seq.images.get_mut(i)) {
                        span.embeddings = Some(Arc::clone(&embeddings[at]));
                    }
                }
                true
            }
            Err(e) => {
                let msg = e.to_string();
                for (id, _, _) in needed {
                    self.fail_seq(id, &msg);
                }
                false
            }
        }
    }

    fn step(&mut self) {
        let plan = self.scheduler.schedule();
        if plan.entries.is_empty() {
            std::thread::yield_now();
            return;
        }
        if !self.encode_planned_images(&plan) {
            return;
        }
        // Grammar masks of the constrained sequences sampling this step are computed on a
        // helper thread while the model runs, so they add nothing to the step unless they
        // take longer than the forward pass itself.
        let sampling: Vec<SeqId> = plan.entries.iter().filter(|e| e.wants_logits).map(|e| e.id).collect();
        let Engine { model, compute, kv, scratch, logits, scheduler, active, .. } = self;
        let matchers: Vec<&mut crate::constraint::TokenMatcher> =
            active.iter_mut().filter(|(id, _)| sampling.contains(id)).filter_map(|(_, a)| a.decoding.matcher.as_mut()).collect();
        let result = std::thread::scope(|s| {
            if !matchers.is_empty() {
                s.spawn(move || matchers.into_iter().for_each(|m| m.prepare()));
            }
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(model, compute, scheduler, kv, scratch, logits, &plan)))
        });
        match result {
            Ok(Ok(())) => self.after_forward(&plan),
            Ok(Err(e)) => self.fail_plan(&plan, &e.to_string()),
            Err(_) => self.fail_plan(&plan, "internal error while running the model"),
        }
        self.stats.steps += 1;
        self.publish_stats();
    }

    fn publish_stats(&mut self) {
        self.stats.scheduler = self.scheduler.stats();
        self.stats.blocks = self.scheduler.pools().iter().map(|p| p.stats()).collect();
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = self.stats.clone();
    }
}

/// Runs the model over a step's plan, leaving in `logits` each entry's `logit_rows`, in plan
/// order.
fn forward(model: &LoadedModel, compute: &Compute, scheduler: &Scheduler, kv: &mut KvCache, scratch: &mut Scratch, logits: &mut Vec<f32>, plan: &Plan) -> Result<()> {
    let bs = kv.block_size;
    let mut batch = Batch::new(bs);
    for e in &plan.entries {
        let seq = scheduler.get(e.id).expect("planned sequences are known to the scheduler");
        let blocks = (e.start + e.len).div_ceil(bs);
        let tables = seq.block_tables.iter().map(|t| t[..blocks].to_vec()).collect();
        let wanted = match (e.scored.is_empty(), e.wants_logits) {
            (false, _) => Logits::From(e.scored.start - e.start),
            (true, true) => Logits::Last,
            (true, false) => Logits::None,
        };
        batch.push_seq(&seq.tokens[e.start..e.start + e.len], e.start, tables, wanted);
        batch.place_images(&seq.images);
    }
    model.model.forward(compute, &batch, kv, scratch, logits)
}
