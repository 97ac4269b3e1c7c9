//! The isolation matrix: two tenants (acme, globex) and an admin against
//! one server with every kind of resource: adapters, sites (and their
//! search, documents and grounded chat), files, batches, experiments and
//! their feedback, and usage. acme makes one of each; globex then tries to
//! read, use, change and delete every one, and each try must look exactly
//! like the same try on a resource that does not exist. Afterwards acme's
//! resources are all intact, and the admin sees them.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::Device;
use http_body_util::BodyExt;
use qpai::adapters::registry::{AdapterLimits, AdapterRegistry};
use qpai::engine::{Engine, EngineConfig};
use qpai::ledger::{Ledger, NewKey};
use qpai::models::loader::LoadOptions;
use qpai::models::{ModelSource, load_model};
use qpai::{EmbeddingSlot, Gateway, HttpConfig};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::batches::{chat_line, jsonl};
use crate::common::*;
use crate::embeddings::load_embedding;
use crate::files::{BOUNDARY, form};

const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";

struct Reply {
    status: StatusCode,
    body: Value,
    request_id: String,
}

struct Server {
    app: axum::Router,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn send(&self, key: &str, method: &str, path: &str, body: Option<Value>) -> Reply {
        let (content_type, bytes) = match body {
            Some(body) => (
                "application/json".to_string(),
                body.to_string().into_bytes(),
            ),
            None => (String::new(), Vec::new()),
        };
        self.send_raw(key, method, path, &content_type, bytes, &[])
            .await
    }

    async fn send_raw(
        &self,
        key: &str,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {key}"));
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .app
            .clone()
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-qpai-request-id")
            .map_or("", |v| v.to_str().unwrap())
            .to_string();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            request_id,
        }
    }
}

