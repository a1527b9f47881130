//! Records and key layout (schema version 1). Every value is JSON carrying `schema`, so a
//! later layout can live beside this one under its own prefix.
//!
//! ```text
//! <prefix>workers/<worker-id>    WorkerRecord   under the worker's lease
//! <prefix>placement/<model-id>   Placement      written by operators
//! <prefix>drain/<worker-id>      DrainMark      written by operators
//! ```
//! The default prefix is `/kiln/v1/`.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub const SCHEMA_VERSION: u32 = 1;
pub const DEFAULT_PREFIX: &str = "/kiln/v1/";

#[derive(Clone, Debug)]
pub struct Keys {
    pub prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys { prefix: DEFAULT_PREFIX.to_string() }
    }
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }
    pub fn workers(&self) -> String {
        format!("{}workers/", self.prefix)
    }
    pub fn worker(&self, id: &str) -> String {
        format!("{}workers/{id}", self.prefix)
    }
    pub fn placements(&self) -> String {
        format!("{}placement/", self.prefix)
    }
    pub fn placement(&self, model: &str) -> String {
        format!("{}placement/{model}", self.prefix)
    }
    pub fn drains(&self) -> String {
        format!("{}drain/", self.prefix)
    }
    pub fn drain(&self, id: &str) -> String {
        format!("{}drain/{id}", self.prefix)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelPhase {
    Loading,
    Ready,
    Failed,
}

/// The model a worker hosts (one at a time) and how far it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStatus {
    pub id: String,
    pub phase: ModelPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSummary {
    pub running: u32,
    pub waiting: u32,
    pub kv_blocks_used: u32,
    pub kv_blocks_total: u32,
}

/// What a live worker publishes about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub schema: u32,
    pub id: String,
    /// gRPC address routers dial (host:port).
    pub addr: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Started without a model: it hosts what placement assigns it.
    pub placeable: bool,
    pub model: Option<ModelStatus>,
    pub max_seqs: u32,
    #[serde(default)]
    pub load: LoadSummary,
    /// Where this worker listens for its group's traffic when it is rank 0 of a
    /// tensor-parallel group (host:port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp_addr: Option<String>,
    /// The tensor-parallel group this worker is a rank of, while it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupRole>,
}

/// A worker's place in a tensor-parallel group. Rank 0 serves the model for the group (its
/// record is the group's, `model` ready only once every rank has loaded); the other ranks
/// compute their share of its steps and serve nothing themselves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRole {
    pub id: String,
    pub rank: u32,
    /// The members' worker ids, in rank order.
    pub members: Vec<String>,
}

impl WorkerRecord {
    /// The model this worker serves now, if it is ready (a group's other ranks serve none).
    pub fn ready_model(&self) -> Option<&str> {
        if self.group.as_ref().is_some_and(|g| g.rank > 0) {
            return None;
        }
        self.model.as_ref().filter(|m| m.phase == ModelPhase::Ready).map(|m| m.id.as_str())
    }
}

/// An operator's wish: `replicas` workers should serve `model`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub schema: u32,
    pub model: String,
    /// What workers load: a model file path on the workers, or a known model name.
    pub source: String,
    pub replicas: u32,
    /// Only these workers (empty: any).
    #[serde(default)]
    pub workers: Vec<String>,
    /// Only workers carrying all these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Workers per replica: more than 1 splits the model over a tensor-parallel group.
    #[serde(default = "one")]
    pub tensor_parallel: u32,
}

fn one() -> u32 {
    1
}

