//! The router end to end, in process, against the scripted upstream on
//! loopback (fake_upstream.rs) and qpai's own engine: fallback, retries and
//! the circuit breaker; one bill per request, streams billed when cut;
//! budgets under concurrency; keys, rate limits and tenant isolation.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use qpai::engine::{Engine, EngineConfig};
use qpai::ledger::{GroupKey, Ledger, NewKey, Outcome, UsageQuery};
use qpai::money::Usd;
use qpai::router::tokens::TokenCounter;
use qpai::router::{BreakerConfig, ModelRouter, RetryPolicy, RouterCatalog, Timeouts};
use qpai::tenancy::Tenancy;
use qpai::{Gateway, HttpConfig};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::common::{CHAT_MODEL, chat_model, sse_data};
use crate::fake_upstream::{Behaviour, FakeUpstream, PROMPT_TOKENS};

/// Two remote deployments of one logical model (`flaky` is the cheaper), a
/// local one, a remote text-completion deployment and a remote embedder.
const CATALOG: &str = r#"
[[deployment]]
name = "flaky"
provider = "openai_compatible"
model = "m-flaky"
base_url = "{up}/flaky/v1"
input_usd_per_1m = 0.5
output_usd_per_1m = 1
context_window = 4096
capabilities = ["streaming"]
quality = { general = 0.5 }

[[deployment]]
name = "steady"
provider = "openai_compatible"
model = "m-steady"
base_url = "{up}/steady/v1"
input_usd_per_1m = 1
output_usd_per_1m = 2
context_window = 4096
capabilities = ["streaming", "tools", "json"]
quality = { general = 0.9 }
batch_discount = 0.5
batch_concurrency = 2

[[deployment]]
name = "local-small"
provider = "local"
model = "smollm2-135m-instruct"
host_usd_per_hour = 0.036
tokens_per_s = 100
context_window = 8192
capabilities = ["streaming"]
quality = { general = 0.3 }

[[model]]
name = "writer"
deployments = ["steady", "flaky"]

[[deployment]]
name = "texter"
provider = "openai_compatible"
model = "m-texter"
base_url = "{up}/texter/v1"
input_usd_per_1m = 1
output_usd_per_1m = 2
context_window = 4096
capabilities = ["streaming", "completions"]

[[deployment]]
name = "embed-remote"
provider = "openai_compatible"
model = "text-embedding-3-small"
base_url = "{up}/embed-remote/v1"
input_usd_per_1m = 0.02
output_usd_per_1m = 0
context_window = 8191
capabilities = ["embeddings"]
dimensions = 8
"#;

/// What `steady` charges for the fake upstream's usage (11 in, n out).
fn steady_cost(completion: u64) -> Usd {
    Usd(PROMPT_TOKENS * 1_000_000 + completion * 2_000_000)
}

pub struct RouterApp {
    pub app: axum::Router,
    pub gateway: Arc<Gateway>,
    pub batches: qpai::batches::Batches,
    pub ledger: Ledger,
    pub tenancy: Arc<Tenancy>,
    pub upstream: FakeUpstream,
    _dir: tempfile::TempDir,
}

pub async fn router_app_on(database_url: Option<String>, breaker: BreakerConfig) -> RouterApp {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = RouterCatalog::parse(&CATALOG.replace("{up}", &upstream.base)).unwrap();
    let url = database_url
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("qpai.db").display()));
    let ledger = Ledger::open(&url).await.unwrap();
    let tenancy = Tenancy::new(ledger.clone()).await.unwrap();
    let timeouts = Timeouts {
        connect: Duration::from_secs(1),
        first_byte: Duration::from_millis(400),
        total: Duration::from_secs(10),
    };
    let retry = RetryPolicy {
        retries: 1,
        backoff: Duration::from_millis(20),
        max_wait: Duration::from_secs(1),
    };
    let rag_store = qpai::rag::Store::open(dir.path().join("rag").to_str().unwrap())
        .await
        .unwrap();
    let files = qpai::files::Files::new(
        &ledger,
        Arc::new(qpai::files::LocalBlobs::new(dir.path().join("files"))),
    );
    let batches = qpai::batches::Batches::new(&ledger, files.clone());
    let gateway = Gateway::builder()
        .files(files)
        .tenancy(tenancy.clone())
        .router(ModelRouter::new(catalog, timeouts, breaker, retry).unwrap())
        .rag_store(rag_store)
        .build()
        .unwrap();
    gateway
        .models
        .add(Engine::start(chat_model().clone(), EngineConfig::default()).unwrap());
    RouterApp {
        app: qpai::app_with_batches(
            gateway.clone(),
            Some(batches.clone()),
            HttpConfig::default(),
        ),
        gateway,
        batches,
        ledger,
        tenancy,
        upstream,
        _dir: dir,
    }
}

