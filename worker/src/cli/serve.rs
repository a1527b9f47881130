//! `kiln-worker serve`: the worker daemon. Routers reach it over gRPC; Prometheus scrapes
//! `/metrics` on the optional HTTP address. With `--etcd` it registers itself in the cluster
//! and, when started without `-m`, hosts whatever placement assigns it. SIGTERM or Ctrl-C
//! drains: new requests are refused, running streams get a grace period, the worker
//! deregisters and exits 0.

use super::placement::{self, Hosting};
use kiln_cluster::{EtcdConfig, LoadSummary, ModelPhase, ModelStatus, WorkerRecord, SCHEMA_VERSION};
use kiln_proto::v1::worker_server::WorkerServer;
use kiln_worker::engine::Engine;
use kiln_worker::parallel::{Collective, TpConfig};
use kiln_worker::service::{metrics, ModelSlot, Serving, WorkerService};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model file, or a known model name (fetched on first use). Without it, a worker given
    /// --etcd hosts what placement assigns; otherwise it serves smollm2.
    #[arg(short, long, env = "KILN_WORKER_MODEL")]
    pub model: Option<String>,
    /// Name clients use for the model (default: the known name, or the file's stem)
    #[arg(long, env = "KILN_WORKER_MODEL_ID")]
    pub model_id: Option<String>,
    /// Address of the gRPC service
    #[arg(long, default_value = "127.0.0.1:50051", env = "KILN_WORKER_GRPC")]
    pub grpc: SocketAddr,
    /// Address of the HTTP endpoint serving /metrics and /health (off unless given)
    #[arg(long, env = "KILN_WORKER_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Most sequences computed at once
    #[arg(long, default_value_t = 16, env = "KILN_WORKER_MAX_SEQS")]
    pub max_seqs: usize,
    /// Longest sequence, prompt and output, in tokens (default: the model's, at most 4096)
    #[arg(short = 'c', long, env = "KILN_WORKER_CTX_SIZE")]
    pub ctx_size: Option<usize>,
    /// Compute threads (default: the CPUs this process may use)
    #[arg(short = 't', long, env = "KILN_WORKER_THREADS")]
    pub threads: Option<usize>,
    /// Seconds running streams may take to finish after SIGTERM
    #[arg(long, default_value_t = 30, env = "KILN_WORKER_GRACE_SECS")]
    pub grace_secs: u64,
    /// etcd endpoints, comma-separated: register in the cluster and follow placement
    #[arg(long, value_delimiter = ',', env = "KILN_WORKER_ETCD")]
    pub etcd: Vec<String>,
    /// Key prefix of the cluster in etcd
    #[arg(long, default_value = kiln_cluster::schema::DEFAULT_PREFIX, env = "KILN_WORKER_ETCD_PREFIX")]
    pub etcd_prefix: String,
    /// This worker's name in the cluster (default: host name and gRPC port)
    #[arg(long, env = "KILN_WORKER_ID")]
    pub worker_id: Option<String>,
    /// gRPC address routers should dial (default: --grpc; when that is every interface, the
    /// local address that reaches etcd)
    #[arg(long, env = "KILN_WORKER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Labels placement can select on, as key=value (repeatable)
    #[arg(long = "label", value_parser = parse_label, value_delimiter = ',', env = "KILN_WORKER_LABELS")]
    pub labels: Vec<(String, String)>,
    /// Seconds the registration outlives the worker if it dies without deregistering
    #[arg(long, default_value_t = 5, env = "KILN_WORKER_LEASE_TTL")]
    pub lease_ttl: i64,
    /// Log lines as `text` or `json` (filtered by RUST_LOG; traces go to OTLP when
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set)
    #[arg(long, default_value = "text", env = "KILN_WORKER_LOG_FORMAT")]
    pub log_format: kiln_telemetry::LogFormat,
    /// Embedding models: most tokens one pass embeds (queued requests join a pass while they fit)
    #[arg(long, default_value_t = 8192, env = "KILN_WORKER_EMBED_BATCH_TOKENS")]
    pub embed_batch_tokens: usize,
    /// Embedding models: requests that may wait for a pass before new ones are refused
    #[arg(long, default_value_t = 256, env = "KILN_WORKER_EMBED_QUEUE")]
    pub embed_queue: usize,
    /// Where this worker listens for its group's traffic when placement makes it rank 0 of
    /// a tensor-parallel group (default: the gRPC host, the gRPC port + 1); published in its
    /// record with the advertised host
    #[arg(long, env = "KILN_WORKER_TP_LISTEN")]
    pub tp_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub engine: super::EngineArgs,
}

