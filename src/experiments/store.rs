//! Experiments in the ledger database (migration 0006): the experiment,
//! each arm's running sums (requests, feedback, Σ value, Σ value², values
//! in millionths so that SQLite and PostgreSQL add them exactly and
//! atomically), sticky units, the requests assigned, and the feedback
//! (once per target and metric). Every query is scoped to the tenant.

use std::sync::{Arc, Mutex};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use super::bandit::{self, Arm, Evidence, Posterior};
use super::{ExperimentCall, ExperimentSpec, Variant, feedback_value};
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::ledger::{Ledger, now_ms};

/// Feedback values are kept in millionths.
const MICRO: f64 = 1e6;

#[derive(Clone)]
pub struct Experiments {
    ledger: Ledger,
    /// Thompson draws; seeded from the OS, or by the caller for a
    /// reproducible simulation.
    rng: Arc<Mutex<StdRng>>,
}

/// The variant a request got.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub experiment: String,
    pub variant: Variant,
    /// The request's id in the ledger: what feedback names.
    pub request_id: String,
    /// The experiment's task tag.
    pub task: Option<String>,
}

/// What feedback is about.
#[derive(Debug, Clone)]
pub enum FeedbackTarget {
    Request(String),
    Episode(String),
}

impl FeedbackTarget {
    fn param(&self) -> &'static str {
        match self {
            FeedbackTarget::Request(_) => "request_id",
            FeedbackTarget::Episode(_) => "episode_id",
        }
    }

    fn key(&self) -> String {
        match self {
            FeedbackTarget::Request(id) => id.clone(),
            FeedbackTarget::Episode(id) => format!("episode:{id}"),
        }
    }
}

struct Stored {
    spec: ExperimentSpec,
    winner: Option<String>,
}

/// An arm's sums as kept.
struct ArmState {
    name: String,
    requests: u64,
    evidence: Evidence,
    cost_usd: f64,
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::internal(error)
}

fn conflict(param: &str, message: String) -> ApiError {
    ApiError {
        kind: ErrorKind::Conflict,
        message,
        param: Some(param.to_string()),
        code: Some("conflict"),
        retry_after: None,
    }
}

impl Experiments {
    pub fn new(ledger: &Ledger) -> Self {
        Self::with_rng(ledger, StdRng::from_os_rng())
    }

    /// Draws from `seed`: the same feedback gives the same assignments.
    pub fn seeded(ledger: &Ledger, seed: u64) -> Self {
        Self::with_rng(ledger, StdRng::seed_from_u64(seed))
    }

    fn with_rng(ledger: &Ledger, rng: StdRng) -> Self {
        Self {
            ledger: ledger.clone(),
            rng: Arc::new(Mutex::new(rng)),
        }
    }

    fn rng(&self) -> std::sync::MutexGuard<'_, StdRng> {
        self.rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A generator of its own, seeded from the shared one: for the
    /// thousands of draws of a posterior estimate, without holding the
    /// lock that assignments take.
    fn forked_rng(&self) -> StdRng {
        StdRng::from_rng(&mut *self.rng())
    }

    pub async fn create(&self, tenant: &str, spec: &ExperimentSpec) -> ApiResult<()> {
        let text = serde_json::to_string(spec).map_err(internal)?;
        let now = now_ms();
        let guard = (
            "INSERT INTO experiments (tenant, id, spec, created_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant, id) DO NOTHING",
            vec![
                tenant.into(),
                spec.id.as_str().into(),
                text.into(),
                now.into(),
            ],
        );
        let arms = spec
            .variants
            .iter()
            .map(|v| {
                (
                    "INSERT INTO experiment_arms (tenant, experiment, arm) VALUES ($1, $2, $3)",
                    vec![
                        tenant.into(),
                        spec.id.as_str().into(),
                        v.name.as_str().into(),
                    ],
                )
            })
            .collect();
        let created = self
            .ledger
            .db()
            .transaction_when(guard, arms)
            .await
            .map_err(internal)?;
        if !created {
            return Err(conflict(
                "id",
                format!("An experiment '{}' exists already.", spec.id),
            ));
        }
        Ok(())
    }

