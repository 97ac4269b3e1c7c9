//! Running a planned request: its candidates are tried in order (cheapest
//! first), each with retries while nothing has reached the caller, behind
//! the deployments' circuit breakers and the tenant's budget; the first
//! answer is metered and billed. Exactly one usage row is written per
//! request, whatever the outcome; a retry is never billed twice.

use futures::future::BoxFuture;
use serde_json::Value;

use super::bill::{BatchBilling, Bill, EvalBilling, Metered};
use super::events::{ChunkStream, upstream_stream};
use super::{Answer, AnswerBody, Gateway, Hints, RouteTaken, Whole};
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::ledger::{Outcome, TenantRecord};
use crate::money::Usd;
use crate::router::policy::{Candidate, Needs};
use crate::router::tokens::TokenCounter;
use crate::router::{
    Admission, Deployment, Endpoint, Prices, ProviderKind, UpstreamError, UpstreamResponse,
};
use crate::tenancy::{OverBudget, Principal};

/// Why an attempt failed.
pub enum AttemptError {
    /// The request itself is wrong: answered to the caller as is.
    Final(ApiError),
    /// The deployment failed; another try or route may succeed.
    Retryable {
        message: String,
        retry_after: Option<f64>,
        /// Retrying on the same deployment is pointless.
        move_on: bool,
        /// qpai's own refusal (a full queue): what the caller gets when no
        /// other route exists.
        local: Option<ApiError>,
    },
}

impl AttemptError {
    /// A local model too busy to take the request: not broken, and
    /// another route may take it.
    pub fn local_busy(error: ApiError) -> Self {
        AttemptError::Retryable {
            message: error.message.clone(),
            retry_after: error.retry_after.map(|s| s as f64),
            move_on: true,
            local: Some(error),
        }
    }
}

impl From<ApiError> for AttemptError {
    fn from(error: ApiError) -> Self {
        AttemptError::Final(error)
    }
}

