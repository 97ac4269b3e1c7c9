//! Structured outputs, tool calls and logit_bias on the default local model,
//! in process. (The official client drives the same features over HTTP in
//! tests/python/test_structured_outputs.py, where every answer is checked
//! with an independent JSON Schema validator.)

use axum::http::StatusCode;
use serde_json::{Value, json};

use qpai::structured::OutputFormat;

use crate::common::*;

const CHAT: &str = "/v1/chat/completions";

/// The schema corpus: (file name, case).
fn corpus() -> Vec<(String, Value)> {
    cases_in(&fixtures_dir().join("schemas"))
}

/// The cases of one corpus folder, by file name.
fn cases_in(dir: &std::path::Path) -> Vec<(String, Value)> {
    let mut cases: Vec<(String, Value)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let case = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), case)
        })
        .collect();
    cases.sort_by(|a, b| a.0.cmp(&b.0));
    cases
}

fn schema_request(case: &Value, max_tokens: u32) -> Value {
    json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": case["prompt"]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": case["name"], "strict": case["strict"], "schema": case["schema"]}},
    })
}

#[tokio::test]
async fn every_corpus_schema_compiles_and_the_cache_returns_it() {
    let (_app, engine) = app();
    let cases = corpus();
    assert!(cases.len() >= 30, "the corpus has {} schemas", cases.len());
    // Recursive schemas are enforced too; they are kept out of the answered
    // corpus because a small model may nest them until max_tokens.
    let recursive = cases_in(&fixtures_dir().join("schemas").join("recursive"));
    assert_eq!(recursive.len(), 2);
    for (file, case) in cases.iter().chain(&recursive) {
        // Checked and compiled as a request's response_format is.
        let format = schema_request(case, 1)["response_format"].clone();
        let spec = OutputFormat::parse(Some(&format))
            .unwrap_or_else(|e| panic!("{file}: {}", e.message))
            .grammar()
            .unwrap();
        engine
            .grammars()
            .compile(spec.clone())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        engine.grammars().compile(spec).unwrap();
    }
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": false},
        "strict": true}}])
}

#[tokio::test]
async fn constrained_and_free_sequences_share_a_batch_without_changing_either() {
    let (app, _engine) = app();
    let (_, case) = corpus().into_iter().next().unwrap();
    let constrained = schema_request(&case, 400);
    let free = chat_body("Write two sentences about the sea.", 40);
    let ask = |body: Value| {
        let app = app.clone();
        async move {
            let (status, answer) = send_json(&app, post_json(CHAT, &body)).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            answer["choices"][0].clone()
        }
    };
    let alone = (ask(constrained.clone()).await, ask(free.clone()).await);
    let together = tokio::join!(ask(constrained), ask(free));
    assert_eq!(alone.0["message"], together.0["message"]);
    assert_eq!(alone.1["message"], together.1["message"]);
    assert_eq!(together.0["finish_reason"], "stop", "{}", together.0);
    let text = together.0["message"]["content"].as_str().unwrap();
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    for key in case["schema"]["required"].as_array().unwrap() {
        assert!(
            value.get(key.as_str().unwrap()).is_some(),
            "{key} in {text}"
        );
    }
    // The free answer is not bound to JSON.
    assert!(
        serde_json::from_str::<Value>(together.1["message"]["content"].as_str().unwrap()).is_err()
    );
}

