//! Connecting to etcd and the reads and writes operators make (`kilnctl`).

use crate::schema::{now_unix_ms, DrainMark, Keys, Placement, Snapshot, SCHEMA_VERSION};
use etcd_client::{Client, ConnectOptions, GetOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd at {endpoints} is unreachable: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd request failed: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ClusterError>;

#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// http://host:port URLs (or host:port).
    pub endpoints: Vec<String>,
    pub keys: Keys,
    /// Limit on each request.
    pub timeout: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: &[String]) -> EtcdConfig {
        EtcdConfig { endpoints: endpoints.to_vec(), keys: Keys::default(), timeout: Duration::from_secs(3) }
    }

    pub fn describe(&self) -> String {
        self.endpoints.join(",")
    }
}

/// The endpoint that answered last: connecting starts there, so a member that is down costs
/// one refused (or timed-out) attempt after it fails, not one per reconnection.
static LAST_ANSWERED: AtomicUsize = AtomicUsize::new(0);

/// A client of one member that answers a read (connecting is lazy, so the read is the check),
/// trying the endpoints in turn from the last that answered. A client of all the endpoints at
/// once would spread its requests over them, so with one member down a share of every
/// process's requests (lease keep-alives, the router's watch probes) would fail; bound to one
/// member that answers, a process goes on undisturbed, and moves to another member only when
/// its own stops answering (its caller reconnects).
pub async fn connect(cfg: &EtcdConfig) -> Result<Client> {
    if cfg.endpoints.is_empty() {
        return Err(ClusterError::Invalid("no etcd endpoint given".into()));
    }
    let n = cfg.endpoints.len();
    let first = LAST_ANSWERED.load(Ordering::Relaxed) % n;
    let mut reasons = Vec::new();
    for i in (0..n).map(|k| (first + k) % n) {
        let endpoint = &cfg.endpoints[i];
        match connect_one(cfg, endpoint).await {
            Ok(client) => {
                LAST_ANSWERED.store(i, Ordering::Relaxed);
                return Ok(client);
            }
            Err(reason) if n == 1 => reasons.push(reason),
            Err(reason) => reasons.push(format!("{endpoint}: {reason}")),
        }
    }
    Err(ClusterError::Unreachable { endpoints: cfg.describe(), reason: reasons.join("; ") })
}

async fn connect_one(cfg: &EtcdConfig, endpoint: &str) -> std::result::Result<Client, String> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(cfg.timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    let mut client = tokio::time::timeout(cfg.timeout, Client::connect([endpoint], Some(options)))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(cfg.timeout, client.get(cfg.keys.prefix.as_bytes(), Some(GetOptions::new().with_count_only())))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(client)
}

/// Everything under the prefix, read at one revision.
pub async fn read_snapshot(client: &mut Client, keys: &Keys) -> Result<Snapshot> {
    let resp = client.get(keys.prefix.as_bytes(), Some(GetOptions::new().with_prefix())).await?;
    let mut s = Snapshot { revision: resp.header().map_or(0, |h| h.revision()), ..Snapshot::default() };
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        s.apply(keys, &key, Some(kv.value()));
    }
    Ok(s)
}

/// Admin operations on a connected client.
pub struct Admin {
    pub client: Client,
    pub keys: Keys,
}

impl Admin {
    pub async fn connect(cfg: &EtcdConfig) -> Result<Admin> {
        Ok(Admin { client: connect(cfg).await?, keys: cfg.keys.clone() })
    }

    pub async fn snapshot(&mut self) -> Result<Snapshot> {
        read_snapshot(&mut self.client, &self.keys).await
    }

    pub async fn place(&mut self, p: &Placement) -> Result<()> {
        if p.model.is_empty() || p.model.contains('/') {
            return Err(ClusterError::Invalid(format!("`{}` is not a valid model id (non-empty, no `/`)", p.model)));
        }
        if p.tensor_parallel == 0 || p.tensor_parallel > 64 {
            return Err(ClusterError::Invalid(format!("--tensor-parallel {} is out of range (1 to 64 workers per replica)", p.tensor_parallel)));
        }
        let value = serde_json::to_vec(p).map_err(|e| ClusterError::Invalid(e.to_string()))?;
        self.client.put(self.keys.placement(&p.model), value, None).await?;
        Ok(())
    }

    /// Removes a placement; false when there was none.
    pub async fn unplace(&mut self, model: &str) -> Result<bool> {
        Ok(self.client.delete(self.keys.placement(model), None).await?.deleted() > 0)
    }

    pub async fn drain(&mut self, worker: &str, on: bool) -> Result<()> {
        if on {
            let mark = DrainMark { schema: SCHEMA_VERSION, since_unix_ms: now_unix_ms() };
            let value = serde_json::to_vec(&mark).map_err(|e| ClusterError::Invalid(e.to_string()))?;
            self.client.put(self.keys.drain(worker), value, None).await?;
        } else {
            self.client.delete(self.keys.drain(worker), None).await?;
        }
        Ok(())
    }
}
