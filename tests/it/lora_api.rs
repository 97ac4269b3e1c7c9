//! Adapters served per request over HTTP, on the tiny Llama GGUF base with
//! the PEFT fixture adapters: `BASE:ADAPTER` and alias routing, the admin
//! API (load, list, unload), the LRU caps, isolation of concurrent requests
//! on different adapters, and bad adapters refused whole while the server
//! keeps serving.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::{DType, Device, Tensor};
use qpai::adapters::registry::{AdapterLimits, AdapterRegistry};
use qpai::engine::{Engine, EngineConfig};
use qpai::models::loader::LoadOptions;
use qpai::models::{ModelSource, load_model};
use qpai::{Gateway, HttpConfig};
use serde_json::{Value, json};

use crate::common::{fixtures_dir, post_json, send_json};

const BASE: &str = "tiny";

/// An app serving the tiny base with `root` as its adapter directory.
fn app(root: &Path, limits: AdapterLimits) -> axum::Router {
    qpai::app(gateway(root, limits, None), HttpConfig::default())
}

fn gateway(
    root: &Path,
    limits: AdapterLimits,
    tenancy: Option<std::sync::Arc<qpai::tenancy::Tenancy>>,
) -> std::sync::Arc<Gateway> {
    let path = fixtures_dir().join("tiny/llama-f32.gguf");
    let mut options = LoadOptions::new(BASE);
    options.device = Device::Cpu;
    let model = load_model(&ModelSource::from_path(&path).unwrap(), &options).unwrap();
    let mut builder =
        Gateway::builder().adapters(AdapterRegistry::new(&[root.to_path_buf()], limits));
    if let Some(tenancy) = tenancy {
        builder = builder.tenancy(tenancy);
    }
    let gateway = builder.build().unwrap();
    gateway
        .models
        .add(Engine::start(model, EngineConfig::default()).unwrap());
    gateway
}

/// A temporary adapter directory holding copies of the fixture adapters.
fn adapter_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for name in ["r4-all", "r8-rslora"] {
        copy_adapter(
            &fixtures_dir().join("lora").join(name),
            &root.path().join(name),
        );
    }
    root
}

