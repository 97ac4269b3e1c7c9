//! A chat completion through the router: the route is planned (candidates
//! cheapest first, prompt counted per deployment, budget held), tried in
//! order with retries and fallback while nothing has reached the client,
//! and the answer is metered: the provider's usage when it reports one,
//! qpai's count otherwise. Exactly one usage row is written per request,
//! whatever the outcome; a retry is never billed twice.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::AppState;
use super::chat::{local_chat, local_prompt_tokens};
use super::wire::ChatCompletionRequest;
use crate::error::{ApiError, ApiResult};
use crate::ledger::{Outcome, UsageRecord, UsageSource, now_ms};
use crate::router::metering::{SseMeter, TokenUsage, usage_of};
use crate::router::policy::{self, Candidate, Needs};
use crate::router::tokens::TokenCounter;
use crate::router::{
    Admission, Capability, Deployment, ModelRouter, Prices, ProviderKind, UpstreamError,
    UpstreamResponse, Usd,
};
use crate::tenancy::{OverBudget, Principal, Reservation, Tenancy};

/// Request headers that steer the route.
const TASK_HEADER: &str = "x-qpai-task";
const MIN_QUALITY_HEADER: &str = "x-qpai-min-quality";

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

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

/// Everything needed to bill a request once its usage is known.
pub struct Bill {
    tenancy: Option<Arc<Tenancy>>,
    reservation: Option<Reservation>,
    record: UsageRecord,
    prices: Prices,
    /// Counts produced text when no usage comes (None: nothing to count).
    counter: Option<TokenCounter>,
}

impl Bill {
    /// Holds budget for a request answered by one of qpai's own models
    /// outside the router (text completions, embeddings), priced by the
    /// routing catalog's `local` deployment of `model` (else free). None
    /// when the server keeps no ledger.
    pub async fn local(
        state: &AppState,
        principal: &Principal,
        endpoint: &str,
        model: &str,
        prompt_tokens: u64,
        max_completion_tokens: u64,
        counter: Option<TokenCounter>,
    ) -> ApiResult<Option<Bill>> {
        let Some(tenancy) = state.tenancy() else {
            return Ok(None);
        };
        let prices = state.model_router().local_prices(model).unwrap_or(Prices {
            input_per_1m: Usd::ZERO,
            output_per_1m: Usd::ZERO,
        });
        tenancy
            .budgets
            .standing(&principal.tenant)
            .await
            .map_err(ApiError::internal)?;
        let reservation = tenancy
            .budgets
            .reserve(
                &principal.tenant,
                prices.cost(prompt_tokens, max_completion_tokens),
            )
            .map_err(|e| ApiError::budget_exceeded(e.to_string()))?;
        Ok(Some(Bill {
            tenancy: Some(tenancy),
            reservation: Some(reservation),
            record: UsageRecord {
                request_id: format!("req_{}", uuid::Uuid::new_v4().simple()),
                ts_ms: now_ms(),
                tenant: principal.tenant.clone(),
                key_id: principal.key_id.clone(),
                endpoint: endpoint.into(),
                requested_model: model.into(),
                deployment: model.into(),
                provider: ProviderKind::Local.as_str().into(),
                model: model.into(),
                prompt_tokens,
                completion_tokens: 0,
                cost: Usd::ZERO,
                outcome: Outcome::Error,
                attempts: 1,
                stream: false,
                usage_source: UsageSource::Counted,
            },
            prices,
            counter,
        }))
    }

    /// Bills a whole answer whose usage qpai produced itself.
    pub fn settle_usage(self, prompt_tokens: u64, completion_tokens: u64) -> Usd {
        self.settle(Some((prompt_tokens, completion_tokens)), "", Outcome::Ok)
    }

    /// Bills a local stream as it passes: its response must end with a
    /// usage chunk, removed unless the client asked for it.
    pub fn meter_stream(mut self, response: Response, client_wants_usage: bool) -> Response {
        self.record.stream = true;
        let (parts, body) = response.into_parts();
        let stream: ByteStream = Box::pin(
            body.into_data_stream()
                .map(|chunk| chunk.map_err(|e| e.to_string())),
        );
        let metered = MeteredStream {
            inner: stream,
            meter: SseMeter::new(!client_wants_usage, None),
            bill: Some(self),
            ended: false,
        };
        Response::from_parts(parts, Body::from_stream(metered))
    }

