//! The one database under keys, tenants and the usage ledger: a SQLite file
//! (the default, in the data dir) or PostgreSQL (`--database-url
//! postgres://...`). Both run the same SQL: `$1`-numbered parameters, BIGINT
//! and TEXT columns, sums read back as text so no driver rounds them. The
//! schema is versioned and migrated when the database opens.

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rustls_platform_verifier::BuilderVerifierExt;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl Value {
    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(*v),
            Value::Text(t) => t.parse().ok(),
            Value::Null => None,
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            Value::Text(t) => Some(t),
            _ => None,
        }
    }

    /// Integers written as text: how sums are read back exactly.
    pub fn wide(&self) -> Option<i128> {
        match self {
            Value::Int(v) => Some(i128::from(*v)),
            Value::Text(t) => t.parse().ok(),
            Value::Null => None,
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

pub type Row = Vec<Value>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {}", postgres_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Other(String),
}

/// A PostgreSQL error with the server's message ("db error" alone says
/// nothing).
fn postgres_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{error}: {}", db.message()),
        None => error.to_string(),
    }
}

/// A statement and its parameters, for a transaction.
pub type Statement = (&'static str, Vec<Value>);

#[derive(Clone)]
pub enum Db {
    /// One connection; `turn` lets one call at a time onto the blocking
    /// pool, so waiting callers wait as tasks, not as threads blocked on
    /// the connection's lock (under load, hundreds of them).
    Sqlite {
        conn: Arc<Mutex<rusqlite::Connection>>,
        turn: Arc<tokio::sync::Semaphore>,
    },
    /// Statements share one pipelined connection; transactions take a
    /// second one of their own, so no other statement lands inside them;
    /// a third, pipelined too, commits without waiting for the disk.
    Postgres {
        shared: Arc<tokio_postgres::Client>,
        transactions: Arc<tokio::sync::Mutex<tokio_postgres::Client>>,
        unsynced: Arc<tokio_postgres::Client>,
    },
}

/// A PostgreSQL connection. TLS follows the URL's `sslmode` (`prefer` by
/// default: TLS when the server offers it; `require`; `disable`), with the
/// server's certificate checked against the system's trust store.
async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, DbError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_platform_verifier())
        .map_err(|e| DbError::Other(format!("TLS for PostgreSQL: {e}")))?
        .with_no_client_auth();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
    let (client, connection) = tokio_postgres::connect(url, tls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::error!(%error, "a PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// The PostgreSQL advisory lock key held while migrating ("qpai" in ASCII).
const MIGRATION_LOCK: i64 = 0x7170_6169;

/// The schema, one entry per version; each runs once, in a transaction.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("schema/0001_ledger.sql")),
    (2, include_str!("schema/0002_files.sql")),
    (3, include_str!("schema/0003_batches.sql")),
    (4, include_str!("schema/0004_prompts.sql")),
    (5, include_str!("schema/0005_evals.sql")),
    (6, include_str!("schema/0006_experiments.sql")),
    (7, include_str!("schema/0007_budget_holds.sql")),
    (8, include_str!("schema/0008_tenant_limits.sql")),
];

impl Db {
    /// Opens (creating when needed) and migrates the database at `url`:
    /// `postgres://...` / `postgresql://...`, `sqlite://PATH` or a path.
    pub async fn open(url: &str) -> anyhow::Result<Db> {
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let unsynced = pg_connect(url).await?;
            unsynced
                .batch_execute("SET synchronous_commit TO OFF")
                .await?;
            Db::Postgres {
                shared: Arc::new(pg_connect(url).await?),
                transactions: Arc::new(tokio::sync::Mutex::new(pg_connect(url).await?)),
                unsynced: Arc::new(unsynced),
            }
        } else {
            let path = url.strip_prefix("sqlite://").unwrap_or(url).to_string();
            let opened = path.clone();
            let connection =
                tokio::task::spawn_blocking(move || open_sqlite(Path::new(&opened))).await??;
            let connection = Arc::new(Mutex::new(connection));
            checkpoint_in_background(&path, &connection);
            Db::Sqlite {
                conn: connection,
                turn: Arc::new(tokio::sync::Semaphore::new(1)),
            }
        };
        db.migrate().await?;
        Ok(db)
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "sqlite",
            Db::Postgres { .. } => "postgres",
        }
    }

    async fn migrate(&self) -> Result<(), DbError> {
        // Processes starting together migrate one at a time: on PostgreSQL
        // under a session lock on the shared connection (which runs the
        // migrations); on SQLite in one write transaction taken up front,
        // so the versions read are still true when the migrations run.
        match self {
            Db::Postgres { .. } => {
                self.batch(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
                    .await?;
                let migrated = self.migrate_unlocked(false).await;
                self.batch(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
                    .await?;
                migrated
            }
            Db::Sqlite { .. } => {
                self.batch("BEGIN IMMEDIATE").await?;
                match self.migrate_unlocked(true).await {
                    Ok(()) => self.batch("COMMIT").await,
                    Err(error) => {
                        let _ = self.batch("ROLLBACK").await;
                        Err(error)
                    }
                }
            }
        }
    }

    /// Runs the migrations not yet applied, each in a transaction of its
    /// own unless `in_transaction` (one is open around them all).
    async fn migrate_unlocked(&self, in_transaction: bool) -> Result<(), DbError> {
        self.batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
        )
        .await?;
        let applied: Vec<i64> = self
            .query("SELECT version FROM schema_migrations", vec![])
            .await?
            .iter()
            .filter_map(|row| row[0].int())
            .collect();
        for (version, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            let record = format!(
                "{sql};\nINSERT INTO schema_migrations (version, applied_ms) VALUES ({version}, {})",
                crate::ledger::now_ms()
            );
            if in_transaction {
                self.batch(&record).await?;
            } else {
                self.batch(&format!("BEGIN;\n{record};\nCOMMIT;")).await?;
            }
            tracing::info!(version, backend = self.backend(), "database migrated");
        }
        Ok(())
    }

    /// Runs SQL text without parameters (several statements allowed):
    /// administration, such as creating a database.
    pub async fn execute_text(&self, sql: &str) -> Result<(), DbError> {
        self.batch(sql).await
    }

    /// Runs SQL text without parameters (several statements allowed).
    async fn batch(&self, sql: &str) -> Result<(), DbError> {
        match self {
            Db::Sqlite { conn, turn } => {
                let (conn, sql) = (conn.clone(), sql.to_string());
                blocking(turn, move || Ok(lock(&conn)?.execute_batch(&sql)?)).await
            }
            Db::Postgres { shared, .. } => Ok(shared.batch_execute(sql).await?),
        }
    }

    /// Runs one statement; returns the rows it changed.
    pub async fn execute(&self, sql: &'static str, params: Vec<Value>) -> Result<u64, DbError> {
        match self {
            Db::Sqlite { conn, turn } => {
                let conn = conn.clone();
                blocking(turn, move || {
                    let changed = lock(&conn)?
                        .prepare_cached(&sqlite_sql(sql))?
                        .execute(rusqlite::params_from_iter(params.iter()))?;
                    Ok(changed as u64)
                })
                .await
            }
            Db::Postgres { shared, .. } => Ok(shared.execute(sql, &pg_params(&params)).await?),
        }
    }

    /// Runs one statement whose commit need not survive a crash of the
    /// database server (it is seen by every other connection at once, as
    /// any commit): on PostgreSQL it does not wait for the WAL to reach
    /// the disk. Returns the rows it changed.
    pub async fn execute_unsynced(
        &self,
        sql: &'static str,
        params: Vec<Value>,
    ) -> Result<u64, DbError> {
        match self {
            Db::Sqlite { .. } => self.execute(sql, params).await,
            Db::Postgres { unsynced, .. } => Ok(unsynced.execute(sql, &pg_params(&params)).await?),
        }
    }

    /// Runs a query built at run time (a grouping chosen by the caller, from
    /// fixed column names only).
    pub async fn query_dynamic(
        &self,
        sql: String,
        params: Vec<Value>,
    ) -> Result<Vec<Row>, DbError> {
        match self {
            Db::Sqlite { conn, turn } => {
                let conn = conn.clone();
                blocking(turn, move || sqlite_rows(&*lock(&conn)?, &sql, &params)).await
            }
            Db::Postgres { shared, .. } => {
                let rows = shared.query(sql.as_str(), &pg_params(&params)).await?;
                rows.iter().map(pg_row).collect()
            }
        }
    }

    pub async fn query(&self, sql: &'static str, params: Vec<Value>) -> Result<Vec<Row>, DbError> {
        self.query_dynamic(sql.to_string(), params).await
    }

    /// Runs statements in one transaction: all or none.
    pub async fn transaction(&self, statements: Vec<Statement>) -> Result<(), DbError> {
        self.run_transaction(None, statements).await.map(|_| ())
    }

    /// Runs `guard`; when it changed a row, runs `then` after it, all in
    /// one transaction; when it changed none, changes nothing. Returns
    /// whether the guard changed a row (a claim still held, a state still
    /// as expected).
    pub async fn transaction_when(
        &self,
        guard: Statement,
        then: Vec<Statement>,
    ) -> Result<bool, DbError> {
        self.run_transaction(Some(guard), then).await
    }

    /// One transaction: the guard (when given) must change a row, else
    /// nothing is done and the answer is false.
    async fn run_transaction(
        &self,
        guard: Option<Statement>,
        statements: Vec<Statement>,
    ) -> Result<bool, DbError> {
        match self {
            Db::Sqlite { conn, turn } => {
                let conn = conn.clone();
                blocking(turn, move || {
                    let mut conn = lock(&conn)?;
                    let tx = conn.transaction()?;
                    if let Some((sql, params)) = &guard {
                        let changed = tx
                            .prepare_cached(&sqlite_sql(sql))?
                            .execute(rusqlite::params_from_iter(params.iter()))?;
                        if changed == 0 {
                            return Ok(false);
                        }
                    }
                    for (sql, params) in &statements {
                        tx.prepare_cached(&sqlite_sql(sql))?
                            .execute(rusqlite::params_from_iter(params.iter()))?;
                    }
                    tx.commit()?;
                    Ok(true)
                })
                .await
            }
            Db::Postgres { transactions, .. } => {
                let mut client = transactions.lock().await;
                let tx = client.transaction().await?;
                if let Some((sql, params)) = &guard
                    && tx.execute(*sql, &pg_params(params)).await? == 0
                {
                    return Ok(false);
                }
                for (sql, params) in &statements {
                    tx.execute(*sql, &pg_params(params)).await?;
                }
                tx.commit().await?;
                Ok(true)
            }
        }
    }
}