async fn router_app() -> RouterApp {
    router_app_on(None, BreakerConfig::default()).await
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }
}

pub async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let request = match body {
        Some(body) => request
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
        None => request.body(Body::empty()).unwrap(),
    };
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

pub fn chat(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Write a tagline for a bakery."}],
        "max_tokens": 20,
        "stream": stream,
    })
}

pub async fn rows(ledger: &Ledger, tenant: &str) -> Vec<qpai::ledger::UsageRow> {
    ledger.flush().await;
    ledger
        .usage(&UsageQuery {
            tenant: Some(tenant.into()),
            group_by: vec![GroupKey::Deployment],
            ..UsageQuery::default()
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn fallback_reaches_the_healthy_route_and_bills_it_once() {
    let faults = [
        (Behaviour::Error500, 3),
        // Retry-After beyond the 1 s the policy waits: straight to the next route.
        (Behaviour::TooMany { retry_after_s: 5 }, 2),
        (Behaviour::SlowFirstByte { seconds: 1.0 }, 3),
        (Behaviour::Reset, 3),
    ];
    for (fault, attempts) in faults {
        for stream in [false, true] {
            let r = router_app().await;
            r.upstream.set("flaky", fault);
            let answer = call(
                &r.app,
                "POST",
                "/v1/chat/completions",
                None,
                Some(chat("writer", stream)),
            )
            .await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{fault:?}: {}",
                String::from_utf8_lossy(&answer.body)
            );
            assert_eq!(answer.header("x-qpai-deployment"), "steady", "{fault:?}");
            assert_eq!(answer.header("x-qpai-provider"), "openai_compatible");
            assert_eq!(answer.header("x-qpai-model"), "m-steady");
            assert_eq!(
                answer.header("x-qpai-attempts"),
                attempts.to_string(),
                "{fault:?}"
            );
            assert_eq!(r.upstream.requests("steady"), 1);
            assert_eq!(r.upstream.requests("flaky"), attempts - 1, "{fault:?}");
            if stream {
                let events = sse_data(&answer.body);
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                assert!(
                    !String::from_utf8_lossy(&answer.body).contains("usage"),
                    "not asked for"
                );
            } else {
                assert_eq!(answer.header("x-qpai-cost-usd"), steady_cost(3).to_string());
                assert_eq!(
                    answer.json()["choices"][0]["message"]["content"],
                    "w0 w1 w2 "
                );
            }
            // One row for the request, on the route that answered, from the
            // upstream's own usage: the failed tries cost nothing.
            let rows = rows(&r.ledger, "default").await;
            assert_eq!(rows.len(), 1, "{rows:?}");
            assert_eq!(rows[0].group["deployment"], "steady");
            assert_eq!(
                (
                    rows[0].requests,
                    rows[0].prompt_tokens,
                    rows[0].completion_tokens
                ),
                (1, PROMPT_TOKENS, 3)
            );
            assert_eq!(rows[0].cost, steady_cost(3));
        }
    }
    // Retry-After keeps the deployment aside, visible in the health view.
    let r = router_app().await;
    r.upstream
        .set("flaky", Behaviour::TooMany { retry_after_s: 30 });
    call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(chat("writer", false)),
    )
    .await;
    let health = call(&r.app, "GET", "/v1/router/health", None, None)
        .await
        .json();
    let flaky = health["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["deployment"] == "flaky")
        .unwrap()
        .clone();
    assert!(flaky["cooling_for_s"].as_f64().unwrap() > 25.0, "{flaky}");
    let again = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(chat("writer", false)),
    )
    .await;
    assert_eq!(again.header("x-qpai-attempts"), "1");
    assert_eq!(r.upstream.requests("flaky"), 1, "not tried while cooling");
}

#[tokio::test]
async fn a_started_stream_is_not_retried_and_a_cut_is_billed_for_what_came() {
    let r = router_app().await;
    r.upstream.set("flaky", Behaviour::CutAfter { chunks: 2 });
    let answer = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(chat("writer", true)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("x-qpai-deployment"), "flaky");
    let events = sse_data(&answer.body);
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "w0 w1 ");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_broke_off", "{last}");
    assert_eq!(
        r.upstream.requests("steady"),
        0,
        "nothing is retried after the client got data"
    );

    r.ledger.flush().await;
    let counted = TokenCounter::for_remote_model("m-flaky").count("w0 w1 ");
    let rows = rows(&r.ledger, "default").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].completion_tokens, counted);
    assert!(
        rows[0].prompt_tokens > 0,
        "the prompt is counted when no usage came"
    );
    let expected = Usd(rows[0].prompt_tokens * 500_000 + counted * 1_000_000);
    assert_eq!(rows[0].cost, expected);
    let outcome = r
        .ledger
        .db()
        .query("SELECT outcome, usage_source FROM usage_ledger", vec![])
        .await
        .unwrap();
    assert_eq!(outcome[0][0].text(), Some(Outcome::Cut.as_str()));
    assert_eq!(outcome[0][1].text(), Some("counted"));
}

