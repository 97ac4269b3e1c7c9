//! Bad input: the right status and OpenAI error envelope every time, and the
//! server keeps answering.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

struct Case {
    name: &'static str,
    path: &'static str,
    body: Vec<u8>,
    status: StatusCode,
    param: Option<&'static str>,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: Value,
    status: u16,
    param: Option<&'static str>,
) -> Case {
    Case {
        name,
        path,
        body: body.to_string().into_bytes(),
        status: StatusCode::from_u16(status).unwrap(),
        param,
    }
}

fn chat(extra: Value) -> Value {
    let mut body = chat_body("Hello", 2);
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn tool(name: &str) -> Value {
    json!({"type": "function", "function": {"name": name,
        "parameters": {"type": "object", "properties": {}}}})
}

/// An array schema whose items nest `depth` levels.
fn deep_schema(depth: usize) -> Value {
    let mut schema = json!({"type": "string"});
    for _ in 0..depth {
        schema = json!({"type": "array", "items": schema});
    }
    json!({"type": "object", "properties": {"x": schema}})
}

fn cases() -> Vec<Case> {
    const CHAT: &str = "/v1/chat/completions";
    const COMPLETIONS: &str = "/v1/completions";
    let mut ten_mb =
        br#"{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":""#.to_vec();
    ten_mb.extend(std::iter::repeat_n(b'a', 10 * 1024 * 1024));
    ten_mb.extend(br#""}]}"#);
    let mut invalid_utf8 =
        br#"{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":"caf"#.to_vec();
    invalid_utf8.extend([0xC3, 0x28, b'"', b'}', b']', b'}']);
    vec![
        Case {
            name: "malformed JSON",
            path: CHAT,
            body: b"{\"model\": ".to_vec(),
            status: StatusCode::BAD_REQUEST,
            param: None,
        },
        Case {
            name: "not an object",
            path: CHAT,
            body: b"[1, 2]".to_vec(),
            status: StatusCode::BAD_REQUEST,
            param: None,
        },
        Case {
            name: "10 MB body",
            path: CHAT,
            body: ten_mb,
            status: StatusCode::PAYLOAD_TOO_LARGE,
            param: None,
        },
        Case {
            name: "invalid UTF-8",
            path: CHAT,
            body: invalid_utf8,
            status: StatusCode::BAD_REQUEST,
            param: None,
        },
        case(
            "missing model",
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            Some("model"),
        ),
        case(
            "missing messages",
            CHAT,
            json!({"model": CHAT_MODEL}),
            400,
            Some("messages"),
        ),
        case(
            "messages not a list",
            CHAT,
            chat(json!({"messages": "hi"})),
            400,
            Some("messages"),
        ),
        case(
            "empty messages",
            CHAT,
            chat(json!({"messages": []})),
            400,
            Some("messages"),
        ),
        case(
            "unknown role",
            CHAT,
            chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            400,
            Some("messages[0].role"),
        ),
        case(
            "content missing",
            CHAT,
            chat(json!({"messages": [{"role": "user"}]})),
            400,
            Some("messages[0].content"),
        ),
        case(
            "image part",
            CHAT,
            chat(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            400,
            Some("messages[0].content[0].type"),
        ),
        case(
            "a tool message before any call",
            CHAT,
            chat(json!({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]})),
            400,
            Some("messages[0].tool_call_id"),
        ),
        case(
            "unknown model",
            CHAT,
            chat(json!({"model": "gpt-17"})),
            404,
            Some("model"),
        ),
        case(
            "temperature wrong type",
            CHAT,
            chat(json!({"temperature": "hot"})),
            400,
            Some("temperature"),
        ),
        case(
            "temperature out of range",
            CHAT,
            chat(json!({"temperature": 3.5})),
            400,
            Some("temperature"),
        ),
        case(
            "top_p zero",
            CHAT,
            chat(json!({"top_p": 0})),
            400,
            Some("top_p"),
        ),
        case(
            "negative max_tokens",
            CHAT,
            chat(json!({"max_tokens": -5})),
            400,
            Some("max_tokens"),
        ),
        case(
            "max_tokens beyond context",
            CHAT,
            chat(json!({"max_tokens": 1_000_000})),
            400,
            Some("max_tokens"),
        ),
        case(
            "max_completion_tokens beyond context",
            CHAT,
            chat(json!({"max_completion_tokens": 1_000_000})),
            400,
            Some("max_completion_tokens"),
        ),
        case("n zero", CHAT, chat(json!({"n": 0})), 400, Some("n")),
        case(
            "five stop strings",
            CHAT,
            chat(json!({"stop": ["a", "b", "c", "d", "e"]})),
            400,
            Some("stop"),
        ),
        case(
            "empty stop string",
            CHAT,
            chat(json!({"stop": ""})),
            400,
            Some("stop"),
        ),
        case(
            "penalty out of range",
            CHAT,
            chat(json!({"presence_penalty": 2.5})),
            400,
            Some("presence_penalty"),
        ),
        case(
            "top_logprobs without logprobs",
            CHAT,
            chat(json!({"top_logprobs": 2})),
            400,
            Some("top_logprobs"),
        ),
        case(
            "top_logprobs too many",
            CHAT,
            chat(json!({"logprobs": true, "top_logprobs": 21})),
            400,
            Some("top_logprobs"),
        ),
        case(
            "stream_options without stream",
            CHAT,
            chat(json!({"stream_options": {"include_usage": true}})),
            400,
            Some("stream_options"),
        ),
        case(
            "a tool without its function",
            CHAT,
            chat(json!({"tools": [{"type": "function"}]})),
            400,
            Some("tools[0].function"),
        ),
        case(
            "a response_format schema that is not an object",
            CHAT,
            chat(json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": 5}}})),
            400,
            Some("response_format.json_schema.schema"),
        ),
        case(
            "an unknown response_format type",
            CHAT,
            chat(json!({"response_format": {"type": "xml"}})),
            400,
            Some("response_format.type"),
        ),
        case(
            "a json_schema without a name",
            CHAT,
            chat(json!({"response_format": {"type": "json_schema",
                "json_schema": {"schema": {"type": "object"}}}})),
            400,
            Some("response_format.json_schema.name"),
        ),
        case(
            "a strict schema with an unsupported keyword",
            CHAT,
            chat(
                json!({"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "strict": true,
                "schema": {"type": "object", "properties": {"a": {"not": {"type": "null"}}}}}}}),
            ),
            400,
            Some("response_format"),
        ),
        case(
            "a schema nested too deep",
            CHAT,
            chat(json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "deep", "schema": deep_schema(40)}}})),
            400,
            Some("response_format"),
        ),
        case(
            "a tool name outside the pattern",
            CHAT,
            chat(json!({"tools": [tool("bad name!")]})),
            400,
            Some("tools[0].function.name"),
        ),
        case(
            "duplicate tool names",
            CHAT,
            chat(json!({"tools": [tool("f"), tool("f")]})),
            400,
            Some("tools"),
        ),
        case(
            "more than 128 tools",
            CHAT,
            chat(json!({"tools": (0..129).map(|i| tool(&format!("f{i}"))).collect::<Vec<_>>()})),
            400,
            Some("tools"),
        ),
        case(
            "tool_choice naming a function not in tools",
            CHAT,
            chat(json!({"tools": [tool("f")],
                "tool_choice": {"type": "function", "function": {"name": "g"}}})),
            400,
            Some("tool_choice"),
        ),
        case(
            "tool_choice without tools",
            CHAT,
            chat(json!({"tool_choice": "required"})),
            400,
            Some("tool_choice"),
        ),
        case(
            "a tool message answering no earlier call",
            CHAT,
            chat(json!({"messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                    "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]})),
            400,
            Some("messages[2].tool_call_id"),
        ),
        case(
            "logit_bias on a token outside the vocabulary",
            CHAT,
            chat(json!({"logit_bias": {"99999999": 5}})),
            400,
            Some("logit_bias"),
        ),
        case(
            "logit_bias out of range",
            CHAT,
            chat(json!({"logit_bias": {"42": 150}})),
            400,
            Some("logit_bias"),
        ),
        case(
            "more than 300 logit_bias entries",
            CHAT,
            chat(
                json!({"logit_bias": (0..301).map(|i| (i.to_string(), json!(1))).collect::<serde_json::Map<_, _>>()}),
            ),
            400,
            Some("logit_bias"),
        ),
        case(
            "unknown parameter",
            CHAT,
            chat(json!({"frobnicate": 1})),
            400,
            Some("frobnicate"),
        ),
        case(
            "prompt token outside vocabulary",
            COMPLETIONS,
            json!({"model": CHAT_MODEL, "prompt": [1, 99999999]}),
            400,
            Some("prompt"),
        ),
        case(
            "empty prompt",
            COMPLETIONS,
            json!({"model": CHAT_MODEL, "prompt": ""}),
            400,
            Some("prompt"),
        ),
        case(
            "two prompts",
            COMPLETIONS,
            json!({"model": CHAT_MODEL, "prompt": ["a", "b"]}),
            400,
            Some("prompt"),
        ),
        case(
            "completion logprobs too many",
            COMPLETIONS,
            json!({"model": CHAT_MODEL, "prompt": "a", "logprobs": 9}),
            400,
            Some("logprobs"),
        ),
        case(
            "unsupported suffix",
            COMPLETIONS,
            json!({"model": CHAT_MODEL, "prompt": "a", "suffix": "b"}),
            400,
            Some("suffix"),
        ),
    ]
}