fn open_sqlite(path: &Path) -> Result<rusqlite::Connection, DbError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| DbError::Other(format!("creating {}: {e}", parent.display())))?;
    }
    let conn = rusqlite::Connection::open(path)?;
    // WAL lets `qpai usage` / `qpai keys` read and write while a server runs.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

/// Moves the WAL's pages into the database file once a second from a
/// thread and connection of its own. Checkpoints wait for the disk (they
/// sync the database file); left to the connection that commits, one
/// commit in a thousand pages would wait for it, and with it an answer
/// waiting for its usage row. The thread ends with the database.
fn checkpoint_in_background(path: &str, connection: &Arc<Mutex<rusqlite::Connection>>) {
    if let Ok(conn) = connection.lock() {
        // 0: no checkpoint on commit.
        let _ = conn.pragma_update(None, "wal_autocheckpoint", 0);
    }
    let alive = Arc::downgrade(connection);
    let path = path.to_string();
    let spawned = std::thread::Builder::new()
        .name("qpai-sqlite-checkpoint".into())
        .spawn(move || {
            let Ok(checkpointer) = rusqlite::Connection::open(&path) else {
                return;
            };
            let _ = checkpointer.busy_timeout(std::time::Duration::from_secs(1));
            while alive.strong_count() > 0 {
                std::thread::sleep(std::time::Duration::from_secs(1));
                if let Err(error) =
                    checkpointer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::debug!(%error, "WAL checkpoint");
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no checkpoint thread: the committing connection checkpoints");
        if let Ok(conn) = connection.lock() {
            let _ = conn.pragma_update(None, "wal_autocheckpoint", 1000);
        }
    }
}

/// `$1` (PostgreSQL) as `?1` (SQLite): SQLite would number `$N` names by
/// first appearance instead of by N.
fn sqlite_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

fn lock(
    conn: &Mutex<rusqlite::Connection>,
) -> Result<std::sync::MutexGuard<'_, rusqlite::Connection>, DbError> {
    conn.lock()
        .map_err(|_| DbError::Other("the SQLite connection was poisoned".into()))
}

/// `work` on the blocking pool once it is this connection's turn; the turn
/// ends with the work, even when its caller has gone.
async fn blocking<T: Send + 'static>(
    turn: &Arc<tokio::sync::Semaphore>,
    work: impl FnOnce() -> Result<T, DbError> + Send + 'static,
) -> Result<T, DbError> {
    let turn = turn
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| DbError::Other(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let done = work();
        drop(turn);
        done
    })
    .await
    .map_err(|e| DbError::Other(e.to_string()))?
}

