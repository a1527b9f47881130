//! `kiln-worker run`: an interactive chat, or one completion with `-i`; `--embed` prints
//! embeddings instead.

use kiln_shared::chat::ChatMessage;
use kiln_shared::sampling::SamplingParams;
use kiln_worker::constraint::{Constraint, GrammarSpec, Grammars};
use kiln_worker::engine::{Engine, EngineHandle, Event, FinishReason, GenerationRequest, Usage};
use kiln_worker::loader::LoadedModel;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Model file, or a known model name (smollm2, gemma3) fetched on first use
    #[arg(short, long, default_value = "smollm2")]
    pub model: String,
    /// Answer this one prompt and exit; only the answer goes to stdout
    #[arg(short = 'i', long = "input")]
    pub input: Option<String>,
    /// Complete the text as is, without the chat template
    #[arg(long)]
    pub raw: bool,
    /// System prompt for chat
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate (default: until the model stops or the context is full)
    #[arg(short = 'n', long)]
    pub max_tokens: Option<usize>,
    /// 0 means greedy [default: the model's generation_config.json, else 0.8]
    #[arg(long)]
    pub temperature: Option<f32>,
    /// 0 disables [default: generation_config.json, else 40]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// 1 disables [default: generation_config.json, else 0.95]
    #[arg(long)]
    pub top_p: Option<f32>,
    /// 0 disables [default: generation_config.json, else 0.05]
    #[arg(long)]
    pub min_p: Option<f32>,
    /// 1 disables [default: generation_config.json, else 1.0]
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Tokens the repetition penalty looks back over
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable)
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Context window in tokens (default: the model's, at most 4096)
    #[arg(short = 'c', long)]
    pub ctx_size: Option<usize>,
    #[command(flatten)]
    pub engine: super::EngineArgs,
    /// Compute threads (default: all cores)
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Keep generating past end-of-generation tokens
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print timings after each answer
    #[arg(short, long)]
    pub verbose: bool,
    /// Answers are JSON valid against the JSON Schema in this file
    #[arg(long, value_name = "FILE", conflicts_with_all = ["regex", "grammar"])]
    pub json_schema: Option<std::path::PathBuf>,
    /// Answers are matched in full by this regular expression
    #[arg(long, conflicts_with = "grammar")]
    pub regex: Option<String>,
    /// Answers follow the Lark grammar in this file (root rule `start`)
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<std::path::PathBuf>,
    /// Print the embedding of the input (-i), or of each line of standard input, as a JSON
    /// array per line (embedding models such as minilm)
    #[arg(long, conflicts_with_all = ["raw", "system", "json_schema", "regex", "grammar"])]
    pub embed: bool,
    /// With --embed: cut inputs longer than the model reads instead of refusing them
    #[arg(long, requires = "embed")]
    pub truncate: bool,
    #[arg(skip)]
    pub constraint: Option<Arc<Constraint>>,
}

impl RunArgs {
    /// The grammar the options ask for, read and checked.
    fn grammar(&self) -> anyhow::Result<Option<GrammarSpec>> {
        let read = |p: &std::path::Path| std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()));
        Ok(if let Some(path) = &self.json_schema {
            let schema = serde_json::from_str(&read(path)?).map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", path.display()))?;
            Some(GrammarSpec::JsonSchema(schema))
        } else if let Some(rx) = &self.regex {
            Some(GrammarSpec::Regex(rx.clone()))
        } else if let Some(path) = &self.grammar {
            Some(GrammarSpec::Lark(read(path)?))
        } else {
            None
        })
    }

    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(0.8),
            top_k: self.top_k.unwrap_or(40),
            top_p: self.top_p.unwrap_or(0.95),
            min_p: self.min_p.unwrap_or(0.05),
            repeat_penalty: self.repeat_penalty.unwrap_or(1.0),
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }

    /// Sampling settings the command line leaves open take the model's own defaults.
    fn fill_from(&mut self, d: &kiln_worker::loader::SamplingDefaults) {
        self.temperature = self.temperature.or(d.temperature);
        self.top_k = self.top_k.or(d.top_k);
        self.top_p = self.top_p.or(d.top_p);
        self.min_p = self.min_p.or(d.min_p);
        self.repeat_penalty = self.repeat_penalty.or(d.repetition_penalty);
    }
}

