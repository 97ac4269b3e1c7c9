//! Batches, as OpenAI's Batch API defines them: a tenant uploads a file of
//! requests (`{custom_id, method, url, body}` per line), creates a batch
//! over it, and gets back an output file and an error file with one line
//! per `custom_id`. Batch state lives in the ledger database (`batches`,
//! and `batch_lines` with one row per input line), so any qpai process on
//! that database can validate, run and finalize it (runner.rs), and a
//! process killed mid-batch loses nothing: its claims expire and are taken
//! over.

pub mod cli;
pub mod input;
pub mod lines;
mod output;
pub mod rows;
pub mod runner;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::files::{Files, Purpose};
use crate::ledger::{Db, Ledger, now_ms};
use crate::tenancy::Principal;

pub use lines::LineState;

/// The endpoints a batch may run, as its lines' `url` names them.
pub const ENDPOINTS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];
/// The only completion window OpenAI offers, and qpai enforces.
pub const COMPLETION_WINDOW: &str = "24h";
const WINDOW_MS: i64 = 24 * 3600 * 1000;
/// Metadata pairs at most, and their lengths (OpenAI's limits).
pub const MAX_METADATA_PAIRS: usize = 16;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;
/// Batches listed per page at most.
pub const MAX_LIST_LIMIT: usize = 100;

/// Where a batch is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::Failed,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<BatchStatus> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// No more work will be done on it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            BatchStatus::Failed
                | BatchStatus::Completed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }
}

