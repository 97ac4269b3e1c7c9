//! Batches across real `qpai serve` processes, routing to the scripted
//! upstream on loopback: a server killed with SIGKILL mid-batch and
//! started again finishes the batch with one output line per custom_id and
//! one ledger row per line; two servers on one PostgreSQL share a batch's
//! lines (`FOR UPDATE SKIP LOCKED` claims).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use qpai::ledger::Db;
use serde_json::{Value, json};

use crate::batches::{chat_line, jsonl};
use crate::common::{KillOnDrop, free_port, wait_ready};
use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::files::{BOUNDARY, form};
use crate::router_serve::{key, serve};

/// A catalog with one remote deployment on the scripted upstream.
fn write_catalog(dir: &Path, upstream: &FakeUpstream) -> String {
    upstream.write_catalog(
        dir,
        "steady",
        "input_usd_per_1m = 1\noutput_usd_per_1m = 2\nbatch_discount = 0.5\nbatch_concurrency = 4",
    )
}

struct Server {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Server {
    async fn post(&self, path: &str, content_type: &str, body: Vec<u8>) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap()
    }

    async fn batch(&self, id: &str) -> Value {
        let text = self
            .get(&format!("/v1/batches/{id}"))
            .await
            .text()
            .await
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Uploads `lines` and starts a chat batch over them.
    async fn start_batch(&self, lines: &[Value]) -> String {
        let upload = form(&[("purpose", "batch")], Some(("in.jsonl", &jsonl(lines))));
        let file = self
            .post(
                "/v1/files",
                &format!("multipart/form-data; boundary={BOUNDARY}"),
                upload,
            )
            .await;
        let batch = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"});
        let batch = self
            .post(
                "/v1/batches",
                "application/json",
                batch.to_string().into_bytes(),
            )
            .await;
        batch["id"].as_str().unwrap().to_string()
    }

    async fn wait(&self, id: &str, until: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let batch = self.batch(id).await;
            if until(&batch) {
                return batch;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "stuck: {batch}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The output file's lines: custom_id -> request_id.
    async fn output(&self, batch: &Value) -> HashMap<String, String> {
        let id = batch["output_file_id"].as_str().unwrap();
        let text = self
            .get(&format!("/v1/files/{id}/content"))
            .await
            .text()
            .await
            .unwrap();
        let mut lines = HashMap::new();
        for line in text.lines() {
            let line: Value = serde_json::from_str(line).unwrap();
            assert_eq!(line["response"]["status_code"], 200, "{line}");
            let custom_id = line["custom_id"].as_str().unwrap().to_string();
            let request_id = line["response"]["request_id"].as_str().unwrap().to_string();
            assert!(
                lines.insert(custom_id, request_id).is_none(),
                "one line per custom_id"
            );
        }
        lines
    }
}

async fn start_server(dir: &Path, extra: &[&str], key: &str) -> (KillOnDrop, Server) {
    let port = free_port();
    let child = serve(dir, port, extra, &[]);
    tokio::task::spawn_blocking(move || wait_ready(port))
        .await
        .unwrap();
    let server = Server {
        base: format!("http://127.0.0.1:{port}"),
        key: key.to_string(),
        http: reqwest::Client::new(),
    };
    (child, server)
}

/// Usage rows (a batch's, or all): request id -> rows under it.
pub async fn usage_rows(database: &str, batch: Option<&str>) -> HashMap<String, usize> {
    let db = Db::open(database).await.unwrap();
    let rows = match batch {
        Some(batch) => db.query(
            "SELECT request_id FROM usage_ledger WHERE batch_id = $1",
            vec![batch.into()],
        ),
        None => db.query("SELECT request_id FROM usage_ledger", vec![]),
    }
    .await
    .unwrap();
    let mut counts = HashMap::new();
    for row in rows {
        *counts
            .entry(row[0].text().unwrap().to_string())
            .or_insert(0) += 1;
    }
    counts
}

/// Drops a database made by `fresh_postgres`.
pub async fn drop_postgres(database: &str) {
    let admin = std::env::var("QPAI_TEST_DATABASE_URL").unwrap();
    let name = database.rsplit('/').next().unwrap();
    Db::open(&admin)
        .await
        .unwrap()
        .execute_text(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
}

/// A database of its own on the test PostgreSQL server (named from
/// `prefix`); None, and the test is skipped, when there is no server
/// (never on CI).
pub async fn fresh_postgres(prefix: &str) -> Option<String> {
    let Some(url) = std::env::var("QPAI_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the PostgreSQL tests: set QPAI_TEST_DATABASE_URL"
        );
        eprintln!("QPAI_TEST_DATABASE_URL is not set: a PostgreSQL test is skipped");
        return None;
    };
    let admin = Db::open(&url).await.unwrap();
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute_text(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (server, _) = url
        .rsplit_once('/')
        .expect("a PostgreSQL URL names its database");
    Some(format!("{server}/{name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_batch_finishes_it_after_a_restart_with_nothing_lost_or_billed_twice() {
    let upstream = FakeUpstream::start().await;
    upstream.set(
        "steady",
        Behaviour::SlowAnswer {
            completion_tokens: 3,
            ms: 200,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let catalog = write_catalog(dir.path(), &upstream);
    let acme = key(dir.path(), &["--tenant", "acme"]);
    let args = ["--router-config", catalog.as_str(), "--batch-lease-s", "3"];
    let (mut first, server) = start_server(dir.path(), &args, &acme).await;
    let lines: Vec<Value> = (0..40)
        .map(|i| chat_line(&format!("k{i}"), "steady"))
        .collect();
    let id = server.start_batch(&lines).await;
    server
        .wait(&id, |b| {
            b["request_counts"]["completed"].as_u64() >= Some(8)
        })
        .await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let sent_before = upstream.requests("steady");

    let (_second, server) = start_server(dir.path(), &args, &acme).await;
    let batch = server.wait(&id, |b| b["status"] == "completed").await;
    assert_eq!(
        batch["request_counts"],
        json!({"total": 40, "completed": 40, "failed": 0})
    );
    let output = server.output(&batch).await;
    assert_eq!(output.len(), 40);
    let database = format!("sqlite://{}", dir.path().join("qpai.db").display());
    let rows = usage_rows(&database, Some(&id)).await;
    assert_eq!(rows.len(), 40, "one usage row per line");
    assert!(rows.values().all(|&n| n == 1));
    let billed: HashSet<&String> = rows.keys().collect();
    let answered: HashSet<&String> = output.values().collect();
    assert_eq!(
        billed, answered,
        "the ledger matches the output line for line"
    );
    // Lines in flight at the kill ran again after the restart (their first
    // answers were never kept, nor billed).
    let sent = upstream.requests("steady");
    eprintln!("upstream requests: {sent_before} before the kill, {sent} in all, for 40 lines");
    assert!(sent >= 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_share_a_batch() {
    // A database of its own, so no other test's batches are in it.
    let Some(database) = fresh_postgres("qpai_batches").await else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    upstream.set(
        "steady",
        Behaviour::SlowAnswer {
            completion_tokens: 3,
            ms: 100,
        },
    );
    // One data dir: the servers share their file store as well as the
    // database (on separate machines: a shared volume).
    let one = tempfile::tempdir().unwrap();
    let catalog = write_catalog(one.path(), &upstream);
    let acme = key(
        one.path(),
        &["--database-url", &database, "--tenant", "acme"],
    );
    let args = [
        "--router-config",
        catalog.as_str(),
        "--database-url",
        database.as_str(),
    ];
    let (a, server_a) = start_server(one.path(), &args, &acme).await;
    let (b, server_b) = start_server(one.path(), &args, &acme).await;
    let lines: Vec<Value> = (0..60)
        .map(|i| chat_line(&format!("s{i}"), "steady"))
        .collect();
    let id = server_a.start_batch(&lines).await;
    // Either server answers for it: they share the database.
    let batch = server_b.wait(&id, |b| b["status"] == "completed").await;
    let output = server_b.output(&batch).await;
    assert_eq!(output.len(), 60);
    let rows = usage_rows(&database, Some(&id)).await;
    assert_eq!(rows.len(), 60);
    assert!(rows.values().all(|&n| n == 1));
    assert_eq!(upstream.requests("steady"), 60, "no line ran twice");
    let db = Db::open(&database).await.unwrap();
    let owners = db
        .query(
            "SELECT lease_owner, COUNT(*) FROM batch_lines WHERE batch_id = $1 GROUP BY 1",
            vec![id.as_str().into()],
        )
        .await
        .unwrap();
    let shares: Vec<i64> = owners.iter().filter_map(|r| r[1].int()).collect();
    assert_eq!(shares.len(), 2, "both servers ran lines: {owners:?}");
    drop((db, a, b));
    drop_postgres(&database).await;
}
