//! Turning generated tokens into text as they come: incremental decoding that
//! never splits a multi-byte character, and stop strings that are cut out
//! (text that could be the start of a stop string is held back).

use tokenizers::Tokenizer;

/// Decodes a growing token sequence into text deltas. Decoding a window that
/// starts a few tokens back keeps tokenizer-specific spacing right (the
/// approach of text-generation-inference).
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds a token; returns the text it completes (empty while a character is partial).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> tokenizers::Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = match full.get(prefix.len()..) {
                Some(delta) if full.starts_with(&prefix) => delta.to_string(),
                // The window decodes differently with the new token: send what
                // follows the common part.
                _ => {
                    let common = full
                        .char_indices()
                        .zip(prefix.chars())
                        .take_while(|((_, a), b)| a == b)
                        .last()
                        .map_or(0, |((i, c), _)| i + c.len_utf8());
                    full[common..].to_string()
                }
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

/// What to do with text after a stop-string check.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Send this text and go on.
    Continue(String),
    /// A stop string was found: send this text (before it) and finish.
    Stopped(String),
}

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(delta.to_string());
        }
        self.pending.push_str(delta);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return StopCheck::Stopped(before);
        }
        let held = self.held_back_len();
        let emit = self.pending.len() - held;
        StopCheck::Continue(self.pending.drain(..emit).collect())
    }

    /// Text held back at the end of generation (no stop string followed).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that begins some stop string.
    fn held_back_len(&self) -> usize {
        self.pending
            .char_indices()
            .map(|(i, _)| &self.pending[i..])
            .find(|suffix| self.stops.iter().any(|s| s.starts_with(suffix)))
            .map_or(0, str::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                StopCheck::Continue(t) => out.push_str(&t),
                StopCheck::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_split_over_deltas_is_cut_out() {
        assert_eq!(
            feed(&["END"], &["abc E", "N", "Dxyz"]),
            ("abc ".into(), true)
        );
    }

    #[test]
    fn near_miss_is_released() {
        assert_eq!(
            feed(&["END"], &["abc E", "N", "x"]),
            ("abc ENx".into(), false)
        );
        assert_eq!(feed(&["END"], &["abc EN"]), ("abc EN".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins_with_unicode() {
        assert_eq!(feed(&["é!", "b"], &["aé", "!b"]), ("a".into(), true));
    }
}
