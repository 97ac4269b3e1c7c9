//! Chat completions through the gateway: planned on qpai's own models or
//! the routing catalog's deployments, then driven (see drive.rs). A local
//! candidate's prompt is rendered and tokenized once, when planning counts
//! it; a remote one gets the request written in OpenAI's format once.

use std::collections::BTreeSet;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;

use super::drive::{AttemptError, Attempts, Plan, Reply, rank_prepared};
use super::local_chat::{LocalChat, PreparedChat};
use super::wire::{ChatCompletionRequest, PromptRef};
use super::{Answer, Gateway, Hints, validate};
use crate::engine::Priority;
use crate::error::{ApiError, ApiResult};
use crate::experiments::{Assignment, ExperimentCall};
use crate::router::policy::{self, Candidate, Needs};
use crate::router::tokens::{RemoteCounts, TokenCounter};
use crate::router::{Capability, Endpoint, ProviderKind};
use crate::tenancy::Principal;

impl Gateway {
    /// A chat completion for `principal`: routed, run, metered and billed.
    pub async fn chat(
        &self,
        principal: &Principal,
        mut request: ChatCompletionRequest,
        hints: &Hints,
    ) -> ApiResult<Answer> {
        let assignment = match &hints.experiment {
            Some(call) => Some(self.join_experiment(principal, call, &mut request).await?),
            None => None,
        };
        // An experiment's task routes its requests that name none.
        let task_hints;
        let hints = match assignment.as_ref().and_then(|a| a.task.clone()) {
            Some(task) if hints.task.is_none() => {
                task_hints = Hints {
                    task: Some(task),
                    ..hints.clone()
                };
                &task_hints
            }
            _ => hints,
        };
        let (mut request, prompt) = self.apply_prompt(request)?;
        validate::check_chat_counts(&request)?;
        let standing = self.standing(principal).await?;
        if let Some(tenancy) = &self.tenancy {
            let (param, asked) = match request.max_completion_tokens {
                Some(n) => ("max_completion_tokens", Some(n)),
                None => ("max_tokens", request.max_tokens),
            };
            let allowed = tenancy.cap_max_tokens(principal, asked, param)?;
            if asked.is_none() {
                request.max_tokens = allowed;
            }
        }
        let requested = self.requested_model(&request.model, &standing);
        let needs = chat_needs(&request, hints, self.quality_floor(hints, &standing));
        let stream = request.stream == Some(true);
        let (candidates, local, remote_body) = self
            .chat_candidates(principal, &request, &requested, &needs)
            .await?;
        let plan = Plan {
            requested,
            candidates,
            stream,
            batch: hints.batch.clone(),
            eval: hints.eval.clone(),
            prompt,
            request_id: assignment.as_ref().map(|a| a.request_id.clone()),
        };
        let attempts = ChatAttempts {
            gateway: self,
            request: &request,
            local,
            remote_body,
            include_usage: validate::include_usage(&request.sampling()).unwrap_or(false),
            priority: hints.priority(),
        };
        let mut answer = self
            .drive(
                principal,
                Endpoint::ChatCompletions,
                standing,
                plan,
                &attempts,
            )
            .await?;
        if let (Some(assignment), Some(call), Some(experiments)) =
            (assignment, &hints.experiment, &self.experiments)
        {
            experiments
                .record(&principal.tenant, &assignment, call.unit.as_deref())
                .await?;
            answer.route.experiment = Some((assignment.experiment, assignment.variant.name));
        }
        Ok(answer)
    }

    /// Whether a variant's model and prompt can be served: a routed name or
    /// one of qpai's own models (or adapters), and a registry prompt.
    pub async fn check_variant(
        &self,
        principal: &Principal,
        variant: &crate::experiments::Variant,
        place: &str,
    ) -> ApiResult<()> {
        let named = |error: ApiError, field: &str| ApiError {
            kind: crate::error::ErrorKind::InvalidRequest,
            param: Some(format!("{place}.{field}")),
            ..error
        };
        if let Some(model) = &variant.model
            && policy::offered(&self.router.catalog, model).is_none()
        {
            self.models
                .target(principal, model)
                .await
                .map_err(|e| named(e, "model"))?;
        }
        if let Some(reference) = &variant.prompt {
            self.prompts
                .get_reference(reference)
                .map_err(|e| named(e, "prompt"))?;
        }
        Ok(())
    }

