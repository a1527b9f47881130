//! `kiln-router`: serves the OpenAI- and Anthropic-compatible HTTP API over kiln workers.

use anyhow::Context;
use clap::Parser;
use kiln_router::generate::Timeouts;
use kiln_router::routing::Policy;
use kiln_router::upstream::WorkerPool;
use kiln_router::{api, AppState, Limits, RouterConfig};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "kiln-router", version, about = "kiln's HTTP router: OpenAI- and Anthropic-compatible APIs over gRPC workers")]
struct Args {
    /// Worker gRPC addresses, comma-separated (host:port): static membership
    #[arg(long, value_delimiter = ',', required_unless_present = "etcd", env = "KILN_ROUTER_WORKERS")]
    workers: Vec<String>,
    /// etcd endpoints, comma-separated: follow the cluster's registered workers
    #[arg(long, value_delimiter = ',', env = "KILN_ROUTER_ETCD")]
    etcd: Vec<String>,
    /// Key prefix of the cluster in etcd
    #[arg(long, default_value = kiln_cluster::schema::DEFAULT_PREFIX, env = "KILN_ROUTER_ETCD_PREFIX")]
    etcd_prefix: String,
    /// Routing policy: prefix (cache-aware, with x-session-id affinity), least-loaded, round-robin
    #[arg(long, default_value = "prefix", env = "KILN_ROUTER_POLICY")]
    policy: Policy,
    /// Seconds a worker may take to start streaming a request before another is tried
    #[arg(long, default_value_t = 120.0, env = "KILN_ROUTER_FIRST_TOKEN_TIMEOUT_SECS")]
    first_token_timeout_secs: f64,
    /// Seconds without progress after which a generation moves to another worker
    #[arg(long, default_value_t = 30.0, env = "KILN_ROUTER_STALL_TIMEOUT_SECS")]
    stall_timeout_secs: f64,
    /// Seconds a worker that failed or stalled stays out before health checks may readmit it
    #[arg(long, default_value_t = 5.0, env = "KILN_ROUTER_EJECT_SECS")]
    eject_secs: f64,
    #[arg(long, default_value = "127.0.0.1", env = "KILN_ROUTER_HOST")]
    host: String,
    #[arg(long, default_value_t = 8080, env = "KILN_ROUTER_PORT")]
    port: u16,
    /// Require this key on API routes (also read from KILN_API_KEY)
    #[arg(long)]
    api_key: Option<String>,
    /// Read the API key from this file, such as a mounted secret (also KILN_API_KEY_FILE);
    /// surrounding whitespace is ignored
    #[arg(long, conflicts_with = "api_key")]
    api_key_file: Option<std::path::PathBuf>,
    /// Allow browser calls from this origin (repeatable; `*` allows any)
    #[arg(long = "cors-allow-origin", value_delimiter = ',', env = "KILN_ROUTER_CORS_ALLOW_ORIGIN")]
    cors_origins: Vec<String>,
    /// Requests that may wait for a free sequence slot before new ones are refused with 429
    #[arg(long, default_value_t = 256, env = "KILN_ROUTER_MAX_QUEUE")]
    max_queue: usize,
    /// Seconds in-flight requests may take to finish after SIGTERM
    #[arg(long, default_value_t = 30, env = "KILN_ROUTER_GRACE_SECS")]
    grace_secs: u64,
    /// Largest request body accepted (bytes); larger ones get 413
    #[arg(long, default_value_t = 32 << 20, env = "KILN_ROUTER_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// Seconds a client may take to send a request's headers (also while idle between
    /// keep-alive requests) and, separately, its body
    #[arg(long, default_value_t = 30.0, env = "KILN_ROUTER_CLIENT_TIMEOUT_SECS")]
    client_timeout_secs: f64,
    /// Most messages in one chat request
    #[arg(long, default_value_t = 4096, env = "KILN_ROUTER_MAX_MESSAGES")]
    max_messages: usize,
    /// Most completions one request may ask for (`n`)
    #[arg(long, default_value_t = 16, env = "KILN_ROUTER_MAX_N")]
    max_n: u32,
    /// Most stop sequences in one request
    #[arg(long, default_value_t = 16, env = "KILN_ROUTER_MAX_STOP_SEQUENCES")]
    max_stop_sequences: usize,
    /// Longest stop sequence, in bytes
    #[arg(long, default_value_t = 512, env = "KILN_ROUTER_MAX_STOP_BYTES")]
    max_stop_bytes: usize,
    /// Most tokens one completion may generate: more asked for is a 400, and a request that
    /// names no budget gets this one (default: the model's context length)
    #[arg(long, env = "KILN_ROUTER_MAX_TOKENS")]
    max_tokens: Option<u32>,
    /// MCP servers whose tools requests may use (`"mcp": true` or a list of server names in
    /// the body): JSON in the `mcpServers` shape desktop hosts use (docs/api.md)
    #[arg(long, env = "KILN_ROUTER_MCP_CONFIG")]
    mcp_config: Option<std::path::PathBuf>,
    /// Rounds of MCP tool calls one request may run before the model must answer in text
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64), env = "KILN_ROUTER_MAX_TOOL_ROUNDS")]
    max_tool_rounds: u32,
    /// Fetch images that requests name by http(s) URL (off: only inline data: URLs and base64).
    /// The router then fetches whatever address a client names, internal ones included
    #[arg(long, env = "KILN_ROUTER_ALLOW_IMAGE_URLS")]
    allow_image_urls: bool,
    /// Seconds one image fetch may take, connection to last byte
    #[arg(long, default_value_t = 10.0, env = "KILN_ROUTER_IMAGE_URL_TIMEOUT_SECS")]
    image_url_timeout_secs: f64,
    /// Seconds an MCP server may take to start and list its tools, and to answer a ping
    #[arg(long, default_value_t = 10.0, env = "KILN_ROUTER_MCP_CONNECT_TIMEOUT_SECS")]
    mcp_connect_timeout_secs: f64,
    /// Seconds one MCP tool call may take; past it the model reads a timeout as the result
    #[arg(long, default_value_t = 60.0, env = "KILN_ROUTER_MCP_CALL_TIMEOUT_SECS")]
    mcp_call_timeout_secs: f64,
    /// Log lines as `text` or `json` (filtered by RUST_LOG; traces go to OTLP when
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set)
    #[arg(long, default_value = "text", env = "KILN_ROUTER_LOG_FORMAT")]
    log_format: kiln_telemetry::LogFormat,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot watch for SIGTERM ({e}); Ctrl-C still stops the router");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn secs(flag: &str, v: f64) -> anyhow::Result<Duration> {
    if !(v.is_finite() && v > 0.0) {
        anyhow::bail!("{flag} must be a positive number of seconds, not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// The API key from the flag, else a key file (flag or KILN_API_KEY_FILE), else KILN_API_KEY.
/// An empty or unreadable key file is an error rather than an open router.
fn api_key(flag: Option<String>, file: Option<std::path::PathBuf>) -> anyhow::Result<Option<String>> {
    if let Some(k) = flag.filter(|k| !k.is_empty()) {
        return Ok(Some(k));
    }
    if let Some(path) = file.or_else(|| std::env::var_os("KILN_API_KEY_FILE").filter(|v| !v.is_empty()).map(Into::into)) {
        let key = std::fs::read_to_string(&path).with_context(|| format!("cannot read the API key file {}", path.display()))?;
        let key = key.trim();
        anyhow::ensure!(!key.is_empty(), "the API key file {} is empty", path.display());
        return Ok(Some(key.to_string()));
    }
    Ok(std::env::var("KILN_API_KEY").ok().filter(|k| !k.is_empty()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = RouterConfig {
        api_key: api_key(args.api_key.clone(), args.api_key_file.clone())?,
        cors_origins: args.cors_origins,
        max_queue: args.max_queue,
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            client_timeout: secs("--client-timeout-secs", args.client_timeout_secs)?,
            max_messages: args.max_messages,
            max_n: args.max_n.max(1),
            max_stop_sequences: args.max_stop_sequences,
            max_stop_bytes: args.max_stop_bytes,
            max_tokens: args.max_tokens,
        },
        timeouts: Timeouts {
            first_token: secs("--first-token-timeout-secs", args.first_token_timeout_secs)?,
            stall: secs("--stall-timeout-secs", args.stall_timeout_secs)?,
            eject: secs("--eject-secs", args.eject_secs)?,
        },
        max_tool_rounds: args.max_tool_rounds as usize,
        image_urls: match args.allow_image_urls {
            true => Some(secs("--image-url-timeout-secs", args.image_url_timeout_secs)?),
            false => None,
        },
    };
    let mcp_servers = match &args.mcp_config {
        Some(path) => Some(kiln_router::mcp::client::load(path)?),
        None => None,
    };
    let mcp_settings = kiln_router::mcp::client::Settings {
        connect_timeout: secs("--mcp-connect-timeout-secs", args.mcp_connect_timeout_secs)?,
        call_timeout: secs("--mcp-call-timeout-secs", args.mcp_call_timeout_secs)?,
        ..Default::default()
    };
    let client_timeout = config.limits.client_timeout;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let telemetry = {
        let _in_runtime = runtime.enter();
        kiln_telemetry::init("kiln-router", args.log_format)?
    };
    runtime.block_on(async move {
        // Channels are built inside the runtime: they spawn their connection tasks on it.
        let mut pool = WorkerPool::new(&args.workers).map_err(anyhow::Error::msg)?.with_policy(args.policy);
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        pool.refresh_all().await;
        pool.spawn_refresh(Duration::from_secs(1));
        let mut state = AppState::new(pool.clone(), config);
        if !args.etcd.is_empty() {
            let mut cfg = kiln_cluster::EtcdConfig::new(&args.etcd);
            cfg.keys = kiln_cluster::Keys::new(&args.etcd_prefix);
            let view = kiln_cluster::ClusterView::spawn(cfg);
            if !view.synced(Duration::from_secs(5)).await {
                tracing::warn!("etcd at {} is not answering yet; serving the static workers until it does", args.etcd.join(","));
            }
            tokio::spawn(kiln_router::membership::follow(view.clone(), pool.clone(), args.workers.clone()));
            state.cluster = Some(view);
        }
        if let Some(servers) = mcp_servers {
            let wait = mcp_settings.connect_timeout + Duration::from_secs(1);
            let hub = kiln_router::mcp::client::McpHub::start(servers, mcp_settings, Arc::clone(&state.metrics));
            // Requests right after start-up should see the tools of servers that come up;
            // one that hangs or fails delays start-up by its connect timeout at most.
            hub.settled(wait).await;
            for r in hub.report() {
                tracing::info!("MCP server `{}`: {}", r.name, r.detail);
            }
            state.mcp = Some(hub);
        }
        let state = Arc::new(state);
        let app = api::router(Arc::clone(&state));
        tracing::info!("listening on http://{}", listener.local_addr()?);
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(kiln_router::serve::serve(listener, app, client_timeout, async move {
            while stop_rx.changed().await.is_ok() && !*stop_rx.borrow() {}
        }));
        shutdown_signal().await;
        // Draining: the listener stays open so probes see /health turn 503 and new API
        // requests get a 503 to retry elsewhere, while generations in flight finish.
        tracing::info!("draining (up to {} s for in-flight requests)", args.grace_secs);
        state.draining.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.grace_secs);
        while (state.pool.load().0 > 0 || state.tool_loops.load(Ordering::Relaxed) > 0) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop_tx.send(true);
        match tokio::time::timeout_at(deadline.max(tokio::time::Instant::now() + Duration::from_secs(1)), server).await {
            Ok(_) => tracing::info!("stopped"),
            Err(_) => tracing::warn!("grace period over; closing the remaining requests"),
        }
        Ok::<(), anyhow::Error>(())
    })?;
    // Exports the last spans while the runtime still runs the exporter's connection.
    {
        let _in_runtime = runtime.enter();
        drop(telemetry);
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
