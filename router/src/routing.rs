//! Routing policies: which of the workers serving a model gets a request.
//!
//! - `least-loaded`: the fewest sequences running and waiting (ties taken in turn).
//! - `round-robin`: in turn, ignoring load.
//! - `prefix` (default): requests whose prompts begin alike go to the same worker, where
//!   that prefix's KV blocks already are. The key is a hash of the prompt's first tokens
//!   (or of the `x-session-id` header, for session affinity); workers are ranked for it by
//!   rendezvous hashing, so every router replica ranks them the same way and a worker
//!   joining or leaving moves only its own share of keys. The top-ranked worker takes the
//!   request unless it is hot (load above the least-loaded candidate's by more than the
//!   slack), in which case the next in rank that is not hot does. The slack grows with the
//!   prompt: one sequence per 128 prompt tokens, at least 1, at most half the worker's
//!   sequence slots (at least 4). Recomputing a long shared prefix elsewhere costs more than
//!   joining a busier batch where it is cached; a short prompt saves little by affinity, so
//!   short requests spread by load.

use crate::upstream::Worker;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    LeastLoaded,
    RoundRobin,
    #[default]
    Prefix,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "least-loaded" => Ok(Policy::LeastLoaded),
            "round-robin" => Ok(Policy::RoundRobin),
            "prefix" => Ok(Policy::Prefix),
            _ => Err(format!("unknown routing policy `{s}` (least-loaded, round-robin, prefix)")),
        }
    }
}

/// What a request offers for affinity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteKey {
    pub session: Option<u64>,
    pub prefix: Option<u64>,
    /// The prompt's length: what affinity could save from recomputation.
    pub prompt_tokens: usize,
}

/// Prompt tokens whose recomputation is worth one more sequence of load on the affine worker.
pub const TOKENS_PER_SLACK_SEQUENCE: usize = 128;

/// Prompt tokens hashed for prefix affinity: enough to tell system prompts and long shared
/// contexts apart, few enough that the rest of the prompt (the question) does not count.
pub const PREFIX_TOKENS: usize = 64;

pub fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl RouteKey {
    pub fn new(session: Option<&str>, prompt: &[u32]) -> RouteKey {
        let n = prompt.len().min(PREFIX_TOKENS);
        RouteKey {
            session: session.filter(|s| !s.is_empty()).map(|s| fnv(s.bytes())),
            prefix: (n > 0).then(|| fnv(prompt[..n].iter().flat_map(|t| t.to_le_bytes()))),
            prompt_tokens: prompt.len(),
        }
    }
}

