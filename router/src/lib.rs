//! kiln's router: a stateless HTTP front speaking the OpenAI and Anthropic APIs. It renders
//! chat templates and tokenizes with each model's own tokenizer (learned from the workers),
//! then streams generations from the least-loaded worker over gRPC.

pub mod api;
pub mod error;
pub mod generate;
pub mod heap;
pub mod mcp;
pub mod metrics;
pub mod membership;
pub mod params;
pub mod routing;
pub mod serve;
pub mod tools;
pub mod upstream;

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

pub struct RouterConfig {
    /// When set, API routes need this key as `Authorization: Bearer` or `x-api-key`.
    pub api_key: Option<String>,
    /// Origins allowed to call from a browser (`*` for any); empty turns CORS off.
    pub cors_origins: Vec<String>,
    /// Requests allowed to wait for a free sequence slot before new ones get 429.
    pub max_queue: usize,
    pub limits: Limits,
    pub timeouts: generate::Timeouts,
    /// Rounds of MCP tool calls one request may run before the model must answer.
    pub max_tool_rounds: usize,
    /// Whether image parts may name http(s) URLs for the router to fetch, and how long a
    /// fetch may take (off by default: it lets clients make the router fetch any address).
    pub image_urls: Option<std::time::Duration>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            api_key: None,
            cors_origins: Vec::new(),
            max_queue: 256,
            limits: Limits::default(),
            timeouts: generate::Timeouts::default(),
            max_tool_rounds: 8,
            image_urls: None,
        }
    }
}

/// What one request may ask for; past a limit the answer is an error in the API's shape
/// naming the limit (413 for the body, 408 for a body that does not arrive, 400 otherwise).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Time a client may take to send a request's headers (also while its keep-alive
    /// connection is idle) and, separately, its body.
    pub client_timeout: std::time::Duration,
    pub max_messages: usize,
    /// Completions per request (`n`).
    pub max_n: u32,
    pub max_stop_sequences: usize,
    /// Bytes in one stop sequence.
    pub max_stop_bytes: usize,
    /// Tokens one completion may generate (asked for, or given to a request that names no
    /// budget); the model's context length when unset.
    pub max_tokens: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 32 << 20,
            client_timeout: std::time::Duration::from_secs(30),
            max_messages: 4096,
            max_n: 16,
            max_stop_sequences: 16,
            max_stop_bytes: 512,
            max_tokens: None,
        }
    }
}

pub struct AppState {
    pub pool: upstream::WorkerPool,
    pub metrics: Arc<metrics::Metrics>,
    pub config: RouterConfig,
    /// Set on SIGTERM: health turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
    /// The etcd view membership follows, when the router runs with `--etcd`.
    pub cluster: Option<kiln_cluster::ClusterView>,
    /// The MCP servers of `--mcp-config`, whose tools requests may opt into.
    pub mcp: Option<Arc<mcp::client::McpHub>>,
    /// Requests in an MCP tool loop: between rounds they have nothing on a worker, but a
    /// draining router must still wait for them.
    pub tool_loops: AtomicUsize,
}

impl AppState {
    pub fn new(pool: upstream::WorkerPool, config: RouterConfig) -> AppState {
        AppState { pool, metrics: Arc::default(), config, draining: AtomicBool::new(false), cluster: None, mcp: None, tool_loops: AtomicUsize::new(0) }
    }
}
