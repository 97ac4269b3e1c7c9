//! The OpenAI-compatible endpoints, in process, on the real default model.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};

use crate::common::*;

#[tokio::test]
async fn chat_completion_answers_with_exact_usage() {
    let (app, _engine) = app();
    let (status, body) = send_json(
        &app,
        post_json(
            "/v1/chat/completions",
            &chat_body("What is the capital of France?", 12),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], CHAT_MODEL);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    // Usage is exact: the prompt is the rendered template's token count, and
    // the completion is what the text re-tokenizes to (greedy, no stop hit).
    let model = chat_model();
    let template = model.chat_template.as_ref().unwrap();
    let prompt = template
        .render(
            &[qpai::models::TemplateMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
                name: None,
            }],
            true,
        )
        .unwrap();
    let prompt_tokens = model.tokenizer.encode(prompt, false).unwrap().len();
    assert_eq!(body["usage"]["prompt_tokens"], prompt_tokens);
    let completion = body["usage"]["completion_tokens"].as_u64().unwrap();
    match choice["finish_reason"].as_str().unwrap() {
        "length" => assert_eq!(completion, 12),
        "stop" => assert!(completion <= 12),
        other => panic!("finish_reason {other}"),
    }
    assert_eq!(
        body["usage"]["total_tokens"],
        prompt_tokens as u64 + completion
    );
}

#[tokio::test]
async fn streaming_matches_non_streaming_and_reports_usage() {
    let (app, _engine) = app();
    let mut request = chat_body("Name three colors.", 20);
    let (_, whole) = send_json(&app, post_json("/v1/chat/completions", &request)).await;
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let (status, body) = send(&app, post_json("/v1/chat/completions", &request)).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let finish = chunks
        .iter()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null())
    );
    assert_eq!(
        streamed_chat_text(&events),
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn stop_strings_are_cut_and_seed_repeats() {
    let (app, _engine) = app();
    let base = json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        "max_tokens": 60,
        "temperature": 0,
    });
    let (_, free) = send_json(&app, post_json("/v1/chat/completions", &base)).await;
    let free_text = free["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop on something the free answer contains (past its first characters).
    let stop: String = free_text.chars().skip(4).take(2).collect();
    let mut stopped = base.clone();
    stopped["stop"] = json!([stop]);
    let (_, cut) = send_json(&app, post_json("/v1/chat/completions", &stopped)).await;
    let cut_text = cut["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    assert!(!cut_text.contains(&stop), "{cut_text:?} contains {stop:?}");
    assert!(
        free_text.starts_with(cut_text),
        "{free_text:?} / {cut_text:?}"
    );

    let mut sampled = base.clone();
    sampled["temperature"] = json!(1.0);
    sampled["seed"] = json!(1234);
    sampled["max_tokens"] = json!(24);
    let (_, a) = send_json(&app, post_json("/v1/chat/completions", &sampled)).await;
    let (_, b) = send_json(&app, post_json("/v1/chat/completions", &sampled)).await;
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    sampled["seed"] = json!(99);
    sampled["n"] = json!(3);
    let (_, several) = send_json(&app, post_json("/v1/chat/completions", &sampled)).await;
    assert_eq!(several["choices"].as_array().unwrap().len(), 3);
    let texts: Vec<&str> = several["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "n choices are independent draws"
    );
}

#[tokio::test]
async fn logprobs_are_consistent_with_greedy_choice() {
    let (app, _engine) = app();
    let mut body = chat_body("Say hello.", 6);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (status, value) = send_json(&app, post_json("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{value}");
    let content = value["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert!(!content.is_empty());
    for token in content {
        let top = token["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], token["token"]);
        let lp = token["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        assert!(
            top.windows(2)
                .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64())
        );
    }
}

#[tokio::test]
async fn text_completion_and_echo() {
    let (app, _engine) = app();
    let body = json!({"model": CHAT_MODEL, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "echo": true});
    let (status, value) = send_json(&app, post_json("/v1/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{value}");
    assert_eq!(value["object"], "text_completion");
    let text = value["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("The capital of France is"), "{text}");
    assert!(
        text.contains("Paris"),
        "greedy continuation names Paris: {text}"
    );
    assert_eq!(value["usage"]["prompt_tokens"], 5);
    assert_eq!(value["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn models_health_ready_and_metrics() {
    let (app, _engine) = app();
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let (status, list) = send_json(&app, get("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], CHAT_MODEL);
    let (status, one) = send_json(&app, get(&format!("/v1/models/{CHAT_MODEL}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["id"], CHAT_MODEL);
    assert_eq!(one["object"], "model");
    let (status, missing) = send_json(&app, get("/v1/models/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["error"]["code"], "model_not_found");
    assert_eq!(send(&app, get("/health")).await.0, StatusCode::OK);
    let (status, ready) = send_json(&app, get("/ready")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready["ready"], true);
    send_json(&app, post_json("/v1/chat/completions", &chat_body("Hi", 3))).await;
    let (status, text) = send(&app, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(text).unwrap();
    for name in [
        "qpai_http_requests_total",
        "qpai_prompt_tokens_total",
        "qpai_generation_tokens_total",
        "qpai_time_to_first_token_seconds",
        "qpai_time_per_output_token_seconds",
        "qpai_queue_depth",
        "qpai_running_requests",
        "qpai_kv_cache_blocks{",
        "qpai_prefix_cache_queried_tokens_total",
        "qpai_prefix_cache_hit_rate",
    ] {
        assert!(text.contains(name), "missing {name} in /metrics");
    }
}

#[tokio::test]
async fn unknown_model_is_404_and_not_ready_is_503() {
    let gateway = qpai::Gateway::builder().build().unwrap();
    gateway.models.expect(["loading-model".to_string()]);
    let app = qpai::app(gateway, qpai::HttpConfig::default());
    let (status, body) = send_json(&app, Request::get("/ready").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["ready"], false);
    let mut request = chat_body("hi", 2);
    request["model"] = json!("loading-model");
    let (status, body) = send_json(&app, post_json("/v1/chat/completions", &request)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("loading")
    );
}
