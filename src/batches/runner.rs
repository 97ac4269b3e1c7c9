//! The batch runner: one per qpai process, sharing the ledger database
//! with every other. Each round it validates new batches, ends cancelled
//! and expired ones, finalizes finished ones, and claims waiting lines up
//! to its concurrency. Each line runs through the gateway exactly as an
//! HTTP request would (routing, local engines below live traffic, each
//! deployment's batch cap, budgets), and is settled with its usage row in
//! one transaction. Claims are leases, renewed while a line runs: a
//! process that dies mid-line loses its claims when they expire, and
//! another process (or the restarted one) runs those lines again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::input;
use super::lines::{self, BatchJob, ClaimedLine, LineState, Settled};
use super::output::response_line;
use super::{BatchStatus, Batches};
use crate::error::{ApiError, ErrorKind};
use crate::gateway::bill::BatchBilling;
use crate::gateway::wire::{ChatCompletionRequest, CompletionRequest, parse_json};
use crate::gateway::{AnswerBody, EmbeddingRequest, Gateway, Hints};
use crate::ledger::now_ms;
use crate::tenancy::Principal;

/// Tries of a line whose route was busy, before its error is kept.
const MAX_TRIES: i64 = 8;
/// The longest wait before a busy line is tried again.
const MAX_BACKOFF_MS: i64 = 60_000;
/// How often expired files are deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    /// Lines this process runs at once.
    pub concurrency: usize,
    /// How long a claim holds without renewal (renewed every third of it).
    pub lease: Duration,
    /// The pause between rounds when nothing wakes the runner.
    pub tick: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            concurrency: 8,
            lease: Duration::from_secs(60),
            tick: Duration::from_millis(500),
        }
    }
}

/// A running batch runner; stopping it gives its claims back.
pub struct RunnerHandle {
    task: tokio::task::JoinHandle<()>,
    heartbeat: tokio::task::JoinHandle<()>,
    batches: Batches,
    owner: String,
}

impl RunnerHandle {
    /// Stops claiming and gives back the lines still claimed, so another
    /// process can take them at once. Lines in flight are abandoned
    /// unsettled: nothing of them is kept or billed.
    pub async fn stop(self) {
        self.task.abort();
        self.heartbeat.abort();
        let _ = self.task.await;
        let released = self
            .batches
            .db()
            .execute(
                "UPDATE batch_lines SET lease_owner = NULL, lease_until_ms = 0 \
                 WHERE lease_owner = $1 AND state = 'pending'",
                vec![self.owner.as_str().into()],
            )
            .await;
        if let Err(error) = released {
            tracing::warn!(%error, "giving back batch lines at shutdown");
        }
    }
}

struct Runner {
    batches: Batches,
    gateway: Arc<Gateway>,
    config: RunnerConfig,
    /// This process's name on its claims.
    owner: String,
    permits: Arc<Semaphore>,
}

/// Starts this process's batch runner.
pub fn spawn(batches: Batches, gateway: Arc<Gateway>, config: RunnerConfig) -> RunnerHandle {
    let owner = format!("runner_{}", uuid::Uuid::new_v4().simple());
    let runner = Arc::new(Runner {
        batches: batches.clone(),
        gateway,
        config,
        owner: owner.clone(),
        permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
    });
    let heartbeat = tokio::spawn({
        let runner = runner.clone();
        async move {
            let every = runner.config.lease / 3;
            loop {
                tokio::time::sleep(every).await;
                let until = now_ms() + runner.config.lease.as_millis() as i64;
                if let Err(error) = lines::renew(runner.batches.db(), &runner.owner, until).await {
                    tracing::warn!(%error, "renewing batch claims");
                }
            }
        }
    });
    let task = tokio::spawn(async move {
        tracing::info!(owner = %runner.owner, "batch runner started");
        let mut last_sweep = std::time::Instant::now() - SWEEP_EVERY;
        loop {
            if let Err(error) = runner.round().await {
                tracing::warn!(%error, "batch runner round failed");
            }
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = std::time::Instant::now();
                match runner.batches.files().sweep_expired(1000).await {
                    Ok(0) => {}
                    Ok(swept) => tracing::info!(swept, "expired files deleted"),
                    Err(error) => tracing::warn!(error = %error.message, "sweeping expired files"),
                }
            }
            tokio::select! {
                _ = runner.batches.wake().notified() => {}
                _ = tokio::time::sleep(runner.config.tick) => {}
            }
        }
    });
    RunnerHandle {
        task,
        heartbeat,
        batches,
        owner,
    }
}