/// Set by Ctrl-C while an answer is streaming; the answer stops, the program does not.
static CANCEL: AtomicBool = AtomicBool::new(false);
static GENERATING: AtomicBool = AtomicBool::new(false);

pub fn main(mut args: RunArgs) -> anyhow::Result<()> {
    if args.engine.tp.is_follower() {
        return super::tp::follow(&args.model, args.engine.isq, args.threads, &args.engine.tp);
    }
    if args.embed {
        return embed(&args);
    }
    args.sampling().validate()?;
    if args.ctx_size == Some(0) {
        anyhow::bail!("--ctx-size must be positive");
    }
    let grammar = args.grammar()?;
    let model = super::load_model(&args.model, args.input.is_some() && !args.verbose, args.engine.isq, args.engine.tp.config()?.as_ref(), args.engine.mmproj.as_deref(), &args.engine.device)?;
    args.constraint = grammar.map(|g| Grammars::new(Arc::clone(&model.tokenizer)).compile(&g)).transpose()?;
    args.fill_from(&model.sampling_defaults);
    args.sampling().validate()?;
    let compute = super::compute(args.threads);
    // One conversation at a time; its earlier turns stay in the prefix cache.
    let engine = Engine::start(Arc::clone(&model), compute, args.engine.config(1, args.ctx_size))?;
    ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            CANCEL.store(true, Ordering::SeqCst);
        } else {
            eprint!("\n(type /exit or press Ctrl-D to quit)\n> ");
        }
    })?;
    let result = match &args.input {
        Some(text) => one_shot(&args, &model, &engine, text),
        None => chat(&args, &model, &engine),
    };
    engine.shutdown();
    result
}

fn request(args: &RunArgs, prompt: Vec<u32>) -> GenerationRequest {
    GenerationRequest {
        prompt,
        sampling: args.sampling(),
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        constraint: args.constraint.clone(),
        ..Default::default()
    }
}

/// Streams one answer to stdout; returns its text and why it ended.
fn stream(args: &RunArgs, engine: &EngineHandle, prompt: Vec<u32>) -> anyhow::Result<(String, FinishReason)> {
    let mut out = std::io::stdout();
    let mut write = |t: &str, text: &mut String| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
        text.push_str(t);
    };
    CANCEL.store(false, Ordering::SeqCst);
    GENERATING.store(true, Ordering::SeqCst);
    let mut events = engine.submit(request(args, prompt));
    let mut text = String::new();
    let result = loop {
        let stream = match events.as_mut() {
            Ok(s) => s,
            Err(e) => break Err(anyhow::anyhow!("{e}")),
        };
        if CANCEL.swap(false, Ordering::SeqCst) {
            stream.cancel();
        }
        match stream.next_timeout(Duration::from_millis(50)) {
            None | Some(Event::PromptLogprobs { .. }) => continue,
            Some(Event::Token { text: t, .. }) => write(&t, &mut text),
            Some(Event::Done { finish, usage, tail, .. }) => {
                write(&tail, &mut text);
                if args.verbose {
                    report(&usage, finish);
                }
                break Ok((text, finish));
            }
            Some(Event::Failed(msg)) => break Err(anyhow::anyhow!("{msg}")),
        }
    };
    GENERATING.store(false, Ordering::SeqCst);
    result
}

fn report(u: &Usage, finish: FinishReason) {
    eprintln!(
        "\nkiln: prompt {} tokens ({} cached), first token after {:.0} ms, {} tokens in {:.0} ms ({:.1} t/s), finish: {:?}",
        u.prompt_tokens,
        u.cached_tokens,
        u.prefill_ms,
        u.completion_tokens,
        u.decode_ms,
        u.completion_tokens.saturating_sub(1) as f64 / (u.decode_ms / 1e3).max(1e-9),
        finish
    );
}