fn copy_adapter(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

async fn complete(app: &axum::Router, model: &str) -> (StatusCode, Value) {
    let body = json!({
        "model": model,
        "prompt": "the cat sat on",
        "max_tokens": 12,
        "temperature": 0,
    });
    send_json(app, post_json("/v1/completions", &body)).await
}

fn text(body: &Value) -> String {
    body["choices"][0]["text"].as_str().unwrap().to_string()
}

async fn load(app: &axum::Router, name: &str, path: &Path) -> (StatusCode, Value) {
    let body = json!({"name": name, "path": path, "base": BASE});
    send_json(app, post_json("/v1/adapters", &body)).await
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn delete(path: &str) -> Request<Body> {
    Request::delete(path).body(Body::empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_on_different_adapters_each_get_their_own_output() {
    let root = adapter_root();
    let app = app(root.path(), AdapterLimits::default());
    // Adapters found by directory name on first use, under both names.
    let models = ["tiny", "tiny:r4-all", "r8-rslora", "tiny:r8-rslora"];
    let mut alone = Vec::new();
    for model in models {
        let (status, body) = complete(&app, model).await;
        assert_eq!(status, StatusCode::OK, "{model}: {body}");
        assert_eq!(body["model"], model);
        alone.push(text(&body));
    }
    assert_ne!(alone[0], alone[1], "r4-all changes the output");
    assert_ne!(alone[0], alone[2], "r8-rslora changes the output");
    assert_ne!(alone[1], alone[2]);
    assert_eq!(alone[2], alone[3], "alias and BASE:ADAPTER are one adapter");
    // 16 requests at once, mixed: decoded in shared batches.
    let requests = (0..16).map(|i| {
        let app = app.clone();
        let model = models[i % models.len()];
        async move { (i, complete(&app, model).await) }
    });
    for (i, (status, body)) in futures::future::join_all(requests).await {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            text(&body),
            alone[i % models.len()],
            "request {i} ({})",
            models[i % 4]
        );
    }
}

#[tokio::test]
async fn the_admin_api_loads_lists_and_unloads_adapters() {
    let root = adapter_root();
    let app = app(root.path(), AdapterLimits::default());
    let (status, body) = load(&app, "house", &root.path().join("r4-all")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["resident"], true);
    assert_eq!(body["base"], BASE);
    assert_eq!(body["origin"], "admin_api");
    let bytes = body["bytes"].as_u64().unwrap();
    assert!(bytes > 0);
    // A relative path is taken inside the adapter directory.
    let (status, body) = load(&app, "other", Path::new("r8-rslora")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = load(&app, "house", &root.path().join("r4-all")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["param"], "name");

    let (_, list) = send_json(&app, get("/v1/adapters")).await;
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["house", "other"]);
    let (_, models) = send_json(&app, get("/v1/models")).await;
    let card = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "tiny:house")
        .cloned()
        .unwrap_or_else(|| panic!("{models}"));
    assert_eq!(card["parent"], BASE);

    let (status, house) = complete(&app, "house").await;
    assert_eq!(status, StatusCode::OK);
    let (_, same) = complete(&app, "tiny:r4-all").await;
    assert_eq!(
        text(&house),
        text(&same),
        "the same files give the same output"
    );

    let (status, body) = send_json(&app, delete("/v1/adapters/house")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["bytes"].as_u64(), Some(bytes));
    let (status, body) = complete(&app, "house").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["param"], "model");
    let (status, _) = send_json(&app, delete("/v1/adapters/house")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = complete(&app, "tiny:house").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn idle_adapters_are_evicted_least_recently_used_first() {
    let root = adapter_root();
    let limits = AdapterLimits {
        max_resident: 1,
        max_bytes: 1 << 30,
    };
    let app = app(root.path(), limits);
    let (_, first) = complete(&app, "tiny:r4-all").await;
    let (status, _) = complete(&app, "tiny:r8-rslora").await;
    assert_eq!(status, StatusCode::OK);
    let (_, status) = send_json(&app, get("/v1/adapters/r4-all")).await;
    assert_eq!(status["resident"], false, "{status}");
    let (_, status) = send_json(&app, get("/v1/adapters/r8-rslora")).await;
    assert_eq!(status["resident"], true, "{status}");
    // Evicted adapters reload on demand, with the same output.
    let (_, again) = complete(&app, "tiny:r4-all").await;
    assert_eq!(text(&first), text(&again));
    // A byte cap below one adapter's size refuses it clearly.
    let limits = AdapterLimits {
        max_resident: 8,
        max_bytes: 1000,
    };
    let app = self::app(root.path(), limits);
    let (status, body) = complete(&app, "tiny:r4-all").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than the 1000 bytes allowed")
    );
}

/// Writes a PEFT adapter directory with the given config and tensors.
fn write_adapter(dir: &Path, config: &Value, tensors: &[(&str, Tensor)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
    dir.to_path_buf()
}

fn q_proj(half: &str) -> String {
    format!("base_model.model.model.layers.0.self_attn.q_proj.lora_{half}.weight")
}

#[tokio::test]
async fn bad_adapters_are_refused_whole_and_the_server_keeps_serving() {
    let root = adapter_root();
    let outside = tempfile::tempdir().unwrap();
    let app = app(root.path(), AdapterLimits::default());
    let (_, before) = complete(&app, BASE).await;
    let config =
        json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]});
    let ones = |rows, cols| Tensor::ones((rows, cols), DType::F32, &Device::Cpu).unwrap();
    let nan = (ones(2, 64) * f64::NAN).unwrap();
    let dir = root.path();
    let cases: Vec<(&str, PathBuf, &str, &str)> = vec![
        (
            "outside",
            copy_to(
                &fixtures_dir().join("lora/r4-all"),
                &outside.path().join("a"),
            ),
            "path",
            "not inside an adapter directory",
        ),
        (
            "missing",
            dir.join("no-such-adapter"),
            "path",
            "does not exist",
        ),
        (
            "nan",
            write_adapter(
                &dir.join("nan"),
                &config,
                &[(&q_proj("A"), nan), (&q_proj("B"), ones(64, 2))],
            ),
            "path",
            "NaN",
        ),
        (
            "shapes",
            write_adapter(
                &dir.join("shapes"),
                &config,
                &[(&q_proj("A"), ones(2, 32)), (&q_proj("B"), ones(64, 2))],
            ),
            "path",
            "another base",
        ),
        (
            "embedding",
            write_adapter(
                &dir.join("embedding"),
                &json!({"r": 2, "lora_alpha": 4, "target_modules": ["embed_tokens"]}),
                &[(&q_proj("A"), ones(2, 64)), (&q_proj("B"), ones(64, 2))],
            ),
            "path",
            "embed_tokens",
        ),
        (
            "dora",
            write_adapter(
                &dir.join("dora"),
                &json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_dora": true}),
                &[(&q_proj("A"), ones(2, 64)), (&q_proj("B"), ones(64, 2))],
            ),
            "path",
            "DoRA",
        ),
        (
            "truncated",
            truncated(&dir.join("truncated")),
            "path",
            "safetensors",
        ),
        (
            "../escape",
            dir.join("r4-all"),
            "name",
            "invalid adapter name",
        ),
    ];
    for (name, path, param, message) in cases {
        let (status, body) = load(&app, name, &path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
        assert_eq!(body["error"]["param"], param, "{name}: {body}");
        let text = body["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{name}: {text}");
        // Nothing was kept.
        let (status, _) = send_json(&app, get(&format!("/v1/adapters/{name}"))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{name}");
    }
    // Found by name on first use, a broken adapter fails that request only.
    let (status, body) = complete(&app, "tiny:nan").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "model");
    let (status, after) = complete(&app, BASE).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text(&before), text(&after));
    let (status, _) = complete(&app, "tiny:r4-all").await;
    assert_eq!(status, StatusCode::OK);
}