impl Runner {
    fn lease_until(&self) -> i64 {
        now_ms() + self.config.lease.as_millis() as i64
    }

    async fn round(self: &Arc<Self>) -> anyhow::Result<()> {
        let db = self.batches.db();
        for job in lines::batches_in(db, BatchStatus::Validating).await? {
            if lines::lease_batch(
                db,
                &job.id,
                BatchStatus::Validating,
                &self.owner,
                self.lease_until(),
            )
            .await?
            {
                self.validate(&job).await?;
            }
        }
        for job in lines::batches_in(db, BatchStatus::Cancelling).await? {
            if lines::end_waiting(db, &job.id, LineState::Cancelled).await? == 0 {
                self.finalize(&job, BatchStatus::Cancelling, BatchStatus::Cancelled)
                    .await?;
            }
        }
        for job in lines::batches_in(db, BatchStatus::Finalizing).await? {
            // A finalize cut short: done again from the lines.
            let status = if lines::count(db, &job.id, LineState::Expired).await? > 0 {
                BatchStatus::Expired
            } else {
                BatchStatus::Completed
            };
            self.finalize(&job, BatchStatus::Finalizing, status).await?;
        }
        let mut running = HashMap::new();
        for job in lines::batches_in(db, BatchStatus::InProgress).await? {
            if now_ms() >= job.expires_ms {
                if lines::end_waiting(db, &job.id, LineState::Expired).await? == 0 {
                    self.finalize(&job, BatchStatus::InProgress, BatchStatus::Expired)
                        .await?;
                }
            } else if lines::count(db, &job.id, LineState::Pending).await? == 0 {
                self.finalize(&job, BatchStatus::InProgress, BatchStatus::Completed)
                    .await?;
            } else {
                running.insert(job.id.clone(), job);
            }
        }
        self.start_lines(running).await
    }