/// Why an input file was refused, or a line of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineError {
    pub code: String,
    /// 1-based, when the error is a line's.
    pub line: Option<u64>,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchErrors {
    pub object: &'static str,
    pub data: Vec<LineError>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CachedTokens {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReasoningTokens {
    pub reasoning_tokens: u64,
}

/// The tokens a batch's lines used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BatchUsage {
    pub input_tokens: u64,
    pub input_tokens_details: CachedTokens,
    pub output_tokens: u64,
    pub output_tokens_details: ReasoningTokens,
    pub total_tokens: u64,
}

/// A batch as the API shows it (timestamps in seconds).
#[derive(Debug, Clone, Serialize)]
pub struct BatchObject {
    pub id: String,
    pub object: &'static str,
    pub endpoint: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<Map<String, Value>>,
    pub model: Option<String>,
    pub usage: BatchUsage,
}

/// A page of batches, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct BatchList {
    pub object: &'static str,
    pub data: Vec<BatchObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// What a client sends to create a batch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    /// When the output and error files expire (OpenAI's `{anchor, seconds}`).
    #[serde(default)]
    pub output_expires_after: Option<OutputExpiry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputExpiry {
    pub anchor: String,
    pub seconds: u64,
}

/// The batches of every tenant.
#[derive(Clone)]
pub struct Batches {
    db: Db,
    files: Files,
    /// Wakes this process's runner when a batch is created or cancelled.
    wake: std::sync::Arc<tokio::sync::Notify>,
}

pub(crate) const COLUMNS: &str = "id, endpoint, errors, input_file_id, completion_window, status, \
     output_file_id, error_file_id, created_ms, in_progress_ms, expires_ms, finalizing_ms, \
     completed_ms, failed_ms, expired_ms, cancelling_ms, cancelled_ms, metadata, model";

fn not_found(id: &str) -> ApiError {
    ApiError {
        code: Some("batch_not_found"),
        param: Some("batch_id".into()),
        ..ApiError::not_found(format!("No batch with id '{id}'."))
    }
}

impl Batches {
    pub fn new(ledger: &Ledger, files: Files) -> Self {
        Self {
            db: ledger.db().clone(),
            files,
            wake: Default::default(),
        }
    }

    pub fn files(&self) -> &Files {
        &self.files
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    pub(crate) fn wake(&self) -> &tokio::sync::Notify {
        &self.wake
    }

    /// Creates a batch over `principal`'s input file; it is validated and
    /// run in the background.
    pub async fn create(&self, principal: &Principal, new: NewBatch) -> ApiResult<BatchObject> {
        if !ENDPOINTS.contains(&new.endpoint.as_str()) {
            return Err(ApiError::invalid_param(
                "endpoint",
                format!(
                    "qpai batches {}; not '{}'.",
                    ENDPOINTS.join(", "),
                    new.endpoint
                ),
            ));
        }
        if new.completion_window != COMPLETION_WINDOW {
            return Err(ApiError::invalid_param(
                "completion_window",
                format!("The completion window must be '{COMPLETION_WINDOW}'."),
            ));
        }
        check_metadata(new.metadata.as_ref())?;
        let output_expiry_s = match &new.output_expires_after {
            Some(expiry) if expiry.anchor != "created_at" => {
                return Err(ApiError::invalid_param(
                    "output_expires_after.anchor",
                    "The only anchor is 'created_at'.",
                ));
            }
            Some(expiry) if !crate::files::EXPIRES_AFTER_S.contains(&expiry.seconds) => {
                return Err(ApiError::invalid_param(
                    "output_expires_after.seconds",
                    format!(
                        "Output files expire from {} to {} seconds after they are created.",
                        crate::files::EXPIRES_AFTER_S.start(),
                        crate::files::EXPIRES_AFTER_S.end()
                    ),
                ));
            }
            Some(expiry) => Some(expiry.seconds as i64),
            None => None,
        };
        let file = self
            .files
            .get(&principal.tenant, &new.input_file_id)
            .await
            .map_err(|e| ApiError {
                param: Some("input_file_id".into()),
                ..e
            })?;
        if file.purpose != Purpose::Batch {
            return Err(ApiError::invalid_param(
                "input_file_id",
                format!(
                    "File '{}' has purpose '{}'; a batch's input needs purpose 'batch'.",
                    file.id,
                    file.purpose.as_str()
                ),
            ));
        }
        let id = format!("batch_{}", uuid::Uuid::new_v4().simple());
        let created_ms = now_ms();
        let metadata = new
            .metadata
            .as_ref()
            .map(|m| Value::Object(m.clone()).to_string());
        self.db
            .execute(
                "INSERT INTO batches (id, tenant, key_id, endpoint, input_file_id, \
                 completion_window, status, metadata, created_ms, expires_ms, output_expiry_s) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                vec![
                    id.as_str().into(),
                    principal.tenant.as_str().into(),
                    principal.key_id.as_str().into(),
                    new.endpoint.as_str().into(),
                    new.input_file_id.as_str().into(),
                    new.completion_window.as_str().into(),
                    BatchStatus::Validating.as_str().into(),
                    metadata.into(),
                    created_ms.into(),
                    (created_ms + WINDOW_MS).into(),
                    output_expiry_s.into(),
                ],
            )
            .await
            .map_err(ApiError::internal)?;
        self.wake.notify_one();
        self.get(&principal.tenant, &id).await
    }

    /// `tenant`'s batch `id` (absent when another tenant's).
    pub async fn get(&self, tenant: &str, id: &str) -> ApiResult<BatchObject> {
        let rows = self
            .db
            .query_dynamic(
                format!("SELECT {COLUMNS} FROM batches WHERE id = $1 AND tenant = $2"),
                vec![id.into(), tenant.into()],
            )
            .await
            .map_err(ApiError::internal)?;
        let row = rows.first().ok_or_else(|| not_found(id))?;
        let (counts, usage) = lines::tally(&self.db, id)
            .await
            .map_err(ApiError::internal)?;
        output::batch_object(row, counts, usage)
    }

    /// A page of `tenant`'s batches, newest first, after the batch `after`.
    pub async fn list(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
    ) -> ApiResult<BatchList> {
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(ApiError::invalid_param(
                "limit",
                format!("'limit' must be from 1 to {MAX_LIST_LIMIT}."),
            ));
        }
        let cursor = match after {
            Some(after) => {
                let rows = self
                    .db
                    .query(
                        "SELECT created_ms FROM batches WHERE id = $1 AND tenant = $2",
                        vec![after.into(), tenant.into()],
                    )
                    .await
                    .map_err(ApiError::internal)?;
                let created = rows
                    .first()
                    .and_then(|r| r[0].int())
                    .ok_or_else(|| ApiError {
                        param: Some("after".into()),
                        ..not_found(after)
                    })?;
                Some((created, after.to_string()))
            }
            None => None,
        };
        let rows = match cursor {
            None => {
                self.db
                    .query(
                        "SELECT id FROM batches WHERE tenant = $1 \
                     ORDER BY created_ms DESC, id DESC LIMIT $2",
                        vec![tenant.into(), (limit as i64 + 1).into()],
                    )
                    .await
            }
            Some((created, after_id)) => {
                self.db
                    .query(
                        "SELECT id FROM batches WHERE tenant = $1 \
                     AND (created_ms < $2 OR (created_ms = $2 AND id < $3)) \
                     ORDER BY created_ms DESC, id DESC LIMIT $4",
                        vec![
                            tenant.into(),
                            created.into(),
                            after_id.into(),
                            (limit as i64 + 1).into(),
                        ],
                    )
                    .await
            }
        }
        .map_err(ApiError::internal)?;
        let has_more = rows.len() > limit;
        let mut data = Vec::with_capacity(limit);
        for row in rows.iter().take(limit) {
            if let Some(id) = row[0].text() {
                data.push(self.get(tenant, id).await?);
            }
        }
        Ok(BatchList {
            object: "list",
            first_id: data.first().map(|b| b.id.clone()),
            last_id: data.last().map(|b| b.id.clone()),
            data,
            has_more,
        })
    }

    /// `tenant`'s newest batch whose metadata holds `key` = `value`.
    pub async fn find_by_metadata(
        &self,
        tenant: &str,
        key: &str,
        value: &str,
    ) -> ApiResult<Option<BatchObject>> {
        let pair = serde_json::to_string(&serde_json::json!({ key: value }))
            .map_err(ApiError::internal)?;
        let pattern = format!("%{}%", pair.trim_start_matches('{').trim_end_matches('}'));
        let rows = self
            .db
            .query(
                "SELECT id FROM batches WHERE tenant = $1 AND metadata LIKE $2 \
                 ORDER BY created_ms DESC LIMIT 1",
                vec![tenant.into(), pattern.into()],
            )
            .await
            .map_err(ApiError::internal)?;
        match rows.first().and_then(|r| r[0].text()) {
            Some(id) => Ok(Some(self.get(tenant, id).await?)),
            None => Ok(None),
        }
    }

    /// Cancels `tenant`'s batch `id`: no more of its lines start; lines in
    /// flight finish, and the runner then writes what was done.
    pub async fn cancel(&self, tenant: &str, id: &str) -> ApiResult<BatchObject> {
        let batch = self.get(tenant, id).await?;
        if batch.status.is_final() {
            return Err(ApiError {
                kind: ErrorKind::Conflict,
                message: format!(
                    "Batch '{id}' has ended ({}); only a batch still running can be cancelled.",
                    batch.status.as_str()
                ),
                param: Some("batch_id".into()),
                code: Some("batch_not_cancellable"),
                retry_after: None,
            });
        }
        self.db
            .execute(
                "UPDATE batches SET status = 'cancelling', cancelling_ms = $1 \
                 WHERE id = $2 AND tenant = $3 AND status IN ('validating', 'in_progress')",
                vec![now_ms().into(), id.into(), tenant.into()],
            )
            .await
            .map_err(ApiError::internal)?;
        self.wake.notify_one();
        self.get(tenant, id).await
    }
}

/// OpenAI's metadata rules: at most 16 string pairs, short keys and values.
fn check_metadata(metadata: Option<&Map<String, Value>>) -> ApiResult<()> {
    let Some(metadata) = metadata else {
        return Ok(());
    };
    if metadata.len() > MAX_METADATA_PAIRS {
        return Err(ApiError::invalid_param(
            "metadata",
            format!(
                "'metadata' has {} pairs; at most {MAX_METADATA_PAIRS} are allowed.",
                metadata.len()
            ),
        ));
    }
    for (key, value) in metadata {
        let param = format!("metadata.{key}");
        if key.chars().count() > MAX_METADATA_KEY {
            return Err(ApiError::invalid_param(
                param,
                format!("Metadata keys have at most {MAX_METADATA_KEY} characters."),
            ));
        }
        match value.as_str() {
            Some(text) if text.chars().count() <= MAX_METADATA_VALUE => {}
            Some(_) => {
                return Err(ApiError::invalid_param(
                    param,
                    format!("Metadata values have at most {MAX_METADATA_VALUE} characters."),
                ));
            }
            None => {
                return Err(ApiError::invalid_param(
                    param,
                    "Metadata values are strings.",
                ));
            }
        }
    }
    Ok(())
}
