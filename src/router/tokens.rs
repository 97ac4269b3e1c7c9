//! Counting tokens before a request is routed (to check context windows and
//! hold budget) and for streams that end without a usage report. Local
//! models count with their own tokenizer; remote models with OpenAI's BPE
//! (tiktoken-rs), o200k_base when the model name is not one it knows.

use std::sync::Arc;

use serde_json::Value;
use tiktoken_rs::CoreBPE;
use tokenizers::Tokenizer;

/// Tokens OpenAI's chat format adds per message, and once to prime the reply
/// (the OpenAI cookbook's count for current models).
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;

/// The longest stretch of text OpenAI's pre-tokenizer is given at once.
/// Its regex (fancy-regex) keeps a backtracking stack as long as a run of
/// whitespace, and tiktoken-rs panics when that overflows: a request of a
/// megabyte of spaces did. Text is cut where every GPT pre-tokenizer ends
/// a piece anyway (see `segments`), so the count is exact; a stretch this
/// long with no such place (one run of whitespace, or of letters without
/// a space) is cut anywhere, its count then off by a token or so a cut.
const SEGMENT_BYTES: usize = 4096;

/// A tokenizer to count with.
#[derive(Clone)]
pub enum TokenCounter {
    Bpe(&'static CoreBPE),
    Local(Arc<Tokenizer>),
}

impl TokenCounter {
    /// OpenAI's BPE for `model` (o200k_base for names it does not know).
    pub fn for_remote_model(model: &str) -> TokenCounter {
        let bpe = tiktoken_rs::tokenizer::get_tokenizer(model)
            .and_then(|t| tiktoken_rs::bpe_for_tokenizer(t).ok())
            .unwrap_or_else(tiktoken_rs::o200k_base_singleton);
        TokenCounter::Bpe(bpe)
    }

    pub fn count(&self, text: &str) -> u64 {
        match self {
            TokenCounter::Bpe(bpe) => count_in_segments(bpe, text, SEGMENT_BYTES),
            TokenCounter::Local(tokenizer) => tokenizer
                .encode_fast(text, false)
                .map_or(0, |e| e.get_ids().len() as u64),
        }
    }

    /// A chat prompt as OpenAI counts it: each message's text, plus the
    /// framing tokens. Non-text parts (images) are not counted.
    pub fn count_messages(&self, messages: &[Value]) -> u64 {
        let mut total = REPLY_PRIMING;
        for message in messages {
            total += TOKENS_PER_MESSAGE;
            if let Some(role) = message.get("role").and_then(Value::as_str) {
                total += self.count(role);
            }
            if let Some(name) = message.get("name").and_then(Value::as_str) {
                total += self.count(name) + TOKENS_PER_NAME;
            }
            match message.get("content") {
                Some(Value::String(text)) => total += self.count(text),
                Some(Value::Array(parts)) => {
                    for part in parts {
                        if let Some(text) = part.get("text").and_then(Value::as_str) {
                            total += self.count(text);
                        }
                    }
                }
                _ => {}
            }
            if let Some(calls) = message.get("tool_calls") {
                total += self.count(&calls.to_string());
            }
        }
        total
    }
}

/// One request's count under each remote deployment's tokenizer, counted
/// once per tokenizer: ranking asks for every deployment on offer, most
/// share o200k_base, and a megabyte of prompt takes 0.2 to 0.3 s to count.
#[derive(Default)]
pub struct RemoteCounts(Vec<(usize, u64)>);

impl RemoteCounts {
    /// The count `count` makes with `model`'s tokenizer, made only the
    /// first time that tokenizer is asked for.
    pub fn count(&mut self, model: &str, count: impl FnOnce(&TokenCounter) -> u64) -> u64 {
        let counter = TokenCounter::for_remote_model(model);
        let tokenizer = match &counter {
            TokenCounter::Bpe(bpe) => std::ptr::from_ref::<CoreBPE>(bpe) as usize,
            TokenCounter::Local(tokenizer) => Arc::as_ptr(tokenizer) as usize,
        };
        if let Some(&(_, tokens)) = self.0.iter().find(|(known, _)| *known == tokenizer) {
            return tokens;
        }
        let tokens = count(&counter);
        self.0.push((tokenizer, tokens));
        tokens
    }
}

/// `text`'s tokens under `bpe`, counted `max` bytes or fewer at a time.
fn count_in_segments(bpe: &CoreBPE, text: &str, max: usize) -> u64 {
    segments(text, max)
        .map(|segment| bpe.encode_ordinary(segment).len() as u64)
        .sum()
}

/// `text` in consecutive stretches of at most `max` bytes (or one
/// character, where that is longer), each ending where the GPT
/// pre-tokenizers (r50k, p50k, cl100k, o200k) end a piece whatever
/// follows: before a space that follows a non-space and precedes an ASCII
/// letter. No piece runs across that place (the space leads the next
/// word's piece), and nothing before it looks past it. Where a stretch
/// holds no such place, it is cut at its last character boundary.
fn segments(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = if rest.len() <= max {
            rest.len()
        } else {
            piece_end_before(rest, max).unwrap_or_else(|| char_boundary_before(rest, max))
        };
        let (segment, after) = rest.split_at(cut);
        rest = after;
        Some(segment)
    })
}

