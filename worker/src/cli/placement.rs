//! A cluster worker follows etcd: it refuses new generations while an operator drains it,
//! and, when started without a model, loads and unloads models as placement assigns them,
//! reporting loading / ready / failed (with the reason) in its record.
//!
//! A placement of several workers per replica makes tensor-parallel groups: rank 0 loads its
//! share and serves the model for the group once every rank has loaded (its record then says
//! ready, with the members); the other ranks connect to rank 0's group address from its
//! record and compute their share of its steps. When a rank dies, rank 0 notices at once
//! (its connection closes), unloads and stops serving, so routers go elsewhere; every member
//! returns to the pool, and the same members are not grouped again until the placement's
//! answer changes (the dead worker's registration expires) or a cooldown has passed.

use super::serve::{load_serving, ServeArgs};
use kiln_cluster::placement::Assignment;
use kiln_cluster::{ClusterView, GroupRole, ModelPhase, ModelStatus, Snapshot};
use kiln_worker::parallel::{step, Collective, TpConfig};
use kiln_worker::service::ModelSlot;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The model this worker hosts, its phase and its place in a group, as published in its record.
#[derive(Default)]
pub struct Hosting(Mutex<(Option<ModelStatus>, Option<GroupRole>)>);

impl Hosting {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<ModelStatus>, Option<GroupRole>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn status(&self) -> Option<ModelStatus> {
        self.lock().0.clone()
    }
    pub fn role(&self) -> Option<GroupRole> {
        self.lock().1.clone()
    }
    pub fn set(&self, s: Option<ModelStatus>) {
        self.lock().0 = s;
    }
    pub fn set_all(&self, s: Option<ModelStatus>, role: Option<GroupRole>) {
        *self.lock() = (s, role);
    }
}

/// What this worker is doing for a group, so that a new assignment can end it.
#[derive(Default)]
struct Membership {
    /// The group of the share loaded now (either role).
    group: Option<Arc<dyn Collective>>,
    /// Groups that failed, and when: not formed again from the same members for a while.
    failed: HashMap<String, Instant>,
}

pub async fn follow(view: ClusterView, id: String, args: Arc<ServeArgs>, slot: Arc<ModelSlot>, hosting: Arc<Hosting>, placed: bool) {
    let mut rx = view.subscribe();
    let mut draining = false;
    let membership = Arc::new(Mutex::new(Membership::default()));
    let wake = Arc::new(tokio::sync::Notify::new());
    let cooldown = Duration::from_secs(args.lease_ttl.max(1) as u64 * 3);
    loop {
        let snap = rx.borrow_and_update().clone();
        if view.health().syncs > 0 && snap.is_draining(&id) != draining {
            draining = !draining;
            slot.refuse_new.store(draining, Ordering::Relaxed);
            eprintln!("kiln-worker: {}", if draining { "drained: refusing new generations" } else { "undrained: taking generations" });
        }
        if placed && view.health().syncs > 0 {
            let mut want = kiln_cluster::placement::assign(&snap).remove(&id);
            let recently_failed = |g: &str| membership.lock().unwrap_or_else(|e| e.into_inner()).failed.get(g).is_some_and(|t| t.elapsed() < cooldown);
            if want.as_ref().and_then(|a| a.group.as_ref()).is_some_and(|g| recently_failed(&g.id)) {
                want = None;
            }
            let have = hosting.status();
            let role = hosting.role();
            let failed_here = have.as_ref().is_some_and(|h| h.phase == ModelPhase::Failed);
            let changed = have.as_ref().map(|h| &h.id) != want.as_ref().map(|a| &a.model)
                || role.as_ref().map(|r| (&r.id, r.rank as usize)) != want.as_ref().and_then(|a| a.group.as_ref()).map(|g| (&g.id, g.rank));
            // A failed load stays reported (and is not retried) until placement asks for
            // something else.
            if changed && !(failed_here && want.is_none()) {
                if let Some(old) = slot.replace(None) {
                    eprintln!("kiln-worker: unloading `{}`", old.info.model_id);
                    old.shutdown();
                }
                if let Some(g) = membership.lock().unwrap_or_else(|e| e.into_inner()).group.take() {
                    g.close();
                }
                hosting.set_all(None, None);
                if let Some(a) = want {
                    let source = snap.placements.get(&a.model).map_or_else(|| a.model.clone(), |p| p.source.clone());
                    let ctx = Context { args: Arc::clone(&args), slot: Arc::clone(&slot), hosting: Arc::clone(&hosting), membership: Arc::clone(&membership), wake: Arc::clone(&wake) };
                    load(ctx, &snap, a, source).await;
                }
            }
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = wake.notified() => {}
            // Re-read the assignment when a cooldown may have ended.
            _ = tokio::time::sleep(cooldown) => {}
        }
    }
}

struct Context {
    args: Arc<ServeArgs>,
    slot: Arc<ModelSlot>,
    hosting: Arc<Hosting>,
    membership: Arc<Mutex<Membership>>,
    wake: Arc<tokio::sync::Notify>,
}

impl Context {
    /// The group failed (or ended): forget the share, keep the members apart for a while, and
    /// have the placement loop look again.
    fn group_over(&self, group_id: &str, why: Option<String>) {
        if let Some(old) = self.slot.replace(None) {
            old.shutdown();
        }
        let mut m = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        m.group = None;
        if let Some(why) = why {
            eprintln!("kiln-worker: tensor-parallel group `{group_id}` failed: {why}; unloaded, back in the pool");
            m.failed.insert(group_id.to_string(), Instant::now());
        }
        drop(m);
        self.hosting.set_all(None, None);
        self.wake.notify_one();
    }
}

