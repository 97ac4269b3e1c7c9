//! Text completions through the gateway: plain text (or token ids) in,
//! continuation out, on qpai's own models or on deployments that declare
//! the `completions` capability, routed and billed as chat is.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;

use super::bill::Metered;
use super::drive::{AttemptError, Attempts, Plan, Reply, rank_prepared};
use super::events::{Chunk, ChunkFormat, collect, local_stream};
use super::wire::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Prompt, Usage,
};
use super::{Answer, Gateway, Hints, Whole, submit_error, unix_now, validate};
use crate::engine::{Engine, FinishReason, GenerationRequest, Logprobs, Priority};
use crate::error::{ApiError, ApiResult};
use crate::lora::UnmergedAdapter;
use crate::models::{LoadedModel, ModelKind};
use crate::router::policy::{self, Candidate, Needs};
use crate::router::tokens::RemoteCounts;
use crate::router::{Capability, Endpoint, ProviderKind};
use crate::tenancy::Principal;

/// OpenAI's default `max_tokens` for text completions.
pub const DEFAULT_MAX_TOKENS: usize = 16;
/// The most `logprobs` a text completion may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: i64 = 5;

/// What planning prepared for a local candidate.
pub struct PreparedText {
    engine: Engine,
    adapter: Option<Arc<UnmergedAdapter>>,
    /// The prompt as text (for `echo`) and as token ids.
    text: String,
    ids: Vec<u32>,
}

impl PreparedText {
    fn new(
        engine: Engine,
        adapter: Option<Arc<UnmergedAdapter>>,
        prompt: &Prompt,
    ) -> ApiResult<Self> {
        let model = engine.model();
        if model.kind == ModelKind::Embedding {
            return Err(ApiError::invalid_param(
                "model",
                format!("The model '{}' is an embedding model.", model.id),
            ));
        }
        let (text, ids) = prompt_tokens(model, prompt)?;
        Ok(Self {
            engine,
            adapter,
            text,
            ids,
        })
    }
}

impl Gateway {
    /// A text completion for `principal`: routed, run, metered and billed.
    pub async fn complete(
        &self,
        principal: &Principal,
        mut request: CompletionRequest,
        hints: &Hints,
    ) -> ApiResult<Answer> {
        let standing = self.standing(principal).await?;
        if let Some(tenancy) = &self.tenancy {
            request.max_tokens =
                tenancy.cap_max_tokens(principal, request.max_tokens, "max_tokens")?;
        }
        let requested = self.requested_model(&request.model, &standing);
        let stream = request.stream == Some(true);
        let mut capabilities = BTreeSet::new();
        if stream {
            capabilities.insert(Capability::Streaming);
        }
        let needs = Needs {
            capabilities,
            task: hints.task.clone(),
            min_quality: self.quality_floor(hints, &standing),
            max_tokens: request.max_tokens.map(|n| n.max(0) as u64),
            choices: request.n.unwrap_or(1).max(1) as u64,
        };
        let mut remote_body = None;
        let candidates = match policy::offered(&self.router.catalog, &requested) {
            None => {
                validate::reject_unknown_fields(&request.other, "")?;
                let (engine, adapter) = self.models.target(principal, &requested).await?;
                let job = PreparedText::new(engine, adapter, &request.prompt)?;
                let needs = Needs {
                    max_tokens: Some(needs.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS as u64)),
                    ..needs
                };
                let model = job.engine.model();
                let candidate = self.local_candidate(
                    &requested,
                    model.parent.as_deref().unwrap_or(&model.id),
                    model.context_length,
                    job.ids.len() as u64,
                    &needs,
                );
                vec![(candidate, Some(job))]
            }
            Some((offered, _pinned)) => {
                let offered: Vec<_> = offered.into_iter().filter(|d| !d.is_embedder()).collect();
                if offered.iter().any(|d| d.provider != ProviderKind::Local) {
                    remote_body = Some(serde_json::to_value(&request).map_err(ApiError::internal)?);
                }
                let unknown = validate::reject_unknown_fields(&request.other, "").err();
                let mut targets = self.models.local_targets(principal, &offered).await;
                let mut counted = RemoteCounts::default();
                rank_prepared(&requested, &offered, &needs, |deployment, local_errors| {
                    if deployment.provider != ProviderKind::Local {
                        if !deployment.capabilities.contains(&Capability::Completions) {
                            return Err("does not serve text completions".into());
                        }
                        let tokens =
                            counted.count(&deployment.model, |counter| match &request.prompt {
                                Prompt::Text(text) => counter.count(text),
                                Prompt::Texts(texts) => {
                                    texts.iter().map(|t| counter.count(t)).sum()
                                }
                                Prompt::Tokens(ids) => ids.len() as u64,
                                Prompt::TokenLists(lists) => {
                                    lists.iter().map(|l| l.len() as u64).sum()
                                }
                            });
                        return Ok((tokens, None));
                    }
                    let (engine, adapter) = targets
                        .remove(&deployment.name)
                        .unwrap_or_else(|| Err(ApiError::model_not_found(&deployment.model)))
                        .map_err(|e| e.message)?;
                    let job = match &unknown {
                        Some(error) => Err(error.clone()),
                        None => PreparedText::new(engine, adapter, &request.prompt),
                    }
                    .map_err(|e| {
                        local_errors.push(e.clone());
                        e.message
                    })?;
                    Ok((job.ids.len() as u64, Some(job)))
                })?
            }
        };
        let plan = Plan {
            requested,
            candidates,
            stream,
            batch: hints.batch.clone(),
            eval: hints.eval.clone(),
            request_id: None,
            prompt: None,
        };
        let attempts = TextAttempts {
            gateway: self,
            request: &request,
            remote_body,
            priority: hints.priority(),
        };
        self.drive(principal, Endpoint::Completions, standing, plan, &attempts)
            .await
    }
}

