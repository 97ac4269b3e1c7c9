//! kill -9 under load loses no billed answer: a real `qpai serve` routing
//! to the scripted upstream is killed with SIGKILL at random moments while
//! clients stream and fetch answers, 20 times over. After each kill, every
//! request whose client saw a whole answer (a JSON body, or a stream to its
//! `[DONE]`) has its row in the ledger on disk, and no request id has two.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::batch_processes::usage_rows;
use crate::common::{free_port, wait_ready};
use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::router_serve::{key, serve};

const KILLS: usize = 20;
const CLIENTS: usize = 12;
const PRICES: &str = "input_usd_per_1m = 1\noutput_usd_per_1m = 2";

/// One answer, whole or streamed; its request id when the client saw all
/// of it (None when the server went away first).
async fn ask(http: &reqwest::Client, base: &str, key: &str, stream: bool) -> Option<String> {
    let body = json!({"model": "steady", "stream": stream, "max_tokens": 8,
        "messages": [{"role": "user", "content": "Write a tagline."}]});
    let response = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .ok()?;
    let status = response.status();
    if status.is_client_error() {
        panic!("{status}: {}", response.text().await.unwrap_or_default());
    }
    let id = response
        .headers()
        .get("x-qpai-request-id")?
        .to_str()
        .ok()?
        .to_string();
    let text = response.text().await.ok()?;
    let whole = match stream {
        true => text.trim_end().ends_with("data: [DONE]"),
        false => serde_json::from_str::<Value>(&text).is_ok_and(|v| v["choices"][0].is_object()),
    };
    whole.then_some(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_clients_saw_keep_their_rows_through_20_kill_9s() {
    let upstream = FakeUpstream::start().await;
    upstream.set(
        "steady",
        Behaviour::SlowAnswer {
            completion_tokens: 4,
            ms: 10,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let catalog = upstream.write_catalog(dir.path(), "steady", PRICES);
    let acme = key(dir.path(), &["--tenant", "acme"]);
    let database = format!("sqlite://{}", dir.path().join("qpai.db").display());
    let http = reqwest::Client::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    for kill in 0..KILLS {
        let port = free_port();
        let mut server = serve(dir.path(), port, &["--router-config", &catalog], &[]);
        tokio::task::spawn_blocking(move || wait_ready(port))
            .await
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (http, base, key, seen) =
                    (http.clone(), base.clone(), acme.clone(), seen.clone());
                tokio::spawn(async move {
                    for n in 0.. {
                        match ask(&http, &base, &key, (client + n) % 2 == 0).await {
                            Some(id) => seen.lock().unwrap().push(id),
                            None => break,
                        }
                    }
                })
            })
            .collect();
        let before = seen.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
        server.0.kill().unwrap();
        server.0.wait().unwrap();
        for client in clients {
            client.await.unwrap();
        }
        let seen = seen.lock().unwrap().clone();
        assert!(seen.len() > before, "kill {kill}: no answer completed");
        let rows = usage_rows(&database, None).await;
        let missing: Vec<&String> = seen.iter().filter(|id| !rows.contains_key(*id)).collect();
        assert!(
            missing.is_empty(),
            "kill {kill}: {} of {} whole answers have no row: {missing:?}",
            missing.len(),
            seen.len()
        );
        assert!(rows.values().all(|&n| n == 1), "a request billed twice");
        eprintln!(
            "kill {kill}: {} whole answers so far, {} rows",
            seen.len(),
            rows.len()
        );
    }
}
