//! Router benchmarks: `qpai bench-upstream` (an OpenAI-compatible chat
//! endpoint that answers at once, so what is measured is the router in
//! front of it) and `qpai bench-router` (a load generator: many requests
//! over many connections, reporting requests/s and latency percentiles as
//! one JSON line). benches/router_compare.py runs both against qpai and
//! LiteLLM's proxy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::routing::post;
use serde_json::{Value, json};

use crate::config::{BenchRouterArgs, BenchUpstreamArgs};

pub async fn upstream(args: BenchUpstreamArgs) -> anyhow::Result<()> {
    let answer = |axum::Json(body): axum::Json<Value>| async move {
        axum::Json(json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
        }))
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(answer))
        .route("/chat/completions", post(answer));
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
    tracing::info!(address = %listener.local_addr()?, "bench upstream listening");
    axum::serve(listener, app).await?;
    Ok(())
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
