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
            TokenCounter::Bpe(bpe) => bpe.encode_ordinary(text).len() as u64,
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
}