    /// Assigns the request a variant of its experiment and applies it: its
    /// model, its prompt version (the request's variables fill it).
    async fn join_experiment(
        &self,
        principal: &Principal,
        call: &ExperimentCall,
        request: &mut ChatCompletionRequest,
    ) -> ApiResult<Assignment> {
        let Some(experiments) = &self.experiments else {
            return Err(ApiError::invalid_param(
                "x-qpai-experiment",
                "Experiments need the ledger database, which this server runs without.",
            ));
        };
        let assignment = experiments.assign(&principal.tenant, call).await?;
        let variant = &assignment.variant;
        if let Some(model) = &variant.model {
            request.model = model.clone();
        }
        if let Some(reference) = &variant.prompt {
            let (id, version) = match reference.split_once('@') {
                Some((id, version)) => (id, Some(Value::String(version.to_string()))),
                None => (reference.as_str(), None),
            };
            let variables = request
                .prompt
                .take()
                .map(|p| p.variables)
                .unwrap_or_default();
            request.prompt = Some(PromptRef {
                id: id.to_string(),
                version,
                variables,
            });
        }
        Ok(assignment)
    }
    /// The candidates of a chat request, cheapest first, with what was
    /// prepared for local ones; also the request as qpai's own models read
    /// it and as upstreams get it (when any candidate needs them).
    async fn chat_candidates(
        &self,
        principal: &Principal,
        request: &ChatCompletionRequest,
        requested: &str,
        needs: &Needs,
    ) -> ApiResult<ChatCandidates> {
        let mut local: Option<ApiResult<LocalChat>> = None;
        let mut remote_body: Option<Value> = None;
        let candidates = match policy::offered(&self.router.catalog, requested) {
            None => {
                // Not a routed name: one of qpai's own models (or adapters).
                let (engine, adapter) = self.models.target(principal, requested).await?;
                let chat = self.read_local_chat(principal, request).await?;
                let prompt_ids = chat.prompt_ids(engine.model())?;
                let model = engine.model();
                let candidate = self.local_candidate(
                    requested,
                    model.parent.as_deref().unwrap_or(&model.id),
                    model.context_length,
                    prompt_ids.len() as u64,
                    needs,
                );
                local = Some(Ok(chat));
                let job = PreparedChat {
                    engine,
                    adapter,
                    prompt_ids,
                };
                vec![(candidate, Some(job))]
            }
            Some((offered, _pinned)) => {
                let offered: Vec<_> = offered.into_iter().filter(|d| !d.is_embedder()).collect();
                if offered.iter().any(|d| d.provider == ProviderKind::Local) {
                    local = Some(self.read_local_chat(principal, request).await);
                }
                let mut targets = self.models.local_targets(principal, &offered).await;
                if offered.iter().any(|d| d.provider != ProviderKind::Local) {
                    remote_body = Some(serde_json::to_value(request).map_err(ApiError::internal)?);
                }
                let grounded = request.rag.is_some();
                let mut counted = RemoteCounts::default();
                rank_prepared(requested, &offered, needs, |deployment, local_errors| {
                    if deployment.provider != ProviderKind::Local {
                        if grounded {
                            return Err("'rag' is answered by qpai's own models only".into());
                        }
                        let tokens = counted.count(&deployment.model, |counter| {
                            remote_prompt_tokens(counter, remote_body.as_ref())
                        });
                        return Ok((tokens, None));
                    }
                    let (engine, adapter) = targets
                        .remove(&deployment.name)
                        .unwrap_or_else(|| Err(ApiError::model_not_found(&deployment.model)))
                        .map_err(|e| e.message)?;
                    let prompt_ids = match &local {
                        Some(Ok(chat)) => chat.prompt_ids(engine.model()),
                        Some(Err(error)) => Err(error.clone()),
                        None => Err(ApiError::internal("not read for local models")),
                    }
                    .map_err(|e| {
                        local_errors.push(e.clone());
                        e.message
                    })?;
                    let tokens = prompt_ids.len() as u64;
                    let job = PreparedChat {
                        engine,
                        adapter,
                        prompt_ids,
                    };
                    Ok((tokens, Some(job)))
                })?
            }
        };
        Ok((candidates, local.and_then(Result::ok), remote_body))
    }

