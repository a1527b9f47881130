//! SentencePiece-style BPE driven by token scores (the GGUF `llama` tokenizer model):
//! starting from single characters, repeatedly merge the adjacent pair whose concatenation
//! is a vocabulary token with the highest score, ties going to the leftmost pair. Symbols
//! left without a token fall back to `<0xXX>` byte tokens (done by the caller).

use std::collections::HashMap;

/// Total order on scores, so they can rank merge candidates.
#[derive(PartialEq)]
struct Score(f32);
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Score {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Returns the final symbols of `text` as byte ranges; the caller maps them to ids.
pub fn merge(text: &str, token_to_id: &HashMap<String, u32>, scores: &[f32]) -> Vec<(usize, usize)> {
    let mut joined = String::new();
    super::merge::merge(text, |l, r| {
        joined.clear();
        joined.push_str(l);
        joined.push_str(r);
        token_to_id.get(joined.as_str()).map(|&id| Score(scores.get(id as usize).copied().unwrap_or(0.0)))
    })
}
