//! A chat completion on one of qpai's own models: the conversation is
//! read once per request (rendered messages, grounding, the grammar of the
//! answer), rendered with each candidate model's chat template and
//! tokenized once, then checked and generated, whole or streamed.

use std::sync::Arc;

use super::Gateway;
use super::bill::Metered;
use super::chat_prompt::LocalPrompt;
use super::drive::{AttemptError, Reply};
use super::events::{Chunk, ChunkFormat, collect, local_stream};
use super::tool_calls::{ToolStream, answer_message};
use super::wire::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatTokenLogprob, Citation, TopLogprob, Usage,
};
use super::{Whole, submit_error, unix_now, validate};
use crate::engine::constraint::{Constraint, ConstraintError, GrammarSpec};
use crate::engine::{Engine, FinishReason, GenerationRequest, Logprobs, Priority, TokenLogprob};
use crate::error::{ApiError, ApiResult};
use crate::lora::UnmergedAdapter;
use crate::models::chat_template::TemplateError;
use crate::models::{LoadedModel, ModelKind, TemplateMessage};
use crate::tenancy::Principal;

/// A chat request as qpai's own models read it, once per request.
pub struct LocalChat {
    messages: Vec<TemplateMessage>,
    /// The answer is read as tool calls.
    tool_mode: bool,
    grammar: Option<GrammarSpec>,
    /// The request field a grammar error is reported on.
    grammar_param: &'static str,
    citations: Option<Vec<Citation>>,
}

/// What planning prepared for a local candidate: its engine, adapter and
/// tokenized prompt.
pub struct PreparedChat {
    pub engine: Engine,
    pub adapter: Option<Arc<UnmergedAdapter>>,
    pub prompt_ids: Vec<u32>,
}

impl Gateway {
    /// Reads `request` for local models, grounding it when it asks.
    pub(super) async fn read_local_chat(
        &self,
        principal: &Principal,
        request: &ChatCompletionRequest,
    ) -> ApiResult<LocalChat> {
        let prompt = LocalPrompt::read(request)?;
        let grammar_param = prompt.grammar_param();
        let LocalPrompt {
            mut messages,
            calling,
            grammar,
        } = prompt;
        let citations = match &request.rag {
            Some(options) => Some(self.ground(principal, options, &mut messages).await?),
            None => None,
        };
        Ok(LocalChat {
            messages,
            tool_mode: calling.is_some(),
            grammar,
            grammar_param,
            citations,
        })
    }
}

impl LocalChat {
    /// The prompt's token ids on `model`: the messages rendered with its
    /// chat template.
    pub fn prompt_ids(&self, model: &LoadedModel) -> ApiResult<Vec<u32>> {
        let template = match (&model.chat_template, model.kind) {
            (Some(template), ModelKind::Chat | ModelKind::Completion) => template,
            _ => {
                return Err(ApiError::invalid_param(
                    "model",
                    format!(
                        "The model '{}' has no chat template; use /v1/completions.",
                        model.id
                    ),
                ));
            }
        };
        let prompt = template.render(&self.messages, true).map_err(|e| match e {
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

    /// Checks the request on `job`'s model and generates: whole, or a
    /// stream billed as it goes. `model_name` is the answer's `model`.
    pub async fn run(
        &self,
        request: &ChatCompletionRequest,
        job: &PreparedChat,
        model_name: &str,
        priority: Priority,
    ) -> Result<Reply, AttemptError> {
        let engine = &job.engine;
        let model = engine.model();
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
            job.prompt_ids.len(),
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
            )
            .into());
        }
        let stream = fields.stream.unwrap_or(false);
        let include_usage = validate::include_usage(&fields)?;
        let n = validate::choice_count(fields.n)?;
        let logit_bias = validate::logit_bias(
            request.logit_bias.as_ref(),
            model.tokenizer.get_vocab_size(true),
        )?;
        let constraint = match &self.grammar {
            Some(spec) => Some(compile_grammar(engine, spec.clone(), self.grammar_param).await?),
            None => None,
        };
        let generation = GenerationRequest {
            prompt_ids: job.prompt_ids.clone(),
            max_new_tokens,
            stop: validate::stop_strings(&fields.stop)?,
            n,
            sampling,
            top_logprobs: logprobs.then_some(top_logprobs),
            adapter: job.adapter.clone(),
            logit_bias,
            constraint,
            priority,
            ignore_eos: fields.ignore_eos.unwrap_or(false),
        };
        validate::log_caller(&fields);
        let prompt_tokens = generation.prompt_ids.len();
        let events = engine
            .submit(generation)
            .map_err(|e| AttemptError::local_busy(submit_error(e)))?;
        let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
        let created = unix_now();
        if stream {
            let format = ChatChunks {
                id,
                created,
                model: model_name.to_string(),
                include_usage,
                citations: self.citations.clone(),
                tool_streams: self
                    .tool_mode
                    .then(|| (0..n).map(|_| ToolStream::default()).collect()),
            };
            return Ok(Reply::Stream(Box::new(move |bill| {
                local_stream(format, events, n, prompt_tokens, include_usage, bill)
            })));
        }
        let outputs = collect(events, n).await?;
        let completion_tokens: usize = outputs.iter().map(|o| o.completion_tokens).sum();
        let choices = outputs
            .into_iter()
            .enumerate()
            .map(|(index, out)| {
                let (message, finish_reason) = if self.tool_mode {
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
        let completion = ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model: model_name.to_string(),
            system_fingerprint: None,
            choices,
            usage: Usage::new(prompt_tokens, completion_tokens),
            citations: self.citations.clone(),
        };
        Ok(Reply::Whole {
            body: Whole::Chat(completion),
            usage: Metered::Reported((prompt_tokens as u64, completion_tokens as u64)),
        })
    }
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
    fn opening(&mut self, n: usize) -> Vec<Chunk> {
        (0..n)
            .map(|index| {
                Chunk::Chat(self.chunk(vec![ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                        tool_calls: None,
                    },
                    logprobs: None,
                    finish_reason: None,
                }]))
            })
            .collect()
    }

    fn token(&mut self, choice: usize, text: String, logprobs: Option<Logprobs>) -> Option<Chunk> {
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
        Some(Chunk::Chat(self.chunk(vec![ChatChunkChoice {
            index: choice,
            delta,
            logprobs: logprobs.map(|lp| chat_logprobs(std::slice::from_ref(&lp))),
            finish_reason: None,
        }])))
    }

    fn end(&mut self, choice: usize, finish_reason: FinishReason) -> Chunk {
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
        Chunk::Chat(chunk)
    }

    fn usage(&mut self, usage: Usage) -> Chunk {
        let mut chunk = self.chunk(Vec::new());
        chunk.usage = Some(Some(usage));
        chunk.citations = self.citations.clone();
        Chunk::Chat(chunk)
    }
}
