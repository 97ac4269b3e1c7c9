//! A chat completion through the router: the route is planned (candidates
//! cheapest first, prompt counted per deployment, budget held), tried in
//! order with retries and fallback while nothing has reached the client,
//! and the answer is metered: the provider's usage when it reports one,
//! qpai's count otherwise. Exactly one usage row is written per request,
//! whatever the outcome; a retry is never billed twice.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use futures::StreamExt;
use serde_json::Value;

use super::AppState;
use super::billing::{Bill, ByteStream, usage_record};
use super::chat::{local_chat, local_prompt_tokens};
use super::wire::ChatCompletionRequest;
use crate::error::{ApiError, ApiResult};
use crate::ledger::UsageRecord;
use crate::money::Usd;
use crate::router::metering::SseMeter;
use crate::router::policy::{self, Candidate, Needs};
use crate::router::tokens::TokenCounter;
use crate::router::{
    Admission, Capability, Deployment, ModelRouter, Prices, ProviderKind, UpstreamError,
    UpstreamResponse,
};
use crate::tenancy::{OverBudget, Principal, Tenancy};

/// Request headers that steer the route.
const TASK_HEADER: &str = "x-qpai-task";
const MIN_QUALITY_HEADER: &str = "x-qpai-min-quality";

/// A route's answer, before metering.
enum Answer {
    Json(Value),
    Stream(ByteStream),
}

/// Why an attempt failed.
enum AttemptError {
    /// The request itself is wrong: answered to the client as is.
    Final(ApiError),
    /// The deployment failed; another try or route may succeed.
    Retryable {
        message: String,
        retry_after: Option<f64>,
        /// Retrying on the same deployment is pointless (its configuration).
        move_on: bool,
        /// qpai's own answer (a full queue, a model still loading): what the
        /// client gets when no other route exists.
        local: Option<ApiError>,
    },
}

/// A planned request.
struct Plan {
    requested: String,
    candidates: Vec<Candidate>,
    stream: bool,
    include_usage: bool,
}

