//! A scripted OpenAI-compatible upstream on loopback for router tests: each
//! deployment has its own path prefix, a behaviour and a request counter.
//! Behaviours: answer (JSON or a stream with a usage chunk), 500, 429 with
//! Retry-After, a slow first byte, a connection closed without an answer,
//! and a stream cut after some chunks. Chat completions, text completions
//! and embeddings (vectors of `EMBEDDING_DIMENSIONS`) are spoken.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Behaviour {
    /// Answers with this many completion tokens ("w0 w1 ..."), usage reported.
    Answer {
        completion_tokens: u64,
    },
    /// A stream of `chunks` content chunks, cut before the usage chunk.
    CutAfter {
        chunks: u64,
    },
    /// A stream with no usage chunk at all.
    NoUsage,
    Error500,
    TooMany {
        retry_after_s: u64,
    },
    SlowFirstByte {
        seconds: f64,
    },
    /// Closes the connection without answering.
    Reset,
    /// Answers like `Answer`, after `ms` milliseconds.
    SlowAnswer {
        completion_tokens: u64,
        ms: u64,
    },
}

#[derive(Default)]
struct Script {
    /// Behaviours for the next requests, in order, before the default.
    queued: std::collections::VecDeque<Behaviour>,
    default: Option<Behaviour>,
    requests: u64,
    last_body: Option<Value>,
    /// Chat requests being answered now, and the most at once.
    in_flight: u64,
    most_in_flight: u64,
}

/// The upstream: script per deployment, counters.
#[derive(Clone, Default)]
pub struct FakeUpstream {
    scripts: Arc<Mutex<HashMap<String, Script>>>,
    pub base: String,
}

/// Prompt tokens every answer reports.
pub const PROMPT_TOKENS: u64 = 11;

/// The length of the embedder's vectors.
pub const EMBEDDING_DIMENSIONS: usize = 8;

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let mut upstream = FakeUpstream::default();
        let app = axum::Router::new()
            .route("/{name}/v1/chat/completions", post(chat))
            .route("/{name}/v1/completions", post(text))
            .route("/{name}/v1/embeddings", post(embeddings))
            .with_state(upstream.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        upstream.base = format!("http://{address}");
        upstream
    }

    pub fn set(&self, name: &str, default: Behaviour) {
        self.scripts
            .lock()
            .unwrap()
            .entry(name.into())
            .or_default()
            .default = Some(default);
    }

    /// The next requests to `name` behave like these, in order.
    pub fn queue(&self, name: &str, behaviours: &[Behaviour]) {
        self.scripts
            .lock()
            .unwrap()
            .entry(name.into())
            .or_default()
            .queued
            .extend(behaviours.iter().copied());
    }

    pub fn requests(&self, name: &str) -> u64 {
        self.scripts
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |s| s.requests)
    }

    /// The most chat requests `name` answered at once.
    pub fn most_in_flight(&self, name: &str) -> u64 {
        self.scripts
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |s| s.most_in_flight)
    }

    fn in_flight(&self, name: &str, delta: i64) {
        let mut scripts = self.scripts.lock().unwrap();
        let script = scripts.entry(name.into()).or_default();
        script.in_flight = script.in_flight.saturating_add_signed(delta);
        script.most_in_flight = script.most_in_flight.max(script.in_flight);
    }

    /// Writes `dir/router.toml`: one OpenAI-compatible deployment `name`
    /// (model `m-NAME`, streaming) on this upstream, with `extra` TOML lines
    /// (prices, its key's variable); returns its path.
    pub fn write_catalog(&self, dir: &std::path::Path, name: &str, extra: &str) -> String {
        let path = dir.join("router.toml");
        let catalog = format!(
            "[[deployment]]\nname = \"{name}\"\nprovider = \"openai_compatible\"\n\
             model = \"m-{name}\"\nbase_url = \"{}/{name}/v1\"\ncontext_window = 4096\n\
             capabilities = [\"streaming\"]\n{extra}\n",
            self.base
        );
        std::fs::write(&path, catalog).unwrap();
        path.display().to_string()
    }

    pub fn last_body(&self, name: &str) -> Option<Value> {
        self.scripts
            .lock()
            .unwrap()
            .get(name)
            .and_then(|s| s.last_body.clone())
    }
}

fn words(n: u64) -> Vec<String> {
    (0..n).map(|i| format!("w{i} ")).collect()
}

impl FakeUpstream {
    /// Counts a request to `name` and returns its behaviour.
    fn take(&self, name: String, body: &Value) -> Behaviour {
        let mut scripts = self.scripts.lock().unwrap();
        let script = scripts.entry(name).or_default();
        script.requests += 1;
        script.last_body = Some(body.clone());
        if let Some(next) = script.queued.pop_front() {
            return next;
        }
        script.default.unwrap_or(Behaviour::Answer {
            completion_tokens: 3,
        })
    }
}

