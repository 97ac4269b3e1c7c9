//! Sites over HTTP (admin, ingest, search), grounded chat answers with
//! citations, and a `qpai ingest` process killed mid-way then re-run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use qpai::engine::{Engine, EngineConfig};
use qpai::rag::{SiteName, Store};
use qpai::{EmbeddingSlot, Gateway, HttpConfig};
use serde_json::{Value, json};

use crate::common::*;
use crate::embeddings::load_embedding;

const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";

async fn rag_app(dir: &std::path::Path) -> axum::Router {
    rag_app_with(dir, HttpConfig::default()).await
}

async fn rag_app_with(dir: &std::path::Path, config: HttpConfig) -> axum::Router {
    let gateway = Gateway::builder()
        .embedding(EmbeddingSlot::new(EMBEDDING_MODEL, 256, || {
            load_embedding(EMBEDDING_MODEL)
        }))
        .rag_store(
            Store::open(&dir.join("rag").display().to_string())
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    gateway
        .models
        .add(Engine::start(chat_model().clone(), EngineConfig::default()).unwrap());
    qpai::app(gateway, config)
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn delete(path: &str) -> Request<Body> {
    Request::delete(path).body(Body::empty()).unwrap()
}

fn documents() -> Value {
    json!({"documents": [
        {"url": "https://shop.example/returns", "title": "Returns", "text": "Unused items can be returned within 30 days for a full refund. Refunds reach your card within five working days."},
        {"url": "https://shop.example/hours", "title": "Opening hours", "html": "<h1>Opening hours</h1><p>The shop is open Monday to Saturday from 9 am to 6 pm. It is closed on Sundays.</p>"},
        {"url": "https://shop.example/care", "title": "Plant care", "markdown": "# Plant care\n\nWater succulents once every two weeks in summer and once a month in winter."},
        {"url": "", "text": "no url"}
    ]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_api_admin_ingest_and_search() {
    let tmp = tempfile::tempdir().unwrap();
    let app = rag_app(tmp.path()).await;
    let (status, created) = send_json(&app, post_json("/v1/sites", &json!({"name": "shop"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["embedding_model"], EMBEDDING_MODEL);
    let (status, again) = send_json(&app, post_json("/v1/sites", &json!({"name": "shop"}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["error"]["code"], "site_exists");

    let (status, report) =
        send_json(&app, post_json("/v1/sites/shop/documents", &documents())).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (report["added"].as_u64(), report["failed"].as_u64()),
        (Some(3), Some(1)),
        "{report}"
    );
    assert_eq!(report["errors"][0]["origin"], "documents[3]");

    let (status, list) = send_json(&app, get("/v1/sites")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"][0]["id"], "shop");
    let (_, stats) = send_json(&app, get("/v1/sites/shop")).await;
    assert_eq!(stats["pages"], 3, "{stats}");
    assert_eq!(stats["dimensions"], 384);

    for mode in ["vector", "fulltext", "hybrid"] {
        let body = json!({"query": "when is the shop closed", "top_k": 2, "mode": mode});
        let (status, found) = send_json(&app, post_json("/v1/sites/shop/search", &body)).await;
        assert_eq!(status, StatusCode::OK, "{found}");
        let first = &found["results"][0];
        assert_eq!(
            first["url"], "https://shop.example/hours",
            "{mode}: {found}"
        );
        for key in ["title", "text", "score", "chunk_id"] {
            assert!(!first[key].is_null(), "{key} missing: {first}");
        }
    }
    let body = json!({"query": "refund", "filter": {"url_prefix": "https://shop.example/care"}});
    let (_, filtered) = send_json(&app, post_json("/v1/sites/shop/search", &body)).await;
    assert!(
        filtered["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["url"] == "https://shop.example/care"),
        "{filtered}"
    );

    for (path, body, status, param) in [
        ("/v1/sites/shop/search", json!({"query": " "}), 400, "query"),
        (
            "/v1/sites/shop/search",
            json!({"query": "x", "top_k": 0}),
            400,
            "top_k",
        ),
        (
            "/v1/sites/shop/search",
            json!({"query": "x", "top_k": 1000}),
            400,
            "top_k",
        ),
        (
            "/v1/sites/shop/search",
            json!({"query": "x", "mode": "fuzzy"}),
            400,
            "mode",
        ),
        (
            "/v1/sites/shop/search",
            json!({"query": "x", "filter": {"path": "/"}}),
            400,
            "filter.path",
        ),
        (
            "/v1/sites/shop/search",
            json!({"query": "x", "colour": 1}),
            400,
            "colour",
        ),
        ("/v1/sites/nope/search", json!({"query": "x"}), 404, "site"),
        (
            "/v1/sites/..%2Fetc/search",
            json!({"query": "x"}),
            400,
            "site",
        ),
        (
            "/v1/sites/shop/documents",
            json!({"documents": []}),
            400,
            "documents",
        ),
        ("/v1/sites", json!({"name": "../x"}), 400, "name"),
    ] {
        let (got, value) = send_json(&app, post_json(path, &body)).await;
        assert_eq!(got.as_u16(), status, "{path} {body}: {value}");
        assert_eq!(value["error"]["param"], param, "{path} {body}: {value}");
    }

    // A sitemap on loopback is refused by default, naming the parameter;
    // a server whose operator allows the host fetches it.
    let base = crate::rag_sources::serve_site().await;
    let body = json!({"sitemap_url": format!("{base}/sitemap.xml")});
    let (status, error) = send_json(&app, post_json("/v1/sites/bikes/documents", &body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["param"], "sitemap_url", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a public address"),
        "{error}"
    );
    let mut config = HttpConfig::default();
    config.fetch.allowed_hosts = vec!["127.0.0.1".to_string()];
    let app = rag_app_with(tmp.path(), config).await;
    let (status, report) = send_json(&app, post_json("/v1/sites/bikes/documents", &body)).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (report["added"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(2)),
        "{report}"
    );

    let (status, deleted) = send_json(&app, delete("/v1/sites/shop")).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    let (status, _) = send_json(&app, get("/v1/sites/shop")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grounded_chat_cites_its_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let app = rag_app(tmp.path()).await;
    let (status, _) = send_json(&app, post_json("/v1/sites/shop/documents", &documents())).await;
    assert_eq!(status, StatusCode::OK);
    let mut body = chat_body("How long do I have to return an item?", 40);
    body["rag"] = json!({"site": "shop", "top_k": 2});
    let (status, answer) = send_json(&app, post_json("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let citations = answer["citations"].as_array().unwrap();
    assert_eq!(citations.len(), 2, "{answer}");
    assert_eq!(citations[0]["index"], 1);
    assert_eq!(
        citations[0]["url"], "https://shop.example/returns",
        "{answer}"
    );
    assert!(citations[0]["chunk_id"].as_str().unwrap().len() == 32);
    let (_, plain) = send_json(
        &app,
        post_json(
            "/v1/chat/completions",
            &chat_body("How long do I have to return an item?", 40),
        ),
    )
    .await;
    assert!(plain.get("citations").is_none());
    // The sources are in the prompt.
    assert!(
        answer["usage"]["prompt_tokens"].as_u64()
            > plain["usage"]["prompt_tokens"].as_u64().map(|n| n + 30)
    );

    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, bytes) = send(&app, post_json("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK);
    let events: Vec<Value> = sse_data(&bytes)
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let finish = events
        .iter()
        .find(|e| !e["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(
        finish["citations"][0]["url"], "https://shop.example/returns",
        "{finish}"
    );
    assert!(events.last().unwrap()["citations"].is_array());
    assert!(events.iter().filter(|e| e["citations"].is_array()).count() == 2);

    for (rag, status, param) in [
        (json!({"site": "nope"}), 404, "rag.site"),
        (json!({"site": "a/b"}), 400, "rag.site"),
        (json!({"site": "shop", "top_k": 0}), 400, "rag.top_k"),
        (json!({"site": "shop", "depth": 3}), 400, "rag.depth"),
    ] {
        let mut body = chat_body("hi", 5);
        body["rag"] = rag.clone();
        let (got, value) = send_json(&app, post_json("/v1/chat/completions", &body)).await;
        assert_eq!(got.as_u16(), status, "{rag}: {value}");
        assert_eq!(value["error"]["param"], param, "{rag}: {value}");
    }
}

fn qpai(rag_uri: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qpai"));
    command
        .arg("--models-dir")
        .arg(models_dir())
        .arg("--rag-uri")
        .arg(rag_uri)
        .arg("--database-url")
        .arg(crate::common::test_database(rag_uri))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_ingest_rerun_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    std::fs::create_dir_all(&site_dir).unwrap();
    for i in 0..320 {
        let body = format!(
            "<p>Product {i} is a handmade ceramic planter, glazed in colour number {}.</p><p>It holds {} litres of soil and ships in {} days.</p>",
            i * 7 % 31,
            i % 9 + 1,
            i % 4 + 2
        );
        std::fs::write(
            site_dir.join(format!("p{i:03}.html")),
            crate::rag::page(&format!("Planter {i}"), "en", &body),
        )
        .unwrap();
    }
    let killed_uri = tmp.path().join("killed");
    let site = site_dir.display().to_string();
    let mut child = qpai(&killed_uri, &["ingest", "--site", "planters", &site])
        .spawn()
        .unwrap();
    let name = SiteName::parse("planters").unwrap();
    let started = Instant::now();
    let mut rows_at_kill = 0;
    while started.elapsed() < Duration::from_secs(120) {
        if let Ok(store) = Store::open(&killed_uri.display().to_string()).await
            && let Ok(ids) = store.chunk_ids(&name).await
            && !ids.is_empty()
        {
            rows_at_kill = ids.len();
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        rows_at_kill > 0 && rows_at_kill < 320,
        "killed at {rows_at_kill} rows"
    );

    let rerun = qpai(
        &killed_uri,
        &["ingest", "--json", "--site", "planters", &site],
    )
    .output()
    .unwrap();
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    let report: Value = serde_json::from_slice(&rerun.stdout).unwrap();
    assert_eq!(report["pages"], 320, "{report}");
    assert!(report["unchanged"].as_u64().unwrap() > 0, "{report}");

    let clean_uri = tmp.path().join("clean");
    let clean = qpai(&clean_uri, &["ingest", "--site", "planters", &site])
        .output()
        .unwrap();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let ids = |uri: std::path::PathBuf| {
        let name = name.clone();
        async move {
            Store::open(&uri.display().to_string())
                .await
                .unwrap()
                .chunk_ids(&name)
                .await
                .unwrap()
        }
    };
    let (killed, clean) = (ids(killed_uri.clone()).await, ids(clean_uri).await);
    assert_eq!(killed.len(), 320);
    assert_eq!(killed, clean);

    // The CLI searches what it ingested.
    let found = qpai(
        &killed_uri,
        &[
            "search",
            "--json",
            "--site",
            "planters",
            "--top-k",
            "1",
            "--mode",
            "fulltext",
            "Product 17 handmade planter",
        ],
    )
    .output()
    .unwrap();
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let found: Value = serde_json::from_slice(&found.stdout).unwrap();
    assert_eq!(found["results"][0]["url"], "p017.html", "{found}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_made_on_the_command_line_can_belong_to_a_tenant() {
    let tmp = tempfile::tempdir().unwrap();
    let uri = tmp.path().join("rag");
    let run = |args: &[&str]| {
        let output = qpai(&uri, args).output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let listed = || {
        let (ok, stdout, stderr) = run(&["sites", "list"]);
        assert!(ok, "{stderr}");
        let mut sites: Vec<String> = stdout.lines().map(str::to_string).collect();
        sites.sort();
        sites
    };
    // Each tenant's names are its own: acme's and globex's `blog` are two
    // sites, stored as NAME.TENANT.
    let (ok, _, stderr) = run(&["sites", "create", "blog", "--tenant", "acme"]);
    assert!(ok, "{stderr}");
    let page = tmp.path().join("page.md");
    std::fs::write(&page, "# Hours\n\nOpen from nine to five.\n").unwrap();
    let ingest = |site: &str, tenant: &str| {
        run(&[
            "ingest",
            "--site",
            site,
            "--tenant",
            tenant,
            page.to_str().unwrap(),
        ])
    };
    let (ok, _, stderr) = ingest("blog", "globex");
    assert!(ok, "{stderr}");
    assert_eq!(listed(), ["blog.acme", "blog.globex"]);
    // A site given to a tenant before names were per tenant keeps its
    // plain name for that tenant.
    let (ok, _, stderr) = run(&["sites", "create", "legacy"]);
    assert!(ok, "{stderr}");
    let ledger = qpai::ledger::Ledger::open(&crate::common::test_database(&uri))
        .await
        .unwrap();
    assert!(ledger.claim_site("legacy", "acme").await.unwrap());
    let (ok, _, stderr) = ingest("legacy", "acme");
    assert!(ok, "{stderr}");
    assert_eq!(listed(), ["blog.acme", "blog.globex", "legacy"]);
    let (ok, _, stderr) = run(&["sites", "delete", "blog.acme"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = run(&["sites", "delete", "legacy"]);
    assert!(ok, "{stderr}");
    assert_eq!(listed(), ["blog.globex"]);
    assert_eq!(
        ledger.site_owner("legacy").await.unwrap(),
        None,
        "deleting releases the name"
    );
}
