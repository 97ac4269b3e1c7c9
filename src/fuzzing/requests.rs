//! Request bodies of the inference endpoints, read and checked as the
//! gateway reads and checks them before anything runs: the body itself
//! (`parse_json`, which names the bad field), unknown fields, sampling and
//! length fields, stop sequences and `logit_bias`; for chat, the
//! conversation as qpai's own models read it (tools, `response_format`),
//! rendered with the chat templates and its grammar compiled; and batch
//! input files, whose lines go through the same checks. What needs a
//! served model comes from `stand_ins`.

use serde_json::Value;

use super::{Target, stand_ins};
use crate::batches::input;
use crate::gateway::EmbeddingRequest;
use crate::gateway::chat_prompt::LocalPrompt;
use crate::gateway::completions::{DEFAULT_MAX_TOKENS, MAX_LOGPROBS};
use crate::gateway::validate;
use crate::gateway::wire::{
    ChatCompletionRequest, CompletionRequest, Prompt, SamplingFields, parse_json,
};

/// A `/v1/chat/completions` body.
pub fn chat_request(data: &[u8]) {
    let Ok(request) = parse_json::<ChatCompletionRequest>(data) else {
        return;
    };
    // The body an upstream deployment would be sent.
    let _ = serde_json::to_value(&request);
    let _ = validate::check_chat_counts(&request);
    let prompt_tokens = local_prompt_tokens(&request);
    let fields = request.sampling();
    let (length_param, requested) = match request.max_completion_tokens {
        Some(n) => ("max_completion_tokens", Some(n)),
        None => ("max_tokens", fields.max_tokens),
    };
    let _ = validate::max_new_tokens(
        length_param,
        requested,
        None,
        prompt_tokens,
        stand_ins::CONTEXT_LENGTH,
        "messages",
    );
    let _ = validate::top_logprobs(
        "top_logprobs",
        request.top_logprobs,
        validate::MAX_TOP_LOGPROBS,
    );
    check_sampling(&fields, request.logit_bias.as_ref());
}

/// What a local chat does before it generates: the conversation read,
/// rendered with each chat template and tokenized, and the grammar of the
/// answer compiled. The prompt's length in tokens (one when the
/// conversation is refused).
fn local_prompt_tokens(request: &ChatCompletionRequest) -> usize {
    let Ok(prompt) = LocalPrompt::read(request) else {
        return 1;
    };
    let mut tokens = 1;
    for template in stand_ins::chat_templates() {
        if let Ok(text) = template.render(&prompt.messages, true) {
            tokens = stand_ins::token_count(&text);
        }
    }
    if let Some(spec) = prompt.grammar {
        stand_ins::constrain(spec);
    }
    tokens
}

/// A `/v1/completions` body.
pub fn completion_request(data: &[u8]) {
    let Ok(request) = parse_json::<CompletionRequest>(data) else {
        return;
    };
    let _ = serde_json::to_value(&request);
    let _ = validate::reject_unknown_fields(&request.other, "");
    let fields = request.sampling();
    let _ = validate::max_new_tokens(
        "max_tokens",
        fields.max_tokens,
        Some(DEFAULT_MAX_TOKENS),
        prompt_length(&request.prompt),
        stand_ins::CONTEXT_LENGTH,
        "prompt",
    );
    if let Some(logprobs) = request.logprobs {
        let _ = validate::top_logprobs("logprobs", Some(logprobs), MAX_LOGPROBS);
    }
    check_sampling(&fields, request.logit_bias.as_ref());
}

/// The first prompt's length in tokens: text tokenized, token ids counted.
fn prompt_length(prompt: &Prompt) -> usize {
    match prompt {
        Prompt::Text(text) => stand_ins::token_count(text),
        Prompt::Texts(texts) => texts.first().map_or(0, |text| stand_ins::token_count(text)),
        Prompt::Tokens(ids) => ids.len(),
        Prompt::TokenLists(lists) => lists.first().map_or(0, Vec::len),
    }
}

/// The checks chat and text completions share.
fn check_sampling(fields: &SamplingFields, logit_bias: Option<&Value>) {
    let _ = validate::sampling_params(fields);
    let _ = validate::stop_strings(&fields.stop);
    let _ = validate::choice_count(fields.n);
    let _ = validate::include_usage(fields);
    let _ = validate::logit_bias(logit_bias, stand_ins::VOCAB_SIZE);
    validate::log_caller(fields);
}

/// A `/v1/embeddings` body (what is checked before an embedding model
/// tokenizes the input).
pub fn embedding_request(data: &[u8]) {
    let Ok(request) = parse_json::<EmbeddingRequest>(data) else {
        return;
    };
    let _ = serde_json::to_value(&request);
    let _ = validate::reject_unknown_fields(&request.other, "");
}

/// The endpoints a batch runs, and the body check each of its lines goes
/// through when it runs.
const BATCH_ENDPOINTS: [(&str, Target); 3] = [
    ("/v1/chat/completions", chat_request),
    ("/v1/completions", completion_request),
    ("/v1/embeddings", embedding_request),
];

/// A batch input file (JSONL), checked for each endpoint; the bodies of
/// a file that passes are then read as its endpoint reads them.
pub fn batch_line(data: &[u8]) {
    for (endpoint, read_body) in BATCH_ENDPOINTS {
        if let Ok(checked) = input::check(data, endpoint) {
            for line in &checked.lines {
                read_body(line.body.as_bytes());
            }
        }
    }
}
