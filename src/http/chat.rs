//! `POST /v1/chat/completions`: the conversation is rendered with the
//! model's chat template, tokenized, checked, and generated (whole or streamed).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::chat_messages::LocalPrompt;
use super::extract::{ApiBody, parse_json};
use super::streaming::{ChunkFormat, collect, sse};
use super::tool_calls::{ToolStream, answer_message};
use super::wire::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatTokenLogprob, Citation, RagOptions,
    TopLogprob, Usage,
};
use super::{AppState, submit_error, unix_now, validate};
use crate::engine::constraint::{Constraint, ConstraintError, GrammarSpec};
use crate::engine::{Engine, FinishReason, GenerationRequest, Logprobs, TokenLogprob};
use crate::error::{ApiError, ApiResult};
use crate::models::chat_template::TemplateError;
use crate::models::{LoadedModel, ModelKind, TemplateMessage};
use crate::rag::{SearchRequest, SiteName, prompt, search};
use crate::tenancy::Principal;

/// `POST /v1/chat/completions`: routed (a local model, or a deployment of
/// the routing catalog), metered and billed.
#[tracing::instrument(skip_all)]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> ApiResult<Response> {
    let request: ChatCompletionRequest = parse_json(&body)?;
    let raw: serde_json::Value = parse_json(&body)?;
    tracing::Span::current().record("model", request.model.as_str());
    super::routing::route_chat(state, principal, &headers, raw, request).await
}

/// The chat template of a model that has one.
fn chat_template(model: &LoadedModel) -> ApiResult<&crate::models::chat_template::ChatTemplate> {
    match (&model.chat_template, model.kind) {
        (Some(template), ModelKind::Chat | ModelKind::Completion) => Ok(template),
        _ => Err(ApiError::invalid_param(
            "model",
            format!(
                "The model '{}' has no chat template; use /v1/completions.",
                model.id
            ),
        )),
    }
}

/// The prompt's token ids: the messages rendered with the model's template.
fn prompt_ids(model: &LoadedModel, messages: &[TemplateMessage]) -> ApiResult<Vec<u32>> {
    let prompt = chat_template(model)?
        .render(messages, true)
        .map_err(|e| match e {
            TemplateError::Rejected(message) => ApiError::invalid_param("messages", message),
            TemplateError::Broken(message) => ApiError::internal(message),
        })?;
    Ok(model
        .tokenizer
        .encode_fast(prompt.as_str(), false)
        .map_err(ApiError::internal)?
        .get_ids()
        .to_vec())
}

/// The request's prompt tokens on a local model, before any grounding.
pub fn local_prompt_tokens(
    model: &LoadedModel,
    request: &ChatCompletionRequest,
) -> ApiResult<usize> {
    prompt_ids(model, &LocalPrompt::read(request)?.messages).map(|ids| ids.len())
}

/// Compiles the answer's grammar for `engine`'s model (cached by source).
async fn compile_grammar(
    engine: &Engine,
    spec: GrammarSpec,
    param: &'static str,
) -> ApiResult<Constraint> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || engine.grammars().compile(spec))
        .await
        .map_err(ApiError::internal)?
        .map_err(|error| match error {
            ConstraintError::Invalid(message) => ApiError::invalid_param(
                param,
                format!("The requested output cannot be enforced: {message}"),
            ),
            ConstraintError::Unavailable(_) => ApiError::invalid_param(param, error.to_string()),
        })
}

