use super::*;
use crate::sampler::Rng;

fn below(rng: &mut Rng, n: u64) -> u64 {
    rng.next_u64() % n
}

fn cfg(max_batch_tokens: usize, max_seqs: usize) -> SchedulerConfig {
    SchedulerConfig { max_batch_tokens, max_seqs, block_size: 4, max_scored_rows: max_batch_tokens }
}

/// Runs a plan as the engine would: advance, then give each finished chunk a next token.
fn step(s: &mut Scheduler, plan: &Plan, token: u32) {
    s.complete(plan);
    for e in plan.entries.iter().filter(|e| e.wants_logits) {
        s.push_token(e.id, token);
    }
}

/// Every block's reference count equals the number of block-table entries naming it.
fn check_refs(s: &Scheduler) {
    for (g, pool) in s.pools.iter().enumerate() {
        pool.check().unwrap();
        let mut counts = vec![0u32; pool.num_blocks()];
        for seq in s.running.iter().chain(s.waiting.iter()) {
            for &b in seq.block_tables[g].iter().filter(|&&b| b != NO_BLOCK) {
                counts[b as usize] += 1;
            }
        }
        for (b, &c) in counts.iter().enumerate() {
            assert_eq!(pool.ref_count(b as u32), c, "group {g} block {b}");
        }
    }
}

#[test]
fn decodes_run_every_step_and_prefill_is_chunked() {
    let mut s = Scheduler::new(cfg(8, 4), &[(64, None)]);
    s.add(SeqState::new(1, (0..5).collect(), 1));
    let p = s.schedule();
    assert_eq!(p.entries, [PlanEntry { id: 1, start: 0, len: 5, wants_logits: true, scored: 0..0 }]);
    step(&mut s, &p, 9);
    s.add(SeqState::new(2, (100..120).collect(), 1));
    let p = s.schedule();
    // The decode of 1 goes first, then 7 tokens of 2's prompt fill the budget of 8.
    assert_eq!(p.entries[0], PlanEntry { id: 1, start: 5, len: 1, wants_logits: true, scored: 0..0 });
    assert_eq!(p.entries[1], PlanEntry { id: 2, start: 0, len: 7, wants_logits: false, scored: 0..0 });
    step(&mut s, &p, 9);
    let p = s.schedule();
    assert_eq!(p.entries[1], PlanEntry { id: 2, start: 7, len: 7, wants_logits: false, scored: 0..0 });
    step(&mut s, &p, 9);
    let p = s.schedule();
    assert_eq!(p.entries[1], PlanEntry { id: 2, start: 14, len: 6, wants_logits: true, scored: 0..0 });
    check_refs(&s);
}

#[test]
fn shared_prefix_blocks_are_reused_and_counted() {
    let mut s = Scheduler::new(cfg(64, 4), &[(32, None)]);
    let system: Vec<u32> = (0..12).collect();
    let mut a = system.clone();
    a.extend([50, 51, 52]);
    s.add(SeqState::new(1, a, 1));
    let p = s.schedule();
    step(&mut s, &p, 7);
    let mut b = system.clone();
    b.extend([60, 61]);
    s.add(SeqState::new(2, b, 1));
    let p = s.schedule();
    let e = p.entries.iter().find(|e| e.id == 2).unwrap();
    assert_eq!((e.start, e.len), (12, 2), "three cached blocks skipped");
    assert_eq!(s.get(2).unwrap().num_cached_prompt, 12);
    assert_eq!(s.stats().prefix_hit_tokens, 12);
    let shared = s.get(1).unwrap().block_tables[0][..3].to_vec();
    assert_eq!(s.get(2).unwrap().block_tables[0][..3], shared[..]);
    check_refs(&s);
    // A prompt that is exactly cached still computes its last token.
    s.add(SeqState::new(3, system.clone(), 1));
    let p = s.schedule();
    let e = p.entries.iter().find(|e| e.id == 3).unwrap();
    assert_eq!((e.start, e.len), (8, 4));
}

#[test]
fn running_out_of_blocks_preempts_the_newest_and_it_recovers() {
    // 6 blocks of 4: two sequences of 10 prompt tokens take 3 blocks each.
    let mut s = Scheduler::new(cfg(64, 4), &[(6, None)]);
    s.add(SeqState::new(1, (0..10).collect(), 1));
    s.add(SeqState::new(2, (100..110).collect(), 1));
    let p = s.schedule();
    assert_eq!(p.entries.len(), 2);
    step(&mut s, &p, 1);
    // Both now have 11 tokens; growing to 12 fits, to 13 needs a 4th block for 1.
    for _ in 0..2 {
        let p = s.schedule();
        assert!(p.preempted.is_empty());
        step(&mut s, &p, 1);
    }
    let p = s.schedule();
    assert_eq!(p.preempted, [2], "the most recently admitted sequence yields");
    assert_eq!(p.entries.len(), 1);
    check_refs(&s);
    assert_eq!(s.get(2).unwrap().num_computed, 0);
    s.remove(1);
    let p = s.schedule();
    let e = &p.entries[0];
    assert_eq!(e.id, 2);
    assert!(e.start >= 8, "its own released blocks come back from the prefix cache (start {})", e.start);
    check_refs(&s);
}

