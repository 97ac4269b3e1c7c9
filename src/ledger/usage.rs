//! Usage rows: one per request, written by a background writer that
//! commits whatever has queued up in one transaction (a group commit); read
//! back grouped by model, provider, key, day, tenant or deployment. Sums
//! are exact integers.
//!
//! Recording hands back a [`Recorded`]: the gateway waits on it before the
//! answer's last bytes go out, so a client that saw a whole answer has a
//! committed row even if the process is killed the next moment.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::Ledger;
use super::db::{Db, Statement, Value};
use crate::money::Usd;
use crate::router::{Endpoint, ProviderKind};

/// Rows written in one transaction at most.
const BATCH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// Nothing was produced: no route answered, or the request was refused upstream.
    Error,
    /// A stream that ended early (the client left, or the upstream broke
    /// off): billed for what was produced.
    Cut,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cut => "cut",
        }
    }
}

/// Where a row's token counts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The provider's own usage report (authoritative).
    Upstream,
    /// qpai's count (the provider reported none: a cut stream, an error).
    Counted,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Upstream => "upstream",
            UsageSource::Counted => "counted",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub request_id: String,
    pub ts_ms: i64,
    pub tenant: String,
    pub key_id: String,
    pub endpoint: Endpoint,
    /// The model the client asked for (a deployment, a logical model, "auto").
    pub requested_model: String,
    pub deployment: String,
    /// None when no route answered.
    pub provider: Option<ProviderKind>,
    /// The upstream's model (what the price is for).
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Usd,
    pub outcome: Outcome,
    pub attempts: u32,
    pub stream: bool,
    pub usage_source: UsageSource,
    /// The batch a batch line's row belongs to.
    pub batch_id: Option<String>,
    /// The versioned prompt the request named, `NAME@VERSION`.
    pub prompt: Option<String>,
    /// The eval run the request was a case of.
    pub eval_run: Option<String>,
    /// The database budget hold the row replaces (deleted as it is
    /// written); not a column.
    pub budget_hold: Option<String>,
}

/// UTC day of a timestamp, `YYYY-MM-DD`.
pub fn day_of(ts_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ts_ms)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

/// The statement that writes `record` (once: a second write of the same
/// request id changes nothing).
pub fn insert(record: &UsageRecord) -> Statement {
    let int = |v: u64| Value::Int(i64::try_from(v).unwrap_or(i64::MAX));
    (
        "INSERT INTO usage_ledger (request_id, ts_ms, day, tenant, key_id, endpoint, \
         requested_model, deployment, provider, model, prompt_tokens, completion_tokens, \
         cost_pico, outcome, attempts, stream, usage_source, batch_id, prompt, eval_run) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
         $19, $20) \
         ON CONFLICT (request_id) DO NOTHING",
        vec![
            record.request_id.as_str().into(),
            record.ts_ms.into(),
            day_of(record.ts_ms).into(),
            record.tenant.as_str().into(),
            record.key_id.as_str().into(),
            record.endpoint.as_str().into(),
            record.requested_model.as_str().into(),
            record.deployment.as_str().into(),
            record.provider.map_or("", ProviderKind::as_str).into(),
            record.model.as_str().into(),
            int(record.prompt_tokens),
            int(record.completion_tokens),
            int(record.cost.0),
            record.outcome.as_str().into(),
            i64::from(record.attempts).into(),
            i64::from(record.stream).into(),
            record.usage_source.as_str().into(),
            record.batch_id.clone().into(),
            record.prompt.clone().into(),
            record.eval_run.clone().into(),
        ],
    )
}

/// The statements that write `record`: its row and, when it replaces a
/// budget hold, the hold moved to the month's spend (while the hold exists:
/// once) and deleted, all in one transaction.
pub fn statements(record: &UsageRecord) -> Vec<Statement> {
    let mut statements = vec![insert(record)];
    if let Some(hold) = &record.budget_hold {
        statements.push((
            "UPDATE budget_months SET spent_pico = spent_pico + $1, \
             held_pico = held_pico - h.amount_pico \
             FROM budget_holds h WHERE h.id = $2 \
             AND budget_months.tenant = h.tenant \
             AND budget_months.month_start_ms = h.month_start_ms",
            vec![
                Value::Int(i64::try_from(record.cost.0).unwrap_or(i64::MAX)),
                hold.as_str().into(),
            ],
        ));
        statements.push((
            "DELETE FROM budget_holds WHERE id = $1",
            vec![hold.as_str().into()],
        ));
    }
    statements
}

