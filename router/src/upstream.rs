//! The workers a router sends requests to: a gRPC channel per worker, the model it serves
//! (with the tokenizer and chat template the router renders and tokenizes with), its health,
//! its load, and how many requests this router has in flight there.
//!
//! Membership is static (`--workers`) or follows etcd (`membership::follow`). A background
//! task per worker checks it every second (active health checks); requests report failures
//! (passive checks), which eject the worker for a while. An ejected or failing worker is
//! skipped until it passes a check again.

use crate::routing::{Policy, RouteKey};
use kiln_proto::v1 as pb;
use kiln_proto::v1::worker_client::WorkerClient;
use kiln_shared::chat::ChatTemplate;
use kiln_shared::tokenizer::{Tokenizer, TokenizerSpec};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// What the router knows about the model a worker serves.
pub struct ModelState {
    pub info: pb::ModelInfoResponse,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

pub struct Worker {
    /// The worker's cluster name (its address under static membership).
    pub id: String,
    pub addr: String,
    pub client: WorkerClient<Channel>,
    model: RwLock<Option<Arc<ModelState>>>,
    healthy: AtomicBool,
    /// Its last health check was answered (even "not serving", as while draining); false
    /// means the worker is hung or gone, and generations waiting on it move elsewhere.
    responsive: AtomicBool,
    pub in_flight: AtomicUsize,
    /// Sequences other routers had on the worker at its last load report.
    others_load: AtomicU32,
    /// An operator drained it: no new requests, running ones finish.
    pub draining: AtomicBool,
    /// Set after a request saw it fail or stall: health checks do not readmit it before then.
    ejected_until: Mutex<Option<Instant>>,
    /// Left the membership; its health-check task stops.
    retired: AtomicBool,
}

impl Worker {
    pub fn model(&self) -> Option<Arc<ModelState>> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_responsive(&self) -> bool {
        self.responsive.load(Ordering::Relaxed)
    }

    /// Whether new requests may go here.
    pub fn is_available(&self) -> bool {
        self.is_healthy() && !self.draining.load(Ordering::Relaxed)
    }

    pub fn serves(&self, model: &str) -> bool {
        self.model().is_some_and(|m| m.info.model_id == model)
    }

    /// Marks the worker down after a request saw it fail or stall; it stays out for
    /// `for_at_least`, then comes back once a health check passes.
    pub fn eject(&self, for_at_least: Duration) {
        self.healthy.store(false, Ordering::Relaxed);
        *self.ejected_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + for_at_least);
    }

    /// Marks the worker down after a transport failure seen by a request.
    pub fn mark_down(&self) {
        self.eject(Duration::from_secs(1));
    }

    fn ejected(&self) -> bool {
        self.ejected_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| Instant::now() < t)
    }

    /// Load for routing: what this router has in flight there now (exact), plus what other
    /// routers had there at the worker's last report (its running and waiting sequences
    /// less this router's share at that moment). Taking the report whole instead would let
    /// every router see a worker as idle until its next report and send it a burst.
    pub fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed) + self.others_load.load(Ordering::Relaxed) as usize
    }

    /// Records the worker's reported running and waiting sequences.
    pub fn set_reported_load(&self, reported: u32) {
        let mine = u32::try_from(self.in_flight.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        self.others_load.store(reported.saturating_sub(mine), Ordering::Relaxed);
    }

    pub fn max_seqs(&self) -> usize {
        self.model().map_or(1, |m| m.info.max_seqs.max(1) as usize)
    }
}

/// Counts a request in flight on a worker for as long as it lives.
pub struct InFlight(Arc<Worker>);

impl InFlight {
    pub fn new(w: &Arc<Worker>) -> InFlight {
        w.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(w))
    }

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
    workers: Arc<RwLock<Vec<Arc<Worker>>>>,
    pub policy: Policy,
    /// How often each worker is checked; None: only when `refresh_all` is called.
    refresh_every: Option<Duration>,
    round_robin: Arc<AtomicUsize>,
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
    // A template the worker could not use either fails every chat request with its reason.
    let template = ChatTemplate::or_refusing(&info.chat_template, &info.bos_token, &info.eos_token);
    Ok(ModelState { info, tokenizer, template })
}

