//! Stop strings, found even when they straddle token boundaries. Text that might be the
//! start of a stop string is held back, so a client never sees part of one.

pub struct StopMatcher {
    stops: Vec<String>,
    /// Generated text not yet released.
    held: String,
    /// The stop string that ended the text, once one has.
    matched: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum StopMatch {
    /// Keep going; this text is safe to emit.
    Continue(String),
    /// A stop string was found: emit this text (everything before it) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new(), matched: None }
    }

    pub fn push(&mut self, text: &str) -> StopMatch {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return StopMatch::Continue(std::mem::take(&mut self.held));
        }
        // The earliest occurrence of any stop string ends the text.
        if let Some((at, stop)) = self.stops.iter().filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s))).min_by_key(|(at, _)| *at) {
            self.matched = Some(stop.clone());
            let mut out = std::mem::take(&mut self.held);
            out.truncate(at);
            return StopMatch::Stopped(out);
        }
        let keep = self.longest_partial_suffix();
        let split = self.held.len() - keep;
        let rest = self.held.split_off(split);
        StopMatch::Continue(std::mem::replace(&mut self.held, rest))
    }

    /// The stop string that ended the text, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Releases held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (len, _) in s.char_indices().skip(1) {
                if len > best && self.held.ends_with(&s[..len]) {
                    best = len;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopMatch::Continue(t) => out.push_str(&t),
                StopMatch::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_across_token_boundaries_is_found_and_not_emitted() {
        assert_eq!(run(&["END"], &["hello E", "N", "D more"]), ("hello ".into(), true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        assert_eq!(run(&["END"], &["hello E", "Nx"]), ("hello ENx".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
        let mut m = StopMatcher::new(vec!["cd".into(), "b".into()]);
        m.push("abcd");
        assert_eq!(m.matched(), Some("b"));
    }

    #[test]
    fn multibyte_stop_strings_are_safe() {
        assert_eq!(run(&["日本"], &["x日", "本y"]), ("x".into(), true));
        assert_eq!(run(&["日本"], &["x日", "y"]), ("x日y".into(), false));
    }
}
