//! Parse, don't validate: wire requests become checked `GenerationRequest`s
//! (tokenized, limits applied) before anything is queued. Every refusal names
//! the parameter.

use std::collections::BTreeMap;

use serde_json::Value;

use super::wire::{SamplingFields, StopSequences};
use crate::engine::SamplingParams;
use crate::error::{ApiError, ApiResult};

pub const MAX_STOP_SEQUENCES: usize = 4;
/// Messages in one chat request.
pub const MAX_MESSAGES: usize = 2048;
/// Tools in one chat request (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
pub const MAX_N: i64 = 16;
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// OpenAI's limits on `logit_bias`.
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 300;
pub const MAX_LOGIT_BIAS: f64 = 100.0;

/// OpenAI request fields this server knows but does not implement yet: each
/// is refused by name rather than silently ignored.
const KNOWN_UNSUPPORTED: [&str; 15] = [
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "suffix",
    "best_of",
    "service_tier",
    "store",
];

/// Refuses every field left over after deserialization.
pub fn reject_unknown_fields(other: &BTreeMap<String, Value>, prefix: &str) -> ApiResult<()> {
    match other
        .iter()
        .find(|(_, v)| !v.is_null())
        .or(other.iter().next())
    {
        None => Ok(()),
        Some((name, _)) if KNOWN_UNSUPPORTED.contains(&name.as_str()) => {
            Err(ApiError::unsupported_param(&format!("{prefix}{name}")))
        }
        Some((name, _)) => Err(ApiError::invalid_param(
            format!("{prefix}{name}"),
            format!("Unrecognized request argument supplied: {prefix}{name}"),
        )),
    }
}

fn in_range(param: &str, value: Option<f32>, min: f32, max: f32, default: f32) -> ApiResult<f32> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && (min..=max).contains(&v) => Ok(v),
        Some(v) => Err(ApiError::invalid_param(
            param,
            format!(
                "{v} is not a valid value for '{param}': expected a number from {min} to {max}."
            ),
        )),
    }
}

pub fn sampling_params(fields: &SamplingFields) -> ApiResult<SamplingParams> {
    let temperature = in_range("temperature", fields.temperature, 0.0, 2.0, 1.0)?;
    let top_p = in_range("top_p", fields.top_p, 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::invalid_param(
            "top_p",
            "'top_p' must be greater than 0.",
        ));
    }
    let top_k = match fields.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!(
                    "{k} is not a valid value for 'top_k': expected a positive integer (or -1/0 to disable)."
                ),
            ));
        }
    };
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        seed: fields.seed.map(|s| s as u64),
        frequency_penalty: in_range(
            "frequency_penalty",
            fields.frequency_penalty,
            -2.0,
            2.0,
            0.0,
        )?,
        presence_penalty: in_range("presence_penalty", fields.presence_penalty, -2.0, 2.0, 0.0)?,
    })
}

pub fn stop_strings(stop: &Option<StopSequences>) -> ApiResult<Vec<String>> {
    let stops = match stop {
        None => Vec::new(),
        Some(StopSequences::One(s)) => vec![s.clone()],
        Some(StopSequences::Many(list)) => list.clone(),
    };
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "At most {MAX_STOP_SEQUENCES} stop sequences are allowed; got {}.",
                stops.len()
            ),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "Stop sequences must not be empty.",
        ));
    }
    Ok(stops)
}

pub fn choice_count(n: Option<i64>) -> ApiResult<usize> {
    match n {
        None => Ok(1),
        Some(n) if (1..=MAX_N).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::invalid_param(
            "n",
            format!("{n} is not a valid value for 'n': expected 1 to {MAX_N}."),
        )),
    }
}

pub fn top_logprobs(param: &str, value: Option<i64>, max: i64) -> ApiResult<usize> {
    match value {
        None => Ok(0),
        Some(k) if (0..=max).contains(&k) => Ok(k as usize),
        Some(k) => Err(ApiError::invalid_param(
            param,
            format!("{k} is not a valid value for '{param}': expected 0 to {max}."),
        )),
    }
}

