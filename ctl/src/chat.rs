//! `kilnctl chat`: a streamed conversation with the cluster. Ctrl-C stops the answer being
//! written (the router cancels it on the worker); at the prompt it quits.

use crate::http::Client;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::io::Write;
use tokio::sync::mpsc;

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Model to talk to (default: the only one served)
    #[arg(short, long)]
    model: Option<String>,
    /// Ask one question, print the answer and exit
    #[arg(short = 'i', long)]
    input: Option<String>,
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 512)]
    max_tokens: u32,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
}

async fn pick_model(client: &Client, asked: Option<String>) -> Result<String> {
    if let Some(m) = asked {
        return Ok(m);
    }
    let models = client.get_json("/v1/models").await?;
    let ids: Vec<&str> = models["data"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_str()).collect();
    match ids.as_slice() {
        [only] => Ok(only.to_string()),
        [] => bail!("the cluster serves no model yet"),
        many => bail!("several models are served ({}); choose one with --model", many.join(", ")),
    }
}

/// Streams one answer to stdout; returns its text (what was shown, if interrupted).
async fn answer(client: &Client, args: &ChatArgs, model: &str, messages: &[Value]) -> Result<String> {
    let mut body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": true,
    });
    if let Some(seed) = args.seed {
        body["seed"] = json!(seed);
    }
    let mut events = client.post_stream("/v1/chat/completions", &body).await?;
    let mut text = String::new();
    let mut stdout = std::io::stdout();
    loop {
        let event = tokio::select! {
            e = events.next() => e?,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("\n[stopped]");
                return Ok(text);
            }
        };
        let Some(data) = event else { break };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&data)?;
        if let Some(msg) = chunk["error"]["message"].as_str() {
            bail!("{msg}");
        }
        if let Some(delta) = chunk["choices"][0]["delta"]["content"].as_str() {
            print!("{delta}");
            stdout.flush()?;
            text.push_str(delta);
        }
    }
    println!();
    Ok(text)
}

/// Lines from stdin, read on their own thread so Ctrl-C can still be awaited.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match std::io::stdin().read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.blocking_send(line.trim_end_matches(['\n', '\r']).to_string()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

pub async fn run(client: &Client, args: ChatArgs) -> Result<()> {
    let model = pick_model(client, args.model.clone()).await?;
    let mut system = args.system.clone();
    let conversation = |system: &Option<String>, turns: &[Value]| -> Vec<Value> {
        system.iter().map(|s| json!({ "role": "system", "content": s })).chain(turns.iter().cloned()).collect()
    };
    if let Some(question) = &args.input {
        answer(client, &args, &model, &conversation(&system, &[json!({ "role": "user", "content": question })])).await?;
        return Ok(());
    }
    eprintln!("kilnctl: chatting with `{model}` — /clear, /system TEXT, /exit; Ctrl-C stops an answer");
    let mut turns: Vec<Value> = Vec::new();
    let mut lines = stdin_lines();
    loop {
        eprint!("> ");
        let line = tokio::select! {
            l = lines.recv() => l,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else {
            eprintln!();
            return Ok(());
        };
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/clear" => {
                turns.clear();
                eprintln!("[history cleared]");
                continue;
            }
            cmd if cmd.starts_with("/system") => {
                system = Some(cmd.trim_start_matches("/system").trim().to_string()).filter(|s| !s.is_empty());
                turns.clear();
                eprintln!("[system prompt set; history cleared]");
                continue;
            }
            _ => {}
        }
        turns.push(json!({ "role": "user", "content": line }));
        match answer(client, &args, &model, &conversation(&system, &turns)).await {
            Ok(text) => turns.push(json!({ "role": "assistant", "content": text })),
            Err(e) => {
                turns.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
}
