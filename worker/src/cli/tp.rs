//! The `--tp-*` options: running one rank of a tensor-parallel group. Rank 0 is the worker
//! routers talk to (`serve`), or the process that runs or benchmarks the model (`run`,
//! `bench`); the other ranks only compute their share of each step, whatever the command.

use kiln_worker::parallel::{step, Collective, CollectiveError, Layout, TpConfig};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Clone, Debug)]
pub struct TpArgs {
    /// Ranks of the tensor-parallel group this process belongs to (1: the whole model here)
    #[arg(long, default_value_t = 1, env = "KILN_WORKER_TP_SIZE")]
    pub tp_size: usize,
    /// This process's rank in the group: 0 runs the engine, the others follow its steps
    #[arg(long, default_value_t = 0, env = "KILN_WORKER_TP_RANK")]
    pub tp_rank: usize,
    /// Name of the group; ranks of other groups are refused
    #[arg(long, default_value = "kiln", env = "KILN_WORKER_TP_GROUP")]
    pub tp_group: String,
    /// Rank 0's address for the group's traffic, host:port: rank 0 listens there, the other
    /// ranks connect to it
    #[arg(long, env = "KILN_WORKER_TP_LEADER")]
    pub tp_leader: Option<String>,
    /// Seconds to wait for every rank to join and load, and for any rank during a step
    #[arg(long, default_value_t = 120, env = "KILN_WORKER_TP_TIMEOUT_SECS")]
    pub tp_timeout_secs: u64,
    /// How the ranks combine their shares: `exact` gives the bits one worker gives (two
    /// gathers per block), `megatron` one all-reduce per block, equal within f32 rounding
    #[arg(long, default_value = "exact", env = "KILN_WORKER_TP_LAYOUT")]
    pub tp_layout: Layout,
}

impl TpArgs {
    /// The group to join, or None to load the whole model.
    pub fn config(&self) -> anyhow::Result<Option<TpConfig>> {
        if self.tp_size == 0 {
            anyhow::bail!("--tp-size must be at least 1");
        }
        if self.tp_rank >= self.tp_size {
            anyhow::bail!("--tp-rank {} is not a rank of a group of {} (0 to {})", self.tp_rank, self.tp_size, self.tp_size - 1);
        }
        if self.tp_size == 1 {
            return Ok(None);
        }
        let Some(leader) = self.tp_leader.clone() else {
            anyhow::bail!("--tp-size {} needs --tp-leader HOST:PORT, rank 0's address for the group", self.tp_size);
        };
        if self.tp_timeout_secs == 0 {
            anyhow::bail!("--tp-timeout-secs must be at least 1");
        }
        Ok(Some(TpConfig {
            rank: self.tp_rank,
            size: self.tp_size,
            group: self.tp_group.clone(),
            leader,
            timeout: Duration::from_secs(self.tp_timeout_secs),
            layout: self.tp_layout,
        }))
    }

    pub fn is_follower(&self) -> bool {
        self.tp_size > 1 && self.tp_rank > 0
    }
}

/// Rank 0's watch over its group, on a thread of its own: four times a second, between steps,
/// whether every rank is still there and running. Ends when `wanted` says the group is no
/// longer this worker's, or at the first failure, which goes to `failed`.
pub fn watch(group: Arc<dyn Collective>, wanted: impl Fn() -> bool + Send + 'static, failed: impl FnOnce(CollectiveError) + Send + 'static) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(250));
        if !wanted() {
            return;
        }
        if let Err(e) = group.check_alive() {
            failed(e);
            return;
        }
    });
}

/// A rank other than 0: loads its share, then computes every step rank 0 sends until rank 0
/// closes the group (exit 0) or the group fails (a rank died or hung: an error, exit 1).
pub fn follow(model_arg: &str, isq: Option<kiln_kernels::DType>, threads: Option<usize>, tp: &TpArgs) -> anyhow::Result<()> {
    let Some(cfg) = tp.config()? else { anyhow::bail!("not a following rank") };
    let path = kiln_worker::assets::resolve(model_arg, &mut |msg| eprintln!("kiln: {msg}"))?;
    let t = std::time::Instant::now();
    let rank = kiln_worker::parallel::load_rank(&path, isq, &cfg)?;
    let c = rank.model.model.config();
    eprintln!(
        "kiln: rank {} of {} in group `{}`: loaded {} heads and {} key/value heads of {} in {:.0} ms; following rank 0 at {}",
        cfg.rank,
        cfg.size,
        cfg.group,
        c.num_heads,
        c.num_kv_heads,
        path.display(),
        t.elapsed().as_secs_f64() * 1e3,
        cfg.leader
    );
    let compute = super::compute(threads);
    let collective: Arc<dyn Collective> = rank.group.clone();
    let steps = AtomicU64::new(0);
    match step::follow(&*rank.model.model, &compute, &collective, &steps) {
        Ok(step::FollowEnd::LeaderLeft) => {
            eprintln!("kiln: rank 0 closed group `{}` after {} steps; exiting", cfg.group, steps.into_inner());
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("rank {} of group `{}`: {e}", cfg.rank, cfg.group)),
    }
}
