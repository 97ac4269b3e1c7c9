//! `/v1/batches` end to end, in process: input files uploaded over HTTP,
//! the batch runner driving every line through the gateway (the scripted
//! upstream of the router tests, and qpai's own model), output and error
//! files read back, and the ledger checked line for line against them.
//! Validation, cancel, expiry and budgets too. A killed server and two
//! servers sharing one PostgreSQL are in batch_processes.rs.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use axum::http::StatusCode;
use qpai::batches::runner::{RunnerConfig, RunnerHandle, spawn};
use qpai::money::Usd;
use serde_json::{Value, json};

use crate::common::CHAT_MODEL;
use crate::fake_upstream::{Behaviour, PROMPT_TOKENS};
use crate::files::{form, upload};
use crate::router::{RouterApp, call, keys, router_app_on};

pub fn quick_runner(r: &RouterApp) -> RunnerHandle {
    spawn(
        r.batches.clone(),
        r.gateway.clone(),
        RunnerConfig {
            concurrency: 8,
            lease: Duration::from_secs(5),
            tick: Duration::from_millis(50),
        },
    )
}

pub fn chat_line(id: &str, model: &str) -> Value {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": format!("Name a colour for {id}.")}]}})
}

pub fn jsonl(lines: &[Value]) -> Vec<u8> {
    lines
        .iter()
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .into_bytes()
}