impl Placement {
    pub fn admits(&self, w: &WorkerRecord) -> bool {
        (self.workers.is_empty() || self.workers.contains(&w.id)) && self.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainMark {
    pub schema: u32,
    pub since_unix_ms: u64,
}

/// Everything under the prefix at one revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub revision: i64,
    pub workers: BTreeMap<String, WorkerRecord>,
    pub placements: BTreeMap<String, Placement>,
    pub drains: BTreeSet<String>,
    /// Keys whose values could not be read, with why; they are otherwise ignored.
    pub problems: BTreeMap<String, String>,
}

impl Snapshot {
    /// Applies one key's new value (`None`: deleted).
    pub fn apply(&mut self, keys: &Keys, key: &str, value: Option<&[u8]>) {
        self.problems.remove(key);
        let parsed = if let Some(id) = key.strip_prefix(&keys.workers()) {
            parse(value, |r: WorkerRecord| (r.id == id).then_some(()).ok_or("the record's id differs from its key").map(|_| r))
                .map(|r| set(&mut self.workers, id, r))
        } else if let Some(model) = key.strip_prefix(&keys.placements()) {
            parse(value, |p: Placement| (p.model == model).then_some(()).ok_or("the record's model differs from its key").map(|_| p))
                .map(|p| set(&mut self.placements, model, p))
        } else if let Some(id) = key.strip_prefix(&keys.drains()) {
            parse(value, Ok::<DrainMark, &str>).map(|d| {
                if d.is_some() {
                    self.drains.insert(id.to_string());
                } else {
                    self.drains.remove(id);
                }
            })
        } else {
            Ok(())
        };
        if let Err(e) = parsed {
            self.problems.insert(key.to_string(), e);
        }
    }

    pub fn is_draining(&self, id: &str) -> bool {
        self.drains.contains(id)
    }
}

fn set<T>(map: &mut BTreeMap<String, T>, key: &str, value: Option<T>) {
    match value {
        Some(v) => {
            map.insert(key.to_string(), v);
        }
        None => {
            map.remove(key);
        }
    }
}

/// Reads a record, checking its schema version and consistency with its key.
fn parse<T: serde::de::DeserializeOwned, E: std::fmt::Display>(value: Option<&[u8]>, check: impl FnOnce(T) -> Result<T, E>) -> Result<Option<T>, String> {
    let Some(bytes) = value else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("schema").and_then(|s| s.as_u64()) {
        Some(s) if s == SCHEMA_VERSION as u64 => {}
        Some(s) => return Err(format!("schema version {s}; this build reads {SCHEMA_VERSION}")),
        None => return Err("no schema version".into()),
    }
    let record: T = serde_json::from_value(v).map_err(|e| format!("bad record: {e}"))?;
    check(record).map(Some).map_err(|e| e.to_string())
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str) -> WorkerRecord {
        WorkerRecord { schema: 1, id: id.into(), addr: "127.0.0.1:1".into(), labels: BTreeMap::new(), placeable: true, model: None, max_seqs: 16, load: LoadSummary::default(), tp_addr: None, group: None }
    }

    #[test]
    fn records_are_applied_and_bad_ones_reported() {
        let keys = Keys::default();
        let mut s = Snapshot::default();
        s.apply(&keys, "/kiln/v1/workers/a", Some(&serde_json::to_vec(&worker("a")).unwrap()));
        assert!(s.workers.contains_key("a"));
        s.apply(&keys, "/kiln/v1/workers/b", Some(&serde_json::to_vec(&worker("a")).unwrap()));
        assert!(s.problems["/kiln/v1/workers/b"].contains("differs"));
        s.apply(&keys, "/kiln/v1/workers/c", Some(b"{\"schema\": 2}"));
        assert!(s.problems["/kiln/v1/workers/c"].contains("schema version 2"));
        s.apply(&keys, "/kiln/v1/drain/a", Some(b"{\"schema\":1,\"since_unix_ms\":5}"));
        assert!(s.is_draining("a"));
        s.apply(&keys, "/kiln/v1/drain/a", None);
        s.apply(&keys, "/kiln/v1/workers/a", None);
        assert!(!s.is_draining("a") && s.workers.is_empty());
        s.apply(&keys, "/kiln/v1/workers/c", None);
        assert!(!s.problems.contains_key("/kiln/v1/workers/c"));
    }
}