/// Mixes a key with a worker id: the worker with the highest score ranks first for the key.
fn score(key: u64, worker: &str) -> u64 {
    let mut x = key ^ fnv(worker.bytes());
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

pub fn choose<'a>(policy: Policy, candidates: &'a [Arc<Worker>], key: &RouteKey, turn: usize) -> Option<&'a Arc<Worker>> {
    if candidates.is_empty() {
        return None;
    }
    let mut sorted: Vec<&Arc<Worker>> = candidates.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let least_loaded = || {
        let min = sorted.iter().map(|w| w.load()).min().unwrap_or(0);
        let idle: Vec<&&Arc<Worker>> = sorted.iter().filter(|w| w.load() == min).collect();
        idle.get(turn % idle.len().max(1)).map(|w| **w)
    };
    match policy {
        Policy::RoundRobin => Some(sorted[turn % sorted.len()]),
        Policy::LeastLoaded => least_loaded(),
        Policy::Prefix => {
            let Some(k) = key.session.or(key.prefix) else { return least_loaded() };
            let min = sorted.iter().map(|w| w.load()).min().unwrap_or(0);
            sorted.sort_by_key(|w| std::cmp::Reverse(score(k, &w.id)));
            let slack = |w: &Arc<Worker>| (key.prompt_tokens / TOKENS_PER_SLACK_SEQUENCE).clamp(1, (w.max_seqs() / 2).max(4));
            sorted.into_iter().find(|w| w.load() <= min + slack(w))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::WorkerPool;
    use std::sync::atomic::Ordering;

    async fn workers(n: usize) -> Vec<Arc<Worker>> {
        let addrs: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", 40000 + i)).collect();
        WorkerPool::new(&addrs).unwrap().workers()
    }

    /// A key for a prompt long enough for the widest slack.
    fn key(k: u64) -> RouteKey {
        RouteKey { session: None, prefix: Some(k), prompt_tokens: 4096 }
    }

    fn pick(policy: Policy, ws: &[Arc<Worker>], k: &RouteKey, turn: usize) -> String {
        choose(policy, ws, k, turn).unwrap().id.clone()
    }

    #[tokio::test]
    async fn a_prefix_goes_to_the_same_worker_from_any_router() {
        let (a, b) = (workers(4).await, workers(4).await);
        let mut counts = std::collections::HashMap::new();
        for k in 0..400u64 {
            let k = key(fnv(k.to_le_bytes()));
            let first = pick(Policy::Prefix, &a, &k, 0);
            assert_eq!(pick(Policy::Prefix, &a, &k, 7), first, "stable across calls");
            assert_eq!(pick(Policy::Prefix, &b, &k, 3), first, "another router replica agrees");
            *counts.entry(first).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        assert!(counts.values().all(|&c| c > 60), "keys spread over the workers: {counts:?}");
    }

    #[tokio::test]
    async fn losing_a_worker_moves_only_its_keys() {
        let ws = workers(4).await;
        let fewer: Vec<Arc<Worker>> = ws.iter().filter(|w| !w.id.ends_with("40002")).cloned().collect();
        for k in 0..300u64 {
            let k = key(fnv(k.to_le_bytes()));
            let before = pick(Policy::Prefix, &ws, &k, 0);
            if !before.ends_with("40002") {
                assert_eq!(pick(Policy::Prefix, &fewer, &k, 0), before);
            }
        }
    }

    #[tokio::test]
    async fn a_hot_worker_hands_its_keys_to_the_next_in_rank() {
        let ws = workers(3).await;
        let k = key(12345);
        let first = pick(Policy::Prefix, &ws, &k, 0);
        let hot = ws.iter().find(|w| w.id == first).unwrap();
        hot.in_flight.store(4, Ordering::Relaxed);
        assert_eq!(pick(Policy::Prefix, &ws, &k, 0), first, "within the slack it keeps the key");
        hot.set_reported_load(9);
        let second = pick(Policy::Prefix, &ws, &k, 0);
        assert_ne!(second, first, "beyond it the key moves");
        for w in &ws {
            w.in_flight.store(5, Ordering::Relaxed);
            // Each worker reports just this router's sequences: no other router's.
            w.set_reported_load(5);
        }
        assert_eq!(pick(Policy::Prefix, &ws, &k, 0), first, "when all are equally busy the key comes back");
    }

    #[tokio::test]
    async fn load_is_this_routers_in_flight_plus_the_others_at_the_last_report() {
        let w = workers(1).await.remove(0);
        w.in_flight.store(3, Ordering::Relaxed);
        w.set_reported_load(10);
        assert_eq!(w.load(), 10, "7 from other routers");
        w.in_flight.store(5, Ordering::Relaxed);
        assert_eq!(w.load(), 12, "this router's new requests count at once");
        w.in_flight.store(0, Ordering::Relaxed);
        assert_eq!(w.load(), 7);
        w.set_reported_load(0);
        assert_eq!(w.load(), 0);
    }

    #[tokio::test]
    async fn a_short_prompt_moves_at_a_narrower_slack() {
        let ws = workers(3).await;
        let short = RouteKey { prompt_tokens: 40, ..key(12345) };
        let first = pick(Policy::Prefix, &ws, &short, 0);
        let affine = ws.iter().find(|w| w.id == first).unwrap();
        affine.in_flight.store(1, Ordering::Relaxed);
        assert_eq!(pick(Policy::Prefix, &ws, &short, 0), first, "one sequence more is within the slack");
        affine.in_flight.store(2, Ordering::Relaxed);
        assert_ne!(pick(Policy::Prefix, &ws, &short, 0), first, "two more is beyond it");
        assert_eq!(pick(Policy::Prefix, &ws, &key(12345), 0), first, "a long prompt stays");
        let medium = RouteKey { prompt_tokens: 3 * TOKENS_PER_SLACK_SEQUENCE, ..key(12345) };
        affine.in_flight.store(3, Ordering::Relaxed);
        assert_eq!(pick(Policy::Prefix, &ws, &medium, 0), first);
        affine.in_flight.store(4, Ordering::Relaxed);
        assert_ne!(pick(Policy::Prefix, &ws, &medium, 0), first);
    }

    #[tokio::test]
    async fn sessions_override_prefixes_and_other_policies_ignore_keys() {
        let ws = workers(4).await;
        let session = |s: &str, p: u64| RouteKey { session: Some(fnv(s.bytes())), prefix: Some(p), prompt_tokens: 4096 };
        let home = pick(Policy::Prefix, &ws, &session("alice", 1), 0);
        for p in 0..50 {
            assert_eq!(pick(Policy::Prefix, &ws, &session("alice", p), 0), home);
        }
        let rr: Vec<String> = (0..4).map(|t| pick(Policy::RoundRobin, &ws, &key(9), t)).collect();
        let mut distinct = rr.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "round robin visits every worker: {rr:?}");
        ws[0].in_flight.store(1, Ordering::Relaxed);
        ws[1].in_flight.store(1, Ordering::Relaxed);
        ws[3].set_reported_load(4);
        assert_eq!(pick(Policy::LeastLoaded, &ws, &key(9), 5), ws[2].id);
    }

    #[test]
    fn route_keys_hash_the_first_tokens_only() {
        let long: Vec<u32> = (0..200).collect();
        let mut other = long.clone();
        other[150] = 7;
        assert_eq!(RouteKey::new(None, &long), RouteKey::new(None, &other));
        other[10] = 7;
        assert_ne!(RouteKey::new(None, &long), RouteKey::new(None, &other));
        assert_eq!(RouteKey::new(Some(""), &[]), RouteKey::default());
    }
}
