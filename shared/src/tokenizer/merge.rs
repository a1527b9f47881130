//! The merge loop both BPE flavours share: start from single characters and repeatedly join
//! the adjacent pair with the best priority, ties going to the leftmost pair, until no
//! adjacent pair may join.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

struct Candidate<P> {
    priority: P,
    left: usize,
    right: usize,
    len: usize,
}

impl<P: Ord> PartialEq for Candidate<P> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<P: Ord> Eq for Candidate<P> {}
impl<P: Ord> PartialOrd for Candidate<P> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<P: Ord> Ord for Candidate<P> {
    fn cmp(&self, other: &Self) -> Ordering {
        // A max-heap: the greatest priority, then the leftmost pair, comes out first.
        self.priority.cmp(&other.priority).then(other.left.cmp(&self.left))
    }
}

/// Merges `text`; `priority(left, right)` says whether two adjacent pieces may join and how
/// urgently (greater first). Returns the byte ranges of the final pieces.
pub fn merge<P: Ord>(text: &str, mut priority: impl FnMut(&str, &str) -> Option<P>) -> Vec<(usize, usize)> {
    let mut syms: Vec<Sym> = Vec::new();
    for (i, (start, c)) in text.char_indices().enumerate() {
        syms.push(Sym { start, len: c.len_utf8(), prev: i.checked_sub(1), next: None });
        if i > 0 {
            syms[i - 1].next = Some(i);
        }
    }
    let piece = |s: &Sym| &text[s.start..s.start + s.len];
    let mut heap = BinaryHeap::new();
    let mut push = |heap: &mut BinaryHeap<Candidate<P>>, syms: &[Sym], left: usize, right: usize| {
        if let Some(priority) = priority(piece(&syms[left]), piece(&syms[right])) {
            heap.push(Candidate { priority, left, right, len: syms[left].len + syms[right].len });
        }
    };
    for i in 1..syms.len() {
        push(&mut heap, &syms, i - 1, i);
    }
    while let Some(c) = heap.pop() {
        let (l, r) = (&syms[c.left], &syms[c.right]);
        // Skip candidates made stale by an earlier merge.
        if l.len == 0 || r.len == 0 || l.next != Some(c.right) || l.len + r.len != c.len {
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
