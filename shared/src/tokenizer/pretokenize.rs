//! Pre-tokenizers: how text is cut into words before byte-level BPE merges them.
//!
//! Each splitter is written by hand to reproduce a known regular expression exactly,
//! including its look-ahead, with the Unicode categories llama.cpp uses (letters are L*,
//! numbers N*, whitespace is the White_Space property).

use serde::{Deserialize, Serialize};
use unicode_general_category::{get_general_category, GeneralCategory as G};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreTokenizer {
    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// Every number character on its own, then GPT-2 (SmolLM, StarCoder and relatives).
    DigitsThenGpt2,
    /// Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    Llama3,
    /// Qwen 2 and 3: Llama 3's pattern with single digits (`\p{N}`).
    Qwen2,
}

/// The split patterns of `tokenizer.json` `Split` pre-tokenizers kiln implements.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreTokenizer {
    /// Maps a GGUF `tokenizer.ggml.pre` name to a splitter, or None if kiln lacks it.
    pub fn from_gguf_name(name: &str) -> Option<PreTokenizer> {
        match name {
            "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" | "default" => Some(PreTokenizer::Gpt2),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
                Some(PreTokenizer::DigitsThenGpt2)
            }
            "llama-bpe" | "llama3" | "smaug-bpe" => Some(PreTokenizer::Llama3),
            "qwen2" => Some(PreTokenizer::Qwen2),
            _ => None,
        }
    }

    /// Splits `text` into words, appending byte ranges to `out`.
    pub fn split(self, text: &str, out: &mut Vec<(usize, usize)>) {
        match self {
            PreTokenizer::Gpt2 => split_gpt2(text, 0, out),
            PreTokenizer::DigitsThenGpt2 => {
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if is_number(c) {
                        if start < i {
                            split_gpt2(&text[start..i], start, out);
                        }
                        out.push((i, i + c.len_utf8()));
                        start = i + c.len_utf8();
                    }
                }
                if start < text.len() {
                    split_gpt2(&text[start..], start, out);
                }
            }
            PreTokenizer::Llama3 => split_llama3(text, 3, out),
            PreTokenizer::Qwen2 => split_llama3(text, 1, out),
        }
    }
}

/// A text's characters by index, with the classes the splitters test; indices past the end
/// belong to no class.
struct Chars<'a> {
    text: &'a str,
    chars: Vec<(usize, char)>,
    /// Byte offset of `text` in the whole input.
    base: usize,
}