/// A chat completion on one of qpai's own models. A stream ends with a
/// usage chunk when the client asked for one or `report_usage` is set (the
/// router reads it to bill, and removes it again).
pub async fn local_chat(
    state: Arc<AppState>,
    principal: Arc<Principal>,
    request: ChatCompletionRequest,
    report_usage: bool,
) -> ApiResult<Response> {
    let prompt = LocalPrompt::read(&request)?;
    let grammar_param = prompt.grammar_param();
    let LocalPrompt {
        mut messages,
        calling,
        grammar,
    } = prompt;
    let (engine, adapter) = state.target(&principal, &request.model).await?;
    let model = engine.model();
    chat_template(model)?;
    let citations = match &request.rag {
        Some(options) => Some(ground(&state, &principal, options, &mut messages).await?),
        None => None,
    };
    let prompt_ids = prompt_ids(model, &messages)?;
    let fields = request.sampling();
    let sampling = validate::sampling_params(&fields)?;
    let (length_param, requested) = match request.max_completion_tokens {
        Some(n) => ("max_completion_tokens", Some(n)),
        None => ("max_tokens", fields.max_tokens),
    };
    let max_new_tokens = validate::max_new_tokens(
        length_param,
        requested,
        None,
        prompt_ids.len(),
        model.context_length,
        "messages",
    )?;
    let logprobs = request.logprobs.unwrap_or(false);
    let top_logprobs = validate::top_logprobs(
        "top_logprobs",
        request.top_logprobs,
        validate::MAX_TOP_LOGPROBS,
    )?;
    if request.top_logprobs.is_some() && !logprobs {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            "'top_logprobs' requires 'logprobs' to be true.",
        ));
    }
    let stream = fields.stream.unwrap_or(false);
    if fields.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true.",
        ));
    }
    let n = validate::choice_count(fields.n)?;
    let logit_bias = validate::logit_bias(
        request.logit_bias.as_ref(),
        model.tokenizer.get_vocab_size(true),
    )?;
    let constraint = match grammar {
        Some(spec) => Some(compile_grammar(&engine, spec, grammar_param).await?),
        None => None,
    };
    let tool_mode = calling.is_some();
    let generation = GenerationRequest {
        prompt_ids,
        max_new_tokens,
        stop: validate::stop_strings(&fields.stop)?,
        n,
        sampling,
        top_logprobs: logprobs.then_some(top_logprobs),
        adapter,
        logit_bias,
        constraint,
    };
    validate::log_caller(&fields);
    let prompt_tokens = generation.prompt_ids.len();
    let events = engine.submit(generation).map_err(submit_error)?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();
    if stream {
        let include_usage = fields
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let format = ChatChunks {
            id,
            created,
            model: request.model.clone(),
            include_usage,
            citations,
            tool_streams: tool_mode.then(|| (0..n).map(|_| ToolStream::default()).collect()),
        };
        let usage_chunk = include_usage || report_usage;
        return Ok(sse(format, events, n, prompt_tokens, usage_chunk).into_response());
    }
    let outputs = collect(events, n).await?;
    let completion_tokens = outputs.iter().map(|o| o.completion_tokens).sum();
    let choices = outputs
        .into_iter()
        .enumerate()
        .map(|(index, out)| {
            let (message, finish_reason) = if tool_mode {
                answer_message(out.text, out.finish_reason)
            } else {
                let message = AssistantMessage {
                    role: "assistant",
                    content: Some(out.text),
                    refusal: None,
                    tool_calls: None,
                };
                (message, out.finish_reason)
            };
            ChatChoice {
                index,
                message,
                logprobs: logprobs.then(|| chat_logprobs(&out.logprobs)),
                finish_reason,
            }
        })
        .collect();
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model: request.model.clone(),
        system_fingerprint: None,
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens),
        citations,
    })
    .into_response())
}