    async fn load(&self, tenant: &str, id: &str, param: &str) -> ApiResult<Stored> {
        let rows = self
            .ledger
            .db()
            .query(
                "SELECT spec, winner FROM experiments WHERE tenant = $1 AND id = $2",
                vec![tenant.into(), id.into()],
            )
            .await
            .map_err(internal)?;
        let Some(row) = rows.first() else {
            let mut error = ApiError::not_found(format!("No experiment '{id}'."));
            error.param = Some(param.to_string());
            return Err(error);
        };
        let spec = serde_json::from_str(row[0].text().unwrap_or_default()).map_err(internal)?;
        Ok(Stored {
            spec,
            winner: row[1].text().map(str::to_string),
        })
    }

    /// The tenant's experiments, oldest first.
    pub async fn list(&self, tenant: &str) -> ApiResult<Vec<String>> {
        let rows = self
            .ledger
            .db()
            .query(
                "SELECT id FROM experiments WHERE tenant = $1 ORDER BY created_ms, id",
                vec![tenant.into()],
            )
            .await
            .map_err(internal)?;
        Ok(rows
            .iter()
            .filter_map(|r| r[0].text().map(str::to_string))
            .collect())
    }

    /// Each arm's sums, and its mean price when `priced` (a scan of the
    /// experiment's requests joined with their ledger rows).
    async fn arms(&self, tenant: &str, stored: &Stored, priced: bool) -> ApiResult<Vec<ArmState>> {
        let db = self.ledger.db();
        let id = stored.spec.id.as_str();
        let rows = db
            .query(
                "SELECT arm, requests, feedback, sum_micro, sum_sq_micro FROM experiment_arms \
                 WHERE tenant = $1 AND experiment = $2",
                vec![tenant.into(), id.into()],
            )
            .await
            .map_err(internal)?;
        let costs = if !priced {
            Vec::new()
        } else {
            db.query(
                "SELECT r.arm, COUNT(*), COALESCE(SUM(u.cost_pico), 0) FROM experiment_requests r \
                 JOIN usage_ledger u ON u.request_id = r.request_id \
                 WHERE r.tenant = $1 AND r.experiment = $2 GROUP BY r.arm",
                vec![tenant.into(), id.into()],
            )
            .await
            .map_err(internal)?
        };
        let mut arms = Vec::new();
        for variant in &stored.spec.variants {
            let row = rows
                .iter()
                .find(|r| r[0].text() == Some(variant.name.as_str()));
            let int = |i: usize| row.and_then(|r| r[i].int()).unwrap_or(0);
            let cost_usd = costs
                .iter()
                .find(|r| r[0].text() == Some(variant.name.as_str()))
                .map_or(0.0, |r| {
                    let n = r[1].int().unwrap_or(0).max(1) as f64;
                    r[2].wide().unwrap_or(0) as f64 / 1e12 / n
                });
            arms.push(ArmState {
                name: variant.name.clone(),
                requests: int(1) as u64,
                evidence: Evidence {
                    n: int(2) as u64,
                    sum: int(3) as f64 / MICRO,
                    sum_sq: int(4) as f64 / MICRO,
                },
                cost_usd,
            });
        }
        Ok(arms)
    }

    fn bandit_arms(spec: &ExperimentSpec, arms: &[ArmState]) -> Vec<Arm> {
        arms.iter()
            .map(|a| Arm {
                posterior: Posterior::from_evidence(spec.metric.kind, a.evidence),
                cost: a.cost_usd,
            })
            .collect()
    }

    /// The variant for a request of `call`: the winner of a stopped
    /// experiment, the unit's variant when it has one, else a Thompson
    /// draw (kept for the unit). The request counts once recorded.
    pub async fn assign(&self, tenant: &str, call: &ExperimentCall) -> ApiResult<Assignment> {
        let stored = self.load(tenant, &call.experiment, "experiment").await?;
        let db = self.ledger.db();
        let id = stored.spec.id.as_str();
        let arm = match (&stored.winner, &call.unit) {
            (Some(winner), _) => winner.clone(),
            (None, Some(unit)) => match self.unit_arm(tenant, id, unit).await? {
                Some(arm) => arm,
                None => {
                    let drawn = self.draw(tenant, &stored).await?;
                    // Two processes may draw for one new unit at once: the
                    // first kept wins, and both use it.
                    db.execute(
                        "INSERT INTO experiment_units (tenant, experiment, unit, arm, created_ms) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, experiment, unit) DO NOTHING",
                        vec![tenant.into(), id.into(), unit.as_str().into(), drawn.as_str().into(), now_ms().into()],
                    )
                    .await
                    .map_err(internal)?;
                    self.unit_arm(tenant, id, unit).await?.unwrap_or(drawn)
                }
            },
            (None, None) => self.draw(tenant, &stored).await?,
        };
        let variant = stored
            .spec
            .variant(&arm)
            .cloned()
            .ok_or_else(|| internal(format!("experiment {id} has no variant {arm}")))?;
        Ok(Assignment {
            experiment: id.to_string(),
            variant,
            request_id: format!("req_{}", uuid::Uuid::new_v4().simple()),
            task: stored.spec.task.clone(),
        })
    }

