//! `POST /v1/completions`: plain text (or token ids) in, continuation out.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::billing::Bill;
use super::extract::ApiJson;
use super::streaming::{ChunkFormat, collect, sse};
use super::wire::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Prompt, Usage,
};
use super::{AppState, submit_error, unix_now, validate};
use crate::engine::{FinishReason, GenerationRequest, Logprobs};
use crate::error::{ApiError, ApiResult};
use crate::models::{LoadedModel, ModelKind};
use crate::router::tokens::TokenCounter;

/// OpenAI's default `max_tokens` for text completions.
const DEFAULT_MAX_TOKENS: usize = 16;
const MAX_LOGPROBS: i64 = 5;

#[tracing::instrument(skip_all, fields(model = %request.model))]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<crate::tenancy::Principal>>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> ApiResult<Response> {
    validate::reject_unknown_fields(&request.other, "")?;
    let (engine, adapter) = state.target(&principal, &request.model).await?;
    let model = engine.model();
    if model.kind == ModelKind::Embedding {
        return Err(ApiError::invalid_param(
            "model",
            format!("The model '{}' is an embedding model.", model.id),
        ));
    }
    let (prompt_text, prompt_ids) = prompt_tokens(model, &request.prompt)?;
    let fields = &request.sampling();
    let sampling = validate::sampling_params(fields)?;
    let max_new_tokens = validate::max_new_tokens(
        "max_tokens",
        fields.max_tokens,
        Some(DEFAULT_MAX_TOKENS),
        prompt_ids.len(),
        model.context_length,
        "prompt",
    )?;
    let top_logprobs = request
        .logprobs
        .map(|k| validate::top_logprobs("logprobs", Some(k), MAX_LOGPROBS))
        .transpose()?;
    let echo = request.echo.unwrap_or(false);
    if echo && top_logprobs.is_some() {
        return Err(ApiError::unsupported_param("echo"));
    }
    let stream = fields.stream.unwrap_or(false);
    if fields.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true.",
        ));
    }
    let n = validate::choice_count(fields.n)?;
    let generation = GenerationRequest {
        prompt_ids,
        max_new_tokens,
        stop: validate::stop_strings(&fields.stop)?,
        n,
        sampling,
        top_logprobs,
        adapter,
        logit_bias: validate::logit_bias(
            request.logit_bias.as_ref(),
            model.tokenizer.get_vocab_size(true),
        )?,
        constraint: None,
    };
    validate::log_caller(fields);
    let prompt_tokens = generation.prompt_ids.len();
    let bill = Bill::local(
        &state,
        &principal,
        "completions",
        &model.id,
        prompt_tokens as u64,
        (max_new_tokens * n) as u64,
        Some(TokenCounter::Local(model.tokenizer.clone())),
    )
    .await?;
    let events = engine.submit(generation).map_err(submit_error)?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();
    let echoed = if echo { prompt_text } else { String::new() };
    if stream {
        let include_usage = fields
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let format = CompletionChunks {
            id,
            created,
            model: request.model.clone(),
            include_usage,
            echo: echoed,
            offsets: vec![0; n],
        };
        // With a ledger the stream always ends with usage (for the bill).
        let usage_chunk = include_usage || bill.is_some();
        let response = sse(format, events, n, prompt_tokens, usage_chunk).into_response();
        return Ok(match bill {
            Some(bill) => bill.meter_stream(response, include_usage),
            None => response,
        });
    }
    let outputs = collect(events, n).await?;
    let completion_tokens = outputs.iter().map(|o| o.completion_tokens).sum();
    if let Some(bill) = bill {
        bill.settle_usage(prompt_tokens as u64, completion_tokens as u64);
    }
    let choices = outputs
        .into_iter()
        .enumerate()
        .map(|(index, out)| CompletionChoice {
            index,
            text: format!("{echoed}{}", out.text),
            logprobs: top_logprobs.map(|_| completion_logprobs(&out.logprobs, &mut 0)),
            finish_reason: out.finish_reason,
        })
        .collect();
    Ok(Json(Completion {
        id,
        object: "text_completion",
        created,
        model: request.model.clone(),
        system_fingerprint: None,
        choices,
        usage: Some(Some(Usage::new(prompt_tokens, completion_tokens))),
    })
    .into_response())
}