#[tokio::test]
async fn streamed_usage_is_billed_and_shown_only_when_asked_for() {
    let r = router_app().await;
    let mut body = chat("steady", true);
    body["stream_options"] = json!({"include_usage": true});
    let answer = call(&r.app, "POST", "/v1/chat/completions", None, Some(body)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let events = sse_data(&answer.body);
    let usage: Value = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v.get("usage").is_some_and(|u| !u.is_null()))
        .expect("a usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert_eq!(usage["x_qpai_cost_usd"], steady_cost(3).to_string());
    assert_eq!(
        r.upstream.last_body("steady").unwrap()["stream_options"]["include_usage"],
        true
    );
    assert_eq!(r.upstream.last_body("steady").unwrap()["model"], "m-steady");

    // A stream whose upstream reports no usage is billed from qpai's count.
    r.upstream.set("steady", Behaviour::NoUsage);
    let answer = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(chat("steady", true)),
    )
    .await;
    assert_eq!(
        sse_data(&answer.body).last().map(String::as_str),
        Some("[DONE]")
    );
    let rows = rows(&r.ledger, "default").await;
    assert_eq!(rows[0].requests, 2);
    let counted = TokenCounter::for_remote_model("m-steady").count("w0 w1 w2 ");
    assert_eq!(rows[0].completion_tokens, 3 + counted);
}

#[tokio::test]
async fn the_circuit_opens_after_failures_in_a_row_and_health_shows_it() {
    let r = router_app_on(
        None,
        BreakerConfig {
            threshold: 2,
            cooldown: Duration::from_millis(300),
        },
    )
    .await;
    r.upstream.set("flaky", Behaviour::Error500);
    let first = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(chat("flaky", false)),
    )
    .await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(first.json()["error"]["code"], "no_route_available");
    assert!(
        first.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream exploded")
    );
    assert_eq!(r.upstream.requests("flaky"), 2, "one try and one retry");
    let second = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(chat("flaky", false)),
    )
    .await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        second.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("circuit open")
    );
    assert_eq!(
        r.upstream.requests("flaky"),
        2,
        "an open circuit sends nothing"
    );
    let health = call(&r.app, "GET", "/v1/router/health", None, None)
        .await
        .json();
    let flaky = &health["data"][0];
    assert_eq!(
        (flaky["deployment"].as_str(), flaky["state"].as_str()),
        (Some("flaky"), Some("open"))
    );
    assert_eq!(flaky["failures_in_a_row"], 2);
    assert_eq!(health["data"][1]["state"], "closed");

    // After the cooldown one probe goes through; its success closes the circuit.
    tokio::time::sleep(Duration::from_millis(350)).await;
    r.upstream.set(
        "flaky",
        Behaviour::Answer {
            completion_tokens: 2,
        },
    );
    let probe = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(chat("flaky", false)),
    )
    .await;
    assert_eq!(probe.status, StatusCode::OK);
    let health = call(&r.app, "GET", "/v1/router/health", None, None)
        .await
        .json();
    assert_eq!(health["data"][0]["state"], "closed");
    // The failed requests are in the ledger, at no cost.
    let rows = rows(&r.ledger, "default").await;
    let total: u64 = rows.iter().map(|r| r.requests).sum();
    assert_eq!(total, 3);
}