async fn upload_input(r: &RouterApp, key: &str, content: &[u8]) -> String {
    let (status, file) = upload(
        r,
        key,
        form(&[("purpose", "batch")], Some(("input.jsonl", content))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{file}");
    file["id"].as_str().unwrap().to_string()
}

async fn create(r: &RouterApp, key: &str, body: Value) -> (StatusCode, Value) {
    let answer = call(&r.app, "POST", "/v1/batches", Some(key), Some(body)).await;
    (answer.status, answer.json())
}

async fn start_batch(r: &RouterApp, key: &str, endpoint: &str, lines: &[Value]) -> String {
    let file = upload_input(r, key, &jsonl(lines)).await;
    let (status, batch) = create(
        r,
        key,
        json!({"input_file_id": file, "endpoint": endpoint, "completion_window": "24h",
            "metadata": {"site": "planters"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["metadata"]["site"], "planters");
    batch["id"].as_str().unwrap().to_string()
}

async fn retrieve(r: &RouterApp, key: &str, id: &str) -> Value {
    let answer = call(&r.app, "GET", &format!("/v1/batches/{id}"), Some(key), None).await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.json()
}

/// Polls until the batch has ended (or `until` says so), for at most 90 s.
async fn wait_for(r: &RouterApp, key: &str, id: &str, until: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..1800 {
        let batch = retrieve(r, key, id).await;
        if until(&batch) {
            return batch;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "batch {id} did not get there: {}",
        retrieve(r, key, id).await
    );
}

async fn wait_ended(r: &RouterApp, key: &str, id: &str) -> Value {
    wait_for(r, key, id, |b| {
        ["completed", "failed", "expired", "cancelled"].contains(&b["status"].as_str().unwrap())
    })
    .await
}

/// The lines of a file, by custom_id.
async fn file_lines(r: &RouterApp, key: &str, id: &Value) -> HashMap<String, Value> {
    let Some(id) = id.as_str() else {
        return HashMap::new();
    };
    let answer = call(
        &r.app,
        "GET",
        &format!("/v1/files/{id}/content"),
        Some(key),
        None,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let mut lines = HashMap::new();
    for text in String::from_utf8(answer.body).unwrap().lines() {
        let line: Value = serde_json::from_str(text).unwrap();
        let custom_id = line["custom_id"].as_str().unwrap().to_string();
        assert!(
            lines.insert(custom_id, line).is_none(),
            "one line per custom_id"
        );
    }
    lines
}

/// The batch's usage rows: request id -> (cost, prompt, completion).
async fn ledger_rows(r: &RouterApp, batch: &str) -> HashMap<String, (Usd, u64, u64)> {
    let rows = r
        .ledger
        .db()
        .query(
            "SELECT request_id, cost_pico, prompt_tokens, completion_tokens FROM usage_ledger \
             WHERE batch_id = $1",
            vec![batch.into()],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            let int = |i: usize| row[i].int().unwrap() as u64;
            (
                row[0].text().unwrap().to_string(),
                (Usd(int(1)), int(2), int(3)),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_routed_batch_runs_every_line_once_billed_at_batch_prices_within_its_cap() {
    let r = router_app_on(None, Default::default()).await;
    let (acme, _, _) = keys(&r, None, None).await;
    r.upstream.set(
        "steady",
        Behaviour::SlowAnswer {
            completion_tokens: 3,
            ms: 60,
        },
    );
    let runner = quick_runner(&r);
    let mut lines: Vec<Value> = (0..20)
        .map(|i| chat_line(&format!("row-{i}"), "steady"))
        .collect();
    // Valid as a line, wrong as a request: answered in the error file.
    lines.push(
        json!({"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "steady", "messages": "not a list"}}),
    );
    let id = start_batch(&r, &acme, "/v1/chat/completions", &lines).await;
    let batch = wait_ended(&r, &acme, &id).await;
    runner.stop().await;

    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["model"], "steady");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 21, "completed": 20, "failed": 1})
    );
    for field in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(
            batch[field].as_i64().unwrap() >= batch["created_at"].as_i64().unwrap(),
            "{field}"
        );
    }
    assert_eq!(batch["usage"]["input_tokens"], 20 * PROMPT_TOKENS);
    assert_eq!(batch["usage"]["output_tokens"], 20 * 3);

    let output = file_lines(&r, &acme, &batch["output_file_id"]).await;
    let errors = file_lines(&r, &acme, &batch["error_file_id"]).await;
    assert_eq!(output.len(), 20);
    let bad = &errors["bad-body"];
    assert_eq!(bad["response"]["status_code"], 400);
    assert_eq!(bad["response"]["body"]["error"]["param"], "messages");

    // The ledger matches the output line for line, at half price.
    let rows = ledger_rows(&r, &id).await;
    assert_eq!(rows.len(), 20, "one row per line that ran");
    let half_price = Usd(PROMPT_TOKENS * 500_000 + 3 * 1_000_000);
    for (custom_id, line) in &output {
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        let response = &line["response"];
        assert_eq!(response["status_code"], 200, "{custom_id}");
        assert_eq!(response["body"]["model"], "m-steady");
        let request_id = response["request_id"].as_str().unwrap();
        assert_eq!(
            rows[request_id],
            (half_price, PROMPT_TOKENS, 3),
            "{custom_id}"
        );
    }
    assert_eq!(r.upstream.requests("steady"), 20, "no line sent twice");
    assert_eq!(
        r.upstream.most_in_flight("steady"),
        2,
        "the deployment's batch_concurrency caps the batch"
    );
}

#[tokio::test]
async fn every_endpoint_batches_and_a_local_line_answers_as_http_does() {
    let r = router_app_on(None, Default::default()).await;
    let (acme, _, _) = keys(&r, None, None).await;
    let runner = quick_runner(&r);
    let prompts = ["Say hello.", "Name a fruit."];
    let lines: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({"custom_id": format!("local-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": CHAT_MODEL, "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": p}]}})
        })
        .collect();
    let chat = start_batch(&r, &acme, "/v1/chat/completions", &lines).await;
    let embed = start_batch(
        &r,
        &acme,
        "/v1/embeddings",
        &[
            json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "embed-remote", "input": ["one", "two"]}}),
        ],
    )
    .await;
    let text = start_batch(
        &r,
        &acme,
        "/v1/completions",
        &[
            json!({"custom_id": "t", "method": "POST", "url": "/v1/completions",
            "body": {"model": "texter", "prompt": "Once", "max_tokens": 3}}),
        ],
    )
    .await;

    let batch = wait_ended(&r, &acme, &chat).await;
    assert_eq!(batch["status"], "completed", "{batch}");
    let output = file_lines(&r, &acme, &batch["output_file_id"]).await;
    for (i, line) in lines.iter().enumerate() {
        let live = call(
            &r.app,
            "POST",
            "/v1/chat/completions",
            Some(&acme),
            Some(line["body"].clone()),
        )
        .await;
        assert_eq!(live.status, StatusCode::OK);
        let batched = &output[&format!("local-{i}")]["response"]["body"];
        assert_eq!(
            batched["choices"][0]["message"]["content"],
            live.json()["choices"][0]["message"]["content"],
            "greedy: the batch line and the live request take the same path"
        );
        assert_eq!(batched["usage"], live.json()["usage"]);
    }
    let rows = ledger_rows(&r, &chat).await;
    assert_eq!(rows.len(), 2);

    let batch = wait_ended(&r, &acme, &embed).await;
    let output = file_lines(&r, &acme, &batch["output_file_id"]).await;
    assert_eq!(
        output["e"]["response"]["body"]["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(batch["usage"]["input_tokens"], PROMPT_TOKENS);
    let batch = wait_ended(&r, &acme, &text).await;
    let output = file_lines(&r, &acme, &batch["output_file_id"]).await;
    assert_eq!(output["t"]["response"]["body"]["object"], "text_completion");
    runner.stop().await;
}

#[tokio::test]
async fn bad_batches_get_clear_errors_and_tenants_stay_apart() {
    let r = router_app_on(None, Default::default()).await;
    let (acme, globex, _) = keys(&r, None, None).await;
    let runner = quick_runner(&r);
    let good = upload_input(&r, &acme, &jsonl(&[chat_line("a", "steady")])).await;
    let request = |changes: Value| {
        let mut body = json!({"input_file_id": good, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"});
        for (k, v) in changes.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let too_many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (changes, status, param) in [
        (json!({"endpoint": "/v1/responses"}), 400, "endpoint"),
        (json!({"completion_window": "1h"}), 400, "completion_window"),
        (json!({"metadata": too_many}), 400, "metadata"),
        (json!({"metadata": {"n": 1}}), 400, "metadata.n"),
        (json!({"input_file_id": "file-nope"}), 404, "input_file_id"),
        (json!({"colour": "red"}), 400, "colour"),
    ] {
        let (got, error) = create(&r, &acme, request(changes.clone())).await;
        assert_eq!(got.as_u16(), status, "{changes}: {error}");
        assert_eq!(error["error"]["param"], param, "{changes}");
    }
    // Another tenant's file is absent.
    let (status, error) = create(&r, &globex, request(json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{error}");
    assert_eq!(error["error"]["param"], "input_file_id");

    // A file that fails validation: the batch fails, naming each line.
    let bad = [
        serde_json::to_string(&chat_line("x", "steady")).unwrap(),
        "{not json".into(),
        serde_json::to_string(&chat_line("x", "steady")).unwrap(),
        serde_json::to_string(&chat_line("y", "flaky")).unwrap(),
    ]
    .join("\n");
    let file = upload_input(&r, &acme, bad.as_bytes()).await;
    let (_, batch) = create(
        &r,
        &acme,
        json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await;
    let id = batch["id"].as_str().unwrap();
    let batch = wait_ended(&r, &acme, id).await;
    assert_eq!(batch["status"], "failed");
    assert!(batch["failed_at"].is_i64());
    let errors: Vec<(String, i64)> = batch["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["code"].as_str().unwrap().to_string(),
                e["line"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        [
            ("invalid_json_line".to_string(), 2),
            ("duplicate_custom_id".to_string(), 3),
            ("mismatched_model".to_string(), 4)
        ]
    );
    assert_eq!(batch["request_counts"]["total"], 0, "nothing ran");

    // Cancelling a batch that has ended is refused; others' batches are absent.
    let cancel = call(
        &r.app,
        "POST",
        &format!("/v1/batches/{id}/cancel"),
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(cancel.status, StatusCode::CONFLICT);
    assert_eq!(cancel.json()["error"]["code"], "batch_not_cancellable");
    for (method, path) in [
        ("GET", format!("/v1/batches/{id}")),
        ("POST", format!("/v1/batches/{id}/cancel")),
    ] {
        let theirs = call(&r.app, method, &path, Some(&globex), None).await;
        assert_eq!(theirs.status, StatusCode::NOT_FOUND, "{method} {path}");
    }
    let listed = call(&r.app, "GET", "/v1/batches", Some(&globex), None).await;
    assert_eq!(listed.json()["data"], json!([]));

    // Listing pages newest first, with OpenAI's cursor fields.
    let second = start_batch(
        &r,
        &acme,
        "/v1/chat/completions",
        &[chat_line("b", "steady")],
    )
    .await;
    let page = call(&r.app, "GET", "/v1/batches?limit=1", Some(&acme), None)
        .await
        .json();
    assert_eq!(page["data"][0]["id"], second.as_str());
    assert_eq!(page["has_more"], true);
    assert_eq!(page["first_id"], second.as_str());
    let next = call(
        &r.app,
        "GET",
        &format!("/v1/batches?limit=1&after={second}"),
        Some(&acme),
        None,
    )
    .await
    .json();
    assert_eq!(next["data"][0]["id"], id);
    assert_eq!(next["has_more"], false);
    let limit = call(&r.app, "GET", "/v1/batches?limit=0", Some(&acme), None).await;
    assert_eq!(limit.json()["error"]["param"], "limit");
    runner.stop().await;
}

/// A batch of 30 lines on a slow upstream, once `done` lines have run.
async fn slow_batch_under_way(done: u64) -> (RouterApp, String, RunnerHandle, String) {
    let r = router_app_on(None, Default::default()).await;
    let (acme, _, _) = keys(&r, None, None).await;
    r.upstream.set(
        "steady",
        Behaviour::SlowAnswer {
            completion_tokens: 2,
            ms: 150,
        },
    );
    let runner = quick_runner(&r);
    let lines: Vec<Value> = (0..30)
        .map(|i| chat_line(&format!("line-{i}"), "steady"))
        .collect();
    let id = start_batch(&r, &acme, "/v1/chat/completions", &lines).await;
    wait_for(&r, &acme, &id, |b| {
        b["request_counts"]["completed"].as_u64() >= Some(done)
    })
    .await;
    (r, acme, runner, id)
}

#[tokio::test]
async fn a_cancelled_batch_keeps_what_ran_and_names_what_did_not() {
    let (r, acme, runner, id) = slow_batch_under_way(2).await;
    let cancel = call(
        &r.app,
        "POST",
        &format!("/v1/batches/{id}/cancel"),
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(cancel.status, StatusCode::OK);
    assert!(["cancelling", "cancelled"].contains(&cancel.json()["status"].as_str().unwrap()));
    let batch = wait_ended(&r, &acme, &id).await;
    runner.stop().await;
    assert_eq!(batch["status"], "cancelled", "{batch}");
    assert!(batch["cancelling_at"].is_i64() && batch["cancelled_at"].is_i64());
    let output = file_lines(&r, &acme, &batch["output_file_id"]).await;
    let errors = file_lines(&r, &acme, &batch["error_file_id"]).await;
    assert!(output.len() >= 2 && output.len() < 30, "{}", output.len());
    assert_eq!(output.len() + errors.len(), 30, "every custom_id once");
    assert!(
        errors
            .values()
            .all(|e| e["error"]["code"] == "batch_cancelled")
    );
    let ids: BTreeSet<&String> = output.keys().chain(errors.keys()).collect();
    assert_eq!(ids.len(), 30);
    assert_eq!(
        ledger_rows(&r, &id).await.len(),
        output.len(),
        "only what ran is billed"
    );
    let counts = &batch["request_counts"];
    assert_eq!(counts["completed"].as_u64().unwrap() as usize, output.len());
    assert_eq!(counts["failed"].as_u64().unwrap() as usize, errors.len());
}

#[tokio::test]
async fn lines_left_at_the_end_of_the_window_expire() {
    let (r, acme, runner, id) = slow_batch_under_way(1).await;
    // The 24 hours pass.
    r.ledger
        .db()
        .execute(
            "UPDATE batches SET expires_ms = 0 WHERE id = $1",
            vec![id.as_str().into()],
        )
        .await
        .unwrap();
    let batch = wait_ended(&r, &acme, &id).await;
    runner.stop().await;
    assert_eq!(batch["status"], "expired", "{batch}");
    assert!(batch["expired_at"].is_i64());
    let output = file_lines(&r, &acme, &batch["output_file_id"]).await;
    let errors = file_lines(&r, &acme, &batch["error_file_id"]).await;
    assert_eq!(output.len() + errors.len(), 30);
    assert!(!errors.is_empty());
    assert!(
        errors
            .values()
            .all(|e| e["error"]["code"] == "batch_expired")
    );
}

#[tokio::test]
async fn a_tenant_out_of_budget_has_its_remaining_lines_refused_without_overspending() {
    let r = router_app_on(None, Default::default()).await;
    // Each line may cost (11 + 6 max tokens) at full price: $0.000023;
    // the budget holds a few.
    let (acme, _, _) = keys(&r, Some("0.0001"), None).await;
    let runner = quick_runner(&r);
    let lines: Vec<Value> = (0..20)
        .map(|i| chat_line(&format!("b{i}"), "steady"))
        .collect();
    let id = start_batch(&r, &acme, "/v1/chat/completions", &lines).await;
    let batch = wait_ended(&r, &acme, &id).await;
    runner.stop().await;
    assert_eq!(batch["status"], "completed", "{batch}");
    let output = file_lines(&r, &acme, &batch["output_file_id"]).await;
    let errors = file_lines(&r, &acme, &batch["error_file_id"]).await;
    assert!(
        !output.is_empty() && !errors.is_empty(),
        "{} ran",
        output.len()
    );
    assert_eq!(output.len() + errors.len(), 20);
    for error in errors.values() {
        assert_eq!(error["response"]["status_code"], 402);
        assert_eq!(
            error["response"]["body"]["error"]["code"],
            "insufficient_quota"
        );
    }
    let spent: Usd = ledger_rows(&r, &id)
        .await
        .values()
        .map(|(cost, ..)| *cost)
        .sum();
    assert!(spent <= Usd::parse("0.0001").unwrap(), "spent {spent}");
}
