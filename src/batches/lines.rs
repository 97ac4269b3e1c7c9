//! Batch lines in the database: inserted when a batch is validated,
//! claimed under a lease by a runner (`FOR UPDATE SKIP LOCKED` on
//! PostgreSQL, so processes sharing the database never claim one line
//! together; an expired lease is taken over), and settled with their
//! result and usage row in one transaction that holds only while the
//! claim does. A line is therefore kept, and billed, exactly once.

use super::input::InputLine;
use super::{BatchStatus, BatchUsage, RequestCounts};
use crate::ledger::db::Statement;
use crate::ledger::{Db, DbError, UsageRecord, Value, now_ms};

/// Where a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineState {
    /// Not run yet, or claimed and running.
    Pending,
    /// Answered: a response (2xx or not) is kept.
    Done,
    /// Not run by the end of the completion window.
    Expired,
    /// Not run: the batch was cancelled first.
    Cancelled,
}

impl LineState {
    pub fn as_str(self) -> &'static str {
        match self {
            LineState::Pending => "pending",
            LineState::Done => "done",
            LineState::Expired => "expired",
            LineState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<LineState> {
        [
            LineState::Pending,
            LineState::Done,
            LineState::Expired,
            LineState::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// A line claimed to run.
#[derive(Debug, Clone)]
pub struct ClaimedLine {
    pub batch_id: String,
    pub line: i64,
    pub custom_id: String,
    pub body: String,
    /// Claims so far, this one included.
    pub tries: i64,
}

/// What a line settles with.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The output or error line, JSON.
    pub result: String,
    pub status_code: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// How long the line took to run.
    pub run_ms: i64,
    /// Its one usage row, written with it.
    pub usage: Option<UsageRecord>,
}

/// Marks a validated batch in progress and inserts its lines, in one
/// transaction, while it is still `validating` (a batch cancelled during
/// validation gets no lines). Returns whether it did.
pub async fn start(
    db: &Db,
    batch_id: &str,
    model: &str,
    lines: &[InputLine],
) -> Result<bool, DbError> {
    let guard: Statement = (
        "UPDATE batches SET status = 'in_progress', in_progress_ms = $1, model = $2, \
         lease_owner = NULL, lease_until_ms = 0 WHERE id = $3 AND status = 'validating'",
        vec![now_ms().into(), model.into(), batch_id.into()],
    );
    let inserts = lines
        .iter()
        .map(|line| {
            (
                "INSERT INTO batch_lines (batch_id, line, custom_id, body, state) \
                 VALUES ($1, $2, $3, $4, 'pending') ON CONFLICT (batch_id, line) DO NOTHING",
                vec![
                    batch_id.into(),
                    (line.line as i64).into(),
                    line.custom_id.as_str().into(),
                    line.body.as_str().into(),
                ],
            )
        })
        .collect();
    db.transaction_when(guard, inserts).await
}

/// Claims up to `limit` waiting lines of running batches for `owner`
/// until `lease_until_ms`, oldest batch first.
pub async fn claim(
    db: &Db,
    owner: &str,
    limit: usize,
    lease_until_ms: i64,
) -> Result<Vec<ClaimedLine>, DbError> {
    let sql = match db {
        Db::Postgres { .. } => {
            "UPDATE batch_lines SET lease_owner = $1, lease_until_ms = $2, tries = tries + 1 \
             WHERE (batch_id, line) IN (SELECT l.batch_id, l.line FROM batch_lines l \
             JOIN batches b ON b.id = l.batch_id WHERE b.status = 'in_progress' \
             AND l.state = 'pending' AND l.lease_until_ms < $3 \
             ORDER BY b.created_ms, l.batch_id, l.line LIMIT $4 FOR UPDATE OF l SKIP LOCKED) \
             RETURNING batch_id, line, custom_id, body, tries"
        }
        Db::Sqlite { .. } => {
            "UPDATE batch_lines SET lease_owner = $1, lease_until_ms = $2, tries = tries + 1 \
             WHERE (batch_id, line) IN (SELECT l.batch_id, l.line FROM batch_lines l \
             JOIN batches b ON b.id = l.batch_id WHERE b.status = 'in_progress' \
             AND l.state = 'pending' AND l.lease_until_ms < $3 \
             ORDER BY b.created_ms, l.batch_id, l.line LIMIT $4) \
             RETURNING batch_id, line, custom_id, body, tries"
        }
    };
    let rows = db
        .query(
            sql,
            vec![
                owner.into(),
                lease_until_ms.into(),
                now_ms().into(),
                (limit as i64).into(),
            ],
        )
        .await?;
    let mut claimed: Vec<ClaimedLine> = rows
        .into_iter()
        .filter_map(|row| {
            Some(ClaimedLine {
                batch_id: row[0].text()?.to_string(),
                line: row[1].int()?,
                custom_id: row[2].text()?.to_string(),
                body: row[3].text()?.to_string(),
                tries: row[4].int()?,
            })
        })
        .collect();
    claimed.sort_by(|a, b| (&a.batch_id, a.line).cmp(&(&b.batch_id, b.line)));
    Ok(claimed)
}

/// Keeps `line`'s result and usage row, if `owner` still holds its claim.
/// Returns whether it did (false: the claim expired and was taken over,
/// and the line's new owner will keep its own result).
pub async fn settle(
    db: &Db,
    owner: &str,
    line: &ClaimedLine,
    settled: Settled,
) -> Result<bool, DbError> {
    let guard: Statement = (
        "UPDATE batch_lines SET state = 'done', result = $1, status_code = $2, \
         prompt_tokens = $3, completion_tokens = $4, run_ms = $8 \
         WHERE batch_id = $5 AND line = $6 AND state = 'pending' AND lease_owner = $7",
        vec![
            settled.result.into(),
            i64::from(settled.status_code).into(),
            (settled.prompt_tokens as i64).into(),
            (settled.completion_tokens as i64).into(),
            line.batch_id.as_str().into(),
            line.line.into(),
            owner.into(),
            settled.run_ms.into(),
        ],
    );
    let usage = settled
        .usage
        .iter()
        .flat_map(crate::ledger::usage::statements)
        .collect();
    db.transaction_when(guard, usage).await
}

/// Gives `line` back to be claimed again from `retry_at_ms` (its route
/// was busy); nothing of the try is kept.
pub async fn release(
    db: &Db,
    owner: &str,
    line: &ClaimedLine,
    retry_at_ms: i64,
) -> Result<(), DbError> {
    db.execute(
        "UPDATE batch_lines SET lease_owner = NULL, lease_until_ms = $1 \
         WHERE batch_id = $2 AND line = $3 AND state = 'pending' AND lease_owner = $4",
        vec![
            retry_at_ms.into(),
            line.batch_id.as_str().into(),
            line.line.into(),
            owner.into(),
        ],
    )
    .await
    .map(|_| ())
}

/// Extends every claim `owner` holds (lines still running) to `until_ms`.
pub async fn renew(db: &Db, owner: &str, until_ms: i64) -> Result<(), DbError> {
    db.execute(
        "UPDATE batch_lines SET lease_until_ms = $1 WHERE lease_owner = $2 AND state = 'pending'",
        vec![until_ms.into(), owner.into()],
    )
    .await?;
    db.execute(
        "UPDATE batches SET lease_until_ms = $1 WHERE lease_owner = $2",
        vec![until_ms.into(), owner.into()],
    )
    .await
    .map(|_| ())
}

/// Ends `batch_id`'s waiting lines that nobody runs now as `state`
/// (expired or cancelled); lines in flight finish. Returns how many
/// lines are still pending.
pub async fn end_waiting(db: &Db, batch_id: &str, state: LineState) -> Result<u64, DbError> {
    db.execute(
        "UPDATE batch_lines SET state = $1 WHERE batch_id = $2 AND state = 'pending' \
         AND lease_until_ms < $3",
        vec![state.as_str().into(), batch_id.into(), now_ms().into()],
    )
    .await?;
    count(db, batch_id, LineState::Pending).await
}

/// Lines of `batch_id` in `state`.
pub async fn count(db: &Db, batch_id: &str, state: LineState) -> Result<u64, DbError> {
    let rows = db
        .query(
            "SELECT COUNT(*) FROM batch_lines WHERE batch_id = $1 AND state = $2",
            vec![batch_id.into(), state.as_str().into()],
        )
        .await?;
    Ok(rows.first().and_then(|r| r[0].int()).unwrap_or(0) as u64)
}

/// A batch's request counts and token usage so far.
pub async fn tally(db: &Db, batch_id: &str) -> Result<(RequestCounts, BatchUsage), DbError> {
    let rows = db
        .query(
            "SELECT state, CASE WHEN status_code BETWEEN 200 AND 299 THEN 1 ELSE 0 END, \
             COUNT(*), CAST(SUM(prompt_tokens) AS TEXT), CAST(SUM(completion_tokens) AS TEXT) \
             FROM batch_lines WHERE batch_id = $1 GROUP BY 1, 2",
            vec![batch_id.into()],
        )
        .await?;
    let mut counts = RequestCounts::default();
    let mut usage = BatchUsage::default();
    for row in rows {
        let state = row[0].text().and_then(LineState::parse);
        let ok = row[1].int() == Some(1);
        let n = row[2].int().unwrap_or(0) as u64;
        counts.total += n;
        match state {
            Some(LineState::Done) if ok => counts.completed += n,
            Some(LineState::Pending) | None => {}
            Some(_) => counts.failed += n,
        }
        usage.input_tokens += row[3].int().unwrap_or(0) as u64;
        usage.output_tokens += row[4].int().unwrap_or(0) as u64;
    }
    usage.total_tokens = usage.input_tokens + usage.output_tokens;
    Ok((counts, usage))
}

/// Takes batch `batch_id`'s lease for `owner` until `until_ms`, if nobody
/// holds it and it is still `status`.
pub async fn lease_batch(
    db: &Db,
    batch_id: &str,
    status: BatchStatus,
    owner: &str,
    until_ms: i64,
) -> Result<bool, DbError> {
    let changed = db
        .execute(
            "UPDATE batches SET lease_owner = $1, lease_until_ms = $2 \
             WHERE id = $3 AND status = $4 AND (lease_until_ms < $5 OR lease_owner = $1)",
            vec![
                owner.into(),
                until_ms.into(),
                batch_id.into(),
                status.as_str().into(),
                now_ms().into(),
            ],
        )
        .await?;
    Ok(changed == 1)
}

/// A batch as its runner needs it.
#[derive(Debug, Clone)]
pub struct BatchJob {
    pub id: String,
    pub tenant: String,
    pub key_id: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub expires_ms: i64,
    /// Seconds after which its output files expire.
    pub output_expiry_s: Option<i64>,
}

/// Batches in `status`, oldest first.
pub async fn batches_in(db: &Db, status: BatchStatus) -> Result<Vec<BatchJob>, DbError> {
    let rows = db
        .query(
            "SELECT id, tenant, key_id, endpoint, input_file_id, expires_ms, output_expiry_s \
             FROM batches WHERE status = $1 ORDER BY created_ms",
            vec![status.as_str().into()],
        )
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let text = |i: usize| row.get(i).and_then(Value::text).map(str::to_string);
            Some(BatchJob {
                id: text(0)?,
                tenant: text(1)?,
                key_id: text(2)?,
                endpoint: text(3)?,
                input_file_id: text(4)?,
                expires_ms: row.get(5)?.int()?,
                output_expiry_s: row.get(6).and_then(Value::int),
            })
        })
        .collect())
}
