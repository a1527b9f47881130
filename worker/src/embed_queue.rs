//! The embedding engine: requests wait in a bounded queue (a full queue refuses new ones at
//! once, as the generation engine's admission does), and one thread takes as many as fit a
//! batch of `max_batch_tokens` and embeds them in one pass, sequences end to end without
//! padding. Nothing is kept between passes: encoders have no cache to reuse.

use crate::embedding::Embedder;
use crate::error::{Error, Result};
use crate::layers::Compute;
use crate::models::scratch::Scratch;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

struct Job {
    inputs: Vec<Vec<u32>>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>>>,
}

/// Where one submission's vectors (one per input) arrive.
pub type Embeddings = tokio::sync::oneshot::Receiver<Result<Vec<Vec<f32>>>>;

/// Counters for `/metrics` and the load a worker reports.
#[derive(Default)]
pub struct EmbedStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub requests: AtomicU64,
    pub inputs: AtomicU64,
    pub tokens: AtomicU64,
    pub batches: AtomicU64,
}

pub struct EmbedQueue {
    pub embedder: Arc<Embedder>,
    tx: Mutex<Option<SyncSender<Job>>>,
    pub stats: Arc<EmbedStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl EmbedQueue {
    /// Starts the embedding thread. At most `max_queue` requests wait; a pass reads up to
    /// `max_batch_tokens` tokens (one request larger than that runs alone).
    pub fn start(embedder: Arc<Embedder>, compute: Arc<Compute>, max_batch_tokens: usize, max_queue: usize) -> Result<EmbedQueue> {
        let (tx, rx) = mpsc::sync_channel(max_queue.max(1));
        let stats = Arc::new(EmbedStats::default());
        let (e, s) = (Arc::clone(&embedder), Arc::clone(&stats));
        let thread = std::thread::Builder::new()
            .name("kiln-embed".into())
            .spawn(move || run(&e, &compute, &rx, max_batch_tokens.max(1), &s))
            .map_err(|e| Error::InvalidRequest(format!("cannot start the embedding thread: {e}")))?;
        Ok(EmbedQueue { embedder, tx: Mutex::new(Some(tx)), stats, thread: Mutex::new(Some(thread)) })
    }

    /// Queues `inputs` (token ids with the model's special tokens), checked and, with
    /// `truncate`, cut to the longest input first; resolves to one vector per input. Also
    /// returns the number of tokens that will be read.
    pub fn submit(&self, mut inputs: Vec<Vec<u32>>, truncate: bool) -> Result<(Embeddings, usize)> {
        if inputs.is_empty() {
            return Err(Error::InvalidRequest("no inputs".into()));
        }
        let vocab = self.embedder.tokenizer.vocab_size();
        for (i, ids) in inputs.iter_mut().enumerate() {
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::InvalidRequest(format!("input {i}: token id {bad} is outside the vocabulary of {vocab}")));
            }
            self.embedder.fit(ids, truncate).map_err(|e| Error::InvalidRequest(format!("input {i}: {e}")))?;
        }
        let tokens = inputs.iter().map(Vec::len).sum();
        let (reply, rx) = tokio::sync::oneshot::channel();
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else { return Err(Error::InvalidRequest("the embedding engine has stopped".into())) };
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(Job { inputs, reply }) {
            Ok(()) => Ok((rx, tokens)),
            Err(e) => {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => Error::Busy("the embedding queue is full; retry later".into()),
                    TrySendError::Disconnected(_) => Error::InvalidRequest("the embedding engine has stopped".into()),
                })
            }
        }
    }

    /// Stops taking requests and waits for the queued ones to finish.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for EmbedQueue {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(embedder: &Embedder, compute: &Compute, rx: &Receiver<Job>, max_batch_tokens: usize, stats: &EmbedStats) {
    let mut scratch = Scratch::default();
    let mut pending: Option<Job> = None;
    loop {
        let first = match pending.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let mut tokens: usize = first.inputs.iter().map(Vec::len).sum();
        let mut batch = vec![first];
        // Whatever else is already waiting joins the pass while it fits.
        while let Ok(job) = rx.try_recv() {
            let size: usize = job.inputs.iter().map(Vec::len).sum();
            if tokens + size > max_batch_tokens {
                pending = Some(job);
                break;
            }
            tokens += size;
            batch.push(job);
        }
        stats.waiting.fetch_sub(batch.len(), Ordering::Relaxed);
        stats.running.store(batch.len(), Ordering::Relaxed);
        // Requests whose client has gone are not computed.
        batch.retain(|j| !j.reply.is_closed());
        let inputs: Vec<&[u32]> = batch.iter().flat_map(|j| j.inputs.iter().map(Vec::as_slice)).collect();
        let result = if inputs.is_empty() { Ok(Vec::new()) } else { embedder.embed(compute, &inputs, &mut scratch) };
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.inputs.fetch_add(inputs.len() as u64, Ordering::Relaxed);
        stats.tokens.fetch_add(inputs.iter().map(|i| i.len() as u64).sum(), Ordering::Relaxed);
        match result {
            Ok(mut vectors) => {
                for job in batch.into_iter().rev() {
                    let mine = vectors.split_off(vectors.len() - job.inputs.len());
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for job in batch {
                    let _ = job.reply.send(Err(Error::InvalidRequest(message.clone())));
                }
            }
        }
        stats.running.store(0, Ordering::Relaxed);
    }
}
