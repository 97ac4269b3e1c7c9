//! Files, as OpenAI's Files API defines them: a tenant's uploads (batch
//! inputs) and what qpai writes for it (batch outputs). The records live in
//! the ledger database (`files`), the contents in a blob store. A file of
//! another tenant, or one past its expiry, is answered as absent.

pub mod blobs;

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use blobs::{BlobStore, LocalBlobs};

use crate::error::{ApiError, ApiResult};
use crate::ledger::{Db, Ledger, Value, now_ms};

/// The largest file, as OpenAI caps batch input files.
pub const MAX_FILE_BYTES: usize = 200 * 1024 * 1024;
/// The longest file name kept.
const MAX_FILENAME: usize = 255;
/// The expiry a file may be given, in seconds after creation (OpenAI's
/// range: an hour to 30 days).
pub const EXPIRES_AFTER_S: std::ops::RangeInclusive<u64> = 3600..=2_592_000;
/// Files listed per page at most (OpenAI's cap).
pub const MAX_LIST_LIMIT: usize = 10_000;

/// What a file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// A batch's input lines.
    Batch,
    /// A batch's output or error lines (written by qpai).
    BatchOutput,
    /// An eval's dataset.
    Evals,
    UserData,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Batch => "batch",
            Purpose::BatchOutput => "batch_output",
            Purpose::Evals => "evals",
            Purpose::UserData => "user_data",
        }
    }

    pub fn parse(text: &str) -> Option<Purpose> {
        [
            Purpose::Batch,
            Purpose::BatchOutput,
            Purpose::Evals,
            Purpose::UserData,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

/// A file as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: u64,
    /// Seconds since the epoch.
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub filename: String,
    pub purpose: Purpose,
    pub status: &'static str,
}

/// A page of files.
#[derive(Debug, Clone, Serialize)]
pub struct FileList {
    pub object: &'static str,
    pub data: Vec<FileObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// The order of a listing, by creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    Asc,
    #[default]
    Desc,
}

/// A new file.
pub struct NewFile {
    pub filename: String,
    pub purpose: Purpose,
    pub content: Bytes,
    /// Seconds after creation at which the file expires.
    pub expires_after_s: Option<u64>,
}

/// The files of every tenant.
#[derive(Clone)]
pub struct Files {
    db: Db,
    blobs: Arc<dyn BlobStore>,
}

const COLUMNS: &str = "id, filename, purpose, bytes, created_ms, expires_ms";

fn not_found(id: &str) -> ApiError {
    ApiError {
        code: Some("file_not_found"),
        param: Some("file_id".into()),
        ..ApiError::not_found(format!("No file with id '{id}'."))
    }
}

fn file_object(row: &[Value]) -> ApiResult<FileObject> {
    let text = |i: usize| row.get(i).and_then(Value::text).map(str::to_string);
    let int = |i: usize| row.get(i).and_then(Value::int);
    let broken = || ApiError::internal("a files row that cannot be read");
    let purpose = text(2)
        .and_then(|p| Purpose::parse(&p))
        .ok_or_else(broken)?;
    Ok(FileObject {
        id: text(0).ok_or_else(broken)?,
        object: "file",
        bytes: int(3).ok_or_else(broken)? as u64,
        created_at: int(4).ok_or_else(broken)? / 1000,
        expires_at: int(5).map(|ms| ms / 1000),
        filename: text(1).ok_or_else(broken)?,
        purpose,
        status: "processed",
    })
}

impl Files {
    pub fn new(ledger: &Ledger, blobs: Arc<dyn BlobStore>) -> Self {
        Self {
            db: ledger.db().clone(),
            blobs,
        }
    }

    /// Stores `file` for `tenant`: the content first, then its record, so
    /// that a record always has its content.
    pub async fn create(&self, tenant: &str, file: NewFile) -> ApiResult<FileObject> {
        let id = format!("file-{}", uuid::Uuid::new_v4().simple());
        self.store(tenant, id, file).await
    }

    /// Stores a file qpai writes under a fixed `id` (a batch's output):
    /// writing it again, after a restart, leaves one file.
    pub async fn write_as(&self, tenant: &str, id: &str, file: NewFile) -> ApiResult<FileObject> {
        self.store(tenant, id.to_string(), file).await
    }

    async fn store(&self, tenant: &str, id: String, file: NewFile) -> ApiResult<FileObject> {
        if file.content.len() > MAX_FILE_BYTES {
            return Err(ApiError::invalid_param(
                "file",
                format!(
                    "The file has {} bytes; the limit is {MAX_FILE_BYTES}.",
                    file.content.len()
                ),
            ));
        }
        if file.content.is_empty() {
            return Err(ApiError::invalid_param("file", "The file is empty."));
        }
        let filename: String = file.filename.chars().take(MAX_FILENAME).collect();
        if filename.trim().is_empty() {
            return Err(ApiError::invalid_param("file", "The file needs a name."));
        }
        if let Some(seconds) = file.expires_after_s
            && !EXPIRES_AFTER_S.contains(&seconds)
        {
            return Err(ApiError::invalid_param(
                "expires_after.seconds",
                format!(
                    "A file expires from {} to {} seconds after it is created.",
                    EXPIRES_AFTER_S.start(),
                    EXPIRES_AFTER_S.end()
                ),
            ));
        }
        let created_ms = now_ms();
        let expires_ms = file.expires_after_s.map(|s| created_ms + s as i64 * 1000);
        let sha256 = hex::encode(Sha256::digest(&file.content));
        let bytes = file.content.len() as i64;
        self.blobs
            .put(&id, file.content)
            .await
            .map_err(|e| ApiError::internal(format!("storing a file: {e}")))?;
        self.db
            .execute(
                "INSERT INTO files (id, tenant, filename, purpose, bytes, sha256, created_ms, expires_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
                vec![
                    id.as_str().into(),
                    tenant.into(),
                    filename.as_str().into(),
                    file.purpose.as_str().into(),
                    bytes.into(),
                    sha256.into(),
                    created_ms.into(),
                    expires_ms.map_or(Value::Null, Value::Int),
                ],
            )
            .await
            .map_err(ApiError::internal)?;
        Ok(FileObject {
            id,
            object: "file",
            bytes: bytes as u64,
            created_at: created_ms / 1000,
            expires_at: expires_ms.map(|ms| ms / 1000),
            filename,
            purpose: file.purpose,
            status: "processed",
        })
    }

    /// `tenant`'s file `id` (absent when another tenant's or expired).
    pub async fn get(&self, tenant: &str, id: &str) -> ApiResult<FileObject> {
        let rows = self
            .db
            .query_dynamic(
                format!(
                    "SELECT {COLUMNS} FROM files WHERE id = $1 AND tenant = $2 \
                     AND (expires_ms IS NULL OR expires_ms > $3)"
                ),
                vec![id.into(), tenant.into(), now_ms().into()],
            )
            .await
            .map_err(ApiError::internal)?;
        rows.first()
            .map(|row| file_object(row))
            .unwrap_or_else(|| Err(not_found(id)))
    }

    /// The content of `tenant`'s file `id`, checked against its digest.
    pub async fn content(&self, tenant: &str, id: &str) -> ApiResult<Bytes> {
        self.get(tenant, id).await?;
        let rows = self
            .db
            .query("SELECT sha256 FROM files WHERE id = $1", vec![id.into()])
            .await
            .map_err(ApiError::internal)?;
        let expected = rows.first().and_then(|r| r[0].text().map(str::to_string));
        let content = self
            .blobs
            .get(id)
            .await
            .map_err(|e| ApiError::internal(format!("reading file {id}: {e}")))?;
        if expected.as_deref() != Some(hex::encode(Sha256::digest(&content)).as_str()) {
            return Err(ApiError::internal(format!(
                "file {id}: its content does not match its digest"
            )));
        }
        Ok(content)
    }

    /// A page of `tenant`'s files, by creation, after the file `after`.
    pub async fn list(
        &self,
        tenant: &str,
        purpose: Option<Purpose>,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> ApiResult<FileList> {
        if limit == 0 || limit > MAX_LIST_LIMIT {
            return Err(ApiError::invalid_param(
                "limit",
                format!("'limit' must be from 1 to {MAX_LIST_LIMIT}."),
            ));
        }
        let mut sql = format!(
            "SELECT {COLUMNS} FROM files WHERE tenant = $1 AND (expires_ms IS NULL OR expires_ms > $2)"
        );
        let mut params: Vec<Value> = vec![tenant.into(), now_ms().into()];
        let (compare, direction) = match order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        if let Some(after) = after {
            let created_ms = self.created_ms(tenant, after).await.map_err(|mut e| {
                e.param = Some("after".into());
                e
            })?;
            let n = params.len();
            sql.push_str(&format!(
                " AND (created_ms {compare} ${} OR (created_ms = ${} AND id {compare} ${}))",
                n + 1,
                n + 1,
                n + 2
            ));
            params.push(created_ms.into());
            params.push(after.into());
        }
        if let Some(purpose) = purpose {
            sql.push_str(&format!(" AND purpose = ${}", params.len() + 1));
            params.push(purpose.as_str().into());
        }
        sql.push_str(&format!(
            " ORDER BY created_ms {direction}, id {direction} LIMIT {}",
            limit + 1
        ));
        let rows = self
            .db
            .query_dynamic(sql, params)
            .await
            .map_err(ApiError::internal)?;
        let mut data = rows
            .iter()
            .map(|row| file_object(row))
            .collect::<ApiResult<Vec<_>>>()?;
        let has_more = data.len() > limit;
        data.truncate(limit);
        Ok(FileList {
            object: "list",
            first_id: data.first().map(|f| f.id.clone()),
            last_id: data.last().map(|f| f.id.clone()),
            data,
            has_more,
        })
    }

    /// When `tenant`'s file `id` was created (the listing's cursor).
    async fn created_ms(&self, tenant: &str, id: &str) -> ApiResult<i64> {
        let rows = self
            .db
            .query(
                "SELECT created_ms FROM files WHERE id = $1 AND tenant = $2",
                vec![id.into(), tenant.into()],
            )
            .await
            .map_err(ApiError::internal)?;
        rows.first()
            .and_then(|row| row[0].int())
            .ok_or_else(|| not_found(id))
    }

    /// Deletes up to `limit` files past their expiry, record then
    /// content; returns how many. (They are hidden from the API already.)
    pub async fn sweep_expired(&self, limit: usize) -> ApiResult<usize> {
        let rows = self
            .db
            .query(
                "SELECT id FROM files WHERE expires_ms <= $1 ORDER BY expires_ms LIMIT $2",
                vec![now_ms().into(), (limit as i64).into()],
            )
            .await
            .map_err(ApiError::internal)?;
        let mut swept = 0;
        for id in rows.iter().filter_map(|r| r[0].text()) {
            let removed = self
                .db
                .execute("DELETE FROM files WHERE id = $1", vec![id.into()])
                .await
                .map_err(ApiError::internal)?;
            if removed == 1 {
                self.blobs
                    .delete(id)
                    .await
                    .map_err(|e| ApiError::internal(format!("deleting file {id}: {e}")))?;
                swept += 1;
            }
        }
        Ok(swept)
    }

    /// Deletes `tenant`'s file `id`: its record, then its content.
    pub async fn delete(&self, tenant: &str, id: &str) -> ApiResult<()> {
        let removed = self
            .db
            .execute(
                "DELETE FROM files WHERE id = $1 AND tenant = $2",
                vec![id.into(), tenant.into()],
            )
            .await
            .map_err(ApiError::internal)?;
        if removed == 0 {
            return Err(not_found(id));
        }
        self.blobs
            .delete(id)
            .await
            .map_err(|e| ApiError::internal(format!("deleting file {id}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the test PostgreSQL when there is one (scripts/test.sh), else
    /// SQLite; tenants get fresh names, so runs do not meet.
    async fn files(dir: &std::path::Path) -> (Files, Ledger) {
        let url = std::env::var("QPAI_TEST_DATABASE_URL")
            .unwrap_or_else(|_| format!("sqlite://{}", dir.join("qpai.db").display()));
        let ledger = Ledger::open(&url).await.unwrap();
        let files = Files::new(&ledger, Arc::new(LocalBlobs::new(dir.join("files"))));
        (files, ledger)
    }

    fn jsonl(name: &str, lines: usize) -> NewFile {
        NewFile {
            filename: name.into(),
            purpose: Purpose::Batch,
            content: Bytes::from("{\"custom_id\": \"a\"}\n".repeat(lines)),
            expires_after_s: None,
        }
    }

    fn tenant(name: &str) -> String {
        format!("{name}-{}", uuid::Uuid::new_v4().simple())
    }

    #[tokio::test]
    async fn a_tenant_stores_lists_reads_and_deletes_its_own_files() {
        let (acme, globex) = (tenant("acme"), tenant("globex"));
        let (acme, globex) = (acme.as_str(), globex.as_str());
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = files(dir.path()).await;
        let mut ids = Vec::new();
        for i in 0..5 {
            let file = files
                .create(acme, jsonl(&format!("in{i}.jsonl"), i + 1))
                .await
                .unwrap();
            assert_eq!(
                (file.object, file.purpose, file.status),
                ("file", Purpose::Batch, "processed")
            );
            assert_eq!(file.bytes as usize, 19 * (i + 1));
            ids.push(file.id);
        }
        let other = files
            .create(globex, jsonl("theirs.jsonl", 1))
            .await
            .unwrap();
        assert_eq!(files.content(acme, &ids[2]).await.unwrap().len(), 19 * 3);

        // Pages, newest first (files made in one millisecond are ordered
        // by id): two pages make the whole listing, nothing twice.
        let all = files.list(acme, None, None, 10, Order::Desc).await.unwrap();
        let all: Vec<String> = all.data.into_iter().map(|f| f.id).collect();
        let mut sorted = all.clone();
        sorted.sort();
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(sorted, expected, "the tenant's five files only");
        let page = files.list(acme, None, None, 2, Order::Desc).await.unwrap();
        assert!(page.has_more);
        let rest = files
            .list(acme, None, page.last_id.as_deref(), 10, Order::Desc)
            .await
            .unwrap();
        assert!(!rest.has_more);
        let paged: Vec<String> = page
            .data
            .iter()
            .chain(&rest.data)
            .map(|f| f.id.clone())
            .collect();
        assert_eq!(paged, all);
        let oldest_first = files.list(acme, None, None, 10, Order::Asc).await.unwrap();
        let reversed: Vec<String> = oldest_first.data.into_iter().rev().map(|f| f.id).collect();
        assert_eq!(reversed, all);
        let after_oldest = files
            .list(acme, None, Some(&all[4]), 10, Order::Asc)
            .await
            .unwrap();
        assert_eq!(after_oldest.data.len(), 4);
        let outputs = files
            .list(acme, Some(Purpose::BatchOutput), None, 10, Order::Asc)
            .await
            .unwrap();
        assert!(outputs.data.is_empty());

        // Another tenant's file is absent, in every way.
        let missing = files.get(acme, &other.id).await.unwrap_err();
        assert_eq!(
            (missing.code, missing.param.as_deref()),
            (Some("file_not_found"), Some("file_id"))
        );
        assert!(files.content(acme, &other.id).await.is_err());
        assert!(files.delete(acme, &other.id).await.is_err());
        let cursor = files
            .list(acme, None, Some(&other.id), 10, Order::Asc)
            .await
            .unwrap_err();
        assert_eq!(cursor.param.as_deref(), Some("after"));

        files.delete(acme, &ids[0]).await.unwrap();
        assert!(files.get(acme, &ids[0]).await.is_err());
        assert!(!dir.path().join("files").join(&ids[0]).exists());
        assert_eq!(
            files.get(globex, &other.id).await.unwrap().filename,
            "theirs.jsonl"
        );
    }

    #[tokio::test]
    async fn bad_files_are_refused_and_expired_ones_are_gone() {
        let acme = tenant("acme");
        let acme = acme.as_str();
        let dir = tempfile::tempdir().unwrap();
        let (files, ledger) = files(dir.path()).await;
        let empty = NewFile {
            content: Bytes::new(),
            ..jsonl("empty.jsonl", 1)
        };
        assert_eq!(
            files
                .create(acme, empty)
                .await
                .unwrap_err()
                .param
                .as_deref(),
            Some("file")
        );
        let too_soon = NewFile {
            expires_after_s: Some(60),
            ..jsonl("soon.jsonl", 1)
        };
        let refused = files.create(acme, too_soon).await.unwrap_err();
        assert_eq!(refused.param.as_deref(), Some("expires_after.seconds"));
        let kept = NewFile {
            expires_after_s: Some(3600),
            ..jsonl("kept.jsonl", 1)
        };
        let kept = files.create(acme, kept).await.unwrap();
        assert_eq!(kept.expires_at, Some(kept.created_at + 3600));
        // A blob changed behind qpai's back is not served.
        std::fs::write(dir.path().join("files").join(&kept.id), b"tampered").unwrap();
        assert_eq!(
            files.content(acme, &kept.id).await.unwrap_err().code,
            Some("internal_error")
        );
        // Once its time is up, the file is absent.
        ledger
            .db()
            .execute(
                "UPDATE files SET expires_ms = $1 WHERE id = $2",
                vec![(now_ms() - 1).into(), kept.id.as_str().into()],
            )
            .await
            .unwrap();
        assert!(files.get(acme, &kept.id).await.is_err());
        assert!(
            files
                .list(acme, None, None, 10, Order::Asc)
                .await
                .unwrap()
                .data
                .is_empty()
        );
        // The sweeper deletes it: record and content.
        assert!(files.sweep_expired(1000).await.unwrap() >= 1);
        assert!(files.blobs.get(&kept.id).await.is_err());
        let left = ledger
            .db()
            .query(
                "SELECT id FROM files WHERE id = $1",
                vec![kept.id.as_str().into()],
            )
            .await
            .unwrap();
        assert!(left.is_empty());
    }
}
