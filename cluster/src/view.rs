//! A live, in-memory copy of the cluster state: read everything once, then follow etcd's
//! watch. When etcd cannot be reached the last copy stays in force (routers keep routing,
//! workers keep serving) and `health()` says so; on reconnecting the state is read afresh,
//! which reconciles whatever changed meanwhile.

use crate::etcd::{connect, read_snapshot, EtcdConfig};
use crate::schema::Snapshot;
use etcd_client::{EventType, WatchOptions};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct EtcdHealth {
    pub connected: bool,
    /// Why the last attempt or watch failed.
    pub last_error: Option<String>,
    /// When `connected` last changed.
    pub since: Instant,
    /// Times the view was (re)read in full.
    pub syncs: u64,
}

#[derive(Clone)]
pub struct ClusterView {
    rx: watch::Receiver<Arc<Snapshot>>,
    health: Arc<Mutex<EtcdHealth>>,
}

impl ClusterView {
    /// Starts following etcd in the background (inside a Tokio runtime).
    pub fn spawn(cfg: EtcdConfig) -> ClusterView {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let health = Arc::new(Mutex::new(EtcdHealth { connected: false, last_error: None, since: Instant::now(), syncs: 0 }));
        let h = Arc::clone(&health);
        tokio::spawn(async move { follow(cfg, tx, h).await });
        ClusterView { rx, health }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.rx.borrow())
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }

    pub fn health(&self) -> EtcdHealth {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the view has been read from etcd at least once.
    pub async fn synced(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.health().syncs == 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

fn set_health(h: &Mutex<EtcdHealth>, connected: bool, error: Option<String>, synced: bool) {
    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
    if h.connected != connected {
        h.since = Instant::now();
        match (&error, connected) {
            (Some(e), false) => tracing::warn!("etcd unreachable, keeping the last cluster view: {e}"),
            _ => tracing::info!("etcd reachable"),
        }
    }
    h.connected = connected;
    if error.is_some() || connected {
        h.last_error = error;
    }
    if synced {
        h.syncs += 1;
    }
}

async fn follow(cfg: EtcdConfig, tx: watch::Sender<Arc<Snapshot>>, health: Arc<Mutex<EtcdHealth>>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match follow_once(&cfg, &tx, &health).await {
            Ok(()) => return, // nobody is watching any more
            Err(e) => set_health(&health, false, Some(e), false),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One connection's worth of following; returns Err(reason) when it breaks.
async fn follow_once(cfg: &EtcdConfig, tx: &watch::Sender<Arc<Snapshot>>, health: &Mutex<EtcdHealth>) -> Result<(), String> {
    let mut client = connect(cfg).await.map_err(|e| e.to_string())?;
    let mut snap = read_snapshot(&mut client, &cfg.keys).await.map_err(|e| e.to_string())?;
    let options = WatchOptions::new().with_prefix().with_start_revision(snap.revision + 1).with_progress_notify();
    let mut stream = client.watch(cfg.keys.prefix.as_bytes(), Some(options)).await.map_err(|e| e.to_string())?;
    if tx.send(Arc::new(snap.clone())).is_err() {
        return Ok(());
    }
    set_health(health, true, None, true);
    // The watch alone may not notice a member that stopped answering; a cheap read does.
    let mut probe = tokio::time::interval(Duration::from_secs(2));
    probe.tick().await;
    loop {
        tokio::select! {
            msg = stream.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err("the watch ended".into()),
                    Err(e) => return Err(e.to_string()),
                };
                if resp.canceled() {
                    return Err(format!("the watch was cancelled: {}", resp.cancel_reason()));
                }
                if resp.events().is_empty() {
                    continue;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                    snap.apply(&cfg.keys, &key, value);
                    snap.revision = snap.revision.max(kv.mod_revision());
                }
                if tx.send(Arc::new(snap.clone())).is_err() {
                    return Ok(());
                }
            }
            _ = probe.tick() => {
                let read = client.get(cfg.keys.prefix.as_bytes(), Some(etcd_client::GetOptions::new().with_count_only()));
                match tokio::time::timeout(cfg.timeout, read).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err(format!("no answer within {:?}", cfg.timeout)),
                }
                if tx.is_closed() {
                    return Ok(());
                }
            }
        }
    }
}