/// Embeddings: one vector per input (by default), usage reported.
async fn embeddings(
    State(upstream): State<FakeUpstream>,
    Path(name): Path<String>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if upstream.take(name, &body) == Behaviour::Error500 {
        return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response();
    }
    let inputs = body["input"].as_array().map_or(1, Vec::len);
    let data: Vec<Value> = (0..inputs)
        .map(|i| {
            let vector: Vec<f32> = (0..EMBEDDING_DIMENSIONS)
                .map(|d| ((i + d) % 3) as f32)
                .collect();
            json!({"object": "embedding", "index": i, "embedding": vector})
        })
        .collect();
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS},
    }))
    .into_response()
}

/// Text completions: whole, or streamed with a usage chunk.
async fn text(
    State(upstream): State<FakeUpstream>,
    Path(name): Path<String>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let Behaviour::Answer { completion_tokens } = upstream.take(name, &body) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response();
    };
    let model = body["model"].clone();
    let usage = json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens});
    if body["stream"] != true {
        return axum::Json(json!({
            "id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model,
            "choices": [{"index": 0, "text": words(completion_tokens).concat(), "finish_reason": "length"}],
            "usage": usage,
        }))
        .into_response();
    }
    let mut events: Vec<String> = words(completion_tokens)
        .into_iter()
        .map(|w| json!({"id": "c", "object": "text_completion", "model": model, "choices": [{"index": 0, "text": w, "finish_reason": null}]}).to_string())
        .collect();
    events.push(json!({"id": "c", "object": "text_completion", "model": model, "choices": [], "usage": usage}).to_string());
    events.push("[DONE]".into());
    let body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from(body))
        .unwrap()
}

async fn chat(
    State(upstream): State<FakeUpstream>,
    Path(name): Path<String>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut behaviour = upstream.take(name.clone(), &body);
    if let Behaviour::SlowAnswer {
        completion_tokens,
        ms,
    } = behaviour
    {
        upstream.in_flight(&name, 1);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        upstream.in_flight(&name, -1);
        behaviour = Behaviour::Answer { completion_tokens };
    }
    let stream = body["stream"] == true;
    let model = body["model"].clone();
    let error = |status: StatusCode, message: &str| {
        (
            status,
            axum::Json(json!({"error": {"message": message, "type": "server_error"}})),
        )
            .into_response()
    };
    match behaviour {
        Behaviour::Error500 => error(StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded"),
        Behaviour::TooMany { retry_after_s } => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "slow down");
            response
                .headers_mut()
                .insert("retry-after", retry_after_s.to_string().parse().unwrap());
            response
        }
        Behaviour::SlowFirstByte { seconds } => {
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            error(StatusCode::INTERNAL_SERVER_ERROR, "too late")
        }
        Behaviour::Reset => {
            // A body that fails at once: hyper closes the connection
            // without a complete answer.
            Response::builder()
                .header("content-length", "100")
                .body(Body::from_stream(futures::stream::once(async {
                    Err::<bytes::Bytes, _>(std::io::Error::other("reset"))
                })))
                .unwrap()
        }
        Behaviour::Answer { completion_tokens } if !stream => axum::Json(json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": words(completion_tokens).concat()}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion_tokens, "total_tokens": PROMPT_TOKENS + completion_tokens},
        }))
        .into_response(),
        Behaviour::Answer { completion_tokens } => sse(model, completion_tokens, true, true),
        Behaviour::NoUsage => sse(model, 3, false, true),
        Behaviour::CutAfter { chunks } => sse(model, chunks, false, false),
        Behaviour::SlowAnswer { .. } => unreachable!("answered above"),
    }
}

/// A chat stream of `n` word chunks, then (maybe) usage, then (maybe) an end.
fn sse(model: Value, n: u64, usage: bool, complete: bool) -> Response {
    let mut events: Vec<Result<bytes::Bytes, std::io::Error>> = words(n)
        .into_iter()
        .map(|w| {
            let chunk = json!({"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]});
            Ok(format!("data: {chunk}\n\n").into())
        })
        .collect();
    if complete {
        let end = json!({"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        events.push(Ok(format!("data: {end}\n\n").into()));
    }
    if usage {
        let chunk = json!({"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}});
        events.push(Ok(format!("data: {chunk}\n\n").into()));
    }
    if complete {
        events.push(Ok("data: [DONE]\n\n".into()));
    } else {
        events.push(Err(std::io::Error::other("cut")));
    }
    let stream = futures::stream::iter(events).then(|e| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        e
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}
