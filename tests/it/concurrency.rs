//! Several requests in flight: each gets exactly its own output, overload is
//! a 429, and a client that leaves frees its slot.

use std::time::Duration;

use axum::http::StatusCode;
use futures::StreamExt;
use qpai::HttpConfig;
use qpai::engine::EngineConfig;
use serde_json::json;
use tower::ServiceExt;

use crate::common::*;

const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three fruits.",
    "What is 12 times 12?",
    "Describe a cat in one sentence.",
    "Give me a name for a bakery.",
    "Why is the sky blue?",
    "Translate 'good morning' to Spanish.",
];

#[tokio::test]
async fn eight_concurrent_streams_equal_their_single_outputs() {
    let (app, engine) = app();
    let mut singles = Vec::new();
    for prompt in PROMPTS {
        let (_, body) = send_json(
            &app,
            post_json("/v1/chat/completions", &chat_body(prompt, 24)),
        )
        .await;
        singles.push(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let streams = PROMPTS.iter().map(|prompt| {
        let app = app.clone();
        let mut body = chat_body(prompt, 24);
        body["stream"] = json!(true);
        async move {
            let (status, bytes) = send(&app, post_json("/v1/chat/completions", &body)).await;
            assert_eq!(status, StatusCode::OK);
            streamed_chat_text(&sse_data(&bytes))
        }
    });
    let together = futures::future::join_all(streams).await;
    for ((prompt, single), streamed) in PROMPTS.iter().zip(&singles).zip(&together) {
        assert_eq!(single, streamed, "prompt {prompt:?}");
    }
    assert_eq!(wait_idle(&engine).await, (0, 0));
}

#[tokio::test]
async fn a_full_engine_answers_429() {
    let (app, engine) = app_with(
        EngineConfig {
            max_running: 1,
            max_in_flight: 1,
            ..EngineConfig::default()
        },
        HttpConfig::default(),
    );
    let mut long = chat_body("Tell me a long story.", 400);
    long["stream"] = json!(true);
    let response = app
        .clone()
        .oneshot(post_json("/v1/chat/completions", &long))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, body) =
        send_json(&app, post_json("/v1/chat/completions", &chat_body("Hi", 2))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["type"], "rate_limit_error");
    drop(response);
    assert_eq!(wait_idle(&engine).await, (0, 0));
    let (status, _) = send_json(&app, post_json("/v1/chat/completions", &chat_body("Hi", 2))).await;
    assert_eq!(status, StatusCode::OK, "the slot is free again");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_slot() {
    use std::sync::atomic::Ordering;
    let (app, engine) = app();
    let mut body = chat_body("Write a very long essay about the history of bread.", 1000);
    body["stream"] = json!(true);
    let response = app
        .clone()
        .oneshot(post_json("/v1/chat/completions", &body))
        .await
        .unwrap();
    let mut frames = response.into_body().into_data_stream();
    // Read a few chunks, so generation is under way.
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(60), frames.next())
            .await
            .expect("a chunk in time")
            .expect("stream open")
            .expect("chunk");
    }
    assert_eq!(engine.stats().running.load(Ordering::SeqCst), 1);
    drop(frames);
    assert_eq!(wait_idle(&engine).await, (0, 0));
    assert_eq!(engine.stats().cancelled.load(Ordering::SeqCst), 1);
}

/// A prompt fed in small chunks (interleaved with other requests' decode
/// steps) gives exactly the answer of a prompt fed at once, while a short
/// request admitted behind it finishes.
#[tokio::test]
async fn chunked_prefill_gives_the_same_answer() {
    let story = "The bakery on Main Street opens at seven. ".repeat(30);
    let question = format!("{story}\nWhen does the bakery open?");
    let (whole_app, _) = app();
    let (_, whole) = send_json(
        &whole_app,
        post_json("/v1/chat/completions", &chat_body(&question, 16)),
    )
    .await;
    let (chunked_app, engine) = app_with(
        EngineConfig {
            prefill_chunk: 32,
            ..EngineConfig::default()
        },
        HttpConfig::default(),
    );
    let long = send_json(
        &chunked_app,
        post_json("/v1/chat/completions", &chat_body(&question, 16)),
    );
    let short = send_json(
        &chunked_app,
        post_json("/v1/chat/completions", &chat_body("Hi", 2)),
    );
    let ((status, chunked), (short_status, _)) = futures::join!(long, short);
    assert_eq!(status, StatusCode::OK, "{chunked}");
    assert_eq!(short_status, StatusCode::OK);
    assert!(chunked["usage"]["prompt_tokens"].as_u64().unwrap() > 300);
    assert_eq!(
        chunked["choices"][0]["message"],
        whole["choices"][0]["message"]
    );
    assert_eq!(chunked["usage"], whole["usage"]);
    assert_eq!(wait_idle(&engine).await, (0, 0));
}
