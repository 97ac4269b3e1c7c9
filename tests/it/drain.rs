//! SIGTERM drains a real `qpai serve`: new requests get a 503 envelope and
//! `/ready` a 503, the stream in flight runs to its end, the process exits
//! cleanly and the ledger has the stream's row; past `--shutdown-grace-s`
//! a stream still running is cut, and its row (outcome "cut") is there too.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::router_serve::{key, qpai, serve};

/// Starts a stream of `tokens` forced tokens; returns its lines reader
/// after the first event arrived.
fn start_stream(port: u16, secret: &str, tokens: u32) -> impl Iterator<Item = String> {
    let response = ureq::post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .set("Authorization", &format!("Bearer {secret}"))
        .send_json(json!({
            "model": CHAT_MODEL, "prompt": "The bakery", "max_tokens": tokens,
            "ignore_eos": true, "stream": true, "temperature": 0,
            "stream_options": {"include_usage": true}
        }))
        .unwrap();
    let mut lines = BufReader::new(response.into_reader())
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.starts_with("data: "));
    let first = lines.next().expect("a first event");
    assert!(first.starts_with("data: {"), "{first}");
    lines
}

fn terminate(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the process to exit (at most `limit`), returning how long it took.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "qpai serve exited with {status}");
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "qpai serve still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ledger by tenant (`qpai usage --json`): (tenant, requests,
/// completion tokens).
fn ledger_rows(data_dir: &Path) -> Vec<(String, u64, u64)> {
    let out = qpai(data_dir, &["usage", "--json", "--group-by", "tenant"]);
    let rows: Value = serde_json::from_str(&out).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["tenant"].as_str().unwrap_or_default().to_string(),
                r["requests"].as_u64().unwrap_or_default(),
                r["completion_tokens"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn sigterm_refuses_new_requests_and_lets_streams_finish() {
    chat_model();
    let dir = tempfile::tempdir().unwrap();
    let secret = key(dir.path(), &["--tenant", "drain"]);
    let port = free_port();
    let mut server = serve(
        dir.path(),
        port,
        &["--embedding-model", "", "--shutdown-grace-s", "60"],
        &[],
    );
    wait_ready(port);
    let stream = start_stream(port, &secret, 120);
    terminate(server.0.id());
    std::thread::sleep(Duration::from_millis(300));
    let refused = ureq::post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .set("Authorization", &format!("Bearer {secret}"))
        .send_json(json!({"model": CHAT_MODEL, "prompt": "x", "max_tokens": 1}));
    match refused {
        Err(ureq::Error::Status(code, response)) => {
            assert_eq!(code, 503);
            let body: Value = response.into_json().unwrap();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("shutting down"),
                "{body}"
            );
        }
        other => panic!("a request while draining got {other:?}"),
    }
    match ureq::get(&format!("http://127.0.0.1:{port}/ready")).call() {
        Err(ureq::Error::Status(503, _)) => {}
        other => panic!("/ready while draining: {other:?}"),
    }
    let events: Vec<String> = stream.collect();
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));
    // Events carry text, not tokens (a token that ends inside a UTF-8
    // character waits for the next), so the count is the usage event's.
    let usage: Value = serde_json::from_str(&events[events.len() - 2]["data: ".len()..]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 120, "{usage}");
    wait_exit(&mut server.0, Duration::from_secs(30));
    let rows = ledger_rows(dir.path());
    assert_eq!(rows, [("drain".to_string(), 1, 120)], "{rows:?}");
}

#[test]
fn streams_past_the_grace_period_are_cut_and_still_billed() {
    chat_model();
    let dir = tempfile::tempdir().unwrap();
    let secret = key(dir.path(), &["--tenant", "late"]);
    let port = free_port();
    let mut server = serve(
        dir.path(),
        port,
        &["--embedding-model", "", "--shutdown-grace-s", "1"],
        &[],
    );
    wait_ready(port);
    let stream = start_stream(port, &secret, 4000);
    terminate(server.0.id());
    let took = wait_exit(&mut server.0, Duration::from_secs(20));
    assert!(took < Duration::from_secs(10), "exited after {took:?}");
    let events: Vec<String> = stream.collect();
    assert_ne!(events.last().map(String::as_str), Some("data: [DONE]"));
    let rows = ledger_rows(dir.path());
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].1, 1, "{rows:?}");
    assert!(rows[0].2 > 0 && rows[0].2 < 4000, "{rows:?}");
}
