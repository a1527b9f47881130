//! Penalties applied to raw logits before selection.

use kiln_shared::sampling::SamplingParams;

/// Applies llama.cpp-style repetition penalty (divide positive logits, multiply negative
/// ones) and OpenAI-style presence/frequency penalties over the last `repeat_last_n`
/// tokens of `history`, then the request's logit bias.
pub fn apply_penalties(logits: &mut [f32], history: &[u32], p: &SamplingParams) {
    penalize(logits, history, p);
    for &(token, bias) in &p.logit_bias {
        if let Some(l) = logits.get_mut(token as usize) {
            *l += bias;
        }
    }
}

fn penalize(logits: &mut [f32], history: &[u32], p: &SamplingParams) {
    let neutral = p.repeat_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0;
    if neutral || p.repeat_last_n == 0 {
        return;
    }
    let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
    let mut counts: Vec<(u32, u32)> = Vec::with_capacity(recent.len());
    for &t in recent {
        match counts.iter_mut().find(|(id, _)| *id == t) {
            Some((_, c)) => *c += 1,
            None => counts.push((t, 1)),
        }
    }
    for (id, count) in counts {
        let Some(l) = logits.get_mut(id as usize) else { continue };
        if *l > 0.0 {
            *l /= p.repeat_penalty;
        } else {
            *l *= p.repeat_penalty;
        }
        *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_push_seen_tokens_down() {
        let p = SamplingParams { repeat_penalty: 2.0, presence_penalty: 0.5, frequency_penalty: 0.25, repeat_last_n: 4, ..SamplingParams::greedy() };
        let mut logits = vec![4.0, -4.0, 1.0, 3.0];
        apply_penalties(&mut logits, &[0, 0, 1, 9], &p);
        assert_eq!(logits[0], 4.0 / 2.0 - 0.5 - 0.5);
        assert_eq!(logits[1], -8.0 - 0.25 - 0.5);
        assert_eq!(logits[2], 1.0);
        // Tokens older than the window are not penalized.
        let mut logits = vec![4.0, 0.0];
        apply_penalties(&mut logits, &[0, 1, 1, 1, 1], &p);
        assert_eq!(logits[0], 4.0);
    }

    #[test]
    fn logit_bias_is_added_after_penalties() {
        let p = SamplingParams { logit_bias: vec![(1, 5.0), (7, -3.0), (99, 1.0)], ..SamplingParams::greedy() };
        let mut logits = vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        apply_penalties(&mut logits, &[], &p);
        assert_eq!((logits[1], logits[7], logits[0]), (6.0, -2.0, 1.0));
    }
}