/// The number of tokens to generate: the request's limit when it fits the
/// context, else the rest of the context.
pub fn max_new_tokens(
    param: &str,
    requested: Option<i64>,
    default: Option<usize>,
    prompt_tokens: usize,
    context_length: usize,
    prompt_param: &str,
) -> ApiResult<usize> {
    if prompt_tokens >= context_length {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid_param(
                prompt_param,
                format!(
                    "This model's maximum context length is {context_length} tokens, but the prompt has {prompt_tokens} tokens."
                ),
            )
        });
    }
    let room = context_length - prompt_tokens;
    match requested {
        None => Ok(default.map_or(room, |d| d.min(room))),
        Some(n) if n < 1 => Err(ApiError::invalid_param(
            param,
            format!("{n} is not a valid value for '{param}': expected at least 1."),
        )),
        Some(n) if n as usize > room => Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid_param(
                param,
                format!(
                    "This model's maximum context length is {context_length} tokens. However, you requested {} tokens ({prompt_tokens} in the prompt, {n} for the completion).",
                    prompt_tokens as i64 + n
                ),
            )
        }),
        Some(n) => Ok(n as usize),
    }
}

/// `logit_bias`: token ids (as strings, the JSON object's keys) to a bias
/// from -100 to 100, added to the logits before sampling.
pub fn logit_bias(value: Option<&Value>, vocab_size: usize) -> ApiResult<Vec<(u32, f32)>> {
    const PARAM: &str = "logit_bias";
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let Some(entries) = value.as_object() else {
        return Err(ApiError::invalid_param(
            PARAM,
            "'logit_bias' must be an object of token ids to biases.",
        ));
    };
    if entries.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(ApiError::invalid_param(
            PARAM,
            format!(
                "'logit_bias' may hold at most {MAX_LOGIT_BIAS_ENTRIES} tokens; got {}.",
                entries.len()
            ),
        ));
    }
    entries
        .iter()
        .map(|(key, bias)| {
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab_size)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        PARAM,
                        format!(
                            "'logit_bias' names the token '{key}', which is not a token id of this model (0 to {}).",
                            vocab_size.saturating_sub(1)
                        ),
                    )
                })?;
            let bias = bias
                .as_f64()
                .filter(|b| (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(b))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        PARAM,
                        format!(
                            "The bias of token {key} must be a number from -100 to 100, not {bias}."
                        ),
                    )
                })?;
            Ok((id, bias as f32))
        })
        .collect()
}

/// `user` and `metadata` are accepted and logged with the request.
pub fn log_caller(fields: &SamplingFields) {
    if fields.user.is_some() || fields.metadata.is_some() {
        let metadata = fields
            .metadata
            .as_ref()
            .map(|m| serde_json::to_string(m).unwrap_or_default());
        tracing::info!(
            user = fields.user.as_deref(),
            metadata = metadata.as_deref(),
            "caller"
        );
    }
}

/// Whether a stream ends with a usage chunk; `stream_options` is refused
/// on a request that does not stream.
pub fn include_usage(fields: &SamplingFields) -> ApiResult<bool> {
    let stream = fields.stream.unwrap_or(false);
    if fields.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true.",
        ));
    }
    Ok(fields
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false))
}

/// Refuses a chat request with more messages or tools than a request may
/// carry, naming the parameter.
pub fn check_chat_counts(request: &super::wire::ChatCompletionRequest) -> ApiResult<()> {
    if request.messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "{} messages; a request may carry at most {MAX_MESSAGES}.",
                request.messages.len()
            ),
        ));
    }
    let tools = request
        .tools
        .as_ref()
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if tools > MAX_TOOLS {
        return Err(ApiError::invalid_param(
            "tools",
            format!("{tools} tools; a request may carry at most {MAX_TOOLS}."),
        ));
    }
    Ok(())
}
