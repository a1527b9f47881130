//! A worker's presence in etcd: its record under a lease it keeps alive. If the worker dies
//! the lease runs out and the record goes with it; a clean shutdown deletes the record and
//! revokes the lease at once. When etcd is away the worker keeps serving and re-registers
//! (under a new lease if the old one expired) once etcd answers again.

use crate::etcd::{connect, EtcdConfig};
use crate::schema::WorkerRecord;
use etcd_client::PutOptions;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Registration {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Registration {
    /// Registers and keeps registered the record `current()` returns, re-publishing it when
    /// it changes (checked every `refresh`). Call inside a Tokio runtime.
    pub fn spawn(cfg: EtcdConfig, ttl_secs: i64, refresh: Duration, current: impl Fn() -> WorkerRecord + Send + Sync + 'static) -> Registration {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            let mut was_down = false;
            loop {
                match register_once(&cfg, ttl_secs, refresh, &current, stop_rx.clone()).await {
                    Ok(()) => return,
                    Err(e) => {
                        if !was_down {
                            tracing::warn!("not registered in etcd ({e}); retrying");
                        }
                        was_down = true;
                    }
                }
                let mut stop_rx = stop_rx.clone();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(&mut stop_rx) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
        Registration { stop, task }
    }

    /// Deregisters (deletes the record, revokes the lease) and stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), self.task).await;
    }
}

async fn register_once(
    cfg: &EtcdConfig,
    ttl_secs: i64,
    refresh: Duration,
    current: &(impl Fn() -> WorkerRecord + Send + Sync),
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut client = connect(cfg).await.map_err(|e| e.to_string())?;
    let lease = client.lease_grant(ttl_secs, None).await.map_err(|e| e.to_string())?.id();
    let (mut keeper, mut acks) = client.lease_keep_alive(lease).await.map_err(|e| e.to_string())?;
    let mut record = current();
    let key = cfg.keys.worker(&record.id);
    let put = |client: &mut etcd_client::Client, r: &WorkerRecord| {
        let value = serde_json::to_vec(r).unwrap_or_default();
        let mut client = client.clone();
        let key = key.clone();
        async move { client.put(key, value, Some(PutOptions::new().with_lease(lease))).await.map(|_| ()).map_err(|e| e.to_string()) }
    };
    put(&mut client, &record).await?;
    tracing::info!("registered in etcd as `{}` (lease {lease:x}, ttl {ttl_secs} s)", record.id);
    let mut keep_alive = tokio::time::interval(Duration::from_secs((ttl_secs as u64 / 3).max(1)));
    let mut republish = tokio::time::interval(refresh);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.delete(key.clone(), None)).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
                tracing::info!("deregistered from etcd");
                return Ok(());
            }
            _ = keep_alive.tick() => {
                tokio::time::timeout(cfg.timeout, keeper.keep_alive()).await.map_err(|_| "keep-alive timed out".to_string())?.map_err(|e| e.to_string())?;
            }
            ack = acks.message() => match ack {
                Ok(Some(a)) if a.ttl() <= 0 => return Err("the lease expired".into()),
                Ok(Some(_)) => {}
                Ok(None) => return Err("the keep-alive stream ended".into()),
                Err(e) => return Err(e.to_string()),
            },
            _ = republish.tick() => {
                let now = current();
                if now != record {
                    tokio::time::timeout(cfg.timeout, put(&mut client, &now)).await.map_err(|_| "publishing timed out".to_string())??;
                    record = now;
                }
            }
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