    /// Records a request answered in its variant: it counts in the
    /// variant's traffic and may be given feedback.
    pub async fn record(
        &self,
        tenant: &str,
        assignment: &Assignment,
        unit: Option<&str>,
    ) -> ApiResult<()> {
        let (id, arm) = (
            assignment.experiment.as_str(),
            assignment.variant.name.as_str(),
        );
        let unit: crate::ledger::Value = unit.map_or(crate::ledger::Value::Null, Into::into);
        self.ledger
            .db()
            .transaction(vec![
                (
                    "INSERT INTO experiment_requests (request_id, tenant, experiment, arm, unit, created_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    vec![assignment.request_id.as_str().into(), tenant.into(), id.into(), arm.into(), unit, now_ms().into()],
                ),
                (
                    "UPDATE experiment_arms SET requests = requests + 1 \
                     WHERE tenant = $1 AND experiment = $2 AND arm = $3",
                    vec![tenant.into(), id.into(), arm.into()],
                ),
            ])
            .await
            .map_err(internal)
    }

    /// The variant a unit sticks to, if it has one.
    async fn unit_arm(&self, tenant: &str, id: &str, unit: &str) -> ApiResult<Option<String>> {
        let rows = self
            .ledger
            .db()
            .query(
                "SELECT arm FROM experiment_units WHERE tenant = $1 AND experiment = $2 AND unit = $3",
                vec![tenant.into(), id.into(), unit.into()],
            )
            .await
            .map_err(internal)?;
        Ok(rows.first().and_then(|r| r[0].text()).map(str::to_string))
    }

    async fn draw(&self, tenant: &str, stored: &Stored) -> ApiResult<String> {
        let arms = self
            .arms(tenant, stored, stored.spec.cost_weight > 0.0)
            .await?;
        let bandit = Self::bandit_arms(&stored.spec, &arms);
        let chosen = bandit::choose(&bandit, stored.spec.cost_weight, &mut *self.rng());
        Ok(arms[chosen].name.clone())
    }

    /// Records feedback on a request or an episode, once per target and
    /// metric, and stops the experiment when a variant has won. Returns
    /// the experiments it counted in.
    pub async fn feedback(
        &self,
        tenant: &str,
        target: &FeedbackTarget,
        metric: &str,
        value: &Value,
    ) -> ApiResult<Vec<String>> {
        let db = self.ledger.db();
        let param = target.param();
        let rows = match target {
            FeedbackTarget::Request(id) => db
                .query(
                    "SELECT experiment, arm FROM experiment_requests WHERE tenant = $1 AND request_id = $2",
                    vec![tenant.into(), id.as_str().into()],
                )
                .await,
            FeedbackTarget::Episode(id) => db
                .query(
                    "SELECT experiment, arm FROM experiment_units WHERE tenant = $1 AND unit = $2",
                    vec![tenant.into(), id.as_str().into()],
                )
                .await,
        }
        .map_err(internal)?;
        if rows.is_empty() {
            let (FeedbackTarget::Request(id) | FeedbackTarget::Episode(id)) = target;
            let mut error = ApiError::not_found(format!(
                "No request or episode '{id}' of an experiment of yours."
            ));
            error.param = Some(param.to_string());
            return Err(error);
        }
        let mut counted = Vec::new();
        let mut measures = Vec::new();
        for row in &rows {
            let (Some(experiment), Some(arm)) = (row[0].text(), row[1].text()) else {
                continue;
            };
            let stored = self.load(tenant, experiment, param).await?;
            if stored.spec.metric.name != metric {
                measures.push(format!(
                    "'{experiment}' takes '{}'",
                    stored.spec.metric.name
                ));
                continue;
            }
            let number = feedback_value(stored.spec.metric.kind, value)?;
            let micro = (number * MICRO).round() as i64;
            let squared = (number * number * MICRO).round() as i64;
            let guard = (
                "INSERT INTO experiment_feedback (tenant, experiment, target, metric, arm, value_micro, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant, experiment, target, metric) DO NOTHING",
                vec![
                    tenant.into(),
                    experiment.into(),
                    target.key().into(),
                    metric.into(),
                    arm.into(),
                    micro.into(),
                    now_ms().into(),
                ],
            );
            let update = (
                "UPDATE experiment_arms SET feedback = feedback + 1, sum_micro = sum_micro + $4, \
                 sum_sq_micro = sum_sq_micro + $5 WHERE tenant = $1 AND experiment = $2 AND arm = $3",
                vec![
                    tenant.into(),
                    experiment.into(),
                    arm.into(),
                    micro.into(),
                    squared.into(),
                ],
            );
            let recorded = db
                .transaction_when(guard, vec![update])
                .await
                .map_err(internal)?;
            if !recorded {
                return Err(conflict(
                    param,
                    format!("Feedback on '{metric}' for this {param} was recorded already."),
                ));
            }
            self.stop_if_won(tenant, &stored).await?;
            counted.push(experiment.to_string());
        }
        if counted.is_empty() {
            return Err(ApiError::invalid_param(
                "metric",
                format!(
                    "No experiment of this {param} measures '{metric}' ({}).",
                    measures.join(", ")
                ),
            ));
        }
        Ok(counted)
    }

