//! Tensor parallelism: one model split across the ranks of a group, Megatron-style.
//!
//! Every rank holds a slice of each projection: q/k/v and gate/up by output rows
//! (column-parallel), a contiguous run of attention heads with the key/value heads they read,
//! o and down split as the `Layout` says (by output rows, their inputs and outputs gathered:
//! the default, bit-identical to one worker; or Megatron's input columns with an all-reduce),
//! a slice of the vocabulary for the embedding table and the output head, and a share of the
//! experts of a mixture-of-experts block. Norms and the residual stream are replicated, so
//! after each block every rank holds the same hidden state.
//!
//! The output head's logits are gathered to rank 0, which alone samples: the other ranks
//! never need them, and one gather of `[rows, vocab / size]` per rank costs less than an
//! all-gather and far less than a distributed sampler that must agree on penalties, grammar
//! masks and seeds.
//!
//! `Collective` is what the layers call; `tcp::TcpGroup` implements it between processes over
//! TCP (any machines, and the backend the tests use). Rank 0 runs the engine; `step` carries
//! each forward pass to the other ranks, which run the same layers in lockstep.

pub mod step;
pub mod tcp;

use std::ops::Range;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("tensor-parallel rank {rank}: {what}")]
    Peer { rank: usize, what: String },
    #[error("tensor-parallel group: {0}")]
    Group(String),
}

/// The operations a sharded model needs from its group. Every rank calls the same operations
/// in the same order; sums are taken in rank order, so results do not depend on timing and
/// every rank gets the same bits.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf`, added in rank order.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every rank's `local` (lengths may differ), in rank order, on every rank.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, CollectiveError>;
    /// Every rank's `local` in rank order on rank 0; None elsewhere.
    fn gather(&self, local: &[f32]) -> Result<Option<Vec<Vec<f32>>>, CollectiveError>;
    /// Rank 0's `bytes` on every rank.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<(), CollectiveError>;
    fn barrier(&self) -> Result<(), CollectiveError>;
    /// On ranks other than 0: waits, without a time limit, for rank 0's next broadcast (the
    /// next step). Ok(None) when rank 0 closed the group.
    fn next_broadcast(&self) -> Result<Option<Vec<u8>>, CollectiveError>;
    /// Seconds spent in collectives so far (for metrics).
    fn seconds(&self) -> f64;
    /// Runs one step (a forward pass, many collectives) with the group to itself: the checks
    /// of `check_alive` wait until it is over.
    fn run_step(&self, step: &mut dyn FnMut() -> crate::Result<()>) -> crate::Result<()>;
    /// Whether every other rank is still there and running, checked between steps only: a
    /// rank whose connection closed, or that does not answer, fails the group at once instead
    /// of at the next step.
    fn check_alive(&self) -> Result<(), CollectiveError>;
    /// Ends this rank's part in the group; the other ranks see it leave.
    fn close(&self);
}

/// The rank a model is loaded as, and the group it computes with.
#[derive(Clone)]
pub struct Shard {
    pub rank: usize,
    pub size: usize,
    pub collective: Arc<dyn Collective>,
    pub layout: Layout,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.rank, self.size)
    }
}

/// How one process takes part in a group (the `--tp-*` options).
#[derive(Clone, Debug)]
pub struct TpConfig {
    pub rank: usize,
    pub size: usize,
    /// The group's name: ranks of different groups refuse each other.
    pub group: String,
    /// Rank 0's address for the group's traffic (rank 0 listens there).
    pub leader: String,
    /// How long to wait for the group to form and load, and for any rank during a step.
    pub timeout: std::time::Duration,
    pub layout: Layout,
}

/// A rank's share of a model, loaded once the whole group has formed, and its group.
pub struct RankModel {
    pub model: crate::loader::LoadedModel,
    pub group: Arc<tcp::TcpGroup>,
}