fn copy_to(from: &Path, to: &Path) -> PathBuf {
    copy_adapter(from, to);
    to.to_path_buf()
}

fn truncated(dir: &Path) -> PathBuf {
    copy_adapter(&fixtures_dir().join("lora/r4-all"), dir);
    let file = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 3]).unwrap();
    dir.to_path_buf()
}

/// Resident memory of a process, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// A rank-`rank` adapter on every projection of the tiny base (random factors).
fn large_adapter(dir: &Path, rank: usize) {
    let config = json!({"r": rank, "lora_alpha": 8, "target_modules": "all-linear"});
    let shapes = [
        ("self_attn", "q_proj", 64, 64),
        ("self_attn", "k_proj", 64, 32),
        ("self_attn", "v_proj", 64, 32),
        ("self_attn", "o_proj", 64, 64),
        ("mlp", "gate_proj", 64, 128),
        ("mlp", "up_proj", 64, 128),
        ("mlp", "down_proj", 128, 64),
    ];
    let mut tensors = Vec::new();
    for layer in 0..2 {
        for (block, projection, inputs, outputs) in shapes {
            let key = |half: &str| {
                format!(
                    "base_model.model.model.layers.{layer}.{block}.{projection}.lora_{half}.weight"
                )
            };
            let a = Tensor::randn(0f32, 0.01, (rank, inputs), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 0.01, (outputs, rank), &Device::Cpu).unwrap();
            tensors.push((key("A"), a));
            tensors.push((key("B"), b));
        }
    }
    let refs: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.clone()))
        .collect();
    write_adapter(dir, &config, &refs);
}