    /// Claims as many waiting lines as there are free permits, and runs them.
    async fn start_lines(
        self: &Arc<Self>,
        running: HashMap<String, BatchJob>,
    ) -> anyhow::Result<()> {
        let free = self.permits.available_permits();
        if free == 0 || running.is_empty() {
            return Ok(());
        }
        let db = self.batches.db();
        for line in lines::claim(db, &self.owner, free, self.lease_until()).await? {
            let Some(job) = running.get(&line.batch_id).cloned() else {
                // Its batch changed state since this round began.
                lines::release(db, &self.owner, &line, 0).await?;
                continue;
            };
            let permit = self.permits.clone().acquire_owned().await?;
            let runner = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                runner.run_line(&job, line).await;
                runner.batches.wake().notify_one();
            });
        }
        Ok(())
    }

    async fn validate(&self, job: &BatchJob) -> anyhow::Result<()> {
        let content = match self
            .batches
            .files()
            .content(&job.tenant, &job.input_file_id)
            .await
        {
            Ok(content) => content,
            Err(error) => {
                let refusal = super::LineError {
                    code: "invalid_input_file".into(),
                    line: None,
                    message: format!("The input file cannot be read: {}", error.message),
                    param: Some("input_file_id".into()),
                };
                self.batches.fail(job, &[refusal]).await?;
                return Ok(());
            }
        };
        let endpoint = job.endpoint.clone();
        let checked =
            tokio::task::spawn_blocking(move || input::check(&content, &endpoint)).await?;
        match checked {
            Err(errors) => self.batches.fail(job, &errors).await?,
            Ok(checked) => {
                let started =
                    lines::start(self.batches.db(), &job.id, &checked.model, &checked.lines)
                        .await?;
                if started {
                    tracing::info!(batch = %job.id, lines = checked.lines.len(), model = %checked.model, "batch in progress");
                }
            }
        }
        Ok(())
    }

    /// Ends `job` (now `from`) as `to`, under its lease.
    async fn finalize(
        &self,
        job: &BatchJob,
        from: BatchStatus,
        to: BatchStatus,
    ) -> anyhow::Result<()> {
        if lines::lease_batch(
            self.batches.db(),
            &job.id,
            from,
            &self.owner,
            self.lease_until(),
        )
        .await?
        {
            self.batches
                .finalize(job, &self.owner, to)
                .await
                .map_err(|e| anyhow::anyhow!("finalizing {}: {}", job.id, e.message))?;
        }
        Ok(())
    }

    /// Runs one line through the gateway and keeps its result, or gives it
    /// back when its route was busy.
    async fn run_line(&self, job: &BatchJob, line: ClaimedLine) {
        let db = self.batches.db();
        let billing = BatchBilling::new(&job.id);
        let started = std::time::Instant::now();
        let answer = self.answer(job, &line, billing.clone()).await;
        let run_ms = started.elapsed().as_millis() as i64;
        let (status_code, body) = match answer {
            Ok(body) => (200, body),
            Err(error) if busy(&error) && line.tries < MAX_TRIES => {
                let backoff = (1000i64 << line.tries.min(16)).min(MAX_BACKOFF_MS);
                if let Err(error) = lines::release(db, &self.owner, &line, now_ms() + backoff).await
                {
                    tracing::warn!(%error, batch = %job.id, line = line.line, "giving a busy line back");
                }
                return;
            }
            Err(error) => (error.kind.status_code(), batch_error(error)),
        };
        let usage = billing.take_row();
        let request_id = usage.as_ref().map_or_else(
            || format!("req_{}", uuid::Uuid::new_v4().simple()),
            |row| row.request_id.clone(),
        );
        let result = response_line(&line.custom_id, status_code, &request_id, body);
        let settled = Settled {
            result: result.to_string(),
            status_code,
            prompt_tokens: usage.as_ref().map_or(0, |u| u.prompt_tokens),
            completion_tokens: usage.as_ref().map_or(0, |u| u.completion_tokens),
            run_ms,
            usage,
        };
        let outcome = if (200..300).contains(&status_code) {
            "ok"
        } else {
            "error"
        };
        metrics::counter!("qpai_batch_lines_total", "outcome" => outcome).increment(1);
        match lines::settle(db, &self.owner, &line, settled).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(batch = %job.id, line = line.line, "a line's claim was taken over; its result is dropped")
            }
            Err(error) => {
                tracing::error!(%error, batch = %job.id, line = line.line, "keeping a line's result")
            }
        }
    }

    /// The line's answer through the gateway, as JSON.
    async fn answer(
        &self,
        job: &BatchJob,
        line: &ClaimedLine,
        billing: BatchBilling,
    ) -> Result<serde_json::Value, ApiError> {
        let principal = Principal {
            key_id: job.key_id.clone(),
            tenant: job.tenant.clone(),
            admin: false,
            rpm: None,
            tpm: None,
        };
        let hints = Hints {
            batch: Some(billing),
            ..Hints::default()
        };
        let body = line.body.as_bytes();
        let gateway = &self.gateway;
        let answer = match job.endpoint.as_str() {
            "/v1/chat/completions" => {
                let request: ChatCompletionRequest = parse_json(body)?;
                gateway.chat(&principal, request, &hints).await?
            }
            "/v1/completions" => {
                let request: CompletionRequest = parse_json(body)?;
                gateway.complete(&principal, request, &hints).await?
            }
            "/v1/embeddings" => {
                let request: EmbeddingRequest = parse_json(body)?;
                gateway.embed(&principal, request, &hints).await?
            }
            other => {
                return Err(ApiError::invalid_param(
                    "url",
                    format!("qpai does not batch '{other}'."),
                ));
            }
        };
        match answer.body {
            AnswerBody::Whole { body, .. } => Ok(body.to_json()),
            AnswerBody::Stream(_) => {
                Err(ApiError::internal("a batch line was answered as a stream"))
            }
        }
    }
}

/// A refusal worth trying again later: a full queue, a rate limit, no
/// route up just now.
pub fn busy(error: &ApiError) -> bool {
    matches!(error.kind, ErrorKind::RateLimited | ErrorKind::Unavailable)
}

/// A failed line's response body: the error envelope, with OpenAI's
/// `insufficient_quota` for a tenant out of budget.
fn batch_error(mut error: ApiError) -> serde_json::Value {
    if error.kind == ErrorKind::BudgetExceeded {
        error.code = Some("insufficient_quota");
    }
    error.to_json()
}
