//! Incremental detokenization for streaming: tokens arrive one at a time, and the text so
//! far must only ever grow, so text is held back until it is final.
//!
//! kiln's own tokenizers map each token to bytes; a character may be split across several
//! byte tokens, so bytes are held back until they form whole UTF-8 characters.
//!
//! A `tokenizer.json` decoder works on whole sequences (byte fallback fuses `<0xXX>` runs,
//! Metaspace drops the space of a text's first token, WordPiece joins `##` pieces), so its
//! text is taken as the difference between decoding a short window of recent tokens with
//! and without the newest ones, held back while it ends in an incomplete character. The
//! window starts inside the prompt, so a completion's first token keeps the leading space it
//! has after the prompt's text, as it does when prompt and completion are decoded together.

use super::Tokenizer;

/// Tokens of context kept before the text not yet emitted: enough for any decoder's
/// look-behind (a character split over four byte tokens, a `##` join, a Metaspace start).
const CONTEXT_TOKENS: usize = 6;

#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    /// Token window for whole-sequence decoders: `ids[..read]` were already emitted (or are
    /// prompt context), `ids[read..]` are held back.
    ids: Vec<u32>,
    read: usize,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// A decoder for text that continues `prompt` (its last tokens give the context).
    pub fn after(prompt: &[u32]) -> StreamDecoder {
        let ids = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        StreamDecoder { pending: Vec::new(), read: ids.len(), ids }
    }

    /// Adds one token and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32, render_special: bool) -> String {
        if tokenizer.is_hugging_face() {
            self.ids.push(id);
            return self.take_window(tokenizer, render_special, false);
        }
        self.pending.extend(tokenizer.token_bytes(id, render_special));
        self.take_complete()
    }

    /// The text `ids[read..]` adds after `ids[..read]`, once it is final (or at the end).
    fn take_window(&mut self, tokenizer: &Tokenizer, render_special: bool, at_end: bool) -> String {
        // The window starts a few tokens back, at the start of a character: a byte run cut in
        // the middle of a character would decode to replacement characters as a whole.
        let mut start = self.read.saturating_sub(CONTEXT_TOKENS);
        while start > 0 && tokenizer.continues_character(self.ids[start]) {
            start -= 1;
        }
        let before = tokenizer.decode(&self.ids[start..self.read], render_special);
        let after = tokenizer.decode(&self.ids[start..], render_special);
        let Some(new) = after.strip_prefix(before.as_str()) else {
            // A decoder rewrote earlier text (rare space clean-ups): wait for more tokens.
            return if at_end { after.chars().skip(before.chars().count()).collect() } else { String::new() };
        };
        if new.is_empty() || (!at_end && new.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let text = new.to_string();
        self.read = self.ids.len();
        // Tokens far behind the window are no longer needed.
        if start > 4 * CONTEXT_TOKENS {
            self.ids.drain(..start);
            self.read -= start;
        }
        text
    }

    fn take_complete(&mut self) -> String {
        // Hold back only a trailing partial character; anything invalid before it is
        // replaced now (continuation bytes can never repair an earlier error).
        let keep = incomplete_suffix_len(&self.pending);
        let tail = self.pending.split_off(self.pending.len() - keep);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = tail;
        text
    }

    /// Emits whatever is still held back at the end of a stream (as U+FFFD if incomplete).
    pub fn finish_with(&mut self, tokenizer: &Tokenizer, render_special: bool) -> String {
        if tokenizer.is_hugging_face() {
            return if self.read < self.ids.len() { self.take_window(tokenizer, render_special, true) } else { String::new() };
        }
        self.finish()
    }

    /// Emits held-back bytes of kiln's own tokenizers (as U+FFFD if incomplete).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Length of a trailing, still-incomplete UTF-8 sequence (0 to 3 bytes).
fn incomplete_suffix_len(bytes: &[u8]) -> usize {
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}