/// An upstream failure: retryable (connection, timeout, 429, 5xx) or the
/// request's own fault (the upstream's words, passed on).
impl From<UpstreamError> for AttemptError {
    fn from(error: UpstreamError) -> Self {
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
            UpstreamError::Status {
                status, message, ..
            } if (400..500).contains(&status) && status != 401 && status != 403 => {
                AttemptError::Final(ApiError {
                    kind: ErrorKind::Upstream(status),
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
}

/// What an attempt produced, before billing.
pub enum Reply {
    /// A whole answer in OpenAI's format, and its usage.
    Whole { body: Whole, usage: Metered },
    /// A stream, billed by itself as it passes (given the bill).
    Stream(Box<dyn FnOnce(Bill) -> ChunkStream + Send>),
}

/// How one endpoint tries a candidate; `L` is what planning prepared for
/// a local candidate (its tokenized prompt, its engine).
pub trait Attempts<L>: Sync {
    fn attempt<'a>(
        &'a self,
        candidate: &'a Candidate,
        local: Option<&'a L>,
    ) -> BoxFuture<'a, Result<Reply, AttemptError>>;
}

/// A planned request: candidates in order, each with what was prepared
/// for it when it is local.
pub struct Plan<L> {
    pub requested: String,
    pub candidates: Vec<(Candidate, Option<L>)>,
    pub stream: bool,
    /// Set for a batch line.
    pub batch: Option<BatchBilling>,
    /// The versioned prompt the request named (`NAME@VERSION`).
    pub prompt: Option<String>,
    /// Set for an eval case.
    pub eval: Option<EvalBilling>,
    /// The ledger id given beforehand (an experiment's request).
    pub request_id: Option<String>,
}

/// The tenant's standing, read once per request.
pub struct Standing {
    pub warning: Option<String>,
    pub tenant: Option<TenantRecord>,
}

impl Gateway {
    /// The caller's tenant: its budget warning and settings (at most a few
    /// seconds old).
    pub(super) async fn standing(&self, principal: &Principal) -> ApiResult<Standing> {
        let Some(tenancy) = &self.tenancy else {
            return Ok(Standing {
                warning: None,
                tenant: None,
            });
        };
        let standing = tenancy
            .budgets
            .standing(&principal.tenant)
            .await
            .map_err(ApiError::internal)?;
        Ok(Standing {
            warning: standing.warning(),
            tenant: tenancy.budgets.settings(&principal.tenant),
        })
    }

    /// The quality a request's route needs: the request's own floor, else
    /// the stricter of its tenant's and its task's (from calibration).
    pub(super) fn quality_floor(&self, hints: &Hints, standing: &Standing) -> Option<f64> {
        if hints.min_quality.is_some() {
            return hints.min_quality;
        }
        let tenant = standing.tenant.as_ref().and_then(|t| t.min_quality);
        let task = hints
            .task
            .as_deref()
            .and_then(|t| self.router.catalog.floor(t));
        match (tenant, task) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The model a request asks for: `auto` is the tenant's default model
    /// when it has one.
    pub(super) fn requested_model(&self, model: &str, standing: &Standing) -> String {
        match standing
            .tenant
            .as_ref()
            .and_then(|t| t.default_model.clone())
        {
            Some(default) if model == crate::router::policy::AUTO => default,
            _ => model.to_string(),
        }
    }

    /// The one candidate of a name the router does not know: one of qpai's
    /// own models (or adapters), priced by the catalog's `local`
    /// deployment of its `base` model (else free). Not filtered: the local
    /// path checks the request and words its own errors.
    pub(super) fn local_candidate(
        &self,
        requested: &str,
        base: &str,
        context_length: usize,
        prompt_tokens: u64,
        needs: &Needs,
    ) -> Candidate {
        let priced = self.router.local_deployment(base);
        let mut deployment = Deployment::local(
            requested,
            priced.map_or(Prices::FREE, |d| d.prices),
            context_length,
        );
        if let Some(priced) = priced {
            deployment.batch_prices = priced.batch_prices;
        }
        let room = (context_length as u64).saturating_sub(prompt_tokens);
        let max_completion = needs.max_tokens.unwrap_or(room).min(room);
        Candidate {
            max_cost: deployment.prices.cost(
                prompt_tokens,
                max_completion.saturating_mul(needs.choices.max(1)),
            ),
            expected_cost: Usd::ZERO,
            deployment,
            prompt_tokens,
            max_completion_tokens: max_completion,
        }
    }

    /// How produced text is counted on `deployment` when no usage comes.
    pub(super) fn counter_for(&self, deployment: &Deployment) -> TokenCounter {
        if deployment.provider == ProviderKind::Local {
            let engine = self.models.engine(&deployment.model).ok();
            // An adapter name: counted with its base's tokenizer.
            let engine = engine.or_else(|| self.models.engines().into_iter().next());
            if let Some(engine) = engine {
                return TokenCounter::Local(engine.model().tokenizer.clone());
            }
        }
        TokenCounter::for_remote_model(&deployment.model)
    }

    /// Tries `plan`'s candidates with `attempts` until one answers.
    pub(super) async fn drive<L: Sync>(
        &self,
        principal: &Principal,
        endpoint: Endpoint,
        standing: Standing,
        plan: Plan<L>,
        attempts: &impl Attempts<L>,
    ) -> ApiResult<Answer> {
        let router = &self.router;
        let tenancy = &self.tenancy;
        if let (Some(tenancy), Some((first, _))) = (tenancy, plan.candidates.first()) {
            tenancy.admit_tokens(principal, first.prompt_tokens + first.max_completion_tokens)?;
        }
        // Held for as long as the stream is open (dropped with it).
        let stream_slot = match (tenancy, plan.stream) {
            (Some(tenancy), true) => tenancy.open_stream(principal)?,
            _ => None,
        };
        let mut bill = Bill::open(
            tenancy.clone(),
            principal,
            endpoint,
            &plan.requested,
            plan.stream,
            plan.batch.clone(),
        );
        if let Some(id) = &plan.request_id {
            bill.set_request_id(id);
        }
        bill.tag_prompt(plan.prompt.clone());
        bill.tag_eval(plan.eval.clone());
        let mut tries = 0u32;
        let mut over_budget: Option<OverBudget> = None;
        let mut failures: Vec<String> = Vec::new();
        let mut soonest_retry: Option<f64> = None;
        let mut local_refusal: Option<ApiError> = None;
        for (candidate, local) in &plan.candidates {
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
            // A batch line waits for a slot within the deployment's cap.
            let _batch_slot = match plan.batch {
                Some(_) => router.batch_slots.acquire(&candidate.deployment).await,
                None => None,
            };
            let reservation = match tenancy {
                Some(t) => match t
                    .budgets
                    .reserve(&principal.tenant, candidate.max_cost)
                    .await
                    .map_err(ApiError::internal)?
                {
                    Ok(r) => Some(r),
                    Err(refusal) => {
                        router.breakers.abandon_probe(name);
                        over_budget.get_or_insert(refusal);
                        continue;
                    }
                },
                None => None,
            };
            bill.route(
                candidate,
                reservation,
                self.counter_for(&candidate.deployment),
            );
            let mut retry = 0;
            loop {
                tries += 1;
                bill.tried(tries);
                match attempts.attempt(candidate, local.as_ref()).await {
                    Ok(reply) => {
                        router.breakers.success(name);
                        let request_id = bill.request_id().to_string();
                        let body = match reply {
                            Reply::Whole { body, usage } => {
                                let settled = bill.settle(usage, Outcome::Ok);
                                settled.recorded.committed().await;
                                AnswerBody::Whole {
                                    body,
                                    cost: settled.cost,
                                }
                            }
                            Reply::Stream(start) => {
                                AnswerBody::Stream(holding(start(bill), stream_slot))
                            }
                        };
                        let deployment = &candidate.deployment;
                        return Ok(Answer {
                            route: RouteTaken {
                                provider: deployment.provider,
                                model: deployment.model.clone(),
                                deployment: deployment.name.clone(),
                                attempts: tries,
                                max_cost: candidate.max_cost,
                                budget_warning: standing.warning,
                                request_id,
                                experiment: None,
                            },
                            body,
                        });
                    }
                    Err(AttemptError::Final(error)) => {
                        router.breakers.abandon_probe(name);
                        return Err(error);
                    }
                    Err(AttemptError::Retryable {
                        message,
                        retry_after,
                        move_on,
                        local,
                    }) => {
                        tracing::warn!(deployment = name, attempt = tries, %message, "route failed");
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
                                soonest_retry =
                                    Some(soonest_retry.map_or(seconds, |s| s.min(seconds)));
                                std::time::Duration::from_secs_f64(seconds)
                            }
                            None => router.retry.backoff_for(retry),
                        };
                        if move_on || retry >= router.retry.retries || wait > router.retry.max_wait
                        {
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
        bill.unroute();
        drop(bill);
        if let Some(refusal) = over_budget
            && tries == 0
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
}

/// What counting a deployment's prompt gives: its tokens and, for a local
/// deployment, what was prepared to run it.
pub type Counted<L> = Result<(u64, Option<L>), String>;

/// Ranks `offered` for `needs` (see `policy::rank`), pairing each
/// candidate with what `count` prepared for it. `count` may note a local
/// model's own error in its second argument: when that deployment was the
/// only one offered, the request gets that error rather than "no
/// deployment can serve".
pub fn rank_prepared<L>(
    requested: &str,
    offered: &[&Deployment],
    needs: &Needs,
    mut count: impl FnMut(&Deployment, &mut Vec<ApiError>) -> Counted<L>,
) -> ApiResult<Vec<(Candidate, Option<L>)>> {
    let mut local_errors = Vec::new();
    let mut prepared = std::collections::HashMap::new();
    let (candidates, rejected) = crate::router::policy::rank(offered, needs, |deployment| {
        let (tokens, job) = count(deployment, &mut local_errors)?;
        if let Some(job) = job {
            prepared.insert(deployment.name.clone(), job);
        }
        Ok(tokens)
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
    Ok(candidates
        .into_iter()
        .map(|candidate| {
            let job = prepared.remove(&candidate.deployment.name);
            (candidate, job)
        })
        .collect())
}

impl Gateway {
    /// Sends `body` to a remote deployment: its whole answer (usage
    /// reported, else counted), or its stream, billed as it passes.
    pub(super) async fn upstream_reply(
        &self,
        deployment: &Deployment,
        endpoint: Endpoint,
        body: Option<&Value>,
        include_usage: bool,
    ) -> Result<Reply, AttemptError> {
        let body = body
            .cloned()
            .ok_or_else(|| ApiError::internal("a remote route without its body"))?;
        match self
            .router
            .upstreams
            .call(deployment, endpoint, body)
            .await?
        {
            UpstreamResponse::Json(body) => Ok(Reply::Whole {
                usage: Metered::of_answer(&body),
                body: Whole::Upstream(body),
            }),
            UpstreamResponse::Stream(bytes) => Ok(Reply::Stream(Box::new(move |bill| {
                upstream_stream(bytes, include_usage, bill)
            }))),
        }
    }
}

/// The stream, keeping `slot` (the tenant's open-stream count) until it is
/// dropped.
fn holding(
    stream: super::events::ChunkStream,
    slot: Option<crate::tenancy::tenant_limits::StreamSlot>,
) -> super::events::ChunkStream {
    match slot {
        None => stream,
        Some(slot) => Box::pin(futures::StreamExt::map(stream, move |item| {
            let _held = &slot;
            item
        })),
    }
}