impl<'a> Chars<'a> {
    fn new(text: &'a str, base: usize) -> Chars<'a> {
        Chars { text, chars: text.char_indices().collect(), base }
    }
    fn len(&self) -> usize {
        self.chars.len()
    }
    fn at(&self, i: usize) -> Option<char> {
        self.chars.get(i).map(|&(_, c)| c)
    }
    /// Byte offset (in the whole input) of character `i`, or of the end.
    fn offset(&self, i: usize) -> usize {
        self.base + self.chars.get(i).map_or(self.text.len(), |&(o, _)| o)
    }
    fn letter(&self, i: usize) -> bool {
        self.at(i).is_some_and(is_letter)
    }
    fn number(&self, i: usize) -> bool {
        self.at(i).is_some_and(is_number)
    }
    fn space(&self, i: usize) -> bool {
        self.at(i).is_some_and(char::is_whitespace)
    }
    fn newline(&self, i: usize) -> bool {
        self.at(i).is_some_and(|c| c == '\r' || c == '\n')
    }
    fn other(&self, i: usize) -> bool {
        self.at(i).is_some_and(|c| !c.is_whitespace() && !is_letter(c) && !is_number(c))
    }
    /// The end of the run of characters from `i` for which `class` holds.
    fn run(&self, mut i: usize, class: fn(&Self, usize) -> bool) -> usize {
        while class(self, i) {
            i += 1;
        }
        i
    }
}

/// Llama 3's split; `max_digits` is 3 for Llama 3 and 1 for Qwen 2. Each alternative of the
/// pattern is tried in order at each position, as the regex engine does.
fn split_llama3(text: &str, max_digits: usize, out: &mut Vec<(usize, usize)>) {
    let s = Chars::new(text, 0);
    let mut pos = 0;
    while pos < s.len() {
        let end = llama3_match(&s, pos, max_digits);
        out.push((s.offset(pos), s.offset(end)));
        pos = end;
    }
}

/// Where the match starting at `pos` ends.
fn llama3_match(s: &Chars, pos: usize, max_digits: usize) -> usize {
    let c = s.chars[pos].1;
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if c == '\'' {
        let lower = |i: usize| s.at(i).map(|c| c.to_ascii_lowercase());
        match (lower(pos + 1), lower(pos + 2)) {
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => return pos + 3,
            (Some('s' | 't' | 'm' | 'd'), _) => return pos + 2,
            _ => {}
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if !s.newline(pos) && !s.letter(pos) && !s.number(pos) && s.letter(pos + 1) {
        return s.run(pos + 1, Chars::letter);
    }
    if s.letter(pos) {
        return s.run(pos, Chars::letter);
    }
    // \p{N}{1,max}
    if s.number(pos) {
        let mut i = pos;
        while i < pos + max_digits && s.number(i) {
            i += 1;
        }
        return i;
    }
    // ' '?[^\s\p{L}\p{N}]+[\r\n]*
    let lead = usize::from(c == ' ' && s.other(pos + 1));
    if s.other(pos + lead) {
        let i = s.run(pos + lead, Chars::other);
        return s.run(i, Chars::newline);
    }
    // \s*[\r\n]+: up to the last newline of the whitespace run.
    let ws_end = s.run(pos, Chars::space);
    if let Some(last_newline) = (pos..ws_end).rev().find(|&i| s.newline(i)) {
        return last_newline + 1;
    }
    // \s+(?!\S), else \s+
    if ws_end > pos {
        if ws_end == s.len() || ws_end - pos == 1 {
            return ws_end;
        }
        return ws_end - 1;
    }
    pos + 1
}

pub fn is_letter(c: char) -> bool {
    matches!(
        get_general_category(c),
        G::UppercaseLetter | G::LowercaseLetter | G::TitlecaseLetter | G::ModifierLetter | G::OtherLetter
    )
}

pub fn is_number(c: char) -> bool {
    matches!(get_general_category(c), G::DecimalNumber | G::LetterNumber | G::OtherNumber)
}

/// The GPT-2 split of one piece; `base` is the piece's byte offset in the whole text.
fn split_gpt2<'t>(piece: &'t str, base: usize, out: &mut Vec<(usize, usize)>) {
    let s = Chars::new(piece, base);
    let n = s.len();
    let mut pos = 0;
    while pos < n {
        let start = pos;
        let c = s.chars[pos].1;
        // 's 't 're 've 'm 'll 'd (lower case only, as in GPT-2)
        if c == '\'' {
            match (s.at(pos + 1), s.at(pos + 2)) {
                (Some('s' | 't' | 'm' | 'd'), _) => pos += 2,
                (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => pos += 3,
                _ => {}
            }
            if pos > start {
                out.push((s.offset(start), s.offset(pos)));
                continue;
            }
        }
        // An optional single space followed by a run of one class.
        let lead = usize::from(c == ' ');
        let classes: [fn(&Chars<'t>, usize) -> bool; 3] = [Chars::letter, Chars::number, Chars::other];
        if let Some(&class) = classes.iter().find(|f| f(&s, pos + lead)) {
            pos = s.run(pos + lead, class);
            out.push((s.offset(start), s.offset(pos)));
            continue;
        }
        let run = s.run(pos, Chars::space) - pos;
        if run > 1 && pos + run < n {
            // \s+(?!\S): leave the last whitespace to prefix the next word.
            pos += run - 1;
        } else if run > 0 {
            pos += run;
        } else {
            pos += 1;
        }
        out.push((s.offset(start), s.offset(pos)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(p: PreTokenizer, text: &str) -> Vec<&str> {
        let mut out = vec![];
        p.split(text, &mut out);
        out.iter().map(|&(a, b)| &text[a..b]).collect()
    }

    #[test]
    fn gpt2_splits_like_the_regex() {
        assert_eq!(words(PreTokenizer::Gpt2, "Hello world!"), ["Hello", " world", "!"]);
        assert_eq!(words(PreTokenizer::Gpt2, "it's  fine\n\nok"), ["it", "'s", " ", " fine", "\n", "\n", "ok"]);
        assert_eq!(words(PreTokenizer::Gpt2, "a   "), ["a", "   "]);
        assert_eq!(words(PreTokenizer::Gpt2, "x 123 ..."), ["x", " 123", " ..."]);
        assert_eq!(words(PreTokenizer::Gpt2, "naïve café"), ["naïve", " café"]);
    }

    #[test]
    fn digits_are_isolated_first() {
        assert_eq!(words(PreTokenizer::DigitsThenGpt2, "abc 2024!"), ["abc", " ", "2", "0", "2", "4", "!"]);
        assert_eq!(words(PreTokenizer::DigitsThenGpt2, "a  1"), ["a", "  ", "1"]);
    }

    #[test]
    fn split_covers_text_exactly() {
        let text = "Mixed: 日本語 テスト 🎉🎉 tabs\t\tand\r\nCRLF  end  ";
        for p in [PreTokenizer::Gpt2, PreTokenizer::DigitsThenGpt2, PreTokenizer::Llama3, PreTokenizer::Qwen2] {
            let mut out = vec![];
            p.split(text, &mut out);
            let mut pos = 0;
            for &(a, b) in &out {
                assert_eq!(a, pos);
                assert!(b > a);
                pos = b;
            }
            assert_eq!(pos, text.len());
        }
    }
}