/// Joins the group, loads this rank's share of the model at `path`, and waits until every
/// rank has loaded its share. Ranks that load different files, or disagree on the group, are
/// refused before anything is loaded.
pub fn load_rank(path: &std::path::Path, isq: Option<kiln_kernels::DType>, tp: &TpConfig) -> crate::Result<RankModel> {
    let member = tcp::Member { rank: tp.rank, size: tp.size, group: tp.group.clone(), model: model_identity(path, isq)?, layout: tp.layout };
    let group = Arc::new(tcp::TcpGroup::join(&tcp::GroupSpec { member, leader: tp.leader.clone(), timeout: tp.timeout })?);
    let shard = Shard { rank: tp.rank, size: tp.size, collective: Arc::clone(&group) as Arc<dyn Collective>, layout: tp.layout };
    let model = crate::loader::LoadedModel::load_shard(path, isq, Some(shard))?;
    group.barrier()?;
    Ok(RankModel { model, group })
}

/// What ranks compare to be sure they load the same model: the file's (or directory's) name,
/// size, a digest of its first MiB (a GGUF header and metadata; a checkpoint's config), and
/// the load-time quantization.
pub fn model_identity(path: &std::path::Path, isq: Option<kiln_kernels::DType>) -> crate::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let io = |source| crate::Error::Io { path: path.to_path_buf(), source };
    let mut digest = sha2::Sha256::new();
    let mut size = 0u64;
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors" || x == "json"))
            .collect();
        names.sort();
        names
    } else {
        vec![path.to_path_buf()]
    };
    for file in &files {
        let f = std::fs::File::open(file).map_err(io)?;
        size += f.metadata().map_err(io)?.len();
        let mut head = Vec::new();
        f.take(1 << 20).read_to_end(&mut head).map_err(io)?;
        digest.update(file.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        digest.update(&head);
    }
    let hex: String = digest.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    Ok(format!("{name} ({size} bytes, {hex}){}", isq.map(|t| format!(" quantized at load to {}", t.name())).unwrap_or_default()))
}

/// How the ranks' shares of a block become the whole result on every rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Every value is computed by one rank exactly as the whole model computes it: the output
    /// projections (o, down) take the whole input, gathered from the ranks, and split their
    /// output rows, which are gathered back; a mixture's expert outputs are gathered and added
    /// in expert order. A group gives the bits one worker gives (and so the tokens: a stream
    /// resumed on another worker continues as it would have), for two gathers per block
    /// instead of one all-reduce.
    #[default]
    Exact,
    /// Megatron-LM's: the output projections split their input columns and the ranks'
    /// partial outputs are summed by one all-reduce. Fewer, smaller messages; the sums'
    /// order differs from one worker's, so results agree within f32 rounding, and a greedy
    /// continuation may part from one worker's where two tokens were nearly tied.
    Megatron,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Exact => "exact",
            Layout::Megatron => "megatron",
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Layout, String> {
        match s {
            "exact" => Ok(Layout::Exact),
            "megatron" => Ok(Layout::Megatron),
            _ => Err(format!("unknown tensor-parallel layout `{s}` (exact or megatron)")),
        }
    }
}

/// What a split block does with its output projection: nothing special for a whole model, or
/// the `Layout`'s collectives.
#[derive(Clone, Default)]
pub enum Combine {
    #[default]
    Whole,
    Sum(Arc<dyn Collective>),
    Gather(Arc<dyn Collective>),
}

impl Combine {
    pub fn over(shard: Option<&Shard>) -> Combine {
        match shard.filter(|s| s.size > 1) {
            None => Combine::Whole,
            Some(s) if s.layout == Layout::Megatron => Combine::Sum(Arc::clone(&s.collective)),
            Some(s) => Combine::Gather(Arc::clone(&s.collective)),
        }
    }