#[test]
fn sliding_window_blocks_are_released_behind_the_window() {
    // Group 0 full attention, group 1 a window of 8 tokens.
    let mut s = Scheduler::new(cfg(64, 4), &[(32, None), (32, Some(8))]);
    s.add(SeqState::new(1, (0..30).collect(), 2));
    let p = s.schedule();
    step(&mut s, &p, 5);
    let seq = s.get(1).unwrap();
    // Next query at position 30 reads keys 23..=30: blocks 5..=7 of group 1 only.
    let held: Vec<usize> = (0..seq.block_tables[1].len()).filter(|&b| seq.block_tables[1][b] != NO_BLOCK).collect();
    assert_eq!(held, [5, 6, 7]);
    assert!(seq.block_tables[0].iter().all(|&b| b != NO_BLOCK));
    check_refs(&s);
    assert!(s.could_ever_fit(32 * 4));
    assert!(!s.could_ever_fit(33 * 4));
}

#[test]
fn random_submit_cancel_finish_preempt_never_double_books_or_leaks() {
    let mut rng = Rng::seeded(0xC0FFEE);
    for round in 0..20 {
        let groups: &[(usize, Option<usize>)] = if round % 2 == 0 { &[(24, None)] } else { &[(24, None), (10, Some(6))] };
        let mut s = Scheduler::new(cfg(1 + below(&mut rng, 20) as usize, 1 + below(&mut rng, 5) as usize), groups);
        let mut next_id = 0u64;
        let mut limits = std::collections::HashMap::new();
        for _ in 0..300 {
            if below(&mut rng, 3) == 0 {
                next_id += 1;
                // Prompts share a prefix often, to exercise the prefix cache.
                let shared = below(&mut rng, 3) as u32;
                let len = 1 + below(&mut rng, 20) as usize;
                let prompt: Vec<u32> = (0..len).map(|i| if i < 8 { shared * 1000 + i as u32 } else { below(&mut rng, 50) as u32 }).collect();
                let max_len = len + 1 + below(&mut rng, 15) as usize;
                if s.could_ever_fit(max_len) {
                    s.add(SeqState::new(next_id, prompt, groups.len()));
                    limits.insert(next_id, max_len);
                }
            }
            if below(&mut rng, 10) == 0 && next_id > 0 {
                s.remove(1 + below(&mut rng, next_id));
            }
            let p = s.schedule();
            assert!(p.num_tokens() <= s.cfg.max_batch_tokens);
            assert!(p.entries.len() <= s.cfg.max_seqs);
            for e in &p.entries {
                let seq = s.get(e.id).unwrap();
                for (g, table) in seq.block_tables.iter().enumerate() {
                    assert!(table.len() * 4 >= e.start + e.len, "group {g} covers the chunk");
                }
            }
            step(&mut s, &p, below(&mut rng, 50) as u32);
            let finished: Vec<SeqId> = s.running.iter().filter(|q| q.tokens.len() >= limits[&q.id]).map(|q| q.id).collect();
            for id in finished {
                s.remove(id);
            }
            check_refs(&s);
        }
        for id in 1..=next_id {
            s.remove(id);
        }
        for pool in &s.pools {
            pool.check().unwrap();
            assert_eq!(pool.stats().in_use, 0, "round {round}: blocks leaked");
            assert_eq!(pool.available(), pool.num_blocks());
        }
    }
}

#[test]
fn forks_share_full_blocks_and_copy_the_partial_one() {
    let mut s = Scheduler::new(cfg(64, 4), &[(16, None)]);
    s.add(SeqState::new(1, (0..10).collect(), 1));
    let p = s.schedule();
    step(&mut s, &p, 3);
    let copies = s.fork(1, 2).unwrap();
    let (a, b) = (s.get(1).unwrap().block_tables[0].clone(), s.get(2).unwrap().block_tables[0].clone());
    assert_eq!(a[..2], b[..2], "full blocks are shared");
    assert_ne!(a[2], b[2], "the partial block is copied");
    assert_eq!(copies, [(0, a[2], b[2])]);
    check_refs(&s);
    // Both continue independently.
    s.push_token(2, 4);
    let p = s.schedule();
    assert_eq!(p.entries.len(), 2);
    step(&mut s, &p, 5);
    s.remove(1);
    s.remove(2);
    assert_eq!(s.pools[0].stats().in_use, 0);
    check_refs(&s);
}
