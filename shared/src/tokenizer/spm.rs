//! SentencePiece-style BPE driven by token scores (the GGUF `llama` tokenizer model):
//! starting from single characters, repeatedly merge the adjacent pair whose concatenation
//! is a vocabulary token with the highest score, ties going to the leftmost pair. Symbols
//! left without a token fall back to `<0xXX>` byte tokens.

use std::collections::{BinaryHeap, HashMap};

/// Returns the final symbols of `text` as byte ranges; the caller maps them to ids.
pub fn merge(text: &str, token_to_id: &HashMap<String, u32>, scores: &[f32]) -> Vec<(usize, usize)> {
    struct Sym {
        start: usize,
        len: usize,
        prev: Option<usize>,
        next: Option<usize>,
    }
    let mut syms: Vec<Sym> = Vec::new();
    for (i, (start, c)) in text.char_indices().enumerate() {
        syms.push(Sym { start, len: c.len_utf8(), prev: i.checked_sub(1), next: None });
        if i > 0 {
            syms[i - 1].next = Some(i);
        }
    }
    struct Candidate {
        score: f32,
        left: usize,
        right: usize,
        len: usize,
    }
    impl PartialEq for Candidate {
        fn eq(&self, other: &Self) -> bool {
            self.cmp(other).is_eq()
        }
    }
    impl Eq for Candidate {}
    impl Ord for Candidate {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            // Highest score first, then leftmost.
            self.score.total_cmp(&other.score).then(other.left.cmp(&self.left))
        }
    }
    impl PartialOrd for Candidate {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    let mut heap = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<Candidate>, syms: &[Sym], left: usize, right: usize| {
        let (l, r) = (&syms[left], &syms[right]);
        let joined = &text[l.start..r.start + r.len];
        if let Some(&id) = token_to_id.get(joined) {
            let score = scores.get(id as usize).copied().unwrap_or(0.0);
            heap.push(Candidate { score, left, right, len: joined.len() });
        }
    };
    for i in 1..syms.len() {
        push(&mut heap, &syms, i - 1, i);
    }
    while let Some(c) = heap.pop() {
        let (l, r) = (&syms[c.left], &syms[c.right]);
        if l.len == 0 || r.len == 0 || l.len + r.len != c.len || l.next != Some(c.right) {
            continue;
        }
        let right_next = r.next;
        syms[c.left].len = c.len;
        syms[c.right].len = 0;
        syms[c.left].next = right_next;
        if let Some(n) = right_next {
            syms[n].prev = Some(c.left);
        }
        if let Some(p) = syms[c.left].prev {
            push(&mut heap, &syms, p, c.left);
        }
        if let Some(n) = right_next {
            push(&mut heap, &syms, c.left, n);
        }
    }
    syms.iter().filter(|s| s.len > 0).map(|s| (s.start, s.start + s.len)).collect()
}