    /// Where a chat request would go, and what each route would cost at
    /// most, without running it (dry runs, estimates).
    pub async fn estimate_chat(
        &self,
        principal: &Principal,
        request: ChatCompletionRequest,
        hints: &Hints,
    ) -> ApiResult<Vec<Candidate>> {
        let (request, _) = self.apply_prompt(request)?;
        let standing = self.standing(principal).await?;
        let requested = self.requested_model(&request.model, &standing);
        let needs = chat_needs(&request, hints, self.quality_floor(hints, &standing));
        let (candidates, ..) = self
            .chat_candidates(principal, &request, &requested, &needs)
            .await?;
        Ok(candidates.into_iter().map(|(c, _)| c).collect())
    }
}

/// Candidates with their prepared local jobs, the local reading of the
/// request, and its upstream body.
type ChatCandidates = (
    Vec<(Candidate, Option<PreparedChat>)>,
    Option<LocalChat>,
    Option<Value>,
);

/// A chat prompt as OpenAI counts it with `counter`, tool definitions
/// included (an estimate: OpenAI renders them in a format of its own).
fn remote_prompt_tokens(counter: &TokenCounter, body: Option<&Value>) -> u64 {
    let Some(body) = body else { return 0 };
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(&[][..], |m| m);
    let tools = body
        .get("tools")
        .map_or(0, |t| counter.count(&t.to_string()));
    counter.count_messages(messages) + tools
}

/// What a chat request needs from its route.
fn chat_needs(request: &ChatCompletionRequest, hints: &Hints, min_quality: Option<f64>) -> Needs {
    let mut capabilities = BTreeSet::new();
    if request.stream == Some(true) {
        capabilities.insert(Capability::Streaming);
    }
    if request.tools.is_some() || request.other.contains_key("functions") {
        capabilities.insert(Capability::Tools);
    }
    let structured = request
        .response_format
        .as_ref()
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t != "text");
    if structured {
        capabilities.insert(Capability::Json);
    }
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .map(|n| n.max(0) as u64);
    Needs {
        capabilities,
        task: hints.task.clone(),
        min_quality,
        max_tokens,
        choices: request.n.unwrap_or(1).max(1) as u64,
    }
}

/// Tries a chat request on one candidate.
struct ChatAttempts<'a> {
    gateway: &'a Gateway,
    request: &'a ChatCompletionRequest,
    local: Option<LocalChat>,
    /// The request as upstreams get it.
    remote_body: Option<Value>,
    include_usage: bool,
    priority: Priority,
}

impl Attempts<PreparedChat> for ChatAttempts<'_> {
    fn attempt<'a>(
        &'a self,
        candidate: &'a Candidate,
        job: Option<&'a PreparedChat>,
    ) -> BoxFuture<'a, Result<Reply, AttemptError>> {
        async move {
            let deployment = &candidate.deployment;
            if deployment.provider == ProviderKind::Local {
                let (Some(chat), Some(job)) = (&self.local, job) else {
                    return Err(ApiError::internal("a local route without its prompt").into());
                };
                return chat
                    .run(self.request, job, &deployment.model, self.priority)
                    .await;
            }
            self.gateway
                .upstream_reply(
                    deployment,
                    Endpoint::ChatCompletions,
                    self.remote_body.as_ref(),
                    self.include_usage,
                )
                .await
        }
        .boxed()
    }
}
