//! A cluster worker follows etcd: it refuses new generations while an operator drains it,
//! and, when started without a model, loads and unloads models as placement assigns them,
//! reporting loading / ready / failed (with the reason) in its record.

use super::serve::{load_serving, ServeArgs};
use kiln_cluster::{ClusterView, ModelPhase, ModelStatus};
use kiln_worker::service::ModelSlot;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// The model this worker hosts and its phase, as published in its record.
#[derive(Default)]
pub struct Hosting(Mutex<Option<ModelStatus>>);

impl Hosting {
    pub fn status(&self) -> Option<ModelStatus> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn set(&self, s: Option<ModelStatus>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

pub async fn follow(view: ClusterView, id: String, args: Arc<ServeArgs>, slot: Arc<ModelSlot>, hosting: Arc<Hosting>, placed: bool) {
    let mut rx = view.subscribe();
    let mut draining = false;
    loop {
        let snap = rx.borrow_and_update().clone();
        if view.health().syncs > 0 && snap.is_draining(&id) != draining {
            draining = !draining;
            slot.refuse_new.store(draining, Ordering::Relaxed);
            eprintln!("kiln-worker: {}", if draining { "drained: refusing new generations" } else { "undrained: taking generations" });
        }
        if placed && view.health().syncs > 0 {
            let want = kiln_cluster::placement::assign(&snap).remove(&id);
            let have = hosting.status();
            let failed_here = have.as_ref().is_some_and(|h| h.phase == ModelPhase::Failed);
            let changed = have.as_ref().map(|h| &h.id) != want.as_ref();
            // A failed load stays reported (and is not retried) until placement asks for
            // something else.
            if changed && !(failed_here && want.is_none()) {
                if let Some(old) = slot.replace(None) {
                    eprintln!("kiln-worker: unloading `{}`", old.info.model_id);
                    old.shutdown();
                }
                hosting.set(None);
                if let Some(model) = want {
                    let source = snap.placements.get(&model).map_or_else(|| model.clone(), |p| p.source.clone());
                    load(&args, &slot, &hosting, model, source).await;
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn load(args: &Arc<ServeArgs>, slot: &ModelSlot, hosting: &Hosting, model: String, source: String) {
    eprintln!("kiln-worker: placement assigns `{model}` (from {source}); loading");
    hosting.set(Some(ModelStatus { id: model.clone(), phase: ModelPhase::Loading, reason: None }));
    let (a, m, s) = (Arc::clone(args), model.clone(), source.clone());
    let loaded = tokio::task::spawn_blocking(move || load_serving(&a, &s, &m)).await;
    match loaded {
        Ok(Ok(serving)) => {
            slot.replace(Some(Arc::new(serving)));
            hosting.set(Some(ModelStatus { id: model.clone(), phase: ModelPhase::Ready, reason: None }));
            eprintln!("kiln-worker: serving `{model}`");
        }
        Ok(Err(e)) => {
            let reason = super::describe(&e);
            eprintln!("kiln-worker: cannot load `{model}` from {source}: {reason}");
            hosting.set(Some(ModelStatus { id: model, phase: ModelPhase::Failed, reason: Some(reason) }));
        }
        Err(e) => hosting.set(Some(ModelStatus { id: model, phase: ModelPhase::Failed, reason: Some(format!("the loader crashed: {e}")) })),
    }
}
