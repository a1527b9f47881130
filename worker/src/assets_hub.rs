//! Models by Hugging Face repo id (`-m ORG/NAME`), downloaded with the hf-hub crate into the
//! standard cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`), from `$HF_ENDPOINT`
//! (default https://huggingface.co) with `$HF_TOKEN` (or the cached login token) for gated
//! repos. Only the files kiln reads are fetched: config, tokenizer files and the safetensors
//! weights (every shard the index names).

use crate::error::{Error, Result};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use std::path::PathBuf;

/// Whether a model argument reads as a repo id rather than a path or a known name.
pub fn looks_like_repo_id(arg: &str) -> bool {
    let mut parts = arg.split('/');
    let ok = |s: Option<&str>| s.is_some_and(|p| !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string())
}

/// The cached snapshot of `repo_id` when every file kiln needs is already there.
fn cached(repo_id: &str) -> Option<PathBuf> {
    let cache = hf_hub::Cache::from_env().model(repo_id.to_string());
    let config = cache.get("config.json")?;
    cache.get("tokenizer.json")?;
    let dir = config.parent()?.to_path_buf();
    if let Some(index) = cache.get("model.safetensors.index.json") {
        let v = crate::formats::hf_tokenizer::read_json(&index).ok()?;
        let all_there = v["weight_map"].as_object()?.values().all(|f| f.as_str().is_some_and(|f| cache.get(f).is_some()));
        return all_there.then_some(dir);
    }
    cache.get("model.safetensors").map(|_| dir)
}

/// The local directory of `repo_id`, downloading what is missing (nothing, and no network,
/// when the cache already holds it).
pub fn pull_repo(repo_id: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    if let Some(dir) = cached(repo_id) {
        return Ok(dir);
    }
    let err = |what: String| Error::ModelSource { name: repo_id.to_string(), what };
    let mut builder = ApiBuilder::from_env().with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| err(format!("cannot set up the Hugging Face client: {e}")))?;
    let repo = api.model(repo_id.to_string());
    let info = repo.info().map_err(|e| err(format!("cannot read the repository from {}: {e}", endpoint())))?;
    let files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let has = |f: &str| files.iter().any(|x| x == f);
    for required in ["config.json", "tokenizer.json"] {
        if !has(required) {
            return Err(err(format!("the repository has no {required} (files: {})", files.join(", "))));
        }
    }
    let get = |repo: &ApiRepo, file: &str, progress: &mut dyn FnMut(&str)| -> Result<PathBuf> {
        progress(&format!("fetching {repo_id}/{file}"));
        repo.get(file).map_err(|e| err(format!("cannot download {file}: {e}")))
    };
    let config = get(&repo, "config.json", progress)?;
    for optional in ["generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"] {
        if has(optional) {
            get(&repo, optional, progress)?;
        }
    }
    if has("model.safetensors.index.json") {
        let index = get(&repo, "model.safetensors.index.json", progress)?;
        let v = crate::formats::hf_tokenizer::read_json(&index)?;
        let mut shards: Vec<String> = v["weight_map"].as_object().into_iter().flatten().filter_map(|(_, f)| f.as_str().map(str::to_string)).collect();
        shards.sort();
        shards.dedup();
        for s in shards {
            get(&repo, &s, progress)?;
        }
    } else if has("model.safetensors") {
        get(&repo, "model.safetensors", progress)?;
    } else {
        return Err(err("the repository has no safetensors weights (model.safetensors or an index of shards)".into()));
    }
    config.parent().map(|p| p.to_path_buf()).ok_or_else(|| err("the download landed nowhere".into()))
}