#[test]
fn unloading_an_adapter_returns_its_memory() {
    use std::process::{Command, Stdio};
    let root = tempfile::tempdir().unwrap();
    let rag = tempfile::tempdir().unwrap();
    large_adapter(&root.path().join("large"), 8192);
    let port = crate::common::free_port();
    let model = fixtures_dir().join("tiny/llama-f32.gguf");
    let server = crate::common::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_qpai"))
            .args([
                "serve",
                "--port",
                &port.to_string(),
                "--embedding-model",
                "",
            ])
            .arg("--model")
            .arg(&model)
            .arg("--adapter-dir")
            .arg(root.path())
            .arg("--rag-uri")
            .arg(rag.path())
            .arg("--database-url")
            .arg(crate::common::test_database(rag.path()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base_url = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    while ureq::get(&format!("{base_url}/ready")).call().is_err() {
        assert!(started.elapsed().as_secs() < 60, "server not ready");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = server.0.id();
    let before = resident_bytes(pid);
    let loaded: Value = ureq::post(&format!("{base_url}/v1/adapters"))
        .send_json(json!({"name": "large", "path": "large"}))
        .unwrap()
        .into_json()
        .unwrap();
    let bytes = loaded["bytes"].as_u64().unwrap();
    assert!(bytes > 50 << 20, "{loaded}");
    let with_adapter = resident_bytes(pid);
    ureq::delete(&format!("{base_url}/v1/adapters/large"))
        .call()
        .unwrap();
    let after = resident_bytes(pid);
    eprintln!(
        "adapter {} MiB; server RSS {} -> {} -> {} MiB",
        bytes >> 20,
        before >> 20,
        with_adapter >> 20,
        after >> 20
    );
    assert!(
        with_adapter >= before + bytes * 9 / 10,
        "loading took memory"
    );
    assert!(
        after + bytes * 9 / 10 <= with_adapter,
        "unloading returned {} of {} MiB",
        (with_adapter.saturating_sub(after)) >> 20,
        bytes >> 20
    );
    // The base still serves.
    let reply = ureq::post(&format!("{base_url}/v1/completions"))
        .send_json(json!({"model": loaded["base"], "prompt": "hi", "max_tokens": 2}));
    assert!(reply.is_ok());
}

/// Starts `qpai serve` on the tiny base with `extra` flags; waits for /ready.
fn serve_tiny(extra: &[&str]) -> (crate::common::KillOnDrop, String, tempfile::TempDir) {
    use std::process::{Command, Stdio};
    let rag = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qpai"))
        .args([
            "serve",
            "--port",
            &port.to_string(),
            "--embedding-model",
            "",
        ])
        .arg("--model")
        .arg(fixtures_dir().join("tiny/llama-f32.gguf"))
        .arg("--rag-uri")
        .arg(rag.path())
        .arg("--database-url")
        .arg(crate::common::test_database(rag.path()))
        .arg("--adapter-dir")
        .arg(rag.path())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base_url = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    while ureq::get(&format!("{base_url}/ready")).call().is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut error = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut error)
                .unwrap();
            panic!("qpai serve exited ({status}): {error}");
        }
        assert!(started.elapsed().as_secs() < 60, "server not ready");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (crate::common::KillOnDrop(child), base_url, rag)
}

fn http_complete(base_url: &str, model: &str) -> String {
    let body: Value = ureq::post(&format!("{base_url}/v1/completions"))
        .send_json(
            json!({"model": model, "prompt": "the cat sat on", "max_tokens": 12, "temperature": 0}),
        )
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(body["model"], model);
    text(&body)
}

#[test]
fn lora_flags_serve_an_adapter_merged_or_per_request_with_the_same_output() {
    let adapter = fixtures_dir().join("lora/r4-all");
    let flag = format!("r4={}", adapter.display());
    let (_unmerged_server, unmerged, _dir) = serve_tiny(&["--lora", &flag]);
    let (_merged_server, merged, _dir2) = serve_tiny(&["--lora", &flag, "--merge"]);
    let models: Value = ureq::get(&format!("{merged}/v1/models"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let card = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "r4")
        .cloned()
        .unwrap_or_else(|| panic!("{models}"));
    assert_eq!(card["parent"], base.as_str());
    let per_request = http_complete(&unmerged, "r4");
    assert_eq!(per_request, http_complete(&unmerged, &format!("{base}:r4")));
    assert_eq!(per_request, http_complete(&merged, "r4"));
    assert_eq!(per_request, http_complete(&merged, &format!("{base}:r4")));
    assert_eq!(
        http_complete(&unmerged, &base),
        http_complete(&merged, &base)
    );
    assert_ne!(per_request, http_complete(&merged, &base));
}

#[test]
fn a_bad_lora_flag_stops_the_start_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_qpai"))
        .args(["serve", "--port", "0", "--embedding-model", ""])
        .arg("--model")
        .arg(fixtures_dir().join("tiny/llama-f32.gguf"))
        .arg("--rag-uri")
        .arg(dir.path())
        .arg("--database-url")
        .arg(crate::common::test_database(dir.path()))
        .arg("--lora")
        .arg(format!(
            "bad={}",
            fixtures_dir().join("tiny/llama-bf16").display()
        ))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("adapter_config.json"), "{stderr}");
}