struct TextAttempts<'a> {
    gateway: &'a Gateway,
    request: &'a CompletionRequest,
    remote_body: Option<Value>,
    priority: Priority,
}

impl Attempts<PreparedText> for TextAttempts<'_> {
    fn attempt<'a>(
        &'a self,
        candidate: &'a Candidate,
        job: Option<&'a PreparedText>,
    ) -> BoxFuture<'a, Result<Reply, AttemptError>> {
        async move {
            let deployment = &candidate.deployment;
            if deployment.provider == ProviderKind::Local {
                let job =
                    job.ok_or_else(|| ApiError::internal("a local route without its prompt"))?;
                return run_local(self.request, job, &deployment.model, self.priority).await;
            }
            let include_usage = validate::include_usage(&self.request.sampling()).unwrap_or(false);
            self.gateway
                .upstream_reply(
                    deployment,
                    Endpoint::Completions,
                    self.remote_body.as_ref(),
                    include_usage,
                )
                .await
        }
        .boxed()
    }
}

/// Checks the request on the job's model and generates.
async fn run_local(
    request: &CompletionRequest,
    job: &PreparedText,
    model_name: &str,
    priority: Priority,
) -> Result<Reply, AttemptError> {
    let model = job.engine.model();
    let fields = &request.sampling();
    let sampling = validate::sampling_params(fields)?;
    let max_new_tokens = validate::max_new_tokens(
        "max_tokens",
        fields.max_tokens,
        Some(DEFAULT_MAX_TOKENS),
        job.ids.len(),
        model.context_length,
        "prompt",
    )?;
    let top_logprobs = request
        .logprobs
        .map(|k| validate::top_logprobs("logprobs", Some(k), MAX_LOGPROBS))
        .transpose()?;
    let echo = request.echo.unwrap_or(false);
    if echo && top_logprobs.is_some() {
        return Err(ApiError::unsupported_param("echo").into());
    }
    let stream = fields.stream.unwrap_or(false);
    let include_usage = validate::include_usage(fields)?;
    let n = validate::choice_count(fields.n)?;
    let generation = GenerationRequest {
        prompt_ids: job.ids.clone(),
        max_new_tokens,
        stop: validate::stop_strings(&fields.stop)?,
        n,
        sampling,
        top_logprobs,
        adapter: job.adapter.clone(),
        logit_bias: validate::logit_bias(
            request.logit_bias.as_ref(),
            model.tokenizer.get_vocab_size(true),
        )?,
        constraint: None,
        priority,
        ignore_eos: fields.ignore_eos.unwrap_or(false),
    };
    validate::log_caller(fields);
    let prompt_tokens = generation.prompt_ids.len();
    let events = job
        .engine
        .submit(generation)
        .map_err(|e| AttemptError::local_busy(submit_error(e)))?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();
    let echoed = if echo {
        job.text.clone()
    } else {
        String::new()
    };
    if stream {
        let format = CompletionChunks {
            id,
            created,
            model: model_name.to_string(),
            include_usage,
            echo: echoed,
            offsets: vec![0; n],
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
        .map(|(index, out)| CompletionChoice {
            index,
            text: format!("{echoed}{}", out.text),
            logprobs: top_logprobs.map(|_| completion_logprobs(&out.logprobs, &mut 0)),
            finish_reason: out.finish_reason,
        })
        .collect();
    let completion = Completion {
        id,
        object: "text_completion",
        created,
        model: model_name.to_string(),
        system_fingerprint: None,
        choices,
        usage: Some(Some(Usage::new(prompt_tokens, completion_tokens))),
    };
    Ok(Reply::Whole {
        body: Whole::Text(completion),
        usage: Metered::Reported((prompt_tokens as u64, completion_tokens as u64)),
    })
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
    fn chunk(&self, choices: Vec<CompletionChoice>) -> Chunk {
        Chunk::Text(Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage: self.include_usage.then_some(None),
        })
    }
}

impl ChunkFormat for CompletionChunks {
    fn opening(&mut self, n: usize) -> Vec<Chunk> {
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

    fn token(&mut self, choice: usize, text: String, logprobs: Option<Logprobs>) -> Option<Chunk> {
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

    fn end(&mut self, choice: usize, finish_reason: FinishReason) -> Chunk {
        self.chunk(vec![CompletionChoice {
            index: choice,
            text: String::new(),
            logprobs: None,
            finish_reason: Some(finish_reason),
        }])
    }

    fn usage(&mut self, usage: Usage) -> Chunk {
        let mut chunk = Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices: Vec::new(),
            usage: None,
        };
        chunk.usage = Some(Some(usage));
        Chunk::Text(chunk)
    }
}
