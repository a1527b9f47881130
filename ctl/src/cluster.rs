//! The operator commands over etcd: status, workers, models, place, unplace, drain, undrain.
//! Tables for people, `--json` for scripts.

use anyhow::{bail, Result};
use kiln_cluster::etcd::Admin;
use kiln_cluster::{EtcdConfig, ModelPhase, Placement, Snapshot, SCHEMA_VERSION};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct PlaceArgs {
    /// Model id clients will ask for
    pub model: String,
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// What workers load: a model file path on the workers or a known model name (default: the model id)
    #[arg(long)]
    pub source: Option<String>,
    /// Only these workers, comma-separated
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Only workers with this label, key=value (repeatable)
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Workers per replica: more than 1 splits the model over a tensor-parallel group of
    /// that many workers (rank 0 serves it once all have loaded their shares)
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel: u32,
}

fn table(rows: Vec<Vec<String>>) {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len)).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn phase(p: ModelPhase) -> &'static str {
    match p {
        ModelPhase::Loading => "loading",
        ModelPhase::Ready => "ready",
        ModelPhase::Failed => "failed",
    }
}

fn workers_json(s: &Snapshot) -> Value {
    Value::Array(
        s.workers
            .values()
            .map(|w| {
                let mut v = serde_json::to_value(w).unwrap_or(Value::Null);
                v["draining"] = json!(s.is_draining(&w.id));
                v
            })
            .collect(),
    )
}

/// Per placed model: desired replicas and how many workers are ready, loading, failed.
fn models_json(s: &Snapshot) -> Value {
    let mut ids: Vec<String> = s.placements.keys().cloned().collect();
    for w in s.workers.values() {
        if let Some(m) = &w.model {
            if !ids.contains(&m.id) {
                ids.push(m.id.clone());
            }
        }
    }
    ids.sort();
    Value::Array(
        ids.iter()
            .map(|id| {
                let hosts: Vec<_> = s.workers.values().filter(|w| w.model.as_ref().is_some_and(|m| &m.id == id)).collect();
                // Replicas: a tensor-parallel group counts once, by its rank 0.
                let leads = |w: &&&kiln_cluster::WorkerRecord| w.group.as_ref().is_none_or(|g| g.rank == 0);
                let count = |p: ModelPhase| hosts.iter().filter(leads).filter(|w| w.model.as_ref().is_some_and(|m| m.phase == p)).count();
                let failures: Vec<Value> = hosts
                    .iter()
                    .filter_map(|w| w.model.as_ref().filter(|m| m.phase == ModelPhase::Failed).map(|m| json!({ "worker": w.id, "reason": m.reason })))
                    .collect();
                let p = s.placements.get(id);
                json!({
                    "model": id,
                    "placed": p.is_some(),
                    "replicas": p.map(|p| p.replicas),
                    "tensor_parallel": p.map(|p| p.tensor_parallel),
                    "source": p.map(|p| p.source.clone()),
                    "ready": count(ModelPhase::Ready),
                    "loading": count(ModelPhase::Loading),
                    "failed": failures,
                })
            })
            .collect(),
    )
}