fn copy_adapter(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

/// The server, and keys for acme, globex and the admin.
async fn server() -> (Server, [String; 3]) {
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters");
    for tenant in ["acme", "globex"] {
        copy_adapter(
            &fixtures_dir().join("lora/r4-all"),
            &adapters.join(tenant).join("house"),
        );
    }
    let ledger = Ledger::open(&format!(
        "sqlite://{}",
        dir.path().join("qpai.db").display()
    ))
    .await
    .unwrap();
    let tenancy = qpai::tenancy::Tenancy::new(ledger.clone()).await.unwrap();
    let mut keys = Vec::new();
    for (tenant, admin) in [("acme", false), ("globex", false), ("ops", true)] {
        let new = NewKey {
            tenant: tenant.into(),
            admin,
            ..NewKey::default()
        };
        keys.push(ledger.create_key(&new).await.unwrap().0);
    }
    tenancy.refresh().await;
    let files = qpai::files::Files::new(
        &ledger,
        Arc::new(qpai::files::LocalBlobs::new(dir.path().join("files"))),
    );
    let batches = qpai::batches::Batches::new(&ledger, files.clone());
    let gateway = Gateway::builder()
        .adapters(AdapterRegistry::new(&[adapters], AdapterLimits::default()))
        .tenancy(tenancy)
        .files(files)
        .embedding(EmbeddingSlot::new(EMBEDDING_MODEL, 256, || {
            load_embedding(EMBEDDING_MODEL)
        }))
        .rag_store(
            qpai::rag::Store::open(&dir.path().join("rag").display().to_string())
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    let mut options = LoadOptions::new("tiny");
    options.device = Device::Cpu;
    let tiny = ModelSource::from_path(&fixtures_dir().join("tiny/llama-f32.gguf")).unwrap();
    let tiny = load_model(&tiny, &options).unwrap();
    for model in [chat_model().clone(), tiny] {
        gateway
            .models
            .add(Engine::start(model, EngineConfig::default()).unwrap());
    }
    let app = qpai::app_with_batches(gateway, Some(batches), HttpConfig::default());
    let keys: [String; 3] = keys.try_into().unwrap();
    (Server { app, _dir: dir }, keys)
}

/// What acme made: the ids of its resources.
struct Made {
    file: String,
    batch: String,
    request: String,
}

async fn make_acme_resources(s: &Server, acme: &str) -> Made {
    let adapter = json!({"name": "acme-house", "path": "acme/house", "base": "tiny"});
    let reply = s.send(acme, "POST", "/v1/adapters", Some(adapter)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let site = json!({"name": "acme-site"});
    let reply = s.send(acme, "POST", "/v1/sites", Some(site)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let documents = json!({"documents": [{"url": "https://acme.test/bread",
        "title": "Bread", "text": "Our sourdough is baked every morning at five."}]});
    let reply = s
        .send(
            acme,
            "POST",
            "/v1/sites/acme-site/documents",
            Some(documents),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let lines = jsonl(&[chat_line("one", CHAT_MODEL)]);
    let upload = form(&[("purpose", "batch")], Some(("in.jsonl", &lines)));
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let reply = s
        .send_raw(acme, "POST", "/v1/files", &content_type, upload, &[])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let file = reply.body["id"].as_str().unwrap().to_string();
    let batch = json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
        "completion_window": "24h"});
    let reply = s.send(acme, "POST", "/v1/batches", Some(batch)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let batch = reply.body["id"].as_str().unwrap().to_string();
    let experiment = json!({"id": "acme-exp", "metric": {"name": "reward", "type": "boolean"},
        "variants": [{"name": "a", "model": CHAT_MODEL}, {"name": "b", "model": CHAT_MODEL}]});
    let reply = s
        .send(acme, "POST", "/v1/experiments", Some(experiment))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let chat = json!({"model": "experiment", "max_tokens": 2,
        "messages": [{"role": "user", "content": "Hello"}]});
    let reply = s
        .send_raw(
            acme,
            "POST",
            "/v1/chat/completions",
            "application/json",
            chat.to_string().into_bytes(),
            &[("x-qpai-experiment", "acme-exp")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    Made {
        file,
        batch,
        request: reply.request_id,
    }
}

/// One try of globex's: (method, path on acme's resource, path on an
/// absent one, body with acme's resource, body with an absent one).
type Try = (&'static str, String, String, Option<Value>, Option<Value>);

fn tries(made: &Made) -> Vec<Try> {
    let path = |m: &'static str, a: String, b: String| (m, a, b, None, None);
    let body =
        |m: &'static str, p: &str, a: Value, b: Value| (m, p.into(), p.into(), Some(a), Some(b));
    let chat_on = |model: &str| json!({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]});
    let grounded = |site: &str| {
        json!({"model": CHAT_MODEL, "max_tokens": 2, "rag": {"site": site},
            "messages": [{"role": "user", "content": "When is bread baked?"}]})
    };
    let search = json!({"query": "bread"});
    let feedback = |id: &str| json!({"request_id": id, "metric": "reward", "value": true});
    vec![
        path(
            "GET",
            "/v1/adapters/acme-house".into(),
            "/v1/adapters/nope".into(),
        ),
        path(
            "DELETE",
            "/v1/adapters/acme-house".into(),
            "/v1/adapters/nope".into(),
        ),
        path(
            "GET",
            "/v1/models/acme-house".into(),
            "/v1/models/nope".into(),
        ),
        path(
            "GET",
            "/v1/models/tiny:acme-house".into(),
            "/v1/models/tiny:nope".into(),
        ),
        body(
            "POST",
            "/v1/completions",
            json!({"model": "tiny:acme-house", "prompt": "Hi", "max_tokens": 2}),
            json!({"model": "tiny:nope", "prompt": "Hi", "max_tokens": 2}),
        ),
        body(
            "POST",
            "/v1/chat/completions",
            chat_on("acme-house"),
            chat_on("nope"),
        ),
        path("GET", "/v1/sites/acme-site".into(), "/v1/sites/nope".into()),
        path(
            "DELETE",
            "/v1/sites/acme-site".into(),
            "/v1/sites/nope".into(),
        ),
        (
            "POST",
            "/v1/sites/acme-site/search".into(),
            "/v1/sites/nope/search".into(),
            Some(search.clone()),
            Some(search),
        ),
        body(
            "POST",
            "/v1/chat/completions",
            grounded("acme-site"),
            grounded("nope"),
        ),
        path(
            "GET",
            format!("/v1/files/{}", made.file),
            "/v1/files/file-nope".into(),
        ),
        path(
            "GET",
            format!("/v1/files/{}/content", made.file),
            "/v1/files/file-nope/content".into(),
        ),
        path(
            "DELETE",
            format!("/v1/files/{}", made.file),
            "/v1/files/file-nope".into(),
        ),
        path(
            "GET",
            format!("/v1/batches/{}", made.batch),
            "/v1/batches/batch_nope".into(),
        ),
        path(
            "POST",
            format!("/v1/batches/{}/cancel", made.batch),
            "/v1/batches/batch_nope/cancel".into(),
        ),
        body(
            "POST",
            "/v1/batches",
            json!({"input_file_id": made.file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            json!({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        ),
        path(
            "GET",
            "/v1/experiments/acme-exp".into(),
            "/v1/experiments/nope".into(),
        ),
        body(
            "POST",
            "/v1/feedback",
            feedback(&made.request),
            feedback("req_nope"),
        ),
    ]
}

/// An error envelope with the names of the resource taken out.
fn shape(reply: &Reply, names: &[&str]) -> (StatusCode, String) {
    let mut text = reply.body["error"].to_string();
    let mut names = names.to_vec();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        text = text.replace(name, "<id>");
    }
    (reply.status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tenant_reads_or_changes_anothers_resources() {
    let (s, [acme, globex, admin]) = server().await;
    let made = make_acme_resources(&s, &acme).await;
    let names = [
        "acme-house",
        "nope",
        "acme-site",
        made.file.as_str(),
        "file-nope",
        made.batch.as_str(),
        "batch_nope",
        "acme-exp",
        made.request.as_str(),
        "req_nope",
    ];
    let tries = tries(&made);
    for (method, theirs, absent, theirs_body, absent_body) in &tries {
        let other = s.send(&globex, method, theirs, theirs_body.clone()).await;
        let none = s.send(&globex, method, absent, absent_body.clone()).await;
        assert!(
            other.status.is_client_error(),
            "globex {method} {theirs}: {} {}",
            other.status,
            other.body
        );
        assert_eq!(
            shape(&other, &names),
            shape(&none, &names),
            "globex {method} {theirs} must look like {absent}"
        );
    }
    // Lists show none of acme's.
    for path in [
        "/v1/adapters",
        "/v1/models",
        "/v1/sites",
        "/v1/files",
        "/v1/batches",
        "/v1/experiments",
    ] {
        let list = s.send(&globex, "GET", path, None).await;
        assert_eq!(list.status, StatusCode::OK, "{path}");
        let text = list.body.to_string();
        for name in &names[..8] {
            assert!(!text.contains(name), "globex's {path} shows {name}: {text}");
        }
    }
    // Usage, and the lists and resources an admin reads with `?tenant=`:
    // another tenant's are refused alike, whether it exists or not.
    let for_acme = [
        "/v1/usage?tenant=acme&group_by=tenant".to_string(),
        "/v1/files?tenant=acme".to_string(),
        format!("/v1/files/{}?tenant=acme", made.file),
        "/v1/batches?tenant=acme".to_string(),
        format!("/v1/batches/{}?tenant=acme", made.batch),
        "/v1/experiments?tenant=acme".to_string(),
        "/v1/experiments/acme-exp?tenant=acme".to_string(),
    ];
    for path in &for_acme {
        let theirs = s.send(&globex, "GET", path, None).await;
        let absent = s
            .send(&globex, "GET", &path.replace("acme", "nope"), None)
            .await;
        assert_eq!(theirs.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(shape(&theirs, &names), shape(&absent, &names), "{path}");
    }
    let cancel = format!("/v1/batches/{}/cancel?tenant=acme", made.batch);
    let reply = s.send(&globex, "POST", &cancel, None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let own = s
        .send(&globex, "GET", "/v1/usage?group_by=tenant", None)
        .await;
    assert!(!own.body.to_string().contains("acme"), "{}", own.body);

    // Site names are per tenant: globex ingesting into "acme-site" fills a
    // site of its own of that name.
    let documents =
        json!({"documents": [{"url": "https://globex.test/x", "text": "Overwritten."}]});
    let reply = s
        .send(
            &globex,
            "POST",
            "/v1/sites/acme-site/documents",
            Some(documents),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);

    // acme's resources are all still there and work.
    let reply = s.send(&acme, "GET", "/v1/adapters/acme-house", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let search = json!({"query": "When is bread baked?"});
    let reply = s
        .send(&acme, "POST", "/v1/sites/acme-site/search", Some(search))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let hits = reply.body.to_string();
    assert!(
        hits.contains("sourdough") && !hits.contains("Overwritten"),
        "{hits}"
    );
    let reply = s
        .send(
            &acme,
            "GET",
            &format!("/v1/files/{}/content", made.file),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = s
        .send(&acme, "GET", &format!("/v1/batches/{}", made.batch), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_ne!(reply.body["status"], "cancelling", "{}", reply.body);
    assert_ne!(reply.body["status"], "cancelled", "{}", reply.body);
    let feedback = json!({"request_id": made.request, "metric": "reward", "value": true});
    let reply = s.send(&acme, "POST", "/v1/feedback", Some(feedback)).await;
    assert!(reply.status.is_success(), "{}", reply.body);

    // The admin sees every tenant's sites, adapters and usage, and with
    // `?tenant=` its files, batches and experiments.
    for path in ["/v1/sites/acme-site.acme", "/v1/adapters/acme-house"] {
        let reply = s.send(&admin, "GET", path, None).await;
        assert_eq!(reply.status, StatusCode::OK, "admin {path}: {}", reply.body);
    }
    for (path, shows) in for_acme.iter().zip([
        "acme",
        &made.file,
        &made.file,
        &made.batch,
        &made.batch,
        "acme-exp",
        "acme-exp",
    ]) {
        let reply = s.send(&admin, "GET", path, None).await;
        assert_eq!(reply.status, StatusCode::OK, "admin {path}: {}", reply.body);
        assert!(
            reply.body.to_string().contains(shows),
            "admin {path}: {}",
            reply.body
        );
    }
    let own = s.send(&admin, "GET", "/v1/batches", None).await;
    assert!(!own.body.to_string().contains(&made.batch), "{}", own.body);
    eprintln!(
        "isolation matrix: {} tries by another tenant, all refused as absent",
        tries.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_operations_need_an_admin_key() {
    let (s, [acme, globex, admin]) = server().await;
    // Site names are per tenant. A site the admin makes has no owner: no
    // tenant sees it, and a tenant making the same name makes its own.
    let reply = s
        .send(&admin, "POST", "/v1/sites", Some(json!({"name": "shared"})))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let reply = s.send(&acme, "GET", "/v1/sites/shared", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = s.send(&acme, "DELETE", "/v1/sites/shared", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = s
        .send(&acme, "POST", "/v1/sites", Some(json!({"name": "shared"})))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.body["id"], "shared");
    // Two tenants' sites of one name: neither's create tells of the other,
    // and each reaches its own.
    for key in [&acme, &globex] {
        let reply = s
            .send(key, "POST", "/v1/sites", Some(json!({"name": "mine"})))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    }
    let reply = s
        .send(&globex, "POST", "/v1/sites", Some(json!({"name": "mine"})))
        .await;
    assert_eq!(
        reply.status,
        StatusCode::CONFLICT,
        "its own exists: {}",
        reply.body
    );
    assert_eq!(reply.body["error"]["param"], "name");
    let documents = |text: &str| json!({"documents": [{"url": "https://x.test/a", "title": "A", "text": text}]});
    for (key, text) in [(&acme, "Acme bakes rye."), (&globex, "Globex sells bolts.")] {
        let reply = s
            .send(
                key,
                "POST",
                "/v1/sites/mine/documents",
                Some(documents(text)),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    let search = json!({"query": "What does the shop sell?"});
    let reply = s
        .send(&globex, "POST", "/v1/sites/mine/search", Some(search))
        .await;
    let hits = reply.body.to_string();
    assert!(hits.contains("bolts") && !hits.contains("rye"), "{hits}");
    let reply = s.send(&globex, "DELETE", "/v1/sites/mine", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let reply = s.send(&acme, "GET", "/v1/sites/mine", None).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "globex deleted acme's: {}",
        reply.body
    );
    // The admin sees every stored site with its owner, and reaches a
    // tenant's as NAME.TENANT.
    let listed = |reply: Reply| -> Vec<(String, Value)> {
        let mut sites: Vec<_> = reply.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["id"].as_str().unwrap().to_string(), s["owner"].clone()))
            .collect();
        sites.sort_by(|a, b| a.0.cmp(&b.0));
        sites
    };
    let all = listed(s.send(&admin, "GET", "/v1/sites", None).await);
    for (id, owner) in [
        ("shared", Value::Null),
        ("shared.acme", json!("acme")),
        ("mine.acme", json!("acme")),
    ] {
        assert!(
            all.contains(&(id.to_string(), owner)),
            "{id} not in {all:?}"
        );
    }
    let reply = s.send(&admin, "GET", "/v1/sites/mine.acme", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let own = listed(s.send(&acme, "GET", "/v1/sites", None).await);
    let own: Vec<&str> = own.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(own, ["mine", "shared"]);

    // Shared adapters: loaded and unloaded by the admin only; a tenant
    // loads from its own folder only.
    let shared = json!({"name": "shared", "path": "acme/house", "base": "tiny"});
    let reply = s
        .send(
            &acme,
            "POST",
            "/v1/adapters",
            Some(json!({"name": "x",
        "path": "globex/house", "base": "tiny"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["param"], "path");
    let reply = s.send(&admin, "POST", "/v1/adapters", Some(shared)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let reply = s.send(&acme, "DELETE", "/v1/adapters/shared", None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    assert_eq!(
        reply.body["error"]["type"], "permission_error",
        "{}",
        reply.body
    );
    let reply = s.send(&admin, "DELETE", "/v1/adapters/shared", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);

    // Every tenant's usage: the admin's.
    let reply = s.send(&acme, "GET", "/v1/usage?tenant=globex", None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = s
        .send(&admin, "GET", "/v1/usage?group_by=tenant", None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}