/// Keys for tenants `acme` (with `budget`), `globex`, and an admin.
pub async fn keys(
    r: &RouterApp,
    budget: Option<&str>,
    soft: Option<u8>,
) -> (String, String, String) {
    let key = |tenant: &str, admin: bool, budget: Option<Usd>| NewKey {
        tenant: tenant.into(),
        monthly_budget: budget,
        soft_limit_percent: soft,
        admin,
        ..NewKey::default()
    };
    let budget = budget.map(|b| Usd::parse(b).unwrap());
    let (acme, _) = r
        .ledger
        .create_key(&key("acme", false, budget))
        .await
        .unwrap();
    let (globex, _) = r
        .ledger
        .create_key(&key("globex", false, None))
        .await
        .unwrap();
    let (admin, _) = r.ledger.create_key(&key("ops", true, None)).await.unwrap();
    r.tenancy.refresh().await;
    (acme, globex, admin)
}

/// The budget test, on the database at `url` (SQLite when None).
pub async fn budget_holds_under_concurrency(url: Option<String>) {
    let r = router_app_on(url, BreakerConfig::default()).await;
    let tenant = format!("acme{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let (key, _) = r
        .ledger
        .create_key(&NewKey {
            tenant: tenant.clone(),
            monthly_budget: Some(Usd::parse("0.001").unwrap()),
            ..NewKey::default()
        })
        .await
        .unwrap();
    r.tenancy.refresh().await;
    // Every answer uses all of its max_tokens: the worst case for a budget.
    r.upstream.set(
        "steady",
        Behaviour::Answer {
            completion_tokens: 100,
        },
    );
    let mut body = chat("steady", false);
    body["max_tokens"] = json!(100);
    let answers = futures::future::join_all((0..100).map(|_| {
        call(
            &r.app,
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(body.clone()),
        )
    }))
    .await;
    let ok = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count() as u64;
    let refused: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::PAYMENT_REQUIRED)
        .collect();
    let others: Vec<String> = answers
        .iter()
        .filter(|a| a.status != StatusCode::OK && a.status != StatusCode::PAYMENT_REQUIRED)
        .map(|a| format!("{} {}", a.status, String::from_utf8_lossy(&a.body)))
        .collect();
    assert!(others.is_empty(), "only 200 or 402: {others:?}");
    assert_eq!(refused[0].json()["error"]["code"], "budget_exceeded");
    assert_eq!(refused[0].json()["error"]["type"], "insufficient_quota");
    let spent = rows(&r.ledger, &tenant)
        .await
        .iter()
        .map(|r| r.cost.0)
        .sum::<u64>();
    let budget = Usd::parse("0.001").unwrap().0;
    assert_eq!(
        spent,
        ok * steady_cost(100).0,
        "every success billed once, nothing else"
    );
    // Each request holds its largest cost before it is sent, so the budget
    // is never passed (the issue allows one request's worth).
    assert!(spent <= budget, "spent {spent} of {budget}");
    assert!(
        spent + steady_cost(100).0 * 2 > budget,
        "the budget was used, not refused early: {spent}"
    );
    assert_eq!(
        r.upstream.requests("steady"),
        ok,
        "refused requests never reach the upstream"
    );
}

#[tokio::test]
async fn a_hundred_concurrent_requests_stay_within_the_budget() {
    budget_holds_under_concurrency(None).await;
}