pub async fn run(cfg: &EtcdConfig, command: &crate::Command, as_json: bool) -> Result<()> {
    let mut admin = Admin::connect(cfg).await?;
    let snap = admin.snapshot().await?;
    match command {
        crate::Command::Status => {
            let models = models_json(&snap);
            if as_json {
                println!("{}", json!({ "etcd": cfg.describe(), "revision": snap.revision, "workers": workers_json(&snap), "models": models, "problems": snap.problems }));
                return Ok(());
            }
            println!("etcd {}: reachable (revision {})", cfg.describe(), snap.revision);
            let ready = snap.workers.values().filter(|w| w.ready_model().is_some()).count();
            println!("workers: {} registered, {} serving, {} draining", snap.workers.len(), ready, snap.drains.iter().filter(|d| snap.workers.contains_key(*d)).count());
            for m in models.as_array().into_iter().flatten() {
                let wanted = m["replicas"].as_u64().map_or("unplaced".to_string(), |r| format!("{r} wanted"));
                println!("model {}: {} ready, {} loading, {} failed ({wanted})", m["model"].as_str().unwrap_or("?"), m["ready"], m["loading"], m["failed"].as_array().map_or(0, Vec::len));
            }
            for (key, why) in &snap.problems {
                println!("unreadable record {key}: {why}");
            }
        }
        crate::Command::Workers => {
            if as_json {
                println!("{}", workers_json(&snap));
                return Ok(());
            }
            let mut rows = vec![["WORKER", "ADDRESS", "MODEL", "STATE", "GROUP", "RUNNING", "WAITING", "KV BLOCKS", "LABELS"].map(String::from).to_vec()];
            for w in snap.workers.values() {
                let (model, state) = match &w.model {
                    Some(m) => (m.id.clone(), phase(m.phase).to_string()),
                    None => ("-".into(), if w.placeable { "unassigned".into() } else { "-".into() }),
                };
                let state = if snap.is_draining(&w.id) { format!("{state},draining") } else { state };
                let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                // A tensor-parallel rank: its group, rank of size (rank 0 serves for the group).
                let group = w.group.as_ref().map_or("-".into(), |g| format!("{} rank {}/{}", g.id, g.rank, g.members.len()));
                rows.push(vec![
                    w.id.clone(),
                    w.addr.clone(),
                    model,
                    state,
                    group,
                    w.load.running.to_string(),
                    w.load.waiting.to_string(),
                    format!("{}/{}", w.load.kv_blocks_used, w.load.kv_blocks_total),
                    labels.join(","),
                ]);
            }
            table(rows);
        }
        crate::Command::Models => {
            let models = models_json(&snap);
            if as_json {
                println!("{models}");
                return Ok(());
            }
            let mut rows = vec![["MODEL", "REPLICAS", "READY", "LOADING", "FAILED", "SOURCE"].map(String::from).to_vec()];
            for m in models.as_array().into_iter().flatten() {
                let failed: Vec<String> = m["failed"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|f| format!("{}: {}", f["worker"].as_str().unwrap_or("?"), f["reason"].as_str().unwrap_or("?")))
                    .collect();
                rows.push(vec![
                    m["model"].as_str().unwrap_or("?").to_string(),
                    m["replicas"].as_u64().map_or("-".into(), |r| r.to_string()),
                    m["ready"].to_string(),
                    m["loading"].to_string(),
                    if failed.is_empty() { "0".into() } else { failed.join("; ") },
                    m["source"].as_str().unwrap_or("-").to_string(),
                ]);
            }
            table(rows);
        }
        crate::Command::Place(a) => {
            let mut labels = std::collections::BTreeMap::new();
            for l in &a.labels {
                let Some((k, v)) = l.split_once('=') else { bail!("--label `{l}` is not key=value") };
                labels.insert(k.to_string(), v.to_string());
            }
            let p = Placement {
                schema: SCHEMA_VERSION,
                model: a.model.clone(),
                source: a.source.clone().unwrap_or_else(|| a.model.clone()),
                replicas: a.replicas,
                workers: a.workers.clone(),
                labels,
                tensor_parallel: a.tensor_parallel,
            };
            admin.place(&p).await?;
            let eligible = snap.workers.values().filter(|w| w.placeable && p.admits(w) && !snap.is_draining(&w.id)).count();
            let wanted = p.replicas as usize * p.tensor_parallel as usize;
            if p.tensor_parallel > 1 {
                println!("placed `{}`: {} replica(s) of {} workers each (tensor-parallel groups) from {}", p.model, p.replicas, p.tensor_parallel, p.source);
            } else {
                println!("placed `{}`: {} replica(s) from {}", p.model, p.replicas, p.source);
            }
            if eligible < wanted {
                println!("note: only {eligible} registered worker(s) can take it now ({wanted} wanted); the rest will be placed as workers join");
            }
        }
        crate::Command::Unplace { model } => {
            if !admin.unplace(model).await? {
                bail!("`{model}` is not placed");
            }
            println!("unplaced `{model}`; its workers unload it");
        }
        crate::Command::Drain { worker } | crate::Command::Undrain { worker } => {
            let on = matches!(command, crate::Command::Drain { .. });
            if on && !snap.workers.contains_key(worker) {
                let known: Vec<&String> = snap.workers.keys().collect();
                bail!("no worker `{worker}` is registered (registered: {known:?})");
            }
            admin.drain(worker, on).await?;
            if on {
                println!("draining `{worker}`: routers send it nothing new; its running streams finish");
            } else {
                println!("`{worker}` takes requests again");
            }
        }
        _ => bail!("this command talks to a router, not etcd"),
    }
    Ok(())
}
