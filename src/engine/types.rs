//! What flows into and out of the engine: checked generation requests and
//! typed stream events.

use serde::Serialize;

/// How the next token is chosen. Checked by the HTTP layer before queueing.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: Option<usize>,
    /// Same seed, same prompt, same parameters: same output.
    pub seed: Option<u64>,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

/// A request the engine can run as is: tokenized, within limits.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    /// Generation ends before any of these strings; they are not returned.
    pub stop: Vec<String>,
    /// Number of independent completions of the prompt.
    pub n: usize,
    pub sampling: SamplingParams,
    /// When set, each token comes with its log-probability and this many alternatives.
    pub top_logprobs: Option<usize>,
    /// A LoRA adapter applied unmerged to this request only.
    pub adapter: Option<std::sync::Arc<crate::lora::UnmergedAdapter>>,
    /// Added to the logits of these tokens before each draw (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// A grammar the output must match (each choice gets its own copy).
    pub constraint: Option<super::constraint::Constraint>,
    /// Live requests are admitted before batch work.
    pub priority: Priority,
    /// End-of-sequence tokens don't end generation (load tests that need a
    /// fixed output length).
    pub ignore_eos: bool,
}

/// Whose work a request is: a caller waiting on it, or a batch line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Priority {
    #[default]
    Live,
    /// Admitted only when no live request waits, and never into the slots
    /// kept for live traffic.
    Batch,
}

impl GenerationRequest {
    /// One greedy completion of `prompt_ids`, nothing else asked.
    pub fn greedy(prompt_ids: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt_ids,
            max_new_tokens,
            stop: Vec::new(),
            n: 1,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            top_logprobs: None,
            adapter: None,
            logit_bias: Vec::new(),
            constraint: None,
            priority: Priority::Live,
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
    /// The answer is tool calls (set where the output is read as calls; the
    /// engine itself ends with `Stop`).
    ToolCalls,
}

/// One token and its log-probability under the model.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    /// The token's own text (may be a partial UTF-8 sequence, lossily decoded).
    pub text: String,
    pub logprob: f32,
}

/// Log-probabilities of a generated token and its best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// Events of one request, in order. `choice` is the completion's index (`n`).
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// A generated token. `text` is the new visible text (may be empty while a
    /// multi-byte character or a possible stop string is held back).
    Token {
        choice: usize,
        text: String,
        logprobs: Option<Logprobs>,
    },
    /// The choice is finished; any held-back text was sent before.
    End {
        choice: usize,
        finish_reason: FinishReason,
        completion_tokens: usize,
    },
    /// The request failed inside the engine; no more events follow.
    Error(String),
}
