//! kiln's router: a stateless HTTP front speaking the OpenAI and Anthropic APIs. It renders
//! chat templates and tokenizes with each model's own tokenizer (learned from the workers),
//! then streams generations from the least-loaded worker over gRPC.

pub mod api;
pub mod error;
pub mod generate;
pub mod metrics;
pub mod membership;
pub mod params;
pub mod routing;
pub mod upstream;

use std::sync::atomic::AtomicBool;

pub struct RouterConfig {
    /// When set, API routes need this key as `Authorization: Bearer` or `x-api-key`.
    pub api_key: Option<String>,
    /// Origins allowed to call from a browser (`*` for any); empty turns CORS off.
    pub cors_origins: Vec<String>,
    /// Requests allowed to wait for a free sequence slot before new ones get 429.
    pub max_queue: usize,
    pub max_body_bytes: usize,
    pub timeouts: generate::Timeouts,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig { api_key: None, cors_origins: Vec::new(), max_queue: 256, max_body_bytes: 32 << 20, timeouts: generate::Timeouts::default() }
    }
}

pub struct AppState {
    pub pool: upstream::WorkerPool,
    pub metrics: metrics::Metrics,
    pub config: RouterConfig,
    /// Set on SIGTERM: health turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
    /// The etcd view membership follows, when the router runs with `--etcd`.
    pub cluster: Option<kiln_cluster::ClusterView>,
}

impl AppState {
    pub fn new(pool: upstream::WorkerPool, config: RouterConfig) -> AppState {
        AppState { pool, metrics: metrics::Metrics::default(), config, draining: AtomicBool::new(false), cluster: None }
    }
}