#[tokio::test]
async fn every_bad_request_gets_its_envelope_and_the_server_goes_on() {
    let (app, engine) = app();
    for case in cases() {
        let (status, bytes) = send(&app, post_raw(case.path, case.body)).await;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{}: not JSON ({e}): {}",
                case.name,
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(status, case.status, "{}: {body}", case.name);
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: {body}",
            case.name
        );
        assert!(error["type"].is_string(), "{}: {body}", case.name);
        assert!(
            error.get("code").is_some() && error.get("param").is_some(),
            "{}: {body}",
            case.name
        );
        if let Some(param) = case.param {
            assert_eq!(error["param"], param, "{}: {body}", case.name);
        }
        // The next request is served.
        let (status, ok) =
            send_json(&app, post_json("/v1/chat/completions", &chat_body("Hi", 1))).await;
        assert_eq!(status, StatusCode::OK, "after {}: {ok}", case.name);
    }
    assert_eq!(wait_idle(&engine).await, (0, 0));
}

#[tokio::test]
async fn unknown_route_and_wrong_method_use_the_envelope() {
    let (app, _engine) = app();
    let (status, body) = send_json(&app, post_json("/v1/nothing", &json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]["message"].is_string());
    let request = axum::http::Request::get("/v1/chat/completions")
        .body(axum::body::Body::empty())
        .unwrap();
    let (status, body) = send_json(&app, request).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"]["message"].is_string());
}

/// With `RUST_BACKTRACE=1` in the environment (meant for panics), an error
/// message still carries no stack trace: candle would capture one in every
/// error it raises and print it inside the message.
#[test]
fn error_messages_carry_no_backtrace_when_rust_backtrace_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.json");
    std::fs::write(&prompts, r#"[{"ids": [1, 999999]}]"#).unwrap();
    let model = fixtures_dir().join("tiny").join("llama-q8_0.gguf");
    let output = qpai(
        dir.path(),
        &[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
        ],
    )
    .env("RUST_BACKTRACE", "1")
    .env_remove("RUST_LIB_BACKTRACE")
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("outside the vocabulary"), "{stderr}");
    let frames = stderr
        .lines()
        .filter(|line| {
            let line = line.trim_start();
            line.split_once(": ")
                .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count();
    assert_eq!(frames, 0, "a backtrace in the message:\n{stderr}");
    assert!(!stderr.contains("stack backtrace"), "{stderr}");
}