fn one_shot(args: &RunArgs, model: &LoadedModel, engine: &EngineHandle, text: &str) -> anyhow::Result<()> {
    let prompt = if args.raw {
        model.encode_raw(text)
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", text));
        model.encode_chat(&messages)?
    };
    let (_, finish) = stream(args, engine, prompt)?;
    println!();
    if finish == FinishReason::ContextFull {
        eprintln!("kiln: stopped: the context window ({} tokens) is full", engine.capacity().max_context_len);
    }
    Ok(())
}

fn chat(args: &RunArgs, model: &LoadedModel, engine: &EngineHandle) -> anyhow::Result<()> {
    let cfg = model.model.config();
    eprintln!(
        "kiln chat · {} · context {} tokens · /help for commands, Ctrl-C stops an answer, Ctrl-D quits",
        cfg.name,
        engine.capacity().max_context_len
    );
    let mut system = args.system.clone();
    let mut history: Vec<ChatMessage> = Vec::new();
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let input = line.trim_end_matches(['\n', '\r']);
        if input.trim().is_empty() {
            continue;
        }
        if let Some(command) = input.strip_prefix('/') {
            let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
            match name {
                "exit" | "quit" => return Ok(()),
                "clear" => {
                    history.clear();
                    eprintln!("(conversation cleared)");
                }
                "system" => {
                    system = Some(rest.trim().to_string()).filter(|s| !s.is_empty());
                    history.clear();
                    eprintln!("(system prompt {}; conversation cleared)", if system.is_some() { "set" } else { "removed" });
                }
                "help" => eprintln!("/clear  forget the conversation\n/system TEXT  set the system prompt (empty removes it)\n/exit  quit"),
                _ => eprintln!("unknown command /{name} (try /help)"),
            }
            continue;
        }
        history.push(ChatMessage::new("user", input));
        let mut messages: Vec<ChatMessage> = system.iter().map(|s| ChatMessage::new("system", s.clone())).collect();
        messages.extend(history.iter().cloned());
        let prompt = match model.encode_chat(&messages) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
                continue;
            }
        };
        match stream(args, engine, prompt) {
            Ok((text, finish)) => {
                println!();
                match finish {
                    FinishReason::Cancelled => eprintln!("(stopped)"),
                    FinishReason::ContextFull => eprintln!("(the context window is full; /clear to start over)"),
                    FinishReason::Length => eprintln!("(token limit reached)"),
                    FinishReason::Stop => {}
                }
                history.push(ChatMessage::new("assistant", text));
            }
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
            }
        }
    }
}

/// `--embed`: one JSON array per input on stdout.
fn embed(args: &RunArgs) -> anyhow::Result<()> {
    let path = kiln_worker::assets::resolve(&args.model, &mut |msg| eprintln!("kiln: {msg}"))?;
    let embedder = kiln_worker::embedding::Embedder::load(&path)?;
    let compute = super::compute(args.threads);
    let mut scratch = kiln_worker::models::scratch::Scratch::default();
    let mut one = |text: &str| -> anyhow::Result<()> {
        let ids = embedder.encode(text, args.truncate)?;
        let t = std::time::Instant::now();
        let v = embedder.embed(&compute, &[&ids], &mut scratch)?.pop().unwrap_or_default();
        if args.verbose {
            eprintln!("kiln: {} tokens embedded in {:.1} ms", ids.len(), t.elapsed().as_secs_f64() * 1e3);
        }
        println!("{}", serde_json::to_string(&v)?);
        Ok(())
    };
    match &args.input {
        Some(text) => one(text),
        None => {
            for line in std::io::stdin().lock().lines() {
                one(&line?)?;
            }
            Ok(())
        }
    }
}