/// The prompt as text (for `echo`) and as token ids.
fn prompt_tokens(model: &LoadedModel, prompt: &Prompt) -> ApiResult<(String, Vec<u32>)> {
    let single = |what: usize| {
        if what == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid_param(
                "prompt",
                format!("Exactly one prompt per request is supported; got {what}."),
            ))
        }
    };
    let (text, ids) = match prompt {
        Prompt::Text(text) => (text.clone(), encode(model, text)?),
        Prompt::Texts(texts) => {
            single(texts.len())?;
            (texts[0].clone(), encode(model, &texts[0])?)
        }
        Prompt::Tokens(ids) => (decode(model, ids)?, ids.clone()),
        Prompt::TokenLists(lists) => {
            single(lists.len())?;
            (decode(model, &lists[0])?, lists[0].clone())
        }
    };
    if ids.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "The prompt must not be empty.",
        ));
    }
    Ok((text, ids))
}

fn encode(model: &LoadedModel, text: &str) -> ApiResult<Vec<u32>> {
    model.encode_prompt(text).map_err(ApiError::internal)
}

fn decode(model: &LoadedModel, ids: &[u32]) -> ApiResult<String> {
    let vocab = model.tokenizer.get_vocab_size(true) as u32;
    if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
        return Err(ApiError::invalid_param(
            "prompt",
            format!("Token id {bad} is outside the model's vocabulary (size {vocab})."),
        ));
    }
    model
        .tokenizer
        .decode(ids, false)
        .map_err(ApiError::internal)
}

/// OpenAI's legacy logprobs object; `offset` is the running character offset.
fn completion_logprobs(tokens: &[Logprobs], offset: &mut usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for lp in tokens {
        out.tokens.push(lp.chosen.text.clone());
        out.token_logprobs.push(lp.chosen.logprob);
        out.top_logprobs.push(
            lp.top
                .iter()
                .map(|t| (t.text.clone(), t.logprob))
                .collect::<BTreeMap<_, _>>(),
        );
        out.text_offset.push(*offset);
        *offset += lp.chosen.text.chars().count();
    }
    out
}

struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    echo: String,
    offsets: Vec<usize>,
}

impl CompletionChunks {
    fn chunk(&self, choices: Vec<CompletionChoice>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage: self.include_usage.then_some(None),
        }
    }
}

impl ChunkFormat for CompletionChunks {
    type Chunk = Completion;

    fn opening(&mut self, n: usize) -> Vec<Completion> {
        if self.echo.is_empty() {
            return Vec::new();
        }
        (0..n)
            .map(|index| {
                self.chunk(vec![CompletionChoice {
                    index,
                    text: self.echo.clone(),
                    logprobs: None,
                    finish_reason: None,
                }])
            })
            .collect()
    }

    fn token(
        &mut self,
        choice: usize,
        text: String,
        logprobs: Option<Logprobs>,
    ) -> Option<Completion> {
        if text.is_empty() && logprobs.is_none() {
            return None;
        }
        let logprobs = logprobs
            .map(|lp| completion_logprobs(std::slice::from_ref(&lp), &mut self.offsets[choice]));
        Some(self.chunk(vec![CompletionChoice {
            index: choice,
            text,
            logprobs,
            finish_reason: None,
        }]))
    }

    fn end(&mut self, choice: usize, finish_reason: FinishReason) -> Completion {
        self.chunk(vec![CompletionChoice {
            index: choice,
            text: String::new(),
            logprobs: None,
            finish_reason: Some(finish_reason),
        }])
    }

    fn usage(&mut self, usage: Usage) -> Completion {
        let mut chunk = self.chunk(Vec::new());
        chunk.usage = Some(Some(usage));
        chunk
    }
}