    /// Writes the request's one usage row and settles its budget hold.
    fn settle(mut self, usage: Option<TokenUsage>, produced: &str, outcome: Outcome) -> Usd {
        let (prompt, completion, source) = match usage {
            Some((p, c)) => (p, c, UsageSource::Upstream),
            None if outcome == Outcome::Error => (0, 0, UsageSource::Counted),
            None => (
                self.record.prompt_tokens,
                self.counter.as_ref().map_or(0, |c| c.count(produced)),
                UsageSource::Counted,
            ),
        };
        let cost = self.prices.cost(prompt, completion);
        self.record.prompt_tokens = prompt;
        self.record.completion_tokens = completion;
        self.record.cost = cost;
        self.record.outcome = outcome;
        self.record.usage_source = source;
        if let Some(reservation) = self.reservation.take() {
            reservation.settle(cost);
        }
        if let Some(tenancy) = &self.tenancy {
            tenancy.ledger.record(self.record.clone());
        }
        cost
    }
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
    let record = UsageRecord {
        request_id: format!("req_{}", uuid::Uuid::new_v4().simple()),
        ts_ms: now_ms(),
        tenant: principal.tenant.clone(),
        key_id: principal.key_id.clone(),
        endpoint: "chat.completions".into(),
        requested_model: plan.requested.clone(),
        deployment: String::new(),
        provider: String::new(),
        model: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        cost: Usd::ZERO,
        outcome: Outcome::Error,
        attempts: 0,
        stream: plan.stream,
        usage_source: UsageSource::Counted,
    };
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
                    let mut record = record.clone();
                    record.deployment = candidate.deployment.name.clone();
                    record.provider = candidate.deployment.provider.as_str().into();
                    record.model = candidate.deployment.model.clone();
                    record.prompt_tokens = candidate.prompt_tokens;
                    record.attempts = attempts;
                    let bill = Bill {
                        tenancy: tenancy.clone(),
                        reservation,
                        record,
                        prices: candidate.deployment.prices,
                        counter: Some(counter_for(&state, &candidate.deployment)),
                    };
                    let mut response = match answer {
                        Answer::Json(value) => json_answer(value, bill),
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
                    let mut record = record.clone();
                    record.deployment = candidate.deployment.name.clone();
                    record.provider = candidate.deployment.provider.as_str().into();
                    record.model = candidate.deployment.model.clone();
                    record.attempts = attempts;
                    bill_failure(&tenancy, record);
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
                .unwrap_or(Prices {
                    input_per_1m: Usd::ZERO,
                    output_per_1m: Usd::ZERO,
                }),
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

/// A whole answer: billed now, its cost in the headers.
fn json_answer(value: Value, bill: Bill) -> Response {
    let usage = usage_of(&value);
    let text: String = value
        .get("choices")
        .and_then(Value::as_array)
        .map(|choices| {
            choices
                .iter()
                .filter_map(|c| c.pointer("/message/content").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let cost = bill.settle(usage, &text, Outcome::Ok);
    let mut response = axum::Json(value).into_response();
    if let Ok(v) = HeaderValue::from_str(&cost.to_string()) {
        response.headers_mut().insert("x-qpai-cost-usd", v);
    }
    response
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
    let metered = MeteredStream {
        inner: stream,
        meter,
        bill: Some(bill),
        ended: false,
    };
    let mut response = Response::new(Body::from_stream(metered));
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

/// Passes a stream on event by event and bills it when it ends, breaks or
/// is dropped (the client left).
struct MeteredStream {
    inner: ByteStream,
    meter: SseMeter,
    bill: Option<Bill>,
    ended: bool,
}

impl MeteredStream {
    fn settle(&mut self, outcome: Outcome) {
        if let Some(bill) = self.bill.take() {
            bill.settle(self.meter.usage, &self.meter.text, outcome);
        }
    }
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        loop {
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    let out = self.meter.feed(&chunk);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(message))) => {
                    tracing::warn!(%message, "the stream broke off");
                    self.ended = true;
                    self.settle(Outcome::Cut);
                    let error = ApiError {
                        code: Some("upstream_broke_off"),
                        ..ApiError::unavailable("The model's stream broke off.")
                    };
                    let event = format!("data: {}\n\n", error.to_json());
                    return Poll::Ready(Some(Ok(Bytes::from(event))));
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    let rest = self.meter.finish();
                    let outcome = if self.meter.done || self.meter.usage.is_some() {
                        Outcome::Ok
                    } else {
                        Outcome::Cut
                    };
                    self.settle(outcome);
                    return Poll::Ready((!rest.is_empty()).then_some(Ok(rest)));
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        self.settle(Outcome::Cut);
    }
}
