//! What a batch shows and writes: the batch object read from its row, the
//! output and error lines in OpenAI's format, and the finalizing step that
//! writes them as `batch_output` files (under ids fixed by the batch, so
//! a finalize repeated after a crash leaves one pair of files).

use bytes::Bytes;
use serde_json::{Value, json};

use super::lines::{BatchJob, LineState};
use super::{BatchErrors, BatchObject, BatchStatus, BatchUsage, Batches, LineError, RequestCounts};
use crate::error::{ApiError, ApiResult};
use crate::files::{NewFile, Purpose};
use crate::ledger::{DbError, Value as DbValue, now_ms};

/// The batch object of a `batches` row (columns as `super::COLUMNS`).
pub fn batch_object(
    row: &[DbValue],
    request_counts: RequestCounts,
    usage: BatchUsage,
) -> ApiResult<BatchObject> {
    let text = |i: usize| row.get(i).and_then(DbValue::text).map(str::to_string);
    let seconds = |i: usize| row.get(i).and_then(DbValue::int).map(|ms| ms / 1000);
    let broken = || ApiError::internal("a batches row that cannot be read");
    let errors = match text(2) {
        Some(json) => Some(BatchErrors {
            object: "list",
            data: serde_json::from_str::<Vec<LineError>>(&json).map_err(|_| broken())?,
        }),
        None => None,
    };
    let metadata = match text(17) {
        Some(json) => match serde_json::from_str(&json).map_err(|_| broken())? {
            Value::Object(map) => Some(map),
            _ => return Err(broken()),
        },
        None => None,
    };
    Ok(BatchObject {
        id: text(0).ok_or_else(broken)?,
        object: "batch",
        endpoint: text(1).ok_or_else(broken)?,
        errors,
        input_file_id: text(3).ok_or_else(broken)?,
        completion_window: text(4).ok_or_else(broken)?,
        status: text(5)
            .and_then(|s| BatchStatus::parse(&s))
            .ok_or_else(broken)?,
        output_file_id: text(6),
        error_file_id: text(7),
        created_at: seconds(8).ok_or_else(broken)?,
        in_progress_at: seconds(9),
        expires_at: seconds(10).ok_or_else(broken)?,
        finalizing_at: seconds(11),
        completed_at: seconds(12),
        failed_at: seconds(13),
        expired_at: seconds(14),
        cancelling_at: seconds(15),
        cancelled_at: seconds(16),
        request_counts,
        metadata,
        model: text(18),
        usage,
    })
}

/// An output or error line with a response (2xx or not).
pub fn response_line(custom_id: &str, status_code: u16, request_id: &str, body: Value) -> Value {
    json!({
        "id": format!("batch_req_{}", uuid::Uuid::new_v4().simple()),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": null,
    })
}

/// An error line for a request that never ran.
fn unrun_line(custom_id: &str, state: LineState) -> Value {
    let (code, message) = match state {
        LineState::Expired => (
            "batch_expired",
            "This request could not be executed before the completion window expired.",
        ),
        _ => (
            "batch_cancelled",
            "This request was not executed: the batch was cancelled first.",
        ),
    };
    json!({
        "id": format!("batch_req_{}", uuid::Uuid::new_v4().simple()),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
}

impl Batches {
    /// Writes `job`'s output and error files and ends it as `status`
    /// (completed, expired or cancelled). Runs under the batch's lease,
    /// held by `owner`.
    pub(super) async fn finalize(
        &self,
        job: &BatchJob,
        owner: &str,
        status: BatchStatus,
    ) -> ApiResult<()> {
        let db = self.db();
        if status != BatchStatus::Cancelled {
            db.execute(
                "UPDATE batches SET status = 'finalizing', finalizing_ms = $1 \
                 WHERE id = $2 AND status = 'in_progress'",
                vec![now_ms().into(), job.id.as_str().into()],
            )
            .await
            .map_err(ApiError::internal)?;
        }
        let rows = db
            .query(
                "SELECT custom_id, state, status_code, result FROM batch_lines \
                 WHERE batch_id = $1 ORDER BY line",
                vec![job.id.as_str().into()],
            )
            .await
            .map_err(ApiError::internal)?;
        let (mut output, mut errors) = (String::new(), String::new());
        for row in &rows {
            let custom_id = row[0].text().unwrap_or_default();
            let state = row[1].text().and_then(LineState::parse);
            let ok = row[2].int().is_some_and(|c| (200..300).contains(&c));
            let (line, to) = match (state, row[3].text()) {
                (Some(LineState::Done), Some(result)) => (
                    result.to_string(),
                    if ok { &mut output } else { &mut errors },
                ),
                (Some(state @ (LineState::Expired | LineState::Cancelled)), _) => {
                    (unrun_line(custom_id, state).to_string(), &mut errors)
                }
                _ => continue,
            };
            to.push_str(&line);
            to.push('\n');
        }
        let output_id = self.write_output(job, "output", output).await?;
        let error_id = self.write_output(job, "error", errors).await?;
        let sql = match status {
            BatchStatus::Expired => {
                "UPDATE batches SET status = $1, output_file_id = $2, error_file_id = $3, \
                 expired_ms = $4, lease_owner = NULL WHERE id = $5 AND lease_owner = $6"
            }
            BatchStatus::Cancelled => {
                "UPDATE batches SET status = $1, output_file_id = $2, error_file_id = $3, \
                 cancelled_ms = $4, lease_owner = NULL WHERE id = $5 AND lease_owner = $6"
            }
            _ => {
                "UPDATE batches SET status = $1, output_file_id = $2, error_file_id = $3, \
                 completed_ms = $4, lease_owner = NULL WHERE id = $5 AND lease_owner = $6"
            }
        };
        db.execute(
            sql,
            vec![
                status.as_str().into(),
                output_id.into(),
                error_id.into(),
                now_ms().into(),
                job.id.as_str().into(),
                owner.into(),
            ],
        )
        .await
        .map_err(ApiError::internal)?;
        tracing::info!(batch = %job.id, status = status.as_str(), "batch ended");
        Ok(())
    }

    /// Stores one of `job`'s result files (none when it has no lines).
    async fn write_output(
        &self,
        job: &BatchJob,
        kind: &str,
        content: String,
    ) -> ApiResult<Option<String>> {
        if content.is_empty() {
            return Ok(None);
        }
        let suffix = job.id.trim_start_matches("batch_");
        let id = format!("file-{suffix}-{kind}");
        let file = NewFile {
            filename: format!("{}_{kind}.jsonl", job.id),
            purpose: Purpose::BatchOutput,
            content: Bytes::from(content),
            expires_after_s: job.output_expiry_s.map(|s| s as u64),
        };
        self.files().write_as(&job.tenant, &id, file).await?;
        Ok(Some(id))
    }

    /// Ends a batch whose input failed validation, with the errors.
    pub(super) async fn fail(&self, job: &BatchJob, errors: &[LineError]) -> Result<(), DbError> {
        let count = errors.len();
        let errors = serde_json::to_string(errors).unwrap_or_else(|_| "[]".into());
        self.db()
            .execute(
                "UPDATE batches SET status = 'failed', errors = $1, failed_ms = $2, \
                 lease_owner = NULL WHERE id = $3 AND status = 'validating'",
                vec![errors.into(), now_ms().into(), job.id.as_str().into()],
            )
            .await?;
        tracing::info!(batch = %job.id, errors = count, "batch input refused");
        Ok(())
    }
}
