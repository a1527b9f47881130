//! Routing policies: which of the workers serving a model gets a request.
//!
//! - `least-loaded`: the fewest sequences running and waiting (ties taken in turn).
//! - `round-robin`: in turn, ignoring load.
//! - `prefix` (default): requests whose prompts begin alike go to the same worker, where
//!   that prefix's KV blocks already are. The key is a hash of the prompt's first tokens
//!   (or of the `x-session-id` header, for session affinity); workers are ranked for it by
//!   rendezvous hashing, so every router replica ranks them the same way and a worker
//!   joining or leaving moves only its own share of keys. The top-ranked worker takes the
//!   request unless it is hot (load above the least-loaded candidate's by more than a
//!   quarter of its sequence slots), in which case the next in rank that is not hot does.

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
}

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
            sorted.into_iter().find(|w| w.load() <= min + (w.max_seqs() / 4).max(2))
        }
    }
}
