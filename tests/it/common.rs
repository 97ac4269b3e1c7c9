//! Shared test helpers: models loaded once per process, an in-process app,
//! request helpers and an SSE parser.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use qpai::catalog::Catalog;
use qpai::catalog::fetch::ModelStore;
use qpai::catalog::resolve::resolve;
use qpai::engine::{Engine, EngineConfig};
use qpai::models::kv_cache::KvCacheConfig;
use qpai::models::{LoadedModel, load_model};
use qpai::{Gateway, HttpConfig};
use serde_json::Value;
use tower::ServiceExt;

pub const CHAT_MODEL: &str = "smollm2-135m-instruct";
pub const BASE_MODEL: &str = "gemma3-270m";

/// The models cache the tests share with `qpai` itself (QPAI_MODELS_DIR or
/// the default under the data dir).
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QPAI_MODELS_DIR") {
        return dir.into();
    }
    let data = std::env::var_os("QPAI_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".local/share/qpai"));
    data.join("models")
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn fixture(name: &str) -> Value {
    let path = fixtures_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn load_catalog_model(id: &str) -> LoadedModel {
    load_catalog_model_with(id, KvCacheConfig::default())
}

/// A catalog model loaded anew (own weights, own KV cache) with `kv_cache`.
pub fn load_catalog_model_with(id: &str, kv_cache: KvCacheConfig) -> LoadedModel {
    let catalog = Catalog::load(None).unwrap();
    let store = ModelStore::new(models_dir()).with_progress(false);
    let mut resolved =
        resolve(id, &catalog, &store).unwrap_or_else(|e| panic!("pulling {id}: {e:#}"));
    resolved.options.kv_cache = kv_cache;
    load_model(&resolved.source, &resolved.options)
        .unwrap_or_else(|e| panic!("loading {id}: {e:#}"))
}

/// An app serving `model` alone, on an engine of its own.
pub fn app_for(model: LoadedModel, config: EngineConfig) -> (axum::Router, Engine) {
    let engine = Engine::start(model, config).unwrap();
    let gateway = Gateway::builder().build().unwrap();
    gateway.models.add(engine.clone());
    (qpai::app(gateway, HttpConfig::default()), engine)
}

/// The default chat model, loaded once for the whole test binary.
pub fn chat_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| load_catalog_model(CHAT_MODEL))
}

/// Gemma 3 270M base, loaded once.
pub fn base_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| load_catalog_model(BASE_MODEL))
}

/// The f32 safetensors copy of the chat model (scripts/test.sh exports it),
/// loaded anew with `kv_cache`.
pub fn f32_checkpoint_with(kv_cache: KvCacheConfig) -> LoadedModel {
    let dir = std::env::var_os("QPAI_TEST_SAFETENSORS_DIR").expect(
        "QPAI_TEST_SAFETENSORS_DIR is not set: run the tests with scripts/test.sh, which exports the f32 copy",
    );
    let mut options = qpai::models::loader::LoadOptions::new("smollm2-f32");
    options.kv_cache = kv_cache;
    load_model(
        &qpai::models::ModelSource::SafetensorsDir(dir.into()),
        &options,
    )
    .unwrap_or_else(|e| panic!("loading the f32 copy: {e:#}"))
}

/// The f32 safetensors copy with the default KV cache, loaded once.
pub fn f32_checkpoint() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| f32_checkpoint_with(KvCacheConfig::default()))
}

/// An app with its own engine (own worker, own counters) over the shared weights.
pub fn app_with(config: EngineConfig, http: HttpConfig) -> (axum::Router, Engine) {
    let engine = Engine::start(chat_model().clone(), config).unwrap();
    let gateway = Gateway::builder().build().unwrap();
    gateway.models.add(engine.clone());
    (qpai::app(gateway, http), engine)
}

pub fn app() -> (axum::Router, Engine) {
    app_with(EngineConfig::default(), HttpConfig::default())
}

pub fn post_json(path: &str, body: &Value) -> Request<Body> {
    post_raw(path, body.to_string().into_bytes())
}

pub fn post_raw(path: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

pub async fn send(app: &axum::Router, request: Request<Body>) -> (StatusCode, Vec<u8>) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, bytes.to_vec())
}

pub async fn send_json(app: &axum::Router, request: Request<Body>) -> (StatusCode, Value) {
    let (status, bytes) = send(app, request).await;
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, value)
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|line| {
            line.strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
        })
        .map(str::to_string)
        .collect()
}

/// Concatenated `delta.content` of choice 0 of a chat stream.
pub fn streamed_chat_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

pub fn chat_body(content: &str, max_tokens: u32) -> Value {
    serde_json::json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// Waits (bounded) until the engine has no queued or running request.
pub async fn wait_idle(engine: &Engine) -> (usize, usize) {
    use std::sync::atomic::Ordering;
    let stats = engine.stats();
    for _ in 0..200 {
        let (w, r) = (
            stats.waiting.load(Ordering::SeqCst),
            stats.running.load(Ordering::SeqCst),
        );
        if w == 0 && r == 0 {
            return (w, r);
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    (
        stats.waiting.load(Ordering::SeqCst),
        stats.running.load(Ordering::SeqCst),
    )
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (up to 120 s) until the server on loopback `port` answers
/// `/ready` with 200.
pub fn wait_ready(port: u16) {
    let started = std::time::Instant::now();
    while ureq::get(&format!("http://127.0.0.1:{port}/ready"))
        .call()
        .is_err()
    {
        assert!(
            started.elapsed().as_secs() < 120,
            "the server on port {port} was not ready in 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `--database-url` for a server or command a test starts: a ledger of its
/// own in `dir`, never the user's database.
pub fn test_database(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("qpai.db").display())
}

/// The qpai binary with its data in `data_dir` and the shared models.
pub fn qpai(data_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qpai"));
    command
        .args(args)
        .env("QPAI_DATA_DIR", data_dir)
        .env("QPAI_MODELS_DIR", models_dir())
        .env_remove("QPAI_DATABASE_URL")
        .env_remove("QPAI_ROUTER_CONFIG");
    command
}

pub fn succeeded(output: Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

/// Runs pytest on `files` (under tests/python/) with the test venv's
/// Python and `env`; fails the test unless every test passed. Returns the
/// report.
pub fn pytest(files: &[&str], env: &[(&str, String)]) -> String {
    let python = std::env::var("QPAI_TEST_PYTHON").expect(
        "QPAI_TEST_PYTHON is not set: run the tests with scripts/test.sh, which installs the openai client",
    );
    let output = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .args(files)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running pytest");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "pytest failed:\n{report}");
    assert!(report.contains(" passed"), "pytest ran no test:\n{report}");
    report
}
