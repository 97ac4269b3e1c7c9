//! A real `qpai serve` with API keys, logging at debug: an address that
//! keeps presenting bad keys is held off with 429s (a key that worked
//! lately still passes), and no key appears in the log or in /metrics,
//! nor the secret of the upstream it routes to, through answers, streams,
//! upstream failures and retries.

use std::process::{Command, Stdio};

use serde_json::json;

use crate::common::*;
use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::router_serve::key;

const UPSTREAM_SECRET: &str = "sk-upstream-3f9a1c77e2b04d5e";

/// Routed chat answers: whole, streamed, after an upstream failure (a
/// retry) and after one that exhausts the retries.
fn routed_requests(port: u16, secret: &str, upstream: &FakeUpstream) {
    // The status and body of a chat answer.
    let ask = |stream: bool| -> (u16, String) {
        let answer = ureq::post(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
            .set("Authorization", &format!("Bearer {secret}"))
            .send_json(json!({"model": "steady", "stream": stream, "max_tokens": 8,
                "messages": [{"role": "user", "content": "Hello"}]}));
        match answer {
            Ok(response) => (response.status(), response.into_string().unwrap()),
            Err(ureq::Error::Status(code, response)) => (code, response.into_string().unwrap()),
            Err(error) => panic!("{error}"),
        }
    };
    assert_eq!(ask(false).0, 200);
    let (status, streamed) = ask(true);
    assert!(status == 200 && streamed.contains("[DONE]"), "{streamed}");
    upstream.queue("steady", &[Behaviour::Error500]);
    assert_eq!(ask(false).0, 200, "retried after one failure");
    upstream.queue("steady", &[Behaviour::Error500, Behaviour::Error500]);
    assert_eq!(ask(false).0, 503, "the upstream failed twice");
}

/// Status and Retry-After of GET /v1/models with `secret`.
fn models(port: u16, secret: &str) -> (u16, Option<String>) {
    let answer = ureq::get(&format!("http://127.0.0.1:{port}/v1/models"))
        .set("Authorization", &format!("Bearer {secret}"))
        .call();
    match answer {
        Ok(response) => (response.status(), None),
        Err(ureq::Error::Status(code, response)) => {
            (code, response.header("retry-after").map(str::to_string))
        }
        Err(error) => panic!("{error}"),
    }
}

#[test]
fn failed_authentications_are_held_off_and_keys_never_logged() {
    chat_model();
    let dir = tempfile::tempdir().unwrap();
    let good = key(dir.path(), &["--tenant", "acme"]);
    let unused = key(dir.path(), &["--tenant", "acme"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(FakeUpstream::start());
    upstream.set(
        "steady",
        Behaviour::Answer {
            completion_tokens: 5,
        },
    );
    let catalog = upstream.write_catalog(
        dir.path(),
        "steady",
        "input_usd_per_1m = 1\noutput_usd_per_1m = 2\napi_key_env = \"QPAI_TEST_UPSTREAM_SECRET\"",
    );
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let server = Command::new(env!("CARGO_BIN_EXE_qpai"))
        .args(["serve", "--port", &port.to_string(), "--model", CHAT_MODEL])
        .args(["--embedding-model", ""])
        .arg("--router-config")
        .arg(&catalog)
        .env("QPAI_TEST_UPSTREAM_SECRET", UPSTREAM_SECRET)
        .env("QPAI_DATA_DIR", dir.path())
        .env("QPAI_MODELS_DIR", models_dir())
        .env("RUST_LOG", "debug")
        .env_remove("QPAI_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _server = KillOnDrop(server);
    wait_ready(port);
    assert_eq!(models(port, &good).0, 200);
    routed_requests(port, &good, &upstream);
    let sent = upstream.last_body("steady").unwrap();
    assert_eq!(
        sent["model"], "m-steady",
        "the requests reached the upstream"
    );
    let wrong: Vec<String> = (0..21).map(|i| format!("sk-qpai-wrong-{i:04}")).collect();
    for secret in &wrong[..20] {
        assert_eq!(models(port, secret).0, 401, "{secret}");
    }
    let (status, retry_after) = models(port, &wrong[20]);
    assert_eq!(status, 429);
    let wait: u64 = retry_after.unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // A key that worked passes; one never seen waits like the guesser.
    assert_eq!(models(port, &good).0, 200);
    assert_eq!(models(port, &unused).0, 429);
    let metrics = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let logged = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(logged.contains("DEBUG"), "the log is not at debug level");
    let upstream_secret = UPSTREAM_SECRET.to_string();
    for secret in wrong.iter().chain([&good, &unused, &upstream_secret]) {
        assert!(!logged.contains(secret.as_str()), "{secret} in the log");
        assert!(!metrics.contains(secret.as_str()), "{secret} in /metrics");
    }
}
