//! Running a sharded model in lockstep: rank 0 wraps its shard in `Leader`, a `CausalLm` whose
//! every forward pass first sends the step (the batch, the cache's shape and the block copies
//! made since the last step) to the other ranks; they run `follow`, which replays each step on
//! their own shard and cache. The layers' collectives keep the ranks together inside a pass.

use super::{Collective, Shard};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::layers::Compute;
use crate::models::batch::{Batch, SeqBatch};
use crate::models::config::ModelConfig;
use crate::models::scratch::Scratch;
use crate::models::{CausalLm, Output};
use std::sync::Arc;

/// Rank 0's model: its shard, sending each step to the group before running it.
pub struct Leader {
    pub inner: Box<dyn CausalLm>,
    pub shard: Shard,
}

impl CausalLm for Leader {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn kv_cache(&self, block_size: usize, blocks: &[usize]) -> Result<KvCache> {
        self.inner.kv_cache(block_size, blocks)
    }

    fn device(&self) -> String {
        self.inner.device()
    }

    fn device_memory(&self) -> Option<(usize, usize)> {
        self.inner.device_memory()
    }

    fn run(&self, compute: &Compute, batch: &Batch, kv: &mut KvCache, scratch: &mut Scratch, output: Output, out: &mut Vec<f32>) -> Result<()> {
        kv.record_copies = true;
        let mut msg = encode(batch, kv, output);
        kv.copies.clear();
        self.shard.collective.run_step(&mut || {
            self.shard.collective.broadcast(&mut msg)?;
            self.inner.run(compute, batch, kv, scratch, output, out)
        })
    }
}

/// Why `follow` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum FollowEnd {
    /// Rank 0 closed the group (it shut down or dropped the model).
    LeaderLeft,
}

/// The loop of ranks other than 0: receives each step, runs it on this rank's shard, until
/// rank 0 closes the group. Errors of the group (a rank died or hung) end it with the error.
pub fn follow(model: &dyn CausalLm, compute: &Compute, collective: &Arc<dyn Collective>, steps: &std::sync::atomic::AtomicU64) -> Result<FollowEnd> {
    let mut kv: Option<KvCache> = None;
    let mut scratch = Scratch::default();
    let mut out = Vec::new();
    loop {
        let Some(msg) = collective.next_broadcast()? else { return Ok(FollowEnd::LeaderLeft) };
        let step = decode(&msg).map_err(|what| Error::InvalidRequest(format!("rank 0 sent a malformed step: {what}")))?;
        let cache = match kv.take() {
            Some(c) if c.block_size == step.block_size && c.groups.iter().map(|g| g.num_blocks).eq(step.blocks.iter().copied()) => c,
            // A new engine or session on rank 0: a cache of the same shape, for this rank's heads.
            _ => model.kv_cache(step.block_size, &step.blocks)?,
        };
        let cache = kv.insert(cache);
        for &(g, from, to) in &step.copies {
            if g >= cache.groups.len() || from as usize >= cache.groups[g].num_blocks || to as usize >= cache.groups[g].num_blocks {
                return Err(Error::InvalidRequest(format!("rank 0 asked to copy block {from} to {to} of cache group {g}, which this rank does not have")));
            }
            cache.copy_block(g, from, to)?;
        }
        if !step.batch.seqs.iter().all(|s| s.block_tables.iter().zip(&cache.groups).all(|(t, g)| t.iter().all(|&b| b == crate::kv_cache::NO_BLOCK || (b as usize) < g.num_blocks))) {
            return Err(Error::InvalidRequest("rank 0 sent a step that names blocks outside the cache".into()));
        }
        // Errors of the request itself (a token outside the vocabulary) fail the same way on
        // every rank, before any collective, so the group stays in step.
        match model.run(compute, &step.batch, cache, &mut scratch, step.output, &mut out) {
            Ok(()) => {}
            Err(Error::Collective(e)) => return Err(Error::Collective(e)),
            Err(e) => tracing::debug!("a step failed on this rank as on rank 0: {e}"),
        }
        steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

struct Step {
    batch: Batch,
    block_size: usize,
    blocks: Vec<usize>,
    copies: Vec<(usize, u32, u32)>,
    output: Output,
}

fn put(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

fn put_all(out: &mut Vec<u8>, vs: impl ExactSizeIterator<Item = usize>) {
    put(out, vs.len());
    vs.for_each(|v| put(out, v));
}

fn encode(batch: &Batch, kv: &KvCache, output: Output) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + batch.num_rows() * 16);
    m.push(match output {
        Output::Logits => 0,
        Output::Hidden => 1,
    });
    put(&mut m, kv.block_size);
    put_all(&mut m, kv.groups.iter().map(|g| g.num_blocks));
    put(&mut m, kv.copies.len());
    for &(g, from, to) in &kv.copies {
        put(&mut m, g);
        put(&mut m, from as usize);
        put(&mut m, to as usize);
    }
    put(&mut m, batch.block_size);
    put_all(&mut m, batch.tokens.iter().map(|&t| t as usize));
    put_all(&mut m, batch.positions.iter().copied());
    put(&mut m, batch.slots.len());
    for slots in &batch.slots {
        put_all(&mut m, slots.iter().map(|&s| s as usize));
    }
    put(&mut m, batch.seqs.len());
    for s in &batch.seqs {
        put(&mut m, s.rows.start);
        put(&mut m, s.rows.end);
        put(&mut m, s.first_pos);
        put(&mut m, s.block_tables.len());
        for t in &s.block_tables {
            put_all(&mut m, t.iter().map(|&b| b as usize));
        }
    }
    put_all(&mut m, batch.logit_rows.iter().copied());
    m
}

/// Reads what `encode` wrote, checking every length and index against what it describes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.bytes.get(self.at..self.at + 4).ok_or("it ends early")?;
        self.at += 4;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn usize(&mut self) -> std::result::Result<usize, String> {
        self.u32().map(|v| v as usize)
    }

    /// A count of items of at least `item_bytes` each: no more than the bytes left can hold.
    fn count(&mut self, item_bytes: usize) -> std::result::Result<usize, String> {
        let n = self.usize()?;
        if n.saturating_mul(item_bytes.max(1)) > self.bytes.len() - self.at {
            return Err(format!("a count of {n} is more than the step holds"));
        }
        Ok(n)
    }

    fn list(&mut self) -> std::result::Result<Vec<u32>, String> {
        let n = self.count(4)?;
        (0..n).map(|_| self.u32()).collect()
    }
}