    /// Sums `buf` over the group whatever the layout (for values only one rank gives, so the
    /// sum is exact: the embedding rows of a split vocabulary).
    pub fn all_reduce(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        match self {
            Combine::Whole => Ok(()),
            Combine::Sum(c) | Combine::Gather(c) => c.all_reduce_sum(buf),
        }
    }
}

/// Puts the ranks' `[rows, w_r]` slices together row by row, in rank order, into
/// `[rows, sum of w_r]` on every rank.
pub fn gather_rows(c: &dyn Collective, local: &[f32], rows: usize, out: &mut [f32]) -> Result<(), CollectiveError> {
    join_rows(&c.all_gather(local)?, rows, out)
}

/// Puts `[rows, w_r]` slices together row by row, in order, into `[rows, sum of w_r]`.
pub fn join_rows(parts: &[Vec<f32>], rows: usize, out: &mut [f32]) -> Result<(), CollectiveError> {
    let widths: Vec<usize> = parts.iter().map(|p| p.len().checked_div(rows).unwrap_or(0)).collect();
    let total: usize = widths.iter().sum();
    if parts.iter().zip(&widths).any(|(p, w)| p.len() != w * rows) || out.len() < rows * total {
        return Err(CollectiveError::Group(format!("gathered slices of {widths:?} values per row do not fill {} values of {rows} rows", out.len())));
    }
    for row in 0..rows {
        let mut at = row * total;
        for (p, &w) in parts.iter().zip(&widths) {
            out[at..at + w].copy_from_slice(&p[row * w..(row + 1) * w]);
            at += w;
        }
    }
    Ok(())
}