/// The last place in `text[..=limit]` (past its start) where a piece ends
/// whatever follows (see `segments`).
fn piece_end_before(text: &str, limit: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    (1..=limit.min(bytes.len().saturating_sub(2)))
        .rev()
        .find(|&i| {
            bytes[i] == b' '
                && bytes[i + 1].is_ascii_alphabetic()
                && text[..i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| !c.is_whitespace())
        })
}

/// The last character boundary at or before `limit`, past `text`'s first
/// character.
fn char_boundary_before(text: &str, limit: usize) -> usize {
    let first = text.chars().next().map_or(0, char::len_utf8);
    (first..=limit)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(first)
}

/// Loads the BPE tables now rather than in the first request.
pub fn warm_up() {
    let _ = tiktoken_rs::o200k_base_singleton();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_prompts_count_as_openai_counts_them() {
        // The OpenAI cookbook's example: "gpt-4o" / o200k_base.
        let counter = TokenCounter::for_remote_model("gpt-4o");
        assert_eq!(counter.count("tiktoken is great!"), 6);
        let messages: Vec<Value> = serde_json::from_str(
            r#"[{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello!"}]"#,
        )
        .unwrap();
        // 3 + (3 + 1 + 6) + (3 + 1 + 2): role and content of each, framing, priming.
        assert_eq!(counter.count_messages(&messages), 19);
        let unknown = TokenCounter::for_remote_model("my-vllm-model");
        assert_eq!(
            unknown.count("tiktoken is great!"),
            6,
            "o200k_base by default"
        );
    }

    /// Text of every kind the pre-tokenizers split differently: prose,
    /// contractions, numbers, code, punctuation runs, other scripts,
    /// whitespace runs and line ends.
    fn varied_text() -> String {
        let mut text = String::new();
        for i in 0..40 {
            text.push_str(&format!(
                "It's {i} o'clock; we've had 12345.67 apples -- they'll say \"no!\" \
                 fn main() {{ let x_{i} = vec![1, 2, 3]; }}\n\n   \tIndented  twice   \r\n\
                 Ünïcödé naïve café. Привет мир. 東京の天気は晴れ。 مرحبا 🚀🔥 \
                 A.B.C. U.S.A. e.g. x/y/z https://example.com/a?b=c#d   \n"
            ));
        }
        text
    }

    #[test]
    fn remote_counts_count_once_per_tokenizer() {
        let mut counts = RemoteCounts::default();
        let mut made = Vec::new();
        for model in ["gpt-4o", "gpt-4o-mini", "my-vllm-model", "gpt-4", "gpt-4o"] {
            let tokens = counts.count(model, |counter| {
                made.push(model);
                counter.count("tiktoken is great!")
            });
            assert_eq!(tokens, 6, "{model}");
        }
        assert_eq!(
            made,
            ["gpt-4o", "gpt-4"],
            "o200k_base once, cl100k_base once"
        );
    }

    /// Every 128 bytes of `varied_text` hold a place to cut (so no cut is
    /// forced), and it is cut at some 80 of them.
    #[test]
    fn counting_in_segments_gives_the_whole_text_count() {
        let text = varied_text();
        for model in ["gpt-4o", "gpt-4", "text-davinci-003", "text-davinci-001"] {
            let TokenCounter::Bpe(bpe) = TokenCounter::for_remote_model(model) else {
                unreachable!()
            };
            let whole = bpe.encode_ordinary(&text).len() as u64;
            for max in [128, 256, 512, SEGMENT_BYTES] {
                assert_eq!(
                    count_in_segments(bpe, &text, max),
                    whole,
                    "{model}, segments of {max} bytes"
                );
            }
        }
    }

    #[test]
    fn segments_cover_the_text_within_their_length() {
        let text = format!("{}{}é{}", "a".repeat(100), " ".repeat(50), "東".repeat(40));
        for max in [1, 2, 3, 7, 64] {
            let parts: Vec<&str> = segments(&text, max).collect();
            assert_eq!(parts.concat(), text, "segments of {max}");
            for part in &parts {
                assert!(
                    part.len() <= max || part.chars().count() == 1,
                    "{part:?} is longer than {max} bytes"
                );
            }
        }
    }

    #[test]
    fn a_megabyte_of_whitespace_is_counted() {
        // tiktoken-rs panicked on these (the regex's backtracking stack).
        let counter = TokenCounter::for_remote_model("gpt-4o");
        for run in [" ", "\n", "\t", " \n"] {
            let text = run.repeat((1 << 20) / run.len());
            let tokens = counter.count(&text);
            assert!(
                tokens > 0 && tokens <= text.len() as u64,
                "{run:?}: {tokens} tokens"
            );
        }
    }
}
