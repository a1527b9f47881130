//! Token selection: greedy, or top-k, top-p and min-p filtering followed by a draw from the
//! temperature-scaled distribution. Also returns the chosen token's log-probability.

use super::rng::Rng;
use kiln_shared::sampling::SamplingParams;

/// Reused storage for the candidate list, so sampling does not allocate per token.
#[derive(Default)]
pub struct Candidates {
    items: Vec<(u32, f32)>,
}

/// Picks the next token from `logits`. Greedy (temperature 0) takes the highest logit,
/// the lowest id on ties.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng, cands: &mut Candidates) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let c = &mut cands.items;
    c.clear();
    c.extend(logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (i as u32, l)));
    if c.is_empty() {
        return 0;
    }
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if p.top_k > 0 && p.top_k < c.len() {
        c.select_nth_unstable_by(p.top_k - 1, by_logit);
        c.truncate(p.top_k);
    }
    c.sort_unstable_by(by_logit);
    let max = c[0].1;
    // Probabilities at temperature 1 decide the top-p and min-p cuts, as in llama.cpp's
    // default chain (filters before temperature).
    let mut probs: Vec<f32> = c.iter().map(|&(_, l)| (l - max).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    let mut keep = c.len();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        for (i, &q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let floor = p.min_p * probs[0];
        keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
    }
    c.truncate(keep);
    let weights: Vec<f64> = c.iter().map(|&(_, l)| (((l - max) / p.temperature) as f64).exp()).collect();
    let sum: f64 = weights.iter().sum();
    let mut target = rng.next_f64() * sum;
    for (&(id, _), w) in c.iter().zip(&weights) {
        if target < *w {
            return id;
        }
        target -= w;
    }
    c[c.len() - 1].0
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Natural-log probability of `id` under softmax(logits).
pub fn log_prob(logits: &[f32], id: u32) -> f32 {
    logits[id as usize] - log_sum_exp(logits)
}

/// log(sum(exp(logits))), computed stably.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` most likely tokens with their log-probabilities, most likely first; `lse` is
/// `log_sum_exp(logits)`, which callers have already computed for the chosen token.
pub fn top_log_probs(logits: &[f32], k: usize, lse: f32) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k - 1, by_logit);
    idx.truncate(k);
    idx.sort_unstable_by(by_logit);
    idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams { temperature: t, top_k: k, top_p, min_p, ..SamplingParams::default() }
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut rng = Rng::seeded(0);
        let mut c = Candidates::default();
        assert_eq!(sample(&[1.0, 3.0, 3.0, 2.0], &params(0.0, 0, 1.0, 0.0), &mut rng, &mut c), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_filters_hold() {
        let logits = [0.0, 5.0, 4.9, -3.0];
        let mut c = Candidates::default();
        for seed in 0..50 {
            let mut rng = Rng::seeded(seed);
            assert_eq!(sample(&logits, &params(1.0, 1, 1.0, 0.0), &mut rng, &mut c), 1);
            let t = sample(&logits, &params(1.0, 0, 1.0, 0.5), &mut rng, &mut c);
            assert!(t == 1 || t == 2, "min-p keeps only the two close tokens");
            let t = sample(&logits, &params(5.0, 0, 0.3, 0.0), &mut rng, &mut c);
            assert_eq!(t, 1, "top-p 0.3 keeps only the best");
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()];
        let p = params(1.0, 0, 1.0, 0.0);
        let draw = |seed| {
            let mut rng = Rng::seeded(seed);
            let mut c = Candidates::default();
            (0..4000).map(|_| sample(&logits, &p, &mut rng, &mut c)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }

    #[test]
    fn log_prob_matches_softmax() {
        let lp = log_prob(&[0.0, (3.0f32).ln()], 1);
        assert!((lp - 0.75f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn top_log_probs_are_sorted_and_normalized() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let top = top_log_probs(&logits, 3, log_sum_exp(&logits));
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 2]);
        let total: f32 = (0..4).map(|i| log_prob(&logits, i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((top[0].1 - log_prob(&logits, 1)).abs() < 1e-6);
    }
}