impl ServeArgs {
    /// The address this worker binds as rank 0 of a placed group.
    pub fn tp_listen_addr(&self) -> String {
        self.tp_listen.unwrap_or_else(|| SocketAddr::new(self.grpc.ip(), self.grpc.port().wrapping_add(1))).to_string()
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not key=value"))?;
    if k.is_empty() {
        return Err(format!("`{s}` has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

pub fn model_id(model: &str, explicit: Option<&str>) -> String {
    if let Some(id) = explicit {
        return id.to_string();
    }
    if kiln_worker::assets::known(model).is_some() {
        return model.to_string();
    }
    std::path::Path::new(model).file_stem().map_or_else(|| model.to_string(), |s| s.to_string_lossy().into_owned())
}

/// Loads `source` and starts an engine on it (blocking: reads the model file): the
/// generation engine, or for an embedding model the embedding queue.
pub fn load_serving(args: &ServeArgs, source: &str, id: &str, tp: Option<&TpConfig>) -> anyhow::Result<(Serving, Option<Arc<dyn Collective>>)> {
    let path = kiln_worker::assets::resolve(source, &mut |msg| eprintln!("kiln: {msg}"))?;
    let compute = super::compute(args.threads);
    if path.is_dir() && kiln_worker::embedding::is_embedding_dir(&path) {
        let embedder = Arc::new(kiln_worker::embedding::Embedder::load(&path)?);
        eprintln!(
            "kiln: loaded {} ({}, {} dimensions, {} pooling{}, inputs up to {} tokens) from {}",
            embedder.name,
            embedder.architecture,
            embedder.dimensions(),
            embedder.pooling.pooling.name(),
            if embedder.pooling.normalize { ", normalized" } else { "" },
            embedder.pooling.max_tokens,
            path.display()
        );
        let queue = kiln_worker::embed_queue::EmbedQueue::start(embedder, compute, args.embed_batch_tokens, args.embed_queue)?;
        if tp.is_some() {
            anyhow::bail!("{} is an embedding model, which kiln does not split over tensor-parallel ranks", path.display());
        }
        return Ok((Serving::embedding(Arc::new(queue), id, args.max_seqs)?, None));
    }
    let model = super::load_model(&path.to_string_lossy(), false, args.engine.isq, tp, args.engine.mmproj.as_deref(), &args.engine.device)?;
    let group = model.group.clone();
    let engine = Engine::start(Arc::clone(&model), compute, args.engine.config(args.max_seqs, args.ctx_size))?;
    Ok((Serving::new(engine, model, id, args.max_seqs)?, group))
}

fn worker_id(args: &ServeArgs) -> String {
    args.worker_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let host = if host.is_empty() { "worker".to_string() } else { host };
        format!("{host}-{}", args.grpc.port())
    })
}

fn advertised(args: &ServeArgs) -> anyhow::Result<String> {
    if let Some(a) = &args.advertise {
        return Ok(a.clone());
    }
    if args.grpc.ip().is_unspecified() {
        // Listening on every interface (as in a container): routers reach this host on the
        // address it reaches etcd from, which is on the cluster's network.
        return match args.etcd.iter().find_map(|e| local_address_towards(e)) {
            Some(ip) => Ok(std::net::SocketAddr::new(ip, args.grpc.port()).to_string()),
            None => anyhow::bail!(
                "--grpc {} listens on every interface and no local address routes to etcd ({}); give --advertise HOST:PORT for routers to dial",
                args.grpc,
                args.etcd.join(",")
            ),
        };
    }
    Ok(args.grpc.to_string())
}

/// The local address the system would send from to reach `endpoint` (an etcd URL or
/// host:port): a UDP socket's connect picks the route and sends nothing.
fn local_address_towards(endpoint: &str) -> Option<std::net::IpAddr> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let hostport = endpoint.split("://").last()?.trim_end_matches('/');
    let target = hostport.to_socket_addrs().ok()?.next()?;
    let socket = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
    socket.connect(target).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// Rank 0 of a group started by hand: when a rank dies the group cannot serve again, so the
/// worker stops serving and exits 1 for its supervisor to restart the group.
fn watch_static_group(group: Arc<dyn Collective>, slot: Arc<ModelSlot>) {
    super::tp::watch(group, || true, move |e| {
        tracing::error!("the tensor-parallel group failed: {e}; exiting");
        eprintln!("kiln-worker: the tensor-parallel group failed: {e}; exiting");
        if let Some(s) = slot.replace(None) {
            s.shutdown();
        }
        std::process::exit(1);
    });
}

/// The group address other ranks dial: the advertised gRPC host with the group port.
fn tp_advertised(grpc_advertised: &str, args: &ServeArgs) -> String {
    let port = args.tp_listen.map_or(args.grpc.port().wrapping_add(1), |a| a.port());
    let host = grpc_advertised.rsplit_once(':').map_or(grpc_advertised, |(h, _)| h);
    format!("{host}:{port}")
}

/// The record this worker publishes, read fresh each time.
fn record(id: &str, addr: &str, args: &ServeArgs, slot: &ModelSlot, hosting: &Hosting) -> WorkerRecord {
    let serving = slot.get();
    let load = serving.as_ref().map_or_else(LoadSummary::default, |s| match s.engine() {
        Some(engine) => {
            let st = engine.stats();
            LoadSummary {
                running: st.scheduler.running as u32,
                waiting: st.scheduler.waiting as u32,
                kv_blocks_used: st.blocks.first().map_or(0, |b| b.in_use as u32),
                kv_blocks_total: st.blocks.first().map_or(0, |b| b.num_blocks as u32),
            }
        }
        None => {
            let (running, waiting) = s.load();
            LoadSummary { running: running as u32, waiting: waiting as u32, ..LoadSummary::default() }
        }
    });
    WorkerRecord {
        schema: SCHEMA_VERSION,
        id: id.to_string(),
        addr: addr.to_string(),
        labels: {
            // Placement can ask for GPU workers: `device` is cpu or cuda unless set by hand.
            let mut labels = args.labels.iter().cloned().collect::<BTreeMap<_, _>>();
            labels.entry("device".into()).or_insert_with(|| args.engine.device.kind().into());
            labels
        },
        placeable: args.model.is_none(),
        model: hosting.status(),
        max_seqs: args.max_seqs as u32,
        load,
        tp_addr: args.model.is_none().then(|| tp_advertised(addr, args)),
        group: hosting.role(),
    }
}

/// The standard gRPC health service (grpc.health.v1, as Kubernetes' grpc probes and
/// grpc_health_probe ask it): the empty service name is SERVING while the process runs and is
/// not draining (liveness); `kiln.v1.Worker` is SERVING only while a model is loaded as well
/// (readiness). Placement loads and unloads models at any time, so the state is re-read every
/// half second rather than pushed from each place that changes it.
fn spawn_health(
    slot: Arc<ModelSlot>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    use tonic_health::ServingStatus;
    let (reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let worker = <WorkerServer<WorkerService> as tonic::server::NamedService>::NAME;
        loop {
            let draining = *stop.borrow() || slot.refuse_new.load(Ordering::Relaxed);
            let alive = if draining { ServingStatus::NotServing } else { ServingStatus::Serving };
            let ready = if !draining && slot.get().is_some() { ServingStatus::Serving } else { ServingStatus::NotServing };
            reporter.set_service_status("", alive).await;
            reporter.set_service_status(worker, ready).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                changed = stop.changed() => if changed.is_err() { break },
            }
        }
    });
    service
}

pub fn main(args: ServeArgs) -> anyhow::Result<()> {
    if args.max_seqs == 0 {
        anyhow::bail!("--max-seqs must be at least 1");
    }
    if args.engine.tp.is_follower() {
        let Some(model) = &args.model else { anyhow::bail!("a tensor-parallel rank other than 0 needs --model") };
        return super::tp::follow(model, args.engine.isq, args.threads, &args.engine.tp);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let telemetry = {
        let _in_runtime = runtime.enter();
        kiln_telemetry::init("kiln-worker", args.log_format)?
    };
    let placed = args.model.is_none() && !args.etcd.is_empty();
    let slot = Arc::new(ModelSlot::default());
    let hosting = Arc::new(Hosting::default());
    if !placed {
        let source = args.model.clone().unwrap_or_else(|| "smollm2".into());
        let id = model_id(&source, args.model_id.as_deref());
        let tp = args.engine.tp.config()?;
        let (serving, group) = load_serving(&args, &source, &id, tp.as_ref())?;
        slot.replace(Some(Arc::new(serving)));
        if let Some(group) = group {
            watch_static_group(group, Arc::clone(&slot));
        }
        hosting.set(Some(ModelStatus { id, phase: ModelPhase::Ready, reason: None }));
    }
    let service = WorkerService::with_slot(Arc::clone(&slot));
    let (worker_id, addr) = (worker_id(&args), advertised(&args)?);
    let args = Arc::new(args);
    runtime.block_on(async move {
        let grpc = tokio::net::TcpListener::bind(args.grpc).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.grpc))?;
        let http = match args.metrics {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?),
            None => None,
        };
        match hosting.status() {
            Some(m) => tracing::info!("serving `{}` over gRPC on {}", m.id, args.grpc),
            None => tracing::info!("gRPC on {}; waiting for placement", args.grpc),
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if let Some(listener) = http {
            tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
            let slot = Arc::clone(&slot);
            let app = axum::Router::new()
                .route("/metrics", axum::routing::get(move || std::future::ready(slot.get().map(|s| metrics::render(&s)).unwrap_or_default())))
                .route("/health", axum::routing::get(|| std::future::ready("ok")));
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).with_graceful_shutdown(async move { while stop.changed().await.is_ok() && !*stop.borrow() {} }).await;
            });
        }
        let cluster = if args.etcd.is_empty() {
            None
        } else {
            let mut cfg = EtcdConfig::new(&args.etcd);
            cfg.keys = kiln_cluster::Keys::new(&args.etcd_prefix);
            let view = kiln_cluster::ClusterView::spawn(cfg.clone());
            tokio::spawn(placement::follow(view.clone(), worker_id.clone(), Arc::clone(&args), Arc::clone(&slot), Arc::clone(&hosting), placed));
            let (id, a, s, h, ar) = (worker_id.clone(), addr.clone(), Arc::clone(&slot), Arc::clone(&hosting), Arc::clone(&args));
            let reg = kiln_cluster::registration::Registration::spawn(cfg, args.lease_ttl, Duration::from_secs(1), move || record(&id, &a, &ar, &s, &h));
            Some(reg)
        };
        let health = spawn_health(Arc::clone(&slot), stop_rx.clone());
        let mut stop = stop_rx.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(WorkerServer::new(service).max_encoding_message_size(256 << 20).max_decoding_message_size(64 << 20))
                // Without TCP_NODELAY each small streamed event can wait out a delayed ACK.
                .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)), async move {
                    while stop.changed().await.is_ok() && !*stop.borrow() {}
                }),
        );
        super::shutdown_signal().await;
        tracing::info!("draining (up to {} s for running streams)", args.grace_secs);
        slot.refuse_new.store(true, Ordering::Relaxed);
        if let Some(reg) = cluster {
            reg.shutdown().await;
        }
        let _ = stop_tx.send(true);
        match tokio::time::timeout(Duration::from_secs(args.grace_secs), server).await {
            Ok(_) => tracing::info!("stopped"),
            Err(_) => tracing::warn!("grace period over; ending the remaining streams"),
        }
        if let Some(s) = slot.replace(None) {
            s.shutdown();
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
