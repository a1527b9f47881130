//! `kiln-worker template`: the prompt a chat template renders for a conversation, exactly as
//! the worker would tokenize it (for checking a model's template, or a template file).

use kiln_shared::chat::ChatTemplate;
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TemplateArgs {
    /// A model whose template to render (known name, GGUF file, Hugging Face directory or repo id)
    #[arg(short, long, conflicts_with = "template")]
    pub model: Option<String>,
    /// A Jinja chat template file to render instead of a model's
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// `bos_token` for --template
    #[arg(long, default_value = "")]
    pub bos_token: String,
    /// `eos_token` for --template
    #[arg(long, default_value = "")]
    pub eos_token: String,
    /// JSON file (- for standard input): a list of messages, or an object of template
    /// variables (`messages`, `tools`, `add_generation_prompt`, `enable_thinking`, ...)
    #[arg(long, default_value = "-")]
    pub input: String,
    /// With a list of messages: leave out the assistant's turn header
    #[arg(long)]
    pub no_generation_prompt: bool,
    /// Print the model's template source instead of rendering it
    #[arg(long, requires = "model")]
    pub source: bool,
}

pub fn main(args: TemplateArgs) -> anyhow::Result<()> {
    if args.source {
        let model = super::load_model(args.model.as_deref().unwrap_or_default(), true, None, None, None, &kiln_worker::backend::Device::Cpu)?;
        std::io::stdout().write_all(model.chat_template_source.as_bytes())?;
        return Ok(());
    }
    let text = if args.input == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(&args.input).map_err(|e| anyhow::anyhow!("{}: {e}", args.input))?
    };
    let input: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", args.input))?;
    let variables = match input {
        serde_json::Value::Array(messages) => serde_json::json!({ "messages": messages, "add_generation_prompt": !args.no_generation_prompt }),
        object @ serde_json::Value::Object(_) => object,
        other => anyhow::bail!("{}: expected a list of messages or an object of template variables, not {other}", args.input),
    };
    let rendered = match (&args.model, &args.template) {
        (_, Some(path)) => {
            let source = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            ChatTemplate::new(&source, &args.bos_token, &args.eos_token)?.render_with(&variables)?
        }
        (Some(name), None) => super::load_model(name, true, None, None, None, &kiln_worker::backend::Device::Cpu)?.chat_template.render_with(&variables)?,
        (None, None) => anyhow::bail!("name a model (-m) or a template file (--template)"),
    };
    std::io::stdout().write_all(rendered.as_bytes())?;
    Ok(())
}
