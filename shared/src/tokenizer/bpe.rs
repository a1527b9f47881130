//! Byte-level BPE (GPT-2 family): words are mapped byte by byte to printable characters,
//! then adjacent symbols are merged lowest-rank first, ties going to the leftmost pair.

use std::collections::{BinaryHeap, HashMap};

/// GPT-2's reversible map from bytes to printable characters.
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("256..324 are valid code points");
            next += 1;
            c
        };
    }
    table
}

pub struct Merges {
    /// "left right" -> rank
    ranks: HashMap<Box<str>, u32>,
}

impl Merges {
    pub fn new(merges: &[String]) -> Merges {
        let mut ranks = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // The first rank of a duplicated merge wins, as in a list read front to back.
            ranks.entry(m.as_str().into()).or_insert(rank as u32);
        }
        Merges { ranks }
    }

    fn rank(&self, buf: &mut String, left: &str, right: &str) -> Option<u32> {
        buf.clear();
        buf.push_str(left);
        buf.push(' ');
        buf.push_str(right);
        self.ranks.get(buf.as_str()).copied()
    }

    /// Merges one byte-encoded word; returns the byte ranges of the final symbols.
    pub fn apply(&self, word: &str) -> Vec<(usize, usize)> {
        // Symbols form a linked list over char boundaries; `len == 0` marks a merged-away one.
        struct Sym {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, c)) in word.char_indices().enumerate() {
            syms.push(Sym { start, len: c.len_utf8(), prev: i.checked_sub(1), next: None });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        #[derive(PartialEq, Eq)]
        struct Candidate {
            rank: u32,
            left: usize,
            right: usize,
            len: usize,
        }
        impl Ord for Candidate {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                // BinaryHeap is a max-heap: lowest rank, then leftmost, comes out first.
                other.rank.cmp(&self.rank).then(other.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Candidate {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
        let mut buf = String::new();
        let mut heap = BinaryHeap::new();
        let text = |s: &Sym| &word[s.start..s.start + s.len];
        let push = |heap: &mut BinaryHeap<Candidate>, buf: &mut String, syms: &[Sym], left: usize, right: usize| {
            if let Some(rank) = self.rank(buf, text(&syms[left]), text(&syms[right])) {
                heap.push(Candidate { rank, left, right, len: syms[left].len + syms[right].len });
            }
        };
        for i in 1..syms.len() {
            push(&mut heap, &mut buf, &syms, i - 1, i);
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
                push(&mut heap, &mut buf, &syms, p, c.left);
            }
            if let Some(n) = right_next {
                push(&mut heap, &mut buf, &syms, c.left, n);
            }
        }
        syms.iter().filter(|s| s.len > 0).map(|s| (s.start, s.start + s.len)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_onto_printables() {
        let t = byte_to_char_table();
        let mut seen = std::collections::HashSet::new();
        for c in t {
            assert!(!c.is_whitespace() && !c.is_control());
            assert!(seen.insert(c));
        }
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
    }

    #[test]
    fn merges_follow_rank_order() {
        let m = Merges::new(&["l o".into(), "lo w".into(), "e r".into(), "low er".into()]);
        let w = "lower";
        let parts: Vec<&str> = m.apply(w).iter().map(|&(a, b)| &w[a..b]).collect();
        assert_eq!(parts, ["lower"]);
        let w = "lowr";
        let parts: Vec<&str> = m.apply(w).iter().map(|&(a, b)| &w[a..b]).collect();
        assert_eq!(parts, ["low", "r"]);
    }
}
