//! Decode attention of SEQS sequences of CONTEXT keys each, one layer, on THREADS threads:
//! `cargo run --release -p kiln-kernels --example attention_speed -- [SEQS] [CONTEXT] [HEADS]
//! [KV_HEADS] [HEAD_DIM] [THREADS] [LAYERS]` (defaults 16 200 9 3 64 1 30: SmolLM2's attention in batched
//! decode). The ISA is the one `KILN_ISA` or the CPU chooses. Reports nanoseconds per
//! (query head, key) pair, the unit the kernels' cost is counted in, with the keys and
//! values of one layer reused (from cache) and of LAYERS layers in turn (default 30, so they
//! come from memory as in a decode step).
mod common;

use kiln_kernels::attention::{attention, AttentionParams, AttentionScratch, KvStore, SeqSpan};
use kiln_kernels::Compute;
use std::time::Instant;

/// The pool holds this many times the blocks the sequences use.
const SPREAD: usize = 4;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (seqs, context, heads, kv_heads, head_dim, threads, layers) = (arg(0, 16), arg(1, 200), arg(2, 9), arg(3, 3), arg(4, 64), arg(5, 1), arg(6, 30));
    if [seqs, context, heads, kv_heads, head_dim, threads, layers].contains(&0) || !heads.is_multiple_of(kv_heads) {
        return Err("every argument must be positive, and HEADS a multiple of KV_HEADS".into());
    }
    let block_size = 16;
    let blocks_per_seq = context.div_ceil(block_size);
    let mut stores: Vec<KvStore> = (0..layers).map(|_| KvStore::new(SPREAD * seqs * blocks_per_seq * block_size, kv_heads, head_dim)).collect();
    let mut next = common::uniform();
    let row: Vec<f32> = (0..kv_heads * head_dim).map(|_| next()).collect();
    for kv in &mut stores {
        for slot in 0..kv.num_slots() {
            let v: Vec<f32> = row.iter().map(|x| x * next()).collect();
            kv.write(slot, &row, &v);
        }
    }
    // Sequences' blocks interleaved in a pool of free and used blocks, as a running engine
    // leaves them.
    let tables: Vec<Vec<u32>> = (0..seqs).map(|s| (0..blocks_per_seq).map(|b| (SPREAD * (b * seqs + s)) as u32).collect()).collect();
    let spans: Vec<SeqSpan> = tables.iter().enumerate().map(|(s, t)| SeqSpan { rows: s..s + 1, first_pos: context - 1, block_table: t, bidirectional: &[] }).collect();
    let p = AttentionParams { num_heads: heads, num_kv_heads: kv_heads, head_dim, scale: 0.125, window: None, softcap: None, block_size };
    let q: Vec<f32> = (0..seqs * heads * head_dim).map(|_| next()).collect();
    let mut out = vec![0f32; q.len()];
    let compute = Compute::new(threads);
    let mut scratch = AttentionScratch::default();
    println!("{seqs} sequences x {context} keys, {heads} heads over {kv_heads}, head_dim {head_dim}, {threads} threads, isa {:?}", compute.isa);
    for round in 0..6 {
        let (label, used) = if round % 2 == 0 { ("one layer from cache", 1) } else { ("layers in turn", stores.len()) };
        let reps = (1_000_000_000 / (seqs * context * heads * head_dim)).max(3).div_ceil(used) * used;
        let start = Instant::now();
        for r in 0..reps {
            attention(&compute, &p, &stores[r % used], &spans, &q, &mut out, &mut scratch);
        }
        let secs = start.elapsed().as_secs_f64();
        println!("{label}: {:.2} ns per (head, key), {:.1} us a layer", secs / (reps * seqs * heads * context) as f64 * 1e9, secs / reps as f64 * 1e6);
    }
    Ok(())
}