/// `POST /v1/chat/completions` through the router.
pub async fn route_chat(
    state: Arc<AppState>,
    principal: Arc<Principal>,
    headers: &HeaderMap,
    raw: Value,
    request: ChatCompletionRequest,
) -> ApiResult<Response> {
    let router = state.model_router();
    let tenancy = state.tenancy();
    let standing = match &tenancy {
        Some(t) => Some(
            t.budgets
                .standing(&principal.tenant)
                .await
                .map_err(ApiError::internal)?,
        ),
        None => None,
    };
    // Read with the standing above, at most a few seconds old.
    let tenant_settings = tenancy
        .as_ref()
        .and_then(|t| t.budgets.settings(&principal.tenant));
    let plan = plan(
        &state,
        &principal,
        &router,
        headers,
        &raw,
        &request,
        tenant_settings,
    )
    .await?;
    if let (Some(tenancy), Some(first)) = (&tenancy, plan.candidates.first()) {
        tenancy.admit_tokens(
            &principal,
            first.prompt_tokens + first.max_completion_tokens,
        )?;
    }
    let warning = standing.and_then(|s| s.warning());
    let record = usage_record(&principal, "chat.completions", &plan.requested, plan.stream);
    let mut attempts = 0u32;
    let mut over_budget: Option<OverBudget> = None;
    let mut failures: Vec<String> = Vec::new();
    let mut soonest_retry: Option<f64> = None;
    let mut local_refusal: Option<ApiError> = None;
    for candidate in &plan.candidates {
        let name = candidate.deployment.name.as_str();
        match router.breakers.admit(name) {
            Admission::Go | Admission::Probe => {}
            Admission::Open => {
                failures.push(format!("{name}: circuit open"));
                continue;
            }
            Admission::Cooling => {
                failures.push(format!("{name}: rate limited upstream"));
                continue;
            }
        }
        let reservation = match &tenancy {
            Some(t) => match t.budgets.reserve(&principal.tenant, candidate.max_cost) {
                Ok(r) => Some(r),
                Err(refusal) => {
                    router.breakers.abandon_probe(name);
                    over_budget.get_or_insert(refusal);
                    continue;
                }
            },
            None => None,
        };
        let mut retry = 0;
        loop {
            attempts += 1;
            match attempt(
                &state,
                &principal,
                &router,
                candidate,
                &raw,
                &request,
                plan.stream,
            )
            .await
            {
                Ok(answer) => {
                    router.breakers.success(name);
                    let mut record = routed(&record, candidate, attempts);
                    record.prompt_tokens = candidate.prompt_tokens;
                    let bill = Bill {
                        tenancy: tenancy.clone(),
                        reservation,
                        record,
                        prices: candidate.deployment.prices,
                        counter: Some(counter_for(&state, &candidate.deployment)),
                        written: false,
                    };
                    let mut response = match answer {
                        Answer::Json(value) => bill.whole_answer(value),
                        Answer::Stream(stream) => stream_answer(stream, bill, &plan, candidate),
                    };
                    route_headers(
                        response.headers_mut(),
                        candidate,
                        attempts,
                        warning.as_deref(),
                    );
                    return Ok(response);
                }
                Err(AttemptError::Final(error)) => {
                    router.breakers.abandon_probe(name);
                    bill_failure(&tenancy, routed(&record, candidate, attempts));
                    return Err(error);
                }
                Err(AttemptError::Retryable {
                    message,
                    retry_after,
                    move_on,
                    local,
                }) => {
                    tracing::warn!(deployment = name, attempt = attempts, %message, "route failed");
                    metrics::counter!("qpai_router_failures_total", "deployment" => name.to_string())
                        .increment(1);
                    if local.is_some() {
                        // A busy local model is not a broken one.
                        router.breakers.abandon_probe(name);
                        local_refusal = local;
                    } else {
                        router.breakers.failure(name, &message);
                    }
                    failures.push(format!("{name}: {message}"));
                    let wait = match retry_after {
                        Some(seconds) => {
                            router.breakers.cool(name, seconds);
                            soonest_retry = Some(soonest_retry.map_or(seconds, |s| s.min(seconds)));
                            std::time::Duration::from_secs_f64(seconds)
                        }
                        None => router.retry.backoff_for(retry),
                    };
                    if move_on || retry >= router.retry.retries || wait > router.retry.max_wait {
                        break;
                    }
                    tokio::time::sleep(wait).await;
                    if router.breakers.admit(name) != Admission::Go {
                        break;
                    }
                    retry += 1;
                }
            }
        }
    }
    let mut record = record;
    record.attempts = attempts;
    bill_failure(&tenancy, record);
    if let Some(refusal) = over_budget
        && attempts == 0
    {
        return Err(ApiError::budget_exceeded(refusal.to_string()));
    }
    if let Some(error) = local_refusal.filter(|_| plan.candidates.len() == 1) {
        return Err(error);
    }
    let mut error =
        ApiError::unavailable(format!("No route could answer: {}.", failures.join("; ")));
    error.code = Some("no_route_available");
    error.retry_after = soonest_retry.map(|s| s.ceil().max(1.0) as u64);
    Err(error)
}

/// The request's row, on `candidate` after `attempts` tries.
fn routed(record: &UsageRecord, candidate: &Candidate, attempts: u32) -> UsageRecord {
    let deployment = &candidate.deployment;
    UsageRecord {
        deployment: deployment.name.clone(),
        provider: deployment.provider.as_str().into(),
        model: deployment.model.clone(),
        attempts,
        ..record.clone()
    }
}

fn bill_failure(tenancy: &Option<Arc<Tenancy>>, record: UsageRecord) {
    if let Some(tenancy) = tenancy {
        tenancy.ledger.record(record);
    }
}

