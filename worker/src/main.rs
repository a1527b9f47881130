//! `kiln-worker`: run, benchmark and fetch models on this machine.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "kiln-worker", version, about = "kiln worker: run GGUF language models on this machine")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat with a model, or complete one prompt (-i)
    Run(cli::run::RunArgs),
    /// Run the worker daemon: serve a model over gRPC to kiln routers
    Serve(cli::serve::ServeArgs),
    /// Fetch a known model (smollm2, gemma3) and print its path
    Pull(cli::pull::PullArgs),
    /// Measure prefill and decode speed (like llama-bench)
    Bench(cli::bench::BenchArgs),
    /// Show a model file's metadata, tensors and chat template
    Info(cli::info::InfoArgs),
    /// Write a Hugging Face checkpoint as a GGUF file with quantized projection weights
    Quantize(cli::quantize::QuantizeArgs),
    /// Render a chat template for a conversation (a model's, or a template file)
    Template(cli::template::TemplateArgs),
    /// Teacher-forced top logits and greedy continuations of fixed token sequences, as JSON
    /// (to compare devices and implementations)
    Eval(cli::eval::EvalArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let device = match &args.command {
        Command::Run(a) => Some(&a.engine.device),
        Command::Serve(a) => Some(&a.engine.device),
        Command::Bench(a) => Some(&a.engine.device),
        Command::Eval(a) => Some(&a.engine.device),
        _ => None,
    };
    if let Some(Err(e)) = device.map(cli::cuda::hand_over) {
        eprintln!("error: {}", cli::describe(&e));
        return ExitCode::FAILURE;
    }
    let result = match args.command {
        Command::Run(a) => cli::run::main(a),
        Command::Serve(a) => cli::serve::main(a),
        Command::Pull(a) => cli::pull::main(a),
        Command::Bench(a) => cli::bench::main(a),
        Command::Info(a) => cli::info::main(a),
        Command::Quantize(a) => cli::quantize::main(a),
        Command::Template(a) => cli::template::main(a),
        Command::Eval(a) => cli::eval::main(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::describe(&e));
            ExitCode::FAILURE
        }
    }
}
