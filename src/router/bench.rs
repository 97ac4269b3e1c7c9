//! Router benchmarks: `qpai bench-upstream` (an OpenAI-compatible chat
//! endpoint that answers at once, so what is measured is the router in
//! front of it; streams too, and with `--fault-rate` it fails at random,
//! for benches/soak.py's routed soak) and `qpai bench-router` (a load generator: many requests
//! over many connections, reporting requests/s and latency percentiles as
//! one JSON line). benches/router_compare.py runs both against qpai and
//! LiteLLM's proxy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::config::{BenchRouterArgs, BenchUpstreamArgs};

pub async fn upstream(args: BenchUpstreamArgs) -> anyhow::Result<()> {
    let fault_rate = args.fault_rate.clamp(0.0, 1.0);
    let answer = move |axum::Json(body): axum::Json<Value>| async move {
        let fault = (rand::random::<f64>() < fault_rate).then(|| rand::random_range(0..4u8));
        if fault == Some(3) {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        match fault {
            Some(0) => return fault_status(500),
            Some(1) => return closed(),
            _ => {}
        }
        if body["stream"] == true {
            let words = body["max_tokens"].as_u64().unwrap_or(8).clamp(1, 64);
            return stream(body["model"].clone(), words, fault == Some(2));
        }
        axum::Json(json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
        }))
        .into_response()
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(answer))
        .route("/chat/completions", post(answer));
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
    tracing::info!(address = %listener.local_addr()?, "bench upstream listening");
    axum::serve(listener, app).await?;
    Ok(())
}

fn fault_status(status: u16) -> Response {
    let mut response = Response::new(Body::from(
        json!({"error": {"message": "injected fault", "type": "server_error"}}).to_string(),
    ));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response
}

/// A body that fails at once: the connection closes without an answer.
fn closed() -> Response {
    let body = futures::stream::once(async {
        Err::<bytes::Bytes, _>(std::io::Error::other("injected reset"))
    });
    let mut response = Response::new(Body::from_stream(body));
    response
        .headers_mut()
        .insert("content-length", HeaderValue::from(100u64));
    response
}

/// `words` content chunks 5 ms apart, then the usage chunk and `[DONE]`,
/// or (`cut`) a break after half of them.
fn stream(model: Value, words: u64, cut: bool) -> Response {
    let chunk = |delta: Value, finish: Value| {
        let chunk = json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        Ok::<_, std::io::Error>(bytes::Bytes::from(format!("data: {chunk}\n\n")))
    };
    let mut events: Vec<Result<bytes::Bytes, std::io::Error>> = (0..words)
        .map(|i| chunk(json!({"content": format!(" w{i}")}), Value::Null))
        .collect();
    if cut {
        events.truncate((words / 2) as usize);
        events.push(Err(std::io::Error::other("injected cut")));
    } else {
        events.push(chunk(json!({}), json!("stop")));
        let usage = json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": model,
            "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": words,
            "total_tokens": 12 + words}});
        events.push(Ok(format!("data: {usage}\n\n").into()));
        events.push(Ok("data: [DONE]\n\n".into()));
    }
    let paced = futures::StreamExt::then(futures::stream::iter(events), |event| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        event
    });
    let mut response = Response::new(Body::from_stream(paced));
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

pub async fn load(args: BenchRouterArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(60))
        .build()?;
    let url = format!("{}/chat/completions", args.url.trim_end_matches('/'));
    let body = json!({
        "model": args.model,
        "messages": [{"role": "user", "content": "Say ok."}],
        "max_tokens": 1,
    })
    .to_string();
    let send = {
        let (client, url, body, key) =
            (client.clone(), url.clone(), body.clone(), args.key.clone());
        move || {
            let mut request = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone());
            if let Some(key) = &key {
                request = request.bearer_auth(key);
            }
            async move {
                let response = request.send().await.ok()?;
                let ok = response.status().is_success();
                response.bytes().await.ok()?;
                ok.then_some(())
            }
        }
    };
    let rate = args.rate.filter(|r| *r > 0.0);
    let run = |total: usize| {
        let send = send.clone();
        let connections = args.connections;
        async move {
            let next = Arc::new(AtomicUsize::new(0));
            let started = Instant::now();
            let tasks: Vec<_> = (0..connections)
                .map(|_| {
                    let (next, send) = (next.clone(), send.clone());
                    tokio::spawn(async move {
                        let mut latencies = Vec::new();
                        let mut errors = 0usize;
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= total {
                                break;
                            }
                            let sent = match rate {
                                Some(rate) => {
                                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                                    tokio::time::sleep_until(due.into()).await;
                                    due
                                }
                                None => Instant::now(),
                            };
                            match send().await {
                                Some(()) => latencies.push(sent.elapsed().as_secs_f64()),
                                None => errors += 1,
                            }
                        }
                        (latencies, errors)
                    })
                })
                .collect();
            let mut latencies = Vec::with_capacity(total);
            let mut errors = 0;
            for task in tasks {
                let (l, e) = task.await.unwrap_or_default();
                latencies.extend(l);
                errors += e;
            }
            (latencies, errors, started.elapsed().as_secs_f64())
        }
    };
    run(args.warmup).await;
    let (mut latencies, errors, seconds) = run(args.requests).await;
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or(f64::NAN, |s| s * 1000.0)
    };
    println!(
        "{}",
        json!({
            "url": url,
            "connections": args.connections,
            "offered_rate": rate,
            "requests": latencies.len(),
            "errors": errors,
            "seconds": seconds,
            "requests_per_s": latencies.len() as f64 / seconds,
            "p50_ms": percentile(0.50),
            "p90_ms": percentile(0.90),
            "p99_ms": percentile(0.99),
        })
    );
    Ok(())
}