/// Part `rank` of `units` split over `size` parts as evenly as possible (the first parts get
/// one more when it does not divide).
pub fn split_even(units: usize, rank: usize, size: usize) -> Range<usize> {
    let (base, extra) = (units / size, units % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The attention heads one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadSplit {
    pub q: Range<usize>,
    pub kv: Range<usize>,
}

/// Splits `num_heads` query heads sharing `num_kv_heads` key/value heads over `size` ranks so
/// that each rank's query heads share its key/value heads evenly (what the attention kernel
/// computes): with at least as many key/value heads as ranks, each rank takes whole groups;
/// with fewer, each group's query heads are split over several ranks, each holding a copy of
/// the group's key/value head.
pub fn split_heads(num_heads: usize, num_kv_heads: usize, rank: usize, size: usize) -> Result<HeadSplit, String> {
    if size > num_heads {
        return Err(format!("{size} ranks cannot share {num_heads} attention heads (at most {num_heads} ranks)"));
    }
    let group = num_heads / num_kv_heads;
    if num_kv_heads >= size {
        let kv = split_even(num_kv_heads, rank, size);
        return Ok(HeadSplit { q: kv.start * group..kv.end * group, kv });
    }
    // Fewer key/value heads than ranks: ranks are dealt to the groups as evenly as possible.
    let g = (0..num_kv_heads).find(|&g| split_even(size, g, num_kv_heads).contains(&rank)).unwrap_or(0);
    let ranks = split_even(size, g, num_kv_heads);
    if ranks.len() > group {
        return Err(format!(
            "{size} ranks cannot share {num_heads} attention heads in {num_kv_heads} key/value groups of {group}: a group would be split over {} ranks",
            ranks.len()
        ));
    }
    let q = split_even(group, rank - ranks.start, ranks.len());
    Ok(HeadSplit { q: g * group + q.start..g * group + q.end, kv: g..g + 1 })
}

/// Part `rank` of a dimension of `len` values split over `size` ranks in whole blocks of
/// `block` values (the quantization blocks of the weights that read it by columns).
pub fn split_blocks(len: usize, block: usize, rank: usize, size: usize, what: &str) -> Result<Range<usize>, String> {
    if !len.is_multiple_of(block) || len / block < size {
        return Err(format!("{what} of {len} values cannot be split over {size} ranks in whole blocks of {block}"));
    }
    let part = split_even(len / block, rank, size);
    Ok(part.start * block..part.end * block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_splits_cover_everything_once() {
        for units in 0..20 {
            for size in 1..6 {
                let parts: Vec<_> = (0..size).map(|r| split_even(units, r, size)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, units);
                assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
                assert!(parts.iter().all(|p| p.len() == units / size || p.len() == units / size + 1));
            }
        }
    }

    #[test]
    fn heads_split_by_groups_or_within_them() {
        // SmolLM2: 9 query heads, 3 key/value heads.
        assert_eq!(split_heads(9, 3, 0, 2), Ok(HeadSplit { q: 0..6, kv: 0..2 }));
        assert_eq!(split_heads(9, 3, 1, 2), Ok(HeadSplit { q: 6..9, kv: 2..3 }));
        assert_eq!(split_heads(9, 3, 2, 3), Ok(HeadSplit { q: 6..9, kv: 2..3 }));
        // Gemma 3 270M: 4 query heads, 1 key/value head, copied to every rank.
        assert_eq!(split_heads(4, 1, 1, 2), Ok(HeadSplit { q: 2..4, kv: 0..1 }));
        assert_eq!(split_heads(4, 1, 0, 3), Ok(HeadSplit { q: 0..2, kv: 0..1 }));
        assert_eq!(split_heads(4, 1, 2, 3), Ok(HeadSplit { q: 3..4, kv: 0..1 }));
        // 4 heads in 2 groups over 3 ranks: the first group is split, the second whole.
        assert_eq!(split_heads(4, 2, 0, 3), Ok(HeadSplit { q: 0..1, kv: 0..1 }));
        assert_eq!(split_heads(4, 2, 1, 3), Ok(HeadSplit { q: 1..2, kv: 0..1 }));
        assert_eq!(split_heads(4, 2, 2, 3), Ok(HeadSplit { q: 2..4, kv: 1..2 }));
        assert!(split_heads(4, 2, 0, 5).unwrap_err().contains("at most 4 ranks"));
        // 6 heads in 2 groups of 3 over 5 ranks: three ranks share one group, two the other.
        assert_eq!(split_heads(6, 2, 2, 5), Ok(HeadSplit { q: 2..3, kv: 0..1 }));
        assert_eq!(split_heads(6, 2, 4, 5), Ok(HeadSplit { q: 5..6, kv: 1..2 }));
    }

    #[test]
    fn every_head_is_computed_exactly_once() {
        for (heads, kv) in [(9, 3), (4, 1), (4, 2), (8, 2), (12, 4), (16, 8), (32, 8), (6, 6)] {
            for size in 1..=heads {
                let Ok(parts) = (0..size).map(|r| split_heads(heads, kv, r, size)).collect::<Result<Vec<_>, _>>() else { continue };
                let mut seen = vec![0; heads];
                for p in &parts {
                    p.q.clone().for_each(|h| seen[h] += 1);
                    let group = heads / kv;
                    // Each rank's query heads use exactly its key/value heads, evenly.
                    assert_eq!(p.q.start / group, p.kv.start, "{heads}/{kv} over {size}: {p:?}");
                    assert_eq!((p.q.end - 1) / group, p.kv.end - 1, "{heads}/{kv} over {size}: {p:?}");
                    assert!(p.q.len().is_multiple_of(p.kv.len()), "{heads}/{kv} over {size}: {p:?}");
                }
                assert!(seen.iter().all(|&n| n == 1), "{heads}/{kv} over {size}: {parts:?}");
            }
        }
    }

    #[test]
    fn block_splits_keep_whole_blocks() {
        assert_eq!(split_blocks(1536, 32, 1, 2, "x"), Ok(768..1536));
        assert_eq!(split_blocks(2048, 256, 2, 3, "x"), Ok(1536..2048));
        assert!(split_blocks(256, 256, 0, 2, "the MLP").unwrap_err().contains("blocks of 256"));
    }
}