fn decode(bytes: &[u8]) -> std::result::Result<Step, String> {
    let mut r = Reader { bytes, at: 1 };
    let output = match bytes.first() {
        Some(0) => Output::Logits,
        Some(1) => Output::Hidden,
        _ => return Err("unknown output kind".into()),
    };
    let block_size = r.usize()?;
    let blocks: Vec<usize> = r.list()?.into_iter().map(|b| b as usize).collect();
    let n = r.count(12)?;
    let copies = (0..n).map(|_| Ok((r.usize()?, r.u32()?, r.u32()?))).collect::<std::result::Result<Vec<_>, String>>()?;
    let mut batch = Batch::new(r.usize()?);
    batch.tokens = r.list()?;
    batch.positions = r.list()?.into_iter().map(|p| p as usize).collect();
    let groups = r.count(4)?;
    batch.slots = (0..groups).map(|_| r.list()).collect::<std::result::Result<_, _>>()?;
    let rows = batch.tokens.len();
    if block_size == 0 || batch.block_size != block_size || batch.positions.len() != rows || groups != blocks.len() || batch.slots.iter().any(|s| s.len() != rows) {
        return Err("its rows, slots and cache groups disagree".into());
    }
    for (slots, &n) in batch.slots.iter().zip(&blocks) {
        if slots.iter().any(|&s| s as usize >= n * block_size) {
            return Err("a slot lies outside the cache".into());
        }
    }
    let seqs = r.count(16)?;
    for _ in 0..seqs {
        let (start, end, first_pos) = (r.usize()?, r.usize()?, r.usize()?);
        let tables = r.count(4)?;
        let block_tables = (0..tables).map(|_| r.list()).collect::<std::result::Result<Vec<_>, _>>()?;
        let covered = (first_pos + end.saturating_sub(start)).div_ceil(block_size);
        if start > end || end > rows || tables != groups || block_tables.iter().any(|t| t.len() < covered) {
            return Err("a sequence's rows or block tables are out of range".into());
        }
        batch.seqs.push(SeqBatch { rows: start..end, first_pos, block_tables, bidirectional: Vec::new() });
    }
    batch.logit_rows = r.list()?.into_iter().map(|x| x as usize).collect();
    if batch.logit_rows.iter().any(|&x| x >= rows) || r.at != bytes.len() {
        return Err("its logit rows are out of range, or it has bytes left over".into());
    }
    Ok(Step { batch, block_size, blocks, copies, output })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::batch::Logits;

    #[test]
    fn steps_survive_the_wire_and_malformed_ones_are_refused() {
        let v = serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16, "vocab_size": 32, "max_position_embeddings": 64, "rms_norm_eps": 1e-5});
        let cfg = crate::models::hf_config::from_hf(&v, "tiny").unwrap();
        let mut kv = KvCache::new(&cfg, 4, &[8]).unwrap();
        kv.copies.push((0, 1, 2));
        let mut batch = Batch::new(4);
        batch.push_seq(&[5, 6, 7], 0, vec![vec![3]], Logits::Last);
        batch.push_seq(&[9], 6, vec![vec![1, 2]], Logits::All);
        let msg = encode(&batch, &kv, Output::Logits);
        let step = decode(&msg).unwrap();
        assert_eq!(step.batch.tokens, batch.tokens);
        assert_eq!(step.batch.positions, batch.positions);
        assert_eq!(step.batch.slots, batch.slots);
        assert_eq!(step.batch.logit_rows, batch.logit_rows);
        assert_eq!(step.batch.seqs.len(), 2);
        assert_eq!(step.batch.seqs[1].block_tables, vec![vec![1, 2]]);
        assert_eq!((step.block_size, step.blocks.clone(), step.copies.clone(), step.output), (4, vec![8], vec![(0, 1, 2)], Output::Logits));
        // Every truncation, and every single corrupted byte, is refused or decodes to a step
        // whose indices stay inside the cache it names.
        for cut in 0..msg.len() {
            assert!(decode(&msg[..cut]).is_err(), "a step cut at {cut} bytes");
        }
        for i in 0..msg.len() {
            let mut bad = msg.clone();
            bad[i] ^= 0xff;
            if let Ok(s) = decode(&bad) {
                let cells: usize = s.blocks.iter().sum::<usize>() * s.block_size;
                assert!(s.batch.slots.iter().flatten().all(|&x| (x as usize) < cells));
            }
        }
    }
}