enum Message {
    /// A row, and who waits for its commit.
    Record(Box<UsageRecord>, oneshot::Sender<()>),
    /// Answered once everything sent before it is written.
    Flush(oneshot::Sender<()>),
}

/// Writes usage rows in the background, batching what has queued up.
#[derive(Clone)]
pub(super) struct Writer {
    queue: mpsc::UnboundedSender<Message>,
}

impl Writer {
    pub(super) fn start(db: Db) -> Writer {
        let (queue, mut received) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            let mut pending = Vec::with_capacity(BATCH);
            while received.recv_many(&mut pending, BATCH).await > 0 {
                let mut statements = Vec::new();
                let mut flushed = Vec::new();
                for message in pending.drain(..) {
                    match message {
                        Message::Record(record, committed) => {
                            statements.extend(self::statements(&record));
                            flushed.push(committed);
                        }
                        Message::Flush(done) => flushed.push(done),
                    }
                }
                if !statements.is_empty() {
                    let rows = statements.len();
                    if let Err(error) = write_with_retries(&db, statements).await {
                        metrics::counter!("qpai_ledger_rows_lost_total").increment(rows as u64);
                        tracing::error!(%error, rows, "usage rows could not be written");
                    }
                }
                for done in flushed {
                    let _ = done.send(());
                }
            }
        });
        Writer { queue }
    }
}

