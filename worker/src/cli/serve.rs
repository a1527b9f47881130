//! `kiln-worker serve`: the worker daemon. Routers reach it over gRPC; Prometheus scrapes
//! `/metrics` on the optional HTTP address. SIGTERM or Ctrl-C drains: new requests are
//! refused, running streams get a grace period to finish, then the process exits 0.

use kiln_proto::v1::worker_server::WorkerServer;
use kiln_worker::engine::Engine;
use kiln_worker::service::{metrics, WorkerService};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model file, or a known model name (fetched on first use)
    #[arg(short, long, default_value = "smollm2")]
    pub model: String,
    /// Name clients use for the model (default: the known name, or the file's stem)
    #[arg(long)]
    pub model_id: Option<String>,
    /// Address of the gRPC service
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc: SocketAddr,
    /// Address of the HTTP endpoint serving /metrics and /health (off unless given)
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Most sequences computed at once
    #[arg(long, default_value_t = 16)]
    pub max_seqs: usize,
    /// Longest sequence, prompt and output, in tokens (default: the model's, at most 4096)
    #[arg(short = 'c', long)]
    pub ctx_size: Option<usize>,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Seconds running streams may take to finish after SIGTERM
    #[arg(long, default_value_t = 30)]
    pub grace_secs: u64,
    #[command(flatten)]
    pub engine: super::EngineArgs,
}

fn model_id(args: &ServeArgs) -> String {
    if let Some(id) = &args.model_id {
        return id.clone();
    }
    if kiln_worker::assets::known(&args.model).is_some() {
        return args.model.clone();
    }
    std::path::Path::new(&args.model).file_stem().map_or_else(|| args.model.clone(), |s| s.to_string_lossy().into_owned())
}

pub fn main(args: ServeArgs) -> anyhow::Result<()> {
    if args.max_seqs == 0 {
        anyhow::bail!("--max-seqs must be at least 1");
    }
    let model = super::load_model(&args.model, false)?;
    let compute = super::compute(args.threads);
    let engine = Engine::start(Arc::clone(&model), compute, args.engine.config(args.max_seqs, args.ctx_size))?;
    let id = model_id(&args);
    let service = WorkerService::new(engine.clone(), Arc::clone(&model), &id, args.max_seqs)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let grpc = tokio::net::TcpListener::bind(args.grpc).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.grpc))?;
        let http = match args.metrics {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?),
            None => None,
        };
        eprintln!("kiln-worker: serving `{id}` over gRPC on {}", args.grpc);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if let Some(listener) = http {
            eprintln!("kiln-worker: metrics on http://{}/metrics", listener.local_addr()?);
            let (engine, id) = (engine.clone(), id.clone());
            let app = axum::Router::new()
                .route("/metrics", axum::routing::get(move || std::future::ready(metrics::render(&engine, &id))))
                .route("/health", axum::routing::get(|| std::future::ready("ok")));
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).with_graceful_shutdown(async move { while stop.changed().await.is_ok() && !*stop.borrow() {} }).await;
            });
        }
        let mut stop = stop_rx.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder().add_service(
                WorkerServer::new(service).max_encoding_message_size(256 << 20).max_decoding_message_size(64 << 20),
            )
            // Without TCP_NODELAY each small streamed event can wait out a delayed ACK.
            .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)), async move {
                while stop.changed().await.is_ok() && !*stop.borrow() {}
            }),
        );
        super::shutdown_signal().await;
        eprintln!("kiln-worker: draining (up to {} s for running streams)", args.grace_secs);
        let _ = stop_tx.send(true);
        match tokio::time::timeout(Duration::from_secs(args.grace_secs), server).await {
            Ok(_) => eprintln!("kiln-worker: stopped"),
            Err(_) => eprintln!("kiln-worker: grace period over; ending the remaining streams"),
        }
        engine.shutdown();
        Ok::<(), anyhow::Error>(())
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