/// Candidates for the request, cheapest first.
async fn plan(
    state: &Arc<AppState>,
    principal: &Principal,
    router: &ModelRouter,
    headers: &HeaderMap,
    raw: &Value,
    request: &ChatCompletionRequest,
    tenant: Option<crate::ledger::TenantRecord>,
) -> ApiResult<Plan> {
    let fields = request.sampling();
    let stream = fields.stream.unwrap_or(false);
    let include_usage = fields
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let mut requested = request.model.clone();
    if requested == policy::AUTO
        && let Some(default) = tenant.as_ref().and_then(|t| t.default_model.clone())
    {
        requested = default;
    }
    let needs = needs(headers, raw, request, tenant.as_ref())?;
    let Some((offered, _pinned)) = policy::offered(&router.catalog, &requested) else {
        // Not a routed name: one of qpai's own models (or adapters).
        let (engine, _) = state.target(principal, &requested).await?;
        let model = engine.model();
        let prompt_tokens = local_prompt_tokens(model, request)? as u64;
        let deployment = Deployment {
            name: requested.clone(),
            provider: ProviderKind::Local,
            model: requested.clone(),
            base_url: None,
            api_key_env: None,
            azure_deployment: None,
            api_version: None,
            prices: router
                .local_prices(&model.parent.clone().unwrap_or_else(|| model.id.clone()))
                .unwrap_or(Prices::FREE),
            context_window: model.context_length,
            capabilities: Default::default(),
            quality: Default::default(),
        };
        // Not filtered: the local path checks the request and words its
        // own errors (context, parameters).
        let room = (model.context_length as u64).saturating_sub(prompt_tokens);
        let max_completion = needs.max_tokens.unwrap_or(room).min(room);
        let candidate = Candidate {
            max_cost: deployment.prices.cost(
                prompt_tokens,
                max_completion.saturating_mul(needs.choices.max(1)),
            ),
            expected_cost: Usd::ZERO,
            deployment,
            prompt_tokens,
            max_completion_tokens: max_completion,
        };
        return Ok(Plan {
            requested,
            candidates: vec![candidate],
            stream,
            include_usage,
        });
    };
    let grounded = request.rag.is_some();
    let mut local_errors = Vec::new();
    let (candidates, rejected) = policy::rank(&offered, &needs, |deployment| {
        if deployment.provider == ProviderKind::Local {
            let engine = state.engine(&deployment.model).map_err(|e| e.message)?;
            return local_prompt_tokens(engine.model(), request)
                .map(|n| n as u64)
                .map_err(|e| {
                    local_errors.push(e.clone());
                    e.message
                });
        }
        if grounded {
            return Err("'rag' is answered by qpai's own models only".into());
        }
        let messages = raw
            .get("messages")
            .and_then(Value::as_array)
            .map_or(&[][..], |m| m);
        let counter = TokenCounter::for_remote_model(&deployment.model);
        // Tool definitions take prompt tokens too (an estimate: OpenAI
        // renders them in a format of its own).
        let tools = raw
            .get("tools")
            .map_or(0, |t| counter.count(&t.to_string()));
        Ok(counter.count_messages(messages) + tools)
    });
    if candidates.is_empty() {
        if let Some(error) = local_errors
            .into_iter()
            .next()
            .filter(|_| offered.len() == 1)
        {
            return Err(error);
        }
        let reasons: Vec<String> = rejected
            .iter()
            .map(|r| format!("{}: {}", r.deployment, r.reason))
            .collect();
        return Err(ApiError::invalid_param(
            "model",
            format!(
                "No deployment of '{requested}' can serve this request ({}).",
                reasons.join("; ")
            ),
        ));
    }
    Ok(Plan {
        requested,
        candidates,
        stream,
        include_usage,
    })
}

/// What the request needs from its route.
fn needs(
    headers: &HeaderMap,
    raw: &Value,
    request: &ChatCompletionRequest,
    tenant: Option<&crate::ledger::TenantRecord>,
) -> ApiResult<Needs> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let min_quality = match header(MIN_QUALITY_HEADER) {
        Some(text) => Some(
            text.trim()
                .parse::<f64>()
                .ok()
                .filter(|q| (0.0..=1.0).contains(q))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        MIN_QUALITY_HEADER,
                        format!("The header {MIN_QUALITY_HEADER} must be a number from 0 to 1, not {text:?}."),
                    )
                })?,
        ),
        None => tenant.and_then(|t| t.min_quality),
    };
    let mut capabilities = std::collections::BTreeSet::new();
    if request.stream == Some(true) {
        capabilities.insert(Capability::Streaming);
    }
    if raw.get("tools").is_some() || raw.get("functions").is_some() {
        capabilities.insert(Capability::Tools);
    }
    if raw
        .pointer("/response_format/type")
        .and_then(Value::as_str)
        .is_some_and(|t| t != "text")
    {
        capabilities.insert(Capability::Json);
    }
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .map(|n| n.max(0) as u64);
    Ok(Needs {
        capabilities,
        task: header(TASK_HEADER).map(str::to_string),
        min_quality,
        max_tokens,
        choices: request.n.unwrap_or(1).max(1) as u64,
    })
}

/// How completion tokens are counted on `deployment` when not reported.
fn counter_for(state: &AppState, deployment: &Deployment) -> TokenCounter {
    if deployment.provider == ProviderKind::Local
        && let Ok(engine) = state.engine(&deployment.model)
    {
        return TokenCounter::Local(engine.model().tokenizer.clone());
    }
    if deployment.provider == ProviderKind::Local {
        // An adapter name: counted with its base's tokenizer.
        if let Some(engine) = state.engines().first() {
            return TokenCounter::Local(engine.model().tokenizer.clone());
        }
    }
    TokenCounter::for_remote_model(&deployment.model)
}