#[tokio::test]
async fn the_soft_limit_warns_then_the_hard_limit_refuses() {
    let r = router_app().await;
    let (acme, _, _) = keys(&r, Some("0.0001"), Some(30)).await;
    // Each request holds its prompt (about 14 tokens counted) + 20 max_tokens
    // at steady's prices, about 0.000054 $, and is billed 0.000017 (11 + 3).
    let mut warned_at = None;
    let mut refused_at = None;
    for i in 0..10 {
        let answer = call(
            &r.app,
            "POST",
            "/v1/chat/completions",
            Some(&acme),
            Some(chat("steady", false)),
        )
        .await;
        if answer.status == StatusCode::PAYMENT_REQUIRED {
            refused_at = Some(i);
            assert!(
                answer.json()["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("monthly budget")
            );
            break;
        }
        assert_eq!(answer.status, StatusCode::OK);
        if warned_at.is_none() && !answer.header("x-qpai-budget-warning").is_empty() {
            warned_at = Some(i);
        }
    }
    // Warned once 30% (0.00003) is spent: after 2 requests (0.000034).
    assert_eq!(warned_at, Some(2));
    // Refused when what is left (0.0001 - 3 * 0.000017) cannot hold a request.
    assert_eq!(refused_at, Some(3));
}

#[tokio::test]
async fn keys_are_required_once_they_exist_and_tenants_see_only_their_own() {
    let r = router_app().await;
    // Open server: no key needed, billed to `default`.
    assert_eq!(
        call(&r.app, "GET", "/v1/models", None, None).await.status,
        StatusCode::OK
    );
    let (acme, globex, admin) = keys(&r, None, None).await;
    let missing = call(&r.app, "GET", "/v1/models", None, None).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.json()["error"]["type"], "authentication_error");
    let wrong = call(&r.app, "GET", "/v1/models", Some("qpai-0000"), None).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(&r.app, "GET", "/health", None, None).await.status,
        StatusCode::OK
    );

    for key in [&acme, &acme, &globex] {
        let answer = call(
            &r.app,
            "POST",
            "/v1/chat/completions",
            Some(key),
            Some(chat("steady", false)),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let usage = |key: &str, query: &str| {
        let (app, key, path) = (
            r.app.clone(),
            key.to_string(),
            format!("/v1/usage?group_by=tenant{query}"),
        );
        async move { call(&app, "GET", &path, Some(&key), None).await }
    };
    let mine = usage(&acme, "").await.json();
    assert_eq!(mine["data"].as_array().unwrap().len(), 1, "{mine}");
    assert_eq!(mine["data"][0]["tenant"], "acme");
    assert_eq!(mine["data"][0]["requests"], 2);
    assert_eq!(
        mine["total"]["cost_usd"],
        Usd(steady_cost(3).0 * 2).to_string()
    );
    assert_eq!(
        usage(&acme, "&tenant=globex").await.status,
        StatusCode::FORBIDDEN
    );
    let all = usage(&admin, "").await.json();
    assert_eq!(all["total"]["requests"], 3, "{all}");
    assert_eq!(
        usage(&admin, "&tenant=globex").await.json()["total"]["requests"],
        1
    );
    assert_eq!(
        usage(&acme, "&group_by=color").await.status,
        StatusCode::BAD_REQUEST
    );

    // Sites: a tenant lists, reads and searches its own only.
    let store = r.gateway.rag_store().unwrap().clone();
    for (site, owner) in [("acme-blog", "acme"), ("globex-shop", "globex")] {
        store
            .create_site(
                &qpai::rag::SiteName::parse(site).unwrap(),
                4,
                "test-embedder",
            )
            .await
            .unwrap();
        r.ledger.claim_site(site, owner).await.unwrap();
    }
    let sites = |key: &str| {
        let (app, key) = (r.app.clone(), key.to_string());
        async move {
            let list = call(&app, "GET", "/v1/sites", Some(&key), None)
                .await
                .json();
            list["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(sites(&acme).await, ["acme-blog"]);
    assert_eq!(sites(&globex).await, ["globex-shop"]);
    assert_eq!(sites(&admin).await.len(), 2);
    let theirs = call(&r.app, "GET", "/v1/sites/globex-shop", Some(&acme), None).await;
    assert_eq!(
        theirs.status,
        StatusCode::NOT_FOUND,
        "another tenant's site does not exist for you"
    );
    assert_eq!(theirs.json()["error"]["code"], "site_not_found");
    let search = call(
        &r.app,
        "POST",
        "/v1/sites/globex-shop/search",
        Some(&acme),
        Some(json!({"query": "x"})),
    )
    .await;
    assert_eq!(search.status, StatusCode::NOT_FOUND);
    assert_eq!(
        call(&r.app, "GET", "/v1/sites/acme-blog", Some(&acme), None)
            .await
            .status,
        StatusCode::OK
    );

    // Revoked keys stop working (after the few seconds keys are cached).
    let (fresh, record) = r
        .ledger
        .create_key(&NewKey {
            tenant: "globex".into(),
            ..NewKey::default()
        })
        .await
        .unwrap();
    assert!(r.ledger.revoke_key(&record.id).await.unwrap());
    assert!(
        !r.ledger.revoke_key(&record.id).await.unwrap(),
        "revoked once"
    );
    assert_eq!(
        call(&r.app, "GET", "/v1/models", Some(&fresh), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let r = router_app().await;
    let (key, _) = r
        .ledger
        .create_key(&NewKey {
            tenant: "acme".into(),
            rpm: Some(2),
            tpm: Some(100),
            ..NewKey::default()
        })
        .await
        .unwrap();
    r.tenancy.refresh().await;
    for _ in 0..2 {
        assert_eq!(
            call(&r.app, "GET", "/v1/models", Some(&key), None)
                .await
                .status,
            StatusCode::OK
        );
    }
    let limited = call(&r.app, "GET", "/v1/models", Some(&key), None).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.json()["error"]["code"], "rate_limit_exceeded");
    let wait: u64 = limited.header("retry-after").parse().unwrap();
    assert!((1..=30).contains(&wait), "{wait}");

    let (key, _) = r
        .ledger
        .create_key(&NewKey {
            tenant: "acme".into(),
            tpm: Some(100),
            ..NewKey::default()
        })
        .await
        .unwrap();
    let mut big = chat("steady", false);
    big["max_tokens"] = json!(500);
    let too_big = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(big),
    )
    .await;
    assert_eq!(too_big.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        too_big.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lower max_tokens")
    );
    assert_eq!(r.upstream.requests("steady"), 0);
}

#[tokio::test]
async fn auto_takes_the_cheapest_route_that_qualifies() {
    let r = router_app().await;
    let mut body = chat("auto", false);
    body["max_tokens"] = json!(8);
    body["temperature"] = json!(0);
    // The local model is the cheapest: 0.036 $/h at 100 tokens/s.
    let local = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(body.clone()),
    )
    .await;
    assert_eq!(
        local.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&local.body)
    );
    assert_eq!(local.header("x-qpai-provider"), "local");
    assert_eq!(local.header("x-qpai-deployment"), "local-small");
    let usage = local.json()["usage"].clone();
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    // $0.10 per 1M out; in is 4x cheaper: 0.025.
    let cost = Usd(prompt * 25_000 + completion * 100_000);
    assert_eq!(local.header("x-qpai-cost-usd"), cost.to_string());

    // Tools: only `steady` has them.
    let mut tools = body.clone();
    tools["tools"] =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let remote = call(&r.app, "POST", "/v1/chat/completions", None, Some(tools)).await;
    assert_eq!(remote.header("x-qpai-deployment"), "steady");
    assert!(
        r.upstream.last_body("steady").unwrap()["tools"].is_array(),
        "passed through"
    );

    // A quality floor above the cheap routes.
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-qpai-min-quality", "0.8")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = r.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.headers()["x-qpai-deployment"], "steady");
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-qpai-min-quality", "high")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = r.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(error["error"]["param"], "x-qpai-min-quality");

    // Nothing qualifies: the reasons are named.
    let mut impossible = body.clone();
    impossible["max_tokens"] = json!(100_000);
    let refused = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(impossible),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("steady") && message.contains("context"),
        "{message}"
    );

    // The served model by its own id still works, billed at its host price.
    let direct = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(json!({
            "model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4
        })),
    )
    .await;
    assert_eq!(direct.header("x-qpai-provider"), "local");
    assert!(!direct.header("x-qpai-cost-usd").is_empty());
    let rows = rows(&r.ledger, "default").await;
    // Billed: the local, tools, quality-floor and direct requests; the two
    // refused before routing cost nothing and are not rows.
    assert_eq!(rows.iter().map(|r| r.requests).sum::<u64>(), 4);
}