fn sqlite_rows(
    conn: &rusqlite::Connection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, DbError> {
    let mut statement = conn.prepare_cached(&sqlite_sql(sql))?;
    let columns = statement.column_count();
    let rows = statement.query_map(rusqlite::params_from_iter(params.iter()), |row| {
        (0..columns)
            .map(|i| {
                Ok(match row.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(v) => Value::Int(v),
                    rusqlite::types::ValueRef::Real(v) => Value::Text(v.to_string()),
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                })
            })
            .collect::<rusqlite::Result<Row>>()
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<Row>>>()?)
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        })
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) if *ty == Type::INT8 => v.to_sql(ty, out),
            Value::Int(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            Value::Int(v) => v.to_string().as_str().to_sql(ty, out),
            Value::Text(t) if *ty == Type::INT8 => t.parse::<i64>()?.to_sql(ty, out),
            Value::Text(t) => t.as_str().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        // The server infers each parameter's type from the statement; the
        // value is written in that type (or refused) above.
        <i64 as ToSql>::accepts(ty) || <i32 as ToSql>::accepts(ty) || <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

fn pg_params(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

fn pg_row(row: &tokio_postgres::Row) -> Result<Row, DbError> {
    (0..row.len())
        .map(|i| {
            let ty = row.columns()[i].type_();
            Ok(if *ty == Type::INT8 {
                row.try_get::<_, Option<i64>>(i)?.into()
            } else if *ty == Type::INT4 {
                row.try_get::<_, Option<i32>>(i)?.map(i64::from).into()
            } else {
                row.try_get::<_, Option<String>>(i)?.into()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_keep_their_numbers_in_sqlite() {
        assert_eq!(
            sqlite_sql("VALUES ($1, $3, $2) WHERE a = '$x'"),
            "VALUES (?1, ?3, ?2) WHERE a = '$x'"
        );
    }

    #[tokio::test]
    async fn sqlite_binds_out_of_order_parameters_by_number() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("t.db").to_str().unwrap())
            .await
            .unwrap();
        let rows = db
            .query_dynamic(
                "SELECT $2, $1, CAST($3 AS TEXT)".into(),
                vec![1.into(), "two".into(), Value::Null],
            )
            .await
            .unwrap();
        assert_eq!(
            rows,
            vec![vec![Value::Text("two".into()), Value::Int(1), Value::Null]]
        );
    }
}