/// One try on one deployment.
async fn attempt(
    state: &Arc<AppState>,
    principal: &Arc<Principal>,
    router: &ModelRouter,
    candidate: &Candidate,
    raw: &Value,
    request: &ChatCompletionRequest,
    stream: bool,
) -> Result<Answer, AttemptError> {
    let deployment = &candidate.deployment;
    if deployment.provider == ProviderKind::Local {
        let mut local = request.clone();
        local.model = deployment.model.clone();
        return match local_chat(state.clone(), principal.clone(), local, stream).await {
            Ok(response) if stream => Ok(Answer::Stream(Box::pin(
                response
                    .into_body()
                    .into_data_stream()
                    .map(|chunk| chunk.map_err(|e| e.to_string())),
            ))),
            Ok(response) => {
                let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .map_err(|e| AttemptError::Final(ApiError::internal(e)))?;
                let value = serde_json::from_slice(&bytes)
                    .map_err(|e| AttemptError::Final(ApiError::internal(e)))?;
                Ok(Answer::Json(value))
            }
            // Overloaded or still loading: another route may take it.
            Err(error)
                if error.status == StatusCode::TOO_MANY_REQUESTS
                    || error.status == StatusCode::SERVICE_UNAVAILABLE =>
            {
                Err(AttemptError::Retryable {
                    message: error.message.clone(),
                    retry_after: error.retry_after.map(|s| s as f64),
                    move_on: true,
                    local: Some(error),
                })
            }
            Err(error) => Err(AttemptError::Final(error)),
        };
    }
    match router.upstreams.chat(deployment, raw.clone()).await {
        Ok(UpstreamResponse::Json(value)) => Ok(Answer::Json(value)),
        Ok(UpstreamResponse::Stream(chunks)) => Ok(Answer::Stream(Box::pin(
            chunks.map(|chunk| chunk.map_err(|e| e.to_string())),
        ))),
        Err(error) => Err(upstream_failure(error)),
    }
}

fn upstream_failure(error: UpstreamError) -> AttemptError {
    if error.is_retryable() {
        let retry_after = match &error {
            UpstreamError::Status { retry_after, .. } => *retry_after,
            _ => None,
        };
        return AttemptError::Retryable {
            message: error.to_string(),
            retry_after,
            move_on: false,
            local: None,
        };
    }
    match error {
        // The upstream refused the request itself (400, 404...): the client's
        // to fix, with the upstream's words.
        UpstreamError::Status {
            status, message, ..
        } if (400..500).contains(&status) && status != 401 && status != 403 => {
            AttemptError::Final(ApiError {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                message,
                param: None,
                code: Some("upstream_rejected"),
                retry_after: None,
            })
        }
        other => AttemptError::Retryable {
            message: other.to_string(),
            retry_after: None,
            move_on: true,
            local: None,
        },
    }
}

/// A streamed answer, billed when it ends (or is cut).
fn stream_answer(stream: ByteStream, bill: Bill, plan: &Plan, candidate: &Candidate) -> Response {
    let prices = candidate.deployment.prices;
    let annotate: crate::router::metering::Annotate = Box::new(move |(p, c)| {
        (
            "x_qpai_cost_usd".to_string(),
            Value::String(prices.cost(p, c).to_string()),
        )
    });
    let meter = SseMeter::new(!plan.include_usage, Some(annotate));
    let mut response = Response::new(bill.metered_body(stream, meter));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&candidate.max_cost.to_string()) {
        headers.insert("x-qpai-max-cost-usd", v);
    }
    response
}

fn route_headers(
    headers: &mut HeaderMap,
    candidate: &Candidate,
    attempts: u32,
    warning: Option<&str>,
) {
    let deployment = &candidate.deployment;
    let pairs = [
        ("x-qpai-provider", deployment.provider.as_str().to_string()),
        ("x-qpai-model", deployment.model.clone()),
        ("x-qpai-deployment", deployment.name.clone()),
        ("x-qpai-attempts", attempts.to_string()),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    if let Some(warning) = warning
        && let Ok(v) = HeaderValue::from_str(warning)
    {
        headers.insert("x-qpai-budget-warning", v);
    }
}
