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
}

impl PreTokenizer {
    /// Maps a GGUF `tokenizer.ggml.pre` name to a splitter, or None if kiln lacks it.
    pub fn from_gguf_name(name: &str) -> Option<PreTokenizer> {
        match name {
            "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" | "default" => Some(PreTokenizer::Gpt2),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
                Some(PreTokenizer::DigitsThenGpt2)
            }
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
        }
    }
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
fn split_gpt2(piece: &str, base: usize, out: &mut Vec<(usize, usize)>) {
    let chars: Vec<(usize, char)> = piece.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| -> Option<char> { chars.get(i).map(|&(_, c)| c) };
    let offset = |i: usize| -> usize { base + chars.get(i).map_or(piece.len(), |&(o, _)| o) };
    let letter = |i: usize| at(i).is_some_and(is_letter);
    let number = |i: usize| at(i).is_some_and(is_number);
    let space = |i: usize| at(i).is_some_and(char::is_whitespace);
    let other = |i: usize| at(i).is_some_and(|c| !c.is_whitespace() && !is_letter(c) && !is_number(c));

    let mut pos = 0;
    while pos < n {
        let start = pos;
        let c = chars[pos].1;
        // 's 't 're 've 'm 'll 'd (lower case only, as in GPT-2)
        if c == '\'' {
            match (at(pos + 1), at(pos + 2)) {
                (Some('s' | 't' | 'm' | 'd'), _) => pos += 2,
                (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => pos += 3,
                _ => {}
            }
            if pos > start {
                out.push((offset(start), offset(pos)));
                continue;
            }
        }
        // An optional single space followed by a run of one class.
        let lead = usize::from(c == ' ');
        let classes: [&dyn Fn(usize) -> bool; 3] = [&letter, &number, &other];
        if let Some(class) = classes.iter().find(|f| f(pos + lead)) {
            pos += lead;
            while class(pos) {
                pos += 1;
            }
            out.push((offset(start), offset(pos)));
            continue;
        }
        let mut run = 0;
        while space(pos + run) {
            run += 1;
        }
        if run > 1 && pos + run < n {
            // \s+(?!\S): leave the last whitespace to prefix the next word.
            pos += run - 1;
        } else if run > 0 {
            pos += run;
        } else {
            pos += 1;
        }
        out.push((offset(start), offset(pos)));
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
        for p in [PreTokenizer::Gpt2, PreTokenizer::DigitsThenGpt2] {
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