    async fn stop_if_won(&self, tenant: &str, stored: &Stored) -> ApiResult<()> {
        let (Some(stop_at), None) = (stored.spec.stop_at, &stored.winner) else {
            return Ok(());
        };
        let arms = self
            .arms(tenant, stored, stored.spec.cost_weight > 0.0)
            .await?;
        if arms.iter().map(|a| a.evidence.n).sum::<u64>() < stored.spec.min_feedback {
            return Ok(());
        }
        let bandit = Self::bandit_arms(&stored.spec, &arms);
        let best =
            bandit::probability_best(&bandit, stored.spec.cost_weight, &mut self.forked_rng());
        let Some((index, p)) = best.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)) else {
            return Ok(());
        };
        if *p >= stop_at {
            self.ledger
                .db()
                .execute(
                    "UPDATE experiments SET winner = $3, stopped_ms = $4 \
                     WHERE tenant = $1 AND id = $2 AND winner IS NULL",
                    vec![
                        tenant.into(),
                        stored.spec.id.as_str().into(),
                        arms[index].name.as_str().into(),
                        now_ms().into(),
                    ],
                )
                .await
                .map_err(internal)?;
            tracing::info!(experiment = %stored.spec.id, winner = %arms[index].name, p_best = p, "experiment stopped");
        }
        Ok(())
    }

    /// The experiment as `GET /v1/experiments/{id}` shows it.
    pub async fn describe(&self, tenant: &str, id: &str) -> ApiResult<Value> {
        let stored = self.load(tenant, id, "id").await?;
        let arms = self.arms(tenant, &stored, true).await?;
        let bandit = Self::bandit_arms(&stored.spec, &arms);
        let mut rng = self.forked_rng();
        let best = bandit::probability_best(&bandit, stored.spec.cost_weight, &mut rng);
        let requests: u64 = arms.iter().map(|a| a.requests).sum();
        let variants: Vec<Value> = arms
            .iter()
            .zip(&bandit)
            .zip(&best)
            .map(|((arm, b), p)| {
                let variant = stored.spec.variant(&arm.name);
                json!({
                    "name": arm.name,
                    "model": variant.and_then(|v| v.model.clone()),
                    "prompt": variant.and_then(|v| v.prompt.clone()),
                    "requests": arm.requests,
                    "traffic_share": if requests == 0 { 0.0 } else { arm.requests as f64 / requests as f64 },
                    "feedback": arm.evidence.n,
                    "mean_reward": b.posterior.mean(),
                    "interval": b.posterior.interval(&mut rng),
                    "posterior": b.posterior,
                    "mean_cost_usd": arm.cost_usd,
                    "p_best": p,
                })
            })
            .collect();
        Ok(json!({
            "id": stored.spec.id,
            "object": "experiment",
            "task": stored.spec.task,
            "metric": stored.spec.metric,
            "cost_weight": stored.spec.cost_weight,
            "stop_at": stored.spec.stop_at,
            "min_feedback": stored.spec.min_feedback,
            "status": if stored.winner.is_some() { "stopped" } else { "running" },
            "winner": stored.winner,
            "requests": requests,
            "variants": variants,
        }))
    }
}