fn new_worker(id: &str, addr: &str) -> Result<Worker, String> {
    let endpoint = Endpoint::from_shared(normalize(addr))
        .map_err(|e| format!("worker address `{addr}`: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let client = WorkerClient::new(endpoint.connect_lazy()).max_decoding_message_size(256 << 20);
    Ok(Worker {
        id: id.to_string(),
        addr: addr.to_string(),
        client,
        model: RwLock::new(None),
        healthy: AtomicBool::new(false),
        responsive: AtomicBool::new(true),
        in_flight: AtomicUsize::new(0),
        others_load: AtomicU32::new(0),
        draining: AtomicBool::new(false),
        ejected_until: Mutex::new(None),
        retired: AtomicBool::new(false),
    })
}

impl WorkerPool {
    /// A pool over fixed `addrs` (host:port or URLs), checked only by `refresh_all` until
    /// `spawn_refresh`; must be called inside a Tokio runtime (connections are lazy).
    pub fn new(addrs: &[String]) -> Result<WorkerPool, String> {
        let pool = WorkerPool::empty(Policy::default(), None);
        for a in addrs {
            pool.add(a, a)?;
        }
        Ok(pool)
    }

    /// A pool with no workers yet; with `refresh_every`, each worker added is checked that often.
    pub fn empty(policy: Policy, refresh_every: Option<Duration>) -> WorkerPool {
        WorkerPool { workers: Arc::new(RwLock::new(Vec::new())), policy, refresh_every, round_robin: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn with_policy(mut self, policy: Policy) -> WorkerPool {
        self.policy = policy;
        self
    }

    pub fn workers(&self) -> Vec<Arc<Worker>> {
        self.workers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Worker>> {
        self.workers().into_iter().find(|w| w.id == id)
    }

    /// Adds worker `id` at `addr` (replacing one of that id at another address).
    pub fn add(&self, id: &str, addr: &str) -> Result<Arc<Worker>, String> {
        if let Some(w) = self.get(id) {
            if w.addr == addr {
                return Ok(w);
            }
            self.remove(id);
        }
        let w = Arc::new(new_worker(id, addr)?);
        self.workers.write().unwrap_or_else(|e| e.into_inner()).push(Arc::clone(&w));
        if let Some(every) = self.refresh_every {
            spawn_checks(Arc::clone(&w), every);
        }
        Ok(w)
    }

    /// Drops worker `id` from the pool; requests running there go on until they end.
    pub fn remove(&self, id: &str) {
        let mut ws = self.workers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = ws.iter().position(|w| w.id == id) {
            ws.remove(i).retired.store(true, Ordering::Relaxed);
        }
    }

    /// Checks every worker now.
    pub async fn refresh_all(&self) {
        let checks = self.workers().into_iter().map(refresh);
        futures_util::future::join_all(checks).await;
    }

    /// Keeps checking every current worker (and, from now on, each one added).
    pub fn spawn_refresh(&mut self, interval: Duration) {
        self.refresh_every = Some(interval);
        for w in self.workers() {
            spawn_checks(w, interval);
        }
    }

    /// Models served by available workers, sorted by id.
    pub fn models(&self) -> Vec<Arc<ModelState>> {
        let mut out: Vec<Arc<ModelState>> = Vec::new();
        for w in self.workers().iter().filter(|w| w.is_available()) {
            if let Some(m) = w.model() {
                if !out.iter().any(|o| o.info.model_id == m.info.model_id) {
                    out.push(m);
                }
            }
        }
        out.sort_by(|a, b| a.info.model_id.cmp(&b.info.model_id));
        out
    }

    /// The model `id` as some available worker serves it.
    pub fn model(&self, id: &str) -> Option<Arc<ModelState>> {
        self.models().into_iter().find(|m| m.info.model_id == id)
    }

    /// Whether any worker (available or not) has been seen serving `id`.
    pub fn knows(&self, id: &str) -> bool {
        self.workers().iter().any(|w| w.serves(id))
    }

    /// An available worker serving `model`, chosen by the routing policy, skipping the ids
    /// in `exclude`.
    pub fn pick(&self, model: &str, exclude: &[String], key: &RouteKey) -> Option<InFlight> {
        let candidates: Vec<Arc<Worker>> =
            self.workers().into_iter().filter(|w| w.is_available() && !exclude.contains(&w.id) && w.serves(model)).collect();
        let turn = self.round_robin.fetch_add(1, Ordering::Relaxed);
        let w = crate::routing::choose(self.policy, &candidates, key, turn)?;
        Some(InFlight::new(w))
    }

    /// Requests in flight across all workers, and how many sequences available workers run at once.
    pub fn load(&self) -> (usize, usize) {
        let ws = self.workers();
        let in_flight = ws.iter().map(|w| w.in_flight.load(Ordering::Relaxed)).sum();
        let capacity = ws.iter().filter(|w| w.is_available()).filter_map(|w| w.model()).map(|m| m.info.max_seqs as usize).sum();
        (in_flight, capacity)
    }
}

fn spawn_checks(w: Arc<Worker>, every: Duration) {
    tokio::spawn(async move {
        while !w.retired.load(Ordering::Relaxed) {
            refresh(Arc::clone(&w)).await;
            tokio::time::sleep(every).await;
        }
    });
}

async fn refresh(w: Arc<Worker>) {
    let mut client = w.client.clone();
    let health = match tokio::time::timeout(Duration::from_secs(2), client.health(pb::HealthRequest {})).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    };
    w.responsive.store(health.is_some(), Ordering::Relaxed);
    let mut healthy = health.as_ref().is_some_and(|h| h.serving) && !w.ejected();
    let model_changed = health.as_ref().is_some_and(|h| w.model().is_none_or(|m| m.info.model_id != h.model_id));
    if healthy && (model_changed || !w.is_healthy()) {
        match tokio::time::timeout(Duration::from_secs(10), fetch_model(&mut client)).await {
            Ok(Ok(m)) => {
                tracing::info!("worker {} ({}) serves `{}`", w.id, w.addr, m.info.model_id);
                *w.model.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(m));
            }
            Ok(Err(e)) => {
                tracing::warn!("worker {}: cannot read its model: {e}", w.id);
                healthy = false;
            }
            Err(_) => healthy = false,
        }
    }
    if healthy {
        if let Ok(Ok(load)) = tokio::time::timeout(Duration::from_secs(2), client.load(pb::LoadRequest {})).await {
            let l = load.into_inner();
            w.set_reported_load(l.running.saturating_add(l.waiting));
        }
    }
    if w.is_healthy() != healthy {
        if healthy {
            tracing::info!("worker {} ({}) is up", w.id, w.addr);
        } else {
            tracing::warn!("worker {} ({}) is down", w.id, w.addr);
        }
    }
    w.healthy.store(healthy, Ordering::Relaxed);
}