async fn load(ctx: Context, snap: &Snapshot, a: Assignment, source: String) {
    let model = a.model.clone();
    let tp = match &a.group {
        None => None,
        Some(g) => {
            let leader = if g.rank == 0 {
                ctx.args.tp_listen_addr()
            } else {
                match snap.workers.get(&g.members[0]).and_then(|w| w.tp_addr.clone()) {
                    Some(addr) => addr,
                    None => {
                        let reason = format!("rank 0 of group `{}` ({}) publishes no group address", g.id, g.members[0]);
                        ctx.hosting.set(Some(ModelStatus { id: model, phase: ModelPhase::Failed, reason: Some(reason) }));
                        return;
                    }
                }
            };
            Some(TpConfig {
                rank: g.rank,
                size: g.members.len(),
                group: g.id.clone(),
                leader,
                timeout: Duration::from_secs(ctx.args.engine.tp.tp_timeout_secs),
                layout: ctx.args.engine.tp.tp_layout,
            })
        }
    };
    let role = a.group.as_ref().map(|g| GroupRole { id: g.id.clone(), rank: g.rank as u32, members: g.members.clone() });
    match &role {
        Some(r) => eprintln!("kiln-worker: placement assigns `{model}` (from {source}) as rank {} of group `{}` ({}); loading", r.rank, r.id, r.members.join(", ")),
        None => eprintln!("kiln-worker: placement assigns `{model}` (from {source}); loading"),
    }
    ctx.hosting.set_all(Some(ModelStatus { id: model.clone(), phase: ModelPhase::Loading, reason: None }), role.clone());
    if let Some(cfg) = tp.clone().filter(|c| c.rank > 0) {
        // A following rank: its share computes rank 0's steps on a thread of its own until
        // the group ends.
        std::thread::spawn(move || follow_rank(ctx, cfg, model, source));
        return;
    }
    let (a, m, s, t) = (Arc::clone(&ctx.args), model.clone(), source.clone(), tp.clone());
    let loaded = tokio::task::spawn_blocking(move || load_serving(&a, &s, &m, t.as_ref())).await;
    match loaded {
        Ok(Ok((serving, group))) => {
            ctx.slot.replace(Some(Arc::new(serving)));
            ctx.hosting.set(Some(ModelStatus { id: model.clone(), phase: ModelPhase::Ready, reason: None }));
            eprintln!("kiln-worker: serving `{model}`");
            if let (Some(group), Some(cfg)) = (group, tp) {
                ctx.membership.lock().unwrap_or_else(|e| e.into_inner()).group = Some(Arc::clone(&group));
                let membership = Arc::clone(&ctx.membership);
                let watched = Arc::clone(&group);
                let ours = move || membership.lock().unwrap_or_else(|e| e.into_inner()).group.as_ref().is_some_and(|g| Arc::ptr_eq(g, &watched));
                super::tp::watch(group, ours, move |e| ctx.group_over(&cfg.group, Some(e.to_string())));
            }
        }
        Ok(Err(e)) => {
            let reason = super::describe(&e);
            eprintln!("kiln-worker: cannot load `{model}` from {source}: {reason}");
            if let Some(cfg) = &tp {
                ctx.membership.lock().unwrap_or_else(|e| e.into_inner()).failed.insert(cfg.group.clone(), Instant::now());
            }
            ctx.hosting.set(Some(ModelStatus { id: model, phase: ModelPhase::Failed, reason: Some(reason) }));
        }
        Err(e) => ctx.hosting.set(Some(ModelStatus { id: model, phase: ModelPhase::Failed, reason: Some(format!("the loader crashed: {e}")) })),
    }
}

fn follow_rank(ctx: Context, cfg: TpConfig, model: String, source: String) {
    let path = match kiln_worker::assets::resolve(&source, &mut |msg| eprintln!("kiln: {msg}")) {
        Ok(p) => p,
        Err(e) => {
            ctx.hosting.set(Some(ModelStatus { id: model, phase: ModelPhase::Failed, reason: Some(e.to_string()) }));
            return;
        }
    };
    let rank = match kiln_worker::parallel::load_rank(&path, ctx.args.engine.isq, &cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiln-worker: cannot join group `{}` as rank {}: {e}", cfg.group, cfg.rank);
            ctx.membership.lock().unwrap_or_else(|e| e.into_inner()).failed.insert(cfg.group.clone(), Instant::now());
            ctx.hosting.set(Some(ModelStatus { id: model, phase: ModelPhase::Failed, reason: Some(e.to_string()) }));
            return;
        }
    };
    let group: Arc<dyn Collective> = rank.group.clone();
    ctx.membership.lock().unwrap_or_else(|e| e.into_inner()).group = Some(Arc::clone(&group));
    ctx.hosting.set(Some(ModelStatus { id: model.clone(), phase: ModelPhase::Ready, reason: None }));
    eprintln!("kiln-worker: rank {} of group `{}` ready, following rank 0 at {}", cfg.rank, cfg.group, cfg.leader);
    let compute = super::compute(ctx.args.threads);
    let steps = AtomicU64::new(0);
    let outcome = step::follow(&*rank.model.model, &compute, &group, &steps);
    drop(rank);
    let still_ours = ctx.membership.lock().unwrap_or_else(|e| e.into_inner()).group.as_ref().is_some_and(|g| Arc::ptr_eq(g, &group));
    if !still_ours {
        return; // placement ended it
    }
    match outcome {
        Ok(_) => {
            eprintln!("kiln-worker: rank 0 closed group `{}` after {} steps", cfg.group, steps.into_inner());
            ctx.group_over(&cfg.group, Some("rank 0 left the group".into()));
        }
        Err(e) => ctx.group_over(&cfg.group, Some(e.to_string())),
    }
}