#[tokio::test]
async fn text_completions_are_billed_whole_or_streamed() {
    let r = router_app().await;
    let body =
        json!({"model": CHAT_MODEL, "prompt": "Bread is", "max_tokens": 5, "temperature": 0});
    let whole = call(&r.app, "POST", "/v1/completions", None, Some(body.clone())).await;
    assert_eq!(whole.status, StatusCode::OK);
    let usage = whole.json()["usage"].clone();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let stream = call(&r.app, "POST", "/v1/completions", None, Some(streamed)).await;
    let text = String::from_utf8_lossy(&stream.body).to_string();
    assert!(
        !text.contains("\"usage\""),
        "the usage chunk was not asked for: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    r.ledger.flush().await;
    let rows = r
        .ledger
        .usage(&UsageQuery {
            tenant: Some("default".into()),
            ..UsageQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(rows[0].requests, 2);
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        (rows[0].prompt_tokens, rows[0].completion_tokens),
        (2 * prompt, 2 * completion)
    );
    // Priced by the catalog's local deployment of the model.
    assert_eq!(
        rows[0].cost,
        Usd(2 * (prompt * 25_000 + completion * 100_000))
    );
}

#[tokio::test]
async fn spend_recorded_by_another_process_counts_within_seconds() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", shared.path().join("qpai.db").display());
    let a = router_app_on(Some(url.clone()), BreakerConfig::default()).await;
    let b = router_app_on(Some(url), BreakerConfig::default()).await;
    // $0.0001: each request holds about $0.000054 and is billed $0.000017.
    let (key, _) = a
        .ledger
        .create_key(&NewKey {
            tenant: "acme".into(),
            monthly_budget: Some(Usd::parse("0.0001").unwrap()),
            ..NewKey::default()
        })
        .await
        .unwrap();
    a.tenancy.refresh().await;
    b.tenancy.refresh().await;
    let ask = |r: &RouterApp| {
        let (app, key) = (r.app.clone(), key.clone());
        async move {
            call(
                &app,
                "POST",
                "/v1/chat/completions",
                Some(&key),
                Some(chat("steady", false)),
            )
            .await
        }
    };
    assert_eq!(ask(&b).await.status, StatusCode::OK);
    // B's row is in the database (its writer batches rows within
    // milliseconds; under load, later) before A first reads the ledger.
    b.ledger.flush().await;
    assert_eq!(ask(&a).await.status, StatusCode::OK);
    assert_eq!(ask(&a).await.status, StatusCode::OK);
    // 3 x 0.000017 spent in all: B knows of its own 0.000017 only until it
    // re-reads the ledger (every 5 s); then it refuses like A does.
    assert_eq!(ask(&a).await.status, StatusCode::PAYMENT_REQUIRED);
    // A's rows too are in the database before B re-reads it.
    a.ledger.flush().await;
    tokio::time::sleep(Duration::from_millis(5100)).await;
    assert_eq!(ask(&b).await.status, StatusCode::PAYMENT_REQUIRED);
}

#[tokio::test]
async fn a_request_refused_after_its_budget_hold_still_writes_its_row() {
    let r = router_app().await;
    // The model's engine with room for one request at a time.
    let narrow = EngineConfig {
        max_running: 1,
        max_in_flight: 1,
        ..EngineConfig::default()
    };
    r.gateway
        .models
        .add(Engine::start(chat_model().clone(), narrow).unwrap());
    let body = json!({"model": CHAT_MODEL, "prompt": "Bread is", "max_tokens": 200,
        "temperature": 0, "stream": true});
    let request = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    // Holds the engine's one place while its body is not read.
    let occupying = r.app.clone().oneshot(request).await.unwrap();
    assert_eq!(occupying.status(), StatusCode::OK);
    let mut refused = body.clone();
    refused["stream"] = json!(false);
    let answer = call(&r.app, "POST", "/v1/completions", None, Some(refused)).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    drop(occupying);
    let rows = rows(&r.ledger, "default").await;
    // The stream cut by its client and the refused request: one row each.
    assert_eq!(rows.iter().map(|r| r.requests).sum::<u64>(), 2, "{rows:?}");
}
