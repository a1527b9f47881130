//! Byte-level BPE (GPT-2 family): words are mapped byte by byte to printable characters,
//! then adjacent symbols are merged lowest-rank first, ties going to the leftmost pair.

use std::collections::HashMap;

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
        let mut buf = String::new();
        super::merge::merge(word, |l, r| self.rank(&mut buf, l, r).map(std::cmp::Reverse))
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
