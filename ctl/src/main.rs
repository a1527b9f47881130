//! `kilnctl`: talk to a kiln cluster through its router.

mod chat;
mod cluster;
mod http;
mod load;
mod mcp;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kilnctl", version, about = "kiln's command-line client: chat with a cluster, list its models, check its health")]
struct Cli {
    /// The router's base URL
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    router: String,
    /// API key, when the router requires one (also read from KILN_API_KEY)
    #[arg(long, global = true)]
    api_key: Option<String>,
    /// etcd endpoints, comma-separated: status, workers and models come from the cluster
    /// state; place, unplace, drain and undrain need it
    #[arg(long, global = true, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix of the cluster in etcd
    #[arg(long, global = true, default_value = kiln_cluster::schema::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Machine-readable output (status, workers, models)
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Interactive chat (or one question with -i) streamed from the cluster
    Chat(chat::ChatArgs),
    /// Models the cluster serves (with --etcd: placements and replicas by state)
    Models,
    /// Whether the router is ready, and its workers' state (with --etcd: the cluster's)
    Status,
    /// Load test: concurrent streaming chats, with latency and throughput figures
    Load(load::LoadArgs),
    /// Registered workers: address, model and state, load, labels (needs --etcd)
    Workers,
    /// Ask for MODEL on N workers (needs --etcd)
    Place(cluster::PlaceArgs),
    /// Withdraw a placement; its workers unload the model (needs --etcd)
    Unplace { model: String },
    /// Send a worker nothing new and let its streams finish (needs --etcd)
    Drain { worker: String },
    /// Let a drained worker take requests again (needs --etcd)
    Undrain { worker: String },
    /// Serve the router's MCP endpoint on standard input and output (for MCP hosts that
    /// launch servers as programs)
    Mcp,
    /// Embeddings of texts (arguments, or each line of standard input), one JSON array per line
    Embed(EmbedArgs),
}

#[derive(clap::Args)]
struct EmbedArgs {
    /// An embedding model the cluster serves
    #[arg(short, long, default_value = "minilm")]
    model: String,
    /// Cut texts longer than the model reads instead of failing
    #[arg(long)]
    truncate: bool,
    /// Texts to embed (default: each line of standard input)
    texts: Vec<String>,
}

/// Prints one JSON array per text, in order; texts are sent in requests of up to 64.
async fn embed(client: &http::Client, args: EmbedArgs) -> anyhow::Result<()> {
    use std::io::BufRead;
    let texts = if args.texts.is_empty() { std::io::stdin().lock().lines().collect::<Result<Vec<_>, _>>()? } else { args.texts };
    for chunk in texts.chunks(64) {
        let body = serde_json::json!({"model": args.model, "input": chunk, "truncate": args.truncate});
        let answer = client.post_json("/v1/embeddings", &body).await?;
        for item in answer["data"].as_array().into_iter().flatten() {
            println!("{}", item["embedding"]);
        }
    }
    Ok(())
}

impl Command {
    fn needs_etcd(&self) -> bool {
        matches!(self, Command::Workers | Command::Place(_) | Command::Unplace { .. } | Command::Drain { .. } | Command::Undrain { .. })
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("kilnctl: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let api_key = cli.api_key.or_else(|| std::env::var("KILN_API_KEY").ok());
    let client = http::Client::new(&cli.router, api_key.clone())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if !cli.etcd.is_empty() && matches!(cli.command, Command::Status | Command::Models) || cli.command.needs_etcd() {
        if cli.etcd.is_empty() {
            anyhow::bail!("this command reads the cluster state: give --etcd http://HOST:2379");
        }
        let mut cfg = kiln_cluster::EtcdConfig::new(&cli.etcd);
        cfg.keys = kiln_cluster::Keys::new(&cli.etcd_prefix);
        return runtime.block_on(cluster::run(&cfg, &cli.command, cli.json));
    }
    runtime.block_on(async move {
        match cli.command {
            Command::Chat(args) => chat::run(&client, args).await,
            Command::Mcp => mcp::run(&cli.router, api_key).await,
            Command::Embed(args) => embed(&client, args).await,
            Command::Load(args) => load::run(client, args).await,
            Command::Workers | Command::Place(_) | Command::Unplace { .. } | Command::Drain { .. } | Command::Undrain { .. } => unreachable!("handled above"),
            Command::Models => {
                let models = client.get_json("/v1/models").await?;
                for m in models["data"].as_array().into_iter().flatten() {
                    let kind = match m["dimensions"].as_u64() {
                        Some(d) => format!("embeddings of {d} dimensions, inputs up to {} tokens", m["max_model_len"]),
                        None => format!("context {} tokens", m["max_model_len"]),
                    };
                    println!("{}\t({kind}, {})", m["id"].as_str().unwrap_or("?"), m["architecture"].as_str().unwrap_or("?"));
                }
                Ok(())
            }
            Command::Status => {
                let (status, health) = client.get_text("/health").await?;
                println!("router {}: {}", cli.router, health.trim());
                let (_, metrics) = client.get_text("/metrics").await?;
                for line in metrics.lines().filter(|l| l.starts_with("kiln_router_worker_up") || l.starts_with("kiln_router_in_flight")) {
                    println!("  {line}");
                }
                if status != 200 {
                    anyhow::bail!("the router is not ready");
                }
                Ok(())
            }
        }
    })
}