/// Retrieves from the site for the last user message and replaces that
/// message with the grounded prompt (sources, instructions, question).
async fn ground(
    state: &AppState,
    principal: &Principal,
    options: &RagOptions,
    messages: &mut [TemplateMessage],
) -> ApiResult<Vec<Citation>> {
    let site = SiteName::parse(&options.site)
        .map_err(|e| ApiError::invalid_param("rag.site", e.to_string()))?;
    state
        .check_site_access(principal, site.as_str())
        .await
        .map_err(|mut e| {
            e.param = Some("rag.site".into());
            e
        })?;
    let Some(question) = messages.iter_mut().rev().find(|m| m.role == "user") else {
        return Err(ApiError::invalid_param(
            "messages",
            "'rag' needs a user message to answer.",
        ));
    };
    let request = SearchRequest {
        query: question.content.clone(),
        top_k: options.top_k.unwrap_or(5),
        mode: options.mode.unwrap_or_default(),
        filter: options.filter.clone().unwrap_or_default(),
    };
    let rag = state.rag().await?;
    let hits =
        search::search(&rag, &site, &request)
            .await
            .map_err(|e| match ApiError::from(e) {
                ApiError {
                    param: Some(param),
                    status,
                    message,
                    code,
                    retry_after,
                } if status.is_client_error() => {
                    let param = if param == "query" {
                        "messages".to_string()
                    } else {
                        format!("rag.{param}")
                    };
                    ApiError {
                        param: Some(param),
                        status,
                        message,
                        code,
                        retry_after,
                    }
                }
                other => other,
            })?;
    question.content = prompt::render(&question.content, &hits).map_err(ApiError::internal)?;
    tracing::debug!(site = %site, sources = hits.len(), template = prompt::TEMPLATE_NAME, "grounded prompt");
    Ok(hits
        .into_iter()
        .enumerate()
        .map(|(i, hit)| Citation {
            index: i + 1,
            url: hit.url,
            title: hit.title,
            chunk_id: hit.chunk_id,
            score: hit.score,
        })
        .collect())
}

fn top_logprob(token: &TokenLogprob) -> TopLogprob {
    TopLogprob {
        token: token.text.clone(),
        logprob: token.logprob,
        bytes: token.text.as_bytes().to_vec(),
    }
}

fn chat_logprobs(tokens: &[Logprobs]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|lp| ChatTokenLogprob {
                token: lp.chosen.text.clone(),
                logprob: lp.chosen.logprob,
                bytes: lp.chosen.text.as_bytes().to_vec(),
                top_logprobs: lp.top.iter().map(top_logprob).collect(),
            })
            .collect(),
        refusal: None,
    }
}

struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    citations: Option<Vec<Citation>>,
    /// Per choice, in tool mode: the answer read as it streams.
    tool_streams: Option<Vec<ToolStream>>,
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChatChunkChoice>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage: self.include_usage.then_some(None),
            citations: None,
        }
    }
}

impl ChunkFormat for ChatChunks {
    type Chunk = ChatCompletionChunk;

    fn opening(&mut self, n: usize) -> Vec<ChatCompletionChunk> {
        (0..n)
            .map(|index| {
                self.chunk(vec![ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                        tool_calls: None,
                    },
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
    ) -> Option<ChatCompletionChunk> {
        let delta = match self.tool_streams.as_mut() {
            Some(streams) => {
                let delta = streams[choice].push(&text);
                ChatDelta {
                    role: None,
                    content: delta.content,
                    tool_calls: (!delta.tool_calls.is_empty()).then_some(delta.tool_calls),
                }
            }
            None => ChatDelta {
                role: None,
                content: Some(text),
                tool_calls: None,
            },
        };
        let says_nothing =
            delta.content.as_ref().is_none_or(String::is_empty) && delta.tool_calls.is_none();
        if says_nothing && logprobs.is_none() {
            return None;
        }
        Some(self.chunk(vec![ChatChunkChoice {
            index: choice,
            delta,
            logprobs: logprobs.map(|lp| chat_logprobs(std::slice::from_ref(&lp))),
            finish_reason: None,
        }]))
    }

    fn end(&mut self, choice: usize, finish_reason: FinishReason) -> ChatCompletionChunk {
        let finish_reason = match &self.tool_streams {
            Some(streams) => streams[choice].finish_reason(finish_reason),
            None => finish_reason,
        };
        let mut chunk = self.chunk(vec![ChatChunkChoice {
            index: choice,
            delta: ChatDelta::default(),
            logprobs: None,
            finish_reason: Some(finish_reason),
        }]);
        chunk.citations = self.citations.clone();
        chunk
    }

    fn usage(&mut self, usage: Usage) -> ChatCompletionChunk {
        let mut chunk = self.chunk(Vec::new());
        chunk.usage = Some(Some(usage));
        chunk.citations = self.citations.clone();
        chunk
    }
}
