//! `kilnctl`: talk to a kiln cluster through its router.

mod chat;
mod http;
mod load;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Interactive chat (or one question with -i) streamed from the cluster
    Chat(chat::ChatArgs),
    /// Models the cluster serves
    Models,
    /// Whether the router is ready, and its workers' state
    Status,
    /// Load test: concurrent streaming chats, with latency and throughput figures
    Load(load::LoadArgs),
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("kilnctl: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let client = http::Client::new(&cli.router, cli.api_key.or_else(|| std::env::var("KILN_API_KEY").ok()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Chat(args) => chat::run(&client, args).await,
            Command::Load(args) => load::run(client, args).await,
            Command::Models => {
                let models = client.get_json("/v1/models").await?;
                for m in models["data"].as_array().into_iter().flatten() {
                    println!("{}\t(context {} tokens, {})", m["id"].as_str().unwrap_or("?"), m["max_model_len"], m["architecture"].as_str().unwrap_or("?"));
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
