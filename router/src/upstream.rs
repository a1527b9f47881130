//! The workers a router sends requests to: a gRPC channel per worker, the model it serves
//! (with the tokenizer and chat template the router renders and tokenizes with), its health,
//! and how many requests this router has in flight there.
//!
//! A background task per worker refreshes its state every second: a worker that stops
//! answering is marked down and skipped until it answers again.

use kiln_proto::v1 as pb;
use kiln_proto::v1::worker_client::WorkerClient;
use kiln_shared::chat::ChatTemplate;
use kiln_shared::tokenizer::{Tokenizer, TokenizerSpec};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// What the router knows about the model a worker serves.
pub struct ModelState {
    pub info: pb::ModelInfoResponse,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

pub struct Worker {
    pub addr: String,
    pub client: WorkerClient<Channel>,
    model: RwLock<Option<Arc<ModelState>>>,
    healthy: AtomicBool,
    pub in_flight: AtomicUsize,
}

impl Worker {
    pub fn model(&self) -> Option<Arc<ModelState>> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Marks the worker down after a transport failure seen by a request.
    pub fn mark_down(&self) {
        self.healthy.store(false, Ordering::Relaxed);
    }
}

/// Counts a request in flight on a worker for as long as it lives.
pub struct InFlight(Arc<Worker>);

impl InFlight {
    pub fn worker(&self) -> &Arc<Worker> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub struct WorkerPool {
    workers: Arc<Vec<Arc<Worker>>>,
}

fn normalize(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

async fn fetch_model(client: &mut WorkerClient<Channel>) -> Result<ModelState, String> {
    let info = client.model_info(pb::ModelInfoRequest {}).await.map_err(|s| s.message().to_string())?.into_inner();
    let spec: TokenizerSpec = serde_json::from_slice(&info.tokenizer_json).map_err(|e| format!("tokenizer: {e}"))?;
    let tokenizer = Tokenizer::new(spec).map_err(|e| e.to_string())?;
    let template = ChatTemplate::new(&info.chat_template, &info.bos_token, &info.eos_token).map_err(|e| e.to_string())?;
    Ok(ModelState { info, tokenizer, template })
}

impl WorkerPool {
    /// A pool over `addrs` (host:port or URLs); must be called inside a Tokio runtime.
    /// Connections are made lazily; call
    /// `spawn_refresh` to start watching the workers.
    pub fn new(addrs: &[String]) -> Result<WorkerPool, String> {
        let mut workers = Vec::with_capacity(addrs.len());
        for a in addrs {
            let url = normalize(a);
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| format!("worker address `{a}`: {e}"))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true);
            let client = WorkerClient::new(endpoint.connect_lazy()).max_decoding_message_size(256 << 20);
            workers.push(Arc::new(Worker {
                addr: a.clone(),
                client,
                model: RwLock::new(None),
                healthy: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
            }));
        }
        Ok(WorkerPool { workers: Arc::new(workers) })
    }

    pub fn workers(&self) -> &[Arc<Worker>] {
        &self.workers
    }

    /// Checks every worker now, then keeps doing so every `interval`.
    pub async fn refresh_all(&self) {
        let checks = self.workers.iter().map(|w| refresh(Arc::clone(w)));
        futures_util::future::join_all(checks).await;
    }

    pub fn spawn_refresh(&self, interval: Duration) {
        for w in self.workers.iter() {
            let w = Arc::clone(w);
            tokio::spawn(async move {
                loop {
                    refresh(Arc::clone(&w)).await;
                    tokio::time::sleep(interval).await;
                }
            });
        }
    }

    /// Ids of the models served by healthy workers, sorted.
    pub fn models(&self) -> Vec<Arc<ModelState>> {
        let mut out: Vec<Arc<ModelState>> = Vec::new();
        for w in self.workers.iter().filter(|w| w.is_healthy()) {
            if let Some(m) = w.model() {
                if !out.iter().any(|o| o.info.model_id == m.info.model_id) {
                    out.push(m);
                }
            }
        }
        out.sort_by(|a, b| a.info.model_id.cmp(&b.info.model_id));
        out
    }

    /// The model `id` as some healthy worker serves it.
    pub fn model(&self, id: &str) -> Option<Arc<ModelState>> {
        self.models().into_iter().find(|m| m.info.model_id == id)
    }

    /// Whether any worker (healthy or not) has been seen serving `id`.
    pub fn knows(&self, id: &str) -> bool {
        self.workers.iter().any(|w| w.model().is_some_and(|m| m.info.model_id == id))
    }

    /// The healthy worker serving `id` with the fewest requests in flight, skipping `exclude`.
    pub fn pick(&self, id: &str, exclude: &[String]) -> Option<InFlight> {
        let w = self
            .workers
            .iter()
            .filter(|w| w.is_healthy() && !exclude.contains(&w.addr) && w.model().is_some_and(|m| m.info.model_id == id))
            .min_by_key(|w| w.in_flight.load(Ordering::Relaxed))?;
        w.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(Arc::clone(w)))
    }

    /// Requests in flight across all workers, and how many sequences healthy workers run at once.
    pub fn load(&self) -> (usize, usize) {
        let in_flight = self.workers.iter().map(|w| w.in_flight.load(Ordering::Relaxed)).sum();
        let capacity = self.workers.iter().filter(|w| w.is_healthy()).filter_map(|w| w.model()).map(|m| m.info.max_seqs as usize).sum();
        (in_flight, capacity)
    }
}

async fn refresh(w: Arc<Worker>) {
    let mut client = w.client.clone();
    let healthy = matches!(
        tokio::time::timeout(Duration::from_secs(2), client.health(pb::HealthRequest {})).await,
        Ok(Ok(r)) if r.get_ref().serving
    );
    if healthy && (w.model().is_none() || !w.is_healthy()) {
        match tokio::time::timeout(Duration::from_secs(10), fetch_model(&mut client)).await {
            Ok(Ok(m)) => {
                eprintln!("kiln-router: worker {} serves `{}`", w.addr, m.info.model_id);
                *w.model.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(m));
            }
            Ok(Err(e)) => {
                eprintln!("kiln-router: worker {}: cannot read its model: {e}", w.addr);
                w.healthy.store(false, Ordering::Relaxed);
                return;
            }
            Err(_) => {
                w.healthy.store(false, Ordering::Relaxed);
                return;
            }
        }
    }
    if w.is_healthy() != healthy {
        eprintln!("kiln-router: worker {} is {}", w.addr, if healthy { "up" } else { "down" });
    }
    w.healthy.store(healthy, Ordering::Relaxed);
}
