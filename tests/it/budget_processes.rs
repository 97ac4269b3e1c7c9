//! A budget holds across processes: three real `qpai serve` processes on
//! one PostgreSQL database route to the scripted upstream, and 300
//! requests of one tenant arrive at once, spread over the three. Together
//! they must not spend past the tenant's budget by more than one request's
//! cost (each process alone would let the whole budget through).

use std::time::{Duration, Instant};

use qpai::ledger::Db;
use serde_json::json;

use crate::batch_processes::{drop_postgres, fresh_postgres};
use crate::common::{KillOnDrop, free_port, wait_ready};
use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::router_serve::serve;

const REQUESTS: usize = 300;
const PROCESSES: usize = 3;
/// Dollars per token, prompt and completion alike.
const USD_PER_TOKEN: f64 = 0.001;
const BUDGET_USD: f64 = 1.0;
const MAX_TOKENS: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_postgres_keep_a_tenants_budget() {
    let Some(database) = fresh_postgres("qpai_budget").await else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    upstream.set(
        "steady",
        Behaviour::SlowAnswer {
            completion_tokens: MAX_TOKENS,
            ms: 30,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let per_million = USD_PER_TOKEN * 1e6;
    let prices = format!("input_usd_per_1m = {per_million}\noutput_usd_per_1m = {per_million}");
    let catalog = upstream.write_catalog(dir.path(), "steady", &prices);
    let budget = BUDGET_USD.to_string();
    let key = crate::router_serve::key(
        dir.path(),
        &[
            "--database-url",
            &database,
            "--tenant",
            "acme",
            "--monthly-budget-usd",
            &budget,
        ],
    );
    let args = [
        "--router-config",
        catalog.as_str(),
        "--database-url",
        database.as_str(),
    ];
    let mut servers: Vec<(KillOnDrop, String)> = Vec::new();
    for _ in 0..PROCESSES {
        let port = free_port();
        servers.push((
            serve(dir.path(), port, &args, &[]),
            format!("http://127.0.0.1:{port}"),
        ));
        tokio::task::spawn_blocking(move || wait_ready(port))
            .await
            .unwrap();
    }
    let http = reqwest::Client::new();
    // A prompt qpai counts at more tokens than the upstream reports (11),
    // so each request costs at most its hold.
    let body = json!({"model": "steady", "max_tokens": MAX_TOKENS, "messages": [{"role": "user",
        "content": "Write a short, friendly tagline for a family bakery that opens at dawn."}]})
    .to_string();
    let ask = |i: usize| {
        let (http, base, key, body) = (
            http.clone(),
            servers[i % PROCESSES].1.clone(),
            key.clone(),
            body.clone(),
        );
        async move {
            let sent = Instant::now();
            let response = http
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            assert!(
                status == 200 || status == 402 || status == 429,
                "{status}: {text}"
            );
            (status, sent.elapsed())
        }
    };
    let started = Instant::now();
    let answers = futures::future::join_all((0..REQUESTS).map(ask)).await;
    let elapsed = started.elapsed();
    let mut ok: Vec<Duration> = answers.iter().filter(|a| a.0 == 200).map(|a| a.1).collect();
    let refused = answers.len() - ok.len();
    // All at once, every hold is the most a request may cost, so some
    // budget is left: smaller waves spend it, until none is answered.
    let mut waves = 0;
    loop {
        let wave = futures::future::join_all((0..PROCESSES * 4).map(ask)).await;
        let answered: Vec<Duration> = wave.iter().filter(|a| a.0 == 200).map(|a| a.1).collect();
        waves += 1;
        if answered.is_empty() || waves == 20 {
            break;
        }
        ok.extend(answered);
    }
    let db = Db::open(&database).await.unwrap();
    let spent = db
        .query(
            "SELECT CAST(SUM(cost_pico) AS TEXT), COUNT(*) FROM usage_ledger \
             WHERE tenant = 'acme' AND outcome = 'ok'",
            vec![],
        )
        .await
        .unwrap();
    let spent_usd = spent[0][0].wide().unwrap_or(0) as f64 / 1e12;
    let rows = spent[0][1].wide().unwrap_or(0) as usize;
    let holds = db
        .query("SELECT COUNT(*) FROM budget_holds", vec![])
        .await
        .unwrap();
    let one_request = (30 + MAX_TOKENS) as f64 * USD_PER_TOKEN;
    let mut sorted = ok.clone();
    sorted.sort();
    eprintln!(
        "{} answered ({} of the {REQUESTS} at once, {refused} refused in {elapsed:.2?}), then \
         {waves} waves; spent ${spent_usd:.4} of ${BUDGET_USD}; answered p50 {:?}",
        ok.len(),
        REQUESTS - refused,
        sorted.get(sorted.len() / 2)
    );
    assert_eq!(rows, ok.len(), "one ok row per answer");
    assert!(refused > 0, "the budget refused nothing");
    assert!(
        spent_usd <= BUDGET_USD + one_request,
        "spent ${spent_usd} past the ${BUDGET_USD} budget"
    );
    assert!(
        spent_usd >= BUDGET_USD - one_request,
        "only ${spent_usd} of ${BUDGET_USD} spent: holds outlive their requests"
    );
    assert_eq!(holds[0][0].wide(), Some(0), "holds left behind");
    drop((db, servers));
    drop_postgres(&database).await;
}