/// `request` sent with `key`.
fn send_as(
    app: &axum::Router,
    key: &str,
    mut request: Request<Body>,
) -> impl Future<Output = (StatusCode, Value)> + use<> {
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let app = app.clone();
    async move { send_json(&app, request).await }
}

#[tokio::test]
async fn a_tenants_adapters_are_its_own() {
    use qpai::ledger::{Ledger, NewKey};
    let root = adapter_root();
    copy_adapter(
        &fixtures_dir().join("lora/r4-all"),
        &root.path().join("acme/house"),
    );
    let db = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(db.path().join("qpai.db").to_str().unwrap())
        .await
        .unwrap();
    let tenancy = qpai::tenancy::Tenancy::new(ledger.clone()).await.unwrap();
    let gateway = gateway(root.path(), AdapterLimits::default(), Some(tenancy));
    let key = |tenant: &str, admin: bool| {
        let ledger = ledger.clone();
        let new = NewKey {
            tenant: tenant.into(),
            admin,
            ..NewKey::default()
        };
        async move { ledger.create_key(&new).await.unwrap().0 }
    };
    let (acme, globex, admin) = (
        key("acme", false).await,
        key("globex", false).await,
        key("ops", true).await,
    );
    gateway.tenancy.as_ref().unwrap().refresh().await;
    let app = qpai::app(gateway, HttpConfig::default());
    let load_as = |key: &str, name: &str, path: PathBuf| {
        let body = json!({"name": name, "path": path, "base": BASE});
        send_as(&app, key, post_json("/v1/adapters", &body))
    };
    let complete_as = |key: &str, model: &str| {
        let body =
            json!({"model": model, "prompt": "the cat sat on", "max_tokens": 4, "temperature": 0});
        send_as(&app, key, post_json("/v1/completions", &body))
    };
    let names = |body: Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect()
    };

    let (status, body) = load_as(&acme, "acme-house", root.path().join("acme/house")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["owner"], "acme");
    let (status, body) = load_as(&acme, "stolen", root.path().join("r4-all")).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("path")),
        "{body}"
    );
    let (status, _) = load_as(&admin, "shared", root.path().join("r8-rslora")).await;
    assert_eq!(status, StatusCode::CREATED);

    // globex sees the shared adapter, not acme's, and cannot run or drop it.
    assert_eq!(
        names(send_as(&app, &globex, get("/v1/adapters")).await.1),
        ["shared"]
    );
    assert_eq!(
        send_as(&app, &globex, get("/v1/adapters/acme-house"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    for model in ["acme-house", "tiny:acme-house"] {
        let (status, body) = complete_as(&globex, model).await;
        assert!(status.is_client_error(), "{model}: {status} {body}");
    }
    let models = send_as(&app, &globex, get("/v1/models")).await.1;
    assert!(!models.to_string().contains("acme-house"), "{models}");
    assert_eq!(
        send_as(&app, &globex, delete("/v1/adapters/acme-house"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send_as(&app, &globex, delete("/v1/adapters/shared"))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(complete_as(&globex, "shared").await.0, StatusCode::OK);

    // acme runs its own; the admin sees everything.
    assert_eq!(complete_as(&acme, "acme-house").await.0, StatusCode::OK);
    let mut all = names(send_as(&app, &admin, get("/v1/adapters")).await.1);
    all.sort();
    assert_eq!(all, ["acme-house", "shared"]);
    assert_eq!(
        send_as(&app, &acme, delete("/v1/adapters/acme-house"))
            .await
            .0,
        StatusCode::OK
    );
}
