//! The upstream client against a real HTTP server on loopback that speaks
//! OpenAI's and Azure's wire formats and injects faults: 500, 429 with
//! Retry-After, a slow first byte, a connection reset, a refused connection
//! and a stream cut mid-way; and a stream handed on chunk by chunk.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use qpai::router::upstream::{Timeouts, UpstreamError, UpstreamResponse, Upstreams};
use qpai::router::{Deployment, Endpoint, RouterCatalog};
use serde_json::{Value, json};

/// What the upstream saw last: path and query, auth headers, body.
#[derive(Default, Clone, Debug)]
struct Seen {
    path: String,
    authorization: Option<String>,
    api_key: Option<String>,
    body: Value,
}

type Log = Arc<Mutex<Option<Seen>>>;

async fn answer(mode: &str, body: &Value) -> Response {
    let error = |status: StatusCode, message: &str| {
        let envelope = json!({"error": {"message": message, "type": "server_error"}});
        (status, axum::Json(envelope)).into_response()
    };
    match mode {
        "e500" => error(StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded"),
        "e429" => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "slow down");
            response
                .headers_mut()
                .insert("retry-after", "3".parse().unwrap());
            response
        }
        "slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            axum::Json(json!({})).into_response()
        }
        _ if body["stream"] == true => {
            let cut = mode == "cut";
            let chunks = futures::stream::iter(0..4).then(move |i| async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                if cut && i == 2 {
                    return Err(std::io::Error::other("cut"));
                }
                let chunk = json!({"choices": [{"index": 0, "delta": {"content": format!("t{i}")}}]});
                Ok(bytes::Bytes::from(format!("data: {chunk}\n\n")))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(chunks))
                .unwrap()
        }
        _ => axum::Json(json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }))
        .into_response(),
    }
}

async fn openai(
    State(log): State<Log>,
    Path(mode): Path<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    record(
        &log,
        format!("/{mode}/chat/completions"),
        &headers,
        &body,
        None,
    );
    answer(&mode, &body).await
}

async fn azure(
    State(log): State<Log>,
    Path((mode, deployment)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let path = format!("/{mode}/openai/deployments/{deployment}/chat/completions");
    record(&log, path, &headers, &body, query);
    answer(&mode, &body).await
}

fn record(log: &Log, path: String, headers: &HeaderMap, body: &Value, query: Option<String>) {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string());
    let path = match query {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    *log.lock().unwrap() = Some(Seen {
        path,
        authorization: header("authorization"),
        api_key: header("api-key"),
        body: body.clone(),
    });
}

/// Starts the fake upstream; returns its address and request log.
async fn upstream() -> (String, Log) {
    let log: Log = Arc::default();
    let app = axum::Router::new()
        .route("/{mode}/chat/completions", post(openai))
        .route(
            "/{mode}/openai/deployments/{deployment}/chat/completions",
            post(azure),
        )
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), log)
}

fn deployment(provider: &str, base_url: &str, extra: &str) -> Deployment {
    let text = format!(
        "[[deployment]]\nname = \"d\"\nprovider = \"{provider}\"\nmodel = \"gpt-4o-mini\"\nbase_url = \"{base_url}\"\ninput_usd_per_1m = 1\noutput_usd_per_1m = 2\ncontext_window = 1000\n{extra}"
    );
    RouterCatalog::parse(&text).unwrap().deployments.remove(0)
}

fn client() -> Upstreams {
    Upstreams::new(Timeouts {
        connect: Duration::from_secs(2),
        first_byte: Duration::from_millis(500),
        total: Duration::from_secs(10),
    })
    .unwrap()
}

