//! Incremental detokenization for streaming: tokens arrive one at a time, and a character
//! may be split across several byte tokens, so bytes are held back until they form whole
//! UTF-8 characters. The concatenation of everything emitted equals the full decode.

use super::Tokenizer;

#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds one token and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32, render_special: bool) -> String {
        self.pending.extend(tokenizer.token_bytes(id, render_special));
        self.take_complete()
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
