//! Cluster membership from etcd: the pool follows the registered workers (added when they
//! register, dropped when their registration goes, flagged while an operator drains them).
//! When etcd is unreachable the view stops changing, so the router keeps routing over the
//! workers it last knew, which its own health checks still watch.

use crate::upstream::WorkerPool;
use kiln_cluster::{ClusterView, Snapshot};
use std::sync::atomic::Ordering;

pub async fn follow(view: ClusterView, pool: WorkerPool, static_ids: Vec<String>) {
    let mut rx = view.subscribe();
    loop {
        let snap = rx.borrow_and_update().clone();
        if view.health().syncs > 0 {
            reconcile(&pool, &snap, &static_ids);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

pub fn reconcile(pool: &WorkerPool, snap: &Snapshot, static_ids: &[String]) {
    for w in snap.workers.values() {
        let known = pool.get(&w.id).is_some_and(|p| p.addr == w.addr);
        match pool.add(&w.id, &w.addr) {
            Ok(p) => {
                if !known {
                    tracing::info!("worker {} joined at {}", w.id, w.addr);
                }
                let draining = snap.is_draining(&w.id);
                if p.draining.swap(draining, Ordering::Relaxed) != draining {
                    tracing::info!("worker {} {}", w.id, if draining { "is draining" } else { "is no longer draining" });
                }
            }
            Err(e) => tracing::warn!("worker {} registered a bad address: {e}", w.id),
        }
    }
    for p in pool.workers() {
        if !snap.workers.contains_key(&p.id) && !static_ids.contains(&p.id) {
            tracing::info!("worker {} left the cluster", p.id);
            pool.remove(&p.id);
        }
    }
}