#[tokio::test]
async fn a_streamed_schema_answer_equals_the_whole_one() {
    let (app, _engine) = app();
    let (_, case) = corpus().into_iter().nth(1).unwrap();
    let body = schema_request(&case, 400);
    let (status, whole) = send_json(&app, post_json(CHAT, &body)).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, bytes) = send(&app, post_json(CHAT, &streamed)).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_data(&bytes);
    assert_eq!(
        streamed_chat_text(&events),
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn a_required_tool_call_comes_whole_and_streamed() {
    let (app, _engine) = app();
    let body = json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Paris right now?"}],
        "tools": weather_tools(),
        "tool_choice": "required",
        "max_tokens": 120,
        "temperature": 0,
    });
    let (status, whole) = send_json(&app, post_json(CHAT, &body)).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{whole}");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    assert!(["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap()));

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, bytes) = send(&app, post_json(CHAT, &streamed)).await;
    let chunks: Vec<Value> = sse_data(&bytes)
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut name = None;
    let mut streamed_arguments = String::new();
    let mut finish = None;
    for chunk in &chunks {
        let choice = &chunk["choices"][0];
        for delta in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(delta["index"], 0, "{chunk}");
            if let Some(n) = delta["function"]["name"].as_str() {
                assert!(
                    delta["id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with("call_"))
                );
                name = Some(n.to_string());
            }
            streamed_arguments.push_str(delta["function"]["arguments"].as_str().unwrap());
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(name.as_deref(), Some("get_weather"));
    assert_eq!(
        streamed_arguments,
        call["function"]["arguments"].as_str().unwrap()
    );
    assert_eq!(finish.as_deref(), Some("tool_calls"));

    // The result goes back and the model answers in text.
    let mut follow_up = body;
    follow_up["tool_choice"] = json!("none");
    follow_up["messages"] = json!([
        {"role": "user", "content": "What is the weather in Paris right now?"},
        choice["message"],
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 18, \"sky\": \"clear\"}"},
    ]);
    let (status, answer) = send_json(&app, post_json(CHAT, &follow_up)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        answer["choices"][0]["message"]["tool_calls"].is_null(),
        "{answer}"
    );
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
}

#[tokio::test]
async fn logit_bias_bans_and_forces_tokens() {
    let (app, _engine) = app();
    let model = chat_model();
    let text = |answer: &Value| {
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut body = chat_body("Name a colour.", 3);
    let (_, plain) = send_json(&app, post_json(CHAT, &body)).await;
    let first = model
        .tokenizer
        .encode_fast(text(&plain).as_str(), false)
        .unwrap()
        .get_ids()[0];
    body["logit_bias"] = json!({first.to_string(): -100});
    let (status, banned) = send_json(&app, post_json(CHAT, &body)).await;
    assert_eq!(status, StatusCode::OK, "{banned}");
    let banned_first = model
        .tokenizer
        .encode_fast(text(&banned).as_str(), false)
        .unwrap()
        .get_ids()[0];
    assert_ne!(banned_first, first, "{} vs {}", text(&plain), text(&banned));
    let forced = model
        .tokenizer
        .token_to_id("Ġthe")
        .expect("a token of the vocabulary");
    body["logit_bias"] = json!({forced.to_string(): 100});
    let (_, answer) = send_json(&app, post_json(CHAT, &body)).await;
    assert_eq!(
        text(&answer),
        model
            .tokenizer
            .decode(&[forced, forced, forced], true)
            .unwrap()
    );
}

#[tokio::test]
async fn a_recursive_schema_is_enforced_to_the_last_token() {
    let (app, _engine) = app();
    let cases = cases_in(&fixtures_dir().join("schemas").join("recursive"));
    for (file, case) in &cases {
        let (status, answer) = send_json(&app, post_json(CHAT, &schema_request(case, 150))).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let choice = &answer["choices"][0];
        let text = choice["message"]["content"].as_str().unwrap();
        match serde_json::from_str::<Value>(text) {
            Ok(value) => {
                assert_eq!(choice["finish_reason"], "stop", "{file}: {text}");
                assert!(value.is_object(), "{file}: {text}");
            }
            // Cut by max_tokens: what came is the start of a JSON document.
            Err(error) => {
                assert_eq!(choice["finish_reason"], "length", "{file}: {text}");
                assert!(error.is_eof(), "{file}: {error}: {text}");
            }
        }
    }
}