fn request(stream: bool) -> Value {
    json!({"model": "writer", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

#[tokio::test]
async fn requests_take_each_providers_wire_format() {
    let (base, log) = upstream().await;
    // SAFETY: the variables are unique to this test; nothing else reads them.
    unsafe {
        std::env::set_var("QPAI_TEST_OPENAI_KEY", "sk-test");
        std::env::set_var("QPAI_TEST_AZURE_KEY", "az-test");
    }
    let openai = deployment(
        "openai",
        &format!("{base}/ok"),
        "api_key_env = \"QPAI_TEST_OPENAI_KEY\"",
    );
    let UpstreamResponse::Json(body) = client()
        .call(&openai, Endpoint::ChatCompletions, request(false))
        .await
        .unwrap()
    else {
        panic!("not JSON")
    };
    assert_eq!(body["usage"]["total_tokens"], 6);
    let seen = log.lock().unwrap().clone().unwrap();
    assert_eq!(seen.path, "/ok/chat/completions");
    assert_eq!(seen.authorization.as_deref(), Some("Bearer sk-test"));
    assert_eq!(
        seen.body["model"], "gpt-4o-mini",
        "the upstream's model name"
    );

    let azure = deployment(
        "azure",
        &format!("{base}/ok/"),
        "azure_deployment = \"prod-4o\"\napi_version = \"2024-10-21\"\napi_key_env = \"QPAI_TEST_AZURE_KEY\"",
    );
    client()
        .call(&azure, Endpoint::ChatCompletions, request(true))
        .await
        .unwrap();
    let seen = log.lock().unwrap().clone().unwrap();
    assert_eq!(
        seen.path,
        "/ok/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(seen.api_key.as_deref(), Some("az-test"));
    assert_eq!(seen.authorization, None);
    assert!(
        seen.body.get("model").is_none(),
        "Azure's URL names the model"
    );
    assert_eq!(seen.body["stream_options"]["include_usage"], true);

    let missing = deployment("openai", &base, "api_key_env = \"QPAI_TEST_NO_SUCH_KEY\"");
    let error = client()
        .call(&missing, Endpoint::ChatCompletions, request(false))
        .await
        .err()
        .unwrap();
    assert!(matches!(error, UpstreamError::Config { .. }), "{error}");
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn faults_are_classified_for_the_policy() {
    let (base, _) = upstream().await;
    let call = |mode: String| async move {
        let d = deployment("openai_compatible", &mode, "");
        client()
            .call(&d, Endpoint::ChatCompletions, request(false))
            .await
            .err()
            .unwrap()
    };
    match call(format!("{base}/e500")).await {
        UpstreamError::Status {
            status, message, ..
        } => {
            assert_eq!(status, 500);
            assert_eq!(message, "upstream exploded");
        }
        other => panic!("{other}"),
    }
    let limited = call(format!("{base}/e429")).await;
    assert!(limited.is_retryable());
    assert!(
        matches!(limited, UpstreamError::Status { status: 429, retry_after: Some(s), .. } if s == 3.0),
        "{limited}"
    );
    let started = Instant::now();
    let slow = call(format!("{base}/slow")).await;
    assert!(
        matches!(slow, UpstreamError::FirstByteTimeout { .. }),
        "{slow}"
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    // Nothing listens: refused.
    let port = crate::common::free_port();
    let refused = call(format!("http://127.0.0.1:{port}")).await;
    assert!(
        matches!(refused, UpstreamError::Connect { .. }),
        "{refused}"
    );
    assert!(refused.is_retryable());
    // Accepts, then closes the connection without answering.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(2) {
            drop(stream);
        }
    });
    let reset = call(format!("http://{address}")).await;
    assert!(reset.is_retryable(), "{reset}");
    assert!(
        !matches!(
            reset,
            UpstreamError::Status { .. } | UpstreamError::Config { .. }
        ),
        "{reset}"
    );
}

#[tokio::test]
async fn streams_pass_through_chunk_by_chunk_and_a_cut_is_reported() {
    let (base, _) = upstream().await;
    let ok = deployment("openai", &format!("{base}/ok"), "");
    let started = Instant::now();
    let UpstreamResponse::Stream(mut stream) = client()
        .call(&ok, Endpoint::ChatCompletions, request(true))
        .await
        .unwrap()
    else {
        panic!("not a stream")
    };
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        arrivals.push(started.elapsed());
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert_eq!(text.matches("data: ").count(), 4, "{text}");
    // The upstream spaces its chunks 150 ms apart; they arrive as sent.
    assert!(arrivals.len() >= 3, "{arrivals:?}");
    assert!(
        arrivals[arrivals.len() - 1] - arrivals[0] >= Duration::from_millis(300),
        "{arrivals:?}"
    );

    let cut = deployment("openai", &format!("{base}/cut"), "");
    let UpstreamResponse::Stream(mut stream) = client()
        .call(&cut, Endpoint::ChatCompletions, request(true))
        .await
        .unwrap()
    else {
        panic!("not a stream")
    };
    let mut received = 0;
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(_) => received += 1,
            Err(error) => failure = Some(error),
        }
    }
    assert_eq!(received, 2, "two chunks before the cut");
    assert!(
        matches!(failure, Some(UpstreamError::Broken { .. })),
        "{failure:?}"
    );
}