async fn write_with_retries(db: &Db, statements: Vec<Statement>) -> Result<(), super::DbError> {
    let mut delay = std::time::Duration::from_millis(50);
    for _ in 0..5 {
        match db.transaction(statements.clone()).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(%error, "writing usage rows; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    db.transaction(statements).await
}

/// What usage rows are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupKey {
    Model,
    Provider,
    Key,
    Day,
    Tenant,
    Deployment,
    /// The batch a row's request was a line of (empty for live requests).
    Batch,
    /// The versioned prompt a request named (empty when none).
    Prompt,
    /// The eval run a request was a case of (empty for other traffic).
    Eval,
}

impl GroupKey {
    pub fn parse(text: &str) -> Option<GroupKey> {
        Some(match text {
            "model" => GroupKey::Model,
            "provider" => GroupKey::Provider,
            "key" => GroupKey::Key,
            "day" => GroupKey::Day,
            "tenant" => GroupKey::Tenant,
            "deployment" => GroupKey::Deployment,
            "batch" => GroupKey::Batch,
            "prompt" => GroupKey::Prompt,
            "eval" => GroupKey::Eval,
            _ => return None,
        })
    }

    fn column(self) -> &'static str {
        match self {
            GroupKey::Model => "model",
            GroupKey::Provider => "provider",
            GroupKey::Key => "key_id",
            GroupKey::Day => "day",
            GroupKey::Tenant => "tenant",
            GroupKey::Deployment => "deployment",
            GroupKey::Batch => "batch_id",
            GroupKey::Prompt => "prompt",
            GroupKey::Eval => "eval_run",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GroupKey::Key => "key",
            GroupKey::Batch => "batch",
            GroupKey::Eval => "eval",
            other => other.column(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// Only this tenant's rows (a tenant's key always sets it).
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    /// Days, inclusive, `YYYY-MM-DD`.
    pub from_day: Option<String>,
    pub to_day: Option<String>,
    pub group_by: Vec<GroupKey>,
}

/// One group's totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    /// The group's values, by group name.
    #[serde(flatten)]
    pub group: BTreeMap<&'static str, String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Exact dollars, as a decimal string.
    #[serde(rename = "cost_usd")]
    pub cost: Usd,
}

/// A row handed to the writer; [`Recorded::committed`] resolves once its
/// transaction has committed (or, after the writer's retries, failed and
/// been counted in `qpai_ledger_rows_lost_total`).
#[must_use = "an answer is complete only once its row is committed"]
pub struct Recorded(Option<oneshot::Receiver<()>>);

impl Recorded {
    /// Nothing to wait for (no row goes to the ledger's writer).
    pub const NONE: Recorded = Recorded(None);

    pub async fn committed(self) {
        if let Some(committed) = self.0 {
            let _ = committed.await;
        }
    }
}

impl Ledger {
    /// Records a request's usage. The row is committed with whatever else
    /// is queued, within milliseconds; await the returned [`Recorded`] to
    /// know it is.
    pub fn record(&self, record: UsageRecord) -> Recorded {
        let provider = record.provider.map_or("", ProviderKind::as_str);
        metrics::counter!("qpai_ledger_cost_pico_total", "provider" => provider)
            .increment(record.cost.0);
        let (committed, waiter) = oneshot::channel();
        if self
            .writer
            .queue
            .send(Message::Record(Box::new(record), committed))
            .is_err()
        {
            tracing::error!("the usage writer has stopped; a row is lost");
            return Recorded::NONE;
        }
        Recorded(Some(waiter))
    }

    /// Waits until every row recorded so far is written.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.writer.queue.send(Message::Flush(done)).is_ok() {
            let _ = written.await;
        }
    }

    /// Totals grouped as asked, groups in order.
    pub async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, super::DbError> {
        let mut conditions = Vec::new();
        let mut params = Vec::new();
        let mut condition = |column: &str, op: &str, value: &Option<String>| {
            if let Some(value) = value {
                params.push(Value::Text(value.clone()));
                conditions.push(format!("{column} {op} ${}", params.len()));
            }
        };
        condition("tenant", "=", &query.tenant);
        condition("key_id", "=", &query.key_id);
        condition("day", ">=", &query.from_day);
        condition("day", "<=", &query.to_day);
        let mut keys = query.group_by.clone();
        keys.dedup();
        let columns: Vec<&str> = keys.iter().map(|k| k.column()).collect();
        let mut sql = String::from("SELECT ");
        for column in &columns {
            sql.push_str(column);
            sql.push_str(", ");
        }
        sql.push_str(
            "COUNT(*), CAST(SUM(prompt_tokens) AS TEXT), CAST(SUM(completion_tokens) AS TEXT), \
             CAST(SUM(cost_pico) AS TEXT) FROM usage_ledger",
        );
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        if !columns.is_empty() {
            let list = columns.join(", ");
            sql.push_str(&format!(" GROUP BY {list} ORDER BY {list}"));
        }
        let rows = self.db.query_dynamic(sql, params).await?;
        let count = |v: &Value| v.wide().map_or(0, |n| n.clamp(0, u64::MAX as i128) as u64);
        Ok(rows
            .iter()
            .map(|row| {
                let n = keys.len();
                UsageRow {
                    group: keys
                        .iter()
                        .zip(row)
                        .map(|(k, v)| (k.name(), v.text().unwrap_or_default().to_string()))
                        .collect(),
                    requests: count(&row[n]),
                    prompt_tokens: count(&row[n + 1]),
                    completion_tokens: count(&row[n + 2]),
                    cost: Usd(count(&row[n + 3])),
                }
            })
            // An empty ledger still sums to one row of zeros when ungrouped.
            .filter(|row| row.requests > 0 || !keys.is_empty())
            .collect())
    }

    /// What `tenant` has spent since `since_ms`.
    pub async fn spent_since(&self, tenant: &str, since_ms: i64) -> Result<Usd, super::DbError> {
        let rows = self
            .db
            .query(
                "SELECT CAST(SUM(cost_pico) AS TEXT) FROM usage_ledger \
                 WHERE tenant = $1 AND ts_ms >= $2",
                vec![tenant.into(), since_ms.into()],
            )
            .await?;
        let pico = rows.first().and_then(|r| r[0].wide()).unwrap_or(0);
        Ok(Usd(pico.clamp(0, u64::MAX as i128) as u64))
    }
}
